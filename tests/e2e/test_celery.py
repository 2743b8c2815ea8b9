"""Workers finish tool calls, the way OdinMCP's Celery workers do (issue 15),
without Pushpin: upstream-examples/python-celery is a stateless FastMCP
server whose tools enqueue Celery tasks (Redis as the broker, Debian's
redis-server) and answer with a hold; real Celery workers report progress
and the result through the gateway's publish API
(`POST /sessions/{id}/holds/{hold}`), and the gateway delivers them on the
client's request: the POST's SSE stream, or the legacy /sse stream.
"""

from __future__ import annotations

import subprocess
import uuid

import anyio
import pytest
from mcp import types
from mcp.client.client import Client

from harness import (
    MODERN, PUBLISH_SECRET, ROOT, Example, all_started, redis_gateway, Gateway, Proc, RedisServer, free_port, legacy_session, org, running,
    started, streamable_session, wait_until,
)

pytestmark = pytest.mark.anyio

HOLD_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def broker(log_dir):
    redis = RedisServer(log_dir, name="celery-broker")
    redis.start_and_wait()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def celery_gateway(log_dir, broker):
    admin_port = free_port()
    server = Example("python-celery", log_dir, env={
        "RATATOSK_CELERY_BROKER": f"{broker.url}0", "RATATOSK_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S)})
    with started(server):
        gw = Gateway(log_dir, {"celery": org([server])}, name="gateway-celery", admin_port=admin_port)
        with running(gw):
            yield gw


class Worker(Proc):
    """One Celery worker of the example (upstream-examples/python-celery/worker)."""

    def __init__(self, log_dir, gw: Gateway, broker: RedisServer, name: str, queues: str = "celery",
                 db: int = 0):
        super().__init__(
            name=f"celery-{name}",
            argv=[str(ROOT / "upstream-examples/python-celery/worker"), "--name", name, "--queues", queues],
            log_path=log_dir / f"celery-{name}-{uuid.uuid4().hex[:6]}.log",
            env={"RATATOSK_CELERY_BROKER": f"{broker.url}{db}", "RATATOSK_ADMIN_URL": gw.admin,
                 "RATATOSK_PUBLISH_SECRET": PUBLISH_SECRET},
        )

    def wait_ready(self) -> "Worker":
        # Celery logs "<name>@<host> ready." once it consumes its queues.
        wait_until(f"{self.name} ready", lambda: " ready." in self.log_text(), timeout=60, every=0.1,
                   alive=self.death)
        return self


def workers(log_dir, gw, broker, *names: str, queues: str = "celery", db: int = 0):
    return all_started([Worker(log_dir, gw, broker, n, queues, db) for n in names])


@pytest.fixture(scope="module")
def two_workers(log_dir, celery_gateway, broker):
    with workers(log_dir, celery_gateway, broker, "w1", "w2") as ws:
        yield ws


def worker_of(result: types.CallToolResult) -> str:
    return (result.meta or {}).get("io.ratatosk.example/worker", "")


def session_over(transport: str, gw: Gateway, **callbacks):
    """A client of one era: 2025 Streamable HTTP, 2024-11-05 HTTP+SSE, or
    2026-07-28 (the SDK's `Client` in modern mode: no session, so its call
    is held under a call id of its own)."""
    if transport == "streamable":
        return streamable_session(gw.url("celery"), **callbacks)
    if transport == "legacy":
        return legacy_session(gw.url("celery", "sse"), **callbacks)
    return Client(gw.url("celery"), mode=MODERN, **callbacks)


@pytest.mark.parametrize("transport", ["streamable", "legacy", "modern"])
async def test_a_celery_task_reports_progress_then_the_result(celery_gateway, two_workers, transport):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with session_over(transport, celery_gateway) as s:
        with anyio.fail_after(30):
            result = await s.call_tool("add", {"a": 2, "b": 3}, progress_callback=on_progress)
    assert not result.is_error, result
    assert result.content[0].text == "5"
    assert worker_of(result) in ("w1", "w2")
    # The worker's progress came before the result, on the same request.
    assert seen and seen[0][0] == 1 and seen[0][1] == 2, seen
    assert "is adding" in (seen[0][2] or "")


ROOTS = [types.Root(uri="file:///srv/project", name="project"), types.Root(uri="file:///tmp/scratch")]


async def list_roots(_context) -> types.ListRootsResult:
    return types.ListRootsResult(roots=ROOTS)


def roots_text() -> str:
    return "roots: " + ", ".join(str(r.uri) for r in ROOTS)


@pytest.mark.parametrize("transport", ["streamable", "legacy"])
async def test_a_worker_asks_the_client_for_its_roots(celery_gateway, two_workers, transport):
    """The seed's send_client_request_for_roots: the worker's request reaches
    the client on its held call, and the client's answer reaches the worker."""
    if transport == "streamable":
        session = streamable_session(celery_gateway.url("celery"), list_roots_callback=list_roots)
    else:
        session = legacy_session(celery_gateway.url("celery", "sse"), list_roots_callback=list_roots)
    async with session as s:
        with anyio.fail_after(30):
            result = await s.call_tool("send_client_request_for_roots", {})
    assert not result.is_error, result
    assert result.content[0].text == roots_text()


async def test_a_client_without_roots_is_not_asked(celery_gateway, two_workers):
    """A client that did not declare `roots` is never sent the request: the
    worker reads the gateway's refusal and fails the call with it."""
    async with streamable_session(celery_gateway.url("celery")) as s:
        with anyio.fail_after(30):
            result = await s.call_tool("send_client_request_for_roots", {})
    assert result.is_error, result
    assert "did not declare the 'roots' capability" in result.content[0].text, result


async def test_two_workers_share_the_load(celery_gateway, two_workers):
    results: list[types.CallToolResult] = []
    async with streamable_session(celery_gateway.url("celery")) as s:

        async def call(i: int) -> None:
            results.append(await s.call_tool("add", {"a": i, "b": 1}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(call, i)
    assert sorted(int(r.content[0].text) for r in results) == list(range(1, 9))
    assert {worker_of(r) for r in results} == {"w1", "w2"}, [worker_of(r) for r in results]


def redis_get(broker: RedisServer, key: str, db: int = 0) -> str:
    out = subprocess.run(["redis-cli", "-p", str(broker.port), "-n", str(db), "GET", key], capture_output=True,
                         text=True, timeout=10, check=True)
    return out.stdout.strip()


async def cancel_and_see_the_worker_stop(url: str, broker: RedisServer, worker: str, db: int = 0,
                                         modern: bool = False) -> None:
    """Starts the long task, cancels the call at its first progress (the SDK
    sends notifications/cancelled; a 2026-07-28 client closes the call's
    stream), then waits until the worker, at its next report (410, state
    cancelled), records that it stopped; the client goes on."""
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    started_work = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started_work.set()

    async with (Client(url, mode=MODERN) if modern else streamable_session(url)) as s:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async def call() -> None:
                    await s.call_tool("very_long_running_task_will_cancel", {"seconds": 20, "tag": tag},
                                      progress_callback=on_progress)

                tg.start_soon(call)
                await started_work.wait()
                tg.cancel_scope.cancel()
        with anyio.fail_after(15):
            while redis_get(broker, f"ratatosk-example:cancelled:{tag}", db) != f"{worker}:cancelled":
                await anyio.sleep(0.1)
        assert "add" in {t.name for t in (await s.list_tools()).tools}


@pytest.mark.parametrize("transport", ["streamable", "modern"])
async def test_a_client_cancel_reaches_the_worker(log_dir, celery_gateway, broker, transport):
    with workers(log_dir, celery_gateway, broker, "long-1", queues="long"):
        await cancel_and_see_the_worker_stop(celery_gateway.url("celery"), broker, "long-1",
                                             modern=transport == "modern")
    metrics = celery_gateway.metrics()
    assert 'ratatosk_holds_total{org="celery",outcome="cancelled"}' in metrics


async def test_a_worker_killed_mid_task_fails_the_call_at_the_hold_timeout(log_dir, celery_gateway, broker):
    tag = f"killed-{uuid.uuid4().hex[:8]}"
    started_work = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started_work.set()

    with workers(log_dir, celery_gateway, broker, "long-2", queues="long") as (worker,):
        async with streamable_session(celery_gateway.url("celery")) as s:
            with anyio.fail_after(HOLD_TIMEOUT_S + 20):
                async with anyio.create_task_group() as tg:
                    outcome: list = []

                    async def call() -> None:
                        try:
                            outcome.append(await s.call_tool("very_long_running_task_will_cancel",
                                                             {"seconds": 60, "tag": tag},
                                                             progress_callback=on_progress))
                        except Exception as e:  # the gateway's JSON-RPC error
                            outcome.append(e)

                    tg.start_soon(call)
                    await started_work.wait()
                    worker.kill()
            (failure,) = outcome
            # The gateway fails the call cleanly at the hold's timeout; the
            # session goes on.
            text = str(failure)
            assert "no worker finished hold" in text and f"within {HOLD_TIMEOUT_S} s" in text, text
            await s.send_ping()
    metrics = celery_gateway.metrics()
    assert 'ratatosk_holds_total{org="celery",outcome="expired"}' in metrics


# ----- Redis mode: the worker publishes through another node --------------------

NODES_DB = 1  # a broker of their own: the single-node tests' workers never take these tasks


@pytest.fixture(scope="module")
def celery_nodes(log_dir, broker):
    """Two gateway nodes sharing sessions through Redis, in front of one
    example server; clients use node 1, workers publish to node 2."""
    server = Example("python-celery", log_dir, env={
        "RATATOSK_CELERY_BROKER": f"{broker.url}{NODES_DB}", "RATATOSK_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S)})
    with started(server):
        nodes = [redis_gateway(log_dir, [server], broker, name=f"celery-node-{i}", prefix="celery-nodes:",
                               orgs={"celery": org([server])}) for i in (1, 2)]
        with running(nodes[0]), running(nodes[1]):
            with workers(log_dir, nodes[1], broker, "n-w1", queues="celery,long", db=NODES_DB):
                yield nodes


async def test_a_worker_publishing_through_another_node_finishes_the_call(celery_nodes):
    client_node, _ = celery_nodes
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with streamable_session(client_node.url("celery")) as s:
        for a in (2, 40):
            with anyio.fail_after(30):
                result = await s.call_tool("add", {"a": a, "b": 3}, progress_callback=on_progress)
            assert result.content[0].text == str(a + 3)
            assert worker_of(result) == "n-w1"
    assert seen.count(1) == 2, seen


async def test_a_worker_asking_through_another_node_reads_the_clients_answer(celery_nodes):
    client_node, _ = celery_nodes
    async with streamable_session(client_node.url("celery"), list_roots_callback=list_roots) as s:
        with anyio.fail_after(30):
            result = await s.call_tool("send_client_request_for_roots", {})
    assert result.content[0].text == roots_text(), result


async def test_a_cancel_on_one_node_reaches_a_worker_publishing_through_another(celery_nodes, broker):
    client_node, _ = celery_nodes
    await cancel_and_see_the_worker_stop(client_node.url("celery"), broker, "n-w1", db=NODES_DB)
