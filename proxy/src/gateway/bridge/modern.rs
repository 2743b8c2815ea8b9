//! The era bridge on the request path (ARCHITECTURE.md, "Era bridge"):
//! 2026-07-28 clients on any upstream, and handshake-era clients of a
//! 2026-07-28 upstream, whose `InputRequiredResult`s become real requests to
//! the client.

use std::time::Duration;

use serde_json::Map;

use super::background::{Feed, Next, Opened};
use super::hidden::{Asked, Park};
use super::*;
use crate::config::Era;
use crate::edge::ResponseBody;
use crate::era::{self, errors};
use crate::stream::KEEPALIVE;
use crate::stream::watch::Watches;
use crate::upstream::AnswerReader;

/// Longest pause before retrying an upstream that shed load (an
/// `InputRequiredResult` with only a `requestState`).
const MAX_SHED_BACKOFF: Duration = Duration::from_millis(250);

/// A 2026-07-28 message checked as a modern server would: its method,
/// id and checked request; `None` for a notification (nothing for an
/// upstream to do: cancellation is closing the response stream, and the
/// rest were removed in 2026-07-28).
pub(in crate::gateway) fn checked_modern<'m>(
    headers: &http::HeaderMap,
    message: &'m Message,
    params: Option<Value>,
) -> Result<Option<(&'m str, &'m Id, era::ModernRequest)>, Reject> {
    let Some(method) = message.method() else {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "a 2026-07-28 client sends requests and notifications only, never responses",
        ));
    };
    let id = message.request_id();
    let request = era::check_modern(headers, method, id, params)?;
    let Some(id) = id else {
        return Ok(None);
    };
    // Answered here for every upstream era: a handshake-era upstream
    // still serves them, but not to a client of this version.
    if let Some(removed) = era::removed_method(method) {
        return Err(removed.with_id(Some(id)));
    }
    Ok(Some((method, id, request)))
}

impl Gateway {
    /// The org's upstream era, probed first if it is `auto` and unknown.
    pub(in crate::gateway) async fn upstream_era(
        &self,
        org: &OrgRoute,
        id: Option<&Id>,
    ) -> Result<Era, Reject> {
        org.server
            .resolve_era()
            .await
            .map_err(|e| probe_reject(e, id))
    }

    /// Probes the upstreams whose era is `auto` and still unknown, so the
    /// first client does not wait for it and `/metrics` shows it early.
    pub async fn probe_eras(&self) {
        let live = self.live_full();
        for org in live.routes.orgs() {
            if org.server.era.known().is_none()
                && let Err(e) = org.server.resolve_era().await
            {
                tracing::warn!(org = %org.name, error = %e, "cannot find out the upstream's era yet; will retry");
            }
        }
    }

    // ----- 2026-07-28 clients ---------------------------------------------

    /// A sessionless 2026-07-28 request: checked as a modern server would,
    /// then passed to a modern upstream or translated for a legacy one.
    pub(in crate::gateway) async fn modern_post(
        self: &Arc<Self>,
        call: Call<'_>,
        message: &Message,
        params: Option<Value>,
    ) -> Result<Response, Reject> {
        let Some((_, id, request)) = checked_modern(call.headers, message, params)? else {
            return Ok(Response::empty(StatusCode::ACCEPTED));
        };
        let watches = Watches::default();
        let params = || Some(Value::Object(request.params.clone()));
        match self.police(call, &request.method, Some(id), params) {
            Ok(Some(watch)) => watches.watch(id.clone(), watch),
            Ok(None) => {}
            Err(refusal) => return refusal.into_response(),
        }
        let answer = match self.upstream_era(call.org, Some(id)).await {
            Ok(Era::Modern) => self.modern_to_modern(call, message, &watches).await,
            Ok(_) => self.modern_to_legacy(call, id, request, &watches).await,
            Err(reject) => Err(reject),
        };
        if watches.is_empty() {
            return answer;
        }
        let mut answer = policed::settled(&watches, answer)?;
        answer.body = match std::mem::replace(&mut answer.body, ResponseBody::Empty) {
            ResponseBody::Stream(inner) if !watches.is_empty() => {
                ResponseBody::Stream(Box::new(policed::WatchedStream::new(inner, watches)))
            }
            body => body,
        };
        Ok(answer)
    }

    /// Pass-through, plus auth and routing: the client's modern headers go
    /// along, its credentials do not. `watches` are told the replica.
    async fn modern_to_modern(
        self: &Arc<Self>,
        call: Call<'_>,
        message: &Message,
        watches: &Watches,
    ) -> Result<Response, Reject> {
        // No gateway session: a modern client has none.
        let mut headers = call.upstream_headers("", None);
        era::copy_modern_headers(call.headers, &mut headers);
        let listen = message.method() == Some("subscriptions/listen");
        self.answer_modern_client(
            call.org,
            headers,
            message.raw.clone(),
            message.request_id(),
            listen,
            watches,
        )
        .await
    }

