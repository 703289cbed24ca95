//! Waiting on a shared word: sleep while a 32-bit word in shared memory holds a value, wake
//! sleepers in any process. Windows has no futex that crosses processes (`WaitOnAddress`
//! works within one process only, and keyed events pair waiters within one process), so it
//! is emulated:
//!
//! * A table of [`BUCKETS`] buckets lives in a small pagefile-backed named mapping
//!   (`Local\shmgadget-futex-v1`), shared by every process of the session; the word's address
//!   picks the bucket (words are at the same address in every process of a domain).
//! * Each bucket has a count of sleepers and one named semaphore
//!   (`Local\shmgadget-futex-v1-<n>`), opened once per process and cached.
//! * A waiter counts itself in (SeqCst), re-checks the word, and sleeps on the semaphore for
//!   at most [`SLICE`]; it counts itself out when it wakes.
//! * A waker, after changing the word, reads the count (SeqCst): 0 means nobody sleeps and it
//!   makes no system call. Otherwise it posts as many units as it wakes sleepers, at most the
//!   count. The SeqCst pair means that either the waiter sees the new word, or the waker sees
//!   the waiter.
//! * Words that share a bucket can take each other's units: the sleeper that gets one returns
//!   `Woken` and its caller re-checks and sleeps again, while the intended sleeper notices the
//!   changed word at the end of its slice ([`SLICE`]). A process that dies asleep leaves the
//!   count one too high: later wakes of that bucket post a spare unit, which makes one later
//!   sleep return at once (spurious, harmless).

use std::io;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, INVALID_HANDLE_VALUE, WAIT_OBJECT_0, WAIT_TIMEOUT};
use windows_sys::Win32::System::Memory::{CreateFileMappingW, FILE_MAP_ALL_ACCESS, MapViewOfFile, PAGE_READWRITE};
use windows_sys::Win32::System::Threading::{CreateSemaphoreW, ReleaseSemaphore, WaitForSingleObject};

/// Why a futex wait returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken, or returned spuriously: re-check the condition.
    Woken,
    /// The word no longer held the expected value when we looked.
    Changed,
    /// The timeout expired.
    TimedOut,
}

/// Number of buckets (a power of two).
pub const BUCKETS: usize = 256;
/// Longest single sleep: a wait without timeout returns `Woken` after it.
pub const SLICE: Duration = Duration::from_millis(100);

/// One bucket of the shared table: the count of sleepers, alone on its cache line.
#[repr(C, align(64))]
struct Bucket {
    sleepers: AtomicU32,
    _pad: [u8; 60],
}
const _: () = assert!(size_of::<Bucket>() == 64);

static TABLE: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const NO_SEM: AtomicUsize = AtomicUsize::new(0);
static SEMAPHORES: [AtomicUsize; BUCKETS] = [NO_SEM; BUCKETS];

/// The shared bucket table, mapped on first use.
fn table() -> io::Result<&'static [Bucket; BUCKETS]> {
    // Acquire: pairs with the Release CAS below.
    let mut p = TABLE.load(Ordering::Acquire);
    if p == 0 {
        let name = super::wide::str("Local\\shmgadget-futex-v1");
        let size = size_of::<[Bucket; BUCKETS]>() as u32;
        // SAFETY: a pagefile-backed mapping (no file), committed and zero-filled when created;
        // opened when it exists already. `name` is NUL-terminated UTF-16.
        let h = unsafe {
            CreateFileMappingW(INVALID_HANDLE_VALUE, std::ptr::null(), PAGE_READWRITE, 0, size, name.as_ptr())
        };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `h` is the mapping opened above; the view is never unmapped (the table lives
        // as long as the process).
        let v = unsafe { MapViewOfFile(h, FILE_MAP_ALL_ACCESS, 0, 0, size as usize) };
        // The handle stays open for the life of the process: under Wine a view does not keep a
        // named mapping's name alive, so closing it would let the next process create a fresh,
        // unshared table.
        if v.Value.is_null() {
            return Err(io::Error::last_os_error());
        }
        match TABLE.compare_exchange(0, v.Value as usize, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => p = v.Value as usize,
            Err(existing) => {
                // SAFETY: our duplicate view and handle, referenced by nothing.
                unsafe {
                    windows_sys::Win32::System::Memory::UnmapViewOfFile(v);
                    CloseHandle(h);
                }
                p = existing;
            }
        }
    }
    // SAFETY: `p` is a view of the table, mapped read-write for the life of the process, of
    // exactly this type's size; every field is atomic, so shared access is sound.
    Ok(unsafe { &*(p as *const [Bucket; BUCKETS]) })
}

