"""Exports streamed as NDJSON, CSV and Parquet (read back with pyarrow), paged by keyset
without losing or repeating a row; bad formats and ranges; selection's internal export."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pyarrow.parquet as pq

from shared.bus import Bus
from shared.stack import Stack
from tests.conftest import KEYS
from tests.feedback.conftest import contact, publish, uid
from tests.helpers import eventually

# Twenty days back: inside the time a response may carry, and no other test's contacts.
START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=20)
END = START + timedelta(days=1)


async def _seed(gw: httpx.AsyncClient, bus: Bus) -> tuple[set[str], set[tuple[str, str]]]:
    u = uid()
    contacts = [
        contact(
            f"x-{i}-{u}",
            f"cmp-x-{u}",
            # Several contacts share a time: the keyset must break the tie by tracking id.
            at=START + timedelta(minutes=i // 3),
            control=i % 5 == 0,
            channel="email",
        )
        for i in range(40)
    ]
    outside = contact(f"y-{u}", f"cmp-x-{u}", at=END + timedelta(seconds=1))
    await publish(bus, *contacts, outside)
    ids = {c.tracking_id for c in contacts}

    async def count() -> int:
        r = await gw.get(
            "/v1/exports/contacts", params={"since": START.isoformat(), "until": END.isoformat()}
        )
        return len(r.text.splitlines())

    await eventually(count, lambda n: n >= 40)
    responses = set()
    for c in contacts[:15]:
        r = await gw.post(
            "/v1/responses",
            json={
                "tracking_id": c.tracking_id,
                "outcome": "opened",
                "time": (START + timedelta(hours=2)).isoformat(),
            },
        )
        assert r.status_code == 202
        responses.add((c.tracking_id, "opened"))
    return ids, responses


async def test_exports_in_every_format(gw: httpx.AsyncClient, stack: Stack, bus: Bus) -> None:
    ids, responses = await _seed(gw, bus)
    window = {"since": START.isoformat(), "until": END.isoformat()}

    r = await gw.get("/v1/exports/contacts", params={**window, "format": "ndjson"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [orjson.loads(line) for line in r.text.splitlines()]
    assert {row["tracking_id"] for row in rows} == ids
    assert all(START.isoformat()[:10] == row["at"][:10] for row in rows)

    r = await gw.get("/v1/exports/responses", params={**window, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    got = list(csv.DictReader(io.StringIO(r.text)))
    assert {(row["tracking_id"], row["outcome"]) for row in got} == responses

    # Parquet, paged by 7 (straight from feedback) so that several row groups are written.
    async with httpx.AsyncClient(base_url=stack.url("feedback")) as svc:
        r = await svc.get(
            "/v1/exports/contacts", params={**window, "format": "parquet", "page_size": 7}
        )
    assert r.status_code == 200
    pf = pq.ParquetFile(io.BytesIO(r.content))
    assert pf.metadata.num_row_groups == 6
    table = pf.read()
    assert table.num_rows == 40 and set(table.column("tracking_id").to_pylist()) == ids
    assert str(table.schema.field("at").type) == "timestamp[us, tz=UTC]"
    assert sum(table.column("control").to_pylist()) == 8

    r = await gw.get("/v1/exports/contacts", params={**window, "format": "parquet"})
    assert r.status_code == 200
    table = pq.read_table(io.BytesIO(r.content))
    assert set(table.column("tracking_id").to_pylist()) == ids
    r = await gw.get("/v1/exports/responses", params={**window, "format": "parquet"})
    table = pq.read_table(io.BytesIO(r.content))
    assert (
        set(
            zip(
                table.column("tracking_id").to_pylist(),
                table.column("outcome").to_pylist(),
                strict=True,
            )
        )
        == responses
    )

    # Paging by keyset in NDJSON too: neither lost nor repeated rows.
    async with httpx.AsyncClient(base_url=stack.url("feedback")) as svc:
        r = await svc.get("/v1/exports/contacts", params={**window, "page_size": 4})
    lines = [orjson.loads(line)["tracking_id"] for line in r.text.splitlines()]
    assert len(lines) == len(set(lines)) == 40


async def test_bad_formats_and_ranges(gw: httpx.AsyncClient) -> None:
    for params in (
        {"format": "xlsx"},
        {"since": "2024-01-02T00:00:00Z", "until": "2024-01-01T00:00:00Z"},
        {"since": "yesterday"},
    ):
        r = await gw.get("/v1/exports/contacts", params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_internal_contacts_for_selection(stack: Stack, bus: Bus) -> None:
    u = uid()
    at = datetime(2023, 9, 1, tzinfo=UTC)
    targets = [contact(f"s-{i}-{u}", f"cmp-s-{u}", at=at) for i in range(5)]
    await publish(bus, *targets, contact(f"sc-{u}", f"cmp-s-{u}", at=at, control=True))
    async with httpx.AsyncClient(base_url=stack.url("feedback")) as svc:

        async def all_pages() -> list[dict[str, str]]:
            out: list[dict[str, str]] = []
            after = None
            while True:
                params = {
                    "since": at.isoformat(),
                    "limit": "2",
                    **({"after": after} if after else {}),
                }
                r = await svc.get("/internal/contacts", params=params)
                assert r.status_code == 200, r.text
                doc = r.json()
                out += [c for c in doc["contacts"] if c["campaign_id"] == f"cmp-s-{u}"]
                after = doc["next_cursor"]
                # keyset order is by time: past this test's moment come the suite's other
                # contacts (tens of thousands by now), which two at a time would take minutes
                later = any(datetime.fromisoformat(c["at"]) > at for c in doc["contacts"])
                if after is None or later:
                    return out

        got = await eventually(all_pages, lambda rows: len(rows) >= 5)
        assert sorted(c["customer_id"] for c in got) == sorted(c.customer_id for c in targets)
        r = await svc.get("/internal/contacts", params={"since": at.isoformat(), "after": "%%%"})
        assert r.status_code == 422


async def test_kairos_export_command(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, tmp_path: Path
) -> None:
    u = uid()
    at = datetime(2023, 3, 3, tzinfo=UTC)
    mine = [contact(f"cli-{i}-{u}", f"cmp-cli-{u}", at=at) for i in range(3)]
    await publish(bus, *mine)
    window = {"since": at.isoformat(), "until": (at + timedelta(days=1)).isoformat()}

    async def count() -> int:
        r = await gw.get("/v1/exports/contacts", params=window)
        return len(r.text.splitlines())

    await eventually(count, lambda n: n >= 3)
    out = tmp_path / "contacts.parquet"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cli",
        "export",
        "contacts",
        "--out",
        str(out),
        "--since",
        window["since"],
        "--until",
        window["until"],
        "--format",
        "parquet",
        "--gateway",
        stack.url("gateway"),
        env={**os.environ, "KAIROS_API_KEY": KEYS["admin"]},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    table = pq.read_table(out)
    assert sorted(table.column("customer_id").to_pylist()) == sorted(c.customer_id for c in mine)
