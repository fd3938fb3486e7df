//! Where tokens live between requests and processes: the `TokenStore` trait and the
//! in-memory default. A store's refresh lock is what makes one flight span processes (C1).

use std::any::Any;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use futures_util::future::BoxFuture;

use crate::error::BoxError;
use crate::token::Token;

/// A failure of a token store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("token store I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The stored data could not be decoded (it was kept, not overwritten).
    #[error("stored token is corrupt: {0}")]
    Corrupt(String),
    /// The store's file or key has unsafe permissions or ownership.
    #[error("token store is not private: {0}")]
    Insecure(String),
    /// The backing service cannot be reached.
    #[error("token store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Waiting for another holder of the refresh lock took too long.
    #[error("timed out waiting for the token store's refresh lock")]
    LockTimeout,
    /// This holder's lease on the refresh lock lapsed; a save was refused so a newer
    /// token cannot be overwritten.
    #[error("refresh lock lease lost; save refused")]
    LeaseLost,
    /// Anything else.
    #[error("token store failed: {0}")]
    Other(#[source] BoxError),
}

/// Proof of holding a store's refresh lock. Dropping it releases the lock (stores that
/// need async work to release do it in [`TokenStore::unlock`] and fall back to a lease).
pub struct StoreLock {
    guard: Box<dyn Any + Send + Sync>,
}

impl StoreLock {
    /// Wraps a store-specific guard.
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        StoreLock {
            guard: Box::new(guard),
        }
    }

    /// A lock that guards nothing beyond this process (for stores whose only users are
    /// in one process: the in-process single flight already serialises them).
    pub fn none() -> Self {
        Self::new(())
    }

    /// The store-specific guard.
    pub fn guard<T: Any>(&self) -> Option<&T> {
        self.guard.downcast_ref()
    }

    /// Takes the store-specific guard back.
    pub fn into_guard<T: Any>(self) -> Result<Box<T>, Self> {
        match self.guard.downcast::<T>() {
            Ok(guard) => Ok(guard),
            Err(guard) => Err(StoreLock {
                guard: guard as Box<dyn Any + Send + Sync>,
            }),
        }
    }
}

impl fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreLock")
    }
}

/// Keeps the current token, and a refresh lock shared by everyone who uses the store.
///
/// The coordinator's flight is: `lock` → `load` → adopt the stored token if it is newer
/// than the one being replaced (another process refreshed) → else call the source →
/// `save` (before the lock is released and before the token is handed out) → `unlock`.
/// Generations are assigned as `max(stored, current) + 1`, so C3 holds across processes.
///
/// The trait is object-safe.
pub trait TokenStore: Send + Sync {
    /// The stored token, if any.
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>>;
    /// Stores `token`, replacing what is there. `lock` is the guard from [`Self::lock`]
    /// (fenced stores check it is still theirs), or `None` for an install (login).
    fn save<'a>(
        &'a self,
        token: &'a Token,
        lock: Option<&'a StoreLock>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Takes the refresh lock, waiting for another holder to finish.
    fn lock(&self) -> BoxFuture<'_, Result<StoreLock, StoreError>>;
    /// Releases the refresh lock. The default drops the guard.
    fn unlock(&self, lock: StoreLock) -> BoxFuture<'_, ()> {
        drop(lock);
        Box::pin(async {})
    }
    /// Issue 20: the store tells `watcher` whenever anyone (another process or
    /// replica, or another coordinator sharing this store) saved a token, so it can
    /// adopt it at once instead of reading the store at its next refresh. A store
    /// keeps a list of watchers and drops those whose `Weak` is dead. The default
    /// pushes nothing: coordinators then read the store as before.
    fn watch(&self, watcher: std::sync::Weak<dyn StoreWatcher>) {
        let _ = watcher;
    }
}

/// The default store: one token in this process's memory.
#[derive(Default)]
pub struct MemoryStore {
    token: Mutex<Option<Token>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Token::generation);
        f.debug_struct("MemoryStore")
            .field("generation", &generation)
            .finish()
    }
}

impl TokenStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        let token = self
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(async move { Ok(token) })
    }

    fn save<'a>(
        &'a self,
        token: &'a Token,
        _lock: Option<&'a StoreLock>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
        Box::pin(async { Ok(()) })
    }

    fn lock(&self) -> BoxFuture<'_, Result<StoreLock, StoreError>> {
        // One process: the coordinator's own single flight is the lock.
        Box::pin(async { Ok(StoreLock::none()) })
    }
}

/// Told by a [`TokenStore`] when anyone — another replica, another process, another
/// coordinator sharing the store — saved a token (issue 20). Coordinators register
/// themselves through [`TokenStore::watch`] when they are built, and adopt a pushed
/// token by the same rule as their unlocked read of the store: only a usable token
/// newer than the one they hold, never over a login not yet saved (C17).
pub trait StoreWatcher: Send + Sync {
    /// A token was saved to the store. Called from the store's own task or thread, or
    /// from the saving caller: it must not block or wait.
    fn token_saved(&self, token: Token);
}
