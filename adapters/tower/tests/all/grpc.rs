//! The layer in front of a tonic `Channel`, against a real tonic server on loopback
//! whose interceptor accepts only tokens the testkit's token endpoint issued and that
//! are still valid there.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::join_all;
use tokenflight::Token;
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight_tests::grpc::{EchoClient, EchoRequest, GrpcServer};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tower::{HyperTransport, TokenLayer, TokenService, grpc};
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;

type Client = EchoClient<TokenService<Channel>>;

/// How the client's first token starts out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Valid for an hour on both sides.
    Valid,
    /// Expired in the client's eyes: every caller needs a refresh before sending.
    ExpiredClientSide,
}

struct World {
    /// The token endpoint (and the authority on which tokens are valid).
    api: Arc<TestServer>,
    /// The gRPC service whose origin is allowed.
    grpc: GrpcServer,
    layer: TokenLayer,
}

impl World {
    fn start(start: Start) -> World {
        let api = Arc::new(TestServer::start(TestServerConfig::default()));
        let authority = api.clone();
        let grpc = GrpcServer::start(move |token| authority.access_token_valid(token));
        let (access, expires_in) = api.issue_access_token();
        let now = SystemTime::now();
        let token = Token::new(access).with_refresh(api.issue_refresh_token());
        let token = match start {
            Start::Valid => token.expires_in(Duration::from_secs(expires_in), now),
            Start::ExpiredClientSide => token.expires_at(now - Duration::from_secs(60)),
        };
        let grant = RefreshTokenGrant::new(
            Arc::new(HyperTransport::default()),
            &api.token_url(),
            &api.client_id(),
        )
        .unwrap()
        .client_secret(api.client_secret());
        let layer = TokenLayer::builder()
            .source(grant)
            .classifier(grpc::classifier())
            .allowed_origin(&grpc.origin())
            .initial_token(token)
            .build()
            .unwrap();
        World { api, grpc, layer }
    }

    /// A client of the server at `origin` through the layer.
    fn client_of(&self, origin: &str) -> Client {
        let channel = Endpoint::from_shared(origin.to_owned())
            .unwrap()
            .connect_lazy();
        let service = ServiceBuilder::new()
            .layer(self.layer.clone())
            .service(channel);
        EchoClient::with_origin(service, origin.parse().unwrap())
    }

    fn client(&self) -> Client {
        self.client_of(&self.grpc.origin())
    }
}

fn say(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_unary_call_is_resent_once_transparently_and_succeeds() {
    let w = World::start(Start::Valid);
    // The server no longer accepts the token the client holds (revoked, clock skew...).
    w.api.expire_all_tokens();
    let reply = w.client().unary(say("hello")).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");

    let seen = w.grpc.counters();
    assert_eq!(seen.calls, 2, "sent twice: {seen:?}");
    assert_eq!(seen.rejected, 1, "the first was rejected: {seen:?}");
    assert_eq!(seen.unary_ok, 1);
    assert_eq!(w.api.counters().refresh_token_calls, 1);
    assert_eq!(w.layer.policy().stats().retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_unary_calls_on_an_expired_token_cause_one_refresh() {
    let w = World::start(Start::ExpiredClientSide);
    let client = w.client();
    let calls = (0..100).map(|i| {
        let mut client = client.clone();
        async move { client.unary(say(&format!("call {i}"))).await }
    });
    let replies = join_all(calls).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|status| panic!("call {i}: {status:?}"));
        assert_eq!(reply.into_inner().message, format!("call {i}"));
    }
    assert_eq!(w.api.counters().refresh_token_calls, 1, "one refresh");
    let seen = w.grpc.counters();
    assert_eq!(seen.calls, 100, "no call sent twice: {seen:?}");
    assert_eq!(
        seen.rejected, 0,
        "none sent with the expired token: {seen:?}"
    );
    assert_eq!(seen.unary_ok, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_call_is_not_replayed_and_its_caller_gets_unauthenticated() {
    let w = World::start(Start::Valid);
    w.api.expire_all_tokens();
    let mut client = w.client();
    // The caller is still producing the stream when the call starts (the sender stays
    // open), so the body cannot be replayed, whatever the layer's replay limit.
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    sender.send(say("one")).await.unwrap();
    sender.send(say("two")).await.unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let status = client.collect(stream).await.unwrap_err();
    drop(sender);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let seen = w.grpc.counters();
    assert_eq!(seen.calls, 1, "not resent: {seen:?}");
    assert_eq!(seen.rejected, 1);
    assert_eq!(seen.collect_ok, 0);
    assert_eq!(w.layer.policy().stats().retries, 0);

    // The token was marked rejected (C4): the next call gets a new one first and goes
    // through without a rejection.
    let reply = client.unary(say("after")).await.unwrap().into_inner();
    assert_eq!(reply.message, "after");
    let seen = w.grpc.counters();
    assert_eq!(
        (seen.calls, seen.rejected, seen.unary_ok),
        (2, 1, 1),
        "{seen:?}"
    );
    assert_eq!(w.api.counters().refresh_token_calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_call_whose_token_is_valid_streams_through() {
    let w = World::start(Start::Valid);
    let mut client = w.client();
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let feeder = tokio::spawn(async move {
        for word in ["a", "b", "c"] {
            sender.send(say(word)).await.unwrap();
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let reply = client.collect(stream).await.unwrap().into_inner();
    feeder.await.unwrap();
    assert_eq!((reply.message.as_str(), reply.count), ("a b c", 3));
    assert_eq!(w.grpc.counters().collect_ok, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_an_origin_not_allowed_carries_no_token() {
    let w = World::start(Start::Valid);
    // Would accept any token: only whether one arrives is of interest.
    let other = GrpcServer::start(|_| true);
    let status = w
        .client_of(&other.origin())
        .unary(say("elsewhere"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let seen = other.counters();
    assert_eq!((seen.calls, seen.with_credentials), (1, 0), "{seen:?}");

    // A client made without an origin sends relative URIs: no origin, so no token
    // either (the channel still reaches the allowed server).
    let channel = Endpoint::from_shared(w.grpc.origin())
        .unwrap()
        .connect_lazy();
    let mut no_origin = EchoClient::new(
        ServiceBuilder::new()
            .layer(w.layer.clone())
            .service(channel),
    );
    let status = no_origin.unary(say("relative")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(w.grpc.counters().with_credentials, 0);

    // The allowed origin gets it.
    w.client().unary(say("allowed")).await.unwrap();
    assert_eq!(w.grpc.counters().with_credentials, 1);
    assert_eq!(w.api.counters().token_calls, 0);
}
