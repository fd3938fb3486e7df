//! The auth policy: a coordinator plus where the token goes, who may receive it, which
//! routes go without it and what counts as a rejection. Its `send` is the one retry
//! loop: attach token → send → classify → on rejection wait for the refresh that
//! supersedes the token this request used → resend exactly once ([C3](crate#c3), [C4](crate#c4)). Adapters call
//! [`AuthPolicy::send`] with their request type and a closure that sends it.

use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::Either;
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span};

use crate::error::{Error, RefreshError};
use crate::flight::SingleFlight;
use crate::keyed::{KeyedFlights, TokenKey, factory_failed};
use crate::observe::{RequestAuthorized, RequestResent};
use crate::policy::{
    AllowedOrigins, BodyPredicate, Classifier, HeaderCache, Placement, SentTo, SkipRoutes,
};
use crate::request::{AuthRequest, AuthResponse, InvalidHeader, RequestOptions};
use crate::stats::Stats;
use crate::token::Token;

/// Why [`AuthPolicy::send`] failed: the error of every adapter's authenticated send
/// (tower's service error; reqwest and surf wrap it in their own).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError<E> {
    /// No token could be had (the refresh failed, backoff, or re-authentication needed).
    #[error(transparent)]
    Token(#[from] Error),
    /// The access token cannot be put in a header (the source returned bad characters).
    #[error(transparent)]
    InvalidHeader(#[from] InvalidHeader),
    /// The client failed to send the request.
    #[error("sending the request failed")]
    Transport(#[source] E),
}

/// The auth policy: a [`SingleFlight`] (the coordinator) plus where the token goes, who
/// may receive it, which routes go without it and what counts as a rejection. The
/// adapters' middleware and layers wrap one; cheap to clone (clones share the token).
///
/// Build one with [`AuthPolicy::builder`] (or an adapter's `builder()`, which returns
/// the same [`AuthPolicyBuilder`](crate::AuthPolicyBuilder) with its runtime preset).
///
/// ```
/// use tokenflight::{AuthPolicy, Token, from_fn};
/// let policy = AuthPolicy::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("secret")) }))
///     .allowed_origin("https://api.example.com")
///     .skip_route(Some(http::Method::POST), "/oauth/login")
///     .build()
///     .unwrap();
/// let token = futures::executor::block_on(policy.flight().unwrap().token()).unwrap();
/// assert_eq!(token.access().expose(), "secret");
/// ```
#[derive(Clone)]
pub struct AuthPolicy {
    /// One reference count for a clone (tower clones the policy into each request's
    /// future: three counts were ≈0.25 µs per request in situ, issue 18).
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    flights: Flights,
    rules: Rules,
    /// The token's header value, built once per token and shared by all clones.
    header: HeaderCache,
}

/// The coordinator(s): one, or one per [`TokenKey`].
#[derive(Clone)]
pub(crate) enum Flights {
    One(SingleFlight),
    Keyed {
        flights: KeyedFlights<TokenKey>,
        /// The key of a request without a [`TokenKey`] marker.
        key_of: Arc<KeyFn>,
    },
}

/// A keyed policy's key function.
pub(crate) type KeyFn = dyn Fn(&http::Method, &url::Url) -> TokenKey + Send + Sync;

/// The default key function: one token per origin.
pub(crate) fn default_key(_method: &http::Method, url: &url::Url) -> TokenKey {
    TokenKey::origin(url)
}

/// What the policy decides besides the token itself.
pub(crate) struct Rules {
    pub(crate) placement: Placement,
    pub(crate) origins: AllowedOrigins,
    pub(crate) classifier: Classifier,
    pub(crate) skip: SkipRoutes,
}

impl fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("AuthPolicy");
        match &self.inner.flights {
            Flights::One(flight) => f.field("flight", flight),
            Flights::Keyed { flights, .. } => f.field("keyed", flights),
        };
        f.field("placement", &self.inner.rules.placement)
            .field("origins", &self.inner.rules.origins)
            .field("skip", &self.inner.rules.skip)
            .field("classifier", &self.inner.rules.classifier)
            .finish()
    }
}

