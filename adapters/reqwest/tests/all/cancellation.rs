//! C6 through reqwest: dropping the request that triggered a refresh does not lose the
//! refreshed token; the tokio spawner that `TokenMiddleware::builder()` presets finishes and
//! stores it.

use crate::common;
use std::sync::Arc;
use std::time::Duration;

use tokenflight_reqwest::TokenMiddleware;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokio::sync::{Semaphore, mpsc};

/// Waits until the layer holds a token (the spawned refresh stored it). Polls a
/// condition rather than sleeping a guessed time; the timeout only turns a lost token
/// into a failure instead of a hang.
async fn stored_token(layer: &TokenMiddleware) -> String {
    let wait = async {
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
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the refreshed token was never stored")
}

struct Setup {
    server: TestServer,
    layer: TokenMiddleware,
    gate: Arc<Semaphore>,
}

/// Sends one request, waits until the refresh it started is in flight (the source is
/// held at its gate), drops the request, and only then lets the refresh go on.
async fn drop_the_request_mid_refresh(spawner: bool) -> Setup {
    let server = TestServer::start(TestServerConfig::default());
    let (started, mut refresh_started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let builder = TokenMiddleware::builder()
        .source(common::gated_client_credentials(
            &server,
            started,
            gate.clone(),
        ))
        .allowed_origin(&server.origin());
    let builder = if spawner {
        builder
    } else {
        builder.without_spawner()
    };
    let layer = builder.build().unwrap();
    let client = common::client(layer.clone());

    let request = tokio::spawn({
        let url = server.api_url("first");
        async move { client.get(url).send().await }
    });
    refresh_started.recv().await.unwrap();
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    // Every caller is gone; now the token endpoint may answer.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    Setup {
        server,
        layer,
        gate,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_request_that_started_a_refresh_keeps_the_new_token() {
    let Setup { server, layer, .. } = drop_the_request_mid_refresh(true).await;

    // Nobody waits any more; the spawned refresh still completes and is stored.
    let token = stored_token(&layer).await;
    assert_eq!(server.counters().token_calls, 1);

    let client = common::client(layer.clone());
    let response = client.get(server.api_url("second")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let counters = server.counters();
    assert_eq!(counters.token_calls, 1, "the next request refreshed again");
    assert_eq!(counters.requests_with(&token), 1);
    assert_eq!(layer.policy().stats().source_calls, 1);
}

/// The control: without a spawner the refresh dies with its last caller, so the next
/// request has to refresh again — what the test above rules out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spawner_the_dropped_refresh_is_lost_and_redone() {
    let Setup {
        server,
        layer,
        gate,
    } = drop_the_request_mid_refresh(false).await;
    assert!(
        layer
            .policy()
            .flight()
            .expect("an unkeyed policy")
            .current()
            .is_none()
    );
    assert_eq!(server.counters().token_calls, 0);

    let client = common::client(layer.clone());
    let response = client.get(server.api_url("second")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.counters().token_calls, 1);
    assert_eq!(layer.policy().stats().source_calls, 2);
    drop(gate);
}
