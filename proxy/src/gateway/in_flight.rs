//! Requests being answered upstream, by (session, JSON-RPC id): what a
//! client's `notifications/cancelled`, a DELETE or a session's end stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use http::StatusCode;
use tokio_util::sync::CancellationToken;

use super::cluster::{Cluster, Running};
use crate::edge::Reject;
use crate::jsonrpc::{Id, code};
use crate::stream::Slot;

/// By (session, id): a generation (to tell registrations apart) and the
/// token that cancels the request.
type Map = DashMap<(String, Id), (u64, CancellationToken)>;

/// This node's requests in flight.
#[derive(Default)]
pub(super) struct Requests {
    map: Arc<Map>,
    next: AtomicU64,
}

impl Requests {
    /// A number no other registration on this node gets (also used by
    /// other registries of the gateway to tell theirs apart).
    pub(super) fn generation(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a request that holds `slot`: with an id, it becomes
    /// cancellable (a second request with that id in the session is
    /// refused), and other nodes of the `cluster` learn that it runs here.
    pub(super) fn register(
        &self,
        session: &str,
        id: Option<&Id>,
        cluster: Cluster<'_>,
        slot: Slot,
    ) -> Result<InFlight, Reject> {
        let token = CancellationToken::new();
        let generation = self.generation();
        let key = match id {
            None => None,
            Some(id) => {
                let key = (session.to_owned(), id.clone());
                match self.map.entry(key.clone()) {
                    dashmap::Entry::Occupied(_) => {
                        return Err(Reject::new(
                            StatusCode::BAD_REQUEST,
                            code::INVALID_REQUEST,
                            format!("request id {} is already in flight in this session; ids must be unique", id.as_json()),
                        )
                        .with_id(Some(id)));
                    }
                    dashmap::Entry::Vacant(v) => {
                        v.insert((generation, token.clone()));
                    }
                }
                Some(key)
            }
        };
        let running = key
            .as_ref()
            .and_then(|(session, id)| cluster.running(session, id));
        Ok(InFlight {
            map: self.map.clone(),
            key,
            generation,
            token,
            running,
            _slot: slot,
        })
    }

    /// Stops request `id` of `session` if it runs on this node; false if
    /// it does not.
    pub(super) fn cancel(&self, session: String, id: Id) -> bool {
        match self.map.remove(&(session, id)) {
            Some((_, (_, token))) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops the session's requests running on this node.
    pub(super) fn stop_session(&self, id: &str) {
        self.map.retain(|(sid, _), (_, token)| {
            if sid == id {
                token.cancel();
                false
            } else {
                true
            }
        });
    }
}

/// A registered in-flight request; unregisters on drop.
pub(super) struct InFlight {
    map: Arc<Map>,
    key: Option<(String, Id)>,
    generation: u64,
    pub(super) token: CancellationToken,
    /// With several nodes: where the request is recorded as running.
    running: Option<Running>,
    _slot: Slot,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let generation = self.generation;
            self.map.remove_if(&key, |_, (g, _)| *g == generation);
            if let Some(running) = &self.running {
                running.ended(&key.1);
            }
        }
    }
}
