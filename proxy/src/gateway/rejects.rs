//! One place where the gateway's failures become responses: each kind of
//! error (upstream, reading its answer, the session store, a worker's hold
//! publish, ...) gets its HTTP status and JSON-RPC error here.

use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::REQUEST_CANCELLED;
use crate::edge::{self, Reject, Request, Response, ResponseBody};
use crate::holds::HoldPublishError;
use crate::jsonrpc::{self, Id, code};
use crate::metrics::RecentError;
use crate::routes::OrgRoute;
use crate::session::StoreError;
use crate::upstream::{Cause, UpstreamError};
use crate::upstream::{ProbeError, ReadError};

/// A session id no session has (any more).
pub(super) fn session_not_found() -> Reject {
    Reject::new(
        StatusCode::NOT_FOUND,
        code::SESSION_NOT_FOUND,
        "session not found: it expired, was deleted, or never existed; initialize a new one",
    )
}

/// A session store that refused or failed.
pub(super) fn store_reject(e: StoreError) -> Reject {
    match e {
        StoreError::SubjectFull { .. } => Reject::new(
            StatusCode::TOO_MANY_REQUESTS,
            code::BAD_REQUEST,
            e.to_string(),
        ),
        StoreError::Full { .. } => Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::INTERNAL_ERROR,
            e.to_string(),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("5")),
        _ => Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::INTERNAL_ERROR,
            e.to_string(),
        ),
    }
}

/// A request the client cancelled.
pub(super) fn cancelled(id: Option<&Id>) -> Reject {
    Reject::new(
        StatusCode::OK,
        REQUEST_CANCELLED,
        "request cancelled by the client",
    )
    .with_id(id)
}

/// Maps an upstream failure to what the client sees. The status says which
/// side failed (502 or 504); the JSON-RPC error says which upstream and why.
/// An upstream 404 is never passed on: to MCP clients it means "session gone".
pub fn upstream_reject(e: UpstreamError, id: Option<&Id>) -> Reject {
    let status = match &e {
        UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Credential { error, .. } => match error.cause {
            Cause::Refused => StatusCode::BAD_GATEWAY,
            // The identity provider is down: passing, and not the
            // upstream's fault.
            Cause::Passing(after) => {
                let seconds = HeaderValue::from(after.as_secs().max(1));
                return Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::UPSTREAM_ERROR,
                    e.to_string(),
                )
                .with_id(id)
                .with_header(header::RETRY_AFTER, seconds);
            }
            // Only a fresh token of the caller's helps: as for any token
            // the gateway refuses.
            Cause::Callers => {
                return Reject::new(StatusCode::UNAUTHORIZED, code::BAD_REQUEST, e.to_string())
                    .with_id(id)
                    .with_header(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
            }
        },
        UpstreamError::Status {
            status,
            body,
            content_type,
            ..
        } if status.is_client_error()
            && *status != StatusCode::NOT_FOUND
            && is_json(content_type.as_deref())
            && jsonrpc::parse_message(body).is_ok() =>
        {
            // The upstream refused the request itself, in JSON-RPC: pass it on.
            return passed_refusal(*status, body, id, || e.to_string());
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    Reject::new(status, code::UPSTREAM_ERROR, e.to_string()).with_id(id)
}

pub(super) fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| edge::mime_is(ct, "application/json"))
}

/// An upstream's own JSON-RPC refusal (`body`), as the client gets it:
/// the upstream's status, code, message and data.
pub(super) fn passed_refusal(
    status: StatusCode,
    body: &[u8],
    id: Option<&Id>,
    fallback: impl FnOnce() -> String,
) -> Reject {
    let refusal = serde_json::from_slice::<Value>(body).unwrap_or_default();
    let message = refusal
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(fallback, str::to_owned);
    let upstream_code = refusal
        .pointer("/error/code")
        .and_then(Value::as_i64)
        .unwrap_or(code::UPSTREAM_ERROR);
    let mut reject = Reject::new(status, upstream_code, message).with_id(id);
    if let Some(data) = refusal.pointer("/error/data") {
        reject = reject.with_data(data.clone());
    }
    reject
}

