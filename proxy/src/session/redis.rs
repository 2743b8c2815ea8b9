//! The shared session store: sessions in Redis, so that several gateway
//! nodes serve the same sessions (`sessions.store: redis`).
//!
//! Keys, under the configured prefix `P`:
//! - `P s:{id}`: a hash, `state` (the session as JSON) and `v` (a version
//!   that every change bumps: changes are compare-and-set, so concurrent
//!   changes from any node keep each other);
//! - `P idle`: a sorted set of session ids by last activity (milliseconds
//!   of the Redis server's clock, so the nodes' clocks do not matter);
//! - `P org:{org}`: a set of the org's session ids;
//! - `P u:{org}:{subject}`: a set of one user's session ids in an org (the
//!   per-subject cap, and logouts without a `sid`);
//! - `P sid:{sid}`: a set of the session ids opened with one identity
//!   provider session (logouts);
//! - `P ix`: a hash, session id -> `[org, subject, sid]` (JSON), so that the
//!   sets above lose an id even when its session key expired first;
//! - `P h:{hash}`: the hidden session of a 2026-07-28 client of a stateful
//!   upstream, by a hash of (org, subject, client info, capabilities);
//!   kept while it is used, as a session key is;
//! - the session's event log, see [`crate::stream::shared`].
//!
//! Every change is one Lua script, so a node that dies half-way leaves
//! nothing half-written. A session key also expires by itself (twice the
//! idle timeout after its last activity) if no node is left to reap it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};
use tracing::Instrument as _;

use super::{Admission, SessionRecord, SessionState, SessionStore, StoreError};

mod link;
pub use link::RedisLink;

/// How long one Redis operation may take, and one connection attempt.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Attempts of a compare-and-set change before it gives up; between
/// attempts, a random pause that grows with each.
const MAX_CHANGE_ATTEMPTS: u32 = 32;

/// Most sessions one reaping script removes; a pass runs it again while
/// it finds a full batch, at most [`MAX_REAP_ROUNDS`] times.
pub(crate) const REAP_BATCH: usize = 1000;
const MAX_REAP_ROUNDS: usize = 100;

/// The node's writer could not hand an event to Redis.
#[derive(Debug, thiserror::Error)]
#[error("the shared event log did not take the event in time")]
pub struct RedisUnavailable;

#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a session stored in redis is not valid: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("session {0} kept changing under {MAX_CHANGE_ATTEMPTS} attempts to change it")]
    Contended(String),
    #[error(transparent)]
    Unavailable(#[from] RedisUnavailable),
    #[error(
        "{got} of the {wanted} redis replicas asked for confirmed the write in time (sessions.wait)"
    )]
    NotReplicated { wanted: u32, got: i64 },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Redis(e.into())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Redis(e.into())
    }
}

/// The time of the Redis server, in milliseconds (Lua prelude).
pub(crate) const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Lua that removes session `id` (a local) from every index, given the
/// key prefix `prefix` (a local) and, when the index entry is missing (a
/// session stored before the index existed), its state `s`.
const UNINDEX: &str = "
local ix = redis.call('HGET', prefix .. 'ix', id)
local org, subject, sid
if ix then
    local e = cjson.decode(ix)
    org, subject, sid = e[1], e[2], e[3]
elseif s then
    local st = cjson.decode(s)
    org, subject, sid = st['org'], st['subject'], st['idp_session']
end
redis.call('HDEL', prefix .. 'ix', id)
if org then
    redis.call('SREM', prefix .. 'org:' .. org, id)
    redis.call('SREM', prefix .. 'u:' .. org .. ':' .. subject, id)
end
if type(sid) == 'string' and sid ~= '' then
    redis.call('SREM', prefix .. 'sid:' .. sid, id)
end
";

pub struct RedisSessionStore {
    conn: RedisLink,
    prefix: String,
    /// How long a session key outlives its last activity, if no node
    /// reaps it first.
    key_ttl_ms: u64,
    /// Replicas a new session waits for, and milliseconds it waits at most;
    /// and the connection that waits (WAIT holds it until the replicas
    /// answer, so not the one every lookup goes through).
    wait: Option<(u32, u64, RedisLink)>,
    scripts: Scripts,
}

