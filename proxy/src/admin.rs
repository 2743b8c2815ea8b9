//! The admin listener: health, readiness, metrics, the status page, the
//! publish API, the sessions API and config reloads. Keep it on a network
//! only operators and workers reach; all but health, readiness and metrics
//! also need the publish secret.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;

use crate::edge::{Reject, Response};
use crate::gateway::{Gateway, PublishError};
use crate::holds::HoldPublishError;
use crate::jsonrpc::code;

/// The status page: what the gateway is doing, as one HTML page.
mod status;

/// Answers one admin request. `body` is already read (and bounded).
pub async fn handle(
    gw: &Arc<Gateway>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    route(gw, method, path, headers, body)
        .await
        .unwrap_or_else(Reject::into_response)
}

async fn route(
    gw: &Arc<Gateway>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Reject> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, [""]) => match authorize_page(gw, headers) {
            Ok(()) => Ok(status::page(gw).await),
            Err(e) => Ok(status::unauthorized(&e.to_string())),
        },
        (&Method::GET, ["healthz"]) => Ok(json_response(StatusCode::OK, json!({"status": "ok"}))),
        (&Method::GET, ["readyz"]) => Ok(readiness(gw).await),
        (_, ["jwks.json"]) => Ok(gw.serve_jwks(method)),
        (&Method::GET, ["metrics"]) => {
            // A scrape never waits on a Redis that is down for long: the
            // gauge then keeps its last count.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), gw.count_sessions()).await;
            let mut r = Response::empty(StatusCode::OK);
            r.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r.body = crate::edge::ResponseBody::Full(Bytes::from(gw.metrics.render()));
            Ok(r)
        }
        (&Method::POST, ["sessions", id, "messages"]) => {
            authorize(gw, headers)?;
            match gw.publish(id, &body).await {
                Ok(event) => Ok(json_response(
                    StatusCode::ACCEPTED,
                    json!({"event_id": event.to_string()}),
                )),
                Err(PublishError::UnknownSession) => Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    code::SESSION_NOT_FOUND,
                    "session not found: it expired, was deleted, or never existed",
                )),
                Err(PublishError::Invalid(e)) => Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    e.code(),
                    format!("the body must be one JSON-RPC message: {e}"),
                )),
                Err(PublishError::Store(e)) => Err(Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::INTERNAL_ERROR,
                    e.to_string(),
                )),
            }
        }
        (&Method::POST, ["sessions", id, "holds", hold]) => {
            authorize(gw, headers)?;
            let state = gw.publish_hold(id, hold, &body).await?;
            Ok(json_response(
                StatusCode::ACCEPTED,
                json!({"hold": hold, "state": state.as_str()}),
            ))
        }
        (&Method::GET, ["sessions", id, "holds", hold]) => {
            authorize(gw, headers)?;
            match gw.hold_view(id, hold).await? {
                Some(view) => Ok(json_response(
                    StatusCode::OK,
                    json!({"hold": hold, "state": view.state.as_str(), "answers": view.answers}),
                )),
                None => Err(crate::gateway::hold_reject(HoldPublishError::Unknown(
                    crate::jsonrpc::clip(hold, 64),
                ))),
            }
        }
        (&Method::DELETE, ["sessions", id]) => {
            authorize(gw, headers)?;
            match gw.end_session(id, "deleted through the admin API").await {
                Ok(true) => Ok(Response::empty(StatusCode::NO_CONTENT)),
                Ok(false) => Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    code::SESSION_NOT_FOUND,
                    "session not found",
                )),
                Err(e) => Err(Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::INTERNAL_ERROR,
                    e.to_string(),
                )),
            }
        }
        (&Method::GET, ["orgs", org, "sessions"]) => {
            authorize(gw, headers)?;
            // Every route of the org: its one, or one per server.
            let live = gw.live_full();
            let mut keys: Vec<&str> = live.routes.of_org(org).map(|r| &*r.key).collect();
            if keys.is_empty() {
                return Err(crate::gateway::unknown_org(org));
            }
            keys.sort_unstable();
            let mut sessions = Vec::new();
            for key in keys {
                sessions.extend(gw.store.list_org(key).await.map_err(|e| {
                    Reject::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        code::INTERNAL_ERROR,
                        e.to_string(),
                    )
                })?);
            }
            let listed: Vec<serde_json::Value> = sessions
                .iter()
                .map(|s| {
                    let mut v = s.public();
                    v["events_buffered"] = json!(gw.hub.get(&s.state.id).map_or(0, |l| l.len()));
                    v
                })
                .collect();
            Ok(json_response(
                StatusCode::OK,
                json!({"org": org, "count": listed.len(), "sessions": listed}),
            ))
        }
        (&Method::PUT, ["orgs", org, "servers", name]) => {
            authorize_registration(gw, headers, org)?;
            let (status, answer) = gw.register(org, name, &body).await?;
            Ok(json_response(status, answer))
        }
        (&Method::DELETE, ["orgs", org, "servers", name]) => {
            authorize_registration(gw, headers, org)?;
            gw.deregister(org, name).await?;
            Ok(Response::empty(StatusCode::NO_CONTENT))
        }
        (&Method::GET, ["orgs", org, "servers"]) => {
            authorize_registration(gw, headers, org)?;
            Ok(json_response(StatusCode::OK, gw.servers_of(org).await?))
        }
        (&Method::POST, ["reload"]) => {
            authorize(gw, headers)?;
            match gw.reload_file().await {
                Ok(done) => Ok(json_response(StatusCode::OK, done.to_json())),
                Err(e) => Err(Reject::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    code::BAD_REQUEST,
                    format!("config reload refused, the running config stays: {e}"),
                )
                .with_data(e.problems_json())),
            }
        }
        (_, ["" | "healthz" | "readyz" | "metrics"]) => {
            Err(Reject::method_not_allowed(method, "GET"))
        }
        (_, ["reload"]) => Err(Reject::method_not_allowed(method, "POST")),
        (_, ["sessions", _, "messages"]) => Err(Reject::method_not_allowed(method, "POST")),
        (_, ["sessions", _, "holds", _]) => Err(Reject::method_not_allowed(method, "GET, POST")),
        (_, ["orgs", _, "sessions" | "servers"]) => Err(Reject::method_not_allowed(method, "GET")),
        (_, ["orgs", _, "servers", _]) => Err(Reject::method_not_allowed(method, "PUT, DELETE")),
        _ => Err(Reject::new(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!(
                "no admin endpoint at '{}'; see / (the status page), /healthz, /readyz, /metrics, /reload, /sessions/{{id}}/messages, /sessions/{{id}}/holds/{{hold}}, /orgs/{{org}}/sessions, /orgs/{{org}}/servers[/{{name}}]",
                crate::jsonrpc::clip(path, 64)
            ),
        )),
    }
}

