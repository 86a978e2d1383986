//! The mio token space: which readiness event belongs to which subsystem.
//!
//! Fixed sources get named constants; dynamic ones (plugin pipes, control clients) get disjoint
//! ranges so the dispatcher can route a token with one comparison, and a token that is no longer
//! registered (closed earlier in the same batch) is recognised and ignored.

use mio::Token;

pub const SIGNALS: Token = Token(0);
pub const INOTIFY: Token = Token(1);
/// Plugin stdout/stderr pipes: `PIPES_BASE + n`, n never reused within a run.
pub const PIPES_BASE: usize = 1 << 32;
/// Control socket listener and clients (owned by the control server).
pub const CONTROL_BASE: usize = 1 << 40;

pub fn is_pipe(token: Token) -> bool {
    (PIPES_BASE..CONTROL_BASE).contains(&token.0)
}
