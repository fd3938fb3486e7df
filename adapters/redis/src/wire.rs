//! The token as it is kept in Redis: versioned JSON. This struct is the only place that
//! serialises secrets, and it has no `Debug`, so they cannot end up in a log line.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokenflight::{Token, store::StoreError, store::WithGeneration};

/// The format version written today. A reader refuses versions it does not know rather
/// than guess at their fields.
const FORMAT_VERSION: u32 = 1;

/// The stored record. `generation` is read by the save script (to refuse overwriting a
/// newer token), so its name and numeric type are part of the format.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    v: u32,
    generation: u64,
    access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh: Option<String>,
    /// Milliseconds since the Unix epoch; absent for "valid until rejected".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    /// Milliseconds since the Unix epoch when the token was obtained: with the expiry it
    /// gives the lifetime the refresh timing scales to ([C15](tokenflight#c15)). Optional and additive:
    /// records written before it existed still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    obtained_at_ms: Option<u64>,
}

/// Encodes `token` for storage.
pub(crate) fn encode(token: &Token) -> Result<String, StoreError> {
    let record = StoredToken {
        v: FORMAT_VERSION,
        generation: token.generation(),
        access: token.access().expose().to_owned(),
        refresh: token.refresh().map(|r| r.expose().to_owned()),
        // A time before 1970 is long past; 0 keeps it so.
        expires_at_ms: token.expiry().map(unix_millis),
        obtained_at_ms: token.obtained().map(unix_millis),
    };
    serde_json::to_string(&record)
        .map_err(|_| StoreError::Other("the token could not be encoded as JSON".into()))
}

/// Decodes a stored value. Errors name the position, never the content (it may hold
/// secrets).
pub(crate) fn decode(raw: &str) -> Result<Token, StoreError> {
    let record: StoredToken = serde_json::from_str(raw).map_err(|e| {
        StoreError::Corrupt(format!(
            "invalid token record ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if record.v != FORMAT_VERSION {
        return Err(StoreError::Corrupt(format!(
            "unsupported token record version {}",
            record.v
        )));
    }
    let mut token = Token::new(record.access)
        .with_refresh_opt(record.refresh.map(Into::into))
        .with_generation(record.generation);
    // Out of range for SystemTime: treat as long past rather than fail.
    let at = |ms: u64| {
        UNIX_EPOCH
            .checked_add(Duration::from_millis(ms))
            .unwrap_or(UNIX_EPOCH)
    };
    if let Some(ms) = record.expires_at_ms {
        token = token.expires_at(at(ms));
    }
    if let Some(ms) = record.obtained_at_ms {
        token = token.obtained_at(at(ms));
    }
    Ok(token)
}

fn unix_millis(at: std::time::SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whole milliseconds of `d`, at least 1 (Redis refuses a zero expiry).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn round_trip_keeps_every_field() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let token = Token::new("acc")
            .with_refresh("ref")
            .expires_at(at)
            .obtained_at(at - Duration::from_secs(60))
            .with_generation(42);
        let back = decode(&encode(&token).unwrap()).unwrap();
        assert_eq!(back, token);
        let bare = Token::new("only").with_generation(1);
        assert_eq!(decode(&encode(&bare).unwrap()).unwrap(), bare);
    }

    #[test]
    fn c13_garbage_is_corrupt_and_never_echoes_the_value() {
        for raw in [
            "",
            "not json",
            "{\"v\":1}",
            "{\"v\":2,\"generation\":1,\"access\":\"secret-XYZ\"}",
            "{\"v\":1,\"generation\":\"secret-XYZ\",\"access\":\"a\"}",
            "{\"v\":1,\"generation\":-1,\"access\":\"secret-XYZ\"}",
            "[1,2,3]",
        ] {
            match decode(raw) {
                Err(StoreError::Corrupt(msg)) => assert!(!msg.contains("XYZ"), "{msg}"),
                other => panic!("{raw:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn c15_records_written_before_obtained_at_existed_still_load() {
        let old = "{\"v\":1,\"generation\":5,\"access\":\"a\",\"expires_at_ms\":1700000000000}";
        let token = decode(old).unwrap();
        assert_eq!(token.generation(), 5);
        assert_eq!(token.obtained(), None);
        assert_eq!(
            token.expiry(),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn huge_expiry_decodes_without_panicking() {
        let raw = format!(
            "{{\"v\":1,\"generation\":3,\"access\":\"a\",\"expires_at_ms\":{}}}",
            u64::MAX
        );
        let token = decode(&raw).unwrap();
        assert_eq!(token.generation(), 3);
        assert!(token.expiry().is_some_and(|at| at > SystemTime::now()));
    }
}
