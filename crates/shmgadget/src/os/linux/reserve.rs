//! Reserving address ranges without committing memory: the domain window is reserved
//! `PROT_NONE` in every attached process, and a section's range goes back to a bare
//! reservation when it is unmapped. Linux: anonymous `mmap(2)`.

use std::ffi::c_void;
use std::io;

use rustix::mm::{MapFlags, ProtFlags};

/// Why a fixed reservation failed.
#[derive(Debug)]
pub enum ReserveError {
    /// Something is already mapped in the range.
    Occupied,
    /// Any other failure.
    Os(io::Error),
}

/// Reserves `[addr, addr + len)` without committing memory: `mmap(2)` with `PROT_NONE`,
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE`. Never replaces an
/// existing mapping; a kernel that returns another address counts as occupied.
pub fn reserve_fixed(addr: usize, len: usize) -> Result<(), ReserveError> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory that Rust
    // code may reference is affected; the new mapping is PROT_NONE and owned by the caller.
    let res = unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
        )
    };
    match res {
        Ok(p) if p as usize == addr => Ok(()),
        Ok(p) => {
            // An old kernel treated the flag as a hint and put the mapping elsewhere.
            // SAFETY: `p` is the mapping just created by this call, referenced by nothing.
            let _ = unsafe { rustix::mm::munmap(p, len) };
            Err(ReserveError::Occupied)
        }
        Err(e) if e == rustix::io::Errno::EXIST => Err(ReserveError::Occupied),
        Err(e) => Err(ReserveError::Os(e.into())),
    }
}

/// Puts `[addr, addr + len)` back to a bare reservation (`PROT_NONE`, `MAP_FIXED`), dropping
/// whatever section was mapped there in this process.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference
/// may point into it.
pub unsafe fn restore_reservation(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and guarantees nothing references it.
    unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
        )?;
    }
    Ok(())
}
