"""Several servers per org (issue 17): each of an org's `servers` has its
own endpoints, `{org}/{server}/mcp`, `/sse` and `/messages`, reached
transparently (no prefixes) by clients of every era, with sessions of its
own; `{org}/mcp` is the org's federated endpoint, one session over all of
them with prefixed names. The servers are the real examples:
python-fastmcp (stateless-2025), go (modern, 2026-07-28), typescript
--stateful (stateful-2025) and python-modern (modern, which raises
list_changed on demand).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import httpx2
import pytest

from harness import (CLIENT_ERAS, ROOTS, Example, Gateway, RedisServer, SseReader, answers, client, elicit, initialize,
                     list_roots, next_list_changed, org, post, redis_gateway, rpc_error, running, started,
                     streamable_session, tool_names, wait_until)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def go_server(log_dir):
    with started(Example("go", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def ts_stateful_server(log_dir):
    with started(Example("typescript", log_dir, "--stateful")) as up:
        yield up


@pytest.fixture(scope="module")
def servers(replicas, go_server, ts_stateful_server):
    """The replicas of each server of org `multi`, by name."""
    return {"py": list(replicas), "go": [go_server], "ts": [ts_stateful_server]}


@pytest.fixture(scope="module")
def flaky_server(log_dir):
    """A go server the failure test stops and starts again."""
    with started(Example("go", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def multi_gateway(log_dir, replicas, go_server, ts_stateful_server, modern_upstream, flaky_server):
    def upstream(era: str, *examples: Example) -> dict:
        return {"era": era, "replicas": [e.url for e in examples]}

    gw = Gateway(
        log_dir,
        {
            "multi": {
                "auth": "none",
                "servers": {
                    "py": {"upstream": upstream("stateless-2025", *replicas)},
                    "go": {"upstream": upstream("modern", go_server), "prefix": "g"},
                    "ts": {"upstream": upstream("stateful-2025", ts_stateful_server)},
                    "pm": {"upstream": upstream("modern", modern_upstream)},
                },
            },
            "flaky": {
                "auth": "none",
                "servers": {
                    "py": {"upstream": {**upstream("stateless-2025", *replicas), "timeout": "2s"}},
                    "go": {"upstream": {**upstream("modern", flaky_server), "timeout": "2s",
                                        "connect_timeout": "500ms", "eject_for": "1s"}},
                },
            },
            "one": org(replicas),
        },
        name="servers-gateway",
    )
    with running(gw):
        yield gw


def reached(example: Example, tag: str) -> bool:
    """Whether `sleep_then_return` ran with `tag` on this example."""
    return any(e["tag"] == tag and e["event"] == "finished" for e in example.events())


@pytest.mark.parametrize("server", ["py", "go", "ts"])
@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_each_server_is_reached_at_its_own_endpoint_by_every_client_era(multi_gateway, servers, era, server):
    async with client(era, multi_gateway, f"multi/{server}") as c:
        names = await c.tool_names()
        assert {"add", "sleep_then_return"} <= names, names
        assert not any("__" in n for n in names), f"no prefixes on a server endpoint: {names}"
        assert await c.call("add", {"a": 2, "b": 3}) == "5"
        tag = f"servers-{uuid.uuid4().hex[:8]}"
        await c.call("sleep_then_return", {"seconds": 0, "tag": tag})
        for name, exs in servers.items():
            hit = any(reached(ex, tag) for ex in exs)
            assert hit == (name == server), f"call for {server} reached {name}: {hit}"
        if server in ("go", "ts"):
            # Server-to-client requests of a modern and a stateful server.
            assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}


def test_sessions_belong_to_their_server_and_paths_are_named(multi_gateway):
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    sid = initialize(multi_gateway.url("multi/py"))
    ok = post(multi_gateway.url("multi/py"), ping, session=sid)
    assert ok.status_code == 200, ok.text
    # The same session id at another server of the org is unknown there.
    other = post(multi_gateway.url("multi/go"), ping, session=sid)
    assert other.status_code == 404, other.text
    assert rpc_error(other)["code"] == -32001, other.text
    # The org endpoint of an org with servers names the servers' endpoints.
    r = post(multi_gateway.url("multi/nope"), ping)
    assert r.status_code == 404 and rpc_error(r)["message"] == "org 'multi' has no server 'nope'", r.text
    # An org with one upstream keeps its one endpoint, and no server paths.
    one = initialize(multi_gateway.url("one"))
    assert post(multi_gateway.url("one"), ping, session=one).status_code == 200
    r = post(multi_gateway.url("one/py"), ping)
    assert r.status_code == 404, r.text
    # The admin API lists the org's sessions of every server.
    listed = {s["id"]: s["org"] for s in multi_gateway.sessions("multi")}
    assert listed.get(sid) == "multi/py", listed
    # Each server's replicas and era are shown apart.
    ready = multi_gateway.admin_get("/readyz").json()
    orgs = ready["orgs"]
    assert {"multi/py", "multi/go", "multi/ts", "one"} <= set(orgs), ready


# ----- the federated endpoint ------------------------------------------------------

MULTI_PREFIXES = {"py": "py__", "go": "g__", "ts": "ts__", "pm": "pm__"}


async def test_the_federated_endpoint_lists_every_servers_tools_prefixed_and_routes_calls(multi_gateway, servers):
    async with streamable_session(multi_gateway.url("multi"), list_roots_callback=list_roots,
                                  elicitation_callback=elicit) as s:
        init = s.initialize_result
        assert init.capabilities.tools is not None and init.capabilities.tools.list_changed, init
        assert init.server_info.name == "ratatosk federation of multi", init
        names = {t.name for t in (await s.list_tools()).tools}
        for prefix in MULTI_PREFIXES.values():
            assert f"{prefix}add" in names, (prefix, sorted(names))
        assert all(any(n.startswith(p) for p in MULTI_PREFIXES.values()) for n in names), sorted(names)
        for name, prefix in MULTI_PREFIXES.items():
            result = await s.call_tool(f"{prefix}add", {"a": 2, "b": 3})
            assert not result.is_error and result.content[0].text == "5", (name, result)
        # Each call reaches its own server, as that server records.
        for name in ("py", "go", "ts"):
            tag = f"fed-{name}-{uuid.uuid4().hex[:8]}"
            result = await s.call_tool(f"{MULTI_PREFIXES[name]}sleep_then_return", {"seconds": 0, "tag": tag})
            assert not result.is_error, result
            for other, examples in servers.items():
                hit = any(reached(ex, tag) for ex in examples)
                assert hit == (other == name), f"call for {name} reached {other}: {hit}"
        # An unknown prefix is refused by the gateway, precisely.
        with pytest.raises(Exception) as refused:
            await s.call_tool("nope__add", {"a": 1, "b": 2})
        assert "unknown tool 'nope__add'" in str(refused.value)


async def test_progress_elicitation_and_roots_work_per_server_on_the_federated_endpoint(multi_gateway):
    asked = []

    async def answer(ctx, params):
        asked.append(params.message)
        return await elicit(ctx, params)

    progress: dict[str, list[float]] = {"py": [], "go": []}
    async with streamable_session(multi_gateway.url("multi"), list_roots_callback=list_roots,
                                  elicitation_callback=answer) as s:
        for name in progress:
            async def on_progress(value, total, message, name=name) -> None:
                progress[name].append(value)

            result = await s.call_tool(f"{MULTI_PREFIXES[name]}slow_count", {"n": 3}, progress_callback=on_progress)
            assert result.content[0].text == "counted to 3", result
            assert len(progress[name]) == 3, progress
        # The stateful TypeScript server asks the client (its id names the
        # server on the way out, and the answer goes back to that server).
        result = await s.call_tool("ts__confirm", {"question": "federated?"})
        assert json.loads(result.content[0].text) == {"action": "accept", "confirmed": True}
        assert asked and "federated?" in asked[0], asked
        # A modern server's input request reaches the client as roots/list.
        for prefix in ("g__", "ts__"):
            result = await s.call_tool(f"{prefix}ask_roots", {})
            assert json.loads(result.content[0].text) == {"roots": ROOTS}, (prefix, result)


async def test_a_legacy_client_uses_the_federated_endpoint(multi_gateway):
    """HTTP+SSE of 2024-11-05 on `{org}/sse`: the same prefixed tools,
    with progress and a stateful server's elicitation on the /sse stream."""
    progress = []

    async def on_progress(value, total, message) -> None:
        progress.append(value)

    async with client("sse-2024", multi_gateway, "multi") as c:
        names = await c.tool_names()
        assert {f"{p}add" for p in MULTI_PREFIXES.values()} <= names, sorted(names)
        assert await c.call("g__add", {"a": 2, "b": 3}) == "5"
        assert await c.call("py__slow_count", {"n": 2}, progress=on_progress) == "counted to 2"
        assert len(progress) == 2, progress
        answer = json.loads(await c.call("ts__confirm", {"question": "legacy?"}))
        assert answer == {"action": "accept", "confirmed": True}
        assert json.loads(await c.call("g__ask_roots", {})) == {"roots": ROOTS}


