"""Verify the TypeScript or Go example upstream with real clients.

    tests/e2e/.venv/bin/python upstream-examples/verify_ts_go.py typescript|go

Starts the example (`run --port P`, plus `--stateful` for the second
TypeScript replica) on a free loopback port, drives it with the Python `mcp`
2.3.0 client (legacy and/or 2026-07-28 mode), with raw HTTP for the wire facts,
and for TypeScript also with `typescript/client.mjs` (TS SDK client). Stops
what it started by pid. Prints one line per check and a closing
"N passed, M failed" line; exits 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.client.client import Client

HERE = os.path.dirname(os.path.abspath(__file__))
MODERN = "2026-07-28"
CONFIRM_SCHEMA = {
    "type": "object",
    "properties": {"confirmed": {"type": "boolean", "title": "Confirmed"}},
    "required": ["confirmed"],
}
READY_TIMEOUT = 120.0  # first run may still have to install or build
OVERALL_TIMEOUT = 150.0

PASSED: list[str] = []
FAILED: list[str] = []
LOGS: list[str] = []  # server stderr files: removed on success, kept (and named) on failure


def check(cond: bool, what: str, detail: Any = None) -> bool:
    if cond:
        PASSED.append(what)
        print(f"PASS {what}", flush=True)
    else:
        FAILED.append(what)
        extra = f": {detail!r}" if detail is not None else ""
        print(f"FAIL {what}{extra}", flush=True)
    return cond


# ---------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Example:
    """One replica started through `<example>/run`; `run` execs the server, so
    the child's pid is the server's pid."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.base = ""
        self.log = tempfile.NamedTemporaryFile(prefix=f"verify-{name}-", suffix=".log", delete=False)
        LOGS.append(self.log.name)

    def start(self) -> None:
        run = os.path.join(HERE, self.name, "run")
        for _attempt in range(3):
            port = free_port()
            self.proc = subprocess.Popen(
                [run, "--port", str(port), *self.args],
                stdout=subprocess.PIPE,
                stderr=self.log,
                stdin=subprocess.DEVNULL,
            )
            line = self._read_line(READY_TIMEOUT)
            if line is None:
                rc = self.proc.poll()
                if rc == 2:  # port taken between free_port() and bind: try another
                    continue
                self.stop()
                raise RuntimeError(f"{self.name} {self.args}: no READY line (exit code {rc}); log: {self.log.name}")
            parts = dict(p.split("=", 1) for p in line.split()[2:])
            self.url = parts["url"]
            self.base = self.url.rsplit("/mcp", 1)[0]
            check(line.startswith(f"READY {self.name} url=http://127.0.0.1:{port}/mcp "), f"{self.name}{self.args}: READY line", line)
            check(int(parts["pid"]) == self.proc.pid, f"{self.name}{self.args}: READY pid is the started pid", line)
            return
        raise RuntimeError(f"{self.name}: could not find a free port")

    def _read_line(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    return None
                buf += chunk
        finally:
            sel.close()
        return buf.split(b"\n", 1)[0].decode()

    def extra_stdout(self) -> bytes:
        """Whatever else the server printed on stdout (should be nothing)."""
        assert self.proc is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        try:
            return self.proc.stdout.read() or b""
        except BlockingIOError:
            return b""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def check_busy_port(ex: Example) -> None:
    """A second replica on the same port exits with code 2 and prints nothing on stdout."""
    port = ex.url.rsplit(":", 1)[1].split("/")[0]
    run = os.path.join(HERE, ex.name, "run")
    p = subprocess.run([run, "--port", port], capture_output=True, timeout=60)
    check(p.returncode == 2 and p.stdout == b"", f"{ex.name}: busy port exits 2 with empty stdout", (p.returncode, p.stdout[:200]))


# ---------------------------------------------------------------------------
# Raw HTTP


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"} if body is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def messages(headers: dict[str, str], body: bytes) -> list[dict[str, Any]]:
    ctype = headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        out = []
        for block in body.decode().replace("\r\n", "\n").split("\n\n"):
            data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
            if data:
                out.append(json.loads(data))
        return out
    if ctype.startswith("application/json") and body:
        return [json.loads(body)]
    return []


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def modern_meta(caps: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": caps if caps is not None else {"roots": {}, "elicitation": {"form": {}}},
        "io.modelcontextprotocol/clientInfo": {"name": "verify_ts_go", "version": "0"},
    }


def modern_call(url: str, rid: int, name: str, args: dict[str, Any], extra: dict[str, Any] | None = None, caps: dict[str, Any] | None = None):
    params: dict[str, Any] = {"_meta": modern_meta(caps), "name": name, "arguments": args, **(extra or {})}
    hdrs = {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name}
    return http("POST", url, {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}, hdrs)


def init_body(version: str = "2025-06-18") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "verify", "version": "0"}},
    }


