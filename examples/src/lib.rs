//! Shared code of tokenflight's examples: the `storm` demo's scenario, the clients it
//! drives (tokenflight under reqwest or surf, and the naive client it is compared with)
//! and its summary. The programs themselves are in `examples/examples/`.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod api;
pub mod exec;
pub mod naive;
pub mod report;
pub mod storm;
pub mod timeline;

// The README's code blocks compile (and the runnable ones run) as doc tests here, where
// the core and the reqwest and tower adapters are dependencies.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
