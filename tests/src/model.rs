//! A deterministic scenario runner for the coordinator: many callers share one
//! [`SingleFlight`] behind an [`Authenticator`], and a [`Scenario`] says, step by step,
//! who starts, which woken caller is polled next, what the fake API server answers, what
//! the token source returns, who is cancelled and when the clock moves.
//!
//! There is no runtime: a tiny executor keeps the callers' futures in a `Vec` and polls
//! only the ones whose waker fired, in the order the scenario picks, so a lost wake-up
//! shows up as a hang instead of being papered over by polling everything. Time is a
//! [`ManualClock`], used as the coordinator's clock and its timer (refresh timeouts).
//!
//! After every step the runner checks the contracts it can see from outside (C1–C6, C9;
//! see [`run`]); at the end it answers every request on the wire and lets time pass until
//! every caller has finished, and reports a hang if one has not. The property tests
//! (`tests/tests/properties.rs`) generate scenarios with proptest; the `flight_ops` fuzz
//! target decodes them with `arbitrary`.

// Indices below come from the runner's own vectors (positions found in them, or taken
// modulo their length), never from raw input.
#![allow(clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use futures::future::BoxFuture;
use tokenflight::{
    AuthError, AuthRequest, AuthResponse, Authenticator, Backoff, Builder, Clock, Error,
    InvalidHeader, ManualClock, MemoryStore, RefreshContext, RefreshError, RefreshErrorKind,
    RefreshReason, RequestOptions, ResponseView, SingleFlight, Spawn, StoreError, StoreLock, Token,
    TokenSource, TokenStore,
};
use url::Url;

/// Clock-skew allowance of the coordinator under test.
pub const LEEWAY: Duration = Duration::from_secs(10);
/// Refresh-ahead window, when a scenario turns it on.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// Bound on each refresh attempt.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many callers are started; further start operations are ignored.
pub const MAX_CALLERS: usize = 64;
/// Polls one `Settle` may make before the runner calls it a livelock.
const SETTLE_LIMIT: usize = 20_000;
/// Rounds of "answer the wire, let time pass" the final drain may take.
const DRAIN_ROUNDS: usize = 200;

/// A generated run: how the coordinator is set up and what happens, in order.
#[derive(Clone, Debug, Arbitrary)]
pub struct Scenario {
    /// The coordinator's configuration.
    pub setup: Setup,
    /// The steps, applied in order.
    pub ops: Vec<Op>,
}

/// How the coordinator under test is built.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub struct Setup {
    /// The token it starts with.
    pub initial: Initial,
    /// With a spawner, refreshes run as background tasks of the manual executor too.
    pub spawner: bool,
    /// Refresh ahead ([`REFRESH_AHEAD`]) instead of only on expiry.
    pub refresh_ahead: bool,
    /// Back off (5 s, doubling, capped at 20 s, no jitter) after transient failures.
    pub backoff: bool,
}

/// The token the coordinator starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Initial {
    /// None: the first caller triggers the initial fetch.
    NoToken,
    /// A token valid for an hour.
    Valid,
    /// A token that expired a second ago.
    Expired,
}

/// One step of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Op {
    /// A new caller sends a request through [`Authenticator::send`].
    Send {
        /// Whether the request's body can be replayed (C4).
        replayable: bool,
    },
    /// A new caller asks for a token ([`SingleFlight::token`]).
    Token,
    /// A new caller reports that a server rejected a token
    /// ([`SingleFlight::token_after_rejection`]) of the given generation.
    Reject(Which),
    /// A new caller forces a refresh ([`SingleFlight::force_refresh`]).
    Force,
    /// Polls the n-th woken task (modulo their number): the interleaving.
    Poll(u8),
    /// Polls woken tasks in order until none is woken.
    Settle,
    /// The API server answers the n-th request on the wire (modulo their number).
    Respond {
        /// Which pending request.
        n: u8,
        /// 200 if true, 401 if false.
        accept: bool,
    },
    /// The token source answers its pending call, if any (an unanswered call hangs until
    /// the refresh timeout).
    Source(Outcome),
    /// Drops the n-th live caller (modulo their number), wherever it is waiting; the one
    /// driving the refresh included.
    Cancel(u8),
    /// Moves the clock.
    Advance(Step),
    /// A new login installs a token ([`SingleFlight::install`]).
    Login,
}

/// Which generation a [`Op::Reject`] caller reports as rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Which {
    /// The current token's.
    Current,
    /// The one before the current token (a late, stale rejection).
    Previous,
    /// One the coordinator has not issued yet.
    Newer,
}

/// What the token source answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Outcome {
    /// A new token with the given lifetime.
    Ok(Lifetime),
    /// A transient failure (network, 5xx).
    Transient,
    /// A permanent failure (`invalid_grant`).
    Permanent,
}

/// A new token's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Lifetime {
    /// 5 s: already inside the leeway, so expired as soon as it is issued.
    Short,
    /// 90 s: valid, and inside the refresh-ahead window after 30 s.
    Minutes,
    /// An hour.
    Hour,
    /// No expiry known.
    Unknown,
}

/// How far [`Op::Advance`] moves the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Step {
    /// One second.
    Second,
    /// 35 s: past the refresh timeout.
    PastTimeout,
    /// An hour: every token issued so far expires.
    Hour,
}

