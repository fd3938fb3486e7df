//! `SingleFlight`: owns the current token and makes sure at most one refresh runs, that
//! everybody who needs it waits for that one, and that all get the same outcome.
//!
//! Three files, by job:
//! - [`machine`]: the state machine. All of the coordinator's mutable state (the
//!   current token, rejections, aliases, failures, logins, the flight in progress)
//!   and every rule about it, as synchronous transitions with no I/O and no clock.
//! - [`run`]: a flight's I/O as straight-line async code, carrying out the machine's
//!   decisions.
//! - this file: the public API, the lock-free fast path, and waiting.
//!
//! The machine sits behind one `std` mutex, never held across an await
//! ([`SingleFlight::with_state`]). The valid token is also published in an
//! `ArcSwapOption` for the fast path (one atomic load, no lock, no allocation); it is
//! rewritten only under that mutex, from the machine's state. A refresh is a `Shared`
//! future; every waiter holds a clone and whichever waiter is polled drives it, so
//! dropping any waiter — the one that started it included — leaves the others driving
//! the same refresh ([C6](crate#c6)). The machine keeps only a weak handle: when the last
//! waiter leaves and no spawner keeps the flight alive, the refresh is dropped and the
//! next caller starts a fresh one.
//!
//! # Reading map: where each contract's rule lives
//!
//! One place per rule; everything else calls it. `machine` is `machine.rs`, `run` is
//! `run.rs`, `api` is this file.
//!
//! | contract | the rule | enforced by |
//! |---|---|---|
//! | C1 one flight | `machine`: `Machine::join` (one flight slot, started only when empty) | `api`: `join_or_start` holds the lock while it fills the slot |
//! | C2 coalescing | `machine`: `Machine::join` (`Join::Wait` for a live flight) | `api`: `wait` |
//! | C3 stale rejections | `machine`: `Machine::record_rejection` (and `resolve_alias` for renumbered logins) | `api`: `record_rejection` |
//! | C4 one retry | `auth_policy.rs`: the retry driver (resends once, `try_clone`) | `api`: `mark_rejected` marks a non-replayable request's token rejected |
//! | C5 same outcome | `machine`: `Machine::finish` builds the one `FlightOutput` | `api`: `wait` (every waiter reads the same output) |
//! | C6 cancellation | `api`: `started` (spawner keeps the flight) and the flight handle kept weakly by the machine | `run`: `release` (the lock is given back on every path) |
//! | C7 proactive | `machine`: `assess` (`Assessment::WithinLeeway`, `Expired`) | `api`: `valid_token`, `fast_until` |
//! | C8 refresh ahead | `machine`: `assess` (`Assessment::RefreshAhead`), `jittered` | `api`: `refresh_ahead` |
//! | C9 failures, backoff | `machine`: `record_failure`, `backoff_delay`, `failing` | `machine`: `Machine::join` fails fast during backoff; `run`: `finish` emits `Observer::auth_lost` |
//! | C10 bounded | `run`: `within` and the flight's `Deadline` (`budget`) | every store and source call in `run` goes through `within` |
//! | C11 exempt requests | `request.rs`: `SkipAuth`, `ForceRefresh` | `auth_policy.rs`; `api`: `force_refresh` |
//! | C12 secrets | `token.rs`: the redacted secret type; `policy.rs`: allowed origins | `observe.rs` and the spans in `run` carry no secret |
//! | C13 bad input | `token_response.rs`, `jwt.rs`, `www_authenticate.rs`, the stores' decoders | `run`: `sane` rejects a stored token that makes no sense |
//! | C14 runtime-agnostic | `runtime.rs`: the `Clock`, `Timer`, `Spawn` traits | the core's `Cargo.toml` (no runtime dependency) |
//! | C15 timing fits the lifetime | `config.rs`: `leeway_for`, `refresh_ahead_for`, `min_refresh_interval` | `machine`: `assess` |
//! | C16 resilient refresh | `run`: `attempt` (retries inside one budget) | `machine`: `Machine::finish` and `fallback` (a valid token survives a failure) |
//! | C17 the login wins | `machine`: `Machine::install`, `number` (epoch check), `login_to_save`, `token_saved` | `run`: `fetch_and_save` clears the unsaved mark right after the save |
//! | C18 containment | `run`: `run_flight` (`catch_unwind` around the flight) | `api`: `now`, `mono`, `started` (clock and spawner panics) |

#[cfg(test)]
mod explore;
mod machine;
mod run;
mod subscribe;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, WeakShared};

use crate::config::FlightConfig;
use crate::error::{Error, RefreshError};
use crate::observe::{
    FlightJoined, Observers, RefreshStarted, ResendKind, ShorterThanAsked, TokenInstalled,
};
use crate::runtime::{Clock, Spawn, Timer};
use crate::source::{RefreshReason, TokenSource};
use crate::stats::{Counters, Stats, bump};
use crate::store::{StoreError, StoreWatcher, TokenStore};
use crate::token::Token;

use subscribe::{Changes, ChangesOwner};
pub use subscribe::{Subscription, TokenChange};

use machine::{Ask, Assessment, FlightOutput, Join, Machine, Rules, Started, assess, jittered};

