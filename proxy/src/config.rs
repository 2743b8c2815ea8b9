//! The gateway's YAML configuration.
//!
//! Loading is three steps: parse YAML into a tree, expand `${ENV}`
//! placeholders in string values, then deserialize into the typed structs
//! below (unknown fields are errors) and check the rules serde cannot express.
//! Every error names the file, the field path and what was expected.

pub use ratatosk_auth::policy::{PolicyRule, PolicyTargets, PolicyWhen};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ratatosk_auth::AuthMode;
use ratatosk_auth::config::MAX_DURATION;
use serde::Deserialize;
use url::Url;
use yaml_serde::Value;

/// Top level of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where MCP clients connect, e.g. `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The admin listener: health, metrics, the publish and sessions APIs.
    /// Keep it on a network only operators and workers reach.
    pub admin_listen: SocketAddr,
    /// HTTPS on `listen` (HTTP/1.1 and HTTP/2 by ALPN): certificate and key
    /// files, reloaded on SIGHUP and on a timer, and an optional client CA
    /// for mTLS.
    #[serde(default)]
    pub tls: Option<ratatosk_auth::tls::ListenerTls>,
    /// The same for `admin_listen`.
    #[serde(default)]
    pub admin_tls: Option<ratatosk_auth::tls::ListenerTls>,
    /// Prefix before `/{org}/mcp`, e.g. `/api/v1/mcp`. Empty by default.
    #[serde(default)]
    pub base_path: String,
    /// Browser origins allowed to call the gateway, e.g. `http://localhost:6274`.
    /// A request with an `Origin` header not in this list gets 403; requests
    /// without `Origin` (non-browser clients) are not affected.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub sessions: SessionsConfig,
    #[serde(default)]
    pub streams: StreamsConfig,
    /// The WebSocket endpoints (`{org}/ws`, `{org}/{server}/ws`).
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// Deferred answers that workers finish through the publish API.
    #[serde(default)]
    pub holds: HoldsConfig,
    /// The audit log of tool calls, prompts and resource reads.
    #[serde(default)]
    pub audit: AuditConfig,
    pub publish: PublishConfig,
    #[serde(default)]
    pub server: ServerConfig,
    /// The URL clients use to reach the gateway, e.g. `https://mcp.example.com`.
    /// Resource URLs (RFC 9728) are built from it. Default: `http://{listen}`
    /// (`https://` with `tls`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Traces over OTLP. Also on, with the defaults, when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// is set; `OTEL_SDK_DISABLED=true` turns them off.
    #[serde(default)]
    pub telemetry: Option<crate::telemetry::TelemetryConfig>,
    /// The identity provider (a Keycloak realm). Required when an org uses
    /// an `auth` mode other than `none`.
    #[serde(default)]
    pub identity: Option<ratatosk_auth::ProviderConfig>,
    /// Where the identity provider POSTs back-channel logout tokens.
    #[serde(default = "default_logout_path")]
    pub backchannel_logout_path: String,
    /// The key the gateway signs `gateway-jwt` upstream credentials with;
    /// its public key set is served at `/jwks.json` on the admin listener
    /// and at `{base_path}/.well-known/jwks.json`.
    #[serde(default)]
    pub upstream_jwt: Option<ratatosk_auth::upstream_jwt::UpstreamJwtConfig>,
    /// One entry per organization; the key is the org alias used in paths.
    pub orgs: BTreeMap<String, OrgConfig>,
    /// The file's tree after `${NAME}` expansion, for a reload to compare.
    #[serde(skip)]
    pub source: Source,
}

/// A config file's tree after `${NAME}` expansion (secrets included, so
/// its `Debug` shows none of it).
#[derive(Clone, Default, PartialEq)]
pub struct Source(Value);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Source(..)")
    }
}

impl Source {
    /// The subtree at `path` (mapping keys), if there is one.
    pub fn at(&self, path: &[&str]) -> Option<&Value> {
        path.iter().try_fold(&self.0, |value, key| value.get(*key))
    }

    /// What an org's routes are built from: its tree, and the limit that
    /// shapes every route. Equal in two configs: the routes are the same.
    /// (All of an org's servers count: one server's policy changes the
    /// scopes that every route of the org offers.)
    pub fn of_org(&self, org: &str) -> [Option<&Value>; 2] {
        [
            self.at(&["orgs", org]),
            self.at(&["limits", "max_answer_bytes"]),
        ]
    }

    /// What one route is built from (`server`: `None` for the one-server
    /// shorthand): the org's tree without its servers, except their
    /// policies (which shape the scopes every route of the org offers),
    /// the server's tree, and the limit that shapes every route. Equal in
    /// two configs: the route is the same, though other servers of its
    /// org came or went.
    pub fn of_route(&self, org: &str, server: Option<&str>) -> [Option<Value>; 3] {
        let org_tree = self.at(&["orgs", org]).map(|tree| {
            let mut tree = tree.clone();
            if let Some(map) = tree.as_mapping_mut()
                && let Some(servers) = map.get_mut("servers").and_then(Value::as_mapping_mut)
            {
                servers.retain(|_, s| s.get("policy").is_some());
                for (_, s) in servers.iter_mut() {
                    if let Some(s) = s.as_mapping_mut() {
                        s.retain(|k, _| k.as_str() == Some("policy"));
                    }
                }
                if servers.is_empty() {
                    map.remove("servers");
                }
            }
            tree
        });
        let server_tree = server.and_then(|name| self.at(&["orgs", org, "servers", name]).cloned());
        [
            org_tree,
            server_tree,
            self.at(&["limits", "max_answer_bytes"]).cloned(),
        ]
    }
}

/// Fields read only when the gateway starts (listeners, the session store,
/// the identity provider, keys, ...): a reload that changes one is refused.
/// Everything else (orgs, their servers, replicas and policies, the other
/// limits and timeouts, streams, allowed origins, the publish secret)
/// changes in place.
pub const RESTART_ONLY: &[&[&str]] = &[
    &["listen"],
    &["admin_listen"],
    &["tls"],
    &["admin_tls"],
    &["server"],
    &["sessions"],
    &["holds"],
    &["audit"],
    &["public_url"],
    &["base_path"],
    &["identity"],
    &["backchannel_logout_path"],
    &["upstream_jwt"],
    &["limits", "max_connections"],
    &["telemetry"],
];

fn default_logout_path() -> String {
    "/auth/backchannel-logout".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted on the MCP endpoints and the publish API.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest answer (JSON body, or all of an SSE stream) taken from an upstream.
    pub max_answer_bytes: usize,
    /// Most messages in one JSON-RPC batch (2025-03-26 and legacy clients).
    pub max_batch: usize,
    /// How long a client may take to send a request head, from its first
    /// byte to its last: a client trickling bytes cannot hold a connection
    /// longer than this.
    #[serde(with = "humantime_serde")]
    pub head_read_timeout: Duration,
    /// Client connections the MCP listener keeps open at once (streams
    /// included); one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            max_answer_bytes: 64 * 1024 * 1024,
            max_batch: 32,
            head_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// A session with no request and no open stream for this long ends.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Events kept per session for `Last-Event-ID` replay: this many for
    /// the standalone stream, and as many again for POST response streams.
    pub event_log_size: usize,
    /// Bytes kept in each of those two rings (the newest event is always kept).
    pub event_log_bytes: usize,
    /// With `store: redis`, events older than this leave the shared log
    /// (which is also bounded by `event_log_size`).
    #[serde(with = "humantime_serde")]
    pub event_log_max_age: Duration,
    /// Requests one session may have waiting on upstreams at once; more get 429.
    pub max_in_flight: usize,
    /// Sessions one user (token subject) may have in one org at once; one
    /// more gets 429. Orgs with `auth: none` have one user, `anonymous`.
    pub max_per_subject: usize,
    /// Sessions of all orgs at once (of all nodes, with `store: redis`);
    /// one more gets 503.
    pub max_total: usize,
    /// Bytes of `clientInfo` plus `capabilities` (as JSON) a session keeps;
    /// an `initialize` with more gets 400.
    pub max_client_bytes: usize,
    /// Resource subscriptions one session may hold (`resources/subscribe`,
    /// kept by the gateway for modern upstreams).
    pub max_subscriptions: usize,
    /// Where sessions live: `memory` (this process, the default) or
    /// `redis` (shared by every gateway node).
    pub store: StoreKind,
    /// The Redis URL (`redis://[:password@]host:port[/db]`) with
    /// `store: redis`. Keep a password out of the file: `${REDIS_URL}`.
    pub url: Option<String>,
    /// Prefix of every Redis key, so that several gateways can share one
    /// Redis.
    pub key_prefix: String,
    /// For a `rediss://` URL: the CA to trust in place of the system's
    /// roots (`ca_file`), and a client certificate (`cert_file`,
    /// `key_file`).
    pub tls: Option<ratatosk_auth::tls::ClientTls>,
    /// With `store: redis`, in place of `url`: a primary that Redis
    /// Sentinel watches. Every node asks the sentinels where it is and
    /// follows it across failovers.
    pub sentinel: Option<SentinelConfig>,
    /// With `store: redis`, in place of `url`: a Redis Cluster. Every key
    /// of the gateway goes to one slot (the hash tag `key_prefix` must
    /// hold), whose primary every node finds and follows across
    /// failovers: the cluster gives failover, not sharding.
    pub cluster: Option<ClusterConfig>,
    /// With `store: redis`: each write of events, and each new session,
    /// waits until this many replicas have it (Redis `WAIT`), up to
    /// `timeout`; a publish that is not replicated in time gets 503 (its
    /// event may still arrive). Without it, replication is asynchronous:
    /// a primary that dies can take its last writes with it.
    pub wait: Option<WaitConfig>,
}

/// Redis Cluster (`sessions.cluster`). `Debug` leaves the password out.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Some of the cluster's nodes, `host:port` each; one that answers is
    /// enough.
    pub nodes: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// `${REDIS_PASSWORD}`.
    #[serde(default)]
    pub password: Option<String>,
    /// TLS to the nodes (then `sessions.tls` names a private CA or a client
    /// certificate, if the system's roots are not enough).
    #[serde(default)]
    pub tls: bool,
}

/// A secret as `Debug` shows it: whether it is set.
fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "redacted")
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master_name", &self.master_name)
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("db", &self.db)
            .field("sentinel_password", &redacted(&self.sentinel_password))
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("tls", &self.tls)
            .finish()
    }
}

/// The hash tag of a Redis key: what lies between its first `{` and the
/// next `}`, if that is not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once('{')?;
    let (tag, _) = rest.split_once('}')?;
    (!tag.is_empty()).then_some(tag)
}

/// Nodes given as `host:port`: each checked, under `field`.
fn check_nodes(at: &mut Section<'_>, field: &str, nodes: &[String], what: &str) {
    if nodes.is_empty() {
        at.bad(field, format!("expected at least one {what}, `host:port`"));
    }
    for (i, node) in nodes.iter().enumerate() {
        let port = node
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
            at.bad(
                &format!("{field}[{i}]"),
                format!("expected `host:port`, got `{node}`"),
            );
        }
    }
}

/// `sessions.wait`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitConfig {
    pub replicas: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// The longest `sessions.wait.timeout`: a write that waits longer would
/// outlast the gateway's own timeout on Redis answers.
const OP_TIMEOUT_MAX: Duration = Duration::from_secs(1);

