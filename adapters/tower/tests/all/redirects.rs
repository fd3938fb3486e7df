//! C12 with tower-http's `FollowRedirect` below the layer: what the layer hands back
//! never shows a token that travelled in the query, and with
//! `TokenLayer::redirect_policy` no hop carries the token where it may not go.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokenflight::keyed::TokenKey;
use tokenflight::{Placement, Token, from_fn};
use tokenflight_tests::testkit::{RecordedRequest, TestServer, TestServerConfig};
use tokenflight_tower::TokenLayer;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::policy::{Policy, Standard};
use tower_http::follow_redirect::{FollowRedirectLayer, RequestUri};

/// `FollowRedirect` puts the URI of the last request it sent in the response's
/// extensions (`RequestUri`); without a redirect that is the request the layer sent,
/// query token included. The caller sees it with the token's value redacted, as
/// reqwest's `Response::url()`, and every other part of the URI as it was.
#[tokio::test]
async fn c12_tower_response_uri_never_shows_the_query_token() {
    let server = TestServer::start(TestServerConfig {
        query_token: true,
        ..TestServerConfig::default()
    });
    let (token, _) = server.issue_access_token();
    let issued = token.clone();
    let layer = TokenLayer::builder()
        .source(from_fn(move |_cx| {
            let token = issued.clone();
            async move { Ok(Token::new(token)) }
        }))
        .placement(Placement::query("token"))
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .layer(FollowRedirectLayer::new())
        .service(client);

    let url = format!("{}?flag&keep=%7e", server.api_url("c12"));
    let request = http::Request::get(&url).body(Full::default()).unwrap();
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), 200, "the token went out in the query");
    let sent: Vec<String> = server
        .requests()
        .into_iter()
        .filter_map(|r| r.token)
        .collect();
    assert_eq!(sent, std::slice::from_ref(&token));

    let RequestUri(shown) = response
        .extensions()
        .get::<RequestUri>()
        .expect("FollowRedirect names the URI it fetched");
    let shown = shown.to_string();
    assert!(!shown.contains(&token), "the token shows in {shown}");
    assert_eq!(shown, format!("{url}&token=redacted"));
    let debug = format!("{response:?}");
    assert!(!debug.contains(&token), "the token shows in {debug}");
}

/// The client under every stack here.
type HyperClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn hyper_client() -> HyperClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// A `GET url` through `layer` above `FollowRedirect` with `policy`: the status and the
/// `Location` of the response the caller gets. Every hop `FollowRedirect` follows was
/// answered before this returns.
async fn get_through<P>(layer: &TokenLayer, policy: P, url: &str) -> (u16, Option<String>)
where
    P: Policy<Full<Bytes>, hyper_util::client::legacy::Error> + Clone + Send + Sync + 'static,
{
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(FollowRedirectLayer::with_policy(policy))
        .service(hyper_client());
    let request = http::Request::get(url).body(Full::default()).unwrap();
    let response = service.oneshot(request).await.unwrap();
    let location = response
        .headers()
        .get(http::header::LOCATION)
        .map(|value| value.to_str().unwrap().to_owned());
    (response.status().as_u16(), location)
}

/// Whether `secret` shows anywhere in what `request` carried: its query or any header.
fn carries(request: &RecordedRequest, secret: &str) -> bool {
    request.query.as_deref().unwrap_or("").contains(secret)
        || request
            .headers
            .iter()
            .any(|(_, value)| value.contains(secret))
}

fn fixed_token(token: &'static str) -> impl tokenflight::TokenSource {
    from_fn(move |_cx| async move { Ok(Token::new(token)) })
}

/// tower-http's standard policy drops `Authorization` only on the hop that changes
/// origin, and puts the first request's headers back on every hop: on A → B → B the
/// second hop carries A's token to B (pinned here, so a tower-http that stops doing it
/// is noticed). With `TokenLayer::redirect_policy` that hop is not followed.
#[tokio::test]
async fn c12_a_tower_second_hop_inside_another_origin_never_carries_the_authorization_token() {
    for guarded in [false, true] {
        let allowed = TestServer::start(TestServerConfig::other_origin());
        let other = TestServer::start(TestServerConfig::other_origin());
        let layer = TokenLayer::builder()
            .source(fixed_token("bearer-token"))
            .allowed_origin(&allowed.origin())
            .build()
            .unwrap();
        let landing = other.api_url("land");
        let url = allowed.redirect_url(&other.redirect_url(&landing));
        let (status, location) = if guarded {
            get_through(&layer, layer.redirect_policy(), &url).await
        } else {
            get_through(&layer, Standard::default(), &url).await
        };
        let allowed_seen = allowed.counters();
        assert_eq!(
            (allowed_seen.redirects, allowed_seen.credentialed_requests),
            (1, 1),
            "the first request, with the token, went to the allowed origin"
        );
        let seen = other.counters();
        assert_eq!(
            seen.redirects, 1,
            "the hop into the other origin was followed"
        );
        if guarded {
            assert_eq!(
                seen.credentialed_requests, 0,
                "the token went to another origin"
            );
            assert!(other.requests().is_empty(), "the second hop was sent");
            assert_eq!(status, 302, "the second hop was followed");
            assert_eq!(location.as_deref(), Some(&*landing));
        } else {
            // The leak the policy exists for.
            assert_eq!(status, 200);
            assert_eq!(seen.credentialed_requests, 1);
            let landed = other.requests();
            assert_eq!(landed.len(), 1);
            assert_eq!(landed[0].token.as_deref(), Some("bearer-token"));
        }
    }
}

