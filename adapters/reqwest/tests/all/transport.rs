//! The bare transport: what token sources use to reach the token endpoint.

use crate::common;
use std::time::Duration;

use bytes::Bytes;
use tokenflight::{adapter::Transport, adapter::TransportError};
use tokenflight_reqwest::{BareTransport, reqwest};
use tokenflight_tests::testkit::{Failure, TestServer, TestServerConfig};

fn token_request(server: &TestServer) -> http::Request<Bytes> {
    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        server.client_id(),
        server.client_secret()
    );
    http::Request::post(server.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Bytes::from(form))
        .unwrap()
}

#[tokio::test]
async fn a_token_response_comes_back_buffered() {
    let server = TestServer::start(TestServerConfig::default());
    let response = BareTransport::default()
        .send(token_request(&server), 64 * 1024)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert!(body["access_token"].is_string());
    assert_eq!(server.counters().client_credentials_calls, 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_too_large() {
    let server = TestServer::start(TestServerConfig::default());
    let error = BareTransport::default()
        .send(token_request(&server), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::TooLarge { limit: 10 }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_too_large() {
    // No Content-Length: the limit is enforced while reading.
    let origin = common::chunked_server(vec![vec![b'x'; 100]; 5], false).await;
    let request = http::Request::get(format!("{origin}/t"))
        .body(Bytes::new())
        .unwrap();
    let transport = BareTransport::default();
    let error = transport.send(request.clone(), 250).await.unwrap_err();
    assert!(
        matches!(error, TransportError::TooLarge { limit: 250 }),
        "{error:?}"
    );
    let response = transport.send(request, 500).await.unwrap();
    assert_eq!(response.body().len(), 500);
}

#[tokio::test]
async fn a_hanging_endpoint_times_out() {
    let server = TestServer::start(TestServerConfig::default());
    server.fail_next_token_calls(1, Failure::Hang);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = BareTransport::new(client)
        .send(token_request(&server), 64 * 1024)
        .await
        .unwrap_err();
    assert!(matches!(error, TransportError::Timeout), "{error:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_network_error_without_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let request = http::Request::post(format!("http://127.0.0.1:{port}/oauth/token?key=s3cr3t"))
        .body(Bytes::new())
        .unwrap();
    let error = BareTransport::default()
        .send(request, 1024)
        .await
        .unwrap_err();
    assert!(matches!(error, TransportError::Network(_)), "{error:?}");
    let mut text = format!("{error} {error:?}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(&format!(" {cause} {cause:?}"));
        source = cause.source();
    }
    assert!(!text.contains("s3cr3t"), "{text}");
}

#[test]
fn the_transport_is_object_safe() {
    let transport: std::sync::Arc<dyn Transport> = std::sync::Arc::new(BareTransport::default());
    drop(transport);
}
