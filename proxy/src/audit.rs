//! The audit log: one JSON line per `tools/call`, `prompts/get` and
//! `resources/read`, with who asked, what, the policy's decision, how it
//! ended and which replica served it. Lines are written by a thread of
//! their own, so a slow disk or Redis never holds a request; when it falls
//! behind by [`QUEUE`] lines, lines are dropped and counted
//! (`ratatosk_audit_dropped_total`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Instant, SystemTime};

use prometheus::{IntCounter, IntCounterVec};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{AuditArguments, AuditConfig, AuditSink};

/// Lines waiting for the writer, at most.
const QUEUE: usize = 10_000;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A result.
    Result,
    /// A tool's result with `isError`.
    ToolError,
    /// A JSON-RPC error.
    Error,
    /// An `InputRequiredResult`: the client retries with the input (a new
    /// request, with a line of its own).
    InputRequired,
    /// The client cancelled it (or went away).
    Cancelled,
    /// The policy refused it; no server saw it.
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Result => "result",
            Outcome::ToolError => "tool_error",
            Outcome::Error => "error",
            Outcome::InputRequired => "input_required",
            Outcome::Cancelled => "cancelled",
            Outcome::Denied => "denied",
        }
    }

    /// How a response message ends a call, and its error code if any.
    pub fn of_response(message: &[u8]) -> (Outcome, Option<i64>) {
        // Only the fields that tell: the result's content is skipped, not
        // built into a tree.
        #[derive(serde::Deserialize)]
        struct Response {
            error: Option<Error>,
            result: Option<Answered>,
        }
        #[derive(serde::Deserialize)]
        struct Error {
            code: Option<i64>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answered {
            result_type: Option<String>,
            is_error: Option<bool>,
        }
        let Ok(r) = serde_json::from_slice::<Response>(message) else {
            return (Outcome::Error, None);
        };
        match (r.error, r.result) {
            (Some(error), _) => (Outcome::Error, error.code),
            (None, Some(r)) if r.result_type.as_deref() == Some("input_required") => {
                (Outcome::InputRequired, None)
            }
            (
                None,
                Some(Answered {
                    is_error: Some(true),
                    ..
                }),
            ) => (Outcome::ToolError, None),
            _ => (Outcome::Result, None),
        }
    }
}

/// One audited call, from its start.
#[derive(Debug, Clone)]
pub struct Entry {
    pub started: Instant,
    pub time: SystemTime,
    pub request_id: String,
    pub org: String,
    /// The server, by name (none for an org's one `upstream`).
    pub server: Option<String>,
    pub subject: String,
    pub username: Option<String>,
    /// The client (`azp`) the token was issued to.
    pub client: Option<String>,
    pub method: String,
    /// The tool or prompt as the client named it, or the resource's URI.
    pub target: String,
    pub allowed: bool,
    /// The rule that decided, if any.
    pub rule: Option<String>,
    /// The call's arguments, as the config wants them shown.
    pub arguments: Option<Value>,
    /// The upstream replica that answered, by its name, once one did.
    pub replica: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    request_id: &'a str,
    org: &'a str,
    server: Option<&'a str>,
    subject: &'a str,
    username: Option<&'a str>,
    client: Option<&'a str>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<&'a str>,
    decision: &'a str,
    rule: Option<&'a str>,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<i64>,
    duration_ms: f64,
    replica: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
}

/// Where the Redis sink writes: the sessions' Redis, one stream for all
/// nodes, each entry naming the node that wrote it.
pub struct RedisSink<'a> {
    pub target: &'a crate::session::RedisTarget,
    /// The stream's key.
    pub key: String,
    pub node: u32,
}

/// Where audit lines go.
pub struct Audit {
    queue: Option<SyncSender<String>>,
    arguments: AuditArguments,
    calls: IntCounterVec,
    dropped: IntCounter,
}

