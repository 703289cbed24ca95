//! How sections get mapped in this process: the per-slot words and every transition on them.
//!
//! One [`Mapping`] per attachment holds, per registry slot, which generation of a section is
//! mapped here, how many [`Section`](crate::Section) handles this process holds to it, and
//! whether this process deleted it while holding handles. Nothing else writes these words:
//! `section` (handles), `fault` (first touch), `domain` (map all, ensure mapped, the testing
//! hook) and `attachment` call the methods below.
//!
//! # Per-slot mapping word (`mapped[slot]`)
//!
//! | value          | meaning                                   | next                 |
//! |----------------|-------------------------------------------|----------------------|
//! | `g` (not `gen`) | another generation, or 0: not mapped here | `gen \| BUSY` (CAS, [`Mapping::fault_in`]) or `gen` (under `lock`, [`Mapping::map_held`]) |
//! | `gen \| BUSY`   | one thread is mapping generation `gen` on a fault | `gen`, or back to `g` on failure |
//! | `gen`          | mapped                                    | 0 when unmapped ([`Mapping::release`], [`Mapping::forget_removed`], [`Mapping::forget`]) |
//!
//! The thread that wins the CAS maps; others that fault on the same section meanwhile spin
//! until the word leaves `BUSY` and then retry their instruction, so each section is mapped
//! once however many threads touch it at the same time. Explicit maps and unmaps (not in a
//! signal handler) are serialised by `lock`; a mapping word read outside it is a hint
//! (mapping the same object at the same place twice is harmless).
//!
//! # Handles and unmapping a deleted section
//! * `handles[slot]` counts live `Section` handles (and exit-flush pins,
//!   [`Mapping::hold_if_mapped`]). [`Mapping::map_held`] increments it (Release, under
//!   `lock`); [`Mapping::release`] decrements it (SeqCst).
//! * `unmap_when_unused[slot]` is the generation this process deleted (or saw removed) while
//!   handles were held. The last handle's release, or the removal itself when no handle is
//!   held, gives the range back to a bare reservation ([`Mapping::forget_removed`]); the flag
//!   and the mapping word are re-checked under `lock`, so a handle taken meanwhile keeps it.
//!   The removal stores the flag then reads the count; the last release decrements the count
//!   then reads the flag: all four SeqCst, so at least one of the two sees the other's write
//!   and unmaps (with weaker orderings each could miss the other, the store still in its
//!   core's store buffer, and the section would stay mapped until the detach).
//!
//! # Protection changed by this process (`protected[slot]`)
//! The generation whose protection `Section::protect` changed here (0: none), stored under
//! `lock` before the `mprotect` ([`Mapping::protect`]) and cleared with the mapping word when
//! the slot is unmapped. The fault handler reads it (relaxed) and passes a fault on a marked,
//! mapped section on instead of mapping it again, which would undo the protection.
//!
//! Every unmapping, and every explicit map of a generation over an older one still mapped,
//! bumps [`UNMAP_EPOCH`] (heap thread caches and the exit of a thread holding locks watch it).
//! A first touch that maps a new generation over an older one (`fault_in`, lock-free) does not
//! (a section re-created in the same slot by another process, larger, touched past the old end
//! here while the old one is still mapped).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::os;
use crate::registry::{Registry, SectionRecord};

const BUSY: u64 = 1 << 63;

/// Counts unmappings of section memory in this process. Thread caches of heap blocks
/// (`heap/cache.rs`) and threads holding robust locks (`sync/robust.rs`) remember it, and one
/// that finds it changed does not touch that memory again (it may be gone from this process).
pub(crate) static UNMAP_EPOCH: AtomicU64 = AtomicU64::new(0);

/// How long [`Mapping::hold_if_mapped`] waits for the mapping lock before it gives up.
const HOLD_PATIENCE: std::time::Duration = std::time::Duration::from_millis(50);

