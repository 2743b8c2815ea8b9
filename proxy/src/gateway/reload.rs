//! A new config in place of the running one: SIGHUP, or `POST /reload` on
//! the admin listener, re-reads the config file.
//!
//! The new file is checked as `ratatosk check` checks it, and so are the
//! fields only a restart applies ([`crate::config::RESTART_ONLY`]); a file
//! with any problem is refused, every problem named, and the running config
//! stays. Otherwise the routes are rebuilt (an org whose part of the file
//! did not change keeps its routes as they are: connections, probed era,
//! replica health) and swapped in. Requests in flight finish on the routes
//! they started on; sessions and streams are kept. A route that is gone
//! ends its sessions, and the sessions of a changed org are told that its
//! lists may have changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use super::registry::{Registrations, merged};
use super::{Gateway, Live};
use crate::config::{Config, ConfigError};
use crate::routes::{Routes, RoutesError};

/// What reloading needs besides the config: the file, and order.
pub(crate) struct Reloads {
    /// The file the config came from.
    file: OnceLock<PathBuf>,
    /// One reload at a time.
    running: Mutex<()>,
    /// Set by SIGHUP; [`Gateway::watch_reloads`] waits on it.
    requested: Notify,
    /// The config as the file gives it; the running one adds the
    /// registered servers.
    base: std::sync::Mutex<Arc<Config>>,
    /// The registrations last applied, and those of them served.
    registered: std::sync::Mutex<(Registrations, Registrations)>,
}

impl Reloads {
    pub(crate) fn new(base: &Config) -> Reloads {
        Reloads {
            file: OnceLock::new(),
            running: Mutex::default(),
            requested: Notify::new(),
            base: std::sync::Mutex::new(Arc::new(base.clone())),
            registered: std::sync::Mutex::default(),
        }
    }

    /// The config as the file gives it.
    pub(crate) fn base(&self) -> Arc<Config> {
        self.base.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The config file, if the gateway was started with one.
    pub(crate) fn file(&self) -> Option<PathBuf> {
        self.file.get().cloned()
    }

    /// The registrations last applied.
    pub(crate) fn registered(&self) -> Registrations {
        let kept = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        kept.0.clone()
    }

    /// The registered servers the running config serves.
    pub(crate) fn served(&self) -> Registrations {
        let kept = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        kept.1.clone()
    }
}

/// Why a reload was refused. The running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (the gateway was not started with --config)")]
    NoFile,
    /// Unreadable, invalid, or changing a field only a restart applies.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {source}")]
    Routes { file: PathBuf, source: RoutesError },
}

impl ReloadError {
    /// Each problem as `{path, message}`: the field of the file, and what
    /// is wrong with it (none when the file cannot be read, or its routes
    /// cannot be built).
    pub fn problems_json(&self) -> Value {
        let problems: Vec<Value> = match self {
            ReloadError::Config(e) => e
                .problems()
                .iter()
                .map(|p| json!({"path": p.path, "message": p.message}))
                .collect(),
            _ => Vec::new(),
        };
        json!({ "problems": problems })
    }
}

/// What a reload changed: route keys (`org`, or `org/server`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Routes rebuilt (a server's own config, or its org's other than its
    /// other servers, changed), and federated endpoints whose org's part
    /// of the config changed at all.
    pub changed: Vec<String>,
    /// Sessions ended because their route is gone.
    pub sessions_ended: usize,
}

impl Reloaded {
    pub fn to_json(&self) -> Value {
        json!({
            "reloaded": true,
            "generation": self.generation,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "sessions_ended": self.sessions_ended,
        })
    }
}

impl Gateway {
    /// The file reloads re-read; set once, at start.
    pub fn set_config_file(&self, file: &Path) {
        let _ = self.reloads.file.set(file.to_owned());
    }

    /// Asks [`Gateway::watch_reloads`] for a reload (SIGHUP); callable
    /// from any thread.
    pub fn request_reload(&self) {
        self.reloads.requested.notify_one();
    }

    /// Reloads whenever asked, until the gateway drains. Results are
    /// logged and counted.
    pub async fn watch_reloads(self: Arc<Self>) {
        while !self.is_draining() {
            self.reloads.requested.notified().await;
            let _ = self.reload_file().await;
        }
    }

