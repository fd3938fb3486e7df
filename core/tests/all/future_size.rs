//! The per-request future of `AuthPolicy::send` holds the request at most twice (issue
//! 18): once as the send future's (or, before the first poll, as the request itself,
//! in the same place) and once as the replay copy. An `async` block held it three
//! times (the captured argument for its whole life, the copy, the send future), and
//! adapters box this future and copy it on every request.

use std::convert::Infallible;

use tokenflight::adapter::{AuthRequest, InvalidHeader, RequestOptions};
use tokenflight::{AuthPolicy, Token, from_fn};
use url::Url;

use crate::support::FakeResponse;

const PAYLOAD: usize = 4096;

/// A request with a large inline part, so that each copy of it shows in the size.
struct BigRequest {
    url: Url,
    payload: [u8; PAYLOAD],
}

impl AuthRequest for BigRequest {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> {
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        Some(BigRequest {
            url: self.url.clone(),
            payload: self.payload,
        })
    }
}

#[test]
fn the_send_future_holds_the_request_at_most_twice() {
    let policy = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
        .allow_any_origin()
        .build()
        .unwrap();
    let request = BigRequest {
        url: Url::parse("https://api.example.com/x").unwrap(),
        payload: [7; PAYLOAD],
    };
    // The send future keeps the request until it answers, as a client's would.
    let send = |request: BigRequest| async move {
        let status = if request.payload[0] == 7 { 200 } else { 500 };
        Ok::<_, Infallible>(FakeResponse::status(status))
    };
    let future = policy.send(request, RequestOptions::default(), send);
    let size = std::mem::size_of_val(&future);
    // Printed for the record (`--nocapture`); the bound below is the contract.
    println!("send future: {size} bytes for a {PAYLOAD}-byte request");
    assert!(
        size < PAYLOAD * 5 / 2,
        "the future is {size} bytes for a {PAYLOAD}-byte request"
    );
    // And it still sends.
    let response = futures::executor::block_on(future).unwrap();
    assert_eq!(response.status, 200);
}

/// The send future for a small request: what every adapter's per-request future
/// carries on top of its client's. Printed for the record; bounded by the same rule.
#[test]
fn the_send_future_of_a_small_request_holds_it_at_most_twice() {
    struct Small(Url);
    impl AuthRequest for Small {
        fn method(&self) -> http::Method {
            http::Method::GET
        }
        fn url(&self) -> &Url {
            &self.0
        }
        fn url_mut(&mut self) -> &mut Url {
            &mut self.0
        }
        fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> {
            Ok(())
        }
        fn try_clone(&self) -> Option<Self> {
            Some(Small(self.0.clone()))
        }
    }
    let policy = AuthPolicy::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
        .allow_any_origin()
        .build()
        .unwrap();
    let request = Small(Url::parse("https://api.example.com/x").unwrap());
    let send = |request: Small| async move {
        let status = if request.0.path() == "/x" { 200 } else { 500 };
        Ok::<_, Infallible>(FakeResponse::status(status))
    };
    let send_size = std::mem::size_of_val(&send(Small(Url::parse("https://a.example/").unwrap())));
    let future = policy.send(request, RequestOptions::default(), send);
    let size = std::mem::size_of_val(&future);
    println!(
        "send future: {size} bytes for a {}-byte request whose own send future is {send_size}",
        std::mem::size_of::<Small>()
    );
    assert!(size <= send_size + 2 * std::mem::size_of::<Small>() + 512);
    let response = futures::executor::block_on(future).unwrap();
    assert_eq!(response.status, 200);
}
