//! A robust, process-shared mutex: a raw lock ([`RawMutex`]) and a typed wrapper
//! ([`Mutex<T>`]) whose guard reports when the previous holder died.
//!
//! # Protocol
//! The lock itself is shmgadget's own [`RobustLock`] (`robust.rs`: a lock word and an owner
//! record, every byte ours). When a holder dies (its process, or its thread alone), the next
//! locker takes the lock over and is told [`LockOutcome::OwnerDied`]. We clear the lock's own
//! sticky flag at once (`RobustLock::make_consistent`) and record the fact in our own
//! `inconsistent` word, as before. Every locker that finds `inconsistent == 1` is told
//! `OwnerDied`, until one calls [`MutexGuard::make_consistent`] after repairing the data. So
//! owner death is reported until someone repairs, and the lock is never dead.
//!
//! | `inconsistent` | set by                                   | cleared by                    |
//! |----------------|------------------------------------------|-------------------------------|
//! | 0              | init, `make_consistent`                  |                               |
//! | 1              | a locker told `OwnerDied` by the lock    | `make_consistent` (lock held) |
//!
//! `inconsistent`, `owner_pid` and `owner_token` are written only by the lock holder, so
//! Relaxed suffices: the lock word's acquire/release orders them. `owner_token` is the
//! holder's registration token in the domain holding the lock (0 when free, or when the lock
//! is not in an attached domain's window): whether the holder is alive is asked of the registry
//! with it ([`crate::heap::ObjectState::Mutex`]), never of a pid. `owner_pid` is for display.
//! Recording it costs a lock-free scan of this process's few token cells (`os::token_for_address`),
//! no lock and no system call. (The lock keeps its own copy of the record, which is what it
//! trusts to take over from a dead holder; these two are what diagnosis and inspection read.)
//!
//! # Bounded waits ([`RawMutex::lock_bounded`], [`lock_patiently`](super::patience::lock_patiently))
//! A lock word damaged by a stray write (or a holder that hangs) must not hang the tools that
//! repair it. A bounded waiter first spins exactly as [`RawMutex::lock`] does (the uncontended
//! and briefly contended paths are unchanged), then sleeps in slices of [`LOOK_EVERY`](super::patience::LOOK_EVERY) and,
//! after each slice, looks at who holds the lock: the thread id in the lock word and the
//! holder's recorded token. A word that names no thread, a thread that does not exist,
//! or a recorded token whose registration is not alive is "no live holder". Seen twice in a
//! row with the same lock word (so a holder that has just taken the lock and not yet recorded
//! its token is never mistaken for it), it is reported as `Corrupt` at once; a holder that is
//! alive but keeps the lock past the patience is reported as `Timeout`. Neither changes the
//! lock: breaking it is the operator's `gc --force`. (Before any of this, the lock itself
//! takes over from a holder it can prove dead, `OwnerDied`: one whose record names a dead
//! registration, and, in a domain whose every process shares our pid namespace, one whose
//! word names a thread that is gone even with no record; see `robust.rs`.)

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::ObjectHeader;
use super::patience::{Stuck, describe_holder, holder_gone, lock_patiently};
use super::robust::{LockOutcome, RobustLock};
use crate::error::{Error, ErrorKind, Result};
use crate::os;
use crate::shm_safe::ShmSafe;

/// "MTX2": shmgadget's own lock (version 1 held a glibc mutex); an older build refuses it.
const MAGIC: u32 = u32::from_le_bytes(*b"MTX2");
/// `try_lock` attempts before sleeping in `lock` (about 1–2 µs of spinning in all).
const LOCK_SPINS: u32 = 64;
const WHAT: &str = "mutex";

/// The raw lock: no data, just the robust process-shared lock and its bookkeeping (96 bytes;
/// the lock word at offset 32).
#[repr(C)]
pub struct RawMutex {
    header: ObjectHeader,
    inconsistent: AtomicU32,
    owner_pid: AtomicU32,
    owner_token: AtomicU64,
    lock: RobustLock,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<RawMutex>() == 96);

/// How a raw lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// Normally.
    Clean,
    /// The data may be inconsistent: a holder died, and nobody has repaired it since.
    OwnerDied,
}

/// A lock's holders, as the domain whose window holds the lock at this address knows them:
/// tokens by its registry, and whether thread ids speak for every possible holder (see
/// [`crate::domain::threads_visible_at`]).
struct DomainLiveness(usize);

impl super::robust::Liveness for DomainLiveness {
    fn token_alive(&self, token: u64) -> Option<bool> {
        crate::domain::token_alive_at(self.0, token)
    }

