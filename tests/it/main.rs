//! Black-box tests of hotreloadd and hotreloadctl.
mod config;
mod control;
mod ctl;
mod docs;
mod faults;
mod lifecycle;
mod private_dirs;
mod protocol;
mod regressions;
mod reload;
mod supervise;
mod systemd;
mod util;
