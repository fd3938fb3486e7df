//! The store's reads and writes of the token: the plain read, and the load and save a
//! lock holder makes, fenced on the lock's value.

use std::sync::Arc;

use tokenflight::{StoreError, Token, record};
use tokio::time::Instant;

use crate::conn::reply;
use crate::inner::Inner;
use crate::io::{bounded, redis_error, unavailable};
use crate::scripts::{LOAD_FENCED, SAVE, SAVE_SOURCE, eval};
use crate::wire::wait;

/// The stored token, read without the lock.
pub(crate) async fn load(inner: Arc<Inner>) -> Result<Option<Token>, StoreError> {
    let mut con = inner.con.clone();
    let raw: Option<Vec<u8>> = bounded(
        inner.settings.command_timeout,
        redis::cmd("GET")
            .arg(&inner.token_key)
            .query_async(&mut con),
    )
    .await?;
    Ok(raw.as_deref().map(record::decode).transpose()?)
}

/// The stored token, read only while the lock still holds `value`.
pub(crate) async fn load_fenced(
    inner: Arc<Inner>,
    value: String,
) -> Result<Option<Token>, StoreError> {
    let mut con = inner.con.clone();
    let reply: Vec<Vec<u8>> = bounded(
        inner.settings.command_timeout,
        LOAD_FENCED
            .key(&inner.token_key)
            .key(&inner.lock_key)
            .arg(&value)
            .invoke_async(&mut con),
    )
    .await?;
    match reply.as_slice() {
        [status, raw] if status == b"ok" => Ok(Some(record::decode(raw)?)),
        [status] if status == b"none" => Ok(None),
        [status] if status == b"lease_lost" => {
            tracing::warn!("refresh lock lease lapsed before the token was read");
            Err(StoreError::LeaseLost)
        }
        _ => Err(StoreError::Other(
            "unexpected reply from the load script".into(),
        )),
    }
}

/// The fenced save under the lock holding `value`; with replica acknowledgement, the
/// save and a `WAIT` travel together, and an unacknowledged save is tried again (it is
/// idempotent) until the lease would lapse, so the token is on the replicas before the
/// lock is released.
pub(crate) async fn save_fenced(
    inner: Arc<Inner>,
    record: Vec<u8>,
    generation: u64,
    value: String,
) -> Result<(), StoreError> {
    let Some(replicas) = inner.replicas() else {
        let mut con = inner.con.clone();
        let outcome: String = bounded(
            inner.settings.command_timeout,
            SAVE.key(&inner.token_key)
                .key(&inner.lock_key)
                .arg(&value)
                .arg(generation)
                .arg(record.as_slice())
                .arg(&inner.channel)
                .invoke_async(&mut con),
        )
        .await?;
        return save_outcome(&outcome, generation);
    };
    // Past the lease the fenced save would be refused anyway.
    let deadline = Instant::now() + inner.settings.lease;
    let mut pause = inner.settings.poll_min;
    loop {
        let error = match save_acknowledged(&inner, &record, generation, &value, replicas).await {
            Ok((outcome, acked)) => {
                if outcome != "ok" || acked >= u64::from(replicas) {
                    return save_outcome(&outcome, generation);
                }
                unavailable(format!(
                    "the saved token was acknowledged by {acked} of {replicas} required \
                     replica(s) within {:?}",
                    inner.settings.replica_ack_timeout
                ))
            }
            Err(StoreError::Unavailable(error)) => StoreError::Unavailable(error),
            Err(other) => return Err(other),
        };
        if Instant::now() + pause >= deadline {
            tracing::warn!(%error, generation, "the saved token may not be on the replicas");
            return Err(error);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(inner.settings.poll_max);
    }
}

/// One fenced save followed by `WAIT` on the same connection: the script's outcome and
/// the number of replicas that acknowledged it.
async fn save_acknowledged(
    inner: &Inner,
    record: &[u8],
    generation: u64,
    value: &str,
    replicas: u32,
) -> Result<(String, u64), StoreError> {
    let mut pipe = redis::pipe();
    // EVAL, not EVALSHA: a NOSCRIPT inside a batch could not fall back.
    let mut save = eval(
        SAVE_SOURCE,
        &[&inner.token_key, &inner.lock_key],
        &[value, &generation.to_string()],
    );
    save.arg(record).arg(&inner.channel);
    pipe.add_command(save);
    pipe.add_command(wait(replicas, inner.settings.replica_ack_timeout));
    let mut con = inner.con.clone();
    let values = bounded(
        inner.settings.command_timeout + inner.settings.replica_ack_timeout,
        con.batch_at(&inner.token_key, pipe),
    )
    .await?;
    let mut values = values.into_iter();
    match (values.next(), values.next()) {
        (Some(outcome), Some(acked)) => {
            let outcome: String = reply(outcome).map_err(redis_error)?;
            let acked: u64 = reply(acked).map_err(redis_error)?;
            Ok((outcome, acked))
        }
        _ => Err(StoreError::Other(
            "unexpected reply to the save and WAIT".into(),
        )),
    }
}

fn save_outcome(outcome: &str, generation: u64) -> Result<(), StoreError> {
    match outcome {
        "ok" => Ok(()),
        "lease_lost" | "newer" => {
            tracing::warn!(
                generation,
                reason = outcome,
                "save refused: the refresh lock lease was lost or a newer token is stored"
            );
            Err(StoreError::LeaseLost)
        }
        _ => Err(StoreError::Other(
            "unexpected reply from the save script".into(),
        )),
    }
}
