//! Where new tokens come from: the `TokenSource` trait and its closure form.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::error::RefreshError;
use crate::token::Token;

/// Why the coordinator asks for a new token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefreshReason {
    /// There is no token yet (and the store had none).
    Initial,
    /// The token expired, or will within the leeway ([C7](crate#c7)).
    Expired,
    /// The server rejected the token ([C4](crate#c4)).
    Rejected,
    /// The token is still valid but inside the refresh-ahead window ([C8](crate#c8)).
    RefreshAhead,
    /// A request asked for a refresh explicitly ([C11](crate#c11)).
    Forced,
}

/// What a token source is told when it is asked for a new token.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RefreshContext {
    /// Why a new token is needed.
    pub reason: RefreshReason,
    /// The token being replaced, if any: its refresh secret is what a refresh grant uses.
    pub previous: Option<Arc<Token>>,
    /// The coordinator's clock reading when the attempt started.
    pub now: SystemTime,
}

impl RefreshContext {
    /// A context (mostly for tests of token sources).
    pub fn new(reason: RefreshReason, previous: Option<Arc<Token>>, now: SystemTime) -> Self {
        RefreshContext {
            reason,
            previous,
            now,
        }
    }
}

/// Produces new tokens. The coordinator calls it at most once at a time per lock domain
/// ([C1](crate#c1)), and decides the token's generation itself.
///
/// A source that talks to a token endpoint should do so through a bare
/// [`Transport`](crate::adapter::Transport), never through the auth policy that waits for
/// it.
///
/// The trait is object-safe; the coordinator holds it as `Arc<dyn TokenSource>`.
pub trait TokenSource: Send + Sync {
    /// Fetches a new token. Classify failures with [`RefreshError::transient`] or
    /// [`RefreshError::permanent`]: the coordinator backs off or asks for a new login.
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>>;
}

impl<S: TokenSource + ?Sized> TokenSource for Arc<S> {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        (**self).fetch(cx)
    }
}

/// A token source made from an async closure; see [`from_fn`].
pub(crate) struct FnSource<F> {
    f: F,
}

impl<F> fmt::Debug for FnSource<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnSource")
    }
}

/// Makes a token source from a closure returning a future.
///
/// ```
/// use tokenflight::{from_fn, RefreshContext, Token};
/// let source = from_fn(|_cx: RefreshContext| async { Ok(Token::new("secret")) });
/// # let _ = source;
/// ```
pub fn from_fn<F, Fut>(f: F) -> impl TokenSource
where
    F: Fn(RefreshContext) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    FnSource { f }
}

impl<F, Fut> TokenSource for FnSource<F>
where
    F: Fn(RefreshContext) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin((self.f)(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_source_is_object_safe() {
        let source: Arc<dyn TokenSource> = Arc::new(from_fn(|_cx| async { Ok(Token::new("x")) }));
        let _ = source;
    }
}
