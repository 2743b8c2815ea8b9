//! The shared event log (`sessions.store: redis`): every node's appends go
//! to one log per session in Redis, and come back to every node that
//! mirrors the session through one pub/sub subscription per node.
//!
//! Keys, under the configured prefix `P`, beside the session's hash
//! `P s:{id}` (which also holds `q`, the session's last seq, and `d`, the
//! highest standalone seq delivered to a client):
//! - `P e:{id}:a`: a Redis stream, the standalone stream's events;
//! - `P e:{id}:p`: a Redis stream, the POST streams' events, so that POST
//!   traffic never pushes out published messages.
//!
//! Each stream's entry ids are `{seq}-0`, so a read after a seq is one
//! `XRANGE`; each is bounded by length (`XADD MAXLEN`) and by age (the
//! append trims entries older than `sessions.event_log_max_age`), and
//! expires with the session.
//!
//! One Lua script appends: it takes the next seq, adds the entry and
//! publishes it on the node bus (`P bus`), all at once, so the bus carries
//! every session's entries in seq order. A mirror applies them in that
//! order; one that finds an entry missing (a node that was not subscribed
//! for a while) reads the log after its last seq.
//!
//! Appends are sent by one writer task per node, in order, many to a
//! pipeline. The bus also carries the gateway's notices between nodes,
//! which it does not read (the gateway's `bus.rs` does).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt as _;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Entry, Hub, LogRead, StreamId};
use crate::session::redis::{NOW, OP_TIMEOUT, RedisLink, RedisStoreError, connection};

/// Most operations the writer sends in one pipeline.
const BATCH: usize = 512;

/// How long the writer keeps trying a batch Redis refused to take.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// Seqs a session's log skips when its key is first written by another
/// primary than the last (a failover): more than a reader can have seen
/// of the old primary's unreplicated tail.
const SEQ_GAP: u64 = 1 << 20;

/// Most operations, and payload bytes, waiting for the writer or being
/// written: what a node holds while Redis is slow or away. More are
/// dropped and counted.
const MAX_QUEUED: usize = 65_536;
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// What a node sends to the shared log.
pub(crate) enum Op {
    Message {
        stream: StreamId,
        payload: Bytes,
    },
    Begin(StreamId),
    End(StreamId),
    /// The standalone stream was delivered up to this seq.
    Delivered(u64),
    /// A message for the nodes (the gateway's notice; opaque here).
    Notice(Bytes),
    /// A request of the session (its JSON-RPC id) runs on this node, so a
    /// client's cancellation received elsewhere is worth a notice.
    Running(Bytes),
    /// That request ended.
    Finished(Bytes),
}

impl Op {
    /// The payload bytes it holds while it waits.
    fn size(&self) -> usize {
        match self {
            Op::Message { payload, .. }
            | Op::Notice(payload)
            | Op::Running(payload)
            | Op::Finished(payload) => payload.len(),
            _ => 0,
        }
    }

    /// Sent as a command of its own, not with a run of appends.
    fn alone(&self) -> bool {
        matches!(self, Op::Notice(_) | Op::Running(_) | Op::Finished(_))
    }
}

/// For a publish: the seq it got, `None` if the session is gone.
type Done = oneshot::Sender<Result<Option<u64>, ()>>;

struct Queued {
    session: Arc<str>,
    op: Op,
    done: Option<Done>,
}

/// How often a node says in Redis that it is alive, and renews the leases
/// it holds; it counts as gone after three missed.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long the bus may go without bringing back one of the node's own
/// heartbeats before the node takes its subscription for dead.
const BUS_SILENCE: Duration = Duration::from_secs(15);

/// How long a lease lasts unless its node renews it (see
/// [`SharedEvents::hold`]): how long a session's background work may be
/// missing after its node dies.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// Most operations one script call of the writer carries.
const RUN: usize = 64;

/// The batch cut into runs the writer sends as one command each: a
/// notice alone, or up to [`RUN`] operations in a row of one session.
fn runs_of(batch: &[Queued]) -> Vec<std::ops::Range<usize>> {
    let mut start = 0;
    batch
        .chunk_by(|a, b| a.session == b.session && !a.op.alone() && !b.op.alone())
        .flat_map(|run| run.chunks(RUN))
        .map(|run| {
            start += run.len();
            start - run.len()..start
        })
        .collect()
}

/// A request that started and ended within one batch needs no record:
/// both operations are dropped.
fn drop_short_requests(batch: &mut Vec<Queued>) {
    use std::collections::HashMap;
    let mut running: HashMap<(&Arc<str>, &Bytes), usize> = HashMap::new();
    let mut gone = vec![false; batch.len()];
    for (i, q) in batch.iter().enumerate() {
        match &q.op {
            Op::Running(id) => {
                running.insert((&q.session, id), i);
            }
            Op::Finished(id) => {
                if let Some(start) = running.remove(&(&q.session, id)) {
                    gone[start] = true;
                    gone[i] = true;
                }
            }
            _ => {}
        }
    }
    let mut i = 0;
    batch.retain(|_| {
        let keep = !gone[i];
        i += 1;
        keep
    });
}

/// Of a session's delivery marks in one batch, the last says it all: the
/// others are dropped.
fn drop_superseded_marks(batch: &mut Vec<Queued>) {
    let mut last = std::collections::HashMap::new();
    for (i, q) in batch.iter().enumerate() {
        if let Op::Delivered(_) = q.op {
            last.insert(q.session.clone(), i);
        }
    }
    let mut i = 0;
    batch.retain(|q| {
        let keep = !matches!(q.op, Op::Delivered(_)) || last.get(&q.session) == Some(&i);
        i += 1;
        keep
    });
}

/// Where a worker's message for a hold goes ([`SharedEvents::hold_route`]).
#[derive(Debug, PartialEq)]
pub enum HoldRoute {
    /// Node `node` holds it, in `state`.
    Owner { node: u32, state: String },
    /// No node holds it yet: queued for the one that will.
    Queued,
    /// Its queue is full.
    Full,
}

