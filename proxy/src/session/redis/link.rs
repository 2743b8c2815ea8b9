//! One logical connection to the shared Redis, whatever stands behind it:
//! one server at a fixed address, or a primary that is found and followed
//! across failovers: the one Redis Sentinel names, or the one serving the
//! gateway's slot of a Redis Cluster (every key of the gateway is in one
//! slot, by the hash tag of its key prefix).
//!
//! A followed primary is looked up (the sentinels, or the cluster's
//! `CLUSTER SLOTS`, then its `ROLE` checked) on first use, and again when
//! a command fails in a way that says it may have changed: the connection
//! broke or was refused, an answer timed out, or the server answered
//! `READONLY`, `MASTERDOWN`, `MOVED` or `CLUSTERDOWN`. One look-up runs at a
//! time, and a failed one is not repeated for [`RESOLVE_PAUSE`], so a
//! failover does not turn every request into a round of questions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

use super::{ClusterTarget, OP_TIMEOUT, RedisTarget, SentinelTarget};

/// After a failed look-up of the primary, how long the link answers with
/// that failure before it asks the sentinels again.
const RESOLVE_PAUSE: Duration = Duration::from_millis(250);

/// A connection to the shared Redis that is made on first use and made
/// again whenever it breaks; cheap to clone (clones share it). Commands go
/// through it as through any redis-crate connection.
#[derive(Clone)]
pub struct RedisLink(Arc<Inner>);

// One per link, behind its Arc: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Direct {
        client: redis::Client,
        conn: ConnectionManager,
    },
    Followed(Followed),
}

/// A primary found (through the sentinels or the cluster), and the
/// connection to it.
struct Primary {
    addr: String,
    client: redis::Client,
    conn: ConnectionManager,
    /// A command failed in a way that says the primary may have changed:
    /// the next command looks it up first.
    suspect: AtomicBool,
}

struct Followed {
    finder: tokio::sync::Mutex<Resolver>,
    /// Look-ups done: a caller that waited for its turn while one was
    /// done takes its answer.
    lookups: std::sync::atomic::AtomicU64,
    primary: ArcSwapOption<Primary>,
    tls: ratatosk_auth::tls::ClientPems,
    db: i64,
}

struct Resolver {
    finder: Finder,
    /// The last failed look-up, answered again until [`RESOLVE_PAUSE`]
    /// has passed.
    failed: Option<(Instant, RedisError)>,
}

/// Who names the primary. One per link: the variants' sizes do not
/// matter.
#[allow(clippy::large_enum_variant)]
enum Finder {
    Sentinel(SentinelClient),
    /// Clients of some of a cluster's nodes, and a key in the slot.
    Cluster {
        seeds: Vec<redis::Client>,
        key: String,
    },
}

impl Finder {
    /// Where the primary is now, and that it says it is one.
    async fn find(&mut self) -> RedisResult<redis::ConnectionInfo> {
        match self {
            Finder::Sentinel(client) => Ok(client
                .async_get_client()
                .await?
                .get_connection_info()
                .clone()),
            Finder::Cluster { seeds, key } => {
                let mut last = None;
                // A node that does not answer must not use up the time
                // the others would have.
                for seed in seeds.iter() {
                    match tokio::time::timeout(OP_TIMEOUT / 4, slot_primary(seed, key)).await {
                        Ok(Ok(info)) => return Ok(info),
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {
                            last = Some(timed_out(
                                "asking a redis cluster node for the slot's primary",
                            ))
                        }
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "no redis cluster node given",
                    ))
                }))
            }
        }
    }

    fn who(&self) -> &'static str {
        match self {
            Finder::Sentinel(_) => "the sentinels",
            Finder::Cluster { .. } => "the redis cluster",
        }
    }
}

