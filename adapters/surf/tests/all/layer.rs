//! The `TokenMiddleware` through surf against the testkit server: attaching, resending with
//! the same body (S8), bodies that cannot be resent (C4), markers (C11), error mapping,
//! body classification with an intact response, and the async-std runtime pieces.

use crate::common;
use std::time::Duration;

use crate::common::{binary_body, client, setup, setup_with};
use async_std::io::Cursor;
use surf::{Body, StatusCode};
use tokenflight::{Classifier, ForceRefresh, Placement, SkipAuth, config::Backoff};
use tokenflight_surf::BareTransport;
use tokenflight_tests::testkit::Failure;

#[async_std::test]
async fn valid_token_is_attached_and_the_response_is_untouched() {
    let s = setup();
    let client = client(s.layer.clone());
    let mut res = client.get(s.server.api_url("hello")).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.header("x-echo-path").unwrap().as_str(), "/api/hello");
    assert_eq!(res.body_bytes().await.unwrap(), Vec::<u8>::new());
    let counters = s.server.counters();
    assert_eq!(counters.resource_calls, 1);
    assert_eq!(counters.token_calls, 0);
    assert_eq!(counters.requests_with(&s.access), 1);
}

#[async_std::test]
async fn s8_rejected_post_is_resent_with_the_identical_body() {
    let s = setup();
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    let sent = binary_body(100_000);
    let mut res = client
        .post(s.server.api_url("upload"))
        .body(Body::from_bytes(sent.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.header("x-echo-method").unwrap().as_str(), "POST");
    let echoed = res.body_bytes().await.unwrap();
    assert!(echoed == sent, "the echo differs from the body sent");

    let counters = s.server.counters();
    assert_eq!(counters.refresh_token_calls, 1);
    assert_eq!(counters.rejections, 1);
    assert_eq!(counters.resource_calls, 2);
    let requests = s.server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].token.as_deref(), Some(s.access.as_str()));
    assert!(!requests[0].accepted);
    assert_ne!(requests[1].token.as_deref(), Some(s.access.as_str()));
    assert!(requests[1].accepted);
    assert!(requests.iter().all(|r| r.body == sent));
}

#[async_std::test]
async fn streamed_body_is_not_resent_but_the_token_is_marked_rejected() {
    let s = setup();
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    let sent = binary_body(5_000);
    // Unknown length: a stream the layer must not read ahead.
    let body = Body::from_reader(Cursor::new(sent.clone()), None);
    let res = client
        .post(s.server.api_url("stream"))
        .body(body)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Unauthorized);
    assert_eq!(s.server.counters().resource_calls, 1);
    assert_eq!(s.server.requests()[0].body, sent, "sent intact once");

    // The next request refreshes first instead of paying another 401.
    let res = client.get(s.server.api_url("after")).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    let counters = s.server.counters();
    assert_eq!(counters.refresh_token_calls, 1);
    assert_eq!(counters.rejections, 1);
    assert_eq!(counters.resource_calls, 2);
}

