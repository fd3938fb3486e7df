//! The auth policy: a coordinator plus where the token goes, who may receive it, which
//! routes go without it and what counts as a rejection. Its `send` is the one retry
//! loop: attach token → send → classify → on rejection wait for the refresh that
//! supersedes the token this request used → resend exactly once ([C3](crate#c3), [C4](crate#c4)). Adapters call
//! [`AuthPolicy::send`] with their request type and a closure that sends it.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::{BoxFuture, Either};
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span};

use crate::error::{ConfigError, Error, RefreshError};
use crate::flight::SingleFlight;
use crate::keyed::{KeyedFlights, TokenKey, factory_failed};
use crate::observe::{RequestAuthorized, RequestResent};
use crate::policy::{Head, Placement, Rules, SentTo};
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

impl<E> AuthError<E> {
    /// True when no token comes until a new login is installed ([C9](crate#c9)): the
    /// caller should sign the user in again.
    ///
    /// ```
    /// use tokenflight::adapter::AuthError;
    /// use tokenflight::{Error, RefreshError};
    /// let error: AuthError<std::io::Error> =
    ///     Error::ReauthenticationRequired { cause: RefreshError::permanent("invalid_grant") }.into();
    /// assert!(error.is_reauthentication_required() && !error.is_misconfigured());
    /// ```
    pub fn is_reauthentication_required(&self) -> bool {
        matches!(self, AuthError::Token(error) if error.is_reauthentication_required())
    }

    /// True when the policy's configuration does not fit the request (see
    /// [`Error::is_misconfigured`]).
    ///
    /// ```
    /// use tokenflight::adapter::AuthError;
    /// let error: AuthError<std::io::Error> = AuthError::Transport(std::io::Error::other("reset"));
    /// assert!(!error.is_misconfigured());
    /// ```
    pub fn is_misconfigured(&self) -> bool {
        matches!(self, AuthError::Token(error) if error.is_misconfigured())
    }
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
    /// One reference count for a clone: each request's future holds a clone.
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    flights: Flights,
    rules: Rules,
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

impl fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("AuthPolicy");
        match &self.inner.flights {
            Flights::One(flight) => f.field("flight", flight),
            Flights::Keyed { flights, .. } => f.field("keyed", flights),
        };
        f.field("rules", &self.inner.rules).finish()
    }
}

impl AuthPolicy {
    pub(crate) fn new(flights: Flights, rules: Rules) -> Self {
        AuthPolicy {
            inner: Arc::new(PolicyInner { flights, rules }),
        }
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
    ) -> Result<SingleFlight, Error> {
        match &self.inner.flights {
            Flights::One(_) if key.is_some() => Err(Error::Refresh(RefreshError::misconfigured(
                ConfigError::InvalidSetting(
                    "the request carries a TokenKey but the policy is not keyed".into(),
                ),
            ))),
            Flights::One(flight) => Ok(flight.clone()),
            Flights::Keyed { flights, key_of } => match key {
                Some(key) => flights.flight(key),
                None => flights.flight(&key_of(&request.method(), request.url())),
            }
            .map_err(factory_failed),
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
    /// client follows a redirect by itself, below the policy (reqwest and tower-http's
    /// `FollowRedirect` do), keeping
    /// what the first request carried: only if `to`'s origin is allowed
    /// ([C12](crate#c12)) and, for a keyed policy, `to` is of the same key as `from`
    /// by the policy's key function, so that a token of one key never goes with a
    /// request of another ([C22](crate#c22)). For adapters' redirect hooks, on the hops
    /// that carry the token at all ([`Placement::travels_on_redirect`]); a client
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
        self.inner.rules.attaches(method, url, options)
    }

    /// [`attaches_token`](Self::attaches_token) for a request already seen through
    /// [`AuthRequest`]: the same answer, reading its full URL only when a skipped route
    /// needs the path ([`AuthRequest::origin_url`] for the origin).
    pub fn attaches_token_to<R: AuthRequest>(&self, request: &R, options: &RequestOptions) -> bool {
        self.inner.rules.admit(request, options).is_some()
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
    /// The future owns a clone of the policy (it borrows nothing of `self`), so a
    /// `tower::Service` can return it. It is `Send`: so must the client's send be.
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
    pub fn send<'a, Req, Resp, E, F, Fut>(
        &self,
        request: Req,
        options: RequestOptions,
        send: F,
    ) -> SendFuture<'a, Req, Resp, E, F, Fut>
    where
        Req: AuthRequest + 'a,
        Resp: AuthResponse + 'a,
        E: Send + 'a,
        F: FnMut(Req) -> Fut + Send + 'a,
        Fut: Future<Output = Result<Resp, E>> + Send + 'a,
    {
        let start = Start {
            policy: self.clone(),
            request,
            options,
            send,
        };
        SendFuture {
            state: State::Idle { start: Some(start) },
        }
    }

    /// Classifies `response`; returns it intact with the verdict (`true`: the token was
    /// rejected). The body is read only when the classifier's body rule applies to the
    /// response (see [which bodies](crate::Classifier#which-bodies-the-body-rule-reads)).
    /// For adapters that classify outside [`send`](Self::send); `send` asks the same
    /// rules itself.
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
        let head = self.inner.rules.head(&response, None);
        Rules::classify(response, head).await
    }
}

