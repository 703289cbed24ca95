//! The heap's side of the `heap` fuzz target (see `crate::fuzzing`): a heap section image in
//! private memory, run through the code the library and the CLI use on a real heap
//! (statistics, the block dump, `check`, the named-object listing and lookup, cache reclaim
//! and store release, carving from a chunk, alloc/free, trim, reset, recovery). Not part of the API.

use std::sync::atomic::Ordering;

use super::named::{NAMED_READY, entry_name};
use super::{AREA_OFFSET, FINGERPRINT, HeapShared, LAYOUT_VERSION, Locked, MAGIC, MIN_HEAP, READY, cache};
use crate::error::Result;

/// Size of the header the fuzzer writes (the rest up to `AREA_OFFSET` is zero).
pub(crate) const HEADER_LEN: usize = size_of::<HeapShared>();

/// Makes the lock word of the image at `section` a fresh, unlocked robust mutex (a fuzz input
/// must not decide whether the lock waits: bounded waits are tested elsewhere).
///
/// # Safety
/// `section` must point at `HEADER_LEN` writable bytes, 16-aligned, used by nobody else.
unsafe fn fresh_lock(section: *mut u8) -> &'static HeapShared {
    let off = std::mem::offset_of!(HeapShared, lock);
    // SAFETY: inside the header (caller's contract); nobody uses the lock yet.
    unsafe { section.add(off).write_bytes(0, size_of::<crate::sync::RawMutex>()) };
    // SAFETY: 16-aligned, HEADER_LEN bytes, atomics and the mutex only (every bit pattern is a
    // value); the 'static is the caller's: it drops the memory after every use.
    let shared = unsafe { &*section.cast::<HeapShared>() };
    shared.lock.init().expect("a zeroed lock initialises");
    shared
}

/// Runs the operations chosen by `ops` (4 bytes each) on the heap image of `mapped` bytes at
/// `section`. Asserted: from a heap `check` accepts, every operation keeps `check` passing
/// (except frees of arbitrary offsets, a program error after which the heap is judged afresh).
///
/// # Safety
/// `section` must point at `mapped` (at least `AREA_OFFSET` + 64) writable bytes, 16-aligned,
/// used by nobody else during the call.
pub(crate) unsafe fn exercise(section: *mut u8, mapped: u64, ops: &[u8]) {
    // SAFETY: forwarded.
    let shared = unsafe { fresh_lock(section) };
    // SAFETY: the image stays valid for the call (caller's contract).
    let locked = unsafe { Locked::acquire(shared, section, mapped, "fuzz") }.expect("a fresh lock locks");
    let name = "fuzz";
    let look = |l: &Locked<'_>| {
        let _ = l.stats();
        let _ = l.tlsf().blocks(4096);
        let _ = l.tlsf().largest_request();
        for o in l.named_objects() {
            assert!(o.address >= section as u64 + AREA_OFFSET && o.address + o.size <= section as u64 + mapped);
        }
    };
    look(&locked);
    let mut valid = locked.check(name).is_ok();
    let mut live: Vec<u64> = Vec::new();
    let mut ok_commit = |_len: u64| -> Result<()> { Ok(()) };
    for op in ops.chunks(4) {
        let [kind, a, b, c] = <[u8; 4]>::try_from(op).unwrap_or([op[0], 0, 0, 0]);
        let n = u16::from_le_bytes([a, b]) as u64;
        let mut rejudge = false;
        match kind % 12 {
            0 | 1 => {
                if let Ok(p) = locked.alloc(n.max(1), 16 << (c % 4), name, &mut ok_commit) {
                    live.push(p);
                }
            }
            2 if !live.is_empty() => {
                let p = live.swap_remove(c as usize % live.len());
                let _ = locked.free(p, name);
            }
            3 => {
                // An arbitrary offset: may be a named object's or a store's block (a program
                // error the allocator cannot see), so the heap is judged afresh.
                let off = n * 16;
                live.retain(|&p| p != off);
                let _ = locked.free(off, name);
                rejudge = true;
            }
            4 => {
                // Every owner gone: what `reclaim_dead` does for dead processes.
                let _ = cache::reclaim_if(&locked.cache_ref(), &locked, |_, thread| thread % 2 == c as u64 % 2);
            }
            5 => {
                let _ = cache::free_idle_stores(&locked.cache_ref(), &locked);
            }
            6 => {
                // Look up every named object; remove one (as `remove_named` does).
                let k = c as usize % super::MAX_NAMED;
                for (i, e) in shared.names.iter().enumerate() {
                    let Some(nm) = entry_name(e) else { continue };
                    let _ = locked.named_block(e, &nm);
                    // Relaxed: under the lock.
                    if i == k && e.state.load(Ordering::Relaxed) == NAMED_READY {
                        e.state.store(0, Ordering::Relaxed);
                        let off = e.offset.load(Ordering::Relaxed);
                        live.retain(|&p| p != off);
                        let _ = locked.tlsf().free(off);
                    }
                }
            }
            7 => {
                let _ = locked.trim(name);
            }
            8 => {
                if locked.reset(name).is_ok() {
                    live.clear();
                    valid = locked.check(name).is_ok();
                }
            }
            9 => {
                // What the next locker does after a holder died.
                if locked.tlsf().recover().is_ok() {
                    assert!(locked.tlsf().check().is_ok(), "recover succeeded but the block chain is invalid");
                    let _ = cache::reclaim_if(&locked.cache_ref(), &locked, |_, _| true);
                    live.clear();
                }
                rejudge = true;
            }
            10 if !live.is_empty() => {
                let p = live[c as usize % live.len()];
                let _ = locked.tlsf().resize_in_place(p, n.max(1));
            }
            11 => {
                // A refill carving from a slot's chunk (the block is then the program's).
                if let Some(p) = cache::carve_slot(&locked, c as usize, n.max(1)) {
                    live.push(p);
                }
                let _ = cache::parked(&locked.cache_ref(), &locked);
            }
            _ => {
                let _ = cache::parked(&locked.cache_ref(), &locked);
            }
        }
        if rejudge {
            valid = locked.check(name).is_ok();
        } else if valid {
            if let Err(e) = locked.check(name) {
                panic!("operation {kind} on a valid heap left it invalid: {e:?}");
            }
        }
        look(&locked);
    }
    drop(locked);
}

