//! Shared heaps: malloc/free/realloc inside a section, from any process of the domain.
//!
//! # Layout of a heap section
//! ```text
//! 0            HeapShared   header, robust lock, commit bookkeeping, allocator control
//! AREA_OFFSET  block area   managed by the TLSF allocator (`tlsf.rs`), grows at its end
//! ```
//! # Protocol
//! * The creator makes the section unready in the registry, initialises `HeapShared` through
//!   the robust mutex's racing-safe `init`, publishes the header's `ready` word (Release) and
//!   only then marks the registry entry ready (under the registry lock). Openers are handed
//!   only ready sections (they wait for a live creator; a dead creator's unfinished section is
//!   removed and made anew), Acquire-load `ready` and validate magic, layout version,
//!   fingerprint, sizes. A creator whose initialisation fails (no space to commit, ...)
//!   removes the section before returning the error: creation is all or nothing.
//! * Every allocator call holds `lock` (a robust process-shared [`RawMutex`]); its
//!   acquire/release orders all writes to the control block and block headers between
//!   processes. `committed` grows only under the lock.
//! * A holder that dies leaves the next locker an `OwnerDied` report: it runs
//!   `Tlsf::recover` (the block chain survives any crash point, see `tlsf.rs`), counts the
//!   recovery in `recoveries`, and marks the lock consistent. No block is handed out twice; a
//!   block the dead process had just allocated is leaked, one it was freeing is either freed or
//!   still allocated.
//! * Validate, then trust: everything in the section is written by processes that may be
//!   buggy, crashed or hostile. `attach` runs the one header check (`crate::header::validate`:
//!   the section holds at least `MIN_HEAP` bytes, then ready, magic, layout version and
//!   fingerprint) before any reference to `HeapShared` exists, then checks that
//!   `reserved`/`committed` match the section; the allocator's area is bounded by the *mapped*
//!   length, not only by `reserved`; `committed` is re-checked under the lock before it is
//!   used; a named entry's offset must be a used block large enough for it (`named.rs`); a
//!   cache slot's store must be a used block large enough for a store, and every count and
//!   listed entry is range-checked before use. A violation is a `Corrupt` error saying what was expected and
//!   found; `check` reports the first one in the block chain, the named-object table or the
//!   caches.
//! * Growth: the heap commits its section lazily. When no free block fits, the lock holder
//!   commits an eighth more (at least 1 MiB; `fallocate`, so a full backing store is a clean
//!   error) and then grows the allocator's area into it.

mod alloc;
mod cache;
pub(crate) mod fuzz;
pub(crate) mod guard;
mod named;
pub(crate) mod tlsf;

pub use alloc::{ShmAlloc, ShmBox, ShmHashMap, ShmHasher, ShmString, ShmVec, ShmVecExt, free, realloc};
pub use named::{MAX_NAMED, NamedObject, ObjectKind, ObjectState};
pub use tlsf::{BlockInfo, TlsfStats};

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result, bail};
use crate::header;
use crate::registry::SectionKind;
use crate::section::{Section, SectionOptions};
use crate::sync::{Acquired, RawMutex};
use named::NamedEntry;
use tlsf::{Tlsf, TlsfControl, TlsfError};

const MAGIC: u64 = u64::from_le_bytes(*b"SHMHEAP1");
/// 3: cache slots name their owner by process token and thread serial (24 bytes).
/// 4: the lock is shmgadget's own robust lock (`sync::robust`), not a glibc mutex.
/// 5: a cache store names its thread's chunk (`cache.rs`, "Chunks").
const LAYOUT_VERSION: u32 = 5;
const READY: u32 = 0x4845_4150; // "HEAP"
/// Where the block area starts in the section.
pub const AREA_OFFSET: u64 = 16 << 10;
/// Bytes committed when a heap is created (or less if it reserves less).
pub const INITIAL_COMMIT: u64 = 1 << 20;
/// Smallest heap section.
pub const MIN_HEAP: u64 = AREA_OFFSET + (64 << 10);

/// The control block at the start of a heap section.
#[repr(C)]
pub(crate) struct HeapShared {
    magic: AtomicU64,
    layout_version: AtomicU32,
    fingerprint: AtomicU32,
    ready: AtomicU32,
    _pad0: AtomicU32,
    reserved: AtomicU64,
    committed: AtomicU64,
    recoveries: AtomicU64,
    /// A number drawn when the heap was created: thread caches check it, so a cache made for a
    /// deleted heap is never used on a new heap at the same address.
    instance: AtomicU64,
    /// `_reserved[0]`: live guarded blocks (`guard.rs`), changed under the lock. The others
    /// are unused (zero).
    _reserved: [AtomicU64; 8],
    lock: RawMutex,
    tlsf: TlsfControl,
    names: [NamedEntry; MAX_NAMED],
    caches: [cache::CacheSlotShared; cache::MAX_CACHES],
}

