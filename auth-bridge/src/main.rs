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
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{file}: cannot read the config file: {e}"))?;
    let mut tree: yaml_serde::Value =
        yaml_serde::from_str(&text).map_err(|e| format!("{file}: not valid YAML: {e}"))?;
    let problems = ratatosk_auth::env::expand_env(&mut tree, &|name| std::env::var(name).ok());
    if !problems.is_empty() {
        let listed: Vec<String> = problems
            .iter()
            .map(|(at, why)| format!("at `{at}`: {why}"))
            .collect();
        return Err(format!("{file}: {}", listed.join("\n  ")));
    }
    let config: ForwardConfig = serde_path_to_error::deserialize(tree)
        .map_err(|e| format!("{file}: at `{}`: {}", e.path(), e.inner()))?;
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(format!("{file}: {}", problems.join("\n  ")))
    }
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
