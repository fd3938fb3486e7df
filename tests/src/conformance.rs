//! The conformance suite S1–S18, written once and run by every adapter against the
//! testkit server. An adapter implements [`Adapter`] in its own `tests/all/conformance.rs`
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
//! [`stats`](AuthPolicy::stats)). Waits are joins and counter conditions, never sleeps.
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
//! | S16 | tokens living 2 s, defaults, 100 clients, 5 lifetimes (also 3 processes sharing a `FileStore`) | at most 2 token calls per lifetime, no 401 to a caller; processes adopt each other's tokens |
//! | S17 | 30 % of token calls fail (503, seeded) | at most 1 % of requests fail, none while a usable token existed |
//! | S18 | the token endpoint down, then back | one flight per backoff window, callers fail fast in between; the first flight after the window recovers |
//!
//! The DPoP scenarios D1–D4 (RFC 9449: nonce storms, the token endpoint's nonce demand,
//! a stolen token, a resent body) are in [`dpop`], against the DPoP testkit.
//!
//! S16 and S17 run in real time (5.5 token lifetimes each); S16's process variant starts
//! the adapter's test binary again as workers (see [`S16_WORKER_ENV`]).
//!
//! Regression scenarios, named after the contract they hold the adapters to:
//!
//! | scenario | what the wire must show |
//! |---|---|
//! | [`c11_a_skipped_route_goes_without_a_token`] | a route exempted on the builder goes without a token, for its method and path segment only |
//! | [`c12_query_placement_keeps_the_callers_query_byte_for_byte`] | the caller's query arrives as written, the token pair added (or put in place of the caller's own) |
//! | [`c12_query_token_never_in_errors`] | a transport error after query placement does not show the token |
//! | [`c12_query_token_never_in_a_referer`] | a redirect to another origin carries no `Referer` with the token |
//! | [`c4_a_401_from_an_origin_the_token_never_reached_is_not_a_rejection`] | a 401 from a redirect target that got no token is returned as is: no refresh, no resend |
//! | [`c4_a_body_classifier_does_not_hold_back_a_stream`] | a streaming response (SSE, a long poll without length) reaches the caller while it streams |

// Test support: a panic is how a scenario reports a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod dpop;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::future::{BoxFuture, join_all};
use tokenflight::keyed::TokenKey;
use tokenflight::oauth2::{ClientCredentialsGrant, RefreshTokenGrant};
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, Classifier, Placement, SingleFlight, Token,
    adapter::FuturesTimer, adapter::Timer, adapter::Transport, config::Backoff,
    config::FlightConfig, config::Retry, store::FileStore, test_util::ManualClock,
};

use crate::testkit::{
    ClosingServer, Failure, RecordedRequest, STREAM_FIRST, TestServer, TestServerConfig,
};

/// What an adapter gives the suite.
pub trait Adapter: Send + Sync + 'static {
    /// Short name for messages ("reqwest", "surf").
    fn name(&self) -> &'static str;
    /// A core builder preset the way the adapter's own builder is (its runtime's
    /// spawner and timer); the suite adds source, origins, placement and so on.
    fn builder(&self) -> AuthPolicyBuilder<AuthPolicy>;
    /// A client of the adapter's HTTP library with the adapter's auth middleware made
    /// from `auth`. The client must follow redirects (S11).
    fn client(&self, auth: AuthPolicy) -> Arc<dyn TestClient>;
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
    /// Put a `TokenKey` marker with this value on the request (keyed policies).
    pub key: Option<String>,
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

    /// Sends one request through the adapter's middleware and returns as soon as the
    /// response and the first bytes of its body are there: its status and those bytes
    /// (at least one byte, unless the body is empty). The rest of the body is dropped.
    /// For responses that stream and do not end while the test looks at them.
    ///
    /// The default fails: an adapter implements it to run
    /// [`c4_a_body_classifier_does_not_hold_back_a_stream`].
    fn first_chunk(&self, request: TestRequest) -> BoxFuture<'_, Result<(u16, Vec<u8>), String>> {
        let _ = request;
        Box::pin(async { Err("this adapter's TestClient does not implement first_chunk".into()) })
    }
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

    /// This request with a `TokenKey` marker of value `key`.
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
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
    auth: AuthPolicy,
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
        configure: impl FnOnce(AuthPolicyBuilder<AuthPolicy>) -> AuthPolicyBuilder<AuthPolicy>,
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

    /// The coordinator (the suite's worlds have one token; the keyed scenarios build
    /// their own policy).
    fn flight(&self) -> &SingleFlight {
        self.auth.flight().expect("an unkeyed policy")
    }

    /// The current token.
    fn current(&self) -> Arc<Token> {
        self.flight().current().expect("a current token")
    }

    /// Every secret of this world: none may show in an error message.
    fn assert_no_secret_in(&self, message: &str) {
        let current = self.flight().current();
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

pub(crate) fn ok_body(name: &str, what: &str, result: &Result<TestResponse, String>) -> Vec<u8> {
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
    let current = w.current();
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
    let current = w.current();
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
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let flight_clock = clock.clone();
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::ExpiredClientSide,
        move |b| b.clock(flight_clock).backoff(long_backoff()),
    );
    // Every attempt of the flight fails (a flight retries transient failures, C16).
    let attempts = default_attempts();
    w.server
        .fail_next_token_calls(attempts as usize, Failure::Status500);
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
        counters.token_calls, attempts,
        "[{}] S5: one refresh for all, with all its attempts",
        w.name
    );
    assert_eq!(counters.resource_calls, 0, "[{}] S5", w.name);
    let stats = w.auth.stats();
    assert_eq!(
        (stats.flights, stats.source_calls, stats.failures),
        (1, attempts, 1),
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
            b.observer(crate::on_auth_lost(move |_| {
                fired.fetch_add(1, Ordering::SeqCst);
            }))
        },
    );
    // The server no longer knows the refresh token (revoked): a real invalid_grant.
    w.flight()
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

    w.flight().install(login(&w.server)).await.unwrap();
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

