//! Holds (see holds.rs) on the request path: keeping a held request open
//! until its worker finishes it, the worker's requests to the client, and
//! the publish API's side.

use super::*;

impl Gateway {
    /// Keeps a request that its upstream answered with a hold open until a
    /// worker publishes its response, the client cancels, or the hold
    /// times out; delivers what is published for it to `stream`. A hold
    /// that cannot be kept (malformed, or one too many) fails the request.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn keep_hold(
        &self,
        asked: Result<holds::HoldRequest, String>,
        session: &HoldClient<'_>,
        log: &SessionLog,
        stream: StreamId,
        request: Id,
        org: &OrgRoute,
        cancel: &CancellationToken,
    ) {
        let fail = |why: String| {
            let body = jsonrpc::error_body(Some(&request), code::UPSTREAM_ERROR, &why);
            let _ = self.append(log, stream, &body, org);
        };
        let opened = asked.and_then(|asked| {
            self.holds
                .open(session.id, asked)
                .map_err(|e| e.to_string())
        });
        let mut waiter = match opened {
            Ok(waiter) => waiter,
            Err(why) => {
                return fail(format!(
                    "the upstream answered with a hold the gateway cannot keep: {why}"
                ));
            }
        };
        org.metrics.holds.opened.inc();
        let hold = waiter.hold.id.clone();
        // Workers may publish through any node: they reach this one now,
        // and what they published before waits in Redis.
        let keep = waiter.hold.timeout + self.holds.config().keep_finished;
        match self.cluster().claim_hold(session.id, &hold, keep).await {
            Ok(early) => {
                for body in early {
                    if let Err(e) = self.holds.publish(session.id, &hold, &Bytes::from(body)) {
                        tracing::debug!(hold = %hold, error = %e, "an early message for the hold was refused");
                    }
                }
            }
            Err(e) => tracing::warn!(org = %org.name, hold = %hold, error = %e,
                "cannot record the hold in Redis: workers must publish through this node"),
        }
        tracing::info!(org = %org.name, session = %short(session.id), hold = %hold,
            timeout_s = waiter.hold.timeout.as_secs_f64(), "request held for a worker");
        // The request side ends an open hold (a cancel, a timeout), unless
        // its response was published just now.
        let end = |state| {
            let ended = self.holds.finish(session.id, &hold, state);
            if ended {
                self.count_hold_end(org, session.id, &hold, state);
            }
            ended
        };
        let deadline = tokio::time::Instant::now() + waiter.hold.timeout;
        let mut expired = false;
        // The worker's requests to the client, waiting for its answers.
        let mut pending = self.replies.pending();
        let mut asks = futures::stream::FuturesUnordered::new();
        loop {
            let delivery = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    if end(holds::HoldState::Cancelled) {
                        tracing::info!(org = %org.name, session = %short(session.id), hold = %hold, "held request cancelled by the client");
                    }
                    return;
                }
                Some((rid, worker_id, method, reply)) = futures::StreamExt::next(&mut asks), if !asks.is_empty() => {
                    pending.forget(session.id, &rid);
                    self.keep_answer(org, session.id, &hold, &worker_id, method, reply);
                    continue;
                }
                d = waiter.deliveries.recv() => d,
                _ = tokio::time::sleep_until(deadline), if !expired => {
                    expired = true;
                    if end(holds::HoldState::Expired) {
                        tracing::warn!(org = %org.name, session = %short(session.id), hold = %hold, "held request timed out");
                        return fail(format!(
                            "no worker finished hold '{hold}' within {} s",
                            waiter.hold.timeout.as_secs_f64()
                        ));
                    }
                    // Its response was published just now: deliver it.
                    continue;
                }
            };
            match delivery {
                Some(holds::Delivery::Event(body)) => {
                    if self.append(log, stream, &body, org).is_err() {
                        // The session ended under the request.
                        end(holds::HoldState::Cancelled);
                        return;
                    }
                }
                Some(holds::Delivery::Ask(message)) => {
                    let outstanding = asks.len();
                    let asked = self.ask_for_hold(
                        org,
                        session,
                        (log, stream),
                        &message,
                        outstanding,
                        &mut pending,
                    );
                    let Ok(asked) = asked else {
                        end(holds::HoldState::Cancelled);
                        return;
                    };
                    match asked {
                        HoldAsk::Sent {
                            rid,
                            worker_id,
                            method,
                            reply,
                        } => {
                            asks.push(async move {
                                let reply = tokio::time::timeout_at(deadline, reply).await;
                                (rid, worker_id, method, reply.ok().and_then(Result::ok))
                            });
                        }
                        HoldAsk::Refused { worker_id, answer } => {
                            self.keep_answer(
                                org,
                                session.id,
                                &hold,
                                &worker_id,
                                String::new(),
                                Some(answer),
                            );
                        }
                    }
                }
                Some(holds::Delivery::Final(body)) => {
                    self.count_hold_end(org, session.id, &hold, holds::HoldState::Done);
                    let body = holds::with_id(&body, &request, session.modern_method)
                        .unwrap_or_else(|why| {
                            jsonrpc::error_body(Some(&request), code::UPSTREAM_ERROR, &why)
                        });
                    let _ = self.append(log, stream, &body, org);
                    return;
                }
                // The session ended, and its holds with it.
                None => return,
            }
        }
    }

    /// Sends a worker's request (published into a hold) to the client on
    /// the held request's stream, under an id of the gateway's. A client
    /// that cannot take it (it did not declare the capability, or speaks
    /// 2026-07-28, which has no requests during a call) gets nothing: the
    /// worker gets an error answer, as it does when `outstanding` (the
    /// hold's requests the client has not answered) is at [`holds::QUEUE`].
    /// `Err` if the stream is gone.
    fn ask_for_hold(
        &self,
        org: &OrgRoute,
        session: &HoldClient<'_>,
        (log, stream): (&SessionLog, StreamId),
        message: &Message,
        outstanding: usize,
        pending: &mut replies::PendingReplies<'_>,
    ) -> Result<HoldAsk, ()> {
        // Checked when published: a request with a client method.
        let (Some(worker_id), Some(method)) = (message.request_id(), message.method()) else {
            return Err(());
        };
        let refuse = |code: i64, why: String| HoldAsk::Refused {
            worker_id: worker_id.clone(),
            answer: jsonrpc::error_value(Some(worker_id), code, &why),
        };
        if outstanding >= holds::QUEUE {
            return Ok(refuse(
                code::INTERNAL_ERROR,
                format!(
                    "the client has {outstanding} of this hold's requests unanswered already; wait for an answer"
                ),
            ));
        }
        if crate::era::is_modern_version(session.protocol_version) {
            return Ok(refuse(
                code::INVALID_REQUEST,
                format!(
                    "the client speaks {}, which takes no requests during a call: {method} cannot reach it",
                    session.protocol_version
                ),
            ));
        }
        let capability = crate::era::capability_for(method).unwrap_or_default();
        if !crate::era::declares(session.client_capabilities, capability) {
            return Ok(refuse(
                crate::era::errors::MISSING_CAPABILITY,
                format!(
                    "the client did not declare the '{capability}' capability in initialize: {method} cannot reach it"
                ),
            ));
        }
        let Some((rid, reply)) = pending.await_reply(session.id) else {
            return Err(());
        };
        let params = message.params();
        let request =
            crate::era::client_request(&rid, method, params.as_ref(), session.protocol_version);
        if self.append(log, stream, &request, org).is_err() {
            return Err(());
        }
        tracing::debug!(org = %org.name, session = %short(session.id), method, "a worker's request sent to the client");
        Ok(HoldAsk::Sent {
            rid,
            worker_id: worker_id.clone(),
            method: method.to_owned(),
            reply,
        })
    }

    /// Keeps the client's answer to a worker's request with the hold (and
    /// in Redis mode in Redis, for workers that ask other nodes). `None`:
    /// the client did not answer before the hold's timeout.
    fn keep_answer(
        &self,
        org: &OrgRoute,
        session: &str,
        hold: &str,
        worker_id: &Id,
        method: String,
        reply: Option<Value>,
    ) {
        let answer = match reply {
            Some(reply) => holds::answer_for_worker(reply, worker_id),
            None => jsonrpc::error_value(
                Some(worker_id),
                code::UPSTREAM_ERROR,
                &format!("the client did not answer {method} before hold '{hold}' timed out"),
            ),
        };
        tracing::debug!(org = %org.name, session = %short(session), hold = %hold, "the client answered a worker's request");
        let keep = self.holds.config().keep_finished + self.holds.config().max_timeout;
        self.cluster()
            .record_hold_answer(session, hold, &answer, keep, holds::QUEUE);
        self.holds.answer(session, hold, answer);
    }

    /// Counts how a hold ended, and in Redis mode records it for workers
    /// that ask other nodes.
    fn count_hold_end(&self, org: &OrgRoute, session: &str, hold: &str, state: holds::HoldState) {
        let counter = match state {
            holds::HoldState::Done => &org.metrics.holds.done,
            holds::HoldState::Cancelled => &org.metrics.holds.cancelled,
            holds::HoldState::Expired => &org.metrics.holds.expired,
            holds::HoldState::Pending | holds::HoldState::Open => return,
        };
        counter.inc();
        let keep = self.holds.config().keep_finished;
        self.cluster()
            .record_hold_end(session, hold, state.as_str(), keep);
    }

    /// Takes a worker's message for a hold of a session of this node (see
    /// holds.rs). The session must exist: a hold not opened yet is kept
    /// for it.
    pub async fn publish_hold(
        &self,
        session_id: &str,
        hold: &str,
        body: &Bytes,
    ) -> Result<holds::HoldState, Reject> {
        // A 2026-07-28 client's call has no session to look up: its holds
        // (and what a fast worker publishes before they open) are all.
        if holds::is_call(session_id) {
            if !holds::is_plausible_call(session_id) {
                return Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    code::SESSION_NOT_FOUND,
                    "call not found: a call id is `call-` and 43 characters of A-Z a-z 0-9 - _",
                ));
            }
        } else if self
            .published_to(session_id)
            .await
            .map_err(store_reject)?
            .is_none()
        {
            return Err(Reject::new(
                StatusCode::NOT_FOUND,
                code::SESSION_NOT_FOUND,
                "session not found: it expired, was deleted, or never existed",
            ));
        }
        let cluster = self.cluster();
        let here = || {
            self.holds
                .publish(session_id, hold, body)
                .map_err(hold_reject)
        };
        // One node, or this one keeps the hold: the message is for it.
        if !cluster.is_shared() || self.holds.state(session_id, hold).is_some() {
            return here();
        }
        // Several nodes, and this one has not heard of the hold: the one
        // that keeps it gets the message, or it waits in Redis for the one
        // that will.
        holds::delivery_of(hold, body).map_err(hold_reject)?;
        let keep = self.holds.config().keep_finished;
        let routed = cluster
            .route_hold(session_id, hold, body, keep, holds::QUEUE)
            .await;
        let Some(route) = routed else {
            return here();
        };
        match route.map_err(|e| store_reject(e.into()))? {
            HoldRoute::Owner { node, .. } if node == self.node => here(),
            HoldRoute::Owner { node, state } => match holds::HoldState::parse(&state) {
                Some(holds::HoldState::Open) | None => {
                    cluster.notify(&Notice::Hold {
                        node,
                        session: session_id.to_owned(),
                        hold: hold.to_owned(),
                        body: String::from_utf8_lossy(body).into_owned(),
                    });
                    Ok(holds::HoldState::Open)
                }
                Some(state) => Err(hold_reject(holds::HoldPublishError::Finished {
                    hold: hold.to_owned(),
                    state,
                })),
            },
            HoldRoute::Queued => Ok(holds::HoldState::Pending),
            HoldRoute::Full => Err(hold_reject(holds::HoldPublishError::Busy)),
        }
    }

    /// A hold's state for its worker: this node's, or in Redis mode the
    /// one the node holding it recorded.
    pub async fn hold_view(
        &self,
        session_id: &str,
        hold: &str,
    ) -> Result<Option<holds::HoldView>, Reject> {
        if let Some(view) = self.holds.view(session_id, hold) {
            return Ok(Some(view));
        }
        let recorded = self
            .cluster()
            .hold_state(session_id, hold)
            .await
            .map_err(|e| store_reject(e.into()))?;
        Ok(recorded.and_then(|(state, answers)| {
            Some(holds::HoldView {
                state: holds::HoldState::parse(&state)?,
                answers: answers
                    .iter()
                    .filter_map(|a| serde_json::from_str(a).ok())
                    .collect(),
            })
        }))
    }
}

