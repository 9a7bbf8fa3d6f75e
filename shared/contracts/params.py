"""Constraints on names and ids that travel both in paths or queries and in bodies: each is
defined once here, and used by the gateway's and the services' routes and by the models.

A refusal quotes the pattern, so it says exactly which characters are allowed.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, StringConstraints

# Touchpoints and the channels a contact policy names: what a person types for a place or a
# desk ("pos", "call-center", "pos-berlin", "web_checkout"): lower-case letters, digits, '_'
# and '-', starting with a letter or a digit, at most 40.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
NAME_HELP = "1 to 40 of a-z, 0-9, '_' and '-', starting with a letter or a digit"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# A contact-policy rule's scope: '*' (every contact) or a channel or touchpoint name.
POLICY_SCOPE_PATTERN = r"^(\*|[a-z0-9][a-z0-9_-]{0,39})$"

# Ids Kairos makes: a batch run's and a snapshot's.
RUN_ID_PATTERN = r"^run-[0-9a-f]{16}$"
RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]
SNAPSHOT_ID_PATTERN = r"^snap-[0-9a-f]{16}$"
SnapshotId = Annotated[str, StringConstraints(pattern=SNAPSHOT_ID_PATTERN)]

# A calendar month, YYYY-MM (reports).
MONTH_PATTERN = r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$"

# Outbound channels that have an outbox (dispatch's local delivery).
OUTBOX_CHANNEL_PATTERN = r"^(push|email|sms)$"
# Positions in a sequence (the outbox's ``after``): a Postgres bigint.
SEQUENCE_MAX = 2**63 - 1


_RFC3339_START = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _rfc3339(v: Any) -> Any:
    # Pydantic also reads a number as seconds since 1970; the contract's times are RFC 3339
    # strings (a datetime passes: the services build models from values they already hold).
    if isinstance(v, datetime):
        return v
    if not isinstance(v, str) or not _RFC3339_START.match(v):
        raise ValueError("not an RFC 3339 time such as 2026-11-01T00:00:00Z")
    return v


# A time in a query (``since``, ``until``) or a body: RFC 3339 only, as the document says.
Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339)]


def _json_number(v: Any) -> Any:
    # Pydantic's lax mode reads false as 0 and "5" as 5; the document says number/integer.
    if isinstance(v, bool | str | bytes):
        raise ValueError("must be a JSON number, not a string or true/false")
    return v


# A number in a body: JSON's number, never true/false or a string that looks like one.
Number = Annotated[float, BeforeValidator(_json_number)]
Count = Annotated[int, BeforeValidator(_json_number)]
