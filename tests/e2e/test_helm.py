"""The Helm chart (deploy/helm/ratatosk): `helm lint`, `helm template` with
the default values and with the chart's ci/ values files (three pods on the
chart's Redis; an autoscaled gateway on an external Redis with a
ServiceMonitor), kubeconform against Kubernetes' own schemas for the oldest
and newest Kubernetes the chart is checked with, the ServiceMonitor against
the Prometheus Operator's, and what the manifests say: probes on the admin
listener's port, the Redis store, the drain within the termination grace,
the refusals, and a config that `ratatosk check` accepts.

helm, kubeconform (scripts/go-tools), the schemas (scripts/k8s-schemas) and
the ServiceMonitor's validator (tests/helm/setup) are installed by
scripts/prereqs and scripts/test, under ~/.cache."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness import gateway_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ratatosk"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ratatosk"
GOBIN = Path(os.environ.get("RATATOSK_GOBIN", CACHE / "gobin"))
SCHEMAS = CACHE / "k8s-schemas"
HELM_TESTS = CACHE / "helm-tests"
# The chart's kubeVersion floor and the newest schemas scripts/k8s-schemas makes.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
VALUES = {
    "default": [],
    "redis": ["-f", str(CHART / "ci" / "redis-values.yaml")],
    "monitoring": ["-f", str(CHART / "ci" / "monitoring-values.yaml")],
}


def tool(name: str) -> str:
    path = GOBIN / name
    assert path.exists(), f"{path} is missing: run scripts/go-tools"
    return str(path)


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)


def template_text(*args: str, kube: str = KUBE_VERSIONS[-1]) -> str:
    done = helm("template", "gw", str(CHART), "--namespace", "mcp", "--kube-version", kube, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(*args: str) -> dict[tuple[str, str], dict]:
    """The rendered manifests by (kind, name)."""
    docs = [d for d in yaml.safe_load_all(template_text(*args)) if d]
    found = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(found) == len(docs), "two manifests share a kind and name"
    return found


def refused(*args: str) -> str:
    """`helm template`'s error for values the chart must refuse."""
    done = helm("template", "gw", str(CHART), *args)
    assert done.returncode != 0, f"rendered: {args}"
    return done.stderr


def config_file(tmp_path: Path, text: str) -> list[str]:
    """Values args giving `text` as the config, as the README does."""
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(text)
    return ["--set-file", f"config={path}"]


DEFAULT_CONFIG = yaml.safe_load((CHART / "values.yaml").read_text())["config"]


def container(manifests: dict) -> dict:
    [c] = manifests["Deployment", "gw-ratatosk"]["spec"]["template"]["spec"]["containers"]
    return c