    fn threads_visible(&self) -> bool {
        crate::domain::threads_visible_at(self.0)
    }
}

impl RawMutex {
    /// Initialises the lock unless another process already did; returns whether this call did.
    pub fn init(&self) -> Result<bool> {
        self.init_with(|| Ok(()))
    }

    fn init_with(&self, data: impl FnOnce() -> Result<()>) -> Result<bool> {
        self.header.init_once(MAGIC, WHAT, || {
            // SAFETY: we won the initialisation race (state INITIALIZING), so nobody else
            // uses the lock yet; it lives in shared memory that stays mapped while used.
            unsafe { self.lock.init() }.map_err(|e| Error::from_io("cannot initialise a robust mutex", e))?;
            // Relaxed: published by the header's READY store.
            self.inconsistent.store(0, Ordering::Relaxed);
            self.owner_pid.store(0, Ordering::Relaxed);
            self.owner_token.store(0, Ordering::Relaxed);
            data()
        })
    }

    /// This process's token in the domain holding the lock (0: none), recorded by each holder.
    #[inline]
    fn my_token(&self) -> u64 {
        crate::domain::token_at(self as *const Self as usize)
    }

    /// Whether a holder is alive, asked of the domain holding the lock.
    fn liveness(&self) -> DomainLiveness {
        DomainLiveness(self as *const Self as usize)
    }

    #[inline]
    fn after_lock(&self, outcome: LockOutcome, token: u64) -> Result<Acquired> {
        if outcome == LockOutcome::OwnerDied {
            // The lock's own flag is cleared at once; the death is remembered in our own word
            // until the caller repairs (see the module docs).
            // SAFETY: we hold the lock (the outcome says acquired).
            unsafe { self.lock.make_consistent() }
                .map_err(|e| Error::from_io("cannot clear the lock's owner-died flag", e))?;
            // Relaxed: only the holder writes it; the lock word orders it.
            self.inconsistent.store(1, Ordering::Relaxed);
        }
        // Relaxed: informational, written by the holder only.
        self.owner_pid.store(os::current_pid(), Ordering::Relaxed);
        self.owner_token.store(token, Ordering::Relaxed);
        // Relaxed: as above.
        Ok(if self.inconsistent.load(Ordering::Relaxed) == 1 { Acquired::OwnerDied } else { Acquired::Clean })
    }

    fn lock_error(&self, e: std::io::Error) -> Error {
        Error::from_io(format!("locking the mutex at {:p} failed (its memory may be corrupt)", self), e)
    }

    /// Spins on `try_lock` for a moment; the outcome if it got the lock.
    #[inline]
    fn spin(&self, token: u64) -> Result<Option<LockOutcome>> {
        for _ in 0..LOCK_SPINS {
            if let Some(outcome) = self.lock.try_lock(token).map_err(|e| self.lock_error(e))? {
                return Ok(Some(outcome));
            }
            for _ in 0..8 {
                std::hint::spin_loop();
            }
        }
        Ok(None)
    }

    /// Locks, waiting as long as needed (a dead holder is taken over: `OwnerDied`). Critical
    /// sections in shared memory are usually short, so it first spins on `try_lock` for a
    /// moment and only then sleeps in the kernel: a futex round trip costs ~15 µs, far more
    /// than the wait.
    #[inline]
    pub fn lock(&self) -> Result<Acquired> {
        self.header.check(MAGIC, WHAT)?;
        let token = self.my_token();
        if let Some(outcome) = self.spin(token)? {
            return self.after_lock(outcome, token);
        }
        self.lock_slow(token)
    }

    #[cold]
    fn lock_slow(&self, token: u64) -> Result<Acquired> {
        match self.lock.lock_timeout(token, None, &self.liveness()).map_err(|e| self.lock_error(e))? {
            Some(outcome) => self.after_lock(outcome, token),
            None => unreachable!("a wait without a timeout does not time out"),
        }
    }

    /// Locks if free, or if its holder is proven dead (`OwnerDied`); `Ok(None)` if another
    /// thread or process holds it.
    pub fn try_lock(&self) -> Result<Option<Acquired>> {
        self.try_lock_with(&self.liveness())
    }

    /// [`try_lock`](Self::try_lock), asking `alive` whether a holder's token is alive (for a
    /// tool that has not attached the lock's domain: `gc` asks the registry it opened).
    pub(crate) fn try_lock_with(&self, alive: &dyn super::robust::Liveness) -> Result<Option<Acquired>> {
        self.header.check(MAGIC, WHAT)?;
        let token = self.my_token();
        match self.lock.try_lock_or_take_over(token, alive).map_err(|e| self.lock_error(e))? {
            Some(outcome) => self.after_lock(outcome, token).map(Some),
            None => Ok(None),
        }
    }

