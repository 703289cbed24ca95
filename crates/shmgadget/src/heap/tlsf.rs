//! A two-level segregated-fit (TLSF) allocator over a plain byte range: O(1) allocation and
//! free, every block walkable, every invariant checkable, and repairable after a crash.
//!
//! It knows nothing of sections or processes: it is given a control block ([`TlsfControl`])
//! and a block area (base address + capacity), both of which may live in shared memory, and
//! the caller serialises all calls (the heap holds a robust lock). Everything it stores is an
//! *offset* from the block area's base, so it is position-independent and every offset read
//! back is bounds-checked before use: a corrupt heap is an error, never undefined behaviour.
//!
//! # Block layout
//! ```text
//! offset o      prev_size   u64   size of the physically previous block (maintained always)
//! offset o+8    size_flags  u64   TAG (bits 48..64) | size (multiple of 16) | PREV_FREE | FREE
//! offset o+16   payload           (free blocks: next_free u64, prev_free u64; NIL = u64::MAX)
//! ```
//! Sizes include the 16-byte header, so the overhead is 16 bytes per block. The area ends with
//! a 16-byte sentinel header (size 0, used) that stops coalescing. The tag makes a pointer
//! that is not a block's payload (or a block trampled by a buffer overrun) recognisable.
//!
//! One exception to "the lock holder does everything": the `CACHED` flag of a *used* block is
//! set and cleared by the thread cache that parks the block ([`Tlsf::cache_mark`],
//! [`Tlsf::cache_unmark`]) without the lock. So the allocator changes the flags of a used
//! neighbour only with atomic read-modify-writes (`update_flags`), never by rewriting its header.
//!
//! # Free lists
//! Free blocks are kept in `FL_COUNT × SL_COUNT` doubly linked lists by size class, with a
//! first-level bitmap and one second-level bitmap per first level, as in Masmano et al.'s TLSF:
//! sizes below 256 bytes have one class per 16 bytes; above, each power of two is split into 16
//! classes. Allocation rounds the request up to the next class boundary, so the first block of
//! the first non-empty class at or above it always fits.
//!
//! # Crash consistency
//! A process may die at any instruction while it holds the heap lock. The only structure the
//! recovery trusts is the chain of block sizes from offset 0 to the sentinel, and every update
//! keeps that chain walkable: a split writes the new remainder's header before it shrinks the
//! block (Release store), a merge is a single store of the grown size, growth writes the new
//! sentinel and the capacity before turning the old sentinel into a block. [`Tlsf::recover`]
//! walks the chain, recomputes `prev_size` and `PREV_FREE`, merges neighbouring free blocks and
//! rebuilds the lists, bitmaps and statistics. A block a dead process was in the middle of
//! allocating is either still free or allocated (then it belongs to no one: a leak, never a
//! block handed out twice); a block it was freeing is either still used or free.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Payload alignment of every block, and granularity of sizes.
pub const ALIGN: u64 = 16;
/// Bytes of header per block.
pub const HEADER: u64 = 16;
/// Smallest block (header + room for the two free-list links).
pub const MIN_BLOCK: u64 = 32;
/// Largest alignment `alloc` accepts.
pub const MAX_ALIGN: u64 = 4096;
/// Largest block size representable (sizes live in 48 bits).
pub const MAX_BLOCK: u64 = (1 << 47) - ALIGN;

const SL_LOG: u32 = 4;
const SL_COUNT: usize = 1 << SL_LOG;
const SMALL: u64 = 256;
/// First-level classes: index 0 for sizes below 256, then one per power of two up to 2^47.
pub(crate) const FL_COUNT: usize = 40;

const FREE: u64 = 1;
const PREV_FREE: u64 = 2;
/// A used block parked in a thread cache of the heap (see `heap/cache.rs`): not free for the
/// allocator, not owned by the application. Set and cleared without the lock, atomically.
const CACHED: u64 = 4;
const FLAG_MASK: u64 = 0xF;
const TAG: u64 = 0xB10C << 48;
const TAG_MASK: u64 = 0xFFFF << 48;
const SIZE_MASK: u64 = !TAG_MASK & !FLAG_MASK;
const NIL: u64 = u64::MAX;

/// The allocator's bookkeeping, kept next to the block area (in shared memory for a heap).
/// Only the lock holder writes it; fields are atomics so an inspector that copies them out
/// without the lock reads stale numbers, never undefined behaviour.
#[repr(C)]
pub struct TlsfControl {
    capacity: AtomicU64,
    fl_bitmap: AtomicU64,
    used_bytes: AtomicU64,
    used_blocks: AtomicU64,
    free_bytes: AtomicU64,
    free_blocks: AtomicU64,
    allocs: AtomicU64,
    frees: AtomicU64,
    sl_bitmap: [AtomicU32; FL_COUNT],
    heads: [[AtomicU64; SL_COUNT]; FL_COUNT],
}

const _: () = assert!(size_of::<TlsfControl>() == 64 + 4 * FL_COUNT + 8 * SL_COUNT * FL_COUNT);

/// What went wrong inside the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsfError {
    /// No free block large enough.
    OutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// The largest request (16-byte alignment) that would succeed now: 0 if none would.
        largest_request: u64,
    },
    /// Size zero or too large, or an alignment that is not a power of two up to 4096.
    BadLayout(String),
    /// A pointer that is not the payload of a block of this heap.
    NotABlock(String),
    /// Freeing a block that is already free.
    DoubleFree(u64),
    /// An invariant does not hold: what was expected and what was found.
    Corrupt(String),
}

type R<T> = Result<T, TlsfError>;

fn corrupt<T>(msg: String) -> R<T> {
    Err(TlsfError::Corrupt(msg))
}

/// Statistics of the block area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsfStats {
    /// Bytes managed (the block area, sentinel included).
    pub capacity: u64,
    /// Bytes in used blocks, headers included.
    pub used_bytes: u64,
    /// Used blocks.
    pub used_blocks: u64,
    /// Bytes in free blocks, headers included.
    pub free_bytes: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Largest free block's payload.
    pub largest_free: u64,
    /// Allocations since creation (or the last recovery).
    pub allocs: u64,
    /// Frees since creation (or the last recovery).
    pub frees: u64,
}

/// One block, for dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockInfo {
    /// Offset of the header in the block area.
    pub offset: u64,
    /// Size including the header.
    pub size: u64,
    /// Whether it is free.
    pub free: bool,
    /// Whether it is parked in a thread cache (used for the allocator, free for the program).
    pub cached: bool,
}

/// A view of one allocator: its control block and block area. Every method requires the
/// caller to hold whatever lock serialises access to them.
pub struct Tlsf<'a> {
    ctl: &'a TlsfControl,
    base: *mut u8,
    /// Bytes from `base` that are valid memory (the mapped block area). The recorded capacity
    /// lives in shared memory and is checked against this before any access.
    limit: u64,
}

fn mapping(size: u64) -> (usize, usize) {
    if size < SMALL {
        (0, (size / ALIGN) as usize)
    } else {
        let log2 = 63 - size.leading_zeros();
        let sl = ((size >> (log2 - SL_LOG)) as usize) & (SL_COUNT - 1);
        ((log2 - 7) as usize, sl)
    }
}

/// The class to search so that any block found is at least `size`.
fn mapping_search(size: u64) -> (usize, usize) {
    if size < SMALL {
        mapping(size)
    } else {
        let log2 = 63 - size.leading_zeros();
        mapping(size + (1u64 << (log2 - SL_LOG)) - 1)
    }
}

impl<'a> Tlsf<'a> {
    /// A view of the allocator whose control block is `ctl` and whose block area starts at
    /// `base`.
    ///
    /// # Safety
    /// `base` must be 16-aligned and valid for reads and writes of `limit` bytes for `'a`
    /// (the recorded capacity is trusted only up to `limit`, so a damaged one is an error); those bytes and `ctl` must be accessed
    /// only through this allocator (or other `Tlsf` views under the same lock) while it is used,
    /// except for [`cache_mark`](Tlsf::cache_mark)/[`cache_unmark`](Tlsf::cache_unmark), which
    /// other threads may call on their own used blocks without the lock.
    #[inline]
    pub unsafe fn new(ctl: &'a TlsfControl, base: *mut u8, limit: u64) -> Self {
        Tlsf { ctl, base, limit }
    }