impl Audit {
    /// The audit log `config` asks for (`redis`: where `sink: redis`
    /// writes); `calls` counts lines by org, server and outcome.
    pub fn new(
        config: &AuditConfig,
        redis: Option<RedisSink<'_>>,
        calls: IntCounterVec,
        dropped: IntCounter,
    ) -> std::io::Result<Audit> {
        let queue = match config.sink {
            AuditSink::Off => None,
            AuditSink::Stderr => Some(spawn_writer(Box::new(std::io::stderr()), None)?),
            AuditSink::File => {
                let path = config.path.clone().unwrap_or_default();
                let file = open_append(&path)?;
                let rotation = Rotation {
                    path,
                    max_bytes: config.max_bytes,
                    keep: config.keep,
                };
                Some(spawn_writer(Box::new(file), Some(rotation))?)
            }
            AuditSink::Redis => {
                let Some(sink) = redis else {
                    return Err(std::io::Error::other(
                        "`audit.sink: redis` needs `sessions.store: redis`",
                    ));
                };
                Some(spawn_redis_writer(
                    sink,
                    config.max_entries,
                    dropped.clone(),
                )?)
            }
        };
        Ok(Audit {
            queue,
            arguments: config.arguments,
            calls,
            dropped,
        })
    }

    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    /// Whether lines show a call's arguments (so they are worth reading).
    pub fn shows_arguments(&self) -> bool {
        self.is_on() && self.arguments != AuditArguments::Omit
    }

    /// The arguments of a call as the config wants them in the log.
    pub fn arguments_of(&self, params: Option<&Value>) -> Option<Value> {
        let arguments = params?.get("arguments")?;
        match self.arguments {
            AuditArguments::Omit => None,
            AuditArguments::Hashed => {
                let text = serde_json::to_vec(arguments).unwrap_or_default();
                let digest = Sha256::digest(&text);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                Some(Value::String(format!("sha256:{hex}")))
            }
            AuditArguments::Redacted => Some(redact(arguments)),
        }
    }