impl AuthPolicy {
    pub(crate) fn new(flights: Flights, rules: Rules) -> Self {
        AuthPolicy {
            inner: Arc::new(PolicyInner {
                header: HeaderCache::new(&rules.placement),
                flights,
                rules,
            }),
        }
    }

    /// A builder with the documented defaults (see
    /// [`FlightConfig`](crate::config::FlightConfig)).
    pub fn builder() -> crate::AuthPolicyBuilder {
        crate::AuthPolicyBuilder::new()
    }

    /// The coordinator behind this policy (for `install`, `current`, `token`); `None`
    /// for a keyed policy, whose coordinators are in [`keyed`](Self::keyed).
    pub fn flight(&self) -> Option<&SingleFlight> {
        match &self.inner.flights {
            Flights::One(flight) => Some(flight),
            Flights::Keyed { .. } => None,
        }
    }

    /// A keyed policy's coordinators, one per [`TokenKey`] (to `install` a key's login
    /// token or read its `stats`); `None` for a policy with one token. See
    /// [`AuthPolicyBuilder::keyed`](crate::AuthPolicyBuilder::keyed).
    pub fn keyed(&self) -> Option<&KeyedFlights<TokenKey>> {
        match &self.inner.flights {
            Flights::One(_) => None,
            Flights::Keyed { flights, .. } => Some(flights),
        }
    }

    /// A snapshot of the counters (a keyed policy: the sum over the keys kept now).
    pub fn stats(&self) -> Stats {
        match &self.inner.flights {
            Flights::One(flight) => flight.stats(),
            Flights::Keyed { flights, .. } => flights.stats(),
        }
    }

