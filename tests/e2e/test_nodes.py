"""Distributed mode (issue 6): several gateway nodes share sessions, event
logs and live fan-out through one real redis-server. Clients hop between
nodes with no stickiness; a node dies; Redis restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import threading
import time

import httpx2
import pytest

import rawhttp
from conftest import identity_config
from harness import (ACCEPT_BOTH, answers, KC_GATEWAY_SECRET, MODERN, PUBLISH_SECRET, Example, Gateway, RedisServer, SseReader,
                     free_port, initialize, modern_call, raw_initialize, next_list_changed, org, post, redis_gateway, redis_running, result_of, rpc_error, started,
                     wait_until)

pytestmark = pytest.mark.anyio


class Nodes:
    """Gateway nodes started together and stopped together."""

    def __init__(self, gateways: list[Gateway]):
        self.all = gateways

    def __enter__(self) -> list[Gateway]:
        try:
            for gw in self.all:
                gw.start_and_wait()
            for gw in self.all:
                wait_until(f"{gw.name} ready (store and bus)", lambda gw=gw: gw.admin_get("/readyz").status_code == 200,
                           timeout=15)
        except BaseException:
            self.stop()
            raise
        return self.all

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for gw in self.all:
                    if gw.popen is not None and gw.popen.returncode is None and gw.death() is None:
                        gw.assert_healthy()
        finally:
            self.stop()

    def stop(self) -> None:
        for gw in self.all:
            gw.stop()


@pytest.fixture(scope="module")
def redis(log_dir):
    with redis_running(log_dir, "redis-nodes") as server:
        yield server


@pytest.fixture(scope="module")
def stateful_upstream(log_dir):
    with started(Example("python-stateful", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def orgs(replicas, stateful_upstream, modern_upstream) -> dict:
    return {"s25": org(replicas), "stateful": org([stateful_upstream], era="stateful-2025"),
            "modern": org([modern_upstream], era="modern")}


@pytest.fixture(scope="module")
def three(log_dir, replicas, redis, orgs):
    with Nodes([redis_gateway(log_dir, replicas, redis, f"node-{c}", "nodes:", orgs=orgs) for c in "abc"]) as gws:
        yield gws


def get_headers(sid: str, last_event_id: str | None = None) -> dict:
    h = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    if last_event_id:
        h["Last-Event-ID"] = last_event_id
    return h


def note(n: int) -> dict:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": n}}


def test_any_node_serves_any_request_of_a_session(three):
    a, b, c = three
    sid = initialize(a.url("s25"))
    with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
            http.stream("GET", b.url("s25"), headers=get_headers(sid)) as stream:
        assert stream.status_code == 200
        events = SseReader(stream)
        r = post(c.url("s25"), {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                "params": {"name": "add", "arguments": {"a": 2, "b": 3}}}, session=sid)
        assert r.status_code == 200, r.text
        assert answers(r)[-1]["result"]["content"][0]["text"] == "5", r.text
        # Every node counts the sessions of all (the module's first session).
        for gw in three:
            assert 'ratatosk_sessions{org="s25"} 1\n' in gw.metrics(), gw.name
        # A publish through A's admin API arrives on the stream B holds.
        published = time.monotonic()
        r = a.publish(sid, note(1))
        assert r.status_code == 202, r.text
        _, message = events.next_message()
        print(f"publish on A -> stream on B: {(time.monotonic() - published) * 1000:.1f} ms")
        assert message == note(1)
        # A tool's progress and answer, streamed by C, reach the client too.
        r = post(c.url("s25"), {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                "params": {"name": "slow_count", "arguments": {"n": 2},
                                           "_meta": {"progressToken": "p"}}}, session=sid)
        assert r.status_code == 200, r.text
        messages = answers(r)
        assert [m.get("method") for m in messages[:-1]] == ["notifications/progress"] * 2, r.text
        assert messages[-1]["id"] == 3 and "result" in messages[-1], r.text
        # DELETE on C ends the session everywhere: B's stream ends, A says 404.
        r = httpx2.delete(c.url("s25"), headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"},
                          timeout=10)
        assert r.status_code == 204, r.text
        with pytest.raises(EOFError):
            while True:
                events.next_event()
    r = post(a.url("s25"), {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session=sid)
    assert r.status_code == 404, r.text


def test_a_legacy_sse_client_posts_to_any_node(three):
    a, b, c = three
    with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
            http.stream("GET", b.url("s25", "sse"), headers={"Accept": "text/event-stream"}) as stream:
        assert stream.status_code == 200
        events = SseReader(stream)
        endpoint = events.next_event()
        assert endpoint.event == "endpoint", endpoint
        for n, gw in enumerate([a, c], start=1):
            r = httpx2.post(gw.origin + endpoint.data, timeout=10, json={
                "jsonrpc": "2.0", "id": n, "method": "initialize" if n == 1 else "tools/list",
                "params": {"protocolVersion": "2024-11-05", "capabilities": {},
                           "clientInfo": {"name": "legacy", "version": "1"}} if n == 1 else {}})
            assert r.status_code == 202, r.text
            _, answer = events.next_message()
            assert answer["id"] == n and "result" in answer, answer


ROOTS = ["file:///tmp/nodes-a", "file:///tmp/nodes-b"]


def parked(r: httpx2.Response) -> tuple[str, str, dict]:
    """The input key, the request and the requestState of an InputRequiredResult."""
    assert r.status_code == 200, r.text
    result = result_of(r)
    assert result["resultType"] == "input_required", result
    [(key, request)] = result["inputRequests"].items()
    return key, request, result["requestState"]


def test_a_modern_clients_input_may_reach_any_node(three):
    """A 2026-07-28 client of a stateful upstream: the call parks on the node
    that holds the upstream's answer stream; the retry with the client's
    input may reach any node, which streams the rest of the call."""
    a, b, c = three
    # On the node holding the call, for comparison.
    key, request, state = parked(modern_call(a.url("stateful"), "ask_roots", {}))
    answer = {key: {"roots": [{"uri": u} for u in ROOTS]}}
    started_at = time.monotonic()
    r = modern_call(a.url("stateful"), "ask_roots", {}, inputResponses=answer, requestState=state)
    print(f"retry on A of a call parked on A: {(time.monotonic() - started_at) * 1000:.1f} ms")
    assert json.loads(result_of(r)["content"][0]["text"]) == {"roots": ROOTS}, r.text
    key, request, state = parked(modern_call(a.url("stateful"), "ask_roots", {}))
    assert request["method"] == "roots/list", request
    started_at = time.monotonic()
    r = modern_call(b.url("stateful"), "ask_roots", {}, inputResponses=answer, requestState=state)
    print(f"retry on B of a call parked on A: {(time.monotonic() - started_at) * 1000:.1f} ms")
    assert r.status_code == 200, r.text
    result = result_of(r)
    assert result["resultType"] == "complete", result
    assert json.loads(result["content"][0]["text"]) == {"roots": ROOTS}, result
    # The call is answered: the same state is refused everywhere, A too.
    for gw in (c, a):
        r = modern_call(gw.url("stateful"), "ask_roots", {}, inputResponses=answer, requestState=state)
        assert r.status_code == 400, r.text
        assert rpc_error(r)["code"] == -32602, r.text
    # Another call parks on B and is answered through C (elicitation).
    caps = {"elicitation": {}}
    key, request, state = parked(modern_call(b.url("stateful"), "confirm", {"question": "go?"}, caps=caps))
    assert request["method"] == "elicitation/create", request
    # A state naming B with another random part is refused by B, via C.
    tag, _ = state.split(".", 1)
    r = modern_call(c.url("stateful"), "confirm", {"question": "go?"}, caps=caps,
                    inputResponses={key: {"action": "accept"}}, requestState=f"{tag}.forged")
    assert r.status_code == 400 and rpc_error(r)["code"] == -32602, r.text
    r = modern_call(c.url("stateful"), "confirm", {"question": "go?"}, caps=caps,
                    inputResponses={key: {"action": "accept", "content": {"confirmed": True}}}, requestState=state)
    assert r.status_code == 200, r.text
    assert json.loads(result_of(r)["content"][0]["text"]) == {"action": "accept", "confirmed": True}, r.text


def test_a_second_question_of_a_call_resumed_elsewhere_parks_on_its_node(three):
    """A call parked on A asks again while B streams its rest: the second
    question parks on A too, and C's retry finishes the call."""
    a, b, c = three
    key, _, first = parked(modern_call(a.url("stateful"), "ask_roots_twice", {}))
    key2, request, second = parked(modern_call(b.url("stateful"), "ask_roots_twice", {}, requestState=first,
                                               inputResponses={key: {"roots": [{"uri": ROOTS[0]}]}}))
    assert request["method"] == "roots/list", request
    assert second.split(".")[0] == first.split(".")[0], "the call stays on the node holding it"
    r = modern_call(c.url("stateful"), "ask_roots_twice", {}, requestState=second,
                    inputResponses={key2: {"roots": [{"uri": ROOTS[1]}]}})
    assert json.loads(result_of(r)["content"][0]["text"]) == {"first": ROOTS[:1], "second": ROOTS[1:]}, r.text


