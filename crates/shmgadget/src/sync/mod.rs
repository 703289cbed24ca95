//! Process-shared synchronisation that survives crashed processes.
//!
//! Every primitive here is a `#[repr(C)]` value made of atomics, every byte defined by
//! shmgadget (the mutex's robust lock too, `robust.rs`), that lives *in shared memory*: in a section at any offset, or as a
//! field of a struct that lives there. All-zero bytes mean "not initialised"; `init` turns them
//! into a working object, safely even when several processes race to do it.
//!
//! | type          | built on                                  | a holder/waiter that dies           |
//! |---------------|-------------------------------------------|-------------------------------------|
//! | [`Mutex<T>`]  | our robust lock: word + owner record      | next locker gets `OwnerDied(guard)` |
//! | [`Semaphore`] | shared futex word, waiter count           | counts are untouched (no owner)     |
//! | [`Event`]     | shared futex word, manual or auto reset   | (no owner)                          |
//! | [`Condvar`]   | shared futex sequence word                | waiters re-lock the robust mutex    |
//!
//! None uses `FUTEX_PRIVATE_FLAG` (private futexes never work across processes), and none
//! makes a system call when nobody sleeps: a side that changes state wakes sleepers only when
//! the waiter count says someone may be asleep.
//!
//! # The object header
//! Each primitive starts with an [`ObjectHeader`]:
//!
//! | `state`        | meaning                          | next                               |
//! |----------------|----------------------------------|------------------------------------|
//! | `UNINIT` (0)   | zeroed memory, never initialised | `INITIALIZING` (CAS by one process) |
//! | `INITIALIZING` | one process is initialising      | `READY`                            |
//! | `READY`        | usable                           | `DESTROYED`                        |
//! | `DESTROYED`    | destroyed; every wait fails      | (final)                            |
//!
//! The initialiser writes the object's fields and `magic`/`version`, then publishes them with a
//! Release store of `READY` and wakes processes waiting for it; everyone else Acquire-loads
//! `state` and checks `magic`/`version` before any operation. An initialiser that dies midway
//! leaves `INITIALIZING`; others give up after [`INIT_WAIT`] with an error, never hang.

mod condvar;
mod event;
mod mutex;
mod patience;
pub(crate) mod robust;
mod semaphore;
pub(crate) mod shim;

pub use condvar::Condvar;
pub use event::{Event, EventMode};
pub use mutex::{Acquired, LockError, Mutex, MutexGuard, RawMutex};
pub use patience::LOCK_PATIENCE;
pub(crate) use patience::{LOOK_EVERY, Stuck, describe_holder, holder_gone, lock_patiently};
#[cfg(loom)]
pub use robust::{Liveness as ModelLiveness, LockOutcome as ModelLockOutcome, ModelRobustLock};
pub(crate) use robust::{LockOutcome, RobustLock};
pub use semaphore::{SEMAPHORE_MAX, Semaphore};

use shim::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::os;

/// How long `init` waits for another process's initialisation to finish.
pub const INIT_WAIT: Duration = Duration::from_secs(2);

const UNINIT: u32 = 0;
const INITIALIZING: u32 = 1;
const READY: u32 = 2;
const DESTROYED: u32 = 3;
const VERSION: u32 = 1;

/// The header at the start of every shared synchronisation object (16 bytes).
#[repr(C)]
pub struct ObjectHeader {
    state: AtomicU32,
    magic: AtomicU32,
    version: AtomicU32,
    init_pid: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<ObjectHeader>() == 16);

