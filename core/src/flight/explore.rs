//! The explorer: drives the state machine directly, with no async code, through every
//! interleaving of a small configuration's events up to a bounded depth, and checks the
//! contracts' invariants after every step. States are deduplicated by a hash of their
//! whole `Debug` form (tokens are told apart by generation, expiry and obtained time;
//! secrets never print). Planted bugs ([`Plant`]) must each be found.
//!
//! The world: one coordinator (the machine), the shared store's record, at most one
//! flight (its phase: about to load under the lock, or waiting for the source), three
//! callers, and budgets for the outside events: a login and its save, another
//! replica's save (with a push, or a low-numbered login after a corrupt record), a
//! store failure, clock steps (into the refresh-ahead window, into the leeway, past the
//! expiry, past the reload throttle), and rejections of the current and of an older
//! generation.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::machine::{AfterLoad, Ask, FlightKind, Flown, Join, Machine, Plant, Rules, Started};
use crate::config::FlightConfig;
use crate::error::RefreshError;
use crate::source::RefreshReason;
use crate::token::Token;

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
enum Phase {
    /// About to load the store under its lock; `login_tried` as in `after_load`.
    Load { login_tried: bool },
    /// Waiting for the source.
    Source { stored: Option<u64> },
}

#[derive(Clone, Debug)]
struct Flight {
    started: Started,
    phase: Phase,
}

#[derive(Clone, Debug)]
enum Caller {
    Idle,
    /// Waiting for the flight; `ahead`: the still-valid token a refresh-ahead caller holds.
    Waiting {
        ask: Ask,
        ahead: Option<Arc<Token>>,
    },
    Done,
}

#[derive(Clone, Debug)]
struct World {
    m: Machine<()>,
    /// Time since the start, wall and monotonic (the wall clock only steps forward here).
    elapsed: Duration,
    store: Option<Token>,
    /// The store's record is another replica's login saved after "re-authentication
    /// required" began: a reload must adopt it while it is usable and newer.
    replica_login: bool,
    flight: Option<Flight>,
    callers: [Caller; 3],
    /// The source asked for quiet until then (monotonic, since the start) ([C9](crate#c9)).
    quiet_until: Option<Duration>,
    logins: u8,
    replicas: u8,
    store_faults: u8,
    steps: u8,
    rejections: u8,
    answers: u8,
    secrets: u32,
}

/// One explored configuration's figures.
#[derive(Debug, Default)]
pub(super) struct Explored {
    pub(super) states: usize,
    pub(super) max_depth: usize,
    /// The first violation found: (invariant, depth, trace).
    pub(super) violation: Option<(&'static str, usize, Vec<String>)>,
}

struct Clocks {
    wall: SystemTime,
    mono: Instant,
}

impl Clocks {
    fn at(&self, elapsed: Duration) -> (SystemTime, Instant) {
        (self.wall + elapsed, self.mono + elapsed)
    }
}

type Step = Result<World, &'static str>;

impl World {
    fn new(plant: Plant, initial: Option<Token>, store: Option<Token>) -> Self {
        let mut m = Machine::new(initial);
        m.plant = plant;
        World {
            m,
            elapsed: Duration::ZERO,
            store,
            replica_login: false,
            flight: None,
            callers: [Caller::Idle, Caller::Idle, Caller::Idle],
            quiet_until: None,
            logins: 1,
            replicas: 1,
            store_faults: 1,
            steps: 3,
            rejections: 2,
            answers: 4,
            secrets: 0,
        }
    }

    fn token(&mut self, now: SystemTime) -> Token {
        self.secrets += 1;
        Token::new(format!("secret-{}", self.secrets))
            .expires_in(HOUR, now)
            .obtained_at(now)
    }

    fn digest(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        format!("{self:?}").hash(&mut hasher);
        hasher.finish()
    }
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Ask(usize),
    Reject { caller: usize, old: bool },
    Load,
    LoadFails,
    SaveLoginFails,
    SourceOk,
    SourceRetryAfter,
    SourceRetryAfterThenStorePanics,
    SourceInvalidGrant,
    Login,
    LoginSaved,
    ReplicaSaves { push: bool },
    ReplicaLowLogin,
    Step(Target),
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Ahead,
    Leeway,
    Expired,
    Throttle,
}

struct Explorer<'a> {
    rules: &'a Rules,
    clocks: &'a Clocks,
}

