//! DPoP conformance (RFC 9449), run by every adapter through
//! [`conformance_tests!`](crate::conformance_tests) against the DPoP testkit
//! ([`DpopServer`]): an authorization server and a resource server on two loopback
//! origins that verify every proof and demand nonces.
//!
//! | scenario | what the wire must show |
//! |---|---|
//! | [`d1_a_nonce_storm_costs_no_error_no_refresh_and_one_resend_at_most`] | 100 clients, nonces demanded at both servers and rotated mid-storm: 0 caller-visible errors, at most one resend per request, one token, no proof refused, no `jti` reused |
//! | [`d2_a_token_endpoint_nonce_demand_costs_no_refresh_token`] | the token endpoint's `use_dpop_nonce` is resent with the same refresh token, which is spent once; twice in a row |
//! | [`d3_a_stolen_token_is_refused_without_its_key`] | the token replayed with another key, or as a bearer token, is refused |
//! | [`d4_a_nonce_resend_carries_the_same_body_and_a_new_proof`] | a `POST` resent after a nonce demand carries its body byte for byte |

// Test support: a panic is how a scenario reports a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, SystemTime};

use futures::future::join_all;
use tokenflight::dpop::{Dpop, DpopKey};
use tokenflight::oauth2::{ClientCredentialsGrant, RefreshTokenGrant};
use tokenflight::{AuthPolicy, Token};

use super::{Adapter, TestClient, TestRequest};
use crate::testkit::dpop::Refusal;
use crate::testkit::dpop_server::{DpopServer, DpopServerConfig};

/// D1's load: this many concurrent clients, each sending this many requests in turn.
const CLIENTS: usize = 100;
const ROUNDS: usize = 5;
/// D1's resource server issues a new nonce after this many accepted requests: more
/// than the clients in flight, so a request resent after a demand meets at most one
/// rotation (whose predecessor the server still accepts).
const ROTATE_EVERY: u64 = 120;

fn key() -> Dpop {
    Dpop::new(DpopKey::generate().unwrap())
}

/// A policy for `server`'s resource origin, tokens from the client credentials grant,
/// the grant and the policy sharing `dpop`.
fn client_credentials_policy(adapter: &dyn Adapter, server: &DpopServer, dpop: Dpop) -> AuthPolicy {
    let grant = ClientCredentialsGrant::new(adapter.bare_transport(), &server.token_url(), "app")
        .unwrap()
        .client_secret("app-secret")
        .dpop(dpop.clone());
    adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.resource_origin())
        .dpop(dpop)
        .build()
        .unwrap()
}

async fn status(client: &dyn TestClient, request: TestRequest) -> Result<u16, String> {
    client.send(request).await.map(|r| r.status)
}

