//! Back-channel logout requests: the form body, its `logout_token`, the
//! JWT header read before any key is looked up, then the signed claims
//! (`logout::verify` through `Validator::backchannel_logout`).
//!
//! Input: a first byte whose low bit picks the form of the rest.
//! - 0: the request body. Nobody but the provider can sign, so it must be
//!   refused: 400, or 503 for a key the validator does not know.
//! - 1: JSON claims, which the stand-in provider signs (see
//!   `ratatosk_fuzz::idp::claims`) into a form. A logout it accepts must
//!   be what OIDC Back-Channel Logout 1.0 allows: the realm's issuer, a
//!   configured client as audience, the logout event, no nonce, a recent
//!   `iat`, and the `sid`/`sub` it ends taken from the claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratatosk_auth::logout::BACKCHANNEL_LOGOUT_EVENT;
use ratatosk_auth::testing::LOGOUT_CLIENT;
use ratatosk_auth::validator::unix_now;
use ratatosk_fuzz::{idp, runtime};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [form, rest @ ..] = data else {
        return;
    };
    let realm = idp::realm();
    if form & 1 == 0 {
        let result = runtime().block_on(realm.validator.backchannel_logout(rest));
        let e = result.expect_err("a logout token nobody signed was accepted");
        let (status, body) = e.answer();
        assert!(matches!(status.as_u16(), 400 | 503), "{e:?}");
        assert!(body["error"].is_string());
        return;
    }
    let now = unix_now();
    let Some(claims) = idp::claims(rest, &realm.idp.issuer, now) else {
        return;
    };
    let token = realm.idp.sign(&claims);
    let body = format!("logout_token={token}");
    let result = runtime().block_on(realm.validator.backchannel_logout(body.as_bytes()));
    let Ok(event) = result else {
        return;
    };
    assert_eq!(claims["iss"], Value::from(realm.idp.issuer.as_str()));
    let audience = &claims["aud"];
    assert!(
        audience == LOGOUT_CLIENT
            || audience
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == LOGOUT_CLIENT)),
        "accepted for audience {audience}"
    );
    assert!(claims["events"].get(BACKCHANNEL_LOGOUT_EVENT).is_some());
    assert!(claims.get("nonce").is_none_or(Value::is_null));
    let iat = claims["iat"]
        .as_i64()
        .expect("an accepted logout has a numeric iat");
    assert!(
        iat <= now + 30 && now - iat <= 300 + 30,
        "iat {} s from now",
        iat - now
    );
    assert!(event.sid.is_some() || event.sub.is_some());
    assert_eq!(event.sid.as_deref(), claims["sid"].as_str());
    assert_eq!(event.sub.as_deref(), claims["sub"].as_str());
});