/// The primary serving `key`'s slot as node `seed` knows it, if that
/// primary answers `ROLE` as one.
async fn slot_primary(seed: &redis::Client, key: &str) -> RedisResult<redis::ConnectionInfo> {
    let mut conn = seed.get_multiplexed_async_connection().await?;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await?;
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    let info = owner_of(seed.get_connection_info(), &slots, slot)?;
    let mut primary = redis::Client::open(info.clone())?
        .get_multiplexed_async_connection()
        .await?;
    let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut primary).await?;
    if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
        return Err(not_primary(&info));
    }
    Ok(info)
}

/// The same, blocking, with `timeout` on each connection and answer (the
/// audit log's writer thread).
pub(super) fn cluster_primary_sync(
    target: &ClusterTarget,
    tls: &ratatosk_auth::tls::ClientPems,
    timeout: Duration,
) -> RedisResult<redis::ConnectionInfo> {
    let connect = |info: redis::ConnectionInfo| -> RedisResult<redis::Connection> {
        let conn = RedisTarget::client_of(info, tls)?.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    };
    let mut last = None;
    for seed in cluster_nodes(target)? {
        let found = connect(seed.clone()).and_then(|mut conn| {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&target.key)
                .query(&mut conn)?;
            let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
            let info = owner_of(&seed, &slots, slot)?;
            let role: Vec<Value> = redis::cmd("ROLE").query(&mut connect(info.clone())?)?;
            match role.first() {
                Some(Value::BulkString(r)) if r == b"master" => Ok(info),
                _ => Err(not_primary(&info)),
            }
        });
        match found {
            Ok(info) => return Ok(info),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "no redis cluster node given",
        ))
    }))
}

fn not_primary(info: &redis::ConnectionInfo) -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ReadOnly),
        "the node named for the slot is not a primary (yet)",
        info.addr().to_string(),
    ))
}

/// Where the primary serving `slot` is, by a `CLUSTER SLOTS` answer, with
/// the seed's credentials and TLS.
fn owner_of(
    seed: &redis::ConnectionInfo,
    slots: &Value,
    slot: i64,
) -> RedisResult<redis::ConnectionInfo> {
    let Value::Array(ranges) = slots else {
        return Err(RedisError::from((
            ErrorKind::Parse,
            "CLUSTER SLOTS did not answer a list",
        )));
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        if !(*lo..=*hi).contains(&slot) {
            continue;
        }
        let host = match primary.first() {
            Some(Value::BulkString(h)) if !h.is_empty() && h != b"?" => {
                String::from_utf8_lossy(h).into_owned()
            }
            // No address announced: the seed's host.
            _ => match seed.addr() {
                redis::ConnectionAddr::Tcp(h, _)
                | redis::ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
                other => other.to_string(),
            },
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            continue;
        };
        let port = u16::try_from(*port)
            .map_err(|_| RedisError::from((ErrorKind::Parse, "CLUSTER SLOTS named no port")))?;
        let addr = match seed.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        return Ok(seed.clone().set_addr(addr));
    }
    Err(RedisError::from((
        ErrorKind::Server(ServerErrorKind::ClusterDown),
        "no primary serves the gateway's slot",
        slot.to_string(),
    )))
}

/// The connection info of each node of `target`, with its credentials.
fn cluster_nodes(target: &ClusterTarget) -> RedisResult<Vec<redis::ConnectionInfo>> {
    let mut out = Vec::with_capacity(target.nodes.len());
    for node in &target.nodes {
        let addr = node_addr(node, target.tls)?;
        let mut redis = redis::RedisConnectionInfo::default();
        if let Some(user) = &target.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &target.password {
            redis = redis.set_password(password);
        }
        out.push(
            redis::IntoConnectionInfo::into_connection_info(addr)?
                .set_redis_settings(redis)
                .set_tcp_settings(super::tcp_settings()),
        );
    }
    Ok(out)
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// Whether an error says the primary may have moved.
fn moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
        // A script's write on a replica, reported inside its error.
        || e.to_string().contains("READONLY")
}

fn moved_in(values: &[Value]) -> bool {
    values.iter().any(|v| match v {
        Value::ServerError(e) => matches!(
            e.kind(),
            Some(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::ClusterDown
            )
        ),
        _ => false,
    })
}

