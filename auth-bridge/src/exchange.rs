//! Token exchange for upstreams (RFC 8693, `upstream.auth: token-exchange`):
//! the caller's access token is exchanged at the provider, by the gateway's
//! confidential client, for one addressed to one upstream only.
//!
//! - Exchanged tokens are cached per (caller token, audience, scopes),
//!   keyed by a SHA-256 as the validator's cache is, until shortly before
//!   they expire ([`refresh_margin`]); concurrent misses for one key make
//!   one call to the provider.
//! - The gateway's own requests for a session (its background upstream
//!   streams) carry no token: they get the newest exchange for the
//!   session's subject and audience, exchanged again from the subject's
//!   newest token when it nears expiry. Each request, and so each reopened
//!   stream, goes with a token that has at least the margin left.
//! - Back-channel logout drops the exchanges of the session (or subject).
//! - Provider down: cached exchanges keep working. A new exchange fails
//!   with how long to wait, and for [`PAUSE`] after a failure fails at
//!   once rather than wait on the provider again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};

use crate::Identity;
use crate::logout::LogoutEvent;
use crate::metrics::{AuthMetrics, CacheOutcome};
use crate::provider::{ExchangeFailure, Provider};

/// How long new exchanges fail at once after the provider failed one.
pub const PAUSE: Duration = Duration::from_secs(2);

/// How long an exchanged token is taken to live when the provider does not
/// say (`expires_in`).
const UNSAID_LIFETIME: Duration = Duration::from_secs(60);

/// A token the provider issued for an upstream.
pub struct Exchanged {
    /// `Bearer <token>`, marked sensitive.
    pub bearer: HeaderValue,
    /// When the token expires, and when it is exchanged again.
    expires: Instant,
    refresh_at: Instant,
    /// Whose, and when it was asked for (a logout of the subject drops
    /// exchanges made before it).
    pub subject: String,
    pub session: Option<String>,
    pub made: SystemTime,
}

impl std::fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanged")
            .field("bearer", &"<redacted>")
            .field("subject", &self.subject)
            .field("session", &self.session)
            .finish()
    }
}

/// Why there is no exchanged token for a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// The provider could not be reached or failed; retry after the pause.
    #[error("the identity provider cannot exchange the caller's token now: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    /// The provider refused the exchange: a configuration problem (the
    /// audience, the gateway's client) or a token it does not take.
    #[error("{0}")]
    Refused(String),
    /// A request of the gateway's own (no caller token) for a subject with
    /// no exchange left to use.
    #[error(
        "no exchanged token for `{subject}` is left to use and none of its tokens is valid; its next request brings one"
    )]
    NoToken { subject: String },
    /// The caller's token has expired (the gateway takes it within its
    /// clock skew; the provider would not exchange it).
    #[error("the caller's token has expired; send a fresh one")]
    Expired,
    /// The caller's provider session logged out.
    #[error("the caller's session has logged out")]
    LoggedOut,
}

impl ExchangeError {
    /// Whether the caller's token is the cause (a fresh token would do).
    pub fn is_callers(&self) -> bool {
        matches!(self, ExchangeError::Expired | ExchangeError::LoggedOut)
    }
}

/// The newest exchange for a (subject, audience, scopes), with the subject
/// token it came from and who held it, for requests that carry none.
struct Newest {
    exchanged: Arc<Exchanged>,
    subject_token: String,
    holder: Identity,
}

impl Newest {
    /// When the subject token expires (`None`: not said, or past).
    fn subject_expires(&self) -> Option<Instant> {
        self.holder.expires_at.and_then(instant_of)
    }
}

/// The exchanges made, and the provider's last failure.
pub struct Exchanges {
    cache: Cache<[u8; 32], Arc<Exchanged>>,
    newest: Cache<[u8; 32], Arc<Newest>>,
    /// Until when new exchanges fail at once, and why.
    paused: std::sync::Mutex<Option<(Instant, String)>>,
    max_lifetime: Duration,
}

/// How long a cache entry is kept.
trait Lasts {
    fn until(&self) -> Instant;
}

