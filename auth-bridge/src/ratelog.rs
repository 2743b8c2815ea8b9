//! Log lines a client can cause at will (a refused logout token, a refused
//! connection, a throttled token check): at most one per period at warn,
//! carrying how many were left out since, so a flood of bad requests cannot
//! flood the log too. The metrics count every one of them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct LogEvery {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogEvery {
    pub const fn new(period: Duration) -> LogEvery {
        LogEvery {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being the events left
    /// out since the last one logged; `None` when it should be left out.
    pub fn ready(&self) -> Option<u64> {
        self.ready_at(Instant::now())
    }

    fn ready_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.period) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for LogEvery {
    fn default() -> Self {
        LogEvery::new(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let log = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.ready_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.ready_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.ready_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(log.ready_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.ready_at(t0 + Duration::from_secs(21)), Some(1));
    }
}
