//! What every clone of a [`crate::RedisStore`] view and every guard it hands out share:
//! the settings, the key names of its namespace, the connection, runtime and the
//! namespace's wake-up counter and watchers. Nothing in here says who holds the lock:
//! that lives in each guard, so one store can serve many coordinators.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokenflight::store::StoreError;
use tokio::runtime::Handle;

use crate::conn::Con;
use crate::events::Push;
use crate::namespace::{Hub, Namespace};
use crate::settings::{ReplicaAck, Settings};

pub(crate) struct Inner {
    pub(crate) settings: Arc<Settings>,
    pub(crate) token_key: String,
    pub(crate) lock_key: String,
    pub(crate) channel: String,
    /// The store's one command connection (a clone shares it).
    pub(crate) con: Con,
    pub(crate) runtime: Handle,
    /// The coordinators watching this namespace, told of every save in the fleet.
    pub(crate) push: Arc<Push>,
    /// This namespace's subscription, wake-ups and watchers (shared by its views).
    pub(crate) namespace: Arc<Namespace>,
    /// What all views of the store share.
    pub(crate) hub: Arc<Hub>,
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
            transition(&self.hub.reachable, unavailable.is_none()),
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