/// An exchanged token is kept until it expires: renewed from its refresh
/// time on, but served while the provider cannot renew it.
impl Lasts for Exchanged {
    fn until(&self) -> Instant {
        self.expires
    }
}

/// The newest exchange is kept while either token is usable.
impl Lasts for Newest {
    fn until(&self) -> Instant {
        self.subject_expires()
            .map_or(self.exchanged.expires, |s| s.max(self.exchanged.expires))
    }
}

/// Entries live until their value says ([`Lasts`]), whenever put.
struct Until;

impl<V: Lasts> Expiry<[u8; 32], Arc<V>> for Until {
    fn expire_after_create(&self, _: &[u8; 32], v: &Arc<V>, now: Instant) -> Option<Duration> {
        Some(v.until().saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _: &[u8; 32],
        v: &Arc<V>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.until().saturating_duration_since(now))
    }
}

/// A cache of entries that live as long as they say, and that logouts can
/// drop.
fn lasting<V: Lasts + Send + Sync + 'static>(max_entries: u64) -> Cache<[u8; 32], Arc<V>> {
    Cache::builder()
        .max_capacity(max_entries)
        .expire_after(Until)
        .support_invalidation_closures()
        .build()
}

/// How long before its expiry a token of `lifetime` is exchanged again: a
/// quarter of its life, at most 30 s, so a request never leaves with a
/// token about to lapse on the way.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(30))
}

/// A cache key: SHA-256 over length-prefixed parts.
fn key(parts: &[&str]) -> [u8; 32] {
    let mut k = crate::CacheKey::default();
    for p in parts {
        k.part(p.as_bytes());
    }
    k.finish()
}

/// Who exchanges: the provider, and the metrics that count it.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    pub provider: &'a Provider,
    pub metrics: &'a AuthMetrics,
}

/// What one upstream asks for: its audience, and scopes if any.
pub struct Target<'a> {
    pub audience: &'a str,
    /// Space-separated, as sent; empty for none.
    pub scopes: &'a str,
}

impl Exchanges {
    pub fn new(max_entries: u64, max_lifetime: Duration) -> Exchanges {
        Exchanges {
            cache: lasting(max_entries),
            newest: lasting(max_entries),
            paused: std::sync::Mutex::new(None),
            max_lifetime,
        }
    }

    /// The token for `caller`'s request to `target`: exchanged from
    /// `subject_token` (the caller's own), or, with none (the gateway's own
    /// request for the caller's session), the newest exchange for them.
    pub async fn token(
        &self,
        asker: Asker<'_>,
        caller: &Identity,
        subject_token: Option<&str>,
        target: &Target<'_>,
    ) -> Result<Arc<Exchanged>, ExchangeError> {
        match subject_token {
            Some(token) => self.for_token(asker, caller, token, target).await,
            None => self.for_subject(asker, caller, target).await,
        }
    }

    async fn for_token(
        &self,
        asker: Asker<'_>,
        caller: &Identity,
        token: &str,
        target: &Target<'_>,
    ) -> Result<Arc<Exchanged>, ExchangeError> {
        let k = key(&[token, target.audience, target.scopes]);
        if let Some(hit) = self.cache.get(&k).await
            && Instant::now() < hit.refresh_at
        {
            asker.metrics.exchange_cache(CacheOutcome::Hit).inc();
            return Ok(hit);
        }
        // Calls for one key run one after the other: the first exchanges,
        // the others find its token.
        let ran = AtomicBool::new(false);
        let computed = self
            .cache
            .entry(k)
            .and_try_compute_with(|current| async {
                let current = current.map(|e| e.into_value());
                if current
                    .as_ref()
                    .is_some_and(|c| Instant::now() < c.refresh_at)
                {
                    return Ok(Op::Nop);
                }
                ran.store(true, Ordering::Relaxed);
                match self.call(asker, caller, token, target).await {
                    Ok(made) => {
                        self.remember(caller, token, target, &made).await;
                        Ok(Op::Put(made))
                    }
                    // The provider is down, and the token held is still
                    // valid (within its margin): it serves meanwhile.
                    Err(ExchangeError::Unavailable { .. })
                        if current.as_ref().is_some_and(|c| Instant::now() < c.expires) =>
                    {
                        Ok(Op::Nop)
                    }
                    Err(e) => Err(e),
                }
            })
            .await;
        let outcome = if ran.load(Ordering::Relaxed) {
            CacheOutcome::Miss
        } else {
            CacheOutcome::Coalesced
        };
        asker.metrics.exchange_cache(outcome).inc();
        match computed? {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Ok(e.into_value())
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(ExchangeError::Refused(
                "the exchanged token was dropped as it was made (a logout?)".into(),
            )),
        }
    }