#[async_std::test]
async fn body_over_the_replay_limit_is_sent_intact_but_not_resent() {
    let s = setup();
    let layer = s.layer.clone().replay_body_limit(16);
    let client = client(layer);
    s.server.expire_all_tokens();

    let large = binary_body(17);
    let res = client
        .post(s.server.api_url("large"))
        .body(Body::from_bytes(large.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Unauthorized);
    assert_eq!(s.server.requests()[0].body, large);
    assert_eq!(s.server.counters().resource_calls, 1);

    s.server.expire_all_tokens();
    let small = binary_body(16);
    let mut res = client
        .post(s.server.api_url("small"))
        .body(Body::from_bytes(small.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.body_bytes().await.unwrap(), small);
}

#[async_std::test]
async fn retried_string_body_and_response_headers_are_kept() {
    let s = setup();
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    let mut res = client
        .post(s.server.api_url("json"))
        .body(Body::from_string("{\"a\":1}".to_owned()))
        .content_type("application/json")
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.body_string().await.unwrap(), "{\"a\":1}");
    // A response whose body the layer did not read keeps the server's headers.
    assert_eq!(
        res.header("content-type").unwrap().as_str(),
        "application/octet-stream"
    );
}

#[async_std::test]
async fn skip_auth_marker_sends_no_credentials_and_is_not_retried() {
    let s = setup();
    let client = client(s.layer.clone());
    let mut req = surf::get(s.server.api_url("public")).build();
    req.set_ext(SkipAuth);
    let res = client.send(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::Unauthorized);
    let counters = s.server.counters();
    assert_eq!(counters.resource_calls, 1);
    assert_eq!(counters.credentialed_requests, 0);
    assert_eq!(counters.token_calls, 0);
}

#[async_std::test]
async fn force_refresh_marker_refreshes_before_sending() {
    let s = setup();
    let client = client(s.layer.clone());
    let mut req = surf::get(s.server.api_url("fresh")).build();
    req.set_ext(ForceRefresh);
    let res = client.send(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(s.server.counters().refresh_token_calls, 1);
    let requests = s.server.requests();
    assert_eq!(requests.len(), 1);
    assert_ne!(requests[0].token.as_deref(), Some(s.access.as_str()));
}

#[async_std::test]
async fn permanent_refresh_failure_is_a_401_error_with_the_typed_error_inside() {
    let s = setup();
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.fail_next_token_calls(1, Failure::InvalidGrant);
    let err = client.get(s.server.api_url("x")).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::Unauthorized);
    let typed = err.downcast_ref::<tokenflight::Error>().unwrap();
    assert!(
        matches!(typed, tokenflight::Error::ReauthenticationRequired { .. }),
        "{typed:?}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(&s.access),
        "the access token leaked: {shown}"
    );
}

#[async_std::test]
async fn transient_refresh_failure_is_a_503_error_with_the_typed_error_inside() {
    // One attempt per flight, so the one failure is the flight's outcome.
    let s = setup_with(|b| b.retry(tokenflight::config::Retry::none()));
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.fail_next_token_calls(1, Failure::Status500);
    let err = client.get(s.server.api_url("x")).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::ServiceUnavailable);
    let typed = err.downcast_ref::<tokenflight::Error>().unwrap();
    assert!(
        typed.refresh_error().is_retryable()
            && typed.refresh_error().cause() == tokenflight::Cause::TokenSource
    );
}

#[async_std::test]
async fn refresh_timeout_runs_on_the_async_std_timer() {
    let s = setup_with(|b| b.refresh_timeout(Duration::from_millis(200)));
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.fail_next_token_calls(1, Failure::Hang);
    let err = client.get(s.server.api_url("x")).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::ServiceUnavailable);
    let typed = err.downcast_ref::<tokenflight::Error>().unwrap();
    assert!(typed.refresh_error().cause() == tokenflight::Cause::Timeout);
}

#[async_std::test]
async fn hung_refresh_times_out_then_the_next_one_recovers() {
    let s = setup_with(|b| {
        b.refresh_timeout(Duration::from_millis(200))
            .backoff(Backoff::none())
    });
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.fail_next_token_calls(1, Failure::Hang);
    let err = client.get(s.server.api_url("hang")).await.unwrap_err();
    let typed = err.downcast_ref::<tokenflight::Error>().unwrap();
    assert!(typed.refresh_error().cause() == tokenflight::Cause::Timeout);

    let res = client.get(s.server.api_url("recovered")).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(s.server.counters().refresh_token_calls, 2);
}

#[async_std::test]
async fn pooled_bare_client_is_stuck_behind_a_hung_refresh() {
    // Why `BareTransport` wants keep-alive off: surf's h1 pool hands the abandoned
    // connection to the next refresh, which waits behind the hung request.
    let pooled = BareTransport::new(surf::Client::new());
    let s = common::setup_over(pooled, |b| {
        b.refresh_timeout(Duration::from_millis(200))
            .backoff(Backoff::none())
    });
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.fail_next_token_calls(1, Failure::Hang);
    let first = client.get(s.server.api_url("hang")).await.unwrap_err();
    let second = client.get(s.server.api_url("stuck")).await.unwrap_err();
    for err in [first, second] {
        let typed = err.downcast_ref::<tokenflight::Error>().unwrap();
        assert!(typed.refresh_error().cause() == tokenflight::Cause::Timeout);
    }
    assert_eq!(
        s.server.counters().refresh_token_calls,
        1,
        "the second refresh never reached the server's handler"
    );
}

