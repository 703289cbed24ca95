//! Handles to objects without a lock: this process's table from addresses to open objects.
//!
//! Every hot entry point (`shm_alloc`, `shm_free`, `shm_realloc`, `shm_q_write`, `shm_q_read`,
//! `shm_sem_wait`, `shm_sem_post`) starts from an address: a handle is a section's address, a
//! block or a semaphore lies inside one. Sections start on a [`CHUNK`] boundary (2 MiB), so
//! the table is indexed by `address / CHUNK`: a first level of [`TOP`] pointers to leaves of
//! [`LEAF`] slots, each slot pointing to the [`Entry`] of the section covering that chunk (a
//! section spanning several chunks has its entry in each). Leaves are allocated on first use
//! and never freed; lookups are two loads, no lock, no hashing.
//!
//! # Protocol
//! * **Writers** (inserting an entry when a handle is first used in this process, retiring it
//!   on `shm_delete_section`, `shm_exit` or the objects heap's deletion) hold the library's
//!   state lock. An insert fills the entry's slots (Release); a retire empties them, marks the
//!   entry `retired` and moves it to the retired list. A retired entry is freed (which may
//!   unmap its section) only once no reader protects it.
//! * **Readers** protect the entry they use with their thread's hazard record, a word in
//!   [`RECORDS`] that only they write: load the slot, store the pointer to the record, fence,
//!   load the slot again; if it still holds the pointer, the entry cannot be freed until the
//!   record is cleared. A reader without a record (more than [`RECORDS`] threads, or a thread
//!   whose thread-locals are being destroyed) takes the slow path under the state lock.
//! * **Reclaiming** scans the records after a fence: an entry no record points to is freed.
//!   It runs after every retire, and after a reader leaves an entry it saw retired.
//! * **Fences.** The reader's store of its record and the writer's emptying of the slot are
//!   each followed by a load of the other's word (a store-load pattern): a full fence is needed
//!   on both sides, or both could miss each other. The reader's side runs on every call, the
//!   writer's a few times in a program's life, so the reader uses only a compiler fence and
//!   the writer makes the kernel run a full barrier on every thread of the process
//!   (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`): either the reader's record store is
//!   visible to the scan, or the reader's second load sees the empty slot. Where membarrier is
//!   unavailable (registration refused), both sides use `fence(SeqCst)`.
//!
//! A handle whose entry was retired finds an empty slot and goes to the slow path, which
//! reports it as unknown (`SHM_ERR_INVALID` / `SHM_ERR_NOT_FOUND`): never a use after unmap.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering, compiler_fence, fence};
use std::sync::{Arc, Mutex};

use shmgadget::CHUNK;
use shmgadget::heap::Heap;

use crate::QueueObj;

/// Slots of a leaf.
const LEAF: usize = 1024;
/// Leaves: enough for every chunk below 2^47 (the x86_64 user address space).
const TOP: usize = (1 << 47) / CHUNK as usize / LEAF;
/// Threads that can hold a hazard record at once.
const RECORDS: usize = 256;
/// Semaphores of one objects heap this process remembers as validated.
const SEMS: usize = 64;
/// A forgotten semaphore's place in `Entry::sems` (0 ends the list).
const SEM_GONE: u64 = u64::MAX;

/// What a handle resolves to.
pub(crate) enum Obj {
    Heap(Arc<Heap>),
    Queue(Arc<QueueObj>),
}

/// One open section of this process, reachable from the table.
pub(crate) struct Entry {
    /// Address of the section.
    pub(crate) base: u64,
    /// Bytes of the window the section spans (whole chunks).
    span: u64,
    pub(crate) obj: Obj,
    /// Set (under the state lock) when the entry leaves the table.
    retired: AtomicBool,
    /// Addresses of semaphores validated in this heap (0: end; `SEM_GONE`: a forgotten one).
    /// Written under the state lock, read by anyone.
    sems: [AtomicU64; SEMS],
}

