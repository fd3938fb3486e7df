//! The fleet: 9 independent clients (each a `SingleFlight` with its own `RedisStore`
//! connection and its own `RefreshTokenGrant` over `tokenflight_reqwest::BareTransport`)
//! in 3 OS processes, against the testkit's authorization server with rotating refresh
//! tokens and reuse detection, over 6 expiry cycles: exactly one token-endpoint call per
//! cycle, zero reuse detections, every client ends each cycle on the same new token,
//! and that token is accepted by the protected API.
//!
//! The machinery (worker processes, the line protocol, the reports) is in
//! `common/fleet.rs`, shared with the TLS, cluster and Sentinel fleet tests.

use std::time::Duration;

use crate::common;

use common::RedisServer;
use common::fleet::{CLIENTS_PER_PROCESS, CYCLES, Deployment, Fleet, PROCESSES};

const WORKER: &str = "fleet::fleet_worker";

#[test]
fn a_fleet_of_processes_makes_one_refresh_per_expiry() {
    let redis = RedisServer::start();
    let mut fleet = Fleet::start(&Deployment::node(redis.url()), WORKER);
    for cycle in 1..=CYCLES {
        fleet.advance(cycle);
        let reports = fleet.go(cycle);
        fleet.assert_all_on(&reports, cycle + 1);
        let counters = fleet.server.counters();
        assert_eq!(
            counters.refresh_token_calls, cycle,
            "one token-endpoint call per cycle"
        );
        assert_eq!(counters.token_calls, cycle);
        assert_eq!(counters.token_errors, 0, "no invalid_grant");
        assert_eq!(counters.reuse_detections, 0);
        assert_eq!(counters.rejections, 0);
        assert_eq!(
            counters.resource_calls,
            cycle * (PROCESSES * CLIENTS_PER_PROCESS) as u64
        );
    }
    fleet.quit();
}

#[test]
fn a_fleet_of_processes_survives_redis_being_killed_and_restarted() {
    let mut redis = RedisServer::start();
    let mut fleet = Fleet::start(&Deployment::node(redis.url()), WORKER);
    fleet.advance(1);
    let reports = fleet.go(1);
    fleet.assert_all_on(&reports, 2);

    // Redis dies mid-run. The next expiry: every client of every process gets a typed
    // `Unavailable` error, promptly (the protocol's hang guard would fail otherwise),
    // and nobody calls the token endpoint without the fleet lock.
    redis.kill();
    fleet.advance(2);
    for (index, report) in fleet.go(2).iter().enumerate() {
        assert_eq!(
            report.errors, CLIENTS_PER_PROCESS,
            "worker {index}: {report:?}"
        );
        assert_eq!(
            report.unavailable, CLIENTS_PER_PROCESS,
            "worker {index}: {report:?}"
        );
    }
    assert_eq!(fleet.server.counters().token_calls, 1);

    // Back on the same port (empty: it keeps no data). Callers retry, as they would;
    // errors until the connections are back must still be typed.
    redis.restart();
    let mut recovered = None;
    for _ in 0..100 {
        let reports = fleet.go(2);
        if reports.iter().all(|r| r.errors == 0) {
            recovered = Some(reports);
            break;
        }
        for report in &reports {
            assert_eq!(report.errors, report.unavailable, "{report:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reports = recovered.expect("the fleet recovered after the restart");
    fleet.assert_all_on(&reports, 3);
    let counters = fleet.server.counters();
    assert_eq!(
        counters.refresh_token_calls, 2,
        "one refresh for the recovery"
    );
    assert_eq!(counters.reuse_detections, 0);
    assert_eq!(counters.token_errors, 0);

    // And the next expiry is business as usual.
    fleet.advance(3);
    let reports = fleet.go(3);
    fleet.assert_all_on(&reports, 4);
    assert_eq!(fleet.server.counters().refresh_token_calls, 3);
    assert_eq!(fleet.server.counters().reuse_detections, 0);
    fleet.quit();
}

/// A fleet worker process (see `common/fleet.rs`); run by the tests above, not on its own.
#[test]
#[ignore = "a worker process started by the fleet tests"]
fn fleet_worker() {
    common::fleet::worker();
}
