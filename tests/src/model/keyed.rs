//! A second, smaller runner (issue 26, items 4–5): a keyed [`AuthPolicy`] whose keys'
//! coordinators are evicted while their requests are in flight, and whose keys are
//! looked up again and again while the policy's (manual) clock moves.
//!
//! Three keys, one per origin (`https://k0.test` …, the policy's default key); each
//! coordinator the factory makes has its own source, whose calls stay pending until the
//! scenario answers them, and (with [`KeyedSetup::store`]) the key's store, shared by
//! every coordinator of that key as a namespaced store is. Coordinators are evicted
//! deterministically: the idle timeout is zero, so every write of the map (a new key
//! that finds it full, [`KeyedOp::Evict`]) may drop every coordinator not in use; or,
//! with [`KeyedSetup::idle`], it is [`IDLE_TIMEOUT`] on the policy's clock, which
//! [`KeyedOp::Advance`] moves, and only `evict_idle` evicts (a map of ten, three keys).
//! The same executor discipline as the main runner: only woken tasks are polled, in the
//! order the scenario picks.
//!
//! Checked after every step:
//!
//! - **C1 per key**: at most one source call of a key is in flight at any instant,
//!   whichever coordinator makes it.
//! - **C22**: never two live coordinators of one key that both refresh: a source call
//!   of a coordinator while another live coordinator of its key made a source call
//!   since the first was made is a second refresh for the key. And a coordinator is
//!   never evicted while in use (a task that looked its key up holds a handle until it
//!   ends) nor, at `evict_idle`, when its key was looked up less than the idle timeout
//!   ago: when a key gets a new coordinator, the old one must have been evictable at
//!   one of the map's eviction points since it was made.
//! - **C12 per key**: a request to key B's origin never carries a token of key A.
//! - **C4**: a request is sent at most twice, and a resend carries another token.
//!
//! At the end every request is answered, every source call returns a token, and time
//! passes until every caller has finished; one still pending is a hang (C5/C6). The
//! property `c1_c22_a_key_evicted_while_its_requests_are_in_flight_gets_no_second_coordinator`
//! generates scenarios with proptest; the `keyed_ops` fuzz target decodes them with
//! `arbitrary`.
//!
//! The keyed map measures idleness on the policy's clock (issue 26's fix of item 4), the
//! runner's manual clock.

// Indices below come from the runner's own vectors (positions found in them, or taken
// modulo their length), never from raw input.
#![allow(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arbitrary::Arbitrary;
use futures::future::BoxFuture;
use tokenflight::{
    AuthPolicy, Error, RefreshContext, RefreshError, Token, TokenSource, adapter::AuthError,
    adapter::RequestOptions, keyed::TokenKey, store::MemoryStore, test_util::ManualClock,
};
use url::Url;

use super::{
    CallState, Flag, Lifetime, MAX_CALLERS, ModelRequest, ModelResponse, Outcome, PLANTED, Step,
    Violation, answer_or_park, lock, panic_message, quiet_planted_panics,
};

/// The keys (origins) a keyed scenario uses.
pub const KEYS: usize = 3;
/// Polls one `Settle` may make before the runner calls it a livelock.
const SETTLE_LIMIT: usize = 5_000;
/// Rounds of "answer everything, let time pass" the final drain may take.
const DRAIN_ROUNDS: usize = 100;
/// The idle timeout of [`KeyedSetup::idle`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A generated keyed run.
#[derive(Clone, Debug, Arbitrary)]
pub struct KeyedScenario {
    /// The policy's configuration.
    pub setup: KeyedSetup,
    /// The steps, applied in order.
    pub ops: Vec<KeyedOp>,
}

