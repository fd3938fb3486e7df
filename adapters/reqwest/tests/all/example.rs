//! The crate docs' example, run for real against the testkit server.

use crate::common;
use std::sync::Arc;

use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::tokenflight::SkipAuth;
use tokenflight_reqwest::tokenflight::oauth2::RefreshTokenGrant;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

#[tokio::test]
async fn an_authenticated_request_gets_a_token_and_passes() {
    let server = TestServer::start(TestServerConfig::default());
    let refresh_token_from_login = server.issue_refresh_token();

    let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
    let grant = RefreshTokenGrant::new(bare, &server.token_url(), &server.client_id())
        .unwrap()
        .client_secret(server.client_secret())
        .initial_refresh_token(refresh_token_from_login);
    let layer = TokenMiddleware::builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.clone())
        .build();

    let response = client
        .post(server.api_url("orders"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-path"], "/api/orders");
    assert_eq!(response.text().await.unwrap(), "hello");

    // A second request reuses the token.
    let response = client.get(server.api_url("me")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let counters = server.counters();
    assert_eq!(counters.token_calls, 1);
    assert_eq!(counters.refresh_token_calls, 1);
    assert_eq!(counters.credentialed_requests, 2);
    let token = layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
        .current()
        .unwrap();
    assert_eq!(counters.requests_with(token.access().expose()), 2);
}

#[tokio::test]
async fn skip_auth_sends_no_credentials() {
    let server = TestServer::start(TestServerConfig::default());
    let client = common::client(common::layer(&server));

    let response = client
        .get(server.api_url("public"))
        .with_extension(SkipAuth)
        .send()
        .await
        .unwrap();
    // The testkit protects /api, so without credentials it refuses; and the 401 is not
    // classified, so no refresh and no resend.
    assert_eq!(response.status(), 401);
    let counters = server.counters();
    assert_eq!(counters.token_calls, 0);
    assert_eq!(counters.credentialed_requests, 0);
    assert_eq!(counters.resource_calls, 1);
}
