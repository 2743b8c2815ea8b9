"""Keycloak tokens through the gateway, against the real Keycloak started by
keycloak/start with the ratatosk realm (users alice in org-1, bob in org-2,
carol in both)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time

import httpx2
import pytest

from harness import KC_GATEWAY_SECRET, PROTOCOL, claims, post, rpc_error, streamable_session

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "auth-e2e", "version": "1"}}}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def init(gw, org_name: str, token: str | None) -> httpx2.Response:
    return post(gw.url(org_name), INIT, version=None, headers=bearer(token) if token else {})


def session_of(gw, org_name: str, token: str) -> str:
    r = init(gw, org_name, token)
    assert r.status_code == 200, r.text
    return r.headers["mcp-session-id"]


def metric(gw, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", gw.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def metric_sum(gw, name: str, **labels: str) -> float:
    """The sum of a labelled metric's series that carry these labels."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", gw.metrics(), re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forged(header: dict, payload: dict) -> str:
    """A JWT with these parts and a signature no key made."""
    return f"{b64(header)}.{b64(payload)}.{b64({'sig': os.urandom(24).hex()})}"


def test_each_user_reaches_exactly_their_orgs(auth_gateway, keycloak):
    alice, bob, carol = (keycloak.token(u) for u in ("alice", "bob", "carol"))
    expected = {
        (alice, "org-1"): 200, (alice, "org-2"): 403,
        (bob, "org-1"): 403, (bob, "org-2"): 200,
        (carol, "org-1"): 200, (carol, "org-2"): 200,
    }
    for (token, org_name), status in expected.items():
        r = init(auth_gateway, org_name, token)
        assert r.status_code == status, (claims(token)["preferred_username"], org_name, r.text)
        if status == 403:
            err = rpc_error(r)
            assert org_name in err["message"]
            # Not an invalid token: one without this org's privileges.
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
            assert 'scope="organization ratatosk' in r.headers["www-authenticate"]


def test_no_token_gets_401_and_the_metadata_names_the_realm(auth_gateway, keycloak):
    r = init(auth_gateway, "org-1", None)
    assert r.status_code == 401
    assert rpc_error(r)["message"].startswith("no bearer token")
    challenge = r.headers["www-authenticate"]
    url = re.search(r'resource_metadata="([^"]+)"', challenge).group(1)
    # What a registering client may ask Keycloak for (no `openid`, no
    # dynamic `organization:*`: the anonymous registration policy refuses both).
    assert challenge.endswith('scope="organization ratatosk"'), challenge
    doc = httpx2.get(url, timeout=5).json()
    assert doc["scopes_supported"] == ["organization", "ratatosk"]
    assert doc["authorization_servers"] == [keycloak.issuer]
    assert doc["resource"] == auth_gateway.url("org-1")
    # The authorization server's own metadata is where the document says.
    assert httpx2.get(f"{keycloak.issuer}/.well-known/openid-configuration", timeout=5).status_code == 200


def test_rejected_tokens_get_401(auth_gateway, keycloak):
    good = keycloak.token("alice")
    head, payload, sig = good.split(".")
    flipped = f"{head}.{payload}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"
    other_audience = keycloak.token("alice", client="other-audience")
    assert "http://127.0.0.1:8080" not in claims(other_audience).get("aud", [])
    short = keycloak.token("alice", client="mcp-client-short")
    # Wait out the 2-second lifespan of the short token (the gateway allows no clock skew here).
    while time.time() <= claims(short)["exp"] + 0.2:
        time.sleep(0.1)
    cases = {"flipped signature": flipped, "other audience": other_audience, "expired": short,
             "garbage": "this-is-not-a-jwt", "empty-ish": "e30.e30.e30"}
    for org_name in ("org-1", "org-1-introspect"):
        for what, token in cases.items():
            r = init(auth_gateway, org_name, token)
            assert r.status_code == 401, (org_name, what, r.text)
            assert 'error="invalid_token"' in r.headers["www-authenticate"], (org_name, what)
            assert rpc_error(r)["code"] == -32000


