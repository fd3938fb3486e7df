//! The OAuth 2.0 grants of `tokenflight::oauth2` against the testkit's real token
//! endpoint, over the reqwest adapter's bare transport: both grants, both client
//! authentication methods, rotation, and each class of error (C9): permanent
//! (`invalid_grant`, `invalid_client`, reuse of a spent refresh token), transient (5xx,
//! 429 with `Retry-After`, malformed body, connection refused) and timeouts.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenflight::oauth2::{ClientAuth, ClientCredentialsGrant, RefreshTokenGrant};
use tokenflight::{
    RefreshContext, RefreshError, RefreshReason, SingleFlight, Token, TokenSource,
    adapter::Transport,
};
use tokenflight_tests::testkit::{Failure, TestServer, TestServerConfig};
use tokenflight_tests::transport::ReqwestTransport as BareTransport;

fn transport() -> Arc<dyn Transport> {
    Arc::new(BareTransport::default())
}

fn refresh_grant(server: &TestServer) -> RefreshTokenGrant {
    RefreshTokenGrant::new(transport(), &server.token_url(), &server.client_id())
        .unwrap()
        .client_secret(server.client_secret())
}

fn client_credentials(server: &TestServer) -> ClientCredentialsGrant {
    ClientCredentialsGrant::new(transport(), &server.token_url(), &server.client_id())
        .unwrap()
        .client_secret(server.client_secret())
}

fn cx(previous: Option<&Token>) -> RefreshContext {
    RefreshContext::new(
        RefreshReason::Expired,
        previous.map(|t| Arc::new(t.clone())),
        SystemTime::now(),
    )
}

/// The server accepts the token on its protected API.
async fn api_accepts(server: &TestServer, token: &Token) -> bool {
    accepted_at(&server.api_url("whoami"), token).await
}

/// The resource at `url` accepts the token.
async fn accepted_at(url: &str, token: &Token) -> bool {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token.access().expose())
        .send()
        .await
        .unwrap()
        .status()
        == reqwest::StatusCode::OK
}

async fn refresh_error(source: &dyn TokenSource, previous: Option<&Token>) -> RefreshError {
    source.fetch(cx(previous)).await.unwrap_err()
}

#[tokio::test]
async fn refresh_grant_with_basic_and_body_auth_rotates_without_reuse() {
    let server = TestServer::start(TestServerConfig::default());
    for auth in [ClientAuth::Basic, ClientAuth::Body] {
        let login = Token::new("login").with_refresh(server.issue_refresh_token());
        let grant = refresh_grant(&server)
            .client_auth(auth)
            .scope("read")
            .param("audience", "testkit");
        let first = grant.fetch(cx(Some(&login))).await.unwrap();
        // The extra parameter reached the server: the token is for that audience's API
        // and no other.
        let audience_api = server.audience_url("testkit", "whoami");
        assert!(accepted_at(&audience_api, &first).await, "{auth:?}");
        assert!(!api_accepts(&server, &first).await, "{auth:?}");
        let lifetime = first.remaining(SystemTime::now()).unwrap();
        assert!(lifetime <= Duration::from_secs(3600) && lifetime > Duration::ZERO);
        // The server rotates: each answer carries a new refresh token, which is used next.
        assert_ne!(first.refresh(), login.refresh(), "{auth:?}");
        let second = grant.fetch(cx(Some(&first))).await.unwrap();
        assert_ne!(second.refresh(), first.refresh());
        assert!(accepted_at(&audience_api, &second).await);
    }
    let counters = server.counters();
    assert_eq!(counters.refresh_token_calls, 4);
    assert_eq!(counters.token_errors, 0);
    assert_eq!(counters.reuse_detections, 0);
}

#[tokio::test]
async fn initial_refresh_token_starts_the_chain() {
    let server = TestServer::start(TestServerConfig::default());
    let grant = refresh_grant(&server).initial_refresh_token(server.issue_refresh_token());
    let flight = SingleFlight::builder().source(grant).build().unwrap();
    let first = flight.token().await.unwrap();
    assert!(api_accepts(&server, &first).await);
    let second = flight.force_refresh().await.unwrap();
    assert!(second.generation() > first.generation());
    assert!(api_accepts(&server, &second).await);
    assert_eq!(server.counters().refresh_token_calls, 2);
    assert_eq!(server.counters().reuse_detections, 0);
}

#[tokio::test]
async fn client_credentials_with_basic_and_body_auth() {
    let server = TestServer::start(TestServerConfig::default());
    for auth in [ClientAuth::Basic, ClientAuth::Body] {
        let token = client_credentials(&server)
            .client_auth(auth)
            .scope("read")
            .param("resource", "urn:testkit")
            .fetch(cx(None))
            .await
            .unwrap();
        assert!(api_accepts(&server, &token).await, "{auth:?}");
        assert!(token.expiry().is_some());
    }
    let counters = server.counters();
    assert_eq!(counters.client_credentials_calls, 2);
    assert_eq!(counters.token_errors, 0);
}

