//! Pingora glue. Each phase is one small function; the logic lives in
//! [`Gateway`] and the modules it calls.
//!
//! - [`McpApp`]: an HTTP server app on Pingora's listener and connection
//!   handling. It reads the request (bounded), lets the gateway answer it,
//!   and writes the answer. The gateway reads and rewrites every message and
//!   holds streams itself, so no proxy phases are needed: an earlier version
//!   ran as a `ProxyHttp` whose per-request futures and modules cost 2.5x the
//!   CPU of nginx per request and ~15 KiB per idle stream (bench/RESULTS.md).
//! - Long-lived GET streams (the standalone stream and the legacy `/sse`
//!   stream) leave Pingora's session once the head is written: a small task
//!   holds the socket and writes chunks as events arrive, so an idle stream
//!   costs its socket, its write buffer and that task.
//! - [`AdminApp`]: the admin listener.
//! - [`Housekeeping`]: reaps idle sessions, and drains streams on shutdown.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Version, header};
use pingora_core::ErrorType;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::apps::{HttpPersistentSettings, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::v2;
use pingora_core::protocols::http::v2::server::H2Accept;
use pingora_core::protocols::{ALPN, Digest, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::ResponseHeader;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::config::Limits;
use crate::edge::ChunkSource;
use crate::edge::{self, Reject, Request, Response, ResponseBody};
use crate::gateway::Gateway;

/// How long a client may leave a write blocked (a full TCP window) before
/// its connection is dropped, so one stalled client never pins resources.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle keep-alive connection may wait for its next request
/// to begin (seconds).
const IDLE_SECS: u64 = 60;

/// How long a refusal of a connection may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The MCP listener's app: HTTP/1.1 connections, each counted against
/// `limits.max_connections` for as long as it is open.
pub struct McpApp {
    gateway: Arc<Gateway>,
    connections: Arc<Connections>,
}

impl McpApp {
    /// One app per listener thread; `connections` is shared by all.
    pub fn new(gateway: Arc<Gateway>, connections: Arc<Connections>) -> McpApp {
        McpApp {
            gateway,
            connections,
        }
    }
}

/// The client connections open on the MCP listener, all threads together.
pub struct Connections {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
    gauge: prometheus::IntGauge,
    refused: prometheus::IntCounter,
}

impl Connections {
    pub fn new(gateway: &Gateway) -> Arc<Connections> {
        Arc::new(Connections {
            open: std::sync::atomic::AtomicUsize::new(0),
            max: gateway.live().config.limits.max_connections,
            gauge: gateway.metrics.connections.clone(),
            refused: gateway.metrics.connections_refused.clone(),
        })
    }

    /// Counts a new connection in; `None` (counted as refused) when
    /// `max` are open.
    fn enter(self: &Arc<Self>) -> Option<OpenConnection> {
        use std::sync::atomic::Ordering;
        let counted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if counted.is_err() {
            self.refused.inc();
            return None;
        }
        self.gauge.inc();
        Some(OpenConnection(self.clone()))
    }
}

/// One open connection; counted out when dropped.
struct OpenConnection(Arc<Connections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// A connection kept for its next request.
struct Reuse {
    stream: Stream,
    settings: HttpPersistentSettings,
    /// Bytes of the next request were read with the last one.
    pipelined: bool,
}

#[async_trait]
impl ServerApp for McpApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(open) = self.connections.enter() else {
            refuse_connection(stream, self.connections.max).await;
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.serve_h2(stream, shutdown).await;
            drop(open);
            return None;
        }
        let mut open = Some(open);
        let mut session = ServerSession::new_http1(stream);
        loop {
            let reuse = self.serve_one(session, shutdown, &mut open).await?;
            let Reuse {
                mut stream,
                mut settings,
                pipelined,
            } = reuse;
            // Idle until the client starts its next request; the head
            // deadline runs from its first byte.
            if !pipelined && !next_request_begins(&mut stream, &mut settings).await {
                return None;
            }
            session = ServerSession::new_http1(stream);
            settings.apply_to_session(&mut session);
        }
    }
}

/// Waits up to [`IDLE_SECS`] for a kept-alive connection's next request to
/// begin; false if the client closed, or stayed idle too long. A plain
/// socket is peeked; a TLS stream cannot be, so its first byte is read and
/// goes to the next session as a pipelined prefix.
async fn next_request_begins(stream: &mut Stream, settings: &mut HttpPersistentSettings) -> bool {
    use tokio::io::AsyncReadExt;
    let idle = Duration::from_secs(IDLE_SECS);
    let mut first = [0u8; 1];
    match tokio::time::timeout(idle, stream.try_peek(&mut first)).await {
        Ok(Ok(true)) => return true,
        // Peeking is not supported (TLS): read instead.
        Ok(Ok(false)) if stream.get_ssl_digest().is_some() => {}
        _ => return false,
    }
    let read = matches!(
        tokio::time::timeout(idle, stream.read(&mut first)).await,
        Ok(Ok(1))
    );
    if read {
        settings.set_pipelined_prefix(BytesMut::from(&first[..]));
    }
    read
}

impl McpApp {
    /// Serves an HTTP/2 connection: each stream is a request, served in a
    /// task of its own, so that SSE answers and other requests share the
    /// connection. The connection closes after [`IDLE_SECS`] with no
    /// stream, and is drained with GOAWAY on shutdown.
    async fn serve_h2(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let handshake = tokio::time::timeout(
            self.gateway.live().config.limits.head_read_timeout,
            v2::server::handshake(stream, Some(v2::server::default_h2_options())),
        );
        let mut conn = match handshake.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!("HTTP/2 handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("HTTP/2 handshake did not finish in time; closing");
                return;
            }
        };
        let mut streams = tokio::task::JoinSet::new();
        let mut shutdown = shutdown.clone();
        // Set once GOAWAY is sent: when the connection must be gone by.
        let mut going_away: Option<tokio::time::Instant> = None;
        let mut rejected = 0usize;
        loop {
            let drained_by = going_away.unwrap_or_else(tokio::time::Instant::now);
            let accepted = tokio::select! {
                _ = shutdown.changed(), if going_away.is_none() => {
                    conn.graceful_shutdown();
                    going_away = Some(tokio::time::Instant::now() + H2_DRAIN);
                    continue;
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => continue,
                _ = tokio::time::sleep(Duration::from_secs(IDLE_SECS)),
                    if streams.is_empty() && going_away.is_none() => {
                    // Idle: GOAWAY first, so that a request racing the close
                    // is known to the client as not processed.
                    conn.graceful_shutdown();
                    going_away = Some(tokio::time::Instant::now() + H2_DRAIN);
                    continue;
                }
                _ = tokio::time::sleep_until(drained_by), if going_away.is_some() && streams.is_empty() => break,
                // Accepting drives the whole connection, the streams'
                // frames included: it runs while any stream is served.
                accepted = v2::server::HttpSession::from_h2_conn(&mut conn, digest.clone()) => accepted,
            };
            match accepted {
                Ok(Some(H2Accept::Session(h2))) => {
                    // Each stream counts against `limits.max_connections`
                    // too: one connection may carry many.
                    let open = self.connections.enter();
                    let app = self.clone();
                    let shutdown = shutdown.clone();
                    streams.spawn(async move {
                        let session = ServerSession::new_http2(h2);
                        let mut open = match open {
                            Some(open) => Some(open),
                            None => return app.refuse_stream(session).await,
                        };
                        app.serve_one(session, &shutdown, &mut open).await;
                        drop(open);
                    });
                }
                Ok(Some(H2Accept::Rejected)) => {
                    // Pingora answered a malformed stream; bound how many a
                    // connection may send.
                    rejected += 1;
                    if rejected >= MAX_REJECTED_H2_STREAMS {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("HTTP/2 connection ended: {e}");
                    break;
                }
            }
        }
        // Requests being answered finish, as over HTTP/1.1, rather than be
        // dropped halfway through (their writes fail if the client is gone).
        streams.detach_all();
    }

    /// The answer to an HTTP/2 stream over `limits.max_connections`.
    async fn refuse_stream(&self, session: ServerSession) {
        let max = self.connections.max;
        let reject = Reject::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            crate::jsonrpc::code::INTERNAL_ERROR,
            format!(
                "the gateway has {max} connections and streams open (limits.max_connections); retry shortly"
            ),
        );
        let response = reject
            .into_response()
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"));
        let _ = write_response(session, response, &self.gateway, false).await;
    }
}

/// How long an HTTP/2 connection that was sent GOAWAY may take to close.
const H2_DRAIN: Duration = Duration::from_secs(5);

/// Malformed streams an HTTP/2 connection may open before it is closed.
const MAX_REJECTED_H2_STREAMS: usize = 32;

/// The answer to a connection over `limits.max_connections`: 503 with a
/// JSON-RPC error, written without reading the request, then closed.
async fn refuse_connection(mut stream: Stream, max: usize) {
    let body = crate::jsonrpc::error_body(
        None,
        crate::jsonrpc::code::INTERNAL_ERROR,
        &format!("the gateway has {max} connections open (limits.max_connections); retry shortly"),
    );
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    let write = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
}

/// A 400 with a JSON-RPC error body for a request head that cannot be
/// parsed; the connection closes after it.
async fn refuse_malformed_head(session: &mut ServerSession, what: &str) {
    let body = crate::jsonrpc::error_body(
        None,
        crate::jsonrpc::code::BAD_REQUEST,
        &format!("malformed HTTP request head ({what})"),
    );
    let Ok(mut head) = ResponseHeader::build(http::StatusCode::BAD_REQUEST, Some(3)) else {
        return;
    };
    let framed = head
        .insert_header(header::CONTENT_TYPE, "application/json")
        .and_then(|()| head.insert_header(header::CONTENT_LENGTH, body.len()));
    if framed.is_ok() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, session.write_error_response(head, body)).await;
    }
}

