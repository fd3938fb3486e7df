//! The tower `Layer` and `Service` that run the core's retry driver around any HTTP
//! service.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryFutureExt;
use futures_util::future::Either;
use http_body::Body;
use tokenflight::adapter::{AuthError, RequestOptions, TokioSpawner, TokioTimer};
use tokenflight::{AuthPolicy, AuthPolicyBuilder};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BufferedBody, ReplayBody};
use crate::message::{Incoming, Outgoing, UNPARSED};

/// Keeps the access token of the services it wraps valid: attaches it, refreshes it
/// once for everybody when it expires or is rejected, and resends a rejected request
/// exactly once when its body can be replayed (see [`ReplayBody`]).
///
/// Cheap to clone; clones, and every [`TokenService`] made from them, share one token
/// and one refresh.
///
/// With tower-http's `FollowRedirect` below it, build that with the layer's
/// `redirect_policy()` (feature `tower-http`), never with `FollowRedirectLayer::new()`:
/// the standard policy lets hops carry the token to origins it may not go to (see
/// [Redirects](crate#redirects)).
#[derive(Clone, Debug)]
pub struct TokenLayer {
    auth: AuthPolicy,
    replay_limit: usize,
}

/// Request bodies up to this many bytes are kept in memory so a rejected request can be
/// resent (1 MiB, as in the surf adapter). See [`TokenLayer::replay_body_limit`].
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 1024 * 1024;

impl TokenLayer {
    /// The core's [`AuthPolicyBuilder`] preset for tokio: [`TokioTimer`] for refresh
    /// timeouts, and a [`TokioSpawner`] that finds the runtime a refresh starts on, so
    /// a refresh completes and is stored even when every request waiting for it was
    /// cancelled ([C6](tokenflight#c6)). It may be called outside any runtime.
    pub fn builder() -> AuthPolicyBuilder<TokenLayer> {
        AuthPolicyBuilder::new()
            .timer(TokioTimer)
            .spawner(TokioSpawner::current())
    }

    /// How many bytes of a request body the layer keeps in memory to resend it (default
    /// [`DEFAULT_REPLAY_BODY_LIMIT`]). Only bodies of a type that
    /// holds a buffered body (boxed bodies, tonic's) are read ahead; a body larger than
    /// this is sent as it is and not replayed ([C4](tokenflight#c4)). `0` replays only bodies that copy
    /// cheaply (`Full<Bytes>`, `String`, `Empty`) and empty ones.
    pub fn replay_body_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }

    /// The auth policy behind this layer: `stats()`, and `flight()` to install a token
    /// after a login or read the current one.
    pub fn policy(&self) -> &AuthPolicy {
        &self.auth
    }

    /// A redirect policy for tower-http's `FollowRedirect` under this layer (feature
    /// `tower-http`): tower-http's standard policy, except that it does not follow a
    /// hop that would carry the token to an origin not allowed or, with a keyed
    /// policy, to a URL of another key ([`AuthPolicy::token_may_follow`]); the caller
    /// gets the redirect response instead, and following it is a new request through
    /// the layer, with that URL's own token. `FollowRedirect` puts the first request's
    /// headers back on every hop, so the token travels along:
    /// - in `Authorization`, on every hop that stays on the origin of the hop before
    ///   it (the standard policy drops the header only on the hop that changes origin,
    ///   so A → B → B brings A's token to B);
    /// - in any other header, on every hop;
    /// - in the query ([`Placement::Query`](tokenflight::Placement::Query)), when a
    ///   `Location` repeats the query.
    ///
    /// **Build `FollowRedirect` with this policy**
    /// (`FollowRedirectLayer::with_policy(layer.redirect_policy())`), never with
    /// `FollowRedirectLayer::new()`, whatever the placement. See [`RedirectPolicy`](crate::RedirectPolicy).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tokenflight_tower::TokenLayer;
    /// use tokenflight_tower::tokenflight::{Placement, Token, from_fn};
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    /// use tower_http::follow_redirect::FollowRedirectLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = TokenLayer::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("key")) }))
    ///     .placement(Placement::header("x-api-key", None))
    ///     .allowed_origin("http://api.example")
    ///     .build()
    ///     .unwrap();
    /// // hyper-util's client in real code; here a server that sends everyone elsewhere.
    /// let client = service_fn(|request: http::Request<Full<Bytes>>| async move {
    ///     assert_eq!(request.uri().host(), Some("api.example"), "a hop left the origin");
    ///     http::Response::builder()
    ///         .status(302)
    ///         .header("location", "http://elsewhere.example/")
    ///         .body(Full::<Bytes>::default())
    /// });
    /// let service = ServiceBuilder::new()
    ///     .layer(layer.clone())
    ///     .layer(FollowRedirectLayer::with_policy(layer.redirect_policy()))
    ///     .service(client);
    ///
    /// let request = http::Request::get("http://api.example/files").body(Full::default()).unwrap();
    /// let response = service.oneshot(request).await.unwrap();
    /// // Not followed: the key would have gone along to elsewhere.example.
    /// assert_eq!(response.status(), 302);
    /// # }
    /// ```
    #[cfg(feature = "tower-http")]
    pub fn redirect_policy(&self) -> crate::RedirectPolicy {
        crate::RedirectPolicy::new(self.auth.clone())
    }
}

impl From<AuthPolicy> for TokenLayer {
    fn from(auth: AuthPolicy) -> Self {
        TokenLayer {
            auth,
            replay_limit: DEFAULT_REPLAY_BODY_LIMIT,
        }
    }
}

impl<S> Layer<S> for TokenLayer {
    type Service = TokenService<S>;

