//! The conformance suite S1–S15, written once and run by every adapter against the
//! testkit server. An adapter implements [`Adapter`] in its own `tests/conformance.rs`
//! and gets one test per scenario from [`conformance_tests!`](crate::conformance_tests):
//!
//! ```ignore
//! tokenflight_tests::conformance_tests!(
//!     tokio::test(flavor = "multi_thread", worker_threads = 2),
//!     ReqwestAdapter
//! );
//! ```
//!
//! Every scenario starts its own [`TestServer`], takes tokens from the OAuth 2.0
//! `refresh_token` grant ([`RefreshTokenGrant`]) over the adapter's bare transport, and
//! checks what happened on the wire through the server's counters (and the layer's
//! [`stats`](Authenticator::stats)). Waits are joins and counter conditions, never sleeps.
//!
//! | | scenario | what the wire must show |
//! |---|---|---|
//! | S1 | a valid token | sent as is, no token call |
//! | S2 | expired before sending | one refresh, no 401 on the wire |
//! | S3 | N concurrent 401s | one refresh, N retries, N successes |
//! | S4 | a late 401 for an old token | no second refresh (stale, C3) |
//! | S5 | the refresh fails | every waiter gets the error, none hangs |
//! | S6 | `invalid_grant` | auth-lost hook once, fail fast, a new login recovers |
//! | S7 | a second 401 after the retry | returned to the caller, no loop |
//! | S8 | POST/PUT bodies | the retry carries the same body byte for byte |
//! | S9 | a streaming body | not resent, the original 401 returned, next request fine |
//! | S10 | skip-auth | no credentials, no refresh |
//! | S11 | another origin | never sees the token, also across a redirect |
//! | S12 | query placement | `?token=`, replaced (not added) on the retry |
//! | S13 | business-code answers | `200 {"code":401}` classified, refreshed, resent |
//! | S14 | rotation | each refresh (forced ones too) uses the newest refresh token, no reuse detected |
//! | S15 | a hanging token endpoint | every waiter times out, the next refresh recovers |

// Test support: a panic is how a scenario reports a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, join_all};
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{
    Authenticator, Backoff, Builder, Classifier, ManualClock, Retry, Token, Transport,
};

use crate::testkit::{Failure, RecordedRequest, TestServer, TestServerConfig};

/// What an adapter gives the suite.
pub trait Adapter: Send + Sync + 'static {
    /// Short name for messages ("reqwest", "surf").
    fn name(&self) -> &'static str;
    /// A core builder preset the way the adapter's own builder is (its runtime's
    /// spawner and timer); the suite adds source, origins, placement and so on.
    fn builder(&self) -> Builder<Authenticator>;
    /// A client of the adapter's HTTP library with the adapter's auth middleware made
    /// from `auth`. The client must follow redirects (S11).
    fn client(&self, auth: Authenticator) -> Arc<dyn TestClient>;
    /// A bare client (no auth layer) for token sources.
    fn bare_transport(&self) -> Arc<dyn Transport>;
}

/// One request as the suite describes it; the adapter turns it into its client's call.
#[derive(Clone, Debug, Default)]
pub struct TestRequest {
    /// "GET", "POST", "PUT".
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Body bytes, if any.
    pub body: Option<Vec<u8>>,
    /// Send the body as a stream that cannot be replayed (S9).
    pub streaming_body: bool,
    /// Put the `SkipAuth` marker on the request (S10).
    pub skip_auth: bool,
    /// Put the `ForceRefresh` marker on the request.
    pub force_refresh: bool,
}

/// What came back, fully read.
#[derive(Clone, Debug, Default)]
pub struct TestResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

/// A client under test.
pub trait TestClient: Send + Sync {
    /// Sends one request through the adapter's middleware. `Err` carries the error's
    /// `Display` (token errors included: S5, S6, S15).
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>>;
}

impl TestRequest {
    /// A `GET` of `url`.
    pub fn get(url: impl Into<String>) -> Self {
        TestRequest {
            method: "GET".into(),
            url: url.into(),
            ..TestRequest::default()
        }
    }

    /// A request with `method` and a replayable `body`.
    pub fn with_body(method: &str, url: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        TestRequest {
            method: method.into(),
            url: url.into(),
            body: Some(body.into()),
            ..TestRequest::default()
        }
    }
}