    /// Locks, waiting at most `timeout`; `Ok(None)` on timeout.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<Acquired>> {
        self.header.check(MAGIC, WHAT)?;
        let token = self.my_token();
        match self.lock.lock_timeout(token, Some(timeout), &self.liveness()).map_err(|e| self.lock_error(e))? {
            Some(outcome) => self.after_lock(outcome, token).map(Some),
            None => Ok(None),
        }
    }

    /// Unlocks.
    ///
    /// # Safety
    /// The calling thread must hold the lock.
    #[inline]
    pub unsafe fn unlock(&self) {
        // Relaxed: written by the holder only.
        self.owner_pid.store(0, Ordering::Relaxed);
        self.owner_token.store(0, Ordering::Relaxed);
        // SAFETY: forwarded from the caller.
        unsafe { self.lock.unlock() }
    }

    /// Declares the protected data repaired after [`Acquired::OwnerDied`].
    ///
    /// # Safety
    /// The calling thread must hold the lock.
    pub unsafe fn make_consistent(&self) {
        // Relaxed: written by the holder only.
        self.inconsistent.store(0, Ordering::Relaxed);
    }

    /// Pid of the current holder, 0 if free (a snapshot, for display: a pid says nothing about
    /// life or death).
    pub fn owner_pid(&self) -> u32 {
        // A thread that exits holding the lock releases it without clearing our record.
        if self.lock.word() == 0 {
            return 0;
        }
        // Relaxed: a snapshot.
        self.owner_pid.load(Ordering::Relaxed)
    }

    /// Whether the current holder's process is still alive, by its registration token (the
    /// kernel releases it on death). `None` when free or when the holder is unknown (a lock
    /// outside any attached domain's window). A snapshot.
    pub fn owner_alive(&self) -> Option<bool> {
        // Relaxed: a snapshot.
        let token = self.owner_token.load(Ordering::Relaxed);
        if self.owner_pid() == 0 || token == 0 {
            return None;
        }
        crate::domain::token_alive_at(self as *const Self as usize, token)
    }

    /// Whether a holder died and the data has not been repaired since (a snapshot).
    pub fn is_inconsistent(&self) -> bool {
        // Relaxed: a snapshot.
        self.inconsistent.load(Ordering::Relaxed) == 1
    }
}

impl RawMutex {
    /// [`lock`](Self::lock), bounded (see "Bounded waits"): a lock word that names no live
    /// holder is `Corrupt` within about a second, a live holder that keeps it past `patience`
    /// is `Timeout`. `what` names the lock in messages ("the lock of heap \"h\""); it is only
    /// called when the wait fails.
    #[inline]
    pub fn lock_bounded(&self, what: impl FnOnce() -> String, patience: Duration) -> Result<Acquired> {
        self.header.check(MAGIC, WHAT)?;
        let token = self.my_token();
        if let Some(outcome) = self.spin(token)? {
            return self.after_lock(outcome, token);
        }
        self.lock_bounded_slow(what, patience, token)
    }

