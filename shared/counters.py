"""Rolling behaviour counters in time buckets (pure functions, no I/O).

Buckets: 10-minute slots for the last 25 hours (``m``) and UTC days for the last
90 days (``d``). Windows: ``1h`` and ``1d`` sum the 10-minute slots that start
within the window (so a window is exact to 10 minutes), ``7d``/``30d``/``90d`` sum
the day buckets of the last N calendar days including today. Events older than
90 days count in ``total`` only. Out-of-order events land in their own bucket.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

SLOT_S = 600
DAY_S = 86_400
KEEP_SLOTS_S = 25 * 3600
KEEP_DAYS = 90
WINDOWS = ("1h", "1d", "7d", "30d", "90d")
_SLOT_WINDOWS = {"1h": 3600, "1d": DAY_S}
_DAY_WINDOWS = {"7d": 7, "30d": 30, "90d": 90}


def empty() -> dict[str, Any]:
    return {"m": {}, "d": {}}


def add(buckets: dict[str, Any], ts: datetime, now: datetime, n: int = 1) -> None:
    """Count ``n`` events at ``ts`` into the buckets (in place), pruning expired ones."""
    t = int(ts.timestamp())
    now_s = int(now.timestamp())
    slots: dict[str, int] = buckets.setdefault("m", {})
    days: dict[str, int] = buckets.setdefault("d", {})
    if t >= now_s - KEEP_SLOTS_S:
        key = str(t // SLOT_S)
        slots[key] = slots.get(key, 0) + n
    if t // DAY_S > now_s // DAY_S - KEEP_DAYS:
        key = str(t // DAY_S)
        days[key] = days.get(key, 0) + n
    prune(buckets, now)


def prune(buckets: dict[str, Any], now: datetime) -> None:
    """Drop buckets that no window can see any more."""
    now_s = int(now.timestamp())
    min_slot = (now_s - KEEP_SLOTS_S) // SLOT_S
    min_day = now_s // DAY_S - KEEP_DAYS
    for k in [k for k in buckets.get("m", {}) if int(k) < min_slot]:
        del buckets["m"][k]
    for k in [k for k in buckets.get("d", {}) if int(k) <= min_day]:
        del buckets["d"][k]


def merge(into: dict[str, Any], other: dict[str, Any], now: datetime) -> None:
    """Add another profile's buckets (a merge: counters add up)."""
    for part in ("m", "d"):
        target = into.setdefault(part, {})
        for k, v in other.get(part, {}).items():
            target[k] = target.get(k, 0) + int(v)
    prune(into, now)


def windows(buckets: dict[str, Any], now: datetime) -> dict[str, int]:
    """Counts per window (``1h``, ``1d``, ``7d``, ``30d``, ``90d``) at ``now``."""
    now_s = int(now.timestamp())
    out: dict[str, int] = {}
    slots = buckets.get("m", {})
    for name, span in _SLOT_WINDOWS.items():
        first = (now_s - span) // SLOT_S + 1
        out[name] = sum(v for k, v in slots.items() if int(k) >= first)
    days = buckets.get("d", {})
    today = now_s // DAY_S
    for name, n in _DAY_WINDOWS.items():
        out[name] = sum(v for k, v in days.items() if int(k) > today - n)
    return out


def last_values(props: Mapping[str, Any]) -> dict[str, Any]:
    """What an event leaves as its type's last values: scalars (and short lists); nested
    objects are not rule material."""
    return {k: v for k, v in props.items() if not isinstance(v, dict)}


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def fold_event(
    doc: Mapping[str, Any],
    etype: str,
    at: datetime,
    properties: Mapping[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """A projection document (``counters`` and ``last`` as the profile projects them) with
    one more event of ``etype`` at ``at`` applied, as the profile applies it: total, buckets,
    first and last seen, last values. Returns a new document; ``doc`` is not changed (only
    the event type's entries are copied)."""
    ctrs = dict(doc.get("counters") or {})
    lasts = dict(doc.get("last") or {})
    old = ctrs.get(etype)
    stamp = at.isoformat()
    if old is None:
        c: dict[str, Any] = {"m": {}, "d": {}, "total": 0, "first": stamp, "last": stamp}
    else:
        c = {**old, "m": dict(old.get("m") or {}), "d": dict(old.get("d") or {})}
    c["total"] = int(c.get("total", 0)) + 1
    add(c, at, now)
    seen_last, seen_first = c.get("last"), c.get("first")
    if old is None or seen_last is None or at >= _at(str(seen_last)):
        values = {**(lasts.get(etype) or {}), **last_values(properties)}
        if values:  # the projection leaves out types without last values
            lasts[etype] = values
        c["last"] = stamp
    if old is not None and (seen_first is None or at < _at(str(seen_first))):
        c["first"] = stamp
    ctrs[etype] = c
    return {**doc, "counters": ctrs, "last": lasts}
