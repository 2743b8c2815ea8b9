"""Process harness for the end-to-end tests.

Starts the real gateway binary and real upstream replicas on loopback ports,
waits for readiness with a timeout and a clear error, and stops only the
processes it started, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx2

ROOT = Path(__file__).resolve().parents[2]
PUBLISH_SECRET = "e2e-publish-secret-local-only"
PROTOCOL = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT_BOTH = "application/json, text/event-stream"


def gateway_binary() -> Path:
    explicit = os.environ.get("RATATOSK_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "ratatosk"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0, every: float = 0.05,
               alive: Callable[[], str | None] | None = None) -> None:
    """Polls `check` until it is true. Fails with `what` after `timeout`,
    or at once if `alive` reports that a process died."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise AssertionError(f"{what}: {dead}")
        try:
            if check():
                return
        except (OSError, httpx2.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(every)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def death(self) -> str | None:
        """Why the process is no longer running, or None if it is."""
        if self.popen is None:
            return f"{self.name} was never started"
        code = self.popen.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}; log tail:\n{self.log_tail()}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stops this process (its own process group, started by us) by pid."""
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Example(Proc):
    """One replica of any upstream example (upstream-examples/<name>/run)."""

    def __init__(self, name: str, log_dir: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        super().__init__(
            name=f"{name}:{self.port}",
            argv=[str(ROOT / "upstream-examples" / name / "run"), "--port", str(self.port), *args],
            log_path=log_dir / f"{name}-{self.port}.log",
            env=env or {},
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/mcp"

    def events(self) -> list[dict]:
        """What `sleep_then_return` recorded: started, finished, cancelled."""
        return httpx2.get(f"{self.base}/debug/events", timeout=5).json()

    def event_time(self, tag: str, event: str) -> float | None:
        return next((e["at"] for e in self.events() if e["tag"] == tag and e["event"] == event), None)

    def seen_headers(self) -> list[dict[str, str]]:
        """The headers of the last requests (the Python examples)."""
        return httpx2.get(f"{self.base}/debug/headers", timeout=5).json()

    def wait_ready(self, timeout: float = 180.0, starts: int = 1) -> "Example":
        """Waits for the `starts`-th readiness line of this example's log."""
        wait_until(f"{self.name} listening", lambda: self.log_text().count("READY") >= starts,
                   timeout=timeout, every=0.1, alive=self.death)
        return self

    def restart(self) -> None:
        """Stops this replica and starts it again on the same port: whatever
        it held in memory (its sessions) is gone."""
        starts = self.log_text().count("READY") + 1
        self.stop()
        self.start()
        self.wait_ready(timeout=60, starts=starts)


class Replica(Example):
    """One replica of upstream-examples/python-fastmcp, publishing to the
    gateway's admin API from `notify_me`."""

    def __init__(self, log_dir: Path, admin_url: str):
        super().__init__("python-fastmcp", log_dir, env={
            "RATATOSK_ADMIN_URL": admin_url, "RATATOSK_PUBLISH_SECRET": PUBLISH_SECRET,
            "RATATOSK_NOTIFY_DELAY_MS": "200"})


@contextmanager
def started(example: Example):
    """An example upstream, running and ready, for the length of a block."""
    example.start()
    try:
        yield example.wait_ready()
    finally:
        example.stop()


