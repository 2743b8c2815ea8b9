//! `${ENV}` placeholders in YAML config files, shared by the gateway and
//! the forward-auth server. They are expanded in the parsed tree, not the
//! text, so a value from the environment cannot inject YAML.

use yaml_serde::Value;

/// Expands `${NAME}` and `${NAME:-default}` in every string of the tree;
/// `$$` is a literal `$`. A value that is a single placeholder is re-read as
/// a YAML scalar, so `port: ${PORT}` yields a number.
/// Returns every problem as (field path, message).
pub fn expand_env(
    value: &mut Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    walk(value, &mut String::new(), env, &mut problems);
    problems
}

fn walk(
    value: &mut Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(String, String)>,
) {
    match value {
        Value::String(s) => {
            if !s.contains('$') {
                return;
            }
            match expand_str(s, env) {
                Ok(expanded) => {
                    let whole =
                        s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
                    *value = match whole.then(|| yaml_serde::from_str::<Value>(&expanded)) {
                        Some(Ok(
                            scalar @ (Value::Number(_) | Value::Bool(_) | Value::String(_)),
                        )) => scalar,
                        _ => Value::String(expanded),
                    };
                }
                Err(message) => problems.push((path.clone(), message)),
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, env, problems);
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                match key {
                    Value::String(k) => path.push_str(k),
                    other => path.push_str(&format!("{other:?}")),
                }
                walk(item, path, env, problems);
                path.truncate(len);
            }
        }
        Value::Tagged(tagged) => walk(&mut tagged.value, path, env, problems),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_name {
                return Err(format!(
                    "`${{{inner}}}` is not a valid placeholder: expected `${{NAME}}` or `${{NAME:-default}}`"
                ));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (referenced as `${{{name}}}`)"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_dollar_is_a_literal_dollar() {
        assert_eq!(expand_str("a$$b", &|_| None).expect("ok"), "a$b");
        assert_eq!(expand_str("cost $5", &|_| None).expect("ok"), "cost $5");
        assert!(expand_str("${1-x}", &|_| None).is_err());
        assert!(expand_str("${OPEN", &|_| None).is_err());
    }
}
