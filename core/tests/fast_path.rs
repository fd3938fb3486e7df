//! C10 / fast path: getting a valid token allocates nothing and takes no lock (one
//! atomic load of the current token; see `SingleFlight::valid_token`). Measured with
//! dhat's heap statistics as the global allocator of this test binary, which holds only
//! this check and runs without the libtest harness (`harness = false`), so no other
//! thread of the process allocates meanwhile (the harness's own thread made the count
//! flaky).

#[path = "all/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{FakeRequest, FakeResponse};
use tokenflight::{
    AuthPolicy, SingleFlight, Token, adapter::RequestOptions, from_fn, test_util::ManualClock,
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    // One profiler for the process (dhat allows one at a time).
    let _profiler = dhat::Profiler::builder().testing().build();
    c10_fast_path_allocates_nothing(false);
    println!("test c10_fast_path_allocates_nothing ... ok");
    // Issue 16: a registered observer costs nothing on the fast path either.
    c10_fast_path_allocates_nothing(true);
    println!("test c10_fast_path_allocates_nothing_with_an_observer ... ok");
    observers_add_no_allocation_to_a_fast_path_send();
    println!("test observers_add_no_allocation_to_a_fast_path_send ... ok");
    c10_a_clock_without_a_coarse_reading_allocates_nothing_either();
    println!("test c10_a_clock_without_a_coarse_reading_allocates_nothing_either ... ok");
    println!();
    println!("test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}

/// Sees every event and does nothing.
struct Quiet;

impl tokenflight::observe::Observer for Quiet {}

fn c10_fast_path_allocates_nothing(with_observer: bool) {
    let clock = ManualClock::at_fixed_point();
    let now = tokenflight::adapter::Clock::now(&clock);
    let mut builder = SingleFlight::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
        .clock(Arc::new(clock.clone()))
        .initial_token(Token::new("valid").expires_in(Duration::from_secs(3600), now));
    if with_observer {
        builder = builder.observer(Quiet);
        // With the feature on, the metrics observer too (issue 16).
        #[cfg(feature = "metrics")]
        {
            builder = builder.observer(tokenflight::observe::MetricsObserver::new());
        }
    }
    let flight = builder.build().unwrap();
    // Warm up (first use of thread-locals etc. may allocate once).
    futures::executor::block_on(flight.token()).unwrap();

    let before = dhat::HeapStats::get();
    for _ in 0..10_000 {
        let token = flight.valid_token().unwrap();
        std::hint::black_box(&token);
        // The async entry point too: polled to completion on the fast path.
        let token = futures::executor::block_on(flight.token()).unwrap();
        std::hint::black_box(&token);
    }
    let after = dhat::HeapStats::get();
    assert_eq!(
        after.total_blocks,
        before.total_blocks,
        "the valid-token fast path allocated {} blocks in 20,000 calls",
        after.total_blocks - before.total_blocks
    );
    assert_eq!(flight.stats().flights, 0);

    // The measurement can see allocations: an expired token's path does allocate.
    let before = dhat::HeapStats::get();
    std::hint::black_box(vec![0u8; 16]);
    assert!(dhat::HeapStats::get().total_blocks > before.total_blocks);
}

/// Issue 16: the adapters' shared driver reports each request (`request_authorized`, a
/// fast-path hit here) to the observers. A send allocates on its own (the request, its
/// header value), so the check is a difference: the same fast-path sends allocate as
/// many blocks with observers (and, with the feature, `MetricsObserver`) as without.
fn observers_add_no_allocation_to_a_fast_path_send() {
    let blocks = |with_observer: bool| {
        let clock = ManualClock::at_fixed_point();
        let now = tokenflight::adapter::Clock::now(&clock);
        let mut builder = AuthPolicy::builder()
            .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
            .clock(Arc::new(clock.clone()))
            .allowed_origin("https://api.test")
            .initial_token(Token::new("valid").expires_in(Duration::from_secs(3600), now));
        if with_observer {
            builder = builder.observer(Quiet);
            #[cfg(feature = "metrics")]
            {
                builder = builder
                    .observer(tokenflight::observe::MetricsObserver::new())
                    .observer(tokenflight::observe::MetricsObserver::named("api"));
            }
        }
        let auth = builder.build().unwrap();
        let send = || {
            let response = futures::executor::block_on(auth.send(
                FakeRequest::get("https://api.test/x"),
                RequestOptions::default(),
                |_req| async { Ok::<_, std::convert::Infallible>(FakeResponse::status(200)) },
            ))
            .unwrap();
            assert_eq!(response.status, 200);
        };
        send();
        let before = dhat::HeapStats::get();
        for _ in 0..1_000 {
            send();
        }
        let blocks = dhat::HeapStats::get().total_blocks - before.total_blocks;
        assert_eq!(auth.stats().flights, 0);
        blocks
    };
    let without = blocks(false);
    let with = blocks(true);
    assert!(
        without > 0,
        "the measurement sees the sends' own allocations"
    );
    assert_eq!(
        with,
        without,
        "observers added {} blocks to 1,000 fast-path sends",
        with.saturating_sub(without)
    );
}

/// A user's clock that implements only the required `now` (no coarse reading, so the
/// coarse fast path never applies).
struct PreciseOnly(ManualClock);

impl tokenflight::adapter::Clock for PreciseOnly {
    fn now(&self) -> std::time::SystemTime {
        tokenflight::adapter::Clock::now(&self.0)
    }
}

/// C10 with a clock that has no coarse reading: the valid token is still had without
/// building the asynchronous path (decided on the precise clock), so `token().await`
/// and a send's token allocate nothing — a send allocates as many blocks as with a
/// clock that has a coarse reading.
fn c10_a_clock_without_a_coarse_reading_allocates_nothing_either() {
    let build = |coarse: bool| {
        let clock = ManualClock::at_fixed_point();
        let now = tokenflight::adapter::Clock::now(&clock);
        let clock: Arc<dyn tokenflight::adapter::Clock> = if coarse {
            Arc::new(clock)
        } else {
            Arc::new(PreciseOnly(clock))
        };
        AuthPolicy::builder()
            .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
            .clock(clock)
            .allowed_origin("https://api.test")
            .initial_token(Token::new("valid").expires_in(Duration::from_secs(3600), now))
            .build()
            .unwrap()
    };
    let precise = build(false);
    let Some(flight) = precise.flight() else {
        panic!("a policy with one token has a coordinator");
    };
    futures::executor::block_on(flight.token()).unwrap();
    let before = dhat::HeapStats::get();
    for _ in 0..10_000 {
        let token = futures::executor::block_on(flight.token()).unwrap();
        std::hint::black_box(&token);
    }
    let after = dhat::HeapStats::get();
    assert_eq!(
        after.total_blocks,
        before.total_blocks,
        "token() with a precise-only clock allocated {} blocks in 10,000 calls",
        after.total_blocks - before.total_blocks
    );
    let send_blocks = |auth: &AuthPolicy| {
        let send = || {
            let response = futures::executor::block_on(auth.send(
                FakeRequest::get("https://api.test/x"),
                RequestOptions::default(),
                |_req| async { Ok::<_, std::convert::Infallible>(FakeResponse::status(200)) },
            ))
            .unwrap();
            assert_eq!(response.status, 200);
        };
        send();
        let before = dhat::HeapStats::get();
        for _ in 0..1_000 {
            send();
        }
        dhat::HeapStats::get().total_blocks - before.total_blocks
    };
    let with_coarse = send_blocks(&build(true));
    let without = send_blocks(&precise);
    assert_eq!(
        without,
        with_coarse,
        "1,000 sends with a precise-only clock allocated {} blocks more",
        without.saturating_sub(with_coarse)
    );
    assert_eq!(precise.stats().flights, 0);
}
