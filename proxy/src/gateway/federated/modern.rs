//! 2026-07-28 clients on a federated endpoint. They have no session: each
//! request goes, in-process and as the client sent it (a name and its
//! `Mcp-Name` unprefixed), to the servers' own endpoints, which bridge it
//! to each server's era. `server/discover` and the lists are merged; an
//! `InputRequiredResult`'s `requestState` names its server, and the retry
//! must reach that server; `subscriptions/listen` fans in every server's.

use tokio::sync::mpsc;

use super::*;
use crate::era::{self, MCP_NAME, MODERN_VERSION, MODERN_VERSIONS};

/// Where a routed request goes: the server, its `Mcp-Name` there, and what
/// the policy decides on.
type Target = (usize, Option<String>, Option<(Item, String)>);

/// The resource a request names, if it is routed by it: `resources/read`'s
/// URI, or a resource template's in `completion/complete`.
fn resource_uri<'b>(method: &str, body: &'b Value) -> Option<&'b str> {
    let params = body.get("params")?;
    match method {
        "resources/read" => params.get("uri")?.as_str(),
        "completion/complete" if params.pointer("/ref/type")?.as_str()? == "ref/resource" => {
            params.pointer("/ref/uri")?.as_str()
        }
        _ => None,
    }
}

/// Messages of a fanned-in stream waiting for the client, at most.
const FAN_IN_BUFFER: usize = 64;

