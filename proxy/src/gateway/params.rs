//! `Mcp-Param-*` headers of 2026-07-28 clients in front of handshake-era
//! upstreams. There the gateway is the modern server that processes the
//! body, so it must check that a `tools/call`'s mirrored headers match its
//! arguments (`streamable-http.mdx`, Server Behavior for Custom Headers).
//! Which arguments are mirrored, the tool's `inputSchema` says
//! (`x-mcp-header`): the gateway learns it from the upstream's own
//! `tools/list`, read with the caller's identity and kept per (org,
//! caller) for a while: an upstream may list other tools to other users.
//!
//! Only modern `tools/call`s to 2025 upstreams look at it. A modern
//! upstream checks its own headers (they are passed on), and 2025 clients
//! send none.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use serde_json::Map;

use super::*;
use crate::era::{self, HeaderParam};

/// How long the gateway uses a `tools/list` it read before reading it
/// again.
const TOOLS_TTL: Duration = Duration::from_secs(60);

/// A tool the last `tools/list` did not have may be new: the list is read
/// again at once, unless it was asked for this recently. A list that
/// could not be read at all is not asked for again sooner either: its
/// callers get the failure meanwhile.
const MIN_REFETCH: Duration = Duration::from_secs(2);

/// Most pages of `tools/list` read, and most tools kept of one list.
const MAX_PAGES: usize = 16;
const MAX_TOOLS: usize = 10_000;

/// Most tools kept in all lists of all callers together (each list
/// weighs its tools, plus one).
const MAX_KEPT_TOOLS: u64 = 200_000;

/// The tool lists the gateway read, per (org, subject). Concurrent reads
/// of one list wait for one another.
pub(super) struct ToolHeaders {
    lists: Cache<(Arc<str>, String), Listed>,
}

impl ToolHeaders {
    pub(super) fn new() -> ToolHeaders {
        ToolHeaders {
            lists: Cache::builder()
                .max_capacity(MAX_KEPT_TOOLS)
                .weigher(|_, listed: &Listed| {
                    let tools = listed.tools.as_ref().map_or(0, |t| t.tools.len());
                    u32::try_from(tools).unwrap_or(u32::MAX).saturating_add(1)
                })
                .expire_after(ListedExpiry)
                .build(),
        }
    }
}

/// One caller's view of an org's tools: the last list read, and how the
/// last attempt went.
#[derive(Clone)]
struct Listed {
    /// When the upstream last answered (or failed to), whatever it said.
    asked_at: Instant,
    /// The last list read, if any was.
    tools: Option<Arc<Snapshot>>,
    /// Why the last attempt failed, if it did.
    failed: Option<Arc<str>>,
}

struct Snapshot {
    /// Every listed tool, with its header parameters (often none).
    tools: HashMap<String, Arc<[HeaderParam]>>,
}

impl Listed {
    /// The header parameters of `tool` by this entry; `None` when the
    /// list must be read (again) first.
    fn answer(&self, tool: &str) -> Option<Result<Arc<[HeaderParam]>, Arc<str>>> {
        if let Some(found) = self.tools.as_ref().and_then(|t| t.tools.get(tool)) {
            return Some(Ok(found.clone()));
        }
        if self.asked_at.elapsed() >= MIN_REFETCH {
            return None;
        }
        Some(match &self.failed {
            Some(why) => Err(why.clone()),
            // A tool the upstream does not list has none (the upstream
            // refuses the call itself).
            None => Ok(Arc::from(Vec::new())),
        })
    }
}

/// A list read lives [`TOOLS_TTL`]; a failure alone, [`MIN_REFETCH`]; a
/// list kept after a failed reread, no longer than it had left.
struct ListedExpiry;

impl Expiry<(Arc<str>, String), Listed> for ListedExpiry {
    fn expire_after_create(
        &self,
        _key: &(Arc<str>, String),
        value: &Listed,
        _now: Instant,
    ) -> Option<Duration> {
        Some(match value.tools {
            Some(_) => TOOLS_TTL,
            None => MIN_REFETCH,
        })
    }

    fn expire_after_update(
        &self,
        _key: &(Arc<str>, String),
        value: &Listed,
        _now: Instant,
        left: Option<Duration>,
    ) -> Option<Duration> {
        match (&value.tools, &value.failed) {
            (Some(_), None) => Some(TOOLS_TTL),
            (Some(_), Some(_)) => left,
            (None, _) => Some(MIN_REFETCH),
        }
    }
}

