//! The bare transport: a plain `reqwest::Client` (no middleware) that token sources use
//! to reach the token endpoint, so a refresh can never pass through the auth layer that
//! waits for it ([C11](tokenflight#c11)).

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};

/// A [`Transport`] over a plain `reqwest::Client`.
///
/// Build it from the client *without* the [`TokenMiddleware`](crate::TokenMiddleware); the client
/// with the layer is a different type (`ClientWithMiddleware`), so mixing them up does not
/// compile.
#[derive(Clone, Debug, Default)]
pub struct BareTransport {
    client: reqwest::Client,
}

impl BareTransport {
    /// Sends through `client` (its timeouts, proxies and TLS settings apply).
    pub fn new(client: reqwest::Client) -> Self {
        BareTransport { client }
    }

    async fn send_buffered(
        &self,
        request: HttpRequest,
        body_limit: usize,
    ) -> Result<HttpResponse, TransportError> {
        let request = reqwest::Request::try_from(request)
            .map_err(|e| TransportError::InvalidRequest(e.without_url().to_string()))?;
        let mut response = self
            .client
            .execute(request)
            .await
            .map_err(transport_error)?;
        let too_large = TransportError::TooLarge { limit: body_limit };
        if response
            .content_length()
            .is_some_and(|length| length > body_limit as u64)
        {
            return Err(too_large);
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len().saturating_add(chunk.len()) > body_limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        let mut buffered = http::Response::new(Bytes::from(body));
        *buffered.status_mut() = response.status();
        *buffered.version_mut() = response.version();
        *buffered.headers_mut() = std::mem::take(response.headers_mut());
        Ok(buffered)
    }
}

impl Transport for BareTransport {
    fn send(
        &self,
        request: HttpRequest,
        body_limit: usize,
    ) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        Box::pin(self.send_buffered(request, body_limit))
    }
}

/// The URL is dropped from the error: a token endpoint URL may carry credentials in its
/// query, and this error is shown to every waiter of the refresh ([C12](tokenflight#c12)).
fn transport_error(error: reqwest::Error) -> TransportError {
    if error.is_timeout() {
        TransportError::Timeout
    } else {
        TransportError::Network(Box::new(error.without_url()))
    }
}
