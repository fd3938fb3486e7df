//! `SingleFlight`: owns the current token and makes sure at most one refresh runs, that
//! everybody who needs it waits for that one, and that all get the same outcome.
//!
//! How it works: the valid token sits in an `ArcSwapOption` (the fast path is one atomic
//! load, no lock, no allocation). A refresh is a `Shared` future; every waiter holds a
//! clone and whichever waiter is polled drives it, so dropping any waiter — the one that
//! started it included — leaves the others driving the same refresh (C6). The state
//! keeps only a weak handle: when the last waiter leaves and no spawner keeps the flight
//! alive, the refresh is dropped and the next caller starts a fresh one. The std mutex
//! around the state is never held across an await.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::{self, BoxFuture, Either, Shared, WeakShared};

use crate::config::FlightConfig;
use crate::error::{Error, RefreshError, RefreshErrorKind};
use crate::runtime::{Clock, Spawn, Timer};
use crate::source::{RefreshContext, RefreshReason, TokenSource};
use crate::stats::{Counters, Stats, bump};
use crate::store::{StoreError, StoreLock, TokenStore};
use crate::token::Token;

type FlightOutput = Result<Arc<Token>, RefreshError>;
type FlightFuture = Shared<BoxFuture<'static, FlightOutput>>;

/// A hook called once when the coordinator enters "re-authentication required" (C9).
pub type AuthLostHook = Arc<dyn Fn(&RefreshError) + Send + Sync>;

/// Everything a `SingleFlight` is built from; see [`crate::Builder`].
pub(crate) struct Parts {
    pub(crate) config: FlightConfig,
    pub(crate) source: Arc<dyn TokenSource>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timer: Arc<dyn Timer>,
    pub(crate) spawner: Option<Arc<dyn Spawn>>,
    pub(crate) on_auth_lost: Option<AuthLostHook>,
    pub(crate) initial_token: Option<Token>,
}

/// The coordinator: one current token, at most one refresh in flight (C1–C10).
///
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct SingleFlight {
    inner: Arc<Inner>,
}

struct Inner {
    parts: Parts,
    current: ArcSwapOption<Token>,
    /// Highest generation a server rejected; such a token is never handed out again.
    rejected: AtomicU64,
    state: Mutex<State>,
    counters: Counters,
}

