//! Forward-auth: the auth bridge as a check service for other proxies.
//!
//! nginx `auth_request`, Traefik `ForwardAuth` and Envoy `ext_authz` (HTTP
//! service) all send the original request's headers to a URL and let the
//! request through on 2xx. This server answers:
//! - 200 with `X-Ratatosk-Subject`, `-Org`, `-Scopes`, `-Username`;
//! - 401 or 403 with the same `WWW-Authenticate` challenge as the gateway;
//! - 503 with `Retry-After` when the identity provider cannot be reached
//!   (or is saturated) and nothing is cached.
//!
//! The org comes from exactly one place, named by `org_from` after the
//! proxy in front ([`OrgSource`]). There is no fallback from one header to
//! another: nginx passes client headers into its `auth_request` subrequest,
//! so any header the proxy does not set itself is the client's to choose.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::config::ProviderConfig;
use crate::metadata::{challenge, metadata_path, resource_metadata};
use crate::ratelog::LogEvery;
use crate::{AuthError, AuthMode, SHOWN_CHARS, Validator, untrusted};

/// `ratatosk-auth serve --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    pub listen: SocketAddr,
    /// HTTPS on `listen`, with the gateway's `tls` shape (certificate and
    /// key files, reloaded on SIGHUP and on a timer; optional client CA).
    #[serde(default)]
    pub tls: Option<crate::tls::ListenerTls>,
    /// The public URL of what the proxy protects; resources are
    /// `{public_url}/{org}/mcp`.
    pub public_url: String,
    pub identity: ProviderConfig,
    /// The mode for orgs that do not set their own.
    #[serde(default = "default_mode")]
    pub mode: AuthMode,
    /// Where the org of a check comes from: required, see [`OrgSource`].
    #[serde(default)]
    pub org_from: Option<OrgSource>,
    /// The header the proxy sets to name the org (with `org_from: header`).
    #[serde(default = "default_org_header")]
    pub org_header: String,
    /// Path of the back-channel logout endpoint on this server.
    #[serde(default = "default_logout_path")]
    pub backchannel_logout_path: String,
    /// Connections served at once; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The longest a client may take to send a request's head and body, in
    /// all, counted from its first byte (and the longest a connection may
    /// sit idle between requests).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    pub orgs: BTreeMap<String, ForwardOrg>,
}

/// Where the org of a check comes from: one source per kind of proxy, each
/// one the proxy itself fills, so a client cannot name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgSource {
    /// nginx `auth_request`: the first path segment of `X-Original-URI`,
    /// which the auth location sets (`proxy_set_header X-Original-URI
    /// $request_uri;`), overwriting a client's.
    Nginx,
    /// Traefik `forwardAuth`: the first path segment of `X-Forwarded-Uri`,
    /// which Traefik sets.
    Traefik,
    /// Envoy `ext_authz` with `path_prefix: /check`: the first segment of
    /// the original path, after `/check`.
    Envoy,
    /// The `org_header` that the proxy sets per location.
    Header,
}

const ORG_SOURCES: &str = "`nginx` (X-Original-URI), `traefik` (X-Forwarded-Uri), `envoy` (the path after /check) or `header` (org_header)";

