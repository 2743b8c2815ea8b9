//! `subscriptions/listen` of 2026-07-28 clients in front of a stateful 2025
//! upstream (`basic/patterns/subscriptions.mdx`). Such an upstream sends
//! its change notifications on its session's GET stream: the gateway
//! follows the GET stream of the client's hidden session (into the
//! session's standalone stream, as for any session of a stateful upstream)
//! and serves each listen from there, after an acknowledgment naming what
//! it can honour, with only the notifications the client asked for, each
//! tagged with the subscription id.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use serde_json::Map;

use super::background::Phase;
use super::*;
use crate::era;

/// Longest a listen waits for the hidden session's GET stream to open
/// before acknowledging: a change raised before it opens reaches nobody.
const OPEN_WAIT: Duration = Duration::from_secs(2);

/// Resource subscriptions made in the hidden session at once.
const SUBSCRIBE_CONCURRENCY: usize = 8;

/// Most resource URIs one listen asks for; those past it are not honoured
/// (the acknowledgment leaves them out). All of a listen's subscriptions
/// are made within one `upstream.timeout`.
const MAX_LISTEN_URIS: usize = 32;

const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// Resource URIs a hidden session's upstream refused to subscribe it to,
/// by session: not asked again by its later listens.
#[derive(Default)]
pub(in crate::gateway) struct Refused(DashMap<String, HashSet<String>>);

impl Refused {
    fn of(&self, session_id: &str) -> Option<HashSet<String>> {
        self.0.get(session_id).map(|r| r.clone())
    }

    /// Adds `uris`, up to `max` per session.
    fn add(&self, session_id: &str, uris: Vec<String>, max: usize) {
        if uris.is_empty() {
            return;
        }
        let mut refused = self.0.entry(session_id.to_owned()).or_default();
        for uri in uris {
            if refused.len() < max {
                refused.insert(uri);
            }
        }
    }

    /// Forgets a session that ended.
    pub(in crate::gateway) fn forget(&self, session_id: &str) {
        self.0.remove(session_id);
    }
}

/// What a listen delivers: the client's filter, cut to what the upstream
/// offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(in crate::gateway) struct Filter {
    tools: bool,
    prompts: bool,
    resources: bool,
    uris: Vec<String>,
}

