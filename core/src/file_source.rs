//! A token read from a file that the platform rotates: a Kubernetes projected
//! service-account token, a cloud workload identity token, a sidecar's output.
//!
//! The file is looked at only when the coordinator asks for a token (at refresh time,
//! never per request), and read again only when its metadata changed — its length,
//! modification time or (on Unix) device and inode: kubelet rotates by atomic rename,
//! which always gives a new inode. No watcher thread, no runtime ([C14](crate#c14)).

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use crate::error::RefreshError;
use crate::jwt::{self, JwtError};
use crate::source::{RefreshContext, TokenSource};
use crate::token::{Secret, Token};

/// Token files larger than this are refused as malformed (a JWT is a few KiB).
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Why a token file gave no token. Attached as the [`source`](std::error::Error::source)
/// of the [`RefreshError`]; never contains the file's contents.
///
/// Every kind is *transient*: the platform may be rotating the file (a missing file in
/// the middle of a rename), or may fix it, and a new login cannot help. The coordinator
/// retries and backs off ([C16](crate#c16)); an unchanged file is not read again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileSourceError {
    /// The file does not exist (yet, or for the moment of a rotation) and no token read
    /// from it earlier is still valid.
    #[error("token file missing")]
    Missing,
    /// The file exists but cannot be read (permissions, a directory, an I/O error).
    #[error("token file unreadable: {0}")]
    Unreadable(String),
    /// The contents are not a token: empty, not UTF-8, whitespace or control characters
    /// inside, too large, or a JWT whose claims cannot be read.
    #[error("token file malformed: {0}")]
    Malformed(String),
    /// The file holds a JWT whose `exp` has passed, and it has not been rotated since.
    #[error("the token in the file has expired and the file was not rotated")]
    Expired,
}

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            dev: metadata.dev(),
            #[cfg(unix)]
            ino: metadata.ino(),
        }
    }
}

/// The last version read: its stamp and what it held.
struct Cached {
    stamp: Stamp,
    contents: Result<Contents, FileSourceError>,
}

#[derive(Clone)]
struct Contents {
    access: Secret,
    /// The JWT's `exp`, if the token is a JWT that has one.
    exp: Option<SystemTime>,
}

/// A [`TokenSource`] that reads its token from a file the platform rotates.
///
/// The file is looked at only when the coordinator asks for a token (at refresh time,
/// never per request), and read again only when its metadata changed — its length,
/// modification time or (on Unix) device and inode: kubelet rotates by atomic rename,
/// which always gives a new inode. No watcher thread, no runtime ([C14](crate#c14)).
/// The read is a small local one, done inline.
///
/// The token's expiry is the JWT `exp` when the file holds a JWT, otherwise the
/// configured [`lifetime`](Self::lifetime) counted from when the file was looked at
/// (an opaque token without one has no known expiry: it is used until a server
/// rejects it). Each token is marked as obtained when the file was looked at, so a
/// file that has not been rotated yet is looked at again at most once per
/// `min_refresh_interval` ([C15](crate#c15)), and only its metadata.
///
/// Use it directly (the file's token as a bearer token) or as the subject of a token
/// exchange, through its own coordinator
/// ([`TokenExchangeGrant`](crate::oauth2::TokenExchangeGrant)).
///
/// ```
/// use tokenflight::sources::FileTokenSource;
/// use tokenflight::{RefreshContext, RefreshReason, TokenSource};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("token");
/// std::fs::write(&path, "opaque-token\n").unwrap();
/// let source = FileTokenSource::new(&path).lifetime(std::time::Duration::from_secs(60));
/// let cx = || RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
/// let token = futures::executor::block_on(source.fetch(cx())).unwrap();
/// assert_eq!(token.access().expose(), "opaque-token");
/// // Unchanged: looked at again, not read again.
/// futures::executor::block_on(source.fetch(cx())).unwrap();
/// assert_eq!(source.reads(), 1);
/// ```
pub struct FileTokenSource {
    path: PathBuf,
    lifetime: Option<Duration>,
    cached: Mutex<Option<Cached>>,
    reads: AtomicU64,
    checks: AtomicU64,
    missing: AtomicU64,
}

impl fmt::Debug for FileTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTokenSource")
            .field("path", &self.path)
            .field("lifetime", &self.lifetime)
            .field("reads", &self.reads())
            .finish_non_exhaustive()
    }
}

