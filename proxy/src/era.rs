//! MCP eras: which one a client request speaks, the checks a modern
//! (2026-07-28) request must pass, and the message translations between
//! eras. Pure functions over JSON; the gateway decides when to apply them.
//!
//! The rules come from the 2026-07-28 specification (`basic/index.mdx`,
//! `basic/transports/streamable-http.mdx`, `basic/patterns/mrtr.mdx`); see
//! `docs/research/era-bridge.md`.

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value, json};

use crate::edge::{MCP_PROTOCOL_VERSION, Reject, SUPPORTED_VERSIONS};
use crate::jsonrpc::{Id, code};
use crate::session::SessionState;

/// The stateless protocol version, the only modern one so far.
pub const MODERN_VERSION: &str = "2026-07-28";
/// Modern versions the gateway speaks.
pub const MODERN_VERSIONS: &[&str] = &[MODERN_VERSION];
/// The newest handshake-era version, used toward legacy upstreams on behalf
/// of modern clients.
pub const LATEST_LEGACY: &str = "2025-11-25";

pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
pub const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
pub const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
const META_PREFIX: &str = "io.modelcontextprotocol/";

pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
pub const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
const MCP_PARAM_PREFIX: &str = "mcp-param-";

/// Error codes the 2026-07-28 revision defines.
pub mod errors {
    /// A required header is missing or disagrees with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// The request needs a client capability the client did not declare.
    pub const MISSING_CAPABILITY: i64 = -32021;
    /// The protocol version is not one the receiver speaks.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// Methods whose results a modern receiver must mark cacheable.
const CACHEABLE: &[&str] = &[
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "server/discover",
];

/// Whether a protocol version names the modern era.
pub fn is_modern_version(v: &str) -> bool {
    MODERN_VERSIONS.contains(&v)
}

/// Whether a sessionless, non-`initialize` POST speaks the modern era: its
/// `MCP-Protocol-Version` is not a handshake-era version, or its `_meta`
/// carries a protocol version (ARCHITECTURE.md, MCP-NOTES.md).
pub fn looks_modern(headers: &HeaderMap, params: Option<&Value>) -> bool {
    if let Some(v) = headers.get(&MCP_PROTOCOL_VERSION) {
        return !SUPPORTED_VERSIONS.contains(&v.to_str().unwrap_or(""));
    }
    params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(META_VERSION))
        .is_some()
}

/// Whether a sessionless POST speaks the modern era. `initialize` is the
/// handshake era's first request unless its `MCP-Protocol-Version` names a
/// modern version: a 2026-07-28 client sending it asks for a method its
/// version removed.
pub fn speaks_modern(headers: &HeaderMap, method: Option<&str>, params: Option<&Value>) -> bool {
    if method == Some("initialize") {
        return headers
            .get(&MCP_PROTOCOL_VERSION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_modern_version);
    }
    looks_modern(headers, params)
}

/// Requests of the handshake era that 2026-07-28 removed (changelog: the
/// `initialize` handshake, `ping`, `logging/setLevel`, and
/// `resources/subscribe`/`unsubscribe`, replaced by `subscriptions/listen`).
const REMOVED_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
];

/// The refusal of a request whose method 2026-07-28 removed: a modern
/// server does not implement it, so `404` with -32601
/// (`streamable-http.mdx`, Protocol Version Header), whatever the upstream
/// behind the gateway still speaks.
pub fn removed_method(method: &str) -> Option<Reject> {
    REMOVED_METHODS.contains(&method).then(|| {
        Reject::new(
            StatusCode::NOT_FOUND,
            code::METHOD_NOT_FOUND,
            format!("Method not found: {method} was removed in protocol version {MODERN_VERSION}"),
        )
    })
}

/// The HTTP status a modern server answers a final response with: a
/// JSON-RPC error that 2026-07-28 ties to a status gets it (`-32601`: 404;
/// header mismatch, missing capability, unsupported version: 400), anything
/// else 200. For answers the gateway makes from a handshake-era upstream's,
/// which carry such errors inside a 200.
pub fn modern_status(response: &Value) -> StatusCode {
    match response.pointer("/error/code").and_then(Value::as_i64) {
        Some(code::METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        Some(
            errors::HEADER_MISMATCH | errors::MISSING_CAPABILITY | errors::UNSUPPORTED_VERSION,
        ) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// A modern request that passed the checks: its method and params object.
#[derive(Debug, Clone)]
pub struct ModernRequest {
    pub method: String,
    pub params: Map<String, Value>,
}

fn mismatch(message: String) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST, errors::HEADER_MISMATCH, message)
}

/// A header's value with the `=?base64?...?=` encoding undone.
fn header_text(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, Reject> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(mismatch(format!("header {name} is given more than once")));
    }
    let text = first.to_str().map_err(|_| {
        mismatch(format!(
            "header {name} has characters outside visible ASCII; use the =?base64?...?= form"
        ))
    })?;
    if let Some(inner) = text
        .strip_prefix("=?base64?")
        .and_then(|t| t.strip_suffix("?="))
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(inner)
            .map_err(|_| mismatch(format!("header {name} is not valid =?base64?...?= text")))?;
        let decoded = String::from_utf8(bytes)
            .map_err(|_| mismatch(format!("header {name} does not decode to UTF-8 text")))?;
        return Ok(Some(decoded));
    }
    Ok(Some(text.to_owned()))
}

