//! TLS for every hop of the gateway and the forward-auth server: one rustls
//! stack with `ring` as its one crypto provider (README: "TLS").
//!
//! - [`ServingCerts`]: a listener's certificate and key (and, for mTLS, the
//!   CA its clients' certificates must chain to), read from PEM files and
//!   re-read by [`ServingCerts::reload`] without dropping a connection: new
//!   handshakes get the new files, open connections keep their session.
//! - [`ClientTls`]: what a client of an upstream, the identity provider or
//!   Redis trusts and presents: a CA file (or the system's roots), and an
//!   optional client certificate.
//! - [`tls_reason`]: why a connection failed its TLS check, dug out of the
//!   error chain a client library returns.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Makes `ring` the process's crypto provider. Every TLS client and server
/// of the process needs one; calling this again is harmless. Call it before
/// building any client (tests never go through `main`).
pub fn install_crypto() {
    let _ = ring().install_default();
}

/// `ring`, which rustls 0.23.48 marks deprecated because it lacks the
/// post-quantum hybrid key exchange that `aws-lc-rs` has. It is kept for a
/// build with no C library to compile beyond ring's own, and because
/// Pingora's rustls listener installs it too (README: "TLS").
#[allow(deprecated)]
fn ring() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn provider() -> Arc<CryptoProvider> {
    install_crypto();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(ring()))
}

/// A TLS problem, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TlsError {
    #[error("cannot read `{path}`: {reason}")]
    Read { path: String, reason: String },
    #[error("`{path}` holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("`{path}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the key in `{key}` does not fit the certificate in `{cert}`: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("`{path}` is not a usable CA bundle: {reason}")]
    BadCa { path: String, reason: String },
}

/// Whether clients of an mTLS listener must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// A handshake without a certificate signed by the CA fails.
    #[default]
    Required,
    /// A certificate is asked for and checked if sent; clients without one
    /// are let through to the bearer-token check.
    Optional,
}

/// A listener's TLS files: `tls:` (the MCP listener and the forward-auth
/// server) or `admin_tls:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA (PEM bundle) that clients' certificates must chain to; set,
    /// the listener asks for client certificates (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (the default) or `optional`.
    #[serde(default)]
    pub client_certs: ClientCerts,
    /// How often the files are checked for a change (they are also re-read
    /// on SIGHUP). A changed pair that does not load is logged and the
    /// running certificate stays.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(60)
}

impl ListenerTls {
    /// Every problem with the files, as (field, message) pairs; an empty
    /// field is the section itself.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = Loaded::read(self) {
            out.push((String::new(), e.to_string()));
        }
        if self.reload_interval < Duration::from_secs(1) {
            out.push((
                "reload_interval".to_owned(),
                format!("must be at least 1s, got {:?}", self.reload_interval),
            ));
        }
        out
    }
}

/// What was loaded from a listener's files, and their fingerprint.
struct Loaded {
    key: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// SHA-256 of the files' bytes, to skip unchanged files.
    files: [u8; 32],
}

