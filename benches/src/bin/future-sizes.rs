//! The size of each adapter's per-request future (the boxed state a request's send
//! lives in, copied into its box once per request), printed as `adapter bytes`.
//!
//! reqwest and surf: a middleware in front of the adapter's calls the adapter and reads
//! `size_of_val` of the boxed future it gets back. tower: the bytes allocated by
//! `TokenService::call` (its response future keeps the state in a private box; the call
//! allocates nothing else for a request with a valid token).
//!
//! `cargo run -p tokenflight-benches --bin future-sizes`

use std::alloc::System;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{Empty, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokenflight::{AuthPolicy, AuthPolicyBuilder, Token, from_fn};
use tokenflight_reqwest::{reqwest, reqwest_middleware};
use tower::{Layer, Service};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const URL: &str = "http://127.0.0.1:8080/api/sizes";

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

static REQWEST: AtomicUsize = AtomicUsize::new(0);
static SURF: AtomicUsize = AtomicUsize::new(0);

/// In front of the reqwest adapter: records the size of the future it returns.
struct ReqwestProbe;

impl reqwest_middleware::Middleware for ReqwestProbe {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: reqwest::Request,
        extensions: &'life1 mut http::Extensions,
        next: reqwest_middleware::Next<'life2>,
    ) -> Pin<
        Box<
            dyn Future<Output = reqwest_middleware::Result<reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let future = next.run(request, extensions);
        REQWEST.store(std::mem::size_of_val(&*future), Ordering::Relaxed);
        future
    }
}

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

/// In front of the surf adapter: records the size of the future it returns.
struct SurfProbe;

impl surf::middleware::Middleware for SurfProbe {
    fn handle<'life0, 'life1, 'async_trait>(
        &'life0 self,
        req: surf::Request,
        client: surf::Client,
        next: surf::middleware::Next<'life1>,
    ) -> Pin<Box<dyn Future<Output = surf::Result<surf::Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let future = next.run(req, client);
        SURF.store(std::mem::size_of_val(&*future), Ordering::Relaxed);
        future
    }
}

struct SurfOk200;

#[surf::utils::async_trait]
impl surf::middleware::Middleware for SurfOk200 {
    async fn handle(
        &self,
        _request: surf::Request,
        _client: surf::Client,
        _next: surf::middleware::Next<'_>,
    ) -> surf::Result<surf::Response> {
        Ok(surf::Response::from(surf::http::Response::new(
            surf::StatusCode::Ok,
        )))
    }
}

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

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };

    let layer: tokenflight_reqwest::TokenMiddleware = runtime
        .block_on(async { with_valid_token(tokenflight_reqwest::TokenMiddleware::builder()) });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(ReqwestProbe)
        .with(layer)
        .with(ReqwestOk200)
        .build();
    let response = runtime.block_on(client.get(URL).send());
    assert!(response.is_ok());
    println!("reqwest {}", REQWEST.load(Ordering::Relaxed));

    let layer: tokenflight_surf::TokenMiddleware =
        with_valid_token(tokenflight_surf::TokenMiddleware::builder());
    let client = surf::Client::new()
        .with(SurfProbe)
        .with(layer)
        .with(SurfOk200);
    let response = async_std::task::block_on(client.get(URL).send());
    assert!(response.is_ok());
    println!("surf {}", SURF.load(Ordering::Relaxed));

    let layer: tokenflight_tower::TokenLayer =
        runtime.block_on(async { with_valid_token(tokenflight_tower::TokenLayer::builder()) });
    let mut service = layer.layer(Ok200);
    let request = || match http::Request::get(URL).body(Empty::<Bytes>::new()) {
        Ok(request) => request,
        Err(error) => panic!("request: {error}"),
    };
    // Warm: the first call of a thread fills caches.
    let _ = runtime.block_on(service.call(request()));
    let request = request();
    let region = Region::new(GLOBAL);
    let future = service.call(request);
    let allocated = region.change().bytes_allocated;
    drop(future);
    println!("tower {allocated}");
}
