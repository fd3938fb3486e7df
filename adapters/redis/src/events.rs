//! The pub/sub listener: turns messages on the store's channel into a counter that
//! replicas waiting for the lock watch, so they retry as soon as the holder saves or
//! releases — and pushes saved tokens to the coordinators watching this store (issue
//! 20, [`tokenflight::StoreWatcher`]).
//!
//! Pub/sub is only a hint: waiters also poll with backoff, and coordinators still read
//! the store at their own refresh-ahead, so a dropped subscription or a lost message
//! costs latency, never correctness. The listener reconnects with backoff and ends when
//! the last clone of the store is dropped.
//!
//! # Push
//!
//! A save publishes `saved:<generation>` — the number only: secrets never travel over
//! pub/sub, which any client allowed to subscribe can read. A store with live watchers
//! then reads the record with one `GET` and hands the token to each of them. Per
//! replica and refresh cycle that is one `GET`, whatever the size of the fleet:
//!
//! - announcements of a generation this store already handed out (its own save, which
//!   it hands to its watchers directly; a repeated message) cost nothing;
//! - a burst of messages while a `GET` is in progress costs one more `GET` after it,
//!   not one per message (a single wake-up permit);
//! - after every (re)subscription one `GET` catches up with saves that happened while
//!   the subscription was down (a Redis restart, a failover);
//! - a store nobody watches reads nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokenflight::{StoreWatcher, Token};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::conn::{Con, Subscriber};
use crate::io::bounded;
use crate::wire;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps a subscription to `channel` and bumps `tx` on every message (and on every
/// resubscription, since messages may have been missed while it was down); hands
/// `saved:<generation>` announcements and resubscriptions to `push`, whose reader
/// (`reader`, see [`read_pushed`]) it stops when it ends.
pub(crate) async fn listen(
    subscriber: Subscriber,
    channel: String,
    tx: watch::Sender<u64>,
    connect_timeout: Duration,
    push: Arc<Push>,
    reader: JoinHandle<()>,
) {
    let _reader = AbortOnDrop(reader);
    let bump = |n: &mut u64| *n = n.wrapping_add(1);
    let mut retry = RETRY_MIN;
    let mut attempt = 0usize;
    loop {
        match subscribe(&subscriber, attempt, &channel, connect_timeout).await {
            Ok(mut messages) => {
                retry = RETRY_MIN;
                tx.send_modify(bump);
                push.catch_up();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                tx.send_modify(bump);
                                if let Some(generation) = saved_generation(&message) {
                                    push.announce(generation);
                                }
                            }
                            None => break,
                        },
                        () = tx.closed() => return,
                    }
                }
                tracing::debug!("token store subscription lost; resubscribing");
            }
            Err(error) => tracing::debug!(%error, "token store subscription failed"),
        }
        // The next cluster node, if this one is down.
        attempt = attempt.wrapping_add(1);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = tx.closed() => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

async fn subscribe(
    subscriber: &Subscriber,
    attempt: usize,
    channel: &str,
    timeout: Duration,
) -> Result<PubSubStream, String> {
    let connect = async {
        let mut pubsub = subscriber.pubsub(attempt).await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// The generation in a `saved:<generation>` message (the save script's), if it is one.
fn saved_generation(message: &redis::Msg) -> Option<u64> {
    let payload: String = message.get_payload().ok()?;
    payload.strip_prefix("saved:")?.parse().ok()
}

/// Aborts the task when dropped: the reader ends with the listener.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The coordinators watching one store, and what has been handed to them.
#[derive(Default)]
pub(crate) struct Push {
    watchers: Mutex<Vec<Weak<dyn StoreWatcher>>>,
    /// The highest generation handed to the watchers (or saved through this store,
    /// whose watchers got it directly): announcements up to it need no `GET`.
    delivered: AtomicU64,
    /// The highest generation announced on the channel.
    announced: AtomicU64,
    /// A (re)subscription happened: one `GET` whatever was announced.
    catching_up: AtomicBool,
    /// Wakes the reader; holds one permit while it is busy, so a burst of messages
    /// during a `GET` costs one more `GET`, not one per message.
    wake: Notify,
}

impl Push {
    /// Registers a watcher; dead ones are dropped on the way.
    pub(crate) fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        let mut watchers = self.lock();
        watchers.retain(|w| w.strong_count() > 0);
        watchers.push(watcher);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<dyn StoreWatcher>>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live watchers; dead ones are dropped.
    fn live(&self) -> Vec<Arc<dyn StoreWatcher>> {
        let mut watchers = self.lock();
        watchers.retain(|w| w.strong_count() > 0);
        watchers.iter().filter_map(Weak::upgrade).collect()
    }

    fn watched(&self) -> bool {
        self.lock().iter().any(|w| w.strong_count() > 0)
    }

    /// Someone saved `generation`: read it unless it was handed out already.
    fn announce(&self, generation: u64) {
        self.announced.fetch_max(generation, Ordering::AcqRel);
        if generation > self.delivered.load(Ordering::Acquire) && self.watched() {
            self.wake.notify_one();
        }
    }

    /// Messages may have been missed: read once.
    fn catch_up(&self) {
        if self.watched() {
            self.catching_up.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Hands `token` to every live watcher, unless a token of its generation or newer
    /// was handed out already (watchers ignore older tokens anyway). A watcher that
    /// panics is skipped; the others still get the token.
    pub(crate) fn deliver(&self, token: &Token) {
        let generation = token.generation();
        if self.delivered.fetch_max(generation, Ordering::AcqRel) >= generation {
            return;
        }
        for watcher in self.live() {
            let token = token.clone();
            if catch_unwind(AssertUnwindSafe(|| watcher.token_saved(token))).is_err() {
                tracing::warn!("a token store watcher panicked");
            }
        }
    }

    /// Whether a `GET` is worth it now: after a resubscription, or when a generation
    /// newer than the last handed out was announced, and only if anyone watches.
    fn wanted(&self) -> bool {
        let catching_up = self.catching_up.swap(false, Ordering::AcqRel);
        (catching_up
            || self.announced.load(Ordering::Acquire) > self.delivered.load(Ordering::Acquire))
            && self.watched()
    }
}

/// The reader behind the push: each time it is woken and a read is [`Push::wanted`],
/// one `GET` of the record, decoded and handed to the watchers. A failed read is only
/// logged: the next announcement or resubscription reads again, and the coordinators
/// read the store themselves at their refresh-ahead.
pub(crate) async fn read_pushed(push: Arc<Push>, con: Con, key: String, timeout: Duration) {
    let mut con = con;
    loop {
        push.wake.notified().await;
        if !push.wanted() {
            continue;
        }
        let raw: Result<Option<String>, _> =
            bounded(timeout, redis::cmd("GET").arg(&key).query_async(&mut con)).await;
        match raw.map(|raw| raw.as_deref().map(wire::decode).transpose()) {
            Ok(Ok(Some(token))) => push.deliver(&token),
            Ok(Ok(None)) => {}
            // Neither error carries the record's content.
            Ok(Err(error)) | Err(error) => {
                tracing::debug!(%error, "reading a token announced on the channel failed");
            }
        }
    }
}
