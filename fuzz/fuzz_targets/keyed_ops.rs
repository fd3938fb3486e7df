//! Fuzz target `keyed_ops`; the body is `tokenflight_tests::fuzz_targets::keyed_ops`, so the stable
//! test suite replays this target's corpus (`tests/tests/all/fuzz_replay.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenflight_tests::fuzz_targets::keyed_ops(data);
});