/// D1: 100 concurrent clients, five requests each; both servers demand a nonce from
/// the first request on and the resource server rotates its nonce mid-storm (by count,
/// several times). No caller sees an error, no request is sent more than twice (one
/// resend), one token serves all (nonce demands cost no refresh), the token endpoint's
/// demand is answered once, and no proof is refused: no `jti` reused, every proof valid.
pub async fn d1_a_nonce_storm_costs_no_error_no_refresh_and_one_resend_at_most(
    adapter: &dyn Adapter,
) {
    let name = adapter.name();
    let server = DpopServer::start(DpopServerConfig {
        rotate_every: Some(ROTATE_EVERY),
        ..DpopServerConfig::default()
    });
    let auth = client_credentials_policy(adapter, &server, key());
    let client = adapter.client(auth.clone());
    let results = join_all((0..CLIENTS).map(|c| {
        let client = client.clone();
        let server = &server;
        async move {
            let mut statuses = Vec::new();
            for r in 0..ROUNDS {
                let request = TestRequest::get(server.api_url(&format!("d1/{c}/{r}")));
                statuses.push(status(&*client, request).await);
            }
            statuses
        }
    }))
    .await;
    let errors: Vec<_> = results
        .iter()
        .flatten()
        .filter(|r| !matches!(r, Ok(200)))
        .collect();
    let c = server.counts();
    println!(
        "[{name}] D1: {} requests, {} on the wire, {} nonce demands, {} rotations, {} tokens",
        CLIENTS * ROUNDS,
        c.resource_requests,
        c.resource_nonce_demands,
        c.resource_rotations,
        c.issued
    );
    assert!(
        errors.is_empty(),
        "[{name}] D1: caller-visible errors: {errors:?}"
    );
    assert_eq!(
        c.hits.len(),
        CLIENTS * ROUNDS,
        "[{name}] D1: every request arrived"
    );
    let worst = c.hits.values().max().copied().unwrap_or(0);
    assert!(worst <= 2, "[{name}] D1: a request was sent {worst} times");
    assert_eq!(c.issued, 1, "[{name}] D1: nonce demands cost no refresh");
    assert_eq!(auth.stats().source_calls, 1, "[{name}] D1");
    assert_eq!(
        auth.stats().rejections,
        0,
        "[{name}] D1: no token marked rejected"
    );
    assert_eq!(
        c.token_nonce_demands, 1,
        "[{name}] D1: one demand at the token endpoint"
    );
    assert_eq!(c.replayed(), 0, "[{name}] D1: a jti was reused");
    assert!(
        c.refused.is_empty(),
        "[{name}] D1: refused proofs: {:?}",
        c.refused
    );
    assert_eq!(c.unknown_tokens, 0, "[{name}] D1");
    assert!(
        c.resource_rotations >= 3,
        "[{name}] D1: the nonce rotated mid-storm ({} rotations)",
        c.resource_rotations
    );
    // The first wave had no nonce; later demands come from the rotations.
    assert!(
        c.resource_nonce_demands >= 1,
        "[{name}] D1: a nonce was demanded"
    );
    assert_eq!(
        c.resource_requests,
        (CLIENTS * ROUNDS) as u64 + c.resource_nonce_demands,
        "[{name}] D1: exactly one resend per nonce demand, none for anything else"
    );
    // Every proof the servers checked had a jti of its own.
    assert_eq!(
        server.jtis_seen() as u64,
        c.token_requests + c.resource_requests,
        "[{name}] D1: distinct jtis"
    );
}

/// D2: the token endpoint demands a nonce for a `refresh_token` grant. The client
/// resends within the same attempt with the nonce and the *same* refresh token, which
/// the demand did not spend: one token, no reuse, no failed attempt. Again after the
/// server replaces its nonce: the rotated refresh token is presented twice (refused
/// proof, then accepted) and spent once.
pub async fn d2_a_token_endpoint_nonce_demand_costs_no_refresh_token(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = DpopServer::start(DpopServerConfig::default());
    let seed = server.issue_refresh_token();
    let dpop = key();
    let grant = RefreshTokenGrant::new(adapter.bare_transport(), &server.token_url(), "app")
        .unwrap()
        .client_secret("app-secret")
        .dpop(dpop.clone());
    let expired = Token::new("never-issued")
        .with_refresh(seed.clone())
        .expires_at(SystemTime::now() - Duration::from_secs(60));
    let auth = adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.resource_origin())
        .initial_token(expired)
        .dpop(dpop)
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    assert_eq!(
        status(&*client, TestRequest::get(server.api_url("d2/first"))).await,
        Ok(200),
        "[{name}] D2"
    );
    let c = server.counts();
    assert_eq!(
        c.token_nonce_demands, 1,
        "[{name}] D2: the nonce was demanded"
    );
    assert_eq!(c.token_requests, 2, "[{name}] D2: demand, then the resend");
    assert_eq!(c.issued, 1, "[{name}] D2");
    assert_eq!(
        c.refresh_presented.get(&seed),
        Some(&1),
        "[{name}] D2: the refresh token reached the grant once (the demand spent nothing)"
    );
    assert_eq!(c.refresh_reuse, 0, "[{name}] D2");
    let stats = auth.stats();
    assert_eq!(
        (stats.source_calls, stats.attempt_retries, stats.failures),
        (1, 0, 0),
        "[{name}] D2: one call, the nonce resend is no failed attempt"
    );
    // The server replaces its nonce; a forced refresh meets a new demand.
    server.rotate_token_nonce();
    let forced = TestRequest {
        force_refresh: true,
        ..TestRequest::get(server.api_url("d2/second"))
    };
    assert_eq!(
        status(&*client, forced).await,
        Ok(200),
        "[{name}] D2 forced"
    );
    let c = server.counts();
    assert_eq!(c.token_nonce_demands, 2, "[{name}] D2");
    assert_eq!(c.issued, 2, "[{name}] D2");
    assert_eq!(
        c.refresh_reuse, 0,
        "[{name}] D2: no refresh token spent twice"
    );
    assert!(
        c.refresh_presented.values().all(|&n| n == 1),
        "[{name}] D2: {:?}",
        c.refresh_presented.values().collect::<Vec<_>>()
    );
    assert!(c.refused.is_empty(), "[{name}] D2: {:?}", c.refused);
}

