//! The grammar of a `[plugins.<id>] sockets` entry (SPEC §3): `tcp:HOST:PORT` or `unix:/path`.
//!
//! The daemon binds these once and passes them to every instance as `LISTEN_FDS`; the binding
//! code (`crate::listen`) has its own parser. This module only decides *whether* a spec is
//! well-formed, at configuration time, so a typo is exit 78 with a position instead of a failed
//! bind later. It accepts exactly the documented forms, nothing more, so anything it lets through
//! the binder understands too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::locate::MAX_SOCKET_PATH_BYTES;

/// The accepted forms, appended to every error so the remedy is in the message.
const VALID_FORMS: &str = "valid forms: \"tcp:HOST:PORT\" with HOST an IPv4 address, a bracketed \
     IPv6 address or localhost and PORT 0 to 65535 (like \"tcp:127.0.0.1:9000\" or \
     \"tcp:[::1]:9000\"), or \"unix:/absolute/path\" of at most 107 bytes";

/// A well-formed spec, in a form where two specs naming the same address compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SocketSpec<'a> {
    Tcp { host: TcpHost, port: u16 },
    Unix { path: &'a str },
}

/// The host part of a `tcp:` spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcpHost {
    Ip(IpAddr),
    Localhost,
}

impl SocketSpec<'_> {
    /// Whether binding it twice necessarily conflicts: TCP port 0 means "any free port", so two
    /// of those are two different sockets.
    pub(crate) fn is_exclusive(&self) -> bool {
        !matches!(self, SocketSpec::Tcp { port: 0, .. })
    }
}

/// Checks one `sockets` entry. The error starts with the value (quoted) and ends with the valid
/// forms, e.g. `"tcp:1.2.3:80"; "1.2.3" is not an IPv4 address, ...; valid forms: ...`.
pub fn valid_socket_spec(spec: &str) -> Result<(), String> {
    parse_socket_spec(spec).map(|_| ())
}

/// Parses one `sockets` entry; the error is the full message of [`valid_socket_spec`].
pub(crate) fn parse_socket_spec(spec: &str) -> Result<SocketSpec<'_>, String> {
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
fn parse_tcp(address: &str) -> Result<SocketSpec<'_>, String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("expected HOST:PORT after \"tcp:\"".to_owned());
    };
    Ok(SocketSpec::Tcp {
        host: parse_host(host)?,
        port: parse_port(port)?,
    })
}

fn parse_host(host: &str) -> Result<TcpHost, String> {
    if host == "localhost" {
        return Ok(TcpHost::Localhost);
    }
    let parsed = match host.strip_prefix('[') {
        Some(bracketed) => bracketed
            .strip_suffix(']')
            .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6),
        None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    parsed.map(TcpHost::Ip).ok_or_else(|| {
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

fn parse_unix(path: &str) -> Result<SocketSpec<'_>, String> {
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
    Ok(SocketSpec::Unix { path })
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
            "unix:/",
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
        assert_eq!(parse("unix:/a"), SocketSpec::Unix { path: "/a" });
        assert!(parse("tcp:localhost:1").is_exclusive());
        assert!(parse("unix:/a").is_exclusive());
        assert!(!parse("tcp:127.0.0.1:0").is_exclusive());
    }
}