pin_project_lite::pin_project! {
    /// The future of [`AuthPolicy::send`]. Its common road — a token at once, one send,
    /// a response whose head clears the token — is polled here without an allocation;
    /// every other road (waiting for a token, reading a body, the resend) is one
    /// boxed `async fn`. Polled again after it completed, it stays pending (as
    /// `futures::future::Fuse` does).
    #[must_use = "futures do nothing unless polled"]
    pub struct SendFuture<'a, Req, Resp, E, F, Fut> {
        #[pin]
        state: State<'a, Req, Resp, E, F, Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<'a, Req, Resp, E, F, Fut> {
        // `Some`: not yet polled (nothing is decided before the first poll); `None`:
        // completed. The request waits here, in the place its send future takes.
        Idle { start: Option<Start<Req, F>> },
        // The request is out. `sent: None`: it went without a token (skipped, or to an
        // origin not allowed), and its response is not classified.
        Sending {
            #[pin]
            future: Either<Fut, Instrumented<Fut>>,
            sent: Option<Sent<Req, F>>,
        },
        Slow { future: BoxFuture<'a, Result<Resp, AuthError<E>>> },
    }
}

impl<Req, Resp, E, F, Fut> fmt::Debug for SendFuture<'_, Req, Resp, E, F, Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Idle { start: Some(_) } => "not polled",
            State::Idle { start: None } => "done",
            State::Sending { .. } => "sending",
            State::Slow { .. } => "waiting, classifying or resending",
        };
        f.debug_struct("SendFuture").field("state", &state).finish()
    }
}

/// A request before the first poll.
struct Start<Req, F> {
    policy: AuthPolicy,
    request: Req,
    options: RequestOptions,
    send: F,
}

/// What a request that carries a token keeps until its response is judged.
struct Attempt<F> {
    policy: AuthPolicy,
    /// The request's coordinator: the policy's one, or its key's.
    flight: SingleFlight,
    send: F,
    span: Span,
    /// Where the response must come from to be a verdict on the token.
    sent_to: SentTo,
}

/// A request that went out with a token.
struct Sent<Req, F> {
    attempt: Attempt<F>,
    replay: Option<Req>,
    generation: u64,
}

/// Where a request leaves the common road.
enum Road<Req, Resp> {
    /// Before its first send: waiting for a token (or a forced refresh).
    Wait { request: Req, force_refresh: bool },
    /// A response whose head did not clear the token.
    Judge {
        response: Resp,
        head: Head,
        replay: Option<Req>,
        generation: u64,
    },
}

