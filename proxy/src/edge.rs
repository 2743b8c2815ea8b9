//! The edge: what every request passes before the gateway looks at its
//! meaning. Origin, framing headers and protocol version are checked here;
//! a failure is a [`Reject`], which becomes a precise HTTP status with a
//! JSON-RPC error body.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

use crate::jsonrpc::{self, Id, code};

pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
pub const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
pub const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A streamed response body, written chunk by chunk by the HTTP layer.
#[async_trait::async_trait]
pub trait ChunkSource: Send {
    /// The next chunk to write, or `None` when the response is complete.
    async fn next_chunk(&mut self) -> Option<Bytes>;
    /// Called after the last chunk was written to the client successfully.
    fn written(&mut self) {}
}

/// A connection after `101 Switching Protocols`: any byte stream both ways.
pub trait UpgradedIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> UpgradedIo for T {}

/// What serves a connection once it is upgraded (a WebSocket).
#[async_trait::async_trait]
pub trait Upgraded: Send {
    /// Serves the connection until it ends; the HTTP layer has written the
    /// 101 head and reads nothing more from it.
    async fn run(self: Box<Self>, io: Box<dyn UpgradedIo>);
}

/// Whether a Content-Type names the given media type, ignoring parameters
/// and case.
pub fn mime_is(content_type: &str, media: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(media))
}

/// Protocol versions the gateway speaks toward clients.
pub const SUPPORTED_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// A request as the gateway core sees it: headers and the whole body.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// For logs and the `X-Request-Id` response header.
    pub request_id: String,
    /// `body`, already parsed and checked: set on a request the gateway
    /// makes itself (a federated session's to one of its servers), so the
    /// server's endpoint does not read it again.
    pub parsed: Option<crate::jsonrpc::Body>,
}

impl Request {
    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

pub enum ResponseBody {
    Empty,
    Full(Bytes),
    /// Written chunk by chunk as the source yields; the connection stays
    /// open until the source ends or the client goes away.
    Stream(Box<dyn ChunkSource>),
    /// The answer to an upgrade (status 101): what serves the connection
    /// afterwards.
    Upgrade(Box<dyn Upgraded>),
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ResponseBody,
    /// The org and method this response is counted under in metrics.
    pub label: Label,
}

/// What a response is counted as in `ratatosk_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// `None` when the path named no configured org.
    pub org: Option<Arc<str>>,
    pub method: &'static str,
}

impl Response {
    pub fn empty(status: StatusCode) -> Response {
        Response {
            status,
            headers: HeaderMap::new(),
            body: ResponseBody::Empty,
            label: Label::default(),
        }
    }

    pub fn json(status: StatusCode, body: Bytes) -> Response {
        let mut r = Response::empty(status);
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.body = ResponseBody::Full(body);
        r
    }

    /// An SSE response: no caching, no buffering by intermediaries.
    pub fn sse(source: Box<dyn ChunkSource>) -> Response {
        let mut r = Response::empty(StatusCode::OK);
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-transform"),
        );
        r.headers.insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        r.body = ResponseBody::Stream(source);
        r
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Response {
        self.headers.insert(name, value);
        self
    }

    pub fn labeled(mut self, label: Label) -> Response {
        self.label = label;
        self
    }
}

impl Default for Label {
    fn default() -> Self {
        Label {
            org: None,
            method: "none",
        }
    }
}

/// A refusal: HTTP status plus a JSON-RPC error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    pub code: i64,
    pub message: String,
    pub id: Option<Id>,
    /// Extra headers, e.g. `Allow` on 405.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The JSON-RPC error's `data`, as JSON text.
    pub data: Option<String>,
}