    /// A modern client's request to a handshake-era upstream: the gateway
    /// has done the handshake (and answers `server/discover` from it), the
    /// request goes without the modern `_meta`, the result comes back with
    /// the modern result fields. `watches` are told the replica.
    async fn modern_to_legacy(
        self: &Arc<Self>,
        call: Call<'_>,
        id: &Id,
        request: era::ModernRequest,
        watches: &Watches,
    ) -> Result<Response, Reject> {
        let org = call.org;
        // The upstream's own description, only where it is needed: a
        // stateful upstream's calls do not wait for it.
        let info = || async {
            org.server
                .info(Era::Stateless2025)
                .await
                .map_err(|e| probe_reject(e, Some(id)))
        };
        match request.method.as_str() {
            "server/discover" => {
                org.metrics.bridged.discover.inc();
                let result = era::discover_from_initialize(&*info().await?);
                return Ok(Response::json(
                    StatusCode::OK,
                    jsonrpc::result_body(Some(id), result),
                ));
            }
            "subscriptions/listen" if org.server.era.known() == Some(Era::Stateful2025) => {
                return self
                    .listen_in_hidden_session(call, id, &request.params)
                    .await;
            }
            "subscriptions/listen" => {
                // A stateless 2025 upstream has no channel for change
                // notifications: acknowledge an empty subset and hold the
                // stream, as a modern server with nothing to offer would.
                let ack = json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/subscriptions/acknowledged",
                    "params": {
                        "_meta": {"io.modelcontextprotocol/subscriptionId": id.to_value()},
                        "notifications": {},
                    },
                });
                return Ok(Response::sse(Box::new(Quiet {
                    first: Some(sse_frame(None, Some("message"), ack.to_string().as_bytes())),
                    keepalive: self.live().config.streams.keepalive,
                })));
            }
            _ => {}
        }
        if org.server.era.known() == Some(Era::Stateful2025) {
            return self.modern_to_stateful(call, id, request, watches).await;
        }
        let info = info().await?;
        let version = info
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(era::LATEST_LEGACY);
        // The call's own id, where a worker may finish it (a hold).
        let call_id = holds::call_id();
        let headers = call.upstream_headers(&call_id, Some(version));
        if request.method == "tools/call" {
            let lister = super::params::Lister::Sessionless(&headers);
            self.check_tool_call_headers(call, id, &request.params, lister)
                .await?;
        }
        org.metrics.bridged.handshake.inc();
        let hold = HoldHook {
            gateway: self.clone(),
            org: org.clone(),
            call: call_id,
        };
        let body = era::request_without_modern_meta(Some(id), &request.method, request.params);
        let answer = org
            .server
            .pool
            .send(headers, body)
            .await
            .map_err(|e| modern_upstream_reject(e, Some(id)))?;
        watches.served(Some(id), answer.lease.replica());
        let reader = AnswerReader::new(answer, org.server.pool.read_limits);
        self.respond_modern(
            org,
            reader,
            Some(id),
            Some(request.method),
            None,
            Some(hold),
        )
        .await
    }

    /// Sends a modern client's request upstream and streams the answer
    /// back (see [`Gateway::respond_modern`]).
    async fn answer_modern_client(
        &self,
        org: &OrgRoute,
        headers: crate::upstream::Outbound,
        body: Bytes,
        id: Option<&Id>,
        listen: bool,
        watches: &Watches,
    ) -> Result<Response, Reject> {
        let answer = org
            .server
            .pool
            .send(headers, body)
            .await
            .map_err(|e| modern_upstream_reject(e, id))?;
        watches.served(id, answer.lease.replica());
        // A listen stream is meant to stay open and quiet.
        let limits = if listen {
            background::listen_limits(org)
        } else {
            org.server.pool.read_limits
        };
        let reader = AnswerReader::new(answer, limits);
        self.respond_modern(org, reader, id, None, None, None).await
    }

    /// A modern client's answer: JSON stays JSON, SSE is piped message by
    /// message. `to_modern` names the request's method when its result
    /// must be reshaped for a modern client. With `park` (and the id the
    /// upstream answers with), an upstream request to the client parks the
    /// upstream call and becomes an `InputRequiredResult`. With `hold`, a
    /// hold the upstream answers with is kept (see [`HoldHook`]). Dropping the response (the client closed it)
    /// drops the upstream request: that is the cancellation of 2026-07-28.
    ///
    /// For a handshake-era upstream the gateway is the modern server, and
    /// some final answers must carry their own HTTP status (a -32601 is a
    /// 404, a -32021 a 400). So an SSE answer is not committed to at once:
    /// when what the upstream says first (within one keep-alive interval)
    /// ends the answer, the client gets it as JSON with its status.
    pub(in crate::gateway) async fn respond_modern(
        &self,
        org: &OrgRoute,
        mut reader: AnswerReader,
        id: Option<&Id>,
        to_modern: Option<String>,
        park: Option<(Park, Id)>,
        hold: Option<HoldHook>,
    ) -> Result<Response, Reject> {
        let (park, upstream_id) = park.unzip();
        if reader.is_json() {
            let body = reader.json_body().await.map_err(|e| read_reject(e, id))?;
            if let (Some(hook), Some(id)) = (hold, id)
                && let Some(asked) = holds::hold_of(&body, self.holds.config())
            {
                let method = to_modern.as_deref().unwrap_or_default();
                return Ok(Response::sse(hook.start(asked, id, method)));
            }
            return Ok(match &to_modern {
                Some(method) => modern_json(&body, |v| era::response_to_modern(v, method)),
                None => Response::json(StatusCode::OK, body),
            });
        }
        let Some(id) = id else {
            return Ok(Response::empty(StatusCode::ACCEPTED));
        };
        let legacy = to_modern.is_some();
        let mut pipe = Pipe {
            reader: Some(reader),
            id: id.clone(),
            upstream_id,
            to_modern,
            org: org.name.clone(),
            keepalive: self.live().config.streams.keepalive,
            park,
            hold,
            held: None,
            first: None,
            failed: false,
            final_status: StatusCode::OK,
        };
        if legacy {
            let decide_by = tokio::time::Instant::now() + self.live().config.streams.keepalive;
            loop {
                match tokio::time::timeout_at(decide_by, pipe.step()).await {
                    Ok(Some(Step::Send(out, true))) if pipe.failed => {
                        return Ok(Response::json(StatusCode::BAD_GATEWAY, out));
                    }
                    Ok(Some(Step::Send(out, true))) => {
                        return Ok(Response::json(pipe.final_status, out));
                    }
                    Ok(Some(Step::Send(out, false))) => {
                        pipe.first = Some(out);
                        break;
                    }
                    Ok(Some(Step::Quiet)) => {}
                    Ok(Some(Step::Held)) | Ok(None) | Err(_) => break,
                }
            }
        }
        Ok(Response::sse(Box::new(pipe)))
    }

    // ----- handshake-era clients of a modern upstream ----------------------

    /// The `initialize` answer for a modern upstream, made by the gateway
    /// from the upstream's `server/discover`.
    pub(in crate::gateway) async fn initialize_from_modern(
        &self,
        org: &OrgRoute,
        init: &Message,
    ) -> Result<Bytes, Reject> {
        let id = init.request_id();
        let info = org
            .server
            .info(Era::Modern)
            .await
            .map_err(|e| probe_reject(e, id))?;
        let params = init.params().unwrap_or(Value::Null);
        let requested = params.get("protocolVersion").and_then(Value::as_str);
        let result = era::initialize_from_discover(&info, requested);
        org.metrics.bridged.handshake.inc();
        Ok(jsonrpc::result_body(id, result))
    }

    /// A single request of a handshake-era session to a modern upstream.
    /// The first round is sent before the response is chosen: a complete
    /// JSON answer (the common case) goes back as JSON, with no stream.
    /// An SSE answer, or one that needs the client's input, continues in
    /// [`Gateway::exchange_modern`] on a POST stream.
    pub(in crate::gateway) async fn forward_modern(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        session: Arc<SessionState>,
        log: Arc<SessionLog>,
        request: Message,
        headers: crate::upstream::Outbound,
        client_headers: &http::HeaderMap,
    ) -> Result<Response, Reject> {
        let id = request.request_id().cloned();
        let guard = self.track(org, &log, &session.id, id.as_ref())?;
        let round = id
            .as_ref()
            .map(|id| ModernRound::of(org, &session, &request, id));
        let (round, first) = match round {
            Some(Ok(round)) => {
                let answer = round
                    .send(org, &headers, &guard.token)
                    .await
                    .ok_or_else(|| cancelled(id.as_ref()))?
                    .map_err(|e| upstream_reject(e, id.as_ref()))?;
                log.watches.served(id.as_ref(), answer.lease.replica());
                if answer.kind != AnswerKind::Json {
                    (round, First::Answer(answer))
                } else {
                    let body =
                        json_unless_cancelled(answer, org, &guard.token, id.as_ref()).await?;
                    match serde_json::from_slice::<Value>(&body) {
                        // A client that prefers SSE gets the stream (with
                        // its priming event) the JSON fast path skips.
                        Ok(v) if edge::prefers_sse(client_headers) => (round, First::Value(v)),
                        Ok(v) if era::input_required(&v).is_none() => {
                            let legacy = serde_json::to_vec(&era::response_to_legacy(v))
                                .map_or(body, Bytes::from);
                            return Ok(Response::json(StatusCode::OK, legacy));
                        }
                        Ok(v) => (round, First::Value(v)),
                        Err(_) => return Ok(Response::json(StatusCode::OK, body)),
                    }
                }
            }
            // Bad params: the answer says so, on the stream as before.
            Some(Err(body)) => return self.post_stream_of(org, &session, log, &body),
            None => return Ok(Response::empty(StatusCode::ACCEPTED)),
        };
        self.post_stream(
            org,
            &session,
            log,
            |this, org, session, log, stream| async move {
                let (first, token) = (Some(first), &guard.token);
                this.exchange_modern(&org, &session, &log, stream, round, headers, token, first)
                    .await;
                guard
            },
        )
    }

    /// One request of a handshake-era session to a modern upstream: the
    /// session's data goes along as `_meta`; an `InputRequiredResult` turns
    /// into requests to the client on `stream`, and the upstream is asked
    /// again with the answers, at most `upstream.max_input_rounds` times.
    /// Only the final result reaches the client. `first` is the first
    /// round's answer when the caller already has it.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::gateway) async fn exchange_modern(
        self: &Arc<Self>,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        stream: StreamId,
        mut round: ModernRound,
        headers: crate::upstream::Outbound,
        cancel: &CancellationToken,
        mut first: Option<First>,
    ) {
        let id = round.id.clone();
        let mut rounds: u32 = 0;
        loop {
            let answer = match first.take() {
                Some(First::Value(value)) => Ok(value),
                Some(First::Answer(answer)) => Err(answer),
                None => match round.send(org, &headers, cancel).await {
                    None => return,
                    Some(Ok(a)) => {
                        log.watches.served(Some(&id), a.lease.replica());
                        Err(a)
                    }
                    Some(Err(e)) => {
                        let body = upstream_reject(e, Some(&id)).body();
                        let _ = self.append(log, stream, &body, org);
                        return;
                    }
                },
            };
            let value = match answer {
                Ok(value) => value,
                Err(answer) => {
                    let reader = AnswerReader::new(answer, org.server.pool.read_limits);
                    let Some(response) = self
                        .relay(reader, log, stream, Some(id.clone()), org, cancel, None)
                        .await
                    else {
                        return;
                    };
                    let Ok(value) = serde_json::from_slice::<Value>(&response) else {
                        let _ = self.append(log, stream, &response, org);
                        return;
                    };
                    value
                }
            };
            let Some(input) = era::input_required(&value) else {
                let body = serde_json::to_vec(&era::response_to_legacy(value)).unwrap_or_default();
                let _ = self.append(log, stream, &body, org);
                return;
            };
            rounds += 1;
            let max_rounds = org.server.max_input_rounds;
            if rounds > max_rounds {
                let body = jsonrpc::error_body(
                    Some(&id),
                    code::UPSTREAM_ERROR,
                    &format!(
                        "the upstream of org '{}' still asked for input after {max_rounds} rounds (upstream.max_input_rounds); giving up on {}",
                        org.name, round.method
                    ),
                );
                let _ = self.append(log, stream, &body, org);
                return;
            }
            org.metrics.bridged.input_round.inc();
            let answers = if input.requests.is_empty() {
                // Load shedding: the upstream asks for the same call again.
                let pause = (Duration::from_millis(50) * rounds).min(MAX_SHED_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {},
                    _ = cancel.cancelled() => return,
                }
                Map::new()
            } else {
                let span = crate::telemetry::span(
                    || tracing::info_span!("bridge round", org = %org.name, round = rounds, method = %round.method, asks = input.requests.len()),
                );
                let asked = self.ask_client(org, session, log, stream, &input.requests, cancel);
                match tracing::Instrument::instrument(asked, span).await {
                    Ok(Some(answers)) => answers,
                    Ok(None) => return,
                    Err(reject) => {
                        let _ = self.append(log, stream, &reject.with_id(Some(&id)).body(), org);
                        return;
                    }
                }
            };
            round.params.remove("inputResponses");
            round.params.remove("requestState");
            if !answers.is_empty() {
                round
                    .params
                    .insert("inputResponses".into(), Value::Object(answers));
            }
            if let Some(state) = input.state {
                round
                    .params
                    .insert("requestState".into(), Value::from(state));
            }
        }
    }

    /// Sends an upstream's input requests to the client on `stream` and
    /// collects the results by key. `Ok(None)`: the request was cancelled.
    async fn ask_client(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        stream: StreamId,
        requests: &Map<String, Value>,
        cancel: &CancellationToken,
    ) -> Result<Option<Map<String, Value>>, Reject> {
        let mut asks = Vec::with_capacity(requests.len());
        for (key, request) in requests {
            let Some(method) = request.get("method").and_then(Value::as_str) else {
                return Err(Reject::new(
                    StatusCode::BAD_GATEWAY,
                    code::UPSTREAM_ERROR,
                    format!(
                        "the upstream of org '{}' sent input request '{key}' without a method",
                        org.name
                    ),
                ));
            };
            let Some(capability) = era::capability_for(method) else {
                return Err(Reject::new(
                    StatusCode::BAD_GATEWAY,
                    code::UPSTREAM_ERROR,
                    format!(
                        "the upstream of org '{}' asked for input by '{method}', which is not a client request",
                        org.name
                    ),
                ));
            };
            if !era::declares(session.client_capabilities.as_ref(), capability) {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    errors::MISSING_CAPABILITY,
                    format!(
                        "the upstream needs the client to answer {method}, but this client did not declare the '{capability}' capability in initialize"
                    ),
                )
                .with_data(json!({"requiredCapabilities": {capability: {}}})));
            }
            asks.push((key, method, request.get("params")));
        }
        let mut pending = self.replies.pending();
        let mut waits = Vec::with_capacity(asks.len());
        for (key, method, params) in asks {
            let Some((rid, rx)) = pending.await_reply(&session.id) else {
                continue;
            };
            let body = era::client_request(&rid, method, params, &session.protocol_version);
            if self.append(log, stream, &body, org).is_err() {
                return Ok(None);
            }
            waits.push((key, method, rx));
        }
        let wait = org.server.pool.read_limits.max_duration;
        let deadline = tokio::time::Instant::now() + wait;
        let mut answers = Map::new();
        for (key, method, rx) in waits {
            let reply = tokio::select! {
                r = tokio::time::timeout_at(deadline, rx) => r,
                _ = cancel.cancelled() => return Ok(None),
            };
            let reply = match reply {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => return Ok(None),
                Err(_) => {
                    return Err(Reject::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        code::UPSTREAM_ERROR,
                        format!(
                            "the client did not answer {method} within {wait:?} (upstream.max_duration)"
                        ),
                    ));
                }
            };
            match reply.get("result") {
                Some(result) => {
                    answers.insert(key.clone(), result.clone());
                }
                None => {
                    let why = reply
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("no result");
                    return Err(Reject::new(
                        StatusCode::OK,
                        code::UPSTREAM_ERROR,
                        format!("the client answered {method} with an error: {why}"),
                    ));
                }
            }
        }
        Ok(Some(answers))
    }
}

