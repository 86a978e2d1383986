//! Small pure helpers: fresh random names, the version the daemon must report, `sh` quoting,
//! and the checks of the contract's formats (timestamps, positions, responses, events).

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::SystemTime;

use serde_json::Value;

/// A fresh random hex string (`2 * bytes` digits), unique per process, call and time.
pub fn random_hex(bytes: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{}-{}-{nanos}-{:?}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        thread::current().id()
    );
    blake3::hash(seed.as_bytes()).to_hex()[..2 * bytes].to_string()
}

/// The version the daemon must report for an executable: first 16 hex digits of its BLAKE3.
pub fn expected_version(content: &[u8]) -> String {
    blake3::hash(content).to_hex()[..16].to_string()
}

/// Quotes a string for POSIX `sh`.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`: RFC 3339 with milliseconds, UTC (SPEC §6 event `time`).
pub fn is_rfc3339_millis_utc(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    let punct = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ];
    b.len() == 24
        && digits.iter().all(|&i| b[i].is_ascii_digit())
        && punct.iter().all(|&(i, c)| b[i] == c)
}

/// True if `text` gives line `line` and column `column` in one of the usual notations.
pub fn mentions_line_and_column(text: &str, line: u32, column: u32) -> bool {
    let lower = text.to_lowercase();
    [
        format!(":{line}:{column}"),
        format!("line {line}, column {column}"),
        format!("line {line} column {column}"),
        format!("line {line}, col {column}"),
        format!("line {line}:{column}"),
    ]
    .iter()
    .any(|form| lower.contains(form.as_str()))
}

#[track_caller]
pub fn assert_success<'a>(resp: &'a Value, what: &str) -> &'a Value {
    assert_eq!(
        resp["status"], "success",
        "contract (SPEC §6): {what} answers status success; saw {resp}"
    );
    resp
}

#[track_caller]
pub fn assert_error<'a>(resp: &'a Value, code: &str, what: &str) -> &'a Value {
    assert!(
        resp["status"] == "error" && resp["code"] == code,
        "contract (SPEC §6): {what} answers status error, code {code:?}; saw {resp}"
    );
    assert!(
        resp["error"].as_str().is_some_and(|e| !e.is_empty()),
        "contract (SPEC §6): error responses carry a human message in 'error'; saw {resp}"
    );
    resp
}

/// True if the event is `name` about plugin `plugin`.
pub fn is_event(event: &Value, name: &str, plugin: &str) -> bool {
    event["event"] == name && event["plugin"] == plugin
}

/// Milliseconds since the epoch of an event's `time` (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
#[track_caller]
pub fn event_ms(event: &Value) -> i64 {
    let text = event["time"].as_str().unwrap_or_default();
    let num = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("contract (SPEC §6): event time; saw {event}"))
    };
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    // Days from 1970-01-01 to the civil date (proleptic Gregorian).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    secs * 1000 + num(20..23)
}