struct Scripts {
    insert: Script,
    admits: Script,
    lookup: Script,
    touch: Script,
    change: Script,
    remove: Script,
    reap: Script,
    record_hidden: Script,
    forget_hidden: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_now = |body: &str| Script::new(&format!("{NOW}{body}"));
        Scripts {
            // KEYS: session, idle, org set, subject set, index, and the
            // sid set if the session has one. ARGV: id, state, key ttl,
            // max per subject, max total, index entry.
            // -> 1, or -1 (subject full), -2 (full).
            insert: with_now(
                "if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -2 end
                 if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[4]) then return -1 end
                 redis.call('HSET', KEYS[1], 'state', ARGV[2], 'v', 1)
                 -- The primary it was made on: see the event log's append.
                 local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
                 if rid then redis.call('HSET', KEYS[1], 'r', rid) end
                 redis.call('PEXPIRE', KEYS[1], ARGV[3])
                 redis.call('ZADD', KEYS[2], now, ARGV[1])
                 redis.call('SADD', KEYS[3], ARGV[1])
                 redis.call('SADD', KEYS[4], ARGV[1])
                 redis.call('HSET', KEYS[5], ARGV[1], ARGV[6])
                 if KEYS[6] then redis.call('SADD', KEYS[6], ARGV[1]) end
                 return 1",
            ),
            // KEYS: idle, subject set. ARGV: max per subject, max total.
            // -> 1, or -1 (subject full), -2 (full).
            admits: Script::new(
                "if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -2 end
                 if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then return -1 end
                 return 1",
            ),
            // KEYS: session, idle. ARGV: id, key ttl. -> {state, v} or nil.
            lookup: with_now(
                "local r = redis.call('HMGET', KEYS[1], 'state', 'v')
                 if not r[1] then return false end
                 redis.call('ZADD', KEYS[2], now, ARGV[1])
                 redis.call('PEXPIRE', KEYS[1], ARGV[2])
                 return r",
            ),
            // KEYS: session, idle. ARGV: id, key ttl. -> 1, or 0 if gone.
            touch: with_now(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
                 redis.call('ZADD', KEYS[2], now, ARGV[1])
                 redis.call('PEXPIRE', KEYS[1], ARGV[2])
                 return 1",
            ),
            // KEYS: session. ARGV: expected version, new state.
            // -> 1 changed, 0 changed meanwhile (try again), -1 gone.
            change: Script::new(
                "local v = redis.call('HGET', KEYS[1], 'v')
                 if not v then return -1 end
                 if v ~= ARGV[1] then return 0 end
                 redis.call('HSET', KEYS[1], 'state', ARGV[2], 'v', tonumber(v) + 1)
                 return 1",
            ),
            // KEYS: session, idle, its two event streams. ARGV: id, key
            // prefix. -> state or nil.
            remove: Script::new(&format!(
                "local id, prefix = ARGV[1], ARGV[2]
                 local s = redis.call('HGET', KEYS[1], 'state')
                 redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], prefix .. 'f:' .. id)
                 redis.call('ZREM', KEYS[2], id)
                 {UNINDEX}
                 if not s then return false end
                 return s"
            )),
            // KEYS: idle. ARGV: idle ttl, key prefix, batch. -> {ids
            // removed, the states of those whose key was still there}.
            // Atomic: with several nodes reaping, each expired session goes
            // to exactly one. Every id leaves the indexes, whether or not
            // its key expired first.
            reap: with_now(&format!(
                "local prefix = ARGV[2]
                 local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                     'LIMIT', 0, tonumber(ARGV[3]))
                 local out = {{}}
                 for _, id in ipairs(ids) do
                     local k = prefix .. 's:' .. id
                     local s = redis.call('HGET', k, 'state')
                     redis.call('DEL', k, prefix .. 'e:' .. id .. ':a', prefix .. 'e:' .. id .. ':p',
                         prefix .. 'f:' .. id)
                     redis.call('ZREM', KEYS[1], id)
                     {UNINDEX}
                     if s then table.insert(out, s) end
                 end
                 return {{#ids, out}}"
            )),
            // KEYS: a hidden-session record. ARGV: session id, key ttl,
            // session key prefix. Records the id unless the record names
            // another live session. -> the id recorded.
            record_hidden: Script::new(
                "local current = redis.call('GET', KEYS[1])
                 if current and current ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. current) == 1 then
                     return current
                 end
                 redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                 return ARGV[1]",
            ),
            // KEYS: a hidden-session record. ARGV: session id. Deletes the
            // record if it still names the session.
            forget_hidden: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then
                     return redis.call('DEL', KEYS[1])
                 end
                 return 0",
            ),
        }
    }
}