/// The first round's answer of a modern exchange, when the caller has it.
pub(in crate::gateway) enum First {
    /// A JSON answer, read: it asked for input.
    Value(Value),
    /// An SSE answer, not yet read.
    Answer(crate::upstream::Answer),
}

/// What every round of a modern exchange sends: the request's method and
/// params, and the session's `_meta`, worked out once per request.
pub(in crate::gateway) struct ModernRound {
    id: Id,
    method: String,
    params: Map<String, Value>,
    meta: Map<String, Value>,
}

impl ModernRound {
    /// The parts of a handshake-era request for a modern upstream, or the
    /// error body to answer instead.
    pub(in crate::gateway) fn of(
        org: &OrgRoute,
        session: &SessionState,
        request: &Message,
        id: &Id,
    ) -> Result<ModernRound, Bytes> {
        let params = match request.params() {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(jsonrpc::error_body(
                    Some(id),
                    code::INVALID_PARAMS,
                    "params must be an object",
                ));
            }
        };
        org.metrics.bridged.meta_injected.inc();
        Ok(ModernRound {
            id: id.clone(),
            method: request.method().unwrap_or_default().to_owned(),
            params,
            meta: era::session_meta(session),
        })
    }

    /// Sends this round upstream; `None` if the request was cancelled
    /// first.
    async fn send(
        &self,
        org: &OrgRoute,
        headers: &crate::upstream::Outbound,
        cancel: &CancellationToken,
    ) -> Option<Result<crate::upstream::Answer, UpstreamError>> {
        let mut h = headers.clone();
        era::put_modern_headers(&mut h, &self.method, &self.params);
        let body = era::request_with_meta(&self.id, &self.method, self.params.clone(), &self.meta);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            a = org.server.pool.send(h, body) => Some(a),
        }
    }
}

