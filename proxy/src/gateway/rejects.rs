//! One place where the gateway's failures become responses: each kind of
//! error (upstream, reading its answer, the session store, a worker's hold
//! publish, ...) gets its HTTP status and JSON-RPC error here.

use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::REQUEST_CANCELLED;
use crate::edge::{self, Reject};
use crate::holds::HoldPublishError;
use crate::jsonrpc::{self, Id, code};
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
