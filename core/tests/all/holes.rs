//! Regression tests for the holes an adversarial review found (issue 13) and for the
//! lifetime-aware timing and in-flight retries (issue 12). Each test is named after the
//! contract it pins (C15–C18 in the crate docs) and says what used to go wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use crate::support::*;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenflight::{
    Error, FlightBuilder, RefreshContext, RefreshError, SingleFlight, Token, adapter::Clock,
    adapter::Timer, config::Backoff, config::FlightConfig, config::Retry, from_fn,
    store::MAX_GENERATION, store::MemoryStore, store::StoreError, store::StoreGuard,
    store::TokenStore, test_util::ManualClock,
};

const LONG: Duration = Duration::from_secs(3600);

fn now(clock: &ManualClock) -> SystemTime {
    Clock::now(clock)
}

fn builder(clock: &ManualClock, source: &Arc<ScriptedSource>) -> FlightBuilder {
    SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
}

/// Polls `fut` to completion, moving the manual clock `step` at a time while it is
/// pending (retry delays and budgets run on that clock).
fn drive<F: std::future::Future + Unpin>(
    fut: &mut F,
    clock: &ManualClock,
    step: Duration,
) -> F::Output {
    for _ in 0..10_000 {
        if let Poll::Ready(out) = poll_once(fut) {
            return out;
        }
        clock.advance(step);
    }
    panic!("the future did not complete within 10,000 clock steps");
}

/// A store for fault injection: an in-memory token plus switches that make a call fail,
/// hang or panic, and counters. Its guards share the switches (through the `Arc`).
#[derive(Default)]
struct FaultStore(Arc<Faults>);

#[derive(Default)]
struct Faults {
    token: Mutex<Option<Token>>,
    hang_load: std::sync::atomic::AtomicBool,
    hang_save: std::sync::atomic::AtomicBool,
    hang_unlock: std::sync::atomic::AtomicBool,
    panic_load: std::sync::atomic::AtomicBool,
    lease_lost: std::sync::atomic::AtomicBool,
    locks: AtomicUsize,
    saves_with_lock: AtomicUsize,
    loads: AtomicUsize,
}

impl std::ops::Deref for FaultStore {
    type Target = Faults;
    fn deref(&self) -> &Faults {
        &self.0
    }
}

impl FaultStore {
    fn holding(token: Token) -> Arc<Self> {
        let store = FaultStore::default();
        *store.token.lock().unwrap() = Some(token);
        Arc::new(store)
    }
}

impl Faults {
    fn stored(&self) -> Option<Token> {
        self.token.lock().unwrap().clone()
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.panic_load.load(Ordering::SeqCst) {
            panic!("store load panicked (test)");
        }
        let hang = self.hang_load.load(Ordering::SeqCst);
        let token = self.stored();
        Box::pin(async move {
            if hang {
                futures::future::pending::<()>().await;
            }
            Ok(token)
        })
    }
}

impl TokenStore for FaultStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.0.load()
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        self.locks.fetch_add(1, Ordering::SeqCst);
        let guard: Box<dyn StoreGuard> = Box::new(FaultGuard(self.0.clone()));
        Box::pin(async { Ok(guard) })
    }
}

struct FaultGuard(Arc<Faults>);

impl StoreGuard for FaultGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.0.load()
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        let faults = &self.0;
        faults.saves_with_lock.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if faults.hang_save.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if faults.lease_lost.load(Ordering::SeqCst) {
                return Err(StoreError::LeaseLost);
            }
            *faults.token.lock().unwrap() = Some(token.clone());
            Ok(())
        })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if self.0.hang_unlock.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            drop(self);
        })
    }
}

/// The documented timing table (C15) gives the window's upper bound; these tests pin
/// it exactly, so no per-replica jitter.
fn unjittered() -> FlightConfig {
    let mut config = FlightConfig::default();
    config.refresh_ahead_jitter = 0;
    config
}

fn other_session(clock: &ManualClock, generation: u64) -> Token {
    Token::new("other-account")
        .with_refresh("other-refresh")
        .expires_in(LONG, now(clock))
        .with_generation(generation)
}

fn login(clock: &ManualClock, lifetime: Duration) -> Token {
    Token::new("login")
        .with_refresh("login-refresh")
        .expires_in(lifetime, now(clock))
}

/// A coordinator whose initial login (a minute's lifetime, not saved yet) has just
/// expired, over `store`.
fn expired_login_over(
    clock: &ManualClock,
    source: &Arc<ScriptedSource>,
    store: &Arc<FaultStore>,
) -> SingleFlight {
    let flight = builder(clock, source)
        .store(store.clone())
        .initial_token(login(clock, Duration::from_secs(60)))
        .build()
        .unwrap();
    clock.advance(Duration::from_secs(61));
    flight
}

// ---- Hole 1: a login loses to an older session left in a persistent store ----

