//! (a) The fast path: getting a valid token, on 1 and on 2 threads at once.
//!
//! Contenders, each handing back an owned `Arc<Token>`:
//! - `arc_swap_load_full`: one `ArcSwap::load_full` — the floor (tokenflight's current
//!   token sits in an `ArcSwapOption`);
//! - `arc_swap_load_full_checked`: the floor plus the same expiry check tokenflight makes
//!   (a wall-clock read), to show where the difference goes;
//! - `tokenflight_valid_token`: `SingleFlight::valid_token()`;
//! - `tokenflight_token_await`: `SingleFlight::token()` polled once in place;
//! - `std_rwlock`: `std::sync::RwLock<Arc<Token>>`, read and clone;
//! - `tokio_mutex`: `tokio::sync::Mutex<Arc<Token>>`, lock and clone — the naive pattern.
//!
//! Allocations per call are counted with a counting allocator and saved for
//! `bench-report`.
//!
//! Criterion times one contender after the other; a ratio of two such means moved by
//! ±20 % between identical runs here (the machine's speed drifts over seconds). So the
//! two tokenflight contenders are also timed against `arc_swap_load_full` in short
//! interleaved rounds (20,000 calls each, back to back, alternating which goes first),
//! and the median of the rounds' ratios is recorded (`TOKENFLIGHT_BENCH_ROUNDS`,
//! default 201).

use std::alloc::System;
use std::hint::black_box;
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokenflight::{SingleFlight, Token, from_fn};
use tokenflight_benches::extras::Extras;
use tokenflight_benches::poll::poll_to_end;
use tokenflight_benches::storm::fresh_token;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The contenders, all holding the same valid token.
struct Contenders {
    arc_swap: ArcSwap<Token>,
    flight: SingleFlight,
    rwlock: RwLock<Arc<Token>>,
    tokio_mutex: tokio::sync::Mutex<Arc<Token>>,
}

type Get = fn(&Contenders) -> Arc<Token>;

const CONTENDERS: [(&str, Get); 6] = [
    ("arc_swap_load_full", |c| c.arc_swap.load_full()),
    ("arc_swap_load_full_checked", |c| {
        let token = c.arc_swap.load_full();
        assert!(!token.is_expired(SystemTime::now(), Duration::from_secs(30)));
        token
    }),
    ("tokenflight_valid_token", |c| {
        match c.flight.valid_token() {
            Some(token) => token,
            None => panic!("the token should be valid"),
        }
    }),
    ("tokenflight_token_await", |c| {
        match poll_to_end(c.flight.token()) {
            Ok(token) => token,
            Err(error) => panic!("the token should be valid: {error}"),
        }
    }),
    ("std_rwlock", |c| {
        Arc::clone(&c.rwlock.read().unwrap_or_else(|e| e.into_inner()))
    }),
    ("tokio_mutex", |c| {
        Arc::clone(&poll_to_end(c.tokio_mutex.lock()))
    }),
];

fn contenders() -> Contenders {
    let token = Arc::new(fresh_token());
    let flight = SingleFlight::builder()
        .source(from_fn(|_cx| async { Ok(fresh_token()) }))
        .initial_token(fresh_token())
        .build();
    let flight = match flight {
        Ok(flight) => flight,
        Err(error) => panic!("building the flight: {error}"),
    };
    Contenders {
        arc_swap: ArcSwap::new(Arc::clone(&token)),
        flight,
        rwlock: RwLock::new(Arc::clone(&token)),
        tokio_mutex: tokio::sync::Mutex::new(token),
    }
}

/// Both threads make `iters` calls at once; the time is the slower thread's.
fn two_threads(contenders: &Contenders, get: Get, iters: u64) -> Duration {
    let start = Barrier::new(2);
    std::thread::scope(|scope| {
        let run = || {
            start.wait();
            let began = Instant::now();
            for _ in 0..iters {
                black_box(get(black_box(contenders)));
            }
            began.elapsed()
        };
        let other = scope.spawn(run);
        let mine = run();
        let theirs = other.join().unwrap_or_default();
        mine.max(theirs)
    })
}

fn record_allocations(contenders: &Contenders) {
    const CALLS: u32 = 100_000;
    let mut extras = Extras::new();
    for (name, get) in CONTENDERS {
        black_box(get(contenders)); // warm up thread-locals
        let region = Region::new(GLOBAL);
        for _ in 0..CALLS {
            black_box(get(black_box(contenders)));
        }
        let allocations = region.change().allocations;
        extras.record(
            &format!("fast_path/{name}/allocations_per_call"),
            f64::from(u32::try_from(allocations).unwrap_or(u32::MAX)) / f64::from(CALLS),
        );
    }
    extras.save("fast_path");
}

/// `calls` calls of `get` on `threads` threads at once; the slower thread's time.
fn timed(contenders: &Contenders, get: Get, threads: usize, calls: u64) -> Duration {
    if threads == 1 {
        let began = Instant::now();
        for _ in 0..calls {
            black_box(get(black_box(contenders)));
        }
        began.elapsed()
    } else {
        two_threads(contenders, get, calls)
    }
}

/// The median (and quartiles) over interleaved rounds of (time of `get`) ÷ (time of
/// the floor, `arc_swap_load_full`), saved for `bench-report`.
fn record_interleaved(contenders: &Contenders) {
    const CALLS: u64 = 20_000;
    let rounds: usize = std::env::var("TOKENFLIGHT_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(201);
    let floor = CONTENDERS[0].1;
    let mut extras = Extras::load("fast_path");
    for threads in [1, 2] {
        for (name, get) in CONTENDERS {
            if !name.starts_with("tokenflight") {
                continue;
            }
            // Warm up both.
            timed(contenders, floor, threads, CALLS);
            timed(contenders, get, threads, CALLS);
            let mut ratios: Vec<f64> = (0..rounds)
                .map(|round| {
                    let (base, me) = if round % 2 == 0 {
                        let base = timed(contenders, floor, threads, CALLS);
                        (base, timed(contenders, get, threads, CALLS))
                    } else {
                        let me = timed(contenders, get, threads, CALLS);
                        (timed(contenders, floor, threads, CALLS), me)
                    };
                    me.as_secs_f64() / base.as_secs_f64().max(f64::MIN_POSITIVE)
                })
                .collect();
            ratios.sort_by(f64::total_cmp);
            let at = |fraction: f64| {
                let index = ((ratios.len().saturating_sub(1)) as f64 * fraction).round() as usize;
                ratios.get(index).copied().unwrap_or(f64::NAN)
            };
            let key = format!("fast_path/{threads}_threads/{name}/interleaved");
            extras.record(&key, at(0.5));
            extras.record(&format!("{key}_q1"), at(0.25));
            extras.record(&format!("{key}_q3"), at(0.75));
        }
    }
    extras.save("fast_path");
}

fn fast_path(c: &mut Criterion) {
    let contenders = contenders();
    record_allocations(&contenders);
    record_interleaved(&contenders);
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("fast_path/{threads}_threads"));
        group
            .sample_size(50)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for (name, get) in CONTENDERS {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                if threads == 1 {
                    b.iter(|| get(black_box(&contenders)));
                } else {
                    b.iter_custom(|iters| two_threads(&contenders, get, iters));
                }
            });
        }
        group.finish();
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    fast_path(&mut criterion);
    criterion.final_summary();
}
