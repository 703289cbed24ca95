//! Per-thread block caches: most allocations and frees of small blocks take no lock at all.
//!
//! A heap shared by many processes has one robust lock; taking it for every call costs a
//! lock/unlock pair and, when two processes allocate at once, a cache line bouncing between
//! their cores. So each thread keeps, per heap, a small stock of free blocks of 32 size classes
//! (payloads 16 B to 4 KiB) and serves `alloc`/`free` from it; it takes the heap lock only to
//! refill a class in a batch or to give back half of a full one.
//!
//! # Where the stock lives, and why
//! The stock is *in the heap*, not in process memory, so a process that dies (or a thread that
//! exits) leaves nothing unaccounted for:
//! * The heap header has [`MAX_CACHES`] cache slots; a slot records its owner and the offset
//!   of its store, a block of the heap holding per class a count and up to `DEPTH` block
//!   offsets. A thread claims a slot the first time it uses a heap.
//! * An owner is a process's registration token in the heap's domain (the registry's liveness
//!   lock, see `registry.rs`) plus a thread serial that only means something inside that
//!   process. No pid or tid: they mean nothing across PID namespaces, and are reused.
//! * A parked block is a *used* block for the allocator, with the `CACHED` header flag set; so
//!   freeing it again is reported as a double free, and `check()` stays exact.
//! * Only the owning thread touches its store (plain atomics, no lock). Whoever claims a slot
//!   first reclaims, under the heap lock, every slot whose owner is gone: its process token is
//!   no longer held (another process's), or its thread serial is no longer live (our own
//!   process's; serials are tracked in `THREADS`, released when a thread's caches are dropped).
//!   Every block listed in that store goes back to the allocator. A forked child has a token of
//!   its own, so it never takes its parent's slots (their owner is alive), nor the reverse.
//!
//! # State words
//! | word | value | meaning | written by |
//! |---|---|---|---|
//! | slot `owner` | 0 | free | reclaimer, the owner leaving (under the heap lock) |
//! | slot `owner` | a process token | owned by a thread of that registration | the claimer (under the heap lock) |
//! | slot `thread` | a thread serial | which thread of that process | the claimer (under the heap lock) |
//! | `THREADS[i]` (process-local) | odd / even | serial index `i` in use with that generation / free | the thread taking it / its caches' destructor |
//! | slot `store` | 0 / offset | no store yet / the store block (kept when the slot is freed) | claimer; `trim` |
//! | store `counts[c]` | 0..=16 | entries `[0, n)` of class `c` are parked blocks | the owner only (or a reclaimer once it is dead) |
//! | store `chunk` | 0 / offset | no chunk / the thread's chunk, a parked block | the owner under the heap lock (or a reclaimer) |
//! | block `CACHED` flag | set / clear | parked / the program's (or the allocator's) | the owner, by atomic RMW |
//!
//! # Crash consistency
//! Every block listed below a store's count is free for the program: a push lists the block
//! (entry, then count, Release) before it sets `CACHED`; a pop clears `CACHED` before it lowers
//! the count; a give-back lowers the count before freeing. So a thread killed at any point
//! leaves each block either listed (reclaimed later) or the program's, never both, and nothing
//! handed out twice. Only a refill's batch and a give-back run under the lock.
//! A reclaimer frees an unmarked listed block only when it is its class's top entry (the only
//! one a crash can leave unmarked); any other unmarked entry is damage and stays alone, so a
//! damaged store never frees a block a program holds.
//!
//! # Chunks
//! Blocks next to each other share cache lines: a block's header lies in the line that ends
//! its predecessor, and a free reads the successor's back size. When two processes' blocks
//! alternate, every such line moves between their cores on each alloc and free. So a refill
//! does not take its blocks from the free lists but *carves* them from its thread's chunk: a
//! block of `CHUNK` bytes (128 KiB, or a quarter of the budget if less; none below
//! `MIN_CHUNK`) taken from the free lists when the previous one is used up, parked like a
//! cached block (`CACHED` set: a used block for the allocator, nobody's for the program), its
//! offset in the store's `chunk` word. `Tlsf::carve` splits a block off its end under the heap
//! lock (the new header first, inside the chunk, then the chunk's size: the same crash ordering
//! as a split). A thread's small blocks thus lie together, away from other threads'. Freed
//! blocks go back to the free lists as before (with the give-back of a full class), where
//! any allocation may reuse them; when no free block is large enough for a chunk, refills take
//! their blocks from the free lists as they did without chunks. A chunk is marked before the
//! store lists it and leaves the store before it is freed, so it is never listed unmarked: a
//! reclaimer frees a listed chunk only if it is marked, like any entry but a class's top.
//!
//! # The hot path
//! `alloc` and `free` of a cached class run `alloc_fast` / `free_fast` (called first by
//! `Heap::alloc` and `Heap::free`, which fall back to their full bodies), `LocalCache::pop_fast`
//! / `push_word` and the allocator's `probe_fast` / `mark_word` / `cache_unmark_fast`: the same checks as
//! the full methods (area bounds, tag, size, the next block's back size, `FREE`/`CACHED`, the
//! store's count, the budget), with the bounds computed once and no error text built. Any
//! failed check, and every refill or give-back, falls to the `*_slow` functions, which run the
//! full methods from the start: they decide and describe the error. The fast path changes
//! nothing before its checks pass (a failed mark is undone), so the slow path sees the same
//! state. What remains per pair is inherent to this design: the thread-local lookup, two
//! atomic read-modify-writes of block headers (the lock holder may flip `PREV_FREE` on them
//! concurrently), and the read of the freed block's end (the back-size check).
//!
//! # What is not cached
//! Payloads above 4 KiB, alignments above 16, and calls from a thread whose cache is being
//! torn down go straight to the allocator under the lock. A process holds at most `budget` bytes
//! per thread and heap (1 MiB, or a sixteenth of the heap if less), and its chunk.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::tlsf::{self, Tlsf};
use super::{AREA_OFFSET, HeapShared, Locked, area_limit, map_tlsf};
use crate::error::{Error, ErrorKind, Result};
use crate::os;

/// Cache slots in a heap's header: threads that can cache blocks of one heap at once.
pub(crate) const MAX_CACHES: usize = 64;
/// Size classes cached.
const CLASSES: usize = 32;
/// Blocks a class holds at most.
const DEPTH: usize = 16;
/// Largest payload cached.
pub(crate) const MAX_CACHED: u64 = 4096;
/// Most bytes one thread parks per heap.
const BUDGET: u64 = 1 << 20;
/// Bytes of a thread's chunk (header included), or a quarter of its budget if less; none
/// below `MIN_CHUNK`.
const CHUNK: u64 = 128 << 10;
const MIN_CHUNK: u64 = 16 << 10;