/// Before: `install` numbered the login from memory only, below a stored session of
/// generation 50, so the next flight adopted the other session.
#[test]
fn c17_install_is_numbered_above_the_store_and_saved_under_its_lock() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, 50));
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let installed = futures::executor::block_on(flight.install(login(&clock, LONG))).unwrap();
    assert!(installed.generation() > 50, "{}", installed.generation());
    assert_eq!(store.stored().unwrap().access().expose(), "login");
    assert_eq!(
        store.locks.load(Ordering::SeqCst),
        1,
        "install takes the store lock (hole 9)"
    );
    assert_eq!(store.saves_with_lock.load(Ordering::SeqCst), 1);
    assert_eq!(flight.current().unwrap().access().expose(), "login");
}

/// Before: an initial token got generation 1 and was never saved; the first flight
/// found the stored session (generation 50) "newer" and spent or adopted it.
#[test]
fn c17_an_initial_login_wins_over_an_older_session_in_the_store() {
    let clock = ManualClock::at_fixed_point();
    let store = FaultStore::holding(other_session(&clock, 50));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in_source = seen.clone();
    let source_clock = clock.clone();
    let flight = SingleFlight::builder()
        .source(from_fn(move |cx: RefreshContext| {
            let refresh = cx
                .previous
                .and_then(|p| p.refresh().map(|r| r.expose().to_owned()));
            seen_in_source.lock().unwrap().push(refresh);
            let at = now(&source_clock);
            async move {
                Ok(Token::new("fresh")
                    .with_refresh("fresh-refresh")
                    .expires_in(LONG, at))
            }
        }))
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .store(store.clone())
        .initial_token(login(&clock, Duration::from_secs(60)))
        .build()
        .unwrap();
    // The login is used at once.
    let first = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(first.access().expose(), "login");
    // It expires; the refresh must spend the login's refresh token, not the stored one.
    clock.advance(Duration::from_secs(61));
    let refreshed = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(refreshed.access().expose(), "fresh");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some("login-refresh".to_owned())]
    );
    assert!(refreshed.generation() > 50);
    assert_eq!(store.stored().unwrap().access().expose(), "fresh");
}

/// The login renumbered above the stored session keeps its secrets: a rejection of the
/// number it was sent with is a rejection of the renumbered token (no resend with the
/// same secret, C4).
#[test]
fn c4_a_rejection_of_a_renumbered_login_is_not_stale() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, 50));
    let flight = builder(&clock, &source)
        .store(store.clone())
        .initial_token(login(&clock, LONG))
        .build()
        .unwrap();
    let sent = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(sent.access().expose(), "login");
    let resend =
        futures::executor::block_on(flight.token_after_rejection(sent.generation())).unwrap();
    assert_eq!(source.calls(), 1);
    assert_eq!(resend.access().expose(), "token-1");
    assert!(resend.generation() > 50);
}

// ---- Hole 2: a refresh that started before a login overrides the login ----

/// What `login_during_refresh` leaves behind: the clock, the coordinator, the login,
/// the source, the number of auth-lost hook calls, and what the early waiter got.
type LoginRace = (
    ManualClock,
    SingleFlight,
    Arc<Token>,
    Arc<ScriptedSource>,
    Arc<AtomicUsize>,
    Result<Arc<Token>, Error>,
);

fn login_during_refresh(outcome: Step) -> LoginRace {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG)).then(outcome);
    let hooks = Arc::new(AtomicUsize::new(0));
    let hook_count = hooks.clone();
    let flight = builder(&clock, &source)
        .retry(Retry::none())
        .observer(on_auth_lost(move |_| {
            hook_count.fetch_add(1, Ordering::SeqCst);
        }))
        .build()
        .unwrap();
    source.gate().close();
    let mut waiter = flight.token().boxed();
    assert!(poll_once(&mut waiter).is_pending());
    assert_eq!(source.calls(), 1);
    let installed = futures::executor::block_on(flight.install(login(&clock, LONG))).unwrap();
    source.gate().release();
    let got = futures::executor::block_on(waiter);
    (clock, flight, installed, source, hooks, got)
}

/// Before: the refresh's token replaced the login (a regression test even pinned it).
#[test]
fn c17_a_successful_refresh_started_before_a_login_does_not_replace_it() {
    let (_clock, flight, installed, _source, _hooks, got) = login_during_refresh(Step::Ok(LONG));
    assert!(
        Arc::ptr_eq(&got.unwrap(), &installed),
        "the waiter gets the login"
    );
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &installed));
}

/// Before: the pre-login refresh's permanent failure entered "re-authentication
/// required" right after the login and fired the hook.
#[test]
fn c17_a_permanent_failure_started_before_a_login_does_not_fail_it() {
    let (_clock, flight, installed, _source, hooks, got) = login_during_refresh(Step::Permanent);
    assert!(Arc::ptr_eq(&got.unwrap(), &installed));
    assert!(!flight.is_auth_lost());
    assert_eq!(hooks.load(Ordering::SeqCst), 0);
    let next = futures::executor::block_on(flight.token()).unwrap();
    assert!(Arc::ptr_eq(&next, &installed));
}

