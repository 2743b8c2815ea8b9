//! Routes: which org, which server and which endpoint a path names.
//!
//! Paths are `{base_path}/{org}/mcp` (Streamable HTTP), `{base_path}/{org}/sse`
//! and `{base_path}/{org}/messages` (HTTP+SSE of 2024-11-05) and
//! `{base_path}/{org}/ws` (the MCP endpoint over a WebSocket) for an org with
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
    /// `ws`: the MCP endpoint over a WebSocket.
    Ws,
}

/// What every endpoint of an org shares: how callers are checked, and the
/// key its sessions belong to.
pub struct Front {
    /// The org's name.
    pub name: Arc<str>,
    /// `org` for the one-server shorthand and for the federated endpoint,
    /// `org/server` for one of `servers`: the path under the base, and
    /// what sessions belong to.
    pub key: Arc<str>,
    /// The server's name, for one of `servers`.
    pub server_name: Option<Arc<str>>,
    pub auth: AuthMode,
    /// Scopes a token needs for this org.
    pub scopes: Vec<String>,
    /// Scopes with which the org's policies grant more (see
    /// [`crate::policy::offered_scopes`]).
    pub offered: Vec<String>,
    /// The organization alias tokens must carry.
    pub organization: String,
    /// Who every caller is when `auth` is `none`.
    pub anonymous: Arc<ratatosk_auth::Identity>,
    pub metrics: crate::metrics::OrgMetrics,
    /// The org's rate limits: one state for all of its endpoints.
    pub rates: Arc<crate::ratelimit::RateLimits>,
}

/// One route: an org's front and one server behind it.
pub struct OrgRoute {
    pub front: Front,
    /// The upstream MCP server (`orgs.<org>.upstream`, or one of
    /// `orgs.<org>.servers`).
    pub server: ServerRoute,
    /// The org's tool policy and the server's own rules.
    pub policy: crate::policy::Policy,
}

impl std::ops::Deref for OrgRoute {
    type Target = Front;
    fn deref(&self) -> &Front {
        &self.front
    }
}

