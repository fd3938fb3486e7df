//! The token source of the keyed multi-process tests (the FileStore worker here, the
//! RedisStore one in tokenflight-redis): every call appends its key to a log file
//! shared by all processes, so the test counts source calls per key across them.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokenflight::adapter::Clock;
use tokenflight::{RefreshError, Token, TokenSource, from_fn};

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