/// Before: the pre-login refresh's transient failure put the login in backoff.
#[test]
fn c17_a_transient_failure_started_before_a_login_does_not_back_it_off() {
    let (_clock, flight, installed, source, _hooks, got) = login_during_refresh(Step::Transient);
    assert!(Arc::ptr_eq(&got.unwrap(), &installed));
    // The login is rejected: a refresh runs at once (no backoff left by the old flight).
    let newer =
        futures::executor::block_on(flight.token_after_rejection(installed.generation())).unwrap();
    assert!(newer.generation() > installed.generation());
    assert_eq!(source.calls(), 2);
}

// ---- Hole 3: "re-authentication required" ignores a login saved by another replica ----

#[test]
fn c17_auth_lost_notices_a_login_saved_to_the_shared_store() {
    let clock = ManualClock::at_fixed_point();
    let store = Arc::new(MemoryStore::new());
    let lost_source = ScriptedSource::new(&clock, Step::Permanent);
    let replica_a = builder(&clock, &lost_source)
        .store(store.clone())
        .build()
        .unwrap();
    let other_source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let replica_b = builder(&clock, &other_source)
        .store(store.clone())
        .build()
        .unwrap();

    let failed = futures::executor::block_on(replica_a.token());
    assert!(matches!(
        failed,
        Err(Error::ReauthenticationRequired { .. })
    ));
    assert!(replica_a.is_auth_lost());
    // Replica B logs in; A was never told.
    let installed = futures::executor::block_on(replica_b.install(login(&clock, LONG))).unwrap();
    // Within the minimum interval A still fails fast, without a store call per request.
    assert!(matches!(
        futures::executor::block_on(replica_a.token()),
        Err(Error::ReauthenticationRequired { .. })
    ));
    clock.advance(FlightConfig::default().min_refresh_interval);
    let adopted = futures::executor::block_on(replica_a.token()).unwrap();
    assert_eq!(adopted.access().expose(), "login");
    assert_eq!(adopted.generation(), installed.generation());
    assert!(!replica_a.is_auth_lost());
    assert_eq!(replica_a.stats().store_reloads, 1);
    assert_eq!(lost_source.calls(), 1, "a reload never calls the source");
}

/// Wave 5's fuzz finding 3, one step further: once "re-authentication required" has
/// adopted another replica's login over a login of its own that was never saved (its
/// save was refused, then its refresh failed for good), that lost login is gone. The
/// next refresh adopts what the fleet saved meanwhile, and never saves the lost login
/// over it. (Before the mend, the mark "a login is not saved yet" outlived the adoption:
/// stored sessions stayed ignored and the next flight saved the dead login, renumbered
/// above the fleet's newer session.)
#[test]
fn c17_a_lost_unsaved_login_is_never_saved_after_a_replica_login_replaced_it() {
    let clock = ManualClock::at_fixed_point();
    let store = FaultStore::holding(other_session(&clock, 50));
    store.lease_lost.store(true, Ordering::SeqCst);
    let source = ScriptedSource::new(&clock, Step::Permanent);
    let flight = expired_login_over(&clock, &source, &store);
    // Its save is refused, its refresh fails for good.
    assert!(matches!(
        futures::executor::block_on(flight.token()),
        Err(Error::ReauthenticationRequired { .. })
    ));
    assert_eq!(store.stored().unwrap().access().expose(), "other-account");
    // Another replica logs in and saves.
    store.lease_lost.store(false, Ordering::SeqCst);
    let replica_login = |access: &str, generation: u64| {
        Token::new(access)
            .with_refresh(format!("{access}-refresh"))
            .expires_in(Duration::from_secs(60), now(&clock))
            .with_generation(generation)
    };
    *store.token.lock().unwrap() = Some(replica_login("replica-login", 100));
    clock.advance(FlightConfig::default().min_refresh_interval);
    let adopted = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(adopted.access().expose(), "replica-login");
    // The fleet refreshes it (another replica); ours expires.
    clock.advance(Duration::from_secs(30));
    *store.token.lock().unwrap() = Some(replica_login("replica-refreshed", 101));
    clock.advance(Duration::from_secs(31));
    let next = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(next.access().expose(), "replica-refreshed");
    assert_eq!(next.generation(), 101);
    assert_eq!(
        store.stored().unwrap().access().expose(),
        "replica-refreshed",
        "the lost login is not saved over the fleet's session"
    );
    assert_eq!(
        source.calls(),
        1,
        "the fleet's token is adopted, not fetched"
    );
}

// ---- Hole 4: store calls are not bounded ----

fn budget_flight(
    clock: &ManualClock,
    source: &Arc<ScriptedSource>,
    store: &Arc<FaultStore>,
) -> SingleFlight {
    builder(clock, source)
        .store(store.clone())
        .refresh_timeout(Duration::from_secs(5))
        .retry(Retry::none())
        .build()
        .unwrap()
}

