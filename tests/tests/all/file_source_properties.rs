//! Property tests of the file token source's failure modes: generated sequences of what
//! a platform does to the file (rotate it by rename with a valid, expired or malformed
//! token, remove it, leave it) and of refreshes at advancing times, checked against a
//! model of what each refresh must give — and of how many reads it may cost.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use proptest::prelude::*;
use tokenflight::sources::{FileSourceError, FileTokenSource};

#[derive(Clone, Debug)]
enum FileOp {
    /// A new JWT, renamed in, expiring `exp_in` seconds after the current time (≤ 0:
    /// already expired).
    Rotate { exp_in: i64 },
    /// Malformed contents renamed in (`kind` picks which).
    RotateMalformed { kind: u8 },
    /// The file removed (a rename dance's gap, or a platform not done yet).
    Remove,
    /// A refresh `advance` seconds later.
    Fetch { advance: u64 },
}

fn op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        3 => (-3i64..20).prop_map(|exp_in| FileOp::Rotate { exp_in }),
        1 => (0u8..4).prop_map(|kind| FileOp::RotateMalformed { kind }),
        2 => Just(FileOp::Remove),
        5 => (0u64..6).prop_map(|advance| FileOp::Fetch { advance }),
    ]
}

const MALFORMED: [&str; 4] = ["", "two words", "\u{1}ctl", "e30.eyJleHAiOiJzb29uIn0.sig"];

fn jwt(n: u64, exp: u64) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig{n}",
        b64.encode(r#"{"alg":"ES256"}"#),
        b64.encode(format!(r#"{{"exp":{exp},"n":{n}}}"#))
    )
}

fn put(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// What the file holds in the model.
#[derive(Clone, Debug, PartialEq)]
enum Held {
    Absent,
    Token { value: String, exp: u64 },
    Malformed,
}

fn kind(error: &tokenflight::RefreshError) -> FileSourceError {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<FileSourceError>())
        .cloned()
        .expect("a file source error carries its FileSourceError")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every refresh gives the file's token if it is valid; a file missing while the
    /// token read last is still valid gives that token again; otherwise the typed,
    /// transient error of what the file is (missing, malformed, expired). The file is
    /// read once per version a refresh sees, never for an unchanged one, and no error
    /// shows a token.
    #[test]
    fn file_missing_malformed_or_rotated_between_refreshes_matches_the_model(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = FileTokenSource::new(&path);
        let mut now = 1_000_000u64;
        let mut held = Held::Absent;
        // The model's last version read (changed by every rotation) and what it held.
        let (mut version, mut read_version) = (0u64, None::<u64>);
        let mut last_read = Held::Absent;
        let mut reads = 0u64;
        for (n, op) in ops.iter().enumerate() {
            match op {
                FileOp::Rotate { exp_in } => {
                    let exp = now.saturating_add_signed(*exp_in);
                    let value = jwt(n as u64, exp);
                    put(&path, &value);
                    held = Held::Token { value, exp };
                    version += 1;
                }
                FileOp::RotateMalformed { kind } => {
                    put(&path, MALFORMED[usize::from(*kind)]);
                    held = Held::Malformed;
                    version += 1;
                }
                FileOp::Remove => {
                    if held != Held::Absent {
                        std::fs::remove_file(&path).unwrap();
                    }
                    held = Held::Absent;
                }
                FileOp::Fetch { advance } => {
                    now += advance;
                    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
                    let result = source.current(at);
                    if held != Held::Absent && read_version != Some(version) {
                        reads += 1;
                        read_version = Some(version);
                        last_read = held.clone();
                    }
                    let seen = if held == Held::Absent { &last_read } else { &held };
                    match (seen, &result) {
                        (Held::Token { value, exp }, Ok(token)) if *exp > now => {
                            prop_assert_eq!(token.access().expose(), value.as_str());
                            prop_assert_eq!(token.expiry(), Some(SystemTime::UNIX_EPOCH + Duration::from_secs(*exp)));
                        }
                        (Held::Token { exp, .. }, Err(error)) if *exp <= now => {
                            prop_assert_eq!(kind(error), FileSourceError::Expired);
                        }
                        (Held::Malformed, Err(error)) if held == Held::Malformed => {
                            prop_assert!(matches!(kind(error), FileSourceError::Malformed(_)), "{error}");
                        }
                        (_, Err(error)) if held == Held::Absent => {
                            prop_assert_eq!(kind(error), FileSourceError::Missing);
                        }
                        (seen, result) => {
                            prop_assert!(false, "model {seen:?} (file {held:?}), got {result:?}");
                        }
                    }
                    if let Err(error) = &result {
                        prop_assert!(error.is_retryable(), "{error}");
                        prop_assert!(!error.to_string().contains("sig"), "{error}");
                    }
                    prop_assert_eq!(source.reads(), reads, "reads after {:?}", op);
                }
            }
        }
    }
}
