//! The identity provider settings shared by the gateway and the
//! forward-auth server.

use std::time::Duration;

use serde::Deserialize;

/// How to reach and trust the identity provider (a Keycloak realm).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The realm's issuer, e.g. `http://127.0.0.1:8180/realms/ratatosk`.
    /// Tokens must carry exactly this `iss`.
    pub issuer: String,
    /// The audience tokens must be issued for (`aud`), e.g. the gateway's
    /// public URL. Set a matching audience mapper in the realm.
    pub audience: String,
    /// The scopes every client is told to ask for (the `scope` of
    /// `WWW-Authenticate`, RFC 9728 `scopes_supported`), before a route's
    /// own `scopes`. Clients register with these too, so they must be client
    /// scopes of the realm that a registering client may ask for: the one
    /// whose mapper puts `audience` in `aud`, and `organization`.
    #[serde(default = "default_client_scopes")]
    pub client_scopes: Vec<String>,
    /// The confidential client used for introspection.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Its secret; put it in the environment.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Bound on every call to the provider (discovery, keys, introspection).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Allowed clock difference with the provider when checking `exp`/`nbf`.
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// The shortest interval between two JWKS fetches (a token with an
    /// unknown key id triggers one).
    #[serde(default = "default_jwks_refetch", with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
    #[serde(default)]
    pub cache: CacheConfig,
    /// The longest an access token of the realm can live. A logged-out
    /// session stays on the revocation list this long.
    #[serde(default = "default_max_token_lifetime", with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// Client ids whose back-channel logout tokens are accepted (their `aud`).
    #[serde(default)]
    pub logout_client_ids: Vec<String>,
    /// The longest bearer token accepted, in bytes.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Bounds on introspection calls for tokens not in the cache.
    #[serde(default)]
    pub introspection: IntrospectionLimits,
    /// The CA (PEM bundle) the provider's certificate chains to, in place
    /// of the system's roots: for a Keycloak with a private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Validation results kept at most; the cache evicts beyond this.
    pub max_entries: u64,
    /// A valid token is trusted from the cache this long at most (and never
    /// past its `exp`).
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// An invalid token is refused from the cache this long.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Turns the cache off (for comparisons; every request then validates).
    pub enabled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 100_000,
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            enabled: true,
        }
    }
}

/// How many introspection calls tokens not in the cache may cause. Tokens
/// go in one of two lanes: those whose signature verified against the
/// realm's published keys (an attacker cannot make many of them), and
/// those that could not be checked locally (signed with HMAC, or with a
/// key that is not fetched yet). Junk can only fill the second.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntrospectionLimits {
    pub verified: LaneLimits,
    pub unverified: LaneLimits,
    /// The longest a token waits for its lane; then 503 with Retry-After.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

/// One lane of introspection calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneLimits {
    /// Calls in flight at once.
    pub max_concurrent: usize,
    /// Calls per second on average; a second's worth may start at once.
    pub per_second: u32,
}

impl Default for IntrospectionLimits {
    fn default() -> Self {
        IntrospectionLimits {
            verified: LaneLimits {
                max_concurrent: 32,
                per_second: 200,
            },
            unverified: LaneLimits {
                max_concurrent: 4,
                per_second: 20,
            },
            max_wait: Duration::from_secs(1),
        }
    }
}

/// No duration in a config may exceed this: larger ones are mistakes, and
/// would overflow time arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn default_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_skew() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_refetch() -> Duration {
    Duration::from_secs(10)
}
fn default_max_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_client_scopes() -> Vec<String> {
    vec!["organization".to_owned()]
}

fn default_max_token_bytes() -> usize {
    16 * 1024
}

