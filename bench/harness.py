"""The benchmark harness: starts the systems under test on loopback, runs
scenarios A-F and R with the Rust load generator, stops everything by pid, and
writes bench/RESULTS.md (between its harness markers) and PNG plots.

Run it through `bench/run` (or `make bench`), which installs the peers and
builds the release binaries first. `bench/run --smoke` is the small CI
version: N = 200, seconds instead of minutes, one run; it checks that the
harness works (no errors, nothing lost), not how fast anything is.

Every process started here is started in a new session and stopped by its
process-group id, which is its own pid; nothing is stopped by name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = ROOT / "target" / "release"
LOADGEN = BIN / "ratatosk-loadgen"
# The gateway under test; RATATOSK_GATEWAY_BIN runs another build (e.g. the
# one before a change, for its before/after figures).
GATEWAY_BIN = Path(os.environ.get("RATATOSK_GATEWAY_BIN", BIN / "ratatosk"))
# Another build beside it in the same run (scenarios A and I), for a
# change's before/after figures: RATATOSK_BASELINE_BIN=path, and
# RATATOSK_BASELINE_LABEL (e.g. its commit) to name it in RESULTS.md.
BASELINE_BIN = os.environ.get("RATATOSK_BASELINE_BIN")
BASELINE = "gateway (baseline)"

# LOCAL USE ONLY: test credentials of the local realm (keycloak/realm-ratatosk.json).
KC_USER, KC_PASSWORD = "alice", "alice-local-only"
KC_GATEWAY_SECRET = "ratatosk-gateway-local-only-secret"
KC_AUDIENCE = "http://127.0.0.1:8080"
PUBLISH_SECRET = "bench-publish-secret-local-only"

MARK_BEGIN = "<!-- harness:begin -->"
MARK_END = "<!-- harness:end -->"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float, what: str, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{what} exited ({proc.popen.returncode}); see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Proc:
    """A process of ours, in its own session (process group = its pid)."""

    def __init__(self, name: str, cmd: list[str], run_dir: Path, env: dict | None = None,
                 stdin: bool = False, stdout_pipe: bool = False):
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            cmd, env=full_env, start_new_session=True,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self.log_file,
            stderr=self.log_file, text=True)
        self.pid = self.popen.pid

    def pids(self) -> list[int]:
        """This process and its descendants."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, i = [self.pid], 0
        while i < len(out):
            out.extend(children.get(out[i], []))
            i += 1
        return out

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(10)
        # Children left in the group (e.g. nginx workers) go with it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log_file.close()


def memory_kib(pids: list[int]) -> dict:
    """RSS and PSS summed over processes, in KiB (PSS shares shared pages out)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss_kib": rss, "pss_kib": pss}


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(f[11]) + int(f[12])
        except OSError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class Loadgen:
    """`ratatosk-loadgen streams`, driven line by line."""

    def __init__(self, run_dir: Path, args: list[str], name: str):
        self.proc = Proc(name, [str(LOADGEN), "streams", *args], run_dir, stdin=True,
                         stdout_pipe=True, env={"RUST_BACKTRACE": "0"})

    def read(self, timeout: float) -> dict:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"load generator gave no answer within {timeout}s; see {self.proc.log_path}")
        line = self.proc.popen.stdout.readline()
        if not line:
            raise BenchError(f"load generator exited ({self.proc.popen.wait(5)}); see {self.proc.log_path}")
        return json.loads(line)

    def send(self, word: str) -> None:
        self.proc.popen.stdin.write(word + "\n")
        self.proc.popen.stdin.flush()

    def quit(self) -> None:
        try:
            self.send("quit")
            self.proc.popen.wait(30)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            pass
        self.proc.stop()


def redis_call(port: int, *args: str, timeout: float = 10):
    """One Redis command over a raw socket (RESP2): a bulk string (bytes),
    an integer, a status line or a list of these; an error reply raises."""
    cmd = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(cmd.encode())
        f = c.makefile("rb")

        def reply():
            line = f.readline()
            kind, rest = line[:1], line[1:].rstrip(b"\r\n")
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:n]
            if kind == b":":
                return int(rest)
            if kind == b"+":
                return rest.decode()
            if kind == b"*":
                n = int(rest)
                return None if n < 0 else [reply() for _ in range(n)]
            raise BenchError(f"redis {args[0]}: {line.decode(errors='replace').strip()}")

        return reply()


def redis_info(port: int, section: str) -> dict[str, str]:
    raw = redis_call(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line and not line.startswith("#"))


def redis_memory(port: int) -> dict:
    """Redis `used_memory` (everything its allocator holds for it), the
    dataset's part of it, and the number of keys."""
    info = redis_info(port, "memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_dataset": int(info["used_memory_dataset"]),
            "keys": redis_call(port, "DBSIZE")}


def redis_commands(port: int) -> int:
    return int(redis_info(port, "stats")["total_commands_processed"])


def redis_command_calls(port: int) -> dict[str, int]:
    """Calls so far per command (`INFO commandstats`; commands that scripts
    run count too)."""
    return {k.removeprefix("cmdstat_"): int(re.search(r"calls=(\d+)", v).group(1))
            for k, v in redis_info(port, "commandstats").items()}


def redis_key_sample(port: int) -> dict:
    """`MEMORY USAGE` of one key of each type, to tell where the memory is."""
    out: dict = {}
    for kind in ("hash", "stream", "string", "zset", "set"):
        cursor = "0"
        while True:
            cursor_b, keys = redis_call(port, "SCAN", cursor, "COUNT", "1000", "TYPE", kind)
            if keys:
                key = keys[0].decode(errors="replace")
                out[kind] = {"key": key, "bytes": redis_call(port, "MEMORY", "USAGE", key, "SAMPLES", "0")}
                if kind == "stream":
                    out[kind]["entries"] = redis_call(port, "XLEN", key)
                break
            cursor = cursor_b.decode()
            if cursor == "0":
                break
    return out


