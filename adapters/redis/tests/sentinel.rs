//! A primary with two replicas, watched by a sentinel; the primary is killed mid-run.
//! The store follows the sentinel to the new primary; the lock and every saved token
//! were acknowledged by a replica (`WAIT`) before anyone relied on them, so across the
//! failover the fleet keeps its one-refresh-per-expiry promise with zero refresh-token
//! reuse.

mod common;

use std::time::Duration;

use common::deployments::SentinelSet;
use common::fleet::{CLIENTS_PER_PROCESS, CYCLES, Deployment, Fleet};
use tokenflight::{StoreError, TokenStore};
use tokenflight_redis::RedisStore;

const WORKER: &str = "sentinel_fleet_worker";

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

/// A fleet worker process (see `common/fleet.rs`); run by the fleet test above.
#[test]
#[ignore = "a worker process started by the sentinel fleet test"]
fn sentinel_fleet_worker() {
    common::fleet::worker();
}