impl Step {
    fn duration(self) -> Duration {
        match self {
            Step::Second => Duration::from_secs(1),
            Step::PastTimeout => REFRESH_TIMEOUT + Duration::from_secs(5),
            Step::Hour => Duration::from_secs(3600),
        }
    }
}

/// A contract the coordinator broke, with where and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The contract, e.g. `"C4"`.
    pub contract: &'static str,
    /// The index of the operation being applied (`ops.len()` and up: the final drain).
    pub step: usize,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated at step {}: {}",
            self.contract, self.step, self.message
        )
    }
}

impl std::error::Error for Violation {}

/// What a run did, for coverage figures and sanity checks of the generators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Callers started.
    pub callers: usize,
    /// Callers cancelled.
    pub cancelled: usize,
    /// Token-source calls.
    pub source_calls: usize,
    /// Source calls that returned a token.
    pub source_successes: usize,
    /// Requests that reached the fake API server.
    pub requests: usize,
    /// Requests sent a second time after a rejection.
    pub resends: usize,
    /// Callers that ended with an error.
    pub errors: usize,
    /// Tasks polled.
    pub polls: usize,
}

/// Runs `scenario` and checks the contracts after every step:
///
/// - **C1** at most one token-source call is in flight, at any instant.
/// - **C2** a source call happens only for a stale token (missing, expired, rejected,
///   forced or due for refresh-ahead), and no two successful calls replace the same
///   generation.
/// - **C3** a rejection of a token older than a usable current one is answered with the
///   current token at once, with no source call.
/// - **C4** a request the server rejected is sent again exactly once, with a newer token,
///   when its body is replayable (never twice, never with the same token); otherwise the
///   original response is returned. A caller that got a rejection ends with an error only
///   if the refresh it waited for failed, or no newer usable token existed.
/// - **C5** every caller waiting on a refresh gets that refresh's outcome; a waiting caller
///   that nobody will wake (no source call pending) is a hang.
/// - **C6** cancelling any caller never hangs the others (the same checks after each
///   `Cancel`), and a token the source returned is never lost.
/// - **C9** the current token never goes back or away, and a caller that found a usable
///   token never gets an error.
///
/// At the end every request on the wire is answered and time moves until every caller
/// has finished; a caller still pending then is a hang (C5/C6).
pub fn run(scenario: &Scenario) -> Result<Summary, Violation> {
    let mut world = World::new(scenario.setup);
    // `TOKENFLIGHT_MODEL_TRACE=1` prints every step, to read a failing scenario.
    let trace = std::env::var_os("TOKENFLIGHT_MODEL_TRACE").is_some();
    for (step, op) in scenario.ops.iter().enumerate() {
        world.step = step;
        world.apply(*op)?;
        if trace {
            world.trace(op);
        }
        world.check_step()?;
    }
    world.step = scenario.ops.len();
    world.drain()?;
    world.check_end()?;
    Ok(world.summary)
}

// ---------------------------------------------------------------------------------------
// Fakes: token source, API server, request and response.

/// State shared by the fake token source and the fake API server (behind one mutex; it
/// is never held while a task is polled or dropped).
#[derive(Default)]
struct Shared {
    calls: Vec<SourceCall>,
    wire: Vec<Wire>,
    /// Set when a second source call starts while one is in flight (C1).
    overlapping_call: Option<String>,
    /// Access secret → generation of every token saved to the store.
    saved: HashMap<String, u64>,
}

struct SourceCall {
    reason: RefreshReason,
    previous: Option<Arc<Token>>,
    now: SystemTime,
    state: CallState,
    waker: Option<Waker>,
    /// A login happened while this call was in flight (its token may then be older).
    login_during: bool,
    /// The step whose checks already looked at this call.
    checked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Pending,
    Answered(Outcome),
    Returned(Outcome),
    Dropped,
}

impl CallState {
    fn live(self) -> bool {
        matches!(self, CallState::Pending | CallState::Answered(_))
    }
}

/// A source call as `check_step` looks at it: index, reason, token replaced, clock
/// reading, state, and whether a login happened meanwhile.
type CallSnapshot = (
    usize,
    RefreshReason,
    Option<Arc<Token>>,
    SystemTime,
    CallState,
    bool,
);

fn access_of_call(n: usize) -> String {
    format!("token-{}", n + 1)
}

/// A token source whose calls stay pending until the scenario answers them.
struct ModelSource {
    shared: Arc<Mutex<Shared>>,
    clock: ManualClock,
}

impl TokenSource for ModelSource {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        let mut shared = lock(&self.shared);
        if let Some(live) = shared.calls.iter().position(|c| c.state.live()) {
            shared.overlapping_call = Some(format!(
                "source call {} started while call {} was in flight",
                shared.calls.len() + 1,
                live + 1
            ));
        }
        let index = shared.calls.len();
        shared.calls.push(SourceCall {
            reason: cx.reason,
            previous: cx.previous.clone(),
            now: cx.now,
            state: CallState::Pending,
            waker: None,
            login_during: false,
            checked: false,
        });
        drop(shared);
        Box::pin(SourceFuture {
            shared: self.shared.clone(),
            clock: self.clock.clone(),
            index,
        })
    }
}

struct SourceFuture {
    shared: Arc<Mutex<Shared>>,
    clock: ManualClock,
    index: usize,
}

