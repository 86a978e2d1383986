//! The child's switch to a plugin's user (`user`/`group` in `[plugins.<id>]`): one step between
//! fork and exec, with every id computed in the parent (`config::accounts`).
//!
//! Order: supplementary groups, then the gid, then the uid, since after `setresuid` to a non-root
//! uid the process may change no id any more. Each is set for real, effective and saved ids, and
//! the result is read back: a switch that did not fully happen must not exec the plugin.
//!
//! The switch must come *before* `PR_SET_PDEATHSIG` is armed (`sys::child`): the kernel clears
//! the parent-death signal whenever a process's credentials change (`commit_creds`).
//!
//! Raw system calls, not glibc's `setgroups`/`setresuid`: glibc's wrappers make every thread of
//! the process change its ids (`__nptl_setxid` signals them all), which in a child that shares
//! its parent's memory (`vfork`, `CLONE_VM`) would reach into the daemon's threads. A raw system
//! call changes the calling thread only, which in a forked child is the whole process. No
//! allocation, no lock: async-signal-safe.

use std::io;

/// The ids a plugin's processes run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildCreds {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups (what `initgroups` would set).
    pub groups: Vec<libc::gid_t>,
}

// 32-bit x86 and ARM have 16-bit ids in the classic calls and the 32-bit ones under `*32`.
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
mod nr {
    pub const SETGROUPS: libc::c_long = libc::SYS_setgroups32;
    pub const SETRESGID: libc::c_long = libc::SYS_setresgid32;
    pub const SETRESUID: libc::c_long = libc::SYS_setresuid32;
    pub const GETRESGID: libc::c_long = libc::SYS_getresgid32;
    pub const GETRESUID: libc::c_long = libc::SYS_getresuid32;
}
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
mod nr {
    pub const SETGROUPS: libc::c_long = libc::SYS_setgroups;
    pub const SETRESGID: libc::c_long = libc::SYS_setresgid;
    pub const SETRESUID: libc::c_long = libc::SYS_setresuid;
    pub const GETRESGID: libc::c_long = libc::SYS_getresgid;
    pub const GETRESUID: libc::c_long = libc::SYS_getresuid;
}

impl ChildCreds {
    /// In the child, before exec and before the parent-death signal is armed: become the
    /// plugin's user. An error (EPERM: the daemon lacks CAP_SETUID/CAP_SETGID; EINVAL: an id
    /// the user namespace does not map) is the child's reason not to exec.
    pub fn apply(&self) -> io::Result<()> {
        let check = |result: libc::c_long| {
            if result == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: setgroups reads `groups.len()` gids from a live buffer; the id calls take
        // integers only. None allocates or touches memory of ours besides that buffer.
        unsafe {
            check(libc::syscall(
                nr::SETGROUPS,
                self.groups.len(),
                self.groups.as_ptr(),
            ))?;
            check(libc::syscall(nr::SETRESGID, self.gid, self.gid, self.gid))?;
            check(libc::syscall(nr::SETRESUID, self.uid, self.uid, self.uid))?;
        }
        let (uids, gids) = current_ids()?;
        if uids != [self.uid; 3] || gids != [self.gid; 3] {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }
}

/// Real, effective and saved uids and gids of the calling thread.
fn current_ids() -> io::Result<([libc::uid_t; 3], [libc::gid_t; 3])> {
    let mut uids: [libc::uid_t; 3] = [0; 3];
    let mut gids: [libc::gid_t; 3] = [0; 3];
    // SAFETY: each call writes one id through each of three pointers to live locals.
    let results = unsafe {
        [
            libc::syscall(
                nr::GETRESUID,
                &mut uids[0] as *mut libc::uid_t,
                &mut uids[1] as *mut libc::uid_t,
                &mut uids[2] as *mut libc::uid_t,
            ),
            libc::syscall(
                nr::GETRESGID,
                &mut gids[0] as *mut libc::gid_t,
                &mut gids[1] as *mut libc::gid_t,
                &mut gids[2] as *mut libc::gid_t,
            ),
        ]
    };
    if results.contains(&-1) {
        return Err(io::Error::last_os_error());
    }
    Ok((uids, gids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_read_back_are_the_process_ids() {
        let (uids, gids) = current_ids().unwrap();
        assert_eq!(uids[1], nix::unistd::geteuid().as_raw());
        assert_eq!(gids[1], nix::unistd::getegid().as_raw());
    }

    #[test]
    fn a_forked_child_switches_and_cannot_switch_back() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: switching users needs root");
            return;
        }
        let creds = ChildCreds {
            uid: 65534,
            gid: 65533,
            groups: vec![65533, 4242],
        };
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "id -u; id -g; id -G"]);
        let child_creds = creds.clone();
        // SAFETY: `apply` is async-signal-safe (raw system calls on a prepared buffer).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || child_creds.apply());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["65534", "65533"], "{text}");
        let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
        groups.sort_unstable();
        assert_eq!(groups, ["4242", "65533"]);
        let mut back = std::process::Command::new("/bin/true");
        let again = creds.clone();
        let root = ChildCreds {
            uid: 0,
            gid: 0,
            groups: vec![0],
        };
        // SAFETY: as above.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut back, move || {
                again.apply()?;
                root.apply()
            });
        }
        let err = back.status().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
