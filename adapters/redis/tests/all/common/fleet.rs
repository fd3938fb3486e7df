//! The fleet machinery shared by the fleet tests: 9 independent clients (each a
//! `SingleFlight` with its own `RedisStore` connection and its own `RefreshTokenGrant`
//! over `tokenflight_reqwest::BareTransport`) in 3 OS processes, against the testkit's
//! authorization server with rotating refresh tokens and reuse detection.
//!
//! The worker processes are the test binary itself, re-run with `FLEET_WORKER` set and
//! only its ignored worker test selected. Workers and the parent talk over stdin/stdout,
//! one line per step; each cycle is a barrier (every worker moves its clock past the
//! token's expiry first, then all are told to go at once). Which Redis the workers use
//! (one node, a cluster, Sentinel; TLS; replica acknowledgement) is a [`Deployment`],
//! handed to them in environment variables.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{
    SingleFlight, Token, adapter::Clock, adapter::Transport, config::Backoff, store::StoreError,
    store::TokenStore, test_util::ManualClock,
};
use tokenflight_redis::{RedisStore, RedisStoreBuilder, ReplicaAck};
use tokenflight_reqwest::BareTransport;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

/// Where the fleet's Redis is, in a form that crosses into the worker processes.
#[derive(Clone)]
pub struct Deployment {
    /// `node`, `cluster` or `sentinel`.
    pub kind: &'static str,
    pub urls: Vec<String>,
    /// The Sentinel service name.
    pub service: String,
    /// A PEM file with the private CA for `rediss://`, or empty.
    pub ca_file: String,
    /// `default`, `none` or a number of replicas.
    pub ack: String,
}

impl Deployment {
    pub fn node(url: String) -> Deployment {
        Deployment {
            kind: "node",
            urls: vec![url],
            service: String::new(),
            ca_file: String::new(),
            ack: "default".into(),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_KIND", self.kind.to_owned()),
            ("FLEET_URLS", self.urls.join(" ")),
            ("FLEET_SERVICE", self.service.clone()),
            ("FLEET_CA_FILE", self.ca_file.clone()),
            ("FLEET_ACK", self.ack.clone()),
        ]
    }

    fn from_env() -> Deployment {
        let env = |name: &str| std::env::var(name).unwrap();
        Deployment {
            kind: match env("FLEET_KIND").as_str() {
                "node" => "node",
                "cluster" => "cluster",
                "sentinel" => "sentinel",
                other => panic!("unknown deployment {other}"),
            },
            urls: env("FLEET_URLS").split(' ').map(str::to_owned).collect(),
            service: env("FLEET_SERVICE"),
            ca_file: env("FLEET_CA_FILE"),
            ack: env("FLEET_ACK"),
        }
    }

    /// A store builder for this deployment with the fleet's key prefix.
    pub fn builder(&self) -> RedisStoreBuilder {
        let builder = match self.kind {
            "node" => RedisStore::builder(self.urls[0].as_str()),
            "cluster" => RedisStore::cluster(self.urls.iter().map(String::as_str)),
            _ => RedisStore::sentinel(self.urls.iter().map(String::as_str), self.service.as_str()),
        };
        let builder = if self.ca_file.is_empty() {
            builder
        } else {
            builder.tls_ca_pem(std::fs::read(&self.ca_file).unwrap())
        };
        let builder = match self.ack.as_str() {
            "default" => builder,
            "none" => builder.replica_ack(ReplicaAck::None),
            n => builder.replica_ack(ReplicaAck::Required(n.parse().unwrap())),
        };
        builder.key_prefix(PREFIX)
    }
}

pub const PROCESSES: usize = 3;
pub const CLIENTS_PER_PROCESS: usize = 3;
pub const CYCLES: u64 = 6;
/// How far the clocks move per cycle: past the testkit's one-hour token lifetime.
pub const STEP: Duration = Duration::from_secs(2 * 3600);
/// Bound on one step of the protocol: a hang fails the test instead of stalling CI.
pub const HANG_GUARD: Duration = Duration::from_secs(60);
pub const PREFIX: &str = "fleet:";

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30)
}

pub struct Worker {
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
    deployment: &Deployment,
    worker_test: &str,
    server: &TestServer,
    lines: mpsc::Sender<(usize, String)>,
) -> Worker {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            worker_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FLEET_WORKER", "1")
        .envs(deployment.env())
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
pub struct Report {
    pub generations: Vec<u64>,
    /// The tail of the access token its clients hold (all the same, or "-").
    pub token: String,
    pub errors: usize,
    /// Errors that are the store's `Unavailable`, seen through the refresh error.
    pub unavailable: usize,
    /// Clients whose API request with their token was answered 200.
    pub api_ok: usize,
    /// The first error's message and causes, for failure messages.
    pub first_error: String,
}

impl Report {
    pub fn parse(line: &str) -> Report {
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
            first_error: line
                .split_once("first_error=")
                .map_or(String::new(), |(_, e)| e.to_owned()),
        }
    }

    pub fn all_on(&self, generation: u64) -> bool {
        self.errors == 0
            && self.api_ok == CLIENTS_PER_PROCESS
            && self.generations == vec![generation; CLIENTS_PER_PROCESS]
    }
}