impl Gateway {
    /// A 2026-07-28 request on a federated endpoint.
    pub(super) async fn fed_modern(
        self: &Arc<Self>,
        f: Fed<'_>,
        message: &Message,
        params: Option<Value>,
    ) -> Result<Response, Reject> {
        let Some((method, id, _)) =
            bridge::modern::checked_modern(&f.req.headers, message, params)?
        else {
            return Ok(Response::empty(StatusCode::ACCEPTED));
        };
        let json = |body: Bytes| Ok(Response::json(StatusCode::OK, body));
        if method == "server/discover" {
            return json(self.fed_discover(f, id, message).await);
        }
        if method == "ping" {
            return json(jsonrpc::result_body(
                Some(id),
                json!({"resultType": "complete"}),
            ));
        }
        if let Some(kind) = ListKind::of_method(method) {
            return json(self.fed_modern_list(f, id, kind, message).await);
        }
        if method == "subscriptions/listen" {
            return Ok(self.fed_listen(f, message));
        }
        let Ok(mut body) = serde_json::from_slice::<Value>(&message.raw) else {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                code::PARSE_ERROR,
                "the request is not JSON",
            ));
        };
        // A resource is routed to the server whose lists have it.
        let owner = match resource_uri(method, &body) {
            Some(uri) if f.fed.members.len() > 1 => {
                match self.modern_owner_of(f, message, uri).await {
                    Some(i) => Some(i),
                    None => return json(resource_not_found(Some(id), uri)),
                }
            }
            _ => None,
        };
        let (i, name, check) = self
            .modern_target(f, method, &mut body, owner)
            .map_err(|r| r.with_id(Some(id)))?;
        let mut entry = None;
        if let Some((kind, own)) = check {
            let audited = policed::audited(method).then(|| (method, body.get("params")));
            match self.permit_member(f, i, kind, &own, Some(id), audited) {
                Ok(e) => entry = e,
                Err(refusal) => return refusal.into_response(),
            }
        }
        let member = &f.fed.members[i];
        let ask = self.modern_to_member(f, member, Bytes::from(body.to_string()), name.as_deref());
        let answer = policed::served_in(&mut entry, ask)
            .await
            .map_err(|r| r.with_id(Some(id)))?;
        Ok(match answer.body {
            edge::ResponseBody::Full(body) => {
                if let Some(entry) = &entry {
                    let (outcome, code) = Outcome::of_response(&body);
                    self.audit.record(entry, outcome, code);
                }
                Response::json(
                    answer.status,
                    scope_state(&member.name, &body).unwrap_or(body),
                )
            }
            edge::ResponseBody::Stream(source) => {
                let limits = member.route.server.pool.read_limits;
                let mut reader = read_member(source, limits, &member.name);
                let server = member.name.clone();
                let this = self.clone();
                self.fan_in(move |tx| async move {
                    let mut ended = (Outcome::Cancelled, None);
                    while let Ok(Some(message)) = reader.next_message().await {
                        // Only the response can carry a requestState; the
                        // progress before it passes as it is.
                        let is_response = matches!(
                            jsonrpc::parse_message(&message).map(|m| m.kind),
                            Ok(Kind::Response { .. })
                        );
                        let out = if is_response {
                            ended = Outcome::of_response(&message);
                            scope_state(&server, &message).unwrap_or(message)
                        } else {
                            message
                        };
                        if tx.send(sse_frame(None, None, &out)).await.is_err() {
                            break;
                        }
                    }
                    if let Some(entry) = &entry {
                        this.audit.record(entry, ended.0, ended.1);
                    }
                })
            }
            edge::ResponseBody::Empty | edge::ResponseBody::Upgrade(_) => answer,
        })
    }

    /// Which server a routed request goes to, with its name (or URI)
    /// rewritten to the server's own, and a retry's `requestState` to the
    /// server's: the server, and what `Mcp-Name` becomes.
    /// `owner` is the server of the resource a request names, when there
    /// are several servers.
    fn modern_target(
        &self,
        f: Fed<'_>,
        method: &str,
        body: &mut Value,
        owner: Option<usize>,
    ) -> Result<Target, Reject> {
        let bad =
            |message: String| Reject::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, message);
        let params = body
            .get_mut("params")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| bad(format!("{method} needs params")))?;
        let (i, name, check) = match method {
            "tools/call" | "prompts/get" => {
                let full = params
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let what = if method == "tools/call" {
                    "tool"
                } else {
                    "prompt"
                };
                let (i, own) = f.fed.naming.route(&full).ok_or_else(|| {
                    bad(format!("unknown {what} '{}'", jsonrpc::clip(&full, 128)))
                })?;
                let own = own.to_owned();
                params.insert("name".into(), Value::String(own.clone()));
                let item = if method == "tools/call" {
                    Item::Tool
                } else {
                    Item::Prompt
                };
                (i, Some(own.clone()), Some((item, own)))
            }
            "completion/complete" => {
                let reference = params
                    .get_mut("ref")
                    .ok_or_else(|| bad("completion/complete needs params.ref".into()))?;
                let name = reference
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                match name {
                    Some(full) => {
                        let (i, own) = f.fed.naming.route(&full).ok_or_else(|| {
                            bad(format!("unknown prompt '{}'", jsonrpc::clip(&full, 128)))
                        })?;
                        reference["name"] = Value::String(own.to_owned());
                        let own = own.to_owned();
                        (i, None, Some((Item::Prompt, own)))
                    }
                    // A resource template's: its owner (found by its URI).
                    None => (owner.unwrap_or(0), None, None),
                }
            }
            "resources/read" => {
                let uri = params
                    .get("uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("resources/read needs params.uri".into()))?;
                (
                    owner.unwrap_or(0),
                    None,
                    Some((Item::Resource, uri.to_owned())),
                )
            }
            _ => {
                // 404, as a 2026-07-28 server answers a method it lacks.
                return Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    code::METHOD_NOT_FOUND,
                    format!("method '{}' not found", jsonrpc::clip(method, 64)),
                ));
            }
        };
        // A retry carries the state its server gave, scoped to it.
        if let Some(state) = params.get("requestState").and_then(Value::as_str) {
            let server = &*f.fed.members[i].name;
            let own = state
                .strip_prefix(server)
                .and_then(|s| s.strip_prefix(':'))
                .ok_or_else(|| bad("params.requestState was not given out for this tool".into()))?
                .to_owned();
            params.insert("requestState".into(), Value::String(own));
        }
        Ok((i, name, check))
    }

    /// Sends a modern request to a server's endpoint, in-process; `name`
    /// is its `Mcp-Name` there.
    async fn modern_to_member(
        self: &Arc<Self>,
        f: Fed<'_>,
        member: &Member,
        body: Bytes,
        name: Option<&str>,
    ) -> Result<Response, Reject> {
        self.check_up(f.fed, member)?;
        let mut req =
            self.member_request(f, member, Method::POST, None, Some(MODERN_VERSION), body);
        if let Some(name) = name
            && let Ok(v) = HeaderValue::from_str(name)
        {
            req.headers.insert(MCP_NAME, v);
        }
        self.at_member(f, member, &req).await
    }

    /// Sends a gateway-made modern request `method` to every server that
    /// answers; each one's result.
    async fn ask_all_modern(
        self: &Arc<Self>,
        f: Fed<'_>,
        message: &Message,
        method: &str,
        params: impl Fn(usize) -> Option<Value>,
    ) -> Vec<(usize, Value)> {
        let meta = message
            .params()
            .and_then(|p| p.get("_meta").cloned())
            .unwrap_or_else(|| json!({}));
        let asks = (0..f.fed.members.len()).filter_map(|i| {
            let mut p = params(i)?;
            p["_meta"] = meta.clone();
            Some(async move {
                let member = &f.fed.members[i];
                let id = json!(format!("ratatosk-{:x}", rand::random::<u64>()));
                let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": p});
                let mut req = self.member_request(
                    f,
                    member,
                    Method::POST,
                    None,
                    Some(MODERN_VERSION),
                    Bytes::from(body.to_string()),
                );
                if let Ok(v) = HeaderValue::from_str(method) {
                    req.headers.insert(era::MCP_METHOD, v);
                }
                req.headers.remove(MCP_NAME);
                if self.federations.down.contains_key(&member.route.key) {
                    return None;
                }
                let response = self.at_member(f, member, &req).await.ok()?;
                let bytes = match response.body {
                    edge::ResponseBody::Full(b) => b,
                    edge::ResponseBody::Stream(source) => {
                        let mut reader =
                            read_member(source, member.route.server.pool.read_limits, &member.name);
                        reader
                            .response_to(&Id::from_value(&id)?)
                            .await
                            .ok()
                            .flatten()?
                    }
                    edge::ResponseBody::Empty | edge::ResponseBody::Upgrade(_) => return None,
                };
                let v: Value = serde_json::from_slice(&bytes).ok()?;
                Some((i, v.get("result")?.clone()))
            })
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// `server/discover`, merged as `initialize` is.
    async fn fed_discover(self: &Arc<Self>, f: Fed<'_>, id: &Id, message: &Message) -> Bytes {
        let results = self
            .ask_all_modern(f, message, "server/discover", |_| Some(json!({})))
            .await;
        let opened: Vec<Opened> = results
            .into_iter()
            .map(|(i, result)| Opened {
                server: f.fed.members[i].name.to_string(),
                result,
            })
            .collect();
        let init = federation::initialize_result(&f.fed.name, MODERN_VERSION, &opened);
        let mut result = json!({
            "resultType": "complete",
            "supportedVersions": MODERN_VERSIONS,
            "capabilities": init["capabilities"],
            "ttlMs": 0,
            "cacheScope": "private",
            "_meta": {era::META_SERVER_INFO: init["serverInfo"]},
        });
        if let Some(instructions) = init.get("instructions") {
            result["instructions"] = instructions.clone();
        }
        jsonrpc::result_body(Some(id), result)
    }

    /// A merged list for a 2026-07-28 client.
    async fn fed_modern_list(
        self: &Arc<Self>,
        f: Fed<'_>,
        id: &Id,
        kind: ListKind,
        message: &Message,
    ) -> Bytes {
        let cursor = message
            .params()
            .and_then(|p| p.get("cursor").and_then(Value::as_str).map(str::to_owned));
        let cursors = match cursor.as_deref().map(federation::decode_cursor) {
            None => None,
            Some(Some(map)) => Some(map),
            Some(None) => {
                return jsonrpc::error_body(
                    Some(id),
                    code::INVALID_PARAMS,
                    "params.cursor is not a cursor this endpoint gave out",
                );
            }
        };
        let pages = self
            .modern_pages(f, message, kind, |i| match &cursors {
                None => Some(json!({})),
                Some(map) => map
                    .get(&*f.fed.members[i].name)
                    .map(|c| json!({"cursor": c})),
            })
            .await;
        let mut result = self.merged_list(f, kind, pages);
        result["resultType"] = Value::from("complete");
        // Lists are merged per caller (and filtered per caller once
        // policies apply): not for shared caches.
        result["ttlMs"] = Value::from(0);
        result["cacheScope"] = Value::from("private");
        jsonrpc::result_body(Some(id), result)
    }

    /// The server that owns resource (or resource template) `uri`, as the
    /// first pages of the servers' resources lists tell (asked as
    /// `message`'s client, with its `_meta`).
    async fn modern_owner_of(
        self: &Arc<Self>,
        f: Fed<'_>,
        message: &Message,
        uri: &str,
    ) -> Option<usize> {
        for kind in [ListKind::Resources, ListKind::Templates] {
            let pages = self
                .modern_pages(f, message, kind, |_| Some(json!({})))
                .await;
            if let Some(i) = owner_in(f, kind, pages, uri) {
                return Some(i);
            }
        }
        None
    }

    /// The servers' pages of list `kind`, asked (with `params`, per
    /// server) as `message`'s client.
    async fn modern_pages(
        self: &Arc<Self>,
        f: Fed<'_>,
        message: &Message,
        kind: ListKind,
        params: impl Fn(usize) -> Option<Value>,
    ) -> Vec<(usize, Page)> {
        self.ask_all_modern(f, message, kind.method(), params)
            .await
            .iter()
            .filter_map(|(i, r)| Some((*i, Page::of_result(kind, r)?)))
            .collect()
    }

    /// `subscriptions/listen`: every server's listen stream, in one.
    fn fed_listen(self: &Arc<Self>, f: Fed<'_>, message: &Message) -> Response {
        let (this, owned, body) = (self.clone(), f.owned(), message.raw.clone());
        self.fan_in(move |tx| async move {
            let f = owned.fed();
            let listens = f.fed.members.iter().map(|member| {
                let (tx, body, this) = (tx.clone(), body.clone(), this.clone());
                async move {
                    let Ok(Response {
                        body: edge::ResponseBody::Stream(source),
                        ..
                    }) = this.modern_to_member(f, member, body, None).await
                    else {
                        return;
                    };
                    let limits = bridge::background::listen_limits(&member.route);
                    let mut reader = read_member(source, limits, &member.name);
                    while let Ok(Some(message)) = reader.next_message().await {
                        if tx.send(sse_frame(None, None, &message)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            futures::future::join_all(listens).await;
        })
    }

    /// A streamed response whose chunks `fill` sends, in a task of its own,
    /// until it is done or the client is gone.
    fn fan_in<F, Fut>(&self, fill: F) -> Response
    where
        F: FnOnce(mpsc::Sender<Bytes>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(FAN_IN_BUFFER);
        let keepalive = self.live().config.streams.keepalive;
        tokio::spawn(fill(tx));
        Response::sse(Box::new(FanIn { rx, keepalive }))
    }
}

/// A stream fed through a channel, with keep-alive comments while idle.
struct FanIn {
    rx: mpsc::Receiver<Bytes>,
    keepalive: Duration,
}

#[async_trait]
impl ChunkSource for FanIn {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        match tokio::time::timeout(self.keepalive, self.rx.recv()).await {
            Ok(chunk) => chunk,
            Err(_) => Some(Bytes::from_static(b": keepalive\n\n")),
        }
    }
}

/// A server's message whose `result.requestState` is scoped to the
/// server: `None` if it has none.
fn scope_state(server: &str, message: &[u8]) -> Option<Bytes> {
    // Most answers have none: no parse for them.
    memchr::memmem::find(message, b"\"requestState\"")?;
    let mut v: Value = serde_json::from_slice(message).ok()?;
    let state = v.pointer("/result/requestState")?.as_str()?;
    let scoped = format!("{server}:{state}");
    v["result"]["requestState"] = Value::String(scoped);
    Some(Bytes::from(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::bridge::modern::tests::{json_of, modern};
    use crate::testing;

    /// A modern server `name` with resource `<name>://doc` and template
    /// `<name>://items/{id}`, whose reads answer the URI and its name.
    async fn resource_server(name: &'static str) -> testing::Stub {
        testing::stub(move |body| {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let params = &v["params"];
            let result = match v["method"].as_str().unwrap_or_default() {
                "resources/list" => {
                    json!({"resources": [{"uri": format!("{name}://doc"), "name": "doc"}]})
                }
                "resources/templates/list" => json!({"resourceTemplates": [
                    {"uriTemplate": format!("{name}://items/{{id}}"), "name": "item"}]}),
                "resources/read" => {
                    let uri = params["uri"].as_str().unwrap_or_default();
                    json!({"contents": [{"uri": uri, "text": format!("{name} has {uri}")}]})
                }
                "completion/complete" => json!({"completion": {"values": [name], "total": 1}}),
                _ => json!({}),
            };
            let mut result = result;
            result["resultType"] = json!("complete");
            let answer = json!({"jsonrpc": "2.0", "id": v["id"], "result": result});
            (200, "application/json", answer.to_string())
        })
        .await
    }

    #[tokio::test]
    async fn a_modern_clients_resource_reads_reach_the_server_that_lists_them() {
        let (a, b) = (resource_server("a").await, resource_server("b").await);
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\npublish: {{secret: {}}}\n\
             orgs:\n  org-1:\n    servers:\n\
             \x20     a: {{upstream: {{era: modern, replicas: [\"{}\"], timeout: 2s}}}}\n\
             \x20     b: {{upstream: {{era: modern, replicas: [\"{}\"], timeout: 2s}}}}\n",
            crate::gateway::tests::SECRET,
            a.url(),
            b.url()
        );
        let config =
            crate::config::Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None)
                .expect("config");
        let gw = Gateway::new(config, Arc::new(crate::session::MemorySessionStore::new()))
            .expect("gateway");
        for (uri, said) in [
            ("a://doc", "a has a://doc"),
            ("b://doc", "b has b://doc"),
            ("b://items/7", "b has b://items/7"),
        ] {
            let r = gw
                .handle(modern(
                    1,
                    "resources/read",
                    json!({"uri": uri}),
                    json!({}),
                    &[],
                ))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{uri}");
            assert_eq!(json_of(&r)["result"]["contents"][0]["text"], said, "{uri}");
        }
        let r = gw
            .handle(modern(
                2,
                "resources/read",
                json!({"uri": "c://doc"}),
                json!({}),
                &[],
            ))
            .await;
        assert_eq!(
            (
                json_of(&r)["error"]["code"].clone(),
                json_of(&r)["error"]["message"].clone()
            ),
            (json!(-32002), json!("resource 'c://doc' not found"))
        );
        // A template's completion goes to the server of the template.
        let complete = json!({"ref": {"type": "ref/resource", "uri": "b://items/{id}"},
                              "argument": {"name": "id", "value": "1"}});
        let r = gw
            .handle(modern(3, "completion/complete", complete, json!({}), &[]))
            .await;
        assert_eq!(json_of(&r)["result"]["completion"]["values"], json!(["b"]));
    }

    #[test]
    fn request_states_name_their_server() {
        let scoped = scope_state(
            "go",
            br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","requestState":"abc"}}"#,
        )
        .expect("scoped");
        let v: Value = serde_json::from_slice(&scoped).expect("json");
        assert_eq!(v["result"]["requestState"], "go:abc");
        assert!(scope_state("go", br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).is_none());
    }
}
