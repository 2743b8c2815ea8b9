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

/// What the era bridge keeps between requests, each part in its owner.
/// All of it is per gateway session (or per caller), and per the session's
/// upstream server.
pub(in crate::gateway) struct Bridges {
    /// Background upstream streams (listens of modern upstreams, GET
    /// streams of stateful ones) this node holds, by session.
    pub(in crate::gateway) listeners: background::Listeners,
    /// One re-initialization at a time per session, when a stateful
    /// upstream lost the session's upstream session.
    pub(in crate::gateway) rebinding: stateful::Rebinds,
    /// Hidden sessions of 2026-07-28 clients with a stateful upstream.
    pub(in crate::gateway) hidden: hidden::HiddenSessions,
    /// Upstream calls waiting for a 2026-07-28 client's input.
    pub(in crate::gateway) parked: hidden::ParkedCalls,
    /// The `x-mcp-header` parameters of upstream tools, per (org, caller).
    pub(in crate::gateway) tool_headers: params::ToolHeaders,
    /// Resource URIs hidden sessions' upstreams refused to subscribe to.
    pub(in crate::gateway) refused_subscriptions: listen::Refused,
}

impl Bridges {
    pub(in crate::gateway) fn new() -> Bridges {
        Bridges {
            listeners: Default::default(),
            rebinding: Default::default(),
            hidden: Default::default(),
            parked: Default::default(),
            tool_headers: params::ToolHeaders::new(),
            refused_subscriptions: Default::default(),
        }
    }
}
