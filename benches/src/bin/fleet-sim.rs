//! Fleet simulator (issue 20): `REPLICAS` coordinators, each a `SingleFlight` with its
//! own `RedisStore` connection and its own `RefreshTokenGrant`, as tasks in this
//! process, against a `redis-server` this bin starts on a free loopback port and the
//! testkit's authorization server (rotating refresh tokens, reuse detection) with short
//! tokens. Every replica asks for a token every `--tick-ms`; after a warm-up the bin
//! counts Redis commands (`INFO commandstats`), token-endpoint calls, refresh-token
//! reuse, and the adoption latency: from the save of a new token (the saving store
//! hands it to its own watchers when Redis confirms the save) to the moment the last
//! replica's coordinator holds it (each replica's store pushes it to the coordinator,
//! then to this bin's watcher registered after it — so the watcher's time is the
//! adoption's). The time until each replica's next `token()` returned it is reported
//! too (it includes up to one tick).
//!
//! `cargo run --release -p tokenflight-benches --bin fleet-sim -- REPLICAS [SECONDS]`
//!
//! Multi-process mode: `fleet-sim --processes N [SECONDS]` starts N real OS processes
//! (this bin again), each one tokenflight-reqwest client with default settings and its
//! own `RedisStore`, with 5 workers calling the testkit's protected API; see
//! `processes.rs`.

#[path = "fleet-sim/processes.rs"]
mod processes;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{
    SingleFlight, Token, adapter::Transport, store::StoreWatcher, store::TokenStore,
};
use tokenflight_redis::RedisStore;
use tokenflight_reqwest::BareTransport;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

/// Token lifetime: short, so a run sees several refresh cycles.
const LIFETIME: Duration = Duration::from_secs(3);

/// Per generation, when each replica's store handed it over (after its coordinator).
type Pushed = Arc<Mutex<BTreeMap<u64, Vec<Option<Instant>>>>>;

/// This bin's watcher on one replica's store, registered after the coordinator's: when
/// it is called, the coordinator has adopted the token (or ignored it as its own).
struct Recorder {
    index: usize,
    replicas: usize,
    flight: SingleFlight,
    pushed: Pushed,
    /// Pushes the coordinator did not hold afterwards (should be the saver's only).
    missed: Arc<std::sync::atomic::AtomicU64>,
}

impl StoreWatcher for Recorder {
    fn token_saved(&self, token: Token) {
        let at = Instant::now();
        let generation = token.generation();
        if self
            .flight
            .current()
            .is_none_or(|t| t.generation() < generation)
        {
            self.missed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut pushed = self.pushed.lock().expect("pushed");
        let row = pushed
            .entry(generation)
            .or_insert_with(|| vec![None; self.replicas]);
        row[self.index].get_or_insert(at);
    }
}

/// `FLEET_PUSH=0`: the store without its push (as before issue 20's push), to compare.
struct NoPush(RedisStore);

impl TokenStore for NoPush {
    fn load(
        &self,
    ) -> futures::future::BoxFuture<'_, Result<Option<Token>, tokenflight::store::StoreError>> {
        self.0.load()
    }
    fn lock(
        &self,
    ) -> futures::future::BoxFuture<
        '_,
        Result<Box<dyn tokenflight::store::StoreGuard>, tokenflight::store::StoreError>,
    > {
        self.0.lock()
    }
}

