//! async-std's spawner and timer for the core ([C6](tokenflight#c6), [C10](tokenflight#c10)).

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokenflight::adapter::{Spawn, Timer};

/// Spawns the core's background refreshes on async-std, so a refresh finishes and is
/// stored even when every caller waiting for it was cancelled ([C6](tokenflight#c6)).
#[derive(Clone, Copy, Debug, Default)]
pub struct AsyncStdSpawner;

impl Spawn for AsyncStdSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        // Dropping an async-std `JoinHandle` detaches the task; it still runs to the end.
        // async-std starts its runtime on demand: there is always one to spawn on.
        drop(async_std::task::spawn(task));
        true
    }
}

/// async-std's `sleep`, for refresh timeouts ([C10](tokenflight#c10)).
#[derive(Clone, Copy, Debug, Default)]
pub struct AsyncStdTimer;

impl Timer for AsyncStdTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async_std::task::sleep(duration))
    }
}
