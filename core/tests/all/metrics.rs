//! Issue 16: `MetricsObserver` (feature `metrics`) records the documented names, labels
//! and values, checked with `metrics-util`'s `DebuggingRecorder`; no label carries a
//! token or a secret.
#![cfg(feature = "metrics")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::support::{FakeRequest, FakeResponse, ScriptedSource, Step, poll_once};
use futures::executor::block_on;
use futures::future::join_all;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokenflight::observe::MetricsObserver;
use tokenflight::{
    AuthPolicy, AuthPolicyBuilder, FlightBuilder, SingleFlight, Token, adapter::RequestOptions,
    config::Backoff, config::Retry, test_util::ManualClock,
};

const LONG: Duration = Duration::from_secs(3600);

/// `name{label=value,...}` → value, for every metric recorded while `f` ran.
fn record(f: impl FnOnce()) -> BTreeMap<String, DebugValue> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, f);
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect()
}

fn counter(metrics: &BTreeMap<String, DebugValue>, key: &str) -> u64 {
    match metrics.get(key) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!(
            "{key}: {other:?} in {:?}",
            metrics.keys().collect::<Vec<_>>()
        ),
    }
}

fn histogram(metrics: &BTreeMap<String, DebugValue>, key: &str) -> Vec<f64> {
    match metrics.get(key) {
        Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
        other => panic!("{key}: {other:?}"),
    }
}

fn builder(clock: &ManualClock, source: &Arc<ScriptedSource>) -> FlightBuilder {
    SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(Backoff::none())
        .retry(Retry::none())
        .refresh_ahead(None)
        .observer(MetricsObserver::new())
}

fn drive<F: std::future::Future + Unpin>(fut: &mut F, clock: &ManualClock) -> F::Output {
    for _ in 0..10_000 {
        if let Poll::Ready(out) = poll_once(fut) {
            return out;
        }
        clock.advance(Duration::from_millis(10));
    }
    panic!("the future did not complete within 10,000 clock steps");
}

/// What `hundred_callers_one_flight`'s scenario records.
fn hundred_callers_one_flight_metrics() -> BTreeMap<String, DebugValue> {
    record(|| {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(LONG));
        let expired = Token::new("old-secret")
            .expires_at(tokenflight::adapter::Clock::now(&clock) - Duration::from_secs(1));
        let flight = builder(&clock, &source)
            .initial_token(expired)
            .build()
            .unwrap();
        source.gate().close();
        let mut callers: Vec<_> = (0..100).map(|_| Box::pin(flight.token())).collect();
        for caller in &mut callers {
            assert!(poll_once(caller).is_pending());
        }
        source.gate().release();
        assert!(block_on(join_all(callers)).iter().all(Result::is_ok));
    })
}

#[test]
fn hundred_callers_one_flight() {
    let metrics = hundred_callers_one_flight_metrics();
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.started{reason=expired}"),
        1
    );
    assert_eq!(
        counter(&metrics, "tokenflight.flight.waiters{reason=expired}"),
        99
    );
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.outcome{outcome=success}"),
        1
    );
    assert_eq!(
        histogram(&metrics, "tokenflight.refresh.attempts{outcome=success}"),
        vec![1.0]
    );
    // ManualClock did not move: the flight took zero monotonic time.
    assert_eq!(
        histogram(&metrics, "tokenflight.refresh.duration{outcome=success}"),
        vec![0.0]
    );
    assert_eq!(metrics.len(), 5, "{:?}", metrics.keys().collect::<Vec<_>>());
}