def auth_node(log_dir, replicas, redis: RedisServer, keycloak, name: str, prefix: str, routes: dict) -> Gateway:
    """A node of a Keycloak-secured gateway sharing `redis` under `prefix`."""
    port = free_port()
    return redis_gateway(log_dir, replicas, redis, name, prefix, orgs=routes, port=port,
                         extra={"identity": identity_config(keycloak.issuer),
                                "public_url": f"http://127.0.0.1:{port}"},
                         env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})


def test_only_its_caller_can_answer_a_call_on_another_node(log_dir, replicas, redis, stateful_upstream, keycloak):
    """alice's call parks on A; carol, of the same organization, retries it
    on B with alice's requestState and is refused; alice's retry on B
    finishes it."""
    routes = {"org-1": org([stateful_upstream], auth="jwt", organization="org-1", era="stateful-2025")}
    with Nodes([auth_node(log_dir, replicas, redis, keycloak, f"owner-{c}", "owner:", routes) for c in "ab"]) as (a, b):
        alice = {"Authorization": f"Bearer {keycloak.token('alice')}"}
        carol = {"Authorization": f"Bearer {keycloak.token('carol')}"}

        def call(gw: Gateway, who: dict, **extra) -> httpx2.Response:
            params = {"name": "ask_roots", "arguments": {}, **extra,
                      "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                "io.modelcontextprotocol/clientCapabilities": {"roots": {}}}}
            return post(gw.url("org-1"), {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params},
                        version=MODERN, headers={"Mcp-Method": "tools/call", "Mcp-Name": "ask_roots", **who})

        key, _, state = parked(call(a, alice))
        answer = {key: {"roots": [{"uri": ROOTS[0]}]}}
        r = call(b, carol, requestState=state, inputResponses=answer)
        assert r.status_code == 400 and rpc_error(r)["code"] == -32602, r.text
        r = call(b, alice, requestState=state, inputResponses=answer)
        assert r.status_code == 200, r.text
        assert json.loads(result_of(r)["content"][0]["text"]) == {"roots": ROOTS[:1]}, r.text


def test_a_modern_clients_calls_on_any_node_share_one_hidden_session(three):
    """One hidden upstream session per caller's client, whichever nodes its
    calls reach; a call parked in it on one node is answered on another."""
    a, b, c = three
    client = {"name": f"hopper-{random.random()}", "version": "1"}
    for gw in (a, b, c, a):
        r = modern_call(gw.url("stateful"), "add", {"a": 1, "b": 2}, client=client)
        assert result_of(r)["content"][0]["text"] == "3", r.text
    hidden = [s for s in a.sessions("stateful")
              if s["transport"] == "hidden" and (s.get("client_info") or {}).get("name") == client["name"]]
    assert len(hidden) == 1, hidden
    key, _, state = parked(modern_call(c.url("stateful"), "ask_roots", {}, client=client))
    r = modern_call(b.url("stateful"), "ask_roots", {}, client=client, requestState=state,
                    inputResponses={key: {"roots": [{"uri": ROOTS[1]}]}})
    assert json.loads(result_of(r)["content"][0]["text"]) == {"roots": ROOTS[1:]}, r.text
    assert [s["id"] for s in b.sessions("stateful") if s["id"] == hidden[0]["id"]] == [hidden[0]["id"]]


def test_leaving_a_call_resumed_on_another_node_cancels_it(three, stateful_upstream):
    """The client reads the rest of a call parked on A from B and leaves
    early: A cancels the call at the upstream."""
    a, b, _ = three
    tag = f"nodes-cancel-{random.random()}"
    args = {"seconds": 30, "tag": tag}
    key, _, state = parked(modern_call(a.url("stateful"), "ask_roots_then_sleep", args))
    http, stream = modern_stream(b.url("stateful"), "ask_roots_then_sleep", args, state,
                                 {key: {"roots": [{"uri": ROOTS[0]}]}})
    with http, stream as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        wait_until("the upstream got the roots", lambda: stateful_upstream.event_time(tag, "answered") is not None,
                   timeout=10)
    left = time.monotonic()
    wait_until("the upstream call cancelled", lambda: stateful_upstream.event_time(tag, "cancelled") is not None,
               timeout=5)
    print(f"client left B -> call cancelled on A's upstream session: {(time.monotonic() - left) * 1000:.0f} ms")
    assert stateful_upstream.event_time(tag, "finished") is None


class BusListener:
    """A raw RESP subscriber to the node bus: the notices the nodes send
    each other, as the test sees them."""

    def __init__(self, redis: RedisServer, channel: str):
        import socket

        self.sock = socket.create_connection(("127.0.0.1", redis.port), timeout=10)
        command = ["SUBSCRIBE", channel]
        wire = f"*{len(command)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
        self.sock.sendall(wire.encode())
        self.file = self.sock.makefile("rb")
        assert self.read()[0] == b"subscribe"

    def read(self):
        """One RESP value (arrays of bulk strings and integers suffice)."""
        line = self.file.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        if kind == b"$":
            data = self.file.read(int(rest) + 2)
            return data[:-2]
        if kind == b":":
            return int(rest)
        raise AssertionError(f"unexpected RESP: {line!r}")

    def next_notice(self) -> dict:
        """The next notice on the bus (event entries are skipped)."""
        while True:
            _, _, payload = self.read()
            if payload.startswith(b"n\n"):
                return json.loads(payload.split(b"\n", 2)[2])

    def close(self) -> None:
        self.sock.close()


def test_a_cancel_goes_on_the_bus_only_for_a_request_running_elsewhere(three, redis, replicas):
    """A 2025 client's call runs on A; its cancellations arrive at B. One
    for an id nothing runs is answered 202 and goes nowhere; the call's own
    reaches A, whose stream for it ends without a result."""
    a, b, _ = three
    url_a, url_b = a.url("s25"), b.url("s25")
    sid = initialize(url_a)
    tag = f"nodes-bus-cancel-{random.random()}"
    lines: list[str] = []

    def call() -> None:
        body = {"jsonrpc": "2.0", "id": 77, "method": "tools/call",
                "params": {"name": "sleep_then_return", "arguments": {"seconds": 30, "tag": tag}}}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=40)) as http, \
                http.stream("POST", url_a, json=body, headers={
                    "Accept": ACCEPT_BOTH, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}) as r:
            lines.extend(r.iter_lines())

    bus = BusListener(redis, "nodes:bus")
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        wait_until("the tool started",
                   lambda: any(r.event_time(tag, "started") is not None for r in replicas), timeout=10)
        wait_until("Redis knows the call runs on A", lambda: subprocess.run(
            ["redis-cli", "-p", str(redis.port), "HEXISTS", f"nodes:f:{sid}", "77"],
            capture_output=True, text=True, timeout=5).stdout.strip() == "1", timeout=10)
        for target in (999, 77):
            r = post(url_b, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                             "params": {"requestId": target, "reason": "user"}}, session=sid)
            assert r.status_code == 202, r.text
        # Notices leave B in order: one for 999 would come first.
        notice = bus.next_notice()
        while notice.get("t") != "cancel":
            notice = bus.next_notice()
        assert notice == {"t": "cancel", "session": sid, "id": 77}, notice
        caller.join(timeout=10)
        assert not caller.is_alive(), "the cancelled call's stream did not end"
        assert not any('"id":77' in line.replace(" ", "") for line in lines if line.startswith("data:")), lines
    finally:
        bus.close()


