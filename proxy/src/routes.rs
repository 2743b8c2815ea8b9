//! Routes: which org, which server and which endpoint a path names.
//!
//! Paths are `{base_path}/{org}/mcp` (Streamable HTTP), `{base_path}/{org}/sse`
//! and `{base_path}/{org}/messages` (HTTP+SSE of 2024-11-05) for an org with
//! one `upstream`, and `{base_path}/{org}/{server}/mcp` (and so on) for each
//! of an org's `servers`. A route's key (`org`, or `org/server`) is what its
//! sessions belong to: a session of one route is unknown on every other.

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

/// One route: an org (how callers are checked) and one server behind it.
pub struct OrgRoute {
    /// The org's name.
    pub name: Arc<str>,
    /// `org` for the one-server shorthand, `org/server` for one of
    /// `servers`: the path under the base, and what sessions belong to.
    pub key: Arc<str>,
    /// The server's name, for one of `servers`.
    pub server_name: Option<Arc<str>>,
    pub auth: AuthMode,
    /// Scopes a token needs for this org.
    pub scopes: Vec<String>,
    /// The organization alias tokens must carry.
    pub organization: String,
    /// Who every caller is when `auth` is `none`.
    pub anonymous: Arc<ratatosk_auth::Identity>,
    pub metrics: crate::metrics::OrgMetrics,
    /// The upstream MCP server (`orgs.<org>.upstream`, or one of
    /// `orgs.<org>.servers`).
    pub server: ServerRoute,
}

impl OrgRoute {
    /// The route's key for `org` and its server `server_name` (none for
    /// the one-server shorthand).
    pub fn key_of(org: &str, server_name: Option<&str>) -> Arc<str> {
        match server_name {
            Some(server) => format!("{org}/{server}").into(),
            None => org.into(),
        }
    }
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
    /// The org exists but has no server of that name.
    UnknownServer { org: String, server: String },
    /// The org endpoint of an org with `servers`, whose federation over
    /// its servers is not served yet; each server has its own endpoint.
    Federated {
        org: Arc<str>,
        servers: Vec<Arc<str>>,
    },
}

pub struct Routes {
    base_path: String,
    /// By key (`org`, or `org/server`).
    routes: HashMap<Arc<str>, Arc<OrgRoute>>,
    /// Orgs with `servers`, and their servers' names, sorted.
    with_servers: HashMap<Arc<str>, Vec<Arc<str>>>,
}

impl Routes {
    pub fn new(base_path: &str, routes: impl IntoIterator<Item = OrgRoute>) -> Routes {
        let routes: HashMap<Arc<str>, Arc<OrgRoute>> = routes
            .into_iter()
            .map(|o| (o.key.clone(), Arc::new(o)))
            .collect();
        let mut with_servers: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        for route in routes.values() {
            if let Some(server) = &route.server_name {
                with_servers
                    .entry(route.name.clone())
                    .or_default()
                    .push(server.clone());
            }
        }
        for servers in with_servers.values_mut() {
            servers.sort();
        }
        Routes {
            base_path: base_path.to_owned(),
            routes,
            with_servers,
        }
    }

    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The route of `key` (`org`, or `org/server`).
    pub fn org(&self, key: &str) -> Option<&Arc<OrgRoute>> {
        self.routes.get(key)
    }

    /// Every route, of every org.
    pub fn orgs(&self) -> impl Iterator<Item = &Arc<OrgRoute>> {
        self.routes.values()
    }

    /// The routes of org `name`: its one, or one per server.
    pub fn of_org<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Arc<OrgRoute>> {
        self.routes.values().filter(move |r| *r.name == *name)
    }

    /// The path clients use for an endpoint of route `key`, e.g.
    /// `/api/v1/mcp/org-1/messages` or `/api/v1/mcp/org-1/files/mcp`.
    pub fn path_of(&self, key: &str, endpoint: Endpoint) -> String {
        let tail = match endpoint {
            Endpoint::Mcp => "mcp",
            Endpoint::Sse => "sse",
            Endpoint::Messages => "messages",
        };
        format!("{}/{key}/{tail}", self.base_path)
    }