/// The body field `Mcp-Name` must mirror, for the methods that have one.
fn name_field(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

fn invalid_params(message: String) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, message)
}

/// A header that must be present and equal `expected` (`None`: the body
/// has nothing it could equal); `what` says what it mirrors.
fn expect_header(
    headers: &HeaderMap,
    name: &HeaderName,
    label: &str,
    expected: Option<&str>,
    what: &str,
) -> Result<(), Reject> {
    match header_text(headers, name)? {
        None => Err(mismatch(format!(
            "missing {label} header: it must equal {what}"
        ))),
        Some(h) if Some(h.as_str()) != expected => Err(mismatch(format!(
            "{label} header '{}' does not match {what}",
            crate::jsonrpc::clip(&h, 64)
        ))),
        Some(_) => Ok(()),
    }
}

/// Checks a modern request the way a 2026-07-28 server must, in the order
/// the `mcp` Python SDK uses, so clients see the same error from the
/// gateway as from a server: missing `_meta` keys (-32602), then header
/// mismatches (-32020), then the version itself (-32022).
pub fn check_modern(
    headers: &HeaderMap,
    method: &str,
    id: Option<&Id>,
    params: Option<Value>,
) -> Result<ModernRequest, Reject> {
    let params = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid_params("params must be an object".into()).with_id(id)),
    };
    check_modern_params(headers, method, &params).map_err(|r| r.with_id(id))?;
    Ok(ModernRequest {
        method: method.to_owned(),
        params,
    })
}

fn check_modern_params(
    headers: &HeaderMap,
    method: &str,
    params: &Map<String, Value>,
) -> Result<(), Reject> {
    let meta = params.get("_meta").and_then(Value::as_object);
    let Some(version) = meta.and_then(|m| m.get(META_VERSION)) else {
        return Err(invalid_params(format!(
            "params._meta must carry \"{META_VERSION}\" on every 2026-07-28 request"
        )));
    };
    if meta.and_then(|m| m.get(META_CAPABILITIES)).is_none() {
        return Err(invalid_params(format!(
            "params._meta must carry \"{META_CAPABILITIES}\" ({{}} for none)"
        )));
    }
    expect_header(
        headers,
        &MCP_PROTOCOL_VERSION,
        "MCP-Protocol-Version",
        version.as_str(),
        &format!("params._meta protocolVersion {version}"),
    )?;
    expect_header(
        headers,
        &MCP_METHOD,
        "Mcp-Method",
        Some(method),
        &format!("the body's method '{method}'"),
    )?;
    if let Some(field) = name_field(method) {
        let body_name = params.get(field).and_then(Value::as_str).unwrap_or("");
        expect_header(
            headers,
            &MCP_NAME,
            "Mcp-Name",
            Some(body_name),
            &format!(
                "params.{field} '{}' of {method}",
                crate::jsonrpc::clip(body_name, 64)
            ),
        )?;
    }
    let Some(requested) = version.as_str() else {
        return Err(invalid_params(format!(
            "params._meta \"{META_VERSION}\" must be a string"
        )));
    };
    if !is_modern_version(requested) {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            errors::UNSUPPORTED_VERSION,
            "Unsupported protocol version",
        )
        .with_data(json!({"supported": MODERN_VERSIONS, "requested": requested})));
    }
    Ok(())
}

/// A tool parameter whose value a 2026-07-28 client mirrors into an
/// `Mcp-Param-{name}` header (`x-mcp-header` in the tool's `inputSchema`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderParam {
    /// The chain of `properties` keys from the schema root to the parameter.
    pub path: Vec<String>,
    /// `Mcp-Param-{name}`.
    pub header: HeaderName,
    /// The parameter's declared type: `string`, `integer` or `boolean`.
    pub integer: bool,
}

/// Deepest schema nesting looked at for `x-mcp-header` annotations, and
/// most schema positions: an upstream's schema is bounded work.
const MAX_SCHEMA_DEPTH: usize = 32;
const MAX_SCHEMA_NODES: usize = 4096;

/// JSON Schema 2020-12 keywords whose values are schemas, other than
/// `properties`: an annotation under one is off the pure `properties`
/// chain.
const SCHEMA_ONE: &[&str] = &[
    "items",
    "contains",
    "unevaluatedItems",
    "additionalProperties",
    "propertyNames",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contentSchema",
];
const SCHEMA_LIST: &[&str] = &["allOf", "anyOf", "oneOf", "prefixItems"];
const SCHEMA_MAP: &[&str] = &[
    "patternProperties",
    "dependentSchemas",
    "$defs",
    "definitions",
];

