//! 2026-07-28 clients of a stateful 2025 upstream (ARCHITECTURE.md, "Era
//! bridge"). Such a client has no session, the upstream needs one: the
//! gateway keeps a hidden upstream session per (org, user, client). When the
//! upstream asks the client something during a call (`roots/list`,
//! `elicitation/create`, `sampling/createMessage`), the gateway parks the
//! call and answers the client with an `InputRequiredResult` whose
//! `requestState` names the parked call; the client's retry with
//! `inputResponses` hands the answer to the upstream and streams the rest of
//! the call.
//!
//! A parked call holds the upstream's open answer stream, so it lives on
//! one node; its `requestState` names that node. In Redis mode a retry that
//! reaches another node goes to the owner over the bus: the owner hands the
//! input to the upstream and writes the rest of the call to a POST stream
//! of the hidden session's shared log, which the retry's node serves.

use std::time::{Duration, Instant};

use serde_json::Map;

use tokio::sync::oneshot;

use super::modern::{Pipe, Step};
use super::stateful::{background_headers, send_bound};
use super::*;
use crate::era;
use crate::stream::shared::HEARTBEAT;

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

/// Longest wait for the node holding a parked call to take a retry that
/// reached another node (it hands the input to the upstream first).
const RESUME_TIMEOUT: Duration = Duration::from_secs(15);

/// The hidden sessions this node opened or found. The session store
/// records them for every node; this index keeps the per-caller cap and
/// finds a session's records when it ends.
#[derive(Default)]
pub(in crate::gateway) struct HiddenSessions {
    /// By key (org, subject, client info and capabilities), the id.
    index: DashMap<String, String>,
    /// Locks of hidden sessions being opened, by key, so that concurrent
    /// first calls open one.
    opening: OpeningMap,
}

impl HiddenSessions {
    fn note(&self, key: &str, id: &str) {
        self.index.insert(key.to_owned(), id.to_owned());
    }

    /// How many hidden sessions `caller` (`org\nsubject\n`) has here.
    fn count_of(&self, caller: &str) -> usize {
        self.index
            .iter()
            .filter(|e| e.key().starts_with(caller))
            .count()
    }

    /// The ids of the hidden sessions known here.
    #[cfg(test)]
    pub(in crate::gateway) fn ids(&self) -> Vec<String> {
        self.index.iter().map(|e| e.value().clone()).collect()
    }

    /// Forgets session `id` here: the keys it had.
    pub(in crate::gateway) fn forget(&self, id: &str) -> Vec<String> {
        let mut keys = Vec::new();
        self.index.retain(|key, recorded| {
            let keep = recorded != id;
            if !keep {
                keys.push(key.clone());
            }
            keep
        });
        keys
    }
}

/// Upstream calls waiting for a 2026-07-28 client's input, and the
/// retries that cross nodes to reach them.
#[derive(Default)]
pub(in crate::gateway) struct ParkedCalls {
    /// By the `requestState` the client was given.
    parked: Arc<ParkedMap>,
    /// Retries of calls parked on other nodes, waiting for those nodes.
    resumes: ResumeMap,
    /// Calls this node continues for retries other nodes serve.
    continued: ContinuedMap,
}

impl ParkedCalls {
    /// The parked call `state`, if it waits for this caller; it is taken.
    fn take(&self, state: &str, org: &str, subject: &str) -> Option<Parked> {
        self.parked
            .remove_if(state, |_, p| {
                p.park.session.subject == subject && *p.park.session.org == *org
            })
            .map(|(_, p)| p)
    }

    /// Hands a retry's answer to the task that waits for it.
    fn resumed(&self, token: &str, outcome: Resumed) {
        if let Some((_, tx)) = self.resumes.remove(token) {
            let _ = tx.send(outcome);
        }
    }

    /// Whether the retry `token`'s node gave up before this node heard of
    /// it; the mark goes.
    fn was_abandoned(&self, token: &str) -> bool {
        matches!(
            self.continued.remove(token),
            Some((_, Continued::Abandoned(_)))
        )
    }

    /// Records the call this node now streams for retry `token`; false if
    /// the retry's node gave up meanwhile.
    fn start_continued(&self, token: &str, session: &str, call: &Id) -> bool {
        match self.continued.entry(token.to_owned()) {
            dashmap::Entry::Occupied(e) => {
                e.remove();
                false
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Continued::Running {
                    session: session.to_owned(),
                    call: call.clone(),
                });
                true
            }
        }
    }

    fn end_continued(&self, token: &str) {
        self.continued.remove(token);
    }

    /// The retry `token`'s node gave up: the call to stop, if this node
    /// streams it; else it is marked, so that it does not start.
    fn abandon(&self, token: String) -> Option<(String, Id)> {
        match self.continued.entry(token) {
            dashmap::Entry::Occupied(e) => match e.remove() {
                Continued::Running { session, call } => Some((session, call)),
                Continued::Abandoned(_) => None,
            },
            dashmap::Entry::Vacant(v) => {
                v.insert(Continued::Abandoned(Instant::now()));
                None
            }
        }
    }

    /// Takes the parked calls past their deadline, and drops old marks
    /// of retries given up.
    fn take_expired(&self) -> Vec<Parked> {
        let now = Instant::now();
        self.continued.retain(|_, c| match c {
            Continued::Abandoned(at) => now.duration_since(*at) < Duration::from_secs(60),
            Continued::Running { .. } => true,
        });
        let expired: Vec<String> = self
            .parked
            .iter()
            .filter(|p| p.expires <= now)
            .map(|p| p.key().clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|state| self.parked.remove(&state).map(|(_, p)| p))
            .collect()
    }
}

