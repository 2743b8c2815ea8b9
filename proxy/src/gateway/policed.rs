//! Tool policies and the audit, for the federated endpoint and for each
//! server's own endpoint.
//!
//! [`Gateway::permit`] decides one use of one item and makes its audit
//! entry. At a server's endpoint, [`Gateway::police`] asks it for each
//! request a client sends, before any upstream sees it; what it returns
//! watches the response (see [`crate::stream::watch`]): a list is cut to
//! what the caller may see, a call's outcome ends its audit line. A
//! federated session's own requests to its servers are not policed again:
//! the federated endpoint did that, under the names it shows.

use bytes::BytesMut;

use super::*;
use crate::audit::{Audit, Entry, Outcome};
use crate::edge::ResponseBody;
use crate::policy::{Kind as Item, Policy};
use crate::stream::watch::{Watcher, Watches};

/// Why the policy refused a request.
pub(super) enum Refusal {
    /// A JSON-RPC error, as any failed call gets.
    Denied(Bytes),
    /// 403 `insufficient_scope`: a scope would allow it.
    StepUp(Reject),
}

impl Refusal {
    /// The answer to a POST that asked for it.
    pub(super) fn into_response(self) -> Result<Response, Reject> {
        match self {
            Refusal::Denied(body) => Ok(Response::json(StatusCode::OK, body)),
            Refusal::StepUp(reject) => Err(reject),
        }
    }

    /// The JSON-RPC message that says it, for a stream.
    pub(super) fn body(self) -> Bytes {
        match self {
            Refusal::Denied(body) => body,
            Refusal::StepUp(reject) => reject.body(),
        }
    }
}

/// Who asks to use an item of which server, under which policy.
pub(super) struct Asker<'a> {
    /// The org's front (its name, scopes and metadata).
    pub(super) front: &'a Front,
    pub(super) server: Option<&'a str>,
    pub(super) policy: &'a Policy,
    pub(super) identity: &'a Identity,
    pub(super) request_id: &'a str,
}

/// The methods whose every use gets an audit line.
pub(super) fn audited(method: &str) -> bool {
    matches!(method, "tools/call" | "prompts/get" | "resources/read")
}

impl Gateway {
    /// Whether `who` may use the server's `own` item of `kind`: the audit
    /// entry of an allowed call, or the refusal. A denied item is refused
    /// as forbidden, not as unknown: the lists already hide it, so only a
    /// caller who knows its name asks, and the error says why. Where a
    /// scope would allow it, the refusal is 403 `insufficient_scope` with
    /// that scope, so that clients can step up.
    ///
    /// A `tools/call`, `prompts/get` or `resources/read` (`audited`: its
    /// method and params) is audited: a refusal here, an allowed call by
    /// the entry returned, which its answer ends (while the audit is on).
    pub(super) fn permit(
        &self,
        who: Asker<'_>,
        kind: Item,
        own: &str,
        id: Option<&Id>,
        audited: Option<(&str, Option<&Value>)>,
    ) -> Result<Option<Box<Entry>>, Refusal> {
        let decision = who.policy.decide(who.identity, kind, own);
        // With the audit off, a call is neither written nor counted.
        let audited = audited.filter(|_| self.audit.is_on());
        if decision.allowed && audited.is_none() {
            return Ok(None);
        }
        let shown = who.policy.shown(kind, own);
        let entry = audited.map(|(method, params)| {
            Box::new(Entry {
                started: std::time::Instant::now(),
                time: std::time::SystemTime::now(),
                request_id: who.request_id.to_owned(),
                org: who.front.name.to_string(),
                server: who.server.map(str::to_owned),
                subject: who.identity.subject.clone(),
                username: who.identity.username.clone(),
                client: who.identity.client_id.clone(),
                method: method.to_owned(),
                target: shown.clone(),
                allowed: decision.allowed,
                rule: decision.rule.as_deref().map(str::to_owned),
                arguments: self.audit.arguments_of(params),
                replica: None,
            })
        });
        if decision.allowed {
            return Ok(entry);
        }
        if let Some(entry) = &entry {
            self.audit.record(entry, Outcome::Denied, None);
        }
        if !decision.step_up.is_empty() {
            return Err(Refusal::StepUp(
                self.step_up_reject(who.front, &decision.step_up, kind.as_str(), &shown)
                    .with_id(id),
            ));
        }
        let why = match &decision.rule {
            Some(rule) => format!("rule '{rule}'"),
            None => "no rule allows it".to_owned(),
        };
        tracing::info!(org = %who.front.name, server = who.server.unwrap_or(""), subject = %who.identity.subject, "{} '{shown}' denied: {why}", kind.as_str());
        Err(Refusal::Denied(jsonrpc::error_body(
            id,
            code::INVALID_PARAMS,
            &format!(
                "{} '{}' is not allowed to this caller by the policy of org '{}'",
                kind.as_str(),
                jsonrpc::clip(&shown, 128),
                who.front.name
            ),
        )))
    }

