//! What other nodes tell this one (Redis mode): the notices of the node
//! bus, and the logouts missed while off it.

use super::*;

/// What other nodes tell this one (Redis mode).
impl BusHandler for Gateway {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Logouts that came while this node was off the bus.
    fn bus_up(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        let (Some(validator), Some(events)) = (self.validator.clone(), self.hub.events().cloned())
        else {
            return Box::pin(async {});
        };
        Box::pin(async move {
            // The subscription just worked: a failure here is brief.
            for attempt in 1..=3 {
                match events.logouts().await {
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

    fn notice(self: Arc<Self>, notice: Notice) {
        match notice {
            Notice::Ended { session, hidden } => {
                self.stop_requests(&session);
                self.drop_local(&session);
                if hidden {
                    self.hidden.forget(&session);
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
