//! The stream hub: per-session event logs and the SSE streams fed from them.
//!
//! Every SSE stream the gateway serves reads from its session's log: the
//! standalone stream (the Streamable HTTP GET stream, or the legacy `/sse`
//! stream) and each POST response stream. A log is one bounded ring of
//! pre-encoded SSE frames plus one [`Notify`]; a waiting stream costs a
//! cursor, not a task, a channel or a buffer of its own.
//!
//! Event ids are `{stream}.{seq}`: `seq` is unique in the session and
//! increasing, `stream` says which stream the event belongs to, so a
//! `Last-Event-ID` replays that stream's missed events and no other's.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use prometheus::{IntCounter, IntGauge};

use crate::edge::ChunkSource;
use tokio::sync::Notify;

pub mod shared;
pub mod watch;

use shared::SharedEvents;

/// Which stream of a session an event belongs to.
pub type StreamId = u64;

/// The session's standalone stream: the GET stream, or the legacy `/sse`.
pub const STANDALONE: StreamId = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId {
    pub stream: StreamId,
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.stream, self.seq)
    }
}

impl EventId {
    /// Parses a `Last-Event-ID` value.
    pub fn parse(s: &str) -> Option<EventId> {
        let (stream, seq) = s.trim().split_once('.')?;
        let all_digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(stream) || !all_digits(seq) {
            return None;
        }
        Some(EventId {
            stream: stream.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// A keep-alive: an SSE comment, ignored by clients, that keeps
/// intermediaries from cutting an idle stream and shows us a dead client.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// The last thing a stream whose access token expired says: a comment, so
/// no client takes it for a message, and a reconnect loses nothing.
pub const TOKEN_EXPIRED: &[u8] =
    b": the access token of this stream expired; reconnect with a fresh token\n\n";

/// Encodes one SSE event. `data` may span lines; each becomes a `data:` line.
pub fn sse_frame(id: Option<EventId>, event: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        // Writing into a BytesMut cannot fail.
        let _ = writeln!(out, "id: {id}");
    }
    if let Some(event) = event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    // SSE lines end at \n, \r\n or \r; split on all three.
    let mut rest = data;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
        out.put_slice(b"data: ");
        match end {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_u8(b'\n');
                break;
            }
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The priming event of 2025-11-25: an id and empty data, so the client has
/// a `Last-Event-ID` to reconnect with before any real event arrives.
pub fn priming_frame(id: EventId, retry: Duration) -> Bytes {
    Bytes::from(format!(
        "id: {id}\nretry: {}\ndata: \n\n",
        retry.as_millis()
    ))
}

struct Event {
    id: EventId,
    frame: Bytes,
}

/// A bounded run of events, oldest first, bounded by count and by bytes.
/// The newest event is always kept, however large, so a live reader gets it.
#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    bytes: usize,
    /// Highest seq evicted; a cursor below it may have missed events.
    evicted_upto: u64,
}

/// How far past its limits a ring may grow to keep events no reader has
/// taken yet.
const UNREAD_HEADROOM: usize = 8;

impl Ring {
    /// Appends, then evicts while over the limits: the oldest event that
    /// `unread` does not hold for (no reader still has to take it), up to
    /// [`UNREAD_HEADROOM`] times the limits; past that, the oldest. Busy
    /// neighbours and one slow reader must not take a live answer away.
    /// The newest event is always kept.
    fn push(
        &mut self,
        event: Event,
        max_events: usize,
        max_bytes: usize,
        unread: impl Fn(&Event) -> bool,
    ) {
        self.bytes += event.frame.len();
        self.events.push_back(event);
        let (hard_events, hard_bytes) = (
            max_events.saturating_mul(UNREAD_HEADROOM),
            max_bytes.saturating_mul(UNREAD_HEADROOM),
        );
        while self.events.len() > 1 && (self.events.len() > max_events || self.bytes > max_bytes) {
            let within_headroom = self.events.len() <= hard_events && self.bytes <= hard_bytes;
            let older = self.events.len() - 1;
            let victim = if within_headroom {
                match self.events.range(..older).position(|e| !unread(e)) {
                    Some(i) => i,
                    None => break,
                }
            } else {
                0
            };
            if let Some(old) = self.events.remove(victim) {
                self.bytes -= old.frame.len();
                self.evicted_upto = self.evicted_upto.max(old.id.seq);
            }
        }
    }

    /// Frames of `stream` after `cursor`, up to about `max_chunk` bytes.
    fn after(&self, stream: StreamId, cursor: u64, max_chunk: usize) -> Option<(Bytes, u64, u64)> {
        let start = self.events.partition_point(|e| e.id.seq <= cursor);
        let mut frames = self.events.range(start..).filter(|e| e.id.stream == stream);
        let first = frames.next()?;
        let (mut count, mut upto, mut len) = (1, first.id.seq, first.frame.len());
        // One frame (a client keeping up) goes out as it is, without a copy.
        let mut joined: Option<BytesMut> = None;
        for e in frames {
            if len + e.frame.len() > max_chunk {
                break;
            }
            joined
                .get_or_insert_with(|| BytesMut::from(&first.frame[..]))
                .extend_from_slice(&e.frame);
            len += e.frame.len();
            count += 1;
            upto = e.id.seq;
        }
        let chunk = joined.map_or_else(|| first.frame.clone(), BytesMut::freeze);
        Some((chunk, count, upto))
    }
}

/// How much a session log holds: per ring, the standalone stream's and the
/// POST streams', so POST traffic never pushes out published messages.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_events: usize,
    pub max_bytes: usize,
}

/// Most bytes handed to one write; a backlog goes out in several.
const MAX_CHUNK: usize = 256 * 1024;

struct LogInner {
    /// The seq the next event gets; in a mirror, the seq it waits for next
    /// (every event before it has been applied).
    next_seq: u64,
    next_stream: StreamId,
    standalone: Ring,
    posts: Ring,
    /// Highest standalone seq written to a client connection; a standalone
    /// stream opened without `Last-Event-ID` starts after it.
    standalone_delivered: u64,
    /// POST streams whose upstream answer is still arriving.
    producing: Vec<StreamId>,
    /// The current reader of each stream; an older reader of the same
    /// stream stops at its next wake-up.
    readers: Vec<(StreamId, u64)>,
    /// How far the reader of each POST stream still producing or read has
    /// taken it (highest seq).
    post_taken: Vec<(StreamId, u64)>,
    next_reader: u64,
    closed: bool,
    /// A mirror's entries that arrived ahead of one still missing.
    pending: BTreeMap<u64, Entry>,
    /// A mirror has read the shared log once (before that, arrivals wait).
    synced: bool,
    /// A mirror's read of the shared log is under way.
    filling: bool,
    /// POST streams a mirror was asked for before it heard of them (their
    /// node may not have sent their start yet): read as producing until
    /// then.
    tentative: Vec<(StreamId, Instant)>,
    /// The POST streams a mirror saw end last, newest last.
    ended: VecDeque<StreamId>,
}

/// How long a mirror waits to hear of a POST stream it was asked for.
const TENTATIVE_FOR: Duration = Duration::from_secs(10);

/// How many ended POST streams a mirror remembers.
const ENDED_KEPT: usize = 64;

/// One entry of a shared log, as a mirror applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Message {
        stream: StreamId,
        payload: Bytes,
    },
    /// A POST stream starts: its answer is arriving.
    Begin(StreamId),
    /// A POST stream is complete.
    End(StreamId),
}

