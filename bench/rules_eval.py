"""In-process evaluator throughput: compiled rules of 3, 10 and 30 clauses on projections."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

from shared import counters, demo, rules


def _profiles(n: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        c = demo.customer(i, rng, tags_min=50, tags_max=1500)
        b = counters.empty()
        for _ in range(rng.randint(0, 8)):
            counters.add(b, now.replace(microsecond=0), now)
        out.append({**c, "counters": {"topup": {**b, "total": 5}}, "last": {}})
    return out


def rule_of(n_clauses: int) -> dict[str, Any]:
    """A rule mixing tags, ranges, in, not and event counts, of about ``n_clauses`` leaves."""
    pool: list[dict[str, Any]] = [
        {"tag": "value:gold"},
        {"attr": "age", "op": "between", "value": [18, 60]},
        {"attr": "region", "op": "in", "value": ["north", "east", "capital"]},
        {"not": {"tag": "churn:risk"}},
        {"event": "topup", "count": {"gte": 1}, "within": "30d"},
        {"attr": "arpu", "op": "gte", "value": 10},
        {"consent": "push"},
        {"any": [{"tag": "interest:travel"}, {"tag": "interest:music"}]},
        {"attr": "plan", "op": "ne", "value": "business"},
        {"tag": "seg:00042"},
    ]
    leaves = [pool[i % len(pool)] for i in range(n_clauses)]
    return {
        "any": [{"all": leaves[: n_clauses // 2 or 1]}, {"all": leaves[n_clauses // 2 :] or leaves}]
    }


def measure(seconds: float = 2.0) -> dict[str, Any]:
    profiles = _profiles(2000)
    now = datetime.now(UTC)
    out: dict[str, Any] = {}
    for n in (3, 10, 30):
        node = rules.parse(rule_of(n))
        pred = rules.compile_rule(node)
        subjects = [rules.Subject(p, now=now) for p in profiles]
        done, hits = 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for s in subjects:
                s._windows = None  # each evaluation starts from the raw projection
                hits += pred(s)
            done += len(subjects)
        rate = done / (time.perf_counter() - t0)
        out[f"{rules.count_clauses(node)}_clauses_evals_per_s"] = round(rate)
        out[f"{rules.count_clauses(node)}_clauses_match_share"] = round(hits / done, 3)
    return out
