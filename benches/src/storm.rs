//! The storm: N callers arrive on an expired token while one refresh is in flight.
//!
//! Every contender gets the same [`Refresh`]: a token source that counts its calls and
//! waits at a gate. The harness parks all N waiters (each has been polled once and is
//! waiting), opens the gate, and measures from the moment the source returned its token
//! to the moment the last waiter resumed with it. A second harness measures the heap
//! each parked waiter costs.

use std::alloc::System;
use std::fmt::Debug;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use futures::channel::oneshot;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::task::noop_waker_ref;
use stats_alloc::{Region, StatsAlloc};
use tokenflight::{SingleFlight, Token, from_fn};

/// The access secret every refreshed token carries; waiters check they got it.
pub const FRESH: &str = "fresh-token";

/// A token valid for an hour.
pub fn fresh_token() -> Token {
    Token::new(FRESH).expires_in(Duration::from_secs(3600), SystemTime::now())
}

/// A token that expired an hour ago.
pub fn expired_token() -> Token {
    let past = SystemTime::now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Token::new("expired-token").expires_at(past)
}

/// Valid now, without leeway (every contender checks the same way).
pub fn is_valid(token: &Token) -> bool {
    !token.is_expired(SystemTime::now(), Duration::ZERO)
}

/// The refresh every contender runs: counts its calls, waits at a gate the harness
/// opens once all waiters are parked, and notes when it finished.
#[derive(Debug)]
pub struct Refresh {
    gate: Shared<oneshot::Receiver<()>>,
    opener: Mutex<Option<oneshot::Sender<()>>>,
    calls: AtomicUsize,
    finished_at: OnceLock<Instant>,
}

impl Refresh {
    /// A refresh whose gate is closed.
    pub fn new() -> Arc<Self> {
        let (opener, gate) = oneshot::channel();
        Arc::new(Refresh {
            gate: gate.shared(),
            opener: Mutex::new(Some(opener)),
            calls: AtomicUsize::new(0),
            finished_at: OnceLock::new(),
        })
    }

    /// The refresh itself: returns a fresh token once the gate is open.
    pub async fn run(&self) -> Token {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // An error means the opener was dropped: also an open gate.
        let _ = self.gate.clone().await;
        let _ = self.finished_at.set(Instant::now());
        fresh_token()
    }

    /// Opens the gate.
    pub fn open(&self) {
        let opener = self
            .opener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(opener) = opener {
            let _ = opener.send(());
        }
    }

    /// How many times the refresh ran.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// When the refresh returned its token.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished_at.get().copied()
    }
}

/// One way of coalescing the callers of an expired token.
pub trait Contender: Send + Sync + 'static {
    /// The name in benchmark ids and the report.
    const NAME: &'static str;

    /// A fresh instance whose current token is expired and whose refresh is `refresh`.
    fn new(refresh: Arc<Refresh>) -> Self;

    /// One caller: resolves to a token it may send.
    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static;
}

fn must<T, E: Debug>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error:?}"),
    }
}

/// The floor: a bare `futures::future::Shared` around the refresh, which every waiter
/// awaits. No expiry check, no state, no error handling: what waking N tasks through
/// one shared future costs on its own.
#[derive(Debug)]
pub struct SharedFloor {
    shared: Shared<BoxFuture<'static, Arc<Token>>>,
}

impl Contender for SharedFloor {
    const NAME: &'static str = "floor_bare_shared_future";

    fn new(refresh: Arc<Refresh>) -> Self {
        let shared = async move { Arc::new(refresh.run().await) }
            .boxed()
            .shared();
        SharedFloor { shared }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        self.shared.clone()
    }
}

/// The floor plus one handle: a bare `Shared`, and each waiter also holds a clone of
/// an `Arc` it drops when it resumes, as a waiter holds the handle of whatever
/// coordinates it (tokenflight's waiter holds a `SingleFlight`, the peers their caches).
/// The difference to [`SharedFloor`] is that handle's one contended reference count.
#[derive(Debug)]
pub struct SharedFloorWithHandle {
    shared: Shared<BoxFuture<'static, Arc<Token>>>,
    handle: Arc<()>,
}

impl Contender for SharedFloorWithHandle {
    const NAME: &'static str = "floor_shared_with_handle";

