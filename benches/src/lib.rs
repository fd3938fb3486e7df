//! Shared code of tokenflight's benchmarks: the storm harness with its contenders
//! (tokenflight, the bare-`Shared` floor and six peers), a poll-once helper for the fast path, and the
//! hand-off of figures criterion cannot record (source calls, bytes per waiter,
//! allocations per call) to `bench-report`, which prints the table of `BENCHMARKS.md`.
//!
//! Run everything with `cargo bench -p tokenflight-benches` and then
//! `cargo run --release -p tokenflight-benches --bin bench-report`.

pub mod extras;
pub mod peers;
pub mod poll;
pub mod storm;
