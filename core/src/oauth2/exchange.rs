//! Token exchange (RFC 8693): a subject token — a workload identity, another service's
//! token — traded at a security token service for a token for some audience.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures_util::future::BoxFuture;

#[cfg(feature = "private-key-jwt")]
use super::SigningKey;
use super::{ClientAuth, Endpoint};
use crate::error::{ConfigError, Error, RefreshError};
use crate::file_source::FileTokenSource;
use crate::flight::SingleFlight;
use crate::source::{RefreshContext, TokenSource};
use crate::token::{Secret, Token};
use crate::transport::Transport;

/// `grant_type` of token exchange (RFC 8693 §2.1).
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

pub mod token_type {
    //! Token type identifiers (RFC 8693 §3), for `subject_token_type`,
    //! `actor_token_type` and `requested_token_type`.

    /// An OAuth 2.0 access token.
    pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
    /// An OAuth 2.0 refresh token.
    pub const REFRESH_TOKEN: &str = "urn:ietf:params:oauth:token-type:refresh_token";
    /// An OpenID Connect ID token.
    pub const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
    /// A JWT (a Kubernetes service-account token, a cloud workload identity token).
    pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
    /// A base64url-encoded SAML 2.0 assertion.
    pub const SAML2: &str = "urn:ietf:params:oauth:token-type:saml2";
}

