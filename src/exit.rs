//! Exit codes of both binaries, and the daemon's one fatal-error type, mapped to them here only.
//!
//! The numbers are sysexits.h's (SPEC §8, hotreloadd(8), hotreloadctl(1)); every other module
//! names these constants instead of writing a number, so a code is changed or documented in one
//! place. [`FatalError::exit_code`] is the daemon's whole mapping; `ctl::CtlError::exit_code` is
//! the client's, over the same constants.

use std::fmt;

use crate::config::ConfigError;

/// The command failed: the daemon answered with an error, or a reload failed (client only).
pub const FAILURE: u8 = 1;
/// Bad command line (`EX_USAGE`).
pub const USAGE: u8 = 64;
/// The daemon is not reachable (`EX_UNAVAILABLE`, client only).
pub const UNAVAILABLE: u8 = 69;
/// Operating-system problem: socket busy, directory not creatable, poll failure (`EX_OSERR`).
pub const OS_ERROR: u8 = 71;
/// Configuration or environment error (`EX_CONFIG`).
pub const CONFIG: u8 = 78;

/// Why the daemon could not run; [`FatalError::exit_code`] maps each kind to its exit code.
#[derive(Debug)]
pub enum FatalError {
    /// Configuration problem (exit [`CONFIG`]).
    Config(String),
    /// Operating-system problem (exit [`OS_ERROR`]).
    Os(String),
}

impl FatalError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            FatalError::Config(_) => CONFIG,
            FatalError::Os(_) => OS_ERROR,
        }
    }
}

impl fmt::Display for FatalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FatalError::Config(m) | FatalError::Os(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for FatalError {}

impl From<ConfigError> for FatalError {
    fn from(e: ConfigError) -> FatalError {
        FatalError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fatal_error_kind_has_its_sysexits_code() {
        assert_eq!(FatalError::Config(String::new()).exit_code(), 78);
        assert_eq!(FatalError::Os(String::new()).exit_code(), 71);
        assert_eq!(FatalError::from(ConfigError::new("x")).exit_code(), 78);
    }
}