def test_malformed_authorization_and_huge_tokens(auth_gateway):
    cases = {
        "Basic YWxpY2U6cHc=": 401,   # another scheme: no bearer token
        "Bearer": 400,               # RFC 6750: a malformed request
        "Bearer a b": 400,
        "Bearer " + "x" * (64 * 1024): 401,  # over identity.max_token_bytes
    }
    for header, status in cases.items():
        r = post(auth_gateway.url("org-1"), INIT, version=None, headers={"Authorization": header})
        assert r.status_code == status, (header[:20], r.status_code, r.text[:200])
        assert rpc_error(r)["message"]
        assert "www-authenticate" in r.headers
    auth_gateway.assert_healthy()


def test_missing_scope_is_403_insufficient_scope(auth_gateway, keycloak):
    r = init(auth_gateway, "org-1-admin", keycloak.token("alice"))
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="organization ratatosk mcp:admin"' in challenge


def test_one_fresh_token_a_thousand_times_makes_one_introspection(auth_gateway, keycloak):
    token = keycloak.token("carol")
    before = metric(auth_gateway, "ratatosk_auth_introspections_total")

    async def flood() -> list[int]:
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx2.AsyncClient(limits=limits, timeout=60) as http:
            async def one() -> int:
                # No session: the request is refused after the token check,
                # without reaching an upstream.
                r = await http.post(auth_gateway.url("org-2-introspect"), json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                    headers={**bearer(token), "Accept": "application/json, text/event-stream",
                                             "MCP-Protocol-Version": PROTOCOL})
                return r.status_code
            return await asyncio.gather(*(one() for _ in range(1000)))

    statuses = asyncio.run(flood())
    assert statuses.count(400) == 1000, {s: statuses.count(s) for s in set(statuses)}
    assert metric(auth_gateway, "ratatosk_auth_introspections_total") - before == 1


# identity.introspection defaults (README): the lane of tokens that cannot be
# verified locally has 4 slots and 20 calls per second (a second's worth at
# once), and a token waits at most 1 s for it.
UNVERIFIED_PER_SECOND = 20
MAX_WAIT = 1.0


