"""The era bridge (issue 5): every client era against every upstream era,
through the gateway, with the official MCP clients and the real example
upstreams.

Client eras: 2024-11-05 HTTP+SSE (`sse_client`), 2025 Streamable HTTP (the
`mcp` 2.x `ClientSession`, which speaks 2025-11-25) and 2026-07-28 (the `mcp`
2.x `Client` in modern mode). Upstream eras: `stateless-2025`
(python-fastmcp, FastMCP 2.x; typescript), `stateful-2025` (python-stateful,
FastMCP 2.x with sessions; typescript --stateful) and `modern` (python-modern,
`mcp` 2.3 server; go, go-sdk v1.8).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import httpx2
import mcp_types as mt
import pytest
from mcp.shared.exceptions import MCPError

from harness import (ACCEPT_BOTH, CLIENT_ERAS, MODERN, ROOT, ROOTS, Example, all_started, Gateway, SseReader, client, list_roots,
                     initialize, modern_call, next_list_changed, org, post, result_of, rpc_error, running,
                     started, streamable_session, wait_until)

pytestmark = pytest.mark.anyio

UNANSWERABLE = "stateless-2025 upstream cannot receive the answer"


@pytest.fixture(scope="module")
def go_upstream(log_dir):
    with started(Example("go", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def ts_upstream(log_dir):
    with started(Example("typescript", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def stateful_upstreams(log_dir):
    a, b = Example("python-stateful", log_dir), Example("python-stateful", log_dir)
    with started(a), started(b):
        yield [a, b]


@pytest.fixture(scope="module")
def ts_stateful_upstream(log_dir):
    with started(Example("typescript", log_dir, "--stateful")) as up:
        yield up


@pytest.fixture(scope="module")
def loss_upstreams(log_dir):
    """Stateful replicas the loss tests restart and stop: one alone (org
    "loss-1"), two together (org "loss-2")."""
    with all_started([Example("python-stateful", log_dir) for _ in range(3)]) as ups:
        yield ups


@pytest.fixture(scope="module")
def eras_gateway(log_dir, replicas, modern_upstream, go_upstream, ts_upstream, stateful_upstreams,
                 ts_stateful_upstream, loss_upstreams):
    gw = Gateway(
        log_dir,
        {
            "stateful": org(stateful_upstreams, era="stateful-2025"),
            "auto-stateful": org(stateful_upstreams[:1], era="auto"),
            "ts-stateful": org([ts_stateful_upstream], era="stateful-2025"),
            "loss-1": org(loss_upstreams[:1], era="stateful-2025"),
            "loss-2": org(loss_upstreams[1:], era="stateful-2025"),
            "s25": org(replicas),
            "modern": org([modern_upstream.url], era="modern"),
            "modern-3": org([modern_upstream.url], era="modern", max_input_rounds=3),
            "auto-modern": org([modern_upstream.url], era="auto"),
            "auto-s25": org(replicas, era="auto"),
            "go": org([go_upstream.url], era="modern"),
            "ts": org([ts_upstream.url]),
        },
        name="eras-gateway",
    )
    with running(gw):
        yield gw


UPSTREAMS = {"s25": "stateless-2025", "modern": "modern", "stateful": "stateful-2025"}


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_matrix_list_add_and_progress(eras_gateway, era, upstream):
    async with client(era, eras_gateway, upstream) as c:
        assert {"add", "slow_count", "ask_roots", "confirm", "sleep_then_return"} <= await c.tool_names()
        assert await c.call("add", {"a": 20, "b": 22}) == "42"
        seen: list[float] = []

        async def on_progress(progress, total, message) -> None:
            seen.append(progress)

        assert await c.call("slow_count", {"n": 3}, progress=on_progress) == "counted to 3"
        assert seen == [1, 2, 3]


@pytest.mark.parametrize("upstream", ["modern", "stateful"])
@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_matrix_roots_and_elicitation_answers_reach_the_tool(eras_gateway, era, upstream):
    """A modern upstream asks by InputRequiredResult, a stateful one by
    requests on its session; either way the client's answers reach the
    tool's result."""
    asked: list[str] = []

    async def answer(ctx, params):
        asked.append(params.message)
        return mt.ElicitResult(action="accept", content={"confirmed": False})

    async with client(era, eras_gateway, upstream, elicitation_callback=answer) as c:
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
        assert json.loads(await c.call("confirm", {"question": f"ship {era}?"})) == {
            "action": "accept", "confirmed": False}
        assert asked == [f"ship {era}?"]


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_matrix_stateless_2025_questions_fail_fast_and_clearly(eras_gateway, era):
    """A stateless 2025 upstream cannot get an answer back from any client
    (it would reach a fresh transport), so the call fails at once with an
    error that says why, instead of hanging until the tool's own timeout."""
    async with client(era, eras_gateway, "s25") as c:
        for tool, args in [("ask_roots", {}), ("confirm", {"question": "ok?"})]:
            started = time.monotonic()
            with pytest.raises(MCPError) as failed:
                await c.call(tool, args)
            assert UNANSWERABLE in str(failed.value), failed.value
            assert time.monotonic() - started < 5
        assert await c.call("add", {"a": 1, "b": 1}) == "2"


