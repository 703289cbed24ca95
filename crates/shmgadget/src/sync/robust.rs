//! shmgadget's own robust lock: a lock word plus an owner record, every byte defined here, so
//! a Linux and a Windows build of the same version agree on it (64 bytes). [`RawMutex`] and the
//! registry embed it.
//!
//! [`RawMutex`]: super::RawMutex
//!
//! # Protocol
//! | field         | value                                           | written by                |
//! |---------------|-------------------------------------------------|---------------------------|
//! | `word`        | 0 free; else holder's thread id \| `WAITERS`    | CAS to take, swap to free |
//! | `owner_tid`   | the holder's thread id, once it has recorded    | the holder                |
//! | `owner_token` | holder's process token in the lock's domain (0: none) | the holder          |
//! | `owner_pid`   | holder's pid (display only)                     | the holder                |
//! | `died`        | 1: a holder died, not yet made consistent       | holders / a dying thread  |
//! | `owner_ns`    | holder's pid namespace, when it has no token    | the holder                |
//!
//! * Taking: `CAS(word, 0, tid)` (Acquire), then the record: `owner_token`, `owner_pid`
//!   (Relaxed), `owner_tid` last (Release, pairs with the Acquire load of `owner_tid` in
//!   `holder_dead`), and the lock's address goes into this thread's held list.
//! * Releasing: out of the held list, the record cleared (Relaxed), then `swap(word, 0)`
//!   (Release; pairs with the next taker's Acquire CAS, so the cleared record and everything
//!   written under the lock is visible to it). If the old word had `WAITERS`, one sleeper is
//!   woken (`futex_wake`).
//! * Waiting: a waiter sets `WAITERS` in the word (CAS), then sleeps on the word with that
//!   value expected, so an unlock in between changes the word and the sleep returns at once
//!   (no lost wake-up). A waiter that takes the lock from the slow path sets `WAITERS` itself,
//!   since other sleepers may remain. Sleeps last at most [`DEATH_LOOK`] (10 ms), so a
//!   contended wait costs one wake-up per 10 ms, not CPU.
//! * Owner death, process: after a sleep that timed out on an unchanged word, the waiter looks
//!   at the record. Only a record that agrees with the word (`owner_tid` == the word's thread,
//!   and the word unchanged after reading it) is trusted. A word with no such record (a holder
//!   killed between its CAS and its record, or between clearing its record and freeing the
//!   word; or a stray write) is judged by its thread id alone where that id means one thread
//!   to every possible holder: on Windows (machine-wide ids), and for a domain's mutexes (heap
//!   locks, `Mutex<T>`; not the registry's own lock, which processes take before they are
//!   registered) when every possible holder is in the waiter's pid namespace
//!   ([`Liveness::threads_visible`]: every live registration recorded that namespace, and the
//!   registry lock, under which an unattached `gc` takes the domain's locks, is free or held
//!   there without a token). A thread id with no live thread there (`os::thread_alive`) is
//!   then a dead holder, taken over as below. Anywhere else it is not taken over (bounded
//!   waits report it as `Corrupt`, and `gc --force` breaks it). Not covered, so kept out of
//!   the rule by nothing but rarity: a process of another namespace that keeps using a
//!   domain's memory after it left the registry at exit (`Domain::detach_at_exit`), or a
//!   forked child whose registration failed at the fork, caught between its CAS and its
//!   record. A trusted
//!   record whose token is no longer alive in the registry (the OFD lock on its byte,
//!   dropped by the kernel when the process dies) is a dead holder: the waiter takes the lock with `CAS(word, seen, tid |
//!   WAITERS)` (only one waiter can win), sets `died` and is told [`LockOutcome::OwnerDied`].
//!   A `kill -9` is seen within one sleep, about 10 ms. `try_lock_or_take_over` does the same
//!   in one look. A holder without a token (a process registering in the registry, a tool
//!   that has not attached, a lock outside any domain) records `owner_ns`, its pid namespace
//!   when its `/proc` is that namespace's (else 0); a waiter of the same namespace judges it
//!   by `/proc/<tid>` (gone, or a zombie: dead). Thread ids mean nothing across namespaces, so
//!   with `owner_ns` 0 or different, only a token decides.
//! * Owner death, thread: each thread keeps a list of the locks it holds (a thread-local;
//!   [`MAX_HELD`] inline, any more in a vector). Its destructor, run when the thread exits,
//!   releases every listed lock the word still says this thread holds, with `died = 1` set
//!   first, and wakes a sleeper. A forked child inherits the list but not the locks: the word
//!   names the parent's thread, so the child's destructor (and `unlock`) leaves them alone.
//! * `died` is sticky: every taker is told `OwnerDied` until a holder calls
//!   [`RobustLock::make_consistent`] (so a repairer that dies mid-repair makes the next one
//!   repair again). It is written only while holding the lock (Relaxed; the word orders it).
//!
//! Why not the kernel's robust list: the kernel keeps one robust-list head per thread
//! (`set_robust_list(2)`), and glibc owns it (registered at thread start, entries linked
//! through glibc's own mutex layout and its `list_op_pending`). Registering our own head would
//! silently disable glibc's robust mutexes in the process; linking our words into glibc's list
//! would make our layout follow glibc's private one and race its `list_op_pending` protocol.
//! Neither is "without disturbing glibc's list", so death is found by the liveness token.
//!
//! Memory holding a lock that a thread holds must stay mapped until that thread releases it
//! or exits (its exit releases it, writing to it). Safe code can break this: a guard leaked
//! with `mem::forget` holds the lock and borrows nothing, so the section can be unmapped before
//! the thread exits. So the exit releases its locks only if nothing of this process's section
//! memory was unmapped since the oldest of them was taken (the unmap epoch, recorded when the
//! thread's list goes from empty to one lock), under the mapping lock of the domain whose
//! window holds each ([`crate::domain::if_still_mapped`]); otherwise it leaves them held (the
//! memory may be gone; a lock in a section that is still mapped elsewhere is then taken over
//! when this process dies).

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::os;

