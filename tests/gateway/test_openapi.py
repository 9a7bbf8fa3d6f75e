"""The gateway's OpenAPI document is a contract a client can be generated from.

Built in-process from the app (no servers): every operation has its real success schema,
every error is a documented Problem, scopes and the bearer scheme are stated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.openapi import build
from shared.settings import Settings

# The team's API.md lies in shared/ beside the checkout (a worktree's is beside /work/main).
API_MD = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[3] / "shared" / "API.md",
            Path("/work/shared/API.md"),
        )
        if p.exists()
    ),
    Path("API.md"),
)
METHODS = ("get", "put", "post", "patch", "delete")


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings(
        env="test",
        run_dir=tmp_path_factory.mktemp("run"),
        public_url="https://kairos.example.com",
    )
    return build(create_app(settings), settings)


def _ops(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (m, p, op) for p, item in doc["paths"].items() for m, op in item.items() if m in METHODS
    ]


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_every_json_success_has_a_real_schema(doc: dict[str, Any]) -> None:
    untyped = []
    for method, path, op in _ops(doc):
        for status, resp in op["responses"].items():
            if not status.startswith("2"):
                continue
            for media, body in resp.get("content", {}).items():
                if media != "application/json":
                    continue
                schema = _resolve(doc, body.get("schema", {}))
                if schema.get("type") == "string" or not schema:
                    untyped.append(f"{method.upper()} {path} {status}")
    assert untyped == [], untyped


def test_decision_and_event_schemas_are_the_models(doc: dict[str, Any]) -> None:
    decide = doc["paths"]["/v1/decisions"]["post"]
    ok = decide["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/DecisionResponse"}
    req = decide["requestBody"]["content"]["application/json"]["schema"]
    assert req == {"$ref": "#/components/schemas/DecisionRequest"}
    events = doc["paths"]["/v1/events"]["post"]
    assert "202" in events["responses"]
    assert "EventIn" in str(events["requestBody"]) and "EventBatch" in str(events["requestBody"])
    assert "EventIn" in doc["components"]["schemas"]


def test_every_error_is_a_documented_problem(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert "errors" in problem["properties"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for method, path, op in _ops(doc):
        errors = {s: r for s, r in op["responses"].items() if s[0] in "45"}
        assert {"500", "503"} <= set(errors), (method, path)
        for status, resp in errors.items():
            content = resp.get("content", {})
            assert list(content) == ["application/problem+json"], (method, path, status)
            assert content["application/problem+json"]["schema"] == {
                "$ref": "#/components/schemas/Problem"
            }
            assert resp["description"]


def test_status_codes_follow_what_the_route_does(doc: dict[str, Any]) -> None:
    put = doc["paths"]["/v1/customers/{customer_id}"]["put"]["responses"]
    assert {"401", "403", "404", "409", "413", "415", "422"} <= set(put)
    view = doc["paths"]["/v1/customers/{customer_id}"]["get"]["responses"]
    assert {"401", "403", "404", "422"} <= set(view) and "415" not in view
    click = doc["paths"]["/t/{token}"]["get"]["responses"]
    assert "302" in click and "404" in click and "401" not in click


def test_security_scheme_and_scopes(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    for method, path, op in _ops(doc):
        public = path.startswith(("/t/", "/o/", "/u/", "/callbacks/"))
        if public:
            assert op["security"] == [], (method, path)
            assert "x-kairos-scopes" not in op
            continue
        assert op["security"] == [{"bearer": []}], (method, path)
        scopes = op["x-kairos-scopes"]
        assert scopes, (method, path)
        for scope in scopes:
            assert f"`{scope}`" in op["description"], (method, path)
    assert doc["paths"]["/v1/decisions"]["post"]["x-kairos-scopes"] == ["decisions:write"]
    approve = doc["paths"]["/v1/campaigns/{campaign_id}/approve"]["post"]
    assert approve["x-kairos-scopes"] == ["campaigns:approve"]


def test_idempotency_key_where_honoured(doc: dict[str, Any]) -> None:
    def headers(op: dict[str, Any]) -> list[str]:
        return [p["name"] for p in op.get("parameters", []) if p["in"] == "header"]

    assert "Idempotency-Key" in headers(doc["paths"]["/v1/events"]["post"])
    assert "Idempotency-Key" in headers(doc["paths"]["/v1/customers/{customer_id}"]["put"])
    assert "Idempotency-Key" not in headers(doc["paths"]["/v1/customers/{customer_id}"]["get"])
    assert "Idempotency-Key" not in headers(doc["paths"]["/v1/decisions"]["post"])


def test_path_parameters_carry_their_constraints(doc: dict[str, Any]) -> None:
    loose = []
    for method, path, op in _ops(doc):
        for p in op.get("parameters", []):
            if p["in"] != "path":
                continue
            schema = p["schema"]
            if "pattern" not in schema and "maxLength" not in schema:
                loose.append(f"{method.upper()} {path} {p['name']}")
    assert loose == [], loose


def test_servers_tags_and_public_links(doc: dict[str, Any]) -> None:
    assert doc["servers"][0]["url"] == "https://kairos.example.com"
    for link in ("/t/{token}", "/o/{token}", "/u/{token}"):
        assert link in doc["paths"]
    assert doc["paths"]["/u/{token}"]["post"]["security"] == []
    assert "image/gif" in doc["paths"]["/o/{token}"]["get"]["responses"]["200"]["content"]


def test_settings_limits_show_in_the_schema(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    rule = schemas["PolicyRule"]["properties"]["max"]
    assert rule["maximum"] == 10_000 and rule["minimum"] == 0
    limit = schemas["DecisionRequest"]["properties"]["limit"]
    assert limit["maximum"] == 10
    batch = schemas["EventBatch"]["properties"]["events"]
    assert batch["maxItems"] == 1000


@pytest.mark.skipif(not API_MD.exists(), reason="the team's API.md is not beside this checkout")
def test_every_path_of_api_md_is_documented(doc: dict[str, Any]) -> None:
    text = API_MD.read_text()
    found = set(re.findall(r"`(GET|PUT|POST|PATCH|DELETE) (/[^ `?]+)", text))
    missing = []
    # The operations endpoints every process serves are not part of the /v1 contract.
    found -= {("GET", p) for p in ("/openapi.json", "/metrics", "/readyz", "/healthz")}
    for method, raw in found:
        for path in _expand(raw):
            if method.lower() not in doc["paths"].get(path, {}):
                missing.append(f"{method} {path}")
    assert missing == [], missing


def _expand(path: str) -> list[str]:
    # API.md writes lifecycle actions as one path: /submit|approve|activate|...
    head, sep, tail = path.rpartition("/")
    if "|" in tail:
        return [f"{head}/{t}" for t in tail.split("|")]
    return [path.replace("…", "{token}")]
