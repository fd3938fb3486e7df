//! Tests that kill mutants `cargo mutants` found alive in the coordinator and the retry
//! driver (`cargo mutants -p tokenflight -f "core/src/flight/*.rs" -f core/src/driver.rs`):
//! behaviour no other test pinned down.

use crate::support;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Gate, ScriptedSource, Step, poll_once};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenflight::{
    AuthPolicy, Placement, RefreshContext, RefreshReason, SingleFlight, Token, config::Backoff,
    from_fn, store::MemoryStore, store::StoreError, store::StoreGuard, store::TokenStore,
    test_util::ManualClock,
};

fn valid_token(clock: &ManualClock) -> Token {
    Token::new("access-SECRET-1234")
        .with_refresh("refresh-SECRET-5678")
        .expires_in(
            Duration::from_secs(3600),
            tokenflight::adapter::Clock::now(clock),
        )
}

/// `Debug` of the coordinator and of the auth layer says what they are and what state
/// they are in (not an empty string), and never shows a secret (C12).
#[test]
fn c12_debug_shows_state_but_no_secret() {
    let clock = ManualClock::at_fixed_point();
    let auth = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
        .clock(Arc::new(clock.clone()))
        .initial_token(valid_token(&clock))
        .allowed_origin("https://api.test")
        .build()
        .unwrap();

    let flight = format!("{:?}", auth.flight().expect("an unkeyed policy"));
    assert!(flight.starts_with("SingleFlight"), "{flight}");
    assert!(flight.contains("generation: Some(1)"), "{flight}");

    let layer = format!("{auth:?}");
    assert!(layer.starts_with("AuthPolicy"), "{layer}");
    assert!(layer.contains("placement"), "{layer}");
    assert!(layer.contains("api.test"), "{layer}");

    for shown in [flight, layer] {
        assert!(!shown.contains("SECRET"), "a secret leaked: {shown}");
    }
}

/// The accessors hand out what was configured.
#[test]
fn authenticator_accessors_return_the_configuration() {
    let auth = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
        .placement(Placement::query("access_token"))
        .allowed_origin("https://api.test")
        .build()
        .unwrap();
    assert_eq!(auth.placement(), &Placement::query("access_token"));
    assert!(auth.allows_origin(&url::Url::parse("https://api.test/x").unwrap()));
    assert!(!auth.allows_origin(&url::Url::parse("https://other.test/x").unwrap()));
}

/// Rotation: when the store holds a newer token than memory (another process refreshed)
/// that cannot be adopted (it expired too), the source is given the stored token, whose
/// refresh secret is the newest; the one in memory may already be spent.
///
/// The token in memory comes from a refresh, not a login: a login wins over anything
/// stored (C17, `core/tests/holes.rs`).
#[test]
fn c6_source_gets_the_newest_known_refresh_secret() {
    let clock = ManualClock::at_fixed_point();
    let store = Arc::new(MemoryStore::new());
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let source_clock = clock.clone();
    let flight = SingleFlight::builder()
        .source(from_fn(move |cx: RefreshContext| {
            *record.lock().unwrap() = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
            let at = tokenflight::adapter::Clock::now(&source_clock);
            async move {
                Ok(Token::new("new")
                    .with_refresh("refresh-memory")
                    .expires_in(Duration::from_secs(60), at))
            }
        }))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let first = futures::executor::block_on(flight.token()).unwrap();
    // Another process refreshed (generation 5) and its token expired too.
    let stored = Token::new("stored")
        .with_refresh("refresh-stored")
        .expires_at(tokenflight::adapter::Clock::now(&clock) + Duration::from_secs(30))
        .with_generation(first.generation() + 4);
    futures::executor::block_on(support::save_locked(&*store, &stored)).unwrap();
    clock.advance(Duration::from_secs(61));
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "new");
    assert!(token.generation() > stored.generation());
    assert_eq!(seen.lock().unwrap().as_deref(), Some("refresh-stored"));
}

/// A fenced store whose lease lapsed during the source call: the guard's `save` says
/// `LeaseLost`, and the store's next (unlocked) `load` shows what the new holder saved
/// (if anything). Before the loss, both the pre-lock read and the guard's read find the
/// store empty.
struct LeaseLostStore {
    loads: AtomicUsize,
    after_loss: Option<Token>,
}

