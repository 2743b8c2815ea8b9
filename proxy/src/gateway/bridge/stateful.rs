//! Stateful 2025 upstreams (ARCHITECTURE.md, "Era bridge"): each gateway
//! session maps to a session of the upstream's own, pinned to the replica
//! that minted it. Requests, the client's notifications and its answers to
//! the upstream's requests all go there. When that session is lost (the
//! replica restarted and answers 404, or it cannot be reached), the gateway
//! opens a new one on a healthy replica with the client's original
//! `initialize` params and sends the message again: the client sees no
//! error.

use std::time::Duration;

use http::HeaderMap;
use tokio::sync::{Mutex, Notify};

use super::background::{Feed, Next, Opened};
use super::*;
use crate::edge::MCP_PROTOCOL_VERSION;
use crate::session::UpstreamSession;
use crate::upstream::{Answer, Outbound};

/// Longest wait for an upstream to confirm the end of one of its sessions.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most times one answer is resumed after its upstream closed the stream.
const MAX_RESUMES: u32 = 64;

/// What became of an answer that ended before its response.
pub(in crate::gateway) enum Reconnected {
    /// The reader goes on with the upstream's resumed stream.
    Yes,
    /// Not to be resumed: the upstream just ended it.
    No,
    /// The request was cancelled meanwhile.
    Cancelled,
    /// The resumption failed, for this reason.
    Failed(String),
}

/// Most attempts in a row that may fail to resume one answer: GETs that
/// fail, and resumptions that bring no new event.
const RESUME_ATTEMPTS: u32 = 3;

/// The wait before resuming an answer when the upstream named no `retry`,
/// and the shortest and longest `retry` honoured.
const DEFAULT_RESUME_WAIT: Duration = Duration::from_millis(500);
const MIN_RESUME_WAIT: Duration = Duration::from_millis(100);
const MAX_RESUME_WAIT: Duration = Duration::from_secs(5);

/// How far the resumptions of one answer are.
#[derive(Default)]
pub(in crate::gateway) struct Resumptions {
    /// Resumptions so far.
    count: u32,
    /// Attempts that failed in a row.
    failed: u32,
    /// The reader's event count when it was last resumed: none new since
    /// means that resumption brought nothing.
    events_then: Option<u64>,
}

/// Coordination around one gateway session's upstream session: one
/// re-initialization at a time, and a signal to the session's GET stream
/// follower that the upstream session changed.
#[derive(Default)]
pub(in crate::gateway) struct Rebinding {
    pub(in crate::gateway) lock: Mutex<()>,
    changed: Notify,
}

/// The [`Rebinding`] of each session that needed one, on this node.
#[derive(Default)]
pub(in crate::gateway) struct Rebinds(DashMap<String, Arc<Rebinding>>);

impl Rebinds {
    /// The coordination of a session's upstream session.
    pub(in crate::gateway) fn of(&self, session_id: &str) -> Arc<Rebinding> {
        self.0.entry(session_id.to_owned()).or_default().clone()
    }

    /// Forgets a session that ended.
    pub(in crate::gateway) fn forget(&self, session_id: &str) {
        self.0.remove(session_id);
    }
}

