"""The one image runs every process the manifests start. No Docker engine here, so the image
is checked from its parts: the Dockerfile's stages, the package its build stage installs
(built the same way from the same files), and every container command against that package's
entry points, ports and probes."""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import typer

from shared.settings import Settings
from shared.stack import Stack
from tests.k8s.kube import PRODUCTION, REPO, build, containers, pod_spec

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined; ARGs substituted in FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    args = {}
    for op, rest in out:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    return [
        (op, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) if op == "FROM" else rest)
        for op, rest in out
    ]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, rest in _instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, rest))
    return stages


def test_dockerfile_is_multi_stage_pinned_non_root_with_a_healthcheck() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    final = dict((op, rest) for op, rest in stages[-1])
    assert final["USER"].split(":")[0] == "10001"  # what the manifests' runAsUser expects
    assert "COPY" in final and "--from=build" in final["COPY"]
    assert "HEALTHCHECK" in final
    env = final["ENV"]
    assert "PATH=/opt/kairos/bin:$PATH" in env  # `python` and `kairos` are the venv's


def _healthcheck() -> list[str]:
    final = _stages()[-1]
    (rest,) = [r for op, r in final if op == "HEALTHCHECK"]
    cmd: list[str] = json.loads(rest[rest.index("CMD") + 3 :].strip())
    return cmd


async def test_the_healthcheck_answers_for_a_live_process_only(stack: Stack) -> None:
    cmd = _healthcheck()
    assert cmd[0] == "python"
    run = [sys.executable, *cmd[1:]]

    def status(url: str) -> int:
        env = {"KAIROS_HEALTH_URL": url, "PATH": "/usr/bin:/bin"}
        return subprocess.run(run, env=env, timeout=30).returncode

    for name in ("gateway", "dispatch"):
        assert await asyncio.to_thread(status, stack.url(name) + "/healthz") == 0
    assert await asyncio.to_thread(status, "http://127.0.0.1:9/healthz") == 1


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The package the build stage installs: its COPY sources, built into a wheel."""
    ctx = tmp_path_factory.mktemp("context")
    build_stage = _stages()[0]
    for op, rest in build_stage:
        if op == "COPY" and not rest.startswith("--"):
            *sources, _dest = rest.split()
            for src in sources:
                path = REPO / src
                if path.is_dir():
                    shutil.copytree(
                        path, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    shutil.copy2(path, ctx / src)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ctx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (whl,) = out.glob("kairos-*.whl")
    return zipfile.ZipFile(whl)


def _processes(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, c) for o in objs if pod_spec(o) is not None for c in containers(o)]


def test_every_container_command_is_an_entry_point_of_the_image(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    seen = set()
    for _, c in _processes(build(PRODUCTION)):
        cmd = c["command"]
        seen.add(tuple(cmd))
        if cmd[:2] == ["python", "-m"]:
            module = cmd[2]
            assert f"{module.replace('.', '/')}/__main__.py" in names, cmd
        else:
            assert cmd[0] == "kairos", cmd
            assert f"kairos = {project['scripts']['kairos']}" in entry_points
            mod, _, attr = project["scripts"]["kairos"].partition(":")
            assert f"{mod.replace('.', '/')}.py" in names
            app = getattr(importlib.import_module(mod), attr)
            commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
            assert cmd[1] in commands, (cmd, sorted(commands))
    # Migrations ship with the package (`kairos migrate` reads them at run time).
    for service in ("profile", "selection", "decision", "dispatch", "feedback"):
        assert f"services/{service}/migrations/env.py" in names
        assert any(n.startswith(f"services/{service}/migrations/versions/") for n in names)
    assert len(seen) == 7  # six processes and the migration


def test_every_process_listens_where_its_service_and_probes_point() -> None:
    """The container port is the process's own port setting, and the probed paths exist."""
    for o, c in _processes(build(PRODUCTION)):
        if o["kind"] != "Deployment":
            continue
        module = c["command"][2]
        main = importlib.util.find_spec(f"{module}.__main__")
        assert main is not None and main.origin is not None
        call = next(
            n
            for n in ast.walk(ast.parse(Path(main.origin).read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "serve"
        )
        name, factory = (ast.literal_eval(a) for a in call.args)
        settings = Settings(env="test")
        (port,) = c["ports"]
        assert port["containerPort"] == settings.port_of(name), name
        mod, _, attr = factory.partition(":")
        app = getattr(importlib.import_module(mod), attr)(settings)
        paths = {getattr(r, "path", None) for r in app.routes}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["path"] in paths, (name, probe)
        assert "/metrics" in paths
        svc = next(
            s
            for s in build(PRODUCTION)
            if s["kind"] == "Service" and s["metadata"]["name"] == o["metadata"]["name"]
        )
        assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
