//! `hotreloadctl`: the command-line client of hotreloadd's control socket. All logic lives in
//! `hotreload::ctl` so it can be unit-tested; this file only hands over the process.

fn main() -> std::process::ExitCode {
    hotreload::ctl::main()
}
