//! Private files replaced atomically: what [`FileStore`](crate::FileStore) needs from the
//! file system, apart from its lock.
//!
//! A replacement writes a temporary file in the same directory, fsyncs it, renames it
//! over the target and fsyncs the directory: readers see the old content or the new,
//! never half of one, even across a crash. Files are created with mode 0600; an existing
//! file that group or others can read or write is refused (Unix).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::StoreError;

/// Replaces the file at `path` with `bytes` atomically (see the module docs).
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(temp_name(path));
    let written = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    sync_dir(&dir)?;
    Ok(())
}

/// Which file was read, to notice a rename over it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
}

impl FileIdentity {
    pub(crate) fn of(metadata: &fs::Metadata) -> Self {
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

    pub(crate) fn of_path(path: &Path) -> io::Result<Self> {
        fs::metadata(path).map(|m| Self::of(&m))
    }
}

/// Refuses anything but a regular file that only its owner can access.
#[cfg(unix)]
pub(crate) fn check_private(path: &Path, metadata: &fs::Metadata) -> Result<(), StoreError> {
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

/// Refuses anything but a regular file.
#[cfg(not(unix))]
pub(crate) fn check_private(path: &Path, metadata: &fs::Metadata) -> Result<(), StoreError> {
    if metadata.is_file() {
        Ok(())
    } else {
        Err(StoreError::Insecure(format!(
            "{} is not a regular file",
            path.display()
        )))
    }
}

/// Opens with `options`, creating the file with mode 0600 (Unix).
pub(crate) fn open_private(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
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
