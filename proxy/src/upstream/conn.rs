//! The gateway's HTTP/1.1 client toward replicas: Pingora's HTTP/1.1 codec
//! (its client session reads the answer's head and body) over connections
//! kept per thread and per replica.
//!
//! Why not a general client (reqwest/hyper, used before): its connection
//! is driven by a task of its own, so every request crossed a channel and
//! woke that task, and it parsed the URL again per request. Here the request
//! is read in the task that sent it, the head and body leave in one write,
//! and a replica's URL is parsed once (bench/RESULTS.md, scenario I).
//!
//! A connection goes back to its thread's idle list when its answer has been
//! read to the end and both sides keep it alive; otherwise it is closed. An
//! idle connection the replica closed is found out (a read that does not
//! wait) before it is used again.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use pingora_core::protocols::http::v1::client::{HttpSession, http_req_header_to_wire};
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_http::RequestHeader;
use rustls::pki_types::ServerName;
use thread_local::ThreadLocal;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Idle connections kept per replica and thread; more are closed.
const MAX_IDLE: usize = 256;
/// How long a connection may sit idle before it is closed rather than used.
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Where one replica is, parsed once from its URL.
#[derive(Debug)]
pub struct Target {
    host: String,
    port: u16,
    /// `Host` as the URL gives it (with the port if it has one).
    authority: HeaderValue,
    /// The path and query requests go to.
    path: http::Uri,
    /// The name its certificate must carry, for `https://`.
    tls: Option<ServerName<'static>>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        let tls = match parsed.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("the scheme must be http or https, not `{other}`")),
        };
        let host = parsed.host_str().ok_or("the URL has no host")?;
        let port = parsed
            .port_or_known_default()
            .ok_or("the URL has no port")?;
        let authority = &parsed[url::Position::BeforeHost..url::Position::AfterPort];
        let authority = HeaderValue::from_str(authority).map_err(|e| e.to_string())?;
        let path = &parsed[url::Position::BeforePath..url::Position::AfterQuery];
        let path = if path.is_empty() { "/" } else { path };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tls = if tls {
            Some(
                ServerName::try_from(bare.to_owned())
                    .map_err(|e| format!("`{bare}` is not a TLS server name: {e}"))?,
            )
        } else {
            None
        };
        Ok(Target {
            host: bare.to_owned(),
            port,
            authority,
            path: path
                .parse()
                .map_err(|e| format!("the path `{path}`: {e}"))?,
            tls,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Why a request got no answer head.
#[derive(Debug)]
pub enum SendError {
    /// The replica could not be connected to: the request never left.
    Connect(String),
    /// The replica's certificate failed the check (rustls's reason).
    Tls(String),
    /// The request was (or may have been) sent, and then failed.
    Failed(String),
}

/// One pool's connections to its replicas, kept per thread.
pub struct Client {
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    idle: Arc<IdleLists>,
}

/// Per thread, per replica: the idle connections, oldest first. The newest
/// is used first; the oldest leave once idle for [`IDLE_FOR`], so a burst's
/// connections do not stay open (perhaps closed by the replica) for good.
struct IdleLists {
    replicas: usize,
    lists: ThreadLocal<RefCell<Vec<VecDeque<Idle>>>>,
}

struct Idle {
    stream: Stream,
    since: Instant,
}

impl IdleLists {
    fn with<R>(&self, index: usize, f: impl FnOnce(&mut VecDeque<Idle>) -> R) -> Option<R> {
        let cell = self
            .lists
            .get_or(|| RefCell::new((0..self.replicas).map(|_| VecDeque::new()).collect()));
        let mut lists = cell.borrow_mut();
        let list = lists.get_mut(index)?;
        while list
            .front()
            .is_some_and(|idle| idle.since.elapsed() >= IDLE_FOR)
        {
            list.pop_front();
        }
        Some(f(list))
    }

    /// An idle connection to replica `index` that is still open.
    fn take(&self, index: usize) -> Option<Stream> {
        loop {
            let idle = self.with(index, VecDeque::pop_back).flatten()?;
            if still_open(&idle.stream) {
                return Some(idle.stream);
            }
            // Dropped, so closed.
        }
    }

    fn put(&self, index: usize, stream: Stream) {
        self.with(index, |list| {
            if list.len() >= MAX_IDLE {
                list.pop_front();
            }
            list.push_back(Idle {
                stream,
                since: Instant::now(),
            });
        });
    }
}

/// Whether the peer has neither closed `stream` nor sent anything unasked
/// (which would be read as the next answer). The socket is asked directly
/// (a peek that does not wait): the runtime's view of it may be older.
fn still_open(stream: &Stream) -> bool {
    let Some(conn) = stream.as_any().downcast_ref::<Conn>() else {
        return false;
    };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(conn.tcp()).peek(&mut byte) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        // Closed (0), or bytes nobody asked for: on TLS perhaps a record
        // the next read would take care of, but a new connection is safe.
        Ok(_) => false,
    }
}

impl Client {
    pub fn new(
        replicas: usize,
        connect_timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Client {
        Client {
            tls: tls.map(|c| tokio_rustls::TlsConnector::from(Arc::new(c))),
            connect_timeout,
            idle: Arc::new(IdleLists {
                replicas,
                lists: ThreadLocal::new(),
            }),
        }
    }

    /// A new connection to `target`, TLS included, within the connect
    /// timeout.
    async fn connect(&self, target: &Target) -> Result<Stream, SendError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port));
        let tcp = match tokio::time::timeout(self.connect_timeout, tcp).await {
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )));
            }
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let Some(name) = &target.tls else {
            return Ok(Box::new(Conn::Plain(tcp)));
        };
        let Some(tls) = &self.tls else {
            return Err(SendError::Failed("no TLS client configured".into()));
        };
        let handshake = tls.connect(name.clone(), tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => Err(SendError::Connect(format!(
                "no TLS handshake within {:?}",
                self.connect_timeout
            ))),
            Ok(Err(e)) => Err(match ratatosk_auth::tls::tls_reason(&e) {
                Some(reason) => SendError::Tls(reason),
                None => SendError::Connect(format!("TLS handshake: {e}")),
            }),
            Ok(Ok(tls)) => Ok(Box::new(Conn::Tls(Box::new(tls)))),
        }
    }

    /// Sends one request to replica `index` at `target` and reads the head
    /// of its answer. The body is read from the [`Response`].
    pub async fn send(
        &self,
        index: usize,
        target: &Target,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, SendError> {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = method;
        parts.uri = target.path.clone();
        parts.headers = headers;
        parts.headers.insert(header::HOST, target.authority.clone());
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let head = RequestHeader::from(parts);
        let mut wire = http_req_header_to_wire(&head)
            .ok_or_else(|| SendError::Failed("the request head cannot be written".into()))?;
        wire.extend_from_slice(&body);
        // A new connection's future (TLS handshake included) is boxed: it
        // is rare, and held inline it made every request's future, and all
        // that hold it, 1.3 KB larger to move.
        let stream = match self.idle.take(index) {
            // A kept connection the replica closed since it was checked
            // fails the write: the request did not reach it, so it goes
            // on a new connection.
            Some(mut kept) => match write(&mut kept, &wire).await {
                Ok(()) => kept,
                Err(_) => Box::pin(self.fresh(target, &wire)).await?,
            },
            None => Box::pin(self.fresh(target, &wire)).await?,
        };
        // Boxed: a session is about 500 bytes, and answers move around.
        let mut session = Box::new(HttpSession::new(stream));
        loop {
            session
                .read_response()
                .await
                .map_err(|e| SendError::Failed(format!("reading the answer's head: {e}")))?;
            match session.get_status() {
                Some(s) if s.is_informational() && s != StatusCode::SWITCHING_PROTOCOLS => {}
                Some(status) => {
                    return Ok(Response {
                        status,
                        session: Some(session),
                        home: Some((self.idle.clone(), index)),
                        memory: None,
                    });
                }
                None => return Err(SendError::Failed("an answer without a status".into())),
            }
        }
    }

    async fn fresh(&self, target: &Target, wire: &[u8]) -> Result<Stream, SendError> {
        let mut stream = self.connect(target).await?;
        write(&mut stream, wire)
            .await
            .map_err(|e| SendError::Failed(format!("writing the request: {e}")))?;
        Ok(stream)
    }
}

