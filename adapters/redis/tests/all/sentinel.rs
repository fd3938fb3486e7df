//! A primary with two replicas, watched by a sentinel; the primary is killed mid-run.
//! The store follows the sentinel to the new primary; the lock and every saved token
//! were acknowledged by a replica (`WAIT`) before anyone relied on them, so across the
//! failover the fleet keeps its one-refresh-per-expiry promise with zero refresh-token
//! reuse.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::deployments::{SentinelSet, cli};
use common::fleet::{CLIENTS_PER_PROCESS, CYCLES, Deployment, Fleet};
use common::issuer::{Issuer, LIFETIME};
use tokenflight::{
    RefreshContext, SingleFlight, adapter::Clock, config::Backoff, from_fn, store::StoreError,
    store::TokenStore, test_util::ManualClock,
};
use tokenflight_redis::RedisStore;
use tokio::sync::oneshot;

const WORKER: &str = "sentinel::sentinel_fleet_worker";

fn deployment(set: &SentinelSet) -> Deployment {
    Deployment {
        kind: "sentinel",
        urls: vec![set.sentinel_url()],
        service: set.service.to_owned(),
        // The Sentinel default: one replica acknowledges the lock and each save.
        ack: "default".into(),
        ..Deployment::node(String::new())
    }
}

