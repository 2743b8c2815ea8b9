//! One logical connection to the shared Redis, whatever stands behind it:
//! one server at a fixed address, or a primary found through Redis
//! Sentinel and followed across failovers.
//!
//! With Sentinel, the link asks the sentinels for the primary (the redis
//! crate checks its `ROLE`) on first use, and again when a command fails
//! in a way that says the primary may have changed: the connection broke
//! or was refused, an answer timed out, or the server answered `READONLY`
//! or `MASTERDOWN` (a demoted primary). One look-up runs at a time, and a
//! failed one is not repeated for [`RESOLVE_PAUSE`], so a failover does
//! not turn every request into a round of questions to the sentinels.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

use super::{OP_TIMEOUT, RedisTarget, SentinelTarget};

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
    Sentinel(Followed),
}

/// A primary found through the sentinels, and the connection to it.
struct Primary {
    addr: String,
    client: redis::Client,
    conn: ConnectionManager,
    /// A command failed in a way that says the primary may have changed:
    /// the next command asks the sentinels first.
    suspect: AtomicBool,
}

struct Followed {
    sentinel: tokio::sync::Mutex<Resolver>,
    primary: ArcSwapOption<Primary>,
    tls: ratatosk_auth::tls::ClientPems,
    db: i64,
}

struct Resolver {
    client: SentinelClient,
    /// The last failed look-up, answered again until [`RESOLVE_PAUSE`]
    /// has passed.
    failed: Option<(Instant, RedisError)>,
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
            Some(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        ),
        _ => false,
    })
}

impl RedisLink {
    /// A link to `target`. Nothing is connected until first use, so a
    /// gateway starts, and recovers, without Redis being up at that moment.
    /// Must be called within the Tokio runtime that will drive it.
    pub fn new(target: &RedisTarget) -> RedisResult<RedisLink> {
        let inner = match &target.sentinel {
            None => {
                let client = target.client()?;
                let conn =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config())?;
                Inner::Direct { client, conn }
            }
            Some(sentinel) => Inner::Sentinel(Followed {
                sentinel: tokio::sync::Mutex::new(Resolver {
                    client: sentinel_client(sentinel, &target.tls)?,
                    failed: None,
                }),
                primary: ArcSwapOption::empty(),
                tls: target.tls.clone(),
                db: sentinel.db,
            }),
        };
        Ok(RedisLink(Arc::new(inner)))
    }

    /// A fresh pub/sub connection: to the server, or to the primary the
    /// sentinels name now (asked every time: a subscription is made again
    /// only after the last one broke).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match &*self.0 {
            Inner::Direct { client, .. } => client.get_async_pubsub().await,
            Inner::Sentinel(followed) => {
                let stale = followed.primary.load_full();
                let primary = followed.resolve(stale.as_ref()).await?;
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
            Inner::Sentinel(followed) => followed.primary.load().as_ref().map(|p| p.addr.clone()),
        }
    }
}

impl Followed {
    /// The primary to send to: the one known, unless there is none yet or
    /// a command on it failed as if it had moved.
    async fn current(&self) -> RedisResult<Arc<Primary>> {
        match self.primary.load_full() {
            Some(p) if !p.suspect.load(Ordering::Relaxed) => Ok(p),
            known => self.resolve(known.as_ref()).await,
        }
    }

    /// Asks the sentinels for the primary, unless another caller replaced
    /// `stale` meanwhile. The same address keeps its connection.
    async fn resolve(&self, stale: Option<&Arc<Primary>>) -> RedisResult<Arc<Primary>> {
        let mut resolver = tokio::time::timeout(OP_TIMEOUT, self.sentinel.lock())
            .await
            .map_err(|_| timed_out("waiting for the look-up of the redis primary"))?;
        let now = self.primary.load_full();
        if let Some(now) = &now
            && stale.is_none_or(|s| !Arc::ptr_eq(s, now))
            && !now.suspect.load(Ordering::Relaxed)
        {
            return Ok(now.clone());
        }
        if let Some((at, e)) = &resolver.failed
            && at.elapsed() < RESOLVE_PAUSE
        {
            return Err(e.clone());
        }
        let found = tokio::time::timeout(OP_TIMEOUT, resolver.client.async_get_client())
            .await
            .unwrap_or_else(|_| Err(timed_out("asking the sentinels for the redis primary")));
        let client = match found {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find the redis primary through the sentinels");
                resolver.failed = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        resolver.failed = None;
        let addr = client.get_connection_info().addr().to_string();
        if let Some(now) = now
            && now.addr == addr
        {
            now.suspect.store(false, Ordering::Relaxed);
            return Ok(now);
        }
        let client = RedisTarget::client_of(client.get_connection_info().clone(), &self.tls)?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())?;
        tracing::info!(primary = %addr, "following the redis primary the sentinels name");
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
    let mut nodes = Vec::with_capacity(target.nodes.len());
    for node in &target.nodes {
        let (host, port) = host_port(node)?;
        nodes.push(if secure {
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(host, port)
        });
    }
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
            Inner::Sentinel(followed) => Box::pin(async move {
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
            Inner::Sentinel(followed) => Box::pin(async move {
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
            Inner::Sentinel(followed) => followed.db,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{RedisServer, eventually};

    async fn role(port: u16) -> String {
        let mut conn = RedisTarget::from(format!("redis://127.0.0.1:{port}/").as_str())
            .client()
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let role: Vec<Value> = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .expect("role");
        match role.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("ROLE answered {other:?}"),
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
