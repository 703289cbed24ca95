//! Liveness tokens: a lock on one byte of the registry object that the system drops when its
//! holder dies, so a dead process is recognised without trusting pids. Windows: byte-range
//! locks (`LockFileEx`), which belong to the file object a handle refers to and are released
//! when its last handle closes, including when the process ends (`TerminateProcess`, a crash).
//!
//! Windows locks are mandatory for `ReadFile`/`WriteFile` (not for mapped views): so that a
//! token never blocks a read of the registry, the lock on byte `n` is taken at
//! [`LOCK_BASE`]` + n`, beyond any data (a lock range may lie past the end of a file).
//!
//! Windows has no `fork`: the fork handlers are not needed and [`fork_generation`] is always 0.

use std::io;
use std::os::windows::io::{AsRawHandle, IntoRawHandle};

use windows_sys::Win32::Foundation::{CloseHandle, ERROR_LOCK_VIOLATION, HANDLE};
use windows_sys::Win32::Storage::FileSystem::{
    LOCKFILE_EXCLUSIVE_LOCK, LOCKFILE_FAIL_IMMEDIATELY, LockFileEx, UnlockFileEx,
};

use super::object::{Object, at_offset, last_error};
use crate::os::tokens::NO_HANDLE;

/// Where byte 0's lock lies: 2^62.
pub const LOCK_BASE: u64 = 1 << 62;

fn lock_range(h: HANDLE, offset: u64, len: u64, exclusive: bool) -> io::Result<bool> {
    let mut ov = at_offset(LOCK_BASE + offset);
    let flags = LOCKFILE_FAIL_IMMEDIATELY | if exclusive { LOCKFILE_EXCLUSIVE_LOCK } else { 0 };
    // SAFETY: `h` is an open file handle; `ov` lives for the synchronous call.
    if unsafe { LockFileEx(h, flags, 0, len as u32, (len >> 32) as u32, &mut ov) } != 0 {
        return Ok(true);
    }
    let e = last_error();
    if e.raw_os_error() == Some(ERROR_LOCK_VIOLATION as i32) { Ok(false) } else { Err(e) }
}

fn unlock_range(h: HANDLE, offset: u64, len: u64) {
    let mut ov = at_offset(LOCK_BASE + offset);
    // SAFETY: as in `lock_range`.
    unsafe { UnlockFileEx(h, 0, len as u32, (len >> 32) as u32, &mut ov) };
}

/// Whether any lock overlaps the range: takes and drops an exclusive lock on it. (Windows has
/// no test-only call like `F_OFD_GETLK`; the probe holds the range for a moment.)
fn probe(h: HANDLE, offset: u64, len: u64) -> io::Result<bool> {
    if lock_range(h, offset, len, true)? {
        unlock_range(h, offset, len);
        Ok(false)
    } else {
        Ok(true)
    }
}

impl Object {
    /// Takes an exclusive lock on one byte (`LockFileEx` with `LOCKFILE_FAIL_IMMEDIATELY`).
    /// Returns `false` if someone else holds it (or this file object already does).
    pub fn try_lock_byte(&self, offset: u64) -> io::Result<bool> {
        lock_range(self.0.as_raw_handle(), offset, 1, true)
    }

    /// Turns this handle's exclusive lock on one byte into a shared one, or takes a shared one:
    /// a shared lock is added (a file object may add one over its own exclusive lock) and then
    /// one unlock drops the exclusive lock (Windows unlocks the exclusive one first). Returns
    /// `false` if someone else holds it exclusively.
    pub fn try_share_lock_byte(&self, offset: u64) -> io::Result<bool> {
        let h = self.0.as_raw_handle();
        if !lock_range(h, offset, 1, false)? {
            return Ok(false);
        }
        // If we held it exclusively, the exclusive lock goes; if not, our shared one would go
        // and must come back.
        unlock_range(h, offset, 1);
        if !probe_own_shared(h, offset) {
            return lock_range(h, offset, 1, false);
        }
        Ok(true)
    }

    /// Whether another file object holds a lock on the byte (a probe, see `probe`). Query
    /// through a handle that never takes locks.
    pub fn byte_is_locked(&self, offset: u64) -> io::Result<bool> {
        probe(self.0.as_raw_handle(), offset, 1)
    }

    /// Whether any lock is held on any byte of the object's lock space. Every attached process
    /// holds its liveness token as such a lock, so `false` proves that no process is attached.
    pub fn any_byte_locked(&self) -> io::Result<bool> {
        probe(self.0.as_raw_handle(), 0, LOCK_BASE - 1)
    }
}

/// Whether this handle still holds some lock on the byte: an exclusive probe fails then.
fn probe_own_shared(h: HANDLE, offset: u64) -> bool {
    matches!(lock_range(h, offset, 1, true), Ok(false)) || {
        unlock_range(h, offset, 1);
        false
    }
}

// The table of token cells (`TokenCell`, `token_for_address`) is `os/tokens.rs`, shared
// with Linux; the handles in it are file `HANDLE`s here.

/// Closes a token handle taken out of the table ([`NO_HANDLE`]: none).
pub(in crate::os) fn close_raw(h: usize) {
    if h != NO_HANDLE {
        // SAFETY: `h` was taken out of a slot by an atomic swap, so we are its only closer.
        unsafe { CloseHandle(h as HANDLE) };
    }
}

/// The handle of a token object, for the table (the table closes it).
pub(in crate::os) fn raw_of(token: Object) -> usize {
    token.0.into_raw_handle() as usize
}

/// Always 0: Windows has no `fork`.
#[inline]
pub fn fork_generation() -> u64 {
    0
}

/// Nothing to register on Windows (no `fork`); `prepare` is never called.
pub fn install_fork_handlers(prepare: fn()) {
    let _ = prepare;
}
