"""Servers that register themselves (issue 21): a real FastMCP upstream
registers with one node of a two-node Redis-mode gateway through the
helper of upstream-examples/python-common (register.py), and its tools
appear on the federated endpoint of both nodes, with list_changed to the
official SDK client's session; killed, it vanishes after its ttl; stopped,
it deregisters at once. Bad registrations get 400 naming the field."""

from __future__ import annotations

import time

import anyio
import httpx2
import pytest

from harness import PUBLISH_SECRET, Example, redis_gateway, redis_running, streamable_session, wait_until
from test_nodes import Nodes

pytestmark = pytest.mark.anyio

# LOCAL-ONLY test secret, given to the gateway through the environment.
TEAM_SECRET = "team-registration-local-only"


@pytest.fixture(scope="module")
def nodes(log_dir, replicas):
    orgs = {
        "team": {"auth": "none", "registration": {"secret": "${E2E_TEAM_SECRET}", "max_ttl": "1m"},
                 "servers": {"fixed": {"upstream": {"era": "stateless-2025", "replicas": [r.url for r in replicas]}}}},
        "closed": {"auth": "none", "servers": {"only": {"upstream": {"era": "stateless-2025",
                                                                     "replicas": [replicas[0].url]}}}},
    }
    with redis_running(log_dir, "redis-registration") as redis, \
            Nodes([redis_gateway(log_dir, replicas, redis, f"reg-{c}", "reg:", orgs=orgs,
                                 env={"E2E_TEAM_SECRET": TEAM_SECRET}) for c in "ab"]) as gws:
        yield gws


def registering(log_dir, admin: str, name: str, ttl: int) -> Example:
    """A FastMCP upstream that registers itself as `name` in org `team`."""
    return Example("python-fastmcp", log_dir, "--name", f"python-fastmcp-{name}", env={
        "RATATOSK_REGISTER_URL": admin, "RATATOSK_REGISTER_ORG": "team", "RATATOSK_REGISTER_NAME": name,
        "RATATOSK_REGISTER_SECRET": TEAM_SECRET, "RATATOSK_REGISTER_TTL": str(ttl)})


def open_streams(gw, org: str) -> int:
    """The SSE streams `gw` holds for `org` (its metric)."""
    prefix = f'ratatosk_open_streams{{org="{org}"}} '
    line = next((x for x in gw.metrics().splitlines() if x.startswith(prefix)), None)
    return int(float(line[len(prefix):])) if line else 0


def listed(gw, org: str = "team") -> dict[str, dict]:
    r = httpx2.get(f"{gw.admin}/orgs/{org}/servers", headers={"Authorization": f"Bearer {TEAM_SECRET}"}, timeout=5)
    assert r.status_code == 200, r.text
    return {s["name"]: s for s in r.json()["servers"]}


async def tools_on(gw) -> set[str]:
    """The tools a new session of `team`'s federated endpoint on `gw` lists."""
    async with streamable_session(gw.url("team")) as s:
        return {t.name for t in (await s.list_tools()).tools}


async def wait_for_tools(gw, check, what: str, within: float) -> set[str]:
    with anyio.fail_after(within):
        while not check(tools := await tools_on(gw)):
            await anyio.sleep(0.2)
    assert check(tools), what
    return tools


