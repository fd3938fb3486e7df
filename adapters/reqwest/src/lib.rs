//! # tokenflight-reqwest
//!
//! [`tokenflight`] for reqwest: a [`reqwest_middleware`] middleware that keeps a client's
//! access token valid. Before a request it checks the token for (near) expiry; after the
//! response it checks whether the server rejected it. Either way exactly one refresh
//! runs for all concurrent requests, and each rejected request is resent exactly once
//! with the new token. The coordination lives in the core; this crate only maps
//! reqwest's types onto it and supplies tokio's spawner and timer.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
//! use tokenflight_reqwest::tokenflight::oauth2::RefreshTokenGrant;
//! use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
//!
//! # async fn run(refresh_token_from_login: String) -> Result<(), Box<dyn std::error::Error>> {
//! // The token source talks to the token endpoint through a *bare* client: a refresh
//! // can never pass through the layer that waits for it.
//! let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
//! let grant = RefreshTokenGrant::new(bare, "https://auth.example.com/oauth/token", "my-app")?
//!     .client_secret("my-app-secret")
//!     .initial_refresh_token(refresh_token_from_login);
//! let middleware = TokenMiddleware::builder()
//!     .source(grant)
//!     .allowed_origin("https://api.example.com")
//!     .build()?;
//! let client = ClientBuilder::new(reqwest::Client::new()).with(middleware).build();
//!
//! let response = client.get("https://api.example.com/me").send().await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! `tests/all/example.rs` runs the same setup against a real server.
//!
//! ## Per-request options and exempt routes
//!
//! Put a marker in the request's extensions, as with every tokenflight adapter:
//! [`SkipAuth`] sends it without credentials and does not classify
//! the response; [`ForceRefresh`] refreshes before sending; with a keyed policy
//! ([`keyed`](tokenflight::AuthPolicyBuilder::keyed)) a
//! [`TokenKey`] chooses the request's token.
//! Routes that never carry a token (a login endpoint on the API's origin) are exempted
//! once, on the builder: `.skip_route(Some(Method::POST), "/login")`
//! ([`AuthPolicyBuilder::skip_route`](tokenflight::AuthPolicyBuilder::skip_route)).
//!
//! ```
//! # use tokenflight_reqwest::{reqwest, reqwest_middleware::ClientWithMiddleware};
//! # let client = ClientWithMiddleware::from(reqwest::Client::new());
//! use tokenflight_reqwest::tokenflight::SkipAuth;
//! let request = client.get("https://api.example.com/health").with_extension(SkipAuth);
//! # drop(request);
//! ```
//!
//! ## Errors
//!
//! When no token can be had, the request fails with
//! [`reqwest_middleware::Error::Middleware`] wrapping a [`tokenflight::Error`];
//! [`token_error`] finds it, and its predicates say what happened:
//!
//! ```
//! fn needs_login(error: &tokenflight_reqwest::reqwest_middleware::Error) -> bool {
//!     tokenflight_reqwest::token_error(error)
//!         .is_some_and(tokenflight_reqwest::tokenflight::Error::is_reauthentication_required)
//! }
//! # let _ = needs_login;
//! ```
//!
//! Errors of reqwest and of other middleware pass through unchanged.
//!
//! ## Where the token goes
//!
//! The header is marked sensitive. The token goes only to the allowed origins (the core
//! checks each request's URL, [C12](tokenflight#c12)). reqwest follows redirects below the middleware, and
//! every hop keeps what the first request carried: it drops the `Authorization` header
//! only on a hop that changes origin (a second hop inside the new origin gets it back),
//! keeps other headers (`Placement::header("x-api-key", None)`) on every hop, and sends
//! the previous URL, query included (`Placement::query("token")`), as `Referer` (tested
//! in `tests/all/redirects.rs`). So build the client with
//! [`TokenMiddleware::redirect_policy`], which does not follow a redirect that would
//! take the token to an origin not allowed, or with a keyed policy to a request of
//! another key: the caller gets the redirect response, and following it is a request
//! of its own, with its own token.
//!
//! With query placement, the token is kept out of what the layer hands back: the URL in
//! reqwest's errors, and the response's [`url()`](reqwest::Response::url) (so its
//! `Debug` and `error_for_status` too), show the parameter as `token=redacted`; the
//! rest of the query is the caller's, byte for byte.
//!
//! A response that reqwest got from another origin than the request's (after a
//! redirect) is handed back unclassified: its `401` is not about the token, which never
//! went there, so nothing is refreshed or resent. With query placement the same holds
//! for a same-origin redirect, whose `Location` does not carry the token.
//!
//! ## Cancellation
//!
//! Dropping a request's future is safe at any point: a refresh it started goes on for the
//! other requests, and with the [`TokioSpawner`] that [`TokenMiddleware::builder`] presets
//! it completes and is stored even if every request was dropped
//! ([C6](tokenflight#c6)).
//!
//! ## Features
//!
//! - `oauth2` (default): the core's OAuth 2.0 token sources (`tokenflight::oauth2`).
//! - `file-store`: the core's `tokenflight::store::FileStore`.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod layer;
mod message;
mod redirect;
mod transport;

pub use layer::TokenMiddleware;
pub use tokenflight::adapter::{TokioSpawner, TokioTimer};
pub use transport::BareTransport;

pub use reqwest;
pub use reqwest_middleware;
pub use tokenflight;
pub use tokenflight::{ForceRefresh, Placement, SkipAuth, TokenKey, ValidFor};

/// The [`tokenflight::Error`] a request failed with because no token could be had;
/// `None` for errors of reqwest and of other middleware.
///
/// ```
/// use tokenflight_reqwest::reqwest_middleware::Error;
/// use tokenflight_reqwest::tokenflight::{self, RefreshError};
/// let lost = Error::middleware(tokenflight::Error::ReauthenticationRequired {
///     cause: RefreshError::permanent("invalid_grant"),
/// });
/// assert!(tokenflight_reqwest::token_error(&lost).is_some_and(tokenflight::Error::is_reauthentication_required));
/// let other = Error::middleware(std::io::Error::other("another middleware's error"));
/// assert!(tokenflight_reqwest::token_error(&other).is_none());
/// ```
pub fn token_error(error: &reqwest_middleware::Error) -> Option<&tokenflight::Error> {
    match error {
        reqwest_middleware::Error::Middleware(inner) => inner.downcast_ref(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}
