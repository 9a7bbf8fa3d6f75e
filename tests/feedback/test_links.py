"""The public links through real HTTP: a click redirects and is recorded, the open pixel,
an unsubscribe page that changes nothing until its button withdraws the consent, and
forged, truncated or foreign tokens answered 404."""

from __future__ import annotations

import httpx

from shared.bus import Bus
from shared.links import LinkSigner
from shared.stack import Stack
from tests.feedback.conftest import contact, history, publish, report, stored, uid
from tests.helpers import eventually


async def test_click_redirects_and_counts_per_link(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, signer: LinkSigner
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    c = contact(cust, cmp, channel="email", treatment="A")
    await publish(bus, c)
    await stored(gw, stack, cust, 1)
    offer = f"https://example.com/offer?id={uid()}"
    terms = "https://example.com/terms"

    async with httpx.AsyncClient(follow_redirects=False) as public:  # no API key
        for url in (offer, offer, terms):
            r = await public.get(signer.url("t", c.tracking_id, channel="email", url=url))
            assert r.status_code == 302, r.text
            assert r.headers["location"] == url

    rep = await eventually(
        lambda: report(gw, cmp), lambda r: r["clicks_by_link"] == {offer: 1, terms: 1}
    )
    # Clicked counts the message once; each link counts once per message.
    assert rep["totals"]["clicked"] == 1
    h = await history(gw, stack, cust)
    assert [(x["tracking_id"], x["outcome"]) for x in h["responses"]] == [
        (c.tracking_id, "clicked")
    ]


async def test_open_pixel(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, signer: LinkSigner
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    c = contact(cust, cmp, channel="email")
    await publish(bus, c)
    await stored(gw, stack, cust, 1)
    async with httpx.AsyncClient() as public:
        r = await public.get(signer.url("o", c.tracking_id, channel="email"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/gif"
    assert "no-store" in r.headers["cache-control"]
    assert r.content.startswith(b"GIF89a") and len(r.content) < 100
    rep = await eventually(lambda: report(gw, cmp), lambda r: r["totals"]["opened"] == 1)
    assert rep["by_channel"]["email"]["opened"] == 1


async def _consents(gw: httpx.AsyncClient, cust: str) -> dict[str, bool]:
    r = await gw.get(f"/v1/customers/{cust}")
    assert r.status_code == 200, r.text
    consents: dict[str, bool] = r.json()["consents"]
    return consents


async def test_unsubscribe_needs_the_button(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, signer: LinkSigner
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    r = await gw.put(
        f"/v1/customers/{cust}",
        json={"attributes": {}, "tags": [], "consents": {"email": True, "sms": True}},
    )
    assert r.status_code == 200, r.text
    c = contact(cust, cmp, channel="email")
    await publish(bus, c)
    await stored(gw, stack, cust, 1)
    url = signer.url("u", c.tracking_id, channel="email")

    async with httpx.AsyncClient() as public:
        page = await public.get(url)  # what a mail scanner's prefetch does
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "<form method=post" in page.text
        # One-click (RFC 8058) as a mail client sends it.
        done = await public.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert done.status_code == 200 and "Unsubscribed" in done.text

    consents = await eventually(lambda: _consents(gw, cust), lambda c: c.get("email") is False)
    assert consents["sms"] is True
    rep = await report(gw, cmp)
    assert rep["totals"]["unsubscribed"] == 1
    # The 360° view shows the contact with its status and the response, from feedback.
    view = (await gw.get(f"/v1/customers/{cust}")).json()
    assert view["missing"] == []
    assert [(x["tracking_id"], x["status"], x["channel"]) for x in view["contacts"]] == [
        (c.tracking_id, "offered", "email")
    ]
    assert [(x["tracking_id"], x["outcome"]) for x in view["responses"]] == [
        (c.tracking_id, "unsubscribed")
    ]


async def test_get_alone_changes_nothing(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, signer: LinkSigner
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    r = await gw.put(
        f"/v1/customers/{cust}", json={"attributes": {}, "tags": [], "consents": {"email": True}}
    )
    assert r.status_code == 200
    c = contact(cust, cmp, channel="email")
    await publish(bus, c)
    await stored(gw, stack, cust, 1)
    async with httpx.AsyncClient() as public:
        for _ in range(3):
            assert (
                await public.get(signer.url("u", c.tracking_id, channel="email"))
            ).status_code == 200
    # A later open proves the pipeline moved past anything the GETs could have published.
    async with httpx.AsyncClient() as public:
        await public.get(signer.url("o", c.tracking_id, channel="email"))
    await eventually(lambda: report(gw, cmp), lambda r: r["totals"]["opened"] == 1)
    assert (await report(gw, cmp))["totals"]["unsubscribed"] == 0
    assert (await _consents(gw, cust))["email"] is True
    assert [x["outcome"] for x in (await history(gw, stack, cust))["responses"]] == ["opened"]


async def test_forged_truncated_and_foreign_tokens_are_404(
    stack: Stack, signer: LinkSigner
) -> None:
    base = stack.url("gateway")
    good = signer.token("t", "trk-x", channel="email", url="https://example.com")
    body, mac = good.split(".")
    other = LinkSigner("another-secret", base).token("t", "trk-x", url="https://evil.example")
    bad = [
        f"/t/{body}.{mac[:-2]}",  # truncated MAC
        f"/t/{body[:-3]}.{mac}",  # truncated payload
        f"/t/{body}.{'A' * len(mac)}",  # forged MAC
        f"/t/{other}",  # signed with another secret
        f"/t/{signer.token('u', 'trk-x', channel='email')}",  # an unsubscribe token
        f"/o/{good}",  # a click token as a pixel
        f"/u/{good}",
        "/t/not-a-token",
        "/t/a.b.c",
        "/t/%00%ff.%ff",
    ]
    async with httpx.AsyncClient(base_url=base, follow_redirects=False) as public:
        for path in bad:
            r = await public.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        r = await public.post(f"/u/{good}")
        assert r.status_code == 404
