//! The coordinator's state machine: every rule about the current token, the flight in
//! progress, failures, logins, rejections and store contents, as synchronous
//! transitions on plain data. It does no I/O and reads no clock: the time, what the
//! store returned and what the source answered are arguments, and every result is a
//! decision or an effect for the caller to carry out. The caller holds the one state
//! lock around each call (see `SingleFlight::with_state`), so each transition is atomic.
//!
//! Inputs (events), with the transition that takes each:
//! - a caller wants a token, or a refresh for a reason ([`Machine::join`]): serve a
//!   token, fail fast, join the flight in progress, or start one ([`Join`]);
//! - a server rejected generation `g` ([`Machine::record_rejection`]): the rejection is
//!   stale (serve the newer token) or it marks `g` rejected;
//! - a login was installed ([`Machine::install`]); the store pushed a token
//!   ([`Machine::adopt_pushed`]);
//! - the flight's store read returned `X` ([`Machine::after_load`],
//!   [`Machine::adopt_unlocked`], [`Machine::reload_adopt`]): adopt it, save a login
//!   first, or fetch with a given previous token ([`AfterLoad`]);
//! - the source answered `Y` ([`Machine::number`]): the generation the new token gets,
//!   or "a login superseded this flight";
//! - the flight ended ([`Machine::finish`]): publish the token or record the failure
//!   (backoff, re-authentication required) and say what every waiter gets
//!   ([`Finished`]).
//!
//! Every input carries the wall-clock time (`now`) and, where backoff is concerned, the
//! monotonic time (`mono`) and the jitter draw (`unit`).
//!
//! The one judgement of a token is [`assess`]: fresh, in its refresh-ahead window,
//! within the leeway, expired, or rejected.

use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::FlightConfig;
use crate::error::{Error, RefreshError};
use crate::source::RefreshReason;
use crate::store::MAX_GENERATION;
use crate::token::Token;

/// What the state machine's rules read besides its state: the settings and the
/// coordinator's jitter key. Shared with the lock-free fast path.
pub(super) struct Rules {
    pub(super) config: FlightConfig,
    /// Per-coordinator random keys for the refresh-ahead jitter: a fleet's replicas
    /// start their refresh-ahead at different points.
    pub(super) jitter: RandomState,
}

/// How good a token is at one instant, for a request that needs it to stay valid for
/// some time after that instant ([C7](crate#c7), [C8](crate#c8), [C15](crate#c15),
/// [C20](crate#c20)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Assessment {
    /// Send it; nothing to do.
    Fresh,
    /// Send it, and one refresh should run ([C8](crate#c8)).
    RefreshAhead,
    /// It does not stay valid (plus the leeway) as long as the request needs, and a new
    /// token would: refresh first ([C20](crate#c20)).
    EndsTooSoon,
    /// It does not stay valid as long as the request needs, and a refresh cannot help
    /// (the whole lifetime is shorter than asked and this token is in its first half,
    /// or it is younger than `min_refresh_interval`, [C15](crate#c15)): send it and say
    /// so ([C20](crate#c20)).
    ShorterThanAsked,
    /// Within the leeway of its expiry: not sent, but it serves a caller whose refresh
    /// failed ([C7](crate#c7), [C16](crate#c16)).
    WithinLeeway,
    /// Expired.
    Expired,
    /// A server rejected it (or an older token): never handed out again ([C3](crate#c3)).
    Rejected,
}

impl Assessment {
    /// Can be sent now (and, for a request that needs more time, lasts that long).
    pub(super) fn usable(self) -> bool {
        matches!(self, Assessment::Fresh | Assessment::RefreshAhead)
    }

    /// Has not really expired: serves a caller whose refresh failed ([C16](crate#c16)).
    pub(super) fn valid(self) -> bool {
        self.usable() || self == Assessment::WithinLeeway
    }
}

/// The one judgement of a token: `rejected` says whether a server rejected it (or a
/// newer one); `need`, if the request states one, is how long after `now` it needs the
/// token to stay valid, plus its leeway ([C20](crate#c20)). A token younger than
/// `min_refresh_interval` is fresh whatever its expiry says, and too young to be
/// replaced for a longer need ([C15](crate#c15)); the leeway and the window scale to
/// its lifetime.
pub(super) fn assess(
    rules: &Rules,
    token: &Token,
    rejected: bool,
    need: Option<Duration>,
    now: SystemTime,
) -> Assessment {
    let config = &rules.config;
    if rejected {
        return Assessment::Rejected;
    }
    let young = token
        .age(now)
        .is_some_and(|age| age < config.min_refresh_interval);
    if let Some(need) = need.filter(|&need| !lasts(config, token, need, now)) {
        return if young || !worth_replacing(config, token, need, now) {
            Assessment::ShorterThanAsked
        } else {
            Assessment::EndsTooSoon
        };
    }
    if young {
        return Assessment::Fresh;
    }
    if token.is_expired(now, Duration::ZERO) {
        return Assessment::Expired;
    }
    if token.is_expired(now, config.leeway_for(token)) {
        return Assessment::WithinLeeway;
    }
    match (config.refresh_ahead_for(token), token.expiry()) {
        // The jitter only shrinks the window: outside the whole window no hash is
        // computed.
        (Some(window), Some(_))
            if token.is_expired(now, window)
                && token.is_expired(now, jittered(rules, window, token)) =>
        {
            Assessment::RefreshAhead
        }
        _ => Assessment::Fresh,
    }
}

