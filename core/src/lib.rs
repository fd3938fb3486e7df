//! # tokenflight
//!
//! Keeps an HTTP client's access token valid without the caller noticing. Before a
//! request the token is checked for (near) expiry; after a response the layer checks
//! whether the server rejected it. Either way exactly one refresh runs, everybody who
//! needs it waits for that one, and each rejected request is resent exactly once with
//! the new token. If the refresh fails, every waiter gets the error: nobody hangs,
//! nobody loops.
//!
//! This crate is the runtime-agnostic core: [`SingleFlight`] (the coordinator),
//! [`Authenticator`] (the retry driver), the [`TokenSource`], [`TokenStore`] and
//! [`Transport`] traits. HTTP clients plug in through small adapter crates
//! (`tokenflight-reqwest`, `tokenflight-surf`) that implement [`AuthRequest`] and
//! [`AuthResponse`] for their types and supply their runtime's [`Spawn`] and [`Timer`].
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use tokenflight::{Builder, RefreshContext, Token, from_fn};
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let flight = Builder::new()
//!     .source(from_fn(move |_cx: RefreshContext| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move { Ok(Token::new(format!("token-{n}"))) }
//!     }))
//!     .build_flight()
//!     .unwrap();
//! futures::executor::block_on(async {
//!     let token = flight.token().await.unwrap();
//!     assert_eq!(token.access().expose(), "token-1");
//!     // A valid token is served from memory: no second source call.
//!     flight.token().await.unwrap();
//! });
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! ```
//!
//! ## Contracts
//!
//! Each contract has tests named after it (in `core/tests/contracts.rs` unless noted).
//!
//! - **C1 One flight.** At most one refresh is in flight:
//!   `c1_one_flight_for_concurrent_expired_callers`, `c1_c2_ten_thousand_callers_one_source_call`.
//! - **C2 Coalescing.** N concurrent callers on an expired token cause one source call:
//!   `c2_coalescing_waiters_share_one_refresh`, `c1_c2_ten_thousand_callers_one_source_call`.
//! - **C3 Stale rejections are free.** `c3_stale_rejection_resends_without_refresh`,
//!   `c3_late_rejection_after_refresh_is_stale` (driver).
//! - **C4 Exactly one retry.** `c4_exactly_one_retry_with_newer_token`,
//!   `c4_second_rejection_is_returned_as_is`, `c4_not_replayable_is_not_resent_but_marked`,
//!   `c4_a_401_from_another_origin_is_not_a_rejection`,
//!   `c4_body_rule_reads_only_bodies_that_say_they_end` (unit); through every adapter,
//!   `c4_a_401_from_an_origin_the_token_never_reached_is_not_a_rejection` and
//!   `c4_a_body_classifier_does_not_hold_back_a_stream` (conformance).
//! - **C5 Same outcome for all.** `c5_all_waiters_get_the_same_error`.
//! - **C6 Cancellation safety.** `c6_dropping_the_driver_mid_refresh_does_not_hang_waiters`,
//!   `c6_spawner_finishes_refresh_when_every_caller_left`,
//!   `c6_without_spawner_last_caller_leaving_cancels_and_next_restarts`.
//! - **C7 Proactive refresh.** `c7_token_within_leeway_is_refreshed_before_sending`,
//!   `c7_leeway_counts_as_expired` (unit).
//! - **C8 Refresh ahead.** `c8_refresh_ahead_serves_valid_token_while_refreshing`,
//!   `c8_refresh_ahead_without_spawner_is_driven_by_one_caller`.
//! - **C9 Failures.** `c9_error_never_replaces_a_valid_token`,
//!   `c9_backoff_fails_fast_then_recovers`, `c9_permanent_failure_fires_hook_once_until_login`,
//!   `c9_backoff_grows_and_is_capped` (unit).
//! - **C10 Bounded.** `c10_refresh_timeout_fails_all_waiters_then_recovers`,
//!   `c10_fast_path_allocates_nothing` (`core/tests/fast_path.rs`),
//!   `c10_a_hanging_store_load_is_bounded_by_the_flight_budget`,
//!   `c10_a_hanging_save_or_unlock_keeps_the_issued_token_within_the_budget` (`holes.rs`).
//! - **C11 Exempt requests.** `c11_skip_auth_sends_no_credentials`, `c11_force_refresh_marker`.
//! - **C12 Secrets stay secret.** `c12_secrets_never_print` (unit),
//!   `c12_token_goes_only_to_allowed_origins`, `c12_errors_and_debug_never_show_secrets`,
//!   `c12_query_placement_keeps_the_callers_query_byte_for_byte` (unit and conformance),
//!   `c12_a_redacted_url_hides_the_query_token_and_keeps_the_rest` (unit); through every
//!   adapter, `c12_query_token_never_in_errors` and `c12_query_token_never_in_a_referer`
//!   (conformance).
//! - **C13 Bad input.** `c13_garbage_is_a_typed_error` (unit, WWW-Authenticate); fuzzed in
//!   `fuzz/`.
//! - **C14 Runtime-agnostic.** `c14_core_has_no_runtime_in_its_dependency_tree`
//!   (`core/tests/runtime_free.rs`); the contract tests run under `futures::executor`,
//!   tokio, async-std and smol.
//! - **C15 Timing fits the lifetime.** `leeway` and `refresh_ahead` are caps scaled to
//!   each token's lifetime (table on [`FlightConfig`]); expiry-driven source calls are at
//!   least `min_refresh_interval` apart (`core/tests/holes.rs`):
//!   `c15_a_two_second_token_is_refreshed_once_per_two_thirds_of_its_life`,
//!   `c15_a_token_born_expired_is_used_and_refreshed_at_most_once_per_interval`,
//!   `c15_a_clock_stepped_back_does_not_refresh_per_request`, `c15_documented_timing_table`
//!   (unit); conformance S16.
//! - **C16 Resilient refresh.** Transient failures retried inside one flight budget;
//!   failures invisible while a usable token exists; backoff on the monotonic clock:
//!   `c16_transient_failures_are_retried_inside_one_flight`,
//!   `c16_permanent_failures_are_never_retried`, `c16_no_caller_fails_while_a_usable_token_exists`,
//!   `c16_refresh_ahead_failures_are_invisible`, `c16_budget_bounds_the_retries`,
//!   `c16_a_huge_retry_after_is_capped_not_ignored`,
//!   `c16_wall_clock_steps_neither_stretch_nor_cancel_backoff`; conformance S17, S18.
//! - **C17 The login wins.** `c17_install_is_numbered_above_the_store_and_saved_under_its_lock`,
//!   `c17_an_initial_login_wins_over_an_older_session_in_the_store`,
//!   `c17_a_successful_refresh_started_before_a_login_does_not_replace_it` (and its
//!   permanent/transient twins), `c17_auth_lost_notices_a_login_saved_to_the_shared_store`.
//! - **C18 Containment.** `c18_a_panicking_hook_gives_every_waiter_a_typed_error`,
//!   `c18_a_panicking_store_gives_every_waiter_a_typed_error`,
//!   `c18_a_panicking_timer_or_clock_never_panics_a_caller`.
//!
//! Beyond these: model-based property tests over generated interleavings, cancellations
//! and refresh outcomes (`tests/tests/properties.rs`: `c1_c2_c5_…`, `c3_c4_…`, `c6_…`,
//! `c5_c9_…`, and for C15–C18, with logins during flights, stale sessions in the store,
//! store calls that fail, hang or panic, panicking hooks, wall-clock steps, huge
//! generations and `Retry-After` values: `c15_c16_…`, `c17_logins_…`, `c17_replicas_…`,
//! `c5_c18_…`, `c9_backoff_…`), regressions they found (`core/tests/regressions.rs`), tests written to kill
//! mutants (`core/tests/mutants.rs`), the conformance suite S1–S18 and its regression
//! scenarios (`c4_…`, `c12_…`) that every adapter runs against a real loopback server
//! (`tests/src/conformance.rs`), and the fuzz targets in `fuzz/` whose corpus stable
//! `cargo test` replays.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

#[cfg(feature = "file-store")]
mod atomic_file;
mod builder;
mod config;
mod driver;
mod error;
#[cfg(feature = "file-store")]
mod file_lock;
#[cfg(feature = "file-store")]
mod file_store;
mod flight;
#[cfg(feature = "oauth2")]
pub mod jwt;
mod keyed;
#[cfg(feature = "oauth2")]
pub mod oauth2;
pub mod observe;
mod policy;
#[cfg(feature = "store-record")]
pub mod record;
mod request;
mod runtime;
mod source;
mod stats;
mod store;
mod token;
#[cfg(feature = "oauth2")]
mod token_response;
mod transport;
pub mod www_authenticate;

pub use builder::Builder;
pub use config::{Backoff, FlightConfig, Retry};
pub use driver::{AuthError, Authenticator};
pub use error::{BoxError, ConfigError, Error, RefreshError, RefreshErrorKind};
#[cfg(feature = "file-store")]
pub use file_store::FileStore;
pub use flight::{AuthLostHook, MAX_GENERATION, SingleFlight};
pub use keyed::{FlightFactory, KeyedFlights, KeyedFlightsBuilder, key_namespace};
pub use observe::Observer;
pub use policy::{AllowedOrigins, BodyPredicate, Classifier, HeadPredicate, Placement};
pub use request::{
    AuthRequest, AuthResponse, ForceRefresh, InvalidHeader, RequestOptions, ResponseView, SkipAuth,
};
#[cfg(feature = "futures-timer")]
pub use runtime::FuturesTimer;
pub use runtime::{Clock, ManualClock, NoTimer, Spawn, SystemClock, Timer};
pub use source::{FnSource, RefreshContext, RefreshReason, TokenSource, from_fn};
pub use stats::Stats;
pub use store::{MemoryStore, StoreError, StoreGuard, StoreWatcher, TokenStore};
pub use token::{Secret, Token};
pub use transport::{HttpRequest, HttpResponse, Transport, TransportError};
