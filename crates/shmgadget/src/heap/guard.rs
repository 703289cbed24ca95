//! Guard pages after large heap blocks: an opt-in debug mode that turns a write past the end of
//! a block into an immediate, named crash.
//!
//! A heap handle in guard mode ([`HeapOptions::guard_pages`](super::HeapOptions), or
//! `SHMGADGET_HEAP_GUARD=1` in the environment when the handle is made) serves every allocation
//! of at least a page from a block laid out so that the payload ends exactly where a page ends,
//! and makes the page after it inaccessible (`PROT_NONE`) in this process:
//!
//! ```text
//! B (page-aligned TLSF payload)   R: GuardRecord (32 bytes, 8-aligned)   P: payload      G: guard page
//! |---- unused ----------------|--------------------------------------|-- size bytes --|### PROT_NONE ###|
//! ```
//!
//! `P = G - round_up(size, align)`: with an alignment of 1 (or a size that is a multiple of the
//! alignment) the first byte past the payload is the first byte of the guard page. A write there
//! faults; the first-touch handler (`fault.rs`) finds the guard in this process's guard table,
//! writes one line naming the heap, the block's address and size and how far past its end the
//! access went, and chains the fault on (by default the process dies of `SIGSEGV`). It never
//! maps anything over a guard page.
//!
//! # Protocol (shared part)
//! * `GuardRecord` lives in the block, just before the payload (`record_at`). The allocating
//!   process writes `block`, `size` and `guard` under the heap lock, then publishes `magic`
//!   (`MAGIC ^ P`) with a Release store. Any process's free (`Heap::free`, `heap::free`,
//!   `realloc`) recognises a guarded payload by that magic (Acquire) and checks every field
//!   against the allocator's block before trusting it; under the lock it clears `magic` and
//!   frees the whole block `B`. A stale or damaged record is never trusted: the pointer then
//!   goes to the ordinary free path, which rejects it as not a block.
//! * `HeapShared::guarded_blocks` (one of the header's spare words, so the layout is unchanged)
//!   counts live guarded blocks, changed under the lock. Free paths read it first (Relaxed: a
//!   pointer to a guarded block reached the freeing thread through synchronisation that
//!   happened after the count was raised), so heaps that never had a guarded block pay one
//!   load per free.
//!
//! # Protocol (this process)
//! Protection belongs to one process's mapping: the guard page is inaccessible only in the
//! process that allocated the block. `TABLE` lists this process's guard pages. A writer holds
//! `TABLE_LOCK`; it publishes a slot by storing `payload` and then `guard` (Release) and
//! retires one by clearing `guard` first. The fault handler reads slots without a lock (Acquire
//! on `guard`, then `payload`, then `guard` again: a slot that changed meanwhile is skipped).
//!
//! A guarded block freed by *another* process leaves its guard page inaccessible here until
//! this process touches it: the handler then sees that the block's record is gone (the guard is
//! stale), makes the page read-write again, clears the slot and lets the access run. A guarded
//! allocation here lifts stale guards inside the new block first. What this does not cover: a
//! system call given such memory meanwhile gets `EFAULT` (the handler never sees it), and a
//! write past a block from a process other than the allocating one is not caught (its mapping
//! has no guard page).
//!
//! Sections on huge pages get no guard pages (protection there works per huge page): a guard-
//! mode handle serves them unguarded.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{AREA_OFFSET, HeapShared, Locked};
use crate::error::{Error, ErrorKind, Result};
use crate::os;

const MAGIC: u64 = u64::from_le_bytes(*b"SHMGUARD");
/// Bytes of the record before the payload.
const RECORD: usize = size_of::<GuardRecord>();

/// The record a guarded block keeps just before its payload (see the module docs).
#[repr(C)]
struct GuardRecord {
    /// `MAGIC ^ payload address` while the block is live and guarded; 0 after free.
    magic: AtomicU64,
    /// Address of the whole TLSF block's payload (page-aligned; the same in every process).
    block: AtomicU64,
    /// The size the caller asked for.
    size: AtomicU64,
    /// Address of the guard page.
    guard: AtomicU64,
}

const _: () = assert!(size_of::<GuardRecord>() == 32);
const _: () = assert!(align_of::<GuardRecord>() == 8);

/// Whether `SHMGADGET_HEAP_GUARD=1` asks for guard mode.
pub(crate) fn env_guard() -> bool {
    std::env::var_os("SHMGADGET_HEAP_GUARD").is_some_and(|v| v == "1")
}

