//! `ratatosk-stub`: a native, stateless MCP upstream for the benchmarks, so
//! that an interpreter's speed does not hide the gateway's cost.
//!
//! - `POST /mcp`: `initialize`, `ping`, `tools/list`, and `tools/call` of
//!   `echo` (a JSON answer) or `echo_sse` (the same answer as one SSE event;
//!   `--sse` answers every call that way). Notifications get 202.
//! - `DELETE /mcp`: 200 (there is no state to end).
//! - `GET /grip/{i}`: a GRIP hold (`Grip-Hold: stream`, channel `s{i}`), the
//!   origin side of Pushpin's idle streams in the benchmark.
//!
//! `--era stateful-2025` mints an `Mcp-Session-Id` at `initialize` and
//! wants it on every later POST; `--era modern` answers `server/discover`
//! and marks results `resultType: complete` (2026-07-28). The era benchmark
//! (scenario F) puts the gateway's bridges in front of them.
//!
//! Prints `READY <addr>` on stdout once it listens.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Stateless stub MCP upstream of the Ratatosk benchmarks")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Answer every tools/call as an SSE stream of one event.
    #[arg(long)]
    sse: bool,
    /// Keep-alive interval Pushpin sends on held GRIP streams.
    #[arg(long, default_value_t = 15)]
    grip_keepalive_secs: u32,
    /// The protocol era to speak.
    #[arg(long, value_enum, default_value = "stateless-2025")]
    era: Era,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Era {
    #[value(name = "stateless-2025")]
    Stateless,
    #[value(name = "stateful-2025")]
    Stateful,
    #[value(name = "modern")]
    Modern,
}

/// Session ids minted by a stateful stub.
static SESSIONS: AtomicU64 = AtomicU64::new(1);

const MAX_BODY: usize = 1 << 20;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("READY {}", listener.local_addr()?);
    let (sse, keepalive, era) = (args.sse, args.grip_keepalive_secs, args.era);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, sse, keepalive, era));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn rpc_error(status: StatusCode, id: &Value, code: i64, message: &str) -> Answer {
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    respond(status, "application/json", body.to_string())
}

async fn handle(
    req: Request<Incoming>,
    sse: bool,
    keepalive: u32,
    era: Era,
) -> Result<Answer, Infallible> {
    let path = req.uri().path().to_owned();
    let answer = match (req.method().clone(), path.as_str()) {
        (Method::POST, "/mcp") => post(req, sse, era).await,
        (Method::DELETE, "/mcp") => respond(StatusCode::OK, "text/plain", ""),
        (Method::GET, "/mcp") => {
            let mut r = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "stateless: no GET stream",
            );
            r.headers_mut().insert(
                header::ALLOW,
                http::HeaderValue::from_static("POST, DELETE"),
            );
            r
        }
        (Method::GET, p) if p.starts_with("/grip/") => grip_hold(&p["/grip/".len()..], keepalive),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found"),
    };
    Ok(answer)
}

fn grip_hold(channel: &str, keepalive: u32) -> Answer {
    let mut r = respond(StatusCode::OK, "text/event-stream", "");
    let h = r.headers_mut();
    let pairs = [
        ("grip-hold", "stream".to_owned()),
        ("grip-channel", format!("s{channel}")),
        (
            "grip-keep-alive",
            format!(":\\n\\n; format=cstring; timeout={keepalive}"),
        ),
        ("cache-control", "no-cache".to_owned()),
    ];
    for (k, v) in pairs {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    }
    r
}

async fn post(req: Request<Incoming>, sse: bool, era: Era) -> Answer {
    let has_session = req.headers().contains_key("mcp-session-id");
    let parsed = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => serde_json::from_slice::<Value>(&b.to_bytes()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let msg = match parsed {
        Ok(v) => v,
        Err(e) => return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, -32700, &e),
    };
    let Some(id) = msg.get("id").cloned() else {
        // A notification or a client's answer.
        return respond(StatusCode::ACCEPTED, "text/plain", "");
    };
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    if era == Era::Stateful && method != "initialize" && !has_session {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &id,
            -32600,
            "missing Mcp-Session-Id",
        );
    }
    let (mut result, as_sse) = match method {
        "server/discover" if era == Era::Modern => (
            json!({"supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "ratatosk-stub", "version": env!("CARGO_PKG_VERSION")}}),
            false,
        ),
        "initialize" => {
            let version = params
                .get("protocolVersion")
                .cloned()
                .unwrap_or_else(|| json!("2025-11-25"));
            (
                json!({"protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "ratatosk-stub", "version": env!("CARGO_PKG_VERSION")}}),
                false,
            )
        }
        "ping" => (json!({}), false),
        "tools/list" => {
            let tool = |name: &str, description: &str| {
                json!({"name": name, "description": description, "inputSchema":
                    {"type": "object", "properties": {"text": {"type": "string"}}}})
            };
            (
                json!({"tools": [tool("echo", "Returns its text."),
                    tool("echo_sse", "Returns its text in an SSE answer.")]}),
                false,
            )
        }
        "tools/call" => {
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let text = params
                .pointer("/arguments/text")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match name {
                "echo" | "echo_sse" => (
                    json!({"content": [{"type": "text", "text": text}], "isError": false}),
                    sse || name == "echo_sse",
                ),
                other => {
                    return rpc_error(
                        StatusCode::OK,
                        &id,
                        -32602,
                        &format!("unknown tool '{other}'"),
                    );
                }
            }
        }
        other => {
            return rpc_error(
                StatusCode::OK,
                &id,
                -32601,
                &format!("method '{other}' not found"),
            );
        }
    };
    if era == Era::Modern
        && let Value::Object(r) = &mut result
    {
        r.insert("resultType".into(), json!("complete"));
    }
    let answer = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
    let mut r = if as_sse {
        respond(
            StatusCode::OK,
            "text/event-stream",
            format!("event: message\ndata: {answer}\n\n"),
        )
    } else {
        respond(StatusCode::OK, "application/json", answer)
    };
    if era == Era::Stateful
        && method == "initialize"
        && let Ok(v) = format!("stub-{}", SESSIONS.fetch_add(1, Ordering::Relaxed)).parse()
    {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}
