//! What a store sent to Redis, by reason: each counter is one round trip (a command or
//! a script call), so a fleet's Redis work can be split by cause per replica.

use std::sync::atomic::{AtomicU64, Ordering};

/// The round trips a store and all its views made, by reason (see
/// [`crate::RedisStore::counters`]). Each counts commands sent, not server work: a
/// script call is one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreCounters {
    /// Unlocked reads of the token (`TokenStore::load`: the coordinator's look before
    /// it takes the lock, its reloads).
    pub loads: u64,
    /// Lock requests (`ACQUIRE` script calls), whatever their answer.
    pub lock_attempts: u64,
    /// Lock requests that took the lock.
    pub locks_taken: u64,
    /// Lock requests sent again because a message on the channel (a save or a
    /// release) woke the waiter.
    pub lock_retries_woken: u64,
    /// Lock requests sent again after a wait ran out without a message (polls while
    /// another replica holds the lock).
    pub lock_retries_polled: u64,
    /// Lease renewals of a held lock.
    pub lease_renewals: u64,
    /// Fenced reads of the token under the lock.
    pub fenced_loads: u64,
    /// Fenced saves (with replica acknowledgement, each try).
    pub fenced_saves: u64,
    /// Releases of the lock (compare-and-delete), retries included.
    pub releases: u64,
    /// Reads of an announced token for this store's watchers (push).
    pub push_reads: u64,
    /// Of `push_reads`, those made to catch up after a (re)subscription or a save whose
    /// reply was lost: announcements that may have been missed.
    pub catch_up_reads: u64,
    /// Lock requests put off because another replica's save was announced and this
    /// store was fetching the new token for its coordinators: the request is sent
    /// only if the waiter still waits once the token arrived (or after one poll
    /// interval).
    pub waits_for_push: u64,
}

impl RedisStoreCounters {
    /// All round trips counted here.
    ///
    /// ```
    /// let counters = tokenflight_redis::RedisStoreCounters::default();
    /// assert_eq!(counters.round_trips(), 0);
    /// ```
    pub fn round_trips(&self) -> u64 {
        self.loads
            + self.lock_attempts
            + self.lease_renewals
            + self.fenced_loads
            + self.fenced_saves
            + self.releases
            + self.push_reads
    }
}

/// The live counters behind [`RedisStoreCounters`], shared by every view of a store.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) loads: AtomicU64,
    pub(crate) lock_attempts: AtomicU64,
    pub(crate) locks_taken: AtomicU64,
    pub(crate) lock_retries_woken: AtomicU64,
    pub(crate) lock_retries_polled: AtomicU64,
    pub(crate) lease_renewals: AtomicU64,
    pub(crate) fenced_loads: AtomicU64,
    pub(crate) fenced_saves: AtomicU64,
    pub(crate) releases: AtomicU64,
    pub(crate) push_reads: AtomicU64,
    pub(crate) catch_up_reads: AtomicU64,
    pub(crate) waits_for_push: AtomicU64,
}

/// One more.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counts {
    pub(crate) fn snapshot(&self) -> RedisStoreCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RedisStoreCounters {
            loads: get(&self.loads),
            lock_attempts: get(&self.lock_attempts),
            locks_taken: get(&self.locks_taken),
            lock_retries_woken: get(&self.lock_retries_woken),
            lock_retries_polled: get(&self.lock_retries_polled),
            lease_renewals: get(&self.lease_renewals),
            fenced_loads: get(&self.fenced_loads),
            fenced_saves: get(&self.fenced_saves),
            releases: get(&self.releases),
            push_reads: get(&self.push_reads),
            catch_up_reads: get(&self.catch_up_reads),
            waits_for_push: get(&self.waits_for_push),
        }
    }
}