impl Explorer<'_> {
    fn events(&self, w: &World) -> Vec<Event> {
        let mut events = Vec::new();
        for (i, caller) in w.callers.iter().enumerate() {
            if matches!(caller, Caller::Idle) {
                events.push(Event::Ask(i));
                if w.rejections > 0 && w.m.current().is_some() {
                    events.push(Event::Reject {
                        caller: i,
                        old: false,
                    });
                    events.push(Event::Reject {
                        caller: i,
                        old: true,
                    });
                }
            }
        }
        match w.flight.as_ref().map(|f| &f.phase) {
            Some(Phase::Load { login_tried }) => {
                events.push(Event::Load);
                if w.store_faults > 0 {
                    events.push(Event::LoadFails);
                    if !login_tried && w.m.has_unsaved_login() {
                        events.push(Event::SaveLoginFails);
                    }
                }
            }
            Some(Phase::Source { .. }) if w.answers > 0 => {
                events.extend([
                    Event::SourceOk,
                    Event::SourceRetryAfter,
                    Event::SourceRetryAfterThenStorePanics,
                    Event::SourceInvalidGrant,
                ]);
            }
            _ => {}
        }
        if w.logins > 0 {
            events.push(Event::Login);
        }
        if w.m.has_unsaved_login() && w.flight.is_none() {
            events.push(Event::LoginSaved);
        }
        if w.replicas > 0 {
            events.extend([
                Event::ReplicaSaves { push: true },
                Event::ReplicaSaves { push: false },
                Event::ReplicaLowLogin,
            ]);
        }
        if w.steps > 0 {
            events.extend(
                [
                    Target::Ahead,
                    Target::Leeway,
                    Target::Expired,
                    Target::Throttle,
                ]
                .map(Event::Step),
            );
        }
        events
    }

    fn apply(&self, mut w: World, event: Event) -> Step {
        let (now, mono) = self.clocks.at(w.elapsed);
        match event {
            Event::Ask(i) => self.ask(w, i, now, mono),
            Event::Reject { caller, old } => {
                w.rejections -= 1;
                let current = w.m.current().map_or(0, |t| t.generation());
                let generation = if old {
                    current.saturating_sub(1)
                } else {
                    current
                };
                let generation = w.m.resolve_alias(generation);
                let fresh_before = w.m.usable_current(self.rules, now);
                match w.m.record_rejection(self.rules, generation, now) {
                    Some(token) if token.generation() <= generation => return Err("C3"),
                    Some(_) => {}
                    None => {
                        if fresh_before.is_some_and(|t| t.generation() > generation) {
                            return Err("C3");
                        }
                        let ask = Ask {
                            reason: RefreshReason::Rejected,
                            replaces: Some(generation),
                        };
                        return self.join(w, caller, ask, None, now, mono);
                    }
                }
                Ok(w)
            }
            Event::Load | Event::LoadFails | Event::SaveLoginFails => {
                self.load(w, event, now, mono)
            }
            Event::SourceOk
            | Event::SourceRetryAfter
            | Event::SourceRetryAfterThenStorePanics
            | Event::SourceInvalidGrant => self.answer(w, event, now, mono),
            Event::Login => {
                w.logins -= 1;
                let token = w.token(now);
                w.m.install(token);
                // A login ends any backoff ([C9](crate#c9)).
                w.quiet_until = None;
                Ok(w)
            }
            Event::LoginSaved => {
                if let Some(login) = w.m.login_to_save(w.store.as_ref()) {
                    w.store = Some((*login).clone());
                    w.replica_login = false;
                    w.m.login_saved(login.generation());
                }
                Ok(w)
            }
            Event::ReplicaSaves { push } => {
                w.replicas -= 1;
                let generation = w
                    .store
                    .as_ref()
                    .map_or(0, Token::generation)
                    .max(w.m.current().map_or(0, |t| t.generation()))
                    + 1;
                let token = w.token(now).with_generation(generation);
                w.replica_login = w.m.is_auth_lost();
                w.store = Some(token.clone());
                if push && w.m.adopt_pushed(self.rules, token, now).is_some() {
                    // An adopted push ends any backoff, as a flight's adoption would.
                    w.quiet_until = None;
                }
                Ok(w)
            }
            Event::ReplicaLowLogin => {
                // A corrupt record restarted the store's numbering; a replica's login
                // then took generation 2.
                w.replicas -= 1;
                let token = w.token(now).with_generation(2);
                w.replica_login = w.m.is_auth_lost();
                w.store = Some(token);
                Ok(w)
            }
            Event::Step(target) => self.step(w, target, now),
        }
    }
}

