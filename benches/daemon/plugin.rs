//! Plugin builds for the benchmarks: `/bin/sleep` padded to a chosen size, a distinct one per
//! serial number, installed the way a build system does it (write elsewhere, rename over).
//!
//! `sleep` (run with `args = ["1000"]`) is a real compiled executable that exits at once on
//! SIGTERM with its default disposition, so a reload's stop phase costs nothing and the figures
//! measure the daemon. Bytes appended after an ELF file are never mapped by the kernel, so the
//! padding changes the size and the BLAKE3 version without changing what runs. Builds are staged
//! outside the plugin directory and renamed in: the daemon then sees one `IN_MOVED_TO` of the
//! executable and nothing else.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Outcome;

/// Where the program every plugin runs comes from.
const SLEEP_CANDIDATES: [&str; 2] = ["/bin/sleep", "/usr/bin/sleep"];

/// The argument that keeps `sleep` running for the whole benchmark.
pub const SLEEP_ARGS: [&str; 1] = ["1000"];

/// Makes builds of one size; build `serial` differs from every other serial in its last 8 bytes.
pub struct Builds {
    image: Vec<u8>,
}

impl Builds {
    /// Builds of exactly `size` bytes, or of `sleep`'s own size when that is larger.
    pub fn new(size: usize) -> Outcome<Builds> {
        let program = SLEEP_CANDIDATES
            .iter()
            .find_map(|path| fs::read(path).ok())
            .ok_or_else(|| format!("cannot read any of {SLEEP_CANDIDATES:?}; install coreutils"))?;
        Ok(Builds::from_program(program, size))
    }

    fn from_program(mut image: Vec<u8>, size: usize) -> Builds {
        let len = size.max(image.len() + 8);
        pad_pseudo_random(&mut image, len, 0x9e37_79b9_7f4a_7c15);
        Builds { image }
    }

    /// The bytes of build `serial`.
    pub fn build(&mut self, serial: u64) -> &[u8] {
        let tail = self.image.len() - 8;
        self.image[tail..].copy_from_slice(&serial.to_le_bytes());
        &self.image
    }
}

/// Appends xorshift bytes from `seed` until `image` is `len` bytes long. Pseudo-random padding,
/// so no file system or copy path can shortcut runs of zeros.
pub fn pad_pseudo_random(image: &mut Vec<u8>, len: usize, seed: u64) {
    let mut state = seed;
    while image.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image.push(state as u8);
    }
}

/// The version the daemon reports for `bytes`: the first 16 hex digits of their BLAKE3 hash.
pub fn version_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..16].to_owned()
}

/// Plugin ids `p0000`, `p0001`, ...: sorted like numbers, valid under the SPEC's id rule.
pub fn ids(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("p{n:04}")).collect()
}

/// Writes `bytes` to `path` as an executable (mode 0755), replacing any file there.
pub fn write_executable(path: &Path, bytes: &[u8]) -> Outcome<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(path)
        .map_err(|e| format!("failed to create `{}`: {e}", path.display()))?;
    file.write_all(bytes)
        .map_err(|e| format!("failed to write `{}`: {e}", path.display()))?;
    Ok(file)
}

/// Writes `bytes` under `staging` as the next build of `id`, ready for `swap_in`, and flushes it
/// to disk: renaming a file with unwritten blocks over another makes ext4 (`auto_da_alloc`) start
/// writing it back inside rename(2), which would put the disk into the timed window.
pub fn stage(staging: &Path, id: &str, serial: u64, bytes: &[u8]) -> Outcome<PathBuf> {
    let path = staging.join(format!("{id}.{serial}"));
    let file = write_executable(&path, bytes)?;
    file.sync_data()
        .map_err(|e| format!("failed to flush `{}`: {e}", path.display()))?;
    Ok(path)
}

/// Hard-links the current build at `exec` into `staging` and returns the link. While it exists,
/// renaming a new build over `exec` does not drop the old file's last link, so rename(2) does not
/// free its blocks inline (about 1 ms per MiB on ext4), a cost of the disk that would otherwise
/// land in the timed window. The caller removes the link after timing.
pub fn pin(exec: &Path, staging: &Path) -> Outcome<PathBuf> {
    let link = staging.join("previous-build");
    let _ = fs::remove_file(&link);
    fs::hard_link(exec, &link).map_err(|e| {
        format!(
            "failed to hard-link `{}` to `{}`: {e}",
            exec.display(),
            link.display()
        )
    })?;
    Ok(link)
}

/// Atomically replaces the executable with a staged build: one rename(2).
pub fn swap_in(staged: &Path, exec: &Path) -> Outcome<()> {
    fs::rename(staged, exec).map_err(|e| {
        format!(
            "failed to rename `{}` over `{}`: {e}",
            staged.display(),
            exec.display()
        )
    })
}

/// `rm EXEC && cp STAGED EXEC`: the executable disappears, then a new file is created there and
/// filled (std's copy uses `copy_file_range`, as coreutils' `cp` does), with the staged file's
/// mode. Watchers see it vanish, appear and be written; the build is complete at its close.
pub fn remove_and_copy(staged: &Path, exec: &Path) -> Outcome<()> {
    fs::remove_file(exec).map_err(|e| format!("failed to remove `{}`: {e}", exec.display()))?;
    fs::copy(staged, exec).map(drop).map_err(|e| {
        format!(
            "failed to copy `{}` to `{}`: {e}",
            staged.display(),
            exec.display()
        )
    })
}

/// Checks of the build maker; run by `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let elf = b"\x7fELF-a-program".to_vec();
    let mut builds = Builds::from_program(elf.clone(), 1 << 10);
    let first = builds.build(1).to_vec();
    let second = builds.build(2).to_vec();
    if first.len() != 1 << 10 || second.len() != 1 << 10 || !first.starts_with(&elf) {
        return Err("builds must keep the program in front and have the asked size".into());
    }
    if version_of(&first) == version_of(&second) || version_of(&first).len() != 16 {
        return Err("two serials must give two 16-digit versions".into());
    }
    if builds.build(1) != first.as_slice() {
        return Err("the same serial must give the same bytes".into());
    }
    let small = Builds::from_program(elf.clone(), 4).build(3).len();
    if small != elf.len() + 8 {
        return Err(format!(
            "a size below the program's must still append the serial, got {small} bytes"
        ));
    }
    if ids(1001)[1000] != "p1000" || ids(2) != ["p0000", "p0001"] {
        return Err("plugin ids must be p0000, p0001, ...".into());
    }
    Ok(())
}
