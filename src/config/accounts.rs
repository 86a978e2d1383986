//! `user` and `group` of `[plugins.<id>]`: the account a plugin runs as, resolved once, when the
//! configuration is loaded (at start, `--check-config`, `SIGHUP`/`reload-config`).
//!
//! Resolving in the daemon, not in the child, matters twice. A name that does not exist is a
//! configuration error (exit 78 at start, `config_invalid` on a reload) instead of a plugin that
//! fails at every start. And the child between fork and exec may only make async-signal-safe
//! system calls: `getpwnam`, `initgroups` and `getgrouplist` read files, allocate and may talk
//! to nscd or sssd, so the supplementary groups are computed here (`getgrouplist`, what
//! `initgroups` would set) and the child only calls `setgroups`, `setresgid`, `setresuid` with
//! the numbers ([`crate::sys::creds`]).
//!
//! Both keys take a name or a decimal id, as systemd's `User=`/`Group=` do. A numeric uid
//! without a passwd entry has no primary group and no supplementary groups, so it needs
//! `group`. Only a daemon running as root can switch; a daemon running as another user that is
//! given an account other than its own is refused with a configuration error that says so
//! (silently running the plugin as the daemon's user would be worse).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

use super::error::ConfigError;
use super::validate::describe_key;
use super::{Config, PluginConfig};

/// The account a plugin runs as: ids for the child, names for messages and the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name, or its uid in decimal when it has no passwd entry.
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as `initgroups(user, gid)` would set them (`gid` included).
    pub groups: Vec<u32>,
    /// The user's home directory (`HOME` of the plugin), when it has a passwd entry.
    pub home: Option<PathBuf>,
}

/// Resolves `user`/`group` of every plugin table for a daemon running as `euid`/`egid`.
/// Plugins without either key, and a non-root daemon named with its own account, are absent
/// from the result (they run as the daemon).
pub fn resolve(
    config: &Config,
    euid: u32,
    egid: u32,
) -> Result<BTreeMap<String, RunAs>, ConfigError> {
    let mut accounts = BTreeMap::new();
    for (id, table) in &config.plugins {
        if table.user.is_none() && table.group.is_none() {
            continue;
        }
        let error = |key: &str, value: &str, detail: String| {
            let origin = config
                .source
                .as_ref()
                .map_or_else(String::new, |path| format!("{}: ", path.display()));
            let key = describe_key(&["plugins", id.as_str(), key]);
            ConfigError::new(format!(
                "{origin}invalid value for {key}: {value:?}; {detail}"
            ))
        };
        let run_as = resolve_one(table, euid, egid)
            .map_err(|(key, value, detail)| error(key, &value, detail))?;
        if let Some(run_as) = run_as {
            accounts.insert(id.clone(), run_as);
        }
    }
    Ok(accounts)
}

/// A failure: the key, its value, and what is wrong with it.
type Refusal = (&'static str, String, String);

fn resolve_one(table: &PluginConfig, euid: u32, egid: u32) -> Result<Option<RunAs>, Refusal> {
    let user = match &table.user {
        Some(name) => Some(lookup_user(name).map_err(|detail| ("user", name.clone(), detail))?),
        None => None,
    };
    let group = match &table.group {
        Some(name) => Some(lookup_group(name).map_err(|detail| ("group", name.clone(), detail))?),
        None => None,
    };
    let uid = user.as_ref().map_or(euid, |u| u.uid);
    let gid = match (&group, &user) {
        (Some(gid), _) => *gid,
        (None, Some(Account { gid: Some(gid), .. })) => *gid,
        (None, Some(account)) => {
            let detail = format!(
                "uid {} has no passwd entry, so it has no primary group; set `group` too",
                account.uid
            );
            return Err(("user", account.written.clone(), detail));
        }
        (None, None) => egid,
    };
    if euid != 0 {
        if uid == euid && gid == egid {
            return Ok(None);
        }
        let (key, value) = match (&table.user, &table.group) {
            (Some(name), _) if uid != euid => ("user", name.clone()),
            (_, Some(name)) => ("group", name.clone()),
            (Some(name), None) => ("user", name.clone()),
            (None, None) => ("user", String::new()),
        };
        let detail = format!(
            "only a daemon running as root can run a plugin as another user or group, and \
             hotreloadd runs as uid {euid} gid {egid}; remove the key, or run the daemon as root"
        );
        return Err((key, value, detail));
    }
    let groups = match &user {
        Some(Account {
            name: Some(name), ..
        }) => supplementary_groups(name, gid).map_err(|detail| {
            let written = table.user.clone().unwrap_or_default();
            ("user", written, detail)
        })?,
        // Root keeping its uid, or a uid without an entry: the one group.
        _ => vec![gid],
    };
    let name = user
        .as_ref()
        .and_then(|u| u.name.clone())
        .unwrap_or_else(|| uid.to_string());
    Ok(Some(RunAs {
        user: name,
        uid,
        gid,
        groups,
        home: user.and_then(|u| u.home),
    }))
}

/// A user as found: by name, or by number with or without a passwd entry.
struct Account {
    written: String,
    uid: u32,
    /// The primary group; `None` for a numeric uid without an entry.
    gid: Option<u32>,
    name: Option<String>,
    home: Option<PathBuf>,
}

fn lookup_user(written: &str) -> Result<Account, String> {
    check_name(written)?;
    let found = match written.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(written),
    };
    match (found, written.parse::<u32>()) {
        (Ok(Some(user)), _) => Ok(Account {
            written: written.to_owned(),
            uid: user.uid.as_raw(),
            gid: Some(user.gid.as_raw()),
            name: Some(user.name),
            home: Some(user.dir).filter(|dir| dir.is_absolute()),
        }),
        (Ok(None), Ok(uid)) => Ok(Account {
            written: written.to_owned(),
            uid,
            gid: None,
            name: None,
            home: None,
        }),
        (Ok(None), Err(_)) => Err(
            "no such user (getpwnam); create it (adduser --system NAME) or name an existing one"
                .to_owned(),
        ),
        (Err(errno), _) => Err(format!("cannot look the user up: {errno}")),
    }
}