/// What a read of the shared log found after a seq.
#[derive(Debug, Default)]
pub struct LogRead {
    /// The session's last seq.
    pub last_seq: u64,
    /// Highest standalone seq delivered to a client, on any node.
    pub delivered: u64,
    /// The entries after the seq asked for, in seq order.
    pub entries: Vec<(u64, Entry)>,
}

impl LogInner {
    /// Whether a POST stream may still be read live: its answer is still
    /// arriving, or a client reads it.
    fn live(&self, stream: StreamId) -> bool {
        self.producing.contains(&stream) || self.readers.iter().any(|(s, _)| *s == stream)
    }

    /// Whether a POST stream's event is still to be taken by a reader.
    fn unread(&self, e: &Event) -> bool {
        let taken = self
            .post_taken
            .iter()
            .find(|(s, _)| *s == e.id.stream)
            .map_or(0, |(_, t)| *t);
        e.id.seq > taken && self.live(e.id.stream)
    }

    /// Forgets how far a POST stream was read once it is no longer live.
    fn settle(&mut self, stream: StreamId) {
        if !self.live(stream) {
            self.post_taken.retain(|(s, _)| *s != stream);
        }
    }

    /// Adds one event to its ring, evicting as the limits say.
    fn push_event(&mut self, id: EventId, payload: &[u8], limits: LogLimits) {
        let event = Event {
            id,
            frame: sse_frame(Some(id), Some("message"), payload),
        };
        if id.stream == STANDALONE {
            self.standalone
                .push(event, limits.max_events, limits.max_bytes, |_| false);
        } else {
            // Out of the log for the push, so that the ring can ask the
            // log which events are still unread.
            let mut posts = std::mem::take(&mut self.posts);
            posts.push(event, limits.max_events, limits.max_bytes, |e| {
                self.unread(e)
            });
            self.posts = posts;
        }
    }

    /// Applies a mirror's entry `seq`, the one it waits for next.
    fn apply(&mut self, seq: u64, entry: Entry, limits: LogLimits) {
        match entry {
            Entry::Message { stream, payload } => {
                self.push_event(EventId { stream, seq }, &payload, limits);
            }
            Entry::Begin(stream) => {
                self.tentative.retain(|(s, _)| *s != stream);
                if !self.producing.contains(&stream) {
                    self.producing.push(stream);
                }
            }
            Entry::End(stream) => {
                self.producing.retain(|s| *s != stream);
                self.tentative.retain(|(s, _)| *s != stream);
                if self.ended.len() >= ENDED_KEPT {
                    self.ended.pop_front();
                }
                self.ended.push_back(stream);
                self.settle(stream);
            }
        }
        self.next_seq = seq + 1;
    }

    /// Applies the pending entries that follow on; true if some are still
    /// held back by a missing one.
    fn drain_pending(&mut self, limits: LogLimits) -> bool {
        while let Some(entry) = self.pending.first_entry() {
            let seq = *entry.key();
            if seq < self.next_seq {
                entry.remove();
            } else if seq == self.next_seq {
                let e = entry.remove();
                self.apply(seq, e, limits);
            } else {
                return true;
            }
        }
        false
    }

    /// Records that the events up to `seq` can no longer be had: a reader
    /// resuming from before them has a gap.
    fn lost_upto(&mut self, seq: u64) {
        self.standalone.evicted_upto = self.standalone.evicted_upto.max(seq);
        self.posts.evicted_upto = self.posts.evicted_upto.max(seq);
        self.next_seq = self.next_seq.max(seq + 1);
    }

    fn ring(&self, stream: StreamId) -> &Ring {
        if stream == STANDALONE {
            &self.standalone
        } else {
            &self.posts
        }
    }
}

/// Why an event could not be appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session has ended")]
pub struct Closed;

/// A session's bounded event log and its live readers.
///
/// With a shared log (Redis mode) this is the node's mirror of it: appends
/// go to the shared log, and come back, with their seq, through
/// [`SessionLog::offer`] in seq order; readers read the mirror as they
/// would a local log.
pub struct SessionLog {
    inner: Mutex<LogInner>,
    wake: Notify,
    limits: LogLimits,
    /// Requests of this session now waiting on an upstream (see [`Slot`]).
    in_flight: AtomicUsize,
    shared: Option<Link>,
    /// When the node last used this log (ms of [`Hub::clock`]), to drop an
    /// idle mirror.
    used: std::sync::atomic::AtomicU64,
    /// Background tasks of this node that write to the log (see [`Kept`]).
    kept: AtomicUsize,
    /// Requests whose responses something waits on (see [`watch`]).
    pub watches: watch::Watches,
}

/// A mirror's way to the shared log.
struct Link {
    events: Arc<SharedEvents>,
    session: Arc<str>,
}