/// The parent's view: the authorization server, the seed store and the workers.
pub struct Fleet {
    pub server: TestServer,
    rt: tokio::runtime::Runtime,
    seed: RedisStore,
    workers: Vec<Worker>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl Fleet {
    /// Stores an expired login for the fleet and starts the workers, which run
    /// `worker_test` of this test binary (a test that calls [`worker`]).
    pub fn start(deployment: &Deployment, worker_test: &str) -> Fleet {
        let server = TestServer::start(TestServerConfig::default());
        // The login: stored once for the whole fleet, already expired at the first cycle.
        let (access, _) = server.issue_access_token();
        let login = Token::new(access)
            .with_refresh(server.issue_refresh_token())
            .expires_at(epoch())
            .with_generation(1);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let seed = rt.block_on(async {
            let seed = deployment.builder().connect().await.unwrap();
            tokenflight_tests::save_locked(&seed, &login).await.unwrap();
            seed
        });
        server.reset_counters();
        let (tx, lines) = mpsc::channel();
        let workers = (0..PROCESSES)
            .map(|i| spawn_worker(i, deployment, worker_test, &server, tx.clone()))
            .collect();
        let mut fleet = Fleet {
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
    pub fn collect(&mut self, expect: &str) -> Vec<String> {
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

    pub fn tell(&mut self, line: &str) {
        for worker in &mut self.workers {
            writeln!(worker.stdin, "{line}").unwrap();
            worker.stdin.flush().unwrap();
        }
    }

    /// Moves every worker's clock to `cycle` (past the current token's expiry).
    pub fn advance(&mut self, cycle: u64) {
        self.tell(&format!("advance {cycle}"));
        self.collect("advanced");
    }

    /// Every client of every worker asks for a token at once and uses it once.
    pub fn go(&mut self, cycle: u64) -> Vec<Report> {
        self.tell(&format!("go {cycle}"));
        self.collect("done")
            .iter()
            .map(|l| Report::parse(l))
            .collect()
    }

    /// Asserts the whole fleet is on one token of `generation`, the one stored.
    pub fn assert_all_on(&self, reports: &[Report], generation: u64) {
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
    pub fn stored(&self) -> Token {
        for _ in 0..50 {
            match self.rt.block_on(self.seed.load()) {
                Ok(token) => return token.expect("a stored token"),
                Err(StoreError::Unavailable(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(other) => panic!("{other:?}"),
            }
        }
        panic!("the seed store did not reconnect");
    }

    pub fn quit(mut self) {
        self.tell("quit");
        for mut worker in self.workers.drain(..) {
            let status = worker.child.wait().unwrap();
            assert!(status.success(), "worker exited with {status}");
        }
    }
}

/// The body of a fleet worker process (see the module docs); each fleet test binary
/// has an ignored test that calls it.
pub fn worker() {
    if std::env::var_os("FLEET_WORKER").is_none() {
        return;
    }
    let deployment = Deployment::from_env();
    let env = |name: &str| std::env::var(name).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clock = Arc::new(ManualClock::new(epoch()));
    let transport: Arc<dyn Transport> = Arc::new(BareTransport::default());
    let clients: Vec<SingleFlight> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS_PER_PROCESS {
            // Each client has its own connection and its own grant: independent
            // replicas that only share Redis.
            let store = deployment
                .builder()
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
                SingleFlight::builder()
                    .store(store)
                    .source(grant)
                    .clock(clock.clone())
                    .refresh_ahead(None)
                    // The parent decides when to retry after a failure.
                    .backoff(Backoff::none())
                    .build()
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
                // The whole chain, so a failing test says why.
                let mut text = error.to_string();
                let mut cause = std::error::Error::source(error.refresh_error());
                while let Some(e) = cause {
                    text.push_str(&format!(": {e}"));
                    cause = e.source();
                }
                errors.push(text);
            }
        }
    }
    // Last on the line: the first error, which may contain spaces.
    format!(
        "generations={} token={fingerprint} errors={} unavailable={unavailable} api_ok={api_ok} \
         first_error={}",
        generations.join(","),
        errors.len(),
        errors.first().map_or("-", String::as_str)
    )
}
