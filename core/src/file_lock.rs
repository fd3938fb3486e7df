//! The cross-process refresh lock of [`FileStore`](crate::FileStore): an OS advisory lock
//! (`flock`) on a sidecar file. The OS drops it when the holder's process dies, so a
//! killed process never leaves a stale lock. The sidecar is never deleted (deleting lock
//! files reintroduces races).
//!
//! Waiting for a lock held by another process happens on a short-lived helper thread
//! that polls with backoff, so no executor thread blocks; the wait is bounded
//! ([`StoreError::LockTimeout`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::atomic_file::open_private;
use crate::store::StoreError;

/// Polling backoff while another process holds the lock.
const POLL_START: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

/// A held OS lock. Dropping it closes the file, which releases the lock.
pub(crate) struct FileLock {
    _file: File,
}

/// Takes the lock on `path` (created 0600 if missing), waiting up to `timeout` for
/// another holder.
pub(crate) async fn acquire(path: &Path, timeout: Duration) -> Result<FileLock, StoreError> {
    let file = open_private(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        path,
    )?;
    if try_lock(&file)? {
        return Ok(FileLock { _file: file });
    }
    // Held by another process (or another store in this one): wait on a helper thread
    // so no executor thread blocks.
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("tokenflight-file-lock".into())
        .spawn(move || {
            let result = poll(file, deadline, &tx);
            // If the waiter left, the lock is dropped (released) right here.
            let _ = tx.send(result);
        })?;
    match rx.await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Other("the lock helper thread ended".into())),
    }
}

/// Tries to take the OS lock without blocking: `Ok(false)` when someone holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // Fully qualified: std's inherent `File::try_lock` (Rust 1.89+) would shadow it.
    match fs4::FileExt::try_lock(file) {
        Ok(()) => Ok(true),
        Err(fs4::TryLockError::WouldBlock) => Ok(false),
        Err(fs4::TryLockError::Error(e)) => Err(e),
    }
}

/// Polls for the lock on a helper thread until `deadline`, or until the waiting task
/// goes away (the receiver is dropped).
fn poll(
    file: File,
    deadline: Instant,
    waiter: &futures_channel::oneshot::Sender<Result<FileLock, StoreError>>,
) -> Result<FileLock, StoreError> {
    let mut pause = POLL_START;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(StoreError::LockTimeout);
        }
        std::thread::sleep(pause.min(deadline - now));
        if waiter.is_canceled() {
            // Nobody waits any more; what is returned is dropped unseen.
            return Err(StoreError::LockTimeout);
        }
        if try_lock(&file)? {
            return Ok(FileLock { _file: file });
        }
        pause = (pause * 2).min(POLL_MAX);
    }
}
