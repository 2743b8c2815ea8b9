//! The request path's auth step: who is calling (bearer token to
//! [`Identity`]), RFC 9728 metadata, and back-channel logout.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use ratatosk_auth::logout::LogoutEvent;
use ratatosk_auth::metadata::{challenge, metadata_path, resource_metadata, www_authenticate};
use ratatosk_auth::{AuthError, AuthMode, Identity};

use super::{Gateway, Notice};
use crate::edge::{Reject, Request, Response};
use crate::jsonrpc::code;
use crate::routes::{Endpoint, Front};

/// Where the `gateway-jwt` key set is served, under `base_path` (and as
/// `/jwks.json` on the admin listener).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

impl Gateway {
    /// The caller's identity on an org's route, checked against the org and
    /// its required scopes. A refusal points at the metadata of the
    /// `endpoint` called.
    pub(super) async fn authenticate(
        &self,
        org: &Front,
        endpoint: Endpoint,
        req: &Request,
    ) -> Result<Arc<Identity>, Reject> {
        if org.auth == AuthMode::None {
            return Ok(org.anonymous.clone());
        }
        let result = match self.validator.as_ref() {
            Some(validator) => {
                let authorization = req
                    .headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes);
                let span = crate::telemetry::span(
                    || tracing::info_span!("auth", org = %org.name, mode = org.auth.as_str(), cache = tracing::field::Empty),
                );
                tracing::Instrument::instrument(
                    validator.authenticate(authorization, org.auth, &org.organization, &org.scopes),
                    span,
                )
                .await
            }
            None => Err(AuthError::Unavailable(
                "no identity provider is configured".into(),
            )),
        };
        result.map_err(|e| self.auth_reject(org, endpoint, &e))
    }

    /// 403 `insufficient_scope` for an item of `kind` a policy would allow
    /// with one of `scopes`: the client may ask for them (with the org's).
    pub(super) fn step_up_reject(
        &self,
        org: &Front,
        scopes: &[String],
        kind: &str,
        name: &str,
    ) -> Reject {
        let error = AuthError::InsufficientScope {
            scope: scopes.join(" "),
        };
        let mut wanted = match &self.validator {
            Some(validator) => validator.config().advertised_scopes(&org.wanted_scopes()),
            None => org.wanted_scopes(),
        };
        for s in scopes {
            if !wanted.contains(s) {
                wanted.push(s.clone());
            }
        }
        let mut reject = Reject::new(
            StatusCode::FORBIDDEN,
            code::BAD_REQUEST,
            format!(
                "{kind} '{}' needs scope {} in org '{}'",
                crate::jsonrpc::clip(name, 128),
                scopes.join(" or "),
                org.name
            ),
        );
        let challenge = www_authenticate(
            &self.metadata_url(org, Endpoint::Mcp),
            &wanted.join(" "),
            &error,
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            reject.headers.push((header::WWW_AUTHENTICATE, v));
        }
        reject
    }

    /// A refusal with the challenge that sends clients to the metadata.
    fn auth_reject(&self, org: &Front, endpoint: Endpoint, e: &AuthError) -> Reject {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        let rpc_code = if status == StatusCode::SERVICE_UNAVAILABLE {
            code::INTERNAL_ERROR
        } else {
            code::BAD_REQUEST
        };
        if let AuthError::Unavailable(detail) = e {
            tracing::warn!(org = %org.name, detail = %detail, "identity provider unavailable");
        }
        let mut reject = Reject::new(status, rpc_code, e.client_message());
        let scopes = match &self.validator {
            Some(validator) => validator.config().advertised_scopes(&org.wanted_scopes()),
            None => org.wanted_scopes(),
        };
        match challenge(&self.metadata_url(org, endpoint), &scopes, e) {
            Some(challenge) => {
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    reject.headers.push((header::WWW_AUTHENTICATE, v));
                }
            }
            None => reject
                .headers
                .push((header::RETRY_AFTER, HeaderValue::from_static("2"))),
        }
        if status == StatusCode::UNAUTHORIZED {
            // Anyone can send junk: at info, every refusal would be a line
            // an attacker writes into the log. Counted in metrics instead.
            tracing::debug!(org = %org.name, reason = %e, "request refused: no valid token");
        }
        reject
    }

    /// The protected resource (RFC 9728) that a call to `endpoint` uses:
    /// the URL a client connects to, `/mcp` or `/sse` (whose `/messages`
    /// belong to it). Clients check that the resource of the metadata is
    /// the URL they use, or a prefix of it, so each endpoint has its own.
    fn resource_path(&self, org: &str, endpoint: Endpoint) -> String {
        let endpoint = match endpoint {
            // The WebSocket is the MCP endpoint over another transport.
            Endpoint::Mcp | Endpoint::Ws => Endpoint::Mcp,
            Endpoint::Sse | Endpoint::Messages => Endpoint::Sse,
        };
        self.live().routes.path_of(org, endpoint)
    }

    fn metadata_url(&self, org: &Front, endpoint: Endpoint) -> String {
        format!(
            "{}{}",
            self.public_url,
            metadata_path(&self.resource_path(&org.key, endpoint))
        )
    }

    /// Answers the paths that are not an org's endpoints: RFC 9728 metadata
    /// and back-channel logout. `None` for every other path.
    pub(super) async fn serve_auth_paths(&self, req: &Request) -> Option<Response> {
        if let Some(resource) = req
            .path
            .strip_prefix("/.well-known/oauth-protected-resource")
        {
            return Some(self.serve_metadata(&req.method, resource));
        }
        if req.path == self.live().config.backchannel_logout_path {
            return Some(self.serve_logout(req).await);
        }
        if req
            .path
            .strip_prefix(self.live().config.base_path.as_str())
            .is_some_and(|p| p == JWKS_PATH)
        {
            return Some(self.serve_jwks(&req.method));
        }
        None
    }

    /// The key set of the `gateway-jwt` upstream credentials, public so
    /// that upstreams verify them without reaching the admin listener.
    pub fn serve_jwks(&self, method: &Method) -> Response {
        if method != Method::GET {
            return Reject::method_not_allowed(method, "GET").into_response();
        }
        match &self.upstream_jwt {
            Some(signer) => Response::json(StatusCode::OK, signer.jwks()).with_header(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
            None => Reject::new(
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
                "no upstream_jwt key is configured",
            )
            .into_response(),
        }
    }

    fn serve_metadata(&self, method: &Method, resource_path: &str) -> Response {
        let live = self.live();
        let org = live
            .routes
            .fronts()
            .find(|o| {
                [Endpoint::Mcp, Endpoint::Sse]
                    .into_iter()
                    .any(|e| self.resource_path(&o.key, e) == resource_path)
            })
            .filter(|o| o.auth != AuthMode::None);
        let (Some(org), Some(validator)) = (org, &self.validator) else {
            return Reject::new(
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
                format!(
                    "no protected resource at '{}'",
                    crate::jsonrpc::clip(resource_path, 64)
                ),
            )
            .into_response();
        };
        if method != Method::GET {
            return Reject::method_not_allowed(method, "GET").into_response();
        }
        let doc = resource_metadata(
            &format!("{}{resource_path}", self.public_url),
            &validator.config().issuer,
            &validator.config().advertised_scopes(&org.wanted_scopes()),
            &org.name,
        );
        Response::json(StatusCode::OK, Bytes::from(doc.to_string()))
    }

    async fn serve_logout(&self, req: &Request) -> Response {
        let Some(validator) = &self.validator else {
            return Reject::new(
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
                "back-channel logout needs an identity provider",
            )
            .into_response();
        };
        if req.method != Method::POST {
            return Reject::method_not_allowed(&req.method, "POST").into_response();
        }
        let result = validator.backchannel_logout(&req.body).await;
        if let Ok(event) = &result {
            if let Some(logouts) = &self.logouts {
                // Every other node refuses the tokens too, and so does a
                // node that is not on the bus now (it reads them back when
                // it subscribes: kept first, so none misses both).
                let keep = validator.config().max_token_lifetime;
                if let Err(e) = logouts.remember(event, keep).await {
                    tracing::warn!(error = %e, "cannot keep the logout in Redis; nodes off the bus now will not see it");
                }
            }
            self.cluster().notify(&Notice::Logout(event.clone()));
            self.end_sessions_of(event).await;
        }
        let mut r = match result {
            Ok(_) => Response::empty(StatusCode::OK),
            Err(e) => {
                let (status, body) = e.answer();
                Response::json(status, Bytes::from(body.to_string()))
            }
        };
        r.headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    /// Ends the gateway sessions that a provider logout ended: those
    /// opened with its `sid`, or else every session of its `sub`. The
    /// store's indexes find them without reading other sessions.
    async fn end_sessions_of(&self, event: &LogoutEvent) {
        let found = match (&event.sid, &event.sub) {
            (Some(sid), _) => self.store.ids_of_idp_session(sid).await,
            (None, Some(sub)) => {
                let mut ids = Vec::new();
                let live = self.live_full();
                for org in live.routes.orgs() {
                    match self.store.ids_of_subject(&org.key, sub).await {
                        Ok(more) => ids.extend(more),
                        Err(e) => {
                            tracing::warn!(org = %org.name, error = %e, "cannot find the sessions to end after a logout");
                        }
                    }
                }
                Ok(ids)
            }
            (None, None) => Ok(Vec::new()),
        };
        let ids = match found {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find the sessions to end after a logout");
                return;
            }
        };
        for id in ids {
            if let Err(e) = self.end_session(&id, "its user logged out").await {
                tracing::warn!(error = %e, "cannot end a logged-out session");
            }
        }
    }
}
