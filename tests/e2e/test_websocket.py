"""The MCP endpoint over a WebSocket (`{org}/ws`): a real WebSocket client
(Python `websockets`) through the real gateway, in front of the real FastMCP
examples, with tokens from the real Keycloak.

Each text frame is one JSON-RPC message. The connection is one session;
messages of the session's standalone stream carry their event id in
`_meta["ratatosk/eventId"]`, and a client that reconnects with the session
id and the last event id it saw gets what it missed.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import websockets
from websockets.asyncio.client import connect

from harness import Example, Gateway, org, running, started, wait_until

pytestmark = pytest.mark.anyio

INIT_PARAMS = {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "ws-e2e", "version": "1"}}


def ws_url(gw: Gateway, org_name: str, **query: str) -> str:
    url = gw.url(org_name, "ws").replace("http://", "ws://", 1)
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


class Client:
    """JSON-RPC over one WebSocket: requests by id, other messages kept."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.others: list[dict] = []

    async def send(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self, timeout: float = 10.0) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, method: str, params: dict | None = None) -> dict:
        """Sends a request; returns its answer, keeping what came before."""
        self.next_id += 1
        rid = self.next_id
        await self.send({"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})})
        while True:
            m = await self.receive()
            if m.get("id") == rid and "method" not in m:
                return m
            self.others.append(m)

    async def initialize(self, capabilities: dict | None = None) -> dict:
        init = await self.request("initialize", {**INIT_PARAMS, "capabilities": capabilities or {}})
        assert "result" in init, init
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return init["result"]

    async def other(self, what, timeout: float = 10.0) -> dict:
        """The first message (kept or new) that `what` accepts."""
        for i, m in enumerate(self.others):
            if what(m):
                return self.others.pop(i)
        async with asyncio.timeout(timeout):
            while True:
                m = await self.receive(timeout)
                if what(m):
                    return m
                self.others.append(m)


def is_log(text):
    return lambda m: m.get("method") == "notifications/message" and m["params"].get("data") == text


async def test_initialize_list_call_with_progress_and_a_published_message(gateway):
    async with connect(ws_url(gateway, "org-1"), subprotocols=["mcp"]) as ws:
        assert ws.subprotocol == "mcp"
        c = Client(ws)
        result = await c.initialize()
        assert result["protocolVersion"] == "2025-06-18"
        sid = result["_meta"]["ratatosk/sessionId"]
        assert sid in {s["id"] for s in gateway.sessions("org-1")}
        tools = await c.request("tools/list")
        assert {"add", "slow_count", "notify_me"} <= {t["name"] for t in tools["result"]["tools"]}
        answer = await c.request("tools/call", {"name": "slow_count", "arguments": {"n": 3},
                                                "_meta": {"progressToken": "p1"}})
        assert answer["result"]["content"][0]["text"] == "counted to 3"
        progress = [m["params"]["progress"] for m in c.others if m.get("method") == "notifications/progress"]
        assert progress == [1, 2, 3], c.others
        # The upstream publishes through the admin API into this session.
        answer = await c.request("tools/call", {"name": "notify_me", "arguments": {"text": "over ws"}})
        assert answer["result"]["content"][0]["text"] == "will notify"
        published = await c.other(is_log("over ws"))
        assert published["params"]["_meta"]["ratatosk/eventId"]
        # A malformed message gets a precise error, and the session goes on.
        await ws.send('{"jsonrpc":"2.0","id":77,"method":')
        error = await c.receive()
        assert error["error"]["code"] == -32700, error
        add = await c.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
        assert add["result"]["content"][0]["text"] == "5"
    # A normal close (1000) ends the session.
    wait_until("the session to end with its WebSocket",
               lambda: sid not in {s["id"] for s in gateway.sessions("org-1")}, timeout=10)


async def test_keycloak_token_at_the_upgrade(auth_gateway, keycloak):
    url = ws_url(auth_gateway, "org-1")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(url, subprotocols=["mcp"]):
            pass
    assert refused.value.response.status_code == 401
    assert "resource_metadata=" in refused.value.response.headers["www-authenticate"]
    with pytest.raises(websockets.InvalidStatus) as refused:
        bob = keycloak.token("bob")
        async with connect(url, subprotocols=["mcp"], additional_headers={"Authorization": f"Bearer {bob}"}):
            pass
    assert refused.value.response.status_code == 403
    alice = keycloak.token("alice")
    async with connect(url, subprotocols=["mcp"], additional_headers={"Authorization": f"Bearer {alice}"}) as ws:
        c = Client(ws)
        await c.initialize()
        who = await c.request("tools/call", {"name": "seen_headers", "arguments": {}})
        # The identity went upstream as headers; the token did not.
        seen = json.dumps(who["result"])
        assert alice not in seen
        assert "ratatosk-subject" in seen.lower()
    # A browser puts its token in a subprotocol, with an allowed Origin.
    encoded = base64.urlsafe_b64encode(alice.encode()).decode().rstrip("=")
    browser = ["mcp", f"bearer.ratatosk.{encoded}"]
    async with connect(url, subprotocols=browser, origin="http://localhost:6274") as ws:
        assert ws.subprotocol == "mcp"
        c = Client(ws)
        await c.initialize()
        add = await c.request("tools/call", {"name": "add", "arguments": {"a": 1, "b": 1}})
        assert add["result"]["content"][0]["text"] == "2"
    for origin, status in [(None, 400), ("http://evil.example", 403)]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(url, subprotocols=browser, origin=origin):
                pass
        assert refused.value.response.status_code == status, origin


@pytest.fixture(scope="module")
def stateful_gateway(log_dir):
    with started(Example("python-stateful", log_dir)) as up:
        gw = Gateway(log_dir, {"org-st": org([up], era="stateful-2025")}, name="gateway-ws-stateful")
        with running(gw):
            yield gw


async def test_elicitation_from_a_stateful_upstream(stateful_gateway):
    async with connect(ws_url(stateful_gateway, "org-st"), subprotocols=["mcp"]) as ws:
        c = Client(ws)
        await c.initialize({"elicitation": {}})
        await c.send({"jsonrpc": "2.0", "id": 1000, "method": "tools/call",
                      "params": {"name": "confirm", "arguments": {"question": "ship it?"}}})
        ask = await c.other(lambda m: m.get("method") == "elicitation/create")
        assert "ship it?" in ask["params"]["message"]
        await c.send({"jsonrpc": "2.0", "id": ask["id"],
                      "result": {"action": "accept", "content": {"confirmed": True}}})
        answer = await c.other(lambda m: m.get("id") == 1000 and "method" not in m)
        assert json.loads(answer["result"]["content"][0]["text"]) == {"action": "accept", "confirmed": True}


async def test_a_dropped_connection_resumes_with_what_it_missed(gateway):
    async with connect(ws_url(gateway, "org-1"), subprotocols=["mcp"]) as ws:
        c = Client(ws)
        sid = (await c.initialize())["_meta"]["ratatosk/sessionId"]
        note = lambda n: {"jsonrpc": "2.0", "method": "notifications/message",  # noqa: E731
                          "params": {"level": "info", "data": f"n{n}"}}
        assert gateway.publish(sid, note(1)).status_code == 202
        first = await c.other(is_log("n1"))
        seen = first["params"]["_meta"]["ratatosk/eventId"]
        # The network drops: no close frame, so the session stays.
        ws.transport.abort()
    for n in (2, 3):
        assert gateway.publish(sid, note(n)).status_code == 202
    # A browser cannot set headers on a WebSocket: the query says it all.
    async with connect(ws_url(gateway, "org-1", session_id=sid, last_event_id=seen), subprotocols=["mcp"]) as ws:
        c = Client(ws)
        got = [await c.receive(), await c.receive()]
        assert [m["params"]["data"] for m in got] == ["n2", "n3"]
        add = await c.request("tools/call", {"name": "add", "arguments": {"a": 20, "b": 22}})
        assert add["result"]["content"][0]["text"] == "42"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(ws_url(gateway, "org-1", session_id="no-such-session"), subprotocols=["mcp"]):
            pass
    assert refused.value.response.status_code == 404


async def test_a_message_over_the_limit_is_refused_with_1009(gateway):
    async with connect(ws_url(gateway, "org-1"), subprotocols=["mcp"]) as ws:
        c = Client(ws)
        await c.initialize()
        big = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                          "params": {"name": "add", "arguments": {"a": "x" * 1_100_000, "b": 1}}})
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            # The close may come while the message is still being sent.
            await ws.send(big)
            await c.receive()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
    limit = gateway.config["limits"]["max_body_bytes"]
    assert f"limit of {limit}" in closed.value.rcvd.reason
    # The gateway serves the next client as before.
    async with connect(ws_url(gateway, "org-1"), subprotocols=["mcp"]) as ws:
        await Client(ws).initialize()
