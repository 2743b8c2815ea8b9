//! Forward-auth: the auth bridge as a check service for other proxies.
//!
//! nginx `auth_request`, Traefik `ForwardAuth` and Envoy `ext_authz` (HTTP
//! service) all send the original request's headers to a URL and let the
//! request through on 2xx. This server answers:
//! - 200 with `X-Ratatosk-Subject`, `-Org`, `-Scopes`, `-Username`;
//! - 401 or 403 with the same `WWW-Authenticate` challenge as the gateway;
//! - 503 when the identity provider cannot be reached and nothing is cached.
//!
//! The org comes from a header (`X-Ratatosk-Org` by default, set by the
//! proxy per location) or else from the first path segment of the original
//! URI (`X-Forwarded-Uri`, `X-Original-URI`, or the request path itself).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Deserialize;
use serde_json::json;

use crate::config::ProviderConfig;
use crate::metadata::{advertised_scopes, challenge, metadata_path, resource_metadata};
use crate::{AuthError, AuthMode, Validator};

/// `ratatosk-auth serve --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    pub listen: SocketAddr,
    /// The public URL of what the proxy protects; resources are
    /// `{public_url}/{org}/mcp`.
    pub public_url: String,
    pub identity: ProviderConfig,
    /// The mode for orgs that do not set their own.
    #[serde(default = "default_mode")]
    pub mode: AuthMode,
    /// Where the org of a check comes from. `uri` (the default): the first
    /// segment of the original path. `header`: the `org_header` the proxy
    /// sets per location; use it only if the proxy overwrites that header,
    /// or clients could name an org of their choosing.
    #[serde(default)]
    pub org_from: OrgSource,
    /// The header the proxy sets to name the org (with `org_from: header`).
    #[serde(default = "default_org_header")]
    pub org_header: String,
    /// Path of the back-channel logout endpoint on this server.
    #[serde(default = "default_logout_path")]
    pub backchannel_logout_path: String,
    pub orgs: BTreeMap<String, ForwardOrg>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrgSource {
    #[default]
    Uri,
    Header,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOrg {
    #[serde(default)]
    pub mode: Option<AuthMode>,
    #[serde(default)]
    pub scopes: Vec<String>,
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

impl ForwardConfig {
    /// Every problem, as `field: message`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let introspects = self.mode.uses_introspection()
            || self
                .orgs
                .values()
                .any(|o| o.mode.is_some_and(AuthMode::uses_introspection));
        for (field, msg) in self.identity.problems(introspects) {
            out.push(format!("identity.{field}: {msg}"));
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
        out
    }
}

pub struct ForwardAuth {
    config: ForwardConfig,
    validator: Arc<Validator>,
    registry: Registry,
}

type Answer = Response<Full<Bytes>>;

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 10_000;

impl ForwardAuth {
    pub fn new(config: ForwardConfig) -> Result<Arc<ForwardAuth>, crate::validator::BuildError> {
        let registry = Registry::new_custom(Some("ratatosk".into()), None)?;
        let validator = Validator::new(config.identity.clone(), &registry)?;
        Ok(Arc::new(ForwardAuth {
            config,
            validator,
            registry,
        }))
    }

    /// Serves until the process is told to stop.
    pub async fn serve(self: Arc<Self>) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.config.listen).await?;
        tracing::info!(listen = %self.config.listen, "forward-auth listening");
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!("connection refused: {MAX_CONNECTIONS} connections are open");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Answer {
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
                self.logout(req).await
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

    fn resource_path(org: &str) -> String {
        format!("/{org}/mcp")
    }

    fn metadata(&self, path: &str) -> Answer {
        let org = self
            .config
            .orgs
            .iter()
            .find(|(name, _)| metadata_path(&Self::resource_path(name)) == path);
        match org {
            Some((name, cfg)) => json_answer(
                StatusCode::OK,
                resource_metadata(
                    &format!(
                        "{}{}",
                        self.config.public_url.trim_end_matches('/'),
                        Self::resource_path(name)
                    ),
                    &self.config.identity.issuer,
                    &advertised_scopes(&cfg.scopes),
                    name,
                ),
            ),
            None => json_answer(StatusCode::NOT_FOUND, json!({"error": "no such resource"})),
        }
    }

    fn org_of<'a>(&'a self, req: &'a Request<Incoming>) -> Option<String> {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        if self.config.org_from == OrgSource::Header {
            return header(&self.config.org_header).map(str::to_owned);
        }
        let uri = match header("x-forwarded-uri").or_else(|| header("x-original-uri")) {
            Some(original) => original,
            // Envoy's ext_authz appends the original path to its path
            // prefix: `/check/org-1/mcp`.
            None => {
                let path = req.uri().path();
                path.strip_prefix("/check")
                    .filter(|rest| rest.starts_with('/'))
                    .unwrap_or(path)
            }
        };
        org_from_path(uri)
    }

    async fn check(&self, req: &Request<Incoming>) -> Answer {
        let Some(org_name) = self.org_of(req) else {
            return json_answer(
                StatusCode::FORBIDDEN,
                json!({"error": format!("no org: set the {} header in the proxy", self.config.org_header)}),
            );
        };
        let Some(org) = self.config.orgs.get(&org_name) else {
            return json_answer(
                StatusCode::FORBIDDEN,
                json!({"error": format!("unknown org '{}'", org_name.escape_default())}),
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
                let metadata_url = format!(
                    "{}{}",
                    self.config.public_url.trim_end_matches('/'),
                    metadata_path(&Self::resource_path(&org_name))
                );
                if let AuthError::Unavailable(detail) = &e {
                    tracing::warn!(detail = %detail, "identity provider unavailable");
                }
                let mut r = json_answer(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
                    json!({"error": e.bearer_error().unwrap_or("unavailable"), "error_description": e.client_message()}),
                );
                if let Some(challenge) = challenge(&metadata_url, &org.scopes, &e)
                    && let Ok(v) = HeaderValue::from_str(&challenge)
                {
                    r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
                }
                r
            }
        }
    }

    async fn logout(&self, req: Request<Incoming>) -> Answer {
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json_answer(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
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

/// The first segment of a path: `/org-1/mcp?x` gives `org-1`. The path is
/// percent-decoded first, and one with `.` or `..` segments (which a proxy
/// would resolve to another route than the one checked) names no org.
fn org_from_path(uri: &str) -> Option<String> {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let decoded: String =
        url::form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())?;
    let mut segments = decoded.split('/').filter(|s| !s.is_empty());
    if decoded.split('/').any(|s| s == "." || s == "..") || decoded.contains('\\') {
        return None;
    }
    segments.next().map(str::to_owned)
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
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

    #[test]
    fn orgs_come_from_the_first_path_segment() {
        assert_eq!(org_from_path("/org-1/mcp?x=1").as_deref(), Some("org-1"));
        assert_eq!(org_from_path("org-2").as_deref(), Some("org-2"));
        assert_eq!(org_from_path("//org-1/mcp").as_deref(), Some("org-1"));
        assert_eq!(org_from_path("/"), None);
        for ambiguous in [
            "/org-1/../org-2/mcp",
            "/org-1/%2E%2E/org-2/mcp",
            "/org-1%2F..%2Forg-2/mcp",
            "/./org-1",
        ] {
            assert_eq!(org_from_path(ambiguous), None, "{ambiguous}");
        }
    }

    #[tokio::test]
    async fn checks_tokens_over_http() {
        let idp = FakeIdp::start().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let config = ForwardConfig {
            listen: format!("127.0.0.1:{port}").parse().expect("addr"),
            public_url: "http://proxy.test".into(),
            identity: idp.config(),
            mode: AuthMode::Jwt,
            org_from: OrgSource::Uri,
            org_header: default_org_header(),
            backchannel_logout_path: default_logout_path(),
            orgs: [("org-1".to_owned(), ForwardOrg::default())]
                .into_iter()
                .collect(),
        };
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let server = ForwardAuth::new(config).expect("server");
        tokio::spawn(server.serve());
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server never listened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let token = idp.token(serde_json::json!({}));
        // A check: the path asked, then extra headers (name, value).
        let ask = |path: &str, token: Option<&str>, headers: &[(&str, &str)]| {
            let mut req = http.post(format!("{base}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            async move { req.send().await.expect("answer") }
        };
        let ok = ask("/check", Some(&token), &[("x-forwarded-uri", "/org-1/mcp")]).await;
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.headers()["x-ratatosk-subject"], "user-1");
        let denied = ask("/check", None, &[("x-forwarded-uri", "/org-1/mcp")]).await;
        assert_eq!(denied.status(), 401);
        // Envoy ext_authz style: the original path after the check prefix.
        let envoy = ask("/check/org-1/mcp", Some(&token), &[]).await;
        assert_eq!(envoy.status(), 200);
        assert_eq!(envoy.headers()["x-ratatosk-org"], "org-1");
        let challenge = denied.headers()["www-authenticate"]
            .to_str()
            .expect("ascii");
        assert!(
            challenge.contains("http://proxy.test/.well-known/oauth-protected-resource/org-1/mcp"),
            "{challenge}"
        );
        let other = ask("/check", Some(&token), &[("x-forwarded-uri", "/org-9/mcp")]).await;
        assert_eq!(other.status(), 403);
        // With org_from: uri, a client's own X-Ratatosk-Org is ignored.
        let smuggled = ask(
            "/check",
            Some(&token),
            &[
                ("x-forwarded-uri", "/org-9/mcp"),
                ("x-ratatosk-org", "org-1"),
            ],
        )
        .await;
        assert_eq!(smuggled.status(), 403);
        let not_a_check = ask("/org-1/mcp", Some(&token), &[]).await;
        assert_eq!(not_a_check.status(), 404);
    }
}
