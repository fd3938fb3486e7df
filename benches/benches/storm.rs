//! (b) and (c): N ∈ {1, 100, 10k, 100k} concurrent waiters on an expired token, on a
//! tokio multi-thread runtime with 2 workers. Criterion's time is the release time:
//! from the refresh's completion to the last waiter resumed. Source calls are asserted
//! to be 1 in every storm. Bytes per parked waiter are measured with a counting
//! allocator and saved for `bench-report`.
//!
//! At N = 10,000 and 100,000 criterion takes about ten storms per contender, one
//! contender after the other; the ratios of those means moved by ±15 % between runs.
//! So these two sizes are also run in interleaved rounds (every contender once per
//! round, the order reversed every other round), and each ratio is the median over the
//! rounds of the per-round ratio (`TOKENFLIGHT_BENCH_STORM_ROUNDS`, default 21).

use std::alloc::System;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokenflight_benches::extras::Extras;
use tokenflight_benches::peers::{ArrowTokenCache, RwLockRecheck, SmithyExpiringCache};
use tokenflight_benches::storm::{
    AsyncSingleflight, Contender, Moka, MutexAcrossRefresh, SharedFloor, SharedFloorWithHandle,
    Tokenflight, release_time, waiter_memory,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Waiter counts; the time budgets keep each group to a few seconds of wall time
/// (parking 100k tasks costs far more than it is timed for).
const SIZES: [(usize, Duration); 4] = [
    (1, Duration::from_millis(300)),
    (100, Duration::from_millis(300)),
    (10_000, Duration::from_millis(200)),
    (100_000, Duration::from_millis(200)),
];

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    }
}

fn bench_contender<C: Contender>(c: &mut Criterion, runtime: &tokio::runtime::Runtime) {
    for (waiters, budget) in SIZES {
        let mut group = c.benchmark_group(format!("storm/{waiters}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(budget / 4)
            .measurement_time(budget);
        group.bench_function(BenchmarkId::from_parameter(C::NAME), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| release_time::<C>(runtime, waiters))
                    .sum()
            });
        });
        group.finish();
    }
}

fn record_memory<C: Contender>(extras: &mut Extras, runtime: &tokio::runtime::Runtime) {
    for (waiters, _) in SIZES {
        let memory = waiter_memory::<C>(GLOBAL, runtime, waiters);
        let key = format!("storm/{waiters}/{}", C::NAME);
        extras.record(&format!("{key}/future_bytes"), memory.future_bytes as f64);
        extras.record(&format!("{key}/bytes_per_waiter"), memory.bytes_per_waiter);
        extras.record(
            &format!("{key}/allocations_per_waiter"),
            memory.allocations_per_waiter,
        );
        // Asserted inside every storm; recorded for the table.
        extras.record(&format!("{key}/source_calls"), 1.0);
    }
}

/// One storm of `C` with `waiters` waiters: its release time.
type Storm = fn(&tokio::runtime::Runtime, usize) -> Duration;

/// Every contender, by its name in the tables.
const STORMS: [(&str, Storm); 9] = [
    (SharedFloor::NAME, release_time::<SharedFloor>),
    (Tokenflight::NAME, release_time::<Tokenflight>),
    (Moka::NAME, release_time::<Moka>),
    (AsyncSingleflight::NAME, release_time::<AsyncSingleflight>),
    (MutexAcrossRefresh::NAME, release_time::<MutexAcrossRefresh>),
    (ArrowTokenCache::NAME, release_time::<ArrowTokenCache>),
    (
        SmithyExpiringCache::NAME,
        release_time::<SmithyExpiringCache>,
    ),
    (RwLockRecheck::NAME, release_time::<RwLockRecheck>),
    (
        SharedFloorWithHandle::NAME,
        release_time::<SharedFloorWithHandle>,
    ),
];

/// Interleaved rounds at N = 10,000 and 100,000: per round every contender's release
/// time; recorded, the median over the rounds of each peer's time ÷ tokenflight's and
/// of tokenflight's ÷ the floor's.
fn record_interleaved(extras: &mut Extras, runtime: &tokio::runtime::Runtime) {
    let rounds: usize = std::env::var("TOKENFLIGHT_BENCH_STORM_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(21);
    for waiters in [10_000, 100_000] {
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); STORMS.len()];
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..STORMS.len()).collect()
            } else {
                (0..STORMS.len()).rev().collect()
            };
            for index in order {
                let (_, storm) = STORMS[index];
                times[index].push(storm(runtime, waiters).as_secs_f64());
            }
        }
        let tokenflight = 1;
        for (index, (name, _)) in STORMS.iter().enumerate() {
            let reference = if index == tokenflight { 0 } else { tokenflight };
            let mut ratios: Vec<f64> = times[index]
                .iter()
                .zip(&times[reference])
                .map(|(me, reference)| me / reference.max(f64::MIN_POSITIVE))
                .collect();
            ratios.sort_by(f64::total_cmp);
            let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
            extras.record(&format!("storm/{waiters}/{name}/interleaved"), median);
        }
    }
}

fn storms(c: &mut Criterion) {
    let runtime = runtime();
    let mut extras = Extras::new();
    record_memory::<SharedFloor>(&mut extras, &runtime);
    record_memory::<Tokenflight>(&mut extras, &runtime);
    record_memory::<Moka>(&mut extras, &runtime);
    record_memory::<AsyncSingleflight>(&mut extras, &runtime);
    record_memory::<MutexAcrossRefresh>(&mut extras, &runtime);
    record_memory::<ArrowTokenCache>(&mut extras, &runtime);
    record_memory::<SmithyExpiringCache>(&mut extras, &runtime);
    record_memory::<RwLockRecheck>(&mut extras, &runtime);
    record_interleaved(&mut extras, &runtime);
    extras.save("storm");

    bench_contender::<SharedFloor>(c, &runtime);
    bench_contender::<Tokenflight>(c, &runtime);
    bench_contender::<Moka>(c, &runtime);
    bench_contender::<AsyncSingleflight>(c, &runtime);
    bench_contender::<MutexAcrossRefresh>(c, &runtime);
    bench_contender::<ArrowTokenCache>(c, &runtime);
    bench_contender::<SmithyExpiringCache>(c, &runtime);
    bench_contender::<RwLockRecheck>(c, &runtime);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    storms(&mut criterion);
    criterion.final_summary();
}
