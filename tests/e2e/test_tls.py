"""TLS on every hop: the MCP and admin listeners over HTTPS (HTTP/1.1 and
HTTP/2 by ALPN, certificates reloaded in place, optional client
certificates), `https://` upstreams checked against their CA, and the
forward-auth server over HTTPS. Certificates are made for each run (pki.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess

import httpx2
import pytest

from harness import (ACCEPT_BOTH, PROTOCOL, Example, Gateway, Proc, SseReader, free_port, gateway_binary, org,
                     port_open, running, streamable_session, wait_until)
from pki import Pki

pytestmark = pytest.mark.anyio

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "tls", "version": "1"}}}


def https_example(tmp, pki: Pki, name: str, **issue) -> Example:
    """The FastMCP example upstream, serving HTTPS with a certificate of `pki`."""
    cert, key = pki.issue(name, **issue)
    example = Example("python-fastmcp", tmp, env={"EXAMPLE_TLS_CERT_FILE": str(cert),
                                                  "EXAMPLE_TLS_KEY_FILE": str(key)})
    example.base = f"https://127.0.0.1:{example.port}"
    example.url = f"{example.base}/mcp"
    return example


def listener_tls(pki: Pki, name: str, **more) -> dict:
    cert, key = pki.issue(name)
    return {"cert_file": str(cert), "key_file": str(key), **more}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A gateway with TLS on both listeners, in front of an HTTPS upstream
    (trusted), the same upstream checked against another CA, and an HTTPS
    upstream whose certificate has expired."""
    tmp = tmp_path_factory.mktemp("tls")
    pki, stranger_ca = Pki(tmp / "pki"), Pki(tmp / "other", "Another CA")
    secure, stale = https_example(tmp, pki, "upstream"), https_example(tmp, pki, "stale", expired=True)
    trust = {"tls": {"ca_file": str(pki.ca_file)}}
    gw = Gateway(tmp, {
        "secure": org([secure], **trust),
        "stranger": org([secure], tls={"ca_file": str(stranger_ca.ca_file)}),
        "stale": org([stale], **trust),
    }, name="gateway-tls", verify=pki.context(), extra={
        "tls": listener_tls(pki, "gateway", reload_interval="1s"),
        "admin_tls": listener_tls(pki, "admin"),
    })
    try:
        for e in (secure, stale):
            e.start()
        for e in (secure, stale):
            e.wait_ready()
        with running(gw):
            yield gw, pki, stranger_ca
    finally:
        for e in (secure, stale):
            e.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def curl_init(url: str, *args: str) -> subprocess.CompletedProcess:
    """Two initializes on one curl run, which keeps the connection between
    them: each prints `<status> <HTTP version> <new connections>`."""
    one = ["-H", "Content-Type: application/json", "-H", f"Accept: {ACCEPT_BOTH}", "-d", json.dumps(INIT),
           "-o", "/dev/null", "-w", "%{http_code} %{http_version} %{num_connects}\n", url]
    return curl(*args, *one, "--next", *args, *one)


def test_curl_speaks_http1_and_http2_and_keeps_the_connection(stack):
    gw, pki, stranger_ca = stack
    url = gw.url("secure")
    for flag, version in [("--http1.1", "1.1"), ("--http2", "2")]:
        out = curl_init(url, "--cacert", str(pki.ca_file), flag)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == [f"200 {version} 1", f"200 {version} 0"], out.stdout
    # A client that trusts another CA refuses the gateway's certificate.
    out = curl_init(url, "--cacert", str(stranger_ca.ca_file))
    assert out.returncode == 60, (out.returncode, out.stderr)
    assert "certificate" in out.stderr, out.stderr
    # Plain HTTP on the TLS port gets nowhere.
    with pytest.raises(httpx2.HTTPError):
        httpx2.post(url.replace("https://", "http://"), json=INIT, timeout=5)
    # The admin listener speaks HTTPS too.
    assert gw.admin_get("/healthz").json() == {"status": "ok"}
    out = curl("--cacert", str(pki.ca_file), "--http2", "-o", "/dev/null", "-w", "%{http_version}",
               f"{gw.admin}/healthz")
    assert out.stdout == "2", out


