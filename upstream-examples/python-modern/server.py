"""Example modern (2026-07-28) MCP upstream for Ratatosk tests, on mcp 2.3.0 (MCPServer).

Serves Streamable HTTP at /mcp, stateless: a request whose MCP-Protocol-Version
header is 2026-07-28 takes the SDK's single-exchange modern path; a request with
a handshake-era header (or none) takes the SDK's legacy stateless path, so the
server is dual-era on one endpoint. Plain HTTP extras: GET /debug/headers,
GET /debug/events, POST /debug/tools-changed. Run it through ./run (which
prepares the venv), e.g.:

    ./run --port 9101 [--host 127.0.0.1] [--name python-modern]

Environment:
    RATATOSK_EXAMPLE_STATE_KEY  shared secret (>= 32 bytes) sealing requestState, so
                                that replicas accept each other's state; default: a
                                random key per process (state only valid on the
                                replica that minted it)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import socket
import sys
import time
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.request_state import RequestStateSecurity
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    InputRequiredResult,
    ListRootsRequest,
    ListRootsResult,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

MCP_PATH = "/mcp"
DEBUG_HEADERS_PATH = "/debug/headers"
DEBUG_EVENTS_PATH = "/debug/events"
DEBUG_TOOLS_CHANGED_PATH = "/debug/tools-changed"
# Requests to these paths are not recorded in SEEN_HEADERS.
UNRECORDED_PATHS = frozenset({DEBUG_HEADERS_PATH, DEBUG_EVENTS_PATH, DEBUG_TOOLS_CHANGED_PATH})
SEEN_MAX = 200
EVENTS_MAX = 500
STATE_KEY_ENV = "RATATOSK_EXAMPLE_STATE_KEY"
# The MCP server name. It is also the audience claim of sealed requestState, so
# it stays the same whatever --name says: replicas sharing a key must agree on it.
SERVER_NAME = "ratatosk-example-python-modern"

# The requestedSchema `confirm` sends (same in every example).
CONFIRM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"confirmed": {"type": "boolean", "title": "Confirmed"}},
    "required": ["confirmed"],
}

log = logging.getLogger("upstream")

# Headers of the last SEEN_MAX HTTP requests, oldest first (lowercase names,
# repeated headers joined with ", "). Nothing is filtered out.
SEEN_HEADERS: collections.deque[dict[str, str]] = collections.deque(maxlen=SEEN_MAX)
# sleep_then_return lifecycle events, oldest first: {"tag", "event", "at"}.
EVENTS: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_MAX)
# Fan-out to open subscriptions/listen streams (ctx.notify_* and /debug/tools-changed).
BUS = InMemorySubscriptionBus()


class RecordHeadersMiddleware:
    """Pure ASGI middleware (does not buffer streaming responses)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in UNRECORDED_PATHS:
            entry: dict[str, str] = {}
            for raw_name, raw_value in scope.get("headers", []):
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                entry[name] = f"{entry[name]}, {value}" if name in entry else value
            SEEN_HEADERS.append(entry)
        await self.app(scope, receive, send)


def _state_security() -> RequestStateSecurity | None:
    """A shared-key policy from RATATOSK_EXAMPLE_STATE_KEY, or None (the SDK's per-process key)."""
    key = os.environ.get(STATE_KEY_ENV)
    if not key:
        return None
    if len(key.encode()) < 32:
        print(f"error: {STATE_KEY_ENV} must be at least 32 bytes", file=sys.stderr)
        raise SystemExit(1)
    return RequestStateSecurity(keys=[key], audience=SERVER_NAME)


mcp = MCPServer(SERVER_NAME, request_state_security=_state_security(), subscriptions=BUS)


def _record(tag: str, event: str) -> None:
    EVENTS.append({"tag": tag, "event": event, "at": time.time()})
    log.info("sleep_then_return tag=%r %s", tag, event)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _require_modern(ctx: Context, tool: str) -> None:
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        raise ToolError(
            f"{tool}: needs a 2026-07-28 request (input requests travel in an InputRequiredResult); "
            f"this {ctx.protocol_version} request reached the SDK's stateless legacy path, which cannot "
            "receive the client's answer to a server-to-client request"
        )


def _missing_capability(what: str, required: dict[str, Any]) -> MCPError:
    return MCPError(
        code=MISSING_REQUIRED_CLIENT_CAPABILITY,
        message=f"Client did not declare the {what} capability",
        data={"requiredCapabilities": required},
    )


def _input(ctx: Context, key: str, state: str) -> Any | None:
    """The answer to input request `key`, if this is the retry of our own round `state`."""
    if ctx.request_state != state or not ctx.input_responses:
        return None
    return ctx.input_responses.get(key)


def _as(model: type[Any], value: Any) -> Any | None:
    if isinstance(value, model):
        return value
    try:
        raw = value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value
        return model.model_validate(raw)
    except ValidationError:
        return None


@mcp.tool()
def add(a: int | float, b: int | float) -> int | float:
    """Return a + b."""
    return a + b


@mcp.tool()
async def slow_count(n: int, ctx: Context) -> str:
    """Send n progress notifications about 100 ms apart, then return "counted to n".

    Progress is only sent if the request carries _meta.progressToken.
    """
    if n < 0 or n > 10_000:
        raise ToolError("n must be between 0 and 10000")
    for i in range(1, n + 1):
        await anyio.sleep(0.1)
        await ctx.report_progress(i, n)
    return f"counted to {n}"


