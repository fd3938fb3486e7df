//! The integration tests of `tests`, in one binary (one link instead of one per
//! file); a module per former file.

mod conformance_catches_faults;
mod file_source_properties;
mod file_store_processes;
mod fuzz_replay;
mod keyed_processes;
mod oauth2_grants;
mod properties;
mod testkit;