/// Valid until `now + need`, plus its leeway (a token without an expiry always is).
fn lasts(config: &FlightConfig, token: &Token, need: Duration, now: SystemTime) -> bool {
    token.expiry().is_none()
        || now
            .checked_add(need)
            .is_some_and(|at| !token.is_expired(at, config.leeway_for(token)))
}

/// For a token that does not last `need`: whether a new one would be worth it.
/// Refreshing a token whose lifetime is shorter than asked is worth it only once it
/// has used half of it: at most two source calls per lifetime under steady traffic
/// ([C15](crate#c15)).
fn worth_replacing(config: &FlightConfig, token: &Token, need: Duration, now: SystemTime) -> bool {
    match (token.lifetime(), token.expiry()) {
        (Some(lifetime), Some(expiry))
            if lifetime < need.saturating_add(config.leeway_for(token)) =>
        {
            expiry.duration_since(now).unwrap_or(Duration::ZERO) < lifetime / 2
        }
        _ => true,
    }
}

/// `window × f`, `f` in `[1 - refresh_ahead_jitter %, 1]`, fixed per generation and
/// coordinator.
pub(super) fn jittered(rules: &Rules, window: Duration, token: &Token) -> Duration {
    use std::hash::BuildHasher;
    let percent = rules.config.refresh_ahead_jitter.min(100);
    if percent == 0 {
        return window;
    }
    let jitter = f64::from(percent) / 100.0;
    // 53 random bits as a fraction in [0, 1).
    let unit = (rules.jitter.hash_one(token.generation()) >> 11) as f64 / (1u64 << 53) as f64;
    window.mul_f64(1.0 - jitter * unit)
}

/// Records when a token arrived if its source did not say (its lifetime then counts
/// from here, [C15](crate#c15)).
pub(super) fn stamp(token: Token, now: SystemTime) -> Token {
    if token.obtained().is_some() {
        token
    } else {
        token.obtained_at(now)
    }
}

/// `at + delay`, saturating instead of overflowing ([C16](crate#c16)).
pub(super) fn instant_after(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

/// The error of a flight that a login superseded ([C17](crate#c17)).
pub(super) fn superseded_by_login() -> RefreshError {
    RefreshError::transient("superseded by a login")
}

/// A stored record as a coordinator saw it: its generation and a fingerprint of its
/// access secret (an in-memory hash, never shown). Compared as a whole: a record other
/// than the one seen was written after the look — by generation alone that is missed
/// when the store's numbering started again (a corrupt record, which the next save
/// replaces, takes the store's highest generation with it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct Seen {
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

#[derive(Default, Clone, Debug)]
pub(super) enum Failure {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum FlightKind {
    /// Replace a token (or get a first one).
    Refresh(RefreshReason),
    /// Re-authentication is required: look in the store for a login saved by another
    /// process or replica; never call the source.
    Reload,
}

impl FlightKind {
    pub(super) fn reason(self) -> Option<RefreshReason> {
        match self {
            FlightKind::Refresh(reason) => Some(reason),
            FlightKind::Reload => None,
        }
    }
}

/// What a caller asks for: a refresh for `reason` that replaces generation `replaces`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Ask {
    pub(super) reason: RefreshReason,
    pub(super) replaces: Option<u64>,
}

/// [`Machine::join`]'s decision.
#[derive(Debug)]
pub(super) enum Join {
    /// Serve this token; no flight needed.
    Ready(Arc<Token>),
    /// Fail fast with this error.
    Failed(Error),
    /// Wait for the flight in progress (`id`).
    Wait(u64),
    /// A flight runs and the caller asked not to wait (refresh-ahead).
    Busy,
    /// Start this flight.
    Start(Started),
}

/// A flight to start: `id`, of `kind`, for `ask`, under login epoch `epoch`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Started {
    pub(super) id: u64,
    pub(super) kind: FlightKind,
    pub(super) ask: Ask,
    pub(super) epoch: u64,
    /// A login was unsaved when it started: the unlocked store read is then pointless.
    pub(super) unsaved_login: bool,
}