def modern_stream(url: str, name: str, args: dict, state: str, answers: dict):
    """A raw 2026-07-28 retry of tools/call with its input, streamed (a
    context manager)."""
    params = {"name": name, "arguments": args, "requestState": state, "inputResponses": answers,
              "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                        "io.modelcontextprotocol/clientCapabilities": {"roots": {}}}}
    headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json", "MCP-Protocol-Version": MODERN,
               "Mcp-Method": "tools/call", "Mcp-Name": name}
    body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}
    http = httpx2.Client(timeout=httpx2.Timeout(10, read=40))
    return http, http.stream("POST", url, json=body, headers=headers)


def test_calls_on_a_node_that_dies_end_with_502_or_an_error(log_dir, replicas, redis, orgs, three,
                                                            stateful_upstream):
    """The node holding calls dies. A call it was streaming to a client of
    another node ends there with an error once the node's heartbeat is gone;
    a retry for a call it held parked gets 502 at once. Both say to call
    again: nothing hangs."""
    a = three[0]
    tag = f"nodes-owner-dies-{random.random()}"
    args = {"seconds": 60, "tag": tag}
    with Nodes([redis_gateway(log_dir, replicas, redis, "node-d", "nodes:", orgs=orgs)]) as (d,):
        key1, _, streaming = parked(modern_call(d.url("stateful"), "ask_roots_then_sleep", args))
        key2, _, waiting = parked(modern_call(d.url("stateful"), "ask_roots", {}))
        http, stream = modern_stream(a.url("stateful"), "ask_roots_then_sleep", args, streaming,
                                     {key1: {"roots": []}})
        with http, stream as r:
            assert r.status_code == 200, r.read()
            wait_until("the upstream got the roots", lambda: stateful_upstream.event_time(tag, "answered") is not None,
                       timeout=10)
            d.kill()
            died = time.monotonic()
            messages = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
            ended = time.monotonic() - died
        print(f"a call streamed from a dead node ended {ended:.1f} s after the node died")
        assert len(messages) == 1 and messages[0]["id"] == 9, messages
        assert "stopped" in messages[0]["error"]["message"], messages
        assert ended < 25, ended
        asked = time.monotonic()
        r = modern_call(a.url("stateful"), "ask_roots", {}, timeout=30, requestState=waiting,
                        inputResponses={key2: {"roots": []}})
        waited = time.monotonic() - asked
        assert r.status_code == 502, r.text
        error = rpc_error(r)
        assert error["code"] == -32002, error
        assert "is gone" in error["message"] and "call again without requestState" in error["message"], error
        assert waited < 5, waited
    # The call can simply be made again, on any node.
    key, _, state = parked(modern_call(a.url("stateful"), "ask_roots", {}))
    r = modern_call(a.url("stateful"), "ask_roots", {}, requestState=state, inputResponses={key: {"roots": []}})
    assert json.loads(result_of(r)["content"][0]["text"]) == {"roots": []}, r.text


