//! Federation, pure: how an org's federated endpoint names, merges and
//! routes what its servers offer. No sockets; `gateway/federated.rs` does
//! the talking.
//!
//! - Tools, prompts and resource templates get `<prefix><separator><name>`
//!   (the name alone for a server without prefix). A name is routed back
//!   by its prefix, and an item is listed only if routing its name leads
//!   back to it: a clash (two servers offering one name, or a server
//!   without prefix offering a name that starts with another's prefix) is
//!   decided that way, deterministically, and reported.
//! - Resources keep their URIs; the first server (by name) offering a URI
//!   owns it.
//! - A list's cursor is the gateway's, wrapping each server's own.
//! - Requests servers send the client get ids naming their server, so two
//!   servers' ids never collide, and answers find their way back.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

/// Longest name MCP allows for a tool (and so for prompts and templates).
pub const MAX_NAME: usize = 128;

/// Whether `name` follows MCP's name rules: 1 to 128 of `A-Z a-z 0-9 _ - .`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A federation's naming: each server's prefix, in the servers' order.
#[derive(Debug, Clone)]
pub struct Naming {
    pub separator: String,
    /// Empty for a server without prefix.
    pub prefixes: Vec<String>,
}

impl Naming {
    /// The name the client sees for server `server`'s `name`.
    pub fn full(&self, server: usize, name: &str) -> String {
        let prefix = &self.prefixes[server];
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}{}{name}", self.separator)
        }
    }

    /// The server a full name belongs to, and its own name there: the one
    /// whose prefix it starts with (at most one can match, as no prefix
    /// holds the separator), else the server without prefix, if any.
    pub fn route<'n>(&self, full: &'n str) -> Option<(usize, &'n str)> {
        let prefixed = self.prefixes.iter().enumerate().find_map(|(i, p)| {
            let rest = full.strip_prefix(p.as_str())?;
            let name = rest.strip_prefix(self.separator.as_str())?;
            (!p.is_empty() && !name.is_empty()).then_some((i, name))
        });
        prefixed.or_else(|| {
            self.prefixes
                .iter()
                .position(String::is_empty)
                .map(|i| (i, full))
        })
    }
}

/// The four lists a federation merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    Templates,
}

impl ListKind {
    pub fn of_method(method: &str) -> Option<ListKind> {
        Some(match method {
            "tools/list" => ListKind::Tools,
            "prompts/list" => ListKind::Prompts,
            "resources/list" => ListKind::Resources,
            "resources/templates/list" => ListKind::Templates,
            _ => return None,
        })
    }

    /// The method that asks for the list.
    pub fn method(self) -> &'static str {
        match self {
            ListKind::Tools => "tools/list",
            ListKind::Prompts => "prompts/list",
            ListKind::Resources => "resources/list",
            ListKind::Templates => "resources/templates/list",
        }
    }

    /// The field of the result that holds the items.
    pub fn field(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
            ListKind::Templates => "resourceTemplates",
        }
    }

    /// The server capability that offers the list.
    pub fn capability(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources | ListKind::Templates => "resources",
        }
    }

    /// The field that identifies an item: a name that gets prefixed, or
    /// a resource's URI (kept).
    fn key(self) -> &'static str {
        match self {
            ListKind::Resources => "uri",
            ListKind::Templates => "uriTemplate",
            _ => "name",
        }
    }

    fn prefixed(self) -> bool {
        self != ListKind::Resources
    }
}

/// Items one server listed, and its cursor to the rest.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<Value>,
    pub next: Option<String>,
}

impl Page {
    /// The page of a list result; `None` if it is not one.
    pub fn of_result(kind: ListKind, result: &Value) -> Option<Page> {
        let items = result.get(kind.field())?.as_array()?.clone();
        let next = result
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Some(Page { items, next })
    }
}

/// Names a merge left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The name already belongs to another server (or, routed, would
    /// reach another server).
    Clash { server: usize, name: String },
    /// Prefixed, the name breaks MCP's name rules.
    Invalid { server: usize, name: String },
}

/// Merged list items, and what was left out.
#[derive(Debug, Default)]
pub struct Merged {
    pub items: Vec<Value>,
    pub dropped: Vec<Dropped>,
    /// For resources and templates: URI (or URI template) → server.
    pub owners: Vec<(String, usize)>,
}

