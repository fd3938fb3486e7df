//! A flight's I/O, as straight-line async code: lock the store → ask the state machine
//! → fetch → have the machine number the token → save → unlock → have the machine
//! finish the flight. Every decision is the machine's ([`super::machine`]); this file
//! only carries them out, each store and source call raced against the flight's one
//! budget ([C10](crate#c10), [C16](crate#c16)) and every panic contained ([C18](crate#c18)).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{self, BoxFuture, Either};
use tracing::Instrument;

use super::SingleFlight;
use super::machine::{
    AfterLoad, Ask, FlightKind, FlightOutput, Flown, Started, stamp, superseded_by_login,
};
use crate::error::{Cause, RefreshError};
use crate::observe::{AttemptFailed, AuthLost, Outcome, RefreshFinished};
use crate::source::RefreshContext;
use crate::stats::bump;
use crate::store::{MAX_GENERATION, StoreError, StoreGuard};
use crate::token::Token;

impl SingleFlight {
    /// The whole flight: run it, contain its panics, let the machine finish it, carry
    /// out the effects (observers, span).
    pub(super) async fn run_flight(self, started: Started) -> FlightOutput {
        // One span per flight; no field carries a token or a secret (C12).
        let span = tracing::info_span!(
            "tokenflight.refresh",
            flight = started.id,
            reason = ?started.kind.reason(),
            replaces = ?started.ask.replaces,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            generation = tracing::field::Empty,
        );
        let began = self.mono();
        let counters = &self.inner.counters;
        let calls_before = counters.source_calls.load(Ordering::Relaxed);
        let adopted_before = adopted_count(&self);
        // A panic in any pluggable part ends the flight with a typed error for every
        // waiter; `Shared` would otherwise re-panic in each of them (C18).
        let result = AssertUnwindSafe(self.run(started))
            .catch_unwind()
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| {
                Err(RefreshError::transient_because(
                    Cause::Panicked,
                    "a part of the refresh panicked (token store, clock or timer)",
                ))
            });
        let output = span.in_scope(|| self.finish(started, result));
        // Only one flight runs at a time, so the counters' growth is this flight's.
        let attempts = counters
            .source_calls
            .load(Ordering::Relaxed)
            .saturating_sub(calls_before);
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        let adopted = adopted_count(&self) > adopted_before;
        self.report(&span, started.id, &output, attempts, adopted, began);
        output
    }

    /// Records the flight's outcome on its span and tells the observers.
    fn report(
        &self,
        span: &tracing::Span,
        id: u64,
        output: &FlightOutput,
        attempts: u32,
        adopted: bool,
        began: Instant,
    ) {
        let outcome = match &output.result {
            _ if output.superseded => Outcome::Superseded,
            Ok(_) if adopted || attempts == 0 => Outcome::Adopted,
            Ok(_) => Outcome::Success,
            Err(error) => Outcome::of_error(error),
        };
        let generation = output.result.as_ref().ok().map(|t| t.generation());
        span.record("attempts", attempts);
        span.record("outcome", outcome.as_str());
        if let Some(generation) = generation {
            span.record("generation", generation);
        }
        let observers = self.observers();
        if !observers.is_empty() {
            let duration = self.mono().saturating_duration_since(began);
            observers.emit(|o| {
                o.refresh_finished(&RefreshFinished {
                    flight: id,
                    outcome,
                    duration,
                    attempts,
                    generation,
                })
            });
        }
    }

    /// Ends the flight in the machine (one lock), then carries out its effects: the
    /// failure count, the auth-lost event ([C9](crate#c9)). Never panics ([C18](crate#c18)).
    fn finish(&self, started: Started, result: Result<Flown, RefreshError>) -> FlightOutput {
        let now = self.now();
        let mono = self.mono();
        let unit = fastrand::f64();
        let finished = self.with_state(|m, rules| {
            let finished = m.finish(rules, &started, result, (now, mono, unit));
            // Under the state lock: a login right after cannot be overtaken (C21).
            if let Some(error) = &finished.lost {
                self.inner.changes.0.auth_lost(error);
            }
            finished
        });
        let id = started.id;
        match &finished.output.result {
            _ if finished.output.superseded => {
                tracing::debug!(flight = id, "flight superseded by a login");
            }
            Ok(token) => tracing::debug!(
                flight = id,
                generation = token.generation(),
                "refresh succeeded"
            ),
            Err(error) if started.kind != FlightKind::Reload => {
                tracing::warn!(flight = id, error = %error, "refresh failed");
            }
            Err(_) => {}
        }
        if finished.failed {
            bump(&self.inner.counters.failures);
        }
        if let Some(error) = &finished.lost {
            tracing::warn!(error = %error, "re-authentication required");
            // An observer that panics does not take the flight's waiters with it (C18).
            self.observers().emit(|o| o.auth_lost(&AuthLost { error }));
        }
        finished.output
    }

    /// The flight itself: retries transient failures within one budget ([C16](crate#c16)).
    async fn run(&self, started: Started) -> Result<Flown, RefreshError> {
        let began = self.mono();
        let mut deadline = self.budget();
        if started.kind == FlightKind::Reload {
            return self.reload(&mut deadline).await.map(unsaved);
        }
        let ask = started.ask;
        if let Some(token) = self.superseded_now(ask) {
            return Ok(unsaved(token));
        }
        let config = &self.inner.parts.config;
        let mut attempt: u32 = 1;
        loop {
            let error = match self.attempt(started, &mut deadline).await {
                Ok(flown) => return Ok(flown),
                Err(error) => error,
            };
            if !error.is_retryable()
                || attempt >= config.retry.max_attempts
                || self.login_since(started.epoch)
            {
                return Err(error);
            }
            let delay = config
                .retry
                .backoff
                .delay(attempt, fastrand::f64(), error.retry_after());
            let spent = self.mono().saturating_duration_since(began);
            if spent.saturating_add(delay) >= config.refresh_timeout {
                // The next attempt cannot fit: leave the wait to the fail-fast backoff.
                return Err(error);
            }
            tracing::debug!(attempt, ?delay, error = %error, "refresh attempt failed; retrying");
            self.observers().emit(|o| {
                o.attempt_failed(&AttemptFailed {
                    attempt,
                    error: &error,
                    next_delay: delay,
                })
            });
            if within(self.inner.parts.timer.sleep(delay), &mut deadline)
                .await
                .is_none()
            {
                return Err(error);
            }
            attempt += 1;
            bump(&self.inner.counters.attempt_retries);
            if let Some(token) = self.superseded_now(ask) {
                return Ok(unsaved(token));
            }
        }
    }

    /// Whether a login happened since `epoch` (then it wins, [C17](crate#c17)).
    fn login_since(&self, epoch: u64) -> bool {
        self.with_state(|m, _| m.login_epoch() != epoch)
    }

    /// One attempt: (unlocked read) → lock → load → adopt or fetch → save → unlock.
    async fn attempt(
        &self,
        started: Started,
        deadline: &mut Deadline,
    ) -> Result<Flown, RefreshError> {
        // Fleet fast path: most often another replica refreshed already, so one read
        // adopts its token without contending for the lock (flat per-replica store
        // work). The machine applies the same rules as under the lock.
        if !started.unsaved_login {
            if let Some(token) = self.adopt_unlocked(started.epoch, deadline).await {
                return Ok(unsaved(token));
            }
        }
        // The store may have pushed the newer token meanwhile, or may push it while
        // this replica waits for the lock: then the lock is not needed either.
        let guard = match within(self.lock_unless_pushed(started.ask), deadline)
            .await
            .ok_or_else(|| self.out_of_budget("waiting for the store's refresh lock"))?
        {
            Locked::Guard(guard) => guard.map_err(RefreshError::from_store)?,
            Locked::Superseded(token) => return Ok(unsaved(token)),
        };
        let result = self.attempt_locked(started, &*guard, deadline).await;
        self.release(guard, deadline).await;
        result
    }

    /// Waits for the store's lock, unless a token the store pushes meanwhile supersedes
    /// this flight: another replica refreshed while this one queued for the lock, and
    /// taking the lock now would only read that token back. In a fleet that turns one
    /// lock round per replica and refresh into none. The lock request is then dropped;
    /// a store gives back a lock it took for a request given up (the same rule as for a
    /// flight out of budget). A forced refresh is never superseded, so it always waits.
    async fn lock_unless_pushed(&self, ask: Ask) -> Locked {
        // Listen before each check, so a push between the check and the wait wakes it.
        let mut pushed = self.inner.adopted_push.listen();
        if let Some(token) = self.superseded_now(ask) {
            return Locked::Superseded(token);
        }
        let mut lock = self.inner.parts.store.lock();
        loop {
            match future::select(&mut lock, pushed).await {
                Either::Left((guard, _)) => return Locked::Guard(guard),
                Either::Right(((), _)) => {}
            }
            pushed = self.inner.adopted_push.listen();
            if let Some(token) = self.superseded_now(ask) {
                return Locked::Superseded(token);
            }
        }
    }

    /// Reads the stored token without the lock; the machine adopts it if it may. Any
    /// store error or a spent budget just falls through to the locked path, which
    /// reports it. Lock-free unless the stored token is newer than the current one.
    async fn adopt_unlocked(&self, epoch: u64, deadline: &mut Deadline) -> Option<Arc<Token>> {
        let stored = sane(
            within(self.inner.parts.store.load(), deadline)
                .await?
                .ok()?,
        )?;
        let held = self.current().map_or(0, |t| t.generation());
        if stored.generation() <= held {
            return None;
        }
        let now = self.now();
        let token = self.with_state(|m, rules| m.adopt_unlocked(rules, stored, epoch, now))?;
        bump(&self.inner.counters.adopted);
        tracing::debug!(
            generation = token.generation(),
            "adopted the stored token without the lock"
        );
        Some(token)
    }

    /// With the store's lock held: load, then save a login, adopt, or fetch and save,
    /// as the machine decides.
    async fn attempt_locked(
        &self,
        started: Started,
        guard: &dyn StoreGuard,
        deadline: &mut Deadline,
    ) -> Result<Flown, RefreshError> {
        let mut login_tried = false;
        loop {
            let stored = match within(guard.load(), deadline).await {
                None => return Err(self.out_of_budget("loading the stored token")),
                Some(Ok(stored)) => sane(stored),
                Some(Err(error))
                    if !login_tried && self.with_state(|m, _| m.has_unsaved_login()) =>
                {
                    tracing::warn!(error = %error, "saving the login failed; it stays in use here");
                    login_tried = true;
                    continue;
                }
                Some(Err(error)) => return Err(RefreshError::from_store(error)),
            };
            let stored_generation = stored.as_ref().map(Token::generation);
            let now = self.now();
            let (ask, epoch) = (started.ask, started.epoch);
            let decision = self
                .with_state(|m, rules| m.after_load(rules, stored, ask, epoch, login_tried, now));
            match decision {
                AfterLoad::SaveLogin(login) => {
                    if let Err(error) = self.save_login_token(guard, &login, deadline).await {
                        tracing::warn!(error = %error, "saving the login failed; it stays in use here");
                    }
                    login_tried = true;
                }
                AfterLoad::Superseded => return Err(superseded_by_login()),
                AfterLoad::Ready(token) => return Ok(unsaved(token)),
                AfterLoad::Adopted(token) => {
                    // Another process refreshed while we waited for the lock.
                    bump(&self.inner.counters.adopted);
                    tracing::debug!(generation = token.generation(), "adopted the stored token");
                    return Ok(unsaved(token));
                }
                AfterLoad::Fetch { previous } => {
                    let cx = RefreshContext::new(ask.reason, previous, now);
                    return self
                        .fetch_and_save(cx, now, stored_generation, epoch, guard, deadline)
                        .await;
                }
            }
        }
    }

    /// Calls the source, has the machine number its token, saves it.
    async fn fetch_and_save(
        &self,
        cx: RefreshContext,
        now: std::time::SystemTime,
        stored_generation: Option<u64>,
        epoch: u64,
        guard: &dyn StoreGuard,
        deadline: &mut Deadline,
    ) -> Result<Flown, RefreshError> {
        bump(&self.inner.counters.source_calls);
        let fetched = within(self.fetch(cx), deadline)
            .await
            .ok_or_else(|| self.out_of_budget("the token source"))?;
        let mono = self.mono();
        let retry_after = fetched.as_ref().err().and_then(RefreshError::retry_after);
        let ok = fetched.is_ok();
        // Numbered when it arrives, not when it was asked for (C3, C4), unless a login
        // arrived meanwhile (C17).
        let generation =
            self.with_state(|m, _| m.number(ok, retry_after, stored_generation, epoch, mono));
        let fetched = fetched?;
        let (generation, login_unsaved) = generation.ok_or_else(superseded_by_login)?;
        let token = Arc::new(stamp(fetched.with_generation(generation), self.now()));
        let flown = self.save_fetched(token, guard, deadline, now).await;
        if flown.saved && login_unsaved {
            // At once, not when the flight ends: the unlock may take long.
            self.with_state(|m, _| m.token_saved(generation));
        }
        Ok(flown)
    }

    /// Saves a fetched token under the lock. The server already issued it (and may
    /// have spent the old refresh token): whatever the store says, it is kept — unless
    /// the lease was lost and the store holds a newer token, which the fleet uses.
    async fn save_fetched(
        &self,
        token: Arc<Token>,
        guard: &dyn StoreGuard,
        deadline: &mut Deadline,
        now: std::time::SystemTime,
    ) -> Flown {
        match within(guard.save(&token), deadline).await {
            Some(Ok(())) => Flown { token, saved: true },
            Some(Err(StoreError::LeaseLost)) => {
                // Someone else holds the lock now and may have saved a newer token (an
                // unlocked read: this guard's lease is gone).
                let newer = match within(self.inner.parts.store.load(), deadline).await {
                    Some(Ok(stored)) => {
                        sane(stored).filter(|stored| stored.generation() >= token.generation())
                    }
                    _ => None,
                };
                match newer {
                    Some(stored) => unsaved(Arc::new(stamp(stored, now))),
                    None => {
                        tracing::warn!("refresh lock lease lost; keeping the new token in memory");
                        unsaved(token)
                    }
                }
            }
            Some(Err(error)) => {
                tracing::warn!(error = %error, "saving the refreshed token failed; keeping it in memory");
                unsaved(token)
            }
            None => {
                tracing::warn!(
                    "saving the refreshed token used up the budget; keeping it in memory"
                );
                unsaved(token)
            }
        }
    }

    /// Re-authentication is required: adopt a newer usable token from the store (a
    /// login saved by another process or replica), or fail with the same cause ([C17](crate#c17)).
    async fn reload(&self, deadline: &mut Deadline) -> Result<Arc<Token>, RefreshError> {
        let lost = self.with_state(|m, _| m.reload_cause())?;
        let stored = match within(self.inner.parts.store.load(), deadline).await {
            Some(Ok(stored)) => sane(stored),
            _ => None,
        };
        let now = self.now();
        let Some(token) = self.with_state(|m, rules| m.reload_adopt(rules, stored, now)) else {
            return Err(lost);
        };
        bump(&self.inner.counters.store_reloads);
        tracing::info!(
            generation = token.generation(),
            "adopted a login saved to the store; re-authentication no longer required"
        );
        Ok(token)
    }

    /// Saves an unsaved login under the store's lock, within one flight budget.
    pub(super) async fn save_login(&self) -> Result<Option<Arc<Token>>, StoreError> {
        let store = &self.inner.parts.store;
        let mut deadline = self.budget();
        let guard = within(store.lock(), &mut deadline)
            .await
            .ok_or(StoreError::LockTimeout)??;
        let saved = self.save_login_locked(&*guard, &mut deadline).await;
        self.release(guard, &mut deadline).await;
        saved
    }

    /// With the store's lock held: saves the unsaved login, numbered above what the
    /// store holds. `Ok(None)`: there was nothing to save.
    async fn save_login_locked(
        &self,
        guard: &dyn StoreGuard,
        deadline: &mut Deadline,
    ) -> Result<Option<Arc<Token>>, StoreError> {
        if !self.with_state(|m, _| m.has_unsaved_login()) {
            return Ok(None);
        }
        let stored = within(guard.load(), deadline)
            .await
            .ok_or(StoreError::LockTimeout)??;
        let stored = sane(stored);
        let Some(login) = self.with_state(|m, _| m.login_to_save(stored.as_ref())) else {
            return Ok(None);
        };
        self.save_login_token(guard, &login, deadline).await?;
        Ok(Some(login))
    }

    async fn save_login_token(
        &self,
        guard: &dyn StoreGuard,
        login: &Arc<Token>,
        deadline: &mut Deadline,
    ) -> Result<(), StoreError> {
        within(guard.save(login), deadline)
            .await
            .ok_or(StoreError::LockTimeout)??;
        let generation = login.generation();
        self.with_state(|m, _| m.login_saved(generation));
        tracing::debug!(generation, "login saved to the store");
        Ok(())
    }

    /// Unlocks within the budget; past it the unlock future is dropped, and the store
    /// finishes the release on its own ([`StoreGuard::unlock`]'s contract).
    async fn release(&self, guard: Box<dyn StoreGuard>, deadline: &mut Deadline) {
        let unlock = guard.unlock();
        if within(unlock, deadline).await.is_none() {
            tracing::warn!("unlocking the token store used up the refresh budget");
        }
    }

    /// One call of the source, bounded by `attempt_timeout`, its panics contained.
    async fn fetch(&self, cx: RefreshContext) -> Result<Token, RefreshError> {
        let source = &self.inner.parts.source;
        let timeout = self.inner.parts.config.attempt_timeout;
        let call = AssertUnwindSafe(source.fetch(cx))
            .catch_unwind()
            .map(|outcome| {
                outcome.unwrap_or_else(|_| {
                    Err(RefreshError::transient_because(
                        Cause::Panicked,
                        "the token source panicked",
                    ))
                })
            });
        let sleep = self.inner.parts.timer.sleep(timeout);
        match future::select(std::pin::pin!(call), sleep).await {
            Either::Left((Ok(token), _)) if !token.is_sendable() => Err(unsendable()),
            Either::Left((result, _)) => result,
            Either::Right(((), _)) => Err(RefreshError::transient_because(
                Cause::Timeout,
                format!("the token source took longer than {timeout:?}"),
            )),
        }
    }

    /// A deadline one flight budget from now ([C10](crate#c10)).
    pub(super) fn budget(&self) -> Deadline {
        Deadline(Some(
            self.inner
                .parts
                .timer
                .sleep(self.inner.parts.config.refresh_timeout),
        ))
    }

    fn out_of_budget(&self, what: &str) -> RefreshError {
        RefreshError::transient_because(
            Cause::Timeout,
            format!(
                "the refresh used up its budget of {:?} ({what})",
                self.inner.parts.config.refresh_timeout
            ),
        )
    }
}

