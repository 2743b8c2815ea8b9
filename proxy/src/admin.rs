//! The admin listener: health, readiness, metrics, the publish API, the
//! sessions API and config reloads. Keep it on a network only operators and
//! workers reach; all but health, readiness and metrics also need the
//! publish secret.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;

use crate::edge::{Reject, Response};
use crate::gateway::{Gateway, PublishError};
use crate::holds::HoldPublishError;
use crate::jsonrpc::code;

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
                return Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    code::NOT_FOUND,
                    format!("unknown org '{}'", crate::jsonrpc::clip(org, 64)),
                ));
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
        (_, ["healthz" | "readyz" | "metrics"]) => Err(Reject::method_not_allowed(method, "GET")),
        (_, ["reload"]) => Err(Reject::method_not_allowed(method, "POST")),
        (_, ["sessions", _, "messages"]) => Err(Reject::method_not_allowed(method, "POST")),
        (_, ["sessions", _, "holds", _]) => Err(Reject::method_not_allowed(method, "GET, POST")),
        (_, ["orgs", _, "sessions"]) => Err(Reject::method_not_allowed(method, "GET")),
        _ => Err(Reject::new(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!(
                "no admin endpoint at '{}'; see /healthz, /readyz, /metrics, /reload, /sessions/{{id}}/messages, /sessions/{{id}}/holds/{{hold}}, /orgs/{{org}}/sessions",
                crate::jsonrpc::clip(path, 64)
            ),
        )),
    }
}

/// Ready unless draining, or the session store or the node bus does not
/// answer.
async fn readiness(gw: &Gateway) -> Response {
    let live = gw.live_full();
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
        body["events"] = json!({"bus": events.bus_up(), "dropped": events.dropped()});
    }
    json_response(code, body)
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response {
    Response::json(status, Bytes::from(v.to_string()))
}

/// The publish and sessions APIs take `Authorization: Bearer <publish secret>`.
fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<(), Reject> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let unauthorized = |message: &str| {
        let mut r = Reject::new(StatusCode::UNAUTHORIZED, code::BAD_REQUEST, message);
        r.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ratatosk-admin\""),
        ));
        r
    };
    match presented {
        None => Err(unauthorized(
            "missing Authorization: Bearer <publish secret>",
        )),
        Some(token)
            if constant_time_eq::constant_time_eq(
                token.as_bytes(),
                gw.live().config.publish.secret.as_bytes(),
            ) =>
        {
            Ok(())
        }
        Some(_) => Err(unauthorized("wrong publish secret")),
    }
}
