//! Issue 20: a store that pushes saved tokens (`TokenStore::watch`, `StoreWatcher`).
//! A coordinator adopts a pushed token at once — without its source, the store's lock
//! or a read — by the rule of its unlocked read: only a usable token newer than the
//! one it holds, never over a login not yet saved (C17); a push that supersedes a flight
//! waiting for the store's lock ends it (a forced refresh excepted); and a push never
//! breaks single flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use crate::support::*;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenflight::{
    Error, SingleFlight, Token, adapter::Clock, config::FlightConfig, store::MAX_GENERATION,
    store::StoreError, store::StoreGuard, store::StoreWatcher, store::TokenStore,
    test_util::ManualClock,
};

const LONG: Duration = Duration::from_secs(3600);

fn now(clock: &ManualClock) -> SystemTime {
    Clock::now(clock)
}

/// A token "saved by another replica": numbered, valid for an hour.
fn saved(clock: &ManualClock, access: &str, generation: u64) -> Token {
    Token::new(access)
        .with_refresh(format!("{access}-refresh"))
        .expires_in(LONG, now(clock))
        .with_generation(generation)
}

/// An in-memory store that pushes every save to its watchers, as `RedisStore` does
/// through pub/sub; `saved_elsewhere` is another replica's save. Its lock and load can
/// be held at gates, and it counts what the coordinator asks of it. Its guards share its
/// state (through the `Arc`).
struct PushingStore(Arc<PushState>);

impl std::ops::Deref for PushingStore {
    type Target = PushState;
    fn deref(&self) -> &PushState {
        &self.0
    }
}

struct PushState {
    token: Mutex<Option<Token>>,
    watchers: Mutex<Vec<Weak<dyn StoreWatcher>>>,
    loads: AtomicUsize,
    locks: AtomicUsize,
    lock_gate: Gate,
    load_gate: Gate,
}

impl PushingStore {
    fn new() -> Arc<Self> {
        Arc::new(PushingStore(Arc::new(PushState {
            token: Mutex::new(None),
            watchers: Mutex::new(Vec::new()),
            loads: AtomicUsize::new(0),
            locks: AtomicUsize::new(0),
            lock_gate: Gate::open(),
            load_gate: Gate::open(),
        })))
    }

    fn holding(token: Token) -> Arc<Self> {
        let store = Self::new();
        *store.token.lock().unwrap() = Some(token);
        store
    }
}

impl PushState {
    /// Another replica saved `token`: stored, then pushed.
    fn saved_elsewhere(&self, token: Token) {
        *self.token.lock().unwrap() = Some(token.clone());
        self.push(token);
    }

    /// Only the push (the stored token stays as it is).
    fn push(&self, token: Token) {
        let live: Vec<_> = {
            let mut watchers = self.watchers.lock().unwrap();
            watchers.retain(|w| w.strong_count() > 0);
            watchers.iter().filter_map(Weak::upgrade).collect()
        };
        for watcher in live {
            watcher.token_saved(token.clone());
        }
    }

    fn live_watchers(&self) -> usize {
        let watchers = self.watchers.lock().unwrap();
        watchers.iter().filter(|w| w.strong_count() > 0).count()
    }

    fn stored(&self) -> Option<Token> {
        self.token.lock().unwrap().clone()
    }

    fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    fn locks(&self) -> usize {
        self.locks.load(Ordering::SeqCst)
    }
}

impl PushState {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            self.load_gate.wait().await;
            Ok(self.stored())
        })
    }
}

impl TokenStore for PushingStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.0.load()
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        self.locks.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            self.lock_gate.wait().await;
            let guard: Box<dyn StoreGuard> = Box::new(PushGuard(self.0.clone()));
            Ok(guard)
        })
    }

    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        self.watchers.lock().unwrap().push(watcher);
    }
}

/// The lock of a [`PushingStore`]: its saves are stored, then pushed.
struct PushGuard(Arc<PushState>);

impl StoreGuard for PushGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.0.load()
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        *self.0.token.lock().unwrap() = Some(token.clone());
        self.0.push(token.clone());
        Box::pin(async { Ok(()) })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn flight(
    clock: &ManualClock,
    source: &Arc<ScriptedSource>,
    store: &Arc<PushingStore>,
) -> SingleFlight {
    SingleFlight::builder()
        .source(source.clone())
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .build()
        .unwrap()
}

fn generation(flight: &SingleFlight) -> Option<u64> {
    flight.current().map(|t| t.generation())
}

#[test]
fn a_pushed_newer_token_is_current_at_once_without_the_source_the_lock_or_a_read() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::holding(saved(&clock, "one", 1));
    let flight = flight(&clock, &source, &store);
    assert_eq!(
        store.live_watchers(),
        1,
        "the coordinator registered itself"
    );
    let first = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(first.generation(), 1);
    let (loads, locks) = (store.loads(), store.locks());

    store.saved_elsewhere(saved(&clock, "two", 2));

    let current = flight.valid_token().expect("the pushed token is current");
    assert_eq!(current.generation(), 2);
    assert_eq!(current.access().expose(), "two");
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "two");
    assert_eq!(source.calls(), 0);
    assert_eq!(store.loads(), loads, "no read of the store");
    assert_eq!(store.locks(), locks, "no lock");
    let stats = flight.stats();
    assert_eq!(stats.pushed, 1);
    assert_eq!(stats.flights, 1, "only the first token took a flight");
}