/// [`Machine::after_load`]'s decision, with the store's lock held.
#[derive(Debug)]
pub(super) enum AfterLoad {
    /// Save this login first (numbered above the stored session), then load again.
    SaveLogin(Arc<Token>),
    /// A login arrived since the flight started: it wins ([C17](crate#c17)).
    Superseded,
    /// A newer usable token than the one replaced is current: nothing to fetch.
    Ready(Arc<Token>),
    /// Another process refreshed while this one waited for the lock: adopt its token.
    Adopted(Arc<Token>),
    /// Call the source; `previous` holds the newest refresh secret.
    Fetch { previous: Option<Arc<Token>> },
}

/// What a flight delivers to [`Machine::finish`].
#[derive(Debug)]
pub(super) struct Flown {
    pub(super) token: Arc<Token>,
    /// Saved to the store under its lock (then an older unsaved login is saved in effect).
    pub(super) saved: bool,
}

/// What every waiter of a flight gets ([C5](crate#c5)): the outcome, and for a failure the token
/// that was still valid when the flight ended (callers that did not force the refresh
/// use it instead of failing, [C16](crate#c16)).
#[derive(Clone, Debug)]
pub(super) struct FlightOutput {
    pub(super) result: Result<Arc<Token>, RefreshError>,
    pub(super) fallback: Option<Arc<Token>>,
    /// A login arrived while the flight ran: its outcome does not count ([C17](crate#c17)); each
    /// waiter takes the login, or joins a new flight if the login does not serve it.
    pub(super) superseded: bool,
}

/// [`Machine::finish`]'s result: the waiters' output and the effects to carry out.
#[derive(Debug)]
pub(super) struct Finished {
    pub(super) output: FlightOutput,
    /// Re-authentication became required: tell observers (`Observer::auth_lost`), once.
    pub(super) lost: Option<RefreshError>,
    /// Count a failure.
    pub(super) failed: bool,
}

/// Switches that plant known bugs, for the explorer to prove it finds them. Only
/// compiled into the core's own tests.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct Plant {
    /// A flight's failure ignores the source's `Retry-After` once a later step failed.
    pub(super) c9_forget_retry_after: bool,
    /// A permanent failure refuses a token that is still valid (within the leeway).
    pub(super) c16_refuse_valid_after_invalid_grant: bool,
    /// While a login is unsaved, no stored session is ever adopted by a reload.
    pub(super) c17_unsaved_login_blocks_replica: bool,
    /// A login saved after a corrupt record restarted the numbering is never adopted
    /// (a reload admits only records numbered above the one seen).
    pub(super) c17_replica_login_by_generation: bool,
    /// A caller whose token a flight renumbered keeps its pre-flight copy.
    pub(super) c6_pre_flight_copy: bool,
}

/// The coordinator's mutable state, all of it (besides the published copy of
/// `current` that the fast path reads). `H` is the handle of the running flight (a
/// weak handle to its shared future); the machine only stores it.
#[derive(Clone, Debug)]
pub(super) struct Machine<H> {
    /// The running flight, if any, by id.
    pub(super) flight: Option<(u64, H)>,
    current: Option<Arc<Token>>,
    /// `current` or its rejection changed: the published copy must be renewed.
    dirty: bool,
    /// Highest generation a server rejected; such a token is never handed out again.
    rejected: u64,
    /// Logins renumbered above a store's older session: `(old, new)` generations of the
    /// same secrets, so a rejection of the old number counts for the new one ([C3](crate#c3), [C4](crate#c4)).
    aliases: Vec<(u64, u64)>,
    failure: Failure,
    consecutive_failures: u32,
    next_flight_id: u64,
    /// The highest generation handed to a token so far: a login installed while a
    /// refresh is in flight must not get the refresh's generation ([C3](crate#c3)).
    last_generation: u64,
    /// Bumped by every login: a flight that started under an older epoch must not
    /// replace the login, fail it, or tell observers auth was lost ([C17](crate#c17)).
    login_epoch: u64,
    /// The generation of a login (initial token or `install`) not yet saved to the
    /// store; the next flight saves it, numbered above whatever the store holds.
    unsaved_login: Option<u64>,
    /// What this coordinator last found in the store since the unsaved login was
    /// installed (`None`: not looked yet). A stored record other than this one was
    /// saved after that look, by another process: not an older session.
    store_seen: Option<Seen>,
    /// The source's last answer in the running flight, if it was a failure with a
    /// `Retry-After`: when (monotonic) and how long. A flight that then ends with
    /// another failure still keeps the source quiet that long ([C9](crate#c9)).
    source_retry_after: Option<(Instant, Duration)>,
    #[cfg(test)]
    pub(super) plant: Plant,
}