#[test]
fn c10_a_hanging_store_load_is_bounded_by_the_flight_budget() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = Arc::new(FaultStore::default());
    store.hang_load.store(true, Ordering::SeqCst);
    let flight = budget_flight(&clock, &source, &store);
    let mut a = flight.token().boxed();
    let mut b = flight.token().boxed();
    assert!(poll_once(&mut a).is_pending() && poll_once(&mut b).is_pending());
    clock.advance(Duration::from_secs(5));
    for waiter in [&mut a, &mut b] {
        match poll_once(waiter) {
            Poll::Ready(Err(Error::Refresh(e))) => {
                assert!(e.cause() == tokenflight::Cause::Timeout)
            }
            other => panic!("expected a timeout, got {:?}", other.map(|r| r.map(|_| ()))),
        }
    }
    assert_eq!(source.calls(), 0);
}

/// A timer whose sleeps panic when polled after they completed, as an `async fn`'s
/// future does (tokio's and async-std's sleeps are such futures).
struct StrictTimer(ManualClock);

impl Timer for StrictTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let sleep = self.0.sleep(duration);
        // The async block is the point: its future panics if polled after completion.
        #[allow(clippy::redundant_async_block)]
        Box::pin(async move { sleep.await })
    }
}

#[test]
fn c10_a_hanging_save_or_unlock_keeps_the_issued_token_within_the_budget() {
    for hang_save in [true, false] {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(LONG));
        let store = Arc::new(FaultStore::default());
        store.hang_save.store(hang_save, Ordering::SeqCst);
        store.hang_unlock.store(!hang_save, Ordering::SeqCst);
        // The budget's sleep fires during the save, then the unlock races it again: it
        // must not be polled after it completed.
        let flight = builder(&clock, &source)
            .store(store.clone())
            .timer(Arc::new(StrictTimer(clock.clone())))
            .refresh_timeout(Duration::from_secs(5))
            .retry(Retry::none())
            .build()
            .unwrap();
        let mut waiter = flight.token().boxed();
        let token = drive(&mut waiter, &clock, Duration::from_secs(1)).unwrap();
        assert_eq!(token.access().expose(), "token-1", "hang_save={hang_save}");
        assert!(clock.elapsed() <= Duration::from_secs(5));
    }
}

// ---- Hole 5: a panic outside the source poisons the flight ----

#[test]
fn c18_a_panicking_hook_gives_every_waiter_a_typed_error() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Permanent);
    let flight = builder(&clock, &source)
        .observer(on_auth_lost(|_| panic!("hook panicked (test)")))
        .build()
        .unwrap();
    source.gate().close();
    let mut a = flight.token().boxed();
    let mut b = flight.token().boxed();
    assert!(poll_once(&mut a).is_pending() && poll_once(&mut b).is_pending());
    source.gate().release();
    for waiter in [a, b] {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(waiter)
        }));
        assert!(matches!(
            result,
            Ok(Err(Error::ReauthenticationRequired { .. }))
        ));
    }
}

#[test]
fn c18_a_panicking_store_gives_every_waiter_a_typed_error() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = Arc::new(FaultStore::default());
    store.panic_load.store(true, Ordering::SeqCst);
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let a = flight.token();
    let b = flight.token();
    let both = futures::executor::block_on(futures::future::join(a, b));
    // The first caller ran the flight to its end on its first poll; the second then met
    // the backoff that followed. Both get the same typed error, nobody panics.
    for result in [both.0, both.1] {
        match result {
            Err(e) => assert!(e.refresh_error().cause() == tokenflight::Cause::Panicked),
            Ok(_) => panic!("expected Panicked"),
        }
    }
    // Contained, not fatal: once the store behaves, the next caller gets a token.
    store.panic_load.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(120));
    assert!(futures::executor::block_on(flight.token()).is_ok());
}

struct PanickingTimer;

impl Timer for PanickingTimer {
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        panic!("timer panicked (test)")
    }
}

struct PanickingClock;

impl Clock for PanickingClock {
    fn now(&self) -> SystemTime {
        panic!("clock panicked (test)")
    }
}

#[test]
fn c18_a_panicking_timer_or_clock_never_panics_a_caller() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = builder(&clock, &source)
        .timer(Arc::new(PanickingTimer))
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        futures::executor::block_on(flight.token())
    }));
    match result {
        Ok(Err(Error::Refresh(e))) => assert!(e.cause() == tokenflight::Cause::Panicked),
        other => panic!("expected Panicked, got {:?}", other.map(|r| r.map(|_| ()))),
    }

    let flight = builder(&clock, &source)
        .clock(Arc::new(PanickingClock))
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        futures::executor::block_on(flight.token())
    }));
    assert!(
        matches!(result, Ok(Ok(_))),
        "a clock that panics reads as the epoch"
    );
}

// ---- Holes 6 and 7: Retry-After and wall-clock steps vs backoff ----

fn backoff_flight(clock: &ManualClock, source: &Arc<ScriptedSource>) -> SingleFlight {
    builder(clock, source)
        .retry(Retry::none())
        .backoff(Backoff::new(Duration::from_secs(10), Duration::from_secs(60)).with_jitter(0.0))
        .build()
        .unwrap()
}

struct RetryAfterSource(Duration, AtomicUsize);

impl tokenflight::TokenSource for RetryAfterSource {
    fn fetch(&self, _: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let error = RefreshError::transient("429").with_retry_after(self.0);
        Box::pin(async move { Err(error) })
    }
}