impl<'a, Req, Resp, E, F, Fut> Future for SendFuture<'a, Req, Resp, E, F, Fut>
where
    Req: AuthRequest + 'a,
    Resp: AuthResponse + 'a,
    E: Send + 'a,
    F: FnMut(Req) -> Fut + Send + 'a,
    Fut: Future<Output = Result<Resp, E>> + Send + 'a,
{
    type Output = Result<Resp, AuthError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Idle { start } => {
                    let Some(start) = start.take() else {
                        return Poll::Pending;
                    };
                    match start.begin() {
                        Ok(state) => this.state.set(state),
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Sending { future, sent } => {
                    let result = ready!(future.poll(cx));
                    let sent = sent.take();
                    this.state.set(State::Idle { start: None });
                    let response = match result {
                        Ok(response) => response,
                        Err(error) => return Poll::Ready(Err(AuthError::Transport(error))),
                    };
                    let Some(sent) = sent else {
                        return Poll::Ready(Ok(response));
                    };
                    let Sent {
                        attempt,
                        replay,
                        generation,
                    } = sent;
                    let head = attempt
                        .policy
                        .inner
                        .rules
                        .head(&response, Some(&attempt.sent_to));
                    if let Head::Clears = head {
                        attempt.cleared();
                        return Poll::Ready(Ok(response));
                    }
                    let road = Road::Judge {
                        response,
                        head,
                        replay,
                        generation,
                    };
                    let future = Box::pin(attempt.slow_road(road));
                    this.state.set(State::Slow { future });
                }
                StateProj::Slow { future } => {
                    let output = ready!(future.as_mut().poll(cx));
                    this.state.set(State::Idle { start: None });
                    return Poll::Ready(output);
                }
            }
        }
    }
}

impl<'a, Req, F> Start<Req, F> {
    /// The first poll: the request sent at once (without a token, or with the current
    /// one), or the slow road. Errors: no coordinator for the request (misuse), or the
    /// token cannot be a header value.
    fn begin<Resp, E, Fut>(self) -> Result<State<'a, Req, Resp, E, F, Fut>, AuthError<E>>
    where
        Req: AuthRequest + 'a,
        Resp: AuthResponse + 'a,
        E: Send + 'a,
        F: FnMut(Req) -> Fut + Send + 'a,
        Fut: Future<Output = Result<Resp, E>> + Send + 'a,
    {
        let Start {
            policy,
            mut request,
            options,
            mut send,
        } = self;
        let Some(sent_to) = policy.inner.rules.admit(&request, &options) else {
            let future = Either::Left(send(request));
            return Ok(State::Sending { future, sent: None });
        };
        let flight = policy.flight_for(&request, options.key.as_ref())?;
        let replay = match options.force_refresh {
            true => None,
            false => policy.inner.rules.replay_copy(&request),
        };
        // The token is lent, not cloned: after attaching it the request needs only its
        // generation.
        let attached = match options.force_refresh {
            true => None,
            false => flight.with_ready_token(|token| {
                let attached = policy.inner.rules.attach(&mut request, token);
                attached.map(|()| token.generation())
            }),
        };
        let mut attempt = Attempt {
            policy,
            flight,
            send,
            span: request_span(),
            sent_to,
        };
        let Some(attached) = attached else {
            // No token at once (or a forced refresh). The copy is made again after the
            // wait, with the token's place still empty.
            let road = Road::Wait {
                request,
                force_refresh: options.force_refresh,
            };
            let future = Box::pin(attempt.slow_road(road));
            return Ok(State::Slow { future });
        };
        let generation = attached?;
        attempt.authorized_at_once(generation);
        let future = traced((attempt.send)(request), &attempt.span);
        let sent = Sent {
            attempt,
            replay,
            generation,
        };
        Ok(State::Sending {
            future,
            sent: Some(sent),
        })
    }
}

