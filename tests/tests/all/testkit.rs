//! The testkit server's own tests, through a plain HTTP client (reqwest, no auth layer).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::Value;
use tokenflight_tests::testkit::{Failure, TestServer, TestServerConfig};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

async fn refresh(
    server: &TestServer,
    refresh_token: &str,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let response = client()
        .post(server.token_url())
        .basic_auth(server.client_id(), Some(server.client_secret()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap()
}

async fn get_with(server: &TestServer, token: &str) -> reqwest::Response {
    client()
        .get(server.api_url("items"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn refresh_grant_rotates_and_answers_rfc6749_json() {
    let server = TestServer::start(TestServerConfig::default());
    let first = server.issue_refresh_token();
    let (status, headers, body) = refresh(&server, &first).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "no-store");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body = json(&body);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let access = body["access_token"].as_str().unwrap();
    let second = body["refresh_token"].as_str().unwrap();
    assert_ne!(second, first, "every refresh returns a new refresh token");

    let response = get_with(&server, access).await;
    assert_eq!(response.status(), StatusCode::OK);

    // The rotated token works once more and rotates again.
    let (status, _, body) = refresh(&server, second).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(json(&body)["refresh_token"].as_str().unwrap(), second);

    let counters = server.counters();
    assert_eq!(counters.token_calls, 2);
    assert_eq!(counters.refresh_token_calls, 2);
    assert_eq!(counters.client_credentials_calls, 0);
    assert_eq!(counters.tokens_issued, 2);
    assert_eq!(counters.reuse_detections, 0);
    assert_eq!(counters.requests_with(access), 1);
}

#[tokio::test]
async fn reusing_a_spent_refresh_token_revokes_the_family() {
    let server = TestServer::start(TestServerConfig::default());
    let first = server.issue_refresh_token();
    let (_, _, body) = refresh(&server, &first).await;
    let body = json(&body);
    let access = body["access_token"].as_str().unwrap().to_owned();
    let second = body["refresh_token"].as_str().unwrap().to_owned();

    let (status, _, body) = refresh(&server, &first).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json(&body)["error"], "invalid_grant");
    assert!(
        !body.contains(&first),
        "the token presented is never echoed"
    );
    assert_eq!(server.counters().reuse_detections, 1);

    // The whole family is gone: the newest refresh token and its access token too.
    let (status, _, body) = refresh(&server, &second).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json(&body)["error"], "invalid_grant");
    assert_eq!(
        get_with(&server, &access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Another family is unaffected.
    let (status, _, _) = refresh(&server, &server.issue_refresh_token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.counters().reuse_detections, 1);
}

#[tokio::test]
async fn client_credentials_with_form_authentication() {
    let server = TestServer::start(TestServerConfig::default());
    let response = client()
        .post(server.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &server.client_id()),
            ("client_secret", &server.client_secret()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(&response.text().await.unwrap());
    assert!(
        body.get("refresh_token").is_none(),
        "RFC 6749 §4.4.3: no refresh token"
    );
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(get_with(&server, access).await.status(), StatusCode::OK);
    let counters = server.counters();
    assert_eq!(counters.client_credentials_calls, 1);
    assert_eq!(counters.refresh_token_calls, 0);
}

#[tokio::test]
async fn client_authentication_errors_are_rfc6749_and_never_echo_secrets() {
    let server = TestServer::start(TestServerConfig::default());
    let wrong = "wrong-secret-value";
    for request in [
        client()
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(wrong))
            .form(&[("grant_type", "client_credentials")]),
        client().post(server.token_url()).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &server.client_id()),
            ("client_secret", wrong),
        ]),
        client()
            .post(server.token_url())
            .form(&[("grant_type", "client_credentials")]),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key("www-authenticate"));
        let body = response.text().await.unwrap();
        assert_eq!(json(&body)["error"], "invalid_client");
        assert!(!body.contains(wrong));
    }

    let send = |form: Vec<(&'static str, &'static str)>| {
        client()
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&form)
            .send()
    };
    for (form, error) in [
        (vec![("grant_type", "password")], "unsupported_grant_type"),
        (vec![("scope", "x")], "invalid_request"),
        (vec![("grant_type", "refresh_token")], "invalid_request"),
        (
            vec![("grant_type", "refresh_token"), ("refresh_token", "nope")],
            "invalid_grant",
        ),
    ] {
        let response = send(form).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(&response.text().await.unwrap())["error"], error);
    }
    assert_eq!(server.counters().token_errors, 7);
    assert_eq!(server.counters().tokens_issued, 0);
}

