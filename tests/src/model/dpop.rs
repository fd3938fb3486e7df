//! A third, small runner: an [`AuthPolicy`] with DPoP on (RFC 9449) in front of a
//! modelled resource server that demands nonces, rotates its nonce while requests are
//! on the wire, and rejects tokens (`invalid_token`) or proofs (`invalid_dpop_proof`).
//!
//! One origin (`https://api.test`), one coordinator without backoff, retries or
//! refresh-ahead, whose source calls stay pending until the scenario answers them
//! (tokens without an expiry: only a rejection, a failure or a dropped call makes the
//! next one). The same executor discipline as the main runner: only woken tasks are
//! polled, in the order the scenario picks.
//!
//! What the driver promises, and what is checked after every step:
//!
//! - **Nonce demand** (a `401` with `WWW-Authenticate: DPoP error="use_dpop_nonce"` and
//!   a `DPoP-Nonce`) of a replayable request: one resend with the current token and a
//!   new proof carrying the demanded nonce (the demand's own, not the cache's), and no
//!   refresh; the resend's response is the caller's, whatever it is (a second demand
//!   is returned as is, never a third send).
//! - A demand on a request that cannot be replayed is an ordinary `401`: the token is
//!   marked rejected and the response returned (the driver records no nonce for such a
//!   request, and the next caller refreshes).
//! - **Rejection** (`invalid_token`, `invalid_dpop_proof`: a `401` that is no demand) of
//!   a first send: a replayable request is sent again once with a newer token (C4);
//!   the resend's response is returned as is, and marks nothing rejected.
//! - Every request is sent at most twice; every send carries `Authorization: DPoP
//!   <token>` and a proof whose `ath` is that token's hash; every proof's `jti` is unique.
//! - Source calls never exceed one plus the failed or dropped calls plus the distinct
//!   tokens a first send had rejected (a demand on a replayable request costs none).
//! - A caller that got a response got its last send's.
//!
//! At the end every request is answered (with the server's current nonce checked),
//! every source call returns a token, and every caller must have finished.

// Indices below come from the runner's own vectors (positions found in them, or taken
// modulo their length), never from raw input.
#![allow(clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use base64::Engine as _;
use futures::future::BoxFuture;
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, RefreshContext, RefreshError, SingleFlight, Token, TokenSource,
    adapter::{AuthError, AuthRequest, AuthResponse, InvalidHeader, RequestOptions, ResponseView},
    config::{Backoff, Retry},
    dpop::{DPOP_NONCE, Dpop, DpopKey, access_token_hash},
    test_util::ManualClock,
};
use url::Url;

use super::{Flag, MAX_CALLERS, Violation, lock, panic_message, quiet_planted_panics};

/// Polls one `Settle` may make before the runner calls it a livelock.
const SETTLE_LIMIT: usize = 5_000;
/// Rounds of "answer everything" the final drain may take.
const DRAIN_ROUNDS: usize = 20;
/// The resource server's origin.
const ORIGIN: &str = "https://api.test";

/// A generated DPoP run.
#[derive(Clone, Debug, Arbitrary)]
pub struct DpopScenario {
    /// The steps, applied in order.
    pub ops: Vec<DpopOp>,
}

/// One step of a DPoP scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum DpopOp {
    /// A new caller sends a request through [`AuthPolicy::send`].
    Send {
        /// Whether the request's body can be replayed.
        replayable: bool,
    },
    /// Polls the n-th woken task (modulo their number).
    Poll(u8),
    /// Polls woken tasks in order until none is woken.
    Settle,
    /// The resource server answers the n-th pending request.
    Respond {
        /// Which pending request.
        n: u8,
        /// How.
        verdict: Verdict,
    },
    /// The server rotates its nonce (without answering): the requests on the wire with
    /// the old one get a demand when [`Verdict::Accept`] answers them.
    Rotate,
    /// The pending source call, if any, returns a token (`true`) or fails transiently.
    Source(bool),
    /// Drops the n-th live caller.
    Cancel(u8),
}

/// What the resource server does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Verdict {
    /// Accepts it (`200` with its current nonce), unless it has a nonce and the proof
    /// does not carry it: then it demands its current nonce.
    Accept,
    /// Demands a new nonce (`use_dpop_nonce`), which becomes its current one.
    Demand,
    /// Rejects the token (`DPoP error="invalid_token"`).
    InvalidToken,
    /// Rejects the proof (`DPoP error="invalid_dpop_proof"`).
    InvalidProof,
}

