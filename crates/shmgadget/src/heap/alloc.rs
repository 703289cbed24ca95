//! Rust collections in shared memory: an allocator that works from any process.
//!
//! [`ShmAlloc`] is the address of a heap section, nothing else: 8 bytes, `Copy`, and valid in
//! every process of the domain because the heap is at the same address everywhere. It
//! implements allocator-api2 0.2's `Allocator` (the version hashbrown uses), so
//! `allocator_api2::vec::Vec<T, ShmAlloc>` ([`ShmVec`]) and `Box<T, ShmAlloc>` ([`ShmBox`])
//! keep their buffers in the heap, and a collection stored in shared memory can be grown or
//! dropped by whichever process holds it (behind a shared [`Mutex`](crate::sync::Mutex), see
//! [`Heap::find_or_init_mutex`]).
//!
//! Each call validates the heap's header, takes the heap's robust lock, and when the heap must
//! grow opens its section through this process's attachment (first touch maps the heap if this
//! process never opened it; in eager mode, map it first). Allocation failure is reported, never
//! an abort: use [`ShmVecExt::try_push`] / `try_reserve`, because `push` would abort the process
//! while other processes wait on the collection's lock.

use std::alloc::Layout;
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use super::{AREA_OFFSET, HeapShared, Locked, MIN_HEAP};
use crate::error::{Error, ErrorKind, Result};
use crate::heap::Heap;

/// An allocator over a shared heap, usable from every process of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct ShmAlloc {
    section: u64,
}

/// A vector whose buffer lives in a shared heap.
pub type ShmVec<T> = allocator_api2::vec::Vec<T, ShmAlloc>;
/// A box whose value lives in a shared heap.
pub type ShmBox<T> = allocator_api2::boxed::Box<T, ShmAlloc>;

// SAFETY: the vector's pointer, length and capacity point into the same heap (same address in
// every process) and its allocator is just that address; elements are ShmSafe themselves.
unsafe impl<T: crate::ShmSafe> crate::ShmSafe for ShmVec<T> {}
// SAFETY: as above, for a single value.
unsafe impl<T: crate::ShmSafe> crate::ShmSafe for ShmBox<T> {}
// SAFETY: an address of a heap in the domain's window, no process-local state.
unsafe impl crate::ShmSafe for ShmAlloc {}

impl Heap {
    /// An allocator for this heap, to build collections that live in it.
    pub fn allocator(&self) -> ShmAlloc {
        ShmAlloc { section: self.section().as_ptr() as u64 }
    }
}

impl ShmAlloc {
    fn shared(&self) -> Result<&HeapShared> {
        // An eager process may never have mapped this heap (the allocator can come from shared
        // memory): map it first. One relaxed load when no eager domain is attached.
        crate::domain::map_for_address(self.section as usize, size_of::<HeapShared>())?;
        // SAFETY: `section` came from a live `Heap` (or a copy of such a ShmAlloc stored in
        // shared memory): the start of a heap section in an attached domain's window, page-
        // aligned, at least MIN_HEAP bytes (checked when that heap was created or opened),
        // mapped in this process (just above, in eager mode) or mapped on first touch by the
        // fault handler. The one header check runs before the reference is formed.
        let shared = unsafe { crate::header::validate::<HeapShared>(self.section as *const u8, MIN_HEAP) }
            .map_err(|m| Error::new(ErrorKind::Corrupt, format!("no valid heap at {:#x}: {m}", self.section)))?;
        Ok(shared)
    }

    /// Locks the heap; `mapped` is its section's length (`u64::MAX` when unknown: then the
    /// header's `reserved`, checked when the heap was opened, bounds the area).
    fn lock(&self, mapped: u64) -> Result<Locked<'_>> {
        let shared = self.shared()?;
        // SAFETY: `shared` is the control block at the start of this heap section, which stays
        // mapped while the domain is attached (a collection's user holds the attachment).
        unsafe { Locked::acquire(shared, self.section as *mut u8, mapped, "(heap)") }
    }

    /// The heap for the cache; `mapped` as for [`lock`](ShmAlloc::lock).
    fn cache_ref(&self, mapped: u64) -> Result<super::cache::HeapRef<'_>> {
        Ok(super::cache::HeapRef { shared: self.shared()?, section: self.section as *mut u8, mapped, handle: None })
    }

    fn commit(&self, len: u64) -> Result<()> {
        crate::section::section_at(self.section as usize)?.commit(len)
    }

    /// Allocates like [`Heap::alloc`], returning errors instead of `AllocError`.
    pub fn try_alloc(&self, layout: Layout) -> Result<NonNull<u8>> {
        // The length is not known from the address alone (see `lock`).
        let h = self.cache_ref(u64::MAX)?;
        let off = super::cache::alloc(&h, layout.size() as u64, layout.align() as u64, &mut |len| self.commit(len))?;
        Ok(NonNull::new((self.section + AREA_OFFSET + off) as *mut u8).expect("heap addresses are never null"))
    }
}

