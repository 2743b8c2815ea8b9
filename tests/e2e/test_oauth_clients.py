"""Real MCP clients log in through the gateway and Keycloak as they do in
the field (issue 15): the official Python SDK's OAuth client
(`mcp.client.auth.OAuthClientProvider`) follows the gateway's 401 to its
RFC 9728 metadata, then the realm's metadata, registers itself there
(dynamic client registration under the realm's Trusted Hosts policy) or
uses a pre-registered client, and logs in with the authorization code flow
(PKCE S256, `resource`), at Keycloak's real login and consent pages
(tests/e2e/oauth_login.py fills them). No token is made by the test.
"""

from __future__ import annotations

import uuid

import anyio
import httpx2
import pytest
from mcp import MCPError
from mcp.shared.auth import OAuthClientInformationFull

from harness import KC_AUDIENCE, KC_PASSWORDS, claims
from oauth_login import MemoryStorage, Person, connected, provider, redirect_uri

pytestmark = pytest.mark.anyio


def leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in leaves(inner)]
    return [e]


@pytest.fixture
async def alice():
    person = Person("alice", KC_PASSWORDS["alice"], redirect_uri())
    yield person
    await person.aclose()


@pytest.mark.parametrize("endpoint", ["mcp", "sse"])
async def test_a_client_registers_itself_logs_in_and_calls_tools(auth_gateway, keycloak, alice, endpoint):
    url = auth_gateway.url("org-1", endpoint)
    storage = MemoryStorage()
    name = f"oauth-e2e-{uuid.uuid4()}"
    text = f"published-{uuid.uuid4()}"
    got = anyio.Event()

    async def on_log(params) -> None:
        if params.data == text:
            got.set()

    async with connected(url, provider(url, alice, storage), name, logging_callback=on_log) as s:
        # The client registered itself with the realm, then logged in at
        # Keycloak's pages: identifier-first, then the consent screen every
        # self-registered client gets.
        client_id = storage.client_info.client_id
        assert client_id and client_id not in ("mcp-client", "mcp-client-short")
        assert alice.pages == ["username", "password", "consent"], alice.pages
        # It asked for what the gateway advertises, for the resource it uses.
        (auth_url,) = alice.authorization_urls
        assert "code_challenge_method=S256" in auth_url
        query = httpx2.URL(auth_url).params
        assert query["resource"] == url
        assert set(query["scope"].split()) >= {"organization", "ratatosk"}
        token = claims(storage.tokens.access_token)
        assert token["azp"] == client_id
        assert KC_AUDIENCE in token["aud"]
        tools = {t.name for t in (await s.list_tools()).tools}
        assert {"add", "notify_me"} <= tools
        assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
        # A worker publishes into the session; the client gets it.
        (session,) = [x for x in auth_gateway.sessions("org-1") if x["client_info"]["name"] == name]
        assert session["subject"] == token["sub"]
        r = auth_gateway.publish(session["id"], {"jsonrpc": "2.0", "method": "notifications/message",
                                                 "params": {"level": "info", "data": text}})
        assert r.status_code == 202, r.text
        with anyio.fail_after(10):
            await got.wait()


async def test_a_user_of_another_org_is_refused_after_login(auth_gateway, keycloak):
    """bob logs in (he is a real user of the realm) but is not in org-1: the
    gateway refuses him with 403, and the client's one step-up retry cannot
    change that."""
    bob = Person("bob", KC_PASSWORDS["bob"], redirect_uri())
    url = auth_gateway.url("org-1")
    storage = MemoryStorage()
    try:
        with pytest.raises(BaseException) as refused:
            async with connected(url, provider(url, bob, storage), "oauth-e2e-bob"):
                pass
    finally:
        await bob.aclose()
    assert "username" in bob.pages, bob.pages
    assert "org-2" in claims(storage.tokens.access_token)["organization"]
    # The gateway's JSON-RPC error reaches the client as it is.
    errors = leaves(refused.value)
    assert any(isinstance(e, MCPError) and e.error.message == "the token is not valid for org 'org-1'"
               for e in errors), errors
    assert not [x for x in auth_gateway.sessions("org-1") if x["client_info"]["name"] == "oauth-e2e-bob"]


async def test_a_user_of_two_orgs_picks_the_one_she_logs_in_for(auth_gateway, keycloak):
    """carol is in org-1 and org-2. The client asks for plain `organization`
    (what the gateway advertises), so Keycloak asks her to pick one at
    login; the token carries that one, and the gateway lets her into it.

    The client is the realm's pre-registered `mcp-client`, which needs no
    consent: with a consent screen (every self-registered client has one)
    Keycloak 26.7 fails a user of several orgs with a 500 after the picker
    (keycloak/keycloak#52761, open), which the README notes."""
    carol = Person("carol", KC_PASSWORDS["carol"], redirect_uri(), organization="org-2")
    url = auth_gateway.url("org-2")
    storage = MemoryStorage(OAuthClientInformationFull(
        client_id="mcp-client", token_endpoint_auth_method="none", redirect_uris=[carol.redirect_uri]))
    try:
        async with connected(url, provider(url, carol, storage), "oauth-e2e-carol") as s:
            assert (await s.call_tool("add", {"a": 3, "b": 4})).content[0].text == "7"
    finally:
        await carol.aclose()
    assert carol.pages == ["username", "organization", "password"], carol.pages
    assert list(claims(storage.tokens.access_token)["organization"]) == ["org-2"]