impl Front {
    /// The org's scopes a client is told to ask for (beside the realm's
    /// client scopes): those it needs, then those its policies offer.
    pub fn wanted_scopes(&self) -> Vec<String> {
        self.scopes.iter().chain(&self.offered).cloned().collect()
    }
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

/// The federated endpoint of an org with `servers`: one session over all
/// of them, with prefixed names.
pub struct Federation {
    pub front: Front,
    /// Each member's prefix (in the members' order) and the separator
    /// (`orgs.<org>.separator`): how names are shown and routed.
    pub naming: crate::federation::Naming,
    /// Sorted by name.
    pub members: Vec<Member>,
}

impl std::ops::Deref for Federation {
    type Target = Front;
    fn deref(&self) -> &Front {
        &self.front
    }
}

/// One server of a federation.
pub struct Member {
    pub name: Arc<str>,
    /// The server's own route (`org/server`), which the federation's
    /// sessions reach through sessions of their own.
    pub route: Arc<OrgRoute>,
}

/// What a path reaches.
#[derive(Clone)]
pub enum Target {
    /// One server, transparently.
    Server(Arc<OrgRoute>),
    /// An org's federated endpoint.
    Federated(Arc<Federation>),
}

impl Target {
    pub fn front(&self) -> &Front {
        match self {
            Target::Server(route) => route,
            Target::Federated(federation) => federation,
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
        credentials: crate::upstream::Credentials,
    ) -> Result<ServerRoute, PoolError> {
        Self::serving(org, config, max_answer_bytes, metrics, credentials, None)
    }

    /// The same, its requests served in-process by `local` if given (an
    /// `openapi` server).
    pub fn serving(
        org: &str,
        config: &UpstreamConfig,
        max_answer_bytes: usize,
        metrics: &Metrics,
        credentials: crate::upstream::Credentials,
        local: Option<Arc<dyn crate::upstream::LocalServer>>,
    ) -> Result<ServerRoute, PoolError> {
        let era = Arc::new(UpstreamEra::new(org, config.era, metrics));
        let mut pool = Pool::new(org, config, max_answer_bytes, metrics)?
            .with_credentials(credentials)
            .with_era(era.clone());
        if let Some(local) = local {
            pool = pool.with_local(local);
        }
        Ok(ServerRoute {
            era,
            max_input_rounds: config.max_input_rounds,
            pool: Arc::new(pool),
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

/// Why the routes of a config cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("route '{0}': {1}")]
    Pool(Arc<str>, PoolError),
    #[error("route '{0}': a policy glob: {1}")]
    Policy(Arc<str>, globset::Error),
    #[error("route '{0}': upstream.auth: {1}")]
    Credentials(Arc<str>, String),
    #[error("route '{0}': openapi.{1}")]
    OpenApi(Arc<str>, String),
    #[error("org '{0}': {1}")]
    RateLimit(String, crate::ratelimit::RateLimitError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The path is not an MCP endpoint at all.
    NoEndpoint,
    /// The path has the right shape but names no configured org.
    UnknownOrg(String),
    /// The org exists but has no server of that name.
    UnknownServer { org: String, server: String },
}

pub struct Routes {
    base_path: String,
    /// By key (`org`, or `org/server`).
    routes: HashMap<Arc<str>, Arc<OrgRoute>>,
    /// The federated endpoints of orgs with `servers`, by org.
    federations: HashMap<Arc<str>, Arc<Federation>>,
}

impl Routes {
    /// The routes `config` describes: one per org with `upstream`, one per
    /// server and a federated endpoint per org with `servers`.
    pub fn from_config(
        config: &crate::config::Config,
        metrics: &Metrics,
        issuers: crate::upstream::Issuers<'_>,
    ) -> Result<Routes, RoutesError> {
        Self::reusing(config, metrics, issuers, &|_| None, &|_| None)
    }

    /// The same, except that a route `reuse` gives (by key) is taken as it
    /// is: a reload keeps the routes whose config did not change, with
    /// their connections, probed era and replica health; and an org's
    /// rate limits that `reuse_rates` gives (by org), with their state.
    pub fn reusing(
        config: &crate::config::Config,
        metrics: &Metrics,
        issuers: crate::upstream::Issuers<'_>,
        reuse: &dyn Fn(&str) -> Option<Arc<OrgRoute>>,
        reuse_rates: &dyn Fn(&str) -> Option<Arc<crate::ratelimit::RateLimits>>,
    ) -> Result<Routes, RoutesError> {
        let max_answer = config.limits.max_answer_bytes;
        let mut routes = Vec::new();
        let mut federations = Vec::new();
        for (name, org) in &config.orgs {
            let entries = org.server_entries();
            let rules = entries.iter().flat_map(|e| e.policy.iter());
            let offered =
                crate::policy::offered_scopes(org.policy.iter().chain(rules), &org.scopes);
            // A reload keeps the state of an org's limits, which all its
            // routes and its federation share, while they are unchanged.
            let rates = match reuse_rates(name) {
                Some(rates) => rates,
                None => Arc::new(
                    crate::ratelimit::RateLimits::new(name, &org.rate_limits, metrics)
                        .map_err(|e| RoutesError::RateLimit(name.clone(), e))?,
                ),
            };
            let front = |key: Arc<str>, server_name: Option<&str>| Front {
                name: name.as_str().into(),
                key,
                server_name: server_name.map(Into::into),
                auth: org.auth,
                scopes: org.scopes.clone(),
                offered: offered.clone(),
                organization: org.organization.clone().unwrap_or_else(|| name.clone()),
                anonymous: Arc::new(ratatosk_auth::Identity::anonymous(name)),
                metrics: metrics.for_org(name),
                rates: rates.clone(),
            };
            let mut members = Vec::new();
            for entry in org.server_entries() {
                let key = OrgRoute::key_of(name, entry.name);
                let route = match reuse(&key) {
                    Some(route) => route,
                    None => {
                        let credentials = crate::upstream::Credentials::new(
                            &key,
                            name,
                            &entry.upstream.auth,
                            issuers,
                        )
                        .map_err(|e| RoutesError::Credentials(key.clone(), e))?;
                        let local = match entry.openapi {
                            Some(openapi) => Some(Arc::new(
                                crate::openapi::OpenApiServer::new(&key, openapi, max_answer)
                                    .map_err(|e| RoutesError::OpenApi(key.clone(), e))?,
                            )
                                as Arc<dyn crate::upstream::LocalServer>),
                            None => None,
                        };
                        let server = ServerRoute::serving(
                            &key,
                            entry.upstream,
                            max_answer,
                            metrics,
                            credentials,
                            local,
                        )
                        .map_err(|e| RoutesError::Pool(key.clone(), e))?;
                        let rules = org.policy.iter().chain(entry.policy);
                        let policy =
                            crate::policy::Policy::new(entry.prefix, org.separator(), rules)
                                .map_err(|e| RoutesError::Policy(key.clone(), e))?;
                        Arc::new(OrgRoute {
                            front: front(key, entry.name),
                            server,
                            policy,
                        })
                    }
                };
                if let Some(server_name) = entry.name {
                    let member = Member {
                        name: server_name.into(),
                        route: route.clone(),
                    };
                    members.push((member, entry.prefix.to_owned()));
                }
                routes.push(route);
            }
            // An org open to registration has its federated endpoint
            // before any server registers.
            if !members.is_empty() || org.registration.is_some() {
                members.sort_by(|(a, _), (b, _)| a.name.cmp(&b.name));
                let (members, prefixes) = members.into_iter().unzip();
                federations.push(Federation {
                    front: front(name.as_str().into(), None),
                    naming: crate::federation::Naming {
                        separator: org.separator().to_owned(),
                        prefixes,
                    },
                    members,
                });
            }
        }
        Ok(Routes::new(&config.base_path, routes, federations))
    }

    /// `federations` are the federated endpoints, whose members are
    /// among `routes`.
    pub fn new(
        base_path: &str,
        routes: impl IntoIterator<Item = Arc<OrgRoute>>,
        federations: impl IntoIterator<Item = Federation>,
    ) -> Routes {
        Routes {
            base_path: base_path.to_owned(),
            routes: routes.into_iter().map(|o| (o.key.clone(), o)).collect(),
            federations: federations
                .into_iter()
                .map(|f| (f.name.clone(), Arc::new(f)))
                .collect(),
        }
    }

    /// The federated endpoint of org `name`, if it has `servers`.
    pub fn federation(&self, name: &str) -> Option<&Arc<Federation>> {
        self.federations.get(name)
    }

    /// The federated endpoints.
    pub fn federations(&self) -> impl Iterator<Item = &Arc<Federation>> {
        self.federations.values()
    }

    /// Every front: each route's and each federated endpoint's.
    pub fn fronts(&self) -> impl Iterator<Item = &Front> {
        let routes = self.routes.values().map(|r| &r.front);
        routes.chain(self.federations.values().map(|f| &f.front))
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
            Endpoint::Ws => "ws",
        };
        format!("{}/{key}/{tail}", self.base_path)
    }

    pub fn resolve(&self, path: &str) -> Result<(Target, Endpoint), RouteError> {
        let rest = path
            .strip_prefix(self.base_path.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(RouteError::NoEndpoint)?;
        let (key, tail) = rest.rsplit_once('/').ok_or(RouteError::NoEndpoint)?;
        let endpoint = match tail {
            "mcp" => Endpoint::Mcp,
            "sse" => Endpoint::Sse,
            "messages" => Endpoint::Messages,
            "ws" => Endpoint::Ws,
            _ => return Err(RouteError::NoEndpoint),
        };
        if let Some(route) = self.routes.get(key) {
            return Ok((Target::Server(route.clone()), endpoint));
        }
        match key.split_once('/') {
            None => match self.federations.get(key) {
                Some(federation) => Ok((Target::Federated(federation.clone()), endpoint)),
                None => Err(RouteError::UnknownOrg(key.to_owned())),
            },
            Some((org, server)) if !server.is_empty() && !server.contains('/') => {
                if self.federations.contains_key(org) {
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
    use crate::metrics::Metrics;

    fn routes(base: &str) -> Routes {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: \"{base}\"\n\
             publish: {{secret: 0123456789abcdef01}}\norgs:\n\
             \x20 org-1: {{upstream: {{era: stateless-2025, replicas: [http://127.0.0.1:1/mcp]}}}}\n\
             \x20 org-2: {{upstream: {{era: stateless-2025, replicas: [http://127.0.0.1:1/mcp]}}}}\n\
             \x20 org-3:\n    servers:\n\
             \x20     tickets: {{upstream: {{era: modern, replicas: [http://127.0.0.1:1/mcp]}}}}\n\
             \x20     files: {{upstream: {{era: modern, replicas: [http://127.0.0.1:2/mcp]}}, prefix: fs}}\n"
        );
        let config =
            crate::config::Config::from_yaml(&yaml, std::path::Path::new("t.yaml"), &|_| None)
                .expect("config");
        let metrics = Metrics::new().expect("metrics");
        Routes::from_config(&config, &metrics, Default::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn server(target: Target) -> Arc<OrgRoute> {
        match target {
            Target::Server(route) => route,
            Target::Federated(f) => panic!("expected a server route, got {}'s federation", f.name),
        }
    }

    #[test]
    fn resolves_endpoints_under_the_base_path() {
        let r = routes("/api/v1/mcp");
        let (org, ep) = r.resolve("/api/v1/mcp/org-1/sse").expect("route");
        assert_eq!((&*server(org).name, ep), ("org-1", Endpoint::Sse));
        let (org, ep) = r.resolve("/api/v1/mcp/org-2/mcp").expect("route");
        assert_eq!((&*server(org).name, ep), ("org-2", Endpoint::Mcp));
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
        let route = server(route);
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
        assert_eq!(&*server(route).key, "org-3/tickets");
        assert_eq!(
            r.resolve("/api/org-3/search/mcp").err(),
            Some(RouteError::UnknownServer {
                org: "org-3".into(),
                server: "search".into()
            })
        );
        // The org endpoint is the federated one, over both servers.
        let Ok((Target::Federated(f), Endpoint::Mcp)) = r.resolve("/api/org-3/mcp") else {
            panic!("expected the federated endpoint");
        };
        assert_eq!((&*f.key, f.naming.separator.as_str()), ("org-3", "__"));
        let members: Vec<(&str, &str, &str)> = f
            .members
            .iter()
            .zip(&f.naming.prefixes)
            .map(|(m, prefix)| (&*m.name, prefix.as_str(), &*m.route.key))
            .collect();
        assert_eq!(
            members,
            [
                ("files", "fs", "org-3/files"),
                ("tickets", "tickets", "org-3/tickets")
            ]
        );
        assert!(r.federation("org-1").is_none());
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
