//! 2026-07-28 clients of a stateful 2025 upstream (ARCHITECTURE.md, "Era
//! bridge"). Such a client has no session, the upstream needs one: the
//! gateway keeps a hidden upstream session per (org, user, client). When the
//! upstream asks the client something during a call (`roots/list`,
//! `elicitation/create`, `sampling/createMessage`), the gateway parks the
//! call and answers the client with an `InputRequiredResult` whose
//! `requestState` names the parked call; the client's retry with
//! `inputResponses` hands the answer to the upstream and streams the rest of
//! the call.

use std::time::{Duration, Instant};

use serde_json::Map;

use super::stateful::{background_headers, send_bound};
use super::*;
use crate::era;

/// The key of the one input request of an `InputRequiredResult` the
/// gateway makes from an upstream's request.
const INPUT_KEY: &str = "upstream";

/// Most hidden sessions one caller may have in one org (one per distinct
/// client info and capabilities).
const MAX_HIDDEN_PER_CALLER: usize = 16;

/// Most calls of one caller that may wait for its input at once.
const MAX_PARKED_PER_CALLER: usize = 32;

/// Longest wait for the upstream to take a reply of the gateway's.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Upstream calls waiting for a modern client's input, by `requestState`.
pub(super) type ParkedMap = DashMap<String, Parked>;

/// An upstream call that asked the client something: its answer stream,
/// held until the client calls again with the answer.
pub(super) struct Parked {
    /// In a mutex only to make the map `Sync`: it is moved, never shared.
    reader: std::sync::Mutex<AnswerReader>,
    park: Park,
    /// The id of the upstream's request, which the answer must carry.
    upstream_id: Value,
    /// The id of the parked call, which its response will carry.
    call: Id,
    /// The call's own deadline (`upstream.max_duration` from its start).
    expires: Instant,
}

/// The context of a modern client's call in a hidden session: where its
/// upstream requests are answered, and where the call parks when the
/// client must answer.
#[derive(Clone)]
pub(super) struct Park {
    map: Arc<ParkedMap>,
    org: Arc<OrgRoute>,
    session: Arc<SessionState>,
    /// Input rounds so far.
    rounds: u32,
}

/// What becomes of an upstream request during a modern client's call.
// Moved once per upstream request, never stored: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Asked {
    /// The gateway answered the upstream itself (`ping`, or a refusal);
    /// the call goes on.
    Answered(Park, AnswerReader),
    /// The call is parked: this `InputRequiredResult` ends the client's
    /// stream.
    Parked(Bytes),
}

impl Park {
    /// Handles the upstream's `request` during call `call` (the client
    /// waits on `client_id`): answered at once, or the call is parked.
    pub(super) fn on_request(
        mut self,
        reader: AnswerReader,
        call: Id,
        client_id: &Id,
        request: &[u8],
    ) -> Asked {
        let request: Value = serde_json::from_slice(request).unwrap_or(Value::Null);
        let upstream_id = request.get("id").cloned().unwrap_or(Value::Null);
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        if let Some(answer) = self.own_answer(method) {
            let mut body = json!({"jsonrpc": "2.0", "id": upstream_id});
            match answer {
                Ok(result) => body["result"] = result,
                Err((code, message)) => body["error"] = json!({"code": code, "message": message}),
            }
            self.reply(body);
            return Asked::Answered(self, reader);
        }
        let state = session::mint_id();
        let input = json!({
            "method": method,
            "params": request.get("params").cloned().unwrap_or_else(|| json!({})),
        });
        let expires = reader.deadline();
        self.rounds += 1;
        let map = self.map.clone();
        map.insert(
            state.clone(),
            Parked {
                reader: std::sync::Mutex::new(reader),
                park: self,
                upstream_id,
                call,
                expires,
            },
        );
        Asked::Parked(jsonrpc::result_body(
            Some(client_id),
            json!({
                "resultType": "input_required",
                "inputRequests": {INPUT_KEY: input},
                "requestState": state,
            }),
        ))
    }