impl Explorer<'_> {
    fn ask(&self, w: World, i: usize, now: SystemTime, mono: Instant) -> Step {
        let current = w.m.current().cloned();
        let assessment = current.as_ref().map(|t| w.m.assess(self.rules, t, now));
        let reason = match assessment {
            None => RefreshReason::Initial,
            Some(a) if a.usable() && a != super::machine::Assessment::RefreshAhead => {
                let mut w = w;
                w.callers[i] = Caller::Done;
                return Ok(w);
            }
            Some(super::machine::Assessment::RefreshAhead) => RefreshReason::RefreshAhead,
            Some(super::machine::Assessment::Rejected) => RefreshReason::Rejected,
            Some(_) => RefreshReason::Expired,
        };
        let ask = Ask {
            reason,
            replaces: current.as_ref().map(|t| t.generation()),
        };
        let ahead = current.filter(|_| reason == RefreshReason::RefreshAhead);
        self.join(w, i, ask, ahead, now, mono)
    }

    fn join(
        &self,
        mut w: World,
        i: usize,
        ask: Ask,
        ahead: Option<Arc<Token>>,
        now: SystemTime,
        mono: Instant,
    ) -> Step {
        let live = w.m.flight.as_ref().map(|(id, ())| *id);
        let only_if_idle = ahead.is_some();
        match w.m.join(self.rules, ask, only_if_idle, live, now, mono) {
            Join::Ready(token) => {
                // Never a rejected or expired token; for a rejection, a newer one (C3, C4).
                let replaces = ask.replaces.map(|g| w.m.resolve_alias(g));
                let stale = ask.reason == RefreshReason::Rejected
                    && replaces.is_some_and(|g| token.generation() <= g);
                if !w.m.assess(self.rules, &token, now).valid() || stale {
                    return Err("C3");
                }
                w.callers[i] = Caller::Done;
            }
            Join::Failed(_) => {
                let valid =
                    w.m.current()
                        .is_some_and(|t| w.m.assess(self.rules, t, now).valid());
                if ask.reason != RefreshReason::Forced && valid {
                    return Err("C16");
                }
                w.callers[i] = Caller::Done;
            }
            Join::Wait(_) => w.callers[i] = Caller::Waiting { ask, ahead },
            Join::Busy => w.callers[i] = Caller::Done,
            Join::Start(started) => {
                if w.flight.is_some() {
                    return Err("C1");
                }
                let quiet = w.quiet_until.is_some_and(|until| w.elapsed < until);
                if quiet && started.kind != FlightKind::Reload {
                    return Err("C9");
                }
                w.m.flight = Some((started.id, ()));
                w.flight = Some(Flight {
                    started,
                    phase: Phase::Load { login_tried: false },
                });
                w.callers[i] = Caller::Waiting { ask, ahead };
            }
        }
        Ok(w)
    }

    fn load(&self, mut w: World, event: Event, now: SystemTime, mono: Instant) -> Step {
        let Some(flight) = w.flight.clone() else {
            return Ok(w);
        };
        let Phase::Load { login_tried } = flight.phase else {
            return Ok(w);
        };
        let started = flight.started;
        if started.kind == FlightKind::Reload {
            return self.reload(w, event, now, mono);
        }
        match event {
            Event::LoadFails => {
                w.store_faults -= 1;
                if !login_tried && w.m.has_unsaved_login() {
                    w.flight = Some(Flight {
                        started,
                        phase: Phase::Load { login_tried: true },
                    });
                    return Ok(w);
                }
                return self.finish(
                    w,
                    Err(RefreshError::transient("the store failed")),
                    now,
                    mono,
                );
            }
            Event::SaveLoginFails => w.store_faults -= 1,
            _ => {}
        }
        let stored = w.store.clone();
        let stored_generation = stored.as_ref().map(Token::generation);
        let phase = match w.m.after_load(
            self.rules,
            stored,
            started.ask,
            started.epoch,
            login_tried,
            now,
        ) {
            AfterLoad::SaveLogin(login) => {
                if !matches!(event, Event::SaveLoginFails) {
                    w.store = Some((*login).clone());
                    w.replica_login = false;
                    w.m.login_saved(login.generation());
                }
                Phase::Load { login_tried: true }
            }
            AfterLoad::Superseded => {
                return self.finish(w, Err(super::machine::superseded_by_login()), now, mono);
            }
            AfterLoad::Ready(token) | AfterLoad::Adopted(token) => {
                return self.finish(
                    w,
                    Ok(Flown {
                        token,
                        saved: false,
                    }),
                    now,
                    mono,
                );
            }
            AfterLoad::Fetch { .. } => Phase::Source {
                stored: stored_generation,
            },
        };
        w.flight = Some(Flight { started, phase });
        Ok(w)
    }

    fn reload(&self, mut w: World, event: Event, now: SystemTime, mono: Instant) -> Step {
        let lost = match w.m.reload_cause() {
            Ok(lost) => lost,
            Err(error) => return self.finish(w, Err(error), now, mono),
        };
        let stored = match event {
            Event::LoadFails => {
                w.store_faults -= 1;
                None
            }
            _ => w.store.clone(),
        };
        let current = w.m.current().map_or(0, |t| t.generation());
        let owed = w.replica_login
            && stored.as_ref().is_some_and(|s| {
                s.generation() > current && w.m.assess(self.rules, s, now).usable()
            });
        match w.m.reload_adopt(self.rules, stored, now) {
            Some(token) => self.finish(
                w,
                Ok(Flown {
                    token,
                    saved: false,
                }),
                now,
                mono,
            ),
            None if owed => Err("C17"),
            None => self.finish(w, Err(lost), now, mono),
        }
    }

    fn answer(&self, mut w: World, event: Event, now: SystemTime, mono: Instant) -> Step {
        let Some(Flight {
            started,
            phase: Phase::Source { stored },
        }) = w.flight.clone()
        else {
            return Ok(w);
        };
        w.answers -= 1;
        let quiet = Duration::from_secs(30);
        let error = match event {
            Event::SourceOk => {
                let Some((generation, _)) = w.m.number(true, None, stored, started.epoch, mono)
                else {
                    return self.finish(w, Err(super::machine::superseded_by_login()), now, mono);
                };
                let token = Arc::new(w.token(now).with_generation(generation));
                w.store = Some((*token).clone());
                w.replica_login = false;
                return self.finish(w, Ok(Flown { token, saved: true }), now, mono);
            }
            Event::SourceRetryAfter => RefreshError::transient("503").with_retry_after(quiet),
            Event::SourceRetryAfterThenStorePanics => RefreshError::transient("the store panicked"),
            _ => RefreshError::permanent("invalid_grant"),
        };
        let asked = !matches!(event, Event::SourceInvalidGrant);
        w.m.number(false, asked.then_some(quiet), stored, started.epoch, mono);
        if asked && started.epoch == w.m.login_epoch() {
            w.quiet_until = Some(w.elapsed + quiet);
        }
        self.finish(w, Err(error), now, mono)
    }
}