    /// Re-reads the config file and applies it (see the module's doc).
    pub async fn reload_file(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let loaded = match self.reloads.file.get() {
            Some(file) => load_off_thread(file).await.map(|config| (config, file)),
            None => Err(ReloadError::NoFile),
        };
        let outcome = match loaded {
            Ok((config, file)) => self.reload(config, file).await,
            Err(e) => {
                self.count_reload(false);
                Err(e)
            }
        };
        match &outcome {
            Ok(done) => tracing::info!(
                generation = done.generation,
                added = ?done.added,
                removed = ?done.removed,
                changed = ?done.changed,
                sessions_ended = done.sessions_ended,
                "config reloaded"
            ),
            Err(e) => tracing::error!("config reload refused, the running config stays: {e}"),
        }
        outcome
    }

    /// Applies `config` (read from `file`, named in errors) in place of the
    /// running one, with the registered servers that fit it.
    pub async fn reload(
        self: &Arc<Self>,
        config: Config,
        file: &Path,
    ) -> Result<Reloaded, ReloadError> {
        self.apply(Some(config), None, file).await
    }

    /// Applies a new config file's config, or new registrations (what is
    /// not given stays): the file's config plus the registered servers
    /// that fit it.
    async fn apply(
        self: &Arc<Self>,
        base: Option<Config>,
        registered: Option<Registrations>,
        file: &Path,
    ) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloads.running.lock().await;
        self.apply_held(base, registered, file).await
    }

    /// One reload at a time: held while the registrations are read and
    /// applied, so that an older read never replaces a newer one.
    pub(crate) async fn reloading(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reloads.running.lock().await
    }

    /// [`Gateway::apply`], its caller holding [`Gateway::reloading`].
    pub(crate) async fn apply_held(
        self: &Arc<Self>,
        base: Option<Config>,
        registered: Option<Registrations>,
        file: &Path,
    ) -> Result<Reloaded, ReloadError> {
        let from_file = base.is_some();
        let base = base.map_or_else(|| self.reloads.base(), Arc::new);
        let registered = registered.unwrap_or_else(|| self.reloads.registered());
        let (config, served) = merged(&base, &registered);
        let prepared = self.prepare(config, file);
        if from_file {
            self.count_reload(prepared.is_ok());
        }
        let (next, mut done) = prepared?;
        self.gauge_registered(&base, &served);
        *self.reloads.base.lock().unwrap_or_else(|e| e.into_inner()) = base;
        *self
            .reloads
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (registered, served);
        // The removed routes' sessions end while those routes still run, so
        // their upstream sessions are closed and they are counted out. (A
        // session opened on one of them meanwhile ends at its idle expiry.)
        for key in &done.removed {
            done.sessions_ended += self.end_sessions_of_route(key).await;
        }
        let live = Arc::new(next);
        self.live.store(live.clone());
        self.metrics.config_generation.set(done.generation as i64);
        if from_file {
            self.warn_about_unsafe_settings();
        } else {
            tracing::info!(
                generation = done.generation,
                added = ?done.added,
                removed = ?done.removed,
                changed = ?done.changed,
                "registered servers applied"
            );
        }
        // Told after the swap, without holding up the reload (or the
        // registration that caused it).
        let this = self.clone();
        let changed = done.changed.clone();
        tokio::spawn(async move {
            for key in &changed {
                this.tell_lists_changed(&live, key).await;
            }
        });
        Ok(done)
    }

    /// Checks `config` against the running one and builds its routes: the
    /// next config and what would change, or why not.
    fn prepare(&self, config: Config, file: &Path) -> Result<(Live, Reloaded), ReloadError> {
        let old = self.live_full();
        let problems = old.config.restart_only_changes(&config);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            }
            .into());
        }
        let unchanged = |org: &str| old.config.source.of_org(org) == config.source.of_org(org);
        // A route is kept while what it is built from is unchanged, though
        // other servers of its org came or went.
        let route_unchanged = |route: &crate::routes::OrgRoute| {
            let (org, server) = (&*route.name, route.server_name.as_deref());
            old.config.source.of_route(org, server) == config.source.of_route(org, server)
        };
        let reuse = |key: &str| {
            let route = old.routes.org(key)?;
            route_unchanged(route).then(|| route.clone())
        };
        let reuse_rates = |org: &str| {
            let at = ["orgs", org, "rate_limits"];
            if old.config.source.at(&at) != config.source.at(&at) {
                return None;
            }
            let front = match old.routes.federation(org) {
                Some(federation) => &federation.front,
                None => &old.routes.of_org(org).next()?.front,
            };
            Some(front.rates.clone())
        };
        let routes = Routes::reusing(&config, &self.metrics, self.issuers(), &reuse, &reuse_rates)
            .map_err(|source| ReloadError::Routes {
                file: file.to_owned(),
                source,
            })?;
        // Keyed by kind too: an org that goes from one upstream to
        // `servers` (or back) has other sessions under the same key.
        let entries = |routes: &Routes| -> BTreeSet<(String, bool)> {
            let servers = routes.orgs().map(|r| (r.key.to_string(), false));
            servers
                .chain(routes.federations().map(|f| (f.key.to_string(), true)))
                .collect()
        };
        let (before, after) = (entries(&old.routes), entries(&routes));
        let keys =
            |found: Vec<&(String, bool)>| found.into_iter().map(|(k, _)| k.clone()).collect();
        let done = Reloaded {
            generation: old.generation + 1,
            added: keys(after.difference(&before).collect()),
            removed: keys(before.difference(&after).collect()),
            changed: keys(
                after
                    .intersection(&before)
                    .filter(|(key, federated)| match old.routes.org(key) {
                        // A server's route: what it is built from.
                        Some(route) if !federated => !route_unchanged(route),
                        // A federated endpoint: anything of its org.
                        _ => !unchanged(org_of(key)),
                    })
                    .collect(),
            ),
            sessions_ended: 0,
        };
        let next = Live {
            config,
            routes,
            generation: done.generation,
        };
        Ok((next, done))
    }

    fn count_reload(&self, reloaded: bool) {
        let result = if reloaded { "reloaded" } else { "refused" };
        self.metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
    }

    /// Ends the sessions of route `key`, which a reload removed; how many.
    async fn end_sessions_of_route(&self, key: &str) -> usize {
        let records = match self.store.list_org(key).await {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(
                    route = key,
                    "cannot list the sessions of a removed route: {e}"
                );
                return 0;
            }
        };
        let mut ended = 0;
        for record in records {
            match self
                .end_session(&record.state.id, "its route was removed from the config")
                .await
            {
                Ok(true) => ended += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(route = key, "cannot end a session of a removed route: {e}")
                }
            }
        }
        ended
    }

    /// Tells the sessions of route `key` (a server's, or an org's
    /// federated endpoint) that its tools, prompts and resources may have
    /// changed: every session of a server's route, and the federated
    /// sessions this node feeds (each node tells its own when it applies
    /// the change).
    async fn tell_lists_changed(self: &Arc<Self>, live: &Live, key: &str) {
        if let Some(federation) = live.routes.federation(key) {
            self.lists_changed(federation);
            return;
        }
        let Ok(records) = self.store.list_org(key).await else {
            return;
        };
        for record in records {
            self.publish_lists_changed(&record.state.id).await;
        }
    }
}