impl<'de> Deserialize<'de> for OrgSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let name = String::deserialize(d)?;
        match name.as_str() {
            "nginx" => Ok(OrgSource::Nginx),
            "traefik" => Ok(OrgSource::Traefik),
            "envoy" => Ok(OrgSource::Envoy),
            "header" => Ok(OrgSource::Header),
            "uri" => Err(D::Error::custom(format!(
                "`uri` is no longer accepted: it read X-Forwarded-Uri before X-Original-URI, so behind nginx a client could name the org; name the proxy instead: {ORG_SOURCES}"
            ))),
            other => Err(D::Error::custom(format!(
                "unknown org source `{}`: expected {ORG_SOURCES}",
                untrusted(other, SHOWN_CHARS)
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOrg {
    #[serde(default)]
    pub mode: Option<AuthMode>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The org's tool policy, as the gateway's `orgs.<org>.policy` (names
    /// without a prefix). It decides the requests that name what they use
    /// in headers, as 2026-07-28 clients do (`Mcp-Method`, `Mcp-Name`):
    /// the proxy passes the client's headers to the check, and a modern
    /// server refuses a body that does not match them. Earlier eras name
    /// the tool only in the body, which a check never sees: put the
    /// gateway in front to enforce a policy on them.
    #[serde(default)]
    pub policy: Vec<crate::policy::PolicyRule>,
}

impl ForwardOrg {
    /// The scopes a client is told to ask for (beside the realm's client
    /// scopes): those the org needs, then those its policy grants with.
    fn wanted_scopes(&self) -> Vec<String> {
        let mut wanted = self.scopes.clone();
        wanted.extend(crate::policy::offered_scopes(&self.policy, &self.scopes));
        wanted
    }
}

fn default_mode() -> AuthMode {
    AuthMode::Jwt
}
fn default_org_header() -> String {
    "x-ratatosk-org".into()
}
fn default_logout_path() -> String {
    "/backchannel-logout".into()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ForwardConfig {
    /// Every problem, as `field: message`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let introspects = self.mode.uses_introspection()
            || self
                .orgs
                .values()
                .any(|o| o.mode.is_some_and(AuthMode::uses_introspection));
        for (field, msg) in self
            .identity
            .problems(introspects.then_some("introspection"))
        {
            out.push(format!("identity.{field}: {msg}"));
        }
        for (field, msg) in self.tls.iter().flat_map(|t| t.problems()) {
            let at = if field.is_empty() {
                "tls".to_owned()
            } else {
                format!("tls.{field}")
            };
            out.push(format!("{at}: {msg}"));
        }
        if self.orgs.is_empty() {
            out.push("orgs: expected at least one org".into());
        }
        for (name, org) in &self.orgs {
            if org.mode == Some(AuthMode::None)
                || (org.mode.is_none() && self.mode == AuthMode::None)
            {
                out.push(format!(
                    "orgs.{name}.mode: `none` makes no sense for a check service"
                ));
            }
            for (i, rule) in org.policy.iter().enumerate() {
                for (at_rule, why) in rule.bad_globs() {
                    out.push(format!("orgs.{name}.policy[{i}].{at_rule}: {why}"));
                }
            }
        }
        match self.org_from {
            None => out.push(format!(
                "org_from: required: name the proxy in front, {ORG_SOURCES}"
            )),
            Some(OrgSource::Header) if HeaderName::try_from(&self.org_header).is_err() => {
                out.push(format!(
                    "org_header: expected a header name, got `{}`",
                    self.org_header.escape_default()
                ))
            }
            Some(_) => {}
        }
        if url::Url::parse(&self.public_url).is_err() {
            out.push(format!(
                "public_url: expected a URL, got `{}`",
                self.public_url
            ));
        }
        if !self.backchannel_logout_path.starts_with('/') {
            out.push("backchannel_logout_path: expected a path starting with `/`".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            out.push(format!(
                "max_connections: expected 1 to 1000000, got {}",
                self.max_connections
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(600) {
            out.push("request_timeout: expected a duration from `1ms` to `10m`".into());
        }
        out
    }
}

/// Counters of the listener, in the same registry as the validator's.
struct ListenerMetrics {
    open: IntGauge,
    refused: IntCounter,
    timeouts: IntCounter,
}

impl ListenerMetrics {
    fn register(registry: &Registry) -> Result<ListenerMetrics, prometheus::Error> {
        let m = ListenerMetrics {
            open: IntGauge::new(
                "forward_connections_open",
                "Connections the forward-auth listener holds open",
            )?,
            refused: IntCounter::new(
                "forward_connections_refused_total",
                "Connections closed at accept because max_connections were open",
            )?,
            timeouts: IntCounter::new(
                "forward_request_timeouts_total",
                "Connections cut because a request's head or body took longer than request_timeout",
            )?,
        };
        registry.register(Box::new(m.open.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.timeouts.clone()))?;
        Ok(m)
    }
}

pub struct ForwardAuth {
    config: ForwardConfig,
    /// The listener's certificate, with `tls`.
    certs: Option<Arc<crate::tls::ServingCerts>>,
    validator: Arc<Validator>,
    registry: Registry,
    metrics: ListenerMetrics,
    /// What clients can cause at will is logged sparsely.
    refused_connections: LogEvery,
    refused_checks: LogEvery,
    unavailable: LogEvery,
    /// Each org's tool policy.
    policies: BTreeMap<String, crate::policy::Policy>,
}

type Answer = Response<Full<Bytes>>;

impl ForwardAuth {
    pub fn new(config: ForwardConfig) -> Result<Arc<ForwardAuth>, crate::validator::BuildError> {
        let registry = Registry::new_custom(Some("ratatosk".into()), None)?;
        let validator = Validator::new(config.identity.clone(), &registry)?;
        let metrics = ListenerMetrics::register(&registry)?;
        let mut policies = BTreeMap::new();
        for (name, org) in &config.orgs {
            let policy = crate::policy::Policy::new("", "__", &org.policy).map_err(|e| {
                crate::validator::BuildError::Config(format!("orgs.{name}.policy: {e}"))
            })?;
            policies.insert(name.clone(), policy);
        }
        let certs = config
            .tls
            .as_ref()
            .map(|t| crate::tls::ServingCerts::load("tls", t))
            .transpose()
            .map_err(|e| crate::validator::BuildError::Config(format!("tls: {e}")))?;
        Ok(Arc::new(ForwardAuth {
            config,
            certs,
            policies,
            validator,
            registry,
            metrics,
            refused_connections: LogEvery::default(),
            refused_checks: LogEvery::default(),
            unavailable: LogEvery::default(),
        }))
    }

    /// Serves on `listen` until the process is told to stop. With `tls`,
    /// the certificate is re-read on SIGHUP and every `reload_interval`.
    pub async fn serve(self: Arc<Self>) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.config.listen).await?;
        let (hangup, hangups) = std::sync::mpsc::channel();
        crate::tls::keep_fresh(self.certs.iter().cloned().collect(), hangups, |_, _| {})?;
        self.serve_on(listener, shutdown_signal(hangup)).await
    }

    /// Serves on a bound listener until `shutdown` completes.
    pub async fn serve_on(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let tls = self
            .certs
            .as_ref()
            .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c.server_config(&[b"http/1.1"]))));
        tracing::info!(listen = %listener.local_addr()?, tls = tls.is_some(), "forward-auth listening");
        tokio::pin!(shutdown);
        let connections = Arc::new(tokio::sync::Semaphore::new(self.config.max_connections));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut shutdown => return Ok(()),
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection aborted before
                    // accept: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                self.metrics.refused.inc();
                if let Some(suppressed) = self.refused_connections.ready() {
                    tracing::warn!(
                        max_connections = self.config.max_connections,
                        suppressed,
                        "connection refused: max_connections are open"
                    );
                }
                drop(stream);
                continue;
            };
            self.metrics.open.inc();
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => this.serve_connection(stream).await,
                    Some(tls) => this.serve_tls_connection(&tls, stream).await,
                }
                this.metrics.open.dec();
                drop(permit);
            });
        }
    }

    /// The TLS handshake, within the request's deadline, then the
    /// connection.
    async fn serve_tls_connection(
        self: &Arc<Self>,
        tls: &tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
    ) {
        match tokio::time::timeout(self.config.request_timeout, tls.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_connection(stream).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => {
                self.metrics.timeouts.inc();
                tracing::debug!("TLS handshake did not finish in time");
            }
        }
    }

    async fn serve_connection<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let first_byte = Arc::new(Mutex::new(None));
        let io = TokioIo::new(Stamped {
            stream,
            first_byte: first_byte.clone(),
        });
        let this = self.clone();
        let service = service_fn(move |req| {
            // Called once the head is read: its first byte started the clock.
            let started = take(&first_byte).unwrap_or_else(Instant::now);
            let deadline = started + this.config.request_timeout;
            let (this, first_byte) = (this.clone(), first_byte.clone());
            async move {
                let answer = this.handle(req, deadline).await;
                // Bytes of this request's body stamped the clock again; the
                // next request starts it afresh.
                take(&first_byte);
                Ok::<_, std::convert::Infallible>(answer)
            }
        });
        // hyper's timer runs from when it starts waiting for a head to the
        // head's end, in all (not per read): it bounds idle connections and
        // slow heads. The body is bounded by the deadline above.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.config.request_timeout)
            .serve_connection(io, service);
        if let Err(e) = conn.await {
            if e.is_timeout() {
                self.metrics.timeouts.inc();
            }
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, deadline: Instant) -> Answer {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_answer(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, "/metrics") => {
                let mut out = Vec::new();
                let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
                let mut r = Response::new(Full::new(Bytes::from(out)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::POST, p) if p == self.config.backchannel_logout_path => {
                self.logout(req, deadline).await
            }
            (&Method::GET, p) if p.starts_with("/.well-known/oauth-protected-resource/") => {
                self.metadata(p)
            }
            (_, p) if p == "/check" || p.starts_with("/check/") => self.check(&req).await,
            // Deny by default: a proxy sending checks to the wrong path must
            // not get a 2xx for, say, /healthz.
            _ => json_answer(
                StatusCode::NOT_FOUND,
                json!({"error": "checks are answered at /check (or /check/<original path>)"}),
            ),
        }
    }

    fn resource_path(org: &str, endpoint: Endpoint) -> String {
        format!("/{org}/{}", endpoint.as_str())
    }

    fn metadata(&self, path: &str) -> Answer {
        let org = self.config.orgs.iter().find_map(|(name, cfg)| {
            [Endpoint::Mcp, Endpoint::Sse]
                .into_iter()
                .find(|e| metadata_path(&Self::resource_path(name, *e)) == path)
                .map(|e| (name, cfg, e))
        });
        match org {
            Some((name, cfg, endpoint)) => json_answer(
                StatusCode::OK,
                resource_metadata(
                    &format!(
                        "{}{}",
                        self.config.public_url.trim_end_matches('/'),
                        Self::resource_path(name, endpoint)
                    ),
                    &self.config.identity.issuer,
                    &self.config.identity.advertised_scopes(&cfg.wanted_scopes()),
                    name,
                ),
            ),
            None => json_answer(StatusCode::NOT_FOUND, json!({"error": "no such resource"})),
        }
    }

    /// The org a check is for, from the one configured source, and the
    /// protected resource (endpoint) its path names; why not, with what the
    /// proxy should do about it.
    fn org_of(&self, req: &Request<Incoming>) -> Result<(String, Endpoint), String> {
        let from_header = |name: &str, hint: &str| -> Result<&str, String> {
            let mut values = req.headers().get_all(name).iter();
            match (values.next(), values.next()) {
                (Some(v), None) => v
                    .to_str()
                    .map_err(|_| format!("the {name} header is not visible ASCII")),
                (None, _) => Err(format!("the check carries no {name} header; {hint}")),
                (Some(_), Some(_)) => Err(format!(
                    "the check carries the {name} header more than once; {hint}"
                )),
            }
        };
        let org_in = |what: &str, path: &str| {
            org_from_path(path)
                .map(|org| (org, endpoint_of_path(path)))
                .ok_or_else(|| {
                    format!(
                        "{what} `{}` names no org: expected /<org>/..., without dot segments, empty first segment, encoded slashes or backslashes",
                        untrusted(path, SHOWN_CHARS)
                    )
                })
        };
        match self.config.org_from {
            Some(OrgSource::Nginx) => org_in(
                "X-Original-URI",
                from_header(
                    "x-original-uri",
                    "set `proxy_set_header X-Original-URI $request_uri;` in the auth_request location",
                )?,
            ),
            Some(OrgSource::Traefik) => org_in(
                "X-Forwarded-Uri",
                from_header(
                    "x-forwarded-uri",
                    "Traefik's forwardAuth sets it; is the check coming from Traefik?",
                )?,
            ),
            Some(OrgSource::Envoy) => {
                let rest = req
                    .uri()
                    .path()
                    .strip_prefix("/check")
                    .filter(|rest| rest.starts_with('/'))
                    .ok_or("the check has no original path after /check; set `path_prefix: /check` in ext_authz's http_service")?;
                org_in("the path after /check", rest)
            }
            // No path: the check is for the org's Streamable HTTP endpoint.
            Some(OrgSource::Header) => from_header(
                &self.config.org_header,
                "set it in the proxy, per location, overwriting any client's",
            )
            .map(|org| (org.to_owned(), Endpoint::Mcp)),
            None => Err("org_from is not set".into()),
        }
    }

    async fn check(&self, req: &Request<Incoming>) -> Answer {
        let (org_name, endpoint) = match self.org_of(req) {
            Ok(found) => found,
            Err(why) => {
                self.log_refused_check(&why);
                return json_answer(
                    StatusCode::FORBIDDEN,
                    json!({"error": "no_org", "error_description": why}),
                );
            }
        };
        let Some(org) = self.config.orgs.get(&org_name) else {
            return json_answer(
                StatusCode::FORBIDDEN,
                json!({"error": "unknown_org", "error_description": format!("unknown org '{}'", untrusted(&org_name, SHOWN_CHARS))}),
            );
        };
        let mode = org.mode.unwrap_or(self.config.mode);
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let result = self
            .validator
            .authenticate(authorization, mode, &org_name, &org.scopes)
            .await;
        match result {
            Ok(identity) => {
                if let Some(refused) = self.police(req, &org_name, org, endpoint, &identity) {
                    return refused;
                }
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::OK;
                let h = r.headers_mut();
                let mut put = |name: &'static str, value: &str| {
                    if let Ok(v) = HeaderValue::from_str(value) {
                        h.insert(name, v);
                    }
                };
                put("x-ratatosk-subject", &identity.subject);
                put("x-ratatosk-org", &org_name);
                put("x-ratatosk-scopes", &identity.scopes.join(" "));
                if let Some(u) = &identity.username {
                    put("x-ratatosk-username", u);
                }
                r
            }
            Err(e) => {
                match &e {
                    AuthError::Unavailable(detail) => match self.unavailable.ready() {
                        Some(suppressed) => tracing::warn!(
                            detail = %detail,
                            suppressed,
                            "identity provider unavailable"
                        ),
                        None => tracing::debug!(detail = %detail, "identity provider unavailable"),
                    },
                    AuthError::Busy(detail) => self.log_refused_check(detail),
                    _ => tracing::debug!(org = %org_name, reason = %e, "check refused"),
                }
                let mut r = json_answer(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
                    json!({"error": e.bearer_error().unwrap_or("unavailable"), "error_description": e.client_message()}),
                );
                if !self.challenge_into(&mut r, &org_name, org, endpoint, &e, &[]) {
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("2"));
                }
                r
            }
        }
    }

    /// A request the org's policy refuses, by what its `Mcp-Method` and
    /// `Mcp-Name` headers say it uses: 403, with an `insufficient_scope`
    /// challenge where a scope would allow it.
    fn police(
        &self,
        req: &Request<Incoming>,
        org_name: &str,
        org: &ForwardOrg,
        endpoint: Endpoint,
        identity: &crate::Identity,
    ) -> Option<Answer> {
        let policy = self.policies.get(org_name)?;
        if policy.is_open() {
            return None;
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let kind = crate::policy::kind_of_method(header("mcp-method")?)?;
        let Some(name) = header("mcp-name") else {
            return Some(json_answer(
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "error_description": "the org has a tool policy, and this request names no Mcp-Name"}),
            ));
        };
        let decision = policy.decide(identity, kind, name);
        if decision.allowed {
            return None;
        }
        let shown = untrusted(name, SHOWN_CHARS);
        tracing::info!(org = %org_name, subject = %identity.subject, "{} '{shown}' denied by the policy", kind.as_str());
        if decision.step_up.is_empty() {
            return Some(json_answer(
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "error_description": format!("{} '{shown}' is not allowed to this caller by the policy of org '{org_name}'", kind.as_str())}),
            ));
        }
        let e = AuthError::InsufficientScope {
            scope: decision.step_up.join(" "),
        };
        let mut r = json_answer(
            StatusCode::FORBIDDEN,
            json!({"error": "insufficient_scope", "error_description": format!("{} '{shown}' needs scope {} in org '{org_name}'", kind.as_str(), decision.step_up.join(" or "))}),
        );
        self.challenge_into(&mut r, org_name, org, endpoint, &e, &decision.step_up);
        Some(r)
    }

    /// Sets the `WWW-Authenticate` challenge of refusal `e` on `r`: the
    /// org's resource metadata, and the scopes to ask for (the org's and
    /// `more`). False if `e` has none (the identity provider is down).
    fn challenge_into(
        &self,
        r: &mut Answer,
        org_name: &str,
        org: &ForwardOrg,
        endpoint: Endpoint,
        e: &AuthError,
        more: &[String],
    ) -> bool {
        let metadata_url = format!(
            "{}{}",
            self.config.public_url.trim_end_matches('/'),
            metadata_path(&Self::resource_path(org_name, endpoint))
        );
        let mut scopes = self.config.identity.advertised_scopes(&org.wanted_scopes());
        scopes.extend(more.iter().cloned());
        let Some(challenge) = challenge(&metadata_url, &scopes, e) else {
            return false;
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
        true
    }

    fn log_refused_check(&self, why: &str) {
        match self.refused_checks.ready() {
            Some(suppressed) => tracing::warn!(reason = %why, suppressed, "check refused"),
            None => tracing::debug!(reason = %why, "check refused"),
        }
    }

    async fn logout(&self, req: Request<Incoming>, deadline: Instant) -> Answer {
        let read = Limited::new(req.into_body(), 64 * 1024).collect();
        let body = match tokio::time::timeout_at(deadline.into(), read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_request", "error_description": "the body is over 64 KiB or broken"}),
                );
            }
            Err(_) => {
                self.metrics.timeouts.inc();
                let mut r = json_answer(
                    StatusCode::REQUEST_TIMEOUT,
                    json!({"error": "invalid_request", "error_description": format!("the request did not arrive within request_timeout ({:?})", self.config.request_timeout)}),
                );
                r.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
        };
        let mut r = match self.validator.backchannel_logout(&body).await {
            Ok(_) => Response::new(Full::new(Bytes::new())),
            Err(e) => {
                let (status, body) = e.answer();
                json_answer(status, body)
            }
        };
        r.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        r
    }
}

