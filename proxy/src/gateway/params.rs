//! `Mcp-Param-*` headers of 2026-07-28 clients in front of handshake-era
//! upstreams. There the gateway is the modern server that processes the
//! body, so it must check that a `tools/call`'s mirrored headers match its
//! arguments (`streamable-http.mdx`, Server Behavior for Custom Headers).
//! Which arguments are mirrored, the tool's `inputSchema` says
//! (`x-mcp-header`): the gateway learns it from the upstream's own
//! `tools/list`, kept per org for a while.
//!
//! Only modern `tools/call`s to 2025 upstreams look at it. A modern
//! upstream checks its own headers (they are passed on), and 2025 clients
//! send none.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Map;

use super::*;
use crate::era::{self, HeaderParam};

/// How long the gateway uses a `tools/list` it read before reading it
/// again (in the background, using the old one meanwhile).
const TOOLS_TTL: Duration = Duration::from_secs(60);

/// A tool the last `tools/list` did not have may be new: the list is read
/// again at once, unless it was read this recently.
const MIN_REFETCH: Duration = Duration::from_secs(2);

/// Most pages of `tools/list` read, and most tools kept.
const MAX_PAGES: usize = 16;
const MAX_TOOLS: usize = 10_000;

/// What one org's upstream said its tools mirror into headers.
#[derive(Default)]
pub(crate) struct ToolHeaders {
    snapshot: std::sync::Mutex<Option<Arc<Snapshot>>>,
    /// One read of `tools/list` at a time.
    reading: tokio::sync::Mutex<()>,
}

struct Snapshot {
    read_at: Instant,
    /// Every listed tool, with its header parameters (often none).
    tools: HashMap<String, Arc<[HeaderParam]>>,
}

impl ToolHeaders {
    fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        *self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snapshot.clone());
        snapshot
    }
}

/// How the gateway asks the upstream for `tools/list` on a modern client's
/// behalf: without a session (stateless upstream), or in the client's
/// hidden session (stateful upstream).
#[derive(Clone)]
pub(super) enum Lister {
    Sessionless(http::HeaderMap),
    Hidden(Arc<SessionState>, http::HeaderMap),
}

impl Gateway {
    /// Checks a modern client's `tools/call` (`params`) against the
    /// `x-mcp-header` parameters of the tool it calls: 400 / -32020 on any
    /// mismatch; 502 if the upstream's tool list cannot be had at all.
    pub(super) async fn check_tool_call_headers(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        req: &Request,
        id: &Id,
        params: &Map<String, Value>,
        lister: Lister,
    ) -> Result<(), Reject> {
        let Some(tool) = params.get("name").and_then(Value::as_str) else {
            // The upstream says what is wrong with a call without a name.
            return Ok(());
        };
        let mirrored = self
            .header_params_of(org, tool, lister)
            .await
            .map_err(|why| {
                Reject::new(
                    StatusCode::BAD_GATEWAY,
                    code::UPSTREAM_ERROR,
                    format!(
                        "cannot check the Mcp-Param headers of this call: the tool list of org '{}' cannot be read ({why})",
                        org.name
                    ),
                )
                .with_id(Some(id))
            })?;
        era::check_param_headers(&mirrored, params.get("arguments"), &req.headers)
            .map_err(|r| r.with_id(Some(id)))
    }

    /// The header parameters of `tool`, from the org's last `tools/list`:
    /// read first when there is none; read again in the background once it
    /// is older than [`TOOLS_TTL`], and at once for a tool it lacks (unless
    /// read in the last [`MIN_REFETCH`]). A tool the upstream does not list
    /// has none (the upstream refuses the call itself).
    async fn header_params_of(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        tool: &str,
        lister: Lister,
    ) -> Result<Arc<[HeaderParam]>, String> {
        let cache = org.tool_headers.clone();
        let none = || Arc::<[HeaderParam]>::from(Vec::new());
        if let Some(snapshot) = cache.current() {
            let age = snapshot.read_at.elapsed();
            if let Some(found) = snapshot.tools.get(tool) {
                if age >= TOOLS_TTL {
                    self.reread_in_background(org, lister);
                }
                return Ok(found.clone());
            }
            if age < MIN_REFETCH {
                return Ok(none());
            }
        }
        let before = cache.current().map(|s| s.read_at);
        let _one = cache.reading.lock().await;
        // Another call may have read it while this one waited.
        let snapshot = match cache.current() {
            Some(s) if Some(s.read_at) != before => s,
            stale => match self.read_tools(org, &lister).await {
                Ok(snapshot) => cache.store(snapshot),
                Err(why) => match stale {
                    Some(s) => {
                        tracing::warn!(org = %org.name, error = %why, "cannot read the upstream's tool list again; using the last one");
                        s
                    }
                    None => return Err(why),
                },
            },
        };
        Ok(snapshot.tools.get(tool).cloned().unwrap_or_else(none))
    }

    /// Reads the org's tool list again without keeping anyone waiting,
    /// unless a read is under way.
    fn reread_in_background(self: &Arc<Self>, org: &Arc<OrgRoute>, lister: Lister) {
        let (this, org) = (self.clone(), org.clone());
        tokio::spawn(async move {
            let cache = org.tool_headers.clone();
            let Ok(_one) = cache.reading.try_lock() else {
                return;
            };
            match this.read_tools(&org, &lister).await {
                Ok(snapshot) => {
                    cache.store(snapshot);
                }
                Err(why) => {
                    tracing::warn!(org = %org.name, error = %why, "cannot read the upstream's tool list again; using the last one");
                }
            }
        });
    }

