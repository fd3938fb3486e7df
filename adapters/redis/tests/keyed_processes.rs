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
#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use common::RedisServer;

const PROCESSES: usize = 3;
const KEYS: u32 = 50;
const CYCLES: usize = 3;
const PREFIX: &str = "keyed:";
/// Only turns a hung worker into a failure; no test outcome depends on it.
const ANSWER_DEADLINE: Duration = Duration::from_secs(120);
const WORKER: &str = "keyed_worker";

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(url: &str, log: &std::path::Path) -> Worker {
        let mut child = Command::new(std::env::current_exe().unwrap())
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
            .env("KW_KEYS", KEYS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // libtest prints its own lines ("running 1 test", "test keyed_worker ...")
            // around the worker's; the worker's start with "KW ".
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("KW ") {
                    if tx.send(line[at + 3..].to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        let mut worker = Worker {
            child,
            stdin,
            lines,
        };
        assert_eq!(worker.answer(), "ready");
        worker
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn answer(&mut self) -> String {
        self.lines
            .recv_timeout(ANSWER_DEADLINE)
            .unwrap_or_else(|e| panic!("worker {} gave no answer: {e}", self.child.id()))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Only this test's own child, by its id.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn calls_per_key(log: &std::path::Path) -> HashMap<u32, usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut calls = HashMap::new();
    for line in text.lines() {
        *calls.entry(line.parse::<u32>().unwrap()).or_default() += 1;
    }
    calls
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
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|_| Worker::spawn(&redis.url(), &log))
        .collect();
    for cycle in 1..=CYCLES {
        if cycle > 1 {
            // Two hours later for every process: every key's token has expired.
            for worker in &mut workers {
                worker.send("advance 7200");
                assert_eq!(worker.answer(), "advanced");
            }
        }
        // All processes at once: every key is contended by every process.
        for worker in &mut workers {
            worker.send("tokens");
        }
        let answers: Vec<String> = workers.iter_mut().map(Worker::answer).collect();
        for answer in &answers {
            assert!(answer.starts_with("tokens "), "cycle {cycle}: {answer}");
            assert_eq!(
                answer, &answers[0],
                "cycle {cycle}: same token for every key everywhere"
            );
        }
        let calls = calls_per_key(&log);
        for key in 0..KEYS {
            assert_eq!(
                calls.get(&key).copied().unwrap_or(0),
                cycle,
                "key {key}: one source call per expiry for all processes together"
            );
        }
        assert_eq!(calls.len(), KEYS as usize);
        // 50 keys, 50 namespaces per process: still two connections per process (the
        // command connection and the one pub/sub connection).
        assert_eq!(connections(&redis.url()), 2 * PROCESSES, "cycle {cycle}");
    }
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

fn fnv1a(hash: u64, text: &str) -> u64 {
    text.bytes().fold(hash, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    use tokenflight::{
        SingleFlight, Token, adapter::Clock, from_fn, keyed::KeyedFlights, keyed::key_namespace,
    };
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
        let source_clock = clock.clone();
        SingleFlight::builder()
            .source(from_fn(move |_cx| {
                let log = log.clone();
                let now = source_clock.now();
                async move {
                    let line = format!("{key}\n");
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .and_then(|mut file| file.write_all(line.as_bytes()))
                        .map_err(|e| tokenflight::RefreshError::transient(e.to_string()))?;
                    Ok(Token::new(format!(
                        "k{key}-p{}-{}",
                        std::process::id(),
                        fastrand::u64(..)
                    ))
                    .expires_in(Duration::from_secs(3600), now))
                }
            }))
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
                let mut digest = 0xcbf2_9ce4_8422_2325_u64;
                let mut answer = None;
                for (key, result) in all {
                    match result {
                        Ok(token) if !token.access().expose().starts_with(&format!("k{key}-")) => {
                            answer = Some("error cross-key".to_string());
                        }
                        Ok(token) => {
                            digest = fnv1a(digest, &format!("{key}:{}:", token.generation()));
                            digest = fnv1a(digest, token.access().expose());
                        }
                        Err(error) => answer = Some(format!("error key {key}: {error}")),
                    }
                }
                answer.unwrap_or_else(|| format!("tokens {digest:016x}"))
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
