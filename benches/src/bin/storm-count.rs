//! One storm's release, polled by hand on one thread, for counting instructions and
//! cache misses with callgrind (which, unlike a clock, the machine's load does not move):
//!
//! ```text
//! cargo build --release -p tokenflight-benches --bin storm-count
//! valgrind --tool=callgrind --cache-sim=yes --toggle-collect='*release*' \
//!     target/release/storm-count tokenflight 100000 [tasks]
//! ```
//!
//! `N` waiters (boxed, as `waiter_memory` parks them) wait on an expired token; only
//! `release` is counted: opening the gate, and polling every waiter to its token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::task::noop_waker_ref;
use tokenflight::adapter::Clock;
use tokenflight::{SingleFlight, Token};
use tokenflight_benches::storm::{
    Contender, FRESH, Refresh, SharedFloor, SharedFloorWithHandle, Tokenflight,
};

/// The system clock without its coarse reading: rustix finds the coarse clock in the
/// vDSO, which valgrind does not map. Only the waiters' first poll (not counted) reads
/// the clock differently.
#[derive(Debug)]
struct PreciseClock;

impl Clock for PreciseClock {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now()
    }
}

/// [`Tokenflight`] on [`PreciseClock`].
struct TokenflightPrecise(SingleFlight);

impl Contender for TokenflightPrecise {
    const NAME: &'static str = Tokenflight::NAME;

    fn new(refresh: Arc<Refresh>) -> Self {
        let flight = Tokenflight::builder(refresh)
            .clock(Arc::new(PreciseClock))
            .build()
            .unwrap_or_else(|error| panic!("building the flight: {error}"));
        TokenflightPrecise(flight)
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let flight = self.0.clone();
        async move {
            flight
                .token()
                .await
                .unwrap_or_else(|error| panic!("tokenflight waiter: {error}"))
        }
    }
}

type Parked = Vec<Pin<Box<dyn Future<Output = Arc<Token>> + Send>>>;

fn park<C: Contender>(waiters: usize) -> (Arc<Refresh>, C, Parked) {
    let refresh = Refresh::new();
    let contender = C::new(Arc::clone(&refresh));
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut parked: Parked = Vec::with_capacity(waiters);
    for _ in 0..waiters {
        let mut waiter: Pin<Box<dyn Future<Output = Arc<Token>> + Send>> =
            Box::pin(contender.waiter());
        assert!(waiter.as_mut().poll(&mut cx).is_pending(), "not parked");
        parked.push(waiter);
    }
    (refresh, contender, parked)
}

/// The counted part: the gate opens, every waiter is polled until it has its token.
#[inline(never)]
fn release(refresh: &Refresh, mut parked: Parked) -> (usize, usize) {
    refresh.open();
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut fresh = 0;
    let mut passes = 0;
    while !parked.is_empty() {
        passes += 1;
        parked.retain_mut(|waiter| match waiter.as_mut().poll(&mut cx) {
            Poll::Ready(token) => {
                fresh += usize::from(token.access().expose() == FRESH);
                false
            }
            Poll::Pending => true,
        });
    }
    (fresh, passes)
}

/// The same storm with every waiter a task on a current-thread tokio runtime, so the
/// count includes waking and polling tasks: parked first (not counted), then
/// [`release_tasks`].
fn storm_tasks<C: Contender>(runtime: &tokio::runtime::Runtime, waiters: usize) {
    let refresh = Refresh::new();
    let contender = C::new(Arc::clone(&refresh));
    let polled = Arc::new(AtomicUsize::new(0));
    let fresh = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    for _ in 0..waiters {
        let waiter = contender.waiter();
        let (polled, fresh, all_done) = (polled.clone(), fresh.clone(), all_done.clone());
        runtime.spawn(async move {
            let mut waiter = std::pin::pin!(waiter);
            let mut first = true;
            let token = std::future::poll_fn(|cx| {
                let poll = waiter.as_mut().poll(cx);
                if std::mem::take(&mut first) {
                    polled.fetch_add(1, Ordering::Relaxed);
                }
                poll
            })
            .await;
            let ok = usize::from(token.access().expose() == FRESH);
            if fresh.fetch_add(ok, Ordering::AcqRel) + ok == waiters {
                all_done.notify_one();
            }
        });
    }
    // Every task polled once: parked on the closed gate.
    while polled.load(Ordering::Relaxed) < waiters {
        runtime.block_on(tokio::task::yield_now());
    }
    release_tasks(runtime, &refresh, &all_done);
    assert_eq!(
        fresh.load(Ordering::Acquire),
        waiters,
        "{}: every waiter got the fresh token",
        C::NAME
    );
    assert_eq!(refresh.calls(), 1, "{}: one refresh", C::NAME);
    println!("{}: {waiters} tasks released", C::NAME);
}

/// The counted part with tasks: the gate opens, the runtime runs until the last task
/// has its token.
#[inline(never)]
fn release_tasks(
    runtime: &tokio::runtime::Runtime,
    refresh: &Refresh,
    all_done: &tokio::sync::Notify,
) {
    refresh.open();
    runtime.block_on(all_done.notified());
}

fn storm<C: Contender>(waiters: usize) {
    let (refresh, _contender, parked) = park::<C>(waiters);
    let (fresh, passes) = release(&refresh, parked);
    assert_eq!(
        fresh,
        waiters,
        "{}: every waiter got the fresh token",
        C::NAME
    );
    assert_eq!(refresh.calls(), 1, "{}: one refresh", C::NAME);
    println!("{}: {waiters} waiters released in {passes} passes", C::NAME);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| Tokenflight::NAME.to_owned());
    let waiters = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let tasks = args.next().is_some_and(|mode| mode == "tasks");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|error| panic!("runtime: {error}"));
    let _context = runtime.enter();
    match (name.as_str(), tasks) {
        (SharedFloor::NAME, false) => storm::<SharedFloor>(waiters),
        (SharedFloorWithHandle::NAME, false) => storm::<SharedFloorWithHandle>(waiters),
        (Tokenflight::NAME, false) => storm::<TokenflightPrecise>(waiters),
        (SharedFloor::NAME, true) => storm_tasks::<SharedFloor>(&runtime, waiters),
        (SharedFloorWithHandle::NAME, true) => {
            storm_tasks::<SharedFloorWithHandle>(&runtime, waiters);
        }
        (Tokenflight::NAME, true) => storm_tasks::<TokenflightPrecise>(&runtime, waiters),
        (other, _) => panic!("unknown contender {other}"),
    }
}
