//! Mapping objects into the address space, and what the address space looks like. Windows:
//! `CreateFileMappingW` on the object's file, `MapViewOfFileEx`, `UnmapViewOfFile`,
//! `VirtualQuery`.

use std::ffi::c_void;
use std::io;
use std::os::windows::io::AsRawHandle;
use std::ptr::NonNull;

use windows_sys::Win32::Foundation::{CloseHandle, ERROR_INVALID_ADDRESS, HANDLE};
use windows_sys::Win32::System::Memory::{
    CreateFileMappingW, FILE_MAP_ALL_ACCESS, FILE_MAP_COPY, FILE_MAP_READ, MEM_COMMIT, MEM_FREE, MEM_IMAGE, MEM_MAPPED,
    MEM_RELEASE, MEM_RESERVE, MEMORY_MAPPED_VIEW_ADDRESS, MapViewOfFileEx, PAGE_PROTECTION_FLAGS, PAGE_READONLY,
    PAGE_READWRITE, PAGE_WRITECOPY, UnmapViewOfFile, VirtualFree,
};

use super::object::{Access, Object, last_error, os_error};
use super::reserve::{clear_for_view, query, rereserve};

/// The granularity of view addresses and file offsets (`SYSTEM_INFO::dwAllocationGranularity`,
/// 64 KiB on every Windows): section places (2 MiB chunks) are multiples of it.
pub(super) const ALLOCATION_GRANULARITY: usize = 64 << 10;

/// The size of a page (`GetSystemInfo`, `dwPageSize`): 4 KiB on x86_64, as on Linux, so every
/// layout rounded to pages is the same on both.
pub fn page_size() -> usize {
    static PAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // Relaxed: the value is the same whoever stores it.
    match PAGE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            // SAFETY: all-zero bytes are a valid SYSTEM_INFO; GetSystemInfo fills it.
            let mut si: windows_sys::Win32::System::SystemInformation::SYSTEM_INFO = unsafe { std::mem::zeroed() };
            // SAFETY: `si` is a valid, writable struct.
            unsafe { windows_sys::Win32::System::SystemInformation::GetSystemInfo(&mut si) };
            let page = (si.dwPageSize as usize).max(4096);
            PAGE.store(page, std::sync::atomic::Ordering::Relaxed);
            page
        }
        page => page,
    }
}

/// A file-mapping object for `object`, `CreateFileMappingW` with `protect` and a maximum size
/// of `size` bytes (0: the file's size; larger than the file grows a writable file).
pub(super) fn section_of(object: &Object, protect: PAGE_PROTECTION_FLAGS, size: u64) -> io::Result<HANDLE> {
    // SAFETY: the file handle is open for the call; no security attributes and no name.
    let h = unsafe {
        CreateFileMappingW(
            object.0.as_raw_handle(),
            std::ptr::null(),
            protect,
            (size >> 32) as u32,
            size as u32,
            std::ptr::null(),
        )
    };
    if h.is_null() { Err(last_error()) } else { Ok(h) }
}

/// Maps a view of `section` (`MapViewOfFileEx`) at `at` (null: anywhere), then closes the
/// section handle (the view keeps the section). Fails if the view did not land at `at`.
pub(super) fn view(section: HANDLE, access: u32, offset: u64, len: usize, at: usize) -> io::Result<usize> {
    // SAFETY: `section` is a valid file-mapping handle; at a fixed address the call fails
    // rather than replace anything.
    let v = unsafe { MapViewOfFileEx(section, access, (offset >> 32) as u32, offset as u32, len, at as *const c_void) };
    let err = last_error();
    // SAFETY: `section` was created by `section_of` and is closed once, here.
    unsafe { CloseHandle(section) };
    let p = v.Value as usize;
    if p == 0 {
        return Err(err);
    }
    if at != 0 && p != at {
        // SAFETY: the view just made, referenced by nothing.
        unsafe { UnmapViewOfFile(v) };
        return Err(os_error(ERROR_INVALID_ADDRESS));
    }
    Ok(p)
}

fn protect_of(access: Access) -> (PAGE_PROTECTION_FLAGS, u32) {
    match access {
        Access::Read => (PAGE_READONLY, FILE_MAP_READ),
        Access::ReadWrite => (PAGE_READWRITE, FILE_MAP_ALL_ACCESS),
    }
}

/// Unmaps `[addr, addr + len)`: the view that contains `addr` (`UnmapViewOfFile`), or a
/// reservation (`VirtualFree(MEM_RELEASE)`) for each allocation that starts in the range.
///
/// # Safety
/// The range must be a mapping owned by the caller, and no live Rust reference may point
/// into it.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    let end = addr.saturating_add(len.max(1));
    let mut at = addr;
    while at < end {
        let mbi = query(at).ok_or_else(last_error)?;
        let base = mbi.AllocationBase as usize;
        let next = mbi.BaseAddress as usize + mbi.RegionSize;
        if mbi.State != MEM_FREE && mbi.Type == MEM_MAPPED {
            // SAFETY: forwarded from the caller.
            if unsafe { UnmapViewOfFile(MEMORY_MAPPED_VIEW_ADDRESS { Value: base as *mut c_void }) } == 0 {
                return Err(last_error());
            }
        } else if mbi.State == MEM_RESERVE && base >= addr {
            // SAFETY: forwarded from the caller.
            if unsafe { VirtualFree(base as *mut c_void, 0, MEM_RELEASE) } == 0 {
                return Err(last_error());
            }
        }
        at = next;
    }
    Ok(())
}

