"""Batch runs, cron ticks and simulations.

A run (``POST /v1/campaigns/{id}/runs`` or a ``schedule.cron`` tick) is a row in
``decision.run``. Any replica's walker claims a running run whose lease has lapsed, asks
selection to freeze the campaign's audience (``POST /v1/snapshots``), and walks the
snapshot in pages: tiers and treatments, control, consent, reachability and the contact
ledger for the whole page at once, then the ``dispatch.requested`` and
``contact.recorded`` events (acknowledged by JetStream), then one checkpoint (position and
counts) that also renews the lease. A walker that dies loses its lease and another replica
resumes at the checkpoint; the page it was in is planned again with the same tracking ids
(``run id : customer``), so the ledger answers what it reserved the first time and every
event keeps its id: nobody is contacted twice. Cancelling flips the status; the walker
stops at its next checkpoint.

Cron ticks are computed in the schedule's time zone by every replica; the run row is
unique per (campaign, tick), so however many replicas see the tick, it runs once.

Simulation walks the same way without reserving, recording or sending: over a fresh
snapshot for a batch campaign, over the last day of its trigger events (replayed from the
EVENTS stream) for a triggered one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import sqlalchemy as sa
from croniter import croniter
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.decision.engine import Engine, Live, compile_one
from services.decision.outbound import Item, Outcome, Planner, tracking_id
from services.decision.triggers import deferred_timer, insert_timers
from shared import rules
from shared.bus import Bus
from shared.contracts import catalog as api
from shared.db import Database
from shared.errors import Conflict, NotFound, Unavailable
from shared.events import CloudEvent, iso
from shared.paging import encode_cursor
from shared.privacy import events_of_type
from shared.redis import read_projections

log = logging.getLogger("kairos.decision.runs")
PAGE = 5_000
LEASE_S = 30
MAX_FAILURES = 5
CRON_GRACE_S = 120
REPLAY_LIMIT = 100_000
SUPPRESSED = ("consent", "policy", "reentry", "unreachable")


def empty_counts() -> dict[str, Any]:
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


def _counted(c: dict[str, Any]) -> dict[str, Any]:
    """The RunCounts fields (but ``selected``) of a counts document."""
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


def _info(row: Any) -> api.RunInfo:
    return api.RunInfo(
        run_id=row["run_id"],
        campaign_id=row["campaign_id"],
        status=row["status"],
        trigger="cron" if row["tick"] else "manual",
        tick=row["tick"],
        snapshot_id=row["snapshot_id"],
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        started_by=row["created_by"],
        selected=row["selected"],
        **_counted(row["counts"]),
    )


class Runs:
    def __init__(
        self,
        engine: Engine,
        db: Database,
        bus: Bus,
        selection_url: str,
        owner: str,
        *,
        on_timers: Callable[[], None] = lambda: None,
        page: int = PAGE,
    ) -> None:
        self.engine = engine
        self.planner = Planner(engine)
        self.db = db
        self.bus = bus
        self.selection_url = selection_url
        self.owner = owner
        self.on_timers = on_timers
        self.wake = asyncio.Event()
        self.page = page

    # -- the API -------------------------------------------------------------------------
    async def _campaign(self, campaign_id: str) -> tuple[dict[str, Any], str]:
        async with self.db.sessions() as s:
            row = (
                await s.execute(
                    sa.text("SELECT body, state FROM decision.campaign WHERE campaign_id = :c"),
                    {"c": campaign_id},
                )
            ).first()
        if row is None:
            raise NotFound(f"Campaign '{campaign_id}' does not exist.")
        return row[0], row[1]

    async def start(
        self, campaign_id: str, principal: str | None, tick: datetime | None = None
    ) -> str | None:
        """Start a run now (None: a cron tick another replica already started)."""
        body, state = await self._campaign(campaign_id)
        if body.get("type") != "batch":
            raise Conflict(
                f"Campaign '{campaign_id}' is {body.get('type')}; only batch campaigns run "
                "over their audience (triggered ones fire on events)."
            )
        if state != "active":
            raise Conflict(f"Campaign '{campaign_id}' is {state}; activate it to run it.")
        run_id = "run-" + secrets.token_hex(8)
        async with self.db.transaction() as uow:
            s = uow.session
            if tick is None:
                busy = (
                    await s.execute(
                        sa.text(
                            "SELECT run_id FROM decision.run WHERE campaign_id = :c "
                            "AND status = 'running' AND NOT dry_run LIMIT 1"
                        ),
                        {"c": campaign_id},
                    )
                ).scalar()
                if busy:
                    raise Conflict(
                        f"Run '{busy}' of campaign '{campaign_id}' is still running; cancel it "
                        "or wait for it to finish."
                    )
            res = await s.execute(
                sa.text(
                    "INSERT INTO decision.run (run_id, campaign_id, status, tick, counts, "
                    "started_at, created_by) VALUES (:r, :c, 'running', :t, "
                    "CAST(:counts AS jsonb), now(), :by) ON CONFLICT (campaign_id, tick) "
                    "DO NOTHING"
                ),
                {
                    "r": run_id,
                    "c": campaign_id,
                    "t": tick,
                    "counts": _json(empty_counts()),
                    "by": principal,
                },
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                return None
        self.wake.set()
        return run_id

    async def get(self, campaign_id: str, run_id: str) -> api.RunInfo:
        async with self.db.sessions() as s:
            row = (
                (
                    await s.execute(
                        sa.text(
                            "SELECT * FROM decision.run WHERE run_id = :r AND campaign_id = :c"
                        ),
                        {"r": run_id, "c": campaign_id},
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"Run '{run_id}' of campaign '{campaign_id}' does not exist.")
        return _info(row)

    async def runs(self, campaign_id: str, limit: int) -> api.RunList:
        await self._campaign(campaign_id)
        async with self.db.sessions() as s:
            rows = (
                (
                    await s.execute(
                        sa.text(
                            "SELECT * FROM decision.run WHERE campaign_id = :c "
                            "ORDER BY started_at DESC LIMIT :n"
                        ),
                        {"c": campaign_id, "n": limit},
                    )
                )
                .mappings()
                .all()
            )
        return api.RunList(campaign_id=campaign_id, runs=[_info(r) for r in rows])

    async def cancel(self, campaign_id: str, run_id: str) -> api.RunInfo:
        async with self.db.transaction() as uow:
            res = await uow.session.execute(
                sa.text(
                    "UPDATE decision.run SET status = 'cancelled', finished_at = now() "
                    "WHERE run_id = :r AND campaign_id = :c AND status = 'running'"
                ),
                {"r": run_id, "c": campaign_id},
            )
            done = bool(res.rowcount)  # type: ignore[attr-defined]
        info = await self.get(campaign_id, run_id)
        if not done:
            raise Conflict(f"Run '{run_id}' is {info.status}; only a running run can be cancelled.")
        return info

    # -- the walker ----------------------------------------------------------------------
    async def work_forever(self) -> None:
        await self.engine.loaded.wait()
        while True:
            try:
                row = await self._claim()
            except Exception as exc:
                log.warning("runs: claim failed: %s", exc)
                row = None
            if row is None:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 2.0)
                continue
            try:
                await self.walk(row)
            except Exception as exc:
                log.exception("run %s failed", row["run_id"])
                await self._failed(row, exc)

    async def _claim(self) -> Any:
        async with self.db.transaction() as uow:
            return (
                (
                    await uow.session.execute(
                        sa.text(
                            "UPDATE decision.run SET owner = :me, lease_until = now() + "
                            "make_interval(secs => :lease) WHERE run_id = (SELECT run_id FROM "
                            "decision.run WHERE status = 'running' AND (lease_until IS NULL OR "
                            "lease_until < now()) ORDER BY started_at LIMIT 1 FOR UPDATE SKIP "
                            "LOCKED) RETURNING *"
                        ),
                        {"me": self.owner, "lease": LEASE_S},
                    )
                )
                .mappings()
                .first()
            )

    async def _failed(self, row: Any, exc: Exception) -> None:
        counts = dict(row["counts"])
        counts["failures"] = counts.get("failures", 0) + 1
        final = counts["failures"] >= MAX_FAILURES
        async with self.db.transaction() as uow:
            await uow.session.execute(
                sa.text(
                    "UPDATE decision.run SET error = :e, counts = jsonb_set(counts, '{failures}', "
                    "to_jsonb(CAST(:f AS int))), status = CASE WHEN :final THEN 'failed' "
                    "ELSE status END, finished_at = CASE WHEN :final THEN now() END, "
                    "lease_until = now() + interval '5 seconds' "
                    "WHERE run_id = :r AND status = 'running'"
                ),
                {"e": str(exc)[:1000], "f": counts["failures"], "final": final, "r": row["run_id"]},
            )

    async def walk(self, row: Any) -> None:
        run_id, cid = row["run_id"], row["campaign_id"]
        body, state = await self._campaign(cid)
        if state != "active":
            await self._finish(run_id, "cancelled", f"campaign is {state}")
            return
        live = await compile_one(cid, body, self.selection_url)
        snapshot_id, selected = row["snapshot_id"], row["selected"]
        if snapshot_id is None:
            snapshot_id, selected = await self._snapshot(body)
            async with self.db.transaction() as uow:
                await uow.session.execute(
                    sa.text(
                        "UPDATE decision.run SET snapshot_id = :s, selected = :n "
                        "WHERE run_id = :r AND owner = :me"
                    ),
                    {"s": snapshot_id, "n": selected, "r": run_id, "me": self.owner},
                )
        position = int(row["position"])
        counts = dict(row["counts"])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            # A one-page pipeline: while JetStream stores page N's events (and selection
            # serves page N+1), page N+1 is planned; page N is checkpointed once acked.
            nxt: asyncio.Task[list[str]] | None = None
            inflight: tuple[int, dict[str, Any], list[Any]] | None = None
            while True:
                members = (
                    await nxt
                    if nxt is not None
                    else await self._page(http, snapshot_id, position)
                    if position < selected
                    else []
                )
                nxt = None
                if members and position + len(members) < selected:
                    nxt = asyncio.create_task(
                        self._page(http, snapshot_id, position + len(members))
                    )
                futures: list[Any] = []
                if members:
                    futures = await self._chunk(run_id, live, members, counts)
                    position += len(members)
                if inflight is not None:
                    at, snap, acks = inflight
                    await self.bus.acked(acks)
                    if not await self._checkpoint(run_id, at, snap):
                        log.info("run %s stopped at %d (cancelled or taken over)", run_id, at)
                        if nxt is not None:
                            nxt.cancel()
                        await self.bus.acked(futures)  # the page already under way went out:
                        await self._checkpoint(run_id, position, counts)  # count it too
                        return
                if not members:
                    break
                inflight = (position, orjson.loads(orjson.dumps(counts)), futures)
        await self._finish(run_id, "completed", None)

    async def _snapshot(self, body: dict[str, Any]) -> tuple[str, int]:
        rule = body.get("audience") or {"all": []}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
            http.post(f"{self.selection_url}/v1/snapshots", json={"rule": rule}) as resp,
        ):
            if resp.status == 503:
                raise Unavailable("selection is loading its audience index")
            resp.raise_for_status()
            doc = await resp.json()
        return str(doc["snapshot_id"]), int(doc["count"])

    async def _page(
        self, http: aiohttp.ClientSession, snapshot_id: str, position: int
    ) -> list[str]:
        params = {"limit": str(self.page)}
        if position:
            params["cursor"] = encode_cursor(position)
        async with http.get(
            f"{self.selection_url}/v1/snapshots/{snapshot_id}", params=params
        ) as resp:
            resp.raise_for_status()
            return list((await resp.json())["members"])

    async def _chunk(
        self, run_id: str, live: Live, members: Sequence[str], counts: dict[str, Any]
    ) -> list[Any]:
        """Plan one page and start publishing it; returns the ack futures."""
        outs = await self.plan(
            live, members, {"run_id": run_id}, lambda c: tracking_id(run_id, c), dry=False
        )
        records: list[tuple[str, CloudEvent]] = []
        timers = []
        for it, o in outs:
            tally(counts, o)
            if o.status == "deferred":
                timers.append(deferred_timer(it, o))
                if o.kind == "send":
                    continue
            records += o.records
        if timers:
            async with self.db.transaction() as uow:
                await insert_timers(uow.session, timers)
            self.on_timers()
        return await self.bus.publish_pending(records)

    async def plan(
        self,
        live: Live,
        members: Sequence[str],
        origin: dict[str, Any],
        tracking: Callable[[str], str],
        *,
        dry: bool,
        events: Sequence[dict[str, Any]] | None = None,
        audience_checked: bool = True,
    ) -> list[tuple[Item, Outcome]]:
        """Plan one page of customers for one campaign (the ledger is only read when dry)."""
        now = datetime.now(UTC)
        docs: list[Any] = []
        redis, keys = self.engine.redis, self.engine.keys
        for start in range(0, len(members), 1000):
            docs += await read_projections(redis, keys, list(members[start : start + 1000]))
        done: list[tuple[Item, Outcome]] = []
        todo: list[Item] = []
        for i, (cid, doc) in enumerate(zip(members, docs, strict=True)):
            event = events[i] if events is not None else None
            it = Item(
                cid,
                doc,
                live,
                tracking(cid),
                event=event,
                origin=origin,
                audience_checked=audience_checked,
            )
            if doc is None:
                done.append((it, Outcome("suppressed", "unknown", "no profile (erased?)")))
                continue
            out = self.planner.check(it, now)
            if out is None:
                out = self.planner.control(it, now)
            if out is not None:
                done.append((it, out))
                continue
            if live.where is not None and event is not None:
                if not live.where(rules.Subject(doc, event=event, now=now)):
                    done.append((it, Outcome("ineligible", "where", "trigger condition not met")))
                    continue
            todo.append(it)
        if todo:
            done += zip(todo, await self.planner.contact(todo, now, dry=dry), strict=True)
        return done

    async def _checkpoint(self, run_id: str, position: int, counts: dict[str, Any]) -> bool:
        """Save how far the run got (also when it was cancelled meanwhile: what went out is
        counted); False when it must stop (cancelled, or another replica took it over)."""
        async with self.db.transaction() as uow:
            status = (
                await uow.session.execute(
                    sa.text(
                        "UPDATE decision.run SET position = :p, counts = CAST(:counts AS jsonb), "
                        "lease_until = now() + make_interval(secs => :lease) "
                        "WHERE run_id = :r AND owner = :me AND status IN ('running', 'cancelled') "
                        "RETURNING status"
                    ),
                    {
                        "p": position,
                        "counts": _json(counts),
                        "lease": LEASE_S,
                        "r": run_id,
                        "me": self.owner,
                    },
                )
            ).scalar()
            return status == "running"

    async def _finish(self, run_id: str, status: str, error: str | None) -> None:
        async with self.db.transaction() as uow:
            await uow.session.execute(
                sa.text(
                    "UPDATE decision.run SET status = :s, error = :e, finished_at = now() "
                    "WHERE run_id = :r AND status = 'running'"
                ),
                {"s": status, "e": error, "r": run_id},
            )

    # -- cron ----------------------------------------------------------------------------
    async def cron_forever(self, every_s: float = 1.0) -> None:
        await self.engine.loaded.wait()
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.cron_once(datetime.now(UTC))
            except Exception as exc:
                log.warning("cron: %s", exc)

    async def cron_once(self, now: datetime) -> list[str]:
        """Start the runs whose tick has come (once each, whichever replica sees it first)."""
        started = []
        for live in list(self.engine.catalog.by_id.values()):
            sched = live.body.get("schedule") or {}
            if live.body.get("type") != "batch" or not sched.get("cron"):
                continue
            local = now.astimezone(ZoneInfo(sched.get("timezone") or "UTC"))
            tick = croniter(sched["cron"], local).get_prev(datetime).astimezone(UTC)
            if (now - tick).total_seconds() > CRON_GRACE_S:
                continue
            if live.since is not None and tick < live.since:
                continue  # the tick came before the campaign was activated
            if (live.start and tick < live.start) or (live.end and tick >= live.end):
                continue
            try:
                run_id = await self.start(live.campaign_id, "cron", tick=tick)
            except (Conflict, NotFound):
                continue
            if run_id:
                log.info("cron: run %s of %s for tick %s", run_id, live.campaign_id, iso(tick))
                started.append(run_id)
        return started

    # -- simulation ----------------------------------------------------------------------
    async def simulate(self, campaign_id: str) -> api.Simulation:
        t0 = time.perf_counter()
        body, _ = await self._campaign(campaign_id)
        live = await compile_one(campaign_id, body, self.selection_url)
        counts = empty_counts()
        if body.get("type") == "triggered":
            events = await self._replay(body["trigger"]["event"])
            for start in range(0, len(events), self.page):
                part = events[start : start + self.page]
                for _, o in await self.plan(
                    live,
                    [c for c, _ in part],
                    {},
                    lambda c: tracking_id("simulate", c),
                    dry=True,
                    events=[e for _, e in part],
                    audience_checked=False,
                ):
                    tally(counts, o)
            selected, kind, n_events = len(events), "triggers", len(events)
        else:
            snapshot_id, selected = await self._snapshot(body)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                position = 0
                while position < selected:
                    members = await self._page(http, snapshot_id, position)
                    if not members:
                        break
                    for _, o in await self.plan(
                        live, members, {}, lambda c: tracking_id("simulate", c), dry=True
                    ):
                        tally(counts, o)
                    position += len(members)
            kind, n_events = "run", None
        return api.Simulation(
            campaign_id=campaign_id,
            kind=kind,  # type: ignore[arg-type]
            events=n_events,
            selected=selected,
            **_counted(counts),
            took_ms=round((time.perf_counter() - t0) * 1000, 1),
        )

    async def _replay(self, event_type: str) -> list[tuple[str, dict[str, Any]]]:
        """The last day of ``events.<type>`` from the stream (at most REPLAY_LIMIT)."""
        since = datetime.now(UTC) - timedelta(days=1)
        js = self.bus.js
        sub = await js.pull_subscribe(
            self.bus.subject(events_of_type(event_type)),
            stream=self.bus.stream("EVENTS"),
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                ack_policy=AckPolicy.NONE,
                opt_start_time=since,
                inactive_threshold=30.0,
            ),
        )
        out: list[tuple[str, dict[str, Any]]] = []
        try:
            while len(out) < REPLAY_LIMIT:
                try:
                    msgs = await sub.fetch(1000, timeout=0.5)
                except TimeoutError:
                    break
                for m in msgs:
                    ev = CloudEvent.from_bytes(m.data)
                    d = ev.data
                    cid = d.get("customer_id") or (
                        "anon:" + str(d["anonymous_id"]) if d.get("anonymous_id") else None
                    )
                    if cid:
                        out.append(
                            (
                                str(cid),
                                {
                                    "id": ev.id,
                                    "type": event_type,
                                    "time": d.get("time") or ev.time,
                                    "properties": d.get("properties") or {},
                                },
                            )
                        )
                if msgs and (msgs[-1].metadata.num_pending or 0) == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out


def _json(v: Any) -> str:
    return orjson.dumps(v).decode()
