//! The store's builder: where its Redis is, TLS, credentials, settings; and the
//! constructors on [`RedisStore`] that start one.

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
use crate::settings::{ReplicaAck, Settings, invalid_setting};
use crate::store::RedisStore;

impl RedisStore {
    /// A builder for a store at `info` (a `redis://` URL or any
    /// [`IntoConnectionInfo`]); see [`RedisStoreBuilder`] for the settings.
    ///
    /// A `rediss://` URL connects with TLS (rustls); its user and password are an ACL
    /// user's (`rediss://user:password@host:6380/`). Secrets in the URL never appear in
    /// `Debug` output, errors or logs.
    pub fn builder(info: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(info)
    }

    /// A builder for a store in a Redis Cluster reached through any of `nodes` (the
    /// others are discovered). All of the store's keys share one hash tag, so they live
    /// on one shard; pub/sub wake-ups reach every replica through any node. Replica
    /// acknowledgement defaults to one replica ([`RedisStoreBuilder::replica_ack`]).
    pub fn cluster<I, T>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        RedisStoreBuilder::cluster(nodes)
    }

    /// A builder for a store on the primary that the given Redis Sentinels name for
    /// `service`; after a failover the store follows the new primary. The data nodes'
    /// ACL user comes from [`RedisStoreBuilder::credentials`]. Replica acknowledgement
    /// defaults to one replica ([`RedisStoreBuilder::replica_ack`]).
    pub fn sentinel<I, T>(sentinels: I, service: impl Into<String>) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        RedisStoreBuilder::sentinel(sentinels, service)
    }
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
    /// How many of the parsed URLs are `rediss://` and how many are not (a URL that did
    /// not parse counts as neither: its error is reported when connecting).
    fn schemes(&self) -> (usize, usize) {
        let nodes: &[ConnectionInfo] = match self {
            Target::Node(Ok(info)) => std::slice::from_ref(info),
            Target::Cluster(Ok(nodes))
            | Target::Sentinel {
                sentinels: Ok(nodes),
                ..
            } => nodes,
            _ => &[],
        };
        let tls = nodes
            .iter()
            .filter(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }))
            .count();
        (tls, nodes.len() - tls)
    }

    /// Refuses TLS settings that cannot take effect. Certificates only apply to
    /// `rediss://` connections: with a plaintext URL they would be dropped without a
    /// word and the store would talk to Redis in the clear, the opposite of what
    /// whoever configured a CA or a client certificate asked for. A Cluster or a set of
    /// sentinels reached partly with and partly without TLS cannot work either: one TLS
    /// mode applies to all of their connections (and to the nodes found through them).
    fn check_tls(&self, certificates: bool) -> Result<(), StoreError> {
        let (tls, plain) = self.schemes();
        if certificates && plain > 0 {
            return Err(invalid_setting(format!(
                "a CA or client certificate (tls_ca_pem, tls_client_cert_pem) needs \
                 rediss:// URLs, but {plain} of the {} URL(s) are not rediss://: the \
                 connection would not be encrypted",
                self.kind()
            )));
        }
        if tls > 0 && plain > 0 {
            return Err(invalid_setting(format!(
                "{tls} of the {} URLs are rediss:// and {plain} are not: use one scheme \
                 for all of them",
                self.kind()
            )));
        }
        Ok(())
    }

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
    ///
    /// Every URL must then be `rediss://`: with a `redis://` URL the certificate could
    /// not take effect and the connection would be plaintext, so
    /// [`build`](Self::build) refuses it ([`StoreError::Other`] with a
    /// [`ConfigError::InvalidSetting`](tokenflight::ConfigError::InvalidSetting) as its source).
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.get_or_insert_with(no_certificates).root_cert = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) on `rediss://` connections, for
    /// servers that require mutual TLS (`tls-auth-clients yes`). As with
    /// [`tls_ca_pem`](Self::tls_ca_pem), a `redis://` URL is refused at
    /// [`build`](Self::build).
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
    /// service can start while Redis is down. Fails if the URL is invalid, if settings
    /// cannot work together ([`StoreError::Other`] with a [`ConfigError`](tokenflight::ConfigError) as its source:
    /// a lease renewed no faster than it lapses, a certificate with a `redis://` URL,
    /// `rediss://` and `redis://` mixed among a Cluster's nodes or the sentinels), or if
    /// no tokio runtime is available.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        self.settings.validate()?;
        self.target.check_tls(self.tls.is_some())?;
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
    ///
    /// ```no_run
    /// # // Not run here: it needs a Redis server (the crate's tests start one).
    /// # async fn demo() -> Result<(), tokenflight::store::StoreError> {
    /// let store = tokenflight_redis::RedisStore::builder("redis://127.0.0.1:6379")
    ///     .key_prefix("myapp")
    ///     .connect()
    ///     .await?;
    /// # drop(store); Ok(()) }
    /// ```
    ///
    /// # Cancellation
    /// Dropping the future drops the store being built (its connection closes); nothing
    /// was written to Redis.
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
        let refused = |b: RedisStoreBuilder| {
            matches!(b.build(), Err(StoreError::Other(e))
                if e.to_string().contains("invalid RedisStore settings")
                    && matches!(e.downcast_ref(), Some(tokenflight::ConfigError::InvalidSetting(_))))
        };
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
