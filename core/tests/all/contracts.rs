//! The coordinator's contracts (C1–C12), each test named after the contract it checks.
//! Every scenario is a plain async fn without runtime; `contract_tests!` runs each one
//! under `futures::executor`, tokio, async-std and smol (C14).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use crate::support::*;
use futures::FutureExt;
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, Classifier, Error, FlightBuilder, Placement, RefreshReason,
    SingleFlight, Token, adapter::RequestOptions, config::Backoff, test_util::ManualClock,
};

const LONG: Duration = Duration::from_secs(3600);

fn builder(clock: &ManualClock, source: &Arc<ScriptedSource>) -> FlightBuilder {
    SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(Backoff::none())
        .retry(tokenflight::config::Retry::none())
        .refresh_ahead(None)
}

fn flight(clock: &ManualClock, source: &Arc<ScriptedSource>) -> SingleFlight {
    builder(clock, source).build().unwrap()
}

fn authenticator(clock: &ManualClock, source: &Arc<ScriptedSource>) -> AuthPolicy {
    AuthPolicyBuilder::<AuthPolicy>::from_flight(builder(clock, source))
        .allowed_origin("https://api.test")
        .build()
        .unwrap()
}

/// An expired token of generation 1 from the past.
fn expired_token(clock: &ManualClock) -> Token {
    Token::new("old").expires_at(tokenflight::adapter::Clock::now(clock) - Duration::from_secs(1))
}

async fn c1_one_flight_for_concurrent_expired_callers() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = builder(&clock, &source)
        .initial_token(expired_token(&clock))
        .build()
        .unwrap();
    source.gate().close();
    let callers = futures::future::join_all((0..32).map(|_| flight.token()));
    let opener = async {
        until(|| flight.stats().coalesced == 31).await;
        source.gate().release();
    };
    let (results, ()) = futures::join!(callers, opener);
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap().access().expose() == "token-1")
    );
    assert_eq!(source.calls(), 1);
    assert_eq!(source.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(flight.stats().flights, 1);
}

async fn c2_coalescing_waiters_share_one_refresh() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source);
    source.gate().close();
    let callers = futures::future::join_all((0..64).map(|_| flight.token()));
    let opener = async {
        until(|| flight.stats().coalesced == 63).await;
        source.gate().release();
    };
    let (results, ()) = futures::join!(callers, opener);
    let first = results[0].as_ref().unwrap().clone();
    assert!(
        results
            .iter()
            .all(|r| Arc::ptr_eq(r.as_ref().unwrap(), &first))
    );
    assert_eq!(source.calls(), 1);
    assert_eq!(
        *source.reasons.lock().unwrap(),
        vec![RefreshReason::Initial]
    );
    // Once the flight is over, callers are served from memory.
    flight.token().await.unwrap();
    assert_eq!(source.calls(), 1);
}

async fn c3_stale_rejection_resends_without_refresh() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source);
    let first = flight.token().await.unwrap();
    let second = flight
        .token_after_rejection(first.generation())
        .await
        .unwrap();
    assert!(second.generation() > first.generation());
    assert_eq!(source.calls(), 2);
    // A late rejection of the first token: the second is handed out, no refresh.
    let again = flight
        .token_after_rejection(first.generation())
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&again, &second));
    assert_eq!(source.calls(), 2);
    assert_eq!(flight.stats().stale_rejections, 1);
}

async fn c3_late_rejection_after_refresh_is_stale() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    let first = auth
        .flight()
        .expect("an unkeyed policy")
        .token()
        .await
        .unwrap();
    assert_eq!(first.access().expose(), "token-1");
    // The server answers 401 for token-1, but only after token-2 was already installed
    // by someone else (a refresh finished while this request was on the wire).
    let refresher = auth.flight().expect("an unkeyed policy").clone();
    let seen = server.seen.clone();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            |req| {
                let refresher = refresher.clone();
                let seen = seen.clone();
                async move {
                    let auth_header = req.header("authorization").map(str::to_owned);
                    seen.lock().unwrap().push(auth_header.clone());
                    if auth_header.as_deref() == Some("Bearer token-1") {
                        refresher.force_refresh().await.unwrap();
                        Ok::<_, std::convert::Infallible>(FakeResponse::status(401))
                    } else {
                        Ok(FakeResponse::status(200))
                    }
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        source.calls(),
        2,
        "the late 401 must not start a third refresh"
    );
    assert_eq!(
        server.seen(),
        vec![Some("Bearer token-1".into()), Some("Bearer token-2".into())]
    );
    assert_eq!(auth.stats().stale_rejections, 1);
}