/// Where Redis is: one server (`redis://` or `rediss://`), or a primary
/// found through Sentinel; for TLS, what the gateway trusts (a CA in place
/// of the system's roots) and presents. `Debug` leaves passwords and the
/// private key out.
#[derive(Clone, Default)]
pub struct RedisTarget {
    /// The one server's URL; empty with `sentinel`.
    pub url: String,
    pub tls: ratatosk_auth::tls::ClientPems,
    pub sentinel: Option<SentinelTarget>,
    pub cluster: Option<ClusterTarget>,
}

/// A Redis Cluster whose slot of `key` holds every key of the gateway.
#[derive(Clone, Default)]
pub struct ClusterTarget {
    /// Some of its nodes, `host:port` each.
    pub nodes: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    /// A key in the gateway's slot (the key prefix, with its hash tag).
    pub key: String,
}

/// A primary that Redis Sentinel watches and fails over.
#[derive(Clone, Default)]
pub struct SentinelTarget {
    /// The name the sentinels know it by (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// The sentinels, `host:port`.
    pub nodes: Vec<String>,
    /// The primary's (and its replicas') user and password, and database.
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
    /// The sentinels' own password, if they ask for one.
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels and the primary.
    pub tls: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("redacted"));
                u.to_string()
            }
            Ok(_) => self.url.clone(),
            Err(_) if self.url.is_empty() => String::new(),
            Err(_) => "<not a URL>".to_owned(),
        };
        let sentinel = self.sentinel.as_ref().map(|s| {
            format!(
                "{} at {} (db {}{})",
                s.master_name,
                s.nodes.join(", "),
                s.db,
                if s.tls { ", TLS" } else { "" }
            )
        });
        let cluster = self.cluster.as_ref().map(|c| {
            format!(
                "{} for {}{}",
                c.nodes.join(", "),
                c.key,
                if c.tls { ", TLS" } else { "" }
            )
        });
        f.debug_struct("RedisTarget")
            .field("url", &url)
            .field("sentinel", &sentinel)
            .field("cluster", &cluster)
            .field("tls", &self.tls)
            .finish()
    }
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        RedisTarget {
            url: url.to_owned(),
            ..Default::default()
        }
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        RedisTarget::from(url.as_str())
    }
}

/// The redis crate's form of the TLS files.
fn certificates(tls: &ratatosk_auth::tls::ClientPems) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: tls
            .identity
            .clone()
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: tls.ca.clone(),
    }
}

impl RedisTarget {
    /// A client (async or sync) of the one server, with the TCP settings
    /// below and, for `rediss://`, the TLS settings.
    pub fn client(&self) -> Result<redis::Client, redis::RedisError> {
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())?;
        RedisTarget::client_of(info, &self.tls)
    }

    /// A client of the server at `info`, with the TCP settings below and,
    /// if the files name any, the TLS settings.
    pub(crate) fn client_of(
        info: redis::ConnectionInfo,
        tls: &ratatosk_auth::tls::ClientPems,
    ) -> Result<redis::Client, redis::RedisError> {
        ratatosk_auth::tls::install_crypto();
        let info = info.set_tcp_settings(tcp_settings());
        if tls.ca.is_none() && tls.identity.is_none() {
            return redis::Client::open(info);
        }
        redis::Client::build_with_tls(info, certificates(tls))
    }

    /// A blocking connection to the server, or to the primary the
    /// sentinels name now, with `timeout` on connecting (to the server),
    /// reading and writing.
    pub fn sync_connection(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let info = match (&self.sentinel, &self.cluster) {
            (_, Some(cluster)) => link::cluster_primary_sync(cluster, &self.tls, timeout)?,
            (Some(sentinel), None) => link::sentinel_client(sentinel, &self.tls)?
                .get_client()?
                .get_connection_info()
                .clone(),
            (None, None) => redis::IntoConnectionInfo::into_connection_info(self.url.as_str())?,
        };
        let conn = RedisTarget::client_of(info, &self.tls)?.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }
}

