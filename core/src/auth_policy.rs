//! The auth policy: a coordinator plus where the token goes, who may receive it, which
//! routes go without it and what counts as a rejection. Its `send` is the one retry
//! loop: attach token → send → classify → on rejection wait for the refresh that
//! supersedes the token this request used → resend exactly once ([C3](crate#c3), [C4](crate#c4)). Adapters call
//! [`AuthPolicy::send`] with their request type and a closure that sends it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

mod driver;

pub use driver::SendFuture;

use crate::error::{ConfigError, Error, RefreshError};
use crate::flight::SingleFlight;
use crate::keyed::{KeyedFlights, TokenKey, factory_failed};
use crate::policy::{Placement, Rules};
use crate::request::{AuthRequest, AuthResponse, RequestOptions};
use crate::stats::Stats;

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
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Err(tokenflight::RefreshError::permanent("no login yet")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// let flight = policy.flight().unwrap();
    /// futures::executor::block_on(flight.install(Token::new("from-login"))).unwrap();
    /// assert_eq!(flight.current().unwrap().access().expose(), "from-login");
    /// ```
    pub fn flight(&self) -> Option<&SingleFlight> {
        match &self.inner.flights {
            Flights::One(flight) => Some(flight),
            Flights::Keyed { .. } => None,
        }
    }

    /// A keyed policy's coordinators, one per [`TokenKey`] (to `install` a key's login
    /// token or read its `stats`); `None` for a policy with one token. See
    /// [`AuthPolicyBuilder::keyed`](crate::AuthPolicyBuilder::keyed).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, TokenKey, from_fn};
    /// # let source = || from_fn(|_cx| async { Ok(Token::new("t")) });
    /// let one = AuthPolicy::builder().source(source()).allow_any_origin().build().unwrap();
    /// assert!(one.keyed().is_none());
    /// let keyed = AuthPolicy::builder()
    ///     .allow_any_origin()
    ///     .keyed(move |_key: &TokenKey, shared| shared.source(source()).build())
    ///     .build()
    ///     .unwrap();
    /// let key = TokenKey::new("tenant-1");
    /// futures::executor::block_on(keyed.keyed().unwrap().token(&key)).unwrap();
    /// assert_eq!(keyed.keyed().unwrap().len(), 1);
    /// ```
    pub fn keyed(&self) -> Option<&KeyedFlights<TokenKey>> {
        match &self.inner.flights {
            Flights::One(_) => None,
            Flights::Keyed { flights, .. } => Some(flights),
        }
    }

    /// A snapshot of the counters (a keyed policy: the sum over the keys kept now).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allow_any_origin()
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(policy.flight().unwrap().token()).unwrap();
    /// assert_eq!(policy.stats().source_calls, 1);
    /// ```
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
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Placement, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allow_any_origin()
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(policy.placement(), &Placement::bearer());
    /// ```
    pub fn placement(&self) -> &Placement {
        &self.inner.rules.placement
    }

    /// Whether the token may go to `url`'s origin ([C12](crate#c12)). For adapters, e.g.
    /// a redirect policy.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// let url = |s: &str| url::Url::parse(s).unwrap();
    /// assert!(policy.allows_origin(&url("https://api.example.com/v1")));
    /// assert!(!policy.allows_origin(&url("http://api.example.com/v1")), "another scheme");
    /// assert!(!policy.allows_origin(&url("https://api.example.com:8443/")), "another port");
    /// ```
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

    /// Whether [`send`](Self::send) would put a token on `request` with `options`: not
    /// skipped by a marker or a route ([C11](crate#c11)), to an
    /// allowed origin ([C12](crate#c12)). For adapters that prepare such requests
    /// differently (buffering a body for a possible resend); `send` decides the same
    /// way by itself.
    ///
    /// The request is seen through [`AuthRequest`]: its
    /// [`origin`](AuthRequest::origin) is checked first, and its
    /// [`url`](AuthRequest::url) is read only for a skipped route, so an adapter whose
    /// request holds an `http::Uri` builds no URL for the answer.
    ///
    /// ```
    /// use tokenflight::adapter::{AuthRequest, InvalidHeader, RequestOptions};
    /// use tokenflight::{AuthPolicy, Token, from_fn};
    /// struct Get(url::Url);
    /// impl AuthRequest for Get {
    ///     fn method(&self) -> http::Method { http::Method::GET }
    ///     fn url(&self) -> &url::Url { &self.0 }
    ///     fn url_mut(&mut self) -> &mut url::Url { &mut self.0 }
    ///     fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> { Ok(()) }
    ///     fn try_clone(&self) -> Option<Self> { None }
    /// }
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .allowed_origin("https://api.example.com")
    ///     .skip_route(None, "/health")
    ///     .build()
    ///     .unwrap();
    /// let get = |s: &str| Get(url::Url::parse(s).unwrap());
    /// let plain = RequestOptions::default();
    /// assert!(policy.attaches_token(&get("https://api.example.com/items"), &plain));
    /// assert!(!policy.attaches_token(&get("https://api.example.com/health"), &plain));
    /// assert!(!policy.attaches_token(&get("https://other.example.com/items"), &plain));
    /// let skipped = RequestOptions::from_markers(true, false);
    /// assert!(!policy.attaches_token(&get("https://api.example.com/items"), &skipped));
    /// ```
    pub fn attaches_token<R: AuthRequest>(&self, request: &R, options: &RequestOptions) -> bool {
        self.inner.rules.admits(request, options)
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
    ///     fn header(&self, _: &http::HeaderName) -> Option<&str> { None }
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
        SendFuture::new(self.clone(), request, options, send)
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
    ///     fn header(&self, _: &http::HeaderName) -> Option<&str> { None }
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