/// The lock word's operations: std's atomic and the kernel futex in every build, loom's atomic
/// and the model futex (`shim.rs`) in loom models, so the models check this very code.
pub trait Word32: Sync {
    fn load(&self, o: Ordering) -> u32;
    fn store(&self, v: u32, o: Ordering);
    fn cas(&self, cur: u32, new: u32, ok: Ordering, fail: Ordering) -> Result<u32, u32>;
    fn swap(&self, v: u32, o: Ordering) -> u32;
    fn wait(&self, expected: u32, timeout: Option<Duration>) -> std::io::Result<os::FutexWait>;
    fn wake(&self, n: u32);
}

/// The record's 64-bit words.
pub trait Word64: Sync {
    fn load(&self, o: Ordering) -> u64;
    fn store(&self, v: u64, o: Ordering);
}

macro_rules! words {
    ($u32:ty, $u64:ty, $wait:path, $wake:path) => {
        impl Word32 for $u32 {
            #[inline]
            fn load(&self, o: Ordering) -> u32 {
                <$u32>::load(self, o)
            }
            #[inline]
            fn store(&self, v: u32, o: Ordering) {
                <$u32>::store(self, v, o)
            }
            #[inline]
            fn cas(&self, cur: u32, new: u32, ok: Ordering, fail: Ordering) -> Result<u32, u32> {
                <$u32>::compare_exchange(self, cur, new, ok, fail)
            }
            #[inline]
            fn swap(&self, v: u32, o: Ordering) -> u32 {
                <$u32>::swap(self, v, o)
            }
            fn wait(&self, expected: u32, timeout: Option<Duration>) -> std::io::Result<os::FutexWait> {
                $wait(self, expected, timeout)
            }
            fn wake(&self, n: u32) {
                $wake(self, n);
            }
        }
        impl Word64 for $u64 {
            #[inline]
            fn load(&self, o: Ordering) -> u64 {
                <$u64>::load(self, o)
            }
            #[inline]
            fn store(&self, v: u64, o: Ordering) {
                <$u64>::store(self, v, o)
            }
        }
    };
}

