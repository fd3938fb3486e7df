//! The store's settings and its builder, with documented defaults.

use std::fmt;
use std::time::Duration;

use redis::IntoConnectionInfo;
use tokenflight::StoreError;
use tokio::runtime::Handle;

use crate::store::RedisStore;

/// Timing and naming settings of a [`RedisStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) key_prefix: String,
    pub(crate) lease: Duration,
    pub(crate) renew_every: Option<Duration>,
    pub(crate) lock_wait: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) poll_min: Duration,
    pub(crate) poll_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        let lease = Duration::from_secs(45);
        Settings {
            key_prefix: "tokenflight:".into(),
            // Longer than the coordinator's default refresh timeout (30 s), so a live
            // holder never loses the lock mid-refresh even if one renewal is missed.
            lease,
            renew_every: Some(lease / 3),
            // Longer than the lease: a crashed holder's lock lapses before waiters give up.
            lock_wait: Duration::from_secs(60),
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            poll_min: Duration::from_millis(20),
            poll_max: Duration::from_millis(500),
        }
    }
}

impl Settings {
    /// Refuses settings that cannot work: a lease renewed no faster than it lapses, or
    /// zero durations (a zero poll interval would spin).
    fn validate(&self) -> Result<(), StoreError> {
        let invalid = |why: &str| {
            Err(StoreError::Other(
                format!("invalid RedisStore settings: {why}").into(),
            ))
        };
        if self.lease.is_zero() || self.command_timeout.is_zero() || self.connect_timeout.is_zero()
        {
            return invalid("lease and timeouts must be longer than zero");
        }
        if self.poll_min.is_zero() {
            return invalid("the minimum poll interval must be longer than zero");
        }
        if self
            .renew_every
            .is_some_and(|every| every.is_zero() || every >= self.lease)
        {
            return invalid("renewal must happen more often than the lease lapses");
        }
        Ok(())
    }

    pub(crate) fn token_key(&self) -> String {
        format!("{}token", self.key_prefix)
    }

    pub(crate) fn lock_key(&self) -> String {
        format!("{}lock", self.key_prefix)
    }

    pub(crate) fn channel(&self) -> String {
        format!("{}events", self.key_prefix)
    }
}

/// Configures a [`RedisStore`]; see [`RedisStore::builder`].
///
/// Defaults: key prefix `"tokenflight:"`, lease 45 s renewed every 15 s, lock wait 60 s,
/// command and connect timeouts 2 s, polling between 20 ms and 500 ms.
pub struct RedisStoreBuilder {
    client: Result<redis::Client, redis::RedisError>,
    settings: Settings,
    runtime: Option<Handle>,
}

impl fmt::Debug for RedisStoreBuilder {
    // The connection info may carry a password: show only our own settings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("settings", &self.settings)
            .field("runtime", &self.runtime.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    pub(crate) fn new(info: impl IntoConnectionInfo) -> Self {
        RedisStoreBuilder {
            client: redis::Client::open(info),
            settings: Settings::default(),
            runtime: None,
        }
    }

    /// Prefix of the store's keys and channel (`<prefix>token`, `<prefix>lock`,
    /// `<prefix>events`). Use one prefix per OAuth client (per refresh-token family).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.key_prefix = prefix.into();
        self
    }

    /// How long the refresh lock lives without renewal. Keep it longer than the
    /// coordinator's refresh timeout: it is how long the fleet waits for a holder that
    /// died. Renewal (every third of the lease by default) is rescheduled to match.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        if self.settings.renew_every.is_some() {
            self.settings.renew_every = Some(lease / 3);
        }
        self
    }

    /// How often a holder renews its lease while it refreshes. `None` turns renewal off:
    /// a holder then loses the lock after one lease however long its refresh takes (the
    /// fenced save still stops it from overwriting a newer token). Default: lease / 3.
    pub fn renew_every(mut self, every: Option<Duration>) -> Self {
        self.settings.renew_every = every;
        self
    }

    /// How long `lock()` waits for another replica's refresh before it gives up with
    /// [`StoreError::LockTimeout`]. The coordinator's refresh timeout also bounds the
    /// wait; the shorter one wins. Default: 60 s.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.settings.lock_wait = wait;
        self
    }

    /// Bound on each Redis command, reconnection waits included; past it the operation
    /// fails with [`StoreError::Unavailable`]. Default: 2 s.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.settings.command_timeout = timeout;
        self
    }

    /// Bound on each connection attempt. Default: 2 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Polling interval while waiting for the lock: starts at `min`, doubles up to
    /// `max`. Pub/sub normally wakes waiters sooner; polling covers lost messages and a
    /// subscription that is down. Default: 20 ms to 500 ms.
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.settings.poll_min = min;
        self.settings.poll_max = max.max(min);
        self
    }

    /// The tokio runtime that runs the store's Redis I/O, lease renewal and pub/sub
    /// listener. Default: the runtime `build`/`connect` is called in.
    ///
    /// With an explicit handle the store's futures can be awaited from any executor
    /// (async-std, smol, `futures::executor`): the work runs on this runtime and only
    /// the result crosses over.
    pub fn runtime(mut self, handle: Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Builds the store without contacting Redis (it connects on first use), so a
    /// service can start while Redis is down. Fails if the URL is invalid or no tokio
    /// runtime is available.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        self.settings.validate()?;
        let client = self.client.map_err(|e| {
            StoreError::Other(format!("invalid Redis connection info ({:?})", e.kind()).into())
        })?;
        let runtime = match self.runtime {
            Some(handle) => handle,
            None => Handle::try_current().map_err(|_| {
                StoreError::Other(
                    "RedisStore needs a tokio runtime: build it inside one or pass \
                     RedisStoreBuilder::runtime"
                        .into(),
                )
            })?,
        };
        RedisStore::start(client, self.settings, runtime)
    }

    /// Builds the store and checks that Redis answers (one bounded `PING`), so a wrong
    /// address shows up at start-up as [`StoreError::Unavailable`].
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let store = self.build()?;
        store.ping().await?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let refused = |b: RedisStoreBuilder| matches!(b.build(), Err(StoreError::Other(e)) if e.to_string().contains("invalid RedisStore settings"));
        let b = || RedisStoreBuilder::new("redis://127.0.0.1/");
        assert!(refused(b().renew_every(Some(Duration::from_secs(60)))));
        assert!(refused(b().lease(Duration::ZERO)));
        assert!(refused(
            b().poll_interval(Duration::ZERO, Duration::from_secs(1))
        ));
        assert!(refused(b().command_timeout(Duration::ZERO)));
        // The defaults pass validation (and then need a runtime, which is absent here).
        assert!(Settings::default().validate().is_ok());
        assert!(
            b().lease(Duration::from_secs(3))
                .settings
                .validate()
                .is_ok()
        );
    }
}
