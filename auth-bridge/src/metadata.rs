//! RFC 9728 protected resource metadata, and the `WWW-Authenticate`
//! challenge that points clients at it.

use serde_json::{Value, json};

use crate::AuthError;

/// Where the metadata of a resource is served: RFC 9728 inserts
/// `/.well-known/oauth-protected-resource` between host and path.
pub fn metadata_path(resource_path: &str) -> String {
    format!("/.well-known/oauth-protected-resource{resource_path}")
}

/// The metadata document of one protected resource.
pub fn resource_metadata(resource: &str, issuer: &str, scopes: &[String], name: &str) -> Value {
    json!({
        "resource": resource,
        "authorization_servers": [issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": scopes,
        "resource_name": name,
    })
}

/// The challenge for a refusal, naming the `scopes` to ask for
/// ([`ProviderConfig::advertised_scopes`](crate::ProviderConfig::advertised_scopes)):
/// none for an unavailable provider (503), where retrying, not a new token,
/// helps.
pub fn challenge(metadata_url: &str, scopes: &[String], error: &AuthError) -> Option<String> {
    (error.status() != 503).then(|| www_authenticate(metadata_url, &scopes.join(" "), error))
}

/// The `WWW-Authenticate` value for a refusal (RFC 6750, RFC 9728).
/// `scope` is what a client should ask for.
pub fn www_authenticate(metadata_url: &str, scope: &str, error: &AuthError) -> String {
    let mut out = format!("Bearer resource_metadata=\"{}\"", quote(metadata_url));
    if let Some(code) = error.bearer_error() {
        out.push_str(&format!(", error=\"{code}\""));
        out.push_str(&format!(
            ", error_description=\"{}\"",
            quote(&error.to_string())
        ));
    }
    // The whole set a client should ask for, not just what was missing: a
    // client that steps up asks for exactly this.
    if !scope.is_empty() {
        out.push_str(&format!(", scope=\"{}\"", quote(scope)));
    }
    out
}

/// A quoted-string body: no quotes, backslashes or control characters.
fn quote(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '\''
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_names_metadata_error_and_scope() {
        let url = "http://gw/.well-known/oauth-protected-resource/org-1/mcp";
        assert_eq!(
            www_authenticate(url, "organization gateway", &AuthError::MissingToken),
            format!("Bearer resource_metadata=\"{url}\", scope=\"organization gateway\"")
        );
        let bad = www_authenticate(url, "", &AuthError::InvalidToken("sig \"bad\"".into()));
        assert!(bad.contains("error=\"invalid_token\""), "{bad}");
        assert!(bad.contains("sig 'bad'"), "{bad}");
        let scope = www_authenticate(
            url,
            "organization gateway mcp:tools",
            &AuthError::InsufficientScope {
                scope: "mcp:tools".into(),
            },
        );
        assert!(
            scope.contains("error=\"insufficient_scope\"")
                && scope.ends_with("scope=\"organization gateway mcp:tools\""),
            "{scope}"
        );
    }

    #[test]
    fn metadata_lists_the_realm() {
        let m = resource_metadata(
            "http://gw/org-1/mcp",
            "http://kc/realms/r",
            &["mcp:tools".into()],
            "org-1",
        );
        assert_eq!(m["authorization_servers"][0], "http://kc/realms/r");
        assert_eq!(m["resource"], "http://gw/org-1/mcp");
        assert_eq!(
            metadata_path("/org-1/mcp"),
            "/.well-known/oauth-protected-resource/org-1/mcp"
        );
    }
}