/// Why a stateless 2025 upstream's question to the client fails at once:
/// the client's answer would reach a fresh transport of the upstream, never
/// the call that asked.
pub(in crate::gateway) fn unanswerable(org: &str, method: &str) -> String {
    format!(
        "the upstream of org '{org}' asked the client for {method}, but a stateless-2025 upstream cannot receive the answer; run it stateful (era stateful-2025) or modern"
    )
}

/// A final answer for a modern client of a handshake-era upstream,
/// rewritten by `f`, as JSON with the status its error calls for.
fn modern_json(body: &Bytes, f: impl FnOnce(Value) -> Value) -> Response {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let v = f(v);
            Response::json(era::modern_status(&v), Bytes::from(v.to_string()))
        }
        Err(_) => Response::json(StatusCode::OK, body.clone()),
    }
}

/// A JSON body rewritten by `f`; unchanged if it is not JSON.
pub(in crate::gateway) fn reshape(body: &Bytes, f: impl FnOnce(Value) -> Value) -> Bytes {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Bytes::from(f(v).to_string()),
        Err(_) => body.clone(),
    }
}

/// An upstream SSE answer on its way to a modern client, one message per
/// event, with keep-alives while the upstream is quiet. No task of its
/// own: the client's pulls drive the upstream reads, and dropping it (the
/// client closed the stream) drops the upstream request.
pub(in crate::gateway) struct Pipe {
    /// `None` once the answer is complete (or parked).
    reader: Option<AnswerReader>,
    /// The id the client waits on.
    id: Id,
    /// The id the upstream answers with, when it is not `id`: a resumed
    /// call answers the request that started it.
    upstream_id: Option<Id>,
    /// The request's method, when its result must be reshaped for a
    /// modern client (the upstream is of the handshake era).
    to_modern: Option<String>,
    org: Arc<str>,
    keepalive: Duration,
    /// Where an upstream request to the client parks the call; without
    /// it, such a request cannot be answered (stateless upstream).
    park: Option<Park>,
    /// Where a hold the upstream answers with is kept (a stateless
    /// upstream's call); without it, a hold is passed on as a result.
    hold: Option<HoldHook>,
    /// The held call's stream, once the upstream answered with a hold.
    held: Option<Box<dyn ChunkSource>>,
    /// A message read before the answer was committed to SSE, sent first.
    first: Option<Bytes>,
    /// The last message is the gateway's error: the upstream failed.
    failed: bool,
    /// The HTTP status the final answer carries when it goes back as
    /// JSON (a modern client of a handshake-era upstream), worked out
    /// while it is reshaped.
    final_status: StatusCode,
}

/// One step of a [`Pipe`].
pub(in crate::gateway) enum Step {
    /// A message for the client; `true` if it is the last.
    Send(Bytes, bool),
    /// The gateway answered the upstream itself; nothing for the client.
    Quiet,
    /// The upstream answered with a hold: what follows comes from the
    /// hold (see [`HoldHook`]).
    Held,
}

impl Pipe {
    /// The continuation of a parked call: the rest of the upstream's answer
    /// to call `call`, for the client waiting on `id`.
    pub(in crate::gateway) fn resumed(
        reader: AnswerReader,
        id: Id,
        call: Id,
        method: String,
        org: Arc<str>,
        keepalive: Duration,
        park: Park,
    ) -> Pipe {
        Pipe {
            reader: Some(reader),
            id,
            upstream_id: Some(call),
            to_modern: Some(method),
            org,
            keepalive,
            park: Some(park),
            hold: None,
            held: None,
            first: None,
            failed: false,
            final_status: StatusCode::OK,
        }
    }

