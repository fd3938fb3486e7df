//! Issue 17: one single flight per key. Every caller gets a token of its own key; per
//! key, C1–C5 hold; keys are independent; the map is bounded and eviction never cuts a
//! running flight short.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use crate::support::{Gate, poll_once};
use futures::executor::block_on;
use futures::future::{BoxFuture, join_all};
use proptest::prelude::*;
use tokenflight::{
    RefreshContext, RefreshError, SingleFlight, Token, TokenSource, adapter::Clock,
    config::Backoff, config::Retry, keyed::KeyedFlights, store::MemoryStore,
    test_util::ManualClock,
};

const LIFETIME: Duration = Duration::from_secs(100);

/// One source per key; the token's value names its key and the call number. Calls can
/// be failed or held per key.
struct KeySource {
    key: u32,
    calls: Arc<AtomicUsize>,
    fail_next: Arc<Mutex<HashSet<u32>>>,
    gate: Gate,
    clock: ManualClock,
}

impl TokenSource for KeySource {
    fn fetch(&self, _cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.gate.wait().await;
            if self.fail_next.lock().unwrap().remove(&self.key) {
                return Err(RefreshError::transient("planted failure"));
            }
            Ok(Token::new(format!("k{}-call{n}", self.key)).expires_in(LIFETIME, self.clock.now()))
        })
    }
}

/// The per-key counters and switches a test drives.
#[derive(Clone)]
struct World {
    clock: ManualClock,
    calls: Arc<Mutex<HashMap<u32, Arc<AtomicUsize>>>>,
    gates: Arc<Mutex<HashMap<u32, Gate>>>,
    fail_next: Arc<Mutex<HashSet<u32>>>,
    factory_calls: Arc<AtomicUsize>,
    /// One store per key (a store namespace): a key's new coordinator after an
    /// eviction finds its session there.
    stores: Arc<Mutex<HashMap<u32, Arc<MemoryStore>>>>,
    /// While a batch starts, new keys' gates are made closed too.
    holding: Arc<std::sync::atomic::AtomicBool>,
}

impl World {
    fn new() -> Self {
        World {
            clock: ManualClock::at_fixed_point(),
            calls: Arc::default(),
            gates: Arc::default(),
            fail_next: Arc::default(),
            factory_calls: Arc::default(),
            stores: Arc::default(),
            holding: Arc::default(),
        }
    }

    fn calls(&self, key: u32) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn gate(&self, key: u32) -> Gate {
        self.gates
            .lock()
            .unwrap()
            .entry(key)
            .or_insert_with(|| {
                let gate = Gate::open();
                if self.holding.load(Ordering::SeqCst) {
                    gate.close();
                }
                gate
            })
            .clone()
    }

    fn flights(&self) -> tokenflight::keyed::KeyedFlightsBuilder<u32> {
        let world = self.clone();
        KeyedFlights::builder(move |key: &u32| {
            world.factory_calls.fetch_add(1, Ordering::SeqCst);
            let calls = world.calls.lock().unwrap().entry(*key).or_default().clone();
            SingleFlight::builder()
                .source(KeySource {
                    key: *key,
                    calls,
                    fail_next: world.fail_next.clone(),
                    gate: world.gate(*key),
                    clock: world.clock.clone(),
                })
                .store(
                    world
                        .stores
                        .lock()
                        .unwrap()
                        .entry(*key)
                        .or_default()
                        .clone(),
                )
                .clock(Arc::new(world.clock.clone()))
                .refresh_ahead(None)
                .retry(Retry::none())
                .backoff(Backoff::none())
                .build()
        })
    }
}

