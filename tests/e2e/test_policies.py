"""Tool policies from Keycloak roles, groups and scopes (issue 17), with
the real Keycloak of keycloak/start and its realm: alice has the realm
role `mcp-reader` (group `readers`), carol the role `mcp-admin` (group
`admins`), bob neither. Tokens come from the realm's password grant of the
pre-registered `mcp-client` (the login flows of real clients are
test_oauth_clients.py's); what is tested here is what the gateway does
with the roles, groups and scopes Keycloak puts in them.

The federated endpoints front the python-fastmcp replicas (`py`) and the
python-modern example (`pm`).
"""

from __future__ import annotations

import json
import uuid

import httpx2
import pytest

from mcp.shared.exceptions import MCPError

from conftest import identity_config
from harness import (KC_GATEWAY_SECRET, KC_PASSWORDS, Gateway, claims, legacy_session, post, running,
                     streamable_session, wait_until)
from oauth_login import MemoryStorage, Person, connected, provider, redirect_uri

RULES = [
    {"name": "readers", "when": {"realm_roles": ["mcp-reader"]},
     "allow": {"tools": ["py__add", "*__slow_count"]}},
    {"name": "admins", "when": {"groups": ["admins"]},
     "allow": {"tools": ["*"], "prompts": ["*"], "resources": ["*"]}},
    {"name": "no-publishing", "deny": {"tools": ["py__notify_me"]}},
    {"name": "tool-scope", "when": {"scopes": ["mcp:tools"]}, "allow": {"tools": ["pm__add"]}},
]


@pytest.fixture(scope="module")
def policy_gateway(log_dir, replicas, modern_upstream, keycloak):
    def federation(organization: str) -> dict:
        return {"auth": "jwt", "organization": organization, "policy": RULES, "servers": {
            "py": {"upstream": {"era": "stateless-2025", "replicas": [r.url for r in replicas]}},
            "pm": {"upstream": {"era": "modern", "replicas": [modern_upstream.url]}},
        }}

    gw = Gateway(log_dir, {"pol-1": federation("org-1"), "pol-2": federation("org-2")},
                 name="policy-gateway",
                 # Clients ask for Keycloak's `roles` scope too: a client that
                 # registered itself has no other way to its users' roles.
                 extra={"identity": identity_config(keycloak.issuer,
                                                    client_scopes=["organization", "ratatosk", "roles"]),
                        "audit": {"sink": "file", "path": str(log_dir / "policy-audit.jsonl"),
                                  "arguments": "hashed"}},
                 env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET})
    with running(gw):
        yield gw


class Caller:
    """One user's federated session, over raw HTTP."""

    def __init__(self, gw: Gateway, org: str, token: str):
        self.url = gw.url(org)
        self.auth = {"Authorization": f"Bearer {token}"}
        r = post(self.url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                       "clientInfo": {"name": "policy-test", "version": "1"}}},
                 version=None, headers=self.auth)
        assert r.status_code == 200, r.text
        self.sid = r.headers["mcp-session-id"]

    def rpc(self, method: str, params: dict | None = None) -> httpx2.Response:
        body = {"jsonrpc": "2.0", "id": 2, "method": method, **({"params": params} if params else {})}
        return post(self.url, body, session=self.sid, headers=self.auth, timeout=20)

    def result(self, method: str, params: dict | None = None) -> dict:
        r = self.rpc(method, params)
        assert r.status_code == 200, r.text
        return message_of(r)

    def tools(self) -> set[str]:
        return {t["name"] for t in self.result("tools/list")["result"]["tools"]}

    def call(self, name: str, args: dict) -> dict:
        return self.result("tools/call", {"name": name, "arguments": args})


def message_of(r: httpx2.Response) -> dict:
    """The JSON-RPC answer of a POST, as JSON or the last SSE event."""
    if r.headers["content-type"].startswith("application/json"):
        return r.json()
    data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])


