//! The other nodes of a gateway (Redis mode), as one handle: on a single
//! node every call does nothing (or finds nothing), so the request path
//! does not ask "am I clustered" at each step.

use std::sync::Arc;
use std::time::Duration;

use super::Notice;
use crate::session::redis::RedisStoreError;
use crate::stream::shared::SharedEvents;

/// This node's view of the others; `None` inside on a single node.
#[derive(Clone, Copy)]
pub(super) struct Cluster<'a>(pub(super) Option<&'a Arc<SharedEvents>>);

impl Cluster<'_> {
    /// Tells every other node.
    pub(super) fn notify(&self, notice: &Notice) {
        if let Some(events) = self.0 {
            notice.send(events);
        }
    }

    /// Whether request `id` of `session` runs on another node; false on one
    /// node, true when Redis cannot tell (a cancel too many is harmless).
    pub(super) async fn running_elsewhere(&self, session: &str, id: &str) -> bool {
        match self.0 {
            Some(events) => events.running_elsewhere(session, id).await.unwrap_or(true),
            None => false,
        }
    }

    /// Records this node as the one keeping a hold, for `keep`, and takes
    /// what workers published for it through other nodes before.
    pub(super) async fn claim_hold(
        &self,
        session: &str,
        hold: &str,
        keep: Duration,
    ) -> Result<Vec<Vec<u8>>, RedisStoreError> {
        match self.0 {
            Some(events) => events.hold_claim(session, hold, keep).await,
            None => Ok(Vec::new()),
        }
    }

    /// Records, in the background, how a hold ended, for workers that ask
    /// other nodes.
    pub(super) fn record_hold_end(
        &self,
        session: &str,
        hold: &str,
        state: &'static str,
        keep: Duration,
    ) {
        let Some(events) = self.0.cloned() else {
            return;
        };
        let (session, hold) = (session.to_owned(), hold.to_owned());
        tokio::spawn(async move {
            if let Err(e) = events.hold_mark(&session, &hold, state, keep).await {
                tracing::warn!(hold = %hold, error = %e, "cannot record the hold's end in Redis");
            }
        });
    }

    /// Records, in the background, the client's answer (JSON) to a
    /// worker's request, for workers that ask other nodes.
    pub(super) fn record_hold_answer(
        &self,
        session: &str,
        hold: &str,
        answer: &serde_json::Value,
        keep: Duration,
        max: usize,
    ) {
        let Some(events) = self.0.cloned() else {
            return;
        };
        let answer = answer.to_string();
        let (session, hold) = (session.to_owned(), hold.to_owned());
        tokio::spawn(async move {
            if let Err(e) = events
                .hold_answer(&session, &hold, &answer, keep, max)
                .await
            {
                tracing::warn!(hold = %hold, error = %e, "cannot record the client's answer in Redis");
            }
        });
    }

    /// A hold's state and the client's answers as the node keeping it
    /// recorded them; none on one node.
    pub(super) async fn hold_state(
        &self,
        session: &str,
        hold: &str,
    ) -> Result<Option<(String, Vec<String>)>, RedisStoreError> {
        match self.0 {
            Some(events) => events.hold_state(session, hold).await,
            None => Ok(None),
        }
    }
}
