//! The MCP endpoint over a WebSocket: `{org}/ws` and `{org}/{server}/ws`.
//!
//! One connection is one session. Each text frame is one JSON-RPC message
//! (or batch), both ways. Every message the client sends becomes a request
//! to the route's own `/mcp` endpoint through [`Gateway::handle`], so it
//! meets the same origin check, auth (the token given at the upgrade,
//! checked again on every message), limits, policies and era bridge as
//! Streamable HTTP. What comes back, one JSON body or the events of an SSE
//! answer, goes out as frames; so do the events of the session's standalone
//! stream, which the connection holds from `initialize` on.
//!
//! Resuming: the client reconnects with the session id (which the result
//! of `initialize` carries in `_meta["ratatosk/sessionId"]`) as
//! `Mcp-Session-Id` or `?session_id=`, and the last event id it saw (`Last-Event-ID`, or
//! `?last_event_id=`). Messages of the standalone stream (notifications,
//! the server's requests, published messages) carry their event id in
//! `params._meta["ratatosk/eventId"]` (`result._meta` for a response); the
//! events after it are sent again. The answer to a request that was in
//! flight when the connection broke is not: the client sends it again.
//!
//! Close codes: 1000 (the client closed, with 1000 or no code: the session
//! ends with it; with any other code it stays, to be resumed), 1001
//! (the gateway shuts down), 1002 (a protocol error), 1003 (a binary frame),
//! 1007 (text that is not UTF-8), 1009 (a message over
//! `websocket.max_message_bytes`), 1011 (the gateway failed), 4401 (the
//! token expired or was refused: reconnect with a fresh one and resume),
//! 4404 (the session ended), 4408 (no pong in time).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use ratatosk_auth::Identity;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as Frame, Utf8Bytes};
use tracing::Instrument;

use super::Gateway;
use crate::config::WebSocketConfig as Settings;
use crate::edge::{
    ChunkSource, LAST_EVENT_ID, Label, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, Reject, Request,
    Response, ResponseBody, Upgraded, UpgradedIo,
};
use crate::jsonrpc::{self, Id, code};
use crate::routes::{Endpoint, Front};

/// The subprotocol a client must offer, and the one the gateway answers.
pub const SUBPROTOCOL: &str = "mcp";

/// A subprotocol that carries the bearer token, for browsers (which cannot
/// set `Authorization` on a WebSocket): this prefix, then the token in
/// unpadded base64url. Accepted only with an allowed `Origin`; never echoed.
pub const BEARER_PROTOCOL: &str = "bearer.ratatosk.";

/// Where a message of the standalone stream carries its event id.
pub const EVENT_ID_META: &str = "ratatosk/eventId";

/// Where the result of `initialize` carries the session id, which the
/// client needs to resume.
pub const SESSION_ID_META: &str = "ratatosk/sessionId";

/// Close codes the gateway sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const NOT_UTF8: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const SESSION_GONE: u16 = 4404;
    pub const PONG_TIMEOUT: u16 = 4408;
}

/// How long the gateway waits, after its close frame, for a client that
/// was still sending to stop (its unread bytes would turn the close into a
/// reset that loses the close frame).
const LINGER: Duration = Duration::from_secs(2);

/// How long queuing the close frame may wait behind a stalled client.
const CLOSE_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a DELETE of the session may take when the client closed.
const END_TIMEOUT: Duration = Duration::from_secs(5);

/// The refusal of a request to `/ws` that is not a WebSocket upgrade.
pub(super) fn upgrade_required() -> Reject {
    Reject::new(
        StatusCode::UPGRADE_REQUIRED,
        code::BAD_REQUEST,
        "this endpoint is the MCP endpoint over a WebSocket: send GET with `Upgrade: websocket`, `Connection: Upgrade`, `Sec-WebSocket-Version: 13` and subprotocol `mcp`",
    )
    .with_header(header::UPGRADE, HeaderValue::from_static("websocket"))
}

/// What a client sent at the upgrade, checked.
#[derive(Debug, PartialEq, Eq)]
struct Handshake {
    /// `Sec-WebSocket-Key`.
    key: String,
    /// The token from a bearer subprotocol, as an `Authorization` value.
    bearer: Option<HeaderValue>,
}

fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the upgrade request (RFC 6455 section 4.2.1) and the subprotocols
/// it offers.
fn check_handshake(req: &Request, has_origin: bool) -> Result<Handshake, Reject> {
    if req.method != Method::GET {
        return Err(Reject::method_not_allowed(&req.method, "GET, OPTIONS"));
    }
    if !header_has_token(&req.headers, &header::UPGRADE, "websocket") {
        return Err(upgrade_required());
    }
    if !header_has_token(&req.headers, &header::CONNECTION, "upgrade") {
        return Err(Reject::bad_request(
            "a WebSocket upgrade needs `Connection: Upgrade`",
        ));
    }
    if req.header(&header::SEC_WEBSOCKET_VERSION).map(str::trim) != Some("13") {
        return Err(Reject::new(
            StatusCode::UPGRADE_REQUIRED,
            code::BAD_REQUEST,
            "the gateway speaks WebSocket version 13 only (`Sec-WebSocket-Version: 13`)",
        )
        .with_header(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
    }
    let key = req
        .header(&header::SEC_WEBSOCKET_KEY)
        .map(str::trim)
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|b| b.len() == 16)
        })
        .ok_or_else(|| Reject::bad_request("`Sec-WebSocket-Key` must be 16 bytes in base64"))?;
    let offered: Vec<&str> = req
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if !offered.contains(&SUBPROTOCOL) {
        return Err(Reject::bad_request(format!(
            "offer the subprotocol `{SUBPROTOCOL}` (`Sec-WebSocket-Protocol: {SUBPROTOCOL}`)"
        )));
    }
    let mut bearers = offered
        .iter()
        .filter_map(|p| p.strip_prefix(BEARER_PROTOCOL));
    let bearer = match (bearers.next(), bearers.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(Reject::bad_request(format!(
                "offer at most one `{BEARER_PROTOCOL}` subprotocol"
            )));
        }
        (Some(encoded), None) => {
            if req.headers.contains_key(header::AUTHORIZATION) {
                return Err(Reject::bad_request(format!(
                    "send the token either in `Authorization` or in a `{BEARER_PROTOCOL}` subprotocol, not both"
                )));
            }
            // A page's token may go only where its origin may go.
            if !has_origin {
                return Err(Reject::bad_request(format!(
                    "a `{BEARER_PROTOCOL}` subprotocol is for browsers and needs an allowed `Origin`; other clients send `Authorization`"
                )));
            }
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded)
                .ok()
                .and_then(|t| String::from_utf8(t).ok())
                .ok_or_else(|| {
                    Reject::bad_request(format!(
                        "the `{BEARER_PROTOCOL}` subprotocol must carry the token in unpadded base64url"
                    ))
                })?;
            Some(
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    Reject::bad_request("the token has characters a header cannot carry")
                })?,
            )
        }
    };
    Ok(Handshake {
        key: key.to_owned(),
        bearer,
    })
}