pub(crate) struct Redis(Child, pub(crate) u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (redis-tools) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn start_redis() -> Redis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "10000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let redis = Redis(child, port);
    for _ in 0..100 {
        if cli(port, &["PING"]).contains("PONG") {
            return redis;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not start");
}

/// Total calls over all commands in `INFO commandstats` (commands run by scripts
/// included: Redis counts them too), and the per-command split.
pub(crate) fn commandstats(port: u16) -> (u64, BTreeMap<String, u64>) {
    let mut by = BTreeMap::new();
    for line in cli(port, &["INFO", "commandstats"]).lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        by.insert(name.to_owned(), calls);
    }
    // The bin's own INFO/CONFIG calls are not the fleet's work.
    for own in ["info", "config|resetstat", "ping"] {
        by.remove(own);
    }
    (by.values().sum(), by)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    if std::env::var_os(processes::CHILD).is_some() {
        processes::child();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--processes") {
        let mut args = std::env::args().skip(2);
        let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
        let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
        processes::parent(n, seconds);
        return;
    }
    let mut args = std::env::args().skip(1);
    let replicas: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(12);
    let push = std::env::var("FLEET_PUSH").map_or(true, |v| v != "0");
    let tick = Duration::from_millis(
        std::env::var("FLEET_TICK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );

    let redis = start_redis();
    let port = redis.1;
    let server = TestServer::start(TestServerConfig {
        token_lifetime: LIFETIME,
        ..TestServerConfig::default()
    });
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let url = format!("redis://127.0.0.1:{port}");

    // first_seen[generation][replica] = when that replica first held it.
    let seen: Arc<Mutex<BTreeMap<u64, Vec<Instant>>>> = Arc::default();
    let transport: Arc<dyn Transport> = Arc::new(BareTransport::default());
    let pushed: Pushed = Arc::default();
    let missed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut recorders = Vec::with_capacity(replicas);
    let flights = rt.block_on(async {
        let mut flights = Vec::with_capacity(replicas);
        for index in 0..replicas {
            let store = RedisStore::builder(url.as_str())
                .connect()
                .await
                .expect("a replica's redis connection");
            let grant =
                RefreshTokenGrant::new(transport.clone(), &server.token_url(), &server.client_id())
                    .expect("grant")
                    .client_secret(server.client_secret());
            let builder = if push {
                SingleFlight::builder().store(store.clone())
            } else {
                SingleFlight::builder().store(NoPush(store.clone()))
            };
            let flight = builder.source(grant).build().expect("a coordinator");
            // After the coordinator's own registration: called after it adopted.
            let recorder: Arc<dyn StoreWatcher> = Arc::new(Recorder {
                index,
                replicas,
                flight: flight.clone(),
                pushed: pushed.clone(),
                missed: missed.clone(),
            });
            // Without push the store reads nothing for nobody (the figures stay those
            // of the store without push); the token-call spread is the adoption then.
            if push {
                store.watch(Arc::downgrade(&recorder) as Weak<dyn StoreWatcher>);
            }
            recorders.push(recorder);
            flights.push(flight);
        }
        flights
    });
    // The login, stored once for the whole fleet (obtained now) after the replicas
    // connected — 1,000 connections take long enough that an older login would be in
    // every replica's refresh-ahead window at the start.
    let (access, _) = server.issue_access_token();
    let login = Token::new(access)
        .with_refresh(server.issue_refresh_token())
        .expires_in(LIFETIME, SystemTime::now())
        .with_generation(1);
    let seed = rt.block_on(async {
        let seed = RedisStore::builder(url.as_str())
            .connect()
            .await
            .expect("redis");
        // Saved under the lock, which also puts the lock's scripts into Redis's script
        // cache, so the first cycle's NOSCRIPT/SCRIPT LOAD are not counted as the
        // fleet's work.
        let guard = seed.lock().await.expect("seed lock");
        let _ = guard.load().await;
        guard.save(&login).await.expect("seed save");
        guard.unlock().await;
        seed
    });
    let saved_at = Instant::now();
    // Warm-up: everybody has the login (connections, script loads, first reads done).
    rt.block_on(async {
        for f in &flights {
            f.token().await.expect("the login");
        }
    });
    server.reset_counters();
    cli(port, &["CONFIG", "RESETSTAT"]);
    let started = Instant::now();
    if std::env::var_os("FLEET_DEBUG").is_some() {
        eprintln!("login age at start: {:?}", started - saved_at);
    }
    pushed.lock().expect("pushed").clear();
    missed.store(0, std::sync::atomic::Ordering::Relaxed);
    let until = started + Duration::from_secs(seconds);

    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (index, flight) in flights.iter().cloned().enumerate() {
            let seen = seen.clone();
            let errors = errors.clone();
            // Spread the ticks so the replicas do not ask in lockstep.
            let offset = tick.mul_f64(index as f64 / replicas as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut last = 1;
                while Instant::now() < until {
                    match flight.token().await {
                        Ok(token) if token.generation() != last => {
                            last = token.generation();
                            let at = Instant::now();
                            let mut seen = seen.lock().expect("seen");
                            let row = seen.entry(last).or_insert_with(|| vec![started; replicas]);
                            row[index] = at;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(tick).await;
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    let (commands, by) = commandstats(port);
    if std::env::var_os("FLEET_DEBUG").is_some() {
        let sum = |f: fn(&tokenflight::observe::Stats) -> u64| -> u64 {
            flights.iter().map(|fl| f(&fl.stats())).sum()
        };
        eprintln!(
            "flights={} adopted={} pushed={} coalesced={} source_calls={} ran_for={:?}",
            sum(|s| s.flights),
            sum(|s| s.adopted),
            sum(|s| s.pushed),
            sum(|s| s.coalesced),
            sum(|s| s.source_calls),
            started.elapsed()
        );
    }
    let counters = server.counters();
    drop(seed);

    // Complete cycles only: generations every replica reached.
    let seen = seen.lock().expect("seen");
    let mut spread = Vec::new();
    for row in seen.values() {
        if row.iter().all(|at| *at > started) {
            let first = row.iter().min().copied().unwrap_or(started);
            let last = row.iter().max().copied().unwrap_or(started);
            spread.push(last - first);
        }
    }
    spread.sort();
    // Save → last replica's coordinator holds it, for generations every replica got.
    let pushed = pushed.lock().expect("pushed");
    let mut latency: Vec<Duration> = pushed
        .values()
        .filter_map(|row| {
            let times: Option<Vec<Instant>> = row.iter().copied().collect();
            let times = times?;
            let first = times.iter().min()?;
            let last = times.iter().max()?;
            Some(*last - *first)
        })
        .collect();
    latency.sort();
    if std::env::var_os("FLEET_DEBUG").is_some() {
        for (generation, row) in pushed.iter() {
            let times: Vec<Instant> = row.iter().flatten().copied().collect();
            let first = times
                .iter()
                .min()
                .map(|t| t.saturating_duration_since(started));
            let last = times
                .iter()
                .max()
                .map(|t| t.saturating_duration_since(started));
            eprintln!(
                "generation {generation}: got by {} first {first:?} last {last:?}",
                times.len()
            );
        }
    }
    let cycles = counters.refresh_token_calls.max(1);
    println!(
        "replicas={replicas} seconds={seconds} tick={tick:?} token_endpoint_calls={} refresh_calls={} \
         generations_seen={} complete_cycles={} reuse={} token_errors={} caller_errors={} \
         redis_commands={commands} per_replica_per_cycle={:.2} \
         pushed_generations={} complete_pushes={} push_not_held={} \
         adoption_latency_p50={:?} adoption_latency_p99={:?} adoption_latency_max={:?} \
         token_call_spread_p50={:?} token_call_spread_p99={:?} token_call_spread_max={:?}",
        counters.token_calls,
        counters.refresh_token_calls,
        seen.len(),
        spread.len(),
        counters.reuse_detections,
        counters.token_errors,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        commands as f64 / (replicas as f64 * cycles as f64),
        pushed.len(),
        latency.len(),
        missed.load(std::sync::atomic::Ordering::Relaxed),
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        latency.last().copied().unwrap_or_default(),
        percentile(&spread, 0.5),
        percentile(&spread, 0.99),
        spread.last().copied().unwrap_or_default(),
    );
    println!("commands: {by:?}");
}