/// Redis Sentinel (`sessions.sentinel`). `Debug` leaves the passwords out.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels know the primary by (`sentinel monitor
    /// <name> ...` in their config).
    pub master_name: String,
    /// The sentinels, `host:port` each; one that answers is enough.
    pub nodes: Vec<String>,
    /// The primary's user, if not `default`.
    #[serde(default)]
    pub username: Option<String>,
    /// The primary's password: `${REDIS_PASSWORD}`.
    #[serde(default)]
    pub password: Option<String>,
    /// The database number on the primary.
    #[serde(default)]
    pub db: i64,
    /// The sentinels' own password, if they ask for one.
    #[serde(default)]
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels and the primary (then `sessions.tls` names the
    /// CA and a client certificate, if the system's roots are not enough).
    #[serde(default)]
    pub tls: bool,
}

impl SentinelConfig {
    fn check(&self, at: &mut Section<'_>) {
        if self.master_name.trim().is_empty() {
            at.bad(
                "master_name",
                "expected the name the sentinels know the primary by",
            );
        }
        check_nodes(at, "nodes", &self.nodes, "sentinel");
        if !(0..=1_000_000).contains(&self.db) {
            at.bad("db", format!("expected a database number, got {}", self.db));
        }
    }
}

impl SessionsConfig {
    /// Where the shared store is, with `store: redis`, and its TLS files
    /// read.
    pub fn redis(&self) -> Result<Option<crate::session::RedisTarget>, String> {
        if self.store != StoreKind::Redis
            || (self.url.is_none() && self.sentinel.is_none() && self.cluster.is_none())
        {
            return Ok(None);
        }
        let tls = match &self.tls {
            Some(tls) => tls.load().map_err(|e| format!("sessions.tls.{e}"))?,
            None => Default::default(),
        };
        let sentinel = self
            .sentinel
            .as_ref()
            .map(|s| crate::session::SentinelTarget {
                master_name: s.master_name.clone(),
                nodes: s.nodes.clone(),
                username: s.username.clone(),
                password: s.password.clone(),
                db: s.db,
                sentinel_password: s.sentinel_password.clone(),
                tls: s.tls,
            });
        let cluster = self
            .cluster
            .as_ref()
            .map(|c| crate::session::ClusterTarget {
                nodes: c.nodes.clone(),
                username: c.username.clone(),
                password: c.password.clone(),
                tls: c.tls,
                key: self.key_prefix.clone(),
            });
        Ok(Some(crate::session::RedisTarget {
            url: self.url.clone().unwrap_or_default(),
            tls,
            sentinel,
            cluster,
        }))
    }
}

/// Where sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Redis,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_ttl: Duration::from_secs(30 * 60),
            event_log_size: 256,
            event_log_bytes: 4 * 1024 * 1024,
            event_log_max_age: Duration::from_secs(30 * 60),
            max_in_flight: 64,
            max_per_subject: 1000,
            max_total: 100_000,
            max_client_bytes: 16 * 1024,
            max_subscriptions: 256,
            store: StoreKind::Memory,
            url: None,
            key_prefix: "ratatosk:".into(),
            tls: None,
            sentinel: None,
            cluster: None,
            wait: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Interval of SSE keep-alive comments on idle streams.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// The `retry` hint sent with the priming event.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            keepalive: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// How the gateway keeps WebSocket connections toward clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest message (of one frame or several) a client may send; a
    /// larger one closes the connection with 1009. By default
    /// `limits.max_body_bytes`, as for a POST.
    pub max_message_bytes: Option<usize>,
    /// How often the gateway pings an open connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long after a ping the client has to answer (a pong or any
    /// frame); otherwise the connection closes with 4408.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Requests of one connection that run at once; the gateway reads no
    /// further frame until one finishes.
    pub max_in_flight: usize,
    /// Messages waiting to be written to one client; when they are
    /// queued, the gateway stops taking events for it (they wait in the
    /// session's event log) until the client reads.
    pub send_queue: usize,
    /// How long one write to a client may stay blocked before the
    /// connection is dropped.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_bytes: None,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(20),
            max_in_flight: 16,
            send_queue: 64,
            send_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HoldsConfig {
    /// How long a hold waits for its worker when the upstream names no
    /// timeout.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// The longest hold an upstream may ask for; longer ones are cut to it.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Holds open at once in one session; one more fails its request.
    pub max_per_session: usize,
    /// 2026-07-28 calls without an open hold that keep a worker's early
    /// messages at once, on one node (any call id is taken, so a worker
    /// publishing to ids no upstream gave out fills no more than this).
    pub max_waiting_calls: usize,
    /// How long a finished hold still answers its worker (`cancelled`,
    /// `expired`, `done`) before it is forgotten (then 404).
    #[serde(with = "humantime_serde")]
    pub keep_finished: Duration,
}

impl Default for HoldsConfig {
    fn default() -> Self {
        HoldsConfig {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(3600),
            max_per_session: 64,
            max_waiting_calls: 10_000,
            keep_finished: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Where lines go: `off`, `stderr`, `file`, or `redis` (a Redis
    /// stream, `<sessions.key_prefix>audit`, with `sessions.store: redis`).
    pub sink: AuditSink,
    /// With `sink: file`: the file, rotated to `<path>.1` ... when it
    /// reaches `max_bytes`.
    pub path: Option<PathBuf>,
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
    /// A call's arguments in the log: `omit`, `hashed` (SHA-256 of their
    /// JSON) or `redacted` (keys kept, values replaced).
    pub arguments: AuditArguments,
    /// With `sink: redis`: entries the stream keeps, about (older ones are
    /// trimmed as new ones are added).
    pub max_entries: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sink: AuditSink::Off,
            path: None,
            max_bytes: 100 * 1024 * 1024,
            keep: 5,
            arguments: AuditArguments::Omit,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditSink {
    Off,
    Stderr,
    File,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditArguments {
    Omit,
    Hashed,
    Redacted,
}

impl AuditConfig {
    fn problems(&self, at: &mut Section, store: StoreKind) {
        match (self.sink, &self.path) {
            (AuditSink::File, None) => at.bad("path", "`sink: file` needs the file's `path`"),
            (AuditSink::File, Some(path)) => {
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                if dir.is_some_and(|d| !d.is_dir()) {
                    at.bad(
                        "path",
                        format!("the directory of `{}` does not exist", path.display()),
                    );
                }
            }
            (_, Some(_)) => at.bad("path", "only used with `sink: file`"),
            _ => {}
        }
        if self.max_bytes < 1024 {
            at.bad(
                "max_bytes",
                format!("expected at least 1024 bytes, got {}", self.max_bytes),
            );
        }
        at.between_1_and("keep", self.keep, 1000);
        at.between_1_and("max_entries", self.max_entries, 1_000_000_000);
        if self.sink == AuditSink::Redis && store != StoreKind::Redis {
            at.bad(
                "sink",
                "`sink: redis` writes to the sessions' Redis: it needs `sessions.store: redis`",
            );
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Bearer secret for the publish and sessions APIs. Put it in the
    /// environment: `secret: ${RATATOSK_PUBLISH_SECRET}`.
    pub secret: String,
}

impl fmt::Debug for PublishConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishConfig")
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads of the MCP listener.
    pub threads: usize,
    /// On SIGTERM, how long to keep serving open connections.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgConfig {
    /// How bearer tokens are validated. `none` serves everyone as anonymous.
    #[serde(default)]
    pub auth: AuthMode,
    /// Scopes a token needs for this org; a token without one gets 403
    /// `insufficient_scope`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The identity provider's organization alias a token must carry in its
    /// `organization` claim. Default: the org's name. Lets several routes
    /// (say, with different auth modes) serve one organization.
    #[serde(default)]
    pub organization: Option<String>,
    /// The org's one upstream MCP server: the shorthand for one server
    /// without a prefix, reached at `{org}/mcp`. Give it or `servers`.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// Several upstream MCP servers by name, each reached at
    /// `{org}/{server}/mcp`. Names are path segments other than the
    /// endpoint names (`mcp`, `sse`, `messages`, `ws`).
    #[serde(default)]
    pub servers: BTreeMap<String, OrgServerConfig>,
    /// Between a server's prefix and a name on the org's federated
    /// endpoint: `fs__read_file`. Default `__`.
    #[serde(default)]
    pub separator: Option<String>,
    /// Tool policy: what callers may see and use, by their roles, groups
    /// and scopes. With rules, what no rule allows is denied.
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
    /// Rate limits on the org's requests, at every endpoint of the org.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Servers may register themselves in this org through the admin API
    /// (`PUT /orgs/{org}/servers/{name}`) and join its federated endpoint.
    /// Only with `servers` (which may then be empty), not `upstream`.
    #[serde(default)]
    pub registration: Option<RegistrationConfig>,
}

/// Self-registration of servers in an org (`orgs.<org>.registration`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// A bearer secret for this org's registrations only, beside the admin
    /// secret (`publish.secret`), which registers in every org. Put it in
    /// the environment: `secret: ${TEAM_REGISTRATION_SECRET}`.
    #[serde(default)]
    pub secret: Option<String>,
    /// The longest `ttl` a registration may ask for.
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How many servers may be registered in the org at once.
    #[serde(default = "default_max_servers")]
    pub max_servers: usize,
}

impl fmt::Debug for RegistrationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("max_ttl", &self.max_ttl)
            .field("max_servers", &self.max_servers)
            .finish()
    }
}

fn default_max_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_max_servers() -> usize {
    32
}

/// The shortest `ttl` a registration may ask for.
pub const MIN_REGISTRATION_TTL: Duration = Duration::from_secs(1);

/// A rate limit of an org (`orgs.<org>.rate_limits[]`): a rate and a
/// burst (GCRA), for each subject, client or the org as a whole, on the
/// requests it selects. Every node of a Redis-mode gateway shares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Named in refusals and in `ratatosk_refused_total{limit}`.
    pub name: String,
    /// `10/s`, `600/min`, `1000/h`, or a count per any duration (`5/30s`).
    pub rate: Rate,
    /// Requests allowed at once after a quiet spell. Default: the rate's
    /// count.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose requests share one budget.
    #[serde(default)]
    pub per: RatePer,
    /// The methods counted (`tools/call`, `resources/read`, ...).
    /// Default: every request.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only requests to these of the org's `servers`. Default: all.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Only calls of these tools (globs over the names as the federated
    /// endpoint shows them, `fs__read_*`, as policy rules see them).
    /// Default: every request the other fields select.
    #[serde(default)]
    pub tools: Vec<String>,
}

/// Whose requests share a rate limit's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatePer {
    /// Each user (the token's subject).
    #[default]
    Subject,
    /// Each OAuth client (the token's `azp` or `client_id`), the subject
    /// when it has none.
    Client,
    /// The org as a whole.
    Org,
}

impl RatePer {
    pub fn as_str(self) -> &'static str {
        match self {
            RatePer::Subject => "subject",
            RatePer::Client => "client",
            RatePer::Org => "org",
        }
    }
}

/// The longest a rate limit's full budget may take to fill up again
/// (interval × burst).
pub const MAX_RATE_SPAN: Duration = Duration::from_secs(366 * 86_400);

/// A count per period: `10/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    /// The time one request takes of the budget: period ÷ count.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let wrong = || format!("expected a rate like `10/s`, `600/min` or `5/30s`, got `{s}`");
        let (count, period) = s.split_once('/').ok_or_else(wrong)?;
        let count: u32 = count.trim().parse().map_err(|_| wrong())?;
        let period = period.trim();
        // `s`, `min`, `h`: one of the unit.
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            humantime::parse_duration(period)
        } else {
            humantime::parse_duration(&format!("1{period}"))
        }
        .map_err(|_| wrong())?;
        Ok(Rate { count, period })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per {}",
            self.count,
            humantime::format_duration(self.period)
        )
    }
}