crate::header::assert_prefix!(HeapShared, magic, layout_version, fingerprint, ready);

// SAFETY: repr(C), atomics and the robust mutex (operated in place, valid for any bytes until
// checked), its prefix asserted above; `MIN_HEAP` exceeds its size (asserted below).
unsafe impl crate::header::SharedHeader for HeapShared {
    const EXPECTED: crate::header::Expected = crate::header::Expected {
        what: "heap",
        magic: MAGIC,
        layout_version: LAYOUT_VERSION,
        fingerprint: FINGERPRINT,
        ready: READY,
        min_size: MIN_HEAP,
    };
}

const _: () = assert!(size_of::<HeapShared>() as u64 <= AREA_OFFSET);
const _: () = assert!(AREA_OFFSET < MIN_HEAP);
const _: () = assert!(std::mem::offset_of!(HeapShared, lock) == 128);
/// Where a heap's lock lives in its section (for `gc`, which looks at heaps of domains it has
/// not joined).
pub(crate) const LOCK_OFFSET: usize = std::mem::offset_of!(HeapShared, lock);

const FINGERPRINT: u32 = {
    let parts = [
        size_of::<HeapShared>() as u64,
        std::mem::offset_of!(HeapShared, tlsf) as u64,
        size_of::<TlsfControl>() as u64,
        tlsf::FL_COUNT as u64,
        tlsf::HEADER,
        AREA_OFFSET,
        MAX_NAMED as u64,
        size_of::<NamedEntry>() as u64,
        cache::MAX_CACHES as u64,
        cache::STORE_SIZE as u64,
    ];
    crate::fnv::layout_fingerprint(&parts)
};

impl HeapShared {
    /// Live guarded blocks (see `guard.rs`): a spare header word, so the layout is unchanged
    /// and heaps made before guard pages existed read 0.
    pub(crate) fn guarded_blocks(&self) -> &AtomicU64 {
        &self._reserved[0]
    }
}

/// Options for a heap handle (this process's use of the heap; nothing here is shared).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapOptions {
    /// Guard pages after allocations of a page or more (a debug mode, see
    /// [`Heap::set_guard_pages`]). `None`: from `SHMGADGET_HEAP_GUARD=1` in the environment.
    pub guard_pages: Option<bool>,
}

impl HeapOptions {
    /// Default options: guard pages as `SHMGADGET_HEAP_GUARD` says.
    pub fn new() -> HeapOptions {
        HeapOptions::default()
    }

    /// Turns guard pages on or off for the handle, whatever the environment says.
    pub fn guard_pages(mut self, on: bool) -> HeapOptions {
        self.guard_pages = Some(on);
        self
    }
}

/// Heap statistics.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeapStats {
    /// Bytes reserved by the section.
    pub reserved: u64,
    /// Bytes committed so far.
    pub committed: u64,
    /// Allocator figures (used/free bytes and blocks, largest free block, counters).
    /// Allocator figures; `used_*` count only blocks the program holds, not those parked in
    /// thread caches.
    #[serde(flatten)]
    pub blocks: TlsfStats,
    /// Blocks parked in thread caches, ready for their threads' next allocations.
    pub cached_blocks: u64,
    /// Bytes (headers included) of those blocks.
    pub cached_bytes: u64,
    /// Recoveries after a holder died.
    pub recoveries: u64,
    /// 1 − largest free block / free bytes (0: all free space in one block).
    pub fragmentation: f64,
}

/// A shared heap: a section managed by shmgadget's allocator, usable from every process of the
/// domain at once. Pointers it returns are valid in every process.
pub struct Heap {
    section: Section,
    /// Guard mode (`guard.rs`): this handle's allocations of a page or more get a guard page.
    guard: bool,
}

pub(crate) fn map_tlsf(e: TlsfError, heap: &str) -> Error {
    match e {
        TlsfError::OutOfMemory { requested, largest_request } => Error::new(
            ErrorKind::OutOfSpace,
            format!(
                "heap {heap:?} cannot serve {requested} bytes: it cannot grow further and the largest allocation that \
                 would succeed now is {largest_request} bytes; free blocks, or create a larger heap"
            ),
        ),
        TlsfError::BadLayout(m) => Error::new(ErrorKind::InvalidArgument, format!("heap {heap:?}: {m}")),
        TlsfError::NotABlock(m) => Error::new(ErrorKind::InvalidArgument, format!("heap {heap:?}: {m}")),
        TlsfError::DoubleFree(off) => Error::new(
            ErrorKind::InvalidArgument,
            format!("heap {heap:?}: double free of the block at offset {off:#x}"),
        ),
        TlsfError::Corrupt(m) => Error::new(
            ErrorKind::Corrupt,
            format!("heap {heap:?} is corrupt: {m}; `shmgadget heap {heap} --check` shows the first violation"),
        ),
    }
}