impl<H> Machine<H> {
    /// The state before anything happened; `initial` is a login: the user's latest
    /// intent, saved by the first flight above whatever the store holds ([C17](crate#c17)). It
    /// is not stamped as obtained now: it may come from an earlier session.
    pub(super) fn new(initial: Option<Token>) -> Self {
        let mut machine = Machine {
            flight: None,
            current: None,
            dirty: false,
            rejected: 0,
            aliases: Vec::new(),
            failure: Failure::None,
            consecutive_failures: 0,
            next_flight_id: 0,
            last_generation: 0,
            login_epoch: 0,
            unsaved_login: None,
            store_seen: None,
            source_retry_after: None,
            #[cfg(test)]
            plant: Plant::default(),
        };
        if let Some(token) = initial {
            let generation = token.generation().clamp(1, MAX_GENERATION - 1);
            machine.last_generation = generation;
            machine.unsaved_login = Some(generation);
            machine.set_current(Arc::new(token.with_generation(generation)));
        }
        machine
    }

    /// The current token.
    pub(super) fn current(&self) -> Option<&Arc<Token>> {
        self.current.as_ref()
    }

    /// Whether a server rejected generation `generation` (or a newer one).
    pub(super) fn is_rejected(&self, generation: u64) -> bool {
        generation <= self.rejected
    }

    /// Whether the published copy of the current token must be renewed; clears it.
    pub(super) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub(super) fn assess(&self, rules: &Rules, token: &Token, now: SystemTime) -> Assessment {
        assess(
            rules,
            token,
            self.is_rejected(token.generation()),
            None,
            now,
        )
    }

    /// The current token if it can be sent now.
    pub(super) fn usable_current(&self, rules: &Rules, now: SystemTime) -> Option<Arc<Token>> {
        self.current
            .clone()
            .filter(|t| self.assess(rules, t, now).usable())
    }

    /// The current token if it has not really expired ([C16](crate#c16)).
    fn valid_current(&self, rules: &Rules, now: SystemTime) -> Option<Arc<Token>> {
        self.current
            .clone()
            .filter(|t| self.assess(rules, t, now).valid())
    }

    pub(super) fn is_auth_lost(&self) -> bool {
        matches!(self.failure, Failure::AuthLost { .. })
    }

    pub(super) fn has_unsaved_login(&self) -> bool {
        self.unsaved_login.is_some()
    }

    pub(super) fn login_epoch(&self) -> u64 {
        self.login_epoch
    }

    fn set_current(&mut self, token: Arc<Token>) {
        self.current = Some(token);
        self.dirty = true;
    }

    /// Makes `token` current unless a newer one is already there.
    fn publish(&mut self, token: &Arc<Token>) {
        let newer_present = self
            .current
            .as_ref()
            .is_some_and(|cur| cur.generation() > token.generation());
        if !newer_present {
            self.set_current(Arc::clone(token));
        }
    }

    fn raise_rejected(&mut self, generation: u64) {
        if generation > self.rejected {
            self.rejected = generation;
            self.dirty |= self
                .current
                .as_ref()
                .is_some_and(|cur| cur.generation() <= generation);
        }
    }

    /// The generation a rejection of `generation` really concerns: a login renumbered
    /// above a store's older session keeps its secrets under a new number.
    pub(super) fn resolve_alias(&self, mut generation: u64) -> u64 {
        for &(old, new) in &self.aliases {
            if old == generation {
                generation = new;
            }
        }
        generation
    }

    /// `token` under the number it has now. A flight may have renumbered it meanwhile
    /// (an unsaved login saved above an older session): the caller must get the number
    /// later rejections and pushes are compared with ([C3](crate#c3)).
    pub(super) fn under_current_number(&self, token: Arc<Token>) -> Arc<Token> {
        let generation = self.resolve_alias(token.generation());
        #[cfg(test)]
        if self.plant.c6_pre_flight_copy {
            return token;
        }
        if generation == token.generation() {
            return token;
        }
        match self
            .current
            .as_ref()
            .filter(|c| c.generation() == generation)
        {
            Some(current) => Arc::clone(current),
            None => Arc::new((*token).clone().with_generation(generation)),
        }
    }

    /// A generation no token of this coordinator has had yet.
    fn next_generation(&self, stored: Option<u64>) -> u64 {
        let current = self.current.as_ref().map_or(0, |t| t.generation());
        current
            .max(self.rejected)
            .max(stored.unwrap_or(0).min(MAX_GENERATION - 1))
            .max(self.last_generation)
            .saturating_add(1)
    }

