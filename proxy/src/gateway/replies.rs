//! The gateway's own requests to clients (input requests of a modern
//! upstream, a worker's requests through a hold), waiting for the client's
//! answers; and the unique ids the gateway mints.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::jsonrpc::{Id, Kind, Message};

/// How the ids of the gateway's own requests to a client start (then the
/// node's tag and a counter, so nodes never mint the same one).
const INPUT_REQUEST_PREFIX: &str = "ratatosk-input-";

/// The node that sent the gateway's request a client's response answers;
/// `None` if the id is not one of the gateway's.
pub(super) fn gateway_request_node(id: &Id) -> Option<u32> {
    let (node, _) = id
        .as_json()
        .strip_prefix('"')?
        .strip_prefix(INPUT_REQUEST_PREFIX)?
        .split_once('-')?;
    node.parse().ok()
}

/// The requests waiting, by (session, the gateway's id).
pub(super) struct Replies {
    waiting: DashMap<(String, Id), oneshot::Sender<Value>>,
    next: AtomicU64,
    node: u32,
}

impl Replies {
    pub(super) fn new(node: u32) -> Replies {
        Replies {
            waiting: DashMap::new(),
            next: AtomicU64::new(1),
            node,
        }
    }

    /// A number no other call on this node gets: with the node's tag, ids
    /// the gateway mints are unique across nodes.
    pub(super) fn unique(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The waits of one exchange, forgotten when it ends.
    pub(super) fn pending(&self) -> PendingReplies<'_> {
        PendingReplies {
            replies: self,
            keys: Vec::new(),
        }
    }

    /// Hands a client's response to the request waiting for it. False if
    /// nothing waits for that id.
    pub(super) fn take(&self, session: &str, message: &Message) -> bool {
        let Kind::Response { id } = &message.kind else {
            return false;
        };
        let Some((_, tx)) = self.waiting.remove(&(session.to_owned(), id.clone())) else {
            return false;
        };
        match serde_json::from_slice::<Value>(&message.raw) {
            Ok(v) => {
                let _ = tx.send(v);
            }
            Err(_) => drop(tx),
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// The waits of one exchange (a round of input requests, a hold): removed
/// when it ends, however it ends.
pub(super) struct PendingReplies<'a> {
    replies: &'a Replies,
    keys: Vec<(String, Id)>,
}

impl PendingReplies<'_> {
    /// A new id for the gateway's own request to the client of `session`
    /// (unique across nodes), and where the client's answer will arrive.
    pub(super) fn await_reply(&mut self, session: &str) -> Option<(Id, oneshot::Receiver<Value>)> {
        let n = self.replies.unique();
        let rid = Id::from_value(&Value::from(format!(
            "{INPUT_REQUEST_PREFIX}{}-{n}",
            self.replies.node
        )))?;
        let (tx, rx) = oneshot::channel();
        let entry = (session.to_owned(), rid.clone());
        self.replies.waiting.insert(entry.clone(), tx);
        self.keys.push(entry);
        Some((rid, rx))
    }

    /// Forgets one wait that ended (answered, or timed out).
    pub(super) fn forget(&mut self, session: &str, id: &Id) {
        if let Some(at) = self.keys.iter().position(|(s, k)| s == session && k == id) {
            let key = self.keys.swap_remove(at);
            self.replies.waiting.remove(&key);
        }
    }
}

impl Drop for PendingReplies<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.replies.waiting.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gateway_request_ids_name_their_node() {
        let id = |v: Value| Id::from_value(&v).expect("id");
        assert_eq!(
            gateway_request_node(&id(json!("ratatosk-input-4242-7"))),
            Some(4242)
        );
        for other in [
            json!("ratatosk-input-x-7"),
            json!("ratatosk-input-"),
            json!("something-else"),
            json!(7),
        ] {
            assert_eq!(gateway_request_node(&id(other.clone())), None, "{other}");
        }
    }

    #[tokio::test]
    async fn an_answer_reaches_its_wait_and_an_ended_exchange_leaves_nothing() {
        let replies = Replies::new(42);
        let mut pending = replies.pending();
        let (rid, rx) = pending.await_reply("s1").expect("an id");
        assert_eq!(gateway_request_node(&rid), Some(42));
        let (other, _rx2) = pending.await_reply("s1").expect("an id");
        assert_ne!(rid, other);
        let answer = |session: &str, id: &Id| {
            let raw =
                json!({"jsonrpc": "2.0", "id": id.to_value(), "result": {"ok": true}}).to_string();
            let message =
                crate::jsonrpc::parse_message(&bytes::Bytes::from(raw)).expect("a response");
            replies.take(session, &message)
        };
        // Another session's answer with the same id reaches nothing.
        assert!(!answer("s2", &rid));
        assert!(answer("s1", &rid));
        assert_eq!(rx.await.expect("answered")["result"]["ok"], true);
        assert!(!answer("s1", &rid), "taken once");
        pending.forget("s1", &other);
        assert_eq!(replies.len(), 0);
        let _third = pending.await_reply("s1").expect("an id");
        assert_eq!(replies.len(), 1);
        drop(pending);
        assert_eq!(replies.len(), 0, "the exchange ended: its waits go");
    }
}
