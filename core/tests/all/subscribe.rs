//! Token changes as a stream (C21): many subscribers on one coordinator each see every
//! generation in order or skip to the latest, never an older one after a newer one;
//! "re-authentication required" is an item; the stream ends with the coordinator.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use futures::task::noop_waker_ref;
use futures::{Stream, StreamExt};
use tokenflight::subscribe::{Subscription, TokenChange};
use tokenflight::{RefreshError, SingleFlight, Token, from_fn};

fn counting_flight() -> SingleFlight {
    let calls = Arc::new(AtomicU32::new(0));
    SingleFlight::builder()
        .source(from_fn(move |_cx| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(Token::new(format!("token-{n}"))) }
        }))
        .build()
        .unwrap()
}

fn poll_once(subscription: &mut Subscription) -> Poll<Option<TokenChange>> {
    let mut cx = Context::from_waker(noop_waker_ref());
    Pin::new(subscription).poll_next(&mut cx)
}

/// 1,000 subscribers; some poll after every refresh, some every seventh, some only at
/// the end. Each sees strictly increasing generations, ends on the last one, and the
/// eager ones see every generation.
#[test]
fn c21_thousand_subscribers_in_order_or_latest() {
    const SUBSCRIBERS: usize = 1_000;
    const REFRESHES: u64 = 50;
    let flight = counting_flight();
    let mut subscribers: Vec<(Subscription, Vec<u64>)> = (0..SUBSCRIBERS)
        .map(|_| (flight.subscribe(), Vec::new()))
        .collect();
    let mut generations = Vec::new();
    for round in 0..REFRESHES {
        let token = futures::executor::block_on(flight.force_refresh()).unwrap();
        generations.push(token.generation());
        for (i, (subscription, seen)) in subscribers.iter_mut().enumerate() {
            let polls_now = match i % 3 {
                0 => true,
                1 => round % 7 == 0,
                _ => false,
            };
            if !polls_now {
                continue;
            }
            while let Poll::Ready(Some(change)) = poll_once(subscription) {
                let TokenChange::Token(token) = change else {
                    panic!("only tokens were published");
                };
                seen.push(token.generation());
            }
        }
    }
    let last = *generations.last().unwrap();
    for (i, (subscription, seen)) in subscribers.iter_mut().enumerate() {
        while let Some(change) = subscription.try_next() {
            seen.push(change.token().unwrap().generation());
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "subscriber {i} saw an older generation after a newer one: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&last),
            "subscriber {i} ends on the latest"
        );
        if i % 3 == 0 {
            assert_eq!(
                seen, &generations,
                "an eager subscriber sees every generation"
            );
        }
        if i % 3 == 2 {
            assert_eq!(
                seen,
                &[last],
                "a subscriber that polls late skips to the latest"
            );
        }
    }
    // The memory a subscriber costs: the subscription itself, plus one event-listener
    // registration while it is pending.
    let size = std::mem::size_of::<Subscription>();
    println!("memory per subscriber: {size} bytes (Subscription), no task, no buffer");
    assert!(size <= 4 * std::mem::size_of::<usize>(), "{size} bytes");
}

/// Subscribers pending on other threads are woken by a refresh; concurrent refreshes
/// never make anyone see an older generation after a newer one.
#[test]
fn c21_pending_subscribers_are_woken_in_order() {
    let flight = counting_flight();
    futures::executor::block_on(flight.token()).unwrap();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let mut subscription = flight.subscribe();
            std::thread::spawn(move || {
                futures::executor::block_on(async move {
                    let mut seen = Vec::new();
                    while let Some(change) = subscription.next().await {
                        seen.push(change.token().unwrap().generation());
                    }
                    seen
                })
            })
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let flight = flight.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    futures::executor::block_on(flight.force_refresh()).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let last = flight.current().unwrap().generation();
    // The streams end once the coordinator (every clone) is gone.
    drop(flight);
    for reader in readers {
        let seen = reader.join().unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&last));
    }
}

/// A permanent failure is an item, and a login after it arrives as the next one.
#[test]
fn c21_auth_lost_is_an_item_and_a_login_follows() {
    let flight = SingleFlight::builder()
        .source(from_fn(|_cx| async {
            Err(RefreshError::permanent("invalid_grant"))
        }))
        .build()
        .unwrap();
    let mut changes = flight.subscribe();
    assert!(poll_once(&mut changes).is_pending());
    assert!(futures::executor::block_on(flight.token()).is_err());
    assert!(matches!(changes.try_next(), Some(TokenChange::AuthLost(_))));
    let login = futures::executor::block_on(flight.install(Token::new("login"))).unwrap();
    match changes.try_next() {
        Some(TokenChange::Token(token)) => assert_eq!(token.generation(), login.generation()),
        other => panic!("expected the login, got {other:?}"),
    }
    assert!(changes.try_next().is_none());
}

/// A subscription made after the first token starts with it; a rejection of the
/// current token is not a change.
#[test]
fn c21_first_item_is_the_current_token_and_rejections_are_not_changes() {
    let flight = counting_flight();
    let first = futures::executor::block_on(flight.token()).unwrap();
    let mut changes = flight.subscribe();
    assert_eq!(
        changes.try_next().unwrap().token().unwrap().generation(),
        first.generation()
    );
    flight.mark_rejected(first.generation());
    assert!(
        changes.try_next().is_none(),
        "a rejection alone publishes nothing"
    );
    let second = futures::executor::block_on(flight.token()).unwrap();
    assert!(second.generation() > first.generation());
    assert_eq!(
        changes.try_next().unwrap().token().unwrap().generation(),
        second.generation()
    );
}
