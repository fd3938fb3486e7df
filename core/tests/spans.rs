//! Issue 16: one `tracing` span per flight with reason, generation, attempts and
//! outcome; one `tokenflight.request` span per authenticated request (generation used,
//! waited or not, resent or not) that ties a slow request to the refresh it waited
//! for; no span field and no event of the core carries a token or a secret (C12).

#[path = "all/support/mod.rs"]
mod support;

#[path = "all/guide_tables.rs"]
mod guide_tables;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use support::{FakeRequest, FakeServer, ScriptedSource, Step};
use tokenflight::{
    AuthPolicy, SingleFlight, Token, adapter::RequestOptions, config::Backoff, config::Retry,
    test_util::ManualClock,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A span's name and its fields as `name=value`.
type SpanLog = (String, Vec<String>);

/// Keeps every span (name and fields) and every event's fields as text.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<SpanLog>>>,
    events: Arc<Mutex<Vec<String>>>,
    /// Span name → every field its call site declares (recorded or not).
    declared: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
}

struct Fields<'a>(&'a mut Vec<String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push(format!("{}={}", field.name(), value));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.declared
            .lock()
            .unwrap()
            .entry(span.metadata().name().to_owned())
            .or_default()
            .extend(span.metadata().fields().iter().map(|f| f.name().to_owned()));
        let mut fields = Vec::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name().to_owned(), fields));
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let index = usize::try_from(span.into_u64() - 1).unwrap();
        values.record(&mut Fields(&mut spans[index].1));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(fields.join(" "));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn one_span_per_flight_and_no_secrets() {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)))
            .then(Step::Ok(Duration::from_secs(3600)))
            .then(Step::Permanent);
        let flight = SingleFlight::builder()
            .source(source.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .backoff(Backoff::none())
            .retry(Retry::none())
            .refresh_ahead(None)
            .initial_token(
                Token::new("old-secret")
                    .with_refresh("old-refresh")
                    .expires_at(tokenflight::adapter::Clock::now(&clock) - Duration::from_secs(1)),
            )
            .build()
            .unwrap();
        block_on(flight.token()).unwrap();
        assert!(block_on(flight.force_refresh()).is_err());
        block_on(flight.install(Token::new("login-secret").with_refresh("login-refresh"))).unwrap();
    });
    let spans: Vec<_> = capture
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name == "tokenflight.refresh")
        .cloned()
        .collect();
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(
        spans[0].1,
        vec![
            "flight=0",
            "reason=Some(Expired)",
            "replaces=Some(1)",
            "attempts=1",
            "outcome=success",
            "generation=2",
        ]
    );
    assert_eq!(
        spans[1].1,
        vec![
            "flight=1",
            "reason=Some(Forced)",
            "replaces=Some(2)",
            "attempts=1",
            "outcome=permanent",
        ]
    );
    let events = capture.events.lock().unwrap().clone();
    assert!(!events.is_empty());
    let all = spans
        .iter()
        .flat_map(|(_, fields)| fields.iter().cloned())
        .chain(events);
    for line in all {
        for secret in ["token-", "refresh-", "old-secret", "old-refresh", "login-"] {
            assert!(!line.contains(secret), "{secret} leaked into {line}");
        }
    }
}