/// How the gateway asks the upstream for `tools/list` on a modern
/// client's behalf: without a session (stateless upstream, with the
/// call's own upstream headers), or in the client's hidden session
/// (stateful upstream). Headers are made only when the list is read.
#[derive(Clone, Copy)]
pub(super) enum Lister<'a> {
    Sessionless(&'a crate::upstream::Outbound),
    Hidden(&'a SessionState),
}

impl Gateway {
    /// Checks a modern client's `tools/call` (`params`) against the
    /// `x-mcp-header` parameters of the tool it calls: 400 / -32020 on any
    /// mismatch; 502 if the upstream's tool list cannot be had at all.
    pub(super) async fn check_tool_call_headers(
        &self,
        call: Call<'_>,
        id: &Id,
        params: &Map<String, Value>,
        lister: Lister<'_>,
    ) -> Result<(), Reject> {
        let Some(tool) = params.get("name").and_then(Value::as_str) else {
            // The upstream says what is wrong with a call without a name.
            return Ok(());
        };
        let mirrored = self
            .header_params_of(call, tool, lister)
            .await
            .map_err(|why| {
                Reject::new(
                    StatusCode::BAD_GATEWAY,
                    code::UPSTREAM_ERROR,
                    format!(
                        "cannot check the Mcp-Param headers of this call to tool '{}': the upstream of org '{}' did not give its tools/list for this caller ({why}); try again in {} s",
                        crate::jsonrpc::clip(tool, 64),
                        call.org.name,
                        MIN_REFETCH.as_secs()
                    ),
                )
                .with_id(Some(id))
            })?;
        era::check_param_headers(&mirrored, params.get("arguments"), call.headers)
            .map_err(|r| r.with_id(Some(id)))
    }

    /// The header parameters of `tool`, from the caller's last
    /// `tools/list` of the org: read first when there is none (or it is
    /// older than [`TOOLS_TTL`]), and again for a tool it lacks, unless
    /// asked for in the last [`MIN_REFETCH`]. One read per caller at a
    /// time: concurrent calls wait for it and share its outcome, a failure
    /// included.
    async fn header_params_of(
        &self,
        call: Call<'_>,
        tool: &str,
        lister: Lister<'_>,
    ) -> Result<Arc<[HeaderParam]>, Arc<str>> {
        let (org, identity) = (call.org, call.identity);
        let key = (org.key.clone(), identity.subject.clone());
        if let Some(answer) = self
            .bridges
            .tool_headers
            .lists
            .get(&key)
            .await
            .and_then(|l| l.answer(tool))
        {
            return answer;
        }
        let computed = self
            .bridges
            .tool_headers
            .lists
            .entry(key)
            .and_compute_with(|current| async move {
                let current = current.map(|e| e.into_value());
                // Another call may have read it while this one waited.
                if current.as_ref().and_then(|l| l.answer(tool)).is_some() {
                    return Op::Nop;
                }
                let read = self.read_tools(call, lister).await;
                // From the answer on: a slow read is not out of date at once.
                let asked_at = Instant::now();
                let listed = match read {
                    Ok(snapshot) => Listed {
                        asked_at,
                        tools: Some(Arc::new(snapshot)),
                        failed: None,
                    },
                    Err(why) => {
                        tracing::warn!(org = %org.name, subject = %identity.subject, error = %why,
                            "cannot read the upstream's tool list to check Mcp-Param headers");
                        Listed {
                            asked_at,
                            tools: current.and_then(|l| l.tools),
                            failed: Some(why.into()),
                        }
                    }
                };
                Op::Put(listed)
            })
            .await;
        match computed.into_entry().map(|e| e.into_value()) {
            Some(listed) => listed.answer(tool).unwrap_or_else(|| {
                Err("the tool list read just now is already out of date".into())
            }),
            None => Err("the tool list was not kept".into()),
        }
    }

    /// Reads `tools/list` page by page, at most [`MAX_PAGES`], all within
    /// the org's `upstream.timeout`.
    async fn read_tools(&self, call: Call<'_>, lister: Lister<'_>) -> Result<Snapshot, String> {
        let bound = call.org.server.pool.read_limits.timeout;
        let headers = match lister {
            Lister::Sessionless(headers) => headers.clone(),
            Lister::Hidden(session) => call.session_headers(session),
        };
        tokio::time::timeout(bound, self.read_pages(call.org, lister, headers))
            .await
            .unwrap_or_else(|_| Err(format!("no complete answer within {bound:?}")))
    }

    async fn read_pages(
        &self,
        org: &OrgRoute,
        lister: Lister<'_>,
        headers: crate::upstream::Outbound,
    ) -> Result<Snapshot, String> {
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
                Lister::Sessionless(_) => org.server.pool.send(headers.clone(), body).await,
                Lister::Hidden(session) => {
                    self.send_in_session(org, session, headers.clone(), body)
                        .await
                }
            }
            .map_err(|e| e.to_string())?;
            let mut reader = AnswerReader::new(answer, org.server.pool.read_limits);
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
        Ok(Snapshot { tools })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::bridge::modern::tests::{gateway, json_of, modern};
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

    /// A 2025 upstream whose `tools/list` always fails (HTTP 500);
    /// counts them.
    async fn broken_upstream() -> (testing::Stub, Arc<AtomicUsize>) {
        let lists = Arc::new(AtomicUsize::new(0));
        let count = lists.clone();
        let stub = testing::stub(move |body| {
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
            if v["method"] == "tools/list" {
                count.fetch_add(1, Ordering::SeqCst);
            }
            (500, "text/plain", "tools/list is broken".into())
        })
        .await;
        (stub, lists)
    }

    #[tokio::test]
    async fn without_a_tool_list_the_call_is_refused_not_passed_unchecked() {
        let (up, _) = broken_upstream().await;
        let gw = gateway("stateless-2025", &up.url());
        let r = gw.handle(call(9, "Hello", Some("Hello"))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        let body = json_of(&r);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("Mcp-Param")
                && message.contains("org 'org-1'")
                && message.contains("500"),
            "names the org and why: {body}"
        );
        assert_eq!(body["id"], 9);
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_read_and_a_failure_is_kept_briefly() {
        let (up, lists) = broken_upstream().await;
        let gw = gateway("stateless-2025", &up.url());
        let calls = (0..6).map(|n| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.handle(call(n, "Hello", Some("Hello"))).await })
        });
        for r in futures::future::join_all(calls).await {
            let r = r.expect("the call ran");
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", json_of(&r));
        }
        assert_eq!(
            lists.load(Ordering::SeqCst),
            1,
            "six calls waiting at once: one read, not one each"
        );
        for n in 10..15 {
            let r = gw.handle(call(n, "Hello", Some("Hello"))).await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        }
        assert_eq!(
            lists.load(Ordering::SeqCst),
            1,
            "a failed read is not repeated by every later call"
        );
    }

    #[tokio::test]
    async fn each_caller_is_checked_against_its_own_tool_list() {
        // The tool mirrors `region` for alice only: bob's list has it
        // without the annotation.
        let lists = Arc::new(AtomicUsize::new(0));
        let count = lists.clone();
        let up = testing::full_stub(move |head, body| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            count.fetch_add(1, Ordering::SeqCst);
            let region = if head.contains("ratatosk-subject: alice") {
                json!({"type": "string", "x-mcp-header": "Region"})
            } else {
                json!({"type": "string"})
            };
            let result = json!({"tools": [{"name": "test_x_mcp_header", "inputSchema": {
                "type": "object", "properties": {"region": region}}}]});
            testing::Reply::new(
                200,
                "application/json",
                json!({"jsonrpc": "2.0", "id": v["id"], "result": result}).to_string(),
            )
        })
        .await;
        let gw = gateway("stateless-2025", &up.url());
        let org = gw.live().routes.org("org-1").expect("org").clone();
        let caller = |subject: &str| {
            Arc::new(Identity {
                subject: subject.into(),
                ..Identity::anonymous("org-1")
            })
        };
        let (alice, bob) = (caller("alice"), caller("bob"));
        let req = call(1, "Hello", None);
        for (who, expected) in [(&alice, 1), (&bob, 0), (&alice, 1), (&bob, 0)] {
            let call = Call::new(&org, who, &req);
            let headers = call.upstream_headers("", None);
            let found = gw
                .header_params_of(call, "test_x_mcp_header", Lister::Sessionless(&headers))
                .await
                .expect("a tool list");
            assert_eq!(found.len(), expected, "{}", who.subject);
        }
        assert_eq!(lists.load(Ordering::SeqCst), 2, "one read per caller");
    }
}