async def test_the_sdk_client_works_over_http2_with_streams(stack):
    gw, pki, _ = stack
    progress: list[float] = []

    async def on_progress(value, total, message):
        progress.append(value)

    async with streamable_session(gw.url("secure"), verify=pki.context(), http2=True) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert {"add", "slow_count"} <= names
        assert (await s.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"
        # An SSE answer, through the HTTPS upstream and back over HTTP/2.
        result = await s.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
        assert result.content[0].text == "counted to 3"
        assert progress == [1, 2, 3]


def test_a_get_stream_over_http2_gets_published_messages(stack):
    gw, pki, _ = stack
    url = gw.url("secure")
    with httpx2.Client(http2=True, verify=pki.context(), timeout=httpx2.Timeout(10, read=10)) as http:
        r = http.post(url, json=INIT, headers={"Accept": ACCEPT_BOTH})
        assert r.status_code == 200 and r.http_version == "HTTP/2", (r.status_code, r.http_version)
        sid = r.headers["mcp-session-id"]
        headers = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": PROTOCOL}
        r = http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                      headers={**headers, "Accept": ACCEPT_BOTH})
        assert r.status_code == 202
        with http.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200 and stream.http_version == "HTTP/2"
            events = SseReader(stream)
            # The same connection serves other requests while the stream is open.
            ping = http.post(url, json={"jsonrpc": "2.0", "id": 7, "method": "ping"},
                             headers={**headers, "Accept": ACCEPT_BOTH})
            assert ping.json()["result"] == {}, ping.text
            for n in range(2):
                message = {"jsonrpc": "2.0", "method": "notifications/message",
                           "params": {"level": "info", "data": f"over h2 #{n}"}}
                assert gw.publish(sid, message).status_code == 202
                assert events.next_message()[1]["params"]["data"] == f"over h2 #{n}"


def test_an_https_upstream_is_checked_and_a_failure_names_the_replica_and_why(stack):
    gw, pki, _ = stack
    for name, why in [("stranger", "invalid peer certificate: UnknownIssuer"),
                      ("stale", "invalid peer certificate: certificate expired")]:
        r = httpx2.post(gw.url(name), json=INIT, headers={"Accept": ACCEPT_BOTH}, verify=pki.context(), timeout=10)
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert f"upstream {name}#1 failed: TLS check failed: {why}" in message, message
    metrics = gw.metrics()
    for name in ("stranger", "stale"):
        assert f'ratatosk_upstream_errors_total{{kind="tls",org="{name}"' in metrics, metrics


