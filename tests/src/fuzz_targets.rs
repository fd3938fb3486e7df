//! The bodies of the fuzz targets in `fuzz/`. They live here, not in the fuzz crate, so
//! the stable `cargo test` replays the committed corpus and regression inputs
//! (`tests/tests/fuzz_replay.rs`) through exactly the code libFuzzer runs.
//!
//! Every body panics on a contract violation (C13: bad input is a typed error, never a
//! panic or a hang; C1–C6, C9 for `flight_ops`) and returns quietly otherwise.

use arbitrary::{Arbitrary, Unstructured};

use crate::model::{self, Scenario};

/// Longest operation sequence `flight_ops` runs: longer inputs add time, not coverage.
pub const MAX_FLIGHT_OPS: usize = 256;

/// The names of all targets, as in `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>`.
pub const TARGETS: &[&str] = &["flight_ops", "www_authenticate"];

/// Runs target `name` on `data`; `false` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "flight_ops" => flight_ops(data),
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

/// `WWW-Authenticate` header values: parsed into challenges or a typed error, and the
/// Bearer error agrees with the parse.
pub fn www_authenticate(data: &[u8]) {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = tokenflight::www_authenticate::parse(header);
    let bearer = tokenflight::www_authenticate::bearer_error(header);
    assert_eq!(
        parsed.is_ok(),
        bearer.is_ok(),
        "parse and bearer_error disagree on {header:?}"
    );
}