    #[cold]
    fn lock_bounded_slow(&self, what: impl FnOnce() -> String, patience: Duration, token: u64) -> Result<Acquired> {
        let addr = self as *const Self as usize;
        let holder = || {
            // Relaxed: snapshots, for diagnosis only.
            (self.owner_token.load(Ordering::Relaxed), self.owner_pid.load(Ordering::Relaxed))
        };
        let waited = lock_patiently(&self.lock, token, &self.liveness(), patience, |word| {
            let (token, pid) = holder();
            let alive = if token == 0 { None } else { crate::domain::token_alive_at(addr, token) };
            holder_gone(word, alive, &describe_holder(word, crate::registry::token_slot(token), pid))
        })
        .map_err(|e| self.lock_error(e))?;
        let domain = crate::domain::domain_name_at(addr);
        let fix = match &domain {
            Some(d) => format!("`shmgadget gc --domain {d} --force` breaks it and recovers the heap"),
            None => "`shmgadget gc --domain <its domain> --force` breaks it".to_owned(),
        };
        match waited {
            Ok(outcome) => self.after_lock(outcome, token),
            Err(Stuck::Gone(why)) => Err(Error::new(ErrorKind::Corrupt, format!("{} is held by {why}; {fix}", what()))),
            Err(Stuck::Slow(word)) => {
                let (token, pid) = holder();
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{} is held by {} (alive) for more than {} s; if that process hangs, stop it",
                        what(),
                        describe_holder(word, crate::registry::token_slot(token), pid),
                        patience.as_secs()
                    ),
                ))
            }
        }
    }

    /// Re-initialises the lock in place, abandoning whoever holds it, and marks the data
    /// inconsistent so the next locker recovers it (`Acquired::OwnerDied`).
    ///
    /// # Safety
    /// No thread of any process may hold the lock or be inside a lock or unlock call on it:
    /// the caller has proven its holder gone (a bounded lock said `Corrupt`) and holds what
    /// excludes new users (`gc --force` holds the shm directory's lock).
    pub(crate) unsafe fn break_lock(&self) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Relaxed: published by the Release store of the free word in `init` below, which the
        // next locker's CAS reads.
        self.owner_pid.store(0, Ordering::Relaxed);
        self.owner_token.store(0, Ordering::Relaxed);
        self.inconsistent.store(1, Ordering::Relaxed);
        // SAFETY: forwarded from the caller: nobody uses the lock while it is rebuilt.
        unsafe { self.lock.init() }.map_err(|e| Error::from_io("cannot re-initialise a robust mutex", e))?;
        Ok(())
    }

    /// The lock word and the holder recorded for it (for diagnosis).
    pub(crate) fn holder_snapshot(&self) -> (u32, u64, u32) {
        // Relaxed: snapshots.
        (self.lock.word(), self.owner_token.load(Ordering::Relaxed), self.owner_pid.load(Ordering::Relaxed))
    }
}

/// A mutex protecting a `T` in shared memory, across processes. Place it (zeroed) in shared
/// memory and [`init`](Mutex::init) it; then lock it from any process.
///
/// ```
/// use shmgadget::sync::{LockError, Mutex};
/// # let storage = Box::new(std::mem::MaybeUninit::<Mutex<u64>>::zeroed());
/// # let m: &Mutex<u64> = unsafe { storage.assume_init_ref() };
/// // `m` lives in a section (for example `section.at::<Mutex<u64>>(0)?`).
/// m.init(0)?;
/// let mut guard = match m.lock() {
///     Ok(guard) => guard,
///     Err(LockError::OwnerDied(mut guard)) => {
///         // The previous holder died while holding it: repair the data, then say so.
///         *guard = 0;
///         guard.make_consistent();
///         guard
///     }
///     Err(e) => return Err(e.into()),
/// };
/// *guard += 1;
/// # Ok::<(), shmgadget::Error>(())
/// ```
#[repr(C)]
pub struct Mutex<T> {
    raw: RawMutex,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, which exists only while the lock is held,
// so at most one thread (of any process) accesses it at a time; `T: ShmSafe` makes it valid to
// share with other processes, and `Send` to hand between threads.
unsafe impl<T: ShmSafe + Send> Sync for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: ShmSafe + Send> Send for Mutex<T> {}

/// Why [`Mutex::lock`] did not return a plain guard. It is a [`std::error::Error`] whose text is
/// that of the [`Error`] it converts into.
///
/// ```
/// use shmgadget::sync::LockError;
/// let e = LockError::<u64>::Timeout;
/// let text = (&e as &dyn std::error::Error).to_string();
/// assert_eq!(text, shmgadget::Error::from(e).to_string());
/// ```
#[must_use]
pub enum LockError<'a, T: ShmSafe> {
    /// The lock is held, but a previous holder died while holding it: repair the data through
    /// the guard, then call [`MutexGuard::make_consistent`].
    OwnerDied(MutexGuard<'a, T>),
    /// `try_lock` found it held.
    WouldBlock,
    /// `lock_timeout` ran out of time.
    Timeout,
    /// The mutex is not usable (uninitialised, destroyed, corrupt).
    Failed(Error),
}

impl<T: ShmSafe> From<LockError<'_, T>> for Error {
    fn from(e: LockError<'_, T>) -> Error {
        match e {
            LockError::OwnerDied(_) => Error::new(ErrorKind::OwnerDied, OWNER_DIED),
            LockError::WouldBlock => Error::new(ErrorKind::Timeout, WOULD_BLOCK),
            LockError::Timeout => Error::new(ErrorKind::Timeout, TIMED_OUT),
            LockError::Failed(e) => e,
        }
    }
}

