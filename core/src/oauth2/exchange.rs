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
    pub fn subject_token_type(mut self, kind: &str) -> Self {
        self.subject_type = kind.to_owned();
        self
    }

    /// An actor token (delegation, RFC 8693 §1.1) of type `kind`.
    pub fn actor_token(mut self, actor: impl SubjectToken + 'static, kind: &str) -> Self {
        self.actor = Some((Arc::new(actor), kind.to_owned()));
        self
    }

    /// An `audience` parameter: the logical name of the service the token is for. May
    /// be repeated.
    pub fn audience(mut self, audience: &str) -> Self {
        self.endpoint
            .params
            .push(("audience".to_owned(), audience.to_owned()));
        self
    }

    /// A `resource` parameter: the URI of the service the token is for. May be
    /// repeated.
    pub fn resource(mut self, resource: &str) -> Self {
        self.endpoint
            .params
            .push(("resource".to_owned(), resource.to_owned()));
        self
    }

    /// The `requested_token_type` (a [`token_type`] URI).
    pub fn requested_token_type(mut self, kind: &str) -> Self {
        self.requested_type = Some(kind.to_owned());
        self
    }

    /// The `scope` parameter.
    pub fn scope(mut self, scope: &str) -> Self {
        self.endpoint.scope = Some(scope.to_owned());
        self
    }

    /// An extra body parameter; names the grant sets itself are ignored.
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.endpoint.add_param(name, value);
        self
    }

    /// The client's id, for a server that authenticates the client of an exchange.
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.endpoint.client_id = client_id.to_owned();
        self
    }

    /// The client secret, sent as [`client_auth`](Self::client_auth) says.
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client_secret = Some(secret.into());
        self
    }

    /// How to send the client's credentials (default: HTTP Basic).
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client_auth = auth;
        self
    }

    /// Authenticates the client with assertions signed by `key` (`private_key_jwt`).
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