impl Entry {
    pub(crate) fn new(base: u64, len: u64, obj: Obj) -> Box<Entry> {
        Box::new(Entry {
            base,
            span: len.div_ceil(CHUNK) * CHUNK,
            obj,
            retired: AtomicBool::new(false),
            sems: [const { AtomicU64::new(0) }; SEMS],
        })
    }

    /// Whether `sem` was validated as a semaphore of this heap.
    pub(crate) fn has_sem(&self, sem: u64) -> bool {
        for s in &self.sems {
            // Relaxed: the address only says "validated"; the semaphore's own header (checked
            // by every operation) carries the data's ordering.
            match s.load(Ordering::Relaxed) {
                0 => return false,
                v if v == sem => return true,
                _ => {}
            }
        }
        false
    }

    /// Remembers `sem` as validated (under the state lock). Full list: not remembered (calls
    /// on it then take the slow path).
    pub(crate) fn add_sem(&self, sem: u64) {
        if self.has_sem(sem) {
            return;
        }
        for s in &self.sems {
            // Relaxed: see `has_sem`; writers hold the state lock.
            let v = s.load(Ordering::Relaxed);
            if v == 0 || v == SEM_GONE {
                s.store(sem, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Forgets `sem` (under the state lock).
    pub(crate) fn forget_sem(&self, sem: u64) {
        for s in &self.sems {
            // Relaxed: see `has_sem`.
            if s.load(Ordering::Relaxed) == sem {
                s.store(SEM_GONE, Ordering::Relaxed);
            }
        }
    }
}

type Leaf = [AtomicPtr<Entry>; LEAF];

static TABLE: [AtomicPtr<Leaf>; TOP] = [const { AtomicPtr::new(std::ptr::null_mut()) }; TOP];

/// The slot of the chunk holding `addr`, if its leaf exists (or `make`: is made now).
fn slot(addr: u64, make: bool) -> Option<&'static AtomicPtr<Entry>> {
    let chunk = (addr / CHUNK) as usize;
    let (top, low) = (chunk / LEAF, chunk % LEAF);
    let t = TABLE.get(top)?;
    // Acquire: pairs with the Release CAS that published the leaf.
    let mut leaf = t.load(Ordering::Acquire);
    if leaf.is_null() {
        if !make {
            return None;
        }
        let fresh = Box::into_raw(Box::new([const { AtomicPtr::new(std::ptr::null_mut()) }; LEAF]));
        // Release: publishes the zeroed leaf; Acquire on failure: we then use the winner's.
        match t.compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => leaf = fresh,
            Err(other) => {
                // SAFETY: `fresh` came from Box::into_raw just above and was never shared.
                drop(unsafe { Box::from_raw(fresh) });
                leaf = other;
            }
        }
    }
    // SAFETY: leaves are never freed once published.
    Some(unsafe { &(*leaf)[low] })
}

// ------------------------------------------------------------------ hazard records

#[repr(align(64))]
struct Record {
    owned: AtomicBool,
    /// The thread pointer of the thread that claimed it (0: none); see [`record`].
    tag: AtomicUsize,
    hazard: AtomicPtr<Entry>,
}

static RECORDS_TABLE: [Record; RECORDS] = [const {
    Record { owned: AtomicBool::new(false), tag: AtomicUsize::new(0), hazard: AtomicPtr::new(std::ptr::null_mut()) }
}; RECORDS];

/// This thread's record: 0 not claimed yet, 1 none to be had (use the slow path), else its address.
const UNCLAIMED: usize = 0;
const NO_RECORD: usize = 1;

thread_local! {
    static MINE: Cell<usize> = const { Cell::new(UNCLAIMED) };
    static RELEASE: ReleaseOnExit = const { ReleaseOnExit };
}

/// Gives the thread's record back when the thread exits.
struct ReleaseOnExit;

impl Drop for ReleaseOnExit {
    fn drop(&mut self) {
        let mine = MINE.with(|m| m.replace(NO_RECORD));
        if mine > NO_RECORD {
            // SAFETY: `mine` is the address of one of RECORDS_TABLE's records (set by `record`).
            let r = unsafe { &*(mine as *const Record) };
            // Release: the next thread with our thread pointer starts after this (see `record`).
            r.tag.store(0, Ordering::Release);
            // Release: our last uses of the entry we protected happen before it can be freed.
            r.hazard.store(std::ptr::null_mut(), Ordering::Release);
            // Release: the next owner starts after our last store.
            r.owned.store(false, Ordering::Release);
        }
    }
}

/// This thread's record, or None (then the caller takes the slow path).
///
/// The fast path reads no thread-local: in a shared library a thread-local costs a call to
/// `__tls_get_addr` and std's accessor (about 35 instructions, paid on every entry point). It
/// reads the thread pointer instead (one instruction) and checks the tag of the record at its
/// home index: a record tagged with the caller's thread pointer is the caller's, because no two
/// live threads share a thread pointer, and a thread clears its tag before its exit (before
/// its thread pointer can be reused; thread creation orders that clear before the new
/// thread's load). A record whose owner died without clearing it (a forked child's copies
/// of its parent's other threads' records) belongs to no live thread, so a new thread with
/// the same thread pointer may use it alone: its hazard is empty, or (a parent thread was
/// inside a call at the fork) non-empty, and then the caller takes the slow path.
#[inline(always)]
fn record() -> Option<&'static Record> {
    if let Some(tp) = thread_pointer() {
        let r = &RECORDS_TABLE[home(tp)];
        // Acquire: a matching tag is our own store (the slow path's) or a dead thread's that
        // no live thread clears; what makes a match ours is that live threads' thread pointers
        // differ and a thread clears its tag (Release, above) before its thread pointer can be
        // reused (thread exit and creation order the two).
        if r.tag.load(Ordering::Acquire) == tp {
            return Some(r);
        }
    }
    record_slow()
}

/// Where a thread's record is looked for first.
#[inline(always)]
fn home(tp: usize) -> usize {
    // Thread pointers lie in the threads' stack mappings: drop the page offset, then spread.
    ((tp >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - RECORDS.trailing_zeros())) % RECORDS
}

/// The calling thread's thread pointer (the x86_64 ELF TLS ABI keeps it at `%fs:0`).
#[cfg(all(target_arch = "x86_64", target_pointer_width = "64", target_os = "linux"))]
#[inline(always)]
fn thread_pointer() -> Option<usize> {
    let tp: usize;
    // SAFETY: the x86_64 ELF TLS ABI (glibc and musl) stores the thread control block's own
    // address at %fs:0 of every thread; reading it has no side effect.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags, pure));
    }
    (tp != 0).then_some(tp)
}