async fn c4_exactly_one_retry_with_newer_token() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            server.sender(|t| t == "token-2"),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        server.seen(),
        vec![Some("Bearer token-1".into()), Some("Bearer token-2".into())]
    );
    assert_eq!(auth.stats().retries, 1);
    assert_eq!(source.calls(), 2);
}

async fn c4_second_rejection_is_returned_as_is() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            server.sender(|_| false),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 401);
    assert_eq!(
        server.seen().len(),
        2,
        "sent once, resent once, never a third time"
    );
    assert_eq!(source.calls(), 2);
    assert_eq!(auth.stats().retries, 1);
}

async fn c4_not_replayable_is_not_resent_but_marked() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    let mut streaming = FakeRequest::get("https://api.test/upload");
    streaming.replayable = false;
    let response = auth
        .send(
            streaming,
            RequestOptions::default(),
            server.sender(|t| t == "token-2"),
        )
        .await
        .unwrap();
    assert_eq!(
        response.status, 401,
        "the caller gets the original response"
    );
    assert_eq!(server.seen().len(), 1, "a stream is never resent");
    // The next request does not pay another 401: the token was marked rejected.
    let next = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            server.sender(|t| t == "token-2"),
        )
        .await
        .unwrap();
    assert_eq!(next.status, 200);
    assert_eq!(server.seen()[1], Some("Bearer token-2".into()));
    assert_eq!(auth.stats().not_replayable, 1);
}

async fn c4_body_classifier_retries_business_code_and_keeps_body() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = AuthPolicyBuilder::<AuthPolicy>::from_flight(builder(&clock, &source))
        .allowed_origin("https://api.test")
        .classifier(Classifier::new().body(1024, |b| b.starts_with(br#"{"code":401"#)))
        .build()
        .unwrap();
    let sends = Arc::new(AtomicUsize::new(0));
    let counter = sends.clone();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            move |req| {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = if req.header("authorization") == Some("Bearer token-2") {
                    br#"{"code":0,"data":"ok"}"#.to_vec()
                } else {
                    br#"{"code":401,"message":"token expired"}"#.to_vec()
                };
                futures::future::ready(Ok::<_, std::convert::Infallible>(FakeResponse::with_body(
                    200, body,
                )))
            },
        )
        .await
        .unwrap();
    assert_eq!(response.body, br#"{"code":0,"data":"ok"}"#.to_vec());
    assert_eq!(sends.load(Ordering::SeqCst), 2);
}

async fn c4_a_401_from_another_origin_is_not_a_rejection() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    // The client followed a redirect: the 401 comes from where the token never went.
    let answer = |final_url: &str| {
        let final_url = url::Url::parse(final_url).unwrap();
        let sends = Arc::new(AtomicUsize::new(0));
        let counter = sends.clone();
        let send = move |_req: FakeRequest| {
            counter.fetch_add(1, Ordering::SeqCst);
            futures::future::ready(Ok::<_, std::convert::Infallible>(FakeResponse {
                final_url: Some(final_url.clone()),
                ..FakeResponse::status(401)
            }))
        };
        (sends, send)
    };
    let (sends, send) = answer("https://elsewhere.test/landing");
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            send,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 401, "handed back as it is");
    assert_eq!(sends.load(Ordering::SeqCst), 1, "not resent");
    assert_eq!(source.calls(), 1, "no refresh beyond the first token");
    assert_eq!(auth.stats().rejections, 0);

    // The same answer from the request's own origin (another path) is a rejection.
    let (sends, send) = answer("https://api.test/landing");
    auth.send(
        FakeRequest::get("https://api.test/x"),
        RequestOptions::default(),
        send,
    )
    .await
    .unwrap();
    assert_eq!(sends.load(Ordering::SeqCst), 2, "resent once");
    assert_eq!(source.calls(), 2);
    assert_eq!(auth.stats().rejections, 1);

    // Query placement: a same-origin hop whose URL lacks the token got no token.
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = AuthPolicyBuilder::<AuthPolicy>::from_flight(builder(&clock, &source))
        .allowed_origin("https://api.test")
        .placement(Placement::query("token"))
        .build()
        .unwrap();
    let (sends, send) = answer("https://api.test/landing?page=1");
    auth.send(
        FakeRequest::get("https://api.test/x"),
        RequestOptions::default(),
        send,
    )
    .await
    .unwrap();
    assert_eq!(sends.load(Ordering::SeqCst), 1, "not resent");
    assert_eq!(source.calls(), 1);
    assert_eq!(auth.stats().rejections, 0);
    let (sends, send) = answer("https://api.test/landing?page=1&token=token-1");
    auth.send(
        FakeRequest::get("https://api.test/x"),
        RequestOptions::default(),
        send,
    )
    .await
    .unwrap();
    assert_eq!(sends.load(Ordering::SeqCst), 2, "resent once");
    assert_eq!(auth.stats().rejections, 1);
}