    fn saw_in_store(&mut self, stored: Option<&Token>) {
        if self.unsaved_login.is_some() {
            self.store_seen = Some(Seen::of(stored));
        }
    }

    /// A usable token newer than the one `ask` would replace: then the refresh is not
    /// needed ([C2](crate#c2), [C3](crate#c3)). A forced refresh is never superseded.
    pub(super) fn superseded(
        &self,
        rules: &Rules,
        ask: Ask,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        if ask.reason == RefreshReason::Forced {
            return None;
        }
        let replaces = ask.replaces.map(|g| self.resolve_alias(g));
        self.usable_current(rules, now)
            .filter(|token| replaces.is_none_or(|g| token.generation() > g))
    }

    /// After a flight a login superseded: the login serves the caller if it is usable
    /// and newer than what the caller replaces (any usable token, for a forced refresh).
    pub(super) fn login_serves(
        &self,
        rules: &Rules,
        ask: Ask,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        let replaces = ask.replaces.map(|g| self.resolve_alias(g));
        self.usable_current(rules, now).filter(|t| {
            ask.reason == RefreshReason::Forced || replaces.is_none_or(|g| t.generation() > g)
        })
    }

    /// A server rejected generation `generation` (alias resolved by the caller). `Some`:
    /// the rejection is stale, resend with this token ([C3](crate#c3)); `None`: it is marked
    /// rejected, and a refresh must supersede it.
    pub(super) fn record_rejection(
        &mut self,
        rules: &Rules,
        generation: u64,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        match self.usable_current(rules, now) {
            Some(token) if token.generation() > generation => Some(token),
            _ => {
                // Nobody can reject a token this coordinator never had: a bogus
                // generation must not block every future token.
                self.raise_rejected(generation.min(self.last_generation));
                None
            }
        }
    }
}

/// Logins, pushes and store contents.
impl<H> Machine<H> {
    /// A login from outside: numbered above everything known, current at once, unsaved
    /// until a flight (or `install` itself) saves it; ends any failure ([C9](crate#c9), [C17](crate#c17)).
    pub(super) fn install(&mut self, token: Token) -> Arc<Token> {
        self.login_epoch = self.login_epoch.wrapping_add(1);
        let generation = self
            .next_generation(None)
            .max(token.generation().min(MAX_GENERATION - 1));
        self.last_generation = generation;
        let token = Arc::new(token.with_generation(generation));
        self.set_current(Arc::clone(&token));
        self.failure = Failure::None;
        self.consecutive_failures = 0;
        self.unsaved_login = Some(generation);
        self.store_seen = None;
        token
    }

    /// A token the store pushed (sane): adopted if usable, newer than anything
    /// numbered here, and no login is unsaved ([C17](crate#c17)). `Some(ended_auth_lost)` if
    /// adopted. Wakes nobody: a flight in progress finds it current.
    pub(super) fn adopt_pushed(
        &mut self,
        rules: &Rules,
        token: Token,
        now: SystemTime,
    ) -> Option<bool> {
        if !self.assess(rules, &token, now).usable() || self.unsaved_login.is_some() {
            return None;
        }
        // Newer than anything numbered here too: a flight of this coordinator that is
        // saving its own token (numbered, not yet current) gets it back, and ignores it.
        let held = self.current.as_ref().map_or(0, |cur| cur.generation());
        if token.generation() <= held.max(self.last_generation) {
            return None;
        }
        self.last_generation = self.last_generation.max(token.generation());
        self.set_current(Arc::new(stamp(token, now)));
        self.consecutive_failures = 0;
        Some(matches!(
            std::mem::take(&mut self.failure),
            Failure::AuthLost { .. }
        ))
    }

    /// With the store's lock held and `stored` loaded: the unsaved login to save,
    /// renumbered above an older session the store holds (its old number kept as an
    /// alias, [C3](crate#c3)). `None`: nothing to save.
    pub(super) fn login_to_save(&mut self, stored: Option<&Token>) -> Option<Arc<Token>> {
        self.saw_in_store(stored);
        let generation = self.unsaved_login?;
        // Replaced meanwhile (a newer login saves itself).
        let current = Arc::clone(
            self.current
                .as_ref()
                .filter(|t| t.generation() == generation)?,
        );
        let stored_generation = stored.map(Token::generation);
        if stored_generation.is_none_or(|stored| stored < generation) {
            return Some(current);
        }
        let renumbered = self.next_generation(stored_generation);
        self.last_generation = renumbered;
        self.unsaved_login = Some(renumbered);
        let token = Arc::new((*current).clone().with_generation(renumbered));
        self.set_current(Arc::clone(&token));
        if self.aliases.len() >= 8 {
            self.aliases.remove(0);
        }
        self.aliases.push((generation, renumbered));
        // A rejection of the old number already counts for the new one.
        if self.rejected >= generation {
            self.raise_rejected(renumbered);
        }
        Some(token)
    }