#[tokio::test]
async fn resources_echo_bodies_byte_for_byte_and_reject_bad_tokens() {
    let server = TestServer::start(TestServerConfig::default());
    let (access, expires_in) = server.issue_access_token();
    assert_eq!(expires_in, 3600);
    let body: Vec<u8> = (0..=255u8).chain(b"\r\n{}".iter().copied()).collect();
    for method in [reqwest::Method::POST, reqwest::Method::PUT] {
        let response = client()
            .request(method.clone(), server.api_url("/orders/7"))
            .bearer_auth(&access)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-echo-method"], method.as_str());
        assert_eq!(response.headers()["x-echo-path"], "/api/orders/7");
        assert_eq!(response.bytes().await.unwrap().as_ref(), body.as_slice());
    }

    let response = get_with(&server, "not-a-token").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let response = client().get(server.api_url("x")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");

    let counters = server.counters();
    assert_eq!(counters.resource_calls, 4);
    assert_eq!(counters.rejections, 2);
    assert_eq!(counters.requests_with(&access), 2);
    assert_eq!(counters.requests_with("not-a-token"), 1);
    let recorded = server.requests();
    assert_eq!(recorded.len(), 4);
    assert_eq!(recorded[0].body, body);
    assert_eq!(recorded[1].method, "PUT");
    assert!(recorded[1].accepted && !recorded[2].accepted);
    assert_eq!(recorded[3].token, None);
}

#[tokio::test]
async fn expire_all_tokens_and_lifetimes() {
    let server = TestServer::start(TestServerConfig::default());
    let (old, _) = server.issue_access_token();
    assert_eq!(get_with(&server, &old).await.status(), StatusCode::OK);
    server.expire_all_tokens();
    assert_eq!(
        get_with(&server, &old).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (new, _) = server.issue_access_token();
    assert_eq!(get_with(&server, &new).await.status(), StatusCode::OK);

    // Real-time expiry: a zero lifetime is expired on arrival.
    server.set_token_lifetime(Duration::ZERO);
    let (dead, expires_in) = server.issue_access_token();
    assert_eq!(expires_in, 0);
    assert_eq!(
        get_with(&server, &dead).await.status(),
        StatusCode::UNAUTHORIZED
    );
    server.set_token_lifetime(Duration::from_secs(5));
    let (_, _, body) = refresh(&server, &server.issue_refresh_token()).await;
    assert_eq!(json(&body)["expires_in"], 5);
}

#[tokio::test]
async fn business_code_mode_answers_200_with_code_401() {
    let server = TestServer::start(TestServerConfig {
        business_code: true,
        ..TestServerConfig::default()
    });
    let response = get_with(&server, "stale").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(&response.text().await.unwrap())["code"], 401);
    assert_eq!(server.counters().rejections, 1);
    let (access, _) = server.issue_access_token();
    let response = client()
        .post(server.api_url("x"))
        .bearer_auth(&access)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "payload");
}

