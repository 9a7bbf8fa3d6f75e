"""Spectral's ``spectral:oas`` ruleset finds nothing in the gateway's OpenAPI document, not even
a warning (the tool comes from ``make tools``; CI fails without it)."""

from __future__ import annotations

from pathlib import Path

import orjson

from gateway.app import create_app
from gateway.openapi import build
from shared.settings import Settings
from tests.contract.conftest import ROOT, missing_tool, run, tool


def test_spectral_oas_lints_clean(tmp_path: Path) -> None:
    spectral = tool("spectral", ROOT / ".tools" / "node_modules" / ".bin" / "spectral")
    if spectral is None:
        missing_tool("spectral (npm @stoplight/spectral-cli)")
    assert spectral is not None
    settings = Settings(env="test", run_dir=tmp_path / "run")
    doc = tmp_path / "openapi.json"
    doc.write_bytes(orjson.dumps(build(create_app(settings), settings)))
    result = run(
        [
            spectral,
            "lint",
            "--ruleset",
            str(ROOT / ".spectral.yaml"),
            "--fail-severity",
            "hint",
            "--format",
            "text",
            str(doc),
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
