//! tokio's spawner and timer (feature `tokio`), for adapters of clients that run on
//! tokio: a refresh finishes even when every caller was cancelled ([C6](crate#c6)) and
//! refresh timeouts use tokio's clock ([C10](crate#c10)). Without the feature the core
//! names no runtime ([C14](crate#c14)).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use pin_project_lite::pin_project;
use tokio::runtime::Handle;

use crate::runtime::{Spawn, Timer};

/// Spawns the core's background work (refreshes whose callers all left, refresh-ahead)
/// on a tokio runtime: a given one, or ([`TokioSpawner::current`], the default) the one
/// the refresh starts on, found when it starts. So a layer can be built outside any
/// runtime; a refresh started outside one is driven by the requests waiting for it.
///
/// ```
/// use tokenflight::adapter::{Spawn, TokioSpawner};
/// let spawner = TokioSpawner::current();
/// // No runtime on this thread: the callers that wait for the refresh drive it.
/// assert!(!spawner.spawn(Box::pin(async {})));
/// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// runtime.block_on(async { assert!(spawner.spawn(Box::pin(async {}))) });
/// ```
#[derive(Clone, Debug, Default)]
pub struct TokioSpawner {
    handle: Option<Handle>,
}

impl TokioSpawner {
    /// Spawns on the runtime behind `handle`.
    ///
    /// ```
    /// use tokenflight::adapter::{Spawn, TokioSpawner};
    /// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let spawner = TokioSpawner::new(runtime.handle().clone());
    /// // Spawns there from any thread.
    /// assert!(spawner.spawn(Box::pin(async {})));
    /// ```
    pub fn new(handle: Handle) -> Self {
        TokioSpawner {
            handle: Some(handle),
        }
    }

    /// Spawns on whichever runtime the refresh starts on, found at spawn time.
    ///
    /// ```
    /// use tokenflight::adapter::TokioSpawner;
    /// // May be made outside any runtime.
    /// let spawner = TokioSpawner::current();
    /// # drop(spawner);
    /// ```
    pub fn current() -> Self {
        TokioSpawner { handle: None }
    }
}

impl Spawn for TokioSpawner {
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
/// driver enabled (as the clients' own timeouts do).
///
/// ```
/// use std::time::Duration;
/// use tokenflight::adapter::{Timer, TokioTimer};
/// // Made anywhere; the sleep starts on its first poll, inside the runtime.
/// let sleep = TokioTimer.sleep(Duration::from_millis(1));
/// let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// runtime.block_on(sleep);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(Sleep {
            duration,
            sleep: None,
        })
    }
}

pin_project! {
    /// `tokio::time::sleep`, created on first poll, inside the runtime that polls it
    /// (`tokio::time::sleep` panics when called outside one). Unlike an `async` block
    /// around it, it may be polled again after it completed (it stays ready): a deadline
    /// that fired and is then checked again must not panic.
    struct Sleep {
        duration: Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.duration)));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => Poll::Ready(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn a_completed_sleep_stays_ready() {
        let mut sleep = TokioTimer.sleep(Duration::from_millis(1));
        sleep.as_mut().await;
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // An `async` block around `tokio::time::sleep` panics here.
        assert!(sleep.as_mut().poll(&mut cx).is_ready(), "polled again");
    }
}
