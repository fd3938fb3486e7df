//! One builder for the coordinator and the auth layer. Adapters hand out
//! `Builder<TheirLayer>` with their runtime's spawner and timer preset, so every client
//! is configured the same way.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Backoff, FlightConfig, Retry};
use crate::driver::{Authenticator, Policy};
use crate::error::{ConfigError, RefreshError};
use crate::flight::{AuthLostHook, Parts, SingleFlight};
use crate::observe::{Observer, Observers};
use crate::policy::{AllowedOrigins, Classifier, Placement};
use crate::runtime::{Clock, Spawn, SystemClock, Timer, default_timer};
use crate::source::TokenSource;
use crate::store::{MemoryStore, TokenStore};
use crate::token::Token;

/// Configures a [`SingleFlight`] and an [`Authenticator`]; `build()` returns `Out`,
/// which is an `Authenticator` or an adapter's layer made from one.
///
/// ```
/// use tokenflight::{Builder, Token, from_fn};
/// let auth = Builder::new()
///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
///     .allowed_origin("https://api.example.com")
///     .build()
///     .unwrap();
/// # let _ = auth;
/// ```
pub struct Builder<Out = Authenticator> {
    config: FlightConfig,
    source: Option<Arc<dyn TokenSource>>,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    timer: Arc<dyn Timer>,
    spawner: Option<Arc<dyn Spawn>>,
    on_auth_lost: Option<AuthLostHook>,
    observers: Observers,
    initial_token: Option<Token>,
    placement: Placement,
    classifier: Classifier,
    origins: Option<AllowedOrigins>,
    invalid: Option<ConfigError>,
    out: PhantomData<fn() -> Out>,
}

