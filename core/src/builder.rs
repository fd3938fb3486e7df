//! One builder per thing: [`FlightBuilder`] builds a coordinator ([`SingleFlight`]),
//! [`AuthPolicyBuilder`] builds an auth policy ([`AuthPolicy`]: a coordinator plus where
//! the token goes, who may receive it and what counts as a rejection). Adapters hand out
//! an `AuthPolicyBuilder` with their runtime's spawner and timer preset, so every client
//! is configured the same way.
//!
//! Setters take `impl Trait`; an `Arc<dyn Trait>` (or any `Arc<T>`) is accepted too,
//! since the traits are implemented for `Arc`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::auth_policy::{AuthPolicy, Flights, KeyFn, default_key};
use crate::config::{Backoff, FlightConfig, Retry};
use crate::error::ConfigError;
use crate::flight::{Parts, SingleFlight};
use crate::keyed::{KeyedFlights, TokenKey};
use crate::observe::{Observer, Observers};
use crate::policy::Rules;
use crate::policy::{AllowedOrigins, Classifier, Placement, SkipRoutes};
use crate::runtime::{Clock, Spawn, SystemClock, Timer, default_timer};
use crate::source::TokenSource;
use crate::store::{MemoryStore, TokenStore};
use crate::token::Token;

/// Configures a [`SingleFlight`] (the coordinator). Start with
/// [`SingleFlight::builder`].
///
/// ```
/// use tokenflight::{SingleFlight, Token, from_fn};
/// use std::time::Duration;
/// let flight = SingleFlight::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
///     .leeway(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// # let _ = flight;
/// ```
pub struct FlightBuilder {
    config: FlightConfig,
    source: Option<Arc<dyn TokenSource>>,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    timer: Arc<dyn Timer>,
    spawner: Option<Arc<dyn Spawn>>,
    observers: Observers,
    initial_token: Option<Token>,
    /// Whether `store` was set (a keyed policy refuses a store shared by every key).
    store_set: bool,
    /// Whether `clock` was set (a keyed policy then measures idle keys on it too).
    clock_set: bool,
}

