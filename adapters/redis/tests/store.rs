//! The store on a real Redis: lock exclusivity across connections, compare-and-delete
//! release, the fenced save and load, pub/sub wake-up, polling fallback, bounded waits,
//! corrupt values, and one flight shared by coordinators that each have their own
//! connection.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::RedisServer;
use common::issuer::{Issuer, LIFETIME};
use redis::AsyncCommands;
use tokenflight::{Builder, ManualClock, StoreError, Token, TokenStore};
use tokenflight_redis::RedisStore;

/// Bound on anything that should take milliseconds: a hang fails the test instead of
/// stalling CI. Not a performance threshold.
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

fn store(server: &RedisServer, prefix: &str) -> tokenflight_redis::RedisStoreBuilder {
    RedisStore::builder(server.url()).key_prefix(prefix)
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn lock_holder(server: &RedisServer, prefix: &str) -> Option<String> {
    raw(server)
        .await
        .get(format!("{{{prefix}}}lock"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_exclusive_across_connections_and_the_wait_is_bounded() {
    let server = RedisServer::start();
    let a = store(&server, "t1:").connect().await.unwrap();
    let b = store(&server, "t1:")
        .lock_wait(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();

    let held = guarded("lock a", a.lock()).await.unwrap();
    let holder = lock_holder(&server, "t1:").await;
    assert!(holder.is_some(), "the lock key holds the holder's value");

    match guarded("lock b", b.lock()).await {
        Err(StoreError::LockTimeout) => {}
        other => panic!("b must time out while a holds the lock, got {other:?}"),
    }
    assert_eq!(
        lock_holder(&server, "t1:").await,
        holder,
        "b did not touch a's lock"
    );

    guarded("unlock a", a.unlock(held)).await;
    assert_eq!(lock_holder(&server, "t1:").await, None, "released");
    let b_held = guarded("lock b again", b.lock()).await.unwrap();
    assert!(lock_holder(&server, "t1:").await.is_some());
    assert_ne!(
        lock_holder(&server, "t1:").await,
        holder,
        "a new, unique value"
    );
    guarded("unlock b", b.unlock(b_held)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_compare_and_delete_and_lapsed_leases_free_the_lock() {
    let server = RedisServer::start();
    // a's lease lapses (no renewal): b gets the lock by polling, with nobody publishing.
    let a = store(&server, "t2:")
        .lease(Duration::from_millis(200))
        .renew_every(None)
        .connect()
        .await
        .unwrap();
    let b = store(&server, "t2:").connect().await.unwrap();
    let c = store(&server, "t2:")
        .lock_wait(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();

    let stale = guarded("lock a", a.lock()).await.unwrap();
    let b_held = guarded("lock b after a's lease lapses", b.lock())
        .await
        .unwrap();
    let b_value = lock_holder(&server, "t2:").await;
    assert!(b_value.is_some());

    // a releases late: compare-and-delete leaves b's lock alone.
    guarded("unlock stale a", a.unlock(stale)).await;
    assert_eq!(
        lock_holder(&server, "t2:").await,
        b_value,
        "b still holds the lock"
    );
    assert!(matches!(
        guarded("lock c", c.lock()).await,
        Err(StoreError::LockTimeout)
    ));

    guarded("unlock b", b.unlock(b_held)).await;
    let c_held = guarded("lock c after b", c.lock()).await.unwrap();
    drop(c_held); // dropping the guard releases in the background
    let released = guarded("lock b after c's guard dropped", b.lock()).await;
    assert!(released.is_ok(), "{released:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_save_refuses_a_lapsed_holder_and_never_overwrites_a_newer_token() {
    let server = RedisServer::start();
    let a = store(&server, "t3:")
        .lease(Duration::from_millis(200))
        .renew_every(None)
        .connect()
        .await
        .unwrap();
    let b = store(&server, "t3:").connect().await.unwrap();

    let a_lock = guarded("lock a", a.lock()).await.unwrap();
    // a reads while it still holds the lock: fine.
    assert_eq!(guarded("load a", a.load()).await.unwrap(), None);

    // a stalls past its lease; b takes over and saves generation 5.
    let b_lock = guarded("lock b", b.lock()).await.unwrap();
    let b_token = Token::new("from-b").with_refresh("r-b").with_generation(5);
    guarded("save b", b.save(&b_token, Some(&b_lock)))
        .await
        .unwrap();

    // a wakes up: its load is fenced (it must not go on to spend a refresh token) ...
    assert!(matches!(
        guarded("load stale a", a.load()).await,
        Err(StoreError::LeaseLost)
    ));
    // ... and its saves are refused, whatever generation they claim.
    for generation in [5, 6, 100] {
        let stale = Token::new("from-a").with_generation(generation);
        assert!(
            matches!(
                guarded("save stale a", a.save(&stale, Some(&a_lock))).await,
                Err(StoreError::LeaseLost)
            ),
            "generation {generation}"
        );
    }
    assert_eq!(
        guarded("load", b.load()).await.unwrap(),
        Some(b_token.clone())
    );

    // The holder itself cannot write an older or equal generation either (an install
    // may have stored a newer token meanwhile).
    let installed = Token::new("login").with_generation(9);
    guarded("install", b.save(&installed, None)).await.unwrap();
    let older = Token::new("older").with_generation(7);
    assert!(matches!(
        guarded("save older", b.save(&older, Some(&b_lock))).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        guarded("install older", b.save(&older, None)).await,
        Err(StoreError::Other(_))
    ));
    assert_eq!(guarded("load", b.load()).await.unwrap(), Some(installed));

    // a lock that is not a RedisStore's is refused, not trusted.
    let foreign = tokenflight::StoreLock::none();
    let newest = Token::new("n").with_generation(50);
    assert!(matches!(
        guarded("save foreign", b.save(&newest, Some(&foreign))).await,
        Err(StoreError::Other(_))
    ));
    guarded("unlock a", a.unlock(a_lock)).await;
    guarded("unlock b", b.unlock(b_lock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_pubsub_not_by_polling() {
    let server = RedisServer::start();
    let a = store(&server, "t4:").connect().await.unwrap();
    // b would poll only once a minute: only a pub/sub message can wake it in time.
    let b = store(&server, "t4:")
        .poll_interval(Duration::from_secs(60), Duration::from_secs(60))
        .lock_wait(Duration::from_secs(120))
        .connect()
        .await
        .unwrap();
    // Both listeners are subscribed (the deterministic signal, not a sleep).
    let mut con = raw(&server).await;
    for _ in 0..400 {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("{t4:}events")
            .query_async(&mut con)
            .await
            .unwrap();
        if counts.first().is_some_and(|(_, n)| *n >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let held = a.lock().await.unwrap();
    let sets_before = script_calls(&mut con).await;
    let waiter = tokio::spawn(async move {
        let lock = b.lock().await;
        (b, lock)
    });
    // b is waiting once its first attempt reached the server (and failed: a holds it).
    for _ in 0..400 {
        if script_calls(&mut con).await > sets_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        script_calls(&mut con).await > sets_before,
        "b tried the lock"
    );
    a.unlock(held).await;
    let (b, lock) = guarded("b woken by pub/sub", waiter).await.unwrap();
    let lock = lock.unwrap();
    b.unlock(lock).await;
}

/// How many SET commands the server has run (INFO commandstats).
/// Scripts the server has run (the lock is taken by a script): while a holds the lock
/// and nobody else acts, only b's attempts run one.
async fn script_calls(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("cmdstat_evalsha:calls=")
                .or_else(|| l.strip_prefix("cmdstat_eval:calls="))
        })
        .filter_map(|rest| rest.split(',').next())
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_prompt_unavailable_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let builder = || {
        RedisStore::builder(format!("redis://127.0.0.1:{port}/"))
            .command_timeout(Duration::from_millis(500))
            .connect_timeout(Duration::from_millis(500))
    };
    assert!(matches!(
        guarded("connect", builder().connect()).await,
        Err(StoreError::Unavailable(_))
    ));
    // Built lazily (a service starting while Redis is down), every call fails cleanly.
    let store = builder().build().unwrap();
    assert!(matches!(
        guarded("load", store.load()).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        guarded("lock", store.lock()).await,
        Err(StoreError::Unavailable(_))
    ));
    let token = Token::new("x").with_generation(1);
    assert!(matches!(
        guarded("save", store.save(&token, None)).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c13_a_corrupt_value_is_a_typed_error_and_a_login_repairs_it() {
    let server = RedisServer::start();
    let s = store(&server, "t5:").connect().await.unwrap();
    let mut con = raw(&server).await;
    let _: () = con
        .set("{t5:}token", "{\"v\":1,\"access\":\"secret-XYZ\"")
        .await
        .unwrap();
    match guarded("load", s.load()).await {
        Err(StoreError::Corrupt(msg)) => assert!(!msg.contains("XYZ"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A wrong type under the key is an error too, not a panic.
    let _: () = con.del("{t5:}token").await.unwrap();
    let _: () = con.hset("{t5:}token", "f", "v").await.unwrap();
    assert!(guarded("load hash", s.load()).await.is_err());
    let _: () = con.del("{t5:}token").await.unwrap();

    let _: () = con.set("{t5:}token", "garbage").await.unwrap();
    let login = Token::new("fresh").with_generation(1);
    guarded("save over garbage", s.save(&login, None))
        .await
        .unwrap();
    assert_eq!(guarded("load", s.load()).await.unwrap(), Some(login));
    assert!(!format!("{s:?}").contains(&server.url()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_coordinators_with_their_own_connections_share_one_refresh_per_expiry() {
    let server = RedisServer::start();
    let issuer = Issuer::new();
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ));
    let seed = store(&server, "t6:").connect().await.unwrap();
    let login = issuer
        .login(tokenflight::Clock::now(&*clock))
        .with_generation(1);
    seed.save(&login, None).await.unwrap();

    let mut flights = Vec::new();
    for _ in 0..8 {
        let s = store(&server, "t6:").connect().await.unwrap();
        flights.push(
            Builder::new()
                .store(s)
                .source(issuer.source())
                .clock(clock.clone())
                .refresh_ahead(None)
                .build_flight()
                .unwrap(),
        );
    }
    for cycle in 1..=5u64 {
        clock.advance(LIFETIME);
        let results = guarded(
            "cycle",
            futures::future::join_all(flights.iter().map(|f| f.token())),
        )
        .await;
        let generations: Vec<u64> = results
            .iter()
            .map(|r| r.as_ref().unwrap().generation())
            .collect();
        assert!(
            generations.iter().all(|g| *g == cycle + 1),
            "cycle {cycle}: {generations:?}"
        );
        assert_eq!(issuer.calls(), cycle, "one refresh per expiry");
    }
    assert_eq!(issuer.reuses(), 0);
    // The other seven took the stored token each cycle (read, or pushed by the store).
    let fetched: u64 = flights.iter().map(|f| f.stats().source_calls).sum();
    assert_eq!(fetched, 5, "one source call per cycle in the whole fleet");
}