impl Explorer<'_> {
    fn finish(
        &self,
        mut w: World,
        result: Result<Flown, RefreshError>,
        now: SystemTime,
        mono: Instant,
    ) -> Step {
        let Some(flight) = w.flight.take() else {
            return Ok(w);
        };
        let before = w.m.current().cloned();
        let superseded = w.m.login_epoch() != flight.started.epoch;
        let finished =
            w.m.finish(self.rules, &flight.started, result, (now, mono, 0.5));
        if w.m.flight.is_some() {
            return Err("C1");
        }
        let after = w.m.current().cloned();
        if superseded && before.map(|t| t.generation()) != after.map(|t| t.generation()) {
            return Err("C17");
        }
        let output = finished.output;
        if output.result.is_ok() && !output.superseded {
            w.quiet_until = None;
        }
        for i in 0..w.callers.len() {
            let Caller::Waiting { ask, ahead } = w.callers[i].clone() else {
                continue;
            };
            w.callers[i] = Caller::Done;
            if let Some(token) = ahead {
                if output.result.is_err() {
                    let resolved = w.m.resolve_alias(token.generation());
                    let got = w.m.ahead_fallback(output.fallback.clone(), token);
                    if got.generation() < resolved {
                        return Err("C6");
                    }
                }
                continue;
            }
            if output.superseded {
                if w.m.login_serves(self.rules, ask, now).is_none() {
                    w.callers[i] = Caller::Idle;
                }
                continue;
            }
            match &output.result {
                Ok(token) if w.m.is_rejected(token.generation()) => return Err("C4"),
                Ok(_) => {}
                Err(_) if output.fallback.is_some() || ask.reason == RefreshReason::Forced => {}
                Err(_) => {
                    let valid =
                        w.m.current()
                            .is_some_and(|t| w.m.assess(self.rules, t, now).valid());
                    if valid {
                        return Err("C16");
                    }
                }
            }
        }
        Ok(w)
    }

    fn step(&self, mut w: World, target: Target, now: SystemTime) -> Step {
        w.steps -= 1;
        let config = &self.rules.config;
        let current = w.m.current().cloned();
        let expiry = current.as_ref().and_then(|t| t.expiry());
        let leeway = current
            .as_ref()
            .map_or(Duration::ZERO, |t| config.leeway_for(t));
        let to = match (target, expiry) {
            (Target::Ahead, Some(expiry)) => expiry.checked_sub(leeway + Duration::from_secs(1)),
            (Target::Leeway, Some(expiry)) => expiry.checked_sub(leeway / 2),
            (Target::Expired, Some(expiry)) => expiry.checked_add(Duration::from_secs(1)),
            (Target::Throttle, _) => now.checked_add(config.min_refresh_interval * 2),
            _ => None,
        };
        let Some(forward) = to.and_then(|to| to.duration_since(now).ok()) else {
            return Ok(w);
        };
        w.elapsed += forward;
        Ok(w)
    }
}

