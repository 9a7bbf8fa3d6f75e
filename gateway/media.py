"""415 for a request body the operation does not read: JSON everywhere, NDJSON for imports,
forms for the unsubscribe button and the SMS provider's callbacks."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from shared import errors

WRITES = {"POST", "PUT", "PATCH"}
NDJSON = {
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json",
    "text/plain",
}
# Bodies other than JSON: a form (RFC 8058 one-click unsubscribe, provider callbacks).
OPEN_PREFIXES = ("/u/", "/callbacks/")
IMPORT_PATH = "/v1/customers:import"


def is_json(media: str) -> bool:
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def accepted(path: str, media: str) -> bool:
    """Whether a body of this media type (no parameters, lower case) is read at ``path``."""
    if path.startswith(OPEN_PREFIXES):
        return True
    if path == IMPORT_PATH:
        return media in NDJSON
    return is_json(media)


class MediaTypes:
    """Refuses a write whose body's Content-Type the route does not read, before it is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITES:
            await self.app(scope, receive, send)
            return
        content_type = b""
        has_body = False
        for k, v in scope.get("headers", []):
            if k == b"content-type":
                content_type = v
            elif (k == b"content-length" and v.strip() not in (b"", b"0")) or (
                k == b"transfer-encoding"
            ):
                has_body = True
        media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
        if has_body and media and not accepted(scope["path"], media):
            wanted = "application/x-ndjson" if scope["path"] == IMPORT_PATH else "application/json"
            resp = errors.problem(
                415,
                f"The body is {media}; this operation reads {wanted}.",
                title="Unsupported media type",
                errors=[{"loc": ["header", "Content-Type"], "msg": f"expected {wanted}"}],
            )
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