@mcp.tool()
async def ask_roots(ctx: Context) -> str | InputRequiredResult:
    """Ask the client for its roots (MRTR roots/list) and return {"roots":[uri,...]} as compact JSON."""
    _require_modern(ctx, "ask_roots")
    caps = ctx.client_capabilities
    if caps is None or caps.roots is None:
        raise _missing_capability("roots", {"roots": {}})
    answer = _input(ctx, "roots", "ask_roots")
    if answer is not None:
        roots = _as(ListRootsResult, answer)
        if roots is not None:
            return _compact({"roots": [str(root.uri) for root in roots.roots]})
        log.info("ask_roots: unusable answer %r; asking again", answer)
    return InputRequiredResult(input_requests={"roots": ListRootsRequest()}, request_state="ask_roots")


@mcp.tool()
async def confirm(question: str, ctx: Context) -> str | InputRequiredResult:
    """Ask the client to confirm (MRTR form elicitation with a boolean "confirmed") and
    return {"action":...,"confirmed":...} as compact JSON."""
    _require_modern(ctx, "confirm")
    caps = ctx.client_capabilities
    el = caps.elicitation if caps is not None else None
    # `elicitation: {}` means form mode; with sub-keys, `form` must be among them.
    if el is None or (el.form is None and el.url is not None):
        raise _missing_capability("elicitation (form)", {"elicitation": {"form": {}}})
    answer = _input(ctx, "confirm", "confirm")
    if answer is not None:
        result = _as(ElicitResult, answer)
        if result is not None:
            if result.action != "accept":
                return _compact({"action": result.action})
            confirmed = (result.content or {}).get("confirmed")
            if isinstance(confirmed, bool):
                return _compact({"action": "accept", "confirmed": confirmed})
        log.info("confirm: unusable answer %r; asking again", answer)
    request = ElicitRequest(params=ElicitRequestFormParams(message=question, requested_schema=CONFIRM_SCHEMA))
    return InputRequiredResult(input_requests={"confirm": request}, request_state="confirm")


@mcp.tool()
async def endless_input(ctx: Context) -> str | InputRequiredResult:
    """Never completes: every round returns an InputRequiredResult asking for roots.

    requestState counts the rounds ("endless:<n>"); for testing round limits."""
    _require_modern(ctx, "endless_input")
    state = ctx.request_state or ""
    n = int(state.split(":", 1)[1]) + 1 if state.startswith("endless:") else 1
    log.info("endless_input: round %d", n)
    return InputRequiredResult(input_requests={"roots": ListRootsRequest()}, request_state=f"endless:{n}")


@mcp.tool()
async def sleep_then_return(seconds: int | float, tag: str = "") -> str:
    """Record "started", sleep, record "finished" and return "slept <seconds>".

    A cancelled call (modern: the client closed the response stream) records
    "cancelled" (see GET /debug/events)."""
    if seconds < 0 or seconds > 3600:
        raise ToolError("seconds must be between 0 and 3600")
    _record(tag, "started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _record(tag, "cancelled")
        raise
    _record(tag, "finished")
    return f"slept {seconds}"


@mcp.tool()
async def change_tools(ctx: Context) -> str:
    """Send notifications/tools/list_changed to every open subscriptions/listen stream
    that asked for toolsListChanged. The tool list itself does not change."""
    await ctx.notify_tools_changed()
    log.info("published notifications/tools/list_changed (tool)")
    return "tools changed"


@mcp.tool()
def seen_headers() -> list[dict[str, str]]:
    """Headers of the last 200 HTTP requests (oldest first, lowercase names).
    The request carrying this call is the last entry."""
    return list(SEEN_HEADERS)


@mcp.custom_route(DEBUG_HEADERS_PATH, methods=["GET"])
async def debug_headers(request: Request) -> JSONResponse:
    return JSONResponse(list(SEEN_HEADERS))


@mcp.custom_route(DEBUG_EVENTS_PATH, methods=["GET"])
async def debug_events(request: Request) -> JSONResponse:
    return JSONResponse(list(EVENTS))


@mcp.custom_route(DEBUG_TOOLS_CHANGED_PATH, methods=["POST"])
async def debug_tools_changed(request: Request) -> JSONResponse:
    await BUS.publish(ToolsListChanged())
    log.info("published notifications/tools/list_changed (POST %s)", DEBUG_TOOLS_CHANGED_PATH)
    return JSONResponse({"published": "notifications/tools/list_changed"})


def _log_prefix(name: str) -> str:
    """python-modern -> py-modern; other names unchanged."""
    return "py-" + name[len("python-") :] if name.startswith("python-") else name


def _configure_logging(name: str, port: int) -> None:
    fmt = f"%(asctime)s [{_log_prefix(name)}:{port}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)


async def _serve(host: str, port: int, name: str) -> None:
    app = RecordHeadersMiddleware(
        mcp.streamable_http_app(
            streamable_http_path=MCP_PATH,
            stateless_http=True,
            json_response=False,
            # No Host/Origin checks, like the FastMCP 2.x example: the gateway
            # may forward any Host.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
    )
    # Bind ourselves so a busy port fails fast and clearly.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", host, port, exc)
        raise SystemExit(2) from None
    sock.listen(512)
    sock.set_inheritable(True)

    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        print(f"READY {name} url=http://{host}:{port}{MCP_PATH} pid={os.getpid()}", flush=True)

    ann = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        ann.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="python-modern", help="name used in the READY line and log prefix")
    args = parser.parse_args()
    _configure_logging(args.name, args.port)
    log.info(
        "requestState key: %s",
        f"shared ({STATE_KEY_ENV})" if os.environ.get(STATE_KEY_ENV) else "per-process (random)",
    )
    asyncio.run(_serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
