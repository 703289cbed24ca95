//! Memory management beyond placing sections: views of an object mapped anywhere (read-only or
//! copy-on-write), page protection, which pages are resident, what this process has mapped at
//! an address, and flushing a shared mapping to its file. Windows: `MapViewOfFileEx`,
//! `VirtualProtect`, `QueryWorkingSetEx`, `VirtualQuery`, `FlushViewOfFile`.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use windows_sys::Win32::System::Memory::{
    FlushViewOfFile, MEM_FREE, MEM_MAPPED, PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE, PAGE_EXECUTE_WRITECOPY,
    PAGE_NOACCESS, PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOPY, VirtualProtect,
};
use windows_sys::Win32::System::ProcessStatus::{K32QueryWorkingSetEx, PSAPI_WORKING_SET_EX_INFORMATION};
use windows_sys::Win32::System::Threading::GetCurrentProcess;

use super::object::{Object, last_error};
use super::reserve::query;
use crate::os::{FlushMode, Protection, Region, ViewKind};

/// Maps `len` bytes of `object` from `offset` wherever the system likes (never inside a
/// reservation, so never in a window).
pub fn map_view(object: &Object, offset: u64, len: usize, kind: ViewKind) -> io::Result<NonNull<u8>> {
    super::map::map_anywhere(object, offset, len, kind == ViewKind::CopyOnWrite)
}

/// Changes this process's protection of `[addr, addr + len)`, `VirtualProtect`.
///
/// # Safety
/// The range must be a mapping owned by the caller; making it inaccessible or read-only must
/// not break a live Rust reference into it (section memory is reached through raw pointers).
pub unsafe fn protect(addr: usize, len: usize, protection: Protection) -> io::Result<()> {
    let copy_on_write = query(addr).is_some_and(|m| m.AllocationProtect == PAGE_WRITECOPY);
    let flags = match protection {
        Protection::None => PAGE_NOACCESS,
        Protection::Read => PAGE_READONLY,
        Protection::ReadWrite if copy_on_write => PAGE_WRITECOPY,
        Protection::ReadWrite => PAGE_READWRITE,
    };
    let mut old = 0;
    // SAFETY: forwarded from the caller.
    if unsafe { VirtualProtect(addr as *const c_void, len, flags, &mut old) } == 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Writes the dirty pages of `[addr, addr + len)` back to the file it maps, `FlushViewOfFile`.
pub fn flush(addr: usize, len: usize, mode: FlushMode) -> io::Result<()> {
    let _ = mode;
    // SAFETY: FlushViewOfFile changes no memory contents or mapping; an unmapped range fails.
    if unsafe { FlushViewOfFile(addr as *const c_void, len) } == 0 {
        return Err(last_error());
    }
    Ok(())
}

/// How many of the pages of `[addr, addr + len)` are in this process's working set now
/// (`QueryWorkingSetEx`). Unlike Linux's `mincore`, a page of the file cache that this process
/// has not touched does not count.
pub fn resident_pages(addr: usize, len: usize) -> io::Result<usize> {
    let page = super::map::page_size();
    let pages = len.div_ceil(page);
    if query(addr).is_none_or(|m| m.State == MEM_FREE) {
        return Err(io::Error::from_raw_os_error(windows_sys::Win32::Foundation::ERROR_INVALID_ADDRESS as i32));
    }
    let mut count = 0;
    let mut infos: Vec<PSAPI_WORKING_SET_EX_INFORMATION> = Vec::with_capacity(pages.min(4096));
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(4096);
        infos.clear();
        for i in 0..n {
            // SAFETY: all-zero bytes are a valid entry; only the address is set.
            let mut e: PSAPI_WORKING_SET_EX_INFORMATION = unsafe { std::mem::zeroed() };
            e.VirtualAddress = (addr + (first + i) * page) as *mut c_void;
            infos.push(e);
        }
        // SAFETY: `infos` holds `n` initialised entries, which the call reads and writes.
        let ok = unsafe {
            K32QueryWorkingSetEx(
                GetCurrentProcess(),
                infos.as_mut_ptr().cast(),
                (n * size_of::<PSAPI_WORKING_SET_EX_INFORMATION>()) as u32,
            )
        };
        if ok == 0 {
            return Err(last_error());
        }
        // SAFETY: the union's flags view is always initialised (the call wrote it).
        count += infos.iter().filter(|e| unsafe { e.VirtualAttributes.Flags } & 1 != 0).count();
        first += n;
    }
    Ok(count)
}

/// The region of this process that contains `addr`, if anything is there (`VirtualQuery`).
pub fn region_at(addr: usize) -> Option<Region> {
    let m = query(addr)?;
    if m.State == MEM_FREE {
        return None;
    }
    let protection = match m.Protect & 0xff {
        PAGE_READWRITE | PAGE_WRITECOPY | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY => Protection::ReadWrite,
        PAGE_READONLY | PAGE_EXECUTE_READ => Protection::Read,
        _ => Protection::None,
    };
    let start = m.BaseAddress as usize;
    Some(Region { start, end: start + m.RegionSize, protection, shared: m.Type == MEM_MAPPED, path: String::new() })
}

impl Object {
    /// Whether the object's page containing `offset` has contents: maps that page read-only
    /// anywhere, reads one byte of it and asks whether the page is in the working set (a read
    /// brings a page of the file cache in without allocating one for a hole only on some file
    /// systems; treat the answer as a hint). `offset` must be below the object's size.
    pub fn page_resident(&self, offset: u64) -> io::Result<bool> {
        let page = super::map::page_size() as u64;
        let start = offset - offset % page;
        let p = super::map::map_anywhere(self, start, page as usize, false)?;
        let resident = resident_pages(p.as_ptr() as usize, page as usize);
        // SAFETY: `p` is the one-page view made above, referenced by nothing.
        let _ = unsafe { super::map::unmap(p.as_ptr() as usize, page as usize) };
        Ok(resident? == 1)
    }
}
