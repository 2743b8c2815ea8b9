//! `ratatosk --config FILE` runs the gateway; `ratatosk check --config FILE`
//! validates a config and exits non-zero if it is wrong.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora_core::server::Server;
use pingora_core::server::configuration::ServerConf;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use ratatosk::auth::LogoutMemory;
use ratatosk::config::Config;
use ratatosk::gateway::{Gateway, Shared};
use ratatosk::server::{AdminApp, Connections, Housekeeping, McpApp};
use ratatosk::session::{MemorySessionStore, RedisSessionStore, SessionStore};
use ratatosk::stream::shared::{SharedEvents, SharedLimits};
use ratatosk_auth::tls::{ListenerTls, Reload, ServingCerts};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ratatosk",
    version,
    about = "MCP gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The gateway config (YAML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit: 0 if valid, 1 with every problem otherwise.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// mimalloc: about a third less CPU in allocation than glibc's malloc on the
/// request path, and less fragmentation with many streams (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (Some(Command::Check { config }), _) => check(&config),
        (None, Some(config)) => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("ratatosk: {e:#}");
                ExitCode::FAILURE
            }
        },
        (None, None) => {
            eprintln!("ratatosk: missing --config FILE (see --help)");
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for upstream in config.insecure_tls() {
                eprintln!(
                    "warning: upstream '{upstream}' has tls.insecure_skip_verify: its certificate is not checked"
                );
            }
            println!(
                "{}: ok ({} org{}: {})",
                path.display(),
                config.orgs.len(),
                if config.orgs.len() == 1 { "" } else { "s" },
                config
                    .orgs
                    .iter()
                    .map(|(name, org)| if org.servers.is_empty() {
                        name.clone()
                    } else {
                        let servers: Vec<&str> = org.servers.keys().map(String::as_str).collect();
                        format!("{name} (servers {})", servers.join(", "))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs (text, or JSON with `RATATOSK_LOG_FORMAT=json`, filtered by
/// `RATATOSK_LOG`), and traces over OTLP when `telemetry` or the `OTEL_*`
/// variables ask for them (spans at `info` and above, not log lines).
fn init_logging(telemetry: Option<&ratatosk::telemetry::TelemetryConfig>) -> anyhow::Result<()> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_env("RATATOSK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn"));
    let json = std::env::var("RATATOSK_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    match ratatosk::telemetry::start(telemetry)? {
        // Without traces the filter is global, as cheap as it gets.
        None => tracing_subscriber::registry().with(filter).with(fmt).init(),
        Some(traces) => {
            let fmt = tracing_subscriber::fmt::layer().with_target(false);
            let fmt = if json {
                fmt.json().boxed()
            } else {
                fmt.boxed()
            };
            let spans = tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && *meta.level() <= tracing::Level::INFO
            })
            // Without the hint the most verbose level would be enabled
            // everywhere (and `log` records below info made and dropped).
            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO);
            tracing_subscriber::registry()
                .with(fmt.with_filter(filter))
                .with(traces.with_filter(spans))
                .init();
        }
    }
    Ok(())
}

/// What SIGHUP asks for: the listeners' TLS files re-read, and the config
/// file (its default action would end the process).
struct Hangups {
    tls: std::sync::mpsc::Receiver<()>,
    config: std::sync::mpsc::Receiver<()>,
}

/// Handles SIGHUP from now on (before anything else starts, so an early one
/// does not end the process).
fn on_hangups() -> anyhow::Result<Hangups> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .context("cannot handle SIGHUP")?;
    let (tell_tls, tls) = std::sync::mpsc::channel();
    let (tell_config, config) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ratatosk-sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                tracing::info!("SIGHUP received: re-reading the config file and TLS certificates");
                let _ = tell_tls.send(());
                let _ = tell_config.send(());
            }
        })
        .context("cannot start the SIGHUP thread")?;
    Ok(Hangups { tls, config })
}

/// Passes SIGHUP's config reloads to the gateway (which reloads in its
/// housekeeping task).
fn forward_reloads(
    hangups: std::sync::mpsc::Receiver<()>,
    gateway: Arc<Gateway>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("ratatosk-reload".into())
        .spawn(move || {
            for () in hangups {
                gateway.request_reload();
            }
        })
        .context("cannot start the reload thread")?;
    Ok(())
}

/// The certificates of the MCP and admin listeners, loaded (and then kept
/// fresh by a thread of their own).
struct Certs {
    mcp: Option<Arc<ServingCerts>>,
    admin: Option<Arc<ServingCerts>>,
}