async fn write(stream: &mut Stream, wire: &[u8]) -> std::io::Result<()> {
    stream.write_all(wire).await?;
    stream.flush().await
}

type Stream = pingora_core::protocols::Stream;

/// An answer whose head has been read; its body is read with
/// [`Response::chunk`]. Read to its end, the connection is kept for the
/// next request; dropped before, it is closed.
pub struct Response {
    status: StatusCode,
    session: Option<Box<HttpSession>>,
    home: Option<(Arc<IdleLists>, usize)>,
    /// An answer made in-process (an `openapi` server's): its headers,
    /// and its body until read.
    memory: Option<Box<(HeaderMap, Option<Bytes>)>>,
}

impl Response {
    /// An answer made in-process, not read from a connection.
    pub fn in_memory(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response {
        Response {
            status,
            session: None,
            home: None,
            memory: Some(Box::new((headers, Some(body)))),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A header of the answer (`None` too once the body has been read).
    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&HeaderValue> {
        if let Some(memory) = &self.memory {
            return memory.0.get(name);
        }
        self.session.as_ref()?.get_header(name)
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    /// The next piece of the body, or `None` at its end.
    pub async fn chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(memory) = self.memory.as_mut() {
            return Ok(memory.1.take().filter(|b| !b.is_empty()));
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(None);
        };
        loop {
            match session.read_body_bytes().await {
                Ok(Some(chunk)) if chunk.is_empty() => continue,
                Ok(Some(chunk)) => return Ok(Some(chunk)),
                Ok(None) => {
                    self.keep();
                    return Ok(None);
                }
                Err(e) => {
                    // Closed, not kept: it is dropped with the session.
                    self.session = None;
                    return Err(std::io::Error::other(e.to_string()));
                }
            }
        }
    }

    /// The body as a stream of pieces.
    pub fn into_stream(self) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
        futures::stream::unfold(self, |mut response| async move {
            match response.chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), response)),
                Ok(None) => None,
                Err(e) => Some((Err(e), response)),
            }
        })
    }

    /// Gives the connection back for another request if its answer is read
    /// to the end and neither side asked to close it.
    fn keep(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        if !session.is_body_done() {
            return;
        }
        session.respect_keepalive();
        if session.will_keepalive()
            && let Some((lists, index)) = &self.home
        {
            lists.put(*index, session.into_inner());
        }
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        // A body-less answer (202, 204, an empty JSON) is complete unread.
        self.keep();
    }
}

