//! A session's life: `initialize` and admission, look-ups (bound to
//! their user), the event log, publishing, its end and the idle reaper.

use super::*;

impl Gateway {
    pub(super) async fn initialize(
        self: &Arc<Self>,
        call: Call<'_>,
        init: &Message,
    ) -> Result<Response, Reject> {
        let (org, identity) = (call.org, call.identity);
        let session_id = session::mint_id();
        let id = init.request_id().cloned();
        let params = init.params().unwrap_or(Value::Null);
        self.check_client_data(org, &params)
            .map_err(|r| r.with_id(id.as_ref()))?;
        self.check_admission(call)
            .await
            .map_err(|r| r.with_id(id.as_ref()))?;
        let (response, upstream) = self.negotiate(call, &session_id, init).await?;
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
            &org.key,
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
        let header = session_header(&session_id)?;
        Ok(Response::json(StatusCode::OK, response).with_header(MCP_SESSION_ID, header))
    }

    /// Sends `initialize` upstream and returns the upstream's response to
    /// it, with the upstream's own session if it is stateful.
    pub(super) async fn negotiate(
        &self,
        call: Call<'_>,
        session_id: &str,
        init: &Message,
    ) -> Result<(Bytes, Option<session::UpstreamSession>), Reject> {
        let org = call.org;
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
        let headers = call.upstream_headers(session_id, None);
        let params = init.params().unwrap_or(Value::Null);
        self.handshake(org, headers, id, init.raw.clone(), params)
            .await
    }

    /// Moves the org's sessions gauge (its handle was resolved at start).
    /// With several nodes, sets the sessions gauge to Redis's count of
    /// every node's sessions (at each reap, and before `/metrics` answers).
    pub async fn count_sessions(&self) {
        let Some(dropped) = self.cluster().dropped() else {
            return;
        };
        // The writer's own counts, brought to the counters.
        let unreplicated = self.cluster().unreplicated().unwrap_or(0);
        for (counter, total) in [
            (&self.metrics.shared_dropped, dropped),
            (&self.metrics.shared_unreplicated, unreplicated),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        // The gauge is the org's: the sessions of all its routes.
        let mut counts: std::collections::HashMap<&str, (i64, &OrgRoute)> =
            std::collections::HashMap::new();
        let live = self.live_full();
        for route in live.routes.orgs() {
            match self.store.count_org(&route.key).await {
                Ok(n) => {
                    let n = i64::try_from(n).unwrap_or(i64::MAX);
                    counts.entry(&route.name).or_insert((0, route)).0 += n;
                }
                Err(e) => {
                    tracing::warn!(org = %route.key, error = %e, "cannot count the org's sessions");
                }
            }
        }
        for (n, route) in counts.into_values() {
            route.metrics.sessions.set(n);
        }
    }

    /// Counts a session in or out of the sessions gauge (one node; see
    /// [`Gateway::count_sessions`] for several).
    pub(super) fn count_session(&self, org: &str, by: i64) {
        if self.cluster().is_shared() {
            return;
        }
        if let Some(route) = self.live().routes.org(org) {
            route.metrics.sessions.add(by);
        }
    }

    /// What an `initialize` says about the client must fit
    /// `sessions.max_client_bytes`; the refusal names the fields.
    pub(super) fn check_client_data(&self, org: &Front, params: &Value) -> Result<(), Reject> {
        session::check_client_data(
            [
                ("params.clientInfo", params.get("clientInfo")),
                ("params.capabilities", params.get("capabilities")),
            ],
            self.live().config.sessions.max_client_bytes,
        )
        .map_err(|why| {
            org.metrics.refused.client_data.inc();
            Reject::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, why)
        })
    }

    /// The session limits of the config, for the store.
    pub(super) fn admission(&self) -> session::Admission {
        session::Admission {
            per_subject: self.live().config.sessions.max_per_subject,
            total: self.live().config.sessions.max_total,
        }
    }

    /// Refuses early a session the store would not admit, before work a
    /// refusal would waste (opening an upstream session).
    pub(super) async fn check_admission(&self, call: Call<'_>) -> Result<(), Reject> {
        self.store
            .admits(&call.org.key, &call.identity.subject, self.admission())
            .await
            .map_err(|e| self.session_reject(call.org, e))
    }

    /// A store failure as the client sees it; the limits are counted.
    pub(super) fn session_reject(&self, org: &Front, e: StoreError) -> Reject {
        match &e {
            StoreError::SubjectFull { .. } => org.metrics.refused.sessions_per_subject.inc(),
            StoreError::Full { .. } => org.metrics.refused.sessions_total.inc(),
            _ => {}
        }
        store_reject(e)
    }

