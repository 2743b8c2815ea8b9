//! The validator: token in, identity out, through a cache.
//!
//! - The cache (`moka`) is keyed by a SHA-256 of the mode and the token, so
//!   tokens are not kept in memory. A valid token is cached until
//!   min(`cache.max_ttl`, its `exp`); an invalid one for `cache.negative_ttl`;
//!   a provider failure is not cached at all.
//! - Concurrent misses for one token wait on one verification: exactly one
//!   call to the provider.
//! - Back-channel logout puts the session (`sid`) on a revocation list that
//!   every validation checks, cached or not, so a logged-out token is
//!   refused at once in every mode, even though its signature still holds.
//! - In `introspect` mode, a token that cannot be one of the realm's access
//!   tokens (not a JWT, another `iss`, long expired, not `typ: Bearer`, a
//!   bad signature by a known key) is refused without a call, and the calls
//!   that remain are bounded per lane (see [`IntrospectionLimits`]).
//!
//! [`IntrospectionLimits`]: crate::config::IntrospectionLimits

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use jsonwebtoken::Validation;
use moka::Expiry;
use moka::future::Cache;
use prometheus::Registry;
use sha2::{Digest, Sha256};

use crate::claims::{Claims, access_token_type, decode_part, peek_claims};
use crate::config::ProviderConfig;
use crate::exchange::{Asker, ExchangeError, Exchanged, Exchanges, Target};
use crate::logout::{self, LogoutEvent};
use crate::metrics::{AuthMetrics, CacheOutcome, Outcome, Precheck};
use crate::provider::{KeyError, Provider};
use crate::ratelog::LogEvery;
use crate::throttle::{Refused, Throttle};
use crate::{AuthError, AuthMode, Identity, SHOWN_CHARS, untrusted};

/// What the cache remembers about a token.
#[derive(Clone)]
enum Verdict {
    Valid(Arc<Identity>),
    Invalid(Arc<str>),
}

struct VerdictExpiry {
    max_ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<[u8; 32], Verdict> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Verdict,
        _now: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Verdict::Valid(id) => id
                .expires_at
                .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
                .map_or(self.max_ttl, |left| left.min(self.max_ttl)),
            Verdict::Invalid(_) => self.negative_ttl,
        })
    }
}

/// Sessions and subjects that logged out, until their tokens expire.
#[derive(Default)]
struct Revocations {
    /// `sid` → until when it stays listed.
    sessions: DashMap<String, Instant>,
    /// `sub` → (logged out at, listed until): tokens issued before the
    /// logout are refused; later logins are not.
    subjects: DashMap<String, (SystemTime, Instant)>,
}

/// The introspection lane a token waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Its signature verified against a key the realm publishes.
    Verified,
    /// It could not be checked locally (HMAC, a key not fetched yet).
    Unverified,
}

impl Lane {
    fn as_str(self) -> &'static str {
        match self {
            Lane::Verified => "verified",
            Lane::Unverified => "unverified",
        }
    }
}

pub struct Validator {
    provider: Provider,
    /// Ids of logout tokens already accepted, against replays.
    logout_ids: DashMap<String, SystemTime>,
    cache: Cache<[u8; 32], Verdict>,
    revocations: Revocations,
    metrics: AuthMetrics,
    verified_calls: Throttle,
    unverified_calls: Throttle,
    /// Anyone can post a bad logout token: their refusals are logged sparsely.
    logout_refusals: LogEvery,
    /// Tokens exchanged for upstreams (`upstream.auth: token-exchange`).
    exchanges: Exchanges,
}

impl Validator {
    pub fn new(config: ProviderConfig, registry: &Registry) -> Result<Arc<Validator>, BuildError> {
        let metrics = AuthMetrics::register(registry)?;
        let cache = Cache::builder()
            .max_capacity(config.cache.max_entries)
            .expire_after(VerdictExpiry {
                max_ttl: config.cache.max_ttl,
                negative_ttl: config.cache.negative_ttl,
            })
            .support_invalidation_closures()
            .build();
        let limits = &config.introspection;
        let verified_calls = Throttle::new(&limits.verified, limits.max_wait);
        let unverified_calls = Throttle::new(&limits.unverified, limits.max_wait);
        let exchanges = Exchanges::new(config.cache.max_entries, config.max_token_lifetime);
        Ok(Arc::new(Validator {
            provider: Provider::new(config, metrics.clone())?,
            logout_ids: DashMap::new(),
            cache,
            revocations: Revocations::default(),
            metrics,
            verified_calls,
            unverified_calls,
            logout_refusals: LogEvery::default(),
            exchanges,
        }))
    }

    /// A token for `caller`'s request to an upstream (`target`), exchanged
    /// from `subject_token` (see [`crate::exchange`]). Boxed: the cache's
    /// per-key computation is a deep type that would otherwise weigh on
    /// every future that awaits an upstream request.
    pub fn exchange<'a>(
        &'a self,
        caller: &'a Identity,
        subject_token: Option<&'a str>,
        target: &'a Target<'a>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Arc<Exchanged>, ExchangeError>> + Send + 'a>>
    {
        Box::pin(self.exchange_inner(caller, subject_token, target))
    }

