//! Ratatosk: an MCP gateway on Pingora.
//!
//! One module per box of the request path (see ARCHITECTURE.md): `edge`,
//! `routes`, `session`, `stream`, `bridge`, `upstream`, `admin`, `config`,
//! `metrics`. [`gateway::Gateway`] strings them together without sockets;
//! `server` is the thin Pingora glue.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod config;
pub mod edge;
pub mod era;
pub mod federation;
pub mod gateway;
pub mod holds;
pub mod jsonrpc;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub use ratatosk_auth::policy;
pub mod routes;
pub mod server;
pub mod session;
pub mod stream;
pub mod telemetry;
pub mod upstream;

#[cfg(test)]
mod testing;
