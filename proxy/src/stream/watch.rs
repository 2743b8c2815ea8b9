//! Watches on a session's responses: something waiting for the response
//! to one request of the session sees it before it is logged (or written
//! as a JSON answer), and may replace it. A server endpoint's policy
//! filters a list this way, and the audit takes a call's outcome; since
//! the log holds what the watch made of it, a resumed stream replays the
//! same.
//!
//! A watch that never sees its response (the request was cancelled, the
//! session ended, or the log holds too many) is dropped, and its `Drop`
//! says so.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::jsonrpc::{self, Id, Kind};

/// Watches one log keeps at most; a new one drops the oldest.
pub const MAX_WATCHES: usize = 256;

/// What waits for the response to one request.
pub trait Watcher: Send {
    /// The response arrived: what the client is to see instead, if not
    /// the response as it is.
    fn answered(self: Box<Self>, response: &[u8]) -> Option<Bytes>;

    /// The request went to the upstream replica named `replica` (told
    /// before its response, once per upstream answer).
    fn served_by(&mut self, _replica: &str) {}
}

/// One log's watches, by the id of the request each waits on.
#[derive(Default)]
pub struct Watches {
    /// Few at a time: a session's requests in flight.
    list: Mutex<Vec<(Id, Box<dyn Watcher>)>>,
    /// `list.len()`, read without the lock by every message logged.
    count: AtomicUsize,
}

impl Watches {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Id, Box<dyn Watcher>)>> {
        // Every mutation is one push or remove: a panic cannot leave the
        // list half-changed.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the response to request `id`, in place of a watch on the
    /// same id before it.
    pub fn watch(&self, id: Id, watcher: Box<dyn Watcher>) {
        let dropped = {
            let mut list = self.lock();
            let mut dropped = Vec::new();
            if let Some(i) = list.iter().position(|(w, _)| *w == id) {
                dropped.push(list.remove(i).1);
            }
            if list.len() >= MAX_WATCHES {
                dropped.push(list.remove(0).1);
            }
            list.push((id, watcher));
            self.count.store(list.len(), Ordering::Release);
            dropped
        };
        // Their `Drop` runs outside the lock.
        drop(dropped);
    }

    /// Whether no watch is waiting.
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Stops waiting on request `id` (it was cancelled).
    pub fn unwatch(&self, id: &Id) {
        let removed = self.take(id);
        drop(removed);
    }

    fn take(&self, id: &Id) -> Option<Box<dyn Watcher>> {
        let mut list = self.lock();
        let i = list.iter().position(|(w, _)| w == id)?;
        let (_, watcher) = list.remove(i);
        self.count.store(list.len(), Ordering::Release);
        Some(watcher)
    }

    /// Request `id` (none for a notification) went to the replica named
    /// `replica`: its watch, if any, is told.
    pub fn served(&self, id: Option<&Id>, replica: &str) {
        let Some(id) = id.filter(|_| !self.is_empty()) else {
            return;
        };
        if let Some((_, watcher)) = self.lock().iter_mut().find(|(w, _)| w == id) {
            watcher.served_by(replica);
        }
    }

    /// `message`, as the client is to see it: `Some` when it is the
    /// response to a watched request whose watch replaces it. The watch
    /// ends either way.
    pub fn answered(&self, message: &[u8]) -> Option<Bytes> {
        if self.is_empty() {
            return None;
        }
        let Ok(Kind::Response { id }) = jsonrpc::kind_of(message) else {
            return None;
        };
        self.take(&id)?.answered(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Counts what it saw; replaces the response with `"seen"`.
    struct Seen(Arc<AtomicUsize>, Arc<AtomicUsize>);

    impl Watcher for Seen {
        fn answered(self: Box<Self>, _: &[u8]) -> Option<Bytes> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Some(Bytes::from_static(b"seen"))
        }
    }

    impl Drop for Seen {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn id(n: i64) -> Id {
        Id::from_value(&serde_json::json!(n)).expect("an id")
    }

    #[test]
    fn a_watch_sees_its_response_once_and_nothing_else() {
        let (seen, dropped) = (Arc::default(), Arc::default());
        let w = Watches::default();
        assert_eq!(w.answered(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#), None);
        w.watch(
            id(1),
            Box::new(Seen(Arc::clone(&seen), Arc::clone(&dropped))),
        );
        // Not its response: a notification, a request, another id.
        assert_eq!(w.answered(br#"{"jsonrpc":"2.0","method":"x"}"#), None);
        assert_eq!(
            w.answered(br#"{"jsonrpc":"2.0","id":1,"method":"x"}"#),
            None
        );
        assert_eq!(w.answered(br#"{"jsonrpc":"2.0","id":2,"result":{}}"#), None);
        let out = w.answered(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#);
        assert_eq!(out.as_deref(), Some(&b"seen"[..]));
        assert_eq!(w.answered(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#), None);
        assert_eq!(
            (
                seen.load(Ordering::Relaxed),
                dropped.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
    }

    #[test]
    fn unwatched_replaced_and_excess_watches_are_dropped() {
        let (seen, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let w = Watches::default();
        let watcher = || Box::new(Seen(Arc::clone(&seen), Arc::clone(&dropped)));
        w.watch(id(1), watcher());
        w.watch(id(1), watcher());
        assert_eq!(dropped.load(Ordering::Relaxed), 1, "a reused id replaces");
        w.unwatch(&id(1));
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        for n in 0..=MAX_WATCHES as i64 {
            w.watch(id(n), watcher());
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 3, "the oldest goes");
        assert_eq!(w.answered(br#"{"jsonrpc":"2.0","id":0,"result":{}}"#), None);
        assert_eq!(seen.load(Ordering::Relaxed), 0);
    }
}