impl Certs {
    fn load(config: &Config, path: &Path) -> anyhow::Result<Certs> {
        let load = |name: &'static str, tls: &Option<ListenerTls>| {
            tls.as_ref()
                .map(|t| ServingCerts::load(name, t))
                .transpose()
                .with_context(|| format!("{}: `{name}`", path.display()))
        };
        Ok(Certs {
            mcp: load("tls", &config.tls)?,
            admin: load("admin_tls", &config.admin_tls)?,
        })
    }

    fn keep_fresh(
        &self,
        hangups: std::sync::mpsc::Receiver<()>,
        gateway: &Gateway,
    ) -> anyhow::Result<()> {
        let reloads = gateway.metrics.tls_reloads.clone();
        let certs: Vec<Arc<ServingCerts>> = self.mcp.iter().chain(&self.admin).cloned().collect();
        // Every listener's series from the start, at 0: an alert on
        // `increase()` sees the first failure.
        for certs in &certs {
            for result in [Reload::Reloaded, Reload::Failed] {
                reloads.with_label_values(&[certs.name(), result.as_str()]);
            }
        }
        ratatosk_auth::tls::keep_fresh(certs, hangups, move |certs, done| {
            reloads
                .with_label_values(&[certs.name(), done.as_str()])
                .inc();
        })
        .context("cannot start the TLS reload thread")
    }
}

/// A listener's TLS settings on `certs`: Pingora's rustls acceptor with our
/// resolver (which reloads) in place of its files (which it would read once,
/// and panic on if broken).
fn tls_settings(certs: &Arc<ServingCerts>, h2: bool) -> anyhow::Result<TlsSettings> {
    let mut tls = TlsSettings::intermediate("", "").context("cannot set up TLS")?;
    tls.set_cert_resolver(certs.clone());
    if let Some(verifier) = certs.client_verifier() {
        tls.set_client_cert_verifier(verifier);
    }
    if h2 {
        tls.enable_h2();
    }
    Ok(tls)
}

