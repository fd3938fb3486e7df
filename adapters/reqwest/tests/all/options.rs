//! Per-request markers, exempt routes, a client-wide marker, and how errors reach the
//! caller.

use crate::common;
use tokenflight::{ForceRefresh, RefreshError, SkipAuth};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, Error, Extension};
use tokenflight_reqwest::{TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

#[tokio::test]
async fn force_refresh_refreshes_a_valid_token_before_sending() {
    let server = TestServer::start(TestServerConfig::default());
    let layer = common::layer(&server);
    let client = common::client(layer.clone());

    client.get(server.api_url("a")).send().await.unwrap();
    let first = layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
        .current()
        .unwrap();
    let response = client
        .get(server.api_url("b"))
        .with_extension(ForceRefresh)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let second = layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
        .current()
        .unwrap();
    assert!(second.generation() > first.generation());
    let counters = server.counters();
    assert_eq!(counters.token_calls, 2);
    assert_eq!(counters.requests_with(second.access().expose()), 1);
}

#[tokio::test]
async fn a_skipped_route_goes_without_credentials_and_other_routes_with() {
    let server = TestServer::start(TestServerConfig::default());
    let layer = TokenMiddleware::builder()
        .source(common::client_credentials(&server))
        .allowed_origin(&server.origin())
        .skip_route(None, "/api/a")
        .build()
        .unwrap();
    let client = common::client(layer);

    // The exempt route: no credentials.
    let response = client.get(server.api_url("a")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(server.counters().credentialed_requests, 0);
    assert_eq!(server.counters().token_calls, 0);

    // Any other route carries the token.
    let response = client.get(server.api_url("b")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.counters().credentialed_requests, 1);
    assert_eq!(server.counters().token_calls, 1);
}

#[tokio::test]
async fn a_client_wide_marker_from_an_initialiser_applies_to_every_request() {
    let server = TestServer::start(TestServerConfig::default());
    let client = ClientBuilder::new(reqwest::Client::new())
        .with_init(Extension(SkipAuth))
        .with(common::layer(&server))
        .build();

    let response = client.get(server.api_url("a")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(server.counters().credentialed_requests, 0);
    assert_eq!(server.counters().token_calls, 0);
}

#[tokio::test]
async fn a_failed_refresh_is_a_typed_token_error() {
    let server = TestServer::start(TestServerConfig::default());
    let layer = TokenMiddleware::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Err(RefreshError::permanent("credentials revoked"))
        }))
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = common::client(layer);

    let error = client.get(server.api_url("a")).send().await.unwrap_err();
    let Error::Middleware(inner) = &error else {
        panic!("expected a middleware error, got {error:?}");
    };
    let token_error = inner.downcast_ref::<tokenflight::Error>().unwrap();
    assert!(matches!(
        token_error,
        tokenflight::Error::ReauthenticationRequired { .. }
    ));
    assert!(error.to_string().contains("credentials revoked"));
    assert_eq!(server.counters().resource_calls, 0);
}

/// A source's token that no header can carry is refused where it arrives (a typed,
/// transient refresh error that never shows the token), not attached and sent.
#[tokio::test]
async fn c13_a_token_that_cannot_be_a_header_is_refused_with_a_typed_error() {
    let server = TestServer::start(TestServerConfig::default());
    let layer = TokenMiddleware::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Ok(tokenflight::Token::new("bad\nvalue"))
        }))
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let error = common::client(layer)
        .get(server.api_url("a"))
        .send()
        .await
        .unwrap_err();
    let Error::Middleware(inner) = &error else {
        panic!("expected a middleware error, got {error:?}");
    };
    let Some(tokenflight::Error::Refresh(refresh)) = inner.downcast_ref::<tokenflight::Error>()
    else {
        panic!("expected a refresh error, got {inner:?}");
    };
    assert!(!refresh.is_permanent());
    assert!(
        error.to_string().contains("no HTTP request can carry"),
        "{error}"
    );
    assert!(!format!("{error} {error:?}").contains("bad\nvalue"));
    assert_eq!(server.counters().resource_calls, 0);
}

#[tokio::test]
async fn a_client_error_passes_through_unchanged() {
    // A port nobody listens on: bind, learn it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let origin = format!("http://127.0.0.1:{port}");
    let layer = TokenMiddleware::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Ok(tokenflight::Token::new("t"))
        }))
        .allowed_origin(&origin)
        .build()
        .unwrap();
    let error = common::client(layer)
        .get(format!("{origin}/x"))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::Reqwest(e) if e.is_connect()),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_header_is_marked_sensitive() {
    // A middleware after the layer sees the request as it goes out.
    use std::sync::{Arc, Mutex};
    use tokenflight_reqwest::reqwest_middleware::{Middleware, Next, Result};

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Option<(bool, String)>>>);

    #[async_trait::async_trait]
    impl Middleware for Seen {
        async fn handle(
            &self,
            req: reqwest::Request,
            extensions: &mut http::Extensions,
            next: Next<'_>,
        ) -> Result<reqwest::Response> {
            if let Some(value) = req.headers().get("authorization") {
                *self.0.lock().unwrap() =
                    Some((value.is_sensitive(), format!("{:?}", req.headers())));
            }
            next.run(req, extensions).await
        }
    }

    let server = TestServer::start(TestServerConfig::default());
    let seen = Seen::default();
    let layer = common::layer(&server);
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.clone())
        .with(seen.clone())
        .build();
    client.get(server.api_url("a")).send().await.unwrap();
    let (sensitive, printed) = seen.0.lock().unwrap().clone().unwrap();
    assert!(sensitive);
    assert!(printed.contains("Sensitive"), "{printed}");
    let token = layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
        .current()
        .unwrap();
    assert!(!printed.contains(token.access().expose()), "{printed}");
}

#[tokio::test]
async fn extensions_written_further_down_reach_the_resend_and_the_caller() {
    use tokenflight_reqwest::reqwest_middleware::{Middleware, Next, Result};

    /// Counts the sends it sees in the extensions, as a retry-aware middleware would.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Sends(u32);

    struct CountSends;

    #[async_trait::async_trait]
    impl Middleware for CountSends {
        async fn handle(
            &self,
            req: reqwest::Request,
            extensions: &mut http::Extensions,
            next: Next<'_>,
        ) -> Result<reqwest::Response> {
            let seen = extensions.get::<Sends>().map_or(0, |s| s.0);
            extensions.insert(Sends(seen + 1));
            next.run(req, extensions).await
        }
    }

    let server = TestServer::start(TestServerConfig::default());
    let layer = common::layer(&server);
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.clone())
        .with(CountSends)
        .build();
    client.get(server.api_url("warm-up")).send().await.unwrap();
    server.expire_all_tokens();

    let request = client.get(server.api_url("a")).build().unwrap();
    let mut extensions = http::Extensions::new();
    let response = client
        .execute_with_extensions(request, &mut extensions)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(layer.policy().stats().retries, 1);
    // Both sends went through the inner middleware with the same extensions.
    assert_eq!(extensions.get::<Sends>(), Some(&Sends(2)));
}