/// One cache slot in the heap header.
#[repr(C)]
pub(crate) struct CacheSlotShared {
    /// The owning process's registration token in the heap's domain, 0 when free. Changed
    /// under the heap lock.
    owner: AtomicU64,
    /// The owning thread's serial in that process (see `THREADS`). Changed under the heap lock.
    thread: AtomicU64,
    /// Payload offset of the slot's [`CacheStoreShared`] block in the block area; 0 when none yet.
    store: AtomicU64,
}

/// A slot's stock, in a block of the heap. Only the owner thread writes it (or, after the
/// owner died, the heap lock holder reclaiming it).
#[repr(C)]
struct CacheStoreShared {
    counts: [AtomicU32; CLASSES],
    entries: [[AtomicU64; DEPTH]; CLASSES],
    /// Payload offset of the thread's chunk (a parked block that refills carve their blocks
    /// from, see "Chunks"); 0 when none.
    chunk: AtomicU64,
    _reserved: AtomicU64,
}

const _: () = assert!(size_of::<CacheStoreShared>() == 4 * CLASSES + 8 * DEPTH * CLASSES + 16);
const _: () = assert!(std::mem::offset_of!(CacheStoreShared, chunk) == 4 * CLASSES + 8 * DEPTH * CLASSES);
/// Bytes of a store (for the heap's layout fingerprint).
pub(crate) const STORE_SIZE: usize = size_of::<CacheStoreShared>();

/// The class serving a request of `size` bytes (1..=MAX_CACHED): the smallest class whose
/// payload is at least `size`. Classes: 16..=256 in steps of 16, then four per power of two.
#[inline]
fn class_for_request(size: u64) -> usize {
    if size <= 256 {
        (size.max(16).div_ceil(16) - 1) as usize
    } else {
        let s = size - 1;
        let log2 = 63 - s.leading_zeros() as u64;
        (16 + (log2 - 8) * 4 + ((s >> (log2 - 2)) & 3)) as usize
    }
}

/// The class a block of `usable` bytes can serve: the largest class whose payload is at most
/// `usable` (None when that is beyond the cached classes).
#[inline]
fn class_for_block(usable: u64) -> Option<usize> {
    let c = if usable < 16 {
        return None;
    } else if usable <= 256 {
        usable / 16 - 1
    } else {
        let log2 = 63 - usable.leading_zeros() as u64;
        16 + (log2 - 8) * 4 + ((usable >> (log2 - 2)) & 3) - 1
    };
    ((c as usize) < CLASSES).then_some(c as usize)
}

/// The payload of class `c` (a table: this runs on every cached alloc and free).
#[inline]
fn class_payload(c: usize) -> u64 {
    CLASS_PAYLOAD[c]
}

/// Class payloads: 16..=256 in steps of 16, then four per power of two up to 4 KiB.
const CLASS_PAYLOAD: [u64; CLASSES] = {
    let mut t = [0u64; CLASSES];
    let mut c = 0;
    while c < CLASSES {
        t[c] = if c < 16 {
            16 * (c as u64 + 1)
        } else {
            let j = (c - 16) as u64;
            (5 + j % 4) << (8 + j / 4 - 2)
        };
        c += 1;
    }
    t
};
const _: () = assert!(CLASS_PAYLOAD[CLASSES - 1] == MAX_CACHED);

const _: () = assert!(size_of::<CacheSlotShared>() == 24);

/// Thread serial indices a process hands out; a thread beyond them caches nothing.
const MAX_THREADS: usize = 4096;

/// Per serial index, the generation of its current holder: odd while a thread holds it, even
/// when free. A serial is `index << 32 | generation`; it is live while `THREADS[index]` still
/// holds its generation. Process-local and lock-free, so the reclaim check takes no lock and a
/// forked child (which keeps the forking thread's serial) needs no repair.
static THREADS: [AtomicU32; MAX_THREADS] = [const { AtomicU32::new(0) }; MAX_THREADS];
static THREAD_HINT: AtomicU32 = AtomicU32::new(0);

fn take_serial() -> u64 {
    // Relaxed: a starting point for the search only.
    let start = THREAD_HINT.fetch_add(1, Ordering::Relaxed) as usize;
    for k in 0..MAX_THREADS {
        let i = (start + k) % MAX_THREADS;
        // Relaxed: a first look; the CAS below decides.
        let g = THREADS[i].load(Ordering::Relaxed);
        // Acquire: pairs with the Release in `give_serial`, after the previous holder's slots
        // were given up.
        if g % 2 == 0 && THREADS[i].compare_exchange(g, g + 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            return (i as u64) << 32 | (g + 1) as u64;
        }
    }
    0
}

fn give_serial(serial: u64) {
    if serial != 0 {
        // Release: pairs with the Acquire load in `serial_alive`; the holder's caches were
        // dropped before.
        THREADS[(serial >> 32) as usize % MAX_THREADS].fetch_add(1, Ordering::Release);
    }
}

fn serial_alive(serial: u64) -> bool {
    let i = (serial >> 32) as usize;
    // Acquire: pairs with the Release in `give_serial`.
    serial != 0 && i < MAX_THREADS && THREADS[i].load(Ordering::Acquire) == serial as u32
}

/// A heap as the cache sees it: its control block and section address.
#[derive(Clone, Copy)]
pub(crate) struct HeapRef<'a> {
    pub(crate) shared: &'a HeapShared,
    pub(crate) section: *mut u8,
    /// The section's mapped length (`u64::MAX` when only its address is known: the header's
    /// `reserved`, checked at open, bounds it then).
    pub(crate) mapped: u64,
    /// The section handle when the caller has one, for the heap's name in errors (looked up
    /// only when an error is made: it is not free).
    pub(crate) handle: Option<&'a crate::Section>,
}