/// Where a token exchange gets its subject (or actor) token: the current token of
/// another coordinator (a [`SingleFlight`], which refreshes it single-flight), a
/// [`FileTokenSource`] read directly, or a closure ([`subject_from_fn`]).
///
/// `rejected` is the token the previous attempt presented when the server refused it
/// (`invalid_grant`): a coordinator then refreshes past it instead of handing it out
/// again. Object-safe.
pub trait SubjectToken: Send + Sync {
    /// The token to present now.
    fn subject_token(
        &self,
        rejected: Option<Arc<Token>>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>>;
}

impl<T: SubjectToken + ?Sized> SubjectToken for Arc<T> {
    fn subject_token(
        &self,
        rejected: Option<Arc<Token>>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>> {
        (**self).subject_token(rejected, now)
    }
}

/// The subject is the coordinator's token: one read of the source per lifetime of the
/// subject, however many exchanges (and keys) share it.
impl SubjectToken for SingleFlight {
    fn subject_token(
        &self,
        rejected: Option<Arc<Token>>,
        _now: SystemTime,
    ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>> {
        Box::pin(async move {
            let token = match rejected {
                Some(rejected) => self.token_after_rejection(rejected.generation()).await,
                None => self.token().await,
            };
            token.map_err(subject_error)
        })
    }
}

/// The file as it is now (read again only when it changed). Without a coordinator of
/// its own, every exchange looks at the file's metadata; exchanges are single-flight
/// already, so that is once per exchanged token.
impl SubjectToken for FileTokenSource {
    fn subject_token(
        &self,
        _rejected: Option<Arc<Token>>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>> {
        Box::pin(std::future::ready(self.current(now).map(Arc::new)))
    }
}

/// The subject's coordinator failing is a failure of this exchange with the same
/// severity: a subject needing a new login makes the exchange need one too.
fn subject_error(error: Error) -> RefreshError {
    let cause = error.refresh_error();
    let message = format!("the subject token is not available: {}", cause.message());
    let mapped = if cause.is_permanent() {
        RefreshError::permanent(message)
    } else {
        RefreshError::transient(message)
    };
    let mapped = match (&error, cause.retry_after()) {
        (Error::BackingOff { remaining, .. }, _) => mapped.with_retry_after(*remaining),
        (_, Some(after)) => mapped.with_retry_after(after),
        _ => mapped,
    };
    mapped.with_source(error)
}

struct FnSubject<F> {
    f: F,
}

impl<F> fmt::Debug for FnSubject<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnSubject")
    }
}

impl<F, Fut> SubjectToken for FnSubject<F>
where
    F: Fn(SystemTime) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Secret, RefreshError>> + Send + 'static,
{
    fn subject_token(
        &self,
        _rejected: Option<Arc<Token>>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>> {
        let token = (self.f)(now);
        Box::pin(async move { token.await.map(|secret| Arc::new(Token::new(secret))) })
    }
}

/// A subject token from a closure, called once per exchange attempt with the
/// coordinator's clock reading.
///
/// ```
/// use tokenflight::Secret;
/// use tokenflight::oauth2::subject_from_fn;
/// let subject = subject_from_fn(|_now| async { Ok(Secret::new("id-token-from-somewhere")) });
/// # let _ = subject;
/// ```
pub fn subject_from_fn<F, Fut>(f: F) -> impl SubjectToken
where
    F: Fn(SystemTime) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Secret, RefreshError>> + Send + 'static,
{
    FnSubject { f }
}

/// The token exchange grant (RFC 8693 §2.1): presents a subject token (and optionally
/// an actor token) and receives a token for the `audience`/`resource` asked for.
///
/// The subject comes from any [`SubjectToken`]; give it its own coordinator (a
/// [`SingleFlight`] over a [`FileTokenSource`], say) and share that between exchanges:
/// a storm on the exchanged token then causes one exchange, and the subject is read
/// once per its own lifetime, not per exchange. For one token per audience, build one
/// grant per key of a keyed policy, all with the same subject coordinator.
///
/// Errors follow RFC 8693 §2.2.2 and RFC 6749 §5.2: `invalid_target` (the audience or
/// resource is refused), `invalid_client`, `invalid_scope`, `invalid_request`,
/// `unauthorized_client` and `unsupported_grant_type` are permanent; `invalid_grant`
/// (the subject token was refused) is transient — the subject's coordinator is told
/// the token was rejected, and the next attempt presents a newer one (a rotated file);
/// 5xx, 429 and network failures are transient.
///
/// ```no_run
/// # fn demo(transport: std::sync::Arc<dyn tokenflight::adapter::Transport>) -> Result<(), tokenflight::ConfigError> {
/// use std::sync::Arc;
/// use tokenflight::SingleFlight;
/// use tokenflight::oauth2::{TokenExchangeGrant, token_type};
/// use tokenflight::sources::FileTokenSource;
///
/// // The projected service-account token, refreshed through its own coordinator.
/// let subject = Arc::new(
///     SingleFlight::builder()
///         .source(FileTokenSource::new("/var/run/secrets/tokens/sts-token"))
///         .build()?,
/// );
/// let exchange = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)?
///     .subject_token_type(token_type::JWT)
///     .audience("https://api.example")
///     .requested_token_type(token_type::ACCESS_TOKEN);
/// let flight = SingleFlight::builder().source(exchange).build()?;
/// # let _ = flight; Ok(()) }
/// ```
pub struct TokenExchangeGrant {
    endpoint: Endpoint,
    subject: Arc<dyn SubjectToken>,
    subject_type: String,
    actor: Option<(Arc<dyn SubjectToken>, String)>,
    requested_type: Option<String>,
    /// The subject token the last attempt presented, when the server refused it.
    rejected: Mutex<Option<Arc<Token>>>,
}

impl fmt::Debug for TokenExchangeGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenExchangeGrant")
            .field("endpoint", &self.endpoint)
            .field("subject_token_type", &self.subject_type)
            .field(
                "actor_token_type",
                &self.actor.as_ref().map(|(_, kind)| kind),
            )
            .field("requested_token_type", &self.requested_type)
            .finish_non_exhaustive()
    }
}

impl TokenExchangeGrant {
    /// An exchange at `token_url` of the tokens `subject` gives (of type
    /// [`token_type::JWT`] unless [`subject_token_type`](Self::subject_token_type) says
    /// otherwise); fails if the URL is not an absolute http(s) URL. No client
    /// authentication unless configured: many security token services trust the
    /// subject token alone.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject).unwrap();
    /// let sent = sent(&grant);
    /// assert!(sent.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"));
    /// assert!(sent.contains("subject_token=k8s-jwt"));
    /// ```
    pub fn new(
        transport: Arc<dyn Transport>,
        token_url: &str,
        subject: impl SubjectToken + 'static,
    ) -> Result<Self, ConfigError> {
        Ok(TokenExchangeGrant {
            endpoint: Endpoint::new(transport, token_url, "")?,
            subject: Arc::new(subject),
            subject_type: token_type::JWT.to_owned(),
            actor: None,
            requested_type: None,
            rejected: Mutex::new(None),
        })
    }

    /// The `subject_token_type` (a [`token_type`] URI).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn, token_type};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("opaque")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .subject_token_type(token_type::ACCESS_TOKEN);
    /// assert!(sent(&grant).contains("subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"));
    /// ```
    pub fn subject_token_type(mut self, kind: &str) -> Self {
        self.subject_type = kind.to_owned();
        self
    }

