//! Metrics of the auth bridge, registered in the caller's registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct AuthMetrics {
    /// Validations by mode and result (`valid`, `invalid`, `revoked`, `unavailable`).
    pub validations: IntCounterVec,
    /// Cache look-ups by outcome: `hit`, `miss` (this request asked the
    /// provider), `coalesced` (it waited for another request's answer).
    pub cache: IntCounterVec,
    /// Introspection calls made to the provider.
    pub introspections: IntCounter,
    pub introspection_failures: IntCounter,
    pub introspection_latency: Histogram,
    /// JWKS fetches by result (`ok`, `failed`).
    pub jwks_fetches: IntCounterVec,
    /// Back-channel logout tokens by result (`accepted`, `rejected`).
    pub logouts: IntCounterVec,
    /// Sessions and subjects on the revocation list.
    pub revoked: IntGauge,
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
        };
        registry.register(Box::new(m.validations.clone()))?;
        registry.register(Box::new(m.cache.clone()))?;
        registry.register(Box::new(m.introspections.clone()))?;
        registry.register(Box::new(m.introspection_failures.clone()))?;
        registry.register(Box::new(m.introspection_latency.clone()))?;
        registry.register(Box::new(m.jwks_fetches.clone()))?;
        registry.register(Box::new(m.logouts.clone()))?;
        registry.register(Box::new(m.revoked.clone()))?;
        Ok(m)
    }
}
