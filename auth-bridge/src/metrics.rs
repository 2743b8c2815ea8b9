//! Metrics of the auth bridge, registered in the caller's registry.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::AuthMode;

/// How a validation ended, as counted in `auth_validations_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Valid,
    Invalid,
    Revoked,
    Unavailable,
    /// Refused because too many tokens were waiting for the provider.
    Busy,
}

/// Why a token was refused in `introspect` mode without asking the
/// provider, as counted in `auth_refused_before_introspection_total`.
#[derive(Debug, Clone, Copy)]
pub enum Precheck {
    /// Not a JWT at all.
    NotJwt,
    /// `iss`, `exp` or `typ` rule it out.
    Claims,
    /// Its signature does not verify against the realm's key it names.
    Signature,
}

impl Precheck {
    fn as_str(self) -> &'static str {
        match self {
            Precheck::NotJwt => "not_jwt",
            Precheck::Claims => "claims",
            Precheck::Signature => "signature",
        }
    }
}

/// How a cache look-up went, as counted in `auth_cache_total`.
#[derive(Debug, Clone, Copy)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Coalesced,
}

impl Outcome {
    const ALL: usize = 5;
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Invalid => "invalid",
            Outcome::Revoked => "revoked",
            Outcome::Unavailable => "unavailable",
            Outcome::Busy => "busy",
        }
    }
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
        }
    }
}

/// Counter handles resolved on first use: the validation path does no label
/// look-up, and a series appears in `/metrics` once it is counted.
#[derive(Clone, Default)]
struct Handles {
    validations: [[OnceLock<IntCounter>; Outcome::ALL]; 4],
    cache: [OnceLock<IntCounter>; 3],
    exchange_cache: [OnceLock<IntCounter>; 3],
    prechecks: [OnceLock<IntCounter>; 3],
}

#[derive(Clone)]
pub struct AuthMetrics {
    /// Validations by mode and result (`valid`, `invalid`, `revoked`,
    /// `unavailable`, `busy`).
    pub validations: IntCounterVec,
    /// Cache look-ups by outcome: `hit`, `miss` (this request asked the
    /// provider), `coalesced` (it waited for another request's answer).
    pub cache: IntCounterVec,
    /// Introspection calls made to the provider.
    pub introspections: IntCounter,
    pub introspection_failures: IntCounter,
    pub introspection_latency: Histogram,
    /// Tokens refused in `introspect` mode without a call, by reason.
    pub refused_before_introspection: IntCounterVec,
    /// Tokens refused because their introspection lane was full, by lane
    /// (`verified`, `unverified`) and what was spent (`rate`, `concurrency`).
    pub introspections_throttled: IntCounterVec,
    /// JWKS fetches by result (`ok`, `failed`).
    pub jwks_fetches: IntCounterVec,
    /// Back-channel logout tokens by result (`accepted`, `rejected`).
    pub logouts: IntCounterVec,
    /// Sessions and subjects on the revocation list.
    pub revoked: IntGauge,
    /// Token exchanges (RFC 8693) for upstreams by result: `ok`,
    /// `refused`, `unavailable` (calls made), `paused` (failed at once
    /// after a failure, no call).
    pub exchanges: IntCounterVec,
    /// Look-ups of exchanged tokens by outcome, as `cache`.
    pub exchange_cache_outcomes: IntCounterVec,
    /// Exchanged tokens dropped because their session logged out.
    pub exchanges_dropped: IntCounter,
    handles: Handles,
}

