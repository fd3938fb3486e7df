//! C6 through the tower layer: dropping the only request that started a refresh does
//! not lose the token; the tokio spawner `TokenLayer::builder()` presets finishes the
//! refresh and stores it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokenflight::{RefreshContext, RefreshError, Token, from_fn};
use tokenflight_tower::TokenLayer;
use tokio::sync::{Semaphore, mpsc};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_request_that_started_a_refresh_keeps_the_new_token() {
    let (started, mut refresh_started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let source = {
        let (gate, calls) = (gate.clone(), calls.clone());
        from_fn(move |_cx: RefreshContext| {
            let (started, gate, calls) = (started.clone(), gate.clone(), calls.clone());
            async move {
                let _ = started.send(());
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|_| RefreshError::transient("gate closed"))?;
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Token::new(format!("token-{n}")))
            }
        })
    };
    let layer = TokenLayer::builder()
        .source(source)
        .allowed_origin("http://api.test")
        .build()
        .unwrap();
    let service = layer.layer(service_fn(|_request: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
    }));

    let request = http::Request::get("http://api.test/first")
        .body(Full::default())
        .unwrap();
    let call = tokio::spawn(service.clone().oneshot(request));
    refresh_started.recv().await.unwrap();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // Every caller is gone; now the source may answer.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);

    // Polls a condition rather than sleeping a guessed time; the timeout only turns a
    // lost token into a failure instead of a hang.
    let stored = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(token) = layer
                .policy()
                .flight()
                .expect("an unkeyed policy")
                .current()
            {
                return token.access().expose().to_owned();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the refreshed token was never stored");
    assert_eq!(stored, "token-1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The next request uses it: no second refresh.
    let request = http::Request::get("http://api.test/next")
        .body(Full::default())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