#[test]
fn request_span_ties_a_request_to_the_refresh_it_waited_for() {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
        let auth = AuthPolicy::builder()
            .source(source.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .refresh_ahead(None)
            .allowed_origin("https://api.test")
            .build()
            .unwrap();
        let server = FakeServer::default();
        let send = |path: &str| {
            block_on(auth.send(
                FakeRequest::get(&format!("https://api.test/{path}")),
                RequestOptions::default(),
                // Token 1 is good for /a and /b; /c rejects it (the server revoked it).
                server.sender({
                    let path = path.to_owned();
                    move |t| path != "c" || t != "token-1"
                }),
            ))
            .unwrap()
            .status
        };
        assert_eq!(send("a"), 200);
        assert_eq!(send("b"), 200);
        assert_eq!(send("c"), 200);
        // Not authenticated: no request span.
        block_on(auth.send(
            FakeRequest::get("https://elsewhere.test/"),
            RequestOptions::default(),
            server.sender(|_| true),
        ))
        .unwrap();
    });
    let spans = capture.spans.lock().unwrap().clone();
    let requests: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name == "tokenflight.request")
        .map(|(_, fields)| fields.clone())
        .collect();
    assert_eq!(
        requests,
        vec![
            // Waited for the initial refresh, which produced generation 1.
            vec!["generation=1", "waited=true", "resent=false"],
            // A fast-path hit.
            vec!["generation=1", "waited=false", "resent=false"],
            // Rejected, resent once with the token of the refresh it waited for.
            vec![
                "generation=1",
                "waited=false",
                "resent=true",
                "resent_with=2"
            ],
        ]
    );
    let refreshes: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name == "tokenflight.refresh")
        .map(|(_, fields)| fields.clone())
        .collect();
    assert_eq!(refreshes.len(), 2, "{refreshes:?}");
    assert!(refreshes[0].contains(&"generation=1".to_owned()));
    assert!(refreshes[1].contains(&"generation=2".to_owned()));
    let events = capture.events.lock().unwrap().clone();
    for line in spans
        .iter()
        .flat_map(|(_, fields)| fields.iter().cloned())
        .chain(events)
    {
        for secret in ["token-", "refresh-", "Bearer"] {
            assert!(!line.contains(secret), "{secret} leaked into {line}");
        }
    }
}

/// The guide's span table (`guide/observability.md`, rendered as
/// `tokenflight::guide::observability`) lists exactly the fields the two spans declare.
#[test]
fn the_guide_lists_every_span_field_and_no_other() {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let clock = ManualClock::at_fixed_point();
        let source = ScriptedSource::new(&clock, Step::Ok(Duration::from_secs(3600)));
        let auth = AuthPolicy::builder()
            .source(source.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .refresh_ahead(None)
            .allowed_origin("https://api.test")
            .build()
            .unwrap();
        let server = FakeServer::default();
        // The first request waits for the initial refresh: one span of each kind.
        let response = block_on(auth.send(
            FakeRequest::get("https://api.test/a"),
            RequestOptions::default(),
            server.sender(|_| true),
        ))
        .unwrap();
        assert_eq!(response.status, 200);
    });
    let declared = capture.declared.lock().unwrap().clone();
    let guide = guide_tables::span_fields(guide_tables::OBSERVABILITY);
    for span in ["tokenflight.refresh", "tokenflight.request"] {
        let fields = declared
            .get(span)
            .unwrap_or_else(|| panic!("no {span} span: {declared:?}"));
        let lacking = guide_tables::fields_not_declared(&guide, span, fields);
        assert!(
            lacking.is_empty(),
            "the guide lists fields the code does not declare: {lacking:?}"
        );
        let listed: BTreeSet<&str> = guide
            .iter()
            .filter(|(name, _)| name == span)
            .map(|(_, field)| field.as_str())
            .collect();
        let unlisted: Vec<&String> = fields
            .iter()
            .filter(|f| !listed.contains(f.as_str()))
            .collect();
        assert!(
            unlisted.is_empty(),
            "{span} declares fields the guide does not list: {unlisted:?}"
        );
    }
}

/// Keeps the `Debug` form of every observer event.
#[derive(Clone, Default)]
struct DebugAll(Arc<Mutex<Vec<String>>>);

impl DebugAll {
    fn push(&self, event: &dyn std::fmt::Debug) {
        self.0.lock().unwrap().push(format!("{event:?}"));
    }
}

impl tokenflight::observe::Observer for DebugAll {
    fn refresh_started(&self, e: &tokenflight::observe::RefreshStarted) {
        self.push(e);
    }
    fn attempt_failed(&self, e: &tokenflight::observe::AttemptFailed<'_>) {
        self.push(e);
    }
    fn refresh_finished(&self, e: &tokenflight::observe::RefreshFinished) {
        self.push(e);
    }
    fn flight_joined(&self, e: &tokenflight::observe::FlightJoined) {
        self.push(e);
    }
    fn request_authorized(&self, e: &tokenflight::observe::RequestAuthorized) {
        self.push(e);
    }
    fn request_resent(&self, e: &tokenflight::observe::RequestResent) {
        self.push(e);
    }
    fn auth_lost(&self, e: &tokenflight::observe::AuthLost<'_>) {
        self.push(e);
    }
    fn token_installed(&self, e: &tokenflight::observe::TokenInstalled) {
        self.push(e);
    }
}

