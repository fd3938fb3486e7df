//! The stored-token record: one versioned format for every store that keeps a token as
//! bytes ([`FileStore`](crate::store::FileStore), `tokenflight-redis`'s `RedisStore`, a store
//! of your own).
//!
//! A record is compact JSON:
//!
//! ```json
//! {"format":2,"generation":7,"access":"…","refresh":"…","expires_at_ms":1700000000000,"obtained_at_ms":1699996400000}
//! ```
//!
//! - `format` is the version. A reader refuses a newer version ([`DecodeError::Newer`])
//!   rather than guess at its fields, so a store can leave such a record untouched.
//! - `generation` is a top-level integer: stores may read it where they cannot decode
//!   the rest (a Redis script refusing to overwrite a newer token does).
//! - Times are whole milliseconds since the Unix epoch: `expires_at_ms` is absent for
//!   "valid until rejected"; `obtained_at_ms` (when the token was obtained, which with
//!   the expiry gives the lifetime the refresh timing scales to, [C15](crate#c15)) may be absent.
//!   A time before 1970 is stored as 0 (long past either way).
//!
//! Records written before this format still load: `FileStore`'s format 1
//! (`{"format":1,"token":{…,"expires_at":{"secs":…,"nanos":…}}}`) and `RedisStore`'s
//! version 1 (`{"v":1,…,"expires_at_ms":…}`). They are rewritten in this format at the
//! next save.
//!
//! Secrets: the record types have no `Debug`, and decode errors say what kind of
//! problem was found and where, never what was there.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::token::{Secret, Token};

/// The format version [`encode`] writes and the newest [`decode`] reads.
pub const FORMAT: u32 = 2;

/// Why bytes could not be decoded as a record. Never quotes the bytes (they may hold
/// secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// A record of a newer format than this library knows: leave it untouched (a newer
    /// version of the program wrote it).
    Newer(u32),
    /// Not a record, or a damaged one; says what kind of problem and where.
    Corrupt(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Newer(version) => write!(
                f,
                "token record format {version} is newer than this library's ({FORMAT})"
            ),
            DecodeError::Corrupt(reason) => write!(f, "invalid token record: {reason}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for StoreError {
    fn from(error: DecodeError) -> Self {
        StoreError::Corrupt(error.to_string())
    }
}

/// Encodes `token` as a record of the current [`FORMAT`].
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tokenflight::Token;
/// use tokenflight::store::record;
/// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
/// let token = Token::new("access").with_refresh("refresh").expires_at(at).with_generation(3);
/// let bytes = record::encode(&token).unwrap();
/// let back = record::decode(&bytes).unwrap();
/// assert_eq!(back.access().expose(), "access");
/// assert_eq!(back.refresh().map(|r| r.expose()), Some("refresh"));
/// assert_eq!((back.expiry(), back.generation()), (Some(at), 3));
/// ```
pub fn encode(token: &Token) -> Result<Vec<u8>, StoreError> {
    let record = Record {
        format: FORMAT,
        generation: token.generation(),
        access: token.access().expose(),
        refresh: token.refresh().map(Secret::expose),
        expires_at_ms: token.expiry().map(unix_millis),
        obtained_at_ms: token.obtained().map(unix_millis),
    };
    serde_json::to_vec(&record).map_err(|e| {
        StoreError::Other(format!("encoding the token record failed: {}", describe(&e)).into())
    })
}

/// Decodes a record of any format this library has written.
///
/// ```
/// use tokenflight::Token;
/// use tokenflight::store::record;
/// let bytes = record::encode(&Token::new("a").with_generation(1)).unwrap();
/// assert_eq!(record::decode(&bytes).unwrap().generation(), 1);
/// assert!(record::decode(b"not json").is_err());
/// ```
pub fn decode(bytes: &[u8]) -> Result<Token, DecodeError> {
    let version: Version = serde_json::from_slice(bytes).map_err(corrupt)?;
    match (version.format, version.v) {
        (Some(FORMAT), _) => {
            let record: Owned = serde_json::from_slice(bytes).map_err(corrupt)?;
            token_from(
                record.access,
                record.refresh,
                record.generation,
                record.expires_at_ms.map(from_millis).transpose()?,
                record.obtained_at_ms.map(from_millis).transpose()?,
            )
        }
        (Some(1), _) => {
            let record: FileV1 = serde_json::from_slice(bytes).map_err(corrupt)?;
            let stored = record.token;
            token_from(
                stored.access,
                stored.refresh,
                stored.generation,
                stored
                    .expires_at
                    .map(|t| t.system_time("expires_at"))
                    .transpose()?,
                stored
                    .obtained_at
                    .map(|t| t.system_time("obtained_at"))
                    .transpose()?,
            )
        }
        (Some(newer), _) if newer > FORMAT => Err(DecodeError::Newer(newer)),
        (Some(other), _) => Err(DecodeError::Corrupt(format!(
            "unknown format version {other}"
        ))),
        (None, Some(1)) => {
            // RedisStore's first records: the fields of today's format, another
            // version field.
            let record: Owned = serde_json::from_slice(bytes).map_err(corrupt)?;
            token_from(
                record.access,
                record.refresh,
                record.generation,
                record.expires_at_ms.map(from_millis).transpose()?,
                record.obtained_at_ms.map(from_millis).transpose()?,
            )
        }
        (None, Some(other)) => Err(DecodeError::Corrupt(format!(
            "unknown record version {other}"
        ))),
        (None, None) => Err(DecodeError::Corrupt("no format version".into())),
    }
}

fn token_from(
    access: String,
    refresh: Option<String>,
    generation: u64,
    expires_at: Option<SystemTime>,
    obtained_at: Option<SystemTime>,
) -> Result<Token, DecodeError> {
    let mut token = Token::new(Secret::from(access))
        .set_refresh(refresh.map(Secret::from))
        .with_generation(generation);
    if let Some(at) = expires_at {
        token = token.expires_at(at);
    }
    if let Some(at) = obtained_at {
        token = token.obtained_at(at);
    }
    Ok(token)
}

/// The version fields alone (the rest is ignored at this step).
#[derive(Deserialize)]
struct Version {
    #[serde(default)]
    format: Option<u32>,
    #[serde(default)]
    v: Option<u32>,
}

/// Today's record, as written (borrowing the secrets: no copy of them is made).
#[derive(Serialize)]
struct Record<'a> {
    format: u32,
    generation: u64,
    access: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    obtained_at_ms: Option<u64>,
}

