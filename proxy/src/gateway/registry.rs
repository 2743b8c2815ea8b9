//! Servers that register themselves: `PUT /orgs/{org}/servers/{name}` on
//! the admin listener, with the server's config (`upstream`, `prefix`)
//! and a `ttl` it must renew within. An org takes registrations only with
//! `orgs.<org>.registration`.
//!
//! The registrations are kept in the session store's place: in memory, or
//! in Redis (one hash per org, each entry's expiry taken from Redis's
//! clock), so that every node serves them. Each node reads them again
//! every [`POLL`] (and at once when a node tells of a change) and, when they
//! changed, applies its config file's config plus the registered servers
//! as a reload does: the org's federated endpoint gains or loses them,
//! and its sessions are told that the lists changed. A registration that
//! does not fit the config (a file server took its name or prefix) is not
//! served, and a warning says why.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};

use super::Gateway;
use crate::config::{Config, MIN_REGISTRATION_TTL, Problem};
use crate::edge::Reject;
use crate::jsonrpc::code;
use crate::session::RedisLink;

/// How often a node reads the registrations again (to see other nodes'
/// changes, and expiries).
pub const POLL: Duration = Duration::from_secs(1);

/// Longest wait for Redis to answer.
const REDIS_WAIT: Duration = Duration::from_secs(2);

/// Registered servers by org, then name: each server's tree (`upstream`,
/// `prefix`), as registered.
pub(crate) type Registrations = BTreeMap<String, BTreeMap<String, Arc<Value>>>;

/// Where registrations are kept.
pub(crate) struct Registry {
    store: Store,
}

/// By org and name: the server's tree, and when it expires.
type Entries = BTreeMap<(String, String), (Arc<Value>, Instant)>;

enum Store {
    Memory(Mutex<Entries>),
    Redis {
        conn: RedisLink,
        /// `sessions.key_prefix` and `reg:`; then the org.
        prefix: String,
        put: redis::Script,
        list: redis::Script,
        remove: redis::Script,
    },
}

/// KEYS[1]: the org's registrations (name -> `<expiry ms> <json>`).
/// ARGV: name, ttl in ms, the server's JSON, the org's most servers.
/// -> 1 registered, 0 renewed, -1 the org has its most servers.
const PUT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local others, fresh = 0, 1
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], '^(%d+) '))
  if exp == nil or exp <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] == ARGV[1] then
    fresh = 0
  else
    others = others + 1
  end
end
if fresh == 1 and others >= tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + ttl) .. ' ' .. ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return fresh
";

/// KEYS[1]: the org's registrations. Drops the expired ones.
/// -> {name, ms left, json, ...}
const LIST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local exp, server = string.match(all[i + 1], '^(%d+) (.*)$')
  exp = tonumber(exp)
  if exp == nil or exp <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, string.format('%d', exp - now))
    table.insert(out, server)
  end
end
return out
";

/// KEYS[1]: the org's registrations. ARGV: name. -> 1 if it was there
/// and live.
const REMOVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local exp = tonumber(string.match(entry, '^(%d+) '))
if exp == nil or exp <= now then return 0 end
return 1
";

/// One registration, as read back.
pub(crate) struct Listed {
    pub name: String,
    pub server: Arc<Value>,
    pub expires_in: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("the org has its most registered servers already")]
    Full,
    #[error("the registrations in redis cannot be reached: {0}")]
    Store(String),
}

impl Registry {
    /// Registrations in memory (one node), or in the Redis of `redis`
    /// (a link and the key prefix) for every node.
    pub fn new(redis: Option<(RedisLink, &str)>) -> Registry {
        let store = match redis {
            Some((conn, prefix)) => Store::Redis {
                conn,
                prefix: format!("{prefix}reg:"),
                put: redis::Script::new(PUT),
                list: redis::Script::new(LIST),
                remove: redis::Script::new(REMOVE),
            },
            None => Store::Memory(Mutex::default()),
        };
        Registry { store }
    }