def test_a_thousand_junk_tokens_make_a_bounded_number_of_introspections(auth_gateway, keycloak):
    route = auth_gateway.url("org-2-introspect")
    cached = keycloak.token("bob")
    assert init(auth_gateway, "org-2-introspect", cached).status_code == 200
    fresh = keycloak.token("carol")
    real_kid = json.loads(base64.urlsafe_b64decode(cached.split(".")[0] + "==="))["kid"]

    def plausible(i: int) -> dict:
        return {"iss": keycloak.issuer, "sub": f"junk-{i}", "typ": "Bearer", "exp": int(time.time()) + 300,
                "aud": "http://127.0.0.1:8080"}

    # Five kinds of junk, 200 each, all distinct.
    junk = []
    for i in range(200):
        junk.append(f"opaque-junk-{i}-{os.urandom(8).hex()}")
        junk.append(forged({"alg": "RS256", "kid": real_kid}, {**plausible(i), "iss": "http://evil.example"}))
        # Plausible in every way but the signature, by the realm's own key id.
        junk.append(forged({"alg": "RS256", "typ": "JWT", "kid": real_kid}, plausible(i)))
        # Plausible, and not verifiable here: HMAC, or a key id the realm
        # may have just rotated in. These reach the bounded lane.
        junk.append(forged({"alg": "HS512", "typ": "JWT", "kid": f"hmac-{i}"}, plausible(i)))
        junk.append(forged({"alg": "RS256", "typ": "JWT", "kid": f"rotated-{i}"}, plausible(i)))
    assert len(set(junk)) == 1000
    before = metric(auth_gateway, "ratatosk_auth_introspections_total")
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}

    async def flood(other: httpx2.Client) -> tuple[list[httpx2.Response], float, float, float]:
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx2.AsyncClient(limits=limits, timeout=60) as http:
            async def one(token: str) -> httpx2.Response:
                return await http.post(route, json=listing, headers={
                    **bearer(token), "Accept": "application/json, text/event-stream",
                    "MCP-Protocol-Version": PROTOCOL})

            started = time.monotonic()
            tasks = [asyncio.create_task(one(t)) for t in junk]
            # Once junk reaches Keycloak, a new good token and a cached one
            # are asked for.
            deadline = time.monotonic() + 20
            while metric(auth_gateway, "ratatosk_auth_introspections_total") == before:
                assert time.monotonic() < deadline, "no junk reached the provider"
                await asyncio.sleep(0.01)

            def timed(token: str) -> float:
                at = time.monotonic()
                r = other.post(route, content=json.dumps(INIT), headers={
                    **bearer(token), "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream"})
                assert r.status_code == 200, r.text
                return time.monotonic() - at

            # In a thread: the flood's answers keep this event loop busy.
            fresh_took = await asyncio.to_thread(timed, fresh)
            cached_took = await asyncio.to_thread(timed, cached)
            assert not all(t.done() for t in tasks), "the flood was over before the good tokens were answered"
            answers = await asyncio.gather(*tasks)
            return answers, time.monotonic() - started, fresh_took, cached_took

    # The good tokens go on connections of their own.
    with httpx2.Client(timeout=10) as other:
        answers, elapsed, fresh_took, cached_took = asyncio.run(flood(other))
    statuses = {s: [a.status_code for a in answers].count(s) for s in {a.status_code for a in answers}}
    calls = metric(auth_gateway, "ratatosk_auth_introspections_total") - before
    junk_calls = calls - 1  # the fresh token's
    throttled = metric_sum(auth_gateway, "ratatosk_auth_introspections_throttled_total", lane="unverified")
    print(f"\n1000 junk tokens in {elapsed:.2f}s: {junk_calls:.0f} introspections, statuses {statuses}, "
          f"{throttled:.0f} throttled so far; new token {fresh_took * 1000:.0f} ms, "
          f"cached token {cached_took * 1000:.0f} ms")
    # The lane's burst, its queue (max_wait at its pace), then its pace.
    bound = UNVERIFIED_PER_SECOND * (1 + MAX_WAIT + elapsed)
    assert junk_calls <= bound, (junk_calls, bound)
    assert fresh_took < 1.0
    assert cached_took < 1.0
    # Junk is refused: 401 when known to be bad, 503 when its lane is full.
    assert set(statuses) <= {401, 503}, statuses
    assert statuses.get(401, 0) >= 600, statuses
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"]
            assert "retry shortly" in rpc_error(a)["message"]
    assert metric_sum(auth_gateway, "ratatosk_auth_refused_before_introspection_total", reason="signature") >= 200
    auth_gateway.assert_healthy()


def test_id_and_refresh_tokens_are_not_access_tokens(auth_gateway, keycloak):
    tokens = keycloak.token_response("alice", scope="openid organization:* mcp:tools")
    assert claims(tokens["id_token"])["typ"] == "ID"
    for route in ("org-1", "org-1-introspect", "org-1-both"):
        r = init(auth_gateway, route, tokens["id_token"])
        assert r.status_code == 401, (route, r.text)
        assert "not an access token" in rpc_error(r)["message"], (route, r.text)
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = init(auth_gateway, "org-1-introspect", tokens["refresh_token"])
    assert r.status_code == 401, r.text
    assert "not an access token" in rpc_error(r)["message"], r.text
    # The access token of the same answer is fine.
    assert init(auth_gateway, "org-1", tokens["access_token"]).status_code == 200