/// One of an org's servers (`orgs.<org>.servers.<name>`): an MCP
/// `upstream`, or a REST API described by an `openapi` document, which
/// the gateway serves as an MCP server of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawOrgServerConfig")]
pub struct OrgServerConfig {
    /// For an `openapi` server, made from it: `stateless-2025`, its
    /// timeouts, TLS and credentials, and the API's URL as the replica
    /// (which the federation's watch checks).
    pub upstream: UpstreamConfig,
    pub openapi: Option<OpenApiConfig>,
    pub prefix: Option<String>,
    pub policy: Vec<PolicyRule>,
}

/// `orgs.<org>.servers.<name>` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrgServerConfig {
    #[serde(default)]
    upstream: Option<UpstreamConfig>,
    #[serde(default)]
    openapi: Option<OpenApiConfig>,
    /// What its tools, prompts and resource templates are prefixed with
    /// on the federated endpoint (then the separator). Default: the
    /// server's name; `""` for none.
    #[serde(default)]
    prefix: Option<String>,
    /// Rules for this server alone, beside the org's.
    #[serde(default)]
    policy: Vec<PolicyRule>,
}

impl TryFrom<RawOrgServerConfig> for OrgServerConfig {
    type Error = String;

    fn try_from(raw: RawOrgServerConfig) -> Result<OrgServerConfig, String> {
        let upstream = match (raw.upstream, &raw.openapi) {
            (Some(upstream), None) => upstream,
            (None, Some(openapi)) => openapi.as_upstream(),
            (None, None) => {
                return Err("expected `upstream` (an MCP server) or `openapi` (a REST API)".into());
            }
            (Some(_), Some(_)) => {
                return Err("give either `upstream` or `openapi`, not both".into());
            }
        };
        Ok(OrgServerConfig {
            upstream,
            openapi: raw.openapi,
            prefix: raw.prefix,
            policy: raw.policy,
        })
    }
}

/// A REST API served as MCP tools (`orgs.<org>.servers.<name>.openapi`):
/// each allowed operation of its OpenAPI 3.0 or 3.1 document is a tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenApiConfig {
    /// The document: an `http://` or `https://` URL (read when the server
    /// is first used), or a file.
    pub spec: String,
    /// The API's URL, which operations' paths follow. Default: the
    /// document's first `servers` URL, relative to the document's URL;
    /// without one, the document's origin. Required when `spec` is a file.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The operation ids served (globs: `list*`). Nothing else is.
    pub operations: Vec<String>,
    /// Longest wait for the API's answer.
    #[serde(default = "default_openapi_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// For `https://` APIs, as `upstream.tls`.
    #[serde(default)]
    pub tls: Option<ratatosk_auth::tls::ClientTls>,
    /// How the gateway authenticates to the API, as `upstream.auth`: the
    /// credential's header goes on every call.
    #[serde(default)]
    pub auth: UpstreamAuth,
}

impl OpenApiConfig {
    fn problems(&self, at: &mut Section) {
        if self.spec_is_url() {
            if let Err(e) = Url::parse(&self.spec) {
                at.bad("spec", format!("not a URL: {e}"));
            }
        } else if self.spec.is_empty() {
            at.bad("spec", "expected the OpenAPI document's URL or file");
        } else {
            if self.base_url.is_none() {
                at.bad(
                    "base_url",
                    "required when `spec` is a file: the API's URL, like `https://api.example.com/v1`",
                );
            }
            if let Err(e) = std::fs::metadata(&self.spec) {
                at.bad("spec", format!("cannot read `{}`: {e}", self.spec));
            }
        }
        if let Some(base) = &self.base_url {
            match Url::parse(base) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => at.bad(
                    "base_url",
                    format!("expected an http:// or https:// URL, got `{base}`"),
                ),
            }
        }
        if self.operations.is_empty() {
            at.bad(
                "operations",
                "expected the operation ids to serve (globs like `list*`); nothing else is served",
            );
        }
        for (i, op) in self.operations.iter().enumerate() {
            if let Err(e) = globset::Glob::new(op) {
                at.bad(&format!("operations[{i}]"), format!("not a glob: {e}"));
            }
        }
        at.duration("timeout", self.timeout, Some("30s"));
        at.duration("connect_timeout", self.connect_timeout, Some("2s"));
    }
}

fn default_openapi_timeout() -> Duration {
    Duration::from_secs(30)
}

impl OpenApiConfig {
    /// Whether `spec` names a URL (not a file).
    pub fn spec_is_url(&self) -> bool {
        self.spec.starts_with("http://") || self.spec.starts_with("https://")
    }

    /// The upstream the gateway's routes see: `stateless-2025`, served
    /// in-process; its replica names the API (`base_url`, or the
    /// document's origin).
    fn as_upstream(&self) -> UpstreamConfig {
        let replica = match &self.base_url {
            Some(url) => url.clone(),
            None => Url::parse(&self.spec)
                .map(|u| u.origin().ascii_serialization())
                .unwrap_or_default(),
        };
        UpstreamConfig {
            era: Era::Stateless2025,
            replicas: if replica.is_empty() {
                Vec::new()
            } else {
                vec![replica]
            },
            // Beyond the API's own timeouts (the document's read, then
            // the call): the call's error is the server's, not the pool's.
            timeout: self.timeout * 2 + Duration::from_secs(5),
            max_duration: default_max_duration().max(self.timeout * 2 + Duration::from_secs(5)),
            connect_timeout: self.connect_timeout,
            eject_for: default_eject_for(),
            max_input_rounds: default_max_input_rounds(),
            tls: self.tls.clone(),
            auth: self.auth.clone(),
        }
    }
}

/// Path segments that name endpoints, which servers may not be named.
pub const ENDPOINT_NAMES: [&str; 4] = ["mcp", "sse", "messages", "ws"];

/// The separator of prefixed names when an org names none.
pub const DEFAULT_SEPARATOR: &str = "__";

/// Longest prefix, and longest separator, of federated names: a prefixed
/// name must still fit MCP's 128 characters.
const MAX_PREFIX: usize = 64;
const MAX_SEPARATOR: usize = 8;

/// One upstream server of an org, as the gateway serves it.
#[derive(Debug, Clone, Copy)]
pub struct ServerEntry<'a> {
    /// `None` for the one-server shorthand (`orgs.<org>.upstream`).
    pub name: Option<&'a str>,
    pub upstream: &'a UpstreamConfig,
    /// Empty for the shorthand, and for `prefix: ""`.
    pub prefix: &'a str,
    /// The server's own policy rules (the org's apply too).
    pub policy: &'a [PolicyRule],
    /// A REST API the gateway serves as this MCP server.
    pub openapi: Option<&'a OpenApiConfig>,
}

impl OrgConfig {
    /// The org's servers: the shorthand's one, or each of `servers`.
    pub fn server_entries(&self) -> Vec<ServerEntry<'_>> {
        if let Some(upstream) = &self.upstream {
            return vec![ServerEntry {
                name: None,
                upstream,
                prefix: "",
                policy: &[],
                openapi: None,
            }];
        }
        self.servers
            .iter()
            .map(|(name, s)| ServerEntry {
                name: Some(name),
                upstream: &s.upstream,
                prefix: s.prefix.as_deref().unwrap_or(name),
                policy: &s.policy,
                openapi: s.openapi.as_ref(),
            })
            .collect()
    }

    /// The separator of prefixed names.
    pub fn separator(&self) -> &str {
        self.separator.as_deref().unwrap_or(DEFAULT_SEPARATOR)
    }
}

/// Whether `s` may be part of a tool name: MCP allows `A-Z a-z 0-9 _ - .`.
fn is_name_part(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The MCP protocol era an upstream pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Era {
    /// Streamable HTTP of 2025, without sessions (e.g. FastMCP `stateless_http`).
    #[serde(rename = "stateless-2025")]
    Stateless2025,
    /// Streamable HTTP of 2025 with the upstream's own `Mcp-Session-Id`.
    #[serde(rename = "stateful-2025")]
    Stateful2025,
    /// The stateless protocol of 2026-07-28: `_meta` on every request, MRTR.
    #[serde(rename = "modern")]
    Modern,
    /// Found out by probing: `server/discover`, then a legacy `initialize`.
    #[serde(rename = "auto")]
    Auto,
}

impl Era {
    pub fn as_str(self) -> &'static str {
        match self {
            Era::Stateless2025 => "stateless-2025",
            Era::Stateful2025 => "stateful-2025",
            Era::Modern => "modern",
            Era::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub era: Era,
    /// Replica URLs of the MCP endpoint, e.g. `http://10.0.0.5:8000/mcp`.
    pub replicas: Vec<String>,
    /// Longest wait for the upstream's answer to start, and between two
    /// events of a streamed answer.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest a single request may take in all, however steadily its
    /// answer streams (progress notifications included).
    #[serde(default = "default_max_duration", with = "humantime_serde")]
    pub max_duration: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a replica that failed to connect or answered 5xx stays out
    /// of rotation.
    #[serde(default = "default_eject_for", with = "humantime_serde")]
    pub eject_for: Duration,
    /// Most `InputRequiredResult` rounds one request of a legacy client may
    /// take with a modern upstream before the gateway gives up on it.
    #[serde(default = "default_max_input_rounds")]
    pub max_input_rounds: u32,
    /// For `https://` replicas: the CA to trust in place of the system's
    /// roots (`ca_file`), a client certificate (`cert_file`, `key_file`),
    /// or, for a test bench only, `insecure_skip_verify`.
    #[serde(default)]
    pub tls: Option<ratatosk_auth::tls::ClientTls>,
    /// What the upstream is told about the caller, and how the gateway
    /// proves it: see [`UpstreamAuth`].
    #[serde(default)]
    pub auth: UpstreamAuth,
}

/// How the gateway authenticates to an upstream, and tells it who calls.
/// The client's own token never goes upstream.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UpstreamAuth {
    /// `Ratatosk-Subject`, `Ratatosk-Org`, `Ratatosk-Scopes` and
    /// `Ratatosk-Username` headers: for upstreams on a trusted network.
    /// (A struct variant, so that unknown fields beside it are refused.)
    Headers {},
    /// A value from the environment in a header, the same for every
    /// caller: for third-party servers with an API key.
    Static {
        /// Default `Authorization`.
        #[serde(default = "default_static_header")]
        header: String,
        /// E.g. `Bearer ${TICKETS_API_KEY}`.
        value: String,
    },
    /// A short-lived JWT the gateway signs (`upstream_jwt`), as
    /// `Authorization: Bearer`, with the caller's subject, org, scopes and
    /// roles, and `aud` = `audience`.
    GatewayJwt {
        /// Default: the route, `<org>` or `<org>/<server>`.
        #[serde(default)]
        audience: Option<String>,
    },
    /// The caller's token exchanged (RFC 8693) at the identity provider,
    /// by the gateway's confidential client (`identity.client_id`), for
    /// one addressed to `audience` only, as `Authorization: Bearer`.
    TokenExchange {
        /// The upstream's client id at the provider.
        audience: String,
        /// Scopes to ask for, if any (the provider's defaults otherwise).
        #[serde(default)]
        scopes: Vec<String>,
    },
}

impl Default for UpstreamAuth {
    fn default() -> Self {
        UpstreamAuth::Headers {}
    }
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAuth::Headers {} => f.write_str("Headers"),
            UpstreamAuth::Static { header, .. } => f
                .debug_struct("Static")
                .field("header", header)
                .field("value", &"<redacted>")
                .finish(),
            UpstreamAuth::GatewayJwt { audience } => f
                .debug_struct("GatewayJwt")
                .field("audience", audience)
                .finish(),
            UpstreamAuth::TokenExchange { audience, scopes } => f
                .debug_struct("TokenExchange")
                .field("audience", audience)
                .field("scopes", scopes)
                .finish(),
        }
    }
}

fn default_static_header() -> String {
    "authorization".into()
}

