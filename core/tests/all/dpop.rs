//! DPoP through the retry driver: a proof on every request that carries the token, the
//! resource server's nonce demand cured by one resend without a refresh, a second
//! demand returned as is ([C4]), `invalid_token` still a refresh ([C3]/[C4]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokenflight::adapter::{AuthResponse, RequestOptions, ResponseView};
use tokenflight::dpop::{Dpop, DpopKey, access_token_hash};
use tokenflight::{AuthPolicy, AuthPolicyBuilder, SingleFlight, test_util::ManualClock};

use crate::support::*;

const LONG: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Response {
    status: u16,
    www_authenticate: Option<String>,
    nonce: Option<String>,
}

impl ResponseView for Response {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        if name == http::header::WWW_AUTHENTICATE {
            self.www_authenticate.as_deref()
        } else if name == tokenflight::dpop::DPOP_NONCE {
            self.nonce.as_deref()
        } else {
            None
        }
    }
}

impl AuthResponse for Response {}

/// What the fake resource server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    claims: serde_json::Value,
}

/// A resource server that wants `DPoP <good token>` and a proof with its current nonce;
/// `rotate` says whether each demand issues a new nonce (a server whose nonce never
/// settles), `reject` whether the token itself is refused (`invalid_token`).
#[derive(Clone, Default)]
struct Server {
    seen: Arc<Mutex<Vec<Seen>>>,
    nonce: Arc<Mutex<u32>>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn sender(
        &self,
        good: &'static str,
        always_demand: bool,
        success_nonce: Option<&'static str>,
    ) -> impl FnMut(FakeRequest) -> futures::future::Ready<Result<Response, std::convert::Infallible>>
    {
        let this = self.clone();
        move |req: FakeRequest| {
            let claims = req
                .header("dpop")
                .and_then(|jws| jws.split('.').nth(1))
                .map(|c| {
                    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(c)
                        .unwrap();
                    serde_json::from_slice(&bytes).unwrap()
                })
                .unwrap_or(serde_json::Value::Null);
            let authorization = req.header("authorization").map(str::to_owned);
            this.seen.lock().unwrap().push(Seen {
                authorization: authorization.clone(),
                claims: claims.clone(),
            });
            let mut nonce = this.nonce.lock().unwrap();
            let current = format!("n-{}", *nonce);
            let token_ok = authorization.as_deref() == Some(&format!("DPoP {good}"))
                && claims["ath"] == access_token_hash(good);
            let response = if always_demand || claims["nonce"] != current.as_str() {
                if always_demand {
                    *nonce += 1;
                }
                Response {
                    status: 401,
                    www_authenticate: Some(r#"DPoP error="use_dpop_nonce""#.into()),
                    nonce: Some(format!("n-{}", *nonce)),
                }
            } else if !token_ok {
                Response {
                    status: 401,
                    www_authenticate: Some(r#"DPoP error="invalid_token""#.into()),
                    nonce: None,
                }
            } else {
                Response {
                    status: 200,
                    www_authenticate: None,
                    nonce: success_nonce.map(str::to_owned),
                }
            };
            futures::future::ready(Ok(response))
        }
    }
}

fn policy(clock: &ManualClock, source: &Arc<ScriptedSource>, dpop: &Dpop) -> AuthPolicy {
    let flight = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(tokenflight::config::Backoff::none())
        .retry(tokenflight::config::Retry::none())
        .refresh_ahead(None);
    AuthPolicyBuilder::<AuthPolicy>::from_flight(flight)
        .allowed_origin("https://api.test")
        .dpop(dpop.clone())
        .build()
        .unwrap()
}

fn get(
    auth: &AuthPolicy,
    send: impl FnMut(FakeRequest) -> futures::future::Ready<Result<Response, std::convert::Infallible>>
    + Send,
) -> Response {
    futures::executor::block_on(auth.send(
        FakeRequest::get("https://api.test/items?page=2"),
        RequestOptions::default(),
        send,
    ))
    .unwrap()
}

#[test]
fn a_nonce_demand_is_resent_once_with_the_nonce_and_costs_no_refresh() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let dpop = Dpop::new(DpopKey::generate().unwrap());
    let auth = policy(&clock, &source, &dpop);
    let server = Server::default();
    let response = get(&auth, server.sender("token-1", false, None));
    assert_eq!(response.status, 200);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "one resend");
    assert_eq!(source.calls(), 1, "no refresh for a nonce demand");
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some("DPoP token-1"));
        assert_eq!(s.claims["htm"], "GET");
        assert_eq!(s.claims["htu"], "https://api.test/items");
        assert_eq!(s.claims["ath"], access_token_hash("token-1"));
    }
    assert!(seen[0].claims.get("nonce").is_none());
    assert_eq!(seen[1].claims["nonce"], "n-0");
    assert_ne!(seen[0].claims["jti"], seen[1].claims["jti"]);
    // The nonce is now the origin's: the next request needs no resend.
    assert_eq!(
        get(&auth, server.sender("token-1", false, None)).status,
        200
    );
    assert_eq!(server.seen().len(), 3);
    assert_eq!(source.calls(), 1);
}

