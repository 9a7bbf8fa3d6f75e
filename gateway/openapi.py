"""The gateway's OpenAPI document: FastAPI's, completed into a contract clients can generate
code from.

FastAPI writes each route's parameters, request body and success schema. This adds what it
cannot know:
- every error answer, as ``application/problem+json`` (``shared.errors.Problem``) with the
  status codes the route can give (401/403 for keys and scopes, 404 for unknown ids,
  409 for conflicts and reused ``Idempotency-Key`` s, 413/415/422 for bad input, 503/504 when a
  service behind the gateway is down or slow);
- the bearer security scheme, per operation, with the scopes it needs in its description and
  in ``x-kairos-scopes`` (the public tracking links and provider callbacks are open);
- the ``Idempotency-Key`` header on the writes that honour it;
- ``servers`` and the tags' descriptions.

``python -m gateway.openapi FILE`` (``make openapi``) writes the document.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import orjson
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from gateway.events import EXTRA_SCHEMAS as EVENT_SCHEMAS
from shared.auth import SCOPES, RequireScope
from shared.errors import PROBLEM, Problem, ProblemIssue
from shared.settings import Settings

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
BEARER = "bearer"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Writes that do not go through ``gateway.idempotency`` (a decision is answered fresh each
# time; an import is a stream, replayed line by line by the profile's own upsert).
NOT_IDEMPOTENT = {("POST", "/v1/decisions"), ("POST", "/v1/customers:import")}

WHY: dict[int, str] = {
    401: "No API key, or a key that is not known (`Authorization: Bearer <key>`)",
    403: "The key lacks the scope this operation needs",
    404: "No such resource (an id in the path is not known), or a forged link",
    409: "A conflict with the resource's state, or an `Idempotency-Key` reused with another "
    "body or still in progress",
    413: "The request body is larger than the gateway accepts",
    415: "The request body's Content-Type is not one this operation reads",
    422: "The request is not valid: `errors` names each field at fault",
    500: "An unexpected error; it has been logged",
    502: "A provider behind Kairos refused the request",
    503: "A service or store behind the gateway is not reachable; nothing was changed, retry "
    "(see `Retry-After`)",
    504: "A service behind the gateway did not answer in time",
}

TAGS = [
    {"name": "customers", "description": "The unified profile: identities, consents, devices"},
    {"name": "events", "description": "Behavioural events from apps and other systems"},
    {"name": "catalog", "description": "Offers, campaigns, lifecycle, contact policy, decisions"},
    {"name": "segments", "description": "Named audience rules, previews and snapshots"},
    {"name": "feedback", "description": "Responses, reports and exports"},
    {"name": "messages", "description": "Outbound messages, the in-app inbox, SMS webhooks"},
    {"name": "rewards", "description": "Rewards granted for responses"},
    {
        "name": "links",
        "description": "The public tracking links carried in messages: no API key, a signed "
        "token (click redirect, open pixel, unsubscribe)",
    },
]


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """The app's API routes, through included routers (FastAPI ≥ 0.16x includes lazily:
    ``iter_route_contexts`` yields each with its effective path)."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:
        yield from (r for r in app.routes if isinstance(r, APIRoute))
        return
    for ctx in contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            yield ctx


def _scopes(dependant: Dependant) -> tuple[str, ...] | None:
    """The scopes a route's ``require(...)`` dependency accepts (None: an open route)."""
    for dep in dependant.dependencies:
        if isinstance(dep.call, RequireScope):
            return dep.call.scopes
        found = _scopes(dep)
        if found is not None:
            return found
    return None


