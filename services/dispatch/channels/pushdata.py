"""What the three push providers (APNs, FCM, Web Push) put in a notification alike: the visible
text, the custom data the app reads to report the click, and times in the forms they want."""

from __future__ import annotations

import datetime
import time

from services.dispatch.channels.base import Outgoing

# Content keys shown by the operating system; every other key travels as custom data.
VISIBLE = ("title", "subtitle", "body")


def push_data(out: Outgoing) -> dict[str, str]:
    """The custom data of a push: the tracking id, the signed click link, the rest of the
    rendered content (deeplink, image …) — all strings, as FCM requires."""
    request = out.request
    data = {k: str(v) for k, v in request.content.items() if k not in VISIBLE}
    data["tracking_id"] = request.tracking_id
    if request.link:
        # The app opens this link on tap: the gateway records the click and redirects.
        data["click_url"] = out.links.url(
            "t", request.tracking_id, channel="push", url=request.link
        )
    return data


def expires_epoch(expires_at: str | None) -> int | None:
    """Unix seconds of an RFC 3339 expiry, or None."""
    if not expires_at:
        return None
    moment = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def ttl_seconds(expires_at: str | None, *, default: int, now: float | None = None) -> int:
    """Seconds the push service may keep the message: until ``expires_at``, never negative."""
    epoch = expires_epoch(expires_at)
    if epoch is None:
        return default
    return max(0, epoch - int(now if now is not None else time.time()))


def rfc3339_from_epoch(value: object) -> str | None:
    """An RFC 3339 time from a provider's epoch timestamp, in seconds or milliseconds (APNs
    documents milliseconds; some gateways send seconds)."""
    try:
        number = float(str(value))
    except ValueError:
        return None
    if number > 1e11:  # more than year 5138 in seconds: it is milliseconds
        number /= 1000.0
    moment = datetime.datetime.fromtimestamp(number, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