/// Merges the pages servers listed, in the servers' order, renaming what
/// gets prefixed.
pub fn merge(naming: &Naming, kind: ListKind, pages: Vec<(usize, Page)>) -> Merged {
    let mut merged = Merged::default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (server, page) in pages {
        for mut item in page.items {
            let Some(key) = item
                .get(kind.key())
                .and_then(Value::as_str)
                .map(str::to_owned)
            else {
                continue;
            };
            // What the client sees, and what must be unique.
            let shown = if kind.prefixed() {
                let name = item.get("name").and_then(Value::as_str).unwrap_or(&key);
                let full = naming.full(server, name);
                if !is_valid_name(&full) {
                    merged.dropped.push(Dropped::Invalid { server, name: full });
                    continue;
                }
                // A tool or prompt is called by name: its name must route
                // back to it.
                if kind != ListKind::Templates && naming.route(&full) != Some((server, name)) {
                    merged.dropped.push(Dropped::Clash { server, name: full });
                    continue;
                }
                if let Some(obj) = item.as_object_mut() {
                    obj.insert("name".into(), Value::String(full.clone()));
                }
                if kind == ListKind::Templates {
                    key.clone()
                } else {
                    full
                }
            } else {
                key.clone()
            };
            if !seen.insert(shown.clone()) {
                merged.dropped.push(Dropped::Clash {
                    server,
                    name: shown,
                });
                continue;
            }
            if matches!(kind, ListKind::Resources | ListKind::Templates) {
                merged.owners.push((key, server));
            }
            merged.items.push(item);
        }
    }
    merged
}

/// The gateway's cursor: each server's cursor to the rest of its list, by
/// server name. Opaque to clients.
pub fn encode_cursor(next: &BTreeMap<String, String>) -> Option<String> {
    if next.is_empty() {
        return None;
    }
    let text = serde_json::to_string(next).ok()?;
    Some(URL_SAFE_NO_PAD.encode(text))
}

/// The servers' cursors in a gateway cursor; `None` if it is not one.
pub fn decode_cursor(cursor: &str) -> Option<BTreeMap<String, String>> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The id the client sees for request `id` of server `server`.
pub fn client_id(server: &str, id: &Value) -> Value {
    Value::String(format!("{server}:{id}"))
}

/// The server and its own id of an id made by [`client_id`].
pub fn server_id(id: &Value) -> Option<(&str, Value)> {
    let (server, own) = id.as_str()?.split_once(':')?;
    let own: Value = serde_json::from_str(own).ok()?;
    matches!(own, Value::String(_) | Value::Number(_)).then_some((server, own))
}

/// One server's answer to `initialize`.
#[derive(Debug, Clone)]
pub struct Opened {
    pub server: String,
    pub result: Value,
}

