"""Rate limits (issue 20): per user, per tool and per server, on one node in
memory and across nodes in a real Redis, with real Keycloak users.

A refusal is 429 with `Retry-After` and a JSON-RPC error that names the
limit; `ratatosk_rate_limited_total` counts it; other users are unaffected.
"""

from __future__ import annotations

import re
import threading
import time

import httpx2
import pytest

from conftest import identity_config
from harness import (KC_GATEWAY_SECRET, PROTOCOL, Gateway, org, post, redis_gateway, redis_running, result_of,
                     rpc_error, running, wait_until)

RATE = 10          # tool calls per second per user
BURST = 5
SECONDS = 10.0


@pytest.fixture(scope="module")
def redis(log_dir):
    with redis_running(log_dir, "redis-rate") as server:
        yield server


class Session:
    """One user's session on a route, over raw HTTP; any node serves it."""

    def __init__(self, url: str, token: str):
        self.auth = {"Authorization": f"Bearer {token}"}
        r = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                                  "clientInfo": {"name": "rate", "version": "1"}}},
                 version=None, headers=self.auth)
        assert r.status_code == 200, r.text
        self.sid = r.headers["mcp-session-id"]
        r = post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session=self.sid,
                 headers=self.auth)
        assert r.status_code == 202, r.text

    def call(self, url: str, tool: str, args: dict, rid: int = 2) -> httpx2.Response:
        return post(url, {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                          "params": {"name": tool, "arguments": args}}, session=self.sid, headers=self.auth)


def limited(gw: Gateway, org_name: str, limit: str) -> int:
    found = re.search(rf'ratatosk_rate_limited_total{{limit="{limit}",org="{org_name}"}} (\d+)', gw.metrics())
    return int(found.group(1)) if found else 0


def assert_refusal(r: httpx2.Response, limit: str, rid: int) -> float:
    """A rate-limit refusal, checked; its exact wait in seconds."""
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1, r.headers
    error = rpc_error(r)
    assert error["code"] == -32029, error
    assert f"rate limit '{limit}'" in error["message"], error
    assert r.json()["id"] == rid, r.text
    assert error["data"]["limit"] == limit, error
    return error["data"]["retry_after_ms"] / 1000


def test_a_limit_per_user_holds_across_two_nodes_and_spares_other_users(log_dir, replicas, redis, keycloak):
    """10 tool calls per second per user, burst 5, with alice's calls spread
    over two nodes as fast as four threads can send them: over 10 s she
    gets burst + 10/s within ±10 %. carol, calling twice a second on the
    same nodes, is never refused; her tools/list is not counted."""
    rated = {**org(replicas, auth="jwt", organization="org-1"),
             "rate_limits": [{"name": "tool-calls", "rate": f"{RATE}/s", "burst": BURST,
                              "methods": ["tools/call"]}]}
    nodes = [redis_gateway(log_dir, replicas, redis, name, prefix="rate:", orgs={"rl": rated},
                           extra={"identity": identity_config(keycloak.issuer)},
                           env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})
             for name in ("rate-a", "rate-b")]
    with running(nodes[0]), running(nodes[1]):
        urls = [gw.url("rl") for gw in nodes]
        for gw in nodes:
            wait_until(f"{gw.name} ready", lambda gw=gw: gw.admin_get("/readyz").status_code == 200, timeout=15)
        alice = Session(urls[0], keycloak.token("alice"))
        carol = Session(urls[1], keycloak.token("carol"))
        counts = {"ok": 0, "refused": 0, "other": []}
        lock = threading.Lock()
        stop = threading.Event()
        first_refusal: list[httpx2.Response] = []

        failures: list[BaseException] = []

        def hammer(k: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = alice.call(urls[(i + k) % 2], "add", {"a": i, "b": k}, rid=1000 + 10 * i + k)
                except httpx2.HTTPError as e:
                    with lock:
                        failures.append(e)
                    return
                with lock:
                    if r.status_code == 200:
                        counts["ok"] += 1
                    elif r.status_code == 429:
                        counts["refused"] += 1
                        if not first_refusal:
                            first_refusal.append(r)
                    else:
                        counts["other"].append((r.status_code, r.text[:200]))
                i += 1

        carol_results = []

        def calm() -> None:
            i = 0
            while not stop.wait(0.5):
                try:
                    r = carol.call(urls[i % 2], "add", {"a": 1, "b": i}, rid=i)
                except httpx2.HTTPError as e:
                    failures.append(e)
                    return
                carol_results.append(r.status_code)
                i += 1

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)] + [threading.Thread(target=calm)]
        started = time.monotonic()
        for t in threads:
            t.start()
        # The run's length is what the count is measured against.
        stop.wait(SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=15)
            assert not t.is_alive(), "a caller did not finish within 15 s"
        elapsed = time.monotonic() - started

        assert failures == [], f"a caller's request failed: {failures[:3]}"
        assert counts["other"] == [], counts["other"][:3]
        expected = BURST + RATE * elapsed
        print(f"alice: {counts['ok']} calls passed, {counts['refused']} refused in {elapsed:.2f} s "
              f"(expected {expected:.1f}); carol: {carol_results.count(200)} of {len(carol_results)}")
        assert abs(counts["ok"] - expected) <= 0.1 * expected, (counts, expected)
        # The callers asked for more than the limit lets through.
        assert counts["refused"] >= 2 * RATE, counts
        assert carol_results and set(carol_results) == {200}, carol_results
        r = post(urls[0], {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}, session=alice.sid,
                 headers=alice.auth)
        assert r.status_code == 200, r.text
        wait = assert_refusal(first_refusal[0], "tool-calls", first_refusal[0].json()["id"])
        assert 0 < wait <= 1 / RATE + 0.05, wait
        # Both nodes refused some, and their counts add up.
        per_node = [limited(gw, "rl", "tool-calls") for gw in nodes]
        assert sum(per_node) == counts["refused"] and min(per_node) > 0, per_node
        for gw in nodes:
            assert "ratatosk_rate_limit_errors_total 0" in gw.metrics()


