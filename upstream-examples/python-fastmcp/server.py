"""Example stateless FastMCP (2.x) upstream for Ratatosk tests.

Serves Streamable HTTP at /mcp with stateless_http=True, plus GET /debug/headers.
Run it through ./run (which prepares the venv), e.g.:

    ./run --port 9001 [--host 127.0.0.1]

Environment:
    RATATOSK_ADMIN_URL        default http://127.0.0.1:9090 (notify_me publishes here)
    RATATOSK_PUBLISH_SECRET   bearer secret for the publish call (notify_me fails without it)
    RATATOSK_NOTIFY_DELAY_MS  delay before notify_me publishes, default 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import socket
import sys
import warnings
from typing import Any
from urllib.parse import quote

# Silence import-time deprecation chatter from fastmcp's auth dependency
# (authlib forces its own warnings to "always", so filter after importing it).
try:
    from authlib.deprecate import AuthlibDeprecationWarning

    warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)
except ImportError:  # pragma: no cover
    pass

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastmcp import Context, FastMCP  # noqa: E402
from fastmcp.exceptions import ToolError  # noqa: E402
from fastmcp.server.dependencies import get_http_request  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

MCP_PATH = "/mcp"
DEBUG_HEADERS_PATH = "/debug/headers"
SEEN_MAX = 200
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"

log = logging.getLogger("upstream")

# Headers of the last SEEN_MAX HTTP requests, oldest first. Each entry is a
# dict of lowercase header name -> value (repeated headers joined with ", ").
# Nothing is filtered out: authorization, cookies, mcp-session-id etc. are all
# kept. Requests to /debug/headers itself are not recorded.
SEEN_HEADERS: collections.deque[dict[str, str]] = collections.deque(maxlen=SEEN_MAX)

# Keep strong references to background tasks so they are not garbage-collected.
_BACKGROUND: set[asyncio.Task[None]] = set()


class RecordHeadersMiddleware:
    """Pure ASGI middleware (does not buffer streaming responses)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != DEBUG_HEADERS_PATH:
            entry: dict[str, str] = {}
            for raw_name, raw_value in scope.get("headers", []):
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                entry[name] = f"{entry[name]}, {value}" if name in entry else value
            SEEN_HEADERS.append(entry)
        await self.app(scope, receive, send)


mcp = FastMCP(name="ratatosk-example-python-fastmcp")


@mcp.tool
def add(a: int | float, b: int | float) -> int | float:
    """Return a + b."""
    return a + b


@mcp.tool
async def slow_count(n: int, ctx: Context) -> str:
    """Send n progress notifications about 100 ms apart, then return "counted to n".

    Progress is only sent if the request carries _meta.progressToken.
    """
    if n < 0 or n > 10_000:
        raise ToolError("n must be between 0 and 10000")
    for i in range(1, n + 1):
        await asyncio.sleep(0.1)
        await ctx.report_progress(i, n)
    return f"counted to {n}"


async def _publish(session_id: str, org: str | None, text: str, secret: str) -> None:
    delay = float(os.environ.get("RATATOSK_NOTIFY_DELAY_MS", "200")) / 1000.0
    await asyncio.sleep(delay)
    admin = os.environ.get("RATATOSK_ADMIN_URL", DEFAULT_ADMIN_URL).rstrip("/")
    url = f"{admin}/sessions/{quote(session_id, safe='')}/messages"
    body = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "logger": "notify_me", "data": text},
    }
    headers = {
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/json",
    }
    if org:
        headers["Ratatosk-Org"] = org
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            resp = await client.post(url, json=body, headers=headers)
        if resp.status_code >= 300:
            log.error("notify_me publish to %s failed: HTTP %s %s", url, resp.status_code, resp.text[:500])
        else:
            log.info("notify_me published to %s: HTTP %s", url, resp.status_code)
    except Exception as exc:  # noqa: BLE001 - log every failure, never raise
        log.error("notify_me publish to %s failed: %r", url, exc)


@mcp.tool
async def notify_me(text: str) -> str:
    """Return at once; ~200 ms later publish notifications/message(text) to the
    gateway admin API for the session named in the Ratatosk-Session header."""
    try:
        request = get_http_request()
    except RuntimeError:
        raise ToolError("notify_me: no HTTP request context") from None
    session_id = request.headers.get("ratatosk-session")
    if not session_id:
        raise ToolError("notify_me: missing Ratatosk-Session header (call through the Ratatosk gateway)")
    secret = os.environ.get("RATATOSK_PUBLISH_SECRET")
    if not secret:
        raise ToolError("notify_me: RATATOSK_PUBLISH_SECRET is not set on the upstream")
    org = request.headers.get("ratatosk-org")
    # asyncio.create_task (not the request's task group): the task outlives the
    # stateless request and its transport.
    task = asyncio.get_running_loop().create_task(_publish(session_id, org, text, secret))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    log.info("notify_me scheduled for session=%s org=%s", session_id, org)
    return "will notify"


@mcp.tool
def seen_headers() -> list[dict[str, str]]:
    """Headers of the last 200 HTTP requests (oldest first, lowercase names).
    The request carrying this call is the last entry."""
    return list(SEEN_HEADERS)


@mcp.custom_route(DEBUG_HEADERS_PATH, methods=["GET"])
async def debug_headers(request: Request) -> JSONResponse:
    return JSONResponse(list(SEEN_HEADERS))


def _configure_logging(port: int) -> None:
    fmt = f"%(asctime)s [py-fastmcp:{port}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    # fastmcp installs rich handlers on its own logger at import; route it through ours.
    fl = logging.getLogger("fastmcp")
    for h in fl.handlers[:]:
        fl.removeHandler(h)
    fl.propagate = True
    fl.setLevel(logging.INFO)


async def _serve(host: str, port: int) -> None:
    app = mcp.http_app(
        path=MCP_PATH,
        stateless_http=True,
        middleware=[Middleware(RecordHeadersMiddleware)],
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
        print(f"READY python-fastmcp url=http://{host}:{port}{MCP_PATH} pid={os.getpid()}", flush=True)

    ann = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        ann.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    _configure_logging(args.port)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
