//! The runtime a demo phase runs on: tokio for reqwest, async-std for surf. Each client
//! of the storm is its own task, so the 2 cores share the work as in a real service.

use std::future::Future;

use futures::FutureExt;
use futures::future::BoxFuture;

/// A runtime to block on and spawn tasks with.
#[derive(Debug)]
pub enum Exec {
    /// A tokio multi-thread runtime with 2 workers (reqwest).
    Tokio(tokio::runtime::Runtime),
    /// async-std's global executor (surf).
    AsyncStd,
}

impl Exec {
    /// A tokio runtime with 2 workers, time and I/O enabled.
    pub fn tokio() -> std::io::Result<Exec> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Exec::Tokio(runtime))
    }

    /// Runs `future` to completion on this runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match self {
            Exec::Tokio(runtime) => runtime.block_on(future),
            Exec::AsyncStd => async_std::task::block_on(future),
        }
    }

    /// Spawns `future` as a task; the returned future resolves to its output (a panic in
    /// the task is passed on).
    pub fn spawn<T, F>(&self, future: F) -> BoxFuture<'static, T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        match self {
            Exec::Tokio(runtime) => runtime
                .spawn(future)
                .map(|joined| match joined {
                    Ok(output) => output,
                    Err(error) => match error.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        Err(error) => panic!("demo task cancelled: {error}"),
                    },
                })
                .boxed(),
            Exec::AsyncStd => async_std::task::spawn(future).boxed(),
        }
    }
}
