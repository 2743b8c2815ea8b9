"""The admin listener, idle expiry and the `ratatosk check` command."""

from __future__ import annotations

import subprocess
import time

import httpx2
import pytest

from harness import PUBLISH_SECRET, Gateway, gateway_binary, initialize, org, post, rpc_error, wait_until


def test_health_readiness_and_metrics(gateway):
    assert gateway.admin_get("/healthz").json() == {"status": "ok"}
    ready = gateway.admin_get("/readyz")
    assert ready.status_code == 200
    replicas = ready.json()["orgs"]["org-1"]["replicas"]
    assert len(replicas) == 2 and all(r["in_rotation"] for r in replicas)

    url = gateway.url("org-1")
    sid = initialize(url)
    r = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                   "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}, session=sid)
    assert r.status_code == 200
    assert gateway.publish(sid, {"jsonrpc": "2.0", "method": "notifications/message",
                                 "params": {"level": "info", "data": "m"}}).status_code == 202
    with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http, http.stream(
            "GET", url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid}) as stream:
        from harness import SseReader

        SseReader(stream).next_message()
        text = gateway.metrics()
        assert 'ratatosk_open_streams{org="org-1"} ' in text
        assert 'ratatosk_open_streams{org="org-1"} 0' not in text
    text = gateway.metrics()
    for needle in [
        'ratatosk_requests_total{method="tools/call",org="org-1",status="200"}',
        'ratatosk_requests_total{method="initialize",org="org-1",status="200"}',
        'ratatosk_sessions{org="org-1"}',
        'ratatosk_upstream_latency_seconds_bucket{org="org-1",replica="',
        'ratatosk_events_published_total{org="org-1",source="publish"}',
        'ratatosk_events_delivered_total{org="org-1"}',
        'ratatosk_upstream_errors_total{kind="connect",org="org-dead"',
    ]:
        assert needle in text, needle


def test_sessions_api_needs_the_secret(gateway):
    sid = initialize(gateway.url("org-2"), name="listed")
    r = gateway.admin_get("/orgs/org-2/sessions")
    assert r.status_code == 401
    assert rpc_error(r)["code"] == -32000
    listed = {s["id"]: s for s in gateway.sessions("org-2")}
    assert listed[sid]["client_info"]["name"] == "listed"
    assert listed[sid]["subject"] == "anonymous"
    r = gateway.admin_get("/orgs/nope/sessions", headers={"Authorization": f"Bearer {PUBLISH_SECRET}"})
    assert r.status_code == 404


def test_idle_sessions_expire(tmp_path, replicas):
    gw = Gateway(tmp_path, {"org-1": org(replicas)}, idle_ttl="1s", name="gateway-ttl")
    gw.start_and_wait()
    try:
        url = gw.url("org-1")
        sid = initialize(url)
        listening = initialize(url)
        assert {sid, listening} <= {s["id"] for s in gw.sessions("org-1")}
        with httpx2.Client(timeout=httpx2.Timeout(10, read=5)) as http, http.stream(
                "GET", url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": listening}) as stream:
            assert stream.status_code == 200
            # Listing does not count as activity; the idle session ends on its own.
            wait_until("the idle session to expire", lambda: sid not in {s["id"] for s in gw.sessions("org-1")},
                       timeout=10)
            # A session with an open stream is not idle, however quiet.
            time.sleep(2.5)  # more than twice the 1 s TTL
            assert listening in {s["id"] for s in gw.sessions("org-1")}
        wait_until("the session to expire once its stream closed",
                   lambda: listening not in {s["id"] for s in gw.sessions("org-1")}, timeout=10)
        r = post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session=sid)
        assert r.status_code == 404
        assert rpc_error(r)["code"] == -32001
        gw.assert_healthy()
    finally:
        gw.stop()


def test_check_accepts_a_valid_config_and_names_what_is_wrong(tmp_path, gateway):
    ok = subprocess.run([str(gateway_binary()), "check", "--config", str(gateway.config_path)],
                        capture_output=True, text=True, env={"RATATOSK_PUBLISH_SECRET": PUBLISH_SECRET}, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(gateway.config_path.read_text().replace('"era"', '"eras"', 1))
    out = subprocess.run([str(gateway_binary()), "check", "--config", str(bad)], capture_output=True, text=True,
                         env={"RATATOSK_PUBLISH_SECRET": PUBLISH_SECRET}, timeout=30)
    assert out.returncode != 0
    assert str(bad) in out.stderr
    assert "upstream" in out.stderr and "unknown field `eras`" in out.stderr, out.stderr

    no_env = subprocess.run([str(gateway_binary()), "check", "--config", str(gateway.config_path)],
                            capture_output=True, text=True, env={}, timeout=30)
    assert no_env.returncode != 0
    assert "publish.secret" in no_env.stderr and "RATATOSK_PUBLISH_SECRET" in no_env.stderr


def test_gateway_refuses_to_start_on_a_busy_port(tmp_path, gateway):
    gw = Gateway(tmp_path, {"org-1": org(["http://127.0.0.1:1/mcp"])}, name="gateway-busy")
    gw.port = gateway.port
    text = gw.config_path.read_text()
    import json

    data = json.loads(text)
    data["listen"] = f"127.0.0.1:{gateway.port}"
    gw.config_path.write_text(json.dumps(data))
    gw.start()
    try:
        assert gw.popen.wait(20) != 0
        assert "not available" in gw.log_text()
    finally:
        gw.stop()
    gateway.assert_healthy()


@pytest.mark.parametrize("path", ["/nope", "/sessions/x", "/orgs/org-1"])
def test_unknown_admin_paths(gateway, path):
    r = gateway.admin_get(path)
    assert r.status_code == 404
    assert rpc_error(r)["code"] == -32004
