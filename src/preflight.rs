//! Pre-flight check: can this snapshot run on this machine?
//!
//! A reload stops the running instance only after the new build has passed this check (SPEC §5),
//! so a half-copied binary, a build for another architecture or a script whose interpreter is
//! missing fails the reload while the old instance keeps serving. The check runs on the snapshot
//! (the bytes that will be executed, on disk or staged to be written), not on the build in the
//! plugin dir, which may change again.
//!
//! It reads only the headers: at most 257 bytes at the start, the program header table (which the
//! kernel caps at 64 KiB) and, for dynamically linked binaries, the interpreter path. Section
//! headers are only bounds-checked, never read, except for the rare extended-numbering entry.
//! Everything is parsed with `from_le_bytes`/`from_be_bytes` on bounded reads; there is no mmap.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::snapshot::{OpenFailure, describe, open_regular};

/// Longest `#!` line accepted, including `#!` (the kernel's `BINPRM_BUF_SIZE`).
const SHEBANG_MAX: usize = 256;

/// How much of the file is read up front: an ELF header (at most 64 bytes) or a `#!` line plus one
/// byte to tell "line too long" from "file ends here".
const HEAD_LEN: usize = SHEBANG_MAX + 1;

/// Bytes of an unrecognized file shown in the error, in hex.
const HEAD_SHOWN: usize = 16;

/// The kernel refuses program header tables larger than this (`load_elf_phdrs`).
const MAX_PHDR_TABLE: u64 = 64 * 1024;

/// The kernel's limit on the interpreter path in `PT_INTERP` (PATH_MAX).
const MAX_INTERP_LEN: u64 = 4096;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
/// `e_phnum` value meaning "the real count is in section header 0's `sh_info`".
const PN_XNUM: u16 = 0xffff;

/// How the daemon's message about a build refused by this check begins (`last_error`, events);
/// `hotreloadctl install --wait` recognises a refused first start by it.
pub const FAILED_PREFIX: &str = "pre-flight check failed";

/// Why a snapshot cannot run here. Display: "`PATH`: PROBLEM".
#[derive(Debug)]
pub struct PreflightError {
    path: PathBuf,
    problem: Problem,
}

impl PreflightError {
    /// The file that failed the check.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// The message as the user needs it: naming `build`, the file in the plugin dir that the
    /// checked snapshot was copied from, and for a mode problem `build`'s own mode (the snapshot
    /// is the daemon's private copy, whose path and mode the user never chose).
    pub fn about_build(&self, build: &Path) -> String {
        let problem = match (&self.problem, fs::metadata(build)) {
            (Problem::NotExecutable { .. }, Ok(meta)) => Problem::NotExecutable {
                mode: meta.permissions().mode() & 0o7777,
            }
            .to_string(),
            (problem, _) => problem.to_string(),
        };
        format!("`{}`: {problem}", build.display())
    }
}

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for PreflightError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything the pre-flight check can find wrong with a file.
#[derive(Debug)]
pub enum Problem {
    /// The file does not exist.
    NotFound,
    /// The daemon's user may not read it.
    PermissionDenied,
    /// Opening or reading failed otherwise.
    Io(io::Error),
    /// A directory, FIFO, socket or device ("a directory").
    NotRegular(&'static str),
    /// Zero bytes.
    Empty,
    /// No execute bit at all; the permission bits are kept for the message.
    NotExecutable { mode: u32 },
    /// Neither `\x7fELF` nor `#!` at the start; the first bytes are kept for the message.
    Unrecognized { head: Vec<u8> },
    /// 32-bit ELF on a 64-bit machine or the reverse.
    ElfClass { found: u8 },
    /// Byte order differs from this machine's.
    ElfByteOrder { found: u8 },
    /// Built for another architecture.
    ElfMachine { found: u16, expected: u16 },
    /// Not an executable or a position-independent executable (e.g. an object file).
    ElfType { found: u16 },
    /// A header, table or segment extends past the end of the file.
    ElfTruncated(String),
    /// Headers that no loader would accept.
    ElfMalformed(String),
    /// The dynamic loader named in `PT_INTERP` does not exist on this machine.
    ElfInterpreterMissing(PathBuf),
    /// The `#!` line has no newline within the first 256 bytes.
    ShebangTooLong,
    /// `#!` followed by nothing.
    ShebangEmpty,
    /// The interpreter ends in `\r`: the script has DOS line endings.
    ShebangCarriageReturn,
    /// The interpreter is not an absolute path.
    InterpreterNotAbsolute(String),
    /// The interpreter does not exist.
    InterpreterNotFound(PathBuf),
    /// The interpreter is a directory, FIFO, ...
    InterpreterNotRegular(PathBuf, &'static str),
    /// The interpreter has no execute bit.
    InterpreterNotExecutable(PathBuf, u32),
    /// The interpreter could not be examined.
    InterpreterUnreadable(PathBuf, io::Error),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotFound => write!(f, "not found"),
            Problem::PermissionDenied => {
                write!(
                    f,
                    "permission denied: make it readable by the daemon's user"
                )
            }
            Problem::Io(e) => write!(f, "i/o error: {e}"),
            Problem::NotRegular(what) => write!(f, "{what}, not a regular file"),
            Problem::Empty => write!(f, "empty file"),
            Problem::NotExecutable { mode } => {
                write!(f, "not executable (mode {mode:04o}): chmod +x it")
            }
            Problem::Unrecognized { head } => {
                write!(
                    f,
                    "not an ELF binary or #! script (starts with {})",
                    hex(head)
                )
            }
            Problem::ElfClass { found } => write!(
                f,
                "ELF class {found} ({}), this machine is {}-bit",
                class_name(*found),
                usize::BITS
            ),
            Problem::ElfByteOrder { found } => write!(
                f,
                "ELF byte order {found} ({}), this machine is {}",
                byte_order_name(*found),
                byte_order_name(native_data())
            ),
            Problem::ElfMachine { found, expected } => write!(
                f,
                "ELF for machine {found} ({}), this machine is {expected} ({})",
                machine_name(*found),
                machine_name(*expected)
            ),
            Problem::ElfType { found } => write!(
                f,
                "ELF type {found} ({}), not an executable (ET_EXEC or ET_DYN)",
                type_name(*found)
            ),
            Problem::ElfTruncated(detail) => write!(f, "truncated ELF: {detail}"),
            Problem::ElfMalformed(detail) => write!(f, "malformed ELF: {detail}"),
            Problem::ElfInterpreterMissing(interp) => write!(
                f,
                "ELF interpreter {} not found: build for this system's libc or link statically",
                interp.display()
            ),
            Problem::ShebangTooLong => {
                write!(f, "#! line longer than {SHEBANG_MAX} bytes")
            }
            Problem::ShebangEmpty => write!(f, "#! line names no interpreter"),
            Problem::ShebangCarriageReturn => write!(
                f,
                "#! line ends in a carriage return: convert the script to unix line endings"
            ),
            Problem::InterpreterNotAbsolute(name) => write!(
                f,
                "interpreter {name} is not an absolute path: write e.g. #!/usr/bin/env {name}"
            ),
            Problem::InterpreterNotFound(p) => write!(f, "interpreter {} not found", p.display()),
            Problem::InterpreterNotRegular(p, what) => write!(
                f,
                "interpreter {} is {what}, not a regular file",
                p.display()
            ),
            Problem::InterpreterNotExecutable(p, mode) => write!(
                f,
                "interpreter {} is not executable (mode {mode:04o})",
                p.display()
            ),
            Problem::InterpreterUnreadable(p, e) => {
                write!(f, "cannot examine interpreter {}: {e}", p.display())
            }
        }
    }
}

