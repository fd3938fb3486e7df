//! The distributed refresh lock: `SET NX PX` with a unique value (in a script that
//! also recognises its own value, so it can be resent), a lease renewed while the lock
//! is held, and compare-and-delete release.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokenflight::{Token, store::StoreError, store::StoreGuard, store::record};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::reply;
use crate::counts::bump;
use crate::inner::Inner;
use crate::io::{bounded, on_runtime, redis_error, unavailable};
use crate::ops;
use crate::scripts::{ACQUIRE, RELEASE, RENEW, RENEW_SOURCE, eval};
use crate::wire::{millis, wait};

/// The guard a [`crate::RedisStore`] hands out: the lock's unique value (the fence its
/// load and save are checked against) and the task renewing its lease. Each guard
/// carries its own, so any number of coordinators can share one store.
///
/// Dropping it stops the renewal and releases the lock in the background (best effort;
/// otherwise the lease lapses). [`StoreGuard::unlock`] releases it and waits for the
/// answer; the release completes even if that wait is cancelled.
pub(crate) struct RedisLock {
    value: String,
    inner: Arc<Inner>,
    renewal: Option<JoinHandle<()>>,
    released: bool,
}

impl RedisLock {
    /// Releases the lock and waits for Redis to confirm (compare-and-delete).
    pub(crate) fn release(mut self) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.released = true;
        self.stop_renewal();
        let inner = Arc::clone(&self.inner);
        let value = self.value.clone();
        async move { release_or_retry(&inner, value).await }
    }

    fn stop_renewal(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        self.stop_renewal();
        if !self.released {
            let inner = Arc::clone(&self.inner);
            let value = self.value.clone();
            self.inner.runtime.spawn(async move {
                if let Err(error) = release_or_retry(&inner, value).await {
                    tracing::debug!(%error, "releasing a dropped refresh lock failed; trying again");
                }
            });
        }
    }
}

impl StoreGuard for RedisLock {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let value = self.value.clone();
        Box::pin(async move {
            let result = on_runtime(
                &inner.runtime.clone(),
                ops::load_fenced(Arc::clone(&inner), value),
            )
            .await;
            inner.observe(&result);
            result
        })
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        let value = self.value.clone();
        let encoded = record::encode(token);
        let generation = token.generation();
        Box::pin(async move {
            let encoded = encoded?;
            inner.push.saving(generation);
            let result = on_runtime(
                &inner.runtime.clone(),
                ops::save_fenced(Arc::clone(&inner), encoded, generation, value),
            )
            .await;
            inner.observe(&result);
            // This store's other watchers get it now, without a read; its own
            // announcement on the channel costs nothing.
            inner.push.saved(token, result.is_ok());
            result
        })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        // The release is spawned here, before the returned future is first polled, and
        // detached from it: from this point on the guard counts as released (renewal
        // stops, `Drop` does nothing), so the compare-and-delete must happen whatever
        // becomes of the caller. A coordinator whose budget ran out, or a cancelled
        // `install`, drops this future mid-release; had the release been aborted with
        // it, the lock would stay held for a whole lease and the fleet would wait for
        // nobody. The task is bounded: one command timeout, then background retries
        // for at most about a lease (`release_or_retry`).
        let runtime = self.inner.runtime.clone();
        let task = runtime.spawn((*self).release());
        Box::pin(async move {
            match task.await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => tracing::debug!("refresh lock was no longer ours at release"),
                Ok(Err(error)) => tracing::warn!(
                    %error,
                    "releasing the refresh lock failed; trying again in the background"
                ),
                Err(_) => tracing::warn!(
                    "the release of the refresh lock did not finish (a panic, or the Redis \
                     store's runtime shut down); its lease will lapse"
                ),
            }
        })
    }
}

async fn release(inner: Arc<Inner>, value: String) -> Result<bool, StoreError> {
    bump(&inner.hub.counts.releases);
    let mut con = inner.con.clone();
    let released: i64 = bounded(
        inner.settings.command_timeout,
        RELEASE
            .key(&inner.lock_key)
            .arg(&value)
            .arg(&inner.channel)
            .invoke_async(&mut con),
    )
    .await?;
    Ok(released == 1)
}

/// Releases the lock with `value`: once now, and if Redis cannot be reached, again in
/// the background with backoff for at most about one lease — a lock left behind by a
/// failover or a lost reply would otherwise stall the whole fleet for a lease.
async fn release_or_retry(inner: &Arc<Inner>, value: String) -> Result<bool, StoreError> {
    let first = release(Arc::clone(inner), value.clone()).await;
    if first.is_err() {
        let inner = Arc::clone(inner);
        let runtime = inner.runtime.clone();
        runtime.spawn(async move {
            let deadline = Instant::now() + inner.settings.lease;
            let mut pause = inner.settings.poll_min;
            while Instant::now() + pause < deadline {
                tokio::time::sleep(pause).await;
                if release(Arc::clone(&inner), value.clone()).await.is_ok() {
                    return;
                }
                pause = (pause * 2).min(inner.settings.poll_max);
            }
            tracing::debug!("giving back a refresh lock failed; its lease will lapse");
        });
    }
    first
}

