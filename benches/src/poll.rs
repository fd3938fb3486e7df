//! Driving a future without a runtime: the fast path must not pay an executor's
//! overhead in the measurement, so each contender's future is polled in place with a
//! no-op waker until it is ready (on the fast path that is the first poll).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};

use futures::task::noop_waker_ref;

/// Polls `future` in place until it is ready, spinning if it is not (a contended
/// tokio `Mutex` may need a few polls; every other fast path completes on the first).
pub fn poll_to_end<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(noop_waker_ref());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::hint::spin_loop();
    }
}