    /// Keeps `made` as the newest exchange for the caller's subject, unless
    /// a newer one is kept already.
    async fn remember(
        &self,
        caller: &Identity,
        token: &str,
        target: &Target<'_>,
        made: &Arc<Exchanged>,
    ) {
        let newest = Arc::new(Newest {
            exchanged: made.clone(),
            subject_token: token.to_owned(),
            holder: caller.clone(),
        });
        let n = key(&[&caller.subject, target.audience, target.scopes]);
        self.newest
            .entry(n)
            .and_compute_with(|current| async move {
                match current {
                    Some(c) if c.value().exchanged.expires >= newest.exchanged.expires => Op::Nop,
                    _ => Op::Put(newest),
                }
            })
            .await;
    }

    async fn for_subject(
        &self,
        asker: Asker<'_>,
        caller: &Identity,
        target: &Target<'_>,
    ) -> Result<Arc<Exchanged>, ExchangeError> {
        let none = || ExchangeError::NoToken {
            subject: crate::untrusted(&caller.subject, crate::SHOWN_CHARS),
        };
        let n = key(&[&caller.subject, target.audience, target.scopes]);
        let newest = self.newest.get(&n).await.ok_or_else(none)?;
        let now = Instant::now();
        if now < newest.exchanged.refresh_at {
            asker.metrics.exchange_cache(CacheOutcome::Hit).inc();
            return Ok(newest.exchanged.clone());
        }
        // Renewed from the subject's newest token, as its holder (its
        // provider session: a logout of that session drops the renewal).
        let renewable = newest
            .subject_expires()
            .is_some_and(|at| at > now + refresh_margin(self.max_lifetime));
        let renewed = if renewable {
            self.for_token(asker, &newest.holder, &newest.subject_token, target)
                .await
        } else {
            Err(none())
        };
        match renewed {
            Ok(fresh) => Ok(fresh),
            // Still valid, if near its end: better than nothing.
            Err(_) if now < newest.exchanged.expires => Ok(newest.exchanged.clone()),
            Err(e) => Err(e),
        }
    }