@pytest.mark.parametrize("server", ["py", "go", "ts"])
def test_a_cancel_on_the_federated_endpoint_reaches_the_server_running_the_call(multi_gateway, servers, server):
    url = multi_gateway.url("multi")
    sid = initialize(url)
    tag = f"fed-cancel-{uuid.uuid4().hex[:8]}"
    examples = servers[server]

    def event_time(event: str) -> float | None:
        return next((t for ex in examples if (t := ex.event_time(tag, event)) is not None), None)

    lines: list[str] = []

    def call() -> None:
        body = {"jsonrpc": "2.0", "id": 77, "method": "tools/call",
                "params": {"name": f"{MULTI_PREFIXES[server]}sleep_then_return", "arguments": {"seconds": 30, "tag": tag}}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                   "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=40)) as http, \
                http.stream("POST", url, json=body, headers=headers) as r:
            lines.extend(r.iter_lines())

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_until("the tool started", lambda: event_time("started") is not None, timeout=10)
    r = post(url, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": 77, "reason": "user"}}, session=sid)
    assert r.status_code == 202, r.text
    if server != "py":
        # A modern server sees its answer stream close, a stateful one gets
        # the notification in its session. (A stateless-2025 server is not
        # told, as on its own endpoint: the gateway stops the call.)
        wait_until(f"the {server} server recorded the cancel", lambda: event_time("cancelled") is not None,
                   timeout=5)
    caller.join(timeout=5)
    assert not caller.is_alive(), "the cancelled call's stream did not end"
    # Cancelled requests get no response.
    assert not any('"id":77' in line.replace(" ", "") for line in lines if line.startswith("data:")), lines
    if server != "py":
        assert event_time("finished") is None


async def test_a_2026_client_uses_the_federated_endpoint(multi_gateway):
    """2026-07-28 (the mcp 2.x `Client` in modern mode): discover and lists
    merged, calls routed to servers of every era, input rounds (roots,
    elicitation) carried with the server's requestState."""
    progress = []

    async def on_progress(value, total, message) -> None:
        progress.append(value)

    async with client("modern-2026", multi_gateway, "multi") as c:
        names = await c.tool_names()
        assert {f"{p}add" for p in MULTI_PREFIXES.values()} <= names, sorted(names)
        for prefix in MULTI_PREFIXES.values():
            assert await c.call(f"{prefix}add", {"a": 2, "b": 3}) == "5", prefix
        assert await c.call("py__slow_count", {"n": 2}, progress=on_progress) == "counted to 2"
        assert len(progress) == 2, progress
        for prefix in ("g__", "ts__"):
            assert json.loads(await c.call(f"{prefix}ask_roots", {})) == {"roots": ROOTS}, prefix
        answer = json.loads(await c.call("ts__confirm", {"question": "modern?"}))
        assert answer == {"action": "accept", "confirmed": True}


def test_list_changed_from_one_server_reaches_the_federated_stream(multi_gateway, modern_upstream):
    url = multi_gateway.url("multi")
    sid = initialize(url)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
            http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        next_list_changed(SseReader(r), modern_upstream)


def next_message_of(events: SseReader, method: str, within: float = 20.0) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        _, message = events.next_message()
        if message.get("method") == method:
            return message
    raise AssertionError(f"no {method} within {within} s")


def test_a_server_that_stops_leaves_with_list_changed_and_comes_back(multi_gateway, flaky_server):
    url = multi_gateway.url("flaky")
    sid = initialize(url)
    assert {"py__add", "go__add"} <= tool_names(url, sid)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    with httpx2.Client(timeout=httpx2.Timeout(10, read=30)) as http, \
            http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        events = SseReader(r)
        flaky_server.stop()
        next_message_of(events, "notifications/tools/list_changed")
        names = tool_names(url, sid)
        assert "py__add" in names and not any(n.startswith("go__") for n in names), sorted(names)
        call = {"jsonrpc": "2.0", "id": 10, "method": "tools/call",
                "params": {"name": "py__add", "arguments": {"a": 1, "b": 1}}}
        answered = post(url, call, session=sid)
        assert answered.status_code == 200 and '"text":"2"' in answered.text.replace(" ", ""), answered.text
        flaky_server.start()
        flaky_server.wait_ready(timeout=60, starts=2)
        next_message_of(events, "notifications/tools/list_changed")
    wait_until("the go server's tools are back", lambda: "go__add" in tool_names(url, sid), timeout=20)


# ----- Redis mode --------------------------------------------------------------------

def audit_stream(redis: RedisServer, key: str) -> list[tuple[str, dict]]:
    """The (node, line) entries of the audit stream `key`, oldest first."""
    out = subprocess.run(["redis-cli", "-p", str(redis.port), "XRANGE", key, "-", "+"],
                         capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    # Raw output: each entry is its id, then its fields and values in turn.
    return [(out[i + 2], json.loads(out[i + 4])) for i in range(0, len(out), 5)]


def test_a_federated_session_is_served_by_any_node_in_redis_mode(log_dir, replicas, servers, go_server,
                                                                 ts_stateful_server):
    """Two nodes sharing one Redis front py (stateless-2025), go (modern)
    and ts (stateful-2025): a federated session opened on A is listed and
    called on B, each call reaching its own server; a stateful server's
    elicitation asked on B's stream is answered through A; and both nodes'
    audit lines land in one Redis stream, naming the node and replica."""
    multi = {"auth": "none", "servers": {
        "py": {"upstream": {"era": "stateless-2025", "replicas": [r.url for r in replicas]}},
        "go": {"upstream": {"era": "modern", "replicas": [go_server.url]}, "prefix": "g"},
        "ts": {"upstream": {"era": "stateful-2025", "replicas": [ts_stateful_server.url]}},
    }}
    redis = RedisServer(log_dir, name="redis-fed").start_and_wait()
    nodes = [redis_gateway(log_dir, replicas, redis, f"fed-{c}", "fed:", orgs={"multi": multi},
                           extra={"audit": {"sink": "redis"}}) for c in "ab"]
    try:
        with running(nodes[0]), running(nodes[1]):
            a, b = (gw.url("multi") for gw in nodes)
            r = post(a, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                         "params": {"protocolVersion": "2025-11-25", "capabilities": {"elicitation": {}},
                                    "clientInfo": {"name": "fed-nodes", "version": "1"}}}, version=None)
            assert r.status_code == 200, r.text
            sid = r.headers["mcp-session-id"]
            assert post(a, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session=sid).status_code == 202
            assert {"py__add", "g__add", "ts__add"} <= tool_names(b, sid)
            for n, (name, url) in enumerate([("py", b), ("go", a), ("ts", b)]):
                tag = f"fed-nodes-{name}-{uuid.uuid4().hex[:8]}"
                call = {"jsonrpc": "2.0", "id": 10 + n, "method": "tools/call",
                        "params": {"name": f"{MULTI_PREFIXES[name]}sleep_then_return",
                                   "arguments": {"seconds": 0, "tag": tag}}}
                r = post(url, call, session=sid, timeout=20)
                assert r.status_code == 200 and "result" in answers(r)[-1], r.text
                for other, examples in servers.items():
                    hit = any(reached(ex, tag) for ex in examples)
                    assert hit == (other == name), f"call for {name} reached {other}: {hit}"
            # The ts server asks the client on B's answer stream; the
            # client's answer is posted to A and reaches the ts server.
            confirm = {"jsonrpc": "2.0", "id": 20, "method": "tools/call",
                       "params": {"name": "ts__confirm", "arguments": {"question": "two nodes?"}}}
            headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                       "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
            with httpx2.Client(timeout=httpx2.Timeout(10, read=20)) as http, \
                    http.stream("POST", b, content=json.dumps(confirm), headers=headers) as stream:
                assert stream.status_code == 200
                events = SseReader(stream)
                ask = next_message_of(events, "elicitation/create")
                assert "two nodes?" in ask["params"]["message"], ask
                reply = {"jsonrpc": "2.0", "id": ask["id"],
                         "result": {"action": "accept", "content": {"confirmed": True}}}
                r = post(a, reply, session=sid)
                assert r.status_code == 202, r.text
                _, final = events.next_message()
                assert final["id"] == 20, final
                assert json.loads(final["result"]["content"][0]["text"]) == {"action": "accept", "confirmed": True}
            # One audit stream for both nodes: every call, its node, its replica.
            wait_until("4 audit entries", lambda: len(audit_stream(redis, "fed:audit")) >= 4, timeout=10)
            entries = audit_stream(redis, "fed:audit")
            assert [line["tool"] for _, line in entries] == \
                ["py__sleep_then_return", "g__sleep_then_return", "ts__sleep_then_return", "ts__confirm"], entries
            assert len({node for node, _ in entries}) == 2, entries
            assert all(line["outcome"] == "result" and line["org"] == "multi" for _, line in entries), entries
            assert [line["replica"].split("#")[0] for _, line in entries] == \
                ["multi/py", "multi/go", "multi/ts", "multi/ts"], entries
    finally:
        redis.stop()
