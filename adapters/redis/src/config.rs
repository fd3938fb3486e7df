//! The store's settings and its builder, with documented defaults.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    RedisResult, TlsCertificates, TlsMode,
};
use tokenflight::{Secret, store::StoreError};
use tokio::runtime::Handle;

use crate::conn::{Con, SentinelCon, Subscriber};
use crate::store::RedisStore;

/// How many replicas must acknowledge the refresh lock (before the refresh token is
/// spent) and the saved token (before the lock is released); see
/// [`RedisStoreBuilder::replica_ack`] and the crate docs on what this does and does not
/// guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaAck {
    /// Do not wait for replicas: right for one node without replicas, or as a
    /// deliberate choice of availability over safety (a failover right after the lock
    /// was taken can then let two replicas spend one refresh token).
    None,
    /// Wait (Redis `WAIT`) until at least this many replicas acknowledged. If they do
    /// not within [`RedisStoreBuilder::replica_ack_timeout`], the lock is given back
    /// and no refresh is attempted under it (the flight fails with
    /// [`StoreError::Unavailable`]; the coordinator keeps serving a usable token).
    Required(u32),
}

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
    /// `None`: the deployment's default (see [`RedisStoreBuilder::replica_ack`]).
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

/// Where the store's Redis is.
enum Target {
    Node(RedisResult<ConnectionInfo>),
    Cluster(RedisResult<Vec<ConnectionInfo>>),
    Sentinel {
        sentinels: RedisResult<Vec<ConnectionInfo>>,
        service: String,
    },
}

impl Target {
    /// Whether any URL is `rediss://`.
    fn uses_tls(&self) -> bool {
        let tls = |info: &ConnectionInfo| matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        match self {
            Target::Node(Ok(info)) => tls(info),
            Target::Cluster(Ok(nodes))
            | Target::Sentinel {
                sentinels: Ok(nodes),
                ..
            } => nodes.iter().any(tls),
            _ => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Target::Node(_) => "node",
            Target::Cluster(_) => "cluster",
            Target::Sentinel { .. } => "sentinel",
        }
    }
}

/// Configures a [`RedisStore`]; see [`RedisStore::builder`], [`RedisStore::cluster`]
/// and [`RedisStore::sentinel`].
///
/// Defaults: key prefix `"tokenflight:"`, lease 45 s renewed every 15 s, lock wait 60 s,
/// command and connect timeouts 2 s, polling between 20 ms and 500 ms, replica
/// acknowledgement per deployment (see [`RedisStoreBuilder::replica_ack`]) within 1 s.
pub struct RedisStoreBuilder {
    target: Target,
    settings: Settings,
    runtime: Option<Handle>,
    /// A private CA (and optionally a client certificate) for `rediss://`.
    tls: Option<TlsCertificates>,
    /// ACL user and password for the data nodes, overriding the URLs'.
    credentials: Option<(Option<String>, Secret)>,
}

impl fmt::Debug for RedisStoreBuilder {
    // The connection info may carry a password: show only our own settings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("deployment", &self.target.kind())
            .field("settings", &self.settings)
            .field("runtime", &self.runtime.is_some())
            .field("custom_tls", &self.tls.is_some())
            .field("credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    fn with_target(target: Target) -> Self {
        RedisStoreBuilder {
            target,
            settings: Settings::default(),
            runtime: None,
            tls: None,
            credentials: None,
        }
    }

    pub(crate) fn new(info: impl IntoConnectionInfo) -> Self {
        Self::with_target(Target::Node(info.into_connection_info()))
    }

    pub(crate) fn cluster<I, T>(nodes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect();
        Self::with_target(Target::Cluster(nodes))
    }

    pub(crate) fn sentinel<I, T>(sentinels: I, service: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        let sentinels = sentinels
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect();
        Self::with_target(Target::Sentinel {
            sentinels,
            service: service.into(),
        })
    }

