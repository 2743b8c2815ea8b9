//! `ratatosk-loadgen`: the benchmark load generator.
//!
//! - `rpc`: closed-loop JSON-RPC requests (scenarios A, E, F and R; with
//!   `--also-url`, spread over several gateway nodes sharing the session);
//! - `setup`: session set-up, `initialize` + `notifications/initialized` +
//!   `tools/list` (scenario D);
//! - `streams`: holds N idle SSE streams, then fans one message out to each
//!   of them through the system's publish API (scenarios B and C). It is
//!   driven by lines on stdin (`go`, `fanout`, `status`, `quit`) and answers
//!   each phase with one JSON line on stdout.
//!
//! Results are JSON on stdout; progress and errors go to stderr.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode, header};
use http_body_util::Full;
use ratatosk_bench::client::{Conn, Target, is_result};
use ratatosk_bench::net::{Sources, raise_fd_limit};
use ratatosk_bench::stats::{Summary, histogram, record};
use ratatosk_bench::{MARKER, PROTOCOL_VERSION, count_markers};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Load generator of the Ratatosk benchmark harness")]
struct Cli {
    /// Client source addresses, 127.0.0.2 on.
    #[arg(long, default_value_t = 8, global = true)]
    sources: u8,
    /// Bound on every single network wait.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// The CA (PEM) that `https://` targets' certificates chain to.
    #[arg(long, global = true)]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop JSON-RPC requests on one session.
    Rpc(RpcArgs),
    /// Session set-up: initialize, initialized, tools/list (then DELETE, untimed).
    Setup(SetupArgs),
    /// Hold N idle SSE streams, then fan out one message to each.
    Streams(StreamArgs),
}

#[derive(Parser)]
struct RpcArgs {
    /// The MCP endpoint (where the session is opened with --init).
    #[arg(long)]
    url: String,
    /// More endpoints of the same session (other gateway nodes): worker w
    /// sends to `[url, also-url...][w mod count]`. Repeatable.
    #[arg(long = "also-url")]
    also_url: Vec<String>,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Run this long (after the warm-up)...
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// ...or send exactly this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests in this first stretch are sent but not recorded.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Bearer tokens, one per line; request k uses token k mod count.
    #[arg(long)]
    tokens_file: Option<String>,
    /// One bearer token.
    #[arg(long)]
    token: Option<String>,
    /// Start with initialize and use the session id it returns.
    #[arg(long)]
    init: bool,
    /// The method: tools/call (tool `echo`, or `echo_sse` with --sse) or tools/list.
    #[arg(long, default_value = "tools/call")]
    method: String,
    /// Ask the upstream for an SSE answer (tool `echo_sse`).
    #[arg(long)]
    sse: bool,
    /// The tool's name as the endpoint shows it (a federated endpoint
    /// prefixes it: `s1__echo`); default `echo`, or `echo_sse` with --sse.
    #[arg(long)]
    tool: Option<String>,
}

#[derive(Parser)]
struct SetupArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long)]
    token: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    /// Ratatosk: a session per stream, GET on the MCP endpoint, publish
    /// through the admin API.
    Gateway,
    /// Pushpin: GET {stream-url}/{i} held by GRIP (channel s{i}), publish
    /// through the HTTP control API.
    Pushpin,
    /// Nginx + Nchan: GET {stream-url}/{i} (EventSource subscriber),
    /// POST {publish-url}/{i}.
    Nchan,
}

#[derive(Parser)]
struct StreamArgs {
    #[arg(long, value_enum)]
    system: System,
    #[arg(long)]
    n: usize,
    /// Gateway: the MCP endpoint; Pushpin and Nchan: the prefix of /{i}.
    #[arg(long)]
    stream_url: String,
    /// Gateway: the admin listener's base URL; Pushpin: the publish URL;
    /// Nchan: the prefix of /{i}.
    #[arg(long)]
    publish_url: String,
    /// Gateway: the client's bearer token.
    #[arg(long)]
    token: Option<String>,
    /// Gateway: the publish secret.
    #[arg(long)]
    secret: Option<String>,
    /// Streams being opened at once (Pushpin 1.36 answers 500 to some
    /// opens at 256).
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Publish connections.
    #[arg(long, default_value_t = 32)]
    publish_concurrency: usize,
    /// How long the fan-out may take before the missing messages count as lost.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    deliver_within: Duration,
    /// Gateway: hold each session's stream over a WebSocket (`/ws`,
    /// resuming the session) rather than a GET stream.
    #[arg(long)]
    websocket: bool,
}

