//! Background upstream streams: a legacy session of a modern upstream
//! listens (`subscriptions/listen`), a session of a stateful upstream
//! follows its upstream session's GET stream. Either feeds the session's
//! standalone stream, one per session across the nodes (a lease in Redis
//! mode), reopened with [`Backoff`] until the session ends.

use std::time::Duration;

use super::*;
use crate::config::Era;
use crate::stream::shared::HEARTBEAT;

/// The background streams this node holds, by session.
#[derive(Default)]
pub(in crate::gateway) struct Listeners(DashMap<String, Listener>);

impl Listeners {
    /// Stops every background stream (the node drains).
    pub(in crate::gateway) fn stop_all(&self) {
        for listener in self.0.iter() {
            listener.stop.cancel();
        }
    }
}

/// This node's hold on a session's background upstream stream (a modern
/// upstream's listen, a stateful upstream's GET stream).
pub(in crate::gateway) struct Listener {
    /// Tells apart a listener from the one that replaced it.
    generation: u64,
    pub(in crate::gateway) stop: CancellationToken,
    /// Reopens a listen with the session's current filter.
    reopen: Arc<tokio::sync::Notify>,
    /// How far a stateful upstream's GET stream is.
    phase: tokio::sync::watch::Receiver<Phase>,
}

/// How far a stateful upstream session's GET stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::gateway) enum Phase {
    /// Not open yet.
    Opening,
    /// Opened (and reopened when it drops), on this node or (Redis mode)
    /// on the node holding its lease.
    Open,
    /// The upstream has none to offer (its GET is not a stream).
    Unavailable,
}

/// The lease of a session's background upstream stream (Redis mode).
const LEASE: &str = "upstream-stream";

/// Read limits of a background upstream stream (a `subscriptions/listen`,
/// a stateful upstream's GET stream): it is meant to stay open and quiet
/// for as long as the session lives, so only each event is bounded, as
/// one answer is (`limits.max_answer_bytes`).
pub(in crate::gateway) fn listen_limits(org: &OrgRoute) -> crate::upstream::ReadLimits {
    crate::upstream::ReadLimits {
        timeout: Duration::from_secs(365 * 24 * 3600),
        max_duration: Duration::from_secs(365 * 24 * 3600),
        max_bytes: usize::MAX,
        max_event_bytes: org.pool.read_limits.max_bytes,
    }
}

impl Gateway {
    /// Makes sure a legacy session of a modern upstream has its upstream
    /// `subscriptions/listen` stream feeding the session's standalone
    /// stream (the GET stream, or the `/sse` stream); of a stateful
    /// upstream, its upstream session's GET stream. With `refilter`, an
    /// open listen is reopened with the session's current filter, on
    /// whichever node holds it.
    ///
    /// In Redis mode one node of all holds the stream (a lease in Redis);
    /// the others wait, and take over when that node stops renewing it.
    ///
    /// Returns how far the stream is, as the listener this call found or
    /// started tells it: held from here on, it says the last phase even
    /// after the listener ended (see [`Gateway::background_phase`]).
    pub(in crate::gateway) fn ensure_listener(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        session_id: &str,
        log: &Arc<SessionLog>,
        refilter: bool,
    ) -> Option<tokio::sync::watch::Receiver<Phase>> {
        let stateful = match org.era.known() {
            Some(Era::Modern) => false,
            Some(Era::Stateful2025) => true,
            _ => return None,
        };
        if refilter {
            self.cluster().notify(&Notice::Relisten {
                session: session_id.to_owned(),
            });
        }
        let generation = self.in_flight.generation();
        let (phase, watching) = tokio::sync::watch::channel(Phase::Opening);
        let (stop, reopen) = match self.listeners.0.entry(session_id.to_owned()) {
            dashmap::Entry::Occupied(e) => {
                if refilter {
                    e.get().reopen.notify_one();
                }
                return Some(e.get().phase.clone());
            }
            dashmap::Entry::Vacant(v) => {
                let listener = Listener {
                    generation,
                    stop: CancellationToken::new(),
                    reopen: Arc::new(tokio::sync::Notify::new()),
                    phase: watching.clone(),
                };
                let handles = (listener.stop.clone(), listener.reopen.clone());
                v.insert(listener);
                handles
            }
        };
        let (this, org, first) = (self.clone(), org.clone(), log.clone());
        let id = session_id.to_owned();
        tokio::spawn(async move {
            let mut first = Some(first);
            while let Some(run) = this.take_lease(&id, &stop, &phase).await {
                // The log as it is now: a node that waited long for the
                // lease may have dropped the mirror it had then.
                let log = match first.take() {
                    Some(log) if this.hub.events().is_none() => log,
                    _ => match this.hub.open(&id, false).await {
                        Ok(Some(log)) => log,
                        _ => break,
                    },
                };
                let _kept = log.keep();
                org.metrics.background_streams.inc();
                if stateful {
                    this.follow(&org, &id, &log, &run, &phase).await;
                } else {
                    this.listen(&org, &id, &log, &run, &reopen).await;
                }
                org.metrics.background_streams.dec();
                let lost = run.is_cancelled() && !stop.is_cancelled();
                if let Some(events) = this.hub.events() {
                    // Another node may take over at once, not after the TTL.
                    let _ = events.release(&id, LEASE).await;
                }
                if !lost {
                    break;
                }
            }
            this.listeners
                .0
                .remove_if(&id, |_, l| l.generation == generation);
        });
        Some(watching)
    }

