//! The fleet: 9 independent clients (each a `SingleFlight` with its own `RedisStore`
//! connection and its own `RefreshTokenGrant` over `tokenflight_reqwest::BareTransport`)
//! in 3 OS processes, against the testkit's authorization server with rotating refresh
//! tokens and reuse detection, over 6 expiry cycles: exactly one token-endpoint call per
//! cycle, zero reuse detections, every client ends each cycle on the same new token,
//! and that token is accepted by the protected API.
//!
//! The worker processes are this test binary itself, re-run with `FLEET_WORKER` set and
//! only the ignored `fleet_worker` test selected. Workers and the parent talk over
//! stdin/stdout, one line per step; each cycle is a barrier (every worker moves its
//! clock past the token's expiry first, then all are told to go at once).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

mod common;

use common::RedisServer;
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{
    Backoff, Builder, Clock, ManualClock, SingleFlight, StoreError, Token, TokenStore, Transport,
};
use tokenflight_redis::RedisStore;
use tokenflight_reqwest::BareTransport;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

const PROCESSES: usize = 3;
const CLIENTS_PER_PROCESS: usize = 3;
const CYCLES: u64 = 6;
/// How far the clocks move per cycle: past the testkit's one-hour token lifetime.
const STEP: Duration = Duration::from_secs(2 * 3600);
/// Bound on one step of the protocol: a hang fails the test instead of stalling CI.
const HANG_GUARD: Duration = Duration::from_secs(60);
const PREFIX: &str = "fleet:";

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30)
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(
    index: usize,
    redis: &RedisServer,
    server: &TestServer,
    lines: mpsc::Sender<(usize, String)>,
) -> Worker {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "fleet_worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FLEET_WORKER", "1")
        .env("FLEET_REDIS_URL", redis.url())
        .env("FLEET_TOKEN_URL", server.token_url())
        .env("FLEET_API_URL", server.api_url("fleet"))
        .env("FLEET_CLIENT_ID", server.client_id())
        .env("FLEET_CLIENT_SECRET", server.client_secret())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        // libtest may print "test fleet_worker ... " on the same line first.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find("FLEET ") {
                if lines.send((index, line[at + 6..].to_owned())).is_err() {
                    return;
                }
            }
        }
        // Fails the waiting parent at once instead of at its hang guard.
        let _ = lines.send((index, "exited".to_owned()));
    });
    Worker { child, stdin }
}

/// What one worker reported for one `go`.
#[derive(Debug)]
struct Report {
    generations: Vec<u64>,
    /// The tail of the access token its clients hold (all the same, or "-").
    token: String,
    errors: usize,
    /// Errors that are the store's `Unavailable`, seen through the refresh error.
    unavailable: usize,
    /// Clients whose API request with their token was answered 200.
    api_ok: usize,
}

impl Report {
    fn parse(line: &str) -> Report {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|w| w.strip_prefix(name).and_then(|w| w.strip_prefix('=')))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        Report {
            generations: field("generations")
                .split(',')
                .filter(|g| !g.is_empty())
                .map(|g| g.parse().unwrap())
                .collect(),
            token: field("token"),
            errors: field("errors").parse().unwrap(),
            unavailable: field("unavailable").parse().unwrap(),
            api_ok: field("api_ok").parse().unwrap(),
        }
    }

    fn all_on(&self, generation: u64) -> bool {
        self.errors == 0
            && self.api_ok == CLIENTS_PER_PROCESS
            && self.generations == vec![generation; CLIENTS_PER_PROCESS]
    }
}