    /// The coordinator of a request: the policy's one, or its key's (the request's
    /// [`TokenKey`] marker, else the key function's). A key on a policy with one token
    /// is refused, not ignored: the request asked for a token this policy does not have.
    fn flight_for<Req: AuthRequest>(
        &self,
        request: &Req,
        key: Option<&TokenKey>,
    ) -> Result<MaybeOwned<'_>, Error> {
        match &self.inner.flights {
            Flights::One(_) if key.is_some() => Err(Error::Refresh(RefreshError::permanent(
                "the request carries a TokenKey but the policy is not keyed",
            ))),
            Flights::One(flight) => Ok(MaybeOwned::Borrowed(flight)),
            Flights::Keyed { flights, key_of } => {
                let flight = match key {
                    Some(key) => flights.flight(key),
                    None => flights.flight(&key_of(&request.method(), request.url())),
                };
                flight.map(MaybeOwned::Owned).map_err(factory_failed)
            }
        }
    }

    /// Where the token goes.
    pub fn placement(&self) -> &Placement {
        &self.inner.rules.placement
    }

    /// Whether the token may go to `url`'s origin ([C12](crate#c12)). For adapters, e.g.
    /// a redirect policy.
    pub fn allows_origin(&self, url: &url::Url) -> bool {
        self.inner.rules.origins.allows(url)
    }

    /// Whether a token put on a request to `from` may go along to `to` when the HTTP
    /// client follows a redirect by itself, below the policy (reqwest does), keeping
    /// what the first request carried: only if `to`'s origin is allowed
    /// ([C12](crate#c12)) and, for a keyed policy, `to` is of the same key as `from`
    /// by the policy's key function, so that a token of one key never goes with a
    /// request of another ([C22](crate#c22)). For adapters' redirect hooks; a client
    /// that sends every hop through the policy needs none (the policy decides each
    /// hop's token itself).
    ///
    /// A client's redirect hook does not see the request's
    /// [`TokenKey`](crate::keyed::TokenKey) marker: a marked request is judged by the
    /// key function too, which can only stop a hop that needed no stopping.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn, keyed::TokenKey};
    /// let policy = AuthPolicy::builder()
    ///     .allowed_origin("https://a.example")
    ///     .allowed_origin("https://b.example")
    ///     .keyed(|_key: &TokenKey, shared| {
    ///         shared.source(from_fn(|_cx| async { Ok(Token::new("t")) })).build()
    ///     })
    ///     .build()
    ///     .unwrap();
    /// let url = |s: &str| url::Url::parse(s).unwrap();
    /// let get = http::Method::GET;
    /// // One key per origin (the default key function).
    /// assert!(policy.token_may_follow(&get, &url("https://a.example/x"), &url("https://a.example/y")));
    /// assert!(!policy.token_may_follow(&get, &url("https://a.example/x"), &url("https://b.example/y")));
    /// assert!(!policy.token_may_follow(&get, &url("https://a.example/x"), &url("https://evil.example/")));
    /// ```
    pub fn token_may_follow(&self, method: &http::Method, from: &url::Url, to: &url::Url) -> bool {
        if !self.inner.rules.origins.allows(to) {
            return false;
        }
        match &self.inner.flights {
            Flights::One(_) => true,
            Flights::Keyed { key_of, .. } => key_of(method, from) == key_of(method, to),
        }
    }

    /// Whether [`send`](Self::send) would put a token on a request with `method` to
    /// `url` and `options`: not skipped by a marker or a route ([C11](crate#c11)), to an
    /// allowed origin ([C12](crate#c12)). For adapters that prepare such requests
    /// differently (buffering a body for a possible resend); `send` decides the same
    /// way by itself.
    pub fn attaches_token(
        &self,
        method: &http::Method,
        url: &url::Url,
        options: &RequestOptions,
    ) -> bool {
        !options.skip_auth
            && self.inner.rules.origins.allows(url)
            && !self.inner.rules.skip.skips(method, url)
    }

    /// [`attaches_token`](Self::attaches_token) for a request already seen through
    /// [`AuthRequest`]: the same answer, reading its full URL only when a skipped route
    /// needs the path ([`AuthRequest::origin_url`] for the origin).
    pub fn attaches_token_to<R: AuthRequest>(&self, request: &R, options: &RequestOptions) -> bool {
        !options.skip_auth
            && self.inner.rules.origins.allows(request.origin_url())
            && !self.inner.rules.skip.skips_request(request)
    }

    /// Sends `request` with a valid token through `send`, and resends it once with a
    /// newer token if the response says the token was rejected.
    ///
    /// - Requests with `skip_auth`, on a skipped route, or to origins not allowed, are
    ///   sent as they are and not classified ([C11](crate#c11), [C12](crate#c12)).
    /// - A rejected request whose body cannot be replayed is not resent; the caller
    ///   gets the original response and the token is marked rejected ([C4](crate#c4)).
    /// - A second rejection is returned to the caller as it is: no loop ([C4](crate#c4)).
    /// - Each request that carries a token runs in an `info` span `tokenflight.request`
    ///   with the fields `generation` (of the token sent), `waited` (whether the request
    ///   waited for a token: false is a fast-path hit), `resent` and `resent_with` (the
    ///   generation of the resend). The refresh a request waited for is the
    ///   `tokenflight.refresh` span whose `generation` is the one the request carries.
    ///   No field carries a token or a secret ([C12](crate#c12)).
    /// - A response from another origin than the one the request (and its token) was
    ///   sent to — the client followed a redirect — is returned as it is, unclassified:
    ///   its 401 is not about the token, which never went there ([C4](crate#c4),
    ///   [C12](crate#c12)). So is one
    ///   from a URL without the token's query parameter, with query placement (a
    ///   same-origin redirect whose `Location` does not repeat the token).
    ///
    /// This is the adapters' entry point; applications use an adapter's middleware.
    ///
    /// ```
    /// # use tokenflight::{AuthPolicy, Token, from_fn};
    /// # use tokenflight::adapter::{AuthRequest, AuthResponse, InvalidHeader, RequestOptions, ResponseView};
    /// // A toy client: a request is a URL and one header; the server accepts "Bearer ok".
    /// struct Req(url::Url, Option<String>);
    /// struct Resp(u16);
    /// impl AuthRequest for Req {
    ///     fn method(&self) -> http::Method { http::Method::GET }
    ///     fn url(&self) -> &url::Url { &self.0 }
    ///     fn url_mut(&mut self) -> &mut url::Url { &mut self.0 }
    ///     fn set_sensitive_header(&mut self, _: &str, value: &str) -> Result<(), InvalidHeader> {
    ///         self.1 = Some(value.to_owned());
    ///         Ok(())
    ///     }
    ///     fn try_clone(&self) -> Option<Self> { Some(Req(self.0.clone(), self.1.clone())) }
    /// }
    /// impl ResponseView for Resp {
    ///     fn status(&self) -> u16 { self.0 }
    ///     fn header(&self, _: &str) -> Option<&str> { None }
    /// }
    /// impl AuthResponse for Resp {}
    ///
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("ok")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// let request = Req("https://api.example.com/me".parse().unwrap(), None);
    /// let response = futures::executor::block_on(policy.send(
    ///     request,
    ///     RequestOptions::default(),
    ///     |req: Req| async move {
    ///         Ok::<_, std::convert::Infallible>(Resp(if req.1.as_deref() == Some("Bearer ok") { 200 } else { 401 }))
    ///     },
    /// ));
    /// assert_eq!(response.unwrap().0, 200);
    /// ```
    ///
    /// # Cancellation
    /// Dropping the future at any await point is safe: a refresh it started goes on for
    /// the other waiters (and, with a spawner, to completion) ([C6](crate#c6)); a
    /// request already handed to `send` is dropped with it.
    pub fn send<Req, Resp, E, F, Fut>(
        &self,
        request: Req,
        options: RequestOptions,
        send: F,
    ) -> impl Future<Output = Result<Resp, AuthError<E>>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        send_via(self, request, options, send)
    }

    /// [`send`](Self::send) on a policy the future owns (a clone: cheap), for a future
    /// that must not borrow it, such as one a `tower::Service` returns. Made without an
    /// `async` wrapper around `send`, which would hold the request twice.
    ///
    /// # Cancellation
    /// As for [`send`](Self::send).
    pub fn send_owned<Req, Resp, E, F, Fut>(
        self,
        request: Req,
        options: RequestOptions,
        send: F,
    ) -> impl Future<Output = Result<Resp, AuthError<E>>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        send_via(self, request, options, send)
    }

    /// Tells the span and the observers about a token taken on the fast path (as
    /// `authorize` does after a wait).
    fn authorized_at_once(&self, flight: &SingleFlight, span: &Span, generation: u64) {
        if !flight.observers().is_empty() || !span.is_disabled() {
            self.authorized(flight, span, generation, false);
        }
    }

    /// After a rejection: the token that supersedes the rejected one, then the one
    /// resend ([C3](crate#c3), [C4](crate#c4)).
    async fn resend_after_rejection<Req, Resp, E, F, Fut>(
        &self,
        flight: &SingleFlight,
        mut replay: Req,
        rejected: u64,
        span: Span,
        mut send: F,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let (newer, kind) = flight
            .token_after_rejection_kind(rejected)
            .instrument(span.clone())
            .await?;
        span.record("resent", true);
        span.record("resent_with", newer.generation());
        self.resend(flight, &mut replay, &newer)?;
        flight.observers().emit(|o| {
            o.request_resent(&RequestResent {
                kind,
                rejected,
                with: newer.generation(),
            })
        });
        traced(send(replay), &span)
            .await
            .map_err(AuthError::Transport)
    }

    async fn authorize(
        &self,
        flight: &SingleFlight,
        force_refresh: bool,
        span: &Span,
    ) -> Result<Arc<Token>, Error> {
        let fetch = async {
            if force_refresh {
                flight.force_refresh().await
            } else {
                flight.token().await
            }
        };
        let observed = !flight.observers().is_empty();
        if !observed && span.is_disabled() {
            return fetch.await;
        }
        let before = flight.current().map(|t| t.generation());
        let mut fetch = pin!(fetch);
        let mut pended = false;
        let token = std::future::poll_fn(|cx| {
            let poll = fetch.as_mut().poll(cx);
            pended |= poll.is_pending();
            poll
        })
        .await?;
        let generation = token.generation();
        let waited = force_refresh || pended || before != Some(generation);
        self.authorized(flight, span, generation, waited);
        Ok(token)
    }

    /// Records the token a request goes out with on its span and tells the observers.
    fn authorized(&self, flight: &SingleFlight, span: &Span, generation: u64, waited: bool) {
        span.record("generation", generation);
        span.record("waited", waited);
        if !flight.observers().is_empty() {
            flight
                .observers()
                .emit(|o| o.request_authorized(&RequestAuthorized { generation, waited }));
        }
    }

    fn resend<Req: AuthRequest>(
        &self,
        flight: &SingleFlight,
        replay: &mut Req,
        token: &Arc<Token>,
    ) -> Result<(), InvalidHeader> {
        flight.count_retry();
        tracing::debug!(
            generation = token.generation(),
            "resending once with a newer token"
        );
        self.inner
            .rules
            .placement
            .attach_cached(&self.inner.header, replay, token)
    }

    /// Classifies `response`; returns it intact with the verdict (`true`: the token was
    /// rejected). The body is read only when the classifier's body rule applies to the
    /// response (see [which bodies](Classifier#which-bodies-the-body-rule-reads)). For
    /// adapters that classify outside [`send`](Self::send); `send` calls it itself.
    ///
    /// ```
    /// # use tokenflight::{AuthPolicy, Token, from_fn};
    /// # use tokenflight::adapter::{AuthResponse, ResponseView};
    /// struct Resp(u16);
    /// impl ResponseView for Resp {
    ///     fn status(&self) -> u16 { self.0 }
    ///     fn header(&self, _: &str) -> Option<&str> { None }
    /// }
    /// impl AuthResponse for Resp {}
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allow_any_origin()
    ///     .build()
    ///     .unwrap();
    /// let (_, rejected) = futures::executor::block_on(policy.classify(Resp(401)));
    /// assert!(rejected);
    /// ```
    ///
    /// # Cancellation
    /// Dropping the future drops the response (and a body being read).
    pub async fn classify<Resp: AuthResponse>(&self, response: Resp) -> (Resp, bool) {
        match self.classify_head(response) {
            Ok(verdict) => verdict,
            Err((response, limit, predicate)) => classify_body(response, limit, predicate).await,
        }
    }

    /// The verdict from the status and headers, or (`Err`) the response back with the
    /// body rule when it must read the body.
    #[allow(clippy::type_complexity)]
    fn classify_head<Resp: AuthResponse>(
        &self,
        response: Resp,
    ) -> Result<(Resp, bool), (Resp, usize, &BodyPredicate)> {
        let classifier = &self.inner.rules.classifier;
        if classifier.head_rejects(&response) {
            return Ok((response, true));
        }
        match classifier.body_rule_for(&response) {
            None => Ok((response, false)),
            Some((limit, predicate)) => Err((response, limit, predicate)),
        }
    }
}

