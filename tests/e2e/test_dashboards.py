"""The Grafana dashboard (deploy/grafana/ratatosk.json) and the Prometheus
alert rules (deploy/prometheus/ratatosk-rules.yaml) use only metrics the
gateway exports: each ratatosk_ name in their queries is in some gateway's
/metrics, after traffic that makes its series (plain, with a token checked
by the real Keycloak, and over TLS)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx2

from harness import Gateway, initialize, org, post, running
from pki import Pki

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\bratatosk_[a-z_]+")
# A histogram's series carry these suffixes; its family does not.
SUFFIXES = ("_bucket", "_sum", "_count")


def used() -> dict[str, set[str]]:
    """The ratatosk_ metric families each file's queries use."""
    def families(exprs: list[str]) -> set[str]:
        names = {m for e in exprs for m in NAME.findall(e)}
        return {next((n[: -len(s)] for s in SUFFIXES if n.endswith(s)), n) for n in names}

    dashboard = json.loads((DEPLOY / "grafana" / "ratatosk.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = (DEPLOY / "prometheus" / "ratatosk-rules.yaml").read_text()
    return {"dashboard": families(panel_exprs), "rules": families(rule_exprs(rules))}


def rule_exprs(rules: str) -> list[str]:
    """Each rule's `expr:` (one line, or a block indented under it); the
    test venv has no YAML library."""
    exprs: list[str] = []
    lines = rules.splitlines()
    for i, line in enumerate(lines):
        if not line.strip().startswith("expr:"):
            continue
        indent = len(line) - len(line.lstrip())
        block = [line.split("expr:", 1)[1]]
        for more in lines[i + 1:]:
            if more.strip() and len(more) - len(more.lstrip()) <= indent:
                break
            block.append(more)
        exprs.append("\n".join(block))
    return exprs


def exported(metrics: str) -> set[str]:
    return {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ratatosk_")}


def test_every_metric_of_the_dashboard_and_the_rules_is_exported(gateway, auth_gateway, keycloak, replicas,
                                                                 tmp_path, log_dir):
    wanted = used()
    assert len(wanted["dashboard"]) >= 15 and len(wanted["rules"]) >= 8, wanted

    # Plain traffic on the shared gateway: a call, and an org whose
    # replicas are down (upstream errors).
    url = gateway.url("org-1")
    sid = initialize(url)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    assert post(url, call, session=sid).status_code == 200
    assert post(gateway.url("org-dead"), {"jsonrpc": "2.0", "id": 1, "method": "ping"}).status_code >= 400
    # A token checked (and introspected) by the auth gateway.
    token = keycloak.token("alice")
    r = post(auth_gateway.url("org-1-both"), {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                         "clientInfo": {"name": "dash", "version": "1"}}},
             headers={"Authorization": f"Bearer {token}"}, version=None)
    assert r.status_code == 200, r.text
    found = exported(gateway.metrics()) | exported(auth_gateway.metrics())

    # TLS on the listener: its certificate reload series; and a rate limit,
    # whose series exist from the start.
    pki = Pki(tmp_path / "pki")
    cert, key = pki.issue("dash")
    rated = {**org(replicas), "rate_limits": [{"name": "calls", "rate": "100/s"}]}
    tls = Gateway(log_dir / "dash-tls", {"org-1": rated}, name="dash-tls", verify=pki.context(),
                  extra={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    with running(tls):
        found |= exported(httpx2.get(tls.admin + "/metrics", timeout=5).text)

    for what, names in wanted.items():
        missing = sorted(names - found)
        assert not missing, f"the {what} uses metrics no gateway exports: {missing}"
