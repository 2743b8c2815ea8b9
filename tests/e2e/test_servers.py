"""Several servers per org (issue 17): each of an org's `servers` has its
own endpoints, `{org}/{server}/mcp`, `/sse` and `/messages`, reached
transparently (no prefixes) by clients of every era, with sessions of its
own. The servers are the real examples: python-fastmcp (stateless-2025),
go (modern, 2026-07-28) and typescript --stateful (stateful-2025).
"""

from __future__ import annotations

import json
import uuid

import pytest

from harness import CLIENT_ERAS, ROOTS, Example, Gateway, client, initialize, org, post, rpc_error, running, started

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def go_server(log_dir):
    with started(Example("go", log_dir)) as up:
        yield up


@pytest.fixture(scope="module")
def ts_stateful_server(log_dir):
    with started(Example("typescript", log_dir, "--stateful")) as up:
        yield up


@pytest.fixture(scope="module")
def servers(replicas, go_server, ts_stateful_server):
    """The replicas of each server of org `multi`, by name."""
    return {"py": list(replicas), "go": [go_server], "ts": [ts_stateful_server]}


@pytest.fixture(scope="module")
def multi_gateway(log_dir, replicas, go_server, ts_stateful_server):
    def upstream(era: str, *examples: Example) -> dict:
        return {"era": era, "replicas": [e.url for e in examples]}

    gw = Gateway(
        log_dir,
        {
            "multi": {
                "auth": "none",
                "servers": {
                    "py": {"upstream": upstream("stateless-2025", *replicas)},
                    "go": {"upstream": upstream("modern", go_server), "prefix": "g"},
                    "ts": {"upstream": upstream("stateful-2025", ts_stateful_server)},
                },
            },
            "one": org(replicas),
        },
        name="servers-gateway",
    )
    with running(gw):
        yield gw


def reached(example: Example, tag: str) -> bool:
    """Whether `sleep_then_return` ran with `tag` on this example."""
    return any(e["tag"] == tag and e["event"] == "finished" for e in example.events())


@pytest.mark.parametrize("server", ["py", "go", "ts"])
@pytest.mark.parametrize("era", CLIENT_ERAS)
async def test_each_server_is_reached_at_its_own_endpoint_by_every_client_era(multi_gateway, servers, era, server):
    async with client(era, multi_gateway, f"multi/{server}") as c:
        names = await c.tool_names()
        assert {"add", "sleep_then_return"} <= names, names
        assert not any("__" in n for n in names), f"no prefixes on a server endpoint: {names}"
        assert await c.call("add", {"a": 2, "b": 3}) == "5"
        tag = f"servers-{uuid.uuid4().hex[:8]}"
        await c.call("sleep_then_return", {"seconds": 0, "tag": tag})
        for name, exs in servers.items():
            hit = any(reached(ex, tag) for ex in exs)
            assert hit == (name == server), f"call for {server} reached {name}: {hit}"
        if server in ("go", "ts"):
            # Server-to-client requests of a modern and a stateful server.
            assert json.loads(await c.call("ask_roots", {})) == {"roots": ROOTS}


def test_sessions_belong_to_their_server_and_paths_are_named(multi_gateway):
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    sid = initialize(multi_gateway.url("multi/py"))
    ok = post(multi_gateway.url("multi/py"), ping, session=sid)
    assert ok.status_code == 200, ok.text
    # The same session id at another server of the org is unknown there.
    other = post(multi_gateway.url("multi/go"), ping, session=sid)
    assert other.status_code == 404, other.text
    assert rpc_error(other)["code"] == -32001, other.text
    # The org endpoint of an org with servers names the servers' endpoints.
    r = post(multi_gateway.url("multi"), ping)
    assert r.status_code == 404, r.text
    message = rpc_error(r)["message"]
    for name in ("go", "py", "ts"):
        assert f"{multi_gateway.base_path}/multi/{name}/mcp" in message, message
    r = post(multi_gateway.url("multi/nope"), ping)
    assert r.status_code == 404 and rpc_error(r)["message"] == "org 'multi' has no server 'nope'", r.text
    # An org with one upstream keeps its one endpoint, and no server paths.
    one = initialize(multi_gateway.url("one"))
    assert post(multi_gateway.url("one"), ping, session=one).status_code == 200
    r = post(multi_gateway.url("one/py"), ping)
    assert r.status_code == 404, r.text
    # The admin API lists the org's sessions of every server.
    listed = {s["id"]: s["org"] for s in multi_gateway.sessions("multi")}
    assert listed.get(sid) == "multi/py", listed
    # Each server's replicas and era are shown apart.
    ready = multi_gateway.admin_get("/readyz").json()
    orgs = ready["orgs"]
    assert {"multi/py", "multi/go", "multi/ts", "one"} <= set(orgs), ready