@contextmanager
def all_started(procs: list):
    """Processes with a `wait_ready`, started at once and ready, for the
    length of a block."""
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def start_replicas(n: int, log_dir: Path, admin_url: str) -> list[Replica]:
    """Starts n replicas at once and waits until all listen."""
    replicas = [Replica(log_dir, admin_url) for _ in range(n)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas



class RedisServer(Proc):
    """A real redis-server (Debian package; scripts/prereqs installs it) on a
    free loopback port, without persistence: a restart loses everything."""

    def __init__(self, log_dir: Path, name: str = "redis", persist: bool = False,
                 tls: tuple[Path, Path, Path] | None = None, args: tuple[str, ...] = ()):
        """With `persist`, every write goes to an append-only file first, so a
        restart keeps the data. With `tls` (certificate, key, CA), it speaks
        TLS only, and asks clients for no certificate."""
        self.port = free_port()
        self.tls = tls
        data_dir = log_dir / f"{name}-{self.port}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        durability = (["--appendonly", "yes", "--appendfsync", "always"] if persist
                      else ["--appendonly", "no"])
        ports = ["--port", str(self.port)]
        if tls:
            cert, key, ca = tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        super().__init__(name=name, argv=["redis-server", *ports, "--bind", "127.0.0.1",
                                          "--dir", str(data_dir), "--save", "", *durability, *args],
                         log_path=log_dir / f"{name}-{self.port}.log")

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/" if self.tls else f"redis://127.0.0.1:{self.port}/"

    def _cli(self) -> list[str]:
        tls = ["--tls", "--cacert", str(self.tls[2])] if self.tls else []
        return ["redis-cli", "-p", str(self.port), *tls]

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                c = raw
                if self.tls:
                    import ssl
                    c = ssl.create_default_context(cafile=str(self.tls[2])).wrap_socket(
                        raw, server_hostname="localhost")
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start_and_wait(self) -> "RedisServer":
        self.start()
        wait_until(f"{self.name} answering PING", self.answers, timeout=10, every=0.05, alive=self.death)
        return self

    def keys(self, pattern: str) -> list[str]:
        out = subprocess.run([*self._cli(), "--scan", "--pattern", pattern],
                             capture_output=True, text=True, timeout=10, check=True)
        return [line for line in out.stdout.splitlines() if line]

    def cli(self, *args: str) -> str:
        """What redis-cli prints for one command (raw, one line per item)."""
        out = subprocess.run([*self._cli(), "--raw", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""


class Sentinels:
    """A Redis primary, its replicas and three real redis-sentinel processes
    (Debian's redis-sentinel; scripts/prereqs installs it) watching it as
    `master_name`, quick to fail over: a primary that does not answer for
    `down_after_ms` is replaced by a replica."""

    master_name = "e2e"

    def __init__(self, log_dir: Path, name: str = "sentinel", replicas: int = 1, down_after_ms: int = 1000):
        self.log_dir = log_dir
        self.name = name
        self.down_after_ms = down_after_ms
        self.primary = RedisServer(log_dir, name=f"{name}-primary")
        self.replicas = [RedisServer(log_dir, name=f"{name}-replica{i}",
                                     args=("--replicaof", "127.0.0.1", str(self.primary.port)))
                         for i in range(replicas)]
        self.sentinels: list[Proc] = []
        self.ports: list[int] = []
        for i in range(3):
            port = free_port()
            data = log_dir / f"{name}-s{i}-{port}"
            data.mkdir(parents=True, exist_ok=True)
            conf = data / "sentinel.conf"
            # Sentinel rewrites its file as it learns: a fresh one each run.
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {data}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {down_after_ms}",
                f"sentinel failover-timeout {self.master_name} 10000",
                f"sentinel parallel-syncs {self.master_name} 1", ""]))
            self.ports.append(port)
            self.sentinels.append(Proc(name=f"{name}-s{i}", argv=["redis-sentinel", str(conf)],
                                       log_path=log_dir / f"{name}-s{i}-{port}.log"))

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def ask(self, i: int, *args: str) -> list[str]:
        out = subprocess.run(["redis-cli", "-p", str(self.ports[i]), "--raw", *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.split() if out.returncode == 0 else []

    def primary_port(self, i: int = 0) -> int | None:
        """The primary's port as sentinel `i` names it now."""
        addr = self.ask(i, "SENTINEL", "get-master-addr-by-name", self.master_name)
        return int(addr[1]) if len(addr) == 2 else None

    def _all_known(self) -> bool:
        for i in range(3):
            if self.primary_port(i) != self.primary.port:
                return False
            # Each replica suitable for promotion: its link to the primary up.
            fields = self.ask(i, "SENTINEL", "replicas", self.master_name)
            if sum(1 for a, b in zip(fields, fields[1:]) if (a, b) == ("master-link-status", "ok")) < len(self.replicas):
                return False
            # Each knows the other two: enough for a quorum and an election.
            if self.ask(i, "SENTINEL", "sentinels", self.master_name).count("name") < 2:
                return False
        return all(r.cli("INFO", "replication").find("master_link_status:up") >= 0 for r in self.replicas)

    def start_and_wait(self) -> "Sentinels":
        self.primary.start_and_wait()
        for r in self.replicas:
            r.start_and_wait()
        for s in self.sentinels:
            s.start()
        wait_until(f"{self.name}: the replicas in sync and the sentinels knowing them and each other",
                   self._all_known, timeout=60, every=0.2,
                   alive=lambda: next((p.death() for p in [self.primary, *self.replicas, *self.sentinels]
                                       if p.death()), None))
        return self

    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def fail_over(self) -> RedisServer:
        """Kills the primary (SIGKILL, no goodbye) and waits until every
        sentinel names a replica in its place; that replica."""
        old = self.primary
        old.kill()
        by_port = {r.port: r for r in self.replicas}
        wait_until(f"{self.name}: the sentinels promoting a replica",
                   lambda: all(self.primary_port(i) in by_port for i in range(3)), timeout=60, every=0.1)
        self.killed = old
        self.primary = by_port[self.primary_port(0)]
        self.replicas = [r for r in self.replicas if r is not self.primary]
        return self.primary

    def rejoin(self) -> None:
        """Starts the killed primary again (empty: no persistence); the
        sentinels make it a replica of the new primary. Waits until it is
        one, in sync."""
        old = self.killed
        old.start_and_wait()
        wait_until(f"{self.name}: the old primary back as a replica in sync",
                   lambda: "master_link_status:up" in old.cli("INFO", "replication")
                   and f"master_port:{self.primary.port}" in old.cli("INFO", "replication"),
                   timeout=60, every=0.2)
        self.replicas.append(old)

    def stop(self) -> None:
        for p in [*self.sentinels, self.primary, *self.replicas]:
            p.stop()


class RedisCluster:
    """A real Redis Cluster (redis-server in cluster mode, joined with
    `redis-cli --cluster create`): three primaries with one replica each,
    quick to fail over (`cluster-node-timeout` `node_timeout_ms`).
    `primary` serves the slot of hash tag `tag`; `replicas` are its own."""

    def __init__(self, log_dir: Path, tag: str, name: str = "cluster", node_timeout_ms: int = 1000):
        self.name = name
        self.tag = tag
        self.all: list[RedisServer] = []
        for i in range(6):
            data = log_dir / f"{name}-{i}-conf"
            data.mkdir(parents=True, exist_ok=True)
            self.all.append(RedisServer(
                log_dir, name=f"{name}-{i}",
                args=("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                      "--cluster-port", str(free_port()), "--cluster-config-file", str(data / "nodes.conf"))))
        self.primary: RedisServer | None = None
        self.replicas: list[RedisServer] = []

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.all]

    def _owner(self, via: RedisServer) -> tuple[RedisServer | None, list[RedisServer]]:
        """The primary serving the tag's slot as `via` sees it, and its replicas."""
        slot = int(via.cli("CLUSTER", "KEYSLOT", "{" + self.tag + "}") or "-1")
        by_port = {s.port: s for s in self.all}
        port_of = lambda row: int(row[1].split("@")[0].rsplit(":", 1)[1])  # noqa: E731
        table = [line.split() for line in via.cli("CLUSTER", "NODES").splitlines() if line.strip()]
        for row in table:
            if "master" not in row[2] or "fail" in row[2]:
                continue
            for r in row[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    replicas = [by_port[port_of(x)] for x in table
                                if "slave" in x[2] and x[3] == row[0] and "fail" not in x[2]]
                    return by_port.get(port_of(row)), replicas
        return None, []

    def _ready(self) -> bool:
        live = [s for s in self.all if s.death() is None]
        if not all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in live):
            return False
        primary, replicas = self._owner(live[0])
        return primary is not None and bool(replicas) and all(
            "master_link_status:up" in r.cli("INFO", "replication") for r in replicas)

    def start_and_wait(self) -> "RedisCluster":
        for s in self.all:
            s.start_and_wait()
        out = subprocess.run(["redis-cli", "--cluster", "create", *self.nodes, "--cluster-replicas", "1",
                              "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(f"{self.name}: the cluster ok on every node, the tag's primary with a replica in sync",
                   self._ready, timeout=60, every=0.2)
        self.primary, self.replicas = self._owner(self.all[0])
        return self

    def fail_over(self) -> RedisServer:
        """Kills the tag's primary (SIGKILL) and waits until its replica
        serves the slot and the cluster is ok again; that replica."""
        assert self.primary is not None and self.replicas
        replica = self.replicas[0]
        self.primary.kill()
        wait_until(f"{self.name}: the replica taking over the slot",
                   lambda: self._owner(replica)[0] is replica and "cluster_state:ok" in replica.cli("CLUSTER", "INFO"),
                   timeout=60, every=0.1)
        self.primary, self.replicas = replica, []
        return replica

    def stop(self) -> None:
        for s in self.all:
            s.stop()



class Gateway(Proc):
    """The ratatosk binary with a config written for the test."""

    def __init__(self, log_dir: Path, orgs: dict[str, dict], *, base_path: str = "",
                 idle_ttl: str = "30m", keepalive: str = "1s", event_log_size: int = 256,
                 max_body_bytes: int = 65536, name: str = "gateway", admin_port: int | None = None,
                 port: int | None = None, extra: dict | None = None, env: dict | None = None,
                 verify=True):
        self.port = port or free_port()
        # With `tls` / `admin_tls` in `extra`, the listeners speak HTTPS and
        # the harness trusts `verify` (an ssl.SSLContext) to reach them.
        self.scheme = "https" if (extra or {}).get("tls") else "http"
        self.admin_scheme = "https" if (extra or {}).get("admin_tls") else "http"
        self.verify = verify
        self.admin_port = admin_port or free_port()
        self.base_path = base_path
        self.config_path = log_dir / f"{name}.yaml"
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{self.admin_port}",
            "base_path": base_path,
            "allowed_origins": ["http://localhost:6274"],
            "limits": {"max_body_bytes": max_body_bytes, "body_read_timeout": "5s"},
            # The suite's gateways are shared by many tests of one (anonymous)
            # user: the per-user cap is tested on its own (test_limits.py).
            "sessions": {"idle_ttl": idle_ttl, "event_log_size": event_log_size, "max_per_subject": 100_000},
            "streams": {"keepalive": keepalive, "retry": "500ms"},
            # The secret itself comes from the environment, as in production.
            "publish": {"secret": "${RATATOSK_PUBLISH_SECRET}"},
            "server": {"threads": 2, "shutdown_grace": "1s"},
            "orgs": orgs,
            **(extra or {}),
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.write_config()
        super().__init__(
            name=name,
            argv=[str(gateway_binary()), "--config", str(self.config_path)],
            log_path=log_dir / f"{name}.log",
            env={"RATATOSK_PUBLISH_SECRET": PUBLISH_SECRET, "RATATOSK_LOG": "info", "NO_COLOR": "1",
                 **(env or {})},
        )

    def write_config(self) -> None:
        """Writes `self.config` to the config file (read at start, and again
        on SIGHUP or POST /reload)."""
        # JSON is YAML: no YAML library is needed in the test venv.
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def start_and_wait(self, timeout: float = 20.0) -> "Gateway":
        if not gateway_binary().exists():
            raise AssertionError(f"gateway binary {gateway_binary()} is missing: run cargo build first")
        self.start()
        wait_until(f"{self.name} /healthz", lambda: self.admin_get("/healthz").status_code == 200,
                   timeout=timeout, alive=self.death)
        wait_until(f"{self.name} MCP listener", lambda: port_open(self.port), timeout=timeout,
                   alive=self.death)
        return self

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"{self.origin}{self.base_path}"

    def url(self, org: str, endpoint: str = "mcp") -> str:
        return f"{self.base}/{org}/{endpoint}"

    @property
    def admin(self) -> str:
        return f"{self.admin_scheme}://127.0.0.1:{self.admin_port}"

    def admin_get(self, path: str, **kw) -> httpx2.Response:
        return httpx2.get(self.admin + path, timeout=5, verify=self.verify, **kw)

    def publish(self, session_id: str, message: dict, secret: str = PUBLISH_SECRET) -> httpx2.Response:
        return httpx2.post(f"{self.admin}/sessions/{session_id}/messages", json=message,
                           headers={"Authorization": f"Bearer {secret}"}, timeout=5, verify=self.verify)

    def sessions(self, org: str) -> list[dict]:
        r = self.admin_get(f"/orgs/{org}/sessions", headers={"Authorization": f"Bearer {PUBLISH_SECRET}"})
        r.raise_for_status()
        return r.json()["sessions"]

    def metrics(self) -> str:
        return self.admin_get("/metrics").text

    def assert_healthy(self) -> None:
        dead = self.death()
        assert dead is None, dead
        assert "panicked" not in self.log_text(), self.log_tail(80)
        assert self.admin_get("/healthz").status_code == 200


async def raw_initialize(pool, path: str, client: str) -> str:
    """A 2025-11-25 `initialize` through a rawhttp.Pool (load tests, no SDK);
    the new session's id."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                  "clientInfo": {"name": client, "version": "1"}}}).encode()
    status, head, answer = await pool.request(
        "POST", path, {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}, body)
    assert status == 200, answer
    return head["mcp-session-id"]


@contextmanager
def redis_running(log_dir: Path, name: str, **kw):
    """A redis-server of the test's own, answering, for the length of a block."""
    server = RedisServer(log_dir, name=name, **kw).start_and_wait()
    try:
        yield server
    finally:
        server.stop()


def redis_gateway(log_dir: Path, replicas, redis: RedisServer, name: str, prefix: str | None = None,
                  orgs: dict | None = None, extra: dict | None = None, env: dict | None = None,
                  **kw) -> "Gateway":
    """A gateway node keeping its sessions and event logs in `redis` under
    `prefix` (default `<name>:`); nodes with one prefix share them. Its org
    is `s25` on `replicas` unless `orgs` says otherwise."""
    sessions = {"idle_ttl": "30m", "event_log_size": 256, "store": "redis", "url": "${E2E_REDIS_URL}",
                "key_prefix": prefix or f"{name}:", "max_per_subject": 100_000}
    return Gateway(log_dir, orgs or {"s25": org(replicas)}, name=name,
                   extra={"sessions": sessions, **(extra or {})},
                   env={"E2E_REDIS_URL": redis.url, **(env or {})}, **kw)


@contextmanager
def running(gw: "Gateway"):
    """Starts a gateway, yields it, checks it is still healthy, stops it."""
    gw.start_and_wait()
    try:
        yield gw
        gw.assert_healthy()
    finally:
        gw.stop()


def org(replicas: list[Example] | list[str], auth: str = "none", **upstream) -> dict:
    """An org's config; keys `scopes` and `organization` go to the org, the
    rest to its upstream."""
    urls = [r.url if isinstance(r, Example) else r for r in replicas]
    extra = {k: upstream.pop(k) for k in ("scopes", "organization") if k in upstream}
    return {"auth": auth, **extra, "upstream": {"era": "stateless-2025", "replicas": urls, **upstream}}


# ----- Keycloak -------------------------------------------------------------------

# LOCAL-ONLY test credentials of keycloak/realm-ratatosk.json.
KC_PASSWORDS = {"alice": "alice-local-only", "bob": "bob-local-only", "carol": "carol-local-only"}
KC_GATEWAY_SECRET = "ratatosk-gateway-local-only-secret"
KC_ADMIN_PASSWORD = "admin-local-only"
KC_AUDIENCE = "http://127.0.0.1:8080"


class Keycloak:
    """A real Keycloak started by keycloak/start, on loopback ports. It
    trusts `trust` (PEM certificates) when it fetches over HTTPS."""

    def __init__(self, run_dir: Path, backchannel_url: str, trust: list[Path] | None = None,
                 https: tuple[Path, Path, Path] | None = None):
        """`https`: (certificate, key, CA file) to serve HTTPS as
        https://localhost:<port> (the certificate must name localhost)."""
        self.port = free_port()
        self.management_port = free_port()
        self.run_dir = run_dir
        self.backchannel_url = backchannel_url
        self.trust = trust or []
        self.https = https
        self.origin = f"https://localhost:{self.port}" if https else f"http://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(https[2])) if https else True
        self.issuer = f"{self.origin}/realms/ratatosk"

    def _env(self) -> dict:
        env = {**os.environ, "KEYCLOAK_PORT": str(self.port),
               "KEYCLOAK_MANAGEMENT_PORT": str(self.management_port),
               "KEYCLOAK_RUN_DIR": str(self.run_dir), "RATATOSK_BACKCHANNEL_URL": self.backchannel_url,
               "KEYCLOAK_ADMIN_PASSWORD": KC_ADMIN_PASSWORD}
        if self.trust:
            env["KEYCLOAK_TRUSTSTORE_PATHS"] = ",".join(str(p) for p in self.trust)
        if self.https:
            env["KEYCLOAK_HTTPS_CERT_FILE"], env["KEYCLOAK_HTTPS_KEY_FILE"] = str(self.https[0]), str(self.https[1])
        return env

    def start(self, reuse: bool = False) -> "Keycloak":
        env = self._env()
        if reuse:
            env["KEYCLOAK_REUSE"] = "1"
        out = subprocess.run([str(ROOT / "keycloak/start")], env=env, capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"keycloak/start failed ({out.returncode}):\n{out.stderr[-4000:]}")
        assert out.stdout.strip() == self.issuer, (out.stdout, self.issuer)
        return self

    def stop(self) -> None:
        subprocess.run([str(ROOT / "keycloak/stop")], env=self._env(), capture_output=True, timeout=120)

    def token_response(self, user: str, client: str = "mcp-client",
                       scope: str = "openid organization:* mcp:tools") -> dict:
        r = httpx2.post(f"{self.issuer}/protocol/openid-connect/token", timeout=10, verify=self.verify, data={
            "grant_type": "password", "client_id": client, "username": user,
            "password": KC_PASSWORDS[user], "scope": scope})
        assert r.status_code == 200, r.text
        return r.json()

    def token(self, user: str, **kw) -> str:
        return self.token_response(user, **kw)["access_token"]

    def admin_token(self) -> str:
        r = httpx2.post(f"{self.origin}/realms/master/protocol/openid-connect/token", timeout=10, verify=self.verify,
                        data={"grant_type": "password", "client_id": "admin-cli", "username": "admin",
                              "password": KC_ADMIN_PASSWORD})
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def admin(self, method: str, path: str, **kw) -> httpx2.Response:
        return httpx2.request(method, f"{self.origin}/admin/realms/ratatosk{path}", timeout=30, verify=self.verify,
                              headers={"Authorization": f"Bearer {self.admin_token()}"}, **kw)

    def logout_user(self, user: str) -> None:
        """Ends every Keycloak session of the user (admin API); Keycloak
        then sends back-channel logout tokens to the clients involved."""
        users = self.admin("GET", "/users", params={"username": user, "exact": "true"}).json()
        r = self.admin("POST", f"/users/{users[0]['id']}/logout")
        assert r.status_code == 204, r.text


def loopback_tls(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for https://127.0.0.1, valid
    two days. LOCAL USE ONLY: made fresh for each test run."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class DocumentServer:
    """Serves JSON documents over HTTPS on 127.0.0.1 (a client's Client ID
    Metadata Documents), and counts who fetched which path."""

    def __init__(self, cert: Path, key: Path):
        import http.server
        import ssl

        self.documents: dict[str, dict] = {}
        self.fetches: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                doc = server.documents.get(self.path)
                server.fetches[self.path] = server.fetches.get(self.path, 0) + 1
                body = json.dumps(doc).encode() if doc is not None else b"{}"
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def claims(token: str) -> dict:
    """The payload of a JWT, unverified (for test bookkeeping only)."""
    import base64

    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# ----- raw HTTP helpers ---------------------------------------------------------

def post(url: str, body, *, session: str | None = None, headers: dict | None = None,
         version: str | None = PROTOCOL, timeout: float = 10) -> httpx2.Response:
    h = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    if version:
        h["MCP-Protocol-Version"] = version
    if session:
        h["Mcp-Session-Id"] = session
    h.update(headers or {})
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx2.post(url, content=data, headers=h, timeout=timeout)


def initialize(url: str, name: str = "e2e-raw", version: str = PROTOCOL) -> str:
    """Initializes a session over raw HTTP and returns its id."""
    r = post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                   "params": {"protocolVersion": version, "capabilities": {},
                              "clientInfo": {"name": name, "version": "1"}}}, version=None)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["protocolVersion"] == version, r.text
    sid = r.headers["mcp-session-id"]
    r2 = post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session=sid, version=version)
    assert r2.status_code == 202, r2.text
    return sid


def modern_call(url: str, name: str, args: dict, caps: dict | None = None, timeout: float = 10,
                client: dict | None = None, **extra) -> httpx2.Response:
    """A raw 2026-07-28 tools/call (id 5); `extra` goes into its params
    (`requestState`, `inputResponses`). The client declares `caps`, by
    default roots, and its `client` info if given."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {"roots": {}} if caps is None else caps}
    if client is not None:
        meta["io.modelcontextprotocol/clientInfo"] = client
    params = {"name": name, "arguments": args, **extra, "_meta": meta}
    return post(url, {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params},
                version=MODERN, headers={"Mcp-Method": "tools/call", "Mcp-Name": name}, timeout=timeout)


def tool_names(url: str, sid: str) -> set[str]:
    """The tool names of a tools/list on session `sid` (a JSON answer)."""
    r = post(url, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}, session=sid)
    assert r.status_code == 200, r.text
    body = r.json() if r.headers["content-type"].startswith("application/json") else None
    assert body is not None, r.text
    return {t["name"] for t in body["result"]["tools"]}


def result_of(r: httpx2.Response) -> dict:
    """The JSON-RPC result of an answer, JSON or SSE."""
    if r.headers["content-type"].startswith("application/json"):
        return r.json()["result"]
    for line in r.text.splitlines():
        if line.startswith("data:") and '"result"' in line:
            return json.loads(line[5:])["result"]
    raise AssertionError(r.text)


def next_list_changed(events: "SseReader", upstream: Example) -> None:
    """Raises tools/list_changed at a modern example upstream every 200 ms
    until one reaches `events` (a raise reaches only the upstream listens
    open at that moment), for up to 10 s."""
    seen = threading.Event()

    def raise_changes() -> None:
        deadline = time.monotonic() + 10
        while not seen.is_set() and time.monotonic() < deadline:
            httpx2.post(f"{upstream.base}/debug/tools-changed", timeout=5)
            seen.wait(0.2)

    raiser = threading.Thread(target=raise_changes, daemon=True)
    raiser.start()
    try:
        _, message = events.next_message()
    finally:
        seen.set()
        raiser.join(timeout=10)
    assert message["method"] == "notifications/tools/list_changed", message


def answers(r: httpx2.Response) -> list[dict]:
    """The JSON-RPC messages of a POST's answer, JSON or SSE."""
    if r.headers.get("content-type", "").startswith("application/json"):
        return [r.json()]
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def rpc_error(r: httpx2.Response) -> dict:
    """The JSON-RPC error of a refusal, checked for shape."""
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert body["jsonrpc"] == "2.0", body
    assert "error" in body, body
    assert isinstance(body["error"]["code"], int), body
    assert body["error"]["message"], body
    return body["error"]


@dataclass
class SseEvent:
    id: str | None
    event: str | None
    data: str


class SseReader:
    """Reads SSE events (and counts comments) from a streaming response."""

    def __init__(self, response: httpx2.Response):
        self.response = response
        self.lines: Iterator[str] = response.iter_lines()
        self.comments = 0

    def next_event(self) -> SseEvent:
        ev_id = ev_type = None
        data: list[str] = []
        seen = False
        for line in self.lines:
            if line == "":
                if seen:
                    return SseEvent(ev_id, ev_type, "\n".join(data))
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                ev_id = value
            elif name == "event":
                ev_type = value
            elif name == "data":
                data.append(value)
        raise EOFError("stream ended")

    def next_message(self) -> tuple[str | None, dict]:
        """The next event that carries a JSON-RPC message (skips priming)."""
        while True:
            ev = self.next_event()
            if ev.data.strip():
                return ev.id, json.loads(ev.data)

    def next_comment(self) -> None:
        before = self.comments
        for line in self.lines:
            if line.startswith(":"):
                self.comments += 1
            if self.comments > before:
                return
        raise EOFError("stream ended")


# ----- official MCP client helpers ----------------------------------------------


from mcp import ClientSession, types  # noqa: E402
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
import mcp_types as mt  # noqa: E402
from mcp.client.client import Client  # noqa: E402


@asynccontextmanager
async def streamable_session(url: str, headers: dict | None = None, *, verify=True, http2: bool = False,
                             **callbacks):
    """An initialized ClientSession over Streamable HTTP (mcp 2.x client),
    trusting `verify` for https URLs (HTTP/2 by ALPN with `http2`)."""
    http = httpx2.AsyncClient(headers=headers or {}, timeout=httpx2.Timeout(30.0, read=60.0), verify=verify,
                              http2=http2)
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=30,
                                 client_info=types.Implementation(name="e2e-streamable", version="1"),
                                 **callbacks) as session:
            await session.initialize()
            yield session


@asynccontextmanager
async def legacy_session(url: str, headers: dict | None = None, **callbacks):
    """An initialized ClientSession over HTTP+SSE of 2024-11-05 (sse_client)."""
    async with sse_client(url, headers=headers, timeout=10.0, sse_read_timeout=60.0) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=30,
                                 client_info=types.Implementation(name="e2e-legacy", version="1"),
                                 **callbacks) as session:
            await session.initialize()
            yield session


# ----- one client of each era ---------------------------------------------------

ROOTS = ["file:///tmp/ratatosk-a", "file:///tmp/ratatosk-b"]
CLIENT_ERAS = ["sse-2024", "streamable-2025", "modern-2026"]


async def list_roots(ctx, *args):
    return mt.ListRootsResult(roots=[mt.Root(uri=u) for u in ROOTS])


async def elicit(ctx, params):
    return mt.ElicitResult(action="accept", content={"confirmed": True})


class Api:
    """One client of one era, with the few calls the matrix makes."""

    def __init__(self, session):
        self.session = session

    async def tool_names(self) -> set[str]:
        return {t.name for t in (await self.session.list_tools()).tools}

    async def call(self, name: str, args: dict, progress=None) -> str:
        result = await self.session.call_tool(name, args, progress_callback=progress)
        assert not result.is_error, result
        return result.content[0].text


@asynccontextmanager
async def client(era: str, gw: Gateway, org_name: str, **callbacks):
    callbacks.setdefault("list_roots_callback", list_roots)
    callbacks.setdefault("elicitation_callback", elicit)
    if era == "sse-2024":
        async with legacy_session(gw.url(org_name, "sse"), **callbacks) as s:
            yield Api(s)
    elif era == "streamable-2025":
        async with streamable_session(gw.url(org_name), **callbacks) as s:
            yield Api(s)
    else:
        async with Client(gw.url(org_name), mode=MODERN, **callbacks) as c:
            yield Api(c)
