//! Running Redis work on the store's tokio runtime, bounded in time, with errors mapped
//! to [`StoreError`].
//!
//! Every operation is spawned on the runtime handle the store was built with, so the
//! store's futures can be awaited from any executor; only the result crosses over.

use std::future::Future;
use std::io;
use std::time::Duration;

use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokenflight::store::StoreError;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Aborts the task when dropped, so a caller that gives up (a cancelled future, the
/// coordinator's refresh timeout) does not leave Redis work running behind it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` on `runtime` and waits for its result.
pub(crate) async fn on_runtime<T, F>(runtime: &Handle, work: F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
{
    let mut task = AbortOnDrop(runtime.spawn(work));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(StoreError::Other("a Redis store task panicked".into())),
        Err(_) => Err(StoreError::Other(
            "the Redis store's runtime shut down".into(),
        )),
    }
}

/// Bounds one Redis round trip (reconnection waits included) by `timeout`.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result.map_err(redis_error),
        Err(_) => Err(StoreError::Unavailable(Box::new(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("Redis did not answer within {timeout:?}"),
        )))),
    }
}

/// Connection trouble is `Unavailable` (retry later), and so is a deployment in the
/// middle of a failover (no primary known yet, a demoted node, a cluster shard down);
/// anything else (a script error, a wrong type under our key) is `Other`.
pub(crate) fn redis_error(error: RedisError) -> StoreError {
    let failing_over = matches!(
        error.kind(),
        ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::BusyLoading
            )
    );
    if failing_over
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_unrecoverable_error()
    {
        StoreError::Unavailable(Box::new(error))
    } else {
        StoreError::Other(Box::new(error))
    }
}

/// An [`StoreError::Unavailable`] with `message`.
pub(crate) fn unavailable(message: String) -> StoreError {
    StoreError::Unavailable(Box::new(io::Error::other(message)))
}