/// What a DPoP run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpopSummary {
    /// Callers started.
    pub callers: usize,
    /// Source calls.
    pub source_calls: usize,
    /// Requests on the wire.
    pub requests: usize,
    /// Nonce demands answered to a first send.
    pub demands: usize,
    /// Resends after a nonce demand.
    pub nonce_resends: usize,
    /// Demands answered to such a resend (returned to the caller as is).
    pub second_demands: usize,
    /// Resends after a rejection of the token or the proof.
    pub rejection_resends: usize,
    /// Demands answered because the server rotated its nonce under the request.
    pub demands_after_rotation: usize,
}

// ---------------------------------------------------------------------------------------

/// The server's resolved answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Ok(Option<String>),
    Demand(String),
    Rejected(&'static str),
}

impl Answer {
    fn response(&self, wire: usize) -> DpopResponse {
        let (status, www_authenticate, nonce) = match self {
            Answer::Ok(nonce) => (200, None, nonce.clone()),
            Answer::Demand(nonce) => (
                401,
                Some(r#"DPoP error="use_dpop_nonce""#.to_owned()),
                Some(nonce.clone()),
            ),
            Answer::Rejected(error) => (401, Some(format!("DPoP error=\"{error}\"")), None),
        };
        DpopResponse {
            status,
            www_authenticate,
            nonce,
            wire,
        }
    }
}

/// What the server saw of one request.
struct Wire {
    caller: usize,
    replayable: bool,
    authorization: Option<String>,
    /// The proof's claims (`Null` if it had none or it did not decode).
    claims: serde_json::Value,
    answer: Option<Answer>,
    waker: Option<Waker>,
}

impl Wire {
    fn access(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("DPoP ")
    }
    fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name)?.as_str()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Pending,
    Answered(bool),
    Returned(bool),
    Dropped,
}

struct Call {
    state: CallState,
    waker: Option<Waker>,
}

#[derive(Default)]
struct DpopShared {
    calls: Vec<Call>,
    wire: Vec<Wire>,
    /// The server's current nonce (none until its first demand or rotation).
    nonce: Option<u32>,
    demands_after_rotation: usize,
}

impl DpopShared {
    fn next_nonce(&mut self) -> String {
        let next = self.nonce.map_or(1, |n| n + 1);
        self.nonce = Some(next);
        format!("n-{next}")
    }
}

struct DpopSource {
    shared: Arc<Mutex<DpopShared>>,
}

impl TokenSource for DpopSource {
    fn fetch(&self, _cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        let mut shared = lock(&self.shared);
        let index = shared.calls.len();
        shared.calls.push(Call {
            state: CallState::Pending,
            waker: None,
        });
        drop(shared);
        Box::pin(SourceCall {
            shared: Arc::clone(&self.shared),
            index,
        })
    }
}

struct SourceCall {
    shared: Arc<Mutex<DpopShared>>,
    index: usize,
}

