//! DPoP (RFC 9449): what a proof costs the client per request, in one run.
//!
//! - `dpop/proof`: one `Dpop::proof` for a resource request (ES256 signature with
//!   ring, the JWS encoding, a new `jti`, `ath`, the origin's nonce): the work DPoP adds
//!   to every request, and again to a resend.
//! - `dpop/verify`: the server's side of it, the testkit verifier (signature with the
//!   header's key, claims, `jti` set), for scale.
//! - `dpop/e2e/bearer` and `dpop/e2e/dpop`: one GET at a time through reqwest + the
//!   middleware with a valid token, to the testkit server on loopback as an open echo
//!   (it verifies nothing, so the difference is the client's: the proof and its header),
//!   the bearer policy against the same policy with `.dpop(..)`. Client and server share
//!   the machine's cores.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::Criterion;
use tokenflight::dpop::{Dpop, DpopKey};
use tokenflight::{AuthPolicy, Token, from_fn};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{TokenMiddleware, TokioSpawner, TokioTimer, reqwest};
use tokenflight_tests::testkit::dpop::{Expect, Verifier};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

fn client(origin: &str, dpop: Option<Dpop>) -> ClientWithMiddleware {
    let builder = AuthPolicy::builder()
        .source(from_fn(|_| async { Ok(Token::new("bench-access-token")) }))
        .timer(TokioTimer)
        .spawner(TokioSpawner::current())
        .allowed_origin(origin);
    let builder = match dpop {
        Some(dpop) => builder.dpop(dpop),
        None => builder,
    };
    let policy = builder.build().unwrap_or_else(|e| panic!("policy: {e}"));
    ClientBuilder::new(reqwest::Client::new())
        .with(TokenMiddleware::from(policy))
        .build()
}

async fn get(client: &ClientWithMiddleware, url: &str) {
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request: {e}"));
    assert_eq!(response.status(), 200);
}

fn main() {
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let key = DpopKey::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let dpop = Dpop::new(key);
    let url = url::Url::parse("https://api.example/v1/orders?page=2")
        .unwrap_or_else(|e| panic!("url: {e}"));
    dpop.nonces().set(&url, "server-nonce-1");
    let mut group = criterion.benchmark_group("dpop");
    group.bench_function("proof", |b| {
        b.iter(|| {
            dpop.proof(&http::Method::GET, &url, Some("bench-access-token"))
                .unwrap_or_else(|e| panic!("proof: {e}"))
        })
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let expect = Expect {
        method: "GET",
        htu: "https://api.example/v1/orders",
        access_token: Some("bench-access-token"),
        bound_jkt: Some(dpop.key().thumbprint()),
        now,
    };
    group.bench_function("verify", |b| {
        let mut verifier = Verifier::with_nonce("server-nonce-1");
        b.iter_batched(
            || {
                dpop.proof(&http::Method::GET, &url, Some("bench-access-token"))
                    .unwrap_or_else(|e| panic!("proof: {e}"))
            },
            |proof| {
                verifier
                    .verify(proof.expose(), &expect)
                    .unwrap_or_else(|e| panic!("verify: {e:?}"))
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let server = TestServer::start(TestServerConfig::other_origin());
    let target = server.api_url("bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (bearer, with_dpop) = runtime.block_on(async {
        let origin = server.origin();
        let bearer = client(&origin, None);
        let with_dpop = client(&origin, Some(dpop.clone()));
        // The token is fetched once, before the measurement.
        get(&bearer, &target).await;
        get(&with_dpop, &target).await;
        (Arc::new(bearer), Arc::new(with_dpop))
    });
    for (name, client) in [("e2e/bearer", &bearer), ("e2e/dpop", &with_dpop)] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let (client, target) = (client.clone(), target.as_str());
                async move { get(&client, target).await }
            })
        });
    }
    group.finish();
    criterion.final_summary();
}
