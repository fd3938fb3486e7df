//! (d) End to end: requests through reqwest + tokenflight's middleware against bare
//! reqwest carrying the same valid token, and through hyper-util's client + the tower
//! `TokenLayer` against the bare hyper-util client, on the testkit server (loopback,
//! its own runtime thread). One at a time (latency) and 32 in flight (throughput). The token
//! stays valid throughout, so this measures the middleware's cost on the normal path:
//! the token check, attaching the header, keeping a replayable copy of the request and
//! classifying the response.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokenflight::{AuthPolicy, Token, from_fn};
use tokenflight_benches::extras::Extras;
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tower::TokenService;
use tower::ServiceExt;

type HyperClient = Client<HttpConnector, Empty<Bytes>>;

const IN_FLIGHT: usize = 32;

/// One way of sending an authenticated GET.
#[derive(Clone)]
enum Sender {
    Bare {
        client: reqwest::Client,
        header: Arc<str>,
    },
    Layered {
        client: ClientWithMiddleware,
    },
    BareHyper {
        client: HyperClient,
        header: http::HeaderValue,
    },
    Tower {
        service: TokenService<HyperClient>,
    },
}

impl Sender {
    async fn get(&self, url: &str) {
        let response = match self {
            Sender::BareHyper { client, header } => {
                let request = http::Request::get(url)
                    .header(http::header::AUTHORIZATION, header.clone())
                    .body(Empty::new());
                let request = request.unwrap_or_else(|e| panic!("request: {e}"));
                let response = client.request(request).await;
                let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
                return check_hyper(response).await;
            }
            Sender::Tower { service } => {
                let request = http::Request::get(url).body(Empty::new());
                let request = request.unwrap_or_else(|e| panic!("request: {e}"));
                let response = service.clone().oneshot(request).await;
                let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
                return check_hyper(response).await;
            }
            Sender::Bare { client, header } => {
                client
                    .get(url)
                    .header(reqwest::header::AUTHORIZATION, &**header)
                    .send()
                    .await
            }
            Sender::Layered { client } => client.get(url).send().await.map_err(|e| match e {
                tokenflight_reqwest::reqwest_middleware::Error::Reqwest(e) => e,
                other => panic!("middleware error: {other}"),
            }),
        };
        match response {
            Ok(response) => {
                assert_eq!(response.status(), 200, "the token should be accepted");
                if let Err(error) = response.bytes().await {
                    panic!("reading the body: {error}");
                }
            }
            Err(error) => panic!("request failed: {error}"),
        }
    }
}

async fn check_hyper<B>(response: http::Response<B>)
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    assert_eq!(response.status(), 200, "the token should be accepted");
    if let Err(error) = response.into_body().collect().await {
        panic!("reading the body: {error}");
    }
}

fn end_to_end(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    let server = TestServer::start(TestServerConfig::default());
    let (access, expires_in) = server.issue_access_token();
    let url = server.api_url("bench");

    let bare = Sender::Bare {
        client: reqwest::Client::new(),
        header: Arc::from(format!("Bearer {access}")),
    };
    let layer = runtime.block_on(async {
        TokenMiddleware::builder()
            .source(from_fn(|_cx| async {
                Err(tokenflight::RefreshError::permanent(
                    "the benchmark's token never needs a refresh",
                ))
            }))
            .initial_token(
                Token::new(access.as_str())
                    .expires_in(Duration::from_secs(expires_in), SystemTime::now()),
            )
            .allowed_origin(&server.origin())
            .build()
    });
    let layer = match layer {
        Ok(layer) => layer,
        Err(error) => panic!("building the layer: {error}"),
    };
    let hyper_client = || Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let bare_hyper = Sender::BareHyper {
        client: hyper_client(),
        header: match http::HeaderValue::from_str(&format!("Bearer {access}")) {
            Ok(header) => header,
            Err(error) => panic!("header: {error}"),
        },
    };
    let tower_layer = tokenflight_tower::TokenLayer::from(AuthPolicy::clone(layer.policy()));
    let tower = Sender::Tower {
        service: tower::Layer::layer(&tower_layer, hyper_client()),
    };
    let layered = Sender::Layered {
        client: ClientBuilder::new(reqwest::Client::new())
            .with(layer.clone())
            .build(),
    };

    for (mode, in_flight) in [("sequential", 1), ("concurrent_32", IN_FLIGHT)] {
        let mut group = c.benchmark_group(format!("end_to_end/{mode}"));
        group
            .sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let senders = [
            ("bare_reqwest", &bare),
            ("reqwest_tokenflight", &layered),
            ("bare_hyper", &bare_hyper),
            ("tower_tokenflight", &tower),
        ];
        for (name, sender) in senders {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.to_async(&runtime).iter(|| async {
                    join_all((0..in_flight).map(|_| sender.get(&url))).await;
                });
            });
        }
        group.finish();
    }
    // Criterion measures one contender after the other; on a shared machine the load can
    // change in between. These ratios alternate the two in short rounds instead.
    let mut extras = Extras::new();
    for (mode, in_flight, batches) in [("sequential", 1, 100), ("concurrent_32", IN_FLIGHT, 10)] {
        let pairs = [("reqwest", &bare, &layered), ("tower", &bare_hyper, &tower)];
        for (client, bare, layered) in pairs {
            let ratio = interleaved_ratio(&runtime, bare, layered, &url, in_flight, batches);
            extras.record(&format!("interleaved_{mode}_{client}"), ratio);
        }
    }
    extras.save("end_to_end");

    let stats = layer.policy().stats();
    assert_eq!(stats.source_calls, 0, "the token source must not be called");
    assert_eq!(stats.rejections, 0, "no request may be rejected");
}

/// Throughput of `layered` relative to `bare` (above 1: faster): the median over 31
/// rounds of (time of `bare`) / (time of `layered`), each round timing `batches` batches
/// of `in_flight` requests on both, back to back, alternating which goes first. A
/// stretch where the shared machine stalls spoils one round, not the figure.
fn interleaved_ratio(
    runtime: &tokio::runtime::Runtime,
    bare: &Sender,
    layered: &Sender,
    url: &str,
    in_flight: usize,
    batches: usize,
) -> f64 {
    let time = |sender: &Sender| {
        runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..batches {
                join_all((0..in_flight).map(|_| sender.get(url))).await;
            }
            start.elapsed().as_secs_f64()
        })
    };
    let mut ratios: Vec<f64> = (0..31)
        .map(|round| {
            if round % 2 == 0 {
                let bare = time(bare);
                bare / time(layered)
            } else {
                let layered = time(layered);
                time(bare) / layered
            }
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    end_to_end(&mut criterion);
    criterion.final_summary();
}
