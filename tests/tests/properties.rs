//! Model-based property tests of the coordinator (C1–C6, C9): proptest generates
//! scenarios (1–64 concurrent callers, interleavings, server answers, refresh outcomes,
//! cancellations, clock moves) and `tokenflight_tests::model::run` plays each one
//! deterministically, checking the contracts after every step.
//!
//! - `TOKENFLIGHT_PROPTEST_CASES=N` runs N cases per property (default 256).
//! - A failure prints the minimal (shrunk) scenario and the seed of the run;
//!   `TOKENFLIGHT_SCENARIO_SEED=<seed>` replays exactly that run.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use tokenflight_tests::model::{
    self, Initial, Lifetime, MAX_CALLERS, Op, Outcome, Scenario, Setup, Step, Summary, Which,
};

const DEFAULT_CASES: u32 = 256;

fn cases() -> u32 {
    std::env::var("TOKENFLIGHT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn seed() -> u64 {
    std::env::var("TOKENFLIGHT_SCENARIO_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        })
}

/// Runs `model::run` on scenarios from `strategy`; panics with the shrunk scenario and
/// the seed that reproduces the run. Returns the summed summaries of the passing cases.
fn check(name: &str, strategy: impl Strategy<Value = Scenario>) -> Summary {
    let seed = seed();
    let config = Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let total = std::cell::RefCell::new(Summary::default());
    let result = runner.run(&strategy, |scenario| {
        let summary = model::run(&scenario).map_err(|v| TestCaseError::fail(v.to_string()))?;
        add(&mut total.borrow_mut(), &summary);
        Ok(())
    });
    if let Err(error) = result {
        panic!(
            "{name}: {error}\n\nreproduce with: TOKENFLIGHT_SCENARIO_SEED={seed} \
             cargo test -p tokenflight-tests --test properties {name}"
        );
    }
    total.into_inner()
}

fn add(total: &mut Summary, s: &Summary) {
    total.callers += s.callers;
    total.cancelled += s.cancelled;
    total.source_calls += s.source_calls;
    total.source_successes += s.source_successes;
    total.requests += s.requests;
    total.resends += s.resends;
    total.errors += s.errors;
    total.polls += s.polls;
}

// ----- generators

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![
            Just(Initial::NoToken),
            Just(Initial::Valid),
            Just(Initial::Expired)
        ],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(initial, spawner, refresh_ahead, backoff)| Setup {
            initial,
            spawner,
            refresh_ahead,
            backoff,
        })
}

fn lifetime() -> impl Strategy<Value = Lifetime> {
    prop_oneof![
        1 => Just(Lifetime::Short),
        2 => Just(Lifetime::Minutes),
        4 => Just(Lifetime::Hour),
        1 => Just(Lifetime::Unknown),
    ]
}

fn outcome(failures: u32) -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => lifetime().prop_map(Outcome::Ok),
        failures => Just(Outcome::Transient),
        (failures / 2).max(1) => Just(Outcome::Permanent),
    ]
}

fn which() -> impl Strategy<Value = Which> {
    prop_oneof![
        Just(Which::Current),
        Just(Which::Previous),
        Just(Which::Newer)
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Second),
        2 => Just(Step::PastTimeout),
        1 => Just(Step::Hour),
    ]
}

/// A caller starting.
fn start() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(|replayable| Op::Send { replayable }),
        2 => Just(Op::Token),
        1 => which().prop_map(Op::Reject),
        1 => Just(Op::Force),
    ]
}

/// Relative weights of the kinds of operations.
#[derive(Clone, Copy)]
struct Weights {
    start: u32,
    poll: u32,
    settle: u32,
    respond: u32,
    reject_rate: u32,
    source: u32,
    failures: u32,
    cancel: u32,
    advance: u32,
    login: u32,
}

const MIXED: Weights = Weights {
    start: 4,
    poll: 8,
    settle: 2,
    respond: 4,
    reject_rate: 1,
    source: 3,
    failures: 2,
    cancel: 1,
    advance: 1,
    login: 1,
};

fn op(w: Weights) -> impl Strategy<Value = Op> {
    prop_oneof![
        w.start => start(),
        w.poll => any::<u8>().prop_map(Op::Poll),
        w.settle => Just(Op::Settle),
        w.respond => (any::<u8>(), prop::bool::weighted(1.0 / f64::from(1 + w.reject_rate)))
            .prop_map(|(n, accept)| Op::Respond { n, accept }),
        w.source => outcome(w.failures).prop_map(Op::Source),
        w.cancel => any::<u8>().prop_map(Op::Cancel),
        w.advance => step().prop_map(Op::Advance),
        w.login => Just(Op::Login),
    ]
}