/// The parent's view: Redis, the authorization server, the seed store and the workers.
struct Fleet {
    redis: RedisServer,
    server: TestServer,
    rt: tokio::runtime::Runtime,
    seed: RedisStore,
    workers: Vec<Worker>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl Fleet {
    fn start() -> Fleet {
        let redis = RedisServer::start();
        let server = TestServer::start(TestServerConfig::default());
        // The login: stored once for the whole fleet, already expired at the first cycle.
        let (access, _) = server.issue_access_token();
        let login = Token::new(access)
            .with_refresh(server.issue_refresh_token())
            .expires_at(epoch())
            .with_generation(1);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let seed = rt.block_on(async {
            let seed = RedisStore::builder(redis.url())
                .key_prefix(PREFIX)
                .connect()
                .await
                .unwrap();
            seed.save(&login, None).await.unwrap();
            seed
        });
        server.reset_counters();
        let (tx, lines) = mpsc::channel();
        let workers = (0..PROCESSES)
            .map(|i| spawn_worker(i, &redis, &server, tx.clone()))
            .collect();
        let mut fleet = Fleet {
            redis,
            server,
            rt,
            seed,
            workers,
            lines,
        };
        fleet.collect("ready");
        fleet
    }

    /// Waits for one line starting with `expect` from every worker, by worker.
    fn collect(&mut self, expect: &str) -> Vec<String> {
        let mut got: Vec<Option<String>> = vec![None; PROCESSES];
        while got.iter().any(Option::is_none) {
            let (index, line) = self
                .lines
                .recv_timeout(HANG_GUARD)
                .unwrap_or_else(|_| panic!("workers did not answer {expect:?} in time: {got:?}"));
            assert!(
                line.starts_with(expect),
                "worker {index} said {line:?}, expected {expect}"
            );
            assert!(got[index].is_none(), "worker {index} answered twice");
            got[index] = Some(line);
        }
        got.into_iter().map(Option::unwrap).collect()
    }

    fn tell(&mut self, line: &str) {
        for worker in &mut self.workers {
            writeln!(worker.stdin, "{line}").unwrap();
            worker.stdin.flush().unwrap();
        }
    }

    /// Moves every worker's clock to `cycle` (past the current token's expiry).
    fn advance(&mut self, cycle: u64) {
        self.tell(&format!("advance {cycle}"));
        self.collect("advanced");
    }

    /// Every client of every worker asks for a token at once and uses it once.
    fn go(&mut self, cycle: u64) -> Vec<Report> {
        self.tell(&format!("go {cycle}"));
        self.collect("done")
            .iter()
            .map(|l| Report::parse(l))
            .collect()
    }

    /// Asserts the whole fleet is on one token of `generation`, the one stored.
    fn assert_all_on(&self, reports: &[Report], generation: u64) {
        for (index, report) in reports.iter().enumerate() {
            assert!(report.all_on(generation), "worker {index}: {report:?}");
        }
        assert!(
            reports.iter().all(|r| r.token == reports[0].token),
            "{reports:?}"
        );
        assert_eq!(self.stored().generation(), generation);
    }

    /// The stored token. Retries while the seed store's connection is still the one
    /// from before a Redis restart (its first command then fails as `Unavailable`).
    fn stored(&self) -> Token {
        for _ in 0..50 {
            match self.rt.block_on(self.seed.load()) {
                Ok(token) => return token.expect("a stored token"),
                Err(StoreError::Unavailable(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(other) => panic!("{other:?}"),
            }
        }
        panic!("the seed store did not reconnect");
    }

    fn quit(mut self) {
        self.tell("quit");
        for mut worker in self.workers.drain(..) {
            let status = worker.child.wait().unwrap();
            assert!(status.success(), "worker exited with {status}");
        }
    }
}

#[test]
fn a_fleet_of_processes_makes_one_refresh_per_expiry() {
    let mut fleet = Fleet::start();
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
    let mut fleet = Fleet::start();
    fleet.advance(1);
    let reports = fleet.go(1);
    fleet.assert_all_on(&reports, 2);

    // Redis dies mid-run. The next expiry: every client of every process gets a typed
    // `Unavailable` error, promptly (the protocol's hang guard would fail otherwise),
    // and nobody calls the token endpoint without the fleet lock.
    fleet.redis.kill();
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
    fleet.redis.restart();
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

/// A fleet worker process (see the module docs); run by the test above, not on its own.
#[test]
#[ignore = "a worker process started by a_fleet_of_processes_makes_one_refresh_per_expiry"]
fn fleet_worker() {
    if std::env::var_os("FLEET_WORKER").is_none() {
        return;
    }
    let env = |name: &str| std::env::var(name).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clock = Arc::new(ManualClock::new(epoch()));
    let transport: Arc<dyn Transport> = Arc::new(BareTransport::default());
    let clients: Vec<SingleFlight> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS_PER_PROCESS {
            // Each client has its own connection and its own grant: independent
            // replicas that only share Redis.
            let store = RedisStore::builder(env("FLEET_REDIS_URL"))
                .key_prefix(PREFIX)
                .command_timeout(Duration::from_secs(1))
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .unwrap();
            let grant = RefreshTokenGrant::new(
                transport.clone(),
                &env("FLEET_TOKEN_URL"),
                &env("FLEET_CLIENT_ID"),
            )
            .unwrap()
            .client_secret(env("FLEET_CLIENT_SECRET"));
            clients.push(
                Builder::new()
                    .store(store)
                    .source(grant)
                    .clock(clock.clone())
                    .refresh_ahead(None)
                    // The parent decides when to retry after a failure.
                    .backoff(Backoff::none())
                    .build_flight()
                    .unwrap(),
            );
        }
        clients
    });
    println!("FLEET ready");
    let mut at = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split(' ');
        match (
            words.next(),
            words.next().map(|n| n.parse::<u64>().unwrap()),
        ) {
            (Some("advance"), Some(cycle)) => {
                clock.advance(STEP * u32::try_from(cycle - at).unwrap());
                at = cycle;
                assert_eq!(clock.now(), epoch() + STEP * u32::try_from(cycle).unwrap());
                println!("FLEET advanced {cycle}");
            }
            (Some("go"), Some(cycle)) => {
                let report = rt.block_on(run_cycle(&clients, &transport, &env("FLEET_API_URL")));
                println!("FLEET done {cycle} {report}");
            }
            (Some("quit"), _) => return,
            other => panic!("unknown command {other:?}"),
        }
    }
}

/// Every client asks for a token at once, then uses it once on the API.
async fn run_cycle(
    clients: &[SingleFlight],
    transport: &Arc<dyn Transport>,
    api_url: &str,
) -> String {
    let results = futures::future::join_all(clients.iter().map(|c| c.token())).await;
    let mut generations = Vec::new();
    let mut errors = Vec::new();
    let mut api_ok = 0;
    let mut unavailable = 0;
    let mut fingerprint = String::from("-");
    for result in results {
        match result {
            Ok(token) => {
                generations.push(token.generation().to_string());
                // The access token's tail identifies it without printing a whole secret.
                let access = token.access().expose();
                fingerprint = access[access.len().saturating_sub(8)..].to_owned();
                let request = http::Request::get(api_url)
                    .header("authorization", format!("Bearer {access}"))
                    .body(bytes::Bytes::new())
                    .unwrap();
                if transport
                    .send(request, 1 << 16)
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    api_ok += 1;
                }
            }
            Err(error) => {
                let cause = std::error::Error::source(error.refresh_error())
                    .and_then(|e| e.downcast_ref::<StoreError>());
                if matches!(cause, Some(StoreError::Unavailable(_))) {
                    unavailable += 1;
                }
                errors.push(error.to_string());
            }
        }
    }
    format!(
        "generations={} token={fingerprint} errors={} unavailable={unavailable} api_ok={api_ok}",
        generations.join(","),
        errors.len()
    )
}