/// The TLS client config of `--ca-file`, for `https://` targets.
static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

fn parse_target(url: &str) -> anyhow::Result<Target> {
    Target::parse(url, TLS.get())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(ca) = &cli.ca_file {
        let _ = TLS.set(ratatosk_bench::client::tls_config(ca)?);
    }
    let fds = raise_fd_limit(1_048_576).context("raising the open-file limit")?;
    let sources = Sources::new(cli.sources);
    let out = match cli.cmd {
        Cmd::Rpc(a) => rpc(a, sources, cli.timeout).await?,
        Cmd::Setup(a) => setup(a, sources, cli.timeout).await?,
        Cmd::Streams(a) => {
            if (fds as usize) < a.n + 1024 {
                bail!(
                    "{} streams need more open files than the limit of {fds}",
                    a.n
                );
            }
            return streams(a, sources, cli.timeout).await;
        }
    };
    println!("{out}");
    Ok(())
}

fn mcp_post(
    t: &Target,
    body: serde_json::Value,
    token: Option<&str>,
    session: Option<&str>,
) -> anyhow::Result<http::Request<Full<Bytes>>> {
    let mut b = t
        .request(Method::POST)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", PROTOCOL_VERSION);
    if let Some(tok) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {tok}"));
    }
    if let Some(s) = session {
        b = b.header("mcp-session-id", s);
    }
    Ok(b.body(Full::new(Bytes::from(body.to_string())))?)
}

fn initialize_body() -> serde_json::Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "ratatosk-loadgen", "version": env!("CARGO_PKG_VERSION")}
    }})
}

