//! What every clone of a [`crate::RedisStore`] and every guard it hands out share: the
//! settings, key names, connection, runtime and the fleet's wake-up counter. Nothing in
//! here says who holds the lock: that lives in each guard, so one store can serve many
//! coordinators.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokenflight::StoreError;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::conn::Con;
use crate::events::Push;
use crate::settings::{ReplicaAck, Settings};

pub(crate) struct Inner {
    pub(crate) settings: Settings,
    pub(crate) token_key: String,
    pub(crate) lock_key: String,
    pub(crate) channel: String,
    pub(crate) con: Con,
    pub(crate) runtime: Handle,
    /// Whether the last Redis round trip got an answer: warnings about an unreachable
    /// Redis are logged when this flips, not once per request.
    pub(crate) reachable: AtomicBool,
    /// Bumped by the pub/sub listener on every save or release in the fleet.
    pub(crate) events: watch::Receiver<u64>,
    /// The coordinators watching this store, told of every save in the fleet.
    pub(crate) push: Arc<Push>,
}

impl Inner {
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
}

/// Records whether the last round trip got through; `Some(now)` only when that
/// changed, so a warning is logged once per outage rather than once per request.
fn transition(reachable: &AtomicBool, now: bool) -> Option<bool> {
    (reachable.swap(now, Ordering::Relaxed) != now).then_some(now)
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
}