/// What the allocator said, in a few words, for errors about other structures' offsets.
fn tlsf_reason(e: &TlsfError) -> String {
    match e {
        TlsfError::OutOfMemory { requested, .. } => format!("no room for {requested} bytes"),
        TlsfError::BadLayout(m) | TlsfError::NotABlock(m) | TlsfError::Corrupt(m) => m.clone(),
        TlsfError::DoubleFree(off) => format!("the block at {off:#x} is free or parked in a cache"),
    }
}

/// Bytes of the block area that are mapped: the section's reserved size (frozen at creation,
/// checked against the section by `open`) past `AREA_OFFSET`, but never more than `mapped`, the
/// section's length as this process knows it (`u64::MAX` when only the address is known): a
/// `reserved` damaged after `open` cannot send the allocator past the mapping.
#[inline]
pub(crate) fn area_limit(shared: &HeapShared, mapped: u64) -> u64 {
    // Relaxed: frozen after creation.
    shared.reserved.load(Ordering::Relaxed).min(mapped).saturating_sub(AREA_OFFSET)
}

/// Checks the header's `committed` (re-read under the lock: another process may have
/// damaged it since `open`) against the section's `mapped` length; returns it.
fn committed_checked(shared: &HeapShared, mapped: u64, heap: &str) -> Result<u64> {
    // Relaxed: written only under the lock, which the caller holds.
    let (committed, reserved) = (shared.committed.load(Ordering::Relaxed), shared.reserved.load(Ordering::Relaxed));
    let end = reserved.min(mapped);
    if committed < MIN_HEAP.min(end) || committed > end || committed < AREA_OFFSET {
        bail!(
            Corrupt,
            "heap {heap:?} is corrupt: its header records {committed} bytes committed and {reserved} reserved, expected \
             between {} and {end}; `shmgadget heap {heap} --check` shows the damage",
            MIN_HEAP.min(end)
        );
    }
    Ok(committed)
}

/// Proof of holding a heap's lock, given only its control block and section address (so both
/// [`Heap`] and [`ShmAlloc`] use it); gives the allocator.
pub(crate) struct Locked<'a> {
    shared: &'a HeapShared,
    section: *mut u8,
    /// The section's mapped length (`u64::MAX`: unknown, trust the header's `reserved`).
    mapped: u64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: a `Locked` exists only while this thread holds the lock.
        unsafe { self.shared.lock.unlock() }
    }
}

impl<'a> Locked<'a> {
    /// Locks the heap, recovering it first if the previous holder died.
    ///
    /// # Safety
    /// `shared` must be the control block at the start of the heap section at `section`, whose
    /// first `min(mapped, reserved)` bytes stay mapped for `'a` (`mapped` is the section's
    /// length, or `u64::MAX` when the caller knows only its address and trusts `reserved`,
    /// checked when the heap was opened).
    pub(crate) unsafe fn acquire(shared: &'a HeapShared, section: *mut u8, mapped: u64, name: &str) -> Result<Self> {
        // Bounded: a lock word that names no live holder must not hang `heap --check`,
        // `shm_alloc` or any other heap call (see `sync::RawMutex::lock_bounded`).
        let acquired = shared.lock.lock_bounded(|| format!("the lock of heap {name:?}"), crate::sync::LOCK_PATIENCE)?;
        let locked = Locked { shared, section, mapped };
        if acquired == Acquired::OwnerDied {
            // A holder died mid-operation: rebuild everything but the block chain.
            locked.tlsf().recover().map_err(|e| map_tlsf(e, name))?;
            // Relaxed: statistics under the lock.
            shared.recoveries.fetch_add(1, Ordering::Relaxed);
            // The dead holder's thread caches go back to the allocator too.
            let _ = cache::reclaim_dead(&cache::HeapRef { shared, section, mapped, handle: None }, &locked);
            // SAFETY: we hold the lock.
            unsafe { shared.lock.make_consistent() };
        }
        Ok(locked)
    }

    /// The block area's address.
    pub(crate) fn area(&self) -> *mut u8 {
        self.section.wrapping_add(AREA_OFFSET as usize)
    }

