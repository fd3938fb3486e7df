//! DPoP (RFC 9449) through the reqwest middleware against the testkit's DPoP
//! authorization and resource server, which verify every proof (signature, `htm`/`htu`,
//! `iat`, `jti` replay, `ath`, the token's binding to the key) and demand nonces.
//!
//! 50 concurrent clients send 20 requests each while the resource server rotates its
//! nonce every 100 accepted requests; then a thief replays the token with a key of its
//! own. Checks, and exits with status 1 if one fails: every request succeeded, none was
//! sent more than twice (one resend after a nonce demand), one token served all (nonce
//! demands cost no refresh), no proof was refused (no `jti` reused), and the stolen
//! token was refused.
//!
//! `cargo run -p tokenflight-examples --example dpop`

use std::process::ExitCode;
use std::sync::Arc;

use tokenflight::dpop::{Dpop, DpopKey};
use tokenflight::oauth2::ClientCredentialsGrant;
use tokenflight::{Token, from_fn};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::dpop::Refusal;
use tokenflight_tests::testkit::dpop_server::{DpopServer, DpopServerConfig};

const CLIENTS: usize = 50;
const REQUESTS: usize = 20;

fn client(middleware: TokenMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let server = DpopServer::start(DpopServerConfig {
        rotate_every: Some(100),
        ..DpopServerConfig::default()
    });
    // One key for the grant and the middleware; in a fleet, every process loads the
    // same PEM (`DpopKey::from_pem_file`).
    let dpop = Dpop::new(DpopKey::generate()?);
    let grant = ClientCredentialsGrant::new(
        Arc::new(BareTransport::default()),
        &server.token_url(),
        "app",
    )?
    .client_secret("app-secret")
    .dpop(dpop.clone());
    let middleware = TokenMiddleware::builder()
        .source(grant)
        .allowed_origin(&server.resource_origin())
        .dpop(dpop)
        .build()?;
    let owner = client(middleware.clone());
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (owner, base) = (owner.clone(), server.api_url(""));
            tokio::spawn(async move {
                let mut failed = 0;
                for r in 0..REQUESTS {
                    match owner.get(format!("{base}c{c}/r{r}")).send().await {
                        Ok(response) if response.status() == 200 => {}
                        _ => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await?;
    }
    let counts = server.counts();
    let most_sends = counts.hits.values().max().copied().unwrap_or(0);

    // The thief has the token, not the key.
    let stolen = middleware
        .policy()
        .flight()
        .and_then(|f| f.current())
        .ok_or("no token after the storm")?
        .access()
        .clone();
    let thief = TokenMiddleware::builder()
        .source(from_fn(move |_| {
            let stolen = stolen.clone();
            async move { Ok(Token::new(stolen.expose())) }
        }))
        .allowed_origin(&server.resource_origin())
        .dpop(Dpop::new(DpopKey::generate()?))
        .build()?;
    let thief_status = client(thief)
        .get(server.api_url("stolen"))
        .send()
        .await?
        .status();
    let wrong_key = server.counts().refused.contains(&Refusal::WrongKey);

    println!(
        "dpop: {CLIENTS} clients x {REQUESTS} requests: {failed} failed, {} on the wire, \
         {} nonce demands at the resource server ({} rotations), {} at the token endpoint, \
         {} token(s) issued, at most {most_sends} sends per request, {} proofs refused; \
         a stolen token with another key: {thief_status}",
        counts.resource_requests,
        counts.resource_nonce_demands,
        counts.resource_rotations,
        counts.token_nonce_demands,
        counts.issued,
        counts.refused.len(),
    );
    let checks = [
        (failed == 0, "every request succeeded"),
        (most_sends <= 2, "at most one resend per request"),
        (counts.issued == 1, "nonce demands cost no refresh"),
        (
            counts.refused.is_empty(),
            "no proof refused (no jti reused)",
        ),
        (
            counts.resource_rotations >= 1,
            "the nonce rotated mid-storm",
        ),
        (
            thief_status == 401 && wrong_key,
            "the stolen token was refused for its key",
        ),
    ];
    let mut ok = true;
    for (passed, what) in checks {
        if !passed {
            eprintln!("dpop: FAILED: {what}");
            ok = false;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