/// Before: `Retry-After: <absurd>` overflowed the deadline, which fell back to "now":
/// backoff switched off and every caller hit the token endpoint.
#[test]
fn c16_a_huge_retry_after_is_capped_not_ignored() {
    let clock = ManualClock::at_fixed_point();
    let source = Arc::new(RetryAfterSource(Duration::MAX, AtomicUsize::new(0)));
    let flight = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .retry(Retry::none())
        .build()
        .unwrap();
    assert!(futures::executor::block_on(flight.token()).is_err());
    match futures::executor::block_on(flight.token()) {
        Err(Error::BackingOff { remaining, .. }) => {
            assert!(
                remaining <= Backoff::default().max_retry_after
                    && remaining > Duration::from_secs(60)
            );
        }
        other => panic!("expected BackingOff, got {:?}", other.map(|_| ())),
    }
    assert_eq!(source.1.load(Ordering::SeqCst), 1);
    clock.advance(Backoff::default().max_retry_after);
    let _ = futures::executor::block_on(flight.token());
    assert_eq!(
        source.1.load(Ordering::SeqCst),
        2,
        "tried again once the cap passed"
    );
}

/// Before: the backoff deadline was a wall-clock time: a step back stretched it by the
/// size of the step, a step forward cancelled it.
#[test]
fn c16_wall_clock_steps_neither_stretch_nor_cancel_backoff() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Transient);
    let flight = backoff_flight(&clock, &source);
    assert!(futures::executor::block_on(flight.token()).is_err());
    clock.step_wall_forward(Duration::from_secs(3600));
    assert!(matches!(
        futures::executor::block_on(flight.token()),
        Err(Error::BackingOff { .. })
    ));
    clock.step_wall_back(Duration::from_secs(7200));
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        futures::executor::block_on(flight.token()),
        Err(Error::Refresh(_))
    ));
    assert_eq!(
        source.calls(),
        2,
        "the backoff ended after 10 s of monotonic time"
    );
}

// ---- Hole 8: generations saturate ----

#[test]
fn c3_a_huge_stored_generation_neither_saturates_nor_is_adopted() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, u64::MAX - 1));
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(
        first.access().expose(),
        "token-1",
        "the corrupt record is not adopted"
    );
    assert!(first.generation() <= MAX_GENERATION + 1);
    let second =
        futures::executor::block_on(flight.token_after_rejection(first.generation())).unwrap();
    assert!(second.generation() > first.generation());
    assert_eq!(second.access().expose(), "token-2");
    // A third rejection still refreshes once: no refresh per request.
    let third =
        futures::executor::block_on(flight.token_after_rejection(second.generation())).unwrap();
    assert!(third.generation() > second.generation());
    assert_eq!(source.calls(), 3);
    let stale =
        futures::executor::block_on(flight.token_after_rejection(first.generation())).unwrap();
    assert!(Arc::ptr_eq(&stale, &third));
    assert_eq!(source.calls(), 3);
}

// ---- Hole 9: LeaseLost on save throws the issued token away ----

#[test]
fn c6_lease_lost_on_save_keeps_the_token_the_server_issued() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = Arc::new(FaultStore::default());
    store.lease_lost.store(true, Ordering::SeqCst);
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "token-1");
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &token));
}

// ---- Issue 12: timing that fits the lifetime, retries inside the flight ----

/// Before: with the 30 s leeway and 2 min refresh-ahead, a 2-second token was born
/// expired and every request wave refreshed. Now once per minimum refresh interval
/// (1 s): the leeway of a 2 s token (`L / 10` plus the second of `expires_in`'s
/// granularity) covers all of its life after that interval — which is how long such a
/// token may live on a server that rounded its issue time down.
#[test]
fn c15_a_two_second_token_is_refreshed_once_per_second_never_per_request() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(2)));
    let flight = builder(&clock, &source)
        .config(unjittered())
        .build()
        .unwrap();
    // 10 lifetimes, 100 calls per 100 ms.
    for _ in 0..200 {
        for _ in 0..100 {
            futures::executor::block_on(flight.token()).unwrap();
        }
        clock.advance(Duration::from_millis(100));
    }
    let calls = source.calls();
    // One call per second over 20 s (the first included), never one per request.
    assert!(
        (19..=21).contains(&calls),
        "{calls} source calls in 10 lifetimes"
    );
}

#[test]
fn c15_a_token_born_expired_is_used_and_refreshed_at_most_once_per_interval() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::ZERO));
    let flight = builder(&clock, &source).build().unwrap();
    for _ in 0..100 {
        let token = futures::executor::block_on(flight.token()).unwrap();
        assert_eq!(token.access().expose(), "token-1");
    }
    assert_eq!(source.calls(), 1);
    clock.advance(FlightConfig::default().min_refresh_interval);
    for _ in 0..100 {
        futures::executor::block_on(flight.token()).unwrap();
    }
    assert_eq!(source.calls(), 2);
    // A rejection of the newest token is not limited.
    let newest = flight.current().unwrap();
    futures::executor::block_on(flight.token_after_rejection(newest.generation())).unwrap();
    assert_eq!(source.calls(), 3);
}

