//! Cheap counters for observability: a `Stats` snapshot costs a few atomic loads.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a coordinator's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Flights started (each ends in one outcome: a token fetched or adopted, or an
    /// error).
    pub flights: u64,
    /// Calls of the token source: every attempt, retries inside a flight included.
    pub source_calls: u64,
    /// Source attempts beyond the first inside one flight (transient failures retried,
    /// C16).
    pub attempt_retries: u64,
    /// Tokens adopted from the store while re-authentication was required (a login
    /// saved by another process or replica, C17).
    pub store_reloads: u64,
    /// Tokens adopted from the store because another process had refreshed.
    pub adopted: u64,
    /// Tokens adopted because the store pushed them: another replica, process or
    /// coordinator saved them (issue 20, [`crate::StoreWatcher`]).
    pub pushed: u64,
    /// Flights that failed.
    pub failures: u64,
    /// Callers that joined a flight someone else started.
    pub coalesced: u64,
    /// Requests resent once with a newer token.
    pub retries: u64,
    /// Rejections of a token older than the current one (no refresh, C3).
    pub stale_rejections: u64,
    /// Responses classified as "token rejected".
    pub rejections: u64,
    /// Rejected requests that could not be resent (body not replayable).
    pub not_replayable: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) flights: AtomicU64,
    pub(crate) source_calls: AtomicU64,
    pub(crate) attempt_retries: AtomicU64,
    pub(crate) store_reloads: AtomicU64,
    pub(crate) adopted: AtomicU64,
    pub(crate) pushed: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) stale_rejections: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) not_replayable: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            flights: get(&self.flights),
            source_calls: get(&self.source_calls),
            attempt_retries: get(&self.attempt_retries),
            store_reloads: get(&self.store_reloads),
            adopted: get(&self.adopted),
            pushed: get(&self.pushed),
            failures: get(&self.failures),
            coalesced: get(&self.coalesced),
            retries: get(&self.retries),
            stale_rejections: get(&self.stale_rejections),
            rejections: get(&self.rejections),
            not_replayable: get(&self.not_replayable),
        }
    }
}