def test_each_caller_sees_and_calls_only_what_their_roles_allow(policy_gateway, keycloak, replicas):
    alice = Caller(policy_gateway, "pol-1", keycloak.token("alice"))
    carol = Caller(policy_gateway, "pol-1", keycloak.token("carol"))
    # alice (mcp-reader, and the mcp:tools scope) sees her tools only.
    assert alice.tools() == {"py__add", "py__slow_count", "pm__slow_count", "pm__add"}
    assert alice.call("py__add", {"a": 2, "b": 3})["result"]["content"][0]["text"] == "5"
    # carol (group admins) sees more, but not what is denied to everyone.
    seen = carol.tools()
    assert {"py__add", "py__sleep_then_return", "pm__add", "pm__ask_roots"} <= seen, sorted(seen)
    assert "py__notify_me" not in seen
    # A denied call is refused by the gateway, and no server sees it.
    tag = f"denied-{uuid.uuid4().hex[:8]}"
    refused = alice.call("py__sleep_then_return", {"seconds": 0, "tag": tag})
    assert refused["error"]["code"] == -32602, refused
    assert refused["error"]["message"] == \
        "tool 'py__sleep_then_return' is not allowed to this caller by the policy of org 'pol-1'", refused
    refused = carol.call("py__notify_me", {"text": "x"})
    assert "is not allowed" in refused["error"]["message"], refused
    allowed = carol.call("py__sleep_then_return", {"seconds": 0, "tag": tag + "-carol"})
    assert "error" not in allowed, allowed
    events = [e for r in replicas for e in r.events()]
    assert any(e["tag"] == tag + "-carol" for e in events)
    assert not any(e["tag"] == tag for e in events), "a denied call reached the server"


def audit_lines(gw: Gateway, n: int) -> list[dict]:
    """The audit log's lines, once it has at least `n`."""
    path = gw.config_path.parent / "policy-audit.jsonl"

    def lines() -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    wait_until(f"{n} audit lines", lambda: len(lines()) >= n, timeout=10)
    return lines()


def test_every_call_and_refusal_leaves_an_audit_line(policy_gateway, keycloak):
    alice = Caller(policy_gateway, "pol-1", keycloak.token("alice"))
    before = len(audit_lines(policy_gateway, 0))
    assert alice.call("py__add", {"a": 20, "b": 22})["result"]["content"][0]["text"] == "42"
    alice.call("py__notify_me", {"text": "secret words"})
    lines = audit_lines(policy_gateway, before + 2)[before:]
    allowed, denied = lines
    for line in lines:
        assert line["org"] == "pol-1" and line["server"] == "py", line
        assert line["username"] == "alice" and line["client"] == "mcp-client" and line["subject"], line
        assert line["method"] == "tools/call" and line["request_id"] and line["time"].endswith("Z"), line
        assert isinstance(line["duration_ms"], (int, float)), line
        # Arguments are hashed, never written as they are.
        assert line["arguments"].startswith("sha256:") and "secret" not in json.dumps(line), line
    assert (allowed["tool"], allowed["decision"], allowed["rule"], allowed["outcome"]) == \
        ("py__add", "allowed", "readers", "result"), allowed
    # The replica that answered is named (py has two); a refused call had none.
    assert allowed["replica"] in ("pol-1/py#1", "pol-1/py#2") and denied["replica"] is None, lines
    assert (denied["tool"], denied["decision"], denied["rule"], denied["outcome"]) == \
        ("py__notify_me", "denied", "no-publishing", "denied"), denied
    metrics = policy_gateway.metrics()
    assert 'ratatosk_audited_calls_total{org="pol-1",outcome="denied",server="py"}' in metrics, metrics


def test_a_token_without_roles_sees_nothing(policy_gateway, keycloak):
    bob = Caller(policy_gateway, "pol-2", keycloak.token("bob", scope="openid organization:*"))
    assert bob.tools() == set()
    refused = bob.call("py__add", {"a": 1, "b": 1})
    assert "is not allowed" in refused["error"]["message"], refused
    carol = Caller(policy_gateway, "pol-2", keycloak.token("carol"))
    assert "py__add" in carol.tools()


