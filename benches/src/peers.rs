//! Storm rows for the patterns users pick instead of a coordinator (issue 18). Each is
//! written here from the pattern's description, not copied; the comment on each names
//! where the pattern comes from. They share the storm's [`Refresh`] and expiry check.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokenflight::Token;

use crate::storm::{Contender, Refresh, expired_token, is_valid};

/// apache/arrow-rs `object_store`'s credential cache (`client/token.rs`, `TokenCache`):
/// an async mutex around the cached token, held across the fetch, re-checking the
/// expiry once it holds the lock; here with a lock-free `ArcSwapOption` read in front
/// (as issue 18 describes the pattern), so callers with a valid token never touch the
/// mutex. Waiters queue on the mutex and are released one after another, each
/// re-checking the now-valid token.
#[derive(Debug)]
pub struct ArrowTokenCache {
    current: Arc<ArcSwapOption<Token>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    refresh: Arc<Refresh>,
}

impl Contender for ArrowTokenCache {
    const NAME: &'static str = "arrow_object_store_cache";

    fn new(refresh: Arc<Refresh>) -> Self {
        ArrowTokenCache {
            current: Arc::new(ArcSwapOption::from_pointee(expired_token())),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let current = Arc::clone(&self.current);
        let lock = Arc::clone(&self.lock);
        let refresh = Arc::clone(&self.refresh);
        async move {
            if let Some(token) = current.load_full().filter(|t| is_valid(t)) {
                return token;
            }
            let _held = lock.lock().await;
            // Re-check: whoever held the lock before may have refreshed.
            if let Some(token) = current.load_full().filter(|t| is_valid(t)) {
                return token;
            }
            let token = Arc::new(refresh.run().await);
            current.store(Some(Arc::clone(&token)));
            token
        }
    }
}

/// smithy-lang/smithy-rs `aws-smithy-runtime`'s `ExpiringCache` (used by the AWS SDK's
/// identity cache): a tokio `RwLock` around a tokio `OnceCell` holding the value and
/// its expiry. A caller first looks under the read lock; if the value expired it takes
/// the write lock, re-checks, and replaces the cell with an empty one (a new
/// generation); then, under the read lock, `get_or_try_init` lets one caller run the
/// load while the others wait on the cell.
#[derive(Debug)]
pub struct SmithyExpiringCache {
    cell: Arc<tokio::sync::RwLock<tokio::sync::OnceCell<Arc<Token>>>>,
    refresh: Arc<Refresh>,
}

impl Contender for SmithyExpiringCache {
    const NAME: &'static str = "smithy_expiring_cache";

    fn new(refresh: Arc<Refresh>) -> Self {
        let cell = tokio::sync::OnceCell::new_with(Some(Arc::new(expired_token())));
        SmithyExpiringCache {
            cell: Arc::new(tokio::sync::RwLock::new(cell)),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let cell = Arc::clone(&self.cell);
        let refresh = Arc::clone(&self.refresh);
        async move {
            // yield_or_clear_if_expired
            let expired = match cell.read().await.get() {
                Some(token) if is_valid(token) => return Arc::clone(token),
                Some(_) => true,
                None => false,
            };
            if expired {
                let mut write = cell.write().await;
                if write.get().is_some_and(|token| !is_valid(token)) {
                    *write = tokio::sync::OnceCell::new();
                }
            }
            // get_or_load
            let read = cell.read().await;
            let loaded = read
                .get_or_try_init(|| async {
                    Ok::<_, std::convert::Infallible>(Arc::new(refresh.run().await))
                })
                .await;
            match loaded {
                Ok(token) => Arc::clone(token),
                Err(never) => match never {},
            }
        }
    }
}

/// The naive baseline users start from: a tokio `RwLock` around the token; read it,
/// and if it expired take the write lock, re-check (another writer may have
/// refreshed), and refresh while holding the write lock.
#[derive(Debug)]
pub struct RwLockRecheck {
    state: Arc<tokio::sync::RwLock<Arc<Token>>>,
    refresh: Arc<Refresh>,
}

impl Contender for RwLockRecheck {
    const NAME: &'static str = "tokio_rwlock_recheck";

    fn new(refresh: Arc<Refresh>) -> Self {
        RwLockRecheck {
            state: Arc::new(tokio::sync::RwLock::new(Arc::new(expired_token()))),
            refresh,
        }
    }

    fn waiter(&self) -> impl Future<Output = Arc<Token>> + Send + 'static {
        let state = Arc::clone(&self.state);
        let refresh = Arc::clone(&self.refresh);
        async move {
            {
                let token = state.read().await;
                if is_valid(&token) {
                    return Arc::clone(&token);
                }
            }
            let mut token = state.write().await;
            if !is_valid(&token) {
                *token = Arc::new(refresh.run().await);
            }
            Arc::clone(&token)
        }
    }
}
