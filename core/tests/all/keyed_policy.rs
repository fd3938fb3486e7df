//! Issue 17 in the adapters' path: a keyed `AuthPolicy` picks each request's token by its
//! `TokenKey` marker or, without one, by its key function (default: the origin). Every
//! request — first send and resend — carries a token of its own key; per key, one
//! source call per expiry; the builder refuses what would be shared between keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::executor::block_on;
use futures::future::join_all;
use proptest::prelude::*;
use tokenflight::adapter::{
    AuthRequest, AuthResponse, InvalidHeader, RequestOptions, ResponseView,
};
use tokenflight::keyed::TokenKey;
use tokenflight::{AuthPolicy, ConfigError, Error, Token, from_fn, store::MemoryStore};

use crate::support::{poll_once, yield_now};

/// A toy request: URL, method and the header the policy sets.
struct Req {
    url: url::Url,
    authorization: Option<String>,
}

impl AuthRequest for Req {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &url::Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut url::Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, _: &str, value: &str) -> Result<(), InvalidHeader> {
        self.authorization = Some(value.to_owned());
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        Some(Req {
            url: self.url.clone(),
            authorization: self.authorization.clone(),
        })
    }
}

struct Resp(u16);

impl ResponseView for Resp {
    fn status(&self) -> u16 {
        self.0
    }
    fn header(&self, _: &http::HeaderName) -> Option<&str> {
        None
    }
}

impl AuthResponse for Resp {}

/// Source calls per key; a key's token is `<key>#<call>`.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<String, usize>>>);