async def test_a_client_without_the_capability_gets_a_clear_error(eras_gateway):
    async with streamable_session(eras_gateway.url("modern")) as s:  # no roots callback
        started = time.monotonic()
        with pytest.raises(MCPError) as failed:
            await s.call_tool("ask_roots", {})
        # The upstream refuses with -32021 (it sees the session's declared
        # capabilities in _meta); an upstream that asked anyway would get the
        # gateway's own -32021.
        assert failed.value.error.code == -32021
        assert "roots" in failed.value.error.message
        assert time.monotonic() - started < 5


async def test_endless_input_requests_are_bounded(eras_gateway, modern_upstream):
    async with streamable_session(eras_gateway.url("modern-3"), list_roots_callback=list_roots) as s:
        with pytest.raises(MCPError) as failed:
            await s.call_tool("endless_input", {})
        assert "after 3 rounds (upstream.max_input_rounds)" in failed.value.error.message
        assert await s.call_tool("add", {"a": 1, "b": 2})
    eras_gateway.assert_healthy()


@pytest.mark.parametrize("upstream", ["modern", "stateful"])
def test_cancel_from_a_2025_client_reaches_the_upstream(eras_gateway, modern_upstream, stateful_upstreams,
                                                        upstream):
    """A modern upstream sees its response stream close; a stateful one gets
    the notifications/cancelled on its session."""
    ups = [modern_upstream] if upstream == "modern" else stateful_upstreams

    def event_time(tag: str, event: str) -> float | None:
        return next((t for up in ups if (t := up.event_time(tag, event)) is not None), None)

    url = eras_gateway.url(upstream)
    sid = initialize(url)
    tag = f"cancel-{uuid.uuid4()}"
    lines: list[str] = []

    def call() -> None:
        body = {"jsonrpc": "2.0", "id": 77, "method": "tools/call",
                "params": {"name": "sleep_then_return", "arguments": {"seconds": 30, "tag": tag}}}
        headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json",
                   "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=40)) as http, \
                http.stream("POST", url, json=body, headers=headers) as r:
            lines.extend(r.iter_lines())

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_until("the tool started", lambda: event_time(tag, "started") is not None, timeout=10)
    sent = time.time()
    r = post(url, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": 77, "reason": "user"}}, session=sid)
    assert r.status_code == 202
    wait_until("the upstream recorded the cancel",
               lambda: event_time(tag, "cancelled") is not None, timeout=5)
    assert event_time(tag, "cancelled") - sent < 1.0
    caller.join(timeout=10)
    assert not caller.is_alive()
    # The call's stream ended without a result: cancelled requests get none.
    assert not any('"id":77' in line.replace(" ", "") for line in lines if line.startswith("data:")), lines
    assert event_time(tag, "finished") is None


def test_list_changed_from_a_modern_upstream_reaches_the_get_stream(eras_gateway, modern_upstream):
    url = eras_gateway.url("modern")
    sid = initialize(url)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
            http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        events = SseReader(r)

        # The upstream listen stream opens in the background.
        next_list_changed(events, modern_upstream)


def test_modern_header_mismatch_is_32020(eras_gateway):
    url = eras_gateway.url("modern")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}
    r = post(url, body, version=MODERN, headers={"Mcp-Method": "tools/call"})
    assert r.status_code == 400
    assert rpc_error(r)["code"] == -32020
    assert "Mcp-Method" in rpc_error(r)["message"]
    eras_gateway.assert_healthy()


