//! Reserving address ranges without committing memory, and placing a view at an exact address
//! inside our reservation.
//!
//! Windows cannot map a view over part of a plain reservation (`MapViewOfFileEx` needs free
//! addresses). Where placeholders exist (Windows 10 1803 and later, not Wine), a window is one
//! placeholder, split and replaced by views (`placeholder.rs`). Elsewhere it is reserved in pieces of at most
//! [`PIECE`] (`VirtualAlloc(MEM_RESERVE)`); mapping a section releases the pieces its range
//! touches, maps the view at the exact address (checking the address it got), and reserves
//! again what the pieces held outside the view. Unmapping reserves the freed range again.
//! Between release and map another thread of this process could allocate in the hole: the
//! map then fails cleanly (`ERROR_INVALID_ADDRESS`) rather than landing elsewhere.

use std::ffi::c_void;
use std::io;

use windows_sys::Win32::Foundation::ERROR_INVALID_ADDRESS;
use windows_sys::Win32::System::Memory::{
    MEM_FREE, MEM_MAPPED, MEM_RELEASE, MEM_RESERVE, MEMORY_BASIC_INFORMATION, PAGE_NOACCESS, UnmapViewOfFile,
    VirtualAlloc, VirtualFree, VirtualQuery,
};

use super::object::{last_error, os_error};

/// Largest single reservation: 64 MiB (a 1 TiB window is 16,384 of them, reserved in about
/// 50 ms under Wine; one huge reservation costs Wine hundreds of MB per process).
pub const PIECE: usize = 64 << 20;

/// Why a fixed reservation failed.
#[derive(Debug)]
pub enum ReserveError {
    /// Something is already mapped in the range.
    Occupied,
    /// Any other failure.
    Os(io::Error),
}

/// `VirtualQuery` at `addr`: the region of equal pages that contains it.
pub(super) fn query(addr: usize) -> Option<MEMORY_BASIC_INFORMATION> {
    // SAFETY: all-zero bytes are a valid MEMORY_BASIC_INFORMATION; the call only writes it.
    let mut mbi: MEMORY_BASIC_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: `mbi` is valid and writable for the size passed; any address may be queried.
    let n = unsafe { VirtualQuery(addr as *const c_void, &mut mbi, size_of::<MEMORY_BASIC_INFORMATION>()) };
    (n != 0).then_some(mbi)
}

/// Reserves `[addr, addr + len)` exactly, `VirtualAlloc(MEM_RESERVE, PAGE_NOACCESS)`, in one
/// call. `false` if the range is not free.
fn reserve_one(addr: usize, len: usize) -> io::Result<bool> {
    // SAFETY: MEM_RESERVE at a fixed address never replaces anything: it fails if any page of
    // the range is in use.
    let p = unsafe { VirtualAlloc(addr as *const c_void, len, MEM_RESERVE, PAGE_NOACCESS) };
    if p.is_null() {
        let e = last_error();
        return if e.raw_os_error() == Some(ERROR_INVALID_ADDRESS as i32) { Ok(false) } else { Err(e) };
    }
    if p as usize != addr {
        // SAFETY: `p` is the reservation just made, referenced by nothing.
        unsafe { VirtualFree(p, 0, MEM_RELEASE) };
        return Ok(false);
    }
    Ok(true)
}

/// Reserves `[addr, addr + len)` in pieces, each at most [`PIECE`] and none crossing a
/// multiple of it. `addr` and `len` must be multiples of 64 KiB.
fn reserve_pieces(addr: usize, len: usize) -> Result<(), ReserveError> {
    let end = addr + len;
    let mut at = addr;
    while at < end {
        let next = ((at / PIECE) + 1).saturating_mul(PIECE).min(end);
        match reserve_one(at, next - at) {
            Ok(true) => at = next,
            Ok(false) => {
                release_reserved(addr, at);
                return Err(ReserveError::Occupied);
            }
            Err(e) => {
                release_reserved(addr, at);
                return Err(ReserveError::Os(e));
            }
        }
    }
    Ok(())
}

/// Releases every reservation (allocation in state `MEM_RESERVE`) that starts in `[from, to)`.
fn release_reserved(from: usize, to: usize) {
    let mut at = from;
    while at < to {
        let Some(mbi) = query(at) else { break };
        let base = mbi.BaseAddress as usize;
        let next = base + mbi.RegionSize.max(1);
        if mbi.State == MEM_RESERVE && mbi.AllocationBase as usize >= from {
            // SAFETY: a bare reservation of ours inside the range: nothing references it.
            unsafe { VirtualFree(mbi.AllocationBase, 0, MEM_RELEASE) };
        }
        at = next;
    }
}

/// Reserves `[addr, addr + len)` without committing memory (see the module docs). Never
/// replaces an existing mapping.
pub fn reserve_fixed(addr: usize, len: usize) -> Result<(), ReserveError> {
    let gran = super::map::ALLOCATION_GRANULARITY;
    if addr % gran != 0 || len % gran != 0 || len == 0 {
        return Err(ReserveError::Os(os_error(windows_sys::Win32::Foundation::ERROR_MAPPED_ALIGNMENT)));
    }
    if let Some(p) = super::placeholder::get() {
        return match p.reserve(addr, len) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(ERROR_INVALID_ADDRESS as i32) => Err(ReserveError::Occupied),
            Err(e) => Err(ReserveError::Os(e)),
        };
    }
    reserve_pieces(addr, len)
}