#[derive(Default)]
struct State {
    flight: Option<(u64, WeakShared<BoxFuture<'static, FlightOutput>>)>,
    failure: Failure,
    consecutive_failures: u32,
    next_flight_id: u64,
    /// The highest generation handed to a token so far: a login installed while a
    /// refresh is in flight must not get the refresh's generation (C3 tells tokens
    /// apart by generation).
    last_generation: u64,
}

#[derive(Default)]
enum Failure {
    #[default]
    None,
    Backoff {
        until: SystemTime,
        error: RefreshError,
    },
    AuthLost {
        error: RefreshError,
    },
}

/// What a caller gets when it asks for a refresh.
enum Joined {
    Ready(Arc<Token>),
    Wait(FlightFuture),
    /// A flight is running and the caller asked not to wait for it (refresh-ahead).
    Busy(FlightFuture),
    Failed(Error),
}

impl fmt::Debug for SingleFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("generation", &self.current().map(|t| t.generation()))
            .field("config", &self.inner.parts.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SingleFlight {
    pub(crate) fn from_parts(mut parts: Parts) -> Self {
        let initial = parts.initial_token.take().map(|token| {
            let generation = token.generation().max(1);
            Arc::new(token.with_generation(generation))
        });
        SingleFlight {
            inner: Arc::new(Inner {
                parts,
                current: ArcSwapOption::new(initial),
                rejected: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                counters: Counters::default(),
            }),
        }
    }

    /// The current token, valid or not, without any check or wait.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The settings in use.
    pub fn config(&self) -> &FlightConfig {
        &self.inner.parts.config
    }

    /// The clock in use.
    pub fn clock(&self) -> &dyn Clock {
        &*self.inner.parts.clock
    }

    /// The current token if it can be sent as it is: present, not within `leeway` of
    /// expiry (C7), not rejected by a server. Lock-free and allocation-free.
    pub fn valid_token(&self) -> Option<Arc<Token>> {
        self.usable_at(self.inner.parts.clock.now())
    }

    fn usable_at(&self, now: SystemTime) -> Option<Arc<Token>> {
        let guard = self.inner.current.load();
        let token = guard.as_ref()?;
        if self.is_usable(token, now) {
            Some(Arc::clone(token))
        } else {
            None
        }
    }

    fn is_usable(&self, token: &Token, now: SystemTime) -> bool {
        token.generation() > self.inner.rejected.load(Ordering::Acquire)
            && !token.is_expired(now, self.inner.parts.config.leeway)
    }

    fn in_refresh_ahead_window(&self, token: &Token, now: SystemTime) -> bool {
        match (self.inner.parts.config.refresh_ahead, token.expiry()) {
            (Some(window), Some(_)) => token.is_expired(now, window),
            _ => false,
        }
    }

    /// A token to send now.
    ///
    /// Fast path: a valid token is returned at once (no lock, no allocation). In the
    /// refresh-ahead window a background refresh starts and the valid token is returned
    /// (C8); without a spawner the one caller that starts it drives it and the rest go on.
    /// An expired or missing token waits for the one refresh (C1, C2).
    ///
    /// # Cancellation
    /// Dropping the returned future at any await point never hangs other callers and
    /// never cancels the refresh while anyone else waits for it (C6). With a spawner the
    /// refresh also completes when every caller has left.
    pub async fn token(&self) -> Result<Arc<Token>, Error> {
        let now = self.inner.parts.clock.now();
        if let Some(token) = self.usable_at(now) {
            if self.in_refresh_ahead_window(&token, now) {
                return Ok(self.refresh_ahead(token).await);
            }
            return Ok(token);
        }
        let current = self.current();
        let reason = match &current {
            None => RefreshReason::Initial,
            Some(token) if token.generation() <= self.inner.rejected.load(Ordering::Acquire) => {
                RefreshReason::Rejected
            }
            Some(_) => RefreshReason::Expired,
        };
        let replaces = current.map(|t| t.generation());
        self.wait(self.join_or_start(reason, replaces, false)).await
    }

    async fn refresh_ahead(&self, token: Arc<Token>) -> Arc<Token> {
        let flight =
            match self.join_or_start(RefreshReason::RefreshAhead, Some(token.generation()), true) {
                Joined::Wait(flight) if self.inner.parts.spawner.is_none() => flight,
                // Spawned, already running, or not allowed now: go on with the valid token.
                _ => return token,
            };
        match flight.await {
            Ok(newer) => newer,
            // C9: an error never replaces a still-valid token.
            Err(_) => token,
        }
    }

    /// A token to resend a request with, after a server rejected the token of
    /// `rejected_generation`.
    ///
    /// If a newer token already exists the rejection is stale: that token is returned
    /// and no refresh starts (C3). Otherwise the token is marked rejected and the caller
    /// waits for the one refresh that supersedes it (C2).
    ///
    /// # Cancellation
    /// As for [`SingleFlight::token`]: dropping the future never hangs others or cancels
    /// a refresh someone else waits for (C6).
    pub async fn token_after_rejection(
        &self,
        rejected_generation: u64,
    ) -> Result<Arc<Token>, Error> {
        if let Some(token) = self.stale_rejection(rejected_generation) {
            return Ok(token);
        }
        self.wait(self.join_or_start(RefreshReason::Rejected, Some(rejected_generation), false))
            .await
    }

    fn stale_rejection(&self, rejected_generation: u64) -> Option<Arc<Token>> {
        bump(&self.inner.counters.rejections);
        let now = self.inner.parts.clock.now();
        match self.usable_at(now) {
            Some(token) if token.generation() > rejected_generation => {
                bump(&self.inner.counters.stale_rejections);
                tracing::debug!(
                    rejected_generation,
                    current_generation = token.generation(),
                    "stale rejection: resending with the current token"
                );
                Some(token)
            }
            _ => {
                self.inner
                    .rejected
                    .fetch_max(rejected_generation, Ordering::AcqRel);
                None
            }
        }
    }

    /// Records that a server rejected the token of `generation` without waiting for a
    /// new one (a request that cannot be resent, C4). The next caller gets a new token;
    /// with a spawner the refresh starts now.
    pub fn mark_rejected(&self, generation: u64) {
        bump(&self.inner.counters.not_replayable);
        if self.stale_rejection(generation).is_some() || self.inner.parts.spawner.is_none() {
            return;
        }
        // The spawner drives the flight; this caller does not wait.
        let _ = self.join_or_start(RefreshReason::Rejected, Some(generation), false);
    }

    /// Refreshes even though the current token may be valid (C11), joining a refresh
    /// already in flight.
    ///
    /// # Cancellation
    /// As for [`SingleFlight::token`].
    pub async fn force_refresh(&self) -> Result<Arc<Token>, Error> {
        let replaces = self.current().map(|t| t.generation());
        self.wait(self.join_or_start(RefreshReason::Forced, replaces, false))
            .await
    }

    /// Installs a token from outside (a new login), saving it to the store first. Ends
    /// "re-authentication required" and any backoff (C9).
    ///
    /// # Cancellation
    /// If dropped before the store's save completes, nothing is installed in memory; the
    /// store may or may not hold the token.
    pub async fn install(&self, token: Token) -> Result<Arc<Token>, StoreError> {
        let stored = self.inner.parts.store.load().await.ok().flatten();
        let generation = self
            .next_generation(stored.as_ref().map(Token::generation))
            .max(token.generation());
        let token = token.with_generation(generation);
        self.inner.parts.store.save(&token, None).await?;
        let token = Arc::new(token);
        let mut state = self.lock_state();
        self.publish(&token);
        state.failure = Failure::None;
        state.consecutive_failures = 0;
        drop(state);
        tracing::info!(generation, "token installed");
        Ok(token)
    }

    /// A generation no token of this coordinator has had yet.
    fn next_generation(&self, stored: Option<u64>) -> u64 {
        let current = self.current().map_or(0, |t| t.generation());
        let rejected = self.inner.rejected.load(Ordering::Acquire);
        let mut state = self.lock_state();
        let generation = current
            .max(rejected)
            .max(stored.unwrap_or(0))
            .max(state.last_generation)
            .saturating_add(1);
        state.last_generation = generation;
        generation
    }

    /// Stores `token` as current unless a newer one is already there.
    fn publish(&self, token: &Arc<Token>) {
        let newer_present = self
            .inner
            .current
            .load()
            .as_ref()
            .is_some_and(|cur| cur.generation() > token.generation());
        if !newer_present {
            self.inner.current.store(Some(Arc::clone(token)));
        }
    }

    /// Whether "re-authentication required" is in force.
    pub fn is_auth_lost(&self) -> bool {
        matches!(self.lock_state().failure, Failure::AuthLost { .. })
    }

    pub(crate) fn count_retry(&self) {
        bump(&self.inner.counters.retries);
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the flight in progress, or starts one, or says why not (C1, C2, C9).
    /// `only_if_idle` is for refresh-ahead: never wait on someone else's flight.
    fn join_or_start(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        only_if_idle: bool,
    ) -> Joined {
        let mut state = self.lock_state();
        let now = self.inner.parts.clock.now();
        // A newer token than the one being replaced is already in place: nothing to do.
        // Checked under the lock so a flight that just ended is seen (no second flight).
        if let Some(token) = self.superseded(reason, replaces, now) {
            return Joined::Ready(token);
        }
        if let Some((_, weak)) = &state.flight {
            if let Some(flight) = weak.upgrade() {
                if only_if_idle {
                    return Joined::Busy(flight);
                }
                bump(&self.inner.counters.coalesced);
                tracing::trace!(?reason, "joined the refresh in flight");
                return Joined::Wait(flight);
            }
        }
        match &state.failure {
            Failure::AuthLost { error } => {
                return Joined::Failed(Error::ReauthenticationRequired {
                    cause: error.clone(),
                });
            }
            Failure::Backoff { until, error } if now < *until => {
                return Joined::Failed(Error::BackingOff {
                    last: error.clone(),
                    remaining: until.duration_since(now).unwrap_or(Duration::ZERO),
                });
            }
            _ => {}
        }
        let id = state.next_flight_id;
        state.next_flight_id = id.wrapping_add(1);
        let flight = run_flight(self.clone(), id, reason, replaces)
            .boxed()
            .shared();
        // `downgrade` is `None` only for a completed future; this one was never polled.
        state.flight = flight.downgrade().map(|weak| (id, weak));
        drop(state);
        bump(&self.inner.counters.flights);
        tracing::debug!(?reason, flight = id, "refresh started");
        if let Some(spawner) = &self.inner.parts.spawner {
            spawner.spawn(flight.clone().map(drop).boxed());
        }
        Joined::Wait(flight)
    }

    /// A usable token newer than the one a refresh for `reason` would replace: then the
    /// refresh is not needed (C2, C3). Checked when a caller asks (under the lock, so a
    /// flight that just ended is seen) and again when a flight first runs (a spawned
    /// flight may first run much later, after a login). A forced refresh is never
    /// superseded.
    fn superseded(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        if reason == RefreshReason::Forced {
            return None;
        }
        self.usable_at(now)
            .filter(|token| replaces.is_none_or(|g| token.generation() > g))
    }

    async fn wait(&self, joined: Joined) -> Result<Arc<Token>, Error> {
        match joined {
            Joined::Ready(token) => Ok(token),
            Joined::Failed(error) => Err(error),
            Joined::Wait(flight) | Joined::Busy(flight) => flight.await.map_err(|error| {
                if error.kind().is_permanent() {
                    Error::ReauthenticationRequired { cause: error }
                } else {
                    Error::Refresh(error)
                }
            }),
        }
    }

    /// Ends flight `id`: publishes the token or records the failure, under the lock so
    /// a caller that arrives next sees the outcome (C5).
    fn finish(&self, id: u64, outcome: FlightOutput) -> FlightOutput {
        let mut state = self.lock_state();
        if state.flight.as_ref().is_some_and(|(f, _)| *f == id) {
            state.flight = None;
        }
        let mut lost = None;
        match &outcome {
            Ok(token) => {
                self.publish(token);
                state.failure = Failure::None;
                state.consecutive_failures = 0;
                tracing::debug!(
                    flight = id,
                    generation = token.generation(),
                    "refresh succeeded"
                );
            }
            Err(error) => {
                bump(&self.inner.counters.failures);
                if error.kind().is_permanent() {
                    if !matches!(state.failure, Failure::AuthLost { .. }) {
                        lost = Some(error.clone());
                    }
                    state.failure = Failure::AuthLost {
                        error: error.clone(),
                    };
                } else {
                    state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                    let delay = self.inner.parts.config.backoff.delay(
                        state.consecutive_failures,
                        fastrand::f64(),
                        error.retry_after(),
                    );
                    let now = self.inner.parts.clock.now();
                    state.failure = Failure::Backoff {
                        until: now.checked_add(delay).unwrap_or(now),
                        error: error.clone(),
                    };
                }
                tracing::warn!(flight = id, error = %error, "refresh failed");
            }
        }
        drop(state);
        if let (Some(error), Some(hook)) = (lost, &self.inner.parts.on_auth_lost) {
            tracing::warn!(error = %error, "re-authentication required");
            hook(&error);
        }
        outcome
    }

    /// Races `work` against the refresh timeout (C10).
    async fn bounded<T>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, RefreshError>>,
    ) -> Result<T, RefreshError> {
        let timeout = self.inner.parts.config.refresh_timeout;
        let sleep = self.inner.parts.timer.sleep(timeout);
        match future::select(std::pin::pin!(work), sleep).await {
            Either::Left((result, _)) => result,
            Either::Right(((), _)) => Err(RefreshError::new(
                RefreshErrorKind::Timeout,
                format!("{what} took longer than {timeout:?}"),
            )),
        }
    }

    /// One refresh attempt: lock → reload → adopt or fetch → save → unlock.
    async fn attempt(&self, reason: RefreshReason) -> FlightOutput {
        let store = &self.inner.parts.store;
        let lock = self
            .bounded("waiting for the store's refresh lock", async {
                store.lock().await.map_err(store_error)
            })
            .await?;
        let result = self.attempt_locked(reason, &lock).await;
        store.unlock(lock).await;
        result
    }

    async fn attempt_locked(&self, reason: RefreshReason, lock: &StoreLock) -> FlightOutput {
        let store = &self.inner.parts.store;
        let stored = store.load().await.map_err(store_error)?;
        let current = self.current();
        let now = self.inner.parts.clock.now();
        if let Some(stored) = &stored {
            let newer = current
                .as_ref()
                .is_none_or(|cur| stored.generation() > cur.generation());
            if newer && self.is_usable(stored, now) {
                // Another process refreshed while we waited for the lock.
                bump(&self.inner.counters.adopted);
                tracing::debug!(generation = stored.generation(), "adopted the stored token");
                return Ok(Arc::new(stored.clone()));
            }
        }
        // The newest token known holds the newest refresh secret (rotation).
        let previous = match (current, &stored) {
            (Some(cur), Some(st)) if st.generation() > cur.generation() => {
                Some(Arc::new(st.clone()))
            }
            (None, Some(st)) => Some(Arc::new(st.clone())),
            (cur, _) => cur,
        };
        let cx = RefreshContext::new(reason, previous, now);
        bump(&self.inner.counters.source_calls);
        let source = &self.inner.parts.source;
        let fetched = self
            .bounded("the token source", async {
                AssertUnwindSafe(source.fetch(cx))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        Err(RefreshError::new(
                            RefreshErrorKind::Panicked,
                            "the token source panicked",
                        ))
                    })
            })
            .await?;
        // Numbered when it arrives, not when it was asked for: a login installed or a
        // rejection reported meanwhile has a higher generation than the token this
        // flight replaces, and the new token must still supersede it (C3, C4).
        let generation = self.next_generation(stored.as_ref().map(Token::generation));
        let token = fetched.with_generation(generation);
        match store.save(&token, Some(lock)).await {
            Ok(()) => Ok(Arc::new(token)),
            Err(StoreError::LeaseLost) => {
                // Someone else holds the lock now and may have saved a newer token.
                match store.load().await {
                    Ok(Some(stored)) if stored.generation() >= token.generation() => {
                        Ok(Arc::new(stored))
                    }
                    _ => Err(store_error(StoreError::LeaseLost)),
                }
            }
            Err(error) => {
                // The server already issued this token (and may have spent the old
                // refresh token): keep it in memory rather than lose it.
                tracing::warn!(error = %error, "saving the refreshed token failed; keeping it in memory");
                Ok(Arc::new(token))
            }
        }
    }
}

async fn run_flight(
    flight: SingleFlight,
    id: u64,
    reason: RefreshReason,
    replaces: Option<u64>,
) -> FlightOutput {
    let now = flight.inner.parts.clock.now();
    let outcome = match flight.superseded(reason, replaces, now) {
        Some(token) => Ok(token),
        None => flight.attempt(reason).await,
    };
    flight.finish(id, outcome)
}

fn store_error(error: StoreError) -> RefreshError {
    RefreshError::new(RefreshErrorKind::Store, error.to_string()).with_source(error)
}