def test_unsupported_modern_version_is_32022_with_data(eras_gateway):
    url = eras_gateway.url("s25")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2099-01-01",
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}
    r = post(url, body, version="2099-01-01", headers={"Mcp-Method": "tools/list"})
    assert r.status_code == 400
    error = rpc_error(r)
    assert error["code"] == -32022
    assert error["data"] == {"supported": [MODERN], "requested": "2099-01-01"}
    eras_gateway.assert_healthy()


@pytest.mark.parametrize("org_name", ["modern", "go", "stateful"])
def test_a_tampered_request_state_gets_the_upstreams_own_refusal(eras_gateway, org_name):
    """Modern upstreams check their own requestState; for a stateful
    upstream, the state is the gateway's (it names the parked call) and the
    gateway refuses a tampered one the same way."""
    url = eras_gateway.url(org_name)
    first = result_of(modern_call(url, "ask_roots", {}))
    assert first["resultType"] == "input_required"
    state = first.get("requestState") or "state"
    answers = {"roots": {"roots": [{"uri": ROOTS[0]}]}}
    r = modern_call(url, "ask_roots", {}, inputResponses=answers, requestState=state + "tampered")
    error = rpc_error(r)
    assert r.status_code == 400, r.text
    assert error["code"] == -32602
    eras_gateway.assert_healthy()


def test_auto_eras_are_probed_and_shown(eras_gateway):
    def resolved() -> dict:
        orgs = eras_gateway.admin_get("/readyz").json()["orgs"]
        return {name: orgs[name]["era"]["resolved"] for name in ("auto-modern", "auto-s25", "auto-stateful")}

    wait_until("auto eras probed", lambda: None not in resolved().values(), timeout=20)
    assert resolved() == {"auto-modern": "modern", "auto-s25": "stateless-2025",
                          "auto-stateful": "stateful-2025"}
    metrics = eras_gateway.metrics()
    assert 'ratatosk_upstream_era{era="modern",org="auto-modern"} 1' in metrics
    assert 'ratatosk_upstream_era{era="stateless-2025",org="auto-s25"} 1' in metrics
    assert 'ratatosk_upstream_era{era="stateful-2025",org="auto-stateful"} 1' in metrics


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_auto_orgs_serve_every_client_era(eras_gateway, era):
    async with client(era, eras_gateway, "auto-modern") as c:
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
    async with client(era, eras_gateway, "auto-s25") as c:
        assert await c.call("add", {"a": 2, "b": 2}) == "4"
    async with client(era, eras_gateway, "auto-stateful") as c:
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_go_example_runs_add_and_ask_roots(eras_gateway, era):
    async with client(era, eras_gateway, "go") as c:
        assert await c.call("add", {"a": 2, "b": 3}) == "5"
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
        assert json.loads(await c.call("confirm", {"question": "go?"})) == {"action": "accept", "confirmed": True}


def ts_client(url: str) -> dict:
    """The TypeScript SDK client (upstream-examples/typescript/client.mjs):
    initialize, add(2, 3), ask_roots answered with file:///tmp/ts-root."""
    script = ROOT / "upstream-examples" / "typescript" / "client.mjs"
    done = subprocess.run(["node", str(script), url, "--timeout-ms", "20000"],
                          capture_output=True, text=True, timeout=60, cwd=script.parent)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("org_name", ["go", "modern", "ts-stateful"])
