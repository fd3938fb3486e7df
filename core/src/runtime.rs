//! The three things the core needs from a runtime, as small traits: spawn a task, sleep,
//! and read the wall clock. The core depends on no runtime ([C14](crate#c14)); adapters plug theirs in.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;

/// Runs a future to completion in the background.
///
/// With a spawner, a refresh finishes and is stored even when every caller that waited
/// for it was cancelled ([C6](crate#c6)): a rotating refresh token may already be spent
/// on the server. A spawner may look for its runtime when it is asked to spawn (the
/// adapters' do), so a coordinator can be built outside any runtime.
pub trait Spawn: Send + Sync {
    /// Spawns `task`, which must then be polled to completion, and returns `true`; or
    /// returns `false` (dropping `task`) when there is no runtime to spawn on right now:
    /// the callers that wait for the refresh then drive it, as without a spawner.
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool;
}

impl<S: Spawn + ?Sized> Spawn for Arc<S> {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        (**self).spawn(task)
    }
}

/// Sleeps for a duration; used for refresh timeouts ([C10](crate#c10)) and nothing on
/// the fast path.
pub trait Timer: Send + Sync {
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

impl<T: Timer + ?Sized> Timer for Arc<T> {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        (**self).sleep(duration)
    }
}

/// Reads the clocks. Expiry times are wall-clock times because tokens are shared
/// between processes through stores; backoff deadlines are on the monotonic clock, so
/// a wall-clock step (NTP, a suspended VM) neither stretches nor cancels them
/// ([C16](crate#c16)).
pub trait Clock: Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// The current monotonic time. The default reads [`Instant::now`]; test clocks
    /// override it so that time moves only when they say.
    fn monotonic(&self) -> Instant {
        Instant::now()
    }

    /// A cheap reading of the wall clock for the fast path, as the time since the Unix
    /// epoch (a plain `Duration` compares without converting), never ahead of
    /// [`Clock::now`] and at most [`Clock::coarse_lag`] behind it. The default, `None`,
    /// makes the fast path read [`Clock::now`].
    ///
    /// The coordinator serves a token from this reading only while the token stays
    /// usable for more than the lag; nearer its limit it reads [`Clock::now`], so the
    /// proactive refresh ([C7](crate#c7)) and the refresh-ahead start ([C8](crate#c8)) stay exact.
    fn coarse_now(&self) -> Option<Duration> {
        None
    }

    /// How far [`Clock::coarse_now`] may lag behind [`Clock::now`]; read once, when the
    /// coordinator is built. `None` (the default) means there is no coarse clock.
    fn coarse_lag(&self) -> Option<Duration> {
        None
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }

    fn monotonic(&self) -> Instant {
        (**self).monotonic()
    }

    fn coarse_now(&self) -> Option<Duration> {
        (**self).coarse_now()
    }

    fn coarse_lag(&self) -> Option<Duration> {
        (**self).coarse_lag()
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// `CLOCK_REALTIME_COARSE` (Linux): the time of the last timer tick, read from the
    /// vDSO in a few nanoseconds where `SystemTime::now` takes tens. It follows wall
    /// clock steps like `CLOCK_REALTIME`.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[inline]
    fn coarse_now(&self) -> Option<Duration> {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u32::try_from(ts.tv_nsec).ok()?;
        Some(Duration::new(secs, nanos))
    }

    /// Twice the coarse clock's resolution (one tick: 1–10 ms depending on the
    /// kernel's `HZ`), so a late tick still counts; `None` for a resolution that is
    /// zero or above 50 ms (then the fast path reads the precise clock).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn coarse_lag(&self) -> Option<Duration> {
        let res = rustix::time::clock_getres(rustix::time::ClockId::RealtimeCoarse);
        let secs = u64::try_from(res.tv_sec).ok()?;
        let nanos = u32::try_from(res.tv_nsec).ok()?;
        let res = Duration::new(secs, nanos);
        (!res.is_zero() && res <= Duration::from_millis(50)).then(|| res.saturating_mul(2))
    }
}

/// A runtime-free timer backed by the `futures-timer` crate (one helper thread).
#[cfg(feature = "futures-timer")]
#[derive(Debug, Clone, Copy, Default)]
pub struct FuturesTimer;

#[cfg(feature = "futures-timer")]
impl Timer for FuturesTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(futures_timer::Delay::new(duration))
    }
}

/// A timer whose sleeps never end; refresh attempts then have no timeout. Used when the
/// `futures-timer` feature is off and no timer was supplied.
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(feature = "futures-timer", allow(dead_code))]
pub(crate) struct NoTimer;

impl Timer for NoTimer {
    fn sleep(&self, _duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(futures_util::future::pending())
    }
}

/// The default timer of this build.
pub(crate) fn default_timer() -> Arc<dyn Timer> {
    #[cfg(feature = "futures-timer")]
    {
        Arc::new(FuturesTimer)
    }
    #[cfg(not(feature = "futures-timer"))]
    {
        Arc::new(NoTimer)
    }
}

#[cfg(feature = "test-util")]
pub use manual::ManualClock;

