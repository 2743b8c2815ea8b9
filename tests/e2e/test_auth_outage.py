"""The identity provider failing: Keycloak stopped in the middle of the run
and started again, and a provider answering garbage. Runs after the other
Keycloak tests (it stops the shared Keycloak)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time

import pytest

from conftest import identity_config
from harness import Gateway, KC_GATEWAY_SECRET, PROTOCOL, org, post, rpc_error, running, wait_until

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "outage", "version": "1"}}}
PING = {"jsonrpc": "2.0", "id": 2, "method": "ping"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_keycloak_stopped_mid_run_then_back(auth_gateway, keycloak):
    cached = keycloak.token("bob")
    r = post(auth_gateway.url("org-2-introspect"), INIT, version=None, headers=bearer(cached))
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    unseen_introspect = keycloak.token("bob")
    unseen_jwt = keycloak.token("carol")
    # The jwt route has the realm's keys (fetched at start; used here).
    assert post(auth_gateway.url("org-1"), INIT, version=None, headers=bearer(keycloak.token("alice"))).status_code == 200

    keycloak.stop()
    try:
        # Identities still cached are served.
        assert post(auth_gateway.url("org-2-introspect"), PING, session=sid, headers=bearer(cached)).status_code == 200
        # A token never seen needs the provider: a clear 503, quickly.
        started = time.monotonic()
        r = post(auth_gateway.url("org-2-introspect"), INIT, version=None, headers=bearer(unseen_introspect))
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 6
        assert rpc_error(r)["message"] == "the identity provider is unavailable; retry shortly"
        assert r.headers.get("retry-after")
        # In jwt mode the signing keys are cached: tokens keep verifying locally.
        assert post(auth_gateway.url("org-1"), INIT, version=None, headers=bearer(unseen_jwt)).status_code == 200
        auth_gateway.assert_healthy()
    finally:
        keycloak.start(reuse=True)

    # Back: the gateway recovers by itself.
    fresh = keycloak.token("bob")
    r = post(auth_gateway.url("org-2-introspect"), INIT, version=None, headers=bearer(fresh))
    assert r.status_code == 200, r.text
    # The token refused during the outage was not cached as invalid.
    again = post(auth_gateway.url("org-2-introspect"), INIT, version=None, headers=bearer(unseen_introspect))
    assert again.status_code in (200, 401), again.text
    auth_gateway.assert_healthy()


class GarbageIdp(http.server.BaseHTTPRequestHandler):
    """A stand-in for what Keycloak cannot be made to do: a discovery document
    that is fine, then JWKS and introspection that answer garbage."""

    def do_GET(self):
        if self.path.endswith("/.well-known/openid-configuration"):
            issuer = f"http://127.0.0.1:{self.server.server_port}/realms/bad"
            body = json.dumps({"issuer": issuer, "authorization_endpoint": issuer + "/auth",
                               "jwks_uri": issuer + "/certs", "introspection_endpoint": issuer + "/introspect",
                               "response_types_supported": ["code"], "subject_types_supported": ["public"],
                               "id_token_signing_alg_values_supported": ["RS256"]}).encode()
        else:
            body = b"<html>definitely not a key set</html>"
        self.answer(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(b"{\"this\": is not json")

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def garbage_idp():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GarbageIdp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/realms/bad"
    server.shutdown()


def test_garbage_from_the_provider_is_503_and_harms_nothing(tmp_path, replicas, garbage_idp):
    gw = Gateway(tmp_path, {"jwt": org(replicas, auth="jwt", organization="org-1"),
                            "introspect": org(replicas, auth="introspect", organization="org-1"),
                            "open": org(replicas)},
                 name="gateway-garbage", extra={"identity": identity_config(garbage_idp)},
                 env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})
    with running(gw):
        # A well-formed JWT of this issuer whose key the provider cannot
        # deliver (introspect mode asks only about tokens that could be the
        # realm's: right `iss`, not expired).
        token = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode() for part in (
            {"alg": "RS256", "kid": "k1"},
            {"sub": "x", "iss": garbage_idp, "exp": int(time.time()) + 300, "typ": "Bearer"},
            {"sig": "nope"}))
        for route, what in (("jwt", "JWKS"), ("introspect", "introspection")):
            r = post(gw.url(route), INIT, version=None, headers=bearer(token))
            assert r.status_code == 503, (route, r.text)
            # The client hears that the provider is down; the log says why.
            assert rpc_error(r)["message"] == "the identity provider is unavailable; retry shortly"
            wait_until(f"the log to explain the {what} failure",
                       lambda: f"org={route}" in gw.log_text() and what in gw.log_text(), timeout=5)
        # Routes without auth are unaffected.
        assert post(gw.url("open"), INIT, version=None).status_code == 200
