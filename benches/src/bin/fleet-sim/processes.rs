//! The fleet simulator's multi-process mode: N real OS processes (this bin, re-run with
//! [`CHILD`] set), each one tokenflight-reqwest client with default settings and a
//! `RedisStore` of its own on one local `redis-server` (started here on a free loopback
//! port), 5 workers each calling the testkit's protected API, all sharing one login
//! (saved to Redis once, here) with the testkit's authorization server: 3 s tokens,
//! rotating refresh tokens with reuse detection.
//!
//! The parent waits until every child holds the login, resets Redis's and the
//! server's counters, then tells all children to go at once. Each child runs for the
//! given seconds and prints one line: its store's round trips by reason
//! (`RedisStore::counters`), its requests and errors, and when each new generation
//! reached it (wall clock: the children share the machine's). The parent adds Redis's
//! `INFO commandstats` (commands run inside scripts included) and the server's counts.
//!
//! Save-to-adoption latency of a generation: from the first process that had it (the
//! saver: its store hands its own save to its watchers when Redis confirms it) to the
//! last process whose coordinator had it (this bin's watcher is registered after the
//! coordinator's, so it is called after the coordinator adopted).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{Token, store::StoreWatcher, store::TokenStore};
use tokenflight_redis::RedisStore;
use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

/// Set in a child's environment.
pub(crate) const CHILD: &str = "FLEET_CHILD";
const WORKERS: usize = 5;
const LIFETIME: Duration = Duration::from_secs(3);

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// When each generation first reached this process (after its coordinator).
#[derive(Default)]
struct Arrivals {
    at: Mutex<BTreeMap<u64, u64>>,
}