impl Future for SourceCall {
    type Output = Result<Token, RefreshError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let n = self.index;
        let Some(call) = shared.calls.get_mut(n) else {
            return Poll::Ready(Err(RefreshError::transient("unknown call")));
        };
        match call.state {
            CallState::Answered(ok) => {
                call.state = CallState::Returned(ok);
                Poll::Ready(if ok {
                    Ok(Token::new(format!("at-{}", n + 1)))
                } else {
                    Err(RefreshError::transient(format!(
                        "transient failure {}",
                        n + 1
                    )))
                })
            }
            _ => {
                call.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for SourceCall {
    fn drop(&mut self) {
        if let Some(call) = lock(&self.shared).calls.get_mut(self.index) {
            // Dropped before its outcome reached the coordinator (answered or not).
            if matches!(call.state, CallState::Pending | CallState::Answered(_)) {
                call.state = CallState::Dropped;
            }
        }
    }
}

/// The fake client's request: the headers the policy sets.
#[derive(Debug)]
struct DpopRequest {
    url: Url,
    authorization: Option<String>,
    proof: Option<String>,
    replayable: bool,
}

impl AuthRequest for DpopRequest {
    fn method(&self) -> http::Method {
        http::Method::POST
    }
    fn url(&self) -> &Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        if name.eq_ignore_ascii_case("authorization") {
            self.authorization = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("dpop") {
            self.proof = Some(value.to_owned());
        }
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        self.replayable.then(|| DpopRequest {
            url: self.url.clone(),
            authorization: self.authorization.clone(),
            proof: self.proof.clone(),
            replayable: true,
        })
    }
}

/// The server's response, and which request it answers.
#[derive(Debug)]
struct DpopResponse {
    status: u16,
    www_authenticate: Option<String>,
    nonce: Option<String>,
    wire: usize,
}

impl ResponseView for DpopResponse {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        if name == http::header::WWW_AUTHENTICATE {
            self.www_authenticate.as_deref()
        } else if name == DPOP_NONCE {
            self.nonce.as_deref()
        } else {
            None
        }
    }
}

impl AuthResponse for DpopResponse {}

/// The claims of a compact JWS's payload (`Null` if it does not decode).
fn claims_of(proof: Option<&str>) -> serde_json::Value {
    proof
        .and_then(|jws| jws.split('.').nth(1))
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null)
}

struct WireFuture {
    shared: Arc<Mutex<DpopShared>>,
    index: usize,
}

impl Future for WireFuture {
    type Output = Result<DpopResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let index = self.index;
        let Some(wire) = shared.wire.get_mut(index) else {
            return Poll::Ready(Ok(DpopResponse {
                status: 500,
                www_authenticate: None,
                nonce: None,
                wire: index,
            }));
        };
        match &wire.answer {
            Some(answer) => Poll::Ready(Ok(answer.response(index))),
            None => {
                wire.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn send_wire(shared: &Arc<Mutex<DpopShared>>, caller: usize, request: DpopRequest) -> WireFuture {
    let mut guard = lock(shared);
    let index = guard.wire.len();
    guard.wire.push(Wire {
        caller,
        replayable: request.replayable,
        claims: claims_of(request.proof.as_deref()),
        authorization: request.authorization,
        answer: None,
        waker: None,
    });
    WireFuture {
        shared: Arc::clone(shared),
        index,
    }
}

/// A caller's future: the wire whose response it got, or its error.
type Caller = Pin<Box<dyn Future<Output = Result<usize, String>> + Send>>;

struct Task {
    future: Option<Caller>,
    flag: Arc<Flag>,
    waker: Waker,
    /// The wire whose response the caller got, or its error.
    result: Option<Result<usize, String>>,
    cancelled: bool,
}

impl Task {
    fn live(&self) -> bool {
        self.result.is_none() && !self.cancelled
    }
    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
}

struct DpopWorld {
    policy: AuthPolicy,
    shared: Arc<Mutex<DpopShared>>,
    tasks: Vec<Task>,
    step: usize,
    summary: DpopSummary,
}

/// Runs a DPoP scenario and checks the driver's promises after every step; see the
/// module docs.
pub fn run_dpop(scenario: &DpopScenario) -> Result<DpopSummary, Violation> {
    quiet_planted_panics();
    let mut world = DpopWorld::new()?;
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

impl DpopWorld {
    fn new() -> Result<Self, Violation> {
        let setup = |message: String| Violation {
            contract: "setup",
            step: 0,
            message,
        };
        let clock = ManualClock::at_fixed_point();
        let shared = Arc::new(Mutex::new(DpopShared::default()));
        let key = DpopKey::generate().map_err(|e| setup(format!("no DPoP key: {e}")))?;
        let flight = SingleFlight::builder()
            .source(DpopSource {
                shared: Arc::clone(&shared),
            })
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock))
            .backoff(Backoff::none())
            .retry(Retry::none())
            .refresh_ahead(None);
        let policy = AuthPolicyBuilder::<AuthPolicy>::from_flight(flight)
            .allowed_origin(ORIGIN)
            .dpop(Dpop::new(key))
            .build()
            .map_err(|e| setup(format!("the policy was refused: {e}")))?;
        Ok(DpopWorld {
            policy,
            shared,
            tasks: Vec::new(),
            step: 0,
            summary: DpopSummary::default(),
        })
    }

    fn shutdown(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in tasks {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(task)));
        }
        let shared = lock(&self.shared);
        self.summary.source_calls = shared.calls.len();
        self.summary.requests = shared.wire.len();
        self.summary.demands_after_rotation = shared.demands_after_rotation;
        for sends in per_caller(&shared.wire).values() {
            let first = &shared.wire[sends[0]].answer;
            if matches!(first, Some(Answer::Demand(_))) && shared.wire[sends[0]].replayable {
                self.summary.demands += 1;
            }
            if let [_, second] = sends.as_slice() {
                match first {
                    Some(Answer::Demand(_)) => {
                        self.summary.nonce_resends += 1;
                        if matches!(shared.wire[*second].answer, Some(Answer::Demand(_))) {
                            self.summary.second_demands += 1;
                        }
                    }
                    _ => self.summary.rejection_resends += 1,
                }
            }
        }
    }

    fn violation(&self, contract: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            contract,
            step: self.step,
            message: message.into(),
        }
    }