/// [`AuthPolicy::send`] and [`AuthPolicy::send_owned`]: a hand-written future for the
/// common road (a token at once, one send, a response that rejects nothing), the rare
/// roads in one boxed `async fn` ([`slow_road`]). An `async` block kept each argument in
/// its state for its whole life, so the request was held three times (the argument, the
/// replay copy, inside the send future), and its state machine, entered twice per
/// request, was the largest code the middleware ran (issue 18).
fn send_via<P, Req, Resp, E, F, Fut>(
    policy: P,
    request: Req,
    options: RequestOptions,
    send: F,
) -> impl Future<Output = Result<Resp, AuthError<E>>>
where
    P: Borrow<AuthPolicy>,
    Req: AuthRequest,
    Resp: AuthResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    SendFuture {
        policy: Some(policy),
        send: Some(send),
        make_slow: slow_road::<P, Req, Resp, E, F, Fut>,
        step: Step::Start { request, options },
    }
}

pin_project_lite::pin_project! {
    /// See [`send_via`]. `Slow` is the type of [`slow_road`]'s future, named through
    /// `make_slow` (the function itself), so it is boxed without `dyn` (which would
    /// need `Send` decided here).
    struct SendFuture<P, Req, F, Fut, Make, Slow> {
        // Both handed to the slow road when it is taken.
        policy: Option<P>,
        send: Option<F>,
        make_slow: Make,
        #[pin]
        step: Step<Req, Fut, Slow>,
    }
}