impl World {
    /// Runs `callers` concurrently with every key's source held until each caller has
    /// been polled once: all callers of a key must join one flight (or find a valid
    /// token), none may arrive after it ended.
    fn run_batch<T: Send + 'static>(
        &self,
        callers: impl IntoIterator<Item = BoxFuture<'static, T>>,
    ) -> Vec<T> {
        self.holding.store(true, Ordering::SeqCst);
        let gates: Vec<Gate> = self.gates.lock().unwrap().values().cloned().collect();
        gates.iter().for_each(Gate::close);
        let mut all: Vec<BoxFuture<'static, Option<T>>> = callers
            .into_iter()
            .map(|caller| -> BoxFuture<'static, Option<T>> {
                Box::pin(async move { Some(caller.await) })
            })
            .collect();
        let world = self.clone();
        all.push(Box::pin(async move {
            // Polled last: every caller has started. New keys' gates opened too.
            world.holding.store(false, Ordering::SeqCst);
            let gates: Vec<Gate> = world.gates.lock().unwrap().values().cloned().collect();
            gates.iter().for_each(Gate::release);
            None
        }));
        block_on(join_all(all)).into_iter().flatten().collect()
    }
}

fn key_of(token: &Token) -> u32 {
    let value = token.access().expose();
    value
        .strip_prefix('k')
        .and_then(|rest| rest.split('-').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn ten_thousand_keys_get_one_source_call_per_key_per_expiry_and_only_their_own_tokens() {
    let world = World::new();
    let flights = world.flights().max_entries(20_000).build();
    const KEYS: u32 = 10_000;
    const CALLERS: usize = 3;
    for wave in 1..=2 {
        let callers = (0..KEYS).flat_map(|key| {
            let flights = flights.clone();
            (0..CALLERS).map(move |_| -> BoxFuture<'static, _> {
                let flights = flights.clone();
                Box::pin(async move { (key, flights.token(&key).await) })
            })
        });
        for (key, result) in world.run_batch(callers) {
            let token = result.expect("every key's refresh succeeds");
            assert_eq!(key_of(&token), key, "a token of another key was handed out");
        }
        for key in 0..KEYS {
            assert_eq!(
                world.calls(key),
                wave,
                "key {key}: one source call per expiry"
            );
        }
        world.clock.advance(LIFETIME);
    }
    assert_eq!(world.factory_calls.load(Ordering::SeqCst), KEYS as usize);
    assert_eq!(flights.len(), KEYS as usize);
}

#[test]
fn a_slow_refresh_of_one_key_never_delays_another() {
    let world = World::new();
    let flights = world.flights().build();
    world.gate(1).close();
    let mut slow = Box::pin(flights.token(&1));
    assert!(poll_once(&mut slow).is_pending());
    assert!(poll_once(&mut slow).is_pending());
    let other = block_on(flights.token(&2)).expect("key 2 is not held");
    assert_eq!(key_of(&other), 2);
    assert!(poll_once(&mut slow).is_pending(), "key 1 is still held");
    world.gate(1).release();
    let held = block_on(slow).expect("key 1 completes once released");
    assert_eq!(key_of(&held), 1);
}

#[test]
fn the_map_stays_bounded_and_never_evicts_a_running_flight() {
    let world = World::new();
    let flights = world.flights().max_entries(10).build();
    world.gate(0).close();
    let mut running = Box::pin(flights.token(&0));
    assert!(poll_once(&mut running).is_pending());
    assert!(poll_once(&mut running).is_pending());
    for key in 1..200 {
        block_on(flights.token(&key)).expect("refresh succeeds");
        assert!(flights.len() <= 10, "bounded: {} entries", flights.len());
    }
    // Key 0 is still kept (its refresh runs) and still single-flight: a new caller
    // joins the held flight instead of starting another source call.
    let mut joiner = Box::pin(flights.token(&0));
    assert!(poll_once(&mut joiner).is_pending());
    assert_eq!(world.calls(0), 1);
    world.gate(0).release();
    let a = block_on(running).expect("the held flight completes");
    let b = block_on(joiner).expect("the joiner gets the same refresh");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(world.calls(0), 1);
}

#[test]
fn an_evicted_keys_waiters_still_get_their_refresh() {
    let world = World::new();
    let flights = world
        .flights()
        .idle_timeout(Duration::ZERO)
        .max_entries(1)
        .build();
    world.gate(7).close();
    let mut waiter = Box::pin(flights.token(&7));
    assert!(poll_once(&mut waiter).is_pending());
    assert!(poll_once(&mut waiter).is_pending());
    // A running flight is not evicted, even when idle and over the bound.
    assert_eq!(flights.evict_idle(), 0);
    world.gate(7).release();
    let token = block_on(waiter).expect("completes");
    assert_eq!(key_of(&token), 7);
    // Once finished, it may go; the waiter kept what it got.
    assert_eq!(flights.evict_idle(), 1);
    assert!(flights.is_empty());
    assert_eq!(key_of(&token), 7);
}

#[test]
fn a_failing_factory_gives_a_typed_error_keeps_nothing_and_is_asked_again() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let flights = KeyedFlights::builder(move |_key: &String| {
        counted.fetch_add(1, Ordering::SeqCst);
        SingleFlight::builder().build() // no source: a configuration error
    })
    .build();
    let secret_key = "user-4711-secret".to_string();
    let error = block_on(flights.token(&secret_key)).unwrap_err();
    assert!(error.refresh_error().is_permanent(), "{error}");
    assert!(!format!("{error} {error:?}").contains("4711"), "key leaked");
    assert!(flights.is_empty());
    assert!(block_on(flights.token(&secret_key)).is_err());
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[test]
fn debug_never_shows_keys() {
    let world = World::new();
    let flights = world.flights().build();
    block_on(flights.token(&424_242)).unwrap();
    let shown = format!("{flights:?}");
    assert!(!shown.contains("424242"), "{shown}");
    assert!(shown.contains("entries: 1"), "{shown}");
}

/// One step of the generated runs.
#[derive(Clone, Debug)]
enum Action {
    /// Callers of several keys at once: `(key, callers)`.
    Batch(Vec<(u32, usize)>),
    /// Move the clock.
    Advance(u64),
    /// The next source call of this key fails.
    FailNext(u32),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => prop::collection::vec((0u32..6, 1usize..5), 1..6).prop_map(Action::Batch),
        2 => prop_oneof![Just(5u64), Just(50), Just(95), Just(200)].prop_map(Action::Advance),
        1 => (0u32..6).prop_map(Action::FailNext),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random keys, interleavings, expiries and failures: every caller gets a token of
    /// its own key or its key's error; per key, one source call per batch that needed
    /// one (C1), every waiter of a batch gets the same outcome (C2, C5), generations
    /// never go back (C3), and a failure of one key never fails another.
    #[test]
    fn every_caller_gets_its_own_keys_token_and_each_key_is_single_flight(
        actions in prop::collection::vec(action(), 1..25),
        max_entries in prop_oneof![Just(2usize), Just(100)],
    ) {
        let world = World::new();
        let flights = world.flights().max_entries(max_entries).build();
        let mut last_generation: HashMap<u32, u64> = HashMap::new();
        let mut expiry: HashMap<u32, SystemTime> = HashMap::new();
        for action in actions {
            match action {
                Action::Advance(secs) => world.clock.advance(Duration::from_secs(secs)),
                Action::FailNext(key) => { world.fail_next.lock().unwrap().insert(key); }
                Action::Batch(batch) => {
                    let now = world.clock.now();
                    let keys: HashSet<u32> = batch.iter().map(|(k, _)| *k).collect();
                    let before: HashMap<u32, usize> = keys.iter().map(|k| (*k, world.calls(*k))).collect();
                    let planted: HashSet<u32> = world.fail_next.lock().unwrap().clone();
                    let callers = batch.iter().flat_map(|&(key, n)| {
                        let flights = flights.clone();
                        (0..n).map(move |_| -> BoxFuture<'static, _> {
                            let flights = flights.clone();
                            Box::pin(async move { (key, flights.token(&key).await) })
                        })
                    });
                    let results = world.run_batch(callers);
                    let mut outcome: HashMap<u32, Result<u64, String>> = HashMap::new();
                    for (key, result) in results {
                        let seen = match &result {
                            Ok(token) => {
                                prop_assert_eq!(key_of(token), key, "cross-key token");
                                Ok(token.generation())
                            }
                            Err(error) => Err(error.to_string()),
                        };
                        let first = outcome.entry(key).or_insert_with(|| seen.clone());
                        prop_assert_eq!(&*first, &seen, "waiters of key {} differ", key);
                    }
                    for key in keys {
                        let calls = world.calls(key) - before[&key];
                        // Still valid (not within the 10 s leeway of a 100 s token):
                        // no call; otherwise exactly one for the whole batch.
                        let valid = expiry.get(&key).is_some_and(|e| now + Duration::from_secs(10) < *e);
                        prop_assert_eq!(calls, usize::from(!valid), "key {}: source calls", key);
                        match &outcome[&key] {
                            Ok(generation) => {
                                let last = last_generation.entry(key).or_insert(0);
                                prop_assert!(*generation >= *last, "generation went back");
                                if *generation > *last {
                                    expiry.insert(key, now + LIFETIME);
                                }
                                *last = *generation;
                                // A key that did not fail never fails.
                            }
                            Err(_) => prop_assert!(
                                planted.contains(&key) && calls == 1,
                                "key {} failed without its own failure", key
                            ),
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_keyed_fast_path_is_a_plain_valid_token() {
    let world = World::new();
    let flights = world.flights().build();
    assert!(
        flights.valid_token(&3).is_none(),
        "unknown key: nothing, no factory"
    );
    assert_eq!(world.factory_calls.load(Ordering::SeqCst), 0);
    let token = block_on(flights.token(&3)).unwrap();
    let again = flights.valid_token(&3).expect("valid");
    assert!(Arc::ptr_eq(&token, &again));
    let mut next = Box::pin(flights.token(&3));
    assert!(matches!(poll_once(&mut next), Poll::Ready(Ok(_))));
}

/// The namespace is a storage format: a fleet upgraded one process at a time must find
/// the same records. Pinned against an independent computation
/// (`python3 -c "import hashlib; print(hashlib.sha256(b'tokenflight-key-v1\0alice').hexdigest()[:32])"`).
#[test]
fn key_namespaces_are_stable_and_never_show_the_key() {
    assert_eq!(
        tokenflight::keyed::key_namespace(b"alice"),
        "0ab917bb5eb8a1c7f5f67d2d4344b330"
    );
    let name = tokenflight::keyed::key_namespace(b"../../etc/passwd");
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()) && name.len() == 32);
}

#[test]
fn entries_used_within_the_idle_timeout_are_kept() {
    let world = World::new();
    let flights = world
        .flights()
        .idle_timeout(Duration::from_secs(3600))
        .build();
    for key in 0..50 {
        block_on(flights.token(&key)).unwrap();
    }
    assert_eq!(flights.evict_idle(), 0, "nothing has been idle for an hour");
    assert_eq!(flights.len(), 50);
    assert_eq!(world.factory_calls.load(Ordering::SeqCst), 50);
}

/// C22: "idle" means unused for `idle_timeout`, on a clock that moves between the map's
/// writes. A key looked up every 5 s is never idle, neither for the idle rule nor for
/// the least-recently-used rule, however long it has been kept and whatever new keys
/// arrive; a key nobody used for the timeout is.
#[test]
fn c22_a_key_in_constant_use_is_never_evicted_as_idle() {
    let world = World::new();
    let flights = world
        .flights()
        .clock(world.clock.clone())
        .idle_timeout(Duration::from_secs(60))
        .max_entries(2)
        .build();
    block_on(flights.token(&1)).unwrap(); // in constant use from here on
    block_on(flights.token(&2)).unwrap(); // used once
    let use_key_1_for = |seconds: u64| {
        for _ in 0..seconds / 5 {
            world.clock.advance(Duration::from_secs(5));
            assert!(
                flights.valid_token(&1).is_some(),
                "key 1 is kept, its token valid"
            );
        }
    };
    use_key_1_for(70);
    // A new key finds the map full: key 2 (unused for 70 s) is idle, key 1 is not.
    block_on(flights.token(&3)).unwrap();
    assert!(
        flights.get(&1).is_some(),
        "the key in use was evicted as idle"
    );
    assert!(flights.get(&2).is_none(), "the unused key was kept");
    // Neither is idle now; the least recently used of the two goes, never key 1.
    use_key_1_for(15);
    block_on(flights.token(&4)).unwrap();
    assert!(
        flights.get(&1).is_some(),
        "the key in use was evicted as least recent"
    );
    assert!(flights.get(&3).is_none());
    assert_eq!(
        world.calls(1),
        1,
        "key 1 kept its coordinator and its token"
    );
    assert_eq!(world.factory_calls.load(Ordering::SeqCst), 4);
}
