//! Errors: one `#[non_exhaustive]` enum for callers, and the refresh error that every
//! waiter of a flight shares as a cheap clone ([C5](crate#c5)).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a token source, store or transport.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Where a refresh failed. Whether trying again can help is the other axis:
/// [`RefreshError::is_permanent`] / [`RefreshError::is_retryable`] ([C9](crate#c9),
/// [C16](crate#c16)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// The token source said so ([`RefreshError::transient`], [`RefreshError::permanent`]):
    /// a network failure, a 5xx or 429, `invalid_grant`, revoked credentials.
    TokenSource,
    /// An attempt or the whole flight took longer than its budget ([C10](crate#c10)).
    Timeout,
    /// The token store failed. Retried unless the store says retrying cannot help (a
    /// configuration fault such as [`StoreError::Insecure`](crate::store::StoreError::Insecure)).
    Store,
    /// A pluggable part (the source, the store, a hook) panicked; the panic was
    /// contained ([C18](crate#c18)).
    Panicked,
    /// The policy's configuration does not fit the request: a
    /// [`TokenKey`](crate::TokenKey) on a policy that is not keyed, or a key factory
    /// that could not make the key's coordinator. The [`ConfigError`] is the error's
    /// `source()`; retrying cannot help.
    Config,
}

impl Cause {
    /// A stable, lower-case name (used as a metric label).
    ///
    /// ```
    /// use tokenflight::{Cause, RefreshError};
    /// assert_eq!(RefreshError::transient("503").cause().as_str(), "source");
    /// assert_eq!(Cause::Timeout.as_str(), "timeout");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::TokenSource => "source",
            Cause::Timeout => "timeout",
            Cause::Store => "store",
            Cause::Panicked => "panicked",
            Cause::Config => "config",
        }
    }
}

struct RefreshErrorInner {
    permanent: bool,
    cause: Cause,
    message: String,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

/// Why a refresh failed. Cloning is cheap (an `Arc`), so every waiter of a flight gets
/// the same error ([C5](crate#c5)).
///
/// Two separate axes: **severity** — [`is_permanent`](Self::is_permanent) (retrying
/// cannot help: re-authentication is required) or [`is_retryable`](Self::is_retryable)
/// (backoff, then try again) — and **cause** — [`cause`](Self::cause), where it failed.
///
/// Token sources build it with [`RefreshError::transient`] and [`RefreshError::permanent`].
/// The message must not contain secrets: it is shown to callers ([C12](crate#c12)).
///
/// ```
/// use tokenflight::{Cause, RefreshError};
/// let error = RefreshError::permanent("invalid_grant");
/// assert!(error.is_permanent() && !error.is_retryable());
/// assert_eq!(error.cause(), Cause::TokenSource);
/// ```
#[derive(Clone)]
pub struct RefreshError(Arc<RefreshErrorInner>);

impl RefreshError {
    pub(crate) fn new(permanent: bool, cause: Cause, message: impl Into<String>) -> Self {
        RefreshError(Arc::new(RefreshErrorInner {
            permanent,
            cause,
            message: message.into(),
            retry_after: None,
            source: None,
        }))
    }

    /// A transient failure of the token source: the coordinator retries inside the
    /// flight, then backs off and tries again later.
    ///
    /// ```
    /// use tokenflight::RefreshError;
    /// let error = RefreshError::transient("token endpoint answered 503");
    /// assert!(error.is_retryable() && !error.is_permanent());
    /// ```
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(false, Cause::TokenSource, message)
    }

