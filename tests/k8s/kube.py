"""Rendering the kustomizations the way a platform team does (`kubectl kustomize`), and the
tools the k8s tests need, found where .ci/run installs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
TOOLS = REPO / ".venv-tools" / "bin"
PRODUCTION = K8S / "overlays" / "production"
PROCESSES = ("gateway", "profile", "selection", "decision", "dispatch", "feedback")


def tool(name: str) -> str | None:
    """A command from KAIROS_<NAME>, the PATH, or the tools virtualenv (.venv-tools)."""
    explicit = os.environ.get(f"KAIROS_{name.upper()}")
    if explicit:
        return explicit
    local = TOOLS / name
    return shutil.which(name) or (str(local) if local.exists() else None)


def require(name: str) -> str:
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return found


@cache
def _build(directory: Path) -> str:
    kubectl = require("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def build_text(directory: Path) -> str:
    """`kubectl kustomize <directory>` as YAML text."""
    return _build(directory)


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <directory>` renders."""
    return [d for d in yaml.safe_load_all(_build(directory)) if d]


def pod_spec(o: dict[str, Any]) -> dict[str, Any] | None:
    if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        spec: dict[str, Any] = o["spec"]["template"]["spec"]
        return spec
    return None


def containers(o: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(o)
    if spec is None:
        return []
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}