    /// An actor token (delegation, RFC 8693 §1.1) of type `kind`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn, token_type};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("user-token")) });
    /// let actor = subject_from_fn(|_now| async { Ok(Secret::new("service-token")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .actor_token(actor, token_type::JWT);
    /// assert!(sent(&grant).contains("actor_token=service-token"));
    /// ```
    pub fn actor_token(mut self, actor: impl SubjectToken + 'static, kind: &str) -> Self {
        self.actor = Some((Arc::new(actor), kind.to_owned()));
        self
    }

    /// An `audience` parameter: the logical name of the service the token is for. May
    /// be repeated.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .audience("orders")
    ///     .audience("billing");
    /// let sent = sent(&grant);
    /// assert!(sent.contains("audience=orders") && sent.contains("audience=billing"));
    /// ```
    pub fn audience(mut self, audience: &str) -> Self {
        self.endpoint
            .params
            .push(("audience".to_owned(), audience.to_owned()));
        self
    }

    /// A `resource` parameter: the URI of the service the token is for. May be
    /// repeated.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .resource("https://api.example");
    /// assert!(sent(&grant).contains("resource=https%3A%2F%2Fapi.example"));
    /// ```
    pub fn resource(mut self, resource: &str) -> Self {
        self.endpoint
            .params
            .push(("resource".to_owned(), resource.to_owned()));
        self
    }

    /// The `requested_token_type` (a [`token_type`] URI).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn, token_type};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .requested_token_type(token_type::ACCESS_TOKEN);
    /// assert!(sent(&grant).contains("requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"));
    /// ```
    pub fn requested_token_type(mut self, kind: &str) -> Self {
        self.requested_type = Some(kind.to_owned());
        self
    }

    /// The `scope` parameter.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .scope("orders:read");
    /// assert!(sent(&grant).contains("scope=orders%3Aread"));
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.endpoint.scope = Some(scope.to_owned());
        self
    }

    /// An extra body parameter; names the grant sets itself are ignored.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .param("tenant", "acme")
    ///     .param("subject_token", "ignored");
    /// let sent = sent(&grant);
    /// assert!(sent.contains("tenant=acme") && !sent.contains("ignored"));
    /// ```
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.endpoint.add_param(name, value);
        self
    }

    /// The client's id, for a server that authenticates the client of an exchange.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{ClientAuth, TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .client_id("gateway")
    ///     .client_secret("s3cret")
    ///     .client_auth(ClientAuth::Body);
    /// assert!(sent(&grant).contains("client_id=gateway"));
    /// ```
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.endpoint.client_id = client_id.to_owned();
        self
    }

    /// The client secret, sent as [`client_auth`](Self::client_auth) says.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .client_id("gateway")
    ///     .client_secret("s3cret");
    /// // HTTP Basic by default: base64("gateway:s3cret").
    /// assert!(sent(&grant).starts_with("Basic Z2F0ZXdheTpzM2NyZXQ="));
    /// ```
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client_secret = Some(secret.into());
        self
    }

    /// How to send the client's credentials (default: HTTP Basic).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{ClientAuth, TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .client_id("gateway")
    ///     .client_secret("s3cret")
    ///     .client_auth(ClientAuth::Body);
    /// assert!(sent(&grant).contains("client_secret=s3cret"));
    /// ```
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client_auth = auth;
        self
    }

    /// Authenticates the client with assertions signed by `key` (`private_key_jwt`).
    ///
    /// ```
    /// # fn demo(key: tokenflight::oauth2::SigningKey, transport: std::sync::Arc<dyn tokenflight::adapter::Transport>) {
    /// use tokenflight::Secret;
    /// use tokenflight::oauth2::{TokenExchangeGrant, subject_from_fn};
    /// let subject = subject_from_fn(|_now| async { Ok(Secret::new("k8s-jwt")) });
    /// let grant = TokenExchangeGrant::new(transport, "https://sts.example/token", subject)
    ///     .unwrap()
    ///     .client_id("gateway")
    ///     .private_key_jwt(key);
    /// # let _ = grant; }
    /// ```
    #[cfg(feature = "private-key-jwt")]
    pub fn private_key_jwt(mut self, key: SigningKey) -> Self {
        self.endpoint.set_signing_key(key);
        self
    }
}