#[test]
fn a_fleet_keeps_one_refresh_per_expiry_across_a_sentinel_failover() {
    let mut set = SentinelSet::start();
    let mut fleet = Fleet::start(&deployment(&set), WORKER);
    let half = CYCLES / 2;
    for cycle in 1..=half {
        fleet.advance(cycle);
        let reports = fleet.go(cycle);
        fleet.assert_all_on(&reports, cycle + 1);
        assert_eq!(fleet.server.counters().refresh_token_calls, cycle);
    }

    // Everything written so far is on both replicas (the saves were acknowledged by
    // one already; this makes the lock's release deterministic too), then the primary
    // dies without a word and the sentinel promotes a replica.
    set.sync_replicas(2);
    let old = set.primary_port();
    let new = set.fail_over(1);
    assert_ne!(old, new);

    // The next expiry: clients whose connection still pointed at the dead primary get
    // a typed store error and try again; nobody calls the token endpoint without a lock
    // that a replica of the new primary acknowledged.
    let cycle = half + 1;
    fleet.advance(cycle);
    let mut recovered = None;
    for _ in 0..100 {
        let reports = fleet.go(cycle);
        if reports.iter().all(|r| r.errors == 0) {
            recovered = Some(reports);
            break;
        }
        assert_eq!(fleet.server.counters().reuse_detections, 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let reports = recovered.expect("the fleet recovered after the failover");
    fleet.assert_all_on(&reports, cycle + 1);
    let counters = fleet.server.counters();
    assert_eq!(
        counters.refresh_token_calls, cycle,
        "one call per expiry, failover included"
    );
    assert_eq!(counters.reuse_detections, 0);
    assert_eq!(counters.token_errors, 0);

    for cycle in half + 2..=CYCLES + 1 {
        fleet.advance(cycle);
        let reports = fleet.go(cycle);
        fleet.assert_all_on(&reports, cycle + 1);
        let counters = fleet.server.counters();
        assert_eq!(counters.refresh_token_calls, cycle);
        assert_eq!(counters.reuse_detections, 0);
        for report in &reports {
            assert_eq!(report.api_ok, CLIENTS_PER_PROCESS);
        }
    }
    assert_eq!(set.switches(), 1, "one failover, the one this test caused");
    fleet.quit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_acknowledging_replica_no_refresh_is_attempted() {
    let mut set = SentinelSet::start();
    // Both replicas gone: the primary still takes writes, but nothing confirms them.
    for node in set.nodes.iter_mut().skip(1) {
        node.kill();
    }
    let store = RedisStore::sentinel([set.sentinel_url()], set.service)
        .key_prefix("{no-replica}:")
        .replica_ack_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    match store.lock().await {
        Err(StoreError::Unavailable(error)) => {
            assert!(
                error.to_string().contains("0 of 1 required replica"),
                "{error}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let holder = common::deployments::cli(set.primary_port(), &["GET", "{no-replica}:lock"]);
    assert_eq!(holder.trim(), "", "the unconfirmed lock was given back");
}

const HANG_GUARD: Duration = Duration::from_secs(60);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

fn store(set: &SentinelSet, prefix: &str) -> RedisStore {
    RedisStore::sentinel([set.sentinel_url()], set.service)
        .key_prefix(prefix)
        .build()
        .unwrap()
}

fn flight(
    store: RedisStore,
    source: impl tokenflight::TokenSource + 'static,
    clock: &Arc<ManualClock>,
) -> SingleFlight {
    SingleFlight::builder()
        .store(store)
        .source(source)
        .clock(clock.clone())
        .refresh_ahead(None)
        .backoff(Backoff::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_while_the_holder_refreshes_loses_neither_its_lock_nor_its_token() {
    let mut set = SentinelSet::start();
    let issuer = Issuer::new();
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ));
    let seed = store(&set, "{mid}:");
    tokenflight_tests::save_locked(&seed, &issuer.login(clock.now()).with_generation(1))
        .await
        .unwrap();
    clock.advance(LIFETIME);

    // a's token source parks until the test lets it go: a then holds a lock that one
    // replica acknowledged, and has read the token it is about to spend.
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (go, go_rx) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((entered_tx, go_rx))));
    let a_issuer = issuer.clone();
    let parked_source = from_fn(move |cx: RefreshContext| {
        let gate = gate.lock().unwrap().take();
        let issuer = a_issuer.clone();
        async move {
            if let Some((entered, go)) = gate {
                let _ = entered.send(());
                let _ = go.await;
            }
            let presented = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
            issuer.refresh(presented.as_deref(), cx.now)
        }
    });
    let a = flight(store(&set, "{mid}:"), parked_source, &clock);
    let b = flight(store(&set, "{mid}:"), issuer.source(), &clock);
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.token().await }
    });
    guarded("a reaches its token source", entered)
        .await
        .unwrap();

    // The primary dies while a refreshes. The promoted replica has a's lock: it was
    // acknowledged before a read the token.
    let (set, new) = tokio::task::spawn_blocking(move || {
        let new = set.fail_over(1);
        (set, new)
    })
    .await
    .unwrap();
    let holder = cli(new, &["GET", "{mid}:lock"]);
    assert!(!holder.trim().is_empty(), "the new primary has a's lock");

    // b wants a token now: it waits for a's lock on the new primary instead of
    // spending the refresh token a is spending. Right after a failover the sentinels'
    // answer may still be in flux for a moment: b's attempts fail with a typed store
    // error then, and it asks again, as a caller would.
    let b_task = tokio::spawn({
        let b = b.clone();
        async move {
            for _ in 0..100 {
                match b.token().await {
                    Ok(token) => return token,
                    Err(error) => {
                        assert_eq!(
                            kind_of(error.refresh_error()),
                            RefreshErrorKind::Store,
                            "{error}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            panic!("b never got a token");
        }
    });
    go.send(()).unwrap();
    let a_token = guarded("a's refresh", a_task).await.unwrap().unwrap();
    let b_token = guarded("b's token", b_task).await.unwrap();
    assert_eq!(a_token.generation(), 2);
    assert_eq!(
        b_token, a_token,
        "b adopted the token a saved on the new primary"
    );
    assert_eq!(issuer.calls(), 1, "one refresh");
    assert_eq!(issuer.reuses(), 0, "no refresh token spent twice");
    assert_eq!(seed.load().await.unwrap().unwrap().generation(), 2);
    drop(set);
}

/// The window that remains without replica acknowledgement, pinned: with
/// `ReplicaAck::None`, a lock that had not reached any replica when the primary died is
/// missing on the promoted one, so a second replica takes the lock there and spends
/// the refresh token the first holder is spending — one reuse, which the authorization
/// server detects. With the default (`Required(1)`) the same cut-off primary refuses
/// to hand out a lock at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replica_acknowledgement_a_failover_before_the_lock_replicates_lets_a_reuse_through()
 {
    let mut set = SentinelSet::start();
    // The stores use their own ACL user, so the replicas (which authenticate as the
    // default user) can be kept from reconnecting to the primary below.
    for node in &set.nodes {
        let ok = cli(
            node.port,
            &["ACL", "SETUSER", "store", "on", ">pw", "~*", "&*", "+@all"],
        );
        assert_eq!(ok.trim(), "OK", "{ok}");
    }
    let builder = |set: &SentinelSet| {
        RedisStore::sentinel([set.sentinel_url()], set.service)
            .key_prefix("{cut}:")
            .credentials(Some("store"), "pw")
    };
    let unacknowledged = |set: &SentinelSet| {
        builder(set)
            .replica_ack(tokenflight_redis::ReplicaAck::None)
            .build()
            .unwrap()
    };
    let issuer = Issuer::new();
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ));
    let seed = unacknowledged(&set);
    tokenflight_tests::save_locked(&seed, &issuer.login(clock.now()).with_generation(1))
        .await
        .unwrap();
    clock.advance(LIFETIME);
    set.sync_replicas(2);

    // Cut the replicas off: they lose their link and cannot log in again.
    let primary = set.primary_port();
    // (As the default user is off now, the admin commands log in as `store`.)
    let as_store = ["--no-auth-warning", "--user", "store", "--pass", "pw"];
    let admin = |args: &[&str]| cli(primary, &[&as_store[..], args].concat());
    assert_eq!(admin(&["ACL", "SETUSER", "default", "off"]).trim(), "OK");
    admin(&["CLIENT", "KILL", "TYPE", "replica"]);
    common::deployments::wait_until("the primary has no replica", || {
        admin(&["INFO", "replication"]).contains("connected_slaves:0")
    });

    // With the default acknowledgement nobody may refresh now.
    let safe = builder(&set)
        .replica_ack_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(matches!(safe.lock().await, Err(StoreError::Unavailable(_))));

    // Without it, a takes the lock, reads the token and parks in its token source.
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (go, go_rx) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((entered_tx, go_rx))));
    let a_issuer = issuer.clone();
    let parked_source = from_fn(move |cx: RefreshContext| {
        let gate = gate.lock().unwrap().take();
        let issuer = a_issuer.clone();
        async move {
            if let Some((entered, go)) = gate {
                let _ = entered.send(());
                let _ = go.await;
            }
            let presented = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
            issuer.refresh(presented.as_deref(), cx.now)
        }
    });
    let a = flight(unacknowledged(&set), parked_source, &clock);
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.token().await }
    });
    guarded("a reaches its token source", entered)
        .await
        .unwrap();

    let (set, new) = tokio::task::spawn_blocking(move || {
        let new = set.fail_over(0);
        (set, new)
    })
    .await
    .unwrap();
    let holder = cli(new, &["GET", "{cut}:lock"]);
    assert_eq!(holder.trim(), "", "the promoted replica never saw a's lock");

    // b finds the lock free on the new primary and refreshes with the stored token.
    let b = flight(unacknowledged(&set), issuer.source(), &clock);
    let mut b_token = None;
    for _ in 0..100 {
        match b.token().await {
            Ok(token) => {
                b_token = Some(token);
                break;
            }
            Err(error) => {
                assert_eq!(
                    kind_of(error.refresh_error()),
                    RefreshErrorKind::Store,
                    "{error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(b_token.expect("b got a token").generation(), 2);
    assert_eq!(issuer.reuses(), 0);

    // a resumes and presents the refresh token b already spent.
    go.send(()).unwrap();
    let a_result = guarded("a's refresh", a_task).await.unwrap();
    assert!(a_result.is_err(), "a's refresh was refused");
    assert_eq!(issuer.calls(), 2);
    assert_eq!(
        issuer.reuses(),
        1,
        "the window without acknowledgement: one reuse"
    );
    drop(set);
}

/// A fleet worker process (see `common/fleet.rs`); run by the fleet test above.
#[test]
#[ignore = "a worker process started by the sentinel fleet test"]
fn sentinel_fleet_worker() {
    common::fleet::worker();
}

/// A failure's severity and cause as one value, for the tables and assertions here
/// (the 0.1 API keeps them on two axes: `is_permanent()` and `cause()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)]
enum RefreshErrorKind {
    Transient,
    Permanent,
    Timeout,
    Store,
    Panicked,
}

#[allow(dead_code)]
fn kind_of(error: &tokenflight::RefreshError) -> RefreshErrorKind {
    match error.cause() {
        tokenflight::Cause::Timeout => RefreshErrorKind::Timeout,
        tokenflight::Cause::Store => RefreshErrorKind::Store,
        tokenflight::Cause::Panicked => RefreshErrorKind::Panicked,
        _ if error.is_permanent() => RefreshErrorKind::Permanent,
        _ => RefreshErrorKind::Transient,
    }
}
