//! tokio's spawner and timer for the core, so a refresh finishes even when every caller
//! was cancelled (C6) and refresh timeouts use tokio's clock.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::runtime::Handle;

/// Spawns the core's background work (refreshes whose callers all left, refresh-ahead)
/// on a tokio runtime.
#[derive(Clone, Debug)]
pub struct TokioSpawner {
    handle: Handle,
}

impl TokioSpawner {
    /// Spawns on the runtime behind `handle`.
    pub fn new(handle: Handle) -> Self {
        TokioSpawner { handle }
    }

    /// Spawns on the runtime this is called from, if there is one.
    pub fn try_current() -> Option<Self> {
        Handle::try_current().ok().map(Self::new)
    }
}

impl tokenflight::Spawn for TokioSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        // Detached on purpose: the task stores its result in the coordinator, which is
        // where everybody who cares looks for it.
        drop(self.handle.spawn(task));
    }
}

/// Sleeps with `tokio::time::sleep`. The runtime that polls the sleep needs its time
/// driver enabled (as reqwest's own timeouts do).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl tokenflight::Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        // Created on first poll, inside the runtime that polls it: `tokio::time::sleep`
        // panics when called outside one.
        Box::pin(async move { tokio::time::sleep(duration).await })
    }
}