#[test]
fn older_equal_expired_and_corrupt_pushes_are_ignored() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::holding(saved(&clock, "five", 5));
    let flight = flight(&clock, &source, &store);
    futures::executor::block_on(flight.token()).unwrap();

    store.push(saved(&clock, "four", 4));
    store.push(saved(&clock, "another-five", 5));
    store.push(saved(&clock, "huge", MAX_GENERATION + 1));
    let expired = Token::new("expired")
        .obtained_at(now(&clock) - 2 * LONG)
        .expires_at(now(&clock) - Duration::from_secs(1))
        .with_generation(6);
    store.push(expired);

    let current = flight.current().unwrap();
    assert_eq!(current.generation(), 5);
    assert_eq!(current.access().expose(), "five");
    assert_eq!(flight.stats().pushed, 0);
    assert_eq!(source.calls(), 0);
}

#[test]
fn a_push_racing_a_login_never_replaces_it() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::holding(saved(&clock, "one", 1));
    let flight = flight(&clock, &source, &store);
    futures::executor::block_on(flight.token()).unwrap();

    // The login is in use at once, but its save waits for the store's lock.
    store.lock_gate.close();
    let mut install = flight.install(saved(&clock, "login", 0)).boxed();
    assert!(poll_once(&mut install).is_pending());
    assert_eq!(flight.current().unwrap().access().expose(), "login");
    let login_generation = generation(&flight).unwrap();

    // Another replica saves a refresh of the old session, numbered above the login:
    // an unsaved login is newer than anything stored, whatever its number (C17).
    store.saved_elsewhere(saved(&clock, "old-session", login_generation + 5));
    assert_eq!(flight.current().unwrap().access().expose(), "login");

    // The login's save goes through, renumbered above the stored session.
    store.lock_gate.release();
    let installed = futures::executor::block_on(install).unwrap();
    assert_eq!(installed.access().expose(), "login");
    assert!(installed.generation() > login_generation + 5);
    assert_eq!(flight.current().unwrap().access().expose(), "login");
    assert_eq!(store.stored().unwrap().access().expose(), "login");

    // The late push of the old session (older now) is ignored; a refresh of the login
    // by another replica (newer) is adopted.
    store.push(saved(&clock, "old-session", login_generation + 5));
    assert_eq!(flight.current().unwrap().access().expose(), "login");
    store.saved_elsewhere(saved(&clock, "login-refreshed", installed.generation() + 1));
    assert_eq!(
        flight.current().unwrap().access().expose(),
        "login-refreshed"
    );
    assert_eq!(flight.stats().pushed, 1);
    assert_eq!(source.calls(), 0);
}

#[test]
fn a_login_installed_after_a_push_is_numbered_above_it() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::new();
    let flight = flight(&clock, &source, &store);
    store.saved_elsewhere(saved(&clock, "pushed", 3));
    assert_eq!(generation(&flight), Some(3));
    let installed = futures::executor::block_on(flight.install(saved(&clock, "login", 0))).unwrap();
    assert!(installed.generation() > 3);
    assert_eq!(flight.current().unwrap().access().expose(), "login");
    // The push of the same record after its own save changes nothing.
    assert_eq!(flight.stats().pushed, 1);
}

#[test]
fn a_push_during_a_flight_serves_new_callers_and_ends_the_flight_waiting_for_the_lock() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::new();
    let flight = flight(&clock, &source, &store);

    // A first token is needed; the flight read the (empty) store and waits for the lock.
    store.lock_gate.close();
    let mut a = flight.token().boxed();
    let mut b = flight.token().boxed();
    assert!(poll_once(&mut a).is_pending() && poll_once(&mut b).is_pending());
    assert_eq!(store.locks(), 1);
    assert_eq!(flight.stats().flights, 1);

    store.saved_elsewhere(saved(&clock, "pushed", 1));

    // New callers take the pushed token on the fast path, without joining the flight.
    let c = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(c.access().expose(), "pushed");
    assert_eq!(flight.stats().coalesced, 1, "only b joined the flight");
    // The pushed token supersedes the flight: it stops waiting for the lock (which
    // another replica holds, and which would only read that token back) and ends with
    // it, while the lock is still held. One outcome for both waiters (C5).
    let (std::task::Poll::Ready(a), std::task::Poll::Ready(b)) =
        (poll_once(&mut a), poll_once(&mut b))
    else {
        panic!("the flight still waits for a lock it no longer needs");
    };
    assert_eq!(a.unwrap().access().expose(), "pushed");
    assert_eq!(b.unwrap().access().expose(), "pushed");
    assert_eq!(source.calls(), 0, "nobody called the source");
    assert_eq!(store.locks(), 1, "one flight, one lock request, given up");
    let stats = flight.stats();
    assert_eq!((stats.flights, stats.pushed, stats.failures), (1, 1, 0));
}