impl FileTokenSource {
    /// A source reading `path` (symbolic links are followed, as kubelet's projected
    /// volumes need).
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileTokenSource {
            path: path.as_ref().to_owned(),
            lifetime: None,
            cached: Mutex::new(None),
            reads: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            missing: AtomicU64::new(0),
        }
    }

    /// How long a token that carries no `exp` of its own (an opaque token, or a JWT
    /// without the claim) counts as valid after the file was looked at; the file is
    /// looked at again after that.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was read (opened and its contents parsed): once per
    /// version of the file that a refresh saw.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// How many times the file's metadata was looked at (every fetch).
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// How many times the file was found missing (a rotation's rename dance, or a
    /// platform that has not written it yet).
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Relaxed)
    }

    /// The token the file holds now, as [`fetch`](TokenSource::fetch) gives it: reads
    /// the file only if its metadata changed since the last read.
    ///
    /// A file missing for a moment (a writer that removes it before renaming the new
    /// one in) is no failure while the token last read from it is still valid: that
    /// token is handed out again, and the file looked at again on the next refresh.
    pub fn current(&self, now: SystemTime) -> Result<Token, RefreshError> {
        let contents = match self.contents() {
            Err(FileSourceError::Missing) => {
                self.missing.fetch_add(1, Ordering::Relaxed);
                self.last_good().ok_or(FileSourceError::Missing)
            }
            other => other,
        };
        contents
            .and_then(|contents| self.token(contents, now))
            .map_err(|error| RefreshError::transient(error.to_string()).with_source(error))
    }

    /// What the last read gave, if it was a token.
    fn last_good(&self) -> Option<Contents> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached.as_ref().and_then(|c| c.contents.clone().ok())
    }

    fn contents(&self) -> Result<Contents, FileSourceError> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let stamp = std::fs::metadata(&self.path)
            .map(|metadata| Stamp::of(&metadata))
            .map_err(io_error)?;
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cached.as_ref().filter(|c| c.stamp == stamp) {
            return cached.contents.clone();
        }
        // The stamp kept is the one of the file actually read (its open handle), so a
        // rotation between the look and the read is noticed on the next fetch.
        let (stamp, contents) = self.read()?;
        *cached = Some(Cached {
            stamp,
            contents: contents.clone(),
        });
        contents
    }

    fn read(&self) -> Result<(Stamp, Result<Contents, FileSourceError>), FileSourceError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let file = std::fs::File::open(&self.path).map_err(io_error)?;
        let stamp = Stamp::of(&file.metadata().map_err(io_error)?);
        if stamp.len > MAX_TOKEN_FILE_BYTES {
            return Ok((stamp, Err(malformed("larger than 64 KiB"))));
        }
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        file.take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        Ok((stamp, parse(&bytes)))
    }

    fn token(&self, contents: Contents, now: SystemTime) -> Result<Token, FileSourceError> {
        let token = Token::new(contents.access).obtained_at(now);
        match (contents.exp, self.lifetime) {
            (Some(exp), _) if exp <= now => Err(FileSourceError::Expired),
            (Some(exp), _) => Ok(token.expires_at(exp)),
            (None, Some(lifetime)) => Ok(token.expires_in(lifetime, now)),
            (None, None) => Ok(token),
        }
    }
}

impl TokenSource for FileTokenSource {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        // A small local read: done inline, as a runtime-free source must.
        let result = self.current(cx.now);
        Box::pin(std::future::ready(result))
    }
}

fn io_error(error: std::io::Error) -> FileSourceError {
    match error.kind() {
        std::io::ErrorKind::NotFound => FileSourceError::Missing,
        kind => FileSourceError::Unreadable(kind.to_string()),
    }
}

fn malformed(why: &str) -> FileSourceError {
    FileSourceError::Malformed(why.to_owned())
}

