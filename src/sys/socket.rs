//! Sockets: `recvmsg` with credentials and passed descriptors (the plugins' notify sockets),
//! and the peer's supplementary groups (the control socket's access check).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// One datagram as the kernel handed it over, before any check. The fds are owned, so every
/// path that drops the datagram closes them.
#[derive(Debug)]
pub struct RawDatagram {
    pub len: usize,
    pub flags: libc::c_int,
    pub creds: Option<libc::ucred>,
    pub fds: Vec<OwnedFd>,
}

/// Room for one `SCM_CREDENTIALS` and one `SCM_RIGHTS` of `max_fds` fds, aligned
/// for `cmsghdr` (u64 elements).
#[derive(Debug)]
pub struct ControlBuffer(Vec<u64>);

impl ControlBuffer {
    pub fn new(max_fds: usize) -> ControlBuffer {
        let fds_len = (max_fds * mem::size_of::<RawFd>()) as libc::c_uint;
        let creds_len = mem::size_of::<libc::ucred>() as libc::c_uint;
        // SAFETY: CMSG_SPACE only does arithmetic on its argument.
        let bytes = unsafe { libc::CMSG_SPACE(creds_len) + libc::CMSG_SPACE(fds_len) } as usize;
        ControlBuffer(vec![0; bytes.div_ceil(mem::size_of::<u64>())])
    }

    fn byte_len(&self) -> usize {
        self.0.len() * mem::size_of::<u64>()
    }
}

/// One `recvmsg` into `payload` and `control`, taking ownership of every fd that arrived.
pub fn recv_raw(
    fd: &OwnedFd,
    payload: &mut [u8],
    control: &mut ControlBuffer,
) -> io::Result<RawDatagram> {
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid "no address, no buffers" value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.byte_len() as _;
    // SAFETY: msg points at live buffers of the stated lengths (payload via iov, control) that
    // outlive the call; the kernel writes only within them.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (creds, fds) = take_control_messages(&msg);
    Ok(RawDatagram {
        len: n as usize,
        flags: msg.msg_flags,
        creds,
        fds,
    })
}

/// Walk the control messages the kernel stored in `msg`, even when `MSG_CTRUNC` is set, because
/// the fds that did fit are already ours and must be owned to be closed.
fn take_control_messages(msg: &libc::msghdr) -> (Option<libc::ucred>, Vec<OwnedFd>) {
    let mut creds = None;
    let mut fds = Vec::new();
    let control_start = msg.msg_control as usize;
    #[allow(clippy::unnecessary_cast)] // msg_controllen is a socklen_t on musl
    let control_end = control_start + msg.msg_controllen as usize;
    // SAFETY: msg came back from recvmsg, so msg_control/msg_controllen describe the control
    // data the kernel wrote (msg_controllen was lowered to the length used).
    let mut header = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !header.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return only headers that lie wholly inside the
        // buffer; CMSG_DATA is pointer arithmetic on such a header.
        let (level, kind, cmsg_len, data) = unsafe {
            let h = &*header;
            (
                h.cmsg_level,
                h.cmsg_type,
                h.cmsg_len as usize,
                libc::CMSG_DATA(header),
            )
        };
        // The data must also lie inside the buffer; CMSG_NXTHDR checks only the next header.
        let data_end = (header as usize + cmsg_len).min(control_end);
        let data_len = data_end.saturating_sub(data as usize);
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                for i in 0..data_len / mem::size_of::<RawFd>() {
                    // SAFETY: the slot lies within data_len bytes of data (checked above); the
                    // kernel installed this fd in our table for us alone, so owning it is sound.
                    let fd = unsafe {
                        let raw = ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        OwnedFd::from_raw_fd(raw)
                    };
                    fds.push(fd);
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if data_len >= mem::size_of::<libc::ucred>() =>
            {
                // SAFETY: a whole ucred lies at data (length checked); read_unaligned copies it.
                creds = Some(unsafe { ptr::read_unaligned(data.cast::<libc::ucred>()) });
            }
            _ => {}
        }
        // SAFETY: as for CMSG_FIRSTHDR; header is a valid header inside msg's control buffer.
        header = unsafe { libc::CMSG_NXTHDR(msg, header) };
    }
    (creds, fds)
}

/// `SO_PEERGROUPS` is not exported by the libc crate for every target; its value is per
/// architecture like the other `SOL_SOCKET` options.
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERGROUPS: libc::c_int = 0x3d;
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERGROUPS: libc::c_int = 59;

/// The peer's supplementary groups at connect time.
pub fn peer_groups(stream: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID_SIZE: usize = size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // The kernel says how much room it needs when the buffer is too small; a second try with
    // that size can only fail if the peer's groups changed, which they cannot (a snapshot).
    for _ in 0..2 {
        let mut len =
            libc::socklen_t::try_from(groups.len() * GID_SIZE).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is valid for writes of `len` bytes and the kernel writes at most
        // `len` bytes into it; `len` is a valid socklen_t the kernel updates.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            groups.truncate(len / GID_SIZE);
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || len <= groups.len() * GID_SIZE {
            return Err(error);
        }
        groups.resize(len.div_ceil(GID_SIZE), 0);
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}