async fn c4_insufficient_scope_is_not_a_rejection() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let sends = Arc::new(AtomicUsize::new(0));
    let counter = sends.clone();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            move |_req| {
                counter.fetch_add(1, Ordering::SeqCst);
                futures::future::ready(Ok::<_, std::convert::Infallible>(FakeResponse {
                    status: 401,
                    www_authenticate: Some(
                        r#"Bearer error="insufficient_scope", scope="admin""#.into(),
                    ),
                    ..FakeResponse::status(401)
                }))
            },
        )
        .await
        .unwrap();
    assert_eq!(response.status, 401);
    assert_eq!(
        sends.load(Ordering::SeqCst),
        1,
        "a scope problem is not cured by a refresh"
    );
    assert_eq!(source.calls(), 1);
}

async fn c5_all_waiters_get_the_same_error() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Transient);
    let flight = flight(&clock, &source);
    source.gate().close();
    let callers = futures::future::join_all((0..20).map(|_| flight.token()));
    let opener = async {
        until(|| flight.stats().coalesced == 19).await;
        source.gate().release();
    };
    let (results, ()) = futures::join!(callers, opener);
    let errors: Vec<Error> = results.into_iter().map(|r| r.unwrap_err()).collect();
    let first = errors[0].refresh_error().clone();
    assert!(errors.iter().all(|e| matches!(e, Error::Refresh(_))));
    assert!(
        errors
            .iter()
            .all(|e| tokenflight::test_util::same_failure(e.refresh_error(), &first))
    );
    assert_eq!(source.calls(), 1);
}

async fn c6_dropping_the_driver_mid_refresh_does_not_hang_waiters() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source);
    source.gate().close();
    // The driver starts the refresh and is parked inside the source.
    let mut driver = flight.token().boxed();
    assert!(poll_once(&mut driver).is_pending());
    assert_eq!(source.calls(), 1);
    let mut waiters: Vec<_> = (0..3).map(|_| flight.token().boxed()).collect();
    for w in &mut waiters {
        assert!(poll_once(w).is_pending());
    }
    drop(driver);
    assert_eq!(
        source.dropped_mid_call.load(Ordering::SeqCst),
        0,
        "refresh must go on"
    );
    source.gate().release();
    let results = futures::future::join_all(waiters).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap().access().expose() == "token-1")
    );
    assert_eq!(source.calls(), 1);
}

