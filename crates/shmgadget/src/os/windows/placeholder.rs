//! Placeholders (Windows 10 1803 and later): a window reserved as one placeholder
//! (`VirtualAlloc2` with `MEM_RESERVE_PLACEHOLDER`), split where a view goes
//! (`VirtualFree(MEM_RELEASE | MEM_PRESERVE_PLACEHOLDER)`) and replaced by it
//! (`MapViewOfFile3` with `MEM_REPLACE_PLACEHOLDER`); an unmapped view becomes a placeholder
//! again (`UnmapViewOfFile2` with `MEM_PRESERVE_PLACEHOLDER`), and adjacent placeholders are
//! coalesced (`MEM_COALESCE_PLACEHOLDERS`) before the next split. The address range never
//! becomes free, so no other allocation of this process can slip into it between release and
//! map, as it can with the pieces of `reserve.rs`.
//!
//! The three calls are looked up at run time (`GetProcAddress` on kernelbase.dll): older
//! Windows lacks them, and Wine 8 exports `VirtualAlloc2` but fails it (error 87). A probe
//! reserves and frees one 64 KiB placeholder once per process; where it fails the backend uses
//! the pieces of `reserve.rs` instead, for every window of the process.

use std::ffi::c_void;
use std::io;
use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{ERROR_INVALID_ADDRESS, HANDLE};
use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress, LoadLibraryW};
use windows_sys::Win32::System::Memory::{
    MEM_EXTENDED_PARAMETER, MEM_FREE, MEM_MAPPED, MEM_PRESERVE_PLACEHOLDER, MEM_RELEASE, MEM_REPLACE_PLACEHOLDER,
    MEM_RESERVE, MEM_RESERVE_PLACEHOLDER, MEMORY_MAPPED_VIEW_ADDRESS, PAGE_NOACCESS, VirtualFree,
};
use windows_sys::Win32::System::Threading::GetCurrentProcess;

use super::object::{last_error, os_error};
use super::reserve::query;

/// `VirtualFree` flag: merge adjacent placeholders (with `MEM_RELEASE`).
const MEM_COALESCE_PLACEHOLDERS: u32 = 0x1;
/// `VirtualFree` flag: split a placeholder, or turn a private allocation back into one (with
/// `MEM_RELEASE`). Same value as `UnmapViewOfFile2`'s flag.
const MEM_PRESERVE: u32 = MEM_PRESERVE_PLACEHOLDER;

type VirtualAlloc2Fn =
    unsafe extern "system" fn(HANDLE, *const c_void, usize, u32, u32, *mut MEM_EXTENDED_PARAMETER, u32) -> *mut c_void;
type MapViewOfFile3Fn = unsafe extern "system" fn(
    HANDLE,
    HANDLE,
    *const c_void,
    u64,
    usize,
    u32,
    u32,
    *mut MEM_EXTENDED_PARAMETER,
    u32,
) -> MEMORY_MAPPED_VIEW_ADDRESS;
type UnmapViewOfFile2Fn = unsafe extern "system" fn(HANDLE, MEMORY_MAPPED_VIEW_ADDRESS, u32) -> i32;

/// The placeholder calls of this system, when they work.
#[derive(Clone, Copy)]
pub(super) struct Placeholders {
    virtual_alloc2: VirtualAlloc2Fn,
    map_view3: MapViewOfFile3Fn,
    unmap_view2: UnmapViewOfFile2Fn,
}

/// The placeholder calls, or why this process does not use them.
static STATE: OnceLock<Result<Placeholders, String>> = OnceLock::new();

/// Whether this process runs under Wine (ntdll exports `wine_get_version` there).
pub(super) fn under_wine() -> bool {
    // SAFETY: NUL-terminated UTF-16 and ASCII names; ntdll is loaded in every process.
    unsafe {
        let m = GetModuleHandleW(super::wide::str("ntdll.dll").as_ptr());
        !m.is_null() && GetProcAddress(m, c"wine_get_version".as_ptr().cast()).is_some()
    }
}

