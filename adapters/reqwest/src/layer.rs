//! The reqwest-middleware `Middleware` that runs the core's retry driver.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tokenflight::adapter::{AuthError, RequestOptions, SentUrls, TokioSpawner, TokioTimer};
use tokenflight::{AuthPolicy, AuthPolicyBuilder, Placement};

use crate::message::{Incoming, Outgoing};

/// Keeps the access token of a `ClientWithMiddleware` valid: attaches it, refreshes it
/// once for everybody when it expires or is rejected, and resends a rejected request
/// exactly once.
///
/// Cheap to clone; clones share one token and one refresh.
///
/// # Errors
/// When no token can be had, the request fails with `reqwest_middleware::Error::Middleware`
/// wrapping a [`tokenflight::Error`] (downcast to inspect it); an invalid token value gives
/// a wrapped [`tokenflight::adapter::InvalidHeader`]. Errors of the client and of the middleware
/// further down pass through unchanged, except that with query placement the token never
/// shows in them: a `reqwest::Error` gets its URL's token value replaced by `redacted`,
/// and any other error whose text still shows the token is replaced by one with that
/// text, redacted ([C12](tokenflight#c12)).
#[derive(Clone, Debug)]
pub struct TokenMiddleware {
    auth: AuthPolicy,
}

impl TokenMiddleware {
    /// The core's [`AuthPolicyBuilder`] preset for tokio: [`TokioTimer`] for refresh
    /// timeouts, and a [`TokioSpawner`] that finds the runtime a refresh starts on, so
    /// a refresh completes and is stored even when every request waiting for it was
    /// cancelled ([C6](tokenflight#c6)). It may be called outside any runtime.
    pub fn builder() -> AuthPolicyBuilder<TokenMiddleware> {
        AuthPolicyBuilder::new()
            .timer(TokioTimer)
            .spawner(TokioSpawner::current())
    }

    /// A redirect policy for the client under this layer: like reqwest's default (up to
    /// 10 redirects), except that it does not follow a hop that would carry the token
    /// to an origin not allowed or, with a keyed policy, to a URL of another key
    /// ([`AuthPolicy::token_may_follow`]); the caller gets the redirect response
    /// instead, and following it is a new request, with that URL's own token. The
    /// token travels along:
    /// - in `Authorization`, on every hop that stays on the origin of the hop before
    ///   it (reqwest drops the header on the hop that changes origin, but puts the
    ///   caller's headers back on every hop, so A → B → B brings A's token to B);
    /// - in any other header, on every hop;
    /// - in the query ([`Placement::Query`]), in the `Referer` of the next hop (reqwest
    ///   sends the previous URL), and in the next URL when a `Location` repeats the
    ///   query. (A client built with `.referer(false)` sends no `Referer`, but a policy
    ///   cannot see that.)
    ///
    /// **Build the client with this policy** (or with redirects off).
    ///
    /// Only the token's own rule is checked: a request sent without a token
    /// ([`SkipAuth`](tokenflight::SkipAuth), a skipped route) is judged as if it carried
    /// one, since a redirect policy cannot see the request's markers.
    ///
    /// ```
    /// # use tokenflight_reqwest::{TokenMiddleware, reqwest, tokenflight::{Placement, Token, from_fn}};
    /// let layer = TokenMiddleware::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("key")) }))
    ///     .placement(Placement::header("x-api-key", None))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// let client = reqwest::Client::builder()
    ///     .redirect(layer.redirect_policy())
    ///     .build()
    ///     .unwrap();
    /// # drop(client);
    /// ```
    pub fn redirect_policy(&self) -> reqwest::redirect::Policy {
        crate::redirect::policy(&self.auth)
    }

    /// The auth policy behind this middleware: `stats()`, and `flight()` to install a
    /// token after a login or read the current one.
    pub fn policy(&self) -> &AuthPolicy {
        &self.auth
    }
}

