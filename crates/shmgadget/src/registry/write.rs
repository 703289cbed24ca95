//! The registry's writers: the registry lock (bounded waits, owner death, breaking a lock whose
//! holder is gone) and the writer guard, through which every mutation goes: creating a section
//! entry and placing it in the window, marking it live and ready, removing it, repairing after
//! a writer died, and registering processes.

use std::sync::atomic::{Ordering, fence};

use super::layout::*;
use super::read::{ProcRecord, ProcToken, SectionRecord};
use super::{Registry, corrupt, now_secs};
use crate::error::{Error, ErrorKind, Result, bail};
use crate::names;
use crate::os::{self, ErrorExt};
use crate::sync::LockOutcome;

/// Who creates a section entry, and whether it is ready at once (see "Readiness").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Creator {
    /// The creator's peer token (`Domain::peer_token`).
    pub token: u64,
    /// Ready from creation (raw sections), or only once marked (heaps, queues).
    pub ready: bool,
}

impl Registry {
    /// Takes the registry lock, repairing the registry first if the previous holder died.
    pub fn lock(&self) -> Result<RegistryGuard<'_>> {
        self.lock_inner(None)
    }

    /// [`Registry::lock`], waiting at most `timeout`: a `Timeout` error names the wait (a lock
    /// word damaged into a stranger's, or a holder that hangs, must not hang the repair tools).
    pub fn lock_within(&self, timeout: std::time::Duration) -> Result<RegistryGuard<'_>> {
        self.lock_inner(Some(timeout))
    }

    pub(super) fn lock_inner(&self, timeout: Option<std::time::Duration>) -> Result<RegistryGuard<'_>> {
        if self.private.is_some() {
            bail!(InvalidArgument, "a private copy of domain {:?}'s registry cannot be locked", self.domain);
        }
        let lock = &self.header().lock;
        // This process's registration in this domain if it is attached (found from the
        // window's address, no system call), recorded as the holder's.
        let token = os::token_for_address(self.window_base as usize);
        // The uncontended path: one try_lock.
        let outcome = match lock.try_lock(token).map_err(|e| self.unusable(e))? {
            Some(outcome) => outcome,
            None => self.lock_slow(token, timeout.unwrap_or(crate::sync::LOCK_PATIENCE))?,
        };
        // Relaxed: the holder's own record, ordered for later lockers by the lock word and
        // only a snapshot for diagnosing waiters.
        self.header().lock_owner.store(token, Ordering::Relaxed);
        let guard = RegistryGuard { reg: self };
        if outcome == LockOutcome::OwnerDied {
            guard.repair();
            // SAFETY: we hold the lock (acquired just above).
            unsafe { self.header().lock.make_consistent() }
                .map_err(|e| Error::from_io("cannot mark the registry lock consistent", e))?;
        }
        Ok(guard)
    }

    pub(super) fn unusable(&self, e: std::io::Error) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "the registry lock of domain {:?} is unusable ({e}); run `shmgadget gc --domain {} --force` once no process uses it",
                self.domain, self.domain
            ),
        )
    }

    /// Why the registry lock's holder, named by lock word `word`, is not alive (`None`: it
    /// may be), and how to name it.
    pub(super) fn lock_holder(&self, word: u32) -> (Option<String>, String) {
        // Relaxed: a snapshot, for diagnosis.
        let token = self.header().lock_owner.load(Ordering::Relaxed);
        let pid = self.proc_pid(token).unwrap_or(0);
        let who = crate::sync::describe_holder(word, crate::registry::token_slot(token), pid);
        let alive = (token != 0).then(|| self.proc_alive(token));
        (crate::sync::holder_gone(word, alive, &who), who)
    }

    #[cold]
    pub(super) fn lock_slow(&self, token: u64, patience: std::time::Duration) -> Result<LockOutcome> {
        let lock = &self.header().lock;
        let alive = |t| Some(self.proc_alive(t));
        let waited = crate::sync::lock_patiently(lock, token, &alive, patience, |word| self.lock_holder(word).0)
            .map_err(|e| self.unusable(e))?;
        let d = &self.domain;
        match waited {
            Ok(outcome) => Ok(outcome),
            Err(crate::sync::Stuck::Gone(why)) => bail!(
                Corrupt,
                "the registry lock of domain {d} is held by {why}; run `shmgadget gc --domain {d} --force`"
            ),
            Err(crate::sync::Stuck::Slow(word)) => bail!(
                Timeout,
                "the registry lock of domain {d} is held by {} (alive) for more than {} s; if that process hangs, \
                 stop it (or, once no process uses the domain, `shmgadget gc --domain {d} --force` breaks the lock)",
                self.lock_holder(word).1,
                patience.as_secs()
            ),
        }
    }

    /// Why the registry lock cannot be had, when its holder is proven gone (the lock word
    /// names no live holder at two looks [`crate::sync::LOOK_EVERY`] apart); `None` when it is
    /// free, held by a holder that may be alive, or changes.
    pub(crate) fn lock_holder_gone(&self) -> Option<String> {
        let lock = &self.header().lock;
        let first = lock.word();
        if first == 0 {
            return None;
        }
        self.lock_holder(first).0?;
        std::thread::sleep(crate::sync::LOOK_EVERY);
        let second = lock.word();
        if second != first {
            return None;
        }
        self.lock_holder(second).0
    }

    /// Re-initialises the registry lock in place, abandoning its holder, then takes it and
    /// repairs the registry as after a holder's death. For `gc --force` only.
    ///
    /// # Safety
    /// The caller holds the shm directory's lock (no process can attach or create the domain
    /// meanwhile) and has proven the lock's holder gone ([`Registry::lock_holder_gone`]), so
    /// no thread holds the lock or is inside a lock or unlock call other than a bounded wait,
    /// which retries within [`crate::sync::LOOK_EVERY`].
    pub(crate) unsafe fn break_lock(&self) -> Result<RegistryGuard<'_>> {
        if self.private.is_some() {
            bail!(InvalidArgument, "a private copy of domain {:?}'s registry cannot be locked", self.domain);
        }
        let h = self.header();
        // SAFETY: forwarded from the caller (see above); the mapping stays while `self` lives.
        unsafe { h.lock.init() }.map_err(|e| Error::from_io("cannot re-initialise the registry lock", e))?;
        let token = os::token_for_address(self.window_base as usize);
        let outcome = h.lock.try_lock(token).map_err(|e| self.unusable(e))?;
        if outcome.is_none() {
            bail!(
                Timeout,
                "the registry lock of domain {:?} was taken by another process while it was rebuilt",
                self.domain
            );
        }
        // Relaxed: as in `lock_inner`.
        h.lock_owner.store(token, Ordering::Relaxed);
        let guard = RegistryGuard { reg: self };
        // The abandoned holder may have died mid-write: repair as after `OwnerDied`.
        guard.repair();
        Ok(guard)
    }
}