    /// Reads the upstream's next message and says what the client gets
    /// from it; `None` once the answer is complete. Cancel-safe: the only
    /// wait is for the upstream's next message.
    pub(in crate::gateway) async fn step(&mut self) -> Option<Step> {
        let reader = self.reader.as_mut()?;
        let next = reader.next_message().await;
        let id = &self.id;
        let (out, last) = match next {
            Ok(Some(message)) => match jsonrpc::parse_message(&message).map(|m| m.kind) {
                Ok(Kind::Response { id: rid })
                    if rid == *self.upstream_id.as_ref().unwrap_or(id) =>
                {
                    if let Some(hook) = self.hold.take()
                        && let Some(asked) = holds::hold_of(&message, hook.gateway.holds.config())
                    {
                        self.reader = None;
                        let method = self.to_modern.as_deref().unwrap_or_default();
                        self.held = Some(hook.start(asked, id, method));
                        return Some(Step::Held);
                    }
                    let renamed = self.upstream_id.is_some();
                    let status = &mut self.final_status;
                    let body = match &self.to_modern {
                        Some(method) => reshape(&message, |mut v| {
                            if renamed {
                                v["id"] = id.to_value();
                            }
                            let v = era::response_to_modern(v, method);
                            *status = era::modern_status(&v);
                            v
                        }),
                        None => message,
                    };
                    (body, true)
                }
                Ok(Kind::Request { method, .. }) if self.to_modern.is_some() => {
                    match (self.park.take(), self.reader.take()) {
                        (Some(park), Some(reader)) => {
                            let call = self.upstream_id.clone().unwrap_or_else(|| id.clone());
                            match park.on_request(reader, call, id, &message) {
                                Asked::Parked(input_required) => (input_required, true),
                                Asked::Answered(park, reader) => {
                                    self.park = Some(park);
                                    self.reader = Some(reader);
                                    return Some(Step::Quiet);
                                }
                            }
                        }
                        _ => {
                            let why = unanswerable(&self.org, &method);
                            self.failed = true;
                            (
                                jsonrpc::error_body(Some(id), code::UPSTREAM_ERROR, &why),
                                true,
                            )
                        }
                    }
                }
                _ => (message, false),
            },
            Ok(None) => {
                let why = format!(
                    "upstream {} ended its answer without a response",
                    reader.replica()
                );
                self.failed = true;
                (
                    jsonrpc::error_body(Some(id), code::UPSTREAM_ERROR, &why),
                    true,
                )
            }
            Err(e) => {
                self.failed = true;
                (
                    jsonrpc::error_body(Some(id), code::UPSTREAM_ERROR, &e.to_string()),
                    true,
                )
            }
        };
        if last {
            self.reader = None;
        }
        Some(Step::Send(out, last))
    }
}

#[async_trait]
impl ChunkSource for Pipe {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(sse_frame(None, Some("message"), &first));
        }
        if let Some(held) = &mut self.held {
            return held.next_chunk().await;
        }
        match tokio::time::timeout(self.keepalive, self.step()).await {
            Ok(Some(Step::Held)) => self.held.as_mut()?.next_chunk().await,
            Err(_) | Ok(Some(Step::Quiet)) => Some(Bytes::from_static(KEEPALIVE)),
            Ok(Some(Step::Send(out, _))) => Some(sse_frame(None, Some("message"), &out)),
            Ok(None) => None,
        }
    }

    fn written(&mut self) {
        if let Some(held) = &mut self.held {
            held.written();
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // A call of a hidden session the client left before its end: a
        // 2025 upstream does not take a closed stream for a cancellation.
        if self.reader.is_some()
            && let Some(park) = &self.park
        {
            let call = self.upstream_id.as_ref().unwrap_or(&self.id);
            park.cancel(call, "the client closed the stream");
        }
    }
}

/// A stream of one last event.
struct Last(Option<Bytes>);

#[async_trait]
impl ChunkSource for Last {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        self.0.take()
    }
}

/// A stream with nothing to say but its first event and keep-alives.
struct Quiet {
    first: Option<Bytes>,
    keepalive: Duration,
}

/// What a 2026-07-28 client's call to a stateless upstream needs to be held:
/// the call's id (the upstream's `Ratatosk-Session`). Such a client takes
/// no requests during a call, so its capabilities do not matter here.
pub(in crate::gateway) struct HoldHook {
    gateway: Arc<Gateway>,
    org: Arc<OrgRoute>,
    call: String,
}

impl HoldHook {
    /// The held call's stream (keep-alives, what the worker publishes,
    /// then the result), fed from a log of the call's own by the hold's
    /// task. The client closing it is the cancel of 2026-07-28, which the
    /// worker sees as the hold's state.
    /// `method` is the call's, whose result the worker's response is.
    fn start(
        self,
        asked: Result<holds::HoldRequest, String>,
        id: &Id,
        method: &str,
    ) -> Box<dyn ChunkSource> {
        let HoldHook { gateway, org, call } = self;
        let method = method.to_owned();
        let log = Arc::new(SessionLog::new(gateway.hub.limits()));
        let cancel = CancellationToken::new();
        let keepalive = gateway.live().config.streams.keepalive;
        let (stream, attach) = match log
            .begin_stream()
            .ok()
            .and_then(|stream| Some((stream, log.attach(stream, None).ok()?)))
        {
            Some(opened) => opened,
            // A new log is open; should it not be, the client is told.
            None => {
                let body = jsonrpc::error_body(
                    Some(id),
                    code::INTERNAL_ERROR,
                    "cannot open a stream for the held call",
                );
                return Box::new(Last(Some(sse_frame(None, Some("message"), &body))));
            }
        };
        let metrics = org.metrics.stream.clone();
        let (log2, id, token) = (log.clone(), id.clone(), cancel.clone());
        tokio::spawn(async move {
            let client = HoldClient {
                id: &call,
                protocol_version: era::MODERN_VERSION,
                client_capabilities: None,
                modern_method: Some(&method),
            };
            gateway
                .keep_hold(asked, &client, &log2, stream, id, &org, &token)
                .await;
            log2.end_stream(stream);
        });
        Box::new(CancelOnDrop {
            inner: LiveStream::new(log, attach, None, keepalive, Some(metrics)),
            _cancel: cancel.drop_guard(),
        })
    }
}

/// A stream whose end (the client closed it, or it finished) cancels
/// what feeds it.
struct CancelOnDrop<S> {
    inner: S,
    _cancel: tokio_util::sync::DropGuard,
}

#[async_trait]
impl<S: ChunkSource> ChunkSource for CancelOnDrop<S> {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        self.inner.next_chunk().await
    }

    fn written(&mut self) {
        self.inner.written();
    }
}

#[async_trait]
impl ChunkSource for Quiet {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        tokio::time::sleep(self.keepalive).await;
        Some(Bytes::from_static(KEEPALIVE))
    }
}

/// A legacy session's `subscriptions/listen` stream with a modern
/// upstream, for [`Gateway::hold_background`]: it asks for every list
/// change and the session's resource subscriptions, and is opened again
/// at once when the session's filter changes.
pub(in crate::gateway) struct Listen<'a> {
    pub(in crate::gateway) org: &'a OrgRoute,
    pub(in crate::gateway) reopen: &'a tokio::sync::Notify,
    /// Listens so far, for their ids.
    pub(in crate::gateway) round: u64,
}