impl<'a> HeapRef<'a> {
    fn lock(&self) -> Result<Locked<'a>> {
        // SAFETY: a HeapRef is built from a live heap handle or a validated ShmAlloc, whose
        // section stays mapped while the caller uses it (the contract of `Locked::acquire`).
        unsafe { Locked::acquire(self.shared, self.section, self.mapped, self.name()) }
    }

    pub(crate) fn name(&self) -> &'a str {
        self.handle.map_or("(heap)", |s| s.name())
    }

    /// The allocator, for the two calls allowed without the lock (`cache_mark`/`cache_unmark`)
    /// and read-only validation of a used block of our own.
    #[inline]
    fn unlocked(&self) -> Tlsf<'a> {
        // SAFETY: as for `Locked::tlsf`: the block area starts AREA_OFFSET into the mapped
        // section. Without the lock we only call `cache_probe`, `cache_mark` and
        // `cache_unmark`, which the allocator documents as safe to run concurrently.
        unsafe {
            Tlsf::new(&self.shared.tlsf, self.section.add(AREA_OFFSET as usize), area_limit(self.shared, self.mapped))
        }
    }
}

/// This thread's cache for one heap.
struct LocalCache {
    section: u64,
    instance: u64,
    /// [`os::fork_generation`] when made: a forked child's copy is someone else's.
    fork_gen: u64,
    /// The owner written into our slot (process token, thread serial).
    owner: (u64, u64),
    epoch: u64,
    /// Index of our slot in the heap header; `store` is null when this thread has no slot
    /// (all taken, or the heap too small for a store): then every call takes the lock.
    slot: usize,
    store: *const CacheStoreShared,
    shared: *const HeapShared,
    /// The heap's mapped length ([`HeapRef::mapped`]).
    mapped: u64,
    bytes: u64,
    budget: u64,
    /// Bytes of a fresh chunk (0: this heap is too small for chunks).
    chunk_size: u64,
}

/// This thread's caches and its serial. The caches drop (giving their stock back and leaving
/// their slots) before the serial is given back, so a slot is never reclaimed while its owner
/// still works on it.
struct Caches {
    serial: u64,
    list: Vec<LocalCache>,
}

impl Drop for Caches {
    fn drop(&mut self) {
        self.list.clear();
        give_serial(self.serial);
    }
}

thread_local! {
    static CACHES: RefCell<Caches> = const { RefCell::new(Caches { serial: 0, list: Vec::new() }) };
}

/// This process's token in the domain holding the heap at `h`, and the attachment (to ask
/// about other tokens).
fn process_ident(h: &HeapRef<'_>) -> Option<(u64, std::sync::Arc<crate::domain::DomainInner>)> {
    let inner = crate::domain::attachment_covering(h.section as usize)?;
    Some((inner.token(), inner))
}

impl LocalCache {
    /// The store, with a lifetime chosen by the caller (it is shared memory, not ours): callers
    /// use it only within one call.
    #[inline]
    fn store<'x>(&self) -> Option<&'x CacheStoreShared> {
        // SAFETY: `store` points at our slot's store block inside the heap, which stays
        // allocated while we own the slot and mapped while the domain is attached (callers
        // come through a live heap; `Drop` pins the section first). CacheStoreShared is
        // atomics only, so shared references are sound.
        (!self.store.is_null()).then(|| unsafe { &*self.store })
    }

    /// Serves a request of class `class` from the stock, refilling it if empty.
    #[inline]
    fn alloc(&mut self, h: &HeapRef<'_>, class: usize, commit: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64> {
        match self.pop_fast(h, class) {
            Some(off) => Ok(off),
            None => self.alloc_slow(h, class, commit),
        }
    }

    /// The common case of [`alloc`](LocalCache::alloc): the class's top block, unmarked and
    /// taken off the list. None when the class is empty, or its count or the block's header
    /// is not as expected (then `alloc_slow` looks again and says what is wrong).
    #[inline]
    fn pop_fast(&mut self, h: &HeapRef<'_>, class: usize) -> Option<u64> {
        let store = self.store()?;
        let count = store.counts.get(class)?;
        // Relaxed: only this thread writes its store.
        let n = count.load(Ordering::Relaxed);
        if n == 0 || n as usize > DEPTH {
            return None;
        }
        // Relaxed: as above.
        let off = store.entries[class][n as usize - 1].load(Ordering::Relaxed);
        if !h.unlocked().cache_unmark_fast(off) {
            return None;
        }
        // Release: the block leaves the list after it is unmarked (see "Crash consistency").
        count.store(n - 1, Ordering::Release);
        self.bytes = self.bytes.saturating_sub(class_payload(class));
        Some(off)
    }

