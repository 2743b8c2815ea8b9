//! What other nodes tell this one (Redis mode): the notices of the node
//! bus, and the logouts missed while off it.

use serde::{Deserialize, Serialize};

use super::*;

/// Something one node tells all the others, as JSON on the node bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Notice {
    /// The session ended: drop its mirror, stop its requests; `hidden`
    /// says it was a 2026-07-28 client's hidden session.
    Ended {
        session: String,
        #[serde(default)]
        hidden: bool,
    },
    /// The client cancelled a request; the node running it stops it.
    Cancel {
        session: String,
        id: serde_json::Value,
    },
    /// A client's answer to a request the gateway sent it; the node
    /// waiting for it takes it.
    Reply { session: String, body: String },
    /// A provider logout: refuse those tokens.
    Logout(ratatosk_auth::logout::LogoutEvent),
    /// The session's subscriptions changed: the node holding its upstream
    /// listen reopens it with the new filter.
    Relisten { session: String },
    /// A 2026-07-28 client's retry of a call parked on node `node`.
    Resume(ResumeRequest),
    /// A worker's message for hold `hold` of `session`, which node `node`
    /// holds.
    Hold {
        node: u32,
        session: String,
        hold: String,
        body: String,
    },
    /// A server registered, changed or left: read the registrations
    /// again now, not at the next poll.
    Registrations,
    /// Node `node`'s answer to its [`Notice::Resume`] `token`.
    Resumed {
        node: u32,
        token: String,
        outcome: Resumed,
    },
    /// The node serving retry `token` stopped waiting for it (timeout, the
    /// client left): node `node` gives the call up.
    Abandon { node: u32, token: String },
}

/// A 2026-07-28 client came back with its input for a call that waits on
/// another node (the one its `requestState` names): that node hands the
/// input to the upstream and writes the rest of the call to a POST stream
/// of the call's upstream session, which the client's node serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// The node holding the call.
    pub node: u32,
    /// The node the client waits on.
    pub from: u32,
    /// Names the answer, [`Notice::Resumed`].
    pub token: String,
    /// The caller, who must be the one the call waits for.
    pub org: String,
    pub subject: String,
    /// The `requestState` the client sent.
    pub state: String,
    /// The JSON-RPC id and method of the client's retry.
    pub id: serde_json::Value,
    pub method: String,
    /// The client's `inputResponses`.
    pub responses: Option<serde_json::Value>,
}

/// What became of a [`ResumeRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Resumed {
    /// The rest of the call streams to POST stream `stream` of session
    /// `session`'s log; a reader who leaves cancels request `call` there.
    Streaming {
        session: String,
        stream: StreamId,
        call: serde_json::Value,
        /// How long the call may still run (its `upstream.max_duration`).
        left_ms: u64,
    },
    /// The client gets this error instead (no such call waits for this
    /// caller, the call is lost, the session is busy): HTTP status and
    /// JSON-RPC error.
    Refused {
        status: u16,
        code: i64,
        message: String,
    },
}

impl Notice {
    /// Tells the other nodes on `events`' bus.
    pub fn send(&self, events: &SharedEvents) {
        match serde_json::to_vec(self) {
            Ok(json) => events.notify(&json),
            Err(e) => tracing::warn!(error = %e, "a notice cannot be written; not sent"),
        }
    }
}

/// What other nodes tell this one (Redis mode).
impl BusHandler for Gateway {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Logouts that came while this node was off the bus.
    fn bus_up(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        let Some(validator) = self.validator.clone() else {
            return Box::pin(async {});
        };
        Box::pin(async move {
            let Some(memory) = &self.logouts else {
                return;
            };
            // The subscription just worked: a failure here is brief.
            for attempt in 1..=3 {
                match memory.recall().await {
                    Ok(logouts) => {
                        for event in &logouts {
                            validator.revoke(event);
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, "cannot read the logouts Redis keeps");
                    }
                }
            }
        })
    }

