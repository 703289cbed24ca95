//! A condition variable for the robust [`Mutex`](super::Mutex), on a shared futex word.
//!
//! # Protocol
//! `seq` counts notifications. A waiter, still holding the mutex, counts itself in `waiters`
//! and reads `seq`, then unlocks and sleeps while `seq` is unchanged. A notifier bumps `seq`
//! and wakes sleepers if `waiters` says there may be some. Because the waiter reads `seq`
//! before releasing the mutex, a notifier that changed the predicate under the mutex (and so
//! after the waiter unlocked) always bumps `seq` past the value the waiter sleeps on: the kernel
//! then refuses to sleep, and no wake-up is lost. Each side's write of its word and read of the
//! other are separated by `fence(SeqCst)` (Dekker's pattern, see `semaphore.rs`), so a notifier
//! skips the wake call only when no waiter can be asleep.
//!
//! A waiter returns with the mutex held again, which may report `OwnerDied` if a holder died
//! meanwhile, exactly as a plain `lock` would. Spurious wake-ups are possible: wait in a loop.

use super::shim::{AtomicU32, Ordering, fence};
use std::time::Duration;

use super::ObjectHeader;
use super::mutex::{LockError, MutexGuard};
use crate::error::Result;
use crate::shm_safe::ShmSafe;

const MAGIC: u32 = u32::from_le_bytes(*b"CND1");
const WHAT: &str = "condition variable";

/// A condition variable shared between processes. Place it (zeroed) in shared memory and
/// [`init`](Condvar::init) it.
#[repr(C)]
pub struct Condvar {
    header: ObjectHeader,
    seq: AtomicU32,
    waiters: AtomicU32,
    _reserved: [AtomicU32; 2],
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<Condvar>() == 32);

/// The result of a condvar wait: the re-acquired guard (or why not), and whether it timed out.
pub type WaitResult<'a, T> = (std::result::Result<MutexGuard<'a, T>, LockError<'a, T>>, bool);

impl Condvar {
    /// Initialises it unless another process already did; returns whether this call did.
    pub fn init(&self) -> Result<bool> {
        self.header.init_once(MAGIC, WHAT, || Ok(()))
    }

    /// Releases the mutex, sleeps until notified, and locks the mutex again.
    pub fn wait<'a, T: ShmSafe>(
        &self,
        guard: MutexGuard<'a, T>,
    ) -> std::result::Result<MutexGuard<'a, T>, LockError<'a, T>> {
        self.wait_inner(guard, None).0
    }

    /// Like [`wait`](Condvar::wait), but wakes after `timeout` at the latest; the flag says
    /// whether it timed out.
    pub fn wait_timeout<'a, T: ShmSafe>(&self, guard: MutexGuard<'a, T>, timeout: Duration) -> WaitResult<'a, T> {
        self.wait_inner(guard, Some(timeout))
    }

    fn wait_inner<'a, T: ShmSafe>(&self, guard: MutexGuard<'a, T>, timeout: Option<Duration>) -> WaitResult<'a, T> {
        if let Err(e) = self.header.check(MAGIC, WHAT) {
            return (Err(LockError::Failed(e)), false);
        }
        let mutex = guard.mutex();
        // Relaxed + SeqCst fence: the waiter's half of the Dekker pair; pairs with the fence in
        // `notify`. The read of `seq` happens before the mutex is released (see module docs).
        self.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let seq = self.seq.load(Ordering::Relaxed);
        drop(guard);
        let woke = super::shim::futex_wait(&self.seq, seq, timeout);
        // Relaxed: a hint for notifiers only.
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        let timed_out = matches!(woke, Ok(super::shim::FutexWait::TimedOut));
        let relocked = mutex.lock();
        if let Err(e) = self.header.check(MAGIC, WHAT) {
            drop(relocked);
            return (Err(LockError::Failed(e)), timed_out);
        }
        (relocked, timed_out)
    }

    /// Wakes one waiter.
    pub fn notify_one(&self) -> Result<()> {
        self.notify(1)
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) -> Result<()> {
        self.notify(u32::MAX)
    }

    fn notify(&self, n: u32) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Relaxed + SeqCst fence: the notifier's half of the Dekker pair; pairs with the fence
        // in `wait_inner`.
        self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            super::shim::futex_wake(&self.seq, n);
        }
        Ok(())
    }

    /// Waiters now (a snapshot).
    pub fn waiters(&self) -> u32 {
        // Relaxed: a snapshot.
        self.waiters.load(Ordering::Relaxed)
    }

    /// Destroys it: waiters wake and fail with [`crate::ErrorKind::Destroyed`].
    pub fn destroy(&self) -> Result<()> {
        self.header.destroy(MAGIC, WHAT)?;
        // Relaxed: the futex wake below makes sleepers re-check the header.
        self.seq.fetch_add(1, Ordering::Relaxed);
        super::shim::futex_wake(&self.seq, u32::MAX);
        Ok(())
    }
}