impl Reject {
    pub fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Reject {
        Reject {
            status,
            code,
            message: message.into(),
            id: None,
            headers: Vec::new(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: serde_json::Value) -> Reject {
        self.data = Some(data.to_string());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reject {
        self.headers.push((name, value));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Reject {
        Reject::new(StatusCode::BAD_REQUEST, code::BAD_REQUEST, message)
    }

    pub fn with_id(mut self, id: Option<&Id>) -> Reject {
        self.id = id.cloned();
        self
    }

    /// The JSON-RPC error message this refusal stands for.
    pub fn body(&self) -> Bytes {
        match &self.data {
            None => jsonrpc::error_body(self.id.as_ref(), self.code, &self.message),
            Some(data) => jsonrpc::error_body_with_data(
                self.id.as_ref(),
                self.code,
                &self.message,
                serde_json::from_str(data).unwrap_or_default(),
            ),
        }
    }

    pub fn into_response(self) -> Response {
        let mut r = Response::json(self.status, self.body());
        for (name, value) in self.headers {
            r.headers.insert(name, value);
        }
        r
    }

    pub fn method_not_allowed(method: &Method, allow: &'static str) -> Reject {
        let mut r = Reject::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::BAD_REQUEST,
            format!("method {method} is not allowed here; allowed: {allow}"),
        );
        r.headers
            .push((header::ALLOW, HeaderValue::from_static(allow)));
        r
    }
}

/// Checks `Origin` against the allow-list and the gateway's own origin
/// (`own`, that of `public_url`: a page the gateway itself serves is
/// same-origin). Requests without `Origin` are not from a browser and pass;
/// the returned value is echoed in CORS headers. The `Host` header decides
/// nothing: a DNS-rebinding page sends the Host it was rebound to.
pub fn check_origin(
    headers: &HeaderMap,
    allowed: &[String],
    own: Option<&str>,
) -> Result<Option<HeaderValue>, Reject> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or("");
    if own == Some(text) || allowed.iter().any(|a| a == text) {
        Ok(Some(origin.clone()))
    } else {
        Err(Reject::new(
            StatusCode::FORBIDDEN,
            code::BAD_REQUEST,
            format!(
                "Origin '{}' is not allowed; add it to allowed_origins to permit it",
                jsonrpc::clip(text, 64)
            ),
        ))
    }
}

/// The origin (`scheme://host[:port]`, default port left out, as browsers
/// send it in `Origin`) of an `http(s)` URL.
pub fn origin_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// CORS headers for an allowed browser origin.
pub fn add_cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Mcp-Session-Id, WWW-Authenticate, X-Request-Id"),
    );
}

/// The answer to a CORS preflight from an allowed origin.
pub fn preflight(origin: HeaderValue) -> Response {
    let mut r = Response::empty(StatusCode::NO_CONTENT);
    add_cors(&mut r.headers, origin);
    r.headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    r.headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, Mcp-Method, Mcp-Name",
        ),
    );
    r.headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// Whether an `Accept` header admits a media type (`*/*` and `type/*` too).
fn accepts(headers: &HeaderMap, media: &str) -> bool {
    let (ty, _) = media.split_once('/').unwrap_or((media, ""));
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.split(';').next())
        .map(str::trim)
        .any(|m| {
            m.eq_ignore_ascii_case(media)
                || m == "*/*"
                || m.strip_suffix("/*")
                    .is_some_and(|t| t.eq_ignore_ascii_case(ty))
        })
}

/// What the SDK clients (and the gateway itself) send as `Accept` on a
/// POST, as its only value: both media types, JSON first.
const SDK_ACCEPT: &[u8] = b"application/json, text/event-stream";

/// Whether `Accept` is [`SDK_ACCEPT`] alone: the common case, decided
/// without parsing the header (bench/RESULTS.md, scenario I).
fn is_sdk_accept(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::ACCEPT).iter();
    matches!((values.next(), values.next()), (Some(only), None) if only.as_bytes() == SDK_ACCEPT)
}

/// Whether a client that accepts both JSON and SSE prefers SSE: a higher
/// `q` for `text/event-stream` than for `application/json`, or the same
/// and listed first (the usual tie-break of HTTP content negotiation).
/// Wildcards state no preference. The SDK clients list JSON first.
pub fn prefers_sse(headers: &HeaderMap) -> bool {
    if is_sdk_accept(headers) {
        return false;
    }
    let mut json: Option<(u16, usize)> = None;
    let mut sse: Option<(u16, usize)> = None;
    let items = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for (at, item) in items.enumerate() {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim();
        let slot = if media.eq_ignore_ascii_case("application/json") {
            &mut json
        } else if media.eq_ignore_ascii_case("text/event-stream") {
            &mut sse
        } else {
            continue;
        };
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(quality)
            .unwrap_or(1000);
        if slot.is_none_or(|(best, _)| q > best) {
            *slot = Some((q, at));
        }
    }
    match (sse, json) {
        (Some((sq, sat)), Some((jq, jat))) => sq > jq || (sq == jq && sat < jat),
        _ => false,
    }
}

/// An `Accept` quality value in thousandths (`0.5` is 500).
fn quality(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if !matches!(whole, "0" | "1")
        || fraction.len() > 3
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits = format!("{fraction:0<3}");
    let thousandths: u16 = digits.parse().ok()?;
    Some(if whole == "1" { 1000 } else { thousandths })
}