impl AuthMetrics {
    pub fn register(registry: &Registry) -> Result<AuthMetrics, prometheus::Error> {
        let m = AuthMetrics {
            validations: IntCounterVec::new(
                Opts::new(
                    "auth_validations_total",
                    "Token validations by mode and result",
                ),
                &["mode", "result"],
            )?,
            cache: IntCounterVec::new(
                Opts::new(
                    "auth_cache_total",
                    "Validation cache look-ups by outcome (hit, miss, coalesced)",
                ),
                &["outcome"],
            )?,
            introspections: IntCounter::new(
                "auth_introspections_total",
                "RFC 7662 introspection calls made to the identity provider",
            )?,
            introspection_failures: IntCounter::new(
                "auth_introspection_failures_total",
                "Introspection calls that failed (network, status, garbage)",
            )?,
            introspection_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "auth_introspection_latency_seconds",
                    "Latency of introspection calls",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            refused_before_introspection: IntCounterVec::new(
                Opts::new(
                    "auth_refused_before_introspection_total",
                    "Tokens refused in introspect mode without asking the provider, by reason",
                ),
                &["reason"],
            )?,
            introspections_throttled: IntCounterVec::new(
                Opts::new(
                    "auth_introspections_throttled_total",
                    "Tokens refused (503) because their introspection lane was full, by lane and limit",
                ),
                &["lane", "limit"],
            )?,
            jwks_fetches: IntCounterVec::new(
                Opts::new("auth_jwks_fetches_total", "JWKS fetches by result"),
                &["result"],
            )?,
            logouts: IntCounterVec::new(
                Opts::new(
                    "auth_backchannel_logouts_total",
                    "Back-channel logout tokens received, by result",
                ),
                &["result"],
            )?,
            revoked: IntGauge::new(
                "auth_revoked_entries",
                "Logged-out sessions and subjects on the revocation list",
            )?,
            exchanges: IntCounterVec::new(
                Opts::new(
                    "auth_token_exchanges_total",
                    "Token exchanges for upstreams by result (ok, refused, unavailable: calls made; paused: refused without a call after a failure)",
                ),
                &["result"],
            )?,
            exchange_cache_outcomes: IntCounterVec::new(
                Opts::new(
                    "auth_token_exchange_cache_total",
                    "Look-ups of exchanged upstream tokens by outcome (hit, miss, coalesced)",
                ),
                &["outcome"],
            )?,
            exchanges_dropped: IntCounter::new(
                "auth_token_exchanges_dropped_total",
                "Exchanged upstream tokens dropped because their session logged out",
            )?,
            handles: Handles::default(),
        };
        registry.register(Box::new(m.validations.clone()))?;
        registry.register(Box::new(m.cache.clone()))?;
        registry.register(Box::new(m.introspections.clone()))?;
        registry.register(Box::new(m.introspection_failures.clone()))?;
        registry.register(Box::new(m.introspection_latency.clone()))?;
        registry.register(Box::new(m.refused_before_introspection.clone()))?;
        registry.register(Box::new(m.introspections_throttled.clone()))?;
        registry.register(Box::new(m.jwks_fetches.clone()))?;
        registry.register(Box::new(m.logouts.clone()))?;
        registry.register(Box::new(m.revoked.clone()))?;
        registry.register(Box::new(m.exchanges.clone()))?;
        registry.register(Box::new(m.exchange_cache_outcomes.clone()))?;
        registry.register(Box::new(m.exchanges_dropped.clone()))?;
        Ok(m)
    }

    /// The `auth_validations_total` counter of a mode and outcome.
    pub fn validation(&self, mode: AuthMode, outcome: Outcome) -> &IntCounter {
        // Exhaustive, so a new mode cannot index past the array.
        let m = match mode {
            AuthMode::None => 0,
            AuthMode::Jwt => 1,
            AuthMode::Introspect => 2,
            AuthMode::JwtIntrospect => 3,
        };
        self.handles.validations[m][outcome as usize].get_or_init(|| {
            self.validations
                .with_label_values(&[mode.as_str(), outcome.as_str()])
        })
    }

    /// The `auth_refused_before_introspection_total` counter of a reason.
    pub fn precheck(&self, reason: Precheck) -> &IntCounter {
        self.handles.prechecks[reason as usize].get_or_init(|| {
            self.refused_before_introspection
                .with_label_values(&[reason.as_str()])
        })
    }

    /// The `auth_cache_total` counter of an outcome.
    pub fn cache_outcome(&self, outcome: CacheOutcome) -> &IntCounter {
        self.handles.cache[outcome as usize]
            .get_or_init(|| self.cache.with_label_values(&[outcome.as_str()]))
    }

    /// The `auth_token_exchange_cache_total` counter of an outcome.
    pub fn exchange_cache(&self, outcome: CacheOutcome) -> &IntCounter {
        self.handles.exchange_cache[outcome as usize].get_or_init(|| {
            self.exchange_cache_outcomes
                .with_label_values(&[outcome.as_str()])
        })
    }
}