/// initialize + notifications/initialized; the session id, if the server
/// gave one (a stateless upstream reached directly gives none).
async fn open_session(
    conn: &mut Conn,
    t: &Target,
    token: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let a = conn
        .send(mcp_post(t, initialize_body(), token, None)?)
        .await?;
    if a.status != StatusCode::OK || !is_result(&a.body) {
        bail!(
            "initialize answered {}: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let session = a
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let a = conn
        .send(mcp_post(t, note, token, session.as_deref())?)
        .await?;
    if a.status != StatusCode::ACCEPTED {
        bail!("notifications/initialized answered {}", a.status);
    }
    Ok(session)
}

fn read_tokens(a: &RpcArgs) -> anyhow::Result<Vec<String>> {
    let mut tokens: Vec<String> = match &a.tokens_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {f}"))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    tokens.extend(a.token.clone());
    Ok(tokens)
}

/// What one worker saw.
struct Tally {
    hist: hdrhistogram::Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: histogram(),
            errors: 0,
            first_error: None,
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    fn merge(tallies: Vec<Tally>) -> Tally {
        let mut all = Tally::new();
        for t in tallies {
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.hist.add(&t.hist);
            all.errors += t.errors;
            if all.first_error.is_none() {
                all.first_error = t.first_error;
            }
        }
        all
    }

    fn report(&self, seconds: f64) -> serde_json::Value {
        let s = Summary::of(&self.hist);
        json!({
            "ok": s.count,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": seconds,
            "rps": s.count as f64 / seconds.max(1e-9),
            "latency": s,
        })
    }
}

async fn rpc(a: RpcArgs, sources: Sources, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    if a.duration.is_none() == a.requests.is_none() {
        bail!("give exactly one of --duration and --requests");
    }
    let target = parse_target(&a.url)?;
    let mut targets = vec![target.clone()];
    for u in &a.also_url {
        targets.push(parse_target(u)?);
    }
    let tokens = Arc::new(read_tokens(&a)?);
    let first = tokens.first().map(String::as_str);
    let session = if a.init {
        let mut c = Conn::open(&sources, 0, &target, timeout).await?;
        open_session(&mut c, &target, first)
            .await
            .context("opening the session")?
    } else {
        None
    };
    let tool = a
        .tool
        .clone()
        .unwrap_or_else(|| if a.sse { "echo_sse" } else { "echo" }.to_owned());
    let params = match a.method.as_str() {
        "tools/call" => json!({"name": tool, "arguments": {"text": "hello"}}),
        _ => json!({}),
    };
    let start = Instant::now();
    let measure_from = start + a.warmup;
    let stop_at = a.duration.map(|d| measure_from + d);
    let budget = Arc::new(AtomicU64::new(a.requests.unwrap_or(u64::MAX)));
    let next_token = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..a.concurrency.max(1) {
        let (target, tokens, session, params, budget, next_token) = (
            targets[w % targets.len()].clone(),
            tokens.clone(),
            session.clone(),
            params.clone(),
            budget.clone(),
            next_token.clone(),
        );
        let method = a.method.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut conn: Option<Conn> = None;
            // Ids stay unique within the session across workers.
            let mut id: u64 = (w as u64) << 40;
            loop {
                if stop_at.is_some_and(|s| Instant::now() >= s) {
                    break;
                }
                if budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let Some(c) = connected(&mut conn, &mut tally, &sources, w, &target, timeout).await
                else {
                    continue;
                };
                let token = (!tokens.is_empty()).then(|| {
                    tokens[next_token.fetch_add(1, Ordering::Relaxed) % tokens.len()].as_str()
                });
                let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
                id += 1;
                let req = match mcp_post(&target, body, token, session.as_deref()) {
                    Ok(r) => r,
                    Err(e) => {
                        tally.error(format!("{e:#}"));
                        break;
                    }
                };
                let t0 = Instant::now();
                match c.send(req).await {
                    Ok(ans) if ans.status == StatusCode::OK && is_result(&ans.body) => {
                        if t0 >= measure_from {
                            record(&mut tally.hist, t0.elapsed());
                        }
                    }
                    Ok(ans) => tally.error(format!(
                        "{}: {}",
                        ans.status,
                        String::from_utf8_lossy(&ans.body[..ans.body.len().min(300)])
                    )),
                    Err(e) => {
                        tally.error(format!("{e:#}"));
                        conn = None;
                    }
                }
            }
            tally
        }));
    }
    let tally = join(workers).await?;
    let seconds = match a.duration {
        Some(d) => d.as_secs_f64(),
        None => measure_from.elapsed().as_secs_f64(),
    };
    Ok(tally.report(seconds))
}

async fn setup(
    a: SetupArgs,
    sources: Sources,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let target = parse_target(&a.url)?;
    let start = Instant::now();
    let measure_from = start + a.warmup;
    let stop_at = measure_from + a.duration;
    let mut workers = Vec::new();
    for w in 0..a.concurrency.max(1) {
        let (target, token) = (target.clone(), a.token.clone());
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut conn: Option<Conn> = None;
            while Instant::now() < stop_at {
                let Some(c) = connected(&mut conn, &mut tally, &sources, w, &target, timeout).await
                else {
                    continue;
                };
                let t0 = Instant::now();
                let outcome = async {
                    let session = open_session(c, &target, token.as_deref()).await?;
                    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
                    let ans = c
                        .send(mcp_post(
                            &target,
                            list,
                            token.as_deref(),
                            session.as_deref(),
                        )?)
                        .await?;
                    if ans.status != StatusCode::OK || !is_result(&ans.body) {
                        bail!("tools/list answered {}", ans.status);
                    }
                    Ok(session)
                }
                .await;
                let took = t0.elapsed();
                match outcome {
                    Ok(session) => {
                        if t0 >= measure_from {
                            record(&mut tally.hist, took);
                        }
                        if let Some(s) = session {
                            let mut b = target
                                .request(Method::DELETE)
                                .header("mcp-session-id", s.as_str())
                                .header("mcp-protocol-version", PROTOCOL_VERSION);
                            if let Some(tok) = &token {
                                b = b.header(header::AUTHORIZATION, format!("Bearer {tok}"));
                            }
                            if let Ok(req) = b.body(Full::new(Bytes::new()))
                                && let Err(e) = c.send(req).await
                            {
                                tally.error(format!("DELETE: {e:#}"));
                                conn = None;
                            }
                        }
                    }
                    Err(e) => {
                        tally.error(format!("{e:#}"));
                        conn = None;
                    }
                }
            }
            tally
        }));
    }
    Ok(join(workers).await?.report(a.duration.as_secs_f64()))
}

