//! The conformance suite must fail for a client that does not do its job: a naive
//! client that attaches the current token to every request, to every origin, and never
//! resends; and, for the scenarios about timing and outages, that client with one more
//! defect ([`Fault`]). Each scenario below is expected to panic with its own name in the
//! message.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, adapter::Transport, config::Backoff, config::Retry,
};
use tokenflight_tests::conformance::{self, Adapter, TestClient, TestRequest, TestResponse};
use tokenflight_tests::transport::ReqwestTransport as BareTransport;

struct NaiveAdapter;

impl Adapter for NaiveAdapter {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy> {
        AuthPolicy::builder()
    }

    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient> {
        Arc::new(NaiveClient {
            auth,
            http: reqwest::Client::new(),
            refresh_every_request: false,
            surface_refresh_errors: false,
        })
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        Arc::new(BareTransport::default())
    }
}

/// The naive client with one more defect, for the scenarios about timing and outages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every caller that needs a refresh may start one, even right after one failed.
    NoBackoff,
    /// A refresh before every request (a token source called per request).
    RefreshEveryRequest,
    /// One attempt per flight, no refresh ahead of expiry, and every refresh error goes
    /// to the caller (a forced refresh once the token is within its leeway, so no
    /// fallback to the still-valid token): one failed token call fails every caller
    /// waiting for it (the behaviour issue 12 reported).
    OneAttemptNoRefreshAhead,
}

struct FaultyAdapter(Fault);

impl Adapter for FaultyAdapter {
    fn name(&self) -> &'static str {
        "faulty"
    }

    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy> {
        match self.0 {
            Fault::NoBackoff => AuthPolicy::builder().backoff(Backoff::none()),
            Fault::RefreshEveryRequest => AuthPolicy::builder(),
            Fault::OneAttemptNoRefreshAhead => AuthPolicy::builder()
                .retry(Retry::none())
                .refresh_ahead(None),
        }
    }

    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient> {
        Arc::new(NaiveClient {
            auth,
            http: reqwest::Client::new(),
            refresh_every_request: self.0 == Fault::RefreshEveryRequest,
            surface_refresh_errors: self.0 == Fault::OneAttemptNoRefreshAhead,
        })
    }

    fn bare_transport(&self) -> Arc<dyn Transport> {
        Arc::new(BareTransport::default())
    }
}

/// The axios interceptor without its good parts: a token before each request, no
/// classification, no retry, no origin check.
struct NaiveClient {
    auth: AuthPolicy,
    http: reqwest::Client,
    refresh_every_request: bool,
    /// Refresh (forced) as soon as the token is not valid, and pass its error on.
    surface_refresh_errors: bool,
}

impl TestClient for NaiveClient {
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>> {
        Box::pin(async move {
            let flight = self.auth.flight().expect("an unkeyed policy");
            let expired = self.surface_refresh_errors && flight.valid_token().is_none();
            let token = if self.refresh_every_request || expired {
                flight.force_refresh().await
            } else {
                flight.token().await
            }
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

#[tokio::test]
#[should_panic(expected = "token calls in")]
async fn s16_fails_when_every_request_refreshes() {
    conformance::s16_short_lifetimes_cost_at_most_two_calls_per_lifetime(&FaultyAdapter(
        Fault::RefreshEveryRequest,
    ))
    .await;
}

#[tokio::test]
#[should_panic(expected = "requests failed")]
async fn s17_fails_when_a_failed_token_call_reaches_the_callers() {
    conformance::s17_flaky_token_endpoint_is_invisible(&FaultyAdapter(
        Fault::OneAttemptNoRefreshAhead,
    ))
    .await;
}

#[tokio::test]
#[should_panic(expected = "a caller in the backoff window reached the source")]
async fn s18_fails_without_backoff() {
    conformance::s18_outage_follows_the_backoff_then_recovers(&FaultyAdapter(Fault::NoBackoff))
        .await;
}

/// The other side: what the naive client does right passes (a valid token goes out as
/// it is, an expired one is refreshed first), so the failures above are about retries,
/// markers and origins, not about the harness.
#[tokio::test]
async fn s1_and_s2_pass_for_the_naive_client() {
    conformance::s1_valid_token_passes_untouched(&NaiveAdapter).await;
    conformance::s2_expired_token_refreshed_before_sending(&NaiveAdapter).await;
}
