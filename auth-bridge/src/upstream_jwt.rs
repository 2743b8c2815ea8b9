//! `gateway-jwt` upstream credentials: the gateway signs a short-lived ES256
//! JWT per caller and upstream, and publishes its key set, so an upstream
//! checks who calls without asking Keycloak.
//!
//! Claims: `iss` (the gateway), `sub`, `aud` (the upstream), `org`,
//! `scope`, `roles` (realm roles), `groups`, `client_id`, `iat`, `nbf`,
//! `exp` (`ttl` later) and `jti`. A token is reused for the same caller
//! and upstream while more than half its life is left.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderValue;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Identity;

/// `upstream_jwt:` in the gateway's config.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamJwtConfig {
    /// The signing key: a PEM P-256 private key (PKCS#8 or SEC1). Put it in
    /// the environment: `key: ${RATATOSK_UPSTREAM_JWT_KEY}`.
    pub key: String,
    /// `iss` of the tokens. Default: the gateway's `public_url`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// How long a token lives.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

impl std::fmt::Debug for UpstreamJwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamJwtConfig")
            .field("key", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}

impl UpstreamJwtConfig {
    /// Problems, as (field, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = signing_key(&self.key) {
            out.push(("key".to_owned(), e));
        }
        if self.ttl < Duration::from_secs(10) || self.ttl > Duration::from_secs(3600) {
            out.push((
                "ttl".to_owned(),
                format!("expected 10s to 1h, got {:?}", self.ttl),
            ));
        }
        out
    }
}

fn signing_key(pem: &str) -> Result<(EncodingKey, Jwk), String> {
    let key = EncodingKey::from_ec_pem(pem.as_bytes())
        .map_err(|e| format!("expected a PEM P-256 private key (PKCS#8 or SEC1): {e}"))?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)
        .map_err(|e| format!("not a P-256 key: {e}"))?;
    // RFC 7638 thumbprint as the key id, so a new key gets a new id.
    let thumbprint = match &jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => {
            let canonical = format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                ec.x, ec.y
            );
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(canonical))
        }
        _ => return Err("not an EC key".to_owned()),
    };
    jwk.common.key_id = Some(thumbprint);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(KeyAlgorithm::ES256);
    Ok((key, jwk))
}

/// A token kept for reuse, as the `Authorization` value it is sent in,
/// with its `iat` and `exp`.
#[derive(Clone)]
struct Issued {
    bearer: HeaderValue,
    iat: u64,
    exp: u64,
}

/// Signs the tokens of every `gateway-jwt` upstream.
pub struct UpstreamSigner {
    key: EncodingKey,
    header: Header,
    issuer: String,
    ttl: Duration,
    jwks: Bytes,
    /// Tokens by a hash of what they say (caller, org, audience), with
    /// their `exp`; kept for half their life at most.
    issued: moka::sync::Cache<[u8; 32], Issued>,
}

impl UpstreamSigner {
    /// `default_issuer` is the gateway's public URL.
    pub fn new(config: &UpstreamJwtConfig, default_issuer: &str) -> Result<UpstreamSigner, String> {
        let (key, jwk) = signing_key(&config.key)?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = jwk.common.key_id.clone();
        let jwks = serde_json::to_vec(&JwkSet { keys: vec![jwk] })
            .map_err(|e| format!("cannot write the key set: {e}"))?
            .into();
        Ok(UpstreamSigner {
            key,
            header,
            issuer: config
                .issuer
                .clone()
                .unwrap_or_else(|| default_issuer.to_owned()),
            ttl: config.ttl,
            jwks,
            issued: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(config.ttl / 2)
                .build(),
        })
    }

