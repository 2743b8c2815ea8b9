"""The shared session store (issue 6, first slice): a gateway with
`sessions.store: redis` against a real redis-server, and what it does when
Redis goes away and comes back."""

from __future__ import annotations

import subprocess
import time

import httpx2
import pytest

from harness import (ACCEPT_BOTH, RedisServer, SseReader, initialize, post, redis_gateway, rpc_error, running,
                     streamable_session, wait_until)

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis(log_dir):
    server = RedisServer(log_dir).start_and_wait()
    try:
        yield server
    finally:
        server.stop()


async def test_sessions_live_in_redis_over_tls(tmp_path, replicas):
    """`rediss://` with the server's CA: sessions, events and the bus all
    go over TLS (the server has no plain port)."""
    from pki import Pki

    pki = Pki(tmp_path / "pki")
    cert, key = pki.issue("redis")
    redis = RedisServer(tmp_path, tls=(cert, key, pki.ca_file)).start_and_wait()
    try:
        gw = redis_gateway(tmp_path, replicas, redis, "rediss-gw",
                           extra={"sessions": {"store": "redis", "url": "${E2E_REDIS_URL}", "key_prefix": "tls:",
                                               "tls": {"ca_file": str(pki.ca_file)}}})
        with running(gw):
            assert gw.admin_get("/readyz").json()["store"] == {"kind": "redis", "ok": True}
            async with streamable_session(gw.url("s25")) as s:
                assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
                assert len(redis.keys("tls:s:*")) == 1
        # Without the CA, the system's roots do not know the server: the
        # gateway says Redis is not ready, and why is in its log.
        untrusting = redis_gateway(tmp_path, replicas, redis, "rediss-untrusting")
        with running(untrusting):
            ready = untrusting.admin_get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["store"]["ok"] is False
            wait_until("the reason logged", lambda: "invalid peer certificate: UnknownIssuer" in untrusting.log_text(),
                       timeout=10)
    finally:
        redis.stop()


async def test_sessions_live_in_redis(log_dir, replicas, redis):
    with running(redis_gateway(log_dir, replicas, redis, "redis-gw")) as gw:
        ready = gw.admin_get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["store"] == {"kind": "redis", "ok": True}
        async with streamable_session(gw.url("s25")) as s:
            assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
            keys = redis.keys("redis-gw:s:*")
            assert len(keys) == 1, keys
            [listed] = gw.sessions("s25")
            assert listed["id"] == keys[0].removeprefix("redis-gw:s:")
            assert listed["protocol_version"] and listed["last_seen_ms"] > 0
        # The client's DELETE ended it, in Redis too.
        wait_until("the session key removed", lambda: redis.keys("redis-gw:s:*") == [], timeout=5)


def test_redis_going_away_and_coming_back(log_dir, replicas, redis):
    with running(redis_gateway(log_dir, replicas, redis, "redis-gw-restart")) as gw:
        url = gw.url("s25")
        sid = initialize(url)
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
                http.stream("GET", url, headers=headers) as stream:
            assert stream.status_code == 200
            events = SseReader(stream)
            redis.stop()
            wait_until("/readyz says the store is down", lambda: gw.admin_get("/readyz").status_code == 503,
                       timeout=10)
            assert gw.admin_get("/readyz").json()["store"]["ok"] is False
            # New state cannot be made: a clear 503, not a hang.
            started = time.monotonic()
            r = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                      "clientInfo": {"name": "e2e", "version": "1"}}}, version=None)
            assert r.status_code == 503, r.text
            assert "session store unavailable" in rpc_error(r)["message"] or "redis" in rpc_error(r)["message"]
            assert time.monotonic() - started < 8
            # The open stream keeps its keep-alives (1 s) meanwhile.
            events.next_comment()
            events.next_comment()
            # Redis comes back empty (no persistence): the node recovers by
            # itself; the old session is gone, which clients see as 404.
            redis.start_and_wait()
        wait_until("/readyz ready again", lambda: gw.admin_get("/readyz").status_code == 200, timeout=15)
        r = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session=sid)
        assert r.status_code == 404, r.text
        sid2 = initialize(url)
        assert sid2 != sid
        r = post(url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                       "params": {"name": "add", "arguments": {"a": 1, "b": 1}}}, session=sid2)
        assert r.status_code == 200, r.text
        gw.assert_healthy()


def test_a_bus_that_goes_quiet_is_noticed_and_made_again(log_dir, replicas, redis):
    """Redis stops answering without closing anything (CLIENT PAUSE: the
    subscription's connection stays up, nothing arrives on it). The node's
    own heartbeats stop coming back, so readiness says the bus is down
    (events.bus false) within about 15 s, and it subscribes again by itself
    once Redis answers."""
    with running(redis_gateway(log_dir, replicas, redis, "redis-gw-quiet")) as gw:
        wait_until("the bus is up", lambda: gw.admin_get("/readyz").json()["events"]["bus"] is True, timeout=15)
        paused = time.monotonic()
        subprocess.run(["redis-cli", "-p", str(redis.port), "CLIENT", "PAUSE", "25000", "ALL"], check=True,
                       capture_output=True, timeout=10)
        wait_until("readiness says the bus is down",
                   lambda: gw.admin_get("/readyz").json()["events"]["bus"] is False, timeout=30)
        noticed = time.monotonic() - paused
        print(f"a quiet bus was noticed after {noticed:.1f} s")
        assert gw.admin_get("/readyz").status_code == 503
        wait_until("the bus is up again", lambda: gw.admin_get("/readyz").json()["events"]["bus"] is True,
                   timeout=45)
        assert gw.admin_get("/readyz").status_code == 200
        # It carries events again.
        url = gw.url("s25")
        sid = initialize(url)
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
                http.stream("GET", url, headers=headers) as stream:
            events = SseReader(stream)
            assert gw.publish(sid, {"jsonrpc": "2.0", "method": "notifications/message",
                                    "params": {"level": "info", "data": "after"}}).status_code == 202
            _, message = events.next_message()
            assert message["params"]["data"] == "after", message
        gw.assert_healthy()
