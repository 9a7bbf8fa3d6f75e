"""Starts and supervises the whole suite: servers (embedded unless configured), migrations,
the six processes; used by ``kairos up`` and by the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.embedded import NATS_PORT, PG_PORT, REDIS_PORT, Embedded
from shared.migrate import ROOT, ensure_database, upgrade
from shared.settings import SERVICES

PROCESSES = {
    "profile": "services.profile",
    "selection": "services.selection",
    "decision": "services.decision",
    "dispatch": "services.dispatch",
    "feedback": "services.feedback",
    "gateway": "gateway",
}


@dataclass
class Stack:
    """The suite as child processes with one environment."""

    run_dir: Path
    env: dict[str, str]
    ports: dict[str, int]
    embedded: Embedded | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        run_dir: Path,
        *,
        base_env: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
        embedded_ports: dict[str, int] | None = None,
    ) -> Stack:
        """Start whatever server is not configured through KAIROS_*_URL, then migrate."""
        env = dict(base_env if base_env is not None else os.environ)
        run_dir.mkdir(parents=True, exist_ok=True)
        env["KAIROS_RUN_DIR"] = str(run_dir)
        ep = embedded_ports or {}
        emb = Embedded(
            run_dir,
            pg_port=ep.get("pg_port", PG_PORT),
            redis_port=ep.get("redis_port", REDIS_PORT),
            nats_port=ep.get("nats_port", NATS_PORT),
        )
        try:
            if not env.get("KAIROS_DATABASE_URL"):
                emb.start_postgres()
                env["KAIROS_DATABASE_URL"] = emb.database_url
            if not env.get("KAIROS_REDIS_URL"):
                emb.start_redis()
                env["KAIROS_REDIS_URL"] = emb.redis_url
            if not env.get("KAIROS_NATS_URL"):
                emb.start_nats()
                env["KAIROS_NATS_URL"] = emb.nats_url
            asyncio.run(ensure_database(env["KAIROS_DATABASE_URL"]))
            upgrade(env["KAIROS_DATABASE_URL"])
        except BaseException:
            emb.stop()
            raise
        default_ports = {"gateway": 8080, **{s: 8181 + i for i, s in enumerate(SERVICES)}}
        p = {**default_ports, **(ports or {})}
        for name, port in p.items():
            env.setdefault(f"KAIROS_{name.upper()}_PORT", str(port))
        actual = {n: int(env[f"KAIROS_{n.upper()}_PORT"]) for n in PROCESSES}
        return cls(run_dir, env, actual, emb if emb.procs else None)

    def url(self, name: str) -> str:
        host = (
            self.env.get("KAIROS_GATEWAY_HOST", "127.0.0.1")
            if name.partition("#")[0] == "gateway"
            else "127.0.0.1"
        )
        return f"http://{host}:{self.ports[name]}"

    def start(self, name: str) -> None:
        """Start (or restart) one process. ``decision#2`` is a second replica of decision:
        the same module on a port of its own (picked at its first start), with its own
        instance id; it shares the durable consumers, leases and stores with the first."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name.replace('#', '-')}.log", "ab")  # noqa: SIM115
        base, _, replica = name.partition("#")
        env = self.env
        if replica:
            if name not in self.ports:
                from shared.embedded import free_port

                self.ports[name] = free_port()
            env = {
                **self.env,
                f"KAIROS_{base.upper()}_PORT": str(self.ports[name]),
                "KAIROS_INSTANCE_ID": f"{base}-{replica}",
            }
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", PROCESSES[base]],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, name: str, *, kill: bool = False) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def start_all(self) -> None:
        for name in PROCESSES:
            self.start(name)

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60) -> None:
        """Block until every named process answers /readyz with 200."""
        pending = list(names or PROCESSES)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    proc = self.procs.get(name)
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with code {proc.returncode}; see {self.run_dir}/logs/{name}.log"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(self.url(name) + "/readyz").status_code == 200:
                            pending.remove(name)
                if pending:
                    time.sleep(0.2)
        if pending:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")

    def write_stack_json(self) -> Path:
        doc = {
            "gateway": self.url("gateway"),
            "services": {n: self.url(n) for n in SERVICES},
            "postgres": self.env["KAIROS_DATABASE_URL"],
            "redis": self.env["KAIROS_REDIS_URL"],
            "nats": self.env["KAIROS_NATS_URL"],
            "pid": os.getpid(),
        }
        path = self.run_dir / "stack.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def down(self) -> None:
        """Stop the processes (gateway first), then the embedded servers."""
        for name in [n for n in self.procs if "#" in n]:  # replicas first
            self.stop(name)
        for name in reversed(list(PROCESSES)):
            self.stop(name)
        if self.embedded is not None:
            self.embedded.stop()
