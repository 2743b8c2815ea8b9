use super::*;
use crate::testing;

/// A FastAPI-like 3.1 document.
const DOC_3_1: &str = r##"{
  "openapi": "3.1.0",
  "info": {"title": "Items", "version": "1.2", "description": "Keeps items."},
  "paths": {
    "/items": {
      "get": {"operationId": "listItems", "summary": "List items",
        "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}, "description": "At most this many"}],
        "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}}}}}},
      "post": {"operationId": "createItem",
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewItem"}}}},
        "responses": {"201": {"description": "made", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}}}}}
    },
    "/items/{item_id}": {
      "parameters": [{"name": "item_id", "in": "path", "required": true, "schema": {"type": "integer"}}],
      "get": {"operationId": "getItem", "parameters": [{"name": "X-Trace", "in": "header", "schema": {"type": "string"}}],
        "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}}}}},
      "delete": {"operationId": "deleteItem", "responses": {"204": {"description": "gone"}}}
    },
    "/health": {"get": {"responses": {"200": {"description": "no id"}}}}
  },
  "components": {"schemas": {
    "Item": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "tags": {"type": "array", "items": {"$ref": "#/components/schemas/Tag"}}}, "required": ["id", "name"]},
    "NewItem": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    "Tag": {"type": "string"},
    "Unused": {"type": "string"}
  }}
}"##;

fn parse(doc: &str, ops: &[&str], base: Option<&str>) -> Api {
    let ops: Vec<String> = ops.iter().map(|s| s.to_string()).collect();
    let source = url::Url::parse("http://127.0.0.1:9/openapi.json").expect("url");
    Api::parse(doc, Some(&source), &allowed(&ops).expect("globs"), base).expect("api")
}

fn tool<'a>(api: &'a Api, name: &str) -> &'a Value {
    &api.operations[name].tool
}

#[test]
fn allowed_operations_become_tools_with_schemas() {
    let api = parse(DOC_3_1, &["*Item", "listItems"], None);
    // deleteItem matches `*Item`; /health has no operation id.
    let names: Vec<&String> = api.operations.keys().collect();
    assert_eq!(names, ["createItem", "deleteItem", "getItem", "listItems"]);
    let api = parse(DOC_3_1, &["listItems", "getItem", "createItem"], None);
    assert_eq!(api.operations.len(), 3);
    assert_eq!(api.base.as_str(), "http://127.0.0.1:9/");

    let get = tool(&api, "getItem");
    let input = &get["inputSchema"];
    assert_eq!(input["type"], "object");
    assert_eq!(input["additionalProperties"], false);
    assert_eq!(input["required"], json!(["item_id"]));
    assert_eq!(input["properties"]["item_id"]["type"], "integer");
    assert_eq!(input["properties"]["X-Trace"]["type"], "string");
    assert!(input.get("$defs").is_none(), "{input}");
    // The answer's schema, with what it refers to (and nothing else).
    let output = &get["outputSchema"];
    // MCP's output schemas have `type: object` at the top: the `$ref` is
    // replaced by its schema.
    assert_eq!(output["type"], "object");
    assert!(output.get("$ref").is_none(), "{output}");
    assert_eq!(output["required"], json!(["id", "name"]));
    let defs: Vec<&String> = output["$defs"].as_object().expect("defs").keys().collect();
    assert_eq!(defs, ["Item", "Tag"]);
    assert_eq!(
        output["$defs"]["Item"]["properties"]["tags"]["items"]["$ref"],
        "#/$defs/Tag"
    );
    assert_eq!(get["annotations"]["readOnlyHint"], true);

    let list = tool(&api, "listItems");
    assert_eq!(list["title"], "List items");
    assert_eq!(list["description"], "List items");
    assert_eq!(
        list["inputSchema"]["properties"]["limit"]["description"],
        "At most this many"
    );
    assert!(list["inputSchema"].get("required").is_none());
    // An array answer: wrapped, as MCP's output schemas are objects'.
    assert_eq!(list["outputSchema"]["type"], "object");
    assert_eq!(list["outputSchema"]["required"], json!(["result"]));
    assert_eq!(
        list["outputSchema"]["properties"]["result"]["type"],
        "array"
    );

    let create = tool(&api, "createItem");
    assert_eq!(create["inputSchema"]["required"], json!(["body"]));
    assert_eq!(
        create["inputSchema"]["properties"]["body"]["$ref"],
        "#/$defs/NewItem"
    );
    assert_eq!(create["annotations"]["readOnlyHint"], false);
    assert_eq!(create["description"], "POST /items");
}