    /// [`alloc`](LocalCache::alloc) when `pop_fast` could not serve: refills an empty class,
    /// or reports a damaged entry.
    #[inline(never)]
    fn alloc_slow(&mut self, h: &HeapRef<'_>, class: usize, commit: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64> {
        let store = self.store().expect("only called with a store");
        // Relaxed: only this thread writes its store.
        let n = store.counts[class].load(Ordering::Relaxed) as usize;
        if n > 0 && n <= DEPTH {
            let off = store.entries[class][n - 1].load(Ordering::Relaxed);
            let unmarked = h.unlocked().cache_unmark(off);
            // Release: the block leaves the list after it is unmarked (see "Crash consistency").
            // A block whose header was trampled leaves the list too, with an error.
            store.counts[class].store(n as u32 - 1, Ordering::Release);
            unmarked.map_err(|e| map_tlsf(e, h.name()))?;
            self.bytes = self.bytes.saturating_sub(class_payload(class));
            return Ok(off);
        }
        if n > DEPTH {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("heap {:?}: a thread cache lists {n} blocks in one class (at most {DEPTH})", h.name()),
            ));
        }
        // Refill: one lock for a batch, carved from our chunk when we can have one; hand out
        // the first block, park the rest.
        let payload = class_payload(class);
        let batch = (16384 / payload).clamp(1, DEPTH as u64 / 2) as usize;
        let locked = h.lock()?;
        let first = match self.carve(h, &locked, store, payload)? {
            Some(off) => off,
            None => locked.alloc(payload, tlsf::ALIGN, h.name(), commit)?,
        };
        for _ in 1..batch {
            let off = match self.carve(h, &locked, store, payload)? {
                Some(off) => off,
                None => match locked.tlsf().alloc(payload, tlsf::ALIGN) {
                    Ok(off) => off,
                    Err(_) => break,
                },
            };
            self.park(h, store, class, off)?;
        }
        Ok(first)
    }

    /// A block of `payload` bytes carved from this thread's chunk (under the lock), taking a
    /// fresh chunk from the free lists when the current one is used up (its remainder goes
    /// back). None when there is no chunk to be had: the heap is too small for chunks, or no
    /// free block is large enough for one (then the caller allocates from the free lists).
    fn carve(
        &mut self,
        h: &HeapRef<'_>,
        locked: &Locked<'_>,
        store: &CacheStoreShared,
        payload: u64,
    ) -> Result<Option<u64>> {
        if self.chunk_size == 0 {
            return Ok(None);
        }
        let t = locked.tlsf();
        // Relaxed: only this thread writes its store.
        let current = store.chunk.load(Ordering::Relaxed);
        if current != 0 {
            let carved = t.carve(current, payload);
            if let Ok(Some(off)) = carved {
                return Ok(Some(off));
            }
            // Used up (or damaged: then it is left alone, and the error says why). It leaves
            // the store before it is freed.
            // Release: see "Crash consistency".
            store.chunk.store(0, Ordering::Release);
            carved.map_err(|e| map_tlsf(e, h.name()))?;
            release_listed(locked, current, false, h.name())?;
        }
        // A fresh chunk is marked parked before the store lists it: a crash in between leaks
        // it (as a refill's unlisted block), never leaves a listed block unmarked.
        let Ok(fresh) = t.alloc(self.chunk_size - tlsf::HEADER, tlsf::ALIGN) else { return Ok(None) };
        t.cache_mark(fresh).map_err(|e| map_tlsf(e, h.name()))?;
        // Release: the block is marked before the store lists it.
        store.chunk.store(fresh, Ordering::Release);
        t.carve(fresh, payload).map_err(|e| map_tlsf(e, h.name()))
    }

    /// Lists block `off` in `class` and marks it parked.
    fn park(&mut self, h: &HeapRef<'_>, store: &CacheStoreShared, class: usize, off: u64) -> Result<()> {
        // Relaxed: only this thread writes its store.
        let n = store.counts[class].load(Ordering::Relaxed) as usize;
        if n >= DEPTH {
            // Only a process writing into our store can make this happen (we give back before
            // a class fills). The block stays the program's: the caller frees or leaks it.
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "heap {:?}: this thread's cache lists {n} blocks in class {class} (at most {}); another process \
                     wrote into it",
                    h.name(),
                    DEPTH - 1
                ),
            ));
        }
        store.entries[class][n].store(off, Ordering::Relaxed);
        // Release: the entry is written before the count covers it.
        store.counts[class].store(n as u32 + 1, Ordering::Release);
        if let Err(e) = h.unlocked().cache_mark(off) {
            // Relaxed: our own store.
            store.counts[class].store(n as u32, Ordering::Release);
            return Err(map_tlsf(e, h.name()));
        }
        self.bytes += class_payload(class);
        Ok(())
    }

    /// Frees block `off` (validated by `cache_probe`, serving `class`) into the stock.
    #[inline]
    fn free(&mut self, h: &HeapRef<'_>, off: u64, class: usize) -> Result<()> {
        if self.push_fast(h, off, class) { Ok(()) } else { self.free_slow(h, off, class) }
    }

    /// The common case of [`free`](LocalCache::free): room in the class and in the budget, and
    /// the block marked parked. False when any of that is not so (nothing changed: `free_slow`
    /// then gives back, or reports the error).
    #[inline]
    fn push_fast(&mut self, h: &HeapRef<'_>, off: u64, class: usize) -> bool {
        let t = h.unlocked();
        let Some((w, _)) = t.probe_fast(off) else { return false };
        self.push_word(w, off, class)
    }

    /// [`push_fast`](LocalCache::push_fast) with the block's header word from
    /// `Tlsf::probe_fast` (the block validated by it, serving `class`).
    #[inline]
    fn push_word(&mut self, w: &std::sync::atomic::AtomicU64, off: u64, class: usize) -> bool {
        let Some(store) = self.store() else { return false };
        let Some(count) = store.counts.get(class) else { return false };
        let payload = class_payload(class);
        // Relaxed: only this thread writes its store.
        let n = count.load(Ordering::Relaxed);
        if n as usize >= DEPTH || self.bytes + payload > self.budget {
            return false;
        }
        // Relaxed: the count below publishes it.
        store.entries[class][n as usize].store(off, Ordering::Relaxed);
        // Release: the entry is written before the count covers it (see "Crash consistency").
        count.store(n + 1, Ordering::Release);
        if !Tlsf::mark_word(w) {
            // Release: as above; the block stays the program's (free_slow reports why).
            count.store(n, Ordering::Release);
            return false;
        }
        self.bytes += payload;
        true
    }

    /// [`free`](LocalCache::free) when `push_fast` could not: gives back a full class or an
    /// over-budget stock, or reports why the block cannot be parked.
    #[inline(never)]
    fn free_slow(&mut self, h: &HeapRef<'_>, off: u64, class: usize) -> Result<()> {
        let store = self.store().expect("only called with a store");
        // Relaxed: only this thread writes its store.
        if store.counts[class].load(Ordering::Relaxed) as usize >= DEPTH {
            self.give_back(h, store, Some(class), DEPTH / 2)?;
        }
        self.park(h, store, class, off)?;
        if self.bytes > self.budget {
            self.give_back(h, store, None, 0)?;
        }
        Ok(())
    }

    /// Returns blocks to the allocator under the lock: down to `keep` in `class`, or in every
    /// class when `class` is None. Each block leaves the list before it is freed.
    fn give_back(
        &mut self,
        h: &HeapRef<'_>,
        store: &CacheStoreShared,
        class: Option<usize>,
        keep: usize,
    ) -> Result<()> {
        let locked = h.lock()?;
        if class.is_none() {
            // Relaxed: our own store.
            let chunk = store.chunk.load(Ordering::Relaxed);
            if chunk != 0 {
                // Release: the chunk leaves the store before it is freed.
                store.chunk.store(0, Ordering::Release);
                release_listed(&locked, chunk, false, h.name())?;
            }
        }
        let classes = class.map_or(0..CLASSES, |c| c..c + 1);
        for c in classes {
            // Relaxed: our own store.
            let mut n = (store.counts[c].load(Ordering::Relaxed) as usize).min(DEPTH);
            while n > keep {
                let off = store.entries[c][n - 1].load(Ordering::Relaxed);
                n -= 1;
                store.counts[c].store(n as u32, Ordering::Release);
                self.bytes = self.bytes.saturating_sub(class_payload(c));
                release_listed(&locked, off, false, h.name())?;
            }
        }
        Ok(())
    }
}

/// Gives a block that was listed in a store back to the allocator (clearing `CACHED`). Only a
/// class's top entry may be listed without being marked (its owner died between listing and
/// marking, or between unmarking and lowering the count: the block is nobody's either way), so
/// `top` says whether an unmarked block is freed; any other unmarked entry is damage (freeing
/// it could free a block a program holds) and is refused.
fn release_listed(locked: &Locked<'_>, off: u64, top: bool, name: &str) -> Result<()> {
    let t = locked.tlsf();
    if t.cache_unmark(off).is_err() && !top {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "heap {name:?}: a thread cache lists the block at offset {off:#x}, which is not parked in a cache; \
                 left alone"
            ),
        ));
    }
    t.free(off).map_err(|e| map_tlsf(e, name))
}

