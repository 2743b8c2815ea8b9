//! Gateway-owned MCP sessions.
//!
//! Sessions are minted here, not by upstreams, so upstreams can be stateless.
//! State sits behind [`SessionStore`]: [`MemorySessionStore`] is the
//! single-node default; a shared store for several nodes implements the same
//! trait.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use dashmap::DashMap;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Mints a session id: 256 random bits from a CSPRNG, base64url (43
/// visible ASCII characters).
pub fn mint_id() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The start of a session id, enough to tell sessions apart in logs
/// without writing the whole (a bearer of sorts) there.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Whether a client-supplied id could be one we minted. Anything else is
/// refused before it reaches a store or a log line.
pub fn is_plausible_id(id: &str) -> bool {
    id.len() == 43
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) mod redis;
pub use redis::{
    ClusterTarget, RedisLink, RedisSessionStore, RedisStoreError, RedisTarget, SentinelTarget,
};

/// Which client transport a session was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Streamable HTTP (`/mcp`), 2025-03-26 and later.
    StreamableHttp,
    /// HTTP+SSE of 2024-11-05 (`/sse` + `/messages`).
    LegacySse,
    /// The gateway's own session with a stateful upstream on behalf of a
    /// 2026-07-28 client (one per user and client); no client names it.
    Hidden,
}

/// What the gateway remembers about a session. Serialized whole for a
/// shared store; the admin API leaves out the upstream session's secrets
/// (see [`SessionRecord::public`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub id: String,
    pub org: String,
    /// The identity the session is bound to; another subject gets 404.
    pub subject: String,
    /// The identity provider's session (`sid`) of the token that opened it;
    /// a back-channel logout of that session ends this one too.
    pub idp_session: Option<String>,
    pub transport: Transport,
    /// Negotiated at `initialize`; empty until then on legacy sessions.
    pub protocol_version: String,
    pub client_info: Option<Value>,
    pub client_capabilities: Option<Value>,
    pub log_level: Option<String>,
    /// URIs of `resources/subscribe`, kept by the gateway when the upstream
    /// is modern (its `subscriptions/listen` filter).
    pub resource_subscriptions: Vec<String>,
    /// The upstream's own session, when the upstream is stateful.
    pub upstream: Option<UpstreamSession>,
    /// Of a federated session: its session at each of its servers, by
    /// server name (the gateway's own sessions of `org/server`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, String>,
    pub created_at_ms: u64,
}

/// A session a stateful upstream minted for a gateway session, pinned to
/// the replica that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamSession {
    /// The replica's configured URL.
    pub replica: String,
    /// The upstream's `Mcp-Session-Id`. Never shown: it is the key to
    /// the upstream session.
    pub id: String,
    pub protocol_version: String,
    /// The client's `initialize` params, replayed when the upstream loses
    /// the session.
    pub initialize: Value,
}

impl SessionState {
    /// A new session of `org` bound to `identity`.
    pub fn new(
        id: String,
        org: &str,
        identity: &ratatosk_auth::Identity,
        transport: Transport,
        protocol_version: String,
    ) -> SessionState {
        SessionState {
            id,
            org: org.to_owned(),
            subject: identity.subject.clone(),
            idp_session: identity.session_id.clone(),
            transport,
            protocol_version,
            client_info: None,
            client_capabilities: None,
            log_level: None,
            resource_subscriptions: Vec::new(),
            upstream: None,
            members: BTreeMap::new(),
            created_at_ms: now_ms(),
        }
    }

    /// Records what the client said about itself in `initialize`.
    pub fn set_client(&mut self, initialize_params: &Value) {
        self.client_info = initialize_params.get("clientInfo").cloned();
        self.client_capabilities = initialize_params.get("capabilities").cloned();
    }
}

/// Checks that what a client says about itself (`clientInfo` and its
/// capabilities) fits in `max` bytes of JSON, since a session keeps it for
/// its whole life (and, in Redis, reads it back on every request). The
/// error names each field, with its size, as `fields` names them.
pub fn check_client_data(fields: [(&str, Option<&Value>); 2], max: usize) -> Result<(), String> {
    let sizes = fields.map(|(name, value)| (name, value.map_or(0, json_size)));
    let total: usize = sizes.iter().map(|(_, n)| n).sum();
    if total <= max {
        return Ok(());
    }
    let parts: Vec<String> = sizes
        .iter()
        .map(|(name, n)| format!("{name} is {n} bytes"))
        .collect();
    Err(format!(
        "{}: a session keeps at most {max} bytes of client info and capabilities (sessions.max_client_bytes)",
        parts.join(" and ")
    ))
}