impl<F> Attempt<F> {
    /// Every road but the common one: the token (waiting for it), the send, the
    /// verdict (reading the body if the rule says so), and after a rejection the
    /// token that supersedes the rejected one and the one resend ([C3](crate#c3),
    /// [C4](crate#c4)).
    async fn slow_road<Req, Resp, E, Fut>(
        mut self,
        road: Road<Req, Resp>,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let (response, head, replay, generation) = match road {
            Road::Judge {
                response,
                head,
                replay,
                generation,
            } => (response, head, replay, generation),
            Road::Wait {
                mut request,
                force_refresh,
            } => {
                let token = authorize(&self.flight, &self.span, force_refresh).await?;
                let rules = &self.policy.inner.rules;
                let replay = rules.replay_copy(&request);
                rules.attach(&mut request, &token)?;
                let generation = token.generation();
                drop(token);
                let response = traced((self.send)(request), &self.span)
                    .await
                    .map_err(AuthError::Transport)?;
                let head = self.policy.inner.rules.head(&response, Some(&self.sent_to));
                (response, head, replay, generation)
            }
        };
        let (response, rejected) = Rules::classify(response, head).await;
        if !rejected {
            self.cleared();
            return Ok(response);
        }
        let Some(replay) = replay else {
            self.span.record("resent", false);
            tracing::debug!(
                generation,
                "token rejected; the body cannot be replayed, returning the response"
            );
            self.flight.mark_rejected(generation);
            return Ok(response);
        };
        drop(response);
        self.resend(replay, generation).await
    }

    /// After a rejection of `rejected`: the token that supersedes it, then the resend.
    async fn resend<Req, Resp, E, Fut>(
        mut self,
        mut replay: Req,
        rejected: u64,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let (newer, kind) = self
            .flight
            .token_after_rejection_kind(rejected)
            .instrument(self.span.clone())
            .await?;
        let with = newer.generation();
        self.span.record("resent", true);
        self.span.record("resent_with", with);
        self.flight.count_retry();
        tracing::debug!(generation = with, "resending once with a newer token");
        self.policy.inner.rules.attach(&mut replay, &newer)?;
        drop(newer);
        self.flight.observers().emit(|o| {
            o.request_resent(&RequestResent {
                kind,
                rejected,
                with,
            })
        });
        traced((self.send)(replay), &self.span)
            .await
            .map_err(AuthError::Transport)
    }

    /// Tells the span and the observers about a token taken on the common road.
    fn authorized_at_once(&self, generation: u64) {
        if !self.flight.observers().is_empty() || !self.span.is_disabled() {
            authorized(&self.flight, &self.span, generation, false);
        }
    }

    /// The response stands: no resend. Not even a call into the span when nobody looks
    /// (recording on a span without metadata still runs tracing's record path).
    fn cleared(&self) {
        if !self.span.is_none() {
            self.span.record("resent", false);
        }
    }
}

/// The token for a request that had none at once, telling the span whether it waited.
/// Borrows only the coordinator and the span (not the client's `send`, which need not
/// be `Sync`).
async fn authorize(
    flight: &SingleFlight,
    span: &Span,
    force_refresh: bool,
) -> Result<Arc<Token>, Error> {
    let fetch = async {
        if force_refresh {
            flight.force_refresh().await
        } else {
            flight.token().await
        }
    };
    let fetch = fetch.instrument(span.clone());
    if flight.observers().is_empty() && span.is_disabled() {
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
    authorized(flight, span, generation, waited);
    Ok(token)
}

/// Records the token a request goes out with on its span and tells the observers.
fn authorized(flight: &SingleFlight, span: &Span, generation: u64, waited: bool) {
    span.record("generation", generation);
    span.record("waited", waited);
    if !flight.observers().is_empty() {
        flight
            .observers()
            .emit(|o| o.request_authorized(&RequestAuthorized { generation, waited }));
    }
}

/// The span of one request that carries a token; a span without metadata when nobody
/// looks (no subscriber wants it), whose enter, exit and record do nothing. A disabled
/// span still has its metadata, and with tracing's `log` feature (which axum, tower and
/// others switch on) every poll through `instrument` asks the `log` crate whether to
/// print it. When no subscriber takes `info` at all, not even the disabled span is made.
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

/// `future` inside `span`, or as it is when nobody looks at the span (no wrapper to
/// poll through). Not an `async fn`: that would hold `future` twice in its state.
fn traced<F: Future>(future: F, span: &Span) -> Either<F, Instrumented<F>> {
    if span.is_none() {
        Either::Left(future)
    } else {
        Either::Right(future.instrument(span.clone()))
    }
}
