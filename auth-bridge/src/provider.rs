//! The identity provider: OIDC discovery, its signing keys, introspection.
//!
//! Discovery is lazy and retried, so the gateway starts (and serves `auth:
//! none` routes and cached identities) while the provider is down. Every
//! call is bounded by the configured timeout.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGrantType,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{AdditionalProviderMetadata, IssuerUrl, ProviderMetadata};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::claims::Claims;
use crate::config::ProviderConfig;
use crate::metrics::AuthMetrics;

/// Keycloak's discovery document adds the introspection endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IntrospectionMetadata {
    introspection_endpoint: Option<String>,
}
impl AdditionalProviderMetadata for IntrospectionMetadata {}

type Metadata = ProviderMetadata<
    IntrospectionMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

#[derive(Debug)]
struct Endpoints {
    jwks_uri: String,
    introspection: Option<String>,
    token: Option<String>,
}

/// A signing key from the JWKS.
pub struct SigningKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The provider did not answer (or answered garbage): not the token's fault.
    #[error("{0}")]
    Unavailable(String),
    /// No key with that id in a freshly fetched JWKS.
    #[error("the token was signed with an unknown key (kid `{0}`)")]
    UnknownKid(String),
    /// No key with that id, and the keys were fetched too recently to fetch
    /// them again: the key may be new, so the verdict must not be cached.
    #[error("the token was signed with a key not known yet (kid `{0}`); retry shortly")]
    NotYetKnown(String),
}

/// Why a token exchange (RFC 8693) gave no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeFailure {
    /// The provider could not be asked, or failed: worth retrying later.
    #[error("{0}")]
    Unavailable(String),
    /// The provider answered and refused: retrying will not help (a token
    /// it does not take, an audience the gateway's client may not address).
    #[error("{0}")]
    Refused(String),
}

