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

use crate::bridge::{AnswerReader, Forwarding, upstream_headers};
use crate::config::{Config, Era};
use crate::edge::{
    self, ChunkSource, LAST_EVENT_ID, Label, MCP_SESSION_ID, Reject, Request, Response,
};
use crate::holds::{self, Holds};
use crate::jsonrpc::{self, Body, Id, Kind, Message, code};
use crate::metrics::Metrics;
use crate::routes::{Endpoint, OrgRoute, RouteError, Routes};
use crate::session::{self, SessionState, SessionStore, StoreError, Transport, short};
use crate::stream::{
    AttachError, EventId, Hub, LiveStream, LogLimits, STANDALONE, SessionLog, StreamId,
    priming_frame,
    shared::{BusHandler, HoldRoute, Notice, SharedEvents},
    sse_frame,
};
use crate::upstream::{AnswerKind, Pool, UpstreamError};

mod hidden;
mod holding;
mod in_flight;
mod listen;
mod modern;
mod params;
mod rejects;
mod replies;
mod stateful;

use holding::HoldClient;
use in_flight::InFlight;
pub use rejects::hold_reject;
use rejects::*;

/// How many requests of one batch go upstream at once.
const BATCH_CONCURRENCY: usize = 8;

/// Code of the error answered to a request the client cancelled.
const REQUEST_CANCELLED: i64 = -32800;

