//! Issue 16: one `tracing` span per flight with reason, generation, attempts and
//! outcome; one `tokenflight.request` span per authenticated request (generation used,
//! waited or not, resent or not) that ties a slow request to the refresh it waited
//! for; no span field and no event of the core carries a token or a secret (C12).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use support::{FakeRequest, FakeServer, ScriptedSource, Step};
use tokenflight::{Backoff, Builder, ManualClock, RequestOptions, Retry, Token};
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
        let flight = Builder::new()
            .source_arc(source.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(clock.clone()))
            .backoff(Backoff::none())
            .retry(Retry::none())
            .refresh_ahead(None)
            .initial_token(
                Token::new("old-secret")
                    .with_refresh("old-refresh")
                    .expires_at(tokenflight::Clock::now(&clock) - Duration::from_secs(1)),
            )
            .build_flight()
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
        let auth = Builder::new()
            .source_arc(source.clone())
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
