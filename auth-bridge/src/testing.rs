//! A stand-in identity provider for unit tests: discovery, JWKS and
//! introspection on loopback, with tokens signed by a key made per test.
//! The end-to-end tests use a real Keycloak instead.

pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey;
use serde_json::{Value, json};

pub const AUDIENCE: &str = "http://gateway.test";

/// A fresh ES256 signing key, and its public JWK.
fn es256_key() -> (EncodingKey, Value) {
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let der = secret.to_pkcs8_der().expect("der");
    let mut jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string()).expect("jwk");
    jwk["alg"] = json!("ES256");
    (EncodingKey::from_ec_der(der.as_bytes()), jwk)
}

/// A fresh P-256 private key, PKCS#8 PEM.
pub fn ec_private_key_pem() -> String {
    p256::SecretKey::random(&mut rand_core::OsRng)
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .expect("pem")
        .to_string()
}

/// The claims of a JWT, unverified (for test bookkeeping only).
pub fn unverified_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}
/// The client id logout tokens are addressed to.
pub const LOGOUT_CLIENT: &str = "mcp-client";
pub const KID: &str = "test-key-1";

pub struct FakeIdp {
    pub issuer: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    pub introspections: Arc<AtomicUsize>,
    /// The most introspection calls that were in progress at once.
    pub most_concurrent_introspections: Arc<AtomicUsize>,
    pub jwks_fetches: Arc<AtomicUsize>,
    /// Answers garbage to JWKS and introspection while set.
    pub garbage: Arc<AtomicBool>,
    /// Refuses connections while set (by answering nothing: dropping them).
    pub down: Arc<AtomicBool>,
    /// Tokens introspection reports as inactive.
    pub revoked: Arc<std::sync::Mutex<Vec<String>>>,
    /// Token exchanges (RFC 8693) answered with a token.
    pub exchanges: Arc<AtomicUsize>,
    /// `expires_in` of exchanged tokens, in seconds (300 at first).
    pub exchange_lifetime: Arc<std::sync::atomic::AtomicU64>,
}

/// The audience the stand-in provider refuses to exchange for, as Keycloak
/// refuses one the gateway's client may not address.
pub const FORBIDDEN_AUDIENCE: &str = "not-for-the-gateway";

impl FakeIdp {
    /// An IdP signing with ES256 (a key made in microseconds).
    pub async fn start() -> FakeIdp {
        let (encoding, jwk) = es256_key();
        Self::serve(encoding, jwk, Algorithm::ES256, None).await
    }

    /// [`Self::start`] over HTTPS, on `certs` (for `localhost`).
    pub async fn start_tls(certs: Arc<crate::tls::ServingCerts>) -> FakeIdp {
        let (encoding, jwk) = es256_key();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(certs.server_config(&[b"http/1.1"])));
        Self::serve(encoding, jwk, Algorithm::ES256, Some(tls)).await
    }

    /// An IdP signing with RS256 and a 2048-bit key, as Keycloak does.
    pub async fn start_rsa() -> FakeIdp {
        use base64::Engine;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("rsa key");
        let der = key.to_pkcs1_der().expect("der");
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "RSA", "alg": "RS256", "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be())});
        Self::serve(encoding, jwk, Algorithm::RS256, None).await
    }

    async fn serve(
        encoding: EncodingKey,
        mut jwk: Value,
        algorithm: Algorithm,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeIdp {
        jwk["kid"] = json!(KID);
        jwk["use"] = json!("sig");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let issuer = match tls {
            Some(_) => format!("https://localhost:{}/realms/test", addr.port()),
            None => format!("http://{addr}/realms/test"),
        };
        let idp = FakeIdp {
            issuer: issuer.clone(),
            algorithm,
            encoding,
            introspections: Default::default(),
            most_concurrent_introspections: Default::default(),
            jwks_fetches: Default::default(),
            garbage: Default::default(),
            down: Default::default(),
            revoked: Default::default(),
            exchanges: Default::default(),
            exchange_lifetime: Arc::new(300.into()),
        };
        let state = Arc::new(State {
            encoding: idp.encoding.clone(),
            exchanges: idp.exchanges.clone(),
            exchange_lifetime: idp.exchange_lifetime.clone(),
            issuer,
            jwks: json!({"keys": [jwk]}),
            introspections: idp.introspections.clone(),
            in_progress: Default::default(),
            most_concurrent: idp.most_concurrent_introspections.clone(),
            jwks_fetches: idp.jwks_fetches.clone(),
            garbage: idp.garbage.clone(),
            down: idp.down.clone(),
            revoked: idp.revoked.clone(),
            algorithm,
            key: jsonwebtoken::DecodingKey::from_jwk(
                &serde_json::from_value(jwk.clone()).expect("jwk"),
            )
            .expect("decoding key"),
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if state.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            // While down, even open connections break.
                            if state.down.load(Ordering::SeqCst) {
                                return Err("down");
                            }
                            Ok(state.answer(req).await)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        idp
    }

    /// A signed access token with these claims over sensible defaults.
    pub fn token(&self, overrides: Value) -> String {
        let now = crate::validator::unix_now();
        let mut claims = json!({
            "iss": self.issuer, "aud": [AUDIENCE, "gateway-client"], "sub": "user-1",
            "exp": now + 300, "iat": now, "sid": "session-1", "scope": "openid mcp:tools",
            "preferred_username": "alice", "azp": "mcp-client", "organization": ["org-1"],
            "typ": "Bearer",
        });
        if let (Some(c), Some(o)) = (claims.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                c.insert(k.clone(), v.clone());
            }
        }
        self.sign(&claims)
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(KID.into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }

    /// A token that looks like one of this IdP's to every check but a
    /// signature check: its claims, with another key's signature. `kid`
    /// and `alg` say which key it claims.
    pub fn forge(&self, claims: &Value, kid: &str, alg: Algorithm) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                EncodingKey::from_secret(b"not the realm's secret")
            }
            _ => {
                let secret = p256::SecretKey::random(&mut rand_core::OsRng);
                header.alg = Algorithm::ES256;
                EncodingKey::from_ec_der(secret.to_pkcs8_der().expect("der").as_bytes())
            }
        };
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    pub fn config(&self) -> crate::ProviderConfig {
        crate::ProviderConfig {
            issuer: self.issuer.clone(),
            audience: AUDIENCE.into(),
            client_scopes: vec!["organization".into(), "gateway".into()],
            client_id: Some("gateway-client".into()),
            client_secret: Some("test-secret".into()),
            timeout: Duration::from_secs(2),
            clock_skew: Duration::from_secs(0),
            jwks_min_refetch: Duration::from_secs(60),
            cache: Default::default(),
            max_token_lifetime: Duration::from_secs(600),
            logout_client_ids: vec!["mcp-client".into()],
            max_token_bytes: 16 * 1024,
            introspection: Default::default(),
            ca_file: None,
        }
    }
}

