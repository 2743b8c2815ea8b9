"""The stateless upstream pool: failover when a replica dies, and per-route
timeouts that end in JSON-RPC errors instead of hangs."""

from __future__ import annotations

import re
import time

import pytest
from mcp import MCPError

from harness import Gateway, legacy_session, org, running, start_replicas, streamable_session

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_stack(log_dir, tmp_path):
    """Two replicas and a gateway of their own: this test kills a replica."""
    from harness import free_port

    admin = free_port()
    reps = start_replicas(2, tmp_path, f"http://127.0.0.1:{admin}")
    gw = Gateway(tmp_path, {"org-1": org(reps, eject_for="30s")}, name="gateway-pool", admin_port=admin)
    try:
        with running(gw):
            yield gw, reps
    finally:
        for r in reps:
            r.stop()


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_killing_a_replica_loses_no_call(own_stack):
    gw, (victim, survivor) = own_stack
    async with streamable_session(gw.url("org-1")) as s, legacy_session(gw.url("org-1", "sse")) as legacy:
        for i in range(4):  # both replicas are in use
            assert (await s.call_tool("add", {"a": i, "b": 1})).content[0].text == str(i + 1)
            assert (await legacy.call_tool("add", {"a": i, "b": 2})).content[0].text == str(i + 2)
        victim.kill()
        for i in range(20):
            result = await s.call_tool("add", {"a": i, "b": 100})
            assert result.content[0].text == str(i + 100), result
            result = await legacy.call_tool("add", {"a": i, "b": 200})
            assert result.content[0].text == str(i + 200), result
    text = gw.metrics()
    assert metric(text, "ratatosk_upstream_replica_up", replica=victim.url) == 0
    assert metric(text, "ratatosk_upstream_replica_up", replica=survivor.url) == 1
    assert metric(text, "ratatosk_upstream_errors_total", replica=victim.url, kind="connect") >= 1
    assert metric(text, "ratatosk_requests_total", org="org-1", method="tools/call", status="200") >= 24
    # Legacy POSTs are answered 202; their answers went on the /sse stream.
    assert metric(text, "ratatosk_requests_total", org="org-1", method="tools/call", status="202") >= 24


async def test_silent_upstream_hits_the_route_timeout(gateway):
    # slow_count without a progress token sends nothing for 3 s; the route
    # allows 1 s of silence.
    async with streamable_session(gateway.url("org-slow")) as s:
        started = time.monotonic()
        with pytest.raises(MCPError) as err:
            await s.call_tool("slow_count", {"n": 30})
        elapsed = time.monotonic() - started
    assert "sent nothing for 1s" in err.value.message, err.value.message
    assert err.value.code == -32002
    assert elapsed < 2.9, elapsed  # without the timeout it would take 3 s


async def test_streaming_answer_is_capped_by_max_duration(gateway):
    async with streamable_session(gateway.url("org-slow")) as s:
        progress = []

        async def on_progress(p, total, message) -> None:
            progress.append(p)

        started = time.monotonic()
        with pytest.raises(MCPError) as err:
            await s.call_tool("slow_count", {"n": 50}, progress_callback=on_progress)
        elapsed = time.monotonic() - started
    assert "max_duration" in err.value.message, err.value.message
    assert 1.9 < elapsed < 3.5, elapsed
    assert 10 <= len(progress) < 50, progress
