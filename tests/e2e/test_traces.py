"""Traces over OTLP (issue 20), into a real Jaeger (v1.75.0, built from the
Go module proxy by scripts/go-tools): a client's `traceparent` is
continued, the request's spans (authentication with its cache outcome,
the session look-up, the upstream call with server, replica and era) are
in one trace, and the upstream receives the trace's context as the child
of the gateway's upstream span. The `telemetry` section configures it, and
so do the standard OTEL_* variables instead."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx2
import pytest

from conftest import identity_config
from harness import (KC_GATEWAY_SECRET, PROTOCOL, Gateway, Proc, free_port, org, post, running, wait_until)

GOBIN = Path(os.environ.get("RATATOSK_GOBIN", Path.home() / ".cache" / "ratatosk" / "gobin"))


class Jaeger(Proc):
    """Jaeger all-in-one, in memory, OTLP/HTTP in and its query API out,
    on loopback ports of its own."""

    def __init__(self, log_dir: Path):
        self.otlp_port, self.query_port, self.grpc_port = free_port(), free_port(), free_port()
        config = log_dir / f"jaeger-{self.query_port}.yaml"
        # JSON is YAML.
        config.write_text(json.dumps({
            "service": {"extensions": ["jaeger_storage", "jaeger_query"],
                        "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                                 "exporters": ["jaeger_storage_exporter"]}},
                        "telemetry": {"metrics": {"level": "none"}}},
            "extensions": {
                "jaeger_storage": {"backends": {"mem": {"memory": {"max_traces": 10000}}}},
                "jaeger_query": {"storage": {"traces": "mem"},
                                 "http": {"endpoint": f"127.0.0.1:{self.query_port}"},
                                 "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}"}}},
            "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.otlp_port}"}}}},
            "processors": {"batch": {"timeout": "200ms"}},
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "mem"}},
        }))
        binary = GOBIN / "jaeger"
        assert binary.exists(), f"{binary} is missing: scripts/go-tools builds it"
        super().__init__(name="jaeger", argv=[str(binary), "--config", str(config)],
                         log_path=log_dir / f"jaeger-{self.query_port}.log")
        self.api = f"http://127.0.0.1:{self.query_port}/api"
        self.otlp = f"http://127.0.0.1:{self.otlp_port}"

    def start_and_wait(self) -> "Jaeger":
        self.start()
        wait_until("Jaeger's query API", lambda: httpx2.get(f"{self.api}/services", timeout=2).status_code == 200,
                   timeout=60, alive=self.death)
        wait_until("Jaeger's OTLP receiver", lambda: httpx2.post(
            f"{self.otlp}/v1/traces", content=b"{}", headers={"Content-Type": "application/json"},
            timeout=2).status_code < 500, timeout=30, alive=self.death)
        return self

    def trace(self, trace_id: str, wanted: set[str]) -> list[dict]:
        """The spans of `trace_id`, once every operation in `wanted` is in."""
        spans: list[dict] = []

        def complete() -> bool:
            nonlocal spans
            r = httpx2.get(f"{self.api}/traces/{trace_id}", timeout=5)
            if r.status_code != 200:
                return False
            data = r.json()["data"]
            if not data:
                return False
            processes = data[0]["processes"]
            spans = [{**s, "service": processes[s["processID"]]["serviceName"],
                      "tags": {t["key"]: t["value"] for t in s["tags"]}} for s in data[0]["spans"]]
            return wanted <= {s["operationName"] for s in spans}

        wait_until(f"trace {trace_id} with {sorted(wanted)} in Jaeger", complete, timeout=30, every=0.25)
        return spans


@pytest.fixture(scope="module")
def jaeger(log_dir):
    j = Jaeger(log_dir).start_and_wait()
    try:
        yield j
    finally:
        j.stop()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def one(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["operationName"] == name]
    assert len(found) == 1, (name, [s["operationName"] for s in spans])
    return found[0]


def parent_of(span: dict) -> str | None:
    refs = [r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
    return refs[0] if refs else None


def test_a_call_is_one_trace_from_the_clients_span_to_the_upstream(log_dir, jaeger, replicas, keycloak):
    traced = {**org(replicas, auth="jwt", organization="org-1")}
    gw = Gateway(log_dir, {"tr": traced}, name="traces",
                 extra={"identity": identity_config(keycloak.issuer),
                        "telemetry": {"endpoint": f"{jaeger.otlp}/v1/traces", "service_name": "ratatosk-e2e"}},
                 # Variables the environment might set would win over the section.
                 env={"RATATOSK_KC_SECRET": KC_GATEWAY_SECRET, "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_SERVICE_NAME": "", "OTEL_TRACES_SAMPLER": ""})
    with running(gw):
        auth = {"Authorization": f"Bearer {keycloak.token('alice')}"}
        r = post(gw.url("tr"), {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                                           "clientInfo": {"name": "traces", "version": "1"}}},
                 version=None, headers=auth)
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        trace_id, client_span, header = traceparent()
        r = post(gw.url("tr"), {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                "params": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                 session=sid, headers={**auth, "traceparent": header})
        assert r.status_code == 200, r.text

        spans = jaeger.trace(trace_id, {"POST /tr/mcp", "auth", "session", "upstream POST"})
        request = one(spans, "POST /tr/mcp")
        assert request["service"] == "ratatosk-e2e"
        # The client's span is the request's parent; the rest hang below it.
        assert parent_of(request) == client_span, request
        assert request["tags"]["span.kind"] == "server"
        assert int(request["tags"]["http.response.status_code"]) == 200, request["tags"]
        auth_span = one(spans, "auth")
        assert parent_of(auth_span) == request["spanID"]
        # The token was checked once at initialize: this is a cache hit.
        assert auth_span["tags"]["cache"] == "hit" and auth_span["tags"]["org"] == "tr", auth_span["tags"]
        assert parent_of(one(spans, "session")) == request["spanID"]
        upstream = one(spans, "upstream POST")
        assert parent_of(upstream) == request["spanID"]
        assert upstream["tags"]["span.kind"] == "client"
        assert upstream["tags"]["server"] == "tr" and upstream["tags"]["era"] == "stateless-2025", upstream["tags"]
        assert upstream["tags"]["replica"] in {r.url for r in replicas}, upstream["tags"]

        # The replica got the trace, as the child of the upstream span, and
        # not the client's own header.
        sent = [h.get("traceparent", "") for r in replicas for h in r.seen_headers()]
        ours = [h for h in sent if h.startswith(f"00-{trace_id}-")]
        assert ours, sent[-4:]
        assert all(h.split("-")[2] == upstream["spanID"] for h in ours), (ours, upstream["spanID"])


def test_the_otel_variables_alone_turn_traces_on(log_dir, jaeger, replicas):
    gw = Gateway(log_dir, {"env": org(replicas)}, name="traces-env",
                 env={"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp, "OTEL_SERVICE_NAME": "ratatosk-from-env"})
    with running(gw):
        trace_id, client_span, header = traceparent()
        r = post(gw.url("env"), {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                 "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                                            "clientInfo": {"name": "traces", "version": "1"}}},
                 version=None, headers={"traceparent": header})
        assert r.status_code == 200, r.text
        spans = jaeger.trace(trace_id, {"POST /env/mcp"})
        request = one(spans, "POST /env/mcp")
        assert request["service"] == "ratatosk-from-env" and parent_of(request) == client_span, request
        # No token to check on an org without auth: no auth span.
        assert not [s for s in spans if s["operationName"] == "auth"], spans
