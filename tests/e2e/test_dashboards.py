"""The Grafana dashboard (deploy/grafana/ratatosk.json) and the Prometheus
alert rules (deploy/prometheus/ratatosk-rules.yaml) use only metrics the
gateway exports: each ratatosk_ name in their queries is in some gateway's
/metrics, after traffic that makes its series (plain, with a token checked
by the real Keycloak, and over TLS). promtool (scripts/go-tools) accepts
the rules and passes their unit tests (ratatosk-rules.test.yaml)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx2

from harness import Gateway, initialize, org, post, running
from pki import Pki

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GOBIN = Path(os.environ.get("RATATOSK_GOBIN",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ratatosk" / "gobin"))
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


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = GOBIN / "promtool"
    assert path.exists(), f"{path} is missing: run scripts/go-tools"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tmp_path):
    rules = DEPLOY / "prometheus" / "ratatosk-rules.yaml"
    alerts = len(re.findall(r"^\s*- alert: ", rules.read_text(), re.M))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0 and f"SUCCESS: {alerts} rules found" in checked.stdout, checked

    tests = DEPLOY / "prometheus" / "ratatosk-rules.test.yaml"
    tested = promtool("test", "rules", str(tests))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested
    # The unit tests can fail: the same file expecting the alert of the
    # error rate on the instance whose rate is low is refused.
    wrong = tests.read_text().replace('summary: "More than 5% of MCP requests end in 5xx on gw-0"',
                                      'summary: "More than 5% of MCP requests end in 5xx on gw-1"')
    assert wrong != tests.read_text()
    (tmp_path / "ratatosk-rules.yaml").write_text(rules.read_text())
    (tmp_path / "wrong.test.yaml").write_text(wrong)
    failed = promtool("test", "rules", str(tmp_path / "wrong.test.yaml"))
    assert failed.returncode == 1 and "RatatoskHighErrorRate" in failed.stdout + failed.stderr, failed