pin_project_lite::pin_project! {
    #[project = StepProj]
    #[project_replace = StepOwned]
    enum Step<Req, Fut, Slow> {
        // Not yet polled: nothing is decided before the first poll.
        Start { request: Req, options: RequestOptions },
        // The request is out. `sent: None`: it goes without a token (skipped, or to an
        // origin not allowed), and its response is not classified.
        Sending {
            #[pin]
            future: Either<Fut, Instrumented<Fut>>,
            sent: Option<Sent<Req>>,
        },
        // A rare road: waiting for a token, reading a body, resending.
        Slow { future: Pin<Box<Slow>> },
        Done,
    }
}

/// What a request that went out with a token needs when its response comes.
struct Sent<Req> {
    replay: Option<Req>,
    generation: u64,
    span: Span,
    sent_to: SentTo,
    /// The request's key's coordinator; `None`: the policy's one.
    keyed: Option<SingleFlight>,
}

/// A request that will carry a token but has none yet (no token at once, or a forced
/// refresh), with what the first poll found out about it.
struct Unsent<Req> {
    request: Req,
    force_refresh: bool,
    span: Span,
    sent_to: SentTo,
    /// As in [`Sent`].
    keyed: Option<SingleFlight>,
}

/// Where a request leaves [`SendFuture`]'s common road.
enum Road<Req, Resp> {
    /// Before the first send: waiting for a token.
    Start(Unsent<Req>),
    /// A response the head alone does not clear (a rejection, or a body to read).
    Classify { response: Resp, sent: Sent<Req> },
}