/// The semaphore of bucket `i`, created or opened on first use and cached.
fn semaphore(i: usize) -> io::Result<HANDLE> {
    // Acquire: pairs with the AcqRel CAS below.
    let h = SEMAPHORES[i].load(Ordering::Acquire);
    if h != 0 {
        return Ok(h as HANDLE);
    }
    let name = super::wide::str(&format!("Local\\shmgadget-futex-v1-{i}"));
    // SAFETY: `name` is NUL-terminated UTF-16; opens the semaphore if it exists.
    let new = unsafe { CreateSemaphoreW(std::ptr::null(), 0, i32::MAX, name.as_ptr()) };
    if new.is_null() {
        return Err(io::Error::last_os_error());
    }
    match SEMAPHORES[i].compare_exchange(0, new as usize, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(new),
        Err(existing) => {
            // SAFETY: our duplicate handle, closed once.
            unsafe { CloseHandle(new) };
            Ok(existing as HANDLE)
        }
    }
}

fn bucket_of(word: &AtomicU32) -> usize {
    let a = word as *const AtomicU32 as usize as u64;
    ((a >> 2).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BUCKETS.trailing_zeros())) as usize
}

/// Sleeps while `*word == expected`, at most `timeout` (see the module docs): sleeps in
/// slices of at most [`SLICE`], re-checking the word between them, so a wake-up taken by
/// another sleeper of the bucket costs at most one slice.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<FutexWait> {
    let i = bucket_of(word);
    let bucket = &table()?[i];
    let sem = semaphore(i)?;
    let deadline = timeout.map(|t| super::time::monotonic_now().saturating_add(t));
    bucket.sleepers.fetch_add(1, Ordering::SeqCst);
    let outcome = loop {
        if word.load(Ordering::SeqCst) != expected {
            break Ok(FutexWait::Changed);
        }
        let left = match deadline {
            Some(d) => match d.checked_sub(super::time::monotonic_now()) {
                Some(left) if !left.is_zero() => left,
                _ => break Ok(FutexWait::TimedOut),
            },
            None => SLICE,
        };
        let sleep = left.min(SLICE);
        // Round a sub-millisecond sleep up, so a short wait still sleeps.
        let ms = (sleep.as_micros().div_ceil(1000) as u32).max(1);
        // SAFETY: `sem` is a valid semaphore handle, cached for the life of the process.
        match unsafe { WaitForSingleObject(sem, ms) } {
            WAIT_OBJECT_0 => break Ok(FutexWait::Woken),
            WAIT_TIMEOUT => continue,
            _ => break Err(io::Error::last_os_error()),
        }
    };
    bucket.sleepers.fetch_sub(1, Ordering::SeqCst);
    outcome
}

/// Wakes up to `n` sleepers of `word` in any process: if its bucket counts sleepers, posts
/// `min(n, sleepers)` units (`ReleaseSemaphore`); otherwise no system call. Returns how many
/// units were posted.
pub fn futex_wake(word: &AtomicU32, n: u32) -> usize {
    let i = bucket_of(word);
    let Ok(table) = table() else { return 0 };
    let sleepers = table[i].sleepers.load(Ordering::SeqCst);
    if sleepers == 0 || n == 0 {
        return 0;
    }
    let Ok(sem) = semaphore(i) else { return 0 };
    let units = sleepers.min(n).min(i32::MAX as u32);
    // SAFETY: `sem` is a valid semaphore handle; the previous count is not wanted.
    unsafe { ReleaseSemaphore(sem, units as i32, std::ptr::null_mut()) };
    units as usize
}