type FlightFuture = Shared<BoxFuture<'static, FlightOutput>>;
type WeakFlight = WeakShared<BoxFuture<'static, FlightOutput>>;

/// Everything a `SingleFlight` is built from; see [`crate::FlightBuilder`].
pub(crate) struct Parts {
    pub(crate) config: FlightConfig,
    pub(crate) source: Arc<dyn TokenSource>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timer: Arc<dyn Timer>,
    pub(crate) spawner: Option<Arc<dyn Spawn>>,
    pub(crate) observers: Observers,
    pub(crate) initial_token: Option<Token>,
}

/// The coordinator: one current token, at most one refresh in flight (C1–C18).
///
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct SingleFlight {
    inner: Arc<Inner>,
}

struct Inner {
    parts: Parts,
    rules: Rules,
    /// The machine's current token as the fast path reads it; written only under the
    /// state lock ([`SingleFlight::with_state`]).
    current: ArcSwapOption<Published>,
    /// [`Clock::coarse_lag`], read once; `None`: the fast path reads the precise clock.
    coarse_lag: Option<Duration>,
    /// The one lock: all other mutable state.
    state: Mutex<Machine<WeakFlight>>,
    counters: Counters,
    /// What the store holds a `Weak` to, to push saved tokens here. It points back
    /// weakly: a store never keeps a coordinator alive.
    watcher: Arc<Pushed>,
    /// Notified after the store pushed a token and it was adopted: a flight waiting for
    /// the store's lock wakes and stops waiting if that token supersedes it.
    adopted_push: event_listener::Event,
    /// Token changes for subscribers ([C21](crate#c21)); written only under the state lock.
    changes: ChangesOwner,
    /// How often the state lock was taken (for the test that bounds it per refresh).
    #[cfg(test)]
    locks: std::sync::atomic::AtomicU64,
}

/// The coordinator as a [`StoreWatcher`]: adopts tokens the store pushes.
struct Pushed(Weak<Inner>);

impl StoreWatcher for Pushed {
    fn token_saved(&self, token: Token) {
        if let Some(inner) = self.0.upgrade() {
            SingleFlight { inner }.adopt_pushed(token);
        }
    }
}

/// The current token with what the fast path needs, computed once per token (and
/// again when a server rejects it).
struct Published {
    token: Arc<Token>,
    /// A server rejected it (or a newer one): never handed out again ([C3](crate#c3)).
    rejected: bool,
    /// While the coarse wall clock reads before this, the token is usable and outside
    /// its refresh-ahead window: its expiry minus the larger of the leeway ([C7](crate#c7)) and the
    /// jittered refresh-ahead window ([C8](crate#c8)), minus the coarse clock's lag, as the time
    /// since the Unix epoch. `None`: no expiry, always usable.
    fast_until: Option<Duration>,
}

