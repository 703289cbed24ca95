//! A counting semaphore on a shared futex word.
//!
//! # Protocol
//! * `count` is the number of available units, at most [`SEMAPHORE_MAX`]. `post` adds one;
//!   `wait` takes one, sleeping on `count` while it is 0.
//! * `waiters` counts processes that may be asleep on `count`. A waiter increments it *before*
//!   its last look at `count`, and a poster reads it *after* incrementing `count`. Each side
//!   puts a `fence(SeqCst)` between its write and its read of the other word (Dekker's pattern:
//!   without the fences both reads could miss the other side's write), so either the waiter
//!   sees the new unit or the poster sees the waiter and wakes it. (Fences rather than SeqCst
//!   accesses because loom models fences exactly; `tests/loom.rs` checks this very code.) The
//!   futex closes the remaining gap: the kernel sleeps only if `count` is still 0 when it looks.
//! * No system call happens when `waiters` is 0.
//! * A waiter killed while counted leaves `waiters` too high: later posts make a spare wake
//!   call (harmless, only slower). A poster killed mid-`post` either added its unit or did not.

use super::shim::{AtomicU32, Ordering, fence};
use std::time::Duration;

use super::{ObjectHeader, park_until};
use crate::error::{Error, ErrorKind, Result};

const MAGIC: u32 = u32::from_le_bytes(*b"SEM1");
const WHAT: &str = "semaphore";

/// Largest count a semaphore can hold.
pub const SEMAPHORE_MAX: u32 = i32::MAX as u32;

/// A counting semaphore shared between processes. Place it in shared memory (zeroed), then
/// [`init`](Semaphore::init) it.
#[repr(C)]
pub struct Semaphore {
    header: ObjectHeader,
    count: AtomicU32,
    waiters: AtomicU32,
    _reserved: [AtomicU32; 2],
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<Semaphore>() == 32);

impl Semaphore {
    /// Initialises the semaphore with `initial` units, unless another process already did
    /// (then it is only validated). Returns whether this call initialised it.
    pub fn init(&self, initial: u32) -> Result<bool> {
        if initial > SEMAPHORE_MAX {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("initial count {initial} exceeds {SEMAPHORE_MAX}"),
            ));
        }
        self.header.init_once(MAGIC, WHAT, || {
            // Relaxed: published by the header's READY store.
            self.count.store(initial, Ordering::Relaxed);
            self.waiters.store(0, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Adds one unit, waking one sleeping waiter if there is one.
    pub fn post(&self) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        let mut c = self.count.load(Ordering::Relaxed);
        loop {
            if c >= SEMAPHORE_MAX {
                return Err(self.bad_count(c, "post would exceed the maximum count"));
            }
            // Release: publishes the unit to the taker's Acquire CAS in `try_take`.
            match self.count.compare_exchange_weak(c, c + 1, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        // SeqCst fence: the poster's half of the Dekker pair (see module docs); pairs with the
        // fence in `wait_inner`. Relaxed load: ordered by the fence.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            super::shim::futex_wake(&self.count, 1);
        }
        Ok(())
    }

    /// Takes a unit if one is available, without waiting.
    pub fn try_wait(&self) -> Result<bool> {
        self.header.check(MAGIC, WHAT)?;
        self.try_take()
    }

    /// Takes a unit, waiting as long as needed. Fails if the semaphore is destroyed or corrupt.
    pub fn wait(&self) -> Result<()> {
        self.wait_inner(None)
    }

    /// Takes a unit, waiting at most `timeout`; fails with [`ErrorKind::Timeout`] after it.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.wait_inner(Some(timeout))
    }

    /// Units available now (a snapshot).
    pub fn count(&self) -> Result<u32> {
        self.header.check(MAGIC, WHAT)?;
        // Relaxed: a snapshot for display.
        Ok(self.count.load(Ordering::Relaxed))
    }

    /// Processes that may be asleep in `wait` now (a snapshot).
    pub fn waiters(&self) -> u32 {
        // Relaxed: a snapshot for display.
        self.waiters.load(Ordering::Relaxed)
    }

    /// Destroys the semaphore: every current and future wait fails with
    /// [`ErrorKind::Destroyed`].
    pub fn destroy(&self) -> Result<()> {
        self.header.destroy(MAGIC, WHAT)?;
        super::shim::futex_wake(&self.count, u32::MAX);
        Ok(())
    }

    fn try_take(&self) -> Result<bool> {
        // Relaxed: the CAS below validates the value.
        let mut c = self.count.load(Ordering::Relaxed);
        loop {
            if c == 0 {
                return Ok(false);
            }
            if c > SEMAPHORE_MAX {
                return Err(self.bad_count(c, "count is impossible"));
            }
            // Acquire: pairs with the poster's Release CAS, so what the poster wrote before
            // posting is visible to the taker.
            match self.count.compare_exchange_weak(c, c - 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(true),
                Err(now) => c = now,
            }
        }
    }

    fn wait_inner(&self, timeout: Option<Duration>) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Sleeps on `count` while it is 0; the waiter count pairs with the fence in `post`.
        park_until(&self.header, MAGIC, WHAT, &self.count, &self.waiters, timeout, || self.try_take())
    }

    #[cold]
    fn bad_count(&self, c: u32, why: &str) -> Error {
        if c > SEMAPHORE_MAX {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "semaphore at {:p} has count {c}, above the maximum {SEMAPHORE_MAX}: the memory is corrupt",
                    self
                ),
            )
        } else {
            Error::new(ErrorKind::InvalidArgument, format!("semaphore at {:p}: {why} ({c})", self))
        }
    }
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore").field("count", &self.count()).field("waiters", &self.waiters()).finish()
    }
}

#[cfg(loom)]
impl Semaphore {
    pub(crate) fn from_parts(header: ObjectHeader) -> Self {
        Semaphore {
            header,
            count: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            _reserved: [AtomicU32::new(0), AtomicU32::new(0)],
        }
    }
}