/// Retries waiting for the node that holds their call, by token.
type ResumeMap = DashMap<String, oneshot::Sender<Resumed>>;

/// Calls this node continues for a retry another node serves, by the
/// retry's token: so that the retry's node can give them up.
type ContinuedMap = DashMap<String, Continued>;

enum Continued {
    /// Streaming: the call's session and id, to cancel it.
    Running { session: String, call: Id },
    /// The retry's node gave up before this node started: do not.
    Abandoned(Instant),
}

/// The node a `requestState` of this gateway's names: `{node:08x}.{random}`.
fn owner_of(state: &str) -> Option<u32> {
    let (tag, _) = state.split_once('.')?;
    if tag.len() != 8 {
        return None;
    }
    u32::from_str_radix(tag, 16).ok()
}

/// Upstream calls waiting for a modern client's input, by `requestState`.
type ParkedMap = DashMap<String, Parked>;

/// An upstream call that asked the client something: its answer stream,
/// held until the client calls again with the answer.
pub(in crate::gateway) struct Parked {
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
pub(in crate::gateway) struct Park {
    map: Arc<ParkedMap>,
    /// This node's tag, which the `requestState`s it mints carry.
    node: u32,
    org: Arc<OrgRoute>,
    session: Arc<SessionState>,
    /// Input rounds so far.
    rounds: u32,
}

/// What becomes of an upstream request during a modern client's call.
// Moved once per upstream request, never stored: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub(in crate::gateway) enum Asked {
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
    pub(in crate::gateway) fn on_request(
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
        let state = format!("{:08x}.{}", self.node, session::mint_id());
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
        if !era::declares(self.session.client_capabilities.as_ref(), capability) {
            return Some(Err((
                era::errors::MISSING_CAPABILITY,
                format!("the client did not declare the '{capability}' capability"),
            )));
        }
        if self.rounds >= self.org.server.max_input_rounds {
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
    pub(in crate::gateway) fn reply(&self, body: Value) {
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
    pub(in crate::gateway) fn cancel(&self, call: &Id, reason: &str) {
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
    pub(in crate::gateway) async fn modern_to_stateful(
        self: &Arc<Self>,
        call: Call<'_>,
        id: &Id,
        request: era::ModernRequest,
        watches: &crate::stream::watch::Watches,
    ) -> Result<Response, Reject> {
        let org = call.org;
        let era::ModernRequest { method, mut params } = request;
        let hidden = if method == "tools/call" {
            // Its Mcp-Param headers are checked against the tool's schema,
            // read in the client's own hidden session.
            let hidden = self.hidden_session(call, &params).await?;
            let lister = super::params::Lister::Hidden(&hidden);
            self.check_tool_call_headers(call, id, &params, lister)
                .await?;
            Some(hidden)
        } else {
            None
        };
        let state = params.remove("requestState");
        let responses = params.remove("inputResponses");
        if let Some(state) = state {
            return self.resume(call, id, method, &state, responses).await;
        }
        let hidden = match hidden {
            Some(hidden) => hidden,
            None => self.hidden_session(call, &params).await?,
        };
        let headers = call.session_headers(&hidden);
        let n = self.replies.unique();
        let call_id = Id::from_value(&Value::from(format!("ratatosk-call-{:08x}-{n}", self.node)))
            .ok_or_else(|| Reject::bad_request("cannot mint a call id"))?;
        let body = era::request_without_modern_meta(Some(&call_id), &method, params);
        org.metrics.bridged.handshake.inc();
        let answer = self
            .send_in_session(org, &hidden, headers, body)
            .await
            .map_err(|e| upstream_reject(e, Some(id)))?;
        watches.served(Some(id), answer.lease.replica());
        let reader = AnswerReader::new(answer, org.server.pool.read_limits);
        let park = Park {
            map: self.bridges.parked.parked.clone(),
            node: self.node,
            org: org.clone(),
            session: hidden,
            rounds: 0,
        };
        self.respond_modern(
            org,
            reader,
            Some(id),
            Some(method),
            Some((park, call_id)),
            None,
        )
        .await
    }

    /// The client's answer to a parked call: passed to the upstream as the
    /// response to its request, then the rest of the call streams back.
    /// A call parked on another node is resumed there (Redis mode).
    async fn resume(
        &self,
        call: Call<'_>,
        id: &Id,
        method: String,
        state: &Value,
        responses: Option<Value>,
    ) -> Result<Response, Reject> {
        let state = state
            .as_str()
            .ok_or_else(|| unknown_request_state().with_id(Some(id)))?;
        let (org, identity) = (call.org, call.identity);
        let Some(parked) = self.bridges.parked.take(state, &org.key, &identity.subject) else {
            return match (owner_of(state), self.cluster().events()) {
                (Some(owner), Some(events)) if owner != self.node => {
                    let request = ResumeRequest {
                        node: owner,
                        from: self.node,
                        token: session::mint_id(),
                        org: org.key.to_string(),
                        subject: identity.subject.clone(),
                        state: state.to_owned(),
                        id: id.to_value(),
                        method,
                        responses,
                    };
                    self.resume_elsewhere(org, events, request, id).await
                }
                _ => Err(unknown_request_state().with_id(Some(id))),
            };
        };
        let (reader, park, call) = deliver_input(parked, responses.as_ref())
            .await
            .map_err(|reason| call_lost(reason).with_id(Some(id)))?;
        self.respond_modern(
            org,
            reader,
            Some(id),
            Some(method),
            Some((park, call)),
            None,
        )
        .await
    }

    /// A retry for a call parked on another node: that node resumes it and
    /// streams the rest through the shared log, which this node serves.
    async fn resume_elsewhere(
        &self,
        org: &OrgRoute,
        events: &Arc<SharedEvents>,
        request: ResumeRequest,
        id: &Id,
    ) -> Result<Response, Reject> {
        let owner = request.node;
        let unavailable = || {
            Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_ERROR,
                "this call waits on another gateway node and the event bus (Redis) is unreachable; retry shortly",
            )
            .with_id(Some(id))
        };
        if !events.bus_up() {
            return Err(unavailable());
        }
        if !events.node_alive(owner).await.map_err(|_| unavailable())? {
            return Err(call_lost(format!(
                "gateway node {owner:08x}, which held the call that asked for this input, is gone"
            ))
            .with_id(Some(id)));
        }
        let (tx, rx) = oneshot::channel();
        let mut waiting = Waiting::new(
            &self.bridges.parked.resumes,
            events,
            owner,
            request.token.clone(),
            tx,
        );
        Notice::Resume(request).send(events);
        let outcome = tokio::time::timeout(RESUME_TIMEOUT, rx).await;
        let (session, stream, call, left) = match outcome {
            Ok(Ok(outcome)) => {
                waiting.settled = true;
                match outcome {
                    Resumed::Streaming {
                        session,
                        stream,
                        call,
                        left_ms,
                    } => (session, stream, call, Duration::from_millis(left_ms)),
                    Resumed::Refused {
                        status,
                        code,
                        message,
                    } => {
                        let status =
                            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                        return Err(Reject::new(status, code, message).with_id(Some(id)));
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                return Err(call_lost(format!(
                    "gateway node {owner:08x}, which holds the call that asked for this input, did not answer in {} s",
                    RESUME_TIMEOUT.as_secs()
                ))
                .with_id(Some(id)));
            }
        };
        drop(waiting);
        let cancel = Notice::Cancel {
            session: session.clone(),
            id: call,
        };
        // The stream is served here, or the call stops there.
        let attached = match self.hub.open(&session, false).await {
            Ok(Some(log)) => log.attach(stream, None).map(|attach| (log, attach)).ok(),
            Ok(None) => None,
            Err(e) => {
                cancel.send(events);
                return Err(store_reject(e));
            }
        };
        let Some((log, attach)) = attached else {
            cancel.send(events);
            return Err(call_lost(
                "the call's upstream session ended on the node holding it".into(),
            )
            .with_id(Some(id)));
        };
        let live = LiveStream::new(
            log,
            attach,
            None,
            self.live().config.streams.keepalive,
            Some(org.metrics.stream.clone()),
        );
        let now = Instant::now();
        Ok(Response::sse(Box::new(Elsewhere {
            live,
            id: id.clone(),
            owner,
            deadline: now + left,
            next_check: now + HEARTBEAT,
            ended: false,
            done: false,
            events: events.clone(),
            cancel: Some(cancel),
        })))
    }

    /// Node side of [`Notice::Resume`]: a retry another node received for
    /// a call parked here. Answers that node with [`Notice::Resumed`].
    pub(in crate::gateway) async fn resume_for(self: Arc<Self>, request: ResumeRequest) {
        let outcome = match self.continue_into_log(&request).await {
            Ok(streaming) => streaming,
            Err(reject) => Resumed::Refused {
                status: reject.status.as_u16(),
                code: reject.code,
                message: reject.message,
            },
        };
        self.cluster().notify(&Notice::Resumed {
            node: request.from,
            token: request.token,
            outcome,
        });
    }

    /// Hands the input of `request` to the upstream and streams the rest
    /// of the call to a new POST stream of the hidden session's log.
    async fn continue_into_log(
        self: &Arc<Self>,
        request: &ResumeRequest,
    ) -> Result<Resumed, Reject> {
        let parked = self
            .bridges
            .parked
            .take(&request.state, &request.org, &request.subject)
            .ok_or_else(unknown_request_state)?;
        // The retry's node gave up before this node heard of it.
        let abandoned = self.bridges.parked.was_abandoned(&request.token);
        let client_id = Id::from_value(&request.id);
        let (Some(client_id), false) = (client_id, abandoned) else {
            parked
                .park
                .cancel(&parked.call, "the client's retry could not be served");
            return Err(unknown_request_state());
        };
        let session = parked.park.session.clone();
        let org = parked.park.org.name.clone();
        let left = parked.expires.saturating_duration_since(Instant::now());
        let Ok(Some(log)) = self.hub.open(&session.id, false).await else {
            parked
                .park
                .cancel(&parked.call, "the call's upstream session ended");
            return Err(call_lost(
                "the call's upstream session has no event log on its node".into(),
            ));
        };
        let guard = match self.track(&parked.park.org, &log, &session.id, Some(&parked.call)) {
            Ok(guard) => guard,
            Err(reject) => {
                // Still parked: the client may come back with it later.
                self.bridges
                    .parked
                    .parked
                    .insert(request.state.clone(), parked);
                return Err(reject);
            }
        };
        let (reader, park, call) = deliver_input(parked, request.responses.as_ref())
            .await
            .map_err(call_lost)?;
        // From here, dropping `pipe` tells the upstream the call is over.
        let pipe = Pipe::resumed(
            reader,
            client_id,
            call.clone(),
            request.method.clone(),
            org,
            self.live().config.streams.keepalive,
            park,
        );
        let stream = log
            .begin_stream()
            .map_err(|_| call_lost("the call's upstream session ended".into()))?;
        // The retry's node may have given up while the input was delivered.
        if !self
            .bridges
            .parked
            .start_continued(&request.token, &session.id, &call)
        {
            guard.token.cancel();
        }
        let (this, token) = (self.clone(), request.token.clone());
        tokio::spawn(async move {
            let mut pipe = pipe;
            loop {
                let step = tokio::select! {
                    s = pipe.step() => s,
                    _ = guard.token.cancelled() => break,
                };
                match step {
                    Some(Step::Send(out, last)) => {
                        if log.append(stream, &out).is_err() || last {
                            break;
                        }
                    }
                    Some(Step::Quiet) | Some(Step::Held) => {}
                    None => break,
                }
            }
            log.end_stream(stream);
            this.bridges.parked.end_continued(&token);
            drop(guard);
        });
        Ok(Resumed::Streaming {
            session: session.id.clone(),
            stream,
            call: call.to_value(),
            left_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Hands a retry's answer to the node that waits for it.
    pub(in crate::gateway) fn resumed(&self, token: &str, outcome: Resumed) {
        self.bridges.parked.resumed(token, outcome);
    }

    /// The node serving retry `token` gave up on it: stop the call this
    /// node continues for it, or do not start it.
    pub(in crate::gateway) fn abandon(&self, token: String) {
        if let Some((session, call)) = self.bridges.parked.abandon(token) {
            self.cancel_in_flight(session, call);
        }
    }

    /// The caller's hidden session with the stateful upstream, opened on
    /// first use with the client's info and capabilities from `_meta`.
    pub(in crate::gateway) async fn hidden_session(
        &self,
        call: Call<'_>,
        params: &Map<String, Value>,
    ) -> Result<Arc<SessionState>, Reject> {
        let (org, identity) = (call.org, call.identity);
        let meta = params.get("_meta").and_then(Value::as_object);
        let field = |name: &str| meta.and_then(|m| m.get(name)).cloned();
        // What the hidden session keeps, and keys it by.
        session::check_client_data(
            [
                (
                    "params._meta[\"io.modelcontextprotocol/clientInfo\"]",
                    meta.and_then(|m| m.get(era::META_CLIENT_INFO)),
                ),
                (
                    "params._meta[\"io.modelcontextprotocol/clientCapabilities\"]",
                    meta.and_then(|m| m.get(era::META_CAPABILITIES)),
                ),
            ],
            self.live().config.sessions.max_client_bytes,
        )
        .map_err(|why| {
            org.metrics.refused.client_data.inc();
            Reject::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, why)
        })?;
        let info = field(era::META_CLIENT_INFO)
            .unwrap_or_else(|| json!({"name": "2026-07-28 client", "version": "unknown"}));
        let capabilities = field(era::META_CAPABILITIES).unwrap_or_else(|| json!({}));
        let caller = format!("{}\n{}\n", org.key, identity.subject);
        let key = format!("{caller}{info}\n{capabilities}");
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let opening = Opening::new(&self.bridges.hidden.opening, key.clone());
        let _one = opening.lock.lock().await;
        if let Some(found) = self.live_hidden(&key, identity).await {
            return Ok(found);
        }
        let open = self.bridges.hidden.count_of(&caller);
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
        self.check_admission(call).await?;
        let params = json!({
            "protocolVersion": era::LATEST_LEGACY,
            "capabilities": capabilities,
            "clientInfo": info,
        });
        let id = session::mint_id();
        let headers = call.upstream_headers(&id, None);
        let bound = self.open_upstream(org, headers, params.clone()).await?;
        let mut state = SessionState::new(
            id.clone(),
            &org.key,
            identity,
            Transport::Hidden,
            bound.protocol_version.clone(),
        );
        state.set_client(&params);
        state.upstream = Some(bound);
        let state = match self.create_session(state.clone()).await {
            Ok(state) => state,
            Err(reject) => {
                self.close_upstream(&state);
                return Err(reject);
            }
        };
        // Every node uses it from now on, unless another node recorded one
        // first (both opened it at once): then that one is used, and this
        // one ends.
        match self.store.record_hidden_session(&key, &id).await {
            Ok(recorded) if recorded != id => {
                if let Ok(Some(theirs)) = self.store.lookup(&recorded).await
                    && theirs.subject == identity.subject
                {
                    let _ = self
                        .end_session(
                            &id,
                            "another node opened this client's hidden session first",
                        )
                        .await;
                    self.bridges.hidden.note(&key, &recorded);
                    return Ok(theirs);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(org = %org.name, error = %e, "cannot share a hidden session with the other nodes");
            }
        }
        self.bridges.hidden.note(&key, &id);
        Ok(state)
    }

    /// The gateway's answer to a request the upstream sent on the GET
    /// stream of hidden session `session`: no client reads that stream
    /// (listens pass on change notifications only), so without it the
    /// upstream would wait for good. `ping` gets `{}`, anything else
    /// -32601: outside a call a 2026-07-28 client cannot be asked. Sent in
    /// the background; false if `message` is no request.
    pub(in crate::gateway) fn answer_on_hidden_stream(
        &self,
        session: &SessionState,
        message: &Bytes,
    ) -> bool {
        let Ok(Kind::Request { id, method }) = jsonrpc::parse_message(message).map(|m| m.kind)
        else {
            return false;
        };
        let (Some(org), Some(bound)) = (
            self.live().routes.org(&session.org).cloned(),
            session.upstream.clone(),
        ) else {
            return true;
        };
        let body = if method == "ping" {
            jsonrpc::result_body(Some(&id), json!({}))
        } else {
            jsonrpc::error_body(
                Some(&id),
                code::METHOD_NOT_FOUND,
                &format!(
                    "the gateway's hidden session of org '{}' has no client to pass {} to outside a call",
                    org.name,
                    jsonrpc::clip(&method, 64)
                ),
            )
        };
        let headers = background_headers(&org, session, "reply");
        tokio::spawn(async move {
            let sent = send_bound(&org, &bound, Method::POST, headers, body);
            match tokio::time::timeout(REPLY_TIMEOUT, sent).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(org = %org.name, error = %e, "cannot answer a request of the hidden upstream session");
                }
                Err(_) => {
                    tracing::warn!(org = %org.name, "the hidden upstream session did not take an answer in time");
                }
            }
        });
        true
    }

    /// The live hidden session of `key`, recorded in the session store by
    /// any node (the record lives on while it is used).
    async fn live_hidden(&self, key: &str, identity: &Identity) -> Option<Arc<SessionState>> {
        let live =
            |s: &SessionState| s.subject == identity.subject && s.transport == Transport::Hidden;
        let id = self.store.hidden_session(key).await.ok()??;
        match self.store.lookup(&id).await {
            Ok(Some(s)) if live(&s) => {
                self.bridges.hidden.note(key, &id);
                Some(s)
            }
            _ => None,
        }
    }

    /// Drops the hidden-session records of an ended session, on this node
    /// and in the session store.
    pub(in crate::gateway) fn forget_hidden(&self, ended: &SessionState) {
        if ended.transport != Transport::Hidden {
            return;
        }
        let keys = self.bridges.hidden.forget(&ended.id);
        if keys.is_empty() {
            return;
        }
        let (store, id) = (self.store.clone(), ended.id.clone());
        tokio::spawn(async move {
            for key in keys {
                if let Err(e) = store.forget_hidden_session(&key, &id).await {
                    tracing::debug!(error = %e, "cannot forget a hidden session's record; it expires");
                }
            }
        });
    }

    /// Drops parked calls nobody came back for, telling the upstream, and
    /// old marks of retries given up.
    pub(in crate::gateway) fn expire_parked(&self) {
        for parked in self.bridges.parked.take_expired() {
            parked
                .park
                .cancel(&parked.call, "the client did not come back with its input");
        }
    }
}

/// Hands the client's input to the upstream as the answer to its request;
/// the rest of the call then comes on the parked answer stream.
async fn deliver_input(
    parked: Parked,
    responses: Option<&Value>,
) -> Result<(AnswerReader, Park, Id), String> {
    let reply = match responses.and_then(|r| r.get(INPUT_KEY)) {
        Some(result) => json!({"jsonrpc": "2.0", "id": parked.upstream_id, "result": result}),
        None => json!({
            "jsonrpc": "2.0", "id": parked.upstream_id,
            "error": {"code": code::INVALID_PARAMS,
                      "message": format!("the client sent no inputResponses.{INPUT_KEY}")},
        }),
    };
    let span = crate::telemetry::span(
        || tracing::info_span!("bridge round", org = %parked.park.org.name, delivered = "input"),
    );
    let send = tracing::Instrument::instrument(parked.park.send(reply), span);
    let failed = match tokio::time::timeout(REPLY_TIMEOUT, send).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!(
            "the upstream lost the call that asked for this input ({e})"
        )),
        Err(_) => Some(format!(
            "the upstream did not take the input in {} s",
            REPLY_TIMEOUT.as_secs()
        )),
    };
    if let Some(reason) = failed {
        parked
            .park
            .cancel(&parked.call, "the client's input could not be delivered");
        return Err(reason);
    }
    parked.park.org.metrics.bridged.input_round.inc();
    let reader = parked
        .reader
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok((reader, parked.park, parked.call))
}

/// The rest of a call resumed on another node, read from the shared log.
/// A client that leaves before its end cancels the call there. It ends
/// with an error if that node stops, or at the call's deadline.
struct Elsewhere {
    live: LiveStream,
    /// The client's id, for an error of the gateway's.
    id: Id,
    /// The node streaming the call.
    owner: u32,
    deadline: Instant,
    /// When to see next whether the owner is alive.
    next_check: Instant,
    /// The call's stream ended.
    ended: bool,
    /// Nothing more to send.
    done: bool,
    events: Arc<SharedEvents>,
    cancel: Option<Notice>,
}

impl Elsewhere {
    fn fail(&mut self, why: String) -> Option<Bytes> {
        self.done = true;
        let body = jsonrpc::error_body(Some(&self.id), code::UPSTREAM_ERROR, &why);
        Some(sse_frame(None, Some("message"), &body))
    }
}

#[async_trait]
impl ChunkSource for Elsewhere {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return self.fail("the call ran past upstream.max_duration".into());
            }
            let wake = self.deadline.min(self.next_check);
            // Reading the log is cancel-safe: a check between two events
            // loses nothing.
            if let Ok(chunk) =
                tokio::time::timeout(wake.saturating_duration_since(now), self.live.next_chunk())
                    .await
            {
                self.ended = chunk.is_none();
                self.done = self.ended;
                return chunk;
            }
            if Instant::now() >= self.next_check {
                self.next_check = Instant::now() + HEARTBEAT;
                if let Ok(false) = self.events.node_alive(self.owner).await {
                    return self.fail(format!(
                        "gateway node {:08x}, which was streaming this call, stopped; call again without requestState",
                        self.owner
                    ));
                }
            }
        }
    }

    fn written(&mut self) {
        self.live.written();
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        if !self.ended
            && let Some(cancel) = self.cancel.take()
        {
            cancel.send(&self.events);
        }
    }
}

/// A retry's place in [`ResumeMap`], given up when it stops waiting: the
/// node holding the call is then told, unless it already answered.
struct Waiting<'a> {
    map: &'a ResumeMap,
    events: &'a SharedEvents,
    owner: u32,
    token: String,
    settled: bool,
}

