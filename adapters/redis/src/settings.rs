//! The store's settings, with documented defaults, and the names of its keys.

use std::time::Duration;

use tokenflight::StoreError;

/// How many replicas must acknowledge the refresh lock (before the refresh token is
/// spent) and the saved token (before the lock is released); see
/// [`RedisStoreBuilder::replica_ack`](crate::RedisStoreBuilder::replica_ack) and the crate docs on what this does and does not
/// guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaAck {
    /// Do not wait for replicas: right for one node without replicas, or as a
    /// deliberate choice of availability over safety (a failover right after the lock
    /// was taken can then let two replicas spend one refresh token).
    None,
    /// Wait (Redis `WAIT`) until at least this many replicas acknowledged. If they do
    /// not within [`RedisStoreBuilder::replica_ack_timeout`](crate::RedisStoreBuilder::replica_ack_timeout), the lock is given back
    /// and no refresh is attempted under it (the flight fails with
    /// [`StoreError::Unavailable`]; the coordinator keeps serving a usable token).
    Required(u32),
}

/// Timing and naming settings of a [`crate::RedisStore`].
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
    /// `None`: the deployment's default (see [`crate::RedisStoreBuilder::replica_ack`]).
    pub(crate) replica_ack: Option<ReplicaAck>,
    pub(crate) replica_ack_timeout: Duration,
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
            replica_ack: None,
            // A replica on the same network acknowledges in about a millisecond; a
            // second covers a busy one without holding the fleet up for long.
            replica_ack_timeout: Duration::from_secs(1),
        }
    }
}

impl Settings {
    /// Refuses settings that cannot work: a lease renewed no faster than it lapses, or
    /// zero durations (a zero poll interval would spin).
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
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
        if self.replica_ack == Some(ReplicaAck::Required(0)) {
            return invalid("ReplicaAck::Required needs at least one replica (or use None)");
        }
        if self.replica_ack_timeout.is_zero() {
            // WAIT with timeout 0 blocks forever.
            return invalid("the replica acknowledgement timeout must be longer than zero");
        }
        if self.key_prefix.is_empty() {
            // `{}` is no hash tag: the keys would land in different cluster slots.
            return invalid("the key prefix must not be empty");
        }
        if self.key_prefix.contains('}') && hash_tag(&self.key_prefix).is_none() {
            return invalid("a key prefix with '}' must itself contain a hash tag such as {name}");
        }
        Ok(())
    }

    /// The connections' own bound on one reply. Longer than a `WAIT` may block, so a
    /// slow acknowledgement is answered (with a count) instead of cutting the
    /// connection; each operation is bounded by the store itself anyway.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.command_timeout + self.replica_ack_timeout
    }

    /// The key prefix with a Redis Cluster hash tag: the prefix itself if it has one,
    /// else the prefix wrapped in braces. All keys of one store then hash to one slot,
    /// so the scripts that touch the token and the lock together never hit `CROSSSLOT`.
    fn tagged_prefix(&self) -> String {
        if hash_tag(&self.key_prefix).is_some() {
            self.key_prefix.clone()
        } else {
            format!("{{{}}}", self.key_prefix)
        }
    }

    pub(crate) fn token_key(&self) -> String {
        format!("{}token", self.tagged_prefix())
    }

    pub(crate) fn lock_key(&self) -> String {
        format!("{}lock", self.tagged_prefix())
    }

    pub(crate) fn channel(&self) -> String {
        format!("{}events", self.tagged_prefix())
    }
}

/// The part of `key` that Redis Cluster hashes: the text between the first `{` and the
/// first `}` after it, if that is not empty (the cluster specification's rule).
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = key.get(open + 1..)?;
    let close = rest.find('}')?;
    rest.get(..close).filter(|tag| !tag.is_empty())
}

#[cfg(test)]
mod key_tests {
    use super::*;

    fn keys(prefix: &str) -> [String; 3] {
        let settings = Settings {
            key_prefix: prefix.into(),
            ..Settings::default()
        };
        [
            settings.token_key(),
            settings.lock_key(),
            settings.channel(),
        ]
    }

    #[test]
    fn every_key_of_a_store_shares_one_cluster_hash_tag() {
        for prefix in ["tokenflight:", "app:{billing}:", "a{}b:", "{x", "x}{y}"] {
            let keys = keys(prefix);
            let tags: Vec<Option<&str>> = keys.iter().map(|k| hash_tag(k)).collect();
            assert!(tags[0].is_some(), "{prefix:?}: {keys:?}");
            assert!(tags.iter().all(|t| *t == tags[0]), "{prefix:?}: {keys:?}");
        }
        assert_eq!(keys("tokenflight:")[0], "{tokenflight:}token");
        // A prefix with its own tag is kept as it is.
        assert_eq!(keys("app:{billing}:")[1], "app:{billing}:lock");
    }

    #[test]
    fn the_hash_tag_follows_the_cluster_rule() {
        assert_eq!(hash_tag("{user1000}.following"), Some("user1000"));
        assert_eq!(hash_tag("foo{}{bar}"), None);
        assert_eq!(hash_tag("foo{{bar}}zap"), Some("{bar"));
        assert_eq!(hash_tag("foo{bar}{zap}"), Some("bar"));
        assert_eq!(hash_tag("plain"), None);
    }
}
