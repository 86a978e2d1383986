//! File descriptors: close-on-exec pipes, moving a descriptor to a higher number, flags,
//! `openat`, reads of a raw descriptor, `listen` on an already-listening socket, and taking
//! ownership of a descriptor the service manager passed.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A close-on-exec pipe (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
    // SAFETY: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec duplicate of `fd` numbered `min` or above.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed live descriptor returns a new one or -1.
    let new = syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min))?;
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a live descriptor has no memory effects.
    let flags = syscall!(fcntl(raw, libc::F_GETFL))?;
    // SAFETY: F_SETFL on a live descriptor has no memory effects.
    syscall!(fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK)).map(drop)
}

/// `openat(dir, name, flags)`; `flags` should include `O_CLOEXEC`.
pub fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let fd = syscall!(openat(dir, name.as_ptr(), flags))?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read until `buf` is full or EOF (or an error other than EINTR); the number of bytes read.
pub fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let rest = &mut buf[n..];
        // SAFETY: reading into the unfilled rest of a buffer we borrow mutably, with its length.
        match syscall!(read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len())) {
            Ok(0) => break,
            Ok(r) => n += r as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    n
}

/// `listen(2)` with `backlog`; on a listening socket it just sets the queue length.
pub fn listen(fd: BorrowedFd<'_>, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: listen takes a live descriptor and an integer.
    syscall!(listen(fd.as_raw_fd(), backlog)).map(drop)
}

/// Takes ownership of descriptor `raw`, passed by the service manager (`LISTEN_FDS`).
///
/// Only for descriptors nothing else in the process owns: sd_notify's `listen_fds` hands out
/// each number (3 and up) once and only marks it close-on-exec.
pub fn adopt_passed(raw: RawFd) -> OwnedFd {
    // SAFETY: as documented above, `raw` is an open descriptor owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}
