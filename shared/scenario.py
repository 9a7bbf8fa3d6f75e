"""The proof (issue 12): a known uplift recovered through the public API alone.

A generated telecom population is imported, a batch campaign with a control group and a
conversion rule is defined, activated and run; once its messages are out, the population is
simulated with known probabilities (a baseline conversion rate for everyone contacted, a
higher one for targets whose message went out, clicks through the public links) and the
campaign's report is read back: its interval must contain the true uplift.

Every call is plain HTTP against the gateway with an API key, so ``kairos demo scenario``
and ``bench/scenario.py`` run the same code against any running suite. The calls that need
dispatch and feedback are the methods of :class:`Api` marked so; each is one small function.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from shared import demo

RECEIVED = frozenset({"sent", "delivered", "opened", "clicked"})  # the message went out
CONVERSION_EVENT = "scenario.pack_bought"
REPORT_PATH = "/v1/campaigns/{campaign_id}/report"
RESPONSES_PATH = "/v1/responses"
OUTBOX_PATH = "/v1/outbox"
EXPORT_PATH = "/v1/exports/contacts"
CLICK_PATH = re.compile(r"/t/[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Model:
    """The true behaviour of the simulated population."""

    baseline: float = 0.02  # conversion of everyone contacted, target and control alike
    with_offer: float = 0.03  # conversion of a target whose message went out
    click: float = 0.25  # a target whose message went out clicks its link
    value: tuple[float, float] = (10.0, 30.0)  # revenue of one conversion, uniform
    control_group: float = 0.25


@dataclass
class Contact:
    """One of the campaign's contacts: who, which message, and whether it went out."""

    customer_id: str
    tracking_id: str | None
    control: bool
    status: str | None
    links: list[str] | None = None  # its public click paths (None: not read yet)


class ScenarioError(Exception):
    """The suite answered something the scenario cannot go on from."""


class Unavailable(ScenarioError):
    """A part of the suite the scenario needs (dispatch, feedback) does not answer yet."""


def _check(r: httpx.Response, *ok: int) -> Any:
    if r.status_code not in ok:
        raise ScenarioError(f"{r.request.method} {r.request.url.path} → {r.status_code}: {r.text}")
    return r.json() if r.content else None


