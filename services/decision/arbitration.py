"""Arbitration (pure functions): control groups, treatments, and the ranking score.

score = priority weight × propensity × offer value × tier fit, where
- priority weight = campaign priority / 100 (0..1),
- propensity is a Thompson sample from Beta(1 + successes, 1 + failures) of the
  (offer, treatment) pair, so new offers (few observations, wide posteriors) get tried,
- offer value is the offer's ``value`` (≥ 0),
- tier fit is 1.2 when the treatment was chosen by a matching ``tier`` rule, else 1.0.
With probability ``explore`` (KAIROS_DECISION_EXPLORE, default 0.05) the candidates are
ranked at random instead, to keep unbiased learning data.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

TIER_FIT = 1.2
T = TypeVar("T")


def unit(*parts: str) -> float:
    """A stable number in [0, 1) for the parts: the same on every replica and every call."""
    digest = hashlib.blake2b(":".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_control(customer_id: str, campaign_id: str, share: float) -> bool:
    return share > 0 and unit("control", campaign_id, customer_id) < share


def in_global_control(customer_id: str, share: float) -> bool:
    return share > 0 and unit("global-control", customer_id) < share


def _weight(t: Any) -> float:
    return float(t["weight"] if isinstance(t, Mapping) else t.weight)


def by_weight(customer_id: str, campaign_id: str, treatments: Sequence[T]) -> T:
    """Split customers over treatments (anything with a ``weight``) by weight, stably."""
    total = sum(_weight(t) for t in treatments)
    x = unit("treatment", campaign_id, customer_id) * total
    for t in treatments:
        x -= _weight(t)
        if x < 0:
            return t
    return treatments[-1]


def propensity(successes: float, failures: float, rng: random.Random) -> float:
    return rng.betavariate(1.0 + max(0.0, successes), 1.0 + max(0.0, failures))


def score(priority: int, prop: float, value: float, tier_fit: bool) -> float:
    return (priority / 100.0) * prop * max(value, 0.0) * (TIER_FIT if tier_fit else 1.0)
