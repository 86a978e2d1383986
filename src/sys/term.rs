//! The terminal and the local time zone, for `hotreloadctl`'s output.

/// The terminal width of stdout, from `TIOCGWINSZ`, if stdout is a terminal.
pub fn stdout_width() -> Option<usize> {
    // SAFETY: `winsize` is plain old data, so all-zero is a valid value.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live local;
    // the fd is our stdout, which stays open for the whole process.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// The local zone's offset from UTC at `secs` since the epoch, in seconds (0 when it cannot be
/// determined).
pub fn local_utc_offset_secs(secs: libc::time_t) -> i64 {
    // SAFETY: `tm` is plain old data (its one pointer may be null), so all-zero is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers point to live locals; localtime_r is the thread-safe variant and
    // writes only into `tm`.
    let result = unsafe { libc::localtime_r(&secs, &mut tm) };
    if result.is_null() {
        0
    } else {
        // `c_long` is only 32 bits wide on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        i64::from(tm.tm_gmtoff)
    }
}
