//! The store on a real Redis: lock exclusivity across connections, compare-and-delete
//! release, the fenced save and load, pub/sub wake-up, polling fallback, bounded waits,
//! corrupt values, and one flight shared by coordinators that each have their own
//! connection or all share one store.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::issuer::{Issuer, LIFETIME};
use common::{RedisServer, script_calls};
use redis::AsyncCommands;
use tokenflight::{
    SingleFlight, Token, store::StoreError, store::TokenStore, test_util::ManualClock,
};
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

    guarded("unlock a", held.unlock()).await;
    assert_eq!(lock_holder(&server, "t1:").await, None, "released");
    let b_held = guarded("lock b again", b.lock()).await.unwrap();
    assert!(lock_holder(&server, "t1:").await.is_some());
    assert_ne!(
        lock_holder(&server, "t1:").await,
        holder,
        "a new, unique value"
    );
    guarded("unlock b", b_held.unlock()).await;
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
    guarded("unlock stale a", stale.unlock()).await;
    assert_eq!(
        lock_holder(&server, "t2:").await,
        b_value,
        "b still holds the lock"
    );
    assert!(matches!(
        guarded("lock c", c.lock()).await,
        Err(StoreError::LockTimeout)
    ));

    guarded("unlock b", b_held.unlock()).await;
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
    assert_eq!(guarded("load a", a_lock.load()).await.unwrap(), None);

    // a stalls past its lease; b takes over and saves generation 5.
    let b_lock = guarded("lock b", b.lock()).await.unwrap();
    let b_token = Token::new("from-b").with_refresh("r-b").with_generation(5);
    guarded("save b", b_lock.save(&b_token)).await.unwrap();

    // a wakes up: its guard's load is fenced (it must not go on to spend a refresh
    // token) ...
    assert!(matches!(
        guarded("load stale a", a_lock.load()).await,
        Err(StoreError::LeaseLost)
    ));
    // ... while the store's unlocked read (the coordinator's reload after a lost lease)
    // sees b's token.
    assert_eq!(
        guarded("unlocked load a", a.load()).await.unwrap(),
        Some(b_token.clone())
    );
    // ... and its saves are refused, whatever generation they claim.
    for generation in [5, 6, 100] {
        let stale = Token::new("from-a").with_generation(generation);
        assert!(
            matches!(
                guarded("save stale a", a_lock.save(&stale)).await,
                Err(StoreError::LeaseLost)
            ),
            "generation {generation}"
        );
    }
    assert_eq!(
        guarded("load", b.load()).await.unwrap(),
        Some(b_token.clone())
    );

    // The holder itself cannot write an older or equal generation either (a token
    // saved meanwhile is never overwritten by an older one).
    let newer = Token::new("newer").with_generation(9);
    guarded("save newer", b_lock.save(&newer)).await.unwrap();
    for generation in [7, 9] {
        let older = Token::new("older").with_generation(generation);
        assert!(
            matches!(
                guarded("save older", b_lock.save(&older)).await,
                Err(StoreError::LeaseLost)
            ),
            "generation {generation}"
        );
    }
    assert_eq!(guarded("load", b.load()).await.unwrap(), Some(newer));
    guarded("unlock a", a_lock.unlock()).await;
    guarded("unlock b", b_lock.unlock()).await;
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
    held.unlock().await;
    let (_b, lock) = guarded("b woken by pub/sub", waiter).await.unwrap();
    lock.unwrap().unlock().await;
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
        guarded("save", tokenflight_tests::save_locked(&store, &token)).await,
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
    guarded(
        "save over garbage",
        tokenflight_tests::save_locked(&s, &login),
    )
    .await
    .unwrap();
    assert_eq!(guarded("load", s.load()).await.unwrap(), Some(login));
    assert!(!format!("{s:?}").contains(&server.url()));
}