impl<'a> Waiting<'a> {
    fn new(
        map: &'a ResumeMap,
        events: &'a SharedEvents,
        owner: u32,
        token: String,
        tx: oneshot::Sender<Resumed>,
    ) -> Waiting<'a> {
        map.insert(token.clone(), tx);
        Waiting {
            map,
            events,
            owner,
            token,
            settled: false,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.map.remove(&self.token);
        if !self.settled {
            Notice::Abandon {
                node: self.owner,
                token: std::mem::take(&mut self.token),
            }
            .send(self.events);
        }
    }
}

/// Locks of hidden sessions being opened, by key.
type OpeningMap = DashMap<String, Arc<tokio::sync::Mutex<()>>>;

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

#[cfg(test)]
pub(in crate::gateway) mod tests {
    //! 2026-07-28 clients of a stateful upstream, driven without a client
    //! socket: hidden sessions, parked calls and their rounds, errors,
    //! cancellation and a lost upstream session.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::sync::mpsc::UnboundedSender;

    use super::owner_of;
    use super::*;
    use crate::gateway::bridge::modern::tests::{gateway, gateway_with, json_of, modern};
    use crate::testing::{self, Answer, Reply};

    #[test]
    fn a_request_state_names_its_node() {
        assert_eq!(owner_of("0000002a.abc"), Some(42));
        assert_eq!(owner_of("ffffffff.abc"), Some(u32::MAX));
        for bad in ["2a.abc", "zzzzzzzz.abc", "0000002aabc", "", "00000002a.x"] {
            assert_eq!(owner_of(bad), None, "{bad}");
        }
    }