/// A link to the Redis at `target` (see [`RedisLink`]), with
/// [`OP_TIMEOUT`] on each connection attempt and each answer. Must be
/// called within the Tokio runtime that will drive the connection.
pub(crate) fn connection(target: impl Into<RedisTarget>) -> Result<RedisLink, redis::RedisError> {
    RedisLink::new(&target.into())
}

/// How long a connection to Redis may go without an answer to what it
/// sent, or to keep-alive probes while idle, before the kernel calls it
/// dead: a half-open connection (Redis's host gone without a word) then
/// fails and is made again, instead of waiting forever.
const DEAD_AFTER: Duration = Duration::from_secs(15);

/// TCP keep-alive probes, a bound on unacknowledged writes
/// (`TCP_USER_TIMEOUT`) and no Nagle delay.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let probes = TcpKeepalive::new()
        .with_time(DEAD_AFTER / 3)
        .with_interval(DEAD_AFTER / 6)
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(probes)
        .set_user_timeout(DEAD_AFTER)
}

impl RedisSessionStore {
    /// A store on the Redis at `target`. The connection is made on first
    /// use and made again whenever it breaks, so a gateway starts, and
    /// recovers, without Redis being up at that moment. Must be called
    /// within the Tokio runtime that will drive the connection.
    pub fn new(
        target: impl Into<RedisTarget>,
        prefix: &str,
        idle_ttl: Duration,
    ) -> Result<Self, RedisStoreError> {
        let conn = connection(target)?;
        Ok(RedisSessionStore {
            conn,
            prefix: prefix.to_owned(),
            key_ttl_ms: u64::try_from(idle_ttl.as_millis().saturating_mul(2)).unwrap_or(u64::MAX),
            wait: None,
            scripts: Scripts::new(),
        })
    }

    /// A new session waits until `replicas` replicas have it (Redis
    /// `WAIT`), up to `timeout`; short of that, its insert fails. The
    /// wait holds a connection of its own to `target` (the store's).
    /// Must be called within the Tokio runtime that will drive the
    /// connection.
    pub fn waiting_for(
        mut self,
        target: impl Into<RedisTarget>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<Self, RedisStoreError> {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.wait = Some((replicas, ms, connection(target)?));
        Ok(self)
    }

    /// The store's connection, for what else the nodes keep in the same
    /// Redis (the logouts): one connection, not one per part.
    pub fn connection(&self) -> RedisLink {
        self.conn.clone()
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}s:{id}", self.prefix)
    }

    /// Where the hidden session of a caller's client (`key`: org,
    /// subject, client info and capabilities) is recorded: a hash of it.
    fn hidden_key(&self, key: &str) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(key.as_bytes());
        let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash);
        format!("{}h:{hash}", self.prefix)
    }

    fn idle_key(&self) -> String {
        format!("{}idle", self.prefix)
    }

    fn org_prefix(&self) -> String {
        format!("{}org:", self.prefix)
    }

    fn subject_key(&self, org: &str, subject: &str) -> String {
        format!("{}u:{org}:{subject}", self.prefix)
    }

    fn idp_session_key(&self, sid: &str) -> String {
        format!("{}sid:{sid}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}ix", self.prefix)
    }

    /// The ids in a set, tidied of those whose session key expired
    /// without a reaper.
    async fn live_members(&self, set: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(set).await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.exists(self.session_key(id));
        }
        let present: Vec<bool> = pipe.query_async(&mut conn).await?;
        let (live, gone): (Vec<_>, Vec<_>) = ids.into_iter().zip(present).partition(|(_, p)| *p);
        if !gone.is_empty() {
            let gone: Vec<String> = gone.into_iter().map(|(id, _)| id).collect();
            let _: i64 = conn.srem(set, gone).await?;
        }
        Ok(live.into_iter().map(|(id, _)| id).collect())
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> Result<(), RedisStoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Runs `script` (lookup or touch), which records activity on session
    /// `id`.
    async fn with_activity<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        id: &str,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        Ok(script
            .key(self.session_key(id))
            .key(self.idle_key())
            .arg(id)
            .arg(self.key_ttl_ms)
            .invoke_async(&mut conn)
            .instrument(crate::telemetry::redis("session lookup"))
            .await?)
    }

    /// The session and its version, recording activity.
    async fn fetch(&self, id: &str) -> Result<Option<(SessionState, String)>, StoreError> {
        let found: Option<(String, String)> = self.with_activity(&self.scripts.lookup, id).await?;
        match found {
            None => Ok(None),
            Some((state, version)) => Ok(Some((serde_json::from_str(&state)?, version))),
        }
    }
}