async fn c6_spawner_finishes_refresh_when_every_caller_left() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let spawner = QueueSpawner::default();
    let flight = builder(&clock, &source)
        .spawner(Arc::new(spawner.clone()))
        .build()
        .unwrap();
    source.gate().close();
    let mut caller = flight.token().boxed();
    assert!(poll_once(&mut caller).is_pending());
    drop(caller);
    source.gate().release();
    spawner.run_all().await;
    let installed = flight.current().expect("the refreshed token was kept");
    assert_eq!(installed.access().expose(), "token-1");
    assert!(Arc::ptr_eq(&flight.token().await.unwrap(), &installed));
    assert_eq!(source.calls(), 1);
}

async fn c6_without_spawner_last_caller_leaving_cancels_and_next_restarts() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let flight = flight(&clock, &source);
    source.gate().close();
    let mut caller = flight.token().boxed();
    assert!(poll_once(&mut caller).is_pending());
    drop(caller);
    assert_eq!(source.dropped_mid_call.load(Ordering::SeqCst), 1);
    source.gate().release();
    let token = flight.token().await.unwrap();
    assert_eq!(token.access().expose(), "token-2");
    assert_eq!(source.calls(), 2);
}

// The tokens below are made with `expires_at` (lifetime unknown), so the leeway and
// refresh-ahead settings apply as they are; `core/tests/holes.rs` covers how they scale
// to a known lifetime (C15).
async fn c7_token_within_leeway_is_refreshed_before_sending() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let now = tokenflight::adapter::Clock::now(&clock);
    let auth = AuthPolicyBuilder::<AuthPolicy>::from_flight(builder(&clock, &source))
        .leeway(Duration::from_secs(30))
        .initial_token(Token::new("old").expires_at(now + Duration::from_secs(10)))
        .allowed_origin("https://api.test")
        .build()
        .unwrap();
    let server = FakeServer::default();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            server.sender(|t| t == "token-1"),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        server.seen(),
        vec![Some("Bearer token-1".into())],
        "no 401 round trip"
    );
    assert_eq!(
        *source.reasons.lock().unwrap(),
        vec![RefreshReason::Expired]
    );
}

async fn c8_refresh_ahead_serves_valid_token_while_refreshing() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let spawner = QueueSpawner::default();
    let now = tokenflight::adapter::Clock::now(&clock);
    let flight = builder(&clock, &source)
        .leeway(Duration::from_secs(30))
        .refresh_ahead(Some(Duration::from_secs(120)))
        .spawner(Arc::new(spawner.clone()))
        .initial_token(Token::new("old").expires_at(now + Duration::from_secs(60)))
        .build()
        .unwrap();
    source.gate().close();
    for _ in 0..5 {
        let mut call = flight.token().boxed();
        match poll_once(&mut call) {
            Poll::Ready(Ok(token)) => assert_eq!(token.access().expose(), "old"),
            other => panic!("a caller blocked on a valid token: {other:?}"),
        }
    }
    source.gate().release();
    spawner.run_all().await;
    assert_eq!(flight.token().await.unwrap().access().expose(), "token-1");
    assert_eq!(source.calls(), 1);
    assert_eq!(
        *source.reasons.lock().unwrap(),
        vec![RefreshReason::RefreshAhead]
    );
}

async fn c8_refresh_ahead_without_spawner_is_driven_by_one_caller() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let now = tokenflight::adapter::Clock::now(&clock);
    let flight = builder(&clock, &source)
        .refresh_ahead(Some(Duration::from_secs(120)))
        .initial_token(Token::new("old").expires_at(now + Duration::from_secs(60)))
        .build()
        .unwrap();
    source.gate().close();
    let mut driver = flight.token().boxed();
    assert!(
        poll_once(&mut driver).is_pending(),
        "one caller drives the refresh"
    );
    let mut other = flight.token().boxed();
    match poll_once(&mut other) {
        Poll::Ready(Ok(token)) => assert_eq!(token.access().expose(), "old"),
        p => panic!("others must not block: {p:?}"),
    }
    source.gate().release();
    assert_eq!(driver.await.unwrap().access().expose(), "token-1");
    assert_eq!(source.calls(), 1);
}