/// What `stale_rejection_and_retry_and_auth_lost`'s scenario records.
fn stale_rejection_and_retry_and_auth_lost_metrics() -> BTreeMap<String, DebugValue> {
    record(|| {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Permanent)
            .then(Step::Ok(LONG))
            .then(Step::Transient)
            .then(Step::Ok(LONG));
        let auth = AuthPolicyBuilder::<AuthPolicy>::from_flight(builder(&clock, &source))
            .retry(Retry::default())
            .allowed_origin("https://api.test")
            .build()
            .unwrap();
        block_on(auth.flight().expect("an unkeyed policy").token()).unwrap();
        let refresher = auth.flight().expect("an unkeyed policy").clone();
        let clock2 = clock.clone();
        // The 401 for token-1 arrives after a forced refresh (retried once) replaced it.
        let mut send = Box::pin(auth.send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            move |req| {
                let refresher = refresher.clone();
                let clock = clock2.clone();
                async move {
                    if req.header("authorization") == Some("Bearer token-1") {
                        let mut forced = Box::pin(refresher.force_refresh());
                        drive(&mut forced, &clock).unwrap();
                        Ok::<_, std::convert::Infallible>(FakeResponse::status(401))
                    } else {
                        Ok(FakeResponse::status(200))
                    }
                }
            },
        ));
        assert_eq!(block_on(&mut send).unwrap().status, 200);
        // Permanent failure, then a login.
        assert!(block_on(auth.flight().expect("an unkeyed policy").force_refresh()).is_err());
        block_on(
            auth.flight()
                .expect("an unkeyed policy")
                .install(Token::new("login-secret")),
        )
        .unwrap();
    })
}

#[test]
fn stale_rejection_and_retry_and_auth_lost() {
    let metrics = stale_rejection_and_retry_and_auth_lost_metrics();
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.started{reason=initial}"),
        1
    );
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.started{reason=forced}"),
        2
    );
    assert_eq!(
        counter(&metrics, "tokenflight.attempt.failed{kind=transient}"),
        1
    );
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.outcome{outcome=success}"),
        2
    );
    assert_eq!(
        histogram(&metrics, "tokenflight.refresh.attempts{outcome=success}"),
        vec![1.0, 2.0]
    );
    assert_eq!(
        counter(&metrics, "tokenflight.request.resent{kind=stale}"),
        1
    );
    assert_eq!(counter(&metrics, "tokenflight.rejection.stale{}"), 1);
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.outcome{outcome=permanent}"),
        1
    );
    assert_eq!(counter(&metrics, "tokenflight.auth.lost{}"), 1);
    assert_eq!(counter(&metrics, "tokenflight.token.installed{}"), 1);
    // The one request found token 1 valid in memory: a fast-path hit.
    assert_eq!(counter(&metrics, "tokenflight.request.fast_path{}"), 1);
    assert!(!metrics.contains_key("tokenflight.request.waited{}"));
    // No label carries a token, a secret or an unbounded value.
    for key in metrics.keys() {
        for secret in ["token-", "refresh-", "secret", "Bearer"] {
            assert!(!key.contains(secret), "{secret} in {key}");
        }
    }
}

/// What `cancelled_caller`'s scenario records.
fn cancelled_caller_metrics() -> BTreeMap<String, DebugValue> {
    record(|| {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(LONG));
        let flight = builder(&clock, &source).build().unwrap();
        source.gate().close();
        let mut first = Box::pin(flight.token());
        let mut second = Box::pin(flight.token());
        assert!(poll_once(&mut first).is_pending());
        assert!(poll_once(&mut second).is_pending());
        drop(first);
        source.gate().release();
        assert_eq!(block_on(second).unwrap().generation(), 1);
    })
}

#[test]
fn cancelled_caller() {
    let metrics = cancelled_caller_metrics();
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.started{reason=initial}"),
        1
    );
    assert_eq!(
        counter(&metrics, "tokenflight.flight.waiters{reason=initial}"),
        1
    );
    assert_eq!(
        counter(&metrics, "tokenflight.refresh.outcome{outcome=success}"),
        1
    );
    assert_eq!(
        histogram(&metrics, "tokenflight.refresh.attempts{outcome=success}"),
        vec![1.0]
    );
    assert_eq!(metrics.len(), 5, "{:?}", metrics.keys().collect::<Vec<_>>());
}

