//! Plugin sd_notify datagrams (SPEC §4): what any process in a plugin's group can send.
//!
//! Beyond "does not panic": whatever is accepted respects the bounds the daemon relies on when it
//! shows `STATUS=` on terminals and passes `FDNAME=` on in `LISTEN_FDNAMES`.
#![no_main]

use hotreload::plugin_notify::{self, MAX_FDNAME_BYTES, MAX_STATUS_BYTES, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match plugin_notify::parse_message_with_issues(data) {
        Ok((message, issues)) => {
            check_bounds(&message);
            for issue in &issues {
                assert!(!issue.to_string().is_empty());
            }
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});

fn check_bounds(message: &Message) {
    if let Some(status) = &message.status {
        assert!(
            status.len() <= MAX_STATUS_BYTES,
            "STATUS longer than its bound"
        );
        assert!(
            !status.chars().any(char::is_control),
            "control character in STATUS"
        );
    }
    if let Some(name) = &message.fdname {
        assert!(
            (1..=MAX_FDNAME_BYTES).contains(&name.len()),
            "FDNAME length"
        );
        assert!(
            name.bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b':'),
            "FDNAME must be printable ASCII without ':' (it is joined with ':' in LISTEN_FDNAMES)"
        );
    }
    if let Some(pid) = message.mainpid {
        assert!(pid > 0);
    }
    if let Some(errno) = message.errno {
        assert!(errno >= 0);
    }
}