#[tokio::test]
async fn query_mode_takes_the_token_from_the_query_only() {
    let server = TestServer::start(TestServerConfig::default());
    server.set_query_token(true);
    let (access, _) = server.issue_access_token();
    let response = client()
        .get(server.api_url("x"))
        .query(&[("token", &access)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        get_with(&server, &access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(server.counters().requests_with(&access), 1);
}

#[tokio::test]
async fn redirect_and_the_other_origin_records_credentials() {
    let server = TestServer::start(TestServerConfig::default());
    let other = TestServer::start(TestServerConfig::other_origin());
    assert_ne!(server.origin(), other.origin());
    let target = format!("{}?a=1&b=2", other.api_url("landing"));
    let response = client()
        .get(server.redirect_url(&target))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()["location"], target.as_str());
    assert_eq!(server.counters().redirects, 1);

    // The other origin is open and records whether credentials reached it.
    let response = client().get(&target).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(other.counters().credentialed_requests, 0);
    client()
        .get(other.api_url("x"))
        .bearer_auth("leaked")
        .send()
        .await
        .unwrap();
    client()
        .get(other.api_url("x"))
        .query(&[("token", "leaked")])
        .send()
        .await
        .unwrap();
    let counters = other.counters();
    assert_eq!(counters.credentialed_requests, 2);
    assert_eq!(counters.other_requests, 3);
    // The token endpoint's Basic authentication is not counted as leaked credentials.
    refresh(&server, &server.issue_refresh_token()).await;
    assert_eq!(server.counters().credentialed_requests, 0);
}

#[tokio::test]
async fn injected_failures_apply_to_the_next_calls_in_order() {
    let server = TestServer::start(TestServerConfig::default());
    let refresh_token = server.issue_refresh_token();
    server.fail_next_token_calls(1, Failure::Status500);
    server.fail_next_token_calls(
        1,
        Failure::TooMany {
            retry_after_secs: 7,
        },
    );
    server.fail_next_token_calls(1, Failure::InvalidGrant);
    server.fail_next_token_calls(1, Failure::MalformedJson);

    let (status, _, body) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(json(&body)["error"], "server_error");
    let (status, headers, _) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "7");
    let (status, _, body) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json(&body)["error"], "invalid_grant");
    let (status, _, body) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&body).is_err());

    // Injected failures spent nothing: the refresh token still works, no reuse.
    let (status, _, _) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::OK);
    let counters = server.counters();
    assert_eq!(counters.refresh_token_calls, 5);
    assert_eq!(counters.token_errors, 4);
    assert_eq!(counters.tokens_issued, 1);
    assert_eq!(counters.reuse_detections, 0);
}

