"""Keeping the audience index fresh, saved, and rebuilt when it has to be.

- **Fresh**: this process's own consumers of ``profile.>`` (changed, erased, merged) and
  ``contact.recorded`` apply each change by reading the customer's projection from Redis
  (the profile service's read model), in batches, version-guarded.
- **Saved**: the index and the stream positions it reflects are written to
  ``<selection_index_dir>/index.pickle`` periodically and at shutdown; a restart loads it
  and resumes both streams from the saved positions.
- **Rebuilt** when there is no saved index, or when the PROFILE stream no longer holds the
  changes since it was saved: a page-wise export from the profile service, while the
  consumers already apply changes made during the rebuild.

Every replica of the selection service holds the whole index, so each consumes the
streams on its own consumer (named after the process), not a shared durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import Gauge, Histogram
from pydantic import ValidationError

from services.selection.erasure import Forget
from services.selection.index import Change, Population
from shared.bus import Consumer, PoisonMessage, TransientError, bulk_gather_s
from shared.contracts.bus import (
    BusMessage,
    ContactRecorded,
    ImportBatch,
    ProfileChanged,
    ProfileCounted,
    ProfileErased,
    ProfileImported,
    ProfileMerged,
)
from shared.events import CloudEvent
from shared.privacy import any_customer
from shared.redis import read_counter_parts, read_projections
from shared.rules import parse_duration
from shared.service import Runtime

log = logging.getLogger("kairos.selection.audience")
Batch = Sequence[tuple[Msg, CloudEvent]]
M = TypeVar("M", bound=BusMessage)

FORMAT = 1
MAX_PROJECTION_WAITS = 30
WAITING_FORGOTTEN_S = 600.0
EXPORT_PAGE = 5000
# How far back ``contacted`` rules can look once the CONTACT stream (7 days) has aged out.
CONTACT_HISTORY_DAYS = 400
INDEX_CUSTOMERS = Gauge("kairos_selection_index_customers", "Customers in the audience index")
INDEX_LAG = Histogram(
    "kairos_selection_index_lag_seconds",
    "Time from a profile change event to the index applying it",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


class Audience:
    """The process's population index and its lifecycle."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.pop = Population()
        self.state = "loading"
        self.loaded_from: str | None = None
        self.load_seconds: float | None = None
        self.last_change_at: datetime | None = None
        self.contact_seq = 0
        self.changes = 0
        self._saved_changes = 0
        self._erased_while_loading: set[str] = set()
        self._waiting: dict[int, float] = {}  # PROFILE seq handed back to wait -> since when
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: aiohttp.ClientSession | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._saving = asyncio.Lock()
        cfg = rt.settings
        self.path = (cfg.selection_index_dir or cfg.run_dir / "selection") / "index.pickle"
        name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{cfg.instance_id}-{os.getpid()}")
        self._consumer_name = f"selection-index-{name}"[:200]
        self.forget = Forget(rt.db, self._save_if_ready)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- start and stop -------------------------------------------------------------
    async def start(self) -> None:
        t0 = time.perf_counter()
        loaded = await asyncio.to_thread(self._load)
        profile_first, profile_last = await self._stream_bounds("PROFILE")
        contact_first, contact_last = await self._stream_bounds("CONTACT")
        rebuild = loaded is None
        if loaded is not None:
            pop, contact_seq = loaded
            if pop.seq + 1 < profile_first or pop.seq > profile_last:
                log.warning(
                    "saved audience index is at PROFILE %d; the stream holds %d..%d: rebuilding",
                    pop.seq,
                    profile_first,
                    profile_last,
                )
                rebuild = True
            else:
                self.pop, self.contact_seq = pop, contact_seq
                self.state, self.loaded_from = "ready", str(self.path)
                self.load_seconds = time.perf_counter() - t0
                log.info("audience index loaded: %d customers", self.pop.total)
        backfill = False
        if rebuild:
            self.pop = Population()
            self.pop.seq = profile_last
            self.contact_seq = 0
        if contact_last and contact_first > self.contact_seq + 1:
            # The stream no longer holds every contact this index is missing: the older ones
            # come from feedback's history (what the stream still has is read as usual).
            self.contact_seq = contact_first - 1
            backfill = True
        cfg = self.rt.settings
        profile = Consumer(
            self.rt.bus,
            f"{self._consumer_name}-profile",
            ["profile.>"],
            "PROFILE",
            self._on_profile,
            batch=cfg.consumer_batch,
            max_deliver=cfg.consumer_max_deliver,
            start_seq=self.pop.seq + 1,
            inactive_threshold_s=600.0,
            gather_s=bulk_gather_s(),
        )
        contact = Consumer(
            self.rt.bus,
            f"{self._consumer_name}-contact",
            [any_customer("contact.recorded")],
            "CONTACT",
            self._on_contact,
            batch=cfg.consumer_batch,
            max_deliver=cfg.consumer_max_deliver,
            start_seq=self.contact_seq + 1,
            inactive_threshold_s=600.0,
            gather_s=bulk_gather_s(),
        )
        self.rt.consumers += [profile, contact]
        for c in (profile, contact):
            await c.start()
        if rebuild:
            self._tasks.append(asyncio.create_task(self._rebuild(t0), name="audience-rebuild"))
        if backfill:
            until = await self._first_time("CONTACT", contact_first)
            self._tasks.append(
                asyncio.create_task(self._contacts_from_feedback(until), name="contact-backfill")
            )
        self._tasks.append(asyncio.create_task(self._save_loop(), name="audience-save"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._http is not None:
            await self._http.close()
        if self.ready:
            await self.save()

    async def _stream_bounds(self, stream: str) -> tuple[int, int]:
        try:
            info = await self.rt.bus.js.stream_info(self.rt.bus.stream(stream))
        except NotFoundError:
            return 1, 0
        return int(info.state.first_seq), int(info.state.last_seq)

    async def _first_time(self, stream: str, seq: int) -> datetime | None:
        """When the oldest message still in a stream was stored."""
        try:
            msg = await self.rt.bus.js.get_msg(self.rt.bus.stream(stream), seq)
        except Exception as exc:  # purged meanwhile: the backfill overlaps a little
            log.warning("first %s message not readable: %s", stream, exc)
            return None
        return _when(CloudEvent.from_bytes(msg.data or b"{}").time) if msg.data else None

    async def _contacts_from_feedback(self, until: datetime | None) -> None:
        """Contacts older than the CONTACT stream, from feedback's history (the last
        ``CONTACT_HISTORY_DAYS``), for ``contacted`` rules."""
        base = self.rt.settings.url_of("feedback")
        since = datetime.now(UTC) - timedelta(days=CONTACT_HISTORY_DAYS)
        cursor: str | None = None
        n, tries = 0, 0
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                params = {"since": since.isoformat(), "limit": "50000"}
                if cursor:
                    params["after"] = cursor
                try:
                    async with http.get(f"{base}/internal/contacts", params=params) as resp:
                        resp.raise_for_status()
                        doc = await resp.json(loads=orjson.loads)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    tries += 1
                    if tries > 60:
                        log.error("contact history from feedback abandoned: %s", exc)
                        return
                    await asyncio.sleep(min(10.0, 0.5 * tries))
                    continue
                tries = 0
                for row in doc["contacts"]:
                    at = _when(row["at"])
                    if at is None or (until is not None and at >= until):
                        continue  # the stream has it
                    self.pop.contacted(
                        str(row["customer_id"]), str(row["campaign_id"]), at.timestamp()
                    )
                    n += 1
                cursor = doc.get("next_cursor")
                if not cursor:
                    break
        self.changes += 1
        log.info("contact history: %d contacts older than the stream loaded from feedback", n)

    # -- rebuild ------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Read every profile again on top of the index (version-guarded: what is newer
        replaces what the index holds), unless such a pass is running."""
        if self._refreshing is not None or not self.ready:
            return  # a pass (or the first load) that has yet to read these customers

        async def run() -> None:
            try:
                await self._rebuild(time.perf_counter())
            finally:
                self._refreshing = None

        self._refreshing = asyncio.create_task(run(), name="audience-refresh")
        self._tasks.append(self._refreshing)

    async def _rebuild(self, t0: float) -> None:
        """Load every profile from the profile service, page by page."""
        base = self.rt.settings.url_of("profile")
        after, n = "", 0
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    async with http.get(
                        f"{base}/v1/customers:export",
                        params={"after": after, "limit": str(EXPORT_PAGE)},
                    ) as resp:
                        resp.raise_for_status()
                        body = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("profile export unavailable (%s); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                lines = body.splitlines()
                docs = [orjson.loads(line) for line in lines if line]
                if docs:
                    after = docs[-1]["customer_id"]
                    gone = self._erased_while_loading
                    self.pop.upsert_many(d for d in docs if d["customer_id"] not in gone)
                    n += len(docs)
                    INDEX_CUSTOMERS.set(self.pop.total)
                if len(docs) < EXPORT_PAGE:
                    break
                await asyncio.sleep(0)  # let the consumers and requests run between pages
        self._erased_while_loading.clear()
        self.state, self.loaded_from = "ready", "profile export"
        self.load_seconds = time.perf_counter() - t0
        log.info("audience index rebuilt: %d customers in %.1f s", n, self.load_seconds)
        self.changes += 1
        await self.save()

    # -- applying changes ------------------------------------------------------------------
    async def _on_profile(self, batch: Batch) -> list[Msg]:
        try:
            return await self._apply_profile(batch)
        except TransientError:  # the whole batch comes back
            self._note_waiting([], [m for m, _ in batch])
            raise

    async def _apply_profile(self, batch: Batch) -> list[Msg]:
        """Apply a batch of profile messages; returns those that name a customer whose
        projection is not written yet (they come back in a second: what was applied is then
        skipped by the version guard). Each message waits on its own account: one that can
        never be satisfied (a change of a customer erased meanwhile) once held its whole
        batch back, and when it gave up, gave up on the fresh messages beside it too."""
        changed: dict[str, Change] = {}
        removed: list[str] = []
        newest: datetime | None = None
        # Typed first, before the index changes: a malformed erasure is a poison message.
        erased = {
            id(ev): _parse(ProfileErased, ev) for _, ev in batch if ev.type == ProfileErased.TYPE
        }
        announced_batches: dict[int, tuple[int, set[str]]] = {}
        for _, ev in batch:
            if ev.type == ProfileImported.TYPE:
                imp = _parse(ProfileImported, ev)
                announced_batches[id(ev)] = (imp.batch_id, set(imp.changed))
            elif ev.type == ProfileCounted.TYPE:
                cnt = _parse(ProfileCounted, ev)
                parts = {"counters", *(f"event:{t}" for t in cnt.event_types)}
                announced_batches[id(ev)] = (cnt.batch_id, parts)
        naming: list[tuple[Msg, list[str]]] = []  # the customers each message changed
        for msg, ev in batch:
            if ev.type == ProfileChanged.TYPE:
                ch = _parse(ProfileChanged, ev)
                parts = set(ch.changed) | {f"event:{t}" for t in ch.event_types or ()}
                _note(changed, ch.customer_id, ch.version, parts)
                naming.append((msg, [ch.customer_id]))
            elif id(ev) in announced_batches:  # an import's or an event batch's
                batch_id, parts = announced_batches[id(ev)]
                got = await self._import_batch(batch_id) or ImportBatch(
                    batch_id=batch_id, customers={}
                )
                types = got.event_types or {}  # an event batch names each one's event types
                for cid, v in got.customers.items():
                    mine = types.get(cid)
                    own = {"counters", *(f"event:{t}" for t in mine)} if mine else parts
                    _note(changed, cid, v, own)
                naming.append((msg, list(got.customers)))
            elif ev.type == ProfileErased.TYPE:
                gone = erased[id(ev)]
                for cid in gone.ids or [gone.customer_id]:
                    removed.append(cid)
                    changed.pop(cid, None)
            elif ev.type == ProfileMerged.TYPE:
                source = _parse(ProfileMerged, ev).source
                removed.append(source)
                changed.pop(source, None)
            at = _when(ev.time)
            if at is not None and (newest is None or at > newest):
                newest = at
        for cid in removed:
            self.pop.remove(cid)
            if not self.ready or self._refreshing is not None:
                self._erased_while_loading.add(cid)
        if erased:
            await self.forget.erased([i for e in erased.values() for i in [e.customer_id, *e.ids]])
        later: list[Msg] = []
        applied, behind = 0, list[str]()
        if changed:
            docs, behind = await self._read(changed)
            applied = self.pop.upsert_many(docs, changed)
            if behind:
                later = self._wait_for(naming, set(behind))
        seqs = [int(m.metadata.sequence.stream) for m, _ in batch if m.metadata]
        if behind or any(ev.type == ProfileImported.TYPE for _, ev in batch):
            log.info(
                "PROFILE %d..%d: %d customers changed, %d applied, %d behind, %d messages wait",
                min(seqs, default=0),
                max(seqs, default=0),
                len(changed),
                applied,
                len(behind),
                len(later),
            )
        self._note_waiting(seqs, later)
        # The highest sequence of the batch, not its last message's: a redelivered message
        # can come after a newer one. (What waits is remembered apart, for the saved index.)
        self.pop.seq = max(self.pop.seq, max(seqs, default=0))
        self.changes += 1
        if newest is not None:
            self.last_change_at = newest
            INDEX_LAG.observe(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
        INDEX_CUSTOMERS.set(self.pop.total)
        return later

    def _wait_for(self, naming: list[tuple[Msg, list[str]]], behind: set[str]) -> list[Msg]:
        """The messages to take again later: those naming a customer whose projection is
        behind, unless they have waited long enough (then that change is left as it was)."""
        later: list[Msg] = []
        abandoned: list[str] = []
        for msg, cids in naming:
            late = [c for c in cids if c in behind]
            if not late:
                continue
            tries = (msg.metadata.num_delivered or 1) if msg.metadata else 1
            if tries < MAX_PROJECTION_WAITS:
                later.append(msg)
            else:
                abandoned += late
        if abandoned:
            log.warning("projections of %s never caught up; left as they were", abandoned[:5])
        return later

    def _note_waiting(self, seqs: list[int], later: list[Msg]) -> None:
        """Track the messages handed back to wait, so that a saved index resumes before
        them (a restart must not skip a change it never applied)."""
        now = time.monotonic()
        for s in seqs:
            self._waiting.pop(s, None)
        for m in later:
            if m.metadata:
                self._waiting[int(m.metadata.sequence.stream)] = now

    def resume_seq(self) -> int:
        """Where a restart resumes the PROFILE stream: after everything applied, but never
        past a message still waiting (one waiting for over ``WAITING_FORGOTTEN_S`` has been
        given up on: dead-lettered, or its consumer was replaced)."""
        cutoff = time.monotonic() - WAITING_FORGOTTEN_S
        for s in [s for s, t in self._waiting.items() if t < cutoff]:
            del self._waiting[s]
        return min(self.pop.seq, min(self._waiting, default=self.pop.seq + 1) - 1)

    async def _import_batch(self, batch_id: int) -> ImportBatch | None:
        """The customers (and versions) of one announced batch (an import's or an event
        batch's), from the profile service. A batch whose row is gone (kept for a while
        only: this replica was down or behind for longer) named customers this index cannot
        know: every profile is read again, in the background (``_refresh``)."""
        url = f"{self.rt.settings.url_of('profile')}/internal/import-batches/{batch_id}"
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            async with self._http.get(url) as resp:
                if resp.status == 404:
                    log.warning("announced batch %d is gone; reading every profile", batch_id)
                    self._refresh()
                    return None
                resp.raise_for_status()
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"import batch {batch_id} not readable: {exc}") from exc
        return ImportBatch.model_validate_json(body)

    async def _read(self, wanted: dict[str, Change]) -> tuple[list[dict[str, Any]], list[str]]:
        """The projections of changed customers, and the ids whose projection is still older
        than the event (the profile writes Redis right after its commit, so they are read
        again a few times first). When a customer's changes since the version the index holds
        only moved counters (event batches), only the behaviour part is read."""
        light = [
            cid
            for cid, w in wanted.items()
            if w.parts
            and all(p == "counters" or p.startswith("event:") for p in w.parts)
            and self.pop.holds(cid, w.since - 1)
        ]
        docs: dict[str, dict[str, Any]] = {}
        heavy = set(wanted)
        if light:
            parts = await read_counter_parts(self.rt.redis, self.rt.keys, light)
            for cid, part in zip(light, parts, strict=True):
                if part is not None and part[0] == wanted[cid].version:
                    docs[cid] = {**part[1], "customer_id": cid, "version": part[0]}
                    heavy.discard(cid)
        ids = list(heavy)
        behind: list[str] = []
        for delay in (0.0, 0.02, 0.05, 0.1, 0.25):
            if not ids:
                break
            if delay:
                await asyncio.sleep(delay)
            got = await read_projections(self.rt.redis, self.rt.keys, ids)
            behind = []
            for cid, doc in zip(ids, got, strict=True):
                if doc is not None:
                    docs[cid] = doc
                if doc is None or doc["version"] < wanted[cid].version:
                    behind.append(cid)
            ids = behind
        return list(docs.values()), behind

    async def _on_contact(self, batch: Batch) -> None:
        # Typed first, before the index changes: a malformed contact is a poison message.
        contacts = [(msg, ev, _parse(ContactRecorded, ev)) for msg, ev in batch]
        for msg, ev, c in contacts:
            if c.control:  # a control contact is not a contact
                continue
            at = _when(c.time) or _when(ev.time) or datetime.now(UTC)
            self.pop.contacted(c.customer_id, c.campaign_id, at.timestamp())
            if msg.metadata:
                self.contact_seq = max(self.contact_seq, int(msg.metadata.sequence.stream))
        self.changes += 1

    def contacted_check(self, customer_id: str, now: datetime) -> Callable[[str, str], bool]:
        """``contacted`` for the evaluator, answered from this index's contact history."""
        slot = self.pop.pos.get(customer_id)

        def check(campaign: str, within: str) -> bool:
            col = self.pop.contacts.get(campaign)
            if slot is None or col is None:
                return False
            cutoff = now.timestamp() - parse_duration(within)
            return any(s == slot and t >= cutoff for s, t in zip(col.slot, col.at, strict=True))

        return check

    # -- saving -------------------------------------------------------------------------
    async def _save_loop(self) -> None:
        interval = self.rt.settings.selection_save_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.ready:
                try:
                    await self.save()
                except OSError as exc:
                    log.warning("could not save the audience index: %s", exc)

    async def _save_if_ready(self) -> None:
        if self.ready:
            await self.save()

    async def save(self) -> None:
        """Write the index and its stream positions (serialised here, written off-loop)."""
        # One save at a time: two (a rebuild's end and an erasure's, say) once wrote the same
        # temporary file at once, and one of them failed on the rename.
        async with self._saving:
            if self.changes == self._saved_changes:
                return
            marker = self.changes
            self.pop.prepare()
            blob = pickle.dumps(
                {
                    "format": FORMAT,
                    "pop": self.pop,
                    "contact_seq": self.contact_seq,
                    "resume_seq": self.resume_seq(),
                },
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            await asyncio.to_thread(_write_atomically, self.path, blob)
            self._saved_changes = marker
        log.info("audience index saved: %d customers, %d bytes", self.pop.total, len(blob))

    def _load(self) -> tuple[Population, int] | None:
        try:
            with self.path.open("rb") as fh:
                data = pickle.load(fh)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a torn or foreign file: rebuild instead
            log.warning("ignoring unreadable audience index %s: %s", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        pop = data["pop"]
        if not isinstance(pop, Population):
            return None
        pop.seq = int(data.get("resume_seq", pop.seq))  # before any change still waiting
        return pop, int(data["contact_seq"])


def _write_atomically(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _note(changed: dict[str, Change], cid: str, version: int, parts: set[str]) -> None:
    """Fold one change of a customer into what this batch changed."""
    prev = changed.get(cid)
    if prev is None:
        changed[cid] = Change(version, set(parts), version)
    else:
        prev.add(version, parts)


def _parse(cls: type[M], ev: CloudEvent) -> M:
    """The typed payload; one that does not parse is a poison message (alone it is
    dead-lettered at once; in a batch the runner retries one by one, so only it is)."""
    try:
        return cls.parse(ev)
    except ValidationError as exc:
        raise PoisonMessage(f"not a {cls.TYPE} payload: {exc}") from exc


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