async def test_a_server_registers_itself_on_every_node_and_vanishes_after_its_ttl(nodes, log_dir):
    a, b = nodes
    before = await tools_on(b)
    assert "fixed__add" in before and all(n.startswith("fixed__") for n in before), before
    changed = anyio.Event()

    async def on_message(message) -> None:
        if getattr(getattr(message, "root", message), "method", None) == "notifications/tools/list_changed":
            changed.set()

    upstream = registering(log_dir, a.admin, "billing", ttl=3)
    # A client of node b, which never hears from the upstream itself.
    async with streamable_session(b.url("team"), message_handler=on_message) as s:
        # Its GET stream is open (each node tells the streams it holds).
        await anyio.to_thread.run_sync(lambda: wait_until(
            "the SDK session's stream at node b", lambda: open_streams(b, "team") >= 1, timeout=10))
        upstream.start()
        try:
            await anyio.to_thread.run_sync(upstream.wait_ready)
            # As a client does: list again on each list_changed (each node
            # sends one as it applies the change).
            with anyio.fail_after(15):
                while True:
                    await changed.wait()
                    changed = anyio.Event()
                    names = {t.name for t in (await s.list_tools()).tools}
                    if "billing__add" in names:
                        break
            assert {"billing__add", "billing__whoami", "fixed__add"} <= names, names
            result = await s.call_tool("billing__add", {"a": 2, "b": 3})
            assert not result.is_error and result.content[0].text == "5", result
            # The upstream saw the call: it came through the registration.
            assert any(h.get("ratatosk-org") == "team" for h in upstream.seen_headers())
            # Node a serves it too, as its own server and federated.
            assert "billing__add" in await tools_on(a)
            async with streamable_session(a.url("team/billing")) as own:
                assert "add" in {t.name for t in (await own.list_tools()).tools}
            entry = listed(b)["billing"]
            assert entry["source"] == "registration" and entry["served"] is True, entry
            assert entry["replicas"] == [upstream.url], entry

            # Killed: nothing deregisters it. Its tools leave the lists at
            # once (the gateway finds it does not answer) ...
            upstream.kill()
            killed = time.monotonic()
            left = listed(a)["billing"]["expires_in_ms"]
            assert 0 < left <= 3000, left
            with anyio.fail_after(10):
                while True:
                    await changed.wait()
                    changed = anyio.Event()
                    names = {t.name for t in (await s.list_tools()).tools}
                    if not any(n.startswith("billing__") for n in names):
                        break
            assert "fixed__add" in names
            # ... and its registration, not renewed, ends after its ttl, on
            # both nodes, and its route with it.
            for gw in (a, b):
                await anyio.to_thread.run_sync(lambda gw=gw: wait_until(
                    f"billing expired at {gw.name}", lambda: "billing" not in listed(gw), timeout=3 + 5))
            gone_after = time.monotonic() - killed
            assert gone_after >= left / 1000 - 0.5, (gone_after, left)
            init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}

            def route_gone(gw) -> bool:
                r = httpx2.post(gw.url("team/billing"), json=init, timeout=5,
                                headers={"Accept": "application/json, text/event-stream"})
                assert r.status_code in (404, 502), r.text
                return r.status_code == 404 and "no server 'billing'" in r.text
            for gw in (a, b):
                # Each node applies what it reads within a second (POLL).
                await anyio.to_thread.run_sync(lambda gw=gw: wait_until(
                    f"route team/billing gone at {gw.name}", lambda: route_gone(gw), timeout=3))
        finally:
            upstream.stop()
    assert not any(n.startswith("billing__") for n in await tools_on(a))
    metrics = b.metrics()
    assert 'ratatosk_registered_servers{org="team"} 0' in metrics
    assert 'ratatosk_registrations_total{org="team",result="registered"} 1' in a.metrics()


async def test_a_server_that_stops_deregisters_at_once(nodes, log_dir):
    a, b = nodes
    upstream = registering(log_dir, f"{b.admin},{a.admin}", "reports", ttl=60)
    upstream.start()
    try:
        await anyio.to_thread.run_sync(upstream.wait_ready)
        await wait_for_tools(a, lambda t: "reports__add" in t, "registered", 15)
    finally:
        upstream.stop()
    # Its ttl is a minute: gone this soon, it deregistered.
    await wait_for_tools(a, lambda t: not any(n.startswith("reports__") for n in t), "deregistered", 5)
    assert "deregistered team/reports" in upstream.log_text()


def put(gw, org: str, name: str, body, secret: str | None = TEAM_SECRET) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    kw = {"json": body} if not isinstance(body, bytes) else {"content": body}
    return httpx2.put(f"{gw.admin}/orgs/{org}/servers/{name}", headers=headers, timeout=5, **kw)


def test_bad_registrations_are_refused_naming_the_field(nodes, replicas):
    a, _ = nodes
    good = {"upstream": {"era": "stateless-2025", "replicas": [replicas[0].url]}, "ttl": "30s"}
    for body, field in [
        ({"upstream": good["upstream"]}, "ttl"),
        ({**good, "ttl": "10h"}, "ttl"),
        ({**good, "upstream": {"era": "stateless-2025", "replicas": []}}, "upstream.replicas"),
        ({**good, "upstream": {"era": "2019", "replicas": [replicas[0].url]}}, "upstream.era"),
        ({**good, "upstream": {"replicas": [replicas[0].url]}}, "upstream"),
        ({**good, "policy": []}, "policy"),
        ({**good, "upstream": {**good["upstream"], "tls": {"insecure_skip_verify": True}}}, "upstream.tls"),
    ]:
        r = put(a, "team", "bad", body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert f"`{field}`" in error["message"], (field, error)
        assert error["data"]["problems"][0]["path"] == field, (field, error)
    r = put(a, "team", "bad", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == -32700, r.text
    # A file server's name is not taken over.
    r = put(a, "team", "fixed", good)
    assert r.status_code == 409 and "config file" in r.json()["error"]["message"], r.text
    # The org's secret, or the admin one; another org takes none.
    assert put(a, "team", "bad", good, secret=None).status_code == 401
    assert put(a, "team", "bad", good, secret="wrong-wrong-wrong-wrong").status_code == 401
    assert put(a, "closed", "bad", good).status_code == 401
    r = put(a, "closed", "bad", good, secret=PUBLISH_SECRET)
    assert r.status_code == 403 and "orgs.closed.registration" in r.text, r.text
    assert "bad" not in listed(a)
