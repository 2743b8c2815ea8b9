use super::*;
use crate::gateway::federated::tests::server;
use crate::gateway::tests::{SECRET, json_of, post_to};
use crate::session::MemorySessionStore;
use std::path::Path;

const TEAM_SECRET: &str = "team-registration-secret";

/// Org `team` takes registrations and has server `fixed` in its file;
/// org `other` takes none.
fn config_text(fixed: &str, extra_servers: &str) -> String {
    format!(
        "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\npublish: {{secret: {SECRET}}}\n\
         orgs:\n  team:\n    registration: {{secret: {TEAM_SECRET}, max_ttl: 1m, max_servers: 3}}\n\
         \x20   rate_limits: [{{name: calls, rate: 1000/s}}]\n    servers:\n\
         \x20     fixed: {{upstream: {{era: stateless-2025, replicas: [\"{fixed}\"], timeout: 2s}}}}\n{extra_servers}\
         \x20 other:\n    servers:\n\
         \x20     only: {{upstream: {{era: stateless-2025, replicas: [\"{fixed}\"], timeout: 2s}}}}\n"
    )
}

fn config(text: &str) -> Config {
    Config::from_yaml(text, Path::new("unit.yaml"), &|_| None).expect("config")
}

fn gateway(fixed: &str) -> Arc<Gateway> {
    let config = config(&config_text(fixed, ""));
    Gateway::new(config, Arc::new(MemorySessionStore::new())).expect("gateway")
}

fn body(url: &str, ttl: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"upstream":{{"era":"stateless-2025","replicas":["{url}"]}},"ttl":"{ttl}"{extra}}}"#
    )
    .into_bytes()
}

