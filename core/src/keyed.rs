//! Many tokens in one process: one [`SingleFlight`] per key (a user, a tenant, an
//! audience and scope), made on first use from a factory.
//!
//! Why a map of whole coordinators and not one coordinator with keyed state: each key
//! then has every guarantee of the unkeyed coordinator (C1–C18) by construction — its
//! own token, its own single flight, its own backoff and auth-lost state, its own store —
//! and a slow refresh of one key never delays another. The key is the *only* way to a
//! coordinator, so a token of one key cannot be handed to a caller of another (the
//! mistake behind CVE-2025-26620 was a single-flight key that left parameters out: here
//! the whole key is the map's key, compared with `Eq`, never a hash of it).
//!
//! Memory is bounded: at most `max_entries` coordinators are kept; idle ones (unused for
//! `idle_timeout`, measured on a monotonic clock every lookup reads) go first, then the
//! least recently used. A coordinator in use — a handle to it held outside the map by a
//! request in flight, a caller waiting for its refresh or the application, or its
//! refresh running — is never evicted: a key never has two live coordinators (C22), and
//! an eviction never cuts a flight short. While more keys than `max_entries` are in use
//! at once, the map holds them all. Keys never appear in `Debug`, logs or errors.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::error::{ConfigError, Error, RefreshError};
use crate::flight::SingleFlight;
use crate::runtime::Clock;
use crate::stats::Stats;
use crate::token::Token;

pub use crate::request::TokenKey;

/// Builds the coordinator of a key the first time the key is used.
///
/// It usually calls [`FlightBuilder::build`](crate::FlightBuilder::build) with a source and a store made for
/// the key (a store namespace per key, so a fleet shares per-key refreshes).
pub type FlightFactory<K> = dyn Fn(&K) -> Result<SingleFlight, ConfigError> + Send + Sync;

