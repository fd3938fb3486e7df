//! The bare transport: a plain `reqwest::Client` (no middleware) that token sources use
//! to reach the token endpoint, so a refresh can never pass through the auth layer that
//! waits for it ([C11](tokenflight#c11)).

use tokenflight::adapter::{
    HttpRequest, Transport, TransportError, TransportFuture, collect_response,
};

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
}

impl Transport for BareTransport {
    fn send(&self, request: HttpRequest, body_limit: usize) -> TransportFuture<'_> {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request)
                .map_err(|e| TransportError::InvalidRequest(e.without_url().to_string()))?;
            let response = self.client.execute(request).await.map_err(failed)?;
            collect_response(http::Response::from(response), body_limit, failed).await
        })
    }
}

/// The URL is dropped from the error: a token endpoint URL may carry credentials in its
/// query, and this error is shown to every waiter of the refresh ([C12](tokenflight#c12)).
fn failed(error: reqwest::Error) -> TransportError {
    TransportError::from_client(error.is_timeout(), error.without_url())
}
