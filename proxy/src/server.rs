//! Pingora glue. Each phase is one small function; the logic lives in
//! [`Gateway`] and the modules it calls.
//!
//! - [`McpProxy::request_filter`]: read the request (bounded), let the
//!   gateway answer it, write the answer (streaming SSE chunk by chunk).
//!   Every MCP request is answered here: the gateway reads and rewrites each
//!   message, and holds streams itself, so Pingora's upstream phases are not
//!   used for MCP traffic.
//! - [`AdminApp`]: the admin listener.
//! - [`Housekeeping`]: reaps idle sessions, and drains streams on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Version, header};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};
use rand::Rng;
use tracing::Instrument;

use crate::config::Limits;
use crate::edge::{self, Reject, Request, Response, ResponseBody};
use crate::gateway::Gateway;

/// How long a client may leave a write blocked (a full TCP window) before
/// its connection is dropped, so one stalled client never pins resources.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct McpProxy {
    pub gateway: Arc<Gateway>,
}

pub struct RequestCtx {
    request_id: String,
}

#[async_trait]
impl ProxyHttp for McpProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
        }
    }

    /// Answers the request in full; always returns `Ok(true)`.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_core::Result<bool> {
        ctx.request_id = request_id(session.req_header().headers.get(&edge::REQUEST_ID));
        let span = tracing::info_span!("request", id = %ctx.request_id);
        self.serve(session, &ctx.request_id).instrument(span).await;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora_core::Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "every MCP request is answered in request_filter",
        ))
    }
}

impl McpProxy {
    async fn serve(&self, session: &mut Session, request_id: &str) {
        let started = Instant::now();
        let limits = &self.gateway.config.limits;
        session.set_write_timeout(Some(WRITE_TIMEOUT));
        let (method, path) = {
            let h = session.req_header();
            (h.method.clone(), h.uri.path().to_owned())
        };
        if self.gateway.is_draining() {
            session.set_keepalive(None);
        }
        let response = match read_request(session, limits, request_id).await {
            Ok(req) => self.gateway.handle(req).await,
            Err(reject) => {
                // The rest of the body was not read: do not reuse the connection.
                session.set_keepalive(None);
                let mut r = reject
                    .into_response()
                    .labeled(self.gateway.label_for_path(&path, &method));
                if let Ok(v) = HeaderValue::from_str(request_id) {
                    r.headers.insert(edge::REQUEST_ID, v);
                }
                r
            }
        };
        let status = response.status;
        let streamed = matches!(response.body, ResponseBody::Stream(_));
        let outcome = write_response(session, response, &self.gateway).await;
        tracing::info!(
            %method,
            path,
            status = status.as_u16(),
            streamed,
            ms = started.elapsed().as_millis() as u64,
            outcome,
            "served"
        );
    }
}

/// A request id: the client's `X-Request-Id` if it is short and plain,
/// otherwise a fresh random one.
fn request_id(given: Option<&HeaderValue>) -> String {
    if let Some(v) = given.and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return v.to_owned();
    }
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// Reads the request head and the whole body, refusing bodies over the
/// limit before buffering them.
async fn read_request(
    session: &mut Session,
    limits: &Limits,
    request_id: &str,
) -> Result<Request, Reject> {
    let head = session.req_header();
    let request = Request {
        method: head.method.clone(),
        path: head.uri.path().to_owned(),
        query: head.uri.query().map(str::to_owned),
        headers: head.headers.clone(),
        body: Bytes::new(),
        request_id: request_id.to_owned(),
    };
    let body = read_body(session, limits).await?;
    Ok(Request { body, ..request })
}