/// How the keyed policy under test is built.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub struct KeyedSetup {
    /// At most one coordinator kept (`key_bounds(1, ..)`): every new key evicts the
    /// others that are not in use. Else ten, and only [`KeyedOp::Evict`] evicts.
    /// Ignored with [`idle`](Self::idle) (ten: with a map of one, least-recently-used
    /// eviction between keys of the same age would follow the hash map's order).
    pub one_coordinator: bool,
    /// An idle timeout of [`IDLE_TIMEOUT`] on the policy's (manual) clock instead of
    /// zero: a key looked up less than that ago is not idle (issue 26, item 4).
    pub idle: bool,
    /// Each key has a store, shared by every coordinator made for it (a namespaced
    /// store): a new coordinator of an evicted key reads the old one's token there.
    pub store: bool,
}

/// One step of a keyed scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum KeyedOp {
    /// A new caller sends a request to key `key % KEYS`'s origin.
    Send {
        /// Which key (origin).
        key: u8,
        /// Whether the request's body can be replayed.
        replayable: bool,
    },
    /// A new caller asks the keyed map for a token of key `key % KEYS`.
    Token {
        /// Which key.
        key: u8,
    },
    /// Polls the n-th woken task (modulo their number).
    Poll(u8),
    /// Polls woken tasks in order until none is woken.
    Settle,
    /// The API server answers the n-th pending request.
    Respond {
        /// Which pending request.
        n: u8,
        /// 200 if true, 401 if false.
        accept: bool,
    },
    /// The n-th pending source call (any key) returns.
    Source {
        /// Which pending call.
        n: u8,
        /// What it returns.
        outcome: Outcome,
    },
    /// Drops the n-th live caller.
    Cancel(u8),
    /// Moves the clock.
    Advance(Step),
    /// `KeyedFlights::evict_idle`: drops every coordinator whose refresh is not running.
    Evict,
}

/// What a keyed run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyedSummary {
    /// Callers started.
    pub callers: usize,
    /// Coordinators the factory made.
    pub coordinators: usize,
    /// Coordinators made for a key that had one before (after an eviction).
    pub remade: usize,
    /// Source calls.
    pub source_calls: usize,
    /// Requests on the wire.
    pub requests: usize,
    /// Requests sent a second time.
    pub resends: usize,
    /// Source calls while another coordinator of the key was alive.
    pub calls_beside_an_old_coordinator: usize,
    /// Evictions ([`KeyedOp::Evict`], or a request of a new key to a map of one) while
    /// a request of another key was on the wire.
    pub evictions_in_flight: usize,
}

// ---------------------------------------------------------------------------------------

struct Call {
    key: usize,
    coordinator: usize,
    state: CallState,
    waker: Option<Waker>,
}

struct Coordinator {
    key: usize,
    alive: bool,
    /// The event number when it was made.
    made: usize,
    /// Event numbers of its source calls.
    calls: Vec<usize>,
    /// `points.len()` when it was made: the eviction points it was in the map for.
    made_at_point: usize,
}

/// A moment the map may evict (C22: only coordinators not in use, and at
/// `evict_idle` only those also unused for the idle timeout): per key, whether the
/// model knows it in use then.
struct Point {
    /// `KeyedOp::Evict` (else a new key's insert, which may evict the least recently
    /// used coordinator that is not in use).
    evict: bool,
    used: [bool; KEYS],
}