fn lookup_group(written: &str) -> Result<u32, String> {
    check_name(written)?;
    if let Ok(gid) = written.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(written) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(
            "no such group (getgrnam); create it (addgroup --system NAME) or name an existing one"
                .to_owned(),
        ),
        Err(errno) => Err(format!("cannot look the group up: {errno}")),
    }
}

/// Names go to getpwnam/getgrnam: no NUL, nothing empty, no `:` (the passwd field separator).
fn check_name(written: &str) -> Result<(), String> {
    if written.is_empty() || written.contains(['\0', ':', '/']) || written.trim() != written {
        return Err("expected a user or group name, or a decimal id".to_owned());
    }
    Ok(())
}

/// The groups `initgroups(name, gid)` would set, `gid` included.
fn supplementary_groups(name: &str, gid: u32) -> Result<Vec<u32>, String> {
    let c_name = CString::new(name).map_err(|_| "the name contains NUL".to_owned())?;
    let groups = nix::unistd::getgrouplist(&c_name, Gid::from_raw(gid))
        .map_err(|errno| format!("cannot list the user's groups (getgrouplist): {errno}"))?;
    let mut groups: Vec<u32> = groups.into_iter().map(Gid::as_raw).collect();
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(user: Option<&str>, group: Option<&str>) -> PluginConfig {
        PluginConfig {
            user: user.map(str::to_owned),
            group: group.map(str::to_owned),
            ..PluginConfig::default()
        }
    }

    #[test]
    fn root_resolves_names_and_numbers() {
        let root = resolve_one(&table(Some("root"), None), 0, 0)
            .unwrap()
            .unwrap();
        assert_eq!((root.uid, root.gid, root.user.as_str()), (0, 0, "root"));
        assert!(root.groups.contains(&0));
        let numeric = resolve_one(&table(Some("0"), Some("0")), 0, 0)
            .unwrap()
            .unwrap();
        assert_eq!((numeric.uid, numeric.gid), (0, 0));
        let no_entry = resolve_one(&table(Some("4000000"), Some("4000001")), 0, 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (no_entry.uid, no_entry.gid, no_entry.groups.as_slice()),
            (4_000_000, 4_000_001, [4_000_001].as_slice())
        );
        assert_eq!(no_entry.user, "4000000");
        let only_group = resolve_one(&table(None, Some("7")), 0, 0).unwrap().unwrap();
        assert_eq!(
            (only_group.uid, only_group.gid, only_group.groups),
            (0, 7, vec![7])
        );
    }

    #[test]
    fn unknown_names_and_entryless_uids_without_group_are_refused() {
        let (key, value, detail) =
            resolve_one(&table(Some("no-such-user-hrl"), None), 0, 0).unwrap_err();
        assert_eq!((key, value.as_str()), ("user", "no-such-user-hrl"));
        assert!(detail.contains("no such user"), "{detail}");
        let (key, _, detail) =
            resolve_one(&table(None, Some("no-such-group-hrl")), 0, 0).unwrap_err();
        assert_eq!(key, "group");
        assert!(detail.contains("no such group"), "{detail}");
        let (key, _, detail) = resolve_one(&table(Some("4000000"), None), 0, 0).unwrap_err();
        assert_eq!(key, "user");
        assert!(detail.contains("set `group` too"), "{detail}");
        for bad in ["", " root", "a:b", "a\0b"] {
            assert!(
                resolve_one(&table(Some(bad), None), 0, 0).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_daemon_that_is_not_root_only_accepts_its_own_account() {
        assert_eq!(
            resolve_one(&table(Some("1234"), Some("1234")), 1234, 1234),
            Ok(None)
        );
        let (key, value, detail) = resolve_one(&table(Some("root"), None), 1234, 1234).unwrap_err();
        assert_eq!((key, value.as_str()), ("user", "root"));
        assert!(
            detail.contains("only a daemon running as root") && detail.contains("uid 1234"),
            "{detail}"
        );
        let (key, ..) = resolve_one(&table(None, Some("0")), 1234, 1234).unwrap_err();
        assert_eq!(key, "group");
    }
}
