//! Black-box tests of hotreloadd and hotreloadctl.
mod config;
mod control;
mod ctl;
mod faults;
mod lifecycle;
mod reload;
mod supervise;
mod util;
