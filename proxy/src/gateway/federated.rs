//! The federated endpoint of an org with `servers`, `{org}/mcp`: one
//! gateway session over all of them.
//!
//! A federated session is a client of sessions of its own, one per server
//! (the gateway's sessions of `org/server`, made and reached in-process,
//! through [`Gateway::dispatch`]). Each server's era is bridged by its own
//! route, as for any client; this file only fans out, names, merges and
//! routes (the pure part is `crate::federation`). Requests servers send
//! the client (on a POST's stream, or on the server sessions' GET streams,
//! which feed the federated session's) get ids naming their server, and
//! the client's answers go back to it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::audit::{Entry, Outcome};
use crate::federation::{self, Dropped, ListKind, Opened, Page};
use crate::policy::Kind as Item;
use crate::routes::{Federation, Member};
use crate::upstream::{AnswerReader, ReadLimits};

/// 2026-07-28 clients.
mod modern;

/// Protocol version a federated session speaks when its client asks for
/// one the gateway does not.
const LATEST: &str = "2025-11-25";

/// How often the watch checks whether the servers of federations answer.
pub(crate) const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Times one answer of a server session is resumed, at most.
const MAX_RESUMES: u32 = 10;

/// How long a server session's GET stream feed waits before reopening.
const FEED_RETRY: Duration = Duration::from_millis(500);

/// What federated endpoints keep between requests, on this node.
#[derive(Default)]
pub(super) struct Federations {
    /// Requests of federated sessions running at a server, for their
    /// cancellation: (session, request id) → server name.
    running: DashMap<(String, Id), Arc<str>>,
    /// Servers (by route key) found not answering.
    down: DashMap<Arc<str>, ()>,
    /// Federated sessions whose servers' GET streams feed theirs here.
    feeds: DashMap<String, CancellationToken>,
}

/// A federated request: the federation, the caller, the request.
#[derive(Clone, Copy)]
struct Fed<'a> {
    fed: &'a Arc<Federation>,
    identity: &'a Arc<Identity>,
    req: &'a Request,
}

/// What a server answered to one request.
enum Answer {
    Json(Bytes),
    /// Refused with an HTTP status of its own (a 403 to step up).
    Refused(Reject),
    /// A stream, read message by message, from server `server`.
    Stream {
        server: Arc<str>,
        reader: Box<AnswerReader>,
        /// The call's audit entry, which the stream's end finishes.
        audit: Option<Box<Entry>>,
    },
}

/// A [`Fed`] that outlives its request, for the work it leaves running
/// (answers streamed after the response head, the feeds of a stream).
#[derive(Clone)]
struct FedOwned {
    fed: Arc<Federation>,
    identity: Arc<Identity>,
    req: Arc<Request>,
}

impl FedOwned {
    fn fed(&self) -> Fed<'_> {
        Fed {
            fed: &self.fed,
            identity: &self.identity,
            req: &self.req,
        }
    }
}

/// A server a request cannot reach, and why.
fn unavailable(fed: &Federation, member: &Member, why: &str) -> Reject {
    Reject::new(
        StatusCode::BAD_GATEWAY,
        code::UPSTREAM_ERROR,
        format!(
            "server '{}' of org '{}' is unavailable: {why}",
            member.name, fed.name
        ),
    )
}

impl Fed<'_> {
    fn owned(&self) -> FedOwned {
        FedOwned {
            fed: self.fed.clone(),
            identity: self.identity.clone(),
            req: Arc::new(self.req.clone()),
        }
    }

    fn member(&self, name: &str) -> Option<(usize, &Member)> {
        self.fed
            .members
            .iter()
            .enumerate()
            .find(|(_, m)| *m.name == *name)
    }
}

impl Gateway {
    pub(super) async fn federated(
        self: &Arc<Self>,
        fed: &Arc<Federation>,
        identity: &Arc<Identity>,
        endpoint: Endpoint,
        req: &Request,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        let f = Fed { fed, identity, req };
        match (endpoint, &req.method) {
            (Endpoint::Mcp, &Method::POST) => self.fed_post(f, label).await,
            (Endpoint::Mcp, &Method::GET) => self.fed_get(f).await,
            (Endpoint::Mcp, &Method::DELETE) => self.fed_delete(f).await,
            (Endpoint::Mcp, m) => Err(Reject::method_not_allowed(m, "GET, POST, DELETE, OPTIONS")),
            (Endpoint::Sse, &Method::GET) => self.fed_sse(f).await,
            (Endpoint::Sse, m) => Err(Reject::method_not_allowed(m, "GET, OPTIONS")),
            (Endpoint::Messages, &Method::POST) => self.fed_messages(f, label).await,
            (Endpoint::Messages, m) => Err(Reject::method_not_allowed(m, "POST, OPTIONS")),
            (Endpoint::Ws, _) => Err(websocket::upgrade_required()),
        }
    }

    /// `/sse` (2024-11-05): a federated session whose stream lives exactly
    /// as long as it; its servers are opened at `initialize`.
    async fn fed_sse(self: &Arc<Self>, f: Fed<'_>) -> Result<Response, Reject> {
        if f.req.headers.contains_key(http::header::ACCEPT) {
            edge::check_get_framing(&f.req.headers)?;
        }
        let front: &Front = f.fed;
        let (session, live) = self.open_legacy(front, f.identity).await?;
        self.ensure_feeds(f, &session);
        Ok(self.legacy_stream(live, f.identity, &session))
    }

