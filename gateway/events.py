"""``POST /v1/events``: validate all-or-nothing, publish ``events.<type>`` on JetStream."""

from __future__ import annotations

import logging
import random
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from gateway.idempotency import idempotent
from shared.auth import Principal, require
from shared.contracts.bus import EventOccurred
from shared.contracts.events import MAX_BATCH, EventBatch, EventIn, EventsAccepted
from shared.errors import JSONResponse, Unavailable, Unprocessable, describe
from shared.events import iso, utcnow
from shared.service import Runtime, runtime

log = logging.getLogger("kairos.gateway.events")
router = APIRouter(tags=["events"])
_rand = random.getrandbits

_BODY_SCHEMA = TypeAdapter(EventIn | EventBatch).json_schema(
    ref_template="#/components/schemas/{model}"
)
OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {k: v for k, v in _BODY_SCHEMA.items() if k != "$defs"}}
        },
    }
}
EXTRA_SCHEMAS: dict[str, Any] = _BODY_SCHEMA.get("$defs", {})


def parse_events(raw: bytes) -> list[EventIn]:
    """One event or ``{"events": [...]}``; any invalid event rejects the whole request."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Unprocessable(f"The body is not JSON: {exc}") from exc
    batch = isinstance(doc, dict) and "events" in doc
    items = doc.get("events") if batch else [doc]
    if not isinstance(items, list) or not items:
        raise Unprocessable(
            "'events' must be a non-empty list.",
            errors=[{"loc": ["events"], "msg": "empty or not a list"}],
        )
    if len(items) > MAX_BATCH:
        raise Unprocessable(
            f"At most {MAX_BATCH} events per request; got {len(items)}.",
            errors=[{"loc": ["events"], "msg": f"more than {MAX_BATCH} events"}],
        )
    if batch and set(doc) != {"events"}:
        extra = sorted(set(doc) - {"events"})
        raise Unprocessable(f"Unknown fields next to 'events': {extra}.")
    out, errors = [], []
    for i, item in enumerate(items):
        prefix: list[Any] = ["events", i] if batch else []
        try:
            out.append(EventIn.model_validate(item))
        except ValidationError as exc:
            for e in exc.errors():
                loc = [p for p in e["loc"]]
                errors.append({"loc": prefix + loc, "msg": e["msg"]})
    if errors:
        raise Unprocessable(
            f"{len({tuple(e['loc'][:2]) for e in errors}) if batch else 1} invalid event(s); "
            f"nothing was accepted. {describe(errors)}",
            errors=errors,
        )
    return out


def encode_events(events: list[EventIn], principal: str) -> list[tuple[str, str, bytes]]:
    """CloudEvents 1.0 envelopes, serialised once: (subject, id, bytes)."""
    now = iso(utcnow())
    out = []
    for ev in events:
        # Event ids only need to be unique (not secret): a fast random UUIDv4.
        eid = str(ev.id or uuid.UUID(int=_rand(128), version=4))
        subject, wire = EventOccurred.wire(
            event_id=eid,
            type=ev.type,
            customer_id=ev.customer_id,
            anonymous_id=ev.anonymous_id,
            time=iso(ev.time) if ev.time else now,
            properties=ev.properties,
            received_at=now,
            principal=principal,
        )
        out.append((subject, eid, wire))
    return out


@router.post("/v1/events", status_code=202, response_model=EventsAccepted, openapi_extra=OPENAPI)
async def post_events(
    request: Request,
    principal: Annotated[Principal, Depends(require("events:write"))],
    rt: Annotated[Runtime, Depends(runtime)],
) -> Response:
    """Accept events; answered only after JetStream has stored every one of them."""

    async def call() -> Response:
        events = parse_events(await request.body())
        items = encode_events(events, principal.name)
        try:
            await rt.bus.publish_encoded(items)
        except Exception as exc:
            log.error("publishing events failed: %s", exc)
            raise Unavailable("Events could not be stored; nothing may be lost, so retry.") from exc
        body = {"accepted": len(items), "ids": [eid for _, eid, _ in items]}
        return JSONResponse(body, status_code=202)

    return await idempotent(request, rt.redis, rt.keys, principal.name, call)