    #[inline]
    fn cap(&self) -> u64 {
        // Relaxed: written only by the lock holder, which is us.
        self.ctl.capacity.load(Ordering::Relaxed)
    }

    /// The recorded capacity, checked: a multiple of 16, room for one block and the sentinel,
    /// and inside the valid memory.
    fn valid_cap(&self) -> R<u64> {
        let cap = self.cap();
        if cap % ALIGN != 0 || cap < MIN_BLOCK + HEADER || cap > self.limit {
            return corrupt(format!(
                "the recorded capacity {cap:#x} is invalid: expected a multiple of 16 from 48 to the {:#x} bytes mapped",
                self.limit
            ));
        }
        Ok(cap)
    }

    /// The word at `off`, bounds-checked.
    fn word(&self, off: u64) -> R<&AtomicU64> {
        let end = self.cap().min(self.limit);
        if off % 8 != 0 || off.checked_add(8).is_none_or(|e| e > end) {
            return corrupt(format!("offset {off:#x} lies outside the block area of {end:#x} bytes"));
        }
        // SAFETY: `off + 8 <= limit` and `off` is 8-aligned, so the word lies inside the
        // valid memory that `new`'s contract guarantees; all access is atomic.
        Ok(unsafe { &*self.base.add(off as usize).cast::<AtomicU64>() })
    }

    fn get(&self, off: u64) -> R<u64> {
        // Relaxed: single-writer data under the caller's lock.
        Ok(self.word(off)?.load(Ordering::Relaxed))
    }

    fn set(&self, off: u64, v: u64) -> R<()> {
        // Relaxed: single writer; crash-ordering points use `commit_size`.
        self.word(off)?.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// Checks that `off`, read from memory another process may have damaged, can be a block
    /// offset: 16-aligned and inside the area (so `off + 24` cannot overflow either).
    fn in_area(&self, off: u64) -> R<u64> {
        let end = self.cap().min(self.limit);
        if off % ALIGN != 0 || off >= end {
            return corrupt(format!("block offset {off:#x} is not a 16-aligned offset inside the {end:#x}-byte area"));
        }
        Ok(off)
    }

    /// `link` (a free-list link or head) if it is NIL or a valid block offset.
    fn link(&self, link: u64) -> R<u64> {
        if link == NIL { Ok(NIL) } else { self.in_area(link) }
    }

    /// The size, flags and validity of the header at `off`.
    fn header(&self, off: u64) -> R<(u64, u64)> {
        let sf = self.get(self.in_area(off)? + 8)?;
        if sf & TAG_MASK != TAG {
            return corrupt(format!("block header at {off:#x} has tag {:#06x}, expected {:#06x}", sf >> 48, TAG >> 48));
        }
        Ok((sf & SIZE_MASK, sf & FLAG_MASK))
    }

    fn write_header(&self, off: u64, size: u64, flags: u64) -> R<()> {
        // Release: the crash-ordering point; everything written before (a remainder's header)
        // is in memory before the block's size changes.
        self.word(self.in_area(off)? + 8)?.store(TAG | size | flags, Ordering::Release);
        Ok(())
    }

    /// Sets then clears flag bits of the header at `off` with atomic read-modify-writes, so a
    /// concurrent `cache_mark`/`cache_unmark` of that block is never lost.
    fn update_flags(&self, off: u64, set: u64, clear: u64) -> R<()> {
        self.header(off)?;
        let w = self.word(off + 8)?;
        // Release: the header update is a crash-ordering point like `write_header`.
        if set != 0 {
            w.fetch_or(set, Ordering::Release);
        }
        if clear != 0 {
            w.fetch_and(!clear, Ordering::Release);
        }
        Ok(())
    }

    fn sentinel(&self) -> R<u64> {
        Ok(self.valid_cap()? - HEADER)
    }

    // ---------------------------------------------------------------- free lists

    fn head(&self, fl: usize, sl: usize) -> &AtomicU64 {
        &self.ctl.heads[fl][sl]
    }

    fn insert_free(&self, off: u64, size: u64) -> R<()> {
        let (fl, sl) = mapping(size);
        if fl >= FL_COUNT {
            return corrupt(format!("free block at {off:#x} has impossible size {size:#x}"));
        }
        // Relaxed (this function and the list code below): single writer under the lock.
        let first = self.link(self.head(fl, sl).load(Ordering::Relaxed))?;
        self.set(off + 16, first)?;
        self.set(off + 24, NIL)?;
        if first != NIL {
            self.set(first + 24, off)?;
        }
        self.head(fl, sl).store(off, Ordering::Relaxed);
        self.ctl.fl_bitmap.fetch_or(1 << fl, Ordering::Relaxed);
        self.ctl.sl_bitmap[fl].fetch_or(1 << sl, Ordering::Relaxed);
        Ok(())
    }

    fn remove_free(&self, off: u64, size: u64) -> R<()> {
        let (fl, sl) = mapping(size);
        if fl >= FL_COUNT {
            return corrupt(format!("free block at {off:#x} has impossible size {size:#x}"));
        }
        let next = self.link(self.get(self.in_area(off)? + 16)?)?;
        let prev = self.link(self.get(off + 24)?)?;
        if prev == NIL {
            // Relaxed: single writer under the lock.
            if self.head(fl, sl).load(Ordering::Relaxed) != off {
                return corrupt(format!("free block at {off:#x} has no predecessor but is not the head of its list"));
            }
            self.head(fl, sl).store(next, Ordering::Relaxed);
            if next == NIL {
                let remaining = self.ctl.sl_bitmap[fl].fetch_and(!(1 << sl), Ordering::Relaxed) & !(1 << sl);
                if remaining == 0 {
                    self.ctl.fl_bitmap.fetch_and(!(1 << fl), Ordering::Relaxed);
                }
            }
        } else {
            self.set(prev + 16, next)?;
        }
        if next != NIL {
            self.set(next + 24, prev)?;
        }
        Ok(())
    }

    fn find_suitable(&self, size: u64) -> Option<(u64, u64)> {
        let (mut fl, sl) = mapping_search(size);
        if fl >= FL_COUNT {
            return None;
        }
        // Relaxed: single writer under the lock.
        let mut sl_map = self.ctl.sl_bitmap[fl].load(Ordering::Relaxed) & (!0u32 << sl);
        if sl_map == 0 {
            let fl_map = self.ctl.fl_bitmap.load(Ordering::Relaxed) & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
            if fl_map == 0 {
                return None;
            }
            fl = fl_map.trailing_zeros() as usize;
            if fl >= FL_COUNT {
                return None;
            }
            sl_map = self.ctl.sl_bitmap[fl].load(Ordering::Relaxed);
        }
        let sl = sl_map.trailing_zeros() as usize;
        if sl >= SL_COUNT {
            return None;
        }
        let off = self.head(fl, sl).load(Ordering::Relaxed);
        let (bsize, _) = self.header(off).ok()?;
        Some((off, bsize))
    }

    // ---------------------------------------------------------------- public operations

    /// Lays out an empty area of `capacity` bytes: one free block and the sentinel.
    pub fn init(&self, capacity: u64) -> R<()> {
        if capacity % ALIGN != 0 || capacity < MIN_BLOCK + HEADER || capacity - HEADER > MAX_BLOCK {
            return Err(TlsfError::BadLayout(format!("capacity {capacity} must be a multiple of 16 from 48 to 2^47")));
        }
        if capacity > self.limit {
            return Err(TlsfError::BadLayout(format!("capacity {capacity} exceeds the {} bytes mapped", self.limit)));
        }
        let c = self.ctl;
        // Relaxed (init): nobody else sees the allocator before the caller publishes it.
        c.capacity.store(capacity, Ordering::Relaxed);
        c.fl_bitmap.store(0, Ordering::Relaxed);
        for fl in 0..FL_COUNT {
            c.sl_bitmap[fl].store(0, Ordering::Relaxed);
            for sl in 0..SL_COUNT {
                c.heads[fl][sl].store(NIL, Ordering::Relaxed);
            }
        }
        for w in [&c.used_bytes, &c.used_blocks, &c.free_bytes, &c.free_blocks, &c.allocs, &c.frees] {
            w.store(0, Ordering::Relaxed);
        }
        let first = capacity - HEADER;
        self.set(0, 0)?;
        self.write_header(0, first, FREE)?;
        self.set(first, first)?;
        self.write_header(first, 0, PREV_FREE)?;
        self.insert_free(0, first)?;
        c.free_bytes.store(first, Ordering::Relaxed);
        c.free_blocks.store(1, Ordering::Relaxed);
        Ok(())
    }

    /// Allocates `size` bytes aligned to `align` (a power of two up to 4096); returns the
    /// payload's offset in the block area.
    pub fn alloc(&self, size: u64, align: u64) -> R<u64> {
        if size == 0 || size > MAX_BLOCK - HEADER || !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(TlsfError::BadLayout(format!(
                "size {size} / alignment {align}: expected a size from 1 to {} and a power-of-two alignment up to {MAX_ALIGN}",
                MAX_BLOCK - HEADER
            )));
        }
        let block = (size.max(ALIGN) + HEADER).next_multiple_of(ALIGN);
        let need = if align <= ALIGN { block } else { block + align + MIN_BLOCK };
        let Some((mut off, mut bsize)) = self.find_suitable(need) else {
            return Err(TlsfError::OutOfMemory { requested: size, largest_request: self.largest_request() });
        };
        if bsize < need {
            return corrupt(format!("free block at {off:#x} of {bsize} bytes is in a class for at least {need}"));
        }
        self.remove_free(off, bsize)?;
        let (_, flags) = self.header(off)?;
        let prev_free_flag = flags & PREV_FREE;
        if align > ALIGN {
            // Split off a leading free block so the payload lands on the alignment.
            let base = self.base as u64;
            let mut payload = (base + off + HEADER).next_multiple_of(align) - base;
            while payload - HEADER != off && payload - HEADER - off < MIN_BLOCK {
                payload += align;
            }
            let lead = payload - HEADER - off;
            if lead > 0 {
                let rest = bsize - lead;
                self.set(off + lead, lead)?;
                self.write_header(off + lead, rest, FREE | PREV_FREE)?;
                self.write_header(off, lead, FREE | prev_free_flag)?;
                self.set(off + bsize, rest)?;
                self.insert_free(off, lead)?;
                off += lead;
                bsize = rest;
                self.add_free_stats(1);
            }
        }
        // Split off the tail if it can hold a block.
        let prev_flag = if off == 0 { 0 } else { self.header(off)?.1 & PREV_FREE };
        if bsize - block >= MIN_BLOCK {
            let rest = bsize - block;
            let tail = off + block;
            self.set(tail, block)?;
            self.write_header(tail, rest, FREE)?; // next to a used block
            self.write_header(off, block, prev_flag)?; // commit: now used, shrunk
            let after = tail + rest;
            self.set(after, rest)?;
            self.update_flags(after, PREV_FREE, 0)?;
            self.insert_free(tail, rest)?;
            bsize = block;
        } else {
            self.write_header(off, bsize, prev_flag)?; // commit: now used
            self.update_flags(off + bsize, 0, PREV_FREE)?;
            self.add_free_stats(-1);
        }
        let c = self.ctl;
        // Relaxed: statistics, single writer under the lock.
        c.used_bytes.fetch_add(bsize, Ordering::Relaxed);
        c.used_blocks.fetch_add(1, Ordering::Relaxed);
        c.free_bytes.fetch_sub(bsize, Ordering::Relaxed);
        c.allocs.fetch_add(1, Ordering::Relaxed);
        Ok(off + HEADER)
    }