#[async_trait]
impl Feed for Listen<'_> {
    const WHAT: &'static str = "listen";
    const PAUSE_ON_CHANGE: bool = false;

    async fn open(&mut self, session: &SessionState, stop: &CancellationToken) -> Opened {
        self.round += 1;
        let Some(id) = Id::from_value(&Value::from(format!("ratatosk-listen-{}", self.round)))
        else {
            return Opened::End;
        };
        let mut params = Map::new();
        params.insert(
            "notifications".into(),
            json!({
                "toolsListChanged": true,
                "promptsListChanged": true,
                "resourcesListChanged": true,
                "resourceSubscriptions": session.resource_subscriptions,
            }),
        );
        let mut headers = stateful::background_headers(self.org, session, "listen");
        era::put_modern_headers(&mut headers, "subscriptions/listen", &params);
        let body = era::request_with_meta(
            &id,
            "subscriptions/listen",
            params,
            &era::session_meta(session),
        );
        let answer = tokio::select! {
            a = self.org.server.pool.send(headers, body) => a,
            _ = stop.cancelled() => return Opened::End,
        };
        match answer {
            Ok(answer) => Opened::Reading(AnswerReader::new(
                answer,
                background::listen_limits(self.org),
            )),
            Err(e) => {
                tracing::warn!(org = %self.org.name, session = %short(&session.id), error = %e, "cannot open the upstream listen stream; retrying");
                Opened::Retry
            }
        }
    }

    fn on_message(&mut self, _: &SessionState, message: &Bytes) -> Next {
        match jsonrpc::parse_message(message).map(|m| m.kind) {
            Ok(Kind::Notification { method })
                if method != "notifications/subscriptions/acknowledged" =>
            {
                Next::Pass
            }
            Ok(Kind::Response { .. }) => Next::EndOfStream,
            _ => Next::Skip,
        }
    }

    async fn changed(&self) {
        self.reopen.notified().await;
    }
}

#[cfg(test)]
pub(in crate::gateway) mod tests {
    //! 2026-07-28 clients through the gateway, driven without a client
    //! socket; upstreams are loopback stubs.

    use super::*;
    use crate::edge::ResponseBody;
    use crate::session::MemorySessionStore;
    use crate::testing;
    use std::path::Path;

    /// A gateway with one org, `org-1`, whose upstream has `era`.
    pub(in crate::gateway) fn gateway(era: &str, replica: &str) -> Arc<Gateway> {
        gateway_with(era, replica, "")
    }