/// Builds a real heap in the `mapped` bytes at `section` (zeroed): header, allocator, `named`
/// named objects, `cached` cache slots with parked blocks, a mix of used and free blocks.
///
/// # Safety
/// As for [`exercise`].
pub(crate) unsafe fn build(section: *mut u8, mapped: u64, named: usize, cached: usize, steps: usize) {
    // SAFETY: forwarded.
    let shared = unsafe { fresh_lock(section) };
    // SAFETY: as above.
    let locked = unsafe { Locked::acquire(shared, section, mapped, "seed") }.expect("a fresh lock locks");
    // Relaxed: private memory under the lock.
    shared.reserved.store(mapped, Ordering::Relaxed);
    locked.tlsf().init(mapped - AREA_OFFSET).expect("a fresh area initialises");
    shared.committed.store(mapped.max(MIN_HEAP.min(mapped)), Ordering::Relaxed);
    shared.magic.store(MAGIC, Ordering::Relaxed);
    shared.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
    shared.fingerprint.store(FINGERPRINT, Ordering::Relaxed);
    shared.instance.store(0x1234_5679, Ordering::Relaxed);
    shared.ready.store(READY, Ordering::Relaxed);
    let t = locked.tlsf();
    let mut live = Vec::new();
    for i in 0..steps {
        if i % 3 == 2 && !live.is_empty() {
            let p = live.swap_remove(i % live.len());
            t.free(p).expect("freeing a live block");
        } else if let Ok(p) = t.alloc(1 + (i as u64 * 53) % 700, 16) {
            live.push(p);
        }
    }
    for (i, e) in shared.names.iter().take(named).enumerate() {
        let size = 8 + 8 * i as u64;
        let off = t.alloc(size, 16).expect("room for a named object");
        let nm = format!("obj{i}");
        crate::names::pack(&e.name, &nm);
        e.name_len.store(nm.len() as u16, Ordering::Relaxed);
        e.kind.store(0, Ordering::Relaxed);
        e.offset.store(off, Ordering::Relaxed);
        e.size.store(size, Ordering::Relaxed);
        e.type_tag.store(0x7a6 + i as u64, Ordering::Relaxed);
        e.state.store(NAMED_READY, Ordering::Relaxed);
    }
    for slot in 0..cached {
        let blocks: Vec<u64> = (0..5).filter_map(|k| t.alloc(16 + 48 * (k + slot as u64), 16).ok()).collect();
        cache::seed_slot(&locked, slot * 3, 0x100 + slot as u64, &blocks).expect("room for a cache store");
    }
    locked.check("seed").expect("a real heap state is valid");
}
