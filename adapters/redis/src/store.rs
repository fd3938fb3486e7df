//! `RedisStore`: the [`TokenStore`] a fleet shares.

use std::fmt;
use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;
use tokenflight::keyed::key_namespace;
use tokenflight::{
    Token, store::StoreError, store::StoreGuard, store::StoreWatcher, store::TokenStore,
};
use tokio::runtime::Handle;

use crate::conn::{Con, Subscriber};
use crate::inner::Inner;
use crate::io::{bounded, on_runtime};
use crate::listener;
use crate::lock;
use crate::namespace::{self, Hub, InvalidNamespace};
use crate::ops;
use crate::settings::Settings;

/// A token store in Redis, shared by every replica that uses the same key prefix.
///
/// - The token is kept under `<prefix>token` as a [`tokenflight::store::record`] (the
///   versioned format `FileStore` writes too).
/// - The refresh lock is `<prefix>lock`: `SET NX PX` with a unique value, a lease that
///   is renewed while the holder refreshes, released by compare-and-delete.
/// - Saves are fenced: a holder whose lease lapsed cannot overwrite a newer token (the
///   lock value and the stored generation are checked in the same atomic script), and
///   gets [`StoreError::LeaseLost`]; the coordinator then adopts the newer token.
/// - The guard's `load` is fenced too: a holder whose lease lapsed gets
///   [`StoreError::LeaseLost`] before it can spend a refresh token that another replica
///   may already have used.
/// - A value under the token key that does not decode (a stray `SET`, a truncated
///   write, another program's value of any type) counts as no token for the holder of
///   the lock, so its save or a login replaces it; it is first renamed to a side key
///   `<token key>.corrupt-<unix ms>-<random>` that expires after 7 days, so nothing is
///   lost. A record of a newer format is left alone ([`StoreError::Corrupt`]). The
///   unlocked [`TokenStore::load`] moves nothing: it reports an undecodable string as
///   [`StoreError::Corrupt`] (another type as [`StoreError::Other`]), and the
///   coordinator then takes the lock.
/// - Replicas waiting for the lock are woken through pub/sub on `<prefix>events` and
///   also poll with jittered backoff (once the subscription is confirmed, only at the
///   longest interval: the poll is then the fallback for a lost message); the wait is
///   bounded ([`StoreError::LockTimeout`]). A waiter told of another replica's save
///   waits for this store's push of that token (bounded by one poll interval) before
///   it asks again: a flight the pushed token supersedes stops waiting then, and the
///   store stops asking for it. [`RedisStore::counters`] counts the round trips by
///   reason.
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
/// # Namespaces
///
/// [`RedisStore::namespace`] and [`RedisStore::namespace_for_key`] give views with a
/// token, lock and channel of their own (`{<prefix>ns:<namespace>}token`, …) on the
/// same two connections: one namespace per user, tenant or audience of a
/// [`KeyedFlights`](tokenflight::keyed::KeyedFlights), so the whole fleet makes one
/// refresh per key per expiry (crate docs, "Namespaces").
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
/// use tokenflight::{AuthPolicy, Token, from_fn, SingleFlight};
/// use tokenflight_redis::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .key_prefix("billing-api:oauth:")
///     .lease(Duration::from_secs(45))
///     .connect()
///     .await?;
/// let flight = SingleFlight::builder()
///     .store(store)
///     .source(from_fn(|_cx| async { Ok(Token::new("...")) }))
///     .build()?;
/// # let _ = flight;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    namespaced: bool,
}