    /// Writes `entry`'s line, ended with `outcome`.
    pub fn record(&self, entry: &Entry, outcome: Outcome, error_code: Option<i64>) {
        let server = entry.server.as_deref().unwrap_or("");
        self.calls
            .with_label_values(&[&entry.org, server, outcome.as_str()])
            .inc();
        let Some(queue) = &self.queue else { return };
        let (tool, prompt, uri) = match entry.method.as_str() {
            "tools/call" => (Some(entry.target.as_str()), None, None),
            "prompts/get" => (None, Some(entry.target.as_str()), None),
            _ => (None, None, Some(entry.target.as_str())),
        };
        let line = Line {
            time: humantime::format_rfc3339_millis(entry.time).to_string(),
            request_id: &entry.request_id,
            org: &entry.org,
            server: entry.server.as_deref(),
            subject: &entry.subject,
            username: entry.username.as_deref(),
            client: entry.client.as_deref(),
            method: &entry.method,
            tool,
            prompt,
            uri,
            decision: if entry.allowed { "allowed" } else { "denied" },
            rule: entry.rule.as_deref(),
            outcome,
            error_code,
            duration_ms: (entry.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            replica: entry.replica.as_deref(),
            arguments: entry.arguments.as_ref(),
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        match queue.try_send(text) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Keys kept, values replaced: what was passed, not what it said.
fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), redact(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        _ => Value::String("<redacted>".into()),
    }
}

struct Rotation {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread: lines in, written (and the file rotated by size).
fn spawn_writer(
    mut out: Box<dyn Write + Send>,
    rotation: Option<Rotation>,
) -> std::io::Result<SyncSender<String>> {
    let (tx, rx) = sync_channel::<String>(QUEUE);
    let mut written = match &rotation {
        Some(r) => std::fs::metadata(&r.path).map(|m| m.len()).unwrap_or(0),
        None => 0,
    };
    std::thread::Builder::new()
        .name("ratatosk-audit".into())
        .spawn(move || {
            for line in rx {
                if let Some(r) = &rotation
                    && written > 0
                    && written + line.len() as u64 + 1 > r.max_bytes
                {
                    match rotate(r) {
                        Ok(file) => {
                            out = Box::new(file);
                            written = 0;
                        }
                        Err(e) => eprintln!(
                            "ratatosk: cannot rotate the audit log {}: {e}",
                            r.path.display()
                        ),
                    }
                }
                if writeln!(out, "{line}").is_ok() {
                    written += line.len() as u64 + 1;
                }
                let _ = out.flush();
            }
        })?;
    Ok(tx)
}

/// Lines the Redis writer sends in one pipeline, at most.
const REDIS_BATCH: usize = 256;
/// How long the Redis writer waits to connect, or for an answer.
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The Redis writer thread: lines in, `XADD`ed in pipelines of up to
/// [`REDIS_BATCH`] to the stream (trimmed to about `max_entries`). While
/// Redis cannot be reached, the lines of each batch that fails twice are
/// dropped and counted; the writer reconnects with the next batch.
fn spawn_redis_writer(
    sink: RedisSink<'_>,
    max_entries: usize,
    dropped: IntCounter,
) -> std::io::Result<SyncSender<String>> {
    if sink.target.sentinel.is_none() && sink.target.cluster.is_none() {
        sink.target.client().map_err(|e| {
            std::io::Error::other(format!("the audit sink's Redis URL is not valid: {e}"))
        })?;
    }
    let target = sink.target.clone();
    let (key, node) = (sink.key, sink.node.to_string());
    let (tx, rx) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("ratatosk-audit".into())
        .spawn(move || {
            let mut conn: Option<redis::Connection> = None;
            let mut batch = Vec::with_capacity(REDIS_BATCH);
            while let Ok(first) = rx.recv() {
                batch.push(first);
                while batch.len() < REDIS_BATCH {
                    match rx.try_recv() {
                        Ok(line) => batch.push(line),
                        Err(_) => break,
                    }
                }
                let mut pipe = redis::pipe();
                for line in &batch {
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(max_entries)
                        .arg("*")
                        .arg("node")
                        .arg(&node)
                        .arg("line")
                        .arg(line)
                        .ignore();
                }
                // A connection that failed is dropped; the second try
                // opens a fresh one.
                let mut send = || -> redis::RedisResult<()> {
                    let mut c = match conn.take() {
                        Some(c) => c,
                        None => target.sync_connection(REDIS_TIMEOUT)?,
                    };
                    pipe.exec(&mut c)?;
                    conn = Some(c);
                    Ok(())
                };
                let sent = send().or_else(|e| {
                    tracing::warn!("cannot write the audit log to Redis: {e}");
                    send()
                });
                if let Err(e) = sent {
                    tracing::warn!("cannot write the audit log to Redis: {e}");
                    dropped.inc_by(batch.len() as u64);
                }
                batch.clear();
            }
        })?;
    Ok(tx)
}

/// `path` becomes `path.1`, `path.1` becomes `path.2`, ... up to `keep`;
/// a fresh `path` is opened.
fn rotate(r: &Rotation) -> std::io::Result<File> {
    let numbered = |n: usize| {
        let mut p = r.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    if r.keep == 0 {
        std::fs::remove_file(&r.path)?;
    } else {
        for n in (1..r.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&r.path, numbered(1))?;
    }
    open_append(&r.path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn counters() -> (IntCounterVec, IntCounter) {
        let calls = IntCounterVec::new(
            prometheus::Opts::new("c", "c"),
            &["org", "server", "outcome"],
        )
        .expect("counter");
        (calls, IntCounter::new("d", "d").expect("counter"))
    }

    fn entry(target: &str) -> Entry {
        Entry {
            started: Instant::now(),
            time: SystemTime::UNIX_EPOCH,
            request_id: "r-1".into(),
            org: "org-1".into(),
            server: Some("files".into()),
            subject: "u-1".into(),
            username: Some("alice".into()),
            client: Some("mcp-client".into()),
            method: "tools/call".into(),
            target: target.into(),
            allowed: true,
            rule: Some("readers".into()),
            arguments: None,
            replica: Some("files-1".into()),
        }
    }

    pub(crate) fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("json line"))
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} lines in 5 s",
                lines.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_file_sink_writes_one_json_line_per_call_and_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("ratatosk-audit-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let config = AuditConfig {
            sink: AuditSink::File,
            path: Some(path.clone()),
            max_bytes: 600,
            keep: 2,
            arguments: AuditArguments::Hashed,
            max_entries: 10,
        };
        let (calls, dropped) = counters();
        let audit = Audit::new(&config, None, calls.clone(), dropped).expect("audit");
        let mut e = entry("fs__read");
        e.arguments = audit.arguments_of(Some(&json!({"name": "x", "arguments": {"path": "/a"}})));
        audit.record(&e, Outcome::Result, None);
        let lines = wait_for_lines(&path, 1);
        let line = &lines[0];
        assert_eq!(line["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(
            (
                &line["org"],
                &line["server"],
                &line["tool"],
                &line["decision"],
                &line["rule"],
                &line["outcome"]
            ),
            (
                &json!("org-1"),
                &json!("files"),
                &json!("fs__read"),
                &json!("allowed"),
                &json!("readers"),
                &json!("result")
            )
        );
        assert!(
            line["arguments"]
                .as_str()
                .expect("hash")
                .starts_with("sha256:")
        );
        assert_eq!(
            calls.with_label_values(&["org-1", "files", "result"]).get(),
            1
        );
        // Past 600 bytes the file rotates: audit.jsonl.1 holds the old lines.
        for _ in 0..4 {
            audit.record(&entry("fs__write"), Outcome::Error, Some(-32602));
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while !dir.join("audit.jsonl.1").exists() {
            assert!(Instant::now() < deadline, "no rotation in 5 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let total = wait_for_lines(&dir.join("audit.jsonl.1"), 1).len();
        assert!(total >= 1 && std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) <= 600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_redis_sink_adds_each_line_to_a_stream_named_by_node_and_trimmed() {
        let redis = crate::testing::RedisServer::start().await;
        let config = AuditConfig {
            sink: AuditSink::Redis,
            max_entries: 5,
            ..AuditConfig::default()
        };
        let (calls, dropped) = counters();
        let sink = RedisSink {
            target: &crate::session::RedisTarget::from(&redis.url()),
            key: "gw1:audit".into(),
            node: 7,
        };
        let audit = Audit::new(&config, Some(sink), calls, dropped.clone()).expect("audit");
        for n in 0..200 {
            audit.record(&entry(&format!("fs__t{n}")), Outcome::Result, None);
        }
        let client = redis::Client::open(redis.url()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        // The last line is in, with its node; the stream was trimmed.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let last = loop {
            let got: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg("gw1:audit")
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .expect("xrevrange");
            if got
                .first()
                .is_some_and(|(_, fields)| fields.iter().any(|(_, v)| v.contains("fs__t199")))
            {
                break got;
            }
            assert!(
                Instant::now() < deadline,
                "the 200th line never reached the stream in 5 s: {got:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let fields = &last[0].1;
        assert_eq!(fields[0], ("node".to_owned(), "7".to_owned()));
        let line: Value = serde_json::from_str(&fields[1].1).expect("a JSON line");
        assert_eq!(
            (&line["tool"], &line["replica"]),
            (&json!("fs__t199"), &json!("files-1"))
        );
        let len: usize = redis::cmd("XLEN")
            .arg("gw1:audit")
            .query_async(&mut conn)
            .await
            .expect("xlen");
        assert!(len < 200, "MAXLEN ~ 5 trims the stream: {len} entries");
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn a_redis_sink_that_cannot_be_reached_drops_and_counts_lines() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = AuditConfig {
            sink: AuditSink::Redis,
            ..AuditConfig::default()
        };
        let (calls, dropped) = counters();
        let url = format!("redis://127.0.0.1:{port}/");
        let sink = RedisSink {
            target: &crate::session::RedisTarget::from(&url),
            key: "a".into(),
            node: 1,
        };
        let audit = Audit::new(&config, Some(sink), calls, dropped.clone()).expect("audit");
        audit.record(&entry("fs__x"), Outcome::Result, None);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while dropped.get() == 0 {
            assert!(
                Instant::now() < deadline,
                "no line counted as dropped in 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn arguments_are_left_out_redacted_or_hashed() {
        let params = json!({"name": "x", "arguments": {"path": "/secret", "n": [1, {"k": true}]}});
        let (calls, dropped) = counters();
        let mut config = AuditConfig::default();
        let audit = Audit::new(&config, None, calls.clone(), dropped.clone()).expect("audit");
        assert!(!audit.is_on());
        assert_eq!(audit.arguments_of(Some(&params)), None);
        config.arguments = AuditArguments::Redacted;
        let audit = Audit::new(&config, None, calls.clone(), dropped.clone()).expect("audit");
        assert_eq!(
            audit.arguments_of(Some(&params)),
            Some(json!({"path": "<redacted>", "n": ["<redacted>", {"k": "<redacted>"}]}))
        );
        config.arguments = AuditArguments::Hashed;
        let audit = Audit::new(&config, None, calls, dropped).expect("audit");
        let a = audit.arguments_of(Some(&params));
        assert_eq!(
            a,
            audit.arguments_of(Some(&params)),
            "the same arguments, the same hash"
        );
    }

    #[test]
    fn outcomes_are_read_from_responses() {
        assert_eq!(
            Outcome::of_response(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            (Outcome::Result, None)
        );
        assert_eq!(
            Outcome::of_response(br#"{"jsonrpc":"2.0","id":1,"result":{"isError":true}}"#),
            (Outcome::ToolError, None)
        );
        assert_eq!(
            Outcome::of_response(
                br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"x"}}"#
            ),
            (Outcome::Error, Some(-32602))
        );
    }
}
