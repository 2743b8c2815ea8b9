"""`upstream.auth: token-exchange` with the real Keycloak (RFC 8693): the
FastMCP example wants tokens the realm signed for its own audience
(mcp-upstream-py). The caller's token is never passed on; the gateway's
client exchanges it, once per token, and drops the exchange on logout.
Keycloak stopped: exchanges already made keep working."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from conftest import KC_UPSTREAM_AUDIENCE
from harness import ACCEPT_BOTH, PROTOCOL, legacy_session, post, rpc_error, streamable_session, wait_until

pytestmark = pytest.mark.anyio

ROUTE = "org-1-exchange"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "exchange", "version": "1"}}}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def claims(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def exchanges(gw, result: str = "ok") -> float:
    m = re.search(rf'^ratatosk_auth_token_exchanges_total{{result="{result}"}} (\S+)$', gw.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def dropped(gw) -> float:
    m = re.search(r"^ratatosk_auth_token_exchanges_dropped_total (\S+)$", gw.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


async def whoami(gw, token: str) -> dict:
    async with streamable_session(gw.url(ROUTE), headers=bearer(token)) as s:
        return json.loads((await s.call_tool("whoami", {})).content[0].text)["claims"]


async def test_the_upstream_gets_a_token_addressed_to_it_never_the_callers(auth_gateway, keycloak,
                                                                           exchange_upstream):
    token = keycloak.token("alice")
    own = claims(token)
    # The upstream checks tokens itself: the caller's own is not for it.
    r = httpx2.post(exchange_upstream.url, json=INIT, headers={"Accept": ACCEPT_BOTH, **bearer(token)}, timeout=10)
    assert r.status_code == 401, r.text
    # Without an exchange the gateway has nothing it takes either.
    r = post(auth_gateway.url("org-1-unexchanged"), INIT, version=None, headers=bearer(token))
    assert r.status_code == 502, r.text
    assert "answered HTTP 401" in rpc_error(r)["message"]
    # Through the exchange: the realm's token for the upstream, same user
    # and Keycloak session, requested by the gateway's client.
    got = await whoami(auth_gateway, token)
    assert got["aud"] == KC_UPSTREAM_AUDIENCE
    assert (got["iss"], got["sub"], got["sid"]) == (own["iss"], own["sub"], own["sid"])
    assert got["azp"] == "ratatosk-gateway"
    # An old client (HTTP+SSE, 2024-11-05) bridged to the stateless upstream
    # gets the same exchange.
    async with legacy_session(auth_gateway.url(ROUTE, "sse"), headers=bearer(token)) as s:
        assert (await s.call_tool("add", {"a": 2, "b": 2})).content[0].text == "4"
    # (The test's own direct request above had the caller's token.)
    seen = [h for h in exchange_upstream.seen_headers() if h.get("ratatosk-org") == ROUTE]
    assert seen and all(h["authorization"].startswith("Bearer ") for h in seen), seen
    assert not any(token in h["authorization"] for h in seen), "the caller's token reached the upstream"
    auth_gateway.assert_healthy()


async def test_a_hundred_calls_with_one_token_make_one_exchange(auth_gateway, keycloak):
    token = keycloak.token("alice")
    before = exchanges(auth_gateway)
    # Eight clients start at once with the new token: they race for its
    # exchange, and wait for the one call.
    with ThreadPoolExecutor(8) as pool:
        starts = list(pool.map(lambda _: post(auth_gateway.url(ROUTE), INIT, version=None, headers=bearer(token)),
                               range(8)))
    assert [r.status_code for r in starts] == [200] * 8, [r.text for r in starts]
    assert exchanges(auth_gateway) - before == 1
    async with streamable_session(auth_gateway.url(ROUTE), headers=bearer(token)) as s:
        # Ten at a time (below a session's limit of requests in flight).
        results = []
        for tens in range(0, 100, 10):
            results += await asyncio.gather(*(s.call_tool("add", {"a": i, "b": 1}) for i in range(tens, tens + 10)))
    assert [r.content[0].text for r in results] == [str(i + 1) for i in range(100)]
    assert exchanges(auth_gateway) - before == 1
    # Another token of the same user is another exchange.
    await whoami(auth_gateway, keycloak.token("alice"))
    assert exchanges(auth_gateway) - before == 2


async def test_a_logout_drops_the_exchanged_tokens_of_the_session(auth_gateway, keycloak):
    token = keycloak.token("carol")
    assert (await whoami(auth_gateway, token))["sub"] == claims(token)["sub"]
    before = dropped(auth_gateway)
    keycloak.logout_user("carol")
    # Keycloak posts the logout token to the gateway as the logout ends.
    wait_until("the exchanged token dropped", lambda: dropped(auth_gateway) > before, timeout=10, every=0.1)
    r = post(auth_gateway.url(ROUTE), INIT, version=None, headers=bearer(token))
    assert r.status_code == 401, r.text
    # A new login works, with an exchange of its own.
    made = exchanges(auth_gateway)
    assert (await whoami(auth_gateway, keycloak.token("carol")))["aud"] == KC_UPSTREAM_AUDIENCE
    assert exchanges(auth_gateway) - made == 1


async def test_keycloak_stopped_exchanges_made_keep_working_new_ones_get_503(auth_gateway, keycloak):
    cached = keycloak.token("alice")
    unseen = keycloak.token("alice")
    await whoami(auth_gateway, cached)
    keycloak.stop()
    try:
        # The caller's token verifies locally (jwt mode) and its exchange
        # is cached: served as before.
        got = await whoami(auth_gateway, cached)
        assert got["aud"] == KC_UPSTREAM_AUDIENCE
        # A token never exchanged needs Keycloak: 503, soon, with a wait.
        started = time.monotonic()
        r = post(auth_gateway.url(ROUTE), INIT, version=None, headers=bearer(unseen))
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 8
        assert int(r.headers["retry-after"]) >= 1
        message = rpc_error(r)["message"]
        assert "the identity provider cannot exchange the caller's token now" in message, message
        assert KC_UPSTREAM_AUDIENCE in message, message
        auth_gateway.assert_healthy()
    finally:
        keycloak.start(reuse=True)
    # Back: the same token is exchanged once the pause is over.
    wait_until("an exchange after the outage",
               lambda: post(auth_gateway.url(ROUTE), INIT, version=None, headers=bearer(unseen)).status_code == 200,
               timeout=15, every=0.5)
    auth_gateway.assert_healthy()