def background_streams(gw: Gateway) -> int:
    """Sessions of org `modern` whose upstream listen this node holds."""
    for line in gw.metrics().splitlines():
        if line.startswith('ratatosk_background_streams{org="modern"}'):
            return int(line.split()[-1])
    return 0


def listens(upstream: Example, sid: str) -> int:
    """The subscriptions/listen requests of session `sid` the upstream got
    (of its last 200 requests)."""
    return sum(1 for h in upstream.seen_headers()
               if h.get("mcp-method") == "subscriptions/listen" and h.get("ratatosk-session") == sid)


def drain_until(events: SseReader, gw: Gateway, sid: str, n: int) -> None:
    """Publishes note `n` through `gw` and reads up to it: only
    tools/list_changed may come first (more raises may have reached the
    listen before the first arrived)."""
    assert gw.publish(sid, note(n)).status_code == 202
    while (message := events.next_message()[1]) != note(n):
        assert message["method"] == "notifications/tools/list_changed", message


def test_one_node_holds_a_sessions_upstream_listen(log_dir, replicas, redis, orgs, three, modern_upstream):
    """A session of a modern upstream has one upstream listen whichever
    nodes serve its GET streams: a client that moves its stream from D to C
    gets each notification once. When D dies, C takes the listen over."""
    a, _, c = three
    with Nodes([redis_gateway(log_dir, replicas, redis, "node-e", "nodes:", orgs=orgs)]) as (d,):
        sid = initialize(a.url("modern"))
        with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http:
            with http.stream("GET", d.url("modern"), headers=get_headers(sid)) as stream:
                assert stream.status_code == 200
                wait_until("D holds the session's listen", lambda: background_streams(d) == 1, timeout=10)
            with http.stream("GET", c.url("modern"), headers=get_headers(sid)) as stream:
                assert stream.status_code == 200
                events = SseReader(stream)
                next_list_changed(events, modern_upstream)
                drain_until(events, a, sid, 1)
                # C serves the stream; the listen stays with D alone.
                assert (background_streams(c), background_streams(d)) == (0, 1)
                # A subscription made through C reaches D, which listens again
                # with the new filter.
                opened = listens(modern_upstream, sid)
                r = post(c.url("modern"), {"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe",
                                           "params": {"uri": "file:///watched"}}, session=sid)
                assert r.status_code == 200 and "result" in r.json(), r.text
                wait_until("D listens again", lambda: listens(modern_upstream, sid) == opened + 1, timeout=10)
                assert (background_streams(c), background_streams(d)) == (0, 1)
                d.kill()
                died = time.monotonic()
                wait_until("C takes the listen over", lambda: background_streams(c) == 1, timeout=30)
                print(f"listen taken over {time.monotonic() - died:.1f} s after its node died")
                next_list_changed(events, modern_upstream)
                drain_until(events, a, sid, 2)
                assert background_streams(c) == 1
        r = httpx2.delete(a.url("modern"), headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"},
                          timeout=10)
        assert r.status_code == 204, r.text
        wait_until("C drops the listen of the ended session", lambda: background_streams(c) == 0, timeout=10)


