//! `ratatosk-auth`: turns a bearer token into an [`Identity`].
//!
//! The [`Validator`] checks Keycloak (or any OIDC provider's) access tokens
//! in one of three [`AuthMode`]s, caches the results (positive until the
//! token expires, negative briefly), coalesces concurrent look-ups of one
//! token into one call to the provider, and refuses tokens of sessions that
//! back-channel logout ended. [`forward`] serves the same checks to other
//! proxies (nginx `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub mod claims;
pub mod config;
pub mod env;
pub mod exchange;
pub mod forward;
pub mod logout;
pub mod metadata;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod ratelog;
pub mod throttle;
pub mod tls;
pub mod upstream_jwt;
pub mod validator;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use config::ProviderConfig;
pub use validator::Validator;

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
    pub issued_at: Option<SystemTime>,
    /// The identity provider's session (`sid`), used by back-channel logout.
    pub session_id: Option<String>,
    /// Keycloak realm roles (`realm_access.roles`).
    #[serde(default)]
    pub realm_roles: Vec<String>,
    /// Keycloak client roles by client (`resource_access.<client>.roles`).
    #[serde(default)]
    pub client_roles: std::collections::BTreeMap<String, Vec<String>>,
    /// Groups (a `groups` claim), as the provider names them (`/admins`
    /// with full paths).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The subject every request gets on a route with `auth: none`.
const ANONYMOUS_SUBJECT: &str = "anonymous";

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
            issued_at: None,
            session_id: None,
            realm_roles: Vec::new(),
            client_roles: std::collections::BTreeMap::new(),
            groups: Vec::new(),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.subject == ANONYMOUS_SUBJECT
    }

    pub fn belongs_to(&self, org: &str) -> bool {
        self.orgs.iter().any(|o| o == org)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Checks the identity against a route: its org, then its scopes.
    pub fn authorize(&self, org: &str, required_scopes: &[String]) -> Result<(), AuthError> {
        if !self.belongs_to(org) {
            return Err(AuthError::WrongOrg {
                org: org.to_owned(),
            });
        }
        if let Some(missing) = required_scopes.iter().find(|s| !self.has_scope(s)) {
            return Err(AuthError::InsufficientScope {
                scope: missing.clone(),
            });
        }
        Ok(())
    }
}

/// How a route validates bearer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
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

    pub fn uses_introspection(self) -> bool {
        matches!(self, AuthMode::Introspect | AuthMode::JwtIntrospect)
    }
}

/// Why a request was not let through.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send Authorization: Bearer <access token>")]
    MissingToken,
    #[error("malformed Authorization header: {0}")]
    MalformedHeader(String),
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("the token is not valid for org '{org}'")]
    WrongOrg { org: String },
    #[error("the token lacks the required scope '{scope}'")]
    InsufficientScope { scope: String },
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// Too many tokens not in the cache are waiting for the provider: the
    /// token may well be good, so this is a 503 to retry, not a 401.
    #[error("too many token checks are waiting for the identity provider: {0}")]
    Busy(String),
}

impl AuthError {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::MissingToken | AuthError::InvalidToken(_) => 401,
            // RFC 6750 3.1: a malformed request is a 400.
            AuthError::MalformedHeader(_) => 400,
            AuthError::WrongOrg { .. } | AuthError::InsufficientScope { .. } => 403,
            AuthError::Unavailable(_) | AuthError::Busy(_) => 503,
        }
    }

    /// What the client is told. Provider trouble is for operators (the
    /// caller logs the details, its URLs and errors); the client gets a
    /// plain message.
    pub fn client_message(&self) -> String {
        match self {
            AuthError::Unavailable(_) => {
                "the identity provider is unavailable; retry shortly".to_owned()
            }
            AuthError::Busy(_) => {
                "too many token checks are waiting for the identity provider; retry shortly"
                    .to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The RFC 6750 `error` code, if the refusal has one.
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            AuthError::MissingToken => None,
            AuthError::MalformedHeader(_) => Some("invalid_request"),
            AuthError::InvalidToken(_) => Some("invalid_token"),
            // A token of another org lacks privileges, it is not invalid: the
            // challenge names the scope that gets a token for this org.
            AuthError::WrongOrg { .. } | AuthError::InsufficientScope { .. } => {
                Some("insufficient_scope")
            }
            AuthError::Unavailable(_) | AuthError::Busy(_) => None,
        }
    }
}

/// At most `max` characters of text from a client, for messages and logs.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// How much of a client's text is shown in a message or a log line.
pub const SHOWN_CHARS: usize = 64;