fn lookup() -> Result<Placeholders, String> {
    let name = super::wide::str("kernelbase.dll");
    // SAFETY: a NUL-terminated UTF-16 name; kernelbase is a system DLL, loaded in every
    // process since Windows 7 (LoadLibraryW only adds a reference if it is).
    let m = unsafe {
        let m = GetModuleHandleW(name.as_ptr());
        if m.is_null() { LoadLibraryW(name.as_ptr()) } else { m }
    };
    if m.is_null() {
        return Err(format!("kernelbase.dll cannot be loaded: {}", last_error()));
    }
    let get = |sym: &std::ffi::CStr| {
        // SAFETY: `m` is a loaded module and `sym` a NUL-terminated name.
        unsafe { GetProcAddress(m, sym.as_ptr().cast()) }
            .ok_or_else(|| format!("kernelbase.dll has no {} (Windows older than 10 1803)", sym.to_string_lossy()))
    };
    let (a, v, u) = (get(c"VirtualAlloc2")?, get(c"MapViewOfFile3")?, get(c"UnmapViewOfFile2")?);
    // SAFETY: the documented signatures of the three exports (windows-sys declares the same).
    let p = unsafe {
        Placeholders {
            virtual_alloc2: std::mem::transmute::<unsafe extern "system" fn() -> isize, VirtualAlloc2Fn>(a),
            map_view3: std::mem::transmute::<unsafe extern "system" fn() -> isize, MapViewOfFile3Fn>(v),
            unmap_view2: std::mem::transmute::<unsafe extern "system" fn() -> isize, UnmapViewOfFile2Fn>(u),
        }
    };
    // The probe: one placeholder anywhere, released again.
    let at = p.reserve(0, 64 << 10).map_err(|e| {
        format!(
            "VirtualAlloc2(MEM_RESERVE_PLACEHOLDER) fails here ({e}){}",
            if under_wine() { " under Wine" } else { "" }
        )
    })?;
    // SAFETY: the placeholder just made, referenced by nothing.
    unsafe { VirtualFree(at as *mut c_void, 0, MEM_RELEASE) };
    Ok(p)
}

/// The placeholder calls, if this process uses them (decided once per process).
pub(super) fn get() -> Option<&'static Placeholders> {
    STATE.get_or_init(lookup).as_ref().ok()
}

impl Placeholders {
    /// Reserves `[addr, addr + len)` as one placeholder (`addr` 0: anywhere). Returns its
    /// address; `ERROR_INVALID_ADDRESS` if the range is not free.
    pub(super) fn reserve(&self, addr: usize, len: usize) -> io::Result<usize> {
        // SAFETY: a reservation never replaces anything: at a fixed address it fails if any
        // page of the range is in use.
        let p = unsafe {
            (self.virtual_alloc2)(
                GetCurrentProcess(),
                addr as *const c_void,
                len,
                MEM_RESERVE | MEM_RESERVE_PLACEHOLDER,
                PAGE_NOACCESS,
                std::ptr::null_mut(),
                0,
            )
        };
        if p.is_null() {
            return Err(last_error());
        }
        if addr != 0 && p as usize != addr {
            // SAFETY: the placeholder just made, referenced by nothing.
            unsafe { VirtualFree(p, 0, MEM_RELEASE) };
            return Err(os_error(ERROR_INVALID_ADDRESS));
        }
        Ok(p as usize)
    }

    /// Makes `[addr, addr + len)` exactly one placeholder: views of ours inside it become
    /// placeholders again, the placeholders that overlap it are coalesced into one, and that
    /// one is split at the range's ends. Fails with `ERROR_INVALID_ADDRESS`, changing
    /// nothing, if anything else (a piece reservation, someone's allocation, a view that
    /// crosses the range's ends, free memory) overlaps it.
    ///
    /// # Safety
    /// The range must lie inside a window reserved by [`Placeholders::reserve`], and no live
    /// Rust reference may point into a view it unmaps.
    pub(super) unsafe fn carve(&self, addr: usize, len: usize) -> io::Result<()> {
        let end = addr + len;
        // Check first, so that a foreign mapping leaves everything as it was.
        let (mut lo, mut hi) = (addr, end);
        let mut at = addr;
        while at < end {
            let m = query(at).ok_or_else(last_error)?;
            let (base, region_end) = (m.AllocationBase as usize, m.BaseAddress as usize + m.RegionSize);
            let ok = match m.State {
                MEM_RESERVE => m.Type != MEM_MAPPED,
                MEM_FREE => false,
                _ => m.Type == MEM_MAPPED && base >= addr && super::reserve::allocation_end(base) <= end,
            };
            if !ok {
                return Err(os_error(ERROR_INVALID_ADDRESS));
            }
            if m.State == MEM_RESERVE {
                lo = lo.min(base);
                hi = hi.max(super::reserve::allocation_end(base));
            }
            at = region_end;
        }
        // Views of ours inside the range become placeholders again.
        let mut at = addr;
        while at < end {
            let m = query(at).ok_or_else(last_error)?;
            let base = m.AllocationBase as usize;
            if m.State != MEM_RESERVE && m.Type == MEM_MAPPED {
                let next = super::reserve::allocation_end(base);
                // SAFETY: a view of ours inside the range, referenced by nothing (caller).
                unsafe { self.unmap_view(base)? };
                at = next;
            } else {
                at = m.BaseAddress as usize + m.RegionSize;
            }
        }
        // One placeholder over [lo, hi), then split off the range.
        if !self.is_one_placeholder(lo, hi) {
            // SAFETY: [lo, hi) is exactly a run of adjacent placeholders of ours (checked
            // above: each one that overlaps the range, and the views made placeholders).
            if unsafe { VirtualFree(lo as *mut c_void, hi - lo, MEM_RELEASE | MEM_COALESCE_PLACEHOLDERS) } == 0 {
                return Err(last_error());
            }
        }
        // Each split cuts the first part off a placeholder: [lo, addr) off [lo, hi), then
        // [addr, end) off [addr, hi).
        for (from, to, whole_end) in [(lo, addr, hi), (addr, end, hi)] {
            if from < to && to < whole_end {
                // SAFETY: splits our placeholder at `to`; the memory stays reserved.
                if unsafe { VirtualFree(from as *mut c_void, to - from, MEM_RELEASE | MEM_PRESERVE) } == 0 {
                    return Err(last_error());
                }
            }
        }
        Ok(())
    }