#[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64", target_os = "linux")))]
#[inline(always)]
fn thread_pointer() -> Option<usize> {
    None
}

#[cold]
#[inline(never)]
fn record_slow() -> Option<&'static Record> {
    let mine = MINE.with(|m| m.get());
    if mine > NO_RECORD {
        // SAFETY: set below to the address of a record of RECORDS_TABLE, which is static.
        return Some(unsafe { &*(mine as *const Record) });
    }
    if mine == NO_RECORD {
        return None;
    }
    // Register the exit hook first: a thread whose thread-locals are being destroyed gets none.
    if RELEASE.try_with(|_| ()).is_err() {
        MINE.with(|m| m.set(NO_RECORD));
        return None;
    }
    let tp = thread_pointer();
    let start = tp.map_or(0, home);
    for i in 0..RECORDS {
        let r = &RECORDS_TABLE[(start + i) % RECORDS];
        // Acquire: pairs with the Release store of a previous owner leaving.
        if r.owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            MINE.with(|m| m.set(r as *const Record as usize));
            // Relaxed: any thread with this home index reads it, but only one whose thread
            // pointer is `tp` (this thread, while it lives) can find it equal (see `record`).
            r.tag.store(tp.unwrap_or(0), Ordering::Relaxed);
            return Some(r);
        }
    }
    MINE.with(|m| m.set(NO_RECORD));
    None
}

// ------------------------------------------------------------------ fences

