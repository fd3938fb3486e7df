//! `FileStore` across real OS processes (the `file_store_worker` binary): one refresh per
//! expiry for the whole machine (C1 across processes), everyone ends on the newest
//! token, rotation never trips the server's reuse detection, and a process killed while
//! holding the refresh lock does not block the others.
//!
//! Processes are synchronised over their stdin/stdout: every command is answered, and
//! the test only moves on once all answers are in.
#![cfg(unix)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use tokenflight::{Token, store::FileStore, store::TokenStore};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tests::worker::Worker;

const WORKERS: usize = 5;
const CYCLES: u64 = 3;

fn command(store: &Path, token_url: &str, client_id: &str, client_secret: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_file_store_worker"));
    command
        .env("FSW_STORE", store)
        .env("FSW_TOKEN_URL", token_url)
        .env("FSW_CLIENT_ID", client_id)
        .env("FSW_CLIENT_SECRET", client_secret);
    command
}

fn spawn(store: &Path, token_url: &str, client_id: &str, client_secret: &str) -> Worker {
    Worker::spawn(command(store, token_url, client_id, client_secret))
}

fn fnv1a(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn stats(worker: &mut Worker) -> (u64, u64) {
    let answer = worker.ask("stats");
    let words: Vec<&str> = answer.split(' ').collect();
    assert_eq!(words[0], "stats", "{answer}");
    (words[1].parse().unwrap(), words[2].parse().unwrap())
}

#[test]
fn c1_processes_share_one_refresh_per_expiry_over_three_cycles() {
    let server = TestServer::start(TestServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let store = FileStore::new(&path);
    // An expired token whose refresh token starts a family on the server.
    let seed = Token::new("seed-access")
        .with_refresh(server.issue_refresh_token())
        .expires_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        .with_generation(1);
    futures::executor::block_on(tokenflight_tests::save_locked(&store, &seed)).unwrap();
    server.reset_counters();

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|_| {
            spawn(
                &path,
                &server.token_url(),
                &server.client_id(),
                &server.client_secret(),
            )
        })
        .collect();

    for cycle in 1..=CYCLES {
        if cycle > 1 {
            // Two hours later, for every process: all tokens (held and stored) expired.
            for worker in &mut workers {
                assert_eq!(worker.ask("advance 7200"), "advanced");
            }
        }
        let before = server.counters();
        // All at once: every process finds the token expired and competes for the lock.
        for worker in &mut workers {
            worker.send("token");
        }
        let answers: Vec<String> = workers.iter_mut().map(Worker::answer).collect();
        let after = server.counters();

        for answer in &answers {
            assert!(answer.starts_with("token "), "cycle {cycle}: {answers:?}");
            assert_eq!(
                answer, &answers[0],
                "cycle {cycle}: everyone has the newest token"
            );
        }
        let words: Vec<&str> = answers[0].split(' ').collect();
        assert_eq!(
            words[1],
            (cycle + 1).to_string(),
            "generation, cycle {cycle}"
        );
        assert_eq!(
            after.token_calls - before.token_calls,
            1,
            "cycle {cycle}: exactly one token endpoint call"
        );
        assert_eq!(after.refresh_token_calls - before.refresh_token_calls, 1);
        assert_eq!(after.reuse_detections, 0, "cycle {cycle}");
        assert_eq!(after.token_errors, 0, "cycle {cycle}");

        // The file holds that same token.
        let stored = futures::executor::block_on(store.load()).unwrap().unwrap();
        assert_eq!(stored.generation(), cycle + 1);
        assert_eq!(fnv1a(stored.access().expose()), words[2]);
        assert_eq!(fnv1a(stored.refresh().unwrap().expose()), words[3]);

        // One process called the token source; every other one adopted its token.
        let (source_calls, adopted) = workers
            .iter_mut()
            .map(stats)
            .fold((0, 0), |(s, a), (ws, wa)| (s + ws, a + wa));
        assert_eq!(source_calls, cycle, "cycle {cycle}");
        assert_eq!(adopted, cycle * (WORKERS as u64 - 1), "cycle {cycle}");
    }
    assert_eq!(server.counters().reuse_detections, 0);
}

/// Subscribers in 3 processes sharing a `FileStore` (C21): in each cycle one process
/// refreshes and the others adopt its token from the store; every process's
/// subscription delivers that adopted token (same generation, same secret), in order.
#[test]
fn c21_subscribers_in_three_processes_see_a_token_adopted_from_another() {
    let server = TestServer::start(TestServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let store = FileStore::new(&path);
    let seed = Token::new("seed-access")
        .with_refresh(server.issue_refresh_token())
        .expires_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        .with_generation(1);
    futures::executor::block_on(tokenflight_tests::save_locked(&store, &seed)).unwrap();
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| {
            spawn(
                &path,
                &server.token_url(),
                &server.client_id(),
                &server.client_secret(),
            )
        })
        .collect();
    for cycle in 0..3_usize {
        if cycle > 0 {
            for worker in &mut workers {
                assert_eq!(worker.ask("advance 7200"), "advanced");
            }
        }
        // One after the other: the first refreshes, the others adopt its token.
        let refresher = cycle % workers.len();
        let mut order: Vec<usize> = (0..workers.len()).collect();
        order.rotate_left(refresher);
        let answers: Vec<String> = order.iter().map(|&i| workers[i].ask("token")).collect();
        let words: Vec<&str> = answers[0].split(' ').collect();
        assert_eq!(words[0], "token", "{answers:?}");
        let expected = format!("seen {} {}", words[1], words[2]);
        for (&i, answer) in order.iter().zip(&answers) {
            assert_eq!(
                answer, &answers[0],
                "cycle {cycle}: the same token everywhere"
            );
            assert_eq!(
                workers[i].ask("seen"),
                expected,
                "cycle {cycle}, process {i}"
            );
        }
        let (source_calls, adopted) = workers
            .iter_mut()
            .map(stats)
            .fold((0, 0), |(s, a), (ws, wa)| (s + ws, a + wa));
        assert_eq!(source_calls, cycle as u64 + 1, "one refresh per cycle");
        assert_eq!(adopted, 2 * (cycle as u64 + 1), "the others adopted it");
    }
}

#[test]
fn c6_a_process_killed_while_holding_the_lock_does_not_block_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    // No token endpoint is needed: only the lock is exercised.
    let spawn = || spawn(&path, "http://127.0.0.1:9/oauth/token", "c", "s");
    let mut holder = spawn();
    let mut other = spawn();
    assert_eq!(holder.ask("hold"), "locked");
    // While the holder lives, nobody else gets the lock.
    assert_eq!(other.ask("lock 100"), "timeout");
    assert!(
        FileStore::new(&path)
            .lock_timeout(Duration::ZERO)
            .lock_blocking_probe()
    );

    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    // The OS released the dead process's lock: no stale lock file to clean up.
    assert_eq!(other.ask("lock 60000"), "locked");
    let mut third = spawn();
    assert_eq!(third.ask("lock 60000"), "locked");
}