impl Filter {
    /// The filter a listen's `params.notifications` asks for: each URI
    /// once, the first [`MAX_LISTEN_URIS`] of them.
    fn requested(params: &Map<String, Value>) -> Filter {
        let n = params.get("notifications");
        let flag = |name: &str| n.and_then(|n| n.get(name)).and_then(Value::as_bool) == Some(true);
        let mut uris: Vec<String> = Vec::new();
        for uri in n
            .and_then(|n| n.get("resourceSubscriptions"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if uris.len() >= MAX_LISTEN_URIS {
                tracing::debug!(
                    max = MAX_LISTEN_URIS,
                    "a listen asked for more resource subscriptions than it may hold; the rest are not honoured"
                );
                break;
            }
            if !uris.iter().any(|u| u == uri) {
                uris.push(uri.to_owned());
            }
        }
        Filter {
            tools: flag("toolsListChanged"),
            prompts: flag("promptsListChanged"),
            resources: flag("resourcesListChanged"),
            uris,
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
    pub(in crate::gateway) async fn listen_in_hidden_session(
        self: &Arc<Self>,
        call: Call<'_>,
        id: &Id,
        params: &Map<String, Value>,
    ) -> Result<Response, Reject> {
        let org = call.org;
        let requested = Filter::requested(params);
        let info = org
            .server
            .info(Era::Stateful2025)
            .await
            .map_err(|e| probe_reject(e, Some(id)))?;
        let capabilities = info.get("capabilities").cloned().unwrap_or(Value::Null);
        let hidden = self.hidden_session(call, params).await?;
        // Up to date first: what the session said before this listen is
        // not for it.
        let ended = || hidden_session_ended(org, id);
        let log = match self.hub.open(&hidden.id, true).await {
            Ok(Some(log)) => log,
            Ok(None) => return Err(ended()),
            Err(e) => return Err(store_reject(e).with_id(Some(id))),
        };
        let attach = log.watch().map_err(|_| ended())?;
        let phase = self.ensure_listener(org, &hidden.id, false);
        let mut honoured = requested.offered(&capabilities);
        match Self::background_phase(phase, OPEN_WAIT).await {
            Phase::Unavailable => honoured = Filter::default(),
            Phase::Open | Phase::Opening => {
                if capabilities.pointer("/resources/subscribe") == Some(&Value::Bool(true)) {
                    let headers = call.session_headers(&hidden);
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
            self.live().config.streams.keepalive,
            Some(org.metrics.stream.clone()),
        );
        self.end_with_token(&mut live, call.identity);
        Ok(Response::sse(Box::new(Listen {
            live,
            filter: honoured,
            id: id.clone(),
            first: true,
            handed: 0,
        })))
    }

    /// Subscribes the hidden session to `uris` it does not hold yet, up to
    /// `sessions.max_subscriptions` in all, all within one
    /// `upstream.timeout`; returns those it holds. They stay for the
    /// session's life: its other listens may want them, and each listen
    /// filters what it delivers. A URI the upstream refused is not asked
    /// for again in this session.
    async fn subscribe_in_session(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: crate::upstream::Outbound,
        uris: &[String],
    ) -> Vec<String> {
        let max = self.live().config.sessions.max_subscriptions;
        let held = &session.resource_subscriptions;
        let room = max.saturating_sub(held.len());
        let refused = self.bridges.refused_subscriptions.of(&session.id);
        let wanted: Vec<&String> = uris
            .iter()
            .filter(|u| !held.contains(u))
            .filter(|u| !refused.as_ref().is_some_and(|r| r.contains(*u)))
            .take(room)
            .collect();
        let deadline = tokio::time::Instant::now() + org.server.pool.read_limits.timeout;
        let asks: Vec<_> = wanted
            .iter()
            .enumerate()
            .map(|(n, uri)| {
                let headers = headers.clone();
                async move {
                    let how = self.subscribe_uri(org, session, headers, n, uri).await;
                    (uri.to_string(), how)
                }
            })
            .collect();
        let mut asks = futures::stream::iter(asks).buffer_unordered(SUBSCRIBE_CONCURRENCY);
        let mut made: Vec<String> = Vec::new();
        let mut newly_refused: Vec<String> = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, asks.next()).await {
                Ok(Some((uri, Subscribed::Yes))) => made.push(uri),
                Ok(Some((uri, Subscribed::Refused))) => newly_refused.push(uri),
                Ok(Some((_, Subscribed::Unknown))) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(org = %org.name, session = %short(&session.id),
                        "the upstream did not take all of a listen's resource subscriptions within upstream.timeout; the rest are not honoured");
                    break;
                }
            }
        }
        drop(asks);
        self.bridges
            .refused_subscriptions
            .add(&session.id, newly_refused, max);
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
    /// listen's): how the upstream took it.
    async fn subscribe_uri(
        &self,
        org: &OrgRoute,
        session: &SessionState,
        headers: crate::upstream::Outbound,
        n: usize,
        uri: &str,
    ) -> Subscribed {
        let unique = self.replies.unique();
        let Some(id) = Id::from_value(&Value::from(format!(
            "ratatosk-subscribe-{:08x}-{unique}-{n}",
            self.node
        ))) else {
            return Subscribed::Unknown;
        };
        let body = era::request_body(Some(&id), "resources/subscribe", json!({"uri": uri}));
        let asked = async {
            let answer = self
                .send_in_session(org, session, headers, body)
                .await
                .map_err(|e| e.to_string())?;
            let response = AnswerReader::new(answer, org.server.pool.read_limits)
                .response_to(&id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("its answer ended without a response")?;
            serde_json::from_slice::<Value>(&response).map_err(|e| e.to_string())
        };
        let uri = crate::jsonrpc::clip(uri, 200);
        match asked.await {
            Ok(v) if v.get("result").is_some() => Subscribed::Yes,
            Ok(v) => {
                let why = v.pointer("/error/message").and_then(Value::as_str);
                tracing::debug!(org = %org.name, session = %short(&session.id), uri = %uri,
                    reason = why.unwrap_or("no result"), "the upstream refused a resource subscription");
                Subscribed::Refused
            }
            Err(why) => {
                tracing::debug!(org = %org.name, session = %short(&session.id), uri = %uri,
                    reason = %why, "cannot subscribe the hidden session to a resource");
                Subscribed::Unknown
            }
        }
    }
}

/// How the upstream took one `resources/subscribe`.
enum Subscribed {
    Yes,
    /// It answered with an error: not asked again in this session.
    Refused,
    /// No answer could be had (yet): may be asked again.
    Unknown,
}

/// A listen's stream: the acknowledgment, then the hidden session's
/// change notifications this listen asked for, tagged, and keep-alives.
struct Listen {
    live: LiveStream,
    filter: Filter,
    id: Id,
    /// The acknowledgment (the live stream's prelude) is still to go.
    first: bool,
    /// Notifications in the chunk last handed out: what counts as
    /// delivered once it is written.
    handed: u64,
}

#[async_trait]
impl ChunkSource for Listen {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let chunk = self.live.next_chunk().await?;
            if std::mem::take(&mut self.first) || chunk.starts_with(b":") {
                self.handed = 0;
                return Some(chunk);
            }
            // The log's frames: `id`, `event` and `data` lines; the data
            // is one JSON-RPC message.
            let mut out = BytesMut::new();
            let mut handed = 0;
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
                    handed += 1;
                }
            }
            if out.is_empty() {
                // Read; none of it was the client's.
                self.live.written_filtered(0);
                continue;
            }
            self.handed = handed;
            return Some(out.freeze());
        }
    }

