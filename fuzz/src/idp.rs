//! The token targets check against the stand-in identity provider of
//! `ratatosk-auth` (feature `testing`): discovery and keys on loopback,
//! fetched once per process. A real Keycloak cannot answer a million
//! inputs a minute; the e2e suite's Keycloak tokens are the seeds.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ratatosk_auth::Validator;
use ratatosk_auth::testing::{AUDIENCE, FakeIdp, LOGOUT_CLIENT};
use serde_json::Value;

use crate::runtime;

pub struct Realm {
    pub idp: FakeIdp,
    pub validator: Arc<Validator>,
}

/// The provider and a validator that knows its keys. Keys are never
/// fetched again (an unknown `kid` is refused at once), and verdicts are
/// not cached, so an input's outcome does not depend on those before it.
pub fn realm() -> &'static Realm {
    static REALM: OnceLock<Realm> = OnceLock::new();
    REALM.get_or_init(|| {
        runtime().block_on(async {
            let idp = FakeIdp::start().await;
            let mut config = idp.config();
            config.jwks_min_refetch = Duration::from_secs(30 * 24 * 3600);
            config.clock_skew = Duration::from_secs(30);
            config.cache.enabled = false;
            let registry = prometheus::Registry::new();
            let validator = Validator::new(config, &registry).expect("a validator");
            validator.warm_up().await;
            Realm { idp, validator }
        })
    })
}

/// Claims for the provider to sign, from fuzz input: a JSON value whose
/// strings `$ISSUER`, `$AUDIENCE` and `$LOGOUT_CLIENT` stand for this
/// realm's values, and whose top-level `iat`, `exp` and `nbf`, when small
/// (at most a day either way), count from now. Without that, the fuzzer
/// could not write a time the checks accept, nor this run's issuer.
pub fn claims(json: &[u8], issuer: &str, now: i64) -> Option<Value> {
    let mut value: Value = serde_json::from_slice(json).ok()?;
    substitute(&mut value, issuer);
    if let Some(map) = value.as_object_mut() {
        for key in ["iat", "exp", "nbf"] {
            if let Some(n) = map.get(key).and_then(Value::as_i64)
                && n.abs() <= 86_400
            {
                map.insert(key.into(), Value::from(now + n));
            }
        }
    }
    Some(value)
}

fn substitute(value: &mut Value, issuer: &str) {
    match value {
        Value::String(s) => match s.as_str() {
            "$ISSUER" => *s = issuer.to_owned(),
            "$AUDIENCE" => *s = AUDIENCE.to_owned(),
            "$LOGOUT_CLIENT" => *s = LOGOUT_CLIENT.to_owned(),
            _ => {}
        },
        Value::Array(items) => items.iter_mut().for_each(|v| substitute(v, issuer)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute(v, issuer)),
        _ => {}
    }
}