/// Proof that this thread holds the registry lock; all mutations go through it.
pub(crate) struct RegistryGuard<'a> {
    pub(super) reg: &'a Registry,
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        // Relaxed: cleared by the holder before unlocking (see `lock_owner`).
        self.reg.header().lock_owner.store(0, Ordering::Relaxed);
        // SAFETY: a guard exists only while its thread holds the lock.
        unsafe { self.reg.header().lock.unlock() }
    }
}

impl RegistryGuard<'_> {
    /// Runs `write` on entry `slot` inside a seqlock write section.
    pub(super) fn write_entry(&self, slot: u32, write: impl FnOnce(&SectionEntryShared)) {
        let e = self.reg.entry(slot);
        // Relaxed: we are the only writer (lock held), so `seq` is ours to read.
        let s = e.seq.load(Ordering::Relaxed) & !1;
        e.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Release fence: pairs with the reader's Acquire fence in `read_entry`; a reader that
        // sees any field written below also sees `seq` odd or changed.
        fence(Ordering::Release);
        write(e);
        // Release: pairs with the reader's Acquire load of `seq`; publishes the fields.
        e.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The entry of slot `slot` as seen under the lock (no retry needed).
    pub(super) fn locked_entry(&self, slot: u32) -> Option<SectionRecord> {
        self.reg.copy_entry(slot, self.reg.entry(slot))
    }

    pub(super) fn slots_high(&self) -> u32 {
        // Relaxed: written only under the lock, which we hold.
        self.reg.header().slots_high.load(Ordering::Relaxed).min(self.reg.max_sections)
    }

    /// Every valid entry in use, over all slots (a damaged `slots_high` hides nothing).
    pub fn all_entries(&self) -> Vec<SectionRecord> {
        (0..self.reg.backed_slots()).filter_map(|s| self.locked_entry(s)).collect()
    }

    /// Marks the domain as made to last ([`super::FLAG_KEPT`]): an empty domain is then kept
    /// until `domain rm` instead of being removed by its last detach or by `gc`.
    pub fn mark_kept(&self) {
        // Relaxed: under the lock, as every reader that decides on it.
        self.reg.header().flags.fetch_or(super::FLAG_KEPT, Ordering::Relaxed);
    }

    /// Whether any slot is in use, valid or not: a registry with damaged entries is never
    /// "empty" (removing it would orphan their objects).
    pub fn any_slot_used(&self) -> bool {
        // Relaxed: under the lock.
        (0..self.reg.backed_slots()).any(|s| self.reg.entry(s).state.load(Ordering::Relaxed) != FREE)
    }

    /// Reserves a slot and a window range for a new section, recording it as `CREATING`.
    pub fn begin_create(
        &self,
        name: &str,
        kind: SectionKind,
        lifetime: Lifetime,
        mode: u32,
        reserved: u64,
        creator: Creator,
    ) -> Result<SectionRecord> {
        self.begin_create_at(name, kind, lifetime, mode, reserved, creator, None)
    }

    /// [`RegistryGuard::begin_create`], at window offset `at` if given (a file-backed section's
    /// recorded address: that range or an error naming what occupies it, never elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn begin_create_at(
        &self,
        name: &str,
        kind: SectionKind,
        lifetime: Lifetime,
        mode: u32,
        reserved: u64,
        creator: Creator,
        at: Option<u64>,
    ) -> Result<SectionRecord> {
        let reg = self.reg;
        // Never-used slots first (O(1) while the table grows), then any freed one.
        let high = self.slots_high();
        let backed = reg.backed_slots();
        let Some(slot) = (high..reg.max_sections).take(1).chain(0..high).find(|&s| {
            // Relaxed: under the lock. A slot of a segment not backed yet is free.
            s >= backed || reg.entry(s).state.load(Ordering::Relaxed) == FREE
        }) else {
            bail!(
                RegistryFull,
                "domain {:?} already has {} sections, its registry's limit; delete unused ones with `shmgadget rm`, or create the domain with a larger max_sections",
                reg.domain,
                reg.max_sections
            );
        };
        let span = reserved.div_ceil(CHUNK) * CHUNK;
        let offset = match at {
            None => self.place(span)?,
            Some(at) => self.place_at(at, span)?,
        };
        // Back the segments holding the slot and the range's chunks before writing either; a
        // full file system fails the creation here, with nothing written.
        let needed = reg.layout.segments_for_slot(slot).max(reg.layout.segments_for_chunk((offset + span) / CHUNK - 1));
        self.grow(needed, || format!("section {name:?}"))?;
        let h = reg.header();
        // Relaxed: under the lock.
        let generation = h.next_generation.fetch_add(1, Ordering::Relaxed);
        let now = now_secs();
        let uid = os::effective_uid();
        let pid = os::current_pid();
        self.write_entry(slot, |e| {
            // Relaxed: inside the seqlock write section.
            e.kind.store(kind.to_raw(), Ordering::Relaxed);
            e.lifetime.store(lifetime.to_raw(), Ordering::Relaxed);
            e.mode.store(mode, Ordering::Relaxed);
            e.owner_uid.store(uid, Ordering::Relaxed);
            e.name_len.store(name.len() as u32, Ordering::Relaxed);
            pack_name(&e.name, name);
            e.generation.store(generation, Ordering::Relaxed);
            e.offset.store(offset, Ordering::Relaxed);
            e.reserved.store(reserved, Ordering::Relaxed);
            e.committed.store(0, Ordering::Relaxed);
            e.created_at.store(now, Ordering::Relaxed);
            e.creator_pid.store(pid, Ordering::Relaxed);
            e.creator_token.store(creator.token, Ordering::Relaxed);
            e.ready.store(if creator.ready { READY_SECTION } else { 0 }, Ordering::Relaxed);
            e.state.store(CREATING, Ordering::Relaxed);
        });
        for c in offset / CHUNK..(offset + span) / CHUNK {
            // Relaxed: readers validate through the entry's seqlock.
            self.reg.chunk(c).store(slot + 1, Ordering::Relaxed);
        }
        // Relaxed: under the lock.
        if h.slots_high.load(Ordering::Relaxed) <= slot {
            h.slots_high.store(slot + 1, Ordering::Relaxed);
        }
        h.place_cursor.store(offset + span, Ordering::Relaxed);
        self.index_insert(name, slot);
        // What we just wrote reads back as a valid record unless the registry is damaged in a
        // way the checks above missed; then undo and say so rather than panic.
        match self.reg.check_entry(slot, self.reg.entry(slot)) {
            Ok(Some(rec)) => Ok(rec),
            Ok(None) | Err(_) => {
                let problem = self.reg.check_entry(slot, self.reg.entry(slot)).err().unwrap_or_default();
                self.index_remove(name, slot);
                for c in offset / CHUNK..(offset + span) / CHUNK {
                    // Relaxed: under the lock; the entry never became valid.
                    self.reg.chunk(c).store(0, Ordering::Relaxed);
                }
                self.write_entry(slot, |e| e.state.store(FREE, Ordering::Relaxed));
                Err(corrupt(&reg.domain, format!("a new entry for {name:?} does not read back ({problem})")))
            }
        }
    }

    /// Finds a free window range of `span` bytes: next-fit from the cursor (so a freed range is
    /// reused as late as possible, because processes that still map a deleted section keep it
    /// until they detach), then from the start.
    pub(super) fn place(&self, span: u64) -> Result<u64> {
        let reg = self.reg;
        if span > reg.window_size {
            bail!(
                InvalidSize,
                "a section of {span} bytes does not fit in domain {:?}'s window of {} bytes",
                reg.domain,
                reg.window_size
            );
        }
        // Fast path: the range at the next-fit cursor is free in the chunk table. A cursor that
        // is not a chunk-aligned window offset is damage; placing from it would hand out an
        // unaligned range, so it counts as 0.
        // Relaxed: under the lock.
        let cursor = reg.header().place_cursor.load(Ordering::Relaxed);
        let cursor = if cursor % CHUNK == 0 && cursor <= reg.window_size { cursor } else { 0 };
        if cursor.checked_add(span).is_some_and(|end| end <= reg.window_size)
            // Relaxed: the chunk table is written only under the lock, which we hold.
            && (cursor / CHUNK..(cursor + span) / CHUNK).all(|c| reg.chunk_owner(c) == 0)
        {
            return Ok(cursor);
        }
        let mut used: Vec<(u64, u64)> = self.all_entries().iter().map(|r| (r.offset, r.offset + r.span())).collect();
        used.sort_unstable();
        if let Some(at) = next_fit(&used, cursor, span, reg.window_size) {
            return Ok(at);
        }
        let used_bytes: u64 = used.iter().map(|(lo, hi)| hi - lo).sum();
        bail!(
            WindowFull,
            "domain {:?}'s window ({} bytes at {:#x}) has no free range of {span} bytes ({used_bytes} bytes in use by {} sections); \
             delete sections, or use a domain with a larger window",
            reg.domain,
            reg.window_size,
            reg.window_base,
            used.len()
        )
    }

    /// Makes sure the first `segments` segments are backed (see "Growth" in the module docs):
    /// extends the object with `fallocate` (committed, so no reader can fault on it later),
    /// then publishes the new count. On a full file system, an `OutOfSpace` error naming `what`
    /// needed the room; the count and everything it covers are unchanged, and the object is cut
    /// back to them.
    pub(super) fn grow(&self, segments: u32, what: impl FnOnce() -> String) -> Result<()> {
        let reg = self.reg;
        let h = reg.header();
        // Relaxed: written only under the lock, which we hold.
        let have = h.segments_backed.load(Ordering::Relaxed);
        if segments <= have {
            return Ok(());
        }
        if segments > reg.layout.segments {
            return Err(corrupt(
                &reg.domain,
                format!("{segments} segments wanted, the layout has {}", reg.layout.segments),
            ));
        }
        let (old_len, new_len) = (reg.layout.backed_len(have), reg.layout.backed_len(segments));
        if let Err(e) = reg.fd.allocate(old_len, new_len - old_len) {
            // Nobody touches bytes past the published count, so cutting them off is safe (and
            // gives back what a partial allocation took).
            let _ = reg.fd.set_size(old_len);
            return Err(Error::from_io(
                format!(
                    "cannot grow the registry of domain {:?} from {old_len} to {new_len} bytes for {}",
                    reg.domain,
                    what()
                ),
                e,
            ));
        }
        // Release: pairs with the Acquire loads in `Registry::segments` and `validate`; the
        // object was extended and committed above.
        h.segments_backed.store(segments, Ordering::Release);
        Ok(())
    }

    /// Checks that the window range `[at, at + span)` is free (for a file-backed section's
    /// recorded address); the error names the section occupying it.
    fn place_at(&self, at: u64, span: u64) -> Result<u64> {
        let reg = self.reg;
        if at % CHUNK != 0 || at.checked_add(span).is_none_or(|end| end > reg.window_size) {
            bail!(
                WindowUnavailable,
                "window offset {at:#x}+{span:#x} is not a chunk-aligned range inside domain {:?}'s window of {} bytes",
                reg.domain,
                reg.window_size
            );
        }
        // The chunk table is written only under the lock, which we hold; a chunk of a segment
        // not backed yet is free.
        if let Some(slot) = (at / CHUNK..(at + span) / CHUNK).map(|c| reg.chunk_owner(c)).find(|&s| s != 0) {
            let who = self.locked_entry(slot - 1).map_or_else(
                || format!("slot {}", slot - 1),
                |r| format!("section {:?} ({:#x}+{:#x})", r.name.as_str(), reg.window_base + r.offset, r.span()),
            );
            bail!(
                WindowUnavailable,
                "the range {:#x}-{:#x} of domain {:?} is occupied by {who}; delete that section first (it is never \
                 placed elsewhere)",
                reg.window_base + at,
                reg.window_base + at + span,
                reg.domain
            );
        }
        Ok(at)
    }

    /// Marks a `CREATING` entry `LIVE`.
    pub fn finish_create(&self, slot: u32) {
        self.write_entry(slot, |e| e.state.store(LIVE, Ordering::Relaxed));
    }

    /// Marks the live section `rec` ready (its creator initialised it). False if that entry is
    /// gone (deleted, or re-used by another section) meanwhile.
    pub fn mark_ready(&self, rec: &SectionRecord) -> bool {
        let same = self.locked_entry(rec.slot).is_some_and(|r| r.state == LIVE && r.generation == rec.generation);
        if same {
            // Relaxed: inside the seqlock write section; openers read it under the lock, whose
            // acquire orders it after the creator's header writes (made before this call).
            self.write_entry(rec.slot, |e| e.ready.store(READY_SECTION, Ordering::Relaxed));
        }
        same
    }

    /// The entry in `rec`'s slot if it still holds the same section (same generation).
    pub fn same_entry(&self, rec: &SectionRecord) -> Option<SectionRecord> {
        self.locked_entry(rec.slot).filter(|r| r.generation == rec.generation && r.state == LIVE)
    }

    /// Removes an entry whatever its state: unlinks its object, clears its chunks, frees the
    /// slot. Missing objects are fine (a crash may have removed or never made them).
    pub fn remove(&self, rec: &SectionRecord) -> Result<()> {
        self.index_remove(rec.name.as_str(), rec.slot);
        self.write_entry(rec.slot, |e| e.state.store(DELETING, Ordering::Relaxed));
        let object = names::section_object(&self.reg.domain, rec.generation, rec.name.as_str());
        let unlinked = match self.reg.dir.unlink_object(&object) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => {
                Err(Error::from_io(format!("cannot remove section {:?}'s object {object:?}", rec.name.as_str()), e))
            }
        };
        for c in rec.offset / CHUNK..(rec.offset + rec.span()) / CHUNK {
            // Relaxed: the entry is no longer LIVE, which readers check after the table.
            if self.reg.chunk_owner(c) == rec.slot + 1 {
                self.reg.chunk(c).store(0, Ordering::Relaxed);
            }
        }
        self.write_entry(rec.slot, |e| e.state.store(FREE, Ordering::Relaxed));
        unlinked
    }

    /// Repairs what a writer that died holding the lock left behind.
    pub(super) fn repair(&self) {
        let reg = self.reg;
        for slot in 0..reg.backed_slots() {
            let e = reg.entry(slot);
            // Relaxed: under the lock; the dead writer can no longer race with us.
            let seq = e.seq.load(Ordering::Relaxed);
            let state = e.state.load(Ordering::Relaxed);
            let torn = seq & 1 == 1;
            if torn {
                e.seq.store(seq.wrapping_add(1), Ordering::Release);
            }
            if state == CREATING || state == DELETING || (torn && state != LIVE && state != FREE) {
                match self.locked_entry(slot) {
                    Some(rec) => {
                        let _ = self.remove(&rec);
                    }
                    None => self.write_entry(slot, |e| e.state.store(FREE, Ordering::Relaxed)),
                }
            }
        }
        self.rebuild_index();
    }

    /// Claims a process slot and takes its liveness token through a new open file description
    /// of the registry object. Returns the token and the descriptor holding its lock (closing
    /// every descriptor of that description releases it). `pid` is recorded for display,
    /// `pid_ns` (the process's pid namespace, 0: unknown) for [`Registry::threads_visible`].
    pub fn register_proc(&self, pid: u32, pid_ns: u64) -> Result<(ProcToken, os::Object)> {
        let reg = self.reg;
        let h = reg.header();
        let object = names::registry_object(&reg.domain);
        let fd = reg.dir.open_object(&object, os::Access::ReadWrite).map_err(|e| {
            Error::from_io(format!("cannot open the registry of domain {:?} for a liveness token", reg.domain), e)
        })?;
        // The name could now belong to a re-created registry: lock bytes of ours only.
        let same = match (fd.stat(), reg.fd.stat()) {
            (Ok(a), Ok(b)) => a.identity == b.identity,
            _ => false,
        };
        if !same {
            bail!(
                Destroyed,
                "domain {:?} was deleted (its registry object now belongs to a new domain); attach again",
                reg.domain
            );
        }
        for slot in 0..reg.max_procs {
            // Locked: a live process holds it, or (state 0) its previous owner has not closed
            // its token descriptor yet.
            if reg.proc_locked(slot) {
                continue;
            }
            // Every backed slot is taken: back the next segment (see "Growth").
            self.grow(reg.layout.segments_for_proc(slot), || "a process registration".to_owned())?;
            let p = reg.proc_entry(slot);
            // The new incarnation before the lock (see `Registry::proc_alive`). Relaxed: the
            // byte lock below publishes it (the kernel orders lock-table operations).
            let incarnation = match p.incarnation.load(Ordering::Relaxed).wrapping_add(1) {
                0 => 1,
                n => n,
            };
            // Release: before the token, like the incarnation; a reader that finds the token
            // held reads it (`Registry::threads_visible`).
            p.pid_ns.store(pid_ns, Ordering::Release);
            p.incarnation.store(incarnation, Ordering::Release);
            p.state.store(1, Ordering::Release);
            match fd.try_lock_byte(reg.proc_offset(slot)) {
                Ok(true) => {}
                Ok(false) => {
                    p.state.store(0, Ordering::Relaxed);
                    continue;
                }
                Err(e) => {
                    p.state.store(0, Ordering::Relaxed);
                    return Err(Error::from_io("cannot take the liveness token", e));
                }
            }
            p.pid.store(pid, Ordering::Relaxed);
            p.uid.store(os::effective_uid(), Ordering::Relaxed);
            p.attached_at.store(now_secs(), Ordering::Relaxed);
            if h.procs_high.load(Ordering::Relaxed) <= slot {
                h.procs_high.store(slot + 1, Ordering::Relaxed);
            }
            return Ok((ProcToken::new(slot, incarnation), fd));
        }
        bail!(
            RegistryFull,
            "domain {:?} already has {} attached processes, its registry's limit; run `shmgadget gc` to reclaim dead ones",
            reg.domain,
            reg.max_procs
        )
    }

    /// Frees the entry of registration `token` (if it is still that registration's). The
    /// caller then closes the token's descriptor, which releases the lock.
    pub fn unregister_proc(&self, token: ProcToken) {
        let Some((slot, incarnation)) = token.parts() else { return };
        if slot >= self.reg.backed_procs() {
            return;
        }
        let p = self.reg.proc_entry(slot);
        // Relaxed: under the lock.
        if p.incarnation.load(Ordering::Relaxed) == incarnation {
            p.state.store(0, Ordering::Relaxed);
        }
    }

    /// Clears the entries of processes whose token is no longer held; returns their pids.
    pub fn reap_dead_procs(&self) -> Vec<u32> {
        let dead: Vec<ProcRecord> = self.reg.procs().into_iter().filter(|p| !p.alive).collect();
        for p in &dead {
            // Relaxed: under the lock.
            self.reg.proc_entry(p.slot).state.store(0, Ordering::Relaxed);
        }
        dead.iter().map(|p| p.pid).collect()
    }

    /// Whether any process is attached and alive.
    pub fn others_alive(&self) -> bool {
        self.reg.procs().iter().any(|p| p.alive)
    }
}