/// A connection to a replica, plain or TLS.
#[derive(Debug)]
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// What Pingora's client session asks of a stream beyond reading and
// writing: nothing that this client uses.
#[async_trait::async_trait]
impl Shutdown for Conn {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl UniqueID for Conn {
    fn id(&self) -> UniqueIDType {
        self.tcp().as_raw_fd()
    }
}

impl Ssl for Conn {}

impl Peek for Conn {}

impl GetTimingDigest for Conn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Conn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// How the test replica answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Then {
        /// Keeps the connection open for the next request.
        Keep,
        /// Closes the connection after the answer, without saying so first.
        Close,
    }

    /// A replica on loopback answering every request with `answer`; each
    /// request's head and body go to the returned receiver, and a `()`
    /// after each connection it closed. Counts connections.
    async fn replica(
        answer: &'static str,
        then: Then,
    ) -> (
        Target,
        Arc<AtomicUsize>,
        mpsc::UnboundedReceiver<Option<String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, requests) = mpsc::unbounded_channel();
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        // Every test request has a body that ends in `}`.
                        if !buf.ends_with(b"}") {
                            continue;
                        }
                        let _ = seen.send(Some(String::from_utf8_lossy(&buf).into_owned()));
                        buf.clear();
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        if let Then::Close = then {
                            drop(sock);
                            let _ = seen.send(None);
                            return;
                        }
                    }
                });
            }
        });
        let target = Target::parse(&format!("http://{addr}/mcp?x=1")).expect("target");
        (target, connections, requests)
    }

    const JSON: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        content-length: 11\r\n\r\n{\"ok\":true}";

    async fn body_of(mut response: Response) -> String {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).expect("utf-8")
    }

    fn client() -> Client {
        Client::new(1, Duration::from_secs(2), None)
    }

    async fn post(client: &Client, target: &Target, body: &'static str) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert("x-test", HeaderValue::from_static("yes"));
        client
            .send(
                0,
                target,
                Method::POST,
                headers,
                Bytes::from_static(body.as_bytes()),
            )
            .await
            .expect("answer")
    }

    #[tokio::test]
    async fn answers_read_to_the_end_leave_the_connection_for_the_next_request() {
        let (target, connections, mut requests) = replica(JSON, Then::Keep).await;
        let client = client();
        for n in 0..3 {
            let response = post(&client, &target, "{\"n\":1}").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.header(header::CONTENT_TYPE).expect("type"),
                "application/json"
            );
            assert_eq!(response.content_length(), Some(11));
            assert_eq!(body_of(response).await, "{\"ok\":true}", "request {n}");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        let first = requests.recv().await.flatten().expect("request");
        assert!(first.starts_with("POST /mcp?x=1 HTTP/1.1\r\n"), "{first}");
        let head = first.to_ascii_lowercase();
        for line in [
            "x-test: yes\r\n",
            "content-length: 7\r\n",
            "host: 127.0.0.1:",
        ] {
            assert!(head.contains(line), "{line:?} in {first}");
        }
        // Head and body left together.
        assert!(first.ends_with("\r\n\r\n{\"n\":1}"), "{first}");
    }

    #[tokio::test]
    async fn a_connection_the_replica_closed_while_idle_is_not_used() {
        let (target, connections, mut requests) = replica(JSON, Then::Close).await;
        let client = client();
        for n in 0..3 {
            let response = post(&client, &target, "{}").await;
            assert_eq!(body_of(response).await, "{\"ok\":true}", "request {n}");
            assert!(requests.recv().await.flatten().is_some());
            // The replica has closed it by now.
            assert_eq!(requests.recv().await, Some(None));
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn chunked_answers_are_read_whole_and_unread_ones_close_their_connection() {
        const CHUNKED: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                               transfer-encoding: chunked\r\n\r\n\
                               7\r\ndata: 1\r\n9\r\n\n\ndata: 2\r\n2\r\n\n\n\r\n0\r\n\r\n";
        let (target, connections, _requests) = replica(CHUNKED, Then::Keep).await;
        let client = client();
        let response = post(&client, &target, "{}").await;
        assert_eq!(body_of(response).await, "data: 1\n\ndata: 2\n\n");
        let response = post(&client, &target, "{}").await;
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "kept after a whole read"
        );
        // Dropped unread: its rest would be read as the next answer.
        drop(response);
        let response = post(&client, &target, "{}").await;
        assert_eq!(body_of(response).await, "data: 1\n\ndata: 2\n\n");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let dead = Target::parse(&crate::testing::dead_url()).expect("target");
        let sent = client()
            .send(0, &dead, Method::POST, HeaderMap::new(), Bytes::new())
            .await;
        assert!(
            matches!(sent, Err(SendError::Connect(_))),
            "{:?}",
            sent.err()
        );
    }

    #[test]
    fn targets_keep_the_authority_and_path_and_refuse_other_schemes() {
        let t = Target::parse("https://[::1]:8443/a/b?c=d").expect("target");
        assert_eq!((t.host(), t.port()), ("::1", 8443));
        assert_eq!(t.authority, "[::1]:8443");
        assert_eq!(t.path, "/a/b?c=d");
        assert!(t.tls.is_some());
        let t = Target::parse("http://example.test").expect("target");
        assert_eq!((t.port(), t.path.to_string().as_str()), (80, "/"));
        assert!(Target::parse("ftp://example.test/").is_err());
    }
}