pub(crate) fn note_unmap() {
    // Relaxed: a counter compared for equality only.
    UNMAP_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// What [`Mapping::fault_in`] did.
pub(crate) enum FaultIn<E> {
    /// This thread mapped the section.
    Mapped,
    /// The word says the section is mapped already (another thread finished just after we
    /// faulted, or the mapping was removed behind our back).
    AlreadyMapped,
    /// Another thread of this process started mapping it and never finished.
    Wedged,
    /// Mapping failed; the word is back to what it was.
    Failed(E),
}

/// The per-slot mapping words of one attachment (see the module docs).
pub(crate) struct Mapping {
    window_base: u64,
    /// Per registry slot: the generation of the section mapped there in this process (0: none).
    mapped: Box<[AtomicU64]>,
    /// Per registry slot: live `Section` handles in this process.
    handles: Box<[AtomicU32]>,
    /// Per registry slot: generation this process deleted while holding handles; unmapped when
    /// the last handle drops.
    unmap_when_unused: Box<[AtomicU64]>,
    /// Per registry slot: the generation whose protection this process changed with
    /// `Section::protect` (0: none). The fault handler then passes faults in it on instead of
    /// remapping (which would undo the protection). Cleared when the slot is unmapped.
    protected: Box<[AtomicU64]>,
    /// Serialises explicit map and unmap calls in this process.
    lock: Mutex<()>,
}

impl Mapping {
    pub(crate) fn new(window_base: u64, slots: u32) -> Mapping {
        Mapping {
            window_base,
            mapped: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            handles: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            unmap_when_unused: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            protected: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            lock: Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mapping lock for a thread-exit path that touches section memory without a handle
    /// (see [`crate::domain::if_still_mapped`]): while held, nothing of this attachment is
    /// unmapped. None after `HOLD_PATIENCE` (as in [`Mapping::hold_if_mapped`]).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn lock_for_exit(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.guard_within(HOLD_PATIENCE)
    }

    /// `lock`, if it can be had within `patience` (polled: std's mutex has no timed lock).
    fn guard_within(&self, patience: std::time::Duration) -> Option<std::sync::MutexGuard<'_, ()>> {
        let start = std::time::Instant::now();
        let mut tries = 0u32;
        loop {
            match self.lock.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            tries += 1;
            if tries < 64 {
                std::thread::yield_now();
            } else if start.elapsed() > patience {
                return None;
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }

    /// Whether generation `rec.generation` of the section is mapped in this process. A hint:
    /// one relaxed load, lock-free and async-signal-safe.
    #[inline]
    pub(crate) fn is_mapped(&self, rec: &SectionRecord) -> bool {
        // Relaxed: a hint only; mapping the same object at the same place twice is harmless.
        self.mapped[rec.slot as usize].load(Ordering::Relaxed) == rec.generation
    }

    /// Whether this process changed the protection of generation `rec.generation` of the
    /// section. One relaxed load, async-signal-safe.
    #[inline]
    pub(crate) fn is_protected(&self, rec: &SectionRecord) -> bool {
        // Relaxed: set by this process before the `mprotect` whose faults it explains (program
        // order on the protecting thread; another thread's access races with `protect` anyway).
        self.protected[rec.slot as usize].load(Ordering::Relaxed) == rec.generation
    }

    /// Changes this process's protection of `[addr, addr + len)` of mapped section `rec`, and
    /// notes it for the fault handler.
    ///
    /// # Safety
    /// The range must lie inside the section's mapping, which the caller keeps mapped (holds a
    /// handle), and no live Rust reference may point into it.
    pub(crate) unsafe fn protect(
        &self,
        rec: &SectionRecord,
        addr: usize,
        len: usize,
        protection: os::Protection,
    ) -> std::io::Result<()> {
        let _guard = self.guard();
        // Relaxed: see `is_protected`.
        self.protected[rec.slot as usize].store(rec.generation, Ordering::Relaxed);
        // SAFETY: forwarded from the caller.
        unsafe { os::protect(addr, len, protection) }
    }

    /// Maps `object` at the section's place unless this process has it mapped already, and
    /// takes one handle on it (released with [`Mapping::release`]). `object` may be closed
    /// afterwards: the mapping keeps the object alive.
    /// `data_offset`: where the section's bytes start in `object` (0, or a file-backed
    /// section's header page).
    pub(crate) fn map_held(&self, rec: &SectionRecord, object: &os::Object, data_offset: u64) -> std::io::Result<()> {
        let _guard = self.guard();
        if !self.is_mapped(rec) {
            let addr = (self.window_base + rec.offset) as usize;
            // SAFETY: `[addr, addr + reserved)` lies inside this process's reservation of the
            // window (the record was validated against the window size) and belongs to this
            // section alone, so MAP_FIXED replaces only our own reservation or an older mapping
            // of this same slot, which no Rust reference can point into (section memory is
            // reached through raw pointers only). A file-backed section's file is at least
            // `data_offset + reserved` bytes long (checked when it was opened).
            if data_offset == 0 {
                // SAFETY: as above.
                unsafe { os::map_shared_fixed(object, addr, rec.reserved as usize, os::Access::ReadWrite) }?;
            } else {
                // SAFETY: as above.
                unsafe { os::map_file_fixed(object, addr, rec.reserved as usize, data_offset) }?;
            }
            // Relaxed: see `is_mapped`. Changed under `lock`, which we hold.
            let before = self.mapped[rec.slot as usize].swap(rec.generation, Ordering::Relaxed);
            if before != 0 {
                // An older generation of the slot was mapped here and is now replaced: its
                // memory is gone for whoever still used it (the epoch's watchers).
                note_unmap();
            }
        }
        // Release: pairs with the Acquire loads in `forget_removed`/`unmap_deleted`.
        self.handles[rec.slot as usize].fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Takes one handle on section `rec` (released with [`Mapping::release`]) if this process
    /// has it mapped; false (nothing taken) otherwise. Never maps: for code that must not touch
    /// a section unless it is still there, such as a thread cache's exit flush (`heap/cache.rs`).
    ///
    /// Gives up (false) if `lock` stays taken for `HOLD_PATIENCE`: in a forked child it may be
    /// held for good by a parent thread that does not exist there, and a thread exiting must
    /// not hang on it (skipping the flush is always allowed).
    pub(crate) fn hold_if_mapped(&self, rec: &SectionRecord) -> bool {
        let Some(_guard) = self.guard_within(HOLD_PATIENCE) else { return false };
        // Relaxed: only an unmapping (under `lock`, which we hold) moves the word away from
        // `gen`; `fault_in` changes it lock-free only while it is not `gen`.
        if self.mapped[rec.slot as usize].load(Ordering::Relaxed) != rec.generation {
            return false;
        }
        // Release: pairs with the Acquire loads in `forget_removed`/`unmap_deleted`, as in
        // `map_held`.
        self.handles[rec.slot as usize].fetch_add(1, Ordering::Release);
        true
    }

    /// Maps section `rec` from the fault handler with `map` (which maps it at its place),
    /// unless another thread has or is doing so. Async-signal-safe (atomics only, plus `map`).
    pub(crate) fn fault_in<E>(&self, rec: &SectionRecord, map: impl FnOnce() -> Result<(), E>) -> FaultIn<E> {
        let word = &self.mapped[rec.slot as usize];
        let mut spins = 0u64;
        loop {
            // Acquire: pairs with the Release store that ends a mapping, so a thread that sees
            // `gen` retries its access after the mapping exists.
            let cur = word.load(Ordering::Acquire);
            if cur == rec.generation {
                return FaultIn::AlreadyMapped;
            }
            if cur == rec.generation | BUSY {
                spins += 1;
                if spins > 1 << 26 {
                    return FaultIn::Wedged; // crash rather than hang
                }
                std::hint::spin_loop();
                continue;
            }
            // Acquire on success: orders our mapping after the previous owner's (see table).
            if word.compare_exchange(cur, rec.generation | BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                let mapped = map();
                // Release: publishes the new mapping to threads that read `gen`; pairs with
                // the Acquire load above.
                word.store(if mapped.is_ok() { rec.generation } else { cur }, Ordering::Release);
                return match mapped {
                    Ok(()) => FaultIn::Mapped,
                    Err(e) => FaultIn::Failed(e),
                };
            }
        }
    }

    /// Releases one handle taken by [`Mapping::map_held`]. The last handle to a section this
    /// process removed meanwhile unmaps it.
    pub(crate) fn release(&self, rec: &SectionRecord, registry: &Registry) {
        // SeqCst: the last handle's decrement and its read of the flag (in `unmap_deleted`)
        // against a concurrent removal's store of the flag and read of the count (module docs).
        if self.handles[rec.slot as usize].fetch_sub(1, Ordering::SeqCst) == 1 {
            self.unmap_deleted(rec, registry);
        }
    }

    /// After `rec` was removed from the registry: unmaps it from this process now, or when
    /// this process's last handle to it is released.
    pub(crate) fn forget_removed(&self, rec: &SectionRecord, registry: &Registry) {
        let slot = rec.slot as usize;
        // SeqCst: against the last handle's release (module docs, "Handles").
        self.unmap_when_unused[slot].store(rec.generation, Ordering::SeqCst);
        // SeqCst: as above; also pairs with the Release increment in `map_held`.
        if self.handles[slot].load(Ordering::SeqCst) == 0 {
            self.unmap_deleted(rec, registry);
        }
    }

    /// Gives back the window range of a section this process removed: every chunk of it that
    /// the registry has not handed to another section since becomes a bare reservation again.
    fn unmap_deleted(&self, rec: &SectionRecord, registry: &Registry) {
        let _guard = self.guard();
        let slot = rec.slot as usize;
        // SeqCst for the flag: a removal stores it without `lock` (module docs, "Handles");
        // the mapping word is only changed under `lock` (or is a hint).
        if self.unmap_when_unused[slot].load(Ordering::SeqCst) != rec.generation
            || self.mapped[slot].load(Ordering::Relaxed) != rec.generation
            || self.handles[slot].load(Ordering::Acquire) != 0
        {
            return;
        }
        self.unmap_when_unused[slot].store(0, Ordering::Relaxed);
        self.mapped[slot].store(0, Ordering::Relaxed);
        self.protected[slot].store(0, Ordering::Relaxed);
        note_unmap();
        for (off, len) in registry.free_runs(rec.offset, rec.span()) {
            // SAFETY: the range lies inside this process's window reservation, belongs to a
            // section that is deleted and no longer handed out by the registry, and this
            // process holds no `Section` handle to it (checked above under `lock`).
            let _ = unsafe { os::restore_reservation((self.window_base + off) as usize, len as usize) };
        }
    }

    /// Unmaps a live section from this process (back to a bare reservation) so the next touch
    /// is a first touch again (`__testing::forget_mapping`). `Ok(false)` if this process holds
    /// a handle to it.
    pub(crate) fn forget(&self, rec: &SectionRecord) -> std::io::Result<bool> {
        let _guard = self.guard();
        // Acquire: pairs with the Release increment in `map_held`.
        if self.handles[rec.slot as usize].load(Ordering::Acquire) != 0 {
            return Ok(false);
        }
        // Relaxed: changed under `lock`; the handler only maps on a fault, which cannot
        // happen for this range while it is still mapped.
        self.mapped[rec.slot as usize].store(0, Ordering::Relaxed);
        self.protected[rec.slot as usize].store(0, Ordering::Relaxed);
        note_unmap();
        // SAFETY: the range is this section's place in our reservation and no handle to it
        // exists in this process; callers (tests, benchmarks) hold no pointers into it.
        unsafe { os::restore_reservation((self.window_base + rec.offset) as usize, rec.reserved as usize) }?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_maps_a_section_however_many_fault_on_it_at_once() {
        let m = Mapping::new(1 << 40, 4);
        let rec = SectionRecord::for_test(2, 7);
        let calls = AtomicU32::new(0);
        let mapped: u32 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let outcome = m.fault_in(&rec, || {
                            calls.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                            Ok::<(), ()>(())
                        });
                        match outcome {
                            FaultIn::Mapped => 1,
                            FaultIn::AlreadyMapped => 0,
                            FaultIn::Wedged | FaultIn::Failed(()) => panic!("no fault-in may fail here"),
                        }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(calls.load(Ordering::Relaxed), 1, "mapped once");
        assert_eq!(mapped, 1, "one thread says it mapped, the others find it mapped");
        assert!(m.is_mapped(&rec));
    }

    #[test]
    fn a_failed_first_touch_leaves_the_word_as_it_was_so_the_next_one_retries() {
        let m = Mapping::new(1 << 40, 4);
        let rec = SectionRecord::for_test(1, 3);
        assert!(matches!(m.fault_in(&rec, || Err("no")), FaultIn::Failed("no")));
        assert!(!m.is_mapped(&rec));
        assert!(matches!(m.fault_in(&rec, || Ok::<(), ()>(())), FaultIn::Mapped));
        assert!(m.is_mapped(&rec));
        assert!(matches!(m.fault_in(&rec, || -> Result<(), ()> { panic!("not again") }), FaultIn::AlreadyMapped));
    }

    #[test]
    fn a_later_generation_in_the_same_slot_is_not_mapped_until_faulted_in() {
        let m = Mapping::new(1 << 40, 4);
        let old = SectionRecord::for_test(0, 5);
        let new = SectionRecord::for_test(0, 6);
        assert!(matches!(m.fault_in(&old, || Ok::<(), ()>(())), FaultIn::Mapped));
        assert!(!m.is_mapped(&new), "the slot holds another generation");
        assert!(matches!(m.fault_in(&new, || Ok::<(), ()>(())), FaultIn::Mapped));
        assert!(m.is_mapped(&new) && !m.is_mapped(&old));
    }
}
