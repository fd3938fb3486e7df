//! Test support for tokenflight: the testkit server (a real loopback auth + API server),
//! the conformance suite every adapter runs, and shared property-test machinery.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod conformance;
pub mod fuzz_targets;
pub mod grpc;
pub mod model;
pub mod testkit;
pub mod transport;
