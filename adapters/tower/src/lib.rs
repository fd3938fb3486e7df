//! # tokenflight-tower
//!
//! [`tokenflight`] for tower: a [`Layer`](tower_layer::Layer) that keeps the access
//! token of any tower HTTP service valid — hyper-util's client, a tonic gRPC `Channel`,
//! or a stack of tower-http middleware. Before a request it checks the token for (near)
//! expiry; after the response it checks whether the server rejected it. Either way
//! exactly one refresh runs for all concurrent requests, and each rejected request is
//! resent exactly once with the new token when its body can be replayed. The
//! coordination lives in the core; this crate maps `http` types onto it and supplies
//! tokio's spawner and timer.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tokenflight_tower::tokenflight::oauth2::RefreshTokenGrant;
//! use tokenflight_tower::{HyperTransport, TokenLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//!
//! # async fn run(refresh_token_from_login: String) -> Result<(), Box<dyn std::error::Error>> {
//! // Token sources use a *bare* client: a refresh never passes through the layer.
//! let bare = Arc::new(HyperTransport::default());
//! let grant = RefreshTokenGrant::new(bare, "http://auth.internal/oauth/token", "my-app")?
//!     .initial_refresh_token(refresh_token_from_login);
//! let layer = TokenLayer::builder()
//!     .source(grant)
//!     .allowed_origin("http://api.internal") // the token goes nowhere else
//!     .build()?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut service = ServiceBuilder::new().layer(layer).service(client);
//!
//! let request = http::Request::get("http://api.internal/me").body(Full::default())?;
//! let response = service.ready().await?.call(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! The README's "With tonic (gRPC)" section shows the layer in front of a tonic
//! `Channel` (feature `tonic`) with the [`grpc::classifier`].
//!
//! ## Requests: absolute URIs, options, replay
//!
//! The token goes only to the allowed origins, so the layer needs to know a request's
//! origin: a request with a relative URI (`/path`) is sent without a token. hyper-util's
//! client always uses absolute URIs; build a tonic client `with_origin(service, uri)`.
//! The URI's scheme, host and port are compared as written (the domain in any case, the
//! scheme's default port implied): a host such as `0x7f.1` or `127.1`, which a URL
//! parser would read as `127.0.0.1`, is not the allowed `http://127.0.0.1` and gets no
//! token.
//!
//! Per-request options are markers in the request's extensions, as with every
//! tokenflight adapter: [`SkipAuth`] sends it without credentials and does not classify
//! the response; [`ForceRefresh`] refreshes before sending; with a keyed policy
//! ([`keyed`](tokenflight::AuthPolicyBuilder::keyed)) a
//! [`TokenKey`] chooses the request's token. Routes that never carry a
//! token are exempted once on the builder
//! ([`skip_route`](tokenflight::AuthPolicyBuilder::skip_route)).
//!
//! A rejected request is resent only if its body can be sent again (see [`ReplayBody`]):
//! `Full<Bytes>`, `String` and `Empty` bodies copy cheaply; boxed bodies (and tonic's)
//! are read ahead into memory when the whole body is there, up to
//! [`TokenLayer::replay_body_limit`]. A body still being produced (a client-streaming call),
//! or a larger one, is sent as it is: if the token is rejected, the caller gets the
//! response and the token is marked rejected, so the next request gets a new one ([C4](tokenflight#c4)).
//!
//! ## Redirects
//!
//! hyper-util's client and tonic do not follow redirects. Below the layer, tower-http's
//! `FollowRedirect` does, by itself: the layer sees only the first request, and every
//! hop keeps what that request carried. `FollowRedirect` puts the first request's headers
//! back on every hop, and its standard policy (`FollowRedirectLayer::new()`) drops
//! `Authorization` only on the hop that changes origin, so on A → B → B the second hop
//! carries A's token to B; a token in another header
//! (`Placement::header("x-api-key", None)`) goes along on every hop, a query token
//! wherever a `Location` repeats the query. So with the feature `tower-http`, **build
//! `FollowRedirect` with
//! [`TokenLayer::redirect_policy`](struct.TokenLayer.html#method.redirect_policy)**, whatever the placement:
//!
//! ```
//! # use tokenflight_tower::{TokenLayer, tokenflight::{Token, from_fn}};
//! # use http_body_util::Full;
//! # use bytes::Bytes;
//! # use hyper_util::client::legacy::Client;
//! # use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_http::follow_redirect::FollowRedirectLayer;
//! # let layer = TokenLayer::builder()
//! #     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
//! #     .allowed_origin("http://api.internal")
//! #     .build()
//! #     .unwrap();
//! # let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let service = ServiceBuilder::new()
//!     .layer(layer.clone())
//!     .layer(FollowRedirectLayer::with_policy(layer.redirect_policy()))
//!     .service(client);
//! # drop(service);
//! ```
//!
//! It does not follow a hop that would carry the token to an origin not allowed, or with
//! a keyed policy to a URL of another key: the caller gets the redirect response, and
//! following it is a new request through the layer, with that URL's own token (or none).
//! Every other hop is followed as the standard policy would. A response that
//! `FollowRedirect` fetched from another origin is not taken as a verdict on the token
//! (it never went there): it goes to the caller unclassified ([C4](tokenflight#c4)).
//!
//! ## Responses and errors
//!
//! Responses carry a [`BufferedBody`]: the inner service's body, with any bytes a body
//! classifier looked at put back in front. The service's error is
//! [`AuthError`]: `Token` holds the core's typed
//! [`tokenflight::Error`] when no token can be had, `Transport` holds the inner
//! service's error unchanged.
//!
//! ## Readiness
//!
//! `poll_ready` is the inner service's; `call` takes the instance it readied and leaves
//! a clone behind, as tower advises. A resend uses another clone, which it readies
//! (`poll_ready`) before calling.
//!
//! ## Cancellation
//!
//! Dropping a response future is safe at any point: a refresh it started goes on for
//! the other requests, and with the [`TokioSpawner`] that [`TokenLayer::builder`]
//! presets it completes and is stored even if every request was dropped
//! ([C6](tokenflight#c6)).
//!
//! ## Features
//!
//! - `oauth2` (default): the core's OAuth 2.0 token sources (`tokenflight::oauth2`).
//! - `file-store`: the core's `tokenflight::store::FileStore`.
//! - `tonic`: [`ReplayBody`] for `tonic::body::Body`, so the layer wraps a tonic `Channel`.
//! - `tower-http`: [`TokenLayer::redirect_policy`](struct.TokenLayer.html#method.redirect_policy), the `FollowRedirect` policy that keeps
//!   the token where it may go; responses that tower-http's `FollowRedirect` fetched from
//!   another origin are not taken as a verdict on the token.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod body;
pub mod grpc;
mod layer;
mod message;
#[cfg(feature = "tower-http")]
mod redirect;
mod transport;

pub use body::{BufferedBody, ReplayBody};
pub use layer::{DEFAULT_REPLAY_BODY_LIMIT, ResponseFuture, TokenLayer, TokenService};
#[cfg(feature = "tower-http")]
pub use redirect::RedirectPolicy;
pub use tokenflight::adapter::{TokioSpawner, TokioTimer};
pub use transport::HyperTransport;

pub use tokenflight;
pub use tokenflight::adapter::AuthError;
pub use tokenflight::{ForceRefresh, Placement, SkipAuth, TokenKey, ValidFor};
