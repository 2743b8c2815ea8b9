//! Rate limits (`orgs.<org>.rate_limits`): a rate and a burst for each
//! subject, client or the org as a whole, on the requests a limit selects
//! by method, server and tool.
//!
//! Each limit is a GCRA: a request takes `interval` (period ÷ count) of a
//! budget that holds `burst` of them. On one node the state is in memory
//! (governor's keyed limiter). With `sessions.store: redis` it is in Redis,
//! where one script decides each request atomically on the server's clock,
//! so the limit holds across every node; a refusal is remembered on the
//! node until it ends, so a client that keeps knocking costs no round trip.
//! If Redis does not answer in time the request passes (the limit fails
//! open, as a protection must not take the service down), and
//! `rate_limit_errors_total` counts it; for a second after such an error
//! the node does not ask Redis, so a Redis that hangs costs each request
//! one wait at most once a second.
//!
//! Several limits that select one request are each charged, in order,
//! until one refuses; a refusal a node remembers for any of them refuses
//! first, without charging the others.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::session::RedisLink;
use globset::{Glob, GlobSet, GlobSetBuilder};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::IntCounter;
use ratatosk_auth::Identity;
use redis::Script;

use ratatosk_auth::ratelog::LogEvery;

use crate::config::{RateLimitConfig, RatePer};
use crate::metrics::Metrics;

/// How long a decision may wait on Redis before the request passes.
const REDIS_WAIT: Duration = Duration::from_millis(500);

/// How long a node passes requests without asking Redis after an error.
const REDIS_PAUSE: Duration = Duration::from_secs(1);

/// Most callers a limit remembers a refusal of (Redis mode).
const MAX_REMEMBERED: u64 = 100_000;

/// One request, as limits select it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub method: &'a str,
    /// The org's server it goes to, when one is known.
    pub server: Option<&'a str>,
    /// The tool of a `tools/call`, as the federated endpoint names it.
    pub tool: Option<&'a str>,
    pub identity: &'a Identity,
}

/// A refusal: which limit, and when the caller may try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub limit: Arc<str>,
    /// `10 per 1s, burst 10, per subject`.
    pub terms: String,
    pub retry_after: Duration,
}

/// The rate limits of one org, shared by all of its endpoints.
#[derive(Default)]
pub struct RateLimits {
    limits: Vec<Limit>,
}

struct Limit {
    name: Arc<str>,
    /// `<org>:<name>`: what its Redis keys are under.
    key: String,
    per: RatePer,
    interval: Duration,
    burst: u32,
    terms: String,
    methods: Vec<String>,
    servers: Vec<String>,
    tools: Option<GlobSet>,
    /// The state on one node.
    local: DefaultKeyedRateLimiter<String>,
    /// Redis mode: callers refused, until when.
    refused_until: moka::sync::Cache<String, Instant>,
    refused: IntCounter,
}

/// Why a limit cannot be built (its config was checked first).
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate limit '{0}': a tool glob: {1}")]
    Glob(String, globset::Error),
    #[error("rate limit '{0}': the rate or burst is out of range")]
    Quota(String),
}

impl RateLimits {
    /// The limits of `org`, each with its refusal counter in `metrics`.
    pub fn new(
        org: &str,
        configs: &[RateLimitConfig],
        metrics: &Metrics,
    ) -> Result<RateLimits, RateLimitError> {
        let limits = configs
            .iter()
            .map(|c| Limit::new(org, c, metrics))
            .collect::<Result<_, _>>()?;
        Ok(RateLimits { limits })
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Whether some limit selects calls by their tool, so that a
    /// request's tool name is needed.
    pub fn by_tool(&self) -> bool {
        self.limits.iter().any(|l| l.tools.is_some())
    }

    /// Whether some limit selects requests by their tool or server, so that
    /// the federated endpoint needs a call's name to route it.
    pub fn by_name(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.tools.is_some() || !l.servers.is_empty())
    }