impl TestResponse {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

// ---- the world a scenario runs in -----------------------------------------------------

/// How the client's first token starts out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Valid for an hour on both sides.
    Valid,
    /// Expired in the client's eyes (its `expires_at` lies in the past), so every caller
    /// needs a refresh before sending: concurrent callers all join one flight without
    /// any request on the wire first.
    ExpiredClientSide,
}

struct World {
    name: &'static str,
    server: TestServer,
    auth: Authenticator,
    client: Arc<dyn TestClient>,
    /// The access token the client starts with.
    first: String,
}

impl World {
    fn start(adapter: &dyn Adapter, start: Start) -> World {
        Self::start_with(adapter, TestServerConfig::default(), start, |b| b)
    }

    fn start_with(
        adapter: &dyn Adapter,
        config: TestServerConfig,
        start: Start,
        configure: impl FnOnce(Builder<Authenticator>) -> Builder<Authenticator>,
    ) -> World {
        let server = TestServer::start(config);
        let (first, expires_in) = server.issue_access_token();
        let refresh = server.issue_refresh_token();
        let now = SystemTime::now();
        let token = Token::new(first.clone()).with_refresh(refresh);
        let token = match start {
            Start::Valid => token.expires_in(Duration::from_secs(expires_in), now),
            Start::ExpiredClientSide => token.expires_at(now - Duration::from_secs(60)),
        };
        let builder = adapter
            .builder()
            .source(refresh_grant(adapter.bare_transport(), &server))
            .allowed_origin(&server.origin())
            .initial_token(token);
        let auth = configure(builder)
            .build()
            .unwrap_or_else(|e| panic!("[{}] building the layer failed: {e}", adapter.name()));
        let client = adapter.client(auth.clone());
        World {
            name: adapter.name(),
            server,
            auth,
            client,
            first,
        }
    }

    async fn send(&self, request: TestRequest) -> Result<TestResponse, String> {
        self.client.send(request).await
    }

    /// Sends and expects a response (of any status).
    async fn respond(&self, request: TestRequest) -> TestResponse {
        let url = request.url.clone();
        match self.send(request).await {
            Ok(response) => response,
            Err(e) => panic!("[{}] {url}: expected a response, got error: {e}", self.name),
        }
    }

    /// `count` identical requests at once, in one task (`join_all` polls them all before
    /// any answer can be processed).
    async fn concurrently(
        &self,
        count: usize,
        request: impl Fn(usize) -> TestRequest,
    ) -> Vec<Result<TestResponse, String>> {
        join_all((0..count).map(|i| self.send(request(i)))).await
    }

    /// Every secret of this world: none may show in an error message.
    fn assert_no_secret_in(&self, message: &str) {
        let current = self.auth.flight().current();
        let mut secrets = vec![self.first.clone(), self.server.client_secret()];
        if let Some(token) = current {
            secrets.push(token.access().expose().to_owned());
            if let Some(refresh) = token.refresh() {
                secrets.push(refresh.expose().to_owned());
            }
        }
        for secret in secrets {
            assert!(
                !message.contains(&secret),
                "[{}] an error message shows a secret: {message}",
                self.name
            );
        }
    }

    fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        let path = format!("/api/{path}");
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

/// The token source of the suite: the OAuth 2.0 `refresh_token` grant against the
/// testkit's token endpoint, through the adapter's bare client.
fn refresh_grant(transport: Arc<dyn Transport>, server: &TestServer) -> RefreshTokenGrant {
    RefreshTokenGrant::new(transport, &server.token_url(), &server.client_id())
        .unwrap()
        .client_secret(server.client_secret())
}

/// A token as a new login would hand it over.
fn login(server: &TestServer) -> Token {
    let (access, expires_in) = server.issue_access_token();
    Token::new(access)
        .with_refresh(server.issue_refresh_token())
        .expires_in(Duration::from_secs(expires_in), SystemTime::now())
}

fn ok_body(name: &str, what: &str, result: &Result<TestResponse, String>) -> Vec<u8> {
    match result {
        Ok(response) if response.status == 200 => response.body.clone(),
        Ok(response) => panic!("[{name}] {what}: status {}", response.status),
        Err(e) => panic!("[{name}] {what}: error {e}"),
    }
}

const CONCURRENCY: usize = 16;

/// A backoff longer than any scenario, without jitter; scenarios that use it run on a
/// [`ManualClock`] and move it on to end the backoff.
fn long_backoff() -> Backoff {
    Backoff::new(BACKOFF, BACKOFF).with_jitter(0.0)
}

const BACKOFF: Duration = Duration::from_secs(600);

/// What the server saw, for failure messages: path, which token (by its serial number
/// only, never the secret part) and the verdict.
fn wire_summary(requests: &[RecordedRequest]) -> String {
    requests
        .iter()
        .map(|r| {
            let token = r
                .token
                .as_deref()
                .and_then(|t| t.split('.').next())
                .unwrap_or("-");
            let verdict = if r.accepted { "ok" } else { "401" };
            format!("{} {} {token} {verdict}", r.method, r.path)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- the scenarios --------------------------------------------------------------------

/// S1: a valid token goes out as it is: no token call, no rejection, no retry.
pub async fn s1_valid_token_passes_untouched(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    let response = w.respond(TestRequest::get(w.server.api_url("s1"))).await;
    assert_eq!(response.status, 200, "[{}] S1", w.name);
    assert_eq!(response.header("x-echo-path"), Some("/api/s1"));
    let counters = w.server.counters();
    assert_eq!(counters.token_calls, 0, "[{}] S1: no token call", w.name);
    assert_eq!(counters.rejections, 0, "[{}] S1: no 401", w.name);
    assert_eq!(counters.requests_with(&w.first), 1, "[{}] S1", w.name);
    let recorded = w.requests_to("s1");
    assert_eq!(recorded.len(), 1);
    assert!(
        recorded[0].authorization,
        "[{}] S1: sent as a header",
        w.name
    );
    let stats = w.auth.stats();
    assert_eq!(
        (stats.source_calls, stats.retries),
        (0, 0),
        "[{}] S1",
        w.name
    );
}

/// S2: a token that expired before sending is refreshed first: one refresh and no 401
/// on the wire (C7).
pub async fn s2_expired_token_refreshed_before_sending(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::ExpiredClientSide);
    // The server agrees that it is dead: sending it would be a 401.
    w.server.expire_all_tokens();
    let response = w.respond(TestRequest::get(w.server.api_url("s2"))).await;
    assert_eq!(response.status, 200, "[{}] S2", w.name);
    let counters = w.server.counters();
    assert_eq!(
        counters.refresh_token_calls, 1,
        "[{}] S2: one refresh",
        w.name
    );
    assert_eq!(
        counters.rejections, 0,
        "[{}] S2: no 401 on the wire",
        w.name
    );
    assert_eq!(counters.requests_with(&w.first), 0, "[{}] S2", w.name);
    assert_eq!(counters.resource_calls, 1, "[{}] S2", w.name);
    assert_eq!(w.auth.stats().retries, 0, "[{}] S2: no retry", w.name);
}

/// S3: N concurrent requests rejected with 401 cause one refresh; each is resent once
/// and succeeds (C1, C2, C4).
pub async fn s3_concurrent_401s_share_one_refresh(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    w.server.expire_all_tokens();
    // Every first try is held in the server until all N have arrived (and been refused):
    // the N 401s are certainly concurrent, whatever order the client sends in.
    w.server.hold_next_resource_calls(CONCURRENCY);
    let requests = w.concurrently(CONCURRENCY, |i| {
        TestRequest::get(w.server.api_url(&format!("s3/{i}")))
    });
    let release = async {
        w.server
            .wait_for(|c| c.held_resource_calls == CONCURRENCY as u64)
            .await;
        w.server.release_held();
    };
    let (results, ()) = futures::join!(requests, release);
    for (i, result) in results.iter().enumerate() {
        ok_body(w.name, &format!("S3 request {i}"), result);
    }
    let counters = w.server.counters();
    let n = CONCURRENCY as u64;
    assert_eq!(
        counters.refresh_token_calls, 1,
        "[{}] S3: one refresh",
        w.name
    );
    assert_eq!(
        counters.rejections,
        n,
        "[{}] S3: every first try was a 401; the wire: {}",
        w.name,
        wire_summary(&w.server.requests())
    );
    assert_eq!(counters.requests_with(&w.first), n, "[{}] S3", w.name);
    assert_eq!(
        counters.resource_calls,
        2 * n,
        "[{}] S3: exactly one resend each",
        w.name
    );
    let current = w.auth.flight().current().unwrap();
    assert_eq!(
        counters.requests_with(current.access().expose()),
        n,
        "[{}] S3: every resend carries the new token",
        w.name
    );
    let stats = w.auth.stats();
    assert_eq!(stats.retries, n, "[{}] S3: N retries", w.name);
    assert_eq!(stats.source_calls, 1, "[{}] S3", w.name);
}

/// S4: a 401 for the old token that arrives after the refresh is stale: the request is
/// resent with the new token and no second refresh starts (C3).
pub async fn s4_late_401_for_old_token_does_not_refresh_again(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    w.server.expire_all_tokens();
    // The first request's 401 is held in the server until the second request has been
    // refused, refreshed and resent.
    w.server.hold_next_resource_calls(1);
    let late = w.send(TestRequest::get(w.server.api_url("s4/late")));
    let early = async {
        w.server.wait_for(|c| c.held_resource_calls == 1).await;
        let result = w.send(TestRequest::get(w.server.api_url("s4/early"))).await;
        w.server.release_held();
        result
    };
    let (late, early) = futures::join!(late, early);
    ok_body(w.name, "S4 early request", &early);
    ok_body(w.name, "S4 late request", &late);
    let counters = w.server.counters();
    assert_eq!(
        counters.refresh_token_calls, 1,
        "[{}] S4: no second refresh",
        w.name
    );
    assert_eq!(counters.rejections, 2, "[{}] S4", w.name);
    let stats = w.auth.stats();
    assert_eq!(
        stats.stale_rejections, 1,
        "[{}] S4: the late 401 is stale",
        w.name
    );
    assert_eq!(stats.retries, 2, "[{}] S4", w.name);
    let current = w.auth.flight().current().unwrap();
    assert_eq!(
        counters.requests_with(current.access().expose()),
        2,
        "[{}] S4",
        w.name
    );
}

/// S5: the refresh fails: every waiter gets the error (the same one), nobody hangs, no
/// request goes out with a token known to be dead (C5, C9).
pub async fn s5_refresh_failure_reaches_every_waiter(adapter: &dyn Adapter) {
    // A backoff on a clock that does not move: a caller that comes after the failed
    // flight fails fast with that same failure instead of starting another refresh.
    // One attempt per flight: with the core's default retries the second attempt would
    // succeed, and this scenario is about a flight that fails.
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let flight_clock = clock.clone();
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::ExpiredClientSide,
        move |b| {
            b.clock(flight_clock)
                .backoff(long_backoff())
                .retry(Retry::none())
        },
    );
    w.server.fail_next_token_calls(1, Failure::Status500);
    let results = w
        .concurrently(CONCURRENCY, |i| {
            TestRequest::get(w.server.api_url(&format!("s5/{i}")))
        })
        .await;
    let errors: Vec<&String> = results
        .iter()
        .map(|r| match r {
            Err(e) => e,
            Ok(response) => panic!(
                "[{}] S5: expected an error, got {}",
                w.name, response.status
            ),
        })
        .collect();
    for error in &errors {
        assert!(error.contains("500"), "[{}] S5: {error}", w.name);
        w.assert_no_secret_in(error);
    }
    let counters = w.server.counters();
    assert_eq!(
        counters.token_calls, 1,
        "[{}] S5: one refresh for all",
        w.name
    );
    assert_eq!(counters.resource_calls, 0, "[{}] S5", w.name);
    let stats = w.auth.stats();
    assert_eq!(
        (stats.source_calls, stats.failures),
        (1, 1),
        "[{}] S5",
        w.name
    );
}

/// S6: `invalid_grant` means the login is gone: the auth-lost hook fires once, every
/// waiter fails, later calls fail fast without a token call, and a new login recovers.
pub async fn s6_invalid_grant_needs_a_new_login(adapter: &dyn Adapter) {
    let hook = Arc::new(AtomicU32::new(0));
    let fired = hook.clone();
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::ExpiredClientSide,
        move |b| {
            b.on_auth_lost(move |_| {
                fired.fetch_add(1, Ordering::SeqCst);
            })
        },
    );
    // The server no longer knows the refresh token (revoked): a real invalid_grant.
    w.auth
        .flight()
        .install(
            Token::new(w.first.clone())
                .with_refresh("revoked-refresh-token")
                .expires_at(SystemTime::now() - Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let results = w
        .concurrently(CONCURRENCY, |i| {
            TestRequest::get(w.server.api_url(&format!("s6/{i}")))
        })
        .await;
    for result in &results {
        match result {
            Err(e) => {
                assert!(e.contains("invalid_grant"), "[{}] S6: {e}", w.name);
                w.assert_no_secret_in(e);
            }
            Ok(response) => panic!(
                "[{}] S6: expected an error, got {}",
                w.name, response.status
            ),
        }
    }
    assert_eq!(
        hook.load(Ordering::SeqCst),
        1,
        "[{}] S6: hook fires once",
        w.name
    );
    assert_eq!(w.server.counters().token_calls, 1, "[{}] S6", w.name);

    let later = w.send(TestRequest::get(w.server.api_url("s6/later"))).await;
    assert!(later.is_err(), "[{}] S6: later calls fail fast", w.name);
    assert_eq!(
        w.server.counters().token_calls,
        1,
        "[{}] S6: fail fast",
        w.name
    );
    assert_eq!(w.server.counters().resource_calls, 0, "[{}] S6", w.name);

    w.auth.flight().install(login(&w.server)).await.unwrap();
    let response = w
        .respond(TestRequest::get(w.server.api_url("s6/after-login")))
        .await;
    assert_eq!(
        response.status, 200,
        "[{}] S6: a new login recovers",
        w.name
    );
    assert_eq!(hook.load(Ordering::SeqCst), 1, "[{}] S6", w.name);
}

/// S7: the resent request is refused again: that response goes back to the caller, no
/// second refresh, no loop (C4).
pub async fn s7_second_401_is_returned_without_loop(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    w.server.set_reject_all(true);
    let response = w.respond(TestRequest::get(w.server.api_url("s7"))).await;
    assert_eq!(
        response.status, 401,
        "[{}] S7: the second 401 is returned",
        w.name
    );
    let counters = w.server.counters();
    assert_eq!(
        counters.resource_calls, 2,
        "[{}] S7: sent exactly twice",
        w.name
    );
    assert_eq!(
        counters.refresh_token_calls, 1,
        "[{}] S7: one refresh",
        w.name
    );
    assert_eq!(w.auth.stats().retries, 1, "[{}] S7", w.name);
}

/// S8: POST and PUT bodies are resent byte for byte.
pub async fn s8_retry_resends_the_same_body(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for method in ["POST", "PUT"] {
        w.server.expire_all_tokens();
        let path = format!("s8/{}", method.to_ascii_lowercase());
        let url = w.server.api_url(&path);
        let response = w
            .respond(TestRequest::with_body(method, url, payload.clone()))
            .await;
        assert_eq!(response.status, 200, "[{}] S8 {method}", w.name);
        assert!(
            response.body == payload,
            "[{}] S8 {method}: echo differs",
            w.name
        );
        assert_eq!(response.header("x-echo-method"), Some(method));
        let recorded = w.requests_to(&path);
        assert_eq!(recorded.len(), 2, "[{}] S8 {method}: sent twice", w.name);
        assert!(
            !recorded[0].accepted && recorded[1].accepted,
            "[{}] S8",
            w.name
        );
        for request in &recorded {
            assert_eq!(request.method, method);
            assert!(
                request.body == payload,
                "[{}] S8 {method}: a sent body differs ({} bytes)",
                w.name,
                request.body.len()
            );
        }
    }
    assert_eq!(
        w.server.counters().refresh_token_calls,
        2,
        "[{}] S8",
        w.name
    );
    assert_eq!(w.auth.stats().retries, 2, "[{}] S8", w.name);
}

/// S9: a streaming body cannot be replayed: the original 401 is returned, the request
/// is not resent, and the token is marked rejected so the next request succeeds without
/// another 401 (C4).
pub async fn s9_streaming_body_is_not_resent(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    w.server.expire_all_tokens();
    let payload = b"a body that can be read only once".to_vec();
    let request = TestRequest {
        streaming_body: true,
        ..TestRequest::with_body("POST", w.server.api_url("s9/stream"), payload.clone())
    };
    let response = w.respond(request).await;
    assert_eq!(response.status, 401, "[{}] S9: the original 401", w.name);
    assert_eq!(
        response.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "[{}] S9",
        w.name
    );
    let recorded = w.requests_to("s9/stream");
    assert_eq!(recorded.len(), 1, "[{}] S9: not resent", w.name);
    assert!(
        recorded[0].body == payload,
        "[{}] S9: the stream arrived whole",
        w.name
    );
    let stats = w.auth.stats();
    assert_eq!(
        (stats.retries, stats.not_replayable),
        (0, 1),
        "[{}] S9",
        w.name
    );

    let next = w
        .respond(TestRequest::get(w.server.api_url("s9/next")))
        .await;
    assert_eq!(
        next.status, 200,
        "[{}] S9: the next request succeeds",
        w.name
    );
    let counters = w.server.counters();
    assert_eq!(counters.rejections, 1, "[{}] S9: no second 401", w.name);
    assert_eq!(counters.refresh_token_calls, 1, "[{}] S9", w.name);
}

/// S10: a skip-auth request carries no credentials and starts no refresh, even when the
/// token is expired; its response is not classified (C11).
pub async fn s10_skip_auth_sends_no_credentials(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::ExpiredClientSide);
    let request = TestRequest {
        skip_auth: true,
        ..TestRequest::get(w.server.api_url("s10"))
    };
    let response = w.respond(request).await;
    assert_eq!(
        response.status, 401,
        "[{}] S10: the server's answer as it is",
        w.name
    );
    let recorded = w.requests_to("s10");
    assert_eq!(recorded.len(), 1, "[{}] S10: sent once", w.name);
    assert_eq!(recorded[0].token, None, "[{}] S10", w.name);
    assert!(!recorded[0].authorization, "[{}] S10", w.name);
    let counters = w.server.counters();
    assert_eq!(counters.credentialed_requests, 0, "[{}] S10", w.name);
    assert_eq!(counters.token_calls, 0, "[{}] S10: no refresh", w.name);
    let stats = w.auth.stats();
    assert_eq!(
        (stats.rejections, stats.retries),
        (0, 0),
        "[{}] S10",
        w.name
    );
}

/// S11: the token goes only to the allowed origin: another server never sees it, not
/// directly and not across a redirect from the allowed origin (C12).
pub async fn s11_token_only_reaches_allowed_origin(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    let other = TestServer::start(TestServerConfig::other_origin());

    let direct = w.respond(TestRequest::get(other.api_url("direct"))).await;
    assert_eq!(direct.status, 200, "[{}] S11 direct", w.name);
    let posted = w
        .respond(TestRequest::with_body(
            "POST",
            other.api_url("posted"),
            b"x".to_vec(),
        ))
        .await;
    assert_eq!(posted.status, 200, "[{}] S11 posted", w.name);

    let target = other.api_url("landing");
    let redirected = w
        .respond(TestRequest::get(w.server.redirect_url(&target)))
        .await;
    assert_eq!(
        redirected.status, 200,
        "[{}] S11: the redirect is followed",
        w.name
    );
    assert_eq!(redirected.header("x-echo-path"), Some("/api/landing"));
    assert_eq!(w.server.counters().redirects, 1, "[{}] S11", w.name);

    let seen = other.counters();
    assert_eq!(
        seen.resource_calls, 3,
        "[{}] S11: all three arrived",
        w.name
    );
    assert_eq!(
        seen.credentialed_requests, 0,
        "[{}] S11: the other origin saw credentials",
        w.name
    );
    assert!(
        other
            .requests()
            .iter()
            .all(|r| r.token.is_none() && !r.authorization)
    );

    // The allowed origin still gets the token.
    let mine = w
        .respond(TestRequest::get(w.server.api_url("s11/mine")))
        .await;
    assert_eq!(mine.status, 200, "[{}] S11", w.name);
    assert_eq!(w.server.counters().token_calls, 0, "[{}] S11", w.name);
}

/// S12: query-parameter placement: the token travels as `?token=`, and the retry
/// replaces it rather than adding a second one (C12).
pub async fn s12_query_parameter_placement(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| b.query_param("token"));
    let url = format!("{}?page=2", w.server.api_url("s12"));
    let response = w.respond(TestRequest::get(url.clone())).await;
    assert_eq!(response.status, 200, "[{}] S12", w.name);

    w.server.expire_all_tokens();
    let response = w.respond(TestRequest::get(url)).await;
    assert_eq!(response.status, 200, "[{}] S12 after a refresh", w.name);

    let recorded = w.requests_to("s12");
    assert_eq!(recorded.len(), 3, "[{}] S12", w.name);
    let current = w.auth.flight().current().unwrap();
    let tokens: Vec<Option<&str>> = recorded.iter().map(|r| r.token.as_deref()).collect();
    assert_eq!(
        tokens,
        [
            Some(w.first.as_str()),
            Some(w.first.as_str()),
            Some(current.access().expose())
        ],
        "[{}] S12: tokens in the query",
        w.name
    );
    assert!(
        recorded.iter().all(|r| !r.authorization),
        "[{}] S12: no header",
        w.name
    );
    assert_eq!(
        w.server.counters().refresh_token_calls,
        1,
        "[{}] S12",
        w.name
    );
}

/// S13: an API that answers `200 {"code":401}` is classified by a body rule: refreshed,
/// resent, and the caller gets the real answer.
pub async fn s13_business_code_classification(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        business_code: true,
        ..TestServerConfig::default()
    };
    let classifier = Classifier::new().body(4096, |body| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("code").and_then(serde_json::Value::as_i64))
            == Some(401)
    });
    let w = World::start_with(adapter, config, Start::Valid, |b| b.classifier(classifier));
    let ok = w
        .respond(TestRequest::with_body(
            "POST",
            w.server.api_url("s13/ok"),
            b"fine".to_vec(),
        ))
        .await;
    assert_eq!(
        ok.body, b"fine",
        "[{}] S13: an accepted answer passes intact",
        w.name
    );

    w.server.expire_all_tokens();
    let response = w
        .respond(TestRequest::with_body(
            "POST",
            w.server.api_url("s13"),
            b"payload".to_vec(),
        ))
        .await;
    assert_eq!(response.status, 200, "[{}] S13", w.name);
    assert_eq!(
        response.body, b"payload",
        "[{}] S13: the resent request's answer",
        w.name
    );
    let counters = w.server.counters();
    assert_eq!(counters.rejections, 1, "[{}] S13", w.name);
    assert_eq!(counters.refresh_token_calls, 1, "[{}] S13", w.name);
    assert_eq!(w.auth.stats().retries, 1, "[{}] S13", w.name);
}

