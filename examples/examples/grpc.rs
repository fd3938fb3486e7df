//! tonic gRPC with tokenflight: a tonic client calls a tonic server on loopback whose
//! interceptor rejects tokens that are not (or no longer) valid. The server revokes
//! every token between rounds of concurrent calls; the layer refreshes once per round,
//! resends the rejected calls, and the callers only ever see replies.
//!
//! `cargo run --example grpc` (exits with an error if any call failed or the refresh
//! count is not one per round).

use std::sync::Arc;

use futures::future::join_all;
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight_tests::grpc::{EchoClient, EchoRequest, GrpcServer};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tower::{HyperTransport, TokenLayer, grpc};
use tonic::transport::Endpoint;
use tower::ServiceBuilder;

const ROUNDS: usize = 3;
const CALLS_PER_ROUND: usize = 50;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Stand-ins for your authorization server and your gRPC service, which accepts the
    // tokens the authorization server considers valid.
    let auth_server = Arc::new(TestServer::start(TestServerConfig::default()));
    let authority = auth_server.clone();
    let grpc_server = GrpcServer::start(move |token| authority.access_token_valid(token));
    let origin = grpc_server.origin();

    // The token source reaches the token endpoint through a bare hyper-util client.
    let bare = Arc::new(HyperTransport::default());
    let grant = RefreshTokenGrant::new(bare, &auth_server.token_url(), &auth_server.client_id())?
        .client_secret(auth_server.client_secret())
        .initial_refresh_token(auth_server.issue_refresh_token());
    let layer = TokenLayer::builder()
        .source(grant)
        .classifier(grpc::classifier())
        .allowed_origin(&origin)
        .build()?;
    let channel = Endpoint::from_shared(origin.clone())?.connect_lazy();
    let service = ServiceBuilder::new().layer(layer.clone()).service(channel);
    // `with_origin`: the layer sees absolute URIs and knows where the token goes.
    let client = EchoClient::with_origin(service, origin.parse()?);

    let mut failed = 0;
    for round in 1..=ROUNDS {
        if round > 1 {
            // Every token the client holds is now refused by the service.
            auth_server.expire_all_tokens();
        }
        let calls = (0..CALLS_PER_ROUND).map(|i| {
            let mut client = client.clone();
            async move {
                let request = EchoRequest {
                    message: format!("round {round} call {i}"),
                };
                client.unary(request).await
            }
        });
        for result in join_all(calls).await {
            if let Err(status) = result {
                failed += 1;
                eprintln!("call failed: {status}");
            }
        }
    }

    let seen = grpc_server.counters();
    let stats = layer.policy().stats();
    let refreshes = auth_server.counters().token_calls;
    let calls = ROUNDS * CALLS_PER_ROUND;
    println!("gRPC calls made:                      {calls}");
    println!("calls that failed for the caller:     {failed}");
    println!("calls the server received:            {}", seen.calls);
    println!("  rejected UNAUTHENTICATED:           {}", seen.rejected);
    println!("  answered:                           {}", seen.unary_ok);
    println!(
        "token-endpoint calls:                 {refreshes} (the first token, then one per revocation)"
    );
    println!("calls resent after a refresh:         {}", stats.retries);

    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    if refreshes != ROUNDS as u64 {
        return Err(format!("expected {ROUNDS} refreshes (one per round), saw {refreshes}").into());
    }
    Ok(())
}
