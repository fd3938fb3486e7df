//! Issue 18: the origin checks ([C12]) read [`AuthRequest::origin`], and a request's
//! full URL is read only when a skipped route needs its path. An adapter that builds
//! the full URL per request (tower, from an `http::Uri`) then builds it only then; the
//! answers are the same as reading the full URL.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use futures::executor::block_on;
use tokenflight::adapter::{AuthRequest, InvalidHeader, RequestOptions, RequestOrigin};
use tokenflight::{AuthPolicy, AuthPolicyBuilder, Token, from_fn};

use crate::support::FakeResponse;

/// A request that counts how often its full URL is read; its origin URL is the full
/// URL with another path, as an adapter's shared origin URL would be.
struct CountingRequest {
    url: url::Url,
    origin: url::Url,
    url_reads: Cell<usize>,
    authorization: Option<String>,
}

impl CountingRequest {
    fn get(url: &str) -> Self {
        let url = url::Url::parse(url).unwrap();
        let mut origin = url.clone();
        origin.set_path("/elsewhere");
        origin.set_query(None);
        CountingRequest {
            url,
            origin,
            url_reads: Cell::new(0),
            authorization: None,
        }
    }
}

impl AuthRequest for CountingRequest {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &url::Url {
        self.url_reads.set(self.url_reads.get() + 1);
        &self.url
    }
    fn origin(&self) -> RequestOrigin<'_> {
        RequestOrigin::Url(&self.origin)
    }
    fn url_mut(&mut self) -> &mut url::Url {
        self.url_reads.set(self.url_reads.get() + 1);
        &mut self.url
    }
    fn set_sensitive_header(&mut self, _: &str, value: &str) -> Result<(), InvalidHeader> {
        self.authorization = Some(value.to_owned());
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

// `Cell` is `Send`; the core holds the request by value.
fn policy(
    configure: impl FnOnce(AuthPolicyBuilder<AuthPolicy>) -> AuthPolicyBuilder<AuthPolicy>,
) -> AuthPolicy {
    let builder = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("fresh")) }))
        .initial_token(
            Token::new("valid").expires_in(Duration::from_secs(3600), SystemTime::now()),
        );
    configure(builder).build().unwrap()
}

/// Sends `request` through `policy`; the header the request went out with and how often
/// its full URL was read.
fn send(policy: &AuthPolicy, request: CountingRequest) -> (Option<String>, usize) {
    send_with(policy, request, RequestOptions::default())
}

/// [`send`] with `options`.
fn send_with(
    policy: &AuthPolicy,
    request: CountingRequest,
    options: RequestOptions,
) -> (Option<String>, usize) {
    let sent = std::sync::Mutex::new(None);
    let response = block_on(policy.send(request, options, |request| {
        *sent.lock().unwrap() = Some((request.authorization.clone(), request.url_reads.get()));
        futures::future::ready(Ok::<_, std::convert::Infallible>(FakeResponse::status(200)))
    }));
    assert_eq!(response.unwrap().status, 200);
    sent.into_inner().unwrap().unwrap()
}

#[test]
fn c12_origin_checks_read_only_the_origin_url_when_no_route_is_skipped() {
    let policy = policy(|b| b.allowed_origin("https://api.test"));
    let (authorization, url_reads) = send(&policy, CountingRequest::get("https://api.test/x?y=1"));
    assert_eq!(authorization.as_deref(), Some("Bearer valid"));
    assert_eq!(url_reads, 0, "the full URL is not needed");
    let (authorization, _) = send(&policy, CountingRequest::get("https://other.test/x"));
    assert_eq!(authorization, None, "another origin gets no token");
}

#[test]
fn c11_a_skipped_route_reads_the_full_url_path() {
    let policy = policy(|b| {
        b.allowed_origin("https://api.test")
            .skip_route(None, "/login")
    });
    // The origin URL's path is `/elsewhere`: only the full URL says `/login`.
    let (authorization, url_reads) = send(&policy, CountingRequest::get("https://api.test/login"));
    assert_eq!(authorization, None, "skipped by its path");
    assert!(url_reads > 0);
    let (authorization, _) = send(&policy, CountingRequest::get("https://api.test/x"));
    assert_eq!(authorization.as_deref(), Some("Bearer valid"));
}

/// The origin is checked before a skipped route reads the URL: a request to an origin
/// that gets no token never has its URL built (an adapter's `Uri` whose URL may not
/// parse is only read once it was let in).
#[test]
fn c12_a_request_to_another_origin_is_refused_before_its_url_is_read() {
    let policy = policy(|b| {
        b.allowed_origin("https://api.test")
            .skip_route(None, "/login")
    });
    let request = CountingRequest::get("https://other.test/x");
    assert!(!policy.attaches_token(&request, &RequestOptions::default()));
    assert_eq!(request.url_reads.get(), 0);
    let (authorization, url_reads) = send(&policy, CountingRequest::get("https://other.test/x"));
    assert_eq!(authorization, None);
    assert_eq!(url_reads, 0, "refused on its origin alone");
}

#[test]
fn attaches_token_agrees_with_what_send_attaches() {
    let policies = [
        policy(|b| b.allowed_origin("https://api.test")),
        policy(|b| {
            b.allowed_origin("https://api.test")
                .skip_route(None, "/login")
        }),
        policy(|b| {
            b.allow_any_origin()
                .skip_route(Some(http::Method::GET), "/health")
        }),
    ];
    let urls = [
        "https://api.test/x",
        "https://api.test/login/step",
        "https://api.test:443/health",
        "https://API.test/x",
        "http://api.test/x",
        "https://other.test/health",
    ];
    for (i, policy) in policies.iter().enumerate() {
        for url in urls {
            for skip_auth in [false, true] {
                let options = RequestOptions::from_markers(skip_auth, false);
                let request = CountingRequest::get(url);
                let predicted = policy.attaches_token(&request, &options);
                let (authorization, _) = send_with(policy, request, options);
                assert_eq!(
                    predicted,
                    authorization.is_some(),
                    "policy {i}, {url}, skip_auth {skip_auth}"
                );
            }
        }
    }
}
