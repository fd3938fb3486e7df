//! Test support for tokenflight: the testkit server (a real loopback auth + API server),
//! the conformance suite every adapter runs, and shared property-test machinery.

pub mod conformance;
pub mod fuzz_targets;
pub mod model;
