//! The gateway core: one request in, one response out, no sockets.
//!
//! [`Gateway::handle`] walks the request path of ARCHITECTURE.md: edge
//! checks, route, (auth), session, bridge, upstream. The Pingora glue in
//! `server.rs` only reads the request and writes what comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use http::{HeaderValue, Method, StatusCode};
use ratatosk_auth::{AuthMode, Identity};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::LogoutMemory;
use crate::config::{Config, Era};
use crate::edge::{
    self, ChunkSource, LAST_EVENT_ID, Label, MCP_SESSION_ID, Reject, Request, Response,
};
use crate::holds::{self, Holds};
use crate::jsonrpc::{self, Body, Id, Kind, Message, code};
use crate::metrics::Metrics;
use crate::routes::{Endpoint, Front, OrgRoute, RouteError, Routes, Target};
use crate::session::{self, SessionState, SessionStore, StoreError, Transport, short};
use crate::stream::{
    AttachError, EventId, Hub, LiveStream, LogLimits, STANDALONE, SessionLog, StreamId,
    priming_frame,
    shared::{BusHandler, HoldRoute, SharedEvents},
    sse_frame,
};
use crate::upstream::{AnswerKind, UpstreamError};
use crate::upstream::{AnswerReader, Forwarding, upstream_headers};

// The parts of the request path (`handle` below walks them in order):
/// Who is calling: token checks, RFC 9728 metadata, back-channel logout.
mod auth;
/// The era bridge: clients and upstreams of different MCP eras.
mod bridge;
/// What other nodes tell this one (Redis mode).
mod bus;
/// The per-request context: org, caller, headers, request id.
mod call;
/// The other nodes, as one handle that does nothing on a single node.
mod cluster;
/// The federated endpoint of an org with several servers.
mod federated;
/// Holds: requests that workers finish.
mod holding;
/// Requests in flight, and what cancels them.
mod in_flight;
/// HTTP+SSE of 2024-11-05: `/sse` and `/messages`.
mod legacy;
/// A session's life: initialize, admission, look-ups, publishing, its end.
mod lifecycle;
/// `x-mcp-header` parameters of tool calls.
mod params;
/// Tool policies and the audit.
mod policed;
/// Rate limits.
mod rated;
/// A new config in place of the running one.
mod registry;
/// Where failures become responses.
mod rejects;
mod reload;
/// The gateway's own requests to clients, waiting for answers.
mod replies;
/// Streamable HTTP: POST, GET and DELETE on `/mcp`.
mod streamable;
/// The MCP endpoint over a WebSocket: `/ws`.
mod websocket;

use bridge::{modern, stateful};
pub use bus::{Notice, ResumeRequest, Resumed};
use call::Call;
use cluster::Cluster;
use holding::HoldClient;
use in_flight::InFlight;
use lifecycle::{negotiated_version, session_header};
use policed::{Asker, Refusal};
pub use registry::unknown_org;
pub use rejects::hold_reject;
use rejects::*;
pub use reload::{ReloadError, Reloaded};
use streamable::{json_unless_cancelled, parse_post_body};

/// How many requests of one batch go upstream at once.
const BATCH_CONCURRENCY: usize = 8;

/// Code of the error answered to a request the client cancelled.
const REQUEST_CANCELLED: i64 = -32800;