    /// Registers or renews `name` in `org` for `ttl`; whether it is new.
    async fn put(
        &self,
        org: &str,
        name: &str,
        server: &Value,
        ttl: Duration,
        max: usize,
    ) -> Result<bool, RegistryError> {
        match &self.store {
            Store::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                map.retain(|_, (_, expires)| *expires > now);
                let fresh = !map.contains_key(&(org.to_owned(), name.to_owned()));
                if fresh && map.keys().filter(|(o, _)| o == org).count() >= max {
                    return Err(RegistryError::Full);
                }
                let entry = (Arc::new(server.clone()), now + ttl);
                map.insert((org.to_owned(), name.to_owned()), entry);
                Ok(fresh)
            }
            Store::Redis {
                conn, prefix, put, ..
            } => {
                let mut invocation = put.key(format!("{prefix}{org}"));
                invocation
                    .arg(name)
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                    .arg(server.to_string())
                    .arg(max);
                let mut conn = conn.clone();
                match redis_call(invocation.invoke_async::<i64>(&mut conn)).await? {
                    -1 => Err(RegistryError::Full),
                    fresh => Ok(fresh == 1),
                }
            }
        }
    }

    /// Removes `name` from `org`; whether it was there.
    async fn remove(&self, org: &str, name: &str) -> Result<bool, RegistryError> {
        match &self.store {
            Store::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let removed = map.remove(&(org.to_owned(), name.to_owned()));
                Ok(removed.is_some_and(|(_, expires)| expires > Instant::now()))
            }
            Store::Redis {
                conn,
                prefix,
                remove,
                ..
            } => {
                let mut conn = conn.clone();
                let mut invocation = remove.key(format!("{prefix}{org}"));
                invocation.arg(name);
                let removed: i64 = redis_call(invocation.invoke_async(&mut conn)).await?;
                Ok(removed == 1)
            }
        }
    }

    /// The live registrations of `org`, by name.
    async fn list(&self, org: &str) -> Result<Vec<Listed>, RegistryError> {
        match &self.store {
            Store::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                map.retain(|_, (_, expires)| *expires > now);
                Ok(map
                    .iter()
                    .filter(|((o, _), _)| o == org)
                    .map(|((_, name), (server, expires))| Listed {
                        name: name.clone(),
                        server: server.clone(),
                        expires_in: *expires - now,
                    })
                    .collect())
            }
            Store::Redis {
                conn, prefix, list, ..
            } => {
                let mut conn = conn.clone();
                let invocation = list.key(format!("{prefix}{org}"));
                let flat: Vec<String> = redis_call(invocation.invoke_async(&mut conn)).await?;
                let mut out = Vec::new();
                for entry in flat.chunks_exact(3) {
                    let server = serde_json::from_str(&entry[2]).map_err(|e| {
                        RegistryError::Store(format!(
                            "registration `{}` of org `{org}` is not JSON: {e}",
                            entry[0]
                        ))
                    })?;
                    out.push(Listed {
                        name: entry[0].clone(),
                        server: Arc::new(server),
                        expires_in: Duration::from_millis(entry[1].parse().unwrap_or(0)),
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
        }
    }
}

async fn redis_call<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, RegistryError> {
    let call = tracing::Instrument::instrument(call, crate::telemetry::redis("registrations"));
    match tokio::time::timeout(REDIS_WAIT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(RegistryError::Store(e.to_string())),
        Err(_) => Err(RegistryError::Store(format!("no answer in {REDIS_WAIT:?}"))),
    }
}

/// `base` (the config file's) with the registered servers that fit it.
/// Those of orgs that take no registrations, those whose name a file
/// server has, and those the config refuses (say, a prefix a file server
/// has) are left out, each with a warning.
pub(crate) fn merged(base: &Config, registered: &Registrations) -> (Config, Registrations) {
    let mut candidates = Vec::new();
    for (org, servers) in registered {
        let Some(org_config) = base.orgs.get(org).filter(|o| o.registration.is_some()) else {
            tracing::warn!(
                org,
                "registered servers are not served: the org no longer takes registrations (orgs.{org}.registration)"
            );
            continue;
        };
        for (name, server) in servers {
            if org_config.servers.contains_key(name) {
                tracing::warn!(
                    org,
                    server = name,
                    "a registered server is not served: the config file has a server of that name"
                );
            } else {
                candidates.push((org.as_str(), name.as_str(), server));
            }
        }
    }
    type Candidate<'a> = (&'a str, &'a str, &'a Arc<Value>);
    fn as_trees<'a>(kept: &[Candidate<'a>]) -> Vec<(&'a str, &'a str, &'a Value)> {
        kept.iter().map(|(o, n, s)| (*o, *n, &***s)).collect()
    }
    fn served(kept: &[Candidate<'_>]) -> Registrations {
        let mut out = Registrations::new();
        for (org, name, server) in kept {
            out.entry((*org).to_owned())
                .or_default()
                .insert((*name).to_owned(), (*server).clone());
        }
        out
    }
    if let Ok(config) = base.with_servers(as_trees(&candidates)) {
        return (config, served(&candidates));
    }
    // Some do not fit: the others, one at a time.
    let mut kept = Vec::new();
    let mut config = base.clone();
    for candidate in candidates {
        kept.push(candidate);
        match base.with_servers(as_trees(&kept)) {
            Ok(next) => config = next,
            Err(problems) => {
                let (org, name, _) = candidate;
                tracing::warn!(
                    org,
                    server = name,
                    "a registered server is not served, the config refuses it: {}",
                    render(&problems)
                );
                kept.pop();
            }
        }
    }
    let served = served(&kept);
    (config, served)
}