/// Longest resource URI a session may subscribe to.
const MAX_SUBSCRIPTION_URI_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("org '{org}': {source}")]
    Client {
        org: String,
        source: crate::upstream::PoolError,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot build the token validator: {0}")]
    Auth(#[from] ratatosk_auth::validator::BuildError),
}

pub struct Gateway {
    pub config: Arc<Config>,
    pub routes: Routes,
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
    /// Upstream `subscriptions/listen` streams of legacy sessions of modern
    /// upstreams, by session.
    listeners: DashMap<String, modern::Listener>,
    /// One re-initialization at a time per session, when a stateful
    /// upstream lost the session's upstream session.
    rebinding: DashMap<String, Arc<stateful::Rebinding>>,
    /// Hidden sessions of 2026-07-28 clients with a stateful upstream: by
    /// (org, subject, client), the gateway session id.
    hidden: DashMap<String, String>,
    /// Hidden sessions being opened, so concurrent first calls open one.
    opening: hidden::OpeningMap,
    /// Upstream calls waiting for a 2026-07-28 client's input, by the
    /// `requestState` the client was given.
    parked: Arc<hidden::ParkedMap>,
    /// Retries of calls parked on other nodes, waiting for those nodes.
    resumes: hidden::ResumeMap,
    /// Calls this node continues for retries other nodes serve.
    continued: hidden::ContinuedMap,
    /// The `x-mcp-header` parameters of upstream tools, per (org, caller).
    tool_headers: params::ToolHeaders,
    /// Resource URIs a hidden session's upstream refused to subscribe it
    /// to, by session: not asked again by its later listens.
    refused_subscriptions: DashMap<String, std::collections::HashSet<String>>,
    /// Requests an upstream answered with a hold, for workers to finish.
    pub holds: Holds,
    draining: AtomicBool,
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
        Self::with_events(config, store, None)
    }

    /// A gateway node; with `events`, one of several that share their
    /// sessions' event logs (and tell each other about sessions, requests
    /// and logouts) through Redis.
    pub fn with_events(
        config: Config,
        store: Arc<dyn SessionStore>,
        events: Option<Arc<SharedEvents>>,
    ) -> Result<Arc<Gateway>, BuildError> {
        let metrics = Arc::new(Metrics::new()?);
        let mut orgs = Vec::new();
        for (name, org) in &config.orgs {
            let pool = Pool::new(
                name,
                &org.upstream,
                config.limits.max_answer_bytes,
                &metrics,
            )
            .map_err(|source| BuildError::Client {
                org: name.clone(),
                source,
            })?;
            orgs.push(OrgRoute {
                name: name.as_str().into(),
                auth: org.auth,
                scopes: org.scopes.clone(),
                organization: org.organization.clone().unwrap_or_else(|| name.clone()),
                anonymous: Arc::new(Identity::anonymous(name)),
                metrics: metrics.for_org(name),
                era: Arc::new(crate::bridge::UpstreamEra::new(
                    name,
                    org.upstream.era,
                    &metrics,
                )),
                max_input_rounds: org.upstream.max_input_rounds,
                pool: Arc::new(pool),
            });
        }
        let validator = match &config.identity {
            Some(identity) => Some(ratatosk_auth::Validator::new(
                identity.clone(),
                metrics.registry(),
            )?),
            None => None,
        };
        let node = events.as_ref().map_or_else(rand::random, |e| e.node());
        let limits = LogLimits {
            max_events: config.sessions.event_log_size,
            max_bytes: config.sessions.event_log_bytes,
        };
        let gateway = Arc::new(Gateway {
            routes: Routes::new(&config.base_path, orgs),
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
            listeners: DashMap::new(),
            rebinding: DashMap::new(),
            hidden: DashMap::new(),
            opening: DashMap::new(),
            parked: Arc::new(DashMap::new()),
            resumes: DashMap::new(),
            continued: DashMap::new(),
            tool_headers: params::ToolHeaders::new(),
            refused_subscriptions: DashMap::new(),
            holds: Holds::new(config.holds.clone()),
            draining: AtomicBool::new(false),
            config: Arc::new(config),
        });
        if let Some(events) = &events {
            let handler: Arc<dyn BusHandler> = gateway.clone();
            events.start(Arc::downgrade(&handler));
        }
        Ok(gateway)
    }

    /// Routes that serve every caller as anonymous. The binary warns about
    /// each at start.
    pub fn unauthenticated_orgs(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .routes
            .orgs()
            .filter(|o| o.auth == AuthMode::None)
            .map(|o| o.name.to_string())
            .collect();
        names.sort();
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
            self.check_and_route(&req).await
        };
        if let Ok(v) = HeaderValue::from_str(&req.request_id) {
            response.headers.insert(edge::REQUEST_ID, v);
        }
        response
    }

    async fn check_and_route(self: &Arc<Self>, req: &Request) -> Response {
        match edge::check_origin(
            &req.headers,
            &self.config.allowed_origins,
            self.own_origin.as_deref(),
        ) {
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
            org: self.routes.resolve(path).ok().map(|(o, _)| o.name.clone()),
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
        let (org, endpoint) = match self.routes.resolve(&req.path) {
            Ok(found) => found,
            Err(RouteError::NoEndpoint) => {
                return Reject::new(
                    StatusCode::NOT_FOUND,
                    code::NOT_FOUND,
                    format!(
                        "no MCP endpoint at '{}'; expected {}/{{org}}/mcp, /sse or /messages",
                        jsonrpc::clip(&req.path, 64),
                        self.routes.base_path()
                    ),
                )
                .into_response()
                .labeled(Label {
                    org: None,
                    method: http_label(&req.method),
                });
            }
            Err(RouteError::UnknownOrg(name)) => {
                return Reject::new(
                    StatusCode::NOT_FOUND,
                    code::NOT_FOUND,
                    format!("unknown org '{}'", jsonrpc::clip(&name, 64)),
                )
                .into_response()
                .labeled(Label {
                    org: None,
                    method: http_label(&req.method),
                });
            }
        };
        let mut label = Label {
            org: Some(org.name.clone()),
            method: http_label(&req.method),
        };
        if req.method == Method::OPTIONS
            && has_origin
            && let Some(origin) = req.headers.get(http::header::ORIGIN)
        {
            return edge::preflight(origin.clone()).labeled(label);
        }
        let identity = match self.authenticate(&org, endpoint, req).await {
            Ok(identity) => identity,
            Err(reject) => return reject.into_response().labeled(label),
        };
        let result = match (endpoint, &req.method) {
            (Endpoint::Mcp, &Method::POST) => self.mcp_post(&org, &identity, req, &mut label).await,
            (Endpoint::Mcp, &Method::GET) => self.mcp_get(&org, &identity, req).await,
            (Endpoint::Mcp, &Method::DELETE) => self.mcp_delete(&org, &identity, req).await,
            (Endpoint::Mcp, m) => Err(Reject::method_not_allowed(m, "GET, POST, DELETE, OPTIONS")),
            (Endpoint::Sse, &Method::GET) => self.legacy_open(&org, &identity, req).await,
            (Endpoint::Sse, m) => Err(Reject::method_not_allowed(m, "GET, OPTIONS")),
            (Endpoint::Messages, &Method::POST) => {
                self.legacy_post(&org, &identity, req, &mut label).await
            }
            (Endpoint::Messages, m) => Err(Reject::method_not_allowed(m, "POST, OPTIONS")),
        };
        result.unwrap_or_else(Reject::into_response).labeled(label)
    }

    // ----- Streamable HTTP -------------------------------------------------

    /// Batches are allowed only where the protocol version allows them (a
    /// session's `negotiated` one, or else the one the request names), and
    /// only up to `limits.max_batch` messages.
    fn check_batch(&self, body: &Body, version: &str, negotiated: bool) -> Result<(), Reject> {
        let Body::Batch(items) = body else {
            return Ok(());
        };
        if !edge::allows_batches(version) {
            let whose = if negotiated {
                " (the version this session negotiated)"
            } else {
                ""
            };
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                format!(
                    "JSON-RPC batches are not allowed in protocol version {version}{whose}; send one message per POST"
                ),
            ));
        }
        let max = self.config.limits.max_batch;
        if items.len() > max {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                format!(
                    "a batch may hold at most {max} messages (limits.max_batch), this one has {}",
                    items.len()
                ),
            ));
        }
        Ok(())
    }

    async fn mcp_post(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        edge::check_post_framing(&req.headers)?;
        let body = parse_post_body(&req.body)?;
        label.method = body_label(&body);
        if !req.headers.contains_key(&MCP_SESSION_ID)
            && let Body::Single(m) = &body
        {
            // Parsed once: the modern checks use the same params.
            let params = m.params();
            if crate::era::speaks_modern(&req.headers, m.method(), params.as_ref()) {
                return self.modern_post(org, identity, req, m, params).await;
            }
        }
        let header_version = edge::protocol_version(&req.headers)?;
        // A session's batches are decided by its negotiated version alone
        // (below), whatever supported version the request names.
        if let Some(version) = header_version
            && !req.headers.contains_key(&MCP_SESSION_ID)
        {
            self.check_batch(&body, version, false)?;
        }
        if let Some(init) = body
            .messages()
            .iter()
            .find(|m| m.method() == Some("initialize"))
        {
            if matches!(body, Body::Batch(_)) || !init.is_request() {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    "initialize must be a request of its own, not part of a batch or a notification",
                ));
            }
            return self.initialize(org, identity, init, req).await;
        }
        let session = self.streamable_session(org, identity, req).await?;
        let log = self.session_log(&session, false).await?;
        // The negotiated version governs the session, whatever other
        // supported version a request names.
        self.check_batch(&body, &session.protocol_version, true)?;

        let mut requests = Vec::new();
        for m in body.messages() {
            if m.is_request() {
                requests.push(m.clone());
            } else {
                self.absorb(org, &session, &log, None, m, || {
                    session_headers(org, identity, &session, &req.headers, &req.request_id)
                })
                .await?;
            }
        }
        if requests.is_empty() {
            return Ok(Response::empty(StatusCode::ACCEPTED));
        }
        if let [only] = requests.as_slice()
            && let Some(answer) = self.answer_locally(org, &session, &log, only).await
        {
            return answer.map(|body| Response::json(StatusCode::OK, body));
        }
        self.forward_streamable(org, identity, session, log, requests, req)
            .await
    }

    async fn forward_streamable(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        session: Arc<SessionState>,
        log: Arc<SessionLog>,
        requests: Vec<Message>,
        req: &Request,
    ) -> Result<Response, Reject> {
        let headers = session_headers(org, identity, &session, &req.headers, &req.request_id);
        let era = self
            .upstream_era(org, requests.first().and_then(Message::request_id))
            .await?;
        if let [single] = requests.as_slice()
            && era != Era::Modern
        {
            let id = single.request_id().cloned();
            let guard = self.track(org, &log, &session.id, id.as_ref())?;
            let answer = tokio::select! {
                biased;
                _ = guard.token.cancelled() => return Err(cancelled(id.as_ref())),
                a = self.send_in_session(org, &session, headers, single.raw.clone()) => a,
            };
            let answer = answer.map_err(|e| upstream_reject(e, id.as_ref()))?;
            match answer.kind {
                AnswerKind::Json => {
                    // Pass the upstream's JSON through as it is.
                    let mut reader = AnswerReader::new(answer, org.pool.read_limits);
                    let body = tokio::select! {
                        biased;
                        _ = guard.token.cancelled() => return Err(cancelled(id.as_ref())),
                        b = reader.json_body() => b.map_err(|e| read_reject(e, id.as_ref()))?,
                    };
                    if guard.token.is_cancelled() {
                        return Err(cancelled(id.as_ref()));
                    }
                    if let (Some(request), Some(asked)) =
                        (id.clone(), holds::hold_of(&body, self.holds.config()))
                    {
                        // A hold: the answer comes later, so on a stream.
                        let stream = log.begin_stream().map_err(|_| session_not_found())?;
                        let this = self.clone();
                        let (org2, log2, session2) = (org.clone(), log.clone(), session.clone());
                        tokio::spawn(async move {
                            this.keep_hold(
                                asked,
                                &HoldClient::of(&session2),
                                &log2,
                                stream,
                                request,
                                &org2,
                                &guard.token,
                            )
                            .await;
                            log2.end_stream(stream);
                            drop(guard);
                        });
                        return Ok(self.post_stream_response(org, &session, log, stream));
                    }
                    if edge::prefers_sse(&req.headers) {
                        // The client asked for a stream (with its priming
                        // event): the answer goes on one.
                        let stream = log.begin_stream().map_err(|_| session_not_found())?;
                        let _ = self.append(&log, stream, &body, org);
                        log.end_stream(stream);
                        return Ok(self.post_stream_response(org, &session, log, stream));
                    }
                    return Ok(Response::json(StatusCode::OK, body));
                }
                AnswerKind::Empty => {
                    return Err(upstream_reject(
                        UpstreamError::Failed {
                            replica: answer.lease.replica().to_owned(),
                            reason: format!(
                                "answered HTTP {} without a body to a request",
                                answer.status
                            ),
                        },
                        id.as_ref(),
                    ));
                }
                AnswerKind::Sse => {
                    let stream = log.begin_stream().map_err(|_| session_not_found())?;
                    let reader = AnswerReader::new(answer, org.pool.read_limits);
                    let this = self.clone();
                    let (org2, pending) = (org.clone(), id);
                    let (log2, session2) = (log.clone(), session.clone());
                    tokio::spawn(async move {
                        let resume = Some(session2.as_ref());
                        this.relay(reader, &log2, stream, pending, &org2, &guard.token, resume)
                            .await;
                        log2.end_stream(stream);
                        drop(guard);
                    });
                    return Ok(self.post_stream_response(org, &session, log, stream));
                }
            }
        }

        if let [single] = requests.as_slice() {
            return self
                .forward_modern(org, session, log, single.clone(), headers, &req.headers)
                .await;
        }
        // A batch (2025-03-26): each request goes upstream on its own, and
        // every answer streams back on one SSE response.
        let stream = log.begin_stream().map_err(|_| session_not_found())?;
        let this = self.clone();
        let org2 = org.clone();
        let log2 = log.clone();
        let session2 = session.clone();
        tokio::spawn(async move {
            futures::stream::iter(requests.iter())
                .for_each_concurrent(BATCH_CONCURRENCY, |m| {
                    this.forward_into(&org2, &session2, &log2, stream, m, headers.clone(), None)
                })
                .await;
            log2.end_stream(stream);
        });
        Ok(self.post_stream_response(org, &session, log, stream))
    }

    fn post_stream_response(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        log: Arc<SessionLog>,
        stream: StreamId,
    ) -> Response {
        match log.attach(stream, None) {
            Ok(attach) => {
                let live = self.live_stream(org, session, log, attach, None);
                Response::sse(Box::new(live))
            }
            Err(_) => session_not_found().into_response(),
        }
    }

    fn live_stream(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        log: Arc<SessionLog>,
        attach: crate::stream::Attach,
        prelude: Option<Bytes>,
    ) -> LiveStream {
        let mut live = LiveStream::new(
            log,
            attach,
            prelude,
            self.config.streams.keepalive,
            Some(org.metrics.stream.clone()),
        );
        if edge::wants_priming(&session.protocol_version) {
            live.set_prelude(priming_frame(live.position(), self.config.streams.retry));
        }
        live
    }

    /// Forwards one request and appends everything it answers to `stream`,
    /// in `slot` if one was taken for it already.
    #[allow(clippy::too_many_arguments)]
    async fn forward_into(
        self: &Arc<Self>,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        stream: StreamId,
        request: &Message,
        headers: http::HeaderMap,
        slot: Option<crate::stream::Slot>,
    ) {
        let id = request.request_id().cloned();
        let tracked = match slot {
            Some(slot) => self.track_in(slot, &session.id, id.as_ref()),
            None => self.track(org, log, &session.id, id.as_ref()),
        };
        let guard = match tracked {
            Ok(guard) => guard,
            Err(reject) => {
                let body = reject.with_id(id.as_ref()).body();
                let _ = self.append(log, stream, &body, org);
                return;
            }
        };
        match self.upstream_era(org, id.as_ref()).await {
            Ok(Era::Modern) => {
                let Some(id) = id.as_ref() else { return };
                match modern::ModernRound::of(org, session, request, id) {
                    Ok(round) => {
                        self.exchange_modern(
                            org,
                            session,
                            log,
                            stream,
                            round,
                            headers,
                            &guard.token,
                            None,
                        )
                        .await;
                    }
                    Err(body) => {
                        let _ = self.append(log, stream, &body, org);
                    }
                }
                return;
            }
            Ok(_) => {}
            Err(reject) => {
                let _ = self.append(log, stream, &reject.body(), org);
                return;
            }
        }
        let answer = tokio::select! {
            biased;
            _ = guard.token.cancelled() => return,
            a = self.send_in_session(org, session, headers, request.raw.clone()) => a,
        };
        match answer {
            Ok(answer) => {
                let reader = AnswerReader::new(answer, org.pool.read_limits);
                self.relay(reader, log, stream, id, org, &guard.token, Some(session))
                    .await;
            }
            Err(e) => {
                let body = upstream_reject(e, id.as_ref()).body();
                // A closed log means the session ended: nobody is left to tell.
                let _ = self.append(log, stream, &body, org);
            }
        }
    }

    /// Copies an upstream answer into a stream of the session log until
    /// the pending request has its response, the answer ends, or the
    /// request is cancelled. Missing responses become JSON-RPC errors, so
    /// the client is never left waiting. Without `resume` (a modern
    /// exchange), the response itself is returned instead of appended, for
    /// the caller to look at first. With `resume`, the session whose
    /// stateful upstream may close the stream mid-answer for the gateway to
    /// poll: the answer is resumed from the upstream session with
    /// `Last-Event-ID`.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        mut reader: AnswerReader,
        log: &SessionLog,
        stream: StreamId,
        mut pending: Option<Id>,
        org: &OrgRoute,
        cancel: &CancellationToken,
        resume: Option<&SessionState>,
    ) -> Option<Bytes> {
        let hold = resume.is_none();
        let mut resumed = stateful::Resumptions::default();
        let dropped = |reader: &AnswerReader| {
            tracing::debug!(
                replica = reader.replica(),
                "request cancelled; upstream answer dropped"
            );
        };
        let failure = loop {
            // Biased, and checked again once a message is in hand: the
            // gateway told the upstream of the cancellation, so whatever the
            // upstream says about the request now (an SDK answers
            // "cancelled") must not reach the client. The cancel may come on
            // another thread at any moment; a message read before it was
            // sent cannot be the upstream's reaction to it.
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    dropped(&reader);
                    return None;
                }
                n = reader.next_message() => n,
            };
            if cancel.is_cancelled() {
                dropped(&reader);
                return None;
            }
            match next {
                Ok(Some(message)) => {
                    match jsonrpc::parse_message(&message).map(|m| m.kind) {
                        Ok(Kind::Response { id }) if pending.as_ref() == Some(&id) => {
                            if hold {
                                return Some(message);
                            }
                            if let Some(session) = resume
                                && let Some(asked) = holds::hold_of(&message, self.holds.config())
                            {
                                let client = HoldClient::of(session);
                                self.keep_hold(asked, &client, log, stream, id, org, cancel)
                                    .await;
                                return None;
                            }
                            pending = None;
                        }
                        Ok(Kind::Request { method, .. })
                            if org.era.known() == Some(Era::Stateless2025) =>
                        {
                            // The client's answer would reach a fresh
                            // transport of the upstream, never this call:
                            // fail it now rather than let both sides wait.
                            break modern::unanswerable(&org.name, &method);
                        }
                        _ => {}
                    }
                    if self.append(log, stream, &message, org).is_err() {
                        return None;
                    }
                    // Done once the response is through.
                    pending.as_ref()?;
                }
                Ok(None) => {
                    let session = resume.filter(|_| pending.is_some());
                    match self
                        .resume_relay(&mut reader, org, session, log, stream, cancel, &mut resumed)
                        .await
                    {
                        stateful::Reconnected::Yes => continue,
                        stateful::Reconnected::Cancelled => {
                            dropped(&reader);
                            return None;
                        }
                        stateful::Reconnected::Failed(why) => break why,
                        stateful::Reconnected::No => {
                            break format!(
                                "upstream {} ended its answer without a response",
                                reader.replica()
                            );
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(org = %org.name, error = %e, "upstream answer failed");
                    break e.to_string();
                }
            }
        };
        if let Some(id) = pending {
            let body = jsonrpc::error_body(Some(&id), code::UPSTREAM_ERROR, &failure);
            // A closed log means the session ended: nobody is left to tell.
            let _ = self.append(log, stream, &body, org);
        }
        None
    }

    /// Appends an upstream's message to a stream, counting it.
    fn append(
        &self,
        log: &SessionLog,
        stream: StreamId,
        payload: &[u8],
        org: &OrgRoute,
    ) -> Result<(), crate::stream::Closed> {
        log.append(stream, payload)?;
        org.metrics.published_upstream.inc();
        Ok(())
    }

    async fn initialize(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        init: &Message,
        req: &Request,
    ) -> Result<Response, Reject> {
        let session_id = session::mint_id();
        let id = init.request_id().cloned();
        let params = init.params().unwrap_or(Value::Null);
        self.check_client_data(org, &params)
            .map_err(|r| r.with_id(id.as_ref()))?;
        self.check_admission(org, identity)
            .await
            .map_err(|r| r.with_id(id.as_ref()))?;
        let (response, upstream) = self
            .negotiate(
                org,
                &session_id,
                identity,
                init,
                &req.headers,
                &req.request_id,
            )
            .await?;
        let Some(version) = negotiated_version(&response) else {
            // A JSON-RPC error from the upstream: no session is created.
            return Ok(Response::json(StatusCode::OK, response));
        };
        if !edge::SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                code::UPSTREAM_ERROR,
                format!("upstream negotiated protocol version '{version}', which the gateway does not support"),
            )
            .with_id(id.as_ref()));
        }
        let mut state = SessionState::new(
            session_id.clone(),
            &org.name,
            identity,
            Transport::StreamableHttp,
            version,
        );
        state.set_client(&params);
        state.upstream = upstream;
        if let Err(reject) = self.create_session(state.clone()).await {
            // Refused after all (a limit reached meanwhile): the upstream
            // session just opened has nobody left to end it.
            self.close_upstream(&state);
            return Err(reject.with_id(id.as_ref()));
        }
        let header = HeaderValue::from_str(&session_id).map_err(|_| {
            Reject::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::INTERNAL_ERROR,
                "minted an invalid session id",
            )
        })?;
        Ok(Response::json(StatusCode::OK, response).with_header(MCP_SESSION_ID, header))
    }

    /// Sends `initialize` upstream and returns the upstream's response to
    /// it, with the upstream's own session if it is stateful.
    async fn negotiate(
        &self,
        org: &OrgRoute,
        session_id: &str,
        identity: &Identity,
        init: &Message,
        client_headers: &http::HeaderMap,
        request_id: &str,
    ) -> Result<(Bytes, Option<session::UpstreamSession>), Reject> {
        let id = init.request_id().ok_or_else(|| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "initialize must be a request (with an id)",
            )
        })?;
        if self.upstream_era(org, Some(id)).await? == Era::Modern {
            return Ok((self.initialize_from_modern(org, init).await?, None));
        }
        let headers = upstream_headers(
            &Forwarding {
                session_id,
                org: &org.name,
                identity,
                protocol_version: None,
                request_id,
            },
            client_headers,
        );
        let params = init.params().unwrap_or(Value::Null);
        self.handshake(org, headers, id, init.raw.clone(), params)
            .await
    }

    /// Moves the org's sessions gauge (its handle was resolved at start).
    /// With several nodes, sets the sessions gauge to Redis's count of
    /// every node's sessions (at each reap, and before `/metrics` answers).
    pub async fn count_sessions(&self) {
        let Some(events) = self.hub.events() else {
            return;
        };
        let (dropped, counted) = (events.dropped(), self.metrics.shared_dropped.get());
        if dropped > counted {
            self.metrics.shared_dropped.inc_by(dropped - counted);
        }
        for org in self.routes.orgs() {
            match self.store.count_org(&org.name).await {
                Ok(n) => org
                    .metrics
                    .sessions
                    .set(i64::try_from(n).unwrap_or(i64::MAX)),
                Err(e) => {
                    tracing::warn!(org = %org.name, error = %e, "cannot count the org's sessions");
                }
            }
        }
    }

    /// Counts a session in or out of the sessions gauge (one node; see
    /// [`Gateway::count_sessions`] for several).
    fn count_session(&self, org: &str, by: i64) {
        if self.hub.events().is_some() {
            return;
        }
        if let Some(route) = self.routes.org(org) {
            route.metrics.sessions.add(by);
        }
    }

    /// What an `initialize` says about the client must fit
    /// `sessions.max_client_bytes`; the refusal names the fields.
    fn check_client_data(&self, org: &OrgRoute, params: &Value) -> Result<(), Reject> {
        session::check_client_data(
            [
                ("params.clientInfo", params.get("clientInfo")),
                ("params.capabilities", params.get("capabilities")),
            ],
            self.config.sessions.max_client_bytes,
        )
        .map_err(|why| {
            org.metrics.refused.client_data.inc();
            Reject::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, why)
        })
    }

    /// The session limits of the config, for the store.
    fn admission(&self) -> session::Admission {
        session::Admission {
            per_subject: self.config.sessions.max_per_subject,
            total: self.config.sessions.max_total,
        }
    }

    /// Refuses early a session the store would not admit, before work a
    /// refusal would waste (opening an upstream session).
    async fn check_admission(&self, org: &OrgRoute, identity: &Identity) -> Result<(), Reject> {
        self.store
            .admits(&org.name, &identity.subject, self.admission())
            .await
            .map_err(|e| self.session_reject(org, e))
    }

    /// A store failure as the client sees it; the limits are counted.
    fn session_reject(&self, org: &OrgRoute, e: StoreError) -> Reject {
        match &e {
            StoreError::SubjectFull { .. } => org.metrics.refused.sessions_per_subject.inc(),
            StoreError::Full { .. } => org.metrics.refused.sessions_total.inc(),
            _ => {}
        }
        store_reject(e)
    }

    async fn create_session(&self, state: SessionState) -> Result<Arc<SessionState>, Reject> {
        let org = state.org.clone();
        let id = state.id.clone();
        let state = match self.store.insert(state, self.admission()).await {
            Ok(state) => state,
            Err(e) => {
                return Err(match self.routes.org(&org) {
                    Some(route) => self.session_reject(route, e),
                    None => store_reject(e),
                });
            }
        };
        self.hub.create(&id);
        self.count_session(&org, 1);
        tracing::info!(org, session = %short(&id), transport = ?state.transport, "session created");
        Ok(state)
    }

    /// Ends a session everywhere: store, log, streams and in-flight requests.
    pub async fn end_session(&self, id: &str, why: &str) -> Result<bool, StoreError> {
        let removed = self.store.remove(id).await?;
        self.stop_requests(id);
        match removed {
            Some(state) => {
                self.forget_session(&state, why);
                Ok(true)
            }
            None => {
                self.drop_local(id);
                Ok(false)
            }
        }
    }

    /// Stops request `id` of `session` if it runs on this node; false if
    /// it does not.
    fn cancel_in_flight(&self, session: String, id: Id) -> bool {
        self.in_flight.cancel(session, id)
    }

    /// Stops the session's requests running on this node.
    fn stop_requests(&self, id: &str) {
        self.in_flight.stop_session(id);
    }

    /// What is left to do when a session ends: its local state (and other
    /// nodes' too), its upstream session, the gauge.
    fn forget_session(&self, state: &SessionState, why: &str) {
        if let Some(events) = self.hub.events() {
            events.notify(&Notice::Ended {
                session: state.id.clone(),
                hidden: state.transport == Transport::Hidden,
            });
        }
        self.drop_local(&state.id);
        self.close_upstream(state);
        self.forget_hidden(state);
        self.count_session(&state.org, -1);
        tracing::info!(org = %state.org, session = %short(&state.id), "session ended: {why}");
    }

    /// A session's log and streams, its upstream listen (or GET) stream,
    /// its re-initialization lock, and the subscriptions its upstream
    /// refused.
    fn drop_local(&self, id: &str) {
        self.hub.remove(id);
        self.stop_listener(id);
        self.rebinding.remove(id);
        self.refused_subscriptions.remove(id);
        self.holds.end_session(id);
    }

    /// Finds the caller's session; any mismatch looks like an unknown id.
    async fn session_for(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        id: Option<&str>,
        transport: Transport,
    ) -> Result<Arc<SessionState>, Reject> {
        let Some(id) = id else {
            return Err(Reject::bad_request(match transport {
                Transport::StreamableHttp => {
                    "missing Mcp-Session-Id header: send initialize first, then echo the Mcp-Session-Id it returned"
                }
                Transport::LegacySse => {
                    "missing session_id query parameter: use the URL from the endpoint event of the /sse stream"
                }
                Transport::Hidden => "missing session id",
            }));
        };
        if !session::is_plausible_id(id) {
            return Err(session_not_found());
        }
        match self.store.lookup(id).await.map_err(store_reject)? {
            Some(s)
                if *s.org == *org.name
                    && s.subject == identity.subject
                    && s.transport == transport =>
            {
                Ok(s)
            }
            _ => Err(session_not_found()),
        }
    }

    /// The session a Streamable HTTP request names. Its
    /// `MCP-Protocol-Version` may be any supported version (checked at the
    /// edge): the 2025 transports only say the client SHOULD send the
    /// negotiated one, and a server MUST refuse only an invalid or
    /// unsupported one. The negotiated version stays the session's.
    async fn streamable_session(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        req: &Request,
    ) -> Result<Arc<SessionState>, Reject> {
        let id = req.header(&MCP_SESSION_ID);
        self.session_for(org, identity, id, Transport::StreamableHttp)
            .await
    }

    /// The caller's session and its event log.
    async fn session_with_log(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        id: Option<&str>,
        transport: Transport,
    ) -> Result<(Arc<SessionState>, Arc<SessionLog>), Reject> {
        let session = self.session_for(org, identity, id, transport).await?;
        let log = self.session_log(&session, false).await?;
        Ok((session, log))
    }

    /// A session's event log on this node; `current` for a stream about to
    /// resume (see [`Hub::open`]).
    async fn session_log(
        &self,
        session: &SessionState,
        current: bool,
    ) -> Result<Arc<SessionLog>, Reject> {
        self.hub
            .open(&session.id, current)
            .await
            .map_err(store_reject)?
            .ok_or_else(session_not_found)
    }

    /// Handles a client notification or response. A stateful upstream
    /// gets each (its session expects them: `notifications/initialized`,
    /// cancellations, answers to its requests); other upstreams have no
    /// session to give them to. A cancellation first stops the request
    /// here, so that nothing the upstream still says about it (an SDK may
    /// answer "cancelled") reaches the client.
    ///
    /// What goes upstream takes one of the session's in-flight slots while
    /// it is sent (`slot`, if taken already); none free is a 429.
    async fn absorb(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        slot: Option<crate::stream::Slot>,
        message: &Message,
        headers: impl FnOnce() -> http::HeaderMap,
    ) -> Result<(), Reject> {
        if message.method().is_none() && self.replies.take(&session.id, message) {
            return Ok(());
        }
        if let Kind::Response { id } = &message.kind
            && let Some(node) = replies::gateway_request_node(id)
        {
            // The gateway's own request: sent by another node, which takes
            // the answer; none waits for it here, whatever its id says.
            if node != self.node
                && let Some(events) = self.hub.events()
            {
                events.notify(&Notice::Reply {
                    session: session.id.clone(),
                    body: String::from_utf8_lossy(&message.raw).into_owned(),
                });
            }
            return Ok(());
        }
        if message.method() == Some("notifications/cancelled") {
            let target = message
                .params()
                .and_then(|p| p.get("requestId").cloned())
                .and_then(|v| Id::from_value(&v));
            if let Some(target) = target {
                if self.cancel_in_flight(session.id.clone(), target.clone()) {
                    tracing::debug!(session = %short(&session.id), "request cancelled by the client");
                } else if let Some(events) = self.hub.events() {
                    // It may run on another node: tell them only if so, or
                    // every cancel of any id would go to every node.
                    let elsewhere = events
                        .running_elsewhere(&session.id, target.as_json())
                        .await
                        .unwrap_or(true);
                    if elsewhere {
                        events.notify(&Notice::Cancel {
                            session: session.id.clone(),
                            id: target.to_value(),
                        });
                    }
                }
            }
        }
        if session.upstream.is_some() {
            let _slot = match slot {
                Some(slot) => slot,
                None => self.reserve(org, log, None)?,
            };
            self.pass_upstream(org, session, headers(), message).await;
        }
        tracing::debug!(session = %short(&session.id), method = message.method().unwrap_or("(response)"),
            "client notification or response handled");
        Ok(())
    }

    /// Requests the gateway answers itself, without a round trip upstream:
    /// `ping`; `logging/setLevel`, kept in the session (and passed on to a
    /// stateful upstream); and, when the
    /// upstream is modern and has neither, `resources/subscribe` and
    /// `resources/unsubscribe`: the URI joins or leaves the session's listen
    /// filter, and the listen stream is reopened with it.
    /// A refusal (a limit) is the `Err`; a JSON-RPC error of the method
    /// itself is an `Ok` body.
    async fn answer_locally(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        session: &SessionState,
        log: &Arc<SessionLog>,
        request: &Message,
    ) -> Option<Result<Bytes, Reject>> {
        let id = request.request_id()?;
        let method = request.method()?;
        let subscription = matches!(method, "resources/subscribe" | "resources/unsubscribe")
            && org.era.known() == Some(Era::Modern);
        if method == "ping" {
            return Some(Ok(jsonrpc::result_body(Some(id), json!({}))));
        }
        if method != "logging/setLevel" && !subscription {
            return None;
        }
        let field = if subscription { "uri" } else { "level" };
        let value = request
            .params()
            .and_then(|p| p.get(field).and_then(Value::as_str).map(str::to_owned));
        let Some(value) = value else {
            return Some(Ok(jsonrpc::error_body(
                Some(id),
                code::INVALID_PARAMS,
                &format!("{method} needs params.{field}"),
            )));
        };
        let subscribe = method == "resources/subscribe";
        let max = self.config.sessions.max_subscriptions;
        if subscribe && value.len() > MAX_SUBSCRIPTION_URI_BYTES {
            org.metrics.refused.subscriptions.inc();
            return Some(Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                format!(
                    "params.uri is {} bytes; a subscription's URI may have at most {MAX_SUBSCRIPTION_URI_BYTES}",
                    value.len()
                ),
            )
            .with_id(Some(id))));
        }
        // Decided on the state the change is made to, which a shared store
        // may hand over more than once.
        let full = AtomicBool::new(false);
        let change = |s: &mut SessionState| {
            full.store(false, Ordering::Relaxed);
            if subscription {
                let known = s.resource_subscriptions.contains(&value);
                if subscribe && !known && s.resource_subscriptions.len() >= max {
                    full.store(true, Ordering::Relaxed);
                    return;
                }
                s.resource_subscriptions.retain(|u| *u != value);
                if subscribe {
                    s.resource_subscriptions.push(value.clone());
                }
            } else {
                s.log_level = Some(value.clone());
            }
        };
        if let Err(e) = self.store.update(&session.id, &change).await {
            return Some(Ok(jsonrpc::error_body(
                Some(id),
                code::INTERNAL_ERROR,
                &e.to_string(),
            )));
        }
        if full.load(Ordering::Relaxed) {
            org.metrics.refused.subscriptions.inc();
            return Some(Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                format!(
                    "this session already holds {max} resource subscriptions (sessions.max_subscriptions); unsubscribe from one first"
                ),
            )
            .with_id(Some(id))));
        }
        if subscription {
            self.ensure_listener(org, &session.id, log, true);
        }
        if session.upstream.is_some() {
            // A stateful upstream filters its own log messages: it gets the
            // level too (and again after a re-initialization).
            return None;
        }
        Some(Ok(jsonrpc::result_body(Some(id), json!({}))))
    }

    /// One of the session's in-flight slots (`sessions.max_in_flight`),
    /// for a message about to go upstream; a 429 if none is free.
    fn reserve(
        &self,
        org: &OrgRoute,
        log: &Arc<SessionLog>,
        id: Option<&Id>,
    ) -> Result<crate::stream::Slot, Reject> {
        let max = self.config.sessions.max_in_flight;
        log.try_reserve(max).ok_or_else(|| {
            org.metrics.refused.in_flight.inc();
            Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                code::BAD_REQUEST,
                format!("this session already has {max} requests in flight (sessions.max_in_flight); wait for their answers"),
            )
            .with_id(id)
        })
    }

    /// Registers a request about to go upstream: it takes one of the
    /// session's in-flight slots, and its id becomes cancellable.
    fn track(
        &self,
        org: &OrgRoute,
        log: &Arc<SessionLog>,
        session: &str,
        id: Option<&Id>,
    ) -> Result<InFlight, Reject> {
        let slot = self.reserve(org, log, id)?;
        self.track_in(slot, session, id)
    }

    /// Registers a request in a slot already taken for it: its id becomes
    /// cancellable.
    fn track_in(
        &self,
        slot: crate::stream::Slot,
        session: &str,
        id: Option<&Id>,
    ) -> Result<InFlight, Reject> {
        // Other nodes may receive the client's cancellation of it.
        let shared = self.hub.events().filter(|_| id.is_some()).cloned();
        self.in_flight.register(session, id, shared, slot)
    }

    async fn mcp_get(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
    ) -> Result<Response, Reject> {
        edge::check_get_framing(&req.headers)?;
        // Validated only: an unsupported version is a 400.
        edge::protocol_version(&req.headers)?;
        let session = self.streamable_session(org, identity, req).await?;
        let resume = match req.header(&LAST_EVENT_ID) {
            None => None,
            Some(text) => Some(EventId::parse(text).ok_or_else(|| {
                Reject::bad_request(format!(
                    "Last-Event-ID '{}' is not an event id of this gateway (expected '<stream>.<seq>')",
                    jsonrpc::clip(text, 64)
                ))
            })?),
        };
        // Another node may have served the stream up to its last event.
        let log = self.session_log(&session, true).await?;
        let attach = log
            .attach(
                resume.map_or(STANDALONE, |e| e.stream),
                resume.map(|e| e.seq),
            )
            .map_err(|e| match e {
                AttachError::Closed => session_not_found(),
                AttachError::UnknownEvent => Reject::bad_request(format!(
                    "Last-Event-ID '{}' names an event this session never had",
                    jsonrpc::clip(req.header(&LAST_EVENT_ID).unwrap_or_default(), 64)
                )),
            })?;
        if attach.gap {
            tracing::warn!(org = %org.name, session = %short(&session.id),
                "resumed stream may have missed events: they left the event log (raise sessions.event_log_size)");
        }
        self.ensure_listener(org, &session.id, &log, false);
        let mut live = self.live_stream(org, &session, log, attach, None);
        self.end_with_token(&mut live, identity);
        Ok(Response::sse(Box::new(live)))
    }

    /// A stream authenticated once must not outlive its token: it ends
    /// when the token would be refused (`exp` plus the allowed clock skew),
    /// and the client reconnects with a fresh one.
    fn end_with_token(&self, live: &mut LiveStream, identity: &Identity) {
        let Some(expires) = identity.expires_at else {
            return;
        };
        let skew = self
            .config
            .identity
            .as_ref()
            .map_or(std::time::Duration::ZERO, |i| i.clock_skew);
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        live.end_at(std::time::Instant::now() + left + skew);
    }

    async fn mcp_delete(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
    ) -> Result<Response, Reject> {
        // Validated only: an unsupported version is a 400.
        edge::protocol_version(&req.headers)?;
        let session = self.streamable_session(org, identity, req).await?;
        self.end_session(&session.id, "deleted by the client")
            .await
            .map_err(store_reject)?;
        Ok(Response::empty(StatusCode::NO_CONTENT))
    }

    // ----- legacy HTTP+SSE (2024-11-05) ------------------------------------

    async fn legacy_open(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
    ) -> Result<Response, Reject> {
        if req.headers.contains_key(http::header::ACCEPT) {
            edge::check_get_framing(&req.headers)?;
        }
        let state = SessionState::new(
            session::mint_id(),
            &org.name,
            identity,
            Transport::LegacySse,
            String::new(),
        );
        let session = self.create_session(state).await?;
        let log = self.hub.get(&session.id).ok_or_else(session_not_found)?;
        let attach = log
            .attach(STANDALONE, None)
            .map_err(|_| session_not_found())?;
        let endpoint = format!(
            "{}?session_id={}",
            self.routes.path_of(&org.name, Endpoint::Messages),
            session.id
        );
        let prelude = sse_frame(None, Some("endpoint"), endpoint.as_bytes());
        let mut live = self.live_stream(org, &session, log, attach, Some(prelude));
        self.end_with_token(&mut live, identity);
        Ok(Response::sse(Box::new(LegacyStream {
            live,
            gateway: self.clone(),
            session: session.id.clone(),
        })))
    }

    async fn legacy_post(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Arc<Identity>,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        let session_id = req.query_param("session_id");
        let (session, log) = self
            .session_with_log(org, identity, session_id.as_deref(), Transport::LegacySse)
            .await?;
        edge::check_json_content_type(&req.headers)?;
        let body = parse_post_body(&req.body)?;
        label.method = body_label(&body);
        self.check_batch(&body, "2024-11-05", true)?;
        for m in body.messages() {
            if m.method() == Some("initialize") {
                let params = m.params().unwrap_or(Value::Null);
                self.check_client_data(org, &params)
                    .map_err(|r| r.with_id(m.request_id()))?;
            }
        }
        // Any message may go upstream, and the answer is 202 before it
        // does: each takes an in-flight slot now, so that a POST over the
        // limit is refused whole rather than accepted and dropped.
        let slots = body
            .messages()
            .iter()
            .map(|m| self.reserve(org, &log, m.request_id()))
            .collect::<Result<Vec<_>, _>>()?;
        let this = self.clone();
        let org = org.clone();
        let headers = req.headers.clone();
        let request_id = req.request_id.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            futures::stream::iter(body.messages().iter().zip(slots))
                .for_each_concurrent(BATCH_CONCURRENCY, |(m, slot)| {
                    this.legacy_message(
                        &org,
                        &identity,
                        &session,
                        &log,
                        m,
                        slot,
                        &headers,
                        &request_id,
                    )
                })
                .await;
        });
        Ok(Response::json(
            StatusCode::ACCEPTED,
            Bytes::from_static(b"{}"),
        ))
    }

    /// One message of a legacy POST, in its in-flight `slot`; answers go
    /// on the `/sse` stream.
    #[allow(clippy::too_many_arguments)]
    async fn legacy_message(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        session: &Arc<SessionState>,
        log: &Arc<SessionLog>,
        message: &Message,
        slot: crate::stream::Slot,
        client_headers: &http::HeaderMap,
        request_id: &str,
    ) {
        if !message.is_request() {
            let absorbed = self
                .absorb(org, session, log, Some(slot), message, || {
                    session_headers(org, identity, session, client_headers, request_id)
                })
                .await;
            if let Err(reject) = absorbed {
                tracing::debug!(error = %reject.message, "a client message was not passed on");
            }
            return;
        }
        if message.method() == Some("initialize") {
            let _slot = slot;
            // One initialize at a time per session: each replaces (and
            // ends) the upstream session of the one before, so a batch of
            // them leaves exactly one behind.
            let coordination = self.rebinding_of(&session.id);
            let _one = coordination.lock.lock().await;
            let answer = match self
                .negotiate(
                    org,
                    &session.id,
                    identity,
                    message,
                    client_headers,
                    request_id,
                )
                .await
            {
                Ok((answer, upstream)) => {
                    if let Some(version) = negotiated_version(&answer) {
                        let params = message.params().unwrap_or(Value::Null);
                        if let Ok(Some(current)) = self.store.lookup(&session.id).await {
                            // A second initialize: its upstream session
                            // replaces the first one's.
                            self.close_upstream(&current);
                        }
                        let change = |s: &mut SessionState| {
                            s.protocol_version.clone_from(&version);
                            s.set_client(&params);
                            s.upstream.clone_from(&upstream);
                        };
                        match self.store.update(&session.id, &change).await {
                            Ok(true) => {}
                            recorded => {
                                if let Err(e) = recorded {
                                    tracing::warn!(error = %e, "cannot record the negotiated session");
                                }
                                // Nobody would end it later.
                                let mut lost = (**session).clone();
                                lost.upstream.clone_from(&upstream);
                                self.close_upstream(&lost);
                            }
                        }
                        // The /sse stream is the standalone stream.
                        self.ensure_listener(org, &session.id, log, false);
                    }
                    answer
                }
                Err(reject) => reject.body(),
            };
            let _ = self.append(log, STANDALONE, &answer, org);
            return;
        }
        // Re-read: initialize may have recorded the negotiated version.
        let current = match self.store.lookup(&session.id).await {
            Ok(Some(s)) => s,
            _ => session.clone(),
        };
        if let Some(answer) = self.answer_locally(org, &current, log, message).await {
            let body = answer.unwrap_or_else(|reject| reject.body());
            let _ = self.append(log, STANDALONE, &body, org);
            return;
        }
        let headers = session_headers(org, identity, &current, client_headers, request_id);
        self.forward_into(org, &current, log, STANDALONE, message, headers, Some(slot))
            .await;
    }

    // ----- admin API ---------------------------------------------------------

    /// The session a worker names in the publish API, if it exists.
    async fn published_to(
        &self,
        session_id: &str,
    ) -> Result<Option<Arc<SessionState>>, StoreError> {
        if !session::is_plausible_id(session_id) {
            return Ok(None);
        }
        self.store.lookup(session_id).await
    }

    /// Delivers one JSON-RPC message to a session's standalone stream.
    pub async fn publish(&self, session_id: &str, body: &Bytes) -> Result<EventId, PublishError> {
        let message = jsonrpc::parse_message(body).map_err(PublishError::Invalid)?;
        let state = self
            .published_to(session_id)
            .await?
            .ok_or(PublishError::UnknownSession)?;
        let id = self
            .hub
            .publish(session_id, &message.raw)
            .await?
            .ok_or(PublishError::UnknownSession)?;
        if let Some(org) = self.routes.org(&state.org) {
            org.metrics.published_publish.inc();
        }
        Ok(id)
    }

    /// Removes idle sessions; run periodically. A session with a client
    /// stream open on this node is not idle, however long it has been quiet.
    pub async fn reap_idle(&self) -> usize {
        for id in self.hub.sessions_with_readers() {
            if let Err(e) = self.store.touch(&id).await {
                tracing::warn!(error = %e, "cannot refresh a session with an open stream");
            }
        }
        let expired = match self.store.remove_idle(self.config.sessions.idle_ttl).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reap idle sessions");
                return 0;
            }
        };
        for state in &expired {
            self.forget_session(state, "expired after being idle");
        }
        self.expire_parked();
        self.holds.sweep();
        self.hub.drop_idle_mirrors();
        self.count_sessions().await;
        for org in self.routes.orgs() {
            org.pool.available();
        }
        expired.len()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.hub.close_all();
        // Leases of background upstream streams go now, so that another
        // node takes them over at once rather than when they expire.
        for listener in self.listeners.iter() {
            listener.stop.cancel();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// What other nodes tell this one (Redis mode).
impl BusHandler for Gateway {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Logouts that came while this node was off the bus.
    fn bus_up(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        let (Some(validator), Some(events)) = (self.validator.clone(), self.hub.events().cloned())
        else {
            return Box::pin(async {});
        };
        Box::pin(async move {
            // The subscription just worked: a failure here is brief.
            for attempt in 1..=3 {
                match events.logouts().await {
                    Ok(logouts) => {
                        for event in &logouts {
                            validator.revoke(event);
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, "cannot read the logouts Redis keeps");
                    }
                }
            }
        })
    }

    fn notice(self: Arc<Self>, notice: Notice) {
        match notice {
            Notice::Ended { session, hidden } => {
                self.stop_requests(&session);
                self.drop_local(&session);
                if hidden {
                    self.hidden.retain(|_, id| *id != session);
                }
            }
            Notice::Cancel { session, id } => {
                if let Some(id) = Id::from_value(&id) {
                    self.cancel_in_flight(session, id);
                }
            }
            Notice::Reply { session, body } => {
                if let Ok(message) = jsonrpc::parse_message(&Bytes::from(body)) {
                    self.replies.take(&session, &message);
                }
            }
            Notice::Logout(event) => {
                if let Some(validator) = &self.validator {
                    validator.revoke(&event);
                }
            }
            Notice::Relisten { session } => self.reopen_listener(&session),
            Notice::Hold {
                node,
                session,
                hold,
                body,
            } => {
                if node == self.node
                    && let Err(e) = self.holds.publish(&session, &hold, &Bytes::from(body))
                {
                    tracing::debug!(session = %short(&session), hold = %hold, error = %e, "a worker's message from another node was refused");
                }
            }
            Notice::Resume(request) => {
                if request.node == self.node {
                    tokio::spawn(self.resume_for(request));
                }
            }
            Notice::Resumed {
                node,
                token,
                outcome,
            } => {
                if node == self.node {
                    self.resumed(&token, outcome);
                }
            }
            Notice::Abandon { node, token } => {
                if node == self.node {
                    self.abandon(token);
                }
            }
        }
    }
}

/// Pauses between attempts to reopen a session's background upstream
/// stream (a listen, or a stateful upstream's GET stream): from 100 ms,
/// doubling up to 5 s, and back to the start once the stream delivers.
struct Backoff(std::time::Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(std::time::Duration::from_millis(100))
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Waits the pause, then lengthens it; false if `stop` came first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {},
            _ = stop.cancelled() => return false,
        }
        self.0 = (self.0 * 2).min(std::time::Duration::from_secs(5));
        true
    }
}

