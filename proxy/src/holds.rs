//! Deferred answers ("holds"), in the spirit of Pushpin's GRIP hold: an
//! upstream answers a request with a hold instead of a result, and a worker
//! finishes the request later through the publish API.
//!
//! The upstream's response names the hold in its result's `_meta`:
//!
//! ```json
//! {"jsonrpc": "2.0", "id": 7, "result": {"content": [],
//!   "_meta": {"io.ratatosk/hold": {"id": "task-42", "timeout": 300}}}}
//! ```
//!
//! The gateway keeps the client's request open (its stream gets keep-alives
//! as every stream does) and delivers what is published for the hold:
//! notifications (progress, log messages) as they come, then one response
//! (result or error), whose id the gateway sets to the client's request id.
//! A timeout gives the client an error; a client's cancel marks the hold
//! `cancelled`, which the worker sees when it asks or publishes.
//!
//! A worker may also ask the client something while the call is held
//! (`roots/list`, `sampling/createMessage`, `elicitation/create`): it
//! publishes the request, the gateway sends it on the client's stream under
//! an id of its own, and the client's answer (with the worker's id back) is
//! kept with the hold, for the worker to read with the hold's state.
//!
//! This module is the registry: what is open, what a publish may do, and
//! the states a worker can read. The gateway's request path waits on a
//! [`Waiter`] and writes to the client's stream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::HoldsConfig;
use crate::jsonrpc::{self, Id, Kind};

/// The `_meta` key of a result that is a hold.
pub const HOLD_META: &str = "io.ratatosk/hold";
/// How the id a 2026-07-28 client's call gets starts: such a call has no
/// session, so its holds are kept under an id of their own, which the
/// upstream gets as `Ratatosk-Session`.
pub const CALL_PREFIX: &str = "call-";

/// A new, unguessable call id.
pub fn call_id() -> String {
    format!("{CALL_PREFIX}{}", crate::session::mint_id())
}

/// Whether a call id could be one the gateway minted: the publish API
/// takes call ids without a look-up, so only these.
pub fn is_plausible_call(id: &str) -> bool {
    id.strip_prefix(CALL_PREFIX)
        .is_some_and(crate::session::is_plausible_id)
}

/// Whether a session id of the publish API is a call's.
pub fn is_call(id: &str) -> bool {
    id.starts_with(CALL_PREFIX)
}

/// The longest hold id, in bytes.
pub const MAX_HOLD_ID: usize = 128;
/// Messages published for one hold that may wait for the client's stream;
/// also the most answers of the client kept for one hold.
pub const QUEUE: usize = 64;

/// A hold an upstream asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRequest {
    pub id: String,
    pub timeout: Duration,
}

/// Whether an upstream's response is a hold: `None` if it is not one,
/// `Some(Err(why))` if `_meta` names a hold the gateway cannot keep.
pub fn hold_of(response: &[u8], config: &HoldsConfig) -> Option<Result<HoldRequest, String>> {
    // Cheap test first: nearly every answer is not a hold.
    memchr::memmem::find(response, HOLD_META.as_bytes())?;
    let v: Value = serde_json::from_slice(response).ok()?;
    let hold = v.get("result")?.get("_meta")?.get(HOLD_META)?;
    Some(parse_hold(hold, config))
}