/// The invariants every reachable state keeps.
fn check(w: &World) -> Result<(), &'static str> {
    // C1: the machine's flight slot and the flight in progress agree (one at a time).
    if w.flight.is_some() != w.m.flight.is_some() {
        return Err("C1");
    }
    // C5: nobody waits for a flight that is not running: a flight's end releases
    // every waiter (with the outcome, or back to idle to ask again after a login).
    if w.flight.is_none()
        && w.callers
            .iter()
            .any(|c| matches!(c, Caller::Waiting { .. }))
    {
        return Err("C5");
    }
    // C17: a login not yet saved is in use here: it (or its renumbered copy) is current.
    if w.m.has_unsaved_login() && w.m.current().is_none() {
        return Err("C17");
    }
    Ok(())
}

/// Explores every interleaving from the initial world up to `depth` events.
fn explore(plant: Plant, setup: Setup, depth: usize) -> Explored {
    let clocks = Clocks {
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        mono: Instant::now(),
    };
    let rules = Rules {
        config: FlightConfig::default(),
        jitter: RandomState::new(),
    };
    let explorer = Explorer {
        rules: &rules,
        clocks: &clocks,
    };
    let (initial, store) = setup.world(clocks.wall);
    let mut start = World::new(plant, initial, store);
    if let Setup::InitialOverOlderSession = setup {
        // The login is the initial token: no second one, one rejection.
        start.logins = 0;
        start.rejections = 1;
    }
    let mut seen = HashSet::new();
    seen.insert(start.digest());
    let mut queue = VecDeque::from([(start, Vec::<Event>::new())]);
    let mut explored = Explored::default();
    while let Some((world, trace)) = queue.pop_front() {
        explored.states += 1;
        explored.max_depth = explored.max_depth.max(trace.len());
        if trace.len() >= depth {
            continue;
        }
        for event in explorer.events(&world) {
            let mut next_trace = trace.clone();
            next_trace.push(event);
            let step = explorer
                .apply(world.clone(), event)
                .and_then(|w| check(&w).map(|()| w));
            match step {
                Err(invariant) => {
                    let trace = next_trace.iter().map(|e| format!("{e:?}")).collect();
                    explored.violation = Some((invariant, next_trace.len(), trace));
                    return explored;
                }
                Ok(next) => {
                    if seen.insert(next.digest()) {
                        queue.push_back((next, next_trace));
                    }
                }
            }
        }
    }
    explored
}