/// Whether the writer's heavy barrier is `membarrier` (then readers need only a compiler fence).
static ASYMMETRIC: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers this process for expedited membarrier (once, before any entry is inserted).
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: membarrier(2) with a command and no pointer arguments.
        #[cfg(target_os = "linux")]
        let ok = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) } == 0;
        // Elsewhere (Windows) readers use full fences.
        #[cfg(not(target_os = "linux"))]
        let ok = false;
        // Relaxed: published to readers by the Release stores that insert entries (a reader
        // reads it only after Acquiring an entry from a slot).
        ASYMMETRIC.store(ok, Ordering::Relaxed);
    });
}

#[inline]
fn light_fence() {
    // Relaxed: see `init`.
    if ASYMMETRIC.load(Ordering::Relaxed) {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

fn heavy_fence() {
    fence(Ordering::SeqCst);
    // Relaxed: see `init`.
    #[cfg(target_os = "linux")]
    if ASYMMETRIC.load(Ordering::Relaxed) {
        // SAFETY: membarrier(2) with a command and no pointer arguments.
        let mut rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        if rc != 0 {
            // A forked child is not registered (the registration belongs to the parent's
            // memory): register, then barrier.
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) };
            // SAFETY: as above.
            rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        }
        if rc != 0 {
            // Cannot happen after a successful registration; if it does, give readers time to
            // finish any call that started before the slot was emptied (best effort).
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    fence(Ordering::SeqCst);
}

// ------------------------------------------------------------------ readers

/// Clears the record when the call ends (also if it unwinds), and reclaims the entry if it was
/// retired meanwhile.
struct Protected {
    record: &'static Record,
    entry: &'static Entry,
}

impl Drop for Protected {
    fn drop(&mut self) {
        // Relaxed: read while still protected; a retire we miss is reclaimed by its retirer or
        // the next reclaim (only a delay, never a use after free).
        let retired = self.entry.retired.load(Ordering::Relaxed);
        // Release: our uses of the entry happen before a reclaimer that sees the cleared record
        // frees it (its scan runs after a full fence).
        self.record.hazard.store(std::ptr::null_mut(), Ordering::Release);
        if retired {
            reclaim();
        }
    }
}

/// Runs `f` on the entry covering `addr`, protected for the call; None if there is none (or
/// this thread has no hazard record): then the caller takes the slow path.
#[inline]
pub(crate) fn with<T>(addr: u64, f: impl FnOnce(&Entry) -> T) -> Option<T> {
    let record = record()?;
    // Relaxed: only this thread writes its record. A nested call (none exists today) would
    // take the slow path rather than overwrite the outer protection.
    if !record.hazard.load(Ordering::Relaxed).is_null() {
        return None;
    }
    let slot = slot(addr, false)?;
    loop {
        // Acquire: pairs with the Release store in `insert` (the entry's contents).
        let p = slot.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // Relaxed + fence: see "Fences" in the module docs.
        record.hazard.store(p, Ordering::Relaxed);
        light_fence();
        // Acquire: as above.
        if slot.load(Ordering::Acquire) != p {
            record.hazard.store(std::ptr::null_mut(), Ordering::Relaxed);
            continue;
        }
        // SAFETY: `p` was in the slot after our record named it (fenced), so a reclaimer's
        // scan sees the record and does not free it until we clear the record (in `guard`'s
        // drop); entries are only freed through `reclaim`.
        let entry: &'static Entry = unsafe { &*p };
        let guard = Protected { record, entry };
        let r = f(entry);
        drop(guard);
        return Some(r);
    }
}

// ------------------------------------------------------------------ writers (state lock held)

/// Entries in the table (so `retire_all` finds them).
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// Retired entries not yet freed.
static RETIRED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// How many entries wait in RETIRED (a hint for `reclaim`).
static RETIRED_COUNT: AtomicUsize = AtomicUsize::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts `entry` in the table for every chunk it spans, retiring entries it replaces. Returns
/// it. The caller holds the state lock.
pub(crate) fn insert(entry: Box<Entry>) -> &'static Entry {
    let (base, span) = (entry.base, entry.span);
    for a in (base..base + span).step_by(CHUNK as usize) {
        if let Some(old) = slot(a, false).map(|s| s.load(Ordering::Relaxed)).filter(|p| !p.is_null()) {
            // Stale: a section this process knew here was replaced (deleted by another).
            // SAFETY: entries in the table are live until retired, which only we (state lock) do.
            retire(unsafe { &*old });
        }
    }
    let p = Box::into_raw(entry);
    for a in (base..base + span).step_by(CHUNK as usize) {
        if let Some(s) = slot(a, true) {
            // Release: publishes the entry's contents to readers' Acquire loads.
            s.store(p, Ordering::Release);
        }
    }
    lock(&LIVE).push(p as usize);
    // SAFETY: just leaked; freed only by `reclaim` after a retire.
    unsafe { &*p }
}

/// The entry whose section starts at `base` (state lock held, so it cannot be freed meanwhile).
pub(crate) fn entry_at(base: u64) -> Option<&'static Entry> {
    // Relaxed: writers hold the state lock, as do we.
    let p = slot(base, false)?.load(Ordering::Relaxed);
    // SAFETY: entries in the table are freed only after a retire, which needs the state lock.
    (!p.is_null()).then(|| unsafe { &*p }).filter(|e| e.base == base)
}