# ---------------------------------------------------------------------------
# Client-driven checks


class Answers:
    """Callbacks for the Python client; `elicit_answer` is set per call."""

    def __init__(self) -> None:
        self.elicit_answer: types.ElicitResult = types.ElicitResult(action="cancel")
        self.elicit_seen: list[types.ElicitRequestParams] = []
        self.roots_calls = 0

    async def roots(self, _ctx: Any) -> types.ListRootsResult:
        self.roots_calls += 1
        return types.ListRootsResult(roots=[types.Root(uri="file:///a"), types.Root(uri="file:///b")])

    async def elicit(self, _ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicit_seen.append(params)
        return self.elicit_answer


def text_of(r: types.CallToolResult) -> str:
    return r.content[0].text if r.content and isinstance(r.content[0], types.TextContent) else ""


async def basic_checks(c: Client, label: str) -> None:
    r = await c.call_tool("add", {"a": 2, "b": 3})
    check(text_of(r) == "5" and not r.is_error, f"{label}: add(2,3) -> 5", (text_of(r), r.is_error))
    r = await c.call_tool("add", {"a": 2.5, "b": 1})
    check(text_of(r) == "3.5", f"{label}: add(2.5,1) -> 3.5", text_of(r))

    progress: list[tuple[float, float | None]] = []
    stamps: list[float] = []

    async def on_progress(p: float, total: float | None, _m: str | None) -> None:
        progress.append((p, total))
        stamps.append(time.monotonic())

    r = await c.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
    check(text_of(r) == "counted to 3", f"{label}: slow_count(3) result", text_of(r))
    check(progress == [(1, 3), (2, 3), (3, 3)], f"{label}: slow_count(3) progress 1..3 of 3", progress)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    check(all(0.05 <= g <= 0.5 for g in gaps), f"{label}: progress about 100 ms apart", gaps)

    tag = f"ok-{uuid.uuid4().hex[:8]}"
    r = await c.call_tool("sleep_then_return", {"seconds": 0.2, "tag": tag})
    check(text_of(r) == "slept 0.2", f"{label}: sleep_then_return(0.2) -> 'slept 0.2'", text_of(r))


async def cancel_check(c: Client, base: str, label: str) -> None:
    """Abandon a sleep_then_return call; `cancelled` must be recorded within 1 s."""
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    with anyio.move_on_after(0.5):
        await c.call_tool("sleep_then_return", {"seconds": 5, "tag": tag})
    t_cancel = time.time()
    found: dict[str, Any] | None = None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        evs = [e for e in get_json(base + "/debug/events") if e["tag"] == tag]
        found = next((e for e in evs if e["event"] == "cancelled"), None)
        if found:
            break
        await anyio.sleep(0.05)
    check(found is not None and found["at"] - t_cancel <= 1.0, f"{label}: cancelled sleep_then_return records 'cancelled' within 1 s", found)
    evs = [e["event"] for e in get_json(base + "/debug/events") if e["tag"] == tag]
    check(evs == ["started", "cancelled"], f"{label}: events for cancelled call are started, cancelled", evs)


async def back_channel_checks(c: Client, answers: Answers, label: str) -> None:
    r = await c.call_tool("ask_roots", {})
    check(text_of(r) == '{"roots":["file:///a","file:///b"]}' and not r.is_error, f"{label}: ask_roots", (text_of(r), r.is_error))
    cases = [
        (types.ElicitResult(action="accept", content={"confirmed": True}), '{"action":"accept","confirmed":true}'),
        (types.ElicitResult(action="accept", content={"confirmed": False}), '{"action":"accept","confirmed":false}'),
        (types.ElicitResult(action="decline"), '{"action":"decline"}'),
        (types.ElicitResult(action="cancel"), '{"action":"cancel"}'),
    ]
    for answer, want in cases:
        answers.elicit_answer = answer
        answers.elicit_seen.clear()
        r = await c.call_tool("confirm", {"question": "Proceed?"})
        check(text_of(r) == want and not r.is_error, f"{label}: confirm {answer.action} -> {want}", (text_of(r), r.is_error))
    seen = answers.elicit_seen[-1] if answers.elicit_seen else None
    check(
        seen is not None and seen.message == "Proceed?" and seen.requested_schema == CONFIRM_SCHEMA,
        f"{label}: elicitation message and requestedSchema",
        seen,
    )


async def no_back_channel_checks(c: Client, label: str, hint: str) -> None:
    for tool, args in (("ask_roots", {}), ("confirm", {"question": "Proceed?"})):
        t0 = time.monotonic()
        r = await c.call_tool(tool, args)
        took = time.monotonic() - t0
        check(r.is_error and hint in text_of(r) and took < 2.0, f"{label}: {tool} fails fast with a tool error", (text_of(r), r.is_error, took))


def headers_check(ex: Example, label: str) -> None:
    marker = uuid.uuid4().hex
    http("POST", ex.url, init_body(), {"X-Verify-Marker": marker})
    seen = get_json(ex.base + "/debug/headers")
    last = seen[-1] if seen else {}
    check(
        isinstance(seen, list) and len(seen) <= 200 and last.get("x-verify-marker") == marker and "host" in last,
        f"{label}: /debug/headers lists the last request's headers (lowercase names) last",
        last,
    )


# ---------------------------------------------------------------------------
# Per-example suites


def run_ts_client(url: str, marker: str) -> dict[str, Any]:
    p = subprocess.run(
        ["node", os.path.join(HERE, "typescript", "client.mjs"), url, "--header", f"X-Client-Marker: {marker}"],
        capture_output=True,
        timeout=60,
    )
    lines = p.stdout.decode().strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        out = {}
    out["_rc"] = p.returncode
    return out


def check_stateless_legacy_wire(url: str, label: str) -> None:
    """A stateless legacy server: initialize echoes 2025-06-18 over SSE and
    mints no session; there is no GET stream and nothing to DELETE."""
    st, h, body = http("POST", url, init_body("2025-06-18"))
    msgs = messages(h, body)
    check(
        st == 200 and h.get("content-type") == "text/event-stream" and "mcp-session-id" not in h
        and msgs and msgs[0]["result"]["protocolVersion"] == "2025-06-18",
        f"{label}: legacy initialize -> 200 SSE, echoes 2025-06-18, no Mcp-Session-Id",
        (st, h, body[:300]),
    )
    st, _h, _b = http("GET", url, headers={"Accept": "text/event-stream"})
    check(st == 405, f"{label}: GET -> 405", st)
    st, _h, _b = http("DELETE", url)
    check(st == 405, f"{label}: DELETE -> 405", st)


async def suite_typescript() -> None:
    stateless = Example("typescript", [])
    stateful = Example("typescript", ["--stateful"])
    try:
        stateless.start()
        stateful.start()
        check_busy_port(stateless)

        # --- stateless: wire
        check_stateless_legacy_wire(stateless.url, "ts stateless")
        st, h, body = http("POST", stateless.url, init_body(MODERN))
        msgs = messages(h, body)
        check(msgs and msgs[0]["result"]["protocolVersion"] == "2025-11-25", "ts stateless: initialize 2026-07-28 -> answered 2025-11-25", body[:300])
        st, h, body = http(
            "POST", stateless.url,
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 2, "b": 3}}},
            {"MCP-Protocol-Version": "2025-11-25"},
        )
        msgs = messages(h, body)
        check(st == 200 and msgs and msgs[-1]["result"]["content"][0]["text"] == "5", "ts stateless: tools/call without initialize works", body[:300])
        headers_check(stateless, "ts stateless")

        # --- stateless: Python legacy client
        async with Client(stateless.url, mode="legacy") as c:
            await basic_checks(c, "ts stateless legacy")
            await no_back_channel_checks(c, "ts stateless legacy", "--stateful")
            await cancel_check(c, stateless.base, "ts stateless legacy (notifications/cancelled)")

        # --- stateful: wire
        st, h, body = http("POST", stateful.url, init_body("2025-06-18"))
        sid = h.get("mcp-session-id", "")
        check(st == 200 and len(sid) == 36, "ts stateful: initialize -> Mcp-Session-Id (uuid)", (st, h))
        st, _h, body = http(
            "POST", stateful.url,
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}, {"MCP-Protocol-Version": "2025-06-18"},
        )
        check(st == 400, "ts stateful: POST without Mcp-Session-Id -> 400", (st, body[:200]))
        st, _h, body = http(
            "POST", stateful.url,
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
            {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": "nope"},
        )
        check(st == 404, "ts stateful: unknown Mcp-Session-Id -> 404", (st, body[:200]))
        st, _h, _b = http("DELETE", stateful.url, headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"})
        check(st == 200, "ts stateful: DELETE session -> 200", st)
        st, _h, _b = http(
            "POST", stateful.url,
            {"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}},
            {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": sid},
        )
        check(st == 404, "ts stateful: deleted session -> 404", st)

        # --- stateful: Python legacy client
        answers = Answers()
        async with Client(stateful.url, mode="legacy", list_roots_callback=answers.roots, elicitation_callback=answers.elicit) as c:
            await basic_checks(c, "ts stateful legacy")
            await back_channel_checks(c, answers, "ts stateful legacy")
            await cancel_check(c, stateful.base, "ts stateful legacy (notifications/cancelled)")

        # --- TS SDK client (client.mjs)
        marker = uuid.uuid4().hex
        out = run_ts_client(stateful.url, marker)
        check(
            out.get("_rc") == 0 and out.get("ok") and out.get("add") == "5"
            and out.get("ask_roots") == '{"roots":["file:///tmp/ts-root"]}' and out.get("roots_requests") == 1
            and out.get("session_id"),
            "ts stateful: client.mjs add + ask_roots",
            out,
        )
        seen = get_json(stateful.base + "/debug/headers")
        check(any(e.get("x-client-marker") == marker for e in seen), "ts stateful: client.mjs --header reaches the server", None)
        out = run_ts_client(stateless.url, marker)
        check(
            out.get("_rc") == 0 and out.get("ok") and out.get("add") == "5" and out.get("ask_roots_is_error") is True
            and out.get("session_id") is None,
            "ts stateless: client.mjs add ok, ask_roots tool error",
            out,
        )
        for ex in (stateless, stateful):
            extra = ex.extra_stdout()
            check(extra == b"", f"ts{ex.args}: nothing but READY on stdout", extra[:200])
    finally:
        stateless.stop()
        stateful.stop()


async def suite_go() -> None:
    ex = Example("go", [])
    try:
        ex.start()
        check_busy_port(ex)
        url = ex.url

        # --- wire: modern
        st, h, body = http(
            "POST", url,
            {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": modern_meta()}},
            {"MCP-Protocol-Version": MODERN, "Mcp-Method": "server/discover"},
        )
        msgs = messages(h, body)
        res = msgs[-1].get("result", {}) if msgs else {}
        check(
            st == 200 and res.get("resultType") == "complete" and MODERN in res.get("supportedVersions", [])
            and "ttlMs" in res and "cacheScope" in res,
            "go: server/discover (2026-07-28) -> complete, supportedVersions has 2026-07-28",
            (st, body[:400]),
        )
        st, h, body = modern_call(url, 2, "ask_roots", {})
        msgs = messages(h, body)
        res = msgs[-1].get("result", {}) if msgs else {}
        state = res.get("requestState")
        check(
            st == 200 and res.get("resultType") == "input_required"
            and res.get("inputRequests") == {"roots": {"method": "roots/list", "params": {}}} and isinstance(state, str),
            "go: MRTR round 1 of ask_roots -> input_required, inputRequests.roots = roots/list, requestState",
            (st, body[:500]),
        )
        st, h, body = modern_call(
            url, 3, "ask_roots", {},
            {"inputResponses": {"roots": {"roots": [{"uri": "file:///x"}, {"uri": "file:///y"}]}}, "requestState": state},
        )
        msgs = messages(h, body)
        res = msgs[-1].get("result", {}) if msgs else {}
        check(
            st == 200 and res.get("resultType") == "complete"
            and res.get("content", [{}])[0].get("text") == '{"roots":["file:///x","file:///y"]}',
            "go: MRTR retry with inputResponses + requestState -> complete",
            (st, body[:500]),
        )
        st, h, body = modern_call(
            url, 4, "ask_roots", {},
            {"inputResponses": {"roots": {"roots": [{"uri": "file:///x"}]}}, "requestState": (state or "") + "x"},
        )
        msgs = messages(h, body)
        err = msgs[-1].get("error", {}) if msgs else {}
        check(st == 400 and err.get("code") == -32602, "go: tampered requestState -> 400 -32602", (st, body[:300]))
        st, h, body = modern_call(url, 5, "confirm", {"question": "Proceed?"})
        msgs = messages(h, body)
        res = msgs[-1].get("result", {}) if msgs else {}
        check(
            res.get("resultType") == "input_required"
            and res.get("inputRequests") == {
                "confirm": {"method": "elicitation/create", "params": {"mode": "form", "message": "Proceed?", "requestedSchema": CONFIRM_SCHEMA}}
            },
            "go: MRTR round 1 of confirm -> elicitation/create form request",
            body[:500],
        )
        st, h, body = modern_call(url, 6, "ask_roots", {}, caps={})
        msgs = messages(h, body)
        err = msgs[-1].get("error", {}) if msgs else {}
        check(st == 400 and err.get("code") == -32021, "go: ask_roots without roots capability -> 400 -32021", (st, body[:300]))

        # --- wire: legacy
        check_stateless_legacy_wire(url, "go")
        headers_check(ex, "go")

        # --- Python client, 2026-07-28 (drives MRTR itself; cancel = closing the POST stream)
        answers = Answers()
        async with Client(url, mode=MODERN, list_roots_callback=answers.roots, elicitation_callback=answers.elicit) as c:
            await basic_checks(c, "go modern")
            await back_channel_checks(c, answers, "go modern")
            await cancel_check(c, ex.base, "go modern (stream close)")
        check(answers.roots_calls == 1, "go modern: roots callback ran once (via MRTR)", answers.roots_calls)

        # --- Python client, auto (discover probe picks 2026-07-28)
        async with Client(url, mode="auto", list_roots_callback=answers.roots) as c:
            r = await c.call_tool("ask_roots", {})
            check(text_of(r) == '{"roots":["file:///a","file:///b"]}', "go auto: ask_roots via MRTR", text_of(r))
        last = get_json(ex.base + "/debug/headers")[-1]
        check(last.get("mcp-protocol-version") == MODERN, "go auto: negotiated 2026-07-28", last.get("mcp-protocol-version"))

        # --- Python client, legacy
        async with Client(url, mode="legacy", list_roots_callback=answers.roots, elicitation_callback=answers.elicit) as c:
            await basic_checks(c, "go legacy")
            await no_back_channel_checks(c, "go legacy", MODERN)

        extra = ex.extra_stdout()
        check(extra == b"", "go: nothing but READY on stdout", extra[:200])
    finally:
        ex.stop()


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ("typescript", "go"):
        print(__doc__, file=sys.stderr)
        return 64
    suite: Callable[[], Any] = suite_typescript if sys.argv[1] == "typescript" else suite_go
    t0 = time.monotonic()

    async def runner() -> None:
        with anyio.fail_after(OVERALL_TIMEOUT):
            await suite()

    try:
        anyio.run(runner)
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        FAILED.append(f"suite aborted: {exc!r}")
        print(f"FAIL suite aborted: {exc!r}", flush=True)
    print(f"{sys.argv[1]}: {time.monotonic() - t0:.1f}s")
    for path in LOGS:
        if FAILED:
            print(f"server log: {path}")
        else:
            os.unlink(path)
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
