//! Fuzz target `jwt_claims`; the body is `tokenflight_tests::fuzz_targets::jwt_claims`, so the stable
//! test suite replays this target's corpus (`tests/tests/all/fuzz_replay.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenflight_tests::fuzz_targets::jwt_claims(data);
});