/// What the first poll decided.
enum Begin<Req, Fut> {
    Send(Either<Fut, Instrumented<Fut>>, Option<Sent<Req>>),
    Slow(Unsent<Req>),
}

impl<P, Req, Resp, E, F, Fut, Make, Slow> Future for SendFuture<P, Req, F, Fut, Make, Slow>
where
    P: Borrow<AuthPolicy>,
    Req: AuthRequest,
    Resp: AuthResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
    Make: Fn(P, F, Road<Req, Resp>) -> Slow,
    Slow: Future<Output = Result<Resp, AuthError<E>>>,
{
    type Output = Result<Resp, AuthError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let road = match this.step.as_mut().project() {
                StepProj::Start { .. } => {
                    let StepOwned::Start { request, options } =
                        this.step.as_mut().project_replace(Step::Done)
                    else {
                        unreachable!("the step was Start")
                    };
                    let (Some(policy), Some(send)) = (this.policy.as_ref(), this.send.as_mut())
                    else {
                        unreachable!("the policy and send leave only with the slow road")
                    };
                    match begin(policy.borrow(), request, options, send) {
                        Ok(Begin::Send(future, sent)) => {
                            this.step.set(Step::Sending { future, sent });
                            continue;
                        }
                        Ok(Begin::Slow(unsent)) => Road::Start(unsent),
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                }
                StepProj::Sending { future, .. } => {
                    let result = ready!(future.poll(cx));
                    let StepOwned::Sending { sent, .. } =
                        this.step.as_mut().project_replace(Step::Done)
                    else {
                        unreachable!("the step was Sending")
                    };
                    let response = match result {
                        Ok(response) => response,
                        Err(error) => return Poll::Ready(Err(AuthError::Transport(error))),
                    };
                    let Some(sent) = sent else {
                        return Poll::Ready(Ok(response));
                    };
                    let Some(policy) = this.policy.as_ref() else {
                        unreachable!("the policy leaves only with the slow road")
                    };
                    match policy.borrow().verdict(response, sent) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err((response, sent)) => Road::Classify { response, sent },
                    }
                }
                StepProj::Slow { future } => {
                    let output = ready!(future.as_mut().poll(cx));
                    this.step.set(Step::Done);
                    return Poll::Ready(output);
                }
                StepProj::Done => panic!("tokenflight's send future polled after it completed"),
            };
            let (Some(policy), Some(send)) = (this.policy.take(), this.send.take()) else {
                unreachable!("the slow road is taken once")
            };
            let future = Box::pin((this.make_slow)(policy, send, road));
            this.step.set(Step::Slow { future });
        }
    }
}

