//! `SingleFlight`: owns the current token and makes sure at most one refresh runs, that
//! everybody who needs it waits for that one, and that all get the same outcome.
//!
//! How it works: the valid token sits in an `ArcSwapOption` (the fast path is one atomic
//! load, no lock, no allocation). A refresh is a `Shared` future; every waiter holds a
//! clone and whichever waiter is polled drives it, so dropping any waiter — the one that
//! started it included — leaves the others driving the same refresh ([C6](crate#c6)). The state
//! keeps only a weak handle: when the last waiter leaves and no spawner keeps the flight
//! alive, the refresh is dropped and the next caller starts a fresh one. The std mutex
//! around the state is never held across an await, and every write of the current
//! token happens under it.
//!
//! A flight has one time budget ([C10](crate#c10), [C16](crate#c16)): the store's lock, load, every source
//! attempt with the delays between them, save and unlock all race one deadline.
//! Transient failures are retried inside the flight; only when its attempts are used
//! up does the coordinator back off, on the monotonic clock. A panic anywhere in the
//! flight (source, store, clock, timer) ends it with a typed error for every waiter
//! ([C18](crate#c18)). A login (initial token or `install`) is numbered above everything known,
//! saved under the store's lock, and no flight that started before it may replace it,
//! fail it or fire the auth-lost hook ([C17](crate#c17)).

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::{self, BoxFuture, Either, Shared, WeakShared};
use tracing::Instrument;

use crate::config::FlightConfig;
use crate::error::{Cause, Error, RefreshError};
use crate::observe::{
    AttemptFailed, AuthLost, FlightJoined, Observers, Outcome, RefreshFinished, RefreshStarted,
    ResendKind, TokenInstalled,
};
use crate::runtime::{Clock, Spawn, Timer};
use crate::source::{RefreshContext, RefreshReason, TokenSource};
use crate::stats::{Counters, Stats, bump};
use crate::store::MAX_GENERATION;
use crate::store::{StoreError, StoreGuard, StoreWatcher, TokenStore};
use crate::token::Token;

/// What every waiter of a flight gets ([C5](crate#c5)): the outcome, and for a failure the token
/// that was still valid when the flight ended (callers that did not force the refresh
/// use it instead of failing, [C16](crate#c16)).
#[derive(Clone)]
struct FlightOutput {
    result: Result<Arc<Token>, RefreshError>,
    fallback: Option<Arc<Token>>,
    /// A login arrived while the flight ran: its outcome does not count ([C17](crate#c17)); each
    /// waiter takes the login, or joins a new flight if the login does not serve it.
    superseded: bool,
}

type FlightFuture = Shared<BoxFuture<'static, FlightOutput>>;

/// A hook called once when the coordinator enters "re-authentication required" ([C9](crate#c9)).
pub(crate) type AuthLostHook = Arc<dyn Fn(&RefreshError) + Send + Sync>;

/// Everything a `SingleFlight` is built from; see [`crate::FlightBuilder`].
pub(crate) struct Parts {
    pub(crate) config: FlightConfig,
    pub(crate) source: Arc<dyn TokenSource>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timer: Arc<dyn Timer>,
    pub(crate) spawner: Option<Arc<dyn Spawn>>,
    pub(crate) on_auth_lost: Option<AuthLostHook>,
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
    current: ArcSwapOption<Published>,
    /// [`Clock::coarse_lag`], read once; `None`: the fast path reads the precise clock.
    coarse_lag: Option<Duration>,
    /// Highest generation a server rejected; such a token is never handed out again.
    rejected: AtomicU64,
    state: Mutex<State>,
    /// Logins renumbered above a store's older session: `(old, new)` generations of the
    /// same secrets, so a rejection of the old number counts for the new one ([C3](crate#c3), [C4](crate#c4)).
    /// Locked after `state` when both are held, never the other way round.
    aliases: Mutex<Vec<(u64, u64)>>,
    counters: Counters,
    /// Per-coordinator random keys for the refresh-ahead jitter (issue 20).
    jitter: std::collections::hash_map::RandomState,
    /// What the store holds a `Weak` to, to push saved tokens here (issue 20). It
    /// points back weakly: a store never keeps a coordinator alive.
    watcher: Arc<Pushed>,
}

/// The coordinator as a [`StoreWatcher`]: adopts tokens the store pushes (issue 20).
struct Pushed(Weak<Inner>);

impl StoreWatcher for Pushed {
    fn token_saved(&self, token: Token) {
        if let Some(inner) = self.0.upgrade() {
            SingleFlight { inner }.adopt_pushed(token);
        }
    }
}

/// The current token with what the fast path needs, computed once per token (issue 18).
struct Published {
    token: Arc<Token>,
    /// While the coarse wall clock reads before this, the token is usable and outside
    /// its refresh-ahead window: its expiry minus the larger of the leeway ([C7](crate#c7)) and the
    /// jittered refresh-ahead window ([C8](crate#c8)), minus the coarse clock's lag, as the time
    /// since the Unix epoch. `None`: no expiry, always usable.
    fast_until: Option<Duration>,
}

#[derive(Default)]
struct State {
    flight: Option<(u64, WeakShared<BoxFuture<'static, FlightOutput>>)>,
    failure: Failure,
    consecutive_failures: u32,
    next_flight_id: u64,
    /// The highest generation handed to a token so far: a login installed while a
    /// refresh is in flight must not get the refresh's generation ([C3](crate#c3) tells tokens
    /// apart by generation).
    last_generation: u64,
    /// Bumped by every login: a flight that started under an older epoch must not
    /// replace the login, fail it, or fire the auth-lost hook ([C17](crate#c17)).
    login_epoch: u64,
    /// The generation of a login (initial token or `install`) not yet saved to the
    /// store; the next flight saves it, numbered above whatever the store holds.
    unsaved_login: Option<u64>,
    /// What this coordinator last found in the store since the unsaved login was
    /// installed (`None`: not looked yet). A stored record other than this one was saved
    /// after that look, by another process: not an older session (see `reload`).
    store_seen: Option<Seen>,
    /// The token source's last answer in the running flight, if it was a failure with a
    /// `Retry-After`: when (monotonic) and how long. A flight that then ends with
    /// another failure (a store call that panicked or failed, the budget) still keeps
    /// the source quiet that long ([C9](crate#c9)); a later answer of the source
    /// replaces it.
    source_retry_after: Option<(Instant, Duration)>,
}

impl State {
    /// Notes what the store held (`None`: nothing usable) when looked at while a login
    /// is unsaved.
    fn saw_in_store(&mut self, stored: Option<&Token>) {
        if self.unsaved_login.is_some() {
            self.store_seen = Some(Seen::of(stored));
        }
    }
}

/// A stored record as a coordinator saw it: its generation and a fingerprint of its
/// access secret (an in-memory hash, never shown). Compared as a whole: a record other
/// than the one seen was written after the look — by generation alone that is missed
/// when the store's numbering started again (a corrupt record, which the next save
/// replaces, takes the store's highest generation with it).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    generation: u64,
    fingerprint: u64,
}