/// The smallest request that gets a guard page: one page.
pub(crate) fn min_guarded() -> u64 {
    os::page_size() as u64
}

/// Where the record of a payload at address `p` lives: 8-aligned, at least `RECORD` bytes
/// before it.
fn record_at(p: usize) -> usize {
    (p - RECORD) & !7
}

/// One guard page of this process.
struct Slot {
    /// Address of the guard page (0: free slot).
    guard: AtomicUsize,
    /// Address of the guarded payload.
    payload: AtomicUsize,
}

const SLOTS: usize = 4096;
static TABLE: [Slot; SLOTS] = [const { Slot { guard: AtomicUsize::new(0), payload: AtomicUsize::new(0) } }; SLOTS];
/// Slots in use (an upper bound for the handler's and the sweep's early exit).
static USED: AtomicUsize = AtomicUsize::new(0);
static TABLE_LOCK: Mutex<()> = Mutex::new(());

/// A guarded block found from its payload offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guarded {
    /// Offset of the TLSF block's payload in the block area.
    block: u64,
    /// The caller's size.
    pub(crate) size: u64,
    /// Offset of the guard page in the block area.
    guard: u64,
}

/// Reads the record before payload offset `off` of the area at `area` (`limit` bytes mapped)
/// and returns it if it describes a live guarded block there. Validates every field; the caller
/// confirms `block` with the allocator under the lock.
///
/// # Safety
/// `area` must be a mapped block area of at least `limit` bytes.
unsafe fn read_record(area: *mut u8, limit: u64, off: u64) -> Option<Guarded> {
    let page = os::page_size() as u64;
    if off < (RECORD + 8) as u64 || off >= limit {
        return None;
    }
    let p = area as usize + off as usize;
    let r = record_at(p);
    // SAFETY: `r` lies in the area (off >= RECORD + 8, so r >= area), 8-aligned, mapped for the
    // caller; the record is atomics, valid for any bytes.
    let rec = unsafe { &*(r as *const GuardRecord) };
    // Acquire: pairs with the Release store that published the record in `alloc`.
    if rec.magic.load(Ordering::Acquire) != MAGIC ^ p as u64 {
        return None;
    }
    // Relaxed: published by the magic's Release store.
    let (block, size, guard) =
        (rec.block.load(Ordering::Relaxed), rec.size.load(Ordering::Relaxed), rec.guard.load(Ordering::Relaxed));
    let (base, p) = (area as u64, p as u64);
    let ok = block % page == 0
        && guard % page == 0
        && block >= base
        && block <= r as u64
        && r as u64 + RECORD as u64 <= p
        && guard > p
        && guard - p >= size
        && guard - p < size + page
        && guard.checked_add(page).is_some_and(|end| end <= base + limit);
    ok.then(|| Guarded { block: block - base, size, guard: guard - base })
}

