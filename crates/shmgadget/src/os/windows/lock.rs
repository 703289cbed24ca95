//! The global lock: one machine-wide exclusive lock per shm directory, serialising creating,
//! joining and deleting domains. Windows: a named mutex (`CreateMutexW`) in the session
//! namespace, named from the directory's path. The system abandons a mutex whose owner thread
//! or process ends, and the next waiter gets it (`WAIT_ABANDONED`): a crashed holder never
//! leaves it taken.

use std::io;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, WAIT_ABANDONED, WAIT_OBJECT_0};
use windows_sys::Win32::System::Threading::{CreateMutexW, INFINITE, ReleaseMutex, WaitForSingleObject};

use super::object::{Dir, last_error};

/// An exclusive lock on a shm directory, held until dropped. A mutex belongs to a thread: the
/// guard must be dropped on the thread that acquired it (every caller holds it in one scope).
#[derive(Debug)]
pub struct DirLock {
    mutex: HANDLE,
}

// SAFETY: the handle is a kernel object handle, usable from any thread (release is checked by
// the kernel against the owning thread, see the type's docs).
unsafe impl Send for DirLock {}
// SAFETY: `DirLock` has no methods that use the handle through `&self`.
unsafe impl Sync for DirLock {}

/// The mutex name for a directory: `Local\shmgadget-dir-` and the FNV-1a hash of its path in
/// lower case (Windows paths are case-insensitive).
fn mutex_name(dir: &Dir) -> Vec<u16> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.path().to_string_lossy().to_lowercase().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    super::wide::str(&format!("Local\\shmgadget-dir-{h:016x}"))
}

impl DirLock {
    /// Takes the lock of `dir`, waiting for it: `CreateMutexW` (opens it if it exists), then
    /// `WaitForSingleObject`. An abandoned mutex (its holder died) is ours as well.
    pub fn acquire(dir: Dir) -> io::Result<DirLock> {
        let name = mutex_name(&dir);
        // SAFETY: `name` is NUL-terminated UTF-16; default security; not initially owned.
        let mutex = unsafe { CreateMutexW(std::ptr::null(), 0, name.as_ptr()) };
        if mutex.is_null() {
            return Err(last_error());
        }
        // SAFETY: `mutex` is a valid mutex handle.
        match unsafe { WaitForSingleObject(mutex, INFINITE) } {
            WAIT_OBJECT_0 | WAIT_ABANDONED => Ok(DirLock { mutex }),
            _ => {
                let e = last_error();
                // SAFETY: opened above, closed once.
                unsafe { CloseHandle(mutex) };
                Err(e)
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: the mutex handle is ours; ReleaseMutex fails harmlessly on another thread.
        unsafe {
            ReleaseMutex(self.mutex);
            CloseHandle(self.mutex);
        }
    }
}
