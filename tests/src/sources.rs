//! The token sources for services — a rotating token file, token exchange (RFC 8693),
//! `private_key_jwt` and the JWT bearer grant (RFC 7523) — through every adapter against
//! the testkit. An adapter gets one test per scenario from
//! [`source_tests!`](crate::source_tests) with the same [`Adapter`] it runs the
//! conformance suite with:
//!
//! ```ignore
//! tokenflight_tests::source_tests!(tokio::test(flavor = "current_thread"), ReqwestAdapter);
//! ```
//!
//! | scenario | what the wire must show |
//! |---|---|
//! | [`w1_a_rotating_token_file_costs_no_caller_error_and_one_read_per_rotation`] | a file rotated every 2 s (kubelet's symlink swap) under 100 clients: 0 caller errors, at most 2 reads per rotation, looks at the file far fewer than requests |
//! | [`w2_a_file_missing_mid_rotation_costs_no_caller_error`] | the file removed for a moment while a refresh reads it (a writer's rename dance): the refresh retries, no caller error |
//! | [`w3_exchange_for_three_audiences_under_a_storm`] | 3 audiences, a storm per round: one exchange per audience per token lifetime, one subject read in all, assertions never replayed |
//! | [`w4_a_client_assertion_is_never_sent_twice_even_on_a_retried_attempt`] | `private_key_jwt` (RS256, ES256) with failing attempts: every attempt a new `jti`; a replayed assertion is refused |
//! | [`w5_jwt_bearer_grant_signs_a_new_assertion_per_attempt`] | the JWT bearer grant: a new assertion per attempt; a wrong `aud` is refused |
//! | [`w6_token_exchange_errors_follow_rfc_8693`] | `invalid_target` needs a new login; a refused subject is retried with a newer one |
//! | [`w7_a_rotating_subject_under_load_costs_no_caller_error`] | W1's file as the subject of an exchange (2 s tokens) under 100 clients: 0 caller errors, ≤ 2 reads per version, ≤ 2 exchanges per lifetime |

// Test support: a panic is how a scenario reports a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, join_all};
use tokenflight::oauth2::{
    ClientCredentialsGrant, JwtBearerGrant, RefreshTokenGrant, SigningKey, TokenExchangeGrant,
    token_type,
};
use tokenflight::sources::FileTokenSource;
use tokenflight::{RefreshContext, RefreshError, SingleFlight, Token, TokenSource};

use crate::conformance::{Adapter, TestRequest, ok_body, run_load};
use crate::testkit::{
    Failure, REFUSED_AUDIENCE, Rotation, TEST_ES256_PEM, TEST_RS256_PEM, TestServer,
    TestServerConfig,
};

/// W1, W2: the platform rotates the file this often…
const ROTATE_EVERY: Duration = Duration::from_secs(2);
/// …with tokens living this long (kubelet rotates at 80 % of a token's life at the
/// latest; here at half of it).
const FILE_TOKEN_LIFETIME: Duration = Duration::from_secs(4);
/// W1: rotations the load spans.
const ROTATIONS: u32 = 5;
/// W1: concurrent clients.
const CLIENTS: usize = 100;

fn key(pem: &str) -> SigningKey {
    SigningKey::from_pem(pem).unwrap()
}

/// W1: a projected token file rotated every 2 s by kubelet's symlink swap, used as the
/// bearer token by 100 clients for 5 rotations: no caller error, the file read at most
/// twice per rotation (once, in fact, per version a refresh saw), and looked at (its
/// metadata) only at refresh time — far fewer times than requests.
pub async fn w1_a_rotating_token_file_costs_no_caller_error_and_one_read_per_rotation(
    adapter: &dyn Adapter,
) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig::default());
    let file = server.rotating_token_file(ROTATE_EVERY, FILE_TOKEN_LIFETIME, Rotation::Kubelet);
    let source = Arc::new(FileTokenSource::new(file.path()));
    let auth = adapter
        .builder()
        .source(source.clone())
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    let load = run_load(
        &*client,
        &server.api_url(""),
        CLIENTS,
        ROTATE_EVERY * ROTATIONS + ROTATE_EVERY / 2,
        None,
    )
    .await;
    let rotations = file.rotations();
    let versions = rotations + 1;
    println!(
        "[{name}] W1: {} requests in {:.1} s, {rotations} rotations, {} reads, {} looks, \
         {} source calls, {} 401s on the wire",
        load.requests,
        load.elapsed_s,
        source.reads(),
        source.checks(),
        auth.stats().source_calls,
        server.counters().rejections,
    );
    assert_eq!(
        load.failed + load.unauthorized,
        0,
        "[{name}] W1: {:?}",
        load.first_failures
    );
    assert!(
        rotations >= u64::from(ROTATIONS) - 1,
        "[{name}] W1: the file rotated {rotations} times"
    );
    assert!(
        source.reads() <= 2 * versions,
        "[{name}] W1: {} reads for {versions} versions of the file",
        source.reads()
    );
    assert!(
        source.reads() >= 2,
        "[{name}] W1: rotations were never picked up"
    );
    // Each look is one coordinator refresh; a look per request would make these equal.
    assert_eq!(source.checks(), auth.stats().source_calls, "[{name}] W1");
    assert!(
        source.checks() * 20 < load.requests,
        "[{name}] W1: {} looks at the file for {} requests",
        source.checks(),
        load.requests
    );
}

