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
//! `idle_timeout`) go first, then the least recently used. A coordinator whose refresh is
//! running is never evicted, and callers already waiting hold their own handle to it, so
//! an eviction never cuts a flight short. Keys never appear in `Debug`, logs or errors.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::error::{ConfigError, Error, RefreshError};
use crate::flight::SingleFlight;
use crate::runtime::Clock;
use crate::stats::Stats;
use crate::token::Token;

/// The key of a request's token in a keyed [`AuthPolicy`](crate::AuthPolicy): which
/// user, tenant or audience the request acts for.
///
/// Put it in a request's extensions (the same way as [`SkipAuth`](crate::SkipAuth)) to
/// choose the token; without it, the policy's key function decides (by default the
/// request's origin, [`TokenKey::origin`]). Compared as a whole with `Eq`: two keys
/// share a token only if they are equal. Its value never appears in `Debug`, logs,
/// errors or metric labels.
///
/// ```
/// use tokenflight::keyed::TokenKey;
/// let key = TokenKey::new("tenant-42");
/// assert_eq!(key.as_str(), "tenant-42");
/// assert_eq!(format!("{key:?}"), "TokenKey(..)");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey(Arc<str>);

impl TokenKey {
    /// A key with this value (a user id, a tenant, an audience and scope).
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        TokenKey(value.into())
    }

    /// The key of `url`'s origin (`scheme://host:port`): one token per API a client
    /// talks to, the default key of a keyed policy.
    pub fn origin(url: &url::Url) -> Self {
        TokenKey(url.origin().ascii_serialization().into())
    }

    /// The key's value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are user data (user ids, e-mail addresses, tenants): never printed.
        f.write_str("TokenKey(..)")
    }
}

/// Builds the coordinator of a key the first time the key is used.
///
/// It usually calls [`FlightBuilder::build`](crate::FlightBuilder::build) with a source and a store made for
/// the key (a store namespace per key, so a fleet shares per-key refreshes).
pub type FlightFactory<K> = dyn Fn(&K) -> Result<SingleFlight, ConfigError> + Send + Sync;

/// One [`SingleFlight`] per key, made on first use, bounded in memory.
///
/// Cheap to clone; clones share the map.
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
    /// Usage is tracked in ticks of an eighth of `idle_timeout`, not by reading a clock
    /// per lookup: the fast path only compares two atomics (and writes one when the tick
    /// changed). The tick advances — by the periods that really passed — when the map
    /// is written to (a new key, an eviction), the only times it is looked at.
    tick: AtomicU32,
    last_tick: Mutex<Instant>,
    clock: Option<Arc<dyn Clock>>,
}

struct Entry {
    flight: SingleFlight,
    /// The tick of the last use (a relaxed store, only when it changed).
    used: AtomicU32,
}

