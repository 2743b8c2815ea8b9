//! The other nodes of a gateway (Redis mode), as one handle: on a single
//! node every call does nothing (or finds nothing), so the request path
//! does not ask "am I clustered" at each step.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::Notice;
use crate::jsonrpc::Id;
use crate::session::redis::RedisStoreError;
use crate::stream::shared::{HoldRoute, SharedEvents};

/// This node's view of the others; `None` inside on a single node.
#[derive(Clone, Copy)]
pub(super) struct Cluster<'a>(pub(super) Option<&'a Arc<SharedEvents>>);

impl<'a> Cluster<'a> {
    /// Whether there are other nodes (Redis mode).
    pub(super) fn is_shared(&self) -> bool {
        self.0.is_some()
    }

    /// The shared events, for what exists only with several nodes (a call
    /// parked on another node, the bus itself); `None` on one node.
    pub(super) fn events(&self) -> Option<&'a Arc<SharedEvents>> {
        self.0
    }

    /// Entries the shared log's writer gave up on (Redis did not take them
    /// in time); `None` on one node, which has no writer.
    pub(super) fn dropped(&self) -> Option<u64> {
        self.0.map(|events| events.dropped())
    }

    /// Entries written that the replicas did not confirm in time
    /// (`sessions.wait`); `None` on one node.
    pub(super) fn unreplicated(&self) -> Option<u64> {
        self.0.map(|events| events.unreplicated())
    }

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

    /// Records that request `id` of `session` runs on this node, until
    /// [`Running::ended`]: other nodes pass a client's cancel of it here.
    /// `None` on one node.
    pub(super) fn running(&self, session: &str, id: &Id) -> Option<Running> {
        let events = self.0?;
        let session: Arc<str> = session.into();
        events.running(&session, id.as_json(), true);
        Some(Running {
            events: events.clone(),
            session,
        })
    }

    /// Takes this node's lease on a session's `what` (its background
    /// upstream stream), renewed until [`Cluster::release_lease`]; `lost`
    /// is cancelled if the node loses it. False while another node holds
    /// it; always true on one node.
    pub(super) async fn take_lease(
        &self,
        session: &str,
        what: &str,
        lost: CancellationToken,
    ) -> Result<bool, RedisStoreError> {
        match self.0 {
            Some(events) => events.hold(session, what, lost).await,
            None => Ok(true),
        }
    }

    /// Gives the lease up at once, so another node may take over without
    /// waiting for it to expire.
    pub(super) async fn release_lease(&self, session: &str, what: &str) {
        if let Some(events) = self.0
            && let Err(e) = events.release(session, what).await
        {
            tracing::debug!(error = %e, "cannot release a lease; it expires by itself");
        }
    }

    /// Where a worker's message for a hold this node has not heard of
    /// goes: the node keeping the hold, or a queue in Redis for the one
    /// that will. `None` on one node, where the hold can only be here.
    pub(super) async fn route_hold(
        &self,
        session: &str,
        hold: &str,
        body: &Bytes,
        keep: Duration,
        queue: usize,
    ) -> Option<Result<HoldRoute, RedisStoreError>> {
        let events = self.0?;
        Some(events.hold_route(session, hold, body, keep, queue).await)
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

/// A request of `session` recorded as running on this node (see
/// [`Cluster::running`]).
pub(super) struct Running {
    events: Arc<SharedEvents>,
    session: Arc<str>,
}

impl Running {
    /// Records the end of request `id` (the one it was recorded for).
    pub(super) fn ended(&self, id: &Id) {
        self.events.running(&self.session, id.as_json(), false);
    }
}
