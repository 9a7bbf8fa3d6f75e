"""``GET /v1/exports/contacts|responses``: the history for a BI tool, streamed in constant
memory (keyset pages, each written out before the next is read; Parquet as one row group
per page, flushed as it is written)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Depends, Query
from starlette.responses import StreamingResponse

from services.feedback.history.reads import COLUMNS, KEYSET, HistoryReads
from shared.errors import Unprocessable
from shared.events import iso
from shared.service import Runtime, runtime

router = APIRouter(tags=["exports"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Format = Literal["ndjson", "csv", "parquet"]
PAGE = 10_000
MEDIA = {
    "ndjson": "application/x-ndjson",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
}
TS = pa.timestamp("us", tz="UTC")
_TYPES: dict[str, pa.DataType] = {
    "at": TS,
    "sent_at": TS,
    "delivered_at": TS,
    "failed_at": TS,
    "bounced_at": TS,
    "expired_at": TS,
    "control": pa.bool_(),
    "value": pa.float64(),
}
SCHEMAS = {
    table: pa.schema([(c, _TYPES.get(c, pa.string())) for c in cols])
    for table, cols in COLUMNS.items()
}


class _Chunks:
    """A write-only file that hands back what was written since it was last drained."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.pos = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _plain(v: Any) -> Any:
    return iso(v) if isinstance(v, datetime) else v


def _text_page(rows: Sequence[Any], fmt: str, cols: Sequence[str], header: bool) -> bytes:
    if fmt == "ndjson":
        return b"".join(
            orjson.dumps({c: _plain(v) for c, v in zip(cols, r, strict=True)}) + b"\n" for r in rows
        )
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(cols)
    w.writerows([["" if v is None else _plain(v) for v in r] for r in rows])
    return buf.getvalue().encode()


def _parquet_page(writer: pq.ParquetWriter, schema: pa.Schema, rows: Sequence[Any]) -> None:
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    table = pa.Table.from_arrays(
        [pa.array(list(col), type=f.type) for col, f in zip(columns, schema, strict=True)],
        schema=schema,
    )
    writer.write_table(table)


async def stream(
    rt: Runtime, table: str, fmt: str, since: datetime, until: datetime, page: int = PAGE
) -> AsyncIterator[bytes]:
    """The rows of ``table`` in ``[since, until)`` in ``fmt``, page by page."""
    assert rt.db is not None
    cols = COLUMNS[table]
    keys = [cols.index(k) for k in KEYSET[table]]
    sink = _Chunks()
    writer = (
        pq.ParquetWriter(sink, SCHEMAS[table], compression="zstd") if fmt == "parquet" else None
    )
    after: list[str] | None = None
    first = True
    while True:
        # A short session per page: no snapshot is held open while the client reads.
        async with rt.db.sessions() as session:
            rows = await HistoryReads(session).page(
                table, since=since, until=until, after=after, limit=page
            )
        if writer is not None:
            if rows:
                await asyncio.to_thread(_parquet_page, writer, SCHEMAS[table], rows)
        else:
            chunk = _text_page(rows, fmt, cols, header=first)
            if chunk:
                yield chunk
        first = False
        if writer is not None:
            chunk = sink.drain()
            if chunk:
                yield chunk
        if len(rows) < page:
            break
        last = rows[-1]
        after = [iso(last[i]) if isinstance(last[i], datetime) else str(last[i]) for i in keys]
    if writer is not None:
        writer.close()
        yield sink.drain()


def _range(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    lo = since or datetime(1970, 1, 1, tzinfo=UTC)
    hi = until or datetime(9999, 12, 31, tzinfo=UTC)
    lo = lo if lo.tzinfo else lo.replace(tzinfo=UTC)
    hi = hi if hi.tzinfo else hi.replace(tzinfo=UTC)
    if hi <= lo:
        raise Unprocessable(
            "until must be after since.",
            errors=[{"loc": ["query", "until"], "msg": "before since"}],
        )
    return lo, hi


def _export(table: str) -> None:
    async def export(
        rt: RuntimeDep,
        since: datetime | None = None,
        until: datetime | None = None,
        format: Annotated[Format, Query()] = "ndjson",  # noqa: A002 (the API's name)
        # Not in the public API: lets tests and benchmarks choose the keyset page.
        page_size: Annotated[int, Query(ge=1, le=100_000, include_in_schema=False)] = PAGE,
    ) -> StreamingResponse:
        lo, hi = _range(since, until)
        return StreamingResponse(
            stream(rt, table, format, lo, hi, page_size),
            media_type=MEDIA[format],
            headers={
                "content-disposition": f'attachment; filename="{table}.{format}"',
                "cache-control": "no-store",
            },
        )

    export.__doc__ = (
        f"Every {table[:-1]} with since <= at < until, streamed (ndjson, csv, parquet)."
    )
    router.get(f"/v1/exports/{table}", response_class=StreamingResponse, name=f"export_{table}")(
        export
    )


_export("contacts")
_export("responses")
