//! Issue 17 across processes with Redis: 3 processes, 50 keys, one `RedisStore` per
//! process and one namespace per key (`store.namespace(&key_namespace(key))`, the
//! `KeyedFlights` factory's store): one source call per key per expiry across all three
//! processes together, every process ends each cycle on the same token for every key,
//! no token of one key is used for another, and each process talks to Redis over
//! exactly two connections whatever the number of keys.
//!
//! The same test as `tests/tests/all/keyed_processes.rs` (per-key `FileStore`s), with
//! Redis in place of the shared directory. The workers are this test binary run again
//! (the `keyed_worker` test below, ignored unless started by the test), driven line by
//! line over stdin so the processes are synchronised deterministically.

use crate::common;

use std::io::BufRead as _;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::RedisServer;
use tokenflight_tests::keyed_processes::{logged_key_source, run_keyed_cycles, tokens_answer};
use tokenflight_tests::worker::Worker;

const PROCESSES: usize = 3;
const KEYS: u32 = 50;
const CYCLES: usize = 3;
const PREFIX: &str = "keyed:";
const WORKER: &str = "keyed_processes::keyed_worker";

fn spawn(url: &str, log: &std::path::Path) -> Worker {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            WORKER,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KW_WORKER", "1")
        .env("KW_URL", url)
        .env("KW_LOG", log)
        .env("KW_KEYS", KEYS.to_string());
    // libtest prints its own lines ("running 1 test", ...) around the worker's, which
    // start with "KW ".
    Worker::spawn_marked(command, "KW ")
}

/// The clients connected to the server, other than the one asking.
fn connections(url: &str) -> usize {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
    list.lines().count() - 1
}

#[test]
fn three_processes_with_a_redis_namespace_per_key_share_one_source_call_per_key_per_expiry() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("source-calls.log");
    let mut workers: Vec<Worker> = (0..PROCESSES).map(|_| spawn(&redis.url(), &log)).collect();
    run_keyed_cycles(&mut workers, &log, KEYS, CYCLES, |cycle| {
        // 50 keys, 50 namespaces per process: still two connections per process (the
        // command connection and the one pub/sub connection).
        assert_eq!(connections(&redis.url()), 2 * PROCESSES, "cycle {cycle}");
    });
    // One token key per key, named by its namespace, never by the key itself.
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let stored: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert_eq!(stored.len(), KEYS as usize, "{stored:?}");
    for key in 0..KEYS {
        let namespace = tokenflight::keyed::key_namespace(&key.to_be_bytes());
        assert!(
            stored.contains(&format!("{{{PREFIX}ns:{namespace}}}token")),
            "key {key} has no record"
        );
    }
}

/// A worker process (see the module docs); run by the test above, not on its own.
///
/// Environment: `KW_URL` (Redis), `KW_LOG` (a file every source call appends `<key>` to,
/// with `O_APPEND`: the test counts calls per key across processes), `KW_KEYS`.
///
/// Commands and answers (one line each, answers prefixed `KW `):
/// - `tokens` → every key's token fetched concurrently, then `tokens <digest>` (an
///   FNV-1a digest of every key's generation and access token, so processes can be
///   compared without printing tokens), or `error <what>`; a token whose value names
///   another key answers `error cross-key`.
/// - `advance <secs>` → `advanced`: this process's clock moves forward.
#[test]
#[ignore = "a worker process started by the keyed Redis process test"]
fn keyed_worker() {
    use futures::future::join_all;
    use tokenflight::test_util::ManualClock;
    use tokenflight::{SingleFlight, keyed::KeyedFlights, keyed::key_namespace};
    use tokenflight_redis::RedisStore;

    if std::env::var_os("KW_WORKER").is_none() {
        return;
    }
    let env = |name: &str| std::env::var(name).unwrap();
    let log = std::path::PathBuf::from(env("KW_LOG"));
    let keys: u32 = env("KW_KEYS").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One store, one connection and one pub/sub connection, for every key.
    let store = rt
        .block_on(
            RedisStore::builder(env("KW_URL"))
                .key_prefix(PREFIX)
                .connect(),
        )
        .unwrap();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let factory_clock = clock.clone();
    let flights = KeyedFlights::builder(move |key: &u32| {
        let log = log.clone();
        let key = *key;
        let clock = factory_clock.clone();
        SingleFlight::builder()
            .source(logged_key_source(log, key, clock.clone()))
            // The key's own namespace of the one store: its token, lock and channel.
            .store(store.namespace(&key_namespace(&key.to_be_bytes()))?)
            .clock(clock)
            .refresh_ahead(None)
            .build()
    })
    .max_entries(keys as usize)
    .build();

    println!("KW ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let answer = match (words.next(), words.next()) {
            (Some("tokens"), None) => {
                let all = rt.block_on(join_all((0..keys).map(|key| {
                    let flights = flights.clone();
                    async move { (key, flights.token(&key).await) }
                })));
                tokens_answer(all)
            }
            (Some("advance"), Some(secs)) => {
                clock.advance(Duration::from_secs(secs.parse().unwrap()));
                "advanced".to_string()
            }
            _ => format!("error unknown command {line:?}"),
        };
        println!("KW {answer}");
    }
}
