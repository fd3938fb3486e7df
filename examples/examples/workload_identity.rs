//! A service without a client secret: its platform writes a short-lived identity token
//! to a file and rotates it (a Kubernetes projected service-account token); the service
//! exchanges it (RFC 8693) for an access token to one API, authenticating itself with
//! a signed assertion (`private_key_jwt`), and calls the API. The testkit plays the
//! platform (a file rotated every 2 s, kubelet-style), the security token service and
//! the API.
//!
//! `cargo run --example workload_identity`

use std::sync::Arc;
use std::time::Duration;

use tokenflight::SingleFlight;
use tokenflight::oauth2::{SigningKey, TokenExchangeGrant, token_type};
use tokenflight::sources::FileTokenSource;
use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{Rotation, TEST_ES256_PEM, TestServer, TestServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Stand-ins for the platform, the STS and the API. Exchanged tokens live 3 s here,
    // so the run shows a few exchanges.
    let server = TestServer::start(TestServerConfig {
        token_lifetime: Duration::from_secs(3),
        ..TestServerConfig::default()
    });
    let file = server.rotating_token_file(
        Duration::from_secs(2),
        Duration::from_secs(4),
        Rotation::Kubelet,
    );
    // The client's key, registered at the STS (in production: a key from a secret
    // store or a file; its public half registered with the identity provider).
    let key = SigningKey::from_pem(TEST_ES256_PEM)?;
    server.register_client_key(&key);

    // 1. The projected token, through its own coordinator: read when it is due, and
    //    again only when kubelet has rotated the file; never per request.
    let file_source = Arc::new(FileTokenSource::new(file.path()));
    let subject = Arc::new(
        SingleFlight::builder()
            .source(file_source.clone())
            .build()?,
    );

    // 2. The exchange, over a bare client (never through the middleware it feeds).
    let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
    let exchange = TokenExchangeGrant::new(bare, &server.token_url(), subject)?
        .subject_token_type(token_type::JWT)
        .requested_token_type(token_type::ACCESS_TOKEN)
        .audience("orders")
        .client_id(&server.client_id())
        .private_key_jwt(key);

    // 3. The API calls.
    let middleware = TokenMiddleware::builder()
        .source(exchange)
        .allowed_origin(&server.origin())
        .build()?;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build();
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let response = client
            .get(server.audience_url("orders", "recent"))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        requests += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let counters = server.counters();
    println!(
        "{requests} API calls, all 200; {} token exchanges (each with a fresh assertion, \
         {} replayed); the file rotated {} times and was read {} times",
        counters.token_exchange_calls,
        counters.assertion_replays,
        file.rotations(),
        file_source.reads(),
    );
    Ok(())
}
