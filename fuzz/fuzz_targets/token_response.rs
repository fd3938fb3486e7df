//! Fuzz target `token_response`; the body is `tokenflight_tests::fuzz_targets::token_response`, so the stable
//! test suite replays this target's corpus (`tests/tests/all/fuzz_replay.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenflight_tests::fuzz_targets::token_response(data);
});