impl Future for SourceFuture {
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
                Poll::Ready(match outcome {
                    Outcome::Ok(lifetime) => {
                        let token = Token::new(access_of_call(n));
                        let now = self.clock.now();
                        Ok(match lifetime {
                            Lifetime::Short => token.expires_in(Duration::from_secs(5), now),
                            Lifetime::Minutes => token.expires_in(Duration::from_secs(90), now),
                            Lifetime::Hour => token.expires_in(Duration::from_secs(3600), now),
                            Lifetime::Unknown => token,
                        })
                    }
                    Outcome::Transient => Err(RefreshError::transient(format!(
                        "transient failure {}",
                        n + 1
                    ))),
                    Outcome::Permanent => {
                        Err(RefreshError::permanent(format!("invalid_grant {}", n + 1)))
                    }
                })
            }
            _ => {
                call.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for SourceFuture {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        if let Some(call) = shared.calls.get_mut(self.index) {
            if call.state.live() {
                call.state = CallState::Dropped;
            }
        }
    }
}

/// One request as the fake API server saw it.
struct Wire {
    caller: usize,
    access: Option<String>,
    generation: Option<u64>,
    answer: Option<bool>,
    dropped: bool,
    waker: Option<Waker>,
}

impl Wire {
    fn pending(&self) -> bool {
        self.answer.is_none() && !self.dropped
    }
}

/// The fake client's request.
#[derive(Debug)]
struct ModelRequest {
    url: Url,
    authorization: Option<String>,
    replayable: bool,
}

impl AuthRequest for ModelRequest {
    fn url(&self) -> &Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        if name.eq_ignore_ascii_case("authorization") {
            self.authorization = Some(value.to_owned());
        }
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        self.replayable.then(|| ModelRequest {
            url: self.url.clone(),
            authorization: self.authorization.clone(),
            replayable: true,
        })
    }
}

/// The fake server's response: a status and which request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelResponse {
    status: u16,
    wire: usize,
}

impl ResponseView for ModelResponse {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
}

impl AuthResponse for ModelResponse {}

/// The future a send returns: pending until the scenario answers the request.
struct WireFuture {
    shared: Arc<Mutex<Shared>>,
    index: usize,
}

impl Future for WireFuture {
    type Output = Result<ModelResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let index = self.index;
        let Some(wire) = shared.wire.get_mut(index) else {
            return Poll::Ready(Ok(ModelResponse {
                status: 500,
                wire: index,
            }));
        };
        match wire.answer {
            Some(accept) => Poll::Ready(Ok(ModelResponse {
                status: if accept { 200 } else { 401 },
                wire: index,
            })),
            None => {
                wire.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for WireFuture {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        if let Some(wire) = shared.wire.get_mut(self.index) {
            if wire.answer.is_none() {
                wire.dropped = true;
            }
        }
    }
}

/// The memory store, recording the generation of every token saved: a refresh's token
/// gets its generation before it is handed out, even when it never becomes current (a
/// login installed a newer one meanwhile).
struct ModelStore {
    inner: MemoryStore,
    shared: Arc<Mutex<Shared>>,
}

impl TokenStore for ModelStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }
    fn save<'a>(
        &'a self,
        token: &'a Token,
        lock: Option<&'a StoreLock>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        lock_shared(&self.shared)
            .saved
            .insert(token.access().expose().to_owned(), token.generation());
        self.inner.save(token, lock)
    }
    fn lock(&self) -> BoxFuture<'_, Result<StoreLock, StoreError>> {
        self.inner.lock()
    }
}

fn lock_shared(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    lock(shared)
}

/// Queues spawned refreshes; the executor adopts them as tasks after every step.
#[derive(Clone, Default)]
struct QueueSpawner {
    queue: Arc<Mutex<Vec<BoxFuture<'static, ()>>>>,
}

impl Spawn for QueueSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        lock(&self.queue).push(task);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// The executor.

/// A waker that only raises a flag: the scenario decides when the task is polled.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug)]
enum Finished {
    Response(Result<ModelResponse, AuthError<Infallible>>),
    Token(Result<Arc<Token>, Error>),
    Spawned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Send { replayable: bool },
    Token,
    Reject(u64),
    Force,
    Spawned,
}

struct Task {
    kind: Kind,
    future: Option<Pin<Box<dyn Future<Output = Finished> + Send>>>,
    flag: Arc<Flag>,
    waker: Waker,
    polls: usize,
    done: bool,
    cancelled: bool,
    /// Whether a usable token existed when the task was first polled (C9).
    usable_at_first_poll: bool,
    /// The current token's generation then (a refresh ahead that fails falls back to it).
    current_at_first_poll: Option<u64>,
    /// Per waiting phase (a send waits for its first token, then maybe for a newer one):
    /// the source call it was seen waiting on (C5).
    waited_on: Vec<Option<usize>>,
    /// The first response's rejection was already processed by a poll (C3).
    rejection_seen: bool,
}

impl Task {
    fn live(&self) -> bool {
        !self.done && !self.cancelled
    }
    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
}

