//! A token file that rotates the way platforms rotate it: a new workload token from the
//! testkit server every interval, put in place by atomic rename (kubelet's symlink swap
//! of a projected volume, a plain rename, or a writer that removes the file first).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::state::Shared;

/// How [`RotatingTokenFile`] puts a new token in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rotation {
    /// As kubelet updates a projected volume: `token` is a symlink to `..data/token`,
    /// `..data` a symlink to a timestamped directory; a rotation writes a new
    /// directory, points `..data_tmp` at it, renames `..data_tmp` over `..data` (the
    /// atomic step) and removes the old directory. The file is never absent.
    Kubelet,
    /// The new token is written to a temporary file renamed over the old one.
    Rename,
    /// The rename dance of a writer that removes the file first: the file is absent for
    /// `absent`, then the new one is renamed in.
    RemoveThenRename {
        /// How long the file is missing.
        absent: Duration,
    },
}

struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A token file in its own temporary directory, rotated by a helper thread until
/// dropped (made by [`TestServer::rotating_token_file`](super::TestServer::rotating_token_file)).
/// Its first token is in place when it is returned.
#[derive(Debug)]
pub struct RotatingTokenFile {
    dir: tempfile::TempDir,
    path: PathBuf,
    rotations: Arc<AtomicU64>,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl RotatingTokenFile {
    /// Writes a workload token living `lifetime`, then a new one every `every`, put in
    /// place as `rotation` says.
    ///
    /// # Panics
    /// If the temporary directory cannot be made or written (a broken test
    /// environment).
    pub(super) fn start(
        shared: Arc<Shared>,
        every: Duration,
        lifetime: Duration,
        rotation: Rotation,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("testkit: no temp dir: {e}"));
        let path = dir.path().join("token");
        let rotations = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.path().to_owned(),
            path: path.clone(),
            rotation,
            generation: 0,
        };
        let mut writer = writer;
        writer.put(&shared.update(|s| s.issue_workload_token(lifetime)));
        let control = Arc::new(Control {
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let thread = {
            let (control, rotations) = (control.clone(), rotations.clone());
            std::thread::Builder::new()
                .name("testkit-token-file".into())
                .spawn(move || {
                    loop {
                        // Waits out the interval unless told to stop: a timed wait on a
                        // condition variable, so dropping the file never waits for it.
                        let stop = control.stop.lock().unwrap_or_else(PoisonError::into_inner);
                        let (stop, _) = control
                            .wake
                            .wait_timeout_while(stop, every, |stop| !*stop)
                            .unwrap_or_else(PoisonError::into_inner);
                        if *stop {
                            return;
                        }
                        drop(stop);
                        writer.put(&shared.update(|s| s.issue_workload_token(lifetime)));
                        rotations.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .unwrap_or_else(|e| panic!("testkit: cannot spawn the token file thread: {e}"))
        };
        RotatingTokenFile {
            dir,
            path,
            rotations,
            control,
            thread: Some(thread),
        }
    }

    /// The token file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the file is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Rotations done so far (the first token written by `start` not counted).
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::SeqCst)
    }
}

impl Drop for RotatingTokenFile {
    fn drop(&mut self) {
        *self
            .control
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.control.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    dir: PathBuf,
    path: PathBuf,
    rotation: Rotation,
    generation: u64,
}

impl Writer {
    /// Puts `token` in place. Failures panic the helper thread: the test then sees a
    /// file that stops rotating, and the panic message says why.
    fn put(&mut self, token: &str) {
        self.generation += 1;
        let io = |what: &str, e: std::io::Error| -> ! { panic!("testkit: token file {what}: {e}") };
        match self.rotation {
            Rotation::Kubelet => {
                let version = self.dir.join(format!("..{:06}", self.generation));
                std::fs::create_dir(&version).unwrap_or_else(|e| io("mkdir", e));
                std::fs::write(version.join("token"), token).unwrap_or_else(|e| io("write", e));
                let data = self.dir.join("..data");
                let old = std::fs::read_link(&data).ok();
                let tmp = self.dir.join("..data_tmp");
                symlink(Path::new(version.file_name().unwrap_or_default()), &tmp);
                std::fs::rename(&tmp, &data).unwrap_or_else(|e| io("rename", e));
                if !self.path.exists() {
                    symlink(Path::new("..data/token"), &self.path);
                }
                if let Some(old) = old {
                    let _ = std::fs::remove_dir_all(self.dir.join(old));
                }
            }
            Rotation::Rename | Rotation::RemoveThenRename { .. } => {
                let tmp = self.dir.join(".token.tmp");
                std::fs::write(&tmp, token).unwrap_or_else(|e| io("write", e));
                if let Rotation::RemoveThenRename { absent } = self.rotation {
                    if self.generation > 1 {
                        std::fs::remove_file(&self.path).unwrap_or_else(|e| io("remove", e));
                        std::thread::sleep(absent);
                    }
                }
                std::fs::rename(&tmp, &self.path).unwrap_or_else(|e| io("rename", e));
            }
        }
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("testkit: token file symlink: {e}"));
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) {
    // No symlinks: a copy stands in (the rotation is then a plain rename).
    let _ = (target, link);
    panic!("testkit: Rotation::Kubelet needs symbolic links (Unix)");
}
