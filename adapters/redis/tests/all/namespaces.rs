//! Issue 17, Redis: one `RedisStore` per process, one namespace per key
//! (`RedisStore::namespace_for_key`), every namespace on the store's one command
//! connection and one pub/sub connection.
//!
//! - 1,000 keyed coordinators use exactly 2 client connections to Redis (counted with
//!   `CLIENT LIST`), and their namespaces are released when the coordinators are evicted;
//! - a save in one namespace is pushed to that namespace's watchers only: the other
//!   keys' coordinators keep their token, call no source and read nothing;
//! - a lock waiter in one namespace is woken by that namespace's release and is never
//!   held up by another namespace's lock;
//! - after Redis restarts, every namespace is subscribed again and catches up with saves
//!   it missed.
//!
//! Synchronisation is by signal (test watchers registered on the namespaces) or, for
//! server-side state such as subscriptions, by asking the server until it agrees, with
//! a bound that fails the test.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use common::{RedisServer, commandstats, script_calls};
use futures::future::join_all;
use tokenflight::keyed::{KeyedFlights, key_namespace};
use tokenflight::store::{StoreError, StoreWatcher, TokenStore};
use tokenflight::{SingleFlight, Token, from_fn};
use tokenflight_redis::RedisStore;
use tokio::sync::mpsc;

/// Bound on anything that should take milliseconds: a hang fails the test instead of
/// stalling CI. Not a performance threshold.
const HANG_GUARD: Duration = Duration::from_secs(60);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The clients connected to the server other than `mine`: their `sub=` counts
/// (subscribed channels), one entry per connection.
async fn clients(con: &mut redis::aio::MultiplexedConnection) -> Vec<u64> {
    let mine: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(con)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(con)
        .await
        .unwrap();
    let field = |line: &str, name: &str| -> u64 {
        line.split(' ')
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .parse()
            .unwrap()
    };
    list.lines()
        .filter(|line| field(line, "id=") != mine)
        .map(|line| field(line, "sub="))
        .collect()
}

/// Asks the server until `done` holds for the clients' subscription counts (the
/// listener subscribes asynchronously); fails after a bound.
async fn until_clients(
    con: &mut redis::aio::MultiplexedConnection,
    what: &str,
    done: impl Fn(&[u64]) -> bool,
) -> Vec<u64> {
    let mut last = Vec::new();
    for _ in 0..1000 {
        last = clients(con).await;
        if done(&last) {
            return last;
        }
        // A pause between questions to the server, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: the server still lists {last:?}");
}

/// A token of `key`: its value names the key, so a token of another key is spotted.
fn token_of(key: u32, generation: u64) -> Token {
    Token::new(format!("k{key}-g{generation}-{}", fastrand::u64(..)))
        .expires_in(Duration::from_secs(3600), std::time::SystemTime::now())
        .with_generation(generation)
}

fn is_of(token: &Token, key: u32) -> bool {
    token.access().expose().starts_with(&format!("k{key}-"))
}

/// One keyed coordinator per key, each on its key's namespace of `store`, with a source
/// that counts its calls and mints tokens of its key.
fn keyed(store: &RedisStore, calls: &Arc<AtomicU64>) -> KeyedFlights<u32> {
    keyed_idle(store, calls, Duration::from_secs(3600))
}

/// [`keyed`] whose coordinators count as idle after `idle`.
fn keyed_idle(store: &RedisStore, calls: &Arc<AtomicU64>, idle: Duration) -> KeyedFlights<u32> {
    let store = store.clone();
    let calls = calls.clone();
    KeyedFlights::builder(move |key: &u32| {
        let key = *key;
        let calls = calls.clone();
        SingleFlight::builder()
            .store(store.namespace_for_key(&key.to_be_bytes()))
            .source(from_fn(move |_cx| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok(token_of(key, 0)) }
            }))
            .build()
    })
    .max_entries(100_000)
    .idle_timeout(idle)
    .build()
}

