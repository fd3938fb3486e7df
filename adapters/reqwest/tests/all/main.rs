//! The integration tests of `adapters/reqwest`, in one binary (one link instead of one per
//! file); a module per former file.

mod common;

mod body;
mod cancellation;
mod conformance;
mod example;
mod options;
mod redirects;
mod storm;
mod transport;
