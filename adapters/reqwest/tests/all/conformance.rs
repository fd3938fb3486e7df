//! The conformance suite S1–S18 through reqwest + reqwest-middleware against the
//! testkit server.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokenflight::keyed::TokenKey;
use tokenflight::{AuthPolicy, AuthPolicyBuilder, ForceRefresh, SkipAuth, adapter::Transport};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{BareTransport, TokenMiddleware, TokioSpawner, TokioTimer, reqwest};
use tokenflight_tests::conformance::{Adapter, TestClient, TestRequest, TestResponse};

/// reqwest as the suite sees it.
struct ReqwestAdapter;

impl Adapter for ReqwestAdapter {
    fn name(&self) -> &'static str {
        "reqwest"
    }

    /// What `TokenMiddleware::builder()` presets, for the suite's `AuthPolicyBuilder<AuthPolicy>`.
    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy> {
        AuthPolicy::builder()
            .timer(TokioTimer)
            .spawner(TokioSpawner::current())
    }

    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient> {
        // reqwest follows redirects by default (S11); the layer's policy keeps a query
        // token out of a `Referer` sent to another origin (as the crate docs say).
        let layer = TokenMiddleware::from(auth);
        let inner = reqwest::Client::builder()
            .redirect(layer.redirect_policy())
            .build()
            .unwrap();
        let client = ClientBuilder::new(inner).with(layer).build();
        Arc::new(ReqwestClient(client))
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        Arc::new(BareTransport::default())
    }
}

struct ReqwestClient(ClientWithMiddleware);

impl ReqwestClient {
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
        let body = response.bytes().await.map_err(|e| error_text(&e))?;
        Ok(TestResponse {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    async fn first_chunk(&self, request: TestRequest) -> Result<(u16, Vec<u8>), String> {
        let mut response = self.start(request).await?;
        let status = response.status().as_u16();
        let chunk = response.chunk().await.map_err(|e| error_text(&e))?;
        Ok((status, chunk.map(|c| c.to_vec()).unwrap_or_default()))
    }

    /// Sends `request`; the response's head is in, its body not read yet.
    async fn start(&self, request: TestRequest) -> Result<reqwest::Response, String> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|e| format!("bad method: {e}"))?;
        let mut builder = self.0.request(method, request.url.as_str());
        if let Some(body) = request.body {
            builder = if request.streaming_body {
                // A stream cannot be replayed: `try_clone` gives `None` (S9).
                let chunk = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
                builder.body(reqwest::Body::wrap_stream(chunk))
            } else {
                builder.body(body)
            };
        }
        if request.skip_auth {
            builder = builder.with_extension(SkipAuth);
        }
        if request.force_refresh {
            builder = builder.with_extension(ForceRefresh);
        }
        if let Some(key) = request.key {
            builder = builder.with_extension(TokenKey::new(key));
        }
        builder.send().await.map_err(|e| error_text(&e))
    }
}

impl TestClient for ReqwestClient {
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>> {
        Box::pin(self.send_request(request))
    }

    fn first_chunk(&self, request: TestRequest) -> BoxFuture<'_, Result<(u16, Vec<u8>), String>> {
        Box::pin(ReqwestClient::first_chunk(self, request))
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

// A current-thread runtime: the scenarios that start N requests at once (S3, S5) assume
// that every request is on its way before any answer is processed. On a multi-thread
// runtime hyper's connection tasks and the spawned refresh run on the other worker
// while the test task is still polling, so on a loaded machine an early request can
// complete its 401 round trip inside the first poll of another; later requests then
// (correctly) wait for the refresh instead of sending the dead token, and the counts the
// scenarios check come out different. The storm test (`tests/storm.rs`) covers the
// multi-thread runtime with assertions that hold under any interleaving.
tokenflight_tests::conformance_tests!(tokio::test(flavor = "current_thread"), ReqwestAdapter);
tokenflight_tests::source_tests!(tokio::test(flavor = "current_thread"), ReqwestAdapter);
