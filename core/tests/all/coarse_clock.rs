//! The fast path's coarse clock (issue 18): a token is served from the coarse reading
//! only while it stays usable for longer than the reading's lag; nearer the leeway the
//! precise clock decides (C7 exact), and a wall-clock step is seen at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokenflight::adapter::RequestOptions;
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, FlightBuilder, RefreshContext, SingleFlight, Token,
    adapter::Clock, from_fn, test_util::ManualClock,
};

use crate::support::{FakeRequest, FakeServer};

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
    let (clock, builder) = flight_builder(lifetime, leeway);
    (clock, builder.build().unwrap())
}

/// A coordinator whose token "t" expires `lifetime` from now on a [`LaggingClock`]; its
/// source answers "new".
fn flight_builder(lifetime: Duration, leeway: Duration) -> (Arc<LaggingClock>, FlightBuilder) {
    let clock = Arc::new(LaggingClock {
        wall: ManualClock::at_fixed_point(),
        lag_ms: AtomicU64::new(0),
        precise_reads: AtomicU32::new(0),
    });
    let token = Token::new("t").expires_in(lifetime, clock.wall.now());
    let builder = SingleFlight::builder()
        .source(from_fn(|_cx: RefreshContext| async {
            Ok(Token::new("new"))
        }))
        .clock(clock.clone())
        .timer(Arc::new(clock.wall.clone()))
        .leeway(leeway)
        .refresh_ahead(None)
        .min_refresh_interval(Duration::ZERO)
        .initial_token(token);
    (clock, builder)
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

/// The middleware's own fast path (it borrows the token instead of cloning it, issue
/// 18) decides as `valid_token` does: the coarse reading vouches only outside its lag,
/// and from the leeway on the request waits for a new token (C7).
#[test]
fn c7_the_middleware_sends_no_token_within_the_leeway() {
    let lifetime = Duration::from_secs(600);
    let leeway = Duration::from_secs(30);
    let (clock, builder) = flight_builder(lifetime, leeway);
    let policy = AuthPolicyBuilder::<AuthPolicy>::from_flight(builder)
        .allow_any_origin()
        .build()
        .unwrap();
    let server = FakeServer::default();
    let send = || {
        let response = futures::executor::block_on(policy.send(
            FakeRequest::get("https://api.example.com/x"),
            RequestOptions::default(),
            server.sender(|_| true),
        ));
        assert_eq!(response.unwrap().status, 200);
        server.seen().last().cloned().flatten()
    };
    let reads = || clock.precise_reads.load(Ordering::SeqCst);
    clock
        .wall
        .advance(lifetime - leeway - Duration::from_millis(1));
    clock.lag_ms.store(4, Ordering::SeqCst);
    assert_eq!(send().as_deref(), Some("Bearer t"));
    assert_eq!(reads(), 0, "the coarse reading vouches for the token");
    clock.lag_ms.store(0, Ordering::SeqCst);
    assert_eq!(send().as_deref(), Some("Bearer t"));
    assert!(reads() > 0, "within the lag the precise clock decides");
    clock.wall.advance(Duration::from_millis(1));
    clock.lag_ms.store(4, Ordering::SeqCst);
    assert_eq!(
        send().as_deref(),
        Some("Bearer new"),
        "at the leeway: refreshed first"
    );
    assert_eq!(policy.stats().source_calls, 1);
}