#[tokio::test]
async fn c9_bad_grant_and_bad_client_are_permanent() {
    let server = TestServer::start(TestServerConfig::default());
    let unknown = Token::new("a").with_refresh("never-issued");
    let error = refresh_error(&refresh_grant(&server), Some(&unknown)).await;
    assert!(error.is_permanent(), "{error}");
    assert!(error.message().contains("invalid_grant"), "{error}");

    for auth in [ClientAuth::Basic, ClientAuth::Body] {
        let wrong =
            ClientCredentialsGrant::new(transport(), &server.token_url(), &server.client_id())
                .unwrap()
                .client_secret("wrong-SECRET")
                .client_auth(auth);
        let error = refresh_error(&wrong, None).await;
        assert!(error.is_permanent(), "{error}");
        assert!(
            error.message().contains("HTTP 401") && error.message().contains("invalid_client"),
            "{error}"
        );
        assert!(!format!("{error} {error:?}").contains("SECRET"));
    }

    // Injected invalid_grant.
    server.fail_next_token_calls(1, Failure::InvalidGrant);
    let login = Token::new("a").with_refresh(server.issue_refresh_token());
    let error = refresh_error(&refresh_grant(&server), Some(&login)).await;
    assert!(error.is_permanent(), "{error}");
    // A refresh token presented to an injected failure is not spent: it still works.
    assert!(refresh_grant(&server).fetch(cx(Some(&login))).await.is_ok());
}

#[tokio::test]
async fn c9_replaying_a_spent_refresh_token_is_permanent() {
    // What rotation-unaware clients run into, and what the single flight avoids.
    let server = TestServer::start(TestServerConfig::default());
    let login = Token::new("a").with_refresh(server.issue_refresh_token());
    let grant = refresh_grant(&server);
    let newer = grant.fetch(cx(Some(&login))).await.unwrap();
    let error = refresh_error(&grant, Some(&login)).await;
    assert!(error.is_permanent(), "{error}");
    assert_eq!(server.counters().reuse_detections, 1);
    // The server revoked the family: the newer token's refresh token is dead too.
    assert!(refresh_error(&grant, Some(&newer)).await.is_permanent());
}

#[tokio::test]
async fn c9_server_errors_rate_limits_and_garbage_are_transient() {
    let server = TestServer::start(TestServerConfig::default());
    let login = Token::new("a").with_refresh(server.issue_refresh_token());
    let grant = refresh_grant(&server);

    server.fail_next_token_calls(1, Failure::Status500);
    let error = refresh_error(&grant, Some(&login)).await;
    assert!(
        error.is_retryable() && error.cause() == tokenflight::Cause::TokenSource,
        "{error}"
    );
    assert_eq!(error.retry_after(), None);

    server.fail_next_token_calls(
        1,
        Failure::TooMany {
            retry_after_secs: 9,
        },
    );
    let error = refresh_error(&grant, Some(&login)).await;
    assert!(
        error.is_retryable() && error.cause() == tokenflight::Cause::TokenSource,
        "{error}"
    );
    assert_eq!(error.retry_after(), Some(Duration::from_secs(9)));

    server.fail_next_token_calls(1, Failure::MalformedJson);
    let error = refresh_error(&grant, Some(&login)).await;
    assert!(
        error.is_retryable() && error.cause() == tokenflight::Cause::TokenSource,
        "{error}"
    );

    // Same for client_credentials.
    server.fail_next_token_calls(1, Failure::Status500);
    let error = refresh_error(&client_credentials(&server), None).await;
    assert!(
        error.is_retryable() && error.cause() == tokenflight::Cause::TokenSource,
        "{error}"
    );

    // After the failures, the (unspent) refresh token still works.
    let token = grant.fetch(cx(Some(&login))).await.unwrap();
    assert!(api_accepts(&server, &token).await);
    assert_eq!(server.counters().reuse_detections, 0);
}

#[tokio::test]
async fn c9_connection_refused_is_transient_and_a_hang_times_out() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let grant =
        ClientCredentialsGrant::new(transport(), &format!("http://{closed}/oauth/token"), "c")
            .unwrap()
            .client_secret("s");
    let error = refresh_error(&grant, None).await;
    assert!(
        error.is_retryable() && error.cause() == tokenflight::Cause::TokenSource,
        "{error}"
    );

    let server = TestServer::start(TestServerConfig::default());
    server.fail_next_token_calls(1, Failure::Hang);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let grant = ClientCredentialsGrant::new(
        Arc::new(BareTransport::new(impatient)),
        &server.token_url(),
        &server.client_id(),
    )
    .unwrap()
    .client_secret(server.client_secret());
    let error = refresh_error(&grant, None).await;
    assert!(error.cause() == tokenflight::Cause::Timeout, "{error}");
    // The endpoint recovers; so does the grant.
    assert!(grant.fetch(cx(None)).await.is_ok());
}

#[tokio::test]
async fn c9_the_flight_backs_off_on_429_and_reauthenticates_on_invalid_grant() {
    let server = TestServer::start(TestServerConfig::default());
    let grant = refresh_grant(&server).initial_refresh_token(server.issue_refresh_token());
    let flight = SingleFlight::builder().source(grant).build().unwrap();
    server.fail_next_token_calls(
        1,
        Failure::TooMany {
            retry_after_secs: 3600,
        },
    );
    let first = flight.token().await.unwrap_err();
    assert_eq!(
        first.refresh_error().retry_after(),
        Some(Duration::from_secs(3600))
    );
    // Backing off for the server's hour: the next call fails fast, no second request.
    let second = flight.token().await.unwrap_err();
    assert!(
        matches!(second, tokenflight::Error::BackingOff { .. }),
        "{second}"
    );
    assert_eq!(server.counters().token_calls, 1);

    let server = TestServer::start(TestServerConfig::default());
    let grant = refresh_grant(&server).initial_refresh_token("never-issued");
    let flight = SingleFlight::builder().source(grant).build().unwrap();
    let error = flight.token().await.unwrap_err();
    assert!(
        matches!(error, tokenflight::Error::ReauthenticationRequired { .. }),
        "{error}"
    );
    assert!(flight.is_auth_lost());
}
