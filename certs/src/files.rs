//! File helpers that keep secrets private: directories 0700, secret files 0600 from the
//! moment they exist (never chmod after the fact), atomic replacement by rename, and an
//! advisory lock shared by the CLI and a running server.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::StoreError;

/// Creates `dir` (and parents) with mode 0700, or tightens nothing if it exists but
/// refuses one that others can read or write.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io(dir, e))?;
    check_private(dir)
}

/// Refuses a file or directory whose mode grants any access to group or others.
pub(crate) fn check_private(path: &Path) -> Result<(), StoreError> {
    let meta = fs::metadata(path).map_err(|e| StoreError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::InsecurePermissions {
            path: path.to_owned(),
            mode,
            directory: meta.is_dir(),
        });
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (temp file + rename) with the given mode set at
/// creation.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io(path, e));
    }
    Ok(())
}

/// Makes renames and creations in `dir` durable, so they reach the disk in order.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Creates a new secret file (mode 0600); fails if it exists.
pub(crate) fn write_new_secret(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| StoreError::io(path, e))
}

/// Reads a secret file after checking that only its owner can read it.
pub(crate) fn read_secret(path: &Path) -> Result<String, StoreError> {
    check_private(path)?;
    read_string(path)
}

pub(crate) fn read_string(path: &Path) -> Result<String, StoreError> {
    fs::read_to_string(path).map_err(|e| StoreError::io(path, e))
}

/// Appends one line to a private (0600) file, creating it if needed.
pub(crate) fn append_line(path: &Path, line: &str) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    // One write of the whole line: O_APPEND keeps concurrent lines from interleaving.
    f.write_all(&buf).map_err(|e| StoreError::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// An exclusive advisory lock on `<dir>/.lock`, held until dropped. Serialises
/// read-modify-write of the state files between the CLI and a running server.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        file.lock().map_err(|e| StoreError::io(&path, e))?;
        Ok(Self { _file: file })
    }
}

/// Identifies one version of a file, to reload it only when it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_created_0600_and_loose_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_new_secret(&path, b"secret").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_secret(&path).unwrap(), "secret");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        match read_secret(&path) {
            Err(e @ StoreError::InsecurePermissions { mode, .. }) => {
                assert_eq!(mode, 0o644);
                assert!(e.to_string().contains("run `chmod 600 "), "{e}");
            }
            other => panic!("expected InsecurePermissions, got {other:?}"),
        }
        // An existing secret is never overwritten.
        assert!(write_new_secret(&path, b"other").is_err());
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        let first = FileStamp::of(&path).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(first, FileStamp::of(&path).unwrap());
    }

    #[test]
    fn private_dir_is_0700_and_open_dirs_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = create_private_dir(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::InsecurePermissions {
                    directory: true,
                    ..
                }
            ),
            "{e:?}"
        );
        // A directory is fixed with 700 (600 would make it unusable).
        assert!(e.to_string().contains("run `chmod 700 "), "{e}");
    }
}
