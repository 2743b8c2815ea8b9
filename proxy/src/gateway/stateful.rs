//! Stateful 2025 upstreams (ARCHITECTURE.md, "Era bridge"): each gateway
//! session maps to a session of the upstream's own, pinned to the replica
//! that minted it. Requests, the client's notifications and its answers to
//! the upstream's requests all go there. When that session is lost (the
//! replica restarted and answers 404, or it cannot be reached), the gateway
//! opens a new one on a healthy replica with the client's original
//! `initialize` params and sends the message again: the client sees no
//! error.

use std::time::{Duration, Instant};

use http::HeaderMap;
use serde_json::Map;

use super::*;
use crate::edge::MCP_PROTOCOL_VERSION;
use crate::session::UpstreamSession;
use crate::upstream::Answer;

/// Longest wait for an upstream to confirm the end of one of its sessions.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause between two attempts to reopen an upstream GET stream.
const MAX_FOLLOW_BACKOFF: Duration = Duration::from_secs(5);

impl Gateway {
    /// Sends `initialize` upstream; returns the response to it and, when
    /// the upstream minted a session of its own, that session.
    pub(super) async fn handshake(
        &self,
        org: &OrgRoute,
        headers: HeaderMap,
        init: &Message,
    ) -> Result<(Bytes, Option<UpstreamSession>), Reject> {
        let id = init.request_id();
        let answer = org
            .pool
            .send(headers, init.raw.clone())
            .await
            .map_err(|e| upstream_reject(e, id))?;
        let minted = answer
            .response
            .headers()
            .get(&MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let replica = answer.lease.url().to_owned();
        let mut reader = AnswerReader::new(answer, org.pool.read_limits);
        let response = loop {
            match reader.next_message().await {
                Ok(Some(message)) => {
                    if let Ok(parsed) = jsonrpc::parse_message(&message)
                        && matches!(&parsed.kind, Kind::Response { id: rid } if Some(rid) == id)
                    {
                        break message;
                    }
                }
                Ok(None) => {
                    return Err(Reject::new(
                        StatusCode::BAD_GATEWAY,
                        code::UPSTREAM_ERROR,
                        format!(
                            "upstream {} ended its answer to initialize without a response",
                            reader.replica()
                        ),
                    )
                    .with_id(id));
                }
                Err(e) => return Err(read_reject(e, id)),
            }
        };
        let bound = match (minted, negotiated_version(&response)) {
            (Some(session), Some(version)) => Some(UpstreamSession {
                replica,
                id: session,
                protocol_version: version,
                initialize: init.params().unwrap_or(Value::Null),
            }),
            _ => None,
        };
        Ok((response, bound))
    }

    /// Sends a message of `session` upstream: to any replica, or, when the
    /// session has an upstream session, to that session on its replica,
    /// opened again once if the upstream lost it.
    pub(super) async fn send_in_session(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let Some(bound) = &session.upstream else {
            return org.pool.send(headers, body).await;
        };
        match send_bound(org, bound, Method::POST, headers.clone(), body.clone()).await {
            Err(e) if is_lost(&e) => {
                let fresh = self.rebind(org, &session.id, bound, &headers, &e).await?;
                send_bound(org, &fresh, Method::POST, headers, body).await
            }
            other => other,
        }
    }

    /// Replaces the lost upstream session `lost` of a gateway session:
    /// `initialize` with the client's params on a healthy replica, then
    /// `notifications/initialized`, then the new session is recorded.
    /// Concurrent callers wait for one re-initialization and share it.
    async fn rebind(
        &self,
        org: &OrgRoute,
        session_id: &str,
        lost: &UpstreamSession,
        headers: &HeaderMap,
        why: &UpstreamError,
    ) -> Result<UpstreamSession, UpstreamError> {
        let fail = |reason: String| UpstreamError::Failed {
            replica: org.name.to_string(),
            reason: format!("cannot open the upstream session again: {reason}"),
        };
        let lock = self
            .rebinding
            .entry(session_id.to_owned())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let current = self
            .store
            .lookup(session_id)
            .await
            .map_err(|e| fail(e.to_string()))?
            .ok_or_else(|| fail("the session ended".into()))?;
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
        let replay = Id::from_value(&Value::from("ratatosk-reinitialize"))
            .map(|id| crate::era::request_body(Some(&id), "initialize", lost.initialize.clone()))
            .and_then(|body| jsonrpc::parse_message(&body).ok())
            .ok_or_else(|| fail("cannot build the initialize request".into()))?;
        let (response, fresh) = self
            .handshake(org, h.clone(), &replay)
            .await
            .map_err(|r| fail(r.message))?;
        let Some(fresh) = fresh else {
            return Err(fail(format!(
                "the upstream answered initialize without a session: {}",
                String::from_utf8_lossy(&response)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        };
        let initialized = crate::era::request_body(None, "notifications/initialized", json!({}));
        if let Err(e) = send_bound(org, &fresh, Method::POST, h, initialized).await {
            return Err(fail(format!("notifications/initialized failed: {e}")));
        }
        let mut updated = (*current).clone();
        updated.upstream = Some(fresh.clone());
        self.store
            .replace(updated)
            .await
            .map_err(|e| fail(e.to_string()))?;
        org.metrics.bridged.reinitialized.inc();
        tracing::info!(org = %org.name, session = %short(session_id), replica = %fresh.replica,
            "upstream session opened again");
        Ok(fresh)
    }

    /// Hands a client notification, or its answer to an upstream request,
    /// to the session's upstream session. Nothing to wait for: failures
    /// are logged.
    pub(super) async fn pass_upstream(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: HeaderMap,
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

    /// Holds the upstream session's GET stream, whose notifications and
    /// requests go on the session's standalone stream; reopened with
    /// backoff, and on a new upstream session when the old one is lost.
    /// Ends with the gateway session, or when the upstream has no GET
    /// stream to offer (405).
    pub(super) async fn follow(
        &self,
        org: &OrgRoute,
        session_id: &str,
        log: &SessionLog,
        stop: &CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = match self.store.lookup(session_id).await {
                Ok(Some(s)) => s,
                _ => return,
            };
            let Some(bound) = session.upstream.clone() else {
                return;
            };
            let headers = background_headers(org, &session, "follow");
            let answer = tokio::select! {
                a = send_bound(org, &bound, Method::GET, headers.clone(), Bytes::new()) => a,
                _ = stop.cancelled() => return,
            };
            match answer {
                Ok(answer) if answer.kind == AnswerKind::Sse => {
                    let mut reader = AnswerReader::new(answer, modern::LISTEN_LIMITS);
                    loop {
                        let next = tokio::select! {
                            n = reader.next_message() => n,
                            _ = stop.cancelled() => return,
                        };
                        let Ok(Some(message)) = next else { break };
                        backoff = Duration::from_millis(100);
                        if self.append(log, STANDALONE, &message, org).is_err() {
                            return;
                        }
                    }
                }
                Ok(answer) => {
                    tracing::info!(org = %org.name, status = %answer.status,
                        "the upstream session's GET did not open a stream; not following it");
                    return;
                }
                Err(UpstreamError::Status { status, .. })
                    if status == StatusCode::METHOD_NOT_ALLOWED =>
                {
                    return;
                }
                Err(e) if is_lost(&e) => {
                    if let Err(e) = self.rebind(org, session_id, &bound, &headers, &e).await {
                        tracing::warn!(org = %org.name, session = %short(session_id), error = %e,
                            "cannot open the upstream session again; retrying");
                    } else {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(org = %org.name, session = %short(session_id), error = %e,
                        "cannot open the upstream session's GET stream; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_FOLLOW_BACKOFF);
        }
    }

    /// Ends the upstream session of an ended gateway session (DELETE),
    /// in the background; failures are only logged, the upstream expires
    /// its sessions anyway.
    pub(super) fn close_upstream(&self, state: &SessionState) {
        let Some(bound) = state.upstream.clone() else {
            return;
        };
        let Some(org) = self.routes.org(&state.org).cloned() else {
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

// ----- 2026-07-28 clients of a stateful upstream ----------------------------

/// The key of the one input request of an `InputRequiredResult` the
/// gateway makes from an upstream's request.
const INPUT_KEY: &str = "upstream";

/// Upstream calls waiting for a modern client's input, by `requestState`.
pub(super) type ParkedMap = DashMap<String, Parked>;

/// An upstream call that asked the client something: its answer stream,
/// held until the client calls again with the answer.
pub(super) struct Parked {
    /// In a mutex only to make the map `Sync`: it is moved, never shared.
    reader: std::sync::Mutex<AnswerReader>,
    /// The hidden session the call runs in.
    session: Arc<SessionState>,
    /// The id of the upstream's request, which the answer must carry.
    upstream_id: Value,
    /// The id of the parked call, which its response will carry.
    call: Id,
    expires: Instant,
}

/// Where a modern client's upstream call parks when the upstream asks the
/// client something.
pub(super) struct Park {
    map: Arc<ParkedMap>,
    session: Arc<SessionState>,
    wait: Duration,
}

impl Park {
    /// Parks `reader` and returns the `InputRequiredResult` that hands the
    /// upstream's `request` to the client, with an unguessable
    /// `requestState` naming the parked call.
    pub(super) fn park(
        self,
        reader: AnswerReader,
        call: Id,
        client_id: &Id,
        request: &[u8],
    ) -> Bytes {
        let request: Value = serde_json::from_slice(request).unwrap_or(Value::Null);
        let state = session::mint_id();
        let input = json!({
            "method": request.get("method").cloned().unwrap_or(Value::Null),
            "params": request.get("params").cloned().unwrap_or_else(|| json!({})),
        });
        self.map.insert(
            state.clone(),
            Parked {
                reader: std::sync::Mutex::new(reader),
                session: self.session,
                upstream_id: request.get("id").cloned().unwrap_or(Value::Null),
                call,
                expires: Instant::now() + self.wait,
            },
        );
        jsonrpc::result_body(
            Some(client_id),
            json!({
                "resultType": "input_required",
                "inputRequests": {INPUT_KEY: input},
                "requestState": state,
            }),
        )
    }
}

impl Gateway {
    /// A 2026-07-28 client's request to a stateful upstream. It runs in
    /// the client's hidden upstream session (one per user and client). An
    /// upstream request to the client (`roots/list`, `elicitation/create`,
    /// `sampling/createMessage`) parks the call and becomes an
    /// `InputRequiredResult`; the client's retry with `inputResponses` and
    /// the `requestState` hands the answer to the parked call and streams
    /// the rest of it.
    pub(super) async fn modern_to_stateful(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
        id: &Id,
        request: crate::era::ModernRequest,
    ) -> Result<Response, Reject> {
        let crate::era::ModernRequest { method, mut params } = request;
        let state = params.remove("requestState");
        let responses = params.remove("inputResponses");
        if let Some(state) = state {
            return self
                .resume(org, identity, req, id, method, &state, responses)
                .await;
        }
        let hidden = self.hidden_session(org, identity, req, &params).await?;
        let headers = session_headers(org, identity, &hidden, &req.headers, &req.request_id);
        let body = crate::era::request_without_modern_meta(Some(id), &method, params);
        org.metrics.bridged.handshake.inc();
        let answer = self
            .send_in_session(org, &hidden, headers, body)
            .await
            .map_err(|e| upstream_reject(e, Some(id)))?;
        let reader = AnswerReader::new(answer, org.pool.read_limits);
        let park = self.park_in(org, hidden);
        self.respond_modern(org, reader, Some(id), Some(method), Some(park), None)
            .await
    }

    fn park_in(&self, org: &OrgRoute, session: Arc<SessionState>) -> Park {
        Park {
            map: self.parked.clone(),
            session,
            wait: org.pool.read_limits.max_duration,
        }
    }

    /// The client's answer to a parked call: passed to the upstream as the
    /// response to its request, then the rest of the call streams back.
    #[allow(clippy::too_many_arguments)]
    async fn resume(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        req: &Request,
        id: &Id,
        method: String,
        state: &Value,
        responses: Option<Value>,
    ) -> Result<Response, Reject> {
        let refused = || {
            Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                "requestState names no call of this gateway waiting for this caller's input (tampered, already answered, or older than upstream.max_duration)",
            )
            .with_id(Some(id))
        };
        let state = state.as_str().ok_or_else(refused)?;
        let Some((_, parked)) = self.parked.remove_if(state, |_, p| {
            p.session.subject == identity.subject && *p.session.org == *org.name
        }) else {
            return Err(refused());
        };
        let reply = match responses.as_ref().and_then(|r| r.get(INPUT_KEY)) {
            Some(result) => json!({"jsonrpc": "2.0", "id": parked.upstream_id, "result": result}),
            None => json!({
                "jsonrpc": "2.0", "id": parked.upstream_id,
                "error": {"code": code::INVALID_PARAMS, "message": "the client sent no answer to this request"},
            }),
        };
        let headers = session_headers(
            org,
            identity,
            &parked.session,
            &req.headers,
            &req.request_id,
        );
        self.send_in_session(
            org,
            &parked.session,
            headers,
            Bytes::from(reply.to_string()),
        )
        .await
        .map_err(|e| upstream_reject(e, Some(id)))?;
        org.metrics.bridged.input_round.inc();
        let park = self.park_in(org, parked.session.clone());
        let reader = parked
            .reader
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.respond_modern(
            org,
            reader,
            Some(id),
            Some(method),
            Some(park),
            Some(parked.call),
        )
        .await
    }

    /// The caller's hidden session with the stateful upstream, opened on
    /// first use with the client's info and capabilities from `_meta`.
    async fn hidden_session(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        req: &Request,
        params: &Map<String, Value>,
    ) -> Result<Arc<SessionState>, Reject> {
        let meta = params.get("_meta").and_then(Value::as_object);
        let field = |name: &str| meta.and_then(|m| m.get(name)).cloned();
        let info = field(crate::era::META_CLIENT_INFO)
            .unwrap_or_else(|| json!({"name": "2026-07-28 client", "version": "unknown"}));
        let capabilities = field(crate::era::META_CAPABILITIES).unwrap_or_else(|| json!({}));
        let key = format!(
            "{}
{}
{info}
{capabilities}",
            org.name, identity.subject
        );
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let lock_key = format!(
            "hidden
{key}"
        );
        let lock = self.rebinding.entry(lock_key.clone()).or_default().clone();
        let _one = lock.lock().await;
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let params = json!({
            "protocolVersion": crate::era::LATEST_LEGACY,
            "capabilities": capabilities,
            "clientInfo": info,
        });
        let id = session::mint_id();
        let headers = upstream_headers(
            &Forwarding {
                session_id: &id,
                org: &org.name,
                identity,
                protocol_version: None,
                request_id: &req.request_id,
            },
            &req.headers,
        );
        let bound = self.open_upstream(org, headers, params.clone()).await?;
        let mut state = SessionState::new(
            id.clone(),
            &org.name,
            identity,
            Transport::Hidden,
            bound.protocol_version.clone(),
        );
        state.set_client(&params);
        state.upstream = Some(bound);
        let state = self.create_session(state).await?;
        self.hidden.insert(key, id);
        self.rebinding.remove(&lock_key);
        Ok(state)
    }

    async fn live_hidden(&self, key: &str, identity: &Identity) -> Option<Arc<SessionState>> {
        let id = self.hidden.get(key)?.clone();
        match self.store.lookup(&id).await {
            Ok(Some(s)) if s.subject == identity.subject => Some(s),
            _ => None,
        }
    }

    /// Opens an upstream session with `params` as the client's
    /// `initialize` params: `initialize`, then `notifications/initialized`.
    async fn open_upstream(
        &self,
        org: &OrgRoute,
        headers: HeaderMap,
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
        let init = Id::from_value(&Value::from("ratatosk-initialize"))
            .map(|id| crate::era::request_body(Some(&id), "initialize", params))
            .and_then(|body| jsonrpc::parse_message(&body).ok())
            .ok_or_else(|| fail("cannot build the initialize request".into()))?;
        let (response, bound) = self.handshake(org, headers.clone(), &init).await?;
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
        send_bound(org, &bound, Method::POST, headers, initialized)
            .await
            .map_err(|e| fail(format!("notifications/initialized failed: {e}")))?;
        Ok(bound)
    }

    /// Drops the hidden-session entries of expired sessions.
    pub(super) fn forget_hidden(&self, expired: &[Arc<SessionState>]) {
        if expired.iter().any(|s| s.transport == Transport::Hidden) {
            self.hidden
                .retain(|_, id| !expired.iter().any(|s| s.id == *id));
        }
    }

    /// Drops parked calls nobody came back for: their upstream requests
    /// end with them.
    pub(super) fn expire_parked(&self) {
        let now = Instant::now();
        self.parked.retain(|_, p| p.expires > now);
    }
}

/// One message to the upstream session `bound`, on its replica only.
async fn send_bound(
    org: &OrgRoute,
    bound: &UpstreamSession,
    method: Method,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, UpstreamError> {
    if let Ok(v) = HeaderValue::from_str(&bound.id) {
        headers.insert(MCP_SESSION_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(&bound.protocol_version) {
        headers.insert(MCP_PROTOCOL_VERSION, v);
    }
    org.pool
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
pub(super) fn background_headers(org: &OrgRoute, session: &SessionState, what: &str) -> HeaderMap {
    let mut caller = Identity::anonymous(&org.name);
    caller.subject.clone_from(&session.subject);
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