/// A burst of 1–64 callers, then up to `len` operations of weights `w`.
fn scenario(w: Weights, len: usize) -> impl Strategy<Value = Scenario> {
    (
        setup(),
        prop::collection::vec(start(), 1..=MAX_CALLERS),
        prop::collection::vec(op(w), 0..len),
    )
        .prop_map(|(setup, burst, rest)| Scenario {
            setup,
            ops: burst.into_iter().chain(rest).collect(),
        })
}

// ----- properties

#[test]
fn c1_c2_c5_concurrent_callers_share_one_refresh() {
    let total = check(
        "c1_c2_c5_concurrent_callers_share_one_refresh",
        scenario(MIXED, 120),
    );
    assert!(
        total.source_successes > 0 && total.requests > 0,
        "{total:?}"
    );
}

#[test]
fn c3_c4_rejected_requests_are_resent_exactly_once() {
    let w = Weights {
        respond: 8,
        reject_rate: 2,
        failures: 1,
        ..MIXED
    };
    let total = check(
        "c3_c4_rejected_requests_are_resent_exactly_once",
        scenario(w, 160),
    );
    assert!(
        total.resends > 0,
        "the generator never made a resend: {total:?}"
    );
}

#[test]
fn c6_cancelling_any_caller_never_hangs_the_others() {
    let w = Weights { cancel: 4, ..MIXED };
    let total = check(
        "c6_cancelling_any_caller_never_hangs_the_others",
        scenario(w, 160),
    );
    assert!(total.cancelled > 0, "{total:?}");
}

#[test]
fn c5_c9_failures_reach_every_waiter_and_never_replace_a_valid_token() {
    let w = Weights {
        failures: 6,
        advance: 3,
        ..MIXED
    };
    let total = check(
        "c5_c9_failures_reach_every_waiter_and_never_replace_a_valid_token",
        scenario(w, 160),
    );
    assert!(
        total.errors > 0,
        "the generator never made a failure: {total:?}"
    );
}

// ----- hand-written scenarios: the runner itself sees what it should

#[test]
fn c1_c2_sixty_four_senders_on_no_token_make_one_source_call() {
    let mut ops = vec![Op::Send { replayable: true }; 64];
    ops.extend([
        Op::Settle,
        Op::Source(Outcome::Ok(Lifetime::Hour)),
        Op::Settle,
    ]);
    ops.extend(std::iter::repeat_n(Op::Respond { n: 0, accept: true }, 64));
    ops.push(Op::Settle);
    let summary = model::run(&Scenario {
        setup: Setup {
            initial: Initial::NoToken,
            spawner: false,
            refresh_ahead: false,
            backoff: false,
        },
        ops,
    })
    .unwrap();
    assert_eq!(summary.source_calls, 1);
    assert_eq!(summary.requests, 64);
    assert_eq!(summary.resends, 0);
}

#[test]
fn c4_every_rejected_sender_is_resent_once_after_one_refresh() {
    let mut ops = vec![Op::Send { replayable: true }; 10];
    ops.push(Op::Settle);
    // The server rejects all ten requests (they carry the initial token).
    ops.extend(std::iter::repeat_n(
        Op::Respond {
            n: 0,
            accept: false,
        },
        10,
    ));
    ops.extend([
        Op::Settle,
        Op::Source(Outcome::Ok(Lifetime::Hour)),
        Op::Settle,
    ]);
    let summary = model::run(&Scenario {
        setup: Setup {
            initial: Initial::Valid,
            spawner: false,
            refresh_ahead: false,
            backoff: false,
        },
        ops,
    })
    .unwrap();
    assert_eq!(summary.source_calls, 1);
    assert_eq!(summary.requests, 20);
    assert_eq!(summary.resends, 10);
}

#[test]
fn c6_cancelling_the_driver_leaves_the_refresh_to_the_next_waiter() {
    let ops = vec![
        Op::Token,
        Op::Token,
        Op::Settle,
        // Task 0 started and drives the refresh; it leaves mid-call.
        Op::Cancel(0),
        Op::Source(Outcome::Ok(Lifetime::Hour)),
        Op::Settle,
    ];
    let summary = model::run(&Scenario {
        setup: Setup {
            initial: Initial::Expired,
            spawner: false,
            refresh_ahead: false,
            backoff: false,
        },
        ops,
    })
    .unwrap();
    assert_eq!(summary.source_calls, 1);
    assert_eq!(summary.source_successes, 1);
    assert_eq!(summary.cancelled, 1);
}

#[test]
fn c10_a_hanging_source_times_out_for_every_waiter() {
    let mut ops = vec![Op::Token; 5];
    ops.extend([Op::Settle, Op::Advance(Step::PastTimeout), Op::Settle]);
    let summary = model::run(&Scenario {
        setup: Setup {
            initial: Initial::NoToken,
            spawner: true,
            refresh_ahead: false,
            backoff: true,
        },
        ops,
    })
    .unwrap();
    assert_eq!(summary.source_calls, 1);
    assert_eq!(summary.errors, 5);
}
