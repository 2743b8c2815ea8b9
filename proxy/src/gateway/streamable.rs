//! Streamable HTTP (`/mcp`): POST (JSON or a stream per request, holds,
//! cancels), GET (the session's stream, resumable) and DELETE.

use super::*;

impl Gateway {
    /// Batches are allowed only where the protocol version allows them (a
    /// session's `negotiated` one, or else the one the request names), and
    /// only up to `limits.max_batch` messages.
    pub(super) fn check_batch(
        &self,
        body: &Body,
        version: &str,
        negotiated: bool,
    ) -> Result<(), Reject> {
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
        let max = self.live().config.limits.max_batch;
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

    pub(super) async fn mcp_post(
        self: &Arc<Self>,
        call: Call<'_>,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        let parsed;
        let body = match &req.parsed {
            Some(body) => body,
            None => {
                edge::check_post_framing(&req.headers)?;
                parsed = parse_post_body(&req.body)?;
                &parsed
            }
        };
        label.method = body_label(body);
        self.rate_limit_server(call, body).await?;
        if !req.headers.contains_key(&MCP_SESSION_ID)
            && let Body::Single(m) = &body
        {
            // Parsed once: the modern checks use the same params.
            let params = m.params();
            if crate::era::speaks_modern(&req.headers, m.method(), params.as_ref()) {
                // Boxed: each future on the request path is moved (copied)
                // whole when it starts, so the rare and large paths (a
                // 2026-07-28 request, initialize, a client's message) are
                // kept out of this one's size (issue 19).
                return Box::pin(self.modern_post(call, m, params)).await;
            }
        }
        if let Some(init) = self.initialize_in(&req.headers, body)? {
            return Box::pin(self.initialize(call, init)).await;
        }
        let session = self.streamable_session(call).await?;
        let log = self.session_log(&session, false).await?;
        // The negotiated version governs the session, whatever other
        // supported version a request names.
        self.check_batch(body, &session.protocol_version, true)?;

        let mut requests = Vec::new();
        for m in body.messages() {
            if m.is_request() {
                requests.push(m.clone());
            } else {
                Box::pin(self.absorb(call.org, &session, &log, None, m, || {
                    call.session_headers(&session)
                }))
                .await?;
            }
        }
        if requests.is_empty() {
            return Ok(Response::empty(StatusCode::ACCEPTED));
        }
        if let Err(refusal) = self.police_all(call, &log, &requests) {
            return refusal.into_response();
        }
        if let [only] = requests.as_slice()
            && let Some(answer) = self.answer_locally(call.org, &session, only).await
        {
            return answer.map(|body| Response::json(StatusCode::OK, body));
        }
        let answer = self
            .forward_streamable(call, session, log.clone(), requests)
            .await;
        policed::settled(&log.watches, answer)
    }

    /// The `initialize` of a POST, checked: a request of its own. A POST
    /// without a session has its batch checked by the version it names.
    pub(super) fn initialize_in<'b>(
        &self,
        headers: &http::HeaderMap,
        body: &'b Body,
    ) -> Result<Option<&'b Message>, Reject> {
        // A session's batches are decided by its negotiated version alone,
        // whatever supported version the request names.
        if let Some(version) = edge::protocol_version(headers)?
            && !headers.contains_key(&MCP_SESSION_ID)
        {
            self.check_batch(body, version, false)?;
        }
        let Some(init) = body
            .messages()
            .iter()
            .find(|m| m.method() == Some("initialize"))
        else {
            return Ok(None);
        };
        if matches!(body, Body::Batch(_)) || !init.is_request() {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "initialize must be a request of its own, not part of a batch or a notification",
            ));
        }
        Ok(Some(init))
    }

    pub(super) async fn forward_streamable(
        self: &Arc<Self>,
        call: Call<'_>,
        session: Arc<SessionState>,
        log: Arc<SessionLog>,
        requests: Vec<Message>,
    ) -> Result<Response, Reject> {
        let org = call.org;
        let headers = call.session_headers(&session);
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
            log.watches.served(id.as_ref(), answer.lease.replica());
            match answer.kind {
                AnswerKind::Json => {
                    // Pass the upstream's JSON through as it is.
                    let body =
                        json_unless_cancelled(answer, org, &guard.token, id.as_ref()).await?;
                    if let (Some(request), Some(asked)) =
                        (id.clone(), holds::hold_of(&body, self.holds.config()))
                    {
                        // A hold: the answer comes later, so on a stream.
                        return self.post_stream(
                            org,
                            &session,
                            log,
                            |this, org, session, log, stream| async move {
                                let client = HoldClient::of(&session);
                                let token = &guard.token;
                                this.keep_hold(asked, &client, &log, stream, request, &org, token)
                                    .await;
                                guard
                            },
                        );
                    }
                    if edge::prefers_sse(call.headers) {
                        // The client asked for a stream (with its priming
                        // event): the answer goes on one.
                        return self.post_stream_of(org, &session, log, &body);
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
                    let reader = AnswerReader::new(answer, org.server.pool.read_limits);
                    return self.post_stream(
                        org,
                        &session,
                        log,
                        |this, org, session, log, stream| async move {
                            let (resume, token) = (Some(session.as_ref()), &guard.token);
                            this.relay(reader, &log, stream, id, &org, token, resume)
                                .await;
                            guard
                        },
                    );
                }
            }
        }

        if let [single] = requests.as_slice() {
            let modern =
                self.forward_modern(org, session, log, single.clone(), headers, call.headers);
            return Box::pin(modern).await;
        }
        // A batch (2025-03-26): each request goes upstream on its own, and
        // every answer streams back on one SSE response.
        self.post_stream(
            org,
            &session,
            log,
            |this, org, session, log, stream| async move {
                futures::stream::iter(requests.iter())
                    .for_each_concurrent(BATCH_CONCURRENCY, |m| {
                        this.forward_into(&org, &session, &log, stream, m, headers.clone(), None)
                    })
                    .await;
            },
        )
    }

    /// Answers a POST with a stream of its own, which `fill` writes in a
    /// task of its own (given owned handles: the gateway, org, session, log
    /// and the stream's id); the stream ends when `fill` is done. What `fill`
    /// returns (the request's in-flight guard) is dropped only after that,
    /// so the request stays cancellable until its stream has ended.
    pub(super) fn post_stream<F, Fut>(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        session: &Arc<SessionState>,
        log: Arc<SessionLog>,
        fill: F,
    ) -> Result<Response, Reject>
    where
        F: FnOnce(Arc<Self>, Arc<OrgRoute>, Arc<SessionState>, Arc<SessionLog>, StreamId) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send,
    {
        let stream = log.begin_stream().map_err(|_| session_not_found())?;
        let work = fill(
            self.clone(),
            org.clone(),
            session.clone(),
            log.clone(),
            stream,
        );
        let ending = log.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let kept = work.await;
            ending.end_stream(stream);
            drop(kept);
        }));
        Ok(self.post_stream_response(org, session, log, stream))
    }

    /// Answers a POST with `body` alone, on a stream of its own.
    pub(super) fn post_stream_of(
        &self,
        org: &Front,
        session: &SessionState,
        log: Arc<SessionLog>,
        body: &[u8],
    ) -> Result<Response, Reject> {
        let stream = log.begin_stream().map_err(|_| session_not_found())?;
        let _ = self.append(&log, stream, body, org);
        log.end_stream(stream);
        Ok(self.post_stream_response(org, session, log, stream))
    }

    pub(super) fn post_stream_response(
        &self,
        org: &Front,
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

    pub(super) fn live_stream(
        &self,
        org: &Front,
        session: &SessionState,
        log: Arc<SessionLog>,
        attach: crate::stream::Attach,
        prelude: Option<Bytes>,
    ) -> LiveStream {
        let mut live = LiveStream::new(
            log,
            attach,
            prelude,
            self.live().config.streams.keepalive,
            Some(org.metrics.stream.clone()),
        );
        if edge::wants_priming(&session.protocol_version) {
            live.set_prelude(priming_frame(
                live.position(),
                self.live().config.streams.retry,
            ));
        }
        live
    }

    /// Forwards one request and appends everything it answers to `stream`,
    /// in `slot` if one was taken for it already.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_into(
        self: &Arc<Self>,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        stream: StreamId,
        request: &Message,
        headers: crate::upstream::Outbound,
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
                log.watches.served(id.as_ref(), answer.lease.replica());
                let reader = AnswerReader::new(answer, org.server.pool.read_limits);
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
    pub(super) async fn relay(
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
                            if org.server.era.known() == Some(Era::Stateless2025) =>
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
    pub(super) fn append(
        &self,
        log: &SessionLog,
        stream: StreamId,
        payload: &[u8],
        org: &Front,
    ) -> Result<(), crate::stream::Closed> {
        log.append(stream, payload)?;
        org.metrics.published_upstream.inc();
        Ok(())
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
    pub(super) async fn absorb(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        log: &Arc<SessionLog>,
        slot: Option<crate::stream::Slot>,
        message: &Message,
        headers: impl FnOnce() -> crate::upstream::Outbound,
    ) -> Result<(), Reject> {
        if message.method().is_none() && self.replies.take(&session.id, message) {
            return Ok(());
        }
        if let Kind::Response { id } = &message.kind
            && let Some(node) = replies::gateway_request_node(id)
        {
            // The gateway's own request: sent by another node, which takes
            // the answer; none waits for it here, whatever its id says.
            if node != self.node {
                self.cluster().notify(&Notice::Reply {
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
                log.watches.unwatch(&target);
                if self.cancel_in_flight(session.id.clone(), target.clone()) {
                    tracing::debug!(session = %short(&session.id), "request cancelled by the client");
                } else if self
                    .cluster()
                    .running_elsewhere(&session.id, target.as_json())
                    .await
                {
                    // It runs on another node: tell them only then, or every
                    // cancel of any id would go to every node.
                    self.cluster().notify(&Notice::Cancel {
                        session: session.id.clone(),
                        id: target.to_value(),
                    });
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
    pub(super) async fn answer_locally(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        session: &SessionState,
        request: &Message,
    ) -> Option<Result<Bytes, Reject>> {
        let id = request.request_id()?;
        let method = request.method()?;
        let subscription = matches!(method, "resources/subscribe" | "resources/unsubscribe")
            && org.server.era.known() == Some(Era::Modern);
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
        let max = self.live().config.sessions.max_subscriptions;
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
            self.ensure_listener(org, &session.id, true);
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
    pub(super) fn reserve(
        &self,
        org: &OrgRoute,
        log: &Arc<SessionLog>,
        id: Option<&Id>,
    ) -> Result<crate::stream::Slot, Reject> {
        let max = self.live().config.sessions.max_in_flight;
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
    pub(super) fn track(
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
    pub(super) fn track_in(
        &self,
        slot: crate::stream::Slot,
        session: &str,
        id: Option<&Id>,
    ) -> Result<InFlight, Reject> {
        // Other nodes may receive the client's cancellation of it.
        self.in_flight.register(session, id, self.cluster(), slot)
    }

    pub(super) async fn mcp_get(self: &Arc<Self>, call: Call<'_>) -> Result<Response, Reject> {
        let org = call.org;
        edge::check_get_framing(call.headers)?;
        // Validated only: an unsupported version is a 400.
        edge::protocol_version(call.headers)?;
        let session = self.streamable_session(call).await?;
        let (log, attach) = self
            .attach_standalone(org, &session, call.header(&LAST_EVENT_ID))
            .await?;
        self.ensure_listener(org, &session.id, false);
        let mut live = self.live_stream(org, &session, log, attach, None);
        self.end_with_token(&mut live, call.identity);
        Ok(Response::sse(Box::new(live)))
    }

    /// The session's standalone stream, from `last_event_id` if the client
    /// resumes.
    pub(super) async fn attach_standalone(
        &self,
        org: &Front,
        session: &SessionState,
        last_event_id: Option<&str>,
    ) -> Result<(Arc<SessionLog>, crate::stream::Attach), Reject> {
        let resume = match last_event_id {
            None => None,
            Some(text) => Some(EventId::parse(text).ok_or_else(|| {
                Reject::bad_request(format!(
                    "Last-Event-ID '{}' is not an event id of this gateway (expected '<stream>.<seq>')",
                    jsonrpc::clip(text, 64)
                ))
            })?),
        };
        // Another node may have served the stream up to its last event.
        let log = self.session_log(session, true).await?;
        let attach = log
            .attach(
                resume.map_or(STANDALONE, |e| e.stream),
                resume.map(|e| e.seq),
            )
            .map_err(|e| match e {
                AttachError::Closed => session_not_found(),
                AttachError::UnknownEvent => Reject::bad_request(format!(
                    "Last-Event-ID '{}' names an event this session never had",
                    jsonrpc::clip(last_event_id.unwrap_or_default(), 64)
                )),
            })?;
        if attach.gap {
            tracing::warn!(org = %org.key, session = %short(&session.id),
                "resumed stream may have missed events: they left the event log (raise sessions.event_log_size)");
        }
        Ok((log, attach))
    }

    /// A stream authenticated once must not outlive its token: it ends
    /// when the token would be refused (`exp` plus the allowed clock skew),
    /// and the client reconnects with a fresh one.
    pub(super) fn end_with_token(&self, live: &mut LiveStream, identity: &Identity) {
        let Some(expires) = identity.expires_at else {
            return;
        };
        let skew = self
            .live()
            .config
            .identity
            .as_ref()
            .map_or(std::time::Duration::ZERO, |i| i.clock_skew);
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        live.end_at(std::time::Instant::now() + left + skew);
    }

    pub(super) async fn mcp_delete(self: &Arc<Self>, call: Call<'_>) -> Result<Response, Reject> {
        // Validated only: an unsupported version is a 400.
        edge::protocol_version(call.headers)?;
        let session = self.streamable_session(call).await?;
        self.end_session(&session.id, "deleted by the client")
            .await
            .map_err(store_reject)?;
        Ok(Response::empty(StatusCode::NO_CONTENT))
    }
}

pub(super) fn parse_post_body(body: &Bytes) -> Result<Body, Reject> {
    jsonrpc::parse_body(body)
        .map_err(|e| Reject::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
}

/// An upstream's JSON answer, read unless the request is cancelled first
/// (or while it is read): then the client gets the cancel, and nothing the
/// upstream said about the request.
pub(super) async fn json_unless_cancelled(
    answer: crate::upstream::Answer,
    org: &OrgRoute,
    token: &CancellationToken,
    id: Option<&Id>,
) -> Result<Bytes, Reject> {
    let mut reader = AnswerReader::new(answer, org.server.pool.read_limits);
    let body = tokio::select! {
        biased;
        _ = token.cancelled() => return Err(cancelled(id)),
        b = reader.json_body() => b.map_err(|e| read_reject(e, id))?,
    };
    if token.is_cancelled() {
        return Err(cancelled(id));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ResponseBody;
    use crate::gateway::tests::*;
    use crate::testing;
    use std::time::Duration;

    #[tokio::test]
    async fn an_sse_answer_is_relayed_event_by_event_with_gateway_ids() {
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
    async fn an_array_from_the_upstream_is_not_a_response() {
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
    async fn batches_follow_the_negotiated_version_and_the_size_cap() {
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
    async fn a_sessions_batches_are_decided_by_its_negotiated_version_alone() {
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
    async fn a_session_cannot_flood_the_upstream() {
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
}