fn run(path: &Path) -> anyhow::Result<()> {
    ratatosk_auth::tls::install_crypto();
    let hangups = on_hangups()?;
    let config = Config::load(path)?;
    init_logging(config.telemetry.as_ref())?;
    if ratatosk::telemetry::on() {
        tracing::info!("traces go over OTLP (telemetry, OTEL_* variables)");
    }
    let certs = Certs::load(&config, path)?;
    // Pingora panics on a busy port; find out first and say which.
    for (what, addr) in [
        ("listen", config.listen),
        ("admin_listen", config.admin_listen),
    ] {
        TcpListener::bind(addr).with_context(|| {
            format!(
                "{}: `{what}` address {addr} is not available",
                path.display()
            )
        })?;
    }
    let listen_addr = config.listen;
    let (listen, admin_listen) = (config.listen.to_string(), config.admin_listen.to_string());
    let server_conf = ServerConf {
        threads: config.server.threads,
        // One single-threaded runtime per thread: a connection's task, its
        // upstream calls and its timers stay on one thread. Work stealing
        // cost about 1.5x the CPU per proxied request (bench/RESULTS.md).
        work_stealing: false,
        grace_period_seconds: Some(config.server.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    // A shared store's connection is driven by a runtime of its own: the
    // serving threads' runtimes only start with the server.
    let (store, shared, _store_runtime) = session_store(&config, path)?;
    let gateway = Gateway::with_nodes(config, store, shared).context("cannot build the gateway")?;
    gateway.set_config_file(path);
    forward_reloads(hangups.config, gateway.clone())?;
    gateway.warn_about_unsafe_settings();

    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    // One MCP service per thread, each a single-threaded runtime with its own
    // SO_REUSEPORT listener on the same address: the kernel spreads
    // connections, and a connection's socket, task, upstream connections and
    // timers all stay on one thread (as nginx's workers do). With one shared
    // listener, Pingora registers every accepted socket with the accepting
    // runtime and wakes the serving thread across threads on each event
    // (bench/RESULTS.md).
    let threads = gateway.live().config.server.threads;
    let connections = Connections::new(&gateway);
    for i in 0..threads {
        let key = listen_key(listen_addr, i);
        let mut mcp = Service::new(
            format!("ratatosk mcp {i}"),
            McpApp::new(gateway.clone(), connections.clone()),
        );
        mcp.threads = Some(1);
        // No L4 read buffer: Pingora reads request heads into a buffer of its
        // own, and a 64 KiB one per connection would dominate the memory of
        // an idle SSE stream. Writes keep the default MSS-sized buffer.
        let mut options = TcpSocketOptions::default();
        options.so_reuseport = Some(threads > 1);
        let mut listener = ListenerConfig::tcp(key.as_str())
            .tcp_socket_options(options)
            .l4_buffer(L4BufferSettings::default().read(0));
        if let Some(certs) = &certs.mcp {
            listener = listener.tls(tls_settings(certs, true)?);
        }
        mcp.add_listener(listener);
        server.add_service(mcp);
    }

    let mut admin = Service::new(
        "ratatosk admin".to_string(),
        AdminApp {
            gateway: gateway.clone(),
        },
    );
    match &certs.admin {
        // The admin app is Pingora's HTTP app, which speaks HTTP/2 by ALPN.
        Some(certs) => admin.add_listener(
            ListenerConfig::tcp(admin_listen.as_str()).tls(tls_settings(certs, true)?),
        ),
        None => admin.add_tcp(&admin_listen),
    }
    certs.keep_fresh(hangups.tls, &gateway)?;
    server.add_service(admin);

    server.add_service(background_service(
        "ratatosk housekeeping",
        Housekeeping {
            gateway: gateway.clone(),
        },
    ));

    let (tls, admin_tls) = (certs.mcp.is_some(), certs.admin.is_some());
    tracing::info!(%listen, tls, %admin_listen, admin_tls, base_path = %gateway.live().config.base_path, "ratatosk listening");
    server.run_forever();
}

/// The configured session store; with a shared store, what the nodes
/// share besides (event logs, bus, logouts), and the runtime that drives
/// their connections (kept for the life of the process).
type Stores = (
    Arc<dyn SessionStore>,
    Option<Shared>,
    Option<tokio::runtime::Runtime>,
);

fn session_store(config: &Config, path: &Path) -> anyhow::Result<Stores> {
    let sessions = &config.sessions;
    let redis = sessions
        .redis()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let Some(target) = redis else {
        return Ok((Arc::new(MemorySessionStore::new()), None, None));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ratatosk-redis")
        .enable_all()
        .build()
        .context("cannot start the session store's runtime")?;
    let unusable = || {
        format!(
            "{}: `sessions.url` or `sessions.sentinel` does not name a usable Redis",
            path.display()
        )
    };
    let (store, shared) = {
        let _driven_by = runtime.enter();
        let mut store =
            RedisSessionStore::new(target.clone(), &sessions.key_prefix, sessions.idle_ttl)
                .with_context(unusable)?;
        if let Some(wait) = sessions.wait {
            store = store
                .waiting_for(target.clone(), wait.replicas, wait.timeout)
                .with_context(unusable)?;
        }
        let events = SharedEvents::new(
            target,
            &sessions.key_prefix,
            SharedLimits {
                max_events: sessions.event_log_size,
                max_bytes: sessions.event_log_bytes,
                max_age: sessions.event_log_max_age,
                idle_ttl: sessions.idle_ttl,
                wait: sessions.wait.map(|w| (w.replicas, w.timeout)),
            },
        )
        .with_context(unusable)?;
        let logouts = LogoutMemory::new(store.connection(), &sessions.key_prefix);
        let rates = store.connection();
        (
            store,
            Shared {
                events,
                logouts,
                rates,
            },
        )
    };
    tracing::info!(prefix = %sessions.key_prefix, node = shared.events.node(), "sessions and their events are kept in redis");
    Ok((Arc::new(store), Some(shared), Some(runtime)))
}

/// The address string of service `i`'s listener. Pingora shares one
/// listening socket among services whose address strings are equal (its fd
/// table is keyed by the string), and each of them would close it at
/// shutdown. The port written with `i` leading zeros is the same address
/// under another key, so every service binds its own `SO_REUSEPORT` socket.
fn listen_key(addr: SocketAddr, i: usize) -> String {
    let ip = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!("{ip}:{}{}", "0".repeat(i), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_keys_differ_but_name_the_same_address() {
        for addr in ["127.0.0.1:8080", "[::1]:443"] {
            let addr: SocketAddr = addr.parse().expect("address");
            let keys: Vec<String> = (0..4).map(|i| listen_key(addr, i)).collect();
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(k.parse::<SocketAddr>().expect("parses"), addr);
                assert!(keys[..i].iter().all(|other| other != k));
            }
        }
    }
}
