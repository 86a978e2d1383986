//! `hotreloadd`: the daemon's entry point.
fn main() {}