impl Calls {
    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// A keyed policy whose key `k`'s source hands out `k#1`, `k#2`, ...
fn keyed_policy(calls: &Calls) -> AuthPolicy {
    keyed_policy_keeping(calls, 10_000)
}

/// [`keyed_policy`] keeping at most `max_keys` coordinators.
fn keyed_policy_keeping(calls: &Calls, max_keys: usize) -> AuthPolicy {
    let calls = calls.clone();
    AuthPolicy::builder()
        .allow_any_origin()
        .keyed(move |key: &TokenKey, shared| {
            let key = key.as_str().to_owned();
            let calls = calls.clone();
            shared
                .source(from_fn(move |_cx| {
                    let mut all = calls.0.lock().unwrap();
                    let n = all.entry(key.clone()).or_default();
                    *n += 1;
                    let token = Token::new(format!("{key}#{n}"));
                    async move { Ok(token) }
                }))
                .build()
        })
        .key_bounds(max_keys, None)
        .build()
        .unwrap()
}

/// The key a token was issued for and its call number.
fn issued(authorization: &str) -> (String, usize) {
    let token = authorization.strip_prefix("Bearer ").unwrap();
    let (key, n) = token.rsplit_once('#').unwrap();
    (key.to_owned(), n.parse().unwrap())
}

#[test]
fn without_a_marker_the_key_is_the_origin() {
    let calls = Calls::default();
    let policy = keyed_policy(&calls);
    let sent = Arc::new(Mutex::new(Vec::new()));
    for url in [
        "https://a.example/x",
        "https://b.example/y",
        "https://a.example/z",
    ] {
        let sent = sent.clone();
        let request = Req {
            url: url.parse().unwrap(),
            authorization: None,
        };
        let response = block_on(
            policy.send(request, RequestOptions::default(), move |r: Req| {
                sent.lock().unwrap().push(r.authorization.unwrap());
                async { Ok::<_, std::convert::Infallible>(Resp(200)) }
            }),
        );
        assert_eq!(response.unwrap().0, 200);
    }
    assert_eq!(
        *sent.lock().unwrap(),
        [
            "Bearer https://a.example#1",
            "Bearer https://b.example#1",
            "Bearer https://a.example#1"
        ]
    );
    assert_eq!(policy.keyed().unwrap().len(), 2);
    assert!(policy.flight().is_none());
    assert_eq!(policy.stats().source_calls, 2);
}

#[test]
fn a_marker_chooses_the_token_and_a_key_function_replaces_the_origin() {
    let calls = Calls::default();
    let c = calls.clone();
    let policy = AuthPolicy::builder()
        .allow_any_origin()
        .keyed(move |key: &TokenKey, shared| {
            let key = key.as_str().to_owned();
            let c = c.clone();
            shared
                .source(from_fn(move |_cx| {
                    *c.0.lock().unwrap().entry(key.clone()).or_default() += 1;
                    let token = Token::new(format!("{key}#1"));
                    async move { Ok(token) }
                }))
                .build()
        })
        .token_key(|_method, url| TokenKey::new(format!("path:{}", url.path())))
        .build()
        .unwrap();
    let send = |url: &str, key: Option<&str>| {
        let request = Req {
            url: url.parse().unwrap(),
            authorization: None,
        };
        let options = RequestOptions::default().with_key(key.map(TokenKey::new));
        block_on(policy.send(request, options, |r: Req| async move {
            Ok::<_, std::convert::Infallible>(Answer(200, r.authorization))
        }))
        .map(|answer| answer.1.unwrap())
    };
    assert_eq!(
        send("https://a.example/me", Some("alice")).unwrap(),
        "Bearer alice#1"
    );
    assert_eq!(
        send("https://a.example/me", None).unwrap(),
        "Bearer path:/me#1"
    );
    assert_eq!(calls.of("alice"), 1);
    assert_eq!(calls.of("path:/me"), 1);
}

/// A response that also tells which key's token the request carried.
struct Answer(u16, Option<String>);

impl ResponseView for Answer {
    fn status(&self) -> u16 {
        self.0
    }
    fn header(&self, _: &http::HeaderName) -> Option<&str> {
        None
    }
}

impl AuthResponse for Answer {}

#[test]
fn a_key_on_a_policy_with_one_token_is_refused_not_ignored() {
    let policy = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("the-only-token")) }))
        .allow_any_origin()
        .build()
        .unwrap();
    let request = Req {
        url: "https://a.example/".parse().unwrap(),
        authorization: None,
    };
    let sent = AtomicUsize::new(0);
    let result = block_on(policy.send(
        request,
        RequestOptions::default().with_key(Some(TokenKey::new("alice"))),
        |_r: Req| {
            sent.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Resp(200)) }
        },
    ));
    let error = result.err().expect("a typed error");
    assert!(matches!(
        error,
        tokenflight::adapter::AuthError::Token(Error::Refresh(_))
    ));
    // A fault of the caller's configuration, not of the token source.
    assert!(error.is_misconfigured(), "{error:?}");
    let tokenflight::adapter::AuthError::Token(token_error) = &error else {
        panic!("not a token error: {error:?}")
    };
    assert_eq!(
        token_error.refresh_error().cause(),
        tokenflight::Cause::Config
    );
    assert!(
        std::error::Error::source(token_error.refresh_error())
            .and_then(|e| e.downcast_ref::<ConfigError>())
            .is_some(),
        "the ConfigError is the source"
    );
    assert!(!error.to_string().contains("alice"), "{error}");
    assert_eq!(sent.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[test]
fn a_failing_key_factory_is_a_configuration_error_not_the_sources() {
    let policy = AuthPolicy::builder()
        .allow_any_origin()
        .keyed(|_key: &TokenKey, shared: tokenflight::FlightBuilder| {
            // No source: the factory cannot make the key's coordinator.
            shared.build()
        })
        .build()
        .unwrap();
    let request = Req {
        url: "https://a.example/".parse().unwrap(),
        authorization: None,
    };
    let sent = AtomicUsize::new(0);
    let result = block_on(policy.send(request, RequestOptions::default(), |_r: Req| {
        sent.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(Resp(200)) }
    }));
    let error = result.err().expect("a typed error");
    assert!(error.is_misconfigured(), "{error:?}");
    assert!(!error.is_reauthentication_required(), "{error:?}");
    let tokenflight::adapter::AuthError::Token(token_error) = &error else {
        panic!("not a token error: {error:?}")
    };
    assert_eq!(
        token_error.refresh_error().cause(),
        tokenflight::Cause::Config
    );
    assert_eq!(
        std::error::Error::source(token_error.refresh_error())
            .and_then(|e| e.downcast_ref::<ConfigError>()),
        Some(&ConfigError::MissingSource)
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[test]
fn a_keyed_policy_refuses_a_source_store_or_initial_token_shared_by_every_key() {
    let factory = |_key: &TokenKey, shared: tokenflight::FlightBuilder| {
        shared
            .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
            .build()
    };
    let base = || AuthPolicy::builder().allow_any_origin();
    let refused = |result: Result<AuthPolicy, ConfigError>, what: &str| match result {
        Err(ConfigError::InvalidSetting(message)) => assert!(message.contains(what), "{message}"),
        other => panic!("expected a refusal naming {what}, got {other:?}"),
    };
    refused(
        base()
            .source(from_fn(|_cx| async { Ok(Token::new("shared")) }))
            .keyed(factory)
            .build(),
        "source",
    );
    refused(
        base().store(MemoryStore::new()).keyed(factory).build(),
        "store",
    );
    refused(
        base()
            .initial_token(Token::new("shared"))
            .keyed(factory)
            .build(),
        "initial_token",
    );
    refused(
        base()
            .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
            .token_key(|_, url| TokenKey::origin(url))
            .build(),
        "token_key",
    );
    // Shared timing settings are fine, and reach every key's coordinator.
    let policy = base()
        .leeway(std::time::Duration::from_secs(7))
        .keyed(factory)
        .key_bounds(10, None)
        .build()
        .unwrap();
    let flight = policy.keyed().unwrap().flight(&TokenKey::new("k")).unwrap();
    assert_eq!(flight.config().leeway, std::time::Duration::from_secs(7));
}

#[test]
fn keys_never_show_in_debug() {
    let calls = Calls::default();
    let policy = keyed_policy(&calls);
    let key = TokenKey::new("alice@example.com");
    block_on(policy.keyed().unwrap().token(&key)).unwrap();
    let shown = format!(
        "{policy:?} {key:?} {:?}",
        RequestOptions::default().with_key(Some(key.clone()))
    );
    assert!(!shown.contains("alice"), "{shown}");
}

/// One step of the property: a batch of requests at once (each a key, sent with the
/// marker or found by the origin), or the server expiring one key's tokens.
#[derive(Clone, Debug)]
enum Step {
    Batch(Vec<(u8, bool)>),
    Expire(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop::collection::vec((0u8..4, any::<bool>()), 1..12).prop_map(Step::Batch),
        1 => (0u8..4).prop_map(Step::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every request, first send and resend, carries a token of its own key; each
    /// answered 200 (a rejected one is resent once, C4); per key and batch, one source
    /// call if the key had no valid token (C1, C3), none otherwise.
    #[test]
    fn every_request_carries_its_own_keys_token(steps in prop::collection::vec(step(), 1..12)) {
        let calls = Calls::default();
        let policy = keyed_policy(&calls);
        // The server: the oldest call number still valid per key (expiry moves it on).
        let valid_from: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        // Sends (first or resend) that carried a token of another key than the request's.
        let crossed = Arc::new(AtomicUsize::new(0));
        // Keys whose token the client does not hold valid (never fetched or expired).
        let mut stale: std::collections::HashSet<String> =
            (0..4).map(|k| format!("https://k{k}.example")).collect();
        for step in steps {
            match step {
                Step::Expire(k) => {
                    let key = format!("https://k{k}.example");
                    let next = calls.of(&key) + 1;
                    valid_from.lock().unwrap().insert(key.clone(), next);
                    stale.insert(key);
                }
                Step::Batch(requests) => {
                    let before: BTreeMap<String, usize> = calls.0.lock().unwrap().clone();
                    let sends = requests.iter().map(|&(k, marker)| {
                        let key = format!("https://k{k}.example");
                        let request = Req {
                            url: format!("{key}/r").parse().unwrap(),
                            authorization: None,
                        };
                        let options = RequestOptions::default()
                            .with_key(marker.then(|| TokenKey::new(key.as_str())));
                        let valid_from = valid_from.clone();
                        let crossed = crossed.clone();
                        let policy = &policy;
                        async move {
                            let result = policy
                                .send(request, options, |r: Req| {
                                    let (issued_for, n) = issued(r.authorization.as_deref().unwrap());
                                    let ours = issued_for == key;
                                    if !ours {
                                        crossed.fetch_add(1, Ordering::SeqCst);
                                    }
                                    let fresh = n >= valid_from.lock().unwrap().get(&key).copied().unwrap_or(0);
                                    async move {
                                        // Every request of the batch is on the wire before any answer.
                                        yield_now().await;
                                        Ok::<_, std::convert::Infallible>(Answer(if ours && fresh { 200 } else { 401 }, Some(issued_for)))
                                    }
                                })
                                .await;
                            (key, result)
                        }
                    });
                    for (key, result) in block_on(join_all(sends)) {
                        let answer = result.unwrap();
                        prop_assert_eq!(answer.1.as_deref(), Some(key.as_str()), "a token of another key");
                        prop_assert_eq!(answer.0, 200);
                    }
                    prop_assert_eq!(crossed.load(Ordering::SeqCst), 0, "sends with another key's token");
                    let used: std::collections::BTreeSet<String> =
                        requests.iter().map(|&(k, _)| format!("https://k{k}.example")).collect();
                    for key in (0..4).map(|k| format!("https://k{k}.example")) {
                        let made = calls.of(&key) - before.get(&key).copied().unwrap_or(0);
                        let expected = usize::from(used.contains(&key) && stale.contains(&key));
                        prop_assert_eq!(made, expected, "source calls of {} in this batch", key);
                    }
                    for key in used {
                        stale.remove(&key);
                    }
                }
            }
        }
    }
}

/// C22: a request that went out holds its key's coordinator until its response is
/// classified. Evicting the key meanwhile (a new key arrives at a full map) must not
/// leave a second coordinator for it: new requests of the key share the one the request
/// holds, and its rejection refreshes that one — one refresh for the key, and every
/// request of the key carries the same tokens.
#[test]
fn c22_eviction_never_leaves_two_coordinators_for_one_key() {
    let calls = Calls::default();
    let policy = keyed_policy_keeping(&calls, 1);
    let a = "https://a.example";
    let request = |origin: &str| Req {
        url: format!("{origin}/r").parse().unwrap(),
        authorization: None,
    };
    // Every send of key `a`: the token it carried.
    let sent = Arc::new(Mutex::new(Vec::new()));
    let send = |answer: Option<futures::channel::oneshot::Receiver<u16>>| {
        let sent = sent.clone();
        let mut answer = answer;
        move |r: Req| {
            sent.lock().unwrap().push(r.authorization.unwrap());
            let answer = answer.take();
            async move {
                let status = match answer {
                    Some(answer) => answer.await.unwrap_or(500),
                    None => 200,
                };
                Ok::<_, std::convert::Infallible>(Resp(status))
            }
        }
    };
    // A request of `a` is out; its answer is held.
    let (answer, held) = futures::channel::oneshot::channel();
    let mut first = Box::pin(policy.send(request(a), RequestOptions::default(), send(Some(held))));
    assert!(poll_once(&mut first).is_pending());
    // Key `b` arrives at the full map.
    let other = policy.send(
        request("https://b.example"),
        RequestOptions::default(),
        |_r: Req| async { Ok::<_, std::convert::Infallible>(Resp(200)) },
    );
    assert_eq!(block_on(other).unwrap().0, 200);
    // Another request of `a` while the first is out.
    let second = policy.send(request(a), RequestOptions::default(), send(None));
    assert_eq!(block_on(second).unwrap().0, 200);
    // The first request's token is rejected: refreshed once, resent.
    answer.send(401).unwrap();
    assert_eq!(block_on(first).unwrap().0, 200);
    let third = policy.send(request(a), RequestOptions::default(), send(None));
    assert_eq!(block_on(third).unwrap().0, 200);
    assert_eq!(
        *sent.lock().unwrap(),
        [
            "Bearer https://a.example#1", // the first request
            "Bearer https://a.example#1", // the second: the same coordinator's token
            "Bearer https://a.example#2", // the first's resend, after the one refresh
            "Bearer https://a.example#2", // the third: that refresh, not another's
        ]
    );
    assert_eq!(calls.of(a), 2, "one first token and one refresh for key a");
    // Once nothing holds it, key `a`'s coordinator is an ordinary entry again: the map
    // returns to its bound at the next new key.
    let next = policy.send(
        request("https://c.example"),
        RequestOptions::default(),
        |_r: Req| async { Ok::<_, std::convert::Infallible>(Resp(200)) },
    );
    assert_eq!(block_on(next).unwrap().0, 200);
    assert!(policy.keyed().unwrap().len() <= 2);
}

/// C22 through the policy builder: a keyed policy measures its keys' idle time on the
/// clock set on its builder (a test's manual clock moves it), not on the system's.
#[test]
fn c22_a_keyed_policy_measures_idle_keys_on_its_clock() {
    let clock = tokenflight::test_util::ManualClock::at_fixed_point();
    let policy = AuthPolicy::builder()
        .allow_any_origin()
        .clock(clock.clone())
        .keyed(|_key: &TokenKey, shared| {
            shared
                .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
                .build()
        })
        .key_bounds(10, Some(std::time::Duration::from_secs(60)))
        .build()
        .unwrap();
    let request = Req {
        url: "https://a.example/r".parse().unwrap(),
        authorization: None,
    };
    let sent = policy.send(request, RequestOptions::default(), |_r: Req| async {
        Ok::<_, std::convert::Infallible>(Resp(200))
    });
    assert_eq!(block_on(sent).unwrap().0, 200);
    let keyed = policy.keyed().unwrap();
    clock.advance(std::time::Duration::from_secs(59));
    assert_eq!(keyed.evict_idle(), 0, "used 59 s ago by the policy's clock");
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(
        keyed.evict_idle(),
        1,
        "unused for a minute by the policy's clock"
    );
}