#[test]
fn c16_transient_failures_are_retried_inside_one_flight() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG))
        .then(Step::Transient)
        .then(Step::Transient);
    let flight = builder(&clock, &source).build().unwrap();
    let mut a = flight.token().boxed();
    let mut b = flight.token().boxed();
    assert!(poll_once(&mut b).is_pending());
    let token = drive(&mut a, &clock, Duration::from_millis(50)).unwrap();
    assert!(
        Arc::ptr_eq(&token, &futures::executor::block_on(b).unwrap()),
        "one outcome (C5)"
    );
    let stats = flight.stats();
    assert_eq!(
        (stats.flights, stats.source_calls, stats.attempt_retries),
        (1, 3, 2)
    );
}

#[test]
fn c16_permanent_failures_are_never_retried() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Permanent);
    let flight = builder(&clock, &source).build().unwrap();
    assert!(matches!(
        futures::executor::block_on(flight.token()),
        Err(Error::ReauthenticationRequired { .. })
    ));
    assert_eq!(source.calls(), 1);
}

/// A refresh fails while the old token is inside its leeway but not yet expired: the
/// callers who waited get the old token rather than an error, and so do callers during
/// the backoff that follows.
#[test]
fn c16_no_caller_fails_while_a_usable_token_exists() {
    let clock = ManualClock::at_fixed_point();
    let source =
        ScriptedSource::new(&clock, Step::Transient).then(Step::Ok(Duration::from_secs(60)));
    let flight = builder(&clock, &source)
        .retry(Retry::none())
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    // 57 s: past refresh-ahead (20 s before) and inside the 6 s leeway, not expired.
    clock.advance(Duration::from_secs(57));
    let got = futures::executor::block_on(flight.token()).unwrap();
    assert!(Arc::ptr_eq(&got, &first));
    let again = futures::executor::block_on(flight.token()).unwrap();
    assert!(Arc::ptr_eq(&again, &first), "during the backoff too");
    clock.advance(Duration::from_secs(4));
    assert!(
        futures::executor::block_on(flight.token()).is_err(),
        "expired: now it fails"
    );
}

/// A permanent failure (`invalid_grant`) while the old token is inside its leeway but
/// not yet expired: every caller gets the old token until it really expires, not only
/// the ones who waited for the failed flight. (The fail-fast answer of
/// "re-authentication required" used to come before the look at the still-valid token,
/// so the next caller at the same instant got an error.)
#[test]
fn c16_a_permanent_failure_inside_the_leeway_serves_the_token_until_it_expires() {
    let clock = ManualClock::at_fixed_point();
    let source =
        ScriptedSource::new(&clock, Step::Permanent).then(Step::Ok(Duration::from_secs(60)));
    let lost = Arc::new(AtomicUsize::new(0));
    let hook = Arc::clone(&lost);
    let flight = builder(&clock, &source)
        .observer(on_auth_lost(move |_| {
            hook.fetch_add(1, Ordering::SeqCst);
        }))
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    // 57 s: past refresh-ahead and inside the 6 s leeway, not expired.
    clock.advance(Duration::from_secs(57));
    let waited = futures::executor::block_on(flight.token()).unwrap();
    assert!(Arc::ptr_eq(&waited, &first), "the flight's waiter");
    assert_eq!(source.calls(), 2);
    assert!(flight.is_auth_lost());
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        let next = futures::executor::block_on(flight.token()).unwrap();
        assert!(Arc::ptr_eq(&next, &first), "a caller after the failure");
    }
    clock.advance(Duration::from_secs(2));
    let later = futures::executor::block_on(flight.token()).unwrap();
    assert!(Arc::ptr_eq(&later, &first), "still not expired");
    assert_eq!(source.calls(), 2, "no second call of a source that said no");
    clock.advance(Duration::from_secs(2));
    assert!(
        matches!(
            futures::executor::block_on(flight.token()),
            Err(Error::ReauthenticationRequired { .. })
        ),
        "expired: now re-authentication is required"
    );
    assert_eq!(lost.load(Ordering::SeqCst), 1, "the hook fired once");
}

#[test]
fn c16_refresh_ahead_failures_are_invisible() {
    let clock = ManualClock::at_fixed_point();
    let source =
        ScriptedSource::new(&clock, Step::Transient).then(Step::Ok(Duration::from_secs(60)));
    let flight = builder(&clock, &source)
        .config(unjittered())
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    clock.advance(Duration::from_secs(45)); // inside the 20 s window
    for _ in 0..10 {
        let mut call = flight.token().boxed();
        let got = drive(&mut call, &clock, Duration::from_millis(10)).unwrap();
        assert!(Arc::ptr_eq(&got, &first));
    }
    let calls = source.calls();
    assert!(
        (2..=1 + 2 * 3).contains(&calls),
        "{calls}: at most one flight per backoff step"
    );
}

