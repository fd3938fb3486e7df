//! The conformance suite must fail for a client that does not do its job: a naive
//! client that attaches the current token to every request, to every origin, and never
//! resends. Each scenario below is expected to panic with its own name in the message.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokenflight::{Authenticator, Builder, Transport};
use tokenflight_reqwest::{BareTransport, reqwest};
use tokenflight_tests::conformance::{self, Adapter, TestClient, TestRequest, TestResponse};

struct NaiveAdapter;

impl Adapter for NaiveAdapter {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn builder(&self) -> Builder<Authenticator> {
        Builder::new()
    }

    fn client(&self, auth: Authenticator) -> Arc<dyn TestClient> {
        Arc::new(NaiveClient {
            auth,
            http: reqwest::Client::new(),
        })
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        Arc::new(BareTransport::default())
    }
}

/// The axios interceptor without its good parts: a token before each request, no
/// classification, no retry, no origin check.
struct NaiveClient {
    auth: Authenticator,
    http: reqwest::Client,
}

impl TestClient for NaiveClient {
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>> {
        Box::pin(async move {
            let token = self
                .auth
                .flight()
                .token()
                .await
                .map_err(|e| e.to_string())?;
            let method = reqwest::Method::from_bytes(request.method.as_bytes()).unwrap();
            let mut builder = self
                .http
                .request(method, request.url.as_str())
                .bearer_auth(token.access().expose());
            if let Some(body) = request.body {
                builder = builder.body(body);
            }
            let response = builder.send().await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let body = response.bytes().await.map_err(|e| e.to_string())?.to_vec();
            Ok(TestResponse {
                status,
                headers,
                body,
            })
        })
    }
}

#[tokio::test]
#[should_panic(expected = "S3 request 0: status 401")]
async fn s3_fails_without_retries() {
    conformance::s3_concurrent_401s_share_one_refresh(&NaiveAdapter).await;
}

#[tokio::test]
#[should_panic(expected = "S7: sent exactly twice")]
async fn s7_fails_without_retries() {
    conformance::s7_second_401_is_returned_without_loop(&NaiveAdapter).await;
}

#[tokio::test]
#[should_panic(expected = "S8 POST")]
async fn s8_fails_without_retries() {
    conformance::s8_retry_resends_the_same_body(&NaiveAdapter).await;
}

#[tokio::test]
#[should_panic(expected = "S10")]
async fn s10_fails_when_skip_auth_is_ignored() {
    conformance::s10_skip_auth_sends_no_credentials(&NaiveAdapter).await;
}

#[tokio::test]
#[should_panic(expected = "S11: the other origin saw credentials")]
async fn s11_fails_when_every_origin_gets_the_token() {
    conformance::s11_token_only_reaches_allowed_origin(&NaiveAdapter).await;
}

#[tokio::test]
#[should_panic(expected = "S12")]
async fn s12_fails_when_the_placement_is_ignored() {
    conformance::s12_query_parameter_placement(&NaiveAdapter).await;
}

/// The other side: what the naive client does right passes (a valid token goes out as
/// it is, an expired one is refreshed first), so the failures above are about retries,
/// markers and origins, not about the harness.
#[tokio::test]
async fn s1_and_s2_pass_for_the_naive_client() {
    conformance::s1_valid_token_passes_untouched(&NaiveAdapter).await;
    conformance::s2_expired_token_refreshed_before_sending(&NaiveAdapter).await;
}