    /// Prefix of the store's keys and channel. Use one prefix per OAuth client (per
    /// refresh-token family).
    ///
    /// The keys are `{<prefix>}token`, `{<prefix>}lock` and the channel
    /// `{<prefix>}events`: the braces are a Redis Cluster hash tag, so all of them live
    /// in one slot. A prefix that already contains a hash tag (`app:{billing}:`) is used
    /// as it is. (Before hash tags, the keys were `<prefix>token` and `<prefix>lock`:
    /// replicas of both versions do not share a lock, so upgrade a fleet at once, not by
    /// rolling, or give the new version a prefix with the tag around nothing new.)
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

    /// How many replicas must acknowledge the refresh lock before the refresh token is
    /// spent, and the saved token before the lock is released.
    ///
    /// Default: [`ReplicaAck::Required(1)`](ReplicaAck::Required) for
    /// [`RedisStore::sentinel`] and [`RedisStore::cluster`] (deployments that fail over
    /// to replicas), [`ReplicaAck::None`] for [`RedisStore::builder`] (one node). Set
    /// `Required(1)` for a single URL that points at a replicated primary (a managed
    /// service's primary endpoint), and `None` for a cluster without replicas. With
    /// `Required(n)`, keep more than `n` replicas: after a failover the new primary must
    /// still have `n` replicas to acknowledge, or the fleet cannot refresh. A save that
    /// is not acknowledged is sent again (after a failover, to the new primary) until
    /// the lease would lapse or the coordinator's refresh timeout ends the flight: keep
    /// both longer than a failover takes (Sentinel's `down-after-milliseconds` plus the
    /// election). See the crate docs for what the acknowledgement does and does not
    /// guarantee.
    pub fn replica_ack(mut self, ack: ReplicaAck) -> Self {
        self.settings.replica_ack = Some(ack);
        self
    }

    /// How long to wait for the replicas of [`RedisStoreBuilder::replica_ack`]. Default: 1 s.
    pub fn replica_ack_timeout(mut self, timeout: Duration) -> Self {
        self.settings.replica_ack_timeout = timeout;
        self
    }

    /// Trusts this CA (PEM, one or more certificates) for `rediss://` connections
    /// instead of the system's roots: a private CA, as managed Redis services and
    /// self-run TLS deployments use. TLS is rustls; no system OpenSSL is involved.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.get_or_insert_with(no_certificates).root_cert = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) on `rediss://` connections, for
    /// servers that require mutual TLS (`tls-auth-clients yes`).
    pub fn tls_client_cert_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.get_or_insert_with(no_certificates).client_tls = Some(ClientTlsConfig {
            client_cert: cert.into(),
            client_key: key.into(),
        });
        self
    }

    /// Authenticates to the data nodes as this ACL user (`None`: the default user) with
    /// this password, instead of what the URLs say. Handy for Sentinel, where the URLs
    /// are the sentinels'. The password never appears in `Debug` output, errors or logs.
    pub fn credentials(mut self, username: Option<&str>, password: impl Into<Secret>) -> Self {
        self.credentials = Some((username.map(str::to_owned), password.into()));
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
        let mut settings = self.settings;
        let default_ack = match self.target {
            Target::Node(_) => ReplicaAck::None,
            Target::Cluster(_) | Target::Sentinel { .. } => ReplicaAck::Required(1),
        };
        settings.replica_ack = Some(settings.replica_ack.unwrap_or(default_ack));
        if self.tls.is_some() || self.target.uses_tls() {
            install_crypto_provider();
        }
        // Connections need the runtime's context (the connection manager, the cluster
        // connection's task and the listener are spawned on it).
        let _context = runtime.enter();
        let (con, subscriber) = connect(
            self.target,
            self.tls.as_ref(),
            self.credentials.as_ref(),
            &settings,
        )
        .map_err(|e| {
            // The error's text may quote the URL (and with it a password): kind only.
            StoreError::Other(format!("invalid Redis connection info ({:?})", e.kind()).into())
        })?;
        Ok(RedisStore::start(con, subscriber, settings, runtime))
    }

    /// Builds the store and checks that Redis answers (one bounded `PING`), so a wrong
    /// address shows up at start-up as [`StoreError::Unavailable`].
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let store = self.build()?;
        store.ping().await?;
        Ok(store)
    }
}

fn no_certificates() -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: None,
    }
}