#[test]
fn c4_a_second_nonce_demand_is_returned_as_is() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let dpop = Dpop::new(DpopKey::generate().unwrap());
    let auth = policy(&clock, &source, &dpop);
    let server = Server::default();
    let response = get(&auth, server.sender("token-1", true, None));
    assert_eq!(response.status, 401);
    assert_eq!(server.seen().len(), 2, "no loop");
    assert_eq!(source.calls(), 1, "no refresh");
}

#[test]
fn c4_invalid_token_still_means_a_refresh_and_a_success_rotates_the_nonce() {
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let dpop = Dpop::new(DpopKey::generate().unwrap());
    let auth = policy(&clock, &source, &dpop);
    let server = Server::default();
    let url = url::Url::parse("https://api.test/").unwrap();
    dpop.nonces().set(&url, "n-0");
    // token-1 is refused: a refresh, and the resend carries token-2 with a new proof.
    let response = get(&auth, server.sender("token-2", false, Some("n-0")));
    assert_eq!(response.status, 200);
    assert_eq!(source.calls(), 2);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].authorization.as_deref(), Some("DPoP token-2"));
    assert_eq!(seen[1].claims["ath"], access_token_hash("token-2"));
    // A success's DPoP-Nonce replaces the cached one.
    *server.nonce.lock().unwrap() = 7;
    let response = get(&auth, server.sender("token-2", false, Some("n-7")));
    assert_eq!(response.status, 200, "one nonce demand, one resend");
    assert_eq!(dpop.nonces().get(&url).as_deref(), Some("n-7"));
    let jtis: HashSet<String> = server
        .seen()
        .iter()
        .map(|s| s.claims["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), server.seen().len(), "no jti reused");
}

/// Another request's response that lands between a demand and its resend (here an
/// observer that writes an older nonce into the cache just before the resend's proof is
/// made) must not spoil the resend: it carries the nonce the demand gave.
#[test]
fn the_resend_carries_the_demanded_nonce_even_if_an_older_one_landed_meanwhile() {
    struct LateResponse(Dpop, Arc<Mutex<u32>>);
    impl tokenflight::observe::Observer for LateResponse {
        fn request_authorized(&self, _event: &tokenflight::observe::RequestAuthorized) {
            let url = url::Url::parse("https://api.test/").unwrap();
            self.0.nonces().set(&url, "n-stale");
            *self.1.lock().unwrap() += 1;
        }
    }
    let clock = ManualClock::at_fixed_point();
    let source = ScriptedSource::new(&clock, Step::Ok(LONG));
    let dpop = Dpop::new(DpopKey::generate().unwrap());
    let overwrites = Arc::new(Mutex::new(0));
    let flight = SingleFlight::builder()
        .source(source.clone())
        .clock(Arc::new(clock.clone()))
        .timer(Arc::new(clock.clone()))
        .backoff(tokenflight::config::Backoff::none())
        .retry(tokenflight::config::Retry::none())
        .refresh_ahead(None)
        .observer(LateResponse(dpop.clone(), overwrites.clone()));
    let auth = AuthPolicyBuilder::<AuthPolicy>::from_flight(flight)
        .allowed_origin("https://api.test")
        .dpop(dpop.clone())
        .build()
        .unwrap();
    let server = Server::default();
    let response = get(&auth, server.sender("token-1", false, None));
    assert_eq!(
        *overwrites.lock().unwrap(),
        2,
        "the stale nonce landed before the first send and again before the resend"
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "one resend");
    assert_eq!(seen[0].claims["nonce"], "n-stale");
    assert_eq!(
        seen[1].claims["nonce"], "n-0",
        "the demand's nonce, not the cache's"
    );
    assert_eq!(response.status, 200);
    assert_eq!(source.calls(), 1, "no refresh");
}