impl ObjectHeader {
    /// Initialises the object once: the caller that wins the race runs `init` and publishes;
    /// the others wait (at most [`INIT_WAIT`]) and validate. Returns whether this call
    /// initialised it.
    pub(crate) fn init_once(&self, magic: u32, what: &str, init: impl FnOnce() -> Result<()>) -> Result<bool> {
        let deadline = Instant::now() + INIT_WAIT;
        loop {
            // Acquire (both outcomes): a READY seen here makes the initialiser's writes visible.
            match self.state.compare_exchange(UNINIT, INITIALIZING, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => {
                    // Relaxed: published by the Release store of READY below.
                    self.init_pid.store(os::current_pid(), Ordering::Relaxed);
                    if let Err(e) = init() {
                        // Release: gives the object back for someone else to try.
                        self.state.store(UNINIT, Ordering::Release);
                        shim::futex_wake(&self.state, u32::MAX);
                        return Err(e);
                    }
                    self.magic.store(magic, Ordering::Relaxed);
                    self.version.store(VERSION, Ordering::Relaxed);
                    // Release: publishes every field written by `init` and above; pairs with
                    // the Acquire loads in `check` and in the CAS failure path.
                    self.state.store(READY, Ordering::Release);
                    shim::futex_wake(&self.state, u32::MAX);
                    return Ok(true);
                }
                Err(INITIALIZING) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "{what} at {:p} is still being initialised by pid {} after {INIT_WAIT:?}; \
                                 that process probably died midway: zero the memory and initialise again",
                                self,
                                // Relaxed: informational.
                                self.init_pid.load(Ordering::Relaxed)
                            ),
                        ));
                    }
                    let _ = shim::futex_wait(&self.state, INITIALIZING, Some(left.min(Duration::from_millis(50))));
                }
                Err(_) => return self.check(magic, what).map(|()| false),
            }
        }
    }

    /// Checks that the object is initialised, of the right type and version, and not destroyed.
    #[inline]
    pub(crate) fn check(&self, magic: u32, what: &str) -> Result<()> {
        // Acquire: pairs with the Release store of READY in `init_once`.
        let state = self.state.load(Ordering::Acquire);
        // Relaxed: frozen once READY, which the Acquire above made visible. Each type's magic
        // carries its layout version ("MTX1"), so the hot path compares two words; `version`
        // is only examined to explain a mismatch.
        let m = self.magic.load(Ordering::Relaxed);
        if state == READY && m == magic {
            return Ok(());
        }
        Err(self.describe_bad(state, m, self.version.load(Ordering::Relaxed), magic, what))
    }

    #[cold]
    fn describe_bad(&self, state: u32, m: u32, v: u32, magic: u32, what: &str) -> Error {
        match state {
            UNINIT => Error::new(
                ErrorKind::InvalidArgument,
                format!("{what} at {:p} is not initialised (zeroed memory); call init first", self),
            ),
            INITIALIZING => Error::new(ErrorKind::Timeout, format!("{what} at {:p} is still being initialised", self)),
            DESTROYED => Error::new(ErrorKind::Destroyed, format!("{what} at {:p} was destroyed", self)),
            READY if m != magic => Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{what} at {:p} has magic {m:#010x}, expected {magic:#010x}: this memory holds something else",
                    self
                ),
            ),
            READY => Error::new(
                ErrorKind::Corrupt,
                format!("{what} at {:p} has layout version {v}, expected {VERSION}", self),
            ),
            other => Error::new(
                ErrorKind::Corrupt,
                format!("{what} at {:p} has impossible state {other}, expected 0 to 3: the memory is corrupt", self),
            ),
        }
    }

    /// Marks the object destroyed; waiters wake up (the caller wakes the futexes they sleep
    /// on) and fail with [`ErrorKind::Destroyed`].
    pub(crate) fn destroy(&self, magic: u32, what: &str) -> Result<()> {
        self.check(magic, what)?;
        // Release: waiters that Acquire-load DESTROYED stop waiting.
        self.state.store(DESTROYED, Ordering::Release);
        Ok(())
    }
}

/// The waiter's side of every futex-word primitive: spin a little, then count ourselves in
/// `waiters`, fence, and sleep on `word` while it is 0 until `ready()` succeeds, the object
/// goes bad (destroyed, corrupt) or the timeout expires. `ready` is tried again after every
/// wake-up before a timeout is reported, so a wake-up meant for us is never dropped.
///
/// The `fetch_add` on `waiters` followed by `fence(SeqCst)` is the waiter's half of the Dekker
/// pair; the waker's half (write the word, `fence(SeqCst)`, read `waiters`) lives in each
/// type's post/set/notify (see `semaphore.rs`).
pub(crate) fn park_until(
    header: &ObjectHeader,
    magic: u32,
    what: &str,
    word: &AtomicU32,
    waiters: &AtomicU32,
    timeout: Option<Duration>,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    for _ in 0..SPINS {
        if ready()? {
            return Ok(());
        }
        std::hint::spin_loop();
    }
    let deadline = deadline(timeout);
    // Relaxed + SeqCst fence: the waiter's half of the Dekker pair (see above).
    waiters.fetch_add(1, Ordering::Relaxed);
    shim::fence(Ordering::SeqCst);
    let result = loop {
        match ready() {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        if let Err(e) = header.check(magic, what) {
            break Err(e);
        }
        let left = remaining(deadline);
        if left == Some(Duration::ZERO) {
            break Err(timeout_error(what, timeout));
        }
        if let Err(e) = shim::futex_wait(word, 0, left) {
            break Err(Error::from_io(format!("futex wait on a {what} failed"), e));
        }
    };
    // Relaxed: only a hint for wakers; ordering is carried by `word` and the fences.
    waiters.fetch_sub(1, Ordering::Relaxed);
    result
}

/// A deadline from an optional timeout.
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout
        .map(|t| Instant::now().checked_add(t).unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX as u64)))
}

/// What is left until `deadline` (`None`: wait for ever); `Some(ZERO)` when it has passed.
pub(crate) fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

pub(crate) fn timeout_error(what: &str, timeout: Option<Duration>) -> Error {
    Error::new(ErrorKind::Timeout, format!("timed out after {:?} waiting on {what}", timeout.unwrap_or_default()))
}

pub(crate) use shim::SPINS;

#[cfg(loom)]
impl ObjectHeader {
    fn new_uninit() -> Self {
        ObjectHeader {
            state: AtomicU32::new(0),
            magic: AtomicU32::new(0),
            version: AtomicU32::new(0),
            init_pid: AtomicU32::new(0),
        }
    }
}

#[cfg(loom)]
impl Semaphore {
    /// An uninitialised semaphore outside shared memory, for loom models (loom's atomics
    /// cannot be made from zeroed bytes).
    pub fn new_uninit() -> Self {
        Semaphore::from_parts(ObjectHeader::new_uninit())
    }
}

#[cfg(loom)]
impl Event {
    /// An uninitialised event outside shared memory, for loom models.
    pub fn new_uninit() -> Self {
        Event::from_parts(ObjectHeader::new_uninit())
    }
}
