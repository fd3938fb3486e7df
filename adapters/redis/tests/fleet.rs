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
use tokenflight::{Builder, Clock, ManualClock, SingleFlight, Token, TokenStore, Transport};
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

/// Waits for one line starting with `expect` from every worker; returns them by worker.
fn collect(lines: &mpsc::Receiver<(usize, String)>, expect: &str) -> Vec<String> {
    let mut got: Vec<Option<String>> = vec![None; PROCESSES];
    while got.iter().any(Option::is_none) {
        let (index, line) = lines
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

fn tell(workers: &mut [Worker], line: &str) {
    for worker in workers {
        writeln!(worker.stdin, "{line}").unwrap();
        worker.stdin.flush().unwrap();
    }
}

#[test]
fn a_fleet_of_processes_makes_one_refresh_per_expiry() {
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
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|i| spawn_worker(i, &redis, &server, tx.clone()))
        .collect();
    collect(&lines, "ready");

    for cycle in 1..=CYCLES {
        tell(&mut workers, &format!("advance {cycle}"));
        collect(&lines, "advanced");
        tell(&mut workers, &format!("go {cycle}"));
        let reports = collect(&lines, "done");
        let expected = format!(
            "done {cycle} generations={}",
            vec![(cycle + 1).to_string(); CLIENTS_PER_PROCESS].join(",")
        );
        for (index, report) in reports.iter().enumerate() {
            assert!(
                report.starts_with(&expected) && report.ends_with("errors=0 api_ok=3"),
                "cycle {cycle}, worker {index}: {report}"
            );
        }
        // Every client in every process holds the same token: the one stored.
        let stored = rt.block_on(seed.load()).unwrap().unwrap();
        assert_eq!(stored.generation(), cycle + 1);
        let fingerprints: Vec<&str> = reports
            .iter()
            .map(|r| {
                r.split(" token=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(
            fingerprints.iter().all(|f| *f == fingerprints[0]),
            "{reports:?}"
        );

        let counters = server.counters();
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
    tell(&mut workers, "quit");
    for mut worker in workers.drain(..) {
        let status = worker.child.wait().unwrap();
        assert!(status.success(), "worker exited with {status}");
    }
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
            Err(error) => errors.push(error.to_string()),
        }
    }
    format!(
        "generations={} token={fingerprint} errors={} api_ok={api_ok}",
        generations.join(","),
        errors.len()
    )
}
