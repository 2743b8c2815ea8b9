//! Rate limits at every endpoint of an org (see [`crate::ratelimit`]):
//! each request a client sends is charged before anything else is done
//! with it, and a refusal is 429 with `Retry-After` and a JSON-RPC error
//! that names the limit.

use super::*;
use crate::policy::Kind as Item;
use crate::ratelimit::{Ask, Limited};
use crate::routes::Federation;

impl Gateway {
    /// Charges each request of a client's `body` at a server's endpoint.
    /// A federated session's own requests are not charged: the federated
    /// endpoint charged the client's.
    pub(super) async fn rate_limit_server(
        &self,
        call: Call<'_>,
        body: &Body,
    ) -> Result<(), Reject> {
        let org = call.org;
        if !call.client {
            return Ok(());
        }
        let by_tool = org.rates.by_tool();
        self.charge_requests(org, call.identity, body, |method, m| {
            // Tools as the policy shows them: with the server's prefix.
            let tool = (by_tool && method == "tools/call")
                .then(|| jsonrpc::param_name(&m.raw))
                .flatten()
                .map(|(own, _)| org.policy.shown(Item::Tool, &own));
            (org.server_name.clone(), tool)
        })
        .await
    }

    /// The same at an org's federated endpoint: a call is charged to the
    /// server its name routes to.
    pub(super) async fn rate_limit_federated(
        &self,
        fed: &Federation,
        identity: &Identity,
        body: &Body,
    ) -> Result<(), Reject> {
        let by_name = fed.rates.by_name();
        self.charge_requests(fed, identity, body, |method, m| {
            let Some((name, _)) = (by_name && matches!(method, "tools/call" | "prompts/get"))
                .then(|| jsonrpc::param_name(&m.raw))
                .flatten()
            else {
                return (None, None);
            };
            let server = fed
                .naming
                .route(&name)
                .map(|(i, _)| fed.members[i].name.clone());
            (server, (method == "tools/call").then_some(name))
        })
        .await
    }

    /// Charges each request of `body` to `front`'s limits, with the server
    /// and tool `target` finds for it; the first refusal refuses them all.
    async fn charge_requests(
        &self,
        front: &Front,
        identity: &Identity,
        body: &Body,
        target: impl Fn(&str, &Message) -> (Option<Arc<str>>, Option<String>),
    ) -> Result<(), Reject> {
        if front.rates.is_empty() || self.too_large(body) {
            return Ok(());
        }
        for m in body.messages() {
            let (Some(method), true) = (m.method(), m.is_request()) else {
                continue;
            };
            let (server, tool) = target(method, m);
            let ask = Ask {
                method,
                server: server.as_deref(),
                tool: tool.as_deref(),
                identity,
            };
            self.rate_limit(front, ask, m.request_id()).await?;
        }
        Ok(())
    }

    /// A batch over `limits.max_batch` is refused whole right after (by
    /// `check_batch`), and is not charged.
    fn too_large(&self, body: &Body) -> bool {
        body.messages().len() > self.live().config.limits.max_batch
    }

    /// Forgets, on this node, the callers whose rate-limit budgets are
    /// full again (a periodic chore).
    pub fn forget_full_budgets(&self) {
        let live = self.live_full();
        // An org's routes share its limits: each is tidied once.
        let mut done: Vec<&Arc<crate::ratelimit::RateLimits>> = Vec::new();
        for org in live.routes.orgs() {
            if !done.iter().any(|r| Arc::ptr_eq(r, &org.rates)) {
                org.rates.retain_recent();
                done.push(&org.rates);
            }
        }
    }

    /// Charges one request to `front`'s limits: on this node, or in Redis
    /// with several.
    async fn rate_limit(&self, front: &Front, ask: Ask<'_>, id: Option<&Id>) -> Result<(), Reject> {
        let decided = match &self.rates {
            None => front.rates.check_local(&ask),
            Some(shared) => front.rates.check_shared(&ask, shared).await,
        };
        decided.map_err(|limited| {
            tracing::debug!(org = %front.name, subject = %ask.identity.subject, limit = %limited.limit, method = ask.method, "rate limited");
            rate_limited(front, &limited).with_id(id)
        })
    }
}

/// 429, with `Retry-After` in whole seconds (at least 1) and the exact
/// wait in the error's data.
fn rate_limited(front: &Front, limited: &Limited) -> Reject {
    let wait = limited.retry_after;
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let retry_after = HeaderValue::from(seconds.max(1));
    Reject::new(
        StatusCode::TOO_MANY_REQUESTS,
        code::RATE_LIMITED,
        format!(
            "rate limit '{}' of org '{}' reached ({}); retry in {:.2} s",
            limited.limit,
            front.name,
            limited.terms,
            wait.as_secs_f64()
        ),
    )
    .with_header(http::header::RETRY_AFTER, retry_after)
    .with_data(json!({
        "limit": &*limited.limit,
        "retry_after_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
    }))
}
