"""``Idempotency-Key``: a retried write returns the first answer and changes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from shared.errors import Conflict, Unprocessable
from shared.redis import Keys

TTL_S = 24 * 3600
PENDING = b"pending"


async def idempotent(
    request: Request,
    redis: Redis,
    keys: Keys,
    principal: str,
    call: Callable[[], Awaitable[Response]],
) -> Response:
    """Run ``call`` once per (principal, method, path, key); replay its answer afterwards."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await call()
    if not 1 <= len(key) <= 200:
        raise Unprocessable("Idempotency-Key must be 1 to 200 characters.")
    rkey = keys("idem", principal, request.method, request.url.path, key)
    if not await redis.set(rkey, PENDING, nx=True, ex=60):
        stored = await redis.get(rkey)
        if stored is None or stored == PENDING:
            raise Conflict("A request with this Idempotency-Key is still being processed.")
        doc = orjson.loads(stored)
        return Response(
            doc["body"].encode(),
            status_code=doc["status"],
            media_type=doc["type"],
            headers={"idempotent-replayed": "true"},
        )
    try:
        resp = await call()
    except BaseException:
        await redis.delete(rkey)
        raise
    if resp.status_code >= 500:
        await redis.delete(rkey)
        return resp
    body = bytes(resp.body)
    doc = {
        "status": resp.status_code,
        "type": resp.media_type or "application/json",
        "body": body.decode(),
    }
    await redis.set(rkey, orjson.dumps(doc), ex=TTL_S)
    return resp
