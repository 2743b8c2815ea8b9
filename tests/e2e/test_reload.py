"""Config reload: SIGHUP and `POST /reload` re-read the config file.

A real SDK client keeps its session, its stream and a call in flight across
a reload that changes its org's policy; a removed org's stream ends; a new
org is served; a bad file is refused with every problem named and the
running config stays.
"""

from __future__ import annotations

import copy
import os
import signal
import uuid

import anyio
import httpx2
import pytest

from harness import (PUBLISH_SECRET, Gateway, SseReader, initialize, org, post, rpc_error, running,
                     streamable_session, tool_names)

AUTH = {"Authorization": f"Bearer {PUBLISH_SECRET}"}


def generation(gw: Gateway) -> int:
    return gw.admin_get("/readyz").json()["config"]["generation"]


def reload(gw: Gateway, **kw) -> httpx2.Response:
    return httpx2.post(gw.admin + "/reload", timeout=10, **kw)


async def wait_for_generation(gw: Gateway, wanted: int, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while (now := await anyio.to_thread.run_sync(generation, gw)) != wanted:
            assert now < wanted, now
            await anyio.sleep(0.05)


async def stream_ends(url: str, sid: str) -> str:
    """Opens the session's GET stream and reads it until it ends."""
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    text = ""
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(10, read=30)) as http, \
            http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, r.status_code
        async for chunk in r.aiter_text():
            text += chunk
    return text


@pytest.mark.anyio
async def test_sighup_reload_keeps_sessions_streams_and_calls_and_ends_a_removed_org(log_dir, replicas):
    gw = Gateway(log_dir / "reload-sighup", {"keep": org(replicas), "gone": org(replicas)}, name="reload-sighup")
    with running(gw):
        assert generation(gw) == 1
        gone_sid = initialize(gw.url("gone"))
        changed = anyio.Event()
        text = f"after-reload-{uuid.uuid4()}"
        logged = anyio.Event()

        async def on_message(message) -> None:
            if getattr(message, "method", None) == "notifications/tools/list_changed":
                changed.set()

        async def on_log(params) -> None:
            if params.data == text:
                logged.set()

        async with streamable_session(gw.url("keep"), message_handler=on_message, logging_callback=on_log) as s, \
                anyio.create_task_group() as tg:
            assert {"add", "sleep_then_return", "whoami"} <= {t.name for t in (await s.list_tools()).tools}
            [keep_sid] = [x["id"] for x in gw.sessions("keep")]
            ended: list[str] = []

            async def watch_gone() -> None:
                ended.append(await stream_ends(gw.url("gone"), gone_sid))

            tg.start_soon(watch_gone)
            in_flight = {}

            tag = f"reload-{uuid.uuid4()}"

            async def slow_call() -> None:
                in_flight["result"] = await s.call_tool("sleep_then_return", {"seconds": 2, "tag": tag})

            def started() -> bool:
                return any(r.event_time(tag, "started") is not None for r in replicas)

            tg.start_soon(slow_call)
            with anyio.fail_after(10):
                while not await anyio.to_thread.run_sync(started):
                    await anyio.sleep(0.05)

            # The new file: `keep` gets a policy, `gone` goes, `fresh` comes,
            # and another browser origin is allowed.
            config = copy.deepcopy(gw.config)
            config["orgs"]["keep"]["policy"] = [{"name": "only-two", "allow": {"tools": ["add", "sleep_then_return"]}}]
            del config["orgs"]["gone"]
            config["orgs"]["fresh"] = org(replicas)
            config["allowed_origins"] = ["http://reloaded.example"]
            gw.config = config
            gw.write_config()
            os.kill(gw.pid, signal.SIGHUP)
            await wait_for_generation(gw, 2)

            # The call in flight finishes; the session keeps working, with the
            # new policy, and hears that its tools changed.
            with anyio.fail_after(10):
                while "result" not in in_flight:
                    await anyio.sleep(0.05)
            result = in_flight["result"]
            assert not result.is_error and result.content[0].text == "slept 2", result
            assert not any(r.event_time(tag, "cancelled") for r in replicas)
            with anyio.fail_after(10):
                await changed.wait()
            assert {t.name for t in (await s.list_tools()).tools} == {"add", "sleep_then_return"}
            assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
            # Its stream is still open: a message published now reaches it.
            published = gw.publish(keep_sid, {"jsonrpc": "2.0", "method": "notifications/message",
                                              "params": {"level": "info", "data": text}})
            assert published.status_code == 202, published.text
            with anyio.fail_after(10):
                await logged.wait()

            # The removed org's stream ended, and its session with it.
            with anyio.fail_after(10):
                while not ended:
                    await anyio.sleep(0.05)
        gone = post(gw.url("gone"), {"jsonrpc": "2.0", "id": 2, "method": "ping"}, session=gone_sid)
        assert gone.status_code == 404, gone.text
        assert "gone" in rpc_error(gone)["message"], gone.text

        # The new org is served; the new origin passes and the old one not.
        initialize(gw.url("fresh"))
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "browser", "version": "1"}}}
        assert post(gw.url("fresh"), init, headers={"Origin": "http://reloaded.example"}).status_code == 200
        assert post(gw.url("fresh"), init, headers={"Origin": "http://localhost:6274"}).status_code == 403

        metrics = gw.metrics()
        assert 'ratatosk_config_reloads_total{result="reloaded"} 1' in metrics
        assert "ratatosk_config_generation 2" in metrics
        assert "config reloaded" in gw.log_text()


