//! # tokenflight-redis
//!
//! A [`tokenflight::TokenStore`] in Redis, so the single flight spans a whole fleet:
//! many replicas of a service that share one OAuth client with rotating refresh tokens
//! make one refresh per expiry between them, instead of racing each other into the
//! authorization server's reuse detection.
//!
//! Plug a [`RedisStore`] into the coordinator's builder with `.store(store)`. Each
//! refresh then runs: take the Redis refresh lock → reload the token → adopt it if
//! another replica already refreshed → else call the token source → fenced save → release.
//! See [`RedisStore`] for the lock, lease, fencing and failure behaviour.
//!
//! ## Runtimes
//!
//! The store runs its Redis I/O (through the `redis` crate's tokio connection manager),
//! lease renewal and pub/sub listener on a tokio runtime: the one it is built in, or the
//! one passed to [`RedisStoreBuilder::runtime`]. Its futures only wait for results from
//! that runtime, so they can be awaited from any executor.
//!
//! An async-std/surf (or smol) application therefore keeps a small tokio runtime for
//! the store and hands its handle over:
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One worker thread is plenty: it only does the store's Redis round trips.
//! let tokio_rt = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(1)
//!     .enable_all()
//!     .build()?;
//! let store = tokenflight_redis::RedisStore::builder("redis://127.0.0.1/")
//!     .runtime(tokio_rt.handle().clone())
//!     .build()?;
//! // ... build the surf TokenLayer with `.store(store)` and run it on async-std; keep
//! // `tokio_rt` alive as long as the store is used.
//! # let _ = store; Ok(())
//! # }
//! ```
//!
//! The `redis` crate also has a smol runtime (`smol-comp`), but its connection manager,
//! which this store relies on to reconnect, is tokio-only; hence the handle.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod config;
mod conn;
mod events;
mod io;
mod lock;
mod scripts;
mod store;
mod wire;

pub use config::{RedisStoreBuilder, ReplicaAck};
pub use store::RedisStore;
