//! Upstream pools: the replicas of one org's MCP server.
//!
//! A request goes to the replica with the fewest outstanding requests. A
//! replica that refuses connections or answers 5xx leaves rotation for a
//! cool-down. A request that never reached a replica (connect failure) is
//! tried on the next one; one that did reach it is never re-sent, because a
//! `tools/call` is not idempotent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use prometheus::{Histogram, IntCounter, IntGauge};

use tracing::Instrument as _;

use crate::config::{Era, UpstreamConfig};
use crate::edge::mime_is;
use crate::metrics::Metrics;
use ratatosk_auth::tls::ClientPems;

mod conn;
mod credentials;
mod forwarding;
mod probe;
mod reader;

pub use conn::{Client, Response, SendError, Target};
pub use credentials::{Cause, CredentialError, Credentials, Issuers};
pub use forwarding::*;
pub use probe::{ProbeError, UpstreamEra};
pub use reader::{AnswerReader, ReadError};

/// How an upstream answered, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Json,
    Sse,
    /// 202 Accepted or another body-less success.
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no replica of org '{org}' could be reached (tried {tried}): {last}")]
    Unreachable {
        org: String,
        tried: String,
        last: String,
    },
    #[error("upstream {replica} did not answer within {after:?}")]
    Timeout { replica: String, after: Duration },
    #[error("upstream {replica} answered HTTP {status}")]
    Status {
        replica: String,
        status: StatusCode,
        body: Bytes,
        content_type: Option<String>,
    },
    #[error("upstream {replica} failed: {reason}")]
    Failed { replica: String, reason: String },
    /// No credential for the request (`upstream.auth`), so it was not sent.
    #[error("upstream {upstream} gets no credential: {error}")]
    Credential {
        upstream: String,
        error: CredentialError,
    },
}

struct Replica {
    /// As configured: for logs, metrics and the admin API.
    url: String,
    /// Parsed once: requests reuse it rather than parse `url` each time.
    target: conn::Target,
    /// How clients see it in errors, e.g. `org-1#2`: the URL is internal.
    name: String,
    outstanding: AtomicUsize,
    /// Milliseconds after the pool's epoch until which the replica is out
    /// of rotation; 0 when it is in.
    ejected_until: AtomicU64,
    up: IntGauge,
    latency: Histogram,
    err_connect: IntCounter,
    err_timeout: IntCounter,
    err_status: IntCounter,
    err_protocol: IntCounter,
    err_tls: IntCounter,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("replica '{url}' is not a usable URL: {reason}")]
    Url { url: String, reason: String },
    #[error("upstream.tls.{0}")]
    Tls(#[from] ratatosk_auth::tls::ClientTlsError),
}

/// Bounds on reading one upstream answer.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Longest wait for the next piece of the answer.
    pub timeout: Duration,
    /// Longest the whole answer may take.
    pub max_duration: Duration,
    /// Most bytes the whole answer may have.
    pub max_bytes: usize,
    /// Most bytes an SSE answer may send between two events: what the
    /// event parser must buffer. Bounds a stream meant to stay open (a
    /// listen), whose whole is unbounded.
    pub max_event_bytes: usize,
}

/// One org's replicas and the client that reaches them.
pub struct Pool {
    org: String,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    epoch: Instant,
    eject_for: Duration,
    /// How long to wait for answers of this pool, and how they are read.
    pub read_limits: ReadLimits,
    /// The connections to the replicas, kept per thread: the gateway runs
    /// one runtime per thread, and a connection is best read on the thread
    /// that opened it (bench/RESULTS.md).
    client: conn::Client,
    connect_timeout: Duration,
    /// What each request carries to prove the gateway (`upstream.auth`).
    credentials: Credentials,
    /// The era the server speaks, for traces (set once the route is built).
    era: std::sync::OnceLock<Arc<probe::UpstreamEra>>,
    /// A server the gateway runs itself (an `openapi` server): requests
    /// go to it in-process, not to the replicas, which only name it.
    local: Option<Arc<dyn LocalServer>>,
}

