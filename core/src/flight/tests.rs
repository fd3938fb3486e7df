//! The coordinator's own tests: what the split promises about its shape and cost.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::executor::block_on;

use crate::runtime::ManualClock;
use crate::{SingleFlight, Token, from_fn};

fn locks(flight: &SingleFlight) -> u64 {
    flight.inner.locks.load(Ordering::Relaxed)
}

fn minute_tokens(clock: &ManualClock) -> SingleFlight {
    let now_of = clock.clone();
    SingleFlight::builder()
        .source(from_fn(move |_cx| {
            let now = crate::runtime::Clock::now(&now_of);
            async move { Ok(Token::new("secret").expires_in(Duration::from_secs(60), now)) }
        }))
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// One refresh of an expired token through the default `MemoryStore` takes the state
/// lock at most four times: the caller joins (starting the flight), the flight decides
/// after its locked load, numbers the fetched token, and finishes.
#[test]
fn one_refresh_through_a_memory_store_takes_the_state_lock_at_most_four_times() {
    let clock = ManualClock::at_fixed_point();
    let flight = minute_tokens(&clock);
    let first = block_on(flight.token()).unwrap();
    clock.advance(Duration::from_secs(61));
    let before = locks(&flight);
    let second = block_on(flight.token()).unwrap();
    let taken = locks(&flight) - before;
    assert!(second.generation() > first.generation());
    assert_eq!(flight.stats().source_calls, 2);
    eprintln!("refresh: {taken} lock(s)");
    assert!(
        taken <= 4,
        "the state lock was taken {taken} times for one refresh"
    );
    // A rejection of the current token: one more, to record it.
    let before = locks(&flight);
    let third = block_on(flight.token_after_rejection(second.generation())).unwrap();
    let taken = locks(&flight) - before;
    assert!(third.generation() > second.generation());
    eprintln!("rejection refresh: {taken} lock(s)");
    assert!(
        taken <= 5,
        "the state lock was taken {taken} times for a rejection's refresh"
    );
}

/// The fast path takes no lock.
#[test]
fn a_fresh_token_is_served_without_the_state_lock() {
    let clock = ManualClock::at_fixed_point();
    let flight = minute_tokens(&clock);
    block_on(flight.token()).unwrap();
    let before = locks(&flight);
    for _ in 0..10 {
        block_on(flight.token()).unwrap();
        assert!(flight.valid_token().is_some());
    }
    assert_eq!(locks(&flight), before);
}

/// The state machine's file is pure: no await, no clock read, no store or source call
/// (the time and every answer are arguments). Comments are not checked.
#[test]
fn the_state_machine_does_no_io_and_reads_no_clock() {
    let code: String = include_str!("machine.rs")
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for forbidden in [
        "async",
        ".await",
        "SystemTime::now",
        "Instant::now",
        "Clock",
        "TokenStore",
        "StoreGuard",
        "TokenSource",
        ".fetch(",
        ".load(",
        ".save(",
        "fastrand",
    ] {
        assert!(
            !code.contains(forbidden),
            "machine.rs contains `{forbidden}`"
        );
    }
}
