//! `ratatosk-auth serve --config FILE`: the auth bridge as a forward-auth
//! service for nginx `auth_request`, Traefik `ForwardAuth` and Envoy
//! `ext_authz`. `ratatosk-auth check --config FILE` validates the file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ratatosk_auth::forward::{ForwardAuth, ForwardConfig};

#[derive(Parser)]
#[command(
    name = "ratatosk-auth",
    version,
    about = "Token checks for other proxies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve checks.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn load(path: &Path) -> Result<ForwardConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    let text = expand_env(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let config: ForwardConfig =
        serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(&text))
            .map_err(|e| format!("{}: at `{}`: {}", path.display(), e.path(), e.inner()))?;
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(format!("{}: {}", path.display(), problems.join("\n  ")))
    }
}

/// `${NAME}` and `${NAME:-default}` from the environment.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let body = &rest[i + 2..];
        let end = body.find('}').ok_or("unclosed `${`")?;
        let inner = &body[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (std::env::var(name).ok(), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                println!("{}: ok ({} orgs)", config.display(), c.orgs.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("RATATOSK_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_target(false)
                .init();
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ratatosk-auth: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                let service = ForwardAuth::new(config).map_err(|e| e.to_string())?;
                service.serve().await.map_err(|e| e.to_string())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ratatosk-auth: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