/// Decide whether the file at `path` can be executed on this machine.
///
/// Passes a regular, non-empty file with any execute bit whose content is either an ELF
/// executable for this machine that is not truncated, or a script whose `#!` line names an
/// existing, executable interpreter by absolute path.
pub fn check(path: &Path) -> Result<(), PreflightError> {
    check_file(path).map_err(|problem| PreflightError {
        path: path.to_path_buf(),
        problem,
    })
}

/// [`check`] of a snapshot that is not written yet: `bytes` with permission bits `mode` are
/// what the daemon will write at `path` (named in the error).
pub fn check_staged(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PreflightError> {
    check_content(&Staged(bytes), bytes.len() as u64, mode).map_err(|problem| PreflightError {
        path: path.to_path_buf(),
        problem,
    })
}

fn check_file(path: &Path) -> Result<(), Problem> {
    // A snapshot is a file the daemon wrote: a symlink in its place was planted (SPEC §2).
    let (file, meta) = open_regular(path, libc::O_NOFOLLOW).map_err(open_problem)?;
    check_content(&file, meta.len(), meta.permissions().mode())
}

/// Where the checked bytes come from: the snapshot file, or the bytes about to be written to it.
trait Content {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl Content for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// The bytes of a staged snapshot.
struct Staged<'a>(&'a [u8]);

impl Content for Staged<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let bytes = self.0;
        let start = usize::try_from(offset).map_or(bytes.len(), |o| o.min(bytes.len()));
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }
}

fn check_content(file: &dyn Content, len: u64, mode: u32) -> Result<(), Problem> {
    if len == 0 {
        return Err(Problem::Empty);
    }
    if mode & 0o111 == 0 {
        return Err(Problem::NotExecutable {
            mode: mode & 0o7777,
        });
    }
    let head = read_at_most(file, 0, HEAD_LEN)?;
    if head.starts_with(ELF_MAGIC) {
        check_elf(file, &head, len)
    } else if head.starts_with(b"#!") {
        check_script(&head)
    } else {
        Err(Problem::Unrecognized {
            head: head[..head.len().min(HEAD_SHOWN)].to_vec(),
        })
    }
}

fn open_problem(failure: OpenFailure) -> Problem {
    match failure {
        OpenFailure::NotRegular(what) => Problem::NotRegular(what),
        OpenFailure::Io(e) => io_problem(e),
    }
}

fn io_problem(e: io::Error) -> Problem {
    match e.kind() {
        io::ErrorKind::NotFound => Problem::NotFound,
        io::ErrorKind::PermissionDenied => Problem::PermissionDenied,
        _ => Problem::Io(e),
    }
}