/// Eight coordinators on `stores` (one per coordinator, or the same store for all)
/// through five expiries: one source call per expiry, no refresh token spent twice,
/// every coordinator on the newest generation, the other seven adopted it.
async fn eight_coordinators_make_one_refresh_per_expiry(
    server: &RedisServer,
    prefix: &str,
    stores: Vec<RedisStore>,
) {
    let issuer = Issuer::new();
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ));
    let seed = store(server, prefix).connect().await.unwrap();
    let login = issuer
        .login(tokenflight::adapter::Clock::now(&*clock))
        .with_generation(1);
    tokenflight_tests::save_locked(&seed, &login).await.unwrap();

    let flights: Vec<_> = stores
        .into_iter()
        .map(|s| {
            SingleFlight::builder()
                .store(s)
                .source(issuer.source())
                .clock(clock.clone())
                .refresh_ahead(None)
                .build()
                .unwrap()
        })
        .collect();
    assert_eq!(flights.len(), 8);
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
        assert_eq!(
            seed.load().await.unwrap().map(|t| t.generation()),
            Some(cycle + 1),
            "saved before it was handed out"
        );
    }
    assert_eq!(issuer.reuses(), 0);
    // The other seven took the stored token each cycle (read, or pushed by the store).
    let fetched: u64 = flights.iter().map(|f| f.stats().source_calls).sum();
    assert_eq!(fetched, 5, "one source call per cycle in the whole fleet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_coordinators_with_their_own_connections_share_one_refresh_per_expiry() {
    let server = RedisServer::start();
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(store(&server, "t6:").connect().await.unwrap());
    }
    eight_coordinators_make_one_refresh_per_expiry(&server, "t6:", stores).await;
}

/// Issue 15: the lease lives in the guard, so one store (one connection, one listener)
/// serves eight coordinators with the same fleet contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_coordinators_sharing_one_store_share_one_refresh_per_expiry() {
    let server = RedisServer::start();
    let shared = store(&server, "t7:").connect().await.unwrap();
    let stores = std::iter::repeat_n(shared, 8).collect();
    eight_coordinators_make_one_refresh_per_expiry(&server, "t7:", stores).await;
}

/// Two holders in turn on ONE store: each guard is fenced on its own lease. (With the
/// lease kept in the store, the second lock would have made the first holder's fenced
/// load pass.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_of_one_store_are_fenced_each_on_its_own_lease() {
    let server = RedisServer::start();
    let shared = store(&server, "t8:")
        .lease(Duration::from_millis(200))
        .renew_every(None)
        .connect()
        .await
        .unwrap();
    let first = guarded("lock first", shared.lock()).await.unwrap();
    // first's lease lapses while it is parked; second takes the lock on the same store.
    let second = guarded("lock second", shared.lock()).await.unwrap();
    assert!(matches!(
        guarded("load first", first.load()).await,
        Err(StoreError::LeaseLost)
    ));
    assert_eq!(guarded("load second", second.load()).await.unwrap(), None);
    let theirs = Token::new("second").with_generation(2);
    guarded("save second", second.save(&theirs)).await.unwrap();
    let stale = Token::new("first").with_generation(3);
    assert!(matches!(
        guarded("save first", first.save(&stale)).await,
        Err(StoreError::LeaseLost)
    ));
    // first's late release is compare-and-delete: second keeps the lock.
    let holder = lock_holder(&server, "t8:").await;
    guarded("unlock first", first.unlock()).await;
    assert_eq!(lock_holder(&server, "t8:").await, holder);
    guarded("unlock second", second.unlock()).await;
    assert_eq!(lock_holder(&server, "t8:").await, None);
    assert_eq!(guarded("load", shared.load()).await.unwrap(), Some(theirs));
}

/// Records RedisStore wrote before the shared record format (`v`, `expires_at_ms`)
/// still load; the next save writes the shared format, and the save script still reads
/// the old record's generation (a save below it is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_before_the_shared_format_still_load() {
    let server = RedisServer::start();
    let s = store(&server, "t9:").connect().await.unwrap();
    let mut con = raw(&server).await;
    let old = r#"{"v":1,"generation":5,"access":"acc","refresh":"ref","expires_at_ms":1700000000123,"obtained_at_ms":1699999940123}"#;
    let _: () = con.set("{t9:}token", old).await.unwrap();
    let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let loaded = guarded("load old", s.load()).await.unwrap().unwrap();
    assert_eq!(
        loaded,
        Token::new("acc")
            .with_refresh("ref")
            .expires_at(at(1_700_000_000_123))
            .obtained_at(at(1_699_999_940_123))
            .with_generation(5)
    );
    let guard = guarded("lock", s.lock()).await.unwrap();
    assert_eq!(
        guarded("guard load old", guard.load()).await.unwrap(),
        Some(loaded)
    );
    assert!(matches!(
        guarded(
            "save below the old record",
            guard.save(&Token::new("x").with_generation(4))
        )
        .await,
        Err(StoreError::LeaseLost)
    ));
    let newer = Token::new("new").with_generation(6);
    guarded("save", guard.save(&newer)).await.unwrap();
    guarded("unlock", guard.unlock()).await;
    let raw_value: String = con.get("{t9:}token").await.unwrap();
    assert!(
        raw_value.starts_with(r#"{"format":2,"generation":6,"#),
        "{raw_value}"
    );
    assert_eq!(guarded("load new", s.load()).await.unwrap(), Some(newer));
}