/// The length of a value written as compact JSON, without writing it out.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// A session with its last activity, as stores list them.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRecord {
    #[serde(flatten)]
    pub state: Arc<SessionState>,
    pub last_seen_ms: u64,
}

impl SessionRecord {
    /// As the admin API shows it: without the upstream session's id and
    /// the client's initialize params.
    pub fn public(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(Value::Object(up)) = v.get_mut("upstream") {
            up.remove("id");
            up.remove("initialize");
        }
        v
    }
}

/// How many sessions a store admits (`sessions.max_per_subject`,
/// `sessions.max_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Sessions of one subject in one org.
    pub per_subject: usize,
    /// Sessions of all orgs (of all nodes sharing the store).
    pub total: usize,
}

impl Admission {
    /// No limit worth the name: for tests and tools.
    pub const UNLIMITED: Admission = Admission {
        per_subject: usize::MAX,
        total: usize::MAX,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store: {0}")]
    Redis(#[from] RedisStoreError),
    #[error(
        "this user already has {max} sessions in org '{org}' (sessions.max_per_subject); end one with DELETE, or wait until idle ones expire"
    )]
    SubjectFull { org: String, max: usize },
    #[error("the gateway already holds {max} sessions (sessions.max_total); retry later")]
    Full { max: usize },
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session, unless `admission` refuses it
    /// ([`StoreError::SubjectFull`], [`StoreError::Full`]); the check and
    /// the insertion are one step.
    async fn insert(
        &self,
        state: SessionState,
        admission: Admission,
    ) -> Result<Arc<SessionState>, StoreError>;
    /// Whether a session of `subject` in `org` would be admitted now: a
    /// cheap check before work that a refusal would waste (opening an
    /// upstream session).
    async fn admits(
        &self,
        org: &str,
        subject: &str,
        admission: Admission,
    ) -> Result<(), StoreError>;
    /// Looks a session up and records activity on it.
    async fn lookup(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError>;
    /// Records activity without reading the state (the reaper calls this
    /// for sessions with an open stream, so they do not expire). False if it
    /// is gone.
    async fn touch(&self, id: &str) -> Result<bool, StoreError>;
    /// Changes a session where it is stored; false if it is gone (a
    /// session that ended is never re-created). `change` sees the current
    /// state, so concurrent changes of different fields keep each other.
    async fn update(
        &self,
        id: &str,
        change: &(dyn for<'s> Fn(&'s mut SessionState) + Send + Sync),
    ) -> Result<bool, StoreError>;
    async fn remove(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError>;
    async fn list_org(&self, org: &str) -> Result<Vec<SessionRecord>, StoreError>;
    /// Ids of the sessions opened with the identity provider's session
    /// `sid` (a back-channel logout ends them).
    async fn ids_of_idp_session(&self, sid: &str) -> Result<Vec<String>, StoreError>;
    /// Ids of the sessions of `subject` in `org`.
    async fn ids_of_subject(&self, org: &str, subject: &str) -> Result<Vec<String>, StoreError>;
    /// How many sessions the org has.
    async fn count_org(&self, org: &str) -> Result<usize, StoreError> {
        Ok(self.list_org(org).await?.len())
    }
    /// Removes and returns sessions idle for longer than `ttl`.
    async fn remove_idle(&self, ttl: Duration) -> Result<Vec<Arc<SessionState>>, StoreError>;
    /// What the store is, for `/readyz`.
    fn kind(&self) -> &'static str;
    /// Whether the store answers now (`/readyz`).
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The hidden session recorded for a 2026-07-28 client of a stateful
    /// upstream (`key`: org, subject, client info and capabilities), if
    /// any; a record lives as long as its session is used.
    async fn hidden_session(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Records `id` as the hidden session of `key`, unless another live
    /// session is recorded already: the one recorded.
    async fn record_hidden_session(&self, key: &str, id: &str) -> Result<String, StoreError>;
    /// Forgets the hidden session of `key` if it is still `id`.
    async fn forget_hidden_session(&self, key: &str, id: &str) -> Result<(), StoreError>;
}

struct Entry {
    state: Arc<SessionState>,
    /// Milliseconds after the store's epoch: monotonic, so a wall-clock
    /// step cannot expire every session at once.
    last_seen: AtomicU64,
}

/// In-process store: a sharded map. Sessions are lost on restart, which
/// clients see as 404 and answer by re-initializing.
pub struct MemorySessionStore {
    sessions: DashMap<String, Entry>,
    epoch: Instant,
    /// Session ids by (org, subject), for the per-subject cap.
    by_subject: DashMap<(String, String), HashSet<String>>,
    /// Session ids by identity-provider session, for logouts.
    by_idp_session: DashMap<String, HashSet<String>>,
    /// Sessions held, for the total cap (counted before they are in the
    /// map, so concurrent inserts cannot pass it together).
    total: AtomicUsize,
    /// Hidden sessions by the key of their client.
    hidden: DashMap<String, String>,
}

impl Default for MemorySessionStore {
    fn default() -> Self {
        MemorySessionStore {
            sessions: DashMap::new(),
            epoch: Instant::now(),
            by_subject: DashMap::new(),
            by_idp_session: DashMap::new(),
            total: AtomicUsize::new(0),
            hidden: DashMap::new(),
        }
    }
}

/// Removes `id` from the set under `key`, and the set once it is empty.
fn unindex<K: std::hash::Hash + Eq + Clone>(
    index: &DashMap<K, HashSet<String>>,
    key: &K,
    id: &str,
) {
    if let dashmap::Entry::Occupied(mut e) = index.entry(key.clone()) {
        e.get_mut().remove(id);
        if e.get().is_empty() {
            e.remove();
        }
    }
}

impl MemorySessionStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A monotonic last-seen tick as wall-clock milliseconds, for display.
    fn wall_clock(&self, tick: u64) -> u64 {
        now_ms().saturating_sub(self.tick().saturating_sub(tick))
    }

    /// Takes a session out of the indexes and the count.
    fn forget(&self, state: &SessionState) {
        unindex(
            &self.by_subject,
            &(state.org.clone(), state.subject.clone()),
            &state.id,
        );
        if let Some(sid) = &state.idp_session {
            unindex(&self.by_idp_session, sid, &state.id);
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn hidden_session(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.hidden.get(key).map(|id| id.clone()))
    }

    async fn record_hidden_session(&self, key: &str, id: &str) -> Result<String, StoreError> {
        let mut entry = self
            .hidden
            .entry(key.to_owned())
            .or_insert_with(|| id.to_owned());
        if *entry != id && !self.sessions.contains_key(entry.as_str()) {
            *entry = id.to_owned();
        }
        Ok(entry.clone())
    }

    async fn forget_hidden_session(&self, key: &str, id: &str) -> Result<(), StoreError> {
        self.hidden.remove_if(key, |_, recorded| recorded == id);
        Ok(())
    }

    async fn insert(
        &self,
        state: SessionState,
        admission: Admission,
    ) -> Result<Arc<SessionState>, StoreError> {
        let counted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < admission.total).then_some(n + 1)
            });
        if counted.is_err() {
            return Err(StoreError::Full {
                max: admission.total,
            });
        }
        {
            // The entry's shard lock makes check and insertion one step.
            let mut ids = self
                .by_subject
                .entry((state.org.clone(), state.subject.clone()))
                .or_default();
            if ids.len() >= admission.per_subject {
                drop(ids);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(StoreError::SubjectFull {
                    org: state.org,
                    max: admission.per_subject,
                });
            }
            ids.insert(state.id.clone());
        }
        if let Some(sid) = &state.idp_session {
            self.by_idp_session
                .entry(sid.clone())
                .or_default()
                .insert(state.id.clone());
        }
        let state = Arc::new(state);
        self.sessions.insert(
            state.id.clone(),
            Entry {
                state: state.clone(),
                last_seen: AtomicU64::new(self.tick()),
            },
        );
        Ok(state)
    }

    async fn admits(
        &self,
        org: &str,
        subject: &str,
        admission: Admission,
    ) -> Result<(), StoreError> {
        if self.total.load(Ordering::Acquire) >= admission.total {
            return Err(StoreError::Full {
                max: admission.total,
            });
        }
        let held = self
            .by_subject
            .get(&(org.to_owned(), subject.to_owned()))
            .map_or(0, |ids| ids.len());
        if held >= admission.per_subject {
            return Err(StoreError::SubjectFull {
                org: org.to_owned(),
                max: admission.per_subject,
            });
        }
        Ok(())
    }

    async fn ids_of_idp_session(&self, sid: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .by_idp_session
            .get(sid)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn ids_of_subject(&self, org: &str, subject: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .by_subject
            .get(&(org.to_owned(), subject.to_owned()))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn lookup(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError> {
        Ok(self.sessions.get(id).map(|e| {
            e.last_seen.store(self.tick(), Ordering::Relaxed);
            e.state.clone()
        }))
    }

    async fn touch(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .sessions
            .get(id)
            .map(|e| e.last_seen.store(self.tick(), Ordering::Relaxed))
            .is_some())
    }

    async fn update(
        &self,
        id: &str,
        change: &(dyn for<'s> Fn(&'s mut SessionState) + Send + Sync),
    ) -> Result<bool, StoreError> {
        Ok(match self.sessions.get_mut(id) {
            Some(mut e) => {
                let mut state = (*e.state).clone();
                change(&mut state);
                e.state = Arc::new(state);
                e.last_seen.store(self.tick(), Ordering::Relaxed);
                true
            }
            None => false,
        })
    }

    async fn remove(&self, id: &str) -> Result<Option<Arc<SessionState>>, StoreError> {
        let removed = self.sessions.remove(id).map(|(_, e)| e.state);
        if let Some(state) = &removed {
            self.forget(state);
        }
        Ok(removed)
    }

    async fn list_org(&self, org: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let mut out: Vec<SessionRecord> = self
            .sessions
            .iter()
            .filter(|e| e.state.org == org)
            .map(|e| SessionRecord {
                state: e.state.clone(),
                last_seen_ms: self.wall_clock(e.last_seen.load(Ordering::Relaxed)),
            })
            .collect();
        out.sort_by_key(|r| r.state.created_at_ms);
        Ok(out)
    }

    async fn remove_idle(&self, ttl: Duration) -> Result<Vec<Arc<SessionState>>, StoreError> {
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let cutoff = self.tick().saturating_sub(ttl);
        let mut removed = Vec::new();
        self.sessions.retain(|_, e| {
            let keep = e.last_seen.load(Ordering::Relaxed) >= cutoff;
            if !keep {
                removed.push(e.state.clone());
            }
            keep
        });
        for state in &removed {
            self.forget(state);
        }
        Ok(removed)
    }
}