    /// The login of `generation` is saved.
    pub(super) fn login_saved(&mut self, generation: u64) {
        if self.unsaved_login == Some(generation) {
            self.unsaved_login = None;
        }
    }

    /// With the store's lock held, `stored` loaded (sane): what the flight under login
    /// epoch `epoch` does. `login_tried`: this attempt already tried to save the login.
    pub(super) fn after_load(
        &mut self,
        rules: &Rules,
        stored: Option<Token>,
        ask: Ask,
        epoch: u64,
        login_tried: bool,
        now: SystemTime,
    ) -> AfterLoad {
        if !login_tried {
            if let Some(login) = self.login_to_save(stored.as_ref()) {
                return AfterLoad::SaveLogin(login);
            }
        }
        self.saw_in_store(stored.as_ref());
        if self.login_epoch != epoch {
            return AfterLoad::Superseded;
        }
        if let Some(token) = self.superseded(rules, ask, now) {
            return AfterLoad::Ready(token);
        }
        let current = self.current.clone();
        // An unsaved login is newer than anything stored, whatever its number.
        if self.unsaved_login.is_some() {
            return AfterLoad::Fetch { previous: current };
        }
        let Some(stored) = stored else {
            return AfterLoad::Fetch { previous: current };
        };
        let newer = current
            .as_ref()
            .is_none_or(|cur| stored.generation() > cur.generation());
        if newer && self.assess(rules, &stored, now).usable() {
            return AfterLoad::Adopted(Arc::new(stamp(stored, now)));
        }
        // The newest token known holds the newest refresh secret (rotation).
        let previous = match current {
            Some(cur) if stored.generation() <= cur.generation() => Some(cur),
            _ => Some(Arc::new(stored)),
        };
        AfterLoad::Fetch { previous }
    }

    /// Read without the store's lock (sane): the stored token if a flight under `epoch`
    /// may adopt it — usable, newer than the current one, no login unsaved or installed
    /// since ([C3](crate#c3), [C17](crate#c17)).
    pub(super) fn adopt_unlocked(
        &self,
        rules: &Rules,
        stored: Token,
        epoch: u64,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        if self.login_epoch != epoch || self.unsaved_login.is_some() {
            return None;
        }
        let newer = self
            .current
            .as_ref()
            .is_none_or(|cur| stored.generation() > cur.generation());
        (newer && self.assess(rules, &stored, now).usable()).then(|| Arc::new(stamp(stored, now)))
    }

    /// The source answered (`retry_after`: its failure asked for quiet; `ok`: it
    /// returned a token) at `mono`. For a token: its generation, numbered now, above
    /// any login installed or rejection reported meanwhile ([C3](crate#c3), [C4](crate#c4)) — or `None`
    /// if a login arrived since the flight started: it wins ([C17](crate#c17)). With the
    /// generation: whether a login is unsaved (once the token is saved, call
    /// [`Machine::token_saved`] at once).
    pub(super) fn number(
        &mut self,
        ok: bool,
        retry_after: Option<Duration>,
        stored: Option<u64>,
        epoch: u64,
        mono: Instant,
    ) -> Option<(u64, bool)> {
        self.source_retry_after = retry_after.map(|after| (mono, after));
        if !ok {
            return None;
        }
        if self.login_epoch != epoch {
            return None;
        }
        let generation = self.next_generation(stored);
        self.last_generation = generation;
        Some((generation, self.unsaved_login.is_some()))
    }

    /// A flight saved its token of `generation` under the store's lock: a login it could
    /// not save is saved in effect (the store holds its refresh, numbered above it).
    /// Left marked unsaved, it would keep every later read and push of the store from
    /// being adopted ([C17](crate#c17)) — also while the unlock still runs.
    pub(super) fn token_saved(&mut self, generation: u64) {
        if self.unsaved_login.is_some_and(|login| login < generation) {
            self.unsaved_login = None;
        }
    }

    /// Re-authentication is required and a reload flight starts: the cause to keep, or
    /// `Err` if it ended meanwhile (by a login, which supersedes the reload, or a pushed
    /// token, which `finish` makes the reload's outcome).
    pub(super) fn reload_cause(&self) -> Result<RefreshError, RefreshError> {
        match &self.failure {
            Failure::AuthLost { error, .. } => Ok(error.clone()),
            _ => Err(superseded_by_login()),
        }
    }

