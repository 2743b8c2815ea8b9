//! The status page (`GET /` on the admin listener): what the gateway is
//! doing, as one HTML page rendered here, without scripts or a build step.
//!
//! [`gather`] reads the gateway: the routes and replicas from what `/readyz`
//! answers, the counts from the metrics registry (the figures `/metrics`
//! shows), the recent errors from their ring. [`render`] turns that into
//! HTML and touches nothing else, so tests need no socket. Everything that
//! comes from the config, a client or an error is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use prometheus::proto::{LabelPair, MetricFamily, MetricType};
use serde_json::Value;

use crate::edge::{Response, ResponseBody};
use crate::gateway::Gateway;
use crate::metrics::{RECENT_ERRORS, RecentError};
use crate::routes::Endpoint;

/// How often the page reloads itself, in seconds.
const REFRESH_SECS: u32 = 10;

/// Longest wait for the session store while gathering: the page shows the
/// last counts rather than hang on a store that is down.
const STORE_WAIT: Duration = Duration::from_secs(2);

/// Everything the page shows.
pub struct Status {
    pub version: &'static str,
    pub node_id: u32,
    pub started_at: SystemTime,
    pub uptime: Duration,
    pub now: SystemTime,
    /// What `/readyz` says: `ready`, `draining`, `store unavailable`, ...
    pub readiness: String,
    pub ready: bool,
    pub generation: u64,
    pub store: Store,
    /// The node bus (Redis mode only).
    pub bus: Option<Bus>,
    /// Client connections open on the MCP listener.
    pub connections: u64,
    pub orgs: Vec<Org>,
    /// Token validation figures; `None` when no org validates tokens.
    pub auth: Option<Vec<Figure>>,
    /// Errors recorded since the start.
    pub errors_total: u64,
    /// The last of them, newest first.
    pub errors: Vec<RecentError>,
}

pub struct Store {
    pub kind: String,
    pub ok: bool,
    pub error: Option<String>,
}

pub struct Bus {
    pub up: bool,
    pub dropped: u64,
}

/// An org and its servers.
pub struct Org {
    pub name: String,
    pub sessions: u64,
    pub open_streams: u64,
    pub background_streams: u64,
    pub requests: u64,
    /// Requests answered with a 5xx.
    pub failed: u64,
    /// Sorted by key.
    pub servers: Vec<Server>,
    pub federation: Option<Federation>,
}

/// One route: an org's only server, or one of its `servers`.
pub struct Server {
    /// `org` or `org/server`.
    pub key: String,
    pub path: String,
    pub era_configured: String,
    /// `None` while an `auto` upstream is unprobed.
    pub era_resolved: Option<String>,
    pub replicas: Vec<Replica>,
}

pub struct Replica {
    pub name: String,
    pub url: String,
    pub in_rotation: bool,
    pub outstanding: u64,
}

/// An org's federated endpoint.
pub struct Federation {
    pub path: String,
    /// Each server's name and the prefix of its names (empty: none).
    pub members: Vec<(String, String)>,
    pub separator: String,
}

/// One named figure: `key` names it for machines (`data-field`), `label`
/// for people.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub value: String,
}

/// The page, for a caller who presented the secret.
pub(super) async fn page(gw: &Gateway) -> Response {
    html(StatusCode::OK, render(&gather(gw).await))
}

/// The refusal that makes a browser ask for the secret.
pub(super) fn unauthorized(why: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ratatosk: 401</title></head>\
         <body><h1>401 Unauthorized</h1><p>{}</p></body></html>\n",
        escape(why)
    );
    let mut r = html(StatusCode::UNAUTHORIZED, body);
    r.headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"ratatosk-admin\""),
    );
    r
}

/// An HTML answer that loads nothing and is never cached (it shows
/// internal URLs and errors).
fn html(status: StatusCode, body: String) -> Response {
    let mut r = Response::empty(status);
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in headers {
        r.headers.insert(name, HeaderValue::from_static(value));
    }
    r.body = ResponseBody::Full(Bytes::from(body));
    r
}

