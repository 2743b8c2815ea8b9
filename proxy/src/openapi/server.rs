//! The MCP server of one `openapi` server, which its route's pool calls
//! in-process: it answers as a `stateless-2025` upstream would.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};

use super::{Api, CallError, Loaded, RestCall, result_of, tool_error};
use crate::config::{OpenApiConfig, UpstreamAuth};
use crate::upstream::{Client, LocalServer, Response, SendError, Target};

/// How long a document that failed to load is not asked for again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Protocol versions it answers `initialize` with (the client's, if
/// listed; the latest otherwise).
const VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Slots of the client's idle connections.
const API: usize = 0;
const DOCUMENT: usize = 1;

pub struct OpenApiServer {
    /// The route, `org/server`, for messages.
    name: String,
    config: OpenApiConfig,
    allowed: globset::GlobSet,
    /// Most bytes of an answer (the document's, the API's).
    max_bytes: usize,
    client: Client,
    /// The API, once its document is read; or when it last failed, why.
    /// Set once: every call after the first reads it without a lock.
    api: tokio::sync::OnceCell<Loaded>,
    failed: Mutex<Option<(Instant, String)>>,
    /// The credential header the pool adds (`auth`), which the API gets.
    credential: Option<HeaderName>,
}

impl OpenApiServer {
    pub fn new(
        name: &str,
        config: &OpenApiConfig,
        max_bytes: usize,
    ) -> Result<OpenApiServer, String> {
        let allowed = super::allowed(&config.operations).map_err(|e| format!("operations: {e}"))?;
        let pems = match &config.tls {
            Some(tls) => tls.load().map_err(|e| format!("tls: {e}"))?,
            None => ratatosk_auth::tls::ClientPems::default(),
        };
        let tls = pems.client_config().map_err(|e| format!("tls: {e}"))?;
        let credential = match &config.auth {
            UpstreamAuth::Headers {} => None,
            UpstreamAuth::Static { header, .. } => HeaderName::from_bytes(header.as_bytes()).ok(),
            UpstreamAuth::GatewayJwt { .. } | UpstreamAuth::TokenExchange { .. } => {
                Some(header::AUTHORIZATION)
            }
        };
        Ok(OpenApiServer {
            name: name.to_owned(),
            config: config.clone(),
            allowed,
            max_bytes,
            client: Client::new(2, config.connect_timeout, Some(tls)),
            api: tokio::sync::OnceCell::new(),
            failed: Mutex::new(None),
            credential,
        })
    }

    /// One request to `url`, its answer read whole within the timeout.
    async fn fetch(
        &self,
        slot: usize,
        method: Method,
        url: &url::Url,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, Option<String>, Bytes), String> {
        let target = Target::parse(url.as_str())?;
        let exchange = async {
            let mut response = self
                .client
                .send(slot, &target, method, headers, body)
                .await
                .map_err(|e| match e {
                    SendError::Connect(why) => format!("cannot connect: {why}"),
                    SendError::Tls(why) => format!("its TLS certificate failed the check: {why}"),
                    SendError::Failed(why) => why,
                })?;
            let status = response.status();
            let content_type = response
                .header(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                if body.len() + chunk.len() > self.max_bytes {
                    return Err(format!(
                        "its answer is larger than {} bytes (limits.max_answer_bytes)",
                        self.max_bytes
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, content_type, Bytes::from(body)))
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.config.timeout)))
    }

