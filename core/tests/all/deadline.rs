//! Deadline-aware admission (C20): a request that says how long its token must stay
//! valid is sent with a token that does, after one shared refresh if needed, or with
//! the freshest token and an event when no token can last that long.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenflight::adapter::Clock;
use tokenflight::observe::{Observer, ShorterThanAsked};
use tokenflight::test_util::ManualClock;
use tokenflight::{SingleFlight, Token, from_fn};

const LIFETIME: Duration = Duration::from_secs(2);

#[derive(Default, Clone)]
struct Shorter(Arc<Mutex<Vec<(u64, Duration)>>>);

impl Observer for Shorter {
    fn token_shorter_than_asked(&self, event: &ShorterThanAsked) {
        self.0.lock().unwrap().push((event.generation, event.asked));
    }
}

/// A coordinator whose source issues 2-second tokens on the manual clock.
fn two_second_flight(
    clock: &ManualClock,
    calls: &Arc<AtomicU32>,
    shorter: &Shorter,
) -> SingleFlight {
    two_second_builder(clock, calls, shorter).build().unwrap()
}

fn two_second_builder(
    clock: &ManualClock,
    calls: &Arc<AtomicU32>,
    shorter: &Shorter,
) -> tokenflight::FlightBuilder {
    let (source_clock, calls) = (clock.clone(), Arc::clone(calls));
    SingleFlight::builder()
        .source(from_fn(move |_cx| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let now = Clock::now(&source_clock);
            async move { Ok(Token::new(format!("t{n}")).expires_in(LIFETIME, now)) }
        }))
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .leeway(Duration::from_millis(100))
        .refresh_ahead(None)
        .min_refresh_interval(Duration::from_millis(100))
        .observer(shorter.clone())
}

/// 50 requests whose deadline (1.5 s) exceeds the token's remaining life (0.9 s): one
/// refresh for all of them, and every one is sent with a token still valid when its
/// deadline comes (the server would reject none of them for expiry).
#[test]
fn c20_fifty_long_requests_share_one_refresh_and_none_expires_on_the_wire() {
    let clock = ManualClock::at_fixed_point();
    let calls = Arc::new(AtomicU32::new(0));
    let shorter = Shorter::default();
    let flight = two_second_flight(&clock, &calls, &shorter);
    let first = futures::executor::block_on(flight.token()).unwrap();
    clock.advance(Duration::from_millis(1_100));
    let need = Duration::from_millis(1_500);
    // Sent as they are, these would expire on the way.
    let now = Clock::now(&clock);
    assert!(first.expiry().unwrap() < now + need);
    let tokens = futures::executor::block_on(futures::future::join_all(
        (0..50).map(|_| flight.token_valid_for(need)),
    ));
    let deadline = now + need;
    let mut expired_on_the_wire = 0;
    for token in &tokens {
        let token = token.as_ref().unwrap();
        assert!(token.generation() > first.generation());
        if token.is_expired(deadline, Duration::ZERO) {
            expired_on_the_wire += 1;
        }
    }
    assert_eq!(
        expired_on_the_wire, 0,
        "requests that would be rejected for expiry"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first token and one refresh for all 50"
    );
    assert!(shorter.0.lock().unwrap().is_empty());
    // The new token lasts: later long requests take it at once.
    let again = futures::executor::block_on(flight.token_valid_for(need)).unwrap();
    assert_eq!(again.generation(), tokens[0].as_ref().unwrap().generation());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A deadline longer than the whole lifetime: the freshest token and an event, no
/// refresh while the token is in its first half, one once it is past it.
#[test]
fn c20_a_deadline_longer_than_the_lifetime_gets_the_freshest_token_and_an_event() {
    let clock = ManualClock::at_fixed_point();
    let calls = Arc::new(AtomicU32::new(0));
    let shorter = Shorter::default();
    let flight = two_second_flight(&clock, &calls, &shorter);
    let need = Duration::from_secs(10);
    let first = futures::executor::block_on(flight.token_valid_for(need)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_millis(500));
    let same = futures::executor::block_on(flight.token_valid_for(need)).unwrap();
    assert_eq!(
        same.generation(),
        first.generation(),
        "no refresh in the first half"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_millis(700));
    let fresher = futures::executor::block_on(flight.token_valid_for(need)).unwrap();
    assert!(
        fresher.generation() > first.generation(),
        "refreshed past half its life"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let events = shorter.0.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            (first.generation(), need),
            (first.generation(), need),
            (fresher.generation(), need)
        ]
    );
}

/// Through the retry driver, with the `ValidFor` option an adapter derives from a
/// request's deadline: 50 requests needing 1.5 s while the token has 0.9 s left. The
/// fake server answers at each request's deadline and rejects a token expired by then:
/// 0 rejections, one refresh. Without the option the first request goes out with the
/// short token and is rejected (the control below).
#[test]
fn c20_through_the_driver_no_request_is_rejected_for_expiry() {
    use tokenflight::adapter::RequestOptions;
    use tokenflight::{AuthPolicy, AuthPolicyBuilder};

    use crate::support::{FakeRequest, FakeResponse};

    let need = Duration::from_millis(1_500);
    let run = |valid_for: Option<Duration>| {
        let clock = ManualClock::at_fixed_point();
        let calls = Arc::new(AtomicU32::new(0));
        let policy = AuthPolicyBuilder::<AuthPolicy>::from_flight(two_second_builder(
            &clock,
            &calls,
            &Shorter::default(),
        ))
        .allowed_origin("https://api.test")
        .build()
        .unwrap();
        let flight = policy.flight().unwrap().clone();
        futures::executor::block_on(flight.token()).unwrap();
        clock.advance(Duration::from_millis(1_100));
        let deadline = Clock::now(&clock) + need;
        let rejected = Arc::new(AtomicU32::new(0));
        let sends = (0..50).map(|_| {
            let (flight, rejected) = (flight.clone(), Arc::clone(&rejected));
            policy.send(
                FakeRequest::get("https://api.test/upload"),
                RequestOptions::default().with_valid_for(valid_for),
                move |request: FakeRequest| {
                    // The server checks the token it got against the time the request
                    // ends: the current token if it is this one, else an older one.
                    let current = flight.current().unwrap();
                    let carried = request.header("authorization").map(str::to_owned);
                    let same = carried.as_deref()
                        == Some(format!("Bearer {}", current.access().expose()).as_str());
                    let alive = same && !current.is_expired(deadline, Duration::ZERO);
                    if !alive {
                        rejected.fetch_add(1, Ordering::SeqCst);
                    }
                    futures::future::ready(Ok::<_, std::convert::Infallible>(FakeResponse::status(
                        if alive { 200 } else { 401 },
                    )))
                },
            )
        });
        let _ = futures::executor::block_on(futures::future::join_all(sends));
        (
            rejected.load(Ordering::SeqCst),
            calls.load(Ordering::SeqCst),
        )
    };
    let (rejected, calls) = run(Some(need));
    assert_eq!(rejected, 0, "requests rejected on the wire for expiry");
    assert_eq!(calls, 2, "the first token and one refresh for all 50");
    let (rejected, _) = run(None);
    assert!(
        rejected >= 1,
        "without a deadline the first request goes out with the short token: {rejected}"
    );
}