/// What happened to a response, for the access log.
type Outcome = &'static str;

impl McpApp {
    /// Reads one request (its head within `limits.head_read_timeout`),
    /// answers it, and gives the connection back if it may serve another.
    /// A stream that outlives this takes `open` along.
    async fn serve_one(
        &self,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
        open: &mut Option<OpenConnection>,
    ) -> Option<Reuse> {
        let draining = *shutdown.borrow() || self.gateway.is_draining();
        session.set_keepalive((!draining).then_some(IDLE_SECS));
        session.set_read_timeout(Some(Duration::from_secs(IDLE_SECS)));
        let head_timeout = self.gateway.live().config.limits.head_read_timeout;
        match tokio::time::timeout(head_timeout, session.read_request()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return None,
            Ok(Err(e)) => {
                tracing::debug!("cannot read a request head: {e}");
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader | ErrorType::H1Error) {
                    refuse_malformed_head(&mut session, e.etype().as_str()).await;
                }
                return None;
            }
            Err(_) => {
                tracing::debug!(
                    "a request head did not arrive within {head_timeout:?} (limits.head_read_timeout); closing"
                );
                return None;
            }
        }
        // Pingora has decided from the request whether the connection may be
        // kept (HTTP version, `Connection`, ambiguous framing); bound the
        // idle wait, and close while draining.
        let keepalive =
            session.get_keepalive().is_some() && !*shutdown.borrow() && !self.gateway.is_draining();
        session.set_keepalive(keepalive.then_some(IDLE_SECS));
        let request_id = request_id(session.req_header().headers.get(&edge::REQUEST_ID));
        let span = if crate::telemetry::on() {
            let h = session.req_header();
            // Named by the path only where it is a route's: a scan of
            // random paths makes no new operation names.
            let path = h.uri.path();
            let routed = self.gateway.live().routes.resolve(path).is_ok();
            let span = tracing::info_span!(
                "request",
                id = %request_id,
                otel.name = %format_args!("{} {}", h.method, if routed { path } else { "(no route)" }),
                otel.kind = "server",
                http.request.method = %h.method,
                url.path = h.uri.path(),
                http.response.status_code = tracing::field::Empty,
            );
            crate::telemetry::continue_trace(&span, &h.headers);
            span
        } else {
            tracing::info_span!("request", id = %request_id)
        };
        self.serve(session, request_id, open).instrument(span).await
    }

    async fn serve(
        &self,
        mut session: ServerSession,
        request_id: String,
        open: &mut Option<OpenConnection>,
    ) -> Option<Reuse> {
        let started = Instant::now();
        // A copy: the running config may change while a stream lasts.
        let limits = &self.gateway.live().config.limits.clone();
        session.set_write_timeout(Some(WRITE_TIMEOUT));
        let (method, path) = {
            let h = session.req_header();
            (h.method.clone(), h.uri.path().to_owned())
        };
        let response = match read_request(&mut session, limits, &request_id).await {
            // Boxed: the handling future is large and done before the answer
            // is written, so it should not stay in this one's state.
            Ok(req) => Box::pin(self.gateway.handle(req)).await,
            Err(reject) => {
                // The rest of the body was not read: do not reuse the connection.
                session.set_keepalive(None);
                let mut r = reject
                    .into_response()
                    .labeled(self.gateway.label_for_path(&path, &method));
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    r.headers.insert(edge::REQUEST_ID, v);
                }
                r
            }
        };
        // An upgrade (a WebSocket) takes over an HTTP/1.1 connection only:
        // HTTP/2 has no `Upgrade` (RFC 8441's extended CONNECT is not served).
        let upgradable = matches!(session, ServerSession::H1(_))
            && session.req_header().version == Version::HTTP_11;
        let response = match response.body {
            ResponseBody::Upgrade(_) if !upgradable => Reject::new(
                http::StatusCode::BAD_REQUEST,
                crate::jsonrpc::code::BAD_REQUEST,
                "a WebSocket upgrade needs HTTP/1.1",
            )
            .into_response()
            .labeled(response.label),
            _ => response,
        };
        let status = response.status.as_u16();
        tracing::Span::current().record("http.response.status_code", status);
        // Only HTTP/1.1 streams are chunked, and so can be written by `pump`.
        let detach =
            method == Method::GET && matches!(response.body, ResponseBody::Stream(_)) && upgradable;
        let log_served = move |streamed: bool, outcome: Outcome| {
            tracing::info!(
                %method,
                path,
                status,
                streamed,
                ms = started.elapsed().as_millis() as u64,
                outcome,
                "served"
            );
        };
        let (outcome, reuse) = write_response(session, response, &self.gateway, detach).await;
        match outcome {
            Written::Done(outcome, streamed) => log_served(streamed, outcome),
            Written::Detached(stream, source) => {
                let span = tracing::Span::current();
                let open = open.take();
                tokio::spawn(
                    async move {
                        let outcome = pump(stream, source).await;
                        log_served(true, outcome);
                        drop(open);
                    }
                    .instrument(span),
                );
            }
            Written::Upgraded(stream, upgraded) => {
                let span = tracing::Span::current();
                let open = open.take();
                tokio::spawn(
                    async move {
                        upgraded.run(Box::new(stream)).await;
                        log_served(true, "upgraded connection closed");
                        drop(open);
                    }
                    .instrument(span),
                );
            }
        }
        reuse
    }
}

