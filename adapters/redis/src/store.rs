//! `RedisStore`: the [`TokenStore`] a fleet shares.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::IntoConnectionInfo;
use tokenflight::{StoreError, StoreLock, StoreWatcher, Token, TokenStore};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{RedisStoreBuilder, ReplicaAck, Settings};
use crate::conn::{Con, Subscriber, reply};
use crate::events::{self, Push};
use crate::io::{bounded, on_runtime, unavailable};
use crate::lock::{self, RedisLock};
use crate::scripts::{LOAD_FENCED, SAVE};
use crate::wire;

/// A token store in Redis, shared by every replica that uses the same key prefix.
///
/// - The token is kept as versioned JSON under `<prefix>token`.
/// - The refresh lock is `<prefix>lock`: `SET NX PX` with a unique value, a lease that
///   is renewed while the holder refreshes, released by compare-and-delete.
/// - Saves are fenced: a holder whose lease lapsed cannot overwrite a newer token (the
///   lock value and the stored generation are checked in the same atomic script), and
///   gets [`StoreError::LeaseLost`]; the coordinator then adopts the newer token.
/// - While this store holds the lock, `load` is fenced too: a holder whose lease lapsed
///   gets [`StoreError::LeaseLost`] before it can spend a refresh token that another
///   replica may already have used.
/// - Replicas waiting for the lock are woken through pub/sub on `<prefix>events` and
///   also poll with backoff; the wait is bounded ([`StoreError::LockTimeout`]).
/// - Saves announce the new generation (never the token) on `<prefix>events`; the
///   coordinators watching a store get the new token pushed with one `GET` per store
///   (crate docs, "Push").
/// - Every Redis round trip is bounded; connection trouble is
///   [`StoreError::Unavailable`], and the connection manager reconnects when Redis is
///   back. The coordinator keeps serving its current token meanwhile.
///
/// Cheap to clone; clones share the connection. Give each coordinator its own store
/// (clones share the record of which lock this store holds, which the fenced load uses).
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

pub(crate) struct Inner {
    pub(crate) settings: Settings,
    pub(crate) token_key: String,
    pub(crate) lock_key: String,
    pub(crate) channel: String,
    pub(crate) con: Con,
    pub(crate) runtime: Handle,
    /// Whether the last Redis round trip got an answer: warnings about an unreachable
    /// Redis are logged when this flips, not once per request.
    reachable: AtomicBool,
    /// Bumped by the pub/sub listener on every save or release in the fleet.
    pub(crate) events: watch::Receiver<u64>,
    /// The lock value this store holds right now, if any: `load` is fenced on it.
    held: Mutex<Option<String>>,
    /// The coordinators watching this store, told of every save in the fleet.
    push: Arc<Push>,
}