impl Loaded {
    fn read(tls: &ListenerTls) -> Result<Loaded, TlsError> {
        let cert_pem = read(&tls.cert_file)?;
        let key_pem = read(&tls.key_file)?;
        let ca_pem = tls.client_ca_file.as_deref().map(read).transpose()?;
        let mut files = Sha256::new();
        files.update(&cert_pem);
        files.update(&key_pem);
        if let Some(ca) = &ca_pem {
            files.update(ca);
        }
        let key = certified_key(&tls.cert_file, &cert_pem, &tls.key_file, &key_pem)?;
        let verifier = match (&tls.client_ca_file, &ca_pem) {
            (Some(path), Some(pem)) => Some(client_verifier(path, pem, tls.client_certs)?),
            _ => None,
        };
        Ok(Loaded {
            key: Arc::new(key),
            verifier,
            files: files.finalize().into(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The certificates of a PEM file's bytes.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = certificates(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
        path: key_path.display().to_string(),
    })?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A root store of the CA certificates in a PEM bundle.
pub fn root_store(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn client_verifier(
    path: &Path,
    pem: &[u8],
    mode: ClientCerts,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(path, pem)?), provider());
    let builder = match mode {
        ClientCerts::Required => builder,
        ClientCerts::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|e| TlsError::BadCa {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A listener's certificate (and client CA), swapped in place on reload.
/// One instance serves every listener thread: it is the rustls certificate
/// resolver and client verifier of each.
pub struct ServingCerts {
    files: ListenerTls,
    /// What the listener is, for logs (`tls`, `admin_tls`).
    name: &'static str,
    key: RwLock<Arc<CertifiedKey>>,
    verifier: Option<Arc<ReloadingVerifier>>,
    fingerprint: Mutex<[u8; 32]>,
}

impl fmt::Debug for ServingCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCerts")
            .field("name", &self.name)
            .field("cert_file", &self.files.cert_file)
            .finish_non_exhaustive()
    }
}

impl ServingCerts {
    /// Reads the files; a problem names the file and what is wrong.
    pub fn load(name: &'static str, files: &ListenerTls) -> Result<Arc<ServingCerts>, TlsError> {
        let loaded = Loaded::read(files)?;
        let certs = ServingCerts {
            files: files.clone(),
            name,
            key: RwLock::new(loaded.key.clone()),
            verifier: loaded
                .verifier
                .map(|v| Arc::new(ReloadingVerifier(RwLock::new(v)))),
            fingerprint: Mutex::new(loaded.files),
        };
        tracing::info!(
            listener = name,
            cert = %files.cert_file.display(),
            leaf_sha256 = %certs.leaf_sha256(),
            client_ca = ?files.client_ca_file,
            "TLS certificate loaded"
        );
        Ok(Arc::new(certs))
    }

    /// Re-reads the files if they changed. `Ok(true)`: the new pair serves
    /// new handshakes from now on. `Err`: the running pair stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let loaded = Loaded::read(&self.files)?;
        let mut fingerprint = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *fingerprint == loaded.files {
            return Ok(false);
        }
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = loaded.key;
        if let (Some(slot), Some(new)) = (&self.verifier, loaded.verifier) {
            *slot.0.write().unwrap_or_else(|p| p.into_inner()) = new;
        }
        *fingerprint = loaded.files;
        Ok(true)
    }

    /// [`Self::reload`], logged: what a SIGHUP or the timer runs.
    pub fn reload_logged(&self, why: &str) -> Reload {
        match self.reload() {
            Ok(true) => {
                tracing::info!(
                    listener = self.name,
                    why,
                    leaf_sha256 = %self.leaf_sha256(),
                    "TLS certificate reloaded: new connections get it"
                );
                Reload::Reloaded
            }
            Ok(false) => Reload::Unchanged,
            Err(e) => {
                tracing::error!(
                    listener = self.name,
                    why,
                    "TLS reload failed, the running certificate stays: {e}"
                );
                Reload::Failed
            }
        }
    }

    /// How often the files are checked.
    pub fn reload_interval(&self) -> Duration {
        self.files.reload_interval
    }

    /// The listener's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The first 16 hex digits of the serving leaf certificate's SHA-256.
    pub fn leaf_sha256(&self) -> String {
        let key = self.current();
        let Some(leaf) = key.cert.first() else {
            return String::new();
        };
        Sha256::digest(leaf.as_ref())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The client-certificate check, when the listener has `client_ca_file`.
    pub fn client_verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.verifier
            .clone()
            .map(|v| v as Arc<dyn ClientCertVerifier>)
    }

    /// A rustls server config on these certificates, offering `alpn`.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| rustls::ServerConfig::builder());
        let builder = match self.client_verifier() {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

impl ResolvesServerCert for ServingCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// New files serve new handshakes.
    Reloaded,
    /// The new files did not load; the running ones stay.
    Failed,
}

impl Reload {
    pub fn as_str(self) -> &'static str {
        match self {
            Reload::Unchanged => "unchanged",
            Reload::Reloaded => "reloaded",
            Reload::Failed => "failed",
        }
    }
}

/// Starts a thread that reloads `certs` whenever `hangups` receives (a
/// SIGHUP), and every `reload_interval` (the shortest of them); `counted`
/// hears of each reload that did something. The thread ends when the
/// sending side of `hangups` is gone.
pub fn keep_fresh(
    certs: Vec<Arc<ServingCerts>>,
    hangups: std::sync::mpsc::Receiver<()>,
    counted: impl Fn(&ServingCerts, Reload) + Send + 'static,
) -> std::io::Result<()> {
    let Some(every) = certs.iter().map(|c| c.reload_interval()).min() else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("ratatosk-tls-reload".into())
        .spawn(move || {
            loop {
                let why = match hangups.recv_timeout(every) {
                    Ok(()) => "SIGHUP",
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => "timer",
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                };
                for c in &certs {
                    let done = c.reload_logged(why);
                    if done != Reload::Unchanged {
                        counted(c, done);
                    }
                }
            }
        })
        .map(|_| ())
}

/// A client-certificate verifier whose CA is swapped on reload.
#[derive(Debug)]
struct ReloadingVerifier(RwLock<Arc<dyn ClientCertVerifier>>);

impl ReloadingVerifier {
    fn now(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.now().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.now().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 4.2.4); clients pick their one
        // certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.now()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.now().supported_verify_schemes()
    }
}

/// What a TLS client trusts and presents: `ca_file` (else the system's
/// roots), and an optional client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// The CA bundle (PEM) the server's certificate must chain to, in place
    /// of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) to present, with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Accept any certificate: for a test bench only. The gateway warns
    /// loudly at start for every place that sets it.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A [`ClientTls`] read and checked: the PEM bytes to hand to a client
/// library. `Debug` leaves the private key out.
#[derive(Clone, Default)]
pub struct ClientPems {
    pub ca: Option<Vec<u8>>,
    /// Certificate chain then key, as reqwest's `Identity::from_pem` takes it.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub insecure: bool,
}

impl ClientTls {
    /// Reads and checks the files.
    pub fn load(&self) -> Result<ClientPems, ClientTlsError> {
        let bad = |field: &'static str, message: String| ClientTlsError { field, message };
        if self.insecure_skip_verify && self.ca_file.is_some() {
            return Err(bad(
                "insecure_skip_verify",
                "set `ca_file` or `insecure_skip_verify`, not both".into(),
            ));
        }
        let ca = match &self.ca_file {
            Some(path) => {
                let pem = read(path).map_err(|e| bad("ca_file", e.to_string()))?;
                root_store(path, &pem).map_err(|e| bad("ca_file", e.to_string()))?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let cert_pem = read(cert).map_err(|e| bad("cert_file", e.to_string()))?;
                let key_pem = read(key).map_err(|e| bad("key_file", e.to_string()))?;
                certified_key(cert, &cert_pem, key, &key_pem)
                    .map_err(|e| bad("key_file", e.to_string()))?;
                Some((cert_pem, key_pem))
            }
            (Some(_), None) => return Err(bad("key_file", "needed beside `cert_file`".into())),
            (None, Some(_)) => return Err(bad("cert_file", "needed beside `key_file`".into())),
        };
        Ok(ClientPems {
            ca,
            identity,
            insecure: self.insecure_skip_verify,
        })
    }
}

/// A problem with a [`ClientTls`]: the field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ClientTlsError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Debug for ClientPems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPems")
            .field(
                "ca",
                &self.ca.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl ClientPems {
    /// Applies these to a reqwest client: the CA replaces the system's
    /// roots; the identity is presented.
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, reqwest::Error> {
        install_crypto();
        let mut builder = builder;
        if let Some(ca) = &self.ca {
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(ca)?);
        }
        if let Some((cert, key)) = &self.identity {
            builder = builder.identity(reqwest::Identity::from_pem(
                &[&cert[..], &key[..]].concat(),
            )?);
        }
        if self.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        Ok(builder)
    }
}

impl ClientPems {
    /// A rustls client configuration of these: the CA replaces the system's
    /// roots (else the platform's verifier checks), the identity is
    /// presented, and `insecure` accepts any certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, ClientTlsError> {
        let bad = |field: &'static str, message: String| ClientTlsError { field, message };
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", e.to_string()))?;
        let builder = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        } else if let Some(ca) = &self.ca {
            let roots =
                root_store(Path::new("ca_file"), ca).map_err(|e| bad("ca_file", e.to_string()))?;
            builder.with_root_certificates(roots)
        } else {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| bad("ca_file", format!("the system's roots: {e}")))?
        };
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let certs = certificates(Path::new("cert_file"), cert)
                    .map_err(|e| bad("cert_file", e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| bad("key_file", format!("no PEM private key: {e}")))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| bad("key_file", e.to_string()))
            }
        }
    }
}