impl RedisLink {
    /// A link to `target`. Nothing is connected until first use, so a
    /// gateway starts, and recovers, without Redis being up at that moment.
    /// Must be called within the Tokio runtime that will drive it.
    pub fn new(target: &RedisTarget) -> RedisResult<RedisLink> {
        let followed = |finder: Finder, db: i64| {
            Inner::Followed(Followed {
                finder: tokio::sync::Mutex::new(Resolver {
                    finder,
                    failed: None,
                }),
                lookups: std::sync::atomic::AtomicU64::new(0),
                primary: ArcSwapOption::empty(),
                tls: target.tls.clone(),
                db,
            })
        };
        let inner = match (&target.sentinel, &target.cluster) {
            (_, Some(cluster)) => {
                let mut seeds = Vec::with_capacity(cluster.nodes.len());
                for info in cluster_nodes(cluster)? {
                    seeds.push(RedisTarget::client_of(info, &target.tls)?);
                }
                followed(
                    Finder::Cluster {
                        seeds,
                        key: cluster.key.clone(),
                    },
                    0,
                )
            }
            (Some(sentinel), None) => followed(
                Finder::Sentinel(sentinel_client(sentinel, &target.tls)?),
                sentinel.db,
            ),
            (None, None) => {
                let client = target.client()?;
                let conn =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config())?;
                Inner::Direct { client, conn }
            }
        };
        Ok(RedisLink(Arc::new(inner)))
    }

    /// A fresh pub/sub connection: to the server, or to the primary the
    /// sentinels name now (asked every time: a subscription is made again
    /// only after the last one broke).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match &*self.0 {
            Inner::Direct { client, .. } => client.get_async_pubsub().await,
            Inner::Followed(followed) => {
                let primary = followed.resolve(true).await?;
                let subscribed = primary.client.get_async_pubsub().await;
                if let Err(e) = &subscribed
                    && moved(e)
                {
                    primary.suspect.store(true, Ordering::Relaxed);
                }
                subscribed
            }
        }
    }

    /// The primary's address as last found (Sentinel), for logs and the
    /// status page; `None` for one fixed server or before the first look-up.
    pub fn primary(&self) -> Option<String> {
        match &*self.0 {
            Inner::Direct { .. } => None,
            Inner::Followed(followed) => followed.primary.load().as_ref().map(|p| p.addr.clone()),
        }
    }
}

impl Followed {
    /// The primary to send to: the one known, unless there is none yet or
    /// a command on it failed as if it had moved.
    async fn current(&self) -> RedisResult<Arc<Primary>> {
        match self.primary.load_full() {
            Some(p) if !p.suspect.load(Ordering::Relaxed) => Ok(p),
            _ => self.resolve(false).await,
        }
    }

    /// Looks the primary up, unless a look-up finished while this caller
    /// waited for its turn (then its answer stands), or `fresh` is false
    /// and the known primary is not suspect. When the look-up fails, the
    /// primary known so far is used still (it may well be fine: the
    /// finder may be what is away), marked so that the next command asks
    /// again; with none known, the error, as a refusal: nothing was sent.
    /// The same address keeps its connection.
    async fn resolve(&self, fresh: bool) -> RedisResult<Arc<Primary>> {
        let seen = self.lookups.load(Ordering::Acquire);
        let mut resolver = tokio::time::timeout(OP_TIMEOUT, self.finder.lock())
            .await
            .map_err(|_| unsent(&timed_out("waiting for the look-up of the redis primary")))?;
        let now = self.primary.load_full();
        if let Some(now) = &now {
            let answered_meanwhile = self.lookups.load(Ordering::Acquire) != seen;
            if answered_meanwhile || (!fresh && !now.suspect.load(Ordering::Relaxed)) {
                return Ok(now.clone());
            }
        }
        let recent_failure = match &resolver.failed {
            Some((at, e)) if at.elapsed() < RESOLVE_PAUSE => Some(e.clone()),
            _ => None,
        };
        let found = match recent_failure {
            Some(e) => Err(e),
            None => {
                let who = resolver.finder.who();
                let found = tokio::time::timeout(OP_TIMEOUT, resolver.finder.find())
                    .await
                    .unwrap_or_else(|_| Err(timed_out("looking up the redis primary")));
                self.lookups.fetch_add(1, Ordering::AcqRel);
                if let Err(e) = &found {
                    tracing::warn!(error = %e, "cannot find the redis primary through {who}");
                    resolver.failed = Some((Instant::now(), e.clone()));
                } else {
                    resolver.failed = None;
                }
                found
            }
        };
        let info = match (found, now) {
            (Ok(info), _) => info,
            (Err(_), Some(now)) => return Ok(now),
            (Err(e), None) => return Err(unsent(&e)),
        };
        let addr = info.addr().to_string();
        if let Some(now) = self.primary.load_full()
            && now.addr == addr
        {
            now.suspect.store(false, Ordering::Relaxed);
            return Ok(now);
        }
        let who = resolver.finder.who();
        let client = RedisTarget::client_of(info, &self.tls)?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())?;
        tracing::info!(primary = %addr, "following the redis primary {who} name");
        let primary = Arc::new(Primary {
            addr,
            client,
            conn,
            suspect: AtomicBool::new(false),
        });
        self.primary.store(Some(primary.clone()));
        Ok(primary)
    }
}

