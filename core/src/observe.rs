//! Observers: what the coordinator does, as events.
//!
//! Register any number with [`FlightBuilder::observer`](crate::FlightBuilder::observer). Every method has a no-op
//! default, so an observer implements only what it needs. Events carry generations,
//! reasons, error kinds, counts and durations — never a token or a secret ([C12](crate#c12)).
//!
//! An observer runs inline, on the thread that caused the event: keep it quick. One that
//! panics is contained; the coordinator goes on ([C18](crate#c18)). The coordinator's fast path (a
//! valid token in memory, [`crate::SingleFlight::token`]) raises no event. The
//! adapters' shared driver reports each authenticated request once
//! ([`Observer::request_authorized`]: a fast-path hit or a wait), behind a single
//! "any observer registered?" branch: with none, it does no extra work.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Cause, RefreshError};
use crate::source::RefreshReason;

#[cfg(feature = "metrics")]
mod metrics_observer;
#[cfg(feature = "metrics")]
pub use metrics_observer::MetricsObserver;

pub use crate::stats::Stats;

/// A refresh flight started.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RefreshStarted {
    /// Why (`None` for a reload from the store while re-authentication is required).
    pub reason: Option<RefreshReason>,
    /// The generation the flight replaces, if any.
    pub replaces: Option<u64>,
    /// The flight's number in this coordinator.
    pub flight: u64,
}

/// One attempt of a flight failed and will be retried inside the flight.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AttemptFailed<'a> {
    /// The failed attempt (1 = the first).
    pub attempt: u32,
    /// Why it failed.
    pub error: &'a RefreshError,
    /// The wait before the next attempt.
    pub next_delay: Duration,
}

/// How a flight ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A token was fetched from the source.
    Success,
    /// A token was taken from the store (another process refreshed, or a login saved
    /// elsewhere) or was already newer in memory.
    Adopted,
    /// Failed with a transient error.
    Transient,
    /// Failed with a permanent error (re-authentication required).
    Permanent,
    /// Ran out of its budget.
    Timeout,
    /// The token store failed.
    Store,
    /// A pluggable part panicked.
    Panicked,
    /// A login arrived meanwhile and won ([C17](crate#c17)).
    Superseded,
}

impl Outcome {
    /// A stable, lower-case name (used as a metric label).
    ///
    /// ```
    /// use tokenflight::observe::Outcome;
    /// assert_eq!(Outcome::Success.as_str(), "success");
    /// assert_eq!(Outcome::Superseded.as_str(), "superseded");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Adopted => "adopted",
            Outcome::Transient => "transient",
            Outcome::Permanent => "permanent",
            Outcome::Timeout => "timeout",
            Outcome::Store => "store",
            Outcome::Panicked => "panicked",
            Outcome::Superseded => "superseded",
        }
    }

    pub(crate) fn of_error(error: &RefreshError) -> Self {
        match error.cause() {
            Cause::Timeout => Outcome::Timeout,
            Cause::Store => Outcome::Store,
            Cause::Panicked => Outcome::Panicked,
            _ if error.is_permanent() => Outcome::Permanent,
            _ => Outcome::Transient,
        }
    }
}

/// A refresh flight ended.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RefreshFinished {
    /// The flight's number.
    pub flight: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// From start to end, on the monotonic clock.
    pub duration: Duration,
    /// Source attempts made (0 when the token was adopted without calling the source).
    pub attempts: u32,
    /// The generation of the token it produced, if it produced one.
    pub generation: Option<u64>,
}

/// A caller joined the flight in progress instead of starting one ([C1](crate#c1)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FlightJoined {
    /// The flight's number.
    pub flight: u64,
    /// Why the caller needed a token.
    pub reason: RefreshReason,
}

/// Whether a rejected request was resent with a token that already existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResendKind {
    /// The rejection concerned an older token; a newer one existed ([C3](crate#c3), no refresh).
    Stale,
    /// The request waited for a refresh that replaced the rejected token.
    Fresh,
}

impl ResendKind {
    /// A stable, lower-case name (used as a metric label).
    ///
    /// ```
    /// use tokenflight::observe::ResendKind;
    /// assert_eq!(ResendKind::Stale.as_str(), "stale");
    /// assert_eq!(ResendKind::Fresh.as_str(), "fresh");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ResendKind::Stale => "stale",
            ResendKind::Fresh => "fresh",
        }
    }
}

/// A request rejected by a server was resent once with a newer token ([C4](crate#c4)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RequestResent {
    /// Stale or fresh.
    pub kind: ResendKind,
    /// The generation the server rejected.
    pub rejected: u64,
    /// The generation the request was resent with.
    pub with: u64,
}

