//! The conformance suite S1–S18 through surf, on async-std, against the testkit server.

use std::str::FromStr;
use std::sync::Arc;

use futures::future::BoxFuture;
use surf::http::{Method, Url};
use surf::{Body, Request};
use tokenflight::keyed::TokenKey;
use tokenflight::{AuthPolicy, AuthPolicyBuilder, ForceRefresh, SkipAuth, adapter::Transport};
use tokenflight_surf::{
    AsyncStdSpawner, AsyncStdTimer, BareTransport, FollowRedirects, TokenMiddleware,
};
use tokenflight_tests::conformance::{Adapter, TestClient, TestRequest, TestResponse};

tokenflight_tests::conformance_tests!(async_std::test, SurfAdapter);
tokenflight_tests::source_tests!(async_std::test, SurfAdapter);

/// surf with the recommended middleware order: redirects, then the token layer.
struct SurfAdapter;

impl Adapter for SurfAdapter {
    fn name(&self) -> &'static str {
        "surf"
    }

    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy> {
        // The same preset as `TokenMiddleware::builder()`.
        AuthPolicy::builder()
            .spawner(Arc::new(AsyncStdSpawner))
            .timer(Arc::new(AsyncStdTimer))
    }

    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient> {
        let client = surf::Client::new()
            .with(FollowRedirects::default())
            .with(TokenMiddleware::from(auth));
        Arc::new(SurfClient(client))
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        // Keep-alive off, as `BareTransport::default()` does: a hung token call must not
        // leave its connection in the pool for the next refresh (S15).
        let client: surf::Client = surf::Config::new()
            .set_http_keep_alive(false)
            .try_into()
            .unwrap();
        Arc::new(BareTransport::new(client))
    }
}

struct SurfClient(surf::Client);

impl SurfClient {
    fn request(request: &TestRequest) -> Result<Request, String> {
        let method = Method::from_str(&request.method).map_err(|e| e.to_string())?;
        let url = Url::parse(&request.url).map_err(|e| e.to_string())?;
        let mut req = Request::new(method, url);
        if let Some(bytes) = &request.body {
            let body = if request.streaming_body {
                // Unknown length: a stream the layer cannot replay (S9).
                Body::from_reader(futures::io::Cursor::new(bytes.clone()), None)
            } else {
                Body::from_bytes(bytes.clone())
            };
            req.set_body(body);
        }
        if request.skip_auth {
            req.set_ext(SkipAuth);
        }
        if request.force_refresh {
            req.set_ext(ForceRefresh);
        }
        if let Some(key) = &request.key {
            req.set_ext(TokenKey::new(key.as_str()));
        }
        Ok(req)
    }
}

impl TestClient for SurfClient {
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>> {
        Box::pin(async move {
            let req = Self::request(&request)?;
            let mut res = self.0.send(req).await.map_err(|e| e.to_string())?;
            let headers = res
                .iter()
                .flat_map(|(name, values)| {
                    let name = name.as_str().to_ascii_lowercase();
                    values
                        .iter()
                        .map(move |v| (name.clone(), v.as_str().to_owned()))
                        .collect::<Vec<_>>()
                })
                .collect();
            let body = res.body_bytes().await.map_err(|e| e.to_string())?;
            Ok(TestResponse {
                status: u16::from(res.status()),
                headers,
                body,
            })
        })
    }

    fn first_chunk(&self, request: TestRequest) -> BoxFuture<'_, Result<(u16, Vec<u8>), String>> {
        Box::pin(async move {
            use futures::AsyncReadExt;
            let req = Self::request(&request)?;
            let mut res = self.0.send(req).await.map_err(|e| e.to_string())?;
            let mut body = res.take_body();
            let mut buffer = vec![0; 4096];
            let read = body.read(&mut buffer).await.map_err(|e| e.to_string())?;
            buffer.truncate(read);
            Ok((u16::from(res.status()), buffer))
        })
    }
}

/// The adapter glue on its own, so it is exercised even before the suite runs.
#[async_std::test]
async fn adapter_glue_sends_a_replayable_post_through_the_layer() {
    use tokenflight::Token;
    use tokenflight_tests::testkit::{TestServer, TestServerConfig};

    let server = TestServer::start(TestServerConfig::default());
    let (access, _) = server.issue_access_token();
    let auth = SurfAdapter
        .builder()
        .source(tokenflight::from_fn(move |_cx| {
            let access = access.clone();
            async move { Ok(Token::new(access)) }
        }))
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = SurfAdapter.client(auth);
    let response = client
        .send(TestRequest {
            method: "POST".into(),
            url: server.api_url("glue"),
            body: Some(b"hello".to_vec()),
            ..TestRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello");
    assert!(
        response
            .headers
            .iter()
            .any(|(n, v)| n == "x-echo-method" && v == "POST")
    );
    assert_eq!(SurfAdapter.name(), "surf");
}
