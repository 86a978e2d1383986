//! The config loader (SPEC §2–3): `parse` then `resolve`, as `hotreloadd` does with a file.
//!
//! Beyond "does not panic": a configuration that loads must survive its own `--check-config`
//! output, which is documented to read back to an equal configuration.
#![no_main]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hotreload::config::{self, Config, Env, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(config) = load(text) else { return };
    let effective = config.to_effective_toml();
    let again = load(&effective)
        .unwrap_or_else(|| panic!("effective configuration does not load:\n{effective}"));
    assert_eq!(again.to_effective_toml(), effective, "not a fixpoint");
});

fn load(text: &str) -> Option<Config> {
    let origin = Path::new("/fuzz/hotreload.toml");
    let file = match config::parse(text, origin) {
        Ok(file) => file,
        Err(error) => {
            assert!(
                error.to_string().contains("/fuzz/hotreload.toml"),
                "{error}"
            );
            return None;
        }
    };
    config::resolve(file, Some(origin.to_owned()), &Overrides::default(), &env()).ok()
}

fn env() -> Env {
    Env {
        vars: HashMap::from([("XDG_RUNTIME_DIR".to_owned(), "/run/user/1000".to_owned())]),
        euid: 1000,
        cwd: PathBuf::from("/fuzz"),
        home: Some(PathBuf::from("/home/fuzz")),
    }
}
