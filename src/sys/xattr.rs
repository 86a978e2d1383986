//! Extended attributes: reading a small one (cgroup delegation markers such as
//! `trusted.delegate`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The value of attribute `name` of `path` (symlinks followed) if it exists and fits in 64
/// bytes; None otherwise.
pub fn get_small(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    let cname = CString::new(name).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and the buffer is ours with its real length.
    let n = syscall!(getxattr(
        cpath.as_ptr(),
        cname.as_ptr(),
        buf.as_mut_ptr().cast(),
        buf.len(),
    ))
    .ok()?;
    Some(buf[..n as usize].to_vec())
}