def loadgen_json(args: list[str], timeout: float) -> dict:
    out = subprocess.run([str(LOADGEN), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "RUST_BACKTRACE": "0"})
    if out.returncode != 0:
        raise BenchError(f"loadgen {args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------- systems


class Systems:
    """Everything under test, started once and stopped at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.procs: list[Proc] = []
        self.kc_env: dict | None = None
        self.versions: dict[str, str] = {}
        self.nginx_proxy: Proc | None = None
        self.nginx_proxy_url = ""

    def add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.kc_env is not None:
            subprocess.run([str(ROOT / "keycloak/stop")], env=self.kc_env, capture_output=True, timeout=120)
            # The unpacked distribution (~190 MB) is a copy of the cached one;
            # its log stays.
            shutil.rmtree(self.run_dir / "keycloak" / "dist", ignore_errors=True)

    # -- the stub upstream
    def start_stub(self) -> str:
        port = free_port()
        self.stub = self.add(Proc("stub", [str(BIN / "ratatosk-stub"), "--listen", f"127.0.0.1:{port}"],
                                  self.run_dir))
        wait_tcp(port, 10, "ratatosk-stub", self.stub)
        self.stub_port = port
        return f"http://127.0.0.1:{port}/mcp"

    def start_more_stub(self, name: str) -> str:
        """Another stateless stub upstream (scenario G's servers)."""
        port = free_port()
        p = self.add(Proc(name, [str(BIN / "ratatosk-stub"), "--listen", f"127.0.0.1:{port}"], self.run_dir))
        wait_tcp(port, 10, f"ratatosk-stub {name}", p)
        return f"http://127.0.0.1:{port}/mcp"

    def start_era_stub(self, era: str) -> str:
        """A stub speaking `era` (stateful-2025 or modern), for scenario F."""
        port = free_port()
        p = self.add(Proc(f"stub-{era}", [str(BIN / "ratatosk-stub"), "--listen", f"127.0.0.1:{port}",
                                          "--era", era], self.run_dir))
        wait_tcp(port, 10, f"ratatosk-stub --era {era}", p)
        return f"http://127.0.0.1:{port}/mcp"

    # -- Keycloak
    def start_keycloak(self) -> None:
        port, mport = free_port(), free_port()
        self.kc_env = {**os.environ, "KEYCLOAK_PORT": str(port), "KEYCLOAK_MANAGEMENT_PORT": str(mport),
                       "KEYCLOAK_RUN_DIR": str(self.run_dir / "keycloak")}
        log("starting Keycloak (keycloak/start)")
        out = subprocess.run([str(ROOT / "keycloak/start")], env=self.kc_env, capture_output=True,
                             text=True, timeout=600)
        if out.returncode != 0:
            raise BenchError(f"keycloak/start failed: {out.stderr[-3000:]}")
        self.issuer = out.stdout.strip().splitlines()[-1]
        m = re.search(r"keycloak-quarkus-dist-([\d.]+)|(\d+\.\d+\.\d+)", out.stderr)
        self.versions["Keycloak"] = m.group(1) or m.group(2) if m else "?"

    def tokens(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            body = urllib.parse.urlencode({
                "grant_type": "password", "client_id": "mcp-client", "username": KC_USER,
                "password": KC_PASSWORD, "scope": "openid organization:* mcp:tools"}).encode()
            status, raw = http("POST", f"{self.issuer}/protocol/openid-connect/token", body,
                               {"Content-Type": "application/x-www-form-urlencoded"})
            if status != 200:
                raise BenchError(f"Keycloak token request: {status} {raw[:300]!r}")
            out.append(json.loads(raw)["access_token"])
        return out

    # -- Redis, for gateways in distributed mode (scenario R)
    def start_redis(self, name: str) -> dict:
        """An empty, non-persistent redis-server on a fresh loopback port."""
        port = free_port()
        p = self.add(Proc(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(self.run_dir)], self.run_dir))
        wait_tcp(port, 10, "redis-server", p)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_call(port, "PING") == "PONG":
                    break
            except (OSError, BenchError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server on port {port} does not answer PING; see {p.log_path}")
            time.sleep(0.1)
        self.versions["Redis"] = redis_info(port, "server").get("redis_version", "?")
        return {"proc": p, "port": port, "url": f"redis://127.0.0.1:{port}/"}

    # -- the gateway
    def start_gateway(self, name: str, stub_url: str, cache: bool = True, sessions: dict | None = None,
                      tls: dict | None = None, binary: Path | None = None) -> dict:
        """The bench gateway: orgs `jwt` and `introspect` on `stub_url`;
        `sessions` replaces the default sessions section (e.g. `store: redis`);
        `tls` (from `tls_files`) puts the MCP listener on HTTPS."""
        org = {"upstream": {"era": "stateless-2025", "replicas": [stub_url], "timeout": "30s"}}
        extra = {"sessions": sessions} if sessions is not None else {}
        if tls:
            extra["tls"] = {"cert_file": tls["cert"], "key_file": tls["key"]}
        return self.run_gateway(name, {**extra,
            "identity": {"issuer": self.issuer, "audience": KC_AUDIENCE, "client_id": "ratatosk-gateway",
                         "client_secret": "${BENCH_KC_SECRET}", "timeout": "5s",
                         "cache": {"enabled": cache}},
            "orgs": {"jwt": {"auth": "jwt", "organization": "org-1", **org},
                     "introspect": {"auth": "introspect", "organization": "org-1", **org}},
        }, binary)

    def start_redis_gateway(self, name: str, stub_url: str, redis: dict) -> dict:
        """A gateway node in distributed mode: sessions in `redis`, under the
        key prefix every bench node shares."""
        return self.start_gateway(name, stub_url, sessions={
            "idle_ttl": "2h", "event_log_size": R_EVENT_LOG, "store": "redis", "url": redis["url"],
            "key_prefix": "bench:"})

    def start_era_gateway(self, upstreams: dict[str, str]) -> dict:
        """A gateway with one org per upstream era (`<era>` -> stub URL), no auth."""
        return self.run_gateway("gateway-eras", {"orgs": {
            era: {"auth": "none", "upstream": {"era": era, "replicas": [url], "timeout": "30s"}}
            for era, url in upstreams.items()}})

    def run_gateway(self, name: str, config: dict, binary: Path | None = None) -> dict:
        """Starts a gateway (`binary`, else GATEWAY_BIN) with `config`
        (identity, orgs) on fresh loopback ports."""
        port, admin = free_port(), free_port()
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "public_url": f"http://127.0.0.1:{port}",
            "sessions": {"idle_ttl": "2h", "event_log_size": 64},
            "streams": {"keepalive": "15s"},
            "publish": {"secret": "${BENCH_PUBLISH_SECRET}"},
            **config,
        }
        # Scenarios B, C and R hold tens of thousands of one user's sessions
        # and streams: above the per-user and connection defaults.
        config["sessions"] = {"max_per_subject": 1_000_000, **config["sessions"]}
        config["limits"] = {"max_connections": 1_000_000, **config.get("limits", {})}
        path = self.run_dir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        p = self.add(Proc(name, [str(binary or GATEWAY_BIN), "--config", str(path)], self.run_dir,
                          env={"BENCH_PUBLISH_SECRET": PUBLISH_SECRET, "BENCH_KC_SECRET": KC_GATEWAY_SECRET,
                               # No access log on either side: nginx runs with access_log off.
                               "RATATOSK_LOG": "warn"}))
        wait_tcp(port, 20, name, p)
        wait_tcp(admin, 20, name, p)
        scheme = "https" if config.get("tls") else "http"
        return {"proc": p, "base": f"{scheme}://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}"}

    # -- a test CA and a certificate for 127.0.0.1 (scenario T)
    def tls_files(self) -> dict:
        """`ca`, `cert` and `key` (PEM paths): a P-256 certificate for
        127.0.0.1 signed by a CA made now, with the openssl CLI. LOCAL USE
        ONLY: made fresh for each run."""
        d = self.run_dir / "tls"
        if (d / "cert.pem").exists():
            return {k: str(d / f"{k}.pem") for k in ("ca", "cert", "key")}
        d.mkdir(parents=True, exist_ok=True)
        ext = d / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for argv in (
            ["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=Ratatosk bench CA", "-keyout", "ca.key",
             "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "cert.csr"],
            ["openssl", "x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", "cert.pem", "-extfile", "ext.cnf"],
        ):
            out = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise BenchError(f"{' '.join(argv[:3])} failed: {out.stderr[-1000:]}")
        return {k: str(d / f"{k}.pem") for k in ("ca", "cert", "key")}

    # -- nginx as a reverse proxy
    def start_nginx_proxy(self, tls: dict | None = None) -> str:
        """nginx `proxy_pass` to the stub; with `tls` (from `tls_files`), on
        HTTPS with the gateway's certificate, TLS 1.2 and 1.3 as the
        gateway offers."""
        port = free_port()
        name = "nginx-proxy-tls" if tls else "nginx-proxy"
        d = self.run_dir / name
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        ssl = (f"""ssl_certificate {tls['cert']};
    ssl_certificate_key {tls['key']};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;""" if tls else "")
        (d / "nginx.conf").write_text(nginx_prelude(d) + f"""
  keepalive_requests 100000000;
  upstream stub {{ server 127.0.0.1:{self.stub_port}; keepalive 128; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096{' ssl' if tls else ''};
    {ssl}
    location / {{
      proxy_pass http://stub;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
        p = self.add(Proc(name, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"),
                                 "-g", "daemon off;"], self.run_dir))
        wait_tcp(port, 10, "nginx (proxy_pass)", p)
        if tls:
            self.nginx_proxy_tls = p
            return f"https://127.0.0.1:{port}/mcp"
        self.nginx_proxy = p
        self.nginx_proxy_url = f"http://127.0.0.1:{port}/mcp"
        return self.nginx_proxy_url

    # -- Nginx + Nchan
    def start_nchan(self, name: str = "nchan") -> dict:
        port = free_port()
        d = self.run_dir / name
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        module = "/usr/lib/nginx/modules/ngx_nchan_module.so"
        (d / "nginx.conf").write_text(nginx_prelude(d, f"load_module {module};") + f"""
  nchan_shared_memory_size 512M;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/sub/(\\d+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
      nchan_eventsource_ping_interval 15;
    }}
    location ~ ^/pub/(\\d+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
    }}
  }}
}}
""")
        p = self.add(Proc(name, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"),
                                    "-g", "daemon off;"], self.run_dir))
        wait_tcp(port, 10, "nginx + nchan", p)
        return {"proc": p, "sub": f"http://127.0.0.1:{port}/sub", "pub": f"http://127.0.0.1:{port}/pub"}

    # -- Pushpin
    def start_pushpin(self, name: str = "pushpin") -> dict:
        """Pushpin on fresh ports. Its parts bind ports we only probed as
        free; one taken in between is tried again on new ports."""
        for attempt in range(3):
            try:
                return self._start_pushpin(f"{name}-{attempt}" if attempt else name)
            except BenchError:
                logs = self.run_dir / (f"{name}-{attempt}" if attempt else name) / "log"
                taken = any("Address already in use" in f.read_text(errors="replace")
                            for f in logs.glob("*.log"))
                if not taken or attempt == 2:
                    raise
                log(f"{name}: a probed port was taken meanwhile; trying again on new ports")
        raise BenchError("unreachable")

    def _start_pushpin(self, name: str) -> dict:
        d = self.run_dir / name
        (d / "log").mkdir(parents=True, exist_ok=True)
        (d / "run").mkdir(parents=True, exist_ok=True)
        http_port, pub_port = free_port(), free_port()
        ports = {k: free_port() for k in ("push_in", "push_in_sub", "command")}
        (d / "routes").write_text(f"* 127.0.0.1:{self.stub_port}\n")
        conf = Path("/etc/pushpin/pushpin.conf").read_text()
        settings = {
            "rundir": str(d / "run"), "ipc_prefix": f"bench{os.getpid()}-", "http_port": str(http_port),
            "logdir": str(d / "log"), "log_level": "1", "client_maxconn": "200000",
            "routesfile": str(d / "routes"),
            "push_in_spec": f"tcp://127.0.0.1:{ports['push_in']}",
            "push_in_sub_specs": f"tcp://127.0.0.1:{ports['push_in_sub']}",
            "push_in_http_addr": "127.0.0.1", "push_in_http_port": str(pub_port),
            "command_spec": f"tcp://127.0.0.1:{ports['command']}",
            # The default rate limit (2,500 messages/s) would make the fan-out
            # a measure of the limit; lift it, as one would for this load.
            "message_rate": "1000000", "message_hwm": "1000000",
        }
        for key, value in settings.items():
            conf, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", conf)
            if n != 1:
                raise BenchError(f"pushpin.conf: expected one '{key}=' line, found {n}")
        # Debian's package points the proxy at a system-wide zurl (its HTTP
        # client to origins); run one of this instance's own instead.
        conf, n = re.subn(r"(?m)^services=.*$", "services=condure,zurl,pushpin-proxy,pushpin-handler", conf)
        zurl = "\n".join(f"{k}=ipc://{{rundir}}/{{ipc_prefix}}{v}" for k, v in (
            ("zurl_out_specs", "zurl-in"), ("zurl_out_stream_specs", "zurl-in-stream"),
            ("zurl_in_specs", "zurl-out")))
        conf, m = re.subn(r"(?m)^\[proxy\]$", "[proxy]\n" + zurl, conf)
        if n != 1 or m != 1:
            raise BenchError("pushpin.conf: no 'services=' line or no [proxy] section")
        (d / "pushpin.conf").write_text(conf)
        p = self.add(Proc(name, ["pushpin", "--config", str(d / "pushpin.conf")], self.run_dir))
        try:
            wait_tcp(http_port, 30, "pushpin", p)
            wait_tcp(pub_port, 30, "pushpin (publish)", p)
        except BenchError:
            self.stop(p)
            raise
        # Listening is not ready: requests sent before its zurl is connected
        # get 502. Wait until a held stream really opens.
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", http_port), timeout=2) as c:
                    c.sendall(b"GET /grip/probe HTTP/1.1\r\nHost: pushpin\r\nAccept: text/event-stream\r\n\r\n")
                    if c.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("pushpin did not open a held stream within 30 s; see its logs in " + str(d / "log"))
            time.sleep(0.2)
        return {"proc": p, "sub": f"http://127.0.0.1:{http_port}/grip",
                "pub": f"http://127.0.0.1:{pub_port}/publish/"}


def nginx_prelude(d: Path, main: str = "") -> str:
    """The start of an nginx.conf that keeps everything under `d`, up to
    the inside of its `http` block."""
    return f"""
{main}
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 300000;
events {{ worker_connections 150000; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;"""


def peer_versions() -> dict:
    def cmd(args: list[str]) -> str:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=20)
            return (out.stdout + out.stderr).strip()
        except OSError:
            return "?"

    def deb(pkg: str) -> str:
        return cmd(["dpkg-query", "-W", "-f=${Version}", pkg]) or "?"

    rustc = cmd(["rustc", "--version"]).removeprefix("rustc ")
    return {"nginx": deb("nginx"), "Pushpin": deb("pushpin"), "Nchan (libnginx-mod-nchan)": deb("libnginx-mod-nchan"),
            "rustc": rustc, "Python": platform.python_version()}


def machine() -> dict:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kib / 1024 / 1024, 1), "cpu": model,
            "kernel": platform.release()}


# ---------------------------------------------------------------- scenarios


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def scenario_a(s: Systems, cfg: dict, targets: dict, runs: int, extra: tuple[str, ...] = (),
               label: str = "A") -> dict:
    """Request overhead: tools/call on one session, jwt mode with a cached
    token. `extra`: more load generator arguments (`--ca-file`)."""
    out: dict[str, list] = {k: [] for k in targets}
    for r in range(runs):
        token = s.tokens(1)[0]
        for name, (url, procs) in targets.items():
            pids = [pid for p in procs for pid in p.pids()]
            c0 = cpu_seconds(pids)
            res = loadgen_json(["rpc", "--url", url, "--concurrency", "64", "--duration", cfg["a_duration"],
                                "--warmup", cfg["a_warmup"], "--init", "--token", token, *extra], timeout=600)
            res["cpu_us_per_request"] = (cpu_seconds(pids) - c0) * 1e6 / max(res["ok"], 1) if procs else None
            log(f"{label} run {r + 1} {name}: {res['rps']:.0f} req/s, p50 {res['latency']['p50_us']} µs, "
                f"p99 {res['latency']['p99_us']} µs, errors {res['errors']}")
            out[name].append(res)
    return out


def scenario_t(s: Systems, cfg: dict, stub: str, runs: int) -> dict:
    """TLS (issue 18): scenario A over HTTPS, the gateway beside nginx with
    the same certificate, both asked by the same rustls client (so the same
    TLS 1.3 suite and key exchange), and both over plain HTTP in the same
    run; then B's bytes per idle stream over HTTPS beside plain HTTP,
    each on a fresh gateway, N = c_size."""
    tls = s.tls_files()
    gw_tls = s.start_gateway("gateway-t-https", stub, tls=tls)
    gw_plain = s.start_gateway("gateway-t-http", stub)
    nginx_tls = s.start_nginx_proxy(tls=tls)
    nginx_plain = s.nginx_proxy_url if s.nginx_proxy else s.start_nginx_proxy()
    out: dict = {"rpc": scenario_a(s, cfg, {
        "gateway https": (f"{gw_tls['base']}/jwt/mcp", [gw_tls["proc"]]),
        "nginx https": (nginx_tls, [s.nginx_proxy_tls]),
        "gateway http": (f"{gw_plain['base']}/jwt/mcp", [gw_plain["proc"]]),
        "nginx http": (nginx_plain, [s.nginx_proxy]),
    }, runs, extra=("--ca-file", tls["ca"]), label="T"), "streams": {"https": [], "http": []}}
    for p in (gw_tls, gw_plain):
        s.stop(p["proc"])
    n = cfg["c_size"]
    for r in range(runs):
        for scheme in ("https", "http"):
            gw = s.start_gateway(f"gateway-t{r}-{scheme}", stub, tls=tls if scheme == "https" else None)
            token = s.tokens(1)[0]
            args = ["--stream-url", f"{gw['base']}/jwt/mcp", "--publish-url", gw["admin"], "--token", token,
                    "--secret", PUBLISH_SECRET, "--ca-file", tls["ca"]]
            try:
                res = hold_streams(s, "gateway", n, args, gw["proc"], cfg["idle_seconds"], fanout=True)
            finally:
                s.stop(gw["proc"])
            log(f"T streams run {r + 1} {scheme}: {res['per_stream_pss_bytes']:.0f} B/stream")
            out["streams"][scheme].append(res)
    return out


def scenario_w(s: Systems, cfg: dict, stub: str, runs: int) -> dict:
    """WebSocket (issue 21): B's bytes per idle stream when each session's
    stream is held over a WebSocket (`/ws`, resuming the session), beside a
    GET (SSE) stream, each on a fresh gateway, N = c_size; then C's fan-out
    to them."""
    n = cfg["c_size"]
    out: dict[str, list] = {"sse": [], "websocket": []}
    for r in range(runs):
        for kind in ("sse", "websocket"):
            gw = s.start_gateway(f"gateway-w{r}-{kind}", stub)
            token = s.tokens(1)[0]
            args = ["--stream-url", f"{gw['base']}/jwt/mcp", "--publish-url", gw["admin"], "--token", token,
                    "--secret", PUBLISH_SECRET, *(["--websocket"] if kind == "websocket" else [])]
            try:
                res = hold_streams(s, "gateway", n, args, gw["proc"], cfg["idle_seconds"], fanout=True)
            finally:
                s.stop(gw["proc"])
            log(f"W run {r + 1} {kind}: {res['per_stream_pss_bytes']:.0f} B/stream")
            out[kind].append(res)
    return out


ERAS = ("stateless-2025", "stateful-2025", "modern")


def scenario_f(s: Systems, cfg: dict, gw: dict, runs: int) -> dict:
    """Era bridge: a 2025 client's tools/call on one session, through the
    gateway, to a stub of each upstream era (no auth, so only the bridge
    differs)."""
    out: dict[str, list] = {era: [] for era in ERAS}
    pids = gw["proc"].pids()
    for r in range(runs):
        for era in ERAS:
            c0 = cpu_seconds(pids)
            res = loadgen_json(["rpc", "--url", f"{gw['base']}/{era}/mcp", "--concurrency", "64",
                                "--duration", cfg["a_duration"], "--warmup", cfg["a_warmup"], "--init"],
                               timeout=600)
            res["cpu_us_per_request"] = (cpu_seconds(pids) - c0) * 1e6 / max(res["ok"], 1)
            log(f"F run {r + 1} {era}: {res['rps']:.0f} req/s, p50 {res['latency']['p50_us']} µs, "
                f"p99 {res['latency']['p99_us']} µs, errors {res['errors']}")
            out[era].append(res)
    return out


def scenario_g(s: Systems, cfg: dict, gw: dict, runs: int) -> dict:
    """Federation (issue 17): an org of 3 stub servers. Cold session set-up
    (initialize, initialized, tools/list) on the federated endpoint beside
    each server's own endpoint; tools/call throughput through the
    federated endpoint beside a server's endpoint. No auth."""
    out: dict[str, list] = {"setup": [], "rpc": []}
    base = f"{gw['base']}/fed"
    for r in range(runs):
        setup = {}
        for name, url in [("federated", f"{base}/mcp")] + [(f"server s{i}", f"{base}/s{i}/mcp") for i in (1, 2, 3)]:
            res = loadgen_json(["setup", "--url", url, "--concurrency", "1", "--duration", cfg["d_duration"],
                                "--warmup", "1s"], timeout=600)
            log(f"G run {r + 1} set-up {name}: p50 {res['latency']['p50_us']} µs, "
                f"p99 {res['latency']['p99_us']} µs, errors {res['errors']}")
            setup[name] = res
        out["setup"].append(setup)
        rpc = {}
        pids = gw["proc"].pids()
        for name, url, tool in [("server s1", f"{base}/s1/mcp", "echo"), ("federated", f"{base}/mcp", "s1__echo")]:
            c0 = cpu_seconds(pids)
            res = loadgen_json(["rpc", "--url", url, "--tool", tool, "--concurrency", "64",
                                "--duration", cfg["a_duration"], "--warmup", cfg["a_warmup"], "--init"], timeout=600)
            res["cpu_us_per_request"] = (cpu_seconds(pids) - c0) * 1e6 / max(res["ok"], 1)
            log(f"G run {r + 1} tools/call {name}: {res['rps']:.0f} req/s, p50 {res['latency']['p50_us']} µs, "
                f"errors {res['errors']}")
            rpc[name] = res
        out["rpc"].append(rpc)
    return out


def scenario_i(cfg: dict, run_dir: Path) -> dict:
    """Instructions per `tools/call` of the stub, nginx and the gateway
    (`bench/callgrind-a`, which starts its own processes under callgrind).
    Counts repeat within about 1%, so one run is enough."""
    out = run_dir / "callgrind-a.json"
    env = {**os.environ, "N": str(cfg["i_requests"]), "JSON": str(out)}
    done = subprocess.run([str(BENCH / "callgrind-a")], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise BenchError(f"bench/callgrind-a failed: {(done.stderr or done.stdout)[-2000:]}")
    counts = json.loads(out.read_text())
    if BASELINE_BIN:
        env["RATATOSK_GATEWAY_BIN"] = BASELINE_BIN
        done = subprocess.run([str(BENCH / "callgrind-a")], env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise BenchError(f"bench/callgrind-a (baseline) failed: {(done.stderr or done.stdout)[-2000:]}")
        counts[BASELINE] = json.loads(out.read_text())["gateway"]
    return counts


def scenario_d(s: Systems, cfg: dict, targets: dict, runs: int) -> dict:
    out: dict[str, list] = {k: [] for k in targets}
    for r in range(runs):
        token = s.tokens(1)[0]
        for name, url in targets.items():
            res = loadgen_json(["setup", "--url", url, "--concurrency", "1", "--duration", cfg["d_duration"],
                                "--warmup", "1s", "--token", token], timeout=600)
            log(f"D run {r + 1} {name}: p50 {res['latency']['p50_us']} µs, p99 {res['latency']['p99_us']} µs, "
                f"errors {res['errors']}")
            out[name].append(res)
    return out


def hold_streams(s: Systems, system: str, n: int, args: list[str], proc: Proc,
                 idle_seconds: float, fanout: bool, fanouts: int = 1, on_phase=None, extra=None) -> dict:
    """Scenario B (and C when `fanout`): hold n idle streams on one system.
    `fanouts` > 1 fans out again (results in `fanout`, then `fanout_2`, ...);
    `on_phase(phase)` is called at "base" (before anything is opened),
    "sessions" (gateway), "held", and "fanout", "fanout_2", ... (scenario R
    reads Redis then); `extra(loadgen, res)` runs last, streams still held."""
    phase = on_phase or (lambda _: None)
    phase("base")
    base_mem = memory_kib(proc.pids())
    lg = Loadgen(s.run_dir, ["--system", system, "--n", str(n), *args], f"loadgen-{system}-{n}")
    try:
        res: dict = {"n": n, "base": base_mem}
        if system == "gateway":
            ses = lg.read(600)
            res["sessions_seconds"] = ses["seconds"]
            time.sleep(1)
            res["after_sessions"] = memory_kib(proc.pids())
            phase("sessions")
            lg.send("go")
        opened = lg.read(600)
        res["open"] = opened
        if opened["failed"]:
            log(f"B {system} N={n}: {opened['failed']} streams failed to open: {opened['first_failure']}")
        time.sleep(2)
        pids = proc.pids()
        c0 = cpu_seconds(pids)
        time.sleep(idle_seconds)
        res["idle_cpu_percent"] = (cpu_seconds(pids) - c0) * 100 / idle_seconds
        res["held"] = memory_kib(pids)
        lg.send("status")
        status = lg.read(60)
        res["closed_while_idle"] = status["closed"]
        if status["closed"]:
            log(f"B {system} N={n}: {status['closed']} streams closed while idle")
        held = max(opened["opened"] - status["closed"], 1)
        res["held_streams"] = held
        for key in ("rss_kib", "pss_kib"):
            res[f"per_stream_{key[:3]}_bytes"] = (res["held"][key] - base_mem[key]) * 1024 / held
        if system == "gateway":
            for key in ("rss_kib", "pss_kib"):
                res[f"per_stream_only_{key[:3]}_bytes"] = (
                    (res["held"][key] - res["after_sessions"][key]) * 1024 / held)
        log(f"B {system} N={n}: {res['per_stream_pss_bytes']:.0f} B/stream (PSS delta), "
            f"idle CPU {res['idle_cpu_percent']:.2f}%")
        phase("held")
        for k in range(fanouts if fanout else 0):
            key = "fanout" if k == 0 else f"fanout_{k + 1}"
            lg.send("fanout")
            fo = lg.read(300)
            res[key] = fo
            log(f"C {system} N={n}{'' if k == 0 else f' (fan-out {k + 1})'}: p50 {fo['latency']['p50_us']} µs, "
                f"p99 {fo['latency']['p99_us']} µs, all in {fo['all_delivered_seconds'] * 1000:.0f} ms, "
                f"lost {fo['lost']}, publish errors {fo['publish_errors']}"
                + (f" ({fo['first_error']})" if fo.get("first_error") else ""))
            phase(key)
        if extra is not None:
            extra(lg, res)
        return res
    finally:
        lg.quit()
        time.sleep(1)


def scenario_bc(s: Systems, cfg: dict, runs: int, stub: str) -> dict:
    """Each run holds its streams on a freshly started system, so the memory
    it grows by is that run's alone (allocators keep what they freed)."""
    out: dict = {}
    for n in cfg["b_sizes"]:
        for r in range(runs):
            for name in ("gateway", "pushpin", "nchan"):
                if name == "gateway":
                    gw = s.start_gateway(f"gateway-b{n}-{r}", stub)
                    token = s.tokens(1)[0]
                    proc, args = gw["proc"], ["--stream-url", f"{gw['base']}/jwt/mcp", "--publish-url",
                                              gw["admin"], "--token", token, "--secret", PUBLISH_SECRET]
                elif name == "pushpin":
                    pp = s.start_pushpin(f"pushpin-b{n}-{r}")
                    proc, args = pp["proc"], ["--stream-url", pp["sub"], "--publish-url", pp["pub"]]
                else:
                    nc = s.start_nchan(f"nchan-b{n}-{r}")
                    proc, args = nc["proc"], ["--stream-url", nc["sub"], "--publish-url", nc["pub"]]
                try:
                    # C at every N too: the scaling of both (issue 19).
                    res = hold_streams(s, name, n, args, proc, cfg["idle_seconds"], fanout=True)
                finally:
                    s.stop(proc)
                out.setdefault(name, {}).setdefault(str(n), []).append(res)
    return out


R_PATHS = ("1 node, memory", "1 node, redis", "2 nodes, redis")
R_EVENT_LOG = 64  # sessions.event_log_size of every bench gateway
R_FILL = R_EVENT_LOG + 6  # events published to each session in all, to see its log at its bound


def scenario_r(s: Systems, cfg: dict, gw: dict, stub: str, runs: int) -> dict:
    """Issue 6: scenarios A, B and C with two gateway nodes sharing their
    sessions through Redis, beside the single-node gateway `gw` (memory
    store). jwt org, one cached token per run, like scenario A."""
    out: dict = {"date": time.strftime("%Y-%m-%d"), "runs": runs, "n": cfg["c_size"],
                 "a_duration": cfg["a_duration"], "a_warmup": cfg["a_warmup"],
                 "rpc": {"json": {k: [] for k in R_PATHS}, "sse": {k: [] for k in R_PATHS}}, "streams": []}
    redis = s.start_redis("redis-r")
    r1 = s.start_redis_gateway("gateway-r1", stub, redis)
    r2 = s.start_redis_gateway("gateway-r2", stub, redis)
    try:
        for r in range(runs):
            token = s.tokens(1)[0]
            for answer in ("json", "sse"):
                for name in R_PATHS:
                    if name == "1 node, memory":
                        nodes, urls = {"gateway": gw}, [f"{gw['base']}/jwt/mcp"]
                    else:
                        # Both nodes run in both redis rows (node 2 idles in the
                        # first); their CPU is summed.
                        nodes = {"node 1": r1, "node 2": r2}
                        urls = [f"{r1['base']}/jwt/mcp"] + ([f"{r2['base']}/jwt/mcp"] if name.startswith("2") else [])
                    res = r_rpc(cfg, token, urls, answer == "sse", nodes,
                                redis if name.endswith("redis") else None)
                    log(f"R run {r + 1} {answer} {name}: {res['rps']:.0f} req/s, p50 {res['latency']['p50_us']} µs, "
                        f"p99 {res['latency']['p99_us']} µs, gateway CPU {res['cpu_us_per_request']:.1f} µs/req, "
                        f"errors {res['errors']}" + (f" ({res['first_error']})" if res["errors"] else ""))
                    out["rpc"][answer][name].append(res)
            out["streams"].append(r_streams(s, cfg, stub, token, r))
    finally:
        for p in (r2, r1, redis):
            s.stop(p["proc"])
    return out


def r_rpc(cfg: dict, token: str, urls: list[str], sse: bool, nodes: dict, redis: dict | None) -> dict:
    """`rpc --init` on urls[0] (the session's node), its workers spread over
    `urls`; CPU per request of the gateway nodes and of redis-server."""
    procs = {k: g["proc"] for k, g in nodes.items()}
    pids = {k: p.pids() for k, p in procs.items()}
    rpids = redis["proc"].pids() if redis else []
    c0 = {k: cpu_seconds(v) for k, v in pids.items()}
    rc0 = cpu_seconds(rpids)
    cmd0 = redis_commands(redis["port"]) if redis else 0
    calls0 = redis_command_calls(redis["port"]) if redis else {}
    args = ["rpc", "--url", urls[0], *[x for u in urls[1:] for x in ("--also-url", u)], "--concurrency", "64",
            "--duration", cfg["a_duration"], "--warmup", cfg["a_warmup"], "--init", "--token", token]
    res = loadgen_json(args + (["--sse"] if sse else []), timeout=600)
    ok = max(res["ok"], 1)
    res["nodes"] = len(urls)
    res["node_cpu_us_per_request"] = {k: (cpu_seconds(v) - c0[k]) * 1e6 / ok for k, v in pids.items()}
    res["cpu_us_per_request"] = sum(res["node_cpu_us_per_request"].values())
    if redis:
        res["redis_cpu_us_per_request"] = (cpu_seconds(rpids) - rc0) * 1e6 / ok
        res["redis_commands_per_request"] = (redis_commands(redis["port"]) - cmd0) / ok
        calls = redis_command_calls(redis["port"])
        res["redis_calls_per_request"] = {k: (v - calls0.get(k, 0)) / ok for k, v in sorted(calls.items())
                                          if k not in ("info", "dbsize") and v > calls0.get(k, 0)}
    return res


def r_streams(s: Systems, cfg: dict, stub: str, token: str, r: int) -> dict:
    """B and C across nodes: N sessions and streams held on node 1, one
    message to each published through node 2's admin API, twice. A fresh
    Redis and fresh nodes, so the memory measured is this run's alone."""
    n = cfg["c_size"]
    redis = s.start_redis(f"redis-rs{r}")
    n1 = s.start_redis_gateway(f"gateway-rs{r}-node1", stub, redis)
    n2 = s.start_redis_gateway(f"gateway-rs{r}-node2", stub, redis)
    mem: dict[str, dict] = {}

    def on_phase(phase: str) -> None:
        if phase.startswith("fanout") or phase == "full":
            time.sleep(1)  # the bus's output buffers drain
        mem[phase] = redis_memory(redis["port"])
        if phase in ("sessions", "fanout", "fanout_2", "full"):
            mem[phase]["sample"] = redis_key_sample(redis["port"])

    def fill(lg: Loadgen, res: dict) -> None:
        """More fan-outs, until each session's log has had R_FILL events:
        the log at its bound (event_log_size)."""
        t0, rounds = time.monotonic(), R_FILL - 2
        agg = {"rounds": rounds, "delivered_min": n, "lost": 0, "publish_errors": 0, "first_error": None}
        for _ in range(rounds):
            lg.send("fanout")
            fo = lg.read(300)
            agg["delivered_min"] = min(agg["delivered_min"], fo["delivered"])
            agg["lost"] += fo["lost"]
            agg["publish_errors"] += fo["publish_errors"]
            agg["first_error"] = agg["first_error"] or fo["first_error"]
        agg["seconds"] = time.monotonic() - t0
        res["fill"] = agg
        log(f"R fill: {rounds} more fan-outs in {agg['seconds']:.0f} s, lost {agg['lost']}, "
            f"publish errors {agg['publish_errors']}" + (f" ({agg['first_error']})" if agg["first_error"] else ""))
        on_phase("full")

    try:
        args = ["--stream-url", f"{n1['base']}/jwt/mcp", "--publish-url", n2["admin"], "--token", token,
                "--secret", PUBLISH_SECRET]
        res = hold_streams(s, "gateway", n, args, n1["proc"], cfg["idle_seconds"], fanout=True, fanouts=2,
                           on_phase=on_phase, extra=fill)
    finally:
        for p in (n2, n1, redis):
            s.stop(p["proc"])
    res["redis"] = mem

    def per(a: str, b: str, items: int, what: str = "used_memory") -> float:
        return (mem[b][what] - mem[a][what]) / max(items, 1)

    held = res["held_streams"]
    res["redis_keys_per_session"] = (mem["sessions"]["keys"] - mem["base"]["keys"]) / n
    for what, suffix in (("used_memory", ""), ("used_memory_dataset", "_dataset")):
        res[f"redis_bytes_per_session{suffix}"] = per("base", "sessions", n, what)
        res[f"redis_bytes_per_stream{suffix}"] = per("sessions", "held", held, what)
        res[f"redis_bytes_per_1000_events{suffix}"] = per("held", "fanout", res["fanout"]["delivered"], what) * 1000
        res[f"redis_bytes_per_1000_events_2{suffix}"] = per("fanout", "fanout_2", res["fanout_2"]["delivered"],
                                                            what) * 1000
        # Every session's log at its bound: what it holds per session, and
        # per 1,000 events it keeps (R_EVENT_LOG each).
        res[f"redis_bytes_per_full_log{suffix}"] = per("held", "full", n, what)
        res[f"redis_bytes_per_1000_kept_events{suffix}"] = per("held", "full", n * R_EVENT_LOG, what) * 1000
    res["redis_full_log_entries"] = mem["full"]["sample"].get("stream", {}).get("entries")
    log(f"R run {r + 1} Redis: {res['redis_bytes_per_session']:.0f} B/session "
        f"({res['redis_keys_per_session']:.1f} keys), {res['redis_bytes_per_stream']:.0f} B/stream, "
        f"{res['redis_bytes_per_1000_events']:,.0f} B per 1,000 first events, "
        f"{res['redis_bytes_per_1000_events_2']:,.0f} B per 1,000 second events, "
        f"{res['redis_bytes_per_full_log']:,.0f} B per full log ({res['redis_full_log_entries']} entries)")
    return res


def scenario_e(s: Systems, cfg: dict, gw_cached: dict, gw_uncached: dict, runs: int) -> dict:
    out: dict[str, list] = {"cache on": [], "cache off": []}
    for r in range(runs):
        tokens = s.tokens(cfg["e_tokens"])
        path = s.run_dir / "tokens.txt"
        path.write_text("\n".join(tokens) + "\n")
        for name, gw in (("cache on", gw_cached), ("cache off", gw_uncached)):
            before = introspections(gw)
            res = loadgen_json(["rpc", "--url", f"{gw['base']}/introspect/mcp", "--concurrency", "64",
                                "--requests", str(cfg["e_requests"]), "--tokens-file", str(path), "--init",
                                "--method", "tools/list"], timeout=900)
            res["introspections"] = introspections(gw) - before
            res["distinct_tokens"] = len(tokens)
            log(f"E run {r + 1} {name}: {res['introspections']} introspections for {res['ok']} requests "
                f"({len(tokens)} tokens), p99 {res['latency']['p99_us']} µs, errors {res['errors']}")
            out[name].append(res)
    return out


def introspections(gw: dict) -> int:
    status, body = http("GET", f"{gw['admin']}/metrics")
    if status != 200:
        raise BenchError(f"gateway /metrics answered {status}")
    for line in body.decode().splitlines():
        if re.match(r"^\w*auth_introspections_total(\{[^}]*\})? ", line):
            return int(float(line.split()[-1]))
    raise BenchError("gateway /metrics has no auth_introspections_total")


# ---------------------------------------------------------------- report


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def med(runs: list[dict], *path: str) -> float:
    vals = []
    for r in runs:
        v = r
        for p in path:
            v = v[p]
        vals.append(v)
    return median(vals)


def rpc_row(name: str, runs: list[dict], *bases: float) -> str:
    """A table row of a request scenario: req/s, p50, p99, CPU per request,
    then req/s over each of `bases`."""
    rps = med(runs, "rps")
    cpu = median([r["cpu_us_per_request"] for r in runs if r.get("cpu_us_per_request") is not None])
    cpu_s = "-" if cpu != cpu else f"{cpu:.1f} µs"
    ratios = "".join(f" {rps / b:.2f} |" for b in bases)
    return (f"| {name} | {rps:,.0f} | {fmt_us(med(runs, 'latency', 'p50_us'))} | "
            f"{fmt_us(med(runs, 'latency', 'p99_us'))} | {cpu_s} |{ratios}")


def per_run(xs: list[dict], ys: list[dict], key: str = "rps") -> list[float]:
    """`key` of x ÷ `key` of y, run by run (same run, same moment)."""
    return [x[key] / y[key] for x, y in zip(xs, ys)]


def fmt_ratios(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def goals_and_tables(res: dict) -> tuple[list[str], list[tuple[str, str, str, bool | None]]]:
    lines: list[str] = []
    goals: list[tuple[str, str, str, bool | None]] = []
    a = res.get("A")
    if a:
        lines += ["### A. Request overhead (`tools/call` on one session, 64 connections)", "",
                  "| path | req/s | p50 | p99 | CPU of the proxy per request | req/s vs direct | req/s vs nginx |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        direct, nginx = med(a["direct"], "rps"), med(a["nginx"], "rps")
        lines += [rpc_row(name, runs, direct, nginx) for name, runs in a.items()]
        lines.append("")
        # Ratios per run (same run, same moment), then their median.
        per_run_direct = per_run(a["gateway"], a["direct"])
        per_run_nginx = per_run(a["gateway"], a["nginx"])
        lines.append(f"Gateway ÷ direct per run: {fmt_ratios(per_run_direct)}; "
                     f"gateway ÷ nginx per run: {fmt_ratios(per_run_nginx)}.")
        if BASELINE in a:
            lines.append(f"The baseline is {res['meta'].get('baseline', 'another build')}, run beside the "
                         f"gateway: gateway ÷ baseline per run: {fmt_ratios(per_run(a['gateway'], a[BASELINE]))} "
                         f"(req/s), {fmt_ratios(per_run(a['gateway'], a[BASELINE], 'cpu_us_per_request'))} (CPU per request); "
                         f"baseline ÷ nginx per run: {fmt_ratios(per_run(a[BASELINE], a['nginx']))} (req/s).")
        lines.append("")
        goals.append(("A", "gateway throughput ≥ 0.8 × direct", f"{median(per_run_direct):.2f} ×",
                      median(per_run_direct) >= 0.8))
        goals.append(("A", "gateway throughput ≥ nginx proxy_pass", f"{median(per_run_nginx):.2f} ×",
                      median(per_run_nginx) >= 1.0))
        cpu_vs = median(per_run(a["gateway"], a["nginx"], "cpu_us_per_request"))
        goals.append(("A", "gateway CPU per request ≤ nginx's", f"{cpu_vs:.2f} ×", cpu_vs <= 1.0))
    i = res.get("I")
    if i:
        nginx_own = i["nginx"]["proxy"]
        lines += ["### I. Instructions per `tools/call` (scenario A's shape, under callgrind)", "",
                  f"`bench/callgrind-a`: each process under `valgrind --tool=callgrind`, {i['requests']:,} "
                  f"requests on {i['connections']} connections after a warm-up, counters zeroed in between; the "
                  "gateway's org has `auth: none` (A's `jwt` route adds a cached validation). Instruction counts "
                  "repeat within about 1% from run to run, where wall-clock figures here do not.", "",
                  "| path | the proxy's instructions per request | the stub's | proxy ÷ nginx |",
                  "| --- | --- | --- | --- |"]
        for name in ("direct", "nginx", "gateway", BASELINE):
            if name not in i:
                continue
            own = i[name]["proxy"]
            ratio = f"{own / nginx_own:.2f} ×" if name != "direct" and nginx_own else ""
            shown = f"{own:,}" if name != "direct" else "(no proxy)"
            lines.append(f"| {name} | {shown} | {i[name]['stub']:,} | {ratio} |")
        lines.append("")
        if nginx_own:
            ratio = i["gateway"]["proxy"] / nginx_own
            goals.append(("A", "gateway instructions per request ≤ nginx's", f"{ratio:.2f} ×", ratio <= 1.0))
    t = res.get("T")
    if t:
        rpc = t["rpc"]
        lines += ["### T. Over TLS (`tools/call` on one session, 64 connections; idle streams)", "",
                  "The gateway and nginx serve the same P-256 certificate, and one rustls client (the load "
                  "generator) talks to both, so both settle on the same TLS 1.3 suite and key exchange; "
                  "connections are kept alive, so this is the cost of TLS records, not of handshakes. The "
                  "gateway over plain HTTP ran in the same run.", "",
                  "| path | req/s | p50 | p99 | CPU of the proxy per request | req/s vs nginx https |",
                  "| --- | --- | --- | --- | --- | --- |"]
        nginx = med(rpc["nginx https"], "rps")
        lines += [rpc_row(name, runs, nginx) for name, runs in rpc.items()]
        lines.append("")
        vs_nginx = per_run(rpc["gateway https"], rpc["nginx https"])
        cpu_vs = per_run(rpc["gateway https"], rpc["nginx https"], "cpu_us_per_request")
        tls_cost = per_run(rpc["gateway https"], rpc["gateway http"])
        lines.append(f"Gateway https ÷ nginx https per run: {fmt_ratios(vs_nginx)} (req/s), "
                     f"{fmt_ratios(cpu_vs)} (CPU per request); gateway https ÷ gateway http: "
                     f"{fmt_ratios(tls_cost)} (req/s).")
        if "nginx http" in rpc:
            added = {name: median([tls["cpu_us_per_request"] - plain["cpu_us_per_request"]
                                   for tls, plain in zip(rpc[f"{name} https"], rpc[f"{name} http"])])
                     for name in ("gateway", "nginx")}
            lines.append(f"CPU that TLS adds per request (https − http, same run, median): gateway "
                         f"{added['gateway']:.1f} µs, nginx {added['nginx']:.1f} µs.")
        lines.append("")
        goals.append(("T", "gateway https throughput ≥ nginx https", f"{median(vs_nginx):.2f} ×",
                      median(vs_nginx) >= 1.0))
        goals.append(("T", "gateway https CPU per request ≤ nginx https", f"{median(cpu_vs):.2f} ×",
                      median(cpu_vs) <= 1.0))
        streams = t.get("streams", {})
        if streams.get("https") and streams.get("http"):
            n = streams["https"][0]["n"]
            lines += [f"Idle streams over TLS, N = {n:,} (growth of the gateway's memory while they are held, "
                      "÷ N, session included; median of runs):", "",
                      "| listener | bytes per stream (PSS) | bytes per stream, stream only | C: fan-out p99 |",
                      "| --- | --- | --- | --- |"]
            for scheme in ("http", "https"):
                runs = streams[scheme]
                p99 = median([r["fanout"]["latency"]["p99_us"] for r in runs if "fanout" in r])
                lines.append(f"| {scheme} | {med(runs, 'per_stream_pss_bytes'):,.0f} | "
                             f"{med(runs, 'per_stream_only_pss_bytes'):,.0f} | {fmt_us(p99)} |")
            lines.append("")
    w = res.get("W")
    if w and w.get("sse") and w.get("websocket"):
        n = w["sse"][0]["n"]
        lines += [f"### W. Idle streams over a WebSocket, N = {n:,}", "",
                  "Each session's stream held over a WebSocket (`/ws`, resuming the session) beside a GET "
                  "(SSE) stream, each on a fresh gateway in the same run; growth of the gateway's memory while "
                  "they are held, ÷ N (median of runs); the client answers the gateway's pings.", "",
                  "| transport | bytes per stream (PSS) | bytes per stream, stream only | C: fan-out p99 |",
                  "| --- | --- | --- | --- |"]
        for kind in ("sse", "websocket"):
            runs = w[kind]
            p99 = median([r["fanout"]["latency"]["p99_us"] for r in runs if "fanout" in r])
            lines.append(f"| {kind} | {med(runs, 'per_stream_pss_bytes'):,.0f} | "
                         f"{med(runs, 'per_stream_only_pss_bytes'):,.0f} | {fmt_us(p99)} |")
        ratios = per_run(w["websocket"], w["sse"], "per_stream_pss_bytes")
        lines += ["", f"WebSocket ÷ SSE bytes per stream, per run: {fmt_ratios(ratios)}.", ""]
    bc = res.get("BC")
    if bc:
        lines += ["### B. Idle SSE streams", "",
                  "Memory is the growth of the system's memory from before the streams to while they are "
                  "held, divided by N. PSS shares shared pages out between processes (RSS would count "
                  "nginx's shared memory zone once per worker); for the one-process gateway the two agree. "
                  "The gateway row includes a session per stream (MCP streams belong to sessions); "
                  "\"stream only\" leaves the sessions out.", "",
                  "| N | system | streams held (min of runs) | bytes per stream (PSS) | bytes per stream (RSS) | total RSS ÷ N | idle CPU | gateway ÷ this |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n in sorted({int(k) for v in bc.values() for k in v}):
            gw_runs = bc.get("gateway", {}).get(str(n), [])
            gw_pss = med(gw_runs, "per_stream_pss_bytes") if gw_runs else float("nan")
            for name in ("gateway", "pushpin", "nchan"):
                runs = bc.get(name, {}).get(str(n))
                if not runs:
                    continue
                pss, rss = med(runs, "per_stream_pss_bytes"), med(runs, "per_stream_rss_bytes")
                total = median([r["held"]["rss_kib"] * 1024 / n for r in runs])
                cpu = med(runs, "idle_cpu_percent")
                label = name
                if name == "gateway":
                    only = med(runs, "per_stream_only_pss_bytes")
                    label = f"gateway (stream only: {only:,.0f} B)"
                ratio = "-" if name == "gateway" else f"{gw_pss / pss:.2f}"
                held = min(r.get("held_streams", n) for r in runs)
                lines.append(f"| {n:,} | {label} | {held:,} | {pss:,.0f} | {rss:,.0f} | {total:,.0f} | {cpu:.2f} % | {ratio} |")
            if gw_runs:
                goals.append(("B", f"≤ 6.5 KiB gateway memory per idle stream (N = {n:,})", f"{gw_pss / 1024:.1f} KiB",
                              gw_pss <= 6.5 * 1024))
                pp = bc.get("pushpin", {}).get(str(n))
                if pp:
                    ratio = gw_pss / med(pp, "per_stream_pss_bytes")
                    goals.append(("B", f"≤ 0.5 × Pushpin's memory per stream (N = {n:,})", f"{ratio:.2f} ×",
                                  ratio <= 0.5))
        lines.append("")
        c_rows = []
        for name in ("gateway", "pushpin", "nchan"):
            for n, runs in bc.get(name, {}).items():
                fo = [r["fanout"] for r in runs if "fanout" in r]
                if fo:
                    c_rows.append((name, int(n), fo))
        if c_rows:
            lines += ["### C. Fan-out: one message published to each of N streams", "",
                      "Each system gets N publish requests (one per stream, 32 connections) through its own "
                      "publish API; latency is from sending a message's publish request to its arrival on its "
                      "stream, measured in the one load-generator process.", "",
                      "| N | system | p50 | p99 | max | until all N have it | lost | p99 gateway ÷ this |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            gw_p99 = {n: median([f["latency"]["p99_us"] for f in fo]) for name, n, fo in c_rows if name == "gateway"}
            for name, n, fo in c_rows:
                p99 = median([f["latency"]["p99_us"] for f in fo])
                ratio = "-" if name == "gateway" or n not in gw_p99 else f"{gw_p99[n] / p99:.2f}"
                lines.append(
                    f"| {n:,} | {name} | {fmt_us(median([f['latency']['p50_us'] for f in fo]))} | {fmt_us(p99)} | "
                    f"{fmt_us(median([f['latency']['max_us'] for f in fo]))} | "
                    f"{median([f['all_delivered_seconds'] for f in fo]) * 1000:.0f} ms | "
                    f"{sum(f['lost'] for f in fo)} | {ratio} |")
                if name != "gateway" and n in gw_p99:
                    goals.append(("C", f"gateway fan-out p99 ≤ {name}'s (N = {n:,})",
                                  f"{fmt_us(gw_p99[n])} vs {fmt_us(p99)}", gw_p99[n] <= p99))
            lines.append("")
        lines += scaling_lines(bc)
    d = res.get("D")
    if d:
        lines += ["### D. Session set-up (`initialize` + `notifications/initialized` + `tools/list`, one client)", "",
                  "| path | p50 | p99 | added at p50 |", "| --- | --- | --- | --- |"]
        base = med(d["direct"], "latency", "p50_us")
        for name, runs in d.items():
            p50 = med(runs, "latency", "p50_us")
            lines.append(f"| {name} | {fmt_us(p50)} | {fmt_us(med(runs, 'latency', 'p99_us'))} | "
                         f"{'-' if name == 'direct' else fmt_us(p50 - base)} |")
        added = [g["latency"]["p50_us"] - x["latency"]["p50_us"] for g, x in zip(d["gateway"], d["direct"])]
        goals.append(("D", "gateway adds ≤ 1 ms at p50 to session set-up", fmt_us(median(added)),
                      median(added) <= 1000))
        lines.append("")
    e = res.get("E")
    if e:
        lines += ["### E. Auth: `introspect` mode against the real Keycloak", "",
                  "| cache | requests | distinct tokens | introspections | p50 | p99 | errors |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, runs in e.items():
            lines.append(f"| {name} | {med(runs, 'ok'):,.0f} | {med(runs, 'distinct_tokens'):.0f} | "
                         f"{med(runs, 'introspections'):,.0f} | {fmt_us(med(runs, 'latency', 'p50_us'))} | "
                         f"{fmt_us(med(runs, 'latency', 'p99_us'))} | {sum(r['errors'] for r in runs)} |")
        on = e["cache on"]
        ok = all(r["introspections"] == r["distinct_tokens"] for r in on)
        goals.append(("E", "introspections = distinct tokens, not requests",
                      ", ".join(f"{r['introspections']} for {r['distinct_tokens']}" for r in on), ok))
        lines.append("")
    f = res.get("F")
    if f:
        lines += ["### F. Era bridge (a 2025 client's `tools/call` on one session, 64 connections, no auth)", "",
                  "The same stub upstream speaking each era. `stateful-2025`: every message goes to the "
                  "upstream session pinned to its replica. `modern`: each request gets the session's `_meta` "
                  "and its answer is read for an `InputRequiredResult` and reshaped before the client gets it.",
                  "",
                  "| upstream era | req/s | p50 | p99 | CPU of the gateway per request | req/s vs stateless-2025 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        base = f["stateless-2025"]
        for era, runs in f.items():
            ratios = [x["rps"] / b["rps"] for x, b in zip(runs, base)]
            lines.append(f"| {era} | {med(runs, 'rps'):,.0f} | {fmt_us(med(runs, 'latency', 'p50_us'))} | "
                         f"{fmt_us(med(runs, 'latency', 'p99_us'))} | {med(runs, 'cpu_us_per_request'):.1f} µs | "
                         f"{median(ratios):.2f} |")
        lines.append("")
    r = res.get("R")
    if r:
        lines += r_tables(r, res.get("BC"))
        for answer, path, floor in (("sse", "1 node, redis", 0.7), ("sse", "2 nodes, redis", 0.7),
                                    ("json", "2 nodes, redis", 0.85)):
            paths = r["rpc"].get(answer, {})
            runs, base = paths.get(path), paths.get("1 node, memory")
            if runs and base:
                ratio = median([x["rps"] / b["rps"] for x, b in zip(runs, base)])
                goals.append(("R", f"{'SSE' if answer == 'sse' else 'JSON'} answers, {path} ≥ {floor} × "
                              "1 node in memory (req/s)", f"{ratio:.2f} ×", ratio >= floor))
    return lines, goals


def humantime_seconds(text: str) -> float:
    """"20s", "2s", "500ms", "1m" in seconds."""
    m = re.fullmatch(r"([\d.]+)(ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def per_run_diff(runs: list[dict], base: list[dict], *path: str) -> float:
    """The median of run k's value minus base run k's (same run, same moment)."""
    return median([med([x], *path) - med([b], *path) for x, b in zip(runs, base)])


def signed_us(us: float) -> str:
    return ("+" if us >= 0 else "−") + fmt_us(abs(us))


def r_tables(r: dict, bc: dict | None) -> list[str]:
    """Scenario R's section: A, B and C on two nodes sharing Redis."""
    n = r["n"]
    warmup_note = ""
    if "a_warmup" in r:
        dur, warm = (humantime_seconds(r[k]) for k in ("a_duration", "a_warmup"))
        if warm > 0:
            warmup_note = (f"Per-request figures divide what was counted from the start of the {r['a_warmup']} "
                           f"warm-up by the requests measured in the {r['a_duration']} after it, as in A, so they are "
                           f"about {warm / dur:.0%} high (a Redis command sent once per request shows as "
                           f"{(dur + warm) / dur:.2f}). ")
    lines = ["### R. Two nodes and Redis (issue 6)", "",
             f"Run of {r['date']}, {r['runs']} time(s). Gateway nodes with `sessions: {{store: redis}}` on one "
             "local redis-server (no persistence), against the same stub and jwt org (cached token) as A, "
             "beside the single-node gateway with its sessions in memory. `tools/call` on one session, "
             "64 connections; the session is opened on node 1, and with 2 nodes every other connection "
             "sends to node 2, which finds the session in Redis. SSE: tool `echo_sse`, whose answer is an SSE "
             "stream; with Redis its events go through the session's shared log (a Redis stream) and the "
             "nodes' bus. Gateway CPU is the sum over the nodes running (both redis rows run both nodes; "
             "node 2 idles in \"1 node, redis\"); redis-server's CPU is given apart. " + warmup_note +
             "Ratios and differences are taken per run against \"1 node, memory\" in the same run, then their "
             "median.", "",
             "| answer | path | req/s | p50 | p99 | gateway CPU per request | redis-server CPU per request | "
             "Redis commands per request | req/s ÷ 1 node, memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    added: list[str] = []
    for answer, paths in r["rpc"].items():
        label = "JSON" if answer == "json" else "SSE"
        base = paths["1 node, memory"]
        for name, runs in paths.items():
            if not runs:
                continue
            ratios = [x["rps"] / b["rps"] for x, b in zip(runs, base)]
            redis_cpu = med(runs, "redis_cpu_us_per_request") if "redis_cpu_us_per_request" in runs[0] else None
            cmds = med(runs, "redis_commands_per_request") if "redis_commands_per_request" in runs[0] else None
            lines.append(
                f"| {label} | {name} | {med(runs, 'rps'):,.0f} | {fmt_us(med(runs, 'latency', 'p50_us'))} | "
                f"{fmt_us(med(runs, 'latency', 'p99_us'))} | {med(runs, 'cpu_us_per_request'):.1f} µs | "
                f"{'-' if redis_cpu is None else f'{redis_cpu:.1f} µs'} | {'-' if cmds is None else f'{cmds:.1f}'} | "
                f"{median(ratios):.2f} |")
            if name != "1 node, memory":
                cpu = per_run_diff(runs, base, "cpu_us_per_request")
                added.append(
                    f"| {label} | {name} | {cpu:+.1f} µs | {'-' if redis_cpu is None else f'{redis_cpu:.1f} µs'} | "
                    f"{cpu + (redis_cpu or 0):+.1f} µs | {signed_us(per_run_diff(runs, base, 'latency', 'p50_us'))} | "
                    f"{signed_us(per_run_diff(runs, base, 'latency', 'p99_us'))} | {median(ratios):.2f} |")
    idle = []
    for answer, paths in r["rpc"].items():
        runs = [x for x in paths.get("1 node, redis", []) if "node 2" in x.get("node_cpu_us_per_request", {})]
        if runs:
            idle.append(f"{'JSON' if answer == 'json' else 'SSE'} "
                        f"{median([x['node_cpu_us_per_request']['node 2'] for x in runs]):.1f} µs")
    for answer, paths in r["rpc"].items():
        runs = [x for x in paths.get("1 node, redis", []) if "redis_calls_per_request" in x]
        if runs:
            calls = runs[len(runs) // 2]["redis_calls_per_request"]
            top = sorted(calls.items(), key=lambda kv: -kv[1])
            lines += ["", f"Redis commands per {'JSON' if answer == 'json' else 'SSE'} request by command "
                      f"(\"1 node, redis\", `INFO commandstats`, commands run by scripts included): "
                      + ", ".join(f"`{k}` {v:.2f}" for k, v in top if v >= 0.01) + "."]
    if idle:
        lines += ["", "Node 2's part of the gateway CPU in \"1 node, redis\", where it gets no request, per request "
                  "to node 1: " + ", ".join(idle) + "."]
    lines += ["", "What Redis adds per request, against \"1 node, memory\":", "",
              "| answer | path | gateway CPU | + redis-server CPU | = CPU added | p50 added | p99 added | req/s ratio |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |", *added, ""]
    st = r["streams"]
    if st:
        lines += [f"Streams across nodes (B and C): N = {n:,} sessions and their GET streams held on node 1, "
                  "one message to each published through node 2's admin API (the message crosses Redis), "
                  "then a second one. Each run starts a fresh redis-server and fresh nodes. Memory per stream "
                  "is node 1's growth (PSS) divided by N, with its session and without (\"stream only\").", "",
                  "| N | system | streams held (min of runs) | bytes per stream (PSS) | stream only | idle CPU | "
                  "fan-out p50 | p99 | max | until all N have it | delivered (min) | lost | publish errors |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        rows: list[tuple[str, list[dict], str]] = []
        single = (bc or {}).get("gateway", {}).get(str(n), [])
        single = [x for x in single if "fanout" in x]
        if single:
            rows.append(("1 node, memory (scenario B/C above)", single, "fanout"))
        rows.append(("2 nodes, redis: 1st message", st, "fanout"))
        rows.append(("2 nodes, redis: 2nd message", st, "fanout_2"))
        for label, runs, key in rows:
            fo = [x[key] for x in runs if key in x]
            if not fo:
                continue
            first = key == "fanout"
            mem_cols = (f"{min(x.get('held_streams', n) for x in runs):,} | {med(runs, 'per_stream_pss_bytes'):,.0f} | "
                        f"{med(runs, 'per_stream_only_pss_bytes'):,.0f} | {med(runs, 'idle_cpu_percent'):.2f} %"
                        if first else "same streams | - | - | -")
            lines.append(
                f"| {n:,} | {label} | {mem_cols} | {fmt_us(median([f['latency']['p50_us'] for f in fo]))} | "
                f"{fmt_us(median([f['latency']['p99_us'] for f in fo]))} | "
                f"{fmt_us(median([f['latency']['max_us'] for f in fo]))} | "
                f"{median([f['all_delivered_seconds'] for f in fo]) * 1000:.0f} ms | "
                f"{min(f['delivered'] for f in fo):,} | {sum(f['lost'] for f in fo)} | "
                f"{sum(f['publish_errors'] for f in fo)} |")

        def both(key: str) -> str:
            ds = [x[f"{key}_dataset"] for x in st if f"{key}_dataset" in x]
            return f"{med(st, key):,.0f} | {median(ds):,.0f}" if ds else f"{med(st, key):,.0f} | -"

        lines += ["", "Redis memory: growth of `used_memory` (all Redis holds: data, allocator overhead, "
                  "client buffers) and of `used_memory_dataset` (the data), divided by the sessions, streams or "
                  "events added; medians of the runs. Then Redis's own `MEMORY USAGE` of sample keys.", "",
                  "| what | bytes (`used_memory`) | bytes (dataset) |", "| --- | --- | --- |",
                  f"| per session (after N sessions are opened; {med(st, 'redis_keys_per_session'):.1f} keys each) | "
                  f"{both('redis_bytes_per_session')} |",
                  f"| per open GET stream | {both('redis_bytes_per_stream')} |",
                  f"| per 1,000 events: the first event of each session (starts its log) | "
                  f"{both('redis_bytes_per_1000_events')} |",
                  f"| per 1,000 events: a second event to each session | "
                  f"{both('redis_bytes_per_1000_events_2')} |"]
        if all("redis_bytes_per_full_log" in x for x in st):
            lines += [f"| per session's log at its bound ({R_FILL} events published to each session, "
                      f"`event_log_size` {R_EVENT_LOG}) | {both('redis_bytes_per_full_log')} |",
                      f"| per 1,000 events kept in those logs | {both('redis_bytes_per_1000_kept_events')} |"]

        def usage(phase: str, kind: str) -> float:
            return median([x["redis"][phase]["sample"][kind]["bytes"] for x in st
                           if kind in x["redis"].get(phase, {}).get("sample", {})])

        for phase, kind, what in (("sessions", "hash", "one session's hash"),
                                  ("fanout", "stream", "one session's event log (a Redis stream) with 1 event"),
                                  ("fanout_2", "stream", "the same with 2 events"),
                                  ("full", "stream", f"the same after {R_FILL} events")):
            b = usage(phase, kind)
            if b == b:
                lines.append(f"| `MEMORY USAGE` of {what} | {b:,.0f} | |")
        lines.append("")
    return lines


def render(res: dict, command: str) -> str:
    meta = res["meta"]
    m = meta["machine"]
    tables, goals = goals_and_tables(res)
    out = [MARK_BEGIN, "",
           f"## Harness run of {meta['date']} (`{command}`)", "",
           f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}. "
           f"Everything (load generator, systems, stub upstream) shares these cores, on loopback. "
           f"Each scenario ran {meta['runs']} time(s); tables give medians of the runs, and ratios are taken "
           f"between systems measured in the same run.", "",
           "Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
           "### Goals", "", "| scenario | goal | measured | met |", "| --- | --- | --- | --- |"]
    for sc, goal, measured, met in goals:
        out.append(f"| {sc} | {goal} | {measured} | {'yes' if met else 'no'} |")
    for key, why in res.get("failed", {}).items():
        out += ["", f"**Scenario {key} did not complete:** {why}"]
    out += ["", *tables]
    plots = meta.get("plots", [])
    if plots:
        out += ["### Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["Raw numbers: `bench/results.json`.", "", MARK_END]
    return "\n".join(out)


def write_results_md(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if MARK_BEGIN in text and MARK_END in text:
        before, rest = text.split(MARK_BEGIN, 1)
        after = rest.split(MARK_END, 1)[1]
        text = before + section + after
    else:
        head, sep, tail = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + section + "\n\n" + (sep.lstrip("\n") + tail if sep else "")
    path.write_text(text.rstrip() + "\n")


def scaling(bc: dict) -> dict:
    """Per system, per N (ascending): the medians of B's bytes per stream
    (PSS), C's fan-out p99 and C's time until all N have the message."""
    out: dict = {}
    for name in ("gateway", "pushpin", "nchan"):
        for n in sorted(int(k) for k in bc.get(name, {})):
            runs = bc[name][str(n)]
            fo = [r["fanout"] for r in runs if "fanout" in r]
            out.setdefault(name, []).append({
                "n": n, "pss": med(runs, "per_stream_pss_bytes"),
                "p99_us": median([f["latency"]["p99_us"] for f in fo]) if fo else float("nan"),
                "all_s": median([f["all_delivered_seconds"] for f in fo]) if fo else float("nan")})
    return out


def scaling_lines(bc: dict) -> list[str]:
    """B and C against N: how each cost grows from the smallest N to the
    largest (issue 19)."""
    sc = scaling(bc)
    if not any(len(rows) > 1 for rows in sc.values()):
        return []
    lines = ["### B and C against N", "",
             "Cost per stream as N grows, per system (medians of runs; each N on a freshly started "
             "system). \"Delivery time per stream\" is C's time until all N have the message, ÷ N. "
             "Plot: `plot-bc-scaling.png`.", "",
             "| system | N | bytes per idle stream (PSS) | fan-out p99 | until all N have it | delivery time per stream |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in sc.items():
        for r in rows:
            lines.append(f"| {name} | {r['n']:,} | {r['pss']:,.0f} | {fmt_us(r['p99_us'])} | "
                         f"{r['all_s'] * 1000:.0f} ms | {r['all_s'] * 1e6 / r['n']:.1f} µs |")
    lines += ["", "How each grows from the smallest N to the largest (× is largest ÷ smallest; flat is 1.0 ×):", "",
              "| system | N | bytes per stream | fan-out p99 | delivery time per stream |",
              "| --- | --- | --- | --- | --- |"]
    for name, rows in sc.items():
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[-1]
        lines.append(f"| {name} | {a['n']:,} → {b['n']:,} | {b['pss'] / a['pss']:.2f} × | "
                     f"{b['p99_us'] / a['p99_us']:.2f} × | "
                     f"{(b['all_s'] / b['n']) / (a['all_s'] / a['n']):.2f} × |")
    lines.append("")
    return lines


def plots(res: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if "A" in res:
        names = list(res["A"])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        ax1.bar(names, [med(res["A"][n], "rps") for n in names], color="#4c72b0")
        ax1.set_title("A: tools/call throughput (req/s)")
        x = range(len(names))
        ax2.bar([i - 0.2 for i in x], [med(res["A"][n], "latency", "p50_us") / 1000 for n in names], 0.4, label="p50")
        ax2.bar([i + 0.2 for i in x], [med(res["A"][n], "latency", "p99_us") / 1000 for n in names], 0.4, label="p99")
        ax2.set_xticks(list(x), names)
        ax2.set_title("A: latency (ms)")
        ax2.legend()
        save(fig, "plot-a-request-overhead.png")
    if "BC" in res:
        systems = [s for s in ("gateway", "pushpin", "nchan") if s in res["BC"]]
        sizes = sorted({int(k) for s in systems for k in res["BC"][s]})
        fig, ax = plt.subplots(figsize=(7, 3.4))
        w = 0.8 / max(len(systems), 1)
        for j, s in enumerate(systems):
            vals = [med(res["BC"][s][str(n)], "per_stream_pss_bytes") / 1024 if str(n) in res["BC"][s] else 0
                    for n in sizes]
            ax.bar([i + j * w for i in range(len(sizes))], vals, w, label=s)
        ax.axhline(6.5, color="red", linestyle="--", linewidth=1, label="goal: 6.5 KiB")
        ax.set_xticks([i + w * (len(systems) - 1) / 2 for i in range(len(sizes))], [f"N={n:,}" for n in sizes])
        ax.set_ylabel("KiB per idle stream")
        ax.set_title("B: memory per idle SSE stream")
        ax.legend()
        save(fig, "plot-b-idle-streams.png")
        c = [(s, n, [r["fanout"] for r in runs if "fanout" in r]) for s in systems
             for n, runs in res["BC"][s].items()]
        c = [x for x in c if x[2]]
        if c:
            fig, ax = plt.subplots(figsize=(7, 3.4))
            labels = [f"{s}\nN={int(n):,}" for s, n, _ in c]
            x = range(len(c))
            ax.bar([i - 0.2 for i in x], [median([f["latency"]["p50_us"] for f in fo]) / 1000 for _, _, fo in c],
                   0.4, label="p50")
            ax.bar([i + 0.2 for i in x], [median([f["latency"]["p99_us"] for f in fo]) / 1000 for _, _, fo in c],
                   0.4, label="p99")
            ax.set_xticks(list(x), labels)
            ax.set_ylabel("ms, publish to delivery")
            ax.set_title("C: fan-out latency")
            ax.legend()
            save(fig, "plot-c-fanout.png")
        sc = scaling(res["BC"])
        if any(len(rows) > 1 for rows in sc.values()):
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
            for name, rows in sc.items():
                ns = [r["n"] for r in rows]
                ax1.plot(ns, [r["pss"] / 1024 for r in rows], marker="o", label=name)
                ax2.plot(ns, [r["p99_us"] / 1000 for r in rows], marker="o", label=name)
            for ax in (ax1, ax2):
                ax.set_xscale("log")
                ax.set_xlabel("N streams")
                ax.legend()
            ax1.set_yscale("log")
            ax1.set_ylabel("KiB per idle stream")
            ax1.set_title("B: memory per stream against N")
            ax2.set_yscale("log")
            ax2.set_ylabel("ms, publish to delivery")
            ax2.set_title("C: fan-out p99 against N")
            save(fig, "plot-bc-scaling.png")
    if "E" in res:
        names = list(res["E"])
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(names, [med(res["E"][n], "introspections") for n in names], color="#dd8452")
        ax.set_yscale("log")
        ax.set_title("E: introspection calls for 10,000 requests")
        save(fig, "plot-e-introspections.png")
    return made


def smoke_checks(res: dict) -> list[str]:
    """What must hold for the harness to work (not how fast anything is)."""
    problems = [f"scenario {k} failed: {v}" for k, v in res.get("failed", {}).items()]
    for name, runs in res.get("A", {}).items():
        for r in runs:
            if r["ok"] == 0 or r["errors"]:
                problems.append(f"A {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    for name, runs in res.get("T", {}).get("rpc", {}).items():
        for r in runs:
            if r["ok"] == 0 or r["errors"]:
                problems.append(f"T {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    for scheme, runs in res.get("T", {}).get("streams", {}).items():
        for r in runs:
            fo = r.get("fanout")
            if r["open"]["opened"] != r["n"] or r["closed_while_idle"] or not fo or fo["delivered"] != r["n"]:
                problems.append(f"T streams {scheme}: {r['open']['opened']} of {r['n']} opened "
                                f"({r['open']['first_failure']}), delivered {fo['delivered'] if fo else 0}")
    for kind, runs in res.get("W", {}).items():
        for r in runs:
            fo = r.get("fanout")
            if r["open"]["opened"] != r["n"] or r["closed_while_idle"] or not fo or fo["delivered"] != r["n"]:
                problems.append(f"W streams {kind}: {r['open']['opened']} of {r['n']} opened "
                                f"({r['open']['first_failure']}), delivered {fo['delivered'] if fo else 0}")
    for name, runs in res.get("D", {}).items():
        for r in runs:
            if r["ok"] == 0 or r["errors"]:
                problems.append(f"D {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    i = res.get("I")
    if i and not (i["direct"]["stub"] > 0 and i["nginx"]["proxy"] > 0 and i["gateway"]["proxy"] > 0):
        problems.append(f"I: an instruction count is zero: {i}")
    for part in ("setup", "rpc"):
        for run in res.get("G", {}).get(part, []):
            for name, r in run.items():
                if r["ok"] == 0 or r["errors"]:
                    problems.append(f"G {part} {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    for name, sizes in res.get("BC", {}).items():
        for n, runs in sizes.items():
            for r in runs:
                if r["open"]["opened"] != int(n) or r["closed_while_idle"]:
                    problems.append(f"B {name}: {r['open']['opened']} of {n} streams opened, "
                                    f"{r['closed_while_idle']} closed while idle")
                fo = r.get("fanout")
                if fo and (fo["lost"] or fo["publish_errors"] or fo["delivered"] != int(n)):
                    problems.append(f"C {name}: delivered {fo['delivered']} of {n}, lost {fo['lost']}, "
                                    f"publish errors {fo['publish_errors']} ({fo['first_error']})")
    for name, runs in res.get("F", {}).items():
        for r in runs:
            if r["ok"] == 0 or r["errors"]:
                problems.append(f"F {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    rr = res.get("R", {})
    for answer, paths in rr.get("rpc", {}).items():
        for name, runs in paths.items():
            for r in runs:
                if r["ok"] == 0 or r["errors"]:
                    problems.append(f"R {answer} {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
    for r in rr.get("streams", []):
        n = rr["n"]
        if r["open"]["opened"] != n or r["closed_while_idle"]:
            problems.append(f"R streams: {r['open']['opened']} of {n} streams opened "
                            f"({r['open']['first_failure']}), {r['closed_while_idle']} closed while idle")
        fill = r.get("fill")
        if not fill or fill["lost"] or fill["publish_errors"] or fill["delivered_min"] != n:
            problems.append("R fill: " + (f"delivered min {fill['delivered_min']} of {n}, lost {fill['lost']}, publish "
                                          f"errors {fill['publish_errors']} ({fill['first_error']})" if fill else "missing"))
        for key in ("fanout", "fanout_2"):
            fo = r.get(key)
            if not fo or fo["lost"] or fo["publish_errors"] or fo["delivered"] != n:
                problems.append(f"R {key}: " + (f"delivered {fo['delivered']} of {n}, lost {fo['lost']}, publish "
                                                f"errors {fo['publish_errors']} ({fo['first_error']})" if fo else "missing"))
    for name, runs in res.get("E", {}).items():
        for r in runs:
            if r["errors"] or r["ok"] == 0:
                problems.append(f"E {name}: {r['ok']} ok, {r['errors']} errors ({r['first_error']})")
            if name == "cache on" and r["introspections"] != r["distinct_tokens"]:
                problems.append(f"E cache on: {r['introspections']} introspections for {r['distinct_tokens']} tokens")
            if name == "cache off" and r["introspections"] < r["ok"]:
                problems.append(f"E cache off: {r['introspections']} introspections for {r['ok']} requests")
    return problems


FULL = {"a_duration": "20s", "a_warmup": "2s", "b_sizes": [1_000, 10_000, 50_000], "c_size": 10_000,
        "idle_seconds": 10.0, "d_duration": "10s", "e_tokens": 100, "e_requests": 10_000, "runs": 3,
        "i_requests": 2000}
SMOKE = {"a_duration": "2s", "a_warmup": "0s", "b_sizes": [200], "c_size": 200, "idle_seconds": 1.0,
         "d_duration": "2s", "e_tokens": 10, "e_requests": 300, "runs": 1, "i_requests": 100}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the small CI run (checks, no published results)")
    ap.add_argument("--runs", type=int, help="runs per scenario (default 3; smoke 1)")
    ap.add_argument("--only", default="A,B,C,D,E,F,G,I,R,T,W",
                    help="scenarios to run, e.g. A,D (B and C run together; R is A, B and C on two nodes and Redis; "
                         "G is federation; T is A and B over TLS; W is B and C over WebSockets; I is A's instructions per request under "
                         "callgrind)")
    ap.add_argument("--sizes", help="stream counts for B, e.g. 10000,50000")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other scenarios of the results.json already in --out")
    ap.add_argument("--out", help="where results.json, RESULTS.md and the plots go (default bench/; "
                                  "smoke: a temporary directory)")
    args = ap.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.runs:
        cfg["runs"] = args.runs
    if args.sizes:
        cfg["b_sizes"] = [int(x) for x in args.sizes.split(",")]
        cfg["c_size"] = cfg["c_size"] if cfg["c_size"] in cfg["b_sizes"] else min(cfg["b_sizes"])
    only = set(args.only.upper().split(","))
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="ratatosk-bench-smoke-"))
                                               if args.smoke else BENCH)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = ROOT / ".run" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    log(f"logs in {run_dir}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1_048_576, 1_048_576))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    res: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": cfg["runs"],
                          "config": cfg, "smoke": args.smoke}}
    s = Systems(run_dir)
    started = time.monotonic()
    def attempt(key: str, fn) -> None:
        """A failed scenario is recorded and the others still run."""
        try:
            res[key] = fn()
        except (BenchError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            log(f"scenario {key} failed: {e}")
            res.setdefault("failed", {})[key] = str(e)

    try:
        stub = s.start_stub()
        if only & {"A", "B", "C", "D", "E", "R", "T", "W"}:
            s.start_keycloak()
        gw = s.start_gateway("gateway", stub) if only & {"A", "D", "E", "R"} else {}
        runs = cfg["runs"]
        if "A" in only:
            nginx = s.start_nginx_proxy()
            targets = {
                "direct": (stub, []),
                "gateway": (f"{gw['base']}/jwt/mcp", [gw["proc"]]),
                "nginx": (nginx, [s.nginx_proxy]),
            }
            if BASELINE_BIN:
                gw0 = s.start_gateway("gateway-baseline", stub, binary=Path(BASELINE_BIN))
                targets[BASELINE] = (f"{gw0['base']}/jwt/mcp", [gw0["proc"]])
                res["meta"]["baseline"] = os.environ.get("RATATOSK_BASELINE_LABEL", BASELINE_BIN)
            attempt("A", lambda: scenario_a(s, cfg, targets, runs))
        if "D" in only:
            attempt("D", lambda: scenario_d(s, cfg, {"direct": stub, "gateway": f"{gw['base']}/jwt/mcp"}, runs))
        if "E" in only:
            uncached = s.start_gateway("gateway-nocache", stub, cache=False)
            attempt("E", lambda: scenario_e(s, cfg, gw, uncached, runs))
        if "F" in only:
            eras = s.start_era_gateway({"stateless-2025": stub, "stateful-2025": s.start_era_stub("stateful-2025"),
                                        "modern": s.start_era_stub("modern")})
            attempt("F", lambda: scenario_f(s, cfg, eras, runs))
        if "T" in only:
            attempt("T", lambda: scenario_t(s, cfg, stub, runs))
        if "W" in only:
            attempt("W", lambda: scenario_w(s, cfg, stub, runs))
        if "G" in only:
            stubs = {f"s{i}": s.start_more_stub(f"stub-s{i}") if i > 1 else stub for i in (1, 2, 3)}
            fed = s.run_gateway("gateway-federation", {"orgs": {"fed": {"auth": "none", "servers": {
                name: {"upstream": {"era": "stateless-2025", "replicas": [url], "timeout": "30s"}}
                for name, url in stubs.items()}}}})
            attempt("G", lambda: scenario_g(s, cfg, fed, runs))
        if only & {"B", "C"}:
            # Every stream is an open file in the server and in the load
            # generator; without CAP_SYS_RESOURCE the hard limit caps N.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            cap = (hard - 1500) // 1000 * 1000
            if any(n > cap for n in cfg["b_sizes"]):
                log(f"open files are capped at {hard} per process: N above {cap:,} cannot be held; "
                    f"running {cap:,} instead")
                res["meta"]["fd_limit"] = hard
                cfg["b_sizes"] = sorted({min(n, cap) for n in cfg["b_sizes"]})
            if not args.smoke:
                avail = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                             if line.startswith("MemAvailable:"))
                # About 60 KiB per stream across all parties is plenty.
                fits = [n for n in cfg["b_sizes"] if n * 60 < avail]
                if fits != cfg["b_sizes"]:
                    log(f"skipping N = {sorted(set(cfg['b_sizes']) - set(fits))}: not enough memory")
                cfg["b_sizes"] = fits
            attempt("BC", lambda: scenario_bc(s, cfg, runs, stub))
        if "R" in only:
            attempt("R", lambda: scenario_r(s, cfg, gw, stub, runs))
        if "I" in only:
            attempt("I", lambda: scenario_i(cfg, run_dir))
    finally:
        s.stop_all()
    seconds = round(time.monotonic() - started)
    if args.merge and (out_dir / "results.json").exists():
        # The full run's meta stays (its date, seconds, versions); what was
        # run since is listed with how long it took.
        old = json.loads((out_dir / "results.json").read_text())
        new = sorted(k for k in res if k not in ("meta", "failed"))
        merged = {**old["meta"].get("merged_seconds", {}), **{k: seconds for k in new}}
        res = {**old, **{k: v for k, v in res.items() if k != "meta"},
               "meta": {**old["meta"], "merged": sorted(set(old["meta"].get("merged", [])) | set(new)),
                        "merged_seconds": merged}}
    else:
        res["meta"]["seconds"] = seconds
    res["meta"]["versions"] = {**res["meta"].get("versions", {}), **peer_versions(), **s.versions}
    res["meta"]["plots"] = plots(res, out_dir)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    command = "bench/run --smoke" if args.smoke else "make bench"
    write_results_md(out_dir / "RESULTS.md", render(res, command))
    log(f"results in {out_dir / 'RESULTS.md'} ({seconds} s)")
    if args.smoke:
        problems = smoke_checks(res)
        for p in problems:
            log(f"smoke check failed: {p}")
        checked = sum(len(runs) for k in ("A", "D", "E", "F") for runs in res.get(k, {}).values())
        checked += sum(len(runs) for sizes in res.get("BC", {}).values() for runs in sizes.values())
        checked += sum(len(runs) for paths in res.get("R", {}).get("rpc", {}).values() for runs in paths.values())
        checked += len(res.get("R", {}).get("streams", []))
        checked += sum(len(run) for part in ("setup", "rpc") for run in res.get("G", {}).get(part, []))
        checked += sum(len(runs) for runs in res.get("T", {}).get("rpc", {}).values())
        checked += sum(len(runs) for runs in res.get("T", {}).get("streams", {}).values())
        checked += sum(len(runs) for runs in res.get("W", {}).values())
        checked += 1 if "I" in res else 0
        print(f"smoke: {max(checked - len(problems), 0)} passed, {len(problems)} failed")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
