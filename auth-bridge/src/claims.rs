//! Token claims, from a JWT payload or an introspection answer, and the
//! [`Identity`] made of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::Identity;

/// The claims the gateway reads. Both a JWT payload and an RFC 7662
/// introspection answer deserialize into this.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub sid: Option<String>,
    /// Space-separated scopes.
    pub scope: Option<String>,
    pub preferred_username: Option<String>,
    /// Introspection's name for the user.
    pub username: Option<String>,
    pub azp: Option<String>,
    pub client_id: Option<String>,
    /// Keycloak's organizations: a list of aliases, or a map keyed by alias
    /// when the mapper adds ids or attributes.
    pub organization: Option<Value>,
    /// Introspection only: whether the token is active.
    pub active: Option<bool>,
    /// Keycloak's kind of token: `Bearer` for access tokens; `ID`,
    /// `Refresh`, `Logout`, ... for the others.
    pub typ: Option<String>,
    /// Keycloak's realm roles.
    pub realm_access: Option<Roles>,
    /// Keycloak's client roles, by client.
    pub resource_access: Option<std::collections::BTreeMap<String, Roles>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub groups: Vec<String>,
}

/// `{"roles": [...]}`, as Keycloak writes role claims.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Roles {
    #[serde(default, deserialize_with = "one_or_many")]
    pub roles: Vec<String>,
}

/// Refuses every kind of token but access tokens. Keycloak names the kind
/// in `typ`; a token without it (another provider's) is let through to the
/// other checks, where an ID token fails the audience.
pub fn access_token_type(typ: Option<&str>) -> Result<(), String> {
    match typ {
        None => Ok(()),
        Some(t) if t.eq_ignore_ascii_case("bearer") => Ok(()),
        Some(t) => Err(format!(
            "not an access token: its `typ` is `{}` (an ID, refresh or other token); send the access token",
            crate::untrusted(t, crate::SHOWN_CHARS)
        )),
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
        Null,
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
        Some(OneOrMany::Null) | None => Vec::new(),
    })
}