    /// Reopens this node's listen of a session, if it holds one (another
    /// node changed the session's filter).
    pub(in crate::gateway) fn reopen_listener(&self, session_id: &str) {
        if let Some(l) = self.listeners.0.get(session_id) {
            l.reopen.notify_one();
        }
    }

    /// How far a session's background upstream stream is (`phase`, from
    /// [`Gateway::ensure_listener`]), once it is open or known to be
    /// unavailable, or `within` has passed. A listener that ended before
    /// it opened the stream will not open it: unavailable.
    pub(in crate::gateway) async fn background_phase(
        phase: Option<tokio::sync::watch::Receiver<Phase>>,
        within: Duration,
    ) -> Phase {
        let Some(mut phase) = phase else {
            return Phase::Unavailable;
        };
        let settled = tokio::time::timeout(within, phase.wait_for(|p| *p != Phase::Opening))
            .await
            .map(|r| r.map(|p| *p));
        match settled {
            Ok(Ok(p)) => p,
            // Its listener ended: what it last said stands.
            Ok(Err(_)) => match *phase.borrow() {
                Phase::Opening => Phase::Unavailable,
                p => p,
            },
            Err(_) => *phase.borrow(),
        }
    }

    /// Stops a session's listen stream, if it has one.
    pub(in crate::gateway) fn stop_listener(&self, session_id: &str) {
        if let Some((_, l)) = self.listeners.0.remove(session_id) {
            l.stop.cancel();
        }
    }

    /// Waits until this node may hold the session's background upstream
    /// stream: at once with one node; in Redis mode, once it holds the
    /// session's lease (renewed with the node's heartbeat). The token is
    /// cancelled when the lease is lost, or with `stop`; `None` once `stop`
    /// is cancelled.
    async fn take_lease(
        &self,
        session_id: &str,
        stop: &CancellationToken,
        phase: &tokio::sync::watch::Sender<Phase>,
    ) -> Option<CancellationToken> {
        let run = stop.child_token();
        let Some(events) = self.hub.events() else {
            return (!stop.is_cancelled()).then_some(run);
        };
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match events.hold(session_id, LEASE, run.clone()).await {
                Ok(true) => {
                    phase.send_replace(Phase::Opening);
                    return Some(run);
                }
                // Another node holds it open.
                Ok(false) => {
                    phase.send_replace(Phase::Open);
                }
                Err(e) => {
                    tracing::debug!(session = %short(session_id), error = %e, "cannot take the lease of the session's upstream stream; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }
}

/// Pauses between attempts to reopen a session's background upstream
/// stream (a listen, or a stateful upstream's GET stream): from 100 ms,
/// doubling up to 5 s, and back to the start once the stream delivers.
pub(in crate::gateway) struct Backoff(std::time::Duration);
impl Default for Backoff {
    fn default() -> Self {
        Backoff(std::time::Duration::from_millis(100))
    }
}

impl Backoff {
    pub(in crate::gateway) fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Waits the pause, then lengthens it; false if `stop` came first.
    pub(in crate::gateway) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {},
            _ = stop.cancelled() => return false,
        }
        self.0 = (self.0 * 2).min(std::time::Duration::from_secs(5));
        true
    }
}
