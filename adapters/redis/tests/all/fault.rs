//! Redis dies mid-run: every store call and every refresh that needs the store fails
//! promptly with a typed error (nothing hangs, nothing panics), valid tokens keep being
//! served from memory, and after a restart on the same port the fleet recovers with one
//! refresh and no refresh-token reuse.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::RedisServer;
use common::issuer::{Issuer, LIFETIME};
use tokenflight::{
    SingleFlight, adapter::Clock, config::Backoff, store::StoreError, store::TokenStore,
    test_util::ManualClock,
};
use tokenflight_redis::RedisStore;

const HANG_GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

fn builder(server: &RedisServer) -> tokenflight_redis::RedisStoreBuilder {
    RedisStore::builder(server.url())
        .key_prefix("fault:")
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
}

fn is_unavailable(error: &tokenflight::Error) -> bool {
    let refresh = error.refresh_error();
    refresh.cause() == tokenflight::Cause::Store
        && matches!(
            std::error::Error::source(refresh).and_then(|e| e.downcast_ref::<StoreError>()),
            Some(StoreError::Unavailable(_))
        )
}

async fn all(flights: &[SingleFlight]) -> Vec<Result<Arc<tokenflight::Token>, tokenflight::Error>> {
    futures::future::join_all(flights.iter().map(|f| f.token())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_gives_typed_errors_and_the_fleet_recovers_after_restart() {
    let mut server = RedisServer::start();
    let issuer = Issuer::new();
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ));
    let seed = builder(&server).connect().await.unwrap();
    tokenflight_tests::save_locked(&seed, &issuer.login(clock.now()).with_generation(1))
        .await
        .unwrap();

    let mut flights: Vec<SingleFlight> = Vec::new();
    for _ in 0..4 {
        flights.push(
            SingleFlight::builder()
                .store(builder(&server).connect().await.unwrap())
                .source(issuer.source())
                .clock(clock.clone())
                .refresh_ahead(None)
                .backoff(Backoff::none())
                .build()
                .unwrap(),
        );
    }

    // Cycle 1 with Redis up.
    clock.advance(LIFETIME);
    for r in guarded("cycle 1", all(&flights)).await {
        assert_eq!(r.unwrap().generation(), 2);
    }
    assert_eq!(issuer.calls(), 1);

    // One replica holds the lock and another waits for it when Redis dies.
    let holder = builder(&server).connect().await.unwrap();
    let waiter = builder(&server)
        .lock_wait(Duration::from_secs(600))
        .connect()
        .await
        .unwrap();
    let held = holder.lock().await.unwrap();
    let waiting = tokio::spawn(async move { waiter.lock().await.map(drop) });
    server.kill();
    // The waiter gives up with Unavailable at its next poll, not after its lock wait.
    assert!(matches!(
        guarded("waiter", waiting).await.unwrap(),
        Err(StoreError::Unavailable(_))
    ));
    guarded("unlock with redis down", held.unlock()).await;
    assert!(matches!(
        guarded("load", seed.load()).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        guarded("ping", seed.ping()).await,
        Err(StoreError::Unavailable(_))
    ));

    // Valid tokens are still served from memory.
    for r in guarded("valid tokens", all(&flights)).await {
        assert_eq!(r.unwrap().generation(), 2);
    }
    // Expired: each replica's refresh fails with a typed store error, promptly.
    clock.advance(LIFETIME);
    for r in guarded("refresh with redis down", all(&flights)).await {
        let error = r.expect_err("no store, no fleet-wide refresh");
        assert!(is_unavailable(&error), "{error:?}");
    }
    assert_eq!(issuer.calls(), 1, "nobody refreshed without the fleet lock");

    // Redis is back (empty: it keeps no data). The connection managers reconnect; the
    // first calls may still see the old connection fail, so retry a bounded number of
    // times, the way callers would.
    server.restart();
    let mut recovered = Vec::new();
    for attempt in 0..100 {
        let results = guarded("recovery", all(&flights)).await;
        if results.iter().all(Result::is_ok) {
            recovered = results.into_iter().map(Result::unwrap).collect();
            break;
        }
        for r in &results {
            if let Err(error) = r {
                assert!(is_unavailable(error), "attempt {attempt}: {error:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recovered.len(), flights.len(), "the fleet recovered");
    assert!(
        recovered
            .iter()
            .all(|t| t.generation() == 3 && **t == *recovered[0])
    );
    assert_eq!(
        issuer.calls(),
        2,
        "one refresh for the whole fleet after the restart"
    );
    assert_eq!(issuer.reuses(), 0);
    // The seed's own connection has not been used since the restart: like the
    // replicas' above, its first calls may still see the old connection fail.
    let mut stored = guarded("stored", seed.load()).await;
    for _ in 0..100 {
        if stored.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = guarded("stored", seed.load()).await;
    }
    assert_eq!(stored.unwrap().as_ref(), Some(&*recovered[0]));
}
