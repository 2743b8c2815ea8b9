//! Tool policies, pure: which tools, prompts and resources of one server
//! a caller may see and use, by the roles, groups and scopes of their
//! token (`orgs.<org>.policy`, and the server's own rules).
//!
//! A server without rules (in its org or its own) is open. With rules, an
//! item is allowed when a rule for the caller allows it and none for the
//! caller denies it; what no rule allows is denied. Names are matched as
//! the federated endpoint shows them (with the server's prefix), on every
//! endpoint, so one rule reads the same everywhere.

use std::sync::Arc;

use crate::Identity;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde_json::Value;

use std::collections::BTreeMap;

use serde::Deserialize;

/// One rule of a tool policy (`orgs.<org>.policy[i]`, or a server's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Names the rule in the audit log; unique in its org.
    pub name: String,
    /// Whom the rule is for; everyone without it.
    #[serde(default)]
    pub when: PolicyWhen,
    /// What the rule allows.
    #[serde(default)]
    pub allow: PolicyTargets,
    /// What the rule denies (a denial wins over any allowance).
    #[serde(default)]
    pub deny: PolicyTargets,
}

/// Identity facts a rule asks for: every field given must hold, by any
/// one of its values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyWhen {
    /// Keycloak realm roles (`realm_access.roles`).
    #[serde(default)]
    pub realm_roles: Vec<String>,
    /// Keycloak client roles by client (`resource_access.<client>.roles`).
    #[serde(default)]
    pub client_roles: BTreeMap<String, Vec<String>>,
    /// Groups (the `groups` claim; `admins` matches `/admins` too).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Scopes of the token.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// Globs (`*`, `?`, `[...]`) on what the federated endpoint shows: tool
/// and prompt names with their prefix (`fs__read_*`), resource URIs and
/// URI templates (`file:///docs/*`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargets {
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

impl PolicyTargets {
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty() && self.prompts.is_empty() && self.resources.is_empty()
    }

    /// Each list with its field name.
    pub fn lists(&self) -> [(&'static str, &[String]); 3] {
        [
            ("tools", &self.tools),
            ("prompts", &self.prompts),
            ("resources", &self.resources),
        ]
    }
}

/// What a policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Prompt,
    /// A resource's URI, or a resource template's.
    Resource,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Prompt => "prompt",
            Kind::Resource => "resource",
        }
    }
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The rule that decided: the one that denied, or the first that
    /// allowed; none when there are no rules, or none allows it.
    pub rule: Option<Arc<str>>,
    /// Denied, but a rule would allow it with one of these scopes more:
    /// what a client may ask for (`insufficient_scope`).
    pub step_up: Vec<String>,
}

/// The rules in effect for one server.
#[derive(Debug, Default)]
pub struct Policy {
    /// The server's prefix and the separator (`fs__`), or empty.
    prefix: String,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    when: PolicyWhen,
    allow: Targets,
    deny: Targets,
}

#[derive(Debug)]
struct Targets {
    tools: GlobSet,
    prompts: GlobSet,
    resources: GlobSet,
}

impl Targets {
    fn new(targets: &PolicyTargets) -> Result<Targets, globset::Error> {
        let set = |globs: &[String]| -> Result<GlobSet, globset::Error> {
            let mut b = GlobSetBuilder::new();
            for g in globs {
                b.add(Glob::new(g)?);
            }
            b.build()
        };
        Ok(Targets {
            tools: set(&targets.tools)?,
            prompts: set(&targets.prompts)?,
            resources: set(&targets.resources)?,
        })
    }

    fn matches(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Tool => self.tools.is_match(name),
            Kind::Prompt => self.prompts.is_match(name),
            Kind::Resource => self.resources.is_match(name),
        }
    }
}

/// How far a rule's `when` holds for a caller.
enum Holds {
    Yes,
    /// Only scopes are missing: any one of these would do.
    WithScope(Vec<String>),
    No,
}

fn when_holds(when: &PolicyWhen, identity: &Identity) -> Holds {
    let any = |wanted: &[String], has: &[String]| {
        wanted.is_empty() || wanted.iter().any(|w| has.contains(w))
    };
    let group = |g: &str| g.trim_start_matches('/').to_owned();
    let groups: Vec<String> = identity.groups.iter().map(|g| group(g)).collect();
    let wanted_groups: Vec<String> = when.groups.iter().map(|g| group(g)).collect();
    let client_roles = when.client_roles.is_empty()
        || when.client_roles.iter().any(|(client, roles)| {
            identity
                .client_roles
                .get(client)
                .is_some_and(|has| roles.iter().any(|r| has.contains(r)))
        });
    let others = any(&when.realm_roles, &identity.realm_roles)
        && client_roles
        && any(&wanted_groups, &groups);
    match (others, any(&when.scopes, &identity.scopes)) {
        (true, true) => Holds::Yes,
        (true, false) => Holds::WithScope(when.scopes.clone()),
        _ => Holds::No,
    }
}