struct Wire {
    caller: usize,
    key: usize,
    access: Option<String>,
    answer: Option<bool>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct KeyedShared {
    calls: Vec<Call>,
    coordinators: Vec<Coordinator>,
    wire: Vec<Wire>,
    /// Counts factory calls and source calls: their order.
    events: usize,
    /// A contract broken inside a fake (at a source call's start).
    violation: Option<(&'static str, String)>,
    calls_beside_an_old_coordinator: usize,
    /// Per key, live tasks that have been polled: each holds a handle to the key's
    /// coordinator (from its lookup at the first poll until it ends).
    holders: [usize; KEYS],
    /// Per key, the clock (since the start) at its last lookup.
    last_lookup: [Option<Duration>; KEYS],
    /// The clock since the start.
    now: Duration,
    /// The idle timeout (zero, or [`IDLE_TIMEOUT`]).
    idle: Duration,
    /// Every moment the map may have evicted.
    points: Vec<Point>,
}

impl KeyedShared {
    /// Per key, whether the model knows it in use now: a handle held, or (`evict`:
    /// for the idle rule) a lookup less than the idle timeout ago (1 ms of slack for
    /// the map's millisecond readings).
    fn used(&self, evict: bool) -> [bool; KEYS] {
        std::array::from_fn(|k| {
            self.holders[k] > 0
                || (evict
                    && self.last_lookup[k].is_some_and(|at| {
                        self.now.saturating_sub(at) + Duration::from_millis(1) < self.idle
                    }))
        })
    }
}

/// C22 at a new coordinator for `key`: the one before it (if any) was evicted at one
/// of the points since it was made; if the model knew it in use at every one of them,
/// it was evicted in use (or, at `evict_idle`, used less than the idle timeout ago).
fn remade_check(shared: &mut KeyedShared, key: usize) {
    let Some((index, previous)) = shared
        .coordinators
        .iter()
        .enumerate()
        .rev()
        .find(|(_, c)| c.key == key)
    else {
        return;
    };
    let points = &shared.points[previous.made_at_point.min(shared.points.len())..];
    if shared.violation.is_none() && points.iter().all(|p| p.used[key]) {
        let message = format!(
            "coordinator {} of key {key} was evicted although in use at every chance the \
             map had ({} eviction points: {} evict_idle, the others new keys){}",
            index + 1,
            points.len(),
            points.iter().filter(|p| p.evict).count(),
            if points.is_empty() {
                " (none at all)"
            } else {
                ""
            }
        );
        shared.violation = Some(("C22", message));
    }
}

fn key_url(key: usize) -> Url {
    #[allow(clippy::expect_used)] // a constant, valid URL
    Url::parse(&format!("https://k{key}.test/resource")).expect("valid URL")
}

fn key_of_access(access: &str) -> Option<usize> {
    access.strip_prefix('k')?.split('-').next()?.parse().ok()
}

/// The source of coordinator `coordinator` of key `key`; when the coordinator is
/// dropped (its last handle gone), so is this, and the coordinator counts as dead.
struct KeySource {
    shared: Arc<Mutex<KeyedShared>>,
    key: usize,
    coordinator: usize,
}

impl Drop for KeySource {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.shared).coordinators.get_mut(self.coordinator) {
            c.alive = false;
        }
    }
}

impl TokenSource for KeySource {
    fn fetch(&self, _cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        let mut shared = lock(&self.shared);
        let key = self.key;
        let index = shared.calls.len();
        let event = shared.events;
        shared.events += 1;
        if shared.violation.is_none() {
            if let Some(live) = shared
                .calls
                .iter()
                .position(|c| c.key == key && c.state.live())
            {
                shared.violation = Some((
                    "C1",
                    format!(
                        "source call {} of key {key} started while its call {} was in flight",
                        index + 1,
                        live + 1
                    ),
                ));
            }
        }
        let made = shared.coordinators[self.coordinator].made;
        let others: Vec<(usize, bool)> = shared
            .coordinators
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != self.coordinator && c.key == key && c.alive)
            .map(|(i, c)| (i, c.calls.iter().any(|&e| e >= made)))
            .collect();
        if !others.is_empty() {
            shared.calls_beside_an_old_coordinator += 1;
        }
        if let (None, Some(&(other, _))) = (
            &shared.violation,
            others.iter().find(|(_, refreshed)| *refreshed),
        ) {
            shared.violation = Some((
                "C22",
                format!(
                    "coordinator {} of key {key} calls its source while coordinator {} of the \
                     same key is alive and refreshed since it was made: two refreshes for one key",
                    self.coordinator + 1,
                    other + 1
                ),
            ));
        }
        shared.coordinators[self.coordinator].calls.push(event);
        shared.calls.push(Call {
            key,
            coordinator: self.coordinator,
            state: CallState::Pending,
            waker: None,
        });
        drop(shared);
        Box::pin(KeyCall {
            shared: Arc::clone(&self.shared),
            index,
        })
    }
}

struct KeyCall {
    shared: Arc<Mutex<KeyedShared>>,
    index: usize,
}

