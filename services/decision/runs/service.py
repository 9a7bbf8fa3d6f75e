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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
from croniter import croniter
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.decision.catalog.repository import CatalogRows
from services.decision.engine import Engine
from services.decision.outbound import Item, Planner, tracking_id
from services.decision.pipeline import counts as tallies
from services.decision.pipeline.catalog import compile_one
from services.decision.pipeline.model import Campaign
from services.decision.pipeline.steps import Outcome
from services.decision.runs.repository import RunRepository
from services.decision.timers.service import Timers, deferred
from shared.bus import Bus
from shared.contracts import catalog as api
from shared.contracts.bus import EventOccurred
from shared.db import Database
from shared.errors import Conflict, NotFound, Unavailable
from shared.events import CloudEvent, iso
from shared.paging import encode_cursor
from shared.privacy import events_of_type

log = logging.getLogger("kairos.decision.runs")
PAGE = 5_000
LEASE_S = 30
MAX_FAILURES = 5
CRON_GRACE_S = 120
REPLAY_LIMIT = 100_000


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
        **tallies.fields(row["counts"]),
    )


class Runs:
    def __init__(
        self,
        engine: Engine,
        db: Database,
        bus: Bus,
        selection_url: str,
        owner: str,
        timers: Timers,
        *,
        page: int = PAGE,
    ) -> None:
        self.engine = engine
        self.planner = Planner(engine)
        self.db = db
        self.bus = bus
        self.selection_url = selection_url
        self.owner = owner
        self.timers = timers
        self.wake = asyncio.Event()
        self.page = page

    # -- the API -------------------------------------------------------------------------
    async def _campaign(self, campaign_id: str) -> tuple[dict[str, Any], str]:
        async with self.db.sessions() as s:
            found = await CatalogRows(s).campaign(campaign_id)
        if found is None:
            raise NotFound(f"Campaign '{campaign_id}' does not exist.")
        return found

    async def start(
        self, campaign_id: str, principal: str | None, tick: datetime | None = None
    ) -> str | None:
        """Start a run now (None: a cron tick another replica already started)."""
        body, state = await self._campaign(campaign_id)
        kind = api.CampaignPut.model_validate(body).type
        if kind != "batch":
            raise Conflict(
                f"Campaign '{campaign_id}' is {kind}; only batch campaigns run "
                "over their audience (triggered ones fire on events)."
            )
        if state != "active":
            raise Conflict(f"Campaign '{campaign_id}' is {state}; activate it to run it.")
        run_id = "run-" + secrets.token_hex(8)
        async with self.db.transaction() as uow:
            repo = RunRepository(uow.session)
            if tick is None:
                busy = await repo.busy(campaign_id)
                if busy:
                    raise Conflict(
                        f"Run '{busy}' of campaign '{campaign_id}' is still running; cancel it "
                        "or wait for it to finish."
                    )
            made = await repo.insert(
                run_id, campaign_id, tick=tick, counts=tallies.empty(), principal=principal
            )
            if not made:
                return None
        self.wake.set()
        return run_id

    async def get(self, campaign_id: str, run_id: str) -> api.RunInfo:
        async with self.db.sessions() as s:
            row = await RunRepository(s).get(campaign_id, run_id)
        if row is None:
            raise NotFound(f"Run '{run_id}' of campaign '{campaign_id}' does not exist.")
        return _info(row)

    async def runs(self, campaign_id: str, limit: int) -> api.RunList:
        await self._campaign(campaign_id)
        async with self.db.sessions() as s:
            rows = await RunRepository(s).latest(campaign_id, limit)
        return api.RunList(campaign_id=campaign_id, runs=[_info(r) for r in rows])

    async def cancel(self, campaign_id: str, run_id: str) -> api.RunInfo:
        async with self.db.transaction() as uow:
            done = await RunRepository(uow.session).cancel(campaign_id, run_id)
        info = await self.get(campaign_id, run_id)
        if not done:
            raise Conflict(f"Run '{run_id}' is {info.status}; only a running run can be cancelled.")
        return info

    # -- the walker ----------------------------------------------------------------------
    async def work_forever(self) -> None:
        await self.engine.loaded.wait()
        while True:
            try:
                async with self.db.transaction() as uow:
                    row = await RunRepository(uow.session).claim(self.owner, LEASE_S)
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

    async def _failed(self, row: Any, exc: Exception) -> None:
        failures = int(row["counts"].get("failures", 0)) + 1
        async with self.db.transaction() as uow:
            await RunRepository(uow.session).failed(
                row["run_id"], str(exc), failures, final=failures >= MAX_FAILURES
            )

    async def walk(self, row: Any) -> None:
        run_id, cid = row["run_id"], row["campaign_id"]
        body, state = await self._campaign(cid)
        if state != "active":
            await self._finish(run_id, "cancelled", f"campaign is {state}")
            return
        camp = await compile_one(cid, body, self.selection_url)
        # The campaign is read above; its offers and the policy come from the catalog, which
        # must have been read since (they may have been written a moment before the run).
        await self.engine.catalog_since_now()
        snapshot_id, selected = row["snapshot_id"], row["selected"]
        if snapshot_id is None:
            snapshot_id, selected = await self._snapshot(body)
            async with self.db.transaction() as uow:
                await RunRepository(uow.session).set_snapshot(
                    run_id, self.owner, snapshot_id, selected
                )
        position = int(row["position"])
        counts = dict(row["counts"])
        # A walker that died may have planned (reserved, published) up to two pages past its
        # checkpoint: those are planned again ledger first, so they count what went out.
        redo = 2 if row["snapshot_id"] is not None else 0
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
                    futures = await self._chunk(run_id, camp, members, counts, redo=redo > 0)
                    position += len(members)
                    redo -= 1
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

    async def _snapshot(self, body: Mapping[str, Any]) -> tuple[str, int]:
        rule = api.CampaignPut.model_validate(body).audience or {"all": []}
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
        self,
        run_id: str,
        camp: Campaign,
        members: Sequence[str],
        counts: dict[str, Any],
        *,
        redo: bool = False,
    ) -> list[Any]:
        """Plan one page and start publishing it; returns the ack futures."""
        outs = await self.plan(
            camp,
            members,
            {"run_id": run_id},
            lambda c: tracking_id(run_id, c),
            dry=False,
            redo=redo,
        )
        records: list[tuple[str, CloudEvent]] = []
        timers = []
        for it, o in outs:
            tallies.tally(counts, o)
            tallies.observe("run", o)
            if o.status == "deferred":
                timers.append(deferred(it, o))
                if o.kind == "send":
                    continue
            records += o.records
        await self.timers.store(timers)
        return await self.bus.publish_pending(records)

    async def plan(
        self,
        camp: Campaign,
        members: Sequence[str],
        origin: Mapping[str, Any],
        tracking: Callable[[str], str],
        *,
        dry: bool,
        events: Sequence[Mapping[str, Any]] | None = None,
        audience_checked: bool = True,
        redo: bool = False,
    ) -> list[tuple[Item, Outcome]]:
        """One page of customers for one campaign through the pipeline (the ledger is only
        read when ``dry``; ``redo``: the page may have been planned before)."""
        now = datetime.now(UTC)
        whos = await self.planner.customers(members, [camp], now, events=events)
        items = [Item(who, camp, tracking(who.customer_id), origin=origin) for who in whos]
        if redo and not dry:
            await self.planner.recall(items)
        done: list[tuple[Item, Outcome]] = []
        todo: list[Item] = []
        for it in items:
            out = self.planner.eligible(it, now, audience_checked=audience_checked)
            if out is None:
                todo.append(it)
            else:
                done.append((it, out))
        if todo:
            done += zip(todo, await self.planner.contact(todo, now, dry=dry), strict=True)
        return done

    async def _checkpoint(self, run_id: str, position: int, counts: dict[str, Any]) -> bool:
        """Save how far the run got (also when it was cancelled meanwhile: what went out is
        counted); False when it must stop (cancelled, or another replica took it over)."""
        async with self.db.transaction() as uow:
            status = await RunRepository(uow.session).checkpoint(
                run_id, self.owner, position, counts, LEASE_S
            )
        return status == "running"

    async def _finish(self, run_id: str, status: str, error: str | None) -> None:
        async with self.db.transaction() as uow:
            await RunRepository(uow.session).finish(run_id, status, error)

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
        for camp in list(self.engine.catalog.by_id.values()):
            if camp.type != "batch" or not camp.cron:
                continue
            local = now.astimezone(ZoneInfo(camp.timezone))
            tick = croniter(camp.cron, local).get_prev(datetime).astimezone(UTC)
            if (now - tick).total_seconds() > CRON_GRACE_S:
                continue
            if camp.since is not None and tick < camp.since:
                continue  # the tick came before the campaign was activated
            if (camp.start and tick < camp.start) or (camp.end and tick >= camp.end):
                continue
            try:
                run_id = await self.start(camp.campaign_id, "cron", tick=tick)
            except (Conflict, NotFound):
                continue
            if run_id:
                log.info("cron: run %s of %s for tick %s", run_id, camp.campaign_id, iso(tick))
                started.append(run_id)
        return started

    # -- simulation ----------------------------------------------------------------------
    async def simulate(self, campaign_id: str) -> api.Simulation:
        """What a run (or a day of trigger events) would do: the same ``plan`` as a run, with
        the ledger only read."""
        t0 = time.perf_counter()
        body, _ = await self._campaign(campaign_id)
        camp = await compile_one(campaign_id, body, self.selection_url)
        await self.engine.catalog_since_now()  # as a run: offers written a moment ago count
        counts = tallies.empty()

        async def walk(members: Sequence[str], **kw: Any) -> None:
            for _, o in await self.plan(
                camp, members, {}, lambda c: tracking_id("simulate", c), dry=True, **kw
            ):
                tallies.tally(counts, o)

        if camp.type == "triggered" and camp.event is not None:
            events = await self._replay(camp.event)
            for start in range(0, len(events), self.page):
                part = events[start : start + self.page]
                await walk(
                    [c for c, _ in part], events=[e for _, e in part], audience_checked=False
                )
            selected, kind, n_events = len(events), "triggers", len(events)
        else:
            snapshot_id, selected = await self._snapshot(body)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                position = 0
                while position < selected:
                    members = await self._page(http, snapshot_id, position)
                    if not members:
                        break
                    await walk(members)
                    position += len(members)
            kind, n_events = "run", None
        return api.Simulation(
            campaign_id=campaign_id,
            kind=kind,  # type: ignore[arg-type]
            events=n_events,
            selected=selected,
            **tallies.fields(counts),
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
                    try:
                        occurred = EventOccurred.parse(ev)
                    except ValueError:  # a malformed event: the trigger consumer skips it too
                        continue
                    cid = occurred.who()
                    if cid:
                        out.append((cid, occurred.as_fired(ev)))
                if msgs and (msgs[-1].metadata.num_pending or 0) == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out