    /// The gateway's own answer to an upstream request, when it gives
    /// one: a result for `ping`, an error for a request it cannot or may
    /// not hand to the client; `None` to park the call and ask the client.
    fn own_answer(&self, method: &str) -> Option<Result<Value, (i64, String)>> {
        if method == "ping" {
            return Some(Ok(json!({})));
        }
        let Some(capability) = era::capability_for(method) else {
            return Some(Err((
                code::METHOD_NOT_FOUND,
                format!("the gateway does not pass {method} to a 2026-07-28 client"),
            )));
        };
        let declared = self
            .session
            .client_capabilities
            .as_ref()
            .and_then(Value::as_object)
            .is_some_and(|caps| caps.contains_key(capability));
        if !declared {
            return Some(Err((
                era::errors::MISSING_CAPABILITY,
                format!("the client did not declare the '{capability}' capability"),
            )));
        }
        if self.rounds >= self.org.max_input_rounds {
            return Some(Err((
                code::UPSTREAM_ERROR,
                format!(
                    "this call already asked the client {} times (upstream.max_input_rounds)",
                    self.rounds
                ),
            )));
        }
        let subject = &self.session.subject;
        let waiting = self
            .map
            .iter()
            .filter(|p| p.park.session.subject == *subject)
            .count();
        if waiting >= MAX_PARKED_PER_CALLER {
            return Some(Err((
                code::UPSTREAM_ERROR,
                format!("{waiting} calls of this caller already wait for its input"),
            )));
        }
        None
    }

    /// Sends the gateway's own message to the hidden session.
    async fn send(&self, body: Value) -> Result<crate::upstream::Answer, UpstreamError> {
        let bound = self
            .session
            .upstream
            .as_ref()
            .ok_or_else(|| UpstreamError::Failed {
                replica: self.org.name.to_string(),
                reason: "the hidden session has no upstream session".into(),
            })?;
        let headers = background_headers(&self.org, &self.session, "reply");
        let body = Bytes::from(body.to_string());
        send_bound(&self.org, bound, Method::POST, headers, body).await
    }

    /// Sends the gateway's own message to the hidden session in the
    /// background; failures are only logged.
    pub(super) fn reply(&self, body: Value) {
        let park = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(REPLY_TIMEOUT, park.send(body)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(org = %park.org.name, error = %e, "cannot pass a message to the hidden upstream session");
                }
                Err(_) => {
                    tracing::warn!(org = %park.org.name, "the hidden upstream session did not take a message in time");
                }
            }
        });
    }

    /// Tells the upstream that call `call` is over for the client (it
    /// closed the stream, or never came back with its input).
    pub(super) fn cancel(&self, call: &Id, reason: &str) {
        self.reply(json!({
            "jsonrpc": "2.0", "method": "notifications/cancelled",
            "params": {"requestId": call.to_value(), "reason": reason},
        }));
    }
}

impl Gateway {
    /// A 2026-07-28 client's request to a stateful upstream, in the
    /// client's hidden upstream session, under an id of the gateway's (the
    /// session is shared by the client's calls, whose own ids may repeat).
    pub(super) async fn modern_to_stateful(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
        id: &Id,
        request: era::ModernRequest,
    ) -> Result<Response, Reject> {
        let era::ModernRequest { method, mut params } = request;
        let state = params.remove("requestState");
        let responses = params.remove("inputResponses");
        if let Some(state) = state {
            return self
                .resume(org, identity, id, method, &state, responses)
                .await;
        }
        let hidden = self.hidden_session(org, identity, req, &params).await?;
        let headers = session_headers(org, identity, &hidden, &req.headers, &req.request_id);
        let n = self.next_reply.fetch_add(1, Ordering::Relaxed);
        let call = Id::from_value(&Value::from(format!("ratatosk-call-{n}")))
            .ok_or_else(|| Reject::bad_request("cannot mint a call id"))?;
        let body = era::request_without_modern_meta(Some(&call), &method, params);
        org.metrics.bridged.handshake.inc();
        let answer = self
            .send_in_session(org, &hidden, headers, body)
            .await
            .map_err(|e| upstream_reject(e, Some(id)))?;
        let reader = AnswerReader::new(answer, org.pool.read_limits);
        let park = Park {
            map: self.parked.clone(),
            org: org.clone(),
            session: hidden,
            rounds: 0,
        };
        self.respond_modern(org, reader, Some(id), Some(method), Some(park), Some(call))
            .await
    }