def _problem_response(status: int, description: str | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {
        "description": description or WHY.get(status, "An error"),
        "content": {PROBLEM: {"schema": PROBLEM_REF}},
    }
    if status == 401:
        resp["headers"] = {
            "WWW-Authenticate": {
                "description": "The scheme to authenticate with: `Bearer`",
                "schema": {"type": "string"},
            }
        }
    if status == 503:
        resp["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return resp


def _error_statuses(route: Any, method: str, op: dict[str, Any], secured: bool) -> set[int]:
    statuses = {500, 503}
    has_params = bool(op.get("parameters"))
    has_body = "requestBody" in op
    if secured:
        statuses |= {401, 403, 504}  # secured routes are answered by a service behind
    if has_params or has_body:
        statuses.add(422)
    if has_body:
        statuses |= {413, 415}
    if "{" in route.path_format:
        statuses.add(404)
    if secured and method != "GET":
        statuses.add(409)
    return statuses


def _document_errors(route: Any, method: str, op: dict[str, Any], secured: bool) -> dict[str, Any]:
    responses: dict[str, Any] = op.setdefault("responses", {})
    for status in sorted(_error_statuses(route, method, op, secured)):
        key = str(status)
        existing = responses.get(key, {})
        # FastAPI documents 422 as its own HTTPValidationError: Kairos answers a Problem.
        responses[key] = _problem_response(status, existing.get("description"))
        if key == "422":
            responses[key]["description"] = WHY[422]
    for key, resp in responses.items():
        if key in ("301", "302", "303", "307", "308"):
            resp.setdefault("headers", {})["Location"] = {
                "description": "Where the link leads",
                "schema": {"type": "string", "format": "uri"},
            }
            resp.pop("content", None)
    for key, resp in list(responses.items()):  # statuses a route declared itself (502, …)
        if key.isdigit() and int(key) >= 400 and "content" not in resp:
            responses[key] = _problem_response(int(key), resp.get("description"))
    return responses


def _document_security(op: dict[str, Any], scopes: tuple[str, ...] | None) -> None:
    if scopes is None:
        op["security"] = []
        return
    op["security"] = [{BEARER: []}]
    op["x-kairos-scopes"] = list(scopes)
    needed = " or ".join(f"`{s}`" for s in scopes)
    line = f"**Scopes:** {needed} (or `admin`)."
    desc = op.get("description", "").rstrip()
    op["description"] = f"{desc}\n\n{line}" if desc else line


def _document_idempotency(op: dict[str, Any]) -> None:
    params: list[dict[str, Any]] = op.setdefault("parameters", [])
    params.append(
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": False,
            "description": "A retried request with the same key (and the same body) answers "
            "the first response again and changes nothing; kept 24 h. The replay carries "
            "`Idempotent-Replayed: true`.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
        }
    )


def _tuples_have_items(node: Any) -> None:
    """A tuple (``prefixItems``) also gets ``items``, which OpenAPI tools expect of an array."""
    if isinstance(node, dict):
        prefix = node.get("prefixItems")
        if node.get("type") == "array" and prefix and "items" not in node:
            same = all(p == prefix[0] for p in prefix)
            node["items"] = prefix[0] if same else {"anyOf": prefix}
        for value in node.values():
            _tuples_have_items(value)
    elif isinstance(node, list):
        for value in node:
            _tuples_have_items(value)


# Two contracts may name a model alike; FastAPI then keys both by module path, which
# generated clients refuse (two models of one title). Plain names instead.
def _plain_schema_names(doc: dict[str, Any]) -> None:
    schemas: dict[str, Any] = doc["components"]["schemas"]
    renames: dict[str, str] = {}
    for key in list(schemas):
        if "__" not in key:
            continue
        module, _, name = key.rpartition("__")
        new = module.rsplit("__", 1)[-1].capitalize() + name
        renames[key] = new
    for old, new in renames.items():
        schema = schemas.pop(old)
        schema["title"] = new
        schemas[new] = schema
    for key, schema in schemas.items():  # "Reward-Input" and "Reward-Output" are two models
        if isinstance(schema, dict) and "-" in key:
            schema["title"] = key.replace("-", "")
    if renames:
        refs = {
            f"#/components/schemas/{o}": f"#/components/schemas/{n}" for o, n in renames.items()
        }
        _rewrite_refs(doc, refs)


def _rewrite_refs(node: Any, refs: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref in refs:
            node["$ref"] = refs[ref]
        for value in node.values():
            _rewrite_refs(value, refs)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value, refs)


def _operation_id(route: Any, method: str, seen: set[str]) -> str:
    """The handler's name (``decide``, ``post_events``): what a generated client calls the
    operation. FastAPI's default appends the path and method (``decide_v1_decisions_post``)."""
    name = str(route.name)
    if name in seen:
        name = f"{name}_{method.lower()}"
    seen.add(name)
    return name


def _summary(route: Any) -> str:
    doc = (route.description or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else route.name.replace("_", " ").capitalize()


def build(app: FastAPI, settings: Settings | None = None) -> dict[str, Any]:
    """The complete document for the gateway ``app``."""
    doc = get_openapi(
        title="Kairos",
        version="1",
        summary="Real-time campaign management: the public /v1 API.",
        description=(
            "Every error is an RFC 9457 `application/problem+json` document (`Problem`). "
            "Authenticate with `Authorization: Bearer <API key>`; each operation lists the "
            "scopes its key needs. Writes take an optional `Idempotency-Key`. Times are RFC "
            "3339 in UTC; durations are strings like `90s`, `15m`, `48h`, `30d`."
        ),
        routes=app.routes,
        tags=TAGS,
    )
    public = (settings.public_url if settings else "http://127.0.0.1:8080").rstrip("/")
    doc["servers"] = [{"url": public, "description": "This deployment's gateway"}]
    doc["info"]["license"] = {"name": "Proprietary", "identifier": "LicenseRef-Kairos"}
    doc["info"]["contact"] = {"name": "Kairos platform team"}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(EVENT_SCHEMAS)
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    schemas.setdefault("ProblemIssue", ProblemIssue.model_json_schema())
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    scopes_text = ", ".join(f"`{s}`" for s in sorted(SCOPES))
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key, configured with a name and scopes "
            f"({scopes_text}; `admin` holds every scope).",
        }
    }
    doc["security"] = [{BEARER: []}]

    _tuples_have_items(schemas)
    _plain_schema_names(doc)
    seen_ids: set[str] = set()
    for route in _api_routes(app):
        if not route.include_in_schema:
            continue
        ops = doc["paths"].get(route.path_format, {})
        scopes = _scopes(route.dependant)
        for method in route.methods:
            op = ops.get(method.lower())
            if op is None:
                continue
            op.setdefault("summary", _summary(route))
            op["operationId"] = _operation_id(route, method, seen_ids)
            _document_security(op, scopes)
            secured = scopes is not None
            if secured and method != "GET" and (method, route.path_format) not in NOT_IDEMPOTENT:
                _document_idempotency(op)
            _document_errors(route, method, op, secured)
            if not op.get("parameters"):
                op.pop("parameters", None)
    return doc


def main(argv: list[str]) -> int:
    """``python -m gateway.openapi [FILE]``: write the document (stdout without FILE)."""
    from gateway.app import create_app

    settings = Settings(env="dev")
    data = orjson.dumps(
        build(create_app(settings), settings), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    )
    if len(argv) > 1:
        Path(argv[1]).write_bytes(data + b"\n")
    else:
        sys.stdout.buffer.write(data + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
