//! Black-box tests of hotreloadd and hotreloadctl.
mod config;
mod containment;
mod control;
mod ctl;
mod docs;
mod faults;
mod lifecycle;
mod protocol;
mod regressions;
mod reload;
mod supervise;
mod systemd;
mod util;
