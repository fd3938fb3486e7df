//! Body classification through reqwest (APIs that answer `200 {"code":401}`): the body
//! is read for the classifier and the caller still gets the whole response, as sent.

mod common;

use tokenflight::Classifier;
use tokenflight_reqwest::TokenLayer;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

fn business_code(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("code").and_then(|c| c.as_u64()) == Some(401))
}

fn layer(server: &TestServer, limit: usize) -> TokenLayer {
    TokenLayer::builder()
        .source(common::client_credentials(server))
        .classifier(Classifier::new().body(limit, business_code))
        .allowed_origin(&server.origin())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_business_code_rejection_is_refreshed_and_resent() {
    let mut config = TestServerConfig::default();
    config.business_code = true;
    let server = TestServer::start(config);
    let layer = layer(&server, 1024);
    let client = common::client(layer.clone());
    let (login, _) = server.issue_access_token();
    layer
        .authenticator()
        .flight()
        .install(tokenflight::Token::new(login))
        .await
        .unwrap();
    server.expire_all_tokens();

    let response = client
        .put(server.api_url("doc"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-method"], "PUT");
    assert_eq!(response.text().await.unwrap(), "payload");
    let counters = server.counters();
    assert_eq!(counters.rejections, 1);
    assert_eq!(counters.token_calls, 1);
    assert_eq!(counters.resource_calls, 2);
}

#[tokio::test]
async fn a_body_read_for_classification_is_handed_back_intact() {
    let server = TestServer::start(TestServerConfig::default());
    let client = common::client(layer(&server, 1024));

    let response = client
        .post(server.api_url("small"))
        .body("short body")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), server.api_url("small"));
    assert_eq!(response.headers()["x-echo-path"], "/api/small");
    assert_eq!(response.content_length(), Some(10));
    assert_eq!(response.text().await.unwrap(), "short body");
    assert_eq!(server.counters().resource_calls, 1);
}

#[tokio::test]
async fn a_body_longer_than_the_limit_is_not_classified_and_stays_whole() {
    let server = TestServer::start(TestServerConfig::default());
    let client = common::client(layer(&server, 16));
    // Several chunks' worth, so the prefix read and the unread rest both matter.
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    let response = client
        .post(server.api_url("large"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-path"], "/api/large");
    let received = response.bytes().await.unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the body changed on its way back");
    assert_eq!(server.counters().resource_calls, 1);
}

/// A one-request-per-connection server that answers every request with a chunked body
/// (no `Content-Length`, so the layer must read to learn the length), made of `chunks`,
/// and, if `cut`, closes the connection before the last chunk ends.
async fn chunked_server(chunks: Vec<Vec<u8>>, cut: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\nconnection: close\r\n\r\n".to_vec();
                for chunk in &chunks {
                    response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    response.extend_from_slice(chunk);
                    response.extend_from_slice(b"\r\n");
                }
                if cut {
                    // Announce a chunk, send half of it, hang up.
                    response.extend_from_slice(b"10\r\nabcdefgh");
                } else {
                    response.extend_from_slice(b"0\r\n\r\n");
                }
                socket.write_all(&response).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    format!("http://{addr}")
}

fn static_layer(origin: &str, limit: usize) -> TokenLayer {
    TokenLayer::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Ok(tokenflight::Token::new("static"))
        }))
        .classifier(Classifier::new().body(limit, business_code))
        .allowed_origin(origin)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_chunked_body_longer_than_the_limit_is_handed_back_whole() {
    let chunks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 1000]).collect();
    let expected = chunks.concat();
    let origin = chunked_server(chunks, false).await;
    let client = common::client(static_layer(&origin, 1500));

    let response = client.get(format!("{origin}/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-kind"], "chunked");
    assert_eq!(response.url().as_str(), format!("{origin}/x"));
    let received = response.bytes().await.unwrap();
    assert!(received == expected, "got {} bytes", received.len());
}

#[tokio::test]
async fn a_chunked_body_within_the_limit_is_classified_and_handed_back_whole() {
    let chunks = vec![b"{\"code\":".to_vec(), b"200}".to_vec()];
    let origin = chunked_server(chunks, false).await;
    let client = common::client(static_layer(&origin, 1500));

    let response = client.get(format!("{origin}/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "{\"code\":200}");
}

#[tokio::test]
async fn a_body_that_fails_mid_read_hands_the_failure_to_the_caller() {
    let chunks = vec![b"first part".to_vec()];
    let origin = chunked_server(chunks, true).await;
    let client = common::client(static_layer(&origin, 1500));

    let mut response = client.get(format!("{origin}/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The bytes that arrived come first, then the same failure reading would have met.
    let mut read = Vec::new();
    let mut failed = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => read.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(read.starts_with(b"first part"), "{read:?}");
    assert!(failed, "a cut-off body read as complete");
}