/// A Streamable HTTP POST must send JSON and accept both JSON and SSE.
pub fn check_post_framing(headers: &HeaderMap) -> Result<(), Reject> {
    check_json_content_type(headers)?;
    if is_sdk_accept(headers) {
        return Ok(());
    }
    if headers.get(header::ACCEPT).is_none() {
        return Err(Reject::new(
            StatusCode::NOT_ACCEPTABLE,
            code::BAD_REQUEST,
            "missing Accept header: a POST must accept both application/json and text/event-stream",
        ));
    }
    for media in ["application/json", "text/event-stream"] {
        if !accepts(headers, media) {
            return Err(Reject::new(
                StatusCode::NOT_ACCEPTABLE,
                code::BAD_REQUEST,
                format!(
                    "Accept must include {media}: a POST must accept both application/json and text/event-stream"
                ),
            ));
        }
    }
    Ok(())
}

/// A message POST (Streamable or legacy) carries `application/json`.
pub fn check_json_content_type(headers: &HeaderMap) -> Result<(), Reject> {
    match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        Some(Ok(ct)) if mime_is(ct, "application/json") => Ok(()),
        Some(value) => Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::BAD_REQUEST,
            format!(
                "Content-Type must be application/json, got '{}'",
                jsonrpc::clip(value.unwrap_or("(not text)"), 64)
            ),
        )),
        None => Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::BAD_REQUEST,
            "missing Content-Type: must be application/json",
        )),
    }
}

/// A GET stream must accept SSE.
pub fn check_get_framing(headers: &HeaderMap) -> Result<(), Reject> {
    if accepts(headers, "text/event-stream") {
        Ok(())
    } else {
        Err(Reject::new(
            StatusCode::NOT_ACCEPTABLE,
            code::BAD_REQUEST,
            "Accept must include text/event-stream to open a stream",
        ))
    }
}

/// The request's `MCP-Protocol-Version`, validated. `None` if absent.
pub fn protocol_version(headers: &HeaderMap) -> Result<Option<&'static str>, Reject> {
    let Some(value) = headers.get(&MCP_PROTOCOL_VERSION) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    SUPPORTED_VERSIONS
        .iter()
        .find(|v| **v == text)
        .map(|v| Some(*v))
        .ok_or_else(|| {
            Reject::bad_request(format!(
                "unsupported MCP-Protocol-Version '{}'; supported: {}",
                jsonrpc::clip(text, 64),
                SUPPORTED_VERSIONS.join(", ")
            ))
        })
}

/// Whether a protocol version allows JSON-RPC batches (only 2025-03-26 did;
/// 2024-11-05 also allowed them on its message endpoint).
pub fn allows_batches(version: &str) -> bool {
    matches!(version, "2024-11-05" | "2025-03-26")
}

/// Whether streams of this version get the priming event (from 2025-11-25).
pub fn wants_priming(version: &str) -> bool {
    version >= "2025-11-25"
}