impl From<AuthPolicy> for TokenMiddleware {
    fn from(auth: AuthPolicy) -> Self {
        TokenMiddleware { auth }
    }
}

// Written out, not with `#[async_trait]`: the macro moves every argument into a local of
// the boxed future, which then holds the request twice (and the whole future is
// copied into its box on every request). The signature is the one the macro gives the
// trait's method.
impl Middleware for TokenMiddleware {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<Box<dyn Future<Output = reqwest_middleware::Result<Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            // The timeout is the longest the server may still be reading the request or
            // writing its response: the token must stay valid that long (C20).
            let options = RequestOptions::from_extensions(&*extensions)
                .or_valid_for(request.timeout().copied());
            // The driver may send twice, one send after the other; each borrows the
            // extensions while it runs, so changes made further down the stack reach the
            // resend and, at the end, the caller. (If this future is dropped mid-send, the
            // caller is gone too and the extensions with it.)
            let slot = Mutex::new(std::mem::take(extensions));
            let placement = self.auth.placement();
            // The URLs that went out with a query token, to find it in errors (C12).
            let sent = SentUrls::new(placement);
            let result = self
                .auth
                .send(Outgoing(request), options, |Outgoing(request)| {
                    let next = next.clone();
                    let slot = &slot;
                    sent.record(request.url());
                    async move {
                        let mut extensions = std::mem::take(&mut *lock(slot));
                        let result = next.run(request, &mut extensions).await;
                        *lock(slot) = extensions;
                        result.map(Incoming)
                    }
                })
                .await;
            *extensions = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(Incoming(response)) => Ok(match placement.redacted(response.url()) {
                    // A token in the query would show in `url()`, in `Debug`, and in the
                    // errors of `error_for_status` and of reading the body (C12).
                    Some(url) => crate::message::with_url(response, url),
                    None => response,
                }),
                Err(error) => Err(redact(middleware_error(error), placement, &sent)),
            }
        })
    }
}

/// `error` without the query token that went out in `sent` ([C12](tokenflight#c12)). reqwest's own error
/// (the request's, or one that middleware further down wrapped as it is) keeps its
/// type with the token's value in its URL replaced. Any other error whose text
/// (`Display` of it and its causes, or `Debug`) still shows the token is replaced by
/// one that carries that text with the token redacted: it no longer downcasts to its
/// original type, which is the price of not leaking.
fn redact(
    mut error: reqwest_middleware::Error,
    placement: &Placement,
    sent: &SentUrls<'_>,
) -> reqwest_middleware::Error {
    let inner = match &mut error {
        reqwest_middleware::Error::Reqwest(inner) => Some(inner),
        reqwest_middleware::Error::Middleware(inner) => inner.downcast_mut::<reqwest::Error>(),
    };
    if let Some(url) = inner.and_then(|e| e.url_mut()) {
        if let Some(redacted) = placement.redacted(url) {
            *url = redacted;
        }
    }
    match sent.scrub_error(&error) {
        Some(text) => reqwest_middleware::Error::middleware(Redacted(text)),
        None => error,
    }
}

/// An error whose text showed the token, with the token redacted.
#[derive(Debug)]
struct Redacted(String);

impl std::fmt::Display for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

fn lock(slot: &Mutex<Extensions>) -> std::sync::MutexGuard<'_, Extensions> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Token errors become `Error::Middleware` holding the core's typed error, so callers
/// can `downcast_ref::<tokenflight::Error>()`; the client's own errors pass through.
fn middleware_error(error: AuthError<reqwest_middleware::Error>) -> reqwest_middleware::Error {
    match error {
        AuthError::Transport(error) => error,
        AuthError::Token(error) => reqwest_middleware::Error::middleware(error),
        AuthError::InvalidHeader(error) => reqwest_middleware::Error::middleware(error),
        other => reqwest_middleware::Error::middleware(other),
    }
}
