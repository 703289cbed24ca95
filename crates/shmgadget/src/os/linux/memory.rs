//! Memory management beyond placing sections: views of an object mapped anywhere (read-only or
//! copy-on-write), page protection, which pages are resident, what this process has mapped at
//! an address, and flushing a shared mapping to its file. Linux: `mmap(2)`, `mprotect(2)`,
//! `mincore(2)`, `msync(2)`, `/proc/self/maps`.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, MprotectFlags, MsyncFlags, ProtFlags};

use super::object::Object;
use crate::os::{FlushMode, Protection, Region, ViewKind};

/// Maps `len` bytes of `object` from `offset` (page-aligned) wherever the kernel likes:
/// `mmap(2)` with `MAP_SHARED, PROT_READ` or `MAP_PRIVATE, PROT_READ | PROT_WRITE`. The
/// kernel never picks an address inside a reservation, so a view never lands in a window.
pub fn map_view(object: &Object, offset: u64, len: usize, kind: ViewKind) -> io::Result<NonNull<u8>> {
    let (prot, flags) = match kind {
        ViewKind::ReadOnly => (ProtFlags::READ, MapFlags::SHARED),
        ViewKind::CopyOnWrite => (ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE),
    };
    // SAFETY: without MAP_FIXED the kernel picks an unused range, so no existing memory is
    // affected.
    let p = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, &object.0, offset)? };
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Changes this process's protection of `[addr, addr + len)`, `mprotect(2)`. `addr` must be
/// page-aligned.
///
/// # Safety
/// The range must be a mapping owned by the caller; making it inaccessible or read-only must
/// not break a live Rust reference into it (section memory is reached through raw pointers).
pub unsafe fn protect(addr: usize, len: usize, protection: Protection) -> io::Result<()> {
    let flags = match protection {
        Protection::None => MprotectFlags::empty(),
        Protection::Read => MprotectFlags::READ,
        Protection::ReadWrite => MprotectFlags::READ | MprotectFlags::WRITE,
    };
    // SAFETY: forwarded from the caller.
    unsafe { rustix::mm::mprotect(addr as *mut c_void, len, flags)? };
    Ok(())
}

/// Writes the dirty pages of `[addr, addr + len)` back to the file it maps, `msync(2)`.
/// `addr` must be page-aligned and the range mapped.
pub fn flush(addr: usize, len: usize, mode: FlushMode) -> io::Result<()> {
    let flags = match mode {
        FlushMode::Sync => MsyncFlags::SYNC,
        FlushMode::Async => MsyncFlags::ASYNC,
    };
    // SAFETY: msync changes no memory contents or mapping; an unmapped range is ENOMEM.
    unsafe { rustix::mm::msync(addr as *mut c_void, len, flags)? };
    Ok(())
}

/// How many of the pages of `[addr, addr + len)` (`addr` page-aligned) are resident in memory
/// now, `mincore(2)`. For a shared mapping of an object this is the object's page cache. Fails
/// (`ENOMEM`) if part of the range is not mapped.
pub fn resident_pages(addr: usize, len: usize) -> io::Result<usize> {
    let page = super::map::page_size();
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires; mincore only
    // writes into it and reads no memory of the range.
    let r = unsafe { libc::mincore(addr as *mut c_void, len, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
}

/// The mapping of this process that contains `addr`, if any (`/proc/self/maps`).
pub fn region_at(addr: usize) -> Option<Region> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?.as_bytes();
        let (lo, hi) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
        if addr < start || addr >= end || perms.len() < 4 {
            return None;
        }
        let protection = match (perms[0], perms[1]) {
            (b'r', b'w') => Protection::ReadWrite,
            (b'r', _) => Protection::Read,
            _ => Protection::None,
        };
        // offset, device, inode, then the path (which may contain spaces).
        let path = fields.skip(3).collect::<Vec<_>>().join(" ");
        Some(Region { start, end, protection, shared: perms[3] == b's', path })
    })
}

impl Object {
    /// Whether the object's page containing `offset` is in memory with contents now (written
    /// or read since it was last decommitted; on tmpfs a page only `fallocate`d is reserved
    /// memory but not yet in the page cache, so it reports false): maps that one page read-only anywhere (`mmap(2)`), asks `mincore(2)`
    /// (which for a shared file mapping reports the page cache, pages never touched by this
    /// mapping included) and unmaps it. `offset` must be below the object's size.
    /// On hugetlbfs the page is the object's huge page ([`Object::page_size`]).
    pub fn page_resident(&self, offset: u64) -> io::Result<bool> {
        let page = self.page_size()?;
        let start = offset - offset % page as u64;
        // NORESERVE: a hugetlbfs page is only looked at, never reserved.
        let flags = MapFlags::SHARED | MapFlags::NORESERVE;
        // SAFETY: without MAP_FIXED the kernel picks an unused range; nothing else is affected.
        let p = unsafe { rustix::mm::mmap(std::ptr::null_mut(), page, ProtFlags::READ, flags, &self.0, start)? };
        let resident = resident_pages(p as usize, super::map::page_size()).map(|n| n.min(1));
        // SAFETY: `p` is the one-page mapping made above, referenced by nothing.
        let _ = unsafe { rustix::mm::munmap(p, page) };
        Ok(resident? == 1)
    }
}
