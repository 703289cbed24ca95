//! Mapping objects into the address space, and what the address space looks like. Linux:
//! `mmap(2)`, `munmap(2)`, `/proc/self/maps`.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

use super::object::{Access, Object};

/// The size of a page, from `getauxval(AT_PAGESZ)` (see `getpagesize(2)`).
pub fn page_size() -> usize {
    rustix::param::page_size()
}

fn prot(access: Access) -> ProtFlags {
    match access {
        Access::Read => ProtFlags::READ,
        Access::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
    }
}

/// Unmaps `[addr, addr + len)`, `munmap(2)`.
///
/// # Safety
/// The range must be a mapping owned by the caller, and no live Rust reference may point
/// into it.
///
/// A mapping of a hugetlbfs object is unmapped only in whole huge pages: the kernel made it
/// `len` rounded up to its huge page, and refuses (`EINVAL`) a shorter `munmap`. So on `EINVAL`
/// the call is retried with `len` rounded up to 2 MiB, then to 1 GiB (the huge page sizes of
/// x86_64): each retry covers exactly the mapping the kernel made, never a neighbour.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    let mut last = None;
    for round in [page_size(), 2 << 20, 1 << 30] {
        if addr % round != 0 {
            break;
        }
        // SAFETY: forwarded from the caller; a rounded length covers only the rest of the
        // caller's own huge-page mapping (see above).
        match unsafe { rustix::mm::munmap(addr as *mut c_void, len.next_multiple_of(round)) } {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INVAL) => last = Some(rustix::io::Errno::INVAL),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or(rustix::io::Errno::INVAL).into())
}

/// Whether section mappings ask for transparent huge pages (see [`set_huge_advice`]).
static HUGE_ADVICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`map_shared_fixed`] follow each mapping of 2 MiB or more with
/// `madvise(MADV_HUGEPAGE)`: on a tmpfs mounted `huge=advise` (or shared memory where
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`) the kernel then backs the
/// section with transparent huge pages where it can; elsewhere the advice changes nothing.
/// Process-wide; set at attach from `SHMGADGET_THP=1`.
pub fn set_huge_advice(on: bool) {
    // Relaxed: a setting read by later mappings of this process; no data is published with it.
    HUGE_ADVICE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Maps `len` bytes of `object` at exactly `addr`, shared: `mmap(2)` with
/// `MAP_SHARED | MAP_FIXED | MAP_NORESERVE`. `MAP_NORESERVE` matters on hugetlbfs only: the
/// mapping does not reserve the object's huge pages up front, so a section larger than the
/// free pool can be mapped, and pages are taken by `fallocate` (commit, a clean `ENOSPC`) or
/// on first write (`SIGBUS` when the pool is empty: commit before touching). On tmpfs it
/// changes nothing (shared file mappings are not charged at map time).
///
/// # Safety
/// The range must lie inside a reservation owned by the caller (so `MAP_FIXED` replaces only
/// the caller's own pages), and no live Rust reference may point into memory it replaces.
pub unsafe fn map_shared_fixed(object: &Object, addr: usize, len: usize, access: Access) -> io::Result<()> {
    let (prot, fd) = (prot(access), &object.0);
    let flags = MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE;
    // SAFETY: forwarded from the caller.
    let p = unsafe { rustix::mm::mmap(addr as *mut c_void, len, prot, flags, fd, 0)? };
    debug_assert_eq!(p as usize, addr);
    // Relaxed: see `set_huge_advice`.
    if len >= 2 << 20 && HUGE_ADVICE.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: advice about the mapping made just above; it changes no contents. A kernel
        // without THP refuses it (EINVAL), which changes nothing either.
        let _ = unsafe { rustix::mm::madvise(p, len, rustix::mm::Advice::LinuxHugepage) };
    }
    Ok(())
}

/// Maps `len` bytes of `object` wherever the kernel likes, shared: `mmap(2)` with
/// `MAP_SHARED | MAP_NORESERVE` (see [`map_shared_fixed`]).
pub fn map_shared(object: &Object, len: usize, access: Access) -> io::Result<NonNull<u8>> {
    let (prot, fd) = (prot(access), &object.0);
    // SAFETY: without MAP_FIXED the kernel picks an unused range, so no existing memory is
    // affected.
    let p =
        unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED | MapFlags::NORESERVE, fd, 0)? };
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// The lines of `/proc/self/maps` that overlap `[addr, addr + len)`, for error messages.
pub fn mappings_overlapping(addr: usize, len: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let end = addr.saturating_add(len);
    text.lines()
        .filter(|line| {
            let range = line.split_whitespace().next().unwrap_or("");
            let mut parts = range.split('-');
            let lo = parts.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            let hi = parts.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            matches!((lo, hi), (Some(lo), Some(hi)) if lo < end && hi > addr)
        })
        .map(str::to_owned)
        .collect()
}

/// The highest user-space address plus one on this machine (47-bit on x86_64 without 5-level
/// paging hints).
pub const USER_ADDRESS_LIMIT: u64 = 0x7fff_ffff_f000;
