"""The push providers against their loopback protocol peers: what reaches Apple, Google and a
browser's push service, and how every documented answer is classified."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hpack import Decoder

from services.dispatch.channels import apns, fcm, webpush
from services.dispatch.channels.base import Outgoing
from services.dispatch.channels.h2client import RequestHeaders
from shared.contracts.bus import Device, DispatchRequested
from shared.embedded import free_port
from shared.links import LinkSigner
from shared.settings import Settings
from tests.peers import apns as apns_peer_mod
from tests.peers import fcm as fcm_peer_mod
from tests.peers import webpush as webpush_peer_mod

LINKS = LinkSigner("push-test-link-secret-0123456789", "https://k.example.com")
EXPIRES = datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _settings(env: dict[str, str], **more: Any) -> Settings:
    return Settings(**{k.removeprefix("KAIROS_").lower(): v for k, v in env.items()}, **more)


def _out(
    platform: str,
    token: str,
    *,
    lane: str = "realtime",
    tracking_id: str | None = None,
    content: dict[str, str] | None = None,
) -> Outgoing:
    request = DispatchRequested(
        tracking_id=tracking_id or "trk-" + secrets.token_hex(6),
        idempotency_key="idem-" + secrets.token_hex(6),
        customer_id="cust-1",
        campaign_id="spring-sale",
        channel="push",
        content=content or {"title": "Spring sale", "body": "20 % off", "deeplink": "app://s"},
        link="https://shop.example.com/spring",
        lane=lane,  # type: ignore[arg-type]
        expires_at=EXPIRES.isoformat().replace("+00:00", "Z"),
    )
    return Outgoing(request, LINKS, device=Device(platform=platform, token=token))  # type: ignore[arg-type]


def _ios() -> str:
    return secrets.token_hex(32)


def _click(data: dict[str, Any], out: Outgoing) -> None:
    """The custom data carries the tracking id and a signed click link to the offer."""
    assert data["tracking_id"] == out.request.tracking_id
    link = LINKS.verify("t", data["click_url"].rsplit("/", 1)[-1])
    assert (link.tracking_id, link.channel, link.url) == (
        out.request.tracking_id,
        "push",
        out.request.link,
    )
    assert data["deeplink"] == "app://s"


# -- APNs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apns_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[apns_peer_mod.ApnsPeer]:
    peer = apns_peer_mod.start(tmp_path_factory.mktemp("apns"))
    yield peer
    peer.stop()


@pytest.fixture
async def apns_client(apns_peer: apns_peer_mod.ApnsPeer) -> AsyncIterator[apns.ApnsProvider]:
    provider = apns.from_settings(_settings(apns_peer.env, apns_connections=4))
    assert provider is not None
    await provider.start()
    yield provider
    await provider.close()


def _seen(peer: Any, token: str) -> list[Any]:
    return [r for r in peer.received if r.token == token]


async def test_apns_alert_headers_and_payload_per_lane(
    apns_peer: apns_peer_mod.ApnsPeer, apns_client: apns.ApnsProvider
) -> None:
    token = _ios()
    now, later = _out("ios", token), _out("ios", token, lane="batch")
    first = await apns_client.send(now)
    again = await apns_client.send(now)  # a retry of the same message
    batch = await apns_client.send(later)
    assert (first.kind, again.kind, batch.kind) == ("sent", "sent", "sent")
    seen = _seen(apns_peer, token)
    assert [r.status for r in seen] == [200, 200, 200]
    h = seen[0].headers
    assert h["apns-topic"] == apns_peer_mod.TOPIC
    assert h["apns-push-type"] == "alert"
    assert h["apns-expiration"] == str(int(EXPIRES.timestamp()))
    assert h["apns-collapse-id"] == "spring-sale"
    assert [r.headers["apns-priority"] for r in seen] == ["10", "10", "5"]
    # apns-id: stable across retries of one message, another for another message.
    assert first.provider_id == again.provider_id == h["apns-id"]
    assert batch.provider_id == seen[2].headers["apns-id"] != first.provider_id
    payload = seen[0].payload
    assert payload["aps"]["alert"] == {"title": "Spring sale", "body": "20 % off"}
    _click(payload, now)


@pytest.mark.parametrize(
    ("status", "reason", "extra", "expected"),
    [
        (
            410,
            "Unregistered",
            {"timestamp": 1700000000123},
            {"kind": "token_invalid", "token_invalid_since": "2023-11-14T22:13:20.123Z"},
        ),
        (
            410,
            "Unregistered",
            {"timestamp": 1700000000},
            {"kind": "token_invalid", "token_invalid_since": "2023-11-14T22:13:20.000Z"},
        ),
        (410, "ExpiredToken", {}, {"kind": "token_invalid", "token_invalid_since": None}),
        (400, "BadDeviceToken", {}, {"kind": "token_invalid"}),
        (403, "InvalidProviderToken", {}, {"kind": "failed"}),
        (429, "TooManyRequests", {"retry_after": 7}, {"kind": "retry", "throttled": True}),
        (429, "TooManyProviderTokenUpdates", {}, {"kind": "retry", "throttled": True}),
        (500, "InternalServerError", {}, {"kind": "retry", "throttled": False}),
        (503, "ServiceUnavailable", {"retry_after": 3}, {"kind": "retry", "retry_after": 3.0}),
        (400, "BadCollapseId", {}, {"kind": "failed"}),
        (400, "TopicDisallowed", {}, {"kind": "failed"}),
        (413, "PayloadTooLarge", {}, {"kind": "failed"}),
    ],
)
async def test_apns_answers_are_classified(
    apns_peer: apns_peer_mod.ApnsPeer,
    apns_client: apns.ApnsProvider,
    status: int,
    reason: str,
    extra: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    token = _ios()
    apns_peer.answer(token, status, reason, **extra)
    result = await apns_client.send(_out("ios", token))
    assert result.reason == reason
    assert result.answer["status"] == status
    for field, value in expected.items():
        assert getattr(result, field) == value, field
    if reason == "TooManyRequests":
        assert result.retry_after == 7.0
    assert len(_seen(apns_peer, token)) == 1  # classified without a second attempt


async def test_apns_one_provider_token_for_all_connections(
    apns_peer: apns_peer_mod.ApnsPeer, apns_client: apns.ApnsProvider
) -> None:
    tokens = [_ios() for _ in range(300)]
    results = await asyncio.gather(*(apns_client.send(_out("ios", t)) for t in tokens))
    assert {r.kind for r in results} == {"sent"}
    seen = [r for r in apns_peer.received if r.token in set(tokens)]
    assert len({r.connection for r in seen}) == 4  # KAIROS_APNS_CONNECTIONS
    assert len({r.jwt for r in seen}) == 1
    assert apns_client.token.minted == 1


async def test_apns_renews_the_token_once_after_expired_provider_token(
    apns_peer: apns_peer_mod.ApnsPeer, apns_client: apns.ApnsProvider
) -> None:
    assert (await apns_client.send(_out("ios", _ios()))).kind == "sent"
    apns_peer.expire_tokens()  # as if the token were over an hour old
    tokens = [_ios() for _ in range(50)]
    results = await asyncio.gather(*(apns_client.send(_out("ios", t)) for t in tokens))
    assert {r.kind for r in results} == {"sent"}
    seen = [r for r in apns_peer.received if r.token in set(tokens)]
    refused = [r for r in seen if r.status == 403]
    assert refused and {r.reason for r in refused} == {"ExpiredProviderToken"}
    # Each refused send was retried at once with the one new token all sends share.
    assert len([r for r in seen if r.status == 200]) == 50
    assert len({r.jwt for r in seen if r.status == 200}) == 1
    assert apns_client.token.minted == 2


async def test_apns_foreign_key_fails_with_an_actionable_log(
    apns_peer: apns_peer_mod.ApnsPeer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(apns_peer.env)
    provider = apns.ApnsProvider(
        url=apns_peer.url,
        key=ec.generate_private_key(ec.SECP256R1()),  # not the key Apple knows for this kid
        key_id=apns_peer_mod.KEY_ID,
        team_id=apns_peer_mod.TEAM_ID,
        topic=apns_peer_mod.TOPIC,
        ca_file=settings.apns_ca_file,
    )
    with caplog.at_level(logging.ERROR, logger=apns.__name__):
        result = await provider.send(_out("ios", _ios()))
    await provider.close()
    assert (result.kind, result.reason) == ("failed", "InvalidProviderToken")
    assert "KAIROS_APNS_KEY_ID" in caplog.text and "KAIROS_APNS_TEAM_ID" in caplog.text


async def test_apns_payload_over_4096_bytes_is_refused_unsent(
    apns_peer: apns_peer_mod.ApnsPeer, apns_client: apns.ApnsProvider
) -> None:
    token = _ios()
    out = _out("ios", token, content={"title": "Long", "body": "x" * 4100})
    result = await apns_client.send(out)
    assert (result.kind, result.reason) == ("failed", "PayloadTooLarge")
    assert _seen(apns_peer, token) == []


async def test_apns_reconnects_after_goaway(
    apns_peer: apns_peer_mod.ApnsPeer, apns_client: apns.ApnsProvider
) -> None:
    assert (await apns_client.send(_out("ios", _ios()))).kind == "sent"
    opened = apns_peer.connections
    apns_peer.goaway()  # Apple retires connections from time to time
    results = await asyncio.gather(*(apns_client.send(_out("ios", _ios())) for _ in range(20)))
    assert {r.kind for r in results} == {"sent"}
    assert apns_peer.connections > opened
    assert apns_client.token.minted == 1  # new connections, the same provider token


async def test_apns_unreachable_is_a_retry(apns_peer: apns_peer_mod.ApnsPeer) -> None:
    env = {**apns_peer.env, "KAIROS_APNS_URL": f"https://127.0.0.1:{free_port()}"}
    provider = apns.from_settings(_settings(env))
    assert provider is not None
    await provider.start()  # logs, does not raise: sends reconnect
    result = await provider.send(_out("ios", _ios()))
    await provider.close()
    assert result.kind == "retry"


def test_request_headers_decode_as_sent() -> None:
    """Our HPACK encoder's blocks decode to the headers given, across token changes and a
    smaller table announced by the server (a stock decoder keeps the table state)."""
    encoder, decoder = RequestHeaders(), Decoder()
    blocks = []
    for token in (
        b"bearer one",
        b"bearer one",
        b"bearer two",
        b"bearer one",
        b"bearer " + b"x" * 300,
    ):
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"api.push.apple.com"),
            (b":path", b"/3/device/" + secrets.token_hex(32).encode()),
            (b"authorization", token),
            (b"apns-topic", b"com.example.app"),
            (b"apns-id", str(uuid.uuid4()).encode()),
        ]
        blocks.append((headers, encoder.encode(headers)))
    for headers, block in blocks:
        assert decoder.decode(block, raw=True) == headers
    encoder.header_table_size = 256  # the server's SETTINGS_HEADER_TABLE_SIZE
    decoder.max_allowed_table_size = 256
    for headers in (blocks[-1][0], blocks[-1][0], blocks[0][0], blocks[0][0]):
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
    assert len(blocks[1][1]) < len(blocks[0][1]) - 5  # the repeated token is one byte


def test_apns_not_configured_and_half_configured() -> None:
    assert apns.from_settings(Settings(apns_url=None)) is None
    with pytest.raises(ValueError, match="KAIROS_APNS_KEY_FILE"):
        apns.from_settings(Settings(apns_url="https://api.push.apple.com", apns_key_file=None))


# -- FCM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fcm_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fcm_peer_mod.FcmPeer]:
    peer = fcm_peer_mod.start(tmp_path_factory.mktemp("fcm"))
    yield peer
    peer.stop()


@pytest.fixture
async def fcm_client(fcm_peer: fcm_peer_mod.FcmPeer) -> AsyncIterator[fcm.FcmProvider]:
    provider = fcm.from_settings(_settings(fcm_peer.env))
    assert provider is not None
    await provider.start()
    yield provider
    await provider.close()


async def test_fcm_message_per_lane_and_one_access_token(
    fcm_peer: fcm_peer_mod.FcmPeer, fcm_client: fcm.FcmProvider
) -> None:
    before = fcm_peer.token_requests
    token = "fcm-" + secrets.token_hex(8)
    outs = [_out("android", token) for _ in range(20)] + [_out("android", token, lane="batch")]
    results = await asyncio.gather(*(fcm_client.send(o) for o in outs))
    assert {r.kind for r in results} == {"sent"}
    assert all(r.provider_id and r.provider_id.startswith("projects/") for r in results)
    assert fcm_peer.token_requests - before == 1  # one token for 21 concurrent sends
    seen = _seen(fcm_peer, token)
    assert sorted(r.payload["android"]["priority"] for r in seen) == ["HIGH"] * 20 + ["NORMAL"]
    message = seen[0].payload
    assert message["notification"] == {"title": "Spring sale", "body": "20 % off"}
    ttl = int(message["android"]["ttl"].removesuffix("s"))
    expected = EXPIRES.timestamp() - datetime.datetime.now(datetime.UTC).timestamp()
    assert abs(ttl - expected) < 60
    assert message["android"]["collapse_key"] == "spring-sale"
    by_tracking = {o.request.tracking_id: o for o in outs}
    _click(message["data"], by_tracking[message["data"]["tracking_id"]])


async def test_fcm_refreshes_the_token_once_on_401(
    fcm_peer: fcm_peer_mod.FcmPeer, fcm_client: fcm.FcmProvider
) -> None:
    assert (await fcm_client.send(_out("android", "fcm-a"))).kind == "sent"
    assert fcm_client.token.fetched == 1
    fcm_peer.revoke_tokens()
    results = await asyncio.gather(*(fcm_client.send(_out("android", "fcm-b")) for _ in range(5)))
    assert {r.kind for r in results} == {"sent"}
    assert fcm_client.token.fetched == 2


@pytest.mark.parametrize(
    ("status", "code", "extra", "expected"),
    [
        (404, "UNREGISTERED", {}, {"kind": "token_invalid"}),
        (400, "INVALID_ARGUMENT", {}, {"kind": "failed"}),
        (
            429,
            "QUOTA_EXCEEDED",
            {"retry_after": 30},
            {"kind": "retry", "throttled": True, "retry_after": 30.0},
        ),
        (503, "UNAVAILABLE", {"retry_after": 5}, {"kind": "retry", "retry_after": 5.0}),
        (500, "INTERNAL", {}, {"kind": "retry", "throttled": False}),
        (403, "SENDER_ID_MISMATCH", {}, {"kind": "failed"}),
        (401, "THIRD_PARTY_AUTH_ERROR", {}, {"kind": "failed"}),
    ],
)
async def test_fcm_errors_are_classified(
    fcm_peer: fcm_peer_mod.FcmPeer,
    fcm_client: fcm.FcmProvider,
    status: int,
    code: str,
    extra: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    token = "fcm-" + secrets.token_hex(8)
    fcm_peer.answer(token, status, code, **extra)
    result = await fcm_client.send(_out("android", token))
    assert result.reason == code
    for field, value in expected.items():
        assert getattr(result, field) == value, field
    assert len(_seen(fcm_peer, token)) == 1  # no refresh-and-retry for these
    assert fcm_client.token.fetched == 1


async def test_fcm_refused_service_account_fails(
    fcm_peer: fcm_peer_mod.FcmPeer, tmp_path: Path
) -> None:
    settings = _settings(fcm_peer.env)
    assert settings.fcm_credentials_file is not None
    doc = json.loads(settings.fcm_credentials_file.read_text())
    provider = fcm.FcmProvider(  # a key the token endpoint does not know for this account
        url=fcm_peer.url, credentials=doc, key=rsa.generate_private_key(65537, 2048)
    )
    result = await provider.send(_out("android", "fcm-c"))
    await provider.close()
    assert (result.kind, result.reason) == ("failed", "CredentialsRefused")


# -- Web Push -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webpush_peer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[webpush_peer_mod.WebPushPeer]:
    peer = webpush_peer_mod.start(tmp_path_factory.mktemp("webpush"))
    yield peer
    peer.stop()


@pytest.fixture
async def webpush_client(
    webpush_peer: webpush_peer_mod.WebPushPeer,
) -> AsyncIterator[webpush.WebPushProvider]:
    provider = webpush.from_settings(_settings(webpush_peer.env))
    assert provider is not None
    await provider.start()
    yield provider
    await provider.close()


async def test_webpush_encrypted_payload_and_vapid(
    webpush_peer: webpush_peer_mod.WebPushPeer, webpush_client: webpush.WebPushProvider
) -> None:
    sub = webpush_peer.subscription()
    now, later = _out("web", sub), _out("web", sub, lane="batch")
    first, second = await webpush_client.send(now), await webpush_client.send(later)
    assert (first.kind, second.kind) == ("sent", "sent")
    assert first.provider_id and first.provider_id.startswith(webpush_peer.origin)
    seen = _seen(webpush_peer, sub)
    assert [r.status for r in seen] == [201, 201]  # VAPID verified, body decrypted
    assert seen[0].payload == webpush_client.notification(now)
    assert seen[0].payload["title"] == "Spring sale"
    _click(seen[0].payload["data"], now)
    assert [r.headers["Urgency"] for r in seen] == ["high", "normal"]
    ttl = int(seen[0].headers["TTL"])
    assert abs(ttl - (EXPIRES.timestamp() - datetime.datetime.now(datetime.UTC).timestamp())) < 60
    assert seen[0].headers["Content-Encoding"] == "aes128gcm"
    assert seen[0].headers["Topic"] == seen[1].headers["Topic"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (404, "token_invalid"),
        (410, "token_invalid"),
        (413, "failed"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
async def test_webpush_answers_are_classified(
    webpush_peer: webpush_peer_mod.WebPushPeer,
    webpush_client: webpush.WebPushProvider,
    status: int,
    expected: str,
) -> None:
    sub = webpush_peer.subscription()
    webpush_peer.answer(sub, status, retry_after=9)
    result = await webpush_client.send(_out("web", sub))
    assert result.kind == expected
    assert result.answer["status"] == status
    if expected == "retry":
        assert result.retry_after == 9.0
        assert not result.throttled  # one browser's push service, not every one


async def test_webpush_subscription_of_another_server_key_fails(
    webpush_peer: webpush_peer_mod.WebPushPeer, webpush_client: webpush.WebPushProvider
) -> None:
    other = webpush.b64url(os.urandom(65))
    sub = webpush_peer.subscription(application_server_key=other)
    result = await webpush_client.send(_out("web", sub))
    assert (result.kind, result.answer["status"]) == ("failed", 403)


async def test_webpush_malformed_subscription_is_an_invalid_token(
    webpush_peer: webpush_peer_mod.WebPushPeer, webpush_client: webpush.WebPushProvider
) -> None:
    before = len(webpush_peer.received)
    result = await webpush_client.send(_out("web", '{"endpoint": "x"}'))
    assert result.kind == "token_invalid"
    assert len(webpush_peer.received) == before