impl Policy {
    /// The policy of a server with `prefix` (empty for none) and
    /// `separator`: its org's rules, then its own. The globs were checked
    /// with the config.
    pub fn new<'a>(
        prefix: &str,
        separator: &str,
        rules: impl IntoIterator<Item = &'a PolicyRule>,
    ) -> Result<Policy, globset::Error> {
        let rules = rules
            .into_iter()
            .map(|r| {
                Ok(Rule {
                    name: r.name.as_str().into(),
                    when: r.when.clone(),
                    allow: Targets::new(&r.allow)?,
                    deny: Targets::new(&r.deny)?,
                })
            })
            .collect::<Result<Vec<_>, globset::Error>>()?;
        Ok(Policy {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}{separator}")
            },
            rules,
        })
    }

    /// Whether the server has rules at all.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The name as rules see it: tools and prompts with the prefix.
    pub fn shown(&self, kind: Kind, own: &str) -> String {
        match kind {
            Kind::Resource => own.to_owned(),
            _ => format!("{}{own}", self.prefix),
        }
    }

    /// Whether `identity` may see and use the server's `own` item.
    pub fn decide(&self, identity: &Identity, kind: Kind, own: &str) -> Decision {
        if self.rules.is_empty() {
            return Decision {
                allowed: true,
                rule: None,
                step_up: Vec::new(),
            };
        }
        let name = self.shown(kind, own);
        let mut allowed_by = None;
        let mut step_up = Vec::new();
        for rule in &self.rules {
            match when_holds(&rule.when, identity) {
                Holds::Yes => {
                    if rule.deny.matches(kind, &name) {
                        return Decision {
                            allowed: false,
                            rule: Some(rule.name.clone()),
                            step_up: Vec::new(),
                        };
                    }
                    if allowed_by.is_none() && rule.allow.matches(kind, &name) {
                        allowed_by = Some(rule.name.clone());
                    }
                }
                Holds::WithScope(scopes) if rule.allow.matches(kind, &name) => {
                    for s in scopes {
                        if !step_up.contains(&s) {
                            step_up.push(s);
                        }
                    }
                }
                _ => {}
            }
        }
        match allowed_by {
            Some(rule) => Decision {
                allowed: true,
                rule: Some(rule),
                step_up: Vec::new(),
            },
            None => Decision {
                allowed: false,
                rule: None,
                step_up,
            },
        }
    }
}

/// What a client request uses, as a policy decides on it: the item's kind
/// and its server's own name for it (a URI for resources). `None` for a
/// method that uses no item, or one without the field that names it (the
/// server refuses that itself).
pub fn target_of<'a>(method: &str, params: Option<&'a Value>) -> Option<(Kind, &'a str)> {
    let field = |v: &'a Value, name: &str| v.get(name).and_then(Value::as_str);
    let params = params?;
    if method == "completion/complete" {
        let reference = params.get("ref")?;
        return match field(reference, "type")? {
            "ref/prompt" => Some((Kind::Prompt, field(reference, "name")?)),
            _ => Some((Kind::Resource, field(reference, "uri")?)),
        };
    }
    let kind = kind_of_method(method)?;
    let name = if kind == Kind::Resource {
        "uri"
    } else {
        "name"
    };
    Some((kind, field(params, name)?))
}

/// The kind of item a request of `method` uses by name (`params.name`, or
/// `params.uri` for resources; a 2026-07-28 client's `Mcp-Name`).
/// The scopes with which `rules` grant more (their `when.scopes`), but
/// those in `required`, each once: advertised beside the required, so a
/// client asks for them when it first logs in (one that registered itself
/// may later ask only for the scopes it registered with).
pub fn offered_scopes<'a>(
    rules: impl IntoIterator<Item = &'a PolicyRule>,
    required: &[String],
) -> Vec<String> {
    let mut offered: Vec<String> = Vec::new();
    for scope in rules.into_iter().flat_map(|r| &r.when.scopes) {
        if !offered.contains(scope) && !required.contains(scope) {
            offered.push(scope.clone());
        }
    }
    offered
}

pub fn kind_of_method(method: &str) -> Option<Kind> {
    match method {
        "tools/call" => Some(Kind::Tool),
        "prompts/get" => Some(Kind::Prompt),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some(Kind::Resource),
        _ => None,
    }
}