#[test]
fn a_3_0_document_is_read_as_3_1() {
    let doc = r##"
openapi: 3.0.3
info: {title: Old, version: "1"}
servers: [{url: /v2}]
paths:
  /things/{id}:
    get:
      operationId: getThing
      parameters: [{$ref: "#/components/parameters/Id"}]
      responses:
        "200":
          description: ok
          content:
            application/json:
              schema: {type: object, properties: {note: {type: string, nullable: true}, size: {type: number, minimum: 0, exclusiveMinimum: true}}}
components:
  parameters:
    Id: {name: id, in: path, required: true, schema: {type: string}}
"##;
    let api = parse(doc, &["getThing"], None);
    // A relative server URL, against the document's.
    assert_eq!(api.base.as_str(), "http://127.0.0.1:9/v2");
    let t = tool(&api, "getThing");
    assert_eq!(t["inputSchema"]["properties"]["id"]["type"], "string");
    let props = &t["outputSchema"]["properties"];
    assert_eq!(props["note"]["type"], json!(["string", "null"]));
    assert_eq!(props["size"]["exclusiveMinimum"], 0);
    assert!(props["size"].get("minimum").is_none());
    // A server at another origin than the document's is not called
    // unless `base_url` says so.
    let elsewhere = doc.replace(
        "servers: [{url: /v2}]",
        "servers: [{url: 'https://api.example.com/v2'}]",
    );
    let source = url::Url::parse("http://127.0.0.1:9/openapi.yaml").expect("url");
    let all = allowed(&["*".into()]).expect("glob");
    let e = Api::parse(&elsewhere, Some(&source), &all, None).expect_err("refused");
    assert!(
        e.contains("another origin (https://api.example.com)"),
        "{e}"
    );
    let ok = Api::parse(
        &elsewhere,
        Some(&source),
        &all,
        Some("https://api.example.com/v2"),
    )
    .expect("api");
    assert_eq!(ok.base.as_str(), "https://api.example.com/v2");
    // Headers the gateway sets are no arguments.
    for name in [
        "Ratatosk-Subject",
        "host",
        "Authorization",
        "x-api-key",
        "Traceparent",
    ] {
        assert!(
            is_reserved_header(name, Some(&http::HeaderName::from_static("x-api-key"))),
            "{name}"
        );
    }
    assert!(!is_reserved_header("x-request-tag", None));
    let swagger = r#"{"swagger": "2.0", "info": {"title": "x", "version": "1"}, "paths": {}}"#;
    let e = Api::parse(swagger, None, &allowed(&["*".into()]).expect("glob"), None)
        .expect_err("refused");
    assert!(e.contains("Swagger 2.0"), "{e}");
}

