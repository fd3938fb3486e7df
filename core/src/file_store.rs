//! `FileStore`: one token in a JSON file, shared by the processes of one machine.
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
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::store::{StoreError, StoreLock, TokenStore};
use crate::token::{Secret, Token};

/// The on-disk format this version writes and reads.
const FORMAT_VERSION: u32 = 1;
/// A token file is a few hundred bytes; anything much larger is not ours.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Polling backoff while another process holds the refresh lock.
const LOCK_POLL_START: Duration = Duration::from_millis(2);
const LOCK_POLL_MAX: Duration = Duration::from_millis(50);

/// A [`TokenStore`] in a file, shared by processes on one machine (see the module docs).
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
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The token file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sidecar file the refresh lock is taken on.
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
                    if identity_of(&self.path).ok() == Some(identity) {
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
        Ok(match decode(&bytes) {
            Ok(token) => Read::Token(token),
            Err(Decode::Newer(version)) => Read::Newer(version),
            Err(Decode::Corrupt(reason)) => Read::Corrupt { reason, identity },
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
        let bytes = encode(token)?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(temp_name(&self.path));
        let written = write_synced(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        sync_dir(&dir)?;
        Ok(())
    }

    fn open_lock_file(&self) -> io::Result<File> {
        open_private(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            &self.lock_path,
        )
    }
}

/// The guard inside the [`StoreLock`] a [`FileStore`] hands out. Dropping it closes the
/// lock file, which releases the OS lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
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

/// Which file was read, to notice a rename over it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
}

impl FileIdentity {
    fn of(metadata: &fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            FileIdentity {
                dev: metadata.dev(),
                ino: metadata.ino(),
                len: metadata.len(),
            }
        }
        #[cfg(not(unix))]
        {
            FileIdentity {
                dev: 0,
                ino: 0,
                len: metadata.len(),
            }
        }
    }
}

fn identity_of(path: &Path) -> io::Result<FileIdentity> {
    fs::metadata(path).map(|m| FileIdentity::of(&m))
}

fn newer_format(version: u32) -> StoreError {
    StoreError::Corrupt(format!(
        "token file format {version} is newer than this library's ({FORMAT_VERSION}); left untouched"
    ))
}

#[cfg(unix)]
fn check_private(path: &Path, metadata: &fs::Metadata) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    if !metadata.is_file() {
        return Err(StoreError::Insecure(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Insecure(format!(
            "{} has mode {mode:o}: group or others can access it; run `chmod 600` on it",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(path: &Path, metadata: &fs::Metadata) -> Result<(), StoreError> {
    if metadata.is_file() {
        Ok(())
    } else {
        Err(StoreError::Insecure(format!(
            "{} is not a regular file",
            path.display()
        )))
    }
}

fn open_private(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

fn temp_name(path: &Path) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "token".into(), |n| n.to_string_lossy());
    format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = open_private(OpenOptions::new().write(true).create_new(true), path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    // Makes the rename itself durable. Only Unix lets a directory be opened and synced.
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Tries to take the OS lock without blocking: `Ok(false)` when someone holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // Fully qualified: std's inherent `File::try_lock` (Rust 1.89+) would shadow it.
    match fs4::FileExt::try_lock(file) {
        Ok(()) => Ok(true),
        Err(fs4::TryLockError::WouldBlock) => Ok(false),
        Err(fs4::TryLockError::Error(e)) => Err(e),
    }
}

/// Polls for the lock on a helper thread until `deadline`, or until the waiting task
/// goes away (the receiver is dropped).
fn poll_lock(
    file: File,
    deadline: Instant,
    waiter: &futures_channel::oneshot::Sender<Result<FileLock, StoreError>>,
) -> Result<FileLock, StoreError> {
    let mut pause = LOCK_POLL_START;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(StoreError::LockTimeout);
        }
        std::thread::sleep(pause.min(deadline - now));
        if waiter.is_canceled() {
            // Nobody waits any more; what is returned is dropped unseen.
            return Err(StoreError::LockTimeout);
        }
        if try_lock(&file)? {
            return Ok(FileLock { _file: file });
        }
        pause = (pause * 2).min(LOCK_POLL_MAX);
    }
}

impl TokenStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        Box::pin(async move { self.load_now() })
    }

    fn save<'a>(
        &'a self,
        token: &'a Token,
        _lock: Option<&'a StoreLock>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.save_now(token) })
    }

    fn lock(&self) -> BoxFuture<'_, Result<StoreLock, StoreError>> {
        Box::pin(async move {
            let file = self.open_lock_file()?;
            if try_lock(&file)? {
                return Ok(StoreLock::new(FileLock { _file: file }));
            }
            // Held by another process (or another store in this one): wait on a helper
            // thread so no executor thread blocks.
            let deadline = Instant::now()
                .checked_add(self.lock_timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
            let (tx, rx) = futures_channel::oneshot::channel();
            std::thread::Builder::new()
                .name("tokenflight-file-lock".into())
                .spawn(move || {
                    let result = poll_lock(file, deadline, &tx);
                    // If the waiter left, the lock is dropped (released) right here.
                    let _ = tx.send(result);
                })?;
            match rx.await {
                Ok(result) => result.map(StoreLock::new),
                Err(_) => Err(StoreError::Other("the lock helper thread ended".into())),
            }
        })
    }
}

// ---- on-disk format -------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    token: StoredToken,
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<UnixTime>,
    /// When the token was obtained (its lifetime scales the refresh timing, [C15](crate#c15)).
    /// Optional and additive: records written before it existed still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    obtained_at: Option<UnixTime>,
    generation: u64,
}

