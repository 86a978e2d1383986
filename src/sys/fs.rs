//! File-system calls std does not offer: `renameat2(RENAME_EXCHANGE)` (state files), the
//! file-system type from `statfs` (which directories inotify cannot watch for remote changes),
//! unnamed files (`O_TMPFILE`) given a name later (snapshot copies and state files' temp files
//! made ahead of time), and whether anyone has a file open for writing (a read lease).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a path"))
}

/// Atomically swap the names `a` and `b` (both must exist): `renameat2(RENAME_EXCHANGE)`.
/// ENOENT when one is missing; EINVAL/ENOSYS/EOPNOTSUPP where the file system or kernel has no
/// exchange.
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (a, b) = (c_path(a)?, c_path(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; integers otherwise.
    syscall!(renameat2(
        libc::AT_FDCWD,
        a.as_ptr(),
        libc::AT_FDCWD,
        b.as_ptr(),
        libc::RENAME_EXCHANGE,
    ))
    .map(drop)
}

/// The `f_type` magic number of the file system `path` is on (32 bits, as the kernel's
/// constants are).
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let path = c_path(path)?;
    // SAFETY: statfs is plain data; all-zero is a valid value for it.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `buf` a valid, writable statfs that outlives
    // the call.
    syscall!(statfs(path.as_ptr(), &mut buf))?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    Ok((buf.f_type as i64) & 0xFFFF_FFFF)
}

/// A new file in `dir` with no name (`O_TMPFILE`), owner-only, open for reading and writing:
/// nobody else can reach it, and it vanishes with its last descriptor (a crash leaves nothing
/// behind) unless [`link_unnamed`] gives it a name. EOPNOTSUPP/EISDIR where the file system or
/// kernel has no unnamed files.
pub fn create_unnamed(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Give the unnamed `file` ([`create_unnamed`]) the name `path` on the same file system; EEXIST
/// when `path` exists. `linkat(AT_EMPTY_PATH)` needs CAP_DAC_READ_SEARCH, so without it the
/// file is linked through its `/proc/self/fd` entry instead.
pub fn link_unnamed(file: &File, path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: a live descriptor, an empty NUL-terminated string and a NUL-terminated path that
    // outlive the call.
    let direct = syscall!(linkat(
        file.as_raw_fd(),
        c"".as_ptr(),
        libc::AT_FDCWD,
        target.as_ptr(),
        libc::AT_EMPTY_PATH,
    ));
    match direct {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
            let proc = c_path(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
            // SAFETY: two NUL-terminated paths that outlive the call.
            syscall!(linkat(
                libc::AT_FDCWD,
                proc.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            ))
            .map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Whether some process has `path` open for writing: a read lease (`F_SETLEASE`) can only be
/// taken while nobody does, and is given back at once. `None` when it cannot be told (leases
/// disabled, a file system without them, a file neither ours nor ours to lease). A writer that
/// opens the file in the few microseconds the lease is held waits for it to be given back; the
/// kernel's SIGIO to the lease holder is ignored by the daemon (`signals`).
pub fn open_for_writing(path: &Path) -> Option<bool> {
    // Only a regular file is opened (a FIFO's open would release a writer waiting for a
    // reader), never as a controlling terminal; the descriptor is checked again.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    // SAFETY: a live descriptor and integer arguments.
    match syscall!(fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK)) {
        Ok(_) => {
            // SAFETY: as above. Closing the descriptor would drop the lease too.
            let _ = syscall!(fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK));
            Some(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Some(true),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_swaps_two_names_and_needs_both() {
        let dir = std::env::temp_dir().join(format!("hr-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "A").unwrap();
        std::fs::write(&b, "B").unwrap();
        rename_exchange(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "B");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "A");
        let missing = rename_exchange(&a, &dir.join("nope")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        assert!(fs_type(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unnamed_file_is_invisible_until_linked_and_then_keeps_its_bytes() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("hr-sysfs-unnamed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut file = create_unnamed(&dir).unwrap();
        file.write_all(b"copy").unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        link_unnamed(&file, &dir.join("named")).unwrap();
        assert_eq!(std::fs::read(dir.join("named")).unwrap(), b"copy");
        let taken = link_unnamed(&file, &dir.join("named")).unwrap_err();
        assert_eq!(taken.raw_os_error(), Some(libc::EEXIST));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_open_for_writing_is_told_from_one_that_is_not() {
        let dir = std::env::temp_dir().join(format!("hr-sysfs-writing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("build");
        let writer = File::create(&path).unwrap();
        assert_eq!(open_for_writing(&path), Some(true));
        drop(writer);
        assert_eq!(open_for_writing(&path), Some(false));
        let reader = File::open(&path).unwrap();
        assert_eq!(open_for_writing(&path), Some(false), "readers do not count");
        drop(reader);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