impl Seen {
    fn of(stored: Option<&Token>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        stored
            .map(|token| token.access().expose())
            .hash(&mut hasher);
        Seen {
            generation: stored.map_or(0, Token::generation),
            fingerprint: hasher.finish(),
        }
    }
}

#[derive(Default)]
enum Failure {
    #[default]
    None,
    /// Fail fast until `until` (monotonic: a wall-clock step neither stretches nor
    /// cancels it, [C16](crate#c16)).
    Backoff { until: Instant, error: RefreshError },
    /// Re-authentication required. At most once per `min_refresh_interval` (counted
    /// from `checked`) a caller looks in the store for a login saved elsewhere ([C17](crate#c17)).
    AuthLost {
        error: RefreshError,
        checked: Instant,
    },
}

/// What a flight does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlightKind {
    /// Replace a token (or get a first one).
    Refresh(RefreshReason),
    /// Re-authentication is required: look in the store for a login saved by another
    /// process or replica; never call the source.
    Reload,
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
        let mut state = State::default();
        // The initial token is a login: the user's latest intent. It is saved by the
        // first flight, numbered above whatever the store holds (C17). It is not
        // stamped as obtained now: it may come from an earlier session.
        let initial = parts.initial_token.take().map(|token| {
            let generation = token.generation().clamp(1, MAX_GENERATION - 1);
            state.last_generation = generation;
            state.unsaved_login = Some(generation);
            Arc::new(token.with_generation(generation))
        });
        let coarse_lag =
            catch_unwind(AssertUnwindSafe(|| parts.clock.coarse_lag())).unwrap_or(None);
        let inner = Arc::new_cyclic(|weak| Inner {
            parts,
            current: ArcSwapOption::empty(),
            coarse_lag,
            rejected: AtomicU64::new(0),
            state: Mutex::new(state),
            aliases: Mutex::new(Vec::new()),
            counters: Counters::default(),
            jitter: std::collections::hash_map::RandomState::new(),
            watcher: Arc::new(Pushed(weak.clone())),
        });
        // Issue 20: the store pushes tokens that anyone saves. A store that panics
        // here only loses the push (C18); the coordinator still reads it as before.
        let watcher: Weak<Pushed> = Arc::downgrade(&inner.watcher);
        let store = &inner.parts.store;
        if catch_unwind(AssertUnwindSafe(|| store.watch(watcher))).is_err() {
            tracing::warn!("the token store panicked registering for pushed tokens");
        }
        let flight = SingleFlight { inner };
        if let Some(initial) = initial {
            flight.set_current(initial);
        }
        flight
    }

    /// A token the store pushed because someone saved it (issue 20): adopted by the
    /// rule of the unlocked read of the store — usable, not a corrupt generation,
    /// newer than the one held (and than any this coordinator numbered), and never
    /// over a login not yet saved ([C17](crate#c17)). Checked
    /// and stored under the state lock, as every write of the current token is, so a
    /// login installed concurrently is either seen here or installed after (and then
    /// numbered above this token). Wakes nobody: a flight in progress finishes by its
    /// own rules and finds this token current (it is then superseded, [C2](crate#c2), [C3](crate#c3)).
    ///
    /// Ends "re-authentication required" and any backoff, as a flight that adopted
    /// the same token from the store would.
    fn adopt_pushed(&self, token: Token) {
        let Some(token) = sane(Some(token)) else {
            return;
        };
        let now = self.now();
        if !self.is_usable(&token, now) {
            return;
        }
        let token = Arc::new(stamp(token, now));
        let ended_auth_lost = {
            let mut state = self.lock_state();
            if state.unsaved_login.is_some() {
                return;
            }
            // Newer than anything numbered here too: a flight of this coordinator that
            // is saving its own token (numbered, not yet current) gets that token back
            // from the store's push, and ignores it.
            let held = self.current().map_or(0, |cur| cur.generation());
            if token.generation() <= held.max(state.last_generation) {
                return;
            }
            self.set_current(Arc::clone(&token));
            state.last_generation = state.last_generation.max(token.generation());
            state.consecutive_failures = 0;
            matches!(std::mem::take(&mut state.failure), Failure::AuthLost { .. })
        };
        bump(&self.inner.counters.pushed);
        if ended_auth_lost {
            bump(&self.inner.counters.store_reloads);
            tracing::info!(
                generation = token.generation(),
                "adopted a token pushed by the store; re-authentication no longer required"
            );
        } else {
            tracing::debug!(
                generation = token.generation(),
                "adopted a token pushed by the store"
            );
        }
    }

    /// Makes `token` the current token, with its fast-path limit.
    fn set_current(&self, token: Arc<Token>) {
        let fast_until = self.fast_until(&token);
        self.inner
            .current
            .store(Some(Arc::new(Published { token, fast_until })));
    }

    /// See [`Published::fast_until`]. Earlier than the true limit is always safe: the
    /// caller then takes the precise path, which decides as before.
    fn fast_until(&self, token: &Token) -> Option<Duration> {
        let expiry = token.expiry()?;
        let config = &self.inner.parts.config;
        let window = config
            .refresh_ahead_for(token)
            .map_or(Duration::ZERO, |window| self.jittered(window, token));
        let margin = config
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
        read_wall(&*self.inner.parts.clock)
    }

    /// The monotonic clock; a clock that panics is replaced by `Instant::now` ([C18](crate#c18)).
    fn mono(&self) -> Instant {
        let clock = &self.inner.parts.clock;
        catch_unwind(AssertUnwindSafe(|| clock.monotonic())).unwrap_or_else(|_| Instant::now())
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
        match self.fast_token() {
            Some(token) => Some(token),
            None => self.usable_at(self.now()),
        }
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
        if self.inner.coarse_lag.is_none() || !self.not_rejected(&published.token) {
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
    /// and then its generation (issue 18: the count's increment and decrement, on a
    /// line all threads share, were part of the per-request cost). `f` runs while the
    /// token is held, so it must be short.
    #[inline]
    pub(crate) fn with_ready_token<R>(&self, f: impl FnOnce(&Arc<Token>) -> R) -> Option<R> {
        let guard = self.inner.current.load();
        let published = guard.as_ref()?;
        let token = &published.token;
        if self.fast_usable(published) {
            return Some(f(token));
        }
        let now = self.now();
        (self.is_usable(token, now) && !self.in_refresh_ahead_window(token, now)).then(|| f(token))
    }

    /// The token [`SingleFlight::token`] returns without waiting or starting anything:
    /// the fast path, else (a clock without a coarse reading, or near the token's limit)
    /// the current token if the precise clock says it is usable and outside its
    /// refresh-ahead window. `None`: the caller must take the asynchronous path.
    /// Allocation-free either way.
    #[inline]
    pub(crate) fn ready_token(&self) -> Option<Arc<Token>> {
        self.with_ready_token(Arc::clone)
    }

    fn usable_at(&self, now: SystemTime) -> Option<Arc<Token>> {
        let guard = self.inner.current.load();
        let token = &guard.as_ref()?.token;
        if self.is_usable(token, now) {
            Some(Arc::clone(token))
        } else {
            None
        }
    }

    // Inlined: it is on the fast path (a separate call was 5 % of `valid_token`).
    #[inline]
    fn not_rejected(&self, token: &Token) -> bool {
        token.generation() > self.inner.rejected.load(Ordering::Acquire)
    }

    /// Younger than `min_refresh_interval`: used whatever its expiry says ([C15](crate#c15)).
    fn is_young(&self, token: &Token, now: SystemTime) -> bool {
        token
            .age(now)
            .is_some_and(|age| age < self.inner.parts.config.min_refresh_interval)
    }

    fn is_usable(&self, token: &Token, now: SystemTime) -> bool {
        let config = &self.inner.parts.config;
        self.not_rejected(token)
            && (self.is_young(token, now) || !token.is_expired(now, config.leeway_for(token)))
    }

    /// Usable without the leeway: not rejected and not yet expired. Callers that
    /// would otherwise fail (a failed flight, backoff) use such a token ([C16](crate#c16)).
    fn still_valid(&self, token: &Token, now: SystemTime) -> bool {
        self.not_rejected(token)
            && (self.is_young(token, now) || !token.is_expired(now, Duration::ZERO))
    }

    fn still_valid_current(&self, now: SystemTime) -> Option<Arc<Token>> {
        self.current().filter(|t| self.still_valid(t, now))
    }

    fn in_refresh_ahead_window(&self, token: &Token, now: SystemTime) -> bool {
        match (
            self.inner.parts.config.refresh_ahead_for(token),
            token.expiry(),
        ) {
            // The jitter only shrinks the window: outside the whole window (nearly every
            // call of the fast path) no hash is computed.
            (Some(window), Some(_)) => {
                token.is_expired(now, window)
                    && !self.is_young(token, now)
                    && token.is_expired(now, self.jittered(window, token))
            }
            _ => false,
        }
    }

    /// `window × f`, `f` in `[1 - refresh_ahead_jitter %, 1]`, fixed per generation and
    /// coordinator: a fleet's replicas start their refresh-ahead at different points.
    fn jittered(&self, window: Duration, token: &Token) -> Duration {
        use std::hash::BuildHasher;
        let percent = self.inner.parts.config.refresh_ahead_jitter.min(100);
        if percent == 0 {
            return window;
        }
        let jitter = f64::from(percent) / 100.0;
        // 53 random bits as a fraction in [0, 1).
        let unit =
            (self.inner.jitter.hash_one(token.generation()) >> 11) as f64 / (1u64 << 53) as f64;
        window.mul_f64(1.0 - jitter * unit)
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
            // Boxed: the fast path's future stays two words, which callers move and
            // store cheaply; only a caller that waits pays for the box. (Tried inline in
            // wave 6: one allocation per waiter instead of two, but the storm's release
            // time did not move (1.35× / 1.10× the bare `Shared` floor at 10,000 /
            // 100,000 waiters, as boxed) and `token().await` on the fast path went from
            // 1.65× to 2.30× `arc_swap_load_full`: the 152-byte future costs there.)
            None => TokenFuture::Slow {
                slow: Box::pin(self.token_slow()),
            },
        }
    }

    async fn token_slow(&self) -> Result<Arc<Token>, Error> {
        let now = self.now();
        if let Some(token) = self.usable_at(now) {
            if self.in_refresh_ahead_window(&token, now) {
                return Ok(self.refresh_ahead(token).await);
            }
            return Ok(token);
        }
        let current = self.current();
        let reason = match &current {
            None => RefreshReason::Initial,
            Some(token) if !self.not_rejected(token) => RefreshReason::Rejected,
            Some(_) => RefreshReason::Expired,
        };
        let replaces = current.map(|t| t.generation());
        self.wait(
            reason,
            replaces,
            self.join_or_start(reason, replaces, false),
        )
        .await
    }

    async fn refresh_ahead(&self, token: Arc<Token>) -> Arc<Token> {
        let flight =
            match self.join_or_start(RefreshReason::RefreshAhead, Some(token.generation()), true) {
                // Not spawned (no spawner, or no runtime to spawn on): this caller drives it.
                Joined::Wait(flight) => flight,
                // Spawned, already running, or not allowed now: go on with the valid token.
                _ => return self.under_current_number(token),
            };
        // C9, C16: an error never replaces a still-valid token; after a login the
        // next call takes the login.
        let output = flight.await;
        match output.result {
            Ok(fresh) => fresh,
            // The token still valid when the flight ended if it is this one or newer,
            // else this caller's own token.
            Err(_) => {
                let generation = self.resolve_alias(token.generation());
                output
                    .fallback
                    .filter(|valid| valid.generation() >= generation)
                    .unwrap_or_else(|| self.under_current_number(token))
            }
        }
    }

    /// `token` under the number it has now. A flight may have renumbered it meanwhile
    /// (an unsaved login or initial token, saved above an older session in the store
    /// with a higher number): the caller must get the number later rejections and
    /// pushes are compared with ([C3](crate#c3)), not the one it read before the flight. Rare:
    /// only then does it copy the token.
    fn under_current_number(&self, token: Arc<Token>) -> Arc<Token> {
        let generation = self.resolve_alias(token.generation());
        if generation == token.generation() {
            return token;
        }
        match self
            .current()
            .filter(|current| current.generation() == generation)
        {
            Some(current) => current,
            None => Arc::new((*token).clone().with_generation(generation)),
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
        let rejected_generation = self.resolve_alias(rejected_generation);
        if let Some(token) = self.record_stale_rejection(rejected_generation) {
            return Ok((token, ResendKind::Stale));
        }
        self.wait(
            RefreshReason::Rejected,
            Some(rejected_generation),
            self.join_or_start(RefreshReason::Rejected, Some(rejected_generation), false),
        )
        .await
        .map(|token| (token, ResendKind::Fresh))
    }

    /// The generation a rejection of `generation` really concerns: a login renumbered
    /// above a store's older session keeps its secrets under a new number.
    fn resolve_alias(&self, mut generation: u64) -> u64 {
        let aliases = self
            .inner
            .aliases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &(old, new) in aliases.iter() {
            if old == generation {
                generation = new;
            }
        }
        generation
    }

    fn record_stale_rejection(&self, rejected_generation: u64) -> Option<Arc<Token>> {
        bump(&self.inner.counters.rejections);
        let now = self.now();
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
                // Nobody can reject a token this coordinator never had: a bogus
                // generation must not block every future token.
                let highest = self.lock_state().last_generation;
                self.inner
                    .rejected
                    .fetch_max(rejected_generation.min(highest), Ordering::AcqRel);
                None
            }
        }
    }

    /// Records that a server rejected the token of `generation` without waiting for a
    /// new one (a request that cannot be resent, [C4](crate#c4)). The next caller gets a new token;
    /// with a spawner the refresh starts now.
    pub fn mark_rejected(&self, generation: u64) {
        bump(&self.inner.counters.not_replayable);
        let generation = self.resolve_alias(generation);
        if self.record_stale_rejection(generation).is_some() || self.inner.parts.spawner.is_none() {
            return;
        }
        // The spawner drives the flight; this caller does not wait.
        let _ = self.join_or_start(RefreshReason::Rejected, Some(generation), false);
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
        let replaces = self.current().map(|t| t.generation());
        self.wait(
            RefreshReason::Forced,
            replaces,
            self.join_or_start(RefreshReason::Forced, replaces, false),
        )
        .await
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
        let installed = self.install_in_memory(token);
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

    fn install_in_memory(&self, token: Token) -> Arc<Token> {
        let mut state = self.lock_state();
        state.login_epoch = state.login_epoch.wrapping_add(1);
        let generation = self
            .next_generation_locked(&mut state, None)
            .max(token.generation().min(MAX_GENERATION - 1));
        state.last_generation = generation;
        let token = Arc::new(token.with_generation(generation));
        // The highest generation there is: no check needed.
        self.set_current(Arc::clone(&token));
        state.failure = Failure::None;
        state.consecutive_failures = 0;
        state.unsaved_login = Some(generation);
        state.store_seen = None;
        token
    }

    /// Saves an unsaved login under the store's lock, within one flight budget.
    async fn save_login(&self) -> Result<Option<Arc<Token>>, StoreError> {
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
        if self.lock_state().unsaved_login.is_none() {
            return Ok(None);
        }
        let stored = within(guard.load(), deadline)
            .await
            .ok_or(StoreError::LockTimeout)??;
        let stored = sane(stored);
        let stored_generation = stored.as_ref().map(Token::generation);
        let login = {
            let mut state = self.lock_state();
            state.saw_in_store(stored.as_ref());
            let Some(generation) = state.unsaved_login else {
                return Ok(None);
            };
            let Some(current) = self.current().filter(|t| t.generation() == generation) else {
                // Replaced meanwhile (a newer login saves itself).
                return Ok(None);
            };
            if stored_generation.is_some_and(|stored| stored >= generation) {
                // An older session in the store has a higher number: renumber the
                // login above it, remembering the old number for rejections.
                let renumbered = self.next_generation_locked(&mut state, stored_generation);
                state.last_generation = renumbered;
                state.unsaved_login = Some(renumbered);
                let token = Arc::new((*current).clone().with_generation(renumbered));
                self.set_current(Arc::clone(&token));
                let mut aliases = self
                    .inner
                    .aliases
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if aliases.len() >= 8 {
                    aliases.remove(0);
                }
                aliases.push((generation, renumbered));
                // A rejection of the old number already counts for the new one.
                if self.inner.rejected.load(Ordering::Acquire) >= generation {
                    self.inner.rejected.fetch_max(renumbered, Ordering::AcqRel);
                }
                tracing::debug!(
                    from = generation,
                    to = renumbered,
                    "login renumbered above the stored session"
                );
                token
            } else {
                current
            }
        };
        within(guard.save(&login), deadline)
            .await
            .ok_or(StoreError::LockTimeout)??;
        let mut state = self.lock_state();
        if state.unsaved_login == Some(login.generation()) {
            state.unsaved_login = None;
        }
        Ok(Some(login))
    }

    /// A generation no token of this coordinator has had yet.
    fn next_generation_locked(&self, state: &mut State, stored: Option<u64>) -> u64 {
        let current = self.current().map_or(0, |t| t.generation());
        let rejected = self.inner.rejected.load(Ordering::Acquire);
        current
            .max(rejected)
            .max(stored.unwrap_or(0).min(MAX_GENERATION - 1))
            .max(state.last_generation)
            .saturating_add(1)
    }

    /// Stores `token` as current unless a newer one is already there. Called with the
    /// state lock held.
    fn publish(&self, token: &Arc<Token>) {
        let newer_present = self
            .inner
            .current
            .load()
            .as_ref()
            .is_some_and(|cur| cur.token.generation() > token.generation());
        if !newer_present {
            self.set_current(Arc::clone(token));
        }
    }

    /// Whether "re-authentication required" is in force.
    pub fn is_auth_lost(&self) -> bool {
        matches!(self.lock_state().failure, Failure::AuthLost { .. })
    }

    /// Whether a refresh is running now (a keyed map never evicts such a coordinator).
    pub(crate) fn refresh_running(&self) -> bool {
        self.lock_state()
            .flight
            .as_ref()
            .is_some_and(|(_, flight)| flight.upgrade().is_some())
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

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the flight in progress, or starts one, or says why not ([C1](crate#c1), [C2](crate#c2), [C9](crate#c9)).
    /// `only_if_idle` is for refresh-ahead: never wait on someone else's flight.
    fn join_or_start(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        only_if_idle: bool,
    ) -> Joined {
        let now = self.now();
        let mono = self.mono();
        let mut state = self.lock_state();
        // A newer token than the one being replaced is already in place: nothing to do.
        // Checked under the lock so a flight that just ended is seen (no second flight).
        if let Some(token) = self.superseded(reason, replaces, now) {
            return Joined::Ready(token);
        }
        if let Some((flight_id, weak)) = &state.flight {
            if let Some(flight) = weak.upgrade() {
                if only_if_idle {
                    return Joined::Busy(flight);
                }
                bump(&self.inner.counters.coalesced);
                tracing::trace!(?reason, "joined the refresh in flight");
                let flight_id = *flight_id;
                drop(state);
                self.observers().emit(|o| {
                    o.flight_joined(&FlightJoined {
                        flight: flight_id,
                        reason,
                    })
                });
                return Joined::Wait(flight);
            }
        }
        let min_interval = self.inner.parts.config.min_refresh_interval;
        let kind = match &mut state.failure {
            Failure::AuthLost { error, checked } => {
                if only_if_idle || mono.saturating_duration_since(*checked) < min_interval {
                    // C16 whatever the failure: a token that has not really expired
                    // still serves, as in backoff; the error only once it has.
                    if reason != RefreshReason::Forced {
                        if let Some(token) = self.still_valid_current(now) {
                            return Joined::Ready(token);
                        }
                    }
                    return Joined::Failed(Error::ReauthenticationRequired {
                        cause: error.clone(),
                    });
                }
                // Another process or replica may have saved a login: look (C17).
                *checked = mono;
                FlightKind::Reload
            }
            Failure::Backoff { until, error } if mono < *until => {
                if reason != RefreshReason::Forced {
                    if let Some(token) = self.still_valid_current(now) {
                        return Joined::Ready(token);
                    }
                }
                return Joined::Failed(Error::BackingOff {
                    last: error.clone(),
                    remaining: until.saturating_duration_since(mono),
                });
            }
            _ => FlightKind::Refresh(reason),
        };
        let id = state.next_flight_id;
        state.next_flight_id = id.wrapping_add(1);
        let epoch = state.login_epoch;
        let flight = run_flight(self.clone(), id, kind, replaces, epoch)
            .boxed()
            .shared();
        // `downgrade` is `None` only for a completed future; this one was never polled.
        state.flight = flight.downgrade().map(|weak| (id, weak));
        drop(state);
        bump(&self.inner.counters.flights);
        tracing::debug!(?kind, flight = id, "refresh started");
        self.observers().emit(|o| {
            o.refresh_started(&RefreshStarted {
                reason: match kind {
                    FlightKind::Refresh(reason) => Some(reason),
                    FlightKind::Reload => None,
                },
                replaces,
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

    /// A usable token newer than the one a refresh for `reason` would replace: then the
    /// refresh is not needed ([C2](crate#c2), [C3](crate#c3)). Checked when a caller asks (under the lock, so a
    /// flight that just ended is seen) and again when a flight runs (a spawned flight
    /// may first run much later, after a login). A forced refresh is never superseded.
    fn superseded(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        if reason == RefreshReason::Forced {
            return None;
        }
        let replaces = replaces.map(|g| self.resolve_alias(g));
        self.usable_at(now)
            .filter(|token| replaces.is_none_or(|g| token.generation() > g))
    }

    async fn wait(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        mut joined: Joined,
    ) -> Result<Arc<Token>, Error> {
        loop {
            let flight = match joined {
                Joined::Ready(token) => return Ok(token),
                Joined::Failed(error) => return Err(error),
                Joined::Wait(flight) | Joined::Spawned(flight) | Joined::Busy(flight) => flight,
            };
            let output = flight.await;
            if output.superseded {
                // C17: the login serves this caller if it is usable (and newer than
                // what the caller replaces); otherwise a flight started after the
                // login does. Each login can send a caller round once.
                let now = self.now();
                let replaces = replaces.map(|g| self.resolve_alias(g));
                let login = self.usable_at(now).filter(|t| {
                    reason == RefreshReason::Forced || replaces.is_none_or(|g| t.generation() > g)
                });
                if let Some(token) = login {
                    return Ok(token);
                }
                joined = self.join_or_start(reason, replaces, false);
                continue;
            }
            return match (output.result, output.fallback) {
                (Ok(token), _) => Ok(token),
                // C16: a token that has not really expired is still worth sending.
                (Err(_), Some(token)) if reason != RefreshReason::Forced => Ok(token),
                (Err(error), _) if error.is_permanent() => {
                    Err(Error::ReauthenticationRequired { cause: error })
                }
                (Err(error), _) => Err(Error::Refresh(error)),
            };
        }
    }

    /// Whether a login happened since `epoch` (then it wins, [C17](crate#c17)).
    fn login_since(&self, epoch: u64) -> bool {
        self.lock_state().login_epoch != epoch
    }

    /// A deadline one flight budget from now ([C10](crate#c10)).
    fn budget(&self) -> Deadline {
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

    /// Ends flight `id`: publishes the token or records the failure, under the lock so
    /// a caller that arrives next sees the outcome ([C5](crate#c5)). Never panics ([C18](crate#c18)).
    fn finish(
        &self,
        id: u64,
        kind: FlightKind,
        epoch: u64,
        result: Result<Arc<Token>, RefreshError>,
    ) -> FlightOutput {
        let now = self.now();
        let mono = self.mono();
        let mut state = self.lock_state();
        if state.flight.as_ref().is_some_and(|(f, _)| *f == id) {
            state.flight = None;
        }
        if state.login_epoch != epoch {
            // A login arrived while this flight ran: the login wins (C17). Nothing
            // this flight got replaces it, and its failure is not the login's.
            drop(state);
            tracing::debug!(flight = id, "flight superseded by a login");
            return FlightOutput {
                result,
                fallback: None,
                superseded: true,
            };
        }
        // Only a login (a new epoch, above) or a pushed token ends "re-authentication
        // required" while a reload runs: the pushed token is then this reload's outcome
        // (issue 20), not a second loss.
        let result = match result {
            Err(error)
                if kind == FlightKind::Reload
                    && !matches!(state.failure, Failure::AuthLost { .. }) =>
            {
                self.usable_at(now).ok_or(error)
            }
            result => result,
        };
        let mut lost = None;
        match &result {
            Ok(token) => {
                self.publish(token);
                state.last_generation = state.last_generation.max(token.generation());
                state.failure = Failure::None;
                state.consecutive_failures = 0;
                tracing::debug!(
                    flight = id,
                    generation = token.generation(),
                    "refresh succeeded"
                );
            }
            Err(error) => {
                if kind != FlightKind::Reload {
                    bump(&self.inner.counters.failures);
                }
                if error.is_permanent() {
                    if !matches!(state.failure, Failure::AuthLost { .. }) {
                        lost = Some(error.clone());
                    }
                    let error = match &state.failure {
                        // A reload found nothing: keep the original cause.
                        Failure::AuthLost { error, .. } => error.clone(),
                        _ => error.clone(),
                    };
                    state.failure = Failure::AuthLost {
                        error,
                        checked: mono,
                    };
                } else {
                    state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                    let backoff = &self.inner.parts.config.backoff;
                    let mut delay = backoff.delay(
                        state.consecutive_failures,
                        fastrand::f64(),
                        error.retry_after(),
                    );
                    // The flight failed otherwise after the source asked for quiet (a
                    // store call panicked, say): the source's `Retry-After` still holds,
                    // counted from its answer (C9).
                    let carried = state
                        .source_retry_after
                        .filter(|_| error.retry_after().is_none());
                    if let Some((at, after)) = carried {
                        let asked = after.min(backoff.max_retry_after);
                        let left = instant_after(at, asked).saturating_duration_since(mono);
                        delay = delay.max(left);
                    }
                    // While the current token still works, the next try must come
                    // before it expires, or callers would fail in the gap (C16). A
                    // server's Retry-After is honoured as it is.
                    if error.retry_after().is_none() && carried.is_none() {
                        let left = self
                            .still_valid_current(now)
                            .and_then(|token| token.remaining(now));
                        if let Some(left) = left {
                            delay = delay.min(left / 2);
                        }
                    }
                    state.failure = Failure::Backoff {
                        until: instant_after(mono, delay),
                        error: error.clone(),
                    };
                }
                if kind != FlightKind::Reload {
                    tracing::warn!(flight = id, error = %error, "refresh failed");
                }
            }
        }
        drop(state);
        let fallback = match &result {
            Ok(_) => None,
            Err(_) => self.still_valid_current(now),
        };
        if let (Some(error), Some(hook)) = (lost.clone(), &self.inner.parts.on_auth_lost) {
            tracing::warn!(error = %error, "re-authentication required");
            // A hook that panics must not take the flight's waiters with it (C18).
            if catch_unwind(AssertUnwindSafe(|| hook(&error))).is_err() {
                tracing::warn!("the on_auth_lost hook panicked");
            }
        }
        if let Some(error) = &lost {
            self.observers().emit(|o| o.auth_lost(&AuthLost { error }));
        }
        FlightOutput {
            result,
            fallback,
            superseded: false,
        }
    }

    /// The flight itself: retries transient failures within one budget ([C16](crate#c16)).
    async fn run(
        &self,
        kind: FlightKind,
        replaces: Option<u64>,
        epoch: u64,
    ) -> Result<Arc<Token>, RefreshError> {
        let started = self.mono();
        let mut deadline = self.budget();
        let reason = match kind {
            FlightKind::Reload => return self.reload(&mut deadline).await,
            FlightKind::Refresh(reason) => reason,
        };
        if let Some(token) = self.superseded(reason, replaces, self.now()) {
            return Ok(token);
        }
        let config = &self.inner.parts.config;
        let mut attempt: u32 = 1;
        loop {
            let error = match self.attempt(reason, replaces, epoch, &mut deadline).await {
                Ok(token) => return Ok(token),
                Err(error) => error,
            };
            if !is_retryable(&error)
                || attempt >= config.retry.max_attempts
                || self.login_since(epoch)
            {
                return Err(error);
            }
            let delay = config
                .retry
                .backoff
                .delay(attempt, fastrand::f64(), error.retry_after());
            let spent = self.mono().saturating_duration_since(started);
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
            let sleep = self.inner.parts.timer.sleep(delay);
            if within(sleep, &mut deadline).await.is_none() {
                return Err(error);
            }
            attempt += 1;
            bump(&self.inner.counters.attempt_retries);
            if let Some(token) = self.superseded(reason, replaces, self.now()) {
                return Ok(token);
            }
        }
    }

    /// Re-authentication is required: adopt a newer usable token from the store (a
    /// login saved by another process or replica), or fail with the same cause ([C17](crate#c17)).
    async fn reload(&self, deadline: &mut Deadline) -> Result<Arc<Token>, RefreshError> {
        let lost = match &self.lock_state().failure {
            Failure::AuthLost { error, .. } => error.clone(),
            // Ended meanwhile: by a login, which supersedes this flight (its waiters
            // take the login), or by a pushed token, which `finish` makes the outcome.
            _ => return Err(superseded_by_login()),
        };
        let stored = match within(self.inner.parts.store.load(), deadline).await {
            Some(Ok(stored)) => sane(stored),
            _ => None,
        };
        // A login not saved yet is newer than anything stored (C17): a stored session
        // is then an older one, perhaps another account's — unless it was saved after
        // this coordinator last looked (it is not the record found then): another
        // replica's login. The unsaved login itself is lost (its refresh failed for
        // good), so that login is what serves now.
        let (stored, unsaved) = {
            let state = self.lock_state();
            let admissible = |stored: &Token| match state.unsaved_login {
                None => true,
                Some(_) => state
                    .store_seen
                    .is_some_and(|seen| Seen::of(Some(stored)) != seen),
            };
            (stored.filter(|t| admissible(t)), state.unsaved_login)
        };
        let now = self.now();
        let current = self.current().map_or(0, |t| t.generation());
        match stored {
            Some(stored) if stored.generation() > current && self.is_usable(&stored, now) => {
                let mut state = self.lock_state();
                if unsaved.is_some() && state.unsaved_login == unsaved {
                    // Replaced by a saved session: nothing of it is left to save.
                    state.unsaved_login = None;
                }
                drop(state);
                bump(&self.inner.counters.store_reloads);
                tracing::info!(
                    generation = stored.generation(),
                    "adopted a login saved to the store; re-authentication no longer required"
                );
                Ok(Arc::new(stamp(stored, now)))
            }
            _ => Err(lost),
        }
    }

    /// One attempt: lock → reload → adopt or fetch → save → unlock.
    async fn attempt(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        epoch: u64,
        deadline: &mut Deadline,
    ) -> Result<Arc<Token>, RefreshError> {
        let store = &self.inner.parts.store;
        // Fleet fast path (issue 20): most often another replica refreshed already, so
        // one read adopts its token without contending for the lock (flat per-replica
        // store work). Same guards as under the lock: an unsaved login is newer than
        // anything stored (C17), a corrupt generation is ignored, and only a usable
        // token newer than ours serves (C3).
        if let Some(token) = self.adopt_unlocked(epoch, deadline).await {
            return Ok(token);
        }
        // The store may have pushed the newer token meanwhile (issue 20): then the read
        // found nothing newer than it, and the lock is not needed either.
        if let Some(token) = self.superseded(reason, replaces, self.now()) {
            return Ok(token);
        }
        let guard = within(store.lock(), deadline)
            .await
            .ok_or_else(|| self.out_of_budget("waiting for the store's refresh lock"))?
            .map_err(store_error)?;
        let result = self
            .attempt_locked(reason, replaces, epoch, &*guard, deadline)
            .await;
        self.release(guard, deadline).await;
        result
    }

    /// Reads the stored token without the lock and returns it if it is usable and
    /// newer than the one in memory. Any store error or a spent budget just falls
    /// through to the locked path, which reports it.
    async fn adopt_unlocked(&self, epoch: u64, deadline: &mut Deadline) -> Option<Arc<Token>> {
        if self.lock_state().unsaved_login.is_some() {
            return None;
        }
        let stored = sane(
            within(self.inner.parts.store.load(), deadline)
                .await?
                .ok()?,
        )?;
        if self.login_since(epoch) || self.lock_state().unsaved_login.is_some() {
            return None;
        }
        let now = self.now();
        let newer = self
            .current()
            .is_none_or(|cur| stored.generation() > cur.generation());
        if !newer || !self.is_usable(&stored, now) {
            return None;
        }
        bump(&self.inner.counters.adopted);
        tracing::debug!(
            generation = stored.generation(),
            "adopted the stored token without the lock"
        );
        Some(Arc::new(stamp(stored, now)))
    }

    /// Unlocks within the budget; past it the unlock future is dropped, and the store
    /// finishes the release on its own ([`StoreGuard::unlock`]'s contract).
    async fn release(&self, guard: Box<dyn StoreGuard>, deadline: &mut Deadline) {
        let unlock = guard.unlock();
        if within(unlock, deadline).await.is_none() {
            tracing::warn!("unlocking the token store used up the refresh budget");
        }
    }

    async fn attempt_locked(
        &self,
        reason: RefreshReason,
        replaces: Option<u64>,
        epoch: u64,
        guard: &dyn StoreGuard,
        deadline: &mut Deadline,
    ) -> Result<Arc<Token>, RefreshError> {
        let store = &self.inner.parts.store;
        // A login not saved yet goes first, numbered above the store's session (C17).
        if let Err(error) = self.save_login_locked(guard, deadline).await {
            tracing::warn!(error = %error, "saving the login failed; it stays in use here");
        }
        let stored = within(guard.load(), deadline)
            .await
            .ok_or_else(|| self.out_of_budget("loading the stored token"))?
            .map_err(store_error)?;
        let stored = sane(stored);
        self.lock_state().saw_in_store(stored.as_ref());
        let now = self.now();
        if self.login_since(epoch) {
            return Err(superseded_by_login());
        }
        if let Some(token) = self.superseded(reason, replaces, now) {
            return Ok(token);
        }
        let current = self.current();
        // An unsaved login is newer than anything stored, whatever its number.
        let login_unsaved = self.lock_state().unsaved_login.is_some();
        if let Some(stored) = stored.as_ref().filter(|_| !login_unsaved) {
            let newer = current
                .as_ref()
                .is_none_or(|cur| stored.generation() > cur.generation());
            if newer && self.is_usable(stored, now) {
                // Another process refreshed while we waited for the lock.
                bump(&self.inner.counters.adopted);
                tracing::debug!(generation = stored.generation(), "adopted the stored token");
                return Ok(Arc::new(stamp(stored.clone(), now)));
            }
        }
        // The newest token known holds the newest refresh secret (rotation).
        let previous = match (current, &stored) {
            (_, Some(_)) if login_unsaved => self.current(),
            (Some(cur), Some(st)) if st.generation() > cur.generation() => {
                Some(Arc::new(st.clone()))
            }
            (None, Some(st)) => Some(Arc::new(st.clone())),
            (cur, _) => cur,
        };
        let cx = RefreshContext::new(reason, previous, now);
        bump(&self.inner.counters.source_calls);
        let fetched = within(self.fetch(cx), deadline)
            .await
            .ok_or_else(|| self.out_of_budget("the token source"))?;
        self.lock_state().source_retry_after = match &fetched {
            Err(error) => error.retry_after().map(|after| (self.mono(), after)),
            Ok(_) => None,
        };
        let fetched = fetched?;
        // Numbered when it arrives, not when it was asked for: a login installed or a
        // rejection reported meanwhile has a higher generation than the token this
        // flight replaces, and the new token must still supersede it (C3, C4) — unless
        // it was a login, which wins (C17). Checked and numbered under one lock.
        let generation = {
            let mut state = self.lock_state();
            if state.login_epoch != epoch {
                return Err(superseded_by_login());
            }
            let generation =
                self.next_generation_locked(&mut state, stored.as_ref().map(Token::generation));
            state.last_generation = generation;
            generation
        };
        let token = Arc::new(stamp(fetched.with_generation(generation), self.now()));
        match within(guard.save(&token), deadline).await {
            Some(Ok(())) => {
                // A login this flight could not save (its store call failed) is now
                // saved in effect: the store holds its refresh, numbered above it (the
                // flight started after the login, or it would have been superseded).
                // Left marked unsaved, it would keep every later read and push of the
                // store from being adopted, and spend refresh tokens other replicas
                // already spent (C17, issue 20).
                let mut state = self.lock_state();
                if state.unsaved_login.is_some_and(|login| login < generation) {
                    state.unsaved_login = None;
                }
                Ok(token)
            }
            Some(Err(StoreError::LeaseLost)) => {
                // Someone else holds the lock now and may have saved a newer token: the
                // fleet uses that one (an unlocked read: this guard's lease is gone).
                // Otherwise keep ours: the server issued it and its rotated refresh
                // token may be the only live one.
                let newer = match within(store.load(), deadline).await {
                    Some(Ok(stored)) => {
                        sane(stored).filter(|stored| stored.generation() >= token.generation())
                    }
                    _ => None,
                };
                match newer {
                    Some(stored) => Ok(Arc::new(stamp(stored, now))),
                    None => {
                        tracing::warn!("refresh lock lease lost; keeping the new token in memory");
                        Ok(token)
                    }
                }
            }
            Some(Err(error)) => {
                // The server already issued this token (and may have spent the old
                // refresh token): keep it in memory rather than lose it.
                tracing::warn!(error = %error, "saving the refreshed token failed; keeping it in memory");
                Ok(token)
            }
            None => {
                tracing::warn!(
                    "saving the refreshed token used up the budget; keeping it in memory"
                );
                Ok(token)
            }
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
}

async fn run_flight(
    flight: SingleFlight,
    id: u64,
    kind: FlightKind,
    replaces: Option<u64>,
    epoch: u64,
) -> FlightOutput {
    let reason = match kind {
        FlightKind::Refresh(reason) => Some(reason),
        FlightKind::Reload => None,
    };
    // One span per flight; no field carries a token or a secret (C12).
    let span = tracing::info_span!(
        "tokenflight.refresh",
        flight = id,
        reason = ?reason,
        replaces = ?replaces,
        attempts = tracing::field::Empty,
        outcome = tracing::field::Empty,
        generation = tracing::field::Empty,
    );
    let started = flight.mono();
    flight.lock_state().source_retry_after = None;
    let counters = &flight.inner.counters;
    let calls_before = counters.source_calls.load(Ordering::Relaxed);
    let adopted_before =
        counters.adopted.load(Ordering::Relaxed) + counters.store_reloads.load(Ordering::Relaxed);
    // A panic in any pluggable part ends the flight with a typed error for every
    // waiter; `Shared` would otherwise re-panic in each of them (C18).
    let result = AssertUnwindSafe(flight.run(kind, replaces, epoch))
        .catch_unwind()
        .instrument(span.clone())
        .await
        .unwrap_or_else(|_| {
            Err(RefreshError::transient_because(
                Cause::Panicked,
                "a part of the refresh panicked (token store, clock or timer)",
            ))
        });
    let output = span.in_scope(|| flight.finish(id, kind, epoch, result));
    // Only one flight runs at a time, so the counters' growth is this flight's.
    let attempts = counters
        .source_calls
        .load(Ordering::Relaxed)
        .saturating_sub(calls_before);
    let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
    let adopted = counters.adopted.load(Ordering::Relaxed)
        + counters.store_reloads.load(Ordering::Relaxed)
        > adopted_before;
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
    let observers = flight.observers();
    if !observers.is_empty() {
        let duration = flight.mono().saturating_duration_since(started);
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
    output
}

pin_project_lite::pin_project! {
    /// What [`SingleFlight::token`] returns: a token ready at once (the fast path, no
    /// async state built) or the asynchronous slow path.
    #[project = TokenFutureProj]
    enum TokenFuture<S> {
        Ready { token: Option<Arc<Token>> },
        Slow { #[pin] slow: S },
    }
}

impl<S: Future<Output = Result<Arc<Token>, Error>>> Future for TokenFuture<S> {
    type Output = Result<Arc<Token>, Error>;

    #[inline]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            TokenFutureProj::Ready { token } => match token.take() {
                Some(token) => std::task::Poll::Ready(Ok(token)),
                None => std::task::Poll::Pending,
            },
            TokenFutureProj::Slow { slow } => slow.poll(cx),
        }
    }
}

/// A flight's deadline: a timer sleep that stays ready once it fired. Timers' sleeps
/// (an `async fn` among them) must not be polled again after they completed.
struct Deadline(Option<BoxFuture<'static, ()>>);

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
async fn within<T>(work: impl Future<Output = T>, deadline: &mut Deadline) -> Option<T> {
    match future::select(std::pin::pin!(work), deadline).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(((), _)) => None,
    }
}

fn read_wall(clock: &dyn Clock) -> SystemTime {
    catch_unwind(AssertUnwindSafe(|| clock.now())).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Records when a token arrived if its source did not say (its lifetime then counts
/// from here, [C15](crate#c15)).
fn stamp(token: Token, now: SystemTime) -> Token {
    if token.obtained().is_some() {
        token
    } else {
        token.obtained_at(now)
    }
}

/// A stored token with a generation at or beyond [`MAX_GENERATION`], or one that cannot
/// be sent ([`Token::is_sendable`]), is corrupt: ignored (the next save replaces it).
fn sane(stored: Option<Token>) -> Option<Token> {
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

/// `at + delay`, saturating instead of overflowing ([C16](crate#c16)).
fn instant_after(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

/// Worth another attempt inside the flight: network, timeouts, 5xx/429, the store.
fn is_retryable(error: &RefreshError) -> bool {
    error.is_retryable()
}

fn superseded_by_login() -> RefreshError {
    RefreshError::transient("superseded by a login")
}

fn store_error(error: StoreError) -> RefreshError {
    // A configuration fault (an insecure store) is permanent: never retried (C9).
    RefreshError::from_store(error)
}
