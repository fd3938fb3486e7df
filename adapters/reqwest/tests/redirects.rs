//! C12 through reqwest's redirect following: the core checks the origin of the URL a
//! request is sent to; reqwest then follows redirects by itself. It drops the
//! `Authorization` header when a redirect leaves the origin, so the token does not
//! travel with it.

mod common;

use tokenflight_tests::testkit::{TestServer, TestServerConfig};

#[tokio::test]
async fn a_cross_origin_redirect_does_not_carry_the_token() {
    let server = TestServer::start(TestServerConfig::default());
    let other = TestServer::start(TestServerConfig::other_origin());
    let client = common::client(common::layer(&server));

    let response = client
        .get(server.redirect_url(&other.api_url("landing")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), other.api_url("landing"));
    assert_eq!(response.headers()["x-echo-path"], "/api/landing");

    assert_eq!(server.counters().redirects, 1);
    assert_eq!(
        server.counters().credentialed_requests,
        1,
        "the redirect itself"
    );
    let other = other.counters();
    assert_eq!(other.other_requests, 1);
    assert_eq!(
        other.credentialed_requests, 0,
        "the token leaked to another origin"
    );
}

#[tokio::test]
async fn a_same_origin_redirect_keeps_the_token() {
    let server = TestServer::start(TestServerConfig::default());
    let client = common::client(common::layer(&server));

    let response = client
        .get(server.redirect_url(&server.api_url("landing")))
        .send()
        .await
        .unwrap();
    // The testkit refuses /api without a valid token, so 200 proves it arrived.
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-path"], "/api/landing");
    let counters = server.counters();
    assert_eq!(counters.redirects, 1);
    assert_eq!(counters.rejections, 0);
    assert_eq!(counters.credentialed_requests, 2);
}

#[tokio::test]
async fn a_request_to_an_origin_not_allowed_carries_no_token() {
    let server = TestServer::start(TestServerConfig::default());
    let other = TestServer::start(TestServerConfig::other_origin());
    let client = common::client(common::layer(&server));

    let response = client.get(other.api_url("x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(other.counters().credentialed_requests, 0);
    assert_eq!(
        server.counters().token_calls,
        0,
        "no token was even fetched"
    );
}