def test_a_scope_that_would_allow_a_tool_gets_403_insufficient_scope(policy_gateway, keycloak):
    alice = Caller(policy_gateway, "pol-1", keycloak.token("alice", scope="openid organization:*"))
    assert "pm__add" not in alice.tools()
    r = alice.rpc("tools/call", {"name": "pm__add", "arguments": {"a": 1, "b": 1}})
    assert r.status_code == 403, r.text
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and "mcp:tools" in challenge, challenge
    assert r.json()["error"]["message"] == "tool 'pm__add' needs scope mcp:tools in org 'pol-1'"


@pytest.mark.anyio
@pytest.mark.parametrize("era", ["streamable-2025", "sse-2024"])
async def test_a_servers_own_endpoint_applies_the_same_policy(policy_gateway, keycloak, replicas, era):
    """At `{org}/py/mcp` (and `/sse`) the server's tools keep their own names,
    and the org's rules (written for the prefixed names) still decide: the
    official SDK clients see alice's tools only, and a denied call never
    reaches a replica, and is audited with the server's name."""
    auth = {"Authorization": f"Bearer {keycloak.token('alice')}"}
    opened = (streamable_session(policy_gateway.url("pol-1/py"), headers=auth) if era == "streamable-2025"
              else legacy_session(policy_gateway.url("pol-1/py", "sse"), headers=auth))
    before = len(audit_lines(policy_gateway, 0))
    tag = f"denied-{uuid.uuid4().hex[:8]}"
    async with opened as s:
        assert {t.name for t in (await s.list_tools()).tools} == {"add", "slow_count"}
        assert (await s.call_tool("add", {"a": 2, "b": 5})).content[0].text == "7"
        with pytest.raises(MCPError) as refused:
            await s.call_tool("sleep_then_return", {"seconds": 0, "tag": tag})
        assert refused.value.error.code == -32602
        assert refused.value.error.message == \
            "tool 'py__sleep_then_return' is not allowed to this caller by the policy of org 'pol-1'"
    events = [e for r in replicas for e in r.events()]
    assert not any(e["tag"] == tag for e in events), "a denied call reached the server"
    lines = audit_lines(policy_gateway, before + 2)[before:]
    assert [(x["server"], x["tool"], x["outcome"], x["replica"] is None) for x in lines] == \
        [("py", "py__add", "result", False), ("py", "py__sleep_then_return", "denied", True)], lines


@pytest.mark.anyio
async def test_a_client_that_logs_in_through_the_front_door_gets_what_its_users_roles_allow(policy_gateway,
                                                                                             keycloak, replicas):
    """The official SDK's OAuth client follows the gateway's 401, registers
    itself with the realm and alice logs in at Keycloak's pages (no token
    is made by the test). A self-registered client gets only the scopes it
    registered with, and no role of its own: the gateway advertises the
    scope its policy grants with (`mcp:tools`) and Keycloak's `roles`
    scope (in `identity.client_scopes`), and the realm's `ratatosk` scope
    carries her groups. On the federated endpoint she sees and calls what
    her role and that scope allow, and nothing else."""
    alice = Person("alice", KC_PASSWORDS["alice"], redirect_uri())
    storage = MemoryStorage()
    url = policy_gateway.url("pol-1")
    tag = f"front-door-{uuid.uuid4().hex[:8]}"
    try:
        async with connected(url, provider(url, alice, storage), "policy-front-door") as s:
            assert alice.pages == ["username", "password", "consent"], alice.pages
            token = claims(storage.tokens.access_token)
            assert token["azp"] == storage.client_info.client_id != "mcp-client", token
            assert "mcp-reader" in token["realm_access"]["roles"] and token["groups"] == ["readers"], token
            assert "mcp:tools" in token["scope"].split(), token["scope"]
            assert {t.name for t in (await s.list_tools()).tools} == \
                {"py__add", "py__slow_count", "pm__slow_count", "pm__add"}
            assert (await s.call_tool("pm__add", {"a": 20, "b": 22})).content[0].text == "42"
            with pytest.raises(MCPError) as refused:
                await s.call_tool("py__sleep_then_return", {"seconds": 0, "tag": tag})
            assert refused.value.error.message == \
                "tool 'py__sleep_then_return' is not allowed to this caller by the policy of org 'pol-1'"
    finally:
        await alice.aclose()
    assert not any(e["tag"] == tag for r in replicas for e in r.events()), "a denied call reached the server"
