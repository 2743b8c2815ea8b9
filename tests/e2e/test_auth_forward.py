"""Forward-auth: real nginx (Debian package) in front of a FastMCP replica,
asking `ratatosk-auth serve` about every request with `auth_request`."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import uuid
from pathlib import Path

import httpx2
import pytest

from conftest import identity_config
from harness import (KC_GATEWAY_SECRET, PROTOCOL, Proc, claims, free_port, gateway_binary, port_open,
                     post, wait_until)

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "nginx-e2e", "version": "1"}}}


IDENTITY_HEADERS = ("X-Ratatosk-Subject", "X-Ratatosk-Org", "X-Ratatosk-Scopes", "X-Ratatosk-Username")


def nginx_conf(root: Path, port: int, auth_port: int, upstream_port: int) -> str:
    """The README's nginx example, one pair of locations per org."""
    locations = []
    for org in ("org-1", "org-2"):
        # Client headers reach the auth subrequest (nginx's default): the
        # bridge reads only X-Original-URI, which nginx overwrites here.
        strip = "".join(f"\n            proxy_set_header {h} \"\";" for h in IDENTITY_HEADERS)
        locations.append(f"""
        location = /_auth/{org} {{
            internal;
            proxy_pass http://127.0.0.1:{auth_port}/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}
        location = /{org}/mcp {{
            auth_request /_auth/{org};
            auth_request_set $rt_subject $upstream_http_x_ratatosk_subject;
            auth_request_set $rt_org $upstream_http_x_ratatosk_org;
            auth_request_set $rt_scopes $upstream_http_x_ratatosk_scopes;
            auth_request_set $rt_username $upstream_http_x_ratatosk_username;
            proxy_set_header Authorization "";{strip}
            proxy_set_header Ratatosk-Subject $rt_subject;
            proxy_set_header Ratatosk-Org $rt_org;
            proxy_set_header Ratatosk-Scopes $rt_scopes;
            proxy_set_header Ratatosk-Username $rt_username;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://127.0.0.1:{upstream_port}/mcp;
        }}""")
    return f"""
daemon off;
master_process off;
error_log {root}/error.log info;
pid {root}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /.well-known/oauth-protected-resource/ {{
            proxy_pass http://127.0.0.1:{auth_port};
        }}
        {''.join(locations)}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx_stack(tmp_path_factory, keycloak, replicas):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise AssertionError("nginx is not installed: scripts/prereqs installs the Debian package")
    root = tmp_path_factory.mktemp("nginx")
    port, auth_port = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{auth_port}",
        "public_url": f"http://127.0.0.1:{port}",
        "identity": identity_config(keycloak.issuer),
        "mode": "jwt",
        # The org is the first segment of X-Original-URI, which nginx sets.
        "org_from": "nginx",
        "orgs": {"org-1": {"policy": [{"name": "readers", "when": {"realm_roles": ["mcp-reader"]},
                                       "allow": {"tools": ["add"]}}]},
                 "org-2": {"mode": "introspect"}},
    }
    (root / "auth.yaml").write_text(json.dumps(config))
    auth_bin = gateway_binary().parent / "ratatosk-auth"
    auth = Proc("ratatosk-auth", [str(auth_bin), "serve", "--config", str(root / "auth.yaml")],
                root / "ratatosk-auth.log", env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET, "NO_COLOR": "1"})
    (root / "nginx.conf").write_text(nginx_conf(root, port, auth_port, replicas[0].port))
    proxy = Proc("nginx", [nginx, "-p", str(root), "-c", str(root / "nginx.conf")], root / "nginx.log")
    auth.start()
    proxy.start()
    try:
        wait_until("ratatosk-auth listening", lambda: port_open(auth_port), alive=auth.death)
        wait_until("nginx listening", lambda: port_open(port), alive=proxy.death)
        yield f"http://127.0.0.1:{port}", auth, replicas[0]
        assert auth.death() is None, auth.death()
        assert "panicked" not in auth.log_text()
    finally:
        proxy.stop()
        auth.stop()


def test_nginx_refuses_without_a_token_with_the_bridge_challenge(nginx_stack, keycloak):
    base, _, _ = nginx_stack
    r = post(f"{base}/org-1/mcp", INIT, version=None)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    url = re.search(r'resource_metadata="([^"]+)"', challenge).group(1)
    assert url.startswith(base)
    doc = httpx2.get(url, timeout=5).json()
    assert doc["authorization_servers"] == [keycloak.issuer]


def test_sighup_does_not_stop_the_forward_auth_service(nginx_stack, keycloak):
    base, auth, _ = nginx_stack
    os.kill(auth.pid, signal.SIGHUP)
    wait_until("ratatosk-auth logged the SIGHUP", lambda: "SIGHUP received" in auth.log_text(), timeout=5,
               alive=auth.death)
    r = post(f"{base}/org-1/mcp", INIT, version=None, headers={"Authorization": f"Bearer {keycloak.token('alice')}"})
    assert r.status_code == 200, r.text


def test_nginx_lets_alice_in_and_strips_her_token(nginx_stack, keycloak):
    base, _, replica = nginx_stack
    alice = keycloak.token("alice")
    r = post(f"{base}/org-1/mcp", INIT, version=None,
             headers={"Authorization": f"Bearer {alice}", "X-Request-Id": "via-nginx-1"})
    assert r.status_code == 200, r.text
    assert '"protocolVersion"' in r.text
    seen = [h for h in replica.seen_headers() if h.get("ratatosk-org") == "org-1" and "ratatosk-subject" in h]
    assert seen, replica.seen_headers()[-3:]
    last = seen[-1]
    assert last["ratatosk-subject"] == claims(alice)["sub"]
    assert "authorization" not in last
    assert "mcp:tools" in last["ratatosk-scopes"]


def test_nginx_enforces_orgs_in_both_modes(nginx_stack, keycloak):
    base, _, _ = nginx_stack
    bob = keycloak.token("bob")
    assert post(f"{base}/org-1/mcp", INIT, version=None, headers={"Authorization": f"Bearer {bob}"}).status_code == 403
    # org-2 is checked by introspection.
    ok = post(f"{base}/org-2/mcp", INIT, version=None, headers={"Authorization": f"Bearer {bob}"})
    assert ok.status_code == 200, ok.text
    bad = post(f"{base}/org-2/mcp", INIT, version=None, headers={"Authorization": "Bearer garbage"})
    assert bad.status_code == 401


def test_a_client_cannot_name_another_org_or_identity(nginx_stack, keycloak):
    """nginx passes client headers into the auth subrequest. bob (org-2 only)
    asks org-1's location and names org-2 in every header the bridge or the
    upstream could read: he must be refused, not checked as a member of org-2."""
    base, auth, replica = nginx_stack
    bob, alice = keycloak.token("bob"), keycloak.token("alice")
    forged = {"X-Forwarded-Uri": "/org-2/mcp", "X-Original-URI": "/org-2/mcp",
              "X-Ratatosk-Org": "org-2", "X-Ratatosk-Subject": claims(alice)["sub"],
              "X-Ratatosk-Scopes": "mcp:admin", "X-Ratatosk-Username": "alice",
              "Ratatosk-Org": "org-2", "Ratatosk-Subject": claims(alice)["sub"],
              "Ratatosk-Scopes": "mcp:admin", "Ratatosk-Username": "alice"}
    r = post(f"{base}/org-1/mcp", INIT, version=None,
             headers={"Authorization": f"Bearer {bob}", "X-Request-Id": "forged-org-bob", **forged})
    assert r.status_code == 403, r.text
    assert not [h for h in replica.seen_headers() if h.get("x-request-id") == "forged-org-bob"]
    # alice is let in to org-1 with her own identity: whatever she sent in
    # identity headers never reaches the upstream.
    forged["X-Ratatosk-Subject"] = forged["Ratatosk-Subject"] = claims(bob)["sub"]
    forged["X-Ratatosk-Username"] = forged["Ratatosk-Username"] = "bob"
    r = post(f"{base}/org-1/mcp", INIT, version=None,
             headers={"Authorization": f"Bearer {alice}", "X-Request-Id": "forged-org-alice", **forged})
    assert r.status_code == 200, r.text
    seen = [h for h in replica.seen_headers() if h.get("x-request-id") == "forged-org-alice"]
    assert len(seen) == 1, replica.seen_headers()[-3:]
    h = seen[0]
    assert h["ratatosk-subject"] == claims(alice)["sub"]
    assert h["ratatosk-username"] == "alice"
    assert h["ratatosk-org"] == "org-1"
    assert "mcp:admin" not in h["ratatosk-scopes"].split()
    assert not [name for name in h if name.startswith("x-ratatosk-")], h


def test_the_forward_auth_binary_checks_its_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:1\npublic_url: x\nidentity: {issuer: nope, audience: a}\norgs: {}\nbogus: 1\n")
    import subprocess

    out = subprocess.run([str(gateway_binary().parent / "ratatosk-auth"), "check", "--config", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "bogus" in out.stderr, out.stderr


def test_nginx_applies_the_orgs_policy_to_what_the_mcp_headers_name(nginx_stack, keycloak):
    """org-1's policy lets mcp-reader (alice) call `add` only. A request
    that names its tool in Mcp-Method/Mcp-Name (as 2026-07-28 clients do) is
    decided by the check, so a denied one never reaches the replica."""
    base, _, replica = nginx_stack

    def call(user: str, name: str, args: dict) -> httpx2.Response:
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": args}}
        return post(f"{base}/org-1/mcp", body, headers={
            "Authorization": f"Bearer {keycloak.token(user)}", "Mcp-Method": "tools/call", "Mcp-Name": name})

    assert call("alice", "add", {"a": 1, "b": 2}).status_code == 200
    tag = f"forward-denied-{uuid.uuid4().hex[:8]}"
    denied = call("alice", "sleep_then_return", {"seconds": 0, "tag": tag})
    assert denied.status_code == 403, denied.text
    # nginx answers a 403 of the check with a page of its own; the check's
    # reason is in its log.
    assert call("carol", "add", {"a": 1, "b": 2}).status_code == 403
    assert not any(e["tag"] == tag for e in replica.events()), "a denied call reached the replica"
