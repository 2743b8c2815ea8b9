//! OpenID Connect back-channel logout: the provider POSTs a signed
//! `logout_token` when a user session ends.

use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use jsonwebtoken::Validation;
use serde::{Deserialize, Serialize};

use crate::claims::time;
use crate::provider::{KeyError, Provider};
use crate::untrusted;

/// The event of the spec's `events` claim.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// What a verified logout token ends: a provider session, or all of a
/// subject's sessions. Serializable, so that one gateway node can tell
/// the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogoutEvent {
    pub sid: Option<String>,
    pub sub: Option<String>,
    /// When the provider issued the logout token.
    pub issued_at: Option<std::time::SystemTime>,
}

/// How old a logout token may be: they are sent the moment a session ends.
const MAX_LOGOUT_AGE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogoutError {
    /// The request or the token is wrong: answer 400.
    #[error("invalid logout request: {0}")]
    Invalid(String),
    /// The provider's keys could not be fetched: answer 503 so it retries.
    #[error("cannot verify the logout token now: {0}")]
    Unavailable(String),
}

impl LogoutError {
    /// The answer to a refused back-channel logout request (OIDC
    /// Back-Channel Logout 2.8): its status and JSON body. A logout that
    /// succeeded is answered 200 without a body; every answer carries
    /// `Cache-Control: no-store`.
    pub fn answer(&self) -> (http::StatusCode, serde_json::Value) {
        let (status, error) = match self {
            LogoutError::Invalid(_) => (http::StatusCode::BAD_REQUEST, "invalid_request"),
            LogoutError::Unavailable(_) => (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
            ),
        };
        let body = serde_json::json!({"error": error, "error_description": self.to_string()});
        (status, body)
    }
}

#[derive(Deserialize)]
struct LogoutClaims {
    sub: Option<String>,
    sid: Option<String>,
    iat: Option<i64>,
    exp: Option<i64>,
    jti: Option<String>,
    events: Option<serde_json::Map<String, serde_json::Value>>,
    nonce: Option<serde_json::Value>,
}

/// Verifies the `logout_token` of a form body: signature, `iss`, `aud`
/// (one of the configured client ids), `iat`, the logout event, `sid` or
/// `sub`, and no `nonce` (which would make it an ID token).
pub async fn verify(
    provider: &Provider,
    seen: &DashMap<String, SystemTime>,
    form: &[u8],
) -> Result<LogoutEvent, LogoutError> {
    let invalid = |why: String| LogoutError::Invalid(why);
    let config = provider.config();
    if config.logout_client_ids.is_empty() {
        return Err(invalid(
            "no client ids are configured for back-channel logout (identity.logout_client_ids)"
                .into(),
        ));
    }
    let token = url::form_urlencoded::parse(form)
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| invalid("the form has no logout_token".into()))?;
    if token.len() > config.max_token_bytes {
        return Err(invalid("the logout token is too long".into()));
    }
    // Parser complaints can quote the token: escaped and clipped.
    let header = jsonwebtoken::decode_header(&token)
        .map_err(|e| invalid(format!("not a JWT: {}", untrusted(&e.to_string(), 120))))?;
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| invalid("the JWT header has no kid".into()))?;
    let key = provider.signing_key(kid).await.map_err(|e| match e {
        KeyError::Unavailable(why) => LogoutError::Unavailable(why),
        e @ KeyError::NotYetKnown(_) => LogoutError::Unavailable(e.to_string()),
        other => invalid(other.to_string()),
    })?;
    if header.alg != key.algorithm {
        return Err(invalid("the JWT's alg does not match its key".into()));
    }
    let mut v = Validation::new(key.algorithm);
    v.set_issuer(&[config.issuer.as_str()]);
    let audiences: Vec<&str> = config
        .logout_client_ids
        .iter()
        .map(String::as_str)
        .collect();
    v.set_audience(&audiences);
    v.set_required_spec_claims(&["iss", "aud"]);
    // Time claims are checked below.
    v.validate_exp = false;
    v.leeway = config.clock_skew.as_secs();
    let data = jsonwebtoken::decode::<LogoutClaims>(&token, &key.key, &v).map_err(|e| {
        invalid(format!(
            "the logout token does not verify: {}",
            untrusted(&e.to_string(), 120)
        ))
    })?;
    let claims = data.claims;
    let has_event = claims
        .events
        .as_ref()
        .is_some_and(|e| e.contains_key(BACKCHANNEL_LOGOUT_EVENT));
    if !has_event {
        return Err(invalid(format!(
            "the token lacks the {BACKCHANNEL_LOGOUT_EVENT} event"
        )));
    }
    if claims.nonce.is_some() {
        return Err(invalid("a logout token must not carry a nonce".into()));
    }
    if claims.sid.is_none() && claims.sub.is_none() {
        return Err(invalid("the logout token names neither sid nor sub".into()));
    }
    // jsonwebtoken checks no time claim here (exp is optional in logout
    // tokens, iat it does not check at all): do it, so an old captured
    // token cannot be replayed.
    let now = SystemTime::now();
    let skew = config.clock_skew;
    let issued =
        time(claims.iat).ok_or_else(|| invalid("the logout token has no valid iat".into()))?;
    if issued > now + skew {
        return Err(invalid("the logout token was issued in the future".into()));
    }
    if now
        .duration_since(issued)
        .is_ok_and(|age| age > MAX_LOGOUT_AGE + skew)
    {
        return Err(invalid("the logout token is too old".into()));
    }
    if let Some(exp) = claims.exp
        && time(Some(exp)).is_none_or(|e| e.checked_add(skew).is_some_and(|e| e < now))
    {
        return Err(invalid("the logout token has expired".into()));
    }
    // Each token once: remember ids until they are too old to be accepted.
    if let Some(jti) = claims.jti {
        seen.retain(|_, t| {
            now.duration_since(*t)
                .is_ok_and(|age| age <= MAX_LOGOUT_AGE + skew * 2)
        });
        if seen.insert(jti, issued).is_some() {
            return Err(invalid("this logout token was already used".into()));
        }
    }
    Ok(LogoutEvent {
        sid: claims.sid,
        sub: claims.sub,
        issued_at: Some(issued),
    })
}
