//! Issue 20, push: when one replica saves a token, every other coordinator watching the
//! store adopts it at once — without its source, without the lock, with one `GET` per
//! replica (the save announces only the generation; secrets never go over pub/sub) —
//! and this survives Redis restarting.
//!
//! Synchronisation is by signal: a test watcher registered on each replica's store after
//! its coordinator, so when it is called the coordinator has adopted the token; every
//! wait has a generous overall guard that fails the test.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use common::issuer::Issuer;
use common::{RedisServer, commandstats};
use tokenflight::{
    RefreshContext, SingleFlight, Token, from_fn, store::StoreWatcher, store::TokenStore,
};
use tokenflight_redis::RedisStore;
use tokio::sync::mpsc;

/// Bound on anything that should take milliseconds: a hang fails the test instead of
/// stalling CI. Not a performance threshold.
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

/// Tells the test which replica's store pushed which generation.
struct Signal {
    index: usize,
    tx: mpsc::UnboundedSender<(usize, u64)>,
}

impl StoreWatcher for Signal {
    fn token_saved(&self, token: Token) {
        let _ = self.tx.send((self.index, token.generation()));
    }
}

struct Replica {
    flight: SingleFlight,
    /// This replica's calls of its token source.
    calls: Arc<AtomicU64>,
    /// Keeps the test's watcher alive (the store holds it weakly).
    signal: Option<Arc<dyn StoreWatcher>>,
}

async fn replica(
    server: &RedisServer,
    prefix: &str,
    issuer: &Arc<Issuer>,
    index: usize,
    tx: &mpsc::UnboundedSender<(usize, u64)>,
) -> Replica {
    let store = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let issuer = issuer.clone();
    let flight = SingleFlight::builder()
        .store(store.clone())
        .source(from_fn(move |cx: RefreshContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            let presented = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
            let result = issuer.refresh(presented.as_deref(), cx.now);
            async move { result }
        }))
        .build()
        .unwrap();
    // Registered after the coordinator: called once the coordinator has the token.
    let signal: Arc<dyn StoreWatcher> = Arc::new(Signal {
        index,
        tx: tx.clone(),
    });
    store.watch(Arc::downgrade(&signal) as Weak<dyn StoreWatcher>);
    Replica {
        flight,
        calls,
        signal: Some(signal),
    }
}

/// Waits until each of `replicas` signalled `generation` (other generations are
/// skipped: a replica may first catch up with an older one).
async fn all_pushed(
    rx: &mut mpsc::UnboundedReceiver<(usize, u64)>,
    replicas: &[usize],
    generation: u64,
) {
    let mut missing: Vec<usize> = replicas.to_vec();
    guarded("the push to every replica", async {
        while !missing.is_empty() {
            let (index, got) = rx.recv().await.expect("signals");
            if got == generation {
                missing.retain(|i| *i != index);
            }
        }
    })
    .await;
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn reset_stats(con: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await
        .unwrap();
}

/// Three replicas watch; a fourth refreshes. Then the three leave and the fourth
/// refreshes again: the difference between the two refreshes is the three's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_pushed_to_every_replica_for_one_get_each_without_source_or_lock() {
    let server = RedisServer::start();
    let prefix = "push1:";
    let issuer = Issuer::new();
    let seed = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap();
    let login = issuer
        .login(std::time::SystemTime::now())
        .with_generation(1);
    tokenflight_tests::save_locked(&seed, &login).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut replicas = Vec::new();
    for index in 0..4 {
        replicas.push(replica(&server, prefix, &issuer, index, &tx).await);
    }
    for r in &replicas {
        let token = guarded("the login", r.flight.token()).await.unwrap();
        assert_eq!(token.generation(), 1);
    }
    let others = [1, 2, 3];

    // Warm-up refresh: connections, subscriptions (with their catch-up read) and the
    // server's script cache are in place once every replica has generation 2.
    let leader = &replicas[0].flight;
    assert_eq!(
        guarded("refresh", leader.force_refresh())
            .await
            .unwrap()
            .generation(),
        2
    );
    all_pushed(&mut rx, &others, 2).await;

    let mut con = raw(&server).await;
    reset_stats(&mut con).await;
    let before: Vec<_> = replicas.iter().map(|r| r.flight.stats()).collect();
    let token = guarded("refresh", leader.force_refresh()).await.unwrap();
    assert_eq!(token.generation(), 3);
    all_pushed(&mut rx, &others, 3).await;
    let stats = commandstats(&mut con).await;
    let (scripts_watched, gets_watched) =
        (stats.calls(&["evalsha", "eval"]), stats.calls(&["get"]));

    for &i in &others {
        let r = &replicas[i];
        let current = r.flight.current().unwrap();
        assert_eq!(current.generation(), 3, "replica {i}");
        assert_eq!(current.access().expose(), token.access().expose());
        assert_eq!(
            r.calls.load(Ordering::SeqCst),
            0,
            "replica {i} never called its source"
        );
        let stats = r.flight.stats();
        assert_eq!(
            stats.flights, before[i].flights,
            "replica {i} ran no flight: no lock, no read of its own"
        );
        assert_eq!(
            stats.pushed,
            before[i].pushed + 1,
            "replica {i}: adopted by push"
        );
        // What it serves is the pushed token, at once.
        let served = r.flight.token().await.unwrap();
        assert_eq!(served.generation(), 3);
    }
    assert_eq!(replicas[0].calls.load(Ordering::SeqCst), 2);
    assert_eq!(issuer.calls(), 2, "one token-endpoint call per refresh");
    assert_eq!(issuer.reuses(), 0);

    // The three leave (their stores then read nothing); the same refresh again.
    for r in &mut replicas[1..] {
        r.signal = None;
    }
    let leader = replicas.remove(0);
    drop(replicas);
    reset_stats(&mut con).await;
    let token = guarded("refresh", leader.flight.force_refresh())
        .await
        .unwrap();
    assert_eq!(token.generation(), 4);
    let stats = commandstats(&mut con).await;
    let (scripts_alone, gets_alone) = (stats.calls(&["evalsha", "eval"]), stats.calls(&["get"]));

    assert_eq!(
        scripts_watched, scripts_alone,
        "the watching replicas ran no script: they never took the lock"
    );
    assert_eq!(gets_watched, gets_alone + 3, "one GET per watching replica");
}

