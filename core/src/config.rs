//! The coordinator's tunables, with documented defaults.

use std::time::Duration;

use crate::token::Token;

/// Timing settings of a [`SingleFlight`](crate::SingleFlight).
///
/// # Timing scaled to the token's lifetime ([C15](crate#c15))
///
/// `leeway` and `refresh_ahead` are *caps*. A token that knows its lifetime `L` (it
/// records when it was obtained, see [`Token::lifetime`]) gets
///
/// - effective leeway = `min(leeway, L / 10 + 1 s)`: callers start waiting for a new
///   token in the last tenth of its life, one second earlier;
/// - effective refresh-ahead window = `min(refresh_ahead, L / 3)`: the background
///   refresh never starts before two thirds of the life have passed.
///
/// The second is [`EXPIRY_GRANULARITY`]: `expires_in` counts whole seconds and servers
/// round the issue time down, so a token announced as living 3 s may live only 2 s on
/// the server. Without it, a short token would still be sent (or a rejected request
/// resent with it) after the server already counts it expired. Long tokens do not
/// notice: their leeway is the cap. The window gets no such second: it is when to
/// start early, not when the token stops being good, and widening it would refresh
/// short tokens more than twice per lifetime. For tokens shorter than about 5 s it lies
/// inside the leeway, so callers wait for one refresh at the leeway.
///
/// A token whose lifetime is unknown gets the caps as they are. With the defaults
/// (caps 10 s and 225 s) — "refresh ahead starts" is the earliest point; with
/// [`FlightConfig::refresh_ahead_jitter`] each coordinator starts at a per-token point
/// between it and half the window later:
///
/// | lifetime `L` | leeway | refresh ahead starts | callers wait from |
/// |---|---|---|---|
/// | 1 s   | 1.1 s  | — (inside the leeway) | at once — but see below |
/// | 2 s   | 1.2 s  | — (inside the leeway) | 800 ms — but see below |
/// | 3 s   | 1.3 s  | — (inside the leeway) | 1.7 s |
/// | 10 s  | 2 s    | 6.67 s (3.33 s before expiry) | 8 s |
/// | 1 min | 7 s    | 40 s (20 s before expiry) | 53 s |
/// | 5 min | 10 s   | 3 min 20 s (100 s before expiry) | 4 min 50 s |
/// | 1 h   | 10 s   | 56 min 15 s (225 s before expiry) | 59 min 50 s |
/// | 24 h  | 10 s   | 23 h 56 min 15 s (225 s before expiry) | 23 h 59 min 50 s |
///
/// Why these numbers: golang/oauth2 treats a token as expired 10 s early and the AWS
/// SDKs keep a 10 s buffer — the leeway cap; a fixed window, though, is longer than a
/// 2-second token's whole life, so it is scaled down to a tenth of the lifetime.
/// Google's Go auth library refreshes asynchronously 225 s before expiry — the
/// refresh-ahead cap — while MSAL refreshes at half-life; a third of the lifetime sits
/// between the two and keeps steady traffic at about 1.5 source calls per lifetime
/// for short tokens (half-life would make it 2, with no margin for latency).
///
/// The minimum refresh interval (default 1 s) comes first: a token younger than it is
/// neither refreshed ahead nor counted as expired. For lifetimes up to about 2 s this
/// moves both points to 1 s after the token was obtained (for `L` = 1 s: callers keep
/// the token until it expires, then wait for one refresh; for `L` = 2 s: one refresh
/// per second, which is what a 2 s token whose issue time the server rounded down
/// really lives).
///
/// A token younger than `min_refresh_interval` is always usable, even when it arrived
/// already expired by the local clock (`expires_in: 0`, a skewed `exp`): the server
/// decides, and expiry-driven source calls stay at least that far apart. Rejections of
/// the newest token and forced refreshes are not limited.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlightConfig {
    /// Cap on the clock-skew allowance: a token this close to its expiry counts as
    /// expired ([C7](crate#c7)), scaled to `L / 10 + 1 s` for short lifetimes. Default: 10 s.
    pub leeway: Duration,
    /// Cap on the refresh-ahead window: inside it (and outside the leeway) the
    /// still-valid token is used while one refresh runs ahead ([C8](crate#c8)), scaled to
    /// `L / 3` for short lifetimes. `None` disables it. Default: 225 s.
    pub refresh_ahead: Option<Duration>,
    /// Spreads refresh-ahead starts over a fleet: each coordinator starts its
    /// refresh-ahead at `window × f` before expiry, with `f` drawn in
    /// `[1 - refresh_ahead_jitter / 100, 1]` once per token generation (a hash of the
    /// generation and a per-coordinator random seed: deterministic, no allocation on
    /// the fast path). Replicas sharing a store then do not all contend at the same
    /// instant: the first one refreshes, the rest find its token already stored and
    /// adopt it with one read. The window in the table above ([C15](crate#c15)) is the upper bound
    /// of the start point: refresh-ahead never starts earlier than it says, and with
    /// the default at most half the window later. A percentage (values above 100
    /// count as 100); `0` turns the jitter off. Default: 50.
    pub refresh_ahead_jitter: u8,
    /// Expiry-driven source calls are at least this far apart: a token younger than
    /// this is always usable ([C15](crate#c15)). Default: 1 s.
    pub min_refresh_interval: Duration,
    /// One budget for a whole flight: the store's lock, load, every attempt, the
    /// delays between them, save and unlock ([C10](crate#c10), [C16](crate#c16)). Default: 30 s.
    pub refresh_timeout: Duration,
    /// Bound on one call of the token source, inside the flight's budget. Default: 10 s.
    pub attempt_timeout: Duration,
    /// Retries of transient failures inside one flight ([C16](crate#c16)).
    pub retry: Retry,
    /// Fail-fast backoff after a flight used up its attempts ([C9](crate#c9), [C16](crate#c16)).
    pub backoff: Backoff,
}

