"""Check the example upstreams by hand with real MCP clients (mcp 2.3.0).

    tests/e2e/.venv/bin/python upstream-examples/verify.py python-fastmcp python-stateful python-modern
    tests/e2e/.venv/bin/python upstream-examples/verify.py all

For each example: run its ./setup (not timed), start ./run on a free loopback
port, wait for its READY line, run the checks, stop it by pid (SIGTERM, then
SIGKILL). Exits 1 if any check failed, 2 on bad usage. Server logs go to a
temporary directory, printed on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import mcp_types as types
from mcp import Client
from mcp.client._input_required import InputRequiredRoundsExceededError
from mcp.client.subscriptions import ToolsListChanged

HERE = Path(__file__).resolve().parent
EXAMPLES = ("python-fastmcp", "python-stateful", "python-modern")
MODERN = "2026-07-28"
ROOTS = ["file:///a", "file:///b"]
CONFIRM_SCHEMA = {
    "type": "object",
    "properties": {"confirmed": {"type": "boolean", "title": "Confirmed"}},
    "required": ["confirmed"],
}
READY_TIMEOUT = 60.0
# The cancelled event must be recorded within this long after the client cancels.
CANCEL_WITHIN = 1.0


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One example process, started by us and stopped by its pid."""

    def __init__(self, example: str, log_dir: Path, env: dict[str, str] | None = None, label: str = "") -> None:
        self.example = example
        self.label = label or example
        self.env = env or {}
        self.log_path = log_dir / f"{self.label}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def start(self) -> None:
        for _ in range(3):  # another process may grab the free port first: exit code 2
            self.port = free_port()
            log = open(self.log_path, "ab")
            self.popen = subprocess.Popen(
                [str(HERE / self.example / "run"), "--port", str(self.port)],
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
            log.close()
            if self._wait_ready():
                return
            if self.popen.returncode != 2:
                break
        raise RuntimeError(f"{self.label} did not become ready; log tail:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.popen is not None and self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.popen.stdout.read()
            if chunk:
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith("READY "):
                        fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                        if int(fields.get("pid", -1)) != self.popen.pid:
                            raise RuntimeError(f"READY pid {fields.get('pid')} is not the started pid {self.popen.pid}")
                        if fields.get("url") != self.url:
                            raise RuntimeError(f"READY url {fields.get('url')} != {self.url}")
                        return True
            if self.popen.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def events(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.base}/debug/events", timeout=5).json()


# --------------------------------------------------------------------------- helpers


class Failed(AssertionError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


def text_of(result: types.CallToolResult) -> str:
    check(len(result.content) >= 1 and isinstance(result.content[0], types.TextContent), f"no text content: {result}")
    return result.content[0].text  # type: ignore[union-attr]


class Answers:
    """Client-side callbacks with a configurable elicitation answer and call counters."""

    def __init__(self) -> None:
        self.elicit = types.ElicitResult(action="accept", content={"confirmed": True})
        self.elicit_params: list[dict[str, Any]] = []
        self.roots_calls = 0

    async def roots(self, context: Any) -> types.ListRootsResult:
        self.roots_calls += 1
        return types.ListRootsResult(roots=[types.Root(uri=u) for u in ROOTS])

    async def elicitation(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicit_params.append(params.model_dump(by_alias=True, exclude_none=True, mode="json"))
        return self.elicit


def client(server: Server, mode: str, answers: Answers, **kw: Any) -> Client:
    return Client(
        server.url,
        mode=mode,
        list_roots_callback=answers.roots,
        elicitation_callback=answers.elicitation,
        read_timeout_seconds=30,
        **kw,
    )


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    h = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
    }
    if name is not None:
        h["Mcp-Name"] = name
    return h


def modern_meta(caps: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": caps if caps is not None else {"roots": {}},
        "io.modelcontextprotocol/clientInfo": {"name": "verify", "version": "0"},
    }


def raw_json(r: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a JSON or single-message SSE answer (the last data: line)."""
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    msgs = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    check(bool(msgs), f"no SSE data in answer: {r.text[:300]!r}")
    return msgs[-1]


# --------------------------------------------------------------------------- checks


async def check_add(server: Server, mode: str) -> None:
    async with client(server, mode, Answers()) as c:
        r = await c.call_tool("add", {"a": 2, "b": 3})
        check(not r.is_error and text_of(r) == "5", f"add(2,3): {r}")
        r = await c.call_tool("add", {"a": 2.5, "b": 0.25})
        check(not r.is_error and text_of(r) == "2.75", f"add(2.5,0.25): {r}")


async def check_slow_count(server: Server, mode: str) -> None:
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with client(server, mode, Answers()) as c:
        r = await c.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
    check(not r.is_error and text_of(r) == "counted to 3", f"slow_count: {r}")
    check(seen == [(1, 3), (2, 3), (3, 3)], f"progress seen: {seen}")


async def check_ask_roots(server: Server, mode: str) -> None:
    answers = Answers()
    async with client(server, mode, answers) as c:
        r = await c.call_tool("ask_roots", {})
    check(not r.is_error, f"ask_roots error: {r}")
    check(text_of(r) == json.dumps({"roots": ROOTS}, separators=(",", ":")), f"ask_roots text: {text_of(r)!r}")
    check(answers.roots_calls == 1, f"roots callback called {answers.roots_calls} times")


async def check_confirm(server: Server, mode: str) -> None:
    answers = Answers()
    async with client(server, mode, answers) as c:
        cases = [
            (types.ElicitResult(action="accept", content={"confirmed": True}), {"action": "accept", "confirmed": True}),
            (types.ElicitResult(action="accept", content={"confirmed": False}), {"action": "accept", "confirmed": False}),
            (types.ElicitResult(action="decline"), {"action": "decline"}),
            (types.ElicitResult(action="cancel"), {"action": "cancel"}),
        ]
        for answer, want in cases:
            answers.elicit = answer
            r = await c.call_tool("confirm", {"question": "Proceed?"})
            check(not r.is_error, f"confirm error: {r}")
            check(text_of(r) == json.dumps(want, separators=(",", ":")), f"confirm({answer.action}): {text_of(r)!r}")
    for p in answers.elicit_params:
        check(p.get("message") == "Proceed?", f"elicitation message: {p}")
        check(p.get("requestedSchema") == CONFIRM_SCHEMA, f"requestedSchema: {p.get('requestedSchema')}")
        check(p.get("mode", "form") == "form", f"elicitation mode: {p}")


async def check_input_unanswerable(server: Server, mode: str) -> None:
    """A stateless 2025 server asks like any other, but the client's answer
    reaches a fresh transport: the tool ends at RATATOSK_INPUT_TIMEOUT_S."""
    answers = Answers()
    async with client(server, mode, answers) as c:
        r = await c.call_tool("ask_roots", {})
        check(r.is_error, f"ask_roots should fail on a stateless server: {r}")
        check("no answer from the client within" in text_of(r), f"ask_roots error text: {text_of(r)!r}")
    check(answers.roots_calls == 1, f"the client was asked {answers.roots_calls} times, not once")


async def check_input_fails_fast(server: Server, mode: str) -> None:
    """Stateless servers: ask_roots/confirm give an isError result at once, never hang."""
    answers = Answers()
    async with client(server, mode, answers) as c:
        for tool, args in (("ask_roots", {}), ("confirm", {"question": "q"})):
            t0 = time.monotonic()
            r = await c.call_tool(tool, args)
            elapsed = time.monotonic() - t0
            check(r.is_error, f"{tool} should fail on a stateless server: {r}")
            check("stateless" in text_of(r), f"{tool} error text: {text_of(r)!r}")
            check(elapsed < 2.0, f"{tool} took {elapsed:.2f} s")
    check(answers.roots_calls == 0 and not answers.elicit_params, "the client was asked anyway")


async def check_sleep(server: Server, mode: str) -> None:
    tag = f"done-{mode}-{time.monotonic_ns()}"
    async with client(server, mode, Answers()) as c:
        r = await c.call_tool("sleep_then_return", {"seconds": 0.2, "tag": tag})
    check(not r.is_error and text_of(r) == "slept 0.2", f"sleep_then_return: {r}")
    got = [e["event"] for e in server.events() if e["tag"] == tag]
    check(got == ["started", "finished"], f"events for {tag}: {got}")


async def check_cancel(server: Server, mode: str) -> None:
    """Cancel a running sleep_then_return from the client: legacy sends
    notifications/cancelled, modern closes the response stream."""
    tag = f"cancel-{mode}-{time.monotonic_ns()}"
    async with client(server, mode, Answers()) as c:
        with anyio.move_on_after(0.7) as scope:
            await c.call_tool("sleep_then_return", {"seconds": 5, "tag": tag})
        check(scope.cancelled_caught, "sleep_then_return returned before it was cancelled")
        cancelled_at = time.time()
        deadline = time.monotonic() + CANCEL_WITHIN
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            events = [e for e in server.events() if e["tag"] == tag]
            if any(e["event"] == "cancelled" for e in events):
                break
            await anyio.sleep(0.05)
    names = [e["event"] for e in events]
    check(names == ["started", "cancelled"], f"events for {tag} within {CANCEL_WITHIN} s: {names}")
    at = next(e["at"] for e in events if e["event"] == "cancelled")
    check(at - cancelled_at < CANCEL_WITHIN, f"cancelled recorded {at - cancelled_at:.2f} s after the cancel")


async def check_raw_legacy_cancel(server: Server, mode: str) -> None:
    """Wire view: a POSTed notifications/cancelled gets 202, and the call's SSE stream
    ends with error code 0 "Request cancelled" (mcp 1.30 behaviour)."""
    h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as hc:
        if server.example == "python-stateful":
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "v", "version": "0"}}
            r = await hc.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}, headers=h)
            check("mcp-session-id" in r.headers, "stateful initialize minted no Mcp-Session-Id")
            h["Mcp-Session-Id"] = r.headers["mcp-session-id"]
            await hc.post(server.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h)
        else:
            r = await hc.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=h)
            check("mcp-session-id" not in r.headers, "stateless server sent an Mcp-Session-Id")
        h["MCP-Protocol-Version"] = "2025-11-25"
        tag = f"raw-{time.monotonic_ns()}"
        call = {"jsonrpc": "2.0", "id": "c-1", "method": "tools/call",
                "params": {"name": "sleep_then_return", "arguments": {"seconds": 5, "tag": tag}}}
        lines: list[str] = []

        async def run_call() -> None:
            async with hc.stream("POST", server.url, json=call, headers=h) as resp:
                async for line in resp.aiter_lines():
                    lines.append(line)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_call)
            await anyio.sleep(0.5)
            note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "c-1"}}
            r = await hc.post(server.url, json=note, headers=h)
            check(r.status_code == 202, f"cancel POST: {r.status_code}")
            with anyio.fail_after(CANCEL_WITHIN):
                while not any(line.startswith("data: ") for line in lines):
                    await anyio.sleep(0.02)
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    check(data == [{"jsonrpc": "2.0", "id": "c-1", "error": {"code": 0, "message": "Request cancelled"}}],
          f"cancelled stream: {data}")
    names = [e["event"] for e in server.events() if e["tag"] == tag]
    check(names == ["started", "cancelled"], f"events: {names}")


async def check_auto(server: Server, want: str) -> None:
    async with client(server, "auto", Answers()) as c:
        check(c.protocol_version == want, f"auto negotiated {c.protocol_version}, want {want}")
        r = await c.call_tool("add", {"a": 1, "b": 1})
        check(text_of(r) == "2", f"add in auto mode: {r}")


async def check_debug_headers(server: Server, mode: str) -> None:
    async with client(server, mode, Answers(), client_info=types.Implementation(name="verify-hdr", version="1")) as c:
        await c.call_tool("add", {"a": 1, "b": 2})
    seen = httpx.get(f"{server.base}/debug/headers", timeout=5).json()
    check(isinstance(seen, list) and seen, "empty /debug/headers")
    check(all(isinstance(h, dict) and h.get("host") for h in seen), "entries without a host header")
    # The client may follow the call with a tools/list (output schema check), so look at the last few.
    if mode == MODERN:
        calls = [h for h in seen[-4:] if h.get("mcp-method") == "tools/call"]
        check(bool(calls) and calls[-1].get("mcp-name") == "add", f"modern headers: {seen[-4:]}")
        check(calls[-1].get("mcp-protocol-version") == MODERN, f"modern headers: {calls[-1]}")
    else:
        check(seen[-1].get("mcp-protocol-version") == "2025-11-25", f"legacy headers: {seen[-1]}")


# --- modern only


async def check_listen(server: Server, mode: str) -> None:
    async with client(server, mode, Answers()) as c:
        async with c.listen(tools_list_changed=True) as sub:
            check(sub.honored.tools_list_changed is True, f"honored filter: {sub.honored}")
            it = sub.__aiter__()
            r = httpx.post(f"{server.base}/debug/tools-changed", timeout=5)
            check(r.status_code == 200, f"POST /debug/tools-changed: {r.status_code}")
            with anyio.fail_after(2):
                ev = await it.__anext__()
            check(isinstance(ev, ToolsListChanged), f"event after POST: {ev!r}")
            r2 = await c.call_tool("change_tools", {})
            check(text_of(r2) == "tools changed", f"change_tools: {r2}")
            with anyio.fail_after(2):
                ev = await it.__anext__()
            check(isinstance(ev, ToolsListChanged), f"event after change_tools: {ev!r}")


async def check_listen_wire(server: Server, mode: str) -> None:
    """Raw view of a listen stream: ack first, then the stamped notification."""
    frames: list[dict[str, Any]] = []
    body = {"jsonrpc": "2.0", "id": "listen-raw", "method": "subscriptions/listen",
            "params": {"_meta": modern_meta({}), "notifications": {"toolsListChanged": True}}}
    async with httpx.AsyncClient(timeout=10) as hc:
        async with hc.stream("POST", server.url, json=body, headers=modern_headers("subscriptions/listen")) as resp:
            check(resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"),
                  f"listen answer: {resp.status_code} {resp.headers}")
            lines = resp.aiter_lines()
            with anyio.fail_after(3):
                async for line in lines:
                    if line.startswith("data: "):
                        frames.append(json.loads(line[6:]))
                        if len(frames) == 1:
                            await hc.post(f"{server.base}/debug/tools-changed")
                        else:
                            break
    sub = {"io.modelcontextprotocol/subscriptionId": "listen-raw"}
    want = [
        {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
         "params": {"_meta": sub, "notifications": {"toolsListChanged": True}}},
        {"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {"_meta": sub}},
    ]
    check(frames == want, f"listen frames: {frames}")


async def check_endless(server: Server, mode: str) -> None:
    answers = Answers()
    async with client(server, mode, answers, input_required_max_rounds=3) as c:
        try:
            r = await c.call_tool("endless_input", {})
        except InputRequiredRoundsExceededError:
            pass
        else:
            raise Failed(f"endless_input completed: {r}")
    check(answers.roots_calls == 3, f"roots callback called {answers.roots_calls} times, want 3")


def raw_round1(server: Server, tool: str = "ask_roots", args: dict[str, Any] | None = None) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"_meta": modern_meta(), "name": tool, "arguments": args or {}}}
    r = httpx.post(server.url, json=body, headers=modern_headers("tools/call", tool), timeout=10)
    msg = raw_json(r)
    res = msg["result"]
    check(r.status_code == 200 and res["resultType"] == "input_required", f"round 1: {r.status_code} {msg}")
    check(res["inputRequests"] == {"roots": {"method": "roots/list"}}, f"inputRequests: {res['inputRequests']}")
    check(res["requestState"].startswith("v1."), f"requestState: {res['requestState']!r}")
    return res["requestState"]


def raw_round2(server: Server, state: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"_meta": modern_meta(), "name": "ask_roots", "arguments": {},
                       "inputResponses": {"roots": {"roots": [{"uri": u} for u in ROOTS]}},
                       "requestState": state}}
    return httpx.post(server.url, json=body, headers=modern_headers("tools/call", "ask_roots"), timeout=10)


INVALID_STATE = {"code": -32602, "message": "Invalid or expired requestState", "data": {"reason": "invalid_request_state"}}


async def check_mrtr_wire(server: Server, mode: str) -> None:
    state = raw_round1(server)
    r = raw_round2(server, state)
    msg = raw_json(r)
    check(r.status_code == 200 and r.headers["content-type"] == "application/json", f"round 2: {r.status_code} {r.headers}")
    check(msg["result"]["resultType"] == "complete", f"round 2: {msg}")
    check(msg["result"]["content"][0]["text"] == json.dumps({"roots": ROOTS}, separators=(",", ":")), f"round 2: {msg}")
    tampered = state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB")
    r = raw_round2(server, tampered)
    check(r.status_code == 400 and r.headers["content-type"] == "application/json", f"tampered: {r.status_code} {r.headers}")
    check(r.json() == {"jsonrpc": "2.0", "id": 2, "error": INVALID_STATE}, f"tampered body: {r.text}")


async def check_discover(server: Server, mode: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": modern_meta({})}}
    r = httpx.post(server.url, json=body, headers=modern_headers("server/discover"), timeout=10)
    check(r.status_code == 200 and r.headers["content-type"] == "application/json", f"discover: {r.status_code}")
    res = r.json()["result"]
    check(res["supportedVersions"] == [MODERN] and res["resultType"] == "complete", f"discover: {res}")
    check(res["ttlMs"] == 0 and res["cacheScope"] == "private", f"discover cache fields: {res}")
    check(res["capabilities"]["tools"] == {"listChanged": True}, f"discover capabilities: {res['capabilities']}")


async def check_legacy_on_modern(server: Server, mode: str) -> None:
    """The same endpoint also serves the handshake era (stateless legacy path)."""
    answers = Answers()
    async with client(server, "legacy", answers) as c:
        check(c.protocol_version == "2025-11-25", f"legacy negotiated {c.protocol_version}")
        r = await c.call_tool("add", {"a": 2, "b": 3})
        check(text_of(r) == "5", f"legacy add: {r}")
        t0 = time.monotonic()
        r = await c.call_tool("ask_roots", {})
        check(r.is_error and time.monotonic() - t0 < 2.0, f"legacy ask_roots should fail fast: {r}")
    check(answers.roots_calls == 0, "legacy client was asked for roots")


async def check_shared_key(log_dir: Path) -> None:
    """requestState minted by one replica: accepted by a replica with the same
    RATATOSK_EXAMPLE_STATE_KEY, rejected by one with its own per-process key."""
    key = "verify-shared-key-0123456789abcdef0123456789"
    a = Server("python-modern", log_dir, {"RATATOSK_EXAMPLE_STATE_KEY": key}, label="python-modern-keyA")
    b = Server("python-modern", log_dir, {"RATATOSK_EXAMPLE_STATE_KEY": key}, label="python-modern-keyB")
    c = Server("python-modern", log_dir, label="python-modern-nokey")
    servers = [a, b, c]
    try:
        with anyio.fail_after(READY_TIMEOUT * 2):
            async with anyio.create_task_group() as tg:
                for s in servers:
                    tg.start_soon(anyio.to_thread.run_sync, s.start)
        state = raw_round1(a)
        r = raw_round2(b, state)
        check(r.status_code == 200 and raw_json(r)["result"]["resultType"] == "complete", f"A->B: {r.status_code} {r.text}")
        r = raw_round2(c, state)
        check(r.status_code == 400 and r.json()["error"] == INVALID_STATE, f"A->C: {r.status_code} {r.text}")
        r = raw_round2(a, raw_round1(c))
        check(r.status_code == 400 and r.json()["error"] == INVALID_STATE, f"C->A: {r.status_code} {r.text}")
    finally:
        for s in servers:
            s.stop()


# --------------------------------------------------------------------------- plans

Check = Callable[[Server, str], Awaitable[None]]


def fastmcp_plan(questions: list[tuple[str, str, Check]]) -> list[tuple[str, str, Check]]:
    """The FastMCP 2.x checks, stateless or stateful: they differ only in
    how the client's answers to questions fare."""
    return [
        ("auto falls back to initialize", "auto", lambda s, m: check_auto(s, "2025-11-25")),
        ("add", "legacy", check_add),
        ("slow_count progress", "legacy", check_slow_count),
        *questions,
        ("sleep_then_return finished", "legacy", check_sleep),
        ("sleep_then_return cancelled (notifications/cancelled)", "legacy", check_cancel),
        ("raw legacy cancel on the wire", "legacy", check_raw_legacy_cancel),
        ("/debug/headers", "legacy", check_debug_headers),
    ]


def plan(example: str) -> list[tuple[str, str, Check]]:
    """(check name, client mode, check) for one example."""
    if example == "python-fastmcp":
        return fastmcp_plan([
            ("ask_roots asks, but the answer cannot come back (stateless)", "legacy", check_input_unanswerable),
        ])
    if example == "python-stateful":
        return fastmcp_plan([
            ("ask_roots", "legacy", check_ask_roots),
            ("confirm accept/decline/cancel", "legacy", check_confirm),
        ])
    if example == "python-modern":
        return [
            ("auto picks 2026-07-28", "auto", lambda s, m: check_auto(s, MODERN)),
            ("server/discover (raw)", MODERN, check_discover),
            ("add", MODERN, check_add),
            ("slow_count progress", MODERN, check_slow_count),
            ("ask_roots (MRTR)", MODERN, check_ask_roots),
            ("confirm accept/decline/cancel (MRTR)", MODERN, check_confirm),
            ("MRTR + tampered requestState (raw)", MODERN, check_mrtr_wire),
            ("endless_input hits the client's round limit", MODERN, check_endless),
            ("sleep_then_return finished", MODERN, check_sleep),
            ("sleep_then_return cancelled (stream closed)", MODERN, check_cancel),
            ("listen: tools/list_changed (client)", MODERN, check_listen),
            ("listen: wire frames (raw)", MODERN, check_listen_wire),
            ("legacy client on the same endpoint", "legacy", check_legacy_on_modern),
            ("/debug/headers", MODERN, check_debug_headers),
        ]
    raise ValueError(example)


async def verify(example: str, log_dir: Path) -> list[str]:
    failures: list[str] = []
    subprocess.run([str(HERE / example / "setup")], check=True)
    t_start = time.monotonic()
    # A short input wait, so the stateless "cannot come back" check is quick.
    server = Server(example, log_dir, {"RATATOSK_INPUT_TIMEOUT_S": "2"})
    try:
        server.start()
        print(f"== {example}: pid {server.popen.pid if server.popen else '?'} on {server.url}", flush=True)
        for name, mode, fn in plan(example):
            t0 = time.monotonic()
            try:
                with anyio.fail_after(30):
                    await fn(server, mode)
                print(f"  PASS {name} [{mode}] ({time.monotonic() - t0:.2f} s)", flush=True)
            except BaseException as exc:  # noqa: BLE001 - report every failure, keep going
                if isinstance(exc, KeyboardInterrupt):
                    raise
                detail = str(exc) if isinstance(exc, Failed) else "".join(traceback.format_exception(exc))
                print(f"  FAIL {name} [{mode}]: {detail}", flush=True)
                failures.append(f"{example}: {name}")
    finally:
        server.stop()
    if example == "python-modern":
        t0 = time.monotonic()
        try:
            await check_shared_key(log_dir)
            print(f"  PASS requestState across replicas (shared key / per-process key) ({time.monotonic() - t0:.2f} s)")
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = str(exc) if isinstance(exc, Failed) else "".join(traceback.format_exception(exc))
            print(f"  FAIL requestState across replicas: {detail}", flush=True)
            failures.append(f"{example}: requestState across replicas")
    print(f"== {example}: {'OK' if not failures else 'FAILED'} in {time.monotonic() - t_start:.1f} s", flush=True)
    if failures:
        print(f"-- server log tail ({server.log_path}):\n{server.log_tail()}")
    return failures


async def main(argv: list[str]) -> int:
    names = list(EXAMPLES) if argv == ["all"] else argv
    if not names or any(n not in EXAMPLES for n in names):
        print(f"usage: verify.py all | <example>... (examples: {', '.join(EXAMPLES)})", file=sys.stderr)
        return 2
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="verify-upstreams-") as tmp:
        for name in names:
            failures += await verify(name, Path(tmp))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1:]))