impl Heap {
    /// Resizes like [`Heap::realloc`], but a block of a size the thread caches serve (up to
    /// 4 KiB) never takes the heap lock: if `new_size` still fits it and needs at least half of
    /// it, the block stays; otherwise the contents move to a block from this thread's cache
    /// and the old block goes into the cache. Larger blocks go through [`Heap::realloc`].
    ///
    /// # Safety
    /// As for [`Heap::realloc`]: `ptr` must come from this heap; after success no process may
    /// use the old pointer unless it equals the new one.
    pub unsafe fn realloc_cached(&self, ptr: NonNull<u8>, new_size: usize) -> Result<NonNull<u8>> {
        let new = new_size as u64;
        if new == 0 || new > super::cache::MAX_CACHED {
            // SAFETY: forwarded from the caller.
            return unsafe { self.realloc(ptr, new_size) };
        }
        let off = self.offset_of(ptr)?;
        if self.guarded(off).is_some() {
            // SAFETY: forwarded from the caller.
            return unsafe { self.realloc(ptr, new_size) };
        }
        let shared = self.shared();
        // SAFETY: the block area starts AREA_OFFSET into this mapped section (as for
        // `Locked::tlsf`). Without the lock we only call `cache_probe`, which the allocator
        // documents as safe to run concurrently on a used block the caller owns.
        let t = unsafe {
            super::tlsf::Tlsf::new(
                &shared.tlsf,
                self.section().as_ptr().add(AREA_OFFSET as usize),
                super::area_limit(shared, self.section().len() as u64),
            )
        };
        let max = super::cache::MAX_CACHED + super::cache::MAX_CACHED / 4;
        // The common case without error text; any failed check takes the full probe's verdict.
        let probed = match t.cache_probe_fast(off) {
            Some(usable) => (usable <= max).then_some(usable),
            None => t.cache_probe(off, max).map_err(|e| super::map_tlsf(e, self.name()))?,
        };
        let Some(usable) = probed else {
            // SAFETY: forwarded from the caller.
            return unsafe { self.realloc(ptr, new_size) };
        };
        if new <= usable && new >= usable / 2 {
            return Ok(ptr);
        }
        let layout =
            Layout::from_size_align(new_size, 16).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let moved = self.alloc(layout)?;
        // SAFETY: distinct live blocks of this heap, each at least min(usable, new) bytes.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), moved.as_ptr(), usable.min(new) as usize) };
        // SAFETY: the caller gives the old block up on success.
        unsafe { self.free(ptr)? };
        Ok(moved)
    }
}

impl ShmAlloc {
    /// The allocator of the heap holding `ptr`, found from the address alone, and the length of
    /// its section (which bounds the area even if the header's `reserved` was damaged).
    fn of(ptr: NonNull<u8>) -> Result<(ShmAlloc, u64)> {
        let (section, kind, len) = crate::domain::section_covering(ptr.as_ptr() as usize)?;
        if kind != crate::SectionKind::Heap {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{ptr:p} lies in a {} section, not a heap", kind.as_str()),
            ));
        }
        Ok((ShmAlloc { section }, len))
    }

    fn offset(&self, ptr: NonNull<u8>) -> u64 {
        (ptr.as_ptr() as u64).wrapping_sub(self.section + AREA_OFFSET)
    }
}

