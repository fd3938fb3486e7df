//! [`TokenMiddleware`]: the surf middleware that runs the core's auth policy.

use std::future::Future;
use std::pin::Pin;

use futures_util::{FutureExt, TryFutureExt};
use surf::middleware::{Middleware, Next};
use surf::{Client, Request, Response, StatusCode};
use tokenflight::adapter::{AuthError, AuthRequest, Markers, RequestOptions, SentUrls};
use tokenflight::{AuthPolicy, AuthPolicyBuilder};

use crate::message::{Attempt, Reply};
use crate::runtime::{AsyncStdSpawner, AsyncStdTimer};

/// Request bodies up to this many bytes are buffered so a rejected request can be resent
/// (1 MiB). See [`TokenMiddleware::replay_body_limit`].
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 1024 * 1024;

/// surf middleware that keeps the access token valid: attaches it, and on a rejection
/// waits for the one refresh and resends the request once with the new token.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tokenflight::{Token, from_fn, Placement};
/// use tokenflight_surf::{FollowRedirects, TokenMiddleware};
///
/// let layer = TokenMiddleware::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
///     .allowed_origin("https://api.example.com")
///     .build()?;
/// // Redirects first (outside), the token layer second: every hop is checked
/// // against the allowed origins (see the crate docs).
/// let client = surf::client().with(FollowRedirects::default()).with(layer);
/// let _res = client.get("https://api.example.com/me").await?;
/// # Ok(()) }
/// ```
///
/// # Request bodies
/// Cloning a `surf::Request` drops its body, so the layer reads a body of known length
/// up to [`replay_body_limit`](Self::replay_body_limit) bytes into memory once and gives
/// every attempt a copy. Larger bodies, and streams of unknown length
/// (`Body::from_reader(r, None)`), are sent as they are but cannot be resent: when such
/// a request is rejected, the caller gets the rejection and the token is marked
/// rejected, so the next request refreshes ([C4](tokenflight#c4)).
///
/// # Markers
/// Put [`SkipAuth`](crate::SkipAuth) or [`ForceRefresh`](crate::ForceRefresh) in the request's extensions
/// (`req.set_ext(SkipAuth)`) to send without credentials or to refresh first
/// ([C11](tokenflight#c11)), as with every tokenflight adapter; exempt routes once with
/// [`skip_route`](tokenflight::AuthPolicyBuilder::skip_route) on the builder. A resent
/// request lacks the caller's extensions (surf's `clone` drops them). With a keyed
/// policy ([`keyed`](tokenflight::AuthPolicyBuilder::keyed)), a
/// [`TokenKey`](tokenflight::keyed::TokenKey) in the extensions chooses the token, and a
/// [`ValidFor`](tokenflight::ValidFor) says how long the token must stay valid.
///
/// # Errors
/// When no token can be had the request fails with a `surf::Error` whose status is
/// `401` for [`tokenflight::Error::ReauthenticationRequired`] and `503` for a failed or
/// backing-off refresh; the typed error is reachable with
/// `err.downcast_ref::<tokenflight::Error>()`. A token that cannot be a header value
/// gives `500` with [`tokenflight::adapter::InvalidHeader`] inside.
///
/// With query placement, an error of middleware after the layer whose text shows the
/// token (the request URL, say) is replaced by one with the same status and message,
/// the token's value written `redacted` ([C12](tokenflight#c12)).
///
/// # The header
/// The token is never logged by this crate, but http-types has no "sensitive" flag for
/// headers: middleware registered after this layer sees it in the request (and its
/// `Debug`). Register logging middleware before the layer.
#[derive(Clone, Debug)]
pub struct TokenMiddleware {
    auth: AuthPolicy,
    replay_body_limit: usize,
}

impl TokenMiddleware {
    /// The core's [`AuthPolicyBuilder`] preset with async-std's spawner and timer;
    /// `build()` returns a `TokenMiddleware`.
    pub fn builder() -> AuthPolicyBuilder<TokenMiddleware> {
        AuthPolicyBuilder::new()
            .spawner(AsyncStdSpawner)
            .timer(AsyncStdTimer)
    }

    /// A middleware around an auth policy built elsewhere.
    pub fn new(auth: AuthPolicy) -> Self {
        TokenMiddleware {
            auth,
            replay_body_limit: DEFAULT_REPLAY_BODY_LIMIT,
        }
    }

