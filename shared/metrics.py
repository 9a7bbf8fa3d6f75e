"""Gauges read when Prometheus scrapes: JetStream consumer lag and dispatch's send backlog.

They are what the autoscalers and the alerts act on (k8s/components), so they are sampled at
scrape time rather than kept up to date on the hot path: ``/metrics`` awaits ``sample``
before it renders. A process adds its own samplers with ``add_sampler``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import Gauge

if TYPE_CHECKING:
    from shared.bus import Consumer
    from shared.service import Runtime

log = logging.getLogger("kairos.metrics")

CONSUMER_LAG = Gauge(
    "kairos_consumer_lag_messages",
    "Messages a durable JetStream consumer has not acknowledged yet: not yet delivered plus "
    "delivered and unacknowledged (the lag KEDA's nats-jetstream scaler counts)",
    ["stream", "consumer"],
)
DISPATCH_BACKLOG = Gauge(
    "kairos_dispatch_backlog_messages",
    "Messages waiting in dispatch's send queue (queued, or in doubt and to be sent again)",
    ["channel"],
)

Sampler = Callable[[], Awaitable[None]]
SAMPLE_TIMEOUT_S = 2.0  # a scrape never waits longer than this on a dependency
MIN_INTERVAL_S = 1.0  # several scrapers at once sample once
_SAMPLERS = "metrics.samplers"
_STATE = "metrics.last_sample"


def add_sampler(rt: Runtime, sampler: Sampler) -> None:
    """Run ``sampler`` (it sets gauges) before every scrape of this process's /metrics."""
    rt.extras.setdefault(_SAMPLERS, []).append(sampler)


async def sample(rt: Runtime) -> None:
    """Refresh every gauge of this process; a sampler that fails or is slow is logged and its
    series are left out, never made up."""
    now = time.monotonic()
    if now - rt.extras.get(_STATE, -MIN_INTERVAL_S) < MIN_INTERVAL_S:
        return
    rt.extras[_STATE] = now
    samplers: list[Sampler] = [lambda: _consumer_lag(rt), *rt.extras.get(_SAMPLERS, [])]
    results = await asyncio.gather(
        *(asyncio.wait_for(s(), SAMPLE_TIMEOUT_S) for s in samplers), return_exceptions=True
    )
    for res in results:
        if isinstance(res, BaseException):
            log.warning("metrics sampler failed: %r", res)


async def _consumer_lag(rt: Runtime) -> None:
    if not rt.consumers or not rt.bus.is_connected():
        for c in rt.consumers:
            _forget(c)
        return
    await asyncio.gather(*(_one_lag(rt, c) for c in rt.consumers))


async def _one_lag(rt: Runtime, c: Consumer) -> None:
    try:
        info = await rt.bus.js.consumer_info(rt.bus.stream(c.stream), rt.bus.durable(c.name))
    except Exception as exc:  # gone (an idle per-instance consumer) or NATS unreachable
        log.debug("consumer %s: no lag (%r)", c.name, exc)
        _forget(c)
        return
    lag = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    CONSUMER_LAG.labels(c.stream, c.name).set(lag)


def _forget(c: Consumer) -> None:
    try:
        CONSUMER_LAG.remove(c.stream, c.name)
    except KeyError:
        pass


_backlog_seen: set[str] = set()


def set_backlog(counts: dict[str, int], channels: tuple[str, ...]) -> None:
    """Dispatch's backlog by channel; a channel with nothing waiting (any more) reports 0."""
    _backlog_seen.update(channels, counts)
    for channel in sorted(_backlog_seen):
        DISPATCH_BACKLOG.labels(channel).set(counts.get(channel, 0))