/// A route exempted on the builder (`skip_route`) goes without credentials and starts
/// no refresh, for its method only and for the whole path segment; every other request
/// carries the token. One rule in the core's policy, the same in every adapter (C11).
pub async fn c11_a_skipped_route_goes_without_a_token(adapter: &dyn Adapter) {
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::ExpiredClientSide,
        |b| b.skip_route(Some(http::Method::POST), "/api/login"),
    );
    let login = TestRequest::with_body("POST", w.server.api_url("login/sso"), b"user".to_vec());
    let response = w.respond(login).await;
    assert_eq!(
        response.status, 401,
        "[{}] C11: the server's answer as it is",
        w.name
    );
    let recorded = w.requests_to("login/sso");
    assert_eq!(recorded.len(), 1, "[{}] C11: sent once", w.name);
    assert_eq!(recorded[0].token, None, "[{}] C11", w.name);
    assert!(!recorded[0].authorization, "[{}] C11", w.name);
    assert_eq!(
        w.server.counters().token_calls,
        0,
        "[{}] C11: no refresh",
        w.name
    );
    // Another method on the route, and a path that only starts with the same letters,
    // carry the token.
    for (method, path) in [("GET", "login"), ("POST", "loginx")] {
        let request = TestRequest::with_body(method, w.server.api_url(path), b"x".to_vec());
        let response = w.respond(request).await;
        assert_eq!(response.status, 200, "[{}] C11: {method} {path}", w.name);
        let recorded = w.requests_to(path);
        assert!(
            recorded.last().is_some_and(|r| r.token.is_some()),
            "[{}] C11: {method} {path} carries the token",
            w.name
        );
    }
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
    let w = World::start_with(adapter, config, Start::Valid, |b| {
        b.placement(Placement::query("token"))
    });
    let url = format!("{}?page=2", w.server.api_url("s12"));
    let response = w.respond(TestRequest::get(url.clone())).await;
    assert_eq!(response.status, 200, "[{}] S12", w.name);

    w.server.expire_all_tokens();
    let response = w.respond(TestRequest::get(url)).await;
    assert_eq!(response.status, 200, "[{}] S12 after a refresh", w.name);

    let recorded = w.requests_to("s12");
    assert_eq!(recorded.len(), 3, "[{}] S12", w.name);
    let current = w.current();
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
        let current = w.current();
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
    let before = w.current();
    let request = TestRequest {
        force_refresh: true,
        ..TestRequest::get(w.server.api_url("s14/forced"))
    };
    let response = w.respond(request).await;
    assert_eq!(response.status, 200, "[{}] S14 forced", w.name);
    let after = w.current();
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
                .retry(Retry::none())
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

// ---- regression scenarios, named after their contract ---------------------------------

/// A query as callers write them for signed URLs and old APIs: a flag without `=`,
/// percent-escapes in both cases, `+`, an empty value, repeated keys, and the caller's
/// own `token` in the middle.
const CALLERS_QUERY: &str =
    "flag&sig=a%2Fb%3D%3D&plus=a+b&tilde=%7e&empty=&token=callers&list=1&list=2";

fn form_encoded(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// C12 (query placement): the token parameter is added and the rest of the caller's
/// query reaches the server byte for byte (no `=` added to a flag, no re-encoding), so
/// signed URLs keep their signature. A `token` pair the caller wrote is replaced in
/// place; every other pair stays where it was.
pub async fn c12_query_placement_keeps_the_callers_query_byte_for_byte(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| {
        b.placement(Placement::query("token"))
    });
    let signed = format!("{}?{CALLERS_QUERY}", w.server.api_url("c12/signed"));
    let response = w.respond(TestRequest::get(signed.clone())).await;
    assert_eq!(response.status, 200, "[{}] C12 query", w.name);
    let flag = format!("{}?flag", w.server.api_url("c12/flag"));
    let response = w.respond(TestRequest::get(flag)).await;
    assert_eq!(response.status, 200, "[{}] C12 query", w.name);

    // The resend after a rejection starts again from the caller's query.
    w.server.expire_all_tokens();
    let response = w.respond(TestRequest::get(signed)).await;
    assert_eq!(
        response.status, 200,
        "[{}] C12 query after a refresh",
        w.name
    );

    let with = |token: &str| {
        CALLERS_QUERY.replace("token=callers", &format!("token={}", form_encoded(token)))
    };
    let current = w.current();
    let signed: Vec<Option<String>> = w
        .requests_to("c12/signed")
        .into_iter()
        .map(|r| r.query)
        .collect();
    assert_eq!(
        signed,
        [
            Some(with(&w.first)),
            Some(with(&w.first)),
            Some(with(current.access().expose()))
        ],
        "[{}] C12: the caller's query was rewritten",
        w.name
    );
    let flag: Vec<Option<String>> = w
        .requests_to("c12/flag")
        .into_iter()
        .map(|r| r.query)
        .collect();
    assert_eq!(
        flag,
        [Some(format!("flag&token={}", form_encoded(&w.first)))],
        "[{}] C12: a flag gained an `=`",
        w.name
    );
}

/// C12 (query placement): when sending fails after the token went into the URL, the
/// error the caller gets (its `Display` and every cause) does not show the token;
/// clients print the request URL in their errors.
pub async fn c12_query_token_never_in_errors(adapter: &dyn Adapter) {
    let broken = ClosingServer::start();
    let config = TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    };
    let origin = broken.origin();
    let w = World::start_with(adapter, config, Start::Valid, |b| {
        b.placement(Placement::query("token"))
            .allowed_origin(&origin)
    });
    for url in [
        format!("{origin}/api/c12/broken?page=2"),
        format!("{origin}/api/c12/broken"),
    ] {
        match w.send(TestRequest::get(url.clone())).await {
            Err(error) => w.assert_no_secret_in(&error),
            Ok(response) => panic!(
                "[{}] C12 errors: {url} answered {} from a server that closes every connection",
                w.name, response.status
            ),
        }
    }
    // The valid token was attached as it was: no refresh came in between.
    assert_eq!(w.auth.stats().source_calls, 0, "[{}] C12 errors", w.name);
}

/// C12 (query placement): a redirect from the allowed origin to another one does not
/// take the token along in a `Referer` (which clients fill with the previous URL,
/// query included). Following the redirect or handing the redirect response to the
/// caller are both fine; the other origin seeing the token is not.
pub async fn c12_query_token_never_in_a_referer(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| {
        b.placement(Placement::query("token"))
    });
    let other = TestServer::start(TestServerConfig::other_origin());
    let response = w
        .respond(TestRequest::get(
            w.server.redirect_url(&other.api_url("landing")),
        ))
        .await;
    assert!(
        response.status == 200 || response.status == 302,
        "[{}] C12 referer: status {}",
        w.name,
        response.status
    );
    assert_eq!(w.server.counters().redirects, 1, "[{}] C12 referer", w.name);
    for request in other.requests() {
        assert!(
            !request.referer.as_deref().unwrap_or("").contains(&w.first),
            "[{}] C12: the token went to another origin in a Referer",
            w.name
        );
        assert_eq!(request.token, None, "[{}] C12 referer", w.name);
        assert!(!request.authorization, "[{}] C12 referer", w.name);
    }
    assert_eq!(
        other.counters().credentialed_requests,
        0,
        "[{}] C12",
        w.name
    );
}