/// Releases a lock this store may hold without knowing it (a request whose reply was
/// lost, a lock that replicas did not acknowledge).
async fn give_back(inner: &Arc<Inner>, value: String) {
    let _ = release_or_retry(inner, value).await;
}

/// A value no other holder uses: 128 random bits plus the process id.
fn unique_value() -> String {
    format!(
        "{:016x}{:016x}-{}",
        fastrand::u64(..),
        fastrand::u64(..),
        std::process::id()
    )
}

/// Where a lock taken for a caller goes: the caller, if it still waits.
type Caller = oneshot::Sender<Result<RedisLock, StoreError>>;

/// Takes the lock on the store's runtime for a caller that may give up (a flight whose
/// budget ran out, a cancelled `install`). The task is detached from the caller rather
/// than aborted with it: an `ACQUIRE` already sent may have taken the lock on the
/// server, and a task aborted before its reply would leave that lock held for a whole
/// lease with nobody to release it. A lock that arrives after the caller left is
/// dropped here, and its `Drop` gives it back. The task stops by itself at the next
/// wait once the caller is gone, and is bounded by the lock wait in any case.
pub(crate) fn acquire_detached(
    inner: Arc<Inner>,
) -> oneshot::Receiver<Result<RedisLock, StoreError>> {
    let (mut caller, taken) = oneshot::channel();
    let runtime = inner.runtime.clone();
    runtime.spawn(async move {
        let result = acquire(inner, &mut caller).await;
        // Err: the caller left; the lock (if any) is dropped with the result and
        // released in the background.
        let _ = caller.send(result);
    });
    taken
}

/// Takes the lock, waiting (pub/sub, else polling with backoff) up to the configured
/// lock wait, or until `caller` stops waiting. Runs on the store's runtime.
async fn acquire(inner: Arc<Inner>, caller: &mut Caller) -> Result<RedisLock, StoreError> {
    let settings = &inner.settings;
    let value = unique_value();
    let deadline = Instant::now() + settings.lock_wait;
    let mut events = inner.namespace.events();
    // With a confirmed subscription the holder's release and save arrive as messages:
    // polling is then only the fallback for a lost message, at the longest interval,
    // so waiters do not ask again and again while a slow holder refreshes. Before
    // that (or with the listener gone) the polls back off from the shortest.
    let mut delay = if inner.namespace.confirmed() {
        settings.poll_max
    } else {
        settings.poll_min
    };
    loop {
        if caller.is_closed() {
            return Err(StoreError::LockTimeout);
        }
        // Messages sent before this attempt are already accounted for by it.
        events.borrow_and_update();
        bump(&inner.hub.counts.lock_attempts);
        let mut con = inner.con.clone();
        let taken: Result<i64, StoreError> = bounded(
            settings.command_timeout,
            ACQUIRE
                .key(&inner.lock_key)
                .arg(&value)
                .arg(millis(settings.lease))
                .invoke_async(&mut con),
        )
        .await;
        let taken = match taken {
            Ok(taken) => taken,
            Err(error) => {
                // The script may have run before the reply was lost: a lock nobody
                // knows it holds would stall the fleet for a lease.
                give_back(&inner, value).await;
                return Err(error);
            }
        };
        if taken == 1 {
            bump(&inner.hub.counts.locks_taken);
            if let Some(replicas) = inner.replicas() {
                if let Err(error) = confirm(&inner, &value, replicas).await {
                    // Not known to be replicated: a failover could hand the same lock to
                    // another replica, so give it back and refresh nothing under it.
                    give_back(&inner, value).await;
                    return Err(error);
                }
            }
            let renewal = settings.renew_every.map(|every| {
                inner
                    .runtime
                    .spawn(renew(Arc::clone(&inner), value.clone(), every))
            });
            return Ok(RedisLock {
                value,
                inner,
                renewal,
                released: false,
            });
        }
        // Held by someone else: woken through the namespace's channel from now on. A
        // namespace whose lock is never contended never subscribes for it; the first
        // subscription wakes this waiter once, covering a release it may have missed.
        inner.namespace.subscribe();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StoreError::LockTimeout);
        }
        // Jittered (between half the delay and the delay): waiters that started
        // together do not poll together.
        let pause = delay.mul_f64(0.5 + fastrand::f64() / 2.0).min(left);
        let woken = tokio::select! {
            woken = tokio::time::timeout(pause, events.changed()) => woken,
            // Nobody waits for this lock any more: stop asking for it.
            () = caller.closed() => return Err(StoreError::LockTimeout),
        };
        match woken {
            // Woken by a save or release: try again now — unless another replica's
            // save was announced and this store is fetching that token for its
            // coordinators. They adopt it, and a flight it supersedes stops waiting
            // here (it drops this request). Asking for the lock before the token
            // arrives would cost a request that fails while the saver still holds the
            // lock, and then take the lock only to find the new token. The wait is
            // bounded: a lost read costs one poll interval, never the lock.
            Ok(Ok(())) => {
                if inner.push.pending() {
                    let handed_out = inner.push.handed_out.notified();
                    if inner.push.pending() {
                        bump(&inner.hub.counts.waits_for_push);
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::select! {
                            _ = tokio::time::timeout(settings.poll_max.min(left), handed_out) => {}
                            () = caller.closed() => return Err(StoreError::LockTimeout),
                        }
                        // The coordinators had it: a superseded flight drops its request
                        // now, from its own task. One short grace, bounded.
                        if tokio::time::timeout(settings.poll_min, caller.closed())
                            .await
                            .is_ok()
                        {
                            return Err(StoreError::LockTimeout);
                        }
                    }
                }
                bump(&inner.hub.counts.lock_retries_woken);
            }
            // The listener is gone (the runtime is shutting down): plain polling.
            Ok(Err(_)) => {
                tokio::time::sleep(pause).await;
                bump(&inner.hub.counts.lock_retries_polled);
            }
            Err(_) => {
                delay = (delay * 2).min(settings.poll_max);
                bump(&inner.hub.counts.lock_retries_polled);
            }
        }
    }
}