impl fmt::Debug for FlightBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlightBuilder")
            .field("config", &self.config)
            .field("source", &self.source.is_some())
            .field("spawner", &self.spawner.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for FlightBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl SingleFlight {
    /// A builder with the documented defaults (see [`FlightConfig`]), an in-memory
    /// store, the system clock, the default timer and no spawner.
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build()
    ///     .unwrap();
    /// assert!(flight.current().is_none());
    /// ```
    pub fn builder() -> FlightBuilder {
        FlightBuilder::new()
    }
}

impl FlightBuilder {
    /// See [`SingleFlight::builder`].
    ///
    /// ```
    /// use tokenflight::{FlightBuilder, Token, from_fn};
    /// let built = FlightBuilder::new()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build();
    /// assert!(built.is_ok());
    /// ```
    pub fn new() -> Self {
        FlightBuilder {
            config: FlightConfig::default(),
            source: None,
            store: Arc::new(MemoryStore::new()),
            clock: Arc::new(SystemClock),
            timer: default_timer(),
            spawner: None,
            observers: Observers::default(),
            initial_token: None,
            store_set: false,
            clock_set: false,
        }
    }

    /// The settings every key of a keyed policy shares (timing, clock, timer,
    /// spawner, observers) without what must be the key's own: no source, no
    /// initial token and a new memory store.
    fn for_key(&self) -> FlightBuilder {
        FlightBuilder {
            config: self.config.clone(),
            source: None,
            store: Arc::new(MemoryStore::new()),
            clock: Arc::clone(&self.clock),
            timer: Arc::clone(&self.timer),
            spawner: self.spawner.clone(),
            observers: self.observers.clone(),
            initial_token: None,
            store_set: false,
            clock_set: self.clock_set,
        }
    }

    /// What a keyed policy cannot share between keys, if set: a source, a store or an
    /// initial token would hand one key's token to another.
    fn shared_by_keys(&self) -> Option<&'static str> {
        if self.source.is_some() {
            Some("source")
        } else if self.store_set {
            Some("store")
        } else if self.initial_token.is_some() {
            Some("initial_token")
        } else {
            None
        }
    }

    /// The token source (required): [`from_fn`](crate::from_fn), an
    /// [`oauth2`](crate::oauth2) grant, or your own.
    ///
    /// ```
    /// use tokenflight::{ConfigError, RefreshContext, SingleFlight, Token, from_fn};
    /// let built = SingleFlight::builder().build();
    /// assert!(matches!(built, Err(ConfigError::MissingSource)));
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|cx: RefreshContext| async move {
    ///         // `cx` says why the refresh runs and what the previous token was.
    ///         let _ = cx.reason;
    ///         Ok(Token::new("fresh"))
    ///     }))
    ///     .build()
    ///     .unwrap();
    /// let token = futures::executor::block_on(flight.token()).unwrap();
    /// assert_eq!(token.access().expose(), "fresh");
    /// ```
    pub fn source(mut self, source: impl TokenSource + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Where tokens are kept (default: memory; see [`crate::store`]).
    ///
    /// ```
    /// use tokenflight::store::MemoryStore;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .store(MemoryStore::new())
    ///     .build()
    ///     .unwrap();
    /// # let _ = flight;
    /// ```
    pub fn store(mut self, store: impl TokenStore + 'static) -> Self {
        self.store = Arc::new(store);
        self.store_set = true;
        self
    }

    /// A token to start with (e.g. from a login).
    ///
    /// ```
    /// use tokenflight::{RefreshError, SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Err(RefreshError::transient("not needed")) }))
    ///     .initial_token(Token::new("from-login"))
    ///     .build()
    ///     .unwrap();
    /// // The login's token is used without asking the source.
    /// let token = futures::executor::block_on(flight.token()).unwrap();
    /// assert_eq!(token.access().expose(), "from-login");
    /// ```
    pub fn initial_token(mut self, token: Token) -> Self {
        self.initial_token = Some(token);
        self
    }

    /// The clock (default: the system clock).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::test_util::ManualClock;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let clock = ManualClock::at_fixed_point();
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|cx| async move {
    ///         Ok(Token::new("t").expires_in(Duration::from_secs(60), cx.now))
    ///     }))
    ///     .clock(clock.clone())
    ///     .timer(clock.clone())
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(flight.token()).unwrap();
    /// assert!(flight.valid_token().is_some());
    /// clock.advance(Duration::from_secs(120));
    /// assert!(flight.valid_token().is_none());
    /// ```
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self.clock_set = true;
        self
    }

    /// The timer for refresh timeouts (default: `futures-timer`, or the adapter's).
    ///
    /// ```
    /// use tokenflight::test_util::ManualClock;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// // Timeouts and backoff sleeps then move only when the test says.
    /// let clock = ManualClock::at_fixed_point();
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .timer(clock)
    ///     .build()
    ///     .unwrap();
    /// # let _ = flight;
    /// ```
    pub fn timer(mut self, timer: impl Timer + 'static) -> Self {
        self.timer = Arc::new(timer);
        self
    }

    /// A spawner, so refreshes finish even if every caller left ([C6](crate#c6)) and
    /// refresh-ahead runs in the background ([C8](crate#c8)). The adapters preset
    /// their runtime's.
    ///
    /// ```
    /// use futures::future::BoxFuture;
    /// use tokenflight::adapter::Spawn;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// /// Runs each task on a thread of its own (a runtime's spawner would do better).
    /// struct ThreadSpawner;
    /// impl Spawn for ThreadSpawner {
    ///     fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
    ///         std::thread::spawn(move || futures::executor::block_on(task));
    ///         true
    ///     }
    /// }
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .spawner(ThreadSpawner)
    ///     .build()
    ///     .unwrap();
    /// let token = futures::executor::block_on(flight.token()).unwrap();
    /// assert_eq!(token.access().expose(), "t");
    /// ```
    pub fn spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Some(Arc::new(spawner));
        self
    }

    /// No spawner: refreshes are driven by the callers that wait for them.
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .without_spawner()
    ///     .build()
    ///     .unwrap();
    /// // The caller's own poll drives the refresh.
    /// assert!(futures::executor::block_on(flight.token()).is_ok());
    /// ```
    pub fn without_spawner(mut self) -> Self {
        self.spawner = None;
        self
    }

    /// Adds an observer of the coordinator's events (refresh started and finished,
    /// attempts, joins, resends, auth lost, logins). Repeatable: every observer gets
    /// every event. See [`crate::observe`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tokenflight::observe::{Observer, RefreshStarted};
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// struct Count(Arc<AtomicU32>);
    /// impl Observer for Count {
    ///     fn refresh_started(&self, _event: &RefreshStarted) {
    ///         self.0.fetch_add(1, Ordering::SeqCst);
    ///     }
    /// }
    /// let started = Arc::new(AtomicU32::new(0));
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .observer(Count(started.clone()))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(flight.token()).unwrap();
    /// assert_eq!(started.load(Ordering::SeqCst), 1);
    /// ```
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// All timing settings at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::FlightConfig;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let mut config = FlightConfig::default();
    /// config.refresh_timeout = Duration::from_secs(5);
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .config(config)
    ///     .build()
    ///     .unwrap();
    /// # let _ = flight;
    /// ```
    pub fn config(mut self, config: FlightConfig) -> Self {
        self.config = config;
        self
    }

    /// Cap on the clock-skew allowance before expiry (default 10 s, scaled to a tenth
    /// of the token's lifetime; [C7](crate#c7), [C15](crate#c15)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .leeway(Duration::from_secs(30))
    ///     .build()
    ///     .unwrap();
    /// # let _ = flight;
    /// ```
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.config.leeway = leeway;
        self
    }

    /// Cap on the refresh-ahead window before expiry, or `None` to disable (default
    /// 225 s, scaled to a third of the token's lifetime; [C8](crate#c8),
    /// [C15](crate#c15)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{ConfigError, SingleFlight, Token, from_fn};
    /// # let source = || from_fn(|_cx| async { Ok(Token::new("t")) });
    /// let off = SingleFlight::builder().source(source()).refresh_ahead(None).build();
    /// assert!(off.is_ok());
    /// // The window must be longer than the leeway.
    /// let short = SingleFlight::builder()
    ///     .source(source())
    ///     .leeway(Duration::from_secs(10))
    ///     .refresh_ahead(Some(Duration::from_secs(5)))
    ///     .build();
    /// assert!(matches!(short, Err(ConfigError::InvalidSetting(_))));
    /// ```
    pub fn refresh_ahead(mut self, window: Option<Duration>) -> Self {
        self.config.refresh_ahead = window;
        self
    }

    /// One budget for a whole flight: store lock, load, every attempt, save, unlock
    /// (default 30 s, [C10](crate#c10)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{ConfigError, SingleFlight, Token, from_fn};
    /// # let source = || from_fn(|_cx| async { Ok(Token::new("t")) });
    /// let flight = SingleFlight::builder()
    ///     .source(source())
    ///     .refresh_timeout(Duration::from_secs(5))
    ///     .build();
    /// assert!(flight.is_ok());
    /// let zero = SingleFlight::builder().source(source()).refresh_timeout(Duration::ZERO).build();
    /// assert!(matches!(zero, Err(ConfigError::InvalidSetting(_))));
    /// ```
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.config.refresh_timeout = timeout;
        self
    }

    /// Bound on one call of the token source (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .attempt_timeout(Duration::from_secs(2))
    ///     .build();
    /// assert!(flight.is_ok());
    /// ```
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = timeout;
        self
    }

    /// Expiry-driven source calls are at least this far apart (default 1 s,
    /// [C15](crate#c15)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .min_refresh_interval(Duration::from_millis(500))
    ///     .build();
    /// assert!(flight.is_ok());
    /// ```
    pub fn min_refresh_interval(mut self, interval: Duration) -> Self {
        self.config.min_refresh_interval = interval;
        self
    }

    /// Retries of transient failures inside one flight (default 3 attempts,
    /// [C16](crate#c16)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::{Backoff, Retry};
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .retry(Retry::new(5, Backoff::new(Duration::from_millis(50), Duration::from_secs(1))))
    ///     .build();
    /// assert!(flight.is_ok());
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        self.config.retry = retry;
        self
    }

    /// Backoff after transient failures ([C9](crate#c9)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::config::Backoff;
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .backoff(Backoff::new(Duration::from_secs(1), Duration::from_secs(60)))
    ///     .build();
    /// assert!(flight.is_ok());
    /// ```
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.config.refresh_timeout.is_zero() || self.config.attempt_timeout.is_zero() {
            return Err(ConfigError::InvalidSetting(
                "refresh_timeout and attempt_timeout must be above zero".into(),
            ));
        }
        if self.config.retry.max_attempts == 0 {
            return Err(ConfigError::InvalidSetting(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        if self
            .config
            .refresh_ahead
            .is_some_and(|w| w <= self.config.leeway)
        {
            return Err(ConfigError::InvalidSetting(
                "refresh_ahead must be longer than leeway (or None)".into(),
            ));
        }
        Ok(())
    }

    /// Builds the coordinator. Fails without a source or with settings that cannot
    /// work together.
    ///
    /// ```
    /// use tokenflight::{ConfigError, SingleFlight, Token, from_fn};
    /// assert!(matches!(SingleFlight::builder().build(), Err(ConfigError::MissingSource)));
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build();
    /// assert!(flight.is_ok());
    /// ```
    pub fn build(self) -> Result<SingleFlight, ConfigError> {
        self.check()?;
        let source = self.source.ok_or(ConfigError::MissingSource)?;
        Ok(SingleFlight::from_parts(Parts {
            config: self.config,
            source,
            store: self.store,
            clock: self.clock,
            timer: self.timer,
            spawner: self.spawner,
            observers: self.observers,
            initial_token: self.initial_token,
        }))
    }
}

/// Configures an [`AuthPolicy`]: its coordinator (the same settings as
/// [`FlightBuilder`]) and where the token goes, who may receive it, which routes go
/// without it and what counts as a rejection. `build()` makes one `AuthPolicy` and
/// hands it to `Out` — an `AuthPolicy` itself, or an adapter's middleware or layer made
/// from one (`tokenflight_reqwest::TokenMiddleware::builder()` returns an
/// `AuthPolicyBuilder<TokenMiddleware>` with tokio's spawner and timer preset).
///
/// ```
/// use tokenflight::{AuthPolicy, Placement, Token, from_fn};
/// let policy = AuthPolicy::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
///     .placement(Placement::header("x-api-key", None))
///     .allowed_origin("https://api.example.com")
///     .skip_route(None, "/health")
///     .build()
///     .unwrap();
/// # let _ = policy;
/// ```
pub struct AuthPolicyBuilder<Out = AuthPolicy> {
    flight: FlightBuilder,
    placement: Placement,
    classifier: Classifier,
    /// The listed origins, and whether every origin was allowed: decided at `build`,
    /// so the result does not depend on the order of the calls.
    origins: Vec<url::Origin>,
    any_origin: bool,
    skip: SkipRoutes,
    keyed: Option<KeyedSetup>,
    key_of: Option<Arc<KeyFn>>,
    key_bounds: Option<(usize, Option<Duration>)>,
    /// Every invalid setting, in the order of the calls; `build` reports them all.
    invalid: Vec<ConfigError>,
    #[cfg(feature = "dpop")]
    dpop: Option<crate::dpop::Dpop>,
    out: PhantomData<fn() -> Out>,
}

/// Makes a key's coordinator from the key and the policy's shared settings.
type KeyFactory =
    dyn Fn(&TokenKey, FlightBuilder) -> Result<SingleFlight, ConfigError> + Send + Sync;

struct KeyedSetup {
    factory: Arc<KeyFactory>,
    max_keys: usize,
    idle_timeout: Option<Duration>,
}

impl<Out> fmt::Debug for AuthPolicyBuilder<Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthPolicyBuilder")
            .field("flight", &self.flight)
            .field("placement", &self.placement)
            .field("origins", &self.origins)
            .field("skip", &self.skip)
            .field("keyed", &self.keyed.is_some())
            .finish_non_exhaustive()
    }
}