    fn add_free_stats(&self, blocks: i64) {
        // Relaxed: statistics, single writer under the lock.
        if blocks >= 0 {
            self.ctl.free_blocks.fetch_add(blocks as u64, Ordering::Relaxed);
        } else {
            self.ctl.free_blocks.fetch_sub(blocks.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// The used block whose payload starts at `payload`, validated.
    fn used_block(&self, payload: u64) -> R<(u64, u64, u64)> {
        let (off, size, flags) = self.chained_block(payload)?;
        if flags & (FREE | CACHED) != 0 {
            return Err(TlsfError::DoubleFree(payload));
        }
        Ok((off, size, flags))
    }

    /// The block whose payload starts at `payload`, whatever its flags: header offset, size
    /// and flags, validated (tag, size, chaining to the next block's back size).
    fn chained_block(&self, payload: u64) -> R<(u64, u64, u64)> {
        let bad =
            |why: &str| Err(TlsfError::NotABlock(format!("offset {payload:#x} is not a block of this heap: {why}")));
        if payload % ALIGN != 0 || payload < HEADER || payload >= self.sentinel()? {
            return bad("outside the block area or misaligned");
        }
        let off = payload - HEADER;
        let Ok((size, flags)) = self.header(off) else { return bad("no block header there") };
        if size < MIN_BLOCK || off + size > self.sentinel()? || self.get(off + size).ok() != Some(size) {
            return bad("its header does not chain to the next block");
        }
        Ok((off, size, flags))
    }

    /// Carves a used block for `size` payload bytes off the end of the *parked* block at
    /// `payload` (a thread cache's chunk, see `heap/cache.rs`), which shrinks by as much and
    /// stays parked. Returns the new block's payload offset (a used block, not parked), or None
    /// when the chunk would keep less than a block. Crash ordering as for a split: the new
    /// header is written inside the chunk's payload (invisible to a walk of the chain), then the
    /// chunk's size shrinks (the commit point), then the successor's back size follows.
    pub fn carve(&self, payload: u64, size: u64) -> R<Option<u64>> {
        if size == 0 || size > MAX_BLOCK - HEADER {
            return Err(TlsfError::BadLayout(format!("size {size}")));
        }
        let (off, chunk, flags) = self.chained_block(payload)?;
        if flags & FREE != 0 || flags & CACHED == 0 {
            return Err(TlsfError::NotABlock(format!("block at {payload:#x} is not parked in a cache")));
        }
        let block = (size.max(ALIGN) + HEADER).next_multiple_of(ALIGN);
        if chunk < block + MIN_BLOCK {
            return Ok(None);
        }
        let rest = chunk - block;
        let tail = off + rest;
        self.set(tail, rest)?;
        self.write_header(tail, block, 0)?; // used, after a used block
        // The chunk's flags stay: CACHED is ours (we are its owner), PREV_FREE the lock
        // holder's (also us).
        self.write_header(off, rest, flags)?; // commit: the chunk shrinks, the block exists
        self.set(off + chunk, block)?;
        let c = self.ctl;
        // Relaxed: statistics, single writer under the lock.
        c.used_blocks.fetch_add(1, Ordering::Relaxed);
        c.allocs.fetch_add(1, Ordering::Relaxed);
        Ok(Some(tail + HEADER))
    }

    /// The usable size of the allocation at `payload`.
    pub fn usable_size(&self, payload: u64) -> R<u64> {
        Ok(self.used_block(payload)?.1 - HEADER)
    }

    /// Frees the allocation at `payload`, merging it with free neighbours.
    pub fn free(&self, payload: u64) -> R<()> {
        let (off, size, flags) = self.used_block(payload)?;
        let c = self.ctl;
        // Relaxed: statistics, single writer under the lock.
        c.used_bytes.fetch_sub(size, Ordering::Relaxed);
        c.used_blocks.fetch_sub(1, Ordering::Relaxed);
        c.free_bytes.fetch_add(size, Ordering::Relaxed);
        c.frees.fetch_add(1, Ordering::Relaxed);
        self.release(off, size, flags & PREV_FREE)
    }

    /// Turns `[off, off + size)` into a free block, merged with free neighbours, and lists
    /// it. The single store of the merged block's header is the commit point.
    fn release(&self, mut off: u64, mut size: u64, mut prev_flag: u64) -> R<()> {
        let next = off + size;
        let (nsize, nflags) = self.header(next)?;
        if nflags & FREE != 0 {
            self.remove_free(next, nsize)?;
            size += nsize;
            self.add_free_stats(-1);
        }
        if prev_flag != 0 {
            let psize = self.get(off)?;
            let prev = off.checked_sub(psize).filter(|_| psize >= MIN_BLOCK);
            let Some(prev) = prev else {
                return corrupt(format!("block at {off:#x} says its free predecessor has size {psize}"));
            };
            let (hsize, pflags) = self.header(prev)?;
            if hsize != psize || pflags & FREE == 0 {
                return corrupt(format!(
                    "block at {off:#x}: predecessor at {prev:#x} is {hsize} bytes, flags {pflags:#x}, expected {psize} and free"
                ));
            }
            self.remove_free(prev, psize)?;
            off = prev;
            size += psize;
            prev_flag = pflags & PREV_FREE;
            self.add_free_stats(-1);
        }
        self.write_header(off, size, FREE | prev_flag)?; // commit: one store
        let after = off + size;
        self.set(after, size)?;
        self.update_flags(after, PREV_FREE, 0)?;
        self.insert_free(off, size)?;
        self.add_free_stats(1);
        Ok(())
    }

    /// Validates the used block at `payload` for a thread cache and returns its usable size,
    /// or `Ok(None)` when it has more than `max_usable` bytes. Fails with `DoubleFree` if it is
    /// free or already parked.
    ///
    /// Unlike most methods this one (like [`cache_mark`](Tlsf::cache_mark) and
    /// [`cache_unmark`](Tlsf::cache_unmark)) may run **without the lock**, concurrently with the
    /// lock holder, on a block the caller owns: it reads the block's own header and its
    /// successor's back size, neither of which changes while the block is used.
    pub fn cache_probe(&self, payload: u64, max_usable: u64) -> R<Option<u64>> {
        let (_, size, _) = self.used_block(payload)?;
        Ok((size - HEADER <= max_usable).then_some(size - HEADER))
    }

    // ------------------------------------------------------------ thread caches' hot path
    //
    // The three functions below are the thread cache's common case: the same checks as
    // `used_block`, `cache_mark` and `cache_unmark`, with the area's bounds computed once and
    // no error text. Each answers `None`/`false` whenever any check fails (or the case is not
    // the common one); the caller then runs the full method, which gives the verdict and the
    // error. So a bad pointer or a damaged header costs a second look, never a missed check.

    /// The end of the sentinel's header, if the recorded capacity is valid (as `valid_cap`):
    /// every block header and back size below it lies in valid memory.
    #[inline]
    fn sentinel_fast(&self) -> Option<u64> {
        let cap = self.cap();
        (cap % ALIGN == 0 && cap >= MIN_BLOCK + HEADER && cap <= self.limit).then_some(cap - HEADER)
    }

    /// The header word of the block whose payload is at `payload`, if that is a 16-aligned
    /// payload offset below the sentinel.
    #[inline]
    fn header_word(&self, payload: u64, sentinel: u64) -> Option<&'a AtomicU64> {
        if payload % ALIGN != 0 || payload < HEADER || payload >= sentinel {
            return None;
        }
        // SAFETY: `payload - 8 + 8 <= sentinel < cap <= limit` (checked by the caller's
        // `sentinel_fast`) and 8-aligned: inside the valid memory of `new`'s contract; all
        // access is atomic.
        Some(unsafe { &*self.base.add(payload as usize - 8).cast::<AtomicU64>() })
    }

    /// [`cache_probe`](Tlsf::cache_probe)'s success case: the usable size of the used block at
    /// `payload` (tag, size, chaining to the next block's back size, neither free nor parked),
    /// `None` if anything is off. Callable without the lock, like `cache_probe`.
    #[inline]
    pub fn cache_probe_fast(&self, payload: u64) -> Option<u64> {
        self.probe_fast(payload).map(|(_, usable)| usable)
    }

    /// [`cache_probe_fast`](Tlsf::cache_probe_fast), also giving the block's header word, for
    /// [`mark_word`](Tlsf::mark_word) (so a free computes the bounds once).
    #[inline]
    pub fn probe_fast(&self, payload: u64) -> Option<(&'a AtomicU64, u64)> {
        let sentinel = self.sentinel_fast()?;
        // Relaxed: see `get`; the block is the caller's, its header does not change (but for
        // PREV_FREE, which this does not read).
        let w = self.header_word(payload, sentinel)?;
        let sf = w.load(Ordering::Relaxed);
        let (off, size) = (payload - HEADER, sf & SIZE_MASK);
        if sf & (TAG_MASK | FREE | CACHED) != TAG || size < MIN_BLOCK || size > sentinel - off {
            return None;
        }
        // SAFETY: `off + size <= sentinel`, so the word lies below `cap <= limit`; `size` is a
        // multiple of 16, so it is 8-aligned.
        let back = unsafe { &*self.base.add((off + size) as usize).cast::<AtomicU64>() };
        // Relaxed: as above (the successor's back size does not change while we are used).
        (back.load(Ordering::Relaxed) == size).then_some((w, size - HEADER))
    }

    /// [`cache_mark`](Tlsf::cache_mark)'s success case, on the header word `probe_fast` gave
    /// for the block: sets `CACHED` and returns true; false (nothing changed) if the block is
    /// not a used, unparked block.
    #[inline]
    pub fn mark_word(w: &AtomicU64) -> bool {
        // Relaxed: see `cache_mark`.
        let old = w.fetch_or(CACHED, Ordering::Relaxed);
        if old & (TAG_MASK | CACHED | FREE) != TAG {
            if old & CACHED == 0 {
                // Relaxed: see `cache_mark`.
                w.fetch_and(!CACHED, Ordering::Relaxed);
            }
            return false;
        }
        true
    }

    /// [`cache_unmark`](Tlsf::cache_unmark)'s success case: clears `CACHED` of the parked block
    /// at `payload` and returns true; false (nothing changed) if it is not a parked block.
    #[inline]
    pub fn cache_unmark_fast(&self, payload: u64) -> bool {
        let Some(w) = self.sentinel_fast().and_then(|s| self.header_word(payload, s)) else { return false };
        // Relaxed: see `cache_mark`.
        if w.load(Ordering::Relaxed) & (TAG_MASK | FREE | CACHED) != TAG | CACHED {
            return false;
        }
        // Relaxed: see `cache_mark`.
        w.fetch_and(!CACHED, Ordering::Relaxed);
        true
    }

    /// Marks the used block at `payload` as parked in a thread cache (sets `CACHED`, atomically;
    /// callable without the lock). Fails with `DoubleFree` if it is free or already parked.
    /// The caller validated the block with [`cache_probe`](Tlsf::cache_probe) (or allocated it).
    pub fn cache_mark(&self, payload: u64) -> R<()> {
        if payload % ALIGN != 0 || payload < HEADER {
            return Err(TlsfError::NotABlock(format!("offset {payload:#x} is not a block")));
        }
        let w = self.word(payload - HEADER + 8)?;
        // Relaxed: the bit itself is the only state; the cache's list orders the rest.
        let old = w.fetch_or(CACHED, Ordering::Relaxed);
        if old & (CACHED | FREE) != 0 || old & TAG_MASK != TAG {
            if old & CACHED == 0 {
                w.fetch_and(!CACHED, Ordering::Relaxed);
            }
            return Err(if old & TAG_MASK != TAG {
                TlsfError::NotABlock(format!("offset {payload:#x} has no block header"))
            } else {
                TlsfError::DoubleFree(payload)
            });
        }
        Ok(())
    }

    /// The size (header included) of the block whose payload is at `payload`, whatever its
    /// state; for statistics.
    pub fn block_size(&self, payload: u64) -> R<u64> {
        if payload % ALIGN != 0 || payload < HEADER || payload >= self.sentinel()? {
            return Err(TlsfError::NotABlock(format!("offset {payload:#x} is not a block")));
        }
        Ok(self.header(payload - HEADER)?.0)
    }

    /// Takes the block at `payload` back out of a thread cache (clears `CACHED`). Like
    /// [`cache_mark`](Tlsf::cache_mark), callable without the lock.
    pub fn cache_unmark(&self, payload: u64) -> R<()> {
        if payload % ALIGN != 0 || payload < HEADER || payload >= self.sentinel()? {
            return Err(TlsfError::NotABlock(format!("offset {payload:#x} is not a cached block")));
        }
        let (_, flags) = self.header(payload - HEADER)?;
        if flags & CACHED == 0 || flags & FREE != 0 {
            return Err(TlsfError::NotABlock(format!("block at {payload:#x} is not parked in a cache")));
        }
        // Relaxed: see `cache_mark`.
        self.word(payload - HEADER + 8)?.fetch_and(!CACHED, Ordering::Relaxed);
        Ok(())
    }

    /// Resizes the allocation at `payload` in place if it can (shrinking, or growing into a
    /// free successor); returns whether it did. The caller falls back to alloc+copy+free.
    pub fn resize_in_place(&self, payload: u64, new_size: u64) -> R<bool> {
        let (off, size, flags) = self.used_block(payload)?;
        if new_size == 0 || new_size > MAX_BLOCK - HEADER {
            return Err(TlsfError::BadLayout(format!("new size {new_size}")));
        }
        let want = (new_size.max(ALIGN) + HEADER).next_multiple_of(ALIGN);
        let next = off + size;
        let (nsize, nflags) = self.header(next)?;
        let avail = if nflags & FREE != 0 { size + nsize } else { size };
        if want > avail {
            return Ok(false);
        }
        if want <= size && size - want < MIN_BLOCK {
            return Ok(true); // shrinking by less than a block: keep it
        }
        if nflags & FREE != 0 {
            self.remove_free(next, nsize)?;
            self.add_free_stats(-1);
        }
        let c = self.ctl;
        // Relaxed: statistics, single writer under the lock.
        c.used_bytes.fetch_sub(size, Ordering::Relaxed);
        c.free_bytes.fetch_add(size, Ordering::Relaxed);
        let keep = if avail - want >= MIN_BLOCK { want } else { avail };
        if keep < avail {
            let rest = avail - keep;
            let tail = off + keep;
            self.set(tail, keep)?;
            self.write_header(tail, rest, FREE)?;
            self.write_header(off, keep, flags & PREV_FREE)?;
            let after = tail + rest;
            self.set(after, rest)?;
            self.update_flags(after, PREV_FREE, 0)?;
            self.insert_free(tail, rest)?;
            self.add_free_stats(1);
        } else {
            self.write_header(off, keep, flags & PREV_FREE)?;
            let after = off + keep;
            self.set(after, keep)?;
            self.update_flags(after, 0, PREV_FREE)?;
        }
        c.used_bytes.fetch_add(keep, Ordering::Relaxed);
        c.free_bytes.fetch_sub(keep, Ordering::Relaxed);
        Ok(true)
    }

    /// Extends the block area to `new_capacity` bytes (the caller made them valid memory).
    pub fn grow(&self, new_capacity: u64) -> R<()> {
        let old = self.valid_cap()?;
        if new_capacity <= old
            || new_capacity % ALIGN != 0
            || new_capacity > self.limit
            || new_capacity - HEADER > MAX_BLOCK
        {
            return Err(TlsfError::BadLayout(format!(
                "cannot grow from {old} to {new_capacity} (at most {} bytes are mapped)",
                self.limit
            )));
        }
        let old_sentinel = old - HEADER;
        let (_, sflags) = self.header(old_sentinel)?;
        let new_sentinel = new_capacity - HEADER;
        let added = new_sentinel - old_sentinel;
        // The capacity, then the new sentinel, then the old sentinel becomes a free block in
        // one store (inside `release`). A crash before that last store leaves a size-0 header
        // before the recorded sentinel, which `recover` completes (see "Crash consistency").
        // Release: orders nothing before it that matters; keeps the sequence in program order.
        self.ctl.capacity.store(new_capacity, Ordering::Release);
        self.set(new_sentinel, added)?;
        self.write_header(new_sentinel, 0, 0)?;
        // Relaxed: statistics under the lock.
        self.ctl.free_bytes.fetch_add(added, Ordering::Relaxed);
        self.release(old_sentinel, added, sflags & PREV_FREE)
    }

    /// Gives back the end of the area if it is free: shrinks the area to the smallest capacity
    /// at least `min_capacity` (a multiple of 16) that keeps every used block. Returns the new
    /// capacity (unchanged if the last block is used or too small to be worth it).
    ///
    /// The steps mirror `grow` in reverse: the new sentinel is written inside the free block,
    /// then the block shrinks (one store), then the capacity drops. A crash before the last
    /// step leaves a size-0 header before the recorded sentinel, which `recover` turns back
    /// into free space: the trim is simply undone.
    pub fn shrink(&self, min_capacity: u64) -> R<u64> {
        let cap = self.valid_cap()?;
        let sentinel = cap - HEADER;
        let (_, sflags) = self.header(sentinel)?;
        if sflags & PREV_FREE == 0 {
            return Ok(cap);
        }
        let last_size = self.get(sentinel)?;
        let last =
            sentinel.checked_sub(last_size).ok_or_else(|| TlsfError::Corrupt("last block size underflows".into()))?;
        let (size, flags) = self.header(last)?;
        if size != last_size || flags & FREE == 0 {
            return corrupt(format!(
                "the block before the sentinel at {last:#x} is not the free block of {last_size} bytes it should be"
            ));
        }
        // Keep at least a minimal free block so the chain shape does not change.
        let new_cap = (last + MIN_BLOCK + HEADER).max(min_capacity).next_multiple_of(ALIGN);
        if new_cap + MIN_BLOCK >= cap {
            return Ok(cap);
        }
        let new_sentinel = new_cap - HEADER;
        let new_size = new_sentinel - last;
        self.remove_free(last, size)?;
        self.set(new_sentinel, new_size)?;
        self.write_header(new_sentinel, 0, PREV_FREE)?;
        self.write_header(last, new_size, flags)?; // commit: the chain now ends early
        // Release: keeps the capacity drop after the shrink above.
        self.ctl.capacity.store(new_cap, Ordering::Release);
        self.insert_free(last, new_size)?;
        // Relaxed: statistics under the lock.
        self.ctl.free_bytes.fetch_sub(size - new_size, Ordering::Relaxed);
        Ok(new_cap)
    }

    /// Current statistics.
    pub fn stats(&self) -> TlsfStats {
        let c = self.ctl;
        // Relaxed: statistics.
        TlsfStats {
            capacity: self.cap(),
            used_bytes: c.used_bytes.load(Ordering::Relaxed),
            used_blocks: c.used_blocks.load(Ordering::Relaxed),
            free_bytes: c.free_bytes.load(Ordering::Relaxed),
            free_blocks: c.free_blocks.load(Ordering::Relaxed),
            largest_free: self.largest_free().saturating_sub(HEADER),
            allocs: c.allocs.load(Ordering::Relaxed),
            frees: c.frees.load(Ordering::Relaxed),
        }
    }

    /// The largest size `alloc(size, ALIGN)` would serve now. Good fit searches the class
    /// above a request's own (so that any block found fits), so a request succeeds exactly when
    /// its block size is at most the start of the largest free block's class; the answer is
    /// that class start net of the header, not the block's own size.
    pub fn largest_request(&self) -> u64 {
        let largest = self.largest_free();
        if largest < MIN_BLOCK {
            return 0;
        }
        let class_start = if largest < SMALL {
            largest / ALIGN * ALIGN
        } else {
            let step = 1u64 << (63 - largest.leading_zeros() - SL_LOG);
            largest & !(step - 1)
        };
        class_start - HEADER
    }

    /// The largest free block (size with header), from the highest non-empty class.
    fn largest_free(&self) -> u64 {
        // Relaxed: single writer under the lock.
        let fl_map = self.ctl.fl_bitmap.load(Ordering::Relaxed);
        if fl_map == 0 {
            return 0;
        }
        let fl = 63 - fl_map.leading_zeros() as usize;
        let sl_map = self.ctl.sl_bitmap.get(fl).map_or(0, |w| w.load(Ordering::Relaxed));
        if sl_map == 0 {
            return 0;
        }
        let sl = 31 - sl_map.leading_zeros() as usize;
        if sl >= SL_COUNT {
            return 0; // a damaged bitmap: `check` reports it
        }
        let mut best = 0;
        let mut cur = self.head(fl, sl).load(Ordering::Relaxed);
        let mut steps = 0;
        while cur != NIL && steps < 64 {
            match self.header(cur) {
                Ok((s, _)) => best = best.max(s),
                Err(_) => break,
            }
            cur = self.get(cur + 16).unwrap_or(NIL);
            steps += 1;
        }
        best
    }

    /// Every block in address order (at most `limit`).
    pub fn blocks(&self, limit: usize) -> R<Vec<BlockInfo>> {
        let mut out = Vec::new();
        let mut off = 0;
        let sentinel = self.sentinel()?;
        while off < sentinel && out.len() < limit {
            let (size, flags) = self.header(off)?;
            if size < MIN_BLOCK || off + size > sentinel {
                return corrupt(format!("block at {off:#x} has size {size:#x}, which does not fit the area"));
            }
            out.push(BlockInfo { offset: off, size, free: flags & FREE != 0, cached: flags & CACHED != 0 });
            off += size;
        }
        Ok(out)
    }

    /// Checks every invariant; returns the first violation.
    pub fn check(&self) -> R<()> {
        let sentinel = self.sentinel()?;
        let (mut off, mut prev_size, mut prev_free) = (0u64, 0u64, false);
        let (mut used_bytes, mut used_blocks, mut free_bytes, mut free_blocks) = (0, 0, 0, 0);
        while off < sentinel {
            let (size, flags) = self.header(off)?;
            if size < MIN_BLOCK || size % ALIGN != 0 || off + size > sentinel {
                return corrupt(format!(
                    "block at {off:#x} has size {size:#x}: expected a multiple of 16, at least 32, within the area"
                ));
            }
            if off > 0 && self.get(off)? != prev_size {
                return corrupt(format!(
                    "block at {off:#x} records previous size {:#x}, expected {prev_size:#x}",
                    self.get(off)?
                ));
            }
            if (flags & PREV_FREE != 0) != prev_free {
                return corrupt(format!(
                    "block at {off:#x} has PREV_FREE {} but its predecessor is {}",
                    flags & PREV_FREE != 0,
                    if prev_free { "free" } else { "used" }
                ));
            }
            let free = flags & FREE != 0;
            if free && flags & CACHED != 0 {
                return corrupt(format!("block at {off:#x} is both free and parked in a thread cache"));
            }
            if free && prev_free {
                return corrupt(format!(
                    "free blocks at {:#x} and {off:#x} are adjacent: they should have been merged",
                    off - prev_size
                ));
            }
            if free {
                free_bytes += size;
                free_blocks += 1;
            } else {
                used_bytes += size;
                used_blocks += 1;
            }
            prev_size = size;
            prev_free = free;
            off += size;
        }
        if off != sentinel {
            return corrupt(format!("blocks end at {off:#x}, expected the sentinel at {sentinel:#x}"));
        }
        let (ssize, sflags) = self.header(off)?;
        if ssize != 0 || sflags & FREE != 0 || (sflags & PREV_FREE != 0) != prev_free {
            return corrupt(format!("the sentinel at {off:#x} is damaged (size {ssize}, flags {sflags:#x})"));
        }
        // The lists hold exactly the free blocks, each in its class, with sane links.
        let mut listed = 0u64;
        for fl in 0..FL_COUNT {
            // Relaxed: single writer under the lock.
            let sl_map = self.ctl.sl_bitmap[fl].load(Ordering::Relaxed);
            let fl_bit = self.ctl.fl_bitmap.load(Ordering::Relaxed) & (1 << fl) != 0;
            if fl_bit != (sl_map != 0) {
                return corrupt(format!(
                    "first-level bitmap bit {fl} is {fl_bit} but the second-level map is {sl_map:#x}"
                ));
            }
            for sl in 0..SL_COUNT {
                let mut cur = self.head(fl, sl).load(Ordering::Relaxed);
                if (cur != NIL) != (sl_map & (1 << sl) != 0) {
                    return corrupt(format!("class ({fl}, {sl}): bitmap and list head disagree"));
                }
                let mut prev = NIL;
                while cur != NIL {
                    let (size, flags) = self.header(cur)?;
                    if flags & FREE == 0 || mapping(size) != (fl, sl) {
                        return corrupt(format!(
                            "block at {cur:#x} (size {size}, flags {flags:#x}) is in free list ({fl}, {sl})"
                        ));
                    }
                    if self.get(cur + 24)? != prev {
                        return corrupt(format!("free block at {cur:#x} has a wrong back link"));
                    }
                    listed += 1;
                    if listed > free_blocks {
                        return corrupt(
                            "the free lists hold more blocks than the heap has free blocks (a cycle?)".into(),
                        );
                    }
                    prev = cur;
                    cur = self.get(cur + 16)?;
                }
            }
        }
        if listed != free_blocks {
            return corrupt(format!("{free_blocks} free blocks in the heap but {listed} in the free lists"));
        }
        let s = self.stats();
        if (s.used_bytes, s.used_blocks, s.free_bytes, s.free_blocks)
            != (used_bytes, used_blocks, free_bytes, free_blocks)
        {
            return corrupt(format!(
                "statistics say {}/{} used and {}/{} free bytes/blocks, the walk found {used_bytes}/{used_blocks} and {free_bytes}/{free_blocks}",
                s.used_bytes, s.used_blocks, s.free_bytes, s.free_blocks
            ));
        }
        Ok(())
    }

    /// Rebuilds everything but the block sizes after a holder died mid-operation (see
    /// "Crash consistency"). Returns the number of blocks found.
    pub fn recover(&self) -> R<u64> {
        let c = self.ctl;
        // Finish an interrupted growth: the chain ends at a size-0 header before the sentinel.
        let mut off = 0u64;
        let mut prev: Option<(u64, u64, bool)> = None; // (offset, size, free)
        let mut blocks = 0u64;
        let (mut used_bytes, mut used_blocks, mut free_bytes, mut free_blocks) = (0, 0, 0, 0);
        // Relaxed (lists reset): single writer under the lock.
        c.fl_bitmap.store(0, Ordering::Relaxed);
        for fl in 0..FL_COUNT {
            c.sl_bitmap[fl].store(0, Ordering::Relaxed);
            for sl in 0..SL_COUNT {
                c.heads[fl][sl].store(NIL, Ordering::Relaxed);
            }
        }
        let mut frees: Vec<(u64, u64)> = Vec::new();
        // The sentinel itself is never read: a growth may have died before writing it. It is
        // rewritten after the walk.
        let sentinel = self.sentinel()?;
        while off < sentinel {
            let (mut size, flags) = self.header(off)?;
            if size == 0 {
                // A growth was interrupted after the capacity was raised: the old sentinel
                // becomes the free block it was about to become.
                size = sentinel - off;
                self.write_header(off, size, FREE)?;
            }
            if size < MIN_BLOCK || size % ALIGN != 0 || off + size > sentinel {
                return corrupt(format!("block at {off:#x} has size {size:#x}; the heap cannot be recovered"));
            }
            let free = flags & FREE != 0 || self.header(off)?.1 & FREE != 0;
            match prev {
                Some((poff, psize, true)) if free => {
                    // Two free neighbours: merge into the first.
                    let merged = psize + size;
                    self.write_header(poff, merged, self.header(poff)?.1 & PREV_FREE | FREE)?;
                    frees.last_mut().expect("previous free block recorded").1 = merged;
                    free_bytes += size;
                    prev = Some((poff, merged, true));
                }
                _ => {
                    let pflag = if matches!(prev, Some((_, _, true))) { PREV_FREE } else { 0 };
                    self.set(off, prev.map_or(0, |p| p.1))?;
                    if free {
                        self.write_header(off, size, pflag | FREE)?;
                    } else {
                        // A used block may be parked in a live thread's cache, which flips its
                        // CACHED bit without the lock: touch only PREV_FREE, atomically.
                        self.update_flags(off, pflag, PREV_FREE & !pflag)?;
                    }
                    if free {
                        frees.push((off, size));
                        free_bytes += size;
                        free_blocks += 1;
                    } else {
                        used_bytes += size;
                        used_blocks += 1;
                    }
                    blocks += 1;
                    prev = Some((off, size, free));
                }
            }
            off += size;
        }
        let last = prev.map_or((0, false), |p| (p.1, p.2));
        self.set(off, last.0)?;
        self.write_header(off, 0, if last.1 { PREV_FREE } else { 0 })?;
        // Fix each free block's successor's back size (merges changed them).
        for &(foff, fsize) in &frees {
            self.set(foff + fsize, fsize)?;
            self.insert_free(foff, fsize)?;
        }
        c.used_bytes.store(used_bytes, Ordering::Relaxed);
        c.used_blocks.store(used_blocks, Ordering::Relaxed);
        c.free_bytes.store(free_bytes, Ordering::Relaxed);
        c.free_blocks.store(free_blocks, Ordering::Relaxed);
        Ok(blocks)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A block area and control block in ordinary memory.
    pub(crate) struct Arena {
        ctl: Box<TlsfControl>,
        mem: Vec<u128>,
    }

    impl Arena {
        pub(crate) fn new(capacity: u64) -> Arena {
            // SAFETY: TlsfControl is atomics only; all-zero is a valid value.
            let ctl: Box<TlsfControl> = unsafe { Box::new(std::mem::zeroed()) };
            let mem = vec![0u128; (capacity / 16) as usize];
            let a = Arena { ctl, mem };
            a.tlsf().init(capacity).unwrap();
            a
        }
        pub(crate) fn tlsf(&self) -> Tlsf<'_> {
            // SAFETY: `mem` is 16-aligned (u128) and `capacity` bytes long; the arena is used
            // from one thread at a time in these tests.
            unsafe { Tlsf::new(&self.ctl, self.mem.as_ptr() as *mut u8, self.mem.len() as u64 * 16) }
        }
    }

    #[test]
    fn size_classes_round_up_so_any_block_found_fits() {
        for size in (32..100_000u64).step_by(16) {
            let (fl, sl) = mapping_search(size);
            // The smallest size mapping to (fl, sl) is at least `size`.
            let lo =
                if fl == 0 { sl as u64 * 16 } else { (1u64 << (fl + 7)) + ((sl as u64) << (fl + 7 - SL_LOG as usize)) };
            assert!(lo >= size, "size {size} searched in class ({fl},{sl}) starting at {lo}");
            assert_eq!(mapping(lo), (fl, sl));
        }
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_freed_space_merges_back() {
        let a = Arena::new(1 << 20);
        let t = a.tlsf();
        let mut live = Vec::new();
        for (i, align) in [16u64, 32, 64, 256, 4096, 16, 128].iter().cycle().take(200).enumerate() {
            let size = 1 + (i as u64 * 37) % 3000;
            let p = t.alloc(size, *align).unwrap();
            assert_eq!((a.mem.as_ptr() as u64 + p) % align, 0);
            assert!(t.usable_size(p).unwrap() >= size);
            live.push(p);
        }
        t.check().unwrap();
        for p in live.drain(..).rev() {
            t.free(p).unwrap();
        }
        t.check().unwrap();
        let s = t.stats();
        assert_eq!((s.used_blocks, s.free_blocks), (0, 1), "everything merged back into one block");
    }

    #[test]
    fn the_largest_request_reported_on_failure_succeeds_and_one_more_byte_fails() {
        for cap in [1u64 << 12, 5000, 1 << 16, 300_000, 8 << 20] {
            let a = Arena::new(cap.next_multiple_of(16));
            let t = a.tlsf();
            let Err(TlsfError::OutOfMemory { largest_request, .. }) = t.alloc(cap * 2, 16) else {
                panic!("a request twice the capacity must fail");
            };
            assert!(largest_request > 0, "capacity {cap}: an empty heap serves something");
            let r = t.alloc(largest_request + 16, 16);
            assert!(matches!(r, Err(TlsfError::OutOfMemory { .. })), "capacity {cap}: one step more fails: {r:?}");
            let p = t.alloc(largest_request, 16).unwrap_or_else(|e| panic!("capacity {cap}: {e:?}"));
            t.free(p).unwrap();
            t.check().unwrap();
        }
    }

    #[test]
    fn bad_pointers_double_frees_and_bad_layouts_are_errors() {
        let a = Arena::new(1 << 16);
        let t = a.tlsf();
        let p = t.alloc(100, 16).unwrap();
        assert!(matches!(t.free(p + 16), Err(TlsfError::NotABlock(_))));
        assert!(matches!(t.free(3), Err(TlsfError::NotABlock(_))));
        assert!(matches!(t.free(1 << 20), Err(TlsfError::NotABlock(_))));
        t.free(p).unwrap();
        assert_eq!(t.free(p), Err(TlsfError::DoubleFree(p)));
        assert!(matches!(t.alloc(0, 16), Err(TlsfError::BadLayout(_))));
        assert!(matches!(t.alloc(16, 24), Err(TlsfError::BadLayout(_))));
        assert!(matches!(t.alloc(16, 8192), Err(TlsfError::BadLayout(_))));
        assert!(matches!(t.alloc(1 << 17, 16), Err(TlsfError::OutOfMemory { .. })));
        t.check().unwrap();
    }

    #[test]
    fn growth_adds_free_space_at_the_end() {
        let a = Arena::new(1 << 16);
        let t = a.tlsf();
        // Use only the first half of the arena, then grow into the rest.
        // SAFETY: shrinking the recorded capacity before any allocation; the memory stays.
        t.ctl.capacity.store(1 << 15, Ordering::Relaxed);
        t.init(1 << 15).unwrap();
        let p = t.alloc(20_000, 16).unwrap();
        assert!(matches!(t.alloc(20_000, 16), Err(TlsfError::OutOfMemory { .. })));
        t.grow(1 << 16).unwrap();
        t.check().unwrap();
        let q = t.alloc(20_000, 16).unwrap();
        assert_ne!(p, q);
        t.check().unwrap();
    }

    #[test]
    fn in_place_resize_grows_into_a_free_successor_and_shrinks() {
        let a = Arena::new(1 << 16);
        let t = a.tlsf();
        let p = t.alloc(100, 16).unwrap();
        assert!(t.resize_in_place(p, 5000).unwrap(), "the rest of the area follows it");
        assert!(t.usable_size(p).unwrap() >= 5000);
        t.check().unwrap();
        assert!(t.resize_in_place(p, 64).unwrap());
        t.check().unwrap();
        let q = t.alloc(100, 16).unwrap();
        assert!(!t.resize_in_place(p, 60_000).unwrap(), "blocked by q");
        t.free(q).unwrap();
        t.free(p).unwrap();
        t.check().unwrap();
    }

    #[test]
    fn shrinking_gives_back_free_space_at_the_end_only() {
        let a = Arena::new(1 << 20);
        let t = a.tlsf();
        let p = t.alloc(100_000, 16).unwrap();
        let q = t.alloc(100_000, 16).unwrap();
        t.free(q).unwrap();
        let cap = t.shrink(0).unwrap();
        assert!(cap < 220_000, "shrunk to {cap}");
        t.check().unwrap();
        assert!(t.usable_size(p).unwrap() >= 100_000, "the used block is kept");
        t.grow(1 << 20).unwrap();
        t.check().unwrap();
        t.free(p).unwrap();
        t.check().unwrap();
        assert_eq!(t.shrink(1 << 16).unwrap(), 1 << 16, "never below the minimum asked for");
        t.check().unwrap();
    }

    #[test]
    fn recovery_completes_a_growth_interrupted_at_any_step() {
        for step in 0..2 {
            let a = Arena::new(1 << 16);
            let t = a.tlsf();
            t.ctl.capacity.store(1 << 15, Ordering::Relaxed);
            t.init(1 << 15).unwrap();
            let p = t.alloc(30_000, 16).unwrap();
            // The first steps of `grow` to 64 KiB, then the holder dies.
            t.ctl.capacity.store(1 << 16, Ordering::Release);
            if step == 1 {
                let new_sentinel = (1 << 16) - HEADER;
                t.set(new_sentinel, new_sentinel - ((1 << 15) - HEADER)).unwrap();
                t.write_header(new_sentinel, 0, 0).unwrap();
            }
            t.recover().unwrap_or_else(|e| panic!("step {step}: {e:?}"));
            t.check().unwrap();
            assert!(t.stats().largest_free >= (1 << 15) - 64, "step {step}: the new space is usable: {:?}", t.stats());
            t.free(p).unwrap();
            t.check().unwrap();
        }
    }

    #[test]
    fn recovery_rebuilds_lists_from_the_block_chain() {
        let a = Arena::new(1 << 16);
        let t = a.tlsf();
        let ps: Vec<u64> = (0..20).map(|i| t.alloc(50 + i * 30, 16).unwrap()).collect();
        for p in ps.iter().step_by(2) {
            t.free(*p).unwrap();
        }
        // Wreck the lists and statistics, as a holder dying mid-update could.
        t.ctl.heads[0][3].store(12345, Ordering::Relaxed);
        t.ctl.fl_bitmap.store(!0, Ordering::Relaxed);
        t.ctl.used_bytes.store(7, Ordering::Relaxed);
        assert!(t.check().is_err());
        t.recover().unwrap();
        t.check().unwrap();
        for p in ps.iter().skip(1).step_by(2) {
            t.free(*p).unwrap();
        }
        t.check().unwrap();
        assert_eq!(t.stats().free_blocks, 1);
    }
}

#[cfg(test)]
mod model_tests {
    use super::tests::Arena;
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { size: u64, align_log: u32 },
        Free(usize),
        Resize(usize, u64),
        Grow,
        Shrink,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..5000, 4u32..=12).prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
            3 => any::<usize>().prop_map(Op::Free),
            1 => (any::<usize>(), 1u64..8000).prop_map(|(i, s)| Op::Resize(i, s)),
            1 => Just(Op::Grow),
            1 => Just(Op::Shrink),
        ]
    }