impl Gateway {
    /// Sends `initialize` (request `id`, `body`, whose params are
    /// `params`) upstream; returns the response to it and, when the
    /// upstream minted a session of its own, that session.
    pub(in crate::gateway) async fn handshake(
        &self,
        org: &OrgRoute,
        headers: Outbound,
        id: &Id,
        body: Bytes,
        params: Value,
    ) -> Result<(Bytes, Option<UpstreamSession>), Reject> {
        let answer = org
            .server
            .pool
            .send(headers, body)
            .await
            .map_err(|e| upstream_reject(e, Some(id)))?;
        let minted = answer
            .response
            .header(&MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let replica = answer.lease.url().to_owned();
        let mut reader = AnswerReader::new(answer, org.server.pool.read_limits);
        let Some(response) = reader
            .response_to(id)
            .await
            .map_err(|e| read_reject(e, Some(id)))?
        else {
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                code::UPSTREAM_ERROR,
                format!(
                    "upstream {} ended its answer to initialize without a response",
                    reader.replica()
                ),
            )
            .with_id(Some(id)));
        };
        let bound = match (minted, negotiated_version(&response)) {
            (Some(session), Some(version)) => Some(UpstreamSession {
                replica,
                id: session,
                protocol_version: version,
                initialize: params,
            }),
            _ => None,
        };
        Ok((response, bound))
    }

    /// Sends a message of `session` upstream: to any replica, or, when the
    /// session has an upstream session, to that session on its replica,
    /// opened again once if the upstream lost it.
    pub(in crate::gateway) async fn send_in_session(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: Outbound,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let Some(bound) = &session.upstream else {
            return org.server.pool.send(headers, body).await;
        };
        match send_bound(org, bound, Method::POST, headers.clone(), body.clone()).await {
            // Boxed, as rare paths on the request path are (issue 19): held
            // inline, a rare path's future makes every request's larger to
            // move.
            Err(e) if is_lost(&e) => {
                let fresh = Box::pin(self.rebind(org, &session.id, bound, &headers, &e)).await?;
                Box::pin(send_bound(org, &fresh, Method::POST, headers, body)).await
            }
            other => other,
        }
    }

    /// Replaces the lost upstream session `lost` of a gateway session:
    /// `initialize` with the client's params on a healthy replica, then
    /// `notifications/initialized` (and the session's log level), then the
    /// new session is recorded and the lost one closed. Concurrent callers wait for one
    /// re-initialization and share it.
    async fn rebind(
        &self,
        org: &OrgRoute,
        session_id: &str,
        lost: &UpstreamSession,
        headers: &Outbound,
        why: &UpstreamError,
    ) -> Result<UpstreamSession, UpstreamError> {
        let fail = |reason: String| UpstreamError::Failed {
            replica: org.name.to_string(),
            reason: format!("cannot open the upstream session again: {reason}"),
        };
        let coordination = self.bridges.rebinding.of(session_id);
        let _one = coordination.lock.lock().await;
        let current = self
            .store
            .lookup(session_id)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let Some(current) = current else {
            self.bridges.rebinding.forget(session_id);
            return Err(fail("the session ended".into()));
        };
        if let Some(up) = &current.upstream
            && up.id != lost.id
        {
            // Another request of the session already opened a new one.
            return Ok(up.clone());
        }
        tracing::warn!(org = %org.name, session = %short(session_id), error = %why,
            "the upstream lost the session; initializing it again on a healthy replica");
        let mut h = headers.clone();
        h.remove(&MCP_SESSION_ID);
        h.remove(&MCP_PROTOCOL_VERSION);
        let fresh = self
            .open_upstream(org, h.clone(), lost.initialize.clone())
            .await
            .map_err(|r| fail(r.message))?;
        if let Some(level) = &current.log_level {
            // The lost session's log level goes to the new one.
            let set = Id::from_value(&Value::from("ratatosk-set-level")).map(|id| {
                crate::era::request_body(Some(&id), "logging/setLevel", json!({"level": level}))
            });
            if let Some(body) = set
                && let Err(e) = send_bound(org, &fresh, Method::POST, h, body).await
            {
                tracing::warn!(org = %org.name, session = %short(session_id), error = %e,
                    "cannot set the log level of the new upstream session");
            }
        }
        let change = |s: &mut SessionState| {
            if s.upstream.as_ref().is_some_and(|u| u.id == lost.id) {
                s.upstream = Some(fresh.clone());
            }
        };
        let recorded = self
            .store
            .update(session_id, &change)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !recorded {
            // The session ended meanwhile: nobody will close this one.
            self.close_bound(&current, fresh);
            self.bridges.rebinding.forget(session_id);
            return Err(fail("the session ended".into()));
        }
        // Its replica may still hold it (it was only unreachable).
        self.close_bound(&current, lost.clone());
        coordination.changed.notify_one();
        org.metrics.bridged.reinitialized.inc();
        tracing::info!(org = %org.name, session = %short(session_id), replica = %fresh.replica,
            "upstream session opened again");
        Ok(fresh)
    }

    /// Opens an upstream session with `params` as the client's
    /// `initialize` params: `initialize`, then `notifications/initialized`.
    pub(in crate::gateway) async fn open_upstream(
        &self,
        org: &OrgRoute,
        headers: Outbound,
        params: Value,
    ) -> Result<UpstreamSession, Reject> {
        let fail = |why: String| {
            Reject::new(
                StatusCode::BAD_GATEWAY,
                code::UPSTREAM_ERROR,
                format!(
                    "cannot open a session with the upstream of org '{}': {why}",
                    org.name
                ),
            )
        };
        let id = Id::from_value(&Value::from("ratatosk-initialize"))
            .ok_or_else(|| fail("cannot build the initialize request".into()))?;
        let body = crate::era::request_body(Some(&id), "initialize", params.clone());
        let (response, bound) = self
            .handshake(org, headers.clone(), &id, body, params)
            .await?;
        let Some(bound) = bound else {
            return Err(fail(format!(
                "it answered initialize without a session: {}",
                String::from_utf8_lossy(&response)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        };
        let initialized = crate::era::request_body(None, "notifications/initialized", json!({}));
        if let Err(e) = send_bound(org, &bound, Method::POST, headers, initialized).await {
            let why = format!("notifications/initialized failed: {e}");
            return Err(fail(why));
        }
        Ok(bound)
    }

    /// An answer `reader` reads, relayed to `stream` of a session's log,
    /// ended before its response. If its upstream session (of `session`)
    /// closed it to be polled (it sent an event id), it is resumed: the
    /// reader goes on with the rest, at most [`MAX_RESUMES`] times, and
    /// [`RESUME_ATTEMPTS`] failed attempts in a row (`so_far` counts
    /// them). The client's connection to `stream` is let go first when the
    /// client can resume too (2025-11-25: it has the gateway's event ids),
    /// as the upstream did to the gateway.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::gateway) async fn resume_relay(
        &self,
        reader: &mut AnswerReader,
        org: &OrgRoute,
        session: Option<&SessionState>,
        log: &SessionLog,
        stream: StreamId,
        cancel: &CancellationToken,
        so_far: &mut Resumptions,
    ) -> Reconnected {
        let Some(session) = session.filter(|s| s.upstream.is_some()) else {
            return Reconnected::No;
        };
        let Some((last, retry)) = reader
            .resume_point()
            .map(|(id, retry)| (id.to_owned(), retry))
        else {
            return Reconnected::No;
        };
        if so_far.count >= MAX_RESUMES {
            return Reconnected::Failed(format!(
                "the upstream of org '{}' (replica {}) closed its answer {} times; giving up",
                org.name,
                reader.replica(),
                so_far.count
            ));
        }
        let events = reader.events_read();
        if so_far.events_then == Some(events) {
            // The last resumption's stream closed with nothing in it.
            so_far.failed += 1;
        } else {
            so_far.failed = 0;
        }
        so_far.count += 1;
        if edge::wants_priming(&session.protocol_version) {
            log.let_go(stream);
        }
        let deadline = reader.deadline();
        match self
            .resume_answer(
                org,
                session,
                &last,
                retry,
                deadline,
                cancel,
                &mut so_far.failed,
            )
            .await
        {
            Ok(Some(answer)) => {
                reader.continue_with(answer);
                so_far.events_then = Some(reader.events_read());
                Reconnected::Yes
            }
            Ok(None) => Reconnected::Cancelled,
            Err(why) => Reconnected::Failed(why),
        }
    }

    /// Resumes an answer the upstream session of `session` closed before
    /// its response (2025-11-25 polling: it sent an event id, and a
    /// `retry`): `GET` with `Last-Event-ID` after the upstream's `retry`
    /// (at least [`MIN_RESUME_WAIT`]), until [`RESUME_ATTEMPTS`] attempts
    /// failed in a row (`failed` counts them, and may start above 0), all
    /// before `deadline`. `Ok(None)` if the request was cancelled
    /// meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn resume_answer(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        last_event_id: &str,
        retry: Option<Duration>,
        deadline: std::time::Instant,
        cancel: &CancellationToken,
        failed: &mut u32,
    ) -> Result<Option<Answer>, String> {
        let Some(bound) = &session.upstream else {
            return Err(format!(
                "the session of org '{}' has no upstream session to resume from",
                org.name
            ));
        };
        let last = HeaderValue::from_str(last_event_id).map_err(|_| {
            format!(
                "the upstream of org '{}' closed its answer after an event id that cannot be sent back",
                org.name
            )
        })?;
        let wait = retry
            .unwrap_or(DEFAULT_RESUME_WAIT)
            .clamp(MIN_RESUME_WAIT, MAX_RESUME_WAIT);
        let mut why = String::from("its resumed streams brought nothing new");
        while *failed < RESUME_ATTEMPTS {
            if std::time::Instant::now() + wait >= deadline {
                return Err(format!(
                    "the upstream of org '{}' closed its answer and max_duration ends before it can be resumed",
                    org.name
                ));
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(wait) => {}
            }
            let mut headers = background_headers(org, session, "resume");
            headers.insert(LAST_EVENT_ID, last.clone());
            let answer = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(None),
                a = send_bound(org, bound, Method::GET, headers, Bytes::new()) => a,
            };
            match answer {
                Ok(answer) if answer.kind == AnswerKind::Sse => return Ok(Some(answer)),
                Ok(answer) => {
                    return Err(format!(
                        "the upstream of org '{}' (replica {}) answered the resumption of its answer with HTTP {} and no stream",
                        org.name,
                        answer.lease.replica(),
                        answer.status
                    ));
                }
                Err(e) if is_lost(&e) => {
                    return Err(format!(
                        "the upstream of org '{}' lost the session before its answer could be resumed: {e}",
                        org.name
                    ));
                }
                Err(e) => {
                    *failed += 1;
                    why = e.to_string();
                }
            }
        }
        Err(format!(
            "cannot resume the answer of the upstream of org '{}' after {RESUME_ATTEMPTS} failed attempts in a row: {why}",
            org.name
        ))
    }

    /// Hands a client notification, or its answer to an upstream request,
    /// to the session's upstream session. Nothing to wait for: failures
    /// are logged.
    pub(in crate::gateway) async fn pass_upstream(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: Outbound,
        message: &Message,
    ) {
        match self
            .send_in_session(org, session, headers, message.raw.clone())
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(org = %org.name, session = %short(&session.id), error = %e,
                    "cannot pass a client message to the upstream session");
            }
        }
    }

    /// Ends the upstream session of an ended gateway session (DELETE),
    /// in the background.
    pub(in crate::gateway) fn close_upstream(&self, state: &SessionState) {
        if let Some(bound) = state.upstream.clone() {
            self.close_bound(state, bound);
        }
    }

    /// Ends upstream session `bound` of `state`'s org in the background;
    /// failures are only logged, the upstream expires its sessions anyway.
    fn close_bound(&self, state: &SessionState, bound: UpstreamSession) {
        let Some(org) = self.live().routes.org(&state.org).cloned() else {
            return;
        };
        let headers = background_headers(&org, state, "close");
        tokio::spawn(async move {
            let sent = send_bound(&org, &bound, Method::DELETE, headers, Bytes::new());
            match tokio::time::timeout(CLOSE_TIMEOUT, sent).await {
                Ok(Ok(_)) | Ok(Err(UpstreamError::Failed { .. })) => {
                    tracing::debug!(org = %org.name, "upstream session closed");
                }
                Ok(Err(e)) => {
                    tracing::debug!(org = %org.name, error = %e, "cannot close the upstream session");
                }
                Err(_) => {
                    tracing::debug!(org = %org.name, "the upstream did not confirm closing its session in time");
                }
            }
        });
    }
}