/// The lists of a list result, and what names their items.
const LISTS: [(&str, &str, Kind); 4] = [
    ("tools", "name", Kind::Tool),
    ("prompts", "name", Kind::Prompt),
    ("resources", "uri", Kind::Resource),
    ("resourceTemplates", "uriTemplate", Kind::Resource),
];

impl Policy {
    /// A list response (`tools/list` and the like) with only the items
    /// `identity` may see; `None` when it needs no change (or is not a
    /// list result).
    pub fn filter_list(&self, identity: &Identity, response: &[u8]) -> Option<Vec<u8>> {
        if self.is_open() {
            return None;
        }
        let mut message: Value = serde_json::from_slice(response).ok()?;
        let result = message.get_mut("result")?.as_object_mut()?;
        let mut changed = false;
        for (list, _, _) in LISTS {
            if let Some(Value::Array(items)) = result.get_mut(list) {
                changed |= self.retain_allowed(identity, list, items);
            }
        }
        changed.then(|| serde_json::to_vec(&message).unwrap_or_default())
    }

    /// Keeps of `items`, the items of result field `list` (`tools`,
    /// `resourceTemplates`, ...), those `identity` may see; true if any
    /// went.
    pub fn retain_allowed(&self, identity: &Identity, list: &str, items: &mut Vec<Value>) -> bool {
        let Some((_, key, kind)) = LISTS.iter().find(|(l, _, _)| *l == list) else {
            return false;
        };
        if self.is_open() {
            return false;
        }
        let before = items.len();
        items.retain(|item| {
            item.get(*key)
                .and_then(Value::as_str)
                .is_some_and(|own| self.decide(identity, *kind, own).allowed)
        });
        items.len() != before
    }
}

impl PolicyRule {
    /// The rule's globs that do not parse: (where, under the rule, as
    /// `allow.tools[0]`; why).
    pub fn bad_globs(&self) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        for (which, targets) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (field, globs) in targets.lists() {
                for (i, glob) in globs.iter().enumerate() {
                    if let Err(e) = Glob::new(glob) {
                        bad.push((
                            format!("{which}.{field}[{i}]"),
                            format!("not a glob: {}", e.kind()),
                        ));
                    }
                }
            }
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Vec<PolicyRule> {
        yaml_serde::from_str(yaml).expect("rules")
    }

    fn who(roles: &[&str], groups: &[&str], scopes: &[&str]) -> Identity {
        let mut id = Identity::anonymous("org-1");
        id.subject = "u".into();
        id.realm_roles = roles.iter().map(|s| s.to_string()).collect();
        id.groups = groups.iter().map(|s| s.to_string()).collect();
        id.scopes = scopes.iter().map(|s| s.to_string()).collect();
        id
    }

    const RULES: &str = r#"
- name: readers
  when: {realm_roles: [mcp-reader]}
  allow: {tools: ["fs__read_*", "fs__list"], resources: ["file:///docs/*"]}
- name: admins
  when: {groups: [admins]}
  allow: {tools: ["*"], prompts: ["*"], resources: ["*"]}
- name: no-delete
  deny: {tools: ["*__delete*"]}
- name: writers
  when: {scopes: ["mcp:write"]}
  allow: {tools: ["fs__write"]}
"#;

    #[test]
    fn roles_groups_and_scopes_decide_with_denials_first() {
        let rules = rules(RULES);
        let p = Policy::new("fs", "__", &rules).expect("policy");
        let alice = who(&["mcp-reader"], &[], &[]);
        let carol = who(&[], &["/admins"], &[]);
        let bob = who(&[], &[], &[]);
        let d = p.decide(&alice, Kind::Tool, "read_file");
        assert_eq!((d.allowed, d.rule.as_deref()), (true, Some("readers")));
        assert!(!p.decide(&alice, Kind::Tool, "write").allowed);
        assert!(!p.decide(&alice, Kind::Prompt, "summary").allowed);
        assert!(
            p.decide(&alice, Kind::Resource, "file:///docs/a.md")
                .allowed
        );
        assert!(
            !p.decide(&alice, Kind::Resource, "file:///etc/passwd")
                .allowed
        );
        assert!(p.decide(&carol, Kind::Tool, "write").allowed);
        assert!(p.decide(&carol, Kind::Prompt, "summary").allowed);
        // A denial for everyone wins over the admins' `*`.
        let d = p.decide(&carol, Kind::Tool, "delete_all");
        assert_eq!((d.allowed, d.rule.as_deref()), (false, Some("no-delete")));
        // Nothing allows bob anything.
        let d = p.decide(&bob, Kind::Tool, "list");
        assert_eq!(
            (d.allowed, d.rule, d.step_up.is_empty()),
            (false, None, true)
        );
    }