    /// One exchange at the provider, unless it failed just now.
    async fn call(
        &self,
        asker: Asker<'_>,
        caller: &Identity,
        token: &str,
        target: &Target<'_>,
    ) -> Result<Arc<Exchanged>, ExchangeError> {
        if caller
            .expires_at
            .is_some_and(|exp| exp <= SystemTime::now())
        {
            return Err(ExchangeError::Expired);
        }
        if let Some((until, why)) = self.paused() {
            asker.metrics.exchanges.with_label_values(&["paused"]).inc();
            return Err(ExchangeError::Unavailable {
                reason: why,
                retry_after: until.saturating_duration_since(Instant::now()),
            });
        }
        let asked = Instant::now();
        match asker
            .provider
            .exchange(token, target.audience, target.scopes)
            .await
        {
            Ok(issued) => {
                asker.metrics.exchanges.with_label_values(&["ok"]).inc();
                // As the provider says; else as the token says; else short.
                let lifetime = issued
                    .expires_in
                    .map(Duration::from_secs)
                    .or_else(|| crate::claims::unverified_lifetime(&issued.access_token))
                    .unwrap_or(UNSAID_LIFETIME)
                    .min(self.max_lifetime);
                let mut bearer = HeaderValue::from_str(&format!("Bearer {}", issued.access_token))
                    .map_err(|_| {
                        ExchangeError::Refused(
                            "the provider issued a token that cannot be a header value".into(),
                        )
                    })?;
                bearer.set_sensitive(true);
                // Counted from when it was asked for: the token's clock
                // started at the provider before the answer came.
                let expires = asked + lifetime;
                Ok(Arc::new(Exchanged {
                    bearer,
                    expires,
                    refresh_at: expires - refresh_margin(lifetime),
                    subject: caller.subject.clone(),
                    session: caller.session_id.clone(),
                    made: SystemTime::now() - asked.elapsed(),
                }))
            }
            Err(ExchangeFailure::Refused(why)) => {
                asker
                    .metrics
                    .exchanges
                    .with_label_values(&["refused"])
                    .inc();
                tracing::warn!(audience = %target.audience, subject = %caller.subject, error = %why, "token exchange refused");
                Err(ExchangeError::Refused(why))
            }
            Err(ExchangeFailure::Unavailable(why)) => {
                asker
                    .metrics
                    .exchanges
                    .with_label_values(&["unavailable"])
                    .inc();
                tracing::warn!(audience = %target.audience, error = %why, "token exchange failed; new exchanges pause");
                *self.paused.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now() + PAUSE, why.clone()));
                Err(ExchangeError::Unavailable {
                    reason: why,
                    retry_after: PAUSE,
                })
            }
        }
    }

    fn paused(&self) -> Option<(Instant, String)> {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        match paused.as_ref() {
            Some((until, _)) if *until <= Instant::now() => {
                *paused = None;
                None
            }
            other => other.cloned(),
        }
    }

    /// Drops the exchanges of a logged-out session, or subject; returns
    /// how many exchanged tokens it dropped.
    pub fn revoke(&self, event: &LogoutEvent) -> usize {
        let (sid, sub) = (event.sid.clone(), event.sub.clone());
        let ended = Arc::new(move |e: &Exchanged| match (&sid, &sub) {
            (Some(sid), _) => e.session.as_deref() == Some(sid.as_str()),
            (None, Some(sub)) => e.subject == *sub,
            (None, None) => false,
        });
        let dropped = self.cache.iter().filter(|(_, v)| ended(v)).count();
        let of_newest = ended.clone();
        let _ = self.cache.invalidate_entries_if(move |_, v| ended(v));
        let _ = self
            .newest
            .invalidate_entries_if(move |_, v| of_newest(&v.exchanged));
        dropped
    }
}

