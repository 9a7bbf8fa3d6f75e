"""Redis client factory and key namespacing."""

from __future__ import annotations

from redis.asyncio import Redis


def make_redis(url: str) -> Redis:
    """An asyncio Redis client (hiredis parser when installed) with a connection pool."""
    return Redis.from_url(url, max_connections=200, socket_timeout=5, socket_connect_timeout=5)


class Keys:
    """Builds namespaced keys so parallel suites can share one Redis."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = f"{prefix}:" if prefix else ""

    def profile(self, customer_id: str) -> str:
        return f"{self.prefix}profile:{customer_id}"

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
