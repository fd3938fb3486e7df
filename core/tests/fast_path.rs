//! C10 / fast path: getting a valid token allocates nothing and takes no lock (one
//! atomic load of the current token; see `SingleFlight::valid_token`). Measured with
//! dhat's heap statistics as the global allocator of this test binary, which holds only
//! this check and runs without the libtest harness (`harness = false`), so no other
//! thread of the process allocates meanwhile (the harness's own thread made the count
//! flaky).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{FakeRequest, FakeResponse};
use tokenflight::{Builder, ManualClock, RequestOptions, Token, from_fn};

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
    println!();
    println!("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}

/// Sees every event and does nothing.
struct Quiet;

impl tokenflight::Observer for Quiet {}

fn c10_fast_path_allocates_nothing(with_observer: bool) {
    let clock = ManualClock::at_fixed_point();
    let now = tokenflight::Clock::now(&clock);
    let mut builder = Builder::new()
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
    let flight = builder.build_flight().unwrap();
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
        let now = tokenflight::Clock::now(&clock);
        let mut builder = Builder::new()
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