/// The `x-mcp-header` parameters of a tool's `inputSchema`
/// (`streamable-http.mdx`, Custom Headers from Tool Parameters). A schema
/// with an invalid annotation (not a token, not on a string, integer or
/// boolean property reachable through `properties` alone, or a duplicate)
/// yields none: conforming clients drop such a tool, so there is nothing
/// to check.
pub fn header_params(schema: &Value) -> Vec<HeaderParam> {
    let mut found = Vec::new();
    let mut nodes = 0usize;
    let mut stack: Vec<(Option<Vec<String>>, &Value, usize)> = vec![(Some(Vec::new()), schema, 0)];
    while let Some((path, node, depth)) = stack.pop() {
        let Some(obj) = node.as_object() else {
            continue;
        };
        nodes += 1;
        if nodes > MAX_SCHEMA_NODES || depth > MAX_SCHEMA_DEPTH {
            return Vec::new();
        }
        if let Some(token) = obj.get("x-mcp-header") {
            let Some(param) = header_param(path.as_deref(), token, obj.get("type")) else {
                return Vec::new();
            };
            if found.iter().any(|p: &HeaderParam| p.header == param.header) {
                return Vec::new();
            }
            found.push(param);
        }
        for (key, value) in obj {
            let key = key.as_str();
            if key == "properties" {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    let path = path.as_ref().map(|p| {
                        let mut p = p.clone();
                        p.push(name.clone());
                        p
                    });
                    stack.push((path, sub, depth + 1));
                }
            } else if SCHEMA_ONE.contains(&key) {
                stack.push((None, value, depth + 1));
            } else if SCHEMA_LIST.contains(&key) {
                for sub in value.as_array().into_iter().flatten() {
                    stack.push((None, sub, depth + 1));
                }
            } else if SCHEMA_MAP.contains(&key) {
                for sub in value.as_object().into_iter().flatten().map(|(_, v)| v) {
                    stack.push((None, sub, depth + 1));
                }
            }
        }
    }
    found
}

/// One valid annotation, or `None`.
fn header_param(
    path: Option<&[String]>,
    token: &Value,
    kind: Option<&Value>,
) -> Option<HeaderParam> {
    let path = path.filter(|p| !p.is_empty())?;
    let token = token.as_str()?;
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if token.is_empty() || !token.bytes().all(is_tchar) {
        return None;
    }
    let integer = match kind?.as_str()? {
        "integer" => true,
        "string" | "boolean" => false,
        _ => return None,
    };
    let header = HeaderName::from_bytes(format!("{MCP_PARAM_PREFIX}{token}").as_bytes()).ok()?;
    Some(HeaderParam {
        path: path.to_vec(),
        header,
        integer,
    })
}

/// A body value as a client mirrors it into a header: strings as they
/// are, numbers in decimal, booleans as `true`/`false`; `None` for
/// anything else (no header is sent for it).
fn header_rendering(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether a decoded header equals an integer parameter's value as a
/// number (`42` and `42.0` are equal: the spec's SHOULD), for headers in
/// plain decimal.
fn same_integer(header: &str, value: &Value) -> Option<bool> {
    let body = match value {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e18)
                    .map(|f| f as i128)
            })?,
        _ => return None,
    };
    let (whole, fraction) = match header.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (header, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let decimal =
        all_digits(whole.strip_prefix('-').unwrap_or(whole)) && fraction.is_none_or(all_digits);
    if !decimal {
        return None;
    }
    if fraction.is_some_and(|f| f.bytes().any(|b| b != b'0')) {
        return Some(false);
    }
    Some(whole.parse::<i128>().is_ok_and(|h| h == body))
}

/// Checks a `tools/call`'s `Mcp-Param-*` headers against its arguments,
/// as a 2026-07-28 server must (Server Behavior for Custom Headers): each
/// annotated parameter's header is present exactly when its value is (a
/// `null` counts as absent), has valid characters and `=?base64?...?=`
/// form, and equals the value once decoded. Headers of no annotated
/// parameter are not looked at. Failures are 400 / -32020.
pub fn check_param_headers(
    params: &[HeaderParam],
    arguments: Option<&Value>,
    headers: &HeaderMap,
) -> Result<(), Reject> {
    for param in params {
        let name = &param.header;
        // Named only in a refusal: a call that passes joins nothing.
        let field = || param.path.join(".");
        let value = arguments
            .and_then(|args| param.path.iter().try_fold(args, |node, key| node.get(key)))
            .filter(|v| !v.is_null());
        let header = header_text(headers, name)?;
        let Some(value) = value else {
            if header.is_some() {
                return Err(mismatch(format!(
                    "header {name} is present but arguments.{} is absent",
                    field()
                )));
            }
            continue;
        };
        let Some(rendered) = header_rendering(value) else {
            if header.is_some() {
                return Err(mismatch(format!(
                    "header {name} cannot mirror arguments.{}, which is not a string, number or boolean",
                    field()
                )));
            }
            continue;
        };
        let Some(header) = header else {
            return Err(mismatch(format!(
                "missing {name} header: it must mirror arguments.{}",
                field()
            )));
        };
        let equal = match param
            .integer
            .then(|| same_integer(&header, value))
            .flatten()
        {
            Some(equal) => equal,
            None => header == rendered,
        };
        if !equal {
            return Err(mismatch(format!(
                "{name} header '{}' does not match arguments.{}",
                crate::jsonrpc::clip(&header, 64),
                field()
            )));
        }
    }
    Ok(())
}