def test_typescript_sdk_client_gets_roots_asked(eras_gateway, org_name):
    """A TypeScript SDK client (2025 era only) runs add and ask_roots: on a
    modern upstream the gateway turns the InputRequiredResult into a
    roots/list request; on the stateful TypeScript example the upstream's
    own roots/list reaches the client and its answer goes back to the
    upstream session."""
    out = ts_client(eras_gateway.url(org_name))
    assert out["ok"], out
    assert out["add"] == "5" and not out["add_is_error"], out
    assert json.loads(out["ask_roots"]) == {"roots": ["file:///tmp/ts-root"]}, out
    assert out["roots_requests"] == 1, out


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_typescript_example_runs_add(eras_gateway, era):
    async with client(era, eras_gateway, "ts") as c:
        assert await c.call("add", {"a": 2, "b": 3}) == "5"
        assert await c.call("slow_count", {"n": 2}) == "counted to 2"


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_typescript_stateful_example_runs_add_and_ask_roots(eras_gateway, era):
    async with client(era, eras_gateway, "ts-stateful") as c:
        assert await c.call("add", {"a": 2, "b": 3}) == "5"
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
        assert json.loads(await c.call("confirm", {"question": "ts?"})) == {"action": "accept", "confirmed": True}


def reinitialized(gw: Gateway, org_name: str) -> int:
    for line in gw.metrics().splitlines():
        if line.startswith("ratatosk_bridged_total{") and f'org="{org_name}"' in line \
                and 'kind="reinitialized"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def initializes(gw: Gateway, org_name: str) -> int:
    """initialize requests the gateway answered for the org."""
    total = 0
    for line in gw.metrics().splitlines():
        if line.startswith("ratatosk_requests_total{") and f'org="{org_name}"' in line \
                and 'method="initialize"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_stateful_upstream_loss_restarted_replica(eras_gateway, loss_upstreams, era):
    """The replica holding the upstream session restarts (and answers 404
    for it): the next tools/call succeeds, the client does not initialize
    again, and the gateway re-initialized the upstream session."""
    before = reinitialized(eras_gateway, "loss-1")
    async with client(era, eras_gateway, "loss-1") as c:
        assert await c.call("add", {"a": 1, "b": 2}) == "3"
        handshakes = initializes(eras_gateway, "loss-1")
        loss_upstreams[0].restart()
        assert await c.call("add", {"a": 2, "b": 2}) == "4"
        assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
        assert initializes(eras_gateway, "loss-1") == handshakes
    # At least this session's (a session of an earlier test whose stream is
    # still closing may have been re-initialized too).
    assert reinitialized(eras_gateway, "loss-1") >= before + 1
    eras_gateway.assert_healthy()


@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_stateful_upstream_loss_replica_gone(eras_gateway, loss_upstreams, era):
    """The replica holding the upstream session goes away: the session moves
    to the other replica, and the client sees no error."""
    pair = loss_upstreams[1:]
    async with client(era, eras_gateway, "loss-2") as c:
        mark = [len(up.seen_headers()) for up in pair]
        assert await c.call("add", {"a": 1, "b": 2}) == "3"
        holders = [up for up, n in zip(pair, mark) if len(up.seen_headers()) > n]
        assert len(holders) == 1, "one replica holds the session"
        holder, other = holders[0], next(up for up in pair if up is not holders[0])
        holder.stop()
        try:
            assert await c.call("add", {"a": 5, "b": 5}) == "10"
            assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}
            assert any("mcp-session-id" in h for h in other.seen_headers())
        finally:
            starts = holder.log_text().count("READY") + 1
            holder.start()
            holder.wait_ready(timeout=60, starts=starts)
    eras_gateway.assert_healthy()