/// What `fast_path_hits_and_waits_per_request_with_a_coordinator_label`'s scenario records.
fn fast_path_hits_and_waits_per_request_with_a_coordinator_label_metrics()
-> BTreeMap<String, DebugValue> {
    record(|| {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(LONG));
        let auth = AuthPolicy::builder()
            .source(source.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .refresh_ahead(None)
            .observer(MetricsObserver::named("billing"))
            .allowed_origin("https://api.test")
            .build()
            .unwrap();
        for _ in 0..5 {
            let response = block_on(auth.send(
                FakeRequest::get("https://api.test/x"),
                RequestOptions::default(),
                |_req| async { Ok::<_, std::convert::Infallible>(FakeResponse::status(200)) },
            ))
            .unwrap();
            assert_eq!(response.status, 200);
        }
        // The server rejects token 1: the request waits for token 2 and is resent.
        let response = block_on(auth.send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            |req| {
                let status = if req.header("authorization") == Some("Bearer token-1") {
                    401
                } else {
                    200
                };
                async move { Ok::<_, std::convert::Infallible>(FakeResponse::status(status)) }
            },
        ))
        .unwrap();
        assert_eq!(response.status, 200);
    })
}

#[test]
fn fast_path_hits_and_waits_per_request_with_a_coordinator_label() {
    let metrics = fast_path_hits_and_waits_per_request_with_a_coordinator_label_metrics();
    // The first request waited for the initial token; the other four were fast-path hits,
    // and so was the sixth (token 1 was valid in memory until the server rejected it).
    assert_eq!(
        counter(&metrics, "tokenflight.request.waited{coordinator=billing}"),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "tokenflight.request.fast_path{coordinator=billing}"
        ),
        5
    );
    assert_eq!(
        counter(
            &metrics,
            "tokenflight.request.resent{coordinator=billing,kind=fresh}"
        ),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "tokenflight.refresh.started{coordinator=billing,reason=rejected}"
        ),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "tokenflight.refresh.started{coordinator=billing,reason=initial}"
        ),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "tokenflight.refresh.outcome{coordinator=billing,outcome=success}"
        ),
        2
    );
    assert_eq!(metrics.len(), 8, "{:?}", metrics.keys().collect::<Vec<_>>());
}

/// The guide's metric table (`guide/observability.md`, rendered as
/// `tokenflight::guide::observability`) lists exactly the metric names the code records,
/// and for each only labels the code records with it: the union of what the scenarios
/// above record covers every metric. `coordinator` is the one label added to every
/// metric by `MetricsObserver::named`; the named scenario checks it is on every metric
/// it records.
#[test]
fn the_guide_lists_every_recorded_metric_and_no_other() {
    let scenarios = [
        hundred_callers_one_flight_metrics(),
        stale_rejection_and_retry_and_auth_lost_metrics(),
        cancelled_caller_metrics(),
        fast_path_hits_and_waits_per_request_with_a_coordinator_label_metrics(),
    ];
    let recorded = crate::guide_tables::recorded_names_and_labels(
        scenarios
            .iter()
            .flat_map(|metrics| metrics.keys().map(String::as_str)),
    );
    let named =
        crate::guide_tables::recorded_names_and_labels(scenarios[3].keys().map(String::as_str));
    assert!(
        named.values().all(|labels| labels.contains("coordinator")),
        "{named:?}"
    );
    let guide = crate::guide_tables::metrics(crate::guide_tables::OBSERVABILITY);
    assert!(
        guide.len() >= 12,
        "the guide's metric table was not found: {guide:?}"
    );
    let lacking = crate::guide_tables::listed_but_not_recorded(&guide, &recorded, &["coordinator"]);
    assert!(
        lacking.is_empty(),
        "the guide lists what the code does not record: {lacking:?}"
    );
    let listed: BTreeSet<&str> = guide.iter().map(|row| row.name.as_str()).collect();
    let unlisted: Vec<&String> = recorded
        .keys()
        .filter(|name| !listed.contains(name.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "the code records metrics the guide does not list: {unlisted:?}"
    );
}
