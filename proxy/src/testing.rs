//! Test helpers: a minimal HTTP/1.1 upstream on loopback for unit tests of
//! the pool and the gateway core. End-to-end tests use the real example
//! servers instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A stub's full answer: status, headers (with the content type) and body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// A reply with `status`, one `content-type` header and `body`.
    pub fn new(status: u16, content_type: &str, body: String) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }
}

/// What a stub answers: all at once, or an SSE stream whose events the
/// test sends while it is open (it ends when the sender is dropped).
pub enum Answer {
    Full(Reply),
    Stream(tokio::sync::mpsc::UnboundedReceiver<String>),
}

/// What a stub answers, given the request head (lower-cased) and body.
pub type Responder = dyn Fn(&str, &[u8]) -> Answer + Send + Sync;

pub struct Stub {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Stub {
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts a stub upstream that answers every request with `respond`.
pub async fn stub(
    respond: impl Fn(&[u8]) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> Stub {
    full_stub(move |_, body| {
        let (status, content_type, body) = respond(body);
        Reply {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    })
    .await
}

/// Starts a stub upstream that sees the request head and sets headers.
pub async fn full_stub(respond: impl Fn(&str, &[u8]) -> Reply + Send + Sync + 'static) -> Stub {
    streaming_stub(move |head, body| Answer::Full(respond(head, body))).await
}

/// Starts a stub upstream that may answer with a stream it feeds later
/// (an SSE answer with events, each a full `event:`/`data:` text, sent
/// through [`Answer::Stream`]).
pub async fn streaming_stub(
    respond: impl Fn(&str, &[u8]) -> Answer + Send + Sync + 'static,
) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let respond: Arc<Responder> = Arc::new(respond);
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock, respond.clone(), counter.clone()));
        }
    });
    Stub { addr, hits }
}

/// A port nothing listens on.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}/mcp")
}

async fn serve(mut sock: TcpStream, respond: Arc<Responder>, hits: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        hits.fetch_add(1, Ordering::SeqCst);
        if body.windows(6).any(|w| w == b"\"slow\"") {
            // A request naming "slow" waits, to keep it in flight.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        if body.windows(10).any(|w| w == b"stub-hang:") {
            // A request naming a `stub-hang:` value gets no answer in any
            // test's time.
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        }
        let reply = match respond(&head, &body) {
            Answer::Full(reply) => reply,
            Answer::Stream(mut events) => {
                // Its end is the connection's.
                let start = "HTTP/1.1 200 X\r\ncontent-type: text/event-stream\r\n\
                             connection: close\r\n\r\n";
                if sock.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                while let Some(event) = events.recv().await {
                    if sock.write_all(event.as_bytes()).await.is_err() {
                        return;
                    }
                }
                return;
            }
        };
        let mut resp = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (name, value) in &reply.headers {
            resp.push_str(&format!("{name}: {value}\r\n"));
        }
        resp.push_str(&format!(
            "content-length: {}\r\n\r\n{}",
            reply.body.len(),
            reply.body
        ));
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The `id` of a JSON-RPC request body, as JSON text.
pub fn request_id(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id").map(|id| id.to_string()))
        .unwrap_or_else(|| "null".into())
}

/// A header map from (name, value) pairs; repeated names are kept.
/// A request as the Pingora glue hands it to the gateway.
pub fn request(
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> crate::edge::Request {
    crate::edge::Request {
        method,
        path: path.into(),
        query: None,
        headers: self::headers(headers),
        body: body.into(),
        request_id: "unit".into(),
        parsed: None,
    }
}

pub fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

/// A real `redis-server` (the Debian package; `scripts/test` installs it)
/// on a free loopback port, with no persistence; stopped by pid on drop.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    /// Its working directory (a replica's synced data, a sentinel's
    /// config), removed on drop.
    dir: std::path::PathBuf,
}

/// A fresh directory for the server on `port`, under the system's temp.
fn server_dir(port: u16) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ratatosk-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the server's directory");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// A redis-server with more arguments (`--replicaof host port`, say).
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = server_dir(port);
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is not installed: scripts/test installs it (apt-get install redis-server)");
        RedisServer::answering(child, port, dir).await
    }

    /// A real redis-sentinel (Debian's package) watching the primary on
    /// `primary` as `master_name`, alone (quorum 1), with its config file
    /// (which it rewrites) in a fresh directory under the system's temp.
    pub async fn sentinel(master_name: &str, primary: u16) -> RedisServer {
        let port = free_port();
        let dir = server_dir(port);
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master_name} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\nsentinel failover-timeout {master_name} 5000\n",
                dir.display()
            ),
        )
        .expect("the sentinel's config");
        let child = std::process::Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-sentinel is not installed: scripts/test installs it (apt-get install redis-sentinel)");
        RedisServer::answering(child, port, dir).await
    }

    async fn answering(
        child: std::process::Child,
        port: u16,
        dir: std::path::PathBuf,
    ) -> RedisServer {
        let server = RedisServer { child, port, dir };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut pong = [0u8; 7];
                if sock.write_all(b"PING\r\n").await.is_ok()
                    && sock.read_exact(&mut pong).await.is_ok()
                    && &pong == b"+PONG\r\n"
                {
                    return server;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `check` turns true within `within`, asked every 10 ms.
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