/// Who waits on a hold: a session's client, or a 2026-07-28 client's
/// call (no session; its id is a call id, see [`holds::call_id`]).
pub(crate) struct HoldClient<'a> {
    /// The session (or call) the hold is kept under.
    pub id: &'a str,
    pub protocol_version: &'a str,
    pub client_capabilities: Option<&'a Value>,
    /// For a 2026-07-28 client: the method whose result the worker's
    /// response is, reshaped for that client.
    pub modern_method: Option<&'a str>,
}

impl<'a> HoldClient<'a> {
    pub(super) fn of(session: &'a SessionState) -> HoldClient<'a> {
        HoldClient {
            id: &session.id,
            protocol_version: &session.protocol_version,
            client_capabilities: session.client_capabilities.as_ref(),
            modern_method: None,
        }
    }
}

/// A worker's request published into a hold, as the gateway handled it.
enum HoldAsk {
    /// Sent to the client; its answer comes on `reply`.
    Sent {
        /// The gateway's id of the request.
        rid: Id,
        worker_id: Id,
        method: String,
        reply: tokio::sync::oneshot::Receiver<Value>,
    },
    /// Not sent: `answer` is the error the worker reads.
    Refused { worker_id: Id, answer: Value },
}

/// Deferred answers: the upstream answers with a hold, a worker
/// finishes the request through the publish API (holds.rs).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ResponseBody;
    use crate::gateway::tests::*;
    use crate::testing;
    use serde_json::json;
    use std::time::Duration;