/// A header's value, or the query parameter a browser uses in its place.
fn header_or_query(req: &Request, name: &HeaderName, param: &str) -> Option<String> {
    req.header(name)
        .map(str::to_owned)
        .or_else(|| req.query_param(param))
}

impl Gateway {
    /// Answers an upgrade to `{org}/ws`: the handshake and the caller are
    /// checked, a resumed session's stream is attached, and the answer is
    /// 101 with what serves the connection.
    pub(super) async fn websocket_upgrade(
        self: &Arc<Self>,
        front: &Front,
        req: &Request,
        has_origin: bool,
    ) -> Result<Response, Reject> {
        let handshake = check_handshake(req, has_origin)?;
        let authorization = handshake
            .bearer
            .clone()
            .or_else(|| req.headers.get(header::AUTHORIZATION).cloned());
        let identity = {
            let mut authed = req.clone();
            if let Some(a) = &authorization {
                authed.headers.insert(header::AUTHORIZATION, a.clone());
            }
            self.authenticate(front, Endpoint::Ws, &authed).await?
        };
        let mcp_path = match req.path.strip_suffix("/ws") {
            Some(base) => format!("{base}/mcp"),
            None => return Err(upgrade_required()),
        };
        let (settings, max_message) = {
            let live = self.live();
            let settings = live.config.websocket.clone();
            let max = settings
                .max_message_bytes
                .unwrap_or(live.config.limits.max_body_bytes);
            (settings, max)
        };
        let mut conn = Connection {
            gateway: self.clone(),
            org: front.name.clone(),
            mcp_path,
            authorization,
            origin: req.headers.get(header::ORIGIN).cloned(),
            identity,
            request_id: req.request_id.clone(),
            numbered: 0,
            session: None,
            version: None,
            standalone: std::sync::Mutex::new(None),
            settings,
            max_message,
        };
        let session = header_or_query(req, &MCP_SESSION_ID, "session_id");
        let last_event_id = header_or_query(req, &LAST_EVENT_ID, "last_event_id");
        if last_event_id
            .as_deref()
            .is_some_and(|id| HeaderValue::from_str(id).is_err())
        {
            return Err(Reject::bad_request(
                "the last event id is not a valid header value",
            ));
        }
        match (session, last_event_id) {
            (None, Some(_)) => {
                return Err(Reject::bad_request(
                    "a last event id resumes a session: give its id too (`Mcp-Session-Id` or `?session_id=`)",
                ));
            }
            (None, None) => {}
            (Some(session), last_event_id) => {
                let session = HeaderValue::from_str(&session).map_err(|_| {
                    Reject::bad_request("the session id is not a valid header value")
                })?;
                conn.session = Some(session);
                // The session's stream, attached now: an unknown session
                // (or another user's) is refused before the upgrade.
                let get = conn.request(Method::GET, Bytes::new(), last_event_id.as_deref());
                let response = Box::pin(self.handle(get)).await;
                match response.body {
                    ResponseBody::Stream(source) if response.status == StatusCode::OK => {
                        conn.standalone = std::sync::Mutex::new(Some(source));
                    }
                    _ => return Ok(response),
                }
            }
        }
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(handshake.key.as_bytes());
        let mut r = Response::empty(StatusCode::SWITCHING_PROTOCOLS);
        r.headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r.headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        r.headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        if let Ok(v) = HeaderValue::from_str(&accept) {
            r.headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r.body = ResponseBody::Upgrade(Box::new(conn));
        Ok(r)
    }
}

/// One client connection, from the upgrade to its close.
struct Connection {
    gateway: Arc<Gateway>,
    org: Arc<str>,
    /// The route's `/mcp` path, which each message is sent to.
    mcp_path: String,
    /// The caller's token, as the `Authorization` of each message.
    authorization: Option<HeaderValue>,
    origin: Option<HeaderValue>,
    identity: Arc<Identity>,
    /// The upgrade's request id; each message's is this and a number.
    request_id: String,
    numbered: u64,
    /// Set by `initialize` (or the resumed session).
    session: Option<HeaderValue>,
    version: Option<HeaderValue>,
    /// The resumed session's stream, attached at the upgrade (in a mutex
    /// only to be `Sync`).
    standalone: std::sync::Mutex<Option<Box<dyn ChunkSource>>>,
    settings: Settings,
    /// `websocket.max_message_bytes`, or `limits.max_body_bytes`.
    max_message: usize,
}

/// What the writer sends.
enum Out {
    Text(Bytes),
    Ping,
    Close(u16, String),
    /// Answered once everything queued before it is written.
    Flushed(oneshot::Sender<()>),
}

/// Why the connection ends.
enum End {
    /// The gateway closes it with this code and reason.
    Close(u16, String),
    /// The client sent a close frame with this code (or none).
    ClientClosed(Option<u16>),
    /// The socket is gone (reset, or a write failed or stalled).
    Gone,
}

type Sink = SplitSink<WebSocketStream<Box<dyn UpgradedIo>>, Frame>;
type Frames = SplitStream<WebSocketStream<Box<dyn UpgradedIo>>>;

#[async_trait]
impl Upgraded for Connection {
    async fn run(mut self: Box<Self>, io: Box<dyn UpgradedIo>) {
        let settings = self.settings.clone();
        let config = WebSocketConfig::default()
            // Eager writes, and a small read buffer: an idle connection
            // should cost little (both grow for large messages).
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message));
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (sink, frames) = ws.split();
        let (out, queue) = mpsc::channel(settings.send_queue);
        let mut writer = tokio::spawn(write_frames(sink, queue, settings.send_timeout));
        let open = Open::new(
            self.gateway
                .metrics
                .websockets
                .with_label_values(&[&*self.org]),
        );
        let (end, frames) = self.serve(frames, &out, &mut writer).await;
        drop(open);
        // A client picks its close code: the label keeps a few (no new
        // series per code a client makes up).
        let code = match &end {
            End::Close(code, _) => code.to_string(),
            End::ClientClosed(Some(close::NORMAL)) => "client 1000".to_owned(),
            End::ClientClosed(Some(close::GOING_AWAY)) => "client 1001".to_owned(),
            End::ClientClosed(Some(_)) => "client other".to_owned(),
            End::ClientClosed(None) => "client".to_owned(),
            End::Gone => "gone".to_owned(),
        };
        self.gateway
            .metrics
            .websocket_closes
            .with_label_values(&[&*self.org, &code])
            .inc();
        match end {
            End::Close(code, reason) => {
                tracing::info!(code, reason, "closing the WebSocket");
                let queued =
                    tokio::time::timeout(CLOSE_QUEUE_TIMEOUT, out.send(Out::Close(code, reason)))
                        .await;
                drop(out);
                let sink = match queued {
                    Ok(Ok(())) => tokio::time::timeout(LINGER, &mut writer)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten(),
                    _ => None,
                };
                writer.abort();
                if let (Some(sink), Some(frames)) = (sink, frames)
                    && let Ok(ws) = sink.reunite(frames)
                {
                    linger(ws, unreadable(code)).await;
                }
            }
            End::ClientClosed(code) => {
                tracing::debug!(?code, "the client closed the WebSocket");
                // The reply to the client's close frame goes out with the
                // writer's last flush.
                drop(out);
                let _ = tokio::time::timeout(LINGER, &mut writer).await;
                writer.abort();
                // A deliberate close (1000, or no code at all) ends the
                // session; 1001 (a page left) and others keep it to resume.
                if matches!(code, None | Some(close::NORMAL)) {
                    self.end_session().await;
                }
            }
            End::Gone => {
                tracing::debug!("the WebSocket's client is gone");
                writer.abort();
            }
        }
    }
}