impl TokenSource for TokenExchangeGrant {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            let rejected = self
                .rejected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let subject = self.subject.subject_token(rejected, cx.now).await?;
            let actor = match &self.actor {
                Some((actor, kind)) => Some((actor.subject_token(None, cx.now).await?, kind)),
                None => None,
            };
            let mut grant = vec![
                ("grant_type", TOKEN_EXCHANGE_GRANT),
                ("subject_token", subject.access().expose()),
                ("subject_token_type", self.subject_type.as_str()),
            ];
            if let Some((actor, kind)) = &actor {
                grant.push(("actor_token", actor.access().expose()));
                grant.push(("actor_token_type", kind.as_str()));
            }
            if let Some(kind) = &self.requested_type {
                grant.push(("requested_token_type", kind.as_str()));
            }
            let mut secrets = vec![subject.access()];
            if let Some((actor, _)) = &actor {
                secrets.push(actor.access());
            }
            match self
                .endpoint
                .exchange_with(&grant, cx.now, None, &secrets)
                .await
            {
                Ok(token) => Ok(token),
                Err((error, Some(code))) if code == "invalid_grant" => {
                    *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) = Some(subject);
                    let message = format!("{} (the subject token was refused)", error.message());
                    let transient = RefreshError::transient(message);
                    Err(match error.retry_after() {
                        Some(after) => transient.with_retry_after(after),
                        None => transient,
                    })
                }
                Err((error, _)) => Err(error),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::source::RefreshReason;
    use crate::transport::{HttpRequest, HttpResponse, TransportError};

    /// Answers every request with `status` and `body`, and keeps the forms it was sent.
    struct Canned {
        status: u16,
        body: &'static str,
        forms: Mutex<Vec<HashMap<String, String>>>,
    }

