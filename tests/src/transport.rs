//! The bare transport this crate's own tests and worker processes use, written against
//! `reqwest` directly: `tokenflight-tests` depends on no adapter crate, so every adapter
//! can dev-depend on it without a dependency cycle. Reading the response within its
//! limit is the core's (`collect_response`), as in the reqwest adapter; the tokio
//! spawner and timer are the core's too.

use tokenflight::adapter::{HttpRequest, Transport, TransportError, TransportFuture};
pub use tokenflight::adapter::{TokioSpawner, TokioTimer};

/// A [`Transport`] over a plain `reqwest::Client` (what `tokenflight_reqwest::BareTransport`
/// does, for the tests here).
#[derive(Clone, Debug, Default)]
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    /// Sends through `client` (its timeouts apply).
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestTransport { client }
    }
}

impl Transport for ReqwestTransport {
    fn send(&self, request: HttpRequest, limit: usize) -> TransportFuture<'_> {
        // No URL in an error: a token endpoint URL may carry credentials (C12).
        let failed =
            |e: reqwest::Error| TransportError::from_client(e.is_timeout(), e.without_url());
        Box::pin(async move {
            let request = reqwest::Request::try_from(request)
                .map_err(|e| TransportError::InvalidRequest(e.without_url().to_string()))?;
            let response = self.client.execute(request).await.map_err(failed)?;
            tokenflight::adapter::collect_response(http::Response::from(response), limit, failed)
                .await
        })
    }
}