words!(std::sync::atomic::AtomicU32, std::sync::atomic::AtomicU64, os::futex_wait, os::futex_wake);
#[cfg(loom)]
words!(loom::sync::atomic::AtomicU32, loom::sync::atomic::AtomicU64, super::shim::futex_wait, super::shim::futex_wake);

/// What a waiter may ask about the holder of a lock (see "Owner death, process").
pub trait Liveness {
    /// Whether the process registration `token` is alive (`None`: cannot tell).
    fn token_alive(&self, token: u64) -> Option<bool>;

    /// Whether every thread that may hold the lock is a thread of this process's pid namespace,
    /// whose `/proc` we read: then a lock word naming no live thread there names a dead holder,
    /// even one that died before writing its record. Only asked on a slow path (a holder not
    /// proven alive after a sleep). Default: cannot tell.
    fn threads_visible(&self) -> bool {
        false
    }
}

/// A closure answers for tokens only.
impl<F: Fn(u64) -> Option<bool>> Liveness for F {
    fn token_alive(&self, token: u64) -> Option<bool> {
        self(token)
    }
}

/// A holder's thread id occupies the low 30 bits of the word.
pub(crate) const TID_MASK: u32 = 0x3fff_ffff;
/// Someone may be asleep on the word.
const WAITERS: u32 = 0x8000_0000;
/// The longest a waiter sleeps before looking at whether the holder is alive.
pub(crate) const DEATH_LOOK: Duration = Duration::from_millis(10);
/// How many locks a thread's held list records.
pub(crate) const MAX_HELD: usize = 16;

/// A lock's holder as its record names it ([`RobustLockOf::holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    Free,
    /// The record agrees with the word: the holder's token (0: none) and, without a token,
    /// its pid namespace (0: unknown).
    Recorded {
        token: u64,
        ns: u64,
    },
    /// Held, with no record that agrees with the word (a holder mid-way, or dead there).
    Unrecorded,
}

/// How a lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// Acquired normally.
    Acquired,
    /// Acquired, but a previous holder died while holding it and nobody has called
    /// `make_consistent` since.
    OwnerDied,
}

/// The lock word and the owner record (64 bytes, 16-aligned like the mutex it replaced, so
/// the layouts around it keep their offsets; see the module docs). All-zero is a free,
/// consistent lock.
#[repr(C, align(16))]
pub struct RobustLockOf<A: Word32, B: Word64> {
    word: A,
    owner_tid: A,
    owner_token: B,
    owner_pid: A,
    died: A,
    owner_ns: B,
    _reserved: [B; 4],
}

/// The lock in a loom model: the same code on loom's atomics.
#[cfg(loom)]
pub type ModelRobustLock = RobustLockOf<loom::sync::atomic::AtomicU32, loom::sync::atomic::AtomicU64>;