impl TokenStore for LeaseLostStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        // The first (pre-lock) read sees nothing; after the loss the new holder's token
        // is there.
        let first = self.loads.fetch_add(1, Ordering::SeqCst) == 0;
        let token = if first { None } else { self.after_loss.clone() };
        Box::pin(async move { Ok(token) })
    }
    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        let guard: Box<dyn StoreGuard> = Box::new(LeaseLostGuard);
        Box::pin(async { Ok(guard) })
    }
}

/// The holder whose lease lapses while the source runs.
struct LeaseLostGuard;

impl StoreGuard for LeaseLostGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
    fn save<'a>(&'a self, _token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::LeaseLost) })
    }
    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn flight_with_lost_lease(after_loss: Option<Token>) -> tokenflight::SingleFlight {
    SingleFlight::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("fetched")) }))
        .store(LeaseLostStore {
            loads: AtomicUsize::new(0),
            after_loss,
        })
        .build()
        .unwrap()
}

/// C1 across processes: after losing the lease, a token the new holder saved that is at
/// least as new as ours is adopted (it is what the fleet uses now).
#[test]
fn c1_lost_lease_adopts_the_new_holders_token() {
    let theirs = Token::new("theirs").with_generation(10);
    let flight = flight_with_lost_lease(Some(theirs));
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "theirs");
    assert_eq!(token.generation(), 10);
}

/// C1 across processes: after losing the lease, an older stored token is not adopted;
/// ours is kept in memory (the server issued it, and its rotated refresh token may be
/// the only live one — issue 13, hole 9), though it could not be saved fenced.
#[test]
fn c6_lost_lease_with_an_older_stored_token_keeps_ours() {
    let older = Token::new("older").with_generation(0);
    let flight = flight_with_lost_lease(Some(older));
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "fetched");
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &token));
}

fn recording_source(seen: &Arc<Mutex<Option<String>>>) -> impl tokenflight::TokenSource + 'static {
    let record = seen.clone();
    from_fn(move |cx: RefreshContext| {
        *record.lock().unwrap() = cx
            .previous
            .as_ref()
            .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
        async { Ok(Token::new("new")) }
    })
}

/// Rotation, the other way round: a stored token older than the one in memory is not
/// what the source is given.
#[test]
fn c6_an_older_stored_token_is_not_given_to_the_source() {
    let clock = ManualClock::at_fixed_point();
    let past = tokenflight::adapter::Clock::now(&clock) - Duration::from_secs(1);
    let store = MemoryStore::new();
    let stored = Token::new("stored")
        .with_refresh("refresh-old")
        .expires_at(past)
        .with_generation(1);
    futures::executor::block_on(support::save_locked(&store, &stored)).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let flight = SingleFlight::builder()
        .source(recording_source(&seen))
        .store(store)
        .clock(Arc::new(clock.clone()))
        .initial_token(
            Token::new("memory")
                .with_refresh("refresh-memory")
                .expires_at(past)
                .with_generation(5),
        )
        .build()
        .unwrap();
    futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(seen.lock().unwrap().as_deref(), Some("refresh-memory"));
}

/// Another process refreshed: a newer, usable stored token is adopted, no source call.
#[test]
fn c1_a_newer_usable_stored_token_is_adopted() {
    let clock = ManualClock::at_fixed_point();
    let now = tokenflight::adapter::Clock::now(&clock);
    let store = MemoryStore::new();
    let stored = Token::new("theirs")
        .expires_in(Duration::from_secs(3600), now)
        .with_generation(5);
    futures::executor::block_on(support::save_locked(&store, &stored)).unwrap();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
    // No login here: a login would win over the stored session (C17).
    let flight = SingleFlight::builder()
        .source(source.clone())
        .store(store)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let token = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(token.access().expose(), "theirs");
    assert_eq!(source.calls(), 0);
    assert_eq!(flight.stats().adopted, 1);
}

/// The configuration in use is the one built.
#[test]
fn config_returns_the_configured_settings() {
    let flight = SingleFlight::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
        .leeway(Duration::from_secs(7))
        .refresh_timeout(Duration::from_secs(9))
        .build()
        .unwrap();
    assert_eq!(flight.config().leeway, Duration::from_secs(7));
    assert_eq!(flight.config().refresh_timeout, Duration::from_secs(9));
}