    fn notice(self: Arc<Self>, notice: &[u8]) {
        let notice = match serde_json::from_slice::<Notice>(notice) {
            Ok(notice) => notice,
            Err(e) => {
                tracing::warn!(error = %e, "a notice from another node is not understood (a node of another version?); ignored");
                return;
            }
        };
        match notice {
            Notice::Ended { session, hidden } => {
                self.stop_requests(&session);
                self.drop_local(&session);
                if hidden {
                    self.bridges.hidden.forget(&session);
                }
            }
            Notice::Cancel { session, id } => {
                if let Some(id) = Id::from_value(&id) {
                    self.cancel_in_flight(session, id);
                }
            }
            Notice::Reply { session, body } => {
                if let Ok(message) = jsonrpc::parse_message(&Bytes::from(body)) {
                    self.replies.take(&session, &message);
                }
            }
            Notice::Logout(event) => {
                if let Some(validator) = &self.validator {
                    validator.revoke(&event);
                }
            }
            Notice::Relisten { session } => self.reopen_listener(&session),
            Notice::Registrations => {
                tokio::spawn(async move {
                    if let Err(e) = self.sync_registrations().await {
                        tracing::error!("registered servers changed, but cannot be applied: {e}");
                    }
                });
            }
            Notice::Hold {
                node,
                session,
                hold,
                body,
            } => {
                if node == self.node
                    && let Err(e) = self.holds.publish(&session, &hold, &Bytes::from(body))
                {
                    tracing::debug!(session = %short(&session), hold = %hold, error = %e, "a worker's message from another node was refused");
                }
            }
            Notice::Resume(request) => {
                if request.node == self.node {
                    tokio::spawn(self.resume_for(request));
                }
            }
            Notice::Resumed {
                node,
                token,
                outcome,
            } => {
                if node == self.node {
                    self.resumed(&token, outcome);
                }
            }
            Notice::Abandon { node, token } => {
                if node == self.node {
                    self.abandon(token);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one node writes, another reads back the same; the JSON names
    /// its kind, so nodes of one version agree on it.
    #[test]
    fn notices_read_back_as_written() {
        let resume = ResumeRequest {
            node: 7,
            from: 9,
            token: "t".into(),
            org: "o".into(),
            subject: "alice".into(),
            state: "00000007.x".into(),
            id: json!(5),
            method: "tools/call".into(),
            responses: Some(json!({"upstream": {"roots": []}})),
        };
        let notices = [
            Notice::Ended {
                session: "s".into(),
                hidden: true,
            },
            Notice::Resume(resume),
            Notice::Resumed {
                node: 9,
                token: "t".into(),
                outcome: Resumed::Streaming {
                    session: "s".into(),
                    stream: (7 << 32) | 3,
                    call: json!("ratatosk-call-00000007-1"),
                    left_ms: 1000,
                },
            },
            Notice::Resumed {
                node: 9,
                token: "t".into(),
                outcome: Resumed::Refused {
                    status: 502,
                    code: -32002,
                    message: "gone".into(),
                },
            },
        ];
        for notice in notices {
            let json = serde_json::to_vec(&notice).expect("json");
            let back: Notice = serde_json::from_slice(&json).expect("read back");
            assert_eq!(back, notice);
        }
        let ended: Value = serde_json::from_str(r#"{"t":"ended","session":"s"}"#).expect("json");
        assert_eq!(
            serde_json::from_value::<Notice>(ended).expect("an older node's notice"),
            Notice::Ended {
                session: "s".into(),
                hidden: false
            }
        );
    }

    /// A notice this node cannot read is dropped, and nothing else happens.
    #[tokio::test]
    async fn a_notice_not_understood_is_ignored() {
        let up = crate::gateway::tests::mcp_stub().await;
        let gw = crate::gateway::tests::gateway(&[up.url()]);
        let sid = crate::gateway::tests::initialize(&gw).await;
        for junk in [&b""[..], b"{}", b"{\"t\":\"unknown\"}", b"\xff"] {
            gw.clone().notice(junk);
        }
        assert!(gw.store.lookup(&sid).await.expect("store").is_some());
    }
}