async def test_a_missing_scope_is_asked_for_and_granted(auth_gateway, keycloak):
    """Step-up: bob's client (the realm's pre-registered public client) logs
    in for org-2, then reaches org-2-tools, which also needs `mcp:tools`. The
    gateway's 403 insufficient_scope names it; the client logs in again
    asking for it, and the call succeeds."""
    bob = Person("bob", KC_PASSWORDS["bob"], redirect_uri())
    storage = MemoryStorage(OAuthClientInformationFull(
        client_id="mcp-client", token_endpoint_auth_method="none", redirect_uris=[bob.redirect_uri]))
    try:
        plain = auth_gateway.url("org-2")
        async with connected(plain, provider(plain, bob, storage), "oauth-e2e-stepup-1") as s:
            assert (await s.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2"
        first = claims(storage.tokens.access_token)
        assert "mcp:tools" not in first["scope"].split()
        tools = auth_gateway.url("org-2-tools")
        async with connected(tools, provider(tools, bob, storage), "oauth-e2e-stepup-2") as s:
            assert (await s.call_tool("add", {"a": 2, "b": 2})).content[0].text == "4"
        second = claims(storage.tokens.access_token)
        assert "mcp:tools" in second["scope"].split()
        assert second["sub"] == first["sub"]
        assert len(bob.authorization_urls) == 2
        assert "mcp:tools" in httpx2.URL(bob.authorization_urls[1]).params["scope"].split()
    finally:
        await bob.aclose()


def metadata_document(url: str, person: Person) -> dict:
    """A native client's Client ID Metadata Document: a public client with
    a loopback redirect."""
    return {"client_id": url, "client_name": "Ratatosk e2e CIMD client", "redirect_uris": [person.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none"}


async def test_a_client_identified_by_its_metadata_document_logs_in(auth_gateway, keycloak, alice, documents):
    """Client ID Metadata Documents (2025-11-25 and 2026-07-28 prefer them to
    registration): the realm's metadata says `client_id_metadata_document_supported`,
    so the SDK's client presents the https URL of its document as its
    client_id, registers nothing, and Keycloak reads the document (over
    HTTPS, from the loopback server the realm's `mcp-cimd` policy allows)."""
    path = f"/clients/{uuid.uuid4()}.json"
    doc_url = documents.url(path)
    documents.documents[path] = metadata_document(doc_url, alice)
    url = auth_gateway.url("org-1")
    storage = MemoryStorage()
    auth = provider(url, alice, storage, client_metadata_url=doc_url)
    async with connected(url, auth, "oauth-e2e-cimd") as s:
        assert storage.client_info.client_id == doc_url
        assert documents.fetches.get(path, 0) >= 1, "Keycloak never read the document"
        (auth_url,) = alice.authorization_urls
        assert httpx2.URL(auth_url).params["client_id"] == doc_url
        token = claims(storage.tokens.access_token)
        assert token["azp"] == doc_url
        assert KC_AUDIENCE in token["aud"]
        assert (await s.call_tool("add", {"a": 20, "b": 22})).content[0].text == "42"
    # Keycloak's consent screen names the client from its document.
    assert alice.pages[-1] == "consent", alice.pages


async def test_a_metadata_document_on_an_untrusted_host_is_never_fetched(auth_gateway, keycloak, documents):
    """The realm's policy names the hosts whose documents it reads: a client
    whose client_id is a document elsewhere (here `localhost`) is refused
    at the authorization endpoint, and Keycloak does not fetch it."""
    person = Person("alice", KC_PASSWORDS["alice"], redirect_uri())
    path = f"/clients/{uuid.uuid4()}.json"
    doc_url = documents.url(path, host="localhost")
    documents.documents[path] = metadata_document(doc_url, person)
    url = auth_gateway.url("org-1")
    try:
        with pytest.raises(BaseException) as refused:
            async with connected(url, provider(url, person, MemoryStorage(), client_metadata_url=doc_url),
                                 "oauth-e2e-cimd-untrusted"):
                pass
    finally:
        await person.aclose()
    text = " ".join(str(e) for e in leaves(refused.value))
    assert "Keycloak answered 400" in text and "Client not found" in text, text
    assert documents.fetches.get(path, 0) == 0