/// One message to the upstream session `bound`, on its replica only.
pub(in crate::gateway) async fn send_bound(
    org: &OrgRoute,
    bound: &UpstreamSession,
    method: Method,
    mut headers: Outbound,
    body: Bytes,
) -> Result<Answer, UpstreamError> {
    if let Ok(v) = HeaderValue::from_str(&bound.id) {
        headers.insert(MCP_SESSION_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(&bound.protocol_version) {
        headers.insert(MCP_PROTOCOL_VERSION, v);
    }
    org.server
        .pool
        .send_to(&bound.replica, method, headers, body)
        .await
}

/// Whether the upstream session is gone: its replica answers 404 for it
/// (it restarted, or expired the session) or cannot be reached at all.
fn is_lost(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Status { status, .. } => *status == StatusCode::NOT_FOUND,
        UpstreamError::Unreachable { .. } => true,
        _ => false,
    }
}

/// Headers of the gateway's own messages for a session (its GET stream,
/// closing it): on behalf of the session's subject.
pub(in crate::gateway) fn background_headers(
    org: &OrgRoute,
    session: &SessionState,
    what: &str,
) -> Outbound {
    let mut caller = Identity::anonymous(&org.name);
    caller.subject.clone_from(&session.subject);
    let caller = std::sync::Arc::new(caller);
    upstream_headers(
        &Forwarding {
            session_id: &session.id,
            org: &org.name,
            identity: &caller,
            protocol_version: None,
            request_id: &format!("{what}-{}", short(&session.id)),
        },
        &HeaderMap::new(),
    )
}

/// A stateful upstream session's GET stream, for
/// [`Gateway::hold_background`]: its notifications and requests go on the
/// session's standalone stream (a hidden session's requests are answered
/// by the gateway); it follows the session to a new upstream session when
/// the old one is lost, and ends when the upstream has none to offer.
pub(in crate::gateway) struct Follow<'a> {
    pub(in crate::gateway) gw: &'a Gateway,
    pub(in crate::gateway) org: &'a OrgRoute,
    /// Taken once: a follower that outlives its session must not put the
    /// entry back.
    pub(in crate::gateway) coordination: Arc<Rebinding>,
    pub(in crate::gateway) phase: &'a tokio::sync::watch::Sender<background::Phase>,
}

