//! What a plugin with `user`/`group` needs of the daemon's files, given to it before each start
//! and taken back when it runs as the daemon again, when it is removed and when the daemon
//! stops (so a configuration edited meanwhile finds only the daemon's files at the next start):
//! the daemon's own files stay private to the daemon, and each plugin reaches exactly its own.
//!
//! | path | owner | mode | why |
//! |------|-------|------|-----|
//! | `<state_dir>/plugins/<id>/` | the plugin's user and group | 0700 | it writes `runtime.json` as it likes (atomic rename included) and reads `state.json`, which the daemon writes as that user's file (`state_file`) |
//! | `state.json`, `runtime.json` in it | the plugin's user and group | as written | also after `user` changed |
//! | `<runtime_dir>/snapshots/<id>/` | the daemon, the plugin's group | 0710 | the group may reach a snapshot by name, not list or change the dir |
//! | the snapshot to be run | the daemon, the plugin's group | 0750 | the group may read and execute it (a `#!` interpreter reads it), never change it: what runs is still only what the daemon wrote (SPEC §2) |
//! | `<runtime_dir>/notify/<id>.sock` | the plugin's user and group | as bound | `sendto` needs write permission on the socket file |
//! | the runtime and state dirs, `snapshots/`, `notify/`, `<state_dir>/plugins/` | the daemon | + search for others (`o+x`, e.g. 0711) | the plugin must pass through them; nobody may list them, and each entry keeps its own private mode |
//!
//! The snapshot goes to the plugin's *group* because its owner could `chmod` it writable and
//! change what runs at the next start or rollback. Members of that group can therefore read the
//! build too: a plugin whose build is a secret needs a group of its own, which is what
//! `adduser --system --group NAME` makes (documented in hotreload.toml(5)). The plugin's dir
//! (its working directory) is left as it is: the plugin's user must be allowed to read it.
//!
//! Every change is made on a descriptor opened with `O_NOFOLLOW` (or `fchownat` with
//! `AT_SYMLINK_NOFOLLOW` inside such a directory), so a link planted by a plugin in its own
//! directory is never followed.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, fchown};
use std::path::Path;

use nix::fcntl::AtFlags;
use nix::unistd::{Gid, Uid};

use crate::config::RunAs;
use crate::sys::creds::ChildCreds;

/// The files of one plugin instance that its user must reach.
#[derive(Debug)]
pub struct PluginPaths<'a> {
    /// `<state_dir>/plugins/<id>`.
    pub state_dir: &'a Path,
    /// The snapshot about to be executed, `<runtime_dir>/snapshots/<id>/<version>`.
    pub snapshot: &'a Path,
    /// `<runtime_dir>/notify/<id>.sock`, when the plugin has one.
    pub notify_socket: Option<&'a Path>,
}

/// The ids the child switches to.
pub fn child_creds(run_as: &RunAs) -> ChildCreds {
    ChildCreds {
        uid: run_as.uid,
        gid: run_as.gid,
        groups: run_as.groups.clone(),
    }
}

/// Before a start: give the plugin's account what it needs (see the module documentation), or,
/// for a plugin running as the daemon (`None`), take back what an earlier `user` was given.
pub fn prepare(run_as: Option<&RunAs>, paths: &PluginPaths<'_>) -> io::Result<()> {
    let daemon = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let Some(run_as) = run_as else {
        return take_back(daemon, paths);
    };
    let owner = (run_as.uid, run_as.gid);
    give_state_dir(paths.state_dir, owner).map_err(|e| context(e, paths.state_dir))?;
    let snapshot_dir = parent(paths.snapshot)?;
    give_dir(snapshot_dir, (daemon.0, run_as.gid), 0o710).map_err(|e| context(e, snapshot_dir))?;
    give_snapshot(paths.snapshot, (daemon.0, run_as.gid))
        .map_err(|e| context(e, paths.snapshot))?;
    let mut passages = vec![
        parent(paths.state_dir)?,
        parent(parent(paths.state_dir)?)?,
        parent(snapshot_dir)?,
        parent(parent(snapshot_dir)?)?,
    ];
    if let Some(socket) = paths.notify_socket {
        chown_nofollow(socket, owner).map_err(|e| context(e, socket))?;
        passages.push(parent(socket)?);
    }
    for dir in passages {
        let _ = searchable_by_others(dir, daemon.0).map_err(|e| context(e, dir))?;
    }
    Ok(())
}

/// A plugin back to the daemon's account: its state dir and files, its snapshot dir and its
/// notify socket become the daemon's again. Costs one `lstat` when nothing is to be done.
fn take_back(daemon: (u32, u32), paths: &PluginPaths<'_>) -> io::Result<()> {
    let given =
        |path: &Path| std::fs::symlink_metadata(path).is_ok_and(|m| (m.uid(), m.gid()) != daemon);
    if given(paths.state_dir) {
        give_state_dir(paths.state_dir, daemon).map_err(|e| context(e, paths.state_dir))?;
        let snapshot_dir = parent(paths.snapshot)?;
        gone_is_fine(give_dir(snapshot_dir, daemon, 0o700).map(drop))
            .map_err(|e| context(e, snapshot_dir))?;
        if let Some(socket) = paths.notify_socket {
            gone_is_fine(chown_nofollow(socket, daemon)).map_err(|e| context(e, socket))?;
        }
    }
    Ok(())
}