    /// A reload read `stored` (sane): adopt it if it is a newer usable token the rules
    /// admit. A login not saved yet is newer than anything stored ([C17](crate#c17)): a stored
    /// session is then an older one — unless it was saved after this coordinator last
    /// looked (it is not the record found then): another replica's login.
    pub(super) fn reload_adopt(
        &mut self,
        rules: &Rules,
        stored: Option<Token>,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        let stored = stored?;
        if self.unsaved_login.is_some() {
            #[cfg(test)]
            let by_generation = self.plant.c17_replica_login_by_generation;
            #[cfg(not(test))]
            let by_generation = false;
            #[cfg(test)]
            if self.plant.c17_unsaved_login_blocks_replica {
                return None;
            }
            let seen = self.store_seen?;
            let other = if by_generation {
                stored.generation() > seen.generation
            } else {
                Seen::of(Some(&stored)) != seen
            };
            if !other {
                return None;
            }
        }
        let current = self.current.as_ref().map_or(0, |t| t.generation());
        if stored.generation() <= current || !self.assess(rules, &stored, now).usable() {
            return None;
        }
        // Replaced by a saved session: nothing of the unsaved login is left to save.
        self.unsaved_login = None;
        Some(Arc::new(stamp(stored, now)))
    }
}

/// Flights: starting, joining, ending.
impl<H> Machine<H> {
    /// A caller asks for `ask` ([C1](crate#c1), [C2](crate#c2), [C9](crate#c9)). `live`: the id of the flight in
    /// progress whose waiters are still there; `only_if_idle` is for refresh-ahead: never
    /// wait on someone else's flight.
    pub(super) fn join(
        &mut self,
        rules: &Rules,
        ask: Ask,
        only_if_idle: bool,
        live: Option<u64>,
        now: SystemTime,
        mono: Instant,
    ) -> Join {
        // A newer token than the one being replaced is already in place: nothing to do.
        if let Some(token) = self.superseded(rules, ask, now) {
            return Join::Ready(token);
        }
        if let Some(id) = live {
            return if only_if_idle {
                Join::Busy
            } else {
                Join::Wait(id)
            };
        }
        let kind = match self.failing(rules, ask, only_if_idle, now, mono) {
            Ok(kind) => kind,
            Err(refused) => return refused,
        };
        let id = self.next_flight_id;
        self.next_flight_id = id.wrapping_add(1);
        self.source_retry_after = None;
        Join::Start(Started {
            id,
            kind,
            ask,
            epoch: self.login_epoch,
            unsaved_login: self.unsaved_login.is_some(),
        })
    }

    /// Under a failure: what kind of flight may start, or the answer instead of one.
    /// During backoff or "re-authentication required" a token that has not really
    /// expired still serves ([C16](crate#c16)); the error only once it has ([C9](crate#c9)).
    fn failing(
        &mut self,
        rules: &Rules,
        ask: Ask,
        only_if_idle: bool,
        now: SystemTime,
        mono: Instant,
    ) -> Result<FlightKind, Join> {
        let serve = (ask.reason != RefreshReason::Forced)
            .then(|| self.valid_current(rules, now))
            .flatten();
        let min_interval = rules.config.min_refresh_interval;
        match &mut self.failure {
            Failure::AuthLost { error, checked } => {
                if only_if_idle || mono.saturating_duration_since(*checked) < min_interval {
                    return Err(serve.map_or_else(
                        || {
                            Join::Failed(Error::ReauthenticationRequired {
                                cause: error.clone(),
                            })
                        },
                        Join::Ready,
                    ));
                }
                // Another process or replica may have saved a login: look (C17).
                *checked = mono;
                Ok(FlightKind::Reload)
            }
            Failure::Backoff { until, error } if mono < *until => Err(serve.map_or_else(
                || {
                    Join::Failed(Error::BackingOff {
                        last: error.clone(),
                        remaining: until.saturating_duration_since(mono),
                    })
                },
                Join::Ready,
            )),
            _ => Ok(FlightKind::Refresh(ask.reason)),
        }
    }