impl ProviderConfig {
    /// The scopes a client should ask for on a route that requires
    /// `required`: the realm's client scopes, then the route's.
    pub fn advertised_scopes(&self, required: &[String]) -> Vec<String> {
        let mut scopes = self.client_scopes.clone();
        for scope in required {
            if !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
        scopes
    }

    /// How calls to the provider are checked: `ca_file`, or the system's
    /// roots.
    pub fn tls(&self) -> crate::tls::ClientTls {
        crate::tls::ClientTls {
            ca_file: self.ca_file.clone(),
            ..Default::default()
        }
    }

    /// Problems with the settings, as (field, message), for the caller's
    /// config report. `needs_client` says what needs the confidential client
    /// (introspection, token exchange), if anything does.
    pub fn problems(&self, needs_client: Option<&str>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = self.tls().load() {
            out.push((e.field.to_owned(), e.message));
        }
        match url::Url::parse(&self.issuer) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => out.push((
                "issuer".into(),
                format!(
                    "expected the realm's issuer URL, e.g. `https://sso.example.com/realms/acme`, got `{}`",
                    self.issuer
                ),
            )),
        }
        if self.audience.trim().is_empty() {
            out.push(("audience".into(), "expected a non-empty audience".into()));
        }
        for (i, scope) in self.client_scopes.iter().enumerate() {
            if let Err(why) = check_scope(scope) {
                out.push((format!("client_scopes[{i}]"), why));
            }
        }
        if let Some(what) = needs_client {
            if self.client_id.as_deref().is_none_or(str::is_empty) {
                out.push((
                    "client_id".into(),
                    format!("{what} needs the gateway's confidential client id"),
                ));
            }
            if self.client_secret.as_deref().is_none_or(str::is_empty) {
                out.push((
                    "client_secret".into(),
                    format!("{what} needs the client's secret (set it from the environment)"),
                ));
            }
        }
        for (field, d) in [
            ("timeout", self.timeout),
            ("jwks_min_refetch", self.jwks_min_refetch),
            ("cache.max_ttl", self.cache.max_ttl),
            ("cache.negative_ttl", self.cache.negative_ttl),
            ("max_token_lifetime", self.max_token_lifetime),
            ("clock_skew", self.clock_skew),
            ("introspection.max_wait", self.introspection.max_wait),
        ] {
            if d > MAX_DURATION {
                out.push((field.into(), "expected at most 30 days".into()));
            }
        }
        if self.timeout.is_zero() {
            out.push((
                "timeout".into(),
                "expected a positive duration like `3s`".into(),
            ));
        }
        if self.max_token_bytes < 256 || self.max_token_bytes > 1024 * 1024 {
            out.push((
                "max_token_bytes".into(),
                format!(
                    "expected between 256 and 1048576, got {}",
                    self.max_token_bytes
                ),
            ));
        }
        for (lane, limits) in [
            ("verified", &self.introspection.verified),
            ("unverified", &self.introspection.unverified),
        ] {
            if !(1..=10_000).contains(&limits.max_concurrent) {
                out.push((
                    format!("introspection.{lane}.max_concurrent"),
                    format!("expected 1 to 10000, got {}", limits.max_concurrent),
                ));
            }
            if !(1..=1_000_000).contains(&limits.per_second) {
                out.push((
                    format!("introspection.{lane}.per_second"),
                    format!("expected 1 to 1000000, got {}", limits.per_second),
                ));
            }
        }
        out
    }
}

/// Whether `scope` is one RFC 6749 scope-token: printable ASCII but space,
/// `"` and `\`; if not, the message that says so.
pub fn check_scope(scope: &str) -> Result<(), String> {
    let valid = !scope.is_empty()
        && scope
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "expected one scope name (printable ASCII, no space, quote or backslash), got `{scope}`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(client_scopes: &str) -> ProviderConfig {
        yaml_serde::from_str(&format!(
            "{{issuer: 'http://kc/realms/r', audience: gw{client_scopes}}}"
        ))
        .expect("a provider config")
    }

    #[test]
    fn clients_are_told_the_realm_scopes_then_the_route_scopes() {
        let default = config("");
        assert_eq!(default.client_scopes, vec!["organization"]);
        let c = config(", client_scopes: [organization, gateway]");
        assert!(c.problems(None).is_empty(), "{:?}", c.problems(None));
        assert_eq!(
            c.advertised_scopes(&["mcp:tools".into(), "gateway".into()]),
            vec!["organization", "gateway", "mcp:tools"]
        );
    }

    #[test]
    fn a_client_scope_must_be_one_scope_name() {
        let c = config(", client_scopes: [organization, 'a b', '', 'x\"y']");
        let fields: Vec<_> = c.problems(None).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            vec!["client_scopes[1]", "client_scopes[2]", "client_scopes[3]"]
        );
    }
}
