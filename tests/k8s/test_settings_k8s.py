"""What the Kubernetes manifests rely on in the settings: secrets read from a Secret volume
(KAIROS_SECRETS_DIR) and the JetStream replica count (KAIROS_STREAM_REPLICAS), the latter
on a real 3-node JetStream cluster."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from shared.bus import STREAMS, Bus
from shared.embedded import _nats_binary, free_port, wait_port
from shared.settings import get_settings
from tests.helpers import eventually


def _secret_volume(root: Path, files: dict[str, str]) -> Path:
    """A directory laid out the way the kubelet mounts a Secret: each key is a symlink into a
    timestamped ``..data`` directory."""
    data = root / "..2026_11_26_00_00_00.000000000"
    data.mkdir(parents=True)
    for name, value in files.items():
        (data / name).write_text(value)
    (root / "..data").symlink_to(data.name)
    for name in files:
        (root / name).symlink_to(f"..data/{name}")
    return root


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for key in list(os.environ):
        if key.startswith("KAIROS_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_settings_come_from_secret_files(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    keys = '[{"name": "pos", "key": "k-0123456789abcdef", "scopes": ["decisions:write"]}]'
    secrets = _secret_volume(
        tmp_path / "secrets",
        {
            "KAIROS_DATABASE_URL": "postgresql+asyncpg://kairos:pw@db-rw:5432/kairos",
            "KAIROS_API_KEYS": keys,
            "KAIROS_TRACKING_SECRET": "a-real-secret-from-the-volume\n",  # a file's newline
        },
    )
    clean_env.setenv("KAIROS_ENV", "prod")
    clean_env.setenv("KAIROS_SECRETS_DIR", str(secrets))
    s = get_settings()
    assert s.database_url == "postgresql+asyncpg://kairos:pw@db-rw:5432/kairos"
    assert s.api_keys == keys
    assert s.tracking_secret == "a-real-secret-from-the-volume"  # prod's check is satisfied


def test_an_environment_variable_wins_over_a_secret_file(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    secrets = _secret_volume(tmp_path / "s", {"KAIROS_REDIS_URL": "redis://from-file:6379/0"})
    clean_env.setenv("KAIROS_SECRETS_DIR", str(secrets))
    clean_env.setenv("KAIROS_REDIS_URL", "redis://from-env:6379/0")
    assert get_settings().redis_url == "redis://from-env:6379/0"


def test_a_missing_secrets_dir_is_refused(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAIROS_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="KAIROS_SECRETS_DIR"):
        get_settings()


def test_stream_replicas_setting_is_bounded(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAIROS_STREAM_REPLICAS", "3")
    assert get_settings().stream_replicas == 3
    assert Bus("nats://127.0.0.1:1").replicas == 3  # every process converges to the setting
    get_settings.cache_clear()
    clean_env.setenv("KAIROS_STREAM_REPLICAS", "0")
    with pytest.raises(ValueError, match="stream_replicas"):
        get_settings()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three nats-server processes forming one JetStream cluster on loopback."""
    root = tmp_path_factory.mktemp("nats-cluster")
    client = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    route_urls = ",".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            log = (root / f"n{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        _nats_binary(),
                        "-a",
                        "127.0.0.1",
                        "-p",
                        str(client[i]),
                        "-js",
                        "-sd",
                        str(root / f"n{i}"),
                        "-n",
                        f"n{i}",
                        "--cluster_name",
                        "kairos",
                        "--cluster",
                        f"nats://127.0.0.1:{routes[i]}",
                        "--routes",
                        route_urls,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for port, proc in zip(client, procs, strict=True):
            wait_port(port, proc, "NATS")
        yield [f"nats://127.0.0.1:{p}" for p in client]
    finally:
        for proc in procs:  # a throwaway cluster: no graceful JetStream shutdown needed
            proc.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


async def test_streams_are_created_with_the_configured_replicas(nats_cluster: list[str]) -> None:
    bus = Bus(nats_cluster[0], prefix=f"r{uuid.uuid4().hex[:6]}", replicas=3)

    async def streams_created() -> int:  # the cluster elects its meta leader first
        if not bus.is_connected():
            await bus.connect(ensure_streams=False)
        try:
            await bus.ensure_streams()
            infos = [await bus.js.stream_info(bus.stream(name)) for name in STREAMS]
        except Exception:
            return 0
        return min(int(i.config.num_replicas or 0) for i in infos)

    try:
        await eventually(streams_created, lambda n: n == 3, timeout=30)
        for name in STREAMS:
            info = await bus.js.stream_info(bus.stream(name))
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2  # the leader and two followers
        # A message published through one node is stored on all three.
        nc = await nats.connect(nats_cluster[2])
        ack = await nc.jetstream().publish(bus.subject("events.app.opened"), b"{}")
        assert ack.stream == bus.stream("EVENTS")
        await nc.close()
    finally:
        await bus.close()