impl Default for FlightConfig {
    fn default() -> Self {
        FlightConfig {
            leeway: Duration::from_secs(10),
            refresh_ahead: Some(Duration::from_secs(225)),
            refresh_ahead_jitter: 50,
            min_refresh_interval: Duration::from_secs(1),
            refresh_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            retry: Retry::default(),
            backoff: Backoff::default(),
        }
    }
}

/// How far a server's idea of a token's expiry may lie before the client's when both
/// are right: `expires_in` (and a JWT's `exp`) counts whole seconds, and servers round
/// the issue time down, so a token announced as living 3 s may live only 2 s on the
/// server. Added to the lifetime-scaled leeway (within its cap).
pub const EXPIRY_GRANULARITY: Duration = Duration::from_secs(1);

impl FlightConfig {
    /// The leeway that applies to `token`: `min(leeway, L / 10 + 1 s)` (see the type's
    /// docs and [`EXPIRY_GRANULARITY`]).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::{Token, config::FlightConfig};
    /// let config = FlightConfig::default();
    /// let token = Token::new("t").expires_in(Duration::from_secs(3), SystemTime::now());
    /// assert_eq!(config.leeway_for(&token), Duration::from_millis(1300));
    /// ```
    pub fn leeway_for(&self, token: &Token) -> Duration {
        match token.lifetime() {
            Some(lifetime) => self
                .leeway
                .min((lifetime / 10).saturating_add(EXPIRY_GRANULARITY)),
            None => self.leeway,
        }
    }

