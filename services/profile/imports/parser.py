"""Validating a batch of import lines: staging rows for the good ones, errors for the rest."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from services.profile.imports.reader import MAX_LINE
from shared.contracts.customers import CustomerImportLine

# The staging table's columns, in the order of a row (see ImportRepository.STAGE).
Row = tuple[int, str, str, list[str], str, str | None, str | None, str]


@dataclass
class Parsed:
    """One batch: rows to stage (line order) and per-line errors."""

    rows: list[Row] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _error(lineno: int, exc: ValidationError) -> dict[str, Any]:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "json_invalid":
        return {"line": lineno, "detail": f"not JSON: {first['msg']}"}
    return {"line": lineno, "field": where or None, "detail": f"{where or 'line'}: {first['msg']}"}


def parse_batch(lines: list[tuple[int, bytes | None]]) -> Parsed:
    """Validate each line as a PUT body with its ``customer_id`` (the same model, so the same
    rules); a good line becomes one staging row, shaped as PUT stores it."""
    out = Parsed()
    validate = CustomerImportLine.model_validate_json
    dumps = orjson.dumps
    for lineno, raw in lines:
        if raw is None:
            out.errors.append({"line": lineno, "detail": f"line longer than {MAX_LINE} bytes"})
            continue
        try:
            m = validate(raw)
        except ValidationError as exc:
            out.errors.append(_error(lineno, exc))
            continue
        try:
            idents = m.identities.as_dict()
        except ValueError as exc:
            out.errors.append({"line": lineno, "field": "identities", "detail": str(exc)})
            continue
        cid = m.customer_id
        out.rows.append(
            (
                lineno,
                cid,
                dumps(m.attributes).decode(),
                sorted(set(m.tags)),
                dumps(m.consents.given()).decode(),
                m.timezone,
                m.locale,
                dumps(idents).decode(),
            )
        )
    return out


SLICE = 250  # lines parsed between two turns of the event loop


async def parse_batch_yielding(lines: list[tuple[int, bytes | None]]) -> Parsed:
    """``parse_batch`` a slice at a time, letting the event loop run in between: a batch
    takes ~60 ms to validate, and the batch being merged meanwhile must not wait that long
    to send its next statement (Postgres would sit idle)."""
    out = Parsed()
    for start in range(0, len(lines), SLICE):
        part = parse_batch(lines[start : start + SLICE])
        out.rows += part.rows
        out.errors += part.errors
        await asyncio.sleep(0)
    return out