/// A token the provider issued in an exchange.
#[derive(Clone)]
pub struct IssuedToken {
    pub access_token: String,
    /// Seconds from now, as the provider says (`expires_in`).
    pub expires_in: Option<u64>,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why introspection gave no answer about the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

pub struct Provider {
    config: ProviderConfig,
    http: reqwest::Client,
    endpoints: RwLock<Option<Arc<Endpoints>>>,
    /// Held during discovery (single flight), with the last failure, so a
    /// provider that is down is asked again only after a pause.
    discovery: Mutex<Option<(Instant, String)>>,
    keys: RwLock<HashMap<String, Arc<SigningKey>>>,
    /// When keys were last fetched, and why that failed if it did; a fetch
    /// holds the lock (single flight).
    last_fetch: Mutex<Option<(Instant, Option<String>)>>,
    metrics: AuthMetrics,
}

/// Why the provider's HTTP client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("identity.{0}")]
    Tls(#[from] crate::tls::ClientTlsError),
    #[error("cannot build the HTTP client for the identity provider: {0}")]
    Http(#[from] reqwest::Error),
}

impl Provider {
    pub fn new(config: ProviderConfig, metrics: AuthMetrics) -> Result<Provider, ClientError> {
        let tls = config.tls().load()?;
        let builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout);
        let http = tls.apply(builder)?.build()?;
        Ok(Provider {
            config,
            http,
            endpoints: RwLock::new(None),
            discovery: Mutex::new(None),
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            metrics,
        })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// How long a failed discovery or key fetch is not retried.
    fn retry_pause(&self) -> std::time::Duration {
        self.config
            .jwks_min_refetch
            .min(std::time::Duration::from_secs(5))
    }

    fn cached_endpoints(&self) -> Option<Arc<Endpoints>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The provider's endpoints, discovered once (OIDC discovery with the
    /// `openidconnect` crate, which also checks the issuer matches).
    async fn endpoints(&self) -> Result<Arc<Endpoints>, Unavailable> {
        if let Some(e) = self.cached_endpoints() {
            return Ok(e);
        }
        let mut failure = self.discovery.lock().await;
        if let Some(e) = self.cached_endpoints() {
            return Ok(e);
        }
        if let Some((at, why)) = failure.as_ref()
            && at.elapsed() < self.retry_pause()
        {
            return Err(Unavailable(why.clone()));
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| {
            Unavailable(format!("issuer `{}` is not a URL: {e}", self.config.issuer))
        })?;
        let metadata = match self.discover(&issuer).await {
            Ok(m) => m,
            Err(why) => {
                let why = format!("OIDC discovery of {}: {why}", self.config.issuer);
                *failure = Some((Instant::now(), why.clone()));
                return Err(Unavailable(why));
            }
        };
        *failure = None;
        let endpoints = Arc::new(Endpoints {
            jwks_uri: metadata.jwks_uri().url().to_string(),
            introspection: metadata
                .additional_metadata()
                .introspection_endpoint
                .clone(),
            token: metadata.token_endpoint().map(|u| u.url().to_string()),
        });
        tracing::info!(issuer = %self.config.issuer, jwks = %endpoints.jwks_uri, "identity provider discovered");
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = Some(endpoints.clone());
        Ok(endpoints)
    }

    /// Fetches and checks the discovery document. The `openidconnect` types
    /// parse it; the key set is fetched separately (in `jsonwebtoken`'s
    /// form, with its own rate limit), so discovery itself fetches no keys.
    async fn discover(&self, issuer: &IssuerUrl) -> Result<Metadata, String> {
        let url = issuer
            .join(".well-known/openid-configuration")
            .map_err(|e| e.to_string())?;
        let response = self
            .http
            .get(url.as_str())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered HTTP {}", response.status()));
        }
        let body = read_capped(response).await?;
        let metadata: Metadata = serde_json::from_slice(&body)
            .map_err(|e| format!("{url} is not a discovery document: {e}"))?;
        if metadata.issuer() != issuer {
            return Err(format!(
                "the document names issuer `{}`; tokens must come from `{}`",
                metadata.issuer().as_str(),
                issuer.as_str()
            ));
        }
        Ok(metadata)
    }

    fn cached_key(&self, kid: &str) -> Option<Arc<SigningKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    /// The signing key with this id. An unknown id triggers a JWKS fetch,
    /// at most once per `jwks_min_refetch`.
    pub async fn signing_key(&self, kid: &str) -> Result<Arc<SigningKey>, KeyError> {
        if let Some(k) = self.cached_key(kid) {
            return Ok(k);
        }
        let mut last = self.last_fetch.lock().await;
        if let Some(k) = self.cached_key(kid) {
            return Ok(k);
        }
        if let Some((at, failure)) = last.as_ref()
            && at.elapsed() < self.config.jwks_min_refetch
        {
            // Too soon to fetch again. If the last fetch failed, the keys are
            // unknown, not the token's key: that is the provider's fault.
            return Err(match failure {
                Some(why) => KeyError::Unavailable(why.clone()),
                None => KeyError::NotYetKnown(crate::untrusted(kid, crate::SHOWN_CHARS)),
            });
        }
        self.refresh(&mut last).await?;
        self.cached_key(kid)
            .ok_or_else(|| KeyError::UnknownKid(crate::untrusted(kid, crate::SHOWN_CHARS)))
    }

    /// Fetches the keys and records the attempt (a failed one too, so a
    /// down provider is not hammered).
    async fn refresh(&self, last: &mut Option<(Instant, Option<String>)>) -> Result<(), KeyError> {
        // A key set with no usable key is a provider problem too; the keys
        // held so far stay.
        let fetched = self.fetch_keys().await.and_then(|keys| {
            if keys.is_empty() {
                Err(KeyError::Unavailable(
                    "the JWKS holds no usable signing key".into(),
                ))
            } else {
                Ok(keys)
            }
        });
        *last = Some((
            Instant::now(),
            fetched.as_ref().err().map(|e| e.to_string()),
        ));
        let keys = fetched.inspect_err(|_| {
            self.metrics
                .jwks_fetches
                .with_label_values(&["failed"])
                .inc();
        })?;
        self.metrics.jwks_fetches.with_label_values(&["ok"]).inc();
        tracing::info!(keys = keys.len(), "signing keys fetched");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// Discovers the provider and fetches its keys ahead of the first
    /// token, so the first requests do not wait and a provider that is down
    /// at start shows in the log at once.
    pub async fn prefetch(&self) -> Result<(), KeyError> {
        let mut last = self.last_fetch.lock().await;
        self.refresh(&mut last).await
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, Arc<SigningKey>>, KeyError> {
        let endpoints = self
            .endpoints()
            .await
            .map_err(|e| KeyError::Unavailable(e.0))?;
        let unavailable =
            |what: String| KeyError::Unavailable(format!("JWKS {}: {what}", endpoints.jwks_uri));
        let response = self
            .http
            .get(&endpoints.jwks_uri)
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("answered HTTP {}", response.status())));
        }
        let body = read_capped(response).await.map_err(unavailable)?;
        parse_jwks(&body).map_err(unavailable)
    }

