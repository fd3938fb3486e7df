//! The pub/sub listener: turns messages on the store's channel into a counter that
//! replicas waiting for the lock watch, so they retry as soon as the holder saves or
//! releases.
//!
//! Pub/sub is only a hint: waiters also poll with backoff, so a dropped subscription or
//! a lost message costs latency, never correctness. The listener reconnects with
//! backoff and ends when the last clone of the store is dropped.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokio::sync::watch;

use crate::conn::Subscriber;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps a subscription to `channel` and bumps `tx` on every message (and on every
/// resubscription, since messages may have been missed while it was down).
pub(crate) async fn listen(
    subscriber: Subscriber,
    channel: String,
    tx: watch::Sender<u64>,
    connect_timeout: Duration,
) {
    let bump = |n: &mut u64| *n = n.wrapping_add(1);
    let mut retry = RETRY_MIN;
    let mut attempt = 0usize;
    loop {
        match subscribe(&subscriber, attempt, &channel, connect_timeout).await {
            Ok(mut messages) => {
                retry = RETRY_MIN;
                tx.send_modify(bump);
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(_) => tx.send_modify(bump),
                            None => break,
                        },
                        () = tx.closed() => return,
                    }
                }
                tracing::debug!("token store subscription lost; resubscribing");
            }
            Err(error) => tracing::debug!(%error, "token store subscription failed"),
        }
        // The next cluster node, if this one is down.
        attempt = attempt.wrapping_add(1);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = tx.closed() => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

async fn subscribe(
    subscriber: &Subscriber,
    attempt: usize,
    channel: &str,
    timeout: Duration,
) -> Result<PubSubStream, String> {
    let connect = async {
        let mut pubsub = subscriber.pubsub(attempt).await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