/// The first poll: the request sent at once (without a token, or with the current one),
/// or the slow road. Errors: the token cannot be a header value.
fn begin<Req, Resp, E, F, Fut>(
    policy: &AuthPolicy,
    mut request: Req,
    options: RequestOptions,
    send: &mut F,
) -> Result<Begin<Req, Fut>, AuthError<E>>
where
    Req: AuthRequest,
    Resp: AuthResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let rules = &policy.inner.rules;
    if options.skip_auth || rules.skip.skips_request(&request) {
        return Ok(Begin::Send(Either::Left(send(request)), None));
    }
    // Also where the response must come from to be a verdict on the token.
    let Some(sent_to) = rules.origins.admit(request.origin_url()) else {
        return Ok(Begin::Send(Either::Left(send(request)), None));
    };
    let span = request_span();
    let flight = policy.flight_for(&request, options.key.as_ref())?;
    if options.force_refresh {
        let keyed = flight.into_keyed();
        return Ok(Begin::Slow(Unsent {
            request,
            force_refresh: true,
            span,
            sent_to,
            keyed,
        }));
    }
    let replay = policy.replay_copy(&request);
    // The token is lent, not cloned: after attaching it the request needs only its
    // generation.
    let attached = flight.get().with_ready_token(|token| {
        rules
            .placement
            .attach_cached(&policy.inner.header, &mut request, token)
            .map(|()| token.generation())
    });
    let Some(attached) = attached else {
        // No token at once. The copy is made again after the wait (rare).
        let keyed = flight.into_keyed();
        return Ok(Begin::Slow(Unsent {
            request,
            force_refresh: false,
            span,
            sent_to,
            keyed,
        }));
    };
    let generation = attached?;
    policy.authorized_at_once(flight.get(), &span, generation);
    let future = traced(send(request), &span);
    let sent = Sent {
        replay,
        generation,
        span,
        sent_to,
        keyed: flight.into_keyed(),
    };
    Ok(Begin::Send(future, Some(sent)))
}

impl AuthPolicy {
    /// A copy to resend, only if a response can reject the token at all. Taken before
    /// the token is attached: the copy gets the newer token if it is ever sent.
    fn replay_copy<Req: AuthRequest>(&self, request: &Req) -> Option<Req> {
        if self.inner.rules.classifier.can_reject() {
            request.try_clone()
        } else {
            None
        }
    }

    /// The verdict on a response to a request that carried a token, from its head:
    /// `Ok` to return it as it is, `Err` (the response back) to classify it on the
    /// slow road (a rejection, or a body to read).
    #[allow(clippy::type_complexity)]
    fn verdict<Req, Resp: AuthResponse>(
        &self,
        response: Resp,
        sent: Sent<Req>,
    ) -> Result<Resp, (Resp, Sent<Req>)> {
        let rules = &self.inner.rules;
        if response.final_url().is_some_and(|url| {
            !sent.sent_to.is_origin_of(&rules.origins, url) || !rules.placement.may_carry_token(url)
        }) {
            tracing::debug!("the response comes from where the token did not go; not classified");
            return Ok(response);
        }
        if rules.classifier.head_rejects(&response)
            || rules.classifier.body_rule_for(&response).is_some()
        {
            return Err((response, sent));
        }
        // Not even a call when nobody looks (issue 18: recording on a span without
        // metadata still ran tracing's record path, cold, on every request).
        if !sent.span.is_none() {
            sent.span.record("resent", false);
        }
        Ok(response)
    }

    /// The slow road from the start: the token (waiting for it), the send, then
    /// [`finish`](Self::finish).
    async fn send_slowly<Req, Resp, E, F, Fut>(
        &self,
        flight: &SingleFlight,
        unsent: Unsent<Req>,
        mut send: F,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let Unsent {
            mut request,
            force_refresh,
            span,
            sent_to,
            keyed,
        } = unsent;
        let token = self
            .authorize(flight, force_refresh, &span)
            .instrument(span.clone())
            .await?;
        let replay = self.replay_copy(&request);
        self.inner
            .rules
            .placement
            .attach_cached(&self.inner.header, &mut request, &token)?;
        let generation = token.generation();
        drop(token);
        let response = traced(send(request), &span)
            .await
            .map_err(AuthError::Transport)?;
        let sent = Sent {
            replay,
            generation,
            span,
            sent_to,
            keyed,
        };
        match self.verdict(response, sent) {
            Ok(response) => Ok(response),
            Err((response, sent)) => self.finish(flight, response, sent, send).await,
        }
    }

