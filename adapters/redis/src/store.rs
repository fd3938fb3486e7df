//! `RedisStore`: the [`TokenStore`] a fleet shares.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;
use tokenflight::{StoreError, StoreGuard, StoreWatcher, Token, TokenStore};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::conn::{Con, Subscriber};
use crate::events::{self, Push};
use crate::inner::Inner;
use crate::io::{bounded, on_runtime};
use crate::lock;
use crate::ops;
use crate::settings::Settings;

/// A token store in Redis, shared by every replica that uses the same key prefix.
///
/// - The token is kept under `<prefix>token` as a [`tokenflight::record`] (the
///   versioned format `FileStore` writes too).
/// - The refresh lock is `<prefix>lock`: `SET NX PX` with a unique value, a lease that
///   is renewed while the holder refreshes, released by compare-and-delete.
/// - Saves are fenced: a holder whose lease lapsed cannot overwrite a newer token (the
///   lock value and the stored generation are checked in the same atomic script), and
///   gets [`StoreError::LeaseLost`]; the coordinator then adopts the newer token.
/// - The guard's `load` is fenced too: a holder whose lease lapsed gets
///   [`StoreError::LeaseLost`] before it can spend a refresh token that another replica
///   may already have used.
/// - Replicas waiting for the lock are woken through pub/sub on `<prefix>events` and
///   also poll with backoff; the wait is bounded ([`StoreError::LockTimeout`]).
/// - Saves announce the new generation (never the token) on `<prefix>events`; the
///   coordinators watching a store get the new token pushed with one `GET` per store
///   (crate docs, "Push").
/// - Every Redis round trip is bounded; connection trouble is
///   [`StoreError::Unavailable`], and the connection manager reconnects when Redis is
///   back. The coordinator keeps serving its current token meanwhile.
///
/// Cheap to clone; clones share the connection. Any number of coordinators may share
/// one store (or its clones): the lease and fence of a held lock live in the guard that
/// [`TokenStore::lock`] returns, not in the store.
///
/// # Limits
///
/// - While Redis is unreachable, refreshes fail (the coordinator backs off and keeps
///   serving a still-valid token) rather than fall back to a local refresh: without the
///   fleet-wide lock two replicas could spend the same refresh token. See the crate
///   docs, "When Redis is unreachable".
/// - A lock in Redis is not a perfect fence for the token endpoint: if a holder's
///   whole process freezes for longer than the lease *after* it sent the refresh token
///   and *before* its save, another replica will present the spent refresh token.
///   Renewal keeps the lease alive as long as the process runs, so only such a freeze
///   (longer than the lease) can cause this; size the lease accordingly. Failover has
///   its own window, narrowed by [`crate::ReplicaAck`]; the crate docs say exactly
///   what remains.
/// - A saved token is plain JSON in Redis: protect the instance (an ACL user that
///   reaches only the store's keys, TLS with a `rediss://` URL, network isolation).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tokenflight::{Builder, Token, from_fn};
/// use tokenflight_redis::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .key_prefix("billing-api:oauth:")
///     .lease(Duration::from_secs(45))
///     .connect()
///     .await?;
/// let flight = Builder::new()
///     .store(store)
///     .source(from_fn(|_cx| async { Ok(Token::new("...")) }))
///     .build_flight()?;
/// # let _ = flight;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    // Never the connection info (it may carry a password) and never the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.settings.key_prefix)
            .field("lease", &self.inner.settings.lease)
            .field("renew_every", &self.inner.settings.renew_every)
            .field("lock_wait", &self.inner.settings.lock_wait)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Starts the listener and wraps up; must run inside the runtime's context.
    pub(crate) fn start(
        con: Con,
        subscriber: Subscriber,
        settings: Settings,
        runtime: Handle,
    ) -> Self {
        let (tx, events) = watch::channel(0);
        let push = Arc::new(Push::default());
        let reader = runtime.spawn(events::read_pushed(
            Arc::clone(&push),
            con.clone(),
            settings.token_key(),
            settings.command_timeout,
        ));
        runtime.spawn(events::listen(
            subscriber,
            settings.channel(),
            tx,
            settings.connect_timeout,
            Arc::clone(&push),
            reader,
        ));
        RedisStore {
            inner: Arc::new(Inner {
                token_key: settings.token_key(),
                lock_key: settings.lock_key(),
                channel: settings.channel(),
                settings,
                con,
                runtime,
                reachable: AtomicBool::new(true),
                events,
                push,
            }),
        }
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.inner.settings.key_prefix
    }

    /// Checks that Redis answers (one bounded `PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        let result = on_runtime(&self.inner.runtime, async move {
            let mut con = inner.con.clone();
            bounded(
                inner.settings.command_timeout,
                redis::cmd("PING").query_async::<String>(&mut con),
            )
            .await
            .map(drop)
        })
        .await;
        self.inner.observe(&result);
        result
    }
}

impl TokenStore for RedisStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let result = on_runtime(&inner.runtime.clone(), ops::load(Arc::clone(&inner))).await;
            inner.observe(&result);
            result
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let result = on_runtime(&self.inner.runtime, lock::acquire(inner)).await;
            self.inner.observe(&result);
            let guard: Box<dyn StoreGuard> = Box::new(result?);
            Ok(guard)
        })
    }

    /// Pushes every token saved in the fleet to `watcher` (issue 20): the save
    /// announces its generation on the store's channel (never the token), and this
    /// store then reads the record once for all its watchers. See the crate docs,
    /// "Push".
    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        self.inner.push.watch(watcher);
    }
}
