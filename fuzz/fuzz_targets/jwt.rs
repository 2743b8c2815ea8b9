//! Bearer tokens as the validator reads them in `jwt` mode: the
//! `Authorization` header (`bearer_token`), the JWT header
//! (`jsonwebtoken::decode_header`, read before any signature check, for its
//! `kid` and `alg`), then the signature and the claims.
//!
//! Input: a first byte whose low bit picks the form of the rest.
//! - 0: an `Authorization` header value, in `jwt` and `introspect` mode
//!   (whose precheck reads the token before any call). Nobody but the
//!   provider can sign, so it must be refused, as 400 or 401 (never 503:
//!   the keys are known), with a message of bounded length.
//! - 1: JSON claims, which the stand-in provider signs (see
//!   `ratatosk_fuzz::idp::claims`). An identity it yields must be what the
//!   claims say: the issuer and audience of the realm, a subject, an
//!   unexpired `exp`, the org the check asked for, an access token's `typ`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratatosk_auth::AuthMode;
use ratatosk_auth::testing::AUDIENCE;
use ratatosk_auth::validator::unix_now;
use ratatosk_fuzz::{idp, runtime};
use serde_json::Value;

const ORG: &str = "org-1";

fuzz_target!(|data: &[u8]| {
    let [form, rest @ ..] = data else {
        return;
    };
    let realm = idp::realm();
    if form & 1 == 0 {
        if let Ok(token) = ratatosk_auth::bearer_token(Some(rest), 16 * 1024) {
            let _ = jsonwebtoken::decode_header(token);
        }
        // Introspect mode refuses such a token before any call
        // (`Validator::precheck`): no provider call is made here.
        for mode in [AuthMode::Jwt, AuthMode::Introspect] {
            let result =
                runtime().block_on(realm.validator.authenticate(Some(rest), mode, ORG, &[]));
            let e = result.expect_err("a token nobody signed was accepted");
            assert!(matches!(e.status(), 400 | 401), "{mode:?}: {e:?}");
            assert!(e.client_message().len() <= 512, "{mode:?}: {e:?}");
        }
        return;
    }
    let now = unix_now();
    let Some(claims) = idp::claims(rest, &realm.idp.issuer, now) else {
        return;
    };
    let token = realm.idp.sign(&claims);
    let header = format!("Bearer {token}");
    let result = runtime().block_on(realm.validator.authenticate(
        Some(header.as_bytes()),
        AuthMode::Jwt,
        ORG,
        &[],
    ));
    let Ok(identity) = result else {
        return;
    };
    assert_eq!(claims["iss"], Value::from(realm.idp.issuer.as_str()));
    let audience = &claims["aud"];
    assert!(
        audience == AUDIENCE
            || audience
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == AUDIENCE)),
        "accepted for audience {audience}"
    );
    assert_eq!(claims["sub"], Value::from(identity.subject.as_str()));
    assert!(!identity.subject.is_empty());
    let exp = claims["exp"]
        .as_i64()
        .expect("an accepted token has a numeric exp");
    assert!(exp + 30 >= now, "accepted {} s after exp", now - exp);
    assert!(identity.belongs_to(ORG));
    let typ = &claims["typ"];
    assert!(
        typ.is_null()
            || typ
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("bearer")),
        "accepted a token of typ {typ}"
    );
});