/// An error of a command that was never sent (no primary to send it to),
/// as a refusal: a caller may try again without fear of doing it twice.
fn unsent(e: &RedisError) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        format!("no redis primary to send to: {e}"),
    ))
}

/// The address of node `host:port`, over TLS if `tls`.
fn node_addr(node: &str, tls: bool) -> RedisResult<redis::ConnectionAddr> {
    let (host, port) = host_port(node)?;
    Ok(if tls {
        redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host, port)
    })
}

/// `host:port` (a `[v6]` host too).
fn host_port(node: &str) -> RedisResult<(String, u16)> {
    let bad = |what: &'static str| {
        RedisError::from((ErrorKind::InvalidClientConfig, what, node.to_owned()))
    };
    let (host, port) = node
        .rsplit_once(':')
        .ok_or_else(|| bad("a node is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("a node's port is not a number"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

/// A client of the sentinels of `target`, asking for its primary with the
/// primary's credentials and database, over TLS if `tls` is set.
pub(super) fn sentinel_client(
    target: &SentinelTarget,
    tls: &ratatosk_auth::tls::ClientPems,
) -> RedisResult<SentinelClient> {
    let secure = target.tls;
    let nodes = target
        .nodes
        .iter()
        .map(|node| node_addr(node, secure))
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder =
        SentinelClientBuilder::new(nodes, &target.master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(target.db)
            .set_client_to_redis_tcp_settings(super::tcp_settings())
            .set_client_to_sentinel_tcp_settings(super::tcp_settings());
    if let Some(user) = &target.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &target.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(password) = &target.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if secure {
        let certs = super::certificates(tls);
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certs.clone());
        if certs.root_cert.is_some() || certs.client_tls.is_some() {
            builder = builder.set_client_to_sentinel_certificates(certs);
        }
    }
    builder.build()
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &*self.0 {
            Inner::Direct { conn, .. } => {
                let mut conn = conn.clone();
                Box::pin(async move { conn.req_packed_command(cmd).await })
            }
            Inner::Followed(followed) => Box::pin(async move {
                let primary = followed.current().await?;
                let answer = primary.conn.clone().req_packed_command(cmd).await;
                if let Err(e) = &answer
                    && moved(e)
                {
                    primary.suspect.store(true, Ordering::Relaxed);
                }
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &*self.0 {
            Inner::Direct { conn, .. } => {
                let mut conn = conn.clone();
                Box::pin(async move { conn.req_packed_commands(pipeline, offset, count).await })
            }
            Inner::Followed(followed) => Box::pin(async move {
                let primary = followed.current().await?;
                let answers = primary
                    .conn
                    .clone()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                let moved = match &answers {
                    Ok(values) => moved_in(values),
                    Err(e) => moved(e),
                };
                if moved {
                    primary.suspect.store(true, Ordering::Relaxed);
                }
                answers
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &*self.0 {
            Inner::Direct { conn, .. } => conn.get_db(),
            Inner::Followed(followed) => followed.db,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{RedisServer, eventually};

    /// The node's `ROLE` (`master`, `slave`), or "" if it cannot say now:
    /// a node changing role closes its clients' connections.
    async fn role(port: u16) -> String {
        let asked = async {
            let mut conn = RedisTarget::from(format!("redis://127.0.0.1:{port}/").as_str())
                .client()?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("ROLE")
                .query_async::<Vec<Value>>(&mut conn)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(role)) => match role.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            },
            _ => String::new(),
        }
    }

    /// A real primary, its replica and a real sentinel: the link finds the
    /// primary, and after a failover (the sentinel's own `SENTINEL
    /// FAILOVER`, which demotes the old primary: its writes answer
    /// READONLY) follows the new one by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_follows_the_primary_the_sentinels_name() {
        let primary = RedisServer::start().await;
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]).await;
        let sentinel = RedisServer::sentinel("unit", primary.port).await;
        let target = RedisTarget {
            sentinel: Some(SentinelTarget {
                master_name: "unit".into(),
                nodes: vec![format!("127.0.0.1:{}", sentinel.port)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut link = RedisLink::new(&target).expect("link");
        assert_eq!(link.primary(), None, "nothing asked before first use");
        let () = redis::cmd("SET")
            .arg("k")
            .arg("1")
            .query_async(&mut link)
            .await
            .expect("set");
        assert_eq!(link.primary(), Some(format!("127.0.0.1:{}", primary.port)));

        let mut ask =
            RedisLink::new(&RedisTarget::from(sentinel.url().as_str())).expect("sentinel");
        let knows_replica = || {
            let mut ask = ask.clone();
            async move {
                let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                    .arg("replicas")
                    .arg("unit")
                    .query_async(&mut ask)
                    .await
                    .unwrap_or_default();
                // Suitable for promotion: its link to the primary is up
                // as the sentinel last saw it.
                replicas.iter().any(|r| {
                    r.windows(2)
                        .any(|w| w[0] == "master-link-status" && w[1] == "ok")
                })
            }
        };
        assert!(
            eventually(Duration::from_secs(30), knows_replica).await,
            "the sentinel never saw the replica"
        );
        let () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg("unit")
            .query_async(&mut ask)
            .await
            .expect("failover");
        assert!(
            eventually(Duration::from_secs(30), || async {
                role(replica.port).await == "master"
            })
            .await,
            "the replica was never promoted"
        );
        // Writes fail for a moment, then reach the new primary.
        let written = eventually(Duration::from_secs(30), || {
            let mut link = link.clone();
            async move {
                redis::cmd("SET")
                    .arg("k")
                    .arg("2")
                    .query_async::<()>(&mut link)
                    .await
                    .is_ok()
                    && link.primary() == Some(format!("127.0.0.1:{}", replica.port))
            }
        })
        .await;
        assert!(
            written,
            "the link did not follow the failover; it knows {:?}",
            link.primary()
        );
        let mut on_new =
            RedisLink::new(&RedisTarget::from(replica.url().as_str())).expect("new primary");
        let v: String = redis::cmd("GET")
            .arg("k")
            .query_async(&mut on_new)
            .await
            .expect("get");
        assert_eq!(v, "2");
        // A subscription made now is on the new primary too.
        let mut pubsub = link.pubsub().await.expect("pubsub");
        pubsub.subscribe("c").await.expect("subscribe");
        let _: i64 = redis::cmd("PUBLISH")
            .arg("c")
            .arg("hi")
            .query_async(&mut on_new)
            .await
            .expect("publish");
        let msg = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut pubsub.on_message()),
        )
        .await
        .expect("a message in 5 s")
        .expect("message");
        assert_eq!(msg.get_payload::<String>().expect("payload"), "hi");
        drop(primary);
    }
}