    /// The public key set (JWKS), as JSON.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// `Bearer <token>` for `caller` of `org`, for the upstream `audience`:
    /// the `Authorization` value, marked sensitive. The token expires `ttl`
    /// from now, or with the caller's own token if that is sooner.
    pub fn bearer(
        &self,
        caller: &Identity,
        org: &str,
        audience: &str,
    ) -> Result<HeaderValue, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let caller_exp = caller
            .expires_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let exp = (now + self.ttl.as_secs()).min(caller_exp.unwrap_or(u64::MAX));
        if exp <= now {
            return Err("the caller's token has expired".to_owned());
        }
        // Every item and list length-prefixed: no two callers' claims hash
        // alike.
        let mut what = crate::CacheKey::default();
        for part in [caller.subject.as_str(), org, audience] {
            what.part(part.as_bytes());
        }
        for list in [&caller.scopes, &caller.realm_roles, &caller.groups] {
            what.part(&(list.len() as u64).to_le_bytes());
            list.iter().for_each(|item| {
                what.part(item.as_bytes());
            });
        }
        what.part(caller.client_id.as_deref().unwrap_or("").as_bytes())
            .part(caller.username.as_deref().unwrap_or("").as_bytes())
            .part(&caller_exp.unwrap_or(0).to_le_bytes());
        let key = what.finish();
        // Reused while more than half its life is left, by the wall clock.
        if let Some(issued) = self.issued.get(&key)
            && now < issued.iat + (issued.exp - issued.iat) / 2
        {
            return Ok(issued.bearer);
        }
        let jti: u128 = rand::random();
        let mut claims = json!({
            "iss": self.issuer,
            "sub": caller.subject,
            "aud": audience,
            "org": org,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": format!("{jti:032x}"),
        });
        if !caller.scopes.is_empty() {
            claims["scope"] = json!(caller.scopes.join(" "));
        }
        if !caller.realm_roles.is_empty() {
            claims["roles"] = json!(caller.realm_roles);
        }
        if !caller.groups.is_empty() {
            claims["groups"] = json!(caller.groups);
        }
        if let Some(client) = &caller.client_id {
            claims["client_id"] = json!(client);
        }
        if let Some(name) = &caller.username {
            claims["preferred_username"] = json!(name);
        }
        let token = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| format!("cannot sign an upstream token: {e}"))?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| format!("an upstream token is not a header value: {e}"))?;
        bearer.set_sensitive(true);
        self.issued.insert(
            key,
            Issued {
                bearer: bearer.clone(),
                iat: now,
                exp,
            },
        );
        Ok(bearer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    /// The token of [`UpstreamSigner::bearer`].
    fn token_of(
        signer: &UpstreamSigner,
        caller: &Identity,
        audience: &str,
    ) -> Result<String, String> {
        let bearer = signer.bearer(caller, caller.orgs[0].as_str(), audience)?;
        let value = bearer.to_str().expect("ascii");
        Ok(value
            .strip_prefix("Bearer ")
            .expect("a bearer value")
            .to_owned())
    }

    #[test]
    fn tokens_verify_against_the_published_key_set_and_say_who_calls() {
        let config = UpstreamJwtConfig {
            key: crate::testing::ec_private_key_pem(),
            issuer: None,
            ttl: Duration::from_secs(120),
        };
        assert!(config.problems().is_empty());
        let signer = UpstreamSigner::new(&config, "https://gw.example").expect("signer");
        let mut alice = Identity::anonymous("org-1");
        alice.subject = "alice-id".into();
        alice.scopes = vec!["mcp:tools".into()];
        alice.realm_roles = vec!["mcp-reader".into()];
        let token = token_of(&signer, &alice, "tickets").expect("token");
        assert_eq!(token_of(&signer, &alice, "tickets").expect("again"), token);
        assert_ne!(token_of(&signer, &alice, "files").expect("other"), token);

        let set: JwkSet = serde_json::from_slice(&signer.jwks()).expect("jwks");
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.alg, Algorithm::ES256);
        let jwk = set.find(header.kid.as_deref().expect("kid")).expect("key");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["tickets"]);
        validation.set_issuer(&["https://gw.example"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_jwk(jwk).expect("decoding key"),
            &validation,
        )
        .expect("verifies")
        .claims;
        assert_eq!(claims["sub"], "alice-id");
        assert_eq!(claims["org"], "org-1");
        assert_eq!(claims["scope"], "mcp:tools");
        assert_eq!(claims["roles"], json!(["mcp-reader"]));
        assert_eq!(
            claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
            120
        );
    }

    #[test]
    fn a_token_never_outlives_the_callers_own() {
        let config = UpstreamJwtConfig {
            key: crate::testing::ec_private_key_pem(),
            issuer: None,
            ttl: Duration::from_secs(600),
        };
        let signer = UpstreamSigner::new(&config, "https://gw").expect("signer");
        let mut bob = Identity::anonymous("o");
        bob.subject = "bob".into();
        bob.expires_at = Some(SystemTime::now() + Duration::from_secs(60));
        let claims =
            crate::testing::unverified_claims(&token_of(&signer, &bob, "a").expect("token"));
        let left = claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat");
        assert!((59..=60).contains(&left), "{left}");
        let again = token_of(&signer, &bob, "a").expect("reused");
        assert_eq!(
            crate::testing::unverified_claims(&again),
            claims,
            "reused for half its life"
        );
        bob.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        assert!(token_of(&signer, &bob, "a").is_err());
    }

    #[test]
    fn a_bad_key_or_ttl_is_named() {
        let config = UpstreamJwtConfig {
            key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            issuer: None,
            ttl: Duration::from_secs(1),
        };
        let problems = config.problems();
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["key", "ttl"], "{problems:?}");
        assert!(problems[0].1.contains("P-256"), "{problems:?}");
    }
}
