//! The coordinator's tunables, with documented defaults.

use std::time::Duration;

/// Timing settings of a [`SingleFlight`](crate::SingleFlight).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlightConfig {
    /// A token this close to its expiry counts as expired (clock-skew allowance, C7).
    /// Default: 30 s.
    pub leeway: Duration,
    /// Inside this window before expiry (and outside `leeway`) the still-valid token is
    /// used while one refresh runs ahead (C8). `None` disables it. Default: 2 min.
    pub refresh_ahead: Option<Duration>,
    /// Bound on each refresh attempt's lock wait and source call (C10). Default: 30 s.
    pub refresh_timeout: Duration,
    /// Backoff after transient failures (C9).
    pub backoff: Backoff,
}

impl Default for FlightConfig {
    fn default() -> Self {
        FlightConfig {
            leeway: Duration::from_secs(30),
            refresh_ahead: Some(Duration::from_secs(120)),
            refresh_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
        }
    }
}

/// Capped exponential backoff with jitter after transient refresh failures (C9).
///
/// After the n-th consecutive failure, refreshes are refused for
/// `min(max, initial * 2^(n-1))`, scaled by a random factor in `[1 - jitter, 1]`, and
/// never less than a server's `Retry-After`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay after the first failure. Default: 500 ms.
    pub initial: Duration,
    /// Cap on the delay. Default: 60 s.
    pub max: Duration,
    /// Fraction of the delay that is randomised, 0.0..=1.0. Default: 0.5.
    pub jitter: f64,
}

impl Eq for Backoff {}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// A backoff with the given first delay and cap, and the default jitter.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ..Backoff::default()
        }
    }

    /// No backoff: every caller that needs a refresh may try again at once.
    pub fn none() -> Self {
        Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
        }
    }

    /// Sets the jitter fraction (clamped to 0.0..=1.0).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// The delay after `failures` consecutive failures, before jitter.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << exponent).min(self.max)
    }

    /// The delay after `failures` consecutive failures, with jitter drawn from `unit`
    /// (a random number in 0.0..1.0) and at least `retry_after`.
    pub fn delay(&self, failures: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(failures);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = 1.0 - self.jitter.clamp(0.0, 1.0) * unit;
        let jittered = ceiling.mul_f64(factor);
        match retry_after {
            Some(after) => jittered.max(after),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c9_backoff_grows_and_is_capped() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(2), Duration::from_millis(200));
        assert_eq!(backoff.ceiling(4), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(5), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn c9_backoff_jitter_stays_in_range_and_honours_retry_after() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(backoff.delay(1, 0.0, None), Duration::from_secs(1));
        assert_eq!(backoff.delay(1, 1.0, None), Duration::from_millis(500));
        assert_eq!(
            backoff.delay(1, 1.0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(backoff.delay(1, f64::NAN, None), Duration::from_secs(1));
    }
}