class Api:
    """The public calls the scenario makes, one method each."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.c = client

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        """A GET, tried again on a dropped connection (a server closing an idle keep-alive
        connection as the client reuses it is a race, not an answer)."""
        for attempt in range(3):
            try:
                return await self.c.get(path, **kw)
            except httpx.TransportError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    async def import_customers(self, lines: list[bytes]) -> dict[str, Any]:
        """Import NDJSON customers (``POST /v1/customers:import``)."""
        r = await self.c.post(
            "/v1/customers:import",
            content=b"\n".join(lines) + b"\n",
            headers={"content-type": "application/x-ndjson"},
            timeout=None,
        )
        doc: dict[str, Any] = _check(r, 200, 202)
        return doc

    async def audience_count(self, rule: dict[str, Any]) -> int:
        """How many customers the audience index holds for a rule (it catches up on imports)."""
        r = await self.c.post("/v1/segments:preview", json={"rule": rule})
        return int(_check(r, 200)["count"])

    async def put(self, path: str, body: dict[str, Any]) -> None:
        """Create or replace a catalog object (offer, campaign)."""
        _check(await self.c.put(path, json=body), 200, 201)

    async def activate(self, campaign_id: str) -> None:
        """Activate a campaign that needs no approval."""
        _check(await self.c.post(f"/v1/campaigns/{campaign_id}/activate"), 200)

    async def run(self, campaign_id: str, timeout: float) -> dict[str, Any]:
        """Start a batch run and wait for it to finish; its counts."""
        run_id = _check(await self.c.post(f"/v1/campaigns/{campaign_id}/runs"), 202)["run_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = _check(
                await self.get(f"/v1/campaigns/{campaign_id}/runs/{run_id}"), 200
            )
            if info["status"] != "running":
                if info["status"] != "completed":
                    raise ScenarioError(f"run {run_id} ended {info['status']}: {info}")
                return info
            await asyncio.sleep(0.2)
        raise ScenarioError(f"run {run_id} still running after {timeout:.0f}s")

    async def serves(self, path: str) -> bool:
        """Whether the gateway's OpenAPI document has this path (a part not built yet has
        none)."""
        doc = _check(await self.get("/openapi.json"), 200)
        return path in (doc.get("paths") or {})

    # -- needs dispatch --------------------------------------------------------------------
    async def outbox(self, campaign_id: str, after: int) -> tuple[list[dict[str, Any]], int]:
        """The campaign's messages in the local outbox after a cursor (``GET /v1/outbox``,
        where messages go while no provider is configured), and the next cursor."""
        page = _check(await self.get("/v1/outbox", params={"after": after, "limit": 1000}), 200)
        items = [i for i in page["items"] if i["campaign_id"] == campaign_id]
        return items, int(page["next_after"])

    async def message_links(self, tracking_id: str) -> list[str]:
        """The public click paths (``/t/{token}``) of one message, found anywhere in
        ``GET /v1/messages/{tracking_id}`` (its rendered content); empty when it has none."""
        r = await self.get(f"/v1/messages/{tracking_id}")
        if r.status_code != 200:
            return []
        return sorted(set(CLICK_PATH.findall(r.text)))

    # -- needs feedback --------------------------------------------------------------------
    async def report(self, campaign_id: str) -> dict[str, Any] | None:
        """The campaign's report (``GET /v1/campaigns/{id}/report``); None while feedback
        does not know the campaign yet."""
        r = await self.get(f"/v1/campaigns/{campaign_id}/report")
        if r.status_code == 404:
            return None
        doc: dict[str, Any] = _check(r, 200)
        return doc

    async def exported_contacts(self, campaign_id: str, since: datetime) -> list[Contact]:
        """The campaign's contacts from the contact history export
        (``GET /v1/exports/contacts?since=…&format=ndjson``), in one streamed request."""
        params = {"since": since.isoformat(), "format": "ndjson"}
        out = []
        async with self.c.stream("GET", EXPORT_PATH, params=params, timeout=None) as r:
            if r.status_code != 200:
                raise ScenarioError(f"GET {EXPORT_PATH} → {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                row = orjson.loads(line) if line.strip() else None
                if row and row.get("campaign_id") == campaign_id:
                    out.append(
                        Contact(
                            row["customer_id"],
                            row["tracking_id"],
                            bool(row.get("control")),
                            row.get("status"),
                        )
                    )
        return out

    async def contacts(self, customer_id: str, campaign_id: str) -> list[Contact]:
        """The customer's contacts from this campaign (the 360° view's ``contacts``, kept by
        feedback; newest 50, plenty for one campaign)."""
        for _ in range(10):
            doc = _check(await self.get(f"/v1/customers/{customer_id}"), 200)
            # Under load feedback can miss the view's time budget: ask again.
            if "feedback" not in (doc.get("missing") or []):
                break
            await asyncio.sleep(0.2)
        else:
            raise Unavailable("the 360° view keeps missing feedback's contacts")
        return [
            Contact(customer_id, c["tracking_id"], bool(c.get("control")), c.get("status"))
            for c in doc.get("contacts") or []
            if c.get("campaign_id") == campaign_id
        ]

    async def follow(self, path: str) -> bool:
        """Open a public click link as a mail client would (no key); True on the redirect."""
        req = self.c.build_request("GET", path)
        del req.headers["authorization"]  # a public link: the mail client has no key
        r = await self.c.send(req, follow_redirects=False)
        return r.status_code == 302

    async def record_click(self, tracking_id: str) -> None:
        """Record a click without a link (``POST /v1/responses``), as an app does for push
        or in-app content."""
        r = await self.c.post(
            "/v1/responses", json={"tracking_id": tracking_id, "outcome": "clicked"}
        )
        _check(r, 202)

    # -- events ----------------------------------------------------------------------------
    async def send_events(self, events: list[dict[str, Any]]) -> None:
        """Send events in batches of 1,000 (``POST /v1/events``)."""
        for start in range(0, len(events), 1000):
            body = orjson.dumps({"events": events[start : start + 1000]})
            _check(await self.c.post("/v1/events", content=body), 202)


def population(n: int, seed: int, tag: str, prefix: str) -> list[dict[str, Any]]:
    """n generated telecom customers, tagged for this run, each reachable by e-mail.

    Everyone is reachable because decision draws the control group before it checks
    consent and reachability: with unreachable customers the control group would hold
    people the targets exclude, and the comparison would no longer be like for like."""
    rng = random.Random(seed)
    people = []
    for i in range(n):
        doc = demo.customer(i, rng, tags_min=5, tags_max=12, vocab=500)
        cid = f"{prefix}{i:06d}"
        doc["customer_id"] = cid
        doc["tags"] = [*doc["tags"], tag]
        doc["consents"] = {**doc["consents"], "email": True}
        doc["identities"] = {
            "email": f"{cid}@example.com",
            # Numbers are unique per run too: a profile knows a customer by them.
            "msisdn": f"+4916{int(prefix.encode().hex(), 16) % 100_000:05d}{i:06d}",
        }
        people.append(doc)
    return people


async def _gather(
    fn: Callable[[Any], Awaitable[Any]], items: Iterable[Any], width: int
) -> list[Any]:
    sem = asyncio.Semaphore(width)

    async def one(x: Any) -> Any:
        async with sem:
            return await fn(x)

    return list(await asyncio.gather(*(one(x) for x in items)))


async def _settle(
    api: Api,
    campaign_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    quiet: float = 5.0,
) -> dict[str, Any]:
    """Poll the report until ``done(totals)``, or until its totals stop moving for ``quiet``
    seconds (then the caller compares what it expected with what is there)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    since = time.monotonic()
    while True:
        rep = await api.report(campaign_id) or {}
        totals = rep.get("totals") or {}
        if done(totals) or time.monotonic() > deadline:
            return rep
        if totals != last:
            last, since = totals, time.monotonic()
        elif totals and time.monotonic() - since > quiet:
            return rep
        await asyncio.sleep(0.25)


