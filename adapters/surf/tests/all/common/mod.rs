//! Shared set-up for the surf adapter's tests: a testkit server, a `TokenMiddleware` that
//! refreshes through the server's token endpoint, and a client in the recommended order.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{AuthPolicyBuilder, Token};
use tokenflight_surf::{BareTransport, FollowRedirects, TokenMiddleware};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

/// A server, the access token the layer starts with, and the layer.
pub struct Setup {
    pub server: TestServer,
    pub access: String,
    pub layer: TokenMiddleware,
}

/// A surf client that opens a connection per request, as `BareTransport::default()`
/// uses (that needs this crate's `h1-client-rustls` feature, which the tests keep off).
pub fn one_connection_per_request() -> surf::Client {
    surf::Config::new()
        .set_http_keep_alive(false)
        .try_into()
        .unwrap()
}

/// The refresh-token grant against `server`, over a bare surf client.
pub fn grant(server: &TestServer) -> RefreshTokenGrant {
    grant_over(server, BareTransport::new(one_connection_per_request()))
}

/// The refresh-token grant against `server`, over `bare`.
pub fn grant_over(server: &TestServer, bare: BareTransport) -> RefreshTokenGrant {
    let bare = Arc::new(bare);
    RefreshTokenGrant::new(bare, &server.token_url(), &server.client_id())
        .unwrap()
        .client_secret(server.client_secret())
        .initial_refresh_token(server.issue_refresh_token())
}

/// A server and a layer holding a valid access token from it, allowed on its origin;
/// `configure` adjusts the builder.
pub fn setup_with(
    configure: impl FnOnce(AuthPolicyBuilder<TokenMiddleware>) -> AuthPolicyBuilder<TokenMiddleware>,
) -> Setup {
    setup_over(BareTransport::new(one_connection_per_request()), configure)
}

/// As [`setup_with`], with the token endpoint reached over `bare`.
pub fn setup_over(
    bare: BareTransport,
    configure: impl FnOnce(AuthPolicyBuilder<TokenMiddleware>) -> AuthPolicyBuilder<TokenMiddleware>,
) -> Setup {
    let server = TestServer::start(TestServerConfig::default());
    let (access, expires_in) = server.issue_access_token();
    let initial =
        Token::new(access.clone()).expires_in(Duration::from_secs(expires_in), SystemTime::now());
    let builder = TokenMiddleware::builder()
        .source(grant_over(&server, bare))
        .initial_token(initial)
        .allowed_origin(&server.origin());
    let layer = configure(builder).build().unwrap();
    Setup {
        server,
        access,
        layer,
    }
}

pub fn setup() -> Setup {
    setup_with(|b| b)
}

/// The recommended client: redirects first, then the token layer.
pub fn client(layer: TokenMiddleware) -> surf::Client {
    surf::Client::new()
        .with(FollowRedirects::default())
        .with(layer)
}

/// Bytes that survive no accidental re-encoding: every byte value, many times.
pub fn binary_body(len: usize) -> Vec<u8> {
    (0..=255u8).cycle().take(len).collect()
}