    pub fn resolve(&self, path: &str) -> Result<(Arc<OrgRoute>, Endpoint), RouteError> {
        let rest = path
            .strip_prefix(self.base_path.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(RouteError::NoEndpoint)?;
        let (key, tail) = rest.rsplit_once('/').ok_or(RouteError::NoEndpoint)?;
        let endpoint = match tail {
            "mcp" => Endpoint::Mcp,
            "sse" => Endpoint::Sse,
            "messages" => Endpoint::Messages,
            _ => return Err(RouteError::NoEndpoint),
        };
        if let Some(route) = self.routes.get(key) {
            return Ok((route.clone(), endpoint));
        }
        match key.split_once('/') {
            None => match self.with_servers.get_key_value(key) {
                Some((org, servers)) => Err(RouteError::Federated {
                    org: org.clone(),
                    servers: servers.clone(),
                }),
                None => Err(RouteError::UnknownOrg(key.to_owned())),
            },
            Some((org, server)) if !server.is_empty() && !server.contains('/') => {
                if self.with_servers.contains_key(org) {
                    Err(RouteError::UnknownServer {
                        org: org.to_owned(),
                        server: server.to_owned(),
                    })
                } else if self.routes.contains_key(org) {
                    // An org with one server has no server paths.
                    Err(RouteError::NoEndpoint)
                } else {
                    Err(RouteError::UnknownOrg(org.to_owned()))
                }
            }
            Some(_) => Err(RouteError::NoEndpoint),
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
        let route = |name: &str, server: Option<&str>| OrgRoute {
            name: name.into(),
            key: OrgRoute::key_of(name, server),
            server_name: server.map(Into::into),
            auth: AuthMode::None,
            scopes: Vec::new(),
            organization: name.into(),
            anonymous: Arc::new(ratatosk_auth::Identity::anonymous(name)),
            metrics: metrics.for_org(name),
            server: ServerRoute::new(name, &cfg, 1 << 20, &metrics).expect("server"),
        };
        Routes::new(
            base,
            [
                route("org-1", None),
                route("org-2", None),
                route("org-3", Some("files")),
                route("org-3", Some("tickets")),
            ],
        )
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

    #[test]
    fn each_server_of_an_org_has_its_own_endpoints() {
        let r = routes("/api");
        let (route, ep) = r.resolve("/api/org-3/files/sse").expect("route");
        assert_eq!(
            (&*route.name, &*route.key, ep),
            ("org-3", "org-3/files", Endpoint::Sse)
        );
        assert_eq!(route.server_name.as_deref(), Some("files"));
        assert_eq!(
            r.path_of(&route.key, Endpoint::Messages),
            "/api/org-3/files/messages"
        );
        let (route, _) = r.resolve("/api/org-3/tickets/mcp").expect("route");
        assert_eq!(&*route.key, "org-3/tickets");
        assert_eq!(
            r.resolve("/api/org-3/search/mcp").err(),
            Some(RouteError::UnknownServer {
                org: "org-3".into(),
                server: "search".into()
            })
        );
        assert_eq!(
            r.resolve("/api/org-3/mcp").err(),
            Some(RouteError::Federated {
                org: "org-3".into(),
                servers: vec!["files".into(), "tickets".into()]
            })
        );
        // An org with one server has no server paths; unknown orgs stay unknown.
        assert_eq!(
            r.resolve("/api/org-1/files/mcp").err(),
            Some(RouteError::NoEndpoint)
        );
        assert_eq!(
            r.resolve("/api/org-9/files/mcp").err(),
            Some(RouteError::UnknownOrg("org-9".into()))
        );
        for bad in [
            "/api/org-3/files/x/mcp",
            "/api/org-3//mcp",
            "/api/org-3/files/",
        ] {
            assert_eq!(r.resolve(bad).err(), Some(RouteError::NoEndpoint), "{bad}");
        }
        let mut keys: Vec<&str> = r.of_org("org-3").map(|o| &*o.key).collect();
        keys.sort();
        assert_eq!(keys, ["org-3/files", "org-3/tickets"]);
    }
}