/// The starting points.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// No token, an empty store.
    Empty,
    /// An initial token (a login, unsaved) and an older session in the store with a
    /// higher number.
    InitialOverOlderSession,
}

impl Setup {
    fn world(self, wall: SystemTime) -> (Option<Token>, Option<Token>) {
        match self {
            Setup::Empty => (None, None),
            Setup::InitialOverOlderSession => (
                Some(
                    Token::new("initial")
                        .expires_in(HOUR, wall)
                        .obtained_at(wall)
                        .with_generation(1),
                ),
                Some(
                    Token::new("older")
                        .expires_in(HOUR, wall)
                        .obtained_at(wall)
                        .with_generation(5),
                ),
            ),
        }
    }
}

fn depth() -> usize {
    std::env::var("TOKENFLIGHT_EXPLORE_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(6)
}

/// Every reachable state of both setups keeps the invariants.
#[test]
fn c1_to_c18_hold_in_every_explored_state() {
    for setup in [Setup::Empty, Setup::InitialOverOlderSession] {
        let began = std::time::Instant::now();
        let explored = explore(Plant::default(), setup, depth());
        eprintln!(
            "explorer: {setup:?}: {} states to depth {} in {:?}",
            explored.states,
            explored.max_depth,
            began.elapsed()
        );
        assert!(explored.violation.is_none(), "{:?}", explored.violation);
        assert!(explored.states > 1_000);
    }
}

/// Each planted bug is found: the first violated invariant and the depth.
#[test]
fn the_explorer_finds_every_planted_bug() {
    let plants: [(&str, Plant, Setup); 5] = [
        (
            "C9 Retry-After forgotten after a store panic",
            Plant {
                c9_forget_retry_after: true,
                ..Plant::default()
            },
            Setup::Empty,
        ),
        (
            "C16 valid token refused after invalid_grant",
            Plant {
                c16_refuse_valid_after_invalid_grant: true,
                ..Plant::default()
            },
            Setup::Empty,
        ),
        (
            "C6 pre-flight copy of a renumbered token",
            Plant {
                c6_pre_flight_copy: true,
                ..Plant::default()
            },
            Setup::InitialOverOlderSession,
        ),
        (
            "C17 unsaved login keeps a replica's login out",
            Plant {
                c17_unsaved_login_blocks_replica: true,
                ..Plant::default()
            },
            Setup::InitialOverOlderSession,
        ),
        (
            "C17 replica login admitted by generation only",
            Plant {
                c17_replica_login_by_generation: true,
                ..Plant::default()
            },
            Setup::InitialOverOlderSession,
        ),
    ];
    let mut missed = Vec::new();
    for (bug, plant, setup) in plants {
        let began = std::time::Instant::now();
        let explored = explore(plant, setup, depth() + 3);
        match explored.violation {
            Some((invariant, depth, trace)) => eprintln!(
                "planted: {bug}: {invariant} at depth {depth} after {} states, {:?}: {trace:?}",
                explored.states,
                began.elapsed()
            ),
            None => {
                eprintln!("planted: {bug}: NOT FOUND in {} states", explored.states);
                missed.push(bug);
            }
        }
    }
    assert!(missed.is_empty(), "missed: {missed:?}");
}
