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
    /// [C16](crate#c16)).
    pub attempt_retries: u64,
    /// Tokens adopted from the store while re-authentication was required (a login
    /// saved by another process or replica, [C17](crate#c17)).
    pub store_reloads: u64,
    /// Tokens adopted from the store because another process had refreshed.
    pub adopted: u64,
    /// Tokens adopted because the store pushed them: another replica, process or
    /// coordinator saved them ([`crate::store::StoreWatcher`]).
    pub pushed: u64,
    /// Flights that failed.
    pub failures: u64,
    /// Callers that joined a flight someone else started.
    pub coalesced: u64,
    /// Requests resent once with a newer token.
    pub retries: u64,
    /// Rejections of a token older than the current one (no refresh, [C3](crate#c3)).
    pub stale_rejections: u64,
    /// Responses classified as "token rejected".
    pub rejections: u64,
    /// Rejected requests that could not be resent (body not replayable).
    pub not_replayable: u64,
}

/// Adds two snapshots field by field (a keyed policy's counters are the sum of its
/// keys'), saturating.
impl std::ops::Add for Stats {
    type Output = Stats;

    fn add(self, other: Stats) -> Stats {
        Stats {
            flights: self.flights.saturating_add(other.flights),
            source_calls: self.source_calls.saturating_add(other.source_calls),
            attempt_retries: self.attempt_retries.saturating_add(other.attempt_retries),
            store_reloads: self.store_reloads.saturating_add(other.store_reloads),
            adopted: self.adopted.saturating_add(other.adopted),
            pushed: self.pushed.saturating_add(other.pushed),
            failures: self.failures.saturating_add(other.failures),
            coalesced: self.coalesced.saturating_add(other.coalesced),
            retries: self.retries.saturating_add(other.retries),
            stale_rejections: self.stale_rejections.saturating_add(other.stale_rejections),
            rejections: self.rejections.saturating_add(other.rejections),
            not_replayable: self.not_replayable.saturating_add(other.not_replayable),
        }
    }
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