/// The worker's connection, opened if there is none; on failure the error
/// is counted and the caller retries after a pause.
async fn connected<'a>(
    conn: &'a mut Option<Conn>,
    tally: &mut Tally,
    sources: &Sources,
    worker: usize,
    target: &Target,
    timeout: Duration,
) -> Option<&'a mut Conn> {
    if conn.is_none() {
        match Conn::open(sources, worker, target, timeout).await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                tally.error(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                return None;
            }
        }
    }
    conn.as_mut()
}

/// Waits for every worker and adds up what they saw.
async fn join(workers: Vec<tokio::task::JoinHandle<Tally>>) -> anyhow::Result<Tally> {
    let mut tallies = Vec::new();
    for w in workers {
        tallies.push(w.await?);
    }
    Ok(Tally::merge(tallies))
}

/// Shared state of the stream readers.
struct Held {
    /// Nanoseconds after `epoch` when stream i first saw the marker (0: not yet).
    delivered: Vec<AtomicU64>,
    opened: AtomicUsize,
    failed: AtomicUsize,
    closed: AtomicUsize,
    first_failure: std::sync::Mutex<Option<String>>,
    epoch: Instant,
}

impl Held {
    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_failure.lock() {
            f.get_or_insert(e);
        }
    }
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

async fn streams(a: StreamArgs, sources: Sources, timeout: Duration) -> anyhow::Result<()> {
    let stream_target = parse_target(&a.stream_url)?;
    let publish_target = parse_target(&a.publish_url)?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();

    // Gateway: one session per stream, made first so its memory can be told
    // apart from the streams'.
    let sessions: Arc<Vec<String>> = Arc::new(if a.system == System::Gateway {
        let t0 = Instant::now();
        let s = make_sessions(&a, &stream_target, sources, timeout).await?;
        emit(json!({"phase": "sessions", "n": s.len(), "seconds": t0.elapsed().as_secs_f64()}));
        wait_for(&mut stdin, "go").await?;
        s
    } else {
        Vec::new()
    });

    let held = Arc::new(Held {
        delivered: (0..a.n).map(|_| AtomicU64::new(0)).collect(),
        opened: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        first_failure: std::sync::Mutex::new(None),
        epoch: Instant::now(),
    });
    let gate = Arc::new(Semaphore::new(a.open_concurrency.max(1)));
    let t0 = Instant::now();
    for i in 0..a.n {
        let request = stream_request(&a, &stream_target, &sessions, i);
        let (held, gate, target) = (held.clone(), gate.clone(), stream_target.clone());
        let websocket = a.websocket;
        tokio::spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            let opened = tokio::time::timeout(timeout, async {
                let mut s = target.dial(&sources, i).await?;
                s.write_all(request.as_bytes()).await?;
                let head = read_head(&mut s).await?;
                Ok::<_, std::io::Error>((s, head))
            })
            .await;
            let (mut s, head) = match opened {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return held.fail(format!("stream {i}: {e}")),
                Err(_) => return held.fail(format!("stream {i}: no answer within {timeout:?}")),
            };
            let expected = if websocket {
                "HTTP/1.1 101"
            } else {
                "HTTP/1.1 200"
            };
            if !head.starts_with(expected) {
                let line = head.lines().next().unwrap_or_default().to_owned();
                return held.fail(format!("stream {i}: {line}"));
            }
            held.opened.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            let mut carry = Vec::with_capacity(MARKER.len());
            let mut buf = vec![0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        held.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(n) => {
                        // The gateway's pings (an unmasked, empty ping
                        // frame: 0x89 0x00, which JSON text never holds)
                        // get a masked, empty pong.
                        if websocket
                            && buf[..n].windows(2).any(|w| w == [0x89, 0x00])
                            && s.write_all(&[0x8a, 0x80, 0, 0, 0, 0]).await.is_err()
                        {
                            held.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if count_markers(&mut carry, &buf[..n]) > 0 {
                            let slot = &held.delivered[i];
                            let _ = slot.compare_exchange(
                                0,
                                held.since_epoch(),
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                    }
                }
            }
        });
    }
    let open_deadline = Instant::now() + timeout.max(Duration::from_secs(120));
    while held.opened.load(Ordering::Relaxed) + held.failed.load(Ordering::Relaxed) < a.n {
        if Instant::now() > open_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_failure = held.first_failure.lock().ok().and_then(|f| f.clone());
    emit(json!({
        "phase": "open",
        "opened": held.opened.load(Ordering::Relaxed),
        "failed": held.failed.load(Ordering::Relaxed),
        "first_failure": first_failure,
        "seconds": t0.elapsed().as_secs_f64(),
    }));

    while let Some(line) = stdin.next_line().await? {
        match line.trim() {
            "status" => emit(json!({
                "phase": "status",
                "open": held.opened.load(Ordering::Relaxed) - held.closed.load(Ordering::Relaxed),
                "closed": held.closed.load(Ordering::Relaxed),
            })),
            "fanout" => {
                let r = fanout(&a, &publish_target, &sessions, &held, sources, timeout).await?;
                emit(r);
            }
            "quit" => break,
            other => eprintln!("unknown command '{other}' (status, fanout, quit)"),
        }
    }
    // Exiting closes every stream at once.
    Ok(())
}

async fn wait_for(
    stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    word: &str,
) -> anyhow::Result<()> {
    match stdin.next_line().await? {
        Some(l) if l.trim() == word => Ok(()),
        Some(l) => bail!("expected '{word}' on stdin, got '{l}'"),
        None => bail!("stdin closed while waiting for '{word}'"),
    }
}

async fn make_sessions(
    a: &StreamArgs,
    target: &Target,
    sources: Sources,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..64.min(a.n.max(1)) {
        let (target, token, next, n) = (target.clone(), a.token.clone(), next.clone(), a.n);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&sources, w, &target, timeout).await?;
            let mut made = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let s = open_session(&mut conn, &target, token.as_deref()).await?;
                made.push(s.ok_or_else(|| anyhow!("initialize gave no Mcp-Session-Id"))?);
            }
            Ok::<_, anyhow::Error>(made)
        }));
    }
    let mut all = Vec::with_capacity(a.n);
    for w in workers {
        all.extend(w.await??);
    }
    Ok(all)
}