    #[test]
    fn a_scope_that_would_allow_is_named_for_step_up() {
        let rules = rules(RULES);
        let p = Policy::new("fs", "__", &rules).expect("policy");
        let d = p.decide(&who(&[], &[], &[]), Kind::Tool, "write");
        assert_eq!(
            (d.allowed, d.step_up),
            (false, vec!["mcp:write".to_owned()])
        );
        assert!(
            p.decide(&who(&[], &[], &["mcp:write"]), Kind::Tool, "write")
                .allowed
        );
    }

    #[test]
    fn names_carry_the_prefix_and_servers_without_rules_are_open() {
        let rules = rules("- name: r\n  allow: {tools: [\"add\"]}\n");
        let bare = Policy::new("", "__", &rules).expect("policy");
        assert!(bare.decide(&who(&[], &[], &[]), Kind::Tool, "add").allowed);
        let prefixed = Policy::new("py", "__", &rules).expect("policy");
        assert!(
            !prefixed
                .decide(&who(&[], &[], &[]), Kind::Tool, "add")
                .allowed
        );
        assert_eq!(prefixed.shown(Kind::Tool, "add"), "py__add");
        let open = Policy::new("py", "__", &[]).expect("policy");
        assert!(open.is_open());
        assert!(
            open.decide(&who(&[], &[], &[]), Kind::Tool, "anything")
                .allowed
        );
    }

    #[test]
    fn requests_name_what_they_use() {
        let cases = [
            ("tools/call", r#"{"name":"add"}"#, Some((Kind::Tool, "add"))),
            ("prompts/get", r#"{"name":"p"}"#, Some((Kind::Prompt, "p"))),
            (
                "resources/read",
                r#"{"uri":"file:///a"}"#,
                Some((Kind::Resource, "file:///a")),
            ),
            (
                "resources/subscribe",
                r#"{"uri":"u"}"#,
                Some((Kind::Resource, "u")),
            ),
            (
                "completion/complete",
                r#"{"ref":{"type":"ref/prompt","name":"p"}}"#,
                Some((Kind::Prompt, "p")),
            ),
            (
                "completion/complete",
                r#"{"ref":{"type":"ref/resource","uri":"t://{x}"}}"#,
                Some((Kind::Resource, "t://{x}")),
            ),
            ("tools/call", r#"{"arguments":{}}"#, None),
            ("tools/list", r#"{}"#, None),
        ];
        for (method, params, want) in cases {
            let params: Value = serde_json::from_str(params).expect("json");
            assert_eq!(target_of(method, Some(&params)), want, "{method} {params}");
        }
    }

    #[test]
    fn lists_keep_only_what_the_caller_may_see() {
        let rules = rules(RULES);
        let p = Policy::new("fs", "__", &rules).expect("policy");
        let alice = who(&["mcp-reader"], &[], &[]);
        let list = br#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"read_a"},{"name":"write"},{"name":"list"}],"nextCursor":"c"}}"#;
        let shown: Value =
            serde_json::from_slice(&p.filter_list(&alice, list).expect("filtered")).expect("json");
        assert_eq!(
            shown,
            serde_json::json!({"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"read_a"},{"name":"list"}],"nextCursor":"c"}})
        );
        let resources = br#"{"jsonrpc":"2.0","id":4,"result":{"resources":[{"uri":"file:///docs/x"},{"uri":"file:///etc/x"}]}}"#;
        let shown: Value =
            serde_json::from_slice(&p.filter_list(&alice, resources).expect("filtered"))
                .expect("json");
        assert_eq!(
            shown["result"]["resources"],
            serde_json::json!([{"uri":"file:///docs/x"}])
        );
        // Nothing to hide, not a list, an open policy: unchanged.
        let carol = who(&[], &["admins"], &[]);
        assert_eq!(
            p.filter_list(
                &carol,
                br#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"write"}]}}"#
            ),
            None
        );
        assert_eq!(
            p.filter_list(
                &alice,
                br#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#
            ),
            None
        );
        let open = Policy::new("fs", "__", &[]).expect("policy");
        assert_eq!(open.filter_list(&alice, list), None);
    }

    #[test]
    fn client_roles_match_per_client() {
        let rules = rules(
            "- name: r\n  when: {client_roles: {gw: [tickets]}}\n  allow: {tools: [\"*\"]}\n",
        );
        let p = Policy::new("", "__", &rules).expect("policy");
        let mut id = who(&[], &[], &[]);
        id.client_roles
            .insert("other".into(), vec!["tickets".into()]);
        assert!(!p.decide(&id, Kind::Tool, "x").allowed);
        id.client_roles.insert("gw".into(), vec!["tickets".into()]);
        assert!(p.decide(&id, Kind::Tool, "x").allowed);
    }
}