/// Writes queued frames until the queue closes, a close frame is written,
/// or a write fails or stalls; gives the sink back after a close frame.
async fn write_frames(
    mut sink: Sink,
    mut queue: mpsc::Receiver<Out>,
    send_timeout: Duration,
) -> Option<Sink> {
    while let Some(out) = queue.recv().await {
        let (frame, last) = match out {
            Out::Text(bytes) => match Utf8Bytes::try_from(bytes) {
                Ok(text) => (Frame::Text(text), false),
                Err(_) => {
                    tracing::warn!("a message to a WebSocket client is not UTF-8; dropped");
                    continue;
                }
            },
            Out::Ping => (Frame::Ping(Bytes::new()), false),
            Out::Flushed(done) => {
                let _ = done.send(());
                continue;
            }
            Out::Close(code, reason) => (
                Frame::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from(clip_reason(&reason)),
                })),
                true,
            ),
        };
        match tokio::time::timeout(send_timeout, sink.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("cannot write to the WebSocket: {e}");
                // After the client's close frame, sends fail; the reply to
                // it still goes out with a flush.
                let _ = tokio::time::timeout(CLOSE_QUEUE_TIMEOUT, sink.close()).await;
                return None;
            }
            Err(_) => {
                tracing::info!(
                    "a WebSocket client read nothing for {send_timeout:?} (websocket.send_timeout); dropping it"
                );
                return None;
            }
        }
        if last {
            return Some(sink);
        }
    }
    // The reader is done: flush what tungstenite still holds (the reply to
    // a client's close frame).
    let _ = tokio::time::timeout(send_timeout, sink.close()).await;
    None
}

/// A close reason fits in a control frame: 123 bytes.
fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Whether a close is for a frame that could not be read: the client may
/// still be sending it, and no further frame can be read.
fn unreadable(code: u16) -> bool {
    matches!(code, close::TOO_BIG | close::PROTOCOL | close::NOT_UTF8)
}

