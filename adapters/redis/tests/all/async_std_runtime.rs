//! An async-std application uses the store through a small background tokio runtime
//! (see the crate docs): the store's futures are awaited on async-std, the Redis work
//! runs on tokio.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::RedisServer;
use tokenflight::{
    RefreshContext, SingleFlight, Token, from_fn, store::StoreError, store::TokenStore,
};
use tokenflight_redis::RedisStore;

#[test]
fn the_store_works_from_async_std_with_a_tokio_handle() {
    let server = RedisServer::start();
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Built outside any runtime: only the handle says where the work runs.
    let build = || {
        RedisStore::builder(server.url())
            .key_prefix("as:")
            .runtime(tokio_rt.handle().clone())
            .build()
            .unwrap()
    };
    let calls = Arc::new(AtomicU64::new(0));
    let flights: Vec<_> = (0..3)
        .map(|_| {
            let calls = calls.clone();
            SingleFlight::builder()
                .store(build())
                .source(from_fn(move |_cx: RefreshContext| {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        // async-std's timer, not tokio's: the source runs on async-std.
                        async_std::task::sleep(Duration::from_millis(20)).await;
                        Ok(Token::new(format!("t{n}")))
                    }
                }))
                .build()
                .unwrap()
        })
        .collect();
    async_std::task::block_on(async {
        let tokens = futures::future::join_all(flights.iter().map(|f| f.token())).await;
        let tokens: Vec<_> = tokens.into_iter().map(Result::unwrap).collect();
        assert!(tokens.iter().all(|t| t.access().expose() == "t1"));
        let store = build();
        assert_eq!(store.load().await.unwrap().map(|t| t.generation()), Some(1));
        let lock = store.lock().await.unwrap();
        lock.unlock().await;
    });
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one source call for three stores"
    );

    // Without a handle and outside tokio, building says so instead of panicking.
    match RedisStore::builder(server.url()).build() {
        Err(StoreError::Other(e)) => assert!(e.to_string().contains("tokio runtime")),
        other => panic!("expected a clear error, got {other:?}"),
    }
}
