//! The raw `bpf(2)` commands that aya does not expose: the probes' bare program
//! loads, and opening and detaching a pinned link.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// The kernel's internal ENOTSUPP, which BPF returns to user space.
pub const ENOTSUPP: i32 = 524;

/// `bpf(cmd, attr)`: the raw return value, or the error it set.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: the commands used through this module read `size_of::<bpf_attr>()`
    // bytes from a valid, initialized `bpf_attr` (and the buffers it points to, which
    // outlive the call) and return a new fd, zero, or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `bpf(cmd, attr)` for the commands that return a new fd.
pub fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let ret = bpf(cmd, attr)?;
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("bpf returned no fd"))?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaches the bpf_link pinned at `pin` now (`BPF_LINK_DETACH`, Linux 5.9), while
/// its pin and fds stay valid. Unpinning alone leaves the detach to a kernel work
/// item, after `unlink` has returned; detaching first makes a removal finished when
/// it returns. Link kinds the kernel cannot detach answer `EOPNOTSUPP` (or `EINVAL`
/// before 5.9): for them the unpin that follows is the detach.
pub fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))?;
    // SAFETY: `bpf_attr` is a union of plain integers; all-zero is valid.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let link = bpf_fd(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: `bpf_attr` is a union of plain integers; all-zero is valid.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}
