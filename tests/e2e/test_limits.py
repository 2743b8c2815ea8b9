"""Limits (issue 14): what one caller sends cannot exhaust the gateway.

Each refusal is a precise HTTP status with a JSON-RPC error that names the
limit, it is counted in `ratatosk_refused_total`, and nothing else is harmed:
the next request within the limit works.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import httpx2
import pytest

from conftest import BASE_PATH  # noqa: F401  (shared fixtures live there)
from harness import (ACCEPT_BOTH, PROTOCOL, Example, Gateway, SseReader, initialize, org, post, rpc_error,
                     running, started, wait_until)

MAX_PER_SUBJECT = 3
MAX_TOTAL = 5


def init_body(capabilities: dict | None = None, rid: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "initialize",
            "params": {"protocolVersion": PROTOCOL, "capabilities": capabilities or {},
                       "clientInfo": {"name": "limits", "version": "1"}}}


def refused(gateway: Gateway, org_name: str, limit: str) -> int:
    """The gateway's count of refusals by `limit` in `org_name`."""
    pattern = rf'ratatosk_refused_total{{limit="{limit}",org="{org_name}"}} (\d+)'
    found = re.search(pattern, gateway.metrics())
    return int(found.group(1)) if found else 0


def gauge(gateway: Gateway, name: str) -> int:
    found = re.search(rf"^ratatosk_{name} (\d+)", gateway.metrics(), re.MULTILINE)
    assert found, f"ratatosk_{name} is missing"
    return int(found.group(1))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stateful_replica(log_dir):
    """A replica of our own, so its session count is this module's alone."""
    with started(Example("python-stateful", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def limited(log_dir, replicas, stateful_replica, modern_upstream):
    gw = Gateway(log_dir, {
        "a": org(replicas),
        "b": org(replicas),
        "stateful": org([stateful_replica], era="stateful-2025"),
        "modern": org([modern_upstream], era="modern"),
    }, name="gateway-limits", max_body_bytes=2 * 1024 * 1024, extra={
        "sessions": {"max_per_subject": MAX_PER_SUBJECT, "max_total": MAX_TOTAL, "max_client_bytes": 4096,
                     "max_subscriptions": 2, "max_in_flight": 40},
    })
    with running(gw):
        yield gw


def delete(url: str, sid: str) -> None:
    r = httpx2.delete(url, headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": PROTOCOL}, timeout=5)
    assert r.status_code == 204, r.text


def test_sessions_per_user_and_in_all_are_capped(limited):
    a, b = limited.url("a"), limited.url("b")
    mine = [initialize(a) for _ in range(MAX_PER_SUBJECT)]
    r = post(a, init_body(), version=None)
    assert r.status_code == 429, r.text
    err = rpc_error(r)
    assert err["code"] == -32000 and "sessions.max_per_subject" in err["message"], err
    assert err["message"].count("3 sessions in org 'a'") == 1, err
    assert refused(limited, "a", "sessions_per_subject") == 1
    # The same user in another org is counted apart, up to the total.
    other = [initialize(b) for _ in range(MAX_TOTAL - MAX_PER_SUBJECT)]
    r = post(b, init_body(), version=None)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after"), r.headers
    assert "sessions.max_total" in rpc_error(r)["message"]
    assert refused(limited, "b", "sessions_total") == 1
    # A legacy /sse stream is a session too.
    r = httpx2.get(limited.url("b", "sse"), headers={"Accept": "text/event-stream"}, timeout=5)
    assert r.status_code == 503, r.text
    # Ending sessions makes room; the sessions kept work on.
    delete(a, mine.pop())
    delete(b, other.pop())
    mine.append(initialize(a))
    r = post(a, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                 "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}, session=mine[0])
    assert r.status_code == 200 and '"3"' in r.text, r.text
    for sid in mine:
        delete(a, sid)
    for sid in other:
        delete(b, sid)


def test_client_data_over_the_limit_is_refused_and_costs_nothing(limited):
    url = limited.url("a")
    blob = {"experimental": {"x": "y" * (1024 * 1024)}}
    size = len(json.dumps(blob, separators=(",", ":")))

    def refuse(n: int) -> None:
        for _ in range(n):
            r = post(url, init_body(blob), version=None, timeout=30)
            assert r.status_code == 400, r.text
            err = rpc_error(r)
            assert err["code"] == -32602, err
            assert f"params.capabilities is {size} bytes" in err["message"], err
            assert "sessions.max_client_bytes" in err["message"], err

    # The allocator keeps what the first requests' buffers took (about
    # 40 MB here, whatever their number): measured after them.
    refuse(20)
    before = rss_kib(limited.pid)
    refuse(100)
    grown = rss_kib(limited.pid) - before
    print(f"RSS growth over 100 refused 1 MB initializes: {grown} KiB")
    assert refused(limited, "a", "client_data") == 120
    assert limited.sessions("a") == [], "nothing was kept"
    # Kept, they would be over 100 MB (147 MB before the limit).
    assert grown < 40 * 1024, grown
    # Within the limit it works.
    sid = initialize(url)
    delete(url, sid)


def test_a_2026_client_with_huge_capabilities_is_refused(limited):
    r = post(limited.url("stateful"), {
        "jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 1, "b": 2}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"experimental": {"x": "y" * 10000}}}}},
        version="2026-07-28", headers={"Mcp-Method": "tools/call", "Mcp-Name": "add"})
    assert r.status_code == 400, r.text
    err = rpc_error(r)
    assert err["code"] == -32602 and "clientCapabilities" in err["message"], err


def test_subscriptions_per_session_are_capped(limited):
    url = limited.url("modern")
    sid = initialize(url)

    def subscribe(method: str, uri: str) -> httpx2.Response:
        return post(url, {"jsonrpc": "2.0", "id": 9, "method": method, "params": {"uri": uri}}, session=sid)

    for uri in ("test://a", "test://b", "test://a"):
        r = subscribe("resources/subscribe", uri)
        assert r.status_code == 200 and "error" not in r.json(), r.text
    r = subscribe("resources/subscribe", "test://c")
    assert r.status_code == 400, r.text
    err = rpc_error(r)
    assert err["code"] == -32602 and "sessions.max_subscriptions" in err["message"], err
    assert refused(limited, "modern", "subscriptions") == 1
    r = subscribe("resources/subscribe", "test://" + "x" * 5000)
    assert r.status_code == 400 and "at most 4096" in rpc_error(r)["message"], r.text
    assert subscribe("resources/unsubscribe", "test://a").status_code == 200
    assert subscribe("resources/subscribe", "test://c").status_code == 200
    delete(url, sid)


class LegacyClient:
    """A raw 2024-11-05 client: the /sse stream, and POSTs to its endpoint."""

    def __init__(self, gateway: Gateway, org_name: str):
        self.http = httpx2.Client(timeout=httpx2.Timeout(10, read=30))
        self.origin = gateway.origin
        self.stream = self.http.stream("GET", gateway.url(org_name, "sse"), headers={"Accept": "text/event-stream"})
        response = self.stream.__enter__()
        assert response.status_code == 200, response.status_code
        self.events = SseReader(response)
        first = self.events.next_event()
        assert first.event == "endpoint", first
        self.endpoint = self.origin + first.data

    def post(self, body) -> httpx2.Response:
        return self.http.post(self.endpoint, content=json.dumps(body),
                              headers={"Content-Type": "application/json"})

    def close(self) -> None:
        self.stream.__exit__(None, None, None)
        self.http.close()


def test_legacy_messages_take_in_flight_slots(limited):
    """40 slots: 30 slow calls hold 30 of them, and a POST that needs more
    than the 10 left is refused whole, notifications counted too."""
    client = LegacyClient(limited, "a")

    def calls(first: int, n: int, seconds: float) -> list[dict]:
        return [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                 "params": {"name": "sleep_then_return", "arguments": {"seconds": seconds}}}
                for i in range(first, first + n)]

    try:
        assert client.post(calls(0, 30, 3)).status_code == 202
        progress = [{"jsonrpc": "2.0", "method": "notifications/progress",
                     "params": {"progressToken": i, "progress": 1}} for i in range(11)]
        r = client.post(progress)
        assert r.status_code == 429, r.text
        assert "sessions.max_in_flight" in rpc_error(r)["message"]
        assert client.post(calls(30, 10, 0.1)).status_code == 202
        r = client.post(calls(40, 1, 0.1)[0])
        assert r.status_code == 429, r.text
        assert refused(limited, "a", "in_flight") >= 2
        answered = set()
        while len(answered) < 40:
            _, message = client.events.next_message()
            assert "result" in message, message
            answered.add(message["id"])
        assert answered == set(range(40))
        # The slots are free again.
        assert client.post(calls(50, 1, 0.1)[0]).status_code == 202
        _, message = client.events.next_message()
        assert message["id"] == 50, message
    finally:
        client.close()


def test_a_batch_of_initialize_leaves_one_upstream_session(limited, stateful_replica):
    def open_upstream() -> int:
        return httpx2.get(f"{stateful_replica.base}/debug/sessions", timeout=5).json()["open"]

    before = open_upstream()
    client = LegacyClient(limited, "stateful")
    try:
        r = client.post([init_body(rid=i) for i in range(32)])
        assert r.status_code == 202, r.text
        ids = set()
        while len(ids) < 32:
            _, message = client.events.next_message()
            assert message["result"]["protocolVersion"] == PROTOCOL, message
            ids.add(message["id"])
        # Each replaced upstream session is ended in the background.
        wait_until("all but one upstream session ended", lambda: open_upstream() == before + 1, timeout=10)
        assert client.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
        assert client.post({"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                            "params": {"name": "add", "arguments": {"a": 2, "b": 2}}}).status_code == 202
        _, message = client.events.next_message()
        assert message["id"] == 99 and message["result"]["content"][0]["text"] == "4", message
    finally:
        client.close()
    wait_until("the last upstream session ended with the gateway session",
               lambda: open_upstream() == before, timeout=10)


def test_sighup_is_logged_not_fatal(limited):
    os.kill(limited.pid, signal.SIGHUP)
    wait_until("the gateway logged the SIGHUP", lambda: "SIGHUP received" in limited.log_text(), timeout=5,
               alive=limited.death)
    sid = initialize(limited.url("a"))
    delete(limited.url("a"), sid)
    limited.assert_healthy()


# ----- connections ---------------------------------------------------------------------

MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def few_connections(log_dir, replicas):
    gw = Gateway(log_dir, {"a": org(replicas)}, name="gateway-connections", extra={
        "limits": {"max_body_bytes": 65536, "body_read_timeout": "2s", "head_read_timeout": "1s",
                   "max_connections": MAX_CONNECTIONS}})
    with running(gw):
        yield gw


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(10)
    return s


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server writes until it closes, and when it closed."""
    started_at = time.monotonic()
    s.settimeout(limit)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data, time.monotonic() - started_at
        data += chunk


def test_a_request_head_must_arrive_within_the_deadline(few_connections):
    s = connect(few_connections.port)
    try:
        # One byte every 200 ms: each read is quick, the head never ends.
        head = b"POST /a/mcp HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        cut_after = None
        started_at = time.monotonic()
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - started_at
                break
            time.sleep(0.2)
        if cut_after is None:
            _, cut_after = read_until_closed(s, 5)
            cut_after += time.monotonic() - started_at
    finally:
        s.close()
    print(f"a trickled head was cut after {cut_after:.1f} s (limits.head_read_timeout: 1s)")
    assert cut_after < 5, cut_after
    few_connections.assert_healthy()


def test_connections_over_the_cap_get_503_and_are_counted(few_connections):
    url = few_connections.url("a", "sse")
    streams = []
    try:
        with httpx2.Client(timeout=httpx2.Timeout(5, read=30), limits=httpx2.Limits(max_connections=10)) as http:
            for _ in range(MAX_CONNECTIONS):
                stream = http.stream("GET", url, headers={"Accept": "text/event-stream"})
                response = stream.__enter__()
                assert response.status_code == 200
                streams.append(stream)
            wait_until("the gauge counts the streams",
                       lambda: gauge(few_connections, "connections") == MAX_CONNECTIONS, timeout=5)
            s = connect(few_connections.port)
            answer, _ = read_until_closed(s, 5)
            s.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert "limits.max_connections" in body["error"]["message"], body
            assert gauge(few_connections, "connections_refused_total") >= 1
            # One stream closes: there is room again.
            streams.pop().__exit__(None, None, None)
            wait_until("a connection is free", lambda: gauge(few_connections, "connections") < MAX_CONNECTIONS,
                       timeout=5)
            r = httpx2.post(few_connections.url("a"), content=json.dumps(init_body()),
                            headers={"Content-Type": "application/json", "Accept": ACCEPT_BOTH}, timeout=5)
            assert r.status_code == 200, r.text
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
    few_connections.assert_healthy()