/// W7: W1's rotating file as the subject of a token exchange whose tokens live 2 s, 100
/// clients for 5 rotations: no caller error, the file read at most twice per version,
/// the subject refreshed through its own coordinator (not per exchange), and at most
/// two exchanges per exchanged-token lifetime (C15), never one per request.
pub async fn w7_a_rotating_subject_under_load_costs_no_caller_error(adapter: &dyn Adapter) {
    let name = adapter.name();
    let lifetime = Duration::from_secs(2);
    let server = TestServer::start(TestServerConfig {
        token_lifetime: lifetime,
        ..TestServerConfig::default()
    });
    let file = server.rotating_token_file(ROTATE_EVERY, FILE_TOKEN_LIFETIME, Rotation::Kubelet);
    let file_source = Arc::new(FileTokenSource::new(file.path()));
    let subject = Arc::new(
        SingleFlight::builder()
            .source(file_source.clone())
            .build()
            .unwrap(),
    );
    let grant = TokenExchangeGrant::new(
        adapter.bare_transport(),
        &server.token_url(),
        subject.clone(),
    )
    .unwrap()
    .subject_token_type(token_type::JWT);
    let auth = adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    let duration = ROTATE_EVERY * ROTATIONS + ROTATE_EVERY / 2;
    let load = run_load(&*client, &server.api_url(""), CLIENTS, duration, None).await;
    let counters = server.counters();
    let versions = file.rotations() + 1;
    let lifetimes = (load.elapsed_s / lifetime.as_secs_f64()).ceil() as u64;
    println!(
        "[{name}] W7: {} requests in {:.1} s, {} rotations, {} reads, {} subject refreshes, \
         {} exchanges ({lifetimes} exchanged-token lifetimes)",
        load.requests,
        load.elapsed_s,
        file.rotations(),
        file_source.reads(),
        subject.stats().source_calls,
        counters.token_exchange_calls,
    );
    assert_eq!(
        load.failed + load.unauthorized,
        0,
        "[{name}] W7: {:?}",
        load.first_failures
    );
    assert!(
        file_source.reads() <= 2 * versions,
        "[{name}] W7: {} reads",
        file_source.reads()
    );
    assert!(
        file_source.reads() >= 2,
        "[{name}] W7: rotations were never picked up"
    );
    assert!(
        subject.stats().source_calls < counters.token_exchange_calls,
        "[{name}] W7: the subject was refreshed per exchange"
    );
    assert!(
        counters.token_exchange_calls <= 2 * lifetimes,
        "[{name}] W7: {} exchanges in {lifetimes} lifetimes",
        counters.token_exchange_calls
    );
    assert_eq!(
        counters.token_errors, 0,
        "[{name}] W7: an exchange was refused"
    );
}

/// Removes the file when the coordinator asks for its `nth` token, and puts a new one
/// in place by rename `absent` later: a refresh that is sure to meet the gap.
struct RemovedMidRefresh {
    file: Arc<FileTokenSource>,
    server: Arc<TestServer>,
    nth: u64,
    absent: Duration,
    calls: AtomicU64,
}

impl TokenSource for RemovedMidRefresh {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.nth {
            let path = self.file.path().to_owned();
            std::fs::remove_file(&path).unwrap();
            // The new file's token outlasts the load: nothing rotates it again, so with
            // a short life the scenario would end in a real expiry whenever this refresh
            // came early (a slow start puts the first token in its refresh-ahead window
            // at once), which is not what W2 is about.
            let next = self.server.issue_workload_token(Duration::from_secs(3600));
            let absent = self.absent;
            std::thread::spawn(move || {
                // The platform's own pace, not a synchronisation of the test.
                std::thread::sleep(absent);
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, next).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            });
        }
        self.file.fetch(cx)
    }
}

