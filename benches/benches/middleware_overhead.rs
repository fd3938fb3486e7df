//! Each adapter's own cost per request, without a network: whatever sends the request
//! answers 200 at once, and the request goes through tokenflight (valid token: check,
//! replayable copy, header, classification) or bare with the header already set.
//! - `tower_overhead`: an inner service under the `TokenLayer`;
//! - `reqwest_overhead`: a reqwest-middleware client whose last middleware answers (the
//!   request never reaches reqwest's connection pool), with and without the
//!   `TokenMiddleware` in front of it;
//! - `surf_overhead`: the same with surf's middleware stack.
//!
//! The end-to-end bench puts these next to a loopback round trip; this one resolves the
//! middleware's share, which a loopback round trip (tens of µs of kernel time) hides.
//! Also the allocations per request of each (recorded for `bench-report`).

use std::alloc::System;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::Criterion;
use http_body_util::{Empty, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokenflight::{AuthPolicy, AuthPolicyBuilder, Token, from_fn};
use tokenflight_benches::extras::Extras;
use tokenflight_reqwest::{reqwest, reqwest_middleware};
use tokenflight_tower::TokenLayer;
use tower::{Layer, Service, ServiceExt};

const URL: &str = "http://127.0.0.1:8080/api/bench";

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The adapter built with a token valid for an hour (never refreshed) for the bench's
/// origin.
fn with_valid_token<Out: From<AuthPolicy>>(builder: AuthPolicyBuilder<Out>) -> Out {
    let built = builder
        .source(from_fn(|_cx| async {
            Err(tokenflight::RefreshError::permanent("never refreshed"))
        }))
        .initial_token(Token::new("token").expires_in(Duration::from_secs(3600), SystemTime::now()))
        .allowed_origin("http://127.0.0.1:8080")
        .build();
    match built {
        Ok(built) => built,
        Err(error) => panic!("building the adapter: {error}"),
    }
}

/// Allocations per call of `once` (after a warm-up), recorded as `key`.
fn record_allocations(extras: &mut Extras, key: &str, mut once: impl FnMut()) {
    for _ in 0..100 {
        once();
    }
    const CALLS: usize = 2_000;
    let before = GLOBAL.stats().allocations;
    for _ in 0..CALLS {
        once();
    }
    let allocations = GLOBAL.stats().allocations.saturating_sub(before);
    extras.record(key, allocations as f64 / CALLS as f64);
}

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

fn overhead(c: &mut Criterion, extras: &mut Extras) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    let layer: TokenLayer = runtime.block_on(async { with_valid_token(TokenLayer::builder()) });
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
    record_allocations(extras, "tower/allocs_bare", || {
        let _ = runtime.block_on(Ok200.oneshot(request(Some("Bearer token"))));
    });
    record_allocations(extras, "tower/allocs_layered", || {
        let _ = runtime.block_on(layered.clone().oneshot(request(None)));
    });
    assert_eq!(layer.policy().stats().source_calls, 0);
}

/// The last middleware of a reqwest-middleware stack: answers 200 from the request's
/// URL, as reqwest's own response would (the middleware compares origins).
struct ReqwestOk200;

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for ReqwestOk200 {
    async fn handle(
        &self,
        request: reqwest::Request,
        _extensions: &mut http::Extensions,
        _next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        use reqwest::ResponseBuilderExt;
        let response = http::Response::builder()
            .url(request.url().clone())
            .body("ok")
            .map_err(reqwest_middleware::Error::middleware)?;
        Ok(reqwest::Response::from(response))
    }
}

fn reqwest_overhead(c: &mut Criterion, extras: &mut Extras, runtime: &tokio::runtime::Runtime) {
    let layer: tokenflight_reqwest::TokenMiddleware = runtime
        .block_on(async { with_valid_token(tokenflight_reqwest::TokenMiddleware::builder()) });
    let client = reqwest::Client::new();
    let bare = reqwest_middleware::ClientBuilder::new(client.clone())
        .with(ReqwestOk200)
        .build();
    let layered = reqwest_middleware::ClientBuilder::new(client)
        .with(layer.clone())
        .with(ReqwestOk200)
        .build();
    let mut group = c.benchmark_group("reqwest_overhead");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("bare", |b| {
        b.to_async(runtime).iter(|| async {
            let response = bare
                .get(URL)
                .header(http::header::AUTHORIZATION, "Bearer token")
                .send()
                .await;
            assert!(response.is_ok());
        })
    });
    group.bench_function("layered", |b| {
        b.to_async(runtime).iter(|| async {
            let response = layered.get(URL).send().await;
            assert!(response.is_ok());
        })
    });
    group.finish();
    record_allocations(extras, "reqwest/allocs_bare", || {
        let response = runtime.block_on(
            bare.get(URL)
                .header(http::header::AUTHORIZATION, "Bearer token")
                .send(),
        );
        assert!(response.is_ok());
    });
    record_allocations(extras, "reqwest/allocs_layered", || {
        assert!(runtime.block_on(layered.get(URL).send()).is_ok());
    });
    assert_eq!(layer.policy().stats().source_calls, 0);
}

/// The last middleware of a surf stack: answers 200 at once.
struct SurfOk200;

#[surf::utils::async_trait]
impl surf::middleware::Middleware for SurfOk200 {
    async fn handle(
        &self,
        _request: surf::Request,
        _client: surf::Client,
        _next: surf::middleware::Next<'_>,
    ) -> surf::Result<surf::Response> {
        let mut response = surf::http::Response::new(surf::StatusCode::Ok);
        response.set_body("ok");
        Ok(surf::Response::from(response))
    }
}

fn surf_overhead(c: &mut Criterion, extras: &mut Extras) {
    let layer: tokenflight_surf::TokenMiddleware =
        with_valid_token(tokenflight_surf::TokenMiddleware::builder());
    let bare = surf::Client::new().with(SurfOk200);
    let layered = surf::Client::new().with(layer.clone()).with(SurfOk200);
    let mut group = c.benchmark_group("surf_overhead");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // On async-std's executor, the way surf is used (as in the end-to-end bench).
    group.bench_function("bare", |b| {
        b.iter(|| {
            async_std::task::block_on(async {
                let response = bare
                    .get(URL)
                    .header("authorization", "Bearer token")
                    .send()
                    .await;
                assert!(response.is_ok());
            })
        })
    });
    group.bench_function("layered", |b| {
        b.iter(|| {
            async_std::task::block_on(async {
                let response = layered.get(URL).send().await;
                assert!(response.is_ok());
            })
        })
    });
    group.finish();
    record_allocations(extras, "surf/allocs_bare", || {
        let response =
            async_std::task::block_on(bare.get(URL).header("authorization", "Bearer token").send());
        assert!(response.is_ok());
    });
    record_allocations(extras, "surf/allocs_layered", || {
        assert!(async_std::task::block_on(layered.get(URL).send()).is_ok());
    });
    assert_eq!(layer.policy().stats().source_calls, 0);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let mut extras = Extras::new();
    overhead(&mut criterion, &mut extras);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    reqwest_overhead(&mut criterion, &mut extras, &runtime);
    surf_overhead(&mut criterion, &mut extras);
    extras.save("middleware_overhead");
    criterion.final_summary();
}
