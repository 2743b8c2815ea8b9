//! `subscriptions/listen` of 2026-07-28 clients in front of a stateful 2025
//! upstream (`basic/patterns/subscriptions.mdx`). Such an upstream sends
//! its change notifications on its session's GET stream: the gateway
//! follows the GET stream of the client's hidden session (into the
//! session's standalone stream, as for any session of a stateful upstream)
//! and serves each listen from there, after an acknowledgment naming what
//! it can honour, with only the notifications the client asked for, each
//! tagged with the subscription id.

use std::time::Duration;

use bytes::BytesMut;
use serde_json::Map;

use super::modern::Phase;
use super::*;
use crate::era;

/// Longest a listen waits for the hidden session's GET stream to open
/// before acknowledging: a change raised before it opens reaches nobody.
const OPEN_WAIT: Duration = Duration::from_secs(2);

/// Resource subscriptions made in the hidden session at once.
const SUBSCRIBE_CONCURRENCY: usize = 8;

const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// What a listen delivers: the client's filter, cut to what the upstream
/// offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Filter {
    tools: bool,
    prompts: bool,
    resources: bool,
    uris: Vec<String>,
}

impl Filter {
    /// The filter a listen's `params.notifications` asks for.
    fn requested(params: &Map<String, Value>) -> Filter {
        let n = params.get("notifications");
        let flag = |name: &str| n.and_then(|n| n.get(name)).and_then(Value::as_bool) == Some(true);
        Filter {
            tools: flag("toolsListChanged"),
            prompts: flag("promptsListChanged"),
            resources: flag("resourcesListChanged"),
            uris: n
                .and_then(|n| n.get("resourceSubscriptions"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The list-change types of `self` the upstream announces in its
    /// `initialize` capabilities (`listChanged`); the URIs are settled
    /// apart.
    fn offered(&self, capabilities: &Value) -> Filter {
        let changes = |kind: &str| {
            capabilities.pointer(&format!("/{kind}/listChanged")) == Some(&Value::Bool(true))
        };
        Filter {
            tools: self.tools && changes("tools"),
            prompts: self.prompts && changes("prompts"),
            resources: self.resources && changes("resources"),
            uris: Vec::new(),
        }
    }

    /// The acknowledgment's `notifications`: what is honoured, nothing else.
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, on) in [
            ("toolsListChanged", self.tools),
            ("promptsListChanged", self.prompts),
            ("resourcesListChanged", self.resources),
        ] {
            if on {
                m.insert(name.into(), Value::Bool(true));
            }
        }
        if !self.uris.is_empty() {
            m.insert("resourceSubscriptions".into(), json!(self.uris));
        }
        Value::Object(m)
    }

    /// Whether an upstream message is a notification this listen asked
    /// for. Anything else on the GET stream (requests, log messages) is
    /// not a change notification and stays off the listen.
    fn wants(&self, message: &Value) -> bool {
        match message.get("method").and_then(Value::as_str) {
            Some("notifications/tools/list_changed") => self.tools,
            Some("notifications/prompts/list_changed") => self.prompts,
            Some("notifications/resources/list_changed") => self.resources,
            Some("notifications/resources/updated") => message
                .pointer("/params/uri")
                .and_then(Value::as_str)
                .is_some_and(|uri| self.uris.iter().any(|u| u == uri)),
            _ => false,
        }
    }
}

/// `message` with the subscription id in `params._meta`.
fn tagged(mut message: Value, id: &Id) -> Value {
    if !message.get("params").is_some_and(Value::is_object) {
        message["params"] = json!({});
    }
    let params = &mut message["params"];
    if !params.get("_meta").is_some_and(Value::is_object) {
        params["_meta"] = json!({});
    }
    params["_meta"][SUBSCRIPTION_ID] = id.to_value();
    message
}

impl Gateway {
    /// A modern client's `subscriptions/listen` to a stateful upstream.
    pub(super) async fn listen_in_hidden_session(
        self: &Arc<Self>,
        org: &Arc<OrgRoute>,
        identity: &Identity,
        req: &Request,
        id: &Id,
        params: &Map<String, Value>,
    ) -> Result<Response, Reject> {
        let requested = Filter::requested(params);
        let info = org
            .era
            .info(&org.pool, Era::Stateful2025)
            .await
            .map_err(|e| modern::probe_reject(e, Some(id)))?;
        let capabilities = info.get("capabilities").cloned().unwrap_or(Value::Null);
        let hidden = self.hidden_session(org, identity, req, params).await?;
        // Up to date first: what the session said before this listen is
        // not for it.
        let log = self.session_log(&hidden, true).await?;
        let attach = log.watch().map_err(|_| session_not_found())?;
        self.ensure_listener(org, &hidden.id, &log, false);
        let mut honoured = requested.offered(&capabilities);
        match self.background_phase(&hidden.id, OPEN_WAIT).await {
            Phase::Unavailable => honoured = Filter::default(),
            Phase::Open | Phase::Opening => {
                if capabilities.pointer("/resources/subscribe") == Some(&Value::Bool(true)) {
                    let headers =
                        session_headers(org, identity, &hidden, &req.headers, &req.request_id);
                    honoured.uris = self
                        .subscribe_in_session(org, &hidden, headers, &requested.uris)
                        .await;
                }
            }
        }
        let ack = json!({
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {SUBSCRIPTION_ID: id.to_value()}, "notifications": honoured.to_json()},
        });
        let mut live = LiveStream::new(
            log,
            attach,
            Some(sse_frame(None, Some("message"), ack.to_string().as_bytes())),
            self.config.streams.keepalive,
            Some(org.metrics.stream.clone()),
        );
        self.end_with_token(&mut live, identity);
        Ok(Response::sse(Box::new(Listen {
            live,
            filter: honoured,
            id: id.clone(),
            first: true,
        })))
    }

    /// Subscribes the hidden session to `uris` it does not hold yet, up to
    /// `sessions.max_subscriptions` in all; returns those it holds. They
    /// stay for the session's life: its other listens may want them, and
    /// each listen filters what it delivers.
    async fn subscribe_in_session(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: http::HeaderMap,
        uris: &[String],
    ) -> Vec<String> {
        let max = self.config.sessions.max_subscriptions;
        let held = &session.resource_subscriptions;
        let room = max.saturating_sub(held.len());
        let wanted: Vec<&String> = uris
            .iter()
            .filter(|u| !held.contains(u))
            .take(room)
            .collect();
        let mut made: Vec<String> = Vec::new();
        for (round, batch) in wanted.chunks(SUBSCRIBE_CONCURRENCY).enumerate() {
            let asks = batch.iter().enumerate().map(|(n, uri)| {
                let n = round * SUBSCRIBE_CONCURRENCY + n;
                self.subscribe_one(org, session, headers.clone(), n, uri)
            });
            let took = futures::future::join_all(asks).await;
            made.extend(
                batch
                    .iter()
                    .zip(took)
                    .filter(|(_, ok)| *ok)
                    .map(|(uri, _)| (*uri).clone()),
            );
        }
        if !made.is_empty() {
            let record = |s: &mut SessionState| {
                for uri in &made {
                    if !s.resource_subscriptions.contains(uri)
                        && s.resource_subscriptions.len() < max
                    {
                        s.resource_subscriptions.push(uri.clone());
                    }
                }
            };
            if let Err(e) = self.store.update(&session.id, &record).await {
                tracing::warn!(org = %org.name, error = %e, "cannot record the hidden session's resource subscriptions");
            }
        }
        uris.iter()
            .filter(|u| held.contains(u) || made.contains(u))
            .cloned()
            .collect()
    }

    /// `resources/subscribe` for one URI in a session (request `n` of a
    /// listen's); whether the upstream took it.
    async fn subscribe_one(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: http::HeaderMap,
        n: usize,
        uri: &str,
    ) -> bool {
        let unique = self.next_reply.fetch_add(1, Ordering::Relaxed);
        let Some(id) = Id::from_value(&Value::from(format!(
            "ratatosk-subscribe-{:08x}-{unique}-{n}",
            self.node
        ))) else {
            return false;
        };
        let body = era::request_body(Some(&id), "resources/subscribe", json!({"uri": uri}));
        let asked = async {
            let answer = self
                .send_in_session(org, session, headers, body)
                .await
                .ok()?;
            let response = AnswerReader::new(answer, org.pool.read_limits)
                .response_to(&id)
                .await
                .ok()??;
            let v: Value = serde_json::from_slice(&response).ok()?;
            Some(v.get("result").is_some())
        };
        tokio::time::timeout(org.pool.read_limits.timeout, asked)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

/// A listen's stream: the acknowledgment, then the hidden session's
/// change notifications this listen asked for, tagged, and keep-alives.
struct Listen {
    live: LiveStream,
    filter: Filter,
    id: Id,
    /// The acknowledgment (the live stream's prelude) is still to go.
    first: bool,
}

#[async_trait]
impl ChunkSource for Listen {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let chunk = self.live.next_chunk().await?;
            if std::mem::take(&mut self.first) || chunk.starts_with(b":") {
                return Some(chunk);
            }
            // The log's frames: `id`, `event` and `data` lines; the data
            // is one JSON-RPC message.
            let mut out = BytesMut::new();
            for frame in chunk
                .split(|b| *b == b'\n')
                .collect::<Vec<_>>()
                .split(|l| l.is_empty())
            {
                let data: Vec<&[u8]> = frame
                    .iter()
                    .filter_map(|l| l.strip_prefix(b"data: ".as_slice()))
                    .collect();
                let Ok(message) = serde_json::from_slice::<Value>(&data.join(&b'\n')) else {
                    continue;
                };
                if self.filter.wants(&message) {
                    let message = tagged(message, &self.id).to_string();
                    out.extend_from_slice(&sse_frame(None, Some("message"), message.as_bytes()));
                }
            }
            // Read; what was left out is not the client's.
            self.live.written();
            if !out.is_empty() {
                return Some(out.freeze());
            }
        }
    }

    fn written(&mut self) {
        self.live.written();
    }
}

#[cfg(test)]
mod tests {
    use super::super::modern::tests::{gateway, json_of, modern};
    use super::*;
    use crate::edge::ResponseBody;
    use crate::testing;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stateful upstream that announces tools (not prompts) list changes
    /// and resource subscriptions; its session's first GET stream says a
    /// bit of everything (later ones are refused); counts
    /// `resources/subscribe`.
    async fn announcing_upstream() -> (testing::Stub, Arc<AtomicUsize>) {
        let subscribes = Arc::new(AtomicUsize::new(0));
        let count = subscribes.clone();
        let gets = AtomicUsize::new(0);
        let stub = testing::full_stub(move |head, body| {
            let reply = |status: u16, ct: &str, body: String| testing::Reply {
                status,
                headers: vec![("content-type".into(), ct.into())],
                body,
            };
            if head.starts_with("get ") && gets.fetch_add(1, Ordering::SeqCst) > 0 {
                return reply(405, "text/plain", String::new());
            }
            if head.starts_with("get ") {
                let said: String = [
                    json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}),
                    json!({"jsonrpc": "2.0", "id": 1, "method": "roots/list"}),
                    json!({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}),
                    json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "test://b"}}),
                    json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
                    json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "test://a"}}),
                ]
                .iter()
                .map(|m| format!("event: message\ndata: {m}\n\n"))
                .collect();
                return reply(200, "text/event-stream", said);
            }
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            match v["method"].as_str() {
                Some("initialize") => {
                    let mut r = reply(200, "application/json", json!({"jsonrpc": "2.0", "id": id, "result": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {"tools": {"listChanged": true}, "prompts": {},
                                         "resources": {"subscribe": true}},
                        "serverInfo": {"name": "announcing", "version": "1"}}}).to_string());
                    r.headers.push(("mcp-session-id".into(), "up-1".into()));
                    r
                }
                Some("resources/subscribe") => {
                    count.fetch_add(1, Ordering::SeqCst);
                    reply(200, "application/json", json!({"jsonrpc": "2.0", "id": id, "result": {}}).to_string())
                }
                _ => reply(202, "application/json", String::new()),
            }
        })
        .await;
        (stub, subscribes)
    }

    #[tokio::test]
    async fn a_listen_acknowledges_what_it_honours_then_relays_only_that_tagged() {
        let (up, subscribes) = announcing_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let filter = json!({"notifications": {"toolsListChanged": true, "promptsListChanged": true,
                                              "resourceSubscriptions": ["test://a"]}});
        let mut r = gw
            .handle(modern(77, "subscriptions/listen", filter, json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let ResponseBody::Stream(src) = &mut r.body else {
            panic!("a stream, got {}", json_of(&r))
        };
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !text.contains("notifications/resources/updated") {
            let chunk = tokio::time::timeout_at(deadline, src.next_chunk())
                .await
                .expect("the notifications in time")
                .expect("open");
            src.written();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let messages: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        let methods: Vec<&str> = messages
            .iter()
            .filter_map(|m| m["method"].as_str())
            .collect();
        assert_eq!(
            methods,
            [
                "notifications/subscriptions/acknowledged",
                "notifications/tools/list_changed",
                "notifications/resources/updated"
            ],
            "{text}"
        );
        assert_eq!(
            messages[0]["params"]["notifications"],
            json!({"toolsListChanged": true, "resourceSubscriptions": ["test://a"]}),
            "prompts are not announced by the upstream"
        );
        assert!(
            messages
                .iter()
                .all(|m| m["params"]["_meta"][SUBSCRIPTION_ID] == 77),
            "{text}"
        );
        assert_eq!(subscribes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_filter_is_cut_to_what_the_upstream_offers() {
        let params = json!({"notifications": {"toolsListChanged": true, "promptsListChanged": true,
            "resourcesListChanged": false, "resourceSubscriptions": ["test://a", 7]}});
        let Value::Object(params) = params else {
            unreachable!()
        };
        let asked = Filter::requested(&params);
        assert_eq!(asked.uris, ["test://a"]);
        let offered = asked.offered(&json!({"tools": {"listChanged": true}, "prompts": {}}));
        assert_eq!(offered.to_json(), json!({"toolsListChanged": true}));
        assert_eq!(Filter::default().to_json(), json!({}));
    }

    #[test]
    fn only_asked_for_notifications_pass_tagged() {
        let filter = Filter {
            prompts: true,
            uris: vec!["test://a".into()],
            ..Filter::default()
        };
        let note = |method: &str, params: Value| json!({"jsonrpc": "2.0", "method": method, "params": params});
        assert!(filter.wants(&note("notifications/prompts/list_changed", json!({}))));
        assert!(!filter.wants(&note("notifications/tools/list_changed", json!({}))));
        assert!(filter.wants(&note(
            "notifications/resources/updated",
            json!({"uri": "test://a"})
        )));
        assert!(!filter.wants(&note(
            "notifications/resources/updated",
            json!({"uri": "test://b"})
        )));
        assert!(!filter.wants(&note("notifications/message", json!({"level": "info"}))));
        assert!(!filter.wants(&json!({"jsonrpc": "2.0", "id": 1, "method": "roots/list"})));
        let id = Id::from_value(&json!(42)).expect("id");
        let t = tagged(
            json!({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}),
            &id,
        );
        assert_eq!(t["params"]["_meta"][SUBSCRIPTION_ID], 42);
        let t = tagged(
            note(
                "notifications/resources/updated",
                json!({"uri": "test://a", "_meta": {"k": 1}}),
            ),
            &id,
        );
        assert_eq!(t["params"]["_meta"], json!({"k": 1, SUBSCRIPTION_ID: 42}));
    }
}
