//! The glibc robust process-shared mutex that shared locks embed today (`sync::Mutex`, the
//! registry and heap locks). Linux/glibc only: `pthread_mutex_*(3)`. Kept in a file of its own
//! because it goes away when shmgadget's own robust mutex replaces it (issue 14).

use std::cell::UnsafeCell;
use std::io;

/// Storage for a glibc `pthread_mutex_t` configured `PTHREAD_PROCESS_SHARED |
/// PTHREAD_MUTEX_ROBUST`, laid out to live in shared memory (64 bytes, 16-aligned).
///
/// The kernel walks each thread's robust list when it dies and marks mutexes it held with
/// `FUTEX_OWNER_DIED`; the next locker gets `EOWNERDEAD` (reported as
/// [`LockOutcome::OwnerDied`]) and must call [`RawRobustMutex::make_consistent`] after
/// repairing the data, or the mutex keeps reporting owner death (it never becomes
/// unrecoverable here: see `unlock`).
#[repr(C, align(16))]
pub struct RawRobustMutex {
    cell: UnsafeCell<[u8; 64]>,
}

const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= 64);
const _: () = assert!(std::mem::align_of::<libc::pthread_mutex_t>() <= 16);
const _: () = assert!(std::mem::size_of::<RawRobustMutex>() == 64);

// SAFETY: all access goes through pthread calls, which are thread- and process-safe for a
// mutex initialised PTHREAD_PROCESS_SHARED.
unsafe impl Sync for RawRobustMutex {}
// SAFETY: as above; the value has no thread affinity until locked.
unsafe impl Send for RawRobustMutex {}

/// How a lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// Acquired normally.
    Acquired,
    /// Acquired, but the previous holder died while holding it; the protected data may be
    /// inconsistent.
    OwnerDied,
}

impl RawRobustMutex {
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.cell.get().cast()
    }

    /// Initialises the mutex in place (`pthread_mutex_init(3)` with a process-shared, robust
    /// attribute).
    ///
    /// # Safety
    /// No thread or process may use the mutex during initialisation, and the memory must stay
    /// at this address for as long as anyone uses it.
    pub unsafe fn init(&self) -> io::Result<()> {
        // SAFETY: the attribute object lives on this stack frame and is initialised by
        // pthread_mutexattr_init before any other use; `self.raw()` is valid, exclusively ours
        // per the caller's contract, and large and aligned enough for a pthread_mutex_t.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            check(libc::pthread_mutexattr_init(&mut attr))?;
            let r = (|| {
                check(libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED))?;
                check(libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST))?;
                check(libc::pthread_mutex_init(self.raw(), &attr))
            })();
            libc::pthread_mutexattr_destroy(&mut attr);
            r
        }
    }

    #[inline]
    fn outcome(rc: libc::c_int) -> io::Result<LockOutcome> {
        match rc {
            0 => Ok(LockOutcome::Acquired),
            libc::EOWNERDEAD => Ok(LockOutcome::OwnerDied),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Locks, waiting as long as needed (`pthread_mutex_lock(3)`).
    #[inline]
    pub fn lock(&self) -> io::Result<LockOutcome> {
        // SAFETY: the mutex was initialised (type invariant, established by whoever built the
        // shared structure and checked by its header validation) and stays mapped while `self`
        // is borrowed.
        Self::outcome(unsafe { libc::pthread_mutex_lock(self.raw()) })
    }

    /// Locks if free (`pthread_mutex_trylock(3)`); `Ok(None)` when someone else holds it.
    pub fn try_lock(&self) -> io::Result<Option<LockOutcome>> {
        // SAFETY: as in `lock`.
        match unsafe { libc::pthread_mutex_trylock(self.raw()) } {
            libc::EBUSY => Ok(None),
            rc => Self::outcome(rc).map(Some),
        }
    }

    /// Locks, waiting at most `timeout` (`pthread_mutex_clocklock(3)` on `CLOCK_MONOTONIC`);
    /// `Ok(None)` on timeout.
    pub fn lock_timeout(&self, timeout: std::time::Duration) -> io::Result<Option<LockOutcome>> {
        let now = super::time::monotonic_now();
        let total_ns = now.subsec_nanos() as u128 + timeout.subsec_nanos() as u128;
        let secs = now
            .as_secs()
            .saturating_add(timeout.as_secs())
            .saturating_add((total_ns / 1_000_000_000) as u64)
            .min(i64::MAX as u64);
        let deadline =
            libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: (total_ns % 1_000_000_000) as libc::c_long };
        // SAFETY: as in `lock`; `deadline` is a valid timespec.
        match unsafe { pthread_mutex_clocklock(self.raw(), libc::CLOCK_MONOTONIC, &deadline) } {
            libc::ETIMEDOUT => Ok(None),
            rc => Self::outcome(rc).map(Some),
        }
    }

    /// The lock word: glibc keeps a robust mutex's holder's thread id in the first 32-bit word
    /// (`__lock`), with `FUTEX_WAITERS` and `FUTEX_OWNER_DIED` in the top two bits; 0 when free.
    /// A snapshot, for diagnosing a lock that cannot be had.
    pub fn word(&self) -> u32 {
        // SAFETY: the cell is 64 bytes, 16-aligned, so its first 4 bytes are a valid, aligned
        // u32; glibc and the kernel only ever access that word atomically, so an atomic load
        // of it is no data race.
        let word = unsafe { &*(self.cell.get() as *const std::sync::atomic::AtomicU32) };
        // Relaxed: a snapshot; nothing is read through it.
        word.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The holder's thread id from [`word`](Self::word) (0: the word names no thread).
    pub fn owner_tid(word: u32) -> u32 {
        word & libc::FUTEX_TID_MASK
    }

    /// Marks the protected state repaired after [`LockOutcome::OwnerDied`]
    /// (`pthread_mutex_consistent(3)`).
    ///
    /// # Safety
    /// The calling thread must hold the mutex.
    pub unsafe fn make_consistent(&self) -> io::Result<()> {
        // SAFETY: the caller holds the mutex, which was initialised.
        check(unsafe { libc::pthread_mutex_consistent(self.raw()) })
    }

    /// Unlocks (`pthread_mutex_unlock(3)`).
    ///
    /// # Safety
    /// The calling thread must hold the mutex.
    #[inline]
    pub unsafe fn unlock(&self) {
        // SAFETY: the caller holds the mutex, which was initialised.
        let rc = unsafe { libc::pthread_mutex_unlock(self.raw()) };
        debug_assert_eq!(rc, 0, "pthread_mutex_unlock failed: {rc}");
    }
}

unsafe extern "C" {
    // glibc 2.30+; not exposed by the libc crate on every target.
    fn pthread_mutex_clocklock(
        mutex: *mut libc::pthread_mutex_t,
        clock: libc::clockid_t,
        abstime: *const libc::timespec,
    ) -> libc::c_int;
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) }
}
