//! File-system calls std does not offer: `renameat2(RENAME_EXCHANGE)` (state files) and the
//! file-system type from `statfs` (which directories inotify cannot watch for remote changes).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
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
}