/// Reads the gateway: what `/readyz` answers, the metrics, the recent errors.
pub async fn gather(gw: &Gateway) -> Status {
    let live = gw.live_full();
    // As before a scrape: in Redis mode this takes Redis's session counts.
    let _ = tokio::time::timeout(STORE_WAIT, gw.count_sessions()).await;
    let (code, ready) = super::readiness_report(gw, &live).await;
    let families = gw.metrics.registry().gather();
    let metric = |name: &str, org: Option<&str>| {
        sum(&families, name, |labels| {
            org.is_none_or(|org| label(labels, "org") == Some(org))
        })
    };

    let mut orgs: BTreeMap<&str, Org> = BTreeMap::new();
    for route in live.routes.orgs() {
        let name = &*route.name;
        let org = orgs.entry(name).or_insert_with(|| Org {
            name: name.to_owned(),
            sessions: count(metric("ratatosk_sessions", Some(name))),
            open_streams: count(metric("ratatosk_open_streams", Some(name))),
            background_streams: count(metric("ratatosk_background_streams", Some(name))),
            requests: count(metric("ratatosk_requests_total", Some(name))),
            failed: count(sum(&families, "ratatosk_requests_total", |labels| {
                label(labels, "org") == Some(name)
                    && label(labels, "status").is_some_and(|s| s.starts_with('5'))
            })),
            servers: Vec::new(),
            federation: live.routes.federation(name).map(|f| Federation {
                path: live.routes.path_of(name, Endpoint::Mcp),
                members: f
                    .members
                    .iter()
                    .zip(&f.naming.prefixes)
                    .map(|(m, prefix)| (m.name.to_string(), prefix.clone()))
                    .collect(),
                separator: f.naming.separator.clone(),
            }),
        });
        let state = &ready["orgs"][&*route.key];
        org.servers.push(Server {
            key: route.key.to_string(),
            path: live.routes.path_of(&route.key, Endpoint::Mcp),
            era_configured: text(&state["era"]["configured"]),
            era_resolved: state["era"]["resolved"].as_str().map(str::to_owned),
            replicas: state["replicas"]
                .as_array()
                .map(|replicas| {
                    replicas
                        .iter()
                        .map(|r| Replica {
                            name: text(&r["name"]),
                            url: text(&r["url"]),
                            in_rotation: r["in_rotation"].as_bool() == Some(true),
                            outstanding: r["outstanding"].as_u64().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let mut orgs: Vec<Org> = orgs.into_values().collect();
    for org in &mut orgs {
        org.servers.sort_by(|a, b| a.key.cmp(&b.key));
    }

    let (errors_total, errors) = gw.metrics.recent_errors.snapshot();
    let (started_at, uptime) = gw.started();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        node_id: gw.node_id(),
        started_at,
        uptime,
        now: SystemTime::now(),
        readiness: text(&ready["status"]),
        ready: code.is_success(),
        generation: ready["config"]["generation"].as_u64().unwrap_or(0),
        store: Store {
            kind: text(&ready["store"]["kind"]),
            ok: ready["store"]["ok"].as_bool() == Some(true),
            error: ready["store"]["error"].as_str().map(str::to_owned),
        },
        bus: ready.get("events").map(|e| Bus {
            up: e["bus"].as_bool() == Some(true),
            dropped: e["dropped"].as_u64().unwrap_or(0),
        }),
        connections: count(metric("ratatosk_connections", None)),
        orgs,
        auth: gw.validator.is_some().then(|| auth_figures(&families)),
        errors_total,
        errors,
    }
}

/// The auth bridge's figures, as `/metrics` has them.
fn auth_figures(families: &[MetricFamily]) -> Vec<Figure> {
    let by = |name: &str, key: &str, value: &str| {
        sum(families, name, |labels| label(labels, key) == Some(value))
    };
    let all = |name: &str| sum(families, name, |_| true);
    let cache = |outcome| by("ratatosk_auth_cache_total", "outcome", outcome);
    let validations = |result| by("ratatosk_auth_validations_total", "result", result);
    let (hits, misses, coalesced) = (cache("hit"), cache("miss"), cache("coalesced"));
    let lookups = hits + misses + coalesced;
    let (latency_sum, latency_count) =
        histogram(families, "ratatosk_auth_introspection_latency_seconds");
    let figure = |key, label, value: String| Figure { key, label, value };
    let n = |v: f64| count(v).to_string();
    vec![
        figure("auth-cache-hit", "cache hits", n(hits)),
        figure(
            "auth-cache-miss",
            "cache misses (asked the provider)",
            n(misses),
        ),
        figure(
            "auth-cache-coalesced",
            "coalesced (waited for another's answer)",
            n(coalesced),
        ),
        figure(
            "auth-cache-hit-ratio",
            "hit ratio",
            if lookups > 0.0 {
                format!("{:.1} %", 100.0 * hits / lookups)
            } else {
                "-".into()
            },
        ),
        figure("auth-valid", "tokens valid", n(validations("valid"))),
        figure("auth-invalid", "tokens invalid", n(validations("invalid"))),
        figure("auth-revoked", "tokens revoked", n(validations("revoked"))),
        figure(
            "auth-unavailable",
            "provider unavailable",
            n(validations("unavailable") + validations("busy")),
        ),
        figure(
            "auth-introspections",
            "introspections",
            n(all("ratatosk_auth_introspections_total")),
        ),
        figure(
            "auth-introspection-failures",
            "introspection failures",
            n(all("ratatosk_auth_introspection_failures_total")),
        ),
        figure(
            "auth-introspection-mean",
            "mean introspection time",
            if latency_count > 0 {
                format!("{:.1} ms", 1000.0 * latency_sum / latency_count as f64)
            } else {
                "-".into()
            },
        ),
        figure(
            "auth-prechecked",
            "refused before introspection",
            n(all("ratatosk_auth_refused_before_introspection_total")),
        ),
        figure(
            "auth-throttled",
            "introspections throttled",
            n(all("ratatosk_auth_introspections_throttled_total")),
        ),
        figure(
            "auth-jwks-ok",
            "JWKS fetches",
            n(by("ratatosk_auth_jwks_fetches_total", "result", "ok")),
        ),
        figure(
            "auth-jwks-failed",
            "JWKS fetches failed",
            n(by("ratatosk_auth_jwks_fetches_total", "result", "failed")),
        ),
        figure(
            "auth-logouts",
            "back-channel logouts accepted",
            n(by(
                "ratatosk_auth_backchannel_logouts_total",
                "result",
                "accepted",
            )),
        ),
        figure(
            "auth-revoked-entries",
            "revocation list",
            n(all("ratatosk_auth_revoked_entries")),
        ),
        figure(
            "auth-exchanges",
            "token exchanges",
            n(by("ratatosk_auth_token_exchanges_total", "result", "ok")),
        ),
    ]
}

/// The sum of a counter's or gauge's series whose labels `keep` accepts; 0
/// for a metric nothing counted yet.
fn sum(families: &[MetricFamily], name: &str, keep: impl Fn(&[LabelPair]) -> bool) -> f64 {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_field_type(), m)))
        .filter(|(_, m)| keep(m.get_label()))
        .map(|(kind, m)| match kind {
            MetricType::COUNTER => m.get_counter().get_value(),
            MetricType::GAUGE => m.get_gauge().get_value(),
            _ => 0.0,
        })
        .sum()
}

/// A histogram's sum and count over all its series.
fn histogram(families: &[MetricFamily], name: &str) -> (f64, u64) {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_histogram())
        .fold((0.0, 0), |(s, c), h| {
            (s + h.get_sample_sum(), c + h.get_sample_count())
        })
}

fn label<'a>(labels: &'a [LabelPair], name: &str) -> Option<&'a str> {
    labels.iter().find(|l| l.name() == name).map(|l| l.value())
}