/// Organization aliases from the `organization` claim, in either shape.
pub fn organizations(claim: Option<&Value>) -> Vec<String> {
    match claim {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// A NumericDate claim as a time; `None` if absent or out of range.
pub(crate) fn time(secs: Option<i64>) -> Option<SystemTime> {
    let secs = u64::try_from(secs?).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

impl Claims {
    /// The identity these claims describe. A token without `sub` has no
    /// one to bind a session to, so it is refused.
    pub fn identity(&self) -> Result<Identity, String> {
        let subject = self
            .sub
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or("the token has no `sub` claim")?;
        Ok(Identity {
            subject,
            username: self
                .preferred_username
                .clone()
                .or_else(|| self.username.clone()),
            orgs: organizations(self.organization.as_ref()),
            scopes: self
                .scope
                .as_deref()
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            client_id: self.azp.clone().or_else(|| self.client_id.clone()),
            audience: self.aud.clone(),
            expires_at: time(self.exp),
            issued_at: time(self.iat),
            session_id: self.sid.clone(),
            realm_roles: self
                .realm_access
                .as_ref()
                .map(|r| r.roles.clone())
                .unwrap_or_default(),
            client_roles: self
                .resource_access
                .iter()
                .flatten()
                .map(|(client, r)| (client.clone(), r.roles.clone()))
                .collect(),
            groups: self.groups.clone(),
        })
    }
}

/// One base64url part of a JWT, decoded.
pub(crate) fn decode_part(part: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()
}

/// The claims `introspect` mode looks at before a call, unverified.
#[derive(Deserialize)]
pub(crate) struct Peek {
    pub(crate) iss: Option<String>,
    pub(crate) exp: Option<f64>,
    pub(crate) typ: Option<String>,
}

/// A JWT's payload part, read for a look (not verified).
pub(crate) fn peek_claims(payload: &str) -> Option<Peek> {
    serde_json::from_slice(&decode_part(payload)?).ok()
}

/// How long a JWT says it has left (its `exp`, unverified), if it is one
/// and says so.
pub(crate) fn unverified_lifetime(token: &str) -> Option<Duration> {
    let exp = peek_claims(token.split('.').nth(1)?)?.exp?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let left = exp - now;
    (left.is_finite() && left > 0.0).then(|| Duration::from_secs_f64(left.min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn organizations_as_list_or_map() {
        assert_eq!(
            organizations(Some(&json!(["org-1", "org-2"]))),
            vec!["org-1", "org-2"]
        );
        let mut from_map =
            organizations(Some(&json!({"org-2": {"id": "x"}, "org-1": {"id": "y"}})));
        from_map.sort();
        assert_eq!(from_map, vec!["org-1", "org-2"]);
        assert_eq!(organizations(Some(&json!("org-1"))), vec!["org-1"]);
        assert!(organizations(None).is_empty());
        assert!(organizations(Some(&json!(42))).is_empty());
    }

    #[test]
    fn claims_become_an_identity() {
        let c: Claims = serde_json::from_value(json!({
            "iss": "http://kc/realms/r", "sub": "u-1", "aud": "gw", "exp": 2_000_000_000i64,
            "iat": 1_999_999_000i64, "sid": "s-1", "scope": "openid mcp:tools",
            "preferred_username": "alice", "azp": "mcp-client", "organization": ["org-1"]
        }))
        .expect("claims");
        let id = c.identity().expect("identity");
        assert_eq!(id.subject, "u-1");
        assert_eq!(id.audience, vec!["gw"]);
        assert_eq!(id.scopes, vec!["openid", "mcp:tools"]);
        assert_eq!(id.orgs, vec!["org-1"]);
        assert_eq!(id.session_id.as_deref(), Some("s-1"));
        assert_eq!(id.client_id.as_deref(), Some("mcp-client"));
        assert!(id.expires_at.is_some() && id.issued_at.is_some());
        assert!(id.realm_roles.is_empty() && id.client_roles.is_empty() && id.groups.is_empty());
    }

    #[test]
    fn keycloak_roles_and_groups_become_facts_of_the_identity() {
        let c: Claims = serde_json::from_value(json!({
            "sub": "u-1",
            "realm_access": {"roles": ["mcp-reader", "default-roles-r"]},
            "resource_access": {"ratatosk-gateway": {"roles": ["tickets"]}, "account": {"roles": ["view-profile"]}},
            "groups": ["/readers"]
        }))
        .expect("claims");
        let id = c.identity().expect("identity");
        assert_eq!(id.realm_roles, ["mcp-reader", "default-roles-r"]);
        assert_eq!(id.client_roles["ratatosk-gateway"], ["tickets"]);
        assert_eq!(id.client_roles["account"], ["view-profile"]);
        assert_eq!(id.groups, ["/readers"]);
        let one: Claims =
            serde_json::from_value(json!({"sub": "u", "groups": "admins"})).expect("claims");
        assert_eq!(one.identity().expect("identity").groups, ["admins"]);
    }

    #[test]
    fn only_access_tokens_pass_the_type_check() {
        assert_eq!(access_token_type(Some("Bearer")), Ok(()));
        assert_eq!(access_token_type(None), Ok(()));
        for other in ["ID", "Refresh", "Logout", "Offline", "DPoP", ""] {
            let why = access_token_type(Some(other)).expect_err(other);
            assert!(why.starts_with("not an access token"), "{why}");
        }
        let why = access_token_type(Some("ID\nforged")).expect_err("escaped");
        assert!(why.contains("ID\\nforged"), "{why}");
    }

    #[test]
    fn a_token_without_subject_is_refused() {
        let c: Claims = serde_json::from_value(json!({"aud": ["a", "b"]})).expect("claims");
        assert_eq!(c.aud, vec!["a", "b"]);
        assert!(c.identity().is_err());
    }
}