/// C4: a redirect from the allowed origin to another one that answers 401: the token
/// never reached that origin (it is not allowed), so its 401 says nothing about the
/// token. The caller gets that 401 as it is: no refresh, no resend, no rejection
/// counted. The same for a same-origin hop without the token (query placement).
pub async fn c4_a_401_from_an_origin_the_token_never_reached_is_not_a_rejection(
    adapter: &dyn Adapter,
) {
    let w = World::start(adapter, Start::Valid);
    // A protected API elsewhere: 401 to anyone without its own token.
    let other = TestServer::start(TestServerConfig::default());
    let response = w
        .respond(TestRequest::get(
            w.server.redirect_url(&other.api_url("landing")),
        ))
        .await;
    assert_eq!(
        response.status, 401,
        "[{}] C4: the other origin's answer, as it is",
        w.name
    );
    assert_eq!(w.server.counters().redirects, 1, "[{}] C4", w.name);
    let seen = other.requests();
    assert_eq!(
        seen.len(),
        1,
        "[{}] C4: the other origin was asked once (no resend)",
        w.name
    );
    assert!(
        seen[0].token.is_none() && !seen[0].authorization,
        "[{}] C4",
        w.name
    );
    assert_eq!(
        w.server.counters().token_calls,
        0,
        "[{}] C4: a 401 from an origin the token never reached started a refresh",
        w.name
    );
    let stats = w.auth.stats();
    assert_eq!(
        (stats.rejections, stats.retries, stats.not_replayable),
        (0, 0, 0),
        "[{}] C4",
        w.name
    );
    // The token is still good where it goes.
    let mine = w
        .respond(TestRequest::get(w.server.api_url("c4/mine")))
        .await;
    assert_eq!(mine.status, 200, "[{}] C4", w.name);
    assert_eq!(w.server.counters().token_calls, 0, "[{}] C4", w.name);

    // Query placement, a redirect within the origin: the `Location` does not repeat the
    // token. A client that follows redirects below the layer lands there without it (a
    // 401 that is not about the token); one that follows them above the layer attaches
    // it again (a 200). Either way no refresh.
    let config = TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| {
        b.placement(Placement::query("token"))
    });
    let response = w
        .respond(TestRequest::get(
            w.server.redirect_url(&w.server.api_url("c4/landing")),
        ))
        .await;
    assert!(
        response.status == 401 || response.status == 200,
        "[{}] C4 query: status {}",
        w.name,
        response.status
    );
    assert_eq!(w.server.counters().redirects, 1, "[{}] C4 query", w.name);
    assert_eq!(
        w.requests_to("c4/landing").len(),
        1,
        "[{}] C4 query: the landing was asked once (no resend)",
        w.name
    );
    assert_eq!(
        w.server.counters().token_calls,
        0,
        "[{}] C4 query: a 401 for a hop without the token started a refresh",
        w.name
    );
}

/// C4 (body classification): a body rule must not hold a streaming response back until
/// its limit or its end. Server-sent events (declared by their content type) are never
/// read, even when bodies of unknown length are; a long poll or JSON stream without a
/// `Content-Length` is not read by default. The caller gets the response and its first
/// event while the server still streams (the server ends the stream only after that).
pub async fn c4_a_body_classifier_does_not_hold_back_a_stream(adapter: &dyn Adapter) {
    let rejects = |body: &[u8]| body.windows(10).any(|w| w == b"\"code\":401");
    let by_default = Classifier::new().body(4096, rejects);
    let unknown_length = Classifier::new()
        .body(4096, rejects)
        .body_of_unknown_length(true);
    let cases = [
        (by_default.clone(), "text/event-stream"),
        (by_default, "application/json"),
        (unknown_length, "text/event-stream"),
    ];
    for (classifier, content_type) in cases {
        let w = World::start_with(adapter, TestServerConfig::default(), Start::Valid, |b| {
            b.classifier(classifier)
        });
        let url = w.server.stream_url(content_type);
        let first = w.client.first_chunk(TestRequest::get(url)).await;
        let counters = w.server.counters();
        assert_eq!(
            counters.streams_cut_off, 0,
            "[{}] C4 {content_type}: the response was held back until the stream ended",
            w.name
        );
        match first {
            Ok((status, bytes)) => {
                assert_eq!(status, 200, "[{}] C4 {content_type}", w.name);
                assert!(
                    !bytes.is_empty() && STREAM_FIRST.starts_with(&bytes),
                    "[{}] C4 {content_type}: first bytes {:?}",
                    w.name,
                    String::from_utf8_lossy(&bytes)
                );
            }
            Err(e) => panic!("[{}] C4 {content_type}: {e}", w.name),
        }
        assert_eq!(counters.streams_opened, 1, "[{}] C4 {content_type}", w.name);
        w.server.release_held();
    }
}

// ---- S16–S18: timing that fits the lifetime, a flaky endpoint, an outage -------------

/// S16, S17: how long the testkit's tokens live.
const SHORT_LIFETIME: Duration = Duration::from_secs(2);
/// S16, S17: the load runs this many whole lifetimes, plus half of one.
const LOAD_LIFETIMES: u32 = 5;
/// S16, S17: concurrent clients in one process.
const LOAD_CLIENTS: usize = 100;
/// S16 across processes: the processes sharing one `FileStore`, and the clients in
/// each (together at least [`LOAD_CLIENTS`]).
const PROCESSES: usize = 3;
const CLIENTS_PER_PROCESS: usize = LOAD_CLIENTS.div_ceil(PROCESSES);
/// S16, S17: each client asks at most once per this (a client with work to do between
/// requests). Shapes the load; nothing waits on it for a result.
const LOAD_PACE: Duration = Duration::from_millis(50);
/// S17: share of token calls that fail (503), and the seed that picks which. With this
/// seed the first three calls fail: the first flight uses up all its default attempts,
/// so the scenario covers a failed flight (and the backoff after it), not only a failed
/// attempt that a retry hides.
const FLAKY_RATE: f64 = 0.3;
const FLAKY_SEED: u64 = 8;
/// S17: at most this share of requests may fail.
const FLAKY_MAX_FAILED: f64 = 0.01;
/// S18: fail-fast windows the outage lasts.
const OUTAGE_WINDOWS: u32 = 6;
/// Attempts of one flight with the default `FlightConfig`.
fn default_attempts() -> u64 {
    u64::from(FlightConfig::default().retry.max_attempts)
}

/// How long the S16/S17 load runs.
fn load_duration() -> Duration {
    SHORT_LIFETIME * LOAD_LIFETIMES + SHORT_LIFETIME / 2
}