fn default_max_input_rounds() -> u32 {
    // What the official SDK clients allow (mcp, TypeScript, Go, C#).
    10
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_duration() -> Duration {
    Duration::from_secs(600)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_eject_for() -> Duration {
    Duration::from_secs(10)
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted field path, e.g. `orgs.org-1.upstream.replicas[0]`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "at `{}`: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {}", render_problems(.problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems:", many.len());
            for p in many {
                out.push_str("\n  - ");
                out.push_str(&p.to_string());
            }
            out
        }
    }
}

impl Config {
    /// The URL clients reach the gateway at, without a trailing slash.
    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", self.listen)
        })
    }

    /// The upstreams (`org` or `org/server`) that accept any certificate
    /// (`tls.insecure_skip_verify`): each gets a loud warning.
    pub fn insecure_tls(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (org, config) in &self.orgs {
            for entry in config.server_entries() {
                if entry
                    .upstream
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.insecure_skip_verify)
                {
                    out.push(
                        entry
                            .name
                            .map_or_else(|| org.clone(), |s| format!("{org}/{s}")),
                    );
                }
            }
        }
        out
    }

    /// What a reload from `self` to `next` would change that only a
    /// restart applies: one problem per field (see [`RESTART_ONLY`]).
    pub fn restart_only_changes(&self, next: &Config) -> Vec<Problem> {
        RESTART_ONLY
            .iter()
            .filter(|path| self.source.at(path) != next.source.at(path))
            .map(|path| Problem {
                path: path.join("."),
                message: "changed, but it is read only when the gateway starts: restart the gateway to apply it (the running config stays)".into(),
            })
            .collect()
    }

    /// Reads, expands and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, file, &|name| std::env::var(name).ok())
    }

    /// Parses config text. `env` looks up `${NAME}` placeholders; `file` is
    /// only used in error messages.
    pub fn from_yaml(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
            file: file.to_owned(),
            problems,
        };
        let mut tree: Value = yaml_serde::from_str(text).map_err(|e| {
            invalid(vec![Problem {
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }])
        })?;
        let problems: Vec<Problem> = ratatosk_auth::env::expand_env(&mut tree, env)
            .into_iter()
            .map(|(path, message)| Problem { path, message })
            .collect();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        Config::from_tree(tree).map_err(invalid)
    }

    /// The config of a tree whose `${NAME}` placeholders are expanded
    /// already: deserialized and checked.
    fn from_tree(tree: Value) -> Result<Config, Vec<Problem>> {
        let source = Source(tree.clone());
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            vec![Problem {
                path: if path == "." { String::new() } else { path },
                message: e.into_inner().to_string(),
            }]
        })?;
        config.source = source;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// This config with servers added to orgs' `servers` (registered
    /// ones: org, name and the server's tree, taken as it is, without
    /// `${NAME}` expansion), checked as a file is. A name the org has
    /// already is not replaced: that is a problem too.
    pub fn with_servers<'a>(
        &self,
        added: impl IntoIterator<Item = (&'a str, &'a str, &'a serde_json::Value)>,
    ) -> Result<Config, Vec<Problem>> {
        let mut tree = self.source.0.clone();
        let mut problems = Vec::new();
        for (org, name, server) in added {
            let path = format!("orgs.{org}.servers.{name}");
            let Some(servers) = tree
                .get_mut("orgs")
                .and_then(|orgs| orgs.get_mut(org))
                .and_then(Value::as_mapping_mut)
                .map(|org| {
                    org.entry(Value::from("servers"))
                        .or_insert_with(|| Value::Mapping(Default::default()))
                })
                .and_then(Value::as_mapping_mut)
            else {
                problems.push(Problem {
                    path,
                    message: format!("no org `{org}` with `servers`"),
                });
                continue;
            };
            let key = Value::from(name);
            if servers.contains_key(&key) {
                problems.push(Problem {
                    path,
                    message: format!("org `{org}` has a server `{name}` already"),
                });
                continue;
            }
            match yaml_serde::to_value(server) {
                Ok(value) => {
                    servers.insert(key, value);
                }
                Err(e) => problems.push(Problem {
                    path,
                    message: e.to_string(),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Config::from_tree(tree)
    }

    /// The rules serde cannot express: every problem found, section by
    /// section (each section checks its own fields; see [`Found`]).
    fn validate(&self) -> Vec<Problem> {
        let mut found = Found::default();
        self.top_problems(&mut found);
        self.limits.problems(&mut found.at("limits"));
        self.sessions.problems(&mut found.at("sessions"));
        self.streams.problems(&mut found.at("streams"));
        self.websocket.problems(&mut found.at("websocket"));
        self.holds.problems(&mut found.at("holds"));
        self.audit
            .problems(&mut found.at("audit"), self.sessions.store);
        self.publish.problems(&mut found.at("publish"));
        self.server.problems(&mut found.at("server"));
        if let Some(telemetry) = &self.telemetry {
            let mut at = found.at("telemetry");
            if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
                at.bad(
                    "sample_ratio",
                    format!("expected 0 to 1, got {}", telemetry.sample_ratio),
                );
            }
            if let Some(endpoint) = &telemetry.endpoint
                && !matches!(
                    Url::parse(endpoint)
                        .map(|u| u.scheme().to_owned())
                        .as_deref(),
                    Ok("http" | "https")
                )
            {
                at.bad(
                    "endpoint",
                    format!("expected an http(s) URL like `http://127.0.0.1:4318/v1/traces`, got `{endpoint}`"),
                );
            }
        }
        if self.orgs.is_empty() {
            found.bad("orgs", "expected at least one org");
        }
        for (name, org) in &self.orgs {
            if !is_path_segment(name) {
                found.bad(
                    &format!("orgs.{name}"),
                    format!(
                        "org name `{name}` must be a path segment of letters, digits, `-`, `_`, `.`"
                    ),
                );
            }
            org.problems(
                self.identity.is_some(),
                self.upstream_jwt.is_some(),
                &mut found.at(&format!("orgs.{name}")),
            );
        }
        if let Some(identity) = &self.identity {
            let introspects = self.orgs.values().any(|o| o.auth.uses_introspection());
            let exchanges = self.orgs.values().any(|o| {
                o.server_entries()
                    .iter()
                    .any(|e| matches!(e.upstream.auth, UpstreamAuth::TokenExchange { .. }))
            });
            let needs_client = if introspects {
                Some("introspection")
            } else if exchanges {
                Some("`upstream.auth: token-exchange`")
            } else {
                None
            };
            let mut at = found.at("identity");
            for (field, message) in identity.problems(needs_client) {
                at.bad(&field, message);
            }
        }
        found.problems
    }

    /// The top-level fields.
    fn top_problems(&self, found: &mut Found) {
        if !self.base_path.is_empty() {
            let ok = self.base_path.starts_with('/')
                && !self.base_path.ends_with('/')
                && self.base_path[1..].split('/').all(is_path_segment);
            if !ok {
                found.bad(
                    "base_path",
                    format!(
                        "expected an absolute path like `/api/v1/mcp` (leading slash, no trailing slash, \
                         segments of letters, digits, `-`, `_`, `.`), got `{}`",
                        self.base_path
                    ),
                );
            }
        }
        for (field, tls) in [("tls", &self.tls), ("admin_tls", &self.admin_tls)] {
            if let Some(tls) = tls {
                let mut at = found.at(field);
                for (sub, message) in tls.problems() {
                    if sub.is_empty() {
                        at.bad_here(message);
                    } else {
                        at.bad(&sub, message);
                    }
                }
            }
        }
        if let Some(jwt) = &self.upstream_jwt {
            let mut at = found.at("upstream_jwt");
            for (field, message) in jwt.problems() {
                at.bad(&field, message);
            }
        }
        if self.listen == self.admin_listen {
            found.bad(
                "admin_listen",
                format!("must differ from `listen` ({})", self.listen),
            );
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if let Err(why) = check_origin(origin) {
                found.bad(&format!("allowed_origins[{i}]"), why);
            }
        }
        if let Some(url) = &self.public_url {
            let ok = Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.query().is_none());
            if !ok || url.ends_with('/') {
                found.bad(
                    "public_url",
                    format!(
                        "expected a URL like `https://mcp.example.com` (no trailing slash), got `{url}`"
                    ),
                );
            }
        }
        if !self.backchannel_logout_path.starts_with('/') {
            found.bad(
                "backchannel_logout_path",
                "expected an absolute path like `/auth/backchannel-logout`",
            );
        }
    }
}

/// Problems found while checking a config, with the field path of each:
/// a section checks its own fields under its prefix ([`Found::at`]).
#[derive(Default)]
struct Found {
    problems: Vec<Problem>,
}

/// The problems of one section, whose fields are named under `prefix`.
struct Section<'a> {
    found: &'a mut Found,
    prefix: String,
}

impl Found {
    fn at(&mut self, prefix: &str) -> Section<'_> {
        Section {
            found: self,
            prefix: prefix.to_owned(),
        }
    }

    fn bad(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

impl Section<'_> {
    /// The section of field `field`, itself a section.
    fn sub(&mut self, field: &str) -> Section<'_> {
        Section {
            prefix: format!("{}.{field}", self.prefix),
            found: self.found,
        }
    }

    fn bad(&mut self, field: &str, message: impl Into<String>) {
        let path = format!("{}.{field}", self.prefix);
        self.found.bad(&path, message);
    }

    /// A problem with the section as a whole (a map key, say).
    fn bad_here(&mut self, message: impl Into<String>) {
        self.found.bad(&self.prefix, message);
    }

    /// A number that must lie in `1..=max`.
    fn between_1_and(&mut self, field: &str, value: usize, max: usize) {
        if value == 0 || value > max {
            self.bad(field, format!("expected between 1 and {max}, got {value}"));
        }
    }

    /// A number that must be at least `min`; `unit` names what it counts.
    fn at_least(&mut self, field: &str, value: usize, min: usize, unit: &str) {
        if value < min {
            self.bad(field, format!("expected at least {min}{unit}, got {value}"));
        }
    }

    /// A duration no longer than 30 days; with `example`, also positive.
    fn duration(&mut self, field: &str, d: Duration, example: Option<&str>) {
        if let Some(example) = example
            && d.is_zero()
        {
            self.bad(
                field,
                format!("expected a positive duration like `{example}`"),
            );
        }
        if d > MAX_DURATION {
            self.bad(
                field,
                format!("expected at most 30 days, got {}s", d.as_secs()),
            );
        }
    }
}

impl Limits {
    fn problems(&self, at: &mut Section) {
        if self.max_body_bytes == 0 || self.max_body_bytes > 64 * 1024 * 1024 {
            at.bad(
                "max_body_bytes",
                format!(
                    "expected between 1 and 67108864 bytes, got {}",
                    self.max_body_bytes
                ),
            );
        }
        at.at_least("max_answer_bytes", self.max_answer_bytes, 1024, " bytes");
        at.duration("body_read_timeout", self.body_read_timeout, Some("30s"));
        at.duration("head_read_timeout", self.head_read_timeout, Some("10s"));
        at.between_1_and("max_batch", self.max_batch, 1000);
        at.between_1_and("max_connections", self.max_connections, 10_000_000);
    }
}

