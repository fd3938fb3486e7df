//! Issue 17 across processes: 3 processes, 50 keys, one `FileStore` per key (namespaced)
//! in one shared directory: one source call per key per expiry in total, every process
//! ends on the same token for every key, and no token of one key is used for another.
//! The same test with one `RedisStore` per process and a namespace per key is
//! `adapters/redis/tests/keyed_processes.rs` (it needs `redis-server`, and the Redis
//! crate's tests start it).
#![cfg(unix)]

use std::process::Command;

use tokenflight_tests::keyed_processes::run_keyed_cycles;
use tokenflight_tests::worker::Worker;

const PROCESSES: usize = 3;
const KEYS: u32 = 50;
const CYCLES: usize = 3;

fn spawn(dir: &std::path::Path, log: &std::path::Path) -> Worker {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyed_worker"));
    command
        .env("KW_DIR", dir)
        .env("KW_LOG", log)
        .env("KW_KEYS", KEYS.to_string());
    Worker::spawn(command)
}

#[test]
fn three_processes_share_one_source_call_per_key_per_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("source-calls.log");
    let stores = dir.path().join("stores");
    std::fs::create_dir(&stores).unwrap();
    let mut workers: Vec<Worker> = (0..PROCESSES).map(|_| spawn(&stores, &log)).collect();
    run_keyed_cycles(&mut workers, &log, KEYS, CYCLES, |_| {});
    // One record per key, named by its namespace, never by the key itself.
    let names: Vec<String> = std::fs::read_dir(&stores)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    for key in 0..KEYS {
        let namespace = tokenflight::keyed::key_namespace(&key.to_be_bytes());
        assert!(
            names.iter().any(|n| n.starts_with(&namespace)),
            "key {key} has no record"
        );
    }
}
