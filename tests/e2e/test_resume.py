"""The gateway holds the GET stream: priming, keep-alives, the publish API,
and exact replay with Last-Event-ID."""

from __future__ import annotations

import httpx2

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
