//! Regressions found by the model-based property tests (`tests/tests/properties.rs`) and
//! the `flight_ops` fuzz target: each test replays, by hand, the shrunk scenario that
//! found a bug, and says what the bug was.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::support::*;
use futures::FutureExt;
use tokenflight::{SingleFlight, Token, config::Backoff, test_util::ManualClock};

const LONG: Duration = Duration::from_secs(3600);

fn flight(
    clock: &ManualClock,
    source: &Arc<ScriptedSource>,
    spawner: Option<&QueueSpawner>,
) -> SingleFlight {
    let mut builder = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(Backoff::none())
        .retry(tokenflight::config::Retry::none())
        .refresh_ahead(None)
        .initial_token(
            Token::new("old")
                .expires_at(tokenflight::adapter::Clock::now(clock) - Duration::from_secs(1)),
        );
    if let Some(spawner) = spawner {
        builder = builder.spawner(Arc::new(spawner.clone()));
    }
    builder.build().unwrap()
}

fn login(clock: &ManualClock) -> Token {
    Token::new("login").expires_in(LONG, tokenflight::adapter::Clock::now(clock))
}

/// Found by the property tests: a login installed while a refresh was in flight got the
/// same generation as the refresh's token (the flight numbered its token when it
/// started), so two different tokens shared a generation and C3 could no longer tell
/// them apart. Generations are now unique and given when the token arrives.
///
/// Issue 13 (hole 2) then decided who wins: the login, the user's latest intent (C17).
/// The refresh that started before it is discarded; its waiter gets the login.
#[test]
fn c17_a_login_during_a_refresh_wins_and_keeps_a_generation_of_its_own() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source, None);
    let old = flight.current().unwrap();
    source.gate().close();
    let mut waiter = flight.token().boxed();
    assert!(poll_once(&mut waiter).is_pending());
    assert_eq!(source.calls(), 1);

    let installed = futures::executor::block_on(flight.install(login(&clock))).unwrap();
    assert!(installed.generation() > old.generation());
    source.gate().release();
    let got = futures::executor::block_on(waiter).unwrap();

    assert!(Arc::ptr_eq(&got, &installed));
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &installed));
}

/// Found by the property tests (C4): a caller whose login token (generation L) was
/// rejected joined a refresh started before the login; that refresh's token carried an
/// older generation than L, so the request was resent with a token the coordinator
/// itself counted as rejected. The refreshed token must supersede the rejected one.
#[test]
fn c4_a_rejected_login_is_superseded_by_the_refresh_it_joins() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source, None);
    source.gate().close();
    let mut first = flight.token().boxed();
    assert!(poll_once(&mut first).is_pending());

    let installed = futures::executor::block_on(flight.install(login(&clock))).unwrap();
    // The server rejects the login token; the caller joins the refresh in flight.
    let mut rejected = flight.token_after_rejection(installed.generation()).boxed();
    assert!(poll_once(&mut rejected).is_pending());
    assert_eq!(source.calls(), 1, "joined the refresh in flight");

    source.gate().release();
    let newer = futures::executor::block_on(rejected).unwrap();
    assert!(newer.generation() > installed.generation());
    assert!(
        flight
            .valid_token()
            .is_some_and(|t| Arc::ptr_eq(&t, &newer))
    );
    drop(first);
}

/// Found by the property tests (C2): a refresh handed to the spawner, then a login
/// before the spawned task first ran; the task still called the source for a token that
/// was no longer stale. A flight now checks, when it first runs, whether the token it
/// was started to replace has already been superseded.
#[test]
fn c2_a_spawned_refresh_superseded_by_a_login_calls_no_source() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let spawner = QueueSpawner::default();
    let flight = flight(&clock, &source, Some(&spawner));
    let old = flight.current().unwrap();
    // A request that cannot be resent was rejected: the refresh starts in the background.
    flight.mark_rejected(old.generation());
    let installed = futures::executor::block_on(flight.install(login(&clock))).unwrap();

    let tasks = spawner.take();
    assert_eq!(tasks.len(), 1);
    for mut task in tasks {
        assert_eq!(poll_once(&mut task), Poll::Ready(()));
    }
    assert_eq!(source.calls(), 0);
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &installed));
}
