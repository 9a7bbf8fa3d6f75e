"""A realistic generated telecom population and its event stream (``kairos demo generate``)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

REGIONS = ["north", "south", "east", "west", "central", "capital"]
PLANS = [("prepaid", 0.55), ("postpaid", 0.35), ("business", 0.10)]
TIERS = ["bronze", "silver", "gold", "platinum"]
COUNTRIES = ["FR", "ES", "IT", "AT", "PL", "NL", "US", "TR", "GR", "PT"]
INTERESTS = ["travel", "music", "sports", "gaming", "news", "video", "finance", "food", "fashion"]
BASE_EVENTS = [
    "app.opened",
    "app.closed",
    "topup",
    "roaming.started",
    "roaming.ended",
    "balance.low",
    "call.dropped",
    "data.exhausted",
    "data.pack_bought",
    "roaming.pack_bought",
    "bill.paid",
    "bill.overdue",
    "plan.changed",
    "order.placed",
    "cart.abandoned",
    "store.visited",
    "survey.answered",
    "sim.swapped",
    "device.upgraded",
    "contract.renewal_due",
]
EVENT_TYPES = BASE_EVENTS + [
    f"app.screen.{s}"
    for s in (
        "home",
        "offers",
        "bill",
        "usage",
        "roaming",
        "support",
        "profile",
        "shop",
        "settings",
        "rewards",
        "family",
        "tv",
        "music",
        "games",
        "news",
        "wallet",
        "insurance",
        "devices",
        "coverage",
        "speedtest",
        "chat",
        "faq",
        "stores",
        "contracts",
        "payments",
        "topup",
        "data",
        "calls",
        "sms",
        "voicemail",
        "esim",
        "5g",
        "fiber",
        "tvguide",
        "sports",
        "kids",
        "security",
        "backup",
        "cloud",
        "travel",
        "partners",
        "lottery",
        "quiz",
        "feedback",
        "referral",
        "loyalty",
        "events",
        "tickets",
        "maps",
        "weather",
        "health",
        "energy",
        "banking",
        "crypto",
        "streaming",
        "podcasts",
        "radio",
        "ebooks",
        "learning",
        "jobs",
        "dating",
        "food",
        "taxi",
        "parking",
        "charging",
        "tolls",
        "fuel",
        "hotels",
        "flights",
        "trains",
        "buses",
        "ferries",
        "cars",
        "bikes",
        "scooters",
        "rentals",
        "insights",
    )
]


def _tags(
    rng: random.Random, n: int, tier: str, plan: str, region: str, vocab: int = 40_000
) -> list[str]:
    tags = {f"value:{tier}", f"plan:{plan}", f"region:{region}"}
    tags.add(f"device:{rng.choice(['ios', 'android', 'feature'])}")
    for i in rng.sample(INTERESTS, k=rng.randint(1, 4)):
        tags.add(f"interest:{i}")
    if rng.random() < 0.1:
        tags.add("churn:risk")
    while len(tags) < n:  # a vocabulary of behavioural segment tags (40,000 by default)
        tags.add(f"seg:{rng.randrange(vocab):05d}")
    return sorted(tags)


def customer(
    i: int, rng: random.Random, *, tags_min: int = 50, tags_max: int = 1500, vocab: int = 40_000
) -> dict[str, Any]:
    """One generated customer as an import line."""
    plan = rng.choices([p for p, _ in PLANS], weights=[w for _, w in PLANS])[0]
    arpu = round(rng.lognormvariate(3.1, 0.6), 2)
    tier = TIERS[min(3, int(arpu // 25))]
    region = rng.choice(REGIONS)
    cid = f"c-{i:07d}"
    return {
        "customer_id": cid,
        "attributes": {
            "age": rng.randint(16, 85),
            "region": region,
            "plan": plan,
            "arpu": arpu,
            "value_tier": tier,
            "tenure_months": rng.randint(0, 240),
            "data_gb_month": round(rng.expovariate(1 / 8), 1),
            "first_name": rng.choice(
                ["Ana", "Ben", "Chen", "Dana", "Emre", "Fatma", "Jonas", "Lea"]
            ),
            "contract_end": (datetime(2026, 1, 1) + timedelta(days=rng.randint(0, 900)))
            .date()
            .isoformat(),
        },
        "tags": _tags(
            rng, rng.randint(tags_min, max(tags_min, tags_max)), tier, plan, region, vocab
        ),
        "consents": {
            "push": rng.random() < 0.7,
            "email": rng.random() < 0.5,
            "sms": rng.random() < 0.6,
            "inapp": True,
        },
        "identities": {"email": f"{cid}@example.com", "msisdn": f"+4915{i:09d}"},
        "timezone": "Europe/Berlin",
        "locale": rng.choice(["de-DE", "en-GB", "tr-TR"]),
    }


def write_customers(
    path: Path,
    n: int,
    *,
    seed: int = 7,
    tags_min: int = 50,
    tags_max: int = 1500,
    vocab: int = 40_000,
) -> int:
    rng = random.Random(seed)
    with path.open("wb") as fh:
        for i in range(n):
            doc = customer(i, rng, tags_min=tags_min, tags_max=tags_max, vocab=vocab)
            fh.write(orjson.dumps(doc) + b"\n")
    return n


def event(rng: random.Random, n_customers: int, now: datetime) -> dict[str, Any]:
    """One generated behavioural event within the last 30 days."""
    etype = rng.choice(EVENT_TYPES)
    props: dict[str, Any] = {}
    if etype.startswith("roaming"):
        props["country"] = rng.choice(COUNTRIES)
    elif etype == "topup":
        props["amount"] = rng.choice([5, 10, 15, 20, 30, 50])
    elif etype == "balance.low":
        props["balance"] = round(rng.uniform(0, 2), 2)
    return {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "type": etype,
        "customer_id": f"c-{rng.randrange(n_customers):07d}",
        "time": (now - timedelta(seconds=rng.randint(0, 30 * 86400))).isoformat(),
        "properties": props,
    }


def write_events(path: Path, n_customers: int, per_customer: int, *, seed: int = 7) -> int:
    rng = random.Random(seed + 1)
    now = datetime.now(UTC)
    total = n_customers * per_customer
    with path.open("wb") as fh:
        for _ in range(total):
            fh.write(orjson.dumps(event(rng, n_customers, now)) + b"\n")
    return total