    pub(crate) fn tlsf(&self) -> Tlsf<'_> {
        // SAFETY: the block area starts AREA_OFFSET into the section (16 KiB, so 16-aligned)
        // and runs to the end of the section, which the contract of `acquire` keeps mapped
        // (`reserved` was checked against the section when the heap was opened, and is capped
        // by the mapped length); the allocator checks its recorded capacity and every offset
        // against that limit. We hold the heap lock.
        unsafe {
            Tlsf::new(&self.shared.tlsf, self.section.add(AREA_OFFSET as usize), area_limit(self.shared, self.mapped))
        }
    }

    /// Allocates, growing the heap (committing with `commit`) when no free block fits.
    /// Returns the payload's offset in the block area.
    pub(crate) fn alloc(
        &self,
        size: u64,
        align: u64,
        name: &str,
        commit: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<u64> {
        loop {
            match self.tlsf().alloc(size, align) {
                Ok(off) => return Ok(off),
                Err(TlsfError::OutOfMemory { .. }) if self.grow(size + align, name, commit)? => continue,
                Err(e) => return Err(map_tlsf(e, name)),
            }
        }
    }

    /// Frees the block whose payload is at `off` in the block area.
    pub(crate) fn free(&self, off: u64, name: &str) -> Result<()> {
        self.tlsf().free(off).map_err(|e| map_tlsf(e, name))
    }

    /// Commits more of the section and grows the allocator into it. Returns false when the
    /// section is fully committed already.
    fn grow(&self, at_least: u64, name: &str, commit: &mut dyn FnMut(u64) -> Result<()>) -> Result<bool> {
        let s = self.shared;
        let committed = committed_checked(s, self.mapped, name)?;
        // Relaxed: frozen after creation; capped by the mapping.
        let reserved = s.reserved.load(Ordering::Relaxed).min(self.mapped);
        if committed >= reserved {
            return Ok(false);
        }
        // Grow by an eighth (at least 1 MiB, and enough for the request): few fallocate calls,
        // and never more than ~12% committed beyond what is used.
        let step = (committed / 8).max(1 << 20).max(at_least + tlsf::MIN_BLOCK * 2);
        let new = (committed + step).next_multiple_of(4096).min(reserved);
        commit(new)?;
        self.tlsf().grow(new - AREA_OFFSET).map_err(|e| map_tlsf(e, name))?;
        // Relaxed: under the lock.
        s.committed.store(new, Ordering::Relaxed);
        Ok(true)
    }
}

impl Heap {
    /// Creates a heap section reserving `reserved` bytes (it commits 1 MiB now and grows on
    /// demand). All or nothing: if any step fails (no space to commit, ...), the section is
    /// removed again before the error is returned.
    pub fn create(domain: &Domain, name: &str, reserved: u64) -> Result<Heap> {
        Heap::check_size(name, reserved)?;
        let opts = SectionOptions::new().kind(SectionKind::Heap);
        let (section, rec) = domain.create_section_as(name, reserved, &opts, false)?;
        Heap::init_created(domain, section, &rec)
    }

    /// Creates a heap in a file-backed section ([`SectionOptions::file`]), or adopts the heap
    /// already in `path`: a file made by an earlier call (perhaps by a process of a domain long
    /// gone) is placed at the address it records and its initialised heap is used as it is,
    /// raw pointers included. Returns whether this call created the heap (false: adopted).
    pub fn create_in_file(domain: &Domain, name: &str, path: &std::path::Path, reserved: u64) -> Result<(Heap, bool)> {
        let existed = path.symlink_metadata().is_ok();
        if !existed {
            Heap::check_size(name, reserved)?;
        }
        let opts = SectionOptions::new().kind(SectionKind::Heap).file(path);
        let (section, rec) = domain.create_section_as(name, reserved, &opts, false)?;
        if !existed {
            return Heap::init_created(domain, section, &rec).map(|h| (h, true));
        }
        // Adopt: the header must be a heap's (checked as an open does), then mark it ready.
        // Nobody else can use it meanwhile: openers wait for readiness.
        let adopted = Heap::attach(section)
            .map_err(|e| Error::new(e.kind(), format!("cannot adopt the heap in {}: {e}", path.display())))
            .and_then(|heap| domain.finish_init(&rec).map(|()| heap));
        if adopted.is_err() {
            domain.abandon_record(&rec);
        }
        adopted.map(|h| (h, false))
    }

    /// [`create`](Heap::create) with handle options (guard pages).
    pub fn create_with(domain: &Domain, name: &str, reserved: u64, options: HeapOptions) -> Result<Heap> {
        Heap::create(domain, name, reserved).map(|h| h.with_options(options))
    }

    /// [`open`](Heap::open) with handle options (guard pages).
    pub fn open_with(domain: &Domain, name: &str, options: HeapOptions) -> Result<Heap> {
        Heap::open(domain, name).map(|h| h.with_options(options))
    }

    fn with_options(mut self, options: HeapOptions) -> Heap {
        if let Some(on) = options.guard_pages {
            self.set_guard_pages(on);
        }
        self
    }

    /// Turns guard pages on or off for this handle's future allocations (a debug mode): each
    /// allocation of a page or more then ends exactly at a page end, followed by a page this
    /// process cannot access, so a write one byte past the end crashes at once with a line
    /// naming the heap and the block (see `heap/guard.rs`). Blocks already allocated keep
    /// what they have; any process may free a guarded block. Costs about two pages and two
    /// `mprotect` calls per large allocation. Sections on huge pages get no guard pages.
    /// `SHMGADGET_HEAP_GUARD=1` turns it on for every handle made afterwards.
    pub fn set_guard_pages(&mut self, on: bool) {
        self.guard = on;
    }