async fn c9_error_never_replaces_a_valid_token() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Transient);
    let now = tokenflight::adapter::Clock::now(&clock);
    let flight = builder(&clock, &source)
        .refresh_ahead(Some(Duration::from_secs(120)))
        .backoff(Backoff::new(Duration::from_secs(5), Duration::from_secs(5)).with_jitter(0.0))
        .initial_token(Token::new("old").expires_at(now + Duration::from_secs(60)))
        .build()
        .unwrap();
    assert_eq!(flight.token().await.unwrap().access().expose(), "old");
    assert_eq!(source.calls(), 1);
    assert_eq!(flight.current().unwrap().access().expose(), "old");
    // During the backoff a valid token is still served, and no new attempt is made.
    assert_eq!(flight.token().await.unwrap().access().expose(), "old");
    assert_eq!(source.calls(), 1);
    // A permanent failure does not throw the valid token away either.
    let flight2 = builder(&clock, &ScriptedSource::new(&clock, Step::Permanent))
        .initial_token(Token::new("still-valid").expires_in(LONG, now))
        .build()
        .unwrap();
    assert!(flight2.force_refresh().await.is_err());
    assert_eq!(
        flight2.token().await.unwrap().access().expose(),
        "still-valid"
    );
}

async fn c9_backoff_fails_fast_then_recovers() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG)).then(Step::Transient);
    let flight = builder(&clock, &source)
        .backoff(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).with_jitter(0.0))
        .build()
        .unwrap();
    let first = flight.token().await.unwrap_err();
    assert!(matches!(first, Error::Refresh(ref e) if e.is_retryable()));
    match flight.token().await.unwrap_err() {
        Error::BackingOff { last, remaining } => {
            assert!(tokenflight::test_util::same_failure(
                &last,
                first.refresh_error()
            ));
            assert_eq!(remaining, Duration::from_secs(1));
        }
        other => panic!("expected fail-fast backoff, got {other:?}"),
    }
    assert_eq!(source.calls(), 1, "no hammering during backoff");
    clock.advance(Duration::from_secs(1));
    assert_eq!(flight.token().await.unwrap().access().expose(), "token-2");
    assert_eq!(source.calls(), 2);
}

async fn c9_permanent_failure_fires_hook_once_until_login() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Permanent);
    let hook_calls = Arc::new(AtomicUsize::new(0));
    let counter = hook_calls.clone();
    let flight = builder(&clock, &source)
        .observer(on_auth_lost(move |_e| {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .build()
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            flight.token().await.unwrap_err(),
            Error::ReauthenticationRequired { .. }
        ));
    }
    assert_eq!(source.calls(), 1, "later calls fail fast");
    assert_eq!(hook_calls.load(Ordering::SeqCst), 1);
    assert!(flight.is_auth_lost());
    let installed = flight
        .install(
            Token::new("from-login").expires_in(LONG, tokenflight::adapter::Clock::now(&clock)),
        )
        .await
        .unwrap();
    assert!(!flight.is_auth_lost());
    assert!(Arc::ptr_eq(&flight.token().await.unwrap(), &installed));
    assert_eq!(source.calls(), 1);
}

async fn c10_refresh_timeout_fails_all_waiters_then_recovers() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG)).then(Step::Hang);
    let flight = builder(&clock, &source)
        .refresh_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let callers = futures::future::join_all((0..5).map(|_| flight.token()));
    let ticker = async {
        until(|| flight.stats().coalesced == 4).await;
        clock.advance(Duration::from_secs(5));
    };
    let (results, ()) = futures::join!(callers, ticker);
    assert!(results.iter().all(|r| matches!(
        r, Err(Error::Refresh(e)) if e.cause() == tokenflight::Cause::Timeout
    )));
    assert_eq!(
        source.dropped_mid_call.load(Ordering::SeqCst),
        1,
        "the hung call was dropped"
    );
    assert_eq!(flight.token().await.unwrap().access().expose(), "token-2");
}