/// The federated endpoint's `initialize` result: capabilities are the
/// union of the servers' (lists always announce changes, since servers
/// come and go), `instructions` name each server.
pub fn initialize_result(org: &str, version: &str, opened: &[Opened]) -> Value {
    let mut capabilities = Map::new();
    capabilities.insert("tools".into(), json!({"listChanged": true}));
    let mut instructions = Vec::new();
    for o in opened {
        if let Some(caps) = o.result.get("capabilities").and_then(Value::as_object) {
            for (name, value) in caps {
                let entry = capabilities
                    .entry(name.clone())
                    .or_insert_with(|| json!({}));
                if let (Some(into), Some(from)) = (entry.as_object_mut(), value.as_object()) {
                    for (k, v) in from {
                        // A flag any server sets is set.
                        if v.as_bool() == Some(true) || !into.contains_key(k) {
                            into.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
        if let Some(text) = o.result.get("instructions").and_then(Value::as_str)
            && !text.trim().is_empty()
        {
            instructions.push(format!("Server `{}`: {}", o.server, text.trim()));
        }
    }
    for list in ["prompts", "resources"] {
        if let Some(Value::Object(c)) = capabilities.get_mut(list) {
            c.insert("listChanged".into(), Value::Bool(true));
        }
    }
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": capabilities,
        "serverInfo": {"name": format!("ratatosk federation of {org}"), "version": env!("CARGO_PKG_VERSION")},
    });
    if !instructions.is_empty() {
        result["instructions"] = Value::String(instructions.join("\n\n"));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> Naming {
        Naming {
            separator: "__".into(),
            prefixes: vec!["fs".into(), String::new(), "tickets".into()],
        }
    }

    fn page(names: &[&str]) -> Page {
        Page {
            items: names
                .iter()
                .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}))
                .collect(),
            next: None,
        }
    }

    #[test]
    fn names_are_prefixed_and_routed_back() {
        let n = naming();
        assert_eq!(n.full(0, "read"), "fs__read");
        assert_eq!(n.full(1, "search"), "search");
        assert_eq!(n.route("fs__read"), Some((0, "read")));
        assert_eq!(n.route("tickets__open__now"), Some((2, "open__now")));
        assert_eq!(n.route("search"), Some((1, "search")));
        // A prefix alone, or another's prefix without its separator, goes
        // to the server without prefix.
        assert_eq!(n.route("fs__"), Some((1, "fs__")));
        assert_eq!(n.route("fsx__read"), Some((1, "fsx__read")));
        let without = Naming {
            separator: "__".into(),
            prefixes: vec!["a".into(), "b".into()],
        };
        assert_eq!(without.route("c__x"), None);
    }

    #[test]
    fn merge_prefixes_and_decides_clashes_by_routing() {
        let n = naming();
        let pages = vec![
            (0, page(&["read", "write"])),
            // The server without prefix offers `fs__read`, which routing
            // sends to `fs`: left out. `search` twice: the second is left out.
            (1, page(&["fs__read", "search", "search"])),
            (2, page(&["open", &"x".repeat(125)])),
        ];
        let merged = merge(&n, ListKind::Tools, pages);
        let names: Vec<&str> = merged
            .items
            .iter()
            .map(|t| t["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["fs__read", "fs__write", "search", "tickets__open"]);
        assert_eq!(
            merged.dropped,
            [
                Dropped::Clash {
                    server: 1,
                    name: "fs__read".into()
                },
                Dropped::Clash {
                    server: 1,
                    name: "search".into()
                },
                Dropped::Invalid {
                    server: 2,
                    name: format!("tickets__{}", "x".repeat(125))
                },
            ]
        );
        // The rest of an item is kept as it is.
        assert_eq!(merged.items[0]["inputSchema"], json!({"type": "object"}));
    }

    #[test]
    fn resources_keep_their_uris_and_the_first_owner() {
        let n = naming();
        let res = |uris: &[&str]| Page {
            items: uris
                .iter()
                .map(|u| json!({"uri": u, "name": "r"}))
                .collect(),
            next: None,
        };
        let merged = merge(
            &n,
            ListKind::Resources,
            vec![
                (0, res(&["file:///a", "file:///b"])),
                (2, res(&["file:///b", "t://1"])),
            ],
        );
        let uris: Vec<&str> = merged
            .items
            .iter()
            .map(|r| r["uri"].as_str().expect("uri"))
            .collect();
        assert_eq!(uris, ["file:///a", "file:///b", "t://1"]);
        assert_eq!(merged.items[0]["name"], "r", "resources keep their names");
        assert_eq!(
            merged.owners,
            [
                ("file:///a".to_owned(), 0),
                ("file:///b".to_owned(), 0),
                ("t://1".to_owned(), 2)
            ]
        );
        let templates = merge(
            &n,
            ListKind::Templates,
            vec![(
                0,
                Page {
                    items: vec![json!({"uriTemplate": "file:///{path}", "name": "file"})],
                    next: None,
                },
            )],
        );
        assert_eq!(templates.items[0]["name"], "fs__file");
        assert_eq!(templates.owners, [("file:///{path}".to_owned(), 0)]);
    }

    #[test]
    fn cursors_wrap_each_servers_cursor() {
        let mut next = BTreeMap::new();
        assert_eq!(encode_cursor(&next), None);
        next.insert("fs".to_owned(), "page 2 / of \"fs\"".to_owned());
        next.insert("tickets".to_owned(), "17".to_owned());
        let cursor = encode_cursor(&next).expect("a cursor");
        assert!(
            cursor
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(decode_cursor(&cursor), Some(next));
        assert_eq!(decode_cursor("not a cursor!"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("[1]")), None);
    }

    #[test]
    fn server_request_ids_name_their_server() {
        for own in [json!(7), json!("a:b"), json!("")] {
            let id = client_id("files", &own);
            assert_eq!(server_id(&id), Some(("files", own.clone())));
        }
        assert_eq!(client_id("files", &json!(7)), json!("files:7"));
        for bad in [
            json!(7),
            json!("files"),
            json!("files:{}"),
            json!("files:nope"),
        ] {
            assert_eq!(server_id(&bad), None, "{bad}");
        }
    }

    #[test]
    fn initialize_unites_capabilities_and_names_instructions() {
        let opened = [
            Opened {
                server: "files".into(),
                result: json!({"capabilities": {"resources": {"subscribe": true}, "logging": {}},
                               "instructions": "Read files."}),
            },
            Opened {
                server: "tickets".into(),
                result: json!({"capabilities": {"tools": {"listChanged": false}, "resources": {"subscribe": false}}}),
            },
        ];
        let r = initialize_result("org-1", "2025-06-18", &opened);
        assert_eq!(r["protocolVersion"], "2025-06-18");
        assert_eq!(r["capabilities"]["tools"], json!({"listChanged": true}));
        assert_eq!(
            r["capabilities"]["resources"],
            json!({"subscribe": true, "listChanged": true})
        );
        assert_eq!(r["capabilities"]["logging"], json!({}));
        assert!(r["capabilities"].get("prompts").is_none());
        assert_eq!(r["instructions"], "Server `files`: Read files.");
        assert_eq!(r["serverInfo"]["name"], "ratatosk federation of org-1");
    }
}