/// D3: the binding is real. A thief with the token but not the key is refused: with a
/// key of its own (the proof's key is not the one the token is bound to), and with no
/// proof at all (the token as a bearer token). The owner keeps being served.
pub async fn d3_a_stolen_token_is_refused_without_its_key(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = DpopServer::start(DpopServerConfig::default());
    let auth = client_credentials_policy(adapter, &server, key());
    let owner = adapter.client(auth.clone());
    assert_eq!(
        status(&*owner, TestRequest::get(server.api_url("d3/owner"))).await,
        Ok(200),
        "[{name}] D3 owner"
    );
    let stolen = auth.flight().unwrap().current().unwrap().access().clone();
    let stolen_source = |stolen: tokenflight::Secret| {
        tokenflight::from_fn(move |_| {
            let stolen = stolen.clone();
            async move { Ok(Token::new(stolen.expose())) }
        })
    };
    // With the thief's own key.
    let thief = adapter
        .builder()
        .source(stolen_source(stolen.clone()))
        .allowed_origin(&server.resource_origin())
        .dpop(key())
        .build()
        .unwrap();
    let thief = adapter.client(thief);
    let refused = status(&*thief, TestRequest::get(server.api_url("d3/thief"))).await;
    assert_eq!(
        refused,
        Ok(401),
        "[{name}] D3: a stolen token with another key"
    );
    let c = server.counts();
    assert!(
        c.refused.contains(&Refusal::WrongKey),
        "[{name}] D3: refused for the key: {:?}",
        c.refused
    );
    // Without any key: a bearer token and no proof.
    let bearer = adapter
        .builder()
        .source(stolen_source(stolen))
        .allowed_origin(&server.resource_origin())
        .build()
        .unwrap();
    let bearer = adapter.client(bearer);
    let refused = status(&*bearer, TestRequest::get(server.api_url("d3/bearer"))).await;
    assert_eq!(
        refused,
        Ok(401),
        "[{name}] D3: a stolen token as a bearer token"
    );
    assert_eq!(
        status(&*owner, TestRequest::get(server.api_url("d3/owner-again"))).await,
        Ok(200),
        "[{name}] D3: the owner is still served"
    );
    assert_eq!(server.counts().issued, 1, "[{name}] D3");
}

/// D4: a `POST` meets a nonce demand; the resend carries the same body byte for byte
/// and a new proof (a reused `jti` would be refused as a replay).
pub async fn d4_a_nonce_resend_carries_the_same_body_and_a_new_proof(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = DpopServer::start(DpopServerConfig::default());
    let auth = client_credentials_policy(adapter, &server, key());
    let client = adapter.client(auth.clone());
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let response = client
        .send(TestRequest::with_body(
            "POST",
            server.api_url("d4/post"),
            body.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status, 200, "[{name}] D4");
    assert!(response.body == body, "[{name}] D4: the body differs");
    let c = server.counts();
    assert_eq!(c.hits.get("d4/post"), Some(&2), "[{name}] D4: one resend");
    assert_eq!(c.resource_nonce_demands, 1, "[{name}] D4");
    assert_eq!(c.replayed(), 0, "[{name}] D4");
    assert!(c.refused.is_empty(), "[{name}] D4: {:?}", c.refused);
    assert_eq!(auth.stats().source_calls, 1, "[{name}] D4: no refresh");
}
