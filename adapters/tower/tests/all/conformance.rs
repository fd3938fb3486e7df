//! The conformance suite (S1–S18 and the C4/C12 checks) through hyper-util's client, tower-http's redirect following
//! and the [`TokenLayer`] against the testkit server.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokenflight::keyed::TokenKey;
use tokenflight::{AuthPolicy, AuthPolicyBuilder, ForceRefresh, SkipAuth, adapter::Transport};
use tokenflight_tests::conformance::{Adapter, TestClient, TestRequest, TestResponse};
use tokenflight_tower::{HyperTransport, TokenLayer, TokioSpawner, TokioTimer};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::FollowRedirectLayer;

type RequestBody = BoxBody<Bytes, BoxError>;
type ResponseBody = BoxBody<Bytes, BoxError>;
type Stack =
    BoxCloneSyncService<http::Request<RequestBody>, http::Response<ResponseBody>, BoxError>;

/// hyper-util + tower as the suite sees it.
struct TowerAdapter;

impl Adapter for TowerAdapter {
    fn name(&self) -> &'static str {
        "tower"
    }

    /// What `TokenLayer::builder()` presets, for the suite's `AuthPolicyBuilder<AuthPolicy>`.
    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy> {
        AuthPolicy::builder()
            .timer(TokioTimer)
            .spawner(TokioSpawner::current())
    }

    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient> {
        let client = Client::builder(TokioExecutor::new()).build_http::<RequestBody>();
        // Redirects are followed below the layer, as reqwest does (S11), with the
        // layer's policy, as the crate docs say: tower-http's standard policy alone
        // drops `Authorization` only on the hop that leaves an origin (the raw leak is
        // pinned in `redirects.rs`).
        let layer = TokenLayer::from(auth);
        let stack = ServiceBuilder::new()
            .layer(layer.clone())
            .layer(FollowRedirectLayer::with_policy(layer.redirect_policy()))
            .service(client)
            .map_response(|response| response.map(|body| body.map_err(BoxError::from).boxed()))
            .map_err(BoxError::from);
        Arc::new(TowerClient(BoxCloneSyncService::new(stack)))
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        Arc::new(HyperTransport::default())
    }
}

struct TowerClient(Stack);

impl TowerClient {
    async fn send_request(&self, request: TestRequest) -> Result<TestResponse, String> {
        let response = self.start(request).await?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| error_text(&*e))?
            .to_bytes();
        Ok(TestResponse {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    /// Sends the request; the response's body is not read yet.
    async fn start(&self, request: TestRequest) -> Result<http::Response<ResponseBody>, String> {
        let body: RequestBody = match request.body {
            None => Full::default().map_err(BoxError::from).boxed(),
            Some(bytes) if request.streaming_body => {
                // Still being produced when the request is sent (it yields once before
                // its only chunk), so it is not read ahead and not replayable (S9).
                let chunk = futures::stream::once(async move {
                    tokio::task::yield_now().await;
                    Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(bytes)))
                });
                StreamBody::new(chunk).boxed()
            }
            Some(bytes) => Full::new(Bytes::from(bytes))
                .map_err(BoxError::from)
                .boxed(),
        };
        let mut http_request = http::Request::builder()
            .method(request.method.as_str())
            .uri(request.url.as_str())
            .body(body)
            .map_err(|e| format!("bad request: {e}"))?;
        if request.skip_auth {
            http_request.extensions_mut().insert(SkipAuth);
        }
        if request.force_refresh {
            http_request.extensions_mut().insert(ForceRefresh);
        }
        if let Some(key) = request.key {
            http_request.extensions_mut().insert(TokenKey::new(key));
        }
        let mut service = self.0.clone();
        service
            .ready()
            .await
            .map_err(|e| error_text(&*e))?
            .call(http_request)
            .await
            .map_err(|e| error_text(&*e))
    }
}

impl TestClient for TowerClient {
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>> {
        Box::pin(self.send_request(request))
    }

    fn first_chunk(&self, request: TestRequest) -> BoxFuture<'_, Result<(u16, Vec<u8>), String>> {
        Box::pin(async move {
            let response = self.start(request).await?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            // The first data frame (trailers are not data; an ended body is empty).
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| error_text(&*e))?;
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok((status, data.to_vec()));
                    }
                }
            }
            Ok((status, Vec::new()))
        })
    }
}

/// The error's `Display`, followed by the causes it does not already mention.
fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

// A current-thread runtime, for the reason given in the reqwest adapter's conformance
// test: the scenarios that start N requests at once assume every request is on its way
// before any answer is processed.
tokenflight_tests::conformance_tests!(tokio::test(flavor = "current_thread"), TowerAdapter);
tokenflight_tests::source_tests!(tokio::test(flavor = "current_thread"), TowerAdapter);
