//! `SocketSpec`: the grammar of a `[plugins.<id>] sockets` entry (SPEC §3), `tcp:HOST:PORT` or
//! `unix:/path`, and the one parsed form of it.
//!
//! Configuration parses every entry with [`parse_socket_spec`] (so a typo is exit 78 naming the
//! key and the value instead of a failed bind later), and the binder (`crate::listen`) takes the
//! same [`SocketSpec`] from the same parser: there is no second grammar that could drift. The
//! parser accepts exactly the documented forms, and refuses what can never bind (a Unix path
//! naming a directory, like `unix:/run/x/`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::locate::MAX_SOCKET_PATH_BYTES;

/// The accepted forms, appended to every error so the remedy is in the message.
const VALID_FORMS: &str = "valid forms: \"tcp:HOST:PORT\" with HOST an IPv4 address, a bracketed \
     IPv6 address or localhost and PORT 0 to 65535 (like \"tcp:127.0.0.1:9000\" or \
     \"tcp:[::1]:9000\"), or \"unix:/absolute/path\" of at most 107 bytes naming a file";

/// Where a socket listens: a well-formed spec, in a form where two specs naming the same
/// address compare equal (`localhost` is 127.0.0.1, as the binder binds it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SocketSpec {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl SocketSpec {
    /// Whether binding it twice necessarily conflicts: TCP port 0 means "any free port", so two
    /// of those are two different sockets.
    pub(crate) fn is_exclusive(&self) -> bool {
        !matches!(self, SocketSpec::Tcp(addr) if addr.port() == 0)
    }
}

/// The configuration form: `tcp:127.0.0.1:9000`, `tcp:[::1]:9000`, `unix:/run/x.sock`.
impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketSpec::Tcp(addr) => write!(f, "tcp:{addr}"),
            SocketSpec::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Checks one `sockets` entry. The error starts with the value (quoted) and ends with the valid
/// forms, e.g. `"tcp:1.2.3:80"; "1.2.3" is not an IPv4 address, ...; valid forms: ...`.
pub fn valid_socket_spec(spec: &str) -> Result<(), String> {
    parse_socket_spec(spec).map(|_| ())
}

/// Parses one `sockets` entry; the error is the full message of [`valid_socket_spec`].
pub fn parse_socket_spec(spec: &str) -> Result<SocketSpec, String> {
    let parsed = if let Some(address) = spec.strip_prefix("tcp:") {
        parse_tcp(address)
    } else if let Some(path) = spec.strip_prefix("unix:") {
        parse_unix(path)
    } else {
        Err("expected a \"tcp:\" or \"unix:\" prefix".to_owned())
    };
    parsed.map_err(|reason| format!("{spec:?}; {reason}; {VALID_FORMS}"))
}

/// `HOST:PORT`; the port is after the last colon, so an IPv6 host must be bracketed.
fn parse_tcp(address: &str) -> Result<SocketSpec, String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("expected HOST:PORT after \"tcp:\"".to_owned());
    };
    let ip = parse_host(host)?;
    Ok(SocketSpec::Tcp(SocketAddr::new(ip, parse_port(port)?)))
}

fn parse_host(host: &str) -> Result<IpAddr, String> {
    if host == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let parsed = match host.strip_prefix('[') {
        Some(bracketed) => bracketed
            .strip_suffix(']')
            .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6),
        None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    parsed.ok_or_else(|| {
        format!("host {host:?} is not an IPv4 address, a bracketed IPv6 address or localhost")
    })
}

/// Decimal digits only: `u16::from_str` would also take a leading `+`.
fn parse_port(port: &str) -> Result<u16, String> {
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    port.parse::<u16>()
        .ok()
        .filter(|_| digits)
        .ok_or_else(|| format!("port {port:?} is not a number from 0 to 65535"))
}

fn parse_unix(path: &str) -> Result<SocketSpec, String> {
    if !path.starts_with('/') {
        return Err("the socket path must be absolute".to_owned());
    }
    if path.contains('\0') {
        return Err("the socket path contains NUL".to_owned());
    }
    if path.len() > MAX_SOCKET_PATH_BYTES {
        return Err(format!(
            "the socket path is {} bytes, more than {MAX_SOCKET_PATH_BYTES}",
            path.len()
        ));
    }
    if !names_a_file(path) {
        return Err(format!(
            "the socket path {path:?} names a directory, not a file; add a file name like \"{}/app.sock\"",
            path.trim_end_matches('/')
        ));
    }
    Ok(SocketSpec::Unix(PathBuf::from(path)))
}