/// rustls needs a process-wide crypto provider. An application that uses rustls
/// elsewhere may have installed one (keep it); if it has not, and its dependencies
/// enable more than one provider, rustls cannot pick one itself, so install ring's.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one first: that one is used, fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Applies the credentials to one node's connection info.
fn with_credentials(
    info: ConnectionInfo,
    credentials: Option<&(Option<String>, Secret)>,
) -> ConnectionInfo {
    let Some((username, password)) = credentials else {
        return info;
    };
    let mut redis = info
        .redis_settings()
        .clone()
        .set_password(password.expose());
    if let Some(username) = username {
        redis = redis.set_username(username);
    }
    info.set_redis_settings(redis)
}

fn client_for(info: ConnectionInfo, tls: Option<&TlsCertificates>) -> RedisResult<redis::Client> {
    match (tls, info.addr()) {
        (Some(tls), ConnectionAddr::TcpTls { .. }) => {
            redis::Client::build_with_tls(info, tls.clone())
        }
        _ => redis::Client::open(info),
    }
}

/// Builds the connection (lazy: nothing is contacted here) and the subscriber.
fn connect(
    target: Target,
    tls: Option<&TlsCertificates>,
    credentials: Option<&(Option<String>, Secret)>,
    settings: &Settings,
) -> RedisResult<(Con, Subscriber)> {
    match target {
        Target::Node(info) => {
            let client = client_for(with_credentials(info?, credentials), tls)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.response_timeout()))
                .set_max_delay(settings.connect_timeout);
            let con = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
            Ok((Con::Node(con), Subscriber::Node(Box::new(client))))
        }
        Target::Cluster(nodes) => {
            let nodes: Vec<ConnectionInfo> = nodes?
                .into_iter()
                .map(|info| with_credentials(info, credentials))
                .collect();
            let subscribers = nodes
                .iter()
                .cloned()
                .map(|info| client_for(info, tls))
                .collect::<RedisResult<Vec<_>>>()?;
            let mut builder = ClusterClientBuilder::new(nodes)
                .connection_timeout(settings.connect_timeout)
                .response_timeout(settings.response_timeout());
            if let Some(tls) = tls {
                builder = builder.certs(tls.clone());
            }
            let con = builder
                .build()?
                .get_pending_async_connection_with_config(ClusterConfig::new());
            Ok((Con::Cluster(con), Subscriber::Cluster(subscribers)))
        }
        Target::Sentinel { sentinels, service } => {
            let sentinels = sentinels?;
            // The sentinels' own credentials and TLS come from their URLs; the data
            // nodes use TLS when the sentinels do, and `credentials` for their ACL user.
            let secure = sentinels
                .iter()
                .any(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
            let sentinel_auth = sentinels.first().map(|info| info.redis_settings().clone());
            let mut builder = SentinelClientBuilder::new(
                sentinels.iter().map(|info| info.addr().clone()),
                service,
                SentinelServerType::Master,
            )?;
            if let Some(auth) = sentinel_auth {
                if let Some(username) = auth.username() {
                    builder = builder.set_client_to_sentinel_username(username);
                }
                if let Some(password) = auth.password() {
                    builder = builder.set_client_to_sentinel_password(password);
                }
            }
            if let Some((username, password)) = credentials {
                builder = builder.set_client_to_redis_password(password.expose());
                if let Some(username) = username {
                    builder = builder.set_client_to_redis_username(username);
                }
            }
            if secure {
                builder = builder
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                    .set_client_to_redis_tls_mode(TlsMode::Secure);
                if let Some(tls) = tls {
                    builder = builder
                        .set_client_to_sentinel_certificates(tls.clone())
                        .set_client_to_redis_certificates(tls.clone());
                }
            }
            let client = builder.build()?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.response_timeout()));
            let con = SentinelCon::new(client, config);
            Ok((Con::Sentinel(con.clone()), Subscriber::Sentinel(con)))
        }
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
        assert!(refused(b().replica_ack(ReplicaAck::Required(0))));
        assert!(refused(b().replica_ack_timeout(Duration::ZERO)));
        assert!(refused(b().key_prefix("}x")));
        assert!(refused(b().key_prefix("")));
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