/// A count from a metric's value (a gauge can dip below 0 for a moment).
fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `text` made safe for HTML text and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
:root { color-scheme: light dark; --line: #8884; --ok: #1a7f37; --bad: #c62828; --dim: #8a8a8a; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2rem 2rem; }
h1 { font-size: 1.4rem; margin: 0 0 .2rem; display: flex; gap: .8rem; align-items: center; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
table { border-collapse: collapse; margin: .3rem 0 .8rem; }
th, td { text-align: left; padding: .2rem .8rem .2rem 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: 13px; }
.badge { font-size: .8rem; padding: .1rem .5rem; border-radius: .6rem; color: #fff; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .dim { color: var(--dim); }
.badge.ok { background: var(--ok); color: #fff; } .badge.bad { background: var(--bad); color: #fff; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15rem 1.2rem; margin: .3rem 0; }
dt { font-weight: 600; } dd { margin: 0; }
dl.figures { grid-template-columns: repeat(3, max-content minmax(4rem, max-content)); }
dl.figures dt { font-weight: normal; } dl.figures dd { text-align: right; padding-right: 2rem; white-space: nowrap; }
.msg { max-width: 60rem; overflow-wrap: anywhere; }
footer { margin-top: 2rem; font-size: .85rem; }
";

/// The page. Pure: every value comes from `s`.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let ok_class = |ok: bool| if ok { "ok" } else { "bad" };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>ratatosk status</title><style>{STYLE}</style></head><body>\n\
         <h1>ratatosk <span class=\"badge {}\" data-field=\"readiness\">{}</span></h1>\n",
        ok_class(s.ready),
        escape(&s.readiness)
    );

    // The node.
    let _ = write!(
        h,
        "<section id=\"node\"><h2>Node</h2><dl>\
         <dt>node</dt><dd class=\"mono\" data-field=\"node-id\">{:08x}</dd>\
         <dt>version</dt><dd data-field=\"version\">{}</dd>\
         <dt>started</dt><dd data-field=\"started\">{}</dd>\
         <dt>uptime</dt><dd data-field=\"uptime\">{}</dd>\
         <dt>config generation</dt><dd data-field=\"generation\">{}</dd>\
         <dt>session store</dt><dd><span data-field=\"store-kind\">{}</span>, \
         <span class=\"{}\" data-field=\"store-health\">{}</span></dd>",
        s.node_id,
        escape(s.version),
        humantime::format_rfc3339_seconds(s.started_at),
        humantime::format_duration(Duration::from_secs(s.uptime.as_secs())),
        s.generation,
        escape(&s.store.kind),
        ok_class(s.store.ok),
        match &s.store.error {
            None if s.store.ok => "ok".to_owned(),
            None => "unavailable".to_owned(),
            Some(e) => format!("unavailable: {}", escape(e)),
        },
    );
    if let Some(bus) = &s.bus {
        let _ = write!(
            h,
            "<dt>node bus</dt><dd><span class=\"{}\" data-field=\"bus\">{}</span>, \
             <span data-field=\"bus-dropped\">{}</span> dropped</dd>",
            ok_class(bus.up),
            if bus.up { "up" } else { "down" },
            bus.dropped
        );
    }
    let _ = writeln!(
        h,
        "<dt>MCP connections</dt><dd data-field=\"connections\">{}</dd></dl></section>",
        s.connections
    );

    // Orgs: the figures, then each org's servers and replicas.
    h.push_str(
        "<section id=\"orgs\"><h2>Orgs</h2><table><thead><tr><th>org</th><th>sessions</th>\
         <th>open streams</th><th>background streams</th><th>requests</th><th>5xx</th></tr></thead><tbody>\n",
    );
    for org in &s.orgs {
        let _ = writeln!(
            h,
            "<tr data-org=\"{name}\"><td><a href=\"#org-{name}\">{name}</a></td>\
             <td class=\"n\" data-field=\"sessions\">{}</td><td class=\"n\" data-field=\"open-streams\">{}</td>\
             <td class=\"n\" data-field=\"background-streams\">{}</td><td class=\"n\" data-field=\"requests\">{}</td>\
             <td class=\"n {}\" data-field=\"failed\">{}</td></tr>",
            org.sessions,
            org.open_streams,
            org.background_streams,
            org.requests,
            if org.failed > 0 { "bad" } else { "" },
            org.failed,
            name = escape(&org.name),
        );
    }
    h.push_str("</tbody></table>\n");
    for org in &s.orgs {
        render_org(&mut h, org);
    }
    h.push_str("</section>\n");

    // Token validation.
    h.push_str("<section id=\"auth\"><h2>Token validation</h2>");
    match &s.auth {
        None => h.push_str(
            "<p class=\"dim\" data-field=\"auth-off\">No identity provider is configured: no org validates tokens.</p>",
        ),
        Some(figures) => {
            h.push_str("<dl class=\"figures\">");
            for f in figures {
                let _ = write!(
                    h,
                    "<dt>{}</dt><dd class=\"n\" data-field=\"{}\">{}</dd>",
                    escape(f.label),
                    escape(f.key),
                    escape(&f.value)
                );
            }
            h.push_str("</dl>");
        }
    }
    h.push_str("</section>\n");

    // Recent errors.
    let _ = write!(
        h,
        "<section id=\"errors\"><h2>Recent errors</h2><p><span data-field=\"errors-total\">{}</span> \
         answered with a 5xx since the start; the last {RECENT_ERRORS} are kept, newest first.</p>",
        s.errors_total
    );
    if !s.errors.is_empty() {
        h.push_str(
            "<table><thead><tr><th>time (UTC)</th><th>org</th><th>kind</th><th>status</th><th>method</th>\
             <th>message</th><th>request id</th></tr></thead><tbody>\n",
        );
        for e in &s.errors {
            let _ = writeln!(
                h,
                "<tr data-error><td class=\"mono\">{}</td><td data-field=\"org\">{}</td>\
                 <td data-field=\"kind\">{}</td><td data-field=\"status\">{}</td><td>{}</td>\
                 <td class=\"msg\" data-field=\"message\">{}</td><td class=\"mono\">{}</td></tr>",
                humantime::format_rfc3339_seconds(e.at),
                e.org.as_deref().map_or_else(|| "-".to_owned(), escape),
                escape(e.kind),
                e.status,
                escape(e.method),
                escape(&e.message),
                escape(&e.request_id),
            );
        }
        h.push_str("</tbody></table>");
    }
    let _ = write!(
        h,
        "</section>\n<footer class=\"dim\">Rendered {} by node {:08x}; reloads every {REFRESH_SECS} s. \
         Machine-readable: <code>/readyz</code>, <code>/metrics</code>.</footer>\n</body></html>\n",
        humantime::format_rfc3339_seconds(s.now),
        s.node_id
    );
    h
}

/// One org's servers (with their replicas) and federated endpoint.
fn render_org(h: &mut String, org: &Org) {
    let name = escape(&org.name);
    let _ = write!(h, "<h3 id=\"org-{name}\">{name}</h3>");
    if let Some(f) = &org.federation {
        let _ = write!(
            h,
            "<p data-federation=\"{name}\">Federated endpoint <code>{}</code> over {} servers: ",
            escape(&f.path),
            f.members.len()
        );
        for (i, (server, prefix)) in f.members.iter().enumerate() {
            if i > 0 {
                h.push_str(", ");
            }
            let _ = write!(
                h,
                "<span data-member=\"{}\">{}</span>",
                escape(server),
                escape(server)
            );
            if !prefix.is_empty() {
                let _ = write!(
                    h,
                    " (names <code>{}{}*</code>)",
                    escape(prefix),
                    escape(&f.separator)
                );
            }
        }
        h.push_str("</p>");
    }
    h.push_str(
        "<table><thead><tr><th>server</th><th>endpoint</th><th>era</th><th>replica</th><th>URL</th>\
         <th>in rotation</th><th>outstanding</th></tr></thead><tbody>\n",
    );
    for server in &org.servers {
        let era = match &server.era_resolved {
            Some(resolved) if *resolved != server.era_configured => format!(
                "{} (<span data-field=\"era-resolved\">{}</span>)",
                escape(&server.era_configured),
                escape(resolved)
            ),
            Some(resolved) => format!(
                "<span data-field=\"era-resolved\">{}</span>",
                escape(resolved)
            ),
            None => format!(
                "{} <span class=\"dim\">(not probed yet)</span>",
                escape(&server.era_configured)
            ),
        };
        let rows = server.replicas.len().max(1);
        let key = escape(&server.key);
        let head = format!(
            "<td rowspan=\"{rows}\">{key}</td><td rowspan=\"{rows}\"><code>{}</code></td>\
             <td rowspan=\"{rows}\" data-field=\"era-configured\" data-value=\"{}\">{era}</td>",
            escape(&server.path),
            escape(&server.era_configured),
        );
        if server.replicas.is_empty() {
            let _ = writeln!(
                h,
                "<tr data-server=\"{key}\">{head}<td colspan=\"4\" class=\"dim\">no replica</td></tr>"
            );
        }
        for (i, r) in server.replicas.iter().enumerate() {
            let _ = writeln!(
                h,
                "<tr data-server=\"{key}\" data-replica=\"{name}\">{}<td>{name}</td><td class=\"mono\">{}</td>\
                 <td class=\"{}\" data-field=\"in-rotation\">{}</td>\
                 <td class=\"n\" data-field=\"outstanding\">{}</td></tr>",
                if i == 0 { head.as_str() } else { "" },
                escape(&r.url),
                if r.in_rotation { "ok" } else { "bad" },
                if r.in_rotation { "yes" } else { "no (ejected)" },
                r.outstanding,
                name = escape(&r.name),
            );
        }
    }
    h.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            version: "9.9.9",
            node_id: 0xabc,
            started_at: SystemTime::UNIX_EPOCH,
            uptime: Duration::from_secs(3723),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(3723),
            readiness: "ready".into(),
            ready: true,
            generation: 3,
            store: Store {
                kind: "memory".into(),
                ok: true,
                error: None,
            },
            bus: None,
            connections: 4,
            orgs: vec![Org {
                name: "org-1".into(),
                sessions: 2,
                open_streams: 1,
                background_streams: 0,
                requests: 17,
                failed: 1,
                servers: vec![Server {
                    key: "org-1/py".into(),
                    path: "/gw/org-1/py/mcp".into(),
                    era_configured: "auto".into(),
                    era_resolved: Some("stateless-2025".into()),
                    replicas: vec![
                        Replica {
                            name: "org-1/py#1".into(),
                            url: "http://10.0.0.1:8000/mcp".into(),
                            in_rotation: true,
                            outstanding: 5,
                        },
                        Replica {
                            name: "org-1/py#2".into(),
                            url: "http://10.0.0.2:8000/mcp".into(),
                            in_rotation: false,
                            outstanding: 0,
                        },
                    ],
                }],
                federation: Some(Federation {
                    path: "/gw/org-1/mcp".into(),
                    members: vec![("py".into(), "p".into())],
                    separator: "_".into(),
                }),
            }],
            auth: None,
            errors_total: 0,
            errors: Vec::new(),
        }
    }

    /// The text of the element whose opening tag contains `marker`.
    fn field<'a>(page: &'a str, marker: &str) -> &'a str {
        let at = page
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker} in {page}"));
        let open = at + page[at..].find('>').expect("tag end") + 1;
        let close = open + page[open..].find('<').expect("next tag");
        &page[open..close]
    }

    #[test]
    fn escape_covers_what_html_gives_meaning_to() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain org-1/py#1 é"), "plain org-1/py#1 é");
    }

    #[test]
    fn the_page_shows_the_node_the_orgs_their_replicas_and_federation() {
        let page = render(&status());
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
        assert_eq!(field(&page, "data-field=\"readiness\""), "ready");
        assert_eq!(field(&page, "data-field=\"node-id\""), "00000abc");
        assert_eq!(field(&page, "data-field=\"version\""), "9.9.9");
        assert_eq!(field(&page, "data-field=\"uptime\""), "1h 2m 3s");
        assert_eq!(field(&page, "data-field=\"generation\""), "3");
        assert_eq!(field(&page, "data-field=\"store-kind\""), "memory");
        assert_eq!(field(&page, "data-field=\"store-health\""), "ok");
        assert_eq!(field(&page, "data-field=\"connections\""), "4");
        let org = &page[page.find("<tr data-org=\"org-1\">").expect("org row")..];
        assert_eq!(field(org, "data-field=\"sessions\""), "2");
        assert_eq!(field(org, "data-field=\"open-streams\""), "1");
        assert_eq!(field(org, "data-field=\"requests\""), "17");
        assert_eq!(field(org, "data-field=\"failed\""), "1");
        let second = &page[page
            .find("data-replica=\"org-1/py#2\"")
            .expect("the second replica")..];
        assert_eq!(field(second, "data-field=\"in-rotation\""), "no (ejected)");
        let first = &page[page
            .find("data-replica=\"org-1/py#1\"")
            .expect("the first replica")..];
        assert_eq!(field(first, "data-field=\"in-rotation\""), "yes");
        assert_eq!(field(first, "data-field=\"outstanding\""), "5");
        assert!(first.contains("data-value=\"auto\""));
        assert_eq!(
            field(first, "data-field=\"era-resolved\""),
            "stateless-2025"
        );
        assert!(page.contains("<span data-member=\"py\">py</span> (names <code>p_*</code>)"));
        assert_eq!(
            field(&page, "data-field=\"auth-off\""),
            "No identity provider is configured: no org validates tokens."
        );
        assert_eq!(field(&page, "data-field=\"errors-total\""), "0");
        assert!(!page.contains("<tr data-error>"));
        assert!(!page.contains("data-field=\"bus\""));
    }

    #[test]
    fn text_from_the_config_and_from_errors_is_escaped() {
        let mut s = status();
        s.orgs[0].name = "<org\"&'>".into();
        s.orgs[0].servers[0].replicas[0].url = "http://x/<img src=x onerror=alert(1)>".into();
        s.store = Store {
            kind: "redis".into(),
            ok: false,
            error: Some("<b>down</b>".into()),
        };
        s.errors_total = 1;
        s.errors = vec![RecentError {
            at: SystemTime::UNIX_EPOCH,
            org: Some("<o>".into()),
            method: "tools/call",
            status: 502,
            kind: "upstream",
            message: "<script>alert('x')</script>".into(),
            request_id: "r\"1".into(),
        }];
        let page = render(&s);
        for raw in ["<script>", "<img", "<b>down", "<org", "<o>", "r\"1"] {
            assert!(!page.contains(raw), "{raw} unescaped in {page}");
        }
        assert!(page.contains("data-org=\"&lt;org&quot;&amp;&#39;&gt;\""));
        assert_eq!(
            field(&page, "data-field=\"message\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
        );
        assert_eq!(field(&page, "data-field=\"kind\""), "upstream");
        assert_eq!(field(&page, "data-field=\"status\""), "502");
        assert_eq!(
            field(&page, "data-field=\"store-health\""),
            "unavailable: &lt;b&gt;down&lt;/b&gt;"
        );
    }

    #[test]
    fn auth_figures_come_from_the_registry_as_metrics_shows_them() {
        let registry =
            prometheus::Registry::new_custom(Some("ratatosk".into()), None).expect("registry");
        let auth = ratatosk_auth::metrics::AuthMetrics::register(&registry).expect("metrics");
        auth.cache.with_label_values(&["hit"]).inc_by(3);
        auth.cache.with_label_values(&["miss"]).inc();
        auth.validations
            .with_label_values(&["jwt", "valid"])
            .inc_by(3);
        auth.validations
            .with_label_values(&["introspect", "valid"])
            .inc();
        auth.introspections.inc_by(2);
        auth.introspection_latency.observe(0.010);
        auth.introspection_latency.observe(0.030);
        let figures = auth_figures(&registry.gather());
        let value = |key: &str| {
            figures
                .iter()
                .find(|f| f.key == key)
                .map(|f| f.value.as_str())
                .unwrap_or_else(|| panic!("no {key}"))
        };
        assert_eq!(value("auth-cache-hit"), "3");
        assert_eq!(value("auth-cache-miss"), "1");
        assert_eq!(value("auth-cache-coalesced"), "0");
        assert_eq!(value("auth-cache-hit-ratio"), "75.0 %");
        assert_eq!(value("auth-valid"), "4");
        assert_eq!(value("auth-introspections"), "2");
        assert_eq!(value("auth-introspection-mean"), "20.0 ms");
        assert_eq!(value("auth-jwks-failed"), "0");
        let mut s = status();
        s.auth = Some(figures);
        let page = render(&s);
        assert_eq!(field(&page, "data-field=\"auth-cache-hit\""), "3");
        assert!(!page.contains("auth-off"));
    }
}