/// What waiting for the store's lock ended with.
enum Locked {
    /// The lock (or the store's error).
    Guard(Result<Box<dyn StoreGuard>, StoreError>),
    /// A pushed token that supersedes the flight; the lock request was dropped.
    Superseded(Arc<Token>),
}

fn adopted_count(flight: &SingleFlight) -> u64 {
    let counters = &flight.inner.counters;
    counters.adopted.load(Ordering::Relaxed) + counters.store_reloads.load(Ordering::Relaxed)
}

/// A flight's token that it did not save itself.
fn unsaved(token: Arc<Token>) -> Flown {
    Flown {
        token,
        saved: false,
    }
}

/// A flight's deadline: a timer sleep that stays ready once it fired. Timers' sleeps
/// (an `async fn` among them) must not be polled again after they completed.
pub(super) struct Deadline(Option<BoxFuture<'static, ()>>);

impl Future for Deadline {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match self.0.as_mut() {
            None => std::task::Poll::Ready(()),
            Some(sleep) => {
                let poll = sleep.as_mut().poll(cx);
                if poll.is_ready() {
                    self.0 = None;
                }
                poll
            }
        }
    }
}

/// Runs `work` unless `deadline` fires first (`None`). `work` is polled first, so work
/// that is ready at once still completes after the deadline.
pub(super) async fn within<T>(work: impl Future<Output = T>, deadline: &mut Deadline) -> Option<T> {
    match future::select(std::pin::pin!(work), deadline).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(((), _)) => None,
    }
}

/// A stored token with a generation at or beyond [`MAX_GENERATION`], or one that cannot
/// be sent ([`Token::is_sendable`]), is corrupt: ignored (the next save replaces it).
pub(super) fn sane(stored: Option<Token>) -> Option<Token> {
    match stored {
        Some(token) if token.generation() >= MAX_GENERATION => {
            tracing::warn!(
                "the stored token's generation is out of range; ignoring it (the next save replaces it)"
            );
            None
        }
        Some(token) if !token.is_sendable() => {
            tracing::warn!(
                "the stored access token has characters no request can carry; ignoring it (the next save replaces it)"
            );
            None
        }
        other => other,
    }
}

/// A source answered with an access token no request can carry ([`Token::is_sendable`]):
/// transient, as a malformed answer of the token endpoint is (the next attempt may get a
/// good one). The message never shows the token.
fn unsendable() -> RefreshError {
    RefreshError::transient_because(
        Cause::TokenSource,
        "the token source returned an access token with characters no HTTP request can carry (control characters or non-ASCII); refused",
    )
}
