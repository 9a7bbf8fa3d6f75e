"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.contract.hooks``): how to put an NDJSON
import body on the wire, which schemathesis has no serializer for."""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    return serialize_binary(value)