/// Longest resource URI a session may subscribe to.
const MAX_SUBSCRIPTION_URI_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Routes(#[from] crate::routes::RoutesError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    #[error("cannot build the token validator: {0}")]
    Auth(#[from] ratatosk_auth::validator::BuildError),
    #[error("{0}")]
    Config(String),
}

pub struct Gateway {
    /// The config and the routes built from it; a reload swaps both.
    live: arc_swap::ArcSwap<Live>,
    /// Reloads one at a time; the SIGHUP watcher waits on its `Notify`.
    reloads: reload::Reloads,
    /// Servers registered through the admin API.
    registry: registry::Registry,
    /// Validates tokens; `None` when no org needs it.
    pub validator: Option<Arc<ratatosk_auth::Validator>>,
    /// `config.public_url()`, computed once.
    pub public_url: String,
    /// The origin of `public_url`: same-origin browser requests pass the
    /// `Origin` check.
    own_origin: Option<String>,
    pub store: Arc<dyn SessionStore>,
    pub hub: Hub,
    /// This node's random tag (the shared log's, with one): it keeps the
    /// gateway's own request ids apart from other nodes'.
    node: u32,
    pub metrics: Arc<Metrics>,
    /// Requests being answered upstream, so a `notifications/cancelled` or
    /// a DELETE can stop them; also numbers registrations.
    in_flight: in_flight::Requests,
    /// The gateway's own requests to clients, waiting for their answers;
    /// also mints the gateway's unique ids.
    replies: replies::Replies,
    /// What the era bridge keeps between requests.
    bridges: bridge::Bridges,
    /// Requests an upstream answered with a hold, for workers to finish.
    pub holds: Holds,
    /// What federated endpoints keep between requests.
    federations: federated::Federations,
    /// The audit log.
    pub audit: Arc<crate::audit::Audit>,
    /// Signs `gateway-jwt` upstream credentials; its key set is public.
    pub upstream_jwt: Option<Arc<ratatosk_auth::upstream_jwt::UpstreamSigner>>,
    /// With several nodes: the provider logouts Redis keeps for nodes
    /// that were off the bus.
    logouts: Option<LogoutMemory>,
    /// With several nodes: where the rate limits are decided.
    rates: Option<crate::ratelimit::SharedRates>,
    draining: AtomicBool,
    /// When this node started: `started_at` to show, `started` to count
    /// the uptime without wall-clock steps.
    started: std::time::Instant,
    started_at: std::time::SystemTime,
}

/// The running config, the routes built from it, and its generation (1 at
/// start, one more per reload).
pub struct Live {
    pub config: Config,
    pub routes: Routes,
    pub generation: u64,
}

/// What the nodes of a gateway share through Redis: their sessions' event
/// logs and the node bus, and the logouts kept for nodes off the bus.
pub struct Shared {
    pub events: Arc<SharedEvents>,
    pub logouts: LogoutMemory,
    /// For the rate limits, which all nodes share.
    pub rates: crate::session::RedisLink,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("session not found")]
    UnknownSession,
    #[error("{0}")]
    Invalid(jsonrpc::FramingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Gateway {
    pub fn new(config: Config, store: Arc<dyn SessionStore>) -> Result<Arc<Gateway>, BuildError> {
        Self::with_nodes(config, store, None)
    }

    /// A gateway node; with `shared`, one of several that share their
    /// sessions' event logs (and tell each other about sessions, requests
    /// and logouts) through Redis.
    pub fn with_nodes(
        config: Config,
        store: Arc<dyn SessionStore>,
        shared: Option<Shared>,
    ) -> Result<Arc<Gateway>, BuildError> {
        let (events, logouts, rates) = match shared {
            Some(Shared {
                events,
                logouts,
                rates,
            }) => (Some(events), Some(logouts), Some(rates)),
            None => (None, None, None),
        };
        let metrics = Arc::new(Metrics::new()?);
        let registry = registry::Registry::new(
            rates
                .clone()
                .map(|conn| (conn, config.sessions.key_prefix.as_str())),
        );
        let rates = rates.map(|conn| {
            crate::ratelimit::SharedRates::new(conn, &config.sessions.key_prefix, &metrics)
        });
        let upstream_jwt = config
            .upstream_jwt
            .as_ref()
            .map(|c| ratatosk_auth::upstream_jwt::UpstreamSigner::new(c, &config.public_url()))
            .transpose()
            .map_err(|e| BuildError::Config(format!("upstream_jwt: {e}")))?
            .map(Arc::new);
        let node = events.as_ref().map_or_else(rand::random, |e| e.node());
        let redis = config.sessions.redis().map_err(BuildError::Config)?;
        let redis_sink = redis.as_ref().map(|target| crate::audit::RedisSink {
            target,
            key: format!("{}audit", config.sessions.key_prefix),
            node,
        });
        let audit = crate::audit::Audit::new(
            &config.audit,
            redis_sink,
            metrics.audited.clone(),
            metrics.audit_dropped.clone(),
        )
        .map_err(BuildError::Audit)
        .map(Arc::new)?;
        let validator = match &config.identity {
            Some(identity) => Some(ratatosk_auth::Validator::new(
                identity.clone(),
                metrics.registry(),
            )?),
            None => None,
        };
        let issuers = crate::upstream::Issuers {
            jwt: upstream_jwt.as_ref(),
            provider: validator.as_ref(),
        };
        let routes = Routes::from_config(&config, &metrics, issuers)?;
        let limits = LogLimits {
            max_events: config.sessions.event_log_size,
            max_bytes: config.sessions.event_log_bytes,
        };
        let gateway = Arc::new(Gateway {
            upstream_jwt,
            validator,
            public_url: config.public_url(),
            own_origin: edge::origin_of(&config.public_url()),
            node,
            hub: match &events {
                Some(events) => Hub::shared(limits, events.clone()),
                None => Hub::new(limits),
            },
            store,
            metrics,
            in_flight: in_flight::Requests::default(),
            replies: replies::Replies::new(node),
            bridges: bridge::Bridges::new(),
            holds: Holds::new(config.holds.clone()),
            federations: federated::Federations::default(),
            audit,
            logouts,
            rates,
            draining: AtomicBool::new(false),
            started: std::time::Instant::now(),
            started_at: std::time::SystemTime::now(),
            reloads: reload::Reloads::new(&config),
            registry,
            live: arc_swap::ArcSwap::from_pointee(Live {
                config,
                routes,
                generation: 1,
            }),
        });
        if let Some(events) = &events {
            let handler: Arc<dyn BusHandler> = gateway.clone();
            events.start(Arc::downgrade(&handler));
        }
        Ok(gateway)
    }

    /// The running config and routes: cheap, and current until the end of
    /// the statement (or for as long as it is kept). Across an `.await`,
    /// keep [`Gateway::live_full`] instead.
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// The running config and routes, kept as long as the caller likes:
    /// a reload meanwhile does not change them.
    pub fn live_full(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// This node's random tag, as other nodes know it.
    pub fn node_id(&self) -> u32 {
        self.node
    }

    /// When this node started, and how long ago.
    pub fn started(&self) -> (std::time::SystemTime, std::time::Duration) {
        (self.started_at, self.started.elapsed())
    }

    /// What issues upstream credentials (for building routes).
    fn issuers(&self) -> crate::upstream::Issuers<'_> {
        crate::upstream::Issuers {
            jwt: self.upstream_jwt.as_ref(),
            provider: self.validator.as_ref(),
        }
    }

    /// Warns, loudly, about each org without auth and each upstream whose
    /// certificate is not checked: at start and after each reload.
    pub fn warn_about_unsafe_settings(&self) {
        for org in self.unauthenticated_orgs() {
            tracing::warn!(
                org,
                "!!! AUTH IS OFF for org '{org}' (auth: none): anyone who can reach the gateway can use its MCP servers !!!"
            );
        }
        for upstream in self.live().config.insecure_tls() {
            tracing::warn!(
                upstream,
                "!!! TLS VERIFICATION IS OFF for upstream '{upstream}' (tls.insecure_skip_verify): anyone on the path can read and change its traffic, the caller's identity included !!!"
            );
        }
    }

    /// Routes that serve every caller as anonymous. The binary warns about
    /// each at start.
    pub fn unauthenticated_orgs(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .live()
            .routes
            .orgs()
            .filter(|o| o.auth == AuthMode::None)
            .map(|o| o.name.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Answers one request.
    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        let mut response = if self.is_draining() {
            // Not 404: that would tell clients their session is gone.
            Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_ERROR,
                "the gateway is shutting down; retry shortly",
            )
            .into_response()
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
            .labeled(self.label_for_path(&req.path, &req.method))
        } else {
            let response = self.check_and_route(&req).await;
            if response.status.is_server_error() {
                // Only here: a request that succeeds pays one comparison.
                self.metrics
                    .recent_errors
                    .record(recent_error(&req, &response));
            }
            response
        };
        if let Ok(v) = HeaderValue::from_str(&req.request_id) {
            response.headers.insert(edge::REQUEST_ID, v);
        }
        response
    }

    async fn check_and_route(self: &Arc<Self>, req: &Request) -> Response {
        let checked = edge::check_origin(
            &req.headers,
            &self.live().config.allowed_origins,
            self.own_origin.as_deref(),
        );
        match checked {
            Err(reject) => {
                let label = self.label_for_path(&req.path, &req.method);
                reject.into_response().labeled(label)
            }
            Ok(origin) => {
                let mut r = self.route(req, origin.is_some()).await;
                if let Some(origin) = origin {
                    edge::add_cors(&mut r.headers, origin);
                }
                r
            }
        }
    }

    pub fn label_for_path(&self, path: &str, method: &Method) -> Label {
        Label {
            org: self
                .live()
                .routes
                .resolve(path)
                .ok()
                .map(|(t, _)| t.front().name.clone()),
            method: http_label(method),
        }
    }

    async fn route(self: &Arc<Self>, req: &Request, has_origin: bool) -> Response {
        if let Some(answer) = self.serve_auth_paths(req).await {
            return answer.labeled(Label {
                org: None,
                method: "auth",
            });
        }
        let (target, endpoint) = match self.live().routes.resolve(&req.path) {
            Ok(found) => found,
            Err(e) => {
                return self
                    .route_reject(e, &req.path)
                    .into_response()
                    .labeled(Label {
                        org: None,
                        method: http_label(&req.method),
                    });
            }
        };
        let front = target.front();
        let mut label = Label {
            org: Some(front.name.clone()),
            method: http_label(&req.method),
        };
        if req.method == Method::OPTIONS
            && has_origin
            && let Some(origin) = req.headers.get(http::header::ORIGIN)
        {
            return edge::preflight(origin.clone()).labeled(label);
        }
        if endpoint == Endpoint::Ws {
            // Boxed: rare, and not to make every request's future larger.
            return Box::pin(self.websocket_upgrade(front, req, has_origin))
                .await
                .unwrap_or_else(Reject::into_response)
                .labeled(label);
        }
        let identity = match self.authenticate(front, endpoint, req).await {
            Ok(identity) => identity,
            Err(reject) => return reject.into_response().labeled(label),
        };
        let result = match &target {
            Target::Server(org) => {
                let call = Call::new(org, &identity, req);
                self.dispatch(call, endpoint, req, &mut label).await
            }
            Target::Federated(federation) => {
                // Boxed: not to make every request's future larger.
                Box::pin(self.federated(federation, &identity, endpoint, req, &mut label)).await
            }
        };
        result.unwrap_or_else(Reject::into_response).labeled(label)
    }

    /// Serves one request at a server's endpoint for an authenticated
    /// caller: a client's, or a federated session's for its server.
    async fn dispatch(
        self: &Arc<Self>,
        call: Call<'_>,
        endpoint: Endpoint,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        match (endpoint, &req.method) {
            (Endpoint::Mcp, &Method::POST) => self.mcp_post(call, req, label).await,
            (Endpoint::Mcp, &Method::GET) => self.mcp_get(call).await,
            (Endpoint::Mcp, &Method::DELETE) => self.mcp_delete(call).await,
            (Endpoint::Mcp, m) => Err(Reject::method_not_allowed(m, "GET, POST, DELETE, OPTIONS")),
            (Endpoint::Sse, &Method::GET) => self.legacy_open(call).await,
            (Endpoint::Sse, m) => Err(Reject::method_not_allowed(m, "GET, OPTIONS")),
            (Endpoint::Messages, &Method::POST) => self.legacy_post(call, req, label).await,
            (Endpoint::Messages, m) => Err(Reject::method_not_allowed(m, "POST, OPTIONS")),
            (Endpoint::Ws, _) => Err(websocket::upgrade_required()),
        }
    }

    /// Why a path reaches no route, for the client.
    fn route_reject(&self, e: RouteError, path: &str) -> Reject {
        let live = self.live();
        let base = live.routes.base_path();
        let message = match e {
            RouteError::NoEndpoint => format!(
                "no MCP endpoint at '{}'; expected {base}/{{org}}/mcp, /sse or /messages, or {base}/{{org}}/{{server}}/mcp and so on",
                jsonrpc::clip(path, 64),
            ),
            RouteError::UnknownOrg(name) => format!("unknown org '{}'", jsonrpc::clip(&name, 64)),
            RouteError::UnknownServer { org, server } => {
                format!("org '{org}' has no server '{}'", jsonrpc::clip(&server, 64))
            }
        };
        Reject::new(StatusCode::NOT_FOUND, code::NOT_FOUND, message)
    }

    // ----- Streamable HTTP -------------------------------------------------

    // ----- legacy HTTP+SSE (2024-11-05) ------------------------------------

    // ----- admin API ---------------------------------------------------------

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.hub.close_all();
        // Leases of background upstream streams go now, so that another
        // node takes them over at once rather than when they expire.
        self.bridges.listeners.stop_all();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The other nodes (Redis mode); a handle that does nothing on one.
    fn cluster(&self) -> Cluster<'_> {
        Cluster(self.hub.events())
    }
}

fn body_label(body: &Body) -> &'static str {
    match body {
        Body::Single(m) => m.method().map_or("response", jsonrpc::method_label),
        Body::Batch(_) => "batch",
    }
}