/// The body-size refusal, for the HTTP layer that reads bodies.
pub fn body_too_large(limit: usize) -> Reject {
    Reject::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        code::INVALID_REQUEST,
        format!("request body exceeds the limit of {limit} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::headers;

    const BOTH: &str = "application/json, text/event-stream";

    #[test]
    fn origin_absent_passes_allowed_echoes_other_is_403() {
        let allowed = vec!["http://localhost:6274".to_string()];
        assert_eq!(check_origin(&headers(&[]), &allowed, None), Ok(None));
        assert!(
            check_origin(
                &headers(&[("origin", "http://localhost:6274")]),
                &allowed,
                None
            )
            .expect("allowed")
            .is_some()
        );
        let r = check_origin(
            &headers(&[("origin", "http://evil.example")]),
            &allowed,
            None,
        )
        .expect_err("refused");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.message.contains("evil.example"));
    }

    #[test]
    fn the_gateways_own_origin_passes_whatever_the_host_header_says() {
        let own = origin_of("http://127.0.0.1:8080").expect("an origin");
        assert_eq!(own, "http://127.0.0.1:8080");
        let same = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(
            check_origin(&same, &[], Some(&own))
                .expect("same-origin")
                .is_some()
        );
        // A rebinding page: its Origin names the host it was rebound to, and
        // so does its Host header.
        let rebound = headers(&[
            ("origin", "http://evil.example:8080"),
            ("host", "evil.example:8080"),
        ]);
        let r = check_origin(&rebound, &[], Some(&own)).expect_err("refused");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // Another port of the same host is another origin.
        let other = headers(&[("origin", "http://127.0.0.1:8081")]);
        assert!(check_origin(&other, &[], Some(&own)).is_err());
    }

    #[test]
    fn origins_of_public_urls() {
        assert_eq!(
            origin_of("https://gw.example.com/api/v1").as_deref(),
            Some("https://gw.example.com")
        );
        assert_eq!(
            origin_of("https://GW.example.com:443/").as_deref(),
            Some("https://gw.example.com"),
            "the default port is left out, the host lower-cased"
        );
        assert_eq!(
            origin_of("http://[::1]:9000").as_deref(),
            Some("http://[::1]:9000")
        );
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn post_framing() {
        assert!(
            check_post_framing(&headers(&[
                ("content-type", "application/json"),
                ("accept", BOTH)
            ]))
            .is_ok()
        );
        assert!(
            check_post_framing(&headers(&[
                ("content-type", "application/json; charset=utf-8"),
                ("accept", "application/json"),
                ("accept", "text/event-stream;q=0.9"),
            ]))
            .is_ok()
        );
        assert!(
            check_post_framing(&headers(&[
                ("content-type", "application/json"),
                ("accept", "*/*")
            ]))
            .is_ok()
        );

        let missing_accept = check_post_framing(&headers(&[("content-type", "application/json")]))
            .expect_err("no accept");
        assert_eq!(missing_accept.status, StatusCode::NOT_ACCEPTABLE);
        assert!(missing_accept.message.contains("missing Accept"));

        let json_only = check_post_framing(&headers(&[
            ("content-type", "application/json"),
            ("accept", "application/json"),
        ]))
        .expect_err("sse missing");
        assert_eq!(json_only.status, StatusCode::NOT_ACCEPTABLE);
        assert!(json_only.message.contains("text/event-stream"));

        let wrong_ct = check_post_framing(&headers(&[
            ("content-type", "text/plain"),
            ("accept", BOTH),
        ]))
        .expect_err("bad content type");
        assert_eq!(wrong_ct.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(wrong_ct.message.contains("text/plain"));

        let no_ct = check_post_framing(&headers(&[("accept", BOTH)])).expect_err("no content type");
        assert_eq!(no_ct.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn sse_is_preferred_only_when_the_client_says_so() {
        let prefers = |accept: &str| prefers_sse(&headers(&[("accept", accept)]));
        assert!(!prefers(BOTH), "the SDKs list JSON first");
        assert!(prefers("text/event-stream, application/json"));
        assert!(prefers("application/json;q=0.5, text/event-stream"));
        assert!(!prefers("text/event-stream;q=0.2, application/json;q=0.9"));
        assert!(!prefers("*/*"));
        assert!(!prefers("text/event-stream"), "JSON not listed: no choice");
        assert!(prefers("TEXT/EVENT-STREAM , application/json"));
        assert!(
            prefers("text/event-stream;q=abc, application/json"),
            "a bad q counts as 1"
        );
        assert!(!prefers_sse(&headers(&[])));
    }

    #[test]
    fn get_framing_needs_sse() {
        assert!(check_get_framing(&headers(&[("accept", "text/event-stream")])).is_ok());
        assert_eq!(
            check_get_framing(&headers(&[("accept", "application/json")]))
                .expect_err("no sse")
                .status,
            StatusCode::NOT_ACCEPTABLE
        );
    }

    #[test]
    fn protocol_versions() {
        assert_eq!(protocol_version(&headers(&[])), Ok(None));
        assert_eq!(
            protocol_version(&headers(&[("mcp-protocol-version", "2025-06-18")])),
            Ok(Some("2025-06-18"))
        );
        let r = protocol_version(&headers(&[("mcp-protocol-version", "1999-01-01")]))
            .expect_err("unsupported");
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.message.contains("1999-01-01") && r.message.contains("2025-06-18"));
        assert!(allows_batches("2025-03-26"));
        assert!(!allows_batches("2025-06-18"));
        assert!(wants_priming("2025-11-25"));
        assert!(!wants_priming("2025-06-18"));
    }

    #[test]
    fn reject_becomes_json_rpc_error_response() {
        let r = Reject::method_not_allowed(&Method::PUT, "GET, POST, DELETE").into_response();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers.get(header::ALLOW).expect("allow"),
            "GET, POST, DELETE"
        );
        let ResponseBody::Full(body) = r.body else {
            panic!("full body")
        };
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], code::BAD_REQUEST);
        assert_eq!(v["jsonrpc"], "2.0");
    }

    #[test]
    fn query_params_are_decoded() {
        let r = Request {
            method: Method::POST,
            path: "/x".into(),
            query: Some("a=1&session_id=ab%2Dc".into()),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            request_id: "r".into(),
            parsed: None,
        };
        assert_eq!(r.query_param("session_id").as_deref(), Some("ab-c"));
        assert_eq!(r.query_param("nope"), None);
    }
}