    /// A client's request `method` (with `params`, parsed only if it is
    /// needed) at a server's endpoint, under the server's policy: refused,
    /// or let through with what is to watch its response (a list to cut,
    /// a call to audit). Nothing to do (and nothing parsed) for a server
    /// without rules while the audit is off, or for a federated session's
    /// own request.
    pub(super) fn police(
        &self,
        call: Call<'_>,
        method: &str,
        id: Option<&Id>,
        params: impl FnOnce() -> Option<Value>,
    ) -> Result<Option<Box<dyn Watcher>>, Refusal> {
        let org = call.org;
        let open = org.policy.is_open();
        if !call.client {
            // A federated session's audited call: the federated endpoint
            // waits to hear which replica answers (see `served_in`).
            if id.is_none() || !audited(method) {
                return Ok(None);
            }
            return Ok(SERVED
                .try_with(|cell| Box::new(ServedWatch(cell.clone())) as Box<dyn Watcher>)
                .ok());
        }
        if id.is_none() || (open && !self.audit.is_on()) {
            return Ok(None);
        }
        if crate::federation::ListKind::of_method(method).is_some() {
            return Ok((!open).then(|| {
                Box::new(ListWatch {
                    org: org.clone(),
                    identity: call.identity.clone(),
                }) as Box<dyn Watcher>
            }));
        }
        let is_audited = audited(method);
        if open && !is_audited {
            return Ok(None);
        }
        let params = params();
        let Some((kind, own)) = crate::policy::target_of(method, params.as_ref()) else {
            return Ok(None);
        };
        let who = Asker {
            front: org,
            server: org.server_name.as_deref(),
            policy: &org.policy,
            identity: call.identity,
            request_id: call.request_id,
        };
        let audited = is_audited.then_some((method, params.as_ref()));
        let entry = self.permit(who, kind, own, id, audited)?;
        Ok(entry.map(|entry| {
            Box::new(CallWatch {
                entry: Some(entry),
                audit: self.audit.clone(),
            }) as Box<dyn Watcher>
        }))
    }

    /// [`Gateway::police`] for every request of a POST in `log`'s
    /// session: each watch is set on the log. One refused request refuses
    /// a batch whole, before any of it goes upstream.
    pub(super) fn police_all(
        &self,
        call: Call<'_>,
        log: &SessionLog,
        requests: &[Message],
    ) -> Result<(), Refusal> {
        let mut watches = Vec::new();
        for m in requests {
            let (Some(method), Some(id)) = (m.method(), m.request_id()) else {
                continue;
            };
            match self.police(call, method, Some(id), || m.params()) {
                Ok(Some(watch)) => watches.push((id.clone(), watch)),
                Ok(None) => {}
                Err(refusal) if requests.len() == 1 => return Err(refusal),
                Err(refusal) => {
                    let why = String::from_utf8_lossy(&refusal.body()).into_owned();
                    return Err(Refusal::Denied(jsonrpc::error_body(
                        None,
                        code::INVALID_REQUEST,
                        &format!(
                            "a request of this batch was refused, so none of it was sent: {}",
                            jsonrpc::clip(&why, 512)
                        ),
                    )));
                }
            }
        }
        for (id, watch) in watches {
            log.watches.watch(id, watch);
        }
        Ok(())
    }
}