/// A token endpoint that answers from a script (the OAuth grant's transport).
struct TokenEndpoint(Mutex<std::collections::VecDeque<(u16, &'static str)>>);

impl tokenflight::adapter::Transport for TokenEndpoint {
    fn send(
        &self,
        _request: tokenflight::adapter::HttpRequest,
        _limit: usize,
    ) -> futures::future::BoxFuture<
        '_,
        Result<tokenflight::adapter::HttpResponse, tokenflight::adapter::TransportError>,
    > {
        let (status, body) = self.0.lock().unwrap().pop_front().expect("scripted answer");
        Box::pin(async move {
            Ok(http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(bytes::Bytes::from_static(body.as_bytes()))
                .unwrap())
        })
    }
}

/// Issue 16 with a real OAuth grant holding a client secret and refresh tokens: no
/// observer event, span field or `tracing` event carries the client secret, a refresh
/// token or an access token — through a refresh, a transient failure retried, a
/// rejected request resent, auth lost and a login.
#[cfg(feature = "oauth2")]
#[test]
fn no_secret_in_events_or_span_fields_with_an_oauth_grant() {
    let capture = Capture::default();
    let events = DebugAll::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let clock = ManualClock::at_fixed_point();
        let endpoint = Arc::new(TokenEndpoint(Mutex::new(
            [
                (200, r#"{"access_token":"at-SECRET-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-SECRET-2"}"#),
                (503, r#"{"error":"temporarily_unavailable"}"#),
                (200, r#"{"access_token":"at-SECRET-2","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-SECRET-3"}"#),
                (400, r#"{"error":"invalid_grant"}"#),
            ]
            .into(),
        )));
        let grant = tokenflight::oauth2::RefreshTokenGrant::new(
            endpoint,
            "https://auth.test/oauth/token",
            "client-1",
        )
        .unwrap()
        .client_secret("client-SECRET")
        .initial_refresh_token("rt-SECRET-1");
        let auth = AuthPolicy::builder()
            .source(grant)
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .backoff(Backoff::none())
            .retry(Retry::default())
            .refresh_ahead(None)
            .observer(events.clone())
            .allowed_origin("https://api.test")
            .build()
            .unwrap();
        let server = FakeServer::default();
        // Token 1 is rejected: the refresh (one 503 retried on the manual clock) gives
        // token 2 and the request is resent with it.
        let mut send = Box::pin(auth.send(
            FakeRequest::get("https://api.test/x"),
            RequestOptions::default(),
            server.sender(|t| t == "at-SECRET-2"),
        ));
        let response = loop {
            if let std::task::Poll::Ready(out) = support::poll_once(&mut send) {
                break out.unwrap();
            }
            clock.advance(Duration::from_millis(10));
        };
        assert_eq!(response.status, 200);
        assert!(block_on(auth.flight().expect("an unkeyed policy").force_refresh()).is_err());
        assert!(auth.flight().expect("an unkeyed policy").is_auth_lost());
        block_on(
            auth.flight()
                .expect("an unkeyed policy")
                .install(Token::new("at-SECRET-login").with_refresh("rt-SECRET-login")),
        )
        .unwrap();
    });
    let spans = capture.spans.lock().unwrap().clone();
    let names: Vec<&str> = spans.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"tokenflight.request"), "{names:?}");
    assert!(names.contains(&"tokenflight.refresh"), "{names:?}");
    let observed = events.0.lock().unwrap().clone();
    assert!(
        observed.iter().any(|e| e.contains("AttemptFailed"))
            && observed.iter().any(|e| e.contains("AuthLost"))
            && observed.iter().any(|e| e.contains("RequestResent")),
        "{observed:?}"
    );
    let traced = capture.events.lock().unwrap().clone();
    let all = spans
        .iter()
        .flat_map(|(_, fields)| fields.iter().cloned())
        .chain(traced)
        .chain(observed);
    for line in all {
        assert!(!line.contains("SECRET"), "a secret leaked into {line}");
    }
}
