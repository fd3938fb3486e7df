//! tokio's spawner and timer for the core, so a refresh finishes even when every caller
//! was cancelled ([C6](tokenflight#c6)) and refresh timeouts use tokio's clock.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::runtime::Handle;

/// Spawns the core's background work (refreshes whose callers all left, refresh-ahead)
/// on a tokio runtime: a given one, or ([`TokioSpawner::current`], the default) the one
/// the refresh starts on, found when it starts. So a middleware can be built outside any
/// runtime; a refresh started outside one is driven by the requests waiting for it.
#[derive(Clone, Debug, Default)]
pub struct TokioSpawner {
    handle: Option<Handle>,
}

impl TokioSpawner {
    /// Spawns on the runtime behind `handle`.
    pub fn new(handle: Handle) -> Self {
        TokioSpawner {
            handle: Some(handle),
        }
    }

    /// Spawns on whichever runtime the refresh starts on, found at spawn time.
    pub fn current() -> Self {
        TokioSpawner { handle: None }
    }
}

impl tokenflight::adapter::Spawn for TokioSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        let handle = match &self.handle {
            Some(handle) => handle.clone(),
            None => match Handle::try_current() {
                Ok(handle) => handle,
                // No runtime here: the callers that wait for the refresh drive it.
                Err(_) => return false,
            },
        };
        // Detached on purpose: the task stores its result in the coordinator, which is
        // where everybody who cares looks for it.
        drop(handle.spawn(task));
        true
    }
}

/// Sleeps with `tokio::time::sleep`. The runtime that polls the sleep needs its time
/// driver enabled (as reqwest's own timeouts do).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl tokenflight::adapter::Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        // Created on first poll, inside the runtime that polls it: `tokio::time::sleep`
        // panics when called outside one.
        Box::pin(async move { tokio::time::sleep(duration).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenflight::adapter::Spawn;

    #[test]
    fn the_spawner_finds_the_runtime_at_spawn_time() {
        let spawner = TokioSpawner::current();
        assert!(!spawner.spawn(Box::pin(async {})), "no runtime here");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (done, ran) = tokio::sync::oneshot::channel();
        runtime.block_on(async {
            assert!(spawner.spawn(Box::pin(async move {
                let _ = done.send(());
            })));
            ran.await.unwrap();
        });
    }
}