    /// The refresh-ahead window that applies to `token`: `min(refresh_ahead, L / 3)`,
    /// or `None` when refresh-ahead is off (see the type's docs). For tokens shorter than
    /// about 5 s it lies inside the leeway: callers then wait for the refresh at the
    /// leeway instead.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::{Token, config::FlightConfig};
    /// let config = FlightConfig::default();
    /// let hour = Token::new("t").expires_in(Duration::from_secs(3600), SystemTime::now());
    /// assert_eq!(config.refresh_ahead_for(&hour), Some(Duration::from_secs(225)));
    /// let minute = Token::new("t").expires_in(Duration::from_secs(60), SystemTime::now());
    /// assert_eq!(config.refresh_ahead_for(&minute), Some(Duration::from_secs(20)));
    /// let mut off = FlightConfig::default();
    /// off.refresh_ahead = None;
    /// assert_eq!(off.refresh_ahead_for(&hour), None);
    /// ```
    pub fn refresh_ahead_for(&self, token: &Token) -> Option<Duration> {
        let cap = self.refresh_ahead?;
        Some(match token.lifetime() {
            Some(lifetime) => cap.min(lifetime / 3),
            None => cap,
        })
    }
}

/// How a flight retries transient failures (network, timeouts, 5xx, 429, store
/// failures) before it gives up ([C16](crate#c16)). Permanent failures are never retried.
///
/// Between attempts the flight waits `retry.backoff`'s delay (or a server's
/// `Retry-After` when it fits in the flight's remaining budget; when it does not, the
/// flight ends and the fail-fast backoff honours it).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retry {
    /// Attempts per flight, the first included; 1 disables retries. Default: 3.
    pub max_attempts: u32,
    /// Delays between attempts. Default: 100 ms, doubling, capped at 1 s, jitter 0.5.
    pub backoff: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        }
    }
}

impl Retry {
    /// `max_attempts` attempts per flight with the given delays.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::{Backoff, Retry};
    /// let retry = Retry::new(5, Backoff::new(Duration::from_millis(50), Duration::from_secs(2)));
    /// assert_eq!(retry.max_attempts, 5);
    /// // At least one attempt.
    /// assert_eq!(Retry::new(0, Backoff::none()).max_attempts, 1);
    /// ```
    pub fn new(max_attempts: u32, backoff: Backoff) -> Self {
        Retry {
            max_attempts: max_attempts.max(1),
            backoff,
        }
    }

    /// One attempt per flight: no retries inside a flight.
    ///
    /// ```
    /// use tokenflight::config::Retry;
    /// assert_eq!(Retry::none().max_attempts, 1);
    /// ```
    pub fn none() -> Self {
        Retry::new(1, Backoff::none())
    }
}

/// Capped exponential backoff with jitter after transient refresh failures ([C9](crate#c9)).
///
/// After the n-th consecutive failure, refreshes are refused for
/// `min(max, initial * 2^(n-1))`, scaled by a random factor in `[1 - jitter, 1]`, and
/// never less than a server's `Retry-After` (itself capped at `max_retry_after`, so an
/// absurd value neither overflows nor stops refreshes for days). Deadlines are kept
/// on the monotonic clock: a wall-clock step neither stretches nor cancels them.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay after the first failure. Default: 500 ms.
    pub initial: Duration,
    /// Cap on the delay. Default: 60 s.
    pub max: Duration,
    /// Fraction of the delay that is randomised, 0.0..=1.0. Default: 0.5.
    pub jitter: f64,
    /// Cap on a server's `Retry-After`. Default: 5 min.
    pub max_retry_after: Duration,
}

