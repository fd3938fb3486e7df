//! The bare transport: a hyper-util client (no layer) that token sources use to reach
//! the token endpoint, so a refresh can never pass through the layer that waits for it
//! ([C11](tokenflight#c11)). hyper-util rather than the reqwest adapter's transport: this crate must not
//! bring reqwest in, and hyper-util is what tower users already have.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokenflight::adapter::{
    HttpRequest, Transport, TransportError, TransportFuture, collect_response,
};

/// A [`Transport`] over a hyper-util client.
///
/// [`HyperTransport::default`] speaks plain HTTP (loopback, tests, a sidecar). For
/// `https://` token endpoints, build the client with a TLS connector (for example
/// hyper-rustls's `HttpsConnector`) and pass it to [`HyperTransport::new`].
///
/// There is no timeout here: the core bounds every source call (`refresh_timeout`).
#[derive(Clone, Debug)]
pub struct HyperTransport<C = HttpConnector> {
    client: Client<C, Full<Bytes>>,
}

impl Default for HyperTransport {
    fn default() -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        HyperTransport { client }
    }
}

impl<C> HyperTransport<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// Sends through `client` (its connector, pool and protocol settings apply). Do not
    /// hand it a client wrapped in the [`TokenLayer`](crate::TokenLayer): the type is a
    /// plain `Client`, so that does not compile.
    pub fn new(client: Client<C, Full<Bytes>>) -> Self {
        HyperTransport { client }
    }
}

impl<C> Transport for HyperTransport<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn send(&self, request: HttpRequest, body_limit: usize) -> TransportFuture<'_> {
        Box::pin(async move {
            let response = self.client.request(request.map(Full::new));
            collect_response(response.await.map_err(failed)?, body_limit, failed).await
        })
    }
}

fn failed(error: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::from_client(false, error)
}