/// C4: a request that cannot be resent marks its token rejected; without a spawner no
/// refresh starts then (nobody would drive it): the next caller refreshes, with reason
/// `Rejected`, and `valid_token` no longer offers the rejected token.
#[test]
fn c4_mark_rejected_without_spawner_defers_the_refresh_to_the_next_caller() {
    let clock = ManualClock::at_fixed_point();
    let now = tokenflight::adapter::Clock::now(&clock);
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
    let flight = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .refresh_ahead(None)
        .initial_token(Token::new("old").expires_in(Duration::from_secs(3600), now))
        .build()
        .unwrap();
    let old = flight.valid_token().unwrap();
    flight.mark_rejected(old.generation());
    assert_eq!(flight.stats().flights, 0);
    assert!(flight.valid_token().is_none());
    let new = futures::executor::block_on(flight.token()).unwrap();
    assert!(new.generation() > old.generation());
    assert_eq!(
        *source.reasons.lock().unwrap(),
        vec![RefreshReason::Rejected]
    );
    assert!(flight.valid_token().is_some_and(|t| Arc::ptr_eq(&t, &new)));
}

/// C5: a finished flight is never joined again, even while one of its waiters has not
/// yet collected the outcome: after a failure the next caller starts a fresh refresh.
#[test]
fn c5_a_finished_flight_is_not_joined_by_later_callers() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
    source.then(Step::Transient);
    let flight = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(Backoff::none())
        .retry(tokenflight::config::Retry::none())
        .refresh_ahead(None)
        .build()
        .unwrap();
    source.gate().close();
    let mut first = flight.token().boxed();
    let mut second = flight.token().boxed();
    assert!(poll_once(&mut first).is_pending());
    assert!(poll_once(&mut second).is_pending());
    source.gate().release();
    // `first` drives the flight to its (failed) end; `second` still holds it, unpolled.
    assert!(matches!(
        poll_once(&mut first),
        std::task::Poll::Ready(Err(_))
    ));
    let later = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(later.access().expose(), "token-2");
    assert_eq!(source.calls(), 2);
    assert!(matches!(
        poll_once(&mut second),
        std::task::Poll::Ready(Err(_))
    ));
}

/// A store whose saves wait at a gate.
struct SlowInstallStore {
    inner: MemoryStore,
    gate: Gate,
}

impl TokenStore for SlowInstallStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }
    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        let gate = self.gate.clone();
        let inner = self.inner.lock();
        Box::pin(async move {
            let guard: Box<dyn StoreGuard> = Box::new(SlowSaveGuard {
                inner: inner.await?,
                gate,
            });
            Ok(guard)
        })
    }
}

struct SlowSaveGuard {
    inner: Box<dyn StoreGuard>,
    gate: Gate,
}

impl StoreGuard for SlowSaveGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }
    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.gate.wait().await;
            self.inner.save(token).await
        })
    }
    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.inner.unlock()
    }
}

/// C17: a login is in use from the moment `install` is first polled, before its (slow)
/// save completes; callers meanwhile get it without a refresh, and the save does not
/// change what they got.
#[test]
fn c17_a_login_is_in_use_before_its_slow_save_completes() {
    let clock = ManualClock::at_fixed_point();
    let gate = Gate::open();
    gate.close();
    let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
    let flight = SingleFlight::builder()
        .source(source.clone())
        .store(SlowInstallStore {
            inner: MemoryStore::new(),
            gate: gate.clone(),
        })
        .clock(Arc::new(clock.clone()))
        .refresh_ahead(None)
        .build()
        .unwrap();
    let mut install = flight.install(Token::new("login")).boxed();
    assert!(poll_once(&mut install).is_pending());
    let during = futures::executor::block_on(flight.token()).unwrap();
    assert_eq!(during.access().expose(), "login");
    assert_eq!(source.calls(), 0);
    gate.release();
    let installed = futures::executor::block_on(install).unwrap();
    assert!(Arc::ptr_eq(&installed, &during));
    assert!(Arc::ptr_eq(&flight.current().unwrap(), &installed));
}
