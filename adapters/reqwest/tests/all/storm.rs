//! C1/C2/C3 through reqwest: 1,000 concurrent requests per token expiry, three expiries,
//! one `ClientWithMiddleware`: every request succeeds and each expiry costs exactly one
//! token-endpoint call (the core's OAuth 2.0 refresh_token grant, with rotation).

use crate::common;
use futures::future::join_all;
use tokenflight_reqwest::TokenMiddleware;
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

const CONCURRENT: usize = 1_000;
const EXPIRIES: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_requests_across_three_expiries_cost_three_token_calls() {
    let server = TestServer::start(TestServerConfig::default());
    // Start from a login: the token the server issued outside the token endpoint.
    let (login, _expires_in) = server.issue_access_token();
    let layer = TokenMiddleware::builder()
        .source(common::refresh_token_grant(&server))
        .initial_token(tokenflight::Token::new(login))
        .allowed_origin(&server.origin())
        .build()
        .unwrap();
    let client = common::client(layer.clone());

    for expiry in 1..=EXPIRIES {
        // The server expires the token; the client still thinks it is valid, so every
        // request of the wave is sent, rejected, and waits for the one refresh.
        server.expire_all_tokens();
        let wave = (0..CONCURRENT).map(|i| {
            let client = client.clone();
            let url = server.api_url(&format!("wave/{expiry}/{i}"));
            tokio::spawn(async move {
                let response = client.get(url).send().await.unwrap();
                response.status().as_u16()
            })
        });
        let statuses = join_all(wave).await;
        let ok = statuses
            .iter()
            .filter(|status| matches!(status, Ok(200)))
            .count();
        assert_eq!(ok, CONCURRENT, "wave {expiry}: {statuses:?}");
        let counters = server.counters();
        assert_eq!(
            counters.token_calls,
            expiry,
            "after wave {expiry}: {counters:?} {:?}",
            layer.policy().stats()
        );
    }

    let counters = server.counters();
    assert_eq!(counters.token_calls, EXPIRIES);
    assert_eq!(counters.refresh_token_calls, EXPIRIES);
    assert_eq!(counters.token_errors, 0);
    // A second refresh would have presented a spent (rotated) refresh token.
    assert_eq!(counters.reuse_detections, 0);
    let stats = layer.policy().stats();
    eprintln!(
        "storm: {} requests, {} token calls, {} rejections resent once, {} stale rejections",
        EXPIRIES * CONCURRENT as u64,
        counters.token_calls,
        stats.retries,
        stats.stale_rejections
    );
    assert_eq!(stats.source_calls, EXPIRIES);
    // Every rejected request was resent exactly once, never more (C4).
    assert_eq!(stats.retries, counters.rejections);
    assert_eq!(
        counters.resource_calls,
        EXPIRIES * CONCURRENT as u64 + counters.rejections
    );
}