/// Today's record (and RedisStore's version 1, which has the same fields), as read.
#[derive(Deserialize)]
struct Owned {
    generation: u64,
    access: String,
    #[serde(default)]
    refresh: Option<String>,
    #[serde(default)]
    expires_at_ms: Option<u64>,
    #[serde(default)]
    obtained_at_ms: Option<u64>,
}

/// FileStore's format 1.
#[derive(Deserialize)]
struct FileV1 {
    token: FileV1Token,
}

#[derive(Deserialize)]
struct FileV1Token {
    access: String,
    #[serde(default)]
    refresh: Option<String>,
    #[serde(default)]
    expires_at: Option<UnixTime>,
    #[serde(default)]
    obtained_at: Option<UnixTime>,
    generation: u64,
}

#[derive(Deserialize)]
struct UnixTime {
    secs: u64,
    nanos: u32,
}

impl UnixTime {
    fn system_time(&self, field: &str) -> Result<SystemTime, DecodeError> {
        if self.nanos >= 1_000_000_000 {
            return Err(DecodeError::Corrupt(format!("{field}.nanos out of range")));
        }
        UNIX_EPOCH
            .checked_add(Duration::new(self.secs, self.nanos))
            .ok_or_else(|| DecodeError::Corrupt(format!("{field} out of range")))
    }
}

fn from_millis(ms: u64) -> Result<SystemTime, DecodeError> {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(|| DecodeError::Corrupt("a time is out of range".into()))
}