/// An MCP server the gateway runs in-process (stateless, as a
/// `stateless-2025` upstream): it takes the request a replica would
/// (credentials applied) and answers as one would.
#[async_trait::async_trait]
pub trait LocalServer: Send + Sync {
    async fn serve(
        &self,
        method: http::Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<conn::Response, SendError>;
}

/// A replica chosen for one request. It counts as outstanding until dropped.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// The replica's public name, for errors clients see.
    pub fn replica(&self) -> &str {
        &self.pool.replicas[self.index].name
    }

    /// The replica's configured URL: where an upstream session it minted
    /// lives.
    pub fn url(&self) -> &str {
        &self.pool.replicas[self.index].url
    }
}

/// How one request to one replica went.
enum Attempt {
    Done(Result<Answer, UpstreamError>),
    /// The replica could not be connected to; another may be tried.
    NotReached(String),
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.replicas[self.index]
            .outstanding
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response whose headers have arrived; the body is read by the caller.
pub struct Answer {
    pub kind: AnswerKind,
    pub status: StatusCode,
    pub response: conn::Response,
    /// Keeps the replica counted as busy while the body streams.
    pub lease: Lease,
}

impl Pool {
    pub fn new(
        org: &str,
        cfg: &UpstreamConfig,
        max_answer_bytes: usize,
        metrics: &Metrics,
    ) -> Result<Pool, PoolError> {
        // A TLS configuration only where a replica needs one: the system's
        // roots are read once per pool, not for plain HTTP.
        let tls = if cfg.replicas.iter().any(|r| r.starts_with("https:")) {
            let pems = match &cfg.tls {
                Some(tls) => tls.load()?,
                None => ClientPems::default(),
            };
            Some(pems.client_config()?)
        } else {
            None
        };
        let replicas = cfg
            .replicas
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let target = conn::Target::parse(url).map_err(|reason| PoolError::Url {
                    url: url.clone(),
                    reason,
                })?;
                let labels = [org, url.as_str()];
                let err = |kind: &str| {
                    metrics
                        .upstream_errors
                        .with_label_values(&[org, url.as_str(), kind])
                };
                let up = metrics.replica_up.with_label_values(&labels);
                up.set(1);
                Ok(Replica {
                    url: url.clone(),
                    target,
                    name: format!("{org}#{}", i + 1),
                    outstanding: AtomicUsize::new(0),
                    ejected_until: AtomicU64::new(0),
                    up,
                    latency: metrics.upstream_latency.with_label_values(&labels),
                    err_connect: err("connect"),
                    err_timeout: err("timeout"),
                    err_status: err("status"),
                    err_protocol: err("protocol"),
                    err_tls: err("tls"),
                })
            })
            .collect::<Result<Vec<_>, PoolError>>()?;
        Ok(Pool {
            org: org.to_owned(),
            replicas,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            eject_for: cfg.eject_for,
            read_limits: ReadLimits {
                timeout: cfg.timeout,
                max_duration: cfg.max_duration,
                max_bytes: max_answer_bytes,
                max_event_bytes: max_answer_bytes,
            },
            client: conn::Client::new(cfg.replicas.len(), cfg.connect_timeout, tls),
            connect_timeout: cfg.connect_timeout,
            credentials: Credentials::None,
            era: std::sync::OnceLock::new(),
            local: None,
        })
    }

    /// This pool, with its requests served by `local`.
    pub fn with_local(mut self, local: Arc<dyn LocalServer>) -> Pool {
        self.local = Some(local);
        self
    }

    /// This pool, with `credentials` on every request.
    pub fn with_credentials(mut self, credentials: Credentials) -> Pool {
        self.credentials = credentials;
        self
    }

    /// Names the era the pool's server speaks, for its traces.
    pub fn with_era(self, era: Arc<UpstreamEra>) -> Pool {
        let _ = self.era.set(era);
        self
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn in_rotation(&self, r: &Replica, now: u64) -> bool {
        let until = r.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now >= until {
            // The cool-down is over: take it back (once).
            if r.ejected_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                r.up.set(1);
                tracing::info!(org = %self.org, replica = %r.url, "replica back in rotation");
            }
            return true;
        }
        false
    }

    fn eject(&self, index: usize, why: &str) {
        let r = &self.replicas[index];
        let cool_down = u64::try_from(self.eject_for.as_millis()).unwrap_or(u64::MAX);
        let until = self.now_ms().saturating_add(cool_down);
        r.ejected_until.store(until.max(1), Ordering::Relaxed);
        r.up.set(0);
        tracing::warn!(org = %self.org, replica = %r.url, name = %r.name, cool_down = ?self.eject_for, "replica ejected: {why}");
    }

    /// Replicas in rotation now.
    pub fn available(&self) -> usize {
        let now = self.now_ms();
        self.replicas
            .iter()
            .filter(|r| self.in_rotation(r, now))
            .count()
    }

    /// Picks the replica with the fewest outstanding requests among those in
    /// rotation and not yet tried; ties rotate. If every untried replica is
    /// ejected, the one whose cool-down ends first is tried anyway: a pool
    /// that is all ejected must still be able to recover.
    fn pick(self: &Arc<Self>, tried: &[usize]) -> Option<Lease> {
        let now = self.now_ms();
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        let mut fallback: Option<(usize, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if tried.contains(&i) {
                continue;
            }
            let r = &self.replicas[i];
            if self.in_rotation(r, now) {
                let load = r.outstanding.load(Ordering::Relaxed);
                if best.is_none_or(|(_, l)| load < l) {
                    best = Some((i, load));
                }
            } else {
                let until = r.ejected_until.load(Ordering::Relaxed);
                if fallback.is_none_or(|(_, u)| until < u) {
                    fallback = Some((i, until));
                }
            }
        }
        let index = best.map(|(i, _)| i).or(fallback.map(|(i, _)| i))?;
        Some(self.lease(index))
    }

    /// Counts replica `index` busy until the lease is dropped.
    fn lease(self: &Arc<Self>, index: usize) -> Lease {
        self.replicas[index]
            .outstanding
            .fetch_add(1, Ordering::Relaxed);
        Lease {
            pool: self.clone(),
            index,
        }
    }

    /// Sends one POST to a replica and waits for the response headers.
    pub async fn send(
        self: &Arc<Self>,
        headers: Outbound,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let headers = self.with_credential(headers).await?;
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error = String::from("no replica configured");
        while let Some(lease) = self.pick(&tried) {
            tried.push(lease.index);
            match self
                .attempt(lease, http::Method::POST, headers.clone(), body.clone())
                .await
            {
                Attempt::Done(result) => return result,
                Attempt::NotReached(why) => last_error = why,
            }
        }
        Err(self.unreachable(&tried, last_error))
    }

    /// Sends one request to the replica at `url` only, as the messages of
    /// an upstream session must: no fail-over. A replica that is no longer
    /// configured, or cannot be connected to, is `Unreachable`.
    pub async fn send_to(
        self: &Arc<Self>,
        url: &str,
        method: http::Method,
        headers: Outbound,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let headers = self.with_credential(headers).await?;
        let Some(index) = self.replicas.iter().position(|r| r.url == url) else {
            return Err(UpstreamError::Unreachable {
                org: self.org.clone(),
                tried: "(none)".into(),
                last: "the replica holding the upstream session is no longer configured".into(),
            });
        };
        match self.attempt(self.lease(index), method, headers, body).await {
            Attempt::Done(result) => result,
            Attempt::NotReached(why) => Err(self.unreachable(&[index], why)),
        }
    }

    /// The headers with the upstream's credential for the caller.
    async fn with_credential(&self, outbound: Outbound) -> Result<HeaderMap, UpstreamError> {
        let Outbound {
            mut headers,
            caller,
            authorization,
        } = outbound;
        self.credentials
            .apply(caller.as_deref(), authorization.as_ref(), &mut headers)
            .await
            .map_err(|error| UpstreamError::Credential {
                upstream: self.org.clone(),
                error,
            })?;
        Ok(headers)
    }

    fn unreachable(&self, tried: &[usize], last: String) -> UpstreamError {
        UpstreamError::Unreachable {
            org: self.org.clone(),
            tried: tried
                .iter()
                .map(|i| self.replicas[*i].name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            last,
        }
    }

    /// One request to the leased replica; with traces on, in a span of its
    /// own whose `traceparent` the replica gets.
    async fn attempt(
        &self,
        lease: Lease,
        method: http::Method,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Attempt {
        if !crate::telemetry::on() {
            return self.attempt_in(lease, method, headers, body).await;
        }
        let replica = &self.replicas[lease.index];
        let era = self.era.get().and_then(|e| e.known());
        let span = tracing::info_span!(
            "upstream",
            otel.name = %format_args!("upstream {method}"),
            otel.kind = "client",
            server = %self.org,
            replica = %replica.url,
            era = era.map_or("unknown", Era::as_str),
            http.response.status_code = tracing::field::Empty,
        );
        span.in_scope(|| crate::telemetry::inject(&mut headers));
        let done = self
            .attempt_in(lease, method, headers, body)
            .instrument(span.clone())
            .await;
        if let Attempt::Done(Ok(answer)) = &done {
            span.record("http.response.status_code", answer.status.as_u16());
        }
        done
    }

    async fn attempt_in(
        &self,
        lease: Lease,
        method: http::Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Attempt {
        let index = lease.index;
        let replica = &self.replicas[index];
        let started = Instant::now();
        let request = async {
            match &self.local {
                Some(local) => local.serve(method, headers, body).await,
                None => {
                    self.client
                        .send(index, &replica.target, method, headers, body)
                        .await
                }
            }
        };
        let response = match tokio::time::timeout(self.read_limits.timeout, request).await {
            Err(_) => {
                replica.err_timeout.inc();
                tracing::warn!(org = %self.org, replica = %replica.url, after = ?self.read_limits.timeout, "upstream did not answer in time");
                return Attempt::Done(Err(UpstreamError::Timeout {
                    replica: replica.name.clone(),
                    after: self.read_limits.timeout,
                }));
            }
            Ok(Err(SendError::Tls(reason))) => {
                // Never a silent fail-over: the client hears which replica
                // failed the check and why.
                replica.err_tls.inc();
                tracing::error!(org = %self.org, replica = %replica.url, "upstream failed its TLS check: {reason}");
                self.eject(index, &format!("failed its TLS check: {reason}"));
                return Attempt::Done(Err(UpstreamError::Failed {
                    replica: replica.name.clone(),
                    reason: format!("TLS check failed: {reason}"),
                }));
            }
            Ok(Err(SendError::Connect(why))) => {
                replica.err_connect.inc();
                self.eject(index, &format!("cannot connect: {why}"));
                return Attempt::NotReached(format!("{}: cannot connect", replica.name));
            }
            Ok(Err(SendError::Failed(why))) => {
                replica.err_protocol.inc();
                self.eject(index, &format!("request failed: {why}"));
                return Attempt::Done(Err(UpstreamError::Failed {
                    replica: replica.name.clone(),
                    reason: "the request failed (see the gateway log)".into(),
                }));
            }
            Ok(Ok(response)) => response,
        };
        replica.latency.observe(started.elapsed().as_secs_f64());
        let status = response.status();
        if !status.is_success() {
            replica.err_status.inc();
            if status.is_server_error() {
                self.eject(index, &format!("answered HTTP {status}"));
            }
            let content_type = content_type(&response).map(str::to_owned);
            let body = read_error_body(response, self.read_limits.timeout).await;
            tracing::warn!(org = %self.org, replica = %replica.url, %status, "upstream refused a request");
            return Attempt::Done(Err(UpstreamError::Status {
                replica: replica.name.clone(),
                status,
                body,
                content_type,
            }));
        }
        let kind = match content_type(&response) {
            Some(ct) if mime_is(ct, "text/event-stream") => AnswerKind::Sse,
            Some(ct) if mime_is(ct, "application/json") => AnswerKind::Json,
            _ if status == StatusCode::ACCEPTED || status == StatusCode::NO_CONTENT => {
                AnswerKind::Empty
            }
            other => {
                replica.err_protocol.inc();
                return Attempt::Done(Err(UpstreamError::Failed {
                    replica: replica.name.clone(),
                    reason: format!(
                        "answered HTTP {status} with Content-Type {:?}; expected application/json or text/event-stream",
                        other.unwrap_or("(none)")
                    ),
                }));
            }
        };
        Attempt::Done(Ok(Answer {
            kind,
            status,
            response,
            lease,
        }))
    }

    /// Whether some replica accepts a TCP connection within the connect
    /// timeout: a check that asks nothing of the server, so it neither
    /// needs a session nor fills its log.
    pub async fn accepts_connections(&self) -> bool {
        for replica in &self.replicas {
            let target = &replica.target;
            let connect = tokio::net::TcpStream::connect((target.host(), target.port()));
            if let Ok(Ok(_)) = tokio::time::timeout(self.connect_timeout, connect).await {
                return true;
            }
        }
        false
    }

    /// Replica states for the admin API.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let now = self.now_ms();
        self.replicas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "url": r.url,
                    "in_rotation": self.in_rotation(r, now),
                    "outstanding": r.outstanding.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// The start of an error answer's body (64 KiB at most), for passing a
/// JSON-RPC error on; whatever cannot be read in time is dropped.
async fn read_error_body(mut response: conn::Response, timeout: Duration) -> Bytes {
    const MAX: usize = 64 * 1024;
    let mut body = bytes::BytesMut::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() >= MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    body.freeze()
}

fn content_type(response: &conn::Response) -> Option<&str> {
    response
        .header(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// An error with its causes, e.g. "error sending request: connection refused".
pub use ratatosk_auth::provider::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Era;
    use crate::testing;

    fn pool(replicas: &[&str]) -> Arc<Pool> {
        let cfg = UpstreamConfig {
            era: Era::Stateless2025,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(1),
            eject_for: Duration::from_secs(30),
            max_input_rounds: 10,
            tls: None,
            auth: Default::default(),
        };
        let metrics = Metrics::new().expect("metrics");
        Arc::new(Pool::new("org-1", &cfg, 1 << 20, &metrics).expect("pool"))
    }

    #[test]
    fn least_outstanding_wins() {
        let p = pool(&["http://a/mcp", "http://b/mcp", "http://c/mcp"]);
        let a = p.pick(&[]).expect("lease");
        let b = p.pick(&[]).expect("lease");
        let c = p.pick(&[]).expect("lease");
        let mut picked = vec![a.index, b.index, c.index];
        picked.sort();
        assert_eq!(picked, vec![0, 1, 2], "each replica got one");
        let busy = b.index;
        drop(b);
        for _ in 0..5 {
            let next = p.pick(&[]).expect("lease");
            assert_eq!(next.index, busy, "the idle replica is chosen");
        }
    }

    #[test]
    fn ejected_replicas_are_skipped_until_all_are_out() {
        let p = pool(&["http://a/mcp", "http://b/mcp"]);
        p.eject(0, "test");
        assert_eq!(p.available(), 1);
        for _ in 0..10 {
            assert_eq!(p.pick(&[]).expect("lease").index, 1);
        }
        // Tried b already: a is used despite its ejection rather than failing.
        assert_eq!(p.pick(&[1]).expect("lease").index, 0);
        assert!(p.pick(&[0, 1]).is_none());
    }

    #[test]
    fn ejection_ends_after_the_cool_down() {
        let p = pool(&["http://a/mcp"]);
        p.eject(0, "test");
        assert_eq!(p.available(), 0);
        // Pretend the cool-down ended a moment ago.
        std::thread::sleep(Duration::from_millis(2));
        p.replicas[0].ejected_until.store(1, Ordering::Relaxed);
        assert_eq!(p.available(), 1);
        assert_eq!(p.replicas[0].up.get(), 1);
    }

    #[test]
    fn media_types_ignore_parameters() {
        assert!(mime_is(
            "text/event-stream; charset=utf-8",
            "text/event-stream"
        ));
        assert!(mime_is("Application/JSON", "application/json"));
        assert!(!mime_is("application/jsonx", "application/json"));
    }

    #[tokio::test]
    async fn refused_connections_eject_and_fail_over() {
        let live = testing::stub(|body| {
            (
                200,
                "application/json",
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{}}}}",
                    testing::request_id(body)
                ),
            )
        })
        .await;
        let p = pool(&[&testing::dead_url(), &live.url()]);
        for _ in 0..4 {
            let answer = p
                .send(
                    Outbound::gateway(HeaderMap::new()),
                    Bytes::from_static(b"{\"id\":1}"),
                )
                .await
                .expect("answered by the live replica");
            assert_eq!(answer.kind, AnswerKind::Json);
            assert_eq!(answer.lease.replica(), "org-1#2");
        }
        assert_eq!(live.hits(), 4);
        assert_eq!(p.available(), 1, "the dead replica is out of rotation");
        assert_eq!(
            p.replicas[0].err_connect.get(),
            1,
            "tried once, then skipped"
        );
    }

    #[tokio::test]
    async fn pinned_sends_reach_their_replica_only() {
        let a = testing::stub(|_| (200, "application/json", "{}".into())).await;
        let b = testing::stub(|_| (200, "application/json", "{}".into())).await;
        let dead = testing::dead_url();
        let p = pool(&[&a.url(), &b.url(), &dead]);
        for _ in 0..3 {
            let answer = p
                .send_to(
                    &b.url(),
                    http::Method::POST,
                    Outbound::gateway(HeaderMap::new()),
                    Bytes::new(),
                )
                .await
                .expect("answered by the pinned replica");
            assert_eq!(answer.lease.url(), b.url());
        }
        assert_eq!((a.hits(), b.hits()), (0, 3), "never another replica");
        // A dead pinned replica is not failed over: the session is there.
        let lost = p
            .send_to(
                &dead,
                http::Method::POST,
                Outbound::gateway(HeaderMap::new()),
                Bytes::new(),
            )
            .await;
        assert!(matches!(lost, Err(UpstreamError::Unreachable { .. })));
        let gone = p
            .send_to(
                "http://127.0.0.1:1/gone",
                http::Method::POST,
                Outbound::gateway(HeaderMap::new()),
                Bytes::new(),
            )
            .await;
        assert!(
            matches!(&gone, Err(UpstreamError::Unreachable { last, .. }) if last.contains("no longer configured"))
        );
        assert_eq!((a.hits(), b.hits()), (0, 3));
        assert_eq!(p.snapshot()[1]["outstanding"], 0, "leases are released");
    }

    #[tokio::test]
    async fn a_5xx_ejects_the_replica_without_resending_the_request() {
        let failing = testing::stub(|_| (503, "text/plain", "overloaded".into())).await;
        let healthy = testing::stub(|_| (200, "application/json", "{}".into())).await;
        let p = pool(&[&failing.url(), &healthy.url()]);
        let err = match p
            .send(
                Outbound::gateway(HeaderMap::new()),
                Bytes::from_static(b"{}"),
            )
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("the first pick is the failing replica, whose 503 must surface"),
        };
        assert!(
            matches!(err, UpstreamError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE),
            "{err}"
        );
        assert_eq!(
            healthy.hits(),
            0,
            "a request that reached a replica is not sent again"
        );
        for _ in 0..5 {
            p.send(
                Outbound::gateway(HeaderMap::new()),
                Bytes::from_static(b"{}"),
            )
            .await
            .expect("healthy replica answers");
        }
        assert_eq!(
            failing.hits(),
            1,
            "the ejected replica gets no traffic during its cool-down"
        );
        assert_eq!(healthy.hits(), 5);
        assert_eq!(p.replicas[0].up.get(), 0);
    }

    #[tokio::test]
    async fn answers_that_are_neither_json_nor_sse_are_protocol_errors() {
        let odd = testing::stub(|_| (200, "text/html", "<html>".into())).await;
        let p = pool(&[&odd.url()]);
        match p
            .send(
                Outbound::gateway(HeaderMap::new()),
                Bytes::from_static(b"{}"),
            )
            .await
        {
            Err(UpstreamError::Failed { reason, .. }) => {
                assert!(reason.contains("text/html"), "{reason}")
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("an HTML answer must be refused"),
        }
    }
}