/// The legacy `/sse` stream: the session lives exactly as long as it.
struct LegacyStream {
    live: LiveStream,
    gateway: Arc<Gateway>,
    session: String,
}

#[async_trait]
impl ChunkSource for LegacyStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        self.live.next_chunk().await
    }
    fn written(&mut self) {
        self.live.written();
    }
}

impl Drop for LegacyStream {
    fn drop(&mut self) {
        let gateway = self.gateway.clone();
        let session = std::mem::take(&mut self.session);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = gateway
                    .end_session(&session, "its /sse stream closed")
                    .await
                {
                    tracing::warn!(error = %e, "cannot end a legacy session");
                }
            });
        }
    }
}

/// Headers of a session's message to the upstream, on behalf of the
/// caller.
pub(super) fn session_headers(
    org: &OrgRoute,
    identity: &Identity,
    session: &SessionState,
    client_headers: &http::HeaderMap,
    request_id: &str,
) -> http::HeaderMap {
    let version = if session.protocol_version.is_empty() {
        "2024-11-05"
    } else {
        session.protocol_version.as_str()
    };
    upstream_headers(
        &Forwarding {
            session_id: &session.id,
            org: &org.name,
            identity,
            protocol_version: Some(version),
            request_id,
        },
        client_headers,
    )
}