/// Read up to `len` bytes at `offset`; fewer only at end of file.
fn read_at_most(file: &dyn Content, offset: u64, len: usize) -> Result<Vec<u8>, Problem> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_problem(e)),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Read exactly `len` bytes at `offset`; the caller has checked they lie within the file, so a
/// short read means the file shrank under us.
fn read_exact(file: &dyn Content, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Problem> {
    let want = usize::try_from(len)
        .map_err(|_| Problem::ElfMalformed(format!("{what} of {len} bytes is too large")))?;
    let buf = read_at_most(file, offset, want)?;
    if buf.len() < want {
        return Err(Problem::ElfTruncated(format!(
            "{what} at offset {offset}+{len}: the file shrank while being checked"
        )));
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// ELF

/// Byte order and word size of the ELF being parsed; reads fields from header bytes.
#[derive(Clone, Copy)]
struct Layout {
    is64: bool,
    big_endian: bool,
}

impl Layout {
    /// An unsigned field of `size` bytes (2, 4 or 8) at `offset` in `bytes`.
    fn uint(self, bytes: &[u8], offset: usize, size: usize) -> Result<u64, Problem> {
        let field = offset
            .checked_add(size)
            .and_then(|end| bytes.get(offset..end))
            .ok_or_else(|| {
                Problem::ElfMalformed(format!("field at byte {offset} lies outside its header"))
            })?;
        let mut raw = [0u8; 8];
        let value = if self.big_endian {
            raw[8 - size..].copy_from_slice(field);
            u64::from_be_bytes(raw)
        } else {
            raw[..size].copy_from_slice(field);
            u64::from_le_bytes(raw)
        };
        Ok(value)
    }

    fn u16(self, bytes: &[u8], offset: usize) -> Result<u16, Problem> {
        // A 2-byte field always fits in u16.
        self.uint(bytes, offset, 2).map(|v| v as u16)
    }

    fn u32(self, bytes: &[u8], offset: usize) -> Result<u32, Problem> {
        // A 4-byte field always fits in u32.
        self.uint(bytes, offset, 4).map(|v| v as u32)
    }

    /// An address-sized field: at `off32` in ELF32, `off64` in ELF64.
    fn word(self, bytes: &[u8], off32: usize, off64: usize) -> Result<u64, Problem> {
        if self.is64 {
            self.uint(bytes, off64, 8)
        } else {
            self.uint(bytes, off32, 4)
        }
    }

    fn header_size(self) -> u64 {
        if self.is64 { 64 } else { 52 }
    }

    fn phdr_size(self) -> u64 {
        if self.is64 { 56 } else { 32 }
    }

    fn shdr_size(self) -> u64 {
        if self.is64 { 64 } else { 40 }
    }
}

/// The parts of the ELF file header the check needs.
struct Header {
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
}

/// One program header, reduced to what the check needs.
struct Segment {
    kind: u32,
    offset: u64,
    filesz: u64,
}

fn check_elf(file: &dyn Content, head: &[u8], len: u64) -> Result<(), Problem> {
    let layout = check_ident(head)?;
    if len < layout.header_size() {
        return Err(Problem::ElfTruncated(format!(
            "ELF header needs {} bytes, the file has {len}",
            layout.header_size()
        )));
    }
    let e_type = layout.u16(head, 16)?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(Problem::ElfType { found: e_type });
    }
    let machine = layout.u16(head, 18)?;
    if let Some(expected) = native_machine()
        && machine != expected
    {
        return Err(Problem::ElfMachine {
            found: machine,
            expected,
        });
    }
    check_tables(file, layout, head, len)
}

/// Check that the section header table, the program header table and every loadable segment lie
/// within the file, and that a dynamic loader named in `PT_INTERP` exists.
fn check_tables(file: &dyn Content, layout: Layout, head: &[u8], len: u64) -> Result<(), Problem> {
    let header = parse_header(layout, head)?;
    let shnum = check_section_table(file, layout, &header, len)?;
    let segments = read_segments(file, layout, &header, shnum, len)?;
    check_segments(file, &segments, len)
}

/// Check `e_ident`: class and byte order must be this machine's.
fn check_ident(head: &[u8]) -> Result<Layout, Problem> {
    let (Some(&class), Some(&data)) = (head.get(4), head.get(5)) else {
        return Err(Problem::ElfTruncated(format!(
            "ELF identification needs 16 bytes, the file has {}",
            head.len()
        )));
    };
    let is64 = match class {
        ELFCLASS32 => false,
        ELFCLASS64 => true,
        other => return Err(Problem::ElfMalformed(format!("invalid EI_CLASS {other}"))),
    };
    if is64 != (usize::BITS == 64) {
        return Err(Problem::ElfClass { found: class });
    }
    if data != ELFDATA2LSB && data != ELFDATA2MSB {
        return Err(Problem::ElfMalformed(format!("invalid EI_DATA {data}")));
    }
    if data != native_data() {
        return Err(Problem::ElfByteOrder { found: data });
    }
    Ok(Layout {
        is64,
        big_endian: data == ELFDATA2MSB,
    })
}

fn parse_header(layout: Layout, head: &[u8]) -> Result<Header, Problem> {
    // Offsets of e_phoff, e_shoff, e_phentsize.. differ between ELF32 and ELF64.
    let (base32, base64) = (40, 52); // e_ehsize
    let small = |field: usize| -> Result<u16, Problem> {
        let offset = if layout.is64 { base64 } else { base32 } + 2 * field;
        layout.u16(head, offset)
    };
    Ok(Header {
        phoff: layout.word(head, 28, 32)?,
        shoff: layout.word(head, 32, 40)?,
        phentsize: small(1)?,
        phnum: small(2)?,
        shentsize: small(3)?,
        shnum: small(4)?,
    })
}

/// Bounds-check the section header table and return the real section count (`e_shnum`, or section
/// 0's `sh_size` under extended numbering).
fn check_section_table(
    file: &dyn Content,
    layout: Layout,
    header: &Header,
    len: u64,
) -> Result<u64, Problem> {
    if header.shoff == 0 {
        return Ok(0);
    }
    if u64::from(header.shentsize) < layout.shdr_size() {
        return Err(Problem::ElfMalformed(format!(
            "e_shentsize {} is smaller than a section header ({} bytes)",
            header.shentsize,
            layout.shdr_size()
        )));
    }
    let entry = u64::from(header.shentsize);
    let shnum = if header.shnum == 0 {
        // Extended numbering: the real count lives in section header 0's sh_size.
        check_range("section header 0", header.shoff, entry, len)?;
        let first = read_exact(file, header.shoff, entry, "section header 0")?;
        layout.word(&first, 20, 32)?
    } else {
        u64::from(header.shnum)
    };
    let size = shnum
        .checked_mul(entry)
        .ok_or_else(|| Problem::ElfMalformed(format!("{shnum} section headers overflow")))?;
    check_range("section header table", header.shoff, size, len)?;
    Ok(shnum)
}

/// Read the program header table (after bounds checks) and decode every entry.
fn read_segments(
    file: &dyn Content,
    layout: Layout,
    header: &Header,
    shnum: u64,
    len: u64,
) -> Result<Vec<Segment>, Problem> {
    let phnum = if header.phnum == PN_XNUM {
        if shnum == 0 {
            return Err(Problem::ElfMalformed(
                "e_phnum is PN_XNUM but there is no section header 0".to_string(),
            ));
        }
        let first = read_exact(
            file,
            header.shoff,
            u64::from(header.shentsize),
            "section header 0",
        )?;
        u64::from(layout.u32(&first, if layout.is64 { 44 } else { 28 })?)
    } else {
        u64::from(header.phnum)
    };
    if phnum == 0 {
        return Err(Problem::ElfMalformed(
            "no program headers: nothing to load".to_string(),
        ));
    }
    if u64::from(header.phentsize) != layout.phdr_size() {
        return Err(Problem::ElfMalformed(format!(
            "e_phentsize {} is not the size of a program header ({} bytes)",
            header.phentsize,
            layout.phdr_size()
        )));
    }
    let size = phnum * layout.phdr_size();
    if size > MAX_PHDR_TABLE {
        return Err(Problem::ElfMalformed(format!(
            "program header table of {size} bytes is over the kernel's {MAX_PHDR_TABLE} byte limit"
        )));
    }
    check_range("program header table", header.phoff, size, len)?;
    let table = read_exact(file, header.phoff, size, "program header table")?;
    table
        .chunks_exact(usize::from(header.phentsize))
        .map(|entry| decode_segment(layout, entry))
        .collect()
}

fn decode_segment(layout: Layout, entry: &[u8]) -> Result<Segment, Problem> {
    Ok(Segment {
        kind: layout.u32(entry, 0)?,
        offset: layout.word(entry, 4, 8)?,
        filesz: layout.word(entry, 16, 32)?,
    })
}

/// Every loadable segment's file bytes must be in the file; a dynamic loader must exist.
fn check_segments(file: &dyn Content, segments: &[Segment], len: u64) -> Result<(), Problem> {
    for segment in segments.iter().filter(|s| s.kind == PT_LOAD) {
        check_range("segment", segment.offset, segment.filesz, len)?;
    }
    for segment in segments.iter().filter(|s| s.kind == PT_INTERP) {
        check_range("interpreter path", segment.offset, segment.filesz, len)?;
        check_elf_interpreter(file, segment)?;
    }
    Ok(())
}

fn check_elf_interpreter(file: &dyn Content, segment: &Segment) -> Result<(), Problem> {
    if segment.filesz < 2 || segment.filesz > MAX_INTERP_LEN {
        return Err(Problem::ElfMalformed(format!(
            "interpreter path of {} bytes",
            segment.filesz
        )));
    }
    let raw = read_exact(file, segment.offset, segment.filesz, "interpreter path")?;
    let name = raw.split(|&b| b == 0).next().unwrap_or(&[]);
    let interp = Path::new(OsStr::from_bytes(name));
    // A relative interpreter resolves against the plugin's cwd at exec time: leave it to exec.
    if interp.is_absolute()
        && let Err(e) = fs::metadata(interp)
        && e.kind() == io::ErrorKind::NotFound
    {
        return Err(Problem::ElfInterpreterMissing(interp.to_path_buf()));
    }
    Ok(())
}

/// `[offset, offset + size)` must lie within a file of `len` bytes.
fn check_range(what: &str, offset: u64, size: u64, len: u64) -> Result<(), Problem> {
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Problem::ElfTruncated(format!(
            "{what} at offset {offset}+{size} past end of file ({len} bytes)"
        ))),
    }
}

