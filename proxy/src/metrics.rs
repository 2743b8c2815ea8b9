//! Prometheus metrics, served as text by the admin listener, and the recent
//! errors that the status page lists.
//!
//! Label values are bounded: orgs come from the config (unknown ones are
//! counted as `unknown`), methods from a fixed list, replicas from the config.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::stream::StreamMetrics;

/// See [`Metrics::for_org`].
#[derive(Clone)]
pub struct OrgMetrics {
    pub sessions: IntGauge,
    pub stream: StreamMetrics,
    pub published_upstream: IntCounter,
    pub published_publish: IntCounter,
    pub bridged: BridgeCounters,
    pub background_streams: IntGauge,
    pub refused: Refusals,
    pub holds: HoldCounters,
}

/// `holds_total` of one org, by outcome.
#[derive(Clone)]
pub struct HoldCounters {
    pub opened: IntCounter,
    pub done: IntCounter,
    pub cancelled: IntCounter,
    pub expired: IntCounter,
}

/// `refused_total` of one org, by the limit that refused.
#[derive(Clone)]
pub struct Refusals {
    /// `sessions.max_per_subject`.
    pub sessions_per_subject: IntCounter,
    /// `sessions.max_total`.
    pub sessions_total: IntCounter,
    /// `sessions.max_client_bytes`.
    pub client_data: IntCounter,
    /// `sessions.max_subscriptions`.
    pub subscriptions: IntCounter,
    /// `sessions.max_in_flight`.
    pub in_flight: IntCounter,
}