/// What a caller gets when it asks for a refresh.
enum Joined {
    Ready(Arc<Token>),
    Wait(FlightFuture),
    /// A flight this caller started and the spawner drives: it finishes even if nobody
    /// waits for it ([C6](crate#c6)).
    Spawned(FlightFuture),
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
        let machine = Machine::new(parts.initial_token.take());
        let coarse_lag =
            catch_unwind(AssertUnwindSafe(|| parts.clock.coarse_lag())).unwrap_or(None);
        let rules = Rules {
            config: parts.config.clone(),
            jitter: std::collections::hash_map::RandomState::new(),
        };
        let inner = Arc::new_cyclic(|weak| Inner {
            parts,
            rules,
            current: ArcSwapOption::empty(),
            coarse_lag,
            state: Mutex::new(machine),
            counters: Counters::default(),
            watcher: Arc::new(Pushed(weak.clone())),
            adopted_push: event_listener::Event::new(),
            changes: ChangesOwner(Changes::new()),
            #[cfg(test)]
            locks: std::sync::atomic::AtomicU64::new(0),
        });
        // The store pushes tokens that anyone saves. A store that panics here only
        // loses the push (C18); the coordinator still reads it as before.
        let watcher: Weak<Pushed> = Arc::downgrade(&inner.watcher);
        let store = &inner.parts.store;
        if catch_unwind(AssertUnwindSafe(|| store.watch(watcher))).is_err() {
            tracing::warn!("the token store panicked registering for pushed tokens");
        }
        let flight = SingleFlight { inner };
        // Publishes the initial token, if any.
        flight.with_state(|_, _| ());
        flight
    }

    /// Runs one transition of the state machine under the state lock, then publishes
    /// the current token for the fast path if it changed — still under the lock, so
    /// every write of the published token follows the machine's order.
    fn with_state<R>(&self, f: impl FnOnce(&mut Machine<WeakFlight>, &Rules) -> R) -> R {
        // The machine is consistent at every unlock, so a poisoned lock is still usable.
        let mut machine = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        #[cfg(test)]
        self.inner
            .locks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = f(&mut machine, &self.inner.rules);
        if machine.take_dirty() {
            let published = machine.current().map(|token| {
                let rejected = machine.is_rejected(token.generation());
                Arc::new(self.published(Arc::clone(token), rejected))
            });
            self.inner.current.store(published);
            self.inner.changes.0.token(machine.current());
        }
        result
    }

    /// A token the store pushed because someone saved it: adopted by the machine's
    /// rule ([`machine::Machine::adopt_pushed`]). Ends "re-authentication required"
    /// and any backoff, as a flight that adopted the same token from the store would.
    fn adopt_pushed(&self, token: Token) {
        let Some(token) = run::sane(Some(token)) else {
            return;
        };
        let now = self.now();
        let generation = token.generation();
        let Some(ended_auth_lost) = self.with_state(|m, rules| m.adopt_pushed(rules, token, now))
        else {
            return;
        };
        bump(&self.inner.counters.pushed);
        self.inner.adopted_push.notify(usize::MAX);
        if ended_auth_lost {
            bump(&self.inner.counters.store_reloads);
            tracing::info!(
                generation,
                "adopted a token pushed by the store; re-authentication no longer required"
            );
        } else {
            tracing::debug!(generation, "adopted a token pushed by the store");
        }
    }

    /// `token` as the fast path reads it, with its fast-path limit.
    fn published(&self, token: Arc<Token>, rejected: bool) -> Published {
        let fast_until = self.fast_until(&token);
        Published {
            token,
            rejected,
            fast_until,
        }
    }

    /// See [`Published::fast_until`]. Earlier than the true limit is always safe: the
    /// caller then takes the precise path, which decides as before.
    fn fast_until(&self, token: &Token) -> Option<Duration> {
        let expiry = token.expiry()?;
        let rules = &self.inner.rules;
        let window = rules
            .config
            .refresh_ahead_for(token)
            .map_or(Duration::ZERO, |window| jittered(rules, window, token));
        let margin = rules
            .config
            .leeway_for(token)
            .max(window)
            .saturating_add(self.inner.coarse_lag.unwrap_or(Duration::ZERO));
        // Before the epoch: the fast path never applies.
        Some(
            expiry
                .checked_sub(margin)
                .and_then(|until| until.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// The current token, valid or not, without any check or wait.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner
            .current
            .load()
            .as_ref()
            .map(|published| Arc::clone(&published.token))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The settings in use.
    pub fn config(&self) -> &FlightConfig {
        &self.inner.parts.config
    }

    /// The wall clock; a clock that panics reads as the Unix epoch (tokens then count
    /// as unexpired and the server decides) instead of panicking the caller ([C18](crate#c18)).
    fn now(&self) -> SystemTime {
        let clock = &self.inner.parts.clock;
        catch_unwind(AssertUnwindSafe(|| clock.now())).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The monotonic clock; a clock that panics is replaced by `Instant::now` ([C18](crate#c18)).
    fn mono(&self) -> Instant {
        let clock = &self.inner.parts.clock;
        catch_unwind(AssertUnwindSafe(|| clock.monotonic())).unwrap_or_else(|_| Instant::now())
    }

    /// The published token's assessment on the precise clock.
    fn assess_published(&self, published: &Published, now: SystemTime) -> Assessment {
        assess(
            &self.inner.rules,
            &published.token,
            published.rejected,
            None,
            now,
        )
    }

    /// The current token if it can be sent as it is: present, not rejected by a
    /// server, and not within the leeway of its expiry ([C7](crate#c7), scaled to its lifetime,
    /// [C15](crate#c15)) — or younger than `min_refresh_interval`. Lock-free and allocation-free.
    ///
    /// The check reads the clock's cheap coarse reading ([`Clock::coarse_now`]) while
    /// the token is usable for longer than that reading's lag (a few milliseconds with
    /// the system clock), and the precise wall clock within that lag of the
    /// leeway: [C7](crate#c7) holds exactly, and a wall-clock step is seen at once.
    #[inline]
    pub fn valid_token(&self) -> Option<Arc<Token>> {
        if let Some(token) = self.fast_token() {
            return Some(token);
        }
        let now = self.now();
        let guard = self.inner.current.load();
        let published = guard.as_ref()?;
        self.assess_published(published, now)
            .usable()
            .then(|| Arc::clone(&published.token))
    }

    /// The fast path: the current token if the coarse clock says it is usable and
    /// outside its refresh-ahead window by more than the coarse clock's lag. `None`
    /// means "decide on the precise clock", not "unusable".
    #[inline]
    fn fast_token(&self) -> Option<Arc<Token>> {
        self.inner.coarse_lag?;
        let guard = self.inner.current.load();
        let published = guard.as_ref()?;
        self.fast_usable(published)
            .then(|| Arc::clone(&published.token))
    }

    /// The fast path's verdict on `published`: `true` if usable and outside the
    /// refresh-ahead window by the coarse clock; `false` means "decide on the precise
    /// clock".
    #[inline]
    fn fast_usable(&self, published: &Published) -> bool {
        if self.inner.coarse_lag.is_none() || published.rejected {
            return false;
        }
        let Some(until) = published.fast_until else {
            return true;
        };
        let clock = &self.inner.parts.clock;
        matches!(
            catch_unwind(AssertUnwindSafe(|| clock.coarse_now())),
            Ok(Some(now)) if now < until
        )
    }

    /// [`ready_token`](Self::ready_token) lent to `f` rather than returned: no reference
    /// count is touched. For the middleware, which needs the token only to attach it
    /// and then its generation. `f` runs while the token is held, so it must be short.
    #[inline]
    pub(crate) fn with_ready_token<R>(&self, f: impl FnOnce(&Arc<Token>) -> R) -> Option<R> {
        let guard = self.inner.current.load();
        let published = guard.as_ref()?;
        if self.fast_usable(published) {
            return Some(f(&published.token));
        }
        let now = self.now();
        (self.assess_published(published, now) == Assessment::Fresh).then(|| f(&published.token))
    }

    /// The token [`SingleFlight::token`] returns without waiting or starting anything:
    /// the fast path, else (a clock without a coarse reading, or near the token's limit)
    /// the current token if the precise clock says it is fresh. `None`: the caller must
    /// take the asynchronous path. Allocation-free either way.
    #[inline]
    pub(crate) fn ready_token(&self) -> Option<Arc<Token>> {
        self.with_ready_token(Arc::clone)
    }

    /// A token to send now.
    ///
    /// Fast path: a valid token is returned at once (no lock, no allocation). In the
    /// refresh-ahead window a background refresh starts and the valid token is returned
    /// ([C8](crate#c8)); without a spawner the one caller that starts it drives it and the rest go on.
    /// An expired or missing token waits for the one refresh ([C1](crate#c1), [C2](crate#c2)). If that refresh
    /// fails while the old token has not really expired yet (it was only within the
    /// leeway), the old token is returned ([C16](crate#c16)).
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
    ///     .build()
    ///     .unwrap();
    /// let token = futures::executor::block_on(flight.token()).unwrap();
    /// assert_eq!(token.access().expose(), "secret");
    /// ```
    ///
    /// # Cancellation
    /// Dropping the returned future at any await point never hangs other callers and
    /// never cancels the refresh while anyone else waits for it ([C6](crate#c6)). With a spawner the
    /// refresh also completes when every caller has left.
    ///
    /// The fast path is decided before any asynchronous state is built: on it the
    /// returned future is ready at once. See [`SingleFlight::valid_token`] for the clock
    /// it reads.
    #[inline]
    pub fn token(&self) -> impl Future<Output = Result<Arc<Token>, Error>> + Send + '_ {
        match self.ready_token() {
            Some(token) => TokenFuture::Ready { token: Some(token) },
            // Nothing is decided before the first poll: a future dropped unpolled
            // starts nothing.
            // Inline, not boxed: a parked waiter is one allocation (its task), and
            // waking it touches one block of memory, not two.
            None => TokenFuture::Slow {
                flight: self,
                step: Slow::Start,
            },
        }
    }

    /// The slow path's first step, on the first poll: the token if the precise clock
    /// says it can be sent, else the flight to wait for (or why not).
    fn token_slow(&self) -> Step<'_> {
        let now = self.now();
        let (assessment, current) = match self.inner.current.load().as_ref() {
            Some(published) => (
                Some(self.assess_published(published, now)),
                Some(Arc::clone(&published.token)),
            ),
            None => (None, None),
        };
        let reason = match (assessment, current) {
            (Some(Assessment::Fresh), Some(token)) => return Step::Answer(Ok(token)),
            (Some(Assessment::RefreshAhead), Some(token)) => {
                return Step::Then(Slow::Ahead(Box::pin(self.refresh_ahead(token))));
            }
            (None, _) | (_, None) => RefreshReason::Initial,
            (Some(Assessment::Rejected), _) => RefreshReason::Rejected,
            (Some(_), _) => RefreshReason::Expired,
        };
        let replaces = self.current().map(|t| t.generation());
        let ask = Ask { reason, replaces };
        Slow::joined(ask, self.join_or_start(ask, false))
    }

    /// A token to send now that stays valid for at least `need` after now, plus the
    /// leeway ([C20](crate#c20)): the current token if it lasts that long, else the one
    /// refresh every such caller shares ([C1](crate#c1), [C2](crate#c2)). If no token can
    /// last that long (the token's whole lifetime is shorter than asked), the freshest
    /// token, and observers get [`ShorterThanAsked`].
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async {
    ///         Ok(Token::new("hour").expires_in(Duration::from_secs(3600), SystemTime::now()))
    ///     }))
    ///     .build()
    ///     .unwrap();
    /// let token = futures::executor::block_on(flight.token_valid_for(Duration::from_secs(600)));
    /// let left = token.unwrap().remaining(SystemTime::now()).unwrap();
    /// assert!(left > Duration::from_secs(600));
    /// ```
    ///
    /// # Cancellation
    /// As for [`SingleFlight::token`]: dropping the future never hangs others or cancels
    /// a refresh someone else waits for ([C6](crate#c6)).
    pub async fn token_valid_for(&self, need: Duration) -> Result<Arc<Token>, Error> {
        let token = self.token().await?;
        let token = match self.assess_for(&token, need) {
            Assessment::EndsTooSoon => {
                let ask = Ask {
                    reason: RefreshReason::RefreshAhead,
                    replaces: Some(token.generation()),
                };
                let fresh = self.wait(ask, self.join_or_start(ask, false)).await?;
                if self.assess_for(&fresh, need).usable() {
                    return Ok(fresh);
                }
                fresh
            }
            Assessment::ShorterThanAsked => token,
            _ => return Ok(token),
        };
        self.shorter_than_asked(&token, need);
        Ok(token)
    }

    /// How `token`, just handed out, fares for a request that needs it for `need` after
    /// now ([C20](crate#c20)). Only its lifetime counts here: whether it was rejected is
    /// the next response's business.
    fn assess_for(&self, token: &Token, need: Duration) -> Assessment {
        assess(&self.inner.rules, token, false, Some(need), self.now())
    }

    /// Whether `token` stays valid for `need` after now, plus the leeway ([C20](crate#c20)).
    pub(crate) fn lasts_for(&self, token: &Token, need: Duration) -> bool {
        self.assess_for(token, need).usable()
    }

    fn shorter_than_asked(&self, token: &Token, need: Duration) {
        let remaining = token.remaining(self.now());
        tracing::debug!(
            generation = token.generation(),
            asked_ms = need.as_millis() as u64,
            "the token lasts less than the request asked"
        );
        self.observers().emit(|o| {
            o.token_shorter_than_asked(&ShorterThanAsked {
                generation: token.generation(),
                asked: need,
                remaining,
            })
        });
    }

    async fn refresh_ahead(&self, token: Arc<Token>) -> Arc<Token> {
        let ask = Ask {
            reason: RefreshReason::RefreshAhead,
            replaces: Some(token.generation()),
        };
        let flight = match self.join_or_start(ask, true) {
            // Not spawned (no spawner, or no runtime to spawn on): this caller drives it.
            Joined::Wait(flight) => flight,
            // Spawned, already running, or not allowed now: go on with the valid token.
            _ => return self.with_state(|m, _| m.under_current_number(token)),
        };
        // C9, C16: an error never replaces a still-valid token; after a login the
        // next call takes the login.
        let output = flight.await;
        match output.result {
            Ok(fresh) => fresh,
            Err(_) => self.with_state(|m, _| m.ahead_fallback(output.fallback, token)),
        }
    }

    /// A token to resend a request with, after a server rejected the token of
    /// `rejected_generation`.
    ///
    /// If a newer token already exists the rejection is stale: that token is returned
    /// and no refresh starts ([C3](crate#c3)). Otherwise the token is marked rejected and the caller
    /// waits for the one refresh that supersedes it ([C2](crate#c2)).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let calls = AtomicU32::new(0);
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(move |_cx| {
    ///         let n = calls.fetch_add(1, Ordering::SeqCst);
    ///         async move { Ok(Token::new(format!("token-{n}"))) }
    ///     }))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(async {
    ///     let first = flight.token().await.unwrap();
    ///     // The server rejected `first`: one refresh, a newer token.
    ///     let newer = flight.token_after_rejection(first.generation()).await.unwrap();
    ///     assert!(newer.generation() > first.generation());
    ///     // A late rejection of `first` is stale: the newer token, no second refresh.
    ///     let again = flight.token_after_rejection(first.generation()).await.unwrap();
    ///     assert_eq!(again.generation(), newer.generation());
    /// });
    /// ```
    ///
    /// # Cancellation
    /// As for [`SingleFlight::token`]: dropping the future never hangs others or cancels
    /// a refresh someone else waits for ([C6](crate#c6)).
    pub async fn token_after_rejection(
        &self,
        rejected_generation: u64,
    ) -> Result<Arc<Token>, Error> {
        self.token_after_rejection_kind(rejected_generation)
            .await
            .map(|(token, _)| token)
    }

    /// [`SingleFlight::token_after_rejection`], also saying whether the rejection was
    /// stale (a newer token already existed).
    pub(crate) async fn token_after_rejection_kind(
        &self,
        rejected_generation: u64,
    ) -> Result<(Arc<Token>, ResendKind), Error> {
        let rejected_generation = match self.record_rejection(rejected_generation) {
            Ok(token) => return Ok((token, ResendKind::Stale)),
            Err(generation) => generation,
        };
        let ask = Ask {
            reason: RefreshReason::Rejected,
            replaces: Some(rejected_generation),
        };
        self.wait(ask, self.join_or_start(ask, false))
            .await
            .map(|token| (token, ResendKind::Fresh))
    }

    /// A server rejected `generation`: `Ok` with the newer token if the rejection is
    /// stale ([C3](crate#c3)), else `Err` with the generation it concerns, now marked rejected.
    fn record_rejection(&self, generation: u64) -> Result<Arc<Token>, u64> {
        bump(&self.inner.counters.rejections);
        let now = self.now();
        let (generation, stale) = self.with_state(|m, rules| {
            let generation = m.resolve_alias(generation);
            (generation, m.record_rejection(rules, generation, now))
        });
        let Some(token) = stale else {
            return Err(generation);
        };
        bump(&self.inner.counters.stale_rejections);
        tracing::debug!(
            rejected_generation = generation,
            current_generation = token.generation(),
            "stale rejection: resending with the current token"
        );
        Ok(token)
    }

    /// Records that a server rejected the token of `generation` without waiting for a
    /// new one (a request that cannot be resent, [C4](crate#c4)). The next caller gets a new token;
    /// with a spawner the refresh starts now.
    pub fn mark_rejected(&self, generation: u64) {
        bump(&self.inner.counters.not_replayable);
        let Err(generation) = self.record_rejection(generation) else {
            return;
        };
        if self.inner.parts.spawner.is_none() {
            return;
        }
        // The spawner drives the flight; this caller does not wait.
        let ask = Ask {
            reason: RefreshReason::Rejected,
            replaces: Some(generation),
        };
        let _ = self.join_or_start(ask, false);
    }

    /// Refreshes even though the current token may be valid ([C11](crate#c11)), joining a refresh
    /// already in flight.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let calls = AtomicU32::new(0);
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(move |_cx| {
    ///         let n = calls.fetch_add(1, Ordering::SeqCst);
    ///         async move { Ok(Token::new(format!("token-{n}"))) }
    ///     }))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(async {
    ///     let valid = flight.token().await.unwrap();
    ///     let forced = flight.force_refresh().await.unwrap();
    ///     assert_eq!(forced.access().expose(), "token-1");
    ///     assert!(forced.generation() > valid.generation());
    /// });
    /// ```
    ///
    /// # Cancellation
    /// As for [`SingleFlight::token`]: dropping the future never hangs others or cancels
    /// a refresh someone else waits for ([C6](crate#c6)).
    pub async fn force_refresh(&self) -> Result<Arc<Token>, Error> {
        let ask = Ask {
            reason: RefreshReason::Forced,
            replaces: self.current().map(|t| t.generation()),
        };
        self.wait(ask, self.join_or_start(ask, false)).await
    }

    /// Installs a token from outside (a new login). Ends "re-authentication required"
    /// and any backoff ([C9](crate#c9)).
    ///
    /// A login is the user's latest intent ([C17](crate#c17)): it is numbered above every token
    /// known here and in the store, used at once by this process, and saved under the
    /// store's lock (so other processes and replicas see it). A flight that started
    /// before it can neither replace it nor fail it. The whole call is bounded by the
    /// flight budget (`refresh_timeout`).
    ///
    /// An error means the login could not be saved: it is still in use here, and the
    /// next flight tries to save it again.
    ///
    /// ```
    /// use tokenflight::{Error, RefreshError, SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Err(RefreshError::permanent("invalid_grant")) }))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(async {
    ///     // The refresh token was revoked: re-authentication required.
    ///     assert!(flight.token().await.is_err());
    ///     assert!(matches!(flight.token().await, Err(Error::ReauthenticationRequired { .. })));
    ///     // A new login ends it.
    ///     flight.install(Token::new("from-login")).await.unwrap();
    ///     assert_eq!(flight.token().await.unwrap().access().expose(), "from-login");
    /// });
    /// ```
    ///
    /// # Cancellation
    /// The token is in use in this process from the first poll. If dropped before the
    /// store's save completes, the store may or may not hold it; the next flight saves
    /// it if not.
    pub async fn install(&self, token: Token) -> Result<Arc<Token>, StoreError> {
        let installed = self.with_state(|m, _| m.install(token));
        tracing::info!(generation = installed.generation(), "token installed");
        self.observers().emit(|o| {
            o.token_installed(&TokenInstalled {
                generation: installed.generation(),
            })
        });
        let saved = AssertUnwindSafe(self.save_login())
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(StoreError::Other("the token store panicked".into())))?;
        Ok(saved.unwrap_or(installed))
    }

    /// A stream of this coordinator's token changes, for connections that stay open
    /// and must re-authenticate or reconnect when the token changes ([C21](crate#c21)):
    /// each new generation (a refresh, a login, a token adopted from the store or pushed
    /// by another replica) and "re-authentication required" as
    /// [`TokenChange::AuthLost`]. Lossy but latest: a slow subscriber skips to the
    /// newest change, never sees an older generation after a newer one. The first item
    /// is the current token, if any. The stream ends when the coordinator is dropped.
    /// Runtime-free; a subscription is a few words and no task.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// use tokenflight::subscribe::TokenChange;
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("fresh")) }))
    ///     .build()
    ///     .unwrap();
    /// let mut changes = flight.subscribe();
    /// futures::executor::block_on(async {
    ///     let token = flight.force_refresh().await.unwrap();
    ///     let Some(TokenChange::Token(seen)) = changes.next().await else { panic!() };
    ///     assert_eq!(seen.generation(), token.generation());
    ///     drop(flight);
    ///     assert!(changes.next().await.is_none());
    /// });
    /// ```
    pub fn subscribe(&self) -> Subscription {
        self.inner.changes.subscribe()
    }

    /// How many subscriptions are alive (a keyed map never evicts a coordinator with
    /// subscribers: their streams would end while the key is still in use).
    pub(crate) fn subscribers(&self) -> usize {
        Arc::strong_count(&self.inner.changes.0) - 1
    }

    /// Whether "re-authentication required" is in force.
    pub fn is_auth_lost(&self) -> bool {
        self.with_state(|m, _| m.is_auth_lost())
    }

    /// Whether a refresh is running now (a keyed map never evicts such a coordinator).
    pub(crate) fn refresh_running(&self) -> bool {
        let live = self.with_state(|m, _| m.flight.as_ref().and_then(|(_, f)| f.upgrade()));
        live.is_some()
    }

    /// How many handles to this coordinator exist (clones of it, and a running flight's
    /// own). A keyed map that holds the only one knows nobody else can be using it.
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    pub(crate) fn observers(&self) -> &Observers {
        &self.inner.parts.observers
    }

    pub(crate) fn count_retry(&self) {
        bump(&self.inner.counters.retries);
    }

    /// A usable token newer than what `ask` replaces, by the machine's rule
    /// ([`machine::Machine::superseded`]). Lock-free unless the published token could
    /// be one: only a token newer than the one replaced can supersede it.
    fn superseded_now(&self, ask: Ask) -> Option<Arc<Token>> {
        if ask.reason == RefreshReason::Forced {
            return None;
        }
        let candidate = self.inner.current.load().as_ref().is_some_and(|published| {
            !published.rejected
                && ask
                    .replaces
                    .is_none_or(|g| published.token.generation() > g)
        });
        if !candidate {
            return None;
        }
        let now = self.now();
        self.with_state(|m, rules| m.superseded(rules, ask, now))
    }

    /// Joins the flight in progress, or starts one, or says why not ([C1](crate#c1), [C2](crate#c2), [C9](crate#c9)).
    /// `only_if_idle` is for refresh-ahead: never wait on someone else's flight.
    fn join_or_start(&self, ask: Ask, only_if_idle: bool) -> Joined {
        let now = self.now();
        let mono = self.mono();
        // Strong handles leave the lock before they are dropped: dropping the last one
        // drops the flight.
        let mut flight = None;
        let decision = self.with_state(|m, rules| {
            let live = m
                .flight
                .as_ref()
                .and_then(|(id, weak)| weak.upgrade().map(|f| (*id, f)));
            let decision = m.join(
                rules,
                ask,
                only_if_idle,
                live.as_ref().map(|l| l.0),
                now,
                mono,
            );
            if let Join::Start(started) = decision {
                let shared = self.clone().run_flight(started).boxed().shared();
                // `downgrade` is `None` only for a completed future; this one was never polled.
                m.flight = shared.downgrade().map(|weak| (started.id, weak));
                flight = Some(shared);
            } else {
                flight = live.map(|(_, f)| f);
            }
            decision
        });
        match (decision, flight) {
            (Join::Ready(token), _) => Joined::Ready(token),
            (Join::Failed(error), _) => Joined::Failed(error),
            (Join::Busy, Some(flight)) => Joined::Busy(flight),
            (Join::Wait(id), Some(flight)) => {
                bump(&self.inner.counters.coalesced);
                tracing::trace!(reason = ?ask.reason, "joined the refresh in flight");
                let reason = ask.reason;
                self.observers()
                    .emit(|o| o.flight_joined(&FlightJoined { flight: id, reason }));
                Joined::Wait(flight)
            }
            (Join::Start(started), Some(flight)) => self.started(started, flight),
            // The machine saw a live flight only when the handle upgraded.
            (_, None) => Joined::Failed(Error::Refresh(RefreshError::transient(
                "the refresh in flight ended while joining it",
            ))),
        }
    }

    /// A flight started: counts and announces it, hands it to the spawner if any.
    fn started(&self, started: Started, flight: FlightFuture) -> Joined {
        let (id, kind, ask) = (started.id, started.kind, started.ask);
        bump(&self.inner.counters.flights);
        tracing::debug!(?kind, flight = id, "refresh started");
        self.observers().emit(|o| {
            o.refresh_started(&RefreshStarted {
                reason: kind.reason(),
                replaces: ask.replaces,
                flight: id,
            })
        });
        if let Some(spawner) = &self.inner.parts.spawner {
            let task = flight.clone().map(drop).boxed();
            // A spawner that panics leaves the flight to its waiters (C18); one that finds
            // no runtime to spawn on right now does too.
            match catch_unwind(AssertUnwindSafe(|| spawner.spawn(task))) {
                Ok(true) => return Joined::Spawned(flight),
                Ok(false) => tracing::debug!(
                    flight = id,
                    "no runtime to spawn on; waiters drive the refresh"
                ),
                Err(_) => tracing::warn!(
                    flight = id,
                    "the spawner panicked; waiters drive the refresh"
                ),
            }
        }
        Joined::Wait(flight)
    }

    /// Waits for the flight (again, after a login superseded it) and turns its output
    /// into this caller's answer ([C5](crate#c5), [C16](crate#c16), [C17](crate#c17)).
    async fn wait(&self, mut ask: Ask, mut joined: Joined) -> Result<Arc<Token>, Error> {
        loop {
            let flight = match joined {
                Joined::Ready(token) => return Ok(token),
                Joined::Failed(error) => return Err(error),
                Joined::Wait(flight) | Joined::Spawned(flight) | Joined::Busy(flight) => flight,
            };
            match self.answer(&mut ask, flight.await) {
                Answer::Done(result) => return result,
                Answer::Again(again) => joined = again,
            }
        }
    }

    /// A flight's output as the answer to the caller who asked `ask`, or the next
    /// flight to wait for after a login superseded it ([C5](crate#c5), [C16](crate#c16),
    /// [C17](crate#c17)).
    ///
    /// Inline: every waiter of a flight runs this as it resumes, most of them on the
    /// first branch; the login's case is out of line.
    #[inline]
    fn answer(&self, ask: &mut Ask, output: FlightOutput) -> Answer {
        if output.superseded {
            return self.answer_superseded(ask);
        }
        Answer::Done(match (output.result, output.fallback) {
            (Ok(token), _) => Ok(token),
            // C16: a token that has not really expired is still worth sending.
            (Err(_), Some(token)) if ask.reason != RefreshReason::Forced => Ok(token),
            (Err(error), _) if error.is_permanent() => {
                Err(Error::ReauthenticationRequired { cause: error })
            }
            (Err(error), _) => Err(Error::Refresh(error)),
        })
    }

    /// [`SingleFlight::answer`] for a flight a login superseded ([C17](crate#c17)): the
    /// login serves this caller if it is usable (and newer than what the caller
    /// replaces); otherwise a flight started after the login does. Each login can send
    /// a caller round once.
    #[cold]
    #[inline(never)]
    fn answer_superseded(&self, ask: &mut Ask) -> Answer {
        let now = self.now();
        let (served, resolved) = self.with_state(|m, rules| {
            let resolved = ask.replaces.map(|g| m.resolve_alias(g));
            (m.login_serves(rules, *ask, now), resolved)
        });
        if let Some(token) = served {
            return Answer::Done(Ok(token));
        }
        ask.replaces = resolved;
        Answer::Again(self.join_or_start(*ask, false))
    }
}

/// What a waiter does with a flight's output.
enum Answer {
    Done(Result<Arc<Token>, Error>),
    /// A login superseded the flight and does not serve this caller: wait for this.
    Again(Joined),
}

/// The steps of [`SingleFlight::token`]'s slow path, written out by hand rather than
/// as an `async fn`: a parked waiter holds only the flight handle and what it asked.
enum Slow<'a> {
    /// Not polled yet.
    Start,
    /// Waiting for the flight that answers `ask`.
    Waiting { ask: Ask, flight: FlightFuture },
    /// The token is in its refresh-ahead window: the one caller that starts the refresh
    /// (without a spawner) drives it; rare, so boxed.
    Ahead(BoxFuture<'a, Arc<Token>>),
    /// Answered.
    Done,
}

/// The next step of the slow path: the answer, or a step to poll.
enum Step<'a> {
    Answer(Result<Arc<Token>, Error>),
    Then(Slow<'a>),
}

impl<'a> Slow<'a> {
    /// The step after joining: the answer at once, or the flight to wait for.
    fn joined(ask: Ask, joined: Joined) -> Step<'a> {
        match joined {
            Joined::Ready(token) => Step::Answer(Ok(token)),
            Joined::Failed(error) => Step::Answer(Err(error)),
            Joined::Wait(flight) | Joined::Spawned(flight) | Joined::Busy(flight) => {
                Step::Then(Slow::Waiting { ask, flight })
            }
        }
    }

    fn poll(
        &mut self,
        flight: &'a SingleFlight,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Arc<Token>, Error>> {
        use std::task::Poll;
        loop {
            let step = match self {
                Slow::Start => flight.token_slow(),
                Slow::Waiting {
                    ask,
                    flight: shared,
                } => {
                    let Poll::Ready(output) = shared.poll_unpin(cx) else {
                        return Poll::Pending;
                    };
                    match flight.answer(ask, output) {
                        // Straight out, as most waiters leave: the handle goes now.
                        Answer::Done(result) => {
                            *self = Slow::Done;
                            return Poll::Ready(result);
                        }
                        Answer::Again(joined) => Slow::joined(*ask, joined),
                    }
                }
                Slow::Ahead(ahead) => match ahead.poll_unpin(cx) {
                    Poll::Ready(token) => Step::Answer(Ok(token)),
                    Poll::Pending => return Poll::Pending,
                },
                Slow::Done => return Poll::Pending,
            };
            match step {
                // Dropped here, not when the caller drops this future: the flight
                // handle goes as soon as the answer is known.
                Step::Answer(answer) => {
                    *self = Slow::Done;
                    return Poll::Ready(answer);
                }
                Step::Then(next) => *self = next,
            }
        }
    }
}

/// What [`SingleFlight::token`] returns: a token ready at once (the fast path, no
/// async state built) or the slow path: the coordinator and the step it is at.
enum TokenFuture<'a> {
    Ready {
        token: Option<Arc<Token>>,
    },
    Slow {
        flight: &'a SingleFlight,
        step: Slow<'a>,
    },
}

impl Future for TokenFuture<'_> {
    type Output = Result<Arc<Token>, Error>;

    #[inline]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            TokenFuture::Ready { token } => match token.take() {
                Some(token) => std::task::Poll::Ready(Ok(token)),
                None => std::task::Poll::Pending,
            },
            TokenFuture::Slow { flight, step } => step.poll(flight, cx),
        }
    }
}
