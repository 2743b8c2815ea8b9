"""What the Python example upstreams share: header and event recording for
the tests, the `confirm` schema, logging, and serving on a socket of their
own with one READY line (and, with RATATOSK_REGISTER_URL, registered with
the gateway while serving: see register.py).

Imported by python-fastmcp/server.py and python-modern/server.py, which put
this folder on sys.path; it needs only uvicorn and starlette, which both of
their venvs have.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse

from register import Registration, registration_from_env

MCP_PATH = "/mcp"
DEBUG_HEADERS_PATH = "/debug/headers"
DEBUG_EVENTS_PATH = "/debug/events"
DEBUG_SESSIONS_PATH = "/debug/sessions"

# The requestedSchema `confirm` sends (same in every example).
CONFIRM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"confirmed": {"type": "boolean", "title": "Confirmed"}},
    "required": ["confirmed"],
}

log = logging.getLogger("upstream")

# Headers of the last 200 HTTP requests, oldest first. Each entry is a dict of
# lowercase header name -> value (repeated headers joined with ", "). Nothing
# is filtered out: authorization, cookies, mcp-session-id etc. are all kept.
SEEN_HEADERS: collections.deque[dict[str, str]] = collections.deque(maxlen=200)

# sleep_then_return lifecycle events, oldest first: {"tag", "event", "at"}.
EVENTS: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)


def record(tag: str, event: str) -> None:
    EVENTS.append({"tag": tag, "event": event, "at": time.time()})
    log.info("sleep_then_return tag=%r %s", tag, event)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class RecordHeadersMiddleware:
    """Pure ASGI middleware (does not buffer streaming responses). Requests
    to the /debug/ paths are not recorded."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope.get("path", "").startswith("/debug/"):
            entry: dict[str, str] = {}
            for raw_name, raw_value in scope.get("headers", []):
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                entry[name] = f"{entry[name]}, {value}" if name in entry else value
            SEEN_HEADERS.append(entry)
        await self.app(scope, receive, send)


async def debug_headers(request: Request) -> JSONResponse:
    return JSONResponse(list(SEEN_HEADERS))


async def debug_events(request: Request) -> JSONResponse:
    return JSONResponse(list(EVENTS))


def configure_logging(name: str, port: int) -> None:
    """Log lines to stderr, prefixed `[py-<x>:<port>]` for `python-<x>`."""
    prefix = "py-" + name[len("python-") :] if name.startswith("python-") else name
    fmt = f"%(asctime)s [{prefix}:{port}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)


async def serve(app: Any, host: str, port: int, name: str) -> None:
    """Serves `app` until stopped; prints `READY <name> url=... pid=...` on
    stdout once listening. A busy port exits with code 2."""
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

    # HTTPS when EXAMPLE_TLS_CERT_FILE and EXAMPLE_TLS_KEY_FILE name a PEM
    # certificate chain and its key (the gateway's TLS tests).
    cert, key = os.environ.get("EXAMPLE_TLS_CERT_FILE"), os.environ.get("EXAMPLE_TLS_KEY_FILE")
    tls = {"ssl_certfile": cert, "ssl_keyfile": key} if cert and key else {}
    scheme = "https" if tls else "http"
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=2, **tls)
    server = _Server(config)

    url = f"{scheme}://{host}:{port}{MCP_PATH}"
    # With RATATOSK_REGISTER_URL, registered with the gateway while it runs.
    registration = server.registration = registration_from_env(url)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        print(f"READY {name} url={url} pid={os.getpid()}", flush=True)
        if registration is not None:
            registration.start()

    ann = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        ann.cancel()
        if registration is not None:
            await registration.stop()


class _Server(uvicorn.Server):
    """Leaves the gateway before it stops serving: after a signal,
    uvicorn raises the signal again once `serve` returns, so nothing after
    it runs."""

    registration: Registration | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.registration is not None:
            await self.registration.stop()
        await super().shutdown(sockets)
