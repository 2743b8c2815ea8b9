//! Bounds on calls to the identity provider for tokens not in the cache:
//! at most `max_concurrent` at once and `per_second` on average (with a
//! burst of one second's worth). A call that cannot start within
//! `max_wait` is refused, so distinct junk tokens cost the provider a
//! bounded number of calls however many arrive, and a caller waits a
//! bounded time.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
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
    /// One call per `1/per_second` on average, `per_second` at once after
    /// a quiet second (GCRA).
    pace: DefaultDirectRateLimiter,
    clock: DefaultClock,
    max_wait: Duration,
}

impl Throttle {
    pub fn new(limits: &LaneLimits, max_wait: Duration) -> Throttle {
        let per_second = NonZeroU32::new(limits.per_second).unwrap_or(NonZeroU32::MIN);
        Throttle {
            slots: Semaphore::new(limits.max_concurrent.max(1)),
            pace: DefaultDirectRateLimiter::direct(Quota::per_second(per_second)),
            clock: DefaultClock::default(),
            max_wait,
        }
    }

    /// Waits for the pace and a free slot, within `max_wait` in all. The
    /// call runs while the permit lives.
    pub async fn admit(&self) -> Result<SemaphorePermit<'_>, Refused> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        while let Err(not_until) = self.pace.check() {
            let ready = tokio::time::Instant::now() + not_until.wait_time_from(self.clock.now());
            if ready > deadline {
                return Err(Refused::Rate);
            }
            tokio::time::sleep_until(ready).await;
        }
        match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => Err(Refused::Concurrency),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn throttle(per_second: u32, max_wait: Duration) -> Throttle {
        Throttle::new(
            &LaneLimits {
                max_concurrent: 1000,
                per_second,
            },
            max_wait,
        )
    }

    #[tokio::test]
    async fn the_pace_allows_a_burst_then_refuses_what_cannot_wait() {
        let t = throttle(10, Duration::ZERO);
        for i in 0..10 {
            assert!(t.admit().await.is_ok(), "call {i} of the burst");
        }
        assert_eq!(t.admit().await.err(), Some(Refused::Rate));
        // A caller that may wait gets the next slot of the pace.
        let patient = throttle(10, Duration::from_millis(500));
        for _ in 0..10 {
            drop(patient.admit().await.expect("burst"));
        }
        let started = std::time::Instant::now();
        drop(patient.admit().await.expect("after a wait"));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_millis(500), "{waited:?}");
    }

    #[tokio::test]
    async fn over_a_window_the_pace_admits_at_most_rate_times_window_plus_burst() {
        let t = throttle(50, Duration::ZERO);
        let started = std::time::Instant::now();
        let mut admitted = 0;
        while started.elapsed() < Duration::from_millis(1000) {
            if t.admit().await.is_ok() {
                admitted += 1;
            }
            tokio::task::yield_now().await;
        }
        let window = started.elapsed().as_secs_f64();
        // The burst of 50, then 50 a second.
        assert!(
            admitted as f64 <= 50.0 + 50.0 * window + 1.0,
            "{admitted} in {window} s"
        );
        assert!(admitted >= 50, "{admitted}");
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
        let started = std::time::Instant::now();
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
