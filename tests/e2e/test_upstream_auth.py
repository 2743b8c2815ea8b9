"""Upstream credentials (`upstream.auth`): a JWT the gateway signs, checked
by the FastMCP example against the key set the gateway publishes; a static
header for third-party servers; and never the client's own token."""

from __future__ import annotations

import json

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import ACCEPT_BOTH, Example, Gateway, PROTOCOL, free_port, org, running, started, streamable_session

pytestmark = pytest.mark.anyio

AUDIENCE = "tickets-api"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "auth", "version": "1"}}}


def credited(replicas, auth: dict) -> dict:
    """An org (no client auth) whose upstream gets `upstream.auth: auth`."""
    o = org(replicas)
    o["upstream"]["auth"] = auth
    return o


def signing_key() -> str:
    """A fresh P-256 key, PEM. LOCAL USE ONLY: made for this run."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory):
    """A gateway signing upstream JWTs, and a FastMCP example that wants
    them: signed by a key of the gateway's public key set, for its audience."""
    tmp = tmp_path_factory.mktemp("upstream-auth")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    upstream = Example("python-fastmcp", tmp, env={
        "EXAMPLE_JWKS_URL": f"{issuer}/.well-known/jwks.json", "EXAMPLE_JWT_ISSUER": issuer,
        "EXAMPLE_JWT_AUDIENCE": AUDIENCE})
    gw = Gateway(tmp, {
        "signed": credited([upstream], {"mode": "gateway-jwt", "audience": AUDIENCE}),
        "misaddressed": credited([upstream], {"mode": "gateway-jwt", "audience": "someone-else"}),
        "unsigned": org([upstream]),
    }, name="gateway-upstream-jwt", port=port,
        extra={"upstream_jwt": {"key": "${E2E_UPSTREAM_JWT_KEY}", "ttl": "2m"}},
        env={"E2E_UPSTREAM_JWT_KEY": signing_key()})
    with started(upstream), running(gw):
        yield gw, upstream


async def test_a_signed_upstream_gets_a_jwt_it_can_check_and_knows_who_calls(jwt_stack):
    gw, _ = jwt_stack
    # The key set is public, on the MCP listener, and on the admin one.
    public = httpx2.get(f"{gw.origin}/.well-known/jwks.json", timeout=5)
    assert public.status_code == 200, public.text
    [key] = public.json()["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in key, "the private part is never published"
    assert gw.admin_get("/jwks.json").json() == public.json()
    async with streamable_session(gw.url("signed")) as s:
        assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
        claims = json.loads((await s.call_tool("whoami", {})).content[0].text)["claims"]
    assert claims["iss"] == gw.origin
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == "anonymous"
    assert claims["org"] == "signed"
    assert claims["exp"] - claims["iat"] == 120


def test_an_upstream_that_wants_a_jwt_refuses_the_others(jwt_stack):
    gw, _ = jwt_stack
    for name in ("unsigned", "misaddressed"):
        r = httpx2.post(gw.url(name), json=INIT, headers={"Accept": ACCEPT_BOTH}, timeout=10)
        assert r.status_code == 502, (name, r.status_code, r.text)
        assert f"upstream {name}#1 answered HTTP 401" in r.json()["error"]["message"], (name, r.text)


async def test_a_static_credential_goes_to_its_upstream_and_the_clients_token_never(tmp_path, replicas):
    gw = Gateway(tmp_path, {
        "keyed": credited(replicas[:1], {"mode": "static", "header": "X-Api-Key", "value": "${E2E_TICKETS_KEY}"}),
    }, name="gateway-static", env={"E2E_TICKETS_KEY": "local-only-api-key"})
    with running(gw):
        async with streamable_session(gw.url("keyed"), headers={"Authorization": "Bearer client-secret"}) as s:
            assert (await s.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2"
        seen = [h for h in replicas[0].seen_headers() if h.get("x-api-key")]
        assert seen and all(h["x-api-key"] == "local-only-api-key" for h in seen), seen
        assert not any("client-secret" in json.dumps(h) for h in replicas[0].seen_headers())
