//! Black-box tests of hotreloadd and hotreloadctl.
mod config;
mod control;
mod ctl;
mod docs;
mod faults;
mod lifecycle;
mod plugins_dir;
mod private_dirs;
mod protocol;
mod readme;
mod recovery;
mod regressions;
mod reload;
mod start_limit;
mod supervise;
mod systemd;
mod util;