/// The extent `[base, end)` of the allocation that starts at `base` (all the regions that
/// share its allocation base).
pub(super) fn allocation_end(base: usize) -> usize {
    let mut at = base;
    while let Some(mbi) = query(at) {
        if mbi.AllocationBase as usize != base || mbi.State == MEM_FREE {
            break;
        }
        at = mbi.BaseAddress as usize + mbi.RegionSize;
    }
    at
}

/// Makes `[addr, addr + len)` free for a view: releases the reservations that overlap it and
/// unmaps an older view that lies inside it. Returns the parts of released reservations that
/// lie outside the range (to reserve again once the view is in place). Fails with
/// `ERROR_INVALID_ADDRESS`, changing nothing more, if something that is not ours overlaps.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference
/// may point into a view it unmaps.
pub(super) unsafe fn clear_for_view(addr: usize, len: usize) -> io::Result<Vec<(usize, usize)>> {
    let end = addr + len;
    // First pass: check, so that a foreign mapping leaves everything as it was.
    let mut at = addr;
    while at < end {
        let mbi = query(at).ok_or_else(last_error)?;
        let base = mbi.AllocationBase as usize;
        let region_end = mbi.BaseAddress as usize + mbi.RegionSize;
        let ours = match mbi.State {
            MEM_FREE => true,
            MEM_RESERVE => true,
            _ => mbi.Type == MEM_MAPPED && base >= addr && allocation_end(base) <= end,
        };
        if !ours {
            return Err(os_error(ERROR_INVALID_ADDRESS));
        }
        at = region_end;
    }
    let mut leftovers = Vec::new();
    let mut at = addr;
    while at < end {
        let mbi = query(at).ok_or_else(last_error)?;
        let base = mbi.AllocationBase as usize;
        match mbi.State {
            MEM_FREE => at = mbi.BaseAddress as usize + mbi.RegionSize,
            MEM_RESERVE => {
                let alloc_end = allocation_end(base);
                // SAFETY: a bare reservation of ours (checked above): nothing references it.
                if unsafe { VirtualFree(base as *mut c_void, 0, MEM_RELEASE) } == 0 {
                    return Err(last_error());
                }
                if base < addr {
                    leftovers.push((base, addr - base));
                }
                if alloc_end > end {
                    leftovers.push((end, alloc_end - end));
                }
                at = alloc_end;
            }
            _ => {
                let alloc_end = allocation_end(base);
                // SAFETY: an older view of this range, which the caller says nothing
                // references.
                let view =
                    windows_sys::Win32::System::Memory::MEMORY_MAPPED_VIEW_ADDRESS { Value: base as *mut c_void };
                // SAFETY: as above.
                if unsafe { UnmapViewOfFile(view) } == 0 {
                    return Err(last_error());
                }
                at = alloc_end;
            }
        }
    }
    Ok(leftovers)
}

/// Reserves again the parts returned by [`clear_for_view`] (best effort: a part that cannot be
/// reserved stays free, which only weakens the guard against other allocations).
pub(super) fn rereserve(parts: &[(usize, usize)]) {
    for &(a, l) in parts {
        let _ = reserve_pieces(a, l);
    }
}

/// Puts `[addr, addr + len)` back to a bare reservation: unmaps the views that start inside it
/// (`UnmapViewOfFile`) and reserves every free part of it again.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference
/// may point into it.
pub unsafe fn restore_reservation(addr: usize, len: usize) -> io::Result<()> {
    if let Some(p) = super::placeholder::get() {
        // SAFETY: forwarded from the caller.
        return unsafe { p.restore(addr, len) };
    }
    let end = addr + len;
    let mut at = addr;
    while at < end {
        let mbi = query(at).ok_or_else(last_error)?;
        let base = mbi.AllocationBase as usize;
        let mut next = mbi.BaseAddress as usize + mbi.RegionSize;
        if mbi.State != MEM_FREE && mbi.Type == MEM_MAPPED && base >= addr {
            next = allocation_end(base);
            let view = windows_sys::Win32::System::Memory::MEMORY_MAPPED_VIEW_ADDRESS { Value: base as *mut c_void };
            // SAFETY: a view of ours inside the range, referenced by nothing (caller).
            if unsafe { UnmapViewOfFile(view) } == 0 {
                return Err(last_error());
            }
        }
        at = next;
    }
    // Reserve the free parts again.
    let mut at = addr;
    while at < end {
        let mbi = query(at).ok_or_else(last_error)?;
        let region_end = (mbi.BaseAddress as usize + mbi.RegionSize).min(end);
        if mbi.State == MEM_FREE {
            let from = at.max(mbi.BaseAddress as usize);
            reserve_pieces(from, region_end - from).map_err(|e| match e {
                ReserveError::Occupied => os_error(ERROR_INVALID_ADDRESS),
                ReserveError::Os(e) => e,
            })?;
        }
        at = region_end;
    }
    Ok(())
}