/// What the model knows about tokens, independent of the coordinator's own view.
#[derive(Default)]
struct Knowledge {
    /// Access secret → generation, for every token seen as current or saved.
    generations: HashMap<String, u64>,
    /// Access secrets of the tokens seen as current (C6: a refreshed token is not lost).
    became_current: BTreeSet<String>,
    /// Highest generation reported rejected so far (issued, maybe not yet processed; so
    /// at least the coordinator's own value).
    rejected: u64,
    /// The current token at the end of the last step (C9).
    last_current: Option<Arc<Token>>,
    /// Generations that successful source calls replaced (C2).
    replaced: BTreeSet<u64>,
    logins: usize,
}

struct World {
    setup: Setup,
    clock: ManualClock,
    auth: Authenticator,
    flight: SingleFlight,
    shared: Arc<Mutex<Shared>>,
    spawner: QueueSpawner,
    tasks: Vec<Task>,
    known: Knowledge,
    summary: Summary,
    step: usize,
}

impl World {
    fn new(setup: Setup) -> Self {
        let clock = ManualClock::at_fixed_point();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let spawner = QueueSpawner::default();
        let mut builder = Builder::new()
            .source(ModelSource {
                shared: shared.clone(),
                clock: clock.clone(),
            })
            .store(ModelStore {
                inner: MemoryStore::new(),
                shared: shared.clone(),
            })
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .leeway(LEEWAY)
            .refresh_timeout(REFRESH_TIMEOUT)
            .refresh_ahead(setup.refresh_ahead.then_some(REFRESH_AHEAD))
            .backoff(if setup.backoff {
                Backoff::new(Duration::from_secs(5), Duration::from_secs(20)).with_jitter(0.0)
            } else {
                Backoff::none()
            })
            .allowed_origin("https://api.test");
        if setup.spawner {
            builder = builder.spawner(Arc::new(spawner.clone()));
        }
        let now = clock.now();
        builder = match setup.initial {
            Initial::NoToken => builder,
            Initial::Valid => builder
                .initial_token(Token::new("initial").expires_in(Duration::from_secs(3600), now)),
            Initial::Expired => builder
                .initial_token(Token::new("initial").expires_at(now - Duration::from_secs(1))),
        };
        #[allow(clippy::expect_used)] // a fixed, valid configuration
        let auth = builder.build().expect("the model's configuration is valid");
        let flight = auth.flight().clone();
        let mut world = World {
            setup,
            clock,
            auth,
            flight,
            shared,
            spawner,
            tasks: Vec::new(),
            known: Knowledge::default(),
            summary: Summary::default(),
            step: 0,
        };
        world.observe_current();
        world.known.last_current = world.flight.current();
        world
    }

