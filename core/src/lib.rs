//! # tokenflight
//!
//! Keeps an HTTP client's access token valid without the caller noticing. Before a
//! request the token is checked for (near) expiry; after a response the policy checks
//! whether the server rejected it. Either way exactly one refresh runs, everybody who
//! needs it waits for that one, and each rejected request is resent exactly once with
//! the new token. If the refresh fails, every waiter gets the error: nobody hangs,
//! nobody loops. What exactly is promised is listed under [Guarantees](#guarantees).
//!
//! This crate is the runtime-agnostic core. Applications use it through an adapter
//! crate (`tokenflight-reqwest`, `tokenflight-surf`, `tokenflight-tower`) and meet:
//!
//! - [`AuthPolicy`], built with an [`AuthPolicyBuilder`] (the adapters' `builder()`):
//!   a coordinator plus where the token goes ([`Placement`]), who may receive it, which
//!   routes go without it, and what counts as a rejection ([`Classifier`]);
//! - [`SingleFlight`], the coordinator (built alone with a [`FlightBuilder`]): one
//!   current [`Token`], at most one refresh in flight;
//! - [`TokenSource`] (or [`from_fn`]) where new tokens come from, and the OAuth 2.0
//!   grants in [`oauth2`];
//! - the errors [`Error`], [`RefreshError`] (severity and [`Cause`]) and
//!   [`ConfigError`];
//! - the per-request markers [`SkipAuth`] and [`ForceRefresh`].
//!
//! The modules hold what other audiences need: [`adapter`] what client adapters
//! implement and call, [`store`] the token store interface and its implementations,
//! [`config`] the timing settings, [`observe`] events and counters, [`keyed`] one
//! coordinator per key (a user, a tenant) for many tokens in one process, and `test_util`
//! (feature `test-util`) a manual clock for deterministic tests. Running it in
//! production — which store, a Redis fleet, metrics and alerts, troubleshooting — is
//! the [`guide`].
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use tokenflight::{RefreshContext, SingleFlight, Token, from_fn};
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let flight = SingleFlight::builder()
//!     .source(from_fn(move |_cx: RefreshContext| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move { Ok(Token::new(format!("token-{n}"))) }
//!     }))
//!     .build()
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
//! ## Features
//!
//! - `futures-timer` (default): a runtime-free default timer, used unless an adapter
//!   supplies its runtime's.
//! - `oauth2` (default): the [`oauth2`] grants (`refresh_token`, `client_credentials`,
//!   token exchange), the JWT reader [`oauth2::jwt`], and [`sources`] (a token file).
//! - `private-key-jwt`: client authentication by signed assertion (`private_key_jwt`,
//!   RFC 7523 §2.2) and the JWT bearer grant (§2.1), with `oauth2::SigningKey`
//!   (RS256, ES256 from PEM; signed with ring, no OpenSSL).
//! - `file-store` (default): [`store::FileStore`], tokens shared by processes on one
//!   machine.
//! - `metrics`: `observe::MetricsObserver`, metrics through the `metrics` facade.
//! - `test-util`: `test_util::ManualClock` and friends, for deterministic tests.
//!
//! ## Guarantees
//!
//! Each guarantee has tests named after it (in `core/tests/all/contracts.rs` unless noted);
//! the docs link here as [C6](crate#c6).
//!
//! - <a id="c1"></a>**C1 One flight.** At most one refresh is in flight:
//!   `c1_one_flight_for_concurrent_expired_callers`, `c1_c2_ten_thousand_callers_one_source_call`.
//! - <a id="c2"></a>**C2 Coalescing.** N concurrent callers on an expired token cause one source call:
//!   `c2_coalescing_waiters_share_one_refresh`, `c1_c2_ten_thousand_callers_one_source_call`.
//! - <a id="c3"></a>**C3 Stale rejections are free.** `c3_stale_rejection_resends_without_refresh`,
//!   `c3_late_rejection_after_refresh_is_stale` (driver).
//! - <a id="c4"></a>**C4 Exactly one retry.** `c4_exactly_one_retry_with_newer_token`,
//!   `c4_second_rejection_is_returned_as_is`, `c4_not_replayable_is_not_resent_but_marked`,
//!   `c4_a_401_from_another_origin_is_not_a_rejection`,
//!   `c4_body_rule_reads_only_bodies_that_say_they_end` (unit); through every adapter,
//!   `c4_a_401_from_an_origin_the_token_never_reached_is_not_a_rejection` and
//!   `c4_a_body_classifier_does_not_hold_back_a_stream` (conformance).
//! - <a id="c5"></a>**C5 Same outcome for all.** `c5_all_waiters_get_the_same_error`.
//! - <a id="c6"></a>**C6 Cancellation safety.** `c6_dropping_the_driver_mid_refresh_does_not_hang_waiters`,
//!   `c6_spawner_finishes_refresh_when_every_caller_left`,
//!   `c6_without_spawner_last_caller_leaving_cancels_and_next_restarts`.
//! - <a id="c7"></a>**C7 Proactive refresh.** `c7_token_within_leeway_is_refreshed_before_sending`,
//!   `c7_leeway_counts_as_expired` (unit).
//! - <a id="c8"></a>**C8 Refresh ahead.** `c8_refresh_ahead_serves_valid_token_while_refreshing`,
//!   `c8_refresh_ahead_without_spawner_is_driven_by_one_caller`.
//! - <a id="c9"></a>**C9 Failures.** `c9_error_never_replaces_a_valid_token`,
//!   `c9_backoff_fails_fast_then_recovers`, `c9_permanent_failure_fires_hook_once_until_login`,
//!   `c9_backoff_grows_and_is_capped` (unit).
//! - <a id="c10"></a>**C10 Bounded.** `c10_refresh_timeout_fails_all_waiters_then_recovers`,
//!   `c10_fast_path_allocates_nothing` (`core/tests/fast_path.rs`),
//!   `c10_a_hanging_store_load_is_bounded_by_the_flight_budget`,
//!   `c10_a_hanging_save_or_unlock_keeps_the_issued_token_within_the_budget` (`all/holes.rs`).
//! - <a id="c11"></a>**C11 Exempt requests.** `c11_skip_auth_sends_no_credentials`, `c11_force_refresh_marker`.
//! - <a id="c12"></a>**C12 Secrets stay secret.** `c12_secrets_never_print` (unit),
//!   `c12_token_goes_only_to_allowed_origins`, `c12_errors_and_debug_never_show_secrets`,
//!   `c12_query_placement_keeps_the_callers_query_byte_for_byte` (unit and conformance),
//!   `c12_a_redacted_url_hides_the_query_token_and_keeps_the_rest` (unit); through every
//!   adapter, `c12_query_token_never_in_errors` and `c12_query_token_never_in_a_referer`
//!   (conformance); through reqwest's redirects,
//!   `c12_a_redirect_never_carries_one_keys_token_to_another_key` and
//!   `c12_a_second_hop_inside_another_origin_never_carries_the_authorization_token`; through
//!   tower-http's `FollowRedirect`, `c12_tower_response_uri_never_shows_the_query_token`;
//!   an `http::Uri`'s origin, compared without the URL parser, is admitted only where its
//!   parsed URL is: `c12_a_uri_is_admitted_only_where_its_parsed_url_is` (unit, a table
//!   and generated hosts), `c12_a_tower_request_carries_the_token_only_to_an_allowed_origin_as_spelled`.
//! - <a id="c13"></a>**C13 Bad input.** `c13_garbage_is_a_typed_error` (unit, WWW-Authenticate); fuzzed in
//!   `fuzz/`.
//! - <a id="c14"></a>**C14 Runtime-agnostic.** `c14_core_has_no_runtime_in_its_dependency_tree`
//!   (`core/tests/all/runtime_free.rs`); the contract tests run under `futures::executor`,
//!   tokio, async-std and smol.
//! - <a id="c15"></a>**C15 Timing fits the lifetime.** `leeway` and `refresh_ahead` are caps scaled to
//!   each token's lifetime (table on [`FlightConfig`](config::FlightConfig)); expiry-driven source calls are at
//!   least `min_refresh_interval` apart (`core/tests/all/holes.rs`):
//!   `c15_a_two_second_token_is_refreshed_once_per_two_thirds_of_its_life`,
//!   `c15_a_token_born_expired_is_used_and_refreshed_at_most_once_per_interval`,
//!   `c15_a_clock_stepped_back_does_not_refresh_per_request`, `c15_documented_timing_table`
//!   (unit); conformance S16.
//! - <a id="c16"></a>**C16 Resilient refresh.** Transient failures retried inside one flight budget;
//!   failures invisible while a usable token exists; backoff on the monotonic clock:
//!   `c16_transient_failures_are_retried_inside_one_flight`,
//!   `c16_permanent_failures_are_never_retried`, `c16_no_caller_fails_while_a_usable_token_exists`,
//!   `c16_refresh_ahead_failures_are_invisible`, `c16_budget_bounds_the_retries`,
//!   `c16_a_huge_retry_after_is_capped_not_ignored`,
//!   `c16_wall_clock_steps_neither_stretch_nor_cancel_backoff`; conformance S17, S18.
//! - <a id="c17"></a>**C17 The login wins.** `c17_install_is_numbered_above_the_store_and_saved_under_its_lock`,
//!   `c17_an_initial_login_wins_over_an_older_session_in_the_store`,
//!   `c17_a_successful_refresh_started_before_a_login_does_not_replace_it` (and its
//!   permanent/transient twins), `c17_auth_lost_notices_a_login_saved_to_the_shared_store`.
//! - <a id="c18"></a>**C18 Containment.** `c18_a_panicking_hook_gives_every_waiter_a_typed_error`,
//!   `c18_a_panicking_store_gives_every_waiter_a_typed_error`,
//!   `c18_a_panicking_timer_or_clock_never_panics_a_caller`.
//! - <a id="c20"></a>**C20 Long enough.** A request that says how long its token must stay
//!   valid ([`ValidFor`], [`SingleFlight::token_valid_for`]) gets a token that does, after
//!   one shared refresh, or the freshest token and an event (`core/tests/all/deadline.rs`):
//!   `c20_fifty_long_requests_share_one_refresh_and_none_expires_on_the_wire`,
//!   `c20_a_deadline_longer_than_the_lifetime_gets_the_freshest_token_and_an_event`,
//!   `c20_through_the_driver_no_request_is_rejected_for_expiry`.
//! - <a id="c21"></a>**C21 In order.** Subscribers to token changes
//!   ([`SingleFlight::subscribe`]) never see an older generation after a newer one; a
//!   slow subscriber skips to the latest (`core/tests/all/subscribe.rs`):
//!   `c21_thousand_subscribers_in_order_or_latest`,
//!   `c21_pending_subscribers_are_woken_in_order`,
//!   `c21_auth_lost_is_an_item_and_a_login_follows`; across processes sharing a
//!   `FileStore`, `c21_subscribers_in_three_processes_see_a_token_adopted_from_another`.
//! - <a id="c22"></a>**C22 One coordinator per key.** A keyed map never evicts a coordinator
//!   in use, and only one unused for `idle_timeout` is idle (`core/tests/all/keyed.rs`,
//!   `keyed_policy.rs`): `c22_a_key_in_constant_use_is_never_evicted_as_idle`,
//!   `c22_eviction_never_leaves_two_coordinators_for_one_key`.
//!
//! Beyond these: model-based property tests over generated interleavings, cancellations
//! and refresh outcomes (`tests/tests/all/properties.rs`: `c1_c2_c5_…`, `c3_c4_…`, `c6_…`,
//! `c5_c9_…`, and for C15–C18, with logins during flights, stale sessions in the store,
//! store calls that fail, hang or panic, panicking hooks, wall-clock steps, huge
//! generations and `Retry-After` values: `c15_c16_…`, `c17_logins_…`, `c17_replicas_…`,
//! `c5_c18_…`, `c9_backoff_…`), regressions they found (`core/tests/all/regressions.rs`), tests written to kill
//! mutants (`core/tests/all/mutants.rs`), the conformance suite S1–S18 and its regression
//! scenarios (`c4_…`, `c12_…`) that every adapter runs against a real loopback server
//! (`tests/src/conformance.rs`), the source scenarios W1–W6 every adapter runs (a rotating
//! token file, token exchange per audience, `private_key_jwt` never replaying a `jti`:
//! `tests/src/sources.rs`), and the fuzz targets in `fuzz/` whose corpus stable
//! `cargo test` replays.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod auth_policy;
mod builder;
pub mod config;
#[cfg(feature = "dpop")]
pub mod dpop;
mod error;
#[cfg(feature = "oauth2")]
mod file_source;
mod flight;
pub mod guide;
#[cfg(feature = "private-key-jwt")]
mod jws;
#[cfg(feature = "oauth2")]
mod jwt;
pub mod keyed;
#[cfg(feature = "oauth2")]
pub mod oauth2;
pub mod observe;
mod policy;
mod seam;
#[cfg(feature = "oauth2")]
pub mod sources {
    //! Token sources for services that hold no client secret: a token read from a file
    //! the platform rotates ([`FileTokenSource`], a Kubernetes projected
    //! service-account token), to use as a bearer token or as the subject of a token
    //! exchange ([`oauth2::TokenExchangeGrant`](crate::oauth2::TokenExchangeGrant)).
    //!
    //! Which grant and client authentication fit which platform is the table in the
    //! [workload identity guide](crate::guide::workload_identity).
    pub use crate::file_source::*;
}
mod request;
mod runtime;
mod source;
mod stats;
pub mod store;
#[cfg(feature = "tokio")]
mod tokio_runtime;
pub mod subscribe {
    //! Token changes as a stream, for connections that stay open (WebSocket, SSE, gRPC
    //! streams, database sessions): [`SingleFlight::subscribe`](crate::SingleFlight::subscribe)
    //! and [`KeyedFlights::subscribe`](crate::keyed::KeyedFlights::subscribe) ([C21](crate#c21)).
    pub use crate::flight::{Subscription, TokenChange};
}
mod token;
#[cfg(feature = "oauth2")]
mod token_response;
mod transport;
mod www_authenticate;