    pub(super) async fn create_session(
        &self,
        state: SessionState,
    ) -> Result<Arc<SessionState>, Reject> {
        let org = state.org.clone();
        let id = state.id.clone();
        let state = match self.store.insert(state, self.admission()).await {
            Ok(state) => state,
            Err(e) => {
                return Err(match self.live().routes.org(&org) {
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
                if !state.members.is_empty() {
                    self.end_members(&state).await;
                }
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
    pub(super) fn cancel_in_flight(&self, session: String, id: Id) -> bool {
        self.in_flight.cancel(session, id)
    }

    /// Stops the session's requests running on this node.
    pub(super) fn stop_requests(&self, id: &str) {
        self.in_flight.stop_session(id);
    }

    /// What is left to do when a session ends: its local state (and other
    /// nodes' too), its upstream session, the gauge.
    pub(super) fn forget_session(&self, state: &SessionState, why: &str) {
        self.cluster().notify(&Notice::Ended {
            session: state.id.clone(),
            hidden: state.transport == Transport::Hidden,
        });
        self.drop_local(&state.id);
        self.close_upstream(state);
        self.forget_hidden(state);
        self.count_session(&state.org, -1);
        tracing::info!(org = %state.org, session = %short(&state.id), "session ended: {why}");
    }

    /// A session's log and streams, its upstream listen (or GET) stream,
    /// its re-initialization lock, and the subscriptions its upstream
    /// refused.
    pub(super) fn drop_local(&self, id: &str) {
        self.hub.remove(id);
        self.stop_listener(id);
        self.bridges.rebinding.forget(id);
        self.bridges.refused_subscriptions.forget(id);
        self.holds.end_session(id);
    }

    /// Finds the caller's session; any mismatch looks like an unknown id.
    pub(super) async fn session_for(
        &self,
        call: Call<'_>,
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
        self.session_of(&call.org.key, call.identity, Some(id), transport)
            .await
    }

    /// Session `id` of route `key` bound to `identity`, over `transport`;
    /// any mismatch looks like an unknown id.
    pub(super) async fn session_of(
        &self,
        key: &str,
        identity: &Identity,
        id: Option<&str>,
        transport: Transport,
    ) -> Result<Arc<SessionState>, Reject> {
        let Some(id) = id.filter(|id| session::is_plausible_id(id)) else {
            return Err(match id {
                None => Reject::bad_request(
                    "missing Mcp-Session-Id header: send initialize first, then echo the Mcp-Session-Id it returned",
                ),
                Some(_) => session_not_found(),
            });
        };
        let span = crate::telemetry::span(|| {
            tracing::info_span!("session", route = key, store = self.store.kind())
        });
        let found = tracing::Instrument::instrument(self.store.lookup(id), span).await;
        match found.map_err(store_reject)? {
            Some(s)
                if *s.org == *key && s.subject == identity.subject && s.transport == transport =>
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
    pub(super) async fn streamable_session(
        &self,
        call: Call<'_>,
    ) -> Result<Arc<SessionState>, Reject> {
        let id = call.header(&MCP_SESSION_ID);
        self.session_for(call, id, Transport::StreamableHttp).await
    }

    /// The caller's session and its event log.
    pub(super) async fn session_with_log(
        &self,
        call: Call<'_>,
        id: Option<&str>,
        transport: Transport,
    ) -> Result<(Arc<SessionState>, Arc<SessionLog>), Reject> {
        let session = self.session_for(call, id, transport).await?;
        let log = self.session_log(&session, false).await?;
        Ok((session, log))
    }

    /// A session's event log on this node; `current` for a stream about to
    /// resume (see [`Hub::open`]).
    pub(super) async fn session_log(
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

    /// The session a worker names in the publish API, if it exists.
    pub(super) async fn published_to(
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
        if let Some(org) = self.live().routes.org(&state.org) {
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
        let expired = match self
            .store
            .remove_idle(self.live().config.sessions.idle_ttl)
            .await
        {
            Ok(expired) => expired,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reap idle sessions");
                return 0;
            }
        };
        for state in &expired {
            self.forget_session(state, "expired after being idle");
            if !state.members.is_empty() {
                self.end_members(state).await;
            }
        }
        self.expire_parked();
        self.holds.sweep();
        self.hub.drop_idle_mirrors();
        self.count_sessions().await;
        for org in self.live().routes.orgs() {
            org.server.pool.available();
        }
        expired.len()
    }
}

/// A minted session id as the `Mcp-Session-Id` header.
pub(super) fn session_header(id: &str) -> Result<HeaderValue, Reject> {
    HeaderValue::from_str(id).map_err(|_| {
        Reject::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL_ERROR,
            "minted an invalid session id",
        )
    })
}

/// The `protocolVersion` of a successful initialize response.
pub(super) fn negotiated_version(response: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(response).ok()?;
    v.get("result")?
        .get("protocolVersion")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ResponseBody;
    use crate::gateway::tests::*;
    use crate::testing;

    #[tokio::test]
    async fn initialize_mints_a_session_and_published_messages_reach_its_stream() {
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
    async fn no_session_is_created_when_the_upstream_is_down() {
        let gw = gateway(&[testing::dead_url()]);
        let r = gw.handle(post(INIT, &[])).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(r.headers.get(&MCP_SESSION_ID).is_none());
        assert_eq!(json_of(&r)["error"]["code"], code::UPSTREAM_ERROR);
        assert_eq!(json_of(&r)["id"], 1);
        assert!(gw.store.list_org("org-1").await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn delete_ends_the_session_and_its_streams() {
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
