//! The tower `TokenLayer`'s own cost per request, without a network: an inner service
//! that answers 200 at once, called through the layer (valid token: check, URL parse,
//! replayable copy, header, classification) and bare with the header already set. The
//! end-to-end bench puts this next to a loopback round trip.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::Criterion;
use http_body_util::{Empty, Full};
use tokenflight::{Token, from_fn};
use tokenflight_tower::TokenLayer;
use tower::{Layer, Service, ServiceExt};

const URL: &str = "http://127.0.0.1:8080/api/bench";

/// Answers 200 at once.
#[derive(Clone)]
struct Ok200;

impl Service<http::Request<Empty<Bytes>>> for Ok200 {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<Empty<Bytes>>) -> Self::Future {
        ready(Ok(http::Response::new(Full::new(Bytes::from_static(
            b"ok",
        )))))
    }
}

fn request(authorization: Option<&'static str>) -> http::Request<Empty<Bytes>> {
    let mut builder = http::Request::get(URL);
    if let Some(value) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, value);
    }
    match builder.body(Empty::new()) {
        Ok(request) => request,
        Err(error) => panic!("request: {error}"),
    }
}

fn overhead(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    let layer = runtime.block_on(async {
        TokenLayer::builder()
            .source(from_fn(|_cx| async {
                Err(tokenflight::RefreshError::permanent("never refreshed"))
            }))
            .initial_token(
                Token::new("token").expires_in(Duration::from_secs(3600), SystemTime::now()),
            )
            .allowed_origin("http://127.0.0.1:8080")
            .build()
    });
    let layer = match layer {
        Ok(layer) => layer,
        Err(error) => panic!("building the layer: {error}"),
    };
    let layered = layer.layer(Ok200);
    let mut group = c.benchmark_group("tower_overhead");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("bare", |b| {
        b.to_async(&runtime)
            .iter(|| async { Ok200.oneshot(request(Some("Bearer token"))).await })
    });
    group.bench_function("layered", |b| {
        b.to_async(&runtime)
            .iter(|| async { layered.clone().oneshot(request(None)).await })
    });
    group.finish();
    assert_eq!(layer.policy().stats().source_calls, 0);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    overhead(&mut criterion);
    criterion.final_summary();
}