pub use auth_policy::AuthPolicy;
pub use builder::{AuthPolicyBuilder, FlightBuilder};
pub use error::{Cause, ConfigError, Error, RefreshError};
pub use flight::SingleFlight;
pub use policy::{Classifier, Placement};
pub use request::{ForceRefresh, SkipAuth, TokenKey, ValidFor};
pub use source::{RefreshContext, RefreshReason, TokenSource, from_fn};
pub use token::{Secret, Token};

pub mod adapter {
    //! What client adapters implement and call: the request and response traits the
    //! [`AuthPolicy`](crate::AuthPolicy) drives, the runtime pieces ([`Spawn`],
    //! [`Timer`], [`Clock`]), the bare [`Transport`] token sources use, and the plumbing
    //! of [`AuthPolicy::send`](crate::AuthPolicy::send) ([`RequestOptions`],
    //! [`AuthError`]). Applications rarely need it.

    pub use crate::auth_policy::SendFuture;
    pub use crate::error::AuthError;
    pub use crate::request::{
        AuthRequest, AuthResponse, InvalidHeader, RequestOptions, RequestOrigin, ResponseView,
    };
    #[cfg(feature = "futures-timer")]
    pub use crate::runtime::FuturesTimer;
    pub use crate::runtime::{Clock, Spawn, Timer};
    #[cfg(feature = "http-body")]
    pub use crate::seam::collect_response;
    pub use crate::seam::{Markers, SentUrls, sensitive_header};
    #[cfg(feature = "tokio")]
    pub use crate::tokio_runtime::{TokioSpawner, TokioTimer};
    pub use crate::transport::{
        HttpRequest, HttpResponse, Transport, TransportError, TransportFuture,
    };

    /// RFC 6750 `WWW-Authenticate` challenges, as the default [`Classifier`](crate::Classifier)
    /// reads them; for adapters that classify protocol-specific responses themselves.
    pub mod www_authenticate {
        pub use crate::www_authenticate::*;
    }
}

/// Helpers for deterministic tests of code that uses tokenflight (feature `test-util`).
#[cfg(feature = "test-util")]
pub mod test_util {
    pub use crate::runtime::ManualClock;

    /// True when `a` and `b` are clones of the same failure: every waiter of one flight
    /// gets the same error ([C5](crate#c5)).
    pub fn same_failure(a: &crate::RefreshError, b: &crate::RefreshError) -> bool {
        a.same_as(b)
    }
}