def test_post_reload_needs_the_secret_and_refuses_a_bad_file_naming_each_problem(log_dir, replicas):
    gw = Gateway(log_dir / "reload-post", {"org-1": org(replicas)}, name="reload-post")
    with running(gw):
        sid = initialize(gw.url("org-1"))
        assert reload(gw).status_code == 401
        assert httpx2.get(gw.admin + "/reload", timeout=5).status_code == 405

        # The same file again: a new generation that changes nothing.
        same = reload(gw, headers=AUTH)
        assert same.status_code == 200, same.text
        assert same.json() == {"reloaded": True, "generation": 2, "added": [], "removed": [], "changed": [],
                               "sessions_ended": 0}

        good = copy.deepcopy(gw.config)
        # Invalid: an unknown era.
        gw.config["orgs"]["org-1"]["upstream"]["era"] = "someday"
        gw.write_config()
        bad = reload(gw, headers=AUTH)
        assert bad.status_code == 422, bad.text
        error = rpc_error(bad)
        assert "the running config stays" in error["message"], error
        assert [p["path"] for p in error["data"]["problems"]] == ["orgs.org-1.upstream.era"], error

        # Valid, but changing what only a restart applies: each field named.
        gw.config = copy.deepcopy(good)
        gw.config["listen"] = "127.0.0.1:1"
        gw.config["server"]["threads"] = 1
        gw.write_config()
        restart = reload(gw, headers=AUTH)
        assert restart.status_code == 422, restart.text
        problems = rpc_error(restart)["data"]["problems"]
        assert [p["path"] for p in problems] == ["listen", "server"], problems
        assert all("restart the gateway" in p["message"] for p in problems), problems

        # The running config stayed: same generation, same org, same session.
        assert generation(gw) == 2
        ping = post(gw.url("org-1"), {"jsonrpc": "2.0", "id": 3, "method": "ping"}, session=sid)
        assert ping.status_code == 200, ping.text
        metrics = gw.metrics()
        assert 'ratatosk_config_reloads_total{result="refused"} 2' in metrics
        assert 'ratatosk_config_reloads_total{result="reloaded"} 1' in metrics
        gw.config = good
        gw.write_config()


def test_a_removed_server_leaves_the_federated_endpoint_with_list_changed(log_dir, replicas):
    def server(replica) -> dict:
        return {"upstream": {"era": "stateless-2025", "replicas": [replica.url]}}

    gw = Gateway(log_dir / "reload-servers", {"fed": {"auth": "none", "servers": {
        "a": server(replicas[0]), "b": server(replicas[1])}}}, name="reload-servers")
    with running(gw):
        fed_url = gw.url("fed")
        fed_sid = initialize(fed_url)
        assert {"a__add", "b__add"} <= tool_names(fed_url, fed_sid)
        b_sid = initialize(gw.url("fed/b"))
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": fed_sid, "MCP-Protocol-Version": "2025-11-25"}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, \
                http.stream("GET", fed_url, headers=headers) as stream:
            assert stream.status_code == 200
            del gw.config["orgs"]["fed"]["servers"]["b"]
            gw.write_config()
            done = reload(gw, headers=AUTH)
            assert done.status_code == 200, done.text
            # The federated session's own session at `b` ends with the direct one;
            # `a`'s route is kept as it was (only its federation changed).
            assert done.json() == {"reloaded": True, "generation": 2, "added": [], "removed": ["fed/b"],
                                   "changed": ["fed"], "sessions_ended": 2}
            events = SseReader(stream)
            methods = [events.next_message()[1].get("method") for _ in range(3)]
            assert "notifications/tools/list_changed" in methods, methods
        names = tool_names(fed_url, fed_sid)
        assert "a__add" in names and not any(n.startswith("b__") for n in names), sorted(names)
        call = {"jsonrpc": "2.0", "id": 10, "method": "tools/call",
                "params": {"name": "a__add", "arguments": {"a": 1, "b": 1}}}
        answered = post(fed_url, call, session=fed_sid)
        assert answered.status_code == 200 and '"text":"2"' in answered.text.replace(" ", ""), answered.text
        gone = post(gw.url("fed/b"), {"jsonrpc": "2.0", "id": 2, "method": "ping"}, session=b_sid)
        assert gone.status_code == 404, gone.text