#[derive(Serialize, Deserialize)]
struct UnixTime {
    secs: u64,
    nanos: u32,
}

enum Decode {
    Newer(u32),
    Corrupt(String),
}

fn encode(token: &Token) -> Result<Vec<u8>, StoreError> {
    let on_disk = OnDisk {
        format: FORMAT_VERSION,
        token: StoredToken {
            access: token.access().expose().to_owned(),
            refresh: token.refresh().map(|r| r.expose().to_owned()),
            // A time before the epoch is long expired: stored as the epoch.
            expires_at: token.expiry().map(unix_time),
            obtained_at: token.obtained().map(unix_time),
            generation: token.generation(),
        },
    };
    let mut bytes = serde_json::to_vec_pretty(&on_disk).map_err(|e| {
        StoreError::Other(format!("encoding the token failed: {}", describe(&e)).into())
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn unix_time(at: SystemTime) -> UnixTime {
    // A time before the epoch is long past: stored as the epoch.
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    UnixTime {
        secs: since.as_secs(),
        nanos: since.subsec_nanos(),
    }
}

fn decode(bytes: &[u8]) -> Result<Token, Decode> {
    let format: FormatOnly =
        serde_json::from_slice(bytes).map_err(|e| Decode::Corrupt(describe(&e)))?;
    if format.format > FORMAT_VERSION {
        return Err(Decode::Newer(format.format));
    }
    if format.format != FORMAT_VERSION {
        return Err(Decode::Corrupt(format!(
            "unknown format version {}",
            format.format
        )));
    }
    let on_disk: OnDisk =
        serde_json::from_slice(bytes).map_err(|e| Decode::Corrupt(describe(&e)))?;
    let stored = on_disk.token;
    let mut token = Token::new(Secret::new(stored.access))
        .with_refresh_opt(stored.refresh.map(Secret::new))
        .with_generation(stored.generation);
    if let Some(at) = stored.expires_at {
        token = token.expires_at(system_time(at, "expires_at")?);
    }
    if let Some(at) = stored.obtained_at {
        token = token.obtained_at(system_time(at, "obtained_at")?);
    }
    Ok(token)
}

fn system_time(at: UnixTime, field: &str) -> Result<SystemTime, Decode> {
    if at.nanos >= 1_000_000_000 {
        return Err(Decode::Corrupt(format!("{field}.nanos out of range")));
    }
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::new(at.secs, at.nanos))
        .ok_or_else(|| Decode::Corrupt(format!("{field} out of range")))
}

/// serde_json's messages can quote the offending value (a secret, in this file): only
/// say what kind of problem it was and where.
fn describe(error: &serde_json::Error) -> String {
    let what = match error.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected JSON structure",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new("access-SECRET")
            .with_refresh("refresh-SECRET")
            .expires_at(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123))
            .obtained_at(SystemTime::UNIX_EPOCH + Duration::new(1_699_999_000, 5))
            .with_generation(7)
    }

    #[test]
    fn c15_records_written_before_obtained_at_existed_still_load() {
        // Byte for byte what the first release wrote (no `obtained_at`).
        let old = br#"{
  "format": 1,
  "token": {
    "access": "a",
    "expires_at": { "secs": 1700000000, "nanos": 0 },
    "generation": 3
  }
}
"#;
        let token = decode(old).ok().unwrap();
        assert_eq!(token.generation(), 3);
        assert_eq!(token.obtained(), None);
        assert_eq!(
            token.expiry(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let bytes = encode(&token()).unwrap();
        let decoded = decode(&bytes).ok().unwrap();
        assert_eq!(decoded, token());
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"format\": 1"), "{text}");
    }

    #[test]
    fn c12_corruption_messages_never_quote_values() {
        let bytes =
            br#"{"format":1,"token":{"access":"ok","refresh":"ok","generation":"refresh-SECRET"}}"#;
        let Err(Decode::Corrupt(reason)) = decode(bytes) else {
            panic!("expected corrupt");
        };
        assert!(!reason.contains("SECRET"), "{reason}");
        assert!(reason.contains("unexpected JSON structure"), "{reason}");
    }

    #[test]
    fn versions() {
        assert!(matches!(
            decode(br#"{"format":2,"token":null}"#),
            Err(Decode::Newer(2))
        ));
        assert!(matches!(
            decode(br#"{"format":0}"#),
            Err(Decode::Corrupt(_))
        ));
        assert!(matches!(decode(b""), Err(Decode::Corrupt(_))));
        assert!(matches!(
            decode(br#"{"format":1,"token":{"access":"a","generation":1,"expires_at":{"secs":1,"nanos":1000000000}}}"#),
            Err(Decode::Corrupt(_))
        ));
    }

    #[test]
    fn pre_epoch_expiry_is_stored_as_the_epoch() {
        let token = Token::new("a").expires_at(SystemTime::UNIX_EPOCH - Duration::from_secs(5));
        let decoded = decode(&encode(&token).unwrap()).ok().unwrap();
        assert_eq!(decoded.expiry(), Some(SystemTime::UNIX_EPOCH));
    }

    proptest::proptest! {
        #[test]
        fn c13_decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn c13_decode_never_panics_on_near_misses(
            generation in proptest::prelude::any::<i128>(),
            secs in proptest::prelude::any::<i128>(),
            nanos in proptest::prelude::any::<i64>(),
        ) {
            let text = format!(r#"{{"format":1,"token":{{"access":"a","generation":{generation},"expires_at":{{"secs":{secs},"nanos":{nanos}}}}}}}"#);
            let _ = decode(text.as_bytes());
        }
    }
}
