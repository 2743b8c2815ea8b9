//! REST APIs served as MCP tools: an `openapi` server
//! (`orgs.<org>.servers.<name>.openapi`) is an MCP server the gateway
//! runs itself, in-process, from the API's OpenAPI 3.0 or 3.1 document.
//!
//! Each allowed operation is a tool: its `operationId` the name, its
//! parameters (path, query, header) and JSON request body (`body`) the
//! `inputSchema`, its first 2xx JSON response schema the `outputSchema`.
//! A call checks its arguments, calls the API with the server's
//! credentials (`auth`, as an upstream's) and timeout, and answers with the
//! API's answer: text, and `structuredContent` for JSON. An answer other
//! than 2xx, or no answer, is a tool error (`isError`) that says what the
//! API said.
//!
//! The document is parsed by the `oas3` crate, which resolves the
//! references of parameters, request bodies and responses; schemas keep
//! their `$ref`s to `#/components/schemas/...`, which become `#/$defs/...`
//! with the schemas they need under `$defs`. A 3.0 document is first
//! brought to 3.1's form (`nullable`, boolean `exclusiveMinimum`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

/// The server: its document (loaded on first use) and its client.
mod server;

pub use server::OpenApiServer;

/// Longest description of a tool, in bytes.
const MAX_DESCRIPTION: usize = 2048;

/// Where a parameter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Path,
    Query,
    Header,
}

#[derive(Debug, Clone)]
struct Param {
    name: String,
    location: In,
    required: bool,
    /// Its schema, `$ref`s localized.
    schema: Value,
}

/// One operation served as a tool.
#[derive(Debug, Clone)]
struct Operation {
    method: http::Method,
    /// The path template, `/items/{item_id}`.
    path: String,
    params: Vec<Param>,
    /// A JSON request body: whether it is required.
    body: Option<bool>,
    /// A non-object JSON answer is wrapped as `{"result": ...}`.
    wraps: bool,
    /// The tool as `tools/list` shows it.
    tool: Value,
}

/// An API's tools, from its document.
#[derive(Debug)]
pub struct Api {
    title: String,
    version: String,
    description: Option<String>,
    /// By tool name.
    operations: BTreeMap<String, Operation>,
    /// The API's URL: operations' paths follow it.
    pub base: url::Url,
}

impl Api {
    /// The tools of `text` (JSON or YAML), a document read from `source`
    /// (its URL, if it came from one), served if their id matches
    /// `allowed`; `base_url` as configured.
    pub fn parse(
        text: &str,
        source: Option<&url::Url>,
        allowed: &globset::GlobSet,
        base_url: Option<&str>,
    ) -> Result<Api, String> {
        Self::parse_with(text, source, allowed, base_url, None)
    }

    /// The same; a header parameter named `credential` (the header the
    /// gateway's `auth` sets) is left out of the tools' arguments.
    pub fn parse_with(
        text: &str,
        source: Option<&url::Url>,
        allowed: &globset::GlobSet,
        base_url: Option<&str>,
        credential: Option<&http::HeaderName>,
    ) -> Result<Api, String> {
        let mut doc: Value =
            yaml_serde::from_str(text).map_err(|e| format!("not JSON or YAML: {e}"))?;
        let version = doc
            .get("openapi")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if version.starts_with("3.0") {
            to_3_1(&mut doc);
        } else if !version.starts_with("3.1") {
            return Err(format!(
                "expected an OpenAPI 3.0 or 3.1 document, got `openapi: {version}`{}",
                if doc.get("swagger").is_some() {
                    " (Swagger 2.0: convert it to OpenAPI 3 first)"
                } else {
                    ""
                }
            ));
        }
        let spec: oas3::Spec = serde_json::from_value(doc.clone())
            .map_err(|e| format!("not a valid OpenAPI document: {e}"))?;
        let base = base_of(&spec, source, base_url)?;
        let components = doc
            .pointer("/components/schemas")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut operations = BTreeMap::new();
        for (path, method, op) in spec.operations() {
            let Some(id) = op.operation_id.as_deref() else {
                continue;
            };
            if !allowed.is_match(id) {
                continue;
            }
            let name = tool_name(id);
            let item = spec.paths.as_ref().and_then(|p| p.get(&path));
            match operation(
                &spec,
                &components,
                item,
                (&path, method),
                op,
                &name,
                credential,
            ) {
                Ok(operation) => {
                    operations.insert(name, operation);
                }
                Err(why) => {
                    tracing::warn!(operation = id, "an OpenAPI operation is not served: {why}");
                }
            }
        }
        Ok(Api {
            title: spec.info.title.clone(),
            version: spec.info.version.clone(),
            description: spec.info.description.clone(),
            operations,
            base,
        })
    }

