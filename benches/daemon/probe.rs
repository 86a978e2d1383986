//! A plugin that says when it started: the uniform "new process running" signal for comparing
//! `hotreloadd` with other restart tools, independent of any tool's own events.
//!
//! The probe is a 114-byte static x86-64 Linux program, written out here as an ELF image: its
//! first instruction reads `CLOCK_MONOTONIC`, then it opens the FIFO named by its first argument
//! and writes one 32-byte record (build serial, seconds, nanoseconds, pid), then waits in
//! `pause(2)` until a signal ends it (SIGTERM's default action, as every tool sends). No dynamic
//! loader, no libc start-up: the timestamp is taken within microseconds of `execve` returning to
//! user space, so every tool is measured to the same point. The serial is a constant inside the
//! mapped code; a build of any size appends pseudo-random bytes after the mapped part (never
//! read by the kernel), so builds differ only in the serial and cost the same to exec.
//!
//! The harness keeps the FIFO open for reading and writing, so a probe's non-blocking open always
//! finds a reader and a record (< PIPE_BUF) arrives whole. Monotonic time is read with the same
//! clock on both sides (`now_ns`), so `record.started_ns - rename_ns` is the reload latency.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::{Outcome, plugin};

/// The probe's code, assembled from (Intel syntax; entry: `[rsp]` = argc, `[rsp+16]` = argv[1]):
///
/// ```text
///  0  sub rsp, 32                  ; record on the stack: serial, sec, nsec, pid
///  4  mov eax, 228                 ; clock_gettime(CLOCK_MONOTONIC, rsp+8)
///  9  mov edi, 1
///  e  lea rsi, [rsp+8]
/// 13  syscall
/// 15  mov rax, [rip+0x4e]          ; the serial at 0x6a
/// 1c  mov [rsp], rax
/// 20  mov eax, 39                  ; getpid()
/// 25  syscall
/// 27  mov [rsp+24], rax
/// 2c  mov rdi, [rsp+48]            ; open(argv[1], O_WRONLY|O_NONBLOCK)
/// 31  mov eax, 2
/// 36  mov esi, 0x801
/// 3b  xor edx, edx
/// 3d  syscall
/// 3f  test rax, rax
/// 42  js 0x5e
/// 44  mov edi, eax                 ; write(fd, rsp, 32)
/// 46  mov eax, 1
/// 4b  mov rsi, rsp
/// 4e  mov edx, 32
/// 53  syscall
/// 55  mov eax, 34                  ; loop { pause() }
/// 5a  syscall
/// 5c  jmp 0x55
/// 5e  mov eax, 60                  ; exit(1): no FIFO to report to
/// 63  mov edi, 1
/// 68  syscall
/// 6a  .quad serial
/// ```
const CODE: [u8; 0x6a] = [
    0x48, 0x83, 0xec, 0x20, 0xb8, 0xe4, 0x00, 0x00, 0x00, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d,
    0x74, 0x24, 0x08, 0x0f, 0x05, 0x48, 0x8b, 0x05, 0x4e, 0x00, 0x00, 0x00, 0x48, 0x89, 0x04, 0x24,
    0xb8, 0x27, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x89, 0x44, 0x24, 0x18, 0x48, 0x8b, 0x7c, 0x24,
    0x30, 0xb8, 0x02, 0x00, 0x00, 0x00, 0xbe, 0x01, 0x08, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x05, 0x48,
    0x85, 0xc0, 0x78, 0x1a, 0x89, 0xc7, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x48, 0x89, 0xe6, 0xba, 0x20,
    0x00, 0x00, 0x00, 0x0f, 0x05, 0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7, 0xb8, 0x3c,
    0x00, 0x00, 0x00, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05,
];

/// ELF header (64) + one program header (56): the code starts right after them.
const HEADERS: usize = 64 + 56;
const LOAD_ADDR: u64 = 0x40_0000;
/// Offset of the serial in the image.
const SERIAL_AT: usize = HEADERS + CODE.len();
/// The part of the image the kernel maps: headers, code, serial.
const MAPPED: usize = SERIAL_AT + 8;
pub const RECORD: usize = 32;

/// Whether this machine can run the probe.
pub fn supported() -> bool {
    cfg!(all(target_os = "linux", target_arch = "x86_64"))
}

/// Builds of the probe of one size: build `serial` differs from the others only in its serial.
pub struct ProbeBuilds {
    image: Vec<u8>,
}

impl ProbeBuilds {
    /// Builds of exactly `size` bytes (at least the 234 bytes of the program itself).
    pub fn new(size: usize) -> ProbeBuilds {
        let mut image = elf_headers();
        image.extend_from_slice(&CODE);
        image.extend_from_slice(&[0; 8]);
        plugin::pad_pseudo_random(&mut image, size, 0x2545_f491_4f6c_dd1d);
        ProbeBuilds { image }
    }

