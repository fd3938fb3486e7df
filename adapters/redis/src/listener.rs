//! The pub/sub listener: one subscription connection per store, shared by all its
//! namespaces ([`crate::RedisStore::namespace`]). Messages are dispatched by channel to
//! their namespace ([`Registry::dispatch`]), where they bump a counter that the
//! namespace's lock waiters watch, so they retry as soon as the holder saves or
//! releases — and push saved tokens to the coordinators watching that namespace (issue
//! 20, [`tokenflight::store::StoreWatcher`]).
//!
//! Pub/sub is only a hint: waiters also poll with backoff, and coordinators still read
//! the store at their own refresh-ahead, so a dropped subscription or a lost message
//! costs latency, never correctness. The listener reconnects with backoff and ends when
//! the last view of the store is dropped.
//!
//! # One `SUBSCRIBE` per namespace, not a pattern
//!
//! A namespace's channel is subscribed when it gets its first watcher or lock waiter,
//! and unsubscribed when its last view is dropped. A pattern (`PSUBSCRIBE` over every
//! namespace of the prefix) would need no bookkeeping, but every replica would then
//! receive — and parse — the messages of every namespace in the fleet, including the
//! thousands of users it never serves; with a subscription per namespace each replica
//! hears only about the namespaces it holds. Redis matches a channel subscription with
//! one hash lookup, and the subscriptions ride on the one pub/sub connection (each
//! `SUBSCRIBE` names one channel, so every reply pairs with its request; a batch of
//! them is pipelined). After a reconnect every wanted channel is subscribed again, and
//! each namespace then gets one catch-up read (if watched) and one wake-up of its lock
//! waiters.
//!
//! What a namespace does with a message — wake its lock waiters, push announced tokens
//! to its watchers — is in `namespace.rs` and `events.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use crate::conn::Subscriber;
use crate::namespace::{Namespace, Registry};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Channels (un)subscribed per pipelined batch, each batch bounded by the connect
/// timeout: thousands of namespaces resubscribe after a reconnect in a few batches.
const BATCH: usize = 512;

/// Keeps one pub/sub connection and on it a subscription per namespace that wants one
/// (`changed` names a channel whose wish may have changed: the registry says what is
/// wanted now); dispatches every message to its namespace. Ends when every sender of
/// `changed` is gone: the store's last view was dropped.
pub(crate) async fn listen(
    subscriber: Subscriber,
    registry: Arc<Registry>,
    mut changed: mpsc::UnboundedReceiver<String>,
    timeout: Duration,
) {
    let mut retry = RETRY_MIN;
    let mut attempt = 0usize;
    loop {
        match connect(&subscriber, attempt, timeout).await {
            Ok((sink, mut messages)) => {
                let mut subscribed = HashSet::new();
                // A new connection has no subscriptions: every wanted channel.
                let mut pending = registry.wanted_channels();
                loop {
                    while let Ok(channel) = changed.try_recv() {
                        pending.push(channel);
                    }
                    if !pending.is_empty() {
                        let channels = std::mem::take(&mut pending);
                        match reconcile(&sink, &registry, &mut subscribed, channels, timeout).await
                        {
                            Ok(()) => retry = RETRY_MIN,
                            Err(error) => {
                                tracing::debug!(%error, "token store subscription failed");
                                break;
                            }
                        }
                    }
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => registry.dispatch(&message),
                            None => break,
                        },
                        channel = changed.recv() => match channel {
                            Some(channel) => pending.push(channel),
                            None => return,
                        },
                    }
                }
                tracing::debug!("token store subscription lost; resubscribing");
            }
            Err(error) => tracing::debug!(%error, "token store subscription failed"),
        }
        // The next cluster node, if this one is down.
        attempt = attempt.wrapping_add(1);
        let pause = tokio::time::sleep(retry);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                // What changed meanwhile is read from the registry after reconnecting.
                channel = changed.recv() => if channel.is_none() { return },
            }
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

async fn connect(
    subscriber: &Subscriber,
    attempt: usize,
    timeout: Duration,
) -> Result<(PubSubSink, PubSubStream), String> {
    match tokio::time::timeout(timeout, subscriber.pubsub(attempt)).await {
        Ok(Ok(pubsub)) => Ok(pubsub.split()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Brings the subscriptions of `channels` in line with what the registry wants now:
/// subscribes the wanted ones not yet subscribed (then each gets its catch-up) and
/// unsubscribes the others. An error means the connection is broken.
async fn reconcile(
    sink: &PubSubSink,
    registry: &Registry,
    subscribed: &mut HashSet<String>,
    mut channels: Vec<String>,
    timeout: Duration,
) -> Result<(), String> {
    channels.sort_unstable();
    channels.dedup();
    let mut subscribe: Vec<(String, Arc<Namespace>)> = Vec::new();
    let mut unsubscribe = Vec::new();
    for channel in channels {
        match (registry.wanted(&channel), subscribed.contains(&channel)) {
            (Some(namespace), false) => subscribe.push((channel, namespace)),
            (None, true) => unsubscribe.push(channel),
            _ => {}
        }
    }
    for batch in subscribe.chunks(BATCH) {
        let names = batch.iter().map(|(channel, _)| channel.as_str());
        each(sink, names, timeout, |mut sink, channel| async move {
            sink.subscribe(channel).await
        })
        .await?;
        for (channel, namespace) in batch {
            subscribed.insert(channel.clone());
            namespace.subscribed();
        }
    }
    for batch in unsubscribe.chunks(BATCH) {
        let names = batch.iter().map(String::as_str);
        each(sink, names, timeout, |mut sink, channel| async move {
            sink.unsubscribe(channel).await
        })
        .await?;
        for channel in batch {
            subscribed.remove(channel);
        }
    }
    Ok(())
}

/// Sends one command per channel, pipelined on the one connection (one channel per
/// command: `(UN)SUBSCRIBE a b` answers once per channel, and the `redis` crate pairs
/// one answer with each request), and waits for all of them within `timeout`.
async fn each<'a, F, Fut>(
    sink: &PubSubSink,
    channels: impl Iterator<Item = &'a str>,
    timeout: Duration,
    command: F,
) -> Result<(), String>
where
    F: Fn(PubSubSink, &'a str) -> Fut,
    Fut: Future<Output = redis::RedisResult<()>>,
{
    let sent = join_all(channels.map(|channel| command(sink.clone(), channel)));
    match tokio::time::timeout(timeout, sent).await {
        Ok(results) => results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(drop)
            .map_err(|error| error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
