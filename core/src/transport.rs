//! The bare transport token sources use to reach a token endpoint. It is implemented for
//! a client *without* the auth layer, so a refresh request can never wait for itself or
//! loop through the layer ([C11](crate#c11)) — by construction, not by a flag.

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::error::BoxError;

/// A request to a token endpoint.
pub type HttpRequest = http::Request<Bytes>;
/// A fully buffered response.
pub type HttpResponse = http::Response<Bytes>;

/// What [`Transport::send`] returns: a boxed future of one buffered response.
pub type TransportFuture<'a> = BoxFuture<'a, Result<HttpResponse, TransportError>>;

/// Sends one request and returns one buffered response. Object-safe.
pub trait Transport: Send + Sync {
    /// Sends `request`; fails with [`TransportError::TooLarge`] if the response body is
    /// longer than `body_limit` bytes.
    fn send(&self, request: HttpRequest, body_limit: usize) -> TransportFuture<'_>;
}

/// Why a bare transport could not deliver a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting, sending or reading failed.
    #[error("token endpoint request failed")]
    Network(#[source] BoxError),
    /// The request timed out.
    #[error("token endpoint request timed out")]
    Timeout,
    /// The response body exceeded the limit.
    #[error("token endpoint response larger than {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The request could not be built (bad URL or header).
    #[error("invalid token endpoint request: {0}")]
    InvalidRequest(String),
}