/// If payload offset `off` of the heap is a live guarded block, returns it. One relaxed load
/// for heaps without guarded blocks.
///
/// # Safety
/// `section` must be the mapped heap section whose control block is `shared`, with `mapped`
/// bytes mapped (`u64::MAX`: trust the header's `reserved`).
#[inline]
pub(crate) unsafe fn recognise(shared: &HeapShared, section: *mut u8, mapped: u64, off: u64) -> Option<Guarded> {
    // Relaxed: see the module docs (shared part).
    if shared.guarded_blocks().load(Ordering::Relaxed) == 0 {
        return None;
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { recognise_record(shared, section, mapped, off) }
}

/// [`recognise`] once the heap has guarded blocks: out of line, so a heap without any pays one
/// load per free.
///
/// # Safety
/// As for [`recognise`].
#[inline(never)]
unsafe fn recognise_record(shared: &HeapShared, section: *mut u8, mapped: u64, off: u64) -> Option<Guarded> {
    let limit = super::area_limit(shared, mapped);
    // SAFETY: the block area starts AREA_OFFSET into the mapped section and has `limit` bytes.
    unsafe { read_record(section.add(AREA_OFFSET as usize), limit, off) }
}

/// Allocates `size` bytes aligned to `align` (at most a page) with a guard page after them,
/// under `locked`; returns the payload's offset in the block area.
pub(crate) fn alloc(
    locked: &Locked<'_>,
    size: u64,
    align: u64,
    name: &str,
    commit: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<u64> {
    let page = os::page_size() as u64;
    let area = locked.area();
    let data = size.next_multiple_of(align.max(1));
    let span = (data + RECORD as u64 + 8).next_multiple_of(page);
    let total = span.checked_add(page).ok_or_else(|| Error::new(ErrorKind::InvalidSize, "size overflows"))?;
    let block = locked.alloc(total, page, name, commit)?;
    let (guard, off) = (block + span, block + span - data);
    let (g, p) = (area as usize + guard as usize, area as usize + off as usize);
    debug_assert!(g % page as usize == 0, "the block area is page-aligned, so is a page-aligned block");
    sweep_stale(area as usize + block as usize, g + page as usize);
    if !register(g, p) {
        let _ = locked.free(block, name);
        return Err(Error::new(
            ErrorKind::OutOfSpace,
            format!(
                "heap {name:?}: this process already has {SLOTS} guarded blocks live; free some, or turn guard mode \
                 off (SHMGADGET_HEAP_GUARD)"
            ),
        ));
    }
    // SAFETY: `g` is the last page of a block this call just allocated (nobody else uses it),
    // inside the heap's mapping; no reference points into it.
    if let Err(e) = unsafe { os::protect(g, page as usize, os::Protection::None) } {
        unregister(g);
        let _ = locked.free(block, name);
        return Err(Error::from_io(format!("heap {name:?}: cannot make a guard page"), e));
    }
    // SAFETY: the record lies in the block (between `block` and `off`), 8-aligned, mapped.
    let rec = unsafe { &*(record_at(p) as *const GuardRecord) };
    // Relaxed: published by the Release store of `magic` just below.
    rec.block.store(area as u64 + block, Ordering::Relaxed);
    rec.size.store(size, Ordering::Relaxed);
    rec.guard.store(g as u64, Ordering::Relaxed);
    // Release: pairs with the Acquire load in `read_record`.
    rec.magic.store(MAGIC ^ p as u64, Ordering::Release);
    // Relaxed: under the heap lock; see the module docs.
    locked.shared.guarded_blocks().fetch_add(1, Ordering::Relaxed);
    Ok(off)
}

/// Frees guarded block `g` (found by `recognise`) under `locked`: re-checks its record under the
/// lock, clears it, lifts this process's guard page, then frees the whole block.
pub(crate) fn free(locked: &Locked<'_>, off: u64, name: &str) -> Result<()> {
    let area = locked.area();
    // SAFETY: `area` is the heap's mapped block area of `area_limit` bytes (held by `locked`).
    let g = unsafe { read_record(area, super::area_limit(locked.shared, locked.mapped), off) }.ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("heap {name:?}: double free of the guarded block at offset {off:#x}"),
        )
    })?;
    // The allocator must agree that the whole block is live and covers the guard page.
    let page = os::page_size() as u64;
    let usable = locked.tlsf().usable_size(g.block).map_err(|e| super::map_tlsf(e, name))?;
    if usable < g.guard + page - g.block {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("heap {name:?}: the guard record of the block at offset {off:#x} does not match its block"),
        ));
    }
    let p = area as usize + off as usize;
    // SAFETY: validated by `read_record` above.
    let rec = unsafe { &*(record_at(p) as *const GuardRecord) };
    // Relaxed: under the heap lock, the only writer; readers without it (`read_record` in other
    // frees) then take the lock and re-check.
    rec.magic.store(0, Ordering::Relaxed);
    let gaddr = area as usize + g.guard as usize;
    if unregister(gaddr) {
        // SAFETY: our own guard page inside the heap's mapping, about to go back to the
        // allocator: made ordinary memory again before anyone else can get it.
        unsafe { os::protect(gaddr, page as usize, os::Protection::ReadWrite) }
            .map_err(|e| Error::from_io(format!("heap {name:?}: cannot lift a guard page"), e))?;
    }
    locked.free(g.block, name)?;
    // Relaxed: under the heap lock.
    let n = locked.shared.guarded_blocks();
    let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    Ok(())
}