#[test]
fn a_forced_refresh_waiting_for_the_lock_is_not_ended_by_a_push() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::holding(saved(&clock, "one", 1));
    let flight = flight(&clock, &source, &store);
    futures::executor::block_on(flight.token()).unwrap();

    // A forced refresh asks for a new token from the source (C11): a pushed token does
    // not answer it, so it keeps waiting for the lock.
    store.lock_gate.close();
    let mut forced = flight.force_refresh().boxed();
    assert!(poll_once(&mut forced).is_pending());
    store.saved_elsewhere(saved(&clock, "two", 2));
    assert!(
        poll_once(&mut forced).is_pending(),
        "still waiting for the lock"
    );
    assert_eq!(source.calls(), 0);
    store.lock_gate.release();
    let token = futures::executor::block_on(forced).unwrap();
    assert_eq!(source.calls(), 1, "the forced refresh called the source");
    assert!(token.generation() > 2, "numbered above the pushed token");
}

#[test]
fn a_push_ends_auth_lost_even_while_a_reload_runs() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Permanent);
    let store = PushingStore::new();
    let hooks = Arc::new(AtomicUsize::new(0));
    let counted = hooks.clone();
    let flight = SingleFlight::builder()
        .source(source.clone())
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .observer(on_auth_lost(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        }))
        .build()
        .unwrap();
    assert!(matches!(
        futures::executor::block_on(flight.token()),
        Err(Error::ReauthenticationRequired { .. })
    ));
    assert!(flight.is_auth_lost());
    assert_eq!(hooks.load(Ordering::SeqCst), 1);

    // A caller looks in the store for a login (C17); its read is held.
    clock.advance(FlightConfig::default().min_refresh_interval);
    store.load_gate.close();
    let mut reload = flight.token().boxed();
    assert!(poll_once(&mut reload).is_pending());

    // Meanwhile another replica's login arrives by push.
    store.saved_elsewhere(saved(&clock, "login-elsewhere", 9));
    assert!(!flight.is_auth_lost());
    assert_eq!(flight.valid_token().unwrap().generation(), 9);

    // The reload then reads the same token (not newer than the current one): its
    // outcome is the pushed token, not a second loss.
    store.load_gate.release();
    let token = futures::executor::block_on(reload).unwrap();
    assert_eq!(token.access().expose(), "login-elsewhere");
    assert!(!flight.is_auth_lost());
    assert_eq!(hooks.load(Ordering::SeqCst), 1, "the hook fired once");
    assert_eq!(
        source.calls(),
        1,
        "neither the push nor the reload called the source"
    );
    assert_eq!(flight.stats().store_reloads, 1);
}

#[test]
fn coordinators_sharing_a_store_adopt_each_others_saves() {
    let clock = ManualClock::at_fixed_point();
    let store = PushingStore::new();
    let source_a = ScriptedSource::new(&clock, Step::Ok(LONG));
    let source_b = ScriptedSource::new(&clock, Step::Ok(LONG));
    let a = flight(&clock, &source_a, &store);
    let b = flight(&clock, &source_b, &store);
    assert_eq!(store.live_watchers(), 2);

    let token = futures::executor::block_on(a.token()).unwrap();
    assert_eq!(b.current().unwrap().generation(), token.generation());
    assert_eq!(
        futures::executor::block_on(b.token())
            .unwrap()
            .access()
            .expose(),
        token.access().expose()
    );
    assert_eq!((source_a.calls(), source_b.calls()), (1, 0));
    assert_eq!(store.locks(), 1, "only a took the lock");
    assert_eq!((a.stats().pushed, b.stats().pushed), (0, 1));
}

#[test]
fn a_dropped_coordinator_leaves_only_a_dead_watcher() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let store = PushingStore::new();
    let flight = flight(&clock, &source, &store);
    let clone = flight.clone();
    drop(flight);
    assert_eq!(store.live_watchers(), 1, "a clone keeps it alive");
    drop(clone);
    assert_eq!(store.live_watchers(), 0, "the store does not keep it alive");
    store.saved_elsewhere(saved(&clock, "nobody-listens", 1));
}

#[test]
fn a_push_during_a_flights_unlocked_read_spares_it_the_lock() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let short = Token::new("one")
        .expires_in(Duration::from_secs(60), now(&clock))
        .with_generation(1);
    let store = PushingStore::holding(short);
    let flight = flight(&clock, &source, &store);
    futures::executor::block_on(flight.token()).unwrap();
    let locks = store.locks();

    // The token expired; the flight reads the store (held), and meanwhile the token
    // that another replica saved arrives by push. The read then finds nothing newer
    // than the current token: the flight ends with it, without contending for the lock.
    clock.advance(Duration::from_secs(120));
    store.load_gate.close();
    let mut waiting = flight.token().boxed();
    assert!(poll_once(&mut waiting).is_pending());
    store.saved_elsewhere(saved(&clock, "two", 2));
    store.load_gate.release();
    let token = futures::executor::block_on(waiting).unwrap();
    assert_eq!(token.access().expose(), "two");
    assert_eq!(store.locks(), locks, "no lock taken");
    assert_eq!(source.calls(), 0);
}