fn stream_request(a: &StreamArgs, t: &Target, sessions: &[String], i: usize) -> String {
    match a.system {
        System::Gateway if a.websocket => format!(
            "GET {}/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mcp\r\nMcp-Session-Id: {}\r\nAuthorization: Bearer {}\r\n\r\n",
            t.path.trim_end_matches("/mcp"),
            t.authority,
            sessions.get(i).map_or("", String::as_str),
            a.token.as_deref().unwrap_or_default(),
        ),
        System::Gateway => format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {}\r\nMCP-Protocol-Version: {PROTOCOL_VERSION}\r\nAuthorization: Bearer {}\r\n\r\n",
            t.path,
            t.authority,
            sessions.get(i).map_or("", String::as_str),
            a.token.as_deref().unwrap_or_default(),
        ),
        System::Pushpin | System::Nchan => format!(
            "GET {}/{i} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            t.path.trim_end_matches('/'),
            t.authority,
        ),
    }
}

/// Reads the response head (up to the blank line), byte by byte: the body
/// that follows stays in the socket for the reader loop.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the response head ended",
            ));
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("response head over 16 KiB"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// How to publish: the system and, for the gateway, the publish secret.
struct PublishSpec {
    system: System,
    secret: Option<String>,
}

fn publish_request(
    a: &PublishSpec,
    t: &Target,
    sessions: &[String],
    i: usize,
) -> anyhow::Result<http::Request<Full<Bytes>>> {
    let marker = String::from_utf8_lossy(MARKER);
    let req = match a.system {
        System::Gateway => {
            let id = sessions.get(i).ok_or_else(|| anyhow!("no session {i}"))?;
            let body = json!({"jsonrpc": "2.0", "method": "notifications/message",
                "params": {"level": "info", "data": format!("{marker} {i}")}});
            t.with_path(&format!(
                "{}/sessions/{id}/messages",
                t.path.trim_end_matches('/')
            ))
            .request(Method::POST)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", a.secret.as_deref().unwrap_or_default()),
            )
            .body(Full::new(Bytes::from(body.to_string())))?
        }
        System::Pushpin => {
            let body = json!({"items": [{"channel": format!("s{i}"), "formats": {
                "http-stream": {"content": format!("event: message\ndata: {marker} {i}\n\n")}}}]});
            t.request(Method::POST)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))?
        }
        System::Nchan => t
            .with_path(&format!("{}/{i}", t.path.trim_end_matches('/')))
            .request(Method::POST)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from(format!("{marker} {i}"))))?,
    };
    Ok(req)
}

