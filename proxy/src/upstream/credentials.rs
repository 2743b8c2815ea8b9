//! The credential each upstream gets with a request, for its caller
//! (`upstream.auth`): none beyond the `Ratatosk-*` headers, a static
//! header, or a JWT the gateway signs. The client's own token is never
//! one of them.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ratatosk_auth::Identity;
use ratatosk_auth::upstream_jwt::UpstreamSigner;

use crate::config::UpstreamAuth;

/// The subject of the gateway's own requests (an era probe), which no
/// caller makes.
const GATEWAY_SUBJECT: &str = "ratatosk-gateway";

pub enum Credentials {
    /// `auth: headers`: the `Ratatosk-*` headers say it all.
    None,
    Static(HeaderName, HeaderValue),
    Jwt {
        signer: Arc<UpstreamSigner>,
        org: String,
        audience: String,
        /// Who the gateway's own requests are from.
        gateway: Box<Identity>,
    },
}

impl Credentials {
    /// The credentials of the upstream of `route` (`<org>` or
    /// `<org>/<server>`) of `org`.
    pub fn new(
        route: &str,
        org: &str,
        auth: &UpstreamAuth,
        signer: Option<&Arc<UpstreamSigner>>,
    ) -> Result<Credentials, String> {
        Ok(match auth {
            UpstreamAuth::Headers {} => Credentials::None,
            UpstreamAuth::Static { header, value } => {
                let name = HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("`{header}` is not a header name"))?;
                let mut value = HeaderValue::from_str(value)
                    .map_err(|_| "the static value is not a header value".to_owned())?;
                value.set_sensitive(true);
                Credentials::Static(name, value)
            }
            UpstreamAuth::GatewayJwt { audience } => {
                let signer = signer.ok_or("`gateway-jwt` needs the top-level `upstream_jwt`")?;
                let mut gateway = Identity::anonymous(org);
                gateway.subject = GATEWAY_SUBJECT.to_owned();
                Credentials::Jwt {
                    signer: signer.clone(),
                    org: org.to_owned(),
                    audience: audience.clone().unwrap_or_else(|| route.to_owned()),
                    gateway: Box::new(gateway),
                }
            }
        })
    }

    /// Adds the credential for `caller` (`None`: the gateway's own request).
    pub fn apply(&self, caller: Option<&Identity>, headers: &mut HeaderMap) -> Result<(), String> {
        match self {
            Credentials::None => {}
            Credentials::Static(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            Credentials::Jwt {
                signer,
                org,
                audience,
                gateway,
            } => {
                let bearer = signer.bearer(caller.unwrap_or(gateway.as_ref()), org, audience)?;
                headers.insert(header::AUTHORIZATION, bearer);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_adds_its_credential_and_headers_mode_none() {
        let mut h = HeaderMap::new();
        Credentials::new("o", "o", &UpstreamAuth::default(), None)
            .expect("headers")
            .apply(None, &mut h)
            .expect("apply");
        assert!(h.is_empty());

        let api_key = UpstreamAuth::Static {
            header: "x-api-key".into(),
            value: "k-1".into(),
        };
        Credentials::new("o", "o", &api_key, None)
            .expect("static")
            .apply(None, &mut h)
            .expect("apply");
        assert_eq!(h.get("x-api-key").expect("key"), "k-1");
        assert!(h.get("x-api-key").expect("key").is_sensitive());

        let jwt = UpstreamAuth::GatewayJwt { audience: None };
        assert!(
            Credentials::new("o/s", "o", &jwt, None).is_err(),
            "needs a signer"
        );
        let config: ratatosk_auth::upstream_jwt::UpstreamJwtConfig =
            yaml_serde::from_str(&format!(
                "key: |\n  {}\n",
                ratatosk_auth::testing::ec_private_key_pem().replace('\n', "\n  ")
            ))
            .expect("config");
        let signer = Arc::new(UpstreamSigner::new(&config, "https://gw").expect("signer"));
        let mut alice = Identity::anonymous("o");
        alice.subject = "alice".into();
        let mut h = HeaderMap::new();
        let creds = Credentials::new("o/s", "o", &jwt, Some(&signer)).expect("jwt");
        creds.apply(Some(&alice), &mut h).expect("apply");
        let bearer = h[header::AUTHORIZATION].to_str().expect("ascii").to_owned();
        let claims =
            ratatosk_auth::testing::unverified_claims(bearer.trim_start_matches("Bearer "));
        assert_eq!(
            (claims["sub"].as_str(), claims["aud"].as_str()),
            (Some("alice"), Some("o/s"))
        );
        creds.apply(None, &mut h).expect("the gateway's own");
        let bearer = h[header::AUTHORIZATION].to_str().expect("ascii").to_owned();
        let claims =
            ratatosk_auth::testing::unverified_claims(bearer.trim_start_matches("Bearer "));
        assert_eq!(claims["sub"], GATEWAY_SUBJECT);
    }
}
