//! Issue 17: what a key costs. (a) The keyed fast path — `KeyedFlights::valid_token(&key)`
//! in a map of 10,000 keys — against the unkeyed `SingleFlight::valid_token()`, as a ratio
//! measured in the same run (alternating rounds, median), for calls spread over all keys
//! (cache misses included) and for one hot key (the map's own cost). (b) Memory per idle key: bytes
//! still allocated per key after 10,000 keys were made and handed a token (a counting
//! allocator), with the default in-memory store per key.

use std::alloc::System;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokenflight::{Builder, KeyedFlights, SingleFlight, Token, from_fn};
use tokenflight_benches::poll::poll_to_end;
use tokenflight_benches::storm::fresh_token;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS: u64 = 10_000;
const ROUNDS: usize = 15;
const CALLS: u32 = 200_000;

fn flight() -> Result<SingleFlight, tokenflight::ConfigError> {
    Builder::new()
        .source(from_fn(|_cx| async { Ok(fresh_token()) }))
        .build_flight()
}

fn keyed() -> KeyedFlights<u64> {
    let flights = KeyedFlights::builder(|_key: &u64| flight())
        .max_entries(KEYS as usize)
        .build();
    for key in 0..KEYS {
        if let Err(error) = poll_to_end(flights.token(&key)) {
            panic!("key {key}: {error}");
        }
    }
    flights
}

fn nanos_per_call(mut call: impl FnMut() -> Option<Arc<Token>>) -> f64 {
    let start = Instant::now();
    for _ in 0..CALLS {
        if black_box(call()).is_none() {
            panic!("the token should be valid");
        }
    }
    start.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    // (b) first, on a quiet heap.
    let region = Region::new(GLOBAL);
    let flights = keyed();
    let stats = region.change();
    let kept = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    println!(
        "keyed memory: {:.0} bytes per idle key ({} keys, default MemoryStore each)",
        kept / KEYS as f64,
        flights.len()
    );

    // (a) alternating rounds so drift hits both sides alike.
    let single = match flight() {
        Ok(flight) => flight,
        Err(error) => panic!("{error}"),
    };
    if let Err(error) = poll_to_end(single.token()) {
        panic!("{error}");
    }
    let (mut unkeyed, mut keyed_ns, mut hot_ns) = (Vec::new(), Vec::new(), Vec::new());
    let mut key = 0u64;
    for _ in 0..ROUNDS {
        unkeyed.push(nanos_per_call(|| single.valid_token()));
        keyed_ns.push(nanos_per_call(|| {
            key = (key + 7919) % KEYS;
            flights.valid_token(&key)
        }));
        hot_ns.push(nanos_per_call(|| flights.valid_token(&4711)));
    }
    let (u, k, h) = (median(unkeyed), median(keyed_ns), median(hot_ns));
    println!("unkeyed valid_token: {u:.1} ns/call");
    println!("keyed valid_token (10,000 keys): {k:.1} ns/call");
    println!("keyed valid_token (one hot key of 10,000): {h:.1} ns/call");
    println!(
        "keyed/unkeyed fast path ratio: {:.2} (keys spread), {:.2} (one hot key)",
        k / u,
        h / u
    );
}