/// The modern headers a request of the gateway's to a modern upstream
/// carries: the version, `Mcp-Method` and `Mcp-Name`.
pub fn put_modern_headers(h: &mut HeaderMap, method: &str, params: &Map<String, Value>) {
    h.insert(
        MCP_PROTOCOL_VERSION,
        HeaderValue::from_static(MODERN_VERSION),
    );
    if let Ok(v) = HeaderValue::from_str(method) {
        h.insert(MCP_METHOD, v);
    }
    if let Some(field) = name_field(method)
        && let Some(name) = params.get(field).and_then(Value::as_str)
    {
        h.insert(MCP_NAME, encode_header(name));
    }
}

/// The client's own modern headers, as they came, for a modern upstream
/// that checks them against the body itself.
pub fn copy_modern_headers(client: &HeaderMap, h: &mut HeaderMap) {
    for (name, value) in client {
        if name == MCP_PROTOCOL_VERSION
            || name == MCP_METHOD
            || name == MCP_NAME
            || name.as_str().starts_with(MCP_PARAM_PREFIX)
        {
            h.append(name.clone(), value.clone());
        }
    }
}

/// A header value, in the `=?base64?...?=` form when it is not plain
/// visible ASCII without surrounding space.
fn encode_header(text: &str) -> HeaderValue {
    let plain = !text.is_empty()
        && text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && text.trim() == text
        && !text.starts_with("=?");
    if plain && let Ok(v) = HeaderValue::from_str(text) {
        return v;
    }
    let encoded = format!(
        "=?base64?{}?=",
        base64::engine::general_purpose::STANDARD.encode(text)
    );
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `_meta` a legacy session stands for, as a modern upstream wants it
/// on every request.
pub fn session_meta(session: &SessionState) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert(META_VERSION.into(), Value::from(MODERN_VERSION));
    meta.insert(
        META_CAPABILITIES.into(),
        session
            .client_capabilities
            .clone()
            .unwrap_or_else(|| json!({})),
    );
    if let Some(info) = &session.client_info {
        meta.insert(META_CLIENT_INFO.into(), info.clone());
    }
    if let Some(level) = &session.log_level {
        meta.insert(META_LOG_LEVEL.into(), Value::from(level.as_str()));
    }
    meta
}

/// A JSON-RPC request (or, without an id, notification) body.
pub fn request_body(id: Option<&Id>, method: &str, params: Value) -> Bytes {
    let mut body = json!({"jsonrpc": "2.0", "method": method, "params": params});
    if let Some(id) = id {
        body["id"] = id.to_value();
    }
    Bytes::from(body.to_string())
}

/// A request body with `_meta` entries added (the client's own entries,
/// e.g. `progressToken`, stay).
pub fn request_with_meta(
    id: &Id,
    method: &str,
    mut params: Map<String, Value>,
    meta: &Map<String, Value>,
) -> Bytes {
    let entry = params
        .entry("_meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    if let Value::Object(m) = entry {
        for (k, v) in meta {
            m.insert(k.clone(), v.clone());
        }
    }
    request_body(Some(id), method, Value::from(params))
}

/// A modern client's request as a legacy upstream wants it: the modern
/// `_meta` keys removed (a legacy server has no use for them).
pub fn request_without_modern_meta(
    id: Option<&Id>,
    method: &str,
    mut params: Map<String, Value>,
) -> Bytes {
    if let Some(Value::Object(meta)) = params.get_mut("_meta") {
        meta.retain(|k, _| !k.starts_with(META_PREFIX));
        if meta.is_empty() {
            params.remove("_meta");
        }
    }
    request_body(id, method, Value::Object(params))
}

/// What an `InputRequiredResult` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRequired {
    /// Key → `{method, params}`.
    pub requests: Map<String, Value>,
    pub state: Option<String>,
}

