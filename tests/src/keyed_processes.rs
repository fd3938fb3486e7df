//! The keyed multi-process tests (issue 17), shared by the `FileStore` variant here
//! (`keyed_worker` binary) and the `RedisStore` one in tokenflight-redis: the workers'
//! token source, their `tokens` answer, and the test's cycle of "expire, fetch every
//! key in every process at once, count source calls".
//!
//! Every source call appends its key to a log file shared by all processes (`O_APPEND`),
//! so the test counts calls per key across them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokenflight::adapter::Clock;
use tokenflight::{Error, RefreshError, Token, TokenSource, from_fn};

use crate::worker::Worker;

/// A source for `key` that logs each call (one line: the key) to `log` and hands out
/// `k<key>-p<process id>-<random>`, valid for an hour by `clock`.
pub fn logged_key_source(log: PathBuf, key: u32, clock: Arc<dyn Clock>) -> impl TokenSource {
    from_fn(move |_cx| {
        let log = log.clone();
        let now = clock.now();
        async move {
            let line = format!("{key}\n");
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .and_then(|mut file| file.write_all(line.as_bytes()))
                .map_err(|e| RefreshError::transient(e.to_string()))?;
            Ok(Token::new(format!(
                "k{key}-p{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ))
            .expires_in(Duration::from_secs(3600), now))
        }
    })
}

/// A worker's answer to `tokens`, given every key's result: `tokens <digest>` (FNV-1a
/// over every key's generation and access token, so processes compare without printing
/// tokens), `error cross-key` if a token names another key, or `error key <k>: ..`.
pub fn tokens_answer(all: impl IntoIterator<Item = (u32, Result<Arc<Token>, Error>)>) -> String {
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

fn fnv1a(hash: u64, text: &str) -> u64 {
    text.bytes().fold(hash, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Source calls per key so far, from the shared log.
pub fn calls_per_key(log: &Path) -> HashMap<u32, usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut calls = HashMap::new();
    for line in text.lines() {
        *calls.entry(line.parse::<u32>().unwrap()).or_default() += 1;
    }
    calls
}

/// `cycles` expiry cycles over `workers` (each serving `keys` keys): from the second on,
/// every process's clock moves two hours (every token expired); then every process
/// fetches every key at once. After each cycle: every process answered the same digest
/// (same token for every key everywhere, none of another key) and each key cost exactly
/// one source call per cycle across all processes. `after_cycle(cycle)` adds checks.
pub fn run_keyed_cycles(
    workers: &mut [Worker],
    log: &Path,
    keys: u32,
    cycles: usize,
    mut after_cycle: impl FnMut(usize),
) {
    for cycle in 1..=cycles {
        if cycle > 1 {
            for worker in workers.iter_mut() {
                assert_eq!(worker.ask("advance 7200"), "advanced");
            }
        }
        // All processes at once: every key is contended by every process.
        for worker in workers.iter_mut() {
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
        let calls = calls_per_key(log);
        for key in 0..keys {
            assert_eq!(
                calls.get(&key).copied().unwrap_or(0),
                cycle,
                "key {key}: one source call per expiry for all processes together"
            );
        }
        assert_eq!(calls.len(), keys as usize);
        after_cycle(cycle);
    }
}