fn take(first_byte: &Mutex<Option<Instant>>) -> Option<Instant> {
    first_byte.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// A connection that notes when the first byte after the last request
/// arrived, so that one deadline covers a request's head and body together.
/// (A pipelined request read in one go with the previous one gets its clock
/// started when hyper takes it up: later, never earlier.)
struct Stamped<S> {
    stream: S,
    first_byte: Arc<Mutex<Option<Instant>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Stamped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut first = self.first_byte.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(Instant::now);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stamped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The org named by the first segment of a path: `/org-1/mcp?x` gives
/// `org-1`. Each segment is percent-decoded on its own, and the path names
/// no org when a proxy could route it elsewhere than what is checked: a
/// `.` or `..` segment (also encoded, in any case: `%2e%2E`), an encoded
/// `/` or `\` (`%2F`, `%5c`), a `\` at all, an empty first segment (`//`,
/// which some proxies merge and some do not), a control character, bytes
/// that are not UTF-8 once decoded, or no leading `/`.
/// The protected resources of an org: its Streamable HTTP endpoint
/// (`/{org}/mcp`), and its legacy HTTP+SSE endpoint (`/{org}/sse`, with
/// `/{org}/messages`), which clients of that era discover on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Mcp,
    Sse,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Mcp => "mcp",
            Endpoint::Sse => "sse",
        }
    }
}