/// `e_machine` of binaries built for this machine; `None` where unknown (then any is accepted).
const fn native_machine() -> Option<u16> {
    if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "x86") {
        Some(3)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else if cfg!(target_arch = "arm") {
        Some(40)
    } else if cfg!(any(target_arch = "riscv64", target_arch = "riscv32")) {
        Some(243)
    } else if cfg!(target_arch = "powerpc64") {
        Some(21)
    } else if cfg!(target_arch = "powerpc") {
        Some(20)
    } else if cfg!(target_arch = "s390x") {
        Some(22)
    } else if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
        Some(8)
    } else if cfg!(target_arch = "loongarch64") {
        Some(258)
    } else if cfg!(target_arch = "sparc64") {
        Some(43)
    } else {
        None
    }
}

const fn native_data() -> u8 {
    if cfg!(target_endian = "big") {
        ELFDATA2MSB
    } else {
        ELFDATA2LSB
    }
}

fn machine_name(machine: u16) -> &'static str {
    match machine {
        2 => "sparc",
        3 => "i386",
        8 => "mips",
        20 => "powerpc",
        21 => "powerpc64",
        22 => "s390",
        40 => "arm",
        43 => "sparc64",
        62 => "x86_64",
        183 => "aarch64",
        243 => "riscv",
        258 => "loongarch",
        _ => "unknown",
    }
}

