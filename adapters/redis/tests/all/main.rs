//! The Redis store's integration tests, in one binary (one link, one build of the test
//! harness): a module per area. Tests that run worker processes re-run this binary with
//! the worker's full test name (`<module>::<worker>`, `--exact --ignored`).

mod common;

mod async_std_runtime;
mod cluster;
mod fault;
mod fleet;
#[cfg(unix)]
mod keyed_processes;
mod lease;
mod namespaces;
mod push;
mod sentinel;
mod store;
mod tls;
