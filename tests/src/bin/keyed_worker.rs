//! A worker process for `tests/tests/all/keyed_processes.rs`: a `KeyedFlights` over `KEYS`
//! keys, each key's coordinator on its own `FileStore` (namespaced with
//! `key_namespace`) in a directory shared by several processes, driven line by line over
//! stdin so the test can synchronise the processes deterministically.
//!
//! Environment: `KW_DIR` (the shared store directory), `KW_LOG` (a file every source call
//! appends `<key>` to, with `O_APPEND`: the test counts calls per key across processes),
//! `KW_KEYS` (how many keys).
//!
//! Commands and answers (one line each):
//! - `tokens` → every key's token fetched concurrently, then `tokens <digest>` (an FNV-1a
//!   digest of every key's generation and access token, so processes can be compared
//!   without printing tokens), or `error <what>`; a token whose value names another key
//!   answers `error cross-key`.
//! - `advance <secs>` → `advanced`: this process's clock moves forward.

use std::io::{BufRead as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::join_all;
use tokenflight::{
    SingleFlight, adapter::Clock, keyed::KeyedFlights, keyed::key_namespace, store::FileStore,
};
use tokenflight_tests::keyed_processes::{logged_key_source, tokens_answer};

/// The wall clock plus an offset the test moves forward.
#[derive(Debug, Default)]
struct OffsetClock {
    offset_secs: AtomicU64,
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.offset_secs.load(Ordering::SeqCst))
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn main() -> Result<(), String> {
    let dir = std::path::PathBuf::from(env("KW_DIR")?);
    let log = std::path::PathBuf::from(env("KW_LOG")?);
    let keys: u32 = env("KW_KEYS")?
        .parse()
        .map_err(|_| "KW_KEYS is not a number")?;
    let clock = Arc::new(OffsetClock::default());
    let factory_clock = clock.clone();
    let flights = KeyedFlights::builder(move |key: &u32| {
        let log = log.clone();
        let key = *key;
        let clock = factory_clock.clone();
        SingleFlight::builder()
            .source(logged_key_source(log, key, clock.clone()))
            .store(FileStore::new(dir.join(key_namespace(&key.to_be_bytes()))))
            .clock(clock)
            .refresh_ahead(None)
            .build()
    })
    .max_entries(keys as usize)
    .build();

    reply("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("tokens"), None) => {
                let all = futures::executor::block_on(join_all((0..keys).map(|key| {
                    let flights = flights.clone();
                    async move { (key, flights.token(&key).await) }
                })));
                reply(&tokens_answer(all));
            }
            (Some("advance"), Some(secs)) => {
                let secs: u64 = secs.parse().map_err(|_| "advance needs seconds")?;
                clock.offset_secs.fetch_add(secs, Ordering::SeqCst);
                reply("advanced");
            }
            _ => reply(&format!("error unknown command {line:?}")),
        }
    }
    Ok(())
}

fn reply(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the test is gone; nothing left to tell it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