fn class_name(class: u8) -> &'static str {
    match class {
        ELFCLASS32 => "32-bit",
        ELFCLASS64 => "64-bit",
        _ => "invalid",
    }
}

fn byte_order_name(data: u8) -> &'static str {
    match data {
        ELFDATA2LSB => "little-endian",
        ELFDATA2MSB => "big-endian",
        _ => "invalid",
    }
}

fn type_name(e_type: u16) -> &'static str {
    match e_type {
        0 => "none",
        1 => "relocatable object",
        2 => "executable",
        3 => "shared object",
        4 => "core dump",
        _ => "unknown",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Scripts

/// `head` starts with `#!`: its interpreter must be an absolute path to an executable file.
fn check_script(head: &[u8]) -> Result<(), Problem> {
    let line = shebang_line(head)?;
    let interpreter = line[2..]
        .split(|&b| b == b' ' || b == b'\t')
        .find(|word| !word.is_empty())
        .ok_or(Problem::ShebangEmpty)?;
    if interpreter.ends_with(b"\r") {
        return Err(Problem::ShebangCarriageReturn);
    }
    let path = Path::new(OsStr::from_bytes(interpreter));
    if !path.is_absolute() {
        return Err(Problem::InterpreterNotAbsolute(
            String::from_utf8_lossy(interpreter).into_owned(),
        ));
    }
    check_interpreter(path)
}

/// The first line of `head` without its newline; at most [`SHEBANG_MAX`] bytes.
fn shebang_line(head: &[u8]) -> Result<&[u8], Problem> {
    let window = &head[..head.len().min(SHEBANG_MAX)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) => Ok(&window[..end]),
        // No newline: fine if the whole file is this one short line.
        None if head.len() <= SHEBANG_MAX => Ok(window),
        None => Err(Problem::ShebangTooLong),
    }
}