/// A URL as the servers' list shows it: without a user or password.
fn without_userinfo(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => String::new(),
    }
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a registration may hold beside `ttl`.
const FIELDS: [&str; 2] = ["upstream", "prefix"];

/// A 400 naming `field` of the registration.
fn bad_field(field: &str, message: impl Into<String>) -> Reject {
    let message = message.into();
    Reject::new(
        StatusCode::BAD_REQUEST,
        code::INVALID_PARAMS,
        format!("invalid registration: `{field}`: {message}"),
    )
    .with_data(json!({"problems": [{"path": field, "message": message}]}))
}

/// 404 for an org the config does not name.
pub fn unknown_org(org: &str) -> Reject {
    Reject::new(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("unknown org '{}'", crate::jsonrpc::clip(org, 64)),
    )
}

fn conflict(message: String) -> Reject {
    Reject::new(StatusCode::CONFLICT, code::BAD_REQUEST, message)
}

fn unavailable(e: RegistryError) -> Reject {
    Reject::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code::INTERNAL_ERROR,
        e.to_string(),
    )
}

/// The server's tree and its ttl from a registration's body, or a 400
/// naming the field. What would let a registrant use the gateway's own
/// credentials or files is refused: `upstream.tls` (files on the
/// gateway's host), `token-exchange` (tokens for any audience), and a
/// `gateway-jwt` audience other than the server's own route.
fn parse_body(body: &[u8], max_ttl: Duration) -> Result<(Value, Duration), Reject> {
    let mut tree: Value = serde_json::from_slice(body).map_err(|e| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            code::PARSE_ERROR,
            format!(
                "the body must be a JSON object (the server's `upstream`, `prefix` and `ttl`): {e}"
            ),
        )
    })?;
    let Some(fields) = tree.as_object_mut() else {
        return Err(bad_field(
            "",
            "expected a JSON object with `upstream`, `prefix` and `ttl`",
        ));
    };
    let ttl = match fields.remove("ttl") {
        None => {
            return Err(bad_field(
                "ttl",
                "missing: how long the registration lasts unless renewed, like `30s`",
            ));
        }
        Some(Value::String(s)) => humantime::parse_duration(&s)
            .map_err(|e| bad_field("ttl", format!("expected a duration like `30s`: {e}")))?,
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                bad_field(
                    "ttl",
                    "expected a number of seconds, or a duration like `30s`",
                )
            })?,
        Some(_) => return Err(bad_field("ttl", "expected a duration like `30s`")),
    };
    if ttl < MIN_REGISTRATION_TTL || ttl > max_ttl {
        return Err(bad_field(
            "ttl",
            format!(
                "expected between {} and {} (the org's registration.max_ttl), got {}",
                humantime::format_duration(MIN_REGISTRATION_TTL),
                humantime::format_duration(max_ttl),
                humantime::format_duration(ttl)
            ),
        ));
    }
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad_field(
            unknown,
            "unknown field; a registration takes `upstream`, `prefix` and `ttl`",
        ));
    }
    if let Some(upstream) = fields.get("upstream").and_then(Value::as_object) {
        if upstream.contains_key("tls") {
            return Err(bad_field(
                "upstream.tls",
                "not taken from a registration (it names files on the gateway's host); put a server that needs it in the config file",
            ));
        }
        if let Some(auth) = upstream.get("auth").and_then(Value::as_object) {
            if auth.get("mode").and_then(Value::as_str) == Some("token-exchange") {
                return Err(bad_field(
                    "upstream.auth.mode",
                    "`token-exchange` is not taken from a registration (it would get callers' tokens for any audience); put the server in the config file",
                ));
            }
            if auth.get("mode").and_then(Value::as_str) == Some("gateway-jwt")
                && auth.contains_key("audience")
            {
                return Err(bad_field(
                    "upstream.auth.audience",
                    "a registered server's `gateway-jwt` is addressed to its own route (`<org>/<name>`); leave `audience` out",
                ));
            }
        }
    }
    Ok((tree, ttl))
}

