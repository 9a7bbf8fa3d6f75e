"""The public tracking links carried in messages (no auth; signed tokens, shared/links.py):
``/t`` click and redirect, ``/o`` open pixel, ``/u`` unsubscribe (a GET only shows a page).

Serving a link reads no database: the token carries the tracking id, the channel and the
target URL. The response is published as ``response.received`` and the stream's ack is
awaited before answering, so a click that was redirected is never lost.
"""

from __future__ import annotations

import base64
import html
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from starlette.responses import HTMLResponse, RedirectResponse, Response

from shared.contracts.bus import Outcome, ResponseReceived
from shared.errors import NotFound, Unavailable
from shared.links import MAX_TOKEN, InvalidLink, Kind, Link, LinkSigner, signer_from
from shared.service import Runtime, runtime

log = logging.getLogger("kairos.gateway.links")
router = APIRouter(tags=["links"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Token = Annotated[str, Path(max_length=MAX_TOKEN, description="A signed link token")]
PUBLIC: dict[str, Any] = {"security": []}
BAD_TOKEN: dict[int | str, dict[str, Any]] = {
    404: {"description": "A forged, truncated or foreign token (problem+json)"}
}
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = {"cache-control": "no-store, max-age=0", "pragma": "no-cache"}
PUBLISH_TIMEOUT_S = 2.0


def _signer(rt: Runtime) -> LinkSigner:
    signer: LinkSigner | None = rt.extras.get("link_signer")
    if signer is None:
        signer = rt.extras["link_signer"] = signer_from(rt.settings)
    return signer


def _verify(rt: Runtime, kind: Kind, token: str) -> Link:
    try:
        return _signer(rt).verify(kind, token)
    except InvalidLink as exc:
        # Forged, truncated or made for another kind of link: nothing to say about which.
        raise NotFound("This link is not valid.") from exc


async def _record(rt: Runtime, link: Link, outcome: Outcome) -> None:
    msg = ResponseReceived(
        tracking_id=link.tracking_id,
        outcome=outcome,
        channel=link.channel,
        link=link.url if outcome == "clicked" else None,
        source="link",
    )
    try:
        subject, ev = msg.to_event(source="kairos/gateway")
        await rt.bus.js.publish(
            rt.bus.subject(subject),
            ev.to_bytes(),
            headers=rt.bus.headers_for(ev.id),
            timeout=PUBLISH_TIMEOUT_S,
        )
    except Exception as exc:
        log.warning("recording %s for %s failed: %r", outcome, link.tracking_id, exc)
        raise Unavailable("The link could not be recorded; try again shortly.") from exc


@router.get(
    "/t/{token}",
    status_code=302,
    openapi_extra=PUBLIC,
    response_class=RedirectResponse,
    responses=BAD_TOKEN,
)
async def click(token: Token, rt: RuntimeDep) -> Response:
    """Record a click and redirect to the link's target."""
    link = _verify(rt, "t", token)
    if not link.url:
        raise NotFound("This link has no target.")
    await _record(rt, link, "clicked")
    return RedirectResponse(link.url, status_code=302, headers=NO_STORE)


@router.get(
    "/o/{token}",
    openapi_extra=PUBLIC,
    response_class=Response,
    responses={200: {"content": {"image/gif": {}}}, **BAD_TOKEN},
)
async def opened(token: Token, rt: RuntimeDep) -> Response:
    """The e-mail open pixel: a 1×1 GIF that records ``opened``."""
    link = _verify(rt, "o", token)
    await _record(rt, link, "opened")
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif;max-width:32em;margin:3em auto'>{body}</body></html>"
    )


@router.get("/u/{token}", openapi_extra=PUBLIC, response_class=HTMLResponse, responses=BAD_TOKEN)
async def unsubscribe_page(token: Token, rt: RuntimeDep) -> HTMLResponse:
    """A page with a confirm button; changes nothing (mail scanners prefetch links)."""
    link = _verify(rt, "u", token)
    what = html.escape(link.channel or "these")
    body = (
        f"<h1>Unsubscribe</h1><p>Stop receiving {what} messages from us?</p>"
        "<form method=post><button type=submit name=List-Unsubscribe value=One-Click>"
        "Unsubscribe</button></form>"
    )
    return HTMLResponse(_page("Unsubscribe", body), headers=NO_STORE)


@router.post("/u/{token}", openapi_extra=PUBLIC, response_class=HTMLResponse, responses=BAD_TOKEN)
async def unsubscribe(token: Token, rt: RuntimeDep) -> HTMLResponse:
    """Withdraw the consent of the link's channel (the button, or RFC 8058 one-click)."""
    link = _verify(rt, "u", token)
    await _record(rt, link, "unsubscribed")
    what = html.escape(link.channel or "these")
    body = f"<h1>Unsubscribed</h1><p>You will not receive {what} messages from us any more.</p>"
    return HTMLResponse(_page("Unsubscribed", body), headers=NO_STORE)