    /// [`gateway`] with more `upstream` settings (`, key: value`).
    pub(in crate::gateway) fn gateway_with(era: &str, replica: &str, more: &str) -> Arc<Gateway> {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
             streams: {{keepalive: 2s}}\npublish: {{secret: unit-test-secret-0123}}\n\
             orgs:\n  org-1: {{upstream: {{era: {era}, replicas: [\"{replica}\"], timeout: 2s{more}}}}}\n"
        );
        let config = Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
        Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
    }

    /// A 2026-07-28 request with consistent headers and `_meta`; `extra`
    /// headers are added.
    pub(in crate::gateway) fn modern(
        id: u64,
        method: &str,
        mut params: Value,
        caps: Value,
        extra: &[(&str, &str)],
    ) -> Request {
        params["_meta"] = json!({
            era::META_VERSION: era::MODERN_VERSION,
            era::META_CAPABILITIES: caps,
            era::META_CLIENT_INFO: {"name": "unit", "version": "1"},
        });
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", era::MODERN_VERSION),
            ("mcp-method", method),
        ];
        let name = params
            .get("name")
            .or_else(|| params.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(name) = &name {
            headers.push(("mcp-name", name));
        }
        headers.extend_from_slice(extra);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        testing::request(Method::POST, "/gw/org-1/mcp", &headers, body.to_string())
    }

    pub(in crate::gateway) fn json_of(r: &Response) -> Value {
        match &r.body {
            ResponseBody::Full(b) => serde_json::from_slice(b).expect("json body"),
            _ => panic!("expected a full body, got a stream ({})", r.status),
        }
    }

    /// Everything a streamed answer says until it ends (or 5 s pass).
    pub(in crate::gateway) async fn drain(r: &mut Response) -> String {
        let ResponseBody::Stream(src) = &mut r.body else {
            panic!("expected a stream")
        };
        let mut text = String::new();
        while let Ok(Some(chunk)) =
            tokio::time::timeout(Duration::from_secs(5), src.next_chunk()).await
        {
            src.written();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    }

    fn sse(messages: &[Value]) -> testing::Reply {
        let body: String = messages
            .iter()
            .map(|m| format!("event: message\ndata: {m}\n\n"))
            .collect();
        testing::Reply::new(200, "text/event-stream", body)
    }

    fn json_reply(status: u16, v: Value) -> testing::Reply {
        testing::Reply::new(status, "application/json", v.to_string())
    }

    /// A stateful 2025 upstream: sessions from `initialize`, answers on
    /// SSE. `tools/call` of `progress` says something first;
    /// `needs_sampling` refuses with -32021; other methods than tools/call
    /// and tools/list are unknown (-32601).
    pub(in crate::gateway) async fn stateful_upstream() -> testing::Stub {
        testing::full_stub(|head, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let method = v["method"].as_str().unwrap_or("");
            if method == "initialize" {
                let mut r = json_reply(
                    200,
                    json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {"tools": {"listChanged": true}},
                    "serverInfo": {"name": "stateful", "version": "1"}}}),
                );
                r.headers.push(("mcp-session-id".into(), "up-1".into()));
                return r;
            }
            if !head.contains("mcp-session-id: up-1") {
                return json_reply(
                    400,
                    json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": -32600, "message": "no session"}}),
                );
            }
            if id.is_null() {
                return testing::Reply {
                    status: 202,
                    headers: vec![],
                    body: String::new(),
                };
            }
            let result = |r: Value| json!({"jsonrpc": "2.0", "id": id, "result": r});
            match (method, v.pointer("/params/name").and_then(Value::as_str)) {
                ("tools/call", Some("progress")) => sse(&[
                    json!({"jsonrpc": "2.0", "method": "notifications/progress",
                           "params": {"progressToken": 1, "progress": 1}}),
                    result(json!({"content": []})),
                ]),
                ("tools/call", Some("needs_sampling")) => {
                    sse(&[json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32021, "message": "sampling not declared",
                              "data": {"requiredCapabilities": {"sampling": {}}}}})])
                }
                ("tools/call", _) => {
                    sse(&[result(json!({"content": [{"type": "text", "text": "ok"}]}))])
                }
                ("tools/list", _) => sse(&[result(json!({"tools": []}))]),
                _ => sse(&[json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32601, "message": "Method not found"}})]),
            }
        })
        .await
    }

    #[tokio::test]
    async fn removed_methods_are_404_from_the_gateway_for_every_upstream_era() {
        let up = testing::stub(|_| (500, "text/plain", "must not be asked".into())).await;
        for era in ["modern", "stateless-2025", "stateful-2025"] {
            let gw = gateway(era, &up.url());
            for (n, method) in [
                "initialize",
                "ping",
                "logging/setLevel",
                "resources/subscribe",
                "resources/unsubscribe",
            ]
            .into_iter()
            .enumerate()
            {
                let r = gw
                    .handle(modern(500 + n as u64, method, json!({}), json!({}), &[]))
                    .await;
                assert_eq!(r.status, StatusCode::NOT_FOUND, "{era} {method}");
                let body = json_of(&r);
                assert_eq!(
                    body["error"]["code"],
                    code::METHOD_NOT_FOUND,
                    "{era} {method}: {body}"
                );
                assert_eq!(body["id"], 500 + n as u64);
            }
        }
        assert_eq!(up.hits(), 0, "answered by the gateway");
    }

    #[tokio::test]
    async fn a_modern_upstreams_404_method_not_found_is_passed_on() {
        let up = testing::stub(|body| {
            let id = testing::request_id(body);
            (404, "application/json", format!(
                r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32601,"message":"Method not found: unknown/method"}}}}"#
            ))
        })
        .await;
        let gw = gateway("modern", &up.url());
        let r = gw
            .handle(modern(601, "unknown/method", json!({}), json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let body = json_of(&r);
        assert_eq!(body["error"]["code"], code::METHOD_NOT_FOUND, "{body}");
        assert_eq!(body["id"], 601);
    }

    #[tokio::test]
    async fn a_stateless_upstreams_method_not_found_becomes_a_404() {
        let up = testing::full_stub(|_, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            if v["method"] == "initialize" {
                return json_reply(
                    200,
                    json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "serverInfo": {"name": "stateless", "version": "1"}}}),
                );
            }
            json_reply(
                200,
                json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32601, "message": "Method not found"}}),
            )
        })
        .await;
        let gw = gateway("stateless-2025", &up.url());
        let r = gw
            .handle(modern(601, "unknown/method", json!({}), json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(json_of(&r)["error"]["code"], code::METHOD_NOT_FOUND);
    }

    #[tokio::test]
    async fn a_stateful_upstreams_final_answer_comes_as_json_with_its_status() {
        let up = stateful_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let r = gw
            .handle(modern(601, "unknown/method", json!({}), json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(json_of(&r)["error"]["code"], code::METHOD_NOT_FOUND);

        let call = |id, name: &str| {
            modern(
                id,
                "tools/call",
                json!({"name": name, "arguments": {}}),
                json!({}),
                &[],
            )
        };
        let r = gw.handle(call(401, "needs_sampling")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let body = json_of(&r);
        assert_eq!(body["error"]["code"], era::errors::MISSING_CAPABILITY);
        assert_eq!(
            body["error"]["data"]["requiredCapabilities"],
            json!({"sampling": {}})
        );
        assert_eq!(body["id"], 401);

        let r = gw.handle(call(7, "plain")).await;
        assert_eq!(r.status, StatusCode::OK);
        let body = json_of(&r);
        assert_eq!(body["result"]["resultType"], "complete", "{body}");
        assert_eq!(body["id"], 7);

        // Something said before the response: the answer streams.
        let mut r = gw.handle(call(8, "progress")).await;
        assert_eq!(r.status, StatusCode::OK);
        let text = drain(&mut r).await;
        let progress = text.find("notifications/progress").expect("progress first");
        let result = text
            .find("\"resultType\":\"complete\"")
            .expect("then the result");
        assert!(progress < result, "{text}");
    }
}

#[cfg(test)]
mod sse_preference_tests {
    //! 2025 clients that list `text/event-stream` first in `Accept`.

    use super::tests::{drain, gateway, json_of};
    use super::*;
    use crate::testing;

    /// An upstream answering everything with JSON: `server/discover` and
    /// `initialize` as a modern or stateless upstream would, calls with a
    /// result.
    async fn json_upstream() -> testing::Stub {
        testing::stub(|body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let result = match v["method"].as_str() {
                Some("server/discover") => json!({"supportedVersions": [era::MODERN_VERSION],
                    "capabilities": {"tools": {}}, "resultType": "complete"}),
                Some("initialize") => {
                    json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                    "serverInfo": {"name": "json", "version": "1"}})
                }
                _ => json!({"content": [{"type": "text", "text": "ok"}], "resultType": "complete"}),
            };
            (
                200,
                "application/json",
                json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
            )
        })
        .await
    }

    fn post(body: &str, accept: &str, sid: Option<&str>) -> Request {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", accept),
            ("mcp-protocol-version", "2025-11-25"),
        ];
        if let Some(sid) = sid {
            headers.push(("mcp-session-id", sid));
        }
        testing::request(Method::POST, "/gw/org-1/mcp", &headers, body.to_owned())
    }

    #[tokio::test]
    async fn a_client_preferring_sse_gets_a_primed_stream_others_keep_json() {
        let up = json_upstream().await;
        for era in ["modern", "stateless-2025"] {
            let gw = gateway(era, &up.url());
            let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"unit","version":"1"}}}"#;
            let r = gw
                .handle(post(init, "application/json, text/event-stream", None))
                .await;
            let sid = r
                .headers
                .get(&MCP_SESSION_ID)
                .expect("a session")
                .to_str()
                .expect("ascii")
                .to_owned();
            let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x","arguments":{}}}"#;

            let r = gw
                .handle(post(
                    call,
                    "application/json, text/event-stream",
                    Some(&sid),
                ))
                .await;
            assert_eq!(
                json_of(&r)["result"]["content"][0]["text"],
                "ok",
                "{era}: JSON stays JSON"
            );

            let mut r = gw
                .handle(post(
                    call,
                    "text/event-stream, application/json",
                    Some(&sid),
                ))
                .await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(
                r.headers[http::header::CONTENT_TYPE],
                "text/event-stream",
                "{era}"
            );
            let text = drain(&mut r).await;
            let first = text.split("\n\n").next().unwrap_or_default();
            assert!(
                first.contains("retry: ") && first.contains("data: "),
                "{era}: priming first: {text}"
            );
            assert!(text.contains(r#""text":"ok""#), "{era}: {text}");
            if era == "modern" {
                assert!(!text.contains("resultType"), "a 2025 result: {text}");
            }
        }
    }
}

#[cfg(test)]
mod legacy_client_tests {
    //! Handshake-era clients of a 2026-07-28 upstream: the gateway plays
    //! the upstream's `InputRequiredResult` rounds with the client, and a
    //! client's cancellation closes the upstream call.

    use std::sync::Mutex;

    use tokio::sync::mpsc::UnboundedSender;