    fn new(refresh: Arc<Refresh>) -> Self {
        SharedFloorWithHandle {
            shared: SharedFloor::new(refresh).shared,
            handle: Arc::new(()),
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let shared = self.shared.clone();
        let handle = Arc::clone(&self.handle);
        async move {
            let token = shared.await;
            drop(handle);
            token
        }
    }
}

/// tokenflight's `SingleFlight::token()`, no spawner (the waiters drive the refresh),
/// tokio's timer for the refresh timeout. Needs a tokio runtime context.
#[derive(Debug)]
pub struct Tokenflight {
    flight: SingleFlight,
}

impl Tokenflight {
    /// The flight every tokenflight storm builds: `refresh` as its source, an expired
    /// token, and what the reqwest adapter presets on tokio. (The core's default timer,
    /// `FuturesTimer`, adds ~15 µs per refresh on this path: see BENCHMARKS.md.)
    pub fn builder(refresh: Arc<Refresh>) -> tokenflight::FlightBuilder {
        SingleFlight::builder()
            .source(from_fn(move |_cx| {
                let refresh = Arc::clone(&refresh);
                async move { Ok(refresh.run().await) }
            }))
            .initial_token(expired_token())
            .timer(Arc::new(tokenflight_reqwest::TokioTimer))
    }
}

impl Contender for Tokenflight {
    const NAME: &'static str = "tokenflight";

    fn new(refresh: Arc<Refresh>) -> Self {
        let flight = Tokenflight::builder(refresh).build();
        Tokenflight {
            flight: must(flight, "building the flight"),
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let flight = self.flight.clone();
        async move { must(flight.token().await, "tokenflight waiter") }
    }
}

/// moka's `future::Cache::get_with`, which runs one `init` future per key and makes
/// the other callers wait for it. The expired token is an absent entry.
#[derive(Debug)]
pub struct Moka {
    cache: moka::future::Cache<(), Arc<Token>>,
    refresh: Arc<Refresh>,
}

impl Contender for Moka {
    const NAME: &'static str = "moka_get_with";

    fn new(refresh: Arc<Refresh>) -> Self {
        Moka {
            cache: moka::future::Cache::new(1),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let cache = self.cache.clone();
        let refresh = Arc::clone(&self.refresh);
        async move {
            cache
                .get_with((), async move { Arc::new(refresh.run().await) })
                .await
        }
    }
}

/// `async_singleflight::Group::work`, behind a lock-free check of the current token
/// (the way it would be used for tokens).
#[derive(Debug)]
pub struct AsyncSingleflight {
    group: Arc<async_singleflight::Group<Arc<Token>, std::convert::Infallible>>,
    current: Arc<ArcSwapOption<Token>>,
    refresh: Arc<Refresh>,
}

impl Contender for AsyncSingleflight {
    const NAME: &'static str = "async_singleflight";

    fn new(refresh: Arc<Refresh>) -> Self {
        AsyncSingleflight {
            group: Arc::new(async_singleflight::Group::new()),
            current: Arc::new(ArcSwapOption::from_pointee(expired_token())),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let group = Arc::clone(&self.group);
        let current = Arc::clone(&self.current);
        let refresh = Arc::clone(&self.refresh);
        async move {
            if let Some(token) = current.load_full().filter(|t| is_valid(t)) {
                return token;
            }
            let work = async {
                let token = Arc::new(refresh.run().await);
                current.store(Some(Arc::clone(&token)));
                Ok(token)
            };
            match group.work("token", work).await {
                (Some(token), _, _) => token,
                other => panic!("async_singleflight gave no token: {:?}", other.2),
            }
        }
    }
}

/// A tokio `Mutex` held across the refresh: whoever holds it refreshes if the token
/// is expired, everyone else queues and checks again (golang oauth2's
/// `ReuseTokenSource` pattern).
#[derive(Debug)]
pub struct MutexAcrossRefresh {
    state: Arc<tokio::sync::Mutex<Arc<Token>>>,
    refresh: Arc<Refresh>,
}

impl Contender for MutexAcrossRefresh {
    const NAME: &'static str = "mutex_across_refresh";

