//! The fast path's coarse clock (issue 18): a token is served from the coarse reading
//! only while it stays usable for longer than the reading's lag; nearer the leeway the
//! precise clock decides (C7 exact), and a wall-clock step is seen at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokenflight::{
    RefreshContext, SingleFlight, Token, adapter::Clock, from_fn, test_util::ManualClock,
};

const LAG: Duration = Duration::from_millis(4);

/// A clock whose coarse reading lags the wall clock by `lag_ms` (at most the `LAG` it
/// declares) and which counts precise reads.
struct LaggingClock {
    wall: ManualClock,
    lag_ms: AtomicU64,
    precise_reads: AtomicU32,
}

impl Clock for LaggingClock {
    fn now(&self) -> SystemTime {
        self.precise_reads.fetch_add(1, Ordering::SeqCst);
        self.wall.now()
    }
    fn coarse_now(&self) -> Option<Duration> {
        let lag = Duration::from_millis(self.lag_ms.load(Ordering::SeqCst));
        self.wall
            .now()
            .checked_sub(lag)?
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
    }
    fn coarse_lag(&self) -> Option<Duration> {
        Some(LAG)
    }
}

fn setup(lifetime: Duration, leeway: Duration) -> (Arc<LaggingClock>, SingleFlight) {
    let clock = Arc::new(LaggingClock {
        wall: ManualClock::at_fixed_point(),
        lag_ms: AtomicU64::new(0),
        precise_reads: AtomicU32::new(0),
    });
    let token = Token::new("t").expires_in(lifetime, clock.wall.now());
    let flight = SingleFlight::builder()
        .source(from_fn(|_cx: RefreshContext| async {
            Ok(Token::new("new"))
        }))
        .clock(clock.clone())
        .timer(Arc::new(clock.wall.clone()))
        .leeway(leeway)
        .refresh_ahead(None)
        .min_refresh_interval(Duration::ZERO)
        .initial_token(token)
        .build()
        .unwrap();
    (clock, flight)
}

#[test]
fn far_from_the_leeway_the_fast_path_reads_no_precise_clock() {
    let (clock, flight) = setup(Duration::from_secs(600), Duration::from_secs(30));
    for _ in 0..100 {
        assert!(flight.valid_token().is_some());
        assert!(futures::executor::block_on(flight.token()).is_ok());
    }
    assert_eq!(clock.precise_reads.load(Ordering::SeqCst), 0);
}

#[test]
fn c7_stays_exact_within_the_coarse_lag() {
    let lifetime = Duration::from_secs(600);
    let leeway = Duration::from_secs(30);
    let (clock, flight) = setup(lifetime, leeway);
    let reads = || clock.precise_reads.load(Ordering::SeqCst);
    // 1 ms before the leeway starts. A coarse reading as late as declared (4 ms) still
    // vouches for the token: its true time is at most 4 ms later.
    clock
        .wall
        .advance(lifetime - leeway - Duration::from_millis(1));
    clock.lag_ms.store(4, Ordering::SeqCst);
    assert!(flight.valid_token().is_some());
    assert_eq!(reads(), 0);
    // A fresh coarse reading cannot (it might be 4 ms late): the precise clock decides,
    // still valid.
    clock.lag_ms.store(0, Ordering::SeqCst);
    assert!(flight.valid_token().is_some());
    assert!(reads() > 0);
    // Exactly at the leeway: not valid, whatever the coarse reading's lag.
    clock.wall.advance(Duration::from_millis(1));
    for lag in [0, 2, 4] {
        clock.lag_ms.store(lag, Ordering::SeqCst);
        assert!(flight.valid_token().is_none(), "lag {lag} ms");
    }
}

#[test]
fn a_wall_clock_step_forward_is_seen_at_once() {
    let (clock, flight) = setup(Duration::from_secs(600), Duration::from_secs(30));
    assert!(flight.valid_token().is_some());
    clock.wall.step_wall_forward(Duration::from_secs(600));
    assert!(flight.valid_token().is_none());
    clock.wall.step_wall_back(Duration::from_secs(600));
    assert!(flight.valid_token().is_some());
}