def test_a_stream_resumes_on_another_node_after_its_node_dies(log_dir, replicas, redis):
    """SIGKILL the node holding the stream while events are published; the
    client resumes on another node with Last-Event-ID and gets every event
    once, in order."""
    total = 300
    with Nodes([redis_gateway(log_dir, replicas, redis, f"death-{c}", "death:") for c in "abc"]) as (a, b, c):
        sid = initialize(a.url("s25"))
        failures: list[str] = []
        published = threading.Event()

        def publish_all() -> None:
            for n in range(total):
                r = (a, c)[n % 2].publish(sid, note(n))
                if r.status_code != 202:
                    failures.append(f"publish {n}: {r.status_code} {r.text}")
                    return
                time.sleep(0.002)
            published.set()

        got: list[int] = []
        last_id = None
        with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http:
            publisher = threading.Thread(target=publish_all, daemon=True)
            with http.stream("GET", b.url("s25"), headers=get_headers(sid)) as stream:
                assert stream.status_code == 200
                events = SseReader(stream)
                publisher.start()
                while len(got) < 40:
                    last_id, message = events.next_message()
                    got.append(message["params"]["data"])
                b.kill()
            assert not published.is_set(), "the publisher finished before node B died: raise `total`"
            with http.stream("GET", c.url("s25"), headers=get_headers(sid, last_id)) as stream:
                assert stream.status_code == 200
                events = SseReader(stream)
                while len(got) < total and not failures:
                    _, message = events.next_message()
                    got.append(message["params"]["data"])
            publisher.join(30)
        assert not failures, failures
        assert got == list(range(total)), f"lost or repeated: {sorted(set(range(total)) ^ set(got))[:20]}"
        # The dead node's stream id means nothing to the others (nothing to check
        # there); the nodes left are healthy.
        a.assert_healthy()
        c.assert_healthy()