#[test]
fn c15_a_clock_stepped_back_does_not_refresh_per_request() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(60)));
    let flight = builder(&clock, &source).build().unwrap();
    futures::executor::block_on(flight.token()).unwrap();
    clock.step_wall_forward(Duration::from_secs(3600));
    for _ in 0..50 {
        futures::executor::block_on(flight.token()).unwrap();
    }
    assert_eq!(
        source.calls(),
        2,
        "one refresh for the step forward, then the new token"
    );
    clock.step_wall_back(Duration::from_secs(7200));
    for _ in 0..50 {
        futures::executor::block_on(flight.token()).unwrap();
    }
    assert_eq!(
        source.calls(),
        2,
        "a token from the future is young, not expired"
    );
}

#[test]
fn c16_budget_bounds_the_retries() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Hang);
    let flight = builder(&clock, &source)
        .refresh_timeout(Duration::from_secs(25))
        .attempt_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut waiter = flight.token().boxed();
    let result = drive(&mut waiter, &clock, Duration::from_millis(500));
    assert!(
        matches!(result, Err(Error::Refresh(ref e)) if e.cause() == tokenflight::Cause::Timeout)
    );
    assert!(clock.elapsed() <= Duration::from_secs(25) + Duration::from_millis(500));
    assert!(source.calls() <= 3);
}

/// The table in `FlightConfig`'s docs, observed on a coordinator: the time after issue
/// at which the refresh-ahead call happens, for every lifetime in the table.
#[test]
fn c15_the_documented_table_holds_on_a_coordinator() {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    // (lifetime, the refresh starts after)
    let table = [
        (s(1), s(1)),     // the minimum refresh interval comes first
        (s(2), s(1)),     // here too
        (s(3), ms(1700)), // the leeway: the window lies inside it
        (s(10), ms(6667)),
        (s(60), s(40)),
        (s(300), s(200)),
        (s(3600), s(3375)),
        (s(86_400), s(86_175)),
    ];
    for (lifetime, expected) in table {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(lifetime));
        let flight = builder(&clock, &source)
            .config(unjittered())
            .build()
            .unwrap();
        futures::executor::block_on(flight.token()).unwrap();
        let step = (lifetime / 1000).max(ms(1));
        let mut waited = Duration::ZERO;
        while source.calls() == 1 && waited < lifetime * 2 {
            clock.advance(step);
            waited += step;
            futures::executor::block_on(flight.token()).unwrap();
        }
        assert_eq!(source.calls(), 2, "L = {lifetime:?}");
        assert!(
            waited.abs_diff(expected) <= step,
            "L = {lifetime:?}: refreshed after {waited:?}, documented {expected:?}"
        );
    }
}

// ---- Issue 20: per-replica store work stays flat in a fleet ----

/// Before: every replica took the store's lock each refresh cycle even when another
/// replica had already saved the next token, so lock traffic grew with the fleet. A
/// newer usable stored token is now adopted with one read and no lock.
#[test]
fn issue20_a_newer_usable_stored_token_is_adopted_without_the_lock() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, 50));
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(first.generation(), 50);
    assert_eq!(
        store.locks.load(Ordering::SeqCst),
        0,
        "no lock for an adoption"
    );
    assert_eq!(source.calls(), 0);
    // Another replica refreshes (generation 51) once ours expired: adopted, no lock.
    clock.advance(LONG + Duration::from_secs(1));
    *store.token.lock().unwrap() = Some(other_session(&clock, 51));
    let second = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(second.generation(), 51);
    assert_eq!(
        store.locks.load(Ordering::SeqCst),
        0,
        "no lock for an adoption"
    );
    assert_eq!(source.calls(), 0);
    assert_eq!(flight.stats().adopted, 2);
}

/// The unlocked read never adopts a token that is not newer, a corrupt generation, or
/// anything while a login is unsaved: those go through the lock (and the source).
#[test]
fn issue20_the_unlocked_read_keeps_every_guard() {
    // A corrupt stored generation: lock + source call.
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, MAX_GENERATION + 1));
    let flight = builder(&clock, &source)
        .store(store.clone())
        .build()
        .unwrap();
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert!(token.generation() < MAX_GENERATION);
    assert_eq!(
        store.locks.load(Ordering::SeqCst),
        1,
        "a corrupt generation is not adopted"
    );
    assert_eq!(source.calls(), 1);

    // An unsaved login: the stored session (however high) is never adopted.
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = FaultStore::holding(other_session(&clock, 50));
    let flight = expired_login_over(&clock, &source, &store);
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_ne!(token.access().expose(), "other-account");
    assert_eq!(flight.stats().adopted, 0);
}

/// The jittered refresh-ahead start stays inside the documented window: never earlier
/// than the table says (225 s before expiry for a 1 h token), at most half the window
/// later (112.5 s before expiry) with the default jitter.
#[test]
fn issue20_jittered_refresh_ahead_starts_inside_the_window() {
    for _ in 0..20 {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(LONG));
        let flight = builder(&clock, &source).build().unwrap();
        futures::executor::block_on(flight.token()).unwrap();
        assert_eq!(source.calls(), 1);
        // Just before the window's upper bound: no refresh yet.
        clock.advance(LONG - Duration::from_secs(226));
        futures::executor::block_on(flight.token()).unwrap();
        assert_eq!(source.calls(), 1, "refresh-ahead started before the window");
        // Past the latest jittered start: the refresh ran (the caller drives it).
        clock.advance(Duration::from_secs(226 - 112));
        futures::executor::block_on(flight.token()).unwrap();
        assert_eq!(
            source.calls(),
            2,
            "refresh-ahead did not start by half the window"
        );
    }
}

