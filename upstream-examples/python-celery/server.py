"""Example FastMCP (2.x) upstream whose tools run on Celery workers: each
tool enqueues a task (tasks.py) and answers with a hold, which the gateway
keeps open until the worker publishes the result through its publish API.
The server stays stateless (stateless_http=True) and answers at once.

    ./run --port 9001 [--host 127.0.0.1]      # the MCP server
    ./worker --name w1 [--queues celery,long] # a Celery worker

Environment:
    RATATOSK_CELERY_BROKER    default redis://127.0.0.1:6379/0
    RATATOSK_HOLD_TIMEOUT_S   how long the gateway waits for a worker, default 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from fastmcp import Context, FastMCP
from fastmcp.server.dependencies import get_http_request
from fastmcp.tools.tool import ToolResult
from mcp.types import TextContent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python-common"))
from example_http import MCP_PATH, configure_logging, serve  # noqa: E402

import tasks  # noqa: E402

HOLD_TIMEOUT_S = float(os.environ.get("RATATOSK_HOLD_TIMEOUT_S", "60"))

mcp = FastMCP("ratatosk-example-python-celery")


def hold_for(ctx: Context) -> dict[str, Any]:
    """Where the worker reports: the gateway session (Ratatosk-Session) and a
    new hold id, plus the client's progress token if it sent one."""
    session = get_http_request().headers.get("ratatosk-session")
    if not session:
        raise ValueError("no Ratatosk-Session header: call this server through the gateway")
    meta = ctx.request_context.meta if ctx.request_context else None
    token = getattr(meta, "progressToken", None) if meta else None
    return {"session": session, "id": f"celery-{uuid.uuid4()}", "progress_token": token}


def held(hold: dict[str, Any]) -> ToolResult:
    return ToolResult(content=[TextContent(type="text", text="queued")],
                      meta={"io.ratatosk/hold": {"id": hold["id"], "timeout": HOLD_TIMEOUT_S}})


@mcp.tool
def add(a: float, b: float, ctx: Context) -> ToolResult:
    """Adds two numbers on a Celery worker."""
    hold = hold_for(ctx)
    tasks.add.apply_async(args=[a, b, hold], task_id=hold["id"])
    return held(hold)


@mcp.tool
def send_client_request_for_roots(ctx: Context) -> ToolResult:
    """Asks the client for its roots from a Celery worker, through the
    gateway (the hold carries the request and the client's answer)."""
    hold = hold_for(ctx)
    tasks.send_client_request_for_roots.apply_async(args=[hold], task_id=hold["id"])
    return held(hold)


@mcp.tool
def very_long_running_task_will_cancel(ctx: Context, seconds: float = 30.0, tag: str = "") -> ToolResult:
    """Runs for `seconds` on a worker of the `long` queue, reporting progress,
    unless the client cancels it first."""
    hold = hold_for(ctx)
    tasks.very_long_running_task_will_cancel.apply_async(args=[seconds, tag, hold], task_id=hold["id"])
    return held(hold)


async def _serve(host: str, port: int, name: str) -> None:
    app = mcp.http_app(path=MCP_PATH, stateless_http=True)
    await serve(app, host, port, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="python-celery")
    args = parser.parse_args()
    configure_logging(args.name, args.port)
    asyncio.run(_serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
