//! An event (manual or auto reset) on a shared futex word.
//!
//! # Protocol
//! `signaled` is 0 (reset) or 1 (set). `set` stores 1 and, if `waiters` says someone may be
//! asleep, wakes one waiter (auto reset) or all (manual reset). A waiter consumes the event
//! (auto: CAS 1→0; manual: just sees 1) or sleeps on `signaled` while it is 0. `set`'s write of
//! `signaled` and a waiter's write of `waiters`, each followed by a read of the other word, are
//! separated by `fence(SeqCst)` on both sides (Dekker's pattern; see `semaphore.rs`). A woken waiter always tries to consume before
//! it reports a timeout, so a wake-up is never swallowed by a waiter that then gives up.
//!
//! | `signaled` | after `set`                | after a waiter consumes (auto) | after `reset` |
//! |------------|----------------------------|--------------------------------|---------------|
//! | 0          | 1                          | (cannot consume)               | 0             |
//! | 1          | 1 (setting twice is one)   | 0                              | 0             |

use super::shim::{AtomicU32, Ordering, fence};
use std::time::Duration;

use super::{ObjectHeader, park_until};
use crate::error::Result;

const MAGIC: u32 = u32::from_le_bytes(*b"EVT1");
const WHAT: &str = "event";

/// Whether a successful wait resets the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventMode {
    /// Stays set until [`Event::reset`]; `set` wakes every waiter.
    Manual,
    /// A successful wait resets it; `set` wakes one waiter.
    Auto,
}

/// An event shared between processes. Place it in shared memory (zeroed), then
/// [`init`](Event::init) it.
#[repr(C)]
pub struct Event {
    header: ObjectHeader,
    signaled: AtomicU32,
    waiters: AtomicU32,
    mode: AtomicU32,
    _reserved: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<Event>() == 32);

impl Event {
    /// Initialises the event (reset, or set if `initially_set`), unless another process already
    /// did. Returns whether this call initialised it.
    pub fn init(&self, mode: EventMode, initially_set: bool) -> Result<bool> {
        self.header.init_once(MAGIC, WHAT, || {
            // Relaxed: published by the header's READY store.
            self.signaled.store(initially_set as u32, Ordering::Relaxed);
            self.mode.store(if mode == EventMode::Auto { 1 } else { 0 }, Ordering::Relaxed);
            Ok(())
        })
    }

    fn auto(&self) -> bool {
        // Relaxed: frozen after initialisation.
        self.mode.load(Ordering::Relaxed) == 1
    }

    /// Sets the event, waking one waiter (auto) or all of them (manual).
    pub fn set(&self) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Release: publishes what the setter wrote before to the waiter's Acquire.
        self.signaled.swap(1, Ordering::Release);
        // SeqCst fence: the setter's half of the Dekker pair; pairs with the fence in
        // `wait_inner`. Relaxed load: ordered by the fence.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            super::shim::futex_wake(&self.signaled, if self.auto() { 1 } else { u32::MAX });
        }
        Ok(())
    }

    /// Resets the event.
    pub fn reset(&self) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Relaxed: a reset races with `set` by nature; either order is a valid outcome.
        self.signaled.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the event is set now (a snapshot).
    pub fn is_set(&self) -> Result<bool> {
        self.header.check(MAGIC, WHAT)?;
        // Relaxed: a snapshot.
        Ok(self.signaled.load(Ordering::Relaxed) == 1)
    }

    /// Waits until the event is set (and resets it, in auto mode).
    pub fn wait(&self) -> Result<()> {
        self.wait_inner(None)
    }

    /// Like [`wait`](Event::wait), failing with [`crate::ErrorKind::Timeout`] after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.wait_inner(Some(timeout))
    }

    /// Processes that may be asleep in `wait` now (a snapshot).
    pub fn waiters(&self) -> u32 {
        // Relaxed: a snapshot for display.
        self.waiters.load(Ordering::Relaxed)
    }

    /// Destroys the event: current and future waits fail with [`crate::ErrorKind::Destroyed`].
    pub fn destroy(&self) -> Result<()> {
        self.header.destroy(MAGIC, WHAT)?;
        super::shim::futex_wake(&self.signaled, u32::MAX);
        Ok(())
    }

    fn try_consume(&self) -> bool {
        if self.auto() {
            // Acquire: pairs with the Release swap in `set`.
            self.signaled.compare_exchange(1, 0, Ordering::Acquire, Ordering::Relaxed).is_ok()
        } else {
            // Acquire: pairs with the Release swap in `set`.
            self.signaled.load(Ordering::Acquire) == 1
        }
    }

    fn wait_inner(&self, timeout: Option<Duration>) -> Result<()> {
        self.header.check(MAGIC, WHAT)?;
        // Sleeps on `signaled` while it is 0; the waiter count pairs with the fence in `set`.
        park_until(&self.header, MAGIC, WHAT, &self.signaled, &self.waiters, timeout, || Ok(self.try_consume()))
    }
}

#[cfg(loom)]
impl Event {
    pub(crate) fn from_parts(header: ObjectHeader) -> Self {
        Event {
            header,
            signaled: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            mode: AtomicU32::new(0),
            _reserved: AtomicU32::new(0),
        }
    }
}
