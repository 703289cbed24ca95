//! What the futex-word algorithms are built from: atomics and a shared futex. In normal
//! builds these are `std` atomics and the kernel futex (`os`). Under `--cfg loom` they are
//! loom's atomics and a loom model of the futex, so `tests/loom.rs` model-checks the very same
//! semaphore, event and initialisation code in-process.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

pub(crate) use crate::os::FutexWait;

#[cfg(not(loom))]
pub(crate) use crate::os::{futex_wait, futex_wake};

/// How many times a waiter spins before it sleeps (once under loom, to keep the state space
/// small).
#[cfg(not(loom))]
pub(crate) const SPINS: u32 = 100;
#[cfg(loom)]
pub(crate) const SPINS: u32 = 1;

#[cfg(loom)]
mod model {
    //! The futex model: the check of the word and going to sleep are atomic with respect to
    //! wake-ups (as in the kernel, where the hash-bucket lock provides it). A wake-up wakes every
    //! sleeper: the model over-approximates wake counts, so what it checks is the protocol's
    //! lost-wake-up logic (the waiter counts and their orderings), not `n`.
    use super::{AtomicU32, FutexWait, Ordering};
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        static ref LOCK: Mutex<()> = Mutex::new(());
        static ref SLEEPERS: Condvar = Condvar::new();
    }

    pub(crate) fn futex_wait(
        word: &AtomicU32,
        expected: u32,
        timeout: Option<std::time::Duration>,
    ) -> std::io::Result<FutexWait> {
        let guard = LOCK.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return Ok(FutexWait::Changed);
        }
        if timeout.is_some() {
            // Time is not modelled: a timed wait gives up at once, letting others run.
            drop(guard);
            loom::thread::yield_now();
            return Ok(FutexWait::TimedOut);
        }
        drop(SLEEPERS.wait(guard).unwrap());
        Ok(FutexWait::Woken)
    }

    pub(crate) fn futex_wake(_word: &AtomicU32, _n: u32) -> usize {
        let _guard = LOCK.lock().unwrap();
        SLEEPERS.notify_all();
        0
    }
}

#[cfg(loom)]
pub(crate) use model::{futex_wait, futex_wake};

/// Inside a retry loop: a spin hint, or under loom a yield (loom must see the other threads
/// make progress, or it reports the loop as a livelock).
#[inline]
pub(crate) fn retry_hint() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}
