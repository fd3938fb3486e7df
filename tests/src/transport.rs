//! The bare transports and runtime pieces this crate's own tests and worker processes
//! use, written against `reqwest` and `tokio` directly: `tokenflight-tests` depends on
//! no adapter crate, so every adapter can dev-depend on it without a dependency cycle.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokenflight::adapter::{HttpRequest, HttpResponse, Spawn, Timer, Transport, TransportError};

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

impl Transport for ReqwestTransport {
    fn send(
        &self,
        request: HttpRequest,
        body_limit: usize,
    ) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        Box::pin(self.send_buffered(request, body_limit))
    }
}

/// No URL in the error: a token endpoint URL may carry credentials (C12).
fn transport_error(error: reqwest::Error) -> TransportError {
    if error.is_timeout() {
        TransportError::Timeout
    } else {
        TransportError::Network(Box::new(error.without_url()))
    }
}

/// Spawns on the tokio runtime the refresh starts on (none: the waiters drive it).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioSpawner;

impl Spawn for TokioSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                drop(handle.spawn(task));
                true
            }
            Err(_) => false,
        }
    }
}

/// `tokio::time::sleep`, created inside the runtime that polls it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move { tokio::time::sleep(duration).await })
    }
}