async fn fanout(
    a: &StreamArgs,
    t: &Target,
    sessions: &Arc<Vec<String>>,
    held: &Arc<Held>,
    sources: Sources,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    for d in &held.delivered {
        d.store(0, Ordering::Relaxed);
    }
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..a.n).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let publish_start = held.since_epoch();
    let mut workers = Vec::new();
    for w in 0..a.publish_concurrency.max(1) {
        let (t, sessions, held, sent, next, errors, first_error) = (
            t.clone(),
            sessions.clone(),
            held.clone(),
            sent.clone(),
            next.clone(),
            errors.clone(),
            first_error.clone(),
        );
        let n = a.n;
        let spec = PublishSpec {
            system: a.system,
            secret: a.secret.clone(),
        };
        workers.push(tokio::spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let fail = |e: String| {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = first_error.lock() {
                        f.get_or_insert(e);
                    }
                };
                // A server may close a keep-alive connection after any
                // answer (Pushpin's publish API does): reconnect, and retry
                // a publish whose connection failed once.
                let mut tries = 0;
                loop {
                    tries += 1;
                    if let Some(c) = conn.as_mut()
                        && !c.usable().await
                    {
                        conn = None;
                    }
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Conn::open(&sources, w, &t, timeout).await {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                fail(format!("{e:#}"));
                                break;
                            }
                        },
                    };
                    let req = match publish_request(&spec, &t, &sessions, i) {
                        Ok(r) => r,
                        Err(e) => {
                            fail(format!("{e:#}"));
                            break;
                        }
                    };
                    sent[i].store(held.since_epoch(), Ordering::Relaxed);
                    match c.send(req).await {
                        Ok(ans) if ans.status.is_success() => break,
                        Ok(ans) => {
                            fail(format!(
                                "publish {i}: {} {}",
                                ans.status,
                                String::from_utf8_lossy(&ans.body[..ans.body.len().min(200)])
                            ));
                            break;
                        }
                        Err(e) => {
                            conn = None;
                            if tries >= 2 {
                                fail(format!("publish {i}: {e:#}"));
                                break;
                            }
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let publish_done = held.since_epoch();
    let expected = held.opened.load(Ordering::Relaxed) - held.closed.load(Ordering::Relaxed);
    let deadline = Instant::now() + a.deliver_within;
    let count = || {
        held.delivered
            .iter()
            .filter(|d| d.load(Ordering::Relaxed) != 0)
            .count()
    };
    while count() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut hist = histogram();
    let mut last = 0u64;
    let mut delivered = 0usize;
    for (d, s) in held.delivered.iter().zip(sent.iter()) {
        let (d, s) = (d.load(Ordering::Relaxed), s.load(Ordering::Relaxed));
        if d != 0 && s != 0 {
            delivered += 1;
            last = last.max(d);
            record(&mut hist, Duration::from_nanos(d.saturating_sub(s)));
        }
    }
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Ok(json!({
        "phase": "fanout",
        "streams": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "publish_errors": errors.load(Ordering::Relaxed),
        "first_error": first_error,
        "publish_seconds": (publish_done - publish_start) as f64 / 1e9,
        "all_delivered_seconds": last.saturating_sub(publish_start) as f64 / 1e9,
        "latency": Summary::of(&hist),
    }))
}
