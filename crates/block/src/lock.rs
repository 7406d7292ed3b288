//! Image locking with open-file-description (OFD) locks, byte-compatible with QEMU's
//! `file-posix` scheme: byte 100+N is held (shared) while permission N is in use, byte
//! 200+N is held while permission N is *not* shared with others. Permission 0 is
//! "consistent read", 1 is "write".
//!
//! So a Vessel writer conflicts with a running QEMU writer and vice versa, and readers of
//! a base image (e.g. backing files of running VMs) refuse writers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

/// Locking errors.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: cannot open for locking: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: failed to get {kind} lock: the image is in use by another process (is a VM running on it?)"
    )]
    Busy { path: PathBuf, kind: &'static str },
    #[error("{path}: locking failed: {source}")]
    Fcntl {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How an image is going to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read, and do not let anyone else write (backing files, read-only disks).
    Read,
    /// Read and write exclusively.
    Write,
}

/// A held image lock; released on drop (closing the descriptor drops the OFD locks).
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
    path: PathBuf,
    mode: LockMode,
}

fn flock_struct(ty: i32, byte: i64) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Is `byte` locked by another open file description?
fn test_byte(f: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock_struct(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and writes the valid `flock` struct we pass by pointer.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn lock_byte(f: &File, byte: i64) -> std::io::Result<bool> {
    let fl = flock_struct(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK only reads the valid `flock` struct we pass by pointer.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

impl ImageLock {
    /// Take the lock for `path` in `mode`.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock, LockError> {
        let file = File::open(path).map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let fcntl_err = |source| LockError::Fcntl {
            path: path.to_path_buf(),
            source,
        };
        let busy = |kind| LockError::Busy {
            path: path.to_path_buf(),
            kind,
        };
        // What we hold: read (and write) permission, and we never share write.
        let mut hold = vec![PERM_BASE + PERM_READ, SHARED_BASE + PERM_WRITE];
        if mode == LockMode::Write {
            hold.push(PERM_BASE + PERM_WRITE);
        }
        for &b in &hold {
            if !lock_byte(&file, b).map_err(fcntl_err)? {
                return Err(busy(if mode == LockMode::Write {
                    "write"
                } else {
                    "shared"
                }));
            }
        }
        // Conflicts: someone writes (we do not share write), or, when we write, someone
        // does not share write with us.
        if test_byte(&file, PERM_BASE + PERM_WRITE).map_err(fcntl_err)? {
            return Err(busy("shared \"write\""));
        }
        if mode == LockMode::Write
            && test_byte(&file, SHARED_BASE + PERM_WRITE).map_err(fcntl_err)?
        {
            return Err(busy("\"write\""));
        }
        Ok(ImageLock {
            _file: file,
            path: path.to_path_buf(),
            mode,
        })
    }

    /// The image locked.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it is locked.
    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let w = ImageLock::acquire(&p, LockMode::Write).unwrap();
        assert!(ImageLock::acquire(&p, LockMode::Write).is_err());
        assert!(ImageLock::acquire(&p, LockMode::Read).is_err());
        drop(w);
        let r1 = ImageLock::acquire(&p, LockMode::Read).unwrap();
        let _r2 = ImageLock::acquire(&p, LockMode::Read).unwrap();
        let e = ImageLock::acquire(&p, LockMode::Write).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(r1);
    }
}
