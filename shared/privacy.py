"""Right to erasure, in one place: the pseudonym every service puts in place of an erased
customer id, and the customer token every subject carrying personal data ends with.

Every message that holds personal data is published on a subject that carries the
customer's token (``sha256(customer id)[:16]``; ``_`` when no customer is known): as the last
token for the contract subjects (``contact.recorded.<t>``, ``dispatch.requested.<channel>
[.batch].<t>``, ``delivery.<status>.<t>``, ``response.<kind>.<t>``, ``profile.<kind>.<t>``)
and right after ``events`` for raw events (``events.<t>.<type>``, so ``events.>`` and
``events.<t>.>`` both read them). Erasure then removes a customer's messages from every
stream with one purge by subject per stream (:data:`CUSTOMER_SUBJECTS`), with no scan.
Subjects are built only here: publishers call :func:`customer_subject` /
:func:`event_subject`, consumers filter with :func:`any_customer`.
"""

from __future__ import annotations

import hashlib
import hmac

NO_CUSTOMER = "_"
ANON_PREFIX = "anon:"  # the profile id of an anonymous id's history
TOKEN_LEN = 16
_HEX = frozenset("0123456789abcdef")

# (stream, subject pattern with ``{t}`` for the token): every place a customer's messages are
# kept on the bus. ``profile.erased.<t>`` is among them: erasure purges PROFILE only below the
# erasure's own sequence at first, and the rest once every service has acted on it.
CUSTOMER_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("EVENTS", "events.{t}.>"),
    ("PROFILE", "profile.*.{t}"),
    ("CONTACT", "contact.*.{t}"),
    ("DISPATCH", "dispatch.requested.*.{t}"),
    ("DISPATCH", "dispatch.requested.*.batch.{t}"),
    ("DELIVERY", "delivery.*.{t}"),
    ("RESPONSE", "response.*.{t}"),
)


def pseudonym(secret: str, customer_id: str) -> str:
    """An irreversible, keyed stand-in for an erased customer's id: stable (the same customer
    gets the same pseudonym in every service, so counts and joins still add up) and not
    reversible by hashing guessed ids without the secret."""
    mac = hmac.new(secret.encode(), customer_id.encode(), hashlib.sha256).hexdigest()
    return "erased:" + mac[:32]


def customer_token(customer_id: str | None) -> str:
    """The subject token of a customer: 16 hex digits of sha256 of the id (never a NATS
    wildcard or separator, whatever the id holds), ``_`` when there is no customer."""
    if not customer_id:
        return NO_CUSTOMER
    return hashlib.sha256(customer_id.encode()).hexdigest()[:TOKEN_LEN]


def customer_subject(base: str, customer_id: str | None) -> str:
    """``<base>.<token>``: the subject of a contract message about this customer."""
    return f"{base}.{customer_token(customer_id)}"


def event_subject(event_type: str, customer_id: str | None, anonymous_id: str | None) -> str:
    """``events.<token>.<type>``: a raw event, under its customer or else under the anonymous
    profile its anonymous id makes (``anon:<id>``, which erasure names among the folded ids)."""
    owner = customer_id or (ANON_PREFIX + anonymous_id if anonymous_id else None)
    return f"events.{customer_token(owner)}.{event_type}"


def with_token(subject: str, customer_id: str | None) -> str:
    """A contract subject stored before subjects carried the token (a timer's records from an
    older version): the same subject with the token, so today's consumers read it."""
    last = subject.rsplit(".", 1)[-1]
    if last == NO_CUSTOMER or (len(last) == TOKEN_LEN and all(c in _HEX for c in last)):
        return subject
    return customer_subject(subject, customer_id)


def events_of_type(event_type: str) -> str:
    """The filter for every customer's raw events of one type."""
    return f"events.*.{event_type}"


def any_customer(base: str) -> str:
    """The consumer filter for ``<base>`` messages of every customer (``<base>.*``)."""
    return f"{base}.*"


def purge_subjects(token: str) -> list[tuple[str, str]]:
    """(stream, subject filter) to purge for one customer token."""
    return [(stream, pattern.format(t=token)) for stream, pattern in CUSTOMER_SUBJECTS]