fn parse_post_body(body: &Bytes) -> Result<Body, Reject> {
    jsonrpc::parse_body(body)
        .map_err(|e| Reject::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
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

/// The `protocolVersion` of a successful initialize response.
fn negotiated_version(response: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(response).ok()?;
    v.get("result")?
        .get("protocolVersion")?
        .as_str()
        .map(str::to_owned)
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
    use std::sync::atomic::AtomicU64;
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
        let r = gw.handle(post(INIT, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        r.headers
            .get(&MCP_SESSION_ID)
            .expect("session id")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    #[tokio::test]
    pub(in crate::gateway) async fn initialize_mints_a_session_and_published_messages_reach_its_stream()
     {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        assert!(session::is_plausible_id(&sid));
        let state = gw.store.lookup(&sid).await.expect("store").expect("stored");
        assert_eq!(state.protocol_version, "2025-06-18");
        assert_eq!(state.client_info.as_ref().expect("info")["name"], "unit");

        let mut stream = open_stream(&gw, &sid).await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(
            stream.headers.get("x-accel-buffering").expect("header"),
            "no"
        );
        let id = gw
            .publish(
                &sid,
                &Bytes::from_static(
                    br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"hi"}}"#,
                ),
            )
            .await
            .expect("published");
        let text = next_text(&mut stream).await;
        assert!(
            text.starts_with(&format!("id: {id}\nevent: message\ndata: ")),
            "{text}"
        );
        assert!(text.contains("\"hi\""), "{text}");
    }

    #[tokio::test]
    pub(in crate::gateway) async fn an_sse_answer_is_relayed_event_by_event_with_gateway_ids() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        let mut r = gw
            .handle(post(
                r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"x"}}"#,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let mut text = String::new();
        while !text.contains("\"result\"") {
            text.push_str(&next_text(&mut r).await);
        }
        let ids: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .collect();
        assert_eq!(ids.len(), 2, "{text}");
        assert!(
            ids.iter().all(|i| i.starts_with("1.")),
            "POST stream 1: {ids:?}"
        );
        assert!(text.find("notifications/progress") < text.find("\"result\""));
        let ResponseBody::Stream(src) = &mut r.body else {
            panic!()
        };
        assert!(
            src.next_chunk().await.is_none(),
            "the stream ends after the result"
        );
    }

    /// An upstream's SSE answer whose event is an array that serde would
    /// read as an envelope (`["2.0", id, method, result, error]`) is not taken
    /// for the response: the call ends with the gateway's error instead.
    #[tokio::test]
    pub(in crate::gateway) async fn an_array_from_the_upstream_is_not_a_response() {
        let up = testing::stub(|body| {
            let id = testing::request_id(body);
            if String::from_utf8_lossy(body).contains("\"initialize\"") {
                return (200, "application/json", format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"protocolVersion":"2025-06-18","capabilities":{{}},"serverInfo":{{"name":"stub","version":"1"}}}}}}"#
                ));
            }
            (200, "text/event-stream", format!(
                "event: message\r\ndata: [\"2.0\",{id},null,{{\"ok\":true}},null]\r\n\r\n"
            ))
        })
        .await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        let mut r = gw
            .handle(post(
                r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"x"}}"#,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let mut text = String::new();
        while !text.contains("\"error\"") {
            text.push_str(&next_text(&mut r).await);
        }
        assert!(
            text.contains("ended its answer without a response"),
            "{text}"
        );
        assert!(!text.contains("\"result\""), "{text}");
    }

    #[tokio::test]
    pub(in crate::gateway) async fn refusals_are_precise() {
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
    pub(in crate::gateway) async fn batches_follow_the_negotiated_version_and_the_size_cap() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await; // negotiates 2025-06-18
        let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        let batch = format!("[{ping}]");
        let no_header = gw.handle(post(&batch, &[("mcp-session-id", &sid)])).await;
        assert_eq!(
            no_header.status,
            StatusCode::BAD_REQUEST,
            "{}",
            json_of(&no_header)
        );
        assert!(error_message(&no_header).contains("2025-06-18"));

        // Another supported version than the negotiated one is accepted
        // (the client only SHOULD send the negotiated one)...
        let other = gw
            .handle(post(
                ping,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
            ))
            .await;
        assert_eq!(other.status, StatusCode::OK, "{}", json_of(&other));
        assert_eq!(json_of(&other)["result"], json!({}));
        // ...but the negotiated version still governs: naming one that
        // allowed batches does not allow them in this session.
        let claimed = gw
            .handle(post(
                &batch,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-03-26"),
                ],
            ))
            .await;
        assert_eq!(claimed.status, StatusCode::BAD_REQUEST);
        assert!(error_message(&claimed).contains("2025-06-18"));

        let huge = format!("[{}]", vec![ping; 33].join(","));
        let r = gw
            .handle(post(
                &huge,
                &[
                    ("mcp-protocol-version", "2025-03-26"),
                    ("mcp-session-id", &sid),
                ],
            ))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(up.hits(), 1, "nothing but initialize went upstream");
    }

    #[tokio::test]
    pub(in crate::gateway) async fn a_sessions_batches_are_decided_by_its_negotiated_version_alone()
    {
        let up = testing::stub(|body| {
            let id = testing::request_id(body);
            (200, "application/json", format!(
                r#"{{"jsonrpc":"2.0","id":{id},"result":{{"protocolVersion":"2025-03-26","capabilities":{{}},"serverInfo":{{"name":"old","version":"1"}}}}}}"#
            ))
        })
        .await;
        let gw = gateway(&[up.url()]);
        let init = INIT.replace("2025-06-18", "2025-03-26");
        let r = gw.handle(post(&init, &[])).await;
        let sid = r
            .headers
            .get(&MCP_SESSION_ID)
            .expect("session id")
            .to_str()
            .expect("ascii")
            .to_owned();
        let state = gw.store.lookup(&sid).await.expect("store").expect("stored");
        assert_eq!(state.protocol_version, "2025-03-26");
        // It names a later supported version, which has no batches: the
        // session's own version allows them.
        let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#;
        let r = gw
            .handle(post(
                batch,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", json_of(&r));
    }

    #[tokio::test]
    pub(in crate::gateway) async fn a_session_cannot_flood_the_upstream() {
        let up = mcp_stub().await;
        let gw = gateway_with(&[up.url()], "max_in_flight: 1");
        let sid = initialize(&gw).await;
        let slow = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"slow"}}"#;
        let busy = {
            let gw = gw.clone();
            let sid = sid.clone();
            tokio::spawn(async move {
                let mut r = gw.handle(post(slow, &[("mcp-session-id", &sid)])).await;
                next_text(&mut r).await
            })
        };
        // Wait until the slow request is in flight.
        assert!(
            testing::eventually(Duration::from_secs(5), || async { up.hits() >= 2 }).await,
            "the slow request never reached the upstream"
        );
        let second = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x"}}"#;
        let refused = gw.handle(post(second, &[("mcp-session-id", &sid)])).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(json_of(&refused)["id"], 3);
        assert!(
            busy.await
                .expect("joined")
                .contains("notifications/progress")
        );
        // The slot is free again once the answer is read.
        let served = || async {
            gw.handle(post(second, &[("mcp-session-id", &sid)]))
                .await
                .status
                == StatusCode::OK
        };
        assert!(
            testing::eventually(Duration::from_secs(5), served).await,
            "the slot was never released"
        );
    }

    #[tokio::test]
    pub(in crate::gateway) async fn draining_answers_503_not_404() {
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

    #[tokio::test]
    pub(in crate::gateway) async fn no_session_is_created_when_the_upstream_is_down() {
        let gw = gateway(&[testing::dead_url()]);
        let r = gw.handle(post(INIT, &[])).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(r.headers.get(&MCP_SESSION_ID).is_none());
        assert_eq!(json_of(&r)["error"]["code"], code::UPSTREAM_ERROR);
        assert_eq!(json_of(&r)["id"], 1);
        assert!(gw.store.list_org("org-1").await.expect("list").is_empty());
    }

    /// A stateful upstream whose sessions can all be forgotten at once (a
    /// restart); it records (session, method) of every message.
    pub(in crate::gateway) struct StatefulStub {
        stub: testing::Stub,
        generation: Arc<AtomicU64>,
        seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    }

    pub(in crate::gateway) async fn stateful_stub() -> StatefulStub {
        let generation = Arc::new(AtomicU64::new(1));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let minted = Arc::new(AtomicU64::new(0));
        let (g, log) = (generation.clone(), seen.clone());
        let stub = testing::full_stub(move |head, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let method = v["method"].as_str().unwrap_or("(response)").to_owned();
            let json = |status, body: String, extra: Option<String>| {
                let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
                headers.extend(extra.map(|s| ("mcp-session-id".to_owned(), s)));
                testing::Reply { status, headers, body }
            };
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            if method == "initialize" {
                let sid = format!("g{}-s{}", g.load(Ordering::SeqCst), minted.fetch_add(1, Ordering::SeqCst));
                let result = json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "serverInfo": {"name": "stateful-stub", "version": "1"}}});
                return json(200, result.to_string(), Some(sid));
            }
            let sid = head
                .lines()
                .find_map(|l| l.strip_prefix("mcp-session-id:"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if !sid.starts_with(&format!("g{}-", g.load(Ordering::SeqCst))) {
                return json(404, r#"{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600,"message":"Session not found"}}"#.into(), None);
            }
            log.lock().expect("log").push((sid, method));
            if id.is_null() {
                return json(202, String::new(), None);
            }
            json(200, json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}}).to_string(), None)
        })
        .await;
        StatefulStub {
            stub,
            generation,
            seen,
        }
    }

    #[tokio::test]
    pub(in crate::gateway) async fn a_lost_upstream_session_is_opened_again_with_the_clients_params_and_level()
     {
        let up = stateful_stub().await;
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
             publish: {{secret: {SECRET}}}\n\
             orgs:\n  org-1: {{upstream: {{era: stateful-2025, replicas: [\"{}\"], timeout: 2s}}}}\n",
            up.stub.url()
        );
        let config = Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
        let gw = Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway");
        let sid = initialize(&gw).await;
        let send = |body: &'static str| {
            post(
                body,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            )
        };
        assert_eq!(
            gw.handle(send(
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#
            ))
            .await
            .status,
            StatusCode::ACCEPTED
        );
        let r = gw
            .handle(send(r#"{"jsonrpc":"2.0","id":2,"method":"logging/setLevel","params":{"level":"debug"}}"#))
            .await;
        assert_eq!(
            json_of(&r)["result"]["ok"],
            true,
            "passed to the upstream session"
        );
        // The upstream restarts: every session it had is gone.
        up.generation.store(2, Ordering::SeqCst);
        let r = gw
            .handle(send(
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add"}}"#,
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            json_of(&r)["result"]["ok"],
            true,
            "the client sees no error"
        );
        let seen = up.seen.lock().expect("log").clone();
        let methods = |prefix: &str| {
            seen.iter()
                .filter(|(s, _)| s.starts_with(prefix))
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            methods("g1-"),
            ["notifications/initialized", "logging/setLevel"]
        );
        assert_eq!(
            methods("g2-"),
            [
                "notifications/initialized",
                "logging/setLevel",
                "tools/call"
            ],
            "re-initialized, level restored, then the call"
        );
        assert_eq!(
            gw.routes
                .org("org-1")
                .expect("org")
                .metrics
                .bridged
                .reinitialized
                .get(),
            1
        );
    }

    #[tokio::test]
    pub(in crate::gateway) async fn delete_ends_the_session_and_its_streams() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        let mut stream = open_stream(&gw, &sid).await;
        let del = gw
            .handle(request(
                Method::DELETE,
                "/gw/org-1/mcp",
                &[("mcp-session-id", &sid)],
                "",
            ))
            .await;
        assert_eq!(del.status, StatusCode::NO_CONTENT);
        let ResponseBody::Stream(src) = &mut stream.body else {
            panic!()
        };
        assert!(src.next_chunk().await.is_none(), "the open stream ends");
        let again = gw
            .handle(post(
                r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#,
                &[("mcp-session-id", &sid)],
            ))
            .await;
        assert_eq!(again.status, StatusCode::NOT_FOUND);
        assert!(matches!(
            gw.publish(
                &sid,
                &Bytes::from_static(br#"{"jsonrpc":"2.0","method":"x"}"#)
            )
            .await,
            Err(PublishError::UnknownSession)
        ));
    }
}