/// The resource an original path (`/<org>/<endpoint>...`) belongs to:
/// `sse` and `messages` are the legacy endpoint, anything else the
/// Streamable HTTP one.
pub fn endpoint_of_path(uri: &str) -> Endpoint {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let second = path.trim_start_matches('/').split('/').nth(1).unwrap_or("");
    match percent_encoding::percent_decode_str(second).decode_utf8() {
        Ok(s) if s == "sse" || s == "messages" => Endpoint::Sse,
        _ => Endpoint::Mcp,
    }
}

pub fn org_from_path(uri: &str) -> Option<String> {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let rest = path.strip_prefix('/')?;
    let mut org = None;
    for raw in rest.split('/') {
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()?;
        let refused = decoded == "."
            || decoded == ".."
            || decoded.contains(['/', '\\'])
            || decoded.chars().any(char::is_control);
        if refused {
            return None;
        }
        if org.is_none() {
            if decoded.is_empty() {
                return None;
            }
            org = Some(decoded.into_owned());
        }
    }
    org
}

fn json_answer(status: StatusCode, body: serde_json::Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Ends on SIGTERM or Ctrl-C; a SIGHUP is passed on to `tell` (the TLS
/// reload).
async fn shutdown_signal(tell: std::sync::mpsc::Sender<()>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hangup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return std::future::pending().await;
        };
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return,
                _ = term.recv() => return,
                // Its default action would end the process.
                _ = hangup.recv() => {
                    tracing::info!(
                        "SIGHUP received: re-reading TLS certificates (the rest of the config is not reloaded; restart to apply it)"
                    );
                    let _ = tell.send(());
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeIdp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn orgs_come_from_the_first_segment_of_a_clean_path() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/org-1/mcp?x=1", Some("org-1")),
            ("/org-1", Some("org-1")),
            ("/org-1/mcp#top", Some("org-1")),
            ("/org-1//mcp", Some("org-1")),
            ("/org%2D1/mcp", Some("org-1")),
            ("/org-1+x/mcp", Some("org-1+x")),
            ("/%C3%A4rg/mcp", Some("ärg")),
            // `&` is an ordinary character of a path: the old form parser
            // split at it and saw `org-1`.
            ("/org-1&/../org-2/mcp", None),
            ("/org-1&x/mcp", Some("org-1&x")),
            // Dot segments, plain or encoded in any case.
            ("/org-1/../org-2/mcp", None),
            ("/org-1/%2e%2e/org-2/mcp", None),
            ("/org-1/%2E%2e/org-2/mcp", None),
            ("/org-1/.%2E/org-2/mcp", None),
            ("/./org-1", None),
            ("/%2e/org-1", None),
            ("/org-1/mcp/..", None),
            // Encoded slashes and backslashes change the segments for some
            // decoders and not others.
            ("/org-1%2F..%2Forg-2/mcp", None),
            ("/org-1%2f..%2forg-2/mcp", None),
            ("/org-2%2Fmcp", None),
            ("/org-1\\..\\org-2/mcp", None),
            ("/org-1%5C..%5Corg-2/mcp", None),
            ("/org-1%5c/mcp", None),
            // An empty first segment: merged by nginx, not by others.
            ("//org-1/mcp", None),
            ("//evil.example/org-1/mcp", None),
            ("/", None),
            ("/?org-1", None),
            ("", None),
            // Not a path.
            ("org-2", None),
            ("org-2/mcp", None),
            ("http://host/org-1/mcp", None),
            // Not UTF-8 once decoded, in the org or later.
            ("/%ff/mcp", None),
            ("/org-1/%C3%28", None),
            ("/org-1%c3/mcp", None),
            // Control characters.
            ("/org-1%00/mcp", None),
            ("/org-1%0Aforged/mcp", None),
        ];
        for (path, org) in cases {
            assert_eq!(org_from_path(path).as_deref(), *org, "{path}");
        }
    }

    #[test]
    fn org_from_names_the_proxy_and_refuses_the_old_fallback() {
        let parse = |org_from: &str| {
            let yaml = format!(
                "listen: 127.0.0.1:1\npublic_url: http://p\nidentity: {{issuer: http://kc/realms/r, audience: a}}\norgs: {{org-1: {{}}}}\n{org_from}"
            );
            yaml_serde::from_str::<ForwardConfig>(&yaml).map_err(|e| e.to_string())
        };
        for (name, kind) in [
            ("nginx", OrgSource::Nginx),
            ("traefik", OrgSource::Traefik),
            ("envoy", OrgSource::Envoy),
            ("header", OrgSource::Header),
        ] {
            let config = parse(&format!("org_from: {name}")).expect(name);
            assert_eq!(config.org_from, Some(kind));
            assert!(config.problems().is_empty(), "{:?}", config.problems());
        }
        let old = parse("org_from: uri").expect_err("uri is gone");
        assert!(
            old.contains("no longer accepted") && old.contains("`nginx`"),
            "{old}"
        );
        let unknown = parse("org_from: apache").expect_err("unknown");
        assert!(unknown.contains("unknown org source `apache`"), "{unknown}");
        let missing = parse("").expect("parses");
        assert!(
            missing
                .problems()
                .iter()
                .any(|p| p.starts_with("org_from: required")),
            "{:?}",
            missing.problems()
        );
        assert!(
            parse("org_from: nginx\nbogus: 1")
                .expect_err("strict")
                .contains("bogus")
        );
    }

    /// A forward-auth server on a loopback port of its own, for orgs
    /// `org-1` and `org-2`, with `tune` applied to its config.
    async fn start(
        idp: &FakeIdp,
        org_from: OrgSource,
        tune: impl FnOnce(&mut ForwardConfig),
    ) -> (Arc<ForwardAuth>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = ForwardConfig {
            listen: addr,
            tls: None,
            public_url: "http://proxy.test".into(),
            identity: idp.config(),
            mode: AuthMode::Jwt,
            org_from: Some(org_from),
            org_header: default_org_header(),
            backchannel_logout_path: default_logout_path(),
            max_connections: default_max_connections(),
            request_timeout: default_request_timeout(),
            orgs: ["org-1", "org-2"]
                .into_iter()
                .map(|o| (o.to_owned(), ForwardOrg::default()))
                .collect(),
        };
        tune(&mut config);
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let server = ForwardAuth::new(config).expect("server");
        tokio::spawn(
            server
                .clone()
                .serve_on(listener, std::future::pending::<()>()),
        );
        (server, addr)
    }

    /// Asks for a check: the path, then extra headers (repeated names are
    /// sent repeatedly).
    async fn ask(
        addr: SocketAddr,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let mut req = http
            .get(format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(10));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("answer")
    }

    async fn description(r: reqwest::Response) -> String {
        let bytes = r.bytes().await.expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        body["error_description"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn each_proxy_kind_reads_its_own_source_and_nothing_else() {
        let idp = FakeIdp::start().await;
        // The user is in org-1 only: a check against org-2 is a 403.
        let token = idp.token(serde_json::json!({}));
        let forged = [
            ("x-forwarded-uri", "/org-2/mcp"),
            ("x-original-uri", "/org-2/mcp"),
            ("x-ratatosk-org", "org-2"),
        ];
        // (kind, where the proxy puts org-1, header that source reads)
        let kinds = [
            (OrgSource::Nginx, "/check", Some("x-original-uri")),
            (OrgSource::Traefik, "/check", Some("x-forwarded-uri")),
            (OrgSource::Envoy, "/check/org-1/mcp", None),
            (OrgSource::Header, "/check", Some("x-ratatosk-org")),
        ];
        for (kind, path, header) in kinds {
            let (_, addr) = start(&idp, kind, |_| {}).await;
            let value = if header == Some("x-ratatosk-org") {
                "org-1"
            } else {
                "/org-1/mcp"
            };
            // What the proxy sets wins; the client's other headers are
            // not read at all.
            let mut headers: Vec<(&str, &str)> = forged
                .iter()
                .filter(|(k, _)| Some(*k) != header)
                .copied()
                .collect();
            if let Some(h) = header {
                headers.push((h, value));
            }
            let ok = ask(addr, path, &token, &headers).await;
            assert_eq!(ok.status(), 200, "{kind:?}");
            assert_eq!(ok.headers()["x-ratatosk-org"], "org-1", "{kind:?}");
            assert_eq!(ok.headers()["x-ratatosk-subject"], "user-1");
            // Without its own source, the client's headers name no org.
            let others: Vec<(&str, &str)> = forged
                .iter()
                .filter(|(k, _)| Some(*k) != header)
                .map(|(k, _)| {
                    (
                        *k,
                        if *k == "x-ratatosk-org" {
                            "org-1"
                        } else {
                            "/org-1/mcp"
                        },
                    )
                })
                .collect();
            let none = ask(addr, "/check", &token, &others).await;
            assert_eq!(none.status(), 403, "{kind:?}");
            let why = description(none).await;
            assert!(
                why.contains("no ") || why.contains("after /check"),
                "{kind:?}: {why}"
            );
            // Two values of the source: ambiguous, refused.
            if let Some(h) = header {
                let twice = ask(addr, "/check", &token, &[(h, value), (h, value)]).await;
                assert_eq!(twice.status(), 403, "{kind:?}");
                assert!(description(twice).await.contains("more than once"));
            }
        }
    }

    #[tokio::test]
    async fn an_orgs_policy_decides_what_the_mcp_headers_name() {
        let idp = FakeIdp::start().await;
        let rules = "- {name: readers, when: {realm_roles: [reader]}, allow: {tools: [add]}}\n\
                     - {name: writers, when: {scopes: [\"mcp:write\"]}, allow: {tools: [write]}}\n";
        let (_server, addr) = start(&idp, OrgSource::Nginx, |c| {
            let org = c.orgs.get_mut("org-1").expect("org-1");
            org.policy = yaml_serde::from_str(rules).expect("rules");
        })
        .await;
        let token = idp.token(serde_json::json!({"realm_access": {"roles": ["reader"]}, "organization": ["org-1", "org-2"]}));
        let check = |extra: &'static [(&'static str, &'static str)]| {
            let token = token.clone();
            async move {
                let mut headers = vec![("x-original-uri", "/org-1/mcp")];
                headers.extend_from_slice(extra);
                ask(addr, "/check", &token, &headers).await
            }
        };
        // What names nothing (initialize, a list, an earlier era's call)
        // and what the policy allows pass.
        assert_eq!(check(&[]).await.status(), 200);
        assert_eq!(check(&[("mcp-method", "tools/list")]).await.status(), 200);
        let ok = check(&[("mcp-method", "tools/call"), ("mcp-name", "add")]).await;
        assert_eq!(ok.status(), 200);
        let denied = check(&[("mcp-method", "tools/call"), ("mcp-name", "delete")]).await;
        assert_eq!(denied.status(), 403);
        assert_eq!(
            description(denied).await,
            "tool 'delete' is not allowed to this caller by the policy of org 'org-1'"
        );
        let step_up = check(&[("mcp-method", "tools/call"), ("mcp-name", "write")]).await;
        assert_eq!(step_up.status(), 403);
        let challenge = step_up.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            challenge.contains("insufficient_scope") && challenge.contains("mcp:write"),
            "{challenge}"
        );
        // The scope the policy grants with is advertised from the start.
        let anonymous = ask(addr, "/check", "", &[("x-original-uri", "/org-1/mcp")]).await;
        assert_eq!(anonymous.status(), 401);
        let challenge = anonymous.headers()["www-authenticate"]
            .to_str()
            .expect("ascii");
        assert!(challenge.contains("mcp:write\""), "{challenge}");
        let unnamed = check(&[("mcp-method", "tools/call")]).await;
        assert_eq!(unnamed.status(), 403);
        assert!(description(unnamed).await.contains("names no Mcp-Name"));
        // Another org has no rules.
        let other = ask(
            addr,
            "/check",
            &token,
            &[
                ("x-original-uri", "/org-2/mcp"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "delete"),
            ],
        )
        .await;
        assert_eq!(other.status(), 200);
    }

    #[tokio::test]
    async fn checks_answer_with_challenges_and_precise_refusals() {
        let idp = FakeIdp::start().await;
        let (server, addr) = start(&idp, OrgSource::Nginx, |_| {}).await;
        let token = idp.token(serde_json::json!({}));
        let at = |uri: &'static str| [("x-original-uri", uri)];
        let denied = ask(addr, "/check", "", &at("/org-1/mcp")).await;
        assert_eq!(denied.status(), 401);
        let challenge = denied.headers()["www-authenticate"]
            .to_str()
            .expect("ascii");
        assert!(
            challenge.contains("http://proxy.test/.well-known/oauth-protected-resource/org-1/mcp"),
            "{challenge}"
        );
        // The legacy endpoint is its own protected resource, with its own
        // metadata document.
        for legacy in ["/org-1/sse", "/org-1/messages?sessionId=abc"] {
            let denied = ask(addr, "/check", "", &at(legacy)).await;
            assert_eq!(denied.status(), 401);
            let challenge = denied.headers()["www-authenticate"]
                .to_str()
                .expect("ascii")
                .to_owned();
            assert!(
                challenge
                    .contains("http://proxy.test/.well-known/oauth-protected-resource/org-1/sse"),
                "{legacy}: {challenge}"
            );
        }
        for (endpoint, resource) in [
            ("mcp", "http://proxy.test/org-1/mcp"),
            ("sse", "http://proxy.test/org-1/sse"),
        ] {
            let doc = ask(
                addr,
                &format!("/.well-known/oauth-protected-resource/org-1/{endpoint}"),
                "",
                &[],
            )
            .await;
            assert_eq!(doc.status(), 200, "{endpoint}");
            let doc: serde_json::Value =
                serde_json::from_slice(&doc.bytes().await.expect("body")).expect("json");
            assert_eq!(doc["resource"], resource);
        }
        let none = ask(
            addr,
            "/.well-known/oauth-protected-resource/org-1/messages",
            "",
            &[],
        )
        .await;
        assert_eq!(none.status(), 404);
        let other = ask(addr, "/check", &token, &at("/org-2/mcp")).await;
        assert_eq!(other.status(), 403, "org-2 was checked");
        let dots = ask(addr, "/check", &token, &at("/org-2/../org-1/mcp")).await;
        assert_eq!(dots.status(), 403);
        assert!(description(dots).await.contains("names no org"));
        for control in ["/org-%0A9/mcp", "/org-%1B[2J/mcp"] {
            let refused = ask(addr, "/check", &token, &at(control)).await;
            assert_eq!(refused.status(), 403);
            let why = description(refused).await;
            assert!(why.contains("names no org"), "{why}");
        }
        // An org no one configured is echoed escaped.
        let unknown = ask(addr, "/check", &token, &at("/org-%C3%A4%22x/mcp")).await;
        assert_eq!(unknown.status(), 403);
        assert_eq!(description(unknown).await, "unknown org 'org-\\u{e4}\\\"x'");
        let long = format!("/{}/mcp", "o".repeat(5000));
        let unknown = ask(addr, "/check", &token, &[("x-original-uri", &long)]).await;
        let why = description(unknown).await;
        assert!(why.starts_with("unknown org 'ooo"), "{why}");
        assert!(why.len() < 100, "clipped: {why}");
        // The provider is down and nothing is cached: 503 with Retry-After.
        idp.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, cold) = start(&idp, OrgSource::Nginx, |c| {
            c.mode = AuthMode::Introspect;
            c.identity.jwks_min_refetch = Duration::from_millis(1);
        })
        .await;
        let unavailable = ask(cold, "/check", &token, &at("/org-1/mcp")).await;
        assert_eq!(unavailable.status(), 503);
        assert_eq!(unavailable.headers()["retry-after"], "2");
        idp.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let not_a_check = ask(addr, "/org-1/mcp", &token, &[]).await;
        assert_eq!(not_a_check.status(), 404);
        assert_eq!(server.metrics.refused.get(), 0);
    }

    /// Connects and sends `head` at once, then `trickle` one byte per
    /// second; returns what the server answered and when it closed.
    async fn trickle(
        addr: SocketAddr,
        head: &'static [u8],
        trickle: &'static [u8],
    ) -> (String, Duration) {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            write.write_all(head).await?;
            for byte in trickle {
                tokio::time::sleep(Duration::from_secs(1)).await;
                write.write_all(&[*byte]).await?;
            }
            Ok::<_, std::io::Error>(())
        });
        let mut answer = Vec::new();
        let read_all = read.read_to_end(&mut answer);
        // A reset counts as closed too.
        let _ = tokio::time::timeout(Duration::from_secs(20), read_all)
            .await
            .expect("the server never closed the connection");
        let elapsed = started.elapsed();
        writer.abort();
        (String::from_utf8_lossy(&answer).into_owned(), elapsed)
    }

    #[tokio::test]
    async fn a_slow_loris_is_cut_at_the_request_deadline() {
        let idp = FakeIdp::start().await;
        let (server, addr) = start(&idp, OrgSource::Nginx, |c| {
            c.request_timeout = Duration::from_secs(2);
        })
        .await;
        // One header byte per second: the head never ends.
        let (_, after) = trickle(
            addr,
            b"GET /check HTTP/1.1\r\n",
            b"X-Slow: aaaaaaaaaaaaaaaaaaaaaa",
        )
        .await;
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_secs(4),
            "{after:?}"
        );
        // A whole head at once, then one body byte per second.
        let (answer, after) = trickle(
            addr,
            b"POST /backchannel-logout HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nlogout_",
            b"token=aaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_secs(4),
            "{after:?}"
        );
        // The head's time counts toward the body's deadline: a head that
        // took a second leaves the body one more, not two.
        let (answer, after) = trickle(
            addr,
            b"POST /backchannel-logout HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r",
            b"\nabcde",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_millis(2700),
            "{after:?}"
        );
        assert_eq!(server.metrics.timeouts.get(), 3);
        // A prompt client is served as before.
        let token = idp.token(serde_json::json!({}));
        let ok = ask(addr, "/check", &token, &[("x-original-uri", "/org-1/mcp")]).await;
        assert_eq!(ok.status(), 200);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let idp = FakeIdp::start().await;
        let (server, addr) = start(&idp, OrgSource::Nginx, |c| {
            c.max_connections = 2;
        })
        .await;
        async fn wait_for(what: &str, check: impl Fn() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let first = TcpStream::connect(addr).await.expect("connect");
        let second = TcpStream::connect(addr).await.expect("connect");
        wait_for("two open connections", || server.metrics.open.get() == 2).await;
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("the third connection was left open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(server.metrics.refused.get(), 1);
        assert_eq!(server.metrics.open.get(), 2);
        drop(first);
        wait_for("a slot to free up", || server.metrics.open.get() == 1).await;
        let mut fourth = TcpStream::connect(addr).await.expect("connect");
        fourth
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        drop(second);
        let text = String::from_utf8({
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&server.registry.gather(), &mut out)
                .expect("encode");
            out
        })
        .expect("utf-8");
        assert!(
            text.contains("ratatosk_forward_connections_refused_total 1"),
            "{text}"
        );
        assert!(text.contains("ratatosk_forward_connections_open"), "{text}");
    }
}