    /// Whether this handle puts guard pages after large allocations.
    pub fn guard_pages(&self) -> bool {
        self.guard
    }

    /// Opens an existing heap (waiting while its creator is still initialising it).
    pub fn open(domain: &Domain, name: &str) -> Result<Heap> {
        let section = domain.open_section(name)?;
        Heap::attach(section)
    }

    /// Opens heap `name`, creating it if needed; returns whether this call created it. A heap
    /// whose creator died before initialising it is removed and created anew.
    pub fn create_or_open(domain: &Domain, name: &str, reserved: u64) -> Result<(Heap, bool)> {
        Heap::check_size(name, reserved)?;
        let opts = SectionOptions::new().kind(SectionKind::Heap);
        let (section, created, rec) = domain.create_or_open_section_as(name, reserved, &opts, false)?;
        if created {
            Heap::init_created(domain, section, &rec).map(|h| (h, true))
        } else {
            Heap::attach(section).map(|h| (h, false))
        }
    }

    fn check_size(name: &str, reserved: u64) -> Result<()> {
        if reserved < MIN_HEAP {
            bail!(InvalidSize, "heap {name:?}: {reserved} bytes is too small; a heap needs at least {MIN_HEAP} bytes");
        }
        Ok(())
    }

    /// Initialises a section this process just created unready, then marks it ready; on any
    /// failure (or a panic) removes it again. Nobody else can have used it meanwhile: openers
    /// wait for readiness.
    fn init_created(domain: &Domain, section: Section, rec: &crate::registry::SectionRecord) -> Result<Heap> {
        let heap = Heap { section, guard: guard::env_guard() };
        let inited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| heap.init()));
        match inited {
            Ok(Ok(())) => match domain.finish_init(rec) {
                Ok(()) => Ok(heap),
                Err(e) => {
                    domain.abandon_created(heap.section, rec);
                    Err(e)
                }
            },
            Ok(Err(e)) => {
                domain.abandon_created(heap.section, rec);
                Err(e)
            }
            Err(panic) => {
                domain.abandon_created(heap.section, rec);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Initialises a freshly created heap section's header.
    fn init(&self) -> Result<()> {
        let heap = self;
        let reserved = heap.section.len() as u64;
        let commit = INITIAL_COMMIT.max(MIN_HEAP).min(reserved);
        heap.section.commit(commit)?;
        let shared = heap.shared();
        shared.lock.init()?;
        let locked = heap.lock()?;
        // Relaxed: published by the Release store of `ready` below. `reserved` first: it
        // bounds the allocator's area (`area_limit`).
        shared.reserved.store(reserved, Ordering::Relaxed);
        locked.tlsf().init(commit - AREA_OFFSET).map_err(|e| map_tlsf(e, heap.name()))?;
        shared.committed.store(commit, Ordering::Relaxed);
        shared.magic.store(MAGIC, Ordering::Relaxed);
        shared.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        shared.fingerprint.store(FINGERPRINT, Ordering::Relaxed);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let instance = (t.as_nanos() as u64) ^ ((crate::os::current_pid() as u64) << 40) ^ heap.base();
        shared.instance.store(instance | 1, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `attach`. (Openers reach the heap only once
        // `finish_init` marks its registry entry ready, under the registry lock, after this.)
        shared.ready.store(READY, Ordering::Release);
        drop(locked);
        Ok(())
    }

    /// Validates an existing heap section.
    fn attach(section: Section) -> Result<Heap> {
        let name = section.name().to_owned();
        if section.kind() != SectionKind::Heap {
            bail!(InvalidArgument, "section {name:?} is a {} section, not a heap", section.kind().as_str());
        }
        // The one header check (size first, then ready, magic, version, fingerprint), before
        // any reference to the header exists. A section handed out is ready in the registry,
        // which `Heap::create` marks only after publishing the header, so an unpublished
        // header means it was not made by `Heap::create` (no wait is needed).
        // SAFETY: the section is page-aligned and its `len()` bytes stay mapped while `section`
        // lives (the mapping was checked against the object's size when it was made); others
        // write the header only through atomics and the lock.
        let checked = unsafe { header::validate::<HeapShared>(section.as_ptr(), section.len() as u64) };
        if let Err(m) = checked {
            match m {
                header::Mismatch::TooSmall { .. } => bail!(
                    Corrupt,
                    "section {name:?} is a heap of {} bytes, too small for a heap header ({MIN_HEAP} bytes at least): it \
                     was damaged or not made by Heap::create; delete it with `shmgadget rm {name}`",
                    section.len()
                ),
                header::Mismatch::NotReady { .. } => bail!(
                    Corrupt,
                    "heap {name:?} has no initialised header although its section is ready ({m}): it was created as a \
                     plain section of kind heap rather than by Heap::create, or it was damaged; delete it with \
                     `shmgadget rm {name}`"
                ),
                _ => bail!(Corrupt, "heap {name:?} is corrupt: {m}; delete it with `shmgadget rm {name}`"),
            }
        }
        let heap = Heap { section, guard: guard::env_guard() };
        let s = heap.shared();
        // Relaxed: frozen fields, made visible by the Acquire load of `ready` in `validate`.
        let (reserved, committed) = (s.reserved.load(Ordering::Relaxed), s.committed.load(Ordering::Relaxed));
        if reserved != heap.section.len() as u64 || committed > reserved || committed < MIN_HEAP.min(reserved) {
            bail!(
                Corrupt,
                "heap {name:?} records {reserved} bytes reserved and {committed} committed, but its section has {} bytes",
                heap.section.len()
            );
        }
        Ok(heap)
    }

    fn shared(&self) -> &HeapShared {
        // SAFETY: the section is at least MIN_HEAP bytes (`check_size` at creation,
        // `header::validate` in `attach`, both before any call of this), page-aligned, mapped
        // while `self.section` lives, and HeapShared is atomics plus the robust mutex.
        unsafe { &*self.section.as_ptr().cast::<HeapShared>() }
    }

    /// The heap's name (its section's).
    pub fn name(&self) -> &str {
        self.section.name()
    }

    /// The section holding it.
    pub fn section(&self) -> &Section {
        &self.section
    }

    fn lock(&self) -> Result<Locked<'_>> {
        // SAFETY: `shared()` is this section's control block; the section stays mapped while
        // `self` lives.
        unsafe { Locked::acquire(self.shared(), self.section.as_ptr(), self.section.len() as u64, self.name()) }
    }

    fn cache_ref(&self) -> cache::HeapRef<'_> {
        cache::HeapRef {
            shared: self.shared(),
            section: self.section.as_ptr(),
            mapped: self.section.len() as u64,
            handle: Some(&self.section),
        }
    }

    /// Gives the blocks this thread keeps ready for this heap back to the heap (they show as
    /// used until then; a thread does this itself when it exits).
    pub fn flush_thread_cache(&self) -> Result<()> {
        cache::flush(&self.cache_ref())
    }

    fn commit_fn(&self) -> impl FnMut(u64) -> Result<()> + '_ {
        |len| self.section.commit(len)
    }

    fn base(&self) -> u64 {
        self.section.as_ptr() as u64 + AREA_OFFSET
    }

    /// Allocates memory for `layout` (alignment up to 4 KiB). The memory is valid at the same
    /// address in every process of the domain. Fails with `OutOfSpace` when the heap cannot
    /// grow, `InvalidSize` for more than the heap reserves, `InvalidArgument` for a zero size or an
    /// unsupported alignment; never aborts.
    #[inline]
    pub fn alloc(&self, layout: Layout) -> Result<NonNull<u8>> {
        // The common case first (a cached size from this thread's stock), without the error
        // plumbing; anything else (and any check that fails) goes the whole way.
        let size = layout.size() as u64;
        if layout.align() as u64 <= tlsf::ALIGN && (!self.guard || size < guard::min_guarded()) {
            if let Some(off) = cache::alloc_fast(&self.cache_ref(), size) {
                return Ok(NonNull::new((self.base() + off) as *mut u8).expect("heap addresses are never null"));
            }
        }
        self.alloc_slow(layout)
    }

    /// [`alloc`](Heap::alloc) when the thread's stock did not serve it.
    #[inline(never)]
    fn alloc_slow(&self, layout: Layout) -> Result<NonNull<u8>> {
        let (size, align) = (layout.size() as u64, layout.align() as u64);
        if size > self.section.len() as u64 - AREA_OFFSET {
            bail!(
                InvalidSize,
                "cannot allocate {size} bytes from heap {:?}: it reserves only {} bytes",
                self.name(),
                self.section.len()
            );
        }
        let off = if self.guard && size >= guard::min_guarded() && !self.section.is_huge() && size > 0 {
            crate::fault::install()?;
            guard::alloc(&self.lock()?, size, align, self.name(), &mut self.commit_fn())?
        } else {
            cache::alloc(&self.cache_ref(), size, align, &mut self.commit_fn())?
        };
        Ok(NonNull::new((self.base() + off) as *mut u8).expect("heap addresses are never null"))
    }

    /// The guarded block at payload offset `off`, if it is one (`guard.rs`).
    fn guarded(&self, off: u64) -> Option<guard::Guarded> {
        // SAFETY: this handle's section is mapped with `len()` bytes while `self` lives.
        unsafe { guard::recognise(self.shared(), self.section.as_ptr(), self.section.len() as u64, off) }
    }

    /// Like [`alloc`](Heap::alloc), with the memory zeroed.
    pub fn alloc_zeroed(&self, layout: Layout) -> Result<NonNull<u8>> {
        let p = self.alloc(layout)?;
        // SAFETY: `p` is a fresh allocation of at least `layout.size()` bytes, ours alone.
        unsafe { p.as_ptr().write_bytes(0, layout.size()) };
        Ok(p)
    }

    fn offset_of(&self, ptr: NonNull<u8>) -> Result<u64> {
        let p = ptr.as_ptr() as u64;
        let base = self.base();
        if p < base || p >= self.section.as_ptr() as u64 + self.section.len() as u64 {
            bail!(InvalidArgument, "pointer {p:#x} is not inside heap {:?}", self.name());
        }
        Ok(p - base)
    }

    /// Frees memory returned by this heap. Fails with `InvalidArgument` for a pointer that is
    /// not a live block of this heap (including a double free).
    ///
    /// # Safety
    /// No process may use the memory after this call (as with `free(3)`).
    #[inline]
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<()> {
        // The common case first: a block of a cached class into this thread's stock (no
        // guarded block in the heap, so this one is not one either). Anything else, and any
        // check that fails, goes the whole way.
        let off = (ptr.as_ptr() as u64).wrapping_sub(self.base());
        // Relaxed: see `guard::recognise`.
        if off < self.section.len() as u64 - AREA_OFFSET
            && self.shared().guarded_blocks().load(Ordering::Relaxed) == 0
            && cache::free_fast(&self.cache_ref(), off)
        {
            return Ok(());
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.free_slow(ptr) }
    }

    /// [`free`](Heap::free) when the block did not go into the thread's stock.
    ///
    /// # Safety
    /// As for [`free`](Heap::free).
    #[inline(never)]
    unsafe fn free_slow(&self, ptr: NonNull<u8>) -> Result<()> {
        let off = self.offset_of(ptr)?;
        if self.guarded(off).is_some() {
            return guard::free(&self.lock()?, off, self.name());
        }
        cache::free(&self.cache_ref(), off)
    }

    /// Resizes an allocation, in place when it can, else by moving it (the old block is freed).
    ///
    /// # Safety
    /// `ptr` must come from this heap; after success no process may use the old pointer unless
    /// it equals the new one.
    pub unsafe fn realloc(&self, ptr: NonNull<u8>, new_size: usize) -> Result<NonNull<u8>> {
        let off = self.offset_of(ptr)?;
        let locked = self.lock()?;
        let t = locked.tlsf();
        let old = if let Some(g) = self.guarded(off) {
            // A guarded block always moves (its end is pinned to its guard page).
            g.size
        } else {
            if t.resize_in_place(off, new_size as u64).map_err(|e| map_tlsf(e, self.name()))? {
                return Ok(ptr);
            }
            t.usable_size(off).map_err(|e| map_tlsf(e, self.name()))?
        };
        drop(locked);
        let layout =
            Layout::from_size_align(new_size, 16).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let new = self.alloc(layout)?;
        // SAFETY: both are live allocations of this heap, distinct blocks, each at least
        // `min(old, new_size)` bytes.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), (old as usize).min(new_size)) };
        // SAFETY: forwarded from the caller.
        unsafe { self.free(ptr)? };
        Ok(new)
    }

    /// Usable bytes of an allocation.
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Result<usize> {
        let off = self.offset_of(ptr)?;
        if let Some(g) = self.guarded(off) {
            return Ok(g.size as usize);
        }
        let locked = self.lock()?;
        locked.tlsf().usable_size(off).map(|s| s as usize).map_err(|e| map_tlsf(e, self.name()))
    }

    /// Gives free space at the end of the heap back to the system (decommits it for every
    /// process), keeping at least the initial commit. Returns the bytes given back: 0 where the
    /// platform frees a section's memory only with the whole section (Wine), and
    /// [`Heap::trim_report`] says why.
    pub fn trim(&self) -> Result<u64> {
        self.trim_report().map(|(given_back, _)| given_back)
    }

    /// [`Heap::trim`], with the reason nothing was given back where the platform cannot
    /// decommit: `(bytes, None)`, or `(0, Some(error))` with an [`ErrorKind::Unsupported`]
    /// error. The heap is trimmed either way (its free space at the end stays usable and is
    /// committed again as it grows); only the memory stays with the section.
    pub fn trim_report(&self) -> Result<(u64, Option<Error>)> {
        cache::release_all(&self.cache_ref())?;
        let locked = self.lock()?;
        match locked.trim(self.name())? {
            Some((at, len)) => {
                // Whole pages of the section's size only (huge pages on hugetlbfs): the
                // partial page at `at` stays committed.
                let page = self.section.page_size();
                let start = at.next_multiple_of(page);
                let end = at + len;
                if start >= end {
                    return Ok((0, None));
                }
                match self.section.decommit(start, end - start) {
                    Ok(()) => Ok((end - start, None)),
                    Err(e) if e.kind() == ErrorKind::Unsupported => Ok((0, Some(e))),
                    Err(e) => Err(e),
                }
            }
            None => Ok((0, None)),
        }
    }

    /// Re-initialises the heap: every block is freed, every named object forgotten, every
    /// thread cache of every process invalidated (the classic `force_init`).
    ///
    /// # Safety
    /// No process may use any block or named object of this heap afterwards.
    pub unsafe fn reset(&self) -> Result<()> {
        self.lock()?.reset(self.name())
    }

    /// Statistics.
    pub fn stats(&self) -> Result<HeapStats> {
        Ok(self.lock()?.stats())
    }

    /// Walks every block and checks every invariant; returns the first violation.
    pub fn check(&self) -> Result<()> {
        let locked = self.lock()?;
        locked.check(self.name())
    }

    /// The block map (at most `limit` blocks), offsets relative to the block area.
    pub fn dump(&self, limit: usize) -> Result<Vec<BlockInfo>> {
        let locked = self.lock()?;
        locked.tlsf().blocks(limit).map_err(|e| map_tlsf(e, self.name()))
    }
}