/// Token lifetimes that `elapsed` touches (a started one counts whole): what "per
/// lifetime" is measured against.
fn lifetimes_in(elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() / SHORT_LIFETIME.as_secs_f64()).ceil() as u64
}

/// The effective leeway of a token living `lifetime` with the default settings
/// (documented as `min(10 s, lifetime / 10 + 1 s)`): within it a token no longer counts as
/// usable.
fn default_leeway(lifetime: Duration) -> Duration {
    let now = SystemTime::now();
    FlightConfig::default().leeway_for(&Token::new("-").expires_in(lifetime, now))
}

/// What a run of concurrent clients saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadOutcome {
    /// Requests made.
    pub requests: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that ended in a 401 handed to the caller.
    pub unauthorized: u64,
    /// Requests that ended in an error or another status.
    pub failed: u64,
    /// Failed requests (errors, other statuses, 401s) while the server still held a token
    /// issued before the request was sent with more than the effective leeway left.
    pub failed_with_usable_token: u64,
    /// The first few failure messages, for the report.
    pub first_failures: Vec<String>,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
}

impl LoadOutcome {
    fn merge(&mut self, other: LoadOutcome) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.unauthorized += other.unauthorized;
        self.failed += other.failed;
        self.failed_with_usable_token += other.failed_with_usable_token;
        for failure in other.first_failures {
            if self.first_failures.len() < 5 {
                self.first_failures.push(failure);
            }
        }
        self.elapsed_s = self.elapsed_s.max(other.elapsed_s);
    }

    /// Requests that did not end in a 200.
    fn not_ok(&self) -> u64 {
        self.requests - self.ok
    }
}

/// `clients` concurrent clients, each sending `GET {api_base}load/{client}/{n}` at most
/// once per [`LOAD_PACE`] until `duration` has passed. With `usable`, each failure is
/// checked against the server: did a token issued before the request was sent still
/// have more than the given margin to live? (Checked after the failure, so a token that
/// qualifies then certainly qualified when the request failed.)
pub(crate) async fn run_load(
    client: &dyn TestClient,
    api_base: &str,
    clients: usize,
    duration: Duration,
    usable: Option<(&TestServer, Duration)>,
) -> LoadOutcome {
    run_load_on(client, &[(api_base, None)], clients, duration, usable).await
}

/// [`run_load`] over several APIs: client `c` sends to `targets[c % targets.len()]`, a
/// base URL and the audience whose tokens count as usable for it (`None`: tokens
/// without one).
async fn run_load_on(
    client: &dyn TestClient,
    targets: &[(&str, Option<&str>)],
    clients: usize,
    duration: Duration,
    usable: Option<(&TestServer, Duration)>,
) -> LoadOutcome {
    let started = Instant::now();
    let one = |c: usize| async move {
        let (api_base, audience) = targets[c % targets.len()];
        let mut outcome = LoadOutcome::default();
        let mut n = 0u64;
        while started.elapsed() < duration {
            let sent = Instant::now();
            let result = client
                .send(TestRequest::get(format!("{api_base}load/{c}/{n}")))
                .await;
            n += 1;
            outcome.requests += 1;
            let failure = match result {
                Ok(response) if response.status == 200 => None,
                Ok(response) if response.status == 401 => {
                    outcome.unauthorized += 1;
                    Some("HTTP 401".to_owned())
                }
                Ok(response) => {
                    outcome.failed += 1;
                    Some(format!("HTTP {}", response.status))
                }
                Err(error) => {
                    outcome.failed += 1;
                    Some(error)
                }
            };
            match failure {
                None => outcome.ok += 1,
                Some(failure) => {
                    let life = usable.and_then(|(server, _)| match audience {
                        Some(audience) => server.longest_valid_life_for(audience, sent),
                        None => server.longest_valid_life(sent),
                    });
                    let had_usable = usable.is_some_and(|(_, margin)| life > Some(margin));
                    if had_usable {
                        outcome.failed_with_usable_token += 1;
                    }
                    if outcome.first_failures.len() < 5 {
                        outcome.first_failures.push(format!(
                            "{failure} (a usable token existed: {had_usable}, {life:?} left)"
                        ));
                    }
                }
            }
            FuturesTimer.sleep(LOAD_PACE).await;
        }
        outcome
    };
    let mut total = LoadOutcome::default();
    for outcome in join_all((0..clients).map(one)).await {
        total.merge(outcome);
    }
    total.elapsed_s = started.elapsed().as_secs_f64();
    total
}

/// S16: tokens living 2 s, the adapter's defaults (no timing tuned), 100 concurrent
/// clients over more than 5 lifetimes: at most 2 token calls per lifetime, never one per
/// request, and no caller ever sees a 401 (C15).
pub async fn s16_short_lifetimes_cost_at_most_two_calls_per_lifetime(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        token_lifetime: SHORT_LIFETIME,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| b);
    let load = run_load(
        &*w.client,
        &w.server.api_url(""),
        LOAD_CLIENTS,
        load_duration(),
        None,
    )
    .await;
    let counters = w.server.counters();
    let lifetimes = lifetimes_in(Duration::from_secs_f64(load.elapsed_s));
    let stats = w.auth.stats();
    println!(
        "[{}] S16: {} clients, {:.1} s = {lifetimes} lifetimes of {SHORT_LIFETIME:?}, \
         {} requests, {} token calls ({:.2} per lifetime), {} flights, {} 401s on the \
         wire, {} 401s to callers, {} failed",
        w.name,
        LOAD_CLIENTS,
        load.elapsed_s,
        load.requests,
        counters.token_calls,
        counters.token_calls as f64 / (load.elapsed_s / SHORT_LIFETIME.as_secs_f64()),
        stats.flights,
        counters.rejections,
        load.unauthorized,
        load.failed,
    );
    assert_eq!(
        load.unauthorized, 0,
        "[{}] S16: 401s reached callers: {:?}",
        w.name, load.first_failures
    );
    assert_eq!(
        load.failed, 0,
        "[{}] S16: requests failed: {:?}",
        w.name, load.first_failures
    );
    assert!(
        counters.token_calls <= 2 * lifetimes,
        "[{}] S16: {} token calls in {lifetimes} lifetimes ({} requests)",
        w.name,
        counters.token_calls,
        load.requests
    );
    assert!(
        counters.token_calls >= 1,
        "[{}] S16: tokens expired, someone must have refreshed",
        w.name
    );
    assert_eq!(counters.reuse_detections, 0, "[{}] S16", w.name);
    assert_eq!(stats.source_calls, counters.token_calls, "[{}] S16", w.name);
}