#[cfg(loom)]
impl ModelRobustLock {
    /// A free lock outside shared memory, for loom models.
    pub fn new_model() -> Self {
        use loom::sync::atomic::{AtomicU32, AtomicU64};
        RobustLockOf {
            word: AtomicU32::new(0),
            owner_tid: AtomicU32::new(0),
            owner_token: AtomicU64::new(0),
            owner_pid: AtomicU32::new(0),
            died: AtomicU32::new(0),
            owner_ns: AtomicU64::new(0),
            _reserved: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The lock as it lives in shared memory.
pub type RobustLock = RobustLockOf<std::sync::atomic::AtomicU32, std::sync::atomic::AtomicU64>;

const _: () = assert!(size_of::<RobustLock>() == 64 && align_of::<RobustLock>() == 16);
const _: () = assert!(std::mem::offset_of!(RobustLock, word) == 0);
const _: () = assert!(std::mem::offset_of!(RobustLock, owner_token) == 8);
const _: () = assert!(std::mem::offset_of!(RobustLock, owner_ns) == 24);

/// This process's pid namespace for holders without a token (`os::proc_pid_namespace`, 0:
/// unknown), cached with the pid it was computed for (a forked child computes its own).
#[cfg(not(loom))]
pub(crate) fn my_namespace() -> u64 {
    static CACHE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let pid = os::current_pid();
    // Relaxed: a per-process cache of a constant; a race computes it twice.
    let c = CACHE.load(Ordering::Relaxed);
    if c >> 32 == pid as u64 && c != 0 {
        return c & 0xffff_ffff;
    }
    let ns = os::proc_pid_namespace() & 0xffff_ffff;
    CACHE.store((pid as u64) << 32 | ns, Ordering::Relaxed);
    ns
}

#[cfg(loom)]
pub(crate) fn my_namespace() -> u64 {
    0
}

/// This thread's id (cached, refreshed after a fork) and the locks it holds: the first
/// [`MAX_HELD`] in `held`, any more in `more` (allocated only then).
/// `repr(C)`: what a lock and an unlock touch (ids, length, epoch, the first entries) shares
/// one cache line.
#[cfg_attr(loom, allow(dead_code))]
#[repr(C)]
struct ThreadLocks {
    tid: Cell<u32>,
    pid: Cell<u32>,
    len: Cell<usize>,
    /// The unmap epoch when the list last went from empty to one lock (see the module docs).
    epoch: Cell<u64>,
    held: [Cell<usize>; MAX_HELD],
    more: std::cell::RefCell<Vec<usize>>,
}

impl Drop for ThreadLocks {
    fn drop(&mut self) {
        // The real thread id, not the cache: a forked child's cache may still name its parent.
        let me = os::current_tid();
        let since = self.epoch.get();
        for i in 0..self.len.get() {
            abandon_at(self.held[i].get(), since, me);
        }
        self.len.set(0);
        for addr in self.more.take() {
            abandon_at(addr, since, me);
        }
    }
}

thread_local! {
    static LOCKS: ThreadLocks = const {
        ThreadLocks {
            tid: Cell::new(0),
            pid: Cell::new(0),
            len: Cell::new(0),
            epoch: Cell::new(0),
            held: [const { Cell::new(0) }; MAX_HELD],
            more: std::cell::RefCell::new(Vec::new()),
        }
    };
}

#[cfg_attr(loom, allow(dead_code))]
impl ThreadLocks {
    #[inline]
    fn tid(&self) -> u32 {
        let pid = os::current_pid();
        if self.pid.get() != pid {
            self.tid.set(os::current_tid() & TID_MASK);
            self.pid.set(pid);
        }
        self.tid.get()
    }
}

/// Releases, at thread exit, the lock at `addr` that this thread still holds (thread `me`),
/// if its memory is still mapped (module docs); `since`: the unmap epoch when it was taken or
/// earlier.
#[cfg(not(loom))]
fn abandon_at(addr: usize, since: u64, me: u32) {
    crate::domain::if_still_mapped(addr, since, || {
        // SAFETY: listed by `remember` while this thread held the lock at `addr` and not yet
        // removed by `forget`, so the lock is still held by this thread (or, in a forked
        // child, by the parent, which `abandon` checks); nothing was unmapped since it was
        // taken, and nothing can be while this runs (`if_still_mapped`), so it is mapped.
        unsafe { &*(addr as *const RobustLock) }.abandon(me)
    });
}

/// Under loom no list is kept (see `remember`), so this never runs; as before the epoch.
#[cfg(loom)]
fn abandon_at(addr: usize, _since: u64, me: u32) {
    // SAFETY: as in the other build's `abandon_at`, less the mapping check (no sections here).
    unsafe { &*(addr as *const RobustLock) }.abandon(me)
}

#[cfg(not(loom))]
#[inline]
fn unmap_epoch() -> u64 {
    // Relaxed: compared for equality at this thread's exit (see `if_still_mapped`).
    crate::domain::UNMAP_EPOCH.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(loom)]
fn unmap_epoch() -> u64 {
    0
}

/// This thread's id, for the lock word.
#[cfg(not(loom))]
#[inline]
fn my_tid() -> u32 {
    // Past this thread's destructor (another thread-local's destructor locking), ask the OS.
    LOCKS.try_with(|t| t.tid()).unwrap_or_else(|_| os::current_tid() & TID_MASK)
}

/// Under loom every model thread runs on one OS thread: number them instead.
#[cfg(loom)]
fn my_tid() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    loom::thread_local! {
        static TID: u32 = NEXT.fetch_add(1, Ordering::Relaxed) & TID_MASK;
    }
    TID.with(|t| *t)
}

impl<A: Word32, B: Word64> RobustLockOf<A, B> {
    /// Initialises (or re-initialises) the lock: free, consistent, no holder.
    ///
    /// # Safety
    /// No thread of any process may hold the lock or be inside a call on it, other than a
    /// waiter that will find the word changed.
    pub unsafe fn init(&self) -> std::io::Result<()> {
        // Relaxed: published by whatever publishes the lock (an object header's READY, the
        // registry's ready word), or, for a break, by the word's next CAS.
        self.owner_tid.store(0, Ordering::Relaxed);
        self.owner_token.store(0, Ordering::Relaxed);
        self.owner_pid.store(0, Ordering::Relaxed);
        self.died.store(0, Ordering::Relaxed);
        self.owner_ns.store(0, Ordering::Relaxed);
        // Release: a waiter that sees 0 sees the cleared record.
        self.word.store(0, Ordering::Release);
        self.word.wake(u32::MAX);
        Ok(())
    }

    /// The lock word (for diagnosis).
    pub fn word(&self) -> u32 {
        // Relaxed: a snapshot.
        self.word.load(Ordering::Relaxed)
    }

    /// The thread a lock word names (0: none).
    pub fn owner_tid(word: u32) -> u32 {
        word & TID_MASK
    }

    /// Who holds the lock, by its record (a snapshot, for a waiter's judgement of another
    /// lock's holders: see `Registry::threads_visible`).
    pub(crate) fn holder(&self) -> Holder {
        // Relaxed: a snapshot; the re-read below excludes a record of another holder.
        let word = self.word.load(Ordering::Relaxed);
        let tid = word & TID_MASK;
        if tid == 0 {
            return if word == 0 { Holder::Free } else { Holder::Unrecorded };
        }
        // Acquire: as in `holder_dead`.
        if self.owner_tid.load(Ordering::Acquire) != tid {
            return Holder::Unrecorded;
        }
        // Relaxed: ordered by the Acquire above.
        let (token, ns) = (self.owner_token.load(Ordering::Relaxed), self.owner_ns.load(Ordering::Relaxed));
        // Relaxed: as in `holder_dead`.
        if self.word.load(Ordering::Relaxed) != word {
            return Holder::Unrecorded;
        }
        Holder::Recorded { token, ns }
    }

    /// Takes the lock if free, recording `token` (the caller's process token in the lock's
    /// domain, 0 if none) as the holder's; `Ok(None)` if held.
    #[inline]
    pub fn try_lock(&self, token: u64) -> std::io::Result<Option<LockOutcome>> {
        let me = my_tid();
        if token == 0 {
            // A holder without a token is judged by its thread in its pid namespace, which
            // `acquired` records: learn it (system calls, once per process) before the CAS, so
            // a holder killed between taking the word and writing its record is a window of a
            // few stores, not of the `/proc` reads. Every other locking path starts here.
            let _ = my_namespace();
        }
        // Acquire: pairs with the Release swap in `release`.
        if self.word.cas(0, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Ok(None);
        }
        Ok(Some(self.acquired(me, token)))
    }

    /// [`try_lock`](Self::try_lock), and if the lock is held by a holder proven dead (one
    /// look, see the module docs), takes it over: `OwnerDied`. `Ok(None)`: held by a holder
    /// that may be alive.
    pub fn try_lock_or_take_over(&self, token: u64, alive: &dyn Liveness) -> std::io::Result<Option<LockOutcome>> {
        if let Some(o) = self.try_lock(token)? {
            return Ok(Some(o));
        }
        // Relaxed: a guess; `holder_dead` re-reads it and the CAS decides.
        let w = self.word.load(Ordering::Relaxed);
        let me = my_tid();
        if w != 0
            && self.holder_dead(w, alive)
            // Acquire: as in `lock_looking`. Keep `WAITERS`: sleepers may remain.
            && self.word.cas(w, me | (w & WAITERS), Ordering::Acquire, Ordering::Relaxed).is_ok()
        {
            // Relaxed: we hold the lock; the word orders it for the next holder.
            self.died.store(1, Ordering::Relaxed);
            return Ok(Some(self.acquired(me, token)));
        }
        Ok(None)
    }

    #[inline]
    fn acquired(&self, me: u32, token: u64) -> LockOutcome {
        // Relaxed: published by the Release store of `owner_tid` just below.
        self.owner_token.store(token, Ordering::Relaxed);
        if token == 0 {
            // Relaxed: as above. Only a holder without a token is judged by its thread.
            self.owner_ns.store(my_namespace(), Ordering::Relaxed);
        }
        self.owner_pid.store(os::current_pid(), Ordering::Relaxed);
        // Release: pairs with the Acquire load in `holder_dead`.
        self.owner_tid.store(me, Ordering::Release);
        self.remember();
        // Relaxed: written only under the lock, which our Acquire CAS ordered.
        if self.died.load(Ordering::Relaxed) != 0 { LockOutcome::OwnerDied } else { LockOutcome::Acquired }
    }

    #[inline]
    fn remember(&self) {
        // Under loom: no list (model threads share one OS thread); death is modelled
        // through `alive`.
        if cfg!(loom) {
            return;
        }
        let addr = self as *const Self as usize;
        let _ = LOCKS.try_with(|t| {
            let n = t.len.get();
            // `more` is empty whenever `held` is not full (see `forget`).
            if n == 0 {
                t.epoch.set(unmap_epoch());
            }
            if n < MAX_HELD {
                t.held[n].set(addr);
                t.len.set(n + 1);
            } else {
                Self::remember_more(t, addr);
            }
        });
    }

    #[cold]
    fn remember_more(t: &ThreadLocks, addr: usize) {
        t.more.borrow_mut().push(addr);
    }

    #[inline]
    fn forget(&self) {
        if cfg!(loom) {
            return;
        }
        let addr = self as *const Self as usize;
        let _ = LOCKS.try_with(|t| {
            let n = t.len.get();
            // Usually the last one taken.
            let mut i = n;
            while i > 0 {
                i -= 1;
                if t.held[i].get() == addr {
                    t.held[i].set(t.held[n - 1].get());
                    t.len.set(n - 1);
                    if n == MAX_HELD {
                        Self::refill_from_more(t);
                    }
                    return;
                }
            }
            Self::forget_more(t, addr);
        });
    }

    /// Keeps `more` empty while `held` is not full: moves one of `more`'s locks into the slot
    /// just freed (`remember` relies on it).
    #[cold]
    fn refill_from_more(t: &ThreadLocks) {
        if let Some(addr) = t.more.borrow_mut().pop() {
            t.held[MAX_HELD - 1].set(addr);
            t.len.set(MAX_HELD);
        }
    }

    #[cold]
    fn forget_more(t: &ThreadLocks, addr: usize) {
        let mut more = t.more.borrow_mut();
        if let Some(i) = more.iter().rposition(|&a| a == addr) {
            more.swap_remove(i);
        }
    }

    /// Takes the lock, sleeping until `timeout` (`None`: for ever); `Ok(None)` on timeout. A
    /// holder found dead (see the module docs; `alive` answers whether a process token is
    /// alive, `None` when it cannot tell) is taken over with [`LockOutcome::OwnerDied`].
    pub fn lock_timeout(
        &self,
        token: u64,
        timeout: Option<Duration>,
        alive: &dyn Liveness,
    ) -> std::io::Result<Option<LockOutcome>> {
        self.lock_looking(token, timeout, Some(DEATH_LOOK), alive)
    }

    /// [`lock_timeout`](Self::lock_timeout), sleeping at most `look` between looks at the
    /// holder (`None`: until woken, only for the loom model of wake-ups, where a lost wake-up
    /// must show up as a deadlock).
    pub fn lock_looking(
        &self,
        token: u64,
        timeout: Option<Duration>,
        look: Option<Duration>,
        alive: &dyn Liveness,
    ) -> std::io::Result<Option<LockOutcome>> {
        if let Some(o) = self.try_lock(token)? {
            return Ok(Some(o));
        }
        let deadline = super::deadline(timeout);
        let me = my_tid();
        loop {
            // Relaxed: only a guess for the CAS, which orders.
            let w = self.word.load(Ordering::Relaxed);
            if w == 0 {
                // Acquire: as in `try_lock`. WAITERS: other sleepers may remain.
                if self.word.cas(0, me | WAITERS, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return Ok(Some(self.acquired(me, token)));
                }
                continue;
            }
            let expect = w | WAITERS;
            // Relaxed: the word's value is all that matters; the sleep re-checks it.
            if w != expect && self.word.cas(w, expect, Ordering::Relaxed, Ordering::Relaxed).is_err() {
                continue;
            }
            let left = super::remaining(deadline);
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            let slice = match (left, look) {
                (Some(l), Some(k)) => Some(l.min(k)),
                (l, k) => l.or(k),
            };
            if self.word.wait(expect, slice)? == os::FutexWait::TimedOut
                && self.holder_dead(expect, alive)
                // Acquire: the dead holder's writes (whatever it got done) become visible.
                && self.word.cas(expect, me | WAITERS, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                // Relaxed: we hold the lock; the word orders it for the next holder.
                self.died.store(1, Ordering::Relaxed);
                return Ok(Some(self.acquired(me, token)));
            }
        }
    }

    /// Whether the holder named by `word` is proven dead (see the module docs).
    #[cold]
    fn holder_dead(&self, word: u32, alive: &dyn Liveness) -> bool {
        let tid = word & TID_MASK;
        if tid == 0 {
            return false;
        }
        // Acquire: pairs with the Release store in `acquired`, so the token read below is
        // the one this holder recorded (or a later holder's, which the re-read of
        // the word excludes).
        if self.owner_tid.load(Ordering::Acquire) != tid {
            // No record agrees with the word: its holder is between its CAS and `acquired`, or
            // between clearing the record and freeing the word in `release` (a few
            // instructions each), or it died there (a process killed at that moment). Where
            // thread ids are machine-wide (Windows), a thread that no longer exists is dead,
            // whoever it was; elsewhere only when every thread that may hold this lock is one
            // of our pid namespace's (`Liveness::threads_visible`). Otherwise a thread id alone
            // proves nothing (it may be another namespace's), and the lock waits for
            // `gc --force`.
            // The cheap question first: a live holder (the usual case) ends it.
            // Relaxed: the takeover CAS re-checks the word.
            if cfg!(loom)
                || self.word.load(Ordering::Relaxed) != word
                || os::thread_alive(tid)
                || !(os::THREAD_IDS_MACHINE_WIDE || alive.threads_visible())
            {
                return false;
            }
            // A holder that wrote its record meanwhile is judged by it at the next look (a
            // thread proven gone cannot write one; this guards the proof's own blind spots).
            // Acquire: as above.
            return self.owner_tid.load(Ordering::Acquire) != tid;
        }
        // Relaxed: ordered by the Acquire above.
        let token = self.owner_token.load(Ordering::Relaxed);
        let ns = self.owner_ns.load(Ordering::Relaxed);
        // Relaxed: the record read above belongs to this word's holder only if the word has
        // not changed meanwhile (the CAS that takes over re-checks it too).
        if self.word.load(Ordering::Relaxed) != word {
            return false;
        }
        if token != 0 {
            return alive.token_alive(token) == Some(false);
        }
        // A holder without a token (a process registering, a tool that has not attached, a
        // lock outside any domain): judged by its thread, only when it recorded the pid
        // namespace whose `/proc` we both see (thread ids repeat across namespaces, and a
        // namespace may see another's `/proc`). A thread of this process that exits is seen by
        // its own destructor.
        !cfg!(loom) && ns != 0 && ns == my_namespace() && !os::thread_alive(tid)
    }

    /// Releases the lock.
    ///
    /// # Safety
    /// The calling thread must hold the lock.
    #[inline]
    pub unsafe fn unlock(&self) {
        self.forget();
        // Relaxed: our own CAS wrote it. A word naming another thread means a forked child
        // dropping its copy of its parent's guard: the parent's lock is not the child's to
        // release (as a glibc robust mutex refused it with EPERM).
        if self.word.load(Ordering::Relaxed) & TID_MASK != my_tid() {
            return;
        }
        self.release();
    }

    #[inline]
    fn release(&self) {
        // Relaxed: published by the Release swap below.
        self.owner_tid.store(0, Ordering::Relaxed);
        self.owner_token.store(0, Ordering::Relaxed);
        self.owner_pid.store(0, Ordering::Relaxed);
        self.owner_ns.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire CAS of the next taker.
        if self.word.swap(0, Ordering::Release) & WAITERS != 0 {
            self.word.wake(1);
        }
    }

    /// A thread exiting with the lock listed as held: release it as a dead holder would be
    /// taken over, if the word says thread `me` holds it.
    fn abandon(&self, me: u32) {
        // Relaxed: our own earlier CAS wrote it if we hold it.
        if self.word.load(Ordering::Relaxed) & TID_MASK != me & TID_MASK {
            return;
        }
        // Relaxed: we hold the lock; the Release swap in `release` publishes it.
        self.died.store(1, Ordering::Relaxed);
        self.release();
    }

    /// Declares the protected data repaired after [`LockOutcome::OwnerDied`].
    ///
    /// # Safety
    /// The calling thread must hold the lock.
    pub unsafe fn make_consistent(&self) -> std::io::Result<()> {
        // Relaxed: written under the lock.
        self.died.store(0, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// This thread's held list, in no particular order, and whether `more` is in use.
    fn listed() -> (Vec<usize>, usize) {
        LOCKS.with(|t| {
            let mut v: Vec<usize> = (0..t.len.get()).map(|i| t.held[i].get()).collect();
            let more = t.more.borrow().len();
            v.extend(t.more.borrow().iter().copied());
            v.sort_unstable();
            (v, more)
        })
    }

    #[test]
    fn the_held_list_names_exactly_the_locks_held_and_spills_only_when_full() {
        // SAFETY: a lock is atomics only; all zero is a free, consistent lock.
        let locks: Vec<RobustLock> = (0..3 * MAX_HELD).map(|_| unsafe { std::mem::zeroed() }).collect();
        std::thread::spawn(move || {
            for l in &locks {
                assert!(l.try_lock(0).unwrap().is_some());
            }
            assert_eq!(listed().1, 2 * MAX_HELD, "past MAX_HELD the list spills");
            // Unlock the first ones taken (in `held`): each frees a slot that `more` refills.
            let mut held: Vec<usize> = locks.iter().map(|l| l as *const RobustLock as usize).collect();
            for l in &locks[..2 * MAX_HELD + 3] {
                // SAFETY: this thread holds it.
                unsafe { l.unlock() };
                held.retain(|&a| a != l as *const RobustLock as usize);
                let (now, more) = listed();
                assert_eq!(now, held, "the list is the locks still held");
                assert!(more == 0 || now.len() > MAX_HELD, "`more` is used only while `held` is full");
            }
            for l in &locks[2 * MAX_HELD + 3..] {
                // SAFETY: as above.
                unsafe { l.unlock() };
            }
            assert_eq!(listed(), (Vec::new(), 0));
        })
        .join()
        .unwrap();
    }
}