    /// A permanent failure of the token source: the coordinator enters
    /// "re-authentication required" ([C9](crate#c9)).
    ///
    /// ```
    /// use tokenflight::RefreshError;
    /// let error = RefreshError::permanent("invalid_grant");
    /// assert!(error.is_permanent());
    /// assert_eq!(error.message(), "invalid_grant");
    /// ```
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(true, Cause::TokenSource, message)
    }

    /// A configuration fault met by one request (not the token source's): permanent for
    /// this request, with `error` as its source.
    pub(crate) fn misconfigured(error: ConfigError) -> Self {
        let message = error.to_string();
        Self::new(true, Cause::Config, message).with_source(error)
    }

    /// A transient failure with another cause (a timeout, a panic contained).
    pub(crate) fn transient_because(cause: Cause, message: impl Into<String>) -> Self {
        Self::new(false, cause, message)
    }

    /// Attaches the underlying cause (kept in the `source()` chain).
    ///
    /// ```
    /// use std::error::Error as _;
    /// use tokenflight::RefreshError;
    /// let io = std::io::Error::other("connection reset");
    /// let error = RefreshError::transient("token endpoint unreachable").with_source(io);
    /// assert_eq!(error.source().unwrap().to_string(), "connection reset");
    /// ```
    pub fn with_source(self, source: impl Into<BoxError>) -> Self {
        self.rebuild(|inner| inner.source = Some(source.into()))
    }

    /// Asks the coordinator to wait at least this long before the next attempt
    /// (a server's `Retry-After`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::RefreshError;
    /// let error = RefreshError::transient("429").with_retry_after(Duration::from_secs(30));
    /// assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
    /// ```
    pub fn with_retry_after(self, after: Duration) -> Self {
        self.rebuild(|inner| inner.retry_after = Some(after))
    }

    fn rebuild(self, edit: impl FnOnce(&mut RefreshErrorInner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            // Shared already: copy what can be copied; the source stays with the original.
            Err(shared) => RefreshErrorInner {
                permanent: shared.permanent,
                cause: shared.cause,
                message: shared.message.clone(),
                retry_after: shared.retry_after,
                source: None,
            },
        };
        edit(&mut inner);
        RefreshError(Arc::new(inner))
    }

    /// True when retrying cannot help: the coordinator requires re-authentication
    /// (a new login through [`SingleFlight::install`](crate::SingleFlight::install)).
    ///
    /// ```
    /// use tokenflight::RefreshError;
    /// assert!(RefreshError::permanent("invalid_grant").is_permanent());
    /// assert!(!RefreshError::transient("503").is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        self.0.permanent
    }

    /// True when another attempt may succeed (the opposite of
    /// [`is_permanent`](Self::is_permanent)): retried inside the flight, then backed off
    /// ([C16](crate#c16)).
    ///
    /// ```
    /// use tokenflight::RefreshError;
    /// assert!(RefreshError::transient("503").is_retryable());
    /// assert!(!RefreshError::permanent("invalid_client").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        !self.0.permanent
    }

    /// Where the refresh failed.
    ///
    /// ```
    /// use tokenflight::{Cause, RefreshError};
    /// assert_eq!(RefreshError::permanent("invalid_grant").cause(), Cause::TokenSource);
    /// ```
    pub fn cause(&self) -> Cause {
        self.0.cause
    }

    /// The message (never contains secrets).
    ///
    /// ```
    /// use tokenflight::RefreshError;
    /// let error = RefreshError::transient("token endpoint answered 503");
    /// assert_eq!(error.message(), "token endpoint answered 503");
    /// assert!(error.to_string().contains("503"));
    /// ```
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The server's requested delay before the next attempt, if any.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::RefreshError;
    /// assert_eq!(RefreshError::transient("503").retry_after(), None);
    /// let later = RefreshError::transient("429").with_retry_after(Duration::from_secs(5));
    /// assert_eq!(later.retry_after(), Some(Duration::from_secs(5)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// True when two values are clones of the same failure (same flight).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(crate) fn same_as(&self, other: &RefreshError) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshError")
            .field("permanent", &self.0.permanent)
            .field("cause", &self.0.cause)
            .field("message", &self.0.message)
            .field("retry_after", &self.0.retry_after)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = if self.0.permanent {
            "permanent"
        } else {
            "transient"
        };
        let cause = match self.0.cause {
            Cause::TokenSource => "",
            Cause::Timeout => ", timed out",
            Cause::Store => ", token store",
            Cause::Panicked => ", panicked",
            Cause::Config => ", misconfigured",
        };
        write!(
            f,
            "token refresh failed ({severity}{cause}): {}",
            self.0.message
        )
    }
}

impl StdError for RefreshError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn StdError + 'static))
    }
}

