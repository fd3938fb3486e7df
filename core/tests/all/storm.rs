//! C1/C2 at scale: 10,000 concurrent callers on an expired token, on a tokio
//! multi-thread runtime with 2 workers → exactly one source call, everyone gets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokenflight::{SingleFlight, Token, from_fn};

#[test]
fn c1_c2_ten_thousand_callers_one_source_call() {
    const CALLERS: u64 = 10_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, released) = futures::channel::oneshot::channel::<()>();
        let released = futures::future::FutureExt::shared(released);
        let counter = calls.clone();
        let flight = SingleFlight::builder()
            .source(from_fn(move |_cx| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let released = released.clone();
                async move {
                    let _ = released.await;
                    Ok(Token::new(format!("token-{n}"))
                        .expires_in(Duration::from_secs(3600), std::time::SystemTime::now()))
                }
            }))
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let flight = flight.clone();
                tokio::spawn(async move { flight.token().await })
            })
            .collect();
        // Deterministic signal: every caller but the one driving has joined the flight.
        while flight.stats().coalesced < CALLERS - 1 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        for task in tasks {
            let token = task.await.unwrap().unwrap();
            assert_eq!(token.access().expose(), "token-1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flight.stats().flights, 1);
        assert_eq!(flight.stats().coalesced, CALLERS - 1);
    });
}