/// One of a session's in-flight request slots; released on drop.
pub struct Slot {
    log: Arc<SessionLog>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.log.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A background task's hold on a mirror: an idle mirror is not dropped
/// while a task of its node still writes to it.
pub struct Kept {
    log: Arc<SessionLog>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.log.kept.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SessionLog {
    pub fn new(limits: LogLimits) -> Self {
        Self::with_link(limits, None)
    }

    /// A mirror of session `session`'s shared log. `synced` says the node
    /// knows it to be empty (the session was just created here).
    fn mirror(limits: LogLimits, events: Arc<SharedEvents>, session: &str, synced: bool) -> Self {
        let log = Self::with_link(
            limits,
            Some(Link {
                events,
                session: session.into(),
            }),
        );
        log.lock().synced = synced;
        log
    }

    fn with_link(limits: LogLimits, shared: Option<Link>) -> Self {
        SessionLog {
            inner: Mutex::new(LogInner {
                next_seq: 1,
                next_stream: STANDALONE + 1,
                standalone: Ring::default(),
                posts: Ring::default(),
                standalone_delivered: 0,
                producing: Vec::new(),
                readers: Vec::new(),
                post_taken: Vec::new(),
                next_reader: 1,
                closed: false,
                pending: BTreeMap::new(),
                synced: true,
                filling: false,
                tentative: Vec::new(),
                ended: VecDeque::new(),
            }),
            wake: Notify::new(),
            in_flight: AtomicUsize::new(0),
            shared,
            used: std::sync::atomic::AtomicU64::new(0),
            kept: AtomicUsize::new(0),
            watches: watch::Watches::default(),
            limits: LogLimits {
                max_events: limits.max_events.max(1),
                max_bytes: limits.max_bytes,
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding this lock cannot leave the ring half-written
        // (every mutation is a single push/pop), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an in-flight slot if fewer than `max` are taken.
    pub fn try_reserve(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot { log: self.clone() })
    }

    /// Keeps this log (a mirror) on the node for as long as the guard lives.
    pub fn keep(self: &Arc<Self>) -> Kept {
        self.kept.fetch_add(1, Ordering::AcqRel);
        Kept { log: self.clone() }
    }

    /// Starts a POST response stream and returns its id.
    pub fn begin_stream(&self) -> Result<StreamId, Closed> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Closed);
        }
        let id = match &self.shared {
            Some(link) => link.events.next_stream_id(),
            None => {
                let id = inner.next_stream;
                inner.next_stream = inner.next_stream.wrapping_add(1).max(STANDALONE + 1);
                id
            }
        };
        inner.producing.push(id);
        drop(inner);
        if let Some(link) = &self.shared {
            link.events.enqueue(&link.session, shared::Op::Begin(id));
        }
        Ok(id)
    }

    /// Marks a POST stream complete: its readers end once they have read
    /// everything in it.
    pub fn end_stream(&self, stream: StreamId) {
        if let Some(link) = &self.shared {
            // The end comes back after the stream's last event.
            link.events.enqueue(&link.session, shared::Op::End(stream));
            return;
        }
        self.end_local(stream);
    }

    /// Ends a POST stream on this node only.
    pub(crate) fn end_local(&self, stream: StreamId) {
        let mut inner = self.lock();
        inner.producing.retain(|s| *s != stream);
        inner.settle(stream);
        drop(inner);
        self.wake.notify_waiters();
    }

    /// Appends one JSON-RPC message to a stream and wakes its reader. A
    /// mirror sends it to the shared log instead, and gets it back in order.
    pub fn append(&self, stream: StreamId, payload: &[u8]) -> Result<(), Closed> {
        let shown = self.watches.answered(payload);
        let payload = shown.as_deref().unwrap_or(payload);
        let Some(link) = &self.shared else {
            return self.append_local(stream, payload).map(|_| ());
        };
        if self.lock().closed {
            return Err(Closed);
        }
        link.events.enqueue(
            &link.session,
            shared::Op::Message {
                stream,
                payload: Bytes::copy_from_slice(payload),
            },
        );
        Ok(())
    }