/// The verifier of `insecure_skip_verify`: any certificate passes, but the
/// handshake's signatures are still checked against the one presented.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a connection failed its TLS check, if that is why: rustls's reason
/// (`invalid peer certificate: UnknownIssuer`, `... Expired ...`), found in
/// an error chain that may hide it inside `std::io::Error`s (whose
/// `source()` skips the error they wrap).
pub fn tls_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let mut inner = io.get_ref();
            while let Some(i) = inner {
                if let Some(r) = i.downcast_ref::<rustls::Error>() {
                    return Some(r.to_string());
                }
                inner = i
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref());
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tls::TestPki;

    fn files(pki: &TestPki, name: &str) -> ListenerTls {
        ListenerTls {
            cert_file: pki.dir.join(format!("{name}.pem")),
            key_file: pki.dir.join(format!("{name}.key")),
            client_ca_file: None,
            client_certs: ClientCerts::Required,
            reload_interval: default_reload_interval(),
        }
    }

    #[test]
    fn a_pair_loads_and_reloads_only_when_its_files_change() {
        let pki = TestPki::new("reload");
        pki.server("a", &["localhost"]);
        let certs = ServingCerts::load("tls", &files(&pki, "a")).expect("loads");
        let before = certs.leaf_sha256();
        assert_eq!(
            certs.reload(),
            Ok(false),
            "unchanged files are not reloaded"
        );
        pki.server("a", &["localhost"]);
        assert_eq!(certs.reload(), Ok(true));
        assert_ne!(certs.leaf_sha256(), before, "the new leaf serves");
    }

    #[test]
    fn a_broken_reload_keeps_the_running_pair_and_says_which_file() {
        let pki = TestPki::new("broken");
        pki.server("a", &["localhost"]);
        let certs = ServingCerts::load("tls", &files(&pki, "a")).expect("loads");
        let before = certs.leaf_sha256();
        // A key of another certificate: a half-finished rotation.
        pki.server("b", &["localhost"]);
        std::fs::copy(pki.dir.join("b.key"), pki.dir.join("a.key")).expect("copy");
        let err = certs.reload().expect_err("mismatch");
        assert!(
            matches!(&err, TlsError::Mismatch { key, .. } if key.ends_with("a.key")),
            "{err}"
        );
        assert_eq!(certs.reload_logged("test"), Reload::Failed);
        assert_eq!(certs.leaf_sha256(), before);
        std::fs::write(pki.dir.join("a.pem"), "not pem").expect("write");
        let err = certs.reload().expect_err("no cert");
        assert!(err.to_string().contains("a.pem"), "{err}");
    }

    #[test]
    fn problems_name_the_field_and_the_file() {
        let pki = TestPki::new("problems");
        let mut tls = files(&pki, "missing");
        tls.reload_interval = Duration::from_millis(10);
        let problems = tls.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, "");
        assert!(problems[0].1.starts_with("cannot read `"), "{problems:?}");
        assert!(problems[0].1.contains("missing.pem"), "{problems:?}");
        assert_eq!(problems[1].0, "reload_interval");
    }

    #[test]
    fn client_files_are_checked_in_pairs_and_name_their_field() {
        let pki = TestPki::new("client");
        pki.client("c");
        let only_cert = ClientTls {
            cert_file: Some(pki.dir.join("c.pem")),
            ..ClientTls::default()
        };
        assert_eq!(
            only_cert.load().expect_err("pair").to_string(),
            "key_file: needed beside `cert_file`"
        );
        let bad_ca = ClientTls {
            ca_file: Some(pki.dir.join("c.key")),
            ..ClientTls::default()
        };
        let err = bad_ca.load().expect_err("a key is no CA");
        assert_eq!(err.field, "ca_file", "{err}");
        let both = ClientTls {
            ca_file: Some(pki.ca_file()),
            insecure_skip_verify: true,
            ..ClientTls::default()
        };
        assert_eq!(
            both.load().expect_err("both").to_string(),
            "insecure_skip_verify: set `ca_file` or `insecure_skip_verify`, not both"
        );
        let good = ClientTls {
            ca_file: Some(pki.ca_file()),
            cert_file: Some(pki.dir.join("c.pem")),
            key_file: Some(pki.dir.join("c.key")),
            insecure_skip_verify: false,
        };
        let pems = good.load().expect("loads");
        assert!(pems.ca.is_some() && pems.identity.is_some());
        pems.apply(reqwest::Client::builder())
            .expect("applies")
            .build()
            .expect("builds");
    }

    /// Serves one-line HTTP answers over TLS on `certs`, on loopback.
    async fn https_server(certs: Arc<ServingCerts>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(certs.server_config(&[])));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    /// A GET of `addr` with `tls`, by both clients the project builds from
    /// it: reqwest's (the identity provider's, through `apply`) and a bare
    /// rustls one (the upstreams', through `client_config`), which must
    /// agree: both fail or both pass, for the same TLS reason.
    async fn get(addr: std::net::SocketAddr, tls: &ClientTls) -> Result<String, String> {
        let by_reqwest = get_with_reqwest(addr, tls).await;
        let by_rustls = get_with_rustls(addr, tls).await;
        match (&by_reqwest, &by_rustls) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) if !a.starts_with("not a TLS failure") => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => panic!("the clients disagree: reqwest {by_reqwest:?}, rustls {by_rustls:?}"),
        }
        by_reqwest
    }

    async fn get_with_rustls(
        addr: std::net::SocketAddr,
        tls: &ClientTls,
    ) -> Result<String, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = tls
            .load()
            .expect("client files")
            .client_config()
            .expect("config");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let reason =
            |e: std::io::Error| tls_reason(&e).unwrap_or_else(|| format!("not a TLS failure: {e}"));
        let mut stream = connector.connect(name, tcp).await.map_err(reason)?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .map_err(reason)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(reason)?;
        let answer = String::from_utf8_lossy(&answer);
        Ok(answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default())
    }

    async fn get_with_reqwest(
        addr: std::net::SocketAddr,
        tls: &ClientTls,
    ) -> Result<String, String> {
        let client = tls
            .load()
            .expect("client files")
            .apply(reqwest::Client::builder().no_proxy())
            .expect("apply")
            .build()
            .expect("client");
        match client
            .get(format!("https://localhost:{}/", addr.port()))
            .send()
            .await
        {
            Ok(r) => Ok(r.text().await.unwrap_or_default()),
            Err(e) => Err(tls_reason(&e).unwrap_or_else(|| format!("not a TLS failure: {e}"))),
        }
    }

    #[tokio::test]
    async fn a_client_trusts_its_ca_only_and_hears_why_a_check_failed() {
        let pki = TestPki::new("verify");
        pki.server("good", &["localhost"]);
        pki.expired_server("old", &["localhost"]);
        let other = TestPki::new("verify-other");
        let good = https_server(ServingCerts::load("t", &files(&pki, "good")).expect("good")).await;
        let old = https_server(ServingCerts::load("t", &files(&pki, "old")).expect("old")).await;
        let ours = ClientTls {
            ca_file: Some(pki.ca_file()),
            ..ClientTls::default()
        };
        assert_eq!(get(good, &ours).await, Ok("ok".into()));
        let expired = get(old, &ours).await.expect_err("expired");
        assert!(
            expired.contains("invalid peer certificate: certificate expired"),
            "{expired}"
        );
        let theirs = ClientTls {
            ca_file: Some(other.ca_file()),
            ..ClientTls::default()
        };
        let unknown = get(good, &theirs).await.expect_err("another CA");
        assert_eq!(unknown, "invalid peer certificate: UnknownIssuer");
        // The system's roots do not know the test CA either.
        let system = get(good, &ClientTls::default())
            .await
            .expect_err("system roots");
        assert!(system.contains("UnknownIssuer"), "{system}");
        let insecure = ClientTls {
            insecure_skip_verify: true,
            ..ClientTls::default()
        };
        assert_eq!(get(old, &insecure).await, Ok("ok".into()));
    }

    #[tokio::test]
    async fn an_mtls_listener_wants_a_client_certificate_of_its_ca() {
        let pki = TestPki::new("mtls");
        pki.server("srv", &["localhost"]);
        pki.client("alice");
        let other = TestPki::new("mtls-other");
        other.client("mallory");
        let mut required = files(&pki, "srv");
        required.client_ca_file = Some(pki.ca_file());
        let addr = https_server(ServingCerts::load("t", &required).expect("load")).await;
        let with = |pki: &TestPki, name: &str| ClientTls {
            ca_file: Some(pki.ca_file()),
            cert_file: Some(pki.dir.join(format!("{name}.pem"))),
            key_file: Some(pki.dir.join(format!("{name}.key"))),
            insecure_skip_verify: false,
        };
        assert_eq!(get(addr, &with(&pki, "alice")).await, Ok("ok".into()));
        let mut mallory = with(&other, "mallory");
        mallory.ca_file = Some(pki.ca_file());
        assert!(
            get(addr, &mallory).await.is_err(),
            "a certificate of another CA"
        );
        let none = ClientTls {
            ca_file: Some(pki.ca_file()),
            ..ClientTls::default()
        };
        assert!(get(addr, &none).await.is_err(), "no certificate");

        let mut optional = required.clone();
        optional.client_certs = ClientCerts::Optional;
        let addr = https_server(ServingCerts::load("t", &optional).expect("load")).await;
        assert_eq!(
            get(addr, &none).await,
            Ok("ok".into()),
            "optional: none is fine"
        );
        assert!(
            get(addr, &mallory).await.is_err(),
            "optional: a bad one is not"
        );
    }
}