/// The entry covering `addr` (state lock held).
pub(crate) fn entry_covering(addr: u64) -> Option<&'static Entry> {
    // Relaxed: as in `entry_at`.
    let p = slot(addr, false)?.load(Ordering::Relaxed);
    // SAFETY: as in `entry_at`.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Takes `entry` out of the table; it is freed once no reader protects it.
pub(crate) fn retire(entry: &Entry) {
    let p = entry as *const Entry as *mut Entry;
    for a in (entry.base..entry.base + entry.span).step_by(CHUNK as usize) {
        if let Some(s) = slot(a, false) {
            // Relaxed: the heavy fence in `reclaim` orders this before the scan.
            let _ = s.compare_exchange(p, std::ptr::null_mut(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }
    // Relaxed: read by protected readers as a hint (see `Protected`).
    entry.retired.store(true, Ordering::Relaxed);
    lock(&LIVE).retain(|&e| e != p as usize);
    lock(&RETIRED).push(p as usize);
    // Relaxed: a hint.
    RETIRED_COUNT.fetch_add(1, Ordering::Relaxed);
    reclaim();
}

/// Retires the entry of the section starting at `base`, if any.
pub(crate) fn retire_at(base: u64) {
    if let Some(e) = entry_at(base) {
        retire(e);
    }
}

/// Retires every entry (`shm_exit`).
pub(crate) fn retire_all() {
    let live: Vec<usize> = lock(&LIVE).clone();
    for p in live {
        // SAFETY: entries in LIVE are in the table, not yet retired (state lock held).
        retire(unsafe { &*(p as *const Entry) });
    }
}

/// Frees every retired entry that no hazard record points to.
pub(crate) fn reclaim() {
    // Relaxed: a hint; a retire always reclaims itself.
    if RETIRED_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let Ok(mut retired) = RETIRED.try_lock() else { return };
    heavy_fence();
    let protected: Vec<usize> = RECORDS_TABLE
        .iter()
        // Acquire: pairs with readers' Release clearing of their record (their uses of the
        // entry happen before we free it).
        .map(|r| r.hazard.load(Ordering::Acquire) as usize)
        .filter(|&p| p != 0)
        .collect();
    let mut free = Vec::new();
    retired.retain(|p| {
        let keep = protected.contains(p);
        if !keep {
            free.push(*p);
        }
        keep
    });
    // Relaxed: a hint.
    RETIRED_COUNT.store(retired.len(), Ordering::Relaxed);
    drop(retired);
    for p in free {
        // SAFETY: `p` came from Box::into_raw in `insert`, left the table (retire), and no
        // record protects it after the fence: no reader holds or can gain a reference.
        drop(unsafe { Box::from_raw(p as *mut Entry) });
    }
}