fn check_interpreter(path: &Path) -> Result<(), Problem> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Problem::InterpreterNotFound(path.to_path_buf()));
        }
        Err(e) => return Err(Problem::InterpreterUnreadable(path.to_path_buf(), e)),
    };
    if !meta.is_file() {
        return Err(Problem::InterpreterNotRegular(
            path.to_path_buf(),
            describe(meta.file_type()),
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(Problem::InterpreterNotExecutable(
            path.to_path_buf(),
            mode & 0o7777,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{TestDir, within_deadline};
    use std::fs::Permissions;
    use std::os::unix::fs::symlink;

    fn write_mode(path: &Path, content: &[u8], mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn problem(path: &Path) -> Problem {
        check(path).unwrap_err().problem
    }

    /// A real ELF executable of this machine to mutate.
    fn native_binary() -> Vec<u8> {
        fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn accepts_this_test_binary_and_bin_sh() {
        check(&std::env::current_exe().unwrap()).unwrap();
        // The real file: a snapshot is never a symlink, and check() does not follow one.
        check(&fs::canonicalize("/bin/sh").unwrap()).unwrap();
    }

    #[test]
    fn refuses_a_symlink_in_place_of_the_snapshot() {
        let t = TestDir::new("pf-link");
        write_mode(&t.join("real"), b"#!/bin/sh\n", 0o755);
        symlink(t.join("real"), t.join("p")).unwrap();
        assert!(check(&t.join("real")).is_ok());
        match problem(&t.join("p")) {
            Problem::Io(e) => assert_eq!(e.raw_os_error(), Some(libc::ELOOP)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepts_a_copy_of_a_native_binary() {
        let t = TestDir::new("pf-copy");
        write_mode(&t.join("p"), &native_binary(), 0o700);
        check(&t.join("p")).unwrap();
    }

    #[test]
    fn accepts_shell_script() {
        let t = TestDir::new("pf-script");
        write_mode(&t.join("p"), b"#!/bin/sh\necho hi\n", 0o755);
        check(&t.join("p")).unwrap();
        write_mode(&t.join("q"), b"#!  /bin/sh -e\n", 0o700);
        check(&t.join("q")).unwrap();
        write_mode(&t.join("r"), b"#!/bin/sh", 0o700);
        check(&t.join("r")).unwrap();
    }

    #[test]
    fn accepts_interpreter_behind_symlink() {
        let t = TestDir::new("pf-interp-link");
        symlink("/bin/sh", t.join("shell")).unwrap();
        let script = format!("#!{}\n", t.join("shell").display());
        write_mode(&t.join("p"), script.as_bytes(), 0o755);
        check(&t.join("p")).unwrap();
    }

    #[test]
    fn rejects_empty_file() {
        let t = TestDir::new("pf-empty");
        write_mode(&t.join("p"), b"", 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("`{}`: empty file", t.join("p").display())
        );
    }

    #[test]
    fn rejects_non_executable() {
        let t = TestDir::new("pf-noexec");
        write_mode(&t.join("p"), b"#!/bin/sh\n", 0o644);
        let err = check(&t.join("p")).unwrap_err();
        assert!(
            err.to_string().contains("not executable (mode 0644)"),
            "{err}"
        );
    }

    #[test]
    fn accepts_group_only_execute_bit() {
        let t = TestDir::new("pf-groupexec");
        write_mode(&t.join("p"), b"#!/bin/sh\n", 0o610);
        check(&t.join("p")).unwrap();
    }

    #[test]
    fn rejects_random_bytes_showing_them_in_hex() {
        let t = TestDir::new("pf-random");
        let bytes: Vec<u8> = (0..100u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(1))
            .collect();
        write_mode(&t.join("p"), &bytes, 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(matches!(err.problem(), Problem::Unrecognized { .. }));
        assert!(
            err.to_string()
                .contains("not an ELF binary or #! script (starts with 01 26 4b 70"),
            "{err}"
        );
    }

    #[test]
    fn rejects_truncated_binary() {
        let t = TestDir::new("pf-trunc");
        let bin = fs::read("/bin/sh").unwrap();
        write_mode(&t.join("p"), &bin[..4096], 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(matches!(err.problem(), Problem::ElfTruncated(_)), "{err}");
        assert!(
            err.to_string().contains("past end of file (4096 bytes)"),
            "{err}"
        );
    }

    #[test]
    fn rejects_binary_missing_only_its_section_headers() {
        let t = TestDir::new("pf-trunc-sh");
        let bin = native_binary();
        write_mode(&t.join("p"), &bin[..bin.len() - 1], 0o755);
        assert!(matches!(problem(&t.join("p")), Problem::ElfTruncated(_)));
    }

    #[test]
    fn rejects_header_only() {
        let t = TestDir::new("pf-header");
        let bin = native_binary();
        write_mode(&t.join("p"), &bin[..40], 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(
            err.to_string().contains("ELF header needs 64 bytes"),
            "{err}"
        );
        write_mode(&t.join("q"), &bin[..5], 0o755);
        assert!(matches!(problem(&t.join("q")), Problem::ElfTruncated(_)));
    }

    #[test]
    fn rejects_other_machine() {
        let t = TestDir::new("pf-machine");
        let mut bin = native_binary();
        let other: u16 = if native_machine() == Some(183) {
            62
        } else {
            183
        };
        let bytes = if cfg!(target_endian = "big") {
            other.to_be_bytes()
        } else {
            other.to_le_bytes()
        };
        bin[18..20].copy_from_slice(&bytes);
        write_mode(&t.join("p"), &bin, 0o755);
        let err = check(&t.join("p")).unwrap_err();
        if cfg!(target_arch = "x86_64") {
            assert!(
                err.to_string()
                    .ends_with("ELF for machine 183 (aarch64), this machine is 62 (x86_64)"),
                "{err}"
            );
        }
        assert!(matches!(err.problem(), Problem::ElfMachine { .. }));
    }

    #[test]
    fn rejects_other_class_and_byte_order() {
        let t = TestDir::new("pf-class");
        let mut bin = native_binary();
        bin[4] = if usize::BITS == 64 { 1 } else { 2 };
        write_mode(&t.join("p"), &bin, 0o755);
        assert!(matches!(problem(&t.join("p")), Problem::ElfClass { .. }));

        let mut bin = native_binary();
        bin[5] = if cfg!(target_endian = "big") { 1 } else { 2 };
        write_mode(&t.join("q"), &bin, 0o755);
        assert!(matches!(
            problem(&t.join("q")),
            Problem::ElfByteOrder { .. }
        ));
    }

    #[test]
    fn rejects_relocatable_object() {
        let t = TestDir::new("pf-type");
        let mut bin = native_binary();
        let rel: u16 = 1;
        let bytes = if cfg!(target_endian = "big") {
            rel.to_be_bytes()
        } else {
            rel.to_le_bytes()
        };
        bin[16..18].copy_from_slice(&bytes);
        write_mode(&t.join("p"), &bin, 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(err.to_string().contains("relocatable object"), "{err}");
    }

    #[test]
    fn rejects_missing_elf_interpreter() {
        let t = TestDir::new("pf-ld");
        let mut bin = fs::read("/bin/sh").unwrap();
        let Some(at) = bin.windows(4).position(|w| w == b"/lib") else {
            return; // a static /bin/sh has no PT_INTERP to corrupt
        };
        bin[at + 1..at + 4].copy_from_slice(b"zzz");
        write_mode(&t.join("p"), &bin, 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(
            matches!(err.problem(), Problem::ElfInterpreterMissing(_)),
            "{err}"
        );
        assert!(err.to_string().contains("/zzz"), "{err}");
    }

    #[test]
    fn rejects_missing_interpreter() {
        let t = TestDir::new("pf-nointerp");
        write_mode(&t.join("p"), b"#!/no/such -x\n", 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(
            err.to_string().ends_with("interpreter /no/such not found"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_shebang_lines() {
        let t = TestDir::new("pf-shebang");
        type Expect = fn(&Problem) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"#!\n", |p| matches!(p, Problem::ShebangEmpty)),
            (b"#!   \t\n", |p| matches!(p, Problem::ShebangEmpty)),
            (b"#!/bin/sh\r\n", |p| {
                matches!(p, Problem::ShebangCarriageReturn)
            }),
            (b"#!sh\n", |p| {
                matches!(p, Problem::InterpreterNotAbsolute(_))
            }),
            (b"#!/\n", |p| {
                matches!(p, Problem::InterpreterNotRegular(..))
            }),
        ];
        for (i, (content, expected)) in cases.iter().enumerate() {
            let path = t.join(&format!("p{i}"));
            write_mode(&path, content, 0o755);
            let found = problem(&path);
            assert!(expected(&found), "{content:?}: {found:?}");
        }
    }

    #[test]
    fn rejects_too_long_shebang_line() {
        let t = TestDir::new("pf-long");
        let mut long = b"#!/bin/sh ".to_vec();
        long.resize(400, b'x');
        long.push(b'\n');
        write_mode(&t.join("p"), &long, 0o755);
        let err = check(&t.join("p")).unwrap_err();
        assert!(err.to_string().contains("longer than 256 bytes"), "{err}");

        // 255 bytes + newline is the longest line accepted.
        let mut fits = b"#!/bin/sh ".to_vec();
        fits.resize(255, b'x');
        fits.extend_from_slice(b"\nmore\n");
        write_mode(&t.join("q"), &fits, 0o755);
        check(&t.join("q")).unwrap();
    }

    #[test]
    fn rejects_non_executable_interpreter() {
        let t = TestDir::new("pf-interp-noexec");
        write_mode(&t.join("interp"), b"", 0o644);
        let script = format!("#!{}\n", t.join("interp").display());
        write_mode(&t.join("p"), script.as_bytes(), 0o755);
        assert!(matches!(
            problem(&t.join("p")),
            Problem::InterpreterNotExecutable(_, 0o644)
        ));
    }

    #[test]
    fn rejects_directory_fifo_and_missing() {
        let t = TestDir::new("pf-kinds");
        fs::create_dir(t.join("d")).unwrap();
        let err = check(&t.join("d")).unwrap_err();
        assert!(
            err.to_string().ends_with("a directory, not a regular file"),
            "{err}"
        );

        let fifo = t.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();
        let found = within_deadline(move || check(&fifo).unwrap_err().problem);
        assert!(matches!(found, Problem::NotRegular("a fifo")), "{found:?}");

        let err = check(&t.join("missing")).unwrap_err();
        assert!(matches!(err.problem(), Problem::NotFound));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// Endian-aware writer of a minimal ELF image: header, program headers, padding.
    struct Synthetic {
        layout: Layout,
        bytes: Vec<u8>,
    }

    impl Synthetic {
        fn put(&mut self, offset: usize, size: usize, value: u64) {
            let raw = if self.layout.big_endian {
                value.to_be_bytes()[8 - size..].to_vec()
            } else {
                value.to_le_bytes()[..size].to_vec()
            };
            self.bytes[offset..offset + size].copy_from_slice(&raw);
        }

        /// An ELF of `len` bytes whose program headers describe `segments` (type, offset, filesz).
        fn build(layout: Layout, segments: &[(u32, u64, u64)], len: usize) -> Vec<u8> {
            let mut elf = Synthetic {
                layout,
                bytes: vec![0; len],
            };
            let (header, phdr) = (layout.header_size(), layout.phdr_size());
            elf.bytes[..4].copy_from_slice(ELF_MAGIC);
            elf.bytes[4] = if layout.is64 { ELFCLASS64 } else { ELFCLASS32 };
            elf.bytes[5] = if layout.big_endian {
                ELFDATA2MSB
            } else {
                ELFDATA2LSB
            };
            elf.put(16, 2, u64::from(ET_DYN));
            let word = if layout.is64 { 8 } else { 4 };
            elf.put(if layout.is64 { 32 } else { 28 }, word, header); // e_phoff
            let small = if layout.is64 { 52 } else { 40 };
            elf.put(small + 2, 2, phdr); // e_phentsize
            elf.put(small + 4, 2, segments.len() as u64); // e_phnum
            for (i, &(kind, offset, filesz)) in segments.iter().enumerate() {
                let at = (header + i as u64 * phdr) as usize;
                elf.put(at, 4, u64::from(kind));
                elf.put(at + if layout.is64 { 8 } else { 4 }, word, offset);
                elf.put(at + if layout.is64 { 32 } else { 16 }, word, filesz);
            }
            elf.bytes
        }
    }

    fn tables_of(t: &TestDir, layout: Layout, image: &[u8]) -> Result<(), Problem> {
        let path = t.join("elf");
        fs::write(&path, image).unwrap();
        let file = File::open(&path).unwrap();
        let head = read_at_most(&file, 0, HEAD_LEN).unwrap();
        check_tables(&file, layout, &head, image.len() as u64)
    }

    #[test]
    fn parses_elf32_and_elf64_in_both_byte_orders() {
        let t = TestDir::new("pf-synthetic");
        for is64 in [false, true] {
            for big_endian in [false, true] {
                let layout = Layout { is64, big_endian };
                let fits = Synthetic::build(layout, &[(PT_LOAD, 0, 300), (PT_LOAD, 200, 100)], 300);
                tables_of(&t, layout, &fits).unwrap();

                let past = Synthetic::build(layout, &[(PT_LOAD, 0, 300), (PT_LOAD, 200, 101)], 300);
                match tables_of(&t, layout, &past) {
                    Err(Problem::ElfTruncated(detail)) => assert_eq!(
                        detail,
                        "segment at offset 200+101 past end of file (300 bytes)"
                    ),
                    other => panic!("is64={is64} big={big_endian}: {other:?}"),
                }

                // A huge offset must not overflow into a pass.
                let wraps =
                    Synthetic::build(layout, &[(PT_LOAD, u64::MAX >> 1, u64::MAX >> 1)], 300);
                let wraps = if is64 {
                    wraps
                } else {
                    Synthetic::build(layout, &[(PT_LOAD, 0xffff_fff0, 0x20)], 300)
                };
                assert!(matches!(
                    tables_of(&t, layout, &wraps),
                    Err(Problem::ElfTruncated(_))
                ));

                // Non-loadable segments may point anywhere.
                let note = Synthetic::build(layout, &[(PT_LOAD, 0, 300), (4, 5000, 10)], 300);
                tables_of(&t, layout, &note).unwrap();
            }
        }
    }

    #[test]
    fn rejects_program_header_table_past_end() {
        let t = TestDir::new("pf-phdr-past");
        let layout = Layout {
            is64: usize::BITS == 64,
            big_endian: cfg!(target_endian = "big"),
        };
        let segments = vec![(PT_LOAD, 0, 10); 4];
        let image = Synthetic::build(layout, &segments, 300);
        let err = tables_of(
            &t,
            layout,
            &image[..(layout.header_size() + 2 * layout.phdr_size()) as usize],
        );
        match err {
            Err(Problem::ElfTruncated(detail)) => {
                assert!(
                    detail.starts_with("program header table at offset"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
        let none = Synthetic::build(layout, &[], 300);
        assert!(matches!(
            tables_of(&t, layout, &none),
            Err(Problem::ElfMalformed(_))
        ));
    }

    #[test]
    fn truncated_loadable_segment_is_caught_without_section_headers() {
        let t = TestDir::new("pf-trunc-noshdr");
        // A stripped binary: its loadable segments reach nearly to the end of the file (a debug
        // test binary ends in megabytes of unloaded debug info).
        let mut bin = fs::read("/bin/sh").unwrap();
        // Zero e_shoff: only the PT_LOAD bounds can notice the truncation now.
        let shoff = if usize::BITS == 64 { 40..48 } else { 32..36 };
        bin[shoff].fill(0);
        write_mode(&t.join("whole"), &bin, 0o755);
        check(&t.join("whole")).unwrap();
        write_mode(&t.join("half"), &bin[..bin.len() / 2], 0o755);
        let err = check(&t.join("half")).unwrap_err();
        assert!(
            err.to_string().contains("truncated ELF: segment at offset"),
            "{err}"
        );
    }

    #[test]
    fn staged_bytes_get_the_same_verdict_as_the_file_they_become() {
        let t = TestDir::new("preflight-staged");
        let binary = native_binary();
        let mut truncated = binary.clone();
        truncated.truncate(binary.len() / 2);
        let cases: [(&str, &[u8], u32); 7] = [
            ("binary", &binary, 0o700),
            ("truncated", &truncated, 0o700),
            ("not-executable", &binary, 0o600),
            ("empty", b"", 0o700),
            ("script", b"#!/bin/sh\necho hi\n", 0o700),
            ("dos-script", b"#!/bin/sh\r\necho hi\r\n", 0o700),
            ("text", b"hello world\n", 0o700),
        ];
        for (name, bytes, mode) in cases {
            let path = t.join(name);
            write_mode(&path, bytes, mode);
            let from_file = check(&path).map_err(|e| e.to_string());
            let from_bytes = check_staged(&path, bytes, mode).map_err(|e| e.to_string());
            assert_eq!(from_bytes, from_file, "{name}");
        }
    }
}