    /// Appends to a local log, and says the event's id.
    pub fn append_local(&self, stream: StreamId, payload: &[u8]) -> Result<EventId, Closed> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Closed);
        }
        let id = EventId {
            stream,
            seq: inner.next_seq,
        };
        inner.next_seq += 1;
        inner.push_event(id, payload, self.limits);
        drop(inner);
        self.wake.notify_waiters();
        Ok(id)
    }

    /// A mirror takes entry `seq` of the shared log, arriving live. True if
    /// the mirror now misses an entry before it and should read the shared
    /// log (see [`SessionLog::apply_read`]).
    pub fn offer(&self, seq: u64, entry: Entry) -> bool {
        let mut inner = self.lock();
        if inner.closed || seq < inner.next_seq {
            return false;
        }
        if !inner.synced || seq > inner.next_seq {
            inner.pending.insert(seq, entry);
            if inner.pending.len() > self.limits.max_events.saturating_mul(UNREAD_HEADROOM) {
                inner.pending.pop_first();
            }
            if inner.synced && !inner.filling {
                inner.filling = true;
                return true;
            }
            return false;
        }
        inner.apply(seq, entry, self.limits);
        inner.drain_pending(self.limits);
        drop(inner);
        self.wake.notify_waiters();
        false
    }

    /// The seq after which a read of the shared log should start, marking
    /// a read under way.
    pub fn read_from(&self) -> u64 {
        let mut inner = self.lock();
        inner.filling = true;
        if inner.synced { inner.next_seq - 1 } else { 0 }
    }

    /// A mirror applies what a read of the shared log found. Entries the
    /// shared log no longer holds count as evicted. True if entries that
    /// arrived meanwhile still wait on a missing one (read again).
    pub fn apply_read(&self, read: LogRead) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        if !inner.synced {
            // The first read: what came before it is not to be had here.
            let first = read.entries.first().map_or(read.last_seq + 1, |(s, _)| *s);
            inner.next_seq = 1;
            inner.lost_upto(first.saturating_sub(1));
            inner.synced = true;
        }
        for (seq, entry) in read.entries {
            if seq < inner.next_seq {
                continue;
            }
            if seq > inner.next_seq {
                inner.lost_upto(seq - 1);
            }
            inner.apply(seq, entry, self.limits);
        }
        if read.last_seq >= inner.next_seq {
            // Expired with the shared log's key.
            inner.lost_upto(read.last_seq);
        }
        inner.standalone_delivered = inner.standalone_delivered.max(read.delivered);
        let behind = inner.drain_pending(self.limits);
        inner.filling = behind;
        drop(inner);
        self.wake.notify_waiters();
        behind
    }

    /// Ends the log: readers stop, appends fail.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// Whether any stream of the session has a client attached.
    pub fn has_readers(&self) -> bool {
        !self.lock().readers.is_empty()
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.standalone.events.len() + inner.posts.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new reader of `stream`, superseding any earlier one.
    /// `resume_after` is the seq of the last event the client saw; `None`
    /// means "everything not yet delivered" for the standalone stream, and
    /// "from the start" for a POST stream.
    pub fn attach(
        &self,
        stream: StreamId,
        resume_after: Option<u64>,
    ) -> Result<Attach, AttachError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(AttachError::Closed);
        }
        if let Some(seq) = resume_after
            && seq >= inner.next_seq
        {
            return Err(AttachError::UnknownEvent);
        }
        // A mirror knows the streams of other nodes only by their events.
        if stream != STANDALONE && stream >= inner.next_stream && self.shared.is_none() {
            return Err(AttachError::UnknownEvent);
        }
        let cursor = match (resume_after, stream) {
            (Some(seq), _) => seq,
            (None, STANDALONE) => inner.standalone_delivered,
            (None, _) => 0,
        };
        if self.shared.is_some()
            && stream != STANDALONE
            && !inner.producing.contains(&stream)
            && !inner.ended.contains(&stream)
            && !inner.posts.events.iter().any(|e| e.id.stream == stream)
        {
            inner.producing.push(stream);
            inner
                .tentative
                .push((stream, Instant::now() + TENTATIVE_FOR));
        }
        let reader = inner.next_reader;
        inner.next_reader += 1;
        inner.readers.retain(|(s, _)| *s != stream);
        inner.readers.push((stream, reader));
        let gap = cursor < inner.ring(stream).evicted_upto;
        drop(inner);
        // Wake the superseded reader so it stops now, not at its keep-alive.
        self.wake.notify_waiters();
        Ok(Attach {
            stream,
            reader,
            cursor,
            gap,
            watching: false,
        })
    }

    /// Registers a reader of the standalone stream from its next event on,
    /// beside the others: it supersedes nobody, and what it reads does not
    /// count as delivered (a 2026-07-28 client's `subscriptions/listen` of
    /// a hidden session, of which there may be several).
    pub fn watch(&self) -> Result<Attach, AttachError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(AttachError::Closed);
        }
        let reader = inner.next_reader;
        inner.next_reader += 1;
        inner.readers.push((STANDALONE, reader));
        Ok(Attach {
            stream: STANDALONE,
            reader,
            cursor: inner.next_seq.saturating_sub(1),
            gap: false,
            watching: true,
        })
    }

    /// Ends the client connections reading `stream` without ending the
    /// stream: they stop at their next wake-up, and a client resumes with
    /// `Last-Event-ID` (the upstream closed its own stream to be polled,
    /// and the gateway passes that on). Readers of this node only.
    pub fn let_go(&self, stream: StreamId) {
        self.lock().readers.retain(|(s, _)| *s != stream);
        self.wake.notify_waiters();
    }

    fn detach(&self, stream: StreamId, reader: u64) {
        let mut inner = self.lock();
        inner
            .readers
            .retain(|(s, r)| !(*s == stream && *r == reader));
        if stream != STANDALONE {
            inner.settle(stream);
        }
    }

    fn mark_delivered(&self, stream: StreamId, upto: u64) {
        if stream == STANDALONE {
            let mut inner = self.lock();
            inner.standalone_delivered = inner.standalone_delivered.max(upto);
            drop(inner);
            if let Some(link) = &self.shared {
                link.events
                    .enqueue(&link.session, shared::Op::Delivered(upto));
            }
        }
    }

    /// Frames of `stream` after `cursor`, concatenated, with the count and
    /// the new cursor.
    fn poll(&self, stream: StreamId, reader: u64, cursor: u64) -> Poll {
        let mut inner = self.lock();
        if inner.closed || !inner.readers.contains(&(stream, reader)) {
            return Poll::End;
        }
        match inner.ring(stream).after(stream, cursor, MAX_CHUNK) {
            Some((chunk, count, upto)) => {
                if stream != STANDALONE {
                    match inner.post_taken.iter_mut().find(|(s, _)| *s == stream) {
                        Some((_, taken)) => *taken = (*taken).max(upto),
                        None => inner.post_taken.push((stream, upto)),
                    }
                }
                Poll::Events { chunk, count, upto }
            }
            None if stream != STANDALONE && !inner.producing.contains(&stream) => Poll::End,
            None => {
                let now = Instant::now();
                if inner
                    .tentative
                    .iter()
                    .any(|(s, until)| *s == stream && *until <= now)
                {
                    // Never heard of: gone from the shared log, or never was.
                    inner.tentative.retain(|(s, _)| *s != stream);
                    inner.producing.retain(|s| *s != stream);
                    return Poll::End;
                }
                Poll::Wait
            }
        }
    }
}

enum Poll {
    Events { chunk: Bytes, count: u64, upto: u64 },
    Wait,
    End,
}

/// A reader's registration, from [`SessionLog::attach`].
#[derive(Debug, Clone, Copy)]
pub struct Attach {
    pub stream: StreamId,
    reader: u64,
    cursor: u64,
    /// The ring no longer holds every event after the cursor.
    pub gap: bool,
    /// A reader beside others whose reads are not deliveries.
    watching: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("the session has ended")]
    Closed,
    #[error("Last-Event-ID names an event this session never had")]
    UnknownEvent,
}

/// All sessions' logs on this node: the logs themselves, or with a shared
/// log, this node's mirrors of them.
pub struct Hub {
    logs: DashMap<String, Arc<SessionLog>>,
    limits: LogLimits,
    shared: Option<Arc<SharedEvents>>,
    started: Instant,
}

/// How long a mirror nobody on this node uses is kept.
const MIRROR_IDLE: Duration = Duration::from_secs(120);

impl Hub {
    /// The limits of each session's log.
    pub fn limits(&self) -> LogLimits {
        self.limits
    }

    pub fn new(limits: LogLimits) -> Self {
        Hub {
            logs: DashMap::new(),
            limits,
            shared: None,
            started: Instant::now(),
        }
    }

    /// A hub of mirrors of the shared log.
    pub fn shared(limits: LogLimits, events: Arc<SharedEvents>) -> Self {
        Hub {
            shared: Some(events),
            ..Hub::new(limits)
        }
    }

    pub fn events(&self) -> Option<&Arc<SharedEvents>> {
        self.shared.as_ref()
    }