/// Reads a body of at most `limits.max_body_bytes`, all of it within
/// `limits.body_read_timeout`.
pub async fn read_body(session: &mut ServerSession, limits: &Limits) -> Result<Bytes, Reject> {
    let max = limits.max_body_bytes;
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(edge::body_too_large(max));
    }
    let read_all = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await.map_err(|e| {
            Reject::new(
                http::StatusCode::BAD_REQUEST,
                crate::jsonrpc::code::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        })? {
            if body.len() + chunk.len() > max {
                return Err(edge::body_too_large(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(limits.body_read_timeout, read_all)
        .await
        .unwrap_or_else(|_| {
            Err(Reject::new(
                http::StatusCode::REQUEST_TIMEOUT,
                crate::jsonrpc::code::BAD_REQUEST,
                format!(
                    "the request body did not arrive within {:?} (limits.body_read_timeout)",
                    limits.body_read_timeout
                ),
            ))
        })
}

/// Writes a response; streams are written chunk by chunk until the source
/// ends or a write fails (the client is gone). Returns what happened, for
/// the access log.
async fn write_response(
    session: &mut Session,
    response: Response,
    gateway: &Gateway,
) -> &'static str {
    let Response {
        status,
        headers,
        body,
        label,
    } = response;
    gateway
        .metrics
        .requests
        .with_label_values(&[
            label.org.as_deref().unwrap_or("unknown"),
            label.method,
            status.as_str(),
        ])
        .inc();
    let Ok(mut head) = ResponseHeader::build(status, Some(headers.len() + 2)) else {
        return "bad response header";
    };
    for (name, value) in headers.iter() {
        if head.append_header(name.clone(), value.clone()).is_err() {
            return "bad response header";
        }
    }
    let fixed = match &body {
        ResponseBody::Empty => Some(Bytes::new()),
        ResponseBody::Full(b) => Some(b.clone()),
        ResponseBody::Stream(_) => None,
    };
    let framing = match &fixed {
        // 204 and 304 carry no body and, per RFC 9110, no Content-Length.
        Some(_)
            if status == http::StatusCode::NO_CONTENT
                || status == http::StatusCode::NOT_MODIFIED =>
        {
            Ok(())
        }
        Some(b) => head.insert_header(header::CONTENT_LENGTH, b.len()),
        None if session.req_header().version == Version::HTTP_11 => {
            head.insert_header(header::TRANSFER_ENCODING, "chunked")
        }
        None => Ok(()),
    };
    if framing.is_err() {
        return "bad response header";
    }
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return "client gone before the header";
    }
    match body {
        ResponseBody::Empty | ResponseBody::Full(_) => {
            let data = fixed.filter(|b| !b.is_empty());
            match session.write_response_body(data, true).await {
                Ok(()) => "complete",
                Err(_) => "client gone during the body",
            }
        }
        ResponseBody::Stream(mut source) => {
            while let Some(chunk) = source.next_chunk().await {
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    return "stream ended: client gone";
                }
                source.written();
            }
            match session.write_response_body(None, true).await {
                Ok(()) => "stream complete",
                Err(_) => "client gone at the end of the stream",
            }
        }
    }
}

/// The admin listener's app.
pub struct AdminApp {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let headers = session.req_header().headers.clone();
        let response = match read_body(session, &self.gateway.config.limits).await {
            Ok(body) => crate::admin::handle(&self.gateway, &method, &path, &headers, body).await,
            Err(reject) => {
                session.set_keepalive(None);
                reject.into_response()
            }
        };
        let body = match response.body {
            ResponseBody::Full(b) => b.to_vec(),
            ResponseBody::Empty | ResponseBody::Stream(_) => Vec::new(),
        };
        let mut out = http::Response::new(Vec::new());
        *out.status_mut() = response.status;
        *out.headers_mut() = response.headers;
        if response.status != http::StatusCode::NO_CONTENT {
            out.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        *out.body_mut() = body;
        out
    }
}

/// Periodic chores, and the drain on shutdown.
pub struct Housekeeping {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Some(validator) = self.gateway.validator.clone() {
            tokio::spawn(async move { validator.warm_up().await });
        }
        let ttl = self.gateway.config.sessions.idle_ttl;
        let period = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    tracing::info!("shutting down: closing streams so clients reconnect elsewhere");
                    self.gateway.set_draining();
                    return;
                }
                _ = tokio::time::sleep(period) => {
                    self.gateway.reap_idle().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_plain_and_replaced_otherwise() {
        let keep = HeaderValue::from_static("abc-123_x.y");
        assert_eq!(request_id(Some(&keep)), "abc-123_x.y");
        let bad = HeaderValue::from_static("has space");
        let fresh = request_id(Some(&bad));
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, request_id(None));
    }
}