/// W2: the rename dance of a writer that removes the file before renaming the new one
/// in, met by a refresh (the coordinator's second token): the refresh finds the file
/// missing and keeps the still-valid token it read last, the next refresh reads the new
/// file, and no caller sees an error.
pub async fn w2_a_file_missing_mid_rotation_costs_no_caller_error(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = Arc::new(TestServer::start(TestServerConfig::default()));
    // Written once; the source below rotates it itself, at a known moment.
    let file = server.rotating_token_file(
        Duration::from_secs(3600),
        FILE_TOKEN_LIFETIME,
        Rotation::Rename,
    );
    let source = Arc::new(RemovedMidRefresh {
        file: Arc::new(FileTokenSource::new(file.path())),
        server: server.clone(),
        nth: 2,
        absent: Duration::from_millis(150),
        calls: AtomicU64::new(0),
    });
    let auth = adapter
        .builder()
        .source(source.clone())
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    let load = run_load(
        &*client,
        &server.api_url(""),
        20,
        Duration::from_secs(5),
        None,
    )
    .await;
    let missing = source.file.missing();
    println!(
        "[{name}] W2: {} requests, the file missing for {missing} attempts, {} reads",
        load.requests,
        source.file.reads()
    );
    assert!(missing >= 1, "[{name}] W2: no refresh met the missing file");
    assert_eq!(
        load.failed + load.unauthorized,
        0,
        "[{name}] W2: {:?}",
        load.first_failures
    );
    assert!(
        source.file.reads() >= 2,
        "[{name}] W2: the new file was never read"
    );
}

/// W3's audiences.
const AUDIENCES: [&str; 3] = ["orders", "billing", "search"];

/// W3: a keyed policy, one token exchange per audience (the key), every key's subject
/// the same coordinator over a token file; the client authenticates with
/// `private_key_jwt`. Three rounds, each one token lifetime (the server expires every
/// exchanged token between them), each a storm of 16 concurrent requests per audience:
/// every request answered 200, exactly one exchange per audience per round, the
/// subject file read once in all, and no assertion ever replayed.
pub async fn w3_exchange_for_three_audiences_under_a_storm(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig::default());
    let signing = key(TEST_ES256_PEM);
    server.register_client_key(&signing);
    let file = server.rotating_token_file(
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        Rotation::Kubelet,
    );
    let file_source = Arc::new(FileTokenSource::new(file.path()));
    let subject = Arc::new(
        SingleFlight::builder()
            .source(file_source.clone())
            .build()
            .unwrap(),
    );
    let transport = adapter.bare_transport();
    let (token_url, client_id) = (server.token_url(), server.client_id());
    let shared_subject = subject.clone();
    let auth = adapter
        .builder()
        .allowed_origin(&server.origin())
        .keyed(move |key, shared| {
            let grant =
                TokenExchangeGrant::new(transport.clone(), &token_url, shared_subject.clone())?
                    .subject_token_type(token_type::JWT)
                    .requested_token_type(token_type::ACCESS_TOKEN)
                    .audience(key.as_str())
                    .client_id(&client_id)
                    .private_key_jwt(signing.clone());
            shared.source(grant).build()
        })
        .build()
        .unwrap();
    let client = adapter.client(auth.clone());
    for round in 0..3u64 {
        if round > 0 {
            server.expire_all_tokens();
        }
        let requests = (0..16 * AUDIENCES.len()).map(|i| {
            let audience = AUDIENCES[i % AUDIENCES.len()];
            client.send(
                TestRequest::get(server.audience_url(audience, &format!("w3/{round}/{i}")))
                    .with_key(audience),
            )
        });
        for (i, result) in join_all(requests).await.iter().enumerate() {
            ok_body(name, &format!("W3 round {round}, request {i}"), result);
        }
        let counters = server.counters();
        for audience in AUDIENCES {
            assert_eq!(
                counters.issued_for(audience),
                round + 1,
                "[{name}] W3 round {round}: exchanges for {audience}"
            );
        }
        assert_eq!(
            counters.token_exchange_calls,
            3 * (round + 1),
            "[{name}] W3 round {round}"
        );
        assert_eq!(
            counters.cross_audience_requests, 0,
            "[{name}] W3 round {round}"
        );
    }
    let counters = server.counters();
    assert_eq!(file_source.reads(), 1, "[{name}] W3: subject reads");
    assert_eq!(
        subject.stats().source_calls,
        1,
        "[{name}] W3: subject refreshes"
    );
    assert_eq!(
        counters.assertions_seen, counters.token_exchange_calls,
        "[{name}] W3"
    );
    assert_eq!(counters.assertion_replays, 0, "[{name}] W3");
    assert_eq!(counters.assertions_refused, 0, "[{name}] W3");
}