/// A request got its token and is about to be sent (reported by the adapters' shared
/// driver, [`AuthPolicy::send`](crate::AuthPolicy::send), once per request that carries a token).
///
/// `waited == false` is a fast-path hit: the token in memory was valid and the request
/// went on at once. `waited == true`: the request waited for a refresh (or a forced
/// one), or got a token another caller's refresh had just produced.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RequestAuthorized {
    /// The generation of the token the request carries.
    pub generation: u64,
    /// Whether the request had to wait for a token (false: a fast-path hit).
    pub waited: bool,
}

/// Re-authentication became necessary ([C9](crate#c9)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AuthLost<'a> {
    /// The permanent failure that caused it.
    pub error: &'a RefreshError,
}

/// A request asked for a token valid longer than the token's whole lifetime (or
/// than a refresh could give now, [C15](crate#c15)): it was sent with the freshest token
/// ([C20](crate#c20)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ShorterThanAsked {
    /// The generation the request is sent with.
    pub generation: u64,
    /// How long the request asked the token to stay valid.
    pub asked: Duration,
    /// How long the token has left, if it expires.
    pub remaining: Option<Duration>,
}

/// A token from outside (a login) was installed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TokenInstalled {
    /// The generation it was given.
    pub generation: u64,
}

/// Receives the coordinator's events. Every method defaults to doing nothing.
pub trait Observer: Send + Sync {
    /// A refresh flight started.
    fn refresh_started(&self, _event: &RefreshStarted) {}
    /// An attempt failed and will be retried inside the flight.
    fn attempt_failed(&self, _event: &AttemptFailed<'_>) {}
    /// A refresh flight ended.
    fn refresh_finished(&self, _event: &RefreshFinished) {}
    /// A caller joined the flight in progress.
    fn flight_joined(&self, _event: &FlightJoined) {}
    /// A request got its token (a fast-path hit, or after waiting). Raised for every
    /// authenticated request: keep it cheap (a counter).
    fn request_authorized(&self, _event: &RequestAuthorized) {}
    /// A rejected request was resent.
    fn request_resent(&self, _event: &RequestResent) {}
    /// Re-authentication became necessary: a permanent failure ([C9](crate#c9)). Called
    /// once, until the next login; the place to start a re-login. A panic here is
    /// caught and logged, the waiters still get their error ([C18](crate#c18)).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tokenflight::observe::{AuthLost, Observer};
    /// use tokenflight::{RefreshError, SingleFlight, from_fn};
    /// struct Relogin(Arc<AtomicU32>);
    /// impl Observer for Relogin {
    ///     fn auth_lost(&self, event: &AuthLost<'_>) {
    ///         assert!(event.error.is_permanent());
    ///         self.0.fetch_add(1, Ordering::SeqCst);
    ///     }
    /// }
    /// let lost = Arc::new(AtomicU32::new(0));
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Err(RefreshError::permanent("invalid_grant")) }))
    ///     .observer(Relogin(lost.clone()))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(async {
    ///     assert!(flight.token().await.unwrap_err().is_reauthentication_required());
    ///     assert!(flight.token().await.is_err());
    /// });
    /// // Once, until the next login.
    /// assert_eq!(lost.load(Ordering::SeqCst), 1);
    /// ```
    fn auth_lost(&self, _event: &AuthLost<'_>) {}
    /// A login was installed.
    fn token_installed(&self, _event: &TokenInstalled) {}
    /// A request was sent with a token that lasts less than it asked ([C20](crate#c20)).
    fn token_shorter_than_asked(&self, _event: &ShorterThanAsked) {}
}

/// The registered observers; empty costs one length check per slow-path event.
#[derive(Clone, Default)]
pub(crate) struct Observers(Vec<Arc<dyn Observer>>);

impl Observers {
    pub(crate) fn push(&mut self, observer: Arc<dyn Observer>) {
        self.0.push(observer);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Calls `f` on every observer; a panic in one is contained ([C18](crate#c18)).
    pub(crate) fn emit(&self, f: impl Fn(&dyn Observer)) {
        for observer in &self.0 {
            if catch_unwind(AssertUnwindSafe(|| f(observer.as_ref()))).is_err() {
                tracing::warn!("an observer panicked; ignored");
            }
        }
    }
}

/// A stable, lower-case name for a refresh reason (used as a metric label).
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn reason_str(reason: Option<RefreshReason>) -> &'static str {
    match reason {
        None => "reload",
        Some(RefreshReason::Initial) => "initial",
        Some(RefreshReason::Expired) => "expired",
        Some(RefreshReason::Rejected) => "rejected",
        Some(RefreshReason::RefreshAhead) => "refresh_ahead",
        Some(RefreshReason::Forced) => "forced",
    }
}

/// A stable, lower-case name for what kind of failure `error` is (the metric label
/// `kind`): its cause, or for the token source's failures their severity.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn error_kind_str(error: &RefreshError) -> &'static str {
    match error.cause() {
        Cause::TokenSource if error.is_permanent() => "permanent",
        Cause::TokenSource => "transient",
        cause => cause.as_str(),
    }
}