    /// `/messages` (2024-11-05): answered 202 at once; the answers go on
    /// the `/sse` stream.
    async fn fed_messages(
        self: &Arc<Self>,
        f: Fed<'_>,
        label: &mut Label,
    ) -> Result<Response, Reject> {
        let id = f.req.query_param("session_id");
        let session = self
            .session_of(&f.fed.key, f.identity, id.as_deref(), Transport::LegacySse)
            .await?;
        let log = self.session_log(&session, false).await?;
        edge::check_json_content_type(&f.req.headers)?;
        let body = parse_post_body(&f.req.body)?;
        label.method = body_label(&body);
        self.check_batch(&body, "2024-11-05", true)?;
        self.rate_limit_federated(f.fed, f.identity, &body).await?;
        let (this, owned) = (self.clone(), f.owned());
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let f = owned.fed();
            let mut session = session;
            for m in body.messages() {
                if m.method() == Some("initialize") && m.is_request() {
                    let answer = this.fed_legacy_initialize(f, &session, m).await;
                    if let Ok(Some(now)) = this.store.lookup(&session.id).await {
                        session = now;
                    }
                    let _ = this.append(&log, STANDALONE, &answer, f.fed);
                } else if m.is_request() {
                    let answer = this.fed_answer(f, &session, m).await;
                    if !matches!(answer, Answer::Stream { .. }) {
                        this.write_answer(f, &session, &log, STANDALONE, answer, m.request_id())
                            .await;
                        continue;
                    }
                    // Streamed answers arrive as their servers send them.
                    let (this, owned, s, l) =
                        (this.clone(), owned.clone(), session.clone(), log.clone());
                    let id = m.request_id().cloned();
                    tokio::spawn(tracing::Instrument::in_current_span(async move {
                        this.write_answer(owned.fed(), &s, &l, STANDALONE, answer, id.as_ref())
                            .await;
                    }));
                } else {
                    this.fed_absorb(f, &session, m).await;
                }
            }
        }));
        Ok(Response::json(
            StatusCode::ACCEPTED,
            Bytes::from_static(b"{}"),
        ))
    }

    /// `initialize` of a 2024-11-05 client: its servers are opened now.
    async fn fed_legacy_initialize(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        init: &Message,
    ) -> Bytes {
        let id = init.request_id();
        let params = init.params().unwrap_or(Value::Null);
        if let Err(r) = self.check_client_data(f.fed, &params) {
            return r.with_id(id).body();
        }
        let version = params
            .get("protocolVersion")
            .and_then(Value::as_str)
            .filter(|v| edge::SUPPORTED_VERSIONS.contains(v))
            .unwrap_or("2024-11-05")
            .to_owned();
        let (members, opened) = self.open_members(f, init.raw.clone()).await;
        let (v, p) = (version.clone(), params.clone());
        let change = |s: &mut SessionState| {
            s.protocol_version.clone_from(&v);
            s.set_client(&p);
            s.members.clone_from(&members);
        };
        match self.store.update(&session.id, &change).await {
            Ok(true) => {}
            _ => {
                let mut lost = session.clone();
                lost.members = members;
                self.end_members(&lost).await;
                return session_not_found().with_id(id).body();
            }
        }
        let previous: Vec<&String> = session.members.values().collect();
        if !previous.is_empty() {
            // A second initialize: the first one's server sessions go.
            let mut old = session.clone();
            old.members
                .retain(|_, child| !members_contain(&members, child));
            self.end_members(&old).await;
        }
        let result = federation::initialize_result(&f.fed.name, &version, &opened);
        jsonrpc::result_body(id, result)
    }

    async fn fed_post(self: &Arc<Self>, f: Fed<'_>, label: &mut Label) -> Result<Response, Reject> {
        let headers = &f.req.headers;
        edge::check_post_framing(headers)?;
        let body = parse_post_body(&f.req.body)?;
        label.method = body_label(&body);
        self.rate_limit_federated(f.fed, f.identity, &body).await?;
        if !headers.contains_key(&MCP_SESSION_ID)
            && let Body::Single(m) = &body
        {
            let params = m.params();
            if crate::era::speaks_modern(headers, m.method(), params.as_ref()) {
                return self.fed_modern(f, m, params).await;
            }
        }
        if let Some(init) = self.initialize_in(headers, &body)? {
            return self.fed_initialize(f, init).await;
        }
        let session = self.fed_session(f).await?;
        let log = self.session_log(&session, false).await?;
        self.check_batch(&body, &session.protocol_version, true)?;
        let mut requests = Vec::new();
        for m in body.messages() {
            if m.is_request() {
                requests.push(m.clone());
            } else {
                self.fed_absorb(f, &session, m).await;
            }
        }
        let front: &Front = f.fed;
        match requests.as_slice() {
            [] => Ok(Response::empty(StatusCode::ACCEPTED)),
            [only] => match self.fed_answer(f, &session, only).await {
                Answer::Json(body) if edge::prefers_sse(headers) => {
                    self.post_stream_of(front, &session, log, &body)
                }
                Answer::Json(body) => Ok(Response::json(StatusCode::OK, body)),
                Answer::Refused(reject) => Err(reject),
                answer @ Answer::Stream { .. } => {
                    let stream = log.begin_stream().map_err(|_| session_not_found())?;
                    let (this, owned, s, l) =
                        (self.clone(), f.owned(), session.clone(), log.clone());
                    let id = only.request_id().cloned();
                    tokio::spawn(tracing::Instrument::in_current_span(async move {
                        this.write_answer(owned.fed(), &s, &l, stream, answer, id.as_ref())
                            .await;
                        l.end_stream(stream);
                    }));
                    Ok(self.post_stream_response(front, &session, log, stream))
                }
            },
            _ => {
                // A batch (2025-03-26): every answer on one stream, in turn.
                let stream = log.begin_stream().map_err(|_| session_not_found())?;
                let (this, owned, s, l) = (self.clone(), f.owned(), session.clone(), log.clone());
                tokio::spawn(tracing::Instrument::in_current_span(async move {
                    let f = owned.fed();
                    for m in &requests {
                        let answer = this.fed_answer(f, &s, m).await;
                        this.write_answer(f, &s, &l, stream, answer, m.request_id())
                            .await;
                    }
                    l.end_stream(stream);
                }));
                Ok(self.post_stream_response(front, &session, log, stream))
            }
        }
    }

    /// Writes an answer into `stream` of the federated session: at once,
    /// or as its server streams it.
    async fn write_answer(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        log: &SessionLog,
        stream: StreamId,
        answer: Answer,
        id: Option<&Id>,
    ) {
        let front: &Front = f.fed;
        match answer {
            Answer::Json(body) => {
                let _ = self.append(log, stream, &body, front);
            }
            Answer::Refused(reject) => {
                let _ = self.append(log, stream, &reject.body(), front);
            }
            Answer::Stream {
                server,
                reader,
                audit,
            } => {
                self.relay_member(f, session, log, stream, &server, reader, id, audit)
                    .await;
            }
        }
    }

    /// The caller's federated session.
    async fn fed_session(&self, f: Fed<'_>) -> Result<Arc<SessionState>, Reject> {
        let id = f.req.header(&MCP_SESSION_ID);
        self.session_of(&f.fed.key, f.identity, id, Transport::StreamableHttp)
            .await
    }

    /// `initialize`: every server opened at once, each within its own
    /// timeout; one that does not answer is left out (its features appear
    /// when it is back).
    async fn fed_initialize(
        self: &Arc<Self>,
        f: Fed<'_>,
        init: &Message,
    ) -> Result<Response, Reject> {
        let id = init.request_id();
        let params = init.params().unwrap_or(Value::Null);
        let fed: &Front = f.fed;
        self.check_client_data(fed, &params)
            .map_err(|r| r.with_id(id))?;
        self.store
            .admits(&fed.key, &f.identity.subject, self.admission())
            .await
            .map_err(|e| self.session_reject(fed, e).with_id(id))?;
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        let version = match asked {
            Some(v) if edge::SUPPORTED_VERSIONS.contains(&v) && v != "2024-11-05" => v,
            _ => LATEST,
        };
        let (members, opened) = self.open_members(f, init.raw.clone()).await;
        let session_id = session::mint_id();
        let mut state = SessionState::new(
            session_id.clone(),
            &fed.key,
            f.identity,
            Transport::StreamableHttp,
            version.to_owned(),
        );
        state.set_client(&params);
        state.members = members;
        if let Err(reject) = self.create_session(state.clone()).await {
            self.end_members(&state).await;
            return Err(reject.with_id(id));
        }
        let result = federation::initialize_result(&fed.name, version, &opened);
        let header = session_header(&session_id)?;
        Ok(
            Response::json(StatusCode::OK, jsonrpc::result_body(id, result))
                .with_header(MCP_SESSION_ID, header),
        )
    }

    /// Opens a session at every server at once, each with `init` (the
    /// client's initialize); those that answer, and what they answered.
    async fn open_members(
        self: &Arc<Self>,
        f: Fed<'_>,
        init: Bytes,
    ) -> (BTreeMap<String, String>, Vec<Opened>) {
        let opens = f
            .fed
            .members
            .iter()
            .map(|m| self.open_member(f, m, init.clone()));
        let mut members = BTreeMap::new();
        let mut opened = Vec::new();
        let results = futures::future::join_all(opens).await;
        for (m, result) in f.fed.members.iter().zip(results) {
            match result {
                Ok((child, result)) => {
                    members.insert(m.name.to_string(), child);
                    opened.push(Opened {
                        server: m.name.to_string(),
                        result,
                    });
                }
                Err(why) => {
                    tracing::warn!(org = %f.fed.name, server = %m.name, "federated session opened without this server: {why}");
                }
            }
        }
        (members, opened)
    }

    /// Opens a session at server `member` with `init` (an initialize
    /// request), and tells it the client is initialized: its id, and
    /// the server's initialize result.
    async fn open_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        member: &Member,
        init: Bytes,
    ) -> Result<(String, Value), String> {
        let limits = member.route.server.pool.read_limits;
        let req = self.member_request(f, member, Method::POST, None, None, init);
        let opened = tokio::time::timeout(limits.timeout, self.at_member(f, member, &req)).await;
        let response = match opened {
            Err(_) => return Err(format!("no answer within {:?}", limits.timeout)),
            Ok(Err(reject)) => return Err(reject.message),
            Ok(Ok(response)) => response,
        };
        let child = response
            .headers
            .get(&MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match &response.body {
            edge::ResponseBody::Full(body) => serde_json::from_slice::<Value>(body).ok(),
            _ => None,
        };
        let (Some(child), Some(body)) = (child, body) else {
            return Err(format!(
                "answered initialize with HTTP {} and no session",
                response.status
            ));
        };
        let Some(result) = body.get("result").cloned() else {
            return Err(format!(
                "refused initialize: {}",
                body.get("error").unwrap_or(&Value::Null)
            ));
        };
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(LATEST)
            .to_owned();
        let initialized =
            Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let req = self.member_request(
            f,
            member,
            Method::POST,
            Some(&child),
            Some(&version),
            initialized,
        );
        if let Err(reject) = self.at_member(f, member, &req).await {
            tracing::debug!(server = %member.name, "notifications/initialized refused: {}", reject.message);
        }
        Ok((child, result))
    }

    /// A request to server `member` in the caller's name: the client's
    /// headers, but the MCP ones of the server session.
    fn member_request(
        &self,
        f: Fed<'_>,
        member: &Member,
        method: Method,
        session: Option<&str>,
        version: Option<&str>,
        body: Bytes,
    ) -> Request {
        // The client's headers, but its credentials and what names its
        // own session and body: one pass, no look-up per dropped name.
        let dropped = [
            http::header::AUTHORIZATION,
            http::header::COOKIE,
            http::header::CONTENT_LENGTH,
            http::header::ORIGIN,
            http::header::ACCEPT,
            http::header::CONTENT_TYPE,
            MCP_SESSION_ID,
            edge::MCP_PROTOCOL_VERSION,
            LAST_EVENT_ID,
        ];
        let mut headers = http::HeaderMap::with_capacity(f.req.headers.len() + 4);
        for (name, value) in &f.req.headers {
            if !dropped.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut put = |name: http::HeaderName, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        if method == Method::GET {
            put(http::header::ACCEPT, "text/event-stream");
        } else {
            put(http::header::ACCEPT, "application/json, text/event-stream");
            put(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(session) = session {
            put(MCP_SESSION_ID, session);
        }
        if let Some(version) = version {
            put(edge::MCP_PROTOCOL_VERSION, version);
        }
        Request {
            method,
            path: self.live().routes.path_of(&member.route.key, Endpoint::Mcp),
            query: None,
            headers,
            body,
            request_id: f.req.request_id.clone(),
            parsed: None,
        }
    }

    /// Serves `req` at server `member`'s endpoint, in-process.
    async fn at_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        member: &Member,
        req: &Request,
    ) -> Result<Response, Reject> {
        let call = Call {
            client: false,
            ..Call::new(&member.route, f.identity, req)
        };
        let mut label = Label {
            org: None,
            method: "federated",
        };
        Box::pin(self.dispatch(call, Endpoint::Mcp, req, &mut label)).await
    }

    /// The federated session's session at server `i`, opened now if it
    /// has none yet (the server was down, or its session ended).
    async fn member_session(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        i: usize,
        reopen: bool,
    ) -> Result<String, String> {
        let member = &f.fed.members[i];
        if !reopen && let Some(child) = session.members.get(&*member.name) {
            return Ok(child.clone());
        }
        let init = json!({
            "jsonrpc": "2.0",
            "id": "ratatosk-federation",
            "method": "initialize",
            "params": {
                "protocolVersion": session.protocol_version,
                "capabilities": session.client_capabilities.clone().unwrap_or_else(|| json!({})),
                "clientInfo": session.client_info.clone().unwrap_or_else(|| json!({"name": "federated client", "version": "0"})),
            },
        });
        let (child, _) = self
            .open_member(f, member, Bytes::from(init.to_string()))
            .await?;
        let name = member.name.to_string();
        let set = |s: &mut SessionState| {
            s.members.insert(name.clone(), child.clone());
        };
        match self.store.update(&session.id, &set).await {
            Ok(true) => Ok(child),
            _ => {
                // The federated session ended meanwhile.
                let _ = self
                    .end_session(&child, "its federated session ended")
                    .await;
                Err("the session ended".into())
            }
        }
    }

    /// Refuses at once a request to a server the watch found down.
    fn check_up(&self, fed: &Federation, member: &Member) -> Result<(), Reject> {
        if self.federations.down.contains_key(&member.route.key) {
            return Err(unavailable(fed, member, "it does not answer"));
        }
        Ok(())
    }

    /// Sends one message to server `i` in the federated session (as it is
    /// parsed: the server's endpoint does not read it again); its session
    /// there is reopened once if it has ended.
    async fn to_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        i: usize,
        message: Message,
    ) -> Result<Response, Reject> {
        let member = &f.fed.members[i];
        let unavailable = |why: String| unavailable(f.fed, member, &why);
        self.check_up(f.fed, member)?;
        let mut reopen = false;
        loop {
            let child = self
                .member_session(f, session, i, reopen)
                .await
                .map_err(unavailable)?;
            let mut req = self.member_request(
                f,
                member,
                Method::POST,
                Some(&child),
                Some(&session.protocol_version),
                message.raw.clone(),
            );
            req.parsed = Some(Body::Single(message.clone()));
            match self.at_member(f, member, &req).await {
                Err(r) if r.code == code::SESSION_NOT_FOUND && !reopen => reopen = true,
                Err(r) => {
                    // Down as the watch sees it: no replica takes a
                    // connection (a server that answers badly stays listed).
                    if r.code == code::UPSTREAM_ERROR
                        && r.status == StatusCode::BAD_GATEWAY
                        && !member.route.server.pool.accepts_connections().await
                    {
                        self.member_down(f.fed, member);
                    }
                    return Err(r);
                }
                Ok(response) => return Ok(response),
            }
        }
    }

    /// Sends `request` to server `i` and takes its answer.
    async fn ask_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        i: usize,
        request: Message,
    ) -> Answer {
        let member = &f.fed.members[i];
        let id = request.request_id().cloned();
        let id = id.as_ref();
        match self.to_member(f, session, i, request).await {
            Err(reject) => Answer::Json(reject.with_id(id).body()),
            Ok(response) => match response.body {
                edge::ResponseBody::Full(body) => Answer::Json(body),
                edge::ResponseBody::Stream(source) => Answer::Stream {
                    audit: None,
                    server: member.name.clone(),
                    reader: Box::new(read_member(
                        source,
                        member.route.server.pool.read_limits,
                        &member.name,
                    )),
                },
                edge::ResponseBody::Empty | edge::ResponseBody::Upgrade(_) => {
                    Answer::Json(jsonrpc::error_body(
                        id,
                        code::UPSTREAM_ERROR,
                        &format!(
                            "server '{}' answered HTTP {} without a body",
                            member.name, response.status
                        ),
                    ))
                }
            },
        }
    }

    /// One request of the client.
    async fn fed_answer(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        request: &Message,
    ) -> Answer {
        let id = request.request_id();
        let method = request.method().unwrap_or_default();
        let error =
            |code: i64, message: String| Answer::Json(jsonrpc::error_body(id, code, &message));
        if method == "ping" {
            return Answer::Json(jsonrpc::result_body(id, json!({})));
        }
        if let Some(kind) = ListKind::of_method(method) {
            return Answer::Json(self.fed_list(f, session, id, kind, request).await);
        }
        if let Some(kind @ (Item::Tool | Item::Prompt)) = crate::policy::kind_of_method(method) {
            return self.fed_named(f, session, request, kind).await;
        }
        let Ok(mut message) = serde_json::from_slice::<Value>(&request.raw) else {
            return error(code::PARSE_ERROR, "the request is not JSON".into());
        };
        let params = message.get_mut("params");
        // What the policy decides on: the server's own name, or a URI.
        let mut check: Option<(Item, String)> = None;
        let target = match method {
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                let Some(uri) = params.and_then(|p| p.get("uri")).and_then(Value::as_str) else {
                    return error(code::INVALID_PARAMS, format!("{method} needs params.uri"));
                };
                check = Some((Item::Resource, uri.to_owned()));
                match self.owner_of(f, session, uri).await {
                    Some(i) => Some(i),
                    None => return Answer::Json(resource_not_found(id, uri)),
                }
            }
            "completion/complete" => {
                let reference = params.and_then(|p| p.get_mut("ref"));
                match reference {
                    Some(r) if r.get("type").and_then(Value::as_str) == Some("ref/prompt") => {
                        let name = r
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        match f.fed.naming.route(&name) {
                            Some((i, own)) => {
                                check = Some((Item::Prompt, own.to_owned()));
                                r["name"] = Value::String(own.to_owned());
                                Some(i)
                            }
                            None => {
                                return error(
                                    code::INVALID_PARAMS,
                                    format!("unknown prompt '{}'", jsonrpc::clip(&name, 128)),
                                );
                            }
                        }
                    }
                    Some(r) => {
                        let uri = r
                            .get("uri")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        self.owner_of(f, session, &uri).await
                    }
                    None => {
                        return error(
                            code::INVALID_PARAMS,
                            "completion/complete needs params.ref".into(),
                        );
                    }
                }
            }
            "logging/setLevel" => None,
            _ => {
                return error(
                    code::METHOD_NOT_FOUND,
                    format!(
                        "method '{}' is not served by a federated endpoint",
                        jsonrpc::clip(method, 64)
                    ),
                );
            }
        };
        let audited = policed::audited(method);
        let mut entry = None;
        if let (Some(i), Some((kind, own))) = (target, &check) {
            let call = audited.then(|| (method, message.get("params")));
            match self.permit_member(f, i, *kind, own, id, call) {
                Ok(e) => entry = e,
                Err(Refusal::Denied(body)) => return Answer::Json(body),
                Err(Refusal::StepUp(reject)) => return Answer::Refused(reject),
            }
        }
        let request = Message {
            kind: request.kind.clone(),
            raw: Bytes::from(message.to_string()),
        };
        let Some(i) = target else {
            // logging/setLevel: every server.
            let all =
                (0..f.fed.members.len()).map(|i| self.ask_member(f, session, i, request.clone()));
            futures::future::join_all(all).await;
            return Answer::Json(jsonrpc::result_body(id, json!({})));
        };
        self.fed_route(f, session, i, request, entry).await
    }

    /// A `tools/call` or `prompts/get` (of `kind`): the name it gives is
    /// routed, and rewritten to the server's own in the raw bytes; nothing
    /// else of the request is parsed (its params only for an audit that
    /// shows arguments).
    async fn fed_named(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        request: &Message,
        kind: Item,
    ) -> Answer {
        let id = request.request_id();
        let method = request.method().unwrap_or_default();
        let Some((name, span)) = jsonrpc::param_name(&request.raw) else {
            return Answer::Json(jsonrpc::error_body(
                id,
                code::INVALID_PARAMS,
                &format!("{method} needs params.name, a string"),
            ));
        };
        let Some((i, own)) = f.fed.naming.route(&name) else {
            return Answer::Json(jsonrpc::error_body(
                id,
                code::INVALID_PARAMS,
                &format!("unknown {} '{}'", kind.as_str(), jsonrpc::clip(&name, 128)),
            ));
        };
        let params = self
            .audit
            .shows_arguments()
            .then(|| request.params())
            .flatten();
        let audited = policed::audited(method).then_some((method, params.as_ref()));
        let entry = match self.permit_member(f, i, kind, own, id, audited) {
            Ok(e) => e,
            Err(Refusal::Denied(body)) => return Answer::Json(body),
            Err(Refusal::StepUp(reject)) => return Answer::Refused(reject),
        };
        let request = Message {
            kind: request.kind.clone(),
            raw: jsonrpc::replace_string(&request.raw, span, own),
        };
        self.fed_route(f, session, i, request, entry).await
    }

    /// `request` (in the server's names) to server `i`; its answer ends
    /// the audit `entry`, if any.
    async fn fed_route(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        i: usize,
        request: Message,
        mut entry: Option<Box<Entry>>,
    ) -> Answer {
        let id = request.request_id().cloned();
        let id = id.as_ref();
        let running = id.map(|id| (session.id.clone(), id.clone()));
        if let Some(key) = &running {
            self.federations
                .running
                .insert(key.clone(), f.fed.members[i].name.clone());
        }
        let ask = self.ask_member(f, session, i, request);
        let mut answer = policed::served_in(&mut entry, ask).await;
        if let (Some(key), Answer::Json(_)) = (&running, &answer) {
            self.federations.running.remove(key);
        }
        match &mut answer {
            Answer::Json(body) => {
                if let Some(entry) = &entry {
                    let (outcome, code) = Outcome::of_response(body);
                    self.audit.record(entry, outcome, code);
                }
            }
            Answer::Stream { audit, .. } => *audit = entry,
            Answer::Refused(_) => {}
        }
        answer
    }

    /// [`Gateway::permit`] for server `i`'s `own` item of `kind`.
    fn permit_member(
        &self,
        f: Fed<'_>,
        i: usize,
        kind: Item,
        own: &str,
        id: Option<&Id>,
        audited: Option<(&str, Option<&Value>)>,
    ) -> Result<Option<Box<Entry>>, Refusal> {
        let member = &f.fed.members[i];
        let who = Asker {
            front: f.fed,
            server: Some(&member.name),
            policy: &member.route.policy,
            identity: f.identity,
            request_id: &f.req.request_id,
        };
        self.permit(who, kind, own, id, audited)
    }

    /// The server that owns resource (or resource template) `uri`, as the
    /// lists tell: asked of every server's resources lists.
    async fn owner_of(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        uri: &str,
    ) -> Option<usize> {
        if f.fed.members.len() == 1 {
            return Some(0);
        }
        for kind in [ListKind::Resources, ListKind::Templates] {
            let pages = self.list_pages(f, session, kind, None).await;
            if let Some(i) = owner_in(f, kind, pages, uri) {
                return Some(i);
            }
        }
        None
    }

    /// A merged list, with the gateway's cursor.
    async fn fed_list(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        id: Option<&Id>,
        kind: ListKind,
        request: &Message,
    ) -> Bytes {
        let cursor = request
            .params()
            .and_then(|p| p.get("cursor").and_then(Value::as_str).map(str::to_owned));
        let cursors = match cursor {
            None => None,
            Some(c) => match federation::decode_cursor(&c) {
                Some(map) => Some(map),
                None => {
                    return jsonrpc::error_body(
                        id,
                        code::INVALID_PARAMS,
                        "params.cursor is not a cursor this endpoint gave out",
                    );
                }
            },
        };
        let pages = self.list_pages(f, session, kind, cursors).await;
        let result = self.merged_list(f, kind, pages);
        jsonrpc::result_body(id, result)
    }

    /// The result of a list: the pages merged, what was left out logged
    /// and counted, and the gateway's cursor to the rest.
    fn merged_list(&self, f: Fed<'_>, kind: ListKind, mut pages: Vec<(usize, Page)>) -> Value {
        // Only what the caller may use is listed.
        for (i, page) in &mut pages {
            let policy = &f.fed.members[*i].route.policy;
            policy.retain_allowed(f.identity, kind.field(), &mut page.items);
        }
        let next: BTreeMap<String, String> = pages
            .iter()
            .filter_map(|(i, p)| Some((f.fed.members[*i].name.to_string(), p.next.clone()?)))
            .collect();
        let merged = federation::merge(&f.fed.naming, kind, pages);
        for dropped in &merged.dropped {
            let (server, name, why) = match dropped {
                Dropped::Clash { server, name } => (*server, name, "clash"),
                Dropped::Invalid { server, name } => (*server, name, "invalid"),
            };
            let member = &f.fed.members[server];
            tracing::warn!(org = %f.fed.name, server = %member.name, name = %name, "left out of the federated {}: {why}", kind.field());
            self.metrics
                .federation_dropped
                .with_label_values(&[&f.fed.name, &member.name, why])
                .inc();
        }
        let mut result = json!({ kind.field(): merged.items });
        if let Some(cursor) = federation::encode_cursor(&next) {
            result["nextCursor"] = Value::String(cursor);
        }
        result
    }

    /// One page of `kind` of each server that answers (`cursors`: the
    /// servers still to go on, and where).
    async fn list_pages(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        kind: ListKind,
        cursors: Option<BTreeMap<String, String>>,
    ) -> Vec<(usize, Page)> {
        let wanted: Vec<(usize, Option<String>)> = match cursors {
            None => (0..f.fed.members.len())
                .filter(|i| {
                    !self
                        .federations
                        .down
                        .contains_key(&f.fed.members[*i].route.key)
                })
                .map(|i| (i, None))
                .collect(),
            Some(map) => map
                .into_iter()
                .filter_map(|(name, c)| Some((f.member(&name)?.0, Some(c))))
                .collect(),
        };
        let asks = wanted.into_iter().map(|(i, cursor)| async move {
            let id = Id::from_value(&json!(format!("ratatosk-list-{:x}", rand::random::<u64>())))?;
            let mut params = json!({});
            if let Some(c) = cursor {
                params["cursor"] = Value::String(c);
            }
            let body = json!({"jsonrpc": "2.0", "id": id.to_value(), "method": kind.method(), "params": params});
            let request = Message {
                kind: Kind::Request { id: id.clone(), method: kind.method().to_owned() },
                raw: Bytes::from(body.to_string()),
            };
            let answer = self
                .ask_member(f, session, i, request)
                .await;
            let bytes = match answer {
                Answer::Json(b) => b,
                Answer::Refused(_) => return None,
                Answer::Stream { mut reader, .. } => reader.response_to(&id).await.ok().flatten()?,
            };
            let v: Value = serde_json::from_slice(&bytes).ok()?;
            match v.get("result") {
                Some(result) => Some((i, Page::of_result(kind, result)?)),
                None => {
                    tracing::debug!(server = %f.fed.members[i].name, "no {}: {}", kind.method(), v.get("error").unwrap_or(&serde_json::Value::Null));
                    None
                }
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// A notification or a response of the client.
    async fn fed_absorb(self: &Arc<Self>, f: Fed<'_>, session: &SessionState, m: &Message) {
        let all = 0..f.fed.members.len();
        let targets: Vec<usize> = match (&m.kind, m.method()) {
            (Kind::Response { id }, _) => {
                let value = id.to_value();
                let Some((server, own)) = federation::server_id(&value) else {
                    tracing::debug!(id = %id.as_json(), "an answer to no server's request; dropped");
                    return;
                };
                let Some((i, _)) = f.member(server) else {
                    return;
                };
                let Ok(mut answer) = serde_json::from_slice::<Value>(&m.raw) else {
                    return;
                };
                answer["id"] = own;
                self.send_to(f, session, &[i], Bytes::from(answer.to_string()))
                    .await;
                return;
            }
            // Each server session was told when it opened.
            (_, Some("notifications/initialized")) => return,
            (_, Some("notifications/cancelled")) => {
                let running = m
                    .params()
                    .and_then(|p| p.get("requestId").and_then(Id::from_value))
                    .and_then(|id| self.federations.running.remove(&(session.id.clone(), id)))
                    .and_then(|(_, server)| f.member(&server).map(|(i, _)| i));
                match running {
                    Some(i) => vec![i],
                    None => all.collect(),
                }
            }
            _ => all.collect(),
        };
        self.send_to(f, session, &targets, m.raw.clone()).await;
    }

    /// Sends a notification or a response to servers `targets`.
    async fn send_to(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        targets: &[usize],
        body: Bytes,
    ) {
        let sends = targets.iter().map(|i| {
            let body = body.clone();
            async move {
                if let Some(child) = session.members.get(&*f.fed.members[*i].name) {
                    let member = &f.fed.members[*i];
                    let req = self.member_request(f, member, Method::POST, Some(child), Some(&session.protocol_version), body);
                    if let Err(r) = self.at_member(f, member, &req).await {
                        tracing::debug!(server = %member.name, "a client message was refused: {}", r.message);
                    }
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Copies a server's streamed answer into a stream of the federated
    /// session, with its requests' ids naming the server; a failure before
    /// the response to `pending` becomes its error. A server session that
    /// closes the stream before the response (a stateful server polling
    /// its client) is resumed with `Last-Event-ID`, as a client would.
    #[allow(clippy::too_many_arguments)]
    async fn relay_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        log: &SessionLog,
        stream: StreamId,
        server: &str,
        mut reader: Box<AnswerReader>,
        pending: Option<&Id>,
        audit: Option<Box<Entry>>,
    ) {
        let fed: &Front = f.fed;
        let mut answered = false;
        let mut failure = None;
        let mut ended = (Outcome::Error, None);
        let mut resumes = 0;
        loop {
            match reader.next_message().await {
                Ok(Some(message)) => {
                    let (out, response_to) = to_client(server, &message);
                    answered |= response_to.is_some() && response_to.as_ref() == pending;
                    if answered {
                        ended = Outcome::of_response(&message);
                    }
                    if self.append(log, stream, &out, fed).is_err() || answered {
                        break;
                    }
                }
                Ok(None) => {
                    let running = pending.is_some_and(|id| {
                        self.federations
                            .running
                            .contains_key(&(session.id.clone(), id.clone()))
                    });
                    if !running || resumes >= MAX_RESUMES {
                        break;
                    }
                    let Some((last, retry)) = reader
                        .resume_point()
                        .map(|(id, retry)| (id.to_owned(), retry))
                    else {
                        break;
                    };
                    match self.resume_member(f, session, server, &last, retry).await {
                        Some(more) => {
                            reader = more;
                            resumes += 1;
                        }
                        None => break,
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let Some(id) = pending else { return };
        // A request the client cancelled left `running` then: it gets no
        // response (the server's stream ends without one).
        let cancelled = self
            .federations
            .running
            .remove(&(session.id.clone(), id.clone()))
            .is_none();
        if let Some(entry) = &audit {
            match (answered, cancelled) {
                (true, _) => self.audit.record(entry, ended.0, ended.1),
                (false, true) => self.audit.record(entry, Outcome::Cancelled, None),
                (false, false) => {
                    self.audit
                        .record(entry, Outcome::Error, Some(code::UPSTREAM_ERROR))
                }
            }
        }
        if !answered && !cancelled {
            let why = failure.unwrap_or_else(|| {
                format!("server '{server}' ended its answer without a response")
            });
            let body = jsonrpc::error_body(Some(id), code::UPSTREAM_ERROR, &why);
            let _ = self.append(log, stream, &body, fed);
        }
    }

    /// The rest of a server session's answer, after event `last`, by a GET
    /// with `Last-Event-ID` (after the `retry` the server asked for).
    async fn resume_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        session: &SessionState,
        server: &str,
        last: &str,
        retry: Option<Duration>,
    ) -> Option<Box<AnswerReader>> {
        let (_, member) = f.member(server)?;
        let child = session.members.get(server)?;
        if let Some(wait) = retry {
            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
        }
        let mut req = self.member_request(
            f,
            member,
            Method::GET,
            Some(child),
            Some(&session.protocol_version),
            Bytes::new(),
        );
        req.headers
            .insert(LAST_EVENT_ID, HeaderValue::from_str(last).ok()?);
        match self.at_member(f, member, &req).await {
            Ok(Response {
                body: edge::ResponseBody::Stream(source),
                ..
            }) => Some(Box::new(read_member(
                source,
                member.route.server.pool.read_limits,
                server,
            ))),
            _ => None,
        }
    }

    /// GET: the federated session's stream, which the GET streams of its
    /// server sessions feed.
    async fn fed_get(self: &Arc<Self>, f: Fed<'_>) -> Result<Response, Reject> {
        let headers = &f.req.headers;
        edge::check_get_framing(headers)?;
        edge::protocol_version(headers)?;
        let session = self.fed_session(f).await?;
        let front: &Front = f.fed;
        let (log, attach) = self
            .attach_standalone(front, &session, f.req.header(&LAST_EVENT_ID))
            .await?;
        self.ensure_feeds(f, &session);
        let mut live = self.live_stream(front, &session, log, attach, None);
        self.end_with_token(&mut live, f.identity);
        Ok(Response::sse(Box::new(live)))
    }

    /// DELETE: the federated session ends, and its server sessions too.
    async fn fed_delete(self: &Arc<Self>, f: Fed<'_>) -> Result<Response, Reject> {
        let session = self.fed_session(f).await?;
        self.end_session(&session.id, "deleted by the client")
            .await
            .map_err(store_reject)?;
        Ok(Response::empty(StatusCode::NO_CONTENT))
    }

    /// Ends the server sessions of a federated session that ended, and the
    /// feeds of its stream.
    pub(super) async fn end_members(&self, state: &SessionState) {
        if let Some((_, token)) = self.federations.feeds.remove(&state.id) {
            token.cancel();
        }
        for child in state.members.values() {
            match self.store.remove(child).await {
                Ok(Some(child)) => self.forget_session(&child, "its federated session ended"),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(session = %short(child), error = %e, "cannot end a server session of a federated session");
                }
            }
        }
    }

    /// Starts, once per session on this node, the feeds of its stream:
    /// one per server, each holding the GET stream of its session there.
    fn ensure_feeds(self: &Arc<Self>, f: Fed<'_>, session: &SessionState) {
        let token = match self.federations.feeds.entry(session.id.clone()) {
            dashmap::Entry::Occupied(_) => return,
            dashmap::Entry::Vacant(v) => v.insert(CancellationToken::new()).clone(),
        };
        let owned = f.owned();
        for i in 0..f.fed.members.len() {
            let (this, owned) = (self.clone(), owned.clone());
            let (session, token) = (session.id.clone(), token.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = this.feed(owned.fed(), &session, i) => {}
                }
            });
        }
    }

    /// Holds the GET stream of the federated session's session at server
    /// `i`, and copies what it says into the federated session's stream,
    /// until the federated session ends.
    async fn feed(self: &Arc<Self>, f: Fed<'_>, session_id: &str, i: usize) {
        let member = &f.fed.members[i];
        let mut resume: Option<String> = None;
        loop {
            if !self.still_a_member(f.fed, member) {
                // A reload took the server out of the federation.
                return;
            }
            let Ok(Some(session)) = self.store.lookup(session_id).await else {
                return;
            };
            let Some(child) = session.members.get(&*member.name).cloned() else {
                // Not open there (yet): a later list opens it.
                tokio::time::sleep(FEED_RETRY).await;
                continue;
            };
            let mut req = self.member_request(
                f,
                member,
                Method::GET,
                Some(&child),
                Some(&session.protocol_version),
                Bytes::new(),
            );
            if let Some(last) = &resume
                && let Ok(v) = HeaderValue::from_str(last)
            {
                req.headers.insert(LAST_EVENT_ID, v);
            }
            match self.at_member(f, member, &req).await {
                Ok(Response {
                    body: edge::ResponseBody::Stream(source),
                    ..
                }) => {
                    let limits = bridge::background::listen_limits(&member.route);
                    let mut reader = read_member(source, limits, &member.name);
                    while let Ok(Some(message)) = reader.next_message().await {
                        let (out, _) = to_client(&member.name, &message);
                        match self.hub.publish(session_id, &out).await {
                            Ok(Some(_)) => {}
                            _ => return,
                        }
                    }
                    resume = reader
                        .resume_point()
                        .map(|(id, _)| id.to_owned())
                        .or(resume);
                }
                Ok(_) => {}
                Err(r) if r.code == code::SESSION_NOT_FOUND => {
                    // Its session there ended: the next request reopens it.
                    resume = None;
                    let name = member.name.to_string();
                    let gone = |s: &mut SessionState| {
                        if s.members.get(&name) == Some(&child) {
                            s.members.remove(&name);
                        }
                    };
                    let _ = self.store.update(session_id, &gone).await;
                }
                Err(r) => {
                    tracing::debug!(server = %member.name, "the server session's stream is refused: {}", r.message);
                }
            }
            tokio::time::sleep(FEED_RETRY).await;
        }
    }

    /// Whether the running config still has `member` in `fed`'s org.
    fn still_a_member(&self, fed: &Federation, member: &Member) -> bool {
        let live = self.live();
        live.routes
            .federation(&fed.name)
            .is_some_and(|now| now.members.iter().any(|m| m.name == member.name))
    }

    /// Takes a server out of its federation's lists until it answers again.
    fn member_down(self: &Arc<Self>, fed: &Federation, member: &Member) {
        if self
            .federations
            .down
            .insert(member.route.key.clone(), ())
            .is_none()
        {
            tracing::warn!(org = %fed.name, server = %member.name, "server does not answer: left out of the federated endpoint");
            self.lists_changed(fed);
        }
    }

    /// Tells every federated session of `fed` on this node that its lists
    /// changed.
    pub(super) fn lists_changed(self: &Arc<Self>, fed: &Federation) {
        let ids: Vec<String> = self
            .federations
            .feeds
            .iter()
            .map(|e| e.key().clone())
            .collect();
        let key = fed.key.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let mut told = 0;
            for id in ids {
                let Ok(Some(state)) = this.store.lookup(&id).await else {
                    continue;
                };
                if *state.org != *key {
                    continue;
                }
                this.publish_lists_changed(&id).await;
                told += 1;
            }
            tracing::debug!(org = %key, sessions = told, "federated sessions told that the lists changed");
        });
    }

    /// Tells session `id` that its tools, prompts and resources may have
    /// changed.
    pub(super) async fn publish_lists_changed(&self, id: &str) {
        const NOTES: [&[u8]; 3] = [
            br#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
            br#"{"jsonrpc":"2.0","method":"notifications/prompts/list_changed"}"#,
            br#"{"jsonrpc":"2.0","method":"notifications/resources/list_changed"}"#,
        ];
        for note in NOTES {
            let _ = self.hub.publish(id, note).await;
        }
    }

    /// Checks the servers of every federation, every [`WATCH_EVERY`]:
    /// one that stops answering leaves the lists, one that answers again
    /// comes back, each with `list_changed` to the federated sessions.
    pub async fn watch_members(self: Arc<Self>) {
        while !self.is_draining() {
            // The running config's: a reload may change them.
            let federations: Vec<Arc<Federation>> =
                self.live().routes.federations().cloned().collect();
            for fed in &federations {
                for member in &fed.members {
                    let up = member.route.server.pool.accepts_connections().await;
                    let was_down = self.federations.down.contains_key(&member.route.key);
                    if up && was_down {
                        self.federations.down.remove(&member.route.key);
                        tracing::info!(org = %fed.name, server = %member.name, "server answers again: back in the federated endpoint");
                        self.lists_changed(fed);
                    } else if !up && !was_down {
                        self.member_down(fed, member);
                    }
                }
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }
}

/// Reads a server session's streamed answer (an in-process response).
fn read_member(source: Box<dyn ChunkSource>, limits: ReadLimits, server: &str) -> AnswerReader {
    let chunks = futures::stream::unfold(source, |mut source| async move {
        let chunk = source.next_chunk().await?;
        source.written();
        Some((Ok::<Bytes, std::io::Error>(chunk), source))
    });
    AnswerReader::from_sse_body(chunks, limits, server)
}

/// A server's message as the client sees it: the server's requests get
/// ids naming it. Also, the id it answers, if it is a response.
fn to_client(server: &str, message: &Bytes) -> (Bytes, Option<Id>) {
    let Ok(parsed) = jsonrpc::parse_message(message) else {
        return (message.clone(), None);
    };
    match parsed.kind {
        Kind::Request { id, .. } => {
            let Ok(mut v) = serde_json::from_slice::<Value>(message) else {
                return (message.clone(), None);
            };
            v["id"] = federation::client_id(server, &id.to_value());
            (Bytes::from(v.to_string()), None)
        }
        Kind::Response { id } => (message.clone(), Some(id)),
        Kind::Notification { .. } => (message.clone(), None),
    }
}

/// The answer to a request for a resource no server lists.
fn resource_not_found(id: Option<&Id>, uri: &str) -> Bytes {
    jsonrpc::error_body(
        id,
        code::RESOURCE_NOT_FOUND,
        &format!("resource '{}' not found", jsonrpc::clip(uri, 256)),
    )
}

/// The server whose `kind` list (resources, or templates) in `pages` has
/// `uri`, or a template it fits.
fn owner_in(f: Fed<'_>, kind: ListKind, pages: Vec<(usize, Page)>, uri: &str) -> Option<usize> {
    let merged = federation::merge(&f.fed.naming, kind, pages);
    merged
        .owners
        .iter()
        .find(|(owned, _)| {
            if kind == ListKind::Resources {
                owned == uri
            } else {
                template_matches(owned, uri)
            }
        })
        .map(|(_, i)| *i)
}

fn members_contain(members: &BTreeMap<String, String>, child: &str) -> bool {
    members.values().any(|c| c == child)
}

/// Whether `uri` fits a URI template (RFC 6570, level 1 enough: each
/// `{var}` matches one or more characters).
fn template_matches(template: &str, uri: &str) -> bool {
    let mut rest = uri;
    let mut parts = template.split('{');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(r) = rest.strip_prefix(first) else {
        return false;
    };
    rest = r;
    for part in parts {
        let Some((_, literal)) = part.split_once('}') else {
            return false;
        };
        if literal.is_empty() {
            return !rest.is_empty();
        }
        match rest.get(1..).and_then(|r| r.find(literal)) {
            Some(at) => rest = &rest[at + 1 + literal.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
pub(in crate::gateway) mod tests {
    use super::*;
    use crate::gateway::tests::{json_of, post_to, text_until};
    use crate::session::MemorySessionStore;
    use crate::testing;
    use std::path::Path;

    /// A stateless server `name` with tools `x` and `y`, whose calls answer
    /// the tool's name and the server's.
    pub(in crate::gateway) async fn server(name: &'static str) -> testing::Stub {
        testing::stub(move |body| {
            let id = testing::request_id(body);
            let text = String::from_utf8_lossy(body);
            let result = if text.contains("\"initialize\"") {
                format!(r#"{{"protocolVersion":"2025-06-18","capabilities":{{"tools":{{}}}},"serverInfo":{{"name":"{name}","version":"1"}},"instructions":"I am {name}."}}"#)
            } else if text.contains("\"tools/list\"") {
                r#"{"tools":[{"name":"x","inputSchema":{"type":"object"}},{"name":"y","inputSchema":{"type":"object"}}]}"#.into()
            } else if text.contains("\"tools/call\"") {
                let v: Value = serde_json::from_slice(body).expect("json");
                format!(r#"{{"content":[{{"type":"text","text":"{name}:{}"}}]}}"#, v["params"]["name"].as_str().expect("name"))
            } else {
                return (202, "application/json", String::new());
            };
            (200, "application/json", format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#))
        })
        .await
    }

    fn federation(a: &str, b: &str) -> Arc<Gateway> {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\npublish: {{secret: {}}}\n\
             orgs:\n  org-1:\n    servers:\n\
             \x20     a: {{upstream: {{era: stateless-2025, replicas: [\"{a}\"], timeout: 2s}}}}\n\
             \x20     b: {{upstream: {{era: stateless-2025, replicas: [\"{b}\"], timeout: 2s}}, prefix: bee}}\n",
            crate::gateway::tests::SECRET
        );
        let config = Config::from_yaml(&yaml, Path::new("unit.yaml"), &|_| None).expect("config");
        Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
    }

    const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"unit","version":"1"}}}"#;

    #[tokio::test]
    async fn one_session_lists_and_calls_the_tools_of_every_server() {
        let (a, b) = (server("a").await, server("b").await);
        let gw = federation(&a.url(), &b.url());
        let r = gw.handle(post_to("/gw/org-1/mcp", INIT, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        let init = json_of(&r);
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(
            init["result"]["instructions"],
            "Server `a`: I am a.\n\nServer `b`: I am b."
        );
        let sid = r.headers[&MCP_SESSION_ID]
            .to_str()
            .expect("ascii")
            .to_owned();
        let headers = [("mcp-session-id", sid.as_str())];
        let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
        let r = gw.handle(post_to("/gw/org-1/mcp", list, &headers)).await;
        let names: Vec<String> = json_of(&r)["result"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect();
        assert_eq!(names, ["a__x", "a__y", "bee__x", "bee__y"]);
        for (tool, said) in [("a__y", "a:y"), ("bee__x", "b:x")] {
            let call = format!(
                r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"{tool}"}}}}"#
            );
            let r = gw.handle(post_to("/gw/org-1/mcp", &call, &headers)).await;
            assert_eq!(json_of(&r)["result"]["content"][0]["text"], said, "{tool}");
        }
        let call = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"c__x"}}"#;
        let r = gw.handle(post_to("/gw/org-1/mcp", call, &headers)).await;
        assert_eq!(json_of(&r)["error"]["message"], "unknown tool 'c__x'");
        // Each server has a session of the federated one; they end with it.
        let state = gw
            .store
            .lookup(&sid)
            .await
            .expect("lookup")
            .expect("session");
        let children: Vec<String> = state.members.values().cloned().collect();
        assert_eq!(children.len(), 2);
        let r = gw
            .handle(crate::gateway::tests::request(
                Method::DELETE,
                "/gw/org-1/mcp",
                &headers,
                "",
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        for child in children {
            assert!(gw.store.lookup(&child).await.expect("lookup").is_none());
        }
        let _ = text_until;
    }

    #[tokio::test]
    async fn a_server_that_is_down_leaves_the_session_working() {
        let a = server("a").await;
        let gw = federation(&a.url(), &testing::dead_url());
        let r = gw.handle(post_to("/gw/org-1/mcp", INIT, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        let sid = r.headers[&MCP_SESSION_ID]
            .to_str()
            .expect("ascii")
            .to_owned();
        let headers = [("mcp-session-id", sid.as_str())];
        let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
        let r = gw.handle(post_to("/gw/org-1/mcp", list, &headers)).await;
        assert_eq!(
            json_of(&r)["result"]["tools"].as_array().map(Vec::len),
            Some(2)
        );
        let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"bee__x"}}"#;
        let r = gw.handle(post_to("/gw/org-1/mcp", call, &headers)).await;
        let error = json_of(&r)["error"]["message"]
            .as_str()
            .expect("error")
            .to_owned();
        assert!(
            error.starts_with("server 'b' of org 'org-1' is unavailable"),
            "{error}"
        );
    }

    #[test]
    fn templates_match_uris() {
        assert!(template_matches("file:///{path}", "file:///a/b"));
        assert!(!template_matches("file:///{path}", "file:///"));
        assert!(template_matches("t://{a}/x/{b}", "t://1/x/2"));
        assert!(!template_matches("t://{a}/x/{b}", "t://1/y/2"));
        assert!(template_matches("plain://x", "plain://x"));
        assert!(!template_matches("plain://x", "plain://xy"));
    }

    #[test]
    fn server_requests_get_ids_naming_the_server() {
        let (out, answered) = to_client(
            "files",
            &Bytes::from_static(br#"{"jsonrpc":"2.0","id":3,"method":"roots/list"}"#),
        );
        assert_eq!(answered, None);
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["id"], "files:3");
        let response = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"result":{}}"#);
        let (out, answered) = to_client("files", &response);
        assert_eq!(
            (out, answered.map(|i| i.as_json().to_owned())),
            (response, Some("7".into()))
        );
    }

    #[tokio::test]
    async fn an_openapi_server_joins_its_orgs_federated_endpoint() {
        use crate::edge::ResponseBody;
        // A REST API with one operation; it says which key it got.
        let api = testing::full_stub(|head, _| {
            let line = head.lines().next().unwrap_or_default().to_owned();
            let reply = |body: String| testing::Reply::new(200, "application/json", body);
            if line.starts_with("get /openapi.json") {
                return reply(r#"{"openapi":"3.1.0","info":{"title":"t","version":"1"},"paths":{"/items/{item_id}":{"get":{"operationId":"getItem","parameters":[{"name":"item_id","in":"path","required":true,"schema":{"type":"integer"}}],"responses":{"200":{"description":"ok"}}}}}}"#.into());
            }
            let key = head.lines().find_map(|l| l.strip_prefix("x-api-key: ")).unwrap_or("none");
            reply(format!(r#"{{"id":7,"key":"{key}"}}"#))
        })
        .await;
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\npublish: {{secret: unit-test-secret-0123}}\n\
             orgs:\n  team:\n    servers:\n      items:\n        openapi: {{spec: 'http://{}/openapi.json', operations: [getItem], \
             auth: {{mode: static, header: x-api-key, value: from-config}}}}\n",
            api.addr
        );
        let config =
            crate::config::Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None)
                .expect("config");
        let gw = Gateway::new(config, Arc::new(crate::session::MemorySessionStore::new()))
            .expect("gateway");
        let post = |body: String, sid: Option<String>| {
            let gw = gw.clone();
            async move {
                let mut headers = vec![
                    ("content-type", "application/json"),
                    ("accept", "application/json, text/event-stream"),
                ];
                let sid = sid.unwrap_or_default();
                if !sid.is_empty() {
                    headers.push(("mcp-session-id", sid.as_str()));
                    headers.push(("mcp-protocol-version", "2025-06-18"));
                }
                let r = gw
                    .handle(testing::request(
                        http::Method::POST,
                        "/team/mcp",
                        &headers,
                        body,
                    ))
                    .await;
                let sid = r
                    .headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = match r.body {
                    ResponseBody::Full(b) => {
                        serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)
                    }
                    _ => Value::Null,
                };
                (sid, body)
            }
        };
        let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"unit","version":"1"}}}"#;
        let (sid, answer) = post(init.into(), None).await;
        assert_eq!(
            answer["result"]["protocolVersion"], "2025-06-18",
            "{answer}"
        );
        let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_owned();
        let (_, answer) = post(list, sid.clone()).await;
        assert_eq!(
            answer["result"]["tools"][0]["name"], "items__getItem",
            "{answer}"
        );
        let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"items__getItem","arguments":{"item_id":7}}}"#;
        let (_, answer) = post(call.into(), sid).await;
        // The API got the server's credential, not the caller's.
        assert_eq!(
            answer["result"]["structuredContent"]["key"], "from-config",
            "{answer}"
        );
    }
}
