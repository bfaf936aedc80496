//! The one host-wide lock of sgfw.
//!
//! Every change to what enforces on this host holds it for its whole
//! duration: an apply of either backend *including* the removal of the
//! backend it replaces, and a teardown. So any interleaving of applies and
//! teardowns (from several `sgfw` processes, or an embedding emulator and
//! the CLI) ends with exactly one backend enforcing the model of the apply
//! that finished last, or with nothing when a teardown finished last — never
//! both, never neither after an apply, never a half switch.
//!
//! The lock is an exclusive `flock` on a file that is never unlinked (an
//! unlinked lock file would let a second process lock a fresh inode while
//! the first still holds the old one). The kernel releases it when the
//! holder exits, however it exits. This module must never be taken twice by
//! one call path: `flock` on a second descriptor of the same file would
//! wait for itself.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the lock lives: `/run` is a tmpfs that every boot empties, and the
/// lock means nothing across boots.
pub const HOST_LOCK_PATH: &str = "/run/sgfw/host.lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HostLockError {
    /// Creating the lock file or its directory failed.
    #[error("creating the host lock {path}")]
    Create {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `flock` failed.
    #[error("locking the host lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released on drop (or when the process ends).
#[derive(Debug)]
pub struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    /// Waits for and takes the host-wide lock at [`HOST_LOCK_PATH`].
    ///
    /// # Errors
    ///
    /// [`HostLockError`] when the file cannot be created or locked.
    pub fn acquire() -> Result<HostLock, HostLockError> {
        Self::acquire_at(Path::new(HOST_LOCK_PATH))
    }

    /// The same lock at another path (tests).
    ///
    /// # Errors
    ///
    /// [`HostLockError`] when the file cannot be created or locked.
    pub fn acquire_at(path: &Path) -> Result<HostLock, HostLockError> {
        let create = |source| HostLockError::Create {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(create)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(create)?;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(HostLock { _file: file });
            }
            let source = std::io::Error::last_os_error();
            if source.kind() != std::io::ErrorKind::Interrupted {
                return Err(HostLockError::Lock {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_for_the_first() {
        let dir = std::env::temp_dir().join(format!("sgfw-hostlock-{}", std::process::id()));
        let path = dir.join("host.lock");
        let first = HostLock::acquire_at(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let _second = HostLock::acquire_at(&path).unwrap();
            tx.send(()).unwrap();
        });
        // The second cannot get it while the first holds it.
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        drop(first);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
