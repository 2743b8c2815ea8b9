"""The Celery side of the example: tasks that finish MCP tool calls through
the gateway's publish API (the OdinMCP pattern, without Pushpin).

A tool of server.py enqueues a task and answers the client's request with a
hold (`_meta["io.ratatosk/hold"]`); the gateway keeps the request open. The
task reports progress and then the result to
`POST {RATATOSK_ADMIN_URL}/sessions/{session}/holds/{hold}`. When the client
cancels, the gateway answers the next report with 410 and
`{"state": "cancelled"}` (or 404 once the session ended): the task stops
there, and records why in Redis (`ratatosk-example:cancelled:<tag>`) for
the tests to see.

A task may also ask the client something while the call is held
(`send_client_request_for_roots`): it publishes a JSON-RPC request
(`roots/list`) into the hold, and reads the client's answer from
`GET .../holds/{hold}` (`answers`, matched by the request's id).

Environment (the worker's; the secret never travels in a task):
    RATATOSK_CELERY_BROKER    default redis://127.0.0.1:6379/0
    RATATOSK_ADMIN_URL        default http://127.0.0.1:9090
    RATATOSK_PUBLISH_SECRET   the gateway's publish secret
    RATATOSK_WORKER_NAME      reported with each result, default the hostname
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

import httpx
import redis
from celery import Celery

BROKER = os.environ.get("RATATOSK_CELERY_BROKER", "redis://127.0.0.1:6379/0")
ADMIN_URL = os.environ.get("RATATOSK_ADMIN_URL", "http://127.0.0.1:9090").rstrip("/")
WORKER_NAME = os.environ.get("RATATOSK_WORKER_NAME", socket.gethostname())
LONG_QUEUE = "long"

app = Celery("ratatosk_example", broker=BROKER)
app.conf.update(
    # One task at a time per worker, taken only when the worker is free,
    # acknowledged when done: two workers share a burst of calls.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_routes={"tasks.very_long_running_task_will_cancel": {"queue": LONG_QUEUE}},
    broker_connection_retry_on_startup=True,
)

log = logging.getLogger("worker")


class Cancelled(Exception):
    """The client is gone: it cancelled the call, or its session ended."""


def publish(hold: dict[str, Any], message: dict[str, Any]) -> None:
    """One message for the hold; raises Cancelled when the client is gone."""
    secret = os.environ["RATATOSK_PUBLISH_SECRET"]
    r = httpx.post(hold_url(hold), json=message, headers={"Authorization": f"Bearer {secret}"}, timeout=5.0)
    if r.status_code == 410 and r.json().get("error", {}).get("data", {}).get("state") == "cancelled":
        raise Cancelled("cancelled")
    if r.status_code == 404:
        raise Cancelled("session-ended")
    r.raise_for_status()


def hold_url(hold: dict[str, Any]) -> str:
    return f"{ADMIN_URL}/sessions/{hold['session']}/holds/{hold['id']}"


def ask_client(hold: dict[str, Any], method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Asks the client `method` through the gateway and waits for its answer:
    the gateway sends the request on the held call's stream, and keeps the
    client's answer (with this id) with the hold, where the worker reads it."""
    ask_id = f"ask-{uuid.uuid4()}"
    publish(hold, {"jsonrpc": "2.0", "id": ask_id, "method": method, "params": params})
    secret = os.environ["RATATOSK_PUBLISH_SECRET"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(hold_url(hold), headers={"Authorization": f"Bearer {secret}"}, timeout=5.0)
        if r.status_code == 404:
            raise Cancelled("session-ended")
        r.raise_for_status()
        view = r.json()
        for answer in view.get("answers", []):
            if answer.get("id") == ask_id:
                return answer
        # "pending": this worker was faster than the upstream's answer,
        # which has not opened the hold yet; the request waits for it.
        if view["state"] not in ("open", "pending"):
            raise Cancelled(view["state"])
        time.sleep(0.05)
    raise TimeoutError(f"the client did not answer {method} within {timeout} s")


def progress(hold: dict[str, Any], done: float, total: float, message: str) -> None:
    if hold.get("progress_token") is None:
        return
    publish(hold, {"jsonrpc": "2.0", "method": "notifications/progress",
                   "params": {"progressToken": hold["progress_token"], "progress": done, "total": total,
                              "message": message}})


def result(hold: dict[str, Any], text: str) -> None:
    publish(hold, {"jsonrpc": "2.0", "id": 0, "result": {
        "content": [{"type": "text", "text": text}],
        "_meta": {"io.ratatosk.example/worker": WORKER_NAME}}})


@app.task(name="tasks.add")
def add(a: float, b: float, hold: dict[str, Any]) -> None:
    progress(hold, 1, 2, f"{WORKER_NAME} is adding")
    time.sleep(0.3)  # some work, so that a burst of calls spreads over the workers
    total = a + b
    result(hold, str(int(total) if float(total).is_integer() else total))


@app.task(name="tasks.send_client_request_for_roots")
def send_client_request_for_roots(hold: dict[str, Any]) -> None:
    answer = ask_client(hold, "roots/list", {})
    if "error" in answer:
        publish(hold, {"jsonrpc": "2.0", "id": 0, "result": {
            "content": [{"type": "text", "text": f"the client did not list its roots: {answer['error']['message']}"}],
            "isError": True}})
        return
    uris = [root["uri"] for root in answer["result"].get("roots", [])]
    result(hold, "roots: " + ", ".join(uris))


@app.task(name="tasks.very_long_running_task_will_cancel")
def very_long_running_task_will_cancel(seconds: float, tag: str, hold: dict[str, Any]) -> None:
    steps = max(1, int(seconds / 0.2))
    try:
        for step in range(steps):
            progress(hold, step, steps, f"step {step} of {steps}")
            time.sleep(0.2)
        result(hold, f"finished after {seconds} s")
    except Cancelled as why:
        log.info("hold %s (tag %s): %s, stopping", hold["id"], tag, why)
        redis.Redis.from_url(BROKER).set(f"ratatosk-example:cancelled:{tag}", f"{WORKER_NAME}:{why}", ex=3600)