/// Waits until `replicas` replicas acknowledged the lock. The lease is touched (a
/// compare-and-pexpire, itself a write) and `WAIT`ed for in one batch on one connection:
/// `WAIT` counts acknowledgements of that connection's writes, and replication is one
/// ordered stream, so a replica that has the touch also has the `SET` before it — even
/// if the connection that took the lock was replaced in between.
async fn confirm(inner: &Inner, value: &str, replicas: u32) -> Result<(), StoreError> {
    let timeout = inner.settings.replica_ack_timeout;
    let mut pipe = redis::pipe();
    pipe.add_command(eval(
        RENEW_SOURCE,
        &[&inner.lock_key],
        &[value, &millis(inner.settings.lease).to_string()],
    ));
    pipe.add_command(wait(replicas, timeout));
    let mut con = inner.con.clone();
    let values = bounded(
        inner.settings.command_timeout + timeout,
        con.batch_at(&inner.lock_key, pipe),
    )
    .await?;
    let mut values = values.into_iter();
    let (Some(touched), Some(acked)) = (values.next(), values.next()) else {
        return Err(StoreError::Other(
            "unexpected reply to the lock's WAIT".into(),
        ));
    };
    let touched: i64 = reply(touched).map_err(redis_error)?;
    let acked: u64 = reply(acked).map_err(redis_error)?;
    if touched != 1 {
        return Err(StoreError::LeaseLost);
    }
    if acked < u64::from(replicas) {
        return Err(unavailable(format!(
            "the refresh lock was acknowledged by {acked} of {replicas} required replica(s) \
             within {timeout:?}; no refresh under it (see RedisStoreBuilder::replica_ack)"
        )));
    }
    Ok(())
}

/// Extends the lease every `every` while the lock is still ours. Ends when the lock is
/// lost; aborted when the guard is released or dropped. A failed renewal is retried at
/// the next tick: the fenced save catches a lease that lapsed meanwhile.
async fn renew(inner: Arc<Inner>, value: String, every: Duration) {
    let lease_ms = millis(inner.settings.lease);
    let mut con = inner.con.clone();
    loop {
        tokio::time::sleep(every).await;
        bump(&inner.hub.counts.lease_renewals);
        let renewed: Result<i64, StoreError> = bounded(
            inner.settings.command_timeout,
            RENEW
                .key(&inner.lock_key)
                .arg(&value)
                .arg(lease_ms)
                .invoke_async(&mut con),
        )
        .await;
        match renewed {
            Ok(1) => tracing::trace!("refresh lock lease renewed"),
            Ok(_) => {
                tracing::warn!(
                    "refresh lock lease lapsed before renewal; another replica holds it"
                );
                return;
            }
            Err(error) => tracing::warn!(%error, "renewing the refresh lock lease failed"),
        }
    }
}