    #[derive(Default)]
    pub(in crate::gateway) struct Seen {
        /// Every message the upstream received, in order.
        pub(in crate::gateway) messages: Vec<Value>,
        /// `initialize` requests so far; session `up-N` is the Nth.
        pub(in crate::gateway) inits: usize,
        /// Lose the current session: its next request gets 404.
        lose: bool,
        /// Calls that asked the client, by the upstream's request id: the
        /// call's id, its stream, and the questions still to ask.
        asking: HashMap<String, (Value, UnboundedSender<String>, u32)>,
        /// Streams kept open (`hang`).
        open: Vec<UnboundedSender<String>>,
        /// The GET streams of upstream sessions, open.
        pub(in crate::gateway) gets: Vec<UnboundedSender<String>>,
        questions: u32,
    }

    pub(in crate::gateway) fn event(message: Value) -> String {
        format!("event: message\ndata: {message}\n\n")
    }

    fn accepted() -> Answer {
        Answer::Full(Reply {
            status: 202,
            headers: vec![],
            body: String::new(),
        })
    }

    /// Asks the client `roots/list` on `tx` for call `call`.
    fn ask(seen: &mut Seen, call: Value, tx: UnboundedSender<String>, left: u32) {
        seen.questions += 1;
        let q = format!("q{}", seen.questions);
        let _ = tx.send(event(
            json!({"jsonrpc": "2.0", "id": q, "method": "roots/list", "params": {}}),
        ));
        seen.asking.insert(q, (call, tx, left));
    }