/// The file's token: its contents without surrounding whitespace (a trailing newline is
/// common), and its `exp` when it is a JWT.
fn parse(bytes: &[u8]) -> Result<Contents, FileSourceError> {
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(malformed("empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed(
            "whitespace or control characters inside the token",
        ));
    }
    let exp = match jwt::time_claims(token) {
        Ok(claims) => claims.exp,
        // Not three segments, or a first segment that is no JSON header: an opaque token.
        Err(JwtError::NotAJwt)
        | Err(JwtError::Base64 { segment: "header" })
        | Err(JwtError::Json { segment: "header" }) => None,
        Err(error) => return Err(FileSourceError::Malformed(error.to_string())),
    };
    Ok(Contents {
        access: Secret::new(token),
        exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn jwt(exp: u64) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b64.encode(r#"{"alg":"RS256"}"#),
            b64.encode(format!(r#"{{"exp":{exp}}}"#))
        )
    }

    fn secs(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_jwt_expires_at_its_exp_and_is_read_once_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{}\n", jwt(2_000))).unwrap();
        let source = FileTokenSource::new(&path);
        let token = source.current(secs(1_000)).unwrap();
        assert_eq!(token.expiry(), Some(secs(2_000)));
        assert_eq!(token.obtained(), Some(secs(1_000)));
        source.current(secs(1_001)).unwrap();
        assert_eq!((source.reads(), source.checks()), (1, 2));
        // Rotation by atomic rename: a new inode, read once.
        let next = dir.path().join("token.next");
        std::fs::write(&next, jwt(3_000)).unwrap();
        std::fs::rename(&next, &path).unwrap();
        let token = source.current(secs(1_500)).unwrap();
        assert_eq!(token.expiry(), Some(secs(3_000)));
        assert_eq!(source.reads(), 2);
    }

    #[test]
    fn missing_unreadable_malformed_and_expired_are_typed_and_transient() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = FileTokenSource::new(&path);
        let kind = |source: &FileTokenSource, now| {
            let error = source.current(now).unwrap_err();
            assert!(error.is_retryable(), "{error}");
            std::error::Error::source(&error)
                .and_then(|e| e.downcast_ref::<FileSourceError>())
                .cloned()
                .unwrap()
        };
        assert_eq!(kind(&source, secs(1)), FileSourceError::Missing);
        for bad in ["", " \n", "a b", "\u{0}x"] {
            std::fs::write(&path, bad).unwrap();
            let source = FileTokenSource::new(&path);
            assert!(
                matches!(kind(&source, secs(1)), FileSourceError::Malformed(_)),
                "{bad:?}"
            );
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            kind(&FileTokenSource::new(&path), secs(1)),
            FileSourceError::Malformed(_)
        ));
        // A JWT whose claims are broken is malformed, and the message shows no token.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let broken = format!(
            "{}.{}.sig",
            b64.encode(r#"{"alg":"RS256"}"#),
            b64.encode(r#"{"exp":"soon"}"#)
        );
        std::fs::write(&path, &broken).unwrap();
        let source = FileTokenSource::new(&path);
        let error = source.current(secs(1)).unwrap_err();
        assert!(!error.to_string().contains(&broken));
        assert!(matches!(
            kind(&source, secs(1)),
            FileSourceError::Malformed(_)
        ));
        // The broken version is not read again while it stays.
        assert_eq!(source.reads(), 1);
        std::fs::write(&path, jwt(10)).unwrap();
        assert_eq!(
            kind(&FileTokenSource::new(&path), secs(10)),
            FileSourceError::Expired
        );
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        assert!(matches!(
            kind(&FileTokenSource::new(dir.path().join("dir")), secs(1)),
            FileSourceError::Unreadable(_)
        ));
    }

    #[test]
    fn a_file_missing_for_a_moment_hands_out_the_last_valid_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, jwt(2_000)).unwrap();
        let source = FileTokenSource::new(&path);
        source.current(secs(1_000)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let token = source.current(secs(1_100)).unwrap();
        assert_eq!(token.expiry(), Some(secs(2_000)));
        assert_eq!(source.missing(), 1);
        // Once that token has expired, a missing file is the typed error.
        let error = source.current(secs(2_000)).unwrap_err();
        assert!(error.is_retryable());
        std::fs::write(&path, jwt(3_000)).unwrap();
        assert_eq!(
            source.current(secs(2_001)).unwrap().expiry(),
            Some(secs(3_000))
        );
    }

    #[test]
    fn an_opaque_token_lives_the_configured_lifetime_from_each_look() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "two.dots.opaque").unwrap();
        let source = FileTokenSource::new(&path).lifetime(Duration::from_secs(60));
        assert_eq!(source.current(secs(100)).unwrap().expiry(), Some(secs(160)));
        assert_eq!(source.current(secs(150)).unwrap().expiry(), Some(secs(210)));
        assert_eq!(source.reads(), 1);
        let no_lifetime = FileTokenSource::new(&path);
        assert_eq!(no_lifetime.current(secs(1)).unwrap().expiry(), None);
    }

    #[test]
    fn c12_debug_never_shows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "file-secret").unwrap();
        let source = FileTokenSource::new(&path);
        let token = source.current(secs(1)).unwrap();
        assert!(!format!("{source:?} {token:?}").contains("file-secret"));
    }
}