    pub fn build(&mut self, serial: u64) -> &[u8] {
        self.image[SERIAL_AT..MAPPED].copy_from_slice(&serial.to_le_bytes());
        &self.image
    }
}

/// A static ELF64 executable header and one read+execute PT_LOAD of the first `MAPPED` bytes.
fn elf_headers() -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADERS);
    h.extend_from_slice(b"\x7fELF\x02\x01\x01\x00"); // 64-bit, little endian, version 1, SysV
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&(LOAD_ADDR + HEADERS as u64).to_le_bytes()); // e_entry
    h.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        h.extend_from_slice(&half.to_le_bytes());
    }
    h.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    h.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    h.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    h.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    h.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    h.extend_from_slice(&(MAPPED as u64).to_le_bytes()); // p_filesz
    h.extend_from_slice(&(MAPPED as u64).to_le_bytes()); // p_memsz
    h.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    h
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock the probe stamps its start with.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, so the
    // call cannot fail and leaves `ts` set.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One probe start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Start {
    pub serial: u64,
    pub started_ns: u64,
    pub pid: i32,
    /// When the harness read the record (for waits; latency uses `started_ns`).
    pub read_at: Instant,
}

impl Start {
    fn parse(record: &[u8; RECORD], read_at: Instant) -> Start {
        let word = |i: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&record[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        Start {
            serial: word(0),
            started_ns: word(1) * 1_000_000_000 + word(2),
            pid: word(3) as i32,
            read_at,
        }
    }
}

/// Serial the harness writes itself to wake the reader thread at the end.
const STOP_SERIAL: u64 = u64::MAX;

/// The FIFO every probe of one run reports to, and a thread forwarding its records.
pub struct Reports {
    pub path: PathBuf,
    writer: File,
    pub starts: Receiver<Start>,
    reader: Option<JoinHandle<()>>,
}

impl Reports {
    /// Creates the FIFO `path` and starts reading it.
    pub fn create(path: &Path) -> Outcome<Reports> {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("failed to create FIFO `{}`: {e}", path.display()))?;
        // Read+write: never sees end-of-file when no probe has it open, and a probe's
        // non-blocking open for writing always finds a reader.
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| format!("failed to open FIFO `{}`: {e}", path.display()))
        };
        let mut fifo = open()?;
        let writer = open()?;
        let (sender, starts) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut record = [0; RECORD];
            while fifo.read_exact(&mut record).is_ok() {
                let start = Start::parse(&record, Instant::now());
                if start.serial == STOP_SERIAL || sender.send(start).is_err() {
                    return;
                }
            }
        });
        Ok(Reports {
            path: path.to_path_buf(),
            writer,
            starts,
            reader: Some(reader),
        })
    }

    /// The next start, or `None` once `deadline` has passed.
    pub fn next_before(&self, deadline: Instant) -> Option<Start> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.starts.recv_timeout(wait).ok()
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        let mut stop = [0; RECORD];
        stop[..8].copy_from_slice(&STOP_SERIAL.to_le_bytes());
        if self.writer.write_all(&stop).is_ok()
            && let Some(reader) = self.reader.take()
        {
            let _ = reader.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks of the image layout (and, on x86-64 Linux, that the probe runs and reports); run by
/// `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let mut builds = ProbeBuilds::new(4096);
    let one = builds.build(1).to_vec();
    let two = builds.build(2).to_vec();
    if one.len() != 4096 || one[..SERIAL_AT] != two[..SERIAL_AT] || one == two {
        return Err("probe builds must share the program and differ in the serial".into());
    }
    if ProbeBuilds::new(0).build(0).len() != MAPPED || MAPPED != 234 {
        return Err(format!(
            "the bare probe must be {MAPPED} bytes, the mapped part"
        ));
    }
    if !supported() {
        return Ok(());
    }
    run_once_check(&one)
}

/// Runs build 1 directly and checks its record: serial, a start time after the spawn, its pid.
fn run_once_check(build: &[u8]) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("hotreload-probe-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
    let result = (|| {
        let exe = dir.join("probe");
        drop(crate::plugin::write_executable(&exe, build)?);
        let reports = Reports::create(&dir.join("starts.fifo"))?;
        let before = now_ns();
        let mut child = std::process::Command::new(&exe)
            .arg(&reports.path)
            .spawn()
            .map_err(|e| format!("failed to run the probe `{}`: {e}", exe.display()))?;
        let start = reports.next_before(Instant::now() + std::time::Duration::from_secs(5));
        let _ = child.kill();
        let _ = child.wait();
        let start = start.ok_or("the probe reported nothing within 5 s")?;
        if start.serial != 1 || start.started_ns < before || start.pid != child.id() as i32 {
            return Err(format!(
                "probe record {start:?}, spawned at {before} as {}",
                child.id()
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
