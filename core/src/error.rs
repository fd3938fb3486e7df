//! Errors: one `#[non_exhaustive]` enum for callers, and the refresh error that every
//! waiter of a flight shares as a cheap clone (C5).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a token source, store or transport.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// How a refresh failed, which decides what the coordinator does next (C9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefreshErrorKind {
    /// Worth retrying later (network, 5xx, 429): backoff, then try again.
    Transient,
    /// Retrying cannot help (`invalid_grant`, `invalid_client`, revoked credentials):
    /// re-authentication is required.
    Permanent,
    /// The attempt took longer than the refresh timeout (transient).
    Timeout,
    /// The token store failed (transient).
    Store,
    /// The token source panicked (transient; the panic is contained).
    Panicked,
}

impl RefreshErrorKind {
    /// True for the kinds that end in "re-authentication required".
    pub fn is_permanent(self) -> bool {
        matches!(self, RefreshErrorKind::Permanent)
    }
}

struct RefreshErrorInner {
    kind: RefreshErrorKind,
    message: String,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

/// Why a refresh failed. Cloning is cheap (an `Arc`), so every waiter of a flight gets
/// the same error (C5).
///
/// Token sources build it with [`RefreshError::transient`], [`RefreshError::permanent`]
/// and friends. The message must not contain secrets: it is shown to callers (C12).
#[derive(Clone)]
pub struct RefreshError(Arc<RefreshErrorInner>);

impl RefreshError {
    /// A failure with the given kind and message.
    pub fn new(kind: RefreshErrorKind, message: impl Into<String>) -> Self {
        RefreshError(Arc::new(RefreshErrorInner {
            kind,
            message: message.into(),
            retry_after: None,
            source: None,
        }))
    }

    /// A transient failure: the coordinator backs off and tries again later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(RefreshErrorKind::Transient, message)
    }

    /// A permanent failure: the coordinator enters "re-authentication required".
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(RefreshErrorKind::Permanent, message)
    }

    /// Attaches the underlying cause (kept in the `source()` chain).
    pub fn with_source(self, source: impl Into<BoxError>) -> Self {
        self.rebuild(|inner| inner.source = Some(source.into()))
    }

    /// Asks the coordinator to wait at least this long before the next attempt
    /// (a server's `Retry-After`).
    pub fn with_retry_after(self, after: Duration) -> Self {
        self.rebuild(|inner| inner.retry_after = Some(after))
    }

    fn rebuild(self, edit: impl FnOnce(&mut RefreshErrorInner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            // Shared already: copy what can be copied; the source stays with the original.
            Err(shared) => RefreshErrorInner {
                kind: shared.kind,
                message: shared.message.clone(),
                retry_after: shared.retry_after,
                source: None,
            },
        };
        edit(&mut inner);
        RefreshError(Arc::new(inner))
    }

    /// The kind of failure.
    pub fn kind(&self) -> RefreshErrorKind {
        self.0.kind
    }

    /// The message (never contains secrets).
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The server's requested delay before the next attempt, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// True when two values are clones of the same failure (same flight).
    pub fn same_as(&self, other: &RefreshError) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshError")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("retry_after", &self.0.retry_after)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0.kind {
            RefreshErrorKind::Transient => "transient",
            RefreshErrorKind::Permanent => "permanent",
            RefreshErrorKind::Timeout => "timed out",
            RefreshErrorKind::Store => "token store",
            RefreshErrorKind::Panicked => "token source panicked",
        };
        write!(f, "token refresh failed ({kind}): {}", self.0.message)
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
    /// clone of the same error (C5).
    #[error(transparent)]
    Refresh(RefreshError),
    /// A recent refresh failed transiently; until the backoff ends, callers that need a
    /// refresh fail fast with the last error instead of hammering the endpoint (C9).
    #[error("token refresh is backing off for {remaining:?} after: {last}")]
    BackingOff {
        /// The failure that started the backoff.
        #[source]
        last: RefreshError,
        /// Time left until the next attempt is allowed.
        remaining: Duration,
    },
    /// A permanent failure happened; calls fail fast until a new token is installed
    /// with `SingleFlight::install` (a new login) (C9).
    #[error("re-authentication required: {cause}")]
    ReauthenticationRequired {
        /// The permanent failure.
        #[source]
        cause: RefreshError,
    },
}

impl Error {
    /// The refresh failure behind this error.
    pub fn refresh_error(&self) -> &RefreshError {
        match self {
            Error::Refresh(e) => e,
            Error::BackingOff { last, .. } => last,
            Error::ReauthenticationRequired { cause } => cause,
        }
    }
}

/// A builder was given settings that cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No token source was configured.
    #[error("no token source configured: call `.source(..)`")]
    MissingSource,
    /// No origin may receive the token: name one with `.allowed_origin(..)` or opt in
    /// to every origin with `.allow_any_origin()` (C12).
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
}