impl fmt::Debug for RedisStore {
    // Never the connection info (it may carry a password) and never the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.settings.key_prefix)
            // Whether it is a namespace, not which: a namespace may be a key's name.
            .field("namespaced", &self.namespaced)
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
        let timeout = settings.connect_timeout;
        let (hub, registry, changed) = Hub::new(settings, con, runtime.clone());
        runtime.spawn(listener::listen(subscriber, registry, changed, timeout));
        let store = RedisStore::view(&hub, None);
        // The store itself subscribes at once, as it always did; namespaces subscribe
        // with their first watcher or lock waiter.
        store.inner.namespace.subscribe();
        store
    }

    /// A view of the store (`None`) or of one of its namespaces, on the shared
    /// connection and listener.
    fn view(hub: &Arc<Hub>, namespace: Option<&str>) -> Self {
        let keys = hub.settings.keys(namespace);
        let state = hub.namespace(&keys);
        RedisStore {
            inner: Arc::new(Inner {
                settings: Arc::clone(&hub.settings),
                token_key: keys.token,
                lock_key: keys.lock,
                channel: keys.channel,
                con: hub.con.clone(),
                runtime: hub.runtime.clone(),
                push: Arc::clone(&state.push),
                namespace: state,
                hub: Arc::clone(hub),
            }),
            namespaced: namespace.is_some(),
        }
    }

    /// The round trips this store and all its views (namespaces, clones) made so far,
    /// by reason: what a replica costs Redis, split by cause.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = tokenflight_redis::RedisStore::builder("redis://127.0.0.1/")
    ///     .connect()
    ///     .await?;
    /// let counters = store.counters();
    /// println!("{} round trips, {} lock attempts", counters.round_trips(), counters.lock_attempts);
    /// # Ok(()) }
    /// ```
    pub fn counters(&self) -> crate::RedisStoreCounters {
        self.inner.hub.counts.snapshot()
    }

    /// A view of this store for one namespace: a token store of its own (its own token,
    /// refresh lock and channel in Redis) on this store's connection and pub/sub
    /// listener. Give every key of a [`KeyedFlights`](tokenflight::keyed::KeyedFlights)
    /// its namespace, and every replica of a fleet shares each key's refresh.
    ///
    /// `namespace` must be 1 to 64 ASCII letters, digits, `-` or `_`: a name made by
    /// [`key_namespace`] (32 hex digits), or a
    /// fixed name of your own (`"billing-api"`). Anything else is refused with
    /// [`InvalidNamespace`] (which converts into
    /// [`StoreError`] and [`tokenflight::ConfigError`]): raw key values — user ids,
    /// e-mail addresses — never become Redis keys. [`RedisStore::namespace_for_key`]
    /// hashes a raw key for you.
    ///
    /// The keys are `{<prefix>ns:<namespace>}token` and `…lock`, the channel
    /// `…events` (with a prefix that has its own hash tag, `ns:<namespace>` goes inside
    /// it): each namespace has a Redis Cluster hash tag of its own, so namespaces spread
    /// over the shards while each one's keys share a slot.
    ///
    /// Cheap: no round trip, no connection. All views of a store — namespaces and the
    /// store itself — share its one command connection and its one pub/sub connection;
    /// a namespace subscribes to its channel on that connection with its first watcher
    /// (a coordinator) or lock waiter, and unsubscribes when its last view is dropped.
    /// Views of the same namespace in one process share its watchers, so a save
    /// through one reaches the others' coordinators without a read. Calling
    /// `namespace` on a view names a sibling: namespaces do not nest.
    ///
    /// ```no_run
    /// # // Not run here: it needs a Redis server (the crate's tests start one).
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = tokenflight_redis::RedisStore::builder("redis://127.0.0.1/")
    ///     .key_prefix("billing:oauth:")
    ///     .connect()
    ///     .await?;
    /// let tenant = store.namespace("tenant-42")?;
    /// assert!(store.namespace("alice@example.com").is_err());
    /// # drop(tenant); Ok(()) }
    /// ```
    pub fn namespace(&self, namespace: &str) -> Result<RedisStore, InvalidNamespace> {
        namespace::validate(namespace)?;
        Ok(RedisStore::view(&self.inner.hub, Some(namespace)))
    }

    /// The namespace of a raw key: [`RedisStore::namespace`] with
    /// [`key_namespace(key)`](tokenflight::keyed::key_namespace), a SHA-256-based name
    /// that is the same in every process and release and never shows the key. Every
    /// replica that uses the same key (a user id, a tenant) shares its token and its
    /// refresh.
    ///
    /// ```no_run
    /// # // Not run here: it needs a Redis server (the crate's tests start one).
    /// # async fn demo(store: tokenflight_redis::RedisStore) {
    /// let alice = store.namespace_for_key(b"alice@example.com");
    /// # drop(alice); }
    /// ```
    pub fn namespace_for_key(&self, key: &[u8]) -> RedisStore {
        RedisStore::view(&self.inner.hub, Some(&key_namespace(key)))
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.inner.settings.key_prefix
    }

    /// Checks that Redis answers (one bounded `PING`).
    ///
    /// ```no_run
    /// # // Not run here: it needs a Redis server (the crate's tests start one).
    /// # async fn demo(store: tokenflight_redis::RedisStore) {
    /// if let Err(error) = store.ping().await {
    ///     eprintln!("token store unreachable: {error}");
    /// }
    /// # }
    /// ```
    ///
    /// # Cancellation
    /// Dropping the future abandons the `PING`; the store is unaffected.
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
            // Not `on_runtime`: an acquire in progress must not be aborted with this
            // future (see `acquire_detached`).
            let result = lock::acquire_detached(inner).await.unwrap_or_else(|_| {
                Err(StoreError::Other(
                    "the Redis store's lock task ended early (a panic, or its runtime shut down)"
                        .into(),
                ))
            });
            self.inner.observe(&result);
            let guard: Box<dyn StoreGuard> = Box::new(result?);
            Ok(guard)
        })
    }

    /// Pushes every token saved in the fleet to `watcher`: the save
    /// announces its generation on the store's channel (never the token), and this
    /// store then reads the record once for all its watchers. See the crate docs,
    /// "Push".
    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        self.inner.namespace.watch(watcher);
    }
}