/// The parsed response when it is an `InputRequiredResult`.
pub fn input_required(response: &Value) -> Option<InputRequired> {
    let result = response.get("result")?;
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return None;
    }
    Some(InputRequired {
        requests: result
            .get("inputRequests")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        state: result
            .get("requestState")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// The client capability a server-to-client request needs.
/// Whether a client whose `initialize` capabilities are `capabilities`
/// declared `capability`.
pub fn declares(capabilities: Option<&Value>, capability: &str) -> bool {
    capabilities
        .and_then(Value::as_object)
        .is_some_and(|caps| caps.contains_key(capability))
}

pub fn capability_for(method: &str) -> Option<&'static str> {
    match method {
        "roots/list" => Some("roots"),
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        _ => None,
    }
}

/// A modern input request as a request to a client of `version`: URL-mode
/// elicitation gets the `elicitationId` 2025-11-25 requires, and the `mode`
/// field is dropped for clients older than it.
pub fn client_request(id: &Id, method: &str, params: Option<&Value>, version: &str) -> Bytes {
    let mut params = params.cloned().unwrap_or_else(|| json!({}));
    if method == "elicitation/create"
        && let Value::Object(p) = &mut params
    {
        let url_mode = p.get("mode").and_then(Value::as_str) == Some("url");
        if version < "2025-11-25" && !url_mode {
            p.remove("mode");
        }
        if url_mode && !p.contains_key("elicitationId") {
            p.insert(
                "elicitationId".into(),
                Value::from(crate::session::mint_id()),
            );
        }
    }
    request_body(Some(id), method, params)
}

/// A modern result as a legacy client expects it: without `resultType`,
/// `ttlMs` and `cacheScope`. Strict legacy clients (the TypeScript SDK)
/// refuse an empty result with extra keys.
pub fn response_to_legacy(mut response: Value) -> Value {
    if let Some(Value::Object(result)) = response.get_mut("result") {
        result.remove("resultType");
        result.remove("ttlMs");
        result.remove("cacheScope");
    }
    response
}

/// A legacy result as a modern client must see it: `resultType` on every
/// result, `ttlMs`/`cacheScope` on cacheable ones (not shared, not cached:
/// the safe reading of an upstream that said nothing).
pub fn response_to_modern(mut response: Value, method: &str) -> Value {
    if let Some(Value::Object(result)) = response.get_mut("result") {
        result
            .entry("resultType")
            .or_insert_with(|| Value::from("complete"));
        if CACHEABLE.contains(&method) {
            result.entry("ttlMs").or_insert_with(|| Value::from(0));
            result
                .entry("cacheScope")
                .or_insert_with(|| Value::from("private"));
        }
    }
    response
}

/// `server/discover`'s result for a legacy upstream, from its `initialize`
/// result.
pub fn discover_from_initialize(init: &Value) -> Value {
    let mut result = Map::new();
    result.insert("resultType".into(), Value::from("complete"));
    result.insert("supportedVersions".into(), json!(MODERN_VERSIONS));
    result.insert(
        "capabilities".into(),
        init.get("capabilities")
            .cloned()
            .unwrap_or_else(|| json!({})),
    );
    if let Some(instructions) = init.get("instructions") {
        result.insert("instructions".into(), instructions.clone());
    }
    result.insert("ttlMs".into(), Value::from(0));
    result.insert("cacheScope".into(), Value::from("private"));
    if let Some(info) = init.get("serverInfo") {
        result.insert("_meta".into(), json!({ META_SERVER_INFO: info }));
    }
    Value::Object(result)
}

/// The `initialize` result a legacy client gets for a modern upstream,
/// from the upstream's `server/discover` result.
pub fn initialize_from_discover(discover: &Value, requested: Option<&str>) -> Value {
    let version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_LEGACY);
    let mut result = Map::new();
    result.insert("protocolVersion".into(), Value::from(version));
    result.insert(
        "capabilities".into(),
        discover
            .get("capabilities")
            .cloned()
            .unwrap_or_else(|| json!({})),
    );
    result.insert(
        "serverInfo".into(),
        discover
            .pointer(&format!("/_meta/{}", META_SERVER_INFO.replace('/', "~1")))
            .cloned()
            .unwrap_or_else(|| json!({"name": "ratatosk-upstream", "version": "unknown"})),
    );
    if let Some(instructions) = discover.get("instructions") {
        result.insert("instructions".into(), instructions.clone());
    }
    Value::Object(result)
}

/// Who the gateway is when it speaks to an upstream as a client.
fn gateway_info() -> Value {
    json!({"name": "ratatosk", "version": env!("CARGO_PKG_VERSION")})
}

/// The body of a `server/discover` request the gateway sends as a client.
pub fn discover_request(id: &Id) -> Bytes {
    let mut meta = Map::new();
    meta.insert(META_VERSION.into(), Value::from(MODERN_VERSION));
    meta.insert(META_CAPABILITIES.into(), json!({}));
    meta.insert(META_CLIENT_INFO.into(), gateway_info());
    request_with_meta(id, "server/discover", Map::new(), &meta)
}

/// The body of an `initialize` request the gateway sends as a client.
pub fn initialize_request(id: &Id) -> Bytes {
    let params = json!({
        "protocolVersion": LATEST_LEGACY,
        "capabilities": {},
        "clientInfo": gateway_info(),
    });
    request_body(Some(id), "initialize", params)
}