#[cfg(feature = "test-util")]
mod manual {
    use std::fmt;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant, SystemTime};

    use futures_util::future::BoxFuture;

    use super::{Clock, Timer};

    /// A clock and timer that only move when told to, for deterministic tests.
    ///
    /// It has a wall clock and a monotonic clock. [`ManualClock::advance`] moves both;
    /// [`ManualClock::step_wall_forward`] and [`ManualClock::step_wall_back`] move only the
    /// wall clock, as an NTP step does. Sleeps started through it run on the monotonic
    /// clock and complete when `advance` moves it past their deadline.
    #[derive(Clone)]
    pub struct ManualClock {
        inner: Arc<Mutex<ManualState>>,
    }

    struct ManualState {
        now: SystemTime,
        /// Monotonic time: `base + elapsed`.
        base: Instant,
        elapsed: Duration,
        sleepers: Vec<Waker>,
    }

    impl ManualClock {
        /// A clock standing at `start`.
        ///
        /// ```
        /// use std::time::{Duration, SystemTime};
        /// use tokenflight::adapter::Clock;
        /// use tokenflight::test_util::ManualClock;
        /// let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        /// let clock = ManualClock::new(start);
        /// assert_eq!(clock.now(), start);
        /// assert_eq!(clock.elapsed(), Duration::ZERO);
        /// ```
        pub fn new(start: SystemTime) -> Self {
            ManualClock {
                inner: Arc::new(Mutex::new(ManualState {
                    now: start,
                    base: Instant::now(),
                    elapsed: Duration::ZERO,
                    sleepers: Vec::new(),
                })),
            }
        }

        /// Steps the wall clock forward by `by`; monotonic time and sleeps do not move.
        ///
        /// ```
        /// use std::time::Duration;
        /// use tokenflight::adapter::Clock;
        /// use tokenflight::test_util::ManualClock;
        /// let clock = ManualClock::at_fixed_point();
        /// let (wall, mono) = (clock.now(), clock.monotonic());
        /// clock.step_wall_forward(Duration::from_secs(30));
        /// assert_eq!(clock.now(), wall + Duration::from_secs(30));
        /// assert_eq!(clock.monotonic(), mono, "an NTP step does not move monotonic time");
        /// ```
        pub fn step_wall_forward(&self, by: Duration) {
            let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            state.now = state.now.checked_add(by).unwrap_or(state.now);
        }

        /// Steps the wall clock back by `by`; monotonic time and sleeps do not move.
        ///
        /// ```
        /// use std::time::Duration;
        /// use tokenflight::adapter::Clock;
        /// use tokenflight::test_util::ManualClock;
        /// let clock = ManualClock::at_fixed_point();
        /// let wall = clock.now();
        /// clock.step_wall_back(Duration::from_secs(30));
        /// assert_eq!(clock.now(), wall - Duration::from_secs(30));
        /// assert_eq!(clock.elapsed(), Duration::ZERO);
        /// ```
        pub fn step_wall_back(&self, by: Duration) {
            let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            state.now = state.now.checked_sub(by).unwrap_or(state.now);
        }

        /// Monotonic time elapsed since the clock was made.
        ///
        /// ```
        /// use std::time::Duration;
        /// use tokenflight::test_util::ManualClock;
        /// let clock = ManualClock::at_fixed_point();
        /// clock.advance(Duration::from_secs(2));
        /// clock.step_wall_forward(Duration::from_secs(60));
        /// assert_eq!(clock.elapsed(), Duration::from_secs(2));
        /// ```
        pub fn elapsed(&self) -> Duration {
            self.inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed
        }

        /// A clock standing at a fixed, arbitrary point (2023-11-14).
        ///
        /// ```
        /// use std::time::{Duration, SystemTime};
        /// use tokenflight::adapter::Clock;
        /// use tokenflight::test_util::ManualClock;
        /// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        /// assert_eq!(ManualClock::at_fixed_point().now(), at);
        /// ```
        pub fn at_fixed_point() -> Self {
            Self::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        }

        /// Moves the time forward and wakes the sleeps that are due.
        ///
        /// ```
        /// use std::time::Duration;
        /// use futures::FutureExt;
        /// use tokenflight::adapter::Timer;
        /// use tokenflight::test_util::ManualClock;
        /// let clock = ManualClock::at_fixed_point();
        /// let mut sleep = clock.sleep(Duration::from_secs(5));
        /// clock.advance(Duration::from_secs(4));
        /// assert!((&mut sleep).now_or_never().is_none(), "not due yet");
        /// clock.advance(Duration::from_secs(1));
        /// assert!(sleep.now_or_never().is_some());
        /// ```
        pub fn advance(&self, by: Duration) {
            let sleepers = {
                let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                state.now = state.now.checked_add(by).unwrap_or(state.now);
                state.elapsed = state.elapsed.saturating_add(by);
                std::mem::take(&mut state.sleepers)
            };
            // Every sleeper re-checks its own deadline when polled.
            sleepers.into_iter().for_each(Waker::wake);
        }
    }

    impl fmt::Debug for ManualClock {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ManualClock")
                .field("now", &self.now())
                .field("elapsed", &self.elapsed())
                .finish()
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            self.inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .now
        }

        fn monotonic(&self) -> Instant {
            let state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            state.base.checked_add(state.elapsed).unwrap_or(state.base)
        }

        /// The wall clock itself, with no lag: tests that step the wall clock exercise
        /// the coordinator's coarse fast path and see it exact.
        fn coarse_now(&self) -> Option<Duration> {
            self.now().duration_since(SystemTime::UNIX_EPOCH).ok()
        }

        fn coarse_lag(&self) -> Option<Duration> {
            Some(Duration::ZERO)
        }
    }

    impl Timer for ManualClock {
        fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
            let deadline = self.elapsed().checked_add(duration);
            Box::pin(ManualSleep {
                clock: self.clone(),
                deadline,
            })
        }
    }

    struct ManualSleep {
        clock: ManualClock,
        /// On the monotonic clock (`elapsed`); `None`: never.
        deadline: Option<Duration>,
    }

    impl Future for ManualSleep {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut state = self
                .clock
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match self.deadline {
                Some(deadline) if state.elapsed >= deadline => Poll::Ready(()),
                _ => {
                    state.sleepers.push(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }
}