    fn clock(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn new_log(&self, session: &str, synced: bool) -> Arc<SessionLog> {
        let log = match &self.shared {
            Some(events) => SessionLog::mirror(self.limits, events.clone(), session, synced),
            None => SessionLog::new(self.limits),
        };
        log.used.store(self.clock(), Ordering::Relaxed);
        Arc::new(log)
    }

    /// Creates the log of a new session.
    pub fn create(&self, session: &str) -> Arc<SessionLog> {
        let log = self.new_log(session, true);
        self.logs.insert(session.to_owned(), log.clone());
        log
    }

    /// The log this node has for a session, if any.
    pub fn get(&self, session: &str) -> Option<Arc<SessionLog>> {
        self.logs.get(session).map(|l| l.clone())
    }

    /// A session's log. With a shared log, a node that has no mirror of it
    /// makes one and reads the shared log into it; `current` reads what the
    /// mirror may not have yet even if it has one (before a stream resumes
    /// from an event another node served). `None`: the session is gone.
    pub async fn open(
        &self,
        session: &str,
        current: bool,
    ) -> Result<Option<Arc<SessionLog>>, crate::session::StoreError> {
        let Some(_) = &self.shared else {
            return Ok(self.get(session));
        };
        let (log, fresh) = match self.logs.entry(session.to_owned()) {
            dashmap::Entry::Occupied(e) => (e.get().clone(), false),
            dashmap::Entry::Vacant(v) => (v.insert(self.new_log(session, false)).clone(), true),
        };
        log.used.store(self.clock(), Ordering::Relaxed);
        if (fresh || current || !log.lock().synced) && !self.sync(session, &log).await? {
            return Ok(None);
        }
        Ok(Some(log))
    }

    /// Reads the shared log into a mirror, after what it has. False if the
    /// session is gone (the mirror is then dropped).
    pub async fn sync(
        &self,
        session: &str,
        log: &Arc<SessionLog>,
    ) -> Result<bool, crate::session::StoreError> {
        let Some(events) = &self.shared else {
            return Ok(true);
        };
        // Entries that arrive while a read is under way may wait on one
        // the read did not see yet: a few reads settle it.
        for _ in 0..4 {
            let from = log.read_from();
            let read = events.read(session, from).await.inspect_err(|_| {
                log.lock().filling = false;
            })?;
            let Some(read) = read else {
                self.remove(session);
                return Ok(false);
            };
            if !log.apply_read(read) {
                break;
            }
        }
        Ok(true)
    }

    /// A live entry of the shared log for a mirror on this node; the
    /// mirror, if it now misses an entry and should be read again.
    pub fn offer(&self, session: &str, seq: u64, entry: Entry) -> Option<Arc<SessionLog>> {
        let log = self.get(session)?;
        log.offer(seq, entry).then_some(log)
    }

    /// Every mirror, to read what a broken bus subscription missed.
    pub fn mirrors(&self) -> Vec<(String, Arc<SessionLog>)> {
        self.logs
            .iter()
            .map(|l| (l.key().clone(), l.value().clone()))
            .collect()
    }

    /// Publishes one message on a session's standalone stream; `None` if
    /// the session is gone.
    pub async fn publish(
        &self,
        session: &str,
        payload: &[u8],
    ) -> Result<Option<EventId>, crate::session::StoreError> {
        let seq = match &self.shared {
            None => {
                return Ok(self
                    .get(session)
                    .and_then(|log| log.append_local(STANDALONE, payload).ok()));
            }
            Some(events) => events.publish(session, payload).await.map_err(|()| {
                crate::session::StoreError::Redis(crate::session::redis::RedisUnavailable.into())
            })?,
        };
        Ok(seq.map(|seq| EventId {
            stream: STANDALONE,
            seq,
        }))
    }

    /// Drops mirrors nobody on this node has used for a while; a later use
    /// reads the shared log again.
    pub fn drop_idle_mirrors(&self) {
        if self.shared.is_none() {
            return;
        }
        let cutoff = self
            .clock()
            .saturating_sub(u64::try_from(MIRROR_IDLE.as_millis()).unwrap_or(0));
        self.logs.retain(|_, log| {
            let busy = log.has_readers()
                || !log.lock().producing.is_empty()
                || log.in_flight.load(Ordering::Acquire) > 0
                || log.kept.load(Ordering::Acquire) > 0
                || log.used.load(Ordering::Relaxed) > cutoff;
            if !busy {
                log.close();
            }
            busy
        });
    }

    /// Ends a session's log and every stream reading it.
    pub fn remove(&self, session: &str) {
        if let Some((_, log)) = self.logs.remove(session) {
            log.close();
        }
    }

    /// Sessions with at least one client stream attached on this node.
    pub fn sessions_with_readers(&self) -> Vec<String> {
        self.logs
            .iter()
            .filter(|l| l.has_readers())
            .map(|l| l.key().clone())
            .collect()
    }

    /// Ends every stream, for shutdown.
    pub fn close_all(&self) {
        for log in self.logs.iter() {
            log.close();
        }
    }
}

/// Per-stream counters, resolved to their label values once.
#[derive(Clone)]
pub struct StreamMetrics {
    pub delivered: IntCounter,
    pub open: IntGauge,
}

/// An SSE stream fed from a session log.
pub struct LiveStream {
    log: Arc<SessionLog>,
    attach: Attach,
    cursor: u64,
    prelude: Option<Bytes>,
    keepalive: Duration,
    /// When the next keep-alive is due unless something else is written;
    /// wake-ups for other streams of the session do not postpone it.
    next_keepalive: Instant,
    metrics: Option<StreamMetrics>,
    unacked: (u64, u64),
    /// When the stream ends because its token expires; `None` once
    /// [`TOKEN_EXPIRED`] is written.
    ends_at: Option<Instant>,
    ended: bool,
}

impl LiveStream {
    /// `prelude` is written first: the legacy `endpoint` event, or the
    /// priming event.
    pub fn new(
        log: Arc<SessionLog>,
        attach: Attach,
        prelude: Option<Bytes>,
        keepalive: Duration,
        metrics: Option<StreamMetrics>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.open.inc();
        }
        LiveStream {
            cursor: attach.cursor,
            log,
            attach,
            prelude,
            keepalive,
            next_keepalive: Instant::now() + keepalive,
            metrics,
            unacked: (0, 0),
            ends_at: None,
            ended: false,
        }
    }

    /// Ends the stream at `when` (its token expires), with [`TOKEN_EXPIRED`]
    /// as its last chunk.
    pub fn end_at(&mut self, when: Instant) {
        self.ends_at = Some(when);
    }

    /// The id to announce in a priming event: the position this stream
    /// starts from, so a reconnect with it loses nothing.
    pub fn position(&self) -> EventId {
        EventId {
            stream: self.attach.stream,
            seq: self.cursor,
        }
    }