impl AuthPolicy {
    /// A builder with the documented defaults (see [`FlightConfig`]); an adapter's
    /// `builder()` returns the same builder with its runtime preset.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, ConfigError, Token, from_fn};
    /// let missing = AuthPolicy::builder().allow_any_origin().build();
    /// assert!(matches!(missing, Err(ConfigError::MissingSource)));
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allow_any_origin()
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn builder() -> AuthPolicyBuilder {
        AuthPolicyBuilder::new()
    }
}

impl<Out> Default for AuthPolicyBuilder<Out> {
    fn default() -> Self {
        Self::new()
    }
}

/// The coordinator's setters, forwarded: one definition, documented on
/// [`FlightBuilder`].
macro_rules! forward {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, $($arg: $ty),*) -> Self {
            self.flight = self.flight.$name($($arg),*);
            self
        }
    )*};
}

impl<Out> AuthPolicyBuilder<Out> {
    /// A builder with the documented defaults: `Authorization: Bearer`, a 401 (and RFC
    /// 6750 hints) is a rejection, no origin allowed yet, and the coordinator's defaults
    /// ([`FlightBuilder`]).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, AuthPolicyBuilder, Token, from_fn};
    /// let policy: AuthPolicy = AuthPolicyBuilder::new()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// # let _ = policy;
    /// ```
    pub fn new() -> Self {
        AuthPolicyBuilder {
            flight: FlightBuilder::new(),
            placement: Placement::default(),
            classifier: Classifier::default(),
            origins: Vec::new(),
            any_origin: false,
            key_bounds: None,
            skip: SkipRoutes::default(),
            keyed: None,
            key_of: None,
            invalid: Vec::new(),
            #[cfg(feature = "dpop")]
            dpop: None,
            out: PhantomData,
        }
    }