/// S14: refresh-token rotation: each refresh presents the newest refresh token, so the
/// server's reuse detection never trips, also with concurrent callers.
pub async fn s14_rotation_uses_newest_refresh_token(adapter: &dyn Adapter) {
    let w = World::start(adapter, Start::Valid);
    const ROUNDS: u64 = 5;
    let mut seen = Vec::new();
    for round in 0..ROUNDS {
        w.server.expire_all_tokens();
        let results = w
            .concurrently(4, |i| {
                TestRequest::get(w.server.api_url(&format!("s14/{round}/{i}")))
            })
            .await;
        for result in &results {
            ok_body(w.name, &format!("S14 round {round}"), result);
        }
        let current = w.auth.flight().current().unwrap();
        let refresh = current.refresh().unwrap().expose().to_owned();
        assert!(
            !seen.contains(&refresh),
            "[{}] S14: a refresh token came back",
            w.name
        );
        seen.push(refresh);
    }
    let counters = w.server.counters();
    assert_eq!(counters.refresh_token_calls, ROUNDS, "[{}] S14", w.name);
    assert_eq!(counters.token_errors, 0, "[{}] S14", w.name);
    assert_eq!(
        counters.reuse_detections, 0,
        "[{}] S14: reuse detected",
        w.name
    );
    assert_eq!(w.auth.stats().source_calls, ROUNDS, "[{}] S14", w.name);

    // A forced refresh (the `ForceRefresh` marker) rotates the same way, on a token the
    // server still accepts, and the request goes out with the new token.
    let before = w.auth.flight().current().unwrap();
    let request = TestRequest {
        force_refresh: true,
        ..TestRequest::get(w.server.api_url("s14/forced"))
    };
    let response = w.respond(request).await;
    assert_eq!(response.status, 200, "[{}] S14 forced", w.name);
    let after = w.auth.flight().current().unwrap();
    assert_ne!(before.access(), after.access(), "[{}] S14 forced", w.name);
    let forced = w.requests_to("s14/forced");
    assert_eq!(
        forced.len(),
        1,
        "[{}] S14 forced: no 401, no resend",
        w.name
    );
    assert_eq!(forced[0].token.as_deref(), Some(after.access().expose()));
    let counters = w.server.counters();
    assert_eq!(counters.refresh_token_calls, ROUNDS + 1, "[{}] S14", w.name);
    assert_eq!(counters.reuse_detections, 0, "[{}] S14", w.name);
}

