//! `ratatosk-auth`: turns a bearer token into an [`Identity`].
//!
//! This crate holds the public types the gateway is written against. Token
//! validation itself (JWKS, RFC 7662 introspection, the cache) lands with the
//! auth-bridge issue; until then routes run with [`AuthMode::None`] and every
//! request is served as [`Identity::anonymous`].

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Who is calling, as far as the gateway is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The token's `sub`; sessions are bound to it.
    pub subject: String,
    /// `preferred_username`, for logs and the admin API.
    pub username: Option<String>,
    /// Organization aliases the subject belongs to.
    pub orgs: Vec<String>,
    pub scopes: Vec<String>,
    pub client_id: Option<String>,
    pub audience: Vec<String>,
    pub expires_at: Option<SystemTime>,
    /// The identity provider's session (`sid`), used by back-channel logout.
    pub session_id: Option<String>,
}

/// The subject every request gets on a route with `auth: none`.
pub const ANONYMOUS_SUBJECT: &str = "anonymous";

impl Identity {
    /// The identity of every caller on a route with `auth: none`. It belongs to
    /// the given org so that org checks written for real tokens hold unchanged.
    pub fn anonymous(org: &str) -> Self {
        Identity {
            subject: ANONYMOUS_SUBJECT.to_owned(),
            username: None,
            orgs: vec![org.to_owned()],
            scopes: Vec::new(),
            client_id: None,
            audience: Vec::new(),
            expires_at: None,
            session_id: None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.subject == ANONYMOUS_SUBJECT
    }

    pub fn belongs_to(&self, org: &str) -> bool {
        self.orgs.iter().any(|o| o == org)
    }
}

/// How a route validates bearer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AuthMode {
    /// No validation: every caller is [`Identity::anonymous`]. The gateway
    /// warns loudly at start for every route that uses it.
    #[serde(rename = "none")]
    #[default]
    None,
    /// Local signature and claims check against the realm's JWKS.
    #[serde(rename = "jwt")]
    Jwt,
    /// RFC 7662 introspection against the identity provider.
    #[serde(rename = "introspect")]
    Introspect,
    /// Local check first, then introspection for revocation.
    #[serde(rename = "jwt+introspect")]
    JwtIntrospect,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Jwt => "jwt",
            AuthMode::Introspect => "introspect",
            AuthMode::JwtIntrospect => "jwt+introspect",
        }
    }
}

/// Why a token was not turned into an identity.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("malformed Authorization header: {0}")]
    MalformedHeader(String),
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token is not valid for org '{org}'")]
    WrongOrg { org: String },
    #[error("token lacks the required scope '{scope}'")]
    InsufficientScope { scope: String },
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_belongs_to_its_org_only() {
        let id = Identity::anonymous("org-1");
        assert!(id.is_anonymous());
        assert!(id.belongs_to("org-1"));
        assert!(!id.belongs_to("org-2"));
    }

    #[test]
    fn auth_mode_names_match_the_config_spelling() {
        for mode in [
            AuthMode::None,
            AuthMode::Jwt,
            AuthMode::Introspect,
            AuthMode::JwtIntrospect,
        ] {
            let json = format!("\"{}\"", mode.as_str());
            let parsed: AuthMode = serde_json::from_str(&json).expect("mode parses");
            assert_eq!(parsed, mode);
        }
    }
}
