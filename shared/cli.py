"""``kairos``: run the suite on the embedded default, migrate, import, generate demo data."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from shared.settings import get_settings

app = typer.Typer(help="Kairos, real-time campaign management.", no_args_is_help=True)
console = Console()


def _run_dir() -> Path:
    return get_settings().run_dir


def _stack_doc() -> dict[str, object]:
    path = _run_dir() / "stack.json"
    if not path.exists():
        raise typer.BadParameter(f"{path} not found: start the suite with 'kairos up' first")
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


def _api_key() -> str:
    key = os.environ.get("KAIROS_API_KEY")
    if key:
        return key
    path = _run_dir() / "api-key"
    if not path.exists():
        raise typer.BadParameter("set KAIROS_API_KEY (no .run/api-key found)")
    return path.read_text().strip()


@app.command()
def up() -> None:
    """Start Postgres, Redis and NATS (unless KAIROS_*_URL point elsewhere), migrate, start all
    six processes, and stay in the foreground; Ctrl-C or 'kairos down' stops everything."""
    from shared.stack import Stack

    run_dir = _run_dir()
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    console.print("[bold]Kairos[/] starting servers and migrating…")
    stack = Stack.prepare(run_dir)
    try:
        stack.start_all()
        stack.wait_ready()
        stack.write_stack_json()
        (run_dir / "kairos.pid").write_text(str(os.getpid()))
        key_file = run_dir / "api-key"
        console.print(f"[green]ready[/]  gateway: [bold]{stack.url('gateway')}[/]")
        if key_file.exists() and not os.environ.get("KAIROS_API_KEYS"):
            console.print(
                f"API key (admin, dev): [bold]{key_file.read_text().strip()}[/]  ({key_file})"
            )
        console.print(f"stack: {run_dir / 'stack.json'}   logs: {run_dir / 'logs'}   stop: Ctrl-C")
        restarts: dict[str, float] = {}
        while not stop["now"]:
            time.sleep(0.5)
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None and not stop["now"]:
                    if time.monotonic() - restarts.get(name, 0) < 5:
                        continue
                    console.print(f"[yellow]{name} exited ({proc.returncode}); restarting[/]")
                    restarts[name] = time.monotonic()
                    stack.start(name)
    finally:
        console.print("stopping…")
        stack.down()
        (run_dir / "kairos.pid").unlink(missing_ok=True)
        console.print("stopped")


@app.command()
def down() -> None:
    """Stop a running 'kairos up'."""
    pid_file = _run_dir() / "kairos.pid"
    if not pid_file.exists():
        console.print("nothing is running")
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        console.print("nothing is running")
        return
    for _ in range(120):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            console.print("stopped")
            return
        time.sleep(0.5)
    console.print("[red]still running after 60 s[/]")
    raise typer.Exit(1)


@app.command()
def migrate() -> None:
    """Apply every service's migrations to KAIROS_DATABASE_URL (creating the database)."""
    from shared.migrate import ensure_database, upgrade

    url = get_settings().database_url
    asyncio.run(ensure_database(url))
    upgrade(url)
    console.print("migrations applied")