fn register(g: usize, p: usize) -> bool {
    let _t = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A slot for the same page (a stale one) is reused: one slot per guard page.
    let slot = TABLE
        .iter()
        .find(|s| s.guard.load(Ordering::Relaxed) == g)
        .or_else(|| TABLE.iter().find(|s| s.guard.load(Ordering::Relaxed) == 0));
    let Some(slot) = slot else {
        return false;
    };
    if slot.guard.load(Ordering::Relaxed) == 0 {
        USED.fetch_add(1, Ordering::Relaxed);
    }
    slot.guard.store(0, Ordering::Release);
    // Relaxed: published by the Release store of `guard`.
    slot.payload.store(p, Ordering::Relaxed);
    // Release: pairs with the Acquire loads in `lookup`.
    slot.guard.store(g, Ordering::Release);
    true
}

/// Clears the slot of guard page `g`; returns whether there was one.
fn unregister(g: usize) -> bool {
    let _t = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    clear_slot(g)
}

/// Clears the slot of `g` (caller holds `TABLE_LOCK`, or is the handler racing only with other
/// lifts of the same stale page, which agree).
fn clear_slot(g: usize) -> bool {
    for s in &TABLE {
        // Relaxed/Release: the handler re-checks `guard` after reading `payload` (see `lookup`).
        if s.guard.compare_exchange(g, 0, Ordering::Release, Ordering::Relaxed).is_ok() {
            USED.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
    }
    false
}

/// Lifts this process's stale guard pages inside `[start, end)` (memory a new block now owns).
fn sweep_stale(start: usize, end: usize) {
    // Relaxed: an early exit only; slots are written by this process.
    if USED.load(Ordering::Relaxed) == 0 {
        return;
    }
    let page = os::page_size();
    let _t = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for s in &TABLE {
        let g = s.guard.load(Ordering::Relaxed);
        if g != 0 && g >= start && g < end && clear_slot(g) {
            // SAFETY: a page of ours inside a block just allocated to this caller.
            let _ = unsafe { os::protect(g, page, os::Protection::ReadWrite) };
        }
    }
}

/// What the fault handler learns about a faulting address.
pub(crate) enum GuardHit {
    /// A live guard page: the access overran the block at `block` of `size` bytes by `past`
    /// bytes (0: the first byte after it).
    Overrun { block: usize, size: u64, past: u64 },
    /// A guard page of a block freed since (by another process): lifted, retry the access.
    Lifted,
}

/// Whether `addr` is one of this process's guard pages (and if its block is still live).
/// Async-signal-safe: atomic loads, reads of the heap's mapped memory, `mprotect`.
pub(crate) fn lookup(addr: usize) -> Option<GuardHit> {
    // Relaxed: an early exit; a slot being published for this page concerns a block whose
    // guard nobody touches yet.
    if USED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let page = os::page_size();
    let at = addr & !(page - 1);
    let (g, p) = find(at)?;
    let r = record_at(p);
    // A record lying in one of our guard pages is unreadable, and cannot be live: that page
    // belongs to another live block now.
    let live = find(r & !(page - 1)).is_none() && {
        // SAFETY: `r` is 8-aligned, between the block start and its payload, memory of this
        // process's heap mapping that was read-write when the block was made; the record is
        // atomics, valid for any bytes.
        let rec = unsafe { &*(r as *const GuardRecord) };
        // Acquire: pairs with the Release store in `alloc` (and the clear in `free`).
        rec.magic.load(Ordering::Acquire) == MAGIC ^ p as u64
            // Relaxed: published with the magic.
            && rec.guard.load(Ordering::Relaxed) as usize == g
    };
    if live {
        // SAFETY: as above.
        let rec = unsafe { &*(r as *const GuardRecord) };
        // Relaxed: published with the magic.
        let size = rec.size.load(Ordering::Relaxed);
        return Some(GuardHit::Overrun { block: p, size, past: ((addr - p) as u64).saturating_sub(size) });
    }
    if clear_slot(g) {
        // SAFETY: this process's own stale guard page in a heap mapping: its block was freed, so
        // the page is ordinary heap memory again that another block may own.
        let _ = unsafe { os::protect(g, page, os::Protection::ReadWrite) };
    }
    Some(GuardHit::Lifted)
}

/// The slot of guard page `at`: (guard, payload).
fn find(at: usize) -> Option<(usize, usize)> {
    for s in &TABLE {
        // Acquire: pairs with the Release store in `register`.
        if s.guard.load(Ordering::Acquire) != at {
            continue;
        }
        // Relaxed: published by the `guard` store; re-checked below.
        let p = s.payload.load(Ordering::Relaxed);
        // Acquire: the slot did not change while we read `payload`.
        if s.guard.load(Ordering::Acquire) == at {
            return Some((at, p));
        }
    }
    None
}
