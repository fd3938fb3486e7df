//! The core's integration tests, in one binary (one link instead of one per file).
//! `fast_path` stays a binary of its own (it installs a counting global allocator and
//! runs without the test harness), and so does `spans`: tracing caches per call site
//! whether anyone listens, process-wide, so its capture subscribers would race the
//! other tests' threads.
//!
//! Modules: `contracts` (C1–C18, one test or more per guarantee), `holes` (C10, C15–C17
//! edge cases), `regressions`, `mutants` (tests written to kill mutants), `observe`
//! and `metrics` (issue 16), `keyed` and `keyed_policy` (issue 17), `push` (issue 20), `file_store`, `oauth2_sources`,
//! `storm`, `subscribe` (C21, token changes), `deadline` (C20), `runtime_free` (C14), `future_size` (issue 18), `guide_tables` (the guide's
//! metric and span tables, compared with the code by `metrics` and `spans`).

mod support;

mod builder_order;
mod coarse_clock;
mod contracts;
mod deadline;
#[cfg(feature = "dpop")]
mod dpop;
mod file_store;
mod future_size;
mod guide_tables;
mod holes;
mod keyed;
mod keyed_policy;
mod metrics;
mod mutants;
mod oauth2_sources;
mod observe;
mod origin_url;
mod push;
mod regressions;
mod runtime_free;
mod storm;
mod subscribe;