const OWNER_DIED: &str = "a previous holder of the mutex died while holding it; the data may be inconsistent";
const WOULD_BLOCK: &str = "the mutex is held by someone else";
const TIMED_OUT: &str = "timed out waiting for the mutex";

/// The same text as the [`Error`] it converts into. (Returning it from a function whose error
/// type is `Box<dyn std::error::Error>` needs `'static`: convert it first,
/// `shmgadget::Error::from(e)`, which also drops the guard an `OwnerDied` carries.)
impl<T: ShmSafe> std::fmt::Display for LockError<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::OwnerDied(_) => f.write_str(OWNER_DIED),
            LockError::WouldBlock => f.write_str(WOULD_BLOCK),
            LockError::Timeout => f.write_str(TIMED_OUT),
            LockError::Failed(e) => std::fmt::Display::fmt(e, f),
        }
    }
}

impl<T: ShmSafe> std::error::Error for LockError<'_, T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl<T: ShmSafe> std::fmt::Debug for LockError<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::OwnerDied(_) => f.write_str("OwnerDied(..)"),
            LockError::WouldBlock => f.write_str("WouldBlock"),
            LockError::Timeout => f.write_str("Timeout"),
            LockError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl<T: ShmSafe> Mutex<T> {
    /// Initialises the mutex holding `value`, unless another process already did (then
    /// `value` is dropped and the existing data kept). Returns whether this call initialised it.
    pub fn init(&self, value: T) -> Result<bool> {
        self.raw.init_with(|| {
            // SAFETY: we won the initialisation race, so nobody else accesses the data yet.
            unsafe { self.data.get().write(value) };
            Ok(())
        })
    }

    #[inline]
    fn guard(&self, acquired: Acquired) -> std::result::Result<MutexGuard<'_, T>, LockError<'_, T>> {
        let guard = MutexGuard { mutex: self, _not_send: PhantomData };
        match acquired {
            Acquired::Clean => Ok(guard),
            Acquired::OwnerDied => Err(LockError::OwnerDied(guard)),
        }
    }

    /// Locks, waiting as long as needed.
    #[inline]
    pub fn lock(&self) -> std::result::Result<MutexGuard<'_, T>, LockError<'_, T>> {
        let acquired = self.raw.lock().map_err(LockError::Failed)?;
        self.guard(acquired)
    }

    /// Locks if free, else `Err(LockError::WouldBlock)`.
    pub fn try_lock(&self) -> std::result::Result<MutexGuard<'_, T>, LockError<'_, T>> {
        match self.raw.try_lock().map_err(LockError::Failed)? {
            Some(acquired) => self.guard(acquired),
            None => Err(LockError::WouldBlock),
        }
    }

    /// Locks, waiting at most `timeout`, else `Err(LockError::Timeout)`.
    pub fn lock_timeout(&self, timeout: Duration) -> std::result::Result<MutexGuard<'_, T>, LockError<'_, T>> {
        match self.raw.lock_timeout(timeout).map_err(LockError::Failed)? {
            Some(acquired) => self.guard(acquired),
            None => Err(LockError::Timeout),
        }
    }

    /// The raw lock (for inspection: owner pid, consistency).
    pub fn raw(&self) -> &RawMutex {
        &self.raw
    }
}

/// Proof of holding a [`Mutex`]; gives access to the data and unlocks when dropped.
#[must_use = "the mutex unlocks as soon as the guard is dropped"]
pub struct MutexGuard<'a, T: ShmSafe> {
    mutex: &'a Mutex<T>,
    /// The lock is released by the thread that took it (the word and this thread's held list
    /// name that thread).
    _not_send: PhantomData<*const ()>,
}

impl<'a, T: ShmSafe> MutexGuard<'a, T> {
    /// Declares the data repaired after [`LockError::OwnerDied`]; later lockers get a plain
    /// guard again. Harmless when nothing died.
    pub fn make_consistent(&mut self) {
        // SAFETY: a guard exists only while its thread holds the lock.
        unsafe { self.mutex.raw.make_consistent() }
    }

    /// The mutex this guard holds, with the guard's full lifetime (for re-locking).
    pub(crate) fn mutex(&self) -> &'a Mutex<T> {
        self.mutex
    }
}

impl<T: ShmSafe> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves this thread holds the lock, so no one else accesses the data.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T: ShmSafe> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference from this guard.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T: ShmSafe> Drop for MutexGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: a guard exists only while its thread holds the lock.
        unsafe { self.mutex.raw.unlock() }
    }
}

impl<T: ShmSafe + std::fmt::Debug> std::fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MutexGuard").field(&**self).finish()
    }
}
