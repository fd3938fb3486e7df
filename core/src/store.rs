//! Where tokens live between requests and processes: the `TokenStore` trait and the
//! in-memory default. A store's refresh lock is what makes one flight span processes ([C1](crate#c1)).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};

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

/// Keeps the current token, and a refresh lock shared by everyone who uses the store.
///
/// The coordinator's flight is: [`lock`](Self::lock) → [`StoreGuard::load`] → adopt the
/// stored token if it is newer than the one being replaced (another process refreshed)
/// → else call the source → [`StoreGuard::save`] (before the lock is released and
/// before the token is handed out) → [`StoreGuard::unlock`]. Generations are assigned
/// as `max(stored, current) + 1`, so [C3](crate#c3) holds across processes.
///
/// Everything a holder of the lock needs lives in its [`StoreGuard`] (for a fenced
/// store, the lease it holds), not in the store: one store may be shared by any number
/// of coordinators, and clones of a store need not track who holds what.
///
/// The trait is object-safe.
pub trait TokenStore: Send + Sync {
    /// The stored token, if any, read without the lock (it may race a writer). The
    /// coordinator uses it before taking the lock (another process may have refreshed
    /// already) and to look for a login saved elsewhere.
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>>;
    /// Takes the refresh lock, waiting for another holder to finish. The guard is the
    /// only way to read-for-refresh and to save; fenced stores check their lease in it.
    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>>;
    /// The store tells `watcher` whenever anyone (another process or
    /// replica, or another coordinator sharing this store) saved a token, so it can
    /// adopt it at once instead of reading the store at its next refresh. A store
    /// keeps a list of watchers and drops those whose `Weak` is dead. The default
    /// pushes nothing: coordinators then read the store as before.
    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        let _ = watcher;
    }
}

/// Proof of holding a store's refresh lock, and the only way to save.
///
/// Dropping the guard releases the lock as well as it can without waiting (a fenced
/// store's lease lapses otherwise); [`unlock`](Self::unlock) releases it and waits.
pub trait StoreGuard: Send + Sync {
    /// The stored token, read under the lock. A fenced store refuses with
    /// [`StoreError::LeaseLost`] once this guard's lease lapsed, so a holder that lost
    /// the lock cannot go on to spend a refresh token another holder may have spent.
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>>;
    /// Stores `token`, replacing what is there. A fenced store refuses with
    /// [`StoreError::LeaseLost`] once this guard's lease lapsed, or when a token of the
    /// same or a newer generation is stored already, so a newer token is never
    /// overwritten.
    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Releases the lock and waits until it is released (or the store gave up; the
    /// lease then lapses).
    ///
    /// The returned future may be dropped before it completes (the flight's budget ran
    /// out, a caller of `install` was cancelled): the release must still happen — done
    /// synchronously before the future is returned, or started detached on the store's
    /// runtime (as the Redis store does) — or the lock stays held until its lease lapses
    /// and every other holder waits for nobody.
    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()>;
}

impl fmt::Debug for dyn StoreGuard {
    // A guard may hold a lease value or a file: show neither.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreGuard")
    }
}

/// The default store: one token in this process's memory.
///
/// Cheap to clone; clones share the token.
#[derive(Clone, Default)]
pub struct MemoryStore {
    token: Arc<Mutex<Option<Token>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self) -> Option<Token> {
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("generation", &self.get().as_ref().map(Token::generation))
            .finish()
    }
}

impl TokenStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        let token = self.get();
        Box::pin(async move { Ok(token) })
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        // One process: the coordinator's own single flight is the lock.
        let guard: Box<dyn StoreGuard> = Box::new(MemoryGuard {
            store: self.clone(),
        });
        Box::pin(async move { Ok(guard) })
    }
}

/// A [`MemoryStore`]'s guard: guards nothing beyond what the coordinator's single flight
/// already serialises.
struct MemoryGuard {
    store: MemoryStore,
}

impl StoreGuard for MemoryGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.store.load()
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        *self
            .store
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
        Box::pin(async { Ok(()) })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// Told by a [`TokenStore`] when anyone — another replica, another process, another
/// coordinator sharing the store — saved a token. Coordinators register
/// themselves through [`TokenStore::watch`] when they are built, and adopt a pushed
/// token by the same rule as their unlocked read of the store: only a usable token
/// newer than the one they hold, never over a login not yet saved ([C17](crate#c17)).
pub trait StoreWatcher: Send + Sync {
    /// A token was saved to the store. Called from the store's own task or thread, or
    /// from the saving caller: it must not block or wait.
    fn token_saved(&self, token: Token);
}

/// Stores are often shared (`Arc<RedisStore>`): an `Arc` of a store is a store.
impl<S: TokenStore + ?Sized> TokenStore for std::sync::Arc<S> {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        (**self).load()
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        (**self).lock()
    }

    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        (**self).watch(watcher)
    }
}

#[cfg(feature = "file-store")]
mod atomic_file;
#[cfg(feature = "file-store")]
mod file_lock;
#[cfg(feature = "file-store")]
mod file_store;
#[cfg(feature = "store-record")]
pub mod record;

#[cfg(feature = "file-store")]
pub use file_store::FileStore;

/// The bound on generations accepted from outside (a store, a push, a caller's token):
/// a stored token numbered at or above it is treated as corrupt — ignored, and
/// overwritten by the next save — so a hostile or damaged store cannot make
/// generations saturate (every new token would then equal the rejected one: a refresh
/// per request, forever). 2^53 itself is out of range because stores that compare
/// generations as doubles (the Redis store's Lua scripts) cannot tell it from 2^53 + 1.
///
/// ```
/// assert_eq!(tokenflight::store::MAX_GENERATION, 1 << 53);
/// ```
pub const MAX_GENERATION: u64 = 1 << 53;

impl StoreError {
    /// True for a configuration fault that retrying cannot fix (unsafe permissions
    /// or ownership): the coordinator does not retry it but requires attention, like a
    /// permanent refresh failure ([C9](crate#c9)). Every other store failure is
    /// retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Insecure(_))
    }
}

impl crate::error::RefreshError {
    /// A failure of the token store: permanent when the store says retrying cannot
    /// help (a configuration fault), transient otherwise.
    pub(crate) fn from_store(error: StoreError) -> Self {
        Self::new(
            error.is_permanent(),
            crate::error::Cause::Store,
            error.to_string(),
        )
        .with_source(error)
    }
}
