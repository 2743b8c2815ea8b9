//! The legacy HTTP+SSE transport of 2024-11-05: `/sse` opens a session
//! whose stream lives exactly as long as it, `/messages` takes its
//! requests.

use super::*;

impl Gateway {
    pub(super) async fn legacy_open(self: &Arc<Self>, call: Call<'_>) -> Result<Response, Reject> {
        if call.headers.contains_key(http::header::ACCEPT) {
            edge::check_get_framing(call.headers)?;
        }
        let (session, live) = self.open_legacy(call.org, call.identity).await?;
        Ok(self.legacy_stream(live, call.identity, &session))
    }

    /// A new legacy session of route `front` for `identity`, and its
    /// `/sse` stream, which starts with the `endpoint` event.
    pub(super) async fn open_legacy(
        &self,
        front: &Front,
        identity: &Identity,
    ) -> Result<(Arc<SessionState>, LiveStream), Reject> {
        let state = SessionState::new(
            session::mint_id(),
            &front.key,
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
            self.live().routes.path_of(&front.key, Endpoint::Messages),
            session.id
        );
        let prelude = sse_frame(None, Some("endpoint"), endpoint.as_bytes());
        let live = self.live_stream(front, &session, log, attach, Some(prelude));
        Ok((session, live))
    }

    /// The `/sse` stream of a legacy session: it ends with the caller's
    /// token, and the session ends with it.
    pub(super) fn legacy_stream(
        self: &Arc<Self>,
        mut live: LiveStream,
        identity: &Identity,
        session: &SessionState,
    ) -> Response {
        self.end_with_token(&mut live, identity);
        Response::sse(Box::new(LegacyStream {
            live,
            gateway: self.clone(),
            session: session.id.clone(),
        }))
    }

    pub(super) async fn legacy_post(
        self: &Arc<Self>,
        call: Call<'_>,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        let org = call.org;
        let session_id = req.query_param("session_id");
        let (session, log) = self
            .session_with_log(call, session_id.as_deref(), Transport::LegacySse)
            .await?;
        edge::check_json_content_type(&req.headers)?;
        let body = parse_post_body(&req.body)?;
        label.method = body_label(&body);
        self.check_batch(&body, "2024-11-05", true)?;
        self.rate_limit_server(call, &body).await?;
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
        let caller = call.detach();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            futures::stream::iter(body.messages().iter().zip(slots))
                .for_each_concurrent(BATCH_CONCURRENCY, |(m, slot)| {
                    this.legacy_message(caller.call(), &session, &log, m, slot)
                })
                .await;
        }));
        Ok(Response::json(
            StatusCode::ACCEPTED,
            Bytes::from_static(b"{}"),
        ))
    }

    /// One message of a legacy POST, in its in-flight `slot`; answers go
    /// on the `/sse` stream.
    pub(super) async fn legacy_message(
        self: &Arc<Self>,
        call: Call<'_>,
        session: &Arc<SessionState>,
        log: &Arc<SessionLog>,
        message: &Message,
        slot: crate::stream::Slot,
    ) {
        let org = call.org;
        if !message.is_request() {
            let absorbed = self
                .absorb(org, session, log, Some(slot), message, || {
                    call.session_headers(session)
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
            let coordination = self.bridges.rebinding.of(&session.id);
            let _one = coordination.lock.lock().await;
            let answer = match self.negotiate(call, &session.id, message).await {
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
                        self.ensure_listener(org, &session.id, false);
                    }
                    answer
                }
                Err(reject) => reject.body(),
            };
            let _ = self.append(log, STANDALONE, &answer, org);
            return;
        }
        if let Err(refusal) = self.police_all(call, log, std::slice::from_ref(message)) {
            let _ = self.append(log, STANDALONE, &refusal.body(), org);
            return;
        }
        // Re-read: initialize may have recorded the negotiated version.
        let current = match self.store.lookup(&session.id).await {
            Ok(Some(s)) => s,
            _ => session.clone(),
        };
        if let Some(answer) = self.answer_locally(org, &current, message).await {
            let body = answer.unwrap_or_else(|reject| reject.body());
            let _ = self.append(log, STANDALONE, &body, org);
            return;
        }
        let headers = call.session_headers(&current);
        self.forward_into(org, &current, log, STANDALONE, message, headers, Some(slot))
            .await;
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