/// Frees a block of any heap of a domain attached by this process, found from its address
/// alone (the classic `shm_free`). A heap this process has not mapped yet is mapped first
/// (eager mode has no first-touch mapping). Errors for an address outside every heap, an
/// interior pointer, a double free, and a heap that cannot be mapped.
///
/// # Safety
/// No process may use the memory after this call.
pub unsafe fn free(ptr: NonNull<u8>) -> Result<()> {
    let (a, len) = ShmAlloc::of(ptr)?;
    let h = a.cache_ref(len)?;
    // Guard mode (`guard.rs`): a guarded block is freed whole, whoever allocated it.
    // SAFETY: `h` names a validated heap section mapped with `len` bytes.
    if unsafe { super::guard::recognise(h.shared, h.section, len, a.offset(ptr)) }.is_some() {
        return super::guard::free(&a.lock(len)?, a.offset(ptr), "(heap)");
    }
    super::cache::free(&h, a.offset(ptr))
}

/// Resizes a block of any heap of an attached domain, found from its address alone (the
/// classic `shm_realloc`): in place when possible, else moved (the old block is freed). The
/// heap is mapped first if this process has not mapped it yet.
///
/// # Safety
/// After success no process may use the old pointer unless it equals the new one.
pub unsafe fn realloc(ptr: NonNull<u8>, new_size: usize) -> Result<NonNull<u8>> {
    let (a, len) = ShmAlloc::of(ptr)?;
    let off = a.offset(ptr);
    let locked = a.lock(len)?;
    // SAFETY: `locked` holds a validated heap section mapped with `len` bytes.
    if unsafe { super::guard::recognise(locked.shared, locked.section, len, off) }.is_some() {
        // A guarded block moves (`Heap::realloc` does the same).
        drop(locked);
        let h = crate::section::section_at(a.section as usize).and_then(Heap::attach)?;
        // SAFETY: forwarded from the caller.
        return unsafe { h.realloc(ptr, new_size) };
    }
    let t = locked.tlsf();
    if t.resize_in_place(off, new_size as u64).map_err(|e| super::map_tlsf(e, "(heap)"))? {
        return Ok(ptr);
    }
    let old = t.usable_size(off).map_err(|e| super::map_tlsf(e, "(heap)"))? as usize;
    drop(locked);
    let layout =
        Layout::from_size_align(new_size, 16).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
    let new = a.try_alloc(layout)?;
    // SAFETY: distinct live blocks of the same heap, each at least min(old, new_size) bytes.
    unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), old.min(new_size)) };
    super::cache::free(&a.cache_ref(len)?, off)?;
    Ok(new)
}

// SAFETY: memory returned by `allocate` stays valid until `deallocate` (the heap's allocator
// hands each block out once, whatever process asks); every copy of a ShmAlloc names the same
// heap, so any copy may free what another allocated.
unsafe impl Allocator for ShmAlloc {
    fn allocate(&self, layout: Layout) -> std::result::Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            // A zero-size allocation needs no memory: an aligned dangling pointer, as the same
            // number in every process.
            let dangling = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let p = self.try_alloc(layout).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        let off = self.offset(ptr);
        if let Ok(h) = self.cache_ref(u64::MAX) {
            // A bad pointer here is a bug in the caller; the heap refuses it and stays intact.
            let _ = super::cache::free(&h, off);
        }
    }
}

/// Fallible growth for [`ShmVec`]: an allocation failure is an error, never an abort.
pub trait ShmVecExt<T> {
    /// Appends `value`, reserving room first; on failure the vector is unchanged and `value`
    /// is dropped.
    fn try_push(&mut self, value: T) -> Result<()>;
}

impl<T> ShmVecExt<T> for ShmVec<T> {
    fn try_push(&mut self, value: T) -> Result<()> {
        self.try_reserve(1).map_err(|e| {
            Error::new(ErrorKind::OutOfSpace, format!("cannot grow a shared vector of {} elements: {e:?}", self.len()))
        })?;
        // Cannot fail: room for one more was reserved just above.
        let _ = self.push_within_capacity(value);
        Ok(())
    }
}

/// The hasher of every [`ShmHashMap`]: foldhash with a fixed seed (one `u64`), because a
/// per-process random seed would hash the same key differently in each process.
pub type ShmHasher = foldhash::fast::FixedState;
const HASH_SEED: u64 = u64::from_le_bytes(*b"SHMGADGT");