    fn new(refresh: Arc<Refresh>) -> Self {
        MutexAcrossRefresh {
            state: Arc::new(tokio::sync::Mutex::new(Arc::new(expired_token()))),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let state = Arc::clone(&self.state);
        let refresh = Arc::clone(&self.refresh);
        async move {
            let mut token = state.lock().await;
            if !is_valid(&token) {
                *token = Arc::new(refresh.run().await);
            }
            Arc::clone(&token)
        }
    }
}

/// Polls `future`, counting its first poll in `polled` (by then it is parked: the
/// gate is closed, so it cannot have finished).
async fn count_first_poll<F: Future>(future: F, polled: &AtomicUsize) -> F::Output {
    let mut future = pin!(future);
    let mut first = true;
    poll_fn(|cx| {
        let poll = future.as_mut().poll(cx);
        if std::mem::take(&mut first) {
            polled.fetch_add(1, Ordering::Release);
        }
        poll
    })
    .await
}

/// One storm on `runtime`: `waiters` tasks wait for one refresh. Returns the time from
/// the refresh's completion to the last waiter resumed.
///
/// # Panics
/// If the source ran other than exactly once, or a waiter got another token.
pub fn release_time<C: Contender>(runtime: &tokio::runtime::Runtime, waiters: usize) -> Duration {
    let refresh = Refresh::new();
    let contender = C::new(Arc::clone(&refresh));
    let base = Instant::now();
    let polled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));
    let last_resumed_ns = Arc::new(AtomicU64::new(0));
    let (all_done, all_done_signal) = std::sync::mpsc::sync_channel::<()>(1);
    for _ in 0..waiters {
        let waiter = contender.waiter();
        let (polled, done, wrong) = (polled.clone(), done.clone(), wrong.clone());
        let (last_resumed_ns, all_done) = (last_resumed_ns.clone(), all_done.clone());
        runtime.spawn(async move {
            let token = count_first_poll(waiter, &polled).await;
            let resumed = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            last_resumed_ns.fetch_max(resumed, Ordering::AcqRel);
            if token.access().expose() != FRESH {
                wrong.fetch_add(1, Ordering::AcqRel);
            }
            if done.fetch_add(1, Ordering::AcqRel) + 1 == waiters {
                let _ = all_done.send(());
            }
        });
    }
    // Not timed: wait until every waiter is parked on the refresh.
    while polled.load(Ordering::Acquire) < waiters {
        std::thread::yield_now();
    }
    refresh.open();
    must(all_done_signal.recv(), "waiting for the waiters");
    assert_eq!(refresh.calls(), 1, "{}: source calls", C::NAME);
    assert_eq!(
        wrong.load(Ordering::Acquire),
        0,
        "{}: wrong tokens",
        C::NAME
    );
    let finished = match refresh.finished_at() {
        Some(at) => at.duration_since(base),
        None => panic!("{}: the refresh never finished", C::NAME),
    };
    Duration::from_nanos(last_resumed_ns.load(Ordering::Acquire)).saturating_sub(finished)
}

/// What a parked waiter costs.
#[derive(Clone, Copy, Debug)]
pub struct WaiterMemory {
    /// Size of the waiter's future (its state, which the caller's task holds).
    pub future_bytes: usize,
    /// Heap growth while `n` waiters are parked, each future in its own box, divided
    /// by `n`: the future itself plus whatever it allocated to wait.
    pub bytes_per_waiter: f64,
    /// Allocations per parked waiter (the box of the future is one of them).
    pub allocations_per_waiter: f64,
}

/// Parks `waiters` boxed waiters (one poll each, no runtime) and measures the heap they
/// hold, then opens the gate and drives them all to the end.
///
/// # Panics
/// If the source ran other than exactly once, or a waiter got another token.
pub fn waiter_memory<C: Contender>(
    alloc: &StatsAlloc<System>,
    runtime: &tokio::runtime::Runtime,
    waiters: usize,
) -> WaiterMemory {
    // A runtime context for timers; the waiters are polled here, not on the runtime.
    let _context = runtime.enter();
    let refresh = Refresh::new();
    let contender = C::new(Arc::clone(&refresh));
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut parked: Vec<Pin<Box<dyn Future<Output = Arc<Token>> + Send>>> =
        Vec::with_capacity(waiters);
    let mut future_bytes = 0;
    let region = Region::new(alloc);
    for _ in 0..waiters {
        let waiter = contender.waiter();
        future_bytes = std::mem::size_of_val(&waiter);
        let mut waiter: Pin<Box<dyn Future<Output = Arc<Token>> + Send>> = Box::pin(waiter);
        assert!(
            waiter.as_mut().poll(&mut cx).is_pending(),
            "{}: not parked",
            C::NAME
        );
        parked.push(waiter);
    }
    let change = region.change();
    refresh.open();
    // Waiters complete in arrival order (the first one drives the refresh; a fair
    // mutex hands over in queue order), so one pass normally finishes them all.
    let mut passes = 0;
    while !parked.is_empty() {
        passes += 1;
        assert!(passes <= 1_000, "{}: waiters do not finish", C::NAME);
        parked.retain_mut(|waiter| match waiter.as_mut().poll(&mut cx) {
            Poll::Ready(token) => {
                assert_eq!(token.access().expose(), FRESH, "{}: wrong token", C::NAME);
                false
            }
            Poll::Pending => true,
        });
    }
    assert_eq!(refresh.calls(), 1, "{}: source calls", C::NAME);
    let net = change.bytes_allocated as f64 + change.bytes_reallocated as f64
        - change.bytes_deallocated as f64;
    WaiterMemory {
        future_bytes,
        bytes_per_waiter: net / waiters as f64,
        allocations_per_waiter: change.allocations as f64 / waiters as f64,
    }
}