/// What a node does with what arrives on the bus.
pub trait BusHandler: Send + Sync {
    fn hub(&self) -> &Hub;
    /// Another node's notice: bytes the gateway's nodes agree on.
    fn notice(self: Arc<Self>, notice: &[u8]);
    /// The node's bus subscription was (re)made: notices may have been
    /// missed. The node reports itself ready once this is done.
    fn bus_up(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SharedLimits {
    pub max_events: usize,
    /// Payload bytes each of a session's two streams keeps (the newest
    /// entry always stays).
    pub max_bytes: usize,
    pub max_age: Duration,
    pub idle_ttl: Duration,
    /// Replicas each write waits for (Redis `WAIT`), and for how long.
    pub wait: Option<(u32, Duration)>,
}

/// One node's side of the shared event log.
pub struct SharedEvents {
    conn: RedisLink,
    /// The writer's connection: `conn`, or with `sessions.wait` one of its
    /// own.
    writer: RedisLink,
    prefix: String,
    channel: String,
    /// This node's random tag: it makes POST stream ids unique across
    /// nodes, and lets a node skip its own notices.
    node: u32,
    next_stream: AtomicU32,
    tx: mpsc::Sender<Queued>,
    rx: Mutex<Option<mpsc::Receiver<Queued>>>,
    /// Payload bytes waiting for the writer.
    queued_bytes: AtomicUsize,
    /// Who is told about streams whose begin or end is dropped.
    handler: std::sync::OnceLock<Weak<dyn BusHandler>>,
    runtime: tokio::runtime::Handle,
    max_events: usize,
    max_bytes: usize,
    max_age_ms: u64,
    key_ttl_ms: u64,
    /// Replicas each write waits for, and milliseconds it waits at most.
    wait: Option<(u32, u64)>,
    append: Script,
    running: Script,
    read: Script,
    lease: Script,
    release: Script,
    hold_route: Script,
    hold_claim: Script,
    bus_up: AtomicBool,
    dropped: AtomicU64,
    /// Events written that the replicas did not confirm in time.
    unreplicated: AtomicU64,
    /// Leases this node holds for its tasks, renewed at each heartbeat: by
    /// key, a number telling holds apart and what to cancel on loss.
    held: DashMap<String, (u64, CancellationToken)>,
    next_hold: AtomicU64,
}

/// Whether a failed write was certainly not applied, so that sending it
/// again cannot apply it twice: refused (or never sent, for want of a
/// primary), or refused by a replica or a primary cut off from its own.
fn not_applied(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SharedEvents {
    /// Must be called within the Tokio runtime that will drive the
    /// connections and the node's writer and bus tasks.
    pub fn new(
        target: impl Into<crate::session::RedisTarget>,
        prefix: &str,
        limits: SharedLimits,
    ) -> Result<Arc<Self>, RedisStoreError> {
        let target = target.into();
        let conn = connection(target.clone())?;
        // WAIT holds its connection until the replicas answer: the writer,
        // which waits anyway, gets one of its own.
        let writer = match limits.wait {
            Some(_) => connection(target)?,
            None => conn.clone(),
        };
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        Ok(Arc::new(SharedEvents {
            conn,
            writer,
            prefix: prefix.to_owned(),
            channel: format!("{prefix}bus"),
            node: rand::random::<u32>().max(1),
            next_stream: AtomicU32::new(1),
            tx,
            rx: Mutex::new(Some(rx)),
            queued_bytes: AtomicUsize::new(0),
            handler: std::sync::OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            max_events: limits.max_events.max(1),
            max_bytes: limits.max_bytes.max(1),
            max_age_ms: millis(limits.max_age),
            key_ttl_ms: millis(limits.idle_ttl).saturating_mul(2),
            wait: limits.wait.map(|(n, t)| (n, millis(t).max(1))),
            append: Script::new(&format!(
                "{NOW}{}",
                APPEND.replace("SEQ_GAP", &SEQ_GAP.to_string())
            )),
            running: Script::new(RUNNING),
            read: Script::new(READ),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
            hold_route: Script::new(HOLD_ROUTE),
            hold_claim: Script::new(HOLD_CLAIM),
            bus_up: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            unreplicated: AtomicU64::new(0),
            held: DashMap::new(),
            next_hold: AtomicU64::new(1),
        }))
    }

    /// Starts the node's writer and its bus subscription, which deliver to
    /// `handler` for as long as it lives.
    pub fn start(self: &Arc<Self>, handler: Weak<dyn BusHandler>) {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(rx) = rx else { return };
        let _ = self.handler.set(handler.clone());
        self.runtime
            .spawn(self.clone().write_loop(rx, handler.clone()));
        self.runtime.spawn(self.clone().heartbeat(handler.clone()));
        self.runtime.spawn(self.clone().bus_loop(handler));
    }

    /// Says in Redis that this node is alive and renews its leases, every
    /// [`HEARTBEAT`], for as long as its handler lives (see
    /// [`SharedEvents::node_alive`]). A node that cannot for 2/3 of
    /// [`LEASE_TTL`] (cut off from Redis) gives its leases up before
    /// another node may take them.
    async fn heartbeat(self: Arc<Self>, handler: Weak<dyn BusHandler>) {
        let mut beaten = tokio::time::Instant::now();
        while handler.strong_count() > 0 {
            match self.beat().await {
                Ok(()) => beaten = tokio::time::Instant::now(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot renew this node's heartbeat and leases");
                    if beaten.elapsed() >= LEASE_TTL * 2 / 3 && !self.held.is_empty() {
                        tracing::info!("cannot renew this node's leases; letting them go");
                        let keys: Vec<String> = self.held.iter().map(|e| e.key().clone()).collect();
                        for key in keys {
                            if let Some((_, (_, lost))) = self.held.remove(&key) {
                                lost.cancel();
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// One heartbeat: the node's key, then its leases; a lease another node
    /// took meanwhile is lost.
    async fn beat(&self) -> Result<(), RedisStoreError> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(self.node_key(self.node))
            .arg(1)
            .arg("PX")
            .arg(millis(HEARTBEAT * 3))
            .query_async(&mut conn)
            .await?;
        // Heard back on the node's own subscription: proof it delivers.
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.alive_channel())
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let held: Vec<(String, u64)> = self
            .held
            .iter()
            .map(|e| (e.key().clone(), e.value().0))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut renew = self.lease.prepare_invoke();
        for (key, _) in &held {
            renew.key(key);
        }
        let kept: Vec<i64> = renew
            .arg(self.node)
            .arg(millis(LEASE_TTL))
            .invoke_async(&mut conn)
            .await?;
        for ((key, n), kept) in held.iter().zip(kept) {
            if kept != 1
                && let Some((_, (_, lost))) = self.held.remove_if(key, |_, (m, _)| m == n)
            {
                tracing::info!(lease = %key, "another node holds this lease now");
                lost.cancel();
            }
        }
        Ok(())
    }

    /// Where the node's heartbeats go, for its own subscription to hear.
    fn alive_channel(&self) -> String {
        format!("{}bus:alive:{:08x}", self.prefix, self.node)
    }

    fn node_key(&self, node: u32) -> String {
        format!("{}node:{node:08x}", self.prefix)
    }

    /// Whether node `node` said it was alive within the last three
    /// heartbeats.
    pub async fn node_alive(&self, node: u32) -> Result<bool, RedisStoreError> {
        let mut conn = self.conn.clone();
        let alive: bool = redis::cmd("EXISTS")
            .arg(self.node_key(node))
            .query_async(&mut conn)
            .await?;
        Ok(alive)
    }

    /// Whether the node's bus subscription is up.
    pub fn bus_up(&self) -> bool {
        self.bus_up.load(Ordering::Relaxed)
    }

    /// Entries the writer gave up on (Redis did not take them in time).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events written that the replicas did not confirm in time
    /// (`sessions.wait`).
    pub fn unreplicated(&self) -> u64 {
        self.unreplicated.load(Ordering::Relaxed)
    }

    /// The Redis primary the sentinels named last (`sessions.sentinel`).
    pub fn primary(&self) -> Option<String> {
        self.conn.primary()
    }

    pub fn node(&self) -> u32 {
        self.node
    }

    /// A POST stream id no other node hands out: the node tag above a
    /// counter.
    pub(crate) fn next_stream_id(&self) -> StreamId {
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed).max(1);
        (u64::from(self.node) << 32) | u64::from(n)
    }

    pub(crate) fn enqueue(&self, session: &Arc<str>, op: Op) {
        self.send(session.clone(), op, None);
    }

    /// Hands an operation to the writer; false if the writer is gone, or
    /// too much waits for it already (then the operation is dropped and
    /// counted, and a stream whose begin or end it was ends on this node).
    fn send(&self, session: Arc<str>, op: Op, done: Option<Done>) -> bool {
        let size = op.size();
        let queued = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        let refused = if queued + size > MAX_QUEUED_BYTES {
            Err(op)
        } else {
            self.tx
                .try_send(Queued {
                    session: session.clone(),
                    op,
                    done,
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(q) | mpsc::error::TrySendError::Closed(q) => {
                        q.op
                    }
                })
        };
        let Err(op) = refused else { return true };
        self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("the writer queue is full; an event is dropped");
        if let (Op::Begin(stream) | Op::End(stream), Some(handler)) =
            (&op, self.handler.get().and_then(Weak::upgrade))
            && let Some(log) = handler.hub().get(&session)
        {
            log.end_local(*stream);
        }
        false
    }

    /// Appends a message to a session's standalone stream; its seq, or
    /// `None` if the session is gone.
    pub async fn publish(&self, session: &str, payload: &[u8]) -> Result<Option<u64>, ()> {
        let (done, rx) = oneshot::channel();
        let op = Op::Message {
            stream: super::STANDALONE,
            payload: Bytes::copy_from_slice(payload),
        };
        if !self.send(session.into(), op, Some(done)) {
            return Err(());
        }
        rx.await.map_err(|_| ())?
    }

    /// Tells every other node `notice`, which the bus does not read.
    pub fn notify(&self, notice: &[u8]) {
        let mut body = format!("n\n{}\n", self.node).into_bytes();
        body.extend_from_slice(notice);
        self.send("".into(), Op::Notice(body.into()), None);
    }

    fn keys(&self, session: &str) -> [String; 3] {
        [
            format!("{}s:{session}", self.prefix),
            format!("{}e:{session}:a", self.prefix),
            format!("{}e:{session}:p", self.prefix),
        ]
    }

    /// Where a session's requests running on some node are recorded:
    /// a hash, JSON-RPC id -> node.
    fn running_key(&self, session: &str) -> String {
        format!("{}f:{session}", self.prefix)
    }

    /// Records a request of `session` running on this node (or its end).
    pub(crate) fn running(&self, session: &Arc<str>, id: &str, running: bool) {
        let id = Bytes::copy_from_slice(id.as_bytes());
        let op = if running {
            Op::Running(id)
        } else {
            Op::Finished(id)
        };
        self.send(session.clone(), op, None);
    }

    /// Whether request `id` of `session` runs on another node (as far as
    /// Redis was told; a request younger than the writer's last batch is
    /// not there yet).
    pub async fn running_elsewhere(
        &self,
        session: &str,
        id: &str,
    ) -> Result<bool, RedisStoreError> {
        let mut conn = self.conn.clone();
        let node: Option<u32> = redis::cmd("HGET")
            .arg(self.running_key(session))
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(node.is_some_and(|n| n != self.node))
    }

    fn lease_key(&self, session: &str, what: &str) -> String {
        format!("{}l:{session}:{what}", self.prefix)
    }

    /// Takes, or keeps, this node's lease on a session's `what` for `ttl`:
    /// false if another node holds it. Leases make one node of all do a
    /// session's background work (its upstream GET or listen stream).
    pub async fn lease(
        &self,
        session: &str,
        what: &str,
        ttl: Duration,
    ) -> Result<bool, RedisStoreError> {
        let mut conn = self.conn.clone();
        let held: Vec<i64> = self
            .lease
            .key(self.lease_key(session, what))
            .arg(self.node)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await?;
        Ok(held == [1])
    }

    /// Takes this node's lease on a session's `what`, renewed at each
    /// heartbeat until [`SharedEvents::release`]; `lost` is cancelled if
    /// the node loses it. False if another node holds it.
    pub async fn hold(
        &self,
        session: &str,
        what: &str,
        lost: CancellationToken,
    ) -> Result<bool, RedisStoreError> {
        if !self.lease(session, what, LEASE_TTL).await? {
            return Ok(false);
        }
        let n = self.next_hold.fetch_add(1, Ordering::Relaxed);
        self.held.insert(self.lease_key(session, what), (n, lost));
        Ok(true)
    }

    /// Gives up this node's lease, if it still holds it.
    pub async fn release(&self, session: &str, what: &str) -> Result<(), RedisStoreError> {
        let key = self.lease_key(session, what);
        self.held.remove(&key);
        self.delete_if(key, &self.node.to_string()).await
    }

    /// Deletes `key` if it holds `value`.
    async fn delete_if(&self, key: String, value: &str) -> Result<(), RedisStoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(key)
            .arg(value)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    fn hold_keys(&self, session: &str, hold: &str) -> [String; 3] {
        [
            format!("{}hold:{session}:{hold}", self.prefix),
            format!("{}hold-early:{session}:{hold}", self.prefix),
            format!("{}hold-answers:{session}:{hold}", self.prefix),
        ]
    }

    /// Where a worker's message for a hold this node does not have goes:
    /// to the node that opened it, or, while none has, into the hold's
    /// queue in Redis (kept `keep`, at most `max` messages), which the node
    /// that opens it takes over ([`SharedEvents::hold_claim`]). Atomic with
    /// the claim: no message falls between the two.
    pub async fn hold_route(
        &self,
        session: &str,
        hold: &str,
        payload: &[u8],
        keep: Duration,
        max: usize,
    ) -> Result<HoldRoute, RedisStoreError> {
        let [owner, early, _] = self.hold_keys(session, hold);
        let mut conn = self.conn.clone();
        let value: Value = self
            .hold_route
            .key(owner)
            .key(early)
            .arg(payload)
            .arg(millis(keep))
            .arg(max)
            .invoke_async(&mut conn)
            .await?;
        Ok(match value {
            Value::Array(parts) => {
                let text = |v: Option<&Value>| match v {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                };
                HoldRoute::Owner {
                    node: text(parts.first()).parse().unwrap_or(0),
                    state: text(parts.get(1)),
                }
            }
            Value::Int(0) => HoldRoute::Queued,
            _ => HoldRoute::Full,
        })
    }

    /// Records this node as the one holding the hold, for `keep`, and takes
    /// what workers published for it before.
    pub async fn hold_claim(
        &self,
        session: &str,
        hold: &str,
        keep: Duration,
    ) -> Result<Vec<Vec<u8>>, RedisStoreError> {
        let [owner, early, answers] = self.hold_keys(session, hold);
        let mut conn = self.conn.clone();
        let early: Vec<Vec<u8>> = self
            .hold_claim
            .key(owner)
            .key(early)
            .key(answers)
            .arg(self.node)
            .arg(millis(keep))
            .invoke_async(&mut conn)
            .await?;
        Ok(early)
    }

    /// Records a hold's new state (`done`, `cancelled`, `expired`) for the
    /// workers that ask other nodes, kept `keep`.
    pub async fn hold_mark(
        &self,
        session: &str,
        hold: &str,
        state: &str,
        keep: Duration,
    ) -> Result<(), RedisStoreError> {
        let [owner, _, _] = self.hold_keys(session, hold);
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .hset(&owner, "state", state)
            .ignore()
            .pexpire(&owner, i64::try_from(millis(keep)).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Keeps the client's answer to a worker's request (JSON) with the
    /// hold, for `keep`: the last `max` of them.
    pub async fn hold_answer(
        &self,
        session: &str,
        hold: &str,
        answer: &str,
        keep: Duration,
        max: usize,
    ) -> Result<(), RedisStoreError> {
        let [_, _, answers] = self.hold_keys(session, hold);
        let mut conn = self.conn.clone();
        let last = -isize::try_from(max).unwrap_or(isize::MAX);
        let _: () = redis::pipe()
            .atomic()
            .rpush(&answers, answer)
            .ignore()
            .ltrim(&answers, last, -1)
            .ignore()
            .pexpire(&answers, i64::try_from(millis(keep)).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// A hold's state as the node holding it recorded it, with the client's
    /// answers to the worker's requests, if any.
    pub async fn hold_state(
        &self,
        session: &str,
        hold: &str,
    ) -> Result<Option<(String, Vec<String>)>, RedisStoreError> {
        let [owner, early, answers] = self.hold_keys(session, hold);
        let mut conn = self.conn.clone();
        let (state, queued, answers): (Option<String>, i64, Vec<String>) = redis::pipe()
            .hget(&owner, "state")
            .exists(&early)
            .lrange(&answers, 0, -1)
            .query_async(&mut conn)
            .await?;
        let state = state.or_else(|| (queued > 0).then(|| "pending".to_owned()));
        Ok(state.map(|state| (state, answers)))
    }

    /// The session's log after `after`; `None` if the session is gone.
    pub async fn read(
        &self,
        session: &str,
        after: u64,
    ) -> Result<Option<LogRead>, RedisStoreError> {
        let [hash, a, p] = self.keys(session);
        let mut conn = self.conn.clone();
        let value: Value = self
            .read
            .key(hash)
            .key(a)
            .key(p)
            .arg(after)
            .invoke_async(&mut conn)
            .await?;
        Ok(parse_read(value))
    }

    async fn write_loop(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Queued>,
        handler: Weak<dyn BusHandler>,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            // Counted until written: the batch is held while Redis is away.
            let taken: usize = batch.iter().map(|q| q.op.size()).sum();
            drop_superseded_marks(&mut batch);
            drop_short_requests(&mut batch);
            match self.write(&batch).await {
                Ok((replies, replicated)) => {
                    if !replicated {
                        tracing::warn!(
                            entries = batch.len(),
                            "redis replicas did not confirm events in time (sessions.wait); their publishers are told"
                        );
                        self.unreplicated
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    for (q, seq) in batch.drain(..).zip(replies) {
                        if let Some(done) = q.done {
                            let _ = done.send(if replicated { Ok(seq) } else { Err(()) });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, entries = batch.len(),
                        "redis did not take events; they are dropped");
                    self.dropped
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    let handler = handler.upgrade();
                    for q in batch.drain(..) {
                        if let Some(done) = q.done {
                            let _ = done.send(Err(()));
                        }
                        // Readers of a stream whose end is lost end here.
                        if let (Op::Begin(stream) | Op::End(stream), Some(h)) = (&q.op, &handler)
                            && let Some(log) = h.hub().get(&q.session)
                        {
                            log.end_local(*stream);
                        }
                    }
                }
            }
            self.queued_bytes.fetch_sub(taken, Ordering::AcqRel);
            if handler.strong_count() == 0 {
                return;
            }
        }
    }

    /// Sends one batch as one pipeline, one script call per run of a
    /// session's operations, then `WAIT` with `sessions.wait`; while Redis
    /// refuses connections, tries again for a while. One reply per
    /// operation: a seq, or `None`; and whether enough replicas confirmed.
    async fn write(&self, batch: &[Queued]) -> Result<(Vec<Option<u64>>, bool), RedisStoreError> {
        let mut pipe = redis::pipe();
        pipe.load_script(&self.append).ignore();
        if batch.iter().any(|q| matches!(q.op, Op::Running(_))) {
            pipe.load_script(&self.running).ignore();
        }
        let runs = runs_of(batch);
        for run in &runs {
            let first = &batch[run.start];
            match &first.op {
                Op::Notice(body) => {
                    pipe.cmd("PUBLISH").arg(&self.channel).arg(body.as_ref());
                    continue;
                }
                Op::Running(id) => {
                    pipe.invoke_script(
                        self.running
                            .key(self.running_key(&first.session))
                            .arg(id.as_ref())
                            .arg(self.node)
                            .arg(self.key_ttl_ms),
                    );
                    continue;
                }
                Op::Finished(id) => {
                    pipe.cmd("HDEL")
                        .arg(self.running_key(&first.session))
                        .arg(id.as_ref());
                    continue;
                }
                _ => {}
            }
            let [hash, a, p] = self.keys(&first.session);
            let mut invocation = self.append.key(hash);
            invocation
                .key(a)
                .key(p)
                .arg(self.max_events)
                .arg(self.max_age_ms)
                .arg(self.key_ttl_ms)
                .arg(&self.channel)
                .arg(&*first.session)
                .arg(self.max_bytes);
            for q in &batch[run.clone()] {
                let (kind, stream, payload): (&str, u64, &[u8]) = match &q.op {
                    Op::Message { stream, payload } => ("m", *stream, payload),
                    Op::Begin(stream) => ("b", *stream, b""),
                    Op::End(stream) => ("e", *stream, b""),
                    Op::Delivered(upto) => ("d", *upto, b""),
                    Op::Notice(_) | Op::Running(_) | Op::Finished(_) => continue,
                };
                invocation.arg(kind).arg(stream).arg(payload);
            }
            pipe.invoke_script(&invocation);
        }
        if let Some((replicas, ms)) = self.wait {
            pipe.cmd("WAIT").arg(replicas).arg(ms);
        }
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut replies = loop {
            let mut conn = self.writer.clone();
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Ok(replies) => break replies,
                // Not applied: refused, or a demoted primary (a failover).
                Err(e) if not_applied(&e) && started.elapsed() < RETRY_FOR => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let replicated = match self.wait {
            Some((replicas, _)) => {
                matches!(replies.pop(), Some(Value::Int(n)) if n >= i64::from(replicas))
            }
            None => true,
        };
        let mut out = Vec::with_capacity(batch.len());
        for (run, reply) in runs.into_iter().zip(replies) {
            let seqs = match reply {
                Value::Array(seqs) => seqs,
                _ => Vec::new(),
            };
            for i in 0..run.len() {
                out.push(match seqs.get(i) {
                    Some(Value::Int(n)) => u64::try_from(*n).ok(),
                    _ => None,
                });
            }
        }
        Ok((out, replicated))
    }

    /// Holds the node's one subscription, and makes it again when it
    /// breaks; each time it is made, every mirror reads what it missed.
    async fn bus_loop(self: Arc<Self>, handler: Weak<dyn BusHandler>) {
        let mut pause = Duration::from_millis(100);
        while handler.strong_count() > 0 {
            let alive_channel = self.alive_channel();
            let subscribed = async {
                let mut pubsub = self.conn.pubsub().await?;
                pubsub.subscribe(&[&self.channel, &alive_channel]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(OP_TIMEOUT, subscribed).await {
                Ok(Ok(pubsub)) => {
                    if let Some(h) = handler.upgrade() {
                        for (session, log) in h.hub().mirrors() {
                            self.spawn_sync(&h, session, log);
                        }
                        // Bounded: its Redis reads time out.
                        h.bus_up().await;
                    }
                    self.bus_up.store(true, Ordering::Relaxed);
                    tracing::info!(channel = %self.channel, "subscribed to the node bus");
                    pause = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    // A subscription can go quiet without breaking (Redis
                    // stalled, a half-open connection): the node's own
                    // heartbeats stop coming back.
                    let mut heard = tokio::time::Instant::now();
                    loop {
                        let deaf = heard + BUS_SILENCE;
                        let msg = tokio::select! {
                            msg = messages.next() => msg,
                            _ = tokio::time::sleep_until(deaf) => {
                                tracing::warn!(silent = ?BUS_SILENCE,
                                    "this node's heartbeats stopped coming back on the node bus");
                                break;
                            }
                        };
                        let Some(msg) = msg else {
                            tracing::warn!("the node bus subscription broke");
                            break;
                        };
                        if msg.get_channel_name() == alive_channel {
                            heard = tokio::time::Instant::now();
                            continue;
                        }
                        let Some(h) = handler.upgrade() else { return };
                        self.dispatch(&h, msg.get_payload_bytes());
                    }
                    self.bus_up.store(false, Ordering::Relaxed);
                    tracing::warn!("subscribing to the node bus again");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot subscribe to the node bus");
                }
                Err(_) => tracing::warn!("subscribing to the node bus timed out"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn spawn_sync(
        &self,
        handler: &Arc<dyn BusHandler>,
        session: String,
        log: Arc<super::SessionLog>,
    ) {
        let handler = handler.clone();
        self.runtime.spawn(async move {
            if let Err(e) = handler.hub().sync(&session, &log).await {
                tracing::warn!(error = %e, "cannot read a session's shared event log");
            }
        });
    }

    fn dispatch(&self, handler: &Arc<dyn BusHandler>, payload: &[u8]) {
        match parse_bus(payload) {
            Some(Bus::Entry {
                session,
                seq,
                entry,
            }) => {
                if let Some(log) = handler.hub().offer(session, seq, entry) {
                    self.spawn_sync(handler, session.to_owned(), log);
                }
            }
            Some(Bus::Notice { node, notice }) => {
                if node != self.node {
                    handler.clone().notice(notice);
                }
            }
            None => tracing::warn!("a message on the node bus is not understood; ignored"),
        }
    }
}

enum Bus<'a> {
    Entry {
        session: &'a str,
        seq: u64,
        entry: Entry,
    },
    Notice {
        node: u32,
        notice: &'a [u8],
    },
}

/// Reads a bus message: `e\n{session}\n{seq}\n{stream}\n{kind}\n{payload}`
/// (from the append script) or `n\n{node}\n{notice JSON}`.
fn parse_bus(payload: &[u8]) -> Option<Bus<'_>> {
    let mut fields = payload.splitn(6, |b| *b == b'\n');
    fn text(f: Option<&[u8]>) -> Option<&str> {
        f.and_then(|f| std::str::from_utf8(f).ok())
    }
    match fields.next()? {
        b"e" => {
            let session = text(fields.next())?;
            let seq = text(fields.next())?.parse().ok()?;
            let stream = text(fields.next())?.parse().ok()?;
            let kind = fields.next()?;
            let body = fields.next().unwrap_or_default();
            Some(Bus::Entry {
                session,
                seq,
                entry: entry(kind, stream, body)?,
            })
        }
        b"n" => {
            let mut fields = payload.get(2..)?.splitn(2, |b| *b == b'\n');
            let node = text(fields.next())?.parse().ok()?;
            Some(Bus::Notice {
                node,
                notice: fields.next()?,
            })
        }
        _ => None,
    }
}

fn entry(kind: &[u8], stream: StreamId, body: &[u8]) -> Option<Entry> {
    Some(match kind {
        b"m" => Entry::Message {
            stream,
            payload: Bytes::copy_from_slice(body),
        },
        b"b" => Entry::Begin(stream),
        b"e" => Entry::End(stream),
        _ => return None,
    })
}

/// Reads the read script's answer: false, or `{q, d, n_a, [seq, stream,
/// kind, payload] * n_a, n_p, [..] * n_p}`; the two streams are merged by
/// seq.
fn parse_read(value: Value) -> Option<LogRead> {
    let Value::Array(items) = value else {
        return None;
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    fn bytes(v: Option<&Value>) -> Option<&[u8]> {
        match v {
            Some(Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        }
    }
    let mut read = LogRead {
        last_seq: int(items.first())?,
        delivered: int(items.get(1))?,
        entries: Vec::new(),
    };
    let mut i = 2;
    let mut runs = Vec::with_capacity(2);
    for _ in 0..2 {
        let n = usize::try_from(int(items.get(i))?).ok()?;
        i += 1;
        let mut run = Vec::with_capacity(n);
        for _ in 0..n {
            let seq = int(items.get(i))?;
            let stream = std::str::from_utf8(bytes(items.get(i + 1))?)
                .ok()?
                .parse()
                .ok()?;
            let kind = bytes(items.get(i + 2))?;
            let body = bytes(items.get(i + 3))?;
            run.push((seq, entry(kind, stream, body)?));
            i += 4;
        }
        runs.push(run);
    }
    read.entries = runs.concat();
    read.entries.sort_by_key(|(seq, _)| *seq);
    Some(read)
}

/// KEYS: session hash, standalone stream, POST stream. ARGV: max length,
/// max age ms, key ttl ms, bus channel, session id, max bytes, then one
/// triple per entry: kind (m message, b begin, e end, d delivered), stream
/// (for d: the seq), payload. -> each entry's seq (0 for d), or false if
/// the session is gone.
///
/// Each stream keeps at most max length entries and max bytes of payload
/// (its size is kept in the session hash, `ba` and `bp`), none older than
/// max age, and always its newest entry. The trim reads the oldest entry of
/// each stream written to, and further only while one of the bounds is
/// passed, so an append costs about the same whatever the log holds.
const APPEND: &str = "
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
-- A primary that took over from another (Sentinel, or a restart) has a
-- new replication id, and may lack the last events the old one gave out
-- (replication is asynchronous): their seqs are skipped, so that no
-- reader who saw them takes a new event for one it already has.
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
local was = redis.call('HGET', KEYS[1], 'r')
if rid and was ~= rid then
    if was then redis.call('HINCRBY', KEYS[1], 'q', SEQ_GAP) end
    redis.call('HSET', KEYS[1], 'r', rid)
end
local max_len, max_age, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[6])
local seqs = {}
local wrote = {0, 0}
local added = {0, 0}
for i = 7, #ARGV, 3 do
    local kind, stream, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if kind == 'd' then
        local d = tonumber(redis.call('HGET', KEYS[1], 'd') or '0') or 0
        if tonumber(stream) > d then redis.call('HSET', KEYS[1], 'd', stream) end
        seqs[#seqs + 1] = 0
    else
        local seq = redis.call('HINCRBY', KEYS[1], 'q', 1)
        local at = 2
        if stream == '0' then at = 1 end
        redis.call('XADD', KEYS[at + 1], seq .. '-0', 't', now, 's', stream, 'k', kind, 'm', payload)
        wrote[at] = wrote[at] + 1
        added[at] = added[at] + #payload
        redis.call('PUBLISH', ARGV[4], 'e\\n' .. ARGV[5] .. '\\n' .. seq .. '\\n' .. stream .. '\\n' .. kind .. '\\n' .. payload)
        seqs[#seqs + 1] = seq
    end
end
local size_fields = {'ba', 'bp'}
for at = 1, 2 do
    if wrote[at] > 0 then
        local key = KEYS[at + 1]
        local len = redis.call('XLEN', key)
        local bytes
        if len == wrote[at] then
            -- A new (or expired) stream: its size is what was just added.
            bytes = added[at]
            redis.call('HSET', KEYS[1], size_fields[at], bytes)
        else
            bytes = redis.call('HINCRBY', KEYS[1], size_fields[at], added[at])
        end
        local cut, removed = nil, 0
        while len > 1 do
            local batch = redis.call('XRANGE', key, cut and ('(' .. cut) or '-', '+', 'COUNT', cut and 16 or 1)
            local stop = false
            for _, e in ipairs(batch) do
                if len <= 1 or (len <= max_len and bytes <= max_bytes
                        and tonumber(e[2][2]) >= now - max_age) then
                    stop = true
                    break
                end
                cut = e[1]
                len = len - 1
                bytes = bytes - #e[2][8]
                removed = removed + #e[2][8]
            end
            if stop or #batch == 0 then break end
        end
        if cut then
            redis.call('XTRIM', key, 'MINID', (tonumber(string.match(cut, '^(%d+)')) + 1) .. '-0')
            -- Not -0: Redis refuses it as an integer (entries without a
            -- payload, begin and end, remove no bytes).
            if removed > 0 then
                redis.call('HINCRBY', KEYS[1], size_fields[at], -removed)
            end
        end
        redis.call('PEXPIRE', key, ARGV[3])
    end
end
return seqs
";

/// KEYS: a session's running requests. ARGV: a request id, the node tag,
/// key ttl ms.
const RUNNING: &str = "
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
";

/// KEYS: a hold's owner hash (node, state), its early queue. ARGV: the
/// payload, keep ms, the most messages queued. The owner's node and the
/// hold's state; or 0 once queued; or -1 if the queue is full.
const HOLD_ROUTE: &str = "
local node = redis.call('HGET', KEYS[1], 'node')
if node then
    return {node, redis.call('HGET', KEYS[1], 'state') or 'open'}
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) then
    return -1
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 0
";

/// KEYS: a hold's owner hash, its early queue, the client's answers. ARGV:
/// this node, keep ms. What was queued, which is then gone; answers of an
/// earlier hold of the same id go too.
const HOLD_CLAIM: &str = "
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'state', 'open')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local early = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return early
";

/// KEYS: leases. ARGV: node tag, ttl in ms. Takes or renews each lease
/// another node does not hold. -> per lease, 1 if the node holds it.
const LEASE: &str = "
local held = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  elseif not holder then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
";

/// KEYS: a lease. ARGV: the node tag. Deletes the key if it still holds
/// the value.
const RELEASE: &str = "
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS: session hash, standalone stream, POST stream. ARGV: after seq.
/// -> false if the session is gone, else see [`parse_read`].
const READ: &str = "
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local h = redis.call('HMGET', KEYS[1], 'q', 'd')
local out = {tonumber(h[1] or '0') or 0, tonumber(h[2] or '0') or 0}
local from = '(' .. ARGV[1] .. '-0'
for i = 2, 3 do
    local es = redis.call('XRANGE', KEYS[i], from, '+')
    table.insert(out, #es)
    for _, e in ipairs(es) do
        local f = e[2]
        table.insert(out, tonumber(string.match(e[1], '^(%d+)')))
        table.insert(out, f[4])
        table.insert(out, f[6])
        table.insert(out, f[8])
    end
end
return out
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ChunkSource;
    use crate::session::{RedisSessionStore, SessionStore, test_state};
    use crate::stream::{LiveStream, LogLimits, STANDALONE};
    use crate::testing::eventually;

    const LIMITS: LogLimits = LogLimits {
        max_events: 64,
        max_bytes: 1 << 20,
    };

    /// A gateway node, as far as the shared log goes.
    struct Node {
        hub: Hub,
        notices: Mutex<Vec<Vec<u8>>>,
    }

    impl BusHandler for Node {
        fn hub(&self) -> &Hub {
            &self.hub
        }
        fn notice(self: Arc<Self>, notice: &[u8]) {
            self.notices.lock().expect("lock").push(notice.to_vec());
        }
    }

    async fn node(url: &str, prefix: &str) -> Arc<Node> {
        node_keeping(url, prefix, Duration::from_secs(60)).await
    }

    /// A node whose shared log keeps events for `max_age`.
    async fn node_keeping(url: &str, prefix: &str, max_age: Duration) -> Arc<Node> {
        node_with(
            url,
            prefix,
            SharedLimits {
                max_events: LIMITS.max_events,
                max_bytes: LIMITS.max_bytes,
                max_age,
                idle_ttl: Duration::from_secs(60),
                wait: None,
            },
        )
        .await
    }

    /// A node whose shared log has `limits`.
    async fn node_with(url: &str, prefix: &str, limits: SharedLimits) -> Arc<Node> {
        let events = SharedEvents::new(url, prefix, limits).expect("events");
        let node = Arc::new(Node {
            hub: Hub::shared(LIMITS, events.clone()),
            notices: Mutex::new(Vec::new()),
        });
        let handler: Arc<dyn BusHandler> = node.clone();
        events.start(Arc::downgrade(&handler));
        assert!(
            eventually(Duration::from_secs(10), || async { events.bus_up() }).await,
            "the node bus did not come up in 10 s"
        );
        node
    }

    /// The ids and data of the next `n` events a stream gives, waiting up
    /// to 10 s for them.
    async fn read(stream: &mut LiveStream, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            let chunk = tokio::time::timeout_at(deadline, stream.next_chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("only {} of {n} events arrived in 10 s: {out:?}", out.len())
                });
            let Some(chunk) = chunk else { break };
            stream.written();
            for frame in std::str::from_utf8(&chunk).expect("utf8").split("\n\n") {
                let id = frame.lines().find_map(|l| l.strip_prefix("id: "));
                let data = frame.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(id), Some(data)) = (id, data) {
                    out.push((id.to_owned(), data.to_owned()));
                }
            }
        }
        out
    }

    fn reader(
        log: &Arc<crate::stream::SessionLog>,
        stream: StreamId,
        after: Option<u64>,
    ) -> LiveStream {
        let attach = log.attach(stream, after).expect("attach");
        LiveStream::new(log.clone(), attach, None, Duration::from_secs(3600), None)
    }

    /// The event-log suite: `nodes` share the session's log (one node: a
    /// local log). The session is created on the first node.
    async fn event_log_suite(nodes: &[&Hub], session: &str) {
        let first = nodes[0];
        first.create(session);
        let last = nodes[nodes.len() - 1];
        // Published through every node, read on the last.
        for i in 0..30 {
            let id = nodes[i % nodes.len()]
                .publish(session, format!("{{\"n\":{i}}}").as_bytes())
                .await
                .expect("publish")
                .expect("the session exists");
            assert_eq!(id.stream, STANDALONE);
        }
        let log = last
            .open(session, true)
            .await
            .expect("open")
            .expect("session");
        let mut stream = reader(&log, STANDALONE, None);
        let got = read(&mut stream, 30).await;
        let data: Vec<String> = got.iter().map(|(_, d)| d.clone()).collect();
        let want: Vec<String> = (0..30).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(data, want, "every event once, in order");
        // Resumed on the first node from the tenth: the rest, exactly once.
        let tenth = crate::stream::EventId::parse(&got[9].0).expect("an event id");
        for i in 30..35 {
            last.publish(session, format!("{{\"n\":{i}}}").as_bytes())
                .await
                .expect("publish");
        }
        let log = first
            .open(session, true)
            .await
            .expect("open")
            .expect("session");
        let mut resumed = reader(&log, STANDALONE, Some(tenth.seq));
        let rest: Vec<String> = read(&mut resumed, 25)
            .await
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let want: Vec<String> = (10..35).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(rest, want);
        // A POST stream answered on the first node, read from the last.
        let post = log.begin_stream().expect("begin");
        for i in 0..3 {
            log.append(post, format!("{{\"p\":{i}}}").as_bytes())
                .expect("append");
        }
        log.end_stream(post);
        let log = last
            .open(session, true)
            .await
            .expect("open")
            .expect("session");
        let mut answer = reader(&log, post, Some(0));
        let got: Vec<String> = read(&mut answer, 4)
            .await
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert_eq!(
            got,
            ["{\"p\":0}", "{\"p\":1}", "{\"p\":2}"],
            "the stream's events, then its end"
        );
        // A session nobody has: nothing to open or publish to.
        assert!(
            last.open("no-such-session", false)
                .await
                .expect("open")
                .is_none()
        );
        assert!(
            first
                .publish("no-such-session", b"{}")
                .await
                .expect("publish")
                .is_none()
        );
    }

    fn message(n: u64) -> Entry {
        Entry::Message {
            stream: STANDALONE,
            payload: Bytes::from(format!("{{\"n\":{n}}}")),
        }
    }

    #[tokio::test]
    async fn a_mirror_applies_entries_in_seq_order_and_fills_gaps() {
        // Never connected: the mirror is driven by hand.
        let events = SharedEvents::new(
            "redis://127.0.0.1:1/",
            "t:",
            SharedLimits {
                max_events: 64,
                max_bytes: 1 << 20,
                max_age: Duration::from_secs(60),
                idle_ttl: Duration::from_secs(60),
                wait: None,
            },
        )
        .expect("events");
        let log = Arc::new(crate::stream::SessionLog::mirror(LIMITS, events, "s", true));
        let mut stream = reader(&log, STANDALONE, None);
        assert!(!log.offer(1, message(1)));
        assert!(
            log.offer(3, message(3)),
            "2 is missing: read the shared log"
        );
        assert!(!log.offer(4, message(4)), "one read at a time");
        assert_eq!(
            read(&mut stream, 1).await,
            [("0.1".to_owned(), "{\"n\":1}".to_owned())]
        );
        assert_eq!(log.read_from(), 1);
        let behind = log.apply_read(LogRead {
            last_seq: 3,
            delivered: 0,
            entries: vec![(2, message(2)), (3, message(3))],
        });
        assert!(!behind);
        let ids: Vec<String> = read(&mut stream, 3)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["0.2", "0.3", "0.4"], "in order, once each");
        // 5 left the shared log before it was read: a resume from before it
        // has a gap; what is there arrives.
        assert!(log.offer(7, message(7)));
        assert!(!log.apply_read(LogRead {
            last_seq: 7,
            delivered: 0,
            entries: vec![(6, message(6)), (7, message(7))],
        }));
        let ids: Vec<String> = read(&mut stream, 2)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["0.6", "0.7"]);
        assert!(log.attach(STANDALONE, Some(4)).expect("attach").gap);
        assert!(!log.attach(STANDALONE, Some(5)).expect("attach").gap);
    }

    /// An operation of `session` in the writer's queue.
    fn q(session: &str, op: Op) -> Queued {
        Queued {
            session: session.into(),
            op,
            done: None,
        }
    }

    #[test]
    fn a_batch_goes_out_in_runs_of_one_session_in_order() {
        let mut batch = vec![
            q("a", Op::Begin(7)),
            q("a", Op::End(7)),
            q("", Op::Notice(Bytes::new())),
            q("", Op::Notice(Bytes::new())),
            q("a", Op::Delivered(2)),
            q("b", Op::Begin(1)),
            q("a", Op::Begin(8)),
        ];
        assert_eq!(runs_of(&batch), [0..2, 2..3, 3..4, 4..5, 5..6, 6..7]);
        batch.clear();
        for n in 0..(RUN as u64 + 1) {
            batch.push(q("a", Op::Begin(n)));
        }
        assert_eq!(runs_of(&batch), [0..RUN, RUN..RUN + 1]);
        assert!(runs_of(&[]).is_empty());
    }

    #[test]
    fn requests_that_start_and_end_in_one_batch_are_not_recorded() {
        let id = |n: &str| Bytes::copy_from_slice(n.as_bytes());
        let mut batch = vec![
            q("a", Op::Running(id("1"))),
            q("a", Op::Running(id("2"))),
            q("b", Op::Finished(id("1"))),
            q("a", Op::Finished(id("1"))),
            q("a", Op::Finished(id("3"))),
        ];
        drop_short_requests(&mut batch);
        let left: Vec<(String, String)> = batch
            .iter()
            .map(|q| {
                let (kind, id) = match &q.op {
                    Op::Running(id) => ("running", id),
                    Op::Finished(id) => ("finished", id),
                    _ => panic!("unexpected"),
                };
                (
                    format!("{} {kind}", q.session),
                    String::from_utf8_lossy(id).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            left,
            [
                ("a running".to_owned(), "2".to_owned()),
                ("b finished".to_owned(), "1".to_owned()),
                ("a finished".to_owned(), "3".to_owned()),
            ]
        );
        // Each is a command of its own.
        assert_eq!(runs_of(&batch), [0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_batch_keeps_only_each_sessions_last_delivery_mark() {
        let mut batch = vec![
            q("a", Op::Delivered(1)),
            q("b", Op::Delivered(5)),
            q("a", Op::Begin(7)),
            q("a", Op::Delivered(3)),
        ];
        drop_superseded_marks(&mut batch);
        let kept: Vec<(String, Option<u64>)> = batch
            .iter()
            .map(|q| {
                let mark = match q.op {
                    Op::Delivered(n) => Some(n),
                    _ => None,
                };
                (q.session.to_string(), mark)
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("b".into(), Some(5)),
                ("a".into(), None),
                ("a".into(), Some(3))
            ]
        );
    }

    /// A redis-server, and a store on it under `prefix` holding session
    /// `session`.
    async fn redis_with_session(
        prefix: &str,
        session: &str,
    ) -> (crate::testing::RedisServer, RedisSessionStore) {
        let redis = crate::testing::RedisServer::start().await;
        let store =
            RedisSessionStore::new(&redis.url(), prefix, Duration::from_secs(60)).expect("store");
        store
            .insert(
                test_state(session, "org"),
                crate::session::Admission::UNLIMITED,
            )
            .await
            .expect("insert");
        (redis, store)
    }

    #[tokio::test]
    async fn local_event_log_suite() {
        event_log_suite(&[&Hub::new(LIMITS)], "local").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_event_log_suite() {
        let (redis, store) = redis_with_session("t:", "shared-one").await;
        let (a, b, c) = (
            node(&redis.url(), "t:").await,
            node(&redis.url(), "t:").await,
            node(&redis.url(), "t:").await,
        );
        event_log_suite(&[&a.hub, &b.hub, &c.hub], "shared-one").await;
        // Notices reach the other nodes, not the sender.
        let ended = b"{\"t\":\"ended\"}\nwith a line".to_vec();
        a.hub.events().expect("shared").notify(&ended);
        assert!(
            eventually(Duration::from_secs(10), || async {
                !c.notices.lock().expect("lock").is_empty()
            })
            .await,
            "the notice did not arrive in 10 s"
        );
        assert_eq!(*c.notices.lock().expect("lock"), [ended]);
        assert!(a.notices.lock().expect("lock").is_empty());
        // Requests running on a node are known to the others, until they end.
        let (ea, eb) = (a.hub.events().expect("a"), b.hub.events().expect("b"));
        let session: Arc<str> = "shared-one".into();
        ea.running(&session, "77", true);
        assert!(
            eventually(Duration::from_secs(5), || async {
                eb.running_elsewhere("shared-one", "77")
                    .await
                    .expect("read")
            })
            .await,
            "b never heard of a's request"
        );
        assert!(
            !ea.running_elsewhere("shared-one", "77")
                .await
                .expect("read"),
            "not elsewhere for a"
        );
        assert!(
            !eb.running_elsewhere("shared-one", "78")
                .await
                .expect("read")
        );
        ea.running(&session, "77", false);
        assert!(
            eventually(Duration::from_secs(5), || async {
                !eb.running_elsewhere("shared-one", "77")
                    .await
                    .expect("read")
            })
            .await,
            "the request's end was not recorded"
        );
        // An ended session's log is gone from Redis, and refuses events.
        store.remove("shared-one").await.expect("remove");
        assert!(
            a.hub
                .publish("shared-one", b"{}")
                .await
                .expect("publish")
                .is_none()
        );
        // One node holds a lease until it lets go or stops renewing it.
        let ttl = Duration::from_millis(300);
        assert!(ea.lease("s", "x", ttl).await.expect("lease"));
        assert!(!eb.lease("s", "x", ttl).await.expect("lease"));
        assert!(ea.lease("s", "x", ttl).await.expect("renew"));
        assert!(eb.lease("s", "y", ttl).await.expect("another lease"));
        eb.release("s", "x").await.expect("not b's to release");
        assert!(!eb.lease("s", "x", ttl).await.expect("lease"));
        ea.release("s", "x").await.expect("release");
        assert!(eb.lease("s", "x", ttl).await.expect("released"));
        assert!(
            eventually(Duration::from_secs(5), || async {
                ea.lease("s", "x", ttl).await.expect("lease")
            })
            .await,
            "a lease nobody renews did not expire"
        );
    }

    /// A primary that takes over (here: Redis made a replica and a primary
    /// again, which gives it a new replication id, as a promotion does)
    /// gives each session's next event a seq past a gap, so that a reader
    /// who saw the old primary's unreplicated tail never takes a new event
    /// for one it has: it gets it, and a resume across the gap is told.
    #[tokio::test]
    async fn a_new_primary_skips_the_seqs_the_old_one_may_have_given_out() {
        let (redis, _store) = redis_with_session("fo:", "moved").await;
        let node = node(&redis.url(), "fo:").await;
        let events = node.hub.events().expect("shared");
        let log = node.hub.create("moved");
        let mut live = reader(&log, STANDALONE, None);
        for n in 1..=3 {
            assert_eq!(
                events.publish("moved", b"{}").await.expect("publish"),
                Some(n)
            );
        }
        assert_eq!(read(&mut live, 3).await.len(), 3);
        let mut conn = crate::session::redis::connection(&redis.url()).expect("link");
        let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        for args in [
            vec!["127.0.0.1".to_owned(), unreachable.to_string()],
            vec!["NO".into(), "ONE".into()],
        ] {
            let () = redis::cmd("REPLICAOF")
                .arg(&args)
                .query_async(&mut conn)
                .await
                .expect("replicaof");
        }
        let seq = events
            .publish("moved", b"{\"after\":1}")
            .await
            .expect("publish")
            .expect("the session exists");
        assert_eq!(seq, 3 + SEQ_GAP + 1);
        assert_eq!(
            events.publish("moved", b"{}").await.expect("publish"),
            Some(seq + 1),
            "one gap per takeover"
        );
        let got = read(&mut live, 2).await;
        assert_eq!(
            got[0].1, "{\"after\":1}",
            "the live reader gets the event past the gap"
        );
        assert!(log.attach(STANDALONE, Some(3)).expect("attach").gap);
    }

    #[tokio::test]
    async fn events_older_than_max_age_leave_the_shared_log() {
        let (redis, _store) = redis_with_session("age:", "aged").await;
        let node = node_keeping(&redis.url(), "age:", Duration::from_millis(200)).await;
        let events = node.hub.events().expect("shared");
        for _ in 0..3 {
            events.publish("aged", b"{}").await.expect("publish");
        }
        let begun = tokio::time::Instant::now();
        // Each append trims what has grown too old by then.
        loop {
            let seq = events
                .publish("aged", b"{}")
                .await
                .expect("publish")
                .expect("the session exists");
            let read = events.read("aged", 0).await.expect("read").expect("log");
            let first = read.entries.first().map(|(seq, _)| *seq);
            if first > Some(3) {
                assert_eq!(read.entries.last().map(|(seq, _)| *seq), Some(seq));
                assert!(begun.elapsed() >= Duration::from_millis(200));
                break;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(5),
                "old events still in the log: {first:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// With Redis away, what waits for the writer is bounded: more is
    /// dropped and counted at once, and a publish says so at once.
    #[tokio::test]
    async fn the_writer_queue_is_bounded() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let limits = SharedLimits {
            max_events: 64,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
            idle_ttl: Duration::from_secs(60),
            wait: None,
        };
        let events =
            SharedEvents::new(&format!("redis://127.0.0.1:{port}/"), "q:", limits).expect("events");
        let node = Arc::new(Node {
            hub: Hub::shared(LIMITS, events.clone()),
            notices: Mutex::new(Vec::new()),
        });
        let handler: Arc<dyn BusHandler> = node.clone();
        events.start(Arc::downgrade(&handler));
        let session: Arc<str> = "s".into();
        let megabyte = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..(MAX_QUEUED_BYTES >> 20) + 600 {
            events.enqueue(
                &session,
                Op::Message {
                    stream: STANDALONE,
                    payload: megabyte.clone(),
                },
            );
        }
        assert!(events.dropped() >= 1, "nothing was dropped");
        let refused = tokio::time::timeout(Duration::from_secs(1), events.publish("s", b"{}"))
            .await
            .expect("answered at once");
        assert!(refused.is_err());
        assert!(
            events.queued_bytes.load(Ordering::Relaxed) <= MAX_QUEUED_BYTES,
            "bounded"
        );
    }

    #[tokio::test]
    async fn the_shared_log_is_bounded_by_bytes_too() {
        let (redis, _store) = redis_with_session("bytes:", "big").await;
        let limits = SharedLimits {
            max_events: 64,
            max_bytes: 1000,
            max_age: Duration::from_secs(60),
            idle_ttl: Duration::from_secs(60),
            wait: None,
        };
        let node = node_with(&redis.url(), "bytes:", limits).await;
        let events = node.hub.events().expect("shared");
        let payload =
            |n: usize, fill: usize| format!("{{\"n\":{n},\"x\":\"{}\"}}", "y".repeat(fill));
        let mut last = 0;
        for n in 0..10 {
            // 300 bytes each: three fit in 1000.
            let body = payload(n, 300 - 14);
            assert_eq!(body.len(), 300);
            last = events
                .publish("big", body.as_bytes())
                .await
                .expect("publish")
                .expect("the session exists");
        }
        let kept = |read: &LogRead| read.entries.iter().map(|(seq, _)| *seq).collect::<Vec<_>>();
        let read = events.read("big", 0).await.expect("read").expect("log");
        assert_eq!(kept(&read), [last - 2, last - 1, last]);
        // One larger than the bound: it alone is kept, the newest always is.
        let huge = payload(10, 5000);
        let seq = events
            .publish("big", huge.as_bytes())
            .await
            .expect("publish")
            .expect("the session exists");
        let read = events.read("big", 0).await.expect("read").expect("log");
        assert_eq!(kept(&read), [seq]);
        // And the count of bytes went down with what left: small ones fit
        // again next to each other.
        for n in 11..13 {
            events
                .publish("big", payload(n, 100).as_bytes())
                .await
                .expect("publish");
        }
        let read = events.read("big", 0).await.expect("read").expect("log");
        assert_eq!(kept(&read), [seq + 1, seq + 2]);
    }

    /// Begin and end entries carry no payload: a trim that removes only
    /// such entries takes 0 bytes off the count. (It sent `HINCRBY -0`,
    /// which Redis refuses, and the whole batch of events was dropped.)
    #[tokio::test]
    async fn a_trim_of_entries_without_payload_keeps_the_log_working() {
        let (redis, _store) = redis_with_session("empty:", "e").await;
        let limits = SharedLimits {
            max_events: 3,
            max_bytes: 1000,
            max_age: Duration::from_secs(60),
            idle_ttl: Duration::from_secs(60),
            wait: None,
        };
        let node = node_with(&redis.url(), "empty:", limits).await;
        let events = node.hub.events().expect("shared");
        let mut seqs = Vec::new();
        for _ in 0..6 {
            let seq = events
                .publish("e", b"")
                .await
                .expect("Redis took the append")
                .expect("the session exists");
            seqs.push(seq);
        }
        let read = events.read("e", 0).await.expect("read").expect("log");
        let kept: Vec<u64> = read.entries.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(kept, seqs[3..]);
    }

    #[test]
    fn bus_messages_parse() {
        let Some(Bus::Entry {
            session,
            seq,
            entry,
        }) = parse_bus(b"e\nabc\n7\n0\nm\n{\"a\":\n1}")
        else {
            panic!("an entry");
        };
        assert_eq!((session, seq), ("abc", 7));
        assert_eq!(
            entry,
            Entry::Message {
                stream: 0,
                payload: Bytes::from_static(b"{\"a\":\n1}")
            }
        );
        let Some(Bus::Entry { entry, .. }) = parse_bus(b"e\nabc\n8\n42\ne\n") else {
            panic!("an entry");
        };
        assert_eq!(entry, Entry::End(42));
        // Truncated or foreign messages are refused, never a panic.
        for junk in [
            &b"n"[..],
            b"n\n",
            b"n\n7",
            b"e",
            b"e\nabc",
            b"e\nabc\nx\n0\nm\n",
            b"",
            b"\n\n",
        ] {
            assert!(parse_bus(junk).is_none(), "{junk:?}");
        }
        // A notice is bytes the bus passes on as they are.
        for notice in [&b"{}"[..], b"", b"two\nlines\n", b"\xff\x00"] {
            let mut raw = b"n\n9\n".to_vec();
            raw.extend_from_slice(notice);
            let Some(Bus::Notice { node, notice: got }) = parse_bus(&raw) else {
                panic!("a notice");
            };
            assert_eq!((node, got), (9, notice));
        }
        for bad in [
            &b""[..],
            b"x\n1",
            b"e\nabc\nseven\n0\nm\n{}",
            b"e\nabc\n1\n0\nz\n{}",
            b"n\nnode\n{}",
        ] {
            assert!(parse_bus(bad).is_none(), "{bad:?}");
        }
    }
}