/// Tells the test which key's namespace pushed which token.
struct Signal {
    key: u32,
    tx: mpsc::UnboundedSender<(u32, Token)>,
}

impl StoreWatcher for Signal {
    fn token_saved(&self, token: Token) {
        let _ = self.tx.send((self.key, token));
    }
}

/// Registers a test watcher on `key`'s namespace of `store` (after its coordinator:
/// when it is called, the coordinator has adopted the token).
fn signal(
    store: &RedisStore,
    key: u32,
    tx: &mpsc::UnboundedSender<(u32, Token)>,
) -> Arc<dyn StoreWatcher> {
    let signal: Arc<dyn StoreWatcher> = Arc::new(Signal {
        key,
        tx: tx.clone(),
    });
    store
        .namespace_for_key(&key.to_be_bytes())
        .watch(Arc::downgrade(&signal) as Weak<dyn StoreWatcher>);
    signal
}

/// Waits until each of `keys` was pushed `generation`; every pushed token must be of
/// the key whose namespace pushed it. Returns those tokens.
async fn pushed(
    rx: &mut mpsc::UnboundedReceiver<(u32, Token)>,
    keys: &[u32],
    generation: u64,
) -> HashMap<u32, Token> {
    let mut got = HashMap::new();
    guarded("the pushes", async {
        while got.len() < keys.len() {
            let (key, token) = rx.recv().await.expect("signals");
            assert!(
                is_of(&token, key),
                "key {key} was pushed another key's token"
            );
            if token.generation() == generation && keys.contains(&key) {
                got.insert(key, token);
            }
        }
    })
    .await;
    got
}