    async fn exchange_inner(
        &self,
        caller: &Identity,
        subject_token: Option<&str>,
        target: &Target<'_>,
    ) -> Result<Arc<Exchanged>, ExchangeError> {
        let asker = Asker {
            provider: &self.provider,
            metrics: &self.metrics,
        };
        let exchanged = self
            .exchanges
            .token(asker, caller, subject_token, target)
            .await?;
        // One made while its session logged out is not used (the logout
        // dropped only what was held when it came).
        match self.logged_out(
            exchanged.session.as_deref(),
            &exchanged.subject,
            Some(exchanged.made),
        ) {
            Some(_) => Err(ExchangeError::LoggedOut),
            None => Ok(exchanged),
        }
    }

    #[cfg(test)]
    pub(crate) fn metrics(&self) -> &AuthMetrics {
        &self.metrics
    }

    pub fn config(&self) -> &ProviderConfig {
        self.provider.config()
    }

    /// Discovers the provider and fetches its signing keys now; a failure is
    /// logged and retried on demand later.
    pub async fn warm_up(&self) {
        match self.provider.prefetch().await {
            Ok(()) => {
                tracing::info!(issuer = %self.config().issuer, "identity provider reachable; signing keys loaded")
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config().issuer, error = %e, "identity provider not reachable yet; will retry on demand")
            }
        }
    }

    /// Validates a bearer token in the given mode.
    /// What every entry point checks: the bearer token of an
    /// `Authorization` header, validated in `mode`, of a member of `org`
    /// with every scope in `scopes`.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        mode: AuthMode,
        org: &str,
        scopes: &[String],
    ) -> Result<Arc<Identity>, AuthError> {
        let token = crate::bearer_token(authorization, self.config().max_token_bytes)?;
        let identity = self.validate(token, mode).await?;
        identity.authorize(org, scopes)?;
        Ok(identity)
    }

    pub async fn validate(&self, token: &str, mode: AuthMode) -> Result<Arc<Identity>, AuthError> {
        // Every provider call is bounded; this bounds their sum (discovery,
        // keys, introspection, and any wait behind another request's call
        // or for an introspection slot).
        let budget = self.config().timeout * 3 + self.config().introspection.max_wait;
        let result = tokio::time::timeout(budget, self.validate_inner(token, mode))
            .await
            .unwrap_or_else(|_| {
                Err(AuthError::Unavailable(format!(
                    "no answer from the identity provider within {budget:?}"
                )))
            });
        let outcome = match &result {
            Ok(_) => Outcome::Valid,
            Err(AuthError::Unavailable(_)) => Outcome::Unavailable,
            Err(AuthError::Busy(_)) => Outcome::Busy,
            Err(AuthError::InvalidToken(why)) if why.starts_with(LOGGED_OUT) => Outcome::Revoked,
            Err(_) => Outcome::Invalid,
        };
        self.metrics.validation(mode, outcome).inc();
        result
    }

    async fn validate_inner(
        &self,
        token: &str,
        mode: AuthMode,
    ) -> Result<Arc<Identity>, AuthError> {
        if mode == AuthMode::None {
            return Err(AuthError::InvalidToken(
                "this route does not validate tokens".into(),
            ));
        }
        let verdict = if self.config().cache.enabled {
            let key = cache_key(mode, token);
            match self.cache.get(&key).await {
                Some(v) => {
                    self.cache_outcome(CacheOutcome::Hit);
                    v
                }
                None => {
                    // Boxed: verifying is the rare path, and its future is
                    // large; inline, every cached look-up's future (and each
                    // holding it) would be as large to move.
                    let verify = self
                        .cache
                        .entry(key)
                        .or_try_insert_with(self.verify(token, mode));
                    let entry = Box::pin(verify)
                        .await
                        .map_err(|e: Arc<AuthError>| (*e).clone())?;
                    let outcome = if entry.is_fresh() {
                        CacheOutcome::Miss
                    } else {
                        CacheOutcome::Coalesced
                    };
                    self.cache_outcome(outcome);
                    entry.into_value()
                }
            }
        } else {
            self.verify(token, mode).await?
        };
        match verdict {
            Verdict::Invalid(why) => Err(AuthError::InvalidToken(why.to_string())),
            Verdict::Valid(identity) => {
                self.check_live(&identity)?;
                Ok(identity)
            }
        }
    }

    /// Counts a cache outcome, and gives it to the span of the check (its
    /// `cache` field, where the caller's span has one: a trace's).
    fn cache_outcome(&self, outcome: CacheOutcome) {
        self.metrics.cache_outcome(outcome).inc();
        tracing::Span::current().record("cache", outcome.as_str());
    }

    /// What the cache cannot know: time passing, and logouts since.
    fn check_live(&self, id: &Identity) -> Result<(), AuthError> {
        let skew = self.config().clock_skew;
        if let Some(exp) = id.expires_at
            && exp.checked_add(skew).is_some_and(|t| t < SystemTime::now())
        {
            return Err(AuthError::InvalidToken("the token has expired".into()));
        }
        match self.logged_out(id.session_id.as_deref(), &id.subject, id.issued_at) {
            Some(what) => Err(AuthError::InvalidToken(format!("{LOGGED_OUT} ({what})"))),
            None => Ok(()),
        }
    }

    /// Whether a token of provider session `sid`, of `subject`, issued at
    /// `issued` has been logged out, and how.
    fn logged_out(
        &self,
        sid: Option<&str>,
        subject: &str,
        issued: Option<SystemTime>,
    ) -> Option<&'static str> {
        if sid.is_some_and(|sid| self.revocations.sessions.contains_key(sid)) {
            return Some("session ended");
        }
        if let Some(entry) = self.revocations.subjects.get(subject) {
            let (at, _) = *entry;
            if issued.is_none_or(|iat| iat <= at) {
                return Some("user logged out");
            }
        }
        None
    }

    /// Verifies a token with the provider's keys or the provider itself.
    /// `Err` only when the provider could not be asked.
    async fn verify(&self, token: &str, mode: AuthMode) -> Result<Verdict, AuthError> {
        let verdict = match mode {
            AuthMode::None => Verdict::Invalid("this route does not validate tokens".into()),
            AuthMode::Jwt => self.verify_jwt(token).await?,
            AuthMode::Introspect => match self.precheck(token).await {
                Ok(lane) => self.verify_introspect(token, lane).await?,
                Err(refused) => refused,
            },
            AuthMode::JwtIntrospect => match self.verify_jwt(token).await? {
                Verdict::Valid(_) => self.verify_introspect(token, Lane::Verified).await?,
                invalid => invalid,
            },
        };
        Ok(verdict)
    }

    async fn verify_jwt(&self, token: &str) -> Result<Verdict, AuthError> {
        let config = self.config();
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(e) => {
                return Ok(invalid(format!(
                    "not a JWT: {}",
                    untrusted(&e.to_string(), 120)
                )));
            }
        };
        let Some(kid) = header.kid.as_deref() else {
            return Ok(invalid("the JWT header has no `kid`"));
        };
        let key = match self.provider.signing_key(kid).await {
            Ok(k) => k,
            Err(KeyError::Unavailable(why)) => return Err(AuthError::Unavailable(why)),
            Err(e @ KeyError::UnknownKid(_)) => return Ok(invalid(e.to_string())),
            // Refused now, but not cached: the key may have just rotated in.
            Err(e @ KeyError::NotYetKnown(_)) => {
                return Err(AuthError::InvalidToken(e.to_string()));
            }
        };
        if header.alg != key.algorithm {
            return Ok(invalid(format!(
                "the JWT says alg {:?}, its key is for {:?}",
                header.alg, key.algorithm
            )));
        }
        let mut v = Validation::new(key.algorithm);
        v.set_issuer(&[config.issuer.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        // Checked below, after the kind of token: an ID token is refused as
        // that, not for its audience (the client's id).
        v.validate_aud = false;
        v.leeway = config.clock_skew.as_secs();
        v.validate_nbf = true;
        let claims = match jsonwebtoken::decode::<Claims>(token, &key.key, &v) {
            Ok(data) => data.claims,
            Err(e) => return Ok(invalid(jwt_error(&e, config))),
        };
        Ok(access_verdict(&claims, config))
    }

    /// What `introspect` mode can learn without a call. Keycloak issues
    /// access tokens as JWTs only (lightweight ones too, which keep `iss`,
    /// `exp` and `typ`), signed with one of the realm's keys: a token that
    /// is no JWT, names another issuer, expired, is not `typ: Bearer`, or
    /// does not verify against the realm's key it names is refused here.
    /// `Ok` is the lane that the call waits in.
    async fn precheck(&self, token: &str) -> Result<Lane, Verdict> {
        let config = self.config();
        let refuse = |reason: Precheck, why: String| {
            self.metrics.precheck(reason).inc();
            invalid(why)
        };
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(refuse(
                Precheck::NotJwt,
                "not a JWT (header.payload.signature); the realm's access tokens are JWTs".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            refuse(
                Precheck::NotJwt,
                format!("not a JWT: {}", untrusted(&e.to_string(), 120)),
            )
        })?;
        let Some(kid) = header.kid.as_deref() else {
            return Err(refuse(
                Precheck::NotJwt,
                "the JWT header has no `kid`".into(),
            ));
        };
        let peek = peek_claims(parts[1]).ok_or_else(|| {
            refuse(
                Precheck::NotJwt,
                "the JWT payload is not a JSON object with string `iss` and `typ` and numeric `exp`"
                    .into(),
            )
        })?;
        if peek.iss.as_deref() != Some(config.issuer.as_str()) {
            return Err(refuse(
                Precheck::Claims,
                format!(
                    "the token was issued by `{}`, not `{}`",
                    untrusted(peek.iss.as_deref().unwrap_or(""), SHOWN_CHARS),
                    config.issuer
                ),
            ));
        }
        access_token_type(peek.typ.as_deref()).map_err(|why| refuse(Precheck::Claims, why))?;
        let now = unix_now() as f64;
        match peek.exp {
            None => {
                return Err(refuse(
                    Precheck::Claims,
                    "the token lacks the `exp` claim".into(),
                ));
            }
            Some(exp) if exp + (config.clock_skew.as_secs() as f64) < now => {
                return Err(refuse(Precheck::Claims, "the token has expired".into()));
            }
            Some(_) => {}
        }
        // The realm's HMAC keys are secret: such tokens only the provider
        // can check.
        if matches!(
            header.alg,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        ) {
            return Ok(Lane::Unverified);
        }
        let key = match self.provider.signing_key(kid).await {
            Ok(key) => key,
            Err(e @ KeyError::UnknownKid(_)) => {
                return Err(refuse(Precheck::Signature, e.to_string()));
            }
            // A key that rotated in since the last fetch, or keys that
            // cannot be fetched now: the provider decides, in the lane that
            // junk can fill without harming verified tokens.
            Err(KeyError::NotYetKnown(_) | KeyError::Unavailable(_)) => {
                return Ok(Lane::Unverified);
            }
        };
        if header.alg != key.algorithm {
            return Err(refuse(
                Precheck::Signature,
                format!(
                    "the JWT says alg {:?}, its key is for {:?}",
                    header.alg, key.algorithm
                ),
            ));
        }
        let (message, signature) = token.rsplit_once('.').unwrap_or((token, ""));
        match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.key, key.algorithm) {
            Ok(true) => Ok(Lane::Verified),
            _ => Err(refuse(
                Precheck::Signature,
                "the token's signature does not verify".into(),
            )),
        }
    }

    async fn verify_introspect(&self, token: &str, lane: Lane) -> Result<Verdict, AuthError> {
        let config = self.config();
        let throttle = match lane {
            Lane::Verified => &self.verified_calls,
            Lane::Unverified => &self.unverified_calls,
        };
        let permit = throttle.admit().await.map_err(|refused| {
            self.metrics
                .introspections_throttled
                .with_label_values(&[lane.as_str(), refused.as_str()])
                .inc();
            AuthError::Busy(format!(
                "identity.introspection.{} is at its {} limit",
                lane.as_str(),
                match refused {
                    Refused::Rate => "per_second",
                    Refused::Concurrency => "max_concurrent",
                }
            ))
        })?;
        let answer = self.provider.introspect(token).await;
        drop(permit);
        let mut claims = answer.map_err(|e| AuthError::Unavailable(e.0))?;
        if claims.active != Some(true) {
            return Ok(invalid(
                "the identity provider says the token is not active (expired, revoked, or not its own)",
            ));
        }
        if claims.organization.is_none() {
            claims.organization = organization_from_payload(token, claims.sub.as_deref());
        }
        if let Some(iss) = &claims.iss
            && iss != &config.issuer
        {
            return Ok(invalid(format!(
                "the token was issued by `{}`, not `{}`",
                untrusted(iss, SHOWN_CHARS),
                config.issuer
            )));
        }
        Ok(access_verdict(&claims, config))
    }

    /// Handles a back-channel logout request body
    /// (`application/x-www-form-urlencoded` with `logout_token`): verifies
    /// the token, then revokes its session at once.
    pub async fn backchannel_logout(
        &self,
        form: &[u8],
    ) -> Result<LogoutEvent, logout::LogoutError> {
        let result = logout::verify(&self.provider, &self.logout_ids, form).await;
        match &result {
            Ok(event) => {
                self.metrics.logouts.with_label_values(&["accepted"]).inc();
                self.revoke(event);
            }
            Err(e) => {
                self.metrics.logouts.with_label_values(&["rejected"]).inc();
                match self.logout_refusals.ready() {
                    Some(suppressed) => {
                        tracing::warn!(error = %e, suppressed, "back-channel logout refused")
                    }
                    None => tracing::debug!(error = %e, "back-channel logout refused"),
                }
            }
        }
        result
    }

    /// Refuses, from now on, every token of a logged-out session (or, when
    /// only the subject is known, every token the subject held), and drops
    /// them from the cache.
    pub fn revoke(&self, event: &LogoutEvent) {
        let until = Instant::now() + self.config().max_token_lifetime;
        self.sweep_revocations();
        match (&event.sid, &event.sub) {
            (Some(sid), _) => {
                self.revocations.sessions.insert(sid.clone(), until);
                let sid = sid.clone();
                let _ = self.cache.invalidate_entries_if(move |_, v| {
                    matches!(v, Verdict::Valid(id) if id.session_id.as_deref() == Some(sid.as_str()))
                });
            }
            (None, Some(sub)) => {
                // Tokens issued up to the logout are refused; the logout's
                // own time, not ours, draws the line.
                let at = event.issued_at.unwrap_or_else(SystemTime::now);
                self.revocations.subjects.insert(sub.clone(), (at, until));
                let sub = sub.clone();
                let _ = self.cache.invalidate_entries_if(
                    move |_, v| matches!(v, Verdict::Valid(id) if id.subject == sub),
                );
            }
            (None, None) => {}
        }
        let dropped = self.exchanges.revoke(event);
        self.metrics.exchanges_dropped.inc_by(dropped as u64);
        self.metrics
            .revoked
            .set((self.revocations.sessions.len() + self.revocations.subjects.len()) as i64);
        tracing::info!(sid = ?event.sid, sub = ?event.sub, exchanged_tokens_dropped = dropped, "session logged out: its tokens are refused from now on");
    }

    fn sweep_revocations(&self) {
        let now = Instant::now();
        self.revocations.sessions.retain(|_, until| *until > now);
        self.revocations
            .subjects
            .retain(|_, (_, until)| *until > now);
    }
}