    fn written(&mut self) {
        self.live.written_filtered(std::mem::take(&mut self.handed));
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
            let reply = testing::Reply::new;
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
        let org = gw.live().routes.org("org-1").cloned().expect("org");
        assert_eq!(
            org.metrics.stream.delivered.get(),
            2,
            "only what the client got counts as delivered"
        );
    }

    /// A stateful upstream that announces resource subscriptions, refuses
    /// those of `test://bad...` URIs, and whose session's GET stream asks
    /// the client for `ping` and `roots/list` (each GET, again and again);
    /// keeps every POST body.
    async fn subscribing_upstream() -> (testing::Stub, Arc<std::sync::Mutex<Vec<Value>>>) {
        let posts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = posts.clone();
        let stub = testing::full_stub(move |head, body| {
            let reply = testing::Reply::new;
            if head.starts_with("get ") {
                let said: String = [
                    json!({"jsonrpc": "2.0", "id": "up-ping", "method": "ping"}),
                    json!({"jsonrpc": "2.0", "id": "up-roots", "method": "roots/list"}),
                ]
                .iter()
                .map(|m| format!("event: message\ndata: {m}\n\n"))
                .collect();
                return reply(200, "text/event-stream", said);
            }
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            kept.lock().expect("posts").push(v.clone());
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let answer = |result: Value| {
                reply(
                    200,
                    "application/json",
                    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
                )
            };
            match v["method"].as_str() {
                Some("initialize") => {
                    let mut r = answer(json!({"protocolVersion": "2025-11-25",
                        "capabilities": {"resources": {"subscribe": true}},
                        "serverInfo": {"name": "subscribing", "version": "1"}}));
                    r.headers.push(("mcp-session-id".into(), "up-1".into()));
                    r
                }
                Some("resources/subscribe")
                    if v["params"]["uri"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("test://bad")) =>
                {
                    reply(
                        200,
                        "application/json",
                        json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32602, "message": "no such resource"}})
                        .to_string(),
                    )
                }
                Some("resources/subscribe") => answer(json!({})),
                _ => reply(202, "application/json", String::new()),
            }
        })
        .await;
        (stub, posts)
    }

    /// The URIs `resources/subscribe` was sent for, in order.
    fn subscribed(posts: &std::sync::Mutex<Vec<Value>>) -> Vec<String> {
        posts
            .lock()
            .expect("posts")
            .iter()
            .filter(|v| v["method"] == "resources/subscribe")
            .filter_map(|v| v["params"]["uri"].as_str().map(str::to_owned))
            .collect()
    }

    /// Opens a listen for `uris`; its acknowledgment's `notifications`.
    async fn listen(gw: &Arc<Gateway>, id: u64, uris: &[String]) -> Value {
        let filter = json!({"notifications": {"resourceSubscriptions": uris}});
        let mut r = gw
            .handle(modern(id, "subscriptions/listen", filter, json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let ResponseBody::Stream(src) = &mut r.body else {
            panic!("a stream, got {}", json_of(&r))
        };
        let first = tokio::time::timeout(Duration::from_secs(10), src.next_chunk())
            .await
            .expect("the acknowledgment in time")
            .expect("open");
        let text = String::from_utf8_lossy(&first);
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("a message");
        let ack: Value = serde_json::from_str(data).expect("json");
        assert_eq!(
            ack["method"], "notifications/subscriptions/acknowledged",
            "{ack}"
        );
        ack["params"]["notifications"].clone()
    }

    #[tokio::test]
    async fn a_listen_asks_each_uri_once_at_most_32_and_never_again_one_refused() {
        let (up, posts) = subscribing_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        let mut uris: Vec<String> = (0..40).map(|n| format!("test://u/{n}")).collect();
        uris.insert(1, "test://u/0".into());
        uris.insert(0, "test://bad".into());
        let ack = listen(&gw, 1, &uris).await;
        let asked = subscribed(&posts);
        assert_eq!(asked.len(), MAX_LISTEN_URIS, "{asked:?}");
        assert_eq!(
            asked.iter().filter(|u| *u == "test://u/0").count(),
            1,
            "a repeated URI is asked once"
        );
        let honoured = ack["resourceSubscriptions"]
            .as_array()
            .expect("URIs honoured");
        assert_eq!(honoured.len(), MAX_LISTEN_URIS - 1, "{ack}");
        assert!(!honoured.contains(&json!("test://bad")), "{ack}");
        assert!(!honoured.contains(&json!("test://u/39")), "past the cap");
        // Again: what the session holds is not asked for, nor what the
        // upstream refused.
        let ack = listen(&gw, 2, &uris[..3]).await;
        assert_eq!(ack["resourceSubscriptions"], json!(["test://u/0"]), "{ack}");
        assert_eq!(subscribed(&posts).len(), MAX_LISTEN_URIS);
    }

    #[tokio::test]
    async fn a_listens_subscriptions_are_made_within_one_upstream_timeout() {
        let (up, posts) = subscribing_upstream().await;
        // upstream.timeout is 2 s; these never get an answer.
        let gw = gateway("stateful-2025", &up.url());
        let mut uris = vec!["test://a".to_owned()];
        uris.extend((0..24).map(|n| format!("stub-hang:{n}")));
        let started = tokio::time::Instant::now();
        let ack = listen(&gw, 1, &uris).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(4500),
            "acknowledged after {took:?}"
        );
        assert_eq!(ack["resourceSubscriptions"], json!(["test://a"]), "{ack}");
        assert!(subscribed(&posts).contains(&"test://a".to_owned()));
    }

    #[tokio::test]
    async fn the_gateway_answers_what_the_upstream_asks_on_a_hidden_sessions_get_stream() {
        let (up, posts) = subscribing_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        listen(&gw, 1, &[]).await;
        let answered = |id: &str| {
            posts
                .lock()
                .expect("posts")
                .iter()
                .find(|v| v["id"] == id && v.get("method").is_none())
                .cloned()
        };
        assert!(
            testing::eventually(Duration::from_secs(5), || async {
                answered("up-ping").is_some() && answered("up-roots").is_some()
            })
            .await,
            "both requests answered upstream"
        );
        assert_eq!(answered("up-ping").expect("ping")["result"], json!({}));
        assert_eq!(
            answered("up-roots").expect("roots")["error"]["code"],
            code::METHOD_NOT_FOUND
        );
    }

    #[tokio::test]
    async fn a_listen_whose_hidden_session_ended_is_told_to_call_again() {
        let (up, _) = subscribing_upstream().await;
        let gw = gateway("stateful-2025", &up.url());
        listen(&gw, 1, &[]).await;
        let hidden = gw.bridges.hidden.ids();
        let [hidden] = hidden.as_slice() else {
            panic!("one hidden session: {hidden:?}")
        };
        // Its log is gone (the session ends) while the listen starts.
        gw.hub.remove(hidden);
        let filter = json!({"notifications": {"toolsListChanged": true}});
        let r = gw
            .handle(modern(5, "subscriptions/listen", filter, json!({}), &[]))
            .await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers.contains_key(http::header::RETRY_AFTER));
        let body = json_of(&r);
        assert_eq!(body["id"], 5);
        assert_eq!(body["error"]["code"], code::BAD_REQUEST);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("org 'org-1'") && message.contains("again"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_listener_that_ended_before_opening_its_stream_is_unavailable() {
        let (tx, rx) = tokio::sync::watch::channel(Phase::Opening);
        drop(tx);
        assert_eq!(
            Gateway::background_phase(Some(rx), OPEN_WAIT).await,
            Phase::Unavailable
        );
        let (tx, rx) = tokio::sync::watch::channel(Phase::Open);
        drop(tx);
        assert_eq!(
            Gateway::background_phase(Some(rx), OPEN_WAIT).await,
            Phase::Open
        );
        assert_eq!(
            Gateway::background_phase(None, OPEN_WAIT).await,
            Phase::Unavailable
        );
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
