//! The bare `HyperTransport`: whole responses within the limit, `TooLarge` beyond it
//! (declared or streamed), and network errors that do not show the URL.

use bytes::Bytes;
use tokenflight::{adapter::Transport, adapter::TransportError};
use tokenflight_tower::HyperTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A one-connection server that reads a request head and answers `response` as is.
async fn answer_once(response: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the client closed before sending a request");
            head.extend_from_slice(&buffer[..n]);
        }
        socket.write_all(response).await.unwrap();
        socket.shutdown().await.unwrap();
    });
    format!("http://{addr}/oauth/token?secret=s3cr3t")
}

fn post(url: &str) -> http::Request<Bytes> {
    http::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Bytes::from_static(b"grant_type=client_credentials"))
        .unwrap()
}

#[tokio::test]
async fn a_response_within_the_limit_arrives_whole() {
    let url = answer_once(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"access_token\":1",
    )
    .await;
    let response = HyperTransport::default()
        .send(post(&url), 17)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.body(), &b"{\"access_token\":1"[..]);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_too_large() {
    let url = answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world").await;
    let error = HyperTransport::default()
        .send(post(&url), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::TooLarge { limit: 10 }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_too_large() {
    let url = answer_once(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    let error = HyperTransport::default()
        .send(post(&url), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::TooLarge { limit: 10 }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_network_error_does_not_show_the_url() {
    // Bound, then closed: nothing listens on the port.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/oauth/token?secret=s3cr3t");
    let error = HyperTransport::default()
        .send(post(&url), 1024)
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
