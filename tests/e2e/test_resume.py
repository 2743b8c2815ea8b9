"""The gateway holds the GET stream: priming, keep-alives, the publish API,
and exact replay with Last-Event-ID."""

from __future__ import annotations

import httpx2
import pytest

from harness import SseReader, initialize, rpc_error


def open_stream(http: httpx2.Client, url: str, sid: str, last_event_id: str | None = None):
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return http.stream("GET", url, headers=headers)


def note(n) -> dict:
    return {"jsonrpc": "2.0", "method": "notifications/message",
            "params": {"level": "info", "logger": "test", "data": n}}


def test_stream_headers_priming_and_keepalive(gateway):
    url = gateway.url("org-1")
    sid = initialize(url)
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http, open_stream(http, url, sid) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["x-accel-buffering"] == "no"
        assert "no-cache" in r.headers["cache-control"]
        reader = SseReader(r)
        priming = reader.next_event()
        assert priming.id and priming.data == "", priming
        reader.next_comment()  # keep-alive: 1 s in this config, read timeout 5 s


def test_replay_after_reconnect_gives_exactly_the_missed_events(gateway):
    url = gateway.url("org-1")
    sid = initialize(url)
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http:
        with open_stream(http, url, sid) as r:
            reader = SseReader(r)
            assert gateway.publish(sid, note("before")).status_code == 202
            last_id, msg = reader.next_message()
            assert msg["params"]["data"] == "before"
        # The stream is gone; publish while no client listens.
        published = []
        for i in range(5):
            p = gateway.publish(sid, note(f"missed-{i}"))
            assert p.status_code == 202, p.text
            published.append(p.json()["event_id"])
        with open_stream(http, url, sid, last_event_id=last_id) as r:
            reader = SseReader(r)
            got = [reader.next_message() for _ in range(5)]
            assert [m["params"]["data"] for _, m in got] == [f"missed-{i}" for i in range(5)]
            assert [i for i, _ in got] == published
            # Once: the next event after them is a new one, not a repeat.
            assert gateway.publish(sid, note("after")).status_code == 202
            _, nxt = reader.next_message()
            assert nxt["params"]["data"] == "after"


def test_undelivered_events_wait_for_the_first_stream(gateway):
    url = gateway.url("org-1")
    sid = initialize(url)
    for i in range(3):
        assert gateway.publish(sid, note(f"early-{i}")).status_code == 202
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http, open_stream(http, url, sid) as r:
        reader = SseReader(r)
        assert [reader.next_message()[1]["params"]["data"] for _ in range(3)] == ["early-0", "early-1", "early-2"]


def test_replay_never_crosses_sessions_and_rejects_foreign_ids(gateway):
    url = gateway.url("org-1")
    a, b = initialize(url), initialize(url)
    assert gateway.publish(a, note("for-a")).status_code == 202
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http:
        for bad in ["garbage", "0.999999"]:
            with open_stream(http, url, b, last_event_id=bad) as r:
                r.read()
                assert r.status_code == 400, bad
                assert "Last-Event-ID" in rpc_error(r)["message"]
        with open_stream(http, url, b) as r:
            reader = SseReader(r)
            assert gateway.publish(b, note("for-b")).status_code == 202
            assert reader.next_message()[1]["params"]["data"] == "for-b"


class Relay:
    """A TCP relay between a client and the gateway whose connections can be
    cut, as a network blip would."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.streams: set = set()
        self.port = 0

    async def serve(self, task_status):
        import anyio

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self.handle)

    async def handle(self, client):
        import anyio

        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:
            self.streams |= {client, upstream}

            async def pipe(a, b):
                try:
                    async for chunk in a:
                        await b.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                    pass
                finally:
                    await b.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream)
                tg.start_soon(pipe, upstream, client)
            self.streams -= {client, upstream}

    async def cut(self) -> int:
        cut = list(self.streams)
        for s in cut:
            await s.aclose()
        return len(cut)


@pytest.mark.anyio
async def test_official_client_resumes_its_get_stream_after_a_network_cut(gateway):
    import anyio

    from harness import streamable_session

    received: list[str] = []
    arrived = anyio.Event()

    async def on_log(params) -> None:
        received.append(params.data)
        if params.data == "sentinel":
            arrived.set()

    relay = Relay(gateway.port)
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        url = f"http://127.0.0.1:{relay.port}{gateway.base_path}/org-1/mcp"
        async with streamable_session(url, logging_callback=on_log) as s:
            # The newest session of this client name is ours.
            sid = max((x for x in gateway.sessions("org-1")
                       if (x.get("client_info") or {}).get("name") == "e2e-streamable"),
                      key=lambda x: x["created_at_ms"])["id"]
            assert gateway.publish(sid, note("before")).status_code == 202
            with anyio.fail_after(10):
                while "before" not in received:
                    await anyio.sleep(0.02)
            assert await relay.cut() >= 2
            for i in range(5):
                assert gateway.publish(sid, note(f"cut-{i}")).status_code == 202
            # The client reconnects by itself (after the 500 ms retry hint)
            # with Last-Event-ID; then a sentinel shows nothing came twice.
            with anyio.fail_after(15):
                while len(received) < 6:
                    await anyio.sleep(0.02)
            assert gateway.publish(sid, note("sentinel")).status_code == 202
            with anyio.fail_after(10):
                await arrived.wait()
            assert received == ["before"] + [f"cut-{i}" for i in range(5)] + ["sentinel"]
        tg.cancel_scope.cancel()
