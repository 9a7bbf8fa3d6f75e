"""The process runner's collector thresholds: the default, an override, a refusal."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from shared.runner import tune_gc
from shared.settings import Settings


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_a_process_collects_after_the_configured_counts(
    thresholds: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tune_gc(Settings())
    assert gc.get_threshold() == (50_000, 20, 10)
    monkeypatch.setenv("KAIROS_GC_THRESHOLDS", "[2000, 5, 7]")
    tune_gc(Settings())
    assert gc.get_threshold() == (2000, 5, 7)


def test_a_threshold_that_would_stop_collection_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gc.set_threshold(0, …) disables collection altogether: never by a typo in a setting.
    monkeypatch.setenv("KAIROS_GC_THRESHOLDS", "[0, 10, 10]")
    with pytest.raises(ValidationError, match="gc_thresholds"):
        Settings()