/// The placement algorithm alone: the lowest offset at or above `cursor` where `span` bytes
/// fit below `limit` without overlapping any of the `used` ranges (`[lo, hi)`, sorted by
/// `lo`, possibly overlapping each other when the registry is damaged), else the lowest such
/// offset from 0; `None` when no gap is large enough. Offsets stay multiples of the chunk when
/// `cursor` and the ranges are.
pub(super) fn next_fit(used: &[(u64, u64)], cursor: u64, span: u64, limit: u64) -> Option<u64> {
    let fits_at = |start: u64| -> Option<u64> {
        let mut at = start;
        for &(lo, hi) in used {
            if hi <= at {
                continue;
            }
            if lo >= at + span {
                break;
            }
            at = hi;
        }
        (at + span <= limit).then_some(at)
    };
    fits_at(cursor).or_else(|| fits_at(0))
}

/// Records a commit/decommit in the entry's informational `committed` field (no lock).
pub(crate) fn note_committed(reg: &Registry, slot: u32, generation: u64, new_len: u64, grow: bool) {
    let e = reg.entry(slot);
    // Relaxed: informational; the generation check avoids writing into a reused slot.
    if e.generation.load(Ordering::Relaxed) != generation {
        return;
    }
    if grow {
        e.committed.fetch_max(new_len, Ordering::Relaxed);
    } else {
        e.committed.fetch_min(new_len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The model: the lowest chunk-aligned offset in `[from, limit)` where `span` fits without
    /// touching any used range, by trying each one.
    fn brute_force(used: &[(u64, u64)], from: u64, span: u64, limit: u64) -> Option<u64> {
        (from / CHUNK..limit / CHUNK)
            .map(|c| c * CHUNK)
            .find(|&at| at + span <= limit && used.iter().all(|&(lo, hi)| hi <= at || lo >= at + span))
    }

    proptest! {
        /// Next-fit places at the first free gap from the cursor, else the first from the
        /// start, never overlapping a used range nor leaving the window, and finds a gap
        /// whenever one exists; ranges may overlap each other (a damaged registry).
        #[test]
        fn placement_is_next_fit_and_never_overlaps(
            window_chunks in 1u64..48,
            ranges in prop::collection::vec((0u64..48, 1u64..8), 0..12),
            cursor_chunk in 0u64..49,
            span_chunks in 1u64..12,
        ) {
            let limit = window_chunks * CHUNK;
            let mut used: Vec<(u64, u64)> = ranges
                .iter()
                .map(|&(lo, len)| (lo.min(window_chunks - 1) * CHUNK, ((lo + len).min(window_chunks)) * CHUNK))
                .filter(|(lo, hi)| lo < hi)
                .collect();
            used.sort_unstable();
            let cursor = cursor_chunk.min(window_chunks) * CHUNK;
            let span = span_chunks * CHUNK;
            let got = next_fit(&used, cursor, span, limit);
            let expected = brute_force(&used, cursor, span, limit).or_else(|| brute_force(&used, 0, span, limit));
            prop_assert_eq!(got, expected);
            if let Some(at) = got {
                prop_assert_eq!(at % CHUNK, 0);
                prop_assert!(at + span <= limit);
                prop_assert!(used.iter().all(|&(lo, hi)| hi <= at || lo >= at + span));
            }
        }
    }

    #[test]
    fn a_freed_range_before_the_cursor_is_reused_only_when_nothing_fits_after_it() {
        let c = CHUNK;
        // Used: [0, 2c) and [4c, 6c); the cursor at 6c; a window of 8 chunks.
        let used = [(0, 2 * c), (4 * c, 6 * c)];
        assert_eq!(next_fit(&used, 6 * c, 2 * c, 8 * c), Some(6 * c), "after the cursor first");
        assert_eq!(next_fit(&used, 6 * c, 3 * c, 8 * c), None, "no gap of three chunks anywhere");
        assert_eq!(next_fit(&used, 7 * c, 2 * c, 8 * c), Some(2 * c), "wraps to the first gap");
    }
}