/// What a caller of the coordinator or the retry driver can get instead of a token.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The refresh this caller waited for failed. Every waiter of that flight gets a
    /// clone of the same error ([C5](crate#c5)).
    #[error(transparent)]
    Refresh(RefreshError),
    /// A recent refresh failed transiently; until the backoff ends, callers that need a
    /// refresh fail fast with the last error instead of hammering the endpoint
    /// ([C9](crate#c9)).
    #[error("token refresh is backing off for {remaining:?} after: {last}")]
    BackingOff {
        /// The failure that started the backoff.
        #[source]
        last: RefreshError,
        /// Time left until the next attempt is allowed.
        remaining: Duration,
    },
    /// A permanent failure happened; calls fail fast until a new token is installed
    /// with [`SingleFlight::install`](crate::SingleFlight::install) (a new login)
    /// ([C9](crate#c9)).
    #[error("re-authentication required: {cause}")]
    ReauthenticationRequired {
        /// The permanent failure.
        #[source]
        cause: RefreshError,
    },
}

impl Error {
    /// True when no token comes until a new login is installed ([C9](crate#c9)).
    ///
    /// ```
    /// use tokenflight::{Error, RefreshError};
    /// let error = Error::ReauthenticationRequired { cause: RefreshError::permanent("invalid_grant") };
    /// assert!(error.is_reauthentication_required());
    /// assert!(!Error::Refresh(RefreshError::transient("503")).is_reauthentication_required());
    /// ```
    pub fn is_reauthentication_required(&self) -> bool {
        matches!(self, Error::ReauthenticationRequired { .. })
    }

    /// True when the policy's configuration does not fit the request
    /// ([`Cause::Config`]): a fault to fix in the code, not a failing token endpoint.
    ///
    /// ```
    /// use tokenflight::{Error, RefreshError};
    /// assert!(!Error::Refresh(RefreshError::permanent("invalid_grant")).is_misconfigured());
    /// ```
    pub fn is_misconfigured(&self) -> bool {
        self.refresh_error().cause() == Cause::Config
    }

    /// The refresh failure behind this error.
    ///
    /// ```
    /// use tokenflight::{Error, RefreshError};
    /// let error = Error::ReauthenticationRequired { cause: RefreshError::permanent("invalid_grant") };
    /// assert_eq!(error.refresh_error().message(), "invalid_grant");
    /// ```
    pub fn refresh_error(&self) -> &RefreshError {
        match self {
            Error::Refresh(e) => e,
            Error::BackingOff { last, .. } => last,
            Error::ReauthenticationRequired { cause } => cause,
        }
    }
}

/// Why [`AuthPolicy::send`](crate::AuthPolicy::send) failed: the error of every adapter's authenticated send
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

/// A header name or value that HTTP cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the token cannot be sent in a header (invalid characters)")]
pub struct InvalidHeader;

/// A builder was given settings that cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No token source was configured.
    #[error("no token source configured: call `.source(..)`")]
    MissingSource,
    /// No origin may receive the token: name one with `.allowed_origin(..)` or opt in
    /// to every origin with `.allow_any_origin()` ([C12](crate#c12)).
    #[error("no allowed origin configured: call `.allowed_origin(..)` or `.allow_any_origin()`")]
    NoAllowedOrigin,
    /// An origin could not be parsed.
    #[error("invalid origin {0:?}: expected scheme://host[:port]")]
    InvalidOrigin(String),
    /// A header name or scheme cannot be used in an HTTP header.
    #[error("invalid token placement: {0}")]
    InvalidPlacement(String),
    /// A duration or limit is out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// More than one setting is invalid: each of them, in the order of the calls.
    #[error("{} invalid settings: {}", .0.len(), Several(.0))]
    Several(Vec<ConfigError>),
}

/// The list of a [`ConfigError::Several`], for its message.
struct Several<'a>(&'a [ConfigError]);

impl fmt::Display for Several<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, error) in self.0.iter().enumerate() {
            if at > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// One error for `all` (one of them as it is, more as [`ConfigError::Several`]).
    pub(crate) fn of_all(mut all: Vec<ConfigError>) -> Self {
        match all.len() {
            1 => all.remove(0),
            _ => ConfigError::Several(all),
        }
    }
}
