//! The per-request context: which org route a request reached, who sent
//! it, its headers and its request id. `route` builds one [`Call`] per
//! request; every step that acts for the caller takes it, in place of the
//! long (org, identity, headers, request id) argument lists. When an org
//! has several servers, the server a request reaches joins it here.

use std::sync::Arc;

use http::HeaderMap;
use ratatosk_auth::Identity;

use crate::edge::Request;
use crate::routes::OrgRoute;
use crate::session::SessionState;
use crate::upstream::{Forwarding, Outbound, upstream_headers};

/// One client request on the request path, borrowed from it.
#[derive(Clone, Copy)]
pub(super) struct Call<'a> {
    pub(super) org: &'a Arc<OrgRoute>,
    /// The caller, as the auth bridge established it.
    pub(super) identity: &'a Arc<Identity>,
    /// The client's headers (a few are passed on: see [`upstream_headers`]).
    pub(super) headers: &'a HeaderMap,
    /// For logs, and the upstream's `X-Request-Id`.
    pub(super) request_id: &'a str,
    /// Whether a client sent it, as opposed to a federated session to one
    /// of its servers: the server's policy and the audit apply then (the
    /// federated endpoint did both for its own), and the framing of what
    /// the gateway made itself is not checked again.
    pub(super) client: bool,
}

impl<'a> Call<'a> {
    pub(super) fn new(
        org: &'a Arc<OrgRoute>,
        identity: &'a Arc<Identity>,
        req: &'a Request,
    ) -> Self {
        Call {
            org,
            identity,
            headers: &req.headers,
            request_id: &req.request_id,
            client: true,
        }
    }

    /// A header of the request, if it is text.
    pub(super) fn header(&self, name: &http::HeaderName) -> Option<&'a str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Headers of a message to the upstream for this caller, under
    /// `session_id` (a gateway session, a call id, or none: empty);
    /// `protocol_version` is `None` for `initialize`, which negotiates it.
    pub(super) fn upstream_headers(
        &self,
        session_id: &str,
        protocol_version: Option<&str>,
    ) -> Outbound {
        upstream_headers(
            &Forwarding {
                session_id,
                org: &self.org.name,
                identity: self.identity,
                protocol_version,
                request_id: self.request_id,
            },
            self.headers,
        )
    }

    /// Headers of a message of `session` to the upstream, for this caller.
    pub(super) fn session_headers(&self, session: &SessionState) -> Outbound {
        let version = if session.protocol_version.is_empty() {
            // A legacy session before its initialize.
            "2024-11-05"
        } else {
            session.protocol_version.as_str()
        };
        self.upstream_headers(&session.id, Some(version))
    }

    /// A copy that outlives the request, for work the request leaves
    /// running (the messages of a legacy POST, answered after its 202).
    pub(super) fn detach(&self) -> Detached {
        Detached {
            org: self.org.clone(),
            identity: self.identity.clone(),
            headers: self.headers.clone(),
            request_id: self.request_id.to_owned(),
            client: self.client,
        }
    }
}

/// An owned [`Call`], for a task that outlives its request.
pub(super) struct Detached {
    org: Arc<OrgRoute>,
    identity: Arc<Identity>,
    headers: HeaderMap,
    request_id: String,
    client: bool,
}

impl Detached {
    pub(super) fn call(&self) -> Call<'_> {
        Call {
            org: &self.org,
            identity: &self.identity,
            headers: &self.headers,
            request_id: &self.request_id,
            client: self.client,
        }
    }
}