def served_fingerprint(port: int, pki: Pki) -> str:
    """The first 16 hex digits of the SHA-256 of the certificate a new
    connection to `port` gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            pki.context().wrap_socket(raw, server_hostname="localhost") as tls:
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()[:16]


def test_certificates_are_reloaded_in_place_without_dropping_streams(stack):
    gw, pki, _ = stack
    live = pki.dir / "gateway.pem"
    assert served_fingerprint(gw.port, pki) == pki.fingerprint(live)
    url = gw.url("secure")
    with httpx2.Client(http2=True, verify=pki.context(), timeout=httpx2.Timeout(10, read=10)) as http:
        sid = http.post(url, json=INIT, headers={"Accept": ACCEPT_BOTH}).headers["mcp-session-id"]
        headers = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": PROTOCOL}
        with http.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}) as stream:
            events = SseReader(stream)
            # A renewed certificate: picked up by the timer (reload_interval: 1s).
            new_cert, new_key = pki.issue("renewed")
            shutil.copy(new_key, pki.dir / "gateway.key")
            shutil.copy(new_cert, live)
            wait_until("the renewed certificate served",
                       lambda: served_fingerprint(gw.port, pki) == pki.fingerprint(new_cert), timeout=15)
            # A broken one, and a SIGHUP: refused, the running one stays.
            (pki.dir / "gateway.key").write_text("not a key")
            os.kill(gw.pid, signal.SIGHUP)
            wait_until("the failed reload counted",
                       lambda: 'ratatosk_tls_reloads_total{listener="tls",result="failed"}' in gw.metrics(),
                       timeout=10)
            assert served_fingerprint(gw.port, pki) == pki.fingerprint(new_cert)
            assert "`" + str(pki.dir / "gateway.key") + "` holds no PEM private key" in gw.log_text()
            shutil.copy(new_key, pki.dir / "gateway.key")
            # The stream opened before both reloads still delivers.
            assert gw.publish(sid, {"jsonrpc": "2.0", "method": "notifications/message",
                                    "params": {"level": "info", "data": "after reload"}}).status_code == 202
            assert events.next_message()[1]["params"]["data"] == "after reload"
    assert 'ratatosk_tls_reloads_total{listener="tls",result="reloaded"}' in gw.metrics()


def test_client_certificates_are_required_when_a_client_ca_is_set(tmp_path, replicas):
    pki = Pki(tmp_path / "pki")
    client_cert, client_key = pki.issue("client", client=True)
    outsider = Pki(tmp_path / "outsider", "Outsider CA")
    bad_cert, bad_key = outsider.issue("mallory", client=True)
    gw = Gateway(tmp_path, {"o": org(replicas)}, name="gateway-mtls", verify=pki.context(),
                 extra={"tls": listener_tls(pki, "gateway", client_ca_file=str(pki.ca_file))})
    with running(gw):
        url = gw.url("o")
        out = curl_init(url, "--cacert", str(pki.ca_file), "--cert", str(client_cert), "--key", str(client_key))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("200 "), out.stdout
        for creds in ([], ["--cert", str(bad_cert), "--key", str(bad_key)]):
            out = curl_init(url, "--cacert", str(pki.ca_file), *creds)
            assert out.returncode != 0 and not out.stdout.startswith("200"), (creds, out)


def test_the_forward_auth_server_speaks_https(tmp_path):
    pki = Pki(tmp_path / "pki")
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "public_url": "https://proxy.example",
              "tls": listener_tls(pki, "auth"),
              # Not reached: /healthz and /metrics need no identity provider.
              "identity": {"issuer": f"http://127.0.0.1:{free_port()}/realms/r", "audience": "a"},
              "org_from": "header", "orgs": {"o": {}}}
    path = tmp_path / "auth.yaml"
    path.write_text(json.dumps(config))
    auth = Proc("ratatosk-auth", [str(gateway_binary().parent / "ratatosk-auth"), "serve", "--config", str(path)],
                tmp_path / "auth.log", env={"NO_COLOR": "1"})
    auth.start()
    try:
        wait_until("ratatosk-auth listening", lambda: port_open(port), alive=auth.death)
        r = httpx2.get(f"https://127.0.0.1:{port}/healthz", verify=pki.context(), timeout=5)
        assert r.json() == {"status": "ok"}
        with pytest.raises(httpx2.ConnectError):
            httpx2.get(f"https://127.0.0.1:{port}/healthz", verify=Pki(tmp_path / "x").context(), timeout=5)
        # A renewed certificate on SIGHUP.
        renewed, key = pki.issue("renewed")
        shutil.copy(key, pki.dir / "auth.key")
        shutil.copy(renewed, pki.dir / "auth.pem")
        os.kill(auth.pid, signal.SIGHUP)
        wait_until("the renewed certificate served",
                   lambda: served_fingerprint(port, pki) == pki.fingerprint(renewed), timeout=10, alive=auth.death)
    finally:
        auth.stop()
    assert "panicked" not in auth.log_text()


def test_check_names_a_broken_tls_file(tmp_path):
    pki = Pki(tmp_path / "pki")
    tls = listener_tls(pki, "gateway")
    (pki.dir / "gateway.key").write_text("")
    gw = Gateway(tmp_path, {"o": org(["https://127.0.0.1:1/mcp"], tls={"insecure_skip_verify": True})},
                 extra={"tls": tls})
    def check() -> subprocess.CompletedProcess:
        return subprocess.run([str(gateway_binary()), "check", "--config", str(gw.config_path)],
                              capture_output=True, text=True, timeout=10, env={**os.environ, **gw.env})

    out = check()
    assert out.returncode == 1
    assert f"at `tls`: `{pki.dir / 'gateway.key'}` holds no PEM private key" in out.stderr, out.stderr
    shutil.copy(pki.issue("fixed")[1], pki.dir / "gateway.key")
    shutil.copy(pki.dir / "fixed.pem", pki.dir / "gateway.pem")
    out = check()
    assert out.returncode == 0, out.stderr
    assert "upstream 'o' has tls.insecure_skip_verify" in out.stderr, out.stderr


def test_a_client_with_only_the_system_roots_refuses_the_gateway(stack):
    """The Python SDK's trust comes from the context it is given: with the
    system's roots, the test CA's gateway is refused."""
    gw, _, _ = stack
    with pytest.raises(httpx2.ConnectError) as err:
        httpx2.post(gw.url("secure"), json=INIT, headers={"Accept": ACCEPT_BOTH},
                    verify=ssl.create_default_context(), timeout=5)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value), err.value


def test_http2_streams_count_against_max_connections(tmp_path, replicas):
    """One HTTP/2 connection may carry many streams; each counts, so the
    bound holds however clients multiplex."""
    pki = Pki(tmp_path / "pki")
    gw = Gateway(tmp_path, {"o": org(replicas)}, name="gateway-h2-limit", verify=pki.context(),
                 extra={"tls": listener_tls(pki, "gateway"),
                        "limits": {"max_connections": 3, "body_read_timeout": "5s"}})
    def client() -> httpx2.Client:
        return httpx2.Client(http2=True, verify=pki.context(), timeout=httpx2.Timeout(10, read=10))

    with running(gw):
        url = gw.url("o")
        with client() as http:
            sessions = []
            for _ in range(2):
                r = http.post(url, json=INIT, headers={"Accept": ACCEPT_BOTH})
                assert r.status_code == 200 and r.http_version == "HTTP/2", r.text
                sessions.append({"Mcp-Session-Id": r.headers["mcp-session-id"], "MCP-Protocol-Version": PROTOCOL})
            # The connection, and two held streams: three.
            with http.stream("GET", url, headers={**sessions[0], "Accept": "text/event-stream"}) as first, \
                    http.stream("GET", url, headers={**sessions[1], "Accept": "text/event-stream"}) as second:
                assert (first.status_code, second.status_code) == (200, 200)
                refused = http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                                    headers={**sessions[0], "Accept": ACCEPT_BOTH})
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "1"
                assert "limits.max_connections" in refused.json()["error"]["message"]
        # The connection closed, and its streams with it: room again.
        with client() as http:
            wait_until("the streams counted out", lambda: http.post(
                url, json={"jsonrpc": "2.0", "id": 3, "method": "ping"},
                headers={**sessions[0], "Accept": ACCEPT_BOTH}).status_code == 200, timeout=10)
        assert "ratatosk_connections_refused_total 1" in gw.metrics()