    use super::tests::gateway_with;
    use super::*;
    use crate::gateway::tests::{initialize_with, post, text_until};
    use crate::testing::{self, Answer, Reply};

    const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"roots":{}},"clientInfo":{"name":"unit","version":"1"}}}"#;

    /// A modern upstream. `tools/call` of `ask` asks for `roots/list`
    /// until the call comes with its answer, then says how many roots came;
    /// `ask_forever` never stops asking; `hang` says one progress and
    /// stays open (its stream's sender is kept in the list returned).
    async fn modern_upstream() -> (testing::Stub, Arc<Mutex<Vec<UnboundedSender<String>>>>) {
        let open = Arc::new(Mutex::new(Vec::new()));
        let streams = open.clone();
        let stub = testing::streaming_stub(move |_, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let reply = |result: Value| {
                Answer::Full(Reply::new(
                    200,
                    "application/json",
                    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
                ))
            };
            let ask = json!({"resultType": "input_required", "requestState": "s1",
                "inputRequests": {"r": {"method": "roots/list", "params": {}}}});
            match (
                v["method"].as_str(),
                v.pointer("/params/name").and_then(Value::as_str),
            ) {
                (Some("server/discover"), _) => reply(json!({
                    "supportedVersions": [era::MODERN_VERSION],
                    "capabilities": {"tools": {}}, "resultType": "complete",
                    "serverInfo": {"name": "modern", "version": "1"}})),
                (Some("tools/call"), Some("ask")) => {
                    match v.pointer("/params/inputResponses/r/roots") {
                        Some(Value::Array(roots)) if v["params"]["requestState"] == "s1" => {
                            reply(json!({"resultType": "complete", "content": [
                                {"type": "text", "text": format!("{} roots", roots.len())}]}))
                        }
                        _ => reply(ask),
                    }
                }
                (Some("tools/call"), Some("ask_forever")) => reply(ask),
                (Some("tools/call"), Some("hang")) => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                        "params": {"progressToken": 1, "progress": 1}});
                    let _ = tx.send(format!("event: message\ndata: {progress}\n\n"));
                    streams.lock().expect("streams").push(tx);
                    Answer::Stream(rx)
                }
                _ => reply(json!({"resultType": "complete", "content": []})),
            }
        })
        .await;
        (stub, open)
    }

    fn send(sid: &str, body: Value) -> Request {
        post(
            &body.to_string(),
            &[
                ("mcp-session-id", sid),
                ("mcp-protocol-version", "2025-11-25"),
            ],
        )
    }

    fn call(id: u64, tool: &str) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": {}}})
    }

    /// The messages of an SSE text.
    fn messages(text: &str) -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    }

    #[tokio::test]
    async fn the_upstreams_input_requests_are_asked_of_the_client_then_the_call_goes_on() {
        let (up, _) = modern_upstream().await;
        let gw = gateway_with("modern", &up.url(), "");
        let sid = initialize_with(&gw, INIT).await;
        let mut r = gw.handle(send(&sid, call(5, "ask"))).await;
        assert_eq!(r.status, StatusCode::OK);
        let text = text_until(&mut r, "roots/list").await;
        let asked = messages(&text)
            .into_iter()
            .find(|m| m["method"] == "roots/list")
            .expect("a roots/list request");
        assert_ne!(asked["id"], 5, "under an id of the gateway's");
        let answer = json!({"jsonrpc": "2.0", "id": asked["id"],
            "result": {"roots": [{"uri": "file:///a"}, {"uri": "file:///b"}]}});
        assert_eq!(
            gw.handle(send(&sid, answer)).await.status,
            StatusCode::ACCEPTED
        );
        let text = text_until(&mut r, "roots\"").await;
        let done = messages(&text)
            .into_iter()
            .find(|m| m["id"] == 5)
            .expect("the call's response");
        assert_eq!(done["result"]["content"][0]["text"], "2 roots", "{done}");
        assert!(
            done["result"].get("resultType").is_none(),
            "a 2025 result: {done}"
        );
    }

    #[tokio::test]
    async fn rounds_stop_at_upstream_max_input_rounds() {
        let (up, _) = modern_upstream().await;
        let gw = gateway_with("modern", &up.url(), ", max_input_rounds: 2");
        let sid = initialize_with(&gw, INIT).await;
        let mut r = gw.handle(send(&sid, call(6, "ask_forever"))).await;
        let mut answered = 0;
        let mut reads = 0;
        let done = loop {
            reads += 1;
            assert!(reads < 20, "no response to the call after {reads} events");
            let text = text_until(&mut r, "\n\n").await;
            let mut done = None;
            for m in messages(&text) {
                if m["method"] == "roots/list" {
                    answered += 1;
                    let answer = json!({"jsonrpc": "2.0", "id": m["id"], "result": {"roots": []}});
                    gw.handle(send(&sid, answer)).await;
                } else if m["id"] == 6 {
                    done = Some(m);
                }
            }
            if let Some(done) = done {
                break done;
            }
        };
        assert_eq!(answered, 2, "asked twice, then refused");
        assert_eq!(done["error"]["code"], code::UPSTREAM_ERROR, "{done}");
        let message = done["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("upstream.max_input_rounds"), "{message}");
    }

    #[tokio::test]
    async fn a_client_without_the_capability_gets_an_error_not_a_request() {
        let (up, _) = modern_upstream().await;
        let gw = gateway_with("modern", &up.url(), "");
        let init = INIT.replace(r#""roots":{}"#, "");
        let sid = initialize_with(&gw, &init).await;
        let mut r = gw.handle(send(&sid, call(7, "ask"))).await;
        let text = text_until(&mut r, r#""id":7"#).await;
        assert!(
            messages(&text).iter().all(|m| m["method"] != "roots/list"),
            "{text}"
        );
        let done = messages(&text)
            .into_iter()
            .find(|m| m["id"] == 7)
            .expect("the call's response");
        assert_eq!(done["error"]["code"], errors::MISSING_CAPABILITY, "{done}");
    }

    #[tokio::test]
    async fn a_clients_cancellation_closes_the_upstream_call() {
        let (up, open) = modern_upstream().await;
        let gw = gateway_with("modern", &up.url(), "");
        let sid = initialize_with(&gw, INIT).await;
        let mut r = gw.handle(send(&sid, call(8, "hang"))).await;
        text_until(&mut r, "notifications/progress").await;
        let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": 8}});
        assert_eq!(
            gw.handle(send(&sid, cancel)).await.status,
            StatusCode::ACCEPTED
        );
        let upstream = open.lock().expect("streams")[0].clone();
        // The stub notices a closed connection when it writes to it.
        let closed = testing::eventually(Duration::from_secs(5), || {
            let _ = upstream.send(": still here\n\n".into());
            let closed = upstream.is_closed();
            async move { closed }
        })
        .await;
        assert!(closed, "the gateway closed the upstream call's stream");
    }
}