#[test]
fn arguments_become_a_request_or_a_precise_error() {
    let api = parse(DOC_3_1, &["*"], Some("http://127.0.0.1:9/api/"));
    let call = api
        .call("getItem", Some(&json!({"item_id": 7, "X-Trace": "t 1"})))
        .expect("call");
    assert_eq!(call.method, http::Method::GET);
    assert_eq!(call.url.as_str(), "http://127.0.0.1:9/api/items/7");
    assert_eq!(call.headers[0].0.as_str(), "x-trace");
    assert_eq!(call.what, "GET /items/{item_id}");
    let call = api
        .call("listItems", Some(&json!({"limit": 5})))
        .expect("call");
    assert_eq!(call.url.as_str(), "http://127.0.0.1:9/api/items?limit=5");
    assert_eq!(call.body, None);
    let call = api
        .call("createItem", Some(&json!({"body": {"name": "a/b"}})))
        .expect("call");
    assert_eq!(call.method, http::Method::POST);
    assert_eq!(call.body.as_deref(), Some(br#"{"name":"a/b"}"#.as_slice()));
    // Path values are one segment, escaped.
    let call = api
        .call("deleteItem", Some(&json!({"item_id": 3})))
        .expect("call");
    assert_eq!(call.url.path(), "/api/items/3");

    for (name, args, says) in [
        ("getItem", json!({}), "missing required argument `item_id`"),
        (
            "getItem",
            json!({"item_id": "seven"}),
            "`item_id`: expected integer, got a string (\"seven\")",
        ),
        (
            "getItem",
            json!({"item_id": 1, "color": "red"}),
            "unknown argument `color`; expected item_id, X-Trace",
        ),
        ("createItem", json!({}), "missing required argument `body`"),
        (
            "listItems",
            json!({"limit": 1.5}),
            "`limit`: expected integer, got a number",
        ),
    ] {
        match api.call(name, Some(&args)) {
            Err(CallError::Arguments(message)) => {
                assert!(message.contains(says), "{name} {args}: {message}");
                assert!(
                    message.starts_with(&format!("invalid arguments for `{name}`")),
                    "{message}"
                );
            }
            other => panic!("{name} {args}: {other:?}"),
        }
    }
    // No path value reaches another path than the operation's.
    for value in ["..", ".", "", "a\tb"] {
        match api.call("deleteItem", Some(&json!({"item_id": value}))) {
            Err(CallError::Arguments(_)) => {}
            other => panic!("{value:?}: {other:?}"),
        }
    }
    let doc = DOC_3_1.replace(
        r#""required": true, "schema": {"type": "integer"}}],"#,
        r#""required": true, "schema": {"type": "string"}}],"#,
    );
    let lax = parse(&doc, &["*"], Some("http://127.0.0.1:9/api/"));
    for value in ["..", ".", "", ".\t."] {
        assert!(
            matches!(
                lax.call("deleteItem", Some(&json!({"item_id": value}))),
                Err(CallError::Arguments(_))
            ),
            "{value:?}"
        );
    }
    let call = lax
        .call("deleteItem", Some(&json!({"item_id": "a/../b"})))
        .expect("call");
    assert_eq!(call.url.path(), "/api/items/a%2F..%2Fb");
    assert_eq!(
        api.call("nope", None),
        Err(CallError::UnknownTool("nope".into()))
    );
    assert!(matches!(
        api.call("listItems", Some(&json!([1]))),
        Err(CallError::Arguments(m)) if m.contains("expected an object of arguments, got an array")
    ));
}

#[test]
fn answers_become_results() {
    let api = parse(DOC_3_1, &["*"], None);
    let call = api
        .call("getItem", Some(&json!({"item_id": 1})))
        .expect("call");
    let ok = result_of(
        &call,
        http::StatusCode::OK,
        Some("application/json"),
        br#"{"id":1,"name":"a"}"#,
    );
    assert_eq!(ok["structuredContent"], json!({"id": 1, "name": "a"}));
    assert_eq!(ok["content"][0]["text"], r#"{"id":1,"name":"a"}"#);
    assert!(ok.get("isError").is_none());
    let list = api.call("listItems", None).expect("call");
    let ok = result_of(
        &list,
        http::StatusCode::OK,
        Some("application/json; charset=utf-8"),
        b"[1,2]",
    );
    assert_eq!(ok["structuredContent"], json!({"result": [1, 2]}));
    let refused = result_of(
        &call,
        http::StatusCode::NOT_FOUND,
        Some("application/json"),
        br#"{"detail":"Item not found"}"#,
    );
    assert_eq!(refused["isError"], true);
    assert_eq!(
        refused["content"][0]["text"],
        r#"the API answered HTTP 404 Not Found to GET /items/{item_id}: {"detail":"Item not found"}"#
    );
    // Its output schema promises JSON.
    let text = result_of(&call, http::StatusCode::OK, Some("text/plain"), b"hello");
    assert_eq!(text["isError"], true);
    assert!(
        text["content"][0]["text"]
            .as_str()
            .expect("text")
            .contains("not the JSON its document promises")
    );
    // Without one, text is text.
    let delete = api
        .call("deleteItem", Some(&json!({"item_id": 1})))
        .expect("call");
    let text = result_of(&delete, http::StatusCode::OK, Some("text/plain"), b"hello");
    assert_eq!(
        text,
        json!({"content": [{"type": "text", "text": "hello"}]})
    );
    let gone = result_of(&delete, http::StatusCode::NO_CONTENT, None, b"");
    assert_eq!(gone["content"][0]["text"], "HTTP 204 No Content (no body)");
}

/// A REST API stub: the document, and items.
async fn rest() -> testing::Stub {
    testing::full_stub(|head, body| {
        let line = head.lines().next().unwrap_or_default().to_owned();
        let reply = |status: u16, body: &str| {
            testing::Reply::new(status, "application/json", body.to_owned())
        };
        if line.starts_with("get /openapi.json") {
            return reply(200, DOC_3_1);
        }
        if line.starts_with("get /items/7 ") {
            // Says which credential it got.
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("x-api-key: "))
                .unwrap_or("none");
            return reply(200, &format!(r#"{{"id":7,"name":"seven","key":"{key}"}}"#));
        }
        if line.starts_with("post /items ") {
            let v: Value = serde_json::from_slice(body).expect("json");
            return reply(201, &json!({"id": 8, "name": v["name"]}).to_string());
        }
        reply(404, r#"{"detail":"Item not found"}"#)
    })
    .await
}

async fn ask(server: &OpenApiServer, body: Value) -> Value {
    use crate::upstream::LocalServer as _;
    let headers = testing::headers(&[("x-api-key", "k-123"), ("ratatosk-subject", "alice")]);
    let mut r = server
        .serve(
            http::Method::POST,
            headers,
            bytes::Bytes::from(body.to_string()),
        )
        .await
        .expect("answer");
    let body = r.chunk().await.expect("body").expect("a body");
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test]
async fn the_server_reads_the_document_and_calls_the_api() {
    let api = rest().await;
    let yaml = format!(
        "spec: http://{}/openapi.json\noperations: [getItem, createItem]\ntimeout: 2s\n\
         auth: {{mode: static, header: x-api-key, value: k-123}}\n",
        api.addr
    );
    let config: crate::config::OpenApiConfig = yaml_serde::from_str(&yaml).expect("config");
    let server = OpenApiServer::new("team/items", &config, 1 << 20).expect("server");
    let init = ask(&server, json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}})).await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(init["result"]["serverInfo"]["title"], "Items");
    assert_eq!(init["result"]["instructions"], "Keeps items.");
    let list = ask(
        &server,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["createItem", "getItem"]);
    let call = |id: u32, name: &str, args: Value| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": args}});
    let got = ask(&server, call(3, "getItem", json!({"item_id": 7}))).await;
    // The credential header reached the API.
    assert_eq!(
        got["result"]["structuredContent"],
        json!({"id": 7, "name": "seven", "key": "k-123"})
    );
    let made = ask(
        &server,
        call(4, "createItem", json!({"body": {"name": "new"}})),
    )
    .await;
    assert_eq!(
        made["result"]["structuredContent"],
        json!({"id": 8, "name": "new"})
    );
    let missing = ask(&server, call(5, "getItem", json!({"item_id": 9}))).await;
    assert_eq!(missing["result"]["isError"], true);
    assert!(
        missing["result"]["content"][0]["text"]
            .as_str()
            .expect("text")
            .contains("HTTP 404")
    );
    let unknown = ask(&server, call(6, "deleteItem", json!({"item_id": 9}))).await;
    assert_eq!(unknown["error"]["code"], -32602);
    let other = ask(
        &server,
        json!({"jsonrpc": "2.0", "id": 7, "method": "prompts/list"}),
    )
    .await;
    assert_eq!(other["error"]["code"], -32601);

    // An API that is gone: a tool error naming the call.
    let gone = format!(
        "spec: {}\nbase_url: {}\noperations: ['*']\ntimeout: 2s\n",
        file_doc(),
        testing::dead_url()
    );
    let config: crate::config::OpenApiConfig = yaml_serde::from_str(&gone).expect("config");
    let server = OpenApiServer::new("team/gone", &config, 1 << 20).expect("server");
    let failed = ask(&server, call(8, "getItem", json!({"item_id": 1}))).await;
    assert_eq!(failed["result"]["isError"], true);
    let text = failed["result"]["content"][0]["text"]
        .as_str()
        .expect("text");
    assert!(
        text.starts_with("the API did not answer GET /items/{item_id}: cannot connect"),
        "{text}"
    );
    // A document that cannot be read: the list says why.
    let config: crate::config::OpenApiConfig = yaml_serde::from_str(&format!(
        "spec: {}/openapi.json\noperations: ['*']\n",
        testing::dead_url()
    ))
    .expect("config");
    let server = OpenApiServer::new("team/nodoc", &config, 1 << 20).expect("server");
    let list = ask(
        &server,
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}),
    )
    .await;
    let message = list["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("the OpenAPI document of server 'team/nodoc'"),
        "{message}"
    );
}

