//! The registry's readers. Without the lock (the first-touch fault handler, `ls`): each
//! section entry is a seqlock, copied and validated ([`Registry::read_entry`]); with or without
//! it, the validating scan ([`Registry::scan`]), lookups by address, and process liveness.

use std::sync::atomic::{AtomicU32, Ordering, fence};

use super::Registry;
use super::layout::*;

/// A consistent copy of one section entry.
#[derive(Debug, Clone, Copy)]
pub struct SectionRecord {
    pub(crate) slot: u32,
    pub(crate) state: u32,
    pub(crate) name: InlineName,
    pub(crate) kind: SectionKind,
    pub(crate) lifetime: Lifetime,
    pub(crate) mode: u32,
    pub(crate) owner_uid: u32,
    pub(crate) generation: u64,
    pub(crate) offset: u64,
    pub(crate) reserved: u64,
    pub(crate) committed: u64,
    pub(crate) created_at: u64,
    pub(crate) creator_pid: u32,
    /// The creator's peer token.
    pub(crate) creator_token: u64,
    /// Whether the section's contents are initialised (raw sections: from creation).
    pub(crate) ready: bool,
}

impl SectionRecord {
    /// A live raw section record in `slot` with `generation`, at offset 0, one page: for unit
    /// tests of code that only looks at those fields.
    #[cfg(test)]
    pub(crate) fn for_test(slot: u32, generation: u64) -> SectionRecord {
        let words: [std::sync::atomic::AtomicU64; 8] = Default::default();
        pack_name(&words, "t");
        SectionRecord {
            slot,
            state: LIVE,
            name: unpack_name(&words, 1).expect("a valid name"),
            kind: SectionKind::Raw,
            lifetime: Lifetime::Persistent,
            mode: 0o600,
            owner_uid: 0,
            generation,
            offset: 0,
            reserved: 4096,
            committed: 0,
            created_at: 0,
            creator_pid: 0,
            creator_token: 0,
            ready: true,
        }
    }

    /// Bytes of window this section occupies (its reserved size rounded up to the chunk).
    pub(crate) fn span(&self) -> u64 {
        self.reserved.div_ceil(CHUNK) * CHUNK
    }
}

/// A process registration's liveness token: `(slot + 1) << 32 | incarnation`, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcToken(pub u64);

/// The process slot a token names, if the value is a token at all (for messages).
pub(crate) fn token_slot(token: u64) -> Option<u32> {
    ProcToken(token).parts().map(|(slot, _)| slot)
}

impl ProcToken {
    pub(super) fn new(slot: u32, incarnation: u32) -> ProcToken {
        ProcToken((slot as u64 + 1) << 32 | incarnation as u64)
    }
    /// The slot and incarnation, if the value is a token at all.
    pub(super) fn parts(self) -> Option<(u32, u32)> {
        let (hi, lo) = ((self.0 >> 32) as u32, self.0 as u32);
        (hi != 0 && lo != 0).then(|| (hi - 1, lo))
    }
}

/// A copy of one process entry.
#[derive(Debug, Clone, Copy)]
pub struct ProcRecord {
    pub(crate) slot: u32,
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) attached_at: u64,
    pub(crate) alive: bool,
}

/// A section slot in use whose fields fail validation (see [`Registry::scan`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DamagedEntry {
    /// The slot.
    pub slot: u32,
    /// Its generation field as stored (possibly damaged too).
    pub generation: u64,
    /// Its name field as stored, non-printable bytes shown as `?`.
    pub name: String,
    /// What failed.
    pub problem: String,
}

/// What a full, validating pass over a registry's tables found.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scan {
    /// Valid entries in use (any state but `FREE`).
    pub entries: Vec<SectionRecord>,
    /// Slots in use that are not valid records.
    pub damaged: Vec<DamagedEntry>,
    /// Damage to the registry as a whole (counters, overlapping ranges, chunk table).
    pub problems: Vec<String>,
}

impl Scan {
    /// Whether nothing failed validation.
    pub fn is_sound(&self) -> bool {
        self.damaged.is_empty() && self.problems.is_empty()
    }

    /// Every failure, one line each.
    pub fn describe(&self) -> Vec<String> {
        let mut v = self.problems.clone();
        v.extend(
            self.damaged
                .iter()
                .map(|d| format!("slot {} ({:?}, generation {}): {}", d.slot, d.name, d.generation, d.problem)),
        );
        v
    }
}