impl SessionsConfig {
    fn problems(&self, at: &mut Section) {
        if self.event_log_size == 0 || self.event_log_size > 1_000_000 {
            at.bad(
                "event_log_size",
                format!(
                    "expected between 1 and 1000000 events, got {}",
                    self.event_log_size
                ),
            );
        }
        at.between_1_and("max_in_flight", self.max_in_flight, 100_000);
        at.between_1_and("max_per_subject", self.max_per_subject, 10_000_000);
        at.between_1_and("max_total", self.max_total, 100_000_000);
        at.between_1_and("max_subscriptions", self.max_subscriptions, 100_000);
        at.at_least("max_client_bytes", self.max_client_bytes, 256, " bytes");
        at.at_least("event_log_bytes", self.event_log_bytes, 1024, " bytes");
        if let Some(cluster) = &self.cluster {
            if self.store != StoreKind::Redis {
                at.bad(
                    "cluster",
                    "only used with `store: redis`; remove it, or add `store: redis`",
                );
            } else if self.url.is_some() || self.sentinel.is_some() {
                at.bad(
                    "cluster",
                    "give one of `url`, `sentinel` and `cluster`, not several",
                );
            } else {
                check_nodes(&mut at.sub("cluster"), "nodes", &cluster.nodes, "node");
                if hash_tag(&self.key_prefix).is_none() {
                    at.bad(
                        "key_prefix",
                        "with `cluster`, must hold a hash tag, e.g. `{ratatosk}:`, so that every key is in one slot",
                    );
                }
                if self.tls.is_some() && !cluster.tls {
                    at.bad("tls", "applies with `cluster.tls: true` only");
                }
            }
        }
        match (self.store, &self.url, &self.sentinel) {
            _ if self.cluster.is_some() => {}
            (StoreKind::Redis, None, Some(sentinel)) => {
                sentinel.check(&mut at.sub("sentinel"));
                if self.tls.is_some() && !sentinel.tls {
                    at.bad("tls", "applies with `sentinel.tls: true` only");
                }
            }
            (StoreKind::Redis, Some(_), Some(_)) => at.bad(
                "sentinel",
                "give either `url` (one Redis) or `sentinel` (the sentinels find the primary), not both",
            ),
            (StoreKind::Memory, _, Some(_)) => at.bad(
                "sentinel",
                "only used with `store: redis`; remove it, or add `store: redis`",
            ),
            (StoreKind::Redis, None, None) => at.bad(
                "url",
                "`store: redis` needs the Redis URL, e.g. `redis://127.0.0.1:6379/` or `${REDIS_URL}`; or `sentinel` or `cluster`",
            ),
            (StoreKind::Redis, Some(url), _)
                if !url.starts_with("redis://") && !url.starts_with("rediss://") =>
            {
                at.bad(
                    "url",
                    "expected a `redis://` URL, or `rediss://` for TLS",
                )
            }
            (StoreKind::Redis, Some(url), _) if url.contains("#insecure") => at.bad(
                "url",
                "`#insecure` is not supported: give the server's CA in `tls.ca_file`",
            ),
            (StoreKind::Redis, Some(url), _) if self.tls.is_some() && !url.starts_with("rediss://") => {
                at.bad("tls", "applies to a `rediss://` URL only")
            }
            (StoreKind::Memory, Some(_), _) => at.bad(
                "url",
                "only used with `store: redis`; remove it, or add `store: redis`",
            ),
            _ => {}
        }
        if let Some(wait) = &self.wait {
            if self.store != StoreKind::Redis {
                at.bad("wait", "only used with `store: redis`");
            }
            if !(1..=64).contains(&wait.replicas) {
                at.bad(
                    "wait.replicas",
                    format!("expected between 1 and 64, got {}", wait.replicas),
                );
            }
            if wait.timeout.is_zero() || wait.timeout > OP_TIMEOUT_MAX {
                at.bad(
                    "wait.timeout",
                    "expected more than 0 and at most 1s (a write waits this long at most)",
                );
            }
        }
        if let Some(tls) = &self.tls {
            if tls.insecure_skip_verify {
                at.bad(
                    "tls.insecure_skip_verify",
                    "is not supported for Redis: give the server's CA in `ca_file`",
                );
            } else if let Err(e) = tls.load() {
                at.bad(&format!("tls.{}", e.field), e.message);
            }
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || self.key_prefix.contains(char::is_whitespace)
        {
            at.bad(
                "key_prefix",
                "expected 1 to 64 characters without spaces, e.g. `ratatosk:`",
            );
        }
        if self.idle_ttl < Duration::from_secs(1) {
            at.bad("idle_ttl", "expected at least `1s`, e.g. `30m`");
        }
        at.duration("idle_ttl", self.idle_ttl, None);
    }
}

impl StreamsConfig {
    fn problems(&self, at: &mut Section) {
        if self.keepalive < Duration::from_millis(100) {
            at.bad("keepalive", "expected at least `100ms`, e.g. `15s`");
        }
        at.duration("keepalive", self.keepalive, None);
        at.duration("retry", self.retry, None);
    }
}

impl WebSocketConfig {
    fn problems(&self, at: &mut Section) {
        if let Some(max) = self.max_message_bytes {
            at.at_least("max_message_bytes", max, 1024, " bytes");
        }
        at.between_1_and("max_in_flight", self.max_in_flight, 1024);
        at.between_1_and("send_queue", self.send_queue, 65_536);
        at.duration("ping_interval", self.ping_interval, Some("20s"));
        at.duration("pong_timeout", self.pong_timeout, Some("20s"));
        at.duration("send_timeout", self.send_timeout, Some("30s"));
    }
}

impl HoldsConfig {
    fn problems(&self, at: &mut Section) {
        if self.default_timeout.is_zero() || self.default_timeout > self.max_timeout {
            at.bad(
                "default_timeout",
                "expected a positive duration no longer than `holds.max_timeout`",
            );
        }
        at.at_least("max_per_session", self.max_per_session, 1, "");
        at.at_least("max_waiting_calls", self.max_waiting_calls, 1, "");
        at.duration("max_timeout", self.max_timeout, None);
        at.duration("keep_finished", self.keep_finished, None);
    }
}

impl PublishConfig {
    fn problems(&self, at: &mut Section) {
        if self.secret.len() < 16 {
            at.bad(
                "secret",
                format!(
                    "expected a secret of at least 16 characters, got {} (set it from the environment, e.g. `${{RATATOSK_PUBLISH_SECRET}}`)",
                    self.secret.len()
                ),
            );
        }
    }
}

impl ServerConfig {
    fn problems(&self, at: &mut Section) {
        at.between_1_and("threads", self.threads, 1024);
        at.duration("shutdown_grace", self.shutdown_grace, None);
    }
}

impl OrgConfig {
    /// An org's fields; `identity` says whether the config has an
    /// identity provider, which auth modes other than `none` need, and
    /// `upstream_jwt` whether it has the key `gateway-jwt` upstreams need.
    fn problems(&self, identity: bool, upstream_jwt: bool, at: &mut Section) {
        let sources = Sources {
            upstream_jwt,
            caller_tokens: self.auth != AuthMode::None,
        };
        if self.auth != AuthMode::None && !identity {
            at.bad(
                "auth",
                format!(
                    "auth mode `{}` needs an `identity` section (the identity provider)",
                    self.auth.as_str()
                ),
            );
        }
        if self.auth == AuthMode::None && self.organization.is_some() {
            at.bad(
                "organization",
                "an organization can only be required of tokens: set `auth` to a mode other than `none`",
            );
        }
        if self.auth == AuthMode::None && !self.scopes.is_empty() {
            at.bad(
                "scopes",
                "scopes can only be required of tokens: set `auth` to a mode other than `none`",
            );
        }
        if let Some(registration) = &self.registration {
            let mut at = at.sub("registration");
            if self.upstream.is_some() {
                at.bad_here(
                    "servers register beside `servers`, not `upstream` (the one-server shorthand): move the upstream under `servers`",
                );
            }
            if registration.secret.as_ref().is_some_and(|s| s.len() < 16) {
                at.bad(
                    "secret",
                    "expected a secret of at least 16 characters (set it from the environment, e.g. `${TEAM_REGISTRATION_SECRET}`)",
                );
            }
            at.between_1_and("max_servers", registration.max_servers, 1024);
            if registration.max_ttl < MIN_REGISTRATION_TTL
                || registration.max_ttl > Duration::from_secs(86_400)
            {
                at.bad("max_ttl", "expected between 1s and 24h");
            }
        }
        match (&self.upstream, self.servers.is_empty()) {
            // Its servers may all register themselves.
            (None, true) if self.registration.is_some() => self.servers_problems(sources, at),
            (None, true) => at.bad(
                "upstream",
                "expected `upstream` (the org's one server) or `servers` (several, by name), or `registration`",
            ),
            (Some(upstream), false) => {
                at.bad(
                    "servers",
                    "give either `upstream` (the one-server shorthand) or `servers`, not both",
                );
                upstream.problems(sources, &mut at.sub("upstream"));
                self.servers_problems(sources, at);
            }
            (Some(upstream), true) => {
                upstream.problems(sources, &mut at.sub("upstream"));
                if self.separator.is_some() {
                    at.bad(
                        "separator",
                        "only used with `servers`: the one-server shorthand has no prefix",
                    );
                }
            }
            (None, false) => self.servers_problems(sources, at),
        }
        let mut names = BTreeMap::new();
        let server_rules = self.servers.iter().flat_map(|(server, s)| {
            s.policy
                .iter()
                .enumerate()
                .map(move |(i, r)| (format!("servers.{server}.policy[{i}]"), r))
        });
        let org_rules = self
            .policy
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("policy[{i}]"), r));
        for (path, rule) in org_rules.chain(server_rules) {
            rule_problems(rule, &path, &mut names, at);
        }
        self.rate_limit_problems(at);
    }

    /// `rate_limits`: names, rates, bursts and what they select.
    fn rate_limit_problems(&self, at: &mut Section) {
        let mut names = BTreeMap::new();
        for (i, limit) in self.rate_limits.iter().enumerate() {
            let mut at = at.sub(&format!("rate_limits[{i}]"));
            let name = &limit.name;
            if name.is_empty() || name.len() > 64 || !is_name_part(name) {
                at.bad("name", "expected a name of 1 to 64 of `A-Z a-z 0-9 _ - .`");
            } else if let Some(first) = names.insert(name.as_str(), i) {
                at.bad(
                    "name",
                    format!("`{name}` is also the name of rate_limits[{first}]; each limit needs its own"),
                );
            }
            let rate = limit.rate;
            if rate.count == 0 || rate.period.is_zero() || rate.period > Duration::from_secs(86_400)
            {
                at.bad(
                    "rate",
                    format!(
                        "expected at least 1 request per a period of at most a day, got {rate}"
                    ),
                );
            } else if rate.interval() < Duration::from_micros(1) {
                at.bad(
                    "rate",
                    format!("{rate} is more than one request per microsecond"),
                );
            }
            if let Some(burst) = limit.burst
                && (burst == 0 || burst > 1_000_000)
            {
                at.bad(
                    "burst",
                    format!("expected between 1 and 1000000, got {burst}"),
                );
            } else if rate
                .interval()
                .saturating_mul(limit.burst.unwrap_or(rate.count))
                > MAX_RATE_SPAN
            {
                at.bad(
                    "burst",
                    format!(
                        "with {rate}, a burst this large takes more than a year to fill up again"
                    ),
                );
            }
            for (j, method) in limit.methods.iter().enumerate() {
                if method.is_empty() || method.len() > 128 {
                    at.bad(
                        &format!("methods[{j}]"),
                        "expected a method name like `tools/call`",
                    );
                }
            }
            if !limit.tools.is_empty()
                && !limit.methods.is_empty()
                && !limit.methods.iter().any(|m| m == "tools/call")
            {
                at.bad(
                    "tools",
                    "tools are named by `tools/call` only: add it to `methods`, or leave `methods` out",
                );
            }
            for (j, tool) in limit.tools.iter().enumerate() {
                if let Err(e) = globset::Glob::new(tool) {
                    at.bad(&format!("tools[{j}]"), format!("not a glob: {e}"));
                }
            }
            for (j, server) in limit.servers.iter().enumerate() {
                if !self.servers.contains_key(server) {
                    let known: Vec<&str> = self.servers.keys().map(String::as_str).collect();
                    at.bad(
                        &format!("servers[{j}]"),
                        if known.is_empty() {
                            format!(
                                "`{server}`: the org has no `servers` (only the one `upstream`)"
                            )
                        } else {
                            format!(
                                "the org has no server `{server}` (it has {})",
                                known.join(", ")
                            )
                        },
                    );
                }
            }
        }
    }

    /// `servers`: names, prefixes and the separator.
    fn servers_problems(&self, sources: Sources, at: &mut Section) {
        let separator = self.separator();
        if separator.is_empty() || separator.len() > MAX_SEPARATOR || !is_name_part(separator) {
            at.bad(
                "separator",
                format!(
                    "expected 1 to {MAX_SEPARATOR} of `A-Z a-z 0-9 _ - .` (the characters of MCP names), got `{separator}`"
                ),
            );
        }
        let mut prefixes: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, server) in &self.servers {
            let mut at = at.sub(&format!("servers.{name}"));
            if !is_path_segment(name) {
                at.bad_here(format!(
                    "server name `{name}` must be a path segment of letters, digits, `-`, `_`, `.`"
                ));
            } else if ENDPOINT_NAMES.contains(&name.as_str()) {
                at.bad_here(format!(
                    "server name `{name}` is an endpoint name ({}); choose another",
                    ENDPOINT_NAMES.join(", ")
                ));
            }
            let prefix = server.prefix.as_deref().unwrap_or(name);
            let field = if server.prefix.is_some() {
                "prefix"
            } else {
                // The name is the prefix: the problem is the name's.
                ""
            };
            let mut bad_prefix = |message: String| {
                if field.is_empty() {
                    at.bad_here(message);
                } else {
                    at.bad(field, message);
                }
            };
            if prefix.len() > MAX_PREFIX || !is_name_part(prefix) {
                bad_prefix(format!(
                    "a prefix must be at most {MAX_PREFIX} of `A-Z a-z 0-9 _ - .` (the characters of MCP names), got `{prefix}`"
                ));
            } else if !separator.is_empty() && prefix.contains(separator) {
                bad_prefix(format!(
                    "prefix `{prefix}` contains the separator `{separator}`, so prefixed names could not be told apart; set `prefix`, or `separator`"
                ));
            } else if let Some(other) = prefixes.insert(prefix, name) {
                bad_prefix(format!(
                    "prefix `{prefix}` is also server `{other}`'s: each server needs its own"
                ));
            }
            match &server.openapi {
                None => server.upstream.problems(sources, &mut at.sub("upstream")),
                Some(openapi) => {
                    let mut at = at.sub("openapi");
                    openapi.problems(&mut at);
                    if !server.upstream.replicas.is_empty() {
                        // Its auth, as an upstream's.
                        server.upstream.problems(sources, &mut at);
                    }
                }
            }
        }
    }
}

