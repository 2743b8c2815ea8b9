"""HTTP+SSE of 2024-11-05 with the official Python MCP client's sse_client,
through the gateway (under a base path) to stateless FastMCP replicas."""

from __future__ import annotations

import time
import uuid

import anyio
import httpx2
import pytest

from harness import SseReader, legacy_session, rpc_error, wait_until

pytestmark = pytest.mark.anyio


async def test_legacy_client_initialize_list_call(gateway):
    url = gateway.url("org-1", "sse")
    assert "/api/v1/mcp/org-1/sse" in url
    async with legacy_session(url) as s:
        assert {"add", "slow_count", "notify_me"} <= {t.name for t in (await s.list_tools()).tools}
        assert (await s.call_tool("add", {"a": 20, "b": 22})).content[0].text == "42"


async def test_legacy_progress_arrives_before_the_result(gateway):
    async with legacy_session(gateway.url("org-1", "sse")) as s:
        times: list[float] = []

        async def on_progress(p, total, message) -> None:
            times.append(time.monotonic())

        started = time.monotonic()
        result = await s.call_tool("slow_count", {"n": 4}, progress_callback=on_progress)
        done = time.monotonic()
        assert result.content[0].text == "counted to 4"
        assert len(times) == 4
        assert times[0] - started < 0.6, times
        assert done - times[0] > 0.2, (times, done)


async def test_legacy_notify_me_arrives_on_the_sse_stream(gateway):
    text = f"legacy-{uuid.uuid4()}"
    got = anyio.Event()

    async def on_log(params) -> None:
        if params.data == text:
            got.set()

    async with legacy_session(gateway.url("org-1", "sse"), logging_callback=on_log) as s:
        assert (await s.call_tool("notify_me", {"text": text})).content[0].text == "will notify"
        with anyio.fail_after(10):
            await got.wait()


def legacy_sessions(gateway) -> list[str]:
    return [x["id"] for x in gateway.sessions("org-1") if x["transport"] == "legacy-sse"]


def test_endpoint_event_comes_first_and_the_session_ends_with_the_stream(gateway):
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http:
        with http.stream("GET", gateway.url("org-1", "sse"), headers={"Accept": "text/event-stream"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-accel-buffering"] == "no"
            reader = SseReader(r)
            first = reader.next_event()
            assert first.event == "endpoint"
            assert first.data.startswith("/api/v1/mcp/org-1/messages?session_id=")
            sid = first.data.split("session_id=")[1]
            assert sid in legacy_sessions(gateway)
            # A POST there is accepted, and its answer comes on the stream.
            p = http.post(gateway.origin + first.data, json={"jsonrpc": "2.0", "id": 7, "method": "ping"})
            assert p.status_code == 202
            ev_id, msg = reader.next_message()
            assert msg == {"jsonrpc": "2.0", "id": 7, "result": {}}
    # The client went away: the gateway notices at the next keep-alive (1 s
    # in this config) and ends the session.
    wait_until("legacy session to end after its stream closed",
               lambda: sid not in legacy_sessions(gateway), timeout=10)
    r = httpx2.post(gateway.origin + first.data, json={"jsonrpc": "2.0", "id": 8, "method": "ping"}, timeout=5)
    assert r.status_code == 404
    assert rpc_error(r)["code"] == -32001
