//! Where the token goes when a server redirects (C12), for the three ways to follow
//! redirects with surf. The main server redirects to an "other origin" server that only
//! records whether credentials reached it.

use crate::common::{Setup, binary_body, client, setup};
use surf::{Body, StatusCode};
use tokenflight::SkipAuth;
use tokenflight_surf::FollowRedirects;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

fn other_origin() -> TestServer {
    TestServer::start(TestServerConfig::other_origin())
}

#[async_std::test]
async fn recommended_order_keeps_the_token_off_another_origin_and_sends_once() {
    let Setup { server, layer, .. } = setup();
    let other = other_origin();
    let client = client(layer);
    let url = server.redirect_url(&other.api_url("landing"));
    let res = client.get(url).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.header("x-echo-path").unwrap().as_str(), "/api/landing");
    assert_eq!(server.counters().redirects, 1);
    assert_eq!(other.counters().other_requests, 1, "each hop sent once");
    assert_eq!(other.counters().credentialed_requests, 0);
}

#[async_std::test]
async fn recommended_order_attaches_the_token_on_a_same_origin_hop() {
    let Setup { server, layer, .. } = setup();
    let client = client(layer);
    let url = server.redirect_url(&server.api_url("inner"));
    let res = client.get(url).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].accepted);
}

#[async_std::test]
async fn surf_redirect_after_the_layer_leaks_the_token() {
    // The hazard the crate docs warn about: surf's `Redirect` probes the target with a
    // clone of the request that already carries `Authorization`.
    let Setup { server, layer, .. } = setup();
    let other = other_origin();
    let client = surf::Client::new()
        .with(layer)
        .with(surf::middleware::Redirect::default());
    let url = server.redirect_url(&other.api_url("landing"));
    let res = client.get(url).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert!(
        other.counters().credentialed_requests > 0,
        "surf's Redirect no longer forwards credentials: revisit the crate docs"
    );
}

#[async_std::test]
async fn surf_redirect_before_the_layer_is_safe_but_sends_twice() {
    let Setup { server, layer, .. } = setup();
    let other = other_origin();
    let client = surf::Client::new()
        .with(surf::middleware::Redirect::default())
        .with(layer);
    let url = server.redirect_url(&other.api_url("landing"));
    let res = client.get(url).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(other.counters().credentialed_requests, 0);
    assert_eq!(
        other.counters().other_requests,
        2,
        "probe, then the request"
    );
}

#[async_std::test]
async fn post_redirected_with_302_continues_as_get_without_body() {
    let Setup { server, layer, .. } = setup();
    let other = other_origin();
    let client = client(layer);
    let url = server.redirect_url(&other.api_url("landing"));
    let mut res = client
        .post(url)
        .body(Body::from_bytes(binary_body(100)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(res.header("x-echo-method").unwrap().as_str(), "GET");
    assert_eq!(res.body_bytes().await.unwrap(), Vec::<u8>::new());
}

#[async_std::test]
async fn callers_own_authorization_header_is_dropped_across_origins() {
    let Setup { server, layer, .. } = setup();
    let other = other_origin();
    let client = client(layer);
    let mut req = surf::get(server.redirect_url(&other.api_url("landing")))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .build();
    req.set_ext(SkipAuth);
    let res = client.send(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::Ok);
    assert_eq!(other.counters().other_requests, 1);
    assert_eq!(other.counters().credentialed_requests, 0);
}

#[async_std::test]
async fn hop_limit_returns_the_redirect_response() {
    let Setup { server, layer, .. } = setup();
    let client = surf::Client::new()
        .with(FollowRedirects::new(0))
        .with(layer);
    let res = client
        .get(server.redirect_url(&server.api_url("never")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::Found);
    assert_eq!(server.counters().resource_calls, 0);
}
