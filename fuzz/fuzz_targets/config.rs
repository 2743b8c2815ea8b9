//! The YAML config with `${ENV}` placeholders: the gateway's
//! `Config::from_yaml` and the forward-auth server's config, both over
//! `expand_env`.
//!
//! The environment is fixed here and holds the values that could confuse
//! an expansion: YAML syntax, a placeholder, `$$`, a number, nothing.
//! Checked beyond "no panic": expansion keeps the tree's shape (a string
//! becomes at most another scalar, never a mapping or list, so no value
//! from the environment injects YAML), strings without `$` stay as they
//! are, every refusal names its problems, and a config that loads loads
//! again the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ratatosk::config::Config;
use yaml_serde::Value;

fn env(name: &str) -> Option<String> {
    let value = match name {
        "PORT" => "8080",
        "HOST" => "127.0.0.1",
        "LISTEN" => "127.0.0.1:8080",
        "SECRET" => "s3cret",
        "INJECT" => "a: b\nc: [d, {e: f}]",
        "LIST" => "[1, 2]",
        "NESTED" => "${SECRET}",
        "DOLLARS" => "$$x$",
        "TRUE" => "true",
        "EMPTY" => "",
        "URL" => "http://127.0.0.1:8180/realms/ratatosk",
        _ => return None,
    };
    Some(value.to_owned())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    match Config::from_yaml(text, file, &env) {
        Ok(config) => {
            let again = Config::from_yaml(text, file, &env).expect("a config loads twice");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
        Err(e) => {
            assert!(!e.problems().is_empty(), "a refusal without a problem: {e}");
            assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}");
        }
    }

    let Ok(tree) = yaml_serde::from_str::<Value>(text) else {
        return;
    };
    let mut expanded = tree.clone();
    let problems = ratatosk_auth::env::expand_env(&mut expanded, &env);
    for (_, message) in &problems {
        assert!(!message.is_empty());
    }
    if problems.is_empty() {
        same_shape(&tree, &expanded);
        let _ = yaml_serde::from_value::<ratatosk_auth::forward::ForwardConfig>(expanded)
            .map(|forward| forward.problems());
    }
});

fn same_shape(before: &Value, after: &Value) {
    match (before, after) {
        (Value::String(s), after) if s.contains('$') => assert!(
            matches!(after, Value::String(_) | Value::Number(_) | Value::Bool(_)),
            "{s:?} expanded to {after:?}"
        ),
        (Value::Sequence(a), Value::Sequence(b)) => {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).for_each(|(x, y)| same_shape(x, y));
        }
        (Value::Mapping(a), Value::Mapping(b)) => {
            assert_eq!(a.len(), b.len());
            for ((ka, va), (kb, vb)) in a.iter().zip(b) {
                assert_eq!(ka, kb, "keys are not expanded");
                same_shape(va, vb);
            }
        }
        (Value::Tagged(a), Value::Tagged(b)) => {
            assert_eq!(a.tag, b.tag);
            same_shape(&a.value, &b.value);
        }
        (a, b) => assert_eq!(a, b, "a value without `$` changed"),
    }
}