/// In-process check that the lock is taken, through the public `TokenStore` API.
trait Probe {
    fn lock_blocking_probe(&self) -> bool;
}

impl Probe for FileStore {
    /// True when the lock is held elsewhere (a zero-timeout attempt times out).
    fn lock_blocking_probe(&self) -> bool {
        matches!(
            futures::executor::block_on(self.lock()),
            Err(tokenflight::store::StoreError::LockTimeout)
        )
    }
}

/// DPoP across 3 processes on one `FileStore` (RFC 9449): every process loads the same
/// PEM key, so a token one process fetched (bound to that key) serves the others. Per
/// cycle one refresh for all, the others adopt it from the store, every process's resource request
/// passes the server's binding check (`cnf.jkt`), and the server only ever bound tokens
/// to that one key. The token endpoint's nonce demand spends no refresh token.
#[test]
fn dpop_three_processes_share_one_refresh_and_one_key() {
    use tokenflight::dpop::DpopKey;
    use tokenflight_tests::testkit::dpop_server::{DpopServer, DpopServerConfig};

    const PROCESSES: usize = 3;
    let server = DpopServer::start(DpopServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let key_path = dir.path().join("dpop.pem");
    std::fs::write(&key_path, DpopKey::generate_pem().unwrap().expose()).unwrap();
    let jkt = DpopKey::from_pem_file(&key_path)
        .unwrap()
        .thumbprint()
        .to_owned();
    let seed = Token::new("seed-access")
        .with_refresh(server.issue_refresh_token())
        .expires_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        .with_generation(1);
    let store = FileStore::new(&path);
    futures::executor::block_on(tokenflight_tests::save_locked(&store, &seed)).unwrap();
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|_| {
            let mut command = command(&path, &server.token_url(), "app", "app-secret");
            command
                .env("FSW_DPOP_KEY", &key_path)
                .env("FSW_DPOP_ORIGIN", server.resource_origin());
            Worker::spawn(command)
        })
        .collect();
    for worker in &mut workers {
        assert_eq!(
            worker.ask("jkt"),
            format!("jkt {jkt}"),
            "one key everywhere"
        );
    }
    for cycle in 1..=3_u64 {
        // The first cycle starts from the expired seed; later ones from a token the
        // server revoked (`invalid_token` still means a refresh, with DPoP too). The
        // processes' clocks are not moved: the servers check every proof's `iat`.
        if cycle > 1 {
            server.expire_all_tokens();
        }
        // All at once: every process needs a new token and competes for the lock.
        for (i, worker) in workers.iter_mut().enumerate() {
            worker.send(&format!("get p{i}-c{cycle}"));
        }
        let answers: Vec<String> = workers.iter_mut().map(Worker::answer).collect();
        assert!(
            answers.iter().all(|a| a == "status 200"),
            "cycle {cycle}: {answers:?}"
        );
        let counts = server.counts();
        assert_eq!(counts.issued, cycle, "cycle {cycle}: one refresh for all");
        assert_eq!(counts.refresh_reuse, 0, "cycle {cycle}");
        assert!(
            counts.refresh_presented.values().all(|&n| n == 1),
            "cycle {cycle}: a refresh token reached the grant twice"
        );
        assert_eq!(
            counts.bound_keys.iter().collect::<Vec<_>>(),
            vec![&jkt],
            "cycle {cycle}: every token bound to the one key"
        );
        assert!(
            counts.refused.is_empty(),
            "cycle {cycle}: {:?}",
            counts.refused
        );
        for i in 0..PROCESSES {
            let hits = counts.hits.get(&format!("p{i}-c{cycle}")).copied();
            assert!(
                matches!(hits, Some(1..=2)),
                "cycle {cycle}: process {i} sent {hits:?} times"
            );
        }
        let (source_calls, adopted) = workers
            .iter_mut()
            .map(stats)
            .fold((0, 0), |(s, a), (ws, wa)| (s + ws, a + wa));
        assert_eq!(source_calls, cycle, "cycle {cycle}");
        assert_eq!(adopted, cycle * (PROCESSES as u64 - 1), "cycle {cycle}");
    }
}
