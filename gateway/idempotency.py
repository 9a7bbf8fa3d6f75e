"""``Idempotency-Key``: a retried write returns the first answer and changes nothing; the same
key with another body is a mistake the caller must hear about (409), never a silent replay.

A stored answer is personal data when it is about a customer: each is listed under the
customer's token (``idem-of:<token>``) so that erasure deletes it. The answer of an erasure
itself is never stored (it names the customer; a retried ``DELETE`` answers 404, gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import orjson
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from shared.errors import Conflict, Unprocessable
from shared.privacy import customer_token
from shared.redis import Keys

TTL_S = 24 * 3600
PENDING = b"pending"
CUSTOMER_PATH = re.compile(r"^/v1/customers/([^/]+)")


def customers_of(path: str, body: bytes) -> set[str]:
    """The customers a stored answer is about: the path's and the body's ``customer_id``."""
    out = set()
    m = CUSTOMER_PATH.match(path)
    if m:
        out.add(unquote(m.group(1)))
    if body[:1] == b"{" and b'"customer_id"' in body:
        with contextlib.suppress(ValueError):
            cid = orjson.loads(body).get("customer_id")
            if isinstance(cid, str):
                out.add(cid)
    return out


async def idempotent(
    request: Request,
    redis: Redis,
    keys: Keys,
    principal: str,
    call: Callable[[], Awaitable[Response]],
    *,
    remember: bool = True,
) -> Response:
    """Run ``call`` once per (principal, method, path, key); replay its answer afterwards
    (``remember=False``: only one at a time, nothing kept)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await call()
    if not 1 <= len(key) <= 200:
        raise Unprocessable("Idempotency-Key must be 1 to 200 characters.")
    rkey = keys("idem", principal, request.method, request.url.path, key)
    digest = hashlib.sha256(await request.body()).hexdigest()
    if not await redis.set(rkey, PENDING, nx=True, ex=60):
        stored = await redis.get(rkey)
        if stored is None or stored == PENDING:
            raise Conflict("A request with this Idempotency-Key is still being processed.")
        doc = orjson.loads(stored)
        if doc.get("digest", digest) != digest:
            raise Conflict(
                "This Idempotency-Key was used with a different body; use a new key for a "
                "new request.",
                errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused, other body"}],
            )
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
    if resp.status_code >= 500 or not remember:
        await redis.delete(rkey)
        return resp
    body = bytes(resp.body)
    doc = {
        "status": resp.status_code,
        "type": resp.media_type or "application/json",
        "body": body.decode(),
        "digest": digest,
    }
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(rkey, orjson.dumps(doc), ex=TTL_S)
        for cid in customers_of(request.url.path, body):
            index = keys.idempotency_index(customer_token(cid))
            pipe.sadd(index, rkey)
            pipe.expire(index, TTL_S)
        await pipe.execute()
    return resp
