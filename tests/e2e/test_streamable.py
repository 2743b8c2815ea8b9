"""Streamable HTTP with the official Python MCP client, through the gateway
in front of two stateless FastMCP replicas."""

from __future__ import annotations

import time
import uuid

import anyio
import pytest

from harness import initialize, post, rpc_error, streamable_session

pytestmark = pytest.mark.anyio


async def test_initialize_list_and_call(gateway):
    async with streamable_session(gateway.url("org-1")) as s:
        tools = await s.list_tools()
        assert {"add", "slow_count", "notify_me"} <= {t.name for t in tools.tools}
        result = await s.call_tool("add", {"a": 2, "b": 3})
        assert not result.is_error
        assert result.content[0].text == "5"
        # The gateway, not the upstream, owns the session: it is listed on
        # the admin listener with what the client declared.
        listed = [x for x in gateway.sessions("org-1")
                  if (x.get("client_info") or {}).get("name") == "e2e-streamable"]
        assert listed, gateway.sessions("org-1")
        assert listed[0]["protocol_version"] == "2025-11-25"
        assert listed[0]["transport"] == "streamable-http"
        assert len(listed[0]["id"]) >= 32


async def test_progress_arrives_before_the_result(gateway):
    async with streamable_session(gateway.url("org-1")) as s:
        progress: list[tuple[float, float]] = []

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append((time.monotonic(), p))

        started = time.monotonic()
        result = await s.call_tool("slow_count", {"n": 5}, progress_callback=on_progress)
        done = time.monotonic()
        assert result.content[0].text == "counted to 5"
        assert [p for _, p in progress] == [1, 2, 3, 4, 5]
        times = [t for t, _ in progress]
        # Streamed as they happen: ~100 ms apart, the first well before the
        # result, not all bunched at the end.
        assert times[0] - started < 0.6, times
        assert done - times[0] > 0.3, (times, done)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) > 0.05, gaps


async def test_notify_me_arrives_on_the_get_stream(gateway):
    text = f"hello-{uuid.uuid4()}"
    got = anyio.Event()
    seen: list[str] = []

    async def on_log(params) -> None:
        seen.append(params.data)
        if params.data == text:
            got.set()

    async with streamable_session(gateway.url("org-1"), logging_callback=on_log) as s:
        result = await s.call_tool("notify_me", {"text": text})
        assert result.content[0].text == "will notify"
        with anyio.fail_after(10):
            await got.wait()
    assert seen.count(text) == 1


async def test_two_orgs_are_separate(gateway):
    async with streamable_session(gateway.url("org-2")) as s:
        assert (await s.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2"
    ids_1 = {x["id"] for x in gateway.sessions("org-1")}
    ids_2 = {x["id"] for x in gateway.sessions("org-2")}
    assert not ids_1 & ids_2


def test_delete_ends_the_session(gateway):
    url = gateway.url("org-1")
    sid = initialize(url)
    r = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session=sid)
    assert r.status_code == 200
    r = post(url, {"jsonrpc": "2.0", "id": 3, "method": "ping"}, session=sid)
    assert r.json() == {"jsonrpc": "2.0", "id": 3, "result": {}}

    import httpx2

    d = httpx2.delete(url, headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}, timeout=5)
    assert d.status_code == 204
    for attempt in (
        post(url, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session=sid),
        httpx2.get(url, headers={"Mcp-Session-Id": sid, "Accept": "text/event-stream"}, timeout=5),
        httpx2.delete(url, headers={"Mcp-Session-Id": sid}, timeout=5),
    ):
        assert attempt.status_code == 404
        assert rpc_error(attempt)["code"] == -32001
    assert sid not in {x["id"] for x in gateway.sessions("org-1")}


def test_upstreams_get_the_session_and_never_the_clients_credentials(gateway, replicas):
    url = gateway.url("org-1")
    sid = initialize(url)
    marker = str(uuid.uuid4())
    for i in range(4):  # idle replicas tie, and ties rotate: both are used
        r = post(url, {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                       "params": {"name": "add", "arguments": {"a": i, "b": 0}}},
                 session=sid, headers={"Authorization": "Bearer client-token-must-not-leak",
                                       "Cookie": "c=1", "X-Request-Id": f"req-{marker}-{i}",
                                       "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        assert r.status_code == 200
    seen = [h for rep in replicas for h in rep.seen_headers()
            if h.get("x-request-id", "").startswith(f"req-{marker}")]
    assert len(seen) == 4, seen
    per_replica = [sum(h.get("x-request-id", "").startswith(f"req-{marker}") for h in rep.seen_headers())
                   for rep in replicas]
    assert all(n >= 1 for n in per_replica), f"requests were not spread over the replicas: {per_replica}"
    for h in seen:
        assert h["ratatosk-session"] == sid
        assert h["ratatosk-org"] == "org-1"
        assert "authorization" not in h and "cookie" not in h and "mcp-session-id" not in h, h
        assert h["x-request-id"].startswith(f"req-{marker}")
        assert h["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c")
