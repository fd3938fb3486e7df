//! A hand-written `TokenSource`: anything that can produce a token can feed tokenflight.
//! Here: an "API key exchange" that posts a key to the token endpoint (the testkit's
//! client-credentials grant stands in for it) and reads the JSON answer itself.
//!
//! `cargo run --example custom_source`

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokenflight::{RefreshContext, RefreshError, Token, TokenSource, adapter::Transport};
use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{Failure, TestServer, TestServerConfig};

/// Exchanges a long-lived key for short-lived access tokens.
struct KeyExchange {
    /// A bare client: never the one with the token layer.
    transport: Arc<dyn Transport>,
    token_url: String,
    form: String,
}

impl TokenSource for KeyExchange {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            println!("  (source called: {:?})", cx.reason);
            let request = http::Request::post(self.token_url.as_str())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Bytes::from(self.form.clone()))
                .map_err(|e| RefreshError::permanent(format!("bad request: {e}")))?;
            let response = self
                .transport
                .send(request, 64 * 1024)
                .await
                // Network trouble: worth retrying later (the core backs off).
                .map_err(|e| {
                    RefreshError::transient("token endpoint unreachable").with_source(e)
                })?;
            let status = response.status();
            if status.is_server_error() || status.as_u16() == 429 {
                return Err(RefreshError::transient(format!(
                    "token endpoint said {status}"
                )));
            }
            if !status.is_success() {
                // The key was refused: retrying will not help, a person must act.
                return Err(RefreshError::permanent(format!("key refused ({status})")));
            }
            let body: serde_json::Value = serde_json::from_slice(response.body())
                .map_err(|_| RefreshError::transient("token response is not JSON"))?;
            let access = body
                .get("access_token")
                .and_then(|v| v.as_str())
                .ok_or_else(|| RefreshError::transient("no access_token in the response"))?;
            let expires_in = body
                .get("expires_in")
                .and_then(|v| v.as_u64())
                .unwrap_or(300);
            Ok(Token::new(access).expires_in(Duration::from_secs(expires_in), SystemTime::now()))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = TestServer::start(TestServerConfig::default());
    let source = KeyExchange {
        transport: Arc::new(BareTransport::new(reqwest::Client::new())),
        token_url: server.token_url(),
        form: format!(
            "grant_type=client_credentials&client_id={}&client_secret={}",
            server.client_id(),
            server.client_secret()
        ),
    };
    let layer = TokenMiddleware::builder()
        .source(source)
        .allowed_origin(&server.origin())
        .backoff(tokenflight::config::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
        .build()?;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer)
        .build();

    println!("first request:");
    let status = client.get(server.api_url("reports")).send().await?.status();
    println!("  -> {status}");

    println!("the token endpoint fails once (500), then the token is revoked:");
    server.fail_next_token_calls(1, Failure::Status500);
    server.expire_all_tokens();
    match client.get(server.api_url("reports")).send().await {
        Ok(response) => println!("  -> {}", response.status()),
        // The source's transient error reaches the caller, typed; the core backs off.
        Err(error) => println!("  -> error: {error}"),
    }

    println!("after the backoff:");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = client.get(server.api_url("reports")).send().await?.status();
    println!("  -> {status}");
    println!("token-endpoint calls: {}", server.counters().token_calls);
    Ok(())
}