/// Problems of the merged config, as problems of the registration: the
/// paths under `orgs.<org>.servers.<name>`, made relative to the body.
fn registration_problems(problems: Vec<Problem>, org: &str, name: &str) -> Reject {
    let at = format!("orgs.{org}.servers.{name}");
    let mut own = Vec::new();
    let mut others = Vec::new();
    for p in problems {
        match p.path.strip_prefix(&at) {
            Some(rest) if rest.is_empty() || rest.starts_with('.') => own.push(Problem {
                path: rest.trim_start_matches('.').to_owned(),
                message: p.message,
            }),
            _ => others.push(p),
        }
    }
    if own.is_empty() {
        return conflict(format!(
            "the registration does not fit the running config: {}",
            render(&others)
        ));
    }
    let first = &own[0];
    let listed: Vec<Value> = own
        .iter()
        .map(|p| json!({"path": p.path, "message": p.message}))
        .collect();
    let field = if first.path.is_empty() {
        "the server's name".to_owned()
    } else {
        format!("`{}`", first.path)
    };
    Reject::new(
        StatusCode::BAD_REQUEST,
        code::INVALID_PARAMS,
        format!("invalid registration: {field}: {}", first.message),
    )
    .with_data(json!({"problems": listed}))
}

impl Gateway {
    /// Whether `presented` is org `org`'s registration secret (compared in
    /// constant time). The admin secret is checked by the caller.
    pub fn is_registration_secret(&self, org: &str, presented: &[u8]) -> bool {
        let live = self.live();
        let secret = live
            .config
            .orgs
            .get(org)
            .and_then(|o| o.registration.as_ref())
            .and_then(|r| r.secret.as_deref());
        secret.is_some_and(|s| constant_time_eq::constant_time_eq(presented, s.as_bytes()))
    }

    /// The org's registration settings, or why it takes none.
    /// The config file's config (read once: a reload may change it), and
    /// the org's registration settings and servers; or why it takes none.
    fn registration_of(
        &self,
        org: &str,
    ) -> Result<(crate::config::RegistrationConfig, Arc<Config>), Reject> {
        let base = self.reloads.base();
        let Some(org_config) = base.orgs.get(org) else {
            return Err(unknown_org(org));
        };
        let registration = org_config.registration.clone().ok_or_else(|| {
            Reject::new(
                StatusCode::FORBIDDEN,
                code::BAD_REQUEST,
                format!(
                    "org '{org}' takes no registrations: its config has no `orgs.{org}.registration`"
                ),
            )
        })?;
        Ok((registration, base))
    }

    /// Whether the config file gives org `org` a server `name`.
    fn in_file(base: &Config, org: &str, name: &str) -> bool {
        base.orgs
            .get(org)
            .is_some_and(|o| o.servers.contains_key(name))
    }

    /// `PUT /orgs/{org}/servers/{name}`: registers or renews a server;
    /// the status (201 registered, 200 renewed) and what to answer.
    pub async fn register(
        self: &Arc<Self>,
        org: &str,
        name: &str,
        body: &[u8],
    ) -> Result<(StatusCode, Value), Reject> {
        let outcome = self.try_register(org, name, body).await;
        if outcome.is_err() && self.live().config.orgs.contains_key(org) {
            self.count_registration(org, "refused");
        }
        outcome
    }