impl StoreWatcher for Arrivals {
    fn token_saved(&self, token: Token) {
        let at = unix_micros();
        self.at
            .lock()
            .expect("arrivals")
            .entry(token.generation())
            .or_insert(at);
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"))
}

/// One process of the fleet.
pub(crate) fn child() {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let seconds: u64 = env("FLEET_SECONDS").parse().expect("seconds");
    let tick = Duration::from_millis(env("FLEET_TICK_MS").parse().expect("tick"));
    let api = env("FLEET_API_URL");
    rt.block_on(async move {
        let store = RedisStore::builder(env("FLEET_REDIS_URL").as_str())
            .connect()
            .await
            .expect("a redis connection");
        let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
        let grant = RefreshTokenGrant::new(bare, &env("FLEET_TOKEN_URL"), &env("FLEET_CLIENT_ID"))
            .expect("grant")
            .client_secret(env("FLEET_CLIENT_SECRET"));
        let arrivals = Arc::new(Arrivals::default());
        let builder = TokenMiddleware::builder().store(store.clone());
        let middleware = builder
            .source(grant)
            .allowed_origin(&env("FLEET_ORIGIN"))
            .build()
            .expect("the middleware");
        let client = ClientBuilder::new(reqwest::Client::new())
            .with(middleware)
            .build();
        let watcher: Arc<dyn StoreWatcher> = arrivals.clone();
        store.watch(Arc::downgrade(&watcher) as Weak<dyn StoreWatcher>);
        // Warm-up: the login from the store.
        let warm = client.get(&api).send().await.expect("the first request");
        assert!(warm.status().is_success(), "warm-up: {}", warm.status());
        println!("ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("go");
        let before = store.counters();
        let until = Instant::now() + Duration::from_secs(seconds);
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..WORKERS {
            let client = client.clone();
            let api = api.clone();
            let (ok, errors) = (ok.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match client.get(&api).send().await {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        }
                        _ => errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    };
                    if !tick.is_zero() {
                        tokio::time::sleep(tick).await;
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        let c = store.counters();
        let arrivals: Vec<String> = arrivals
            .at
            .lock()
            .expect("arrivals")
            .iter()
            .map(|(g, at)| format!("{g}@{at}"))
            .collect();
        println!(
            "report loads={} lock_attempts={} locks_taken={} lock_retries_woken={} \
             lock_retries_polled={} lease_renewals={} fenced_loads={} fenced_saves={} \
             releases={} push_reads={} catch_up_reads={} waits_for_push={} ok={} errors={} \
             arrivals={}",
            c.loads - before.loads,
            c.lock_attempts - before.lock_attempts,
            c.locks_taken - before.locks_taken,
            c.lock_retries_woken - before.lock_retries_woken,
            c.lock_retries_polled - before.lock_retries_polled,
            c.lease_renewals - before.lease_renewals,
            c.fenced_loads - before.fenced_loads,
            c.fenced_saves - before.fenced_saves,
            c.releases - before.releases,
            c.push_reads - before.push_reads,
            c.catch_up_reads - before.catch_up_reads,
            c.waits_for_push - before.waits_for_push,
            ok.load(std::sync::atomic::Ordering::Relaxed),
            errors.load(std::sync::atomic::Ordering::Relaxed),
            arrivals.join(","),
        );
    });
}

const REASONS: [&str; 14] = [
    "loads",
    "lock_attempts",
    "locks_taken",
    "lock_retries_woken",
    "lock_retries_polled",
    "lease_renewals",
    "fenced_loads",
    "fenced_saves",
    "releases",
    "push_reads",
    "catch_up_reads",
    "waits_for_push",
    "ok",
    "errors",
];

/// Starts the fleet, runs it, prints the figures.
pub(crate) fn parent(processes: usize, seconds: u64) {
    let redis = super::start_redis();
    let port = redis.1;
    let url = format!("redis://127.0.0.1:{port}");
    let server = TestServer::start(TestServerConfig {
        token_lifetime: LIFETIME,
        ..TestServerConfig::default()
    });
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let tick = std::env::var("FLEET_TICK_MS").unwrap_or_else(|_| "10".into());
    // The login, saved once for the whole fleet, under the lock (which also loads the
    // scripts into Redis's cache before the counted run).
    let (access, _) = server.issue_access_token();
    let login = Token::new(access)
        .with_refresh(server.issue_refresh_token())
        .expires_in(LIFETIME, SystemTime::now())
        .with_generation(1);
    rt.block_on(async {
        let seed = RedisStore::builder(url.as_str())
            .connect()
            .await
            .expect("redis");
        let guard = seed.lock().await.expect("seed lock");
        let _ = guard.load().await;
        guard.save(&login).await.expect("seed save");
        guard.unlock().await;
    });
    let exe = std::env::current_exe().expect("this bin");
    let mut children = Vec::new();
    for _ in 0..processes {
        let child = Command::new(&exe)
            .env(CHILD, "1")
            .env("FLEET_SECONDS", seconds.to_string())
            .env("FLEET_TICK_MS", &tick)
            .env("FLEET_REDIS_URL", &url)
            .env("FLEET_TOKEN_URL", server.token_url())
            .env("FLEET_API_URL", server.api_url("me"))
            .env("FLEET_ORIGIN", server.origin())
            .env("FLEET_CLIENT_ID", server.client_id())
            .env("FLEET_CLIENT_SECRET", server.client_secret())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("a fleet process");
        children.push(child);
    }
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("stdout")))
        .collect();
    for out in &mut outputs {
        let mut line = String::new();
        out.read_line(&mut line).expect("ready");
        assert_eq!(line.trim(), "ready", "a child did not start");
    }
    server.reset_counters();
    super::cli(port, &["CONFIG", "RESETSTAT"]);
    let started = unix_micros();
    for child in &mut children {
        let stdin = child.stdin.as_mut().expect("stdin");
        let _ = writeln!(stdin, "go");
        let _ = stdin.flush();
    }
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    // arrivals[generation] = when each process first had it.
    let mut arrivals: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for out in &mut outputs {
        let mut line = String::new();
        out.read_line(&mut line).expect("a report");
        let Some(report) = line.trim().strip_prefix("report ") else {
            panic!("a child failed: {line:?}");
        };
        for field in report.split(' ') {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            if key == "arrivals" {
                for item in value.split(',').filter(|v| !v.is_empty()) {
                    if let Some((g, at)) = item.split_once('@') {
                        let (Ok(g), Ok(at)) = (g.parse::<u64>(), at.parse::<u64>()) else {
                            continue;
                        };
                        arrivals.entry(g).or_default().push(at);
                    }
                }
            } else if let Some(name) = REASONS.iter().find(|r| **r == key) {
                *totals.entry(name).or_default() += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
    let (commands, by) = super::commandstats(port);
    let counters = server.counters();
    let refreshes = counters.refresh_token_calls.max(1);
    let per = |n: u64| n as f64 / (processes as f64 * refreshes as f64);
    let round_trips: u64 = [
        "loads",
        "lock_attempts",
        "lease_renewals",
        "fenced_loads",
        "fenced_saves",
        "releases",
        "push_reads",
    ]
    .iter()
    .map(|k| totals.get(k).copied().unwrap_or(0))
    .sum();
    // Latency, for generations saved during the run that every process got.
    let mut latency: Vec<Duration> = arrivals
        .values()
        .filter(|times| times.len() == processes && times.iter().all(|t| *t >= started))
        .filter_map(|times| {
            let first = times.iter().min()?;
            let last = times.iter().max()?;
            Some(Duration::from_micros(last - first))
        })
        .collect();
    latency.sort();
    println!(
        "processes={processes} seconds={seconds} tick_ms={tick} token_endpoint_calls={} \
         refresh_calls={refreshes} reuse={} token_errors={} \
         redis_commands={commands} per_process_per_refresh={:.2} \
         round_trips={round_trips} round_trips_per_process_per_refresh={:.2} \
         complete_generations={} adoption_p50={:?} adoption_p99={:?} adoption_max={:?}",
        counters.token_calls,
        counters.reuse_detections,
        counters.token_errors,
        per(commands),
        per(round_trips),
        latency.len(),
        super::percentile(&latency, 0.5),
        super::percentile(&latency, 0.99),
        latency.last().copied().unwrap_or_default(),
    );
    let reasons: Vec<String> = totals
        .iter()
        .map(|(k, v)| format!("{k}={v} ({:.2})", per(*v)))
        .collect();
    println!(
        "by reason (total, per process per refresh): {}",
        reasons.join(" ")
    );
    let commands: Vec<String> = by
        .iter()
        .map(|(k, v)| format!("{k}={v} ({:.2})", per(*v)))
        .collect();
    println!(
        "by command (total, per process per refresh): {}",
        commands.join(" ")
    );
    drop(redis);
}