const LOGGED_OUT: &str = "the token's session was logged out";

/// Keycloak leaves the `organization` claim out of introspection answers
/// for tokens issued with a dynamic scope (`organization:*`,
/// `organization:<alias>`). The token itself carries it; once the provider
/// has said this very token is active (so its signature held), its payload
/// can be read for the claim. Only a payload about the same subject counts.
fn organization_from_payload(token: &str, subject: Option<&str>) -> Option<serde_json::Value> {
    let bytes = decode_part(token.split('.').nth(1)?)?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    (claims.sub.is_some() && claims.sub.as_deref() == subject)
        .then_some(claims.organization)
        .flatten()
}

/// The checks both modes make of a token's claims once its signature (or
/// the identity provider) vouched for them: an access token, for us, naming
/// its user.
fn access_verdict(claims: &Claims, config: &ProviderConfig) -> Verdict {
    if let Err(why) = access_token_type(claims.typ.as_deref()) {
        return invalid(why);
    }
    if !claims.aud.iter().any(|a| a == &config.audience) {
        return invalid(not_for_us(&claims.aud, config));
    }
    match claims.identity() {
        Ok(id) => Verdict::Valid(Arc::new(id)),
        Err(why) => invalid(why),
    }
}

fn not_for_us(audience: &[String], config: &ProviderConfig) -> String {
    format!(
        "the token is not for this gateway: its audience [{}] lacks `{}`",
        untrusted(&audience.join(", "), SHOWN_CHARS),
        config.audience
    )
}

