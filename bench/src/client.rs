//! A minimal HTTP/1.1 client on hyper: one connection, one request at a time.
//! Every wait is bounded by a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::net::Sources;

/// Where requests go: a loopback `http://` URL split into its parts.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl Target {
    /// Parses `http://127.x.y.z:port/path`. Only loopback IPv4 literals are
    /// accepted: benchmark traffic stays on this machine.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL '{url}'"))?;
        if uri.scheme_str() != Some("http") {
            bail!("'{url}': only http:// URLs are supported");
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("'{url}' has no host"))?
            .to_string();
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("'{url}': the host must be an IP literal with a port"))?;
        if !addr.ip().is_loopback() {
            bail!("'{url}': benchmark traffic goes to loopback addresses only");
        }
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            addr,
            authority,
            path,
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> Self {
        Self {
            path: path.to_owned(),
            ..self.clone()
        }
    }

    /// A request builder for `method` on this target's path.
    pub fn request(&self, method: Method) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    timeout: Duration,
}

impl Conn {
    /// Connects as connection number `i` (which picks the source address).
    pub async fn open(
        sources: &Sources,
        i: usize,
        target: &Target,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let stream = tokio::time::timeout(timeout, sources.connect(i, target.addr))
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", target.addr))?
            .with_context(|| format!("connecting to {}", target.addr))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { send, timeout })
    }

    /// False once the server has closed the connection (e.g. after a
    /// `Connection: close` answer): the next request would not be sent.
    pub async fn usable(&mut self) -> bool {
        matches!(
            tokio::time::timeout(self.timeout, self.send.ready()).await,
            Ok(Ok(()))
        )
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        let exchange = async {
            self.send.ready().await.context("connection closed")?;
            let resp = self
                .send
                .send_request(req)
                .await
                .context("request failed")?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.context("reading the body")?.to_bytes();
            Ok::<_, anyhow::Error>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| anyhow!("no complete answer within {:?}", self.timeout))?
    }
}

/// True if `body` holds a JSON-RPC result (JSON or SSE framing).
pub fn is_result(body: &[u8]) -> bool {
    body.windows(8).any(|w| w == b"\"result\"")
}