    /// Reads `tools/list` page by page, at most [`MAX_PAGES`], all within
    /// the org's `upstream.timeout`.
    async fn read_tools(&self, org: &OrgRoute, lister: &Lister) -> Result<Snapshot, String> {
        let bound = org.pool.read_limits.timeout;
        tokio::time::timeout(bound, self.read_pages(org, lister))
            .await
            .unwrap_or_else(|_| Err(format!("no complete answer within {bound:?}")))
    }

    async fn read_pages(&self, org: &OrgRoute, lister: &Lister) -> Result<Snapshot, String> {
        let mut tools = HashMap::new();
        let mut cursor: Option<String> = None;
        for page in 0..MAX_PAGES {
            let id = Id::from_value(&Value::from(format!("ratatosk-tools-{page}")))
                .ok_or("cannot build a request id")?;
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let body = era::request_body(Some(&id), "tools/list", params);
            let answer = match lister {
                Lister::Sessionless(headers) => org.pool.send(headers.clone(), body).await,
                Lister::Hidden(session, headers) => {
                    self.send_in_session(org, session, headers.clone(), body)
                        .await
                }
            }
            .map_err(|e| e.to_string())?;
            let mut reader = AnswerReader::new(answer, org.pool.read_limits);
            let response = reader
                .response_to(&id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the answer to tools/list ended without a response")?;
            let v: Value = serde_json::from_slice(&response).map_err(|e| e.to_string())?;
            let Some(result) = v.get("result") else {
                let why = v.pointer("/error/message").and_then(Value::as_str);
                return Err(format!("tools/list failed: {}", why.unwrap_or("no result")));
            };
            for tool in result
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if tools.len() >= MAX_TOOLS {
                    break;
                }
                if let Some(name) = tool.get("name").and_then(Value::as_str) {
                    let schema = tool.get("inputSchema").unwrap_or(&Value::Null);
                    tools.insert(name.to_owned(), era::header_params(schema).into());
                }
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(Snapshot {
            read_at: Instant::now(),
            tools,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::modern::tests::{gateway, json_of, modern};
    use super::*;
    use crate::testing;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A 2025 upstream (stateful, or stateless) with one tool mirroring
    /// `region` into `Mcp-Param-Region`; counts its `tools/list`s.
    async fn upstream(stateful: bool) -> (testing::Stub, Arc<AtomicUsize>) {
        let lists = Arc::new(AtomicUsize::new(0));
        let count = lists.clone();
        let stub = testing::full_stub(move |_, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
            let result = match v["method"].as_str() {
                Some("initialize") => {
                    if stateful {
                        headers.push(("mcp-session-id".into(), "up-1".into()));
                    }
                    json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                           "serverInfo": {"name": "params", "version": "1"}})
                }
                Some("tools/list") => {
                    count.fetch_add(1, Ordering::SeqCst);
                    json!({"tools": [{"name": "test_x_mcp_header", "inputSchema": {"type": "object",
                        "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
                        "required": ["region"]}}]})
                }
                Some("tools/call") => json!({"content": [{"type": "text",
                    "text": format!("region={}", v["params"]["arguments"]["region"])}]}),
                _ => {
                    return testing::Reply {
                        status: 202,
                        headers,
                        body: String::new(),
                    };
                }
            };
            let body = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
            testing::Reply {
                status: 200,
                headers,
                body,
            }
        })
        .await;
        (stub, lists)
    }

    fn call(id: u64, region: &str, header: Option<&str>) -> Request {
        let params = json!({"name": "test_x_mcp_header", "arguments": {"region": region}});
        let extra: Vec<(&str, &str)> = header
            .map(|h| ("mcp-param-region", h))
            .into_iter()
            .collect();
        modern(id, "tools/call", params, json!({}), &extra)
    }

    #[tokio::test]
    async fn mcp_param_headers_are_checked_against_the_upstreams_tool_list() {
        for (era, stateful) in [("stateful-2025", true), ("stateless-2025", false)] {
            let (up, lists) = upstream(stateful).await;
            let gw = gateway(era, &up.url());
            let ok = gw
                .handle(call(1, "Hello", Some("=?base64?SGVsbG8=?=")))
                .await;
            assert_eq!(ok.status, StatusCode::OK, "{era}: {}", json_of(&ok));
            for (id, header) in [
                (2, Some("=?base64?SGVsbG8?=")),
                (3, Some("=?base64?SGVs!!!bG8=?=")),
                (4, None),
                (5, Some("Goodbye")),
            ] {
                let r = gw.handle(call(id, "Hello", header)).await;
                assert_eq!(r.status, StatusCode::BAD_REQUEST, "{era} {header:?}");
                let body = json_of(&r);
                assert_eq!(
                    body["error"]["code"],
                    era::errors::HEADER_MISMATCH,
                    "{era}: {body}"
                );
                assert_eq!(body["id"], id);
            }
            assert_eq!(
                lists.load(Ordering::SeqCst),
                1,
                "{era}: the tool list is read once"
            );
        }
    }

    #[tokio::test]
    async fn without_a_tool_list_the_call_is_refused_not_passed_unchecked() {
        let up = testing::stub(|body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            if v["method"] == "initialize" {
                let result = json!({"protocolVersion": "2025-11-25", "capabilities": {},
                                    "serverInfo": {"name": "broken", "version": "1"}});
                return (
                    200,
                    "application/json",
                    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
                );
            }
            (500, "text/plain", "tools/list is broken".into())
        })
        .await;
        let gw = gateway("stateless-2025", &up.url());
        let r = gw.handle(call(9, "Hello", Some("Hello"))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        let body = json_of(&r);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Mcp-Param")),
            "{body}"
        );
        assert_eq!(body["id"], 9);
    }
}