def test_a_per_tool_limit_covers_the_federated_endpoint_and_the_servers_own(log_dir, replicas, keycloak):
    """A limit on one server's tools (`py__*`), per user: the federated
    endpoint and the server's own endpoint share it; the other server's
    tools and the other user are not counted against it."""
    fed = {"auth": "jwt", "organization": "org-1",
           "servers": {"py": {"upstream": {"era": "stateless-2025", "replicas": [r.url for r in replicas]}},
                       "more": {"upstream": {"era": "stateless-2025", "replicas": [r.url for r in replicas]}}},
           "rate_limits": [{"name": "py-calls", "rate": "2/h", "tools": ["py__*"]},
                           {"name": "everything", "rate": "1000/s", "per": "org"}]}
    gw = Gateway(log_dir, {"fed": fed}, name="rate-fed", extra={"identity": identity_config(keycloak.issuer)},
                 env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})
    with running(gw):
        token = keycloak.token("alice")
        alice = Session(gw.url("fed"), token)
        r = alice.call(gw.url("fed"), "py__add", {"a": 1, "b": 2})
        assert r.status_code == 200 and result_of(r)["content"][0]["text"] == "3", r.text
        own = Session(gw.url("fed/py"), token)
        r = own.call(gw.url("fed/py"), "add", {"a": 2, "b": 2})
        assert r.status_code == 200, r.text
        # The budget of 2 per hour is spent, at either endpoint.
        wait = assert_refusal(alice.call(gw.url("fed"), "py__add", {"a": 1, "b": 1}, rid=7), "py-calls", 7)
        assert 1700 < wait <= 1800, wait
        assert_refusal(own.call(gw.url("fed/py"), "add", {"a": 1, "b": 1}, rid=8), "py-calls", 8)
        # Another server's tools, and another user, are not counted.
        r = alice.call(gw.url("fed"), "more__add", {"a": 1, "b": 1})
        assert r.status_code == 200, r.text
        carol = Session(gw.url("fed"), keycloak.token("carol"))
        r = carol.call(gw.url("fed"), "py__add", {"a": 1, "b": 1})
        assert r.status_code == 200, r.text
        assert limited(gw, "fed", "py-calls") == 2
        assert limited(gw, "fed", "everything") == 0
        gw.assert_healthy()
