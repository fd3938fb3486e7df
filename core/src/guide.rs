//! The user's guide: choosing a store, operating a Redis fleet, metrics and spans with
//! the alerts worth having, and troubleshooting.
//!
//! These pages hold no code; they are here so they are versioned with the crate and
//! rendered on docs.rs next to the API they describe (rustdoc checks their links).
//! The metric names, labels and span fields they list are checked against the ones the
//! code records by the crate's tests (`tests/all/metrics.rs` with `metrics-util`'s
//! `DebuggingRecorder`, `tests/spans.rs` with a capturing subscriber; the tables are
//! read by `tests/all/guide_tables.rs`), so the pages cannot drift from the code.
//!
//! - [Choosing a store](stores): memory, file, Redis node, Cluster, Sentinel.
//! - [Operating a Redis fleet](redis): keys and their TTLs, the ACL it needs, failover.
//! - [Metrics, spans and alerts](observability).
//! - [Troubleshooting](troubleshooting): refresh storms, logged-out users, clock skew,
//!   "why did my request wait".
//! - [Workload identity](workload_identity): which grant and client authentication
//!   fit Kubernetes, GKE and Google service accounts, Azure, AWS, Okta and Keycloak.
//! - [Secrets in memory](secrets): what is wiped when a token is dropped, and what is not.

#[doc = include_str!("../guide/stores.md")]
pub mod stores {}

#[doc = include_str!("../guide/redis.md")]
pub mod redis {}

#[doc = include_str!("../guide/observability.md")]
pub mod observability {}

#[doc = include_str!("../guide/troubleshooting.md")]
pub mod troubleshooting {}

#[doc = include_str!("../guide/secrets.md")]
pub mod secrets {}

#[doc = include_str!("../guide/workload_identity.md")]
pub mod workload_identity {}