/// Ready unless draining, or the session store or the node bus does not
/// answer.
async fn readiness(gw: &Gateway) -> Response {
    let (code, body) = readiness_report(gw, &gw.live_full()).await;
    json_response(code, body)
}

/// What `/readyz` answers, for the routes of `live`; the status page shows
/// the same.
async fn readiness_report(
    gw: &Gateway,
    live: &crate::gateway::Live,
) -> (StatusCode, serde_json::Value) {
    let orgs: serde_json::Map<String, serde_json::Value> = live
        .routes
        .orgs()
        .map(|o| {
            (
                o.key.to_string(),
                json!({"replicas": o.server.pool.snapshot(), "era": o.server.era.snapshot()}),
            )
        })
        .collect();
    let ready = gw.store.ready().await;
    let store = match &ready {
        Ok(()) => json!({"kind": gw.store.kind(), "ok": true}),
        Err(e) => json!({"kind": gw.store.kind(), "ok": false, "error": e.to_string()}),
    };
    // A node off the bus would miss other nodes' events and notices.
    let bus_up = gw.hub.events().is_none_or(|e| e.bus_up());
    let (code, status) = match ready {
        _ if gw.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
        Ok(()) if !bus_up => (StatusCode::SERVICE_UNAVAILABLE, "event bus unavailable"),
        Ok(()) => (StatusCode::OK, "ready"),
    };
    let mut body = json!({
        "status": status,
        "store": store,
        "config": {"generation": live.generation},
        "orgs": orgs,
    });
    if let Some(events) = gw.hub.events() {
        body["events"] = json!({"bus": events.bus_up(), "dropped": events.dropped(),
            "unreplicated": events.unreplicated(), "primary": events.primary()});
    }
    (code, body)
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response {
    Response::json(status, Bytes::from(v.to_string()))
}

/// The status page takes the publish secret as the API does, or as the
/// password of HTTP Basic (any user name): a browser cannot send a bearer
/// token, but asks for a password after a `Basic` challenge.
fn authorize_page(gw: &Gateway, headers: &HeaderMap) -> Result<(), PageRefusal> {
    match presented_secret(headers, true) {
        None => Err(PageRefusal::Missing),
        Some(password) if is_secret(gw, &password) => Ok(()),
        Some(_) => Err(PageRefusal::Wrong),
    }
}

/// The secret in `Authorization`: a bearer token, or with `basic` also the
/// password of HTTP Basic credentials.
fn presented_secret(headers: &HeaderMap, basic: bool) -> Option<Vec<u8>> {
    let (scheme, credentials) = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.as_bytes().to_vec())
    } else if basic && scheme.eq_ignore_ascii_case("basic") {
        basic_password(credentials)
    } else {
        None
    }
}

