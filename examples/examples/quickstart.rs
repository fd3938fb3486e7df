//! The smallest useful program: reqwest with tokenflight's middleware against a real
//! OAuth server (the testkit's, started here on loopback).
//!
//! `cargo run --example quickstart`

use std::sync::Arc;

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Stand-in for your authorization server and API.
    let server = TestServer::start(TestServerConfig::default());
    let refresh_token_from_login = server.issue_refresh_token();

    // The token source reaches the token endpoint through a *bare* client, so a refresh
    // can never pass through the layer that waits for it.
    let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
    let grant = RefreshTokenGrant::new(bare, &server.token_url(), &server.client_id())?
        .client_secret(server.client_secret())
        .initial_refresh_token(refresh_token_from_login);
    let layer = TokenMiddleware::builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()?;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.clone())
        .build();

    // The first request fetches a token; the second reuses it.
    let response = client.get(server.api_url("me")).send().await?;
    println!("GET /api/me -> {}", response.status());
    // The server revokes every token: the next request is rejected, refreshed once and
    // resent, and the caller only sees the 200.
    server.expire_all_tokens();
    let response = client.get(server.api_url("me")).send().await?;
    println!(
        "GET /api/me after the token was revoked -> {}",
        response.status()
    );

    let stats = layer.policy().stats();
    println!(
        "token-endpoint calls: {}, requests resent after a refresh: {}",
        server.counters().token_calls,
        stats.retries
    );
    Ok(())
}