@app.command("import")
def import_(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="NDJSON, one customer a line (.gz too)"),
    ],
    gateway: Annotated[
        str | None, typer.Option(help="Gateway URL (default: .run/stack.json)")
    ] = None,
) -> None:
    """Stream an NDJSON file of customers through the gateway, with rate and ETA; a ``.gz``
    file is sent compressed as it is (``Content-Encoding: gzip``)."""
    url = gateway or str(_stack_doc()["gateway"])
    headers = {"authorization": f"Bearer {_api_key()}", "content-type": "application/x-ndjson"}
    if file.suffix == ".gz":
        headers["content-encoding"] = "gzip"
    size = file.stat().st_size
    columns = (
        TextColumn("[bold]import"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("import", total=size)

        def chunks() -> Iterator[bytes]:
            with file.open("rb") as fh:
                while block := fh.read(1 << 20):
                    progress.update(task, advance=len(block))
                    yield block

        started = time.monotonic()
        resp = httpx.post(
            f"{url}/v1/customers:import",
            content=chunks(),
            headers=headers,
            timeout=httpx.Timeout(None, connect=5),
        )
    elapsed = time.monotonic() - started
    if resp.status_code != 200:
        console.print(f"[red]import failed ({resp.status_code})[/]: {resp.text}")
        raise typer.Exit(1)
    doc = resp.json()
    rate = doc["imported"] / elapsed if elapsed else 0
    console.print(
        f"imported {doc['imported']:,}, failed {doc['failed']:,} in {elapsed:.1f}s "
        f"({rate:,.0f} customers/s)"
    )
    for err in doc["errors"][:20]:
        console.print(f"  line {err['line']}: {err['detail']}")


@app.command()
def outbox(
    channel: Annotated[str | None, typer.Option(help="push, email or sms")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones")] = False,
    last: Annotated[int, typer.Option(help="Start with the last N messages")] = 20,
    gateway: Annotated[
        str | None, typer.Option(help="Gateway URL (default: .run/stack.json)")
    ] = None,
) -> None:
    """Print what customers would have received: the local outbox of every channel without a
    configured provider (the embedded default)."""
    url = gateway or str(_stack_doc()["gateway"])
    headers = {"authorization": f"Bearer {_api_key()}"}
    params: dict[str, str | int] = {"limit": 1000, **({"channel": channel} if channel else {})}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        after, backlog = 0, list[dict[str, object]]()
        while True:  # skip to the last N
            page = client.get("/v1/outbox", params={**params, "after": after})
            if page.status_code != 200:
                console.print(f"[red]outbox: {page.status_code}[/] {page.text}")
                raise typer.Exit(1)
            doc = page.json()
            backlog = (backlog + doc["items"])[-last:] if last > 0 else []
            if doc["next_after"] == after:
                break
            after = doc["next_after"]
        for item in backlog:
            _print_outboxed(item)
        while follow:
            time.sleep(0.5)
            doc = client.get("/v1/outbox", params={**params, "after": after}).json()
            for item in doc["items"]:
                _print_outboxed(item)
            after = doc["next_after"]


def _print_outboxed(item: dict[str, object]) -> None:
    content = item["content"] if isinstance(item["content"], dict) else {}
    text = " | ".join(
        f"{k}: {v}" for k, v in content.items() if k in ("title", "subject", "body", "text")
    )
    console.print(
        f"[dim]{item['delivered_at']}[/] [bold]{item['channel']}[/] → {item['to']} "
        f"({item['customer_id']}, {item['campaign_id']}) {text}",
        highlight=False,
    )


demo = typer.Typer(help="Demo data.")
app.add_typer(demo, name="demo")


@demo.command("generate")
def demo_generate(
    out: Annotated[Path, typer.Option(help="Output NDJSON of customers")] = Path(
        "customers.ndjson"
    ),
    customers: Annotated[int, typer.Option(help="How many customers")] = 10_000,
    events: Annotated[Path | None, typer.Option(help="Also write an NDJSON of events here")] = None,
    events_per_customer: Annotated[int, typer.Option()] = 5,
    seed: Annotated[int, typer.Option()] = 7,
) -> None:
    """Write a realistic telecom population (and optionally its events) as NDJSON."""
    from shared.demo import write_customers, write_events

    n = write_customers(out, customers, seed=seed)
    console.print(f"wrote {n:,} customers to {out}")
    if events is not None:
        m = write_events(events, customers, events_per_customer, seed=seed)
        console.print(f"wrote {m:,} events to {events}")


@app.command("export")
def export(
    kind: Annotated[str, typer.Argument(help="contacts or responses")],
    out: Annotated[Path, typer.Option(help="Output file")],
    since: Annotated[str | None, typer.Option(help="RFC 3339, inclusive")] = None,
    until: Annotated[str | None, typer.Option(help="RFC 3339, exclusive")] = None,
    format: Annotated[str, typer.Option(help="ndjson, csv or parquet")] = "ndjson",  # noqa: A002
    gateway: Annotated[
        str | None, typer.Option(help="Gateway URL (default: .run/stack.json)")
    ] = None,
) -> None:
    """Stream the contact or response history to a file, with a progress bar."""
    if kind not in ("contacts", "responses"):
        raise typer.BadParameter("contacts or responses", param_hint="KIND")
    url = gateway or str(_stack_doc()["gateway"])
    params = {"format": format}
    params |= {"since": since} if since else {}
    params |= {"until": until} if until else {}
    columns = (TextColumn(f"[bold]export {kind}"), DownloadColumn(), TransferSpeedColumn())
    started = time.monotonic()
    with (
        Progress(*columns, console=console) as progress,
        httpx.stream(
            "GET",
            f"{url}/v1/exports/{kind}",
            params=params,
            headers={"authorization": f"Bearer {_api_key()}"},
            timeout=httpx.Timeout(None, connect=5),
        ) as resp,
    ):
        if resp.status_code != 200:
            resp.read()
            console.print(f"[red]export failed ({resp.status_code})[/]: {resp.text}")
            raise typer.Exit(1)
        task = progress.add_task("export", total=None)
        with out.open("wb") as fh:
            for chunk in resp.iter_bytes():
                fh.write(chunk)
                progress.update(task, advance=len(chunk))
    size = out.stat().st_size
    console.print(f"wrote {size:,} bytes to {out} in {time.monotonic() - started:.1f}s")


@demo.command("scenario")
def demo_scenario(
    customers: Annotated[int, typer.Option(help="Population size")] = 20_000,
    seed: Annotated[int, typer.Option()] = 1,
    gateway: Annotated[
        str | None, typer.Option(help="Gateway URL (default: .run/stack.json)")
    ] = None,
) -> None:
    """Recover a known uplift through the API: 2 % baseline, 3 % with the offer, a 25 %
    control group; prints the true uplift against the report's estimate and interval."""
    from shared.scenario import run_scenario, summary

    url = gateway or str(_stack_doc()["gateway"])
    res = asyncio.run(
        run_scenario(url, _api_key(), customers=customers, seed=seed, log=console.print)
    )
    console.print(summary(res))
    if res.get("status") != "complete":
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