async def run_scenario(
    gateway: str,
    api_key: str,
    *,
    customers: int,
    seed: int,
    model: Model = Model(),
    timeout: float = 300.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the proof against a running suite; the figures and whether the report's 95 %
    interval contains the true uplift. Goes as far as the suite allows: ``status`` says
    where it stopped when a part it needs (dispatch, feedback) does not answer yet."""
    say = log or (lambda _: None)
    u = uuid.uuid4().hex[:6]
    cid, oid, tag = f"scn-{u}", f"scn-offer-{u}", f"scenario:{u}"
    timings: dict[str, float] = {}
    out: dict[str, Any] = {
        "campaign_id": cid,
        "customers": customers,
        "seed": seed,
        "model": asdict(model),
        "seconds": timings,
    }
    audience = {"all": [{"tag": tag}, {"attr": "age", "op": "gte", "value": 18}]}
    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=60) as client:
        api = Api(client)
        t0 = time.monotonic()
        people = population(customers, seed, tag, prefix=f"s{u}-")
        imported = await api.import_customers([orjson.dumps(p) for p in people])
        if imported.get("failed"):
            raise ScenarioError(f"import failed for some lines: {imported['errors'][:3]}")
        in_audience = [p["customer_id"] for p in people if p["attributes"]["age"] >= 18]
        while await api.audience_count(audience) < len(in_audience):
            if time.monotonic() - t0 > timeout:
                raise ScenarioError("the audience index never saw the whole population")
            await asyncio.sleep(0.2)
        timings["import"] = round(time.monotonic() - t0, 2)
        say(f"imported {customers:,} customers, {len(in_audience):,} in the audience")

        t0 = time.monotonic()
        await _define(api, cid, oid, audience, model)
        timings["define_and_activate"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        started = datetime.now(UTC) - timedelta(minutes=5)  # contacts are after this, skew too
        run = await api.run(cid, timeout)
        timings["run"] = round(time.monotonic() - t0, 2)
        out["run"] = {
            k: run.get(k) for k in ("run_id", "selected", "control", "suppressed", "dispatched")
        }
        say(
            f"run: {run['selected']:,} selected, {run['control']:,} control, "
            f"{run['dispatched']:,} dispatched"
        )
        out["status"] = "run completed"

        feedback = await api.serves(REPORT_PATH)
        try:
            t0 = time.monotonic()
            contacts, out["groups_from"] = await _groups(
                api, cid, run, in_audience, feedback=feedback, since=started, timeout=timeout
            )
            timings["messages_out"] = round(time.monotonic() - t0, 2)
        except Unavailable as exc:
            out["status"] = f"stopped after the run: {exc}"
            return out
        out["status"] = "messages out"
        sim = await _simulate(api, contacts, people, model, seed, timings)
        out.update(sim)
        out["status"] = "simulated"
        if not feedback:
            out["status"] = f"simulated; no report: the gateway does not serve {REPORT_PATH} yet"
            return out
        t0 = time.monotonic()
        want = sim["counts"]["x_t"] + sim["counts"]["x_c"]
        rep = await _settle(api, cid, lambda t: int(t.get("converted", 0)) >= want, timeout)
        timings["report"] = round(time.monotonic() - t0, 2)
        out.update(_judge(rep, sim))
        return out


async def _define(api: Api, cid: str, oid: str, audience: dict[str, Any], model: Model) -> None:
    """The offer (with a link) and the batch campaign (control group, conversion rule),
    activated."""
    await api.put(
        f"/v1/offers/{oid}",
        {
            "name": "Roaming pack",
            "value": 4.0,
            "link": f"https://shop.example.com/roaming?offer={oid}",
            "content": {
                "default": {"title": "Roaming pack", "body": "Hi {{ attributes.first_name }}"},
                "email": {
                    "subject": "Your roaming pack, {{ attributes.first_name }}",
                    "text": "Travel without bill shock: https://shop.example.com/roaming",
                    "html": '<p>Travel without bill shock: <a href="https://shop.example.com'
                    '/roaming">book it</a></p>',
                },
            },
        },
    )
    await api.put(
        f"/v1/campaigns/{cid}",
        {
            "name": f"Scenario {cid}: roaming pack",
            "type": "batch",
            "audience": audience,
            "channels": ["email"],
            "treatments": [{"id": "A", "offer": oid, "weight": 1}],
            "control_group": model.control_group,
            "reentry": {"max": 1, "per": "30d"},
            "conversion": {"event": CONVERSION_EVENT, "within": "3d"},
            "approval_required": False,
        },
    )
    await api.activate(cid)


async def _groups(
    api: Api,
    cid: str,
    run: dict[str, Any],
    in_audience: list[str],
    *,
    feedback: bool,
    since: datetime,
    timeout: float,
) -> tuple[list[Contact], str]:
    """Who is target and who control, and which targets' messages went out, once they have.

    With feedback, from its records (the report's totals to wait, then the contact history
    export, else each customer's 360° view): that works with any provider. Without it, from dispatch's local outbox: a
    target is a message there, and when the run suppressed nobody the rest of the audience
    is the control group."""
    dispatched = int(run["dispatched"])
    if feedback:
        expected = int(run["control"]) + dispatched
        await _settle(
            api,
            cid,
            lambda t: int(t.get("targeted", 0)) + int(t.get("control", 0)) >= expected,
            timeout,
        )
        await _settle(
            api,
            cid,
            lambda t: (
                sum(int(t.get(k, 0)) for k in ("delivered", "failed", "bounced", "expired"))
                >= dispatched
            ),
            timeout,
        )
        if await api.serves(EXPORT_PATH):
            contacts = await api.exported_contacts(cid, since)
            source = "feedback: the contact history export"
        else:
            found = await _gather(lambda c: api.contacts(c, cid), in_audience, 16)
            contacts = [c for cs in found for c in cs]
            source = "feedback: the 360° view"
        if len(contacts) != expected:
            raise ScenarioError(f"{source} has {len(contacts)} of {expected} contacts")
        return contacts, source
    if not await api.serves(OUTBOX_PATH):
        raise Unavailable(f"the gateway serves neither {REPORT_PATH} nor {OUTBOX_PATH}")
    if sum((run.get("suppressed") or {}).values()) or int(run["selected"]) != len(in_audience):
        raise Unavailable("the run suppressed customers: only feedback tells control apart")
    items: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Read from the start each time: a message is listed under the sequence number it
        # got on intake, once sent, so a cursor kept between reads would skip the ones sent
        # after it passed them (and would miss their delivery).
        after, items = 0, {}
        while True:
            page, nxt = await api.outbox(cid, after)
            items.update({i["customer_id"]: i for i in page})
            if nxt == after:
                break
            after = nxt
        pending = [i for i in items.values() if i.get("delivered_at") is None]
        if len(items) >= dispatched and not pending:
            break
        await asyncio.sleep(1.0)
    if not items:
        raise Unavailable("no message of the campaign in the local outbox (providers set?)")
    contacts = [
        Contact(
            i["customer_id"],
            i["tracking_id"],
            False,
            "delivered" if i.get("delivered_at") else "queued",
            sorted(set(CLICK_PATH.findall(orjson.dumps(i.get("content")).decode()))),
        )
        for i in items.values()
    ]
    contacts += [Contact(c, None, True, "control") for c in in_audience if c not in items]
    if len(contacts) - len(items) != int(run["control"]):
        raise ScenarioError(
            f"the outbox holds {len(items)} of {dispatched} messages after {timeout:.0f}s"
        )
    return contacts, "dispatch: the local outbox and the audience"


async def _simulate(
    api: Api,
    contacts: list[Contact],
    people: list[dict[str, Any]],
    model: Model,
    seed: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Clicks and conversions with the model's probabilities; the counts and the truth."""
    rng = random.Random(seed * 1_000_003 + 1)
    by_customer = {c.customer_id: c for c in contacts}
    targets = [c for c in contacts if not c.control]
    control = [c for c in contacts if c.control]
    received = [c for c in targets if c.status in RECEIVED]

    t0 = time.monotonic()
    clicks = {"link": 0, "link_failed": 0, "response": 0, "not_recorded": 0}
    clickers = [c for c in received if rng.random() < model.click]
    can_respond = await api.serves(RESPONSES_PATH)

    waits: dict[str, list[float]] = {"message_view": [], "link": [], "response": []}

    async def timed(kind: str, call: Awaitable[Any]) -> Any:
        t = time.perf_counter()
        try:
            return await call
        finally:
            waits[kind].append(time.perf_counter() - t)

    async def click(c: Contact) -> None:
        assert c.tracking_id is not None
        paths = c.links
        if paths is None:
            paths = await timed("message_view", api.message_links(c.tracking_id))
        if paths:
            if await timed("link", api.follow(paths[0])):
                clicks["link"] += 1
                return
            clicks["link_failed"] += 1  # nothing recorded: the app's way below
        if can_respond:
            await timed("response", api.record_click(c.tracking_id))
            clicks["response"] += 1
        else:
            clicks["not_recorded"] += 1

    await _gather(click, clickers, 32)
    timings["clicks"] = round(time.monotonic() - t0, 2)

    # Everyone converts at the baseline, a target whose message went out at the offer's
    # rate; customers outside the campaign convert too and must not count for it.
    t0 = time.monotonic()
    events: list[dict[str, Any]] = []
    conv = {"target": 0, "control": 0, "not_contacted": 0}
    revenue = {"target": 0.0, "control": 0.0}
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    for p in people:
        pid = p["customer_id"]
        c = by_customer.get(pid)
        offered = c is not None and not c.control and c.status in RECEIVED
        if rng.random() >= (model.with_offer if offered else model.baseline):
            continue
        value = round(rng.uniform(*model.value), 2)
        group = "not_contacted" if c is None else ("control" if c.control else "target")
        conv[group] += 1
        if group != "not_contacted":
            revenue[group] += value
        events.append(
            {
                "type": CONVERSION_EVENT,
                "customer_id": pid,
                "time": now,
                "properties": {"value": value},
            }
        )
    await api.send_events(events)
    timings["conversions"] = round(time.monotonic() - t0, 2)

    n_t, n_c = len(targets), len(control)
    true_t = (
        (len(received) * model.with_offer + (n_t - len(received)) * model.baseline) / n_t
        if n_t
        else 0.0
    )
    truth = true_t - model.baseline
    return {
        "contacts": {"target": n_t, "control": n_c, "received": len(received)},
        "clicks": clicks,
        "click_calls_ms": {k: _pcts(v) for k, v in waits.items() if v},
        "conversions_sent": conv,
        # What the report's uplift must be computed from: the scenario's own tally.
        "counts": {
            "x_t": conv["target"],
            "n_t": n_t,
            "x_c": conv["control"],
            "n_c": n_c,
            "revenue_t": round(revenue["target"], 2),
            "revenue_c": round(revenue["control"], 2),
            "clicked": len(clickers),
        },
        "true": {
            "target_rate": true_t,
            "control_rate": model.baseline,
            "absolute": truth,
            "incremental_revenue": truth * n_t * sum(model.value) / 2,
        },
    }


def _pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "p50": round(xs[len(xs) // 2] * 1000, 1),
        "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 1),
    }


def _judge(rep: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    """The report against the truth and against the scenario's own counts."""
    up = rep.get("uplift") or {}
    totals = rep.get("totals") or {}
    counts = sim["counts"]
    lo, hi = (list(up.get("ci95") or []) + [None, None])[:2]
    truth = sim["true"]["absolute"]
    return {
        "status": "complete",
        "report_totals": totals,
        "estimate": up,
        "counted_as_sent": {
            "targeted": totals.get("targeted") == counts["n_t"],
            "control": totals.get("control") == counts["n_c"],
            "converted": totals.get("converted") == counts["x_t"] + counts["x_c"],
            "clicked": totals.get("clicked") == counts["clicked"],
        },
        "ci95_contains_truth": lo is not None and hi is not None and lo <= truth <= hi,
    }


def summary(res: dict[str, Any]) -> str:
    """A few lines a person reads: the truth against the report."""
    if res.get("status") != "complete":
        return f"scenario {res.get('campaign_id')}: {res.get('status')}"
    t, e = res["true"], res["estimate"]
    nan = float("nan")
    ci = list(e.get("ci95") or [nan, nan])
    c = res["contacts"]
    return "\n".join(
        [
            f"campaign {res['campaign_id']}: {c['target']:,} targets ({c['received']:,} "
            f"received), {c['control']:,} control",
            f"true uplift      {t['absolute']:+.4f}  ({t['target_rate']:.4f} vs "
            f"{t['control_rate']:.4f})",
            f"report estimate  {e.get('absolute', nan):+.4f}  ({e.get('target_rate', nan):.4f}"
            f" vs {e.get('control_rate', nan):.4f}), p = {e.get('p_value', nan):.3g}",
            f"95 % interval    [{ci[0]:+.4f}, {ci[1]:+.4f}]  "
            f"{'contains' if res['ci95_contains_truth'] else 'DOES NOT contain'} the true uplift",
            f"report counts equal what was sent: {res['counted_as_sent']}; clicks: {res['clicks']}",
        ]
    )
