//! Black-box tests of hotreloadd and hotreloadctl.