    /// A live allocation: payload offset, requested size, fill byte.
    type Live = Vec<(u64, u64, u8)>;

    fn fill(a: &Arena, p: u64, size: u64, byte: u8) {
        let base = a.tlsf().base;
        // SAFETY: `[p, p + size)` is the payload of a live allocation inside the arena.
        unsafe { std::ptr::write_bytes(base.add(p as usize), byte, size as usize) };
    }

    fn intact(a: &Arena, p: u64, size: u64, byte: u8) -> bool {
        let base = a.tlsf().base;
        // SAFETY: as in `fill`.
        let bytes = unsafe { std::slice::from_raw_parts(base.add(p as usize), size as usize) };
        bytes.iter().all(|&b| b == byte)
    }

    fn run(ops: &[Op], a: &Arena, cap: &mut u64, live: &mut Live, next_byte: &mut u8) {
        let t = a.tlsf();
        for op in ops {
            match *op {
                Op::Alloc { size, align_log } => {
                    let align = 1u64 << align_log;
                    match t.alloc(size, align) {
                        Ok(p) => {
                            assert_eq!((t.base as u64 + p) % align, 0, "alignment {align}");
                            assert!(t.usable_size(p).unwrap() >= size);
                            *next_byte = next_byte.wrapping_add(1).max(1);
                            fill(a, p, size, *next_byte);
                            live.push((p, size, *next_byte));
                        }
                        Err(TlsfError::OutOfMemory { .. }) => {}
                        Err(e) => panic!("alloc({size}, {align}): {e:?}"),
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let (p, size, byte) = live.swap_remove(i % live.len());
                    assert!(intact(a, p, size, byte), "allocation at {p:#x} was overwritten: overlap");
                    t.free(p).unwrap();
                }
                Op::Resize(i, new) if !live.is_empty() => {
                    let k = i % live.len();
                    let (p, size, byte) = live[k];
                    assert!(intact(a, p, size, byte));
                    if t.resize_in_place(p, new).unwrap() {
                        assert!(t.usable_size(p).unwrap() >= new);
                        fill(a, p, new, byte);
                        live[k].1 = new;
                    }
                }
                // Only within the arena (1 MiB): after a shrink `cap` is no multiple of 64 KiB, and
                // growing past the arena would be refused (the allocator checks its limit).
                Op::Grow if *cap + (1 << 16) <= 1 << 20 => {
                    *cap += 1 << 16;
                    t.grow(*cap).unwrap();
                }
                Op::Shrink => {
                    *cap = t.shrink(0).unwrap();
                }
                _ => {}
            }
            t.check().unwrap_or_else(|e| panic!("after {op:?}: {e:?}"));
            let s = t.stats();
            assert_eq!(s.used_bytes + s.free_bytes + HEADER, s.capacity, "every byte is accounted for");
            assert_eq!(s.used_blocks, live.len() as u64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 4 } else { 256 }, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_keep_every_invariant(ops in proptest::collection::vec(op(), 1..200)) {
            let a = Arena::new(1 << 20);
            let mut cap = 1 << 16;
            a.tlsf().ctl.capacity.store(cap, Ordering::Relaxed);
            a.tlsf().init(cap).unwrap();
            let (mut live, mut byte) = (Vec::new(), 0u8);
            run(&ops, &a, &mut cap, &mut live, &mut byte);
            for (p, size, b) in live.drain(..) {
                prop_assert!(intact(&a, p, size, b));
                a.tlsf().free(p).unwrap();
            }
            a.tlsf().check().unwrap();
            prop_assert_eq!(a.tlsf().stats().free_blocks, 1);
        }

        #[test]
        fn recovery_after_lost_bookkeeping_keeps_every_live_allocation(
            before in proptest::collection::vec(op(), 1..120),
            after in proptest::collection::vec(op(), 1..60),
            wreck in any::<u64>(),
        ) {
            let a = Arena::new(1 << 20);
            let mut cap = 1 << 16;
            a.tlsf().ctl.capacity.store(cap, Ordering::Relaxed);
            a.tlsf().init(cap).unwrap();
            let (mut live, mut byte) = (Vec::new(), 0u8);
            run(&before, &a, &mut cap, &mut live, &mut byte);
            // A holder died: lists, bitmaps and statistics are garbage; block sizes are intact.
            let t = a.tlsf();
            t.ctl.fl_bitmap.store(wreck, Ordering::Relaxed);
            t.ctl.heads[(wreck % FL_COUNT as u64) as usize][(wreck % 16) as usize].store(wreck, Ordering::Relaxed);
            t.ctl.free_blocks.store(wreck, Ordering::Relaxed);
            t.recover().unwrap();
            t.check().unwrap();
            for &(p, size, b) in &live {
                prop_assert!(intact(&a, p, size, b), "recovery touched a live allocation");
            }
            run(&after, &a, &mut cap, &mut live, &mut byte);
        }
    }
}