/// A request id: the client's `X-Request-Id` if it is short and plain,
/// otherwise a fresh random one.
fn request_id(given: Option<&HeaderValue>) -> String {
    if let Some(v) = given.and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return v.to_owned();
    }
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// Reads the request head and the whole body, refusing bodies over the
/// limit before buffering them.
async fn read_request(
    session: &mut ServerSession,
    limits: &Limits,
    request_id: &str,
) -> Result<Request, Reject> {
    let head = session.req_header();
    let request = Request {
        method: head.method.clone(),
        path: head.uri.path().to_owned(),
        query: head.uri.query().map(str::to_owned),
        headers: head.headers.clone(),
        body: Bytes::new(),
        request_id: request_id.to_owned(),
        parsed: None,
    };
    let body = read_body(session, limits).await?;
    Ok(Request { body, ..request })
}

/// Reads a body of at most `limits.max_body_bytes`, all of it within
/// `limits.body_read_timeout`.
pub async fn read_body(session: &mut ServerSession, limits: &Limits) -> Result<Bytes, Reject> {
    let max = limits.max_body_bytes;
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(edge::body_too_large(max));
    }
    let read_all = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await.map_err(|e| {
            Reject::new(
                http::StatusCode::BAD_REQUEST,
                crate::jsonrpc::code::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        })? {
            if body.len() + chunk.len() > max {
                return Err(edge::body_too_large(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(limits.body_read_timeout, read_all)
        .await
        .unwrap_or_else(|_| {
            Err(Reject::new(
                http::StatusCode::REQUEST_TIMEOUT,
                crate::jsonrpc::code::BAD_REQUEST,
                format!(
                    "the request body did not arrive within {:?} (limits.body_read_timeout)",
                    limits.body_read_timeout
                ),
            ))
        })
}

/// How a response went out.
enum Written {
    /// Written (or abandoned) in full: the access log outcome, and whether it
    /// was a stream.
    Done(Outcome, bool),
    /// The head is out; the socket and the event source are handed to
    /// [`pump`].
    Detached(Stream, Box<dyn ChunkSource>),
    /// The 101 head is out; the socket is handed to what serves it.
    Upgraded(Stream, Box<dyn edge::Upgraded>),
}

/// Writes a response; streams are written chunk by chunk until the source
/// ends or a write fails (the client is gone). With `detach`, a stream's
/// socket is taken out of the session once the head is written. Returns the
/// connection for reuse when the exchange finished cleanly.
async fn write_response(
    mut session: ServerSession,
    response: Response,
    gateway: &Gateway,
    detach: bool,
) -> (Written, Option<Reuse>) {
    let Response {
        status,
        headers,
        body,
        label,
    } = response;
    gateway
        .metrics
        .requests
        .with_label_values(&[
            label.org.as_deref().unwrap_or("unknown"),
            label.method,
            status.as_str(),
        ])
        .inc();
    let done = |outcome: Outcome, streamed: bool| (Written::Done(outcome, streamed), None);
    let streamed = matches!(body, ResponseBody::Stream(_));
    // The gateway's header map moves into the head as it is.
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    match &body {
        // 204 and 304 carry no body and, per RFC 9110, no Content-Length.
        _ if status == http::StatusCode::NO_CONTENT || status == http::StatusCode::NOT_MODIFIED => {
        }
        ResponseBody::Empty => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        }
        ResponseBody::Full(b) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
        }
        ResponseBody::Stream(_) if session.req_header().version == Version::HTTP_11 => {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        ResponseBody::Stream(_) | ResponseBody::Upgrade(_) => {}
    }
    let head = ResponseHeader::from(parts);
    if detach {
        // The connection ends with the stream: say so in the head.
        session.set_keepalive(None);
    }
    // Pingora's write timeout does not cover the flush of a head (or of the
    // end of a body): bound each such wait here.
    if !bounded(session.write_response_header(Box::new(head))).await {
        return done("client gone before the header", streamed);
    }
    let outcome = match body {
        ResponseBody::Empty | ResponseBody::Full(_) => {
            let data = match body {
                ResponseBody::Full(b) => b,
                _ => Bytes::new(),
            };
            let written = if data.is_empty() {
                bounded(async { session.finish_body().await.map(|_| ()) }).await
            } else {
                bounded(session.write_response_body(data, true)).await
            };
            if !written {
                return done("client gone during the body", false);
            }
            "complete"
        }
        ResponseBody::Upgrade(upgraded) => {
            // Pingora saw the 101 answer an upgrade request: the socket is
            // the upgraded connection's from here on.
            return match session {
                ServerSession::H1(h1) if status == http::StatusCode::SWITCHING_PROTOCOLS => {
                    (Written::Upgraded(h1.into_inner(), upgraded), None)
                }
                _ => done("an upgrade outside HTTP/1.1", false),
            };
        }
        ResponseBody::Stream(source) if detach => {
            // A chunked head without a body is flushed when written.
            return match session {
                ServerSession::H1(h1) => (Written::Detached(h1.into_inner(), source), None),
                _ => done("not an HTTP/1 session", true),
            };
        }
        ResponseBody::Stream(mut source) => {
            // Watch the client while waiting for the next chunk: closing a
            // response stream is how a 2026-07-28 client cancels, and the
            // upstream must hear of it now, not at the next keep-alive.
            let mut watch = true;
            loop {
                let next = if watch {
                    tokio::select! {
                        chunk = source.next_chunk() => chunk,
                        idle = session.read_body_or_idle(true) => {
                            if idle.is_err() {
                                return done("stream ended: client closed it", true);
                            }
                            // Bytes of a pipelined request: stop watching.
                            watch = false;
                            continue;
                        }
                    }
                } else {
                    source.next_chunk().await
                };
                let Some(chunk) = next else { break };
                if session.write_response_body(chunk, false).await.is_err() {
                    return done("stream ended: client gone", true);
                }
                source.written();
            }
            if !bounded(async { session.finish_body().await.map(|_| ()) }).await {
                return done("client gone at the end of the stream", true);
            }
            "stream complete"
        }
    };
    let mut settings = HttpPersistentSettings::for_session(&session);
    // Boxed: Pingora's `finish` future is about 3.7 KB, and held inline it
    // made this future, and every one holding it, that much larger to move
    // on each request (issue 19; bench/RESULTS.md, scenario I).
    let reuse = match tokio::time::timeout(WRITE_TIMEOUT, Box::pin(session.finish())).await {
        Ok(Ok(Some(s))) => {
            let (stream, prefix) = s.into_parts();
            let prefix = prefix.filter(|p| !p.is_empty());
            let pipelined = prefix.is_some();
            if let Some(prefix) = prefix {
                settings.set_pipelined_prefix(prefix);
            }
            Some(Reuse {
                stream,
                settings,
                pipelined,
            })
        }
        _ => None,
    };
    (Written::Done(outcome, streamed), reuse)
}

/// Writes a detached stream's events as HTTP/1.1 chunks until the source
/// ends (then the closing chunk) or the client is gone. The connection is
/// not reused afterwards.
async fn pump(mut stream: Stream, mut source: Box<dyn ChunkSource>) -> Outcome {
    let mut frame = BytesMut::new();
    while let Some(chunk) = source.next_chunk().await {
        if chunk.is_empty() {
            continue;
        }
        frame.clear();
        // Writing into a BytesMut cannot fail.
        let _ = write!(frame, "{:x}\r\n", chunk.len());
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if !write_flush(&mut stream, &frame).await {
            return "stream ended: client gone";
        }
        source.written();
    }
    if write_flush(&mut stream, b"0\r\n\r\n").await {
        "stream complete"
    } else {
        "client gone at the end of the stream"
    }
}

/// True if `write` succeeded within [`WRITE_TIMEOUT`].
async fn bounded(write: impl Future<Output = pingora_core::Result<()>>) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
}

/// Writes and flushes within [`WRITE_TIMEOUT`]; false if the client is gone
/// or stalled.
async fn write_flush(stream: &mut Stream, data: &[u8]) -> bool {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
}

/// The admin listener's app.
pub struct AdminApp {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let headers = session.req_header().headers.clone();
        let limits = self.gateway.live().config.limits.clone();
        let response = match read_body(session, &limits).await {
            Ok(body) => crate::admin::handle(&self.gateway, &method, &path, &headers, body).await,
            Err(reject) => {
                session.set_keepalive(None);
                reject.into_response()
            }
        };
        let body = match response.body {
            ResponseBody::Full(b) => b.to_vec(),
            ResponseBody::Empty | ResponseBody::Stream(_) | ResponseBody::Upgrade(_) => Vec::new(),
        };
        let mut out = http::Response::new(Vec::new());
        *out.status_mut() = response.status;
        *out.headers_mut() = response.headers;
        if response.status != http::StatusCode::NO_CONTENT {
            out.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        *out.body_mut() = body;
        out
    }
}

/// Periodic chores, and the drain on shutdown.
pub struct Housekeeping {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Some(validator) = self.gateway.validator.clone() {
            tokio::spawn(async move { validator.warm_up().await });
        }
        let gateway = self.gateway.clone();
        tokio::spawn(async move { gateway.probe_eras().await });
        tokio::spawn(self.gateway.clone().watch_members());
        tokio::spawn(self.gateway.clone().watch_reloads());
        tokio::spawn(self.gateway.clone().watch_registrations());
        let ttl = self.gateway.live().config.sessions.idle_ttl;
        let period = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    tracing::info!("shutting down: closing streams so clients reconnect elsewhere");
                    self.gateway.set_draining();
                    // The process ends without dropping the exporter: what
                    // ends in the grace period is sent at its end.
                    if crate::telemetry::on() {
                        let grace = self.gateway.live().config.server.shutdown_grace;
                        std::thread::spawn(move || {
                            std::thread::sleep(grace);
                            crate::telemetry::flush();
                        });
                    }
                    return;
                }
                _ = tokio::time::sleep(period) => {
                    self.gateway.reap_idle().await;
                    self.gateway.probe_eras().await;
                    self.gateway.forget_full_budgets();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_plain_and_replaced_otherwise() {
        let keep = HeaderValue::from_static("abc-123_x.y");
        assert_eq!(request_id(Some(&keep)), "abc-123_x.y");
        let bad = HeaderValue::from_static("has space");
        let fresh = request_id(Some(&bad));
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, request_id(None));
    }
}
