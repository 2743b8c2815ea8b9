//! The credential each upstream gets with a request, for its caller
//! (`upstream.auth`): none beyond the `Ratatosk-*` headers, a static
//! header, a JWT the gateway signs, or the caller's token exchanged at the
//! identity provider for one addressed to the upstream. The client's own
//! token is never one of them.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ratatosk_auth::Identity;
use ratatosk_auth::Validator;
use ratatosk_auth::exchange::{ExchangeError, Target};
use ratatosk_auth::upstream_jwt::UpstreamSigner;

use crate::config::UpstreamAuth;

/// The subject of the gateway's own requests (an era probe), which no
/// caller makes.
const GATEWAY_SUBJECT: &str = "ratatosk-gateway";

pub enum Credentials {
    /// `auth: headers`: the `Ratatosk-*` headers say it all.
    None,
    Static(HeaderName, HeaderValue),
    Jwt {
        signer: Arc<UpstreamSigner>,
        org: String,
        audience: String,
        /// Who the gateway's own requests are from.
        gateway: Box<Identity>,
    },
    Exchange {
        validator: Arc<Validator>,
        audience: String,
        /// Space-separated.
        scopes: String,
    },
}

/// What signs or issues upstream credentials: the gateway's JWT key
/// (`upstream_jwt`), the identity provider (token exchange).
#[derive(Clone, Copy, Default)]
pub struct Issuers<'a> {
    pub jwt: Option<&'a Arc<UpstreamSigner>>,
    pub provider: Option<&'a Arc<Validator>>,
}

/// Why a request got no credential: it is not sent.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct CredentialError {
    pub reason: String,
    pub cause: Cause,
}

/// Whose the failure is, which says what helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The configuration, or the identity provider's refusal.
    Refused,
    /// The identity provider is down: retry after this long.
    Passing(Duration),
    /// The caller's token (expired, logged out): a fresh one would do.
    Callers,
}

impl From<String> for CredentialError {
    fn from(reason: String) -> Self {
        CredentialError {
            reason,
            cause: Cause::Refused,
        }
    }
}