/// Ticks per `idle_timeout`: an entry is idle once it was unused for this many ticks,
/// i.e. between 7/8 and all of `idle_timeout` after its last use.
const TICKS_PER_IDLE: u32 = 8;

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
    /// it, idle coordinators are dropped first, then the least recently used ones (never
    /// one whose refresh is running). Values below 1 are read as 1.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// A coordinator unused this long may be dropped (default 15 minutes); its key gets a
    /// new one (which reads its store again) on next use.
    pub fn idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// The clock.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The map.
    pub fn build(self) -> KeyedFlights<K> {
        let start = self.clock.as_ref().map_or_else(Instant::now, |c| c.monotonic());
        KeyedFlights {
            inner: Arc::new(Inner {
                map: RwLock::new(HashMap::new()),
                factory: self.factory,
                max_entries: self.max_entries,
                idle_timeout: self.idle_timeout,
                tick: AtomicU32::new(0),
                last_tick: Mutex::new(start),
                clock: self.clock,
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
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no coordinator is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters of every coordinator kept now, added up (those of evicted keys are
    /// gone with them).
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

    /// Marks `entry` used now: no clock read, and no write while the tick is unchanged.
    fn touch(&self, entry: &Entry) {
        let tick = self.inner.tick.load(Ordering::Relaxed);
        if entry.used.load(Ordering::Relaxed) != tick {
            entry.used.store(tick, Ordering::Relaxed);
        }
    }

    /// Advances the tick by the periods passed since it last moved; returns it.
    fn advance_tick(&self) -> u32 {
        let period = self.inner.idle_timeout / TICKS_PER_IDLE;
        let mut last = self
            .inner
            .last_tick
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = self.inner.clock.as_ref().map_or_else(Instant::now, |c| c.monotonic());
        let elapsed = now.saturating_duration_since(*last);
        let periods = if period.is_zero() {
            // A zero timeout: every write sees everything unused as idle.
            TICKS_PER_IDLE
        } else {
            u32::try_from(elapsed.as_nanos() / period.as_nanos()).unwrap_or(u32::MAX)
        };
        if periods == 0 {
            return self.inner.tick.load(Ordering::Relaxed);
        }
        // Ages are capped (see `age`), so a long quiet spell needs only a capped step.
        let step = periods.min(TICKS_PER_IDLE * 2);
        if period.is_zero() || step < periods {
            *last = now;
        } else {
            *last += period.saturating_mul(periods);
        }
        // Wrapping is harmless: ages use wrapping_sub and are capped.
        self.inner
            .tick
            .fetch_add(step, Ordering::Relaxed)
            .wrapping_add(step)
    }
}

impl<K: Hash + Eq + Clone> KeyedFlights<K> {
    /// The coordinator of `key`, made by the factory if the key has none. Fails only if
    /// the factory fails (the error is returned, nothing is kept).
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
        let now = self.advance_tick();
        if map.len() >= self.inner.max_entries {
            self.evict(&mut map, now);
        }
        map.insert(
            key.clone(),
            Entry {
                flight: made.clone(),
                used: AtomicU32::new(now),
            },
        );
        Ok(made)
    }

    /// The coordinator of `key` if one is kept (never calls the factory).
    pub fn get(&self, key: &K) -> Option<SingleFlight> {
        let map = self.read();
        let entry = map.get(key)?;
        self.touch(entry);
        Some(entry.flight.clone())
    }

    /// The valid token of `key`, if its coordinator is kept and has one (the keyed
    /// [`SingleFlight::valid_token`]: no allocation, no write lock).
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
    /// its own handle to the coordinator, so evicting the key meanwhile changes nothing.
    pub async fn token(&self, key: &K) -> Result<Arc<Token>, Error> {
        let flight = self.flight(key).map_err(factory_failed)?;
        flight.token().await
    }

    /// Drops coordinators unused for `idle_timeout` whose refresh is not running;
    /// returns how many were dropped. Also done when a new key finds the map full.
    pub fn evict_idle(&self) -> usize {
        let mut map = self.write();
        let now = self.advance_tick();
        let before = map.len();
        map.retain(|_, entry| !is_idle(entry, now));
        before - map.len()
    }

    /// Makes room for one entry: idle ones first; if none, the least recently used
    /// eighth (one scan serves the next eighth of inserts), never a running flight.
    fn evict(&self, map: &mut HashMap<K, Entry>, now: u32) {
        map.retain(|_, entry| !is_idle(entry, now));
        if map.len() < self.inner.max_entries {
            return;
        }
        // Oldest first: the largest age.
        let mut ages: Vec<u32> = map
            .values()
            .filter(|entry| !entry.flight.refresh_running())
            .map(|entry| age(entry, now))
            .collect();
        if ages.is_empty() {
            // Every kept key is refreshing: keep them all (their waiters need them); the
            // map exceeds its bound until one finishes.
            return;
        }
        ages.sort_unstable_by(|a, b| b.cmp(a));
        let count = (self.inner.max_entries / 8).clamp(1, ages.len());
        let cutoff = ages.get(count - 1).copied().unwrap_or(0);
        let mut removed = 0;
        map.retain(|_, entry| {
            let evict =
                removed < count && age(entry, now) >= cutoff && !entry.flight.refresh_running();
            removed += usize::from(evict);
            !evict
        });
    }
}

/// Ticks since the entry's last use (capped: a tick counter that wrapped never makes an
/// old entry look fresh for long, and never panics).
fn age(entry: &Entry, now: u32) -> u32 {
    now.wrapping_sub(entry.used.load(Ordering::Relaxed))
        .min(TICKS_PER_IDLE * 4)
}

fn is_idle(entry: &Entry, now: u32) -> bool {
    age(entry, now) >= TICKS_PER_IDLE && !entry.flight.refresh_running()
}

/// A factory that cannot make a key's coordinator is a configuration fault: permanent
/// for this call (the next call asks the factory again). The key is not in the message.
pub(crate) fn factory_failed(error: ConfigError) -> Error {
    Error::Refresh(
        RefreshError::permanent("the keyed coordinator's factory failed").with_source(error),
    )
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