    /// The client's answer to a parked call: passed to the upstream as the
    /// response to its request, then the rest of the call streams back.
    async fn resume(
        &self,
        org: &OrgRoute,
        identity: &Identity,
        id: &Id,
        method: String,
        state: &Value,
        responses: Option<Value>,
    ) -> Result<Response, Reject> {
        let refused = || {
            Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                "requestState names no call of this gateway waiting for this caller's input (tampered, already answered, or past upstream.max_duration)",
            )
            .with_id(Some(id))
        };
        let state = state.as_str().ok_or_else(refused)?;
        let Some((_, parked)) = self.parked.remove_if(state, |_, p| {
            p.park.session.subject == identity.subject && *p.park.session.org == *org.name
        }) else {
            return Err(refused());
        };
        let reply = match responses.as_ref().and_then(|r| r.get(INPUT_KEY)) {
            Some(result) => json!({"jsonrpc": "2.0", "id": parked.upstream_id, "result": result}),
            None => json!({
                "jsonrpc": "2.0", "id": parked.upstream_id,
                "error": {"code": code::INVALID_PARAMS,
                          "message": format!("the client sent no inputResponses.{INPUT_KEY}")},
            }),
        };
        if let Err(e) = parked.park.send(reply).await {
            parked
                .park
                .cancel(&parked.call, "the client's input could not be delivered");
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                code::UPSTREAM_ERROR,
                format!("the upstream lost the call that asked for this input ({e}); call again"),
            )
            .with_id(Some(id)));
        }
        org.metrics.bridged.input_round.inc();
        let reader = parked
            .reader
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.respond_modern(
            org,
            reader,
            Some(id),
            Some(method),
            Some(parked.park),
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
        let info = field(era::META_CLIENT_INFO)
            .unwrap_or_else(|| json!({"name": "2026-07-28 client", "version": "unknown"}));
        let capabilities = field(era::META_CAPABILITIES).unwrap_or_else(|| json!({}));
        let caller = format!("{}\n{}\n", org.name, identity.subject);
        let key = format!("{caller}{info}\n{capabilities}");
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let opening = Opening::new(&self.opening, key.clone());
        let _one = opening.lock.lock().await;
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let open = self
            .hidden
            .iter()
            .filter(|e| e.key().starts_with(&caller))
            .count();
        if open >= MAX_HIDDEN_PER_CALLER {
            return Err(Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                code::BAD_REQUEST,
                format!(
                    "this caller already has {open} upstream sessions in org '{}', one per distinct clientInfo and clientCapabilities; reuse one",
                    org.name
                ),
            ));
        }
        let params = json!({
            "protocolVersion": era::LATEST_LEGACY,
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
        Ok(state)
    }

    async fn live_hidden(&self, key: &str, identity: &Identity) -> Option<Arc<SessionState>> {
        let id = self.hidden.get(key)?.clone();
        match self.store.lookup(&id).await {
            Ok(Some(s)) if s.subject == identity.subject => Some(s),
            _ => None,
        }
    }

    /// Drops the hidden-session entry of an ended session.
    pub(super) fn forget_hidden(&self, ended: &SessionState) {
        if ended.transport == Transport::Hidden {
            self.hidden.retain(|_, id| *id != ended.id);
        }
    }

    /// Drops parked calls nobody came back for, telling the upstream.
    pub(super) fn expire_parked(&self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .parked
            .iter()
            .filter(|p| p.expires <= now)
            .map(|p| p.key().clone())
            .collect();
        for state in expired {
            if let Some((_, parked)) = self.parked.remove(&state) {
                parked
                    .park
                    .cancel(&parked.call, "the client did not come back with its input");
            }
        }
    }
}

/// Locks of hidden sessions being opened, by key.
pub(super) type OpeningMap = DashMap<String, Arc<tokio::sync::Mutex<()>>>;

/// One caller's hold on the lock of a hidden session being opened; the
/// entry goes when its last holder does.
struct Opening<'a> {
    map: &'a OpeningMap,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Opening<'a> {
    fn new(map: &'a OpeningMap, key: String) -> Opening<'a> {
        let lock = map.entry(key.clone()).or_default().clone();
        Opening { map, key, lock }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        // The map's reference and this one: nobody else waits.
        self.map
            .remove_if(&self.key, |_, l| Arc::strong_count(l) <= 2);
    }
}