fn parse_hold(hold: &Value, config: &HoldsConfig) -> Result<HoldRequest, String> {
    let id = hold
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{HOLD_META}.id` must be a string"))?;
    check_hold_id(id)?;
    let timeout = match hold.get("timeout") {
        None | Some(Value::Null) => config.default_timeout,
        Some(t) => {
            let secs = t
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| {
                    format!("`{HOLD_META}.timeout` must be a positive number of seconds")
                })?;
            Duration::from_secs_f64(secs.min(config.max_timeout.as_secs_f64()))
        }
    };
    Ok(HoldRequest {
        id: id.to_owned(),
        timeout,
    })
}

/// Hold ids appear in admin paths: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn check_hold_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_HOLD_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a hold id is 1 to {MAX_HOLD_ID} characters of A-Z a-z 0-9 . _ : -, got `{}`",
            jsonrpc::clip(id, 64)
        ))
    }
}

/// What a worker's message for `hold` delivers, or why it is refused.
pub fn delivery_of(hold: &str, body: &Bytes) -> Result<Delivery, HoldPublishError> {
    check_hold_id(hold).map_err(HoldPublishError::Invalid)?;
    let message =
        jsonrpc::parse_message(body).map_err(|e| HoldPublishError::Invalid(e.to_string()))?;
    match &message.kind {
        Kind::Notification { .. } => Ok(Delivery::Event(message.raw)),
        Kind::Response { .. } => Ok(Delivery::Final(message.raw)),
        Kind::Request { method, .. } if crate::era::capability_for(method).is_some() => {
            Ok(Delivery::Ask(message))
        }
        Kind::Request { method, .. } => Err(HoldPublishError::Invalid(format!(
            "a worker may ask the client roots/list, sampling/createMessage or elicitation/create, not `{}`",
            jsonrpc::clip(method, 64)
        ))),
    }
}

/// Where a hold stands, as its worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// The worker published before the gateway read the upstream's hold
    /// (a fast worker): kept, and delivered once the hold opens.
    Pending,
    /// The client waits; publish notifications, then the response.
    Open,
    /// The response was published and delivered.
    Done,
    /// The client cancelled the request (or its session ended).
    Cancelled,
    /// Nothing finished the hold within its timeout; the client got an error.
    Expired,
}

impl HoldState {
    pub fn parse(s: &str) -> Option<HoldState> {
        [
            HoldState::Pending,
            HoldState::Open,
            HoldState::Done,
            HoldState::Cancelled,
            HoldState::Expired,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Pending => "pending",
            HoldState::Open => "open",
            HoldState::Done => "done",
            HoldState::Cancelled => "cancelled",
            HoldState::Expired => "expired",
        }
    }
}

/// What the client's stream gets from a hold.
#[derive(Debug)]
pub enum Delivery {
    /// A notification, as published.
    Event(Bytes),
    /// A request to the client, as published (read once, when it was):
    /// its answer is kept with the hold (see [`Holds::answer`]).
    Ask(jsonrpc::Message),
    /// The response, as published (see [`with_id`]); the last delivery.
    Final(Bytes),
}

/// Why a hold could not be opened.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpenError {
    #[error("hold '{0}' is already open in this session")]
    Duplicate(String),
    #[error("this session has {0} holds open already (holds.max_per_session)")]
    TooMany(usize),
}

/// Why a publish for a hold was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HoldPublishError {
    #[error("no hold '{0}' in this session (never opened, or finished long ago)")]
    Unknown(String),
    #[error("hold '{hold}' is {}: nothing more reaches the client", state.as_str())]
    Finished { hold: String, state: HoldState },
    #[error("the body must be one JSON-RPC notification, request to the client, or response: {0}")]
    Invalid(String),
    #[error("the client's stream is not keeping up: {QUEUE} messages wait already; retry")]
    Busy,
    #[error("this session has {0} holds open or pending already (holds.max_per_session)")]
    TooMany(usize),
    #[error(
        "{0} calls that no upstream answered yet have messages waiting already; is the call id right?"
    )]
    TooManyCalls(usize),
}

struct Entry {
    state: HoldState,
    /// To the request waiting for this hold; `None` once finished.
    to_client: Option<mpsc::Sender<Delivery>>,
    /// A pending hold's queue, for the request that opens it.
    queued: Option<mpsc::Receiver<Delivery>>,
    /// A pending hold has its response queued already.
    answered: bool,
    /// Since when it is finished, or pending: forgotten `keep_finished`
    /// later.
    since: Option<Instant>,
    /// The client's answers to the worker's requests, with the worker's
    /// ids; the last [`QUEUE`].
    answers: Vec<Value>,
}

impl Entry {
    fn live(&self) -> bool {
        matches!(self.state, HoldState::Open | HoldState::Pending)
    }
}

/// One session's holds, by hold id.
type SessionHolds = HashMap<String, Entry>;

/// The open and recently finished holds of this node, by session: what one
/// session does never scans another's.
pub struct Holds {
    config: HoldsConfig,
    sessions: Mutex<HashMap<String, SessionHolds>>,
}

/// The request side of an open hold.
pub struct Waiter {
    pub hold: HoldRequest,
    pub deliveries: mpsc::Receiver<Delivery>,
}

impl Holds {
    pub fn new(config: HoldsConfig) -> Holds {
        Holds {
            config,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &HoldsConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHolds>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of a hold, if known.
    fn with_entry<T>(
        &self,
        session: &str,
        hold: &str,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Option<T> {
        self.lock()
            .get_mut(session)
            .and_then(|holds| holds.get_mut(hold))
            .map(f)
    }

    /// Opens a hold of `session`, taking over what a worker published for
    /// it already. Finished and pending holds older than `keep_finished`
    /// are forgotten here.
    pub fn open(&self, session: &str, hold: HoldRequest) -> Result<Waiter, OpenError> {
        let mut sessions = self.lock();
        let entries = sessions.entry(session.to_owned()).or_default();
        let keep = self.config.keep_finished;
        forget_old(entries, keep);
        let deliveries = match entries.get_mut(&hold.id) {
            Some(e) if e.state == HoldState::Pending => {
                let queued = e.queued.take();
                e.state = if e.answered {
                    HoldState::Done
                } else {
                    HoldState::Open
                };
                e.since = e.answered.then(Instant::now);
                if e.answered {
                    e.to_client = None;
                }
                queued
            }
            Some(e) if e.state == HoldState::Open => return Err(OpenError::Duplicate(hold.id)),
            _ => None,
        };
        let deliveries = match deliveries {
            Some(queued) => queued,
            None => {
                let live = live_in(entries);
                if live >= self.config.max_per_session {
                    return Err(OpenError::TooMany(live));
                }
                let (tx, rx) = mpsc::channel(QUEUE);
                entries.insert(hold.id.clone(), Entry::open(tx));
                rx
            }
        };
        Ok(Waiter { hold, deliveries })
    }

    /// A hold's state, if this node knows it.
    pub fn state(&self, session: &str, hold: &str) -> Option<HoldState> {
        self.with_entry(session, hold, |e| e.state)
    }

    /// A hold's state and the client's answers to its worker, if this node
    /// knows the hold.
    pub fn view(&self, session: &str, hold: &str) -> Option<HoldView> {
        self.with_entry(session, hold, |e| HoldView {
            state: e.state,
            answers: e.answers.clone(),
        })
    }

    /// Keeps the client's answer to a worker's request, for the worker to
    /// read: the last [`QUEUE`] are kept.
    pub fn answer(&self, session: &str, hold: &str, answer: Value) {
        self.with_entry(session, hold, |e| {
            if e.answers.len() >= QUEUE {
                e.answers.remove(0);
            }
            e.answers.push(answer);
        });
    }

    /// Takes one published message for a hold. A response finishes it. A
    /// hold not open yet is kept pending for the request that opens it:
    /// the worker may be faster than the upstream's answer.
    pub fn publish(
        &self,
        session: &str,
        hold: &str,
        body: &Bytes,
    ) -> Result<HoldState, HoldPublishError> {
        let delivery = delivery_of(hold, body)?;
        let mut sessions = self.lock();
        if is_call(session) && !sessions.contains_key(session) {
            // Any call id is taken (a fast worker may publish before the
            // upstream's answer opens the hold), so their number is capped.
            let calls = sessions
                .iter()
                .filter(|(id, holds)| {
                    is_call(id) && holds.values().any(|e| e.state == HoldState::Pending)
                })
                .count();
            if calls >= self.config.max_waiting_calls {
                return Err(HoldPublishError::TooManyCalls(calls));
            }
        }
        let entries = sessions.entry(session.to_owned()).or_default();
        if !entries.contains_key(hold) {
            let live = live_in(entries);
            if live >= self.config.max_per_session {
                return Err(HoldPublishError::TooMany(live));
            }
            entries.insert(hold.to_owned(), Entry::pending());
        }
        let Some(entry) = entries.get_mut(hold) else {
            return Err(HoldPublishError::Unknown(hold.to_owned()));
        };
        let finished = |state| HoldPublishError::Finished {
            hold: hold.to_owned(),
            state,
        };
        if entry.answered {
            return Err(finished(HoldState::Done));
        }
        let Some(to_client) = entry.to_client.as_ref().filter(|_| entry.live()) else {
            return Err(finished(entry.state));
        };
        let last = matches!(delivery, Delivery::Final(_));
        to_client.try_send(delivery).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => HoldPublishError::Busy,
            // The request stopped waiting and has not marked it yet.
            mpsc::error::TrySendError::Closed(_) => finished(HoldState::Cancelled),
        })?;
        if last {
            entry.answered = true;
            if entry.state == HoldState::Open {
                entry.state = HoldState::Done;
                entry.to_client = None;
                entry.since = Some(Instant::now());
            }
        }
        Ok(entry.state)
    }

    /// Marks an open hold as finished by the request side (a cancel, a
    /// timeout). Returns false if it was finished already, e.g. its
    /// response was published just now: the response is then in the
    /// waiter's queue.
    pub fn finish(&self, session: &str, hold: &str, state: HoldState) -> bool {
        self.with_entry(session, hold, |e| {
            let open = e.state == HoldState::Open && !e.answered;
            if open {
                e.state = state;
                e.to_client = None;
                e.since = Some(Instant::now());
            }
            open
        })
        .unwrap_or(false)
    }

    /// Forgets every hold of a session that ended.
    pub fn end_session(&self, session: &str) {
        self.lock().remove(session);
    }

    /// Forgets finished and pending holds older than `keep_finished`, and
    /// sessions (calls) with none left; run periodically. A call's holds
    /// have no session end to go with.
    pub fn sweep(&self) {
        let keep = self.config.keep_finished;
        self.lock().retain(|_, holds| {
            forget_old(holds, keep);
            !holds.is_empty()
        });
    }

    /// The session (or call) a hold is kept under, for tests that cannot
    /// see the id.
    #[cfg(test)]
    pub fn session_of(&self, hold: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, holds)| holds.contains_key(hold))
            .map(|(session, _)| session.clone())
    }

    /// Holds open now, on this node.
    pub fn open_count(&self) -> usize {
        self.lock()
            .values()
            .flat_map(HashMap::values)
            .filter(|e| e.state == HoldState::Open)
            .count()
    }
}

/// What a worker reads of its hold.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldView {
    pub state: HoldState,
    /// The client's answers to the worker's requests, oldest first.
    pub answers: Vec<Value>,
}

/// The client's answer to a worker's request as the worker reads it: the
/// worker's id back in place of the gateway's.
pub fn answer_for_worker(mut answer: Value, worker_id: &Id) -> Value {
    if let Some(obj) = answer.as_object_mut() {
        obj.insert("id".into(), worker_id.to_value());
    }
    answer
}

/// Forgets a session's finished and pending holds older than `keep`.
fn forget_old(entries: &mut SessionHolds, keep: Duration) {
    entries.retain(|_, e| e.since.is_none_or(|t| t.elapsed() < keep));
}

/// Holds of one session that are open or pending.
fn live_in(entries: &SessionHolds) -> usize {
    entries.values().filter(|e| e.live()).count()
}

impl Entry {
    fn open(to_client: mpsc::Sender<Delivery>) -> Entry {
        Entry {
            state: HoldState::Open,
            to_client: Some(to_client),
            queued: None,
            answered: false,
            since: None,
            answers: Vec::new(),
        }
    }

    fn pending() -> Entry {
        let (tx, rx) = mpsc::channel(QUEUE);
        Entry {
            state: HoldState::Pending,
            to_client: Some(tx),
            queued: Some(rx),
            answered: false,
            since: Some(Instant::now()),
            answers: Vec::new(),
        }
    }
}

/// The published response with `id` set to the client's request id, and
/// for a 2026-07-28 client (`modern_method`) reshaped as that method's
/// result.
pub fn with_id(raw: &Bytes, id: &Id, modern_method: Option<&str>) -> Result<Bytes, String> {
    let mut v: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let Some(obj) = v.as_object_mut() else {
        return Err("the response must be a JSON object".into());
    };
    obj.insert("id".into(), id.to_value());
    if let Some(method) = modern_method {
        v = crate::era::response_to_modern(v, method);
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HoldsConfig {
        HoldsConfig {
            max_per_session: 2,
            ..HoldsConfig::default()
        }
    }

    fn id(n: u64) -> Id {
        Id::from_value(&serde_json::json!(n)).expect("an id")
    }

    fn hold(name: &str) -> HoldRequest {
        HoldRequest {
            id: name.into(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_hold_is_read_from_the_result_meta() {
        let c = config();
        let plain = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        assert_eq!(hold_of(plain, &c), None);
        let h = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"_meta":{"io.ratatosk/hold":{"id":"task-1","timeout":2.5}}}}"#;
        assert_eq!(
            hold_of(h, &c),
            Some(Ok(HoldRequest {
                id: "task-1".into(),
                timeout: Duration::from_millis(2500)
            }))
        );
        let default =
            br#"{"jsonrpc":"2.0","id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":"t"}}}}"#;
        assert_eq!(
            hold_of(default, &c).and_then(Result::ok).map(|h| h.timeout),
            Some(c.default_timeout)
        );
        let long = br#"{"jsonrpc":"2.0","id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":"t","timeout":1e12}}}}"#;
        assert_eq!(
            hold_of(long, &c).and_then(Result::ok).map(|h| h.timeout),
            Some(c.max_timeout)
        );
        for bad in [
            r#"{"id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":7}}}}"#,
            r#"{"id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":"a/b"}}}}"#,
            r#"{"id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":"t","timeout":-1}}}}"#,
            r#"{"id":1,"result":{"_meta":{"io.ratatosk/hold":{"id":"t","timeout":"5"}}}}"#,
        ] {
            assert!(matches!(hold_of(bad.as_bytes(), &c), Some(Err(_))), "{bad}");
        }
        // The key elsewhere (an error, a notification) is not a hold.
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"io.ratatosk/hold"}}"#;
        assert_eq!(hold_of(error, &c), None);
    }

    #[tokio::test]
    async fn notifications_then_the_response_reach_the_request_with_its_id() {
        let holds = Holds::new(config());
        let mut w = holds.open("s1", hold("t1")).expect("open");
        let progress = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}"#);
        assert_eq!(holds.publish("s1", "t1", &progress), Ok(HoldState::Open));
        let result = Bytes::from_static(br#"{"jsonrpc":"2.0","id":"whatever","result":{"content":[{"type":"text","text":"5"}]}}"#);
        assert_eq!(holds.publish("s1", "t1", &result), Ok(HoldState::Done));
        assert!(matches!(w.deliveries.recv().await, Some(Delivery::Event(b)) if b == progress));
        match w.deliveries.recv().await {
            Some(Delivery::Final(b)) => {
                let b = with_id(&b, &id(77), None).expect("an object");
                let v: Value = serde_json::from_slice(&b).expect("json");
                assert_eq!(v["id"], 77);
                assert_eq!(v["result"]["content"][0]["text"], "5");
            }
            other => panic!("expected the response, got {other:?}"),
        }
        // Finished: the worker is told so, and a late cancel changes nothing.
        assert_eq!(
            holds.publish("s1", "t1", &progress),
            Err(HoldPublishError::Finished {
                hold: "t1".into(),
                state: HoldState::Done
            })
        );
        assert!(!holds.finish("s1", "t1", HoldState::Cancelled));
        assert_eq!(holds.state("s1", "t1"), Some(HoldState::Done));
    }

    #[test]
    fn a_cancelled_hold_refuses_its_worker_and_other_sessions_do_not_see_it() {
        let holds = Holds::new(config());
        let _w = holds.open("s1", hold("t1")).expect("open");
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#);
        assert!(holds.finish("s1", "t1", HoldState::Cancelled));
        assert_eq!(holds.state("s1", "t1"), Some(HoldState::Cancelled));
        assert_eq!(
            holds.publish("s1", "t1", &note),
            Err(HoldPublishError::Finished {
                hold: "t1".into(),
                state: HoldState::Cancelled
            })
        );
        holds.end_session("s1");
        assert_eq!(holds.state("s1", "t1"), None);
    }

    #[test]
    fn bad_publishes_and_limits_are_refused() {
        let holds = Holds::new(config());
        let _a = holds.open("s1", hold("a")).expect("open");
        assert_eq!(
            holds.open("s1", hold("a")).err(),
            Some(OpenError::Duplicate("a".into()))
        );
        let _b = holds.open("s1", hold("b")).expect("open");
        assert_eq!(
            holds.open("s1", hold("c")).err(),
            Some(OpenError::TooMany(2))
        );
        assert!(holds.open("s2", hold("c")).is_ok());
        for bad in [
            &br#"not json"#[..],
            br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{}}"#,
        ] {
            assert!(
                matches!(
                    holds.publish("s1", "a", &Bytes::copy_from_slice(bad)),
                    Err(HoldPublishError::Invalid(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(holds.open_count(), 3);
    }

    #[test]
    fn a_full_queue_is_busy_not_lost() {
        let holds = Holds::new(config());
        let _w = holds.open("s1", hold("t")).expect("open");
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#);
        for _ in 0..QUEUE {
            assert_eq!(holds.publish("s1", "t", &note), Ok(HoldState::Open));
        }
        assert_eq!(holds.publish("s1", "t", &note), Err(HoldPublishError::Busy));
    }

    #[tokio::test]
    async fn a_worker_faster_than_the_upstream_answer_loses_nothing() {
        let holds = Holds::new(config());
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"early"}}"#);
        let done = Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        assert_eq!(holds.publish("s1", "fast", &note), Ok(HoldState::Pending));
        assert_eq!(holds.publish("s1", "fast", &done), Ok(HoldState::Pending));
        assert!(matches!(
            holds.publish("s1", "fast", &note),
            Err(HoldPublishError::Finished {
                state: HoldState::Done,
                ..
            })
        ));
        let mut w = holds.open("s1", hold("fast")).expect("open");
        assert_eq!(holds.state("s1", "fast"), Some(HoldState::Done));
        assert!(matches!(w.deliveries.recv().await, Some(Delivery::Event(b)) if b == note));
        assert!(matches!(w.deliveries.recv().await, Some(Delivery::Final(b)) if b == done));
        assert!(w.deliveries.recv().await.is_none());
        // Pending holds count against the session's limit.
        assert_eq!(holds.publish("s2", "a", &note), Ok(HoldState::Pending));
        assert_eq!(holds.publish("s2", "b", &note), Ok(HoldState::Pending));
        assert_eq!(
            holds.publish("s2", "c", &note),
            Err(HoldPublishError::TooMany(2))
        );
    }

    #[tokio::test]
    async fn a_workers_request_is_delivered_and_the_last_answers_are_kept() {
        let holds = Holds::new(config());
        let mut w = holds.open("s1", hold("t")).expect("open");
        let ask = Bytes::from_static(br#"{"jsonrpc":"2.0","id":"a","method":"roots/list"}"#);
        assert_eq!(holds.publish("s1", "t", &ask), Ok(HoldState::Open));
        assert!(matches!(w.deliveries.recv().await, Some(Delivery::Ask(m)) if m.raw == ask));
        for n in 0..QUEUE + 2 {
            let answer = answer_for_worker(
                serde_json::json!({"jsonrpc": "2.0", "id": "ratatosk-input-0-1", "result": {"n": n}}),
                &id(n as u64),
            );
            holds.answer("s1", "t", answer);
        }
        let view = holds.view("s1", "t").expect("known");
        assert_eq!(view.state, HoldState::Open);
        assert_eq!(view.answers.len(), QUEUE);
        assert_eq!(view.answers[0]["id"], 2, "the oldest went first");
        assert_eq!(view.answers[QUEUE - 1]["result"]["n"], QUEUE + 1);
        // Nothing is kept for a hold this node does not know.
        holds.answer("s1", "other", serde_json::json!({}));
        assert_eq!(holds.view("s1", "other"), None);
    }

    #[test]
    fn messages_for_calls_no_upstream_answered_are_capped() {
        let holds = Holds::new(HoldsConfig {
            max_waiting_calls: 3,
            ..config()
        });
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#);
        let first = call_id();
        assert_eq!(holds.publish(&first, "h", &note), Ok(HoldState::Pending));
        for _ in 1..3 {
            assert_eq!(
                holds.publish(&call_id(), "h", &note),
                Ok(HoldState::Pending)
            );
        }
        assert_eq!(
            holds.publish(&call_id(), "h", &note),
            Err(HoldPublishError::TooManyCalls(3))
        );
        // A call already waiting takes more; a call whose hold is open does
        // not count.
        assert_eq!(holds.publish(&first, "h", &note), Ok(HoldState::Pending));
        let _open = holds.open(&first, hold("h")).expect("open");
        assert_eq!(
            holds.publish(&call_id(), "h", &note),
            Ok(HoldState::Pending)
        );
        // Sessions are not calls: their publishes are checked elsewhere.
        assert_eq!(holds.publish("s1", "h", &note), Ok(HoldState::Pending));
    }

    #[test]
    fn hold_ids_are_path_safe() {
        for good in ["a", "task-1", "celery:4f1e.2_x", &"x".repeat(128)] {
            assert!(check_hold_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "ä", "..%2f", &"x".repeat(129)] {
            assert!(check_hold_id(bad).is_err(), "{bad}");
        }
    }
}
