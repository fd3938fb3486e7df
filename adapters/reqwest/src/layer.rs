//! The reqwest-middleware `Middleware` that runs the core's retry driver.

use std::sync::{Arc, Mutex, PoisonError};

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tokenflight::{AuthError, Authenticator, Builder, RequestOptions};
#[cfg(test)]
use tokenflight::{ForceRefresh, SkipAuth};

use crate::message::{Incoming, Outgoing};
use crate::runtime::{TokioSpawner, TokioTimer};

/// Keeps the access token of a `ClientWithMiddleware` valid: attaches it, refreshes it
/// once for everybody when it expires or is rejected, and resends a rejected request
/// exactly once.
///
/// Cheap to clone; clones share one token and one refresh.
///
/// # Errors
/// When no token can be had, the request fails with `reqwest_middleware::Error::Middleware`
/// wrapping a [`tokenflight::Error`] (downcast to inspect it); an invalid token value gives
/// a wrapped [`tokenflight::InvalidHeader`]. Errors of the client and of the middleware
/// further down pass through unchanged.
#[derive(Clone, Debug)]
pub struct TokenLayer {
    auth: Authenticator,
}

impl TokenLayer {
    /// A builder preset for tokio: [`TokioTimer`] for refresh timeouts, and a
    /// [`TokioSpawner`] on the current runtime (if called inside one) so a refresh
    /// completes and is stored even when every request waiting for it was cancelled (C6).
    /// Without a runtime the refresh is driven by the requests waiting for it; call
    /// `.spawner(Arc::new(TokioSpawner::new(handle)))` to name one.
    pub fn builder() -> Builder<TokenLayer> {
        let builder = Builder::for_output().timer(Arc::new(TokioTimer));
        match TokioSpawner::try_current() {
            Some(spawner) => builder.spawner(Arc::new(spawner)),
            None => builder,
        }
    }

    /// A redirect policy for the client under this layer: like reqwest's default (up to
    /// 10 redirects), except that it does not follow a redirect from an allowed origin
    /// to another when the token travels in a header other than `Authorization`, which
    /// reqwest would carry along (the caller gets the redirect response instead). With
    /// the default `Authorization` placement reqwest already drops the header when a
    /// redirect leaves the origin, and this policy changes nothing.
    ///
    /// ```
    /// # use tokenflight_reqwest::{TokenLayer, reqwest, tokenflight::{Token, from_fn}};
    /// let layer = TokenLayer::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("key")) }))
    ///     .header("x-api-key", None)
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

    /// The auth layer behind this middleware: `stats()`, and `flight()` to install a
    /// token after a login or read the current one.
    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }
}

impl From<Authenticator> for TokenLayer {
    fn from(auth: Authenticator) -> Self {
        TokenLayer { auth }
    }
}

#[async_trait::async_trait]
impl Middleware for TokenLayer {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let options = request_options(extensions);
        // The driver may send twice, one send after the other; each borrows the
        // extensions while it runs, so changes made further down the stack reach the
        // resend and, at the end, the caller. (If this future is dropped mid-send, the
        // caller is gone too and the extensions with it.)
        let slot = Mutex::new(std::mem::take(extensions));
        let result = self
            .auth
            .send(Outgoing(request), options, |Outgoing(request)| {
                let next = next.clone();
                let slot = &slot;
                async move {
                    let mut extensions = std::mem::take(&mut *lock(slot));
                    let result = next.run(request, &mut extensions).await;
                    *lock(slot) = extensions;
                    result.map(Incoming)
                }
            })
            .await;
        *extensions = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
        result
            .map(|Incoming(response)| response)
            .map_err(middleware_error)
    }
}

fn lock(slot: &Mutex<Extensions>) -> std::sync::MutexGuard<'_, Extensions> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The options for one request: see [`RequestOptions::from_extensions`] (a client-wide
/// `RequestOptions` from reqwest-middleware's initialiser is replaced by the request's own,
/// since the initialisers run before the request adds its extensions).
fn request_options(extensions: &Extensions) -> RequestOptions {
    RequestOptions::from_extensions(extensions)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_switch_options_on() {
        let mut extensions = Extensions::new();
        assert_eq!(request_options(&extensions), RequestOptions::default());
        extensions.insert(SkipAuth);
        assert_eq!(
            request_options(&extensions),
            RequestOptions::from_markers(true, false)
        );
        extensions.insert(ForceRefresh);
        assert_eq!(
            request_options(&extensions),
            RequestOptions::from_markers(true, true)
        );
    }

    #[test]
    fn a_later_options_value_replaces_an_earlier_one() {
        let mut extensions = Extensions::new();
        extensions.insert(RequestOptions::from_markers(true, false));
        extensions.insert(RequestOptions::from_markers(false, true));
        assert_eq!(
            request_options(&extensions),
            RequestOptions::from_markers(false, true)
        );
    }

    #[test]
    fn the_builder_presets_a_spawner_inside_a_runtime_only() {
        let outside = format!("{:?}", TokenLayer::builder());
        assert!(outside.contains("spawner: false"), "{outside}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let inside = runtime.block_on(async { format!("{:?}", TokenLayer::builder()) });
        assert!(inside.contains("spawner: true"), "{inside}");
    }
}