/// Redis restarts (empty, it keeps no data): after the replicas resubscribed, a
/// refresh is pushed again; and a save made while the subscriptions were down reaches
/// them through the read each store makes after resubscribing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_survive_a_redis_restart_and_missed_saves_are_caught_up() {
    let mut server = RedisServer::start();
    let prefix = "push2:";
    let issuer = Issuer::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut replicas = Vec::new();
    for index in 0..3 {
        replicas.push(replica(&server, prefix, &issuer, index, &tx).await);
    }
    let seed = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap();
    let login = issuer
        .login(std::time::SystemTime::now())
        .with_generation(1);
    tokenflight_tests::save_locked(&seed, &login).await.unwrap();
    all_pushed(&mut rx, &[0, 1, 2], 1).await;

    server.restart();

    // A login saved right after the restart: a replica whose listener had not yet
    // resubscribed misses its message, and gets it from the read after resubscribing.
    let fresh = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap();
    let login = issuer
        .login(std::time::SystemTime::now())
        .with_generation(5);
    guarded("the save after the restart", async {
        loop {
            // The first round trips after a restart may still fail: retried, as a
            // caller would.
            if tokenflight_tests::save_locked(&fresh, &login).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    all_pushed(&mut rx, &[0, 1, 2], 5).await;
    for r in &replicas {
        assert_eq!(r.flight.current().unwrap().generation(), 5);
    }

    // And a refresh after the restart is pushed as before.
    let leader = &replicas[0].flight;
    let token = guarded("refresh after restart", async {
        loop {
            match leader.force_refresh().await {
                Ok(token) => break token,
                // A pause between retries, not a synchronisation.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    assert_eq!(token.generation(), 6);
    all_pushed(&mut rx, &[1, 2], 6).await;
    for r in &replicas[1..] {
        assert_eq!(r.flight.current().unwrap().generation(), 6);
        assert_eq!(r.calls.load(Ordering::SeqCst), 0);
    }
    assert_eq!(issuer.reuses(), 0);
}

/// The store's counters name each round trip's reason: a holder's attempt, fenced
/// load, fenced save and release on one store; one push read on the other, whose
/// watcher gets the token; no unlocked loads anywhere.
#[tokio::test]
async fn the_counters_split_a_refresh_by_reason() {
    let server = RedisServer::start();
    // Namespaces: a namespace subscribes with its first watcher, so its catch-up read
    // after the subscription comes after the watcher registered, always.
    let saver = RedisStore::builder(server.url())
        .key_prefix("counters:")
        .connect()
        .await
        .unwrap()
        .namespace("n")
        .unwrap();
    let other = RedisStore::builder(server.url())
        .key_prefix("counters:")
        .connect()
        .await
        .unwrap()
        .namespace("n")
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let signal: Arc<dyn StoreWatcher> = Arc::new(Signal { index: 1, tx });
    other.watch(Arc::downgrade(&signal) as Weak<dyn StoreWatcher>);
    // The subscription's catch-up read (nothing stored yet) is counted too: wait for it.
    guarded("the catch-up read", async {
        while other.counters().catch_up_reads == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let guard = guarded("lock", saver.lock()).await.unwrap();
    assert_eq!(guarded("load", guard.load()).await.unwrap(), None);
    let token = Token::new("a").with_generation(1);
    guarded("save", guard.save(&token)).await.unwrap();
    guarded("unlock", guard.unlock()).await;
    assert_eq!(guarded("push", rx.recv()).await, Some((1, 1)));
    let c = saver.counters();
    assert_eq!(
        (
            c.lock_attempts,
            c.locks_taken,
            c.fenced_loads,
            c.fenced_saves,
            c.releases
        ),
        (1, 1, 1, 1, 1),
        "{c:?}"
    );
    assert_eq!(
        (c.loads, c.push_reads, c.lease_renewals),
        (0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.round_trips(), 4);
    let o = other.counters();
    assert_eq!((o.push_reads, o.catch_up_reads), (2, 1), "{o:?}");
    assert_eq!(o.round_trips(), 2, "{o:?}");
}
