//! C12 through reqwest's redirect following: the core checks the origin of the URL a
//! request is sent to; reqwest then follows redirects by itself. It drops the
//! `Authorization` header when a redirect leaves the origin, so the token does not
//! travel with it.

use crate::common;
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

/// reqwest drops `Authorization` only on the hop that changes origin, and puts the
/// caller's headers back on every hop: on A → B → B the second hop carries A's token to
/// B (pinned here, so a reqwest that stops doing it is noticed). With
/// `TokenMiddleware::redirect_policy` that hop is not followed.
#[tokio::test]
async fn c12_a_second_hop_inside_another_origin_never_carries_the_authorization_token() {
    use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
    use tokenflight_reqwest::{TokenMiddleware, reqwest};
    let (allowed, mut allowed_heads) = common::recording_server().await;
    let (other, mut other_heads) = common::recording_server().await;
    let layer = TokenMiddleware::builder()
        .source(tokenflight::from_fn(|_cx| async {
            Ok(tokenflight::Token::new("bearer-token"))
        }))
        .allowed_origin(&allowed)
        .build()
        .unwrap();
    let port = other.rsplit(':').next().unwrap();
    let url = format!("{allowed}/redirect/{port}/redirect/{port}/land");
    for guarded in [false, true] {
        let mut builder = reqwest::Client::builder();
        if guarded {
            builder = builder.redirect(layer.redirect_policy());
        }
        let client = ClientBuilder::new(builder.build().unwrap())
            .with(layer.clone())
            .build();
        let response = client.get(&url).send().await.unwrap();
        assert!(allowed_heads.recv().await.unwrap().contains("bearer-token"));
        let first_hop = other_heads.recv().await.unwrap();
        assert!(!first_hop.contains("bearer-token"), "{first_hop}");
        let second_hop = other_heads.try_recv();
        if guarded {
            assert_eq!(response.status(), 302, "the second hop was followed");
            assert!(second_hop.is_err(), "{second_hop:?}");
        } else {
            // The leak the policy exists for.
            assert_eq!(response.status(), 200);
            assert!(second_hop.unwrap().contains("bearer-token"));
        }
    }
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
    //! when it follows a redirect; `TokenMiddleware::redirect_policy` stops that redirect.

    use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tokenflight_reqwest::{TokenMiddleware, reqwest};

    use super::common;

    fn layer(origin: &str) -> TokenMiddleware {
        TokenMiddleware::builder()
            .source(tokenflight::from_fn(|_cx| async {
                Ok(tokenflight::Token::new("the-api-key"))
            }))
            .placement(tokenflight::Placement::header("x-api-key", None))
            .allowed_origin(origin)
            .build()
            .unwrap()
    }

    fn client(layer: &TokenMiddleware, guarded: bool) -> ClientWithMiddleware {
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
        let layer = TokenMiddleware::builder()
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

mod query_token {
    //! A token in the query (`.placement(tokenflight::Placement::query("token"))`): reqwest sends the previous URL as
    //! `Referer` when it follows a redirect, and prints URLs in errors and `Debug`.

    use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tokenflight_reqwest::{TokenMiddleware, reqwest, reqwest_middleware};
    use tokenflight_tests::testkit::{TestServer, TestServerConfig};

    use super::common;

    fn client(layer: &TokenMiddleware, guarded: bool) -> ClientWithMiddleware {
        let mut builder = reqwest::Client::builder();
        if guarded {
            builder = builder.redirect(layer.redirect_policy());
        }
        ClientBuilder::new(builder.build().unwrap())
            .with(layer.clone())
            .build()
    }

    #[tokio::test]
    async fn without_the_policy_reqwest_sends_a_query_token_as_referer() {
        let (allowed, mut allowed_heads) = common::recording_server().await;
        let (other, mut other_heads) = common::recording_server().await;
        let layer = TokenMiddleware::builder()
            .source(tokenflight::from_fn(|_cx| async {
                Ok(tokenflight::Token::new("the-query-token"))
            }))
            .placement(tokenflight::Placement::query("token"))
            .allowed_origin(&allowed)
            .build()
            .unwrap();
        let port = other.rsplit(':').next().unwrap();
        let url = format!("{allowed}/redirect/{port}/land");

        let response = client(&layer, false).get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            allowed_heads
                .recv()
                .await
                .unwrap()
                .contains("token=the-query-token")
        );
        // The leak the policy exists for.
        let landed = other_heads.recv().await.unwrap();
        let referer = landed
            .lines()
            .find(|l| l.starts_with("referer: "))
            .unwrap_or("");
        assert!(referer.contains("token=the-query-token"), "{landed}");

        let response = client(&layer, true).get(&url).send().await.unwrap();
        assert_eq!(response.status(), 302, "with the policy: not followed");
        assert!(
            allowed_heads
                .recv()
                .await
                .unwrap()
                .contains("token=the-query-token")
        );
        assert!(other_heads.try_recv().is_err(), "the redirect was followed");
    }

    /// Middleware below the layer whose errors show the URL: its own message, and a
    /// reqwest error wrapped the way retry middleware wraps them.
    struct FailsShowingTheUrl;

    #[derive(Debug)]
    struct Wrapped(reqwest_middleware::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("gave up")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[async_trait::async_trait]
    impl reqwest_middleware::Middleware for FailsShowingTheUrl {
        async fn handle(
            &self,
            req: reqwest::Request,
            extensions: &mut http::Extensions,
            next: reqwest_middleware::Next<'_>,
        ) -> reqwest_middleware::Result<reqwest::Response> {
            if req.url().path().ends_with("/own") {
                let message = format!("nothing sent to {}", req.url());
                return Err(reqwest_middleware::Error::middleware(
                    std::io::Error::other(message),
                ));
            }
            match next.run(req, extensions).await {
                Err(e) => Err(reqwest_middleware::Error::middleware(Wrapped(e))),
                ok => ok,
            }
        }
    }

    /// The error's `Display` and every cause's.
    fn chain(error: &(dyn std::error::Error + 'static)) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(" / ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    #[tokio::test]
    async fn c12_query_token_never_in_errors_of_middleware_below_the_layer() {
        let broken = tokenflight_tests::testkit::ClosingServer::start();
        let layer = TokenMiddleware::builder()
            .source(tokenflight::from_fn(|_cx| async {
                Ok(tokenflight::Token::new("the-query-token"))
            }))
            .placement(tokenflight::Placement::query("token"))
            .allowed_origin(&broken.origin())
            .build()
            .unwrap();
        let client = ClientBuilder::new(reqwest::Client::new())
            .with(layer)
            .with(FailsShowingTheUrl)
            .build();
        for path in ["own", "wrapped"] {
            let url = format!("{}/api/{path}?keep=%7e", broken.origin());
            let error = client.get(&url).send().await.unwrap_err();
            let text = format!("{} // {error:?}", chain(&error));
            assert!(
                !text.contains("the-query-token"),
                "the token shows in {text}"
            );
            assert!(text.contains("token=redacted"), "{text}");
        }
    }

    #[tokio::test]
    async fn c12_query_token_never_in_the_response_url_or_its_errors() {
        let server = TestServer::start(TestServerConfig {
            query_token: true,
            reject_all: true,
            ..TestServerConfig::default()
        });
        let layer = TokenMiddleware::builder()
            .source(common::client_credentials(&server))
            .placement(tokenflight::Placement::query("token"))
            .allowed_origin(&server.origin())
            .build()
            .unwrap();
        let url = format!("{}?flag&a=%7e", server.api_url("c12"));

        // Refused, refreshed, resent, refused again: the second 401 comes back.
        let response = client(&layer, true).get(&url).send().await.unwrap();
        assert_eq!(response.status(), 401);
        let sent: Vec<String> = server
            .requests()
            .into_iter()
            .filter_map(|r| r.token)
            .collect();
        assert_eq!(sent.len(), 2, "both tokens went out");
        let shown = [
            response.url().to_string(),
            format!("{response:?}"),
            response.error_for_status_ref().unwrap_err().to_string(),
        ];
        for text in &shown {
            for token in &sent {
                assert!(!text.contains(token.as_str()), "the token shows in {text}");
            }
        }
        assert_eq!(
            response.url().as_str(),
            format!("{url}&token=redacted"),
            "the caller's URL, the token's value hidden"
        );
        // Reading the body is untouched by the new URL.
        assert_eq!(response.text().await.unwrap(), "invalid token");
    }
}

mod keyed {
    //! A keyed policy (one token per origin) over two allowed origins: reqwest follows
    //! redirects below the middleware, so what the first request carried goes along on
    //! every hop that keeps it. `TokenMiddleware::redirect_policy` stops a hop that
    //! would carry one key's token to a request of another.

    use tokenflight::keyed::TokenKey;
    use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tokenflight_reqwest::{TokenMiddleware, reqwest};

    use super::common;

    /// Key `k`'s token is `tok-<port of k>`.
    fn layer(placement: tokenflight::Placement, [a, b]: [&str; 2]) -> TokenMiddleware {
        TokenMiddleware::builder()
            .placement(placement)
            .allowed_origin(a)
            .allowed_origin(b)
            .keyed(|key: &TokenKey, shared| {
                let token = format!("tok-{}", key.as_str().rsplit(':').next().unwrap_or(""));
                shared
                    .source(tokenflight::from_fn(move |_cx| {
                        let token = token.clone();
                        async move { Ok(tokenflight::Token::new(token)) }
                    }))
                    .build()
            })
            .build()
            .unwrap()
    }

    fn client(layer: &TokenMiddleware) -> ClientWithMiddleware {
        let client = reqwest::Client::builder()
            .redirect(layer.redirect_policy())
            .build()
            .unwrap();
        ClientBuilder::new(client).with(layer.clone()).build()
    }

    fn port(origin: &str) -> &str {
        origin.rsplit(':').next().unwrap()
    }

    /// The README's promise through reqwest's own redirect following: a 302 from key
    /// A's origin to key B's (allowed) origin does not take A's token to B — not in a
    /// custom header (reqwest keeps it on every hop), not in the `Referer` (query
    /// placement), and not in `Authorization` on a second hop inside B's origin
    /// (reqwest drops it only on the hop that changes origin, and puts the caller's
    /// headers back on every hop). The caller gets the redirect response; following
    /// it with a request of its own gives B's token to B.
    #[tokio::test]
    async fn c12_a_redirect_never_carries_one_keys_token_to_another_key() {
        let (a, mut a_heads) = common::recording_server().await;
        let (b, mut b_heads) = common::recording_server().await;
        let a_token = format!("tok-{}", port(&a));
        let b_token = format!("tok-{}", port(&b));
        let cases = [
            (tokenflight::Placement::header("x-api-key", None), "land"),
            (tokenflight::Placement::query("token"), "land"),
            (
                tokenflight::Placement::bearer(),
                &*format!("redirect/{}/land", port(&b)),
            ),
        ];
        for (placement, path) in cases {
            let shown = format!("{placement:?}");
            let layer = layer(placement, [&a, &b]);
            let client = client(&layer);
            let url = format!("{a}/redirect/{}/{path}", port(&b));
            let response = client.get(&url).send().await.unwrap();
            let first = a_heads.recv().await.unwrap();
            assert!(first.contains(&a_token), "{shown}: key A's token went to A");
            // Whatever reached B (nothing, if the hop was stopped) carries no A token.
            while let Ok(head) = b_heads.try_recv() {
                assert!(
                    !head.contains(&a_token),
                    "{shown}: A's token went to B: {head}"
                );
            }
            assert_eq!(response.status(), 302, "{shown}: the hop to B was followed");
            let location = response.headers()["location"].to_str().unwrap().to_owned();
            // The caller follows it through the middleware: B's own token.
            let landed = client.get(&location).send().await.unwrap();
            assert_eq!(landed.status(), 200, "{shown}");
            let head = b_heads.recv().await.unwrap();
            assert!(
                head.contains(&b_token),
                "{shown}: B's request has B's token: {head}"
            );
            assert!(!head.contains(&a_token), "{shown}: {head}");
            while b_heads.try_recv().is_ok() {}
        }
    }
}