/// The environment variable that turns a conformance test binary started by S16 into
/// one of its worker processes; its value tells the worker what to do (JSON).
pub const S16_WORKER_ENV: &str = "TOKENFLIGHT_S16_WORKER";

/// What an S16 worker process is told (through `S16_WORKER_ENV`, not the command line:
/// it holds the client secret).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct WorkerSpec {
    store: std::path::PathBuf,
    result: std::path::PathBuf,
    token_url: String,
    api_base: String,
    origin: String,
    client_id: String,
    client_secret: String,
    clients: usize,
    duration_ms: u64,
}

/// What an S16 worker process reports back (in its result file).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct WorkerResult {
    load: LoadOutcome,
    source_calls: u64,
    flights: u64,
    adopted: u64,
}

/// A conformance test's name inside its test binary, for `--exact`: `module` is the
/// `module_path!()` where [`conformance_tests!`](crate::conformance_tests) was invoked
/// (its first segment is the crate, which test names leave out).
pub fn test_name(module: &str, function: &str) -> String {
    match module.split_once("::") {
        Some((_, path)) => format!("{path}::{function}"),
        None => function.to_owned(),
    }
}

/// S16 across processes: the same load spread over 3 processes of the adapter's test
/// binary that share one `FileStore` (defaults otherwise): at most 2 token calls per
/// lifetime for all of them together, and processes adopt each other's tokens (C1,
/// C15). `this_test` is the test's own name: the processes are this test binary, started
/// again with only this test and [`S16_WORKER_ENV`] set.
pub async fn s16_short_lifetimes_across_processes_sharing_a_file_store(
    adapter: &dyn Adapter,
    this_test: &str,
) {
    if let Ok(spec) = std::env::var(S16_WORKER_ENV) {
        let spec: WorkerSpec = serde_json::from_str(&spec).unwrap();
        return s16_worker(adapter, spec).await;
    }
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig {
        token_lifetime: SHORT_LIFETIME,
        ..TestServerConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("token.json");
    // The login, in the store: every process starts from it.
    crate::save_locked(
        &FileStore::new(&store_path),
        &login(&server).with_generation(1),
    )
    .await
    .unwrap();
    let duration = load_duration();
    let started = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            let spec = WorkerSpec {
                store: store_path.clone(),
                result: dir.path().join(format!("result-{i}.json")),
                token_url: server.token_url(),
                api_base: server.api_url(""),
                origin: server.origin(),
                client_id: server.client_id(),
                client_secret: server.client_secret(),
                clients: CLIENTS_PER_PROCESS,
                duration_ms: duration.as_millis() as u64,
            };
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([this_test, "--exact", "--nocapture", "--test-threads", "1"])
                .env(S16_WORKER_ENV, serde_json::to_string(&spec).unwrap())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // Waited for on a thread of its own, so no runtime thread blocks.
            let (done, exited) = futures::channel::oneshot::channel();
            std::thread::spawn(move || {
                let _ = done.send(child.wait_with_output());
            });
            (spec, exited)
        })
        .collect();
    let mut results = Vec::new();
    for (i, (spec, exited)) in children.into_iter().enumerate() {
        let output = exited.await.unwrap().unwrap();
        assert!(
            output.status.success(),
            "[{name}] S16 process {i} failed: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&spec.result).unwrap_or_else(|e| {
            panic!(
                "[{name}] S16 process {i} left no result ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        results.push(serde_json::from_str::<WorkerResult>(&text).unwrap());
    }
    let elapsed = started.elapsed();
    let lifetimes = lifetimes_in(elapsed);
    let counters = server.counters();
    let mut load = LoadOutcome::default();
    let (mut source_calls, mut flights, mut adopted) = (0, 0, 0);
    for result in &results {
        load.merge(result.load.clone());
        source_calls += result.source_calls;
        flights += result.flights;
        adopted += result.adopted;
    }
    println!(
        "[{name}] S16 x{PROCESSES} processes (FileStore): {} clients, {:.1} s = {lifetimes} \
         lifetimes, {} requests, {} token calls ({:.2} per lifetime), {flights} flights, \
         {adopted} adoptions, {} 401s on the wire, {} 401s to callers, {} failed",
        PROCESSES * CLIENTS_PER_PROCESS,
        elapsed.as_secs_f64(),
        load.requests,
        counters.token_calls,
        counters.token_calls as f64 / (elapsed.as_secs_f64() / SHORT_LIFETIME.as_secs_f64()),
        counters.rejections,
        load.unauthorized,
        load.failed,
    );
    assert_eq!(
        load.unauthorized, 0,
        "[{name}] S16 processes: 401s reached callers: {:?}",
        load.first_failures
    );
    assert_eq!(
        load.failed, 0,
        "[{name}] S16 processes: requests failed: {:?}",
        load.first_failures
    );
    assert!(
        counters.token_calls <= 2 * lifetimes,
        "[{name}] S16 processes: {} token calls in {lifetimes} lifetimes",
        counters.token_calls
    );
    assert_eq!(source_calls, counters.token_calls, "[{name}] S16 processes");
    // Each process takes the login from the store at its start (that is an adoption
    // too); beyond those, processes must have taken each other's refreshed tokens.
    assert!(
        adopted > PROCESSES as u64,
        "[{name}] S16 processes: {adopted} adoptions, no process took another's token"
    );
    assert_eq!(counters.reuse_detections, 0, "[{name}] S16 processes");
}

/// One S16 worker process: the load through this adapter, with a `FileStore`, the result
/// written to the spec's file.
async fn s16_worker(adapter: &dyn Adapter, spec: WorkerSpec) {
    // A process that hangs must not outlive the test: after its load and a generous
    // grace time it ends itself (a failure the parent reports, not a timing check).
    let duration = Duration::from_millis(spec.duration_ms);
    let grace = duration + Duration::from_secs(120);
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        eprintln!("S16 worker: still running after {grace:?}; giving up");
        std::process::exit(3);
    });
    let grant = RefreshTokenGrant::new(adapter.bare_transport(), &spec.token_url, &spec.client_id)
        .unwrap()
        .client_secret(spec.client_secret.as_str());
    let auth = adapter
        .builder()
        .source(grant)
        .store(FileStore::new(&spec.store))
        .allowed_origin(&spec.origin)
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    let load = run_load(&*client, &spec.api_base, spec.clients, duration, None).await;
    let stats = auth.stats();
    let result = WorkerResult {
        load,
        source_calls: stats.source_calls,
        flights: stats.flights,
        adopted: stats.adopted,
    };
    std::fs::write(&spec.result, serde_json::to_vec(&result).unwrap()).unwrap();
}

