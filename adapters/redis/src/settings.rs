//! The store's settings, with documented defaults, and the names of its keys.

use std::time::Duration;

use tokenflight::{ConfigError, store::StoreError};

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
        let invalid = |why: &str| Err(invalid_setting(why.to_owned()));
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

    /// The tagged prefix of `namespace`: the store's hash tag with `ns:<namespace>`
    /// added inside the braces, so each namespace has a hash tag (and a Cluster slot)
    /// of its own and never shares a key or a channel with another namespace or with
    /// the store itself. `namespace` is validated ([`crate::namespace::validate`]): it
    /// holds no brace, so it cannot end the tag early.
    fn namespaced_prefix(&self, namespace: &str) -> String {
        let tagged = self.tagged_prefix();
        // The tag's closing brace: the first `}` after the first `{` (the cluster rule;
        // `tagged_prefix` always has a non-empty tag).
        let close = tagged
            .find('{')
            .and_then(|open| tagged.get(open..)?.find('}').map(|at| open + at));
        let Some((head, tail)) = close.and_then(|at| Some((tagged.get(..at)?, tagged.get(at..)?)))
        else {
            // Unreachable with a validated prefix; a tag of its own all the same.
            return format!("{{{tagged}ns:{namespace}}}");
        };
        let separator = if head.ends_with(':') { "" } else { ":" };
        format!("{head}{separator}ns:{namespace}{tail}")
    }

    /// The token key, lock key and channel of the store (`None`) or of one of its
    /// namespaces.
    pub(crate) fn keys(&self, namespace: Option<&str>) -> Keys {
        let prefix = match namespace {
            None => self.tagged_prefix(),
            Some(namespace) => self.namespaced_prefix(namespace),
        };
        Keys {
            token: format!("{prefix}token"),
            lock: format!("{prefix}lock"),
            channel: format!("{prefix}events"),
        }
    }
}

/// The names one namespace of a store uses in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) token: String,
    pub(crate) lock: String,
    pub(crate) channel: String,
}

/// The part of `key` that Redis Cluster hashes: the text between the first `{` and the
/// first `}` after it, if that is not empty (the cluster specification's rule).
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = key.get(open + 1..)?;
    let close = rest.find('}')?;
    rest.get(..close).filter(|tag| !tag.is_empty())
}

/// Settings that cannot work together: a [`ConfigError`] (the error's source), carried
/// by [`StoreError::Other`] as every builder error of the store is.
pub(crate) fn invalid_setting(why: String) -> StoreError {
    StoreError::Other(Box::new(ConfigError::InvalidSetting(format!(
        "invalid RedisStore settings: {why}"
    ))))
}

#[cfg(test)]
mod key_tests {
    use super::*;

    fn keys_in(prefix: &str, namespace: Option<&str>) -> [String; 3] {
        let settings = Settings {
            key_prefix: prefix.into(),
            ..Settings::default()
        };
        let keys = settings.keys(namespace);
        [keys.token, keys.lock, keys.channel]
    }

    fn keys(prefix: &str) -> [String; 3] {
        keys_in(prefix, None)
    }

    #[test]
    fn each_namespace_has_a_hash_tag_of_its_own() {
        for prefix in [
            "tokenflight:",
            "app:{billing}:",
            "a{}b:",
            "{x",
            "x}{y}",
            "p",
        ] {
            let root = keys(prefix);
            let a = keys_in(prefix, Some("0a1b"));
            let b = keys_in(prefix, Some("0a1c"));
            for keys in [&a, &b] {
                let tags: Vec<Option<&str>> = keys.iter().map(|k| hash_tag(k)).collect();
                assert!(tags[0].is_some(), "{prefix:?}: {keys:?}");
                assert!(tags.iter().all(|t| *t == tags[0]), "{prefix:?}: {keys:?}");
            }
            let tag = |keys: &[String; 3]| hash_tag(&keys[0]).map(str::to_owned);
            assert_ne!(tag(&a), tag(&b), "{prefix:?}");
            assert_ne!(tag(&a), tag(&root), "{prefix:?}");
            for (x, y) in [(&a, &b), (&a, &root), (&b, &root)] {
                assert!(x.iter().all(|k| !y.contains(k)), "{x:?} {y:?}");
            }
        }
        assert_eq!(
            keys_in("tokenflight:", Some("ab12"))[0],
            "{tokenflight:ns:ab12}token"
        );
        assert_eq!(
            keys_in("app:{billing}:", Some("ab12"))[1],
            "app:{billing:ns:ab12}:lock"
        );
        assert_eq!(keys_in("p", Some("ab12"))[2], "{p:ns:ab12}events");
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