    /// An auth policy around a coordinator configured with `flight` (its settings as
    /// they are; the setters below change them further).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::{AuthPolicy, AuthPolicyBuilder, SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .leeway(Duration::from_secs(5));
    /// let policy: AuthPolicy = AuthPolicyBuilder::from_flight(flight)
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// # let _ = policy;
    /// ```
    pub fn from_flight(flight: FlightBuilder) -> Self {
        AuthPolicyBuilder {
            flight,
            ..Self::new()
        }
    }

    forward! {
        /// The token source (required); see [`FlightBuilder::source`].
        source(source: impl TokenSource + 'static);
        /// Where tokens are kept; see [`FlightBuilder::store`].
        store(store: impl TokenStore + 'static);
        /// A token to start with; see [`FlightBuilder::initial_token`].
        initial_token(token: Token);
        /// The clock; see [`FlightBuilder::clock`].
        clock(clock: impl Clock + 'static);
        /// The timer; see [`FlightBuilder::timer`].
        timer(timer: impl Timer + 'static);
        /// A spawner; see [`FlightBuilder::spawner`].
        spawner(spawner: impl Spawn + 'static);
        /// No spawner; see [`FlightBuilder::without_spawner`].
        without_spawner();
        /// Adds an observer; see [`FlightBuilder::observer`].
        observer(observer: impl Observer + 'static);
        /// All timing settings; see [`FlightBuilder::config`].
        config(config: FlightConfig);
        /// See [`FlightBuilder::leeway`].
        leeway(leeway: Duration);
        /// See [`FlightBuilder::refresh_ahead`].
        refresh_ahead(window: Option<Duration>);
        /// See [`FlightBuilder::refresh_timeout`].
        refresh_timeout(timeout: Duration);
        /// See [`FlightBuilder::attempt_timeout`].
        attempt_timeout(timeout: Duration);
        /// See [`FlightBuilder::min_refresh_interval`].
        min_refresh_interval(interval: Duration);
        /// See [`FlightBuilder::retry`].
        retry(retry: Retry);
        /// See [`FlightBuilder::backoff`].
        backoff(backoff: Backoff);
    }

    /// Where the token goes (default `Authorization: Bearer`):
    /// `.placement(Placement::header("x-api-key", None))`,
    /// `.placement(Placement::query("access_token"))`.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Placement, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .placement(Placement::query("access_token"))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(policy.placement(), &Placement::query("access_token"));
    /// ```
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// DPoP (RFC 9449): every request that carries the token carries a new proof of
    /// `dpop`'s key too, and the token goes as `Authorization: DPoP <token>` (a later
    /// [`placement`](Self::placement) overrides that). A `401` with
    /// `WWW-Authenticate: DPoP error="use_dpop_nonce"` and a `DPoP-Nonce` is resent
    /// once with a proof carrying the nonce, without a refresh; a second demand is the
    /// answer. Every response's nonce is kept per origin. Pass the same `Dpop` to the
    /// token source ([`RefreshTokenGrant::dpop`](crate::oauth2::RefreshTokenGrant::dpop)).
    ///
    /// ```
    /// use tokenflight::dpop::{Dpop, DpopKey};
    /// let dpop = Dpop::new(DpopKey::generate()?);
    /// let policy = tokenflight::AuthPolicy::builder()
    ///     .source(tokenflight::from_fn(|_| async { Ok(tokenflight::Token::new("AT")) }))
    ///     .allowed_origin("https://api.example")
    ///     .dpop(dpop)
    ///     .build();
    /// assert!(policy.is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.dpop = Some(dpop);
        self.placement = Placement::header("authorization", Some("DPoP"));
        self
    }

    /// What counts as "token rejected" (default: 401 and RFC 6750 hints).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Classifier, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     // Some APIs answer an expired token with 403.
    ///     .classifier(Classifier::new().statuses([401, 403]))
    ///     .allowed_origin("https://api.example.com")
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Allow the token to go to `origin` (`scheme://host[:port]`); may be repeated
    /// ([C12](crate#c12)).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, ConfigError, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// assert!(policy.allows_origin(&"https://api.example.com/v1/items".parse().unwrap()));
    /// assert!(!policy.allows_origin(&"https://elsewhere.example.com/".parse().unwrap()));
    /// let bad = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("not an origin")
    ///     .build();
    /// assert!(matches!(bad, Err(ConfigError::InvalidOrigin(_))));
    /// ```
    pub fn allowed_origin(mut self, origin: &str) -> Self {
        match AllowedOrigins::parse_origin(origin) {
            Ok(origin) => self.origins.push(origin),
            Err(e) => self.invalid.push(e),
        }
        self
    }

    /// Allow the token to go to every origin (an explicit opt-in, [C12](crate#c12)).
    /// Together with [`allowed_origin`](Self::allowed_origin), in either order, `build`
    /// refuses both: a list that would be ignored is a mistake.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, ConfigError, Token, from_fn};
    /// let both = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allow_any_origin()
    ///     .allowed_origin("https://api.example.com")
    ///     .build();
    /// assert!(matches!(both, Err(ConfigError::InvalidSetting(_))));
    /// ```
    pub fn allow_any_origin(mut self) -> Self {
        self.any_origin = true;
        self
    }

    /// Send requests to `path` (and below it, segment-wise: `/login` covers
    /// `/login/sso` but not `/logins`) without a token and do not classify their
    /// responses, for `method` or, with `None`, any method ([C11](crate#c11)). For a
    /// login or token endpoint on the API's own origin. May be repeated. The same in
    /// every adapter; a single request can also carry the [`SkipAuth`](crate::SkipAuth)
    /// marker.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .skip_route(Some(http::Method::POST), "/login")
    ///     .skip_route(None, "/health")
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn skip_route(mut self, method: Option<http::Method>, path: &str) -> Self {
        self.skip.route(method, path);
        self
    }

    /// Send the requests for which `predicate(method, url)` is true without a token
    /// and do not classify their responses ([C11](crate#c11)); like
    /// [`skip_route`](Self::skip_route) for rules a path prefix cannot say. May be
    /// repeated.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .skip_if(|_method, url| url.path().ends_with(".public.json"))
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn skip_if(
        mut self,
        predicate: impl Fn(&http::Method, &url::Url) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.skip.when(Arc::new(predicate));
        self
    }

    /// Many tokens, one per key (a user, a tenant, an audience): a keyed policy keeps a
    /// coordinator per [`TokenKey`] (a [`KeyedFlights`]), made on first use by
    /// `factory(key, shared)`. `shared` is a [`FlightBuilder`] with this builder's
    /// coordinator settings (timing, clock, timer, the adapter's spawner,
    /// observers); the factory adds the key's own source and, to share the key's
    /// refreshes across processes, a store namespaced for the key
    /// ([`key_namespace`](crate::keyed::key_namespace)). Each request's key is its
    /// [`TokenKey`] marker, else the [key function](Self::token_key) (default: the
    /// request's origin). A token of one key is never sent with a request of another.
    ///
    /// A source, store or initial token set on this builder would be shared by every
    /// key, so `build` refuses them for a keyed policy ([`ConfigError::InvalidSetting`]).
    ///
    /// ```
    /// use tokenflight::keyed::TokenKey;
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .allowed_origin("https://a.example.com")
    ///     .allowed_origin("https://b.example.com")
    ///     .keyed(|key: &TokenKey, shared| {
    ///         let audience = key.as_str().to_owned();
    ///         shared
    ///             .source(from_fn(move |_cx| {
    ///                 let audience = audience.clone();
    ///                 async move { Ok(Token::new(format!("token-for-{audience}"))) }
    ///             }))
    ///             .build()
    ///     })
    ///     .build()
    ///     .unwrap();
    /// let key = TokenKey::new("https://a.example.com");
    /// let token = futures::executor::block_on(policy.keyed().unwrap().token(&key)).unwrap();
    /// assert_eq!(token.access().expose(), "token-for-https://a.example.com");
    /// ```
    pub fn keyed(
        mut self,
        factory: impl Fn(&TokenKey, FlightBuilder) -> Result<SingleFlight, ConfigError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.keyed = Some(KeyedSetup {
            factory: Arc::new(factory),
            max_keys: 10_000,
            idle_timeout: None,
        });
        self
    }

    /// A keyed policy's key for requests without a [`TokenKey`] marker (default:
    /// [`TokenKey::origin`], one token per API). Only with [`keyed`](Self::keyed).
    ///
    /// ```
    /// use tokenflight::keyed::TokenKey;
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .allow_any_origin()
    ///     .keyed(|_key: &TokenKey, shared| {
    ///         shared.source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    ///     })
    ///     // One token per tenant, named by the first path segment.
    ///     .token_key(|_method, url| {
    ///         TokenKey::new(url.path_segments().and_then(|mut s| s.next()).unwrap_or(""))
    ///     })
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn token_key(
        mut self,
        key_of: impl Fn(&http::Method, &url::Url) -> TokenKey + Send + Sync + 'static,
    ) -> Self {
        self.key_of = Some(Arc::new(key_of));
        self
    }

    /// A keyed policy's bounds: at most `max_keys` coordinators (default 10,000), and
    /// with `idle_timeout` (default 15 minutes) the time after which an unused one may
    /// go; see [`KeyedFlightsBuilder`](crate::keyed::KeyedFlightsBuilder). Only with
    /// [`keyed`](Self::keyed), before or after it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::keyed::TokenKey;
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .allow_any_origin()
    ///     .key_bounds(100, Some(Duration::from_secs(60)))
    ///     .keyed(|_key: &TokenKey, shared| {
    ///         shared.source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    ///     })
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn key_bounds(mut self, max_keys: usize, idle_timeout: Option<Duration>) -> Self {
        self.key_bounds = Some((max_keys, idle_timeout));
        self
    }

    /// Builds the policy. Fails without a source (or, keyed, a factory) or an allowed
    /// origin, or with settings that cannot work together; with more than one invalid
    /// setting, [`ConfigError::Several`] lists each. The result does not depend on the
    /// order of the calls.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, ConfigError};
    /// let error = AuthPolicy::builder()
    ///     .allowed_origin("not an origin")
    ///     .allowed_origin("nor this")
    ///     .key_bounds(10, None)
    ///     .build()
    ///     .unwrap_err();
    /// let ConfigError::Several(all) = error else { panic!("{error}") };
    /// assert!(all.contains(&ConfigError::InvalidOrigin("not an origin".into())));
    /// assert!(all.contains(&ConfigError::InvalidOrigin("nor this".into())));
    /// assert!(all.contains(&ConfigError::MissingSource));
    /// ```
    pub fn build(mut self) -> Result<Out, ConfigError>
    where
        Out: From<AuthPolicy>,
    {
        let mut invalid = std::mem::take(&mut self.invalid);
        if let Err(e) = self.placement.check() {
            invalid.push(e);
        }
        let origins = match (self.any_origin, self.origins.is_empty()) {
            (true, true) => Some(AllowedOrigins::Any),
            (false, false) => Some(AllowedOrigins::List(std::mem::take(&mut self.origins))),
            (false, true) => {
                // Invalid origins were reported already; no need to say "none" too.
                if !invalid
                    .iter()
                    .any(|e| matches!(e, ConfigError::InvalidOrigin(_)))
                {
                    invalid.push(ConfigError::NoAllowedOrigin);
                }
                None
            }
            (true, false) => {
                invalid.push(ConfigError::InvalidSetting(
                    "allow_any_origin and allowed_origin exclude each other: choose one".into(),
                ));
                None
            }
        };
        if self.keyed.is_none() {
            if self.key_of.is_some() {
                invalid.push(ConfigError::InvalidSetting(
                    "token_key needs a keyed policy: call `.keyed(..)`".into(),
                ));
            }
            if self.key_bounds.is_some() {
                invalid.push(ConfigError::InvalidSetting(
                    "key_bounds needs a keyed policy: call `.keyed(..)`".into(),
                ));
            }
        }
        let flights = self.flights();
        let (flights, origins) = match (flights, origins) {
            (Ok(flights), Some(origins)) if invalid.is_empty() => (flights, origins),
            (flights, _) => {
                if let Err(e) = flights {
                    invalid.push(e);
                }
                return Err(ConfigError::of_all(invalid));
            }
        };
        #[cfg(feature = "dpop")]
        let dpop = self.dpop.take();
        #[cfg_attr(not(feature = "dpop"), allow(unused_mut))]
        let mut rules = Rules::new(self.placement, origins, self.classifier, self.skip);
        #[cfg(feature = "dpop")]
        {
            rules.dpop = dpop;
        }
        Ok(Out::from(AuthPolicy::new(flights, rules)))
    }

    /// The coordinator(s), taken out of the builder.
    fn flights(&mut self) -> Result<Flights, ConfigError> {
        let flight = std::mem::take(&mut self.flight);
        let flights = match self.keyed.take() {
            None => Flights::One(flight.build()?),
            Some(mut setup) => {
                if let Some((max_keys, idle_timeout)) = self.key_bounds {
                    setup.max_keys = max_keys;
                    setup.idle_timeout = idle_timeout;
                }
                if let Some(what) = flight.shared_by_keys() {
                    return Err(ConfigError::InvalidSetting(format!(
                        "a keyed policy takes each key's {what} from its factory; \
                         set it there, not on the policy"
                    )));
                }
                flight.check()?;
                let shared = flight;
                // The keys' idle times are measured on the policy's clock when one was
                // set (a test's manual clock), else on the map's cheap system clock.
                let clock = shared.clock_set.then(|| Arc::clone(&shared.clock));
                let factory = setup.factory;
                let mut flights =
                    KeyedFlights::builder(move |key: &TokenKey| factory(key, shared.for_key()))
                        .max_entries(setup.max_keys);
                if let Some(clock) = clock {
                    flights = flights.clock(clock);
                }
                if let Some(idle) = setup.idle_timeout {
                    flights = flights.idle_timeout(idle);
                }
                Flights::Keyed {
                    flights: flights.build(),
                    key_of: self.key_of.take().unwrap_or_else(|| Arc::new(default_key)),
                }
            }
        };
        Ok(flights)
    }
}
