//! # tokenflight-surf
//!
//! [tokenflight] for [surf] on async-std: the [`TokenMiddleware`]
//! keeps the access token valid (one refresh for everybody who needs it,
//! each rejected request resent once), [`BareTransport`] lets token sources reach the
//! token endpoint with a plain `surf::Client`, and [`AsyncStdSpawner`] /
//! [`AsyncStdTimer`] are async-std's runtime pieces for the core.
//!
//! The builder, the markers ([`SkipAuth`], [`ForceRefresh`]) and the route exemptions
//! are the reqwest adapter's, so switching clients is a one-line change
//! (`tokenflight_reqwest::TokenMiddleware::builder()` ↔
//! `tokenflight_surf::TokenMiddleware::builder()`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::sync::Arc;
//! use tokenflight::oauth2::RefreshTokenGrant;
//! use tokenflight_surf::{BareTransport, FollowRedirects, TokenMiddleware};
//!
//! let bare = Arc::new(BareTransport::new(surf::Client::new()));
//! let grant = RefreshTokenGrant::new(bare, "https://auth.example.com/oauth/token", "my-app")?
//!     .initial_refresh_token("refresh-from-login");
//! let middleware = TokenMiddleware::builder()
//!     .source(grant)
//!     .allowed_origin("https://api.example.com")
//!     .build()?;
//! let client = surf::client().with(FollowRedirects::default()).with(middleware);
//! let body = client.get("https://api.example.com/me").recv_string().await?;
//! # let _ = body; Ok(()) }
//! ```
//!
//! ## Redirects and the token ([C12](tokenflight#c12))
//!
//! The token goes only to the allowed origins; the layer checks the URL of every
//! request it sees. What it sees depends on where redirects are followed:
//!
//! - **Recommended:** [`FollowRedirects`] registered *before* the layer
//!   (`.with(FollowRedirects::default()).with(layer)`): each hop passes the layer, which
//!   attaches the token only if the hop's origin is allowed, and each hop is sent once.
//! - surf's `surf::middleware::Redirect` *after* the layer **leaks the token**: it
//!   probes redirect targets with a copy of the request, `Authorization` header
//!   included, whatever their origin. Never register it after the layer.
//! - surf's `Redirect` *before* the layer is safe (its probes carry no token) but sends
//!   every request twice, the first time without credentials.
//!
//! `tests/all/redirects.rs` shows all three.
//!
//! With query placement (`Placement::query("token")`) the token is part of the request's
//! URL: [`FollowRedirects`] sends no `Referer`, so a hop to another origin does not
//! carry it, and surf's own errors (and its `Response`, which has no URL) do not show
//! it (the conformance scenarios `c12_query_token_never_in_errors` and
//! `c12_query_token_never_in_a_referer` check both). Middleware registered after the
//! layer sees the URL with the token, like the header.
//!
//! Since redirects are followed outside the layer, every response the layer classifies
//! comes from the origin its request (and token) went to.
//!
//! ## Dependencies
//!
//! Nothing here needs tokio. surf's `h1-client-rustls` backend (the crate feature of
//! the same name, needed for `surf::Client::new()` and `BareTransport::default()`)
//! brings in `tokio` with only its `sync` and `time` features through its connection
//! pool (`deadpool` 0.7): no tokio runtime runs. Without that feature (the default),
//! `cargo tree -p tokenflight-surf -e normal` lists no tokio at all; the application
//! picks surf's backend.
//!
//! ## Features
//!
//! - `oauth2` (default): the core's OAuth 2.0 token sources (`tokenflight::oauth2`).
//! - `file-store`: the core's `tokenflight::store::FileStore`.
//! - `h1-client-rustls`: surf's async-h1 client with rustls, so `surf::Client::new()` and
//!   [`BareTransport::default()`](BareTransport) work (pulls tokio's `sync` and `time`, no runtime).
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod body;
mod layer;
mod message;
mod redirect;
mod runtime;
mod transport;

pub use layer::{DEFAULT_REPLAY_BODY_LIMIT, TokenMiddleware};
pub use redirect::FollowRedirects;
pub use runtime::{AsyncStdSpawner, AsyncStdTimer};
pub use transport::BareTransport;

pub use surf;
pub use tokenflight;
pub use tokenflight::{ForceRefresh, Placement, SkipAuth, TokenKey, ValidFor};

/// The [`tokenflight::Error`] a request failed with because no token could be had;
/// `None` for surf's own errors and other middleware's. Its predicates say what
/// happened ([`is_reauthentication_required`](tokenflight::Error::is_reauthentication_required)).
///
/// ```
/// use tokenflight_surf::surf;
/// use tokenflight_surf::tokenflight::{self, RefreshError};
/// let lost = surf::Error::new(
///     surf::StatusCode::Unauthorized,
///     tokenflight::Error::ReauthenticationRequired { cause: RefreshError::permanent("invalid_grant") },
/// );
/// assert!(tokenflight_surf::token_error(&lost).is_some_and(tokenflight::Error::is_reauthentication_required));
/// let other = surf::Error::from_str(surf::StatusCode::BadGateway, "another middleware's error");
/// assert!(tokenflight_surf::token_error(&other).is_none());
/// ```
pub fn token_error(error: &surf::Error) -> Option<&tokenflight::Error> {
    error.downcast_ref()
}