/// S17: the token endpoint fails 30 % of calls at random (503, seeded), with the
/// adapter's defaults and tokens living 2 s: at most 1 % of requests fail, and none fails
/// while a usable token existed (C16).
pub async fn s17_flaky_token_endpoint_is_invisible(adapter: &dyn Adapter) {
    let config = TestServerConfig {
        token_lifetime: SHORT_LIFETIME,
        ..TestServerConfig::default()
    };
    let w = World::start_with(adapter, config, Start::Valid, |b| b);
    w.server.set_token_failure_rate(FLAKY_RATE, FLAKY_SEED);
    let load = run_load(
        &*w.client,
        &w.server.api_url(""),
        LOAD_CLIENTS,
        load_duration(),
        Some((&w.server, default_leeway(SHORT_LIFETIME))),
    )
    .await;
    let counters = w.server.counters();
    let stats = w.auth.stats();
    let failed_share = load.not_ok() as f64 / load.requests.max(1) as f64;
    println!(
        "[{}] S17: {} clients, {:.1} s, {} requests, {} failed ({:.3} %), {} of them while \
         a usable token existed; {} token calls, {} failed at random (503), {} flights, \
         {} failed flights",
        w.name,
        LOAD_CLIENTS,
        load.elapsed_s,
        load.requests,
        load.not_ok(),
        failed_share * 100.0,
        load.failed_with_usable_token,
        counters.token_calls,
        counters.random_failures,
        stats.flights,
        stats.failures,
    );
    assert!(
        counters.random_failures > 0,
        "[{}] S17: the endpoint never failed; nothing was tested",
        w.name
    );
    assert_eq!(
        load.failed_with_usable_token, 0,
        "[{}] S17: requests failed while a usable token existed: {:?}",
        w.name, load.first_failures
    );
    assert!(
        failed_share <= FLAKY_MAX_FAILED,
        "[{}] S17: {} of {} requests failed: {:?}",
        w.name,
        load.not_ok(),
        load.requests,
        load.first_failures
    );
    assert_eq!(counters.reuse_detections, 0, "[{}] S17", w.name);
}

/// S18: the token endpoint is down (503 on every call), then back. With the default
/// backoff, on a manual clock moved window by window: each fail-fast window lets exactly
/// one flight through (at most the default attempts each), every other caller fails
/// fast without a token call, so the calls follow the backoff schedule, not the
/// requests; once the endpoint is back, the first flight after the window in progress
/// recovers (C9, C16).
pub async fn s18_outage_follows_the_backoff_then_recovers(adapter: &dyn Adapter) {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let flight_clock = clock.clone();
    let w = World::start_with(
        adapter,
        TestServerConfig::default(),
        Start::Valid,
        move |b| b.clock(flight_clock),
    );
    let backoff = FlightConfig::default().backoff;
    // The client's token has expired (the server would still take it, but the client
    // does not send a token it believes dead): every caller needs a refresh.
    clock.advance(Duration::from_secs(2 * 3600));
    w.server.set_token_outage(true);

    let batch = |label: String| {
        let w = &w;
        async move {
            let results = w
                .concurrently(CONCURRENCY, |i| {
                    TestRequest::get(w.server.api_url(&format!("s18/{label}/{i}")))
                })
                .await;
            let failed = results.iter().filter(|r| r.is_err()).count();
            for result in &results {
                if let Err(e) = result {
                    w.assert_no_secret_in(e);
                }
            }
            (results, failed)
        }
    };
    let calls = || (w.auth.stats().flights, w.auth.stats().source_calls);
    let mut requests = 0u64;
    let mut outage = Duration::ZERO;
    for window in 1..=OUTAGE_WINDOWS {
        let ceiling = ceiling(&backoff, window);
        let shortest = ceiling.mul_f64(1.0 - backoff.jitter);
        let (flights, sources) = calls();
        // The previous window is over: one flight goes out and fails.
        let (_, failed) = batch(format!("{window}/open")).await;
        let (flights_now, sources_now) = calls();
        assert_eq!(failed, CONCURRENCY, "[{}] S18 window {window}", w.name);
        assert_eq!(
            flights_now - flights,
            1,
            "[{}] S18 window {window}: one flight for {CONCURRENCY} callers",
            w.name
        );
        assert!(
            (1..=default_attempts()).contains(&(sources_now - sources)),
            "[{}] S18 window {window}: {} attempts in one flight",
            w.name,
            sources_now - sources
        );
        // Inside the window (at once, and just before its shortest jittered end):
        // everyone fails fast, no token call.
        let (_, failed_now) = batch(format!("{window}/start")).await;
        clock.advance(shortest.saturating_sub(Duration::from_millis(1)));
        let (_, failed_late) = batch(format!("{window}/late")).await;
        assert_eq!(
            (failed_now, failed_late),
            (CONCURRENCY, CONCURRENCY),
            "[{}] S18 window {window}",
            w.name
        );
        assert_eq!(
            calls(),
            (flights_now, sources_now),
            "[{}] S18 window {window}: a caller in the backoff window reached the source",
            w.name
        );
        requests += 3 * CONCURRENCY as u64;
        if window == OUTAGE_WINDOWS {
            // The endpoint comes back inside this window.
            outage += shortest.saturating_sub(Duration::from_millis(1));
            break;
        }
        // The longest jittered window is over.
        clock.advance(ceiling - shortest.saturating_sub(Duration::from_millis(1)));
        outage += ceiling;
    }
    let (flights, sources) = calls();
    let counters = w.server.counters();
    assert_eq!(counters.token_calls, sources, "[{}] S18", w.name);
    assert_eq!(counters.outage_answers, sources, "[{}] S18", w.name);
    // The bound any schedule within the defaults must keep: no window is shorter than
    // its jittered minimum, so within `outage` at most this many flights can start.
    let mut most_flights = 0u64;
    let mut spent = Duration::ZERO;
    while spent <= outage {
        most_flights += 1;
        let window = u32::try_from(most_flights).unwrap_or(u32::MAX);
        spent += ceiling(&backoff, window).mul_f64(1.0 - backoff.jitter);
    }
    assert!(
        flights <= most_flights && sources <= default_attempts() * most_flights,
        "[{}] S18: {flights} flights, {sources} token calls in {outage:?}; the default \
         backoff allows at most {most_flights} flights",
        w.name
    );

    // The endpoint is back. The window in progress still fails fast...
    w.server.set_token_outage(false);
    let (_, failed) = batch("back/in-window".into()).await;
    assert_eq!(failed, CONCURRENCY, "[{}] S18: still in the window", w.name);
    assert_eq!(calls(), (flights, sources), "[{}] S18", w.name);
    // ...and the first flight after it recovers.
    let last = ceiling(&backoff, OUTAGE_WINDOWS);
    clock.advance(
        last - last
            .mul_f64(1.0 - backoff.jitter)
            .saturating_sub(Duration::from_millis(1)),
    );
    let (results, failed) = batch("back/recovered".into()).await;
    for (i, result) in results.iter().enumerate() {
        ok_body(w.name, &format!("S18 recovered request {i}"), result);
    }
    assert_eq!(failed, 0, "[{}] S18", w.name);
    assert_eq!(
        calls(),
        (flights + 1, sources + 1),
        "[{}] S18: one flight, one call recovers",
        w.name
    );
    requests += 2 * CONCURRENCY as u64;
    println!(
        "[{}] S18: outage of {:.1} s (manual clock, {OUTAGE_WINDOWS} backoff windows), \
         {requests} requests, {sources} token calls in {flights} flights during the \
         outage (default backoff allows at most {most_flights} flights x \
         {} attempts); recovered 1 window after the endpoint came back, with 1 call",
        w.name,
        outage.as_secs_f64(),
        default_attempts(),
    );
    assert_eq!(w.server.counters().reuse_detections, 0, "[{}] S18", w.name);
}