async def test_load_1000_sessions_100_events_while_clients_hop(three):
    """1,000 sessions over 3 nodes, 100 events each published through random
    nodes while every client hops from node to node with Last-Event-ID:
    nothing lost, nothing repeated, order kept per stream."""
    sessions, per_session = 1000, 100
    rng = random.Random(6)
    mcp = [rawhttp.Pool("127.0.0.1", gw.port, 16) for gw in three]
    admin = [rawhttp.Pool("127.0.0.1", gw.admin_port, 32) for gw in three]
    auth = {"Authorization": f"Bearer {PUBLISH_SECRET}", "Content-Type": "application/json"}
    path = three[0].url("s25").removeprefix(three[0].origin)

    async def open_session(i: int) -> str:
        return await raw_initialize(mcp[i % 3], path, f"load-{i}")

    try:
        sids = await asyncio.gather(*(open_session(i) for i in range(sessions)))
        received: dict[str, list[int]] = {sid: [] for sid in sids}
        hops = {sid: 0 for sid in sids}

        async def publish(sid: str) -> None:
            for n in range(per_session):
                status, _, answer = await rng.choice(admin).request(
                    "POST", f"/sessions/{sid}/messages", auth, json.dumps(note(n)).encode())
                assert status == 202, answer

        async def read(i: int, sid: str) -> None:
            last_id = None
            at = i % 3
            got = received[sid]
            while len(got) < per_session:
                # Each connection takes a random run of events, then hops.
                run = rng.randint(10, 40)
                events = rawhttp.sse_messages("127.0.0.1", three[at].port, path, get_headers(sid, last_id))
                async with contextlib.aclosing(events):
                    async for ev_id, message in events:
                        got.append(message["params"]["data"])
                        last_id = ev_id
                        run -= 1
                        if run == 0 or len(got) >= per_session:
                            break
                hops[sid] += 1
                at = (at + 1) % 3

        started = time.monotonic()
        readers = [asyncio.create_task(read(i, sid)) for i, sid in enumerate(sids)]
        await asyncio.wait_for(asyncio.gather(*(publish(sid) for sid in sids)), timeout=600)
        await asyncio.wait_for(asyncio.gather(*readers), timeout=120)
        elapsed = time.monotonic() - started
    finally:
        for pool in mcp + admin:
            pool.close()
    wrong = {sid: got for sid, got in received.items() if got != list(range(per_session))}
    total = sum(len(g) for g in received.values())
    print(f"{total} events to {sessions} sessions in {elapsed:.1f} s; {sum(hops.values())} connections")
    assert not wrong, f"{len(wrong)} sessions lost, repeated or reordered events, e.g. {next(iter(wrong.values()))}"
    assert total == sessions * per_session
    assert min(hops.values()) >= 3, "every client hopped across the nodes"
    for gw in three:
        assert gw.admin_get("/readyz").json()["events"]["dropped"] == 0


