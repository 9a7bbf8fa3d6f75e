"""Numbered NDJSON lines from a streamed request body, gzip or not, in constant memory."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator

from shared.errors import DomainError

# Output of one decompression step: bounds memory whatever the ratio (a gzip bomb inflates
# a 64 KiB chunk to 64 MiB; it is read out in pieces of this size instead).
INFLATE_STEP = 1 << 20
MAX_LINE = 4 << 20


class UnsupportedEncoding(DomainError):
    status = 415


class BadBody(DomainError):
    status = 400


def decoder_for(content_encoding: str | None) -> zlib._Decompress | None:
    """None for an identity body, a gzip decompressor, or 415 for anything else."""
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    raise UnsupportedEncoding(
        f"Content-Encoding '{content_encoding}' is not supported; send the body as it is"
        " or gzip-compressed (Content-Encoding: gzip)."
    )


async def _inflate(
    chunks: AsyncIterable[bytes], content_encoding: str | None
) -> AsyncIterator[bytes]:
    d = decoder_for(content_encoding)
    if d is None:
        async for chunk in chunks:
            if chunk:
                yield chunk
        return
    fed = False  # the current gzip member has begun
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                fed = True
                out = d.decompress(data, INFLATE_STEP)
                if out:
                    yield out
                if d.eof:  # a concatenated gzip member may follow (what `cat a.gz b.gz` makes)
                    data = d.unused_data
                    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                    fed = False
                else:
                    data = d.unconsumed_tail
        # Input is all in; read out what the step bound held back.
        while fed and not d.eof:
            out = d.decompress(d.unconsumed_tail, INFLATE_STEP)
            if not out:
                break
            yield out
    except zlib.error as exc:
        raise BadBody(f"The body is not valid gzip ({exc}).") from exc
    if fed and not d.eof:
        raise BadBody("The gzip body is truncated (it ends inside a gzip member).")


async def batches(
    chunks: AsyncIterable[bytes], content_encoding: str | None, size: int
) -> AsyncIterator[list[tuple[int, bytes | None]]]:
    """Lists of up to ``size`` non-blank (line number, line) pairs, numbered from 1. A line
    longer than ``MAX_LINE`` comes as (line number, None) and is skipped, not buffered."""
    buf = b""
    lineno = 0
    skipping = False  # inside an over-long line: drop bytes until its end
    batch: list[tuple[int, bytes | None]] = []
    async for data in _inflate(chunks, content_encoding):
        buf = buf + data if buf else data
        if b"\n" not in data:
            if len(buf) > MAX_LINE:
                if not skipping:
                    batch.append((lineno + 1, None))
                skipping, buf = True, b""
            continue
        *lines, buf = buf.split(b"\n")
        for line in lines:
            lineno += 1
            if skipping:
                skipping = False
                continue
            if line.strip():
                batch.append((lineno, line))
                if len(batch) >= size:
                    yield batch
                    batch = []
        if len(buf) > MAX_LINE:
            batch.append((lineno + 1, None))
            skipping, buf = True, b""
    if buf.strip() and not skipping:
        batch.append((lineno + 1, buf))
    if batch:
        yield batch