    /// The largest request body (bytes) kept in memory to resend a rejected request
    /// (default [`DEFAULT_REPLAY_BODY_LIMIT`]). `0` makes only empty bodies replayable.
    pub fn replay_body_limit(mut self, limit: usize) -> Self {
        self.replay_body_limit = limit;
        self
    }

    /// The auth policy behind the middleware (`stats()`, `flight().install(..)`).
    pub fn policy(&self) -> &AuthPolicy {
        &self.auth
    }
}

impl From<AuthPolicy> for TokenMiddleware {
    fn from(auth: AuthPolicy) -> Self {
        TokenMiddleware::new(auth)
    }
}

// Written out, not with `#[async_trait]`: the macro moves every argument into a local of
// the boxed future, which then holds the request twice (and the whole future is
// copied into its box on every request). The signature is the one the macro gives the
// trait's method.
impl Middleware for TokenMiddleware {
    fn handle<'life0, 'life1, 'async_trait>(
        &'life0 self,
        req: Request,
        client: Client,
        next: Next<'life1>,
    ) -> Pin<Box<dyn Future<Output = surf::Result<Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        // Everything up to the first send is done here, before the future exists: its
        // state then holds the request once (the boxed future is copied on every
        // request).
        let options = RequestOptions::from_extensions(&Ext(&req));
        // The policy would pass these through too; asking it first skips buffering.
        let attempt = Attempt::without_reading(req);
        if !self.auth.attaches_token(&attempt, &options) {
            return next.run(attempt.into_request(), client);
        }
        if attempt.is_unread() {
            Box::pin(async move {
                let attempt = attempt.read_body(self.replay_body_limit).await?;
                self.send(attempt, options, client, next).await
            })
        } else {
            Box::pin(self.send(attempt, options, client, next))
        }
    }
}

impl TokenMiddleware {
    /// Sends `attempt` through the core: the rest of the stack with a valid token, and
    /// once more if the token was rejected.
    fn send<'a>(
        &'a self,
        attempt: Attempt,
        options: RequestOptions,
        client: Client,
        next: Next<'a>,
    ) -> impl Future<Output = surf::Result<Response>> + Send + 'a {
        // The URLs that went out with a query token, to find it in errors (C12): only
        // query placement puts the token in a URL.
        let sent = SentUrls::new(self.auth.placement());
        let record = sent.clone();
        // No async block around the core's future: it would be built on the stack and
        // copied into the block's state on every request; `map` takes it as
        // it is.
        self.auth
            .send(attempt, options, move |attempt: Attempt| {
                record.record(attempt.url());
                // The rest of the stack's future as it is (boxed by surf), not wrapped
                // in an async block that would hold the request again.
                next.run(attempt.into_request(), client.clone())
                    .map_ok(Reply)
            })
            .map(move |result| {
                result
                    .map(|Reply(response)| response)
                    .map_err(|error| redact(to_surf_error(error), &sent))
            })
    }
}

/// A surf request's extensions, where the markers are.
struct Ext<'a>(&'a Request);

impl Markers for Ext<'_> {
    fn marker<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.0.ext::<T>().cloned()
    }
}

/// `error` without the query token that went out in `sent` ([C12](tokenflight#c12)): surf's own errors do
/// not print URLs, but middleware after the layer may. An error whose `Display` or
/// `Debug` shows the token is replaced by one with the same status and its message,
/// the token redacted; it no longer downcasts to its original type.
fn redact(error: surf::Error, sent: &SentUrls<'_>) -> surf::Error {
    match sent.scrub(&format!("{error} {error:?}"), &error.to_string()) {
        Some(text) => surf::Error::from_str(error.status(), text),
        None => error,
    }
}

/// A `surf::Error` with a status that says what happened and the typed error inside.
fn to_surf_error(error: AuthError<surf::Error>) -> surf::Error {
    match error {
        AuthError::Transport(e) => e,
        AuthError::Token(e) => {
            let status = match e {
                tokenflight::Error::ReauthenticationRequired { .. } => StatusCode::Unauthorized,
                _ => StatusCode::ServiceUnavailable,
            };
            surf::Error::new(status, e)
        }
        AuthError::InvalidHeader(e) => surf::Error::new(StatusCode::InternalServerError, e),
        _ => surf::Error::from_str(StatusCode::InternalServerError, "authentication failed"),
    }
}