#[tokio::test]
async fn a_hanging_token_call_is_cut_off_only_when_the_server_is_dropped() {
    let server = TestServer::start(TestServerConfig::default());
    server.fail_next_token_calls(1, Failure::Hang);
    let url = server.token_url();
    let (id, secret) = (server.client_id(), server.client_secret());
    let call = tokio::spawn(async move {
        client()
            .post(url)
            .basic_auth(id, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
    });
    let counters = server.wait_for(|c| c.client_credentials_calls == 1).await;
    assert_eq!(counters.token_errors, 0);
    // A later call is not held up by the hanging one.
    let response = client()
        .post(server.token_url())
        .basic_auth(server.client_id(), Some(server.client_secret()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(server);
    let outcome = call.await.unwrap();
    assert!(
        outcome.is_err(),
        "the hanging call must never get an answer, got {outcome:?}"
    );
}

#[tokio::test]
async fn latency_knobs_delay_answers() {
    let server = TestServer::start(TestServerConfig::default());
    let latency = Duration::from_millis(200);
    server.set_token_latency(latency);
    server.set_resource_latency(latency);
    let started = Instant::now();
    let (status, _, body) = refresh(&server, &server.issue_refresh_token()).await;
    assert_eq!(status, StatusCode::OK);
    // A lower bound only: a sleep never ends early.
    assert!(started.elapsed() >= latency);
    let access = json(&body)["access_token"].as_str().unwrap().to_owned();
    let started = Instant::now();
    assert_eq!(get_with(&server, &access).await.status(), StatusCode::OK);
    assert!(started.elapsed() >= latency);
}

#[tokio::test]
async fn counters_reset_and_debug_shows_no_secrets() {
    let server = TestServer::start(TestServerConfig::default());
    let (access, _) = server.issue_access_token();
    let refresh_token = server.issue_refresh_token();
    get_with(&server, &access).await;
    assert_eq!(server.counters().resource_calls, 1);
    server.reset_counters();
    assert_eq!(server.counters(), Default::default());
    assert!(server.requests().is_empty());
    let debug = format!("{server:?}");
    for secret in [access.as_str(), refresh_token.as_str(), "testkit-secret"] {
        assert!(!debug.contains(secret), "{debug}");
    }
}

#[tokio::test]
async fn dropping_the_server_stops_it() {
    let server = TestServer::start(TestServerConfig::default());
    let url = server.api_url("x");
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    drop(server);
    assert!(client().get(&url).send().await.is_err());
}

#[test]
fn usable_without_any_async_runtime_in_the_test() {
    let server = TestServer::start(TestServerConfig::default());
    let counters = futures::executor::block_on(async {
        let refresh_token = server.issue_refresh_token();
        assert!(refresh_token.starts_with("rt"));
        server.wait_for(|c| c.token_calls == 0).await
    });
    assert_eq!(counters.token_calls, 0);
}

#[tokio::test]
async fn reject_all_refuses_even_valid_tokens() {
    let server = TestServer::start(TestServerConfig::default());
    let (access, _) = server.issue_access_token();
    server.set_reject_all(true);
    assert_eq!(
        get_with(&server, &access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    server.set_reject_all(false);
    assert_eq!(get_with(&server, &access).await.status(), StatusCode::OK);
    assert_eq!(server.counters().rejections, 1);
}

#[tokio::test]
async fn held_requests_answer_after_release_with_their_arrival_verdict() {
    let server = TestServer::start(TestServerConfig::default());
    let (old, _) = server.issue_access_token();
    server.hold_next_resource_calls(1);
    let held = get_with(&server, &old);
    let later = async {
        server.wait_for(|c| c.held_resource_calls == 1).await;
        // The held request was judged on arrival (valid); expiring now changes nothing
        // for it, while a new request with the same token is refused and not held.
        server.expire_all_tokens();
        let status = get_with(&server, &old).await.status();
        let answered_before_release = server.counters().resource_calls;
        server.release_held();
        (status, answered_before_release)
    };
    let (held, (later_status, calls)) = tokio::join!(held, later);
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(later_status, StatusCode::UNAUTHORIZED);
    assert_eq!(calls, 2);
    let recorded = server.requests();
    assert!(recorded[0].accepted && !recorded[1].accepted);
}

/// The outcome (status) of each of `n` client_credentials calls.
async fn token_statuses(server: &TestServer, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        let response = client()
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn an_outage_answers_503_until_switched_off_and_spends_nothing() {
    let server = TestServer::start(TestServerConfig::default());
    let refresh_token = server.issue_refresh_token();
    server.set_token_outage(true);
    for _ in 0..3 {
        let (status, headers, body) = refresh(&server, &refresh_token).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"], "temporarily_unavailable");
        assert_eq!(headers["cache-control"], "no-store");
    }
    // A queued failure still comes first.
    server.fail_next_token_calls(1, Failure::InvalidGrant);
    let (status, _, _) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    server.set_token_outage(false);
    let (status, _, _) = refresh(&server, &refresh_token).await;
    assert_eq!(status, StatusCode::OK, "the refresh token was not spent");
    let counters = server.counters();
    assert_eq!(counters.outage_answers, 3);
    assert_eq!(counters.token_errors, 4);
    assert_eq!(counters.tokens_issued, 1);
    assert_eq!(counters.reuse_detections, 0);
}

#[tokio::test]
async fn random_failures_follow_the_seed_call_by_call() {
    const CALLS: usize = 60;
    let one = TestServer::start(TestServerConfig::default());
    let two = TestServer::start(TestServerConfig::default());
    let other_seed = TestServer::start(TestServerConfig::default());
    one.set_token_failure_rate(0.3, 7);
    two.set_token_failure_rate(0.3, 7);
    other_seed.set_token_failure_rate(0.3, 8);
    let first = token_statuses(&one, CALLS).await;
    let second = token_statuses(&two, CALLS).await;
    let third = token_statuses(&other_seed, CALLS).await;
    assert_eq!(first, second, "same seed, same outcomes");
    assert_ne!(first, third, "another seed, other outcomes");
    assert!(first.iter().all(|s| *s == 200 || *s == 503), "{first:?}");
    let failed = first.iter().filter(|s| **s == 503).count() as u64;
    assert!(0 < failed && failed < CALLS as u64, "{first:?}");
    let counters = one.counters();
    assert_eq!(counters.random_failures, failed);
    assert_eq!(counters.tokens_issued, CALLS as u64 - failed);

    // A rate of 0 turns it off.
    one.set_token_failure_rate(0.0, 7);
    assert!(token_statuses(&one, 10).await.iter().all(|s| *s == 200));
    assert_eq!(one.counters().random_failures, failed);
}

#[tokio::test]
async fn longest_valid_life_sees_only_valid_tokens_issued_before_the_instant() {
    let lifetime = Duration::from_secs(3600);
    let server = TestServer::start(TestServerConfig {
        token_lifetime: lifetime,
        ..TestServerConfig::default()
    });
    assert_eq!(server.longest_valid_life(Instant::now()), None);
    let before_issue = Instant::now();
    server.issue_access_token();
    let after_issue = Instant::now();
    assert_eq!(server.longest_valid_life(before_issue), None);
    let life = server.longest_valid_life(after_issue).unwrap();
    assert!(life <= lifetime && life > Duration::ZERO, "{life:?}");
    server.expire_all_tokens();
    assert_eq!(server.longest_valid_life(Instant::now()), None);
}

/// Posts `client_credentials` with `assertion` as the client assertion; the status.
async fn with_assertion(server: &TestServer, assertion: &str) -> StatusCode {
    client()
        .post(server.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ])
        .send()
        .await
        .unwrap()
        .status()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn client_assertions_are_checked_for_signature_issuer_audience_expiry_and_replay() {
    use tokenflight::oauth2::SigningKey;
    use tokenflight_tests::testkit::{TEST_ES256_PEM, TEST_RS256_PEM};
    let server = TestServer::start(TestServerConfig::default());
    let registered = SigningKey::from_pem(TEST_ES256_PEM).unwrap();
    server.register_client_key(&registered);
    let other = SigningKey::from_pem(TEST_RS256_PEM).unwrap();
    let now = unix_now();
    let claims = |jti: &str, iss: &str, aud: &str, exp: u64| serde_json::json!({"iss": iss, "sub": iss, "aud": aud, "iat": now, "exp": exp, "jti": jti});
    let (id, url) = (server.client_id(), server.token_url());
    let sign = |key: &SigningKey, claims| key.sign_jwt(&claims).unwrap().expose().to_owned();
    let cases = [
        (
            sign(&registered, claims("ok", &id, &url, now + 60)),
            StatusCode::OK,
        ),
        (
            sign(&other, claims("unregistered", &id, &url, now + 60)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            sign(
                &registered,
                claims("issuer", "someone-else", &url, now + 60),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            sign(
                &registered,
                claims("audience", &id, "http://elsewhere/token", now + 60),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            sign(&registered, claims("expired", &id, &url, now - 1)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            sign(&registered, claims("too-long", &id, &url, now + 7200)),
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (i, (assertion, status)) in cases.iter().enumerate() {
        assert_eq!(
            with_assertion(&server, assertion).await,
            *status,
            "case {i}"
        );
    }
    let counters = server.counters();
    assert_eq!(counters.assertions_refused, 5);
    assert_eq!(counters.assertion_replays, 0);
    // The accepted one, again: a replay.
    assert_eq!(
        with_assertion(&server, &cases[0].0).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(server.counters().assertion_replays, 1);
}

#[tokio::test]
async fn token_exchange_takes_a_workload_token_for_an_audience() {
    let server = TestServer::start(TestServerConfig::default());
    let subject = server.issue_workload_token(Duration::from_secs(60));
    let exchange = |subject: String, audience: &'static str| {
        let url = server.token_url();
        async move {
            let response = client()
                .post(url)
                .form(&[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", subject.as_str()),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("audience", audience),
                ])
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            (status, body)
        }
    };
    let (status, body) = exchange(subject.clone(), "orders").await;
    assert_eq!(status, StatusCode::OK);
    let token = body["access_token"].as_str().unwrap().to_owned();
    let api = client()
        .get(server.audience_url("orders", "x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), StatusCode::OK);
    let (status, body) = exchange("not-a-workload-token".into(), "orders").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let refused = tokenflight_tests::testkit::REFUSED_AUDIENCE;
    let (status, body) = exchange(subject, refused).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_target"))
    );
    assert_eq!(server.counters().token_exchange_calls, 3);
}

/// The DPoP mode by hand: a refresh without a proof is refused, one without the nonce
/// is answered `use_dpop_nonce` with the nonce (and spends nothing), one with it gets a
/// `DPoP` token bound to the key; the resource takes it only with a proof by that key.
#[tokio::test]
async fn dpop_mode_checks_proofs_nonces_and_the_binding() {
    use tokenflight::dpop::DpopKey;
    let server = TestServer::start(TestServerConfig {
        dpop: true,
        ..TestServerConfig::default()
    });
    let key = DpopKey::generate().unwrap();
    let token_url = url::Url::parse(&server.token_url()).unwrap();
    let refresh_token = server.issue_refresh_token();
    let post = |proof: Option<String>| {
        let mut request = client()
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.as_str()),
            ]);
        if let Some(proof) = proof {
            request = request.header("dpop", proof);
        }
        request.send()
    };
    let no_proof = post(None).await.unwrap();
    assert_eq!(no_proof.status(), 400);
    assert!(
        no_proof
            .text()
            .await
            .unwrap()
            .contains("invalid_dpop_proof")
    );
    let proof = key
        .proof(&http::Method::POST, &token_url, None, None)
        .unwrap();
    let demand = post(Some(proof.expose().to_owned())).await.unwrap();
    assert_eq!(demand.status(), 400);
    let nonce = demand.headers()["dpop-nonce"].to_str().unwrap().to_owned();
    assert!(demand.text().await.unwrap().contains("use_dpop_nonce"));
    let proof = key
        .proof(&http::Method::POST, &token_url, None, Some(&nonce))
        .unwrap();
    let issued = post(Some(proof.expose().to_owned())).await.unwrap();
    assert_eq!(issued.status(), 200, "the demand spent no refresh token");
    let body = json(&issued.text().await.unwrap());
    assert_eq!(body["token_type"], "DPoP");
    let access = body["access_token"].as_str().unwrap().to_owned();
    let api = url::Url::parse(&server.api_url("x")).unwrap();
    let get = |proof_key: &DpopKey, scheme: &str| {
        let proof = proof_key
            .proof(&http::Method::GET, &api, Some(&access), Some(&nonce))
            .unwrap();
        client()
            .get(api.as_str())
            .header("authorization", format!("{scheme} {access}"))
            .header("dpop", proof.expose())
            .send()
    };
    assert_eq!(get(&key, "DPoP").await.unwrap().status(), 200);
    let thief = DpopKey::generate().unwrap();
    let refused = get(&thief, "DPoP").await.unwrap();
    assert_eq!(refused.status(), 401, "another key");
    assert!(
        refused.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(
        get(&key, "Bearer").await.unwrap().status(),
        401,
        "as a bearer token"
    );
    let counters = server.counters();
    assert_eq!(counters.dpop_nonce_demands, 1);
    assert_eq!(counters.dpop_refused, 2, "no proof, then the thief's key");
    assert_eq!(counters.reuse_detections, 0);
}