/// The refusal an insert or admission script answered, if any.
fn refusal(outcome: i64, org: &str, admission: Admission) -> Result<(), StoreError> {
    match outcome {
        -1 => Err(StoreError::SubjectFull {
            org: org.to_owned(),
            max: admission.per_subject,
        }),
        -2 => Err(StoreError::Full {
            max: admission.total,
        }),
        _ => Ok(()),
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Ok(self.ping().await?)
    }

    async fn hidden_session(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = redis::cmd("GETEX")
            .arg(self.hidden_key(key))
            .arg("PX")
            .arg(self.key_ttl_ms)
            .query_async(&mut conn)
            .await?;
        Ok(id)
    }

    async fn record_hidden_session(&self, key: &str, id: &str) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let recorded: String = self
            .scripts
            .record_hidden
            .key(self.hidden_key(key))
            .arg(id)
            .arg(self.key_ttl_ms)
            .arg(format!("{}s:", self.prefix))
            .invoke_async(&mut conn)
            .await?;
        Ok(recorded)
    }

    async fn forget_hidden_session(&self, key: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .scripts
            .forget_hidden
            .key(self.hidden_key(key))
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn insert(
        &self,
        state: SessionState,
        admission: Admission,
    ) -> Result<Arc<SessionState>, StoreError> {
        let json = serde_json::to_string(&state)?;
        let index = serde_json::to_string(&(
            &state.org,
            &state.subject,
            state.idp_session.as_deref().unwrap_or(""),
        ))?;
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.insert.key(self.session_key(&state.id));
        invocation
            .key(self.idle_key())
            .key(format!("{}{}", self.org_prefix(), state.org))
            .key(self.subject_key(&state.org, &state.subject))
            .key(self.index_key());
        if let Some(sid) = &state.idp_session {
            invocation.key(self.idp_session_key(sid));
        }
        invocation
            .arg(&state.id)
            .arg(json)
            .arg(self.key_ttl_ms)
            .arg(admission.per_subject)
            .arg(admission.total)
            .arg(index);
        let Some((wanted, ms, waiting)) = &self.wait else {
            let outcome: i64 = invocation
                .invoke_async(&mut conn)
                .instrument(crate::telemetry::redis("session insert"))
                .await?;
            refusal(outcome, &state.org, admission)?;
            return Ok(Arc::new(state));
        };
        // One pipeline: WAIT counts the writes of the connection it is
        // on: the one that wrote.
        let mut pipe = redis::pipe();
        pipe.load_script(&self.scripts.insert)
            .ignore()
            .invoke_script(&invocation)
            .cmd("WAIT")
            .arg(*wanted)
            .arg(*ms);
        let (outcome, got): (i64, i64) = pipe
            .query_async(&mut waiting.clone())
            .instrument(crate::telemetry::redis("session insert"))
            .await?;
        refusal(outcome, &state.org, admission)?;
        if got < i64::from(*wanted) {
            // Not kept: it would count against the caps while its client,
            // told 503, opens another.
            if let Err(e) = self.remove(&state.id).await {
                tracing::warn!(error = %e, "cannot remove a session its replicas did not confirm");
            }
            return Err(StoreError::Redis(RedisStoreError::NotReplicated {
                wanted: *wanted,
                got,
            }));
        }
        Ok(Arc::new(state))
    }

    async fn admits(
        &self,
        org: &str,
        subject: &str,
        admission: Admission,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let outcome: i64 = self
            .scripts
            .admits
            .key(self.idle_key())
            .key(self.subject_key(org, subject))
            .arg(admission.per_subject)
            .arg(admission.total)
            .invoke_async(&mut conn)
            .await?;
        refusal(outcome, org, admission)
    }

    async fn ids_of_idp_session(&self, sid: &str) -> Result<Vec<String>, StoreError> {
        self.live_members(&self.idp_session_key(sid)).await
    }

    async fn ids_of_subject(&self, org: &str, subject: &str) -> Result<Vec<String>, StoreError> {
        self.live_members(&self.subject_key(org, subject)).await
    }

    async fn lookup(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError> {
        Ok(self.fetch(id).await?.map(|(state, _)| Arc::new(state)))
    }

    async fn touch(&self, id: &str) -> Result<bool, StoreError> {
        let touched: i64 = self.with_activity(&self.scripts.touch, id).await?;
        Ok(touched == 1)
    }

    async fn update(
        &self,
        id: &str,
        change: &(dyn for<'s> Fn(&'s mut SessionState) + Send + Sync),
    ) -> Result<bool, StoreError> {
        for attempt in 0..MAX_CHANGE_ATTEMPTS {
            if attempt > 0 {
                let pause = rand::Rng::random_range(&mut rand::rng(), 0..200 * attempt);
                tokio::time::sleep(Duration::from_micros(u64::from(pause))).await;
            }
            let Some((mut state, version)) = self.fetch(id).await? else {
                return Ok(false);
            };
            change(&mut state);
            let json = serde_json::to_string(&state)?;
            let mut conn = self.conn.clone();
            let outcome: i64 = self
                .scripts
                .change
                .key(self.session_key(id))
                .arg(version)
                .arg(json)
                .invoke_async(&mut conn)
                .instrument(crate::telemetry::redis("session change"))
                .await?;
            match outcome {
                1 => return Ok(true),
                -1 => return Ok(false),
                _ => continue,
            }
        }
        Err(RedisStoreError::Contended(super::short(id).to_owned()).into())
    }

    async fn remove(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError> {
        let mut conn = self.conn.clone();
        let removed: Option<String> = self
            .scripts
            .remove
            .key(self.session_key(id))
            .key(self.idle_key())
            .key(format!("{}e:{id}:a", self.prefix))
            .key(format!("{}e:{id}:p", self.prefix))
            .arg(id)
            .arg(&self.prefix)
            .invoke_async(&mut conn)
            .instrument(crate::telemetry::redis("session remove"))
            .await?;
        match removed {
            None => Ok(None),
            Some(state) => Ok(Some(Arc::new(serde_json::from_str(&state)?))),
        }
    }

    async fn count_org(&self, org: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let org_key = format!("{}{org}", self.org_prefix());
        Ok(conn.scard(&org_key).await?)
    }

    async fn list_org(&self, org: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let org_key = format!("{}{org}", self.org_prefix());
        let ids: Vec<String> = conn.smembers(&org_key).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(self.session_key(id), "state")
                .zscore(self.idle_key(), id);
        }
        let rows: Vec<(Option<String>, Option<f64>)> = pipe.query_async(&mut conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, (state, seen)) in ids.iter().zip(rows) {
            match state {
                Some(state) => out.push(SessionRecord {
                    state: Arc::new(serde_json::from_str(&state)?),
                    last_seen_ms: seen.map_or(0, |ms| ms as u64),
                }),
                // Its key expired without a reaper: tidy the index.
                None => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            let _: i64 = conn.srem(&org_key, gone).await?;
        }
        out.sort_by_key(|r| r.state.created_at_ms);
        Ok(out)
    }

    async fn remove_idle(&self, ttl: Duration) -> Result<Vec<Arc<SessionState>>, StoreError> {
        let mut conn = self.conn.clone();
        let mut states = Vec::new();
        for _ in 0..MAX_REAP_ROUNDS {
            let (ids, removed): (usize, Vec<String>) = self
                .scripts
                .reap
                .key(self.idle_key())
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                .arg(&self.prefix)
                .arg(REAP_BATCH)
                .invoke_async(&mut conn)
                .await?;
            for state in &removed {
                match serde_json::from_str(state) {
                    Ok(state) => states.push(Arc::new(state)),
                    // Gone from Redis all the same; nothing to end here.
                    Err(e) => tracing::warn!(error = %e, "a reaped session was not valid"),
                }
            }
            if ids < REAP_BATCH {
                break;
            }
        }
        Ok(states)
    }
}