/// When a wall-clock time is, on the monotonic clock (`None`: past).
fn instant_of(at: SystemTime) -> Option<Instant> {
    at.duration_since(SystemTime::now())
        .ok()
        .map(|left| Instant::now() + left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FORBIDDEN_AUDIENCE, FakeIdp};
    use crate::{AuthMode, Validator};
    use serde_json::json;

    const UPSTREAM: Target<'static> = Target {
        audience: "upstream-1",
        scopes: "",
    };

    async fn caller(v: &Validator, token: &str) -> Identity {
        (*v.validate(token, AuthMode::Jwt).await.expect("valid")).clone()
    }

    fn claims_of(e: &Exchanged) -> serde_json::Value {
        let bearer = e.bearer.to_str().expect("ascii");
        crate::testing::unverified_claims(bearer.trim_start_matches("Bearer "))
    }

    fn results(v: &Validator, result: &str) -> u64 {
        v.metrics().exchanges.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn concurrent_exchanges_for_one_token_make_one_call_then_hit_the_cache() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        let token = idp.token(json!({}));
        let alice = caller(&v, &token).await;
        let mut asks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (v, alice, token) = (v.clone(), alice.clone(), token.clone());
            asks.spawn(async move { v.exchange(&alice, Some(&token), &UPSTREAM).await });
        }
        let got = asks.join_all().await;
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), 1);
        let first = got[0].as_ref().expect("exchanged");
        assert!(first.bearer.is_sensitive());
        let claims = claims_of(first);
        assert_eq!(
            (claims["aud"].as_str(), claims["sub"].as_str()),
            (Some("upstream-1"), Some("user-1"))
        );
        for g in &got {
            assert_eq!(g.as_ref().expect("exchanged").bearer, first.bearer);
        }
        v.exchange(&alice, Some(&token), &UPSTREAM)
            .await
            .expect("cached");
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), 1);
        let outcome = |o| {
            v.metrics()
                .exchange_cache_outcomes
                .with_label_values(&[o])
                .get()
        };
        assert_eq!(
            (outcome("miss"), outcome("coalesced") + outcome("hit")),
            (1, 20)
        );
        // Another audience is another token.
        let other = Target {
            audience: "upstream-2",
            scopes: "",
        };
        let second = v
            .exchange(&alice, Some(&token), &other)
            .await
            .expect("exchanged");
        assert_eq!(claims_of(&second)["aud"], "upstream-2");
        assert_eq!(
            (idp.exchanges.load(Ordering::SeqCst), results(&v, "ok")),
            (2, 2)
        );
    }

    #[tokio::test]
    async fn a_refusal_is_not_cached_and_says_what_the_provider_said() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        let token = idp.token(json!({}));
        let alice = caller(&v, &token).await;
        let forbidden = Target {
            audience: FORBIDDEN_AUDIENCE,
            scopes: "",
        };
        for _ in 0..2 {
            match v.exchange(&alice, Some(&token), &forbidden).await {
                Err(ExchangeError::Refused(why)) => assert!(
                    why.contains("invalid_request: Requested audience not available"),
                    "{why}"
                ),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(results(&v, "refused"), 2);
    }

    #[tokio::test]
    async fn a_logout_drops_the_sessions_exchanges() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        let token = idp.token(json!({"sid": "s-1"}));
        let alice = caller(&v, &token).await;
        v.exchange(&alice, Some(&token), &UPSTREAM)
            .await
            .expect("exchanged");
        // Another session's logout leaves it.
        v.revoke(&LogoutEvent {
            sid: Some("s-2".into()),
            sub: None,
            issued_at: None,
        });
        v.exchange(&alice, None, &UPSTREAM)
            .await
            .expect("still there");
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), 1);
        v.revoke(&LogoutEvent {
            sid: Some("s-1".into()),
            sub: None,
            issued_at: None,
        });
        assert_eq!(v.metrics().exchanges_dropped.get(), 1);
        assert!(matches!(
            v.exchange(&alice, None, &UPSTREAM).await,
            Err(ExchangeError::NoToken { .. })
        ));
        // The logged-out token itself gets nothing (the gateway refuses it
        // at the door anyway).
        assert!(matches!(
            v.exchange(&alice, Some(&token), &UPSTREAM).await,
            Err(ExchangeError::LoggedOut)
        ));
    }

    #[tokio::test]
    async fn provider_down_cached_exchanges_serve_and_new_ones_fail_fast_with_a_wait() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        let cached = idp.token(json!({"sub": "user-1"}));
        let unseen = idp.token(json!({"sub": "user-2", "sid": "s-2"}));
        let alice = caller(&v, &cached).await;
        let bob = caller(&v, &unseen).await;
        v.exchange(&alice, Some(&cached), &UPSTREAM)
            .await
            .expect("exchanged");
        idp.down.store(true, Ordering::SeqCst);
        v.exchange(&alice, Some(&cached), &UPSTREAM)
            .await
            .expect("cached");
        match v.exchange(&bob, Some(&unseen), &UPSTREAM).await {
            Err(ExchangeError::Unavailable { retry_after, .. }) => assert_eq!(retry_after, PAUSE),
            other => panic!("expected unavailable, got {other:?}"),
        }
        let started = Instant::now();
        match v.exchange(&bob, Some(&unseen), &UPSTREAM).await {
            Err(ExchangeError::Unavailable { retry_after, .. }) => assert!(retry_after <= PAUSE),
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "the pause answers at once"
        );
        assert_eq!((results(&v, "unavailable"), results(&v, "paused")), (1, 1));
    }

    #[tokio::test]
    async fn the_gateways_own_requests_get_the_newest_exchange_renewed_before_it_lapses() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        // Lives 2 s: renewed from 1.5 s on.
        idp.exchange_lifetime.store(2, Ordering::SeqCst);
        let token = idp.token(json!({"sid": "s-1"}));
        let alice = caller(&v, &token).await;
        // The gateway's own requests know the subject only (as a session's
        // background stream does).
        let mut background = Identity::anonymous("org-1");
        background.subject.clone_from(&alice.subject);
        assert!(matches!(
            v.exchange(&background, None, &UPSTREAM).await,
            Err(ExchangeError::NoToken { .. })
        ));
        let made = v
            .exchange(&alice, Some(&token), &UPSTREAM)
            .await
            .expect("exchanged");
        let again = v
            .exchange(&background, None, &UPSTREAM)
            .await
            .expect("newest");
        assert_eq!(again.bearer, made.bearer);
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), 1);
        // Past its refresh time, exchanged again from the subject's token,
        // for its provider session.
        tokio::time::sleep_until((made.refresh_at + Duration::from_millis(50)).into()).await;
        let renewed = v
            .exchange(&background, None, &UPSTREAM)
            .await
            .expect("renewed");
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), 2);
        assert_ne!(renewed.bearer, made.bearer);
        assert_eq!(renewed.session.as_deref(), Some("s-1"));
        // So that session's logout drops the renewal too.
        v.revoke(&LogoutEvent {
            sid: Some("s-1".into()),
            sub: None,
            issued_at: None,
        });
        assert!(v.exchange(&background, None, &UPSTREAM).await.is_err());
    }

    #[tokio::test]
    async fn provider_down_a_token_in_its_renewal_margin_serves_until_it_expires() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        // Lives 4 s: renewed from 3 s on.
        idp.exchange_lifetime.store(4, Ordering::SeqCst);
        let token = idp.token(json!({}));
        let alice = caller(&v, &token).await;
        let made = v
            .exchange(&alice, Some(&token), &UPSTREAM)
            .await
            .expect("exchanged");
        idp.down.store(true, Ordering::SeqCst);
        tokio::time::sleep_until((made.refresh_at + Duration::from_millis(50)).into()).await;
        let kept = v
            .exchange(&alice, Some(&token), &UPSTREAM)
            .await
            .expect("still valid: served");
        assert_eq!(kept.bearer, made.bearer);
        assert_eq!(results(&v, "unavailable"), 1, "a renewal was tried");
    }

    #[tokio::test]
    async fn an_exchange_for_a_logged_out_session_or_an_expired_token_is_not_used() {
        let idp = FakeIdp::start().await;
        let v = Validator::new(idp.config(), &prometheus::Registry::new()).expect("validator");
        let token = idp.token(json!({"sid": "s-9"}));
        let alice = caller(&v, &token).await;
        // The logout came while the exchange was under way: what it made
        // is refused even though the logout could not drop it.
        v.revoke(&LogoutEvent {
            sid: Some("s-9".into()),
            sub: None,
            issued_at: None,
        });
        assert!(matches!(
            v.exchange(&alice, Some(&token), &UPSTREAM).await,
            Err(ExchangeError::LoggedOut)
        ));
        // A token past its exp (accepted within the clock skew) is not
        // sent to the provider.
        let mut late = caller(&v, &idp.token(json!({"sid": "s-10"}))).await;
        late.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        let asked = idp.exchanges.load(Ordering::SeqCst);
        let e = v
            .exchange(&late, Some("the-late-token"), &UPSTREAM)
            .await
            .expect_err("expired");
        assert!(e.is_callers(), "{e:?}");
        assert_eq!(idp.exchanges.load(Ordering::SeqCst), asked);
    }

    #[test]
    fn the_margin_is_a_quarter_of_the_life_at_most_thirty_seconds() {
        assert_eq!(
            refresh_margin(Duration::from_secs(300)),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn keys_tell_apart_parts_that_concatenate_alike() {
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_eq!(key(&["t", "aud", ""]), key(&["t", "aud", ""]));
    }
}