    /// The tools, as `tools/list` answers them.
    pub fn tools(&self) -> Vec<Value> {
        self.operations.values().map(|o| o.tool.clone()).collect()
    }
}

/// The API's URL: `base_url`, or the document's first server (relative
/// to where the document came from), or the document's origin.
fn base_of(
    spec: &oas3::Spec,
    source: Option<&url::Url>,
    base_url: Option<&str>,
) -> Result<url::Url, String> {
    if let Some(base) = base_url {
        return url::Url::parse(base).map_err(|e| format!("base_url `{base}`: {e}"));
    }
    let first = spec.servers.first().map(|s| s.url.as_str());
    let base = match (first, source) {
        (Some(url), Some(source)) => source.join(url),
        (Some(url), None) => url::Url::parse(url),
        (None, Some(source)) => source.join("/"),
        (None, None) => return Err("no `base_url`, and the document names no server".into()),
    };
    let base = base.map_err(|e| format!("the document's server URL: {e}"))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(format!(
            "the document's server URL `{base}` is `{}:`, not http or https; set `base_url`",
            base.scheme()
        ));
    }
    // The server's credential goes where the operator said, not where a
    // document names.
    if let Some(source) = source
        && source.origin() != base.origin()
    {
        return Err(format!(
            "the document names a server at another origin ({}) than its own; set `base_url` to call it",
            base.origin().ascii_serialization()
        ));
    }
    Ok(base)
}