def test_modern_client_listens_through_the_gateway(eras_gateway, modern_upstream):
    """subscriptions/listen of a 2026-07-28 client is passed through and held
    open: the acknowledgement, then the upstream's tools/list_changed."""
    body = {"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen",
            "params": {"notifications": {"toolsListChanged": True},
                       "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "subscriptions/listen"}
    with httpx2.Client(timeout=httpx2.Timeout(10, read=20)) as http, \
            http.stream("POST", eras_gateway.url("modern"), json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = SseReader(r)
        _, ack = events.next_message()
        assert ack["method"] == "notifications/subscriptions/acknowledged", ack
        assert httpx2.post(f"{modern_upstream.base}/debug/tools-changed", timeout=5).status_code == 200
        _, changed = events.next_message()
        assert changed["method"] == "notifications/tools/list_changed", changed
        assert changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-1"


def modern_stream_call(url: str, name: str, args: dict, request_id: int, caps: dict | None = None):
    """A raw 2026-07-28 tools/call, streamed (a context manager)."""
    params = {"name": name, "arguments": args,
              "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                        "io.modelcontextprotocol/clientCapabilities": caps or {}}}
    headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name}
    http = httpx2.Client(timeout=httpx2.Timeout(10, read=40))
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    return http, http.stream("POST", url, json=body, headers=headers)


def test_modern_calls_with_one_id_do_not_mix_in_a_hidden_session(eras_gateway):
    """A modern client's calls share its hidden upstream session, and their
    JSON-RPC ids may repeat: each gets its own result."""
    url = eras_gateway.url("stateful")
    results: dict[str, dict] = {}

    def call(name: str, args: dict) -> None:
        http, stream = modern_stream_call(url, name, args, request_id=7)
        with http, stream as r:
            r.read()
            results[name] = result_of(r)

    calls = [threading.Thread(target=call, args=("slow_count", {"n": 3})),
             threading.Thread(target=call, args=("add", {"a": 40, "b": 2}))]
    for t in calls:
        t.start()
    for t in calls:
        t.join(timeout=30)
    assert results["slow_count"]["content"][0]["text"] == "counted to 3", results
    assert results["add"]["content"][0]["text"] == "42", results
    assert all(r["resultType"] == "complete" for r in results.values()), results


def test_a_modern_client_closing_its_stream_cancels_the_stateful_call(eras_gateway, stateful_upstreams):
    """2026-07-28 cancels by closing the stream; a stateful 2025 upstream
    gets the notifications/cancelled it understands instead."""
    tag = f"modern-close-{uuid.uuid4()}"

    def event_time(event: str) -> float | None:
        return next((t for up in stateful_upstreams if (t := up.event_time(tag, event)) is not None), None)

    http, stream = modern_stream_call(eras_gateway.url("stateful"), "sleep_then_return",
                                      {"seconds": 30, "tag": tag}, request_id=8)
    with http, stream as r:
        assert r.status_code == 200
        wait_until("the tool started", lambda: event_time("started") is not None, timeout=10)
        closed = time.time()
    wait_until("the upstream recorded the cancel", lambda: event_time("cancelled") is not None, timeout=5)
    assert event_time("cancelled") - closed < 2.0
    assert event_time("finished") is None
    eras_gateway.assert_healthy()


class RawStreamable:
    """A 2025-03-26 or 2025-06-18 Streamable HTTP client over raw HTTP (the
    SDK clients speak 2025-11-25): it answers roots/list and
    elicitation/create requests that arrive on a POST's stream."""

    def __init__(self, url: str, version: str):
        self.url, self.version, self.next_id = url, version, 100
        caps = {"roots": {}} if version == "2025-03-26" else {"roots": {}, "elicitation": {}}
        self.sid = initialize_with(url, version, caps)
        self.asked: list[str] = []

    def _answer(self, request: dict) -> None:
        self.asked.append(request["method"])
        if request["method"] == "roots/list":
            result = {"roots": [{"uri": u} for u in ROOTS]}
        else:
            result = {"action": "accept", "content": {"confirmed": True}}
        r = post(self.url, {"jsonrpc": "2.0", "id": request["id"], "result": result},
                 session=self.sid, version=self.version)
        assert r.status_code == 202, r.text

    def send(self, body) -> list[dict]:
        """POSTs a request or a batch; returns the responses, answering the
        requests and collecting the progress that come first."""
        ids = {m["id"] for m in (body if isinstance(body, list) else [body])}
        headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json",
                   "Mcp-Session-Id": self.sid, "MCP-Protocol-Version": self.version}
        responses: list[dict] = []
        self.progress: list[float] = []
        with httpx2.Client(timeout=httpx2.Timeout(10, read=30)) as http, \
                http.stream("POST", self.url, json=body, headers=headers) as r:
            # A refusal (the upstream's own, passed through) may come as a
            # 4xx with a JSON-RPC error body.
            assert r.status_code == 200 or "error" in json.loads(r.read()), r.read()
            if r.headers["content-type"].startswith("application/json"):
                data = json.loads(r.read())
                return data if isinstance(data, list) else [data]
            events = SseReader(r)
            while len(responses) < len(ids):
                _, m = events.next_message()
                if m.get("id") in ids and "method" not in m:
                    responses.append(m)
                elif m.get("method") == "notifications/progress":
                    self.progress.append(m["params"]["progress"])
                elif "method" in m and "id" in m:
                    self._answer(m)
        return responses

    def call(self, name: str, args: dict, progress: bool = False) -> dict:
        self.next_id += 1
        params = {"name": name, "arguments": args}
        if progress:
            params["_meta"] = {"progressToken": f"p{self.next_id}"}
        [response] = self.send({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params})
        return response


def initialize_with(url: str, version: str, capabilities: dict) -> str:
    r = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                   "params": {"protocolVersion": version, "capabilities": capabilities,
                              "clientInfo": {"name": f"raw-{version}", "version": "1"}}}, version=None)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["protocolVersion"] == version, r.text
    sid = r.headers["mcp-session-id"]
    assert post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                session=sid, version=version).status_code == 202
    return sid


