"""Example FastMCP (2.x) upstream for Ratatosk tests.

Serves Streamable HTTP at /mcp, stateless (stateless_http=True) by default or
stateful with --stateful, plus GET /debug/headers, GET /debug/events and
GET /debug/sessions (the SDK's open sessions, stateful mode).
Run it through ./run (which prepares the venv), e.g.:

    ./run --port 9001 [--host 127.0.0.1] [--stateful] [--name python-fastmcp]

Environment:
    RATATOSK_ADMIN_URL        default http://127.0.0.1:9090 (notify_me publishes here)
    RATATOSK_PUBLISH_SECRET   bearer secret for the publish call (notify_me fails without it)
    RATATOSK_NOTIFY_DELAY_MS  delay before notify_me publishes, default 200
    RATATOSK_INPUT_TIMEOUT_S  how long ask_roots/confirm wait for the client's answer
                              in stateful mode, default 30
    EXAMPLE_JWKS_URL          set: /mcp wants a bearer JWT signed by a key of this set
                              (FastMCP's JWTVerifier), with
    EXAMPLE_JWT_ISSUER        its `iss`, and
    EXAMPLE_JWT_AUDIENCE      an `aud` it must have, and
    EXAMPLE_JWT_ALGORITHM     its algorithm (default ES256; Keycloak's is RS256);
                              `whoami` returns the token's claims
    EXAMPLE_TLS_CERT_FILE,    set both: serve HTTPS (python-common/example_http.py)
    EXAMPLE_TLS_KEY_FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
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
from fastmcp import Context, FastMCP  # noqa: E402
from fastmcp.exceptions import ToolError  # noqa: E402
from fastmcp.server.dependencies import get_http_request  # noqa: E402
from mcp import types as mt  # noqa: E402
from mcp.shared.exceptions import McpError  # noqa: E402
from mcp.shared.message import ServerMessageMetadata  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python-common"))
from example_http import (  # noqa: E402
    CONFIRM_SCHEMA,
    DEBUG_EVENTS_PATH,
    DEBUG_HEADERS_PATH,
    DEBUG_SESSIONS_PATH,
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

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
DEFAULT_INPUT_TIMEOUT_S = 30.0

log = logging.getLogger("upstream")

# Keep strong references to background tasks so they are not garbage-collected.
_BACKGROUND: set[asyncio.Task[None]] = set()

# Set from the command line in main(): False means stateless_http=True.
STATEFUL = False

# Stateless mode only: in-flight sleep_then_return calls that a later
# notifications/cancelled POST may cancel. Key: (Ratatosk-Session header or "",
# JSON encoding of the request id); value: (ServerSession, request id).
_CANCELLABLE: dict[tuple[str, str], tuple[Any, Any]] = {}


class StatelessCancelMiddleware:
    """Stateless mode only: make a POSTed notifications/cancelled reach its request.

    With stateless_http=True every POST gets a fresh transport and session, so
    the SDK drops a notifications/cancelled (its session never saw the
    request). This pure ASGI middleware reads each POST body to /mcp (they are
    small), and for notifications/cancelled looks up the in-flight call that
    registered itself in _CANCELLABLE (sleep_then_return does) and cancels it
    exactly as the SDK does in stateful mode (RequestResponder.cancel(): the
    tool sees CancelledError, the client gets error code 0 "Request
    cancelled"). The body is then replayed to the app unchanged (202).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if STATEFUL or scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != MCP_PATH:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away before the body was complete
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if b"notifications/cancelled" in body:
            await self._cancel(scope, body)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _cancel(scope: dict, body: bytes) -> None:
        try:
            msg = json.loads(body)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("method") != "notifications/cancelled":
            return
        params = msg.get("params") or {}
        if not isinstance(params, dict) or "requestId" not in params:
            return
        rs = ""
        for raw_name, raw_value in scope.get("headers", []):
            if raw_name.lower() == b"ratatosk-session":
                rs = raw_value.decode("latin-1")
        entry = _CANCELLABLE.get((rs, json.dumps(params["requestId"])))
        if entry is None:
            log.info("notifications/cancelled for unknown request %r (ratatosk-session=%r)", params["requestId"], rs)
            return
        session, request_id = entry
        responder = session._in_flight.get(request_id)  # noqa: SLF001 - pinned mcp 1.30
        if responder is not None:
            log.info("cancelling request %r on notifications/cancelled", request_id)
            await responder.cancel()


def _verifier() -> Any:
    """Bearer JWTs checked against a key set when EXAMPLE_JWKS_URL is set."""
    jwks = os.environ.get("EXAMPLE_JWKS_URL")
    if not jwks:
        return None
    from fastmcp.server.auth.providers.jwt import JWTVerifier

    return JWTVerifier(jwks_uri=jwks, issuer=os.environ.get("EXAMPLE_JWT_ISSUER"),
                       audience=os.environ.get("EXAMPLE_JWT_AUDIENCE"),
                       algorithm=os.environ.get("EXAMPLE_JWT_ALGORITHM", "ES256"))


mcp = FastMCP(name="ratatosk-example-python-fastmcp", auth=_verifier())


@mcp.tool
def whoami() -> dict:
    """The claims of the bearer token this call came with (empty without
    EXAMPLE_JWKS_URL)."""
    from fastmcp.server.dependencies import get_access_token

    token = get_access_token()
    return {"claims": token.claims if token else {}}


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


def _input_timeout() -> float:
    return float(os.environ.get("RATATOSK_INPUT_TIMEOUT_S", str(DEFAULT_INPUT_TIMEOUT_S)))


def _client_caps(ctx: Context) -> mt.ClientCapabilities | None:
    params = ctx.session.client_params
    return params.capabilities if params is not None else None


async def _ask_client(ctx: Context, tool: str, request: mt.ServerRequest, result_type: type[Any]) -> Any:
    """Send a server->client request on this tools/call's own SSE stream and wait for the answer.

    Stateless (the default), this is what any stateless 2025 server does: the
    request goes out, but the client's answer is POSTed to a fresh transport
    that knows nothing of it, so the wait ends only at the timeout. The
    gateway notices the question and ends the call at once; called directly,
    the tool fails after RATATOSK_INPUT_TIMEOUT_S.
    """
    timeout = _input_timeout()
    try:
        return await ctx.session.send_request(
            request,
            result_type,
            request_read_timeout_seconds=timedelta(seconds=timeout),
            # Related to the tools/call, so it travels on that POST's SSE stream
            # (not on the standalone GET stream).
            metadata=ServerMessageMetadata(related_request_id=ctx.request_context.request_id),
        )
    except McpError as exc:
        if exc.error.code == 408 or "timed out" in exc.error.message.lower():
            raise ToolError(f"{tool}: no answer from the client within {timeout:g} s") from None
        raise ToolError(f"{tool}: the client answered with error {exc.error.code}: {exc.error.message}") from None


@mcp.tool
async def ask_roots(ctx: Context) -> str:
    """Ask the client for its roots (roots/list) and return {"roots":[uri,...]} as compact JSON."""
    caps = _client_caps(ctx)
    if STATEFUL and (caps is None or caps.roots is None):
        raise ToolError("ask_roots: the client did not declare the roots capability")
    result = await _ask_client(ctx, "ask_roots", mt.ServerRequest(mt.ListRootsRequest()), mt.ListRootsResult)
    return compact({"roots": [str(root.uri) for root in result.roots]})


@mcp.tool
async def confirm(question: str, ctx: Context) -> str:
    """Ask the client to confirm (form elicitation with a boolean "confirmed") and
    return {"action":...,"confirmed":...} as compact JSON."""
    caps = _client_caps(ctx)
    if STATEFUL:
        el = caps.elicitation if caps is not None else None
        # `elicitation: {}` means form mode; with sub-keys, `form` must be among them.
        if el is None or (el.form is None and el.url is not None):
            raise ToolError("confirm: the client did not declare the elicitation (form) capability")
    request = mt.ServerRequest(
        mt.ElicitRequest(params=mt.ElicitRequestFormParams(message=question, requestedSchema=CONFIRM_SCHEMA))
    )
    result: mt.ElicitResult = await _ask_client(ctx, "confirm", request, mt.ElicitResult)
    if result.action != "accept":
        return compact({"action": result.action})
    confirmed = (result.content or {}).get("confirmed")
    if not isinstance(confirmed, bool):
        raise ToolError(f"confirm: accepted without a boolean 'confirmed' (content={result.content!r})")
    return compact({"action": "accept", "confirmed": confirmed})


@mcp.tool
async def sleep_then_return(seconds: int | float, ctx: Context, tag: str = "") -> str:
    """Record "started", sleep, record "finished" and return "slept <seconds>".

    A cancelled call records "cancelled" (see GET /debug/events)."""
    if seconds < 0 or seconds > 3600:
        raise ToolError("seconds must be between 0 and 3600")
    key: tuple[str, str] | None = None
    if not STATEFUL:
        request_id = ctx.request_context.request_id
        key = (get_http_request().headers.get("ratatosk-session", ""), json.dumps(request_id))
        _CANCELLABLE[key] = (ctx.session, request_id)
    record(tag, "started")
    try:
        await _recorded_sleep(seconds, tag)
    finally:
        if key is not None and _CANCELLABLE.get(key, (None, None))[0] is ctx.session:
            del _CANCELLABLE[key]
    return f"slept {seconds}"


async def _recorded_sleep(seconds: int | float, tag: str) -> None:
    """Sleep, then record "finished"; record "cancelled" if cancelled."""
    if seconds < 0 or seconds > 3600:
        raise ToolError("seconds must be between 0 and 3600")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        record(tag, "cancelled")
        raise
    record(tag, "finished")


@mcp.tool
async def ask_roots_twice(ctx: Context) -> str:
    """Ask the client for its roots twice, the second question after the first
    answer, and return {"first":[uri,...],"second":[uri,...]} as compact JSON."""
    caps = _client_caps(ctx)
    if STATEFUL and (caps is None or caps.roots is None):
        raise ToolError("ask_roots_twice: the client did not declare the roots capability")
    answers = []
    for _ in range(2):
        result = await _ask_client(ctx, "ask_roots_twice", mt.ServerRequest(mt.ListRootsRequest()),
                                   mt.ListRootsResult)
        answers.append([str(root.uri) for root in result.roots])
    return compact({"first": answers[0], "second": answers[1]})


@mcp.tool
async def ask_roots_then_sleep(seconds: int | float, ctx: Context, tag: str = "") -> str:
    """Ask the client for its roots like ask_roots, record "answered", then
    sleep like sleep_then_return (records "cancelled" if cancelled, else
    "finished") and return the roots JSON."""
    if seconds < 0 or seconds > 3600:
        raise ToolError("seconds must be between 0 and 3600")
    caps = _client_caps(ctx)
    if STATEFUL and (caps is None or caps.roots is None):
        raise ToolError("ask_roots_then_sleep: the client did not declare the roots capability")
    result = await _ask_client(ctx, "ask_roots_then_sleep", mt.ServerRequest(mt.ListRootsRequest()),
                               mt.ListRootsResult)
    record(tag, "answered")
    await _recorded_sleep(seconds, tag)
    return compact({"roots": [str(root.uri) for root in result.roots]})


mcp.custom_route(DEBUG_HEADERS_PATH, methods=["GET"])(debug_headers)
mcp.custom_route(DEBUG_EVENTS_PATH, methods=["GET"])(debug_events)


def _configure_logging(name: str, port: int) -> None:
    configure_logging(name, port)
    # fastmcp installs rich handlers on its own logger at import; route it through ours.
    fl = logging.getLogger("fastmcp")
    for h in fl.handlers[:]:
        fl.removeHandler(h)
    fl.propagate = True
    fl.setLevel(logging.INFO)


def _session_manager(app: Any) -> Any:
    """The SDK's session manager behind the /mcp route of `app`."""
    for route in app.routes:
        # With auth, the endpoint is wrapped in FastMCP's RequireAuthMiddleware.
        endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
        while endpoint is not None:
            manager = getattr(endpoint, "session_manager", None)
            if manager is not None:
                return manager
            endpoint = getattr(endpoint, "app", None)
    raise RuntimeError("no MCP route with a session manager")


async def _serve(host: str, port: int, name: str) -> None:
    app = mcp.http_app(
        path=MCP_PATH,
        stateless_http=not STATEFUL,
        middleware=[Middleware(RecordHeadersMiddleware), Middleware(StatelessCancelMiddleware)],
    )
    manager = _session_manager(app)

    async def debug_sessions(request: Any) -> JSONResponse:
        # The SDK keeps no public count; its map of live transports is it
        # (a DELETE removes the session's entry at once).
        return JSONResponse({"open": len(manager._server_instances)})

    app.add_route(DEBUG_SESSIONS_PATH, debug_sessions, methods=["GET"])
    await serve(app, host, port, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--stateful",
        action="store_true",
        help="keep sessions (stateless_http=False); the server mints Mcp-Session-Id",
    )
    parser.add_argument("--name", default="python-fastmcp", help="name used in the READY line and log prefix")
    args = parser.parse_args()
    global STATEFUL
    STATEFUL = args.stateful
    _configure_logging(args.name, args.port)
    log.info("mode: %s", "stateful" if STATEFUL else "stateless")
    asyncio.run(_serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
