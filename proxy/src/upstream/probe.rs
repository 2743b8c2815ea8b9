//! What era an org's upstream speaks: as configured, or probed
//! (`auto`); and its cached self-description.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};

use super::forwarding::{Outbound, json_rpc_headers};
use super::{AnswerReader, Pool, RATATOSK_ORG, ReadError, UpstreamError};
use crate::config::Era;
use crate::edge::MCP_SESSION_ID;
use crate::jsonrpc::Id;

/// How long the upstream's own description (its `server/discover` or
/// `initialize` result) is reused before it is asked again.
const INFO_TTL: Duration = Duration::from_secs(60);

/// What an org's upstream speaks: as configured, or found out by probing
/// (`auto`); plus its cached self-description, which the gateway needs to
/// answer `initialize` or `server/discover` across eras.
pub struct UpstreamEra {
    org: String,
    configured: Era,
    /// `Era as u8 + 1` once known; 0 while an `auto` upstream is unprobed.
    resolved: AtomicU8,
    probing: tokio::sync::Mutex<()>,
    info: std::sync::Mutex<Option<(Instant, Arc<Value>)>>,
    gauge: prometheus::IntGaugeVec,
}

/// The result of the gateway's request `id` in `reader`.
async fn read_result(
    reader: &mut AnswerReader,
    id: &Id,
    method: &'static str,
) -> Result<Value, ProbeError> {
    let response = reader.response_to(id).await?;
    let no_result = |answer: String| ProbeError::NoResult {
        replica: reader.replica().to_owned(),
        method,
        answer,
    };
    let Some(response) = response else {
        return Err(no_result("(no response)".into()));
    };
    match serde_json::from_slice::<Value>(&response) {
        Ok(Value::Object(mut v)) if v.contains_key("result") => {
            Ok(v.remove("result").unwrap_or_default())
        }
        _ => Err(no_result(
            String::from_utf8_lossy(&response)
                .chars()
                .take(300)
                .collect(),
        )),
    }
}

/// Why the upstream's era or description could not be found out.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("upstream {replica} answered {method} without a result: {answer}")]
    NoResult {
        replica: String,
        method: &'static str,
        answer: String,
    },
}

const ERAS: [Era; 3] = [Era::Stateless2025, Era::Stateful2025, Era::Modern];

impl UpstreamEra {
    pub fn new(org: &str, configured: Era, metrics: &crate::metrics::Metrics) -> UpstreamEra {
        let this = UpstreamEra {
            org: org.to_owned(),
            configured,
            resolved: AtomicU8::new(0),
            probing: tokio::sync::Mutex::new(()),
            info: std::sync::Mutex::new(None),
            gauge: metrics.upstream_era.clone(),
        };
        if configured != Era::Auto {
            this.set(configured);
        }
        this
    }

    fn set(&self, era: Era) {
        let index = ERAS.iter().position(|e| *e == era).unwrap_or(0);
        self.resolved.store(index as u8 + 1, Ordering::Release);
        for e in ERAS {
            self.gauge
                .with_label_values(&[self.org.as_str(), e.as_str()])
                .set(i64::from(e == era));
        }
    }

    pub fn configured(&self) -> Era {
        self.configured
    }

    /// The era, if known without a probe.
    pub fn known(&self) -> Option<Era> {
        match self.resolved.load(Ordering::Acquire) {
            0 => None,
            n => ERAS.get(usize::from(n - 1)).copied(),
        }
    }

    /// The era; an `auto` upstream is probed once (concurrent callers wait
    /// for the same probe). A failed probe is retried by the next caller.
    pub async fn resolve(&self, pool: &Arc<Pool>) -> Result<Era, ProbeError> {
        if let Some(era) = self.known() {
            return Ok(era);
        }
        // Boxed: the probe's future is large, and every request's future
        // would carry its size.
        Box::pin(self.probe_once(pool)).await
    }

    async fn probe_once(&self, pool: &Arc<Pool>) -> Result<Era, ProbeError> {
        let _probe = self.probing.lock().await;
        if let Some(era) = self.known() {
            return Ok(era);
        }
        let (era, info) = self.probe(pool).await?;
        tracing::info!(org = %self.org, era = era.as_str(), "upstream era found by probing");
        self.set(era);
        self.remember(info);
        Ok(era)
    }

