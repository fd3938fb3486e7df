//! C12 through reqwest's redirect following: the core checks the origin of the URL a
//! request is sent to; reqwest then follows redirects by itself. It drops the
//! `Authorization` header when a redirect leaves the origin, so the token does not
//! travel with it.

mod common;

use tokenflight_tests::testkit::{TestServer, TestServerConfig};

#[tokio::test]
async fn a_cross_origin_redirect_does_not_carry_the_token() {
    let server = TestServer::start(TestServerConfig::default());
    let other = TestServer::start(TestServerConfig::other_origin());
    let client = common::client(common::layer(&server));

    let response = client
        .get(server.redirect_url(&other.api_url("landing")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), other.api_url("landing"));
    assert_eq!(response.headers()["x-echo-path"], "/api/landing");

    assert_eq!(server.counters().redirects, 1);
    assert_eq!(
        server.counters().credentialed_requests,
        1,
        "the redirect itself"
    );
    let other = other.counters();
    assert_eq!(other.other_requests, 1);
    assert_eq!(
        other.credentialed_requests, 0,
        "the token leaked to another origin"
    );
}

#[tokio::test]
async fn a_same_origin_redirect_keeps_the_token() {
    let server = TestServer::start(TestServerConfig::default());
    let client = common::client(common::layer(&server));

    let response = client
        .get(server.redirect_url(&server.api_url("landing")))
        .send()
        .await
        .unwrap();
    // The testkit refuses /api without a valid token, so 200 proves it arrived.
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-path"], "/api/landing");
    let counters = server.counters();
    assert_eq!(counters.redirects, 1);
    assert_eq!(counters.rejections, 0);
    assert_eq!(counters.credentialed_requests, 2);
}

#[tokio::test]
async fn a_request_to_an_origin_not_allowed_carries_no_token() {
    let server = TestServer::start(TestServerConfig::default());
    let other = TestServer::start(TestServerConfig::other_origin());
    let client = common::client(common::layer(&server));

    let response = client.get(other.api_url("x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(other.counters().credentialed_requests, 0);
    assert_eq!(
        server.counters().token_calls,
        0,
        "no token was even fetched"
    );
}

mod custom_header {
    //! A token in a header other than `Authorization`: reqwest carries it across origins
    //! when it follows a redirect; `TokenLayer::redirect_policy` stops that redirect.

    use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tokenflight_reqwest::{TokenLayer, reqwest};

    use super::common;

    fn layer(origin: &str) -> TokenLayer {
        TokenLayer::builder()
            .source(tokenflight::from_fn(|_cx| async {
                Ok(tokenflight::Token::new("the-api-key"))
            }))
            .header("x-api-key", None)
            .allowed_origin(origin)
            .build()
            .unwrap()
    }

    fn client(layer: &TokenLayer, guarded: bool) -> ClientWithMiddleware {
        let mut builder = reqwest::Client::builder();
        if guarded {
            builder = builder.redirect(layer.redirect_policy());
        }
        ClientBuilder::new(builder.build().unwrap())
            .with(layer.clone())
            .build()
    }

    fn port(origin: &str) -> &str {
        origin.rsplit(':').next().unwrap()
    }

    #[tokio::test]
    async fn without_the_policy_reqwest_carries_the_header_to_another_origin() {
        let (allowed, mut allowed_heads) = common::recording_server().await;
        let (other, mut other_heads) = common::recording_server().await;
        let layer = layer(&allowed);

        let url = format!("{allowed}/redirect/{}/land", port(&other));
        let response = client(&layer, false).get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            allowed_heads
                .recv()
                .await
                .unwrap()
                .contains("x-api-key: the-api-key")
        );
        // The leak the policy exists for.
        assert!(
            other_heads
                .recv()
                .await
                .unwrap()
                .contains("x-api-key: the-api-key")
        );
    }

    #[tokio::test]
    async fn with_the_policy_a_redirect_to_another_origin_is_not_followed() {
        let (allowed, mut allowed_heads) = common::recording_server().await;
        let (other, mut other_heads) = common::recording_server().await;
        let layer = layer(&allowed);

        let url = format!("{allowed}/redirect/{}/land", port(&other));
        let response = client(&layer, true).get(url).send().await.unwrap();
        assert_eq!(response.status(), 302);
        assert!(
            allowed_heads
                .recv()
                .await
                .unwrap()
                .contains("x-api-key: the-api-key")
        );
        // Following would have happened before `send` returned.
        assert!(other_heads.try_recv().is_err(), "the redirect was followed");
    }

    #[tokio::test]
    async fn with_the_policy_a_same_origin_redirect_is_followed() {
        let (allowed, mut allowed_heads) = common::recording_server().await;
        let layer = layer(&allowed);

        let url = format!("{allowed}/redirect/{}/land", port(&allowed));
        let response = client(&layer, true).get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
        assert!(allowed_heads.recv().await.unwrap().contains("x-api-key"));
        let second = allowed_heads.recv().await.unwrap();
        assert!(second.starts_with("get /land "), "{second}");
        assert!(second.contains("x-api-key: the-api-key"));
    }

    #[tokio::test]
    async fn with_the_policy_an_authorization_token_still_follows_and_is_dropped() {
        let (allowed, mut allowed_heads) = common::recording_server().await;
        let (other, mut other_heads) = common::recording_server().await;
        let layer = TokenLayer::builder()
            .source(tokenflight::from_fn(|_cx| async {
                Ok(tokenflight::Token::new("bearer-token"))
            }))
            .allowed_origin(&allowed)
            .build()
            .unwrap();

        let url = format!("{allowed}/redirect/{}/land", port(&other));
        let response = client(&layer, true).get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            allowed_heads
                .recv()
                .await
                .unwrap()
                .contains("authorization: bearer bearer-token")
        );
        let landed = other_heads.recv().await.unwrap();
        assert!(!landed.contains("bearer-token"), "{landed}");
    }
}
