//! (d) End to end: requests through reqwest + tokenflight's middleware against bare
//! reqwest carrying the same valid token, on the testkit server (loopback, its own
//! runtime thread). One at a time (latency) and 32 in flight (throughput). The token
//! stays valid throughout, so this measures the middleware's cost on the normal path:
//! the token check, attaching the header, keeping a replayable copy of the request and
//! classifying the response.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion};
use futures::future::join_all;
use tokenflight::{Token, from_fn};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{TokenLayer, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

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
}

impl Sender {
    async fn get(&self, url: &str) {
        let response = match self {
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
        TokenLayer::builder()
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
        for (name, sender) in [("bare_reqwest", &bare), ("reqwest_tokenflight", &layered)] {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.to_async(&runtime).iter(|| async {
                    join_all((0..in_flight).map(|_| sender.get(&url))).await;
                });
            });
        }
        group.finish();
    }
    let stats = layer.authenticator().stats();
    assert_eq!(stats.source_calls, 0, "the token source must not be called");
    assert_eq!(stats.rejections, 0, "no request may be rejected");
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    end_to_end(&mut criterion);
    criterion.final_summary();
}