/// Whether a 4xx body from a probed upstream is a modern JSON-RPC error,
/// which proves the upstream modern (streamable-http.mdx §Backward
/// Compatibility).
pub fn is_modern_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/code").and_then(Value::as_i64))
        .is_some_and(|c| {
            matches!(
                c,
                errors::HEADER_MISMATCH | errors::MISSING_CAPABILITY | errors::UNSUPPORTED_VERSION
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::headers;

    fn params(version: &str) -> Value {
        json!({"name": "add", "arguments": {"a": 1},
               "_meta": {META_VERSION: version, META_CAPABILITIES: {}}})
    }

    fn id() -> Id {
        Id::from_value(&json!(7)).expect("id")
    }

    #[test]
    fn a_consistent_modern_request_passes() {
        let h = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-name", "add"),
        ]);
        let r = check_modern(&h, "tools/call", Some(&id()), Some(params(MODERN_VERSION)))
            .expect("valid");
        assert_eq!(r.method, "tools/call");
        assert_eq!(r.params["name"], "add");
    }

    #[test]
    fn header_mismatches_are_32020() {
        let cases = [
            (
                vec![("mcp-method", "tools/call"), ("mcp-name", "add")],
                "missing MCP-Protocol-Version",
            ),
            (
                vec![
                    ("mcp-protocol-version", MODERN_VERSION),
                    ("mcp-method", "tools/list"),
                    ("mcp-name", "add"),
                ],
                "Mcp-Method header 'tools/list'",
            ),
            (
                vec![
                    ("mcp-protocol-version", MODERN_VERSION),
                    ("mcp-method", "tools/call"),
                ],
                "missing Mcp-Name",
            ),
            (
                vec![
                    ("mcp-protocol-version", MODERN_VERSION),
                    ("mcp-method", "tools/call"),
                    ("mcp-name", "sub"),
                ],
                "Mcp-Name header 'sub'",
            ),
            (
                vec![
                    ("mcp-protocol-version", MODERN_VERSION),
                    ("mcp-method", "tools/call"),
                    ("mcp-method", "tools/call"),
                    ("mcp-name", "add"),
                ],
                "more than once",
            ),
        ];
        for (pairs, expected) in cases {
            let e = check_modern(
                &headers(&pairs),
                "tools/call",
                Some(&id()),
                Some(params(MODERN_VERSION)),
            )
            .expect_err("mismatch");
            assert_eq!(e.code, errors::HEADER_MISMATCH, "{pairs:?}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(expected), "{pairs:?}: {}", e.message);
            assert_eq!(e.id, Some(id()));
        }
    }

    #[test]
    fn base64_header_values_are_decoded() {
        let name = " spaced name ";
        let encoded = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(name)
        );
        let h = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-name", &encoded),
        ]);
        let mut p = params(MODERN_VERSION);
        p["name"] = json!(name);
        check_modern(&h, "tools/call", None, Some(p)).expect("decoded name matches");
        assert_eq!(encode_header(name).to_str().expect("ascii"), encoded);
        assert_eq!(encode_header("add").to_str().expect("ascii"), "add");
    }

    #[test]
    fn unsupported_versions_are_32022_with_data() {
        let h = headers(&[
            ("mcp-protocol-version", "2099-01-01"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "add"),
        ]);
        let e = check_modern(&h, "tools/call", Some(&id()), Some(params("2099-01-01")))
            .expect_err("unsupported");
        assert_eq!(e.code, errors::UNSUPPORTED_VERSION);
        let body: Value = serde_json::from_slice(&e.body()).expect("json");
        assert_eq!(body["error"]["data"]["requested"], "2099-01-01");
        assert_eq!(body["error"]["data"]["supported"], json!([MODERN_VERSION]));
    }

    #[test]
    fn missing_meta_is_invalid_params_before_headers() {
        let e = check_modern(&HeaderMap::new(), "tools/list", None, Some(json!({})))
            .expect_err("no meta");
        assert_eq!(e.code, code::INVALID_PARAMS);
        let e = check_modern(
            &HeaderMap::new(),
            "tools/list",
            None,
            Some(json!({"_meta": {META_VERSION: MODERN_VERSION}})),
        )
        .expect_err("no capabilities");
        assert!(e.message.contains("clientCapabilities"), "{}", e.message);
    }

    #[test]
    fn era_detection() {
        assert!(looks_modern(
            &headers(&[("mcp-protocol-version", MODERN_VERSION)]),
            None
        ));
        assert!(looks_modern(
            &headers(&[("mcp-protocol-version", "2099-01-01")]),
            None
        ));
        assert!(!looks_modern(
            &headers(&[("mcp-protocol-version", "2025-06-18")]),
            None
        ));
        assert!(looks_modern(
            &HeaderMap::new(),
            Some(&params(MODERN_VERSION))
        ));
        assert!(!looks_modern(
            &HeaderMap::new(),
            Some(&json!({"name": "x"}))
        ));
    }

    #[test]
    fn initialize_is_modern_only_under_a_modern_version_header() {
        let modern = headers(&[("mcp-protocol-version", MODERN_VERSION)]);
        assert!(speaks_modern(&modern, Some("initialize"), None));
        let meta = params(MODERN_VERSION);
        for h in [
            HeaderMap::new(),
            headers(&[("mcp-protocol-version", "2025-11-25")]),
            headers(&[("mcp-protocol-version", "2099-01-01")]),
        ] {
            assert!(!speaks_modern(&h, Some("initialize"), Some(&meta)), "{h:?}");
        }
        assert!(speaks_modern(&modern, Some("tools/list"), None));
        assert!(speaks_modern(&HeaderMap::new(), Some("ping"), Some(&meta)));
    }

    #[test]
    fn removed_methods_are_404_method_not_found() {
        for m in [
            "initialize",
            "ping",
            "logging/setLevel",
            "resources/subscribe",
            "resources/unsubscribe",
        ] {
            let r = removed_method(m).expect("removed");
            assert_eq!(
                (r.status, r.code),
                (StatusCode::NOT_FOUND, code::METHOD_NOT_FOUND),
                "{m}"
            );
            assert!(r.message.contains(m), "{}", r.message);
        }
        for m in [
            "tools/list",
            "server/discover",
            "subscriptions/listen",
            "completion/complete",
        ] {
            assert!(removed_method(m).is_none(), "{m}");
        }
    }

    #[test]
    fn final_errors_get_their_modern_status() {
        let error =
            |code: i64| json!({"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": "x"}});
        assert_eq!(modern_status(&error(-32601)), StatusCode::NOT_FOUND);
        for c in [
            errors::HEADER_MISMATCH,
            errors::MISSING_CAPABILITY,
            errors::UNSUPPORTED_VERSION,
        ] {
            assert_eq!(modern_status(&error(c)), StatusCode::BAD_REQUEST, "{c}");
        }
        assert_eq!(modern_status(&error(-32602)), StatusCode::OK);
        assert_eq!(
            modern_status(&json!({"id": 1, "result": {}})),
            StatusCode::OK
        );
    }

    fn region_tool() -> Vec<HeaderParam> {
        header_params(&json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "count": {"type": "integer", "x-mcp-header": "Count"},
            "nested": {"type": "object", "properties": {"flag": {"type": "boolean", "x-mcp-header": "Flag"}}},
            "query": {"type": "string"}},
            "required": ["region"]}))
    }

    #[test]
    fn x_mcp_header_annotations_are_read_from_properties_chains_only() {
        let params = region_tool();
        let names: Vec<(&str, String, bool)> = params
            .iter()
            .map(|p| (p.header.as_str(), p.path.join("."), p.integer))
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&("mcp-param-region", "region".into(), false)));
        assert!(names.contains(&("mcp-param-count", "count".into(), true)));
        assert!(names.contains(&("mcp-param-flag", "nested.flag".into(), false)));
        // Each of these makes the whole tool invalid: nothing to check.
        for bad in [
            json!({"properties": {"a": {"type": "number", "x-mcp-header": "A"}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "A B"}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": ""}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "X"},
                                  "b": {"type": "string", "x-mcp-header": "x"}}}),
            json!({"properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}}}),
            json!({"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]}),
            json!({"type": "string", "x-mcp-header": "Root"}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": 7}}}),
        ] {
            assert!(header_params(&bad).is_empty(), "{bad}");
        }
        let mut deep = json!({"type": "string", "x-mcp-header": "Deep"});
        for _ in 0..40 {
            deep = json!({"type": "object", "properties": {"d": deep}});
        }
        assert!(header_params(&deep).is_empty(), "bounded depth");
        assert!(header_params(&json!({"properties": {"a": {"type": "string"}}})).is_empty());
    }

    #[test]
    fn param_headers_must_mirror_the_arguments() {
        let params = region_tool();
        let check = |args: Value, pairs: &[(&str, &str)]| {
            check_param_headers(&params, Some(&args), &headers(pairs))
        };
        let b64 = |t: &str| {
            format!(
                "=?base64?{}?=",
                base64::engine::general_purpose::STANDARD.encode(t)
            )
        };
        check(
            json!({"region": "us-west1"}),
            &[("mcp-param-region", "us-west1")],
        )
        .expect("plain");
        check(
            json!({"region": "Hello"}),
            &[("mcp-param-region", &b64("Hello"))],
        )
        .expect("base64");
        check(
            json!({"region": "Hello, 世界"}),
            &[("mcp-param-region", &b64("Hello, 世界"))],
        )
        .expect("utf-8");
        // Without the whole sentinel, a value is literal.
        check(
            json!({"region": "SGVsbG8="}),
            &[("mcp-param-region", "SGVsbG8=")],
        )
        .expect("literal");
        check(
            json!({"region": "=?base64?SGVsbG8="}),
            &[("mcp-param-region", "=?base64?SGVsbG8=")],
        )
        .expect("no suffix: literal");
        check(json!({"count": 42}), &[("mcp-param-count", "42.0")]).expect("numerically equal");
        check(
            json!({"nested": {"flag": true}}),
            &[("mcp-param-flag", "true")],
        )
        .expect("nested boolean");
        check(json!({"region": null}), &[]).expect("null is absent");
        check(json!({}), &[("mcp-param-other", "x")]).expect("unknown headers are ignored");

        let refused = [
            (
                json!({"region": "Hello"}),
                vec![("mcp-param-region", "=?base64?SGVsbG8?=")],
                "base64",
            ),
            (
                json!({"region": "Hello"}),
                vec![("mcp-param-region", "=?base64?SGVs!!!bG8=?=")],
                "base64",
            ),
            (json!({"region": "test-value"}), vec![], "missing"),
            (
                json!({"region": "a"}),
                vec![("mcp-param-region", "b")],
                "does not match",
            ),
            (json!({}), vec![("mcp-param-region", "a")], "absent"),
            (
                json!({"count": 42}),
                vec![("mcp-param-count", "42.5")],
                "does not match",
            ),
            (
                json!({"count": 42}),
                vec![("mcp-param-count", "4.2e1")],
                "does not match",
            ),
            (
                json!({"region": "a"}),
                vec![("mcp-param-region", "a"), ("mcp-param-region", "a")],
                "more than once",
            ),
            (
                json!({"region": {"x": 1}}),
                vec![("mcp-param-region", "x")],
                "cannot mirror",
            ),
        ];
        for (args, pairs, phrase) in refused {
            let e = check(args.clone(), &pairs).expect_err("refused");
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, errors::HEADER_MISMATCH),
                "{args}"
            );
            assert!(
                e.message.contains(phrase),
                "{args} {pairs:?}: {}",
                e.message
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static("mcp-param-region"),
            HeaderValue::from_bytes("h\u{e9}".as_bytes()).expect("obs-text"),
        );
        let e = check_param_headers(&params, Some(&json!({"region": "hé"})), &h)
            .expect_err("raw UTF-8");
        assert!(e.message.contains("visible ASCII"), "{}", e.message);
    }

    #[test]
    fn meta_is_injected_next_to_the_clients_own() {
        let mut state = SessionState::new(
            "s".into(),
            "o",
            &ratatosk_auth::Identity::anonymous("o"),
            crate::session::Transport::StreamableHttp,
            "2025-06-18".into(),
        );
        state.set_client(&json!({"capabilities": {"roots": {}}, "clientInfo": {"name": "c"}}));
        state.log_level = Some("debug".into());
        let params = json!({"name": "add", "_meta": {"progressToken": 3}});
        let Value::Object(params) = params else {
            unreachable!()
        };
        let body = request_with_meta(&id(), "tools/call", params, &session_meta(&state));
        let v: Value = serde_json::from_slice(&body).expect("json");
        let meta = &v["params"]["_meta"];
        assert_eq!(meta["progressToken"], 3);
        assert_eq!(meta[META_VERSION], MODERN_VERSION);
        assert_eq!(meta[META_CAPABILITIES], json!({"roots": {}}));
        assert_eq!(meta[META_CLIENT_INFO]["name"], "c");
        assert_eq!(meta[META_LOG_LEVEL], "debug");
        assert_eq!(v["id"], 7);
    }

    #[test]
    fn modern_meta_is_removed_for_legacy_upstreams() {
        let Value::Object(p) = params(MODERN_VERSION) else {
            unreachable!()
        };
        let body = request_without_modern_meta(Some(&id()), "tools/call", p);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert!(v["params"].get("_meta").is_none(), "{v}");
        assert_eq!(v["params"]["arguments"]["a"], 1);
    }

    #[test]
    fn results_are_reshaped_per_era() {
        let legacy = response_to_legacy(
            json!({"id": 1, "result": {"resultType": "complete", "ttlMs": 5, "cacheScope": "public", "tools": []}}),
        );
        assert_eq!(legacy["result"], json!({"tools": []}));
        let modern = response_to_modern(json!({"id": 1, "result": {"tools": []}}), "tools/list");
        assert_eq!(modern["result"]["resultType"], "complete");
        assert_eq!(modern["result"]["ttlMs"], 0);
        assert_eq!(modern["result"]["cacheScope"], "private");
        let call = response_to_modern(json!({"id": 1, "result": {"content": []}}), "tools/call");
        assert!(call["result"].get("ttlMs").is_none());
        let error = response_to_modern(json!({"id": 1, "error": {"code": -1}}), "tools/call");
        assert!(error.get("result").is_none());
    }

    #[test]
    fn input_required_results_are_recognised() {
        let r = json!({"id": 1, "result": {"resultType": "input_required",
            "inputRequests": {"roots": {"method": "roots/list"}}, "requestState": "abc"}});
        let ir = input_required(&r).expect("input required");
        assert_eq!(ir.state.as_deref(), Some("abc"));
        assert_eq!(ir.requests["roots"]["method"], "roots/list");
        assert!(input_required(&json!({"id": 1, "result": {"resultType": "complete"}})).is_none());
        assert!(input_required(&json!({"id": 1, "result": {}})).is_none());
    }

    #[test]
    fn elicitation_requests_fit_the_clients_version() {
        let form = client_request(
            &id(),
            "elicitation/create",
            Some(&json!({"mode": "form", "message": "ok?"})),
            "2025-06-18",
        );
        let v: Value = serde_json::from_slice(&form).expect("json");
        assert!(v["params"].get("mode").is_none());
        let url = client_request(
            &id(),
            "elicitation/create",
            Some(&json!({"mode": "url", "message": "go", "url": "https://x"})),
            "2025-11-25",
        );
        let v: Value = serde_json::from_slice(&url).expect("json");
        assert!(
            v["params"]["elicitationId"]
                .as_str()
                .is_some_and(|s| s.len() > 16)
        );
    }

    #[test]
    fn handshake_translations() {
        let init = json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                          "serverInfo": {"name": "up", "version": "1"}, "instructions": "hi"});
        let d = discover_from_initialize(&init);
        assert_eq!(d["supportedVersions"], json!([MODERN_VERSION]));
        assert_eq!(d["_meta"][META_SERVER_INFO]["name"], "up");
        assert_eq!(d["ttlMs"], 0);
        let back = initialize_from_discover(&d, Some("2025-06-18"));
        assert_eq!(back["protocolVersion"], "2025-06-18");
        assert_eq!(back["serverInfo"]["name"], "up");
        assert_eq!(back["capabilities"], json!({"tools": {}}));
        assert_eq!(
            initialize_from_discover(&d, Some("1999-01-01"))["protocolVersion"],
            LATEST_LEGACY
        );
    }

    #[test]
    fn probe_refusals() {
        assert!(is_modern_refusal(
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"x"}}"#
        ));
        assert!(!is_modern_refusal(
            br#"{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600,"message":"x"}}"#
        ));
        assert!(!is_modern_refusal(b"not json"));
    }
}