async fn save(store: &RedisStore, key: u32, token: &Token) {
    let view = store.namespace_for_key(&key.to_be_bytes());
    guarded("save", tokenflight_tests::save_locked(&view, token))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keyed_coordinators_share_two_connections_and_release_their_namespaces() {
    const KEYS: u32 = 1_000;
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .key_prefix("ns1:")
        .connect()
        .await
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    // Idle at once: `evict_idle` below drops every coordinator.
    let flights = keyed_idle(&store, &calls, Duration::ZERO);
    let tokens = guarded(
        "a token per key",
        join_all((0..KEYS).map(|key| {
            let flights = flights.clone();
            async move { (key, flights.token(&key).await.unwrap()) }
        })),
    )
    .await;
    for (key, token) in &tokens {
        assert!(is_of(token, *key), "key {key}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), u64::from(KEYS));
    assert_eq!(flights.len(), KEYS as usize);

    // Exactly two connections for the whole store: the command connection (which the
    // refresh lock uses too: no third) and the one pub/sub connection, subscribed to
    // every namespace's channel and the store's own.
    let mut con = raw(&server).await;
    let subs = until_clients(&mut con, "every namespace subscribed", |subs| {
        subs.iter().any(|s| *s == u64::from(KEYS) + 1)
    })
    .await;
    let mut sorted = subs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, u64::from(KEYS) + 1], "{subs:?}");

    // Every namespace holds its own key's token, under keys that never show the key.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), KEYS as usize, "one token key per namespace");
    for key in [0u32, 1, KEYS - 1] {
        let namespace = key_namespace(&key.to_be_bytes());
        assert!(keys.contains(&format!("{{ns1:ns:{namespace}}}token")));
        let stored = store
            .namespace(&namespace)
            .unwrap()
            .load()
            .await
            .unwrap()
            .unwrap();
        assert!(is_of(&stored, key));
    }

    // Evicting the coordinators drops their namespaces: unsubscribed, nothing kept.
    drop(tokens);
    assert_eq!(flights.evict_idle(), KEYS as usize);
    assert!(flights.is_empty());
    let subs = until_clients(&mut con, "the namespaces unsubscribed", |subs| {
        subs.contains(&1)
    })
    .await;
    let mut sorted = subs;
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [0, 1],
        "still two connections; only the store's channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_in_one_namespace_is_pushed_to_its_watchers_only() {
    const KEYS: u32 = 20;
    let server = RedisServer::start();
    let builder = || RedisStore::builder(server.url()).key_prefix("ns2:");
    // Two "processes": p saves, q watches with a coordinator per key.
    let p = builder().connect().await.unwrap();
    let q = builder().connect().await.unwrap();
    let q_calls = Arc::new(AtomicU64::new(0));
    let q_flights = keyed(&q, &q_calls);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut signals = HashMap::new();
    for key in 0..KEYS {
        q_flights.flight(&key).unwrap();
        signals.insert(key, signal(&q, key, &tx));
    }

    // A first token per key, saved by p: q's coordinators get each key's own.
    let first: HashMap<u32, Token> = (0..KEYS).map(|key| (key, token_of(key, 1))).collect();
    for (key, token) in &first {
        save(&p, *key, token).await;
    }
    let all: Vec<u32> = (0..KEYS).collect();
    pushed(&mut rx, &all, 1).await;
    for key in 0..KEYS {
        let current = q_flights.get(&key).unwrap().current().unwrap();
        assert_eq!(
            current.access().expose(),
            first[&key].access().expose(),
            "key {key}"
        );
    }

    // A save in key 0's namespace: pushed to key 0's coordinator, and nobody else's.
    let mut con = raw(&server).await;
    let before = commandstats(&mut con).await.calls(&["get"]);
    let second = token_of(0, 2);
    save(&p, 0, &second).await;
    pushed(&mut rx, &[0], 2).await;
    let gets_watched = commandstats(&mut con).await.calls(&["get"]) - before;
    let current = q_flights.get(&0).unwrap().current().unwrap();
    assert_eq!(current.access().expose(), second.access().expose());
    for key in 1..KEYS {
        let current = q_flights.get(&key).unwrap().current().unwrap();
        assert_eq!(
            current.access().expose(),
            first[&key].access().expose(),
            "key {key} keeps its token"
        );
        assert_eq!(current.generation(), 1);
    }
    assert_eq!(q_calls.load(Ordering::SeqCst), 0, "q never called a source");
    assert!(
        rx.try_recv().is_err(),
        "no other namespace was pushed anything"
    );

    // The same save with only key 0 watched in q: the other 19 namespaces cost the
    // save above no read at all.
    for key in 1..KEYS {
        signals.remove(&key);
    }
    let only_zero = keyed(&q, &q_calls);
    only_zero.flight(&0).unwrap();
    drop(q_flights);
    let before = commandstats(&mut con).await.calls(&["get"]);
    save(&p, 0, &token_of(0, 3)).await;
    pushed(&mut rx, &[0], 3).await;
    let gets_alone = commandstats(&mut con).await.calls(&["get"]) - before;
    assert_eq!(
        gets_watched, gets_alone,
        "the namespaces of other keys read nothing"
    );

    // Each namespace holds its own key's token, never another's.
    for key in 0..KEYS {
        let stored = p
            .namespace_for_key(&key.to_be_bytes())
            .load()
            .await
            .unwrap()
            .unwrap();
        assert!(is_of(&stored, key), "key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waiter_is_woken_by_its_own_namespace_and_never_held_by_another() {
    let server = RedisServer::start();
    let holder = RedisStore::builder(server.url())
        .key_prefix("ns3:")
        .connect()
        .await
        .unwrap();
    // The waiter would poll only after 10 minutes (and waits for the lock up to 20 minutes):
    // within the hang guard only a pub/sub message on its own namespace's channel can
    // get it the lock.
    let waiter = RedisStore::builder(server.url())
        .key_prefix("ns3:")
        .poll_interval(Duration::from_secs(600), Duration::from_secs(600))
        .lock_wait(Duration::from_secs(1200))
        .connect()
        .await
        .unwrap();
    let (a, b) = (b"tenant-a".as_slice(), b"tenant-b".as_slice());
    let held_a = holder.namespace_for_key(a).lock().await.unwrap();
    let held_b = holder.namespace_for_key(b).lock().await.unwrap();

    // Another namespace's lock never holds a caller up: at its first attempt.
    let c = waiter.namespace_for_key(b"tenant-c");
    let held_c = guarded("the lock of an unheld namespace", c.lock())
        .await
        .unwrap();

    // A waiter in a: woken by a's release while b stays held.
    let mut con = raw(&server).await;
    let scripts_before = script_calls(&mut con).await;
    let waiter_a = waiter.namespace_for_key(a);
    let waiting = tokio::spawn(async move {
        let lock = waiter_a.lock().await;
        (waiter_a, lock)
    });
    // The waiter tried twice (and failed: a is held): its first attempt, then once more
    // when its namespace's subscription was in place (which may have missed a
    // release). From here on only a message on a's channel wakes it.
    for _ in 0..1000 {
        if script_calls(&mut con).await >= scripts_before + 2 {
            break;
        }
        // A pause between questions to the server, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        script_calls(&mut con).await,
        scripts_before + 2,
        "the waiter tried the lock, subscribed, tried again and waits"
    );
    held_a.unlock().await;
    let (_waiter_a, lock) = guarded("the waiter in a", waiting).await.unwrap();
    let lock = lock.expect("woken by a's release");
    lock.unlock().await;
    held_b.unlock().await;
    held_c.unlock().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_every_namespace_resubscribes_and_catches_up() {
    const KEYS: u32 = 50;
    let mut server = RedisServer::start();
    let url = server.url();
    let builder = || RedisStore::builder(url.as_str()).key_prefix("ns4:");
    let q = builder().connect().await.unwrap();
    let q_calls = Arc::new(AtomicU64::new(0));
    let q_flights = keyed(&q, &q_calls);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut signals = Vec::new();
    for key in 0..KEYS {
        q_flights.flight(&key).unwrap();
        signals.push(signal(&q, key, &tx));
    }
    let all: Vec<u32> = (0..KEYS).collect();
    {
        let p = builder().connect().await.unwrap();
        for key in 0..KEYS {
            save(&p, key, &token_of(key, 1)).await;
        }
        pushed(&mut rx, &all, 1).await;
    }

    server.restart();

    // Saves right after the restart (the server is empty): a namespace whose listener
    // had not resubscribed yet misses the message and catches up by reading once.
    let p = builder().build().unwrap();
    let fresh: HashMap<u32, Token> = (0..KEYS).map(|key| (key, token_of(key, 5))).collect();
    let saved = Mutex::new(Vec::new());
    guarded("the saves after the restart", async {
        for key in 0..KEYS {
            let view = p.namespace_for_key(&key.to_be_bytes());
            loop {
                // The first round trips after a restart may fail: retried, as a caller
                // would.
                match tokenflight_tests::save_locked(&view, &fresh[&key]).await {
                    Ok(()) => break,
                    Err(StoreError::Unavailable(_)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(other) => panic!("key {key}: {other}"),
                }
            }
            saved.lock().unwrap().push(key);
        }
    })
    .await;
    let got = pushed(&mut rx, &all, 5).await;
    for key in 0..KEYS {
        assert_eq!(
            got[&key].access().expose(),
            fresh[&key].access().expose(),
            "key {key}"
        );
        let current = q_flights.get(&key).unwrap().current().unwrap();
        assert_eq!(current.access().expose(), fresh[&key].access().expose());
    }
    assert_eq!(q_calls.load(Ordering::SeqCst), 0, "q never called a source");

    // Subscribed again, all on q's one pub/sub connection (p: two more connections,
    // its namespaces subscribed to while it waited for locks).
    let mut con = raw(&server).await;
    let subs = until_clients(&mut con, "q resubscribed", |subs| {
        subs.contains(&(u64::from(KEYS) + 1))
    })
    .await;
    assert_eq!(subs.len(), 4, "two connections per store: {subs:?}");
    // And pushes flow again.
    save(&p, 7, &token_of(7, 6)).await;
    pushed(&mut rx, &[7], 6).await;
}