/// S15: the token endpoint hangs: every waiter gets a timeout error after the refresh
/// timeout (not a test timing threshold: the hang never ends), then the next refresh
/// recovers (C10).
pub async fn s15_token_endpoint_hangs_then_recovers(adapter: &dyn Adapter) {
    // As in S5: callers after the failed flight fail fast with its error; moving the
    // clock past the backoff lets the next refresh run.
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let flight_clock = clock.clone();
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::ExpiredClientSide,
        move |b| {
            b.clock(flight_clock)
                .refresh_timeout(Duration::from_secs(1))
                .backoff(long_backoff())
        },
    );
    w.server.fail_next_token_calls(1, Failure::Hang);
    let results = w
        .concurrently(4, |i| {
            TestRequest::get(w.server.api_url(&format!("s15/{i}")))
        })
        .await;
    for result in &results {
        match result {
            Err(e) => {
                assert!(
                    e.to_ascii_lowercase().contains("timed out"),
                    "[{}] S15: expected a timeout, got {e}",
                    w.name
                );
                w.assert_no_secret_in(e);
            }
            Ok(response) => panic!(
                "[{}] S15: expected an error, got {}",
                w.name, response.status
            ),
        }
    }
    let stats = w.auth.stats();
    assert_eq!(
        (stats.source_calls, stats.failures),
        (1, 1),
        "[{}] S15",
        w.name
    );
    assert_eq!(w.server.counters().resource_calls, 0, "[{}] S15", w.name);

    // During the backoff a caller fails fast; after it the next refresh recovers.
    let during = w
        .send(TestRequest::get(w.server.api_url("s15/during")))
        .await;
    assert!(
        during.is_err(),
        "[{}] S15: fail fast in the backoff",
        w.name
    );
    assert_eq!(w.auth.stats().source_calls, 1, "[{}] S15", w.name);
    clock.advance(BACKOFF + Duration::from_secs(1));
    let response = w
        .respond(TestRequest::get(w.server.api_url("s15/after")))
        .await;
    assert_eq!(
        response.status, 200,
        "[{}] S15: the next refresh recovers",
        w.name
    );
    assert_eq!(w.auth.stats().source_calls, 2, "[{}] S15", w.name);
    let counters = w.server.counters();
    // The hung call never answered: it spent nothing, so the recovery's refresh token
    // was still good.
    assert_eq!(counters.tokens_issued, 1, "[{}] S15", w.name);
    assert_eq!(counters.token_errors, 0, "[{}] S15", w.name);
    assert_eq!(counters.reuse_detections, 0, "[{}] S15", w.name);
}