    pub fn set_prelude(&mut self, prelude: Bytes) {
        self.prelude = Some(prelude);
    }
}

#[async_trait]
impl ChunkSource for LiveStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(p) = self.prelude.take() {
            self.next_keepalive = Instant::now() + self.keepalive;
            return Some(p);
        }
        if self.ended {
            return None;
        }
        loop {
            if self.ends_at.is_some_and(|end| Instant::now() >= end) {
                self.ended = true;
                return Some(Bytes::from_static(TOKEN_EXPIRED));
            }
            // Register interest before looking, so an append between the
            // look and the wait still wakes us.
            let notified = self.log.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self
                .log
                .poll(self.attach.stream, self.attach.reader, self.cursor)
            {
                Poll::Events { chunk, count, upto } => {
                    self.cursor = upto;
                    self.unacked = (count, upto);
                    self.next_keepalive = Instant::now() + self.keepalive;
                    return Some(chunk);
                }
                Poll::End => return None,
                Poll::Wait => {}
            }
            let wake = match self.ends_at {
                Some(end) => end.min(self.next_keepalive),
                None => self.next_keepalive,
            };
            let deadline = tokio::time::Instant::from_std(wake);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if Instant::now() < self.next_keepalive {
                    // The token's end: said at the top of the loop.
                    continue;
                }
                self.next_keepalive = Instant::now() + self.keepalive;
                return Some(Bytes::from_static(KEEPALIVE));
            }
        }
    }

    fn written(&mut self) {
        let (count, _) = self.unacked;
        self.written_filtered(count);
    }
}

