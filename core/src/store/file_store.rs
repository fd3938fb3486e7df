//! `FileStore`: one token in a file (a [`record`](crate::store::record)), shared by the
//! processes of one machine. The lock is in `file_lock`, the atomic replacement and the
//! privacy checks in `atomic_file`.
//!
//! - **Atomic replace.** A save writes a temporary file in the same directory, fsyncs
//!   it, renames it over the store file and fsyncs the directory: readers see the old
//!   token or the new one, never half of one, even across a crash.
//! - **Private.** Files are created with mode 0600; an existing file that group or
//!   others can read or write is refused with [`StoreError::Insecure`] (Unix).
//! - **Cross-process refresh lock.** [`TokenStore::lock`] takes an OS advisory lock
//!   (`flock`) on a sidecar file `<path>.lock`. The OS drops it when the holder's
//!   process dies, so a killed process never leaves a stale lock. The sidecar is never
//!   deleted (deleting lock files reintroduces races). Waiting for a lock held by
//!   another process happens on a short-lived helper thread that polls with backoff, so
//!   no executor thread blocks; the wait is bounded ([`StoreError::LockTimeout`]).
//! - **Corruption is kept.** A file that cannot be decoded gives
//!   [`StoreError::Corrupt`] and is renamed to `<path>.corrupt-<unix millis>` for
//!   inspection: it is never silently overwritten.
//!
//! Loads and saves do their (small, local) file I/O inline when polled.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use super::atomic_file::{self, FileIdentity, check_private};
use super::file_lock::{self, FileLock};
use super::record::{self, DecodeError};
use crate::store::{StoreError, StoreGuard, TokenStore};
use crate::token::Token;