/// A tool name from an operation id: MCP names are `A-Z a-z 0-9 _ - .`,
/// at most 128.
fn tool_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One operation's tool.
fn operation(
    spec: &oas3::Spec,
    components: &Map<String, Value>,
    item: Option<&oas3::spec::PathItem>,
    (path, method): (&str, http::Method),
    op: &oas3::spec::Operation,
    name: &str,
    credential: Option<&http::HeaderName>,
) -> Result<Operation, String> {
    // The path's parameters, then the operation's, which override them.
    let mut params: Vec<oas3::spec::Parameter> = Vec::new();
    let declared = item
        .map(|i| i.parameters.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(&op.parameters);
    for p in declared {
        let p = p.resolve(spec).map_err(|e| format!("a parameter: {e}"))?;
        params.retain(|q| !(q.name == p.name && q.location == p.location));
        params.push(p);
    }
    let mut defs = BTreeSet::new();
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut out_params = Vec::new();
    for p in params {
        use oas3::spec::ParameterIn;
        let location = match p.location {
            ParameterIn::Path => In::Path,
            ParameterIn::Query => In::Query,
            ParameterIn::Header => In::Header,
            // Cookies are the caller's business, not a tool's.
            ParameterIn::Cookie => continue,
        };
        // What the gateway sets, a caller does not (OpenAPI ignores these
        // three header parameters; the credential is the server's).
        if location == In::Header && is_reserved_header(&p.name, credential) {
            continue;
        }
        let mut schema = match &p.schema {
            Some(s) => serde_json::to_value(s).map_err(|e| e.to_string())?,
            None => json!({"type": "string"}),
        };
        localize(&mut schema, &mut defs);
        if let (Some(d), Some(obj)) = (&p.description, schema.as_object_mut()) {
            obj.entry("description").or_insert_with(|| json!(d));
        }
        let is_required = location == In::Path || p.required.unwrap_or(false);
        if is_required {
            required.push(json!(p.name));
        }
        properties.insert(p.name.clone(), schema.clone());
        out_params.push(Param {
            name: p.name,
            location,
            required: is_required,
            schema,
        });
    }
    let mut body = None;
    if let Some(request) = op.request_body(spec).map_err(|e| e.to_string())? {
        let Some(media) = request
            .content
            .iter()
            .find(|(ct, _)| is_json(ct))
            .map(|(_, m)| m)
        else {
            let types: Vec<&str> = request.content.keys().map(String::as_str).collect();
            return Err(format!(
                "its request body is not JSON ({}), which is not supported",
                types.join(", ")
            ));
        };
        if properties.contains_key("body") {
            return Err("it has a parameter named `body` and a request body".into());
        }
        let mut schema = match &media.schema {
            Some(s) => serde_json::to_value(s).map_err(|e| e.to_string())?,
            None => json!({}),
        };
        localize(&mut schema, &mut defs);
        if let (Some(d), Some(obj)) = (&request.description, schema.as_object_mut()) {
            obj.entry("description").or_insert_with(|| json!(d));
        }
        let is_required = request.required.unwrap_or(false);
        if is_required {
            required.push(json!("body"));
        }
        properties.insert("body".into(), schema);
        body = Some(is_required);
    }
    // The first 2xx answer with a JSON schema.
    let mut output = None;
    let mut output_defs = BTreeSet::new();
    let responses = op.responses(spec);
    let mut codes: Vec<&String> = responses.keys().filter(|c| c.starts_with('2')).collect();
    codes.sort();
    for code in codes {
        let Some(media) = responses[code]
            .content
            .iter()
            .find(|(ct, _)| is_json(ct))
            .map(|(_, m)| m)
        else {
            continue;
        };
        if let Some(s) = &media.schema {
            let mut schema = serde_json::to_value(s).map_err(|e| e.to_string())?;
            localize(&mut schema, &mut output_defs);
            output = Some(schema);
        }
        break;
    }
    let defs = closure(components, defs);
    let output_defs = closure(components, output_defs);
    let mut input = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    if !required.is_empty() {
        input["required"] = Value::Array(required);
    }
    if !defs.is_empty() {
        input["$defs"] = Value::Object(defs.clone());
    }
    // An output schema must be an object's: another is wrapped.
    let wraps = output
        .as_ref()
        .is_some_and(|s| !is_object_schema(s, &output_defs));
    let output = output.map(|schema| {
        let mut out = if wraps {
            json!({"type": "object", "properties": {"result": schema}, "required": ["result"]})
        } else {
            // MCP wants `type: object` at the top, not a `$ref` to it.
            object_at_top(schema, &output_defs)
        };
        if !output_defs.is_empty()
            && let Some(obj) = out.as_object_mut()
        {
            obj.insert("$defs".into(), Value::Object(output_defs.clone()));
        }
        out
    });
    let description = [op.summary.as_deref(), op.description.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n\n");
    let read_only = method == http::Method::GET || method == http::Method::HEAD;
    let mut tool = json!({
        "name": name,
        "description": clip(
            &if description.is_empty() { format!("{method} {path}") } else { description },
            MAX_DESCRIPTION
        ),
        "inputSchema": input,
        "annotations": {
            "readOnlyHint": read_only,
            "destructiveHint": method == http::Method::DELETE,
            "idempotentHint": read_only || method == http::Method::PUT || method == http::Method::DELETE,
            "openWorldHint": true,
        },
    });
    if let Some(summary) = &op.summary {
        tool["title"] = json!(summary);
    }
    if let Some(output) = output {
        tool["outputSchema"] = output;
    }
    Ok(Operation {
        method,
        path: path.to_owned(),
        params: out_params,
        body,
        wraps,
        tool,
    })
}

/// A header no argument may set: those OpenAPI ignores as parameters,
/// the gateway's own (`Ratatosk-*`, the credential, traces), and those
/// that frame or route the request.
pub fn is_reserved_header(name: &str, credential: Option<&http::HeaderName>) -> bool {
    let lower = name.to_ascii_lowercase();
    const RESERVED: [&str; 16] = [
        "accept",
        "content-type",
        "authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "cookie",
        "traceparent",
        "tracestate",
        "user-agent",
    ];
    RESERVED.contains(&lower.as_str())
        || lower.starts_with("ratatosk-")
        || lower.starts_with("proxy-")
        || credential.is_some_and(|c| c.as_str() == lower)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Whether `schema` describes objects (following one `$ref` into `defs`).
fn is_object_schema(schema: &Value, defs: &Map<String, Value>) -> bool {
    let schema = match schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        Some(name) => defs.get(name).unwrap_or(schema),
        None => schema,
    };
    match schema.get("type") {
        Some(Value::String(t)) => t == "object",
        Some(_) => false,
        None => schema.get("properties").is_some(),
    }
}

/// An object schema with `type: object` at its top: a `$ref` there is
/// replaced by what it refers to.
fn object_at_top(schema: Value, defs: &Map<String, Value>) -> Value {
    let mut out = match schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .and_then(|name| defs.get(name))
    {
        Some(Value::Object(target)) => {
            let mut merged = target.clone();
            if let Value::Object(own) = &schema {
                for (k, v) in own {
                    if k != "$ref" {
                        merged.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(merged)
        }
        _ => schema,
    };
    if let Some(obj) = out.as_object_mut() {
        obj.insert("type".into(), json!("object"));
    }
    out
}

/// `#/components/schemas/X` becomes `#/$defs/X`; the names are noted.
fn localize(schema: &mut Value, defs: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/components/schemas/")
            {
                defs.insert(name.to_owned());
                *r = format!("#/$defs/{name}");
            }
            for value in map.values_mut() {
                localize(value, defs);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| localize(v, defs)),
        _ => {}
    }
}

/// The schemas `names` need, and those they need, localized.
fn closure(components: &Map<String, Value>, mut names: BTreeSet<String>) -> Map<String, Value> {
    let mut out = Map::new();
    while let Some(name) = names.pop_first() {
        if out.contains_key(&name) {
            continue;
        }
        let mut schema = components.get(&name).cloned().unwrap_or_else(|| json!({}));
        let mut more = BTreeSet::new();
        localize(&mut schema, &mut more);
        names.extend(
            more.into_iter()
                .filter(|n| !out.contains_key(n) && *n != name),
        );
        out.insert(name, schema);
    }
    out
}

/// A 3.0 document in 3.1's form: `nullable: true` adds `null` to the
/// type, a boolean `exclusiveMinimum`/`exclusiveMaximum` takes the
/// bound's value.
fn to_3_1(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                match map.get_mut("type") {
                    Some(Value::String(t)) => {
                        let t = t.clone();
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    Some(Value::Array(types)) => types.push(json!("null")),
                    _ => {}
                }
            }
            for (flag, bound) in [
                ("exclusiveMinimum", "minimum"),
                ("exclusiveMaximum", "maximum"),
            ] {
                if let Some(Value::Bool(on)) = map.get(flag).cloned() {
                    map.remove(flag);
                    if on && let Some(b) = map.remove(bound) {
                        map.insert(flag.into(), b);
                    }
                }
            }
            if map.get("openapi").and_then(Value::as_str).is_some() {
                map.insert("openapi".into(), json!("3.1.0"));
            }
            map.values_mut().for_each(to_3_1);
        }
        Value::Array(items) => items.iter_mut().for_each(to_3_1),
        _ => {}
    }
}

/// A call of one tool, made into an HTTP request.
#[derive(Debug, PartialEq)]
pub struct RestCall {
    pub method: http::Method,
    pub url: url::Url,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Option<Vec<u8>>,
    /// `GET /items/{item_id}`, for messages.
    pub what: String,
    wraps: bool,
    /// The tool has an `outputSchema`: a success must be JSON.
    has_output: bool,
}

/// Why a call was not made: an unknown tool (a protocol error), or bad
/// arguments (a tool error the model can correct).
#[derive(Debug, PartialEq)]
pub enum CallError {
    UnknownTool(String),
    Arguments(String),
}

impl Api {
    /// The request that calls tool `name` with `arguments`.
    pub fn call(&self, name: &str, arguments: Option<&Value>) -> Result<RestCall, CallError> {
        let op = self
            .operations
            .get(name)
            .ok_or_else(|| CallError::UnknownTool(name.to_owned()))?;
        let empty = Map::new();
        let args = match arguments {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(map)) => map,
            Some(other) => {
                return Err(CallError::Arguments(format!(
                    "expected an object of arguments, got {}",
                    kind_of(other)
                )));
            }
        };
        let bad = |message: String| {
            CallError::Arguments(format!("invalid arguments for `{name}`: {message}"))
        };
        for key in args.keys() {
            let known =
                key == "body" && op.body.is_some() || op.params.iter().any(|p| p.name == *key);
            if !known {
                let mut expected: Vec<&str> = op.params.iter().map(|p| p.name.as_str()).collect();
                if op.body.is_some() {
                    expected.push("body");
                }
                return Err(bad(format!(
                    "unknown argument `{key}`; expected {}",
                    if expected.is_empty() {
                        "none".to_owned()
                    } else {
                        expected.join(", ")
                    }
                )));
            }
        }
        let mut url = self.base.clone();
        let mut segments = Vec::new();
        for raw in op.path.split('/').filter(|s| !s.is_empty()) {
            let mut segment = raw.to_owned();
            for p in op.params.iter().filter(|p| p.location == In::Path) {
                let placeholder = format!("{{{}}}", p.name);
                if segment.contains(&placeholder) {
                    let value = args
                        .get(&p.name)
                        .ok_or_else(|| bad(format!("missing required argument `{}`", p.name)))?;
                    check_type(&p.name, value, &p.schema).map_err(bad)?;
                    let text = scalar(value);
                    if text.is_empty() || text.chars().any(char::is_control) {
                        return Err(bad(format!(
                            "`{}`: a path value must be non-empty, without control characters",
                            p.name
                        )));
                    }
                    segment = segment.replace(&placeholder, &text);
                }
            }
            // A value that makes a segment `.` or `..` would reach another
            // path than the operation's.
            if segment == "." || segment == ".." {
                return Err(bad(format!(
                    "a path value makes the segment `{segment}` of {}",
                    op.path
                )));
            }
            segments.push(segment);
        }
        url.path_segments_mut()
            .map_err(|()| bad("the API's URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(&segments);
        let mut headers = Vec::new();
        for p in &op.params {
            let Some(value) = args.get(&p.name).filter(|v| !v.is_null()) else {
                if p.required {
                    return Err(bad(format!("missing required argument `{}`", p.name)));
                }
                continue;
            };
            check_type(&p.name, value, &p.schema).map_err(bad)?;
            match p.location {
                In::Path => {}
                In::Query => {
                    let mut pairs = url.query_pairs_mut();
                    match value {
                        Value::Array(items) => {
                            for item in items {
                                pairs.append_pair(&p.name, &scalar(item));
                            }
                        }
                        other => {
                            pairs.append_pair(&p.name, &scalar(other));
                        }
                    }
                }
                In::Header => {
                    let name = http::HeaderName::from_bytes(p.name.as_bytes())
                        .map_err(|_| bad(format!("`{}` is not a header name", p.name)))?;
                    let value = http::HeaderValue::from_str(&scalar(value))
                        .map_err(|_| bad(format!("`{}`: not a valid header value", p.name)))?;
                    headers.push((name, value));
                }
            }
        }
        let body = match (op.body, args.get("body")) {
            (Some(true), None | Some(Value::Null)) => {
                return Err(bad("missing required argument `body`".into()));
            }
            (Some(_), Some(value)) if !value.is_null() => {
                Some(serde_json::to_vec(value).map_err(|e| bad(e.to_string()))?)
            }
            _ => None,
        };
        Ok(RestCall {
            method: op.method.clone(),
            url,
            headers,
            body,
            what: format!("{} {}", op.method, op.path),
            wraps: op.wraps,
            has_output: op.tool.get("outputSchema").is_some(),
        })
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A parameter's value against its schema's `type` (one level: the API
/// checks the rest).
fn check_type(name: &str, value: &Value, schema: &Value) -> Result<(), String> {
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let fits = |t: &str| match t {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    };
    if types.iter().any(|t| fits(t)) {
        return Ok(());
    }
    Err(format!(
        "`{name}`: expected {}, got {} ({})",
        types.join(" or "),
        kind_of(value),
        clip(&value.to_string(), 64)
    ))
}

/// A value as it goes in a path, a query or a header.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The tool's result for the API's answer: `status`, `content_type`,
/// `body`.
pub fn result_of(
    call: &RestCall,
    status: http::StatusCode,
    content_type: Option<&str>,
    body: &[u8],
) -> Value {
    let text = String::from_utf8_lossy(body);
    if !status.is_success() {
        let detail = serde_json::from_slice::<Value>(body)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| text.trim().to_owned());
        let message = if detail.is_empty() {
            format!("the API answered HTTP {status} to {}", call.what)
        } else {
            format!(
                "the API answered HTTP {status} to {}: {}",
                call.what,
                clip(&detail, 2000)
            )
        };
        return json!({"content": [{"type": "text", "text": message}], "isError": true});
    }
    let json = content_type
        .filter(|ct| is_json(ct))
        .and_then(|_| serde_json::from_slice::<Value>(body).ok());
    if call.has_output && json.is_none() {
        // Its output schema promises structured content.
        return tool_error(&format!(
            "the API answered HTTP {status} to {} with {}, not the JSON its document promises",
            call.what,
            if body.is_empty() {
                "no body".to_owned()
            } else {
                format!("Content-Type {}", content_type.unwrap_or("(none)"))
            }
        ));
    }
    if body.is_empty() {
        return json!({"content": [{"type": "text", "text": format!("HTTP {status} (no body)")}]});
    }
    if let Some(value) = json {
        let structured = match value {
            Value::Object(_) if !call.wraps => value,
            other => json!({"result": other}),
        };
        return json!({
            "content": [{"type": "text", "text": text}],
            "structuredContent": structured,
        });
    }
    json!({"content": [{"type": "text", "text": text}]})
}

/// A tool error: the call was not made, or got no answer.
pub fn tool_error(message: &str) -> Value {
    json!({"content": [{"type": "text", "text": message}], "isError": true})
}

/// The globs of `operations`, as one set.
pub fn allowed(operations: &[String]) -> Result<globset::GlobSet, globset::Error> {
    let mut set = globset::GlobSetBuilder::new();
    for op in operations {
        set.add(globset::Glob::new(op)?);
    }
    set.build()
}

impl Api {
    /// `initialize`'s `serverInfo` and `instructions`.
    fn info(&self, name: &str) -> (Value, Option<String>) {
        (
            json!({"name": name, "title": self.title, "version": self.version}),
            self.description
                .as_deref()
                .map(|d| clip(d, MAX_DESCRIPTION)),
        )
    }
}

/// Shared by the server: the API once loaded.
pub type Loaded = Arc<Api>;

#[cfg(test)]
mod tests;
