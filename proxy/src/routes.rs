//! Routes: which org and which endpoint a path names.
//!
//! Paths are `{base_path}/{org}/mcp` (Streamable HTTP), `{base_path}/{org}/sse`
//! and `{base_path}/{org}/messages` (HTTP+SSE of 2024-11-05).

use std::collections::HashMap;
use std::sync::Arc;

use ratatosk_auth::AuthMode;

use crate::config::{Era, UpstreamConfig};
use crate::metrics::Metrics;
use crate::upstream::{Pool, PoolError, ProbeError, UpstreamEra};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Mcp,
    Sse,
    Messages,
}

/// One org's route: how callers are checked, and the server behind it.
pub struct OrgRoute {
    pub name: Arc<str>,
    pub auth: AuthMode,
    /// Scopes a token needs for this org.
    pub scopes: Vec<String>,
    /// The organization alias tokens must carry.
    pub organization: String,
    /// Who every caller is when `auth` is `none`.
    pub anonymous: Arc<ratatosk_auth::Identity>,
    pub metrics: crate::metrics::OrgMetrics,
    /// The org's upstream MCP server (`orgs.<org>.upstream`).
    pub server: ServerRoute,
}

/// One upstream MCP server: its replicas, the era it speaks, and how many
/// input rounds a call may take. What belongs to a server, not to its org,
/// lives here, so that an org can have several.
pub struct ServerRoute {
    /// The era the server speaks, configured or probed.
    pub era: Arc<UpstreamEra>,
    /// `upstream.max_input_rounds`.
    pub max_input_rounds: u32,
    pub pool: Arc<Pool>,
}

impl ServerRoute {
    /// The server of `org` that `config` describes; `max_answer_bytes` is
    /// the gateway's `limits.max_answer_bytes`.
    pub fn new(
        org: &str,
        config: &UpstreamConfig,
        max_answer_bytes: usize,
        metrics: &Metrics,
    ) -> Result<ServerRoute, PoolError> {
        Ok(ServerRoute {
            era: Arc::new(UpstreamEra::new(org, config.era, metrics)),
            max_input_rounds: config.max_input_rounds,
            pool: Arc::new(Pool::new(org, config, max_answer_bytes, metrics)?),
        })
    }

    /// The era it speaks, probed first if it is `auto` and unknown.
    pub async fn resolve_era(&self) -> Result<Era, ProbeError> {
        self.era.resolve(&self.pool).await
    }

    /// Its own description, as a server of `era` gives it (see
    /// [`UpstreamEra::info`]).
    pub async fn info(&self, era: Era) -> Result<Arc<serde_json::Value>, ProbeError> {
        self.era.info(&self.pool, era).await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The path is not an MCP endpoint at all.
    NoEndpoint,
    /// The path has the right shape but names no configured org.
    UnknownOrg(String),
}

pub struct Routes {
    base_path: String,
    orgs: HashMap<Arc<str>, Arc<OrgRoute>>,
}

impl Routes {
    pub fn new(base_path: &str, orgs: impl IntoIterator<Item = OrgRoute>) -> Routes {
        Routes {
            base_path: base_path.to_owned(),
            orgs: orgs
                .into_iter()
                .map(|o| (o.name.clone(), Arc::new(o)))
                .collect(),
        }
    }

    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    pub fn org(&self, name: &str) -> Option<&Arc<OrgRoute>> {
        self.orgs.get(name)
    }

    pub fn orgs(&self) -> impl Iterator<Item = &Arc<OrgRoute>> {
        self.orgs.values()
    }

    /// The path clients use for an endpoint, e.g. `/api/v1/mcp/org-1/messages`.
    pub fn path_of(&self, org: &str, endpoint: Endpoint) -> String {
        let tail = match endpoint {
            Endpoint::Mcp => "mcp",
            Endpoint::Sse => "sse",
            Endpoint::Messages => "messages",
        };
        format!("{}/{org}/{tail}", self.base_path)
    }

    pub fn resolve(&self, path: &str) -> Result<(Arc<OrgRoute>, Endpoint), RouteError> {
        let rest = path
            .strip_prefix(self.base_path.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(RouteError::NoEndpoint)?;
        let (org, tail) = rest.split_once('/').ok_or(RouteError::NoEndpoint)?;
        let endpoint = match tail {
            "mcp" => Endpoint::Mcp,
            "sse" => Endpoint::Sse,
            "messages" => Endpoint::Messages,
            _ => return Err(RouteError::NoEndpoint),
        };
        match self.orgs.get(org) {
            Some(route) => Ok((route.clone(), endpoint)),
            None => Err(RouteError::UnknownOrg(org.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Era, UpstreamConfig};
    use crate::metrics::Metrics;
    use std::time::Duration;

    fn routes(base: &str) -> Routes {
        let metrics = Metrics::new().expect("metrics");
        let cfg = UpstreamConfig {
            era: Era::Stateless2025,
            replicas: vec!["http://127.0.0.1:1/mcp".into()],
            timeout: Duration::from_secs(1),
            max_duration: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(1),
            eject_for: Duration::from_secs(1),
            max_input_rounds: 10,
        };
        let org = |name: &str| OrgRoute {
            name: name.into(),
            auth: AuthMode::None,
            scopes: Vec::new(),
            organization: name.into(),
            anonymous: Arc::new(ratatosk_auth::Identity::anonymous(name)),
            metrics: metrics.for_org(name),
            server: ServerRoute::new(name, &cfg, 1 << 20, &metrics).expect("server"),
        };
        Routes::new(base, [org("org-1"), org("org-2")])
    }

    #[test]
    fn resolves_endpoints_under_the_base_path() {
        let r = routes("/api/v1/mcp");
        let (org, ep) = r.resolve("/api/v1/mcp/org-1/sse").expect("route");
        assert_eq!((&*org.name, ep), ("org-1", Endpoint::Sse));
        let (org, ep) = r.resolve("/api/v1/mcp/org-2/mcp").expect("route");
        assert_eq!((&*org.name, ep), ("org-2", Endpoint::Mcp));
        assert_eq!(
            r.path_of("org-1", Endpoint::Messages),
            "/api/v1/mcp/org-1/messages"
        );
        assert_eq!(r.resolve("/org-1/mcp").err(), Some(RouteError::NoEndpoint));
        assert_eq!(
            r.resolve("/api/v1/mcpx/org-1/mcp").err(),
            Some(RouteError::NoEndpoint)
        );
    }

    #[test]
    fn empty_base_path_and_unknown_orgs() {
        let r = routes("");
        assert!(r.resolve("/org-1/messages").is_ok());
        assert_eq!(
            r.resolve("/org-9/mcp").err(),
            Some(RouteError::UnknownOrg("org-9".into()))
        );
        for bad in [
            "/",
            "/org-1",
            "/org-1/",
            "/org-1/mcp/extra",
            "/org-1/other",
            "",
        ] {
            assert_eq!(r.resolve(bad).err(), Some(RouteError::NoEndpoint), "{bad}");
        }
    }
}
