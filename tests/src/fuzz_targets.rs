//! The bodies of the fuzz targets in `fuzz/`. They live here, not in the fuzz crate, so
//! the stable `cargo test` replays the committed corpus and regression inputs
//! (`tests/tests/all/fuzz_replay.rs`) through exactly the code libFuzzer runs.
//!
//! Every body panics on a contract violation (C13: bad input is a typed error, never a
//! panic or a hang; C1–C6, C9 for `flight_ops`; C1 per key, C4, C12, C22 for
//! `keyed_ops`) and returns quietly otherwise.

use arbitrary::{Arbitrary, Unstructured};

use crate::model::{self, Scenario, keyed::KeyedScenario};

/// Longest operation sequence `flight_ops` runs: longer inputs add time, not coverage.
pub const MAX_FLIGHT_OPS: usize = 256;

/// The names of all targets, as in `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>`.
pub const TARGETS: &[&str] = &["flight_ops", "keyed_ops", "www_authenticate"];

/// Runs target `name` on `data`; `false` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "flight_ops" => flight_ops(data),
        "keyed_ops" => keyed_ops(data),
        "jwt_claims" => jwt_claims(data),
        "store_file" => store_file(data),
        "token_response" => token_response(data),
        "www_authenticate" => www_authenticate(data),
        _ => return false,
    }
    true
}

/// An `Arbitrary` sequence of operations on a `SingleFlight` (start a request, reject a
/// generation, complete / fail / hang the refresh, cancel any caller, move the clock),
/// driven by the model's manual executor, which checks C1–C6 and C9 after every step.
pub fn flight_ops(data: &[u8]) {
    let Ok(mut scenario) = Scenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    scenario.ops.truncate(MAX_FLIGHT_OPS);
    if let Err(violation) = model::run(&scenario) {
        panic!("{violation}\n{scenario:#?}");
    }
}

/// An `Arbitrary` sequence of operations on a keyed policy whose coordinators are
/// evicted while requests are in flight (issue 26), driven by the keyed runner
/// ([`model::keyed`]), which checks C1 per key, C22, C12 per key and C4 after every step.
pub fn keyed_ops(data: &[u8]) {
    let Ok(mut scenario) = KeyedScenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    scenario.ops.truncate(MAX_FLIGHT_OPS);
    if let Err(violation) = model::keyed::run_keyed(&scenario) {
        panic!("{violation}\n{scenario:#?}");
    }
}

/// `WWW-Authenticate` header values: parsed into challenges or a typed error, and the
/// Bearer error agrees with the parse.
pub fn www_authenticate(data: &[u8]) {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = tokenflight::adapter::www_authenticate::parse(header);
    let bearer = tokenflight::adapter::www_authenticate::bearer_error(header);
    assert_eq!(
        parsed.is_ok(),
        bearer.is_ok(),
        "parse and bearer_error disagree on {header:?}"
    );
}

/// OAuth 2.0 token endpoint bodies (RFC 6749 §5.1 success, §5.2 error): a typed result,
/// and a parsed success turns into a token whatever its `expires_in`.
pub fn token_response(data: &[u8]) {
    use tokenflight::oauth2::{ErrorResponse, TokenResponse};
    if let Ok(response) = TokenResponse::parse(data) {
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 40);
        let expires_at = response.expires_at(now);
        let token = response.into_token(now, None);
        assert!(
            !token.access().expose().is_empty(),
            "an empty access token was accepted"
        );
        assert_eq!(token.expiry(), expires_at);
    }
    if let Ok(error) = ErrorResponse::parse(data) {
        assert!(!error.error.is_empty(), "an empty error code was accepted");
        let _ = error.is_permanent();
    }
}

/// JWT time claims from arbitrary strings: a typed result, and `expiry` agrees with
/// `time_claims`.
pub fn jwt_claims(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let claims = tokenflight::oauth2::jwt::time_claims(text);
    assert_eq!(
        tokenflight::oauth2::jwt::expiry(text),
        claims.ok().and_then(|c| c.exp),
        "expiry and time_claims disagree"
    );
}

/// A `FileStore` file with arbitrary contents: loading gives a token or a typed error.
///
/// The decoder is private to the core, so this goes through the public
/// `FileStore::load` on a private file (mode 0600) in a per-process directory; a corrupt
/// file is moved aside by the store and removed here.
#[cfg(unix)]
pub fn store_file(data: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use tokenflight::{store::FileStore, store::StoreError, store::TokenStore};

    let dir = store_dir();
    let path = dir.join("token.json");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(data));
    if written.is_err() {
        return;
    }
    let store = FileStore::new(&path);
    match futures::executor::block_on(store.load()) {
        Ok(Some(token)) => {
            // What was read can be written and read back unchanged.
            futures::executor::block_on(crate::save_locked(&store, &token)).unwrap_or_else(|e| {
                panic!("saving a loaded token failed: {e}");
            });
            // The first save may normalise (the shared record keeps whole
            // milliseconds; a format-1 file may carry nanoseconds): from then on a saved
            // token loads back unchanged.
            let normalised = match futures::executor::block_on(store.load()) {
                Ok(Some(t)) => t,
                other => panic!(
                    "a saved token did not load back: {:?}",
                    other.map(|t| t.is_some())
                ),
            };
            futures::executor::block_on(crate::save_locked(&store, &normalised))
                .unwrap_or_else(|e| panic!("saving a loaded token failed: {e}"));
            let again = futures::executor::block_on(store.load());
            assert!(
                matches!(&again, Ok(Some(t)) if *t == normalised),
                "a saved token did not load back unchanged"
            );
        }
        Ok(None) => panic!("an existing file loaded as missing"),
        Err(StoreError::Corrupt(_) | StoreError::Other(_)) => {}
        Err(other) => {
            // Newer formats are refused with a typed error too.
            let _ = other.to_string();
        }
    }
    clear(dir);
}

/// Without Unix file modes the store refuses nothing by mode; the target is Unix-only.
#[cfg(not(unix))]
pub fn store_file(_data: &[u8]) {}

#[cfg(unix)]
fn store_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir =
            std::env::temp_dir().join(format!("tokenflight-fuzz-store-{}", std::process::id()));
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
        dir
    })
}

#[cfg(unix)]
fn clear(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