/// A socket file can only be bound at a path whose last component is a name: not `/`, not
/// `dir/`, not `dir/.` or `dir/..`.
fn names_a_file(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or_default();
    !matches!(last, "" | "." | "..") && Path::new(path).file_name().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_forms_are_accepted() {
        let longest = format!("unix:/{}", "s".repeat(MAX_SOCKET_PATH_BYTES - 1));
        for good in [
            "tcp:127.0.0.1:9000",
            "tcp:0.0.0.0:0",
            "tcp:255.255.255.255:65535",
            "tcp:[::1]:9000",
            "tcp:[::]:80",
            "tcp:[::ffff:10.0.0.1]:443",
            "tcp:localhost:8080",
            "unix:/run/hotreload/ffmpeg.sock",
            "unix:/x",
            &longest,
        ] {
            assert_eq!(valid_socket_spec(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn each_malformed_spec_says_why_and_lists_the_valid_forms() {
        let too_long = format!("unix:/{}", "s".repeat(MAX_SOCKET_PATH_BYTES));
        for (bad, reason) in [
            ("", "expected a \"tcp:\" or \"unix:\" prefix"),
            ("127.0.0.1:9000", "prefix"),
            ("TCP:127.0.0.1:9000", "prefix"),
            ("udp:127.0.0.1:9000", "prefix"),
            ("tcp:", "expected HOST:PORT"),
            ("tcp:127.0.0.1", "expected HOST:PORT after \"tcp:\""),
            (
                "tcp:[::1]",
                "is not an IPv4 address, a bracketed IPv6 address or localhost",
            ),
            (
                "tcp:127.0.0.1:",
                "port \"\" is not a number from 0 to 65535",
            ),
            ("tcp:127.0.0.1:65536", "port \"65536\""),
            ("tcp:127.0.0.1:+80", "port \"+80\""),
            ("tcp:127.0.0.1:-1", "port \"-1\""),
            ("tcp:127.0.0.1:http", "port \"http\""),
            ("tcp:1.2.3:80", "host \"1.2.3\""),
            ("tcp:01.2.3.4:80", "host \"01.2.3.4\""),
            ("tcp:::1:80", "host \"::1\""),
            ("tcp:[::1:80", "host \"[::1\""),
            ("tcp:[fe80::1%eth0]:80", "host \"[fe80::1%eth0]\""),
            ("tcp:[127.0.0.1]:80", "host \"[127.0.0.1]\""),
            ("tcp:example.com:80", "host \"example.com\""),
            ("tcp:LOCALHOST:80", "host \"LOCALHOST\""),
            ("tcp::80", "host \"\""),
            ("unix:", "must be absolute"),
            ("unix:run/x.sock", "must be absolute"),
            ("unix:@abstract", "must be absolute"),
            ("unix:/a\0b", "contains NUL"),
            ("unix:/", "names a directory"),
            (
                "unix:/run/x/",
                "names a directory, not a file; add a file name like \"/run/x/app.sock\"",
            ),
            ("unix:/run/x/.", "names a directory"),
            ("unix:/run/x/..", "names a directory"),
            (&too_long, "is 108 bytes, more than 107"),
        ] {
            let error = valid_socket_spec(bad).unwrap_err();
            assert!(error.starts_with(&format!("{bad:?}; ")), "{bad:?}: {error}");
            assert!(error.contains(reason), "{bad:?}: {error}");
            assert!(
                error.ends_with(&format!("; {VALID_FORMS}")),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn specs_naming_the_same_address_compare_equal() {
        let parse = |spec| parse_socket_spec(spec).unwrap();
        assert_eq!(parse("tcp:[::1]:80"), parse("tcp:[0:0::1]:80"));
        assert_ne!(parse("tcp:[::1]:80"), parse("tcp:127.0.0.1:80"));
        assert_ne!(parse("tcp:127.0.0.1:80"), parse("tcp:127.0.0.1:81"));
        assert_eq!(parse("unix:/a"), SocketSpec::Unix("/a".into()));
        assert_eq!(parse("tcp:localhost:80"), parse("tcp:127.0.0.1:80"));
        assert!(parse("tcp:localhost:1").is_exclusive());
        assert!(parse("unix:/a").is_exclusive());
        assert!(!parse("tcp:127.0.0.1:0").is_exclusive());
    }

    #[test]
    fn display_round_trips() {
        for text in ["tcp:127.0.0.1:9000", "tcp:[::1]:9000", "unix:/run/x.sock"] {
            assert_eq!(parse_socket_spec(text).unwrap().to_string(), text);
        }
    }
}