@pytest.mark.anyio
async def test_sessions_are_bound_to_the_user_and_upstreams_never_see_the_token(auth_gateway, keycloak, replicas):
    alice, bob = keycloak.token("alice"), keycloak.token("carol")
    sid = session_of(auth_gateway, "org-1", alice)
    tools_list = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    as_other = post(auth_gateway.url("org-1"), tools_list, session=sid, headers=bearer(bob))
    assert as_other.status_code == 404
    assert rpc_error(as_other)["code"] == -32001
    mine = post(auth_gateway.url("org-1"), tools_list, session=sid, headers={**bearer(alice), "X-Request-Id": f"bind-{sid[:8]}"})
    assert mine.status_code == 200
    seen = [h for r in replicas for h in r.seen_headers() if h.get("x-request-id") == f"bind-{sid[:8]}"]
    assert len(seen) == 1, seen
    h = seen[0]
    assert "authorization" not in h
    assert h["ratatosk-subject"] == claims(alice)["sub"]
    assert h["ratatosk-org"] == "org-1"
    assert "mcp:tools" in h["ratatosk-scopes"].split()
    assert h["ratatosk-session"] == sid
    # The official client works with a token, too.
    async with streamable_session(auth_gateway.url("org-1"), headers=bearer(alice)) as s:
        assert (await s.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3"


def test_logout_refuses_the_token_within_a_second_in_every_mode(auth_gateway, keycloak):
    token = keycloak.token("alice")
    routes = ["org-1", "org-1-introspect", "org-1-both"]
    sessions = {r: session_of(auth_gateway, r, token) for r in routes}  # cached in every mode now
    listed = {s["id"] for r in routes for s in auth_gateway.sessions(r)}
    assert set(sessions.values()) <= listed
    ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    for r in routes:
        assert post(auth_gateway.url(r), ping, session=sessions[r], headers=bearer(token)).status_code == 200
    keycloak.logout_user("alice")
    started = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < len(routes) and time.monotonic() - started < 1.0:
        for r in routes:
            if r not in refused and post(auth_gateway.url(r), ping, session=sessions[r],
                                         headers=bearer(token)).status_code == 401:
                refused[r] = time.monotonic() - started
    assert set(refused) == set(routes), f"still accepted after 1 s: {set(routes) - set(refused)}"
    # The gateway sessions of that Keycloak session ended too.
    listed = {s["id"] for r in routes for s in auth_gateway.sessions(r)}
    assert not set(sessions.values()) & listed
    # A new login works again.
    assert init(auth_gateway, "org-1", keycloak.token("alice")).status_code == 200
    text = auth_gateway.metrics()
    assert 'ratatosk_auth_backchannel_logouts_total{result="accepted"}' in text


def test_the_realm_is_set_up_as_documented(keycloak, auth_gateway_port):
    clients = {c["clientId"]: c for c in keycloak.admin("GET", "/clients").json()}
    mcp = clients["mcp-client"]
    assert mcp["publicClient"] is True
    assert mcp["attributes"]["pkce.code.challenge.method"] == "S256"
    assert mcp["attributes"]["backchannel.logout.url"] == f"http://127.0.0.1:{auth_gateway_port}/auth/backchannel-logout"
    assert clients["ratatosk-gateway"]["publicClient"] is False
    orgs = {o["alias"]: o for o in keycloak.admin("GET", "/organizations").json()}
    assert set(orgs) == {"org-1", "org-2"}
    members = {alias: {m["username"] for m in keycloak.admin("GET", f"/organizations/{o['id']}/members").json()}
               for alias, o in orgs.items()}
    assert members == {"org-1": {"alice", "carol"}, "org-2": {"bob", "carol"}}
    # The import kept Keycloak's default scopes (the clientScopes pitfall).
    scopes = {s["name"] for s in keycloak.admin("GET", "/client-scopes").json()}
    assert {"profile", "email", "roles", "organization", "mcp:tools"} <= scopes
    # An MCP client on localhost may register itself (the Trusted Hosts policy).
    r = httpx2.post(f"{keycloak.issuer}/clients-registrations/openid-connect", timeout=10, json={
        "client_name": "e2e-dynamic-client", "redirect_uris": ["http://localhost:6274/oauth/callback"],
        "token_endpoint_auth_method": "none", "grant_types": ["authorization_code"]})
    assert r.status_code == 201, r.text
    # ...but not with redirects to another host.
    r = httpx2.post(f"{keycloak.issuer}/clients-registrations/openid-connect", timeout=10, json={
        "client_name": "e2e-evil-client", "redirect_uris": ["https://evil.example/cb"],
        "token_endpoint_auth_method": "none", "grant_types": ["authorization_code"]})
    assert r.status_code == 403, r.text


def test_streams_end_when_their_token_expires(auth_gateway, keycloak):
    """A GET stream and a legacy /sse stream authenticated with a 2-second
    token end at its `exp` (the gateway allows no clock skew here) with a
    last comment saying why, so the client reconnects with a fresh token."""
    token = keycloak.token("alice", client="mcp-client-short")
    exp = claims(token)["exp"]
    sid = session_of(auth_gateway, "org-1", token)
    streams = {
        "GET": ("GET", auth_gateway.url("org-1"), {"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                    "MCP-Protocol-Version": PROTOCOL}),
        "/sse": ("GET", auth_gateway.url("org-1", "sse"), {"Accept": "text/event-stream"}),
    }
    outcomes: dict[str, tuple[int, list[str], float]] = {}

    def read(name: str) -> None:
        method, url, headers = streams[name]
        with httpx2.Client(timeout=httpx2.Timeout(5, read=10)) as http, \
                http.stream(method, url, headers={**headers, **bearer(token)}) as r:
            lines = list(r.iter_lines()) if r.status_code == 200 else [r.read().decode()]
            outcomes[name] = (r.status_code, lines, time.time())

    # Both at once: the token lives two seconds.
    readers = [threading.Thread(target=read, args=(name,)) for name in streams]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=15)
    for name in streams:
        status, lines, ended = outcomes[name]
        assert status == 200, (name, lines)
        assert any("access token of this stream expired" in line for line in lines), (name, lines)
        print(f"{name} stream ended {ended - exp:+.2f} s from the token's exp")
        assert exp - 1 <= ended <= exp + 3, (name, ended, exp)
    # The expired token cannot reopen it; a fresh one of the same user can.
    headers = streams["GET"][2]
    r = httpx2.get(auth_gateway.url("org-1"), headers={**headers, **bearer(token)}, timeout=5)
    assert r.status_code == 401, r.text
    fresh = keycloak.token("alice")
    with httpx2.Client(timeout=httpx2.Timeout(5, read=10)) as http, \
            http.stream("GET", auth_gateway.url("org-1"), headers={**headers, **bearer(fresh)}) as r:
        assert r.status_code == 200


def exchange(keycloak, subject_token: str, audience: str) -> httpx2.Response:
    """RFC 8693 standard token exchange, as the gateway's confidential client."""
    return httpx2.post(f"{keycloak.issuer}/protocol/openid-connect/token", timeout=10,
                       auth=("ratatosk-gateway", KC_GATEWAY_SECRET), data={
                           "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                           "subject_token": subject_token,
                           "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
                           "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
                           "audience": audience})


def test_the_realm_lets_the_gateway_exchange_a_users_token_for_an_upstream(keycloak):
    """The realm side of `upstream.auth: token-exchange` (issue 18): the
    gateway's client may exchange a caller's token for one addressed to the
    example upstream only, for the same user and session."""
    subject = keycloak.token("alice")
    own = claims(subject)
    assert "mcp-upstream-py" not in own["aud"], "the caller's own token is not for the upstream"
    r = exchange(keycloak, subject, "mcp-upstream-py")
    assert r.status_code == 200, r.text
    assert r.json()["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    got = claims(r.json()["access_token"])
    assert got["aud"] == "mcp-upstream-py"
    assert (got["azp"], got["sub"], got["sid"]) == ("ratatosk-gateway", own["sub"], own["sid"])
    assert "mcp-reader" in got["realm_access"]["roles"]
    # An audience the gateway's client cannot address, and a token that is
    # not one, are refused.
    r = exchange(keycloak, subject, "mcp-client")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    r = exchange(keycloak, "not-a-token", "mcp-upstream-py")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
