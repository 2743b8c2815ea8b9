//! A minimal HTTP/1.1 client on hyper: one connection, one request at a time,
//! over TCP or TLS. Every wait is bounded by a timeout.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::net::Sources;

/// A connection's byte stream: TCP, or TLS over TCP.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// How an `https://` target is reached: the client config (trusting the
/// CA given) and the name checked, the IP literal of the URL.
#[derive(Clone)]
pub struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish()
    }
}

/// A TLS client config that trusts the certificates in the PEM file `ca`
/// only, offering HTTP/1.1.
pub fn tls_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    // ring, as the gateway uses (README: "TLS").
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading the CA file {}", ca.display()))?
    {
        roots.add(cert.context("a CA certificate")?)?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where requests go: a loopback `http://` or `https://` URL split into
/// its parts.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
    pub tls: Option<Tls>,
}

impl Target {
    /// Parses `http://127.x.y.z:port/path`, or `https://` with `tls` (the
    /// client config of [`tls_config`]). Only loopback IPv4 literals are
    /// accepted: benchmark traffic stays on this machine.
    pub fn parse(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL '{url}'"))?;
        let https = match (uri.scheme_str(), tls) {
            (Some("http"), _) => false,
            (Some("https"), Some(_)) => true,
            (Some("https"), None) => bail!("'{url}': https:// needs --ca-file"),
            _ => bail!("'{url}': only http:// and https:// URLs are supported"),
        };
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
        let tls = match tls {
            Some(config) if https => Some(Tls {
                connector: tokio_rustls::TlsConnector::from(config.clone()),
                name: rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            }),
            _ => None,
        };
        Ok(Self {
            addr,
            authority,
            path,
            tls,
        })
    }

    /// Connects as connection number `i` (which picks the source address),
    /// with the TLS handshake for an `https://` target.
    pub async fn dial(&self, sources: &Sources, i: usize) -> std::io::Result<Box<dyn Io>> {
        let tcp = sources.connect(i, self.addr).await?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => Ok(Box::new(
                tls.connector.connect(tls.name.clone(), tcp).await?,
            )),
        }
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
        let stream = tokio::time::timeout(timeout, target.dial(sources, i))
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