/// Where a federated session's request to a server learns the replica
/// that answered it.
type Served = Arc<std::sync::Mutex<Option<String>>>;

tokio::task_local! {
    /// Set while the federated endpoint asks a server (in the same task:
    /// the server's endpoint is called, not spawned).
    static SERVED: Served;
}

/// `ask`: a federated session's request to one of its servers. When the
/// call is audited (`entry`), the entry gets the name of the replica that
/// answered, if one did.
pub(super) async fn served_in<F: std::future::Future>(
    entry: &mut Option<Box<Entry>>,
    ask: F,
) -> F::Output {
    let Some(entry) = entry else {
        return ask.await;
    };
    let cell = Served::default();
    let out = SERVED.scope(cell.clone(), ask).await;
    entry.replica = cell.lock().unwrap_or_else(|p| p.into_inner()).take();
    out
}

/// Tells the federated endpoint which replica answered (see `served_in`).
struct ServedWatch(Served);

impl Watcher for ServedWatch {
    fn answered(self: Box<Self>, _: &[u8]) -> Option<Bytes> {
        None
    }

    fn served_by(&mut self, replica: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(replica.to_owned());
    }
}

/// A list response, cut to what the caller may see.
struct ListWatch {
    org: Arc<OrgRoute>,
    identity: Arc<Identity>,
}

impl Watcher for ListWatch {
    fn answered(self: Box<Self>, response: &[u8]) -> Option<Bytes> {
        self.org
            .policy
            .filter_list(&self.identity, response)
            .map(Bytes::from)
    }
}

/// An audited call: its response (or its end without one) ends its line.
struct CallWatch {
    entry: Option<Box<Entry>>,
    audit: Arc<Audit>,
}

impl Watcher for CallWatch {
    fn answered(mut self: Box<Self>, response: &[u8]) -> Option<Bytes> {
        if let Some(entry) = self.entry.take() {
            let (outcome, code) = Outcome::of_response(response);
            self.audit.record(&entry, outcome, code);
        }
        None
    }

    fn served_by(&mut self, replica: &str) {
        if let Some(entry) = &mut self.entry {
            entry.replica = Some(replica.to_owned());
        }
    }
}

impl Drop for CallWatch {
    fn drop(&mut self) {
        // No response: cancelled, or its session ended first.
        if let Some(entry) = self.entry.take() {
            self.audit.record(&entry, Outcome::Cancelled, None);
        }
    }
}

/// `answer` to a POST whose requests `watches` waits on, as the client is
/// to see it: a JSON answer (or a refusal) is each watch's response; a
/// stream's messages were theirs as they were logged, or are as they pass
/// (`watches` of a request without a session).
pub(super) fn settled(
    watches: &Watches,
    answer: Result<Response, Reject>,
) -> Result<Response, Reject> {
    match answer {
        Ok(mut response) => {
            if let ResponseBody::Full(body) = &response.body
                && let Some(shown) = watches.answered(body)
            {
                response.body = ResponseBody::Full(shown);
            }
            Ok(response)
        }
        Err(reject) => {
            if !watches.is_empty() {
                watches.answered(&reject.body());
            }
            Err(reject)
        }
    }
}

/// An SSE answer without a session log, whose messages pass its watches
/// (a 2026-07-28 client's answer). Dropped before the response, a watch
/// says so.
pub(super) struct WatchedStream {
    inner: Box<dyn ChunkSource>,
    watches: Watches,
    /// The start of a frame not complete yet.
    held: BytesMut,
}