fn unix_millis(at: SystemTime) -> u64 {
    // Before 1970 is long past: 0 keeps it so.
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn corrupt(error: serde_json::Error) -> DecodeError {
    DecodeError::Corrupt(describe(&error))
}

/// serde_json's messages can quote the offending value (a secret, here): only say what
/// kind of problem it was and where.
fn describe(error: &serde_json::Error) -> String {
    let what = match error.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected JSON structure",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn token() -> Token {
        Token::new("access-SECRET")
            .with_refresh("refresh-SECRET")
            .expires_at(at_ms(1_700_000_000_123))
            .obtained_at(at_ms(1_699_999_000_005))
            .with_generation(7)
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let bytes = encode(&token()).unwrap();
        assert_eq!(decode(&bytes).unwrap(), token());
        let bare = Token::new("only").with_generation(1);
        assert_eq!(decode(&encode(&bare).unwrap()).unwrap(), bare);
    }

    #[test]
    fn the_format_is_pinned() {
        let text = String::from_utf8(encode(&token()).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"format":2,"generation":7,"access":"access-SECRET","refresh":"refresh-SECRET","expires_at_ms":1700000000123,"obtained_at_ms":1699999000005}"#
        );
    }

    #[test]
    fn file_store_format_1_records_still_load() {
        // Byte for byte what FileStore wrote (pretty JSON, secs + nanos).
        let old = br#"{
  "format": 1,
  "token": {
    "access": "a",
    "refresh": "r",
    "expires_at": {
      "secs": 1700000000,
      "nanos": 123
    },
    "obtained_at": {
      "secs": 1699999000,
      "nanos": 5
    },
    "generation": 3
  }
}
"#;
        let token = decode(old).unwrap();
        assert_eq!(token.access().expose(), "a");
        assert_eq!(token.refresh().map(Secret::expose), Some("r"));
        assert_eq!(token.generation(), 3);
        assert_eq!(
            token.expiry(),
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123))
        );
        assert_eq!(
            token.obtained(),
            Some(UNIX_EPOCH + Duration::new(1_699_999_000, 5))
        );
    }

    #[test]
    fn c15_file_store_records_written_before_obtained_at_existed_still_load() {
        let old = br#"{
  "format": 1,
  "token": {
    "access": "a",
    "expires_at": { "secs": 1700000000, "nanos": 0 },
    "generation": 3
  }
}
"#;
        let token = decode(old).unwrap();
        assert_eq!(token.generation(), 3);
        assert_eq!(token.obtained(), None);
        assert_eq!(token.refresh(), None);
        assert_eq!(
            token.expiry(),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn redis_store_version_1_records_still_load() {
        // Byte for byte what RedisStore wrote.
        let old = br#"{"v":1,"generation":42,"access":"acc","refresh":"ref","expires_at_ms":1700000000123,"obtained_at_ms":1699999940123}"#;
        let token = decode(old).unwrap();
        assert_eq!(token.access().expose(), "acc");
        assert_eq!(token.refresh().map(Secret::expose), Some("ref"));
        assert_eq!(token.generation(), 42);
        assert_eq!(token.expiry(), Some(at_ms(1_700_000_000_123)));
        assert_eq!(token.obtained(), Some(at_ms(1_699_999_940_123)));
        // Before obtained_at existed (C15):
        let older = br#"{"v":1,"generation":5,"access":"a","expires_at_ms":1700000000000}"#;
        let token = decode(older).unwrap();
        assert_eq!(token.generation(), 5);
        assert_eq!(token.obtained(), None);
        assert_eq!(token.expiry(), Some(at_ms(1_700_000_000_000)));
    }

    #[test]
    fn versions() {
        assert_eq!(
            decode(br#"{"format":3,"token":null}"#),
            Err(DecodeError::Newer(3))
        );
        for corrupt in [
            &br#"{"format":0}"#[..],
            br#"{"v":2,"generation":1,"access":"a"}"#,
            br#"{"generation":1,"access":"a"}"#,
            b"",
            b"[1,2,3]",
            br#"{"format":1,"token":{"access":"a","generation":1,"expires_at":{"secs":1,"nanos":1000000000}}}"#,
        ] {
            assert!(
                matches!(decode(corrupt), Err(DecodeError::Corrupt(_))),
                "{}",
                String::from_utf8_lossy(corrupt)
            );
        }
    }

    #[test]
    fn c12_decode_errors_never_quote_the_record() {
        for raw in [
            &br#"{"format":1,"token":{"access":"ok","refresh":"ok","generation":"refresh-SECRET"}}"#[..],
            br#"{"format":2,"generation":"secret-XYZ","access":"a"}"#,
            br#"{"format":2,"generation":-1,"access":"secret-XYZ"}"#,
            br#"{"v":1,"access":"secret-XYZ""#,
            br#"{"v":9,"generation":1,"access":"secret-XYZ"}"#,
            br#"{"format":"secret-XYZ"}"#,
        ] {
            let Err(error) = decode(raw) else {
                panic!("{} decoded", String::from_utf8_lossy(raw));
            };
            let shown = format!("{error} {error:?} {}", StoreError::from(error.clone()));
            assert!(!shown.contains("SECRET"), "{shown}");
            assert!(!shown.contains("XYZ"), "{shown}");
        }
    }

    #[test]
    fn times_at_the_edges() {
        let token = Token::new("a").expires_at(UNIX_EPOCH - Duration::from_secs(5));
        let decoded = decode(&encode(&token).unwrap()).unwrap();
        assert_eq!(decoded.expiry(), Some(UNIX_EPOCH));
        let huge = format!(
            r#"{{"format":2,"generation":3,"access":"a","expires_at_ms":{}}}"#,
            u64::MAX
        );
        // Far in the future is representable on the platforms we test; either way no panic.
        if let Ok(token) = decode(huge.as_bytes()) {
            assert!(token.expiry().is_some_and(|at| at > SystemTime::now()));
        }
    }

    proptest::proptest! {
        #[test]
        fn c13_decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn c13_decode_never_panics_on_near_misses(
            format in 0u32..4,
            generation in proptest::prelude::any::<i128>(),
            secs in proptest::prelude::any::<i128>(),
            nanos in proptest::prelude::any::<i64>(),
        ) {
            let file = format!(r#"{{"format":{format},"token":{{"access":"a","generation":{generation},"expires_at":{{"secs":{secs},"nanos":{nanos}}}}}}}"#);
            let _ = decode(file.as_bytes());
            let flat = format!(r#"{{"format":{format},"generation":{generation},"access":"a","expires_at_ms":{secs}}}"#);
            let _ = decode(flat.as_bytes());
        }
    }
}