impl Inner {
    pub(crate) fn remember_held(&self, value: &str) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(value.to_owned());
    }

    pub(crate) fn forget_held(&self, value: &str) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.as_deref() == Some(value) {
            *held = None;
        }
    }

    /// Replicas that must acknowledge a write, if any.
    pub(crate) fn replicas(&self) -> Option<u32> {
        match self.settings.replica_ack {
            Some(ReplicaAck::Required(n)) => Some(n),
            Some(ReplicaAck::None) | None => None,
        }
    }

    /// Notes whether Redis answered, and logs only the changes.
    pub(crate) fn observe<T>(&self, result: &Result<T, StoreError>) {
        let unavailable = match result {
            Err(StoreError::Unavailable(error)) => Some(error),
            _ => None,
        };
        match (
            transition(&self.reachable, unavailable.is_none()),
            unavailable,
        ) {
            (Some(false), Some(error)) => tracing::warn!(
                %error,
                "Redis is unavailable: this replica keeps serving its current token and \
                 refreshes only under the fleet lock once Redis is back (logged once, not \
                 per request)"
            ),
            (Some(true), _) => tracing::info!("Redis is available again"),
            _ => {}
        }
    }

    fn held(&self) -> Option<String> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for RedisStore {
    // Never the connection info (it may carry a password) and never the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.settings.key_prefix)
            .field("lease", &self.inner.settings.lease)
            .field("renew_every", &self.inner.settings.renew_every)
            .field("lock_wait", &self.inner.settings.lock_wait)
            .field("holds_lock", &self.inner.held().is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for a store at `info` (a `redis://` URL or any
    /// [`IntoConnectionInfo`]); see [`RedisStoreBuilder`] for the settings.
    ///
    /// A `rediss://` URL connects with TLS (rustls); its user and password are an ACL
    /// user's (`rediss://user:password@host:6380/`). Secrets in the URL never appear in
    /// `Debug` output, errors or logs.
    pub fn builder(info: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(info)
    }

    /// A builder for a store in a Redis Cluster reached through any of `nodes` (the
    /// others are discovered). All of the store's keys share one hash tag, so they live
    /// on one shard; pub/sub wake-ups reach every replica through any node. Replica
    /// acknowledgement defaults to one replica ([`RedisStoreBuilder::replica_ack`]).
    pub fn cluster<I, T>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        RedisStoreBuilder::cluster(nodes)
    }

    /// A builder for a store on the primary that the given Redis Sentinels name for
    /// `service`; after a failover the store follows the new primary. The data nodes'
    /// ACL user comes from [`RedisStoreBuilder::credentials`]. Replica acknowledgement
    /// defaults to one replica ([`RedisStoreBuilder::replica_ack`]).
    pub fn sentinel<I, T>(sentinels: I, service: impl Into<String>) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        RedisStoreBuilder::sentinel(sentinels, service)
    }

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
                held: Mutex::new(None),
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

    async fn load_token(inner: Arc<Inner>) -> Result<Option<Token>, StoreError> {
        let mut con = inner.con.clone();
        let timeout = inner.settings.command_timeout;
        let Some(value) = inner.held() else {
            let raw: Option<String> = bounded(
                timeout,
                redis::cmd("GET")
                    .arg(&inner.token_key)
                    .query_async(&mut con),
            )
            .await?;
            return raw.as_deref().map(wire::decode).transpose();
        };
        let reply: Vec<String> = bounded(
            timeout,
            LOAD_FENCED
                .key(&inner.token_key)
                .key(&inner.lock_key)
                .arg(&value)
                .invoke_async(&mut con),
        )
        .await?;
        match reply.as_slice() {
            [status, raw] if status == "ok" => wire::decode(raw).map(Some),
            [status] if status == "none" => Ok(None),
            [status] if status == "lease_lost" => {
                inner.forget_held(&value);
                tracing::warn!("refresh lock lease lapsed before the token was read");
                Err(StoreError::LeaseLost)
            }
            _ => Err(StoreError::Other(
                "unexpected reply from the load script".into(),
            )),
        }
    }

    /// The fenced save; with replica acknowledgement, the save and a `WAIT` travel
    /// together, and an unacknowledged save is tried again (it is idempotent) until the
    /// lease would lapse, so the token is on the replicas before the lock is released.
    async fn save_token(
        inner: Arc<Inner>,
        record: String,
        generation: u64,
        lock_value: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(replicas) = inner.replicas() else {
            let mut con = inner.con.clone();
            let outcome: String = bounded(
                inner.settings.command_timeout,
                SAVE.key(&inner.token_key)
                    .key(&inner.lock_key)
                    .arg(lock_value.as_deref().unwrap_or(""))
                    .arg(generation)
                    .arg(&record)
                    .arg(&inner.channel)
                    .invoke_async(&mut con),
            )
            .await?;
            return Self::save_outcome(&inner, &outcome, generation, lock_value);
        };
        // Past the lease the fenced save would be refused anyway.
        let deadline = Instant::now() + inner.settings.lease;
        let mut pause = inner.settings.poll_min;
        loop {
            let attempt = Self::save_acknowledged(
                &inner,
                &record,
                generation,
                lock_value.as_deref(),
                replicas,
            )
            .await;
            let error = match attempt {
                Ok((outcome, acked)) => {
                    if outcome != "ok" || acked >= u64::from(replicas) {
                        return Self::save_outcome(&inner, &outcome, generation, lock_value);
                    }
                    unavailable(format!(
                        "the saved token was acknowledged by {acked} of {replicas} required \
                         replica(s) within {:?}",
                        inner.settings.replica_ack_timeout
                    ))
                }
                Err(StoreError::Unavailable(error)) => StoreError::Unavailable(error),
                Err(other) => return Err(other),
            };
            if Instant::now() + pause >= deadline {
                tracing::warn!(%error, generation, "the saved token may not be on the replicas");
                return Err(error);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(inner.settings.poll_max);
        }
    }

    /// One fenced save followed by `WAIT` on the same connection: the script's outcome
    /// and the number of replicas that acknowledged it.
    async fn save_acknowledged(
        inner: &Inner,
        record: &str,
        generation: u64,
        lock_value: Option<&str>,
        replicas: u32,
    ) -> Result<(String, u64), StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(crate::scripts::eval(
            crate::scripts::SAVE_SOURCE,
            &[&inner.token_key, &inner.lock_key],
            &[
                lock_value.unwrap_or(""),
                &generation.to_string(),
                record,
                &inner.channel,
            ],
        ));
        pipe.add_command(wait(replicas, inner.settings.replica_ack_timeout));
        let mut con = inner.con.clone();
        let values = bounded(
            inner.settings.command_timeout + inner.settings.replica_ack_timeout,
            con.batch_at(&inner.token_key, pipe),
        )
        .await?;
        let mut values = values.into_iter();
        match (values.next(), values.next()) {
            (Some(outcome), Some(acked)) => {
                let outcome: String = reply(outcome).map_err(crate::io::redis_error)?;
                let acked: u64 = reply(acked).map_err(crate::io::redis_error)?;
                Ok((outcome, acked))
            }
            _ => Err(StoreError::Other(
                "unexpected reply to the save and WAIT".into(),
            )),
        }
    }

    fn save_outcome(
        inner: &Inner,
        outcome: &str,
        generation: u64,
        lock_value: Option<String>,
    ) -> Result<(), StoreError> {
        match (outcome, lock_value) {
            ("ok", _) => Ok(()),
            ("lease_lost" | "newer", Some(value)) => {
                // From here on this holder must not act as the holder (unfenced loads
                // let the coordinator adopt the newer token).
                inner.forget_held(&value);
                tracing::warn!(
                    generation,
                    reason = outcome,
                    "save refused: the refresh lock lease was lost or a newer token is stored"
                );
                Err(StoreError::LeaseLost)
            }
            ("newer", None) => Err(StoreError::Other(
                format!("a token of generation {generation} or newer is already stored").into(),
            )),
            _ => Err(StoreError::Other(
                "unexpected reply from the save script".into(),
            )),
        }
    }
}

