"""Every kustomize overlay renders and each object validates against the Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2] / "k8s"
K8S_VERSION = "1.31.0"
PROCESSES = ("gateway", "profile", "selection", "decision", "dispatch", "feedback")


def render(directory: Path) -> list[dict[str, Any]]:
    """A minimal kustomize: resources, bases, labels, images, namespace."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            objs.extend(render(path))
        else:
            objs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for label in kust.get("labels", []):
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for img in kust.get("images", []):
        for o in objs:
            for c in _containers(o):
                name, _, _tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', 'latest')}"
    if ns := kust.get("namespace"):
        for o in objs:
            o["metadata"]["namespace"] = ns
    return objs


def _containers(o: dict[str, Any]) -> list[dict[str, Any]]:
    spec = o.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


OVERLAYS = [ROOT / "base", *sorted((ROOT / "overlays").iterdir())]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_renders_and_validates(overlay: Path) -> None:
    objs = render(overlay)
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for p in PROCESSES:
        for kind in ("Deployment", "Service", "ServiceAccount"):
            assert (kind, f"kairos-{p}") in kinds


def test_deployments_are_hardened() -> None:
    for o in render(ROOT / "base"):
        if o["kind"] != "Deployment":
            continue
        pod = o["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["resources"]["limits"]
            assert c["resources"]["requests"]
            assert c["image"].startswith("ghcr.io/kairos-oss/kairos:")
