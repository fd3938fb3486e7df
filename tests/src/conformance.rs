//! The conformance suite S1–S15, written once and run by every adapter against the
//! testkit server. An adapter implements [`Adapter`] in its own `tests/conformance.rs`
//! and runs each scenario (see `conformance_tests!`).
//!
//! (Skeleton: the trait definitions below are the contract between the suite and the
//! adapters; the scenarios are filled in next to them.)

use std::sync::Arc;

use futures::future::BoxFuture;
use tokenflight::{Authenticator, Builder, Transport};

/// What an adapter gives the suite.
pub trait Adapter: Send + Sync + 'static {
    /// Short name for messages ("reqwest", "surf").
    fn name(&self) -> &'static str;
    /// A core builder preset the way the adapter's own builder is (its runtime's
    /// spawner and timer); the suite adds source, origins, placement and so on.
    fn builder(&self) -> Builder<Authenticator>;
    /// A client of the adapter's HTTP library with the adapter's auth middleware made
    /// from `auth`. The client must follow redirects (S11).
    fn client(&self, auth: Authenticator) -> Arc<dyn TestClient>;
    /// A bare client (no auth layer) for token sources.
    fn bare_transport(&self) -> Arc<dyn Transport>;
}

/// One request as the suite describes it; the adapter turns it into its client's call.
#[derive(Clone, Debug, Default)]
pub struct TestRequest {
    /// "GET", "POST", "PUT".
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Body bytes, if any.
    pub body: Option<Vec<u8>>,
    /// Send the body as a stream that cannot be replayed (S9).
    pub streaming_body: bool,
    /// Put the `SkipAuth` marker on the request (S10).
    pub skip_auth: bool,
    /// Put the `ForceRefresh` marker on the request.
    pub force_refresh: bool,
}

/// What came back, fully read.
#[derive(Clone, Debug, Default)]
pub struct TestResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

/// A client under test.
pub trait TestClient: Send + Sync {
    /// Sends one request through the adapter's middleware. `Err` carries the error's
    /// `Display` (token errors included: S5, S6, S15).
    fn send(&self, request: TestRequest) -> BoxFuture<'_, Result<TestResponse, String>>;
}