    /// The API, its document read now if it is not yet.
    async fn api(&self) -> Result<Loaded, String> {
        // One read at a time; a failed one is not tried again for a while.
        let read = self.api.get_or_try_init(|| async {
            if let Some((at, why)) = &*self.failed.lock().unwrap_or_else(|e| e.into_inner())
                && at.elapsed() < RETRY_AFTER
            {
                return Err(why.clone());
            }
            match self.load().await {
                Ok(loaded) => {
                    tracing::info!(server = %self.name, tools = loaded.operations.len(), base = %loaded.base, "OpenAPI document read");
                    Ok(loaded)
                }
                Err(why) => {
                    // Callers are not told where the document is.
                    tracing::error!(server = %self.name, spec = %self.config.spec, "the OpenAPI document cannot be read: {why}");
                    let why = format!(
                        "the OpenAPI document of server '{}' cannot be read: {why}",
                        self.name
                    );
                    *self.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), why.clone()));
                    Err(why)
                }
            }
        });
        read.await.cloned()
    }

    async fn load(&self) -> Result<Loaded, String> {
        let (text, source) = if self.config.spec_is_url() {
            let url = url::Url::parse(&self.config.spec).map_err(|e| e.to_string())?;
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("application/json, application/yaml;q=0.9, */*;q=0.5"),
            );
            let (status, _, body) = self
                .fetch(DOCUMENT, Method::GET, &url, headers, Bytes::new())
                .await?;
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            (String::from_utf8_lossy(&body).into_owned(), Some(url))
        } else {
            let text = tokio::fs::read_to_string(&self.config.spec)
                .await
                .map_err(|e| e.to_string())?;
            (text, None)
        };
        let api = Api::parse_with(
            &text,
            source.as_ref(),
            &self.allowed,
            self.config.base_url.as_deref(),
            self.credential.as_ref(),
        )?;
        Ok(std::sync::Arc::new(api))
    }

    /// Calls the API for `call`; the tool's result.
    async fn call(&self, call: RestCall, forwarded: &HeaderMap) -> Value {
        // The arguments' headers first: the gateway's own go over them.
        let mut headers = HeaderMap::new();
        for (name, value) in &call.headers {
            if !super::is_reserved_header(name.as_str(), self.credential.as_ref()) {
                headers.insert(name, value.clone());
            }
        }
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, */*;q=0.5"),
        );
        headers.insert(header::USER_AGENT, HeaderValue::from_static("ratatosk"));
        for (name, value) in forwarded {
            let ours = name.as_str().starts_with("ratatosk-")
                || matches!(name.as_str(), "traceparent" | "tracestate")
                || self.credential.as_ref() == Some(name);
            if ours {
                headers.append(name, value.clone());
            }
        }
        let body = match &call.body {
            Some(body) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(body.clone())
            }
            None => Bytes::new(),
        };
        match self
            .fetch(API, call.method.clone(), &call.url, headers, body)
            .await
        {
            Ok((status, content_type, body)) => {
                if !status.is_success() {
                    tracing::info!(server = %self.name, call = %call.what, %status, "the API refused a call");
                }
                result_of(&call, status, content_type.as_deref(), &body)
            }
            Err(why) => {
                tracing::warn!(server = %self.name, call = %call.what, "the API did not answer: {why}");
                tool_error(&format!("the API did not answer {}: {why}", call.what))
            }
        }
    }

    /// The answer to one JSON-RPC request.
    async fn answer(
        &self,
        method: &str,
        params: Option<&Value>,
        headers: &HeaderMap,
    ) -> Result<Value, (i64, String)> {
        use crate::jsonrpc::code;
        match method {
            "initialize" => {
                let asked = params
                    .and_then(|p| p.get("protocolVersion"))
                    .and_then(Value::as_str);
                let version = asked
                    .filter(|v| VERSIONS.contains(v))
                    .unwrap_or(VERSIONS[0]);
                let mut result = json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": self.name, "version": "openapi"},
                });
                // The document's title and description, if it can be read
                // now (if not, tools/list says why).
                if let Ok(api) = self.api().await {
                    let (info, instructions) = api.info(&self.name);
                    result["serverInfo"] = info;
                    if let Some(text) = instructions {
                        result["instructions"] = json!(text);
                    }
                }
                Ok(result)
            }
            "ping" => Ok(json!({})),
            "tools/list" => {
                let api = self.api().await.map_err(|e| (code::INTERNAL_ERROR, e))?;
                Ok(json!({"tools": api.tools()}))
            }
            "tools/call" => {
                let api = self.api().await.map_err(|e| (code::INTERNAL_ERROR, e))?;
                let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
                    return Err((
                        code::INVALID_PARAMS,
                        "tools/call needs `params.name`".into(),
                    ));
                };
                match api.call(name, params.and_then(|p| p.get("arguments"))) {
                    Ok(call) => Ok(self.call(call, headers).await),
                    Err(CallError::Arguments(why)) => Ok(tool_error(&why)),
                    Err(CallError::UnknownTool(name)) => Err((
                        code::INVALID_PARAMS,
                        format!("unknown tool '{}'", crate::jsonrpc::clip(&name, 128)),
                    )),
                }
            }
            other => Err((
                code::METHOD_NOT_FOUND,
                format!(
                    "method '{}' not found: an OpenAPI server serves tools only",
                    crate::jsonrpc::clip(other, 64)
                ),
            )),
        }
    }
}

fn json_answer(status: StatusCode, body: Value) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::in_memory(status, headers, Bytes::from(body.to_string()))
}

#[async_trait::async_trait]
impl LocalServer for OpenApiServer {
    async fn serve(
        &self,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, SendError> {
        if method != Method::POST {
            let mut allow = HeaderMap::new();
            allow.insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Ok(Response::in_memory(
                StatusCode::METHOD_NOT_ALLOWED,
                allow,
                Bytes::new(),
            ));
        }
        let message: Value = match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => Value::Object(m),
            _ => {
                return Ok(json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({"jsonrpc": "2.0", "id": null, "error": {"code": crate::jsonrpc::code::PARSE_ERROR, "message": "expected one JSON-RPC message (a JSON object)"}}),
                ));
            }
        };
        let (Some(method), Some(id)) = (
            message.get("method").and_then(Value::as_str),
            message.get("id"),
        ) else {
            // A notification, or an answer: nothing to say.
            return Ok(Response::in_memory(
                StatusCode::ACCEPTED,
                HeaderMap::new(),
                Bytes::new(),
            ));
        };
        let answer = match self.answer(method, message.get("params"), &headers).await {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        };
        Ok(json_answer(StatusCode::OK, answer))
    }
}