/// Records whether the last round trip got through; `Some(now)` only when that
/// changed, so a warning is logged once per outage rather than once per request.
fn transition(reachable: &AtomicBool, now: bool) -> Option<bool> {
    (reachable.swap(now, Ordering::Relaxed) != now).then_some(now)
}

/// `WAIT replicas timeout`: blocks until that many replicas acknowledged this
/// connection's writes, or the timeout passed; answers how many did.
pub(crate) fn wait(replicas: u32, timeout: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(replicas).arg(
        u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    );
    cmd
}

impl TokenStore for RedisStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let result =
                on_runtime(&inner.runtime.clone(), Self::load_token(Arc::clone(&inner))).await;
            inner.observe(&result);
            result
        })
    }

    fn save<'a>(
        &'a self,
        token: &'a Token,
        lock: Option<&'a StoreLock>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        let prepared = wire::encode(token).and_then(|record| {
            let value = match lock {
                None => None,
                Some(lock) => match lock.guard::<RedisLock>() {
                    Some(guard) => Some(guard.value().to_owned()),
                    None => {
                        return Err(StoreError::Other(
                            "the lock passed to RedisStore::save was not taken from a RedisStore"
                                .into(),
                        ));
                    }
                },
            };
            Ok((record, value))
        });
        let generation = token.generation();
        Box::pin(async move {
            let (record, value) = prepared?;
            inner.push.saving(generation);
            let result = on_runtime(
                &inner.runtime.clone(),
                Self::save_token(Arc::clone(&inner), record, generation, value),
            )
            .await;
            inner.observe(&result);
            // This store's other watchers get it now, without a read; its own
            // announcement on the channel costs nothing.
            inner.push.saved(token, result.is_ok());
            result
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<StoreLock, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let result = on_runtime(&self.inner.runtime, lock::acquire(inner)).await;
            self.inner.observe(&result);
            Ok(StoreLock::new(result?))
        })
    }

    /// Pushes every token saved in the fleet to `watcher` (issue 20): the save
    /// announces its generation on the store's channel (never the token), and this
    /// store then reads the record once for all its watchers. See the crate docs,
    /// "Push".
    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        self.inner.push.watch(watcher);
    }

    fn unlock(&self, lock: StoreLock) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Ok(guard) = lock.into_guard::<RedisLock>() else {
                return;
            };
            match on_runtime(&self.inner.runtime, guard.release()).await {
                Ok(true) => {}
                Ok(false) => tracing::debug!("refresh lock was no longer ours at release"),
                Err(error) => {
                    tracing::warn!(%error, "releasing the refresh lock failed; trying again in the background");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_and_so_is_the_recovery() {
        let reachable = AtomicBool::new(true);
        let seen: Vec<Option<bool>> = [true, false, false, false, true, true, false]
            .into_iter()
            .map(|now| transition(&reachable, now))
            .collect();
        assert_eq!(
            seen,
            [None, Some(false), None, None, Some(true), None, Some(false)]
        );
    }

    #[test]
    fn wait_never_blocks_forever() {
        // WAIT with timeout 0 would block until the replicas answer, however long.
        let packed = wait(1, Duration::from_micros(10)).get_packed_command();
        let text = String::from_utf8_lossy(&packed);
        assert!(text.ends_with("$1\r\n1\r\n$1\r\n1\r\n"), "{text:?}");
    }
}
