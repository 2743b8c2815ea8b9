//! The forward-auth server's org from a proxied path (`X-Forwarded-Uri`,
//! `X-Original-URI`, Envoy's `/check/...`): `forward::org_from_path`.
//!
//! An org it names must be the one the proxy routes the request to, so:
//! a non-empty segment without `/`, `\` or control characters, not `.` or
//! `..`; and the first segment of the percent-decoded path, which then has
//! no `.` or `..` segment a proxy would resolve to another route. (`&` is
//! an ordinary path character there, and a decoded `?` or `#` is too: such
//! an org is looked up among the configured ones like any other.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratatosk_auth::forward::org_from_path;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = std::str::from_utf8(data) else {
        return;
    };
    let Some(org) = org_from_path(uri) else {
        return;
    };
    assert!(!org.is_empty(), "{uri:?} gave an empty org");
    assert!(org != "." && org != "..", "{uri:?} gave {org:?}");
    assert!(
        !org.contains(['/', '\\']) && !org.chars().any(char::is_control),
        "{uri:?} gave {org:?}"
    );
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    assert!(
        !decoded.split('/').any(|s| s == "." || s == ".."),
        "{uri:?} decodes to {decoded:?}, yet names org {org:?}"
    );
    let first = decoded.split('/').find(|s| !s.is_empty());
    assert_eq!(first, Some(org.as_str()), "{uri:?} decodes to {decoded:?}");
});
