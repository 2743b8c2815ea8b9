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
import logging
import os
import sys
from pathlib import Path
from typing import Any

import anyio
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python-common"))
from example_http import (  # noqa: E402
    CONFIRM_SCHEMA,
    DEBUG_EVENTS_PATH,
    DEBUG_HEADERS_PATH,
    MCP_PATH,
    SEEN_HEADERS,
    RecordHeadersMiddleware,
    compact,
    configure_logging,
    debug_events,
    debug_headers,
    record,
    serve,
)

DEBUG_TOOLS_CHANGED_PATH = "/debug/tools-changed"
STATE_KEY_ENV = "RATATOSK_EXAMPLE_STATE_KEY"
# The MCP server name. It is also the audience claim of sealed requestState, so
# it stays the same whatever --name says: replicas sharing a key must agree on it.
SERVER_NAME = "ratatosk-example-python-modern"

log = logging.getLogger("upstream")

# Fan-out to open subscriptions/listen streams (ctx.notify_* and /debug/tools-changed).
BUS = InMemorySubscriptionBus()


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
            return compact({"roots": [str(root.uri) for root in roots.roots]})
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
                return compact({"action": result.action})
            confirmed = (result.content or {}).get("confirmed")
            if isinstance(confirmed, bool):
                return compact({"action": "accept", "confirmed": confirmed})
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
    record(tag, "started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        record(tag, "cancelled")
        raise
    record(tag, "finished")
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


mcp.custom_route(DEBUG_HEADERS_PATH, methods=["GET"])(debug_headers)
mcp.custom_route(DEBUG_EVENTS_PATH, methods=["GET"])(debug_events)


@mcp.custom_route(DEBUG_TOOLS_CHANGED_PATH, methods=["POST"])
async def debug_tools_changed(request: Request) -> JSONResponse:
    await BUS.publish(ToolsListChanged())
    log.info("published notifications/tools/list_changed (POST %s)", DEBUG_TOOLS_CHANGED_PATH)
    return JSONResponse({"published": "notifications/tools/list_changed"})


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
    await serve(app, host, port, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="python-modern", help="name used in the READY line and log prefix")
    args = parser.parse_args()
    configure_logging(args.name, args.port)
    log.info(
        "requestState key: %s",
        f"shared ({STATE_KEY_ENV})" if os.environ.get(STATE_KEY_ENV) else "per-process (random)",
    )
    asyncio.run(_serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