/// DOC_3_1 in a file of its own.
fn file_doc() -> String {
    let path = std::env::temp_dir().join(format!("ratatosk-openapi-{}.json", std::process::id()));
    std::fs::write(&path, DOC_3_1).expect("write");
    path.display().to_string()
}

#[test]
fn openapi_servers_are_checked_as_the_config_is() {
    let config = |server: &str| {
        let yaml = format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\npublish: {{secret: unit-test-secret-0123}}\n\
             orgs:\n  team:\n    servers:\n      api: {server}\n"
        );
        crate::config::Config::from_yaml(&yaml, std::path::Path::new("unit.yaml"), &|_| None)
    };
    let problems = |server: &str| -> Vec<String> {
        let e = config(server).expect_err("refused");
        e.problems()
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    };
    let both = problems(
        "{openapi: {spec: 'http://127.0.0.1:9/o.json', operations: ['*']}, upstream: {era: auto, replicas: ['http://127.0.0.1:9/mcp']}}",
    );
    assert!(
        both[0].contains("either `upstream` or `openapi`"),
        "{both:?}"
    );
    let file = problems("{openapi: {spec: /nonexistent/o.json, operations: []}}");
    assert_eq!(file.len(), 3, "{file:?}");
    assert!(
        file[0]
            .starts_with("orgs.team.servers.api.openapi.base_url: required when `spec` is a file"),
        "{file:?}"
    );
    assert!(
        file[1].starts_with("orgs.team.servers.api.openapi.spec: cannot read"),
        "{file:?}"
    );
    assert!(
        file[2].starts_with("orgs.team.servers.api.openapi.operations"),
        "{file:?}"
    );
    let ok = config("{openapi: {spec: 'http://127.0.0.1:9/o.json', operations: ['get*']}}")
        .expect("config");
    let server = &ok.orgs["team"].servers["api"];
    assert_eq!(server.upstream.replicas, ["http://127.0.0.1:9"]);
    assert_eq!(server.upstream.era, crate::config::Era::Stateless2025);
}
