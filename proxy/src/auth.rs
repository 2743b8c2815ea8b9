//! What the gateway keeps for the auth bridge beyond one request: with
//! several nodes, the provider logouts Redis remembers. (The request
//! path's auth step, token checks and back-channel logout, is
//! `gateway/auth.rs`; the validator itself is the `ratatosk-auth` crate.)

use std::time::Duration;

use crate::session::RedisLink;
use ratatosk_auth::logout::LogoutEvent;
use redis::Script;

use crate::session::redis::{NOW, RedisStoreError};

/// Provider logouts kept in Redis for as long as a token they refuse may
/// live, so that a node that was off the bus when one came (starting, or
/// cut off from Redis) refuses those tokens too once it is back.
pub struct LogoutMemory {
    conn: RedisLink,
    /// A sorted set: logout JSON by expiry.
    key: String,
    remember: Script,
    recall: Script,
}

impl LogoutMemory {
    /// The memory under `{prefix}logouts`, on `conn`: the session store's
    /// connection ([`crate::session::RedisSessionStore::connection`]).
    pub fn new(conn: RedisLink, prefix: &str) -> LogoutMemory {
        LogoutMemory {
            conn,
            key: format!("{prefix}logouts"),
            remember: Script::new(&format!("{NOW}{REMEMBER}")),
            recall: Script::new(&format!("{NOW}{RECALL}")),
        }
    }

    /// Keeps `event` for `keep`.
    pub async fn remember(
        &self,
        event: &LogoutEvent,
        keep: Duration,
    ) -> Result<(), RedisStoreError> {
        let json = serde_json::to_string(event).unwrap_or_default();
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .remember
            .key(&self.key)
            .arg(json)
            .arg(keep_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The logouts kept and not expired.
    pub async fn recall(&self) -> Result<Vec<LogoutEvent>, RedisStoreError> {
        let mut conn = self.conn.clone();
        let kept: Vec<String> = self.recall.key(&self.key).invoke_async(&mut conn).await?;
        Ok(kept
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }
}

/// KEYS: the logouts (a sorted set by expiry). ARGV: logout JSON, keep ms.
const REMEMBER: &str = "
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
";

/// KEYS: the logouts. -> the JSON of those not expired.
const RECALL: &str = "
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::redis::connection;
    use crate::testing::{RedisServer, eventually};

    fn memory(url: &str, prefix: &str) -> LogoutMemory {
        LogoutMemory::new(connection(url).expect("connection"), prefix)
    }

    #[tokio::test]
    async fn logouts_are_kept_for_as_long_as_asked() {
        let redis = RedisServer::start().await;
        let (a, b) = (memory(&redis.url(), "t:"), memory(&redis.url(), "t:"));
        let logout = |sub: &str| LogoutEvent {
            sid: None,
            sub: Some(sub.into()),
            issued_at: None,
        };
        a.remember(&logout("alice"), Duration::from_secs(60))
            .await
            .expect("remember");
        a.remember(&logout("bob"), Duration::from_millis(1))
            .await
            .expect("remember");
        let only_alice = || async { b.recall().await.expect("recall") == [logout("alice")] };
        assert!(
            eventually(Duration::from_secs(5), only_alice).await,
            "logouts kept: {:?}",
            b.recall().await
        );
        // Another prefix is another memory.
        let other = memory(&redis.url(), "u:");
        assert_eq!(other.recall().await.expect("recall"), []);
    }
}