/// What an org offers its upstreams' `auth` modes.
#[derive(Clone, Copy)]
struct Sources {
    /// The top-level `upstream_jwt` key, for `gateway-jwt`.
    upstream_jwt: bool,
    /// Callers with tokens (an `auth` mode other than `none`), for
    /// `token-exchange`.
    caller_tokens: bool,
}

/// A policy rule's problems; `names` are the rule names of the org so far.
fn rule_problems(
    rule: &PolicyRule,
    path: &str,
    names: &mut BTreeMap<String, String>,
    at: &mut Section,
) {
    if rule.name.is_empty() || rule.name.len() > 64 || rule.name.contains(char::is_whitespace) {
        at.bad(
            &format!("{path}.name"),
            "expected a name of 1 to 64 characters without spaces",
        );
    } else if let Some(first) = names.insert(rule.name.clone(), path.to_owned()) {
        at.bad(
            &format!("{path}.name"),
            format!(
                "rule name `{}` is also the name of {first}; each rule needs its own",
                rule.name
            ),
        );
    }
    if rule.allow.is_empty() && rule.deny.is_empty() {
        at.bad(
            path,
            "a rule needs `allow` or `deny` (tools, prompts or resources)",
        );
    }
    for (at_rule, why) in rule.bad_globs() {
        at.bad(&format!("{path}.{at_rule}"), why);
    }
}

impl UpstreamConfig {
    /// `sources`: what the org offers the `auth` modes.
    fn problems(&self, sources: Sources, at: &mut Section) {
        if self.replicas.is_empty() {
            at.bad("replicas", "expected at least one replica URL");
        }
        match &self.auth {
            UpstreamAuth::GatewayJwt { .. } if !sources.upstream_jwt => at.bad(
                "auth",
                "`gateway-jwt` needs the top-level `upstream_jwt` (its signing key)",
            ),
            UpstreamAuth::Static { header, value } => {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    at.bad("auth.header", format!("`{header}` is not a header name"));
                }
                if value.is_empty() || http::HeaderValue::from_str(value).is_err() {
                    at.bad(
                        "auth.value",
                        "expected a non-empty header value (from the environment: `${NAME}`)",
                    );
                }
            }
            UpstreamAuth::TokenExchange { audience, scopes } => {
                if !sources.caller_tokens {
                    at.bad(
                        "auth",
                        "`token-exchange` exchanges the caller's token: the org needs an `auth` mode other than `none`",
                    );
                }
                if audience.trim().is_empty() || audience.chars().any(char::is_control) {
                    at.bad(
                        "auth.audience",
                        "expected the upstream's client id at the identity provider",
                    );
                }
                for (i, scope) in scopes.iter().enumerate() {
                    if let Err(why) = ratatosk_auth::config::check_scope(scope) {
                        at.bad(&format!("auth.scopes[{i}]"), why);
                    }
                }
            }
            _ => {}
        }
        if let Some(tls) = &self.tls {
            if let Err(e) = tls.load() {
                at.bad(&format!("tls.{}", e.field), e.message);
            }
            if !self.replicas.iter().any(|r| r.starts_with("https://")) {
                at.bad("tls", "applies to `https://` replicas, and none is listed");
            }
        }
        for (i, replica) in self.replicas.iter().enumerate() {
            if let Err(why) = check_replica_url(replica) {
                at.bad(&format!("replicas[{i}]"), why);
            }
            if self.replicas[..i].contains(replica) {
                at.bad(
                    &format!("replicas[{i}]"),
                    format!("`{replica}` is listed twice"),
                );
            }
        }
        at.at_least(
            "max_input_rounds",
            self.max_input_rounds as usize,
            1,
            " round",
        );
        at.duration("timeout", self.timeout, Some("60s"));
        at.duration("max_duration", self.max_duration, Some("10m"));
        at.duration("connect_timeout", self.connect_timeout, Some("2s"));
        at.duration("eject_for", self.eject_for, None);
    }
}

fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An allowed origin must be exactly what browsers send: scheme, host and
/// optional port, nothing else.
fn check_origin(origin: &str) -> Result<(), String> {
    let url = Url::parse(origin).map_err(|e| {
        format!("expected an origin like `https://app.example.com`, got `{origin}` ({e})")
    })?;
    let serialized = url.origin().ascii_serialization();
    if !matches!(url.scheme(), "http" | "https") || serialized != origin {
        return Err(format!(
            "expected an origin like `https://app.example.com` (scheme, host, optional port; no path or trailing slash), got `{origin}`"
        ));
    }
    Ok(())
}