/// The two APIs of the keyed scenarios (S19): audiences of one authorization server.
const AUDIENCES: [&str; 2] = ["orders", "billing"];

/// A keyed policy (issue 17) whose key's source is the `client_credentials` grant
/// against `server` with `audience=<the key's value>` — the key is the audience.
fn audience_policy(
    adapter: &dyn Adapter,
    server: &TestServer,
    configure: impl FnOnce(AuthPolicyBuilder<AuthPolicy>) -> AuthPolicyBuilder<AuthPolicy>,
) -> AuthPolicy {
    let transport = adapter.bare_transport();
    let (token_url, client_id, secret) = (
        server.token_url(),
        server.client_id(),
        server.client_secret(),
    );
    let builder = adapter
        .builder()
        .allowed_origin(&server.origin())
        .keyed(move |key, shared| {
            let grant = ClientCredentialsGrant::new(transport.clone(), &token_url, &client_id)?
                .client_secret(secret.clone())
                .param("audience", key.as_str());
            shared.source(grant).build()
        });
    configure(builder)
        .build()
        .unwrap_or_else(|e| panic!("[{}] building the keyed policy failed: {e}", adapter.name()))
}

/// Sends 16 requests per audience at once, interleaved, each with its audience's
/// `TokenKey` marker; expects every one answered 200.
async fn audience_round(name: &str, client: &dyn TestClient, server: &TestServer, round: usize) {
    let requests = (0..CONCURRENCY * AUDIENCES.len()).map(|i| {
        let audience = AUDIENCES[i % AUDIENCES.len()];
        client.send(
            TestRequest::get(server.audience_url(audience, &format!("round{round}/{i}")))
                .with_key(audience),
        )
    });
    for (i, result) in join_all(requests).await.iter().enumerate() {
        ok_body(name, &format!("S19 round {round}, request {i}"), result);
    }
}

/// S19 (issue 17): two audiences of one server, a keyed policy with the audience as
/// the request's `TokenKey`: a token is valid only at its own audience's API. Three
/// rounds of 16 concurrent requests per audience (the first with no token yet, the
/// others after the server expired every token): every request answered 200, not one
/// request carried the other audience's token, and each audience cost exactly one
/// token call per round (C1 per key; the 401s of one key shared one refresh, C3).
pub async fn s19_two_audiences_never_share_a_token(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig::default());
    let auth = audience_policy(adapter, &server, |b| b);
    let client = adapter.client(auth.clone());
    for round in 0..3 {
        if round > 0 {
            server.expire_all_tokens();
        }
        audience_round(name, &*client, &server, round).await;
        let counters = server.counters();
        for audience in AUDIENCES {
            assert_eq!(
                counters.issued_per_audience.get(audience).copied(),
                Some(round as u64 + 1),
                "[{name}] S19 round {round}: token calls for {audience}; wire: {}",
                wire_summary(&server.requests())
            );
        }
        assert_eq!(
            counters.cross_audience_requests,
            0,
            "[{name}] S19 round {round}: a token went to the other audience; wire: {}",
            wire_summary(&server.requests())
        );
    }
    let keyed = auth.keyed().expect("a keyed policy");
    assert_eq!(
        keyed.len(),
        AUDIENCES.len(),
        "[{name}] S19: one coordinator per key"
    );
    assert_eq!(auth.stats().source_calls, 6, "[{name}] S19: source calls");
    // Requests that went out with an expired token were rejected once and resent once
    // (C4); how many did depends on the interleaving (a later one may wait for the
    // refresh instead), never more than one per request of the two later rounds.
    let rejections = server.counters().rejections;
    assert!(
        rejections <= (2 * CONCURRENCY * AUDIENCES.len()) as u64,
        "[{name}] S19: {rejections} rejections"
    );
    assert_eq!(
        auth.stats().retries,
        rejections,
        "[{name}] S19: one resend per rejection"
    );
}

/// S20 (issue 17): the default key is the request's origin: one keyed policy in front of
/// two APIs on two servers (each accepts only its own tokens), no `TokenKey` markers.
/// Every request answered 200 on its first try, one token call per server.
pub async fn s20_keyed_by_origin_by_default(adapter: &dyn Adapter) {
    let name = adapter.name();
    let servers = [
        TestServer::start(TestServerConfig::default()),
        TestServer::start(TestServerConfig::default()),
    ];
    let transport = adapter.bare_transport();
    let grants: Vec<(String, String, String, String)> = servers
        .iter()
        .map(|s| (s.origin(), s.token_url(), s.client_id(), s.client_secret()))
        .collect();
    let auth = adapter
        .builder()
        .allowed_origin(&servers[0].origin())
        .allowed_origin(&servers[1].origin())
        .keyed(move |key, shared| {
            // The key is an origin; its token comes from that server's token endpoint.
            let (_, token_url, client_id, secret) = grants
                .iter()
                .find(|(origin, ..)| origin == key.as_str())
                .ok_or_else(|| tokenflight::ConfigError::InvalidSetting("unknown API".into()))?;
            let grant = ClientCredentialsGrant::new(transport.clone(), token_url, client_id)?
                .client_secret(secret.clone());
            shared.source(grant).build()
        })
        .build()
        .unwrap_or_else(|e| panic!("[{name}] building the keyed policy failed: {e}"));
    let client = adapter.client(auth);
    let requests = (0..CONCURRENCY * 2).map(|i| {
        client.send(TestRequest::get(
            servers[i % 2].api_url(&format!("by-origin/{i}")),
        ))
    });
    for (i, result) in join_all(requests).await.iter().enumerate() {
        ok_body(name, &format!("S20 request {i}"), result);
    }
    for (i, server) in servers.iter().enumerate() {
        let counters = server.counters();
        assert_eq!(
            counters.token_calls, 1,
            "[{name}] S20 server {i}: token calls"
        );
        assert_eq!(
            counters.rejections,
            0,
            "[{name}] S20 server {i}: a request carried the other server's token; wire: {}",
            wire_summary(&server.requests())
        );
    }
}

