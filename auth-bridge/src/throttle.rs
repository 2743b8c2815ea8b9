//! Bounds on calls to the identity provider for tokens not in the cache:
//! at most `max_concurrent` at once and `per_second` on average (with a
//! burst of one second's worth). A call that cannot start within
//! `max_wait` is refused, so distinct junk tokens cost the provider a
//! bounded number of calls however many arrive, and a caller waits a
//! bounded time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::LaneLimits;

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The rate was spent for longer than the caller may wait.
    Rate,
    /// Every slot stayed taken for longer than the caller may wait.
    Concurrency,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Rate => "rate",
            Refused::Concurrency => "concurrency",
        }
    }
}

pub struct Throttle {
    slots: Semaphore,
    pace: Mutex<Pace>,
    max_wait: Duration,
}

impl Throttle {
    pub fn new(limits: &LaneLimits, max_wait: Duration) -> Throttle {
        Throttle {
            slots: Semaphore::new(limits.max_concurrent.max(1)),
            pace: Mutex::new(Pace::new(limits.per_second)),
            max_wait,
        }
    }

    /// Waits for the pace and a free slot, within `max_wait` in all. The
    /// call runs while the permit lives.
    pub async fn admit(&self) -> Result<SemaphorePermit<'_>, Refused> {
        let now = Instant::now();
        let deadline = now + self.max_wait;
        let start = self
            .pace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(now, self.max_wait)
            .ok_or(Refused::Rate)?;
        tokio::time::sleep_until(start.into()).await;
        match tokio::time::timeout_at(deadline.into(), self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => Err(Refused::Concurrency),
        }
    }
}

/// The generic cell rate algorithm: one call per `interval` on average,
/// `burst` calls at once after a quiet second. A reservation is a start
/// time; a caller that would have to wait too long takes none.
struct Pace {
    interval: Duration,
    /// How far ahead of the theoretical arrival time a call may start.
    tolerance: Duration,
    /// When the next call would start if calls came exactly on pace.
    theoretical: Option<Instant>,
}

impl Pace {
    fn new(per_second: u32) -> Pace {
        let per_second = per_second.max(1);
        let interval = Duration::from_secs(1) / per_second;
        Pace {
            interval,
            tolerance: interval * (per_second - 1),
            theoretical: None,
        }
    }

    /// The time a call arriving `now` may start, if that is within
    /// `max_wait`; the reservation is taken only then.
    fn reserve(&mut self, now: Instant, max_wait: Duration) -> Option<Instant> {
        let theoretical = self.theoretical.map_or(now, |t| t.max(now));
        let start = theoretical
            .checked_sub(self.tolerance)
            .map_or(now, |s| s.max(now));
        if start.saturating_duration_since(now) > max_wait {
            return None;
        }
        self.theoretical = Some(theoretical + self.interval);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_pace_allows_a_burst_then_one_per_interval() {
        let mut pace = Pace::new(10);
        let t0 = Instant::now();
        let wait = Duration::from_millis(500);
        let starts: Vec<_> = (0..20).map(|_| pace.reserve(t0, wait)).collect();
        // A second's worth at once, then five more queued within max_wait.
        assert!(starts[..10].iter().all(|s| *s == Some(t0)), "{starts:?}");
        for (i, s) in starts[10..15].iter().enumerate() {
            assert_eq!(*s, Some(t0 + Duration::from_millis(100) * (i as u32 + 1)));
        }
        assert!(starts[15..].iter().all(Option::is_none), "{starts:?}");
        // Refusals take no reservation: a second later, ten more fit.
        let later = t0 + Duration::from_secs(1);
        let admitted = (0..30).filter_map(|_| pace.reserve(later, wait)).count();
        assert_eq!(admitted, 10, "5 at once, 5 queued");
    }

    #[test]
    fn over_any_window_the_pace_admits_at_most_rate_times_window_plus_burst() {
        let mut pace = Pace::new(20);
        let t0 = Instant::now();
        let mut admitted = 0;
        // Ten callers every 10 ms for 3 s: far more than 20 per second.
        for step in 0..300u32 {
            let now = t0 + Duration::from_millis(10) * step;
            admitted += (0..10)
                .filter(|_| pace.reserve(now, Duration::from_secs(1)).is_some())
                .count();
        }
        // Burst 20, 20/s over 3 s, plus the queue of one second (20).
        assert!(admitted <= 20 + 60 + 20, "{admitted}");
        assert!(admitted >= 60, "{admitted}");
    }

    #[tokio::test]
    async fn at_most_max_concurrent_run_and_the_rest_give_up_after_max_wait() {
        let throttle = Arc::new(Throttle::new(
            &LaneLimits {
                max_concurrent: 3,
                per_second: 1000,
            },
            Duration::from_millis(300),
        ));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (throttle, running, most) = (throttle.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    let permit = throttle.admit().await?;
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Longer than max_wait: nobody queued gets a slot.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                    Ok::<(), Refused>(())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("joined"));
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 3);
        assert!(
            outcomes
                .iter()
                .all(|o| o.is_ok() || *o == Err(Refused::Concurrency)),
            "{outcomes:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