def gateway_config(manifests: dict) -> dict:
    return yaml.safe_load(manifests["ConfigMap", "gw-ratatosk"]["data"]["gateway.yaml"])


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def named_port(c: dict, name: str) -> int:
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def kubeconform(manifests: str, kube: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "manifests.yaml"
    path.write_text(manifests)
    assert (SCHEMAS / f"v{kube}-standalone-strict").is_dir(), f"{SCHEMAS} is missing: run scripts/k8s-schemas"
    location = f"{SCHEMAS}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/" \
               "{{ .ResourceKind }}{{ .KindSuffix }}.json"
    # The Prometheus Operator's kinds have no schema there: the
    # ServiceMonitor is checked by its own validator (below).
    return subprocess.run([tool("kubeconform"), "-strict", "-summary", "-output", "json", "-kubernetes-version",
                           kube, "-schema-location", location, "-skip", "ServiceMonitor", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values", VALUES)
def test_the_chart_lints_with_each_values_file(values):
    done = helm("lint", "--strict", str(CHART), *VALUES[values])
    assert done.returncode == 0 and "0 chart(s) failed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES)
def test_the_manifests_match_the_kubernetes_schemas(values, kube, tmp_path):
    text = template_text(*VALUES[values], kube=kube)
    kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
    done = kubeconform(text, kube, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)["summary"]
    monitors = kinds.count("ServiceMonitor")
    assert summary == {"valid": len(kinds) - monitors, "invalid": 0, "errors": 0, "skipped": monitors}, summary


def test_kubeconform_refuses_what_kubernetes_would(tmp_path):
    """The schemas are really applied: a misspelt field and a port given as
    text are refused, each naming the field."""
    text = template_text()
    for bad, where in [(text.replace("path: /readyz", "paht: /readyz"), "readinessProbe/httpGet"),
                       (text.replace("containerPort: 9090", "containerPort: \"9090\""), "ports/1/containerPort")]:
        assert bad != text
        done = kubeconform(bad, KUBE_VERSIONS[0], tmp_path)
        assert done.returncode == 1, done.stdout
        assert json.loads(done.stdout)["summary"]["invalid"] == 1 and where in done.stdout, done.stdout


def test_default_values_give_one_hardened_pod_probed_on_the_admin_listener():
    m = render()
    deployment = m["Deployment", "gw-ratatosk"]
    assert deployment["spec"]["replicas"] == 1
    config = gateway_config(m)
    assert config.get("sessions", {}).get("store", "memory") == "memory"
    c = container(m)
    admin, mcp = named_port(c, "admin"), named_port(c, "mcp")
    assert (mcp, admin) == (port_of(config["listen"]), port_of(config["admin_listen"])) == (8080, 9090)
    for probe, path in [("livenessProbe", "/healthz"), ("startupProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        assert c[probe]["httpGet"] == {"path": path, "port": "admin", "scheme": "HTTP"}, c[probe]
    assert c["args"] == ["--config", "/etc/ratatosk/gateway.yaml"]
    [mount] = [v for v in c["volumeMounts"] if v["name"] == "config"]
    assert mount["mountPath"] == "/etc/ratatosk" and "subPath" not in mount

    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]

    # The MCP Service never carries the admin port; the admin Service does.
    assert [p["targetPort"] for p in m["Service", "gw-ratatosk"]["spec"]["ports"]] == ["mcp"]
    assert [p["targetPort"] for p in m["Service", "gw-ratatosk-admin"]["spec"]["ports"]] == ["admin"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("gw-ratatosk", "gw-ratatosk-admin"):
        assert selects(m["Service", name]["spec"]["selector"], pod_labels)
    pdb = m["PodDisruptionBudget", "gw-ratatosk"]["spec"]
    assert pdb["maxUnavailable"] == 1 and selects(pdb["selector"]["matchLabels"], pod_labels)
    assert ("HorizontalPodAutoscaler", "gw-ratatosk") not in m and ("ServiceMonitor", "gw-ratatosk") not in m


def test_the_probes_and_services_follow_the_ports_of_the_config(tmp_path):
    moved = DEFAULT_CONFIG.replace("0.0.0.0:8080", "0.0.0.0:18080").replace("0.0.0.0:9090", "'[::]:19091'")
    m = render(*config_file(tmp_path, moved))
    c = container(m)
    assert (named_port(c, "mcp"), named_port(c, "admin")) == (18080, 19091)
    assert c["readinessProbe"]["httpGet"]["port"] == c["livenessProbe"]["httpGet"]["port"] == "admin"
    config = gateway_config(m)
    assert (config["listen"], config["admin_listen"]) == ("0.0.0.0:18080", "[::]:19091")


def test_the_drain_fits_in_the_termination_grace():
    for args, grace, sleep, total in [((), 20, 5, 30),
                                      (("--set", "drain.shutdownGraceSeconds=90",
                                        "--set", "drain.preStopSleepSeconds=0"), 90, None, 95),
                                      (("-f", str(CHART / "ci" / "redis-values.yaml")), 45, 10, 60)]:
        m = render(*args)
        pod = m["Deployment", "gw-ratatosk"]["spec"]["template"]["spec"]
        assert gateway_config(m)["server"]["shutdown_grace"] == f"{grace}s"
        hook = container(m).get("lifecycle", {}).get("preStop")
        assert hook == (None if sleep is None else {"exec": {"command": ["sleep", str(sleep)]}})
        # SIGTERM comes after the preStop hook; the process then serves for
        # the grace and stops its runtimes within about one more second.
        assert pod["terminationGracePeriodSeconds"] == total > (sleep or 0) + grace + 1


def test_a_changed_config_or_secret_rolls_the_pods():
    def checksums(*args: str) -> dict:
        annotations = render(*args)["Deployment", "gw-ratatosk"]["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums()
    assert set(base) == {"checksum/config", "checksum/secret"}
    assert checksums() == base, "the same values must not roll the pods"
    assert checksums("--set", "resources.requests.cpu=1") == base
    config = checksums("--set", "drain.shutdownGraceSeconds=21")
    assert config["checksum/config"] != base["checksum/config"]
    secret = checksums("--set", "secrets.env.RATATOSK_PUBLISH_SECRET=another-secret-of-enough-length")
    assert secret["checksum/secret"] != base["checksum/secret"]
    assert secret["checksum/config"] == base["checksum/config"]


def test_three_pods_share_sessions_through_the_charts_redis():
    m = render(*VALUES["redis"])
    assert m["Deployment", "gw-ratatosk"]["spec"]["replicas"] == 3
    sessions = gateway_config(m)["sessions"]
    assert sessions["store"] == "redis" and sessions["url"] == "${REDIS_URL}"
    assert sessions["idle_ttl"] == "30m", "the config's own session fields are kept"
    env = {e["name"]: e for e in container(m).get("env", [])}
    redis = m["Service", "gw-ratatosk-redis"]
    [port] = redis["spec"]["ports"]
    assert env["REDIS_URL"]["value"] == f"redis://gw-ratatosk-redis:{port['port']}"
    redis_pod = m["Deployment", "gw-ratatosk-redis"]["spec"]["template"]
    gateway_pod = m["Deployment", "gw-ratatosk"]["spec"]["template"]
    assert selects(redis["spec"]["selector"], redis_pod["metadata"]["labels"])
    assert not selects(redis["spec"]["selector"], gateway_pod["metadata"]["labels"])
    assert not selects(m["Service", "gw-ratatosk"]["spec"]["selector"], redis_pod["metadata"]["labels"])
    # Only the gateway's pods may reach the Redis, which has no password.
    policy = m["NetworkPolicy", "gw-ratatosk-redis"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    [rule] = policy["ingress"]
    [peer] = rule["from"]
    assert selects(peer["podSelector"]["matchLabels"], gateway_pod["metadata"]["labels"])
    assert not selects(peer["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    [rc] = redis_pod["spec"]["containers"]
    assert rc["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis_pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_autoscaling_and_the_service_monitor(tmp_path):
    m = render(*VALUES["monitoring"])
    deployment = m["Deployment", "gw-ratatosk"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the count"
    hpa = m["HorizontalPodAutoscaler", "gw-ratatosk"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gw-ratatosk"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    assert {x["resource"]["name"]: x["resource"]["target"]["averageUtilization"] for x in hpa["metrics"]} == \
        {"cpu": 60, "memory": 80}
    assert gateway_config(m)["sessions"] == {"store": "redis", "url": "${REDIS_URL}"}
    secret = m["Secret", "gw-ratatosk"]["data"]
    assert base64.b64decode(secret["REDIS_URL"]).decode() == "redis://:password@redis.example.internal:6379/0"
    pdb = m["PodDisruptionBudget", "gw-ratatosk"]["spec"]
    assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb

    monitor = m["ServiceMonitor", "gw-ratatosk"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    [scraped] = [name for (kind, name), s in m.items() if kind == "Service" and selects(selector, s["metadata"]["labels"])]
    assert scraped == "gw-ratatosk-admin"
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("admin", "/metrics", "http")
    assert endpoint["port"] in [p["name"] for p in m["Service", scraped]["spec"]["ports"]]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["mcp"]}

    # The Prometheus Operator's schema, through its generated validators.
    node = shutil.which("node")
    assert node and (HELM_TESTS / "node_modules").is_dir(), "run tests/helm/setup"
    shutil.copy(ROOT / "tests" / "helm" / "servicemonitor.mjs", HELM_TESTS / "servicemonitor.mjs")

    def validate(resource: dict) -> subprocess.CompletedProcess:
        return subprocess.run([node, "servicemonitor.mjs"], cwd=HELM_TESTS, input=json.dumps([resource]),
                              capture_output=True, text=True, timeout=60)

    done = validate(monitor)
    assert done.returncode == 0 and done.stdout.strip() == "gw-ratatosk: valid", done.stdout + done.stderr
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    done = validate(broken)
    assert done.returncode == 1 and "interval must match pattern" in done.stdout, done.stdout + done.stderr


def test_values_that_cannot_work_are_refused(tmp_path):
    assert "sessions are in memory" in refused("--set", "replicaCount=3")
    assert "sessions are in memory" in refused("--set", "autoscaling.enabled=true")
    # One pod in memory, or many in Redis, render.
    assert render("--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=1",
                  "--set", "autoscaling.maxReplicas=1")
    assert render("--set", "replicaCount=3", "--set", "redis.external.url=rediss://redis:6380")
    # A config of its own in Redis mode, its URL from the Secret, too.
    own = config_file(tmp_path, DEFAULT_CONFIG + "sessions:\n  store: redis\n  url: ${MY_REDIS}\n")
    m = render("--set", "replicaCount=3", "--set", "secrets.env.MY_REDIS=redis://mine:6379", *own)
    assert gateway_config(m)["sessions"] == {"store": "redis", "url": "${MY_REDIS}"}
    assert "MY_REDIS" in m["Secret", "gw-ratatosk"]["data"]

    assert "kills pods mid-drain" in refused("--set", "drain.terminationGracePeriodSeconds=26")
    assert render("--set", "drain.terminationGracePeriodSeconds=27")
    def config(old: str, new: str) -> list[str]:
        assert old in DEFAULT_CONFIG
        return config_file(tmp_path, DEFAULT_CONFIG.replace(old, new))

    assert "set drain.shutdownGraceSeconds" in refused(*config_file(tmp_path, DEFAULT_CONFIG + "server:\n  shutdown_grace: 5s\n"))
    assert "${MISSING}" in refused(*config("https://mcp.example.com", "${MISSING}"))
    # A default makes the variable optional.
    assert render(*config("https://mcp.example.com", "${MISSING:-https://mcp.example.com}"))
    assert "literal host:port" in refused(*config("0.0.0.0:8080", "${LISTEN}"))
    assert "different ports" in refused(*config("0.0.0.0:9090", "127.0.0.1:8080"))
    assert "not valid YAML" in refused(*config("listen: 0.0.0.0:8080", "listen: [0.0.0.0:8080"))
    assert "not both" in refused("--set", "redis.enabled=true", "--set", "redis.external.url=redis://r:6379")
    # values.schema.json: a misspelt key, and a publish secret the gateway would refuse.
    assert "additional properties 'replicas' not allowed" in refused("--set", "replicas=3")
    assert "minLength" in refused("--set", "secrets.env.RATATOSK_PUBLISH_SECRET=short")


@pytest.mark.parametrize("values", VALUES)
def test_the_config_map_passes_ratatosk_check(values, tmp_path):
    """The ConfigMap's file, with the environment the pod gets from the
    Secret and the container's env, is a config the gateway accepts."""
    m = render(*VALUES[values])
    path = tmp_path / "gateway.yaml"
    path.write_text(m["ConfigMap", "gw-ratatosk"]["data"]["gateway.yaml"])
    env = {k: base64.b64decode(v).decode() for k, v in m["Secret", "gw-ratatosk"]["data"].items()}
    env |= {e["name"]: e["value"] for e in container(m).get("env", []) if "value" in e}
    assert len(env["RATATOSK_PUBLISH_SECRET"]) >= 16
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",) and not k.startswith("RATATOSK_")}
    checked = subprocess.run([str(gateway_binary()), "check", "--config", str(path)], env={**clean, **env},
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and ": ok (1 org: " in checked.stdout, checked
    # The same check refuses what the gateway would: it is no formality.
    path.write_text(path.read_text().replace("stateless-2025", "stateless-2024"))
    checked = subprocess.run([str(gateway_binary()), "check", "--config", str(path)], env={**clean, **env},
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 and ".upstream.era" in checked.stdout + checked.stderr, checked
