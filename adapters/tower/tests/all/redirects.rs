//! C12 with tower-http's `FollowRedirect` below the layer: what the layer hands back
//! never shows a token that travelled in the query.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokenflight::{Placement, Token, from_fn};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tower::TokenLayer;
use tower::{Service, ServiceBuilder, ServiceExt};
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