fn check_replica_url(replica: &str) -> Result<(), String> {
    let url = Url::parse(replica).map_err(|e| {
        format!("expected a URL like `http://127.0.0.1:8000/mcp`, got `{replica}` ({e})")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "expected an `http://` or `https://` URL, got `{replica}`"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("expected a host in `{replica}`"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("expected no query or fragment in `{replica}`"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "expected no user or password in the URL: it would show in metrics and logs".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123";

    fn minimal() -> String {
        format!(
            r#"
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
publish:
  secret: {SECRET}
orgs:
  org-1:
    upstream:
      era: stateless-2025
      replicas: [http://127.0.0.1:9001/mcp]
"#
        )
    }

    fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml(text, Path::new("gw.yaml"), &move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_with(text, &[])
    }

    fn only_problem(err: ConfigError) -> Problem {
        let problems = err.problems().to_vec();
        assert_eq!(problems.len(), 1, "expected one problem, got {problems:?}");
        problems.into_iter().next().expect("one problem")
    }

    #[test]
    fn rate_limits_are_checked_with_the_org_they_belong_to() {
        let text = format!(
            r#"{}    rate_limits:
      - {{name: calls, rate: 10/s, methods: [tools/call], tools: ["x*"]}}
      - {{name: calls, rate: 0/s}}
      - {{name: "bad name", rate: ten}}
"#,
            minimal()
        );
        // A rate that does not parse is a problem of the file's shape.
        let problem = only_problem(parse(&text).expect_err("invalid"));
        assert_eq!(problem.path, "orgs.org-1.rate_limits[2].rate");
        assert!(problem.message.contains("`10/s`"), "{problem}");
        let text = format!(
            r#"{}    rate_limits:
      - {{name: calls, rate: 10/s, burst: 0, servers: [fs], methods: [prompts/get], tools: [x]}}
      - {{name: calls, rate: 0/s}}
"#,
            minimal()
        );
        let err = parse(&text).expect_err("invalid");
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "orgs.org-1.rate_limits[0].burst",
                "orgs.org-1.rate_limits[0].tools",
                "orgs.org-1.rate_limits[0].servers[0]",
                "orgs.org-1.rate_limits[1].name",
                "orgs.org-1.rate_limits[1].rate",
            ]
        );
        let slow = format!(
            "{}    rate_limits:\n      - {{name: slow, rate: 1/d, burst: 1000}}\n",
            minimal()
        );
        let problem = only_problem(parse(&slow).expect_err("a budget of 1000 days"));
        assert_eq!(problem.path, "orgs.org-1.rate_limits[0].burst");
        assert!(problem.message.contains("more than a year"), "{problem}");
        let good = format!(
            "{}    rate_limits:\n      - {{name: calls, rate: 600/min, per: client}}\n",
            minimal()
        );
        let c = parse(&good).expect("valid");
        let limit = &c.orgs["org-1"].rate_limits[0];
        assert_eq!(limit.rate.interval(), Duration::from_millis(100));
        assert_eq!(limit.per, RatePer::Client);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&minimal()).expect("valid");
        assert_eq!(c.base_path, "");
        assert_eq!(c.limits.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(c.sessions.event_log_size, 256);
        assert_eq!(c.streams.keepalive, Duration::from_secs(15));
        let org = &c.orgs["org-1"];
        assert_eq!(org.auth, AuthMode::None);
        let upstream = org.upstream.as_ref().expect("the shorthand");
        assert_eq!(upstream.era, Era::Stateless2025);
        assert_eq!(upstream.timeout, Duration::from_secs(60));
        let entries = org.server_entries();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].name, entries[0].prefix), (None, ""));
    }

    #[test]
    fn unknown_field_names_its_path_and_the_expected_fields() {
        let text = minimal().replace("      era:", "      eras: x\n      era:");
        let err = parse(&text).expect_err("unknown field");
        let p = only_problem(err);
        assert!(p.path.starts_with("orgs.org-1.upstream"), "{p:?}");
        assert!(p.message.contains("unknown field `eras`"), "{p:?}");
        assert!(p.message.contains("`replicas`"), "{p:?}");
    }

    #[test]
    fn error_display_names_file_path_and_expectation() {
        let text = minimal().replace("stateless-2025", "stateless-2099");
        let err = parse(&text).expect_err("bad era");
        let shown = err.to_string();
        assert!(
            shown.starts_with("gw.yaml: at `orgs.org-1.upstream.era`"),
            "{shown}"
        );
        assert!(shown.contains("stateless-2025"), "{shown}");
    }

    #[test]
    fn bad_duration_is_reported_at_its_field() {
        let text = format!("{}sessions:\n  idle_ttl: forever\n", minimal());
        let p = only_problem(parse(&text).expect_err("bad duration"));
        assert_eq!(p.path, "sessions.idle_ttl");
    }

    #[test]
    fn env_placeholders_expand_and_missing_ones_are_errors() {
        let text = minimal()
            .replace(SECRET, "${PUB_SECRET}")
            .replace("127.0.0.1:8080", "${LISTEN:-127.0.0.1:8181}");
        let c = parse_with(&text, &[("PUB_SECRET", "from-the-environment-1")]).expect("valid");
        assert_eq!(c.publish.secret, "from-the-environment-1");
        assert_eq!(c.listen.port(), 8181);

        let p = only_problem(parse(&text).expect_err("missing env"));
        assert_eq!(p.path, "publish.secret");
        assert!(p.message.contains("`PUB_SECRET` is not set"), "{p:?}");
    }

    #[test]
    fn the_session_store_is_memory_unless_redis_is_asked_for_with_a_url() {
        let c = parse(&minimal()).expect("valid");
        assert_eq!(c.sessions.store, StoreKind::Memory);
        let redis = format!(
            "{}sessions:\n  store: redis\n  url: ${{REDIS_URL}}\n  key_prefix: \"gw1:\"\n",
            minimal()
        );
        let c =
            parse_with(&redis, &[("REDIS_URL", "redis://:pw@127.0.0.1:6379/0")]).expect("valid");
        assert_eq!(c.sessions.store, StoreKind::Redis);
        assert_eq!(
            c.sessions.url.as_deref(),
            Some("redis://:pw@127.0.0.1:6379/0")
        );
        assert_eq!(c.sessions.key_prefix, "gw1:");
        for (extra, path, says) in [
            ("  store: redis\n", "sessions.url", "needs the Redis URL"),
            (
                "  store: redis\n  url: http://x\n",
                "sessions.url",
                "redis://",
            ),
            (
                "  url: redis://127.0.0.1/\n",
                "sessions.url",
                "only used with `store: redis`",
            ),
            (
                "  key_prefix: \"a b\"\n",
                "sessions.key_prefix",
                "without spaces",
            ),
        ] {
            let text = format!("{}sessions:\n{extra}", minimal());
            let p = only_problem(parse(&text).expect_err(extra));
            assert_eq!(p.path, path);
            assert!(p.message.contains(says), "{p:?}");
        }
    }

    #[test]
    fn sentinel_or_cluster_stand_in_for_the_url_and_wait_is_checked() {
        let text = format!(
            "{}sessions:\n  store: redis\n  sentinel: {{master_name: main, nodes: [\"127.0.0.1:26379\", \"[::1]:26380\"], password: \"${{PW}}\", db: 2}}\n  wait: {{replicas: 1, timeout: 100ms}}\n",
            minimal()
        );
        let c = parse_with(&text, &[("PW", "pw-s3cr3t")]).expect("valid");
        let target = c.sessions.redis().expect("target").expect("redis");
        let sentinel = target.sentinel.as_ref().expect("sentinel");
        assert_eq!(sentinel.master_name, "main");
        assert_eq!(sentinel.nodes, ["127.0.0.1:26379", "[::1]:26380"]);
        assert_eq!(
            (sentinel.password.as_deref(), sentinel.db),
            (Some("pw-s3cr3t"), 2)
        );
        assert!(
            !format!("{target:?}").contains("pw-s3cr3t") && !format!("{c:?}").contains("pw-s3cr3t"),
            "Debug keeps passwords out"
        );
        let text = format!(
            "{}sessions:\n  store: redis\n  key_prefix: \"{{gw}}:\"\n  cluster: {{nodes: [\"127.0.0.1:7000\"], password: \"${{PW}}\"}}\n",
            minimal()
        );
        let clustered = parse_with(&text, &[("PW", "pw-s3cr3t")]).expect("valid");
        let target = clustered.sessions.redis().expect("target").expect("redis");
        let cluster = target.cluster.as_ref().expect("cluster");
        assert_eq!(
            (cluster.nodes.as_slice(), cluster.key.as_str()),
            (&["127.0.0.1:7000".to_owned()][..], "{gw}:")
        );
        assert!(
            !format!("{target:?}").contains("pw-s3cr3t")
                && !format!("{clustered:?}").contains("pw-s3cr3t")
        );
        let wait = c.sessions.wait.expect("wait");
        assert_eq!(
            (wait.replicas, wait.timeout),
            (1, Duration::from_millis(100))
        );
        for (sessions, path, says) in [
            (
                "{store: redis, url: \"redis://127.0.0.1/\", sentinel: {master_name: m, nodes: [\"h:1\"]}}",
                "sessions.sentinel",
                "not both",
            ),
            (
                "{store: redis, sentinel: {master_name: m, nodes: []}}",
                "sessions.sentinel.nodes",
                "at least one",
            ),
            (
                "{store: redis, sentinel: {master_name: m, nodes: [\"h\"]}}",
                "sessions.sentinel.nodes[0]",
                "host:port",
            ),
            (
                "{store: redis, sentinel: {master_name: \" \", nodes: [\"h:1\"]}}",
                "sessions.sentinel.master_name",
                "name",
            ),
            (
                "{sentinel: {master_name: m, nodes: [\"h:1\"]}}",
                "sessions.sentinel",
                "only used with `store: redis`",
            ),
            (
                "{store: redis, url: \"redis://h/\", wait: {replicas: 0, timeout: 1s}}",
                "sessions.wait.replicas",
                "between 1 and 64",
            ),
            (
                "{store: redis, url: \"redis://h/\", wait: {replicas: 1, timeout: 5s}}",
                "sessions.wait.timeout",
                "at most 1s",
            ),
            (
                "{wait: {replicas: 1, timeout: 1s}}",
                "sessions.wait",
                "only used with `store: redis`",
            ),
            (
                "{store: redis, key_prefix: \"gw:\", cluster: {nodes: [\"h:1\"]}}",
                "sessions.key_prefix",
                "hash tag",
            ),
            (
                "{store: redis, key_prefix: \"{}gw:\", cluster: {nodes: [\"h:1\"]}}",
                "sessions.key_prefix",
                "hash tag",
            ),
            (
                "{store: redis, key_prefix: \"{gw}\", cluster: {nodes: [\"h\"]}}",
                "sessions.cluster.nodes[0]",
                "host:port",
            ),
            (
                "{store: redis, url: \"redis://h/\", key_prefix: \"{gw}\", cluster: {nodes: [\"h:1\"]}}",
                "sessions.cluster",
                "not several",
            ),
        ] {
            let text = format!("{}sessions: {sessions}\n", minimal());
            let p = only_problem(parse(&text).expect_err(sessions));
            assert_eq!(p.path, path, "{sessions}");
            assert!(p.message.contains(says), "{p:?}");
        }
    }

    #[test]
    fn tls_files_and_urls_are_checked_where_they_are_named() {
        let text = format!(
            "{}tls: {{cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}}\n",
            minimal()
        );
        let p = only_problem(parse(&text).expect_err("missing files"));
        assert_eq!(p.path, "tls");
        assert!(p.message.contains("/nonexistent/c.pem"), "{p:?}");

        let https = minimal().replace("http://127.0.0.1:9001/mcp", "https://127.0.0.1:9001/mcp");
        assert_ne!(https, minimal(), "the minimal config names the replica");
        let c = parse(&https).expect("https replicas are fine");
        assert!(c.insecure_tls().is_empty());
        let insecure = https.replace(
            "replicas: [https://127.0.0.1:9001/mcp]",
            "replicas: [https://127.0.0.1:9001/mcp]\n      tls: {insecure_skip_verify: true}",
        );
        assert_eq!(parse(&insecure).expect("valid").insecure_tls(), ["org-1"]);
        let plain_with_tls = minimal().replace(
            "replicas: [http://127.0.0.1:9001/mcp]",
            "replicas: [http://127.0.0.1:9001/mcp]\n      tls: {ca_file: /nonexistent/ca.pem}",
        );
        let problems = parse(&plain_with_tls).expect_err("two problems");
        let paths: Vec<&str> = problems
            .problems()
            .iter()
            .map(|p| p.path.as_str())
            .collect();
        assert_eq!(
            paths,
            ["orgs.org-1.upstream.tls.ca_file", "orgs.org-1.upstream.tls"]
        );

        for (sessions, path, says) in [
            ("url: \"rediss://127.0.0.1/\"", None, ""),
            (
                "url: \"rediss://127.0.0.1/#insecure\"",
                Some("sessions.url"),
                "#insecure",
            ),
            (
                "url: \"redis://127.0.0.1/\", tls: {ca_file: /nonexistent/ca.pem}",
                Some("sessions.tls"),
                "`rediss://`",
            ),
            (
                "url: \"rediss://127.0.0.1/\", tls: {insecure_skip_verify: true}",
                Some("sessions.tls.insecure_skip_verify"),
                "not supported",
            ),
        ] {
            let text = format!("{}sessions: {{store: redis, {sessions}}}\n", minimal());
            match path {
                None => assert!(parse(&text).is_ok(), "{sessions}"),
                Some(path) => {
                    let err = parse(&text).expect_err(sessions);
                    let p = err
                        .problems()
                        .iter()
                        .find(|p| p.path == path)
                        .unwrap_or_else(|| panic!("no problem at {path}: {err}"));
                    assert!(p.message.contains(says), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn upstream_auth_modes_are_checked() {
        let with = |auth: &str| {
            minimal().replace(
                "replicas: [http://127.0.0.1:9001/mcp]",
                &format!("replicas: [http://127.0.0.1:9001/mcp]\n      auth: {auth}"),
            )
        };
        let c = parse(&with("{mode: static, header: X-Api-Key, value: k}")).expect("static");
        assert!(matches!(
            &c.orgs["org-1"].upstream.as_ref().expect("upstream").auth,
            UpstreamAuth::Static { header, .. } if header == "X-Api-Key"
        ));
        assert!(
            !format!("{c:?}").contains("value: \"k\""),
            "the value is redacted"
        );
        for (auth, path, says) in [
            (
                "{mode: gateway-jwt}",
                "orgs.org-1.upstream.auth",
                "needs the top-level `upstream_jwt`",
            ),
            (
                "{mode: static, header: \"a b\", value: k}",
                "orgs.org-1.upstream.auth.header",
                "not a header name",
            ),
            (
                "{mode: static, value: \"\"}",
                "orgs.org-1.upstream.auth.value",
                "non-empty",
            ),
        ] {
            let p = only_problem(parse(&with(auth)).expect_err(auth));
            assert_eq!(p.path, path, "{auth}");
            assert!(p.message.contains(says), "{p:?}");
        }
        let err = parse(&with("{mode: passthrough}")).expect_err("unknown mode");
        assert!(
            err.to_string().contains("unknown variant `passthrough`"),
            "{err}"
        );
        let err = parse(&with("{mode: headers, audience: x}")).expect_err("unknown field");
        assert!(err.to_string().contains("audience"), "{err}");
    }

    #[test]
    fn token_exchange_needs_callers_with_tokens_and_the_gateways_client() {
        let exchange = "{mode: token-exchange, audience: tickets, scopes: [\"tickets:read\"]}";
        let text = minimal().replace(
            "replicas: [http://127.0.0.1:9001/mcp]",
            &format!("replicas: [http://127.0.0.1:9001/mcp]\n      auth: {exchange}"),
        );
        let p = only_problem(parse(&text).expect_err("auth none"));
        assert_eq!(p.path, "orgs.org-1.upstream.auth");
        assert!(
            p.message.contains("needs an `auth` mode other than `none`"),
            "{p:?}"
        );
        let identity = "identity:\n  issuer: http://kc/realms/r\n  audience: http://gw\n";
        let with_jwt = format!(
            "{}{identity}",
            text.replace("  org-1:\n", "  org-1:\n    auth: jwt\n")
        );
        let problems = parse(&with_jwt).expect_err("no client").problems().to_vec();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["identity.client_id", "identity.client_secret"],
            "{problems:?}"
        );
        assert!(
            problems[0]
                .message
                .contains("`upstream.auth: token-exchange` needs"),
            "{problems:?}"
        );
        let complete = format!("{with_jwt}  client_id: gw\n  client_secret: s\n");
        let c = parse(&complete).expect("valid");
        assert_eq!(
            c.orgs["org-1"].upstream.as_ref().expect("upstream").auth,
            UpstreamAuth::TokenExchange {
                audience: "tickets".into(),
                scopes: vec!["tickets:read".into()]
            }
        );
        let bad = complete.replace("tickets:read", "two words");
        let p = only_problem(parse(&bad).expect_err("bad scope"));
        assert_eq!(p.path, "orgs.org-1.upstream.auth.scopes[0]");
    }

    #[test]
    fn the_audit_goes_to_redis_only_where_sessions_do() {
        let text = format!("{}audit: {{sink: redis}}\n", minimal());
        let p = only_problem(parse(&text).expect_err("no redis"));
        assert_eq!(p.path, "audit.sink");
        assert!(p.message.contains("needs `sessions.store: redis`"), "{p:?}");
        let text = format!(
            "{}audit: {{sink: redis, max_entries: 1000}}\nsessions: {{store: redis, url: \"redis://127.0.0.1/\"}}\n",
            minimal()
        );
        assert_eq!(parse(&text).expect("valid").audit.max_entries, 1000);
    }

    #[test]
    fn whole_placeholder_becomes_a_number() {
        let text = format!("{}limits:\n  max_body_bytes: ${{MAXB}}\n", minimal());
        let c = parse_with(&text, &[("MAXB", "1024")]).expect("valid");
        assert_eq!(c.limits.max_body_bytes, 1024);
    }

    #[test]
    fn semantic_rules_report_every_problem() {
        let text = r#"
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:8080
base_path: api/
allowed_origins: ["http://localhost:6274/", "http://ok.example"]
publish:
  secret: short
holds: {max_waiting_calls: 0}
sessions: {max_total: 0, idle_ttl: 100d}
orgs:
  "bad org":
    upstream:
      era: stateless-2025
      replicas: []
  org-2:
    upstream:
      era: stateless-2025
      replicas: ["ws://x/mcp", "ftp://y", "http://a/mcp", "http://a/mcp"]
"#;
        let err = parse(text).expect_err("invalid");
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "base_path",
            "admin_listen",
            "allowed_origins[0]",
            "publish.secret",
            "holds.max_waiting_calls",
            "sessions.max_total",
            "sessions.idle_ttl",
            "orgs.bad org",
            "orgs.bad org.upstream.replicas",
            "orgs.org-2.upstream.replicas[0]",
            "orgs.org-2.upstream.replicas[1]",
            "orgs.org-2.upstream.replicas[3]",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
        assert!(!paths.contains(&"allowed_origins[1]"), "{paths:?}");
        assert!(err.to_string().contains("problems:"));
    }

    #[test]
    fn absurd_durations_and_credentials_in_urls_are_refused() {
        let text = minimal()
            .replace(
                "era: stateless-2025",
                "era: stateless-2025\n      max_duration: 100years",
            )
            .replace(
                "http://127.0.0.1:9001/mcp",
                "http://user:pw@127.0.0.1:9001/mcp",
            );
        let err = parse(&text).expect_err("invalid");
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert!(
            paths.contains(&"orgs.org-1.upstream.max_duration"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"orgs.org-1.upstream.replicas[0]"),
            "{paths:?}"
        );
    }

    #[test]
    fn auth_needs_an_identity_provider_and_introspection_its_secret() {
        let text = minimal().replace(
            "era: stateless-2025",
            "era: stateless-2025\n    auth: introspect",
        );
        let text = text.replace(
            "    upstream:\n      era: stateless-2025\n    auth: introspect",
            "    auth: introspect\n    upstream:\n      era: stateless-2025",
        );
        let p = only_problem(parse(&text).expect_err("no identity"));
        assert_eq!(p.path, "orgs.org-1.auth");
        assert!(p.message.contains("identity"), "{p:?}");

        let with_identity = format!(
            "{text}identity:\n  issuer: http://kc/realms/r\n  audience: http://gw\n  client_id: gw\n"
        );
        let p = only_problem(parse(&with_identity).expect_err("no secret"));
        assert_eq!(p.path, "identity.client_secret");

        let complete = format!("{with_identity}  client_secret: s\n");
        let c = parse(&complete).expect("valid");
        assert_eq!(c.orgs["org-1"].auth, AuthMode::Introspect);
        assert_eq!(c.public_url(), "http://127.0.0.1:8080");
    }

    #[test]
    fn not_yaml_is_reported() {
        let p = only_problem(parse("listen: [unclosed").expect_err("bad yaml"));
        assert!(p.message.starts_with("not valid YAML"), "{p:?}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let text = minimal().replace("admin_listen: 127.0.0.1:9090\n", "");
        let p = only_problem(parse(&text).expect_err("missing"));
        assert!(p.message.contains("missing field `admin_listen`"), "{p:?}");
    }

    #[test]
    fn secret_is_not_printed_by_debug() {
        let c = parse(&minimal()).expect("valid");
        assert!(!format!("{c:?}").contains(SECRET));
    }

    fn with_orgs(orgs: &str) -> String {
        format!(
            "listen: 127.0.0.1:8080\nadmin_listen: 127.0.0.1:9090\npublish:\n  secret: {SECRET}\norgs:\n{orgs}"
        )
    }

    #[test]
    fn an_org_has_its_servers_by_name_with_their_prefixes() {
        let c = parse(&with_orgs(
            r#"
  org-1:
    separator: "."
    servers:
      tickets: { upstream: { era: stateless-2025, replicas: [http://127.0.0.1:9001/mcp] } }
      files: { upstream: { era: stateful-2025, replicas: [http://127.0.0.1:9002/mcp] }, prefix: fs }
      search: { upstream: { era: modern, replicas: [http://127.0.0.1:9003/mcp] }, prefix: "" }
"#,
        ))
        .expect("valid");
        let org = &c.orgs["org-1"];
        assert_eq!(org.separator(), ".");
        let entries: Vec<(Option<&str>, &str, Era)> = org
            .server_entries()
            .iter()
            .map(|e| (e.name, e.prefix, e.upstream.era))
            .collect();
        assert_eq!(
            entries,
            [
                (Some("files"), "fs", Era::Stateful2025),
                (Some("search"), "", Era::Modern),
                (Some("tickets"), "tickets", Era::Stateless2025),
            ]
        );
    }

    #[test]
    fn check_names_every_problem_of_servers_with_its_path() {
        let text = with_orgs(
            r#"
  neither: {}
  both:
    upstream: { era: modern, replicas: [http://127.0.0.1:9001/mcp] }
    servers:
      a: { upstream: { era: modern, replicas: [http://127.0.0.1:9002/mcp] } }
  shorthand:
    separator: "::"
    upstream: { era: modern, replicas: [http://127.0.0.1:9001/mcp] }
  org-1:
    separator: "::"
    servers:
      sse: { upstream: { era: modern, replicas: [http://127.0.0.1:9001/mcp] } }
      a: { upstream: { era: modern, replicas: [http://127.0.0.1:9002/mcp] }, prefix: x }
      b: { upstream: { era: modern, replicas: [http://127.0.0.1:9003/mcp] }, prefix: x }
      c: { upstream: { era: modern, replicas: [] }, prefix: "a b" }
  org-2:
    servers:
      one: { upstream: { era: modern, replicas: [http://127.0.0.1:9001/mcp] }, prefix: "p__q" }
      two: { upstream: { era: modern, replicas: [http://127.0.0.1:9002/mcp] }, prefix: "" }
      three: { upstream: { era: modern, replicas: [http://127.0.0.1:9003/mcp] }, prefix: "" }
"#,
        );
        let err = parse(&text).expect_err("invalid");
        let found: Vec<(String, String)> = err
            .problems()
            .iter()
            .map(|p| (p.path.clone(), p.message.clone()))
            .collect();
        let has = |path: &str, words: &str| {
            assert!(
                found.iter().any(|(p, m)| p == path && m.contains(words)),
                "no problem at {path} saying {words:?} in {found:#?}"
            );
        };
        has("orgs.neither.upstream", "or `servers`");
        has("orgs.both.servers", "not both");
        has("orgs.shorthand.separator", "only used with `servers`");
        has("orgs.org-1.separator", "expected 1 to 8");
        has("orgs.org-1.servers.sse", "is an endpoint name");
        has("orgs.org-1.servers.b.prefix", "also server `a`'s");
        has("orgs.org-1.servers.c.prefix", "at most 64");
        has("orgs.org-1.servers.c.upstream.replicas", "at least one");
        has(
            "orgs.org-2.servers.one.prefix",
            "contains the separator `__`",
        );
        has("orgs.org-2.servers.two.prefix", "also server `three`'s");
        assert_eq!(found.len(), 10, "{found:#?}");
    }

    #[test]
    fn policies_are_checked_rule_by_rule() {
        let c = parse(&with_orgs(
            r#"
  org-1:
    policy:
      - {name: readers, when: {realm_roles: [mcp-reader], groups: [readers]}, allow: {tools: ["fs__read_*"]}}
    servers:
      files:
        upstream: {era: modern, replicas: [http://127.0.0.1:9001/mcp]}
        prefix: fs
        policy: [{name: no-delete, deny: {tools: ["fs__delete*"]}}]
"#,
        ))
        .expect("valid");
        let org = &c.orgs["org-1"];
        assert_eq!(org.policy[0].when.realm_roles, ["mcp-reader"]);
        assert_eq!(org.server_entries()[0].policy[0].name, "no-delete");
        let err = parse(&with_orgs(
            r#"
  org-1:
    policy:
      - {name: a, allow: {tools: ["x["]}}
      - {name: a, deny: {prompts: ["*"]}}
      - {name: "has space", when: {scopes: [s]}}
    upstream: {era: modern, replicas: [http://127.0.0.1:9001/mcp]}
"#,
        ))
        .expect_err("invalid");
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "orgs.org-1.policy[0].allow.tools[0]",
                "orgs.org-1.policy[1].name",
                "orgs.org-1.policy[2].name",
                "orgs.org-1.policy[2]"
            ]
        );
        let err = parse(&with_orgs(
            "  org-1:\n    policy: [{name: a, allow: {tool: [x]}}]\n    upstream: {era: modern, replicas: [http://127.0.0.1:9001/mcp]}\n",
        ))
        .expect_err("unknown field");
        assert!(
            only_problem(err)
                .path
                .starts_with("orgs.org-1.policy[0].allow")
        );
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/gateway.yaml");
        let text = std::fs::read_to_string(&path).expect("conf/gateway.yaml exists");
        parse_with(
            &text,
            &[
                ("RATATOSK_PUBLISH_SECRET", "example-secret-for-tests"),
                ("RATATOSK_CLIENT_SECRET", "example-client-secret"),
            ],
        )
        .expect("conf/gateway.yaml is valid");
    }
}
