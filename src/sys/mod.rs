//! The operating-system layer: every raw `libc` call of the daemon and the client, each behind a
//! safe function returning `io::Result` (mio's `sys/` and `syscall!` are the model).
//!
//! One file per concern, so a reader looking for "how do we signal a process" finds one place:
//!
//! | file             | owns                                                               |
//! |------------------|--------------------------------------------------------------------|
//! | `child.rs`       | the reset every child gets between fork and exec (plugins, hooks)  |
//! | `cpu.rs`         | CPU affinity: a stopped plugin's exit, a large copy's two threads  |
//! | `creds.rs`       | a plugin child's switch to its `user`/`group` before exec          |
//! | `process.rs`     | pids, signals, pidfds, subreaper, the descriptor limit, boot time  |
//! | `fd.rs`          | pipes, descriptor flags and numbers, reads of raw descriptors      |
//! | `fs.rs`          | `renameat2(RENAME_EXCHANGE)`, the file-system type (`statfs`)      |
//! | `socket.rs`      | socket options and `recvmsg` with credentials and passed fds       |
//! | `socket_file.rs` | a Unix socket's file: claim, stale-file probe, remove if still ours |
//! | `xattr.rs`       | extended attributes (the cgroup delegation marker)                 |
//! | `term.rs`        | the terminal's width and the local time zone (for `hotreloadctl`)  |
//!
//! `unsafe` lives here, in the plugin spawner's fork/exec code (`supervisor::spawn`: `pre_exec`,
//! `execve` with pointer arrays prepared before the fork, the child side of `clone3`; only the
//! spawner can vouch for those), and nowhere else. Every `unsafe` block carries a `// SAFETY:` comment (enforced by
//! `clippy::undocumented_unsafe_blocks` in Cargo.toml).

/// Call a `libc` function and turn its `-1` into the `io::Error` of `errno`.
///
/// The call is `unsafe`; every use of the macro carries a `// SAFETY:` comment saying why its
/// arguments are valid (pointers to live, large-enough buffers, descriptors we own).
macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)? ) ) => {{
        // SAFETY: the caller documents its arguments at the call site (see the macro's doc).
        let result = unsafe { libc::$fn($($arg, )*) };
        if result == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }};
}

pub mod child;
pub mod cpu;
pub mod creds;
pub mod fd;
pub mod fs;
pub mod process;
pub mod socket;
pub mod socket_file;
pub mod term;
pub mod xattr;