/// Reads `file` off the serving threads (file reads, PEM checks).
async fn load_off_thread(file: &Path) -> Result<Config, ReloadError> {
    let path = file.to_owned();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|e| ConfigError::Read {
            file: file.to_owned(),
            source: std::io::Error::other(e),
        })?;
    Ok(loaded?)
}

/// The org of route key `org` or `org/server`.
fn org_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(org, _)| org)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{Response, ResponseBody};
    use crate::gateway::tests::*;
    use crate::session::MemorySessionStore;
    use bytes::Bytes;
    use http::{Method, StatusCode};
    use std::time::Duration;

    /// A config with `orgs` (YAML lines under `orgs:`) and `origin` allowed.
    fn yaml(origin: &str, orgs: &str) -> String {
        format!(
            "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nbase_path: /gw\n\
             allowed_origins: [\"{origin}\"]\npublish: {{secret: {SECRET}}}\n\
             streams: {{keepalive: 10s}}\norgs:\n{orgs}"
        )
    }

    fn org(name: &str, url: &str, extra: &str) -> String {
        format!(
            "  {name}: {{{extra} upstream: {{era: stateless-2025, replicas: [\"{url}\"], timeout: 2s}}}}\n"
        )
    }

    fn config(text: &str) -> Config {
        Config::from_yaml(text, Path::new("unit.yaml"), &|_| None).expect("config")
    }

    /// A gateway on `text`, sessions in memory.
    fn gateway_of(text: &str) -> Arc<Gateway> {
        Gateway::new(config(text), Arc::new(MemorySessionStore::new())).expect("gw")
    }

    fn post_to(org: &str, body: &str, extra: &[(&str, &str)]) -> crate::edge::Request {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        headers.extend_from_slice(extra);
        request(Method::POST, &format!("/gw/{org}/mcp"), &headers, body)
    }

    async fn initialize_at(gw: &Arc<Gateway>, org: &str) -> String {
        let r = gw.handle(post_to(org, INIT, &[])).await;
        assert_eq!(r.status, StatusCode::OK, "initialize on {org}");
        r.headers
            .get("mcp-session-id")
            .expect("a session id")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    async fn stream_at(gw: &Arc<Gateway>, org: &str, sid: &str) -> Response {
        let r = gw
            .handle(request(
                Method::GET,
                &format!("/gw/{org}/mcp"),
                &[("accept", "text/event-stream"), ("mcp-session-id", sid)],
                "",
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        r
    }

    async fn ping(gw: &Arc<Gateway>, org: &str, sid: &str) -> StatusCode {
        let ping = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;
        let headers = [
            ("mcp-session-id", sid),
            ("mcp-protocol-version", "2025-06-18"),
        ];
        gw.handle(post_to(org, ping, &headers)).await.status
    }

    /// Whether the stream ends within 5 s (reading what comes first).
    async fn ends(stream: &mut Response) -> bool {
        let ResponseBody::Stream(src) = &mut stream.body else {
            panic!("expected a stream")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, src.next_chunk()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(_)) => src.written(),
            }
        }
    }

    fn reloads(gw: &Gateway, result: &str) -> u64 {
        gw.metrics.config_reloads.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn orgs_come_and_go_sessions_stay_and_a_removed_orgs_sessions_end() {
        let (up1, up2, up3) = (mcp_stub().await, mcp_stub().await, mcp_stub().await);
        let before = yaml(
            "http://old.example",
            &(org("org-1", &up1.url(), "") + &org("org-2", &up2.url(), "")),
        );
        let gw = gateway_of(&before);
        let (s1, s2) = (
            initialize_at(&gw, "org-1").await,
            initialize_at(&gw, "org-2").await,
        );
        let mut stream1 = stream_at(&gw, "org-1", &s1).await;
        let mut stream2 = stream_at(&gw, "org-2", &s2).await;
        let route1 = gw.live().routes.org("org-1").cloned().expect("org-1");

        let after = yaml(
            "http://new.example",
            &(org("org-1", &up1.url(), "") + &org("org-3", &up3.url(), "")),
        );
        let done = gw
            .reload(config(&after), Path::new("unit.yaml"))
            .await
            .expect("reloaded");
        assert_eq!(
            done,
            Reloaded {
                generation: 2,
                added: vec!["org-3".into()],
                removed: vec!["org-2".into()],
                changed: vec![],
                sessions_ended: 1,
            }
        );
        assert_eq!(gw.live().generation, 2);
        assert_eq!(gw.metrics.config_generation.get(), 2);
        assert_eq!(reloads(&gw, "reloaded"), 1);

        // org-1 is untouched: the same route, its session and stream live on.
        let kept = gw.live().routes.org("org-1").cloned().expect("org-1");
        assert!(
            Arc::ptr_eq(&route1, &kept),
            "an unchanged org keeps its route"
        );
        assert_eq!(ping(&gw, "org-1", &s1).await, StatusCode::OK);
        let note =
            br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"still here"}}"#;
        gw.publish(&s1, &Bytes::from_static(note))
            .await
            .expect("published");
        assert!(
            text_until(&mut stream1, "still here")
                .await
                .contains("still here")
        );

        // org-2 is gone: its stream ended, its session and path with it.
        assert!(ends(&mut stream2).await, "the removed org's stream ends");
        assert!(gw.store.lookup(&s2).await.expect("store").is_none());
        assert_eq!(ping(&gw, "org-2", &s2).await, StatusCode::NOT_FOUND);

        // org-3 is new; the new origin passes and the old one no longer does.
        initialize_at(&gw, "org-3").await;
        let from = |origin: &str| post_to("org-3", INIT, &[("origin", origin)]);
        assert_eq!(
            gw.handle(from("http://new.example")).await.status,
            StatusCode::OK
        );
        assert_eq!(
            gw.handle(from("http://old.example")).await.status,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn a_changed_org_is_rebuilt_and_its_sessions_hear_that_lists_changed() {
        let up = mcp_stub().await;
        let plain = yaml("http://ok.example", &org("org-1", &up.url(), ""));
        let gw = gateway_of(&plain);
        let sid = initialize_at(&gw, "org-1").await;
        let mut stream = stream_at(&gw, "org-1", &sid).await;
        let before = gw.live().routes.org("org-1").cloned().expect("org-1");

        let policy = "policy: [{name: only-x, allow: {tools: [x]}}],";
        let policed = yaml("http://ok.example", &org("org-1", &up.url(), policy));
        let done = gw
            .reload(config(&policed), Path::new("unit.yaml"))
            .await
            .expect("reloaded");
        assert_eq!(done.changed, vec!["org-1".to_string()]);
        assert_eq!(
            (done.added.len(), done.removed.len(), done.sessions_ended),
            (0, 0, 0)
        );
        let after = gw.live().routes.org("org-1").cloned().expect("org-1");
        assert!(
            !Arc::ptr_eq(&before, &after),
            "a changed org gets new routes"
        );
        text_until(&mut stream, "notifications/tools/list_changed").await;
        assert_eq!(ping(&gw, "org-1", &sid).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_bad_or_restart_only_change_is_refused_and_nothing_changes() {
        let up = mcp_stub().await;
        let text = yaml("http://ok.example", &org("org-1", &up.url(), ""));
        let gw = gateway_of(&text);
        let sid = initialize_at(&gw, "org-1").await;

        // Fields only a restart applies: each one named.
        let moved = text
            .replace("listen: 127.0.0.1:1\n", "listen: 127.0.0.1:3\n")
            .replace("base_path: /gw\n", "base_path: /other\n");
        let Err(ReloadError::Config(e)) = gw.reload(config(&moved), Path::new("unit.yaml")).await
        else {
            panic!("a restart-only change must be refused")
        };
        let paths: Vec<&str> = e.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["listen", "base_path"]);
        assert!(e.to_string().contains("restart the gateway"), "{e}");

        // An invalid file, through the file path as SIGHUP takes it: every
        // problem named.
        let file =
            std::env::temp_dir().join(format!("ratatosk-reload-{}.yaml", rand::random::<u64>()));
        let broken = text
            .replace("era: stateless-2025", "era: sometime")
            .replace("timeout: 2s", "timeout: soon");
        std::fs::write(&file, broken).expect("write");
        assert!(matches!(gw.reload_file().await, Err(ReloadError::NoFile)));
        gw.set_config_file(&file);
        let Err(e) = gw.reload_file().await else {
            panic!("an invalid file must be refused")
        };
        let _ = std::fs::remove_file(&file);
        assert!(
            !e.problems_json()["problems"]
                .as_array()
                .expect("problems")
                .is_empty(),
            "{e}"
        );
        assert!(e.to_string().contains("orgs.org-1.upstream"), "{e}");

        assert_eq!(gw.live().generation, 1);
        assert_eq!(reloads(&gw, "refused"), 3);
        assert_eq!(reloads(&gw, "reloaded"), 0);
        assert_eq!(ping(&gw, "org-1", &sid).await, StatusCode::OK);
    }
}
