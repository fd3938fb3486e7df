//! Push: the coordinators watching a namespace of the store
//! ([`tokenflight::store::StoreWatcher`]), and the reader that fetches announced tokens
//! for them. The pub/sub listener that feeds it is `listener.rs`.
//!
//! # Push
//!
//! A save publishes `saved:<generation>` — the number only: secrets never travel over
//! pub/sub, which any client allowed to subscribe can read. A namespace with live
//! watchers then reads its record with one `GET` and hands the token to each of them.
//! Per replica, namespace and refresh cycle that is one `GET`, whatever the size of the
//! fleet:
//!
//! - announcements of a generation this namespace already handed out (its own save,
//!   which it hands to its watchers directly; a repeated message) cost nothing;
//! - a burst of messages while a `GET` is in progress costs one more `GET` after it,
//!   not one per message (a single wake-up permit);
//! - after every (re)subscription one `GET` catches up with saves that happened while
//!   the subscription was down (a Redis restart, a failover);
//! - a namespace nobody watches reads nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokenflight::{Token, store::StoreWatcher, store::record};
use tokio::sync::Notify;

use crate::conn::Con;
use crate::counts::{Counts, bump};
use crate::io::bounded;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The generation in a `saved:<generation>` message (the save script's), if it is one.
pub(crate) fn saved_generation(message: &redis::Msg) -> Option<u64> {
    let payload: String = message.get_payload().ok()?;
    payload.strip_prefix("saved:")?.parse().ok()
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
    /// A generation this store is saving right now: its announcement may arrive
    /// before the save's reply, and needs no `GET` either (the save hands it over).
    saving: AtomicU64,
    /// A (re)subscription happened: one `GET` whatever was announced.
    pub(crate) catching_up: AtomicBool,
    /// Wakes the reader; holds one permit while it is busy, so a burst of messages
    /// during a `GET` costs one more `GET`, not one per message.
    wake: Notify,
    /// Told after each hand-over to the watchers: lock waiters that wait for an
    /// announced token to arrive.
    pub(crate) handed_out: Notify,
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

    /// The highest generation known here without a read: handed out, or being saved
    /// through this store.
    fn known(&self) -> u64 {
        self.delivered
            .load(Ordering::Acquire)
            .max(self.saving.load(Ordering::Acquire))
    }

    /// Someone saved `generation`: read it unless it is known here already.
    pub(crate) fn announce(&self, generation: u64) {
        self.announced.fetch_max(generation, Ordering::AcqRel);
        if generation > self.known() && self.watched() {
            self.wake.notify_one();
        }
    }

    /// This store is about to save `generation`.
    pub(crate) fn saving(&self, generation: u64) {
        self.saving.fetch_max(generation, Ordering::AcqRel);
    }

    /// This store's save of `token` ended: saved (its watchers get it now, without a
    /// read) or not (one read, in case the save ran but its reply was lost).
    pub(crate) fn saved(&self, token: &Token, ok: bool) {
        if ok {
            self.deliver(token);
        } else {
            self.catch_up();
        }
        let _ = self.saving.compare_exchange(
            token.generation(),
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Messages may have been missed: read once.
    pub(crate) fn catch_up(&self) {
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
        self.handed_out.notify_waiters();
    }

    /// Whether a generation newer than any handed out was announced and the reader
    /// will fetch it for the watchers.
    pub(crate) fn pending(&self) -> bool {
        self.announced.load(Ordering::Acquire) > self.known() && self.watched()
    }

    /// Whether the reader has a wake-up waiting (consumes it).
    #[cfg(test)]
    pub(crate) fn wake_pending(&self) -> bool {
        futures_util::FutureExt::now_or_never(self.wake.notified()).is_some()
    }

    /// Whether a `GET` is worth it now: after a resubscription, or when a generation
    /// newer than the last handed out was announced, and only if anyone watches.
    fn wanted(&self) -> bool {
        let catching_up = self.catching_up.swap(false, Ordering::AcqRel);
        (catching_up || self.announced.load(Ordering::Acquire) > self.known()) && self.watched()
    }
}

/// The reader behind the push: each time it is woken and a read is [`Push::wanted`],
/// one `GET` of the record, decoded and handed to the watchers. A read that fails
/// (the first command after Redis restarted often does, while the connection is
/// re-established) is tried again with backoff; a corrupt record is only logged (the
/// next save replaces it).
pub(crate) async fn read_pushed(
    push: Arc<Push>,
    con: Con,
    key: String,
    timeout: Duration,
    counts: Arc<Counts>,
) {
    let mut con = con;
    let mut retry = RETRY_MIN;
    loop {
        push.wake.notified().await;
        let catching_up = push.catching_up.load(Ordering::Acquire);
        if !push.wanted() {
            continue;
        }
        bump(&counts.push_reads);
        if catching_up {
            bump(&counts.catch_up_reads);
        }
        let raw: Result<Option<Vec<u8>>, _> =
            bounded(timeout, redis::cmd("GET").arg(&key).query_async(&mut con)).await;
        match raw {
            Ok(raw) => {
                retry = RETRY_MIN;
                match raw.as_deref().map(record::decode).transpose() {
                    Ok(Some(token)) => push.deliver(&token),
                    Ok(None) => {}
                    // The error names a position, never the record's content.
                    Err(error) => tracing::debug!(%error, "the announced token is unreadable"),
                }
            }
            Err(error) => {
                tracing::debug!(%error, "reading an announced token failed; trying again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                push.catch_up();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[derive(Default)]
    struct Seen(Mutex<Vec<u64>>);

    impl StoreWatcher for Seen {
        fn token_saved(&self, token: Token) {
            self.0.lock().unwrap().push(token.generation());
        }
    }

    fn watched() -> (Push, Arc<Seen>) {
        let push = Push::default();
        let seen = Arc::new(Seen::default());
        let weak: Weak<Seen> = Arc::downgrade(&seen);
        push.watch(weak);
        (push, seen)
    }

    /// How many wake-ups the reader would take right now.
    fn wakeups(push: &Push) -> usize {
        let mut n = 0;
        while push.wake.notified().now_or_never().is_some() {
            n += 1;
        }
        n
    }

    #[test]
    fn a_burst_of_announcements_costs_one_read() {
        let (push, _seen) = watched();
        for generation in 2..100 {
            push.announce(generation);
        }
        assert_eq!(wakeups(&push), 1, "one permit, not one per message");
        assert!(push.wanted());
    }

    #[test]
    fn announcements_of_what_was_handed_out_cost_nothing() {
        let (push, seen) = watched();
        push.deliver(&Token::new("a").with_generation(7));
        assert_eq!(*seen.0.lock().unwrap(), [7]);
        for generation in [3, 7] {
            push.announce(generation);
        }
        assert_eq!(wakeups(&push), 0);
        assert!(!push.wanted());
        // Read while a newer one was announced: wanted once, not after the delivery.
        push.announce(8);
        assert!(push.wanted());
        push.deliver(&Token::new("b").with_generation(8));
        assert!(!push.wanted());
        // Each generation once, and never an older one after a newer one.
        push.deliver(&Token::new("b").with_generation(8));
        push.deliver(&Token::new("c").with_generation(5));
        assert_eq!(*seen.0.lock().unwrap(), [7, 8]);
    }

    #[test]
    fn the_announcement_of_a_save_through_this_store_costs_nothing() {
        let (push, seen) = watched();
        let token = Token::new("a").with_generation(6);
        push.saving(6);
        // The message may arrive before the save's reply.
        push.announce(6);
        assert_eq!(wakeups(&push), 0);
        push.saved(&token, true);
        assert_eq!(*seen.0.lock().unwrap(), [6]);
        assert!(!push.wanted());
        // A save that failed (its reply may have been lost) reads once.
        push.saving(7);
        push.saved(&Token::new("b").with_generation(7), false);
        assert_eq!(wakeups(&push), 1);
        assert!(push.wanted());
        // Nothing is pending afterwards: a later announcement of 7 reads.
        push.announce(7);
        assert_eq!(wakeups(&push), 1);
    }

    #[test]
    fn a_resubscription_reads_once_even_if_nothing_new_was_announced() {
        let (push, _seen) = watched();
        push.deliver(&Token::new("a").with_generation(4));
        push.catch_up();
        assert_eq!(wakeups(&push), 1);
        assert!(push.wanted());
        assert!(!push.wanted(), "once");
    }

    #[test]
    fn nobody_watching_means_no_reads_and_dead_watchers_are_dropped() {
        let (push, seen) = watched();
        drop(seen);
        push.announce(3);
        push.catch_up();
        assert_eq!(wakeups(&push), 0);
        assert!(!push.wanted());
        let alive = Arc::new(Seen::default());
        let weak: Weak<Seen> = Arc::downgrade(&alive);
        push.watch(weak);
        assert_eq!(push.lock().len(), 1, "the dead one was dropped");
        push.deliver(&Token::new("a").with_generation(3));
        assert_eq!(*alive.0.lock().unwrap(), [3]);
    }

    #[test]
    fn a_panicking_watcher_does_not_keep_the_token_from_the_others() {
        struct Panics;
        impl StoreWatcher for Panics {
            fn token_saved(&self, _token: Token) {
                panic!("watcher panicked (test)");
            }
        }
        let push = Push::default();
        let panics = Arc::new(Panics);
        let weak: Weak<Panics> = Arc::downgrade(&panics);
        push.watch(weak);
        let seen = Arc::new(Seen::default());
        let weak: Weak<Seen> = Arc::downgrade(&seen);
        push.watch(weak);
        push.deliver(&Token::new("a").with_generation(1));
        assert_eq!(*seen.0.lock().unwrap(), [1]);
    }

    #[test]
    fn only_saved_messages_carry_a_generation() {
        let msg = |payload: &str| {
            let value = redis::Value::Array(vec![
                redis::Value::BulkString(b"message".to_vec()),
                redis::Value::BulkString(b"{p}events".to_vec()),
                redis::Value::BulkString(payload.as_bytes().to_vec()),
            ]);
            redis::Msg::from_owned_value(value).unwrap()
        };
        assert_eq!(saved_generation(&msg("saved:42")), Some(42));
        assert_eq!(saved_generation(&msg("released")), None);
        assert_eq!(saved_generation(&msg("saved:x")), None);
    }
}