/// The tools a new session of `team`'s federated endpoint lists.
async fn tools(gw: &Arc<Gateway>) -> Vec<String> {
    let r = gw
        .handle(post_to("/gw/team/mcp", crate::gateway::tests::INIT, &[]))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let sid = r.headers["mcp-session-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let r = gw
        .handle(post_to("/gw/team/mcp", list, &[("mcp-session-id", &sid)]))
        .await;
    json_of(&r)["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn a_registered_server_joins_the_federated_endpoint_until_it_expires() {
    let (fixed, extra) = (server("fixed").await, server("extra").await);
    let gw = gateway(&fixed.url());
    assert_eq!(tools(&gw).await, ["fixed__x", "fixed__y"]);
    let fixed_route = gw.live().routes.org("team/fixed").expect("route").clone();

    let (status, answer) = gw
        .register(
            "team",
            "extra",
            &body(&extra.url(), "1s", r#","prefix":"ex""#),
        )
        .await
        .expect("registered");
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(answer["result"], "registered");
    assert_eq!(answer["endpoint"], "http://127.0.0.1:1/gw/team/extra/mcp");
    // Served at once, on the federated endpoint and on its own.
    assert_eq!(tools(&gw).await, ["ex__x", "ex__y", "fixed__x", "fixed__y"]);
    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x"}}"#;
    let r = gw
        .handle(post_to(
            "/gw/team/extra/mcp",
            crate::gateway::tests::INIT,
            &[],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let sid = r.headers["mcp-session-id"].to_str().expect("ascii");
    let r = gw
        .handle(post_to(
            "/gw/team/extra/mcp",
            call,
            &[("mcp-session-id", sid)],
        ))
        .await;
    assert_eq!(json_of(&r)["result"]["content"][0]["text"], "extra:x");
    // The file's server kept its route (connections, health), and the org
    // its limits.
    let live = gw.live_full();
    let after = live.routes.org("team/fixed").expect("route");
    assert!(Arc::ptr_eq(after, &fixed_route));
    assert!(Arc::ptr_eq(
        &live.routes.federation("team").expect("federation").rates,
        &fixed_route.rates
    ));
    assert_eq!(
        gw.metrics
            .registered_servers
            .with_label_values(&["team"])
            .get(),
        1
    );

    // A renewal with the same config changes nothing.
    let generation = gw.live().generation;
    let (status, answer) = gw
        .register(
            "team",
            "extra",
            &body(&extra.url(), "1s", r#","prefix":"ex""#),
        )
        .await
        .expect("renewed");
    assert_eq!(
        (status, answer["result"].as_str()),
        (StatusCode::OK, Some("renewed"))
    );
    assert_eq!(gw.live().generation, generation);
    let listed = gw.servers_of("team").await.expect("listed");
    assert_eq!(listed["count"], 2, "{listed}");
    assert_eq!(listed["servers"][0]["source"], "config");
    assert_eq!(listed["servers"][1]["name"], "extra");
    assert_eq!(listed["servers"][1]["served"], true);

    // Not renewed: gone after its ttl.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.live().routes.org("team/extra").is_some() {
        assert!(
            Instant::now() < deadline,
            "still served 10 s after its 1 s ttl"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.sync_registrations().await.expect("synced");
    }
    assert_eq!(tools(&gw).await, ["fixed__x", "fixed__y"]);
    assert!(Arc::ptr_eq(
        gw.live().routes.org("team/fixed").expect("route"),
        &fixed_route
    ));
    assert_eq!(
        gw.metrics
            .registered_servers
            .with_label_values(&["team"])
            .get(),
        0
    );
}

#[tokio::test]
async fn bad_registrations_are_refused_naming_the_field() {
    let fixed = server("fixed").await;
    let gw = gateway(&fixed.url());
    let url = fixed.url();
    let refused = |org: &'static str, name: &'static str, body: Vec<u8>| {
        let gw = gw.clone();
        async move {
            match gw.register(org, name, &body).await {
                Ok(answer) => panic!("{org}/{name}: registered: {answer:?}"),
                Err(r) => (r.status, r.message),
            }
        }
    };
    let ok_body = || body(&url, "30s", "");
    for (org, name, body, status, says) in [
        ("nowhere", "a", ok_body(), 404, "unknown org 'nowhere'"),
        ("other", "a", ok_body(), 403, "orgs.other.registration"),
        ("team", "fixed", ok_body(), 409, "in its config file"),
        ("team", "a", b"{not json".to_vec(), 400, "must be a JSON object"),
        ("team", "a", b"[1]".to_vec(), 400, "expected a JSON object"),
        ("team", "a", br#"{"upstream":{}}"#.to_vec(), 400, "`ttl`: missing"),
        ("team", "a", body(&url, "2m", ""), 400, "`ttl`: expected between 1s and 1m"),
        ("team", "a", body(&url, "soon", ""), 400, "`ttl`: expected a duration"),
        ("team", "a", body(&url, "30s", r#","policy":[]"#), 400, "`policy`: unknown field"),
        ("team", "a", br#"{"ttl":"30s"}"#.to_vec(), 400, "`upstream`"),
        (
            "team",
            "a",
            br#"{"ttl":"30s","upstream":{"era":"stateless-2025","replicas":[]}}"#.to_vec(),
            400,
            "`upstream.replicas`: expected at least one replica URL",
        ),
        (
            "team",
            "a",
            br#"{"ttl":"30s","upstream":{"era":"2024","replicas":["http://127.0.0.1:1/mcp"]}}"#
                .to_vec(),
            400,
            "`upstream.era`",
        ),
        (
            "team",
            "a",
            br#"{"ttl":"30s","upstream":{"era":"auto","replicas":["http://127.0.0.1:1/mcp"],"tls":{"insecure_skip_verify":true}}}"#
                .to_vec(),
            400,
            "`upstream.tls`",
        ),
        (
            "team",
            "a",
            br#"{"ttl":"30s","upstream":{"era":"auto","replicas":["http://127.0.0.1:1/mcp"],"auth":{"mode":"token-exchange","audience":"billing"}}}"#
                .to_vec(),
            400,
            "`upstream.auth.mode`",
        ),
        ("team", "mcp", ok_body(), 400, "endpoint name"),
        ("team", "a", body(&url, "30s", r#","prefix":"fixed""#), 409, "prefix `fixed` is server 'fixed''s"),
        ("team", "a", body(&url, "30s", r#","prefix":"no spaces""#), 400, "`prefix`"),
    ] {
        let (got, message) = refused(org, name, body).await;
        assert_eq!(got.as_u16(), status, "{org}/{name}: {message}");
        assert!(message.contains(says), "{org}/{name}: {message}");
    }
    assert!(gw.live().routes.org("team/a").is_none());
    assert_eq!(
        gw.metrics
            .registrations
            .with_label_values(&["team", "refused"])
            .get(),
        15
    );

    // At most max_servers (3).
    for name in ["a", "b", "c"] {
        let prefix = format!(r#","prefix":"p{name}""#);
        gw.register("team", name, &body(&url, "30s", &prefix))
            .await
            .expect("registered");
    }
    let (status, message) = refused("team", "d", body(&url, "30s", r#","prefix":"pd""#)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(message.contains("max_servers"), "{message}");
    // Removed: a place is free, and the name is unknown.
    gw.deregister("team", "a").await.expect("removed");
    assert!(gw.live().routes.org("team/a").is_none());
    let r = gw.deregister("team", "a").await.expect_err("gone");
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = gw
        .deregister("team", "fixed")
        .await
        .expect_err("a file server");
    assert_eq!(r.status, StatusCode::CONFLICT);
    gw.register("team", "d", &body(&url, "30s", r#","prefix":"pd""#))
        .await
        .expect("registered");
}

#[tokio::test]
async fn a_reload_keeps_registrations_and_the_file_wins_a_name() {
    let (fixed, extra) = (server("fixed").await, server("extra").await);
    let gw = gateway(&fixed.url());
    gw.register("team", "extra", &body(&extra.url(), "30s", ""))
        .await
        .expect("registered");
    // The file changes elsewhere: the registered server stays.
    let text = config_text(&fixed.url(), "").replace("1000/s", "999/s");
    gw.reload(config(&text), Path::new("unit.yaml"))
        .await
        .expect("reloaded");
    assert_eq!(
        tools(&gw).await,
        ["extra__x", "extra__y", "fixed__x", "fixed__y"]
    );
    // The file gets a server of that name: the file's is served.
    let line = format!(
        "\x20     extra: {{upstream: {{era: stateless-2025, replicas: [\"{}\"], timeout: 2s}}, prefix: mine}}\n",
        fixed.url()
    );
    gw.reload(
        config(&config_text(&fixed.url(), &line)),
        Path::new("unit.yaml"),
    )
    .await
    .expect("reloaded");
    // (Listed in the order of the servers' names.)
    assert_eq!(
        tools(&gw).await,
        ["mine__x", "mine__y", "fixed__x", "fixed__y"]
    );
    let listed = gw.servers_of("team").await.expect("listed");
    let registered: Vec<&Value> = listed["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter(|s| s["source"] == "registration")
        .collect();
    assert_eq!(registered.len(), 1, "{listed}");
    assert_eq!(registered[0]["served"], false);
}

#[tokio::test]
async fn an_org_of_registered_servers_only_has_its_endpoint_before_the_first() {
    let extra = server("extra").await;
    let text = format!(
        "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\npublish: {{secret: {SECRET}}}\n\
         orgs:\n  team:\n    registration: {{}}\n"
    );
    let gw = Gateway::new(config(&text), Arc::new(MemorySessionStore::new())).expect("gateway");
    assert!(tools(&gw).await.is_empty());
    gw.register(
        "team",
        "extra",
        &body(&extra.url(), "30s", r#","prefix":"""#),
    )
    .await
    .expect("registered");
    assert_eq!(tools(&gw).await, ["x", "y"]);
    // Without `registration` or servers, an org is still refused.
    let text = text.replace("registration: {}", "scopes: []");
    let e = Config::from_yaml(&text, Path::new("unit.yaml"), &|_| None).expect_err("refused");
    assert!(e.to_string().contains("or `registration`"), "{e}");
}

#[test]
fn registration_sits_beside_servers_only() {
    let text = format!(
        "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\npublish: {{secret: {SECRET}}}\n\
         orgs:\n  team:\n    registration: {{secret: short, max_servers: 0, max_ttl: 0s}}\n\
         \x20   upstream: {{era: stateless-2025, replicas: [\"http://127.0.0.1:1/mcp\"]}}\n"
    );
    let e = Config::from_yaml(&text, Path::new("unit.yaml"), &|_| None).expect_err("refused");
    let paths: Vec<&str> = e.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "orgs.team.registration",
            "orgs.team.registration.secret",
            "orgs.team.registration.max_servers",
            "orgs.team.registration.max_ttl"
        ],
        "{e}"
    );
}

#[tokio::test]
async fn in_redis_registrations_are_shared_and_expire_by_redis_time() {
    let redis = crate::testing::RedisServer::start().await;
    let node = || {
        let conn = crate::session::redis::connection(&redis.url()).expect("redis");
        Registry::new(Some((conn, "t:")))
    };
    let (a, b) = (node(), node());
    let server =
        serde_json::json!({"upstream": {"era": "auto", "replicas": ["http://127.0.0.1:1/mcp"]}});
    // Whether it is new; the org takes at most 2.
    async fn put(
        node: &Registry,
        (org, name): (&str, &str),
        server: &Value,
        ttl_ms: u64,
    ) -> Result<bool, RegistryError> {
        node.put(org, name, server, Duration::from_millis(ttl_ms), 2)
            .await
    }
    assert!(
        put(&a, ("team", "one"), &server, 30_000)
            .await
            .expect("put")
    );
    assert!(
        !put(&b, ("team", "one"), &server, 30_000)
            .await
            .expect("renewed")
    );
    assert!(put(&b, ("team", "two"), &server, 1_500).await.expect("put"));
    // The org's most: a third is refused, a renewal is not.
    assert!(matches!(
        put(&a, ("team", "three"), &server, 30_000).await,
        Err(RegistryError::Full)
    ));
    assert!(
        !put(&a, ("team", "two"), &server, 1_500)
            .await
            .expect("renewed")
    );
    // Another org counts its own.
    assert!(
        put(&a, ("other", "one"), &server, 30_000)
            .await
            .expect("put")
    );
    let listed = b.list("team").await.expect("list");
    let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["one", "two"]);
    assert_eq!(*listed[0].server, server);
    assert!(
        listed[0].expires_in > Duration::from_secs(28),
        "{:?}",
        listed[0].expires_in
    );
    // Not renewed: gone for every node after its ttl, and its place free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.list("team").await.expect("list").len() == 2 {
        assert!(Instant::now() < deadline, "`two` did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        put(&b, ("team", "three"), &server, 30_000)
            .await
            .expect("put")
    );
    assert!(a.remove("team", "one").await.expect("removed"));
    assert!(!b.remove("team", "one").await.expect("gone already"));
    // Expired but not yet dropped (nothing listed since): not there either.
    assert!(put(&a, ("late", "x"), &server, 200).await.expect("put"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!a.remove("late", "x").await.expect("expired"));
    let names: Vec<String> = a
        .list("team")
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["three"]);
}

#[tokio::test]
async fn federated_streams_hear_that_the_lists_changed() {
    use crate::gateway::tests::{request, text_until};
    let (fixed, extra) = (server("fixed").await, server("extra").await);
    let gw = gateway(&fixed.url());
    let r = gw
        .handle(post_to("/gw/team/mcp", crate::gateway::tests::INIT, &[]))
        .await;
    let sid = r.headers["mcp-session-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let mut stream = gw
        .handle(request(
            http::Method::GET,
            "/gw/team/mcp",
            &[
                ("accept", "text/event-stream"),
                ("mcp-session-id", &sid),
                ("mcp-protocol-version", "2025-06-18"),
            ],
            "",
        ))
        .await;
    assert_eq!(stream.status, StatusCode::OK);
    gw.register("team", "extra", &body(&extra.url(), "30s", ""))
        .await
        .expect("registered");
    text_until(&mut stream, "notifications/tools/list_changed").await;
    gw.deregister("team", "extra").await.expect("removed");
    text_until(&mut stream, "notifications/tools/list_changed").await;
}