    /// The flight `started` ended with `result` ([C5](crate#c5)): publishes the token or records
    /// the failure; says what every waiter gets. `unit` is the backoff's jitter draw in
    /// `[0, 1)`.
    pub(super) fn finish(
        &mut self,
        rules: &Rules,
        started: &Started,
        result: Result<Flown, RefreshError>,
        (now, mono, unit): (SystemTime, Instant, f64),
    ) -> Finished {
        let (kind, epoch) = (started.kind, started.epoch);
        if self.flight.as_ref().is_some_and(|(f, _)| *f == started.id) {
            self.flight = None;
        }
        let result = result.map(|flown| self.settle_login(flown));
        if self.login_epoch != epoch {
            // A login arrived while this flight ran: the login wins (C17). Nothing this
            // flight got replaces it, and its failure is not the login's.
            return Finished {
                output: FlightOutput {
                    result,
                    fallback: None,
                    superseded: true,
                },
                lost: None,
                failed: false,
            };
        }
        // Only a login (above) or a pushed token ends "re-authentication required"
        // while a reload runs: the pushed token is then this reload's outcome.
        let result = match result {
            Err(error) if kind == FlightKind::Reload && !self.is_auth_lost() => {
                self.usable_current(rules, now).ok_or(error)
            }
            result => result,
        };
        let lost = match &result {
            Ok(token) => {
                self.publish(token);
                self.last_generation = self.last_generation.max(token.generation());
                self.failure = Failure::None;
                self.consecutive_failures = 0;
                None
            }
            Err(error) => self.record_failure(rules, error, now, mono, unit),
        };
        let fallback = match &result {
            Ok(_) => None,
            Err(_) => self.fallback(rules, &result, now),
        };
        let failed = result.is_err() && kind != FlightKind::Reload;
        Finished {
            output: FlightOutput {
                result,
                fallback,
                superseded: false,
            },
            lost,
            failed,
        }
    }

    /// See [`Machine::token_saved`].
    fn settle_login(&mut self, flown: Flown) -> Arc<Token> {
        if flown.saved {
            self.token_saved(flown.token.generation());
        }
        flown.token
    }

    fn fallback(
        &self,
        rules: &Rules,
        result: &Result<Arc<Token>, RefreshError>,
        now: SystemTime,
    ) -> Option<Arc<Token>> {
        #[cfg(test)]
        if self.plant.c16_refuse_valid_after_invalid_grant
            && result.as_ref().is_err_and(RefreshError::is_permanent)
        {
            return self.usable_current(rules, now);
        }
        let _ = result;
        self.valid_current(rules, now)
    }

    /// A flight failed with `error`: permanent failures enter "re-authentication
    /// required" (returned once, for the observers), transient ones back off ([C9](crate#c9), [C16](crate#c16)).
    fn record_failure(
        &mut self,
        rules: &Rules,
        error: &RefreshError,
        now: SystemTime,
        mono: Instant,
        unit: f64,
    ) -> Option<RefreshError> {
        if error.is_permanent() {
            let (lost, error) = match &self.failure {
                // A reload found nothing: keep the original cause.
                Failure::AuthLost { error, .. } => (None, error.clone()),
                _ => (Some(error.clone()), error.clone()),
            };
            self.failure = Failure::AuthLost {
                error,
                checked: mono,
            };
            return lost;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let delay = self.backoff_delay(rules, error, now, mono, unit);
        self.failure = Failure::Backoff {
            until: instant_after(mono, delay),
            error: error.clone(),
        };
        None
    }

    /// How long callers fail fast after a transient failure.
    fn backoff_delay(
        &self,
        rules: &Rules,
        error: &RefreshError,
        now: SystemTime,
        mono: Instant,
        unit: f64,
    ) -> Duration {
        let backoff = &rules.config.backoff;
        let mut delay = backoff.delay(self.consecutive_failures, unit, error.retry_after());
        // The flight failed otherwise after the source asked for quiet (a store call
        // panicked, say): the source's `Retry-After` still holds, counted from its
        // answer (C9).
        let carried = self
            .source_retry_after
            .filter(|_| error.retry_after().is_none());
        #[cfg(test)]
        let carried = carried.filter(|_| !self.plant.c9_forget_retry_after);
        if let Some((at, after)) = carried {
            let asked = after.min(backoff.max_retry_after);
            let left = instant_after(at, asked).saturating_duration_since(mono);
            delay = delay.max(left);
        }
        // While the current token still works, the next try must come before it
        // expires, or callers would fail in the gap (C16). A server's Retry-After is
        // honoured as it is.
        if error.retry_after().is_none() && carried.is_none() {
            let left = self
                .valid_current(rules, now)
                .and_then(|token| token.remaining(now));
            if let Some(left) = left {
                delay = delay.min(left / 2);
            }
        }
        delay
    }
}

impl<H> Machine<H> {
    /// What a caller that drove a refresh-ahead flight for `token` gets when the flight
    /// failed: the token still valid at the end if it is this one or newer, else this
    /// token under its current number ([C6](crate#c6), [C9](crate#c9)).
    pub(super) fn ahead_fallback(
        &self,
        fallback: Option<Arc<Token>>,
        token: Arc<Token>,
    ) -> Arc<Token> {
        let generation = self.resolve_alias(token.generation());
        #[cfg(test)]
        if self.plant.c6_pre_flight_copy {
            return token;
        }
        fallback
            .filter(|valid| valid.generation() >= generation)
            .unwrap_or_else(|| self.under_current_number(token))
    }
}
