//! The integration tests of `adapters/surf`, in one binary (one link instead of one per
//! file); a module per former file.

mod common;

mod conformance;
mod layer;
mod no_tokio;
mod redirects;