#[async_std::test]
async fn business_code_classifier_reads_the_body_and_hands_it_back_intact() {
    let s = setup_with(|b| {
        b.classifier(
            Classifier::new().body(4096, |body| body.windows(10).any(|w| w == b"\"code\":401")),
        )
    });
    s.server.set_business_code(true);
    let client = client(s.layer.clone());

    // Accepted: the body was read for classification and must still be all there.
    let sent = binary_body(3_000);
    let mut res = client
        .post(s.server.api_url("ok"))
        .body(Body::from_bytes(sent.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.header("x-echo-method").unwrap().as_str(), "POST");
    assert!(res.body_bytes().await.unwrap() == sent);

    // Rejected with HTTP 200 {"code":401}: refreshed and resent with the same body.
    s.server.expire_all_tokens();
    let mut res = client
        .post(s.server.api_url("again"))
        .body(Body::from_bytes(sent.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert!(res.body_bytes().await.unwrap() == sent);
    let counters = s.server.counters();
    assert_eq!(counters.refresh_token_calls, 1);
    assert_eq!(counters.rejections, 1);
}

#[async_std::test]
async fn token_is_not_sent_to_an_origin_that_is_not_allowed() {
    let s = setup();
    let other = tokenflight_tests::testkit::TestServer::start(
        tokenflight_tests::testkit::TestServerConfig::other_origin(),
    );
    let client = client(s.layer.clone());
    let res = client.get(other.api_url("elsewhere")).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(other.counters().other_requests, 1);
    assert_eq!(other.counters().credentialed_requests, 0);
}

#[async_std::test]
async fn async_std_spawner_runs_the_task() {
    use tokenflight::adapter::Spawn;
    let (tx, rx) = futures::channel::oneshot::channel();
    tokenflight_surf::AsyncStdSpawner.spawn(Box::pin(async move {
        tx.send(42).unwrap();
    }));
    assert_eq!(rx.await.unwrap(), 42);
}

/// Polls `condition` until it holds (a deterministic signal observed by polling; the
/// deadline only bounds a broken run).
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        async_std::task::sleep(Duration::from_millis(5)).await;
    }
}

#[async_std::test]
async fn c6_refresh_finishes_on_the_spawner_after_the_caller_was_cancelled() {
    let s = setup();
    let flight = s
        .layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
        .clone();
    let before = flight.current().unwrap().generation();
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    s.server.set_token_latency(Duration::from_millis(300));

    let url = s.server.api_url("cancelled");
    let caller = async_std::task::spawn(async move { client.get(url).await.map(|r| r.status()) });
    until("the token call", || s.server.counters().token_calls == 1).await;
    assert!(
        caller.cancel().await.is_none(),
        "the caller was still waiting"
    );

    until("the refreshed token", || {
        flight.current().is_some_and(|t| t.generation() > before)
    })
    .await;
    let counters = s.server.counters();
    assert_eq!(counters.tokens_issued, 1);

    // The refreshed token is used; no second refresh.
    let client = common::client(s.layer.clone());
    let res = client.get(s.server.api_url("next")).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(s.server.counters().token_calls, 1);
}

#[async_std::test]
async fn query_placement_is_refreshed_and_resent_too() {
    let s = setup_with(|b| b.placement(Placement::query("token")));
    s.server.set_query_token(true);
    let client = client(s.layer.clone());
    s.server.expire_all_tokens();
    let sent = binary_body(1_000);
    let mut res = client
        .put(format!("{}?keep=1", s.server.api_url("q")))
        .body(Body::from_bytes(sent.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert!(res.body_bytes().await.unwrap() == sent);
    let requests = s.server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].token.as_deref(), Some(s.access.as_str()));
    assert!(requests[1].accepted);
    assert_eq!(s.server.counters().refresh_token_calls, 1);
}

/// Middleware after the layer that fails with the request's URL in its message, as
/// logging or retry middleware may.
struct FailsShowingTheUrl;

#[surf::utils::async_trait]
impl surf::middleware::Middleware for FailsShowingTheUrl {
    async fn handle(
        &self,
        req: surf::Request,
        _client: surf::Client,
        _next: surf::middleware::Next<'_>,
    ) -> surf::Result<surf::Response> {
        Err(surf::Error::from_str(
            StatusCode::BadGateway,
            format!("nothing sent to {}", req.url()),
        ))
    }
}

#[async_std::test]
async fn c12_query_token_never_in_errors_of_middleware_after_the_layer() {
    let s = setup_with(|b| b.placement(Placement::query("token")));
    let client = client(s.layer.clone()).with(FailsShowingTheUrl);
    let error = client
        .get(format!("{}?keep=%7e", s.server.api_url("q")))
        .await
        .unwrap_err();
    let text = format!("{error} / {error:?}");
    assert!(!text.contains(&s.access), "the token shows in {text}");
    assert!(text.contains("?keep=%7e&token=redacted"), "{text}");
    assert_eq!(error.status(), StatusCode::BadGateway, "the status is kept");
}
