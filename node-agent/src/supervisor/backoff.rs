//! Kubelet-style crash-loop backoff.

use std::time::Duration;

/// Restart delays: `initial`, doubling up to `max`, forgotten after a run of `reset_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first restart. Default 10 s.
    pub initial: Duration,
    /// Largest delay. Default 5 min.
    pub max: Duration,
    /// A run at least this long resets the delay to `initial`. Default 10 min.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// The backoff state of one sandbox.
#[derive(Clone, Copy, Debug, Default)]
pub struct Backoff {
    /// Restarts since the last reset.
    streak: u32,
}

impl Backoff {
    /// The delay before the next restart, given how long the last run lasted.
    pub fn next_delay(&mut self, config: &BackoffConfig, last_run: Duration) -> Duration {
        if last_run >= config.reset_after {
            self.streak = 0;
        }
        let factor = 1u32.checked_shl(self.streak.min(31)).unwrap_or(u32::MAX);
        self.streak = self.streak.saturating_add(1);
        config.initial.saturating_mul(factor).min(config.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_ten_seconds_to_five_minutes() {
        let config = BackoffConfig::default();
        let mut backoff = Backoff::default();
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.next_delay(&config, short).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_long_run_resets_the_streak() {
        let config = BackoffConfig::default();
        let mut backoff = Backoff::default();
        for _ in 0..4 {
            backoff.next_delay(&config, Duration::ZERO);
        }
        assert_eq!(
            backoff.next_delay(&config, Duration::from_secs(600)),
            Duration::from_secs(10)
        );
        assert_eq!(
            backoff.next_delay(&config, Duration::from_secs(599)),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn huge_streaks_do_not_overflow() {
        let config = BackoffConfig::default();
        let mut backoff = Backoff { streak: u32::MAX };
        assert_eq!(backoff.next_delay(&config, Duration::ZERO), config.max);
    }
}