async fn c11_skip_auth_sends_no_credentials() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    let response = auth
        .send(
            FakeRequest::get("https://api.test/public"),
            RequestOptions::from_markers(true, false),
            server.sender(|_| true),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 401, "not classified, not retried");
    assert_eq!(server.seen(), vec![None]);
    assert_eq!(source.calls(), 0);
}

async fn c11_force_refresh_marker() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    auth.flight()
        .expect("an unkeyed policy")
        .token()
        .await
        .unwrap();
    let server = FakeServer::default();
    auth.send(
        FakeRequest::get("https://api.test/x"),
        RequestOptions::from_markers(false, true),
        server.sender(|_| true),
    )
    .await
    .unwrap();
    assert_eq!(server.seen(), vec![Some("Bearer token-2".into())]);
    assert_eq!(
        *source.reasons.lock().unwrap(),
        vec![RefreshReason::Initial, RefreshReason::Forced]
    );
}

async fn c12_token_goes_only_to_allowed_origins() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let server = FakeServer::default();
    for url in [
        "https://evil.test/x",
        "http://api.test/x",
        "https://api.test:8443/x",
        "https://sub.api.test/x",
    ] {
        auth.send(
            FakeRequest::get(url),
            RequestOptions::default(),
            server.sender(|_| true),
        )
        .await
        .unwrap();
    }
    assert!(
        server.seen().iter().all(Option::is_none),
        "{:?}",
        server.seen()
    );
    assert_eq!(source.calls(), 0);
}

async fn c12_errors_and_debug_never_show_secrets() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG)).then(Step::Ok(LONG));
    let auth = authenticator(&clock, &source);
    let token = auth
        .flight()
        .expect("an unkeyed policy")
        .token()
        .await
        .unwrap();
    let failing = ScriptedSource::new(&clock, Step::Transient);
    let err = flight(&clock, &failing).token().await.unwrap_err();
    let shown = format!(
        "{auth:?} {:?} {token:?} {err} {err:?}",
        auth.flight().expect("an unkeyed policy")
    );
    assert!(
        !shown.contains("token-1") && !shown.contains("refresh-1"),
        "{shown}"
    );
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod futures_executor {
            $( #[test] fn $name() { futures::executor::block_on(super::$name()) } )*
        }
        mod tokio_runtime {
            $( #[test] fn $name() {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(super::$name())
            } )*
        }
        mod async_std_runtime {
            $( #[test] fn $name() { async_std::task::block_on(super::$name()) } )*
        }
        mod smol_runtime {
            $( #[test] fn $name() { smol::block_on(super::$name()) } )*
        }
    };
}

contract_tests!(
    c1_one_flight_for_concurrent_expired_callers,
    c2_coalescing_waiters_share_one_refresh,
    c3_stale_rejection_resends_without_refresh,
    c3_late_rejection_after_refresh_is_stale,
    c4_exactly_one_retry_with_newer_token,
    c4_second_rejection_is_returned_as_is,
    c4_not_replayable_is_not_resent_but_marked,
    c4_body_classifier_retries_business_code_and_keeps_body,
    c4_insufficient_scope_is_not_a_rejection,
    c4_a_401_from_another_origin_is_not_a_rejection,
    c5_all_waiters_get_the_same_error,
    c6_dropping_the_driver_mid_refresh_does_not_hang_waiters,
    c6_spawner_finishes_refresh_when_every_caller_left,
    c6_without_spawner_last_caller_leaving_cancels_and_next_restarts,
    c7_token_within_leeway_is_refreshed_before_sending,
    c8_refresh_ahead_serves_valid_token_while_refreshing,
    c8_refresh_ahead_without_spawner_is_driven_by_one_caller,
    c9_error_never_replaces_a_valid_token,
    c9_backoff_fails_fast_then_recovers,
    c9_permanent_failure_fires_hook_once_until_login,
    c10_refresh_timeout_fails_all_waiters_then_recovers,
    c11_skip_auth_sends_no_credentials,
    c11_force_refresh_marker,
    c12_token_goes_only_to_allowed_origins,
    c12_errors_and_debug_never_show_secrets,
);