/// A file that is not there (a removed plugin's snapshots) needs nothing taken back.
fn gone_is_fine(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The plugin's state dir, created if missing, owned by `owner` and 0700, with the two state
/// files in it given to `owner` too.
fn give_state_dir(dir: &Path, owner: (u32, u32)) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let handle = give_dir(dir, owner, 0o700)?;
    for name in ["state.json", "runtime.json"] {
        let ids = (Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)));
        match nix::unistd::fchownat(&handle, name, ids.0, ids.1, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
    Ok(())
}

/// `dir` (never through a symlink) owned by `owner` with `mode`; returns it open.
fn give_dir(dir: &Path, owner: (u32, u32), mode: u32) -> io::Result<File> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    set_owner_and_mode(&handle, owner, mode)?;
    Ok(handle)
}

/// The snapshot: a regular file of the daemon's, made readable and executable by `owner`'s
/// group (0750; 0640 for a build without execute bits, which pre-flight refuses anyway).
fn give_snapshot(path: &Path, owner: (u32, u32)) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != owner.0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file of the daemon's",
        ));
    }
    let mode = if meta.mode() & 0o100 != 0 {
        0o750
    } else {
        0o640
    };
    set_owner_and_mode(&file, owner, mode)
}

fn set_owner_and_mode(file: &File, owner: (u32, u32), mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    if (meta.uid(), meta.gid()) != owner {
        fchown(file, Some(owner.0), Some(owner.1))?;
    }
    if meta.mode() & 0o7777 != mode {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `chown` of `path` itself, never of what a symlink there names.
fn chown_nofollow(path: &Path, owner: (u32, u32)) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))
}

/// Adds search permission for others to a directory of the daemon's (`o+x`: pass through, not
/// list). A directory of someone else's (the service manager's `/run`, say) is left alone.
/// True when it changed the mode.
fn searchable_by_others(dir: &Path, daemon_uid: u32) -> io::Result<bool> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    let meta = handle.metadata()?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() != daemon_uid || mode & 0o001 != 0 {
        return Ok(false);
    }
    handle.set_permissions(Permissions::from_mode(mode | 0o001))?;
    log::info!(
        "made {} searchable by others (mode {:04o}) for plugins that run as another user; it \
         cannot be listed, and what is in it keeps its own mode",
        dir.display(),
        mode | 0o001
    );
    Ok(true)
}

fn parent(path: &Path) -> io::Result<&Path> {
    path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        )
    })
}

fn context(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot give {} to the plugin's user: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::fs;

    fn run_as() -> RunAs {
        RunAs {
            user: "nobody".into(),
            uid: 65534,
            gid: 65533,
            groups: vec![65533],
            home: None,
        }
    }

    #[test]
    fn a_plugin_user_gets_its_state_dir_snapshot_and_passages_and_gives_them_back() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: chown needs root");
            return;
        }
        let t = TestDir::new("credentials");
        let state = t.join("state/plugins/p");
        let snapshot = t.join("run/snapshots/p/0123456789abcdef");
        fs::create_dir_all(state.parent().unwrap()).unwrap();
        fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
        for dir in [
            "state",
            "state/plugins",
            "run",
            "run/snapshots",
            "run/snapshots/p",
        ] {
            fs::set_permissions(t.join(dir), Permissions::from_mode(0o700)).unwrap();
        }
        fs::write(&snapshot, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&snapshot, Permissions::from_mode(0o700)).unwrap();
        let paths = PluginPaths {
            state_dir: &state,
            snapshot: &snapshot,
            notify_socket: None,
        };
        prepare(Some(&run_as()), &paths).unwrap();
        let seen = |path: &Path| {
            let m = fs::symlink_metadata(path).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        assert_eq!(seen(&state), (65534, 65533, 0o700));
        assert_eq!(seen(snapshot.parent().unwrap()), (0, 65533, 0o710));
        assert_eq!(seen(&snapshot), (0, 65533, 0o750));
        for dir in ["state", "state/plugins", "run", "run/snapshots"] {
            assert_eq!(seen(&t.join(dir)), (0, 0, 0o701), "{dir}");
        }
        fs::write(state.join("runtime.json"), b"{}").unwrap();
        prepare(None, &paths).unwrap();
        assert_eq!(seen(&state), (0, 0, 0o700));
        assert_eq!(seen(&state.join("runtime.json")).0, 0);
        assert_eq!(seen(snapshot.parent().unwrap()), (0, 0, 0o700));
    }
}
