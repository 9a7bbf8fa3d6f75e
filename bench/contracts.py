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

from services.decision.engine import Live
from services.decision.outbound import Item, Planner, tracking_id


def _items(n: int) -> list[Item]:
    body = {"priority": 60, "conversion": {"event": "pack.bought", "within": "3d"}}
    live = Live("cmp-1", body, None, None, [], [{"id": "A", "offer": "off-1"}], None, None)
    offer = {
        "value": 2.5,
        "link": "https://example.com/x",
        "reward": {"type": "points", "amount": 100},
        "valid_to": "2030-01-01T00:00:00Z",
    }
    doc = {
        "customer_id": "c",
        "identities": {"email": "a@example.com"},
        "locale": "en",
        "devices": [{"platform": "ios", "token": "ab" * 32, "app_id": "app"}],
    }
    items = []
    for i in range(n):
        it = Item(f"c{i}", doc, live, tracking_id("run-1", f"c{i}"), origin={"run_id": "run-1"})
        it.treatment, it.offer = {"id": "A", "offer": "off-1"}, offer
        items.append(it)
    return items


def build(items: list[Item], *, serialise: bool) -> float:
    """CPU seconds to build (and serialise) a request and a contact per item."""
    planner = Planner(None)  # type: ignore[arg-type]  # building messages needs no engine
    now = datetime.now(UTC)
    content = {"title": "Hello", "body": "World"}
    t0 = time.process_time()
    for it in items:
        _, req = planner._dispatch(it, "push", content, now)
        _, contact = planner._contact(it, "push", now)
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