impl Drop for LocalCache {
    fn drop(&mut self) {
        // Thread exit (or a discarded cache): give the stock back, unless this process forked
        // since (the slot is the parent's) or unmapped section memory since (the heap may be
        // gone). In those cases the slot is reclaimed once its owner thread has exited.
        // Relaxed: see `UNMAP_EPOCH` (a quick refusal; the check that counts is below).
        if self.store.is_null()
            || self.fork_gen != os::fork_generation()
            || self.epoch != crate::domain::UNMAP_EPOCH.load(Ordering::Relaxed)
        {
            return;
        }
        // No call into the heap protects us here (the thread is exiting): another thread may
        // be deleting the heap, or dropping its last handle, right now. The pin keeps the
        // section mapped until we are done (an unmapping meanwhile waits for our release).
        let Some(_pin) = crate::domain::pin_section_at(self.section as usize) else { return };
        // Relaxed: the pin took the mapping lock, under which every unmapping of a section
        // bumps the epoch; unchanged, nothing was unmapped here between the cache's making
        // and the pin. (A first touch can still have mapped a later section of the same slot
        // over it in place, lock-free, after another process deleted the heap: see
        // `attachment/mapping.rs`. The instance check below tells.)
        if self.epoch != crate::domain::UNMAP_EPOCH.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: the heap is mapped (the pin, and no unmapping since the cache was made) and
        // `shared` is its control block.
        let shared = unsafe { &*self.shared };
        let h = HeapRef { shared, section: self.section as *mut u8, mapped: self.mapped, handle: None };
        // Relaxed: the instance is written once at creation.
        if shared.instance.load(Ordering::Relaxed) != self.instance {
            return;
        }
        let Some(store) = self.store() else { return };
        if self.give_back(&h, store, None, 0).is_ok() {
            if let Ok(_locked) = h.lock() {
                let s = &shared.caches[self.slot];
                // Relaxed: under the heap lock. Still ours (nobody reclaims a live owner's).
                if s.owner.load(Ordering::Relaxed) == self.owner.0 && s.thread.load(Ordering::Relaxed) == self.owner.1 {
                    s.owner.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Runs `f` with this thread's cache for heap `h`, claiming a slot on first use. None when
/// the thread has no usable cache for it (no slot, TLS being destroyed, re-entered).
#[inline]
fn with_cache<T>(h: &HeapRef<'_>, f: impl FnOnce(&mut LocalCache) -> T) -> Option<T> {
    CACHES
        .try_with(|caches| {
            let mut caches = caches.try_borrow_mut().ok()?;
            let section = h.section as u64;
            let fork_gen = os::fork_generation();
            // Relaxed: written once when the heap was created.
            let instance = h.shared.instance.load(Ordering::Relaxed);
            let i = match caches.list.iter().position(|c| c.section == section) {
                Some(i) if caches.list[i].fork_gen == fork_gen && caches.list[i].instance == instance => i,
                found => caches.install(h, found, instance),
            };
            let c = &mut caches.list[i];
            if c.store.is_null() { None } else { Some(f(c)) }
        })
        .ok()
        .flatten()
}

impl Caches {
    /// [`with_cache`]'s first use of heap `h` by this thread (or after a fork or a reset):
    /// drops the stale cache at `found`, if any, and claims a slot. Returns the new cache's
    /// index. Out of line, to keep the hot path small.
    #[cold]
    #[inline(never)]
    fn install(&mut self, h: &HeapRef<'_>, found: Option<usize>, instance: u64) -> usize {
        if let Some(i) = found {
            // Stale (forked child, or another heap now at this address): forget it without
            // touching its slot.
            let mut stale = self.list.swap_remove(i);
            stale.store = std::ptr::null();
        }
        if self.serial == 0 {
            self.serial = take_serial();
        }
        let serial = self.serial;
        self.list.push(claim(h, instance, serial));
        self.list.len() - 1
    }
}

/// Claims a cache slot of heap `h` for this thread (reclaiming slots of exited threads on the
/// way). The returned cache has no store when none could be had.
fn claim(h: &HeapRef<'_>, instance: u64, serial: u64) -> LocalCache {
    let mut cache = LocalCache {
        section: h.section as u64,
        instance,
        fork_gen: os::fork_generation(),
        owner: (0, serial),
        // Relaxed: see `UNMAP_EPOCH`.
        epoch: crate::domain::UNMAP_EPOCH.load(Ordering::Relaxed),
        slot: 0,
        store: std::ptr::null(),
        shared: h.shared,
        mapped: h.mapped,
        bytes: 0,
        // Relaxed: frozen after creation.
        budget: BUDGET.min(h.shared.reserved.load(Ordering::Relaxed) / 16),
        chunk_size: 0,
    };
    let quarter = (cache.budget / 4) & !(tlsf::ALIGN - 1);
    cache.chunk_size = if quarter >= MIN_CHUNK { CHUNK.min(quarter) } else { 0 };
    if serial == 0 {
        return cache;
    }
    let Some((token, ident)) = process_ident(h) else { return cache };
    if token == crate::domain::NO_TOKEN {
        // Not registered: others would take our slot for a dead one's. Go without a cache.
        return cache;
    }
    cache.owner = (token, serial);
    let Ok(locked) = h.lock() else { return cache };
    let _ = reclaim_with(h, &locked, Some(&ident), Some(cache.owner));
    // Relaxed: slots change under the heap lock, which we hold.
    let Some(slot) = h.shared.caches.iter().position(|s| s.owner.load(Ordering::Relaxed) == 0) else {
        return cache;
    };
    let s = &h.shared.caches[slot];
    let mut off = s.store.load(Ordering::Relaxed);
    if off == 0 {
        let size = size_of::<CacheStoreShared>() as u64;
        let Ok(o) = locked.tlsf().alloc(size, tlsf::ALIGN) else { return cache };
        let base = h.section as u64 + AREA_OFFSET;
        // SAFETY: a fresh block of `size` bytes in the mapped heap, ours under the lock; all
        // zero is an empty store.
        unsafe { ((base + o) as *mut u8).write_bytes(0, size as usize) };
        s.store.store(o, Ordering::Relaxed);
        off = o;
    }
    // The store block must be a used block large enough (a corrupt header is refused).
    match locked.tlsf().usable_size(off) {
        Ok(n) if n >= size_of::<CacheStoreShared>() as u64 => {}
        _ => return cache,
    }
    let store = (h.section as u64 + AREA_OFFSET + off) as *const CacheStoreShared;
    // SAFETY: a used block of the mapped heap large enough for a store (checked just above);
    // its slot is free, so nobody else uses it while we hold the lock. Atomics only.
    let chunk = unsafe { &(*store).chunk };
    // Relaxed: under the lock, on a free slot's store. A free slot's store lists no chunk
    // (its owner or reclaimer gave it back); one left there by damage goes if it is parked.
    let stale = chunk.load(Ordering::Relaxed);
    if stale != 0 {
        chunk.store(0, Ordering::Relaxed);
        let _ = release_listed(&locked, stale, false, h.name());
    }
    s.owner.store(token, Ordering::Relaxed);
    s.thread.store(serial, Ordering::Relaxed);
    cache.slot = slot;
    cache.store = store;
    cache
}

/// Reclaims the slots whose owner is gone (see the module docs): every block they list goes
/// back to the allocator. Returns the blocks reclaimed. The caller holds the heap lock.
pub(crate) fn reclaim_dead(h: &HeapRef<'_>, locked: &Locked<'_>) -> Result<u64> {
    let ident = crate::domain::attachment_covering(h.section as usize);
    reclaim_with(h, locked, ident.as_deref(), None)
}

/// [`reclaim_dead`], with the heap's attachment already looked up, also reclaiming the slot of
/// owner `mine` (the calling thread's own, whose cache it dropped). Without an attachment
/// nothing can be decided, so nothing is reclaimed.
fn reclaim_with(
    h: &HeapRef<'_>,
    locked: &Locked<'_>,
    ident: Option<&crate::domain::DomainInner>,
    mine: Option<(u64, u64)>,
) -> Result<u64> {
    let Some(ident) = ident else { return Ok(0) };
    let my_token = ident.token();
    // One lock-table query per other process, not per slot.
    let mut asked: Vec<(u64, bool)> = Vec::new();
    let gone = |owner: u64, thread: u64| -> bool {
        if Some((owner, thread)) == mine {
            return true;
        }
        if owner == my_token {
            return !serial_alive(thread);
        }
        if let Some(&(_, alive)) = asked.iter().find(|(t, _)| *t == owner) {
            return !alive;
        }
        let alive = ident.registry.proc_alive(owner);
        asked.push((owner, alive));
        !alive
    };
    Ok(reclaim_if(h, locked, gone))
}

/// Reclaims every owned slot for which `gone(owner, thread)` says so: every block its store
/// lists goes back to the allocator (listed offsets that are not parked blocks are skipped).
/// Returns the blocks reclaimed. The caller holds the heap lock.
pub(crate) fn reclaim_if(h: &HeapRef<'_>, locked: &Locked<'_>, mut gone: impl FnMut(u64, u64) -> bool) -> u64 {
    let mut reclaimed = 0;
    for s in &h.shared.caches {
        // Relaxed: slots change under the heap lock, which we hold.
        let owner = s.owner.load(Ordering::Relaxed);
        if owner == 0 || !gone(owner, s.thread.load(Ordering::Relaxed)) {
            continue;
        }
        let off = s.store.load(Ordering::Relaxed);
        if off != 0 && locked.tlsf().usable_size(off).is_ok_and(|n| n >= size_of::<CacheStoreShared>() as u64) {
            // SAFETY: the store block lies in the mapped heap (validated just above) and its
            // owner is gone, so only we (under the lock) touch it.
            let store = unsafe { &*((h.section as u64 + AREA_OFFSET + off) as *const CacheStoreShared) };
            // Acquire: pairs with the owner's Release store listing it (after marking it).
            let chunk = store.chunk.load(Ordering::Acquire);
            if chunk != 0 {
                store.chunk.store(0, Ordering::Relaxed);
                // A chunk is listed only once marked: an unmarked one is damage, left alone.
                if release_listed(locked, chunk, false, h.name()).is_ok() {
                    reclaimed += 1;
                }
            }
            for c in 0..CLASSES {
                // Acquire: pairs with the owner's Release stores of the count.
                let listed = (store.counts[c].load(Ordering::Acquire) as usize).min(DEPTH);
                let mut n = listed;
                while n > 0 {
                    let block = store.entries[c][n - 1].load(Ordering::Relaxed);
                    let top = n == listed;
                    n -= 1;
                    store.counts[c].store(n as u32, Ordering::Relaxed);
                    if release_listed(locked, block, top, h.name()).is_ok() {
                        reclaimed += 1;
                    }
                }
            }
        }
        s.owner.store(0, Ordering::Relaxed);
    }
    reclaimed
}

/// Blocks and bytes held by the caches of the heap, the stores themselves included (under the
/// lock; live owners change their stores meanwhile, so this is a snapshot).
pub(crate) fn parked(h: &HeapRef<'_>, locked: &Locked<'_>) -> (u64, u64) {
    let (mut blocks, mut bytes) = (0, 0);
    for s in &h.shared.caches {
        // Relaxed: a snapshot.
        let off = s.store.load(Ordering::Relaxed);
        let Some(size) = (off != 0).then(|| locked.tlsf().usable_size(off).ok()).flatten() else { continue };
        if size < size_of::<CacheStoreShared>() as u64 {
            continue;
        }
        blocks += 1;
        bytes += size + tlsf::HEADER;
        if s.owner.load(Ordering::Relaxed) == 0 {
            continue;
        }
        // SAFETY: the store block lies in the mapped heap (validated above); we only read it.
        let store = unsafe { &*((h.section as u64 + AREA_OFFSET + off) as *const CacheStoreShared) };
        // Acquire: pairs with the owner's Release stores.
        let chunk = store.chunk.load(Ordering::Acquire);
        if let Some(size) = (chunk != 0).then(|| locked.tlsf().block_size(chunk).ok()).flatten() {
            blocks += 1;
            bytes += size;
        }
        for c in 0..CLASSES {
            let n = (store.counts[c].load(Ordering::Acquire) as usize).min(DEPTH);
            for e in &store.entries[c][..n] {
                if let Ok(size) = locked.tlsf().block_size(e.load(Ordering::Relaxed)) {
                    blocks += 1;
                    bytes += size;
                }
            }
        }
    }
    (blocks, bytes)
}

/// Allocates `size` bytes aligned to `align` from heap `h`, from this thread's cache when it
/// can. Returns the payload's offset in the block area.
#[inline]
pub(crate) fn alloc(h: &HeapRef<'_>, size: u64, align: u64, commit: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64> {
    if size != 0 && size <= MAX_CACHED && align <= tlsf::ALIGN {
        let class = class_for_request(size);
        if let Some(r) = with_cache(h, |c| c.alloc(h, class, commit)) {
            return r;
        }
    }
    h.lock()?.alloc(size, align, h.name(), commit)
}

/// The common case of [`alloc`]: a request of 1..=`MAX_CACHED` bytes (alignment 16, which
/// the caller checked) served from this thread's stock. None when that is not the case
/// (nothing changed: the caller then runs [`alloc`]).
#[inline]
pub(crate) fn alloc_fast(h: &HeapRef<'_>, size: u64) -> Option<u64> {
    if size.wrapping_sub(1) >= MAX_CACHED {
        return None;
    }
    let class = class_for_request(size);
    with_cache(h, |c| c.pop_fast(h, class)).flatten()
}

/// The common case of [`free`]: a valid used block of a cached class parked in this thread's
/// stock, every check of `free` made once. False when that is not the case (nothing changed:
/// the caller then runs [`free`], which decides and reports).
#[inline]
pub(crate) fn free_fast(h: &HeapRef<'_>, off: u64) -> bool {
    let Some((w, usable)) = h.unlocked().probe_fast(off) else { return false };
    if usable > MAX_CACHED + MAX_CACHED / 4 {
        return false;
    }
    let Some(class) = class_for_block(usable) else { return false };
    with_cache(h, |c| c.push_word(w, off, class)).unwrap_or(false)
}

/// Frees the block at payload offset `off` of heap `h`, into this thread's cache when it can.
#[inline]
pub(crate) fn free(h: &HeapRef<'_>, off: u64) -> Result<()> {
    // The common case: a valid used block of a cached class (every check of `cache_probe`).
    if let Some(class) =
        h.unlocked().cache_probe_fast(off).filter(|&u| u <= MAX_CACHED + MAX_CACHED / 4).and_then(class_for_block)
    {
        if let Some(r) = with_cache(h, |c| c.free(h, off, class)) {
            return r;
        }
    }
    free_slow(h, off)
}

/// [`free`] when the fast probe did not pass: the full validation (and its error), and the
/// lock for blocks the caches do not take.
#[inline(never)]
fn free_slow(h: &HeapRef<'_>, off: u64) -> Result<()> {
    // Only blocks of a cached class go through the cache (no slot is claimed for others).
    let probe = h.unlocked().cache_probe(off, MAX_CACHED + MAX_CACHED / 4).map_err(|e| map_tlsf(e, h.name()))?;
    if let Some(class) = probe.and_then(class_for_block) {
        if let Some(r) = with_cache(h, |c| c.free(h, off, class)) {
            return r;
        }
    }
    h.lock()?.free(off, h.name())
}

/// Gives this thread's stock back, leaves its slot, and frees the stores of all free slots,
/// so that nothing of the caches pins memory (for `trim`). Dead threads' slots are reclaimed
/// first.
pub(crate) fn release_all(h: &HeapRef<'_>) -> Result<()> {
    let section = h.section as u64;
    let fork_gen = os::fork_generation();
    let mut mine = None;
    let _ = CACHES.try_with(|caches| {
        if let Ok(mut caches) = caches.try_borrow_mut() {
            // Forget our cache without its `Drop`; its slot is reclaimed just below, as ours.
            for c in caches.list.iter_mut().filter(|c| c.section == section) {
                if c.fork_gen == fork_gen && !c.store.is_null() {
                    mine = Some(c.owner);
                }
                c.store = std::ptr::null();
            }
            caches.list.retain(|c| c.section != section);
        }
    });
    let ident = crate::domain::attachment_covering(h.section as usize);
    let locked = h.lock()?;
    reclaim_with(h, &locked, ident.as_deref(), mine)?;
    free_idle_stores(h, &locked)
}

/// Frees the store blocks of every free slot (under the lock).
pub(crate) fn free_idle_stores(h: &HeapRef<'_>, locked: &Locked<'_>) -> Result<()> {
    for s in &h.shared.caches {
        // Relaxed: slots change under the heap lock, which we hold.
        let off = s.store.load(Ordering::Relaxed);
        if s.owner.load(Ordering::Relaxed) == 0 && off != 0 {
            s.store.store(0, Ordering::Relaxed);
            locked.free(off, h.name())?;
        }
    }
    Ok(())
}

/// Checks every cache slot and store (under the lock): a slot's store is none or a used block
/// large enough for a store, used by no other slot; an owned slot's counts are at most `DEPTH`
/// and each listed entry is a distinct block parked in a cache. Returns the first violation.
pub(crate) fn check(locked: &Locked<'_>) -> Result<()> {
    let corrupt = |m: String| Err(Error::new(ErrorKind::Corrupt, m));
    let t = locked.tlsf();
    // The parked blocks, from one walk of the block chain (the caller's check walked it too).
    let mut parked: Vec<u64> = match t.blocks(usize::MAX) {
        Ok(b) => b.iter().filter(|b| b.cached).map(|b| b.offset + tlsf::HEADER).collect(),
        Err(e) => return Err(map_tlsf(e, "(heap)")),
    };
    parked.sort_unstable();
    let mut stores: Vec<u64> = Vec::new();
    let mut listed: Vec<u64> = Vec::new();
    let store_size = size_of::<CacheStoreShared>() as u64;
    for (i, s) in locked.shared.caches.iter().enumerate() {
        // Relaxed: slots change under the heap lock, which we hold.
        let (owner, off) = (s.owner.load(Ordering::Relaxed), s.store.load(Ordering::Relaxed));
        if off == 0 {
            if owner != 0 {
                return corrupt(format!("cache slot {i} is owned (token {owner:#x}) but has no store"));
            }
            continue;
        }
        match t.usable_size(off) {
            Ok(n) if n >= store_size => {}
            Ok(n) => {
                return corrupt(format!(
                    "cache slot {i} has its store at offset {off:#x}, a block of {n} usable bytes, expected at least \
                     {store_size}"
                ));
            }
            Err(_) => return corrupt(format!("cache slot {i} has its store at offset {off:#x}, not a used block")),
        }
        if stores.contains(&off) {
            return corrupt(format!("cache slot {i} shares its store at offset {off:#x} with another slot"));
        }
        stores.push(off);
        if owner == 0 {
            continue;
        }
        // SAFETY: the store block lies in the mapped heap (validated just above); we only read it.
        let store = unsafe { &*((locked.section as u64 + AREA_OFFSET + off) as *const CacheStoreShared) };
        // Acquire: pairs with the owner's Release store (a chunk is marked before it is listed).
        let chunk = store.chunk.load(Ordering::Acquire);
        if chunk != 0 {
            if parked.binary_search(&chunk).is_err() {
                return corrupt(format!(
                    "cache slot {i} has its chunk at offset {chunk:#x}, which is not a block parked in a cache"
                ));
            }
            listed.push(chunk);
        }
        for c in 0..CLASSES {
            // Acquire: pairs with the owner's Release stores of the count.
            let n = store.counts[c].load(Ordering::Acquire) as usize;
            if n > DEPTH {
                return corrupt(format!("cache slot {i} lists {n} blocks in class {c}, at most {DEPTH}"));
            }
            for (k, e) in store.entries[c][..n].iter().enumerate() {
                // Relaxed: a snapshot (a live owner changes it without the lock).
                let b = e.load(Ordering::Relaxed);
                // The top entry may be mid-push (listed, not yet marked) or mid-pop (unmarked,
                // count not yet lowered) by its live owner: then it is a used block.
                let in_flight = k + 1 == n && t.usable_size(b).is_ok();
                if parked.binary_search(&b).is_err() && !in_flight {
                    return corrupt(format!(
                        "cache slot {i} lists offset {b:#x} in class {c}, which is not a block parked in a cache"
                    ));
                }
                listed.push(b);
            }
        }
    }
    listed.sort_unstable();
    if let Some(w) = listed.windows(2).find(|w| w[0] == w[1]) {
        return corrupt(format!("the block at offset {:#x} is listed twice in thread caches", w[0]));
    }
    Ok(())
}

/// Gives this thread's stock for heap `h` back to the allocator.
pub(crate) fn flush(h: &HeapRef<'_>) -> Result<()> {
    with_cache(h, |c| {
        let Some(store) = c.store() else { return Ok(()) };
        c.give_back(h, store, None, 0)
    })
    .unwrap_or(Ok(()))
}

/// For fuzz seeds: gives cache slot `slot` a store and owner `owner` and parks `blocks` (used
/// blocks of the heap, of class payloads) in it, as a live thread would have.
pub(crate) fn seed_slot(locked: &Locked<'_>, slot: usize, owner: u64, blocks: &[u64]) -> Result<()> {
    let t = locked.tlsf();
    let size = size_of::<CacheStoreShared>() as u64;
    let off = t.alloc(size, tlsf::ALIGN).map_err(|e| map_tlsf(e, "(seed)"))?;
    let base = locked.section as u64 + AREA_OFFSET;
    // SAFETY: a fresh block of `size` bytes in the heap, ours under the lock.
    unsafe { ((base + off) as *mut u8).write_bytes(0, size as usize) };
    // SAFETY: as above; CacheStoreShared is atomics only.
    let store = unsafe { &*((base + off) as *const CacheStoreShared) };
    for &b in blocks {
        let Some(c) = t.usable_size(b).ok().and_then(class_for_block) else { continue };
        // Relaxed: private seed memory under the lock.
        let n = store.counts[c].load(Ordering::Relaxed) as usize;
        if n < DEPTH && t.cache_mark(b).is_ok() {
            store.entries[c][n].store(b, Ordering::Relaxed);
            store.counts[c].store(n as u32 + 1, Ordering::Relaxed);
        }
    }
    // A chunk, as a refill leaves it: a parked block the store names (when room is left for
    // more stores).
    let chunk_size = 512 + 256 * (slot as u64 % 4);
    if t.largest_request() >= chunk_size + 2 * size {
        if let Ok(chunk) = t.alloc(chunk_size, tlsf::ALIGN) {
            if t.cache_mark(chunk).is_ok() {
                store.chunk.store(chunk, Ordering::Relaxed);
            }
        }
    }
    let s = &locked.shared.caches[slot % MAX_CACHES];
    s.store.store(off, Ordering::Relaxed);
    s.thread.store(1 << 32 | 1, Ordering::Relaxed);
    s.owner.store(owner, Ordering::Relaxed);
    Ok(())
}

/// For the fuzz target: carves a block for `size` bytes from the chunk of cache slot `slot`,
/// as a refill does (under the lock); the block is the caller's. None when the slot has no
/// valid store or chunk, or the chunk is too small.
pub(crate) fn carve_slot(locked: &Locked<'_>, slot: usize, size: u64) -> Option<u64> {
    let s = &locked.shared.caches[slot % MAX_CACHES];
    // Relaxed: under the lock.
    let off = s.store.load(Ordering::Relaxed);
    if off == 0 || !locked.tlsf().usable_size(off).is_ok_and(|n| n >= size_of::<CacheStoreShared>() as u64) {
        return None;
    }
    // SAFETY: a used block of the mapped heap large enough for a store (checked just above);
    // atomics only.
    let store = unsafe { &*((locked.section as u64 + AREA_OFFSET + off) as *const CacheStoreShared) };
    // Relaxed: under the lock.
    let chunk = store.chunk.load(Ordering::Relaxed);
    if chunk == 0 {
        return None;
    }
    locked.tlsf().carve(chunk, size).ok().flatten()
}

/// Frees every cache slot (after the heap was re-initialised: the stores are gone with it).
pub(crate) fn forget_all(shared: &HeapShared) {
    for s in &shared.caches {
        // Relaxed: under the heap lock (the caller's).
        s.owner.store(0, Ordering::Relaxed);
        s.thread.store(0, Ordering::Relaxed);
        s.store.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_requests_and_blocks_consistently() {
        for size in 1..=MAX_CACHED {
            let c = class_for_request(size);
            assert!(c < CLASSES, "{size}");
            assert!(class_payload(c) >= size, "{size} -> class {c} of {}", class_payload(c));
            if c > 0 {
                assert!(class_payload(c - 1) < size.max(16), "{size}: a smaller class would do");
            }
            // A block made for class c serves class c again when freed.
            assert_eq!(class_for_block(class_payload(c)), Some(c));
        }
        for usable in (16..=MAX_CACHED * 2).step_by(16) {
            if let Some(c) = class_for_block(usable) {
                assert!(class_payload(c) <= usable);
                assert!(c + 1 == CLASSES || class_payload(c + 1) > usable);
            } else {
                assert!(usable > MAX_CACHED);
            }
        }
        assert_eq!(class_payload(CLASSES - 1), MAX_CACHED);
    }
}