/// W4: `private_key_jwt` with RS256 (client_credentials) and ES256 (refresh_token), the
/// first two attempts of each flight answered 500: the flight retries (C16), every
/// attempt carries a new assertion (the server records each `jti` on arrival, also
/// those it answered with a failure), none is a replay, and the request succeeds. Then
/// an assertion sent twice by hand: the second is refused with `invalid_client`.
pub async fn w4_a_client_assertion_is_never_sent_twice_even_on_a_retried_attempt(
    adapter: &dyn Adapter,
) {
    let name = adapter.name();
    for (pem, refresh) in [(TEST_RS256_PEM, false), (TEST_ES256_PEM, true)] {
        let server = TestServer::start(TestServerConfig::default());
        let signing = key(pem);
        server.register_client_key(&signing);
        let transport = adapter.bare_transport();
        let source: Box<dyn TokenSource> = if refresh {
            Box::new(
                RefreshTokenGrant::new(transport, &server.token_url(), &server.client_id())
                    .unwrap()
                    .private_key_jwt(signing.clone())
                    .initial_refresh_token(server.issue_refresh_token()),
            )
        } else {
            Box::new(
                ClientCredentialsGrant::new(transport, &server.token_url(), &server.client_id())
                    .unwrap()
                    .private_key_jwt(signing.clone()),
            )
        };
        let auth = adapter
            .builder()
            .source(Arc::<dyn TokenSource>::from(source))
            .allowed_origin(&server.origin())
            .build()
            .unwrap();
        let client = adapter.client(auth.clone());
        server.fail_next_token_calls(2, Failure::Status500);
        let alg = signing.algorithm().as_str();
        ok_body(
            name,
            &format!("W4 {alg}"),
            &client.send(TestRequest::get(server.api_url("w4"))).await,
        );
        let counters = server.counters();
        assert_eq!(counters.token_calls, 3, "[{name}] W4 {alg}: attempts");
        assert_eq!(counters.assertions_seen, 3, "[{name}] W4 {alg}");
        assert_eq!(
            counters.assertion_replays, 0,
            "[{name}] W4 {alg}: a jti was sent twice"
        );
        assert_eq!(counters.assertions_refused, 0, "[{name}] W4 {alg}");
    }

    // The testkit refuses a replay: one assertion, sent twice.
    let server = TestServer::start(TestServerConfig::default());
    let signing = key(TEST_ES256_PEM);
    server.register_client_key(&signing);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let assertion = signing
        .sign_jwt(&serde_json::json!({
            "iss": server.client_id(), "sub": server.client_id(), "aud": server.token_url(),
            "iat": now, "exp": now + 60, "jti": "the-same-jti",
        }))
        .unwrap();
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", assertion.expose())
        .finish();
    let transport = adapter.bare_transport();
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let request = http::Request::post(server.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(bytes::Bytes::from(body.clone()))
            .unwrap();
        let response = transport.send(request, 64 * 1024).await.unwrap();
        statuses.push((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body()).into_owned(),
        ));
    }
    assert_eq!(
        statuses[0].0, 200,
        "[{name}] W4: the first use of an assertion"
    );
    assert_eq!(
        statuses[1].0, 401,
        "[{name}] W4: the replay: {:?}",
        statuses[1]
    );
    assert!(
        statuses[1].1.contains("invalid_client"),
        "[{name}] W4: {:?}",
        statuses[1]
    );
    assert_eq!(server.counters().assertion_replays, 1, "[{name}] W4");
}

