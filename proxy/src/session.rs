//! Gateway-owned MCP sessions.
//!
//! Sessions are minted here, not by upstreams, so upstreams can be stateless.
//! State sits behind [`SessionStore`]: [`MemorySessionStore`] is the
//! single-node default; a shared store for several nodes implements the same
//! trait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
pub use redis::{RedisSessionStore, RedisStoreError};

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
            created_at_ms: now_ms(),
        }
    }

    /// Records what the client said about itself in `initialize`.
    pub fn set_client(&mut self, initialize_params: &Value) {
        self.client_info = initialize_params.get("clientInfo").cloned();
        self.client_capabilities = initialize_params.get("capabilities").cloned();
    }
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store: {0}")]
    Redis(#[from] RedisStoreError),
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn insert(&self, state: SessionState) -> Result<Arc<SessionState>, StoreError>;
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
}

impl Default for MemorySessionStore {
    fn default() -> Self {
        MemorySessionStore {
            sessions: DashMap::new(),
            epoch: Instant::now(),
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
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn insert(&self, state: SessionState) -> Result<Arc<SessionState>, StoreError> {
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
        Ok(self.sessions.remove(id).map(|(_, e)| e.state))
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
            .insert(test_state(&id, "org-1"))
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
            store.insert(test_state(&id, org)).await.expect("insert");
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
        store.insert(test_state(&idle, "o")).await.expect("insert");
        store.insert(test_state(&busy, "o")).await.expect("insert");
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
            .insert(test_state(&id, "org-1"))
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

    #[tokio::test]
    async fn memory_store_suite() {
        let store = MemorySessionStore::new();
        insert_lookup_update_remove(&store).await;
        list_is_per_org(&store).await;
        idle_sessions_are_removed_and_touched_ones_kept(&MemorySessionStore::new()).await;
        concurrent_changes_keep_each_other(&[&store]).await;
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
    }
}