    async fn try_register(
        self: &Arc<Self>,
        org: &str,
        name: &str,
        body: &[u8],
    ) -> Result<(StatusCode, Value), Reject> {
        let (registration, base) = self.registration_of(org)?;
        if Self::in_file(&base, org, name) {
            return Err(conflict(format!(
                "org '{org}' has a server '{name}' in its config file, which a registration cannot replace; choose another name"
            )));
        }
        let (server, ttl) = parse_body(body, registration.max_ttl)?;
        // Each server needs its own prefix: say whose it is.
        let served = self.reloads.served();
        let prefix = server
            .get("prefix")
            .and_then(Value::as_str)
            .unwrap_or(name)
            .to_owned();
        let live = self.live_full();
        if let Some(org_config) = live.config.orgs.get(org) {
            for entry in org_config.server_entries() {
                if entry.name != Some(name) && entry.prefix == prefix && !prefix.is_empty() {
                    return Err(conflict(format!(
                        "prefix `{prefix}` is server '{}''s in org '{org}': each server needs its own; register with another `prefix`",
                        entry.name.unwrap_or_default()
                    )));
                }
            }
        }
        // Checked as the config file is, with the servers served now.
        let mut others: Vec<(&str, &str, &Value)> = served
            .iter()
            .flat_map(|(o, servers)| {
                servers
                    .iter()
                    .map(move |(n, s)| (o.as_str(), n.as_str(), &**s))
            })
            .filter(|(o, n, _)| !(*o == org && *n == name))
            .collect();
        others.push((org, name, &server));
        base.with_servers(others)
            .map_err(|problems| registration_problems(problems, org, name))?;
        let unchanged = served
            .get(org)
            .and_then(|servers| servers.get(name))
            .is_some_and(|s| **s == server);
        let fresh = self
            .registry
            .put(org, name, &server, ttl, registration.max_servers)
            .await
            .map_err(|e| match e {
                RegistryError::Full => conflict(format!(
                    "org '{org}' has {} registered servers, its most (orgs.{org}.registration.max_servers)",
                    registration.max_servers
                )),
                e => unavailable(e),
            })?;
        let result = match (fresh, unchanged) {
            (true, _) => "registered",
            (false, true) => "renewed",
            (false, false) => "updated",
        };
        self.count_registration(org, result);
        if !unchanged {
            // Served here before the answer.
            self.registrations_changed(org, name).await;
            let served = self.reloads.served();
            if !served.get(org).is_some_and(|s| s.contains_key(name)) {
                // Another registration took its prefix meanwhile (the
                // servers are taken in the order of their names).
                if fresh {
                    let _ = self.registry.remove(org, name).await;
                    self.registrations_changed(org, name).await;
                }
                return Err(conflict(format!(
                    "server '{name}' is not served in org '{org}': another server took its prefix `{prefix}` meanwhile, or the registrations cannot be read now (the gateway's log says which)"
                )));
            }
        }
        tracing::info!(org, server = name, ttl = ?ttl, result, "server registration");
        let base_url = format!("{}{}/{org}", self.public_url, base.base_path);
        let status = if fresh {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((
            status,
            json!({
                "org": org,
                "name": name,
                "result": result,
                "ttl_ms": u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                "prefix": prefix,
                "endpoint": format!("{base_url}/{name}/mcp"),
                "federated_endpoint": format!("{base_url}/mcp"),
            }),
        ))
    }

    /// `DELETE /orgs/{org}/servers/{name}`.
    pub async fn deregister(self: &Arc<Self>, org: &str, name: &str) -> Result<(), Reject> {
        let (_, base) = self.registration_of(org)?;
        if Self::in_file(&base, org, name) {
            return Err(conflict(format!(
                "server '{name}' of org '{org}' is in the config file; only registered servers can be removed through the API"
            )));
        }
        if !self.registry.remove(org, name).await.map_err(unavailable)? {
            return Err(Reject::new(
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
                format!(
                    "org '{org}' has no registered server '{}' (it expired, or never registered)",
                    crate::jsonrpc::clip(name, 64)
                ),
            ));
        }
        self.count_registration(org, "removed");
        tracing::info!(org, server = name, "server deregistered");
        self.registrations_changed(org, name).await;
        Ok(())
    }

    /// A registration of `org` changed here: applied on this node, and the
    /// other nodes told to read them now (not at their next poll).
    async fn registrations_changed(self: &Arc<Self>, org: &str, name: &str) {
        if let Some(events) = self.hub.events() {
            super::bus::Notice::Registrations.send(events);
        }
        if let Err(e) = self.sync_registrations().await {
            tracing::error!(
                org,
                server = name,
                "a registration changed but cannot be applied: {e}"
            );
        }
    }

    /// `GET /orgs/{org}/servers`: the config file's servers and the
    /// registered ones (credentials left out).
    pub async fn servers_of(&self, org: &str) -> Result<Value, Reject> {
        let live = self.live_full();
        let Some(org_config) = live.config.orgs.get(org) else {
            return Err(unknown_org(org));
        };
        let base = self.reloads.base();
        let file_servers = base.orgs.get(org).map(|o| &o.servers);
        let mut servers: Vec<Value> = Vec::new();
        for entry in org_config.server_entries() {
            let Some(name) = entry.name else { continue };
            if file_servers.is_some_and(|s| s.contains_key(name)) {
                servers.push(json!({
                    "name": name,
                    "source": "config",
                    "prefix": entry.prefix,
                    "era": entry.upstream.era.as_str(),
                    "replicas": entry.upstream.replicas.iter().map(|r| without_userinfo(r)).collect::<Vec<_>>(),
                }));
            }
        }
        if org_config.registration.is_some() {
            let listed = self.registry.list(org).await.map_err(unavailable)?;
            for r in listed {
                let served = org_config.servers.contains_key(&r.name)
                    && !file_servers.is_some_and(|s| s.contains_key(&r.name));
                let upstream = r.server.get("upstream");
                servers.push(json!({
                    "name": r.name,
                    "source": "registration",
                    "prefix": r.server.get("prefix").and_then(Value::as_str).unwrap_or(&r.name),
                    "era": upstream.and_then(|u| u.get("era")),
                    "replicas": upstream
                        .and_then(|u| u.get("replicas"))
                        .and_then(Value::as_array)
                        .map(|rs| rs.iter().filter_map(Value::as_str).map(without_userinfo).collect::<Vec<_>>()),
                    "expires_in_ms": u64::try_from(r.expires_in.as_millis()).unwrap_or(u64::MAX),
                    "served": served,
                }));
            }
        }
        Ok(json!({"org": org, "count": servers.len(), "servers": servers}))
    }

    fn count_registration(&self, org: &str, result: &str) {
        self.metrics
            .registrations
            .with_label_values(&[org, result])
            .inc();
    }

    /// Reads the registrations of every org that takes them and, if they
    /// changed, applies them. An org whose registrations cannot be read
    /// (Redis down) keeps those it serves.
    pub(crate) async fn sync_registrations(
        self: &Arc<Self>,
    ) -> Result<(), super::reload::ReloadError> {
        // Read and applied in one turn: an older read never replaces a
        // newer one.
        let _one_at_a_time = self.reloading().await;
        let base = self.reloads.base();
        let before = self.reloads.registered();
        let mut wanted = Registrations::new();
        for (org, config) in &base.orgs {
            if config.registration.is_none() {
                continue;
            }
            let servers = match self.registry.list(org).await {
                Ok(listed) => listed.into_iter().map(|r| (r.name, r.server)).collect(),
                Err(e) => {
                    tracing::warn!(org, "registered servers stay as they are: {e}");
                    before.get(org).cloned().unwrap_or_default()
                }
            };
            if !servers.is_empty() {
                wanted.insert(org.clone(), servers);
            }
        }
        if wanted == before {
            return Ok(());
        }
        for (org, servers) in &before {
            for name in servers.keys() {
                let still = wanted.get(org).is_some_and(|w| w.contains_key(name));
                if !still {
                    tracing::info!(
                        org,
                        server = name,
                        "a registered server is gone (expired or removed)"
                    );
                }
            }
        }
        let file = self.reloads.file().unwrap_or_default();
        self.apply_held(None, Some(wanted), &file).await.map(|_| ())
    }

    /// Reads the registrations again every [`POLL`] (a change made here
    /// is applied at once), until the gateway drains.
    pub async fn watch_registrations(self: Arc<Self>) {
        while !self.is_draining() {
            tokio::time::sleep(POLL).await;
            let any = self
                .reloads
                .base()
                .orgs
                .values()
                .any(|o| o.registration.is_some());
            if (any || !self.reloads.registered().is_empty())
                && let Err(e) = self.sync_registrations().await
            {
                tracing::error!(
                    "registered servers changed, but the config with them is refused: {e}"
                );
            }
        }
    }

    /// Sets `ratatosk_registered_servers` from what is served.
    pub(crate) fn gauge_registered(&self, base: &Config, served: &Registrations) {
        // An org gone, or no longer taking registrations, leaves the gauge.
        self.metrics.registered_servers.reset();
        for (org, config) in &base.orgs {
            if config.registration.is_some() {
                let count = served.get(org).map_or(0, BTreeMap::len);
                self.metrics
                    .registered_servers
                    .with_label_values(&[org])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }
}

#[cfg(test)]
mod tests;