/// An upstream answer that could not be read to its end.
pub(super) fn read_reject(e: ReadError, id: Option<&Id>) -> Reject {
    let status = match e {
        ReadError::Timeout { .. } | ReadError::TooLong { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    Reject::new(status, code::UPSTREAM_ERROR, e.to_string()).with_id(id)
}

/// For a 2026-07-28 client: an upstream's `404` with JSON-RPC -32601 is a
/// modern server's "no such method" (`streamable-http.mdx`), passed on as
/// it is, not the "session gone" it means to a 2025 client; every other
/// failure as [`upstream_reject`].
pub(super) fn modern_upstream_reject(e: UpstreamError, id: Option<&Id>) -> Reject {
    if let UpstreamError::Status {
        status,
        body,
        content_type,
        ..
    } = &e
        && *status == StatusCode::NOT_FOUND
        && is_json(content_type.as_deref())
        && serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.pointer("/error/code").and_then(Value::as_i64))
            == Some(code::METHOD_NOT_FOUND)
    {
        return passed_refusal(*status, body, id, || e.to_string());
    }
    upstream_reject(e, id)
}

pub(super) fn probe_reject(e: ProbeError, id: Option<&Id>) -> Reject {
    match e {
        ProbeError::Upstream(e) => upstream_reject(e, id),
        ProbeError::Read(e) => read_reject(e, id),
        e @ ProbeError::NoResult { .. } => {
            Reject::new(StatusCode::BAD_GATEWAY, code::UPSTREAM_ERROR, e.to_string()).with_id(id)
        }
    }
}

/// A refused hold publish: 404 for an unknown session (or hold, on GET),
/// 410 for a finished hold (its `state` tells the worker why: a cancel stops
/// its work), 400 for a bad message, 429 past `holds.max_per_session` or
/// `holds.max_waiting_calls`, 503 when the client's stream lags.
pub fn hold_reject(e: HoldPublishError) -> Reject {
    let (status, rpc) = match &e {
        HoldPublishError::Unknown(_) => (StatusCode::NOT_FOUND, code::NOT_FOUND),
        HoldPublishError::Finished { .. } => (StatusCode::GONE, code::BAD_REQUEST),
        HoldPublishError::Invalid(_) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
        HoldPublishError::Busy => (StatusCode::SERVICE_UNAVAILABLE, code::INTERNAL_ERROR),
        HoldPublishError::TooMany(_) | HoldPublishError::TooManyCalls(_) => {
            (StatusCode::TOO_MANY_REQUESTS, code::BAD_REQUEST)
        }
    };
    let mut r = Reject::new(status, rpc, e.to_string());
    if let HoldPublishError::Finished { state, .. } = &e {
        r = r.with_data(json!({"state": state.as_str()}));
    }
    if matches!(e, HoldPublishError::Busy) {
        r.headers
            .push((header::RETRY_AFTER, HeaderValue::from_static("1")));
    }
    r
}

/// A `requestState` that names no call waiting for this caller.
pub(super) fn unknown_request_state() -> Reject {
    Reject::new(
        StatusCode::BAD_REQUEST,
        code::INVALID_PARAMS,
        "requestState names no call of this gateway waiting for this caller's input (tampered, already answered, or past upstream.max_duration)",
    )
}

/// The call that asked for the input is gone: the client must call again.
pub(super) fn call_lost(reason: String) -> Reject {
    Reject::new(
        StatusCode::BAD_GATEWAY,
        code::UPSTREAM_ERROR,
        format!("{reason}; call again without requestState"),
    )
}

/// A listen whose hidden upstream session ended under it: the client may
/// call again, which opens a new one. 503, not the 404 a 2025 client gets
/// for an ended session: to a 2026-07-28 client that means "no such
/// method", and it has no `initialize` to send.
pub(super) fn hidden_session_ended(org: &OrgRoute, id: &Id) -> Reject {
    Reject::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code::BAD_REQUEST,
        format!(
            "the hidden upstream session of org '{}' for this client ended while the listen started; call subscriptions/listen again",
            org.name
        ),
    )
    .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    .with_id(Some(id))
}

/// A 5xx answer as the status page lists it: its JSON-RPC error's message,
/// and what failed, told by the status and the JSON-RPC code.
pub(super) fn recent_error(req: &Request, response: &Response) -> RecentError {
    let error = match &response.body {
        ResponseBody::Full(body) => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("error").cloned()),
        _ => None,
    };
    let rpc_code = error
        .as_ref()
        .and_then(|e| e.get("code"))
        .and_then(Value::as_i64);
    let message = error
        .as_ref()
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| format!("HTTP {}", response.status), str::to_owned);
    RecentError {
        at: std::time::SystemTime::now(),
        org: response.label.org.clone(),
        method: response.label.method,
        status: response.status.as_u16(),
        kind: error_kind(response.status, rpc_code),
        message,
        request_id: req.request_id.clone(),
    }
}

/// What failed, in a word or two, for a 5xx answer.
fn error_kind(status: StatusCode, rpc_code: Option<i64>) -> &'static str {
    match (status, rpc_code) {
        (StatusCode::GATEWAY_TIMEOUT, Some(code::UPSTREAM_ERROR)) => "upstream timeout",
        (_, Some(code::UPSTREAM_ERROR)) => "upstream",
        // The identity provider, the session store, a full gateway.
        (StatusCode::SERVICE_UNAVAILABLE, _) => "unavailable",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            method: http::Method::POST,
            path: "/org-1/mcp".into(),
            query: None,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            request_id: "req-7".into(),
            parsed: None,
        }
    }

    #[test]
    fn an_upstream_failure_is_listed_with_its_message_org_and_request() {
        let answer = upstream_reject(
            crate::upstream::UpstreamError::Timeout {
                replica: "org-1#2".into(),
                after: std::time::Duration::from_secs(3),
            },
            None,
        )
        .into_response()
        .labeled(edge::Label {
            org: Some("org-1".into()),
            method: "tools/call",
        });
        let e = recent_error(&request(), &answer);
        assert_eq!(e.status, 504);
        assert_eq!(e.kind, "upstream timeout");
        assert_eq!(e.org.as_deref(), Some("org-1"));
        assert_eq!(e.method, "tools/call");
        assert_eq!(e.request_id, "req-7");
        assert_eq!(e.message, "upstream org-1#2 did not answer within 3s");
    }

    #[test]
    fn unavailable_and_bodiless_answers_have_a_kind_and_a_message() {
        let store = store_reject(StoreError::Unavailable("redis is down".into())).into_response();
        let e = recent_error(&request(), &store);
        assert_eq!((e.status, e.kind), (503, "unavailable"));
        assert!(e.message.contains("redis is down"), "{}", e.message);
        let bare = Response::empty(StatusCode::INTERNAL_SERVER_ERROR);
        let e = recent_error(&request(), &bare);
        assert_eq!(
            (e.kind, e.message.as_str()),
            ("internal", "HTTP 500 Internal Server Error")
        );
        assert_eq!(e.org, None);
    }
}
