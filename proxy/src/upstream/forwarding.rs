//! What a request looks like toward the upstream: the gateway's session
//! and the caller's identity travel as `Ratatosk-*` headers, never as the
//! client's `Mcp-Session-Id`, and the client's credentials never go
//! upstream.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::edge::{MCP_PROTOCOL_VERSION, REQUEST_ID};

pub const RATATOSK_SESSION: HeaderName = HeaderName::from_static("ratatosk-session");
pub const RATATOSK_ORG: HeaderName = HeaderName::from_static("ratatosk-org");
pub const RATATOSK_SUBJECT: HeaderName = HeaderName::from_static("ratatosk-subject");
pub const RATATOSK_SCOPES: HeaderName = HeaderName::from_static("ratatosk-scopes");
pub const RATATOSK_USERNAME: HeaderName = HeaderName::from_static("ratatosk-username");

/// Trace context headers passed through to upstreams (W3C Trace Context).
const TRACE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Who and what a forwarded request is on behalf of.
pub struct Forwarding<'a> {
    pub session_id: &'a str,
    pub org: &'a str,
    /// The caller, as the auth bridge established it.
    pub identity: &'a std::sync::Arc<ratatosk_auth::Identity>,
    /// `None` for `initialize`, which negotiates it.
    pub protocol_version: Option<&'a str>,
    pub request_id: &'a str,
}

/// The headers of every JSON-RPC POST (to an upstream, or a WebSocket's
/// to its route): JSON in, JSON or SSE back.
pub(crate) fn json_rpc_headers(capacity: usize) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(capacity);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    h
}

/// A request's headers toward an upstream, and the caller they are for:
/// the pool adds the upstream's credential for that caller (see
/// [`super::Credentials`]) as it sends. Derefs to the headers. There is no
/// conversion from a bare `HeaderMap`: a request that lost its caller on
/// the way would be credited to the gateway, so that must be said
/// ([`Outbound::gateway`]).
#[derive(Clone, Debug)]
pub struct Outbound {
    pub headers: HeaderMap,
    pub caller: Option<std::sync::Arc<ratatosk_auth::Identity>>,
    /// The caller's own `Authorization`, when the request came with it:
    /// only ever exchanged (`upstream.auth: token-exchange`), never sent.
    pub authorization: Option<HeaderValue>,
}

impl Outbound {
    /// The gateway's own request (an era probe), on behalf of no caller.
    pub fn gateway(headers: HeaderMap) -> Outbound {
        Outbound {
            headers,
            caller: None,
            authorization: None,
        }
    }
}

impl std::ops::Deref for Outbound {
    type Target = HeaderMap;
    fn deref(&self) -> &HeaderMap {
        &self.headers
    }
}

impl std::ops::DerefMut for Outbound {
    fn deref_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }
}

/// Headers of a request to the upstream. Built from scratch, so nothing
/// of the client's (Authorization, cookies, its session id) leaks through
/// except trace context.
pub fn upstream_headers(f: &Forwarding<'_>, client: &HeaderMap) -> Outbound {
    let mut h = json_rpc_headers(10);
    let mut put = |name: HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    if let Some(v) = f.protocol_version {
        put(MCP_PROTOCOL_VERSION, v);
    }
    // Modern clients have no gateway session.
    if !f.session_id.is_empty() {
        put(RATATOSK_SESSION, f.session_id);
    }
    put(RATATOSK_ORG, f.org);
    put(RATATOSK_SUBJECT, &f.identity.subject);
    if !f.identity.scopes.is_empty() {
        put(RATATOSK_SCOPES, &f.identity.scopes.join(" "));
    }
    if let Some(username) = &f.identity.username {
        put(RATATOSK_USERNAME, username);
    }
    put(REQUEST_ID, f.request_id);
    for name in TRACE_HEADERS {
        if let Some(v) = client.get(&name) {
            h.insert(name, v.clone());
        }
    }
    Outbound {
        headers: h,
        caller: Some(f.identity.clone()),
        authorization: client.get(header::AUTHORIZATION).map(|v| {
            let mut v = v.clone();
            v.set_sensitive(true);
            v
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_carry_identity_and_never_credentials() {
        let mut client = HeaderMap::new();
        client.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret-token"),
        );
        client.insert(header::COOKIE, HeaderValue::from_static("sid=1"));
        client.insert("mcp-session-id", HeaderValue::from_static("client-visible"));
        client.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        let mut alice = ratatosk_auth::Identity::anonymous("org-1");
        alice.subject = "alice".into();
        alice.scopes = vec!["openid".into(), "mcp:tools".into()];
        let alice = std::sync::Arc::new(alice);
        let h = upstream_headers(
            &Forwarding {
                session_id: "S",
                org: "org-1",
                identity: &alice,
                protocol_version: Some("2025-06-18"),
                request_id: "req-1",
            },
            &client,
        );
        assert_eq!(h.get("ratatosk-session").expect("session"), "S");
        assert_eq!(h.get("ratatosk-org").expect("org"), "org-1");
        assert_eq!(h.get("ratatosk-subject").expect("subject"), "alice");
        assert_eq!(
            h.get("ratatosk-scopes").expect("scopes"),
            "openid mcp:tools"
        );
        assert_eq!(
            h.get("mcp-protocol-version").expect("version"),
            "2025-06-18"
        );
        assert_eq!(h.get("traceparent").expect("trace"), "00-abc-def-01");
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(h.get(header::COOKIE).is_none());
        assert!(h.get("mcp-session-id").is_none());
    }
}