impl Registry {
    /// Reads one section entry without the lock. `None` if the slot is not in use, the entry
    /// is invalid, or it kept changing (a writer died mid-update; the next locker repairs it).
    /// Allocation-free and async-signal-safe.
    pub fn read_entry(&self, slot: u32) -> Option<SectionRecord> {
        if slot >= self.backed_slots() {
            return None;
        }
        let e = self.entry(slot);
        for _ in 0..1000 {
            // Acquire: pairs with the writer's final Release store of `seq`.
            let s1 = e.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let rec = self.copy_entry(slot, e);
            // Acquire fence: pairs with the writer's Release fence after it made `seq` odd, so if
            // any field read above came from a newer write, the re-read below sees `seq` moved.
            fence(Ordering::Acquire);
            // Relaxed: ordered by the fence above.
            if e.seq.load(Ordering::Relaxed) == s1 {
                return rec;
            }
        }
        None
    }

    pub(super) fn copy_entry(&self, slot: u32, e: &SectionEntryShared) -> Option<SectionRecord> {
        self.check_entry(slot, e).ok().flatten()
    }

    /// Copies and validates one entry: `Ok(None)` for a free slot, `Err(what failed)` for a
    /// slot in use whose fields are not a valid record. Allocation-free on success (the fault
    /// handler goes through here); a failure message allocates, which is why the signal path
    /// uses [`Registry::read_entry`] and only ever sees `None`.
    pub(super) fn check_entry(
        &self,
        slot: u32,
        e: &SectionEntryShared,
    ) -> std::result::Result<Option<SectionRecord>, String> {
        // Relaxed loads: consistency is established by the seqlock (or the lock) of the caller.
        let state = e.state.load(Ordering::Relaxed);
        if state == FREE {
            return Ok(None);
        }
        if state > DELETING {
            return Err(format!("state {state} is none of free/creating/live/deleting (0-3)"));
        }
        let name_len = e.name_len.load(Ordering::Relaxed);
        let Some(name) = unpack_name(&e.name, name_len) else {
            return Err(format!(
                "name {:?} (length {name_len}) is not 1-{} characters of [A-Za-z0-9._-]",
                raw_name(&e.name, name_len),
                crate::names::MAX_NAME_LEN
            ));
        };
        let kind = e.kind.load(Ordering::Relaxed);
        let Some(kind) = SectionKind::from_raw(kind) else {
            return Err(format!("kind {kind} is none of raw/heap/queue (1-3)"));
        };
        let lifetime = e.lifetime.load(Ordering::Relaxed);
        let Some(lifetime) = Lifetime::from_raw(lifetime) else {
            return Err(format!("lifetime {lifetime} is neither persistent (1) nor transient (2)"));
        };
        let rec = SectionRecord {
            slot,
            state,
            name,
            kind,
            lifetime,
            mode: e.mode.load(Ordering::Relaxed),
            owner_uid: e.owner_uid.load(Ordering::Relaxed),
            generation: e.generation.load(Ordering::Relaxed),
            offset: e.offset.load(Ordering::Relaxed),
            reserved: e.reserved.load(Ordering::Relaxed),
            committed: e.committed.load(Ordering::Relaxed),
            created_at: e.created_at.load(Ordering::Relaxed),
            creator_pid: e.creator_pid.load(Ordering::Relaxed),
            creator_token: e.creator_token.load(Ordering::Relaxed),
            ready: e.ready.load(Ordering::Relaxed) == READY_SECTION,
        };
        let in_window = rec.offset % CHUNK == 0
            && rec.reserved > 0
            && rec.reserved <= self.window_size
            && rec.offset.checked_add(rec.span()).is_some_and(|end| end <= self.window_size);
        if !in_window {
            return Err(format!(
                "range offset {:#x} + {:#x} bytes is not a chunk-aligned range inside the {:#x}-byte window",
                rec.offset, rec.reserved, self.window_size
            ));
        }
        if rec.generation == 0 {
            return Err("generation 0 (generations start at 1)".into());
        }
        if rec.mode > 0o777 {
            return Err(format!("mode {:#o} is not a permission mode", rec.mode));
        }
        // `ready` is 0 or READY_SECTION and nothing else: a damaged word must not pass for
        // "never finished", which would get a finished section removed as its dead creator's
        // leftover.
        let ready = e.ready.load(Ordering::Relaxed);
        if ready != 0 && ready != READY_SECTION {
            return Err(format!("ready word {ready:#010x} is neither 0 nor {READY_SECTION:#010x}"));
        }
        Ok(Some(rec))
    }