#[cfg(test)]
pub(crate) fn test_state(id: &str, org: &str) -> SessionState {
    SessionState::new(
        id.to_owned(),
        org,
        &ratatosk_auth::Identity::anonymous(org),
        Transport::StreamableHttp,
        "2025-06-18".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn minted_ids_are_unique_plausible_and_long() {
        let ids: HashSet<String> = (0..10_000).map(|_| mint_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert!(is_plausible_id(id), "{id}");
            assert_eq!(id.len(), 43);
        }
        assert!(!is_plausible_id("short"));
        assert!(!is_plausible_id(&"a".repeat(42).replace('a', "/")));
        assert!(!is_plausible_id(&format!("{}\n", &mint_id()[..42])));
    }

    // ----- the trait-level suite, run against both stores -----------------

    async fn insert_lookup_update_remove(store: &dyn SessionStore) {
        let id = mint_id();
        store
            .insert(test_state(&id, "org-1"), Admission::UNLIMITED)
            .await
            .expect("insert");
        let got = store.lookup(&id).await.expect("lookup").expect("present");
        assert_eq!(*got, test_state_like(&got, &id, "org-1"));
        assert!(store.lookup("nope").await.expect("lookup").is_none());

        let set_version = |s: &mut SessionState| s.protocol_version = "2024-11-05".into();
        assert!(store.update(&id, &set_version).await.expect("update"));
        let upstream = UpstreamSession {
            replica: "http://127.0.0.1:1/mcp".into(),
            id: "upstream-secret".into(),
            protocol_version: "2025-06-18".into(),
            initialize: serde_json::json!({"protocolVersion": "2025-06-18"}),
        };
        let up = upstream.clone();
        let set_more = move |s: &mut SessionState| {
            s.log_level = Some("debug".into());
            s.upstream = Some(up.clone());
        };
        assert!(store.update(&id, &set_more).await.expect("update"));
        let got = store.lookup(&id).await.expect("lookup").expect("present");
        assert_eq!(
            got.protocol_version, "2024-11-05",
            "one change keeps the other"
        );
        assert_eq!(got.log_level.as_deref(), Some("debug"));
        assert_eq!(got.upstream.as_ref(), Some(&upstream), "kept whole");

        let removed = store.remove(&id).await.expect("remove").expect("was there");
        assert_eq!(removed.id, id);
        assert!(store.lookup(&id).await.expect("lookup").is_none());
        assert!(!store.touch(&id).await.expect("touch"));
        assert!(
            !store.update(&id, &set_version).await.expect("update"),
            "an ended session is not re-created"
        );
        assert!(store.lookup(&id).await.expect("lookup").is_none());
        assert!(store.remove(&id).await.expect("remove").is_none());
    }

    /// `test_state` with the creation time of `got` (the clock moved on).
    fn test_state_like(got: &SessionState, id: &str, org: &str) -> SessionState {
        let mut want = test_state(id, org);
        want.created_at_ms = got.created_at_ms;
        want
    }

    async fn list_is_per_org(store: &dyn SessionStore) {
        let mut ids = Vec::new();
        for org in ["org-1", "org-1", "org-2"] {
            let id = mint_id();
            store
                .insert(test_state(&id, org), Admission::UNLIMITED)
                .await
                .expect("insert");
            ids.push(id);
        }
        let listed = store.list_org("org-1").await.expect("list");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|r| r.last_seen_ms > 0));
        assert_eq!(store.list_org("org-2").await.expect("list").len(), 1);
        assert!(store.list_org("org-3").await.expect("list").is_empty());
        assert_eq!(store.count_org("org-1").await.expect("count"), 2);
        assert_eq!(store.count_org("org-3").await.expect("count"), 0);
        store.remove(&ids[0]).await.expect("remove");
        assert_eq!(store.list_org("org-1").await.expect("list").len(), 1);
        assert_eq!(store.count_org("org-1").await.expect("count"), 1);
    }

    async fn idle_sessions_are_removed_and_touched_ones_kept(store: &dyn SessionStore) {
        let idle = mint_id();
        let busy = mint_id();
        store
            .insert(test_state(&idle, "o"), Admission::UNLIMITED)
            .await
            .expect("insert");
        store
            .insert(test_state(&busy, "o"), Admission::UNLIMITED)
            .await
            .expect("insert");
        // Let both age past a short TTL, then show activity on one.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(store.touch(&busy).await.expect("touch"));
        let removed = store
            .remove_idle(Duration::from_millis(20))
            .await
            .expect("reap");
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].id, idle);
        assert!(store.lookup(&busy).await.expect("lookup").is_some());
        assert!(store.lookup(&idle).await.expect("lookup").is_none());
        assert_eq!(store.list_org("o").await.expect("list").len(), 1);
    }

    /// Concurrent changes of one session, from `stores` (one per node),
    /// all land.
    async fn concurrent_changes_keep_each_other(stores: &[&dyn SessionStore]) {
        let id = mint_id();
        stores[0]
            .insert(test_state(&id, "org-1"), Admission::UNLIMITED)
            .await
            .expect("insert");
        let changes = (0..24).map(|i| {
            let store = stores[i % stores.len()];
            let id = id.clone();
            async move {
                let uri = format!("file:///{i}");
                let add = move |s: &mut SessionState| s.resource_subscriptions.push(uri.clone());
                assert!(store.update(&id, &add).await.expect("update"));
            }
        });
        futures::future::join_all(changes).await;
        let got = stores[stores.len() - 1]
            .lookup(&id)
            .await
            .expect("lookup")
            .expect("present");
        let mut uris = got.resource_subscriptions.clone();
        uris.sort();
        uris.dedup();
        assert_eq!(uris.len(), 24, "every change landed: {uris:?}");
    }

    /// A state of `subject` in `org`, opened with provider session `sid`.
    fn state_of(org: &str, subject: &str, sid: Option<&str>) -> SessionState {
        let mut state = test_state(&mint_id(), org);
        state.subject = subject.to_owned();
        state.idp_session = sid.map(str::to_owned);
        state
    }

    async fn admission_caps_subjects_and_the_total(store: &dyn SessionStore) {
        let caps = Admission {
            per_subject: 2,
            total: 5,
        };
        let mut alice = Vec::new();
        for _ in 0..2 {
            let s = store
                .insert(state_of("o", "alice", None), caps)
                .await
                .expect("admitted");
            alice.push(s.id.clone());
        }
        let third = store.insert(state_of("o", "alice", None), caps).await;
        assert!(
            matches!(third, Err(StoreError::SubjectFull { max: 2, .. })),
            "{third:?}"
        );
        assert!(matches!(
            store.admits("o", "alice", caps).await,
            Err(StoreError::SubjectFull { .. })
        ));
        // Per org: alice in another org, and bob here, are counted apart.
        store
            .insert(state_of("p", "alice", None), caps)
            .await
            .expect("another org");
        store
            .insert(state_of("o", "bob", None), caps)
            .await
            .expect("another user");
        store
            .insert(state_of("o", "carol", None), caps)
            .await
            .expect("fifth");
        let sixth = store.insert(state_of("o", "dave", None), caps).await;
        assert!(
            matches!(sixth, Err(StoreError::Full { max: 5 })),
            "{sixth:?}"
        );
        assert!(matches!(
            store.admits("o", "dave", caps).await,
            Err(StoreError::Full { .. })
        ));
        // Ending one makes room again, for that user and in all.
        store.remove(&alice[0]).await.expect("remove");
        store.admits("o", "alice", caps).await.expect("room again");
        store
            .insert(state_of("o", "alice", None), caps)
            .await
            .expect("admitted again");
    }

    /// A hidden-session record names one live session: a second node's
    /// record loses to a live one, replaces an ended one, and is
    /// forgotten only by the session it names.
    async fn hidden_sessions_are_recorded_once(store: &dyn SessionStore) {
        let caps = Admission::UNLIMITED;
        let key = "o\nalice\n{\"name\":\"c\"}\n{}";
        assert_eq!(store.hidden_session(key).await.expect("get"), None);
        let first = store
            .insert(state_of("o", "alice", None), caps)
            .await
            .expect("insert");
        let second = store
            .insert(state_of("o", "alice", None), caps)
            .await
            .expect("insert");
        let recorded = store.record_hidden_session(key, &first.id).await;
        assert_eq!(recorded.expect("record"), first.id);
        let recorded = store.record_hidden_session(key, &second.id).await;
        assert_eq!(recorded.expect("record"), first.id, "the live one stays");
        store
            .forget_hidden_session(key, &second.id)
            .await
            .expect("forget");
        assert_eq!(
            store.hidden_session(key).await.expect("get"),
            Some(first.id.clone())
        );
        store.remove(&first.id).await.expect("remove");
        let recorded = store.record_hidden_session(key, &second.id).await;
        assert_eq!(
            recorded.expect("record"),
            second.id,
            "an ended one is replaced"
        );
        store
            .forget_hidden_session(key, &second.id)
            .await
            .expect("forget");
        assert_eq!(store.hidden_session(key).await.expect("get"), None);
    }

    async fn sessions_are_found_by_subject_and_provider_session(store: &dyn SessionStore) {
        let caps = Admission::UNLIMITED;
        let a1 = store
            .insert(state_of("o", "alice", Some("sid-1")), caps)
            .await
            .expect("insert");
        let a2 = store
            .insert(state_of("o", "alice", Some("sid-2")), caps)
            .await
            .expect("insert");
        let b = store
            .insert(state_of("o", "bob", Some("sid-3")), caps)
            .await
            .expect("insert");
        let other_org = store
            .insert(state_of("p", "alice", Some("sid-1")), caps)
            .await
            .expect("insert");
        let mut by_sid = store.ids_of_idp_session("sid-1").await.expect("by sid");
        by_sid.sort();
        let mut want = vec![a1.id.clone(), other_org.id.clone()];
        want.sort();
        assert_eq!(by_sid, want);
        let mut alice = store
            .ids_of_subject("o", "alice")
            .await
            .expect("by subject");
        alice.sort();
        let mut want = vec![a1.id.clone(), a2.id.clone()];
        want.sort();
        assert_eq!(alice, want);
        assert_eq!(
            store.ids_of_subject("o", "bob").await.expect("bob"),
            vec![b.id.clone()]
        );
        store.remove(&a1.id).await.expect("remove");
        assert_eq!(
            store.ids_of_idp_session("sid-1").await.expect("by sid"),
            vec![other_org.id.clone()]
        );
        assert!(
            store
                .ids_of_idp_session("none")
                .await
                .expect("none")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn memory_store_suite() {
        let store = MemorySessionStore::new();
        insert_lookup_update_remove(&store).await;
        list_is_per_org(&store).await;
        idle_sessions_are_removed_and_touched_ones_kept(&MemorySessionStore::new()).await;
        concurrent_changes_keep_each_other(&[&store]).await;
        admission_caps_subjects_and_the_total(&MemorySessionStore::new()).await;
        sessions_are_found_by_subject_and_provider_session(&MemorySessionStore::new()).await;
        hidden_sessions_are_recorded_once(&MemorySessionStore::new()).await;
    }

    #[tokio::test]
    async fn reaped_sessions_leave_the_counts() {
        let store = MemorySessionStore::new();
        let caps = Admission {
            per_subject: 1,
            total: 10,
        };
        store
            .insert(state_of("o", "alice", Some("s")), caps)
            .await
            .expect("insert");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            store
                .remove_idle(Duration::from_millis(10))
                .await
                .expect("reap")
                .len(),
            1
        );
        store.admits("o", "alice", caps).await.expect("room again");
        assert!(store.ids_of_idp_session("s").await.expect("sid").is_empty());
    }

    #[test]
    fn client_data_is_measured_as_json_and_named() {
        let small = serde_json::json!({"name": "x"});
        check_client_data([("a", Some(&small)), ("b", None)], 100).expect("fits");
        let big = serde_json::json!({"blob": "y".repeat(200)});
        let why = check_client_data(
            [
                ("params.clientInfo", Some(&small)),
                ("params.capabilities", Some(&big)),
            ],
            100,
        )
        .expect_err("too big");
        assert!(why.contains("params.capabilities is 211 bytes"), "{why}");
        assert!(why.contains("params.clientInfo is 12 bytes"), "{why}");
        assert!(why.contains("sessions.max_client_bytes"), "{why}");
    }

    #[tokio::test]
    async fn redis_store_suite() {
        let redis = crate::testing::RedisServer::start().await;
        let ttl = Duration::from_secs(60);
        let node = |prefix: &str| RedisSessionStore::new(&redis.url(), prefix, ttl).expect("store");
        insert_lookup_update_remove(&node("a:")).await;
        list_is_per_org(&node("b:")).await;
        idle_sessions_are_removed_and_touched_ones_kept(&node("c:")).await;
        // Two nodes sharing one prefix.
        let (one, two) = (node("d:"), node("d:"));
        concurrent_changes_keep_each_other(&[&one, &two]).await;
        one.ping().await.expect("ping");
        admission_caps_subjects_and_the_total(&node("e:")).await;
        sessions_are_found_by_subject_and_provider_session(&node("f:")).await;
        hidden_sessions_are_recorded_once(&node("g:")).await;
    }

    /// Ids whose session key expired before any node reaped them leave
    /// every index when the reaper comes, and the reaper takes more than
    /// one batch in a pass.
    #[tokio::test]
    async fn redis_reaping_cleans_every_index_and_runs_to_the_end() {
        let redis = crate::testing::RedisServer::start().await;
        let store =
            RedisSessionStore::new(&redis.url(), "r:", Duration::from_secs(60)).expect("store");
        let caps = Admission::UNLIMITED;
        let expired = store
            .insert(state_of("o", "alice", Some("sid-x")), caps)
            .await
            .expect("insert");
        let mut conn = ::redis::Client::open(redis.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        // As if the key's own expiry came first.
        let _: i64 = ::redis::AsyncCommands::del(&mut conn, format!("r:s:{}", expired.id))
            .await
            .expect("del");
        for _ in 0..(super::redis::REAP_BATCH + 5) {
            store
                .insert(state_of("o", "bob", None), caps)
                .await
                .expect("insert");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reaped = store
            .remove_idle(Duration::from_millis(10))
            .await
            .expect("reap");
        assert_eq!(
            reaped.len(),
            super::redis::REAP_BATCH + 5,
            "all, past one batch"
        );
        assert_eq!(store.count_org("o").await.expect("count"), 0);
        for key in [
            "r:org:o",
            "r:u:o:alice",
            "r:u:o:bob",
            "r:sid:sid-x",
            "r:ix",
            "r:idle",
        ] {
            let left: i64 = ::redis::AsyncCommands::exists(&mut conn, key)
                .await
                .expect("exists");
            assert_eq!(left, 0, "{key} is gone");
        }
    }
}