/// Expands to one test function per conformance scenario, each run with the given
/// runtime attribute against a fresh adapter value.
///
/// ```ignore
/// tokenflight_tests::conformance_tests!(async_std::test, SurfAdapter);
/// tokenflight_tests::conformance_tests!(
///     tokio::test(flavor = "multi_thread", worker_threads = 2),
///     ReqwestAdapter
/// );
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($runtime:meta, $adapter:expr $(,)?) => {
        $crate::conformance_tests!(
            @each $runtime, $adapter;
            s1_valid_token_passes_untouched,
            s2_expired_token_refreshed_before_sending,
            s3_concurrent_401s_share_one_refresh,
            s4_late_401_for_old_token_does_not_refresh_again,
            s5_refresh_failure_reaches_every_waiter,
            s6_invalid_grant_needs_a_new_login,
            s7_second_401_is_returned_without_loop,
            s8_retry_resends_the_same_body,
            s9_streaming_body_is_not_resent,
            s10_skip_auth_sends_no_credentials,
            s11_token_only_reaches_allowed_origin,
            s12_query_parameter_placement,
            s13_business_code_classification,
            s14_rotation_uses_newest_refresh_token,
            s15_token_endpoint_hangs_then_recovers,
        );
    };
    (@each $runtime:meta, $adapter:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[$runtime]
            async fn $scenario() {
                let adapter = $adapter;
                $crate::conformance::$scenario(&adapter).await;
            }
        )+
    };
}
