"""Building outbound messages through the bus contracts: one ``dispatch.requested.<channel>``
and its ``contact.recorded`` per customer, as a batch run page does, built and serialised.

``python -m bench.contracts [pairs]`` prints the median CPU time of five rounds (CPU time, so
that other work on the machine weighs less than with the wall clock).
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import UTC, datetime

from services.decision import messages
from services.decision.outbound import tracking_id
from services.decision.pipeline.model import Campaign, Offer, Treatment
from shared.contracts.bus import Conversion, Reward

CAMPAIGN = Campaign("cmp-1", priority=60, conversion=Conversion(event="pack.bought", within="3d"))
TREATMENT = Treatment("A", "off-1")
OFFER = Offer(
    "off-1",
    value=2.5,
    link="https://example.com/x",
    reward=Reward(type="points", amount=100),
    valid_to=datetime(2030, 1, 1, tzinfo=UTC),
)
DOC = {
    "customer_id": "c",
    "identities": {"email": "a@example.com"},
    "locale": "en",
    "devices": [{"platform": "ios", "token": "ab" * 32, "app_id": "app"}],
}


def _items(n: int) -> list[tuple[str, str]]:
    """(customer, tracking id) of n contacts of one batch run."""
    return [(f"c{i}", tracking_id("run-1", f"c{i}")) for i in range(n)]


def build(items: list[tuple[str, str]], *, serialise: bool) -> float:
    """CPU seconds to build (and serialise) a request and a contact per item."""
    now = datetime.now(UTC)
    content = {"title": "Hello", "body": "World"}
    origin = {"run_id": "run-1"}
    common = {"campaign": CAMPAIGN, "treatment": TREATMENT, "offer": OFFER, "at": now}
    t0 = time.process_time()
    for cid, tracking in items:
        _, req = messages.dispatch_requested(
            tracking_id=tracking,
            customer_id=cid,
            doc=DOC,
            channel="push",
            content=content,
            origin=origin,
            **common,  # type: ignore[arg-type]
        )
        _, contact = messages.contact_recorded(
            tracking_id=tracking,
            customer_id=cid,
            channel="push",
            origin=origin,
            envelope_id="contact-" + tracking,
            **common,  # type: ignore[arg-type]
        )
        if serialise:
            req.to_bytes()
            contact.to_bytes()
    return time.process_time() - t0


def main(n: int = 100_000) -> dict[str, float]:
    items = _items(n)
    out = {}
    for serialise in (False, True):
        label = "build_and_serialise" if serialise else "build"
        s = statistics.median(build(items, serialise=serialise) for _ in range(5))
        out[f"{label}_s"] = round(s, 3)
        out[f"{label}_pairs_per_s"] = round(n / s)
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for k, v in main(n).items():
        print(f"{k}: {v}")  # noqa: T201
