"""Bad input gets a precise HTTP status and a JSON-RPC error body, and
harms nothing: afterwards a normal call works and the gateway is alive."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx2
import pytest

from harness import initialize, post, result_of, rpc_error, streamable_session

TOOLS_LIST = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}


@pytest.fixture(scope="module")
def sid(gateway) -> str:
    return initialize(gateway.url("org-1"))


def expect(r: httpx2.Response, status: int, code: int, *phrases: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = rpc_error(r)
    assert err["code"] == code, err
    for p in phrases:
        assert p.lower() in err["message"].lower(), (p, err)
    return err


def test_body_that_is_not_json(gateway, sid):
    expect(post(gateway.url("org-1"), b"{this is not json", session=sid), 400, -32700, "not valid JSON")


def test_json_that_is_not_json_rpc(gateway, sid):
    expect(post(gateway.url("org-1"), {"id": 1, "method": "x"}, session=sid), 400, -32600, "jsonrpc")


def test_a_message_must_be_an_object(gateway, sid):
    # serde would read this array as the envelope's fields, in order.
    expect(post(gateway.url("org-1"), ["2.0", 7, "tools/list"], session=sid, version="2025-03-26"), 400, -32600,
           "batch item 0", "JSON object")
    expect(post(gateway.url("org-1"), b"42", session=sid), 400, -32600, "JSON object")


def test_batches_of_anything_but_objects(gateway):
    url = gateway.url("org-1")
    sid = initialize(url, version="2025-03-26")
    for batch in ([1, 2], [[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]], [TOOLS_LIST, "x"]):
        expect(post(url, batch, session=sid, version="2025-03-26"), 400, -32600, "batch item")


def test_ids_longer_than_256_bytes(gateway, sid):
    body = {**TOOLS_LIST, "id": "x" * 300}
    expect(post(gateway.url("org-1"), body, session=sid), 400, -32600, "at most 256")


def test_batch_with_2025_06_18(gateway, sid):
    batch = [TOOLS_LIST, {"jsonrpc": "2.0", "id": 6, "method": "ping"}]
    # The session's negotiated version (2025-11-25) decides, not the one
    # the request names.
    expect(post(gateway.url("org-1"), batch, session=sid, version="2025-06-18"), 400, -32600,
           "batch", "2025-11-25", "negotiated")
    expect(post(gateway.url("org-1"), batch, version="2025-06-18"), 400, -32600,
           "batch", "2025-06-18")


def test_batch_is_answered_in_2025_03_26(gateway):
    url = gateway.url("org-1")
    sid = initialize(url, version="2025-03-26")
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1, "b": 2}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 3, "b": 4}}}]
    r = post(url, batch, session=sid, version="2025-03-26")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    import json
    answers = {}
    for line in r.text.splitlines():
        if line.startswith("data: ") and line[6:].strip():
            m = json.loads(line[6:])
            answers[m["id"]] = m["result"]["content"][0]["text"]
    assert answers == {1: "3", 2: "7"}


def test_missing_accept(gateway, sid):
    # http.client sends no Accept header unless told to.
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    conn.request("POST", gateway.base_path + "/org-1/mcp", body=json.dumps(TOOLS_LIST),
                 headers={"Content-Type": "application/json", "Mcp-Session-Id": sid})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 406
    assert body["error"]["code"] == -32000
    assert "missing Accept" in body["error"]["message"]


def test_accept_without_sse(gateway, sid):
    r = post(gateway.url("org-1"), TOOLS_LIST, session=sid, headers={"Accept": "application/json"})
    expect(r, 406, -32000, "text/event-stream")


def test_wrong_content_type(gateway, sid):
    r = post(gateway.url("org-1"), TOOLS_LIST, session=sid, headers={"Content-Type": "text/plain"})
    expect(r, 415, -32000, "Content-Type", "text/plain")


def test_body_over_the_limit(gateway, sid):
    big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "add", "arguments": {"a": 1, "b": 2, "pad": "x" * 100_000}}}
    expect(post(gateway.url("org-1"), big, session=sid), 413, -32600, "65536")


def test_unknown_org(gateway, sid):
    expect(post(gateway.url("org-nope"), TOOLS_LIST, session=sid), 404, -32004, "unknown org", "org-nope")


def test_unknown_path(gateway):
    expect(post(gateway.base + "/org-1/other", TOOLS_LIST), 404, -32004, "no MCP endpoint")


def test_unknown_and_missing_session(gateway):
    url = gateway.url("org-1")
    expect(post(url, TOOLS_LIST, session="A" * 43), 404, -32001, "session not found")
    expect(post(url, TOOLS_LIST, session="short"), 404, -32001, "session not found")
    expect(post(url, TOOLS_LIST), 400, -32000, "Mcp-Session-Id")


def test_session_of_another_org_is_unknown(gateway, sid):
    expect(post(gateway.url("org-2"), TOOLS_LIST, session=sid), 404, -32001, "session not found")


def test_disallowed_origin(gateway, sid):
    r = post(gateway.url("org-1"), TOOLS_LIST, session=sid, headers={"Origin": "http://evil.example"})
    expect(r, 403, -32000, "origin", "evil.example")


def test_allowed_origin_gets_cors(gateway, sid):
    r = post(gateway.url("org-1"), TOOLS_LIST, session=sid, headers={"Origin": "http://localhost:6274"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:6274"
    assert "Mcp-Session-Id" in r.headers["access-control-expose-headers"]
    pre = httpx2.options(gateway.url("org-1"), timeout=5, headers={
        "Origin": "http://localhost:6274", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204
    assert "mcp-session-id" in pre.headers["access-control-allow-headers"].lower()


def test_another_supported_protocol_version_is_accepted(gateway, sid):
    # 2025-06-18 and 2025-11-25 transports: the client SHOULD send the
    # negotiated version; only an invalid or unsupported one MUST get 400.
    r = post(gateway.url("org-1"), TOOLS_LIST, session=sid, version="2025-06-18")
    assert r.status_code == 200, r.text
    assert any(t["name"] == "add" for t in result_of(r)["tools"]), r.text


def test_the_negotiated_version_still_governs_the_session(gateway, sid):
    # Naming 2025-03-26 does not make batches legal in a 2025-11-25 session.
    expect(post(gateway.url("org-1"), [TOOLS_LIST], session=sid, version="2025-03-26"), 400, -32600,
           "batch", "2025-11-25")


def test_batch_without_header_follows_the_negotiated_version(gateway, sid):
    batch = [TOOLS_LIST]
    expect(post(gateway.url("org-1"), batch, session=sid, version=None), 400, -32600, "batch", "2025-11-25")


def test_unsupported_protocol_version(gateway, sid):
    expect(post(gateway.url("org-1"), TOOLS_LIST, session=sid, version="1999-01-01"), 400, -32000,
           "MCP-Protocol-Version", "1999-01-01")


def test_wrong_http_method(gateway):
    r = httpx2.put(gateway.url("org-1"), content=b"{}", timeout=5)
    expect(r, 405, -32000, "PUT")
    assert "POST" in r.headers["allow"]


def test_initialize_in_a_batch(gateway):
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}]
    expect(post(gateway.url("org-1"), batch, version="2025-03-26"), 400, -32600, "initialize")


def test_legacy_messages_without_session(gateway):
    r = httpx2.post(gateway.url("org-1", "messages"), json=TOOLS_LIST, timeout=5)
    expect(r, 400, -32000, "session_id")
    r = httpx2.post(gateway.url("org-1", "messages") + "?session_id=" + "B" * 43, json=TOOLS_LIST, timeout=5)
    expect(r, 404, -32001, "session not found")


def test_publish_to_unknown_session_bad_secret_and_bad_body(gateway, sid):
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    expect(gateway.publish("C" * 43, note), 404, -32001, "session not found")
    expect(gateway.publish(sid, note, secret="wrong-secret"), 401, -32000, "secret")
    r = httpx2.post(f"{gateway.admin}/sessions/{sid}/messages", json=note, timeout=5)
    expect(r, 401, -32000, "Authorization")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx2.post(f"{gateway.admin}/sessions/{sid}/messages", content=b"nope", timeout=5,
                    headers={"Authorization": f"Bearer {__import__('harness').PUBLISH_SECRET}"})
    expect(r, 400, -32700, "JSON")


def test_upstream_unreachable_is_a_json_rpc_error(gateway):
    r = post(gateway.url("org-dead"), {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                       "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                  "clientInfo": {"name": "x", "version": "1"}}}, version=None)
    err = expect(r, 502, -32002, "org-dead", "could be reached")
    assert "mcp-session-id" not in r.headers


@pytest.mark.anyio
async def test_after_all_that_a_normal_call_still_works(gateway):
    async with streamable_session(gateway.url("org-1")) as s:
        assert (await s.call_tool("add", {"a": 40, "b": 2})).content[0].text == "42"
    gateway.assert_healthy()


def test_client_refusing_sse_is_told_before_anything_else(gateway):
    r = httpx2.post(gateway.url("org-1"), json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                    headers={"Accept": "application/json"}, timeout=5)
    expect(r, 406, -32000, "text/event-stream")


def raw_exchange(port: int, request: bytes, until: bytes = b"\r\n\r\n", limit: int = 4096) -> bytes:
    """Sends raw bytes and reads until `until` has arrived (and what came with it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        got = b""
        while until not in got and len(got) < limit:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_malformed_request_head_gets_a_json_rpc_400(gateway):
    got = raw_exchange(gateway.port, b"POST /x HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", until=b"}")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), got
    err = json.loads(body)["error"]
    assert err["code"] == -32000 and "malformed" in err["message"], err
    gateway.assert_healthy()


def test_long_lived_streams_say_the_connection_ends_with_them(gateway, sid):
    path = urlsplit(gateway.url("org-1")).path
    request = (f"GET {path} HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n"
               f"Mcp-Session-Id: {sid}\r\n\r\n").encode()
    head = raw_exchange(gateway.port, request).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200"), head
    assert b"transfer-encoding: chunked" in head and b"connection: close" in head, head


def test_http_1_0_streams_are_not_chunked(gateway):
    sid = initialize(gateway.url("org-1"))
    path = urlsplit(gateway.url("org-1")).path
    request = (f"GET {path} HTTP/1.0\r\nHost: a\r\nAccept: text/event-stream\r\n"
               f"Mcp-Session-Id: {sid}\r\n\r\n").encode()
    got = raw_exchange(gateway.port, request, until=b"\n\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got
    assert b"transfer-encoding" not in head.lower(), head
    # The priming event comes first, as SSE text, without chunk-size lines.
    assert body.startswith((b"id:", b"event:", b"retry:", b"data:", b":")), body