    /// A stateful 2025 upstream. `tools/call` of `ask` asks the client
    /// `roots/list` once (`ask_twice`: twice) on its answer stream, then
    /// says how many roots came, or what the refusal was; `fail` is a
    /// JSON-RPC error; `hang` says one progress and never ends. A GET
    /// opens the session's stream, which stays open.
    pub(in crate::gateway) async fn asking_upstream() -> (testing::Stub, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let stub = testing::streaming_stub(move |head, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let mut seen = state.lock().expect("seen");
            seen.messages.push(v.clone());
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let method = v["method"].as_str().unwrap_or("");
            if method == "initialize" {
                seen.inits += 1;
                let mut r = Reply::new(
                    200,
                    "application/json",
                    json!({"jsonrpc": "2.0", "id": id, "result": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "asking", "version": "1"}}})
                    .to_string(),
                );
                r.headers
                    .push(("mcp-session-id".into(), format!("up-{}", seen.inits)));
                return Answer::Full(r);
            }
            let current = format!("mcp-session-id: up-{}", seen.inits);
            if !head.contains(&current) || std::mem::take(&mut seen.lose) {
                return Answer::Full(Reply::new(404, "text/plain", "no such session".into()));
            }
            if head.starts_with("get ") {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                seen.gets.push(tx);
                return Answer::Stream(rx);
            }
            if method.is_empty() {
                // The client's answer to a question, through the gateway.
                let q = id.as_str().unwrap_or_default().to_owned();
                if let Some((call, tx, left)) = seen.asking.remove(&q) {
                    if left > 0 && v.get("result").is_some() {
                        ask(&mut seen, call, tx, left - 1);
                    } else {
                        let text = match (&v["result"]["roots"], &v["error"]) {
                            (Value::Array(roots), _) => format!("{} roots", roots.len()),
                            (_, e) => format!("refused {}: {}", e["code"], e["message"]),
                        };
                        let _ = tx.send(event(json!({"jsonrpc": "2.0", "id": call,
                            "result": {"content": [{"type": "text", "text": text}]}})));
                    }
                }
                return accepted();
            }
            if id.is_null() {
                return accepted();
            }
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            match v.pointer("/params/name").and_then(Value::as_str) {
                Some("ask") => ask(&mut seen, id, tx, 0),
                Some("ask_twice") => ask(&mut seen, id, tx, 1),
                Some("hang") => {
                    let _ = tx.send(event(json!({"jsonrpc": "2.0",
                        "method": "notifications/progress",
                        "params": {"progressToken": 1, "progress": 1}})));
                    seen.open.push(tx);
                }
                Some("fail") => {
                    let _ = tx.send(event(json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32603, "message": "boom"}})));
                }
                _ => {
                    let _ = tx.send(event(json!({"jsonrpc": "2.0", "id": id,
                        "result": {"content": [{"type": "text", "text": "ok"}]}})));
                }
            }
            Answer::Stream(rx)
        })
        .await;
        (stub, seen)
    }

    fn call(id: u64, tool: &str, extra: Value, caps: Value) -> Request {
        let mut params = json!({"name": tool, "arguments": {}});
        if let (Some(p), Some(extra)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        modern(id, "tools/call", params, caps, &[])
    }

    fn text_of(body: &Value) -> String {
        body["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("a text result: {body}"))
            .to_owned()
    }

    /// The `requestState` of an `InputRequiredResult`, after checking it
    /// asks `roots/list`.
    fn asked_roots(body: &Value) -> String {
        let result = &body["result"];
        assert_eq!(result["resultType"], "input_required", "{body}");
        assert_eq!(
            result["inputRequests"][INPUT_KEY]["method"], "roots/list",
            "{body}"
        );
        result["requestState"]
            .as_str()
            .unwrap_or_else(|| panic!("a requestState: {body}"))
            .to_owned()
    }

    fn answer_roots(state: &str, n: usize) -> Value {
        let roots: Vec<Value> = (0..n)
            .map(|i| json!({"uri": format!("file:///r{i}")}))
            .collect();
        json!({"requestState": state, "inputResponses": {INPUT_KEY: {"roots": roots}}})
    }

    const ROOTS: fn() -> Value = || json!({"roots": {}});

    #[tokio::test]
    async fn a_call_that_asks_the_client_parks_and_its_retry_finishes_it() {
        let (up, seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw.handle(call(1, "ask", json!({}), ROOTS())).await;
        assert_eq!(r.status, StatusCode::OK);
        let state = asked_roots(&json_of(&r));
        assert_eq!(gw.bridges.parked.parked.len(), 1, "the call waits, parked");

        let r = gw
            .handle(call(2, "ask", answer_roots(&state, 3), ROOTS()))
            .await;
        let body = json_of(&r);
        assert_eq!(body["id"], 2, "{body}");
        assert_eq!(text_of(&body), "3 roots");
        assert!(gw.bridges.parked.parked.is_empty());

        // A state is answered once.
        let r = gw
            .handle(call(3, "ask", answer_roots(&state, 1), ROOTS()))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let body = json_of(&r);
        assert_eq!(body["error"]["code"], code::INVALID_PARAMS, "{body}");

        // One hidden session served them all; the upstream saw its own
        // request id answered.
        let seen = seen.lock().expect("seen");
        assert_eq!(seen.inits, 1);
        assert!(
            seen.messages
                .iter()
                .any(|m| m["id"] == "q1" && m["result"]["roots"].is_array()),
            "{:?}",
            seen.messages
        );
    }

    #[tokio::test]
    async fn rounds_go_on_until_upstream_max_input_rounds() {
        let (up, _seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw.handle(call(1, "ask_twice", json!({}), ROOTS())).await;
        let first = asked_roots(&json_of(&r));
        let r = gw
            .handle(call(2, "ask_twice", answer_roots(&first, 1), ROOTS()))
            .await;
        let second = asked_roots(&json_of(&r));
        assert_ne!(first, second, "each round has its own state");
        let r = gw
            .handle(call(3, "ask_twice", answer_roots(&second, 2), ROOTS()))
            .await;
        assert_eq!(text_of(&json_of(&r)), "2 roots");

        // With one round allowed, the gateway refuses the second question
        // to the upstream itself.
        let gw = gateway_with("stateful-2025", &up.url(), ", max_input_rounds: 1");
        let r = gw.handle(call(1, "ask_twice", json!({}), ROOTS())).await;
        let state = asked_roots(&json_of(&r));
        let r = gw
            .handle(call(2, "ask_twice", answer_roots(&state, 1), ROOTS()))
            .await;
        let text = text_of(&json_of(&r));
        assert!(
            text.starts_with(&format!("refused {}", code::UPSTREAM_ERROR))
                && text.contains("upstream.max_input_rounds"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_client_without_the_capability_is_never_asked() {
        let (up, _seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw.handle(call(1, "ask", json!({}), json!({}))).await;
        let text = text_of(&json_of(&r));
        assert!(
            text.starts_with(&format!("refused {}", era::errors::MISSING_CAPABILITY))
                && text.contains("'roots'"),
            "{text}"
        );
        assert!(gw.bridges.parked.parked.is_empty());
    }

    #[tokio::test]
    async fn an_upstream_error_is_the_calls_error() {
        let (up, _seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw.handle(call(7, "fail", json!({}), json!({}))).await;
        let body = json_of(&r);
        assert_eq!(body["id"], 7, "{body}");
        assert_eq!(body["error"]["code"], -32603, "{body}");
        assert_eq!(body["error"]["message"], "boom", "{body}");
    }

    #[tokio::test]
    async fn a_lost_upstream_session_is_opened_again_for_the_call() {
        let (up, seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw.handle(call(1, "echo", json!({}), json!({}))).await;
        assert_eq!(text_of(&json_of(&r)), "ok");
        seen.lock().expect("seen").lose = true;
        let r = gw.handle(call(2, "echo", json!({}), json!({}))).await;
        assert_eq!(text_of(&json_of(&r)), "ok", "answered in a new session");
        let seen = seen.lock().expect("seen");
        assert_eq!(seen.inits, 2, "initialized again, once");
        assert_eq!(gw.bridges.hidden.ids().len(), 1, "still one hidden session");
    }

    #[tokio::test]
    async fn a_client_that_leaves_cancels_the_upstream_call() {
        let (up, seen) = asking_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let mut r = gw.handle(call(1, "hang", json!({}), json!({}))).await;
        assert_eq!(r.status, StatusCode::OK);
        let crate::edge::ResponseBody::Stream(src) = &mut r.body else {
            panic!("a stream, as the call said something before its end")
        };
        let first = tokio::time::timeout(Duration::from_secs(5), src.next_chunk())
            .await
            .expect("the progress within 5 s")
            .expect("a chunk");
        assert!(
            String::from_utf8_lossy(&first).contains("notifications/progress"),
            "{first:?}"
        );
        let upstream_call = seen.lock().expect("seen").messages.iter().find_map(|m| {
            (m.pointer("/params/name") == Some(&json!("hang"))).then(|| m["id"].clone())
        });
        let upstream_call = upstream_call.expect("the call reached the upstream");
        drop(r);
        let cancelled = testing::eventually(Duration::from_secs(5), || {
            let seen = seen.clone();
            let call = upstream_call.clone();
            async move {
                seen.lock().expect("seen").messages.iter().any(|m| {
                    m["method"] == "notifications/cancelled" && m["params"]["requestId"] == call
                })
            }
        })
        .await;
        assert!(cancelled, "the upstream is told the call is over");
    }
}