    fn layer(&self, inner: S) -> TokenService<S> {
        TokenService {
            inner,
            auth: self.auth.clone(),
            replay_limit: self.replay_limit,
        }
    }
}

/// The service made by [`TokenLayer`]: sends requests through `S` with a valid token.
///
/// # Errors
/// [`AuthError::Token`] when no token can be had (the core's typed
/// [`tokenflight::Error`]), [`AuthError::InvalidHeader`] when the token cannot be a
/// header value, and [`AuthError::Transport`] holding the inner service's error
/// unchanged.
#[derive(Clone, Debug)]
pub struct TokenService<S> {
    inner: S,
    auth: AuthPolicy,
    replay_limit: usize,
}

impl<S> TokenService<S> {
    /// The auth policy: `stats()`, `flight()`.
    pub fn policy(&self) -> &AuthPolicy {
        &self.auth
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, RB> Service<http::Request<B>> for TokenService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: ReplayBody,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Send,
{
    type Response = http::Response<BufferedBody<RB>>;
    type Error = AuthError<S::Error>;
    type Future = ResponseFuture<RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(AuthError::Transport)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The instance `poll_ready` readied goes with this request; `self` keeps a clone,
        // which its next `poll_ready` readies (tower's advice for services that move the
        // inner service into their future).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        // Everything up to the first send is done here, before the future exists: its
        // state then holds neither the request twice nor the reading of its body (the
        // boxed future is copied on every request).
        let options = RequestOptions::from_extensions(request.extensions())
            .or_valid_for(grpc_timeout(request.headers()));
        // Only a request that will carry the token may need a resend, and only then is its
        // body read ahead. A relative URI (`/path`) names no origin, so it gets no token
        // (C12): tonic's generated clients send such URIs unless made `with_origin`.
        let Some(unparsed) = UNPARSED.as_ref() else {
            // Cannot be (a constant URL); were it, no request would carry a token.
            let response = ready.call(request).map_ok(Incoming::new);
            return ResponseFuture {
                inner: Box::pin(response.map_err(AuthError::Transport)),
                #[cfg(feature = "tower-http")]
                redact: None,
            };
        };
        let outgoing = Outgoing::new(request, unparsed);
        let may_resend = self.auth.attaches_token(&outgoing, &options);
        let outgoing = outgoing.keep_replayable(may_resend.then_some(self.replay_limit));
        // Sends through the instance `poll_ready` readied, then (the resend, at most
        // one) through a clone, readied before it is called. The resend is boxed: the
        // first send's future is then only the inner one (a clone of a hyper-util client
        // and a request held inline made each request's future larger, and it is copied
        // on every request).
        let mut first = true;
        let send = move |outgoing: Outgoing<B>| {
            let request = outgoing.into_request();
            if std::mem::replace(&mut first, false) {
                Either::Left(ready.call(request).map_ok(Incoming::new))
            } else {
                let mut service = ready.clone();
                Either::Right(Box::pin(async move {
                    poll_fn(|cx| service.poll_ready(cx)).await?;
                    service.call(request).await.map(Incoming::new)
                }) as Resend<RB, S::Error>)
            }
        };
        // Boxed as it is: a `map` around it would be one more copy of it per request.
        let future = self.auth.send(outgoing, options, send);
        ResponseFuture {
            inner: Box::pin(future),
            // Only a query token can show in the response (in `RequestUri`); a header
            // placement pays nothing for this.
            #[cfg(feature = "tower-http")]
            redact: matches!(self.auth.placement(), tokenflight::Placement::Query { .. })
                .then(|| self.auth.clone()),
        }
    }
}

/// The resend after a rejection, through a clone of the inner service.
type Resend<RB, E> = Pin<Box<dyn Future<Output = Result<Incoming<RB>, E>> + Send>>;

/// What a [`TokenService`] call resolves to.
type Output<RB, E> = Result<http::Response<BufferedBody<RB>>, AuthError<E>>;

/// The boxed future inside a [`ResponseFuture`].
type Inner<RB, E> = Pin<Box<dyn Future<Output = Result<Incoming<RB>, AuthError<E>>> + Send>>;

/// The future of [`TokenService::call`].
pub struct ResponseFuture<RB: Body, E> {
    inner: Inner<RB, E>,
    /// With query placement, the policy whose placement says which parameter to hide
    /// in the URI that tower-http's `FollowRedirect` puts on the response ([C12](tokenflight#c12)).
    #[cfg(feature = "tower-http")]
    redact: Option<AuthPolicy>,
}

impl<RB: Body, E> fmt::Debug for ResponseFuture<RB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<RB: Body, E> Future for ResponseFuture<RB, E> {
    type Output = Output<RB, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.inner.as_mut().poll(cx).map(|result| {
            result.map(|incoming| {
                #[cfg_attr(not(feature = "tower-http"), allow(unused_mut))]
                let mut response = incoming.response;
                #[cfg(feature = "tower-http")]
                if let Some(policy) = &this.redact {
                    crate::message::redact_request_uri(&mut response, policy.placement());
                }
                response
            })
        })
    }
}

/// A gRPC call's deadline from its `grpc-timeout` header: how long its token must stay
/// valid ([C20](tokenflight#c20)), so a server stream is admitted with a token that
/// outlives it. The format is the gRPC spec's: at most 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`); anything else is no deadline.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..split)?, value.get(split..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod grpc_timeout_tests {
    use std::time::Duration;

    use super::grpc_timeout;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_str(value).ok()?);
        grpc_timeout(&headers)
    }

    #[test]
    fn c20_grpc_timeout_is_the_validity_a_call_asks_for() {
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S", "é"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