impl WatchedStream {
    pub(super) fn new(inner: Box<dyn ChunkSource>, watches: Watches) -> WatchedStream {
        WatchedStream {
            inner,
            watches,
            held: BytesMut::new(),
        }
    }

    /// One whole frame, as the client is to see it.
    fn frame(&self, frame: &[u8]) -> Option<Bytes> {
        let lines = frame.split(|b| *b == b'\n');
        let data: Vec<&[u8]> = lines
            .clone()
            .filter_map(|l| l.strip_prefix(b"data:"))
            .map(|d| d.strip_prefix(b" ").unwrap_or(d))
            .collect();
        if data.is_empty() {
            return None;
        }
        let shown = self.watches.answered(&data.join(&b'\n'))?;
        let mut out = BytesMut::with_capacity(shown.len() + 64);
        for line in lines.filter(|l| !l.is_empty() && !l.starts_with(b"data:")) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&shown);
        out.extend_from_slice(b"\n\n");
        Some(out.freeze())
    }
}

#[async_trait]
impl ChunkSource for WatchedStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.watches.is_empty() && self.held.is_empty() {
                return self.inner.next_chunk().await;
            }
            let Some(chunk) = self.inner.next_chunk().await else {
                // What is left was never a whole frame.
                return (!self.held.is_empty()).then(|| self.held.split().freeze());
            };
            self.held.extend_from_slice(&chunk);
            let mut out = BytesMut::new();
            while let Some(end) = memchr::memmem::find(&self.held, b"\n\n") {
                let frame = self.held.split_to(end + 2);
                match self.frame(&frame) {
                    Some(shown) => out.extend_from_slice(&shown),
                    None => out.extend_from_slice(&frame),
                }
            }
            if !out.is_empty() {
                return Some(out.freeze());
            }
        }
    }

    fn written(&mut self) {
        self.inner.written();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::tests::{gateway_yaml, initialize, json_of, post};
    use crate::testing;
    use std::sync::Mutex;

    /// A stateless server with tools `x` and `y`; it records the tools
    /// called.
    async fn server(called: Arc<Mutex<Vec<String>>>) -> testing::Stub {
        testing::stub(move |body| {
            let id = testing::request_id(body);
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let result = match v["method"].as_str().unwrap_or_default() {
                "initialize" => r#"{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"s","version":"1"}}"#.to_owned(),
                "tools/list" => r#"{"tools":[{"name":"x","inputSchema":{"type":"object"}},{"name":"y","inputSchema":{"type":"object"}}]}"#.to_owned(),
                "tools/call" => {
                    let name = v["params"]["name"].as_str().unwrap_or_default().to_owned();
                    called.lock().expect("lock").push(name.clone());
                    format!(r#"{{"content":[{{"type":"text","text":"{name}"}}]}}"#)
                }
                _ => return (202, "application/json", String::new()),
            };
            (200, "application/json", format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#))
        })
        .await
    }

    /// A directory of its own, and the audit log's path in it.
    fn audit_file() -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ratatosk-policed-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        (dir, path)
    }

    #[tokio::test]
    async fn a_servers_own_endpoint_lists_and_calls_only_what_the_policy_allows() {
        let called = Arc::new(Mutex::new(Vec::new()));
        let stub = server(called.clone()).await;
        let (dir, path) = audit_file();
        let gw = gateway_yaml(
            &[stub.url()],
            "",
            &format!("audit: {{sink: file, path: \"{}\"}}", path.display()),
            "policy: [{name: only-x, allow: {tools: [x]}}],",
        );
        let sid = initialize(&gw).await;
        let headers = [("mcp-session-id", sid.as_str())];
        let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
        let r = gw.handle(post(list, &headers)).await;
        assert_eq!(
            json_of(&r)["result"]["tools"],
            json!([{"name":"x","inputSchema":{"type":"object"}}])
        );
        let call = |tool: &str, id: u32| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}"}}}}"#
            )
        };
        let r = gw.handle(post(&call("y", 3), &headers)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            json_of(&r)["error"]["message"],
            "tool 'y' is not allowed to this caller by the policy of org 'org-1'"
        );
        let r = gw.handle(post(&call("x", 4), &headers)).await;
        assert_eq!(json_of(&r)["result"]["content"][0]["text"], "x");
        assert_eq!(
            *called.lock().expect("lock"),
            ["x"],
            "y never reached the server"
        );
        // One audit line per call: the refusal, then the result.
        let lines = crate::audit::tests::wait_for_lines(&path, 2);
        let seen: Vec<(String, String, String)> = lines
            .iter()
            .map(|l| {
                let s = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
                (s("tool"), s("decision"), s("outcome"))
            })
            .collect();
        let want = |t: &str, d: &str, o: &str| (t.to_owned(), d.to_owned(), o.to_owned());
        assert_eq!(
            seen,
            [
                want("y", "denied", "denied"),
                want("x", "allowed", "result"),
            ]
        );
        // The replica that answered, and none for a call no server saw.
        assert_eq!(
            (&lines[0]["replica"], &lines[1]["replica"]),
            (&json!(null), &json!("org-1#1"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_modern_clients_streamed_answers_are_cut_and_audited_as_they_pass() {
        use crate::gateway::bridge::modern::tests::{drain, modern};
        let stub = testing::stub(|body| {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let id = v["id"].clone();
            let note = json!({"jsonrpc": "2.0", "method": "notifications/message",
                              "params": {"level": "info", "data": "working"}});
            let result = match v["method"].as_str().unwrap_or_default() {
                "tools/list" => {
                    json!({"tools": [{"name": "x"}, {"name": "y"}], "resultType": "complete"})
                }
                _ => {
                    json!({"content": [{"type": "text", "text": "done"}], "resultType": "complete"})
                }
            };
            let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
            let frames =
                format!("event: message\ndata: {note}\n\nevent: message\ndata: {answer}\n\n");
            (200, "text/event-stream", frames)
        })
        .await;
        let (dir, path) = audit_file();
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
             streams: {{keepalive: 2s}}\npublish: {{secret: unit-test-secret-0123}}\n\
             audit: {{sink: file, path: \"{}\"}}\n\
             orgs:\n  org-1: {{policy: [{{name: only-x, allow: {{tools: [x]}}}}], \
             upstream: {{era: modern, replicas: [\"{}\"], timeout: 2s}}}}\n",
            path.display(),
            stub.url()
        );
        let config =
            Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None).expect("config");
        let gw = Gateway::new(config, Arc::new(crate::session::MemorySessionStore::new()))
            .expect("gateway");
        let mut r = gw
            .handle(modern(1, "tools/list", json!({}), json!({}), &[]))
            .await;
        let text = drain(&mut r).await;
        assert!(text.contains("working"), "other messages pass: {text}");
        assert!(text.contains(r#"[{"name":"x"}]"#), "{text}");
        assert!(!text.contains(r#""y""#), "{text}");
        let denied = gw
            .handle(modern(
                2,
                "tools/call",
                json!({"name": "y"}),
                json!({}),
                &[],
            ))
            .await;
        assert!(
            json_of(&denied)["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not allowed")
        );
        let mut r = gw
            .handle(modern(
                3,
                "tools/call",
                json!({"name": "x"}),
                json!({}),
                &[],
            ))
            .await;
        assert!(drain(&mut r).await.contains("done"));
        let outcomes: Vec<String> = crate::audit::tests::wait_for_lines(&path, 2)
            .iter()
            .map(|l| {
                format!(
                    "{}:{}:{}",
                    l["tool"].as_str().unwrap_or_default(),
                    l["outcome"].as_str().unwrap_or_default(),
                    l["replica"].as_str().unwrap_or("-")
                )
            })
            .collect();
        assert_eq!(outcomes, ["y:denied:-", "x:result:org-1#1"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