/// A request's form body, after a pause long enough that concurrent
/// calls (introspections, exchanges) overlap.
async fn slow_form(req: Request<Incoming>) -> Bytes {
    let form = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(200)).await;
    form
}

struct State {
    issuer: String,
    jwks: Value,
    introspections: Arc<AtomicUsize>,
    in_progress: AtomicUsize,
    most_concurrent: Arc<AtomicUsize>,
    jwks_fetches: Arc<AtomicUsize>,
    garbage: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    revoked: Arc<std::sync::Mutex<Vec<String>>>,
    algorithm: Algorithm,
    key: jsonwebtoken::DecodingKey,
    encoding: EncodingKey,
    exchanges: Arc<AtomicUsize>,
    exchange_lifetime: Arc<std::sync::atomic::AtomicU64>,
}

impl State {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let garbage = self.garbage.load(Ordering::SeqCst);
        let base = "/realms/test";
        let body = if path == format!("{base}/.well-known/openid-configuration") {
            json!({
                "issuer": self.issuer,
                "authorization_endpoint": format!("{}/protocol/openid-connect/auth", self.issuer),
                "token_endpoint": format!("{}/protocol/openid-connect/token", self.issuer),
                "jwks_uri": format!("{}/protocol/openid-connect/certs", self.issuer),
                "introspection_endpoint": format!("{}/protocol/openid-connect/token/introspect", self.issuer),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
            })
            .to_string()
        } else if path == format!("{base}/protocol/openid-connect/certs") {
            self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            if garbage {
                "<html>oops</html>".into()
            } else {
                self.jwks.to_string()
            }
        } else if path == format!("{base}/protocol/openid-connect/token/introspect") {
            self.introspections.fetch_add(1, Ordering::SeqCst);
            let now = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_concurrent.fetch_max(now, Ordering::SeqCst);
            let form = slow_form(req).await;
            self.in_progress.fetch_sub(1, Ordering::SeqCst);
            if garbage {
                "not json at all".into()
            } else {
                let token = url::form_urlencoded::parse(&form)
                    .find(|(k, _)| k == "token")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                self.introspect(&token).to_string()
            }
        } else if path == format!("{base}/protocol/openid-connect/token") {
            return self.exchange(&slow_form(req).await);
        } else {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::new()))
                .expect("response");
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("response")
    }

    /// RFC 8693 as Keycloak answers it: a token for the audience, with the
    /// subject token's `sub` and `sid`; 400 for a token it does not take
    /// or an audience it will not address.
    fn exchange(&self, form: &[u8]) -> Response<Full<Bytes>> {
        let field = |name: &str| {
            url::form_urlencoded::parse(form)
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let refuse = |error: &str, description: &str| {
            Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"error": error, "error_description": description}).to_string(),
                )))
                .expect("response")
        };
        if field("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" {
            return refuse("unsupported_grant_type", "not a token exchange");
        }
        let subject = self.introspect(&field("subject_token"));
        if subject["active"] != json!(true) {
            return refuse("invalid_request", "Invalid token");
        }
        let audience = field("audience");
        if audience == FORBIDDEN_AUDIENCE {
            return refuse("invalid_request", "Requested audience not available");
        }
        self.exchanges.fetch_add(1, Ordering::SeqCst);
        let lifetime = self.exchange_lifetime.load(Ordering::SeqCst);
        let now = crate::validator::unix_now();
        let claims = json!({"iss": self.issuer, "aud": audience, "sub": subject["sub"],
            "sid": subject["sid"], "azp": "gateway-client", "iat": now, "exp": now + lifetime as i64,
            "typ": "Bearer"});
        let mut header = Header::new(self.algorithm);
        header.kid = Some(KID.into());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding).expect("sign");
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime,
                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})
                .to_string(),
            )))
            .expect("response")
    }

    /// Active if the token is one of ours (signature), unexpired, and not revoked.
    fn introspect(&self, token: &str) -> Value {
        if self
            .revoked
            .lock()
            .map(|r| r.iter().any(|t| t == token))
            .unwrap_or(false)
        {
            return json!({"active": false});
        }
        let mut v = jsonwebtoken::Validation::new(self.algorithm);
        v.validate_aud = false;
        v.leeway = 0;
        match jsonwebtoken::decode::<Value>(token, &self.key, &v) {
            Ok(data) => {
                let mut claims = data.claims;
                claims["active"] = json!(true);
                claims
            }
            Err(_) => json!({"active": false}),
        }
    }
}
