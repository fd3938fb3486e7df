//! The tower contract, with a scripted inner service (no network): readiness
//! (`poll_ready` before every `call`, also for the resend), errors callers can tell
//! apart, and which requests are replayed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::ready;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokenflight::{
    Error as TokenError, RefreshContext, RefreshError, Token, adapter::AuthError, from_fn,
};
use tokenflight_tower::{TokenLayer, TokenService};
use tower::{Layer, Service, ServiceExt};

/// Refuses a call on an instance that `poll_ready` did not ready (as a tower service
/// with reserved capacity would); a clone starts out not ready. Answers 401 to the
/// first `rejections` calls that carry a token, 200 to the rest.
struct Strict {
    ready: bool,
    script: Arc<Script>,
}

#[derive(Default)]
struct Script {
    readied: AtomicUsize,
    calls: AtomicUsize,
    rejections: AtomicUsize,
    bodies: std::sync::Mutex<Vec<Bytes>>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Strict {
            ready: false,
            script: self.script.clone(),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("called without poll_ready")]
struct NotReady;

type Body = BoxBody<Bytes, Infallible>;

impl Service<http::Request<Body>> for Strict {
    type Response = http::Response<Full<Bytes>>;
    type Error = NotReady;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, NotReady>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), NotReady>> {
        self.ready = true;
        self.script.readied.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !std::mem::replace(&mut self.ready, false) {
            return Box::pin(ready(Err(NotReady)));
        }
        let script = self.script.clone();
        Box::pin(async move {
            script.calls.fetch_add(1, Ordering::SeqCst);
            let has_token = request.headers().contains_key("authorization");
            let body = request.into_body().collect().await.unwrap().to_bytes();
            script.bodies.lock().unwrap().push(body);
            let reject = has_token
                && script
                    .rejections
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            let status = if reject { 401 } else { 200 };
            Ok(http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"done")))
                .unwrap())
        })
    }
}

fn layer() -> TokenLayer {
    let issued = Arc::new(AtomicUsize::new(0));
    TokenLayer::builder()
        .source(from_fn(move |_cx: RefreshContext| {
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(Token::new(format!("token-{n}"))) }
        }))
        .allowed_origin("http://api.test")
        .build()
        .unwrap()
}

fn service(rejections: usize) -> (TokenService<Strict>, Arc<Script>) {
    let script = Arc::new(Script::default());
    script.rejections.store(rejections, Ordering::SeqCst);
    let inner = Strict {
        ready: false,
        script: script.clone(),
    };
    (layer().layer(inner), script)
}

fn post(body: Body) -> http::Request<Body> {
    http::Request::post("http://api.test/x").body(body).unwrap()
}

fn full(bytes: &'static [u8]) -> Body {
    Full::new(Bytes::from_static(bytes)).boxed()
}

#[tokio::test]
async fn the_resend_readies_its_service_before_calling_it() {
    let (mut service, script) = service(1);
    let response = service
        .ready()
        .await
        .unwrap()
        .call(post(full(b"payload")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(script.calls.load(Ordering::SeqCst), 2, "sent twice");
    // One poll_ready for the caller's call, one for the resend's clone; a call on an
    // instance not readied would have failed with `NotReady`.
    assert_eq!(script.readied.load(Ordering::SeqCst), 2);
    let bodies = script.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies,
        [&b"payload"[..], &b"payload"[..]],
        "the same body twice"
    );
    assert_eq!(service.policy().stats().retries, 1);
}

#[tokio::test]
async fn call_takes_the_readied_instance_and_leaves_a_clone_that_is_not_ready() {
    let (mut service, script) = service(0);
    service.ready().await.unwrap();
    let first = service.call(post(full(b"")));
    // Not readied again: the clone left behind refuses, and that error reaches the
    // caller unchanged as the inner service's error.
    let second = service.call(post(full(b""))).await.unwrap_err();
    assert!(
        matches!(second, AuthError::Transport(NotReady)),
        "{second:?}"
    );
    assert_eq!(first.await.unwrap().status(), 200);
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn token_errors_are_the_core_s_typed_error() {
    let inner = Strict {
        ready: false,
        script: Arc::default(),
    };
    let layer = TokenLayer::builder()
        .source(from_fn(|_cx: RefreshContext| async {
            Err(RefreshError::permanent("the login expired"))
        }))
        .allowed_origin("http://api.test")
        .build()
        .unwrap();
    let error = layer
        .layer(inner)
        .oneshot(post(full(b"")))
        .await
        .unwrap_err();
    match error {
        AuthError::Token(TokenError::ReauthenticationRequired { .. }) => {}
        other => panic!("expected ReauthenticationRequired, got {other:?}"),
    }
}

#[tokio::test]
async fn a_body_still_streaming_is_not_resent_and_the_401_comes_back() {
    let (service, script) = service(1);
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(2);
    sender
        .send(Ok(http_body::Frame::data(Bytes::from_static(b"part"))))
        .await
        .unwrap();
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver)).boxed();
    let call = service.oneshot(post(body));
    // The body ends once the inner service reads it, after the layer decided.
    let finish = async move {
        drop(sender);
    };
    let (response, ()) = futures::join!(call, finish);
    let response = response.unwrap();
    assert_eq!(response.status(), 401, "returned as it is");
    assert_eq!(script.calls.load(Ordering::SeqCst), 1, "not resent");
    let bodies = script.bodies.lock().unwrap().clone();
    assert_eq!(bodies, [&b"part"[..]], "the receiver got the whole body");
}

#[tokio::test]
async fn skip_auth_requests_carry_no_token_and_are_not_classified() {
    let (service, script) = service(1);
    let mut request = post(full(b""));
    request.extensions_mut().insert(tokenflight::SkipAuth);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200, "no token, so not rejected");
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        script.rejections.load(Ordering::SeqCst),
        1,
        "the 401 is still due"
    );
}

/// C12: the origin of a request's `Uri` is compared as `http` spells it: the scheme's
/// default port and the domain's case do not matter; a host the URL parser would
/// rewrite into an allowed one (`0x7f.1`, `127.1`) is not that origin, and gets no
/// token (fail closed); a relative URI names no origin.
#[tokio::test]
async fn c12_a_tower_request_carries_the_token_only_to_an_allowed_origin_as_spelled() {
    let layer = TokenLayer::builder()
        .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
        .allowed_origin("http://api.test")
        .allowed_origin("http://127.0.0.1:1")
        .build()
        .unwrap();
    let cases = [
        ("http://api.test/x", true),
        ("http://API.Test:80/x?y=1", true),
        ("http://127.0.0.1:1/x", true),
        ("http://user@api.test/x", true),
        ("http://0x7f.1:1/x", false),
        ("http://127.1:1/x", false),
        ("http://127.0.0.1:2/x", false),
        ("https://api.test/x", false),
        ("http://api.test.evil/x", false),
        ("http://api.test:8080/x", false),
        ("/x", false),
    ];
    for (uri, carries) in cases {
        let inner = tower::service_fn(|request: http::Request<Body>| async move {
            let token = request.headers().contains_key("authorization");
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("x-token", if token { "yes" } else { "no" })
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        });
        let request = http::Request::get(uri).body(full(b"")).unwrap();
        let response = layer.layer(inner).oneshot(request).await.unwrap();
        let expected = if carries { "yes" } else { "no" };
        assert_eq!(response.headers()["x-token"], expected, "{uri}");
    }
}
