//! A POST body as a client sends it: one JSON-RPC message or a batch.
//!
//! Beyond "no panic": what `parse_body` accepts is JSON whose envelope says
//! what the parser says, a batch re-serializes to the same messages, ids
//! survive the trip to an error body and back (that is how the gateway
//! answers a refused request), and what it refuses maps to -32700 or -32600.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ratatosk::jsonrpc::{self, Body, FramingError, Id, Kind, Message, code};
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    match jsonrpc::parse_body(&body) {
        Ok(Body::Single(m)) => {
            assert_eq!(&m.raw[..], data, "a single message keeps its exact bytes");
            check_message(&m);
        }
        Ok(Body::Batch(items)) => {
            assert!(!items.is_empty(), "an empty batch is refused");
            let whole: Vec<Box<RawValue>> =
                serde_json::from_slice(data).expect("a batch is a JSON array");
            assert_eq!(whole.len(), items.len(), "one message per array element");
            for m in &items {
                check_message(m);
            }
            // The items, written back as an array, are the same batch.
            let mut again = b"[".to_vec();
            for (i, m) in items.iter().enumerate() {
                if i > 0 {
                    again.push(b',');
                }
                again.extend_from_slice(&m.raw);
            }
            again.push(b']');
            let Ok(Body::Batch(reparsed)) = jsonrpc::parse_body(&Bytes::from(again)) else {
                panic!("a re-serialized batch does not parse as a batch");
            };
            let kinds = |ms: &[Message]| ms.iter().map(|m| m.kind.clone()).collect::<Vec<_>>();
            assert_eq!(kinds(&reparsed), kinds(&items));
        }
        Err(e) => check_refusal(&e),
    }
});

fn check_message(m: &Message) {
    // Members as raw JSON: string values may hold escapes of lone
    // surrogates (`"\ud800"`), which JSON's grammar allows and a Rust
    // string cannot hold; the gateway passes such values on untouched.
    let object: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(&m.raw)
        .unwrap_or_else(|e| panic!("an accepted message is not a JSON object: {e}"));
    let member = |name: &str| object.get(name).map(|raw| raw.get());
    let value = |name: &str| member(name).map(serde_json::from_str::<Value>);
    assert_eq!(member("jsonrpc"), Some("\"2.0\""));
    let again = jsonrpc::parse_message(&m.raw).expect("an accepted message parses again");
    assert_eq!(again.kind, m.kind);
    match &m.kind {
        Kind::Request { id, method } => {
            assert!(!method.is_empty());
            assert!(matches!(value("method"), Some(Ok(v)) if v == method.as_str()));
            assert!(m.is_request());
            check_id(id, value("id"));
        }
        Kind::Notification { method } => {
            assert!(!method.is_empty());
            // An id of any value, `null` included, makes a request (or a refusal).
            assert!(member("id").is_none(), "a notification has no id");
        }
        Kind::Response { id } => {
            assert!(object.contains_key("result") || object.contains_key("error"));
            assert!(m.method().is_none());
            check_id(id, value("id"));
        }
    }
    if let Some(method) = m.method() {
        let label = jsonrpc::method_label(method);
        assert!(label == method || label == "other");
    }
    let _ = m.params();
}

/// An id is the message's `id` in one spelling, and it comes back unchanged
/// from the error and result bodies the gateway writes with it.
fn check_id(id: &Id, raw: Option<serde_json::Result<Value>>) {
    let raw = raw
        .expect("a request or response has an id")
        .expect("an accepted id is JSON");
    let raw = &raw;
    assert_eq!(
        Id::from_value(raw).as_ref(),
        Some(id),
        "id {raw} read two ways"
    );
    assert_eq!(Id::from_value(&id.to_value()).as_ref(), Some(id));
    for written in [
        jsonrpc::error_body(Some(id), code::INVALID_REQUEST, "refused"),
        jsonrpc::result_body(Some(id), serde_json::json!({})),
        // A `null` result is a result.
        jsonrpc::result_body(Some(id), Value::Null),
    ] {
        let answer = jsonrpc::parse_message(&written).expect("the gateway's own body parses");
        assert!(matches!(&answer.kind, Kind::Response { id: echoed } if echoed == id));
    }
}

fn check_refusal(e: &FramingError) {
    assert!(matches!(
        e.code(),
        code::PARSE_ERROR | code::INVALID_REQUEST
    ));
    let written = jsonrpc::error_body(None, e.code(), &e.to_string());
    let v: Value = serde_json::from_slice(&written).expect("an error body is JSON");
    assert_eq!(v["error"]["code"], e.code());
}
