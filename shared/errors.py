"""RFC 9457 problem+json for every error a Kairos process answers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import fastapi.responses
import fastapi.routing
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path

log = logging.getLogger("kairos.errors")

PROBLEM = "application/problem+json"
PROBLEM_BASE = "https://kairos.dev/problems/"


class ProblemIssue(BaseModel):
    """One field at fault (a Kairos extension member of the problem document)."""

    model_config = ConfigDict(extra="allow")
    loc: list[str | int] = Field(
        description="Where: the field's path in the body (or 'path'/'query'/'header' first)"
    )
    msg: str = Field(description="What is wrong with it, for a person")
    field: str | None = Field(
        default=None, description="``loc`` as one dotted string, e.g. ``identities.email``"
    )


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error answer (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow", title="Problem")
    type: str = Field(
        description="A URI naming the kind of problem",
        examples=[PROBLEM_BASE + "422"],
        json_schema_extra={"format": "uri"},
    )
    title: str = Field(description="A short summary of the kind of problem")
    status: int = Field(ge=400, le=599, description="The HTTP status code")
    detail: str = Field(description="What went wrong this time, for a person to act on")
    instance: str | None = Field(default=None, description="A URI for this occurrence")
    errors: list[ProblemIssue] | None = Field(
        default=None, description="Kairos: each field at fault, for 4xx answers about input"
    )


class DomainError(Exception):
    """An error a caller can act on; carries its HTTP status (Polar's ResourceNotFound)."""

    status = 400
    title = "Bad request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, *, errors: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None


class NotFound(DomainError):
    status = 404
    title = "Not found"


class Conflict(DomainError):
    status = 409
    title = "Conflict"


class Unprocessable(DomainError):
    status = 422
    title = "Unprocessable content"


class PayloadTooLarge(DomainError):
    status = 413
    title = "Payload too large"


class Unauthorized(DomainError):
    status = 401
    title = "Unauthorized"
    headers = {"www-authenticate": 'Bearer realm="kairos"'}  # RFC 9110: a 401 names the scheme


class Forbidden(DomainError):
    status = 403
    title = "Forbidden"


class Unavailable(DomainError):
    status = 503
    title = "Service unavailable"
    headers = {"retry-after": "1"}


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Render one problem document."""
    body: dict[str, Any] = {
        "type": f"{PROBLEM_BASE}{status}",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [_with_field(e) for e in errors]
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=headers)


def _with_field(issue: dict[str, Any]) -> dict[str, Any]:
    """An issue with ``field``: its ``loc`` as one dotted string (``identities.email``)."""
    loc = issue.get("loc")
    if "field" in issue or not isinstance(loc, list | tuple):
        return dict(issue)
    return {**issue, "field": ".".join(str(p) for p in loc)}


def _loc(loc: Sequence[Any]) -> list[Any]:
    # FastAPI prefixes "body"; callers think in their own field names.
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return parts


def validation_errors(exc_errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as ``[{loc, msg}]``."""
    return [{"loc": _loc(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc_errors]


def describe(errors: list[dict[str, Any]]) -> str:
    """One readable sentence naming the fields at fault."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> Response:
        headers = exc.headers
        if headers is None and exc.status == 503:
            headers = {"retry-after": "1"}  # says when to come back
        return problem(exc.status, exc.detail, title=exc.title, errors=exc.errors, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = validation_errors(exc.errors())
        return problem(422, describe(errors), title="Invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = "No such resource or route"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            if allowed:
                kept = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
                headers = {**kept, "allow": ", ".join(allowed)}
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's answer to a body it cannot decode (not UTF-8): bad input, like bad JSON.
            return problem(
                422,
                "The body could not be read as JSON (it must be UTF-8 text).",
                title="Invalid request",
                errors=[{"loc": ["body"], "msg": "not UTF-8 JSON"}],
            )
        return problem(exc.status_code, detail, headers=headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(RedisError)
    @app.exception_handler(ConnectionError)
    @app.exception_handler(TimeoutError)
    @app.exception_handler(OSError)
    async def _unavailable(request: Request, exc: Exception) -> Response:
        # One rule (shared.db.is_transient) for "a dependency is down": Postgres restarting
        # or out of connections, Redis or the network gone. Anything else is a real 500.
        from shared.db import is_transient

        if not is_transient(exc):
            return await _unexpected(request, exc)
        log.warning("dependency unavailable on %s %s: %r", request.method, request.url.path, exc)
        return problem(
            503,
            "A backing store is not reachable right now; nothing was changed. Retry shortly.",
            headers={"retry-after": "1"},
        )

    @app.exception_handler(DataError)
    async def _bad_value(request: Request, exc: DataError) -> Response:
        return _value_problem(request, exc)

    @app.exception_handler(DBAPIError)
    async def _db(request: Request, exc: DBAPIError) -> Response:
        if _is_value_error(exc):
            return _value_problem(request, exc)
        from shared.db import is_transient

        if is_transient(exc):
            return await _unavailable(request, exc)
        log.exception("database error on %s %s", request.method, request.url.path)
        return problem(500, "An unexpected error occurred; it has been logged.")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "An unexpected error occurred; it has been logged.")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (for a 405's ``Allow``): FastAPI
    makes one route per method, so Starlette's own header names only the first."""
    path = request.url.path
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes: Any = contexts(request.app.routes) if contexts is not None else request.app.routes
    methods: set[str] = set()
    for route in routes:
        fmt = getattr(route, "path_format", None)
        if not fmt or not getattr(route, "methods", None):
            continue
        regex, _, _ = compile_path(fmt)
        if regex.match(path):
            methods |= set(route.methods)
    return sorted(methods)


def _is_value_error(exc: DBAPIError) -> bool:
    """Postgres refused a value (SQLSTATE class 22: out of range, bad text, too long) or the
    driver did before sending it (asyncpg's client-side DataError)."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    return isinstance(exc, DataError) or str(state).startswith("22")


def _value_problem(request: Request, exc: DBAPIError) -> Response:
    # The request passed validation but a value does not fit the store (e.g. an integer
    # beyond 64 bits): the caller's input, so a 4xx, and the transaction was rolled back.
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
    log.info("value refused by the database on %s %s: %s", request.method, request.url.path, reason)
    return problem(
        422,
        f"A value does not fit what can be stored: {reason}. Nothing was changed.",
        title="Invalid request",
    )


class JSONResponse(fastapi.responses.JSONResponse):
    """JSON rendered with orjson (FastAPI's ORJSONResponse is deprecated). It subclasses
    FastAPI's JSONResponse: FastAPI documents a route's ``response_model`` only for JSON
    response classes it knows, and gave every response a ``string`` schema before."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
