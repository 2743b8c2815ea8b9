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
        max_event_bytes: org.server.pool.read_limits.max_bytes,
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
        refilter: bool,
    ) -> Option<tokio::sync::watch::Receiver<Phase>> {
        let stateful = match org.server.era.known() {
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
        let (stop, reopen) = match self.bridges.listeners.0.entry(session_id.to_owned()) {
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
        let (this, org) = (self.clone(), org.clone());
        let id = session_id.to_owned();
        tokio::spawn(async move {
            while let Some(run) = this.take_lease(&id, &stop, &phase).await {
                // The log as it is now: a node that waited long for the
                // lease may have dropped the mirror it had then.
                let Ok(Some(log)) = this.hub.open(&id, false).await else {
                    break;
                };
                let _kept = log.keep();
                org.metrics.background_streams.inc();
                if stateful {
                    let mut follow = stateful::Follow {
                        gw: &this,
                        org: &org,
                        coordination: this.bridges.rebinding.of(&id),
                        phase: &phase,
                    };
                    this.hold_background(&org, &id, &log, &run, &mut follow)
                        .await;
                } else {
                    let mut listen = modern::Listen {
                        org: &org,
                        reopen: &reopen,
                        round: 0,
                    };
                    this.hold_background(&org, &id, &log, &run, &mut listen)
                        .await;
                }
                org.metrics.background_streams.dec();
                let lost = run.is_cancelled() && !stop.is_cancelled();
                // Another node may take over at once, not after the TTL.
                this.cluster().release_lease(&id, LEASE).await;
                if !lost {
                    break;
                }
            }
            this.bridges
                .listeners
                .0
                .remove_if(&id, |_, l| l.generation == generation);
        });
        Some(watching)
    }

    /// Reopens this node's listen of a session, if it holds one (another
    /// node changed the session's filter).
    pub(in crate::gateway) fn reopen_listener(&self, session_id: &str) {
        if let Some(l) = self.bridges.listeners.0.get(session_id) {
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
        if let Some((_, l)) = self.bridges.listeners.0.remove(session_id) {
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
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self
                .cluster()
                .take_lease(session_id, LEASE, run.clone())
                .await
            {
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

/// What a background stream does its own way: opening it, and what
/// becomes of each message.
#[async_trait]
pub(in crate::gateway) trait Feed: Send {
    /// What it is, for logs.
    const WHAT: &'static str;
    /// Whether a change ([`Feed::changed`]) reopens the stream after the
    /// usual pause rather than at once.
    const PAUSE_ON_CHANGE: bool;
    /// Opens the stream of `session` as it is now; [`Opened::End`] if
    /// `stop` is cancelled while it waits for the upstream (work it must
    /// finish, such as re-opening a lost upstream session, is not cut).
    async fn open(&mut self, session: &SessionState, stop: &CancellationToken) -> Opened;
    /// What becomes of one message of the stream.
    fn on_message(&mut self, session: &SessionState, message: &Bytes) -> Next;
    /// Resolves when the stream must be opened again (at once, or after a
    /// pause: [`Feed::PAUSE_ON_CHANGE`]).
    async fn changed(&self);
    /// The session is gone.
    fn session_gone(&self, _session_id: &str) {}
}

/// How opening a background stream went.
// Returned once per opening, never stored: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub(in crate::gateway) enum Opened {
    Reading(AnswerReader),
    /// Open it again at once.
    Again,
    /// Open it again after a pause.
    Retry,
    /// Not to be opened again.
    End,
}

/// What becomes of a message of a background stream.
pub(in crate::gateway) enum Next {
    /// Onto the session's standalone stream.
    Pass,
    /// The feed dealt with it.
    Handled,
    /// Not for the client.
    Skip,
    /// The stream is over: open it again after a pause.
    EndOfStream,
}

impl Gateway {
    /// Holds one session's background stream: opens it with `feed`, passes
    /// its messages to the session's standalone stream, and opens it again
    /// (with [`Backoff`] unless the feed says at once) until the session
    /// ends, `stop` is cancelled, or the feed ends it.
    pub(in crate::gateway) async fn hold_background<F: Feed>(
        &self,
        org: &OrgRoute,
        session_id: &str,
        log: &SessionLog,
        stop: &CancellationToken,
        feed: &mut F,
    ) {
        let mut backoff = Backoff::default();
        'open: loop {
            let session = match self.store.lookup(session_id).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    feed.session_gone(session_id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(session = %short(session_id), error = %e, "cannot look the session up for its {}; retrying", F::WHAT);
                    if !backoff.wait(stop).await {
                        return;
                    }
                    continue;
                }
            };
            let mut reader = match feed.open(&session, stop).await {
                Opened::Reading(reader) => reader,
                Opened::Again => continue,
                Opened::Retry => {
                    if !backoff.wait(stop).await {
                        return;
                    }
                    continue;
                }
                Opened::End => return,
            };
            loop {
                let next = tokio::select! {
                    n = reader.next_message() => n,
                    _ = stop.cancelled() => return,
                    _ = feed.changed() => {
                        if F::PAUSE_ON_CHANGE {
                            break;
                        }
                        continue 'open;
                    }
                };
                let Ok(Some(message)) = next else { break };
                match feed.on_message(&session, &message) {
                    Next::Pass => {
                        backoff.reset();
                        if self.append(log, STANDALONE, &message, org).is_err() {
                            return;
                        }
                    }
                    Next::Handled => backoff.reset(),
                    Next::Skip => {}
                    Next::EndOfStream => break,
                }
            }
            if !backoff.wait(stop).await {
                return;
            }
        }
    }
}

/// Pauses between attempts to reopen a session's background upstream
/// stream (a listen, or a stateful upstream's GET stream): from 100 ms,
/// doubling up to 5 s, and back to the start once the stream delivers.
struct Backoff(std::time::Duration);
impl Default for Backoff {
    fn default() -> Self {
        Backoff(std::time::Duration::from_millis(100))
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Waits the pause, then lengthens it; false if `stop` came first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {},
            _ = stop.cancelled() => return false,
        }
        self.0 = (self.0 * 2).min(std::time::Duration::from_secs(5));
        true
    }
}
