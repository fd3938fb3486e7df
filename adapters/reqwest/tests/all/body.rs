//! Body classification through reqwest (APIs that answer `200 {"code":401}`): the body
//! is read for the classifier and the caller still gets the whole response, as sent.

use crate::common;
use tokenflight::Classifier;
use tokenflight_reqwest::TokenMiddleware;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

fn business_code(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("code").and_then(|c| c.as_u64()) == Some(401))
}

fn layer(server: &TestServer, limit: usize) -> TokenMiddleware {
    TokenMiddleware::builder()
        .source(common::client_credentials(server))
        .classifier(Classifier::new().body(limit, business_code))
        .allowed_origin(&server.origin())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_business_code_rejection_is_refreshed_and_resent() {
    let server = TestServer::start(TestServerConfig::default());
    server.set_business_code(true);
    let layer = layer(&server, 1024);
    let client = common::client(layer.clone());
    let (login, _) = server.issue_access_token();
    layer
        .policy()
        .flight()
        .expect("an unkeyed policy")
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

fn static_layer(origin: &str, limit: usize) -> TokenMiddleware {
    TokenMiddleware::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Ok(tokenflight::Token::new("static"))
        }))
        // The chunked server sends no `Content-Length`: read it anyway, to check that
        // what was read is handed back intact.
        .classifier(
            Classifier::new()
                .body(limit, business_code)
                .body_of_unknown_length(true),
        )
        .allowed_origin(origin)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_chunked_body_longer_than_the_limit_is_handed_back_whole() {
    let chunks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 1000]).collect();
    let expected = chunks.concat();
    let origin = common::chunked_server(chunks, false).await;
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
    let origin = common::chunked_server(chunks, false).await;
    let client = common::client(static_layer(&origin, 1500));

    let response = client.get(format!("{origin}/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "{\"code\":200}");
}

#[tokio::test]
async fn a_body_that_fails_mid_read_hands_the_failure_to_the_caller() {
    let chunks = vec![b"first part".to_vec()];
    let origin = common::chunked_server(chunks, true).await;
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