/// `bridged_total` of one org, by kind.
#[derive(Clone)]
pub struct BridgeCounters {
    pub input_round: IntCounter,
    pub meta_injected: IntCounter,
    pub handshake: IntCounter,
    pub discover: IntCounter,
    /// Upstream sessions opened again after a stateful upstream lost one.
    pub reinitialized: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    /// Requests by org, MCP method (or HTTP verb for GET/DELETE) and HTTP status.
    pub requests: IntCounterVec,
    pub sessions: IntGaugeVec,
    pub open_streams: IntGaugeVec,
    /// Open WebSocket connections, by org.
    pub websockets: IntGaugeVec,
    /// WebSocket connections closed, by org and close code (`client`,
    /// `client <code>` when the client closed, `gone` when it vanished).
    pub websocket_closes: IntCounterVec,
    /// Servers registered through the admin API that the running config
    /// serves, by org.
    pub registered_servers: IntGaugeVec,
    /// Registration requests answered here, by org and result
    /// (`registered`, `renewed`, `updated`, `removed`, `refused`).
    pub registrations: IntCounterVec,
    /// Sessions whose background upstream stream this node holds, by org.
    pub background_streams: IntGaugeVec,
    pub upstream_latency: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// 1 while a replica is in rotation, 0 while it is ejected.
    pub replica_up: IntGaugeVec,
    /// Events appended to session logs, by org and source (`publish`, `upstream`).
    pub events_published: IntCounterVec,
    /// Events written to a client connection, by org.
    pub events_delivered: IntCounterVec,
    /// 1 for the era an org's upstream speaks (configured or probed).
    pub upstream_era: IntGaugeVec,
    /// Era translations by org and what was translated (`input_round`,
    /// `meta_injected`, `handshake`, `discover`, `reinitialized`).
    pub bridged: IntCounterVec,
    /// Names a federated list left out, by org, server and why (`clash`:
    /// another server's name; `invalid`: prefixed, it breaks MCP's rules).
    pub federation_dropped: IntCounterVec,
    /// Audited calls by org, server and outcome (`result`, `tool_error`,
    /// `error`, `cancelled`, `denied`).
    pub audited: IntCounterVec,
    /// Audit lines dropped: the writer fell behind.
    pub audit_dropped: prometheus::IntCounter,
    /// Requests refused by a limit, by org and limit.
    pub refused: IntCounterVec,
    /// Deferred answers (holds), by org and outcome.
    pub holds: IntCounterVec,
    /// Client connections open on the MCP listener (streams included).
    pub connections: IntGauge,
    /// Connections closed at once because `limits.max_connections` were open.
    pub connections_refused: IntCounter,
    /// Events and notices this node could not hand to Redis (it was away
    /// too long, or too much waited for it), brought up to date at each
    /// scrape.
    pub shared_dropped: IntCounter,
    /// Events written to Redis that its replicas did not confirm within
    /// `sessions.wait.timeout` (their publishers got 503), brought up to
    /// date at each scrape.
    pub shared_unreplicated: IntCounter,
    /// TLS certificate reloads by listener (`tls`, `admin_tls`) and result
    /// (`reloaded`, `failed`).
    pub tls_reloads: IntCounterVec,
    /// Config reloads by result (`reloaded`, `refused`: the running config
    /// stays).
    pub config_reloads: IntCounterVec,
    /// The running config's generation: 1 at start, one more per reload.
    pub config_generation: IntGauge,
    /// Requests refused by a rate limit, by org and limit name.
    pub rate_limited: IntCounterVec,
    /// Rate-limit decisions Redis did not answer in time (the request
    /// passed).
    pub rate_limit_errors: IntCounter,
    /// The last errors answered, for the status page.
    pub recent_errors: RecentErrors,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("ratatosk".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "MCP requests by org, method and HTTP status",
            ),
            &["org", "method", "status"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new("sessions", "Live gateway sessions by org"),
            &["org"],
        )?;
        let open_streams = IntGaugeVec::new(
            Opts::new(
                "open_streams",
                "Open SSE streams held by the gateway, by org",
            ),
            &["org"],
        )?;
        let websockets = IntGaugeVec::new(
            Opts::new(
                "websockets",
                "Open WebSocket connections of MCP clients, by org",
            ),
            &["org"],
        )?;
        let websocket_closes = IntCounterVec::new(
            Opts::new(
                "websocket_closes_total",
                "WebSocket connections closed, by org and close code (`client ...` when the client closed, `gone` when it vanished)",
            ),
            &["org", "code"],
        )?;
        let registered_servers = IntGaugeVec::new(
            Opts::new(
                "registered_servers",
                "Servers registered through the admin API that the running config serves, by org",
            ),
            &["org"],
        )?;
        let registrations = IntCounterVec::new(
            Opts::new(
                "registrations_total",
                "Server registration requests by org and result (registered, renewed, updated, removed, refused)",
            ),
            &["org", "result"],
        )?;
        let background_streams = IntGaugeVec::new(
            Opts::new(
                "background_streams",
                "Sessions whose background upstream stream (a modern upstream's subscriptions/listen, a stateful upstream's GET stream) this node holds, by org",
            ),
            &["org"],
        )?;
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "upstream_latency_seconds",
                "Time from sending a request upstream to its response headers",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["org", "replica"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Upstream failures by org, replica and kind (connect, timeout, status, protocol)",
            ),
            &["org", "replica", "kind"],
        )?;
        let replica_up = IntGaugeVec::new(
            Opts::new("upstream_replica_up", "1 while a replica is in rotation"),
            &["org", "replica"],
        )?;
        let events_published = IntCounterVec::new(
            Opts::new(
                "events_published_total",
                "Messages appended to session event logs, by org and source",
            ),
            &["org", "source"],
        )?;
        let events_delivered = IntCounterVec::new(
            Opts::new(
                "events_delivered_total",
                "Events written to client SSE connections, by org",
            ),
            &["org"],
        )?;
        let upstream_era = IntGaugeVec::new(
            Opts::new(
                "upstream_era",
                "1 for the protocol era an org's upstream speaks (configured or probed); none while unknown",
            ),
            &["org", "era"],
        )?;
        let bridged = IntCounterVec::new(
            Opts::new(
                "bridged_total",
                "Era translations by org and kind (input_round, meta_injected, handshake, discover)",
            ),
            &["org", "kind"],
        )?;
        let federation_dropped = IntCounterVec::new(
            Opts::new(
                "federation_dropped_total",
                "Names a federated list left out, by org, server and why (clash, invalid)",
            ),
            &["org", "server", "why"],
        )?;
        let audited = IntCounterVec::new(
            Opts::new(
                "audited_calls_total",
                "Audited tool calls, prompts and resource reads, by org, server and outcome",
            ),
            &["org", "server", "outcome"],
        )?;
        let audit_dropped = prometheus::IntCounter::with_opts(Opts::new(
            "audit_dropped_total",
            "Audit lines dropped because the writer fell behind",
        ))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "refused_total",
                "Requests refused by a limit, by org and limit (sessions_per_subject, sessions_total, client_data, subscriptions, in_flight)",
            ),
            &["org", "limit"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused by a rate limit (429), by org and limit",
            ),
            &["org", "limit"],
        )?;
        let rate_limit_errors = IntCounter::new(
            "rate_limit_errors_total",
            "Rate-limit decisions Redis did not answer in time; the requests passed",
        )?;
        let connections = IntGauge::new(
            "connections",
            "Client connections open on the MCP listener, streams included",
        )?;
        let holds = IntCounterVec::new(
            Opts::new(
                "holds_total",
                "Deferred answers (holds) by org and outcome (opened, done, cancelled, expired)",
            ),
            &["org", "outcome"],
        )?;
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Client connections closed at once because limits.max_connections were open",
        )?;
        let shared_dropped = IntCounter::new(
            "shared_events_dropped_total",
            "Events and notices this node could not hand to Redis (sessions.store: redis)",
        )?;
        let shared_unreplicated = IntCounter::new(
            "shared_events_unreplicated_total",
            "Events Redis's replicas did not confirm within sessions.wait.timeout (publishers got 503)",
        )?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tls_reloads_total",
                "TLS certificate reloads by listener and result (reloaded, failed: the running certificate stays)",
            ),
            &["listener", "result"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Config reloads (SIGHUP, POST /reload) by result (reloaded, refused: the running config stays)",
            ),
            &["result"],
        )?;
        let config_generation = IntGauge::new(
            "config_generation",
            "The running config's generation: 1 at start, one more per reload",
        )?;
        config_generation.set(1);
        // Both series from the start, at 0: an alert on `increase()` sees
        // the first refusal.
        for result in ["reloaded", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        registry.register(Box::new(shared_dropped.clone()))?;
        registry.register(Box::new(shared_unreplicated.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(rate_limit_errors.clone()))?;
        registry.register(Box::new(holds.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(upstream_era.clone()))?;
        registry.register(Box::new(bridged.clone()))?;
        registry.register(Box::new(federation_dropped.clone()))?;
        registry.register(Box::new(audited.clone()))?;
        registry.register(Box::new(audit_dropped.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(open_streams.clone()))?;
        registry.register(Box::new(websockets.clone()))?;
        registry.register(Box::new(websocket_closes.clone()))?;
        registry.register(Box::new(registered_servers.clone()))?;
        registry.register(Box::new(registrations.clone()))?;
        registry.register(Box::new(background_streams.clone()))?;
        registry.register(Box::new(upstream_latency.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(replica_up.clone()))?;
        registry.register(Box::new(events_published.clone()))?;
        registry.register(Box::new(events_delivered.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            sessions,
            open_streams,
            websockets,
            websocket_closes,
            registered_servers,
            registrations,
            background_streams,
            upstream_latency,
            upstream_errors,
            replica_up,
            events_published,
            events_delivered,
            upstream_era,
            bridged,
            federation_dropped,
            audited,
            audit_dropped,
            refused,
            holds,
            connections,
            connections_refused,
            shared_dropped,
            shared_unreplicated,
            tls_reloads,
            config_reloads,
            config_generation,
            rate_limited,
            rate_limit_errors,
            recent_errors: RecentErrors::default(),
        })
    }

    /// The registry, for other components' metrics (the auth bridge's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One org's per-event and per-stream series, resolved once, so the
    /// paths that touch them do no label look-up.
    pub fn for_org(&self, org: &str) -> OrgMetrics {
        OrgMetrics {
            sessions: self.sessions.with_label_values(&[org]),
            stream: StreamMetrics {
                delivered: self.events_delivered.with_label_values(&[org]),
                open: self.open_streams.with_label_values(&[org]),
            },
            published_upstream: self.events_published.with_label_values(&[org, "upstream"]),
            published_publish: self.events_published.with_label_values(&[org, "publish"]),
            bridged: BridgeCounters {
                input_round: self.bridged.with_label_values(&[org, "input_round"]),
                meta_injected: self.bridged.with_label_values(&[org, "meta_injected"]),
                handshake: self.bridged.with_label_values(&[org, "handshake"]),
                discover: self.bridged.with_label_values(&[org, "discover"]),
                reinitialized: self.bridged.with_label_values(&[org, "reinitialized"]),
            },
            background_streams: self.background_streams.with_label_values(&[org]),
            refused: Refusals {
                sessions_per_subject: self
                    .refused
                    .with_label_values(&[org, "sessions_per_subject"]),
                sessions_total: self.refused.with_label_values(&[org, "sessions_total"]),
                client_data: self.refused.with_label_values(&[org, "client_data"]),
                subscriptions: self.refused.with_label_values(&[org, "subscriptions"]),
                in_flight: self.refused.with_label_values(&[org, "in_flight"]),
            },
            holds: HoldCounters {
                opened: self.holds.with_label_values(&[org, "opened"]),
                done: self.holds.with_label_values(&[org, "done"]),
                cancelled: self.holds.with_label_values(&[org, "cancelled"]),
                expired: self.holds.with_label_values(&[org, "expired"]),
            },
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// How many errors [`RecentErrors`] keeps.
pub const RECENT_ERRORS: usize = 50;

/// Longest message kept of one recent error, in characters.
const RECENT_MESSAGE_CHARS: usize = 500;

/// One error the gateway answered, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentError {
    pub at: SystemTime,
    /// The org the request named, if it named a configured one.
    pub org: Option<Arc<str>>,
    /// What the request is counted as in `requests_total` (its MCP method
    /// or HTTP verb).
    pub method: &'static str,
    pub status: u16,
    /// What failed, in a word or two: `upstream`, `upstream timeout`,
    /// `unavailable`, `internal`.
    pub kind: &'static str,
    pub message: String,
    /// The `X-Request-Id` of the request, to find it in the log.
    pub request_id: String,
}

/// The last [`RECENT_ERRORS`] errors. Only an error takes the lock: the
/// paths that succeed never touch it.
#[derive(Default)]
pub struct RecentErrors {
    entries: Mutex<VecDeque<RecentError>>,
    total: AtomicU64,
}

impl RecentErrors {
    pub fn record(&self, mut error: RecentError) {
        if let Some((cut, _)) = error.message.char_indices().nth(RECENT_MESSAGE_CHARS) {
            error.message.truncate(cut);
            error.message.push_str("...");
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        // A panic elsewhere while holding it leaves a ring that is still whole.
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= RECENT_ERRORS {
            entries.pop_front();
        }
        entries.push_back(error);
    }

    /// How many errors were recorded since the start, and the kept ones,
    /// newest first.
    pub fn snapshot(&self) -> (u64, Vec<RecentError>) {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let total = self.total.load(Ordering::Relaxed);
        (total, entries.iter().rev().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(n: usize) -> RecentError {
        RecentError {
            at: SystemTime::UNIX_EPOCH,
            org: Some("org-1".into()),
            method: "tools/call",
            status: 502,
            kind: "upstream",
            message: format!("failure {n}"),
            request_id: format!("r{n}"),
        }
    }

    #[test]
    fn recent_errors_keep_the_last_ones_newest_first() {
        let recent = RecentErrors::default();
        for n in 0..RECENT_ERRORS + 7 {
            recent.record(error(n));
        }
        let (total, kept) = recent.snapshot();
        assert_eq!(total, (RECENT_ERRORS + 7) as u64);
        assert_eq!(kept.len(), RECENT_ERRORS);
        assert_eq!(kept[0].message, format!("failure {}", RECENT_ERRORS + 6));
        assert_eq!(kept[RECENT_ERRORS - 1].message, "failure 7");
    }

    #[test]
    fn a_recent_error_message_is_clipped_on_a_char_boundary() {
        let recent = RecentErrors::default();
        recent.record(RecentError {
            message: "é".repeat(RECENT_MESSAGE_CHARS + 10),
            ..error(0)
        });
        let (_, kept) = recent.snapshot();
        assert_eq!(kept[0].message.chars().count(), RECENT_MESSAGE_CHARS + 3);
        assert!(kept[0].message.ends_with("é..."));
    }

    #[test]
    fn renders_with_prefix_and_labels() {
        let m = Metrics::new().expect("metrics");
        m.requests
            .with_label_values(&["org-1", "tools/call", "200"])
            .inc();
        m.sessions.with_label_values(&["org-1"]).set(3);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(
            text.contains(
                "ratatosk_requests_total{method=\"tools/call\",org=\"org-1\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("ratatosk_sessions{org=\"org-1\"} 3"),
            "{text}"
        );
    }
}