/// W5: the JWT bearer grant (RFC 7523 §2.1): the first attempt answered 503, the retry
/// carries a new assertion and succeeds; an assertion for another audience is refused
/// (`invalid_grant`, a caller error that names it).
pub async fn w5_jwt_bearer_grant_signs_a_new_assertion_per_attempt(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig::default());
    let signing = key(TEST_RS256_PEM).with_key_id("testkit-key");
    server.register_client_key(&signing);
    let grant = JwtBearerGrant::new(
        adapter.bare_transport(),
        &server.token_url(),
        signing.clone(),
        &server.client_id(),
    )
    .unwrap()
    .claim("scope", "read");
    let auth = adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    server.fail_next_token_calls(1, Failure::Unavailable);
    ok_body(
        name,
        "W5",
        &adapter
            .client(auth)
            .send(TestRequest::get(server.api_url("w5")))
            .await,
    );
    let counters = server.counters();
    assert_eq!(counters.jwt_bearer_calls, 2, "[{name}] W5");
    assert_eq!(counters.assertion_replays, 0, "[{name}] W5");

    let elsewhere = JwtBearerGrant::new(
        adapter.bare_transport(),
        &server.token_url(),
        signing,
        &server.client_id(),
    )
    .unwrap()
    .audience("https://elsewhere.invalid/token");
    let auth = adapter
        .builder()
        .source(elsewhere)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let refused = adapter
        .client(auth)
        .send(TestRequest::get(server.api_url("w5b")))
        .await;
    let error = refused.expect_err("an assertion for another audience must be refused");
    assert!(error.contains("invalid_grant"), "[{name}] W5: {error}");
    assert_eq!(server.counters().assertions_refused, 1, "[{name}] W5");
}

/// W6: errors of token exchange (RFC 8693 §2.2.2): `invalid_target` is permanent (the
/// caller's error says a new login is needed); a subject the server refuses
/// (`invalid_grant`: here a subject the server never issued, then a valid one) is
/// transient, and the exchange recovers when the subject does.
pub async fn w6_token_exchange_errors_follow_rfc_8693(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = TestServer::start(TestServerConfig::default());
    let file = server.rotating_token_file(
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        Rotation::Rename,
    );
    let subject = Arc::new(
        SingleFlight::builder()
            .source(FileTokenSource::new(file.path()))
            .build()
            .unwrap(),
    );
    let grant = TokenExchangeGrant::new(
        adapter.bare_transport(),
        &server.token_url(),
        subject.clone(),
    )
    .unwrap()
    .audience(REFUSED_AUDIENCE);
    let auth = adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = adapter.client(auth);
    let error = client
        .send(TestRequest::get(server.api_url("w6")))
        .await
        .expect_err("invalid_target");
    assert!(error.contains("invalid_target"), "[{name}] W6: {error}");
    let again = client
        .send(TestRequest::get(server.api_url("w6")))
        .await
        .expect_err("still lost");
    assert!(
        again.contains("re-authentication required"),
        "[{name}] W6: {again}"
    );
    assert_eq!(
        server.counters().token_exchange_calls,
        1,
        "[{name}] W6: a permanent error is not retried"
    );

    // A subject the server never issued: refused, retried inside the flight, then the
    // caller sees a transient error; once the file holds a good token, it works.
    let path = file.dir().join("foreign");
    std::fs::write(&path, "not-issued-here").unwrap();
    let foreign = Arc::new(
        SingleFlight::builder()
            .source(FileTokenSource::new(&path).lifetime(Duration::from_secs(3600)))
            .build()
            .unwrap(),
    );
    let grant = TokenExchangeGrant::new(adapter.bare_transport(), &server.token_url(), foreign)
        .unwrap()
        .audience("orders");
    let auth = adapter
        .builder()
        .source(grant)
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = adapter.client(auth);
    let error = client
        .send(TestRequest::get(server.audience_url("orders", "w6")))
        .await
        .expect_err("invalid_grant");
    assert!(
        error.contains("invalid_grant") && !error.contains("re-authentication"),
        "[{name}] W6: {error}"
    );
    assert!(
        !error.contains("not-issued-here"),
        "[{name}] W6: the subject token leaked: {error}"
    );
}

/// One test per scenario for an adapter; see the [module](self) docs.
#[macro_export]
macro_rules! source_tests {
    ($runtime:meta, $adapter:expr $(,)?) => {
        $crate::source_tests!(
            @each $runtime, $adapter;
            w1_a_rotating_token_file_costs_no_caller_error_and_one_read_per_rotation,
            w2_a_file_missing_mid_rotation_costs_no_caller_error,
            w3_exchange_for_three_audiences_under_a_storm,
            w4_a_client_assertion_is_never_sent_twice_even_on_a_retried_attempt,
            w5_jwt_bearer_grant_signs_a_new_assertion_per_attempt,
            w6_token_exchange_errors_follow_rfc_8693,
            w7_a_rotating_subject_under_load_costs_no_caller_error,
        );
    };
    (@each $runtime:meta, $adapter:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[$runtime]
            async fn $scenario() {
                let adapter = $adapter;
                $crate::sources::$scenario(&adapter).await;
            }
        )+
    };
}