    /// A response the head did not clear: classified (reading the body if the rule
    /// says so); if rejected, the one resend ([C3](crate#c3), [C4](crate#c4)).
    async fn finish<Req, Resp, E, F, Fut>(
        &self,
        flight: &SingleFlight,
        response: Resp,
        sent: Sent<Req>,
        send: F,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let Sent {
            replay,
            generation,
            span,
            ..
        } = sent;
        let (response, rejected) = self.classify(response).await;
        if !rejected {
            if !span.is_none() {
                span.record("resent", false);
            }
            return Ok(response);
        }
        let Some(replay) = replay else {
            span.record("resent", false);
            tracing::debug!(
                generation,
                "token rejected; the body cannot be replayed, returning the response"
            );
            flight.mark_rejected(generation);
            return Ok(response);
        };
        drop(response);
        self.resend_after_rejection(flight, replay, generation, span, send)
            .await
    }
}

/// Every rare road of [`send_via`], as one `async fn` (its future is boxed there).
async fn slow_road<P, Req, Resp, E, F, Fut>(
    policy: P,
    send: F,
    road: Road<Req, Resp>,
) -> Result<Resp, AuthError<E>>
where
    P: Borrow<AuthPolicy>,
    Req: AuthRequest,
    Resp: AuthResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let policy: &AuthPolicy = policy.borrow();
    let keyed = match &road {
        Road::Start(unsent) => &unsent.keyed,
        Road::Classify { sent, .. } => &sent.keyed,
    };
    // The request's coordinator, as the first poll found it (a clone: the slow road is
    // rare).
    let Some(flight) = keyed.as_ref().or(policy.flight()).cloned() else {
        unreachable!("a keyed policy gives each request its key's coordinator")
    };
    match road {
        Road::Start(unsent) => policy.send_slowly(&flight, unsent, send).await,
        Road::Classify { response, sent } => policy.finish(&flight, response, sent, send).await,
    }
}

/// The span of one request that carries a token; a span without metadata when nobody
/// looks (no subscriber wants it), whose enter, exit and record do nothing. A disabled
/// span still has its metadata, and with tracing's `log` feature (which axum, tower and
/// others switch on) every poll through `instrument` asks the `log` crate whether to
/// print it: about 10 % of the middleware's own CPU per request in a profile (issue 18).
/// When no subscriber takes `info` at all, not even the disabled span is made (its
/// making and dropping were cold code on every request end to end).
fn request_span() -> Span {
    if tracing::Level::INFO > tracing::level_filters::LevelFilter::current() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "tokenflight.request",
        generation = Empty,
        waited = Empty,
        resent = Empty,
        resent_with = Empty,
    );
    if span.is_disabled() {
        Span::none()
    } else {
        span
    }
}

/// The body rule's verdict, reading at most `limit` bytes of the body.
async fn classify_body<Resp: AuthResponse>(
    response: Resp,
    limit: usize,
    predicate: &BodyPredicate,
) -> (Resp, bool) {
    let (response, body) = response.buffer_body(limit).await;
    let rejected = body.is_some_and(|bytes| predicate(&bytes));
    (response, rejected)
}

/// `future` inside `span`, or as it is when nobody looks at the span (no wrapper to
/// poll through). Not an `async fn`: that would hold `future` twice in its state.
fn traced<F: Future>(future: F, span: &Span) -> Either<F, Instrumented<F>> {
    if span.is_none() {
        Either::Left(future)
    } else {
        Either::Right(future.instrument(span.clone()))
    }
}

/// The coordinator of one request: borrowed from a policy with one token (no reference
/// count touched on the fast path), owned for a key (the map hands out a handle).
enum MaybeOwned<'a> {
    Borrowed(&'a SingleFlight),
    Owned(SingleFlight),
}

impl MaybeOwned<'_> {
    fn get(&self) -> &SingleFlight {
        match self {
            MaybeOwned::Borrowed(flight) => flight,
            MaybeOwned::Owned(flight) => flight,
        }
    }

    /// A key's coordinator, to keep; `None` for the policy's own (found again there).
    fn into_keyed(self) -> Option<SingleFlight> {
        match self {
            MaybeOwned::Borrowed(_) => None,
            MaybeOwned::Owned(flight) => Some(flight),
        }
    }
}