def test_redis_restart_keeps_the_sessions_redis_kept(log_dir, replicas):
    """Redis with its append-only file restarts: readiness goes down and comes
    back on every node, by itself; sessions and their logs survive, and a
    stream left open across the restart gets what is published after it."""
    redis = RedisServer(log_dir, name="redis-aof", persist=True).start_and_wait()
    try:
        with Nodes([redis_gateway(log_dir, replicas, redis, f"aof-{c}", "aof:") for c in "ab"]) as (a, b):
            sid = initialize(a.url("s25"))
            with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
                    http.stream("GET", b.url("s25"), headers=get_headers(sid)) as stream:
                events = SseReader(stream)
                assert a.publish(sid, note(0)).status_code == 202
                first_id, message = events.next_message()
                assert message == note(0)
                redis.stop()
                for gw in (a, b):
                    wait_until(f"{gw.name} unready", lambda gw=gw: gw.admin_get("/readyz").status_code == 503,
                               timeout=10)
                events.next_comment()  # keep-alives go on meanwhile
                r = a.publish(sid, note(1))
                assert r.status_code == 503, r.text
                redis.start_and_wait()
                for gw in (a, b):
                    wait_until(f"{gw.name} ready again", lambda gw=gw: gw.admin_get("/readyz").status_code == 200,
                               timeout=15)
                assert a.publish(sid, note(2)).status_code == 202
                _, message = events.next_message()
                assert message == note(2), "the stream open across the restart gets new events"
            r = post(b.url("s25"), {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                    "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}, session=sid)
            assert r.status_code == 200, r.text
            # The log survived too: a resume from the first event on A.
            with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
                    http.stream("GET", a.url("s25"), headers=get_headers(sid, first_id)) as stream:
                _, message = SseReader(stream).next_message()
                assert message == note(2)
    finally:
        redis.stop()


def test_a_logout_on_one_node_refuses_the_token_on_another_within_a_second(log_dir, replicas, redis, keycloak):
    """Keycloak's back-channel logout reaches node A only; node C, which has
    the token cached (jwt: checked locally; introspect: cached verdict), must
    refuse it within a second all the same; node D, started after the
    logout, refuses it from its start."""
    routes = {"org-1": org(replicas, auth="jwt", organization="org-1"),
              "org-1-introspect": org(replicas, auth="introspect", organization="org-1")}

    def node(name: str) -> Gateway:
        return auth_node(log_dir, replicas, redis, keycloak, f"logout-{name}", "logout:", routes)

    gateways = [node("a"), node("c")]
    [client] = keycloak.admin("GET", "/clients", params={"clientId": "mcp-client"}).json()
    before = client["attributes"]["backchannel.logout.url"]
    with Nodes(gateways) as (a, c):
        client["attributes"]["backchannel.logout.url"] = f"http://127.0.0.1:{a.port}/auth/backchannel-logout"
        assert keycloak.admin("PUT", f"/clients/{client['id']}", json=client).status_code == 204
        try:
            token = keycloak.token("alice")
            auth = {"Authorization": f"Bearer {token}"}
            init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                               "clientInfo": {"name": "logout", "version": "1"}}}
            for route in routes:  # the token is now cached on C
                r = post(c.url(route), init, version=None, headers=auth)
                assert r.status_code == 200, r.text
            keycloak.logout_user("alice")
            started = time.monotonic()
            refused: dict[str, float] = {}
            while len(refused) < len(routes) and time.monotonic() - started < 1.0:
                for route in routes:
                    if route not in refused and post(c.url(route), init, version=None,
                                                     headers=auth).status_code == 401:
                        refused[route] = time.monotonic() - started
            assert set(refused) == set(routes), f"still accepted on C after 1 s: {set(routes) - set(refused)}"
            print("refused on C after (s):", {k: round(v, 3) for k, v in refused.items()})
            # A node that was not running at the logout reads it from Redis
            # before it reports ready: the (still valid) JWT is refused there.
            with Nodes([node("d")]) as (d,):
                for route in routes:
                    r = post(d.url(route), init, version=None, headers=auth)
                    assert r.status_code == 401, (route, r.status_code, r.text)
            assert post(c.url("org-1"), init, version=None,
                        headers={"Authorization": f"Bearer {keycloak.token('alice')}"}).status_code == 200
        finally:
            client["attributes"]["backchannel.logout.url"] = before
            assert keycloak.admin("PUT", f"/clients/{client['id']}", json=client).status_code == 204