fn http_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The request path driven without a client socket: requests go straight
    //! into `Gateway::handle`; upstreams are loopback stubs.

    use super::*;
    use crate::edge::ResponseBody;
    use crate::session::MemorySessionStore;
    use crate::testing;
    use std::path::Path;
    use std::time::Duration;

    pub(in crate::gateway) const SECRET: &str = "unit-test-secret-0123";

    pub(in crate::gateway) fn gateway(replicas: &[String]) -> Arc<Gateway> {
        gateway_with(replicas, "")
    }

    /// `sessions` is extra YAML for the `sessions:` map, e.g. `max_in_flight: 1`.
    pub(in crate::gateway) fn gateway_with(replicas: &[String], sessions: &str) -> Arc<Gateway> {
        gateway_yaml(replicas, sessions, "", "")
    }

    /// `top` is extra top-level YAML; `org` extra keys of `org-1`, in flow style.
    pub(in crate::gateway) fn gateway_yaml(
        replicas: &[String],
        sessions: &str,
        top: &str,
        org: &str,
    ) -> Arc<Gateway> {
        let list = replicas
            .iter()
            .map(|r| format!("\"{r}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
             allowed_origins: [\"http://ok.example\"]\nlimits: {{max_body_bytes: 1024}}\n\
             streams: {{keepalive: 10s}}\npublish: {{secret: {SECRET}}}\nsessions: {{{sessions}}}\n{top}\n\
             orgs:\n  org-1: {{{org} upstream: {{era: stateless-2025, replicas: [{list}], timeout: 2s}}}}\n"
        );
        let config = Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
        Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
    }

    pub(in crate::gateway) fn request(
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request {
        testing::request(method, path, headers, body.to_owned())
    }

    pub(in crate::gateway) fn post(body: &str, extra: &[(&str, &str)]) -> Request {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        headers.extend_from_slice(extra);
        request(Method::POST, "/gw/org-1/mcp", &headers, body)
    }

    pub(in crate::gateway) fn json_of(r: &Response) -> Value {
        match &r.body {
            ResponseBody::Full(b) => serde_json::from_slice(b).expect("json body"),
            _ => panic!("expected a full body"),
        }
    }

    /// The JSON-RPC error message of a refused request.
    pub(in crate::gateway) fn error_message(r: &Response) -> String {
        json_of(r)["error"]["message"]
            .as_str()
            .expect("an error message")
            .to_owned()
    }

    pub(in crate::gateway) async fn next_text(r: &mut Response) -> String {
        let ResponseBody::Stream(src) = &mut r.body else {
            panic!("expected a stream")
        };
        let chunk = tokio::time::timeout(Duration::from_secs(5), src.next_chunk())
            .await
            .expect("a chunk in time")
            .expect("stream open");
        src.written();
        String::from_utf8(chunk.to_vec()).expect("utf8")
    }

    /// What a stream says until it has said `needle`; fails after 5 s.
    pub(in crate::gateway) async fn text_until(r: &mut Response, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut text = String::new();
        while !text.contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle} within 5 s: {text}"
            );
            text.push_str(&next_text(r).await);
        }
        text
    }

    /// Opens the session's GET stream.
    pub(in crate::gateway) async fn open_stream(gw: &Arc<Gateway>, sid: &str) -> Response {
        gw.handle(request(
            Method::GET,
            "/gw/org-1/mcp",
            &[("accept", "text/event-stream"), ("mcp-session-id", sid)],
            "",
        ))
        .await
    }

    pub(in crate::gateway) const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"unit","version":"1"}}}"#;

    pub(in crate::gateway) async fn mcp_stub() -> testing::Stub {
        testing::stub(|body| {
            let id = testing::request_id(body);
            let text = String::from_utf8_lossy(body);
            if text.contains("\"initialize\"") {
                (200, "application/json", format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"protocolVersion":"2025-06-18","capabilities":{{}},"serverInfo":{{"name":"stub","version":"1"}}}}}}"#
                ))
            } else {
                (200, "text/event-stream", format!(
                    "event: message\r\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":1,\"progress\":1}}}}\r\n\r\n\
                     event: message\r\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"ok\":true}}}}\r\n\r\n"
                ))
            }
        })
        .await
    }

    pub(in crate::gateway) async fn initialize(gw: &Arc<Gateway>) -> String {
        initialize_with(gw, INIT).await
    }

    /// A session opened with `init` (an initialize request); its id.
    pub(in crate::gateway) async fn initialize_with(gw: &Arc<Gateway>, init: &str) -> String {
        let r = gw.handle(post(init, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        r.headers
            .get(&MCP_SESSION_ID)
            .expect("session id")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    #[tokio::test]
    async fn refusals_are_precise() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
        let cases: Vec<(Request, StatusCode, i64)> = vec![
            (
                post("nope", &[("mcp-session-id", &sid)]),
                StatusCode::BAD_REQUEST,
                code::PARSE_ERROR,
            ),
            (post(list, &[]), StatusCode::BAD_REQUEST, code::BAD_REQUEST),
            (
                post(list, &[("mcp-session-id", &"x".repeat(43))]),
                StatusCode::NOT_FOUND,
                code::SESSION_NOT_FOUND,
            ),
            (
                post(
                    &format!("[{list}]"),
                    &[
                        ("mcp-session-id", &sid),
                        ("mcp-protocol-version", "2025-06-18"),
                    ],
                ),
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
            ),
            (
                post(
                    list,
                    &[("mcp-session-id", &sid), ("origin", "http://evil.example")],
                ),
                StatusCode::FORBIDDEN,
                code::BAD_REQUEST,
            ),
            (
                post(
                    list,
                    &[
                        ("mcp-session-id", &sid),
                        ("mcp-protocol-version", "2030-01-01"),
                    ],
                ),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                request(
                    Method::POST,
                    "/gw/org-1/mcp",
                    &[("content-type", "text/plain"), ("accept", "*/*")],
                    list,
                ),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::BAD_REQUEST,
            ),
            (
                request(Method::POST, "/gw/org-9/mcp", &[], list),
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
            ),
            (
                request(Method::PATCH, "/gw/org-1/mcp", &[], ""),
                StatusCode::METHOD_NOT_ALLOWED,
                code::BAD_REQUEST,
            ),
            (
                request(
                    Method::GET,
                    "/gw/org-1/mcp",
                    &[
                        ("accept", "text/event-stream"),
                        ("mcp-session-id", &sid),
                        ("last-event-id", "x"),
                    ],
                    "",
                ),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
        ];
        for (req, status, code) in cases {
            let what = format!("{} {} {:?}", req.method, req.path, req.headers);
            let r = gw.handle(req).await;
            assert_eq!(r.status, status, "{what}");
            let body = json_of(&r);
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
            assert_eq!(body["jsonrpc"], "2.0");
        }
        // Nothing of that harmed the session.
        let ok = gw
            .handle(post(
                r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        assert_eq!(json_of(&ok)["result"], json!({}));
    }

    #[tokio::test]
    async fn draining_answers_503_not_404() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        gw.set_draining();
        let r = gw
            .handle(post(
                r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers
                .get(http::header::RETRY_AFTER)
                .expect("retry-after"),
            "1"
        );
        let r = gw.handle(post(INIT, &[])).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    /// An org with two servers, `a` (replicas `a`) and `b` (replicas `b`).
    fn two_servers(a: &str, b: &str) -> Arc<Gateway> {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\npublish: {{secret: {SECRET}}}\n\
             orgs:\n  org-1:\n    servers:\n\
             \x20     a: {{upstream: {{era: stateless-2025, replicas: [\"{a}\"], timeout: 2s}}}}\n\
             \x20     b: {{upstream: {{era: stateless-2025, replicas: [\"{b}\"], timeout: 2s}}, prefix: bee}}\n"
        );
        let config = Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
        Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
    }

    pub(in crate::gateway) fn post_to(path: &str, body: &str, extra: &[(&str, &str)]) -> Request {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        headers.extend_from_slice(extra);
        request(Method::POST, path, &headers, body)
    }

    #[tokio::test]
    async fn each_server_of_an_org_is_reached_at_its_own_path_with_its_own_sessions() {
        let (a, b) = (mcp_stub().await, mcp_stub().await);
        let gw = two_servers(&a.url(), &b.url());
        let r = gw.handle(post_to("/gw/org-1/a/mcp", INIT, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        let sid = r.headers[&MCP_SESSION_ID]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!((a.hits(), b.hits()), (1, 0), "initialize went to server a");
        let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x"}}"#;
        let mut r = gw
            .handle(post_to(
                "/gw/org-1/a/mcp",
                call,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        text_until(&mut r, r#""ok":true"#).await;
        assert_eq!((a.hits(), b.hits()), (2, 0), "the call went to server a");
        // A session of server a is unknown at server b, as any unknown id.
        let r = gw
            .handle(post_to(
                "/gw/org-1/b/mcp",
                call,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(json_of(&r)["error"]["code"], code::SESSION_NOT_FOUND);
        assert_eq!(b.hits(), 0);
        // Unknown servers are named in the refusal.
        let r = gw.handle(post_to("/gw/org-1/c/mcp", INIT, &[])).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(error_message(&r), "org 'org-1' has no server 'c'");
        // The legacy transport's endpoint names the server's path.
        let mut r = gw
            .handle(request(
                Method::GET,
                "/gw/org-1/b/sse",
                &[("accept", "text/event-stream")],
                "",
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let text = text_until(&mut r, "session_id=").await;
        assert!(
            text.contains("data: /gw/org-1/b/messages?session_id="),
            "{text}"
        );
    }

    mod auth {
        use super::*;
        use ratatosk_auth::testing::{AUDIENCE, FakeIdp, LOGOUT_CLIENT};

        async fn secured(idp: &FakeIdp, org_extra: &str) -> (Arc<Gateway>, testing::Stub) {
            let up = mcp_stub().await;
            let top = format!(
                "public_url: http://gw.test\nidentity: {{issuer: \"{}\", audience: \"{AUDIENCE}\", \
                 client_id: gateway-client, client_secret: s3cret, clock_skew: 0s, \
                 client_scopes: [organization, gateway], logout_client_ids: [{LOGOUT_CLIENT}]}}",
                idp.issuer
            );
            let gw = gateway_yaml(&[up.url()], "", &top, &format!("auth: jwt, {org_extra}"));
            (gw, up)
        }

        fn bearer(token: &str) -> String {
            format!("Bearer {token}")
        }

        #[tokio::test]
        async fn no_token_gets_401_with_a_challenge_and_the_metadata_is_served() {
            let idp = FakeIdp::start().await;
            let (gw, _up) = secured(&idp, "").await;
            let r = gw.handle(post(INIT, &[])).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            let challenge = r
                .headers
                .get(http::header::WWW_AUTHENTICATE)
                .expect("challenge");
            let meta_path = "/.well-known/oauth-protected-resource/gw/org-1/mcp";
            assert!(
                challenge.to_str().expect("ascii").starts_with(&format!(
                    "Bearer resource_metadata=\"http://gw.test{meta_path}\""
                )),
                "{challenge:?}"
            );
            let m = gw.handle(request(Method::GET, meta_path, &[], "")).await;
            assert_eq!(m.status, StatusCode::OK);
            let doc = json_of(&m);
            assert_eq!(doc["resource"], "http://gw.test/gw/org-1/mcp");
            assert_eq!(doc["authorization_servers"][0], idp.issuer.as_str());
            let bad = gw
                .handle(post(INIT, &[("authorization", "Bearer not-a-jwt")]))
                .await;
            assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
            assert!(
                bad.headers[http::header::WWW_AUTHENTICATE]
                    .to_str()
                    .expect("ascii")
                    .contains("invalid_token")
            );
        }

        /// Clients (the Python and TypeScript SDKs) refuse metadata whose
        /// `resource` is not the URL they connect to or a prefix of it, so
        /// the legacy endpoint and its message path name a resource of
        /// their own; both documents advertise the realm's client scopes.
        #[tokio::test]
        async fn the_legacy_endpoint_is_a_resource_of_its_own() {
            let idp = FakeIdp::start().await;
            let (gw, _up) = secured(&idp, "scopes: [mcp:admin],").await;
            let meta_path = "/.well-known/oauth-protected-resource/gw/org-1/sse";
            for (method, path) in [
                (Method::GET, "/gw/org-1/sse"),
                (Method::POST, "/gw/org-1/messages"),
            ] {
                let r = gw.handle(request(method, path, &[], "")).await;
                assert_eq!(
                    r.status,
                    StatusCode::UNAUTHORIZED,
                    "{path}: {}",
                    error_message(&r)
                );
                let challenge = r.headers[http::header::WWW_AUTHENTICATE]
                    .to_str()
                    .expect("ascii")
                    .to_owned();
                assert!(
                    challenge.starts_with(&format!(
                        "Bearer resource_metadata=\"http://gw.test{meta_path}\""
                    )) && challenge.ends_with("scope=\"organization gateway mcp:admin\""),
                    "{path}: {challenge}"
                );
            }
            let doc = json_of(&gw.handle(request(Method::GET, meta_path, &[], "")).await);
            assert_eq!(doc["resource"], "http://gw.test/gw/org-1/sse");
            assert_eq!(
                doc["scopes_supported"],
                json!(["organization", "gateway", "mcp:admin"])
            );
            let none = gw
                .handle(request(
                    Method::GET,
                    "/.well-known/oauth-protected-resource/gw/org-1/messages",
                    &[],
                    "",
                ))
                .await;
            assert_eq!(none.status, StatusCode::NOT_FOUND);
        }

        /// A client that registers itself with Keycloak may ask later only
        /// for the scopes it registered with: the scopes a policy grants
        /// tools with are advertised from the start, after the required.
        #[tokio::test]
        async fn the_scopes_a_policy_grants_with_are_advertised() {
            let idp = FakeIdp::start().await;
            let policy = "scopes: [mcp:admin], policy: [{name: t, when: {scopes: [mcp:tools, mcp:admin]}, allow: {tools: [x]}}],";
            let (gw, _up) = secured(&idp, policy).await;
            let r = gw.handle(post(INIT, &[])).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            let challenge = r.headers[http::header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii");
            assert!(
                challenge.ends_with("scope=\"organization gateway mcp:admin mcp:tools\""),
                "{challenge}"
            );
            let doc = json_of(
                &gw.handle(request(
                    Method::GET,
                    "/.well-known/oauth-protected-resource/gw/org-1/mcp",
                    &[],
                    "",
                ))
                .await,
            );
            assert_eq!(
                doc["scopes_supported"],
                json!(["organization", "gateway", "mcp:admin", "mcp:tools"])
            );
        }

        #[tokio::test]
        async fn wrong_org_and_missing_scope_are_403() {
            let idp = FakeIdp::start().await;
            let (gw, _up) = secured(&idp, "scopes: [mcp:admin],").await;
            let other_org =
                idp.token(json!({"organization": ["org-2"], "scope": "openid mcp:admin"}));
            let r = gw
                .handle(post(INIT, &[("authorization", &bearer(&other_org))]))
                .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            assert!(error_message(&r).contains("org-1"));
            let no_scope = idp.token(json!({"scope": "openid"}));
            let r = gw
                .handle(post(INIT, &[("authorization", &bearer(&no_scope))]))
                .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            let challenge = r.headers[http::header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii")
                .to_owned();
            assert!(
                challenge.contains("error=\"insufficient_scope\"")
                    && challenge.contains("scope=\"organization gateway mcp:admin\""),
                "{challenge}"
            );
            let ok = idp.token(json!({"scope": "openid mcp:admin"}));
            assert_eq!(
                gw.handle(post(INIT, &[("authorization", &bearer(&ok))]))
                    .await
                    .status,
                StatusCode::OK
            );
        }

        #[tokio::test]
        async fn sessions_are_bound_to_their_subject() {
            let idp = FakeIdp::start().await;
            let (gw, _up) = secured(&idp, "").await;
            let alice = idp.token(json!({"sub": "alice"}));
            let bob = idp.token(json!({"sub": "bob", "sid": "bob-session"}));
            let r = gw
                .handle(post(INIT, &[("authorization", &bearer(&alice))]))
                .await;
            let sid = r.headers[&MCP_SESSION_ID]
                .to_str()
                .expect("ascii")
                .to_owned();
            let ping = r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
            let as_bob = gw
                .handle(post(
                    ping,
                    &[("authorization", &bearer(&bob)), ("mcp-session-id", &sid)],
                ))
                .await;
            assert_eq!(as_bob.status, StatusCode::NOT_FOUND);
            let as_alice = gw
                .handle(post(
                    ping,
                    &[("authorization", &bearer(&alice)), ("mcp-session-id", &sid)],
                ))
                .await;
            assert_eq!(as_alice.status, StatusCode::OK);
        }

        #[tokio::test]
        async fn backchannel_logout_ends_the_sessions_and_refuses_the_token() {
            let idp = FakeIdp::start().await;
            let (gw, _up) = secured(&idp, "").await;
            let token = idp.token(json!({"sid": "kc-session-9"}));
            let r = gw
                .handle(post(INIT, &[("authorization", &bearer(&token))]))
                .await;
            let sid = r.headers[&MCP_SESSION_ID]
                .to_str()
                .expect("ascii")
                .to_owned();
            assert!(gw.store.lookup(&sid).await.expect("store").is_some());
            let logout = idp.sign(&json!({
                "iss": idp.issuer, "aud": LOGOUT_CLIENT, "iat": ratatosk_auth::validator::unix_now(),
                "sid": "kc-session-9", "events": {ratatosk_auth::logout::BACKCHANNEL_LOGOUT_EVENT: {}},
            }));
            let form = format!("logout_token={logout}");
            let r = gw
                .handle(request(
                    Method::POST,
                    "/auth/backchannel-logout",
                    &[("content-type", "application/x-www-form-urlencoded")],
                    &form,
                ))
                .await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                gw.store.lookup(&sid).await.expect("store").is_none(),
                "the gateway session ended"
            );
            let again = gw
                .handle(post(INIT, &[("authorization", &bearer(&token))]))
                .await;
            assert_eq!(again.status, StatusCode::UNAUTHORIZED);
            let bad = gw
                .handle(request(
                    Method::POST,
                    "/auth/backchannel-logout",
                    &[],
                    "logout_token=forged",
                ))
                .await;
            assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        }
    }
}