/// A token file is a few hundred bytes; anything much larger is not ours.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// A [`TokenStore`] in a file, shared by processes on one machine (see the module docs).
///
/// Any number of coordinators may share one `FileStore` (or its clones): each
/// [`lock`](TokenStore::lock) opens the lock file anew and its guard holds the OS lock,
/// so coordinators in one process contend for it exactly as processes do. Saves happen
/// only through a guard, under the lock. The token is stored as a
/// [`record`](crate::store::record); files written in the earlier format still load.
///
/// ```no_run
/// use tokenflight::store::FileStore;
/// let store = FileStore::new("/run/user/1000/myapp/token.json");
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct FileStore {
    path: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// A store in the file at `path` (created on the first save; its directory must
    /// exist), with the refresh lock on `<path>.lock`.
    ///
    /// ```
    /// use tokenflight::store::FileStore;
    /// let store = FileStore::new("/var/lib/my-app/token.json");
    /// assert_eq!(store.path(), std::path::Path::new("/var/lib/my-app/token.json"));
    /// assert_eq!(store.lock_path(), std::path::Path::new("/var/lib/my-app/token.json.lock"));
    /// ```
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        FileStore {
            path,
            lock_path: PathBuf::from(lock_path),
            lock_timeout: Duration::from_secs(30),
        }
    }

    /// How long [`TokenStore::lock`] waits for another holder (default 30 s). The
    /// coordinator's refresh timeout bounds the wait too.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::store::FileStore;
    /// let store = FileStore::new("token.json").lock_timeout(Duration::from_secs(5));
    /// assert!(format!("{store:?}").contains("5s"));
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The token file.
    ///
    /// ```
    /// use tokenflight::store::FileStore;
    /// let dir = std::env::temp_dir();
    /// assert_eq!(FileStore::new(dir.join("token.json")).path(), dir.join("token.json"));
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sidecar file the refresh lock is taken on.
    ///
    /// ```
    /// use tokenflight::store::FileStore;
    /// let store = FileStore::new("state/token.json");
    /// assert_eq!(store.lock_path(), std::path::Path::new("state/token.json.lock"));
    /// ```
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    fn load_now(&self) -> Result<Option<Token>, StoreError> {
        // A save may replace the file between reading and moving a corrupt one aside;
        // then read again rather than move a good file away.
        for _ in 0..3 {
            match self.read()? {
                Read::Missing => return Ok(None),
                Read::Token(token) => return Ok(Some(token)),
                Read::Newer(version) => return Err(newer_format(version)),
                Read::Corrupt { reason, identity } => {
                    if FileIdentity::of_path(&self.path).ok() == Some(identity) {
                        return Err(self.move_aside(&reason).map_or_else(
                            |e| {
                                StoreError::Corrupt(format!(
                                    "{reason}; moving it aside failed ({e}), it was left in place"
                                ))
                            },
                            |aside| {
                                StoreError::Corrupt(format!(
                                    "{reason}; the file was moved to {}",
                                    aside.display()
                                ))
                            },
                        ));
                    }
                }
            }
        }
        Err(StoreError::Corrupt(
            "token file kept changing while being read".into(),
        ))
    }

    fn read(&self) -> Result<Read, StoreError> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(e.into()),
        };
        let metadata = file.metadata()?;
        check_private(&self.path, &metadata)?;
        let mut bytes = Vec::new();
        io::Read::take(&mut file, MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        let identity = FileIdentity::of(&metadata);
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Ok(Read::Corrupt {
                reason: format!("larger than {MAX_FILE_BYTES} bytes"),
                identity,
            });
        }
        Ok(match record::decode(&bytes) {
            Ok(token) => Read::Token(token),
            Err(DecodeError::Newer(version)) => Read::Newer(version),
            Err(error) => Read::Corrupt {
                reason: error.to_string(),
                identity,
            },
        })
    }

    /// Renames the corrupt file to `<path>.corrupt-<unix millis>` and says where.
    fn move_aside(&self, reason: &str) -> io::Result<PathBuf> {
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let with_suffix = |suffix: String| {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            PathBuf::from(name)
        };
        let mut aside = with_suffix(format!(".corrupt-{millis}"));
        let mut n = 1;
        while aside.exists() {
            aside = with_suffix(format!(".corrupt-{millis}-{n}"));
            n += 1;
        }
        fs::rename(&self.path, &aside)?;
        tracing::warn!(path = %self.path.display(), kept = %aside.display(), %reason, "corrupt token file moved aside");
        Ok(aside)
    }

    fn save_now(&self, token: &Token) -> Result<(), StoreError> {
        // What is there must be ours to replace: private, and not a corrupt or newer
        // file that would be lost.
        match self.read()? {
            Read::Missing | Read::Token(_) => {}
            Read::Newer(version) => return Err(newer_format(version)),
            Read::Corrupt { reason, .. } => {
                self.move_aside(&reason).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "{reason}; not replaced because moving it aside failed ({e})"
                    ))
                })?;
            }
        }
        let bytes = record::encode(token)?;
        atomic_file::replace(&self.path, &bytes)
    }
}

enum Read {
    Missing,
    Token(Token),
    Newer(u32),
    Corrupt {
        reason: String,
        identity: FileIdentity,
    },
}

fn newer_format(version: u32) -> StoreError {
    StoreError::Corrupt(format!(
        "token file format {version} is newer than this library's ({}); left untouched",
        record::FORMAT
    ))
}

impl TokenStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        Box::pin(async move { self.load_now() })
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        Box::pin(async move {
            let lock = file_lock::acquire(&self.lock_path, self.lock_timeout).await?;
            let guard: Box<dyn StoreGuard> = Box::new(FileGuard {
                store: self.clone(),
                _lock: lock,
            });
            Ok(guard)
        })
    }
}

/// A [`FileStore`]'s guard: holds the OS lock until it is unlocked or dropped. The OS
/// keeps the lock for as long as the file is open, so there is no lease to lose.
struct FileGuard {
    store: FileStore,
    _lock: FileLock,
}

impl StoreGuard for FileGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        Box::pin(async move { self.store.load_now() })
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store.save_now(token) })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        // Closing the lock file releases the OS lock.
        drop(self);
        Box::pin(async {})
    }
}