/// Text a client chose (a `kid`, a header value, an org from a path, a
/// parser's complaint about a token), made safe to log and to echo: at
/// most `max` of its characters, with control characters, quotes,
/// backslashes and everything outside printable ASCII escaped, so it can
/// neither forge log lines nor reorder them on a terminal.
pub fn untrusted(text: &str, max: usize) -> String {
    let (kept, cut) = match text.char_indices().nth(max) {
        Some((i, _)) => (&text[..i], true),
        None => (text, false),
    };
    let mut out: String = kept.escape_default().collect();
    if cut {
        out.push_str("...");
    }
    out
}

/// A cache key: SHA-256 over length-prefixed parts, so that no two lists
/// of parts hash alike by running into each other.
#[derive(Default)]
pub(crate) struct CacheKey(sha2::Sha256);

impl CacheKey {
    pub(crate) fn part(&mut self, bytes: &[u8]) -> &mut Self {
        use sha2::Digest;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.0.finalize().into()
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer_token(header: Option<&[u8]>, max_len: usize) -> Result<&str, AuthError> {
    let Some(raw) = header else {
        return Err(AuthError::MissingToken);
    };
    let value = std::str::from_utf8(raw)
        .map_err(|_| AuthError::MalformedHeader("the header is not ASCII".into()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme (Basic, ...) carries no bearer token.
        return Err(AuthError::MissingToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedHeader(
            "the bearer token is empty".into(),
        ));
    }
    if token.len() > max_len {
        return Err(AuthError::InvalidToken(format!(
            "the token is {} bytes long; at most {max_len} are accepted",
            token.len()
        )));
    }
    // RFC 6750 b64token characters.
    let b64token = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if !token.bytes().all(b64token) {
        return Err(AuthError::MalformedHeader(
            "the bearer token has characters a token cannot have".into(),
        ));
    }
    Ok(token)
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

    #[test]
    fn authorize_checks_org_then_scopes() {
        let mut id = Identity::anonymous("org-1");
        id.scopes = vec!["mcp:tools".into()];
        assert_eq!(id.authorize("org-1", &["mcp:tools".into()]), Ok(()));
        assert!(matches!(
            id.authorize("org-2", &[]),
            Err(AuthError::WrongOrg { .. })
        ));
        assert_eq!(
            id.authorize("org-1", &["admin".into()]),
            Err(AuthError::InsufficientScope {
                scope: "admin".into()
            })
        );
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        assert_eq!(
            bearer_token(Some(b"Bearer abc.def-_~+/="), 100),
            Ok("abc.def-_~+/=")
        );
        assert_eq!(bearer_token(Some(b"bearer  x "), 100), Ok("x"));
        assert_eq!(bearer_token(None, 100), Err(AuthError::MissingToken));
        assert_eq!(
            bearer_token(Some(b"Basic dXNlcg=="), 100),
            Err(AuthError::MissingToken),
            "another scheme is no bearer token"
        );
        for bad in [&b"Bearer"[..], b"Bearer ", b"Bearer a b", b"Bearer \xff"] {
            assert!(
                matches!(
                    bearer_token(Some(bad), 100),
                    Err(AuthError::MalformedHeader(_))
                ),
                "{bad:?}"
            );
        }
        let long = format!("Bearer {}", "a".repeat(101));
        assert!(matches!(
            bearer_token(Some(long.as_bytes()), 100),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn refusals_map_to_statuses() {
        assert_eq!(AuthError::MissingToken.status(), 401);
        assert_eq!(AuthError::WrongOrg { org: "o".into() }.status(), 403);
        assert_eq!(
            AuthError::InsufficientScope { scope: "s".into() }.bearer_error(),
            Some("insufficient_scope")
        );
        assert_eq!(AuthError::Unavailable("down".into()).status(), 503);
        assert_eq!(AuthError::MalformedHeader("x".into()).status(), 400);
        assert_eq!(
            AuthError::WrongOrg { org: "o".into() }.bearer_error(),
            Some("insufficient_scope")
        );
    }

    #[test]
    fn untrusted_text_is_escaped_and_clipped() {
        assert_eq!(untrusted("kid-1", SHOWN_CHARS), "kid-1");
        // A forged log line, a terminal escape, quotes, a bidi override.
        assert_eq!(
            untrusted("a\nlevel=ERROR \u{1b}[2J\"'\\\u{202e}", 100),
            "a\\nlevel=ERROR \\u{1b}[2J\\\"\\'\\\\\\u{202e}"
        );
        let long = "k".repeat(1000);
        let shown = untrusted(&long, SHOWN_CHARS);
        assert_eq!(shown, format!("{}...", "k".repeat(64)));
        // Clipping counts characters, never splitting one.
        assert_eq!(untrusted("ääää", 2), "\\u{e4}\\u{e4}...");
        assert!(
            untrusted(&"\u{0}".repeat(500), SHOWN_CHARS)
                .chars()
                .all(|c| c.is_ascii_graphic())
        );
    }

    #[test]
    fn clipping_keeps_short_text_and_cuts_long_text() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("ääää", 2), "ää…");
    }
}