    fn remember(&self, info: Value) -> Arc<Value> {
        let info = Arc::new(info);
        if let Ok(mut slot) = self.info.lock() {
            *slot = Some((Instant::now(), info.clone()));
        }
        info
    }

    /// `server/discover` first; a modern refusal also proves a modern
    /// upstream. Anything else means a handshake-era upstream, whose
    /// `initialize` answer tells stateful (it mints a session) from
    /// stateless.
    async fn probe(&self, pool: &Arc<Pool>) -> Result<(Era, Value), ProbeError> {
        match self.ask(pool, "server/discover").await {
            Ok((result, _)) if result.get("supportedVersions").is_some() => {
                return Ok((Era::Modern, result));
            }
            Err(ProbeError::Upstream(UpstreamError::Status { body, .. }))
                if crate::era::is_modern_refusal(&body) =>
            {
                // Modern, but it refused the probe: describe it as empty.
                return Ok((Era::Modern, serde_json::json!({})));
            }
            Err(ProbeError::Upstream(
                e @ (UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. }),
            )) => return Err(e.into()),
            _ => {}
        }
        let (result, stateful) = self.ask(pool, "initialize").await?;
        let era = if stateful {
            Era::Stateful2025
        } else {
            Era::Stateless2025
        };
        Ok((era, result))
    }

    fn fresh_info(&self) -> Option<Arc<Value>> {
        let slot = self.info.lock().ok()?;
        let (at, info) = slot.as_ref()?;
        (at.elapsed() < INFO_TTL).then(|| info.clone())
    }

    /// The upstream's description: its `server/discover` result (modern)
    /// or its `initialize` result (handshake era), cached for a minute.
    /// Concurrent callers after expiry wait for one refresh.
    pub async fn info(&self, pool: &Arc<Pool>, era: Era) -> Result<Arc<Value>, ProbeError> {
        if let Some(info) = self.fresh_info() {
            return Ok(info);
        }
        let _refresh = self.probing.lock().await;
        if let Some(info) = self.fresh_info() {
            return Ok(info);
        }
        let method = if era == Era::Modern {
            "server/discover"
        } else {
            "initialize"
        };
        let (result, _) = self.ask(pool, method).await?;
        Ok(self.remember(result))
    }

    /// Sends one gateway-made request; returns its result and whether the
    /// answer minted an upstream session.
    async fn ask(
        &self,
        pool: &Arc<Pool>,
        method: &'static str,
    ) -> Result<(Value, bool), ProbeError> {
        let mut headers = json_rpc_headers(6);
        // The route's org (the part of `org/server` before the slash).
        let org = self.org.split('/').next().unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(org) {
            headers.insert(RATATOSK_ORG, v);
        }
        let id = Id::from_value(&Value::from("ratatosk-probe")).ok_or(ProbeError::NoResult {
            replica: self.org.clone(),
            method,
            answer: "(no request id)".into(),
        })?;
        let body = if method == "initialize" {
            crate::era::initialize_request(&id)
        } else {
            crate::era::put_modern_headers(&mut headers, method, &Map::new());
            crate::era::discover_request(&id)
        };
        let answer = pool.send(Outbound::gateway(headers.clone()), body).await?;
        let minted = answer.response.header(MCP_SESSION_ID).cloned();
        let replica = answer.lease.url().to_owned();
        let mut reader = AnswerReader::new(answer, pool.read_limits);
        let result = read_result(&mut reader, &id, method).await;
        drop(reader);
        let stateful = minted.is_some();
        if let Some(session) = minted {
            // The probe's session is of no use: end it rather than leave
            // it to the upstream's expiry.
            let pool = pool.clone();
            headers.insert(MCP_SESSION_ID, session);
            tokio::spawn(async move {
                let close = pool.send_to(
                    &replica,
                    http::Method::DELETE,
                    Outbound::gateway(headers),
                    Bytes::new(),
                );
                let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
            });
        }
        Ok((result?, stateful))
    }

    /// For the admin API.
    pub fn snapshot(&self) -> Value {
        serde_json::json!({
            "configured": self.configured.as_str(),
            "resolved": self.known().map(Era::as_str),
        })
    }
}