impl<Out> fmt::Debug for Builder<Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("placement", &self.placement)
            .field("origins", &self.origins)
            .field("spawner", &self.spawner.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Builder<Authenticator> {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder<Authenticator> {
    /// A builder with the documented defaults (see [`FlightConfig`]), an in-memory
    /// store, the system clock, the default timer and no spawner.
    pub fn new() -> Self {
        Self::for_output()
    }
}

impl<Out> Builder<Out> {
    /// A builder whose `build()` produces `Out` (for adapters).
    pub fn for_output() -> Self {
        Builder {
            config: FlightConfig::default(),
            source: None,
            store: Arc::new(MemoryStore::new()),
            clock: Arc::new(SystemClock),
            timer: default_timer(),
            spawner: None,
            on_auth_lost: None,
            observers: Observers::default(),
            initial_token: None,
            placement: Placement::default(),
            classifier: Classifier::default(),
            origins: None,
            invalid: None,
            out: PhantomData,
        }
    }

    /// The token source (required).
    pub fn source(self, source: impl TokenSource + 'static) -> Self {
        self.source_arc(Arc::new(source))
    }

    /// The token source, shared.
    pub fn source_arc(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// Where tokens are kept (default: memory).
    pub fn store(self, store: impl TokenStore + 'static) -> Self {
        self.store_arc(Arc::new(store))
    }

    /// Where tokens are kept, shared.
    pub fn store_arc(mut self, store: Arc<dyn TokenStore>) -> Self {
        self.store = store;
        self
    }

    /// A token to start with (e.g. from a login).
    pub fn initial_token(mut self, token: Token) -> Self {
        self.initial_token = Some(token);
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The timer for refresh timeouts (default: `futures-timer`, or the adapter's).
    pub fn timer(mut self, timer: Arc<dyn Timer>) -> Self {
        self.timer = timer;
        self
    }

    /// A spawner, so refreshes finish even if every caller left (C6) and refresh-ahead
    /// runs in the background (C8).
    pub fn spawner(mut self, spawner: Arc<dyn Spawn>) -> Self {
        self.spawner = Some(spawner);
        self
    }

    /// No spawner: refreshes are driven by the callers that wait for them.
    pub fn without_spawner(mut self) -> Self {
        self.spawner = None;
        self
    }

    /// Called once when a permanent failure makes re-authentication necessary (C9).
    pub fn on_auth_lost(mut self, hook: impl Fn(&RefreshError) + Send + Sync + 'static) -> Self {
        self.on_auth_lost = Some(Arc::new(hook));
        self
    }

    /// Adds an observer of the coordinator's events (refresh started and finished,
    /// attempts, joins, resends, auth lost, logins). Repeatable: every observer gets
    /// every event. See [`crate::observe`].
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// All timing settings at once.
    pub fn config(mut self, config: FlightConfig) -> Self {
        self.config = config;
        self
    }

    /// Cap on the clock-skew allowance before expiry (default 10 s, scaled to a tenth
    /// of the token's lifetime; C7, C15).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.config.leeway = leeway;
        self
    }

    /// Cap on the refresh-ahead window before expiry, or `None` to disable (default
    /// 225 s, scaled to a third of the token's lifetime; C8, C15).
    pub fn refresh_ahead(mut self, window: Option<Duration>) -> Self {
        self.config.refresh_ahead = window;
        self
    }

    /// One budget for a whole flight: store lock, load, every attempt, save, unlock
    /// (default 30 s, C10).
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.config.refresh_timeout = timeout;
        self
    }

    /// Bound on one call of the token source (default 10 s).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = timeout;
        self
    }

    /// Expiry-driven source calls are at least this far apart (default 1 s, C15).
    pub fn min_refresh_interval(mut self, interval: Duration) -> Self {
        self.config.min_refresh_interval = interval;
        self
    }

    /// Retries of transient failures inside one flight (default 3 attempts, C16).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.config.retry = retry;
        self
    }

    /// Backoff after transient failures (C9).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Where the token goes (default `Authorization: Bearer`).
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Put the token in query parameter `param` (leakier; see [`Placement::Query`]).
    pub fn query_param(mut self, param: &str) -> Self {
        match Placement::query(param) {
            Ok(p) => self.placement = p,
            Err(e) => self.invalid = Some(e),
        }
        self
    }

    /// Put the token in header `name`, after `scheme` if given.
    pub fn header(mut self, name: &str, scheme: Option<&str>) -> Self {
        match Placement::header(name, scheme) {
            Ok(p) => self.placement = p,
            Err(e) => self.invalid = Some(e),
        }
        self
    }

    /// What counts as "token rejected" (default: 401 and RFC 6750 hints).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Allow the token to go to `origin` (`scheme://host[:port]`); may be repeated.
    pub fn allowed_origin(mut self, origin: &str) -> Self {
        match AllowedOrigins::parse_origin(origin) {
            Ok(origin) => match &mut self.origins {
                Some(AllowedOrigins::List(list)) => list.push(origin),
                Some(AllowedOrigins::Any) => {}
                None => self.origins = Some(AllowedOrigins::List(vec![origin])),
            },
            Err(e) => self.invalid = Some(e),
        }
        self
    }

    /// Allow the token to go to every origin (an explicit opt-in, C12).
    pub fn allow_any_origin(mut self) -> Self {
        self.origins = Some(AllowedOrigins::Any);
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
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

    /// Builds the coordinator alone (no origin needed).
    pub fn build_flight(self) -> Result<SingleFlight, ConfigError> {
        self.check()?;
        Ok(self.into_parts()?.0)
    }

    fn into_parts(
        self,
    ) -> Result<(SingleFlight, Placement, Classifier, Option<AllowedOrigins>), ConfigError> {
        let source = self.source.ok_or(ConfigError::MissingSource)?;
        let flight = SingleFlight::from_parts(Parts {
            config: self.config,
            source,
            store: self.store,
            clock: self.clock,
            timer: self.timer,
            spawner: self.spawner,
            on_auth_lost: self.on_auth_lost,
            observers: self.observers,
            initial_token: self.initial_token,
        });
        Ok((flight, self.placement, self.classifier, self.origins))
    }

    /// Builds the auth layer. Fails without a source or an allowed origin.
    pub fn build(self) -> Result<Out, ConfigError>
    where
        Out: From<Authenticator>,
    {
        self.check()?;
        if self.origins.is_none() {
            return Err(ConfigError::NoAllowedOrigin);
        }
        let (flight, placement, classifier, origins) = self.into_parts()?;
        let origins = origins.ok_or(ConfigError::NoAllowedOrigin)?;
        Ok(Out::from(Authenticator::new(
            flight,
            Policy {
                placement,
                origins,
                classifier,
            },
        )))
    }
}