#[async_trait]
impl Feed for Follow<'_> {
    const WHAT: &'static str = "GET stream";
    const PAUSE_ON_CHANGE: bool = true;

    async fn open(&mut self, session: &SessionState, stop: &CancellationToken) -> Opened {
        let (org, gw) = (self.org, self.gw);
        let Some(bound) = session.upstream.clone() else {
            return Opened::End;
        };
        let headers = background_headers(org, session, "follow");
        let answer = tokio::select! {
            a = send_bound(org, &bound, Method::GET, headers.clone(), Bytes::new()) => a,
            _ = stop.cancelled() => return Opened::End,
        };
        match answer {
            Ok(answer) if answer.kind == AnswerKind::Sse => {
                self.phase.send_replace(background::Phase::Open);
                Opened::Reading(AnswerReader::new(answer, background::listen_limits(org)))
            }
            Ok(answer) => {
                tracing::info!(org = %org.name, status = %answer.status,
                    "the upstream session's GET did not open a stream; not following it");
                self.phase.send_replace(background::Phase::Unavailable);
                Opened::End
            }
            Err(UpstreamError::Status { status, .. })
                if status == StatusCode::METHOD_NOT_ALLOWED =>
            {
                self.phase.send_replace(background::Phase::Unavailable);
                Opened::End
            }
            Err(e) if is_lost(&e) => {
                match gw.rebind(org, &session.id, &bound, &headers, &e).await {
                    Ok(_) => Opened::Again,
                    Err(e) => {
                        tracing::warn!(org = %org.name, session = %short(&session.id), error = %e,
                        "cannot open the upstream session again; retrying");
                        Opened::Retry
                    }
                }
            }
            Err(e) => {
                tracing::warn!(org = %org.name, session = %short(&session.id), error = %e,
                    "cannot open the upstream session's GET stream; retrying");
                Opened::Retry
            }
        }
    }

    fn on_message(&mut self, session: &SessionState, message: &Bytes) -> Next {
        if session.transport == Transport::Hidden
            && self.gw.answer_on_hidden_stream(session, message)
        {
            Next::Handled
        } else {
            Next::Pass
        }
    }

    async fn changed(&self) {
        // A request re-initialized the session: follow the new one.
        self.coordination.changed.notified().await;
    }

    fn session_gone(&self, session_id: &str) {
        self.gw.bridges.rebinding.forget(session_id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::modern::tests::{drain, gateway};
    use super::*;
    use crate::edge::Request;
    use crate::testing;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stateful upstream whose `tools/call` sends a priming event (id
    /// `e1`, `retry: retry_ms`) and closes the stream; a `GET` with
    /// `Last-Event-ID: e1` gets `resumed` (the response, or nothing). Counts
    /// those resumptions.
    async fn polling_stub(retry_ms: u32, resumed: String) -> (testing::Stub, Arc<AtomicUsize>) {
        let gets = Arc::new(AtomicUsize::new(0));
        let count = gets.clone();
        let stub = testing::full_stub(move |head, body| {
            let reply = testing::Reply::new;
            if head.starts_with("get ") {
                if !head.contains("last-event-id: e1") {
                    return reply(405, "text/plain", String::new());
                }
                count.fetch_add(1, Ordering::SeqCst);
                return reply(200, "text/event-stream", resumed.clone());
            }
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            match v["method"].as_str() {
                Some("initialize") => {
                    let mut r = reply(
                        200,
                        "application/json",
                        json!({"jsonrpc": "2.0", "id": id, "result": {
                        "protocolVersion": v["params"]["protocolVersion"], "capabilities": {},
                        "serverInfo": {"name": "polling", "version": "1"}}})
                        .to_string(),
                    );
                    r.headers.push(("mcp-session-id".into(), "up-1".into()));
                    r
                }
                Some("tools/call") => reply(
                    200,
                    "text/event-stream",
                    format!("id: e1\nretry: {retry_ms}\ndata: \n\n"),
                ),
                _ => reply(202, "application/json", String::new()),
            }
        })
        .await;
        (stub, gets)
    }

    /// [`polling_stub`] whose resumption brings the response to call 7.
    async fn polling_upstream() -> (testing::Stub, Arc<AtomicUsize>) {
        let result = json!({"jsonrpc": "2.0", "id": 7, "result": {"content": []}});
        polling_stub(50, format!("id: e2\nevent: message\ndata: {result}\n\n")).await
    }

    fn post(body: &str, version: &str, sid: Option<&str>) -> Request {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", version),
        ];
        if let Some(sid) = sid {
            headers.push(("mcp-session-id", sid));
        }
        testing::request(Method::POST, "/gw/org-1/mcp", &headers, body.to_owned())
    }

    async fn session(gw: &Arc<Gateway>, version: &str) -> String {
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "unit", "version": "1"}}});
        let r = gw.handle(post(&init.to_string(), version, None)).await;
        r.headers
            .get(&MCP_SESSION_ID)
            .expect("a session")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"test_reconnection","arguments":{}}}"#;

    #[tokio::test]
    async fn a_stream_the_upstream_closes_is_closed_too_and_resumed_from_the_gateway() {
        let (up, resumed) = polling_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let sid = session(&gw, "2025-11-25").await;
        let mut r = gw.handle(post(CALL, "2025-11-25", Some(&sid))).await;
        let first = drain(&mut r).await;
        assert!(
            first.contains("retry: "),
            "the gateway's priming event: {first}"
        );
        assert!(
            !first.contains("result"),
            "closed before the response, as the upstream did: {first}"
        );
        let last = first
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .next_back()
            .expect("an event id")
            .to_owned();
        let mut again = gw
            .handle(Request {
                method: Method::GET,
                headers: testing::headers(&[
                    ("accept", "text/event-stream"),
                    ("mcp-session-id", &sid),
                    ("last-event-id", &last),
                ]),
                ..post("", "2025-11-25", None)
            })
            .await;
        assert_eq!(again.status, StatusCode::OK);
        let rest = drain(&mut again).await;
        assert!(
            rest.contains(r#""id":7"#) && rest.contains("result"),
            "{rest}"
        );
        assert_eq!(
            resumed.load(Ordering::SeqCst),
            1,
            "one GET with Last-Event-ID upstream"
        );
    }

    #[tokio::test]
    async fn resumptions_that_bring_nothing_stop_after_a_few_paced_attempts() {
        // `retry: 0`, and each resumption closes at once with no event.
        let (up, gets) = polling_stub(0, String::new()).await;
        let gw = gateway("stateful-2025", &up.url());
        let sid = session(&gw, "2025-06-18").await;
        let started = std::time::Instant::now();
        let mut r = gw.handle(post(CALL, "2025-06-18", Some(&sid))).await;
        let text = drain(&mut r).await;
        assert!(
            text.contains("-32002") && text.contains("org 'org-1'"),
            "{text}"
        );
        let asked = gets.load(Ordering::SeqCst);
        assert_eq!(
            asked, RESUME_ATTEMPTS as usize,
            "three fruitless resumptions, not {MAX_RESUMES}"
        );
        assert!(
            started.elapsed() >= MIN_RESUME_WAIT * RESUME_ATTEMPTS,
            "paced: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_client_without_priming_events_gets_the_resumed_answer_on_its_stream() {
        let (up, resumed) = polling_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let sid = session(&gw, "2025-06-18").await;
        let mut r = gw.handle(post(CALL, "2025-06-18", Some(&sid))).await;
        let text = drain(&mut r).await;
        assert!(
            text.contains(r#""id":7"#) && text.contains("result"),
            "{text}"
        );
        assert!(!text.contains("-32002"), "{text}");
        assert_eq!(resumed.load(Ordering::SeqCst), 1);
    }

    mod lost {
        //! A legacy client's session whose upstream session is lost.

        use super::*;
        use crate::gateway::tests::{SECRET, initialize, json_of, post};
        use crate::session::MemorySessionStore;
        use std::path::Path;
        use std::sync::atomic::AtomicU64;

        /// A stateful upstream whose sessions can all be forgotten at once (a
        /// restart); it records (session, method) of every message.
        struct StatefulStub {
            stub: testing::Stub,
            generation: Arc<AtomicU64>,
            seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
        }

        async fn stateful_stub() -> StatefulStub {
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
        async fn a_lost_upstream_session_is_opened_again_with_the_clients_params_and_level() {
            let up = stateful_stub().await;
            let yaml = format!(
                "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
                 publish: {{secret: {SECRET}}}\n\
                 orgs:\n  org-1: {{upstream: {{era: stateful-2025, replicas: [\"{}\"], timeout: 2s}}}}\n",
                up.stub.url()
            );
            let config =
                Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
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
                gw.live()
                    .routes
                    .org("org-1")
                    .expect("org")
                    .metrics
                    .bridged
                    .reinitialized
                    .get(),
                1
            );
        }
    }

    mod flows {
        //! A legacy client's session with a stateful upstream: calls in
        //! the upstream session, errors, cancellation and the GET stream.

        use super::*;
        use crate::edge::ResponseBody;
        use crate::gateway::bridge::hidden::tests::{asking_upstream, event};
        use crate::gateway::bridge::modern::tests::gateway;
        use crate::gateway::tests::{initialize, open_stream, text_until};

        fn send(sid: &str, body: Value) -> Request {
            crate::gateway::tests::post(
                &body.to_string(),
                &[
                    ("mcp-session-id", sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            )
        }

        fn call(id: u64, tool: &str) -> Value {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": tool, "arguments": {}}})
        }

        /// What a response says, whole or streamed.
        async fn said(mut r: Response) -> String {
            match &r.body {
                ResponseBody::Full(b) => String::from_utf8_lossy(b).into_owned(),
                _ => drain(&mut r).await,
            }
        }

        #[tokio::test]
        async fn a_call_goes_in_the_upstream_session_the_client_never_sees() {
            let (up, seen) = asking_upstream().await;
            let gw = gateway("stateful-2025", &up.url());
            let sid = initialize(&gw).await;
            assert!(!sid.contains("up-"), "the gateway's own id: {sid}");
            let r = gw.handle(send(&sid, call(5, "echo"))).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                r.headers
                    .get(&MCP_SESSION_ID)
                    .is_none_or(|v| v.as_bytes() == sid.as_bytes()),
                "{:?}",
                r.headers
            );
            let text = said(r).await;
            assert!(
                text.contains(r#""id":5"#) && text.contains(r#""text":"ok""#),
                "{text}"
            );
            let seen = seen.lock().expect("seen");
            assert_eq!(seen.inits, 1);
            assert!(
                seen.messages.iter().any(|m| m["method"] == "tools/call"),
                "the call reached the upstream in its session (others get 404)"
            );
        }

        #[tokio::test]
        async fn an_upstream_error_is_passed_on_under_the_clients_id() {
            let (up, _seen) = asking_upstream().await;
            let gw = gateway("stateful-2025", &up.url());
            let sid = initialize(&gw).await;
            let text = said(gw.handle(send(&sid, call(6, "fail"))).await).await;
            assert!(
                text.contains(r#""id":6"#) && text.contains("-32603") && text.contains("boom"),
                "{text}"
            );
        }

        #[tokio::test]
        async fn a_clients_cancellation_reaches_the_upstream_call() {
            let (up, seen) = asking_upstream().await;
            let gw = gateway("stateful-2025", &up.url());
            let sid = initialize(&gw).await;
            let mut r = gw.handle(send(&sid, call(7, "hang"))).await;
            // A priming event may come first.
            text_until(&mut r, "notifications/progress").await;
            let upstream_call = seen.lock().expect("seen").messages.iter().find_map(|m| {
                (m.pointer("/params/name") == Some(&json!("hang"))).then(|| m["id"].clone())
            });
            let upstream_call = upstream_call.expect("the call reached the upstream");
            let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                "params": {"requestId": 7, "reason": "enough"}});
            let accepted = gw.handle(send(&sid, cancel)).await;
            assert_eq!(accepted.status, StatusCode::ACCEPTED);
            let told = testing::eventually(Duration::from_secs(5), || {
                let seen = seen.clone();
                let call = upstream_call.clone();
                async move {
                    seen.lock().expect("seen").messages.iter().any(|m| {
                        m["method"] == "notifications/cancelled" && m["params"]["requestId"] == call
                    })
                }
            })
            .await;
            assert!(told, "the upstream hears of it, under its own id");
        }

        #[tokio::test]
        async fn the_upstream_sessions_get_stream_feeds_the_clients() {
            let (up, seen) = asking_upstream().await;
            let gw = gateway("stateful-2025", &up.url());
            let sid = initialize(&gw).await;
            let mut stream = open_stream(&gw, &sid).await;
            assert_eq!(stream.status, StatusCode::OK);
            let followed = testing::eventually(Duration::from_secs(5), || {
                let seen = seen.clone();
                async move { !seen.lock().expect("seen").gets.is_empty() }
            })
            .await;
            assert!(
                followed,
                "the gateway opens the upstream session's GET stream"
            );
            let changed = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
            let tx = seen.lock().expect("seen").gets[0].clone();
            tx.send(event(changed)).expect("the GET stream is open");
            text_until(&mut stream, "notifications/tools/list_changed").await;
        }
    }
}
