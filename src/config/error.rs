//! `ConfigError`: the one error type of configuration resolution.
//!
//! Every configuration problem (bad TOML, unknown key, bad value, bad environment variable,
//! unreadable or missing explicit file) is fatal at start-up and maps to exit code 78
//! (`EX_CONFIG`), and on `SIGHUP`/`reload-config` it is reported while the running configuration
//! stays. Callers therefore need exactly one thing from it: a single clear, human-readable line.

use std::fmt;

/// A configuration error: one message naming the file, key or variable and the value involved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    /// The process exit code for any configuration error (`EX_CONFIG` from sysexits.h).
    pub const EXIT_CODE: u8 = crate::exit::CONFIG;

    pub(crate) fn new(message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
        }
    }

    /// The message, also what `Display` prints.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Always [`ConfigError::EXIT_CODE`]; here so callers map errors to exit codes in one place.
    pub fn exit_code(&self) -> u8 {
        Self::EXIT_CODE
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}