/// A hash map whose table lives in a shared heap (hashbrown, pinned, with [`ShmHasher`]).
///
/// It never has capacity 0: hashbrown's empty table points at a static in the creating
/// binary, a different address in each process. So it is created with [`try_new_in`]
/// (at least one slot), grows only through [`try_insert`] (an allocation failure is an error,
/// never an abort), and offers no way to shrink.
///
/// [`try_new_in`]: ShmHashMap::try_new_in
/// [`try_insert`]: ShmHashMap::try_insert
pub struct ShmHashMap<K, V> {
    map: hashbrown::HashMap<K, V, ShmHasher, ShmAlloc>,
}

// SAFETY: the table is allocated from the shared heap (same address everywhere), the hasher is
// a u64 and the allocator a heap address; keys and values are ShmSafe themselves.
unsafe impl<K: crate::ShmSafe, V: crate::ShmSafe> crate::ShmSafe for ShmHashMap<K, V> {}

impl<K: Eq + std::hash::Hash, V> ShmHashMap<K, V> {
    /// A map in `alloc`'s heap with room for at least `capacity` (minimum 1) entries.
    pub fn try_new_in(alloc: ShmAlloc, capacity: usize) -> Result<Self> {
        let mut map = hashbrown::HashMap::with_hasher_in(ShmHasher::with_seed(HASH_SEED), alloc);
        map.try_reserve(capacity.max(1)).map_err(|e| {
            Error::new(
                ErrorKind::OutOfSpace,
                format!("cannot allocate a shared hash map for {capacity} entries: {e:?}"),
            )
        })?;
        Ok(ShmHashMap { map })
    }

    /// Inserts, returning the previous value; on allocation failure the map is unchanged.
    pub fn try_insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        self.map.try_reserve(1).map_err(|e| {
            Error::new(ErrorKind::OutOfSpace, format!("cannot grow a shared hash map of {} entries: {e:?}", self.len()))
        })?;
        Ok(self.map.insert(key, value))
    }

    /// The value for `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// The value for `key`, mutably.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Removes `key`, returning its value (the table keeps its capacity).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries in arbitrary order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    /// Removes every entry, keeping the capacity.
    pub fn clear(&mut self) {
        self.map.clear()
    }
}

/// A UTF-8 string whose bytes live in a shared heap. Grows only fallibly
/// ([`try_push_str`](ShmString::try_push_str)), like every shared collection.
pub struct ShmString {
    bytes: ShmVec<u8>,
}

// SAFETY: a ShmVec<u8> (see its impl) that this type only ever appends UTF-8 to.
unsafe impl crate::ShmSafe for ShmString {}

impl ShmString {
    /// An empty string in `alloc`'s heap (no allocation yet).
    pub fn new_in(alloc: ShmAlloc) -> Self {
        ShmString { bytes: ShmVec::new_in(alloc) }
    }

    /// A copy of `s` in `alloc`'s heap.
    pub fn try_from_str_in(s: &str, alloc: ShmAlloc) -> Result<Self> {
        let mut out = ShmString::new_in(alloc);
        out.try_push_str(s)?;
        Ok(out)
    }

    /// Appends `s`; on allocation failure the string is unchanged.
    pub fn try_push_str(&mut self, s: &str) -> Result<()> {
        self.bytes.try_reserve(s.len()).map_err(|e| {
            Error::new(
                ErrorKind::OutOfSpace,
                format!("cannot grow a shared string of {} bytes by {}: {e:?}", self.len(), s.len()),
            )
        })?;
        self.bytes.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// Appends `c`; on allocation failure the string is unchanged.
    pub fn try_push(&mut self, c: char) -> Result<()> {
        self.try_push_str(c.encode_utf8(&mut [0; 4]))
    }

    /// The text. Bytes that are not UTF-8 (possible only if the heap was overwritten from
    /// outside this API) read as U+FFFD rather than causing undefined behaviour.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes).unwrap_or("\u{FFFD}")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Empties it, keeping the capacity.
    pub fn clear(&mut self) {
        self.bytes.clear()
    }
}

impl std::fmt::Display for ShmString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ShmString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for ShmString {
    fn eq(&self, other: &str) -> bool {
        self.bytes.as_slice() == other.as_bytes()
    }
}

impl PartialEq<&str> for ShmString {
    fn eq(&self, other: &&str) -> bool {
        self.bytes.as_slice() == other.as_bytes()
    }
}