/// Maps `len` bytes of `object` at exactly `addr`, shared: the reservation pieces under the
/// range are released, the view is mapped there (`MapViewOfFileEx`), and what the pieces held
/// outside it is reserved again (see `reserve.rs`). A writable mapping longer than the file
/// grows the file to `len`.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference may
/// point into memory it replaces.
pub unsafe fn map_shared_fixed(object: &Object, addr: usize, len: usize, access: Access) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { map_at(object, addr, len, 0, access) }
}

/// Shared by [`map_shared_fixed`] and `map_file_fixed`.
///
/// # Safety
/// As [`map_shared_fixed`].
pub(super) unsafe fn map_at(object: &Object, addr: usize, len: usize, offset: u64, access: Access) -> io::Result<()> {
    if addr % ALLOCATION_GRANULARITY != 0 || offset % ALLOCATION_GRANULARITY as u64 != 0 {
        return Err(os_error(windows_sys::Win32::Foundation::ERROR_MAPPED_ALIGNMENT));
    }
    let (protect, map_access) = protect_of(access);
    let size = if access == Access::ReadWrite { offset + len as u64 } else { 0 };
    let section = section_of(object, protect, size)?;
    if let Some(p) = super::placeholder::get() {
        // SAFETY: forwarded from the caller: the range lies in our window, which is made of
        // placeholders in this process.
        let placed = unsafe { p.carve(addr, len) }.and_then(|()| {
            // SAFETY: `carve` made the range exactly one placeholder of ours.
            unsafe { p.map(section, offset, len, addr, protect) }
        });
        // SAFETY: created above, closed once (the view keeps the section).
        unsafe { CloseHandle(section) };
        return placed;
    }
    // SAFETY: forwarded from the caller.
    let leftovers = match unsafe { clear_for_view(addr, len) } {
        Ok(l) => l,
        Err(e) => {
            // SAFETY: created above, closed once.
            unsafe { CloseHandle(section) };
            return Err(e);
        }
    };
    let placed = view(section, map_access, offset, len, addr);
    if placed.is_err() {
        // Give the range back to the reservation before reporting.
        rereserve(&[(addr, len)]);
    }
    rereserve(&leftovers);
    placed.map(|_| ())
}

/// Maps `len` bytes of `object` wherever the system likes, shared (`MapViewOfFileEx` at no
/// fixed address). The system never picks an address inside a reservation.
pub fn map_shared(object: &Object, len: usize, access: Access) -> io::Result<NonNull<u8>> {
    let (protect, map_access) = protect_of(access);
    let size = if access == Access::ReadWrite { len as u64 } else { 0 };
    let section = section_of(object, protect, size)?;
    let p = view(section, map_access, 0, len, 0)?;
    NonNull::new(p as *mut u8).ok_or_else(|| io::Error::other("MapViewOfFileEx returned null"))
}

/// A copy-on-write or read-only view `[offset, offset + len)` of `object` anywhere; `offset`
/// need not be aligned to 64 KiB (the view starts lower and the pointer is moved up).
pub(super) fn map_anywhere(object: &Object, offset: u64, len: usize, copy: bool) -> io::Result<NonNull<u8>> {
    let delta = offset % ALLOCATION_GRANULARITY as u64;
    let (protect, access) = if copy { (PAGE_WRITECOPY, FILE_MAP_COPY) } else { (PAGE_READONLY, FILE_MAP_READ) };
    let section = section_of(object, protect, 0)?;
    let p = view(section, access, offset - delta, len + delta as usize, 0)?;
    NonNull::new((p + delta as usize) as *mut u8).ok_or_else(|| io::Error::other("MapViewOfFileEx returned null"))
}

/// What `VirtualQuery` says about the regions that overlap `[addr, addr + len)`, one line
/// each, for error messages.
pub fn mappings_overlapping(addr: usize, len: usize) -> Vec<String> {
    let end = addr.saturating_add(len);
    let mut lines = Vec::new();
    let mut at = addr;
    while at < end && lines.len() < 64 {
        let Some(mbi) = query(at) else { break };
        let (start, stop) = (mbi.BaseAddress as usize, mbi.BaseAddress as usize + mbi.RegionSize);
        if mbi.State != MEM_FREE {
            let state = match mbi.State {
                MEM_COMMIT => "committed",
                MEM_RESERVE => "reserved",
                _ => "?",
            };
            let kind = match mbi.Type {
                MEM_MAPPED => "mapped",
                MEM_IMAGE => "image",
                _ => "private",
            };
            lines.push(format!(
                "{start:x}-{stop:x} {state} {kind} protect 0x{:x} allocation {:x}",
                mbi.Protect, mbi.AllocationBase as usize
            ));
        }
        if stop <= at {
            break;
        }
        at = stop;
    }
    lines
}

/// The highest user-space address plus one (Windows 8.1 and later, x86_64: 128 TiB).
pub const USER_ADDRESS_LIMIT: u64 = 0x7fff_ffff_0000;

/// Transparent huge pages have no Windows counterpart for shared views (large pages need
/// `SeLockMemoryPrivilege` and `SEC_LARGE_PAGES` at creation): the setting is accepted and
/// has no effect.
pub fn set_huge_advice(_on: bool) {}