    fn apply(&mut self, op: DpopOp) -> Result<(), Violation> {
        match op {
            DpopOp::Send { replayable } => self.start_send(replayable),
            DpopOp::Poll(n) => {
                let woken: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].woken())
                    .collect();
                if !woken.is_empty() {
                    self.poll(woken[usize::from(n) % woken.len()])?;
                }
            }
            DpopOp::Settle => self.settle()?,
            DpopOp::Respond { n, verdict } => {
                let pending: Vec<usize> = {
                    let shared = lock(&self.shared);
                    (0..shared.wire.len())
                        .filter(|&i| shared.wire[i].answer.is_none())
                        .collect()
                };
                if !pending.is_empty() {
                    self.respond(pending[usize::from(n) % pending.len()], verdict);
                }
            }
            DpopOp::Rotate => {
                lock(&self.shared).next_nonce();
            }
            DpopOp::Source(ok) => self.answer_call(ok),
            DpopOp::Cancel(n) => {
                let live: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live())
                    .collect();
                if !live.is_empty() {
                    let index = live[usize::from(n) % live.len()];
                    self.tasks[index].cancelled = true;
                    let future = self.tasks[index].future.take();
                    if let Err(panic) =
                        std::panic::catch_unwind(AssertUnwindSafe(move || drop(future)))
                    {
                        return Err(self.violation(
                            "C18",
                            format!("dropping task {index} panicked: {}", panic_message(&*panic)),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The server answers wire `index` by `verdict`.
    fn respond(&mut self, index: usize, verdict: Verdict) {
        let waker = {
            let mut shared = lock(&self.shared);
            let answer = match verdict {
                Verdict::Accept => {
                    let current = shared.nonce.map(|n| format!("n-{n}"));
                    match current {
                        Some(current)
                            if shared.wire[index].claim("nonce") != Some(current.as_str()) =>
                        {
                            if shared.wire[index].claim("nonce").is_some() {
                                shared.demands_after_rotation += 1;
                            }
                            Answer::Demand(current)
                        }
                        current => Answer::Ok(current),
                    }
                }
                Verdict::Demand => Answer::Demand(shared.next_nonce()),
                Verdict::InvalidToken => Answer::Rejected("invalid_token"),
                Verdict::InvalidProof => Answer::Rejected("invalid_dpop_proof"),
            };
            let wire = &mut shared.wire[index];
            wire.answer = Some(answer);
            wire.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn answer_call(&mut self, ok: bool) {
        let waker = {
            let mut shared = lock(&self.shared);
            shared
                .calls
                .iter_mut()
                .find(|c| c.state == CallState::Pending)
                .and_then(|call| {
                    call.state = CallState::Answered(ok);
                    call.waker.take()
                })
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn start_send(&mut self, replayable: bool) {
        if self.tasks.len() >= MAX_CALLERS {
            return;
        }
        let id = self.tasks.len();
        let policy = self.policy.clone();
        let shared = Arc::clone(&self.shared);
        let request = DpopRequest {
            #[allow(clippy::expect_used)] // a constant, valid URL
            url: Url::parse(&format!("{ORIGIN}/items?page=2")).expect("valid URL"),
            authorization: None,
            proof: None,
            replayable,
        };
        let future = Box::pin(async move {
            let send = |request: DpopRequest| send_wire(&shared, id, request);
            let result: Result<DpopResponse, AuthError<Infallible>> =
                policy.send(request, RequestOptions::default(), send).await;
            result.map(|r| r.wire).map_err(|e| e.to_string())
        });
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        let waker = Waker::from(Arc::clone(&flag));
        self.tasks.push(Task {
            future: Some(future),
            flag,
            waker,
            result: None,
            cancelled: false,
        });
        self.summary.callers += 1;
    }

    fn poll(&mut self, index: usize) -> Result<(), Violation> {
        let task = &mut self.tasks[index];
        let Some(future) = task.future.as_mut() else {
            return Ok(());
        };
        task.flag.0.store(false, Ordering::SeqCst);
        let mut cx = Context::from_waker(&task.waker);
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        match polled {
            Err(panic) => {
                task.future = None;
                task.result = Some(Err("panicked".into()));
                Err(self.violation(
                    "C18",
                    format!("task {index} panicked: {}", panic_message(&*panic)),
                ))
            }
            Ok(Poll::Pending) => Ok(()),
            Ok(Poll::Ready(result)) => {
                task.future = None;
                task.result = Some(result);
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

    fn check(&self) -> Result<(), Violation> {
        let shared = lock(&self.shared);
        let fail = |contract, message: String| Err(self.violation(contract, message));
        // Every send carries the token and a proof bound to it; every jti is new.
        let mut jtis = HashSet::new();
        for (i, wire) in shared.wire.iter().enumerate() {
            let Some(access) = wire.access() else {
                return fail("DPoP", format!("request {i} went without `DPoP <token>`"));
            };
            if wire.claim("ath") != Some(access_token_hash(access).as_str()) {
                return fail(
                    "DPoP",
                    format!("request {i}'s proof is not bound to its token {access:?}"),
                );
            }
            let Some(jti) = wire.claim("jti") else {
                return fail("DPoP", format!("request {i}'s proof has no jti"));
            };
            if !jtis.insert(jti) {
                return fail("DPoP", format!("request {i}'s proof reuses jti {jti:?}"));
            }
        }
        // Per request: at most two sends, and the second only as the driver promises.
        let mut rejected: HashSet<&str> = HashSet::new();
        for (caller, sends) in per_caller(&shared.wire) {
            let first = &shared.wire[sends[0]];
            let rejects_token = match &first.answer {
                Some(Answer::Rejected(_)) => true,
                Some(Answer::Demand(_)) => !first.replayable,
                _ => false,
            };
            if rejects_token {
                rejected.extend(first.access());
            }
            match sends.as_slice() {
                [_] => {}
                [_, second] => {
                    let second = &shared.wire[*second];
                    match &first.answer {
                        Some(Answer::Demand(nonce)) if first.replayable => {
                            if second.claim("nonce") != Some(nonce.as_str()) {
                                return fail(
                                    "DPoP",
                                    format!(
                                        "task {caller}'s resend after a demand for {nonce:?} \
                                         carried the nonce {:?}",
                                        second.claim("nonce")
                                    ),
                                );
                            }
                        }
                        Some(Answer::Rejected(_)) if first.replayable => {
                            if second.access() == first.access() {
                                return fail(
                                    "C4",
                                    format!("task {caller} resent its request with the same token"),
                                );
                            }
                        }
                        answer => {
                            return fail(
                                "C4",
                                format!(
                                    "task {caller} sent its request again after {answer:?} \
                                     (replayable: {})",
                                    first.replayable
                                ),
                            );
                        }
                    }
                }
                more => {
                    return fail(
                        "C4",
                        format!("task {caller} sent its request {} times", more.len()),
                    );
                }
            }
            // A caller that got a response got its last send's; a response to a first
            // send that the driver resends after is never returned.
            if let Some(Some(Ok(got))) = self.tasks.get(caller).map(|t| t.result.as_ref()) {
                let last = sends[sends.len() - 1];
                let resent_after = first.replayable
                    && matches!(first.answer, Some(Answer::Demand(_) | Answer::Rejected(_)));
                if *got != last || (sends.len() == 1 && resent_after) {
                    return fail(
                        "C4",
                        format!(
                            "task {caller} got the response of request {got} after sends \
                             {sends:?} (first answered {:?})",
                            first.answer
                        ),
                    );
                }
            }
        }
        // A demand on a replayable request costs no refresh.
        let failed = shared
            .calls
            .iter()
            .filter(|c| matches!(c.state, CallState::Returned(false) | CallState::Dropped))
            .count();
        let allowed = 1 + failed + rejected.len();
        if shared.calls.len() > allowed {
            return fail(
                "DPoP",
                format!(
                    "{} source calls, but only {failed} failed or dropped and {} tokens \
                     rejected: a nonce demand (or a resend's response) caused a refresh",
                    shared.calls.len(),
                    rejected.len()
                ),
            );
        }
        Ok(())
    }

    /// Answers everything (the server checking its current nonce) until every caller
    /// has finished.
    fn drain(&mut self) -> Result<(), Violation> {
        for _ in 0..DRAIN_ROUNDS {
            self.settle()?;
            self.check()?;
            if self.tasks.iter().all(|t| !t.live()) {
                return Ok(());
            }
            let pending: Vec<usize> = {
                let shared = lock(&self.shared);
                (0..shared.wire.len())
                    .filter(|&i| shared.wire[i].answer.is_none())
                    .collect()
            };
            for index in pending {
                self.respond(index, Verdict::Accept);
            }
            self.answer_call(true);
            self.settle()?;
            self.check()?;
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

/// Each caller's sends, in order.
fn per_caller(wire: &[Wire]) -> HashMap<usize, Vec<usize>> {
    let mut sends: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, w) in wire.iter().enumerate() {
        sends.entry(w.caller).or_default().push(i);
    }
    sends
}
