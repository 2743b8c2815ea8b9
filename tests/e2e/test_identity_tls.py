"""A Keycloak that serves HTTPS with a certificate of a private CA: the
gateway trusts it through `identity.ca_file`, for discovery, keys and
introspection, and without that file refuses to talk to it."""

from __future__ import annotations

import pytest

from conftest import identity_config
from harness import KC_GATEWAY_SECRET, PROTOCOL, Gateway, Keycloak, org, post, rpc_error, running, wait_until
from pki import Pki

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                   "clientInfo": {"name": "identity-tls", "version": "1"}}}


@pytest.fixture(scope="module")
def https_keycloak(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("identity-pki"))
    cert, key = pki.issue("keycloak")
    kc = Keycloak(tmp_path_factory.mktemp("keycloak-https"), "http://127.0.0.1:9/unused",
                  https=(cert, key, pki.ca_file))
    kc.start()
    yield kc, pki
    kc.stop()


def gateway(tmp, kc: Keycloak, name: str, **identity) -> Gateway:
    orgs = {"jwt": org(["http://127.0.0.1:9/mcp"], auth="jwt", organization="org-1"),
            "introspect": org(["http://127.0.0.1:9/mcp"], auth="introspect", organization="org-1")}
    return Gateway(tmp, orgs, name=name, extra={"identity": identity_config(kc.issuer, **identity)},
                   env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})


def test_a_keycloak_with_a_private_ca_is_trusted_through_identity_ca_file(tmp_path, https_keycloak):
    kc, pki = https_keycloak
    assert kc.issuer.startswith("https://localhost:")
    token = kc.token("alice")
    with running(gateway(tmp_path, kc, "gateway-idp-ca", ca_file=str(pki.ca_file))) as gw:
        for route in ("jwt", "introspect"):
            # The token checks out (the upstream behind is down: that is
            # a 502 after authentication, not a 401 or 503).
            r = post(gw.url(route), INIT, version=None, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 502, (route, r.status_code, r.text)
        assert 'ratatosk_auth_jwks_fetches_total{result="ok"}' in gw.metrics()
        gw.assert_healthy()


def test_without_the_ca_file_the_private_ca_is_not_trusted(tmp_path, https_keycloak):
    kc, _ = https_keycloak
    token = kc.token("alice")
    with running(gateway(tmp_path, kc, "gateway-idp-no-ca")) as gw:
        r = post(gw.url("jwt"), INIT, version=None, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 503, r.text
        assert rpc_error(r)["message"] == "the identity provider is unavailable; retry shortly"
        wait_until("the certificate problem in the log", lambda: "certificate" in gw.log_text().lower(), timeout=10)
        gw.assert_healthy()