/// A keyed policy (one token per origin) over two allowed origins: a 302 from key A's
/// origin to key B's does not take A's token to B through tower-http's redirect
/// following — not in a custom header (kept on every hop), not in the query (a
/// `Location` that repeats it), and not in `Authorization` on a second hop inside B's
/// origin (dropped only on the hop that changes origin). The caller gets the redirect
/// response; following it with a request of its own gives B's token to B.
#[tokio::test]
async fn c12_a_tower_redirect_never_carries_one_keys_token_to_another_key() {
    enum Route {
        /// A → B/api/land.
        Straight,
        /// A → B/api/land, the `Location` keeping A's query (token included).
        KeepingQuery,
        /// A → B/redirect → B/api/land.
        TwoHops,
    }
    let cases = [
        (Placement::header("x-api-key", None), Route::Straight),
        (Placement::query("token"), Route::KeepingQuery),
        (Placement::bearer(), Route::TwoHops),
    ];
    for (placement, route) in cases {
        let shown = format!("{placement:?}");
        let query_token = matches!(placement, Placement::Query { .. });
        let config = TestServerConfig {
            query_token,
            ..TestServerConfig::other_origin()
        };
        let a = TestServer::start(config.clone());
        let b = TestServer::start(config);
        let (a_token, b_token) = (
            format!("tok-{}", a.addr().port()),
            format!("tok-{}", b.addr().port()),
        );
        let layer = TokenLayer::builder()
            .placement(placement)
            .allowed_origin(&a.origin())
            .allowed_origin(&b.origin())
            .keyed(|key: &TokenKey, shared| {
                let token = format!("tok-{}", key.as_str().rsplit(':').next().unwrap_or(""));
                shared
                    .source(from_fn(move |_cx| {
                        let token = token.clone();
                        async move { Ok(Token::new(token)) }
                    }))
                    .build()
            })
            .build()
            .unwrap();
        let landing = b.api_url("land");
        let url = match route {
            Route::Straight => a.redirect_url(&landing),
            Route::KeepingQuery => a.redirect_keeping_query_url(&landing),
            Route::TwoHops => a.redirect_url(&b.redirect_url(&landing)),
        };

        let (status, location) = get_through(&layer, layer.redirect_policy(), &url).await;
        assert_eq!(a.counters().redirects, 1, "{shown}");
        // Whatever reached B (nothing, if the hop was stopped) carries no A token.
        assert_eq!(
            b.counters().credentialed_requests,
            0,
            "{shown}: A's token went to B"
        );
        for request in b.requests() {
            assert!(
                !carries(&request, &a_token),
                "{shown}: A's token went to B: {request:?}"
            );
        }
        assert_eq!(status, 302, "{shown}: the hop to B was followed");

        // The caller follows it through the layer: B's own token.
        let location = location.expect("a redirect names where to");
        let (status, _) = get_through(&layer, layer.redirect_policy(), &location).await;
        assert_eq!(status, 200, "{shown}");
        let landed = b.requests();
        assert_eq!(landed.len(), 1, "{shown}");
        assert!(
            carries(&landed[0], &b_token),
            "{shown}: B's request has B's token: {:?}",
            landed[0]
        );
        assert!(!carries(&landed[0], &a_token), "{shown}: {:?}", landed[0]);
    }
}

/// The policy stops only what needs stopping: a hop that keeps the token where it may
/// go, or that carries none, is followed as tower-http's standard policy would.
#[tokio::test]
async fn tower_redirect_policy_follows_hops_that_keep_the_token_where_it_may_go() {
    let allowed = TestServer::start(TestServerConfig::other_origin());
    let other = TestServer::start(TestServerConfig::other_origin());

    // A custom header inside the allowed origin: followed, the token on both hops.
    let layer = TokenLayer::builder()
        .source(fixed_token("the-api-key"))
        .placement(Placement::header("x-api-key", None))
        .allowed_origin(&allowed.origin())
        .build()
        .unwrap();
    let url = allowed.redirect_url(&allowed.api_url("same"));
    let (status, _) = get_through(&layer, layer.redirect_policy(), &url).await;
    assert_eq!(status, 200);
    let landed = allowed.requests();
    assert_eq!(landed.len(), 1);
    assert!(carries(&landed[0], "the-api-key"), "{:?}", landed[0]);

    // `Authorization`, one hop to another origin: followed, the header dropped there.
    let layer = TokenLayer::builder()
        .source(fixed_token("bearer-token"))
        .allowed_origin(&allowed.origin())
        .build()
        .unwrap();
    let url = allowed.redirect_url(&other.api_url("elsewhere"));
    let (status, _) = get_through(&layer, layer.redirect_policy(), &url).await;
    assert_eq!(status, 200);
    let landed = other.requests();
    assert_eq!(landed.len(), 1);
    assert!(!carries(&landed[0], "bearer-token"), "{:?}", landed[0]);

    // A request sent without the token (`SkipAuth`): nothing to keep, so followed.
    let layer = TokenLayer::builder()
        .source(fixed_token("the-api-key"))
        .placement(Placement::header("x-api-key", None))
        .allowed_origin(&allowed.origin())
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(FollowRedirectLayer::with_policy(layer.redirect_policy()))
        .service(hyper_client());
    let mut request = http::Request::get(allowed.redirect_url(&other.api_url("skipped")))
        .body(Full::default())
        .unwrap();
    request.extensions_mut().insert(tokenflight::SkipAuth);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let landed = other.requests();
    assert_eq!(landed.len(), 2);
    assert!(!carries(&landed[1], "the-api-key"), "{:?}", landed[1]);
}