impl LiveStream {
    /// [`ChunkSource::written`] for a reader that passed on only
    /// `delivered` of the events of the last chunk (and wrote that): the
    /// rest is read too, but not counted as delivered.
    pub fn written_filtered(&mut self, delivered: u64) {
        let (count, upto) = std::mem::take(&mut self.unacked);
        if count > 0 && !self.attach.watching {
            self.log.mark_delivered(self.attach.stream, upto);
        }
        if delivered > 0
            && let Some(m) = &self.metrics
        {
            m.delivered.inc_by(delivered);
        }
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.log.detach(self.attach.stream, self.attach.reader);
        if let Some(m) = &self.metrics {
            m.open.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KA: Duration = Duration::from_secs(3600);

    fn limits(max_events: usize) -> LogLimits {
        LogLimits {
            max_events,
            max_bytes: 1 << 20,
        }
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).expect("utf8")
    }

    /// Reads what a stream has now, acknowledging it as written.
    async fn drain_now(s: &mut LiveStream) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(20), s.next_chunk()).await {
                Ok(Some(chunk)) => {
                    s.written();
                    out.extend(
                        text(&chunk)
                            .split("\n\n")
                            .filter(|f| !f.is_empty())
                            .map(str::to_owned),
                    );
                }
                Ok(None) | Err(_) => return out,
            }
        }
    }

    fn ids(frames: &[String]) -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| {
                f.lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn frames_split_multiline_data() {
        let f = sse_frame(
            Some(EventId { stream: 3, seq: 9 }),
            Some("message"),
            b"{\n \"a\": 1\r\n}\r",
        );
        assert_eq!(
            text(&f),
            "id: 3.9\nevent: message\ndata: {\ndata:  \"a\": 1\ndata: }\ndata: \n\n"
        );
        assert_eq!(text(&sse_frame(None, None, b"{}")), "data: {}\n\n");
        let p = priming_frame(EventId { stream: 0, seq: 4 }, Duration::from_millis(1500));
        assert_eq!(text(&p), "id: 0.4\nretry: 1500\ndata: \n\n");
    }

    #[test]
    fn event_ids_round_trip_and_reject_garbage() {
        let id = EventId {
            stream: 12,
            seq: 345,
        };
        assert_eq!(EventId::parse(&id.to_string()), Some(id));
        // A shared log's POST streams carry the node's tag in the high bits.
        let wide = EventId {
            stream: u64::MAX,
            seq: 1,
        };
        assert_eq!(EventId::parse(&wide.to_string()), Some(wide));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.1",
            "1.-2",
            "1.2.3",
            "99999999999999999999.1",
            "1.999999999999999999999",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_are_unique_and_increasing_across_streams() {
        let log = SessionLog::new(limits(100));
        let p = log.begin_stream().expect("open");
        let a = log.append_local(STANDALONE, b"{}").expect("append");
        let b = log.append_local(p, b"{}").expect("append");
        let c = log.append_local(STANDALONE, b"{}").expect("append");
        assert!(a.seq < b.seq && b.seq < c.seq);
        assert_eq!((a.stream, b.stream), (STANDALONE, p));
    }

    #[test]
    fn the_ring_is_bounded() {
        let log = SessionLog::new(limits(3));
        for _ in 0..10 {
            log.append_local(STANDALONE, b"{}").expect("append");
        }
        assert_eq!(log.len(), 3);
        let a = log.attach(STANDALONE, Some(2)).expect("attach");
        assert!(a.gap, "events 3..7 were evicted");
        let a = log.attach(STANDALONE, Some(7)).expect("attach");
        assert!(!a.gap);
    }

    #[tokio::test]
    async fn replay_gives_exactly_the_missed_events_of_that_stream() {
        let log = Arc::new(SessionLog::new(limits(100)));
        let post = log.begin_stream().expect("open");
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(
                log.append_local(STANDALONE, format!("{{\"n\":{i}}}").as_bytes())
                    .expect("append"),
            );
            log.append_local(post, b"{\"other\":true}").expect("append");
        }
        let missed: Vec<EventId> = (3..8)
            .map(|i| {
                log.append_local(STANDALONE, format!("{{\"n\":{i}}}").as_bytes())
                    .expect("append")
            })
            .collect();

        let a = log.attach(STANDALONE, Some(seen[2].seq)).expect("attach");
        let mut s = LiveStream::new(log.clone(), a, None, KA, None);
        let frames = drain_now(&mut s).await;
        let expected: Vec<String> = missed.iter().map(ToString::to_string).collect();
        assert_eq!(ids(&frames), expected);
        assert!(frames.iter().all(|f| !f.contains("other")));
        assert!(frames[0].contains("{\"n\":3}"));
    }

    #[tokio::test]
    async fn fresh_standalone_stream_gets_only_undelivered_events() {
        let log = Arc::new(SessionLog::new(limits(100)));
        log.append_local(STANDALONE, b"{\"n\":1}").expect("append");
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut first = LiveStream::new(log.clone(), a, None, KA, None);
        assert_eq!(drain_now(&mut first).await.len(), 1);
        drop(first);
        log.append_local(STANDALONE, b"{\"n\":2}").expect("append");
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut second = LiveStream::new(log.clone(), a, None, KA, None);
        let frames = drain_now(&mut second).await;
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("{\"n\":2}"));
    }

    #[tokio::test]
    async fn watchers_read_side_by_side_from_now_without_delivering() {
        let log = Arc::new(SessionLog::new(limits(100)));
        log.append_local(STANDALONE, b"{\"n\":1}").expect("append");
        let mut one = LiveStream::new(log.clone(), log.watch().expect("watch"), None, KA, None);
        let mut two = LiveStream::new(log.clone(), log.watch().expect("watch"), None, KA, None);
        log.append_local(STANDALONE, b"{\"n\":2}").expect("append");
        for watcher in [&mut one, &mut two] {
            let frames = drain_now(watcher).await;
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert!(frames[0].contains("{\"n\":2}"), "only what came after it");
        }
        // Neither superseded the other, and what they read still counts as
        // undelivered for a standalone reader.
        assert!(log.has_readers());
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut get = LiveStream::new(log.clone(), a, None, KA, None);
        assert_eq!(drain_now(&mut get).await.len(), 2);
    }

    #[tokio::test]
    async fn letting_go_ends_the_connection_not_the_stream() {
        let log = Arc::new(SessionLog::new(limits(100)));
        let stream = log.begin_stream().expect("stream");
        log.append_local(stream, b"{\"n\":1}").expect("append");
        let mut first = LiveStream::new(
            log.clone(),
            log.attach(stream, None).expect("attach"),
            None,
            KA,
            None,
        );
        assert_eq!(drain_now(&mut first).await.len(), 1);
        log.let_go(stream);
        assert!(first.next_chunk().await.is_none(), "the connection ends");
        log.append_local(stream, b"{\"n\":2}")
            .expect("the stream goes on");
        let resumed = log.attach(stream, Some(1)).expect("resume after seq 1");
        let mut again = LiveStream::new(log.clone(), resumed, None, KA, None);
        log.end_stream(stream);
        let frames = drain_now(&mut again).await;
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("{\"n\":2}"));
    }

    #[tokio::test]
    async fn live_events_wake_a_waiting_reader() {
        let log = Arc::new(SessionLog::new(limits(100)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut s = LiveStream::new(log.clone(), a, None, KA, None);
        let waiter = tokio::spawn(async move { s.next_chunk().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.append_local(STANDALONE, b"{\"live\":1}")
            .expect("append");
        let chunk = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("joined")
            .expect("chunk");
        assert!(text(&chunk).contains("{\"live\":1}"));
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_token_does() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut s = LiveStream::new(log.clone(), a, None, Duration::from_millis(40), None);
        let started = Instant::now();
        s.end_at(started + Duration::from_millis(150));
        log.append_local(STANDALONE, b"{\"n\":1}").expect("append");
        let mut chunks = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(2), s.next_chunk())
            .await
            .expect("in time")
        {
            chunks.push(chunk);
        }
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(
            text(&chunks[0]).contains("{\"n\":1}"),
            "events before the end are delivered"
        );
        assert_eq!(chunks.last().map(|c| &c[..]), Some(TOKEN_EXPIRED));
        assert!(
            chunks[1..chunks.len() - 1]
                .iter()
                .all(|c| &c[..] == KEEPALIVE),
            "keep-alives until then"
        );
        // Nothing after the end, even if more arrives.
        log.append_local(STANDALONE, b"{\"n\":2}").expect("append");
        assert!(s.next_chunk().await.is_none());
    }

    #[tokio::test]
    async fn keepalive_is_sent_when_idle() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut s = LiveStream::new(log, a, None, Duration::from_millis(30), None);
        let chunk = s.next_chunk().await.expect("keepalive");
        assert_eq!(&chunk[..], KEEPALIVE);
    }

    #[tokio::test]
    async fn keepalives_are_due_even_while_other_streams_are_busy() {
        let log = Arc::new(SessionLog::new(limits(10_000)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut idle = LiveStream::new(log.clone(), a, None, Duration::from_millis(100), None);
        let post = log.begin_stream().expect("open");
        let busy = {
            let log = log.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let _ = log.append_local(post, b"{}");
                }
            })
        };
        let started = Instant::now();
        let chunk = tokio::time::timeout(Duration::from_secs(2), idle.next_chunk())
            .await
            .expect("a keep-alive in time")
            .expect("open");
        assert_eq!(&chunk[..], KEEPALIVE);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        busy.abort();
    }

    #[tokio::test]
    async fn post_traffic_never_pushes_out_published_messages() {
        let log = Arc::new(SessionLog::new(limits(4)));
        let kept = log
            .append_local(STANDALONE, b"{\"kept\":1}")
            .expect("append");
        let post = log.begin_stream().expect("open");
        for _ in 0..100 {
            log.append_local(post, b"{\"progress\":1}").expect("append");
        }
        let a = log.attach(STANDALONE, None).expect("attach");
        assert!(!a.gap);
        let mut s = LiveStream::new(log, a, None, KA, None);
        let frames = drain_now(&mut s).await;
        assert_eq!(ids(&frames), vec![kept.to_string()]);
    }

    #[tokio::test]
    async fn busy_neighbours_never_evict_an_answer_not_yet_read() {
        // 30 calls at once on one session, a log of 4 events (so up to 32
        // with the headroom): each answer still reaches its own stream.
        let log = Arc::new(SessionLog::new(limits(4)));
        let mut streams = Vec::new();
        for i in 0..30 {
            let stream = log.begin_stream().expect("open");
            let a = log.attach(stream, None).expect("attach");
            streams.push((i, LiveStream::new(log.clone(), a, None, KA, None)));
        }
        for (i, s) in &streams {
            let stream = s.position().stream;
            log.append_local(stream, format!("{{\"answer\":{i}}}").as_bytes())
                .expect("append");
            log.end_stream(stream);
        }
        for (i, s) in &mut streams {
            let frames = drain_now(s).await;
            assert_eq!(frames.len(), 1, "stream {i}: {frames:?}");
            assert!(frames[0].contains(&format!("{{\"answer\":{i}}}")));
        }
        drop(streams);
        // Read and done: the next append brings the ring back to its size.
        let last = log.begin_stream().expect("open");
        log.append_local(last, b"{}").expect("append");
        assert!(log.len() <= 4, "{} events held", log.len());
    }

    #[tokio::test]
    async fn one_slow_reader_keeps_its_answer_without_pinning_the_log() {
        let log = Arc::new(SessionLog::new(limits(4)));
        let slow = log.begin_stream().expect("open");
        let a = log.attach(slow, None).expect("attach");
        let mut slow_reader = LiveStream::new(log.clone(), a, None, KA, None);
        log.append_local(slow, b"{\"slow\":1}").expect("append");
        log.end_stream(slow);
        for _ in 0..200 {
            let quick = log.begin_stream().expect("open");
            let a = log.attach(quick, None).expect("attach");
            let mut reader = LiveStream::new(log.clone(), a, None, KA, None);
            log.append_local(quick, b"{}").expect("append");
            log.end_stream(quick);
            assert_eq!(drain_now(&mut reader).await.len(), 1);
        }
        assert!(
            log.len() <= 5,
            "read answers are evicted around the slow one: {}",
            log.len()
        );
        let frames = drain_now(&mut slow_reader).await;
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("{\"slow\":1}"));
    }

    #[tokio::test]
    async fn unread_answers_are_kept_only_up_to_the_headroom() {
        let log = Arc::new(SessionLog::new(limits(2)));
        for _ in 0..100 {
            let stream = log.begin_stream().expect("open");
            log.append_local(stream, b"{}").expect("append");
        }
        assert_eq!(
            log.len(),
            2 * UNREAD_HEADROOM,
            "bounded even if nobody reads"
        );
    }

    #[test]
    fn rings_are_bounded_by_bytes_but_keep_the_newest() {
        let log = SessionLog::new(LogLimits {
            max_events: 1000,
            max_bytes: 100,
        });
        for _ in 0..10 {
            log.append_local(STANDALONE, &[b'x'; 40]).expect("append");
        }
        assert_eq!(log.len(), 1, "each frame is over 40 bytes: only one fits");
        log.append_local(STANDALONE, &[b'y'; 500]).expect("append");
        assert_eq!(
            log.len(),
            1,
            "an event bigger than the budget is still kept"
        );
    }

    #[tokio::test]
    async fn a_backlog_is_written_in_bounded_chunks() {
        let log = Arc::new(SessionLog::new(LogLimits {
            max_events: 1000,
            max_bytes: 8 << 20,
        }));
        let payload = vec![b'z'; 100 * 1024];
        for _ in 0..5 {
            log.append_local(STANDALONE, &payload).expect("append");
        }
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut s = LiveStream::new(log, a, None, KA, None);
        let first = s.next_chunk().await.expect("chunk");
        assert!(first.len() <= MAX_CHUNK, "{}", first.len());
        s.written();
        let mut total = first.len();
        while total < 5 * payload.len() {
            total += s.next_chunk().await.expect("chunk").len();
            s.written();
        }
    }

    #[tokio::test]
    async fn a_new_reader_supersedes_the_old_one() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut old = LiveStream::new(log.clone(), a, None, KA, None);
        let waiter = tokio::spawn(async move { old.next_chunk().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _new = log.attach(STANDALONE, None).expect("attach");
        let ended = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("old reader stops")
            .expect("joined");
        assert!(ended.is_none());
    }

    #[tokio::test]
    async fn post_stream_reader_ends_after_the_stream_is_complete() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let p = log.begin_stream().expect("open");
        let a = log.attach(p, None).expect("attach");
        let mut s = LiveStream::new(log.clone(), a, None, KA, None);
        log.append_local(p, b"{\"progress\":1}").expect("append");
        log.append_local(p, b"{\"result\":1}").expect("append");
        log.end_stream(p);
        let frames = drain_now(&mut s).await;
        assert_eq!(frames.len(), 2);
        assert!(s.next_chunk().await.is_none());
    }

    #[tokio::test]
    async fn closing_the_log_ends_readers_and_refuses_appends() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let a = log.attach(STANDALONE, None).expect("attach");
        let mut s = LiveStream::new(log.clone(), a, None, KA, None);
        log.close();
        assert!(s.next_chunk().await.is_none());
        assert_eq!(log.append_local(STANDALONE, b"{}"), Err(Closed));
        assert_eq!(
            log.attach(STANDALONE, None).err(),
            Some(AttachError::Closed)
        );
    }

    #[test]
    fn in_flight_slots_are_bounded_and_released() {
        let log = Arc::new(SessionLog::new(limits(10)));
        let a = log.try_reserve(2).expect("first");
        let _b = log.try_reserve(2).expect("second");
        assert!(
            log.try_reserve(2).is_none(),
            "the third waits for a free slot"
        );
        drop(a);
        assert!(log.try_reserve(2).is_some());
    }

    #[test]
    fn unknown_resume_points_are_refused() {
        let log = SessionLog::new(limits(10));
        log.append_local(STANDALONE, b"{}").expect("append");
        assert_eq!(
            log.attach(STANDALONE, Some(99)).err(),
            Some(AttachError::UnknownEvent)
        );
        assert_eq!(
            log.attach(7, Some(0)).err(),
            Some(AttachError::UnknownEvent)
        );
    }

    #[tokio::test]
    async fn prelude_comes_first_and_metrics_count() {
        let delivered = IntCounter::new("d", "d").expect("counter");
        let open = IntGauge::new("o", "o").expect("gauge");
        let log = Arc::new(SessionLog::new(limits(10)));
        log.append_local(STANDALONE, b"{}").expect("append");
        let a = log.attach(STANDALONE, None).expect("attach");
        let metrics = StreamMetrics {
            delivered: delivered.clone(),
            open: open.clone(),
        };
        let mut s = LiveStream::new(
            log,
            a,
            Some(Bytes::from_static(b"event: endpoint\ndata: /x\n\n")),
            KA,
            Some(metrics),
        );
        assert_eq!(open.get(), 1);
        let first = s.next_chunk().await.expect("prelude");
        assert!(text(&first).starts_with("event: endpoint"));
        s.written();
        assert_eq!(delivered.get(), 0);
        s.next_chunk().await.expect("event");
        s.written();
        assert_eq!(delivered.get(), 1);
        drop(s);
        assert_eq!(open.get(), 0);
    }
}