    /// [`Registry::read_entry`] with the reason a slot in use is not a valid record.
    pub(super) fn read_entry_checked(&self, slot: u32) -> std::result::Result<Option<SectionRecord>, String> {
        let e = self.entry(slot);
        for _ in 0..1000 {
            // Acquire: pairs with the writer's final Release store of `seq` (as in `read_entry`).
            let s1 = e.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let rec = self.check_entry(slot, e);
            // Acquire fence: as in `read_entry`.
            fence(Ordering::Acquire);
            // Relaxed: ordered by the fence above.
            if e.seq.load(Ordering::Relaxed) == s1 {
                return rec;
            }
        }
        // Relaxed: diagnostic only.
        Err(format!(
            "its sequence word {} stayed odd (a writer died mid-update, or it is damaged)",
            e.seq.load(Ordering::Relaxed)
        ))
    }

    /// Validates every table, not only the header: each slot in use is a valid record with a
    /// generation below `next_generation` and unique. With `locked` (the caller holds the
    /// lock, or the registry is a private copy nobody writes), also: the high-water marks cover
    /// every slot in use, live ranges do not overlap, and the chunk table (when present) and
    /// the live entries agree. Those are skipped without the lock, where a writer between two
    /// stores would look like damage.
    pub fn scan(&self, locked: bool) -> Scan {
        let mut out = Scan::default();
        let h = self.header();
        // Relaxed: written under the lock; only compared when the caller holds it.
        let slots_high = if locked { h.slots_high.load(Ordering::Relaxed) } else { u32::MAX };
        let procs_high = if locked { h.procs_high.load(Ordering::Relaxed) } else { u32::MAX };
        let (backed_slots, backed_procs) = (self.backed_slots(), self.backed_procs());
        if locked && slots_high > self.max_sections {
            out.problems.push(format!("slots_high {slots_high} exceeds max_sections {}", self.max_sections));
        }
        if locked && procs_high > self.max_procs {
            out.problems.push(format!("procs_high {procs_high} exceeds max_procs {}", self.max_procs));
        }
        let mut found: Vec<SectionRecord> = Vec::new();
        for slot in 0..backed_slots {
            let e = self.entry(slot);
            // Relaxed: a cheap pre-check; the slot is read properly below.
            if e.state.load(Ordering::Relaxed) == FREE && e.seq.load(Ordering::Relaxed) & 1 == 0 {
                continue;
            }
            let damaged = |problem: String| DamagedEntry {
                slot,
                // Relaxed: diagnostic copies of possibly damaged fields.
                generation: e.generation.load(Ordering::Relaxed),
                name: raw_name(&e.name, e.name_len.load(Ordering::Relaxed)),
                problem,
            };
            match self.read_entry_checked(slot) {
                Ok(None) => {}
                Ok(Some(rec)) if slot >= slots_high => {
                    out.damaged.push(damaged(format!("slot {slot} is in use above slots_high {slots_high}")));
                    let _ = rec;
                }
                Ok(Some(rec)) => found.push(rec),
                Err(problem) => out.damaged.push(damaged(problem)),
            }
        }
        // Relaxed, but read after the entries: an entry we read was published by its seqlock's
        // Release store, which its creator made after bumping `next_generation`, and our
        // Acquire load of `seq` makes that bump visible here; so a sound entry created while
        // we scanned still has a generation below the value we see.
        let next_generation = h.next_generation.load(Ordering::Relaxed);
        for rec in found {
            let e = self.entry(rec.slot);
            let damaged = |problem: String| DamagedEntry {
                slot: rec.slot,
                generation: rec.generation,
                name: raw_name(&e.name, rec.name.len as u32),
                problem,
            };
            if rec.generation >= next_generation {
                out.damaged.push(damaged(format!(
                    "generation {} is not below the registry's next generation {next_generation}",
                    rec.generation
                )));
            } else if let Some(other) = out.entries.iter().find(|o| o.generation == rec.generation) {
                out.damaged
                    .push(damaged(format!("generation {} is also recorded by slot {}", rec.generation, other.slot)));
            } else {
                out.entries.push(rec);
            }
        }
        for slot in procs_high.min(backed_procs)..backed_procs {
            // Relaxed: diagnostic.
            if self.proc_entry(slot).state.load(Ordering::Relaxed) != 0 {
                out.problems.push(format!("process slot {slot} is in use above procs_high {procs_high}"));
                break;
            }
        }
        if !locked {
            return out;
        }
        let mut ranges: Vec<(u64, u64, u32)> =
            out.entries.iter().filter(|r| r.state == LIVE).map(|r| (r.offset, r.offset + r.span(), r.slot)).collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                out.problems.push(format!("the window ranges of slots {} and {} overlap", w[0].2, w[1].2));
            }
        }
        // Every backed chunk is in this mapping or copy (see "Growth").
        {
            // Per slot: the range a valid entry covers, or anything for a damaged one (whose
            // range is unknown and already reported).
            let mut by_slot: Vec<Option<(u64, u64)>> = vec![None; self.max_sections as usize];
            for r in &out.entries {
                by_slot[r.slot as usize] = Some((r.offset, r.offset + r.span()));
            }
            for d in &out.damaged {
                by_slot[d.slot as usize] = Some((0, u64::MAX));
            }
            for c in 0..self.backed_chunks() {
                // Under the lock (the caller's promise with `locked`).
                let v = self.chunk_owner(c);
                if v == 0 {
                    continue;
                }
                let covers = by_slot
                    .get(v as usize - 1)
                    .copied()
                    .flatten()
                    .is_some_and(|(lo, hi)| c * CHUNK >= lo && c * CHUNK < hi);
                if !covers {
                    out.problems.push(format!(
                        "chunk {c} of the window is recorded as slot {}'s, which does not cover it",
                        v - 1
                    ));
                    break;
                }
            }
            for r in out.entries.iter().filter(|r| r.state == LIVE) {
                if self.chunk_owner(r.offset / CHUNK) != r.slot + 1 {
                    out.problems.push(format!(
                        "the chunk table does not record section {:?} (slot {}) at its offset",
                        r.name.as_str(),
                        r.slot
                    ));
                }
            }
        }
        out
    }

    /// The live section covering window offset `offset`, found through the chunk table in
    /// constant time. Allocation-free and async-signal-safe.
    pub fn lookup_offset(&self, offset: u64) -> Option<SectionRecord> {
        if offset >= self.window_size {
            return None;
        }
        // The entry read below is validated by its own seqlock, and the range check rejects a
        // stale table value.
        let v = self.chunk_owner(offset / CHUNK);
        if v == 0 || v > self.backed_slots() {
            return None;
        }
        let rec = self.read_entry(v - 1)?;
        (rec.state == LIVE && offset >= rec.offset && offset < rec.offset + rec.reserved).then_some(rec)
    }

    /// The sub-ranges of `[offset, offset + span)` whose chunks no section owns now, merged into
    /// runs of `(offset, len)`.
    pub fn free_runs(&self, offset: u64, span: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in offset / CHUNK..(offset + span).min(self.window_size) / CHUNK {
            // A chunk handed out after this read is mapped by its new owner's own open, which
            // takes the same per-process `map_lock` the caller holds.
            if self.chunk_owner(c) != 0 {
                continue;
            }
            match runs.last_mut() {
                Some((o, l)) if *o + *l == c * CHUNK => *l += CHUNK,
                _ => runs.push((c * CHUNK, CHUNK)),
            }
        }
        runs
    }

    /// Every entry in use, read without the lock (for inspection).
    pub fn entries(&self) -> Vec<SectionRecord> {
        // Every backed slot, not only those below `slots_high`: a damaged high-water mark must
        // not hide sections (a free slot costs one load).
        (0..self.backed_slots())
            // Relaxed: a pre-check; the entry is read through its seqlock.
            .filter(|&s| self.entry(s).state.load(Ordering::Relaxed) != FREE)
            .filter_map(|s| self.read_entry(s))
            .collect()
    }

    /// Whether the token byte of process slot `slot` is locked by anyone (this process's own
    /// token descriptors included: `fd` never holds a lock). An error counts as locked, so a
    /// failing query never declares a live process dead.
    pub(super) fn proc_locked(&self, slot: u32) -> bool {
        self.fd.byte_is_locked(self.proc_offset(slot)).unwrap_or(true)
    }

    /// Every process entry in use, with its liveness (from the kernel's lock table).
    pub fn procs(&self) -> Vec<ProcRecord> {
        // Relaxed: an upper bound only.
        let high = self.header().procs_high.load(Ordering::Relaxed).min(self.backed_procs());
        (0..high)
            .filter_map(|slot| {
                let p = self.proc_entry(slot);
                let alive = self.proc_locked(slot);
                // Acquire: after the lock query, as in `proc_alive`. The other fields are
                // informational.
                if p.state.load(Ordering::Acquire) == 0 {
                    return None;
                }
                Some(ProcRecord {
                    slot,
                    pid: p.pid.load(Ordering::Relaxed),
                    uid: p.uid.load(Ordering::Relaxed),
                    attached_at: p.attached_at.load(Ordering::Relaxed),
                    alive,
                })
            })
            .collect()
    }

    /// Whether the registration `token` names is still in place and its process alive (holds
    /// its liveness lock). 0, or anything that is not a token of this registry, is nobody.
    pub fn proc_alive(&self, token: u64) -> bool {
        let Some((slot, incarnation)) = ProcToken(token).parts() else { return false };
        if slot >= self.backed_procs() || !self.proc_locked(slot) {
            return false;
        }
        let p = self.proc_entry(slot);
        // Acquire, and only after the lock query: a new registration of the slot bumps
        // `incarnation` before it takes the lock, so a lock seen held by a newer registration
        // comes with its newer incarnation (the kernel's lock table orders the two).
        p.state.load(Ordering::Acquire) != 0 && p.incarnation.load(Ordering::Acquire) == incarnation
    }

    /// Whether every thread that may hold a lock in this domain's memory belongs to pid
    /// namespace `ns` (0: unknown, never), so that a thread id with no live thread in our
    /// namespace names a dead holder (see `sync::robust`, "Owner death"). Who may hold one:
    /// an attached process, and a tool that has not attached, which takes the domain's locks
    /// only while it holds the registry lock (`gc`). So: the registry lock is free, or held by
    /// a holder without a token that recorded `ns` (a holder with a token, or one not yet
    /// recorded, cannot be placed here: `false` for this look, the waiter looks again), and
    /// every slot whose token is held recorded `ns` (a process whose token is dead is not
    /// asked: its threads are gone). A slow path: one lock-table query per process slot.
    ///
    /// Ordering: a process records its namespace before it takes its token
    /// ([`RegistryGuard::register_proc`]), and takes its token (`fcntl`) and maps the domain
    /// (`mmap`) before it can take any of the domain's locks; a waiter saw that lock word
    /// before it asks the kernel's lock table here. The kernel's lock table orders the token
    /// against the query (as in `proc_alive`), and the system calls in between are full
    /// barriers on the machines this runs on, so a holder whose word we saw is found here.
    pub fn threads_visible(&self, ns: u64) -> bool {
        use crate::sync::robust::Holder;
        if ns == 0 {
            return false;
        }
        match self.header().lock.holder() {
            Holder::Free => {}
            Holder::Recorded { token: 0, ns: holder_ns } if holder_ns == ns => {}
            _ => return false,
        }
        // Acquire: a registration's slot is counted before its process can lock anything.
        let high = self.header().procs_high.load(Ordering::Acquire).min(self.backed_procs());
        (0..high).all(|slot| {
            if !self.proc_locked(slot) {
                return true;
            }
            // Ordered after the lock query by the kernel's lock table (see above). A slot
            // locked with `state` 0 is a registration being released: its process may still
            // run, so it must be in `ns` as well.
            self.proc_entry(slot).pid_ns.load(Ordering::Acquire) == ns
        })
    }

    /// The pid recorded for the registration `token` names (for display), if it is in place.
    pub fn proc_pid(&self, token: u64) -> Option<u32> {
        let (slot, incarnation) = ProcToken(token).parts()?;
        if slot >= self.backed_procs() {
            return None;
        }
        let p = self.proc_entry(slot);
        // Relaxed: display only.
        (p.incarnation.load(Ordering::Relaxed) == incarnation).then(|| p.pid.load(Ordering::Relaxed))
    }

    /// The pid word of process slot `slot` (a forked child writes its pid there).
    pub(crate) fn proc_pid_word(&self, token: u64) -> Option<&AtomicU32> {
        let (slot, _) = ProcToken(token).parts()?;
        (slot < self.backed_procs()).then(|| &self.proc_entry(slot).pid)
    }
}
