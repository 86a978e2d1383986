//! Logging: `log` + `env_logger` to stderr, shaped for whoever reads it.
//!
//! Under journald (`JOURNAL_STREAM` set and naming our stderr) each line starts with the `<N>`
//! syslog priority so `journalctl -p` filters work, and carries no timestamp of our own (the
//! journal stamps every line). Elsewhere lines get an RFC 3339 timestamp and the level. The filter
//! comes from `HOTRELOAD_LOG`, then `RUST_LOG`, then `info`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use log::Level;

/// syslog priority for a log level (sd-daemon(3) prefixes).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when stderr is the journal stream systemd gave us (`JOURNAL_STREAM=dev:ino`), not merely
/// inherited by a process that was redirected elsewhere.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

pub fn init() {
    let filter = std::env::var("HOTRELOAD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let journal = stderr_is_journal();
    let mut builder = env_logger::Builder::new();
    // Dependencies are chatty at debug level; the user's filter can still ask for them by name.
    builder.parse_filters("globset=warn");
    builder.parse_filters(&filter);
    builder.target(env_logger::Target::Stderr);
    if journal {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}",
                syslog_priority(record.level()),
                record.args()
            )
        });
    } else {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}",
                crate::clock::wall_rfc3339(),
                record.level(),
                record.args()
            )
        });
    }
    // A second init (tests) is harmless.
    let _ = builder.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::Error), 3);
        assert_eq!(syslog_priority(Level::Warn), 4);
        assert_eq!(syslog_priority(Level::Info), 6);
        assert_eq!(syslog_priority(Level::Debug), 7);
    }
}