    /// Charges `ask` to each limit that selects it, on this node.
    pub fn check_local(&self, ask: &Ask<'_>) -> Result<(), Limited> {
        for limit in self.selecting(ask) {
            let key = limit.key(ask.identity);
            if let Err(not_until) = limit.local.check_key(&key) {
                let now = governor::clock::Clock::now(limit.local.clock());
                return Err(limit.refuse(not_until.wait_time_from(now)));
            }
        }
        Ok(())
    }

    /// Charges `ask` to each limit that selects it, in Redis: what all
    /// nodes share.
    pub async fn check_shared(&self, ask: &Ask<'_>, shared: &SharedRates) -> Result<(), Limited> {
        let keyed: Vec<(&Limit, String)> = self
            .selecting(ask)
            .map(|limit| (limit, limit.key(ask.identity)))
            .collect();
        // A refusal remembered for any limit refuses before any is charged.
        for (limit, key) in &keyed {
            if let Some(until) = limit.refused_until.get(key) {
                let now = Instant::now();
                if until > now {
                    return Err(limit.refuse(until - now));
                }
            }
        }
        for (limit, key) in keyed {
            if shared.paused() {
                return Ok(());
            }
            match shared.charge(limit, &key).await {
                Ok(None) => {}
                Ok(Some(wait)) => {
                    limit.refused_until.insert(key, Instant::now() + wait);
                    return Err(limit.refuse(wait));
                }
                Err(e) => {
                    shared.failed();
                    if let Some(suppressed) = shared.warned.ready() {
                        tracing::warn!(limit = %limit.name, error = %e, suppressed, "rate limit not decided (Redis did not answer); requests pass for {REDIS_PAUSE:?}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets callers whose budgets are full again (on one node).
    pub fn retain_recent(&self) {
        for limit in &self.limits {
            limit.local.retain_recent();
            limit.local.shrink_to_fit();
        }
    }

    fn selecting<'s>(&'s self, ask: &'s Ask<'_>) -> impl Iterator<Item = &'s Limit> {
        self.limits.iter().filter(|l| l.selects(ask))
    }
}

impl Limit {
    fn new(org: &str, c: &RateLimitConfig, metrics: &Metrics) -> Result<Limit, RateLimitError> {
        let quota_error = || RateLimitError::Quota(c.name.clone());
        let burst = c.burst.unwrap_or(c.rate.count);
        let interval = c.rate.interval();
        // The config check bounds interval × burst (governor's tolerance).
        if interval.saturating_mul(burst) > crate::config::MAX_RATE_SPAN {
            return Err(quota_error());
        }
        let quota = Quota::with_period(interval)
            .ok_or_else(quota_error)?
            .allow_burst(NonZeroU32::new(burst).ok_or_else(quota_error)?);
        let tools = if c.tools.is_empty() {
            None
        } else {
            let mut set = GlobSetBuilder::new();
            for t in &c.tools {
                set.add(Glob::new(t).map_err(|e| RateLimitError::Glob(c.name.clone(), e))?);
            }
            Some(
                set.build()
                    .map_err(|e| RateLimitError::Glob(c.name.clone(), e))?,
            )
        };
        let methods = match (&tools, c.methods.is_empty()) {
            // Tools are named by calls only.
            (Some(_), true) => vec!["tools/call".to_owned()],
            _ => c.methods.clone(),
        };
        Ok(Limit {
            name: c.name.as_str().into(),
            key: format!("{org}:{}", c.name),
            per: c.per,
            interval,
            burst,
            terms: format!("{}, burst {burst}, per {}", c.rate, c.per.as_str()),
            methods,
            servers: c.servers.clone(),
            tools,
            local: RateLimiter::keyed(quota),
            // A refusal's wait is at most one interval.
            refused_until: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(interval)
                .build(),
            refused: metrics.rate_limited.with_label_values(&[org, &c.name]),
        })
    }

    fn selects(&self, ask: &Ask<'_>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == ask.method))
            && (self.servers.is_empty()
                || ask
                    .server
                    .is_some_and(|s| self.servers.iter().any(|x| x == s)))
            && self
                .tools
                .as_ref()
                .is_none_or(|tools| ask.tool.is_some_and(|t| tools.is_match(t)))
    }

    /// Whose budget a request takes.
    fn key(&self, identity: &Identity) -> String {
        match self.per {
            RatePer::Subject => format!("s:{}", identity.subject),
            RatePer::Client => match &identity.client_id {
                Some(client) => format!("c:{client}"),
                None => format!("s:{}", identity.subject),
            },
            RatePer::Org => String::new(),
        }
    }

    fn refuse(&self, retry_after: Duration) -> Limited {
        self.refused.inc();
        Limited {
            limit: self.name.clone(),
            terms: self.terms.clone(),
            retry_after,
        }
    }
}

/// GCRA in Redis, on the server's clock (microseconds). KEYS[1]: the
/// caller's theoretical arrival time (TAT); ARGV: the interval and the
/// burst. A TAT stays below now + burst × interval, at most a year on,
/// well within a Lua number's exact integers.
/// Answers 0 when the request passes, else the microseconds to wait.
const GCRA: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
-- A budget kept from before a reload to other terms never waits longer
-- than a full budget of the new ones.
if tat > now + burst * interval then tat = now + burst * interval end
local next = tat + interval
local allowed_at = next - burst * interval
if now < allowed_at then return allowed_at - now end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1)
return 0
";

/// What the nodes share of rate limits: the Redis their sessions are in.
pub struct SharedRates {
    conn: RedisLink,
    /// `sessions.key_prefix` and `rl:`; then the org, the limit and the
    /// caller.
    prefix: String,
    script: Script,
    errors: IntCounter,
    /// Since `epoch`, the millisecond until which Redis is not asked.
    paused_until: AtomicU64,
    epoch: Instant,
    warned: LogEvery,
}

impl SharedRates {
    pub fn new(conn: RedisLink, key_prefix: &str, metrics: &Metrics) -> SharedRates {
        SharedRates {
            conn,
            prefix: format!("{key_prefix}rl:"),
            script: Script::new(GCRA),
            errors: metrics.rate_limit_errors.clone(),
            paused_until: AtomicU64::new(0),
            epoch: Instant::now(),
            warned: LogEvery::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether Redis failed a decision within the last [`REDIS_PAUSE`].
    fn paused(&self) -> bool {
        self.now_ms() < self.paused_until.load(Ordering::Relaxed)
    }

    fn failed(&self) {
        self.errors.inc();
        let pause = u64::try_from(REDIS_PAUSE.as_millis()).unwrap_or(u64::MAX);
        self.paused_until
            .store(self.now_ms().saturating_add(pause), Ordering::Relaxed);
    }

    /// The wait, if `limit` refuses caller `key` now.
    async fn charge(&self, limit: &Limit, key: &str) -> Result<Option<Duration>, String> {
        let mut conn = self.conn.clone();
        let redis_key = format!("{}{}:{key}", self.prefix, limit.key);
        let interval = u64::try_from(limit.interval.as_micros()).unwrap_or(u64::MAX);
        let mut invocation = self.script.key(redis_key);
        invocation.arg(interval).arg(limit.burst);
        let call = tracing::Instrument::instrument(
            invocation.invoke_async::<u64>(&mut conn),
            crate::telemetry::redis("rate limit"),
        );
        match tokio::time::timeout(REDIS_WAIT, call).await {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(wait)) => Ok(Some(Duration::from_micros(wait))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {REDIS_WAIT:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(yaml: &str) -> RateLimits {
        let configs: Vec<RateLimitConfig> = yaml_serde::from_str(yaml).expect("config");
        let metrics = Metrics::new().expect("metrics");
        RateLimits::new("org-1", &configs, &metrics).expect("limits")
    }

    fn user(subject: &str) -> Identity {
        let mut id = Identity::anonymous("org-1");
        id.subject = subject.to_owned();
        id
    }

    fn call<'a>(identity: &'a Identity, tool: &'a str) -> Ask<'a> {
        Ask {
            method: "tools/call",
            server: Some("fs"),
            tool: Some(tool),
            identity,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_each_user_has_their_own_budget() {
        let l = limits("- {name: calls, rate: 60/h, burst: 3, methods: [tools/call]}");
        let (alice, bob) = (user("alice"), user("bob"));
        for _ in 0..3 {
            assert_eq!(l.check_local(&call(&alice, "x")), Ok(()));
        }
        let refused = l
            .check_local(&call(&alice, "x"))
            .expect_err("over the burst");
        assert_eq!(&*refused.limit, "calls");
        assert_eq!(refused.terms, "60 per 1h, burst 3, per subject");
        assert!(
            refused.retry_after > Duration::from_secs(50)
                && refused.retry_after <= Duration::from_secs(60),
            "{refused:?}"
        );
        assert_eq!(l.check_local(&call(&bob, "x")), Ok(()));
        // Other methods are not counted.
        let list = Ask {
            method: "tools/list",
            ..call(&alice, "x")
        };
        assert_eq!(l.check_local(&list), Ok(()));
    }

    #[test]
    fn limits_select_by_server_and_tool_glob_and_count_per_org() {
        let l = limits(
            "- {name: writes, rate: 1/h, burst: 1, servers: [fs], tools: ['fs__write_*'], per: org}",
        );
        let (alice, bob) = (user("alice"), user("bob"));
        assert_eq!(l.check_local(&call(&alice, "fs__read_file")), Ok(()));
        assert_eq!(l.check_local(&call(&alice, "fs__read_file")), Ok(()));
        assert_eq!(l.check_local(&call(&alice, "fs__write_file")), Ok(()));
        // Per org: bob shares alice's budget.
        let refused = l
            .check_local(&call(&bob, "fs__write_other"))
            .expect_err("spent");
        assert!(
            refused.retry_after > Duration::from_secs(3500),
            "{refused:?}"
        );
        let elsewhere = Ask {
            server: Some("db"),
            ..call(&bob, "fs__write_file")
        };
        assert_eq!(l.check_local(&elsewhere), Ok(()));
        assert!(l.by_tool());
    }

    #[test]
    fn rates_parse_in_units_and_durations() {
        let rate = |s: &str| s.parse::<crate::config::Rate>();
        assert_eq!(
            rate("10/s").map(|r| r.interval()),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            rate("600/min").map(|r| r.interval()),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            rate("5/30s").map(|r| r.interval()),
            Ok(Duration::from_secs(6))
        );
        assert_eq!(
            rate("2/h").map(|r| r.interval()),
            Ok(Duration::from_secs(1800))
        );
        assert!(rate("ten/s").is_err());
        assert!(rate("10").is_err());
        assert!(rate("10/fortnight").is_err());
    }

    #[tokio::test]
    async fn in_redis_the_budget_is_shared_and_a_refusal_is_remembered() {
        let redis = crate::testing::RedisServer::start().await;
        let l = limits("- {name: calls, rate: 2/min, burst: 2}");
        // Another org's limit of the same name keeps its own budgets.
        let configs: Vec<RateLimitConfig> =
            yaml_serde::from_str("- {name: calls, rate: 2/min, burst: 2}").expect("config");
        let metrics = Metrics::new().expect("metrics");
        let other_org = RateLimits::new("org-2", &configs, &metrics).expect("limits");
        let node = || {
            let conn = crate::session::redis::connection(&redis.url()).expect("redis");
            SharedRates::new(conn, "t:", &metrics)
        };
        let (a, b) = (node(), node());
        let alice = user("alice");
        let ask = Ask {
            method: "ping",
            server: None,
            tool: None,
            identity: &alice,
        };
        assert_eq!(l.check_shared(&ask, &a).await, Ok(()));
        assert_eq!(l.check_shared(&ask, &b).await, Ok(()));
        let refused = l
            .check_shared(&ask, &a)
            .await
            .expect_err("the budget is shared");
        assert!(refused.retry_after > Duration::from_secs(25), "{refused:?}");
        let again = l.check_shared(&ask, &a).await.expect_err("remembered");
        assert!(again.retry_after <= refused.retry_after);
        assert_eq!(other_org.check_shared(&ask, &b).await, Ok(()));
        assert_eq!(metrics.rate_limit_errors.get(), 0);
    }
}