impl Future for KeyCall {
    type Output = Result<Token, RefreshError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let n = self.index;
        let Some(call) = shared.calls.get_mut(n) else {
            return Poll::Ready(Err(RefreshError::transient("unknown call")));
        };
        match call.state {
            CallState::Answered(outcome) => {
                call.state = CallState::Returned(outcome);
                let access = format!("k{}-c{}-{}", call.key, call.coordinator + 1, n + 1);
                Poll::Ready(match outcome {
                    // Lifetimes are not this runner's subject: an hour, whatever asked.
                    Outcome::Ok(_) => Ok(Token::new(access)),
                    Outcome::Transient(_) => Err(RefreshError::transient(format!(
                        "transient failure {}",
                        n + 1
                    ))),
                    Outcome::Permanent => {
                        Err(RefreshError::permanent(format!("invalid_grant {}", n + 1)))
                    }
                    Outcome::Panic => panic!("{PLANTED}: source panic"),
                })
            }
            _ => {
                call.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for KeyCall {
    fn drop(&mut self) {
        if let Some(call) = lock(&self.shared).calls.get_mut(self.index) {
            if call.state.live() {
                call.state = CallState::Dropped;
            }
        }
    }
}

struct KeyWire {
    shared: Arc<Mutex<KeyedShared>>,
    index: usize,
}

impl Future for KeyWire {
    type Output = Result<ModelResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let slot = shared
            .wire
            .get_mut(self.index)
            .map(|wire| (wire.answer, &mut wire.waker));
        answer_or_park(slot, self.index, cx)
    }
}

fn send_wire(shared: &Arc<Mutex<KeyedShared>>, caller: usize, request: &ModelRequest) -> KeyWire {
    let key = request
        .url
        .host_str()
        .and_then(|h| h.strip_prefix('k'))
        .and_then(|h| h.split('.').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(usize::MAX);
    let access = request
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut guard = lock(shared);
    let index = guard.wire.len();
    guard.wire.push(Wire {
        caller,
        key,
        access,
        answer: None,
        waker: None,
    });
    KeyWire {
        shared: Arc::clone(shared),
        index,
    }
}

#[derive(Debug)]
enum Finished {
    Response,
    Token(Result<Arc<Token>, Error>),
}

struct Task {
    key: usize,
    /// Polled at least once: it looked its key up and holds a handle.
    polled: bool,
    future: Option<Pin<Box<dyn Future<Output = Finished> + Send>>>,
    flag: Arc<Flag>,
    waker: Waker,
    done: bool,
    cancelled: bool,
}

impl Task {
    fn live(&self) -> bool {
        !self.done && !self.cancelled
    }
    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
}

struct KeyedWorld {
    setup: KeyedSetup,
    clock: ManualClock,
    policy: AuthPolicy,
    shared: Arc<Mutex<KeyedShared>>,
    tasks: Vec<Task>,
    step: usize,
    summary: KeyedSummary,
}

/// Runs a keyed scenario and checks C1 per key, C22, C12 per key and C4 after every
/// step; see the module docs.
pub fn run_keyed(scenario: &KeyedScenario) -> Result<KeyedSummary, Violation> {
    quiet_planted_panics();
    let mut world = KeyedWorld::new(scenario.setup)?;
    let result = (|| {
        for (step, op) in scenario.ops.iter().enumerate() {
            world.step = step;
            world.apply(*op)?;
            world.check()?;
        }
        world.step = scenario.ops.len();
        world.drain()
    })();
    world.shutdown();
    result.map(|()| world.summary)
}

impl KeyedWorld {
    fn new(setup: KeyedSetup) -> Result<Self, Violation> {
        let clock = ManualClock::at_fixed_point();
        let shared = Arc::new(Mutex::new(KeyedShared::default()));
        let stores: Arc<HashMap<String, MemoryStore>> = Arc::new(
            (0..KEYS)
                .map(|k| {
                    (
                        TokenKey::origin(&key_url(k)).as_str().to_owned(),
                        MemoryStore::new(),
                    )
                })
                .collect(),
        );
        let factory_shared = Arc::clone(&shared);
        let max_keys = if setup.one_coordinator && !setup.idle {
            1
        } else {
            10
        };
        let idle = if setup.idle {
            IDLE_TIMEOUT
        } else {
            Duration::ZERO
        };
        lock(&shared).idle = idle;
        let mut builder = AuthPolicy::builder()
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()));
        for key in 0..KEYS {
            builder = builder.allowed_origin(&format!("https://k{key}.test"));
        }
        let policy = builder
            .keyed(move |key: &TokenKey, flight| {
                let index = (0..KEYS)
                    .find(|&k| TokenKey::origin(&key_url(k)) == *key)
                    .unwrap_or(usize::MAX);
                let mut shared = lock(&factory_shared);
                remade_check(&mut shared, index);
                let used = shared.used(false);
                shared.points.push(Point { evict: false, used });
                let coordinator = shared.coordinators.len();
                let made = shared.events;
                shared.events += 1;
                let made_at_point = shared.points.len();
                shared.coordinators.push(Coordinator {
                    key: index,
                    alive: true,
                    made,
                    calls: Vec::new(),
                    made_at_point,
                });
                drop(shared);
                let mut flight = flight.source(KeySource {
                    shared: Arc::clone(&factory_shared),
                    key: index,
                    coordinator,
                });
                if setup.store {
                    if let Some(store) = stores.get(key.as_str()) {
                        flight = flight.store(store.clone());
                    }
                }
                flight.build()
            })
            .key_bounds(max_keys, Some(idle))
            .build()
            .map_err(|error| Violation {
                contract: "setup",
                step: 0,
                message: format!("the keyed policy was refused: {error}"),
            })?;
        Ok(KeyedWorld {
            setup,
            clock,
            policy,
            shared,
            tasks: Vec::new(),
            step: 0,
            summary: KeyedSummary::default(),
        })
    }

    fn shutdown(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in tasks {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(task)));
        }
        let shared = lock(&self.shared);
        self.summary.coordinators = shared.coordinators.len();
        self.summary.source_calls = shared.calls.len();
        self.summary.requests = shared.wire.len();
        self.summary.calls_beside_an_old_coordinator = shared.calls_beside_an_old_coordinator;
        let mut seen = [false; KEYS];
        for c in &shared.coordinators {
            if let Some(seen) = seen.get_mut(c.key) {
                if *seen {
                    self.summary.remade += 1;
                }
                *seen = true;
            }
        }
        let mut per_caller: HashMap<usize, usize> = HashMap::new();
        for w in &shared.wire {
            *per_caller.entry(w.caller).or_default() += 1;
        }
        self.summary.resends = per_caller.values().filter(|n| **n == 2).count();
    }

    fn violation(&self, contract: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            contract,
            step: self.step,
            message: message.into(),
        }
    }

    /// Whether a request of a key other than `key` (of any key: `None`) is on the wire.
    fn in_flight_besides(&self, key: Option<usize>) -> bool {
        lock(&self.shared)
            .wire
            .iter()
            .any(|w| w.answer.is_none() && Some(w.key) != key)
    }

    fn apply(&mut self, op: KeyedOp) -> Result<(), Violation> {
        let evicts = match op {
            KeyedOp::Evict => Some(None),
            KeyedOp::Send { key, .. } | KeyedOp::Token { key } if self.setup.one_coordinator => {
                Some(Some(usize::from(key) % KEYS))
            }
            _ => None,
        };
        if let Some(key) = evicts {
            if self.in_flight_besides(key) {
                self.summary.evictions_in_flight += 1;
            }
        }
        match op {
            KeyedOp::Send { key, replayable } => {
                self.start_send(usize::from(key) % KEYS, replayable)
            }
            KeyedOp::Token { key } => self.start_token(usize::from(key) % KEYS),
            KeyedOp::Poll(n) => {
                let woken: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].woken())
                    .collect();
                if !woken.is_empty() {
                    self.poll(woken[usize::from(n) % woken.len()])?;
                }
            }
            KeyedOp::Settle => self.settle()?,
            KeyedOp::Respond { n, accept } => {
                let waker = {
                    let mut shared = lock(&self.shared);
                    let pending: Vec<usize> = (0..shared.wire.len())
                        .filter(|&i| shared.wire[i].answer.is_none())
                        .collect();
                    if pending.is_empty() {
                        None
                    } else {
                        let wire = &mut shared.wire[pending[usize::from(n) % pending.len()]];
                        wire.answer = Some(accept);
                        wire.waker.take()
                    }
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            KeyedOp::Source { n, outcome } => self.answer_call(usize::from(n), outcome),
            KeyedOp::Cancel(n) => {
                let live: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live())
                    .collect();
                if !live.is_empty() {
                    let index = live[usize::from(n) % live.len()];
                    self.tasks[index].cancelled = true;
                    let future = self.tasks[index].future.take();
                    let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(future)));
                    self.release(index);
                    if let Err(panic) = dropped {
                        return Err(self.violation(
                            "C18",
                            format!("dropping task {index} panicked: {}", panic_message(&*panic)),
                        ));
                    }
                }
            }
            KeyedOp::Advance(step) => self.advance(step.duration()),
            KeyedOp::Evict => {
                {
                    let mut shared = lock(&self.shared);
                    let used = shared.used(true);
                    shared.points.push(Point { evict: true, used });
                }
                if let Some(flights) = self.policy.keyed() {
                    flights.evict_idle();
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
        lock(&self.shared).now += by;
    }

    /// A task ended (finished or dropped): if it was polled, it held a handle.
    fn release(&mut self, index: usize) {
        let task = &self.tasks[index];
        if task.polled {
            let mut shared = lock(&self.shared);
            if let Some(h) = shared.holders.get_mut(task.key) {
                *h = h.saturating_sub(1);
            }
        }
    }

    fn answer_call(&mut self, n: usize, outcome: Outcome) {
        let waker = {
            let mut shared = lock(&self.shared);
            let pending: Vec<usize> = (0..shared.calls.len())
                .filter(|&i| shared.calls[i].state == CallState::Pending)
                .collect();
            if pending.is_empty() {
                None
            } else {
                let call = &mut shared.calls[pending[n % pending.len()]];
                call.state = CallState::Answered(outcome);
                call.waker.take()
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn push(&mut self, key: usize, future: Pin<Box<dyn Future<Output = Finished> + Send>>) {
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        let waker = Waker::from(Arc::clone(&flag));
        self.tasks.push(Task {
            key,
            polled: false,
            future: Some(future),
            flag,
            waker,
            done: false,
            cancelled: false,
        });
        self.summary.callers += 1;
    }

    fn start_send(&mut self, key: usize, replayable: bool) {
        if self.tasks.len() >= MAX_CALLERS {
            return;
        }
        let id = self.tasks.len();
        let policy = self.policy.clone();
        let shared = Arc::clone(&self.shared);
        let request = ModelRequest {
            url: key_url(key),
            authorization: None,
            replayable,
        };
        self.push(
            key,
            Box::pin(async move {
                let send = |request: ModelRequest| send_wire(&shared, id, &request);
                let result: Result<ModelResponse, AuthError<Infallible>> =
                    policy.send(request, RequestOptions::default(), send).await;
                drop(result);
                Finished::Response
            }),
        );
    }

    fn start_token(&mut self, key: usize) {
        if self.tasks.len() >= MAX_CALLERS {
            return;
        }
        let policy = self.policy.clone();
        self.push(
            key,
            Box::pin(async move {
                let key = TokenKey::origin(&key_url(key));
                match policy.keyed() {
                    Some(flights) => Finished::Token(flights.token(&key).await),
                    None => Finished::Response,
                }
            }),
        );
    }

    fn poll(&mut self, index: usize) -> Result<(), Violation> {
        if !self.tasks[index].polled && self.tasks[index].future.is_some() {
            // The first poll looks the key up (a new coordinator, or a touch) and keeps
            // the handle until the task ends.
            self.tasks[index].polled = true;
            let key = self.tasks[index].key;
            let mut shared = lock(&self.shared);
            shared.holders[key] += 1;
            shared.last_lookup[key] = Some(shared.now);
        }
        let task = &mut self.tasks[index];
        let Some(future) = task.future.as_mut() else {
            return Ok(());
        };
        task.flag.0.store(false, Ordering::SeqCst);
        let mut cx = Context::from_waker(&task.waker);
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        match polled {
            Err(panic) => {
                task.done = true;
                task.future = None;
                self.release(index);
                Err(self.violation(
                    "C18",
                    format!("task {index} panicked: {}", panic_message(&*panic)),
                ))
            }
            Ok(Poll::Pending) => Ok(()),
            Ok(Poll::Ready(finished)) => {
                task.done = true;
                task.future = None;
                let key = task.key;
                self.release(index);
                if let Finished::Token(Ok(token)) = &finished {
                    let access = token.access().expose();
                    if key_of_access(access) != Some(key) {
                        return Err(self.violation(
                            "C12",
                            format!(
                                "task {index} asked for a token of key {key} and got {access:?}"
                            ),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    fn settle(&mut self) -> Result<(), Violation> {
        for _ in 0..SETTLE_LIMIT {
            let Some(index) =
                (0..self.tasks.len()).find(|&i| self.tasks[i].live() && self.tasks[i].woken())
            else {
                return Ok(());
            };
            self.poll(index)?;
        }
        Err(self.violation("C5", "settle did not end: a livelock"))
    }

    fn check(&mut self) -> Result<(), Violation> {
        let shared = lock(&self.shared);
        if let Some((contract, message)) = shared.violation.clone() {
            drop(shared);
            return Err(self.violation(contract, message));
        }
        let mut sent: HashMap<usize, Vec<&Option<String>>> = HashMap::new();
        for (i, wire) in shared.wire.iter().enumerate() {
            // C12 per key: the token on a request to key B's origin is one of key B's.
            if let Some(access) = &wire.access {
                if key_of_access(access) != Some(wire.key) {
                    let message = format!(
                        "request {i} to key {}'s origin carried a token of another key ({access:?})",
                        wire.key
                    );
                    drop(shared);
                    return Err(self.violation("C12", message));
                }
            }
            sent.entry(wire.caller).or_default().push(&wire.access);
        }
        for (caller, accesses) in &sent {
            let message = match accesses.as_slice() {
                [_] => continue,
                [first, second] if first != second => continue,
                [_, _] => format!("task {caller} resent its request with the same token"),
                more => format!("task {caller} sent its request {} times", more.len()),
            };
            drop(shared);
            return Err(self.violation("C4", message));
        }
        Ok(())
    }

    /// Answers everything and lets time pass until every caller has finished.
    fn drain(&mut self) -> Result<(), Violation> {
        for _ in 0..DRAIN_ROUNDS {
            self.settle()?;
            self.check()?;
            if self.tasks.iter().all(|t| !t.live()) {
                return Ok(());
            }
            let (wakers, pending_calls): (Vec<Waker>, usize) = {
                let mut shared = lock(&self.shared);
                let wakers = shared
                    .wire
                    .iter_mut()
                    .filter(|w| w.answer.is_none())
                    .filter_map(|w| {
                        w.answer = Some(true);
                        w.waker.take()
                    })
                    .collect();
                let pending = shared
                    .calls
                    .iter()
                    .filter(|c| c.state == CallState::Pending)
                    .count();
                (wakers, pending)
            };
            for waker in wakers {
                waker.wake();
            }
            for _ in 0..pending_calls {
                self.answer_call(0, Outcome::Ok(Lifetime::HOUR));
            }
            self.settle()?;
            self.advance(Step::PastTimeout.duration());
            self.step += 1;
        }
        let stuck: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].live())
            .collect();
        Err(self.violation(
            "C6",
            format!("tasks still pending after the final drain: {stuck:?}"),
        ))
    }
}