    /// Asks the provider about a token (RFC 7662), as the confidential client.
    pub async fn introspect(&self, token: &str) -> Result<Claims, Unavailable> {
        let endpoints = self.endpoints().await?;
        let url = endpoints.introspection.as_deref().ok_or_else(|| {
            Unavailable(format!(
                "{} announces no introspection_endpoint",
                self.config.issuer
            ))
        })?;
        let (id, secret) = self
            .confidential_client("introspection")
            .map_err(Unavailable)?;
        self.metrics.introspections.inc();
        let started = Instant::now();
        let result = self.call_introspection(url, id, secret, token).await;
        self.metrics
            .introspection_latency
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.introspection_failures.inc();
        }
        result
    }

    async fn call_introspection(
        &self,
        url: &str,
        client_id: &str,
        secret: &str,
        token: &str,
    ) -> Result<Claims, Unavailable> {
        let fail = |what: String| Unavailable(format!("introspection at {url}: {what}"));
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let response = self
            .post_form(url, client_id, secret, body)
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::BAD_REQUEST {
            // Keycloak answers 400 (not `active: false`) for a token it cannot
            // parse at all: that is about the token, not the provider.
            return Ok(Claims {
                active: Some(false),
                ..Claims::default()
            });
        }
        if !status.is_success() {
            return Err(fail(format!(
                "answered HTTP {status}{}",
                if status.as_u16() == 401 {
                    " (check identity.client_id and identity.client_secret)"
                } else {
                    ""
                }
            )));
        }
        let body = read_capped(response).await.map_err(fail)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|e| {
            fail(format!(
                "answered something that is not an introspection response: {e}"
            ))
        })?;
        if claims.active.is_none() {
            return Err(fail("answered without the `active` member".into()));
        }
        Ok(claims)
    }
}