    /// Answers `tools/call` with a hold named by the tool's name, whose
    /// timeout is the argument `t` (seconds).
    async fn holding_stub() -> testing::Stub {
        testing::stub(|body| {
            let id = testing::request_id(body);
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            if v["method"] == "initialize" {
                return (200, "application/json", format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"protocolVersion":"2025-06-18","capabilities":{{}},"serverInfo":{{"name":"stub","version":"1"}}}}}}"#
                ));
            }
            let hold = json!({"id": v["params"]["name"], "timeout": v["params"]["arguments"]["t"]});
            let result = json!({"content": [], "_meta": {crate::holds::HOLD_META: hold}});
            (200, "application/json", json!({"jsonrpc": "2.0", "id": v["id"], "result": result}).to_string())
        })
        .await
    }

    /// A gateway in front of [`holding_stub`], and a session of it.
    async fn holding_gateway() -> (testing::Stub, Arc<Gateway>, String) {
        let up = holding_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize(&gw).await;
        (up, gw, sid)
    }

    async fn held_call(gw: &Arc<Gateway>, sid: &str, hold: &str, timeout_s: f64) -> Response {
        let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                          "params": {"name": hold, "arguments": {"t": timeout_s}}});
        let r = gw
            .handle(post(
                &call.to_string(),
                &[
                    ("mcp-session-id", sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        r
    }

    /// Reads the stream until its text holds `needle`.
    async fn read_until(r: &mut Response, needle: &str) -> String {
        let mut seen = String::new();
        while !seen.contains(needle) {
            seen.push_str(&next_text(r).await);
        }
        seen
    }

    fn message(v: Value) -> Bytes {
        Bytes::from(v.to_string())
    }

    #[tokio::test]
    async fn a_worker_finishes_a_held_request_on_its_stream() {
        let (_up, gw, sid) = holding_gateway().await;
        let mut r = held_call(&gw, &sid, "task-1", 30.0).await;
        // The upstream answered JSON, but the answer comes later: a stream.
        assert!(matches!(r.body, ResponseBody::Stream(_)));
        let state = || gw.holds.state(&sid, "task-1");
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": "p", "progress": 1, "total": 2}});
        // The worker may publish before the gateway read the hold.
        gw.publish_hold(&sid, "task-1", &message(progress))
            .await
            .expect("progress");
        let text = read_until(&mut r, "notifications/progress").await;
        assert!(!text.contains("\"result\""), "{text}");
        let done = json!({"jsonrpc": "2.0", "id": 0, "result": {"content": [{"type": "text", "text": "5"}]}});
        gw.publish_hold(&sid, "task-1", &message(done))
            .await
            .expect("result");
        let text = read_until(&mut r, "\"result\"").await;
        assert!(text.contains("\"id\":9"), "{text}");
        assert!(text.contains("\"text\":\"5\""), "{text}");
        assert_eq!(state(), Some(crate::holds::HoldState::Done));
        // Another session cannot publish into it, nor can anyone now.
        let late =
            json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}});
        let unknown = gw
            .publish_hold("other", "task-1", &message(late.clone()))
            .await;
        assert_eq!(unknown.err().map(|r| r.status), Some(StatusCode::NOT_FOUND));
        assert!(matches!(
            gw.holds.publish(&sid, "task-1", &message(late)),
            Err(crate::holds::HoldPublishError::Finished { .. })
        ));
        let metrics = String::from_utf8(gw.metrics.render()).expect("utf8");
        assert!(
            metrics.contains("ratatosk_holds_total{org=\"org-1\",outcome=\"done\"} 1"),
            "{metrics}"
        );
    }

    /// A worker asks the client for its roots while the call is held:
    /// the request reaches the client's stream under the gateway's id,
    /// and the client's answer is kept for the worker with its own id.
    /// A client without the capability is never asked.
    #[tokio::test]
    async fn a_worker_asks_the_client_and_reads_its_answer() {
        let up = holding_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize_with(&gw, &roots_init()).await;
        let mut r = held_call(&gw, &sid, "ask", 30.0).await;
        let ask = json!({"jsonrpc": "2.0", "id": "w-1", "method": "roots/list"});
        gw.publish_hold(&sid, "ask", &message(ask))
            .await
            .expect("ask");
        let text = read_until(&mut r, "roots/list").await;
        let sent: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .find(|v: &Value| v["method"] == "roots/list")
            .expect("the request on the stream");
        let gateway_id = sent["id"].as_str().expect("a string id").to_owned();
        assert_ne!(
            gateway_id, "w-1",
            "the worker's id never reaches the client"
        );
        let view = || gw.holds.view(&sid, "ask").expect("known");
        assert!(view().answers.is_empty());
        let answer = json!({"jsonrpc": "2.0", "id": gateway_id,
                            "result": {"roots": [{"uri": "file:///work", "name": "work"}]}});
        let a = gw
            .handle(post(
                &answer.to_string(),
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            ))
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED);
        let answered = || async { !view().answers.is_empty() };
        assert!(
            testing::eventually(Duration::from_secs(5), answered).await,
            "no answer kept"
        );
        let kept = &view().answers[0];
        assert_eq!(kept["id"], "w-1");
        assert_eq!(kept["result"]["roots"][0]["uri"], "file:///work");
        // The admin API shows it to the worker.
        let got = gw
            .hold_view(&sid, "ask")
            .await
            .expect("view")
            .expect("known");
        assert_eq!(got.answers.len(), 1);
        assert_eq!(got.state, crate::holds::HoldState::Open);

        // A client that did not declare `sampling` is never asked.
        let ask =
            json!({"jsonrpc": "2.0", "id": 2, "method": "sampling/createMessage", "params": {}});
        gw.publish_hold(&sid, "ask", &message(ask))
            .await
            .expect("ask");
        let refused = || async { view().answers.len() == 2 };
        assert!(
            testing::eventually(Duration::from_secs(5), refused).await,
            "no refusal kept"
        );
        let kept = &view().answers[1];
        assert_eq!(kept["id"], 2);
        assert_eq!(
            kept["error"]["code"],
            crate::era::errors::MISSING_CAPABILITY
        );
        assert!(
            kept["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("'sampling'")),
            "{kept}"
        );
        // Only client methods may be asked.
        let bad = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {}});
        let e = gw
            .publish_hold(&sid, "ask", &message(bad))
            .await
            .expect_err("refused");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    /// A worker may not pile up requests the client does not answer:
    /// past [`crate::holds::QUEUE`] unanswered, it reads a refusal. A
    /// call id the gateway cannot have minted is refused.
    #[tokio::test]
    async fn unanswered_requests_to_the_client_are_capped() {
        let up = holding_stub().await;
        let gw = gateway(&[up.url()]);
        let sid = initialize_with(&gw, &roots_init()).await;
        let _r = held_call(&gw, &sid, "many", 30.0).await;
        for n in 0..=crate::holds::QUEUE {
            let ask = json!({"jsonrpc": "2.0", "id": n, "method": "roots/list"});
            // The stream's queue may be full for a moment: retry then.
            let published = || async {
                gw.publish_hold(&sid, "many", &message(ask.clone()))
                    .await
                    .is_ok()
            };
            assert!(
                testing::eventually(Duration::from_secs(5), published).await,
                "ask {n}"
            );
        }
        let refused = || async {
            !gw.holds
                .view(&sid, "many")
                .expect("known")
                .answers
                .is_empty()
        };
        assert!(
            testing::eventually(Duration::from_secs(5), refused).await,
            "no refusal"
        );
        let answers = gw.holds.view(&sid, "many").expect("known").answers;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0]["id"], crate::holds::QUEUE);
        assert!(
            answers[0]["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unanswered"))
        );
        for bad in [
            "call-x",
            "call-../../etc",
            &format!("call-{}:x", session::mint_id()),
        ] {
            let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}});
            let e = gw
                .publish_hold(bad, "h", &message(note))
                .await
                .expect_err("refused");
            assert_eq!(e.status, StatusCode::NOT_FOUND, "{bad}");
        }
    }

    /// An initialize whose client declares `roots`.
    fn roots_init() -> String {
        INIT.replace(r#""capabilities":{}"#, r#""capabilities":{"roots":{}}"#)
    }

    /// A stub whose `tools/call` answers are holds (as [`holding_stub`]),
    /// which also keeps the `Ratatosk-Session` each call came with.
    async fn call_recording_stub() -> (testing::Stub, Arc<std::sync::Mutex<Vec<String>>>) {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let up = testing::full_stub(move |head, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            if v["method"] == "initialize" {
                return testing::Reply::new(
                    200,
                    "application/json",
                    json!({"jsonrpc": "2.0", "id": v["id"],
                    "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "stub", "version": "1"}}})
                    .to_string(),
                );
            }
            if v.get("id").is_none() {
                return testing::Reply::new(202, "application/json", String::new());
            }
            if let Some(call) = head
                .lines()
                .find_map(|l| l.strip_prefix("ratatosk-session: "))
            {
                seen.lock().expect("lock").push(call.trim().to_owned());
            }
            let hold = json!({"id": v["params"]["name"], "timeout": v["params"]["arguments"]["t"]});
            let result = json!({"content": [], "_meta": {crate::holds::HOLD_META: hold}});
            testing::Reply::new(
                200,
                "application/json",
                json!({"jsonrpc": "2.0", "id": v["id"], "result": result}).to_string(),
            )
        })
        .await;
        (up, calls)
    }

    /// The call id a hold opened under, once it is open; the upstream
    /// got it as `Ratatosk-Session` (its head is seen lower-cased).
    async fn call_of(
        gw: &Arc<Gateway>,
        calls: &std::sync::Mutex<Vec<String>>,
        hold: &str,
    ) -> String {
        let open = || async { gw.holds.session_of(hold).is_some() };
        assert!(
            testing::eventually(Duration::from_secs(5), open).await,
            "no hold {hold}"
        );
        let id = gw.holds.session_of(hold).expect("open");
        assert!(crate::holds::is_call(&id), "{id}");
        let seen = calls.lock().expect("lock").clone();
        assert!(seen.contains(&id.to_ascii_lowercase()), "{seen:?} {id}");
        id
    }

    /// A 2026-07-28 client has no session: its call gets an id of its
    /// own (the upstream's `Ratatosk-Session`), under which a worker
    /// finishes it. The answer is a stream; the result comes reshaped
    /// for that client; a worker's request to it is refused for the
    /// worker, never sent.
    #[tokio::test]
    async fn a_modern_clients_held_call_is_finished_by_a_worker() {
        let (up, calls) = call_recording_stub().await;
        let gw = gateway(&[up.url()]);
        let call = json!({"name": "m1", "arguments": {"t": 30}});
        let req =
            crate::gateway::bridge::modern::tests::modern(5, "tools/call", call, json!({}), &[]);
        let mut r = gw.handle(req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(matches!(r.body, ResponseBody::Stream(_)));
        let id = call_of(&gw, &calls, "m1").await;
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": "p", "progress": 1}});
        gw.publish_hold(&id, "m1", &message(progress))
            .await
            .expect("progress");
        let ask = json!({"jsonrpc": "2.0", "id": "w", "method": "roots/list"});
        gw.publish_hold(&id, "m1", &message(ask))
            .await
            .expect("ask");
        let refused = || async { !gw.holds.view(&id, "m1").expect("known").answers.is_empty() };
        assert!(testing::eventually(Duration::from_secs(5), refused).await);
        let answer = gw.holds.view(&id, "m1").expect("known").answers[0].clone();
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("2026-07-28")),
            "{answer}"
        );
        let done = json!({"jsonrpc": "2.0", "id": 0, "result": {"content": [{"type": "text", "text": "5"}]}});
        gw.publish_hold(&id, "m1", &message(done))
            .await
            .expect("result");
        let text = read_until(&mut r, "\"result\"").await;
        assert!(text.contains("notifications/progress"), "{text}");
        assert!(
            !text.contains("roots/list"),
            "never sent to the client: {text}"
        );
        let result: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .find(|v: &Value| v.get("result").is_some())
            .expect("the result");
        assert_eq!(result["id"], 5);
        assert_eq!(result["result"]["resultType"], "complete");
        assert_eq!(result["result"]["content"][0]["text"], "5");
        // Another call gets another id; an unknown call's publish is
        // kept pending (a fast worker), and swept later.
        assert_ne!(crate::holds::call_id(), id);
    }

    /// Closing the stream is a 2026-07-28 client's cancel: the worker
    /// sees the hold cancelled.
    #[tokio::test]
    async fn a_modern_client_closing_its_held_call_cancels_the_hold() {
        let (up, calls) = call_recording_stub().await;
        let gw = gateway(&[up.url()]);
        let call = json!({"name": "m2", "arguments": {"t": 30}});
        let req =
            crate::gateway::bridge::modern::tests::modern(6, "tools/call", call, json!({}), &[]);
        let r = gw.handle(req).await;
        assert_eq!(r.status, StatusCode::OK);
        let id = call_of(&gw, &calls, "m2").await;
        drop(r);
        let cancelled =
            || async { gw.holds.state(&id, "m2") == Some(crate::holds::HoldState::Cancelled) };
        assert!(
            testing::eventually(Duration::from_secs(5), cancelled).await,
            "not cancelled: {:?}",
            gw.holds.state(&id, "m2")
        );
        let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}});
        let e = gw
            .publish_hold(&id, "m2", &message(note))
            .await
            .expect_err("finished");
        assert_eq!(e.status, StatusCode::GONE);
    }

    /// The hold's messages go through the session's event log: a client
    /// whose stream broke resumes it with `Last-Event-ID` and gets what
    /// the worker published meanwhile.
    #[tokio::test]
    async fn a_resumed_stream_replays_what_the_worker_published() {
        let (_up, gw, sid) = holding_gateway().await;
        let mut r = held_call(&gw, &sid, "task-r", 30.0).await;
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": "p", "progress": 1}});
        gw.publish_hold(&sid, "task-r", &message(progress))
            .await
            .expect("progress");
        let text = read_until(&mut r, "notifications/progress").await;
        let last = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("id: "))
            .expect("an event id")
            .to_owned();
        drop(r); // the client's connection breaks
        let done = json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}});
        gw.publish_hold(&sid, "task-r", &message(done))
            .await
            .expect("result");
        let mut again = gw
            .handle(request(
                Method::GET,
                "/gw/org-1/mcp",
                &[
                    ("accept", "text/event-stream"),
                    ("mcp-session-id", &sid),
                    ("last-event-id", &last),
                ],
                "",
            ))
            .await;
        assert_eq!(again.status, StatusCode::OK);
        let text = read_until(&mut again, "\"result\"").await;
        assert!(text.contains("\"id\":9"), "{text}");
        assert!(
            !text.contains("notifications/progress"),
            "replayed only what came after: {text}"
        );
    }

    #[tokio::test]
    async fn a_hold_nobody_finishes_fails_the_request_at_its_timeout() {
        let (_up, gw, sid) = holding_gateway().await;
        let mut r = held_call(&gw, &sid, "slow", 0.2).await;
        let text = read_until(&mut r, "\"error\"").await;
        assert!(
            text.contains("no worker finished hold 'slow' within 0.2 s"),
            "{text}"
        );
        assert!(text.contains("\"id\":9"), "{text}");
        assert_eq!(
            gw.holds.state(&sid, "slow"),
            Some(crate::holds::HoldState::Expired)
        );
    }

    #[tokio::test]
    async fn a_client_cancel_reaches_the_worker_as_the_hold_state() {
        let (_up, gw, sid) = holding_gateway().await;
        let _r = held_call(&gw, &sid, "cancel-me", 30.0).await;
        let cancel =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":9}}"#;
        let c = gw
            .handle(post(
                cancel,
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-06-18"),
                ],
            ))
            .await;
        assert_eq!(c.status, StatusCode::ACCEPTED);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gw.holds.state(&sid, "cancel-me") != Some(crate::holds::HoldState::Cancelled) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hold was not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}});
        assert_eq!(
            gw.holds.publish(&sid, "cancel-me", &message(note)),
            Err(crate::holds::HoldPublishError::Finished {
                hold: "cancel-me".into(),
                state: crate::holds::HoldState::Cancelled
            })
        );
    }

    #[tokio::test]
    async fn a_malformed_hold_fails_the_request_with_the_reason() {
        let (_up, gw, sid) = holding_gateway().await;
        let mut r = held_call(&gw, &sid, "bad/id", 5.0).await;
        let text = read_until(&mut r, "\"error\"").await;
        assert!(text.contains("a hold the gateway cannot keep"), "{text}");
    }
}
