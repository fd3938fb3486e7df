//! The store's connection to its deployment — one node, a Redis Cluster, or the primary
//! that Sentinel names — and the pub/sub subscription for each.
//!
//! All three reconnect on their own: the single node through the `redis` crate's
//! connection manager, the cluster through its cluster connection (which follows slot
//! moves), and Sentinel through [`SentinelCon`], which asks the sentinels for the
//! current primary again whenever its connection breaks or turns read-only (the node it
//! used was demoted by a failover).
//!
//! Every command the store sends may safely run twice: reads, the idempotent acquire
//! script, compare-and-pexpire, compare-and-delete, a save of the record already stored,
//! `WAIT`. That is what lets [`SentinelCon`] resend a request once after the connection
//! broke under it (Sentinel kills client connections when it promotes a replica), and
//! what makes the cluster connection's own retries safe.

use std::sync::{Arc, Mutex, PoisonError};

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, Value,
};

/// A connection to wherever the store's keys live.
#[derive(Clone)]
pub(crate) enum Con {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelCon),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::Node(con) => con.req_packed_command(cmd),
            Con::Cluster(con) => con.req_packed_command(cmd),
            Con::Sentinel(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::Node(con) => con.req_packed_commands(cmd, offset, count),
            Con::Cluster(con) => con.req_packed_commands(cmd, offset, count),
            Con::Sentinel(con) => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Node(con) => con.get_db(),
            Con::Cluster(con) => con.get_db(),
            Con::Sentinel(con) => con.get_db(),
        }
    }
}

impl Con {
    /// Sends `pipe` as one batch on one connection to the primary that owns `key`, and
    /// returns one reply per command (a command's error stays in its slot).
    ///
    /// One connection matters for `WAIT` at the end of a batch: it counts the replicas
    /// that acknowledged this connection's writes, so the writes must travel with it.
    pub(crate) async fn batch_at(&mut self, key: &str, pipe: Pipeline) -> RedisResult<Vec<Value>> {
        match self {
            Con::Cluster(con) => {
                let count = pipe.len();
                let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    key.as_bytes(),
                    SlotAddr::Master,
                ));
                con.route_pipeline(pipe, 0, count, route).await
            }
            Con::Node(_) | Con::Sentinel(_) => {
                let count = pipe.len();
                self.req_packed_commands(&pipe, 0, count).await
            }
        }
    }
}

/// One reply of a batch, converted; a server error in that slot becomes the error.
pub(crate) fn reply<T: FromRedisValue>(value: Value) -> RedisResult<T> {
    match value {
        Value::ServerError(error) => Err(error.into()),
        other => redis::from_redis_value(other).map_err(RedisError::from),
    }
}

/// A connection to the primary that Sentinel names, found again after a failover.
#[derive(Clone)]
pub(crate) struct SentinelCon {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    /// Asking the sentinels is serialised: after a failover every caller would ask at once.
    client: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
}

impl SentinelCon {
    pub(crate) fn new(client: SentinelClient, config: AsyncConnectionConfig) -> Self {
        SentinelCon {
            shared: Arc::new(SentinelShared {
                client: tokio::sync::Mutex::new(client),
                current: Mutex::new(None),
                config,
            }),
        }
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(con) = self.current() {
            return Ok(con);
        }
        let mut client = self.shared.client.lock().await;
        // Someone else may have connected while this caller waited for the client.
        if let Some(con) = self.current() {
            return Ok(con);
        }
        let con = client
            .get_async_connection_with_config(&self.shared.config)
            .await?;
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(con.clone());
        Ok(con)
    }

    /// Forgets the connection after an error that says the primary is gone or is no
    /// longer the primary; the next command asks the sentinels again. Says whether the
    /// request is worth sending once more (see the module docs on why that is safe).
    fn check<T>(&self, result: &RedisResult<T>, replies: &[Value]) -> bool {
        let demoted = replies.iter().any(
            |v| matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::ReadOnly)),
        );
        let lost = result.as_ref().err().is_some_and(primary_lost);
        if demoted || lost {
            self.forget_now();
        }
        // A demoted node did not run the write; a dropped connection may or may not have.
        demoted
            || result
                .as_ref()
                .err()
                .is_some_and(RedisError::is_connection_dropped)
    }

    /// A client for the current primary (for the pub/sub subscription).
    pub(crate) async fn primary_client(&self) -> RedisResult<redis::Client> {
        self.shared.client.lock().await.async_get_client().await
    }
}

/// Errors after which the connection in hand cannot reach the primary any more.
fn primary_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
        )
}

impl ConnectionLike for SentinelCon {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut con = self.connection().await.map_err(|e| self.forget(e))?;
            let result = con.req_packed_command(cmd).await;
            let replies = result.as_ref().map_or(&[][..], std::slice::from_ref);
            if !self.check(&result, replies) {
                return result;
            }
            let mut con = self.connection().await.map_err(|e| self.forget(e))?;
            let result = con.req_packed_command(cmd).await;
            let replies = result.as_ref().map_or(&[][..], std::slice::from_ref);
            self.check(&result, replies);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut con = self.connection().await.map_err(|e| self.forget(e))?;
            let result = con.req_packed_commands(cmd, offset, count).await;
            if !self.check(&result, result.as_deref().unwrap_or_default()) {
                return result;
            }
            let mut con = self.connection().await.map_err(|e| self.forget(e))?;
            let result = con.req_packed_commands(cmd, offset, count).await;
            self.check(&result, result.as_deref().unwrap_or_default());
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current().map_or(0, |con| con.get_db())
    }
}

impl SentinelCon {
    fn forget(&self, error: RedisError) -> RedisError {
        self.forget_now();
        error
    }

    fn forget_now(&self) {
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Where the pub/sub listener subscribes.
#[derive(Clone)]
pub(crate) enum Subscriber {
    /// The one node.
    Node(Box<redis::Client>),
    /// Any node of the cluster: classic pub/sub messages reach every node, so one
    /// subscription hears the whole cluster. Tried in turn when one is down.
    Cluster(Vec<redis::Client>),
    /// The current primary, asked from the sentinels at each (re)subscription.
    Sentinel(SentinelCon),
}

impl Subscriber {
    /// A pub/sub connection; `attempt` rotates through a cluster's nodes.
    pub(crate) async fn pubsub(&self, attempt: usize) -> RedisResult<PubSub> {
        match self {
            Subscriber::Node(client) => client.get_async_pubsub().await,
            Subscriber::Cluster(nodes) => match nodes.get(attempt % nodes.len().max(1)) {
                Some(client) => client.get_async_pubsub().await,
                None => Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "no cluster nodes to subscribe to",
                ))),
            },
            Subscriber::Sentinel(con) => con.primary_client().await?.get_async_pubsub().await,
        }
    }
}