impl Provider {
    /// Exchanges `subject_token` (a caller's access token) for an access
    /// token addressed to `audience` (RFC 8693), as the confidential client,
    /// with `scope` (space-separated) if not empty.
    pub async fn exchange(
        &self,
        subject_token: &str,
        audience: &str,
        scope: &str,
    ) -> Result<IssuedToken, ExchangeFailure> {
        let endpoints = self
            .endpoints()
            .await
            .map_err(|e| ExchangeFailure::Unavailable(e.0))?;
        let url = endpoints.token.as_deref().ok_or_else(|| {
            ExchangeFailure::Refused(format!(
                "{} announces no token_endpoint",
                self.config.issuer
            ))
        })?;
        let (id, secret) = self
            .confidential_client("token exchange")
            .map_err(ExchangeFailure::Refused)?;
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", TOKEN_EXCHANGE_GRANT)
                .append_pair("subject_token", subject_token)
                .append_pair("subject_token_type", ACCESS_TOKEN_TYPE)
                .append_pair("requested_token_type", ACCESS_TOKEN_TYPE)
                .append_pair("audience", audience);
            if !scope.is_empty() {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let at = |what: String| format!("token exchange at {url}: {what}");
        let response = self
            .post_form(url, id, secret, body)
            .await
            .map_err(|e| ExchangeFailure::Unavailable(at(error_chain(&e))))?;
        let status = response.status();
        let body = read_capped(response)
            .await
            .map_err(|e| ExchangeFailure::Unavailable(at(e)))?;
        // Failing, busy, or too slow to read the request: passing.
        if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
            return Err(ExchangeFailure::Unavailable(at(format!(
                "answered HTTP {status}"
            ))));
        }
        if !status.is_success() {
            // RFC 6749 5.2: `error` and `error_description`, from the
            // provider; shown as text, clipped.
            let refusal: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let field = |name: &str| {
                refusal
                    .get(name)
                    .and_then(serde_json::Value::as_str)
                    .map(|s| crate::untrusted(s, 200))
            };
            let hint = if status.as_u16() == 401 {
                " (check identity.client_id and identity.client_secret)"
            } else {
                ""
            };
            return Err(ExchangeFailure::Refused(at(format!(
                "refused (HTTP {status}{hint}): {}{}",
                field("error").unwrap_or_else(|| "no error code".into()),
                field("error_description")
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default(),
            ))));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            token_type: String,
            expires_in: Option<u64>,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            ExchangeFailure::Refused(at(format!("answered something that is not a token: {e}")))
        })?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(ExchangeFailure::Refused(at(format!(
                "issued a `{}` token; only bearer tokens can be passed on",
                crate::untrusted(&answer.token_type, 40)
            ))));
        }
        Ok(IssuedToken {
            access_token: answer.access_token,
            expires_in: answer.expires_in,
        })
    }

    /// The gateway's confidential client (id, secret), which `what` needs.
    fn confidential_client(&self, what: &str) -> Result<(&str, &str), String> {
        match (&self.config.client_id, &self.config.client_secret) {
            (Some(id), Some(secret)) => Ok((id, secret)),
            _ => Err(format!(
                "{what} needs identity.client_id and identity.client_secret"
            )),
        }
    }

    /// POSTs a form to the provider as the confidential client.
    async fn post_form(
        &self,
        url: &str,
        client_id: &str,
        secret: &str,
        body: String,
    ) -> Result<reqwest::Response, reqwest::Error> {
        // RFC 6749 2.3.1: the credentials are form-urlencoded before Basic.
        let form = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        self.http
            .post(url)
            .basic_auth(form(client_id), Some(form(secret)))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
    }
}

/// RFC 8693's grant type, and its type of the tokens exchanged.
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Signing keys of a JWKS document by key id. Keys for encryption, without
/// an id, or of a kind `jsonwebtoken` cannot use are skipped.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<SigningKey>>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = HashMap::new();
    for raw in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let algorithm = match jwk.common.key_algorithm.map(signing_algorithm) {
            Some(Some(a)) => a,
            Some(None) => continue,
            None => match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => continue,
            },
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            out.insert(kid, Arc::new(SigningKey { key, algorithm }));
        }
    }
    Ok(out)
}

fn signing_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        // HMAC keys are never published; encryption algorithms do not sign.
        _ => return None,
    })
}

/// The most a provider answer may weigh; discovery documents, key sets and
/// introspection answers are a few KiB.
const MAX_ANSWER: usize = 1024 * 1024;

async fn read_capped(mut response: reqwest::Response) -> Result<bytes::Bytes, String> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(format!("answered more than {MAX_ANSWER} bytes"));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("answered more than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// An error with its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keeps_signing_keys_only() {
        // A Keycloak-shaped JWKS: one RSA signing key, one encryption key,
        // one key of an unknown kind.
        let doc = serde_json::json!({"keys": [
            {"kid": "sig-1", "kty": "RSA", "alg": "RS256", "use": "sig",
             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
             "e": "AQAB"},
            {"kid": "enc-1", "kty": "RSA", "alg": "RSA-OAEP", "use": "enc",
             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
             "e": "AQAB"},
            {"kid": "odd", "kty": "XYZ"}
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).expect("jwks");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys["sig-1"].algorithm, Algorithm::RS256);
        assert!(parse_jwks(b"<html>").is_err());
    }
}
