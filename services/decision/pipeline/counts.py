"""Run counts, ``explain`` entries and metrics, all read off the same :class:`Outcome`: a
reason counted by a run is the reason a trigger's metric shows and a decision explains."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from prometheus_client import Counter

from services.decision.pipeline.steps import Outcome
from shared.contracts import catalog as api

Flow = Literal["decision", "trigger", "timer", "run", "simulate"]
SUPPRESSED = ("consent", "policy", "reentry", "unreachable")
OUTCOMES = Counter(
    "kairos_decision_outcomes_total",
    "What became of each (customer, campaign) considered, by flow, status and reason",
    ["flow", "status", "reason"],
)


_CHILDREN: dict[tuple[str, str, str], Any] = {}


def observe(flow: Flow, out: Outcome) -> None:
    """Count one outcome in the metrics (the labelled child looked up once per label set:
    a touchpoint decision observes one outcome per campaign considered)."""
    key = (flow, out.status, out.reason)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = OUTCOMES.labels(*key)
    child.inc()


def observe_many(flow: Flow, outs: Iterable[Outcome]) -> None:
    """Count many outcomes, one increment per distinct (status, reason)."""
    seen: dict[tuple[str, str], int] = {}
    for o in outs:
        seen[(o.status, o.reason)] = seen.get((o.status, o.reason), 0) + 1
    for (status, reason), n in seen.items():
        key = (flow, status, reason)
        child = _CHILDREN.get(key)
        if child is None:
            child = _CHILDREN[key] = OUTCOMES.labels(*key)
        child.inc(n)


def empty() -> dict[str, Any]:
    """A counts document (what a run checkpoints) with nothing counted yet."""
    return {
        "control": 0,
        "dispatched": 0,
        "deferred": 0,
        "suppressed": dict.fromkeys(SUPPRESSED, 0),
        "ineligible": {},
        "by_channel": {},
        "by_treatment": {},
        "processed": 0,
        "failures": 0,
    }


def tally(counts: dict[str, Any], out: Outcome) -> None:
    """Count one outcome into a counts document."""
    counts["processed"] += 1
    if out.status == "control":
        counts["control"] += 1
        return
    if out.status in ("suppressed", "ineligible"):
        bucket = counts[out.status]
        bucket[out.reason] = bucket.get(out.reason, 0) + 1
        return
    counts["dispatched" if out.status == "dispatched" else "deferred"] += 1
    if out.channel:
        counts["by_channel"][out.channel] = counts["by_channel"].get(out.channel, 0) + 1
    if out.treatment:
        counts["by_treatment"][out.treatment] = counts["by_treatment"].get(out.treatment, 0) + 1


def fields(c: dict[str, Any]) -> dict[str, Any]:
    """The ``RunCounts`` fields (but ``selected``) of a counts document."""
    return {
        "processed": c.get("processed", 0),
        "control": c.get("control", 0),
        "suppressed": c.get("suppressed", {}),
        "ineligible": c.get("ineligible", {}),
        "dispatched": c.get("dispatched", 0),
        "deferred": c.get("deferred", 0),
        "by_channel": c.get("by_channel", {}),
        "by_treatment": c.get("by_treatment", {}),
    }


def considered(campaign_id: str, out: Outcome, score: float | None = None) -> api.Considered:
    """One ``explain`` entry of a touchpoint decision."""
    status = "offered" if out.status in ("offered", "dispatched") else out.status
    return api.Considered(
        campaign_id=campaign_id,
        outcome=status,  # type: ignore[arg-type]  # deferred never happens at a touchpoint
        reason=out.label or out.reason,
        score=None if score is None else round(score, 4),
    )