/// After the gateway's close frame: waits, up to [`LINGER`], for the
/// client's close frame (then the connection is dropped, which is the
/// server's part of the closing handshake); when frames cannot be read,
/// reads and drops bytes until the client stops, so that the close frame
/// is not lost to a reset.
async fn linger(mut ws: WebSocketStream<Box<dyn UpgradedIo>>, unreadable: bool) {
    let _ = tokio::time::timeout(LINGER, async {
        if unreadable {
            let io = ws.get_mut();
            let mut buf = [0u8; 8192];
            while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            while let Some(Ok(frame)) = ws.next().await {
                if matches!(frame, Frame::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

/// Counts an open connection in a gauge, and out when dropped (also when
/// the connection's future is dropped).
struct Open(prometheus::IntGauge);

impl Open {
    fn new(gauge: prometheus::IntGauge) -> Open {
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Connection {
    /// Reads frames and serves them until the connection ends; gives the
    /// frames back when a close frame can still be sent.
    async fn serve(
        &mut self,
        mut frames: Frames,
        out: &mpsc::Sender<Out>,
        writer: &mut tokio::task::JoinHandle<Option<Sink>>,
    ) -> (End, Option<Frames>) {
        let settings = self.settings.clone();
        let permits = Arc::new(Semaphore::new(settings.max_in_flight));
        // Requests run here; the standalone stream too. Dropped (aborted)
        // with the connection.
        let mut tasks = JoinSet::new();
        // A task that finds the connection must end says so here.
        let (ending, mut ended) = mpsc::channel::<End>(1);
        let resumed = self.standalone.get_mut().ok().and_then(Option::take);
        if let Some(source) = resumed {
            tasks.spawn(self.pump_standalone(source, out.clone(), ending.clone()));
        }
        // A ping is sent each interval once the last one was answered (by
        // any frame); one unanswered for `pong_timeout` closes.
        let mut pings = tokio::time::interval_at(
            Instant::now() + settings.ping_interval,
            settings.ping_interval,
        );
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pong_due = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(pong_due);
        let mut awaiting_pong = false;
        let end = loop {
            tokio::select! {
                // Frames the client already sent are read before a missing
                // pong is decided.
                biased;
                Some(end) = ended.recv() => break end,
                _ = &mut *writer => break End::Gone,
                frame = frames.next() => {
                    let frame = match frame {
                        None => break End::Gone,
                        Some(Err(e)) => break read_error(e, self.max_message),
                        Some(Ok(frame)) => frame,
                    };
                    awaiting_pong = false;
                    match frame {
                        Frame::Text(text) => {
                            if let Some(end) = self.receive(Bytes::from(text), out, &ending, &permits, &mut tasks).await {
                                break end;
                            }
                        }
                        Frame::Binary(_) => break End::Close(
                            close::UNSUPPORTED,
                            "binary frames are not MCP messages: send JSON-RPC in text frames".into(),
                        ),
                        Frame::Close(frame) => break End::ClientClosed(frame.map(|f| u16::from(f.code))),
                        Frame::Ping(_) | Frame::Pong(_) | Frame::Frame(_) => {}
                    }
                }
                // Finished requests leave the set.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = &mut pong_due, if awaiting_pong => {
                    break End::Close(close::PONG_TIMEOUT, format!(
                        "no answer to a ping within {:?} (websocket.pong_timeout)",
                        settings.pong_timeout
                    ));
                }
                _ = pings.tick(), if !awaiting_pong => {
                    // A full queue means the client reads nothing: its
                    // writes stall, and websocket.send_timeout applies.
                    if out.try_send(Out::Ping).is_ok() {
                        awaiting_pong = true;
                        pong_due.as_mut().reset(Instant::now() + settings.pong_timeout);
                    }
                }
            }
        };
        let frames = match end {
            End::Gone => None,
            _ => Some(frames),
        };
        (end, frames)
    }

    /// One text frame from the client. An `initialize`, and messages that
    /// are not requests (notifications, answers to the server's requests),
    /// are served in order before the next frame is read: none of them
    /// waits on the client. Requests run in tasks, at most
    /// `websocket.max_in_flight` at once; one more is refused at once
    /// (waiting for a slot would stop reading the answers that the running
    /// ones may be waiting for, such as an elicitation's).
    async fn receive(
        &mut self,
        text: Bytes,
        out: &mpsc::Sender<Out>,
        ending: &mpsc::Sender<End>,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
    ) -> Option<End> {
        let parsed = jsonrpc::parse_body(&text).ok();
        let messages = parsed.as_ref().map_or(&[][..], |b| b.messages());
        let initialize = messages
            .iter()
            .any(|m| m.method() == Some("initialize") && m.is_request());
        // The id an error without one is about: the one request sent.
        let asked = match messages {
            [only] => only.request_id().cloned(),
            _ => None,
        };
        if initialize && self.session.is_some() {
            let refusal = Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "this WebSocket already has a session: a new one needs a new connection",
            )
            .with_id(asked.as_ref());
            let _ = out.send(Out::Text(refusal.body())).await;
            return None;
        }
        let has_requests = messages.iter().any(|m| m.is_request());
        let mut req = self.request(Method::POST, text, None);
        if self.session.is_none()
            && let [only] = messages
            && let Some(method) = only.method()
            && let Some(Value::Object(params)) = only.params()
            && crate::era::looks_modern(&req.headers, Some(&Value::Object(params.clone())))
        {
            // A 2026-07-28 client: the headers its POST would carry.
            crate::era::put_modern_headers(&mut req.headers, method, &params);
        }
        let span = tracing::info_span!("message", id = %req.request_id);
        if initialize || !has_requests {
            let mut response = Box::pin(self.gateway.handle(req))
                .instrument(span.clone())
                .await;
            let session = response.headers.get(&MCP_SESSION_ID).cloned();
            let ok = response.status.is_success();
            if initialize
                && ok
                && let (Some(id), ResponseBody::Full(body)) = (&session, &response.body)
                && let Ok(id) = id.to_str()
            {
                response.body = ResponseBody::Full(with_meta(body, SESSION_ID_META, id));
            }
            let answer = self
                .answer(response, asked, out, ending)
                .instrument(span.clone())
                .await;
            if initialize && ok {
                if let Some(body) = answer {
                    self.version = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["result"]["protocolVersion"].as_str().map(str::to_owned))
                        .and_then(|v| HeaderValue::from_str(&v).ok());
                }
                if session.is_some() {
                    self.session = session;
                    self.open_standalone(out, ending, tasks)
                        .instrument(span)
                        .await;
                }
            }
            return None;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let max = self.settings.max_in_flight;
            let refusal = Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                code::BAD_REQUEST,
                format!("this WebSocket already has {max} requests running (websocket.max_in_flight); wait for their answers"),
            )
            .with_id(asked.as_ref());
            let _ = out.send(Out::Text(refusal.body())).await;
            return None;
        };
        let this = self.replier(out, ending);
        tasks.spawn(
            async move {
                let response = Box::pin(this.gateway.handle(req)).await;
                this.answer(response, asked).await;
                drop(permit);
            }
            .instrument(span),
        );
        None
    }

    /// What a request's task needs to answer it.
    fn replier(&self, out: &mpsc::Sender<Out>, ending: &mpsc::Sender<End>) -> Replier {
        Replier {
            gateway: self.gateway.clone(),
            org: self.org.clone(),
            session: self.session.is_some(),
            out: out.clone(),
            ending: ending.clone(),
        }
    }

    async fn answer(
        &self,
        response: Response,
        asked: Option<Id>,
        out: &mpsc::Sender<Out>,
        ending: &mpsc::Sender<End>,
    ) -> Option<Bytes> {
        self.replier(out, ending).answer(response, asked).await
    }

    /// The session's standalone stream, opened once `initialize` gave a
    /// session.
    async fn open_standalone(
        &mut self,
        out: &mpsc::Sender<Out>,
        ending: &mpsc::Sender<End>,
        tasks: &mut JoinSet<()>,
    ) {
        let get = self.request(Method::GET, Bytes::new(), None);
        let response = Box::pin(self.gateway.handle(get)).await;
        match response.body {
            ResponseBody::Stream(source) if response.status == StatusCode::OK => {
                tasks.spawn(self.pump_standalone(source, out.clone(), ending.clone()));
            }
            _ => tracing::info!(
                status = %response.status,
                "the session's standalone stream was refused; the WebSocket carries answers only"
            ),
        }
    }

    /// Sends the standalone stream's events, each with its event id, until
    /// the stream ends; then says why the connection ends.
    fn pump_standalone(
        &self,
        source: Box<dyn ChunkSource>,
        out: mpsc::Sender<Out>,
        ending: mpsc::Sender<End>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let gateway = self.gateway.clone();
        let expires = self.identity.expires_at;
        async move {
            if !pump(source, &out, true).await {
                return;
            }
            let end = if gateway.is_draining() {
                End::Close(
                    close::GOING_AWAY,
                    "the gateway is shutting down: reconnect and resume the session".into(),
                )
            } else if expires.is_some_and(|at| SystemTime::now() >= at) {
                End::Close(
                    close::UNAUTHORIZED,
                    "the token expired: reconnect with a fresh one and resume the session".into(),
                )
            } else {
                End::Close(
                    close::SESSION_GONE,
                    "the session's stream ended: the session ended, its user logged out, or another connection resumed it".into(),
                )
            };
            let _ = ending.try_send(end);
        }
    }

    /// A request to the route's `/mcp` endpoint, as this connection's
    /// client would send it.
    fn request(&mut self, method: Method, body: Bytes, last_event_id: Option<&str>) -> Request {
        let mut headers = if method == Method::POST {
            crate::upstream::json_rpc_headers(8)
        } else {
            let mut h = HeaderMap::with_capacity(8);
            h.insert(
                header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
            h
        };
        let known = [
            (header::AUTHORIZATION, &self.authorization),
            (header::ORIGIN, &self.origin),
            (MCP_SESSION_ID, &self.session),
            (MCP_PROTOCOL_VERSION, &self.version),
        ];
        for (name, value) in known {
            if let Some(v) = value {
                headers.insert(name, v.clone());
            }
        }
        if let Some(id) = last_event_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            headers.insert(LAST_EVENT_ID, id);
        }
        self.numbered += 1;
        Request {
            method,
            path: self.mcp_path.clone(),
            query: None,
            headers,
            body,
            request_id: format!("{}.{}", self.request_id, self.numbered),
            parsed: None,
        }
    }

    /// The client closed normally: its session ends with the connection.
    async fn end_session(&mut self) {
        if self.session.is_none() {
            return;
        }
        let delete = self.request(Method::DELETE, Bytes::new(), None);
        let _ = tokio::time::timeout(END_TIMEOUT, Box::pin(self.gateway.handle(delete))).await;
    }
}

/// Answers one message: what the gateway answered goes out as frames.
struct Replier {
    gateway: Arc<Gateway>,
    org: Arc<str>,
    /// Whether the connection had a session when the message came.
    session: bool,
    out: mpsc::Sender<Out>,
    ending: mpsc::Sender<End>,
}

impl Replier {
    /// Sends the answer; returns a JSON answer's body (for `initialize`).
    async fn answer(&self, response: Response, asked: Option<Id>) -> Option<Bytes> {
        let (out, ending) = (&self.out, &self.ending);
        let status = response.status;
        count(&self.gateway, &response.label, status, &self.org);
        match response.body {
            ResponseBody::Full(body) => {
                let body = if status.is_success() {
                    body
                } else {
                    with_id(body, asked.as_ref())
                };
                let _ = out.send(Out::Text(body.clone())).await;
                if let Some(end) = self.ends_connection(status, &body) {
                    let _ = ending.try_send(end);
                }
                Some(body)
            }
            ResponseBody::Stream(source) => {
                pump(source, out, false).await;
                None
            }
            ResponseBody::Empty | ResponseBody::Upgrade(_) => None,
        }
    }

    /// Whether a refusal means the connection cannot go on: the token is
    /// no longer taken, or the session is gone.
    fn ends_connection(&self, status: StatusCode, body: &Bytes) -> Option<End> {
        let message = || {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        match status {
            StatusCode::SERVICE_UNAVAILABLE if self.gateway.is_draining() => Some(End::Close(
                close::GOING_AWAY,
                "the gateway is shutting down: reconnect and resume the session".into(),
            )),
            StatusCode::UNAUTHORIZED => Some(End::Close(
                close::UNAUTHORIZED,
                format!("the token was refused: {}", message()),
            )),
            StatusCode::NOT_FOUND if self.session => Some(End::Close(
                close::SESSION_GONE,
                format!("the session is gone: {}", message()),
            )),
            _ => None,
        }
    }
}

/// A WebSocket message counts in `ratatosk_requests_total` as a POST does.
fn count(gateway: &Gateway, label: &Label, status: StatusCode, org: &str) {
    gateway
        .metrics
        .requests
        .with_label_values(&[
            label.org.as_deref().unwrap_or(org),
            label.method,
            status.as_str(),
        ])
        .inc();
}

/// An error without an id, about the one request the client sent, gets
/// that request's id: a WebSocket client has no HTTP exchange to match
/// it by.
fn with_id(body: Bytes, asked: Option<&Id>) -> Bytes {
    let Some(id) = asked else { return body };
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if v.get("error").is_some() && v.get("id").is_none_or(Value::is_null) {
        v["id"] = id.to_value();
        return Bytes::from(v.to_string());
    }
    body
}

/// Sends the messages of an SSE answer as frames; with `numbered`, each
/// carries its event id. False if the connection's writer is gone.
async fn pump(source: Box<dyn ChunkSource>, out: &mpsc::Sender<Out>, numbered: bool) -> bool {
    // A chunk counts as written when the parser asks for the next one: its
    // events are all queued by then. The standalone stream's are written
    // too (the writer says so): what counts as delivered is where a resume
    // without an event id starts.
    let flushes = numbered.then(|| out.clone());
    let chunks = futures::stream::unfold(
        (source, false, flushes),
        |(mut source, read, flushes)| async move {
            if read {
                if let Some(out) = &flushes {
                    let (done, flushed) = oneshot::channel();
                    out.send(Out::Flushed(done)).await.ok()?;
                    flushed.await.ok()?;
                }
                source.written();
            }
            let chunk = source.next_chunk().await?;
            Some((
                Ok::<_, std::convert::Infallible>(chunk),
                (source, true, flushes),
            ))
        },
    );
    let mut events = std::pin::pin!(chunks.eventsource());
    while let Some(event) = events.next().await {
        let Ok(event) = event else { break };
        // The priming event, and any other without data.
        if event.data.is_empty() {
            continue;
        }
        let text = if numbered && !event.id.is_empty() {
            with_meta(event.data.as_bytes(), EVENT_ID_META, &event.id)
        } else {
            Bytes::from(event.data)
        };
        if out.send(Out::Text(text)).await.is_err() {
            return false;
        }
    }
    true
}

/// A message with `key: value` added to its `_meta`: a request's or
/// notification's `params`, a response's `result`.
fn with_meta(data: &[u8], key: &str, value: &str) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return Bytes::copy_from_slice(data);
    };
    let holder = if v.get("method").is_some() {
        v.as_object_mut().map(|o| {
            o.entry("params")
                .or_insert_with(|| Value::Object(Default::default()))
        })
    } else {
        v.get_mut("result")
    };
    if let Some(Value::Object(holder)) = holder
        && let Value::Object(meta) = holder
            .entry("_meta")
            .or_insert_with(|| Value::Object(Default::default()))
    {
        meta.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    Bytes::from(v.to_string())
}

/// The close for a frame that could not be read; `Gone` when the socket
/// itself failed.
fn read_error(e: WsError, max: usize) -> End {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => End::Close(
            close::TOO_BIG,
            format!(
                "a message of {size} bytes is over the limit of {max} (websocket.max_message_bytes)"
            ),
        ),
        WsError::Capacity(_) => End::Close(
            close::TOO_BIG,
            format!("a message is over the limit of {max} bytes (websocket.max_message_bytes)"),
        ),
        WsError::Utf8(_) => End::Close(close::NOT_UTF8, "a text frame that is not UTF-8".into()),
        WsError::Protocol(p) => {
            End::Close(close::PROTOCOL, format!("WebSocket protocol error: {p}"))
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => End::Gone,
        other => {
            tracing::warn!("cannot read a WebSocket frame: {other}");
            End::Close(close::INTERNAL, "cannot read a frame".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::tests::{gateway, gateway_yaml, json_of, mcp_stub, request};
    use tokio::io::DuplexStream;

    type Client = WebSocketStream<DuplexStream>;

    const UPGRADE: &[(&str, &str)] = &[
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-protocol", "mcp"),
    ];

    async fn upgrade(gw: &Arc<Gateway>, extra: &[(&str, &str)]) -> Response {
        let mut headers = UPGRADE.to_vec();
        headers.extend_from_slice(extra);
        gw.handle(request(Method::GET, "/gw/org-1/ws", &headers, ""))
            .await
    }

    /// A client on a WebSocket the gateway accepted.
    async fn connect(gw: &Arc<Gateway>, extra: &[(&str, &str)]) -> Client {
        let r = upgrade(gw, extra).await;
        assert_eq!(r.status, StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455's own example key and answer.
        assert_eq!(
            r.headers[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(r.headers[header::SEC_WEBSOCKET_PROTOCOL], "mcp");
        let ResponseBody::Upgrade(upgraded) = r.body else {
            panic!("expected an upgrade")
        };
        let (server, client) = tokio::io::duplex(1 << 16);
        tokio::spawn(upgraded.run(Box::new(server)));
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    /// The next frame that is not a ping or pong, within 5 s.
    async fn next_frame(ws: &mut Client) -> Frame {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a frame within 5 s")
                .expect("the connection open")
                .expect("a readable frame");
            if !matches!(frame, Frame::Ping(_) | Frame::Pong(_)) {
                return frame;
            }
        }
    }

    async fn next_json(ws: &mut Client) -> Value {
        match next_frame(ws).await {
            Frame::Text(t) => serde_json::from_str(&t).expect("JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn send(ws: &mut Client, text: &str) {
        ws.send(Frame::text(text)).await.expect("sent");
    }

    async fn closed_with(ws: &mut Client) -> (u16, String) {
        match next_frame(ws).await {
            Frame::Close(Some(f)) => (u16::from(f.code), f.reason.to_string()),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Initializes; the session id, as the publish API knows it.
    async fn initialize(gw: &Arc<Gateway>, ws: &mut Client) -> String {
        send(ws, crate::gateway::tests::INIT).await;
        let init = next_json(ws).await;
        assert_eq!(init["id"], 1);
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
        let told = init["result"]["_meta"][SESSION_ID_META].clone();
        send(
            ws,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )
        .await;
        // The session's standalone stream is held once initialize is done.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let ids = gw.hub.sessions_with_readers();
            if let [only] = ids.as_slice() {
                assert_eq!(told, only.as_str());
                return only.clone();
            }
            assert!(Instant::now() < deadline, "no session in the hub: {ids:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_session_over_a_websocket_calls_and_gets_published_messages() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let mut ws = connect(&gw, &[]).await;
        let sid = initialize(&gw, &mut ws).await;
        send(
            &mut ws,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x","arguments":{},"_meta":{"progressToken":1}}}"#,
        )
        .await;
        let progress = next_json(&mut ws).await;
        assert_eq!(progress["method"], "notifications/progress");
        let result = next_json(&mut ws).await;
        assert_eq!(
            (result["id"].clone(), result["result"]["ok"].clone()),
            (2.into(), true.into())
        );
        let published = r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"hi"}}"#;
        let event = gw
            .publish(&sid, &Bytes::from(published))
            .await
            .expect("published");
        let got = next_json(&mut ws).await;
        assert_eq!(got["params"]["data"], "hi");
        assert_eq!(got["params"]["_meta"][EVENT_ID_META], event.to_string());
        // A malformed message gets a precise error, and the connection
        // stays.
        send(&mut ws, r#"{"jsonrpc":"2.0","id":3,"method":"#).await;
        let error = next_json(&mut ws).await;
        assert_eq!(error["error"]["code"], code::PARSE_ERROR, "{error}");
        send(&mut ws, r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#).await;
        assert_eq!(next_json(&mut ws).await["id"], 4);
        // A normal close ends the session.
        ws.close(None).await.expect("closed");
        let deadline = Instant::now() + Duration::from_secs(5);
        while gw.store.lookup(&sid).await.expect("store").is_some() {
            assert!(
                Instant::now() < deadline,
                "the session outlived its WebSocket"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn requests_over_max_in_flight_are_refused_without_blocking_the_connection() {
        let up = mcp_stub().await;
        let gw = gateway_yaml(&[up.url()], "", "websocket: {max_in_flight: 1}", "");
        let mut ws = connect(&gw, &[]).await;
        initialize(&gw, &mut ws).await;
        // Stays in flight (the stub does not answer it in the test's time).
        send(
            &mut ws,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x","arguments":{"v":"stub-hang:1"}}}"#,
        )
        .await;
        send(&mut ws, r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#).await;
        let refused = next_json(&mut ws).await;
        assert_eq!(refused["id"], 3, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("websocket.max_in_flight"), "{message}");
        // Frames are still read: the cancel reaches the call, which ends
        // and frees its slot.
        send(
            &mut ws,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}}"#,
        )
        .await;
        let cancelled = next_json(&mut ws).await;
        assert_eq!(cancelled["id"], 2, "{cancelled}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            send(&mut ws, r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#).await;
            let answer = next_json(&mut ws).await;
            if answer.get("result").is_some() {
                assert_eq!(answer["id"], 4);
                break;
            }
            assert!(Instant::now() < deadline, "no free slot: {answer}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A second initialize on the same connection is refused.
        send(&mut ws, crate::gateway::tests::INIT).await;
        let again = next_json(&mut ws).await;
        assert_eq!(again["error"]["code"], code::INVALID_REQUEST, "{again}");
    }

    #[tokio::test]
    async fn a_dropped_connection_resumes_from_its_last_event() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let mut ws = connect(&gw, &[]).await;
        let sid = initialize(&gw, &mut ws).await;
        let note = |n: u32| {
            Bytes::from(format!(
                r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"level":"info","data":{n}}}}}"#
            ))
        };
        gw.publish(&sid, &note(1)).await.expect("published");
        let first = next_json(&mut ws).await;
        let seen = first["params"]["_meta"][EVENT_ID_META]
            .as_str()
            .expect("an event id")
            .to_owned();
        // The socket breaks without a close frame: the session stays.
        drop(ws);
        for n in 2..=3 {
            // Published while no connection holds the stream.
            let deadline = Instant::now() + Duration::from_secs(5);
            while gw.publish(&sid, &note(n)).await.is_err() {
                assert!(Instant::now() < deadline, "cannot publish {n}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let query_less = [
            ("mcp-session-id", sid.as_str()),
            ("last-event-id", seen.as_str()),
        ];
        let mut ws = connect(&gw, &query_less).await;
        assert_eq!(next_json(&mut ws).await["params"]["data"], 2);
        assert_eq!(next_json(&mut ws).await["params"]["data"], 3);
        // Requests go on in the resumed session.
        send(&mut ws, r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#).await;
        assert_eq!(next_json(&mut ws).await["id"], 9);
        // An unknown session is refused before the upgrade.
        let r = upgrade(&gw, &[("mcp-session-id", "not-a-session")]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = upgrade(&gw, &[("last-event-id", seen.as_str())]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_and_a_binary_frame_close_the_connection() {
        let up = mcp_stub().await;
        let gw = gateway_yaml(&[up.url()], "", "websocket: {max_message_bytes: 2048}", "");
        let mut ws = connect(&gw, &[]).await;
        send(&mut ws, &format!(r#"{{"pad":"{}"}}"#, "x".repeat(4096))).await;
        let (code, reason) = closed_with(&mut ws).await;
        assert_eq!(code, close::TOO_BIG, "{reason}");
        assert!(reason.contains("limit of 2048"), "{reason}");
        let mut ws = connect(&gw, &[]).await;
        ws.send(Frame::binary(vec![1, 2, 3])).await.expect("sent");
        assert_eq!(closed_with(&mut ws).await.0, close::UNSUPPORTED);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_pinged_then_closed() {
        let up = mcp_stub().await;
        let gw = gateway_yaml(
            &[up.url()],
            "",
            "websocket: {ping_interval: 1s, pong_timeout: 1s}",
            "",
        );
        let r = upgrade(&gw, &[]).await;
        let ResponseBody::Upgrade(upgraded) = r.body else {
            panic!("expected an upgrade")
        };
        let (server, client) = tokio::io::duplex(1 << 16);
        tokio::spawn(upgraded.run(Box::new(server)));
        // A client that reads nothing until the gateway is done with it
        // (reading would answer the pings): what the gateway wrote is read
        // afterwards, from a second pipe that stays open for the pongs.
        let mut client = client;
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.expect("read");
        let (mut replay, reader) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut replay, &written)
            .await
            .expect("replayed");
        let mut ws = WebSocketStream::from_raw_socket(reader, Role::Client, None).await;
        let mut pings = 0;
        let code = loop {
            match ws.next().await.expect("open").expect("a frame") {
                Frame::Ping(_) => pings += 1,
                Frame::Close(Some(f)) => break u16::from(f.code),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(pings >= 1);
        assert_eq!(code, close::PONG_TIMEOUT);
    }

    // Paused time: it moves only when every task waits, so a loaded
    // machine cannot make the client late.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays_open() {
        let up = mcp_stub().await;
        let gw = gateway_yaml(
            &[up.url()],
            "",
            "websocket: {ping_interval: 100ms, pong_timeout: 200ms}",
            "",
        );
        let mut ws = connect(&gw, &[]).await;
        let mut pings = 0;
        let until = Instant::now() + Duration::from_secs(3);
        // Reading answers each ping (tungstenite queues the pong, and this
        // client's next send flushes it).
        while Instant::now() < until {
            if let Ok(frame) = tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                match frame.expect("open").expect("a frame") {
                    Frame::Ping(_) => pings += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            ws.flush().await.expect("flushed");
        }
        assert!(pings >= 5, "{pings} pings");
        send(&mut ws, r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).await;
        // No session yet: the gateway's answer is an error, on an open
        // connection.
        assert_eq!(next_json(&mut ws).await["id"], 1);
    }

    #[tokio::test]
    async fn handshakes_are_checked() {
        let up = mcp_stub().await;
        let gw = gateway(&[up.url()]);
        let plain = gw
            .handle(request(Method::GET, "/gw/org-1/ws", &[], ""))
            .await;
        assert_eq!(plain.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(plain.headers[header::UPGRADE], "websocket");
        let mut no_mcp = UPGRADE.to_vec();
        no_mcp.retain(|(k, _)| *k != "sec-websocket-protocol");
        no_mcp.push(("sec-websocket-protocol", "graphql-ws"));
        let r = gw
            .handle(request(Method::GET, "/gw/org-1/ws", &no_mcp, ""))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            json_of(&r)["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("`mcp`")
        );
        let mut old = UPGRADE.to_vec();
        old.retain(|(k, _)| *k != "sec-websocket-version");
        old.push(("sec-websocket-version", "8"));
        let r = gw
            .handle(request(Method::GET, "/gw/org-1/ws", &old, ""))
            .await;
        assert_eq!(r.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(r.headers[header::SEC_WEBSOCKET_VERSION], "13");
        // A bearer subprotocol is for browsers: without an Origin, refused.
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("tok");
        let offered = format!("mcp, {BEARER_PROTOCOL}{token}");
        let mut bearer = UPGRADE.to_vec();
        bearer.retain(|(k, _)| *k != "sec-websocket-protocol");
        bearer.push(("sec-websocket-protocol", &offered));
        let r = gw
            .handle(request(Method::GET, "/gw/org-1/ws", &bearer, ""))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        // An origin that is not allowed is refused before anything else.
        bearer.push(("origin", "http://evil.example"));
        let r = gw
            .handle(request(Method::GET, "/gw/org-1/ws", &bearer, ""))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn event_ids_go_in_meta() {
        let n = with_meta(br#"{"jsonrpc":"2.0","method":"x"}"#, EVENT_ID_META, "0.7");
        let v: Value = serde_json::from_slice(&n).expect("json");
        assert_eq!(v["params"]["_meta"][EVENT_ID_META], "0.7");
        let r = with_meta(
            br#"{"jsonrpc":"2.0","id":1,"result":{"_meta":{"a":1}}}"#,
            EVENT_ID_META,
            "0.8",
        );
        let v: Value = serde_json::from_slice(&r).expect("json");
        assert_eq!(
            (
                v["result"]["_meta"]["a"].clone(),
                v["result"]["_meta"][EVENT_ID_META].clone()
            ),
            (1.into(), "0.8".into())
        );
        let e = with_id(
            Bytes::from(r#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"m"}}"#),
            Id::from_value(&Value::from(5)).as_ref(),
        );
        let v: Value = serde_json::from_slice(&e).expect("json");
        assert_eq!(v["id"], 5);
        assert_eq!(clip_reason(&"é".repeat(100)).len(), 122);
    }
}