    fn violation(&self, contract: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            contract,
            step: self.step,
            message: message.into(),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The current token if the coordinator must consider it usable: known to the model,
    /// not expired (leeway) and not reported rejected.
    fn usable_current(&self) -> Option<Arc<Token>> {
        let token = self.flight.current()?;
        let usable =
            token.generation() > self.known.rejected && !token.is_expired(self.now(), LEEWAY);
        usable.then_some(token)
    }

    fn observe_current(&mut self) {
        if let Some(token) = self.flight.current() {
            let access = token.access().expose().to_owned();
            self.known.became_current.insert(access.clone());
            self.known.generations.insert(access, token.generation());
        }
        let saved = std::mem::take(&mut self.shared().saved);
        self.known.generations.extend(saved);
    }

    fn current_generation(&self) -> u64 {
        self.flight.current().map_or(0, |t| t.generation())
    }

    // ----- operations

    fn apply(&mut self, op: Op) -> Result<(), Violation> {
        match op {
            Op::Send { replayable } => self.start(Kind::Send { replayable }),
            Op::Token => self.start(Kind::Token),
            Op::Reject(which) => {
                let current = self.current_generation();
                let generation = match which {
                    Which::Current => current,
                    Which::Previous => current.saturating_sub(1),
                    Which::Newer => current + 1,
                };
                self.start(Kind::Reject(generation));
            }
            Op::Force => self.start(Kind::Force),
            Op::Poll(n) => {
                let woken: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].woken())
                    .collect();
                if !woken.is_empty() {
                    let index = woken[usize::from(n) % woken.len()];
                    self.poll(index)?;
                }
            }
            Op::Settle => self.settle()?,
            Op::Respond { n, accept } => {
                let target = {
                    let shared = self.shared();
                    let pending: Vec<usize> = (0..shared.wire.len())
                        .filter(|&i| shared.wire[i].pending())
                        .collect();
                    (!pending.is_empty()).then(|| pending[usize::from(n) % pending.len()])
                };
                if let Some(index) = target {
                    self.respond(index, accept);
                }
            }
            Op::Source(outcome) => {
                let waker = {
                    let mut shared = self.shared();
                    shared
                        .calls
                        .iter_mut()
                        .find(|c| c.state == CallState::Pending)
                        .and_then(|call| {
                            call.state = CallState::Answered(outcome);
                            call.waker.take()
                        })
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Op::Cancel(n) => {
                let live: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].kind != Kind::Spawned)
                    .collect();
                if !live.is_empty() {
                    let index = live[usize::from(n) % live.len()];
                    self.tasks[index].cancelled = true;
                    // Dropped outside any lock: the drop may drop the refresh and the
                    // source call with it.
                    let future = self.tasks[index].future.take();
                    drop(future);
                    self.summary.cancelled += 1;
                }
            }
            Op::Advance(step) => self.clock.advance(step.duration()),
            Op::Login => self.login()?,
        }
        self.adopt_spawned();
        Ok(())
    }

    fn start(&mut self, kind: Kind) {
        let callers = self
            .tasks
            .iter()
            .filter(|t| t.kind != Kind::Spawned)
            .count();
        if callers >= MAX_CALLERS {
            return;
        }
        let id = self.tasks.len();
        let future: Pin<Box<dyn Future<Output = Finished> + Send>> = match kind {
            Kind::Send { replayable } => {
                let auth = self.auth.clone();
                let shared = self.shared.clone();
                let flight = self.flight.clone();
                #[allow(clippy::expect_used)] // a constant, valid URL
                let url = Url::parse("https://api.test/resource").expect("valid URL");
                let request = ModelRequest {
                    url,
                    authorization: None,
                    replayable,
                };
                Box::pin(async move {
                    let send = |request: ModelRequest| wire(&shared, &flight, id, request);
                    Finished::Response(auth.send(request, RequestOptions::default(), send).await)
                })
            }
            Kind::Token => {
                let flight = self.flight.clone();
                Box::pin(async move { Finished::Token(flight.token().await) })
            }
            Kind::Reject(generation) => {
                self.known.rejected = self.known.rejected.max(generation);
                let flight = self.flight.clone();
                Box::pin(
                    async move { Finished::Token(flight.token_after_rejection(generation).await) },
                )
            }
            Kind::Force => {
                let flight = self.flight.clone();
                Box::pin(async move { Finished::Token(flight.force_refresh().await) })
            }
            Kind::Spawned => return,
        };
        self.push(kind, future);
        self.summary.callers += 1;
    }

    fn push(&mut self, kind: Kind, future: Pin<Box<dyn Future<Output = Finished> + Send>>) {
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        let waker = Waker::from(flag.clone());
        self.tasks.push(Task {
            kind,
            future: Some(future),
            flag,
            waker,
            polls: 0,
            done: false,
            cancelled: false,
            usable_at_first_poll: false,
            current_at_first_poll: None,
            waited_on: vec![None],
            rejection_seen: false,
        });
    }

    fn adopt_spawned(&mut self) {
        let spawned = std::mem::take(&mut *lock(&self.spawner.queue));
        for task in spawned {
            self.push(
                Kind::Spawned,
                Box::pin(async move {
                    task.await;
                    Finished::Spawned
                }),
            );
        }
    }

    fn respond(&mut self, index: usize, accept: bool) {
        let waker = {
            let mut shared = self.shared();
            let Some(wire) = shared.wire.get_mut(index) else {
                return;
            };
            wire.answer = Some(accept);
            let generation = wire.generation;
            let waker = wire.waker.take();
            drop(shared);
            if !accept {
                // The server rejected this generation: from now on the model treats it
                // as rejected (the coordinator learns it when the caller is polled).
                if let Some(g) = generation {
                    self.known.rejected = self.known.rejected.max(g);
                }
            }
            waker
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn login(&mut self) -> Result<(), Violation> {
        self.known.logins += 1;
        let token = Token::new(format!("login-{}", self.known.logins))
            .expires_in(Duration::from_secs(3600), self.now());
        {
            let mut shared = self.shared();
            for call in shared.calls.iter_mut().filter(|c| c.state.live()) {
                call.login_during = true;
            }
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut install = std::pin::pin!(self.flight.install(token));
        match install.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(installed)) => {
                self.known.generations.insert(
                    installed.access().expose().to_owned(),
                    installed.generation(),
                );
                Ok(())
            }
            Poll::Ready(Err(error)) => {
                Err(self.violation("C9", format!("installing a login failed: {error}")))
            }
            Poll::Pending => Err(self.violation(
                "C6",
                "install() with a memory store did not complete at once",
            )),
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
            self.adopt_spawned();
        }
        Err(self.violation(
            "C6",
            format!("still waking tasks after {SETTLE_LIMIT} polls (livelock)"),
        ))
    }

    fn source_calls(&self) -> usize {
        self.shared().calls.len()
    }

    /// Task `caller`'s requests: (index, generation carried, accepted).
    fn wires_of(&self, caller: usize) -> Vec<(usize, Option<u64>, Option<bool>)> {
        self.shared()
            .wire
            .iter()
            .enumerate()
            .filter(|(_, w)| w.caller == caller)
            .map(|(i, w)| {
                let generation = w.generation.or_else(|| {
                    let access = w.access.as_deref()?;
                    self.known.generations.get(access).copied()
                });
                (i, generation, w.answer)
            })
            .collect()
    }

    fn poll(&mut self, index: usize) -> Result<(), Violation> {
        let usable_before = self.usable_current();
        let current_before = self.flight.current().map(|t| t.generation());
        let calls_before = self.source_calls();
        let wires_before = self.wires_of(index);
        let task = &mut self.tasks[index];
        let Some(future) = task.future.as_mut() else {
            return Ok(());
        };
        task.flag.0.store(false, Ordering::SeqCst);
        let first_poll = task.polls == 0;
        if first_poll {
            task.usable_at_first_poll = usable_before.is_some();
            task.current_at_first_poll = current_before;
        }
        task.polls += 1;
        self.summary.polls += 1;
        let mut cx = Context::from_waker(&task.waker);
        let polled = future.as_mut().poll(&mut cx);
        let kind = task.kind;
        if polled.is_ready() {
            task.done = true;
            task.future = None;
        }
        self.observe_current();
        let new_calls = self.source_calls() > calls_before;
        let wires_after = self.wires_of(index);
        if let Some(&(w, None, _)) = wires_after.last() {
            return Err(self.violation(
                "C6",
                format!("request {w} carried a token that was never saved"),
            ));
        }
        if wires_after.len() > wires_before.len() {
            // A new request went out: the waiting phase before it has ended.
            self.end_phase(index, wires_after.last().and_then(|w| w.1), None)?;
            self.tasks[index].waited_on.push(None);
        }

        // C3: a rejection of an older generation while a newer usable token exists.
        let stale = |g: u64| usable_before.as_ref().filter(|t| t.generation() > g);
        if let (Kind::Reject(g), true) = (kind, first_poll) {
            if let Some(current) = stale(g) {
                if new_calls {
                    return Err(self.violation(
                        "C3",
                        format!("a stale rejection of generation {g} started a source call"),
                    ));
                }
                match &polled {
                    Poll::Ready(Finished::Token(Ok(t))) if Arc::ptr_eq(t, current) => {}
                    _ => {
                        return Err(self.violation(
                            "C3",
                            format!(
                                "a stale rejection of generation {g} was not answered at once \
                                 with the current token (generation {})",
                                current.generation()
                            ),
                        ));
                    }
                }
            }
        }
        if let Kind::Send { replayable } = kind {
            let task = &mut self.tasks[index];
            if let [(_, Some(g), Some(false))] = wires_before.as_slice() {
                if !task.rejection_seen {
                    task.rejection_seen = true;
                    if let Some(current) = stale(*g) {
                        if new_calls {
                            return Err(self.violation(
                                "C3",
                                format!(
                                    "a 401 for generation {g} started a source call although \
                                     generation {} was usable",
                                    current.generation()
                                ),
                            ));
                        }
                        let resent_with = wires_after.get(1).and_then(|w| w.1);
                        if replayable && resent_with != Some(current.generation()) {
                            return Err(self.violation(
                                "C3",
                                format!(
                                    "a stale 401 for generation {g} was not resent at once with \
                                     the current generation {} (resent with {resent_with:?})",
                                    current.generation()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        if let Poll::Ready(finished) = polled {
            if std::env::var_os("TOKENFLIGHT_MODEL_TRACE").is_some() {
                eprintln!("  task {index} finished: {finished:?}");
            }
            self.finished(index, finished, &usable_before, &wires_after)?;
        }
        Ok(())
    }

    /// Ends the current waiting phase of task `index`, which produced a token of
    /// `generation` or `error`: it must be the outcome of the source call it waited on (C5).
    fn end_phase(
        &mut self,
        index: usize,
        generation: Option<u64>,
        error: Option<&Error>,
    ) -> Result<(), Violation> {
        let task = &self.tasks[index];
        let Some(Some(call)) = task.waited_on.last().copied() else {
            return Ok(());
        };
        // C8/C9: a caller that drove a refresh ahead keeps its valid token if it fails.
        let ahead_fallback = self.setup.refresh_ahead
            && task.waited_on.len() == 1
            && error.is_none()
            && generation.is_some()
            && generation == task.current_at_first_poll;
        let state = self.shared().calls.get(call).map(|c| c.state);
        let expected_generation = self.known.generations.get(&access_of_call(call)).copied();
        let ok = match (state, error) {
            (Some(CallState::Returned(Outcome::Ok(_))), None) => {
                generation.is_some() && generation == expected_generation
            }
            (Some(CallState::Returned(Outcome::Transient)), Some(Error::Refresh(e))) => {
                e.message() == format!("transient failure {}", call + 1)
            }
            (
                Some(CallState::Returned(Outcome::Permanent)),
                Some(Error::ReauthenticationRequired { cause }),
            ) => cause.message() == format!("invalid_grant {}", call + 1),
            // The call was cut off by the refresh timeout.
            (Some(CallState::Dropped), Some(Error::Refresh(e))) => {
                e.kind() == RefreshErrorKind::Timeout
            }
            (
                Some(
                    CallState::Returned(Outcome::Transient | Outcome::Permanent)
                    | CallState::Dropped,
                ),
                None,
            ) => ahead_fallback,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.violation(
                "C5",
                format!(
                    "task {index} waited on source call {} ({state:?}) but got generation \
                     {generation:?} / error {error:?} (expected generation \
                     {expected_generation:?})",
                    call + 1
                ),
            ))
        }
    }

    fn finished(
        &mut self,
        index: usize,
        finished: Finished,
        usable_before: &Option<Arc<Token>>,
        wires: &[(usize, Option<u64>, Option<bool>)],
    ) -> Result<(), Violation> {
        let kind = self.tasks[index].kind;
        let usable_at_first_poll = self.tasks[index].usable_at_first_poll;
        match finished {
            Finished::Spawned => Ok(()),
            Finished::Token(result) => {
                match &result {
                    Ok(token) => {
                        self.end_phase(index, Some(token.generation()), None)?;
                        let known = self.known.generations.get(token.access().expose());
                        if known != Some(&token.generation()) {
                            return Err(self.violation(
                                "C6",
                                format!(
                                    "task {index} got generation {} that was never saved",
                                    token.generation()
                                ),
                            ));
                        }
                    }
                    Err(error) => {
                        self.summary.errors += 1;
                        self.end_phase(index, None, Some(error))?;
                        if usable_at_first_poll && kind == Kind::Token {
                            return Err(self.violation(
                                "C9",
                                format!(
                                    "task {index} found a usable token but got an error: {error}"
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
            Finished::Response(result) => {
                let Kind::Send { replayable } = kind else {
                    return Ok(());
                };
                self.check_send(index, replayable, result, usable_before, wires)
            }
        }
    }

    /// C4 for a finished send.
    fn check_send(
        &mut self,
        index: usize,
        replayable: bool,
        result: Result<ModelResponse, AuthError<Infallible>>,
        usable_before: &Option<Arc<Token>>,
        wires: &[(usize, Option<u64>, Option<bool>)],
    ) -> Result<(), Violation> {
        let first = wires.first().copied();
        match result {
            Ok(response) => {
                let expected = match (first, wires.get(1)) {
                    (Some((w, _, Some(true))), None) => Some(w),
                    (Some((w, _, Some(false))), None) if !replayable => Some(w),
                    (Some((_, Some(g0), Some(false))), Some(&(w, Some(g1), _)))
                        if replayable && g1 > g0 && wires.len() == 2 =>
                    {
                        Some(w)
                    }
                    _ => None,
                };
                if expected != Some(response.wire) {
                    return Err(self.violation(
                        "C4",
                        format!(
                            "task {index} (replayable: {replayable}) returned the response to \
                             request {} after requests {wires:?} (generation, accepted)",
                            response.wire
                        ),
                    ));
                }
                Ok(())
            }
            Err(AuthError::Token(error)) => {
                self.summary.errors += 1;
                self.end_phase(index, None, Some(&error))?;
                match wires {
                    [] => {
                        if self.tasks[index].usable_at_first_poll {
                            return Err(self.violation(
                                "C9",
                                format!("task {index} found a usable token but got {error}"),
                            ));
                        }
                        Ok(())
                    }
                    [(_, Some(g), Some(false))] if replayable => {
                        // Fail-fast (backoff, auth lost) is fine only if no newer usable
                        // token existed; a refresh's error was checked by `end_phase`.
                        let waited = self.tasks[index].waited_on.last().copied().flatten();
                        if waited.is_none() {
                            if let Some(t) = usable_before.as_ref().filter(|t| t.generation() > *g)
                            {
                                return Err(self.violation(
                                    "C4",
                                    format!(
                                        "task {index} got {error} after a 401 for generation \
                                         {g} although generation {} was usable",
                                        t.generation()
                                    ),
                                ));
                            }
                        }
                        Ok(())
                    }
                    _ => Err(self.violation(
                        "C4",
                        format!("task {index} got {error} after requests {wires:?}"),
                    )),
                }
            }
            Err(other) => {
                Err(self.violation("C4", format!("task {index} failed unexpectedly: {other}")))
            }
        }
    }

    fn trace(&self, op: &Op) {
        let shared = self.shared();
        let calls: Vec<String> = shared
            .calls
            .iter()
            .map(|c| {
                format!(
                    "{:?}<-{:?}:{:?}",
                    c.reason,
                    c.previous.as_ref().map(|t| t.generation()),
                    c.state
                )
            })
            .collect();
        let wires: Vec<String> = shared
            .wire
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "{i}:t{}:{}:{:?}{}",
                    w.caller,
                    w.access.as_deref().unwrap_or("-"),
                    w.answer,
                    if w.dropped { ":dropped" } else { "" }
                )
            })
            .collect();
        drop(shared);
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let state = if t.cancelled {
                    "x"
                } else if t.done {
                    "done"
                } else if t.woken() {
                    "woken"
                } else {
                    "wait"
                };
                format!("{i}:{:?}:{state}", t.kind)
            })
            .collect();
        eprintln!(
            "step {} {op:?}\n  current {:?} rejected(model) {}\n  calls {calls:?}\n  wires {wires:?}\n  tasks {tasks:?}",
            self.step,
            self.flight
                .current()
                .map(|t| (t.access().expose().to_owned(), t.generation())),
            self.known.rejected,
        );
    }

    // ----- checks

    fn check_step(&mut self) -> Result<(), Violation> {
        self.observe_current();
        // C1
        if let Some(message) = self.shared().overlapping_call.clone() {
            return Err(self.violation("C1", message));
        }
        // C2: every new source call was needed, and successes replace distinct tokens.
        let calls: Vec<CallSnapshot> = {
            let mut shared = self.shared();
            shared
                .calls
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| !c.checked)
                .map(|(i, c)| {
                    let done = matches!(c.state, CallState::Returned(_) | CallState::Dropped);
                    c.checked = done;
                    (
                        i,
                        c.reason,
                        c.previous.clone(),
                        c.now,
                        c.state,
                        c.login_during,
                    )
                })
                .collect()
        };
        for (i, reason, previous, at, state, login_during) in calls {
            let justified = match &previous {
                None => true,
                Some(prev) => {
                    reason == RefreshReason::Forced
                        || prev.is_expired(at, LEEWAY)
                        || prev.generation() <= self.known.rejected
                        || (reason == RefreshReason::RefreshAhead
                            && self.setup.refresh_ahead
                            && prev.is_expired(at, REFRESH_AHEAD))
                }
            };
            if !justified {
                return Err(self.violation(
                    "C2",
                    format!(
                        "source call {} ({reason:?}) replaced generation {:?}, which was \
                         neither expired nor rejected",
                        i + 1,
                        previous.as_ref().map(|t| t.generation())
                    ),
                ));
            }
            if let CallState::Returned(Outcome::Ok(_)) = state {
                let replaced = previous.as_ref().map_or(0, |t| t.generation());
                if reason != RefreshReason::Forced && !self.known.replaced.insert(replaced) {
                    return Err(self.violation(
                        "C2",
                        format!(
                            "source call {} is a second successful refresh of generation \
                             {replaced}",
                            i + 1
                        ),
                    ));
                }
                if !login_during && !self.known.became_current.contains(&access_of_call(i)) {
                    return Err(self
                        .violation("C6", format!("the token of source call {} was lost", i + 1)));
                }
            }
        }
        // C9: the current token never goes back or away.
        let current = self.flight.current();
        if let Some(last) = &self.known.last_current {
            match &current {
                None => return Err(self.violation("C9", "the current token disappeared")),
                Some(now) if now.generation() < last.generation() => {
                    return Err(self.violation(
                        "C9",
                        format!(
                            "the current token went back from generation {} to {}",
                            last.generation(),
                            now.generation()
                        ),
                    ));
                }
                _ => {}
            }
        }
        self.known.last_current = current;
        // C5/C6: a waiting caller that nobody will wake is a hang.
        let live_call = self.shared().calls.iter().position(|c| c.state.live());
        let on_wire: BTreeSet<usize> = self
            .shared()
            .wire
            .iter()
            .filter(|w| w.pending())
            .map(|w| w.caller)
            .collect();
        for index in 0..self.tasks.len() {
            let task = &self.tasks[index];
            if !task.live() || task.woken() || task.polls == 0 || on_wire.contains(&index) {
                continue;
            }
            match live_call {
                None => {
                    return Err(self.violation(
                        "C5",
                        format!(
                            "task {index} ({:?}) waits, but no refresh is in flight and nothing \
                             will wake it",
                            task.kind
                        ),
                    ));
                }
                Some(call) => {
                    let task = &mut self.tasks[index];
                    if let Some(slot @ None) = task.waited_on.last_mut() {
                        *slot = Some(call);
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers every request on the wire and lets time pass until every task is done.
    fn drain(&mut self) -> Result<(), Violation> {
        for _ in 0..DRAIN_ROUNDS {
            self.settle()?;
            self.check_step()?;
            if self.tasks.iter().all(|t| !t.live()) {
                return Ok(());
            }
            let pending: Vec<usize> = {
                let shared = self.shared();
                (0..shared.wire.len())
                    .filter(|&i| shared.wire[i].pending())
                    .collect()
            };
            if pending.is_empty() {
                // Hanging source calls time out; backoffs end.
                self.clock.advance(Step::PastTimeout.duration());
            } else {
                for index in pending {
                    self.respond(index, true);
                }
            }
            self.step += 1;
        }
        let stuck: Vec<(usize, Kind)> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].live())
            .map(|i| (i, self.tasks[i].kind))
            .collect();
        Err(self.violation(
            "C6",
            format!("tasks still pending after the final drain: {stuck:?}"),
        ))
    }

    fn check_end(&mut self) -> Result<(), Violation> {
        let shared = self.shared();
        let calls = shared.calls.len();
        let successes = shared
            .calls
            .iter()
            .filter(|c| matches!(c.state, CallState::Returned(Outcome::Ok(_))))
            .count();
        let requests = shared.wire.len();
        let mut per_caller: HashMap<usize, usize> = HashMap::new();
        for wire in &shared.wire {
            *per_caller.entry(wire.caller).or_default() += 1;
        }
        let live_calls = shared.calls.iter().filter(|c| c.state.live()).count();
        drop(shared);
        if let Some((caller, n)) = per_caller.iter().find(|(_, n)| **n > 2) {
            return Err(self.violation("C4", format!("task {caller} sent its request {n} times")));
        }
        if live_calls > 0 && !self.setup.spawner {
            // Without a spawner nobody is left to drive a call.
            return Err(self.violation(
                "C6",
                "a source call is still in flight after every caller finished",
            ));
        }
        self.summary.source_calls = calls;
        self.summary.source_successes = successes;
        self.summary.requests = requests;
        self.summary.resends = per_caller.values().filter(|n| **n == 2).count();
        Ok(())
    }
}

/// The fake API server receives a request from task `caller`.
fn wire(
    shared: &Arc<Mutex<Shared>>,
    flight: &SingleFlight,
    caller: usize,
    request: ModelRequest,
) -> WireFuture {
    let access = request
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    // The token was handed out in this very poll, so it is the current one unless a
    // newer token replaced it earlier; the runner then knows it from an earlier step.
    let generation = flight
        .current()
        .filter(|t| Some(t.access().expose()) == access.as_deref())
        .map(|t| t.generation());
    let handle = shared.clone();
    let mut shared = lock(shared);
    let index = shared.wire.len();
    shared.wire.push(Wire {
        caller,
        access,
        generation,
        answer: None,
        dropped: false,
        waker: None,
    });
    WireFuture {
        shared: handle,
        index,
    }
}