impl Credentials {
    /// The credentials of the upstream of `route` (`<org>` or
    /// `<org>/<server>`) of `org`.
    pub fn new(
        route: &str,
        org: &str,
        auth: &UpstreamAuth,
        issuers: Issuers<'_>,
    ) -> Result<Credentials, String> {
        Ok(match auth {
            UpstreamAuth::Headers {} => Credentials::None,
            UpstreamAuth::Static { header, value } => {
                let name = HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("`{header}` is not a header name"))?;
                let mut value = HeaderValue::from_str(value)
                    .map_err(|_| "the static value is not a header value".to_owned())?;
                value.set_sensitive(true);
                Credentials::Static(name, value)
            }
            UpstreamAuth::GatewayJwt { audience } => {
                let signer = issuers
                    .jwt
                    .ok_or("`gateway-jwt` needs the top-level `upstream_jwt`")?;
                let mut gateway = Identity::anonymous(org);
                gateway.subject = GATEWAY_SUBJECT.to_owned();
                Credentials::Jwt {
                    signer: signer.clone(),
                    org: org.to_owned(),
                    audience: audience.clone().unwrap_or_else(|| route.to_owned()),
                    gateway: Box::new(gateway),
                }
            }
            UpstreamAuth::TokenExchange { audience, scopes } => Credentials::Exchange {
                validator: issuers
                    .provider
                    .ok_or("`token-exchange` needs the `identity` section")?
                    .clone(),
                audience: audience.clone(),
                scopes: scopes.join(" "),
            },
        })
    }

    /// Adds the credential for `caller` (`None`: the gateway's own request)
    /// whose own token, if the request has one, is `authorization` (the
    /// client's `Authorization` header).
    pub async fn apply(
        &self,
        caller: Option<&Identity>,
        authorization: Option<&HeaderValue>,
        headers: &mut HeaderMap,
    ) -> Result<(), CredentialError> {
        match self {
            Credentials::None => {}
            Credentials::Static(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            Credentials::Jwt {
                signer,
                org,
                audience,
                gateway,
            } => {
                let bearer = signer.bearer(caller.unwrap_or(gateway.as_ref()), org, audience)?;
                headers.insert(header::AUTHORIZATION, bearer);
            }
            Credentials::Exchange {
                validator,
                audience,
                scopes,
            } => {
                // The gateway's own request (an era probe) has no caller
                // whose token could be exchanged: it goes without.
                let Some(caller) = caller else {
                    return Ok(());
                };
                let target = Target { audience, scopes };
                let token = authorization.and_then(bearer_token);
                let exchanged = validator
                    .exchange(caller, token, &target)
                    .await
                    .map_err(|e| CredentialError {
                        cause: match &e {
                            ExchangeError::Unavailable { retry_after, .. } => {
                                Cause::Passing(*retry_after)
                            }
                            e if e.is_callers() => Cause::Callers,
                            _ => Cause::Refused,
                        },
                        reason: format!("token exchange for audience `{audience}`: {e}"),
                    })?;
                headers.insert(header::AUTHORIZATION, exchanged.bearer.clone());
            }
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer` value, which the gateway has
/// already checked (so no bound on its length here).
fn bearer_token(v: &HeaderValue) -> Option<&str> {
    ratatosk_auth::bearer_token(Some(v.as_bytes()), usize::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_mode_adds_its_credential_and_headers_mode_none() {
        let none = Issuers::default();
        let mut h = HeaderMap::new();
        Credentials::new("o", "o", &UpstreamAuth::default(), none)
            .expect("headers")
            .apply(None, None, &mut h)
            .await
            .expect("apply");
        assert!(h.is_empty());

        let api_key = UpstreamAuth::Static {
            header: "x-api-key".into(),
            value: "k-1".into(),
        };
        Credentials::new("o", "o", &api_key, none)
            .expect("static")
            .apply(None, None, &mut h)
            .await
            .expect("apply");
        assert_eq!(h.get("x-api-key").expect("key"), "k-1");
        assert!(h.get("x-api-key").expect("key").is_sensitive());

        let jwt = UpstreamAuth::GatewayJwt { audience: None };
        assert!(
            Credentials::new("o/s", "o", &jwt, none).is_err(),
            "needs a signer"
        );
        let config: ratatosk_auth::upstream_jwt::UpstreamJwtConfig =
            yaml_serde::from_str(&format!(
                "key: |\n  {}\n",
                ratatosk_auth::testing::ec_private_key_pem().replace('\n', "\n  ")
            ))
            .expect("config");
        let signer = Arc::new(UpstreamSigner::new(&config, "https://gw").expect("signer"));
        let mut alice = Identity::anonymous("o");
        alice.subject = "alice".into();
        let mut h = HeaderMap::new();
        let issuers = Issuers {
            jwt: Some(&signer),
            provider: None,
        };
        let creds = Credentials::new("o/s", "o", &jwt, issuers).expect("jwt");
        creds
            .apply(Some(&alice), None, &mut h)
            .await
            .expect("apply");
        let bearer = h[header::AUTHORIZATION].to_str().expect("ascii").to_owned();
        let claims =
            ratatosk_auth::testing::unverified_claims(bearer.trim_start_matches("Bearer "));
        assert_eq!(
            (claims["sub"].as_str(), claims["aud"].as_str()),
            (Some("alice"), Some("o/s"))
        );
        creds
            .apply(None, None, &mut h)
            .await
            .expect("the gateway's own");
        let bearer = h[header::AUTHORIZATION].to_str().expect("ascii").to_owned();
        let claims =
            ratatosk_auth::testing::unverified_claims(bearer.trim_start_matches("Bearer "));
        assert_eq!(claims["sub"], GATEWAY_SUBJECT);
    }

    #[test]
    fn a_bearer_token_is_read_whatever_the_schemes_case() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer_token(&v("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&v("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&v("Basic abc")), None);
        assert_eq!(bearer_token(&v("Bearer ")), None);
        assert_eq!(bearer_token(&v("Bearer")), None);
    }
}
