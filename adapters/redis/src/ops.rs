//! The store's reads and writes of the token: the plain read, and the load and save a
//! lock holder makes, fenced on the lock's value.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokenflight::store::record::{self, DecodeError};
use tokenflight::{Token, store::StoreError};
use tokio::time::Instant;

use crate::conn::reply;
use crate::counts::bump;
use crate::inner::Inner;
use crate::io::{bounded, redis_error, unavailable};
use crate::scripts::{LOAD_FENCED, MOVE_ASIDE, SAVE, SAVE_SOURCE, eval};
use crate::wire::{millis, wait};

/// The stored token, read without the lock.
pub(crate) async fn load(inner: Arc<Inner>) -> Result<Option<Token>, StoreError> {
    bump(&inner.hub.counts.loads);
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

/// How long a value moved out of the token key stays in Redis: long enough to notice
/// the warning and look at it, bounded so a writer that keeps damaging the key cannot
/// fill the server.
const CORRUPT_KEPT_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often the holder reads again when the value changed between its read and its
/// move (only a writer that ignores the lock can do that).
const MOVE_ASIDE_TRIES: usize = 3;

/// What the fenced load found under the token key.
enum Found {
    Nothing,
    /// A string value: a record, or something undecodable.
    Value(Vec<u8>),
    /// A value of another Redis type: never a record.
    Foreign,
}

/// The stored token, read only while the lock still holds `value`.
///
/// An undecodable value (not a record of a newer format) counts as no token: the lock
/// holder is the one that will write the key next, and a value nobody can read would
/// otherwise fail every refresh and every login for good. It is not overwritten
/// blindly but moved aside first, as `FileStore` renames a corrupt file: renamed to a
/// side key `<token key>.corrupt-<unix ms>-<random>` that expires after
/// [`CORRUPT_KEPT_FOR`], so whatever was there can still be inspected and nothing is
/// lost to the save that follows. A record of a newer format stays where it is (a newer
/// release wrote it) and remains [`StoreError::Corrupt`].
pub(crate) async fn load_fenced(
    inner: Arc<Inner>,
    value: String,
) -> Result<Option<Token>, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let (kind, raw, reason) = match read_fenced(&inner, &value).await? {
            Found::Nothing => return Ok(None),
            Found::Value(raw) => match record::decode(&raw) {
                Ok(token) => return Ok(Some(token)),
                Err(newer @ DecodeError::Newer(_)) => return Err(newer.into()),
                Err(DecodeError::Corrupt(reason)) => ("string", raw, reason),
                Err(other) => return Err(other.into()),
            },
            Found::Foreign => (
                "foreign",
                Vec::new(),
                "the key holds a value of another Redis type".to_owned(),
            ),
        };
        let aside = format!(
            "{}.corrupt-{}-{:08x}",
            inner.token_key,
            unix_millis(),
            fastrand::u32(..)
        );
        let mut con = inner.con.clone();
        let moved: String = bounded(
            inner.settings.command_timeout,
            MOVE_ASIDE
                .key(&inner.token_key)
                .key(&inner.lock_key)
                .key(&aside)
                .arg(&value)
                .arg(kind)
                .arg(raw.as_slice())
                .arg(millis(CORRUPT_KEPT_FOR))
                .invoke_async(&mut con),
        )
        .await?;
        match moved.as_str() {
            "moved" => {
                tracing::warn!(
                    kept = %aside,
                    %reason,
                    "corrupt token record moved aside; the next save replaces it"
                );
                return Ok(None);
            }
            "changed" if tries < MOVE_ASIDE_TRIES => {}
            "changed" => {
                return Err(StoreError::Corrupt(format!(
                    "{reason}; it kept changing while it was being moved aside"
                )));
            }
            "lease_lost" => {
                tracing::warn!("refresh lock lease lapsed before a corrupt record was moved aside");
                return Err(StoreError::LeaseLost);
            }
            _ => {
                return Err(StoreError::Other(
                    "unexpected reply from the move-aside script".into(),
                ));
            }
        }
    }
}

/// One fenced read of the token key.
async fn read_fenced(inner: &Inner, value: &str) -> Result<Found, StoreError> {
    bump(&inner.hub.counts.fenced_loads);
    let mut con = inner.con.clone();
    let reply: Vec<Vec<u8>> = bounded(
        inner.settings.command_timeout,
        LOAD_FENCED
            .key(&inner.token_key)
            .key(&inner.lock_key)
            .arg(value)
            .invoke_async(&mut con),
    )
    .await?;
    match reply.as_slice() {
        [status, raw] if status == b"ok" => Ok(Found::Value(raw.clone())),
        [status] if status == b"none" => Ok(Found::Nothing),
        [status] if status == b"foreign" => Ok(Found::Foreign),
        [status] if status == b"lease_lost" => {
            tracing::warn!("refresh lock lease lapsed before the token was read");
            Err(StoreError::LeaseLost)
        }
        _ => Err(StoreError::Other(
            "unexpected reply from the load script".into(),
        )),
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it): names a side key.
fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
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
        bump(&inner.hub.counts.fenced_saves);
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
    bump(&inner.hub.counts.fenced_saves);
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