fn invalid(why: impl Into<String>) -> Verdict {
    Verdict::Invalid(Arc::from(why.into()))
}

fn cache_key(mode: AuthMode, token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(mode.as_str().as_bytes());
    h.update([0]);
    h.update(token.as_bytes());
    h.finalize().into()
}

fn jwt_error(e: &jsonwebtoken::errors::Error, config: &ProviderConfig) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidAudience => format!(
            "the token is not for this gateway: its audience lacks `{}`",
            config.audience
        ),
        ErrorKind::InvalidIssuer => format!("the token was not issued by `{}`", config.issuer),
        ErrorKind::MissingRequiredClaim(c) => format!("the token lacks the `{c}` claim"),
        _ => format!("the token does not verify: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot register auth metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Http(#[from] crate::provider::ClientError),
    #[error("{0}")]
    Config(String),
}

/// Seconds since the epoch, for claims in tests and tools.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeIdp;
    use serde_json::json;
    use std::sync::atomic::Ordering;

    fn validator(idp: &FakeIdp) -> Arc<Validator> {
        Validator::new(idp.config(), &Registry::new()).expect("validator")
    }

    fn count(v: &Validator, outcome: &str) -> u64 {
        v.metrics.cache.with_label_values(&[outcome]).get()
    }

    #[tokio::test]
    async fn a_jwts_lifetime_is_read_from_its_exp() {
        let idp = FakeIdp::start().await;
        let left = crate::claims::unverified_lifetime(&idp.token(json!({"exp": unix_now() + 100})))
            .expect("a JWT with exp");
        assert!((98..=100).contains(&left.as_secs()), "{left:?}");
        assert_eq!(
            crate::claims::unverified_lifetime(&idp.token(json!({"exp": unix_now() - 5}))),
            None
        );
        assert_eq!(crate::claims::unverified_lifetime("opaque-token"), None);
    }

    #[tokio::test]
    async fn a_good_jwt_becomes_an_identity_and_is_cached() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let token = idp.token(json!({}));
        let id = v.validate(&token, AuthMode::Jwt).await.expect("valid");
        assert_eq!(id.subject, "user-1");
        assert_eq!(id.orgs, vec!["org-1"]);
        assert!(id.has_scope("mcp:tools"));
        v.validate(&token, AuthMode::Jwt)
            .await
            .expect("valid again");
        assert_eq!((count(&v, "miss"), count(&v, "hit")), (1, 1));
    }

    #[tokio::test]
    async fn a_provider_with_a_private_ca_is_trusted_through_ca_file() {
        use crate::testing::tls::TestPki;
        let pki = TestPki::new("idp");
        pki.server("idp", &["localhost"]);
        let files = crate::tls::ListenerTls {
            cert_file: pki.dir.join("idp.pem"),
            key_file: pki.dir.join("idp.key"),
            client_ca_file: None,
            client_certs: Default::default(),
            reload_interval: Duration::from_secs(60),
        };
        let idp =
            FakeIdp::start_tls(crate::tls::ServingCerts::load("idp", &files).expect("certs")).await;
        let token = idp.token(json!({}));
        for mode in [AuthMode::Jwt, AuthMode::Introspect] {
            // The system's roots do not know the realm's CA.
            let untrusting = validator(&idp);
            match untrusting.validate(&token, mode).await {
                Err(AuthError::Unavailable(why)) => {
                    assert!(why.contains("UnknownIssuer"), "{mode:?}: {why}")
                }
                other => panic!("{mode:?}: expected Unavailable, got {other:?}"),
            }
            let mut config = idp.config();
            config.ca_file = Some(pki.ca_file());
            let trusting = Validator::new(config, &Registry::new()).expect("validator");
            let id = trusting.validate(&token, mode).await.expect("valid");
            assert_eq!(id.subject, "user-1", "{mode:?}");
        }
    }

    #[tokio::test]
    async fn bad_jwts_are_refused_for_what_they_are() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let good = idp.token(json!({}));
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 5;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let cases = [
            (String::from_utf8(flipped).expect("ascii"), "signature"),
            (idp.token(json!({"aud": "someone-else"})), "audience"),
            (idp.token(json!({"exp": unix_now() - 60})), "expired"),
            (
                idp.token(json!({"iss": "http://evil/realms/test"})),
                "issued",
            ),
            ("garbage".to_owned(), "not a JWT"),
        ];
        for (token, why) in cases {
            match v.validate(&token, AuthMode::Jwt).await {
                Err(AuthError::InvalidToken(msg)) => assert!(msg.contains(why), "{why}: {msg}"),
                other => panic!("{why}: expected InvalidToken, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn unknown_key_ids_refetch_at_most_once_per_interval() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        v.validate(&idp.token(json!({})), AuthMode::Jwt)
            .await
            .expect("valid");
        let fetched = idp.jwks_fetches.load(Ordering::SeqCst);
        for i in 0..5 {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some(format!("rotated-{i}"));
            let forged = jsonwebtoken::encode(
                &header,
                &json!({"sub": "x"}),
                &jsonwebtoken::EncodingKey::from_secret(b"k"),
            )
            .expect("encode");
            let err = v
                .validate(&forged, AuthMode::Jwt)
                .await
                .expect_err("unknown kid");
            assert!(
                matches!(err, AuthError::InvalidToken(_)) && err.to_string().contains("rotated-"),
                "{err}"
            );
        }
        assert_eq!(
            idp.jwks_fetches.load(Ordering::SeqCst),
            fetched,
            "refetches are rate-limited"
        );
    }

    #[tokio::test]
    async fn concurrent_misses_make_exactly_one_introspection() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let token = idp.token(json!({}));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (v, t) = (v.clone(), token.clone());
                tokio::spawn(async move { v.validate(&t, AuthMode::Introspect).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("joined").expect("valid");
        }
        assert_eq!(idp.introspections.load(Ordering::SeqCst), 1);
        assert_eq!(v.metrics.introspections.get(), 1);
        assert_eq!(count(&v, "miss"), 1);
        assert_eq!(
            count(&v, "miss") + count(&v, "hit") + count(&v, "coalesced"),
            200
        );
    }

    #[tokio::test]
    async fn inactive_tokens_are_cached_negatively() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let token = idp.token(json!({}));
        idp.revoked.lock().expect("lock").push(token.clone());
        for _ in 0..3 {
            let err = v
                .validate(&token, AuthMode::Introspect)
                .await
                .expect_err("inactive");
            assert!(matches!(err, AuthError::InvalidToken(_)), "{err:?}");
        }
        assert_eq!(idp.introspections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_down_provider_serves_the_cache_and_is_503_otherwise() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let known = idp.token(json!({}));
        v.validate(&known, AuthMode::Introspect)
            .await
            .expect("valid");
        idp.down.store(true, Ordering::SeqCst);
        v.validate(&known, AuthMode::Introspect)
            .await
            .expect("still served from the cache");
        let fresh = idp.token(json!({"sub": "user-2"}));
        let started = std::time::Instant::now();
        let err = v
            .validate(&fresh, AuthMode::Introspect)
            .await
            .expect_err("unavailable");
        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert_eq!(err.status(), 503);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the timeout"
        );
        // Not cached: once the provider is back, the same token is fine.
        idp.down.store(false, Ordering::SeqCst);
        v.validate(&fresh, AuthMode::Introspect)
            .await
            .expect("valid after recovery");
    }

    #[tokio::test]
    async fn garbage_from_the_provider_is_unavailable_not_invalid() {
        let idp = FakeIdp::start().await;
        idp.garbage.store(true, Ordering::SeqCst);
        let v = validator(&idp);
        let token = idp.token(json!({}));
        for mode in [AuthMode::Jwt, AuthMode::Introspect] {
            let err = v.validate(&token, mode).await.expect_err("garbage");
            assert!(
                matches!(err, AuthError::Unavailable(_)),
                "{mode:?}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn backchannel_logout_revokes_cached_and_fresh_tokens_of_the_session() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let token = idp.token(json!({}));
        let other_session = idp.token(json!({"sid": "session-2"}));
        v.validate(&token, AuthMode::Jwt).await.expect("valid");
        v.validate(&other_session, AuthMode::Jwt)
            .await
            .expect("valid");
        let logout = idp.sign(&json!({
            "iss": idp.issuer, "aud": "mcp-client", "iat": unix_now(), "jti": "j1",
            "sid": "session-1", "sub": "user-1",
            "events": {crate::logout::BACKCHANNEL_LOGOUT_EVENT: {}},
        }));
        let form = format!("logout_token={logout}");
        let event = v
            .backchannel_logout(form.as_bytes())
            .await
            .expect("accepted");
        assert_eq!(event.sid.as_deref(), Some("session-1"));
        let err = v
            .validate(&token, AuthMode::Jwt)
            .await
            .expect_err("revoked");
        assert!(err.to_string().contains("logged out"), "{err}");
        // A new cache key (another mode) verifies the signature afresh: still refused.
        assert!(v.validate(&token, AuthMode::JwtIntrospect).await.is_err());
        v.validate(&other_session, AuthMode::Jwt)
            .await
            .expect("other sessions unaffected");
        assert_eq!(
            v.metrics
                .validations
                .with_label_values(&["jwt", "revoked"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn bad_logout_tokens_are_refused() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let event = json!({crate::logout::BACKCHANNEL_LOGOUT_EVENT: {}});
        let base = json!({"iss": idp.issuer, "aud": "mcp-client", "iat": unix_now(), "sid": "s", "events": event});
        let with = |k: &str, val: serde_json::Value| {
            let mut c = base.clone();
            c[k] = val;
            format!("logout_token={}", idp.sign(&c))
        };
        let cases = vec![
            (with("aud", json!("other-client")), "verify"),
            (with("events", json!({})), "event"),
            (with("nonce", json!("n")), "nonce"),
            (with("iss", json!("http://evil")), "verify"),
            ("logout_token=garbage".to_owned(), "JWT"),
            ("nothing=here".to_owned(), "no logout_token"),
        ];
        for (form, why) in cases {
            match v.backchannel_logout(form.as_bytes()).await {
                Err(crate::logout::LogoutError::Invalid(msg)) => {
                    assert!(msg.contains(why), "{why}: {msg}")
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        let mut c = base.clone();
        c.as_object_mut().expect("object").remove("sid");
        let form = format!("logout_token={}", idp.sign(&c));
        assert!(
            v.backchannel_logout(form.as_bytes()).await.is_err(),
            "needs sid or sub"
        );
    }

    #[tokio::test]
    async fn logging_out_a_subject_spares_its_later_logins() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        let before = idp.token(json!({"iat": unix_now() - 10, "sid": null}));
        v.validate(&before, AuthMode::Jwt).await.expect("valid");
        v.revoke(&LogoutEvent {
            sid: None,
            sub: Some("user-1".into()),
            issued_at: Some(SystemTime::now()),
        });
        assert!(v.validate(&before, AuthMode::Jwt).await.is_err());
        let after = idp.token(json!({"iat": unix_now() + 1, "sid": null}));
        v.validate(&after, AuthMode::Jwt)
            .await
            .expect("a later login is fine");
    }

    #[test]
    fn organizations_are_read_from_the_payload_of_the_same_subject_only() {
        use base64::Engine;
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let token = format!(
            "h.{}.s",
            enc(json!({"sub": "u1", "organization": ["org-1"]}))
        );
        assert_eq!(
            organization_from_payload(&token, Some("u1")),
            Some(json!(["org-1"]))
        );
        assert_eq!(organization_from_payload(&token, Some("u2")), None);
        assert_eq!(organization_from_payload("opaque-token", Some("u1")), None);
    }

    /// Claims that pass every check made before an introspection call.
    fn plausible(idp: &FakeIdp, i: usize) -> serde_json::Value {
        json!({"iss": idp.issuer, "sub": format!("junk-{i}"), "exp": unix_now() + 300,
               "typ": "Bearer", "aud": crate::testing::AUDIENCE})
    }

    #[tokio::test]
    async fn junk_that_cannot_be_the_realms_costs_no_introspection() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        v.validate(&idp.token(json!({})), AuthMode::Introspect)
            .await
            .expect("valid");
        let calls = idp.introspections.load(Ordering::SeqCst);
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let odd_payload = format!(
            "{}.{}.c2ln",
            b64(json!({"alg": "ES256", "kid": crate::testing::KID})),
            b64(json!({"iss": idp.issuer, "exp": "tomorrow"}))
        );
        let cases = [
            ("opaque-token-0123456789".to_owned(), "not a JWT", "not_jwt"),
            ("a.b.c".to_owned(), "not a JWT", "not_jwt"),
            ("e30.e30.e30".to_owned(), "not a JWT", "not_jwt"),
            ("a..c".to_owned(), "not a JWT", "not_jwt"),
            (odd_payload, "payload", "not_jwt"),
            (
                idp.token(json!({"iss": "http://evil/realms/test"})),
                "issued by `http://evil",
                "claims",
            ),
            (
                idp.token(json!({"exp": unix_now() - 3600})),
                "expired",
                "claims",
            ),
            (idp.token(json!({"exp": null})), "lacks the `exp`", "claims"),
            (
                idp.token(json!({"typ": "ID"})),
                "not an access token",
                "claims",
            ),
            (
                idp.token(json!({"typ": "Refresh"})),
                "not an access token",
                "claims",
            ),
            (
                idp.forge(
                    &plausible(&idp, 1),
                    crate::testing::KID,
                    jsonwebtoken::Algorithm::ES256,
                ),
                "signature does not verify",
                "signature",
            ),
        ];
        for (token, why, _) in &cases {
            match v.validate(token, AuthMode::Introspect).await {
                Err(AuthError::InvalidToken(msg)) => assert!(msg.contains(why), "{why}: {msg}"),
                other => panic!("{why}: expected InvalidToken, got {other:?}"),
            }
        }
        assert_eq!(idp.introspections.load(Ordering::SeqCst), calls);
        for reason in ["not_jwt", "claims", "signature"] {
            let expected = cases.iter().filter(|c| c.2 == reason).count() as u64;
            assert_eq!(
                v.metrics
                    .refused_before_introspection
                    .with_label_values(&[reason])
                    .get(),
                expected,
                "{reason}"
            );
        }
    }

    #[tokio::test]
    async fn unverifiable_tokens_have_a_bounded_lane_that_verified_ones_do_not_wait_in() {
        let idp = FakeIdp::start().await;
        let mut config = idp.config();
        config.introspection.unverified = crate::config::LaneLimits {
            max_concurrent: 2,
            per_second: 5,
        };
        config.introspection.max_wait = Duration::from_millis(300);
        let v = Validator::new(config, &Registry::new()).expect("validator");
        let cached = idp.token(json!({"sub": "cached"}));
        v.validate(&cached, AuthMode::Introspect)
            .await
            .expect("valid");
        let calls = idp.introspections.load(Ordering::SeqCst);
        // Distinct junk that passes the checks made without a call but
        // cannot be verified here: HMAC-signed, or by a key id that is not
        // in the key set fetched a moment ago (it may have rotated in).
        let junk: Vec<String> = (0..200)
            .map(|i| {
                if i % 2 == 0 {
                    idp.forge(
                        &plausible(&idp, i),
                        crate::testing::KID,
                        jsonwebtoken::Algorithm::HS256,
                    )
                } else {
                    idp.forge(
                        &plausible(&idp, i),
                        &format!("rotated-{i}"),
                        jsonwebtoken::Algorithm::ES256,
                    )
                }
            })
            .collect();
        let started = Instant::now();
        let tasks: Vec<_> = junk
            .into_iter()
            .map(|t| {
                let v = v.clone();
                tokio::spawn(async move { v.validate(&t, AuthMode::Introspect).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while idp.introspections.load(Ordering::SeqCst) == calls {
            assert!(Instant::now() < deadline, "no junk reached the provider");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Mid-flood: a new good token, and one in the cache.
        let fresh = idp.token(json!({"sub": "fresh"}));
        let asked = Instant::now();
        v.validate(&fresh, AuthMode::Introspect)
            .await
            .expect("a verified token does not queue behind junk");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        let asked = Instant::now();
        v.validate(&cached, AuthMode::Introspect)
            .await
            .expect("cached");
        assert!(asked.elapsed() < Duration::from_millis(100));
        let mut busy = 0;
        for t in tasks {
            match t.await.expect("joined") {
                Err(AuthError::Busy(why)) => {
                    assert!(why.contains("identity.introspection.unverified"), "{why}");
                    assert_eq!(AuthError::Busy(why).status(), 503);
                    busy += 1;
                }
                Err(AuthError::InvalidToken(_)) => {}
                other => panic!("junk: {other:?}"),
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let junk_calls = idp.introspections.load(Ordering::SeqCst) - calls - 1;
        // A burst of 5, a queue of max_wait x 5/s, then 5/s.
        let bound = 5.0 + 1.5 + 5.0 * elapsed;
        assert!(junk_calls as f64 <= bound, "{junk_calls} calls > {bound}");
        assert!(junk_calls >= 2, "{junk_calls}");
        assert_eq!(busy + junk_calls, 200);
        // Two junk calls at most, plus the verified one beside them.
        assert!(idp.most_concurrent_introspections.load(Ordering::SeqCst) <= 3);
        let throttled: u64 = ["rate", "concurrency"]
            .iter()
            .map(|l| {
                v.metrics
                    .introspections_throttled
                    .with_label_values(&["unverified", l])
                    .get()
            })
            .sum();
        assert_eq!(throttled, busy as u64);
        assert_eq!(
            v.metrics
                .validations
                .with_label_values(&["introspect", "busy"])
                .get(),
            busy as u64
        );
    }

    #[tokio::test]
    async fn id_and_refresh_tokens_are_refused_as_not_access_tokens_in_every_mode() {
        let idp = FakeIdp::start().await;
        let v = validator(&idp);
        // Keycloak's ID token: typ ID, for the client, not the gateway.
        let id_token = idp.token(json!({"typ": "ID", "aud": "mcp-client", "nonce": "n"}));
        let refresh = idp.token(json!({"typ": "Refresh"}));
        for token in [&id_token, &refresh] {
            for mode in [AuthMode::Jwt, AuthMode::Introspect, AuthMode::JwtIntrospect] {
                match v.validate(token, mode).await {
                    Err(AuthError::InvalidToken(msg)) => {
                        assert!(msg.starts_with("not an access token"), "{mode:?}: {msg}")
                    }
                    other => panic!("{mode:?}: {other:?}"),
                }
            }
        }
        assert_eq!(idp.introspections.load(Ordering::SeqCst), 0);
        // Another provider's access token without `typ` passes the check.
        let untyped = idp.token(json!({"typ": null}));
        v.validate(&untyped, AuthMode::Jwt).await.expect("valid");
    }

    #[tokio::test]
    async fn without_the_cache_every_request_asks() {
        let idp = FakeIdp::start().await;
        let mut config = idp.config();
        config.cache.enabled = false;
        let v = Validator::new(config, &Registry::new()).expect("validator");
        let token = idp.token(json!({}));
        for _ in 0..3 {
            v.validate(&token, AuthMode::Introspect)
                .await
                .expect("valid");
        }
        assert_eq!(idp.introspections.load(Ordering::SeqCst), 3);
    }
}
