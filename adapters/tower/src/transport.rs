//! The bare transport: a hyper-util client (no layer) that token sources use to reach
//! the token endpoint, so a refresh can never pass through the layer that waits for it
//! ([C11](tokenflight#c11)). hyper-util rather than the reqwest adapter's transport: this crate must not
//! bring reqwest in, and hyper-util is what tower users already have.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};

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

    async fn send_buffered(
        &self,
        request: HttpRequest,
        body_limit: usize,
    ) -> Result<HttpResponse, TransportError> {
        let response = self
            .client
            .request(request.map(Full::new))
            .await
            .map_err(|e| TransportError::Network(Box::new(e)))?;
        let (parts, body) = response.into_parts();
        let too_large = TransportError::TooLarge { limit: body_limit };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > body_limit as u64) {
            return Err(too_large);
        }
        match Limited::new(body, body_limit).collect().await {
            Ok(collected) => Ok(http::Response::from_parts(parts, collected.to_bytes())),
            Err(e) if e.is::<LengthLimitError>() => Err(too_large),
            Err(e) => Err(TransportError::Network(e)),
        }
    }
}

impl<C> Transport for HyperTransport<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn send(
        &self,
        request: HttpRequest,
        body_limit: usize,
    ) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        Box::pin(self.send_buffered(request, body_limit))
    }
}