def text_of(response: dict) -> str:
    assert "result" in response, response
    assert not response["result"].get("isError"), response
    return response["result"]["content"][0]["text"]


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18"])
def test_matrix_older_2025_clients(eras_gateway, version, upstream):
    """2025-03-26 and 2025-06-18 clients against every upstream era: list,
    add, progress, ask_roots and confirm (elicitation exists from 2025-06-18
    on); a 2025-03-26 batch gets every answer."""
    c = RawStreamable(eras_gateway.url(upstream), version)
    [listed] = c.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert {"add", "slow_count", "ask_roots", "confirm"} <= {t["name"] for t in listed["result"]["tools"]}
    assert text_of(c.call("add", {"a": 20, "b": 22})) == "42"
    assert text_of(c.call("slow_count", {"n": 3}, progress=True)) == "counted to 3"
    assert c.progress == [1, 2, 3]
    roots = c.call("ask_roots", {})
    confirm = c.call("confirm", {"question": "ok?"})
    if upstream == "s25":
        assert UNANSWERABLE in json.dumps(roots) and UNANSWERABLE in json.dumps(confirm)
    else:
        assert json.loads(text_of(roots)) == {"roots": ROOTS}
        if version == "2025-03-26":
            # No elicitation in 2025-03-26: refused, with the reason.
            assert "elicitation" in json.dumps(confirm), confirm
            assert "error" in confirm or confirm["result"].get("isError"), confirm
        else:
            assert json.loads(text_of(confirm)) == {"action": "accept", "confirmed": True}
    if version == "2025-03-26":
        batch = [{"jsonrpc": "2.0", "id": 201 + i, "method": "tools/call",
                  "params": {"name": "add", "arguments": {"a": i, "b": 1}}} for i in range(2)]
        answers = {m["id"]: text_of(m) for m in c.send(batch)}
        assert answers == {201: "1", 202: "2"}