/// A source whose access token has a control character (an OAuth 2.0 parser accepts any
/// JSON string) gives a typed error for that attempt, never a token that every request
/// then fails to carry: the next attempt's good token serves, and with no attempt left
/// the callers get the error (transient: the source is asked again after the backoff).
/// Tokens the store holds or pushes with such characters are ignored as corrupt. (Such a
/// token used to be served until it expired: every request failed with `InvalidHeader`,
/// and no server ever rejected it to start a refresh.)
#[test]
fn c13_an_access_token_no_request_can_carry_is_refused_where_it_arrives() {
    let clock = ManualClock::at_fixed_point();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let answers = ["bad\u{1}token", "caf\u{e9}", "good-token"];
    let source = from_fn(move |_cx| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        let access = answers.get(n).copied().unwrap_or("good-token");
        async move { Ok(Token::new(access)) }
    });
    let flight = SingleFlight::builder()
        .source(source)
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .retry(Retry::new(2, Backoff::none()))
        .build()
        .unwrap();
    let error = match futures::executor::block_on(flight.token()) {
        Err(Error::Refresh(error)) => error,
        other => panic!("expected a transient refresh error, got {other:?}"),
    };
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "both attempts of the flight"
    );
    let message = format!("{error} {error:?}");
    assert!(message.contains("no HTTP request can carry"), "{message}");
    assert!(
        !message.contains("bad") && !message.contains("caf"),
        "{message}"
    );
    assert!(flight.current().is_none(), "neither bad token was kept");
    // After the backoff the source is asked again, and its good token serves.
    clock.advance(Duration::from_secs(600));
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "good-token");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // The store's copy with a control character is ignored; the source's token serves.
    let store = Arc::new(MemoryStore::new());
    futures::executor::block_on(async {
        let guard = store.lock().await.unwrap();
        guard
            .save(&Token::new("stored\u{7f}").with_generation(5))
            .await
            .unwrap();
        guard.unlock().await;
    });
    let flight = SingleFlight::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("fresh")) }))
        .store(store)
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "fresh");
}

/// A server that issues "3 s" tokens in whole seconds of `expires_in`, rounding the
/// issue time down (as standards-compliant servers do), so a token may live only 2 s
/// on the server: neither a send nor the resend after a stale rejection ever carries a
/// token the server already counts as expired, with refresh-ahead on or off. (With a
/// leeway of a tenth of the lifetime, 0.3 s, both did for up to 0.7 s per lifetime;
/// under load the resend of a slow request's stale rejection reached callers as 401s.)
#[test]
fn c7_c15_short_tokens_are_never_sent_after_a_whole_second_server_expired_them() {
    for refresh_ahead in [FlightConfig::default().refresh_ahead, None] {
        let clock = ManualClock::at_fixed_point();
        // Issued late in a second: the server's expiry is 2.01 s after the client's issue.
        clock.advance(Duration::from_millis(990));
        let server_expiry = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let issued = Arc::clone(&server_expiry);
        let source_clock = clock.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let source = from_fn(move |_cx| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let now = now(&source_clock);
            let whole = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let access = format!("token-{n}");
            issued.lock().unwrap().insert(
                access.clone(),
                SystemTime::UNIX_EPOCH + Duration::from_secs(whole + 3),
            );
            let token = Token::new(access).expires_in(Duration::from_secs(3), now);
            async move { Ok(token) }
        });
        let mut config = FlightConfig::default();
        config.refresh_ahead = refresh_ahead;
        let flight = SingleFlight::builder()
            .source(source)
            .config(config)
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let valid_on_server = |token: &Token| {
            let expiry = server_expiry.lock().unwrap()[token.access().expose()];
            now(&clock) < expiry
        };
        for step in 0..1_000 {
            let sent = futures::executor::block_on(flight.token()).unwrap();
            assert!(
                valid_on_server(&sent),
                "refresh-ahead {refresh_ahead:?}, {} ms: sent an expired token",
                step * 10
            );
            // A request that carried an older token comes back rejected: it is resent
            // with the current token, which must be just as valid.
            let resent = futures::executor::block_on(flight.token_after_rejection(0)).unwrap();
            assert!(
                valid_on_server(&resent),
                "refresh-ahead {refresh_ahead:?}, {} ms: resent with an expired token",
                step * 10
            );
            clock.advance(Duration::from_millis(10));
        }
        // C15 still holds: a refresh every ~1.7 s of the 10 s, never one per request.
        let calls = calls.load(Ordering::SeqCst);
        assert!((5..=8).contains(&calls), "{calls} source calls in 10 s");
    }
}
