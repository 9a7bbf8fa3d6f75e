"""The customer token and the subjects built with it (no servers)."""

from __future__ import annotations

import hashlib

from gateway.events import encode_events
from gateway.idempotency import customers_of
from shared.bus import STREAMS
from shared.contracts.bus import (
    ContactRecorded,
    DeliveryReported,
    DispatchRequested,
    ProfileErased,
    ProviderReceipt,
    ResponseReceived,
    ResponseRecorded,
    TimerFailed,
)
from shared.contracts.events import EventIn
from shared.privacy import (
    CUSTOMER_SUBJECTS,
    any_customer,
    customer_subject,
    customer_token,
    event_subject,
    events_of_type,
    purge_subjects,
    with_token,
)


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def test_the_token_is_sha256_of_the_id_and_never_a_wildcard() -> None:
    assert customer_token("c-1") == hashlib.sha256(b"c-1").hexdigest()[:16]
    assert customer_token(None) == customer_token("") == "_"
    for cid in ("a.b", "*", ">", "x y", "ünï", "c:1"):
        t = customer_token(cid)
        assert len(t) == 16 and all(ch in "0123456789abcdef" for ch in t)
    assert customer_token("c-1") != customer_token("c-2")


def test_contract_subjects_end_with_the_token_and_keep_their_type() -> None:
    cid = "c-42"
    t = customer_token(cid)
    cases = [
        (
            ContactRecorded(tracking_id="t", customer_id=cid, campaign_id="k"),
            f"contact.recorded.{t}",
            "contact.recorded",
        ),
        (
            DispatchRequested(
                tracking_id="t",
                idempotency_key="i",
                customer_id=cid,
                campaign_id="k",
                channel="sms",
            ),
            f"dispatch.requested.sms.{t}",
            "dispatch.requested.sms",
        ),
        (
            DispatchRequested(
                tracking_id="t",
                idempotency_key="i",
                customer_id=cid,
                campaign_id="k",
                channel="push",
                lane="batch",
            ),
            f"dispatch.requested.push.batch.{t}",
            "dispatch.requested.push",
        ),
        (
            DeliveryReported(tracking_id="t", customer_id=cid, channel="sms", status="sent"),
            f"delivery.sent.{t}",
            "delivery.sent",
        ),
        (
            ResponseRecorded(
                tracking_id="t", customer_id=cid, campaign_id="k", outcome="clicked", time="x"
            ),
            f"response.recorded.{t}",
            "response.recorded",
        ),
        (ProfileErased(customer_id=cid), f"profile.erased.{t}", "profile.erased"),
        (ResponseReceived(tracking_id="t", outcome="clicked"), "response.received._", None),
    ]
    for msg, subject, type_ in cases:
        got, ev = msg.to_event(source="test")
        assert got == subject
        assert ev.type == (type_ or msg.TYPE)
    # A receipt names no customer: its subject has no token.
    receipt = ProviderReceipt(tracking_id="t", channel="sms", status="delivered")
    assert receipt.to_event(source="test")[0] == "dispatch.receipt.sms"
    # Dead letters keep the DLQ's naming; erasure finds them by content.
    failed = TimerFailed(
        timer_id="t", kind="send", due="x", customer_id=cid, campaign_id="k", attempts=5
    )
    assert failed.to_event(source="test")[0] == "dlq.decision-timers"


def test_consumer_filters_see_every_customer_and_the_lanes_stay_apart() -> None:
    t = customer_token("c")
    realtime, batch = (
        any_customer("dispatch.requested.*"),
        any_customer("dispatch.requested.*.batch"),
    )
    assert _matches(realtime, f"dispatch.requested.sms.{t}")
    assert not _matches(realtime, f"dispatch.requested.sms.batch.{t}")
    assert _matches(batch, f"dispatch.requested.sms.batch.{t}")
    assert not _matches(batch, f"dispatch.requested.sms.{t}")
    assert _matches(any_customer("contact.recorded"), customer_subject("contact.recorded", "c"))
    assert _matches(any_customer("response.received"), "response.received._")


def test_events_carry_the_token_of_their_customer_or_anonymous_profile() -> None:
    assert event_subject("app.opened", "c-1", "a-1") == f"events.{customer_token('c-1')}.app.opened"
    # Anonymous history belongs to the profile ``anon:<id>`` (erasure lists it among the ids).
    assert event_subject("page.viewed", None, "a-1") == (
        f"events.{customer_token('anon:a-1')}.page.viewed"
    )
    assert _matches(events_of_type("app.opened"), event_subject("app.opened", "c-1", None))
    assert _matches("events.>", event_subject("x", None, None))
    ev = EventIn.model_validate({"type": "topup", "customer_id": "c-9"})
    ((subject, _, _),) = encode_events([ev], "p")
    assert subject == f"events.{customer_token('c-9')}.topup"


def test_purge_filters_cover_every_customer_subject_and_only_that_customer() -> None:
    t, other = customer_token("c-1"), customer_token("c-2")
    filters = purge_subjects(t)
    assert {s for s, _ in filters} <= set(STREAMS)
    assert len(filters) == len(CUSTOMER_SUBJECTS)
    mine = [
        event_subject("app.opened", "c-1", None),
        customer_subject("contact.recorded", "c-1"),
        customer_subject("dispatch.requested.sms", "c-1"),
        customer_subject("dispatch.requested.sms.batch", "c-1"),
        customer_subject("delivery.token_invalid", "c-1"),
        customer_subject("response.received", "c-1"),
        customer_subject("response.recorded", "c-1"),
        customer_subject("profile.changed", "c-1"),
        customer_subject("profile.erased", "c-1"),
    ]
    for subject in mine:
        assert any(_matches(f, subject) for _, f in filters), subject
        assert not any(_matches(f, subject.replace(t, other)) for _, f in filters), subject
    assert not any(_matches(f, "dispatch.receipt.sms") for _, f in filters)


def test_idempotent_answers_are_indexed_by_the_customers_they_name() -> None:
    assert customers_of("/v1/customers/c-1", b'{"customer_id":"c-1","version":2}') == {"c-1"}
    assert customers_of("/v1/customers/c%3A1/devices", b"{}") == {"c:1"}
    assert customers_of("/v1/decisions", b'{"decision_id":"d","customer_id":"c-3"}') == {"c-3"}
    assert customers_of("/v1/events", b'{"accepted":1,"ids":["e"]}') == set()
    assert customers_of("/v1/decisions", b"not json") == set()


def test_subjects_stored_without_a_token_get_it() -> None:
    t = customer_token("c-1")
    assert with_token("dispatch.requested.sms", "c-1") == f"dispatch.requested.sms.{t}"
    assert with_token("contact.recorded", "c-1") == f"contact.recorded.{t}"
    assert with_token(f"contact.recorded.{t}", "c-1") == f"contact.recorded.{t}"
    assert with_token("response.received._", None) == "response.received._"


def test_erasure_waits_only_for_consumers_that_may_read_a_customer() -> None:
    from services.profile.erasure import _overlap

    assert not _overlap("dispatch.receipt.>", "dispatch.requested.*.*")
    assert _overlap("delivery.>", "delivery.*.*")
    assert _overlap("events.>", "events.*.>")
    assert _overlap("dispatch.requested.*.*", "dispatch.requested.*.*")
    assert not _overlap("dispatch.requested.*.*", "dispatch.requested.*.batch.*")
    assert _overlap("dispatch.requested.*.batch.*", "dispatch.requested.*.batch.*")
    assert _overlap("profile.erased.*", "profile.*.*")
    assert not _overlap("segment.>", "profile.*.*")