/// S21 (issue 17): the keyed defaults on hostile but normal conditions — S16's short
/// lifetimes and S17's flaky endpoint at once, with 100 clients over two audiences
/// (a keyed policy, the key found from the path by a key function), each starting with
/// a valid token. Per audience at most 2 issued tokens per lifetime (C15 per key), no request fails while its
/// audience had a usable token, at most 1 % fail, no token crosses audiences.
pub async fn s21_keyed_short_lifetimes_and_a_flaky_endpoint(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig {
        token_lifetime: SHORT_LIFETIME,
        ..TestServerConfig::default()
    });
    let auth = audience_policy(adapter, &server, |b| {
        b.token_key(|_, url| {
            let audience = url.path().trim_start_matches("/api/aud/");
            TokenKey::new(audience.split('/').next().unwrap_or_default())
        })
    });
    let client = adapter.client(auth.clone());
    // Each key starts with a valid token, as S17's coordinator does: the seed fails the
    // first calls on purpose, and with no token yet a key's first flight failing all
    // its attempts would fail its callers for a whole backoff window (a cold start on a
    // failing endpoint, which S18 covers), whichever key the interleaving picked.
    audience_round(name, &*client, &server, 0).await;
    server.set_token_failure_rate(FLAKY_RATE, FLAKY_SEED);
    let bases: Vec<String> = AUDIENCES
        .iter()
        .map(|a| server.audience_url(a, ""))
        .collect();
    let targets: Vec<(&str, Option<&str>)> = bases
        .iter()
        .zip(AUDIENCES)
        .map(|(base, audience)| (base.as_str(), Some(audience)))
        .collect();
    let load = run_load_on(
        &*client,
        &targets,
        LOAD_CLIENTS,
        load_duration(),
        Some((&server, default_leeway(SHORT_LIFETIME))),
    )
    .await;
    let counters = server.counters();
    let lifetimes = lifetimes_in(Duration::from_secs_f64(load.elapsed_s));
    let failed_share = load.not_ok() as f64 / load.requests.max(1) as f64;
    println!(
        "[{name}] S21: {LOAD_CLIENTS} clients over {} audiences, {:.1} s = {lifetimes} \
         lifetimes, {} requests, {} failed ({:.3} %), {} with a usable token; tokens issued \
         per audience {:?}, {} token calls, {} failed at random",
        AUDIENCES.len(),
        load.elapsed_s,
        load.requests,
        load.not_ok(),
        failed_share * 100.0,
        load.failed_with_usable_token,
        counters.issued_per_audience,
        counters.token_calls,
        counters.random_failures,
    );
    assert!(counters.random_failures > 0, "[{name}] S21: nothing failed");
    assert_eq!(
        load.failed_with_usable_token, 0,
        "[{name}] S21: requests failed while their audience had a usable token: {:?}",
        load.first_failures
    );
    assert!(
        failed_share <= FLAKY_MAX_FAILED,
        "[{name}] S21: {} of {} requests failed: {:?}",
        load.not_ok(),
        load.requests,
        load.first_failures
    );
    for audience in AUDIENCES {
        let issued = counters
            .issued_per_audience
            .get(audience)
            .copied()
            .unwrap_or(0);
        // The first token (before the load) plus at most 2 per lifetime (C15).
        assert!(
            (2..=1 + 2 * lifetimes).contains(&issued),
            "[{name}] S21: {issued} tokens for {audience} in {lifetimes} lifetimes"
        );
    }
    assert_eq!(counters.cross_audience_requests, 0, "[{name}] S21");
    assert_eq!(counters.reuse_detections, 0, "[{name}] S21");
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
            c11_a_skipped_route_goes_without_a_token,
            s11_token_only_reaches_allowed_origin,
            s12_query_parameter_placement,
            s13_business_code_classification,
            s14_rotation_uses_newest_refresh_token,
            s15_token_endpoint_hangs_then_recovers,
            c12_query_placement_keeps_the_callers_query_byte_for_byte,
            c12_query_token_never_in_errors,
            c12_query_token_never_in_a_referer,
            c4_a_401_from_an_origin_the_token_never_reached_is_not_a_rejection,
            c4_a_body_classifier_does_not_hold_back_a_stream,

            s16_short_lifetimes_cost_at_most_two_calls_per_lifetime,
            s17_flaky_token_endpoint_is_invisible,
            s18_outage_follows_the_backoff_then_recovers,
            s19_two_audiences_never_share_a_token,
            s20_keyed_by_origin_by_default,
            s21_keyed_short_lifetimes_and_a_flaky_endpoint,
        );
        $crate::conformance_tests!(
            @processes $runtime, $adapter;
            s16_short_lifetimes_across_processes_sharing_a_file_store,
        );
        $crate::conformance_tests!(
            @dpop $runtime, $adapter;
            d1_a_nonce_storm_costs_no_error_no_refresh_and_one_resend_at_most,
            d2_a_token_endpoint_nonce_demand_costs_no_refresh_token,
            d3_a_stolen_token_is_refused_without_its_key,
            d4_a_nonce_resend_carries_the_same_body_and_a_new_proof,
        );
    };
    // The DPoP scenarios (RFC 9449), against the DPoP testkit.
    (@dpop $runtime:meta, $adapter:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[$runtime]
            async fn $scenario() {
                let adapter = $adapter;
                $crate::conformance::dpop::$scenario(&adapter).await;
            }
        )+
    };
    // Scenarios that start this test binary again as worker processes: they are told
    // their own test name, to run only themselves there.
    (@processes $runtime:meta, $adapter:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[$runtime]
            async fn $scenario() {
                let adapter = $adapter;
                let name = $crate::conformance::test_name(module_path!(), stringify!($scenario));
                $crate::conformance::$scenario(&adapter, &name).await;
            }
        )+
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

/// The fail-fast backoff after `failures` consecutive failed flights, before jitter, as
/// `Backoff`'s docs state it: `min(max, initial * 2^(failures - 1))`.
fn ceiling(backoff: &Backoff, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    backoff
        .initial
        .saturating_mul(1u32 << exponent)
        .min(backoff.max)
}