    fn is_one_placeholder(&self, lo: usize, hi: usize) -> bool {
        query(lo).is_some_and(|m| {
            m.State == MEM_RESERVE && m.AllocationBase as usize == lo && super::reserve::allocation_end(lo) == hi
        })
    }

    /// Maps `len` bytes of `section` from `offset` at `addr`, replacing the placeholder that is
    /// exactly `[addr, addr + len)` (`MapViewOfFile3` with `MEM_REPLACE_PLACEHOLDER`).
    ///
    /// # Safety
    /// `[addr, addr + len)` must be one placeholder of ours ([`Placeholders::carve`]).
    pub(super) unsafe fn map(
        &self,
        section: HANDLE,
        offset: u64,
        len: usize,
        addr: usize,
        protect: u32,
    ) -> io::Result<()> {
        // SAFETY: `section` is a valid file-mapping handle; the view replaces exactly our
        // placeholder (caller).
        let v = unsafe {
            (self.map_view3)(
                section,
                GetCurrentProcess(),
                addr as *const c_void,
                offset,
                len,
                MEM_REPLACE_PLACEHOLDER,
                protect,
                std::ptr::null_mut(),
                0,
            )
        };
        if v.Value.is_null() {
            return Err(last_error());
        }
        if v.Value as usize != addr {
            // SAFETY: the view just made, referenced by nothing.
            unsafe { (self.unmap_view2)(GetCurrentProcess(), v, 0) };
            return Err(os_error(ERROR_INVALID_ADDRESS));
        }
        Ok(())
    }

    /// Unmaps the view at `base`, leaving a placeholder in its place (`UnmapViewOfFile2` with
    /// `MEM_PRESERVE_PLACEHOLDER`). A view that did not replace a placeholder is unmapped and
    /// its range reserved as a placeholder again.
    ///
    /// # Safety
    /// `base` must be a view of ours inside a window, referenced by nothing.
    pub(super) unsafe fn unmap_view(&self, base: usize) -> io::Result<()> {
        let view = MEMORY_MAPPED_VIEW_ADDRESS { Value: base as *mut c_void };
        // SAFETY: forwarded from the caller.
        if unsafe { (self.unmap_view2)(GetCurrentProcess(), view, MEM_PRESERVE_PLACEHOLDER) } != 0 {
            return Ok(());
        }
        let end = super::reserve::allocation_end(base);
        // SAFETY: forwarded from the caller.
        if unsafe { (self.unmap_view2)(GetCurrentProcess(), view, 0) } == 0 {
            return Err(last_error());
        }
        self.reserve(base, end - base).map(|_| ())
    }

    /// Puts `[addr, addr + len)` back to placeholders: every view of ours that starts inside
    /// it becomes a placeholder again, and the placeholders inside it are coalesced.
    ///
    /// # Safety
    /// As [`Placeholders::carve`].
    pub(super) unsafe fn restore(&self, addr: usize, len: usize) -> io::Result<()> {
        let end = addr + len;
        let mut at = addr;
        let mut first = None;
        let mut last = addr;
        while at < end {
            let m = query(at).ok_or_else(last_error)?;
            let base = m.AllocationBase as usize;
            let mut next = m.BaseAddress as usize + m.RegionSize;
            if m.State != MEM_FREE && m.State != MEM_RESERVE && m.Type == MEM_MAPPED && base >= addr {
                next = super::reserve::allocation_end(base);
                // SAFETY: a view of ours inside the range, referenced by nothing (caller).
                unsafe { self.unmap_view(base)? };
            }
            if m.State == MEM_FREE {
                // A hole (a reservation that failed to come back): a placeholder again.
                let to = next.min(end);
                self.reserve(at, to - at)?;
            }
            if base >= addr && next <= end {
                first.get_or_insert(base);
                last = next;
            }
            at = next;
        }
        if let Some(lo) = first
            && last > lo
            && !self.is_one_placeholder(lo, last)
        {
            // SAFETY: [lo, last) is a run of adjacent placeholders of ours, all inside the
            // range. A failure only leaves them split, which `carve` handles.
            unsafe { VirtualFree(lo as *mut c_void, last - lo, MEM_RELEASE | MEM_COALESCE_PLACEHOLDERS) };
        }
        Ok(())
    }
}