/// Whether `presented` is the publish secret (compared in constant time).
fn is_secret(gw: &Gateway, presented: &[u8]) -> bool {
    constant_time_eq::constant_time_eq(presented, gw.live().config.publish.secret.as_bytes())
}

/// Why the status page was refused.
#[derive(Debug, thiserror::Error)]
enum PageRefusal {
    #[error(
        "this page needs the admin secret (publish.secret): give it as the password, with any user name"
    )]
    Missing,
    #[error("wrong admin secret (publish.secret)")]
    Wrong,
}

/// The password of HTTP Basic credentials (`base64(user:password)`).
fn basic_password(credentials: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// The publish and sessions APIs take `Authorization: Bearer <publish secret>`.
fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<(), Reject> {
    let unauthorized = |message: &str| {
        let mut r = Reject::new(StatusCode::UNAUTHORIZED, code::BAD_REQUEST, message);
        r.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ratatosk-admin\""),
        ));
        r
    };
    match presented_secret(headers, false) {
        None => Err(unauthorized(
            "missing Authorization: Bearer <publish secret>",
        )),
        Some(token) if is_secret(gw, &token) => Ok(()),
        Some(_) => Err(unauthorized("wrong publish secret")),
    }
}

/// The registration API takes the admin secret, or the org's own
/// registration secret (`orgs.<org>.registration.secret`).
fn authorize_registration(gw: &Gateway, headers: &HeaderMap, org: &str) -> Result<(), Reject> {
    match presented_secret(headers, false) {
        Some(token) if gw.is_registration_secret(org, &token) => Ok(()),
        _ => authorize(gw, headers).map_err(|mut refusal| {
            refusal.message = format!(
                "{}, or the org's registration secret (orgs.{}.registration.secret)",
                refusal.message,
                crate::jsonrpc::clip(org, 64)
            );
            refusal
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::edge::ResponseBody;
    use crate::session::MemorySessionStore;
    use base64::Engine as _;

    const SECRET: &str = "admin-unit-secret-0123";

    /// A gateway whose only replica refuses connections: every request
    /// that reaches it fails.
    fn gateway() -> Arc<Gateway> {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\npublish: {{secret: {SECRET}}}\n\
             orgs:\n  org-1: {{upstream: {{era: stateless-2025, replicas: [\"http://127.0.0.1:1/mcp\"], connect_timeout: 1s}}}}\n"
        );
        let config =
            Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None).expect("config");
        Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
    }

    async fn get(gw: &Arc<Gateway>, path: &str, authorization: Option<String>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(a) = authorization {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&a).expect("header"),
            );
        }
        handle(gw, &Method::GET, path, &headers, Bytes::new()).await
    }

    fn basic(user: &str, password: &str) -> Option<String> {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Some(format!("Basic {encoded}"))
    }

    fn text(r: &Response) -> String {
        match &r.body {
            ResponseBody::Full(b) => String::from_utf8(b.to_vec()).expect("utf-8"),
            _ => String::new(),
        }
    }

    fn header_of(r: &Response, name: header::HeaderName) -> &str {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn the_status_page_asks_a_browser_for_the_secret() {
        let gw = gateway();
        for refused in [
            None,
            basic("admin", "wrong"),
            basic("admin", &format!("{SECRET}x")),
            Some(format!("Bearer {SECRET}x")),
            Some(format!("Digest {SECRET}")),
            Some("Basic not-base64!".into()),
        ] {
            let r = get(&gw, "/", refused.clone()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{refused:?}");
            assert_eq!(
                header_of(&r, header::WWW_AUTHENTICATE),
                "Basic realm=\"ratatosk-admin\""
            );
            assert_eq!(header_of(&r, header::CACHE_CONTROL), "no-store");
            assert!(!text(&r).contains("org-1"), "{}", text(&r));
        }
        // RFC 7617: the user name ends at the first colon.
        for user in ["admin", "", "ops team"] {
            let r = get(&gw, "/", basic(user, SECRET)).await;
            assert_eq!(r.status, StatusCode::OK, "user {user:?}");
        }
        let r = get(&gw, "/", Some(format!("Bearer {SECRET}"))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            header_of(&r, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_of(&r, header::CACHE_CONTROL), "no-store");
        assert!(
            header_of(&r, header::CONTENT_SECURITY_POLICY)
                .starts_with("default-src 'none'; style-src 'unsafe-inline'")
        );
        let page = text(&r);
        assert!(page.contains("<tr data-org=\"org-1\">"), "{page}");
        assert!(page.contains("data-replica=\"org-1#1\""), "{page}");
    }

    #[tokio::test]
    async fn basic_credentials_open_the_page_only() {
        let gw = gateway();
        let r = get(&gw, "/orgs/org-1/sessions", basic("admin", SECRET)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = handle(&gw, &Method::POST, "/", &HeaderMap::new(), Bytes::new()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        let r = get(&gw, "/nothing", None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(text(&r).contains("see / (the status page)"), "{}", text(&r));
    }

    #[tokio::test]
    async fn an_answered_upstream_failure_is_listed_on_the_page() {
        let gw = gateway();
        let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"unit","version":"1"}}}"#;
        let mut req = crate::testing::request(
            Method::POST,
            "/org-1/mcp",
            &[
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
            ],
            init,
        );
        req.request_id = "failing-request".into();
        let answer = gw.handle(req).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", text(&answer));
        let page = text(&get(&gw, "/", basic("ops", SECRET)).await);
        assert!(
            page.contains("<span data-field=\"errors-total\">1</span>"),
            "{page}"
        );
        let row = &page[page.find("<tr data-error>").expect("an error row")..];
        assert!(row.contains("<td data-field=\"org\">org-1</td>"), "{row}");
        assert!(
            row.contains("<td data-field=\"kind\">upstream</td>"),
            "{row}"
        );
        assert!(row.contains("<td data-field=\"status\">502</td>"), "{row}");
        assert!(row.contains("no replica of org"), "{row}");
        assert!(row.contains("failing-request"), "{row}");
    }

    #[tokio::test]
    async fn the_registration_api_takes_the_admin_secret_or_the_orgs_own() {
        const TEAM_SECRET: &str = "team-registration-secret";
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\npublish: {{secret: {SECRET}}}\n\
             orgs:\n  team: {{registration: {{secret: {TEAM_SECRET}}}}}\n\
             \x20 other: {{registration: {{}}}}\n"
        );
        let config =
            Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None).expect("config");
        let gw = Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway");
        let call =
            |method: Method, path: &'static str, secret: Option<&str>, body: &'static str| {
                let gw = gw.clone();
                let mut headers = HeaderMap::new();
                if let Some(secret) = secret {
                    let value = HeaderValue::from_str(&format!("Bearer {secret}")).expect("header");
                    headers.insert(header::AUTHORIZATION, value);
                }
                async move {
                    let r = handle(&gw, &method, path, &headers, Bytes::from(body)).await;
                    (r.status.as_u16(), text(&r))
                }
            };
        let ok = r#"{"upstream":{"era":"stateless-2025","replicas":["http://127.0.0.1:1/mcp"]},"ttl":"30s"}"#;
        for (secret, path, status) in [
            (None, "/orgs/team/servers/a", 401),
            (
                Some("wrong-secret-wrong-secret"),
                "/orgs/team/servers/a",
                401,
            ),
            // The org's secret is for its own org only.
            (Some(TEAM_SECRET), "/orgs/other/servers/a", 401),
            (Some(TEAM_SECRET), "/orgs/team/servers/a", 201),
            (Some(SECRET), "/orgs/team/servers/a", 200),
            (Some(SECRET), "/orgs/other/servers/a", 201),
        ] {
            let (got, text) = call(Method::PUT, path, secret, ok).await;
            assert_eq!(got, status, "{secret:?} {path}: {text}");
            if status == 401 {
                assert!(text.contains("registration secret"), "{text}");
            }
        }
        let (got, text) = call(Method::GET, "/orgs/team/servers", Some(TEAM_SECRET), "").await;
        assert_eq!(got, 200, "{text}");
        assert!(text.contains(r#""name":"a""#), "{text}");
        let (got, _) = call(Method::POST, "/orgs/team/servers/a", Some(SECRET), "").await;
        assert_eq!(got, 405);
        let (got, text) = call(
            Method::DELETE,
            "/orgs/team/servers/a",
            Some(TEAM_SECRET),
            "",
        )
        .await;
        assert_eq!(got, 204, "{text}");
        let (got, _) = call(
            Method::DELETE,
            "/orgs/team/servers/a",
            Some(TEAM_SECRET),
            "",
        )
        .await;
        assert_eq!(got, 404);
    }
}