impl Eq for Backoff {}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            jitter: 0.5,
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// A backoff with the given first delay and cap, and the default jitter.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::Backoff;
    /// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    /// assert_eq!((backoff.initial, backoff.max), (Duration::from_secs(1), Duration::from_secs(30)));
    /// assert_eq!(backoff.jitter, Backoff::default().jitter);
    /// ```
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ..Backoff::default()
        }
    }

    /// No backoff: every caller that needs a refresh may try again at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::Backoff;
    /// let none = Backoff::none();
    /// assert_eq!(none.initial, Duration::ZERO);
    /// assert_eq!(none.max, Duration::ZERO);
    /// ```
    pub fn none() -> Self {
        Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
            max_retry_after: Duration::ZERO,
        }
    }

    /// Sets the jitter fraction (clamped to 0.0..=1.0).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::Backoff;
    /// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).with_jitter(0.2);
    /// assert_eq!(backoff.jitter, 0.2);
    /// assert_eq!(Backoff::default().with_jitter(7.0).jitter, 1.0);
    /// ```
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// Sets the cap on a server's `Retry-After`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::Backoff;
    /// let backoff = Backoff::default().with_max_retry_after(Duration::from_secs(60));
    /// assert_eq!(backoff.max_retry_after, Duration::from_secs(60));
    /// ```
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// The delay after `failures` consecutive failures, before jitter.
    pub(crate) fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << exponent).min(self.max)
    }

    /// The delay after `failures` consecutive failures, with jitter drawn from `unit`
    /// (a random number in 0.0..1.0) and at least `retry_after` capped at
    /// `max_retry_after`.
    pub(crate) fn delay(
        &self,
        failures: u32,
        unit: f64,
        retry_after: Option<Duration>,
    ) -> Duration {
        let ceiling = self.ceiling(failures);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = 1.0 - self.jitter.clamp(0.0, 1.0) * unit;
        let jittered = ceiling.mul_f64(factor);
        match retry_after {
            Some(after) => jittered.max(after.min(self.max_retry_after)),
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

    #[test]
    fn c16_huge_retry_after_is_capped() {
        let backoff = Backoff::default();
        assert_eq!(
            backoff.delay(1, 0.0, Some(Duration::MAX)),
            Duration::from_secs(300)
        );
        assert_eq!(
            backoff.with_max_retry_after(Duration::from_secs(10)).delay(
                1,
                0.0,
                Some(Duration::from_secs(3600))
            ),
            Duration::from_secs(10)
        );
    }

    fn token_living(lifetime: Duration) -> Token {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        Token::new("t").expires_in(lifetime, now)
    }

    /// The table in `FlightConfig`'s docs, row by row.
    #[test]
    fn c15_documented_timing_table() {
        let config = FlightConfig::default();
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // (lifetime, leeway, refresh-ahead window)
        let table = [
            (s(1), ms(1100), ms(333)),
            (s(2), ms(1200), ms(667)),
            (s(3), ms(1300), s(1)),
            (s(10), s(2), ms(3333)),
            (s(60), s(7), s(20)),
            (s(300), s(10), s(100)),
            (s(3600), s(10), s(225)),
            (s(86_400), s(10), s(225)),
        ];
        for (lifetime, leeway, ahead) in table {
            let token = token_living(lifetime);
            assert_eq!(config.leeway_for(&token), leeway, "leeway for {lifetime:?}");
            let window = config.refresh_ahead_for(&token).unwrap();
            // L / 3 is not a whole number of milliseconds for every L.
            assert!(
                window.abs_diff(ahead) < ms(1),
                "window for {lifetime:?}: {window:?}"
            );
            // The table's dashes: a window remains from 10 s on, not below 5 s.
            assert_eq!(
                window > leeway,
                lifetime >= s(10),
                "a window remains for {lifetime:?}"
            );
        }
    }

    #[test]
    fn c15_unknown_lifetime_uses_the_caps_and_zero_lifetime_gives_the_granularity() {
        let config = FlightConfig::default();
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let no_lifetime = Token::new("t").expires_at(now);
        assert_eq!(config.leeway_for(&no_lifetime), Duration::from_secs(10));
        assert_eq!(
            config.refresh_ahead_for(&no_lifetime),
            Some(Duration::from_secs(225))
        );
        // Born expired: only the granularity's second is left of the leeway.
        let born_expired = Token::new("t").expires_in(Duration::ZERO, now);
        assert_eq!(config.leeway_for(&born_expired), EXPIRY_GRANULARITY);
        assert_eq!(
            config.refresh_ahead_for(&born_expired),
            Some(Duration::ZERO)
        );
        let off = FlightConfig {
            refresh_ahead: None,
            ..FlightConfig::default()
        };
        assert_eq!(off.refresh_ahead_for(&born_expired), None);
    }
}