    impl Transport for Canned {
        fn send(
            &self,
            request: HttpRequest,
            _limit: usize,
        ) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
            let form = url::form_urlencoded::parse(request.body())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            self.forms.lock().unwrap().push(form);
            let response = http::Response::builder()
                .status(self.status)
                .body(Bytes::from_static(self.body.as_bytes()))
                .unwrap();
            Box::pin(async move { Ok(response) })
        }
    }

    fn canned(status: u16, body: &'static str) -> Arc<Canned> {
        Arc::new(Canned {
            status,
            body,
            forms: Mutex::new(Vec::new()),
        })
    }

    fn cx() -> RefreshContext {
        RefreshContext::new(RefreshReason::Initial, None, SystemTime::now())
    }

    /// A subject that counts its calls and records the rejected token it was told of.
    #[derive(Default)]
    struct Counting {
        calls: AtomicU32,
        told_rejected: Mutex<Vec<String>>,
    }

    impl SubjectToken for Counting {
        fn subject_token(
            &self,
            rejected: Option<Arc<Token>>,
            _now: SystemTime,
        ) -> BoxFuture<'_, Result<Arc<Token>, RefreshError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(rejected) = rejected {
                let seen = rejected.access().expose().to_owned();
                self.told_rejected.lock().unwrap().push(seen);
            }
            Box::pin(async move { Ok(Arc::new(Token::new(format!("subject-{n}")))) })
        }
    }

    #[test]
    fn the_request_carries_every_rfc_8693_parameter() {
        let transport = canned(
            200,
            r#"{"access_token":"exchanged","token_type":"Bearer","expires_in":60,"issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
        );
        let actor = subject_from_fn(|_now| async { Ok(Secret::new("actor-token")) });
        let grant = TokenExchangeGrant::new(
            transport.clone(),
            "https://sts.example/token",
            Counting::default(),
        )
        .unwrap()
        .subject_token_type(token_type::ID_TOKEN)
        .actor_token(actor, token_type::JWT)
        .audience("orders")
        .resource("https://orders.example/")
        .scope("read")
        .requested_token_type(token_type::ACCESS_TOKEN)
        .client_id("svc")
        .client_secret("svc-secret")
        .client_auth(ClientAuth::SECRET_POST);
        let token = futures::executor::block_on(grant.fetch(cx())).unwrap();
        assert_eq!(token.access().expose(), "exchanged");
        let forms = transport.forms.lock().unwrap();
        let form = &forms[0];
        for (name, value) in [
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token", "subject-1"),
            ("subject_token_type", token_type::ID_TOKEN),
            ("actor_token", "actor-token"),
            ("actor_token_type", token_type::JWT),
            ("audience", "orders"),
            ("resource", "https://orders.example/"),
            ("scope", "read"),
            ("requested_token_type", token_type::ACCESS_TOKEN),
            ("client_id", "svc"),
            ("client_secret", "svc-secret"),
        ] {
            assert_eq!(form.get(name).map(String::as_str), Some(value), "{name}");
        }
        // Debug shows the shape, never the secret.
        assert!(!format!("{grant:?}").contains("svc-secret"));
    }

    #[test]
    fn invalid_target_is_permanent_and_invalid_grant_retries_with_a_newer_subject() {
        let transport = canned(400, r#"{"error":"invalid_target"}"#);
        let grant =
            TokenExchangeGrant::new(transport, "https://sts.example/token", Counting::default())
                .unwrap();
        let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
        assert!(error.is_permanent(), "{error}");

        let subject = Arc::new(Counting::default());
        let transport = canned(
            400,
            r#"{"error":"invalid_grant","error_description":"bad subject-1"}"#,
        );
        let grant =
            TokenExchangeGrant::new(transport, "https://sts.example/token", subject.clone())
                .unwrap();
        let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
        assert!(error.is_retryable(), "{error}");
        // The server's echo of the subject token is redacted.
        assert!(!error.to_string().contains("subject-1"), "{error}");
        futures::executor::block_on(grant.fetch(cx())).unwrap_err();
        assert_eq!(*subject.told_rejected.lock().unwrap(), ["subject-1"]);
    }

    #[test]
    fn a_federated_token_file_is_the_client_assertion_of_each_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("azure-identity-token");
        std::fs::write(&path, "federated-1").unwrap();
        let transport = canned(
            401,
            r#"{"error":"invalid_client","error_description":"federated-1 is not trusted"}"#,
        );
        let grant = super::super::ClientCredentialsGrant::new(
            transport.clone(),
            "https://login.example/tenant/oauth2/v2.0/token",
            "app-id",
        )
        .unwrap()
        .scope("api://orders/.default")
        .client_assertion(FileTokenSource::new(&path).lifetime(std::time::Duration::from_secs(60)));
        let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
        assert!(error.is_permanent());
        assert!(!error.to_string().contains("federated-1"), "{error}");
        // Rotated: the next attempt presents the new file.
        let next = dir.path().join("next");
        std::fs::write(&next, "federated-2").unwrap();
        std::fs::rename(&next, &path).unwrap();
        futures::executor::block_on(grant.fetch(cx())).unwrap_err();
        let forms = transport.forms.lock().unwrap();
        let sent: Vec<&str> = forms
            .iter()
            .map(|f| f["client_assertion"].as_str())
            .collect();
        assert_eq!(sent, ["federated-1", "federated-2"]);
        for form in forms.iter() {
            assert_eq!(
                form["client_assertion_type"],
                super::super::CLIENT_ASSERTION_JWT
            );
            assert_eq!(form["client_id"], "app-id");
            assert_eq!(form["grant_type"], "client_credentials");
        }
    }

    #[cfg(feature = "private-key-jwt")]
    #[test]
    fn private_key_jwt_signs_a_new_assertion_for_the_token_endpoint_per_attempt() {
        use base64::Engine as _;
        let key = SigningKey::from_pem(include_str!(
            "../../../tests/src/testkit/keys/test-es256.pem"
        ))
        .unwrap();
        let transport = canned(503, r#"{"error":"temporarily_unavailable"}"#);
        let grant = super::super::ClientCredentialsGrant::new(
            transport.clone(),
            "https://auth.example/token",
            "svc",
        )
        .unwrap()
        .private_key_jwt(key);
        for _ in 0..2 {
            let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
            assert!(error.is_retryable());
        }
        let forms = transport.forms.lock().unwrap();
        let claims: Vec<serde_json::Value> = forms
            .iter()
            .map(|form| {
                assert_eq!(
                    form.get("client_assertion_type").map(String::as_str),
                    Some(super::super::CLIENT_ASSERTION_JWT)
                );
                assert!(!form.contains_key("client_secret"));
                let assertion = &form["client_assertion"];
                let payload = assertion.split('.').nth(1).unwrap();
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .unwrap();
                serde_json::from_slice(&bytes).unwrap()
            })
            .collect();
        for c in &claims {
            assert_eq!(c["iss"], "svc");
            assert_eq!(c["sub"], "svc");
            assert_eq!(c["aud"], "https://auth.example/token");
            assert!(c["exp"].as_u64().unwrap() > c["iat"].as_u64().unwrap());
        }
        assert_ne!(claims[0]["jti"], claims[1]["jti"], "a jti was reused");
        assert!(!format!("{grant:?}").contains("PRIVATE"));
    }
}
