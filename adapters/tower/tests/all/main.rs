//! The integration tests of `adapters/tower`, in one binary (one link instead of one per
//! file); a module per former file.

mod cancellation;
mod conformance;
mod dependencies;
mod grpc;
mod redirects;
mod service;
mod transport;
