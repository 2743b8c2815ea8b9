"""Shared fixtures: two real FastMCP replicas and a gateway in front of them.

The shared gateway serves under `base_path: /api/v1/mcp`, so every test also
proves that paths like `http://host/api/v1/mcp/org-1/sse` work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Example, Gateway, free_port, org, running, start_replicas, started  # noqa: E402

BASE_PATH = "/api/v1/mcp"


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def admin_port() -> int:
    """The shared gateway's admin port, chosen before the replicas start so
    that notify_me knows where to publish."""
    return free_port()


@pytest.fixture(scope="session")
def replicas(log_dir, admin_port):
    started = start_replicas(2, log_dir, f"http://127.0.0.1:{admin_port}")
    yield started
    for r in started:
        r.stop()


@pytest.fixture(scope="session")
def gateway(log_dir, replicas, admin_port):
    gw = Gateway(
        log_dir,
        {
            "org-1": org(replicas),
            "org-2": org(replicas),
            # Short limits, to show that timeouts end in JSON-RPC errors.
            "org-slow": org(replicas, timeout="1s", max_duration="2s"),
            # Nothing listens on these ports.
            "org-dead": org([f"http://127.0.0.1:{free_port()}/mcp", f"http://127.0.0.1:{free_port()}/mcp"],
                            eject_for="1s"),
        },
        base_path=BASE_PATH,
        admin_port=admin_port,
    )
    with running(gw):
        yield gw


# ----- Keycloak and a gateway that validates its tokens ----------------------------

from harness import KC_AUDIENCE, KC_GATEWAY_SECRET, DocumentServer, Keycloak, loopback_tls  # noqa: E402

# Routes of the auth gateway: several per Keycloak organization, one per mode.
AUTH_ORGS = {
    "org-1": ("jwt", "org-1", []),
    "org-2": ("jwt", "org-2", []),
    "org-1-introspect": ("introspect", "org-1", []),
    "org-2-introspect": ("introspect", "org-2", []),
    "org-1-both": ("jwt+introspect", "org-1", []),
    "org-1-admin": ("jwt", "org-1", ["mcp:admin"]),
    "org-2-tools": ("jwt", "org-2", ["mcp:tools"]),
}


@pytest.fixture(scope="session")
def auth_gateway_port() -> int:
    """Chosen before Keycloak starts: Keycloak's back-channel logout URL names it."""
    return free_port()


@pytest.fixture(scope="session")
def loopback_cert(tmp_path_factory):
    """A certificate for https://127.0.0.1 that the test Keycloak trusts."""
    return loopback_tls(tmp_path_factory.mktemp("loopback-tls"))


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory, auth_gateway_port, loopback_cert):
    kc = Keycloak(tmp_path_factory.mktemp("keycloak"),
                  f"http://127.0.0.1:{auth_gateway_port}/auth/backchannel-logout", trust=[loopback_cert[0]])
    kc.start()
    yield kc
    kc.stop()


@pytest.fixture(scope="session")
def documents(loopback_cert):
    """An HTTPS server of Client ID Metadata Documents on 127.0.0.1."""
    server = DocumentServer(*loopback_cert)
    yield server
    server.stop()


def identity_config(issuer: str, **over) -> dict:
    return {"issuer": issuer, "audience": KC_AUDIENCE, "client_scopes": ["organization", "ratatosk"],
            "client_id": "ratatosk-gateway",
            "client_secret": "${RATATOSK_KC_SECRET}", "timeout": "2s", "clock_skew": "0s",
            "jwks_min_refetch": "1s", "logout_client_ids": ["mcp-client"], **over}


# The example upstream's client at Keycloak: the audience of the tokens the
# gateway exchanges for it (`upstream.auth: token-exchange`).
KC_UPSTREAM_AUDIENCE = "mcp-upstream-py"


@pytest.fixture(scope="session")
def exchange_upstream(log_dir, keycloak):
    """The FastMCP example wanting Keycloak's tokens addressed to it: signed
    by the realm, with `aud` mcp-upstream-py (FastMCP's JWTVerifier)."""
    upstream = Example("python-fastmcp", log_dir, env={
        "EXAMPLE_JWKS_URL": f"{keycloak.issuer}/protocol/openid-connect/certs",
        "EXAMPLE_JWT_ISSUER": keycloak.issuer, "EXAMPLE_JWT_AUDIENCE": KC_UPSTREAM_AUDIENCE,
        "EXAMPLE_JWT_ALGORITHM": "RS256"})
    with started(upstream):
        yield upstream


@pytest.fixture(scope="session")
def auth_gateway(log_dir, replicas, keycloak, auth_gateway_port, exchange_upstream):
    orgs = {name: org(replicas, auth=mode, organization=alias, **({"scopes": scopes} if scopes else {}))
            for name, (mode, alias, scopes) in AUTH_ORGS.items()}
    # The example that wants Keycloak's tokens: behind an exchange, and
    # (to show it refuses anything else) without one.
    orgs["org-1-exchange"] = org([exchange_upstream], auth="jwt", organization="org-1")
    orgs["org-1-exchange"]["upstream"]["auth"] = {"mode": "token-exchange", "audience": KC_UPSTREAM_AUDIENCE}
    orgs["org-1-unexchanged"] = org([exchange_upstream], auth="jwt", organization="org-1")
    gw = Gateway(log_dir, orgs, name="gateway-auth", port=auth_gateway_port,
                 extra={"identity": identity_config(keycloak.issuer),
                        "public_url": f"http://127.0.0.1:{auth_gateway_port}"},
                 env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})
    with running(gw):
        yield gw


@pytest.fixture(scope="module")
def modern_upstream(log_dir):
    """The python-modern example (2026-07-28), one per test module."""
    with started(Example("python-modern", log_dir)) as up:
        yield up
