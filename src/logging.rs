//! Logging: `log` + `env_logger` to stderr, shaped for whoever reads it.
//!
//! Under journald (`JOURNAL_STREAM` set and naming our stderr) each line starts with the `<N>`
//! syslog priority so `journalctl -p` filters work, and carries no timestamp of our own (the
//! journal stamps every line). Elsewhere lines get an RFC 3339 timestamp and the level. The filter
//! comes from `HOTRELOAD_LOG`, then `RUST_LOG`, then `info`.
//!
//! Every message is escaped on its way out (SPEC §4): a plugin's output, its `STATUS=` text or a
//! file name it created may carry `\n`, `\r`, ANSI escapes or NUL, and written raw they would let
//! a plugin forge daemon log lines or repaint a terminal. One log line is one record, always.

use std::borrow::Cow;
use std::fmt::Write as _;
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
                escape_controls(&record.args().to_string())
            )
        });
    } else {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}",
                crate::clock::wall_rfc3339(),
                record.level(),
                escape_controls(&record.args().to_string())
            )
        });
    }
    // A second init (tests) is harmless.
    let _ = builder.try_init();
}

/// `text` with every character that could break a log line or drive a terminal written as a
/// visible escape: `\n`, `\r`, `\0`, `\x1b` (any C0 or C1 control and DEL as `\xNN`), and
/// the Unicode line separators and bidirectional overrides as `\u{NNNN}`. Plain text (the usual
/// case) is returned as is, without a copy.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if u32::from(c) < 0x100 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Controls (C0, DEL, C1), line/paragraph separators, and the bidi embedding/override/isolate
/// characters that can make a line read differently from what it holds.
/// A tab stays: it cannot end a line or move the cursor back, and plugins print tables.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let line = "[p1] hello wörld: 100% done";
        assert!(matches!(escape_controls(line), Cow::Borrowed(s) if s == line));
    }

    #[test]
    fn controls_become_visible_escapes() {
        assert_eq!(
            escape_controls("a\rb\nc\td\0e\x1b[31mf\x7fg\u{85}h"),
            "a\\rb\\nc\td\\0e\\x1b[31mf\\x7fg\\x85h"
        );
    }

    #[test]
    fn separators_and_bidi_overrides_are_escaped() {
        assert_eq!(
            escape_controls("x\u{2028}y\u{202e}z\u{2066}"),
            "x\\u{2028}y\\u{202e}z\\u{2066}"
        );
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::Error), 3);
        assert_eq!(syslog_priority(Level::Warn), 4);
        assert_eq!(syslog_priority(Level::Info), 6);
        assert_eq!(syslog_priority(Level::Debug), 7);
    }
}