/// One [`SingleFlight`] per key, made on first use, bounded in memory.
///
/// Cheap to clone; clones share the map.
///
/// A key's coordinator is *in use* while anyone holds a handle to it besides the map
/// (what [`flight`](Self::flight) and [`get`](Self::get) return, a request of a keyed
/// [`AuthPolicy`](crate::AuthPolicy) from its send until its response is classified, a
/// caller of [`token`](Self::token)) or its refresh runs. One in use is never evicted,
/// so a key has at most one live coordinator ([C22](crate#c22)); it is idle only once
/// unused for `idle_timeout`.
///
/// ```
/// use tokenflight::{SingleFlight, Token, from_fn, keyed::KeyedFlights};
///
/// # futures::executor::block_on(async {
/// let flights = KeyedFlights::builder(|tenant: &String| {
///     let tenant = tenant.clone();
///     SingleFlight::builder()
///         .source(from_fn(move |_cx| {
///             let tenant = tenant.clone();
///             async move { Ok(Token::new(format!("token-for-{tenant}"))) }
///         }))
///         .build()
/// })
/// .max_entries(1_000)
/// .build();
///
/// let token = flights.token(&"acme".to_string()).await?;
/// assert_eq!(token.access().expose(), "token-for-acme");
/// # Ok::<_, tokenflight::Error>(())
/// # }).unwrap();
/// ```
pub struct KeyedFlights<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for KeyedFlights<K> {
    fn clone(&self) -> Self {
        KeyedFlights {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<K> {
    map: RwLock<HashMap<K, Entry>>,
    factory: Box<FlightFactory<K>>,
    max_entries: usize,
    idle_timeout: Duration,
    /// What "when was this key last used" is measured on.
    clock: UsageClock,
}

struct Entry {
    flight: SingleFlight,
    /// The last use, in milliseconds of the map's [`UsageClock`]: every lookup moves it
    /// (a relaxed store, only when the millisecond changed), so a key in constant use
    /// is never idle.
    used: AtomicU64,
}

/// The clock that idle times are measured on, as milliseconds since the map was built.
///
/// Every lookup reads it, so it must be cheap: by default the system's coarse monotonic
/// clock (on Linux `CLOCK_MONOTONIC_COARSE`, the time of the last timer tick, read from
/// the vDSO in a few nanoseconds: no lock, no allocation, no system call). Its
/// resolution (1–10 ms) is nothing next to an idle timeout. A clock given to the
/// builder (a test's `test_util::ManualClock`) is read through
/// [`Clock::monotonic`], so that time moves only when the test says.
enum UsageClock {
    System {
        start: Duration,
    },
    Given {
        clock: Arc<dyn Clock>,
        start: Instant,
    },
}

impl UsageClock {
    fn new(clock: Option<Arc<dyn Clock>>) -> Self {
        match clock {
            None => UsageClock::System {
                start: coarse_monotonic(),
            },
            Some(clock) => {
                // A panicking user clock is contained as everywhere else (C18): the map
                // then counts from the system's monotonic clock.
                let start = catch_unwind(AssertUnwindSafe(|| clock.monotonic()))
                    .unwrap_or_else(|_| Instant::now());
                UsageClock::Given { clock, start }
            }
        }
    }

    /// Milliseconds since the map was built (saturating; never goes back for the
    /// system clock, which is monotonic).
    fn now_ms(&self) -> u64 {
        let elapsed = match self {
            UsageClock::System { start } => coarse_monotonic().saturating_sub(*start),
            UsageClock::Given { clock, start } => {
                match catch_unwind(AssertUnwindSafe(|| clock.monotonic())) {
                    Ok(now) => now.saturating_duration_since(*start),
                    // Nothing is idle by a clock that cannot be read.
                    Err(_) => Duration::ZERO,
                }
            }
        };
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The system's coarse monotonic time (Linux and Android: `CLOCK_MONOTONIC_COARSE`).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
fn coarse_monotonic() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::from_secs(secs).saturating_add(Duration::from_nanos(nanos))
}

/// The system's monotonic time, elsewhere: [`Instant`] since the first reading.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
fn coarse_monotonic() -> Duration {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed()
}

/// Configures a [`KeyedFlights`].
pub struct KeyedFlightsBuilder<K> {
    factory: Box<FlightFactory<K>>,
    max_entries: usize,
    idle_timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl<K> fmt::Debug for KeyedFlightsBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFlightsBuilder")
            .field("max_entries", &self.max_entries)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<K> KeyedFlightsBuilder<K> {
    /// The most coordinators kept at once (default 10,000). When a new key would exceed
    /// it, idle coordinators are dropped first, then the least recently used ones, never
    /// one that is in use (see [`KeyedFlights`]): while more keys than this are in use
    /// at once, the map holds them all. Values below 1 are read as 1.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .max_entries(2)
    /// .build();
    /// for user in 0..3 {
    ///     flights.flight(&user).unwrap();
    /// }
    /// // Nobody holds the coordinators: the oldest made room.
    /// assert_eq!(flights.len(), 2);
    /// ```
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// A coordinator nobody used for this long (no lookup, no handle held) may be
    /// dropped (default 15 minutes); its key gets a new one (which reads its store
    /// again) on next use.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .idle_timeout(Duration::from_secs(300))
    /// .build();
    /// flights.flight(&1).unwrap();
    /// // Used just now: not idle.
    /// assert_eq!(flights.evict_idle(), 0);
    /// ```
    pub fn idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// The clock that idle times and recent use are measured on, through its
    /// [`Clock::monotonic`] (default: the system's coarse monotonic clock, cheap enough
    /// for every lookup). Tests pass a `test_util::ManualClock`
    /// to move time themselves; a keyed [`AuthPolicy`](crate::AuthPolicy) passes the
    /// clock set on its builder.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{SingleFlight, Token, from_fn, keyed::KeyedFlights, test_util::ManualClock};
    ///
    /// let clock = ManualClock::at_fixed_point();
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder()
    ///         .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///         .build()
    /// })
    /// .idle_timeout(Duration::from_secs(60))
    /// .clock(clock.clone())
    /// .build();
    /// flights.flight(&1).unwrap();
    /// clock.advance(Duration::from_secs(59));
    /// assert_eq!(flights.evict_idle(), 0, "used 59 s ago");
    /// clock.advance(Duration::from_secs(1));
    /// assert_eq!(flights.evict_idle(), 1, "unused for a minute");
    /// ```
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The map.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_tenant: &String| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// assert!(flights.is_empty());
    /// ```
    pub fn build(self) -> KeyedFlights<K> {
        KeyedFlights {
            inner: Arc::new(Inner {
                map: RwLock::new(HashMap::new()),
                factory: self.factory,
                max_entries: self.max_entries,
                idle_timeout: self.idle_timeout,
                clock: UsageClock::new(self.clock),
            }),
        }
    }
}

impl<K> fmt::Debug for KeyedFlights<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are user data (user ids, tenants): never printed.
        f.debug_struct("KeyedFlights")
            .field("entries", &self.len())
            .field("max_entries", &self.inner.max_entries)
            .finish_non_exhaustive()
    }
}

impl<K> KeyedFlights<K> {
    /// A builder; `factory` makes the coordinator of a key on its first use.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|user: &u32| {
    ///     let user = *user;
    ///     SingleFlight::builder()
    ///         .source(from_fn(move |_cx| async move { Ok(Token::new(format!("for-{user}"))) }))
    ///         .build()
    /// })
    /// .build();
    /// let token = futures::executor::block_on(flights.token(&3)).unwrap();
    /// assert_eq!(token.access().expose(), "for-3");
    /// ```
    pub fn builder(
        factory: impl Fn(&K) -> Result<SingleFlight, ConfigError> + Send + Sync + 'static,
    ) -> KeyedFlightsBuilder<K> {
        KeyedFlightsBuilder {
            factory: Box::new(factory),
            max_entries: 10_000,
            idle_timeout: Duration::from_secs(15 * 60),
            clock: None,
        }
    }

    /// How many coordinators are kept now.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// flights.flight(&1).unwrap();
    /// flights.flight(&2).unwrap();
    /// flights.flight(&1).unwrap();
    /// assert_eq!(flights.len(), 2);
    /// ```
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no coordinator is kept.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// assert!(flights.is_empty());
    /// flights.flight(&1).unwrap();
    /// assert!(!flights.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters of every coordinator kept now, added up (those of evicted keys are
    /// gone with them).
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// futures::executor::block_on(async {
    ///     flights.token(&1).await.unwrap();
    ///     flights.token(&2).await.unwrap();
    /// });
    /// assert_eq!(flights.stats().source_calls, 2);
    /// ```
    pub fn stats(&self) -> Stats {
        self.read()
            .values()
            .fold(Stats::default(), |sum, entry| sum + entry.flight.stats())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<K, Entry>> {
        self.inner
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<K, Entry>> {
        self.inner
            .map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `entry` used now: one cheap clock reading, and a write only when the
    /// millisecond changed. Racing lookups may store readings a moment apart in either
    /// order; the difference is far below any idle timeout.
    fn touch(&self, entry: &Entry) {
        let now = self.inner.clock.now_ms();
        if entry.used.load(Ordering::Relaxed) < now {
            entry.used.store(now, Ordering::Relaxed);
        }
    }

    /// Whether `entry` is idle at `now`: not in use, and its last use at least
    /// `idle_timeout` ago. An entry in use counts as used now (its last use moves to
    /// `now`), so its idle time starts at the latest when it was last seen in use.
    fn is_idle(&self, entry: &Entry, now: u64) -> bool {
        if in_use(entry) {
            entry.used.fetch_max(now, Ordering::Relaxed);
            return false;
        }
        let idle_ms = u64::try_from(self.inner.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(entry.used.load(Ordering::Relaxed)) >= idle_ms
    }
}

/// Whether anyone but the map can use `entry`'s coordinator: a handle is held outside
/// the map (a request in flight holds its key's until its response is classified, a
/// caller waits for its refresh, the application kept a clone), or its refresh runs.
///
/// Such a coordinator is never evicted: a new one for the same key would be a second
/// live coordinator, and a rejection seen by the old handle would refresh there — two
/// refreshes for one key, with rotating refresh tokens a revoked login (C22). The check
/// is exact under the map's write lock: the map hands out handles only under its lock,
/// so an entry the map alone holds cannot gain a handle while it is looked at.
fn in_use(entry: &Entry) -> bool {
    entry.flight.handles() > 1 || entry.flight.refresh_running() || entry.flight.subscribers() > 0
}

impl<K: Hash + Eq + Clone> KeyedFlights<K> {
    /// The coordinator of `key`, made by the factory if the key has none. Fails only if
    /// the factory fails (the error is returned, nothing is kept).
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{ConfigError, SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|user: &u32| {
    ///     if *user == 0 {
    ///         return Err(ConfigError::InvalidSetting("no user 0".into()));
    ///     }
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// let flight = flights.flight(&1).unwrap();
    /// futures::executor::block_on(flight.install(Token::new("from-login"))).unwrap();
    /// assert!(flights.flight(&0).is_err());
    /// assert_eq!(flights.len(), 1);
    /// ```
    pub fn flight(&self, key: &K) -> Result<SingleFlight, ConfigError> {
        if let Some(entry) = self.read().get(key) {
            self.touch(entry);
            return Ok(entry.flight.clone());
        }
        // The factory runs outside the map's lock (it may be slow or panic-free but
        // user code); if two callers race, the first insert wins and the other's
        // coordinator is dropped unused — its source was never called.
        let made = (self.inner.factory)(key)?;
        let mut map = self.write();
        if let Some(entry) = map.get(key) {
            self.touch(entry);
            return Ok(entry.flight.clone());
        }
        let now = self.inner.clock.now_ms();
        if map.len() >= self.inner.max_entries {
            self.evict(&mut map, now);
        }
        map.insert(
            key.clone(),
            Entry {
                flight: made.clone(),
                used: AtomicU64::new(now),
            },
        );
        Ok(made)
    }

    /// The token changes of `key` ([`SingleFlight::subscribe`] on the key's
    /// coordinator, made by the factory if the key has none). A coordinator with live
    /// subscriptions is never evicted.
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn, keyed::KeyedFlights};
    /// let flights = KeyedFlights::builder(|tenant: &String| {
    ///     let tenant = tenant.clone();
    ///     SingleFlight::builder()
    ///         .source(from_fn(move |_cx| {
    ///             let tenant = tenant.clone();
    ///             async move { Ok(Token::new(format!("token-for-{tenant}"))) }
    ///         }))
    ///         .build()
    /// })
    /// .build();
    /// let mut changes = flights.subscribe(&"acme".to_string()).unwrap();
    /// assert!(changes.try_next().is_none());
    /// futures::executor::block_on(flights.token(&"acme".to_string())).unwrap();
    /// assert!(changes.try_next().is_some_and(|change| change.token().is_some()));
    /// ```
    pub fn subscribe(&self, key: &K) -> Result<crate::subscribe::Subscription, ConfigError> {
        Ok(self.flight(key)?.subscribe())
    }

    /// The coordinator of `key` if one is kept (never calls the factory).
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// assert!(flights.get(&1).is_none(), "get never makes one");
    /// flights.flight(&1).unwrap();
    /// assert!(flights.get(&1).is_some());
    /// ```
    pub fn get(&self, key: &K) -> Option<SingleFlight> {
        let map = self.read();
        let entry = map.get(key)?;
        self.touch(entry);
        Some(entry.flight.clone())
    }

    /// The valid token of `key`, if its coordinator is kept and has one (the keyed
    /// [`SingleFlight::valid_token`]: no allocation, no write lock).
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .build();
    /// assert!(flights.valid_token(&1).is_none());
    /// futures::executor::block_on(flights.token(&1)).unwrap();
    /// assert_eq!(flights.valid_token(&1).unwrap().access().expose(), "t");
    /// ```
    pub fn valid_token(&self, key: &K) -> Option<Arc<Token>> {
        let map = self.read();
        let entry = map.get(key)?;
        self.touch(entry);
        entry.flight.valid_token()
    }

    /// A token for `key` to send now: [`SingleFlight::token`] on the key's coordinator
    /// (made on first use). Keys are independent: a refresh of one never delays another.
    ///
    /// ```
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flights = KeyedFlights::builder(|user: &u32| {
    ///     let user = *user;
    ///     SingleFlight::builder()
    ///         .source(from_fn(move |_cx| async move { Ok(Token::new(format!("for-{user}"))) }))
    ///         .build()
    /// })
    /// .build();
    /// let token = futures::executor::block_on(flights.token(&7)).unwrap();
    /// assert_eq!(token.access().expose(), "for-7");
    /// ```
    ///
    /// # Cancellation
    /// As [`SingleFlight::token`]: dropping the future never hangs other callers of the
    /// key and never cancels its refresh while anyone else waits for it. The caller holds
    /// its own handle to the coordinator, which keeps it in the map until the call ends.
    pub async fn token(&self, key: &K) -> Result<Arc<Token>, Error> {
        let flight = self.flight(key).map_err(factory_failed)?;
        flight.token().await
    }

    /// Drops coordinators unused for `idle_timeout` that nobody else holds (see
    /// [`KeyedFlights`]); returns how many were dropped. Also done when a new key finds
    /// the map full.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::keyed::KeyedFlights;
    /// use tokenflight::test_util::ManualClock;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let clock = ManualClock::at_fixed_point();
    /// let flights = KeyedFlights::builder(|_user: &u32| {
    ///     SingleFlight::builder().source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    /// })
    /// .idle_timeout(Duration::from_secs(60))
    /// .clock(clock.clone())
    /// .build();
    /// let held = flights.flight(&1).unwrap();
    /// flights.flight(&2).unwrap();
    /// clock.advance(Duration::from_secs(61));
    /// // Key 2 is idle; key 1's coordinator is still held, so it stays.
    /// assert_eq!(flights.evict_idle(), 1);
    /// assert!(flights.get(&1).is_some());
    /// # drop(held);
    /// ```
    pub fn evict_idle(&self) -> usize {
        let mut map = self.write();
        let now = self.inner.clock.now_ms();
        let before = map.len();
        map.retain(|_, entry| !self.is_idle(entry, now));
        before - map.len()
    }

    /// Makes room for one entry: idle ones first; if none, the least recently used
    /// eighth (one scan serves the next eighth of inserts), never one in use.
    fn evict(&self, map: &mut HashMap<K, Entry>, now: u64) {
        map.retain(|_, entry| !self.is_idle(entry, now));
        if map.len() < self.inner.max_entries {
            return;
        }
        // Oldest first: the largest age.
        let mut ages: Vec<u64> = map
            .values()
            .filter(|entry| !in_use(entry))
            .map(|entry| age(entry, now))
            .collect();
        if ages.is_empty() {
            // Every kept key is in use: keep them all (their requests and waiters need
            // them, and a second coordinator for one of their keys would break C22); the
            // map exceeds its bound until some are released.
            return;
        }
        ages.sort_unstable_by(|a, b| b.cmp(a));
        let count = (self.inner.max_entries / 8).clamp(1, ages.len());
        let cutoff = ages.get(count - 1).copied().unwrap_or(0);
        let mut removed = 0;
        map.retain(|_, entry| {
            let evict = removed < count && age(entry, now) >= cutoff && !in_use(entry);
            removed += usize::from(evict);
            !evict
        });
    }
}

/// Milliseconds since the entry's last use.
fn age(entry: &Entry, now: u64) -> u64 {
    now.saturating_sub(entry.used.load(Ordering::Relaxed))
}

/// A factory that cannot make a key's coordinator is a configuration fault: permanent
/// for this call (the next call asks the factory again). The key is not in the message.
pub(crate) fn factory_failed(error: ConfigError) -> Error {
    Error::Refresh(RefreshError::misconfigured(error))
}

/// A name for `key` that is safe as a file name, a Redis key part or a metric-free log
/// field: 32 hex digits of SHA-256 over a versioned prefix and the key's bytes.
///
/// Stores are namespaced per key with it (`FileStore::new(dir.join(key_namespace(..)))`,
/// a Redis key prefix), so every process and replica of a fleet finds the same key's
/// record while raw key values (user ids, e-mail addresses, tenant names) never become
/// paths or Redis keys. It is stable across processes, machines and releases (unlike
/// `std::hash`), and 128 bits make a collision between two keys out of reach.
///
/// ```
/// let name = tokenflight::keyed::key_namespace(b"alice@example.com");
/// assert_eq!(name.len(), 32);
/// assert!(name.bytes().all(|b| b.is_ascii_hexdigit()));
/// assert_ne!(name, tokenflight::keyed::key_namespace(b"bob@example.com"));
/// ```
pub fn key_namespace(key: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"tokenflight-key-v1\0")
        .chain_update(key)
        .finalize();
    digest
        .iter()
        .take(16)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
