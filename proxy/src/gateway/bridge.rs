//! The era bridge (ARCHITECTURE.md, "Era bridge"): what the gateway does
//! when a client and the org's upstream speak different MCP eras, or when
//! an upstream needs more than a request passed through. A request's era
//! is decided where it enters: 2026-07-28 requests in [`modern`], others in
//! `streamable.rs` and `legacy.rs`, from the request and the upstream's
//! era ([`crate::upstream::UpstreamEra`]). The pure message translations
//! are in [`crate::era`]; the code here drives them with the gateway's
//! state (sessions, logs, in-flight requests).
//!
//! It lives inside `gateway` because it is the gateway's request path: a
//! top-level module would import `gateway` and be imported by it.

use super::*;

/// Background upstream streams: listens and GET streams, with leases.
pub(in crate::gateway) mod background;
/// 2026-07-28 clients of a stateful upstream: hidden sessions, parked calls.
pub(in crate::gateway) mod hidden;
/// `subscriptions/listen` of 2026-07-28 clients of a stateful upstream.
pub(in crate::gateway) mod listen;
/// 2026-07-28 clients, and handshake-era clients of a modern upstream.
pub(in crate::gateway) mod modern;
/// Stateful upstreams: their sessions, re-binding, their GET streams.
pub(in crate::gateway) mod stateful;
