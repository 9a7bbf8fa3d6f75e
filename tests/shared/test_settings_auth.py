"""Settings refuse development secrets outside dev; keys are checked as configured."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.auth import ApiKeyConfig, KeyRing, load_keyring
from shared.settings import Settings


def test_default_secrets_refused_outside_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIROS_ENV", "prod")
    monkeypatch.setenv(
        "KAIROS_API_KEYS", json.dumps([{"name": "a", "key": "k" * 20, "scopes": ["admin"]}])
    )
    with pytest.raises(ValidationError, match="TRACKING_SECRET"):
        Settings()
    monkeypatch.setenv("KAIROS_TRACKING_SECRET", "s3cr3t-for-real")
    assert Settings().env == "prod"
    monkeypatch.delenv("KAIROS_API_KEYS")
    with pytest.raises(ValidationError, match="API_KEYS"):
        Settings()


def test_dev_generates_and_keeps_one_admin_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIROS_API_KEYS", raising=False)
    s = Settings(run_dir=tmp_path, env="dev")
    ring = load_keyring(s)
    key = (tmp_path / "api-key").read_text().strip()
    principal = ring.authenticate(key)
    assert principal is not None and principal.can("catalog:write")
    assert load_keyring(s).authenticate(key) is not None  # a restart keeps the key


def test_keyring_scopes() -> None:
    ring = KeyRing([ApiKeyConfig(name="pos", key="p" * 20, scopes=["decisions:write"])])
    p = ring.authenticate("p" * 20)
    assert p is not None and p.name == "pos"
    assert p.can("decisions:write") and not p.can("customers:read")
    assert ring.authenticate("q" * 20) is None
    with pytest.raises(ValueError, match="unknown scopes"):
        KeyRing([ApiKeyConfig(name="x", key="x" * 20, scopes=["root"])])