impl Locked<'_> {
    fn cache_ref(&self) -> cache::HeapRef<'_> {
        cache::HeapRef { shared: self.shared, section: self.section, mapped: self.mapped, handle: None }
    }

    /// [`Heap::stats`], under the lock.
    pub(crate) fn stats(&self) -> HeapStats {
        let mut blocks = self.tlsf().stats();
        let (cached_blocks, cached_bytes) = cache::parked(&self.cache_ref(), self);
        blocks.used_blocks = blocks.used_blocks.saturating_sub(cached_blocks);
        blocks.used_bytes = blocks.used_bytes.saturating_sub(cached_bytes);
        let s = self.shared;
        let largest_block = blocks.largest_free.saturating_add(if blocks.free_blocks > 0 { tlsf::HEADER } else { 0 });
        let frag = if blocks.free_bytes == 0 { 0.0 } else { 1.0 - largest_block as f64 / blocks.free_bytes as f64 };
        // Relaxed: read under the lock.
        HeapStats {
            reserved: s.reserved.load(Ordering::Relaxed),
            committed: s.committed.load(Ordering::Relaxed),
            blocks,
            cached_blocks,
            cached_bytes,
            recoveries: s.recoveries.load(Ordering::Relaxed),
            fragmentation: frag.max(0.0),
        }
    }

    /// Shrinks the allocator's area to its last used block (keeping at least the initial
    /// commit) and records the new commit; returns the range to decommit, if any. The caller
    /// gave the thread caches' stocks back first.
    pub(crate) fn trim(&self, heap: &str) -> Result<Option<(u64, u64)>> {
        let s = self.shared;
        let committed = committed_checked(s, self.mapped, heap)?;
        let floor = INITIAL_COMMIT.max(MIN_HEAP).min(committed) - AREA_OFFSET;
        let cap = self.tlsf().shrink(floor).map_err(|e| map_tlsf(e, heap))?;
        let new_committed = (AREA_OFFSET + cap).next_multiple_of(4096);
        if new_committed >= committed {
            return Ok(None);
        }
        // Relaxed: under the lock; the area no longer reaches past `new_committed`.
        s.committed.store(new_committed, Ordering::Relaxed);
        Ok(Some((new_committed, committed - new_committed)))
    }

    /// [`Heap::reset`], under the lock.
    pub(crate) fn reset(&self, heap: &str) -> Result<()> {
        let s = self.shared;
        let committed = committed_checked(s, self.mapped, heap)?;
        self.tlsf().init(committed - AREA_OFFSET).map_err(|e| map_tlsf(e, heap))?;
        named::forget_all(&s.names);
        cache::forget_all(s);
        // A new instance: thread caches made for the old contents are never used again.
        // Relaxed: under the lock.
        s.instance.store(s.instance.load(Ordering::Relaxed).wrapping_add(2) | 1, Ordering::Relaxed);
        Ok(())
    }

    /// Every check `Heap::check` makes: the header's sizes, the block chain, the named-object
    /// table and the thread caches' slots and stores.
    pub(crate) fn check(&self, heap: &str) -> Result<()> {
        let wrap = |e: Error| {
            Error::new(
                ErrorKind::Corrupt,
                format!("heap {heap:?} is corrupt: {e}; `shmgadget heap {heap} --check` reports it"),
            )
        };
        committed_checked(self.shared, self.mapped, heap)?;
        self.tlsf().check().map_err(|e| map_tlsf(e, heap))?;
        self.check_named().map_err(wrap)?;
        cache::check(self).map_err(wrap)
    }
}

impl std::fmt::Debug for Heap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heap").field("name", &self.name()).field("addr", &self.section.as_ptr()).finish()
    }
}