/// A coordinator on `store` whose source hands out `access` tokens valid for an hour,
/// counting its calls.
fn counted_flight(
    store: RedisStore,
    access: &'static str,
) -> (SingleFlight, Arc<std::sync::atomic::AtomicU64>) {
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let flight = SingleFlight::builder()
        .store(store)
        .source(tokenflight::from_fn(
            move |cx: tokenflight::RefreshContext| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let token = Token::new(access).expires_in(LIFETIME, cx.now);
                async move { Ok(token) }
            },
        ))
        .refresh_ahead(None)
        .build()
        .unwrap();
    (flight, calls)
}

/// The side keys a store moved corrupt values to.
async fn kept_aside(con: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    con.keys(format!("{{{prefix}}}token.corrupt-*"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c13_a_corrupt_record_is_replaced_by_the_next_save() {
    let server = RedisServer::start();
    let mut con = raw(&server).await;
    // What a stray `SET`, a truncated write or another program leaves under the key,
    // among them valid JSON with a high `generation` (the save script alone would
    // refuse to overwrite it) and a float generation the record format refuses.
    let values: [&[u8]; 5] = [
        b"garbage",
        b"{\"format\":2,\"generation\":3,\"access\":\"secret-XYZ\"",
        b"{\"generation\":99,\"access\":\"secret-XYZ\"}",
        b"{\"format\":2,\"generation\":1.5,\"access\":\"secret-XYZ\"}",
        b"\xff\xfe not even UTF-8",
    ];
    for (n, value) in values.into_iter().enumerate() {
        let prefix = format!("t-corrupt-{n}:");
        let key = format!("{{{prefix}}}token");
        let _: () = con.set(&key, value).await.unwrap();
        let store = store(&server, &prefix).connect().await.unwrap();
        // The unlocked read still reports it (the coordinator then takes the lock).
        assert!(matches!(
            guarded("load", store.load()).await,
            Err(StoreError::Corrupt(_))
        ));
        let (flight, calls) = counted_flight(store.clone(), "fresh");
        let token = guarded("refresh over a corrupt record", flight.token())
            .await
            .unwrap_or_else(|e| panic!("case {n}: the corrupt record stopped the refresh: {e}"));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "case {n}"
        );
        let stored = guarded("load", store.load()).await.unwrap().unwrap();
        assert_eq!(stored.access().expose(), "fresh", "case {n}");
        assert_eq!(stored.generation(), token.generation(), "case {n}");
        // Kept aside, byte for byte, for a while: nothing is lost to the save.
        let aside = kept_aside(&mut con, &prefix).await;
        assert_eq!(aside.len(), 1, "case {n}: {aside:?}");
        let kept: Vec<u8> = con.get(&aside[0]).await.unwrap();
        assert_eq!(kept, value, "case {n}");
        let ttl: i64 = con.pttl(&aside[0]).await.unwrap();
        assert!(ttl > 0, "case {n}: the copy must expire, PTTL {ttl}");
    }

    // Another program's hash under the key: moved aside as it is; a login replaces it.
    let prefix = "t-corrupt-hash:";
    let key = format!("{{{prefix}}}token");
    let _: () = con.hset(&key, "f", "v").await.unwrap();
    let store_h = store(&server, prefix).connect().await.unwrap();
    let (flight, calls) = counted_flight(store_h.clone(), "unused");
    let login = Token::new("login").expires_in(LIFETIME, SystemTime::now());
    guarded("install over a foreign value", flight.install(login))
        .await
        .unwrap_or_else(|e| panic!("a login could not replace the foreign value: {e}"));
    let stored = guarded("load", store_h.load()).await.unwrap().unwrap();
    assert_eq!(stored.access().expose(), "login");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let aside = kept_aside(&mut con, prefix).await;
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept: String = con.hget(&aside[0], "f").await.unwrap();
    assert_eq!(kept, "v");

    // A record of a newer format stays untouched: a newer release wrote it.
    let prefix = "t-corrupt-newer:";
    let key = format!("{{{prefix}}}token");
    let newer = "{\"format\":99,\"generation\":1,\"access\":\"secret-XYZ\"}";
    let _: () = con.set(&key, newer).await.unwrap();
    let store_n = store(&server, prefix).connect().await.unwrap();
    let (flight, calls) = counted_flight(store_n, "fresh");
    let error = guarded("refresh over a newer record", flight.token())
        .await
        .unwrap_err();
    assert!(!error.to_string().contains("XYZ"), "{error}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let still: String = con.get(&key).await.unwrap();
    assert_eq!(still, newer);
    assert!(kept_aside(&mut con, prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_a_stored_generation_above_max_generation_is_overwritten_and_the_fleet_shares_one_refresh()
 {
    use tokenflight::store::{MAX_GENERATION, record};
    let server = RedisServer::start();
    let mut con = raw(&server).await;
    // 2^53 + 1 decodes as 2^53 in Lua's doubles: the precision edge.
    for (n, hostile) in [MAX_GENERATION + 1, MAX_GENERATION + 2, u64::MAX]
        .into_iter()
        .enumerate()
    {
        let prefix = format!("t-hostile-{n}:");
        let key = format!("{{{prefix}}}token");
        let planted = Token::new("planted")
            .expires_in(LIFETIME, SystemTime::now())
            .with_generation(hostile);
        let _: () = con
            .set(&key, record::encode(&planted).unwrap())
            .await
            .unwrap();
        // Two replicas, each with its own connection.
        let a = store(&server, &prefix).connect().await.unwrap();
        let b = store(&server, &prefix).connect().await.unwrap();
        let (replica_a, calls_a) = counted_flight(a.clone(), "from-a");
        let (replica_b, calls_b) = counted_flight(b, "from-b");
        let token = guarded("replica a", replica_a.token()).await.unwrap();
        assert_eq!(token.access().expose(), "from-a");
        assert!(token.generation() < MAX_GENERATION);
        let stored = guarded("load", a.load()).await.unwrap().unwrap();
        assert_eq!(
            stored.generation(),
            token.generation(),
            "case {n}: the save left generation {hostile} in place"
        );
        let token_b = guarded("replica b", replica_b.token()).await.unwrap();
        assert_eq!(token_b.access().expose(), "from-a", "case {n}");
        assert_eq!(calls_a.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            calls_b.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "case {n}: replica b refreshed on its own"
        );
    }

    // The save script on its own (a save with no load before it): generations that
    // are no whole number in range are overwritten, a valid newer one is not.
    let s = store(&server, "t-hostile-script:").connect().await.unwrap();
    let key = "{t-hostile-script:}token";
    let token = Token::new("fresh").with_generation(5);
    for stored in [
        "9007199254740993",
        "9007199254740992",
        "1e300",
        "1.5",
        "-7",
        "\"99\"",
    ] {
        let value = format!("{{\"format\":2,\"generation\":{stored},\"access\":\"x\"}}");
        let _: () = con.set(key, &value).await.unwrap();
        guarded("save", tokenflight_tests::save_locked(&s, &token))
            .await
            .unwrap_or_else(|e| panic!("generation {stored} was not overwritten: {e}"));
        assert_eq!(
            guarded("load", s.load()).await.unwrap(),
            Some(token.clone())
        );
    }
    let newer =
        record::encode(&Token::new("newer").with_generation(9_007_199_254_740_991)).unwrap();
    let _: () = con.set(key, &newer).await.unwrap();
    assert!(matches!(
        guarded("save", tokenflight_tests::save_locked(&s, &token)).await,
        Err(StoreError::LeaseLost)
    ));
}
