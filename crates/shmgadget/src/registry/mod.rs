//! The registry (the classic "pool list"): one shared object per domain describing its address
//! window, its sections and the processes attached to it.
//!
//! # Layout
//! ```text
//! 0        RegistryShared     header: identity, window, table sizes, counters, robust lock
//! 256      AtomicU32          [name_buckets]   the name index (see `names.rs`), sized for max_sections
//! S        segment 0          SectionEntryShared [sps]   section slots 0..sps
//!                             ProcEntryShared    [pps]   process slots 0..pps
//!                             AtomicU32          [cps]   chunk table: slot + 1 owning each 2 MiB chunk
//! S + Z    segment 1          the next sps section slots, pps process slots, cps chunks
//! ...      up to `segments` segments of Z bytes each
//! ```
//! Every offset follows from `max_sections`, `max_procs` and `window_size` ([`Layout::compute`]:
//! at most 256 sections, 64 processes and 32 Ki chunks (64 GiB of window) per segment, 16
//! segments with the defaults); an opener recomputes them and refuses a registry that disagrees.
//!
//! # Growth
//! The object is only as long as the segments it backs: header, name index and
//! `segments_backed` segments (one at creation: 208 KiB with the defaults, against 2.8 MiB for
//! every segment). A writer that needs a section slot, a process slot or a chunk of a segment
//! not backed yet extends the object under `lock` ([`RegistryGuard::grow`]): `fallocate` of the
//! new segments first (so they are committed: a full tmpfs fails the operation with
//! `OutOfSpace` instead of a later SIGBUS), then a Release store of the new `segments_backed`.
//! Segments are never given back. Every process maps the object once at its largest length
//! (`total_size`; mapping past the end of a file is allowed, only touching those pages faults)
//! and never touches a slot, process entry or chunk of a segment at or beyond the count it read
//! with Acquire ([`Registry::segments`]), further clamped by the object's size as `fstat` reports
//! it the first time a count is seen (so a damaged count cannot send a reader past the end) and,
//! for a private copy, by the bytes copied. A slot or chunk beyond the backed segments is free.

//! # Synchronisation
//! * **Creation.** The creator holds the shm directory's lock ([`os::DirLock`], as does every opener), fills
//!   the header and publishes it with a Release store of `ready = READY`. Fields written before
//!   that store are frozen: `magic`, `layout_version`, `abi_fingerprint`, `max_*`, `mode`,
//!   `total_size`, `window_*`, the offsets, `created_at` and the domain name. An opener that finds
//!   `ready != READY` while holding the directory lock knows the creator died mid-way.
//! * **Writers** of section entries, process entries and the chunk table hold `lock`,
//!   shmgadget's own robust process-shared lock (`sync::robust`). `next_generation`, `place_cursor`, `slots_high`,
//!   `procs_high` and `segments_backed` are written only under it.
//! * **Readers without the lock** (the first-touch fault handler, `ls`): each section entry
//!   is a seqlock. `seq` is even when the entry is stable and odd while a writer changes it;
//!   a reader copies the fields, then re-reads `seq` and retries if it moved
//!   ([`Registry::read_entry`]). The chunk table is written before an entry becomes `LIVE` and
//!   cleared after it stops being `LIVE`, so a reader that finds a slot through the table and
//!   then sees `LIVE` with the address in range has a consistent record.
//! * `committed` is the one entry field updated without the lock (an atomic max/min by any
//!   process that commits or decommits); it is informational and not covered by `seq`.
//!
//! # Section entry states
//! | state      | meaning                                     | next                        |
//! |------------|---------------------------------------------|-----------------------------|
//! | `FREE`     | slot unused                                 | `CREATING`                  |
//! | `CREATING` | placement taken, backing object being made  | `LIVE`, or `FREE` on error  |
//! | `LIVE`     | usable                                      | `DELETING`                  |
//! | `DELETING` | object being unlinked                       | `FREE`                      |
//!
//! # Readiness (all-or-nothing creation)
//! A `LIVE` entry also carries `ready` and `creator_token` (the creator's peer token, written
//! with the entry). A raw section is ready from creation. A heap or queue section becomes
//! `LIVE` unready, its creator initialises the header and then sets `ready` under the lock
//! ([`RegistryGuard::mark_ready`]); openers only hand out ready sections. An unready section
//! whose creator is still alive (by token) is waited for; one whose creator is dead can never
//! become ready and is removed by the next create-or-open of its name, by `open`, and by `gc`.
//! A creator whose initialisation fails removes the section itself before returning the error.
//!
//! # Crashes
//! A writer that dies holding `lock` makes the next locker's lock call report
//! `LockOutcome::OwnerDied`. That locker repairs ([`Registry::repair`]): an entry left `CREATING` or
//! `DELETING` (or with an odd `seq`) has its object unlinked and its slot and chunks freed; a
//! `LIVE` entry with an odd `seq` only gets `seq` made even. It then marks the mutex consistent.
//!
//! # Bounded waits on the lock
//! Every wait for `lock` is bounded ([`crate::sync::LOCK_PATIENCE`], or the caller's bound):
//! a lock word damaged by a stray write must not hang `create`, `rm`, `gc` or an attach. The
//! holder writes its token (`lock_owner`, its registration in this domain, found from the
//! window's address without a system call; 0 for an unattached tool or a process registering)
//! right after locking and clears it before unlocking; both Relaxed, written by the holder only
//! and read by waiters as a snapshot. A waiter that cannot get the lock looks, every 200 ms, at
//! the holder's thread id in the lock word and at `lock_owner`: no thread, a thread that
//! does not exist, or a token whose registration is not alive, seen twice with the same lock
//! word, is `Corrupt` ("held by slot N, pid P, which is not alive; run `shmgadget gc --domain D
//! --force`"); a live holder past the bound is `Timeout`. `gc --force`, holding the shm
//! directory's lock, looks again and re-initialises the lock in place
//! ([`Registry::break_lock`]), then repairs as after `OwnerDied`.
//!
//! # Process entries and liveness tokens
//! An attached process holds an OFD write lock on the byte at its process entry's offset (its
//! liveness token); the kernel drops it when the process dies, so a dead attachment is
//! recognised without trusting pids (which mean nothing across PID namespaces and are reused).
//! * Each registration opens the registry object anew and locks its byte through that
//!   descriptor, its own open file description ([`RegistryGuard::register_proc`]); the
//!   descriptor lives in an [`os::TokenCell`] so the fork handlers can take it away from a
//!   forked child (see `os`). The handle's own descriptor, `fd`, never takes a lock, so
//!   `F_OFD_GETLK` through it sees every token, this process's own included.
//! * `incarnation` is bumped at every registration of the slot, before the lock is taken. A
//!   token is `(slot + 1) << 32 | incarnation` ([`ProcToken`]): it names one registration, never
//!   a later user of the same slot. Liveness of a token = its byte is locked (checked first),
//!   then (Acquire) the entry is in use with the same incarnation.
//! * `state`, `pid`, `uid`, `incarnation`, `pid_ns` and `attached_at` are written under
//!   `lock`; `pid` is also written once by a forked child's fork handler for the entry made
//!   for it just before the fork (see `Domain`). `pid` and `uid` are for display only.
//!   `pid_ns` is the process's pid namespace (0: unknown; for a forked child, the parent's
//!   unless the parent unshared a new one for its children, or its kernel cannot tell, before
//!   4.12), written before the token is taken: [`Registry::threads_visible`] asks it whether
//!   a lock word's thread id speaks for every possible holder.
//!
//! | entry `state` | lock on its byte | meaning |
//! |---|---|---|
//! | 0 | none / any | free (a lock still held is a registration being released) |
//! | 1 | held | attached and alive |
//! | 1 | none | its process died (or closed its token): reaped by the next `reap_dead_procs` |
//!
//! # Damage
//! Every reader validates before it trusts: the header on open ([`Registry::open`]), each
//! entry when copied (a slot in use whose fields are not a valid record reads as `None` on the
//! fast paths, and as a [`DamagedEntry`] saying what failed in [`Registry::scan`]). The scan
//! covers every slot, not only those below `slots_high` (a damaged high-water mark hides
//! nothing), checks generations against `next_generation` and each other, and, under the
//! lock, the high-water marks, overlapping ranges and the chunk table. Inspection lists what
//! it finds; `gc` removes nothing of a domain whose scan is not clean (see `inspect`). A
//! registry's backed segments are committed (`fallocate`) before they are published (see
//! "Growth"), so no reader or repair ever touches a hole, which on a full tmpfs would be a
//! SIGBUS.
//!
//! # Strangers
//! Trust follows attachment. A process that has joined a domain maps its registry shared and
//! trusts its members: they all hold the directory's permissions, any of them could corrupt
//! the shared state anyway, and a member that truncates the registry can crash the others
//! (attaching to a registry owned by another user needs `allow_foreign_owner`). A process
//! that has not joined (window selection for a new domain, `domains`, `ls`, `info`) never
//! maps a registry: [`Registry::snapshot`] reads it with `pread` into private memory, an
//! 8-aligned copy the same validated readers work on, so its owner may shrink, regrow or
//! rewrite it meanwhile without crashing the reader; the worst it gets is a copy that fails
//! validation, reported as such.

//! # Where things are
//! | file | owns |
//! |---|---|
//! | `mod.rs` (this file) | the handle: creating, opening, snapshotting and validating a registry object |
//! | `layout.rs` | the shared structures, their constants and fingerprint, [`Layout`], the inline name format |
//! | `read.rs` | the lock-free readers: seqlocked entry copies, the validating scan, lookups, liveness |
//! | `write.rs` | the registry lock and the writer guard: create, place, remove, repair, register |
//! | `names.rs` | the name index (open addressing over the slots) |

mod layout;
mod names;
mod read;
mod write;

use std::mem::size_of;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, ErrorKind, Result, bail};
use crate::header;
use crate::names as object_names;
use crate::os::{self, ErrorExt};

#[allow(clippy::wildcard_imports)]
use layout::*;
pub use layout::{
    CHUNK, DEFAULT_MAX_PROCS, DEFAULT_MAX_SECTIONS, DEFAULT_WINDOW_BASE, DEFAULT_WINDOW_SIZE, Lifetime,
    MAX_TABLE_ENTRIES, MAX_WINDOW_SIZE, MIN_WINDOW_BASE, MIN_WINDOW_SIZE, SectionKind, WINDOW_ALIGN,
};
pub(crate) use layout::{LIVE, Layout};
pub(crate) use read::{DamagedEntry, ProcRecord, ProcToken, SectionRecord, token_slot};
pub(crate) use write::{Creator, RegistryGuard, note_committed};

/// Parameters fixed when a registry is created.
#[derive(Debug, Clone)]
pub(crate) struct CreateParams {
    pub window_base: u64,
    pub window_size: u64,
    pub max_sections: u32,
    pub max_procs: u32,
    pub mode: u32,
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

/// This process's mapping of a domain's registry.
pub(crate) struct Registry {
    domain: String,
    dir: os::Dir,
    fd: os::Object,
    base: NonNull<u8>,
    /// Bytes valid at `base`: the mapping's length, or the private copy's.
    map_len: usize,
    /// `Some` when `base` is a private copy (see "Strangers") allocated with this layout
    /// instead of a shared mapping: read-only in spirit, never locked, freed on drop.
    private: Option<std::alloc::Layout>,
    layout: Layout,
    /// The most segments this process has checked the object really holds (see "Growth"):
    /// process-local, a cache of `fstat` (or, for a private copy, of its length).
    verified_segments: AtomicU32,
    pub window_base: u64,
    pub window_size: u64,
    pub max_sections: u32,
    pub max_procs: u32,
    pub mode: u32,
    pub created_at: u64,
}

// SAFETY: the mapping is shared memory accessed only through atomics and the robust mutex;
// the handle itself holds no thread-affine state.
unsafe impl Send for Registry {}
// SAFETY: as above.
unsafe impl Sync for Registry {}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn corrupt(domain: &str, what: String) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "the registry of domain {domain:?} is corrupt: {what}; if no process uses the domain, \
             remove it with `shmgadget gc --domain {domain} --force`"
        ),
    )
}

/// Opens domain `domain`'s registry object in `dir` and checks what any reader must before
/// looking inside: a regular file, owned by this user unless `allow_foreign`.
fn open_object_checked(
    dir: &os::Dir,
    domain: &str,
    access: os::Access,
    allow_foreign: bool,
) -> Result<(os::Object, os::ObjectStat)> {
    let object = object_names::registry_object(domain);
    let fd = dir.open_object(&object, access).map_err(|e| {
            if e.is_not_found() {
                Error::new(ErrorKind::NotFound, format!("domain {domain:?} does not exist (no registry object {object:?}); `shmgadget domains` lists the existing ones"))
            } else {
                Error::from_io(format!("cannot open the registry of domain {domain:?}"), e)
            }
        })?;
    let st = fd.stat().map_err(|e| Error::from_io("cannot stat the registry", e))?;
    if !st.is_regular {
        return Err(corrupt(domain, "the registry object is not a regular file".into()));
    }
    if st.uid != os::effective_uid() && !allow_foreign {
        bail!(
            PermissionDenied,
            "the registry of domain {domain:?} belongs to uid {} but this process runs as uid {}; \
                 refusing to trust it (opt in with allow_foreign_owner / --allow-foreign-owner if that user is trusted)",
            st.uid,
            os::effective_uid()
        );
    }
    Ok((fd, st))
}

impl Registry {
    /// Creates and initialises a registry. The caller holds the shm directory's lock.
    pub fn create(dir: os::Dir, domain: &str, p: &CreateParams) -> Result<Registry> {
        let layout = Layout::compute(p.max_sections, p.max_procs, p.window_size)
            .ok_or_else(|| Error::new(ErrorKind::InvalidSize, "registry size overflows"))?;
        let object = object_names::registry_object(domain);
        let fd = dir
            .create_object(&object, p.mode)
            .map_err(|e| Error::from_io(format!("cannot create the registry of domain {domain:?}"), e))?;
        let cleanup = |e: Error| {
            let _ = dir.unlink_object(&object);
            e
        };
        // One segment to begin with (see "Growth"); the rest is mapped but not backed.
        let initial = layout.backed_len(1);
        if let Err(e) = fd.set_size(initial) {
            return Err(cleanup(Error::from_io(format!("cannot size the registry of domain {domain:?}"), e)));
        }
        // Commit every backed page before anything is written or read: a sparse registry on a
        // full tmpfs makes the first touch of a hole (even a read) SIGBUS in whichever process
        // comes first, and a repair would write into holes too. Committed, it never faults.
        if let Err(e) = fd.allocate(0, initial) {
            return Err(cleanup(Error::from_io(
                format!(
                    "cannot commit the {initial} bytes of domain {domain:?}'s registry (is the shm file system full?)"
                ),
                e,
            )));
        }
        let base = match os::map_shared(&fd, layout.total_size as usize, os::Access::ReadWrite) {
            Ok(base) => base,
            Err(e) => {
                return Err(cleanup(Error::from_io(format!("cannot map the registry of domain {domain:?}"), e)));
            }
        };
        let reg = Registry {
            domain: domain.to_owned(),
            dir,
            fd,
            base,
            map_len: layout.total_size as usize,
            private: None,
            layout,
            verified_segments: AtomicU32::new(1),
            window_base: p.window_base,
            window_size: p.window_size,
            max_sections: p.max_sections,
            max_procs: p.max_procs,
            mode: p.mode,
            created_at: now_secs(),
        };
        let h = reg.header();
        // Relaxed stores: nobody reads these before the Release store of `ready` below, and
        // openers hold the directory lock we hold, so they cannot even look yet.
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.abi_fingerprint.store(ABI_FINGERPRINT, Ordering::Relaxed);
        h.max_sections.store(p.max_sections, Ordering::Relaxed);
        h.max_procs.store(p.max_procs, Ordering::Relaxed);
        h.mode.store(p.mode, Ordering::Relaxed);
        h.total_size.store(layout.total_size, Ordering::Relaxed);
        h.window_base.store(p.window_base, Ordering::Relaxed);
        h.window_size.store(p.window_size, Ordering::Relaxed);
        h.sections_offset.store(layout.sections_offset, Ordering::Relaxed);
        h.procs_offset.store(layout.procs_offset as u32, Ordering::Relaxed);
        h.chunks_offset.store(layout.chunks_offset as u32, Ordering::Relaxed);
        h.segment_size.store(layout.segment_size as u32, Ordering::Relaxed);
        h.segments_backed.store(1, Ordering::Relaxed);
        h.next_generation.store(1, Ordering::Relaxed);
        h.created_at.store(reg.created_at, Ordering::Relaxed);
        h.domain_len.store(domain.len() as u32, Ordering::Relaxed);
        pack_name(&h.domain, domain);
        // SAFETY: the object was just created with O_EXCL and nobody else can have mapped it
        // (openers wait on the directory lock we hold), and the mapping stays put while
        // `reg` lives.
        if let Err(e) = unsafe { h.lock.init() } {
            let _ = reg.dir.unlink_object(&object);
            return Err(Error::from_io("cannot initialise the registry lock", e));
        }
        // Release: publishes every field above; pairs with the Acquire load in `open`.
        h.ready.store(READY, Ordering::Release);
        Ok(reg)
    }

    /// Whether domain `domain`'s registry object was left unfinished by its creator: empty (not
    /// sized yet), or with a header of ours never published and tables that record nothing
    /// (no generation handed out, no slot or process ever used: a creator writes none of them
    /// before publishing, so a damaged `ready` word on a registry in use does not pass for
    /// unfinished and get replaced). Meaningful only under the shm directory's lock, which a
    /// creator holds from creating the object until it is ready: a caller holding that lock
    /// that finds one knows its creator died. Read with `pread`: an unfinished registry may
    /// be sparse, and touching a hole of a full tmpfs through a mapping would SIGBUS.
    pub fn is_unfinished(dir: &os::Dir, domain: &str) -> bool {
        let object = object_names::registry_object(domain);
        let Ok(fd) = dir.open_object(&object, os::Access::Read) else { return false };
        let Ok(st) = fd.stat() else { return false };
        if !st.is_regular || st.uid != os::effective_uid() {
            return false;
        }
        if st.size == 0 {
            return true;
        }
        let len = size_of::<RegistryShared>();
        if st.size < len as u64 {
            return false;
        }
        let Ok(dir) = dir.try_clone() else { return false };
        let Ok(mut copy) = Registry::private_copy(dir, fd, domain, len) else { return false };
        if copy.fill_from_object(len).is_err() {
            return false;
        }
        let h = copy.header();
        // Relaxed: a private copy nobody else writes.
        let (magic, ready) = (h.magic.load(Ordering::Relaxed), h.ready.load(Ordering::Relaxed));
        let untouched = h.next_generation.load(Ordering::Relaxed) <= 1
            && h.slots_high.load(Ordering::Relaxed) == 0
            && h.procs_high.load(Ordering::Relaxed) == 0;
        ready != READY && (magic == MAGIC || magic == 0) && untouched
    }

    /// Opens and validates an existing registry. `access` is `Read` for inspection.
    pub fn open(dir: os::Dir, domain: &str, access: os::Access, allow_foreign: bool) -> Result<Registry> {
        let (fd, st) = open_object_checked(&dir, domain, access, allow_foreign)?;
        // Before mapping: an empty object cannot be mapped, and a short one would fault.
        header::check_size::<RegistryShared>(st.size).map_err(|m| corrupt(domain, m.to_string()))?;
        // The header's page alone first, to learn the layout; then the whole registry at its
        // largest length (see "Growth").
        let page = os::page_size();
        let base = os::map_shared(&fd, page, access)
            .map_err(|e| Error::from_io(format!("cannot map the registry of domain {domain:?}"), e))?;
        let mut reg = Registry {
            domain: domain.to_owned(),
            dir,
            fd,
            base,
            map_len: page,
            private: None,
            layout: Layout::default(),
            verified_segments: AtomicU32::new(0),
            window_base: 0,
            window_size: 0,
            max_sections: 0,
            max_procs: 0,
            mode: 0,
            created_at: 0,
        };
        reg.validate(None)?;
        let full = reg.layout.total_size as usize;
        let base = os::map_shared(&reg.fd, full, access)
            .map_err(|e| Error::from_io(format!("cannot map the registry of domain {domain:?}"), e))?;
        // SAFETY: the header mapping is this handle's own and no reference into it is alive
        // (`validate` returned; we hold `&mut`).
        let _ = unsafe { os::unmap(reg.base.as_ptr() as usize, reg.map_len) };
        reg.base = base;
        reg.map_len = full;
        // The frozen fields read again through the full mapping (they cannot have changed).
        reg.validate(None)?;
        Ok(reg)
    }

    /// Reads a registry into private memory with `pread` instead of mapping it: the copy is
    /// immune to its owner truncating, regrowing or rewriting the object meanwhile (see
    /// "Strangers"). With `tables`, every backed segment is copied too (section and process
    /// entries, the chunk table) with the name index; without, the header only. The copy is validated as a mapping would be and read through the same readers;
    /// it is never locked or written. Liveness of its process entries is still asked of the
    /// kernel through the open descriptor.
    pub fn snapshot(dir: os::Dir, domain: &str, allow_foreign: bool, tables: bool) -> Result<Registry> {
        let (fd, _) = open_object_checked(&dir, domain, os::Access::Read, allow_foreign)?;
        let header_len = size_of::<RegistryShared>();
        let mut reg = Registry::private_copy(dir, fd, domain, header_len)?;
        reg.fill_from_object(header_len)?;
        reg.validate(None)?;
        if !tables {
            return Ok(reg);
        }
        // Every backed segment (the chunk table and name index come along; they are small).
        // Relaxed: a private copy nobody else writes.
        let backed = reg.header().segments_backed.load(Ordering::Relaxed);
        let len = reg.layout.backed_len(backed) as usize;
        let layout = reg.layout;
        let (dir, fd) = reg.take_fds()?;
        let mut reg = Registry::private_copy(dir, fd, domain, len)?;
        let got = reg.fill_from_object(len)?;
        if got < len {
            return Err(corrupt(domain, format!("the object is truncated to {got} bytes, expected {len}")));
        }
        // The header is read again with the tables; validate what this copy holds, which must
        // still be the layout we sized the copy for (its owner may have rewritten it between
        // the two reads). A count of segments grown meanwhile is clamped to the copy.
        reg.validate(None)?;
        if reg.layout != layout {
            return Err(corrupt(domain, "its table sizes changed while it was being read".into()));
        }
        Ok(reg)
    }

    /// A registry over `bytes` (as if they were a registry object's contents) in private
    /// memory, for the fuzz target: validated like [`Registry::open`], with `bytes.len()` as
    /// the object's size.
    pub(crate) fn from_bytes(dir: os::Dir, domain: &str, bytes: &[u8]) -> Result<Registry> {
        let fd = dir.open_self().map_err(|e| Error::from_io("cannot open a stand-in object", e))?;
        let mut reg = Registry::private_copy(dir, fd, domain, bytes.len().max(size_of::<RegistryShared>()))?;
        // SAFETY: the copy is at least `bytes.len()` bytes, freshly allocated, and no reference
        // into it exists yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), reg.base.as_ptr(), bytes.len()) };
        reg.validate(Some(bytes.len() as u64))?;
        Ok(reg)
    }

    /// A handle over `len` zeroed private bytes, not yet validated.
    fn private_copy(dir: os::Dir, fd: os::Object, domain: &str, len: usize) -> Result<Registry> {
        let layout = std::alloc::Layout::from_size_align(len.max(size_of::<RegistryShared>()), 64)
            .map_err(|_| Error::new(ErrorKind::InvalidSize, "registry copy size overflows"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(base) = NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        Ok(Registry {
            domain: domain.to_owned(),
            dir,
            fd,
            base,
            map_len: layout.size(),
            private: Some(layout),
            layout: Layout::default(),
            verified_segments: AtomicU32::new(0),
            window_base: 0,
            window_size: 0,
            max_sections: 0,
            max_procs: 0,
            mode: 0,
            created_at: 0,
        })
    }

    /// Copies the object's first `len` bytes into this private copy; a shorter object leaves
    /// the rest zero (a truncation racing with us reads as free slots or fails validation).
    /// Returns how many bytes the object had.
    fn fill_from_object(&mut self, len: usize) -> Result<usize> {
        debug_assert!(self.private.is_some() && len <= self.map_len);
        // SAFETY: the private copy is `map_len >= len` bytes, owned by this handle, and no
        // reference into it is alive (we hold `&mut self`).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), len) };
        self.fd
            .read_at(0, buf)
            .map_err(|e| Error::from_io(format!("cannot read the registry of domain {:?}", self.domain), e))
    }

    /// Moves the descriptors out of a private copy about to be replaced.
    fn take_fds(self) -> Result<(os::Dir, os::Object)> {
        let dir = self.dir.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))?;
        let fd = self.fd.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))?;
        Ok((dir, fd))
    }

    /// Checks the header and fills in the cached frozen fields. `object_size` is the size of
    /// the object the bytes stand for; `None` asks `fstat` after reading the header's count of
    /// backed segments (the object grows before its count is raised, so a size read after the
    /// count covers it, even while a writer grows it).
    fn validate(&mut self, object_size: Option<u64>) -> Result<()> {
        let d = self.domain.clone();
        // `None` (a mapping of our own): `open` checked the object holds at least a header.
        let available = object_size.unwrap_or(self.map_len as u64).min(self.map_len as u64);
        // SAFETY: `base` is page-aligned (a mapping) or 64-aligned (a private copy), its first
        // `map_len >= available` bytes stay valid while `self` lives, and others write them only
        // through atomics and the lock.
        let h = unsafe { header::validate::<RegistryShared>(self.base.as_ptr(), available) }.map_err(|m| {
            if let header::Mismatch::NotReady { .. } = m {
                // Attaching and `gc` look only under the directory lock, where this means the
                // creator died (and they make or remove it anew); an inspector may also catch a
                // creator at work.
                corrupt(
                    &d,
                    format!(
                        "{m}: it is not finished (its creator died while creating it, or is creating it right now)"
                    ),
                )
            } else {
                corrupt(&d, m.to_string())
            }
        })?;
        let max_sections = h.max_sections.load(Ordering::Relaxed);
        let max_procs = h.max_procs.load(Ordering::Relaxed);
        let window_base = h.window_base.load(Ordering::Relaxed);
        let window_size = h.window_size.load(Ordering::Relaxed);
        if !(1..=MAX_TABLE_ENTRIES).contains(&max_sections) || !(1..=MAX_TABLE_ENTRIES).contains(&max_procs) {
            return Err(corrupt(
                &d,
                format!(
                    "table sizes {max_sections} sections / {max_procs} processes out of range 1..={MAX_TABLE_ENTRIES}"
                ),
            ));
        }
        if !(MIN_WINDOW_SIZE..=MAX_WINDOW_SIZE).contains(&window_size)
            || window_size % CHUNK != 0
            || window_base % CHUNK != 0
            || window_base < MIN_WINDOW_BASE
            || window_base.checked_add(window_size).is_none_or(|end| end > os::USER_ADDRESS_LIMIT)
        {
            return Err(corrupt(
                &d,
                format!("window {window_base:#x}+{window_size:#x} is not a valid, chunk-aligned user-space range"),
            ));
        }
        let layout = Layout::compute(max_sections, max_procs, window_size)
            .ok_or_else(|| corrupt(&d, "layout overflows".into()))?;
        let found = (
            h.sections_offset.load(Ordering::Relaxed),
            h.procs_offset.load(Ordering::Relaxed) as u64,
            h.chunks_offset.load(Ordering::Relaxed) as u64,
            h.segment_size.load(Ordering::Relaxed) as u64,
            h.total_size.load(Ordering::Relaxed),
        );
        let expected =
            (layout.sections_offset, layout.procs_offset, layout.chunks_offset, layout.segment_size, layout.total_size);
        if found != expected {
            return Err(corrupt(
                &d,
                format!(
                    "table offsets (segments at, processes at, chunks at, segment size, total) {found:?} disagree \
                     with the sizes, expected {expected:?}"
                ),
            ));
        }
        // Acquire: pairs with the Release store in `grow`, made after the object was extended,
        // so the size read below covers what the count says.
        let backed = h.segments_backed.load(Ordering::Acquire);
        if !(1..=layout.segments).contains(&backed) {
            return Err(corrupt(&d, format!("segments_backed {backed} is out of range 1..={}", layout.segments)));
        }
        let object_size = match object_size {
            Some(n) => n,
            None => self.fd.stat().map_err(|e| Error::from_io("cannot stat the registry", e))?.size,
        };
        if object_size < layout.backed_len(backed) {
            return Err(corrupt(
                &d,
                format!(
                    "the object is truncated to {object_size} bytes, expected {} ({backed} segments)",
                    layout.backed_len(backed)
                ),
            ));
        }
        let name_ok = unpack_name(&h.domain, h.domain_len.load(Ordering::Relaxed)).is_some_and(|n| n.as_str() == d);
        if !name_ok {
            return Err(corrupt(&d, "the domain name recorded inside does not match its file name".into()));
        }
        let mode = h.mode.load(Ordering::Relaxed);
        let created_at = h.created_at.load(Ordering::Relaxed);
        self.mode = mode;
        self.created_at = created_at;
        self.layout = layout;
        self.window_base = window_base;
        self.window_size = window_size;
        self.max_sections = max_sections;
        self.max_procs = max_procs;
        let held = if self.private.is_some() { layout.segments_within(self.map_len as u64) } else { layout.segments };
        self.verified_segments.store(backed.min(held), Ordering::Relaxed);
        Ok(())
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn dir(&self) -> &os::Dir {
        &self.dir
    }

    /// Whether the domain is made to last ([`FLAG_KEPT`]): kept while empty, until `domain rm`.
    /// Decisions that depend on it (removing an empty registry) read it under the lock.
    pub(crate) fn is_kept(&self) -> bool {
        // Relaxed: changed and decided on under the registry lock (`RegistryGuard::mark_kept`).
        self.header().flags.load(Ordering::Relaxed) & FLAG_KEPT != 0
    }

    fn header(&self) -> &RegistryShared {
        // SAFETY: the mapping is at least `size_of::<RegistryShared>()` bytes (checked in
        // `open`, made so in `create`), page-aligned, lives as long as `self`, and every field
        // is an atomic or the robust mutex, so shared access from other processes is sound.
        unsafe { &*self.base.as_ptr().cast::<RegistryShared>() }
    }

    /// How many segments this process may touch (see "Growth"): the published count, clamped
    /// by what the object (or this private copy) was checked to hold, and never less than a
    /// count this process already checked (the object never shrinks, so a count lowered by a
    /// stray write hides nothing and cannot make a bound computed earlier unsafe). Async-signal-
    /// safe: a load, and an `fstat` the first time a higher count is seen.
    pub(super) fn segments(&self) -> u32 {
        // Relaxed: a process-local cache.
        let verified = self.verified_segments.load(Ordering::Relaxed);
        // Acquire: pairs with the Release store in `grow`, made after the object was extended.
        let published = self.header().segments_backed.load(Ordering::Acquire).min(self.layout.segments);
        if published <= verified || self.private.is_some() {
            return verified;
        }
        let size = self.fd.stat().map(|st| st.size).unwrap_or(0);
        let ok = published.min(self.layout.segments_within(size));
        // Relaxed: as above.
        self.verified_segments.fetch_max(ok, Ordering::Relaxed);
        ok.max(verified)
    }

    /// Section slots, process slots and chunks of the backed segments (see "Growth").
    pub(super) fn backed_slots(&self) -> u32 {
        self.layout.slots_in(self.segments())
    }
    pub(super) fn backed_procs(&self) -> u32 {
        self.layout.procs_in(self.segments())
    }
    pub(super) fn backed_chunks(&self) -> u64 {
        self.layout.chunks_in(self.segments())
    }

    /// Section entry `slot`, which must be below [`Registry::backed_slots`].
    fn entry(&self, slot: u32) -> &SectionEntryShared {
        assert!(slot < self.max_sections && slot < self.backed_slots(), "section slot {slot} is not backed");
        let off = self.layout.section_at(slot) as usize;
        assert!(off + size_of::<SectionEntryShared>() <= self.map_len, "entry outside the registry copy");
        // SAFETY: the slot lies in a backed segment (checked just above: the object holds it,
        // so touching it cannot fault), inside the mapping or copy; offsets are multiples of 8;
        // all fields are atomics.
        unsafe { &*self.base.as_ptr().add(off).cast::<SectionEntryShared>() }
    }

    /// Process entry `slot`, which must be below [`Registry::backed_procs`].
    fn proc_entry(&self, slot: u32) -> &ProcEntryShared {
        assert!(slot < self.max_procs && slot < self.backed_procs(), "process slot {slot} is not backed");
        assert!(self.proc_offset(slot) as usize + size_of::<ProcEntryShared>() <= self.map_len);
        // SAFETY: as in `entry`.
        unsafe { &*self.base.as_ptr().add(self.proc_offset(slot) as usize).cast::<ProcEntryShared>() }
    }

    /// The byte offset of process entry `slot` (also its liveness token's byte).
    fn proc_offset(&self, slot: u32) -> u64 {
        self.layout.proc_at(slot)
    }

    /// Chunk-table entry `index`, which must be below [`Registry::backed_chunks`].
    fn chunk(&self, index: u64) -> &AtomicU32 {
        assert!(index < self.window_size / CHUNK && index < self.backed_chunks(), "chunk {index} is not backed");
        let off = self.layout.chunk_at(index) as usize;
        assert!(off + 4 <= self.map_len, "chunk table not in this copy");
        // SAFETY: as in `entry`; 4-aligned.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The slot + 1 owning chunk `index`, 0 for none; a chunk of a segment not backed yet has
    /// never been handed out.
    pub(super) fn chunk_owner(&self, index: u64) -> u32 {
        if index >= self.backed_chunks() {
            return 0;
        }
        // Relaxed: callers validate through the entry's seqlock, or hold the lock.
        self.chunk(index).load(Ordering::Relaxed)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(layout) = self.private {
            // SAFETY: allocated in `private_copy` with this layout; no reference into it
            // outlives `self` (all accessors borrow `self`).
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
            return;
        }
        // SAFETY: the mapping was created by this handle and no reference into it outlives
        // `self` (all accessors borrow `self`).
        let _ = unsafe { os::unmap(self.base.as_ptr() as usize, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_page_rounded_and_ordered() {
        let l = Layout::compute(4096, 1024, DEFAULT_WINDOW_SIZE).unwrap();
        let page = os::page_size() as u64;
        assert_eq!(l.names_offset, size_of::<RegistryShared>() as u64);
        assert!(l.sections_offset >= l.names_offset + l.name_buckets * 4);
        assert_eq!(l.sections_offset % page, 0);
        assert_eq!(l.segment_size % page, 0);
        assert!(l.procs_offset >= l.sections_per_segment as u64 * size_of::<SectionEntryShared>() as u64);
        assert!(l.chunks_offset >= l.procs_offset + l.procs_per_segment as u64 * size_of::<ProcEntryShared>() as u64);
        assert!(l.segment_size >= l.chunks_offset + l.chunks_per_segment * 4);
        assert_eq!(l.total_size, l.backed_len(l.segments));
        assert!(l.slots_in(l.segments) == 4096 && l.procs_in(l.segments) == 1024);
        assert_eq!(l.chunks_in(l.segments), DEFAULT_WINDOW_SIZE / CHUNK);
        // One segment with the defaults stays far below 512 KiB.
        assert!(l.backed_len(1) <= 256 << 10, "{l:?}");
    }

    #[test]
    fn every_slot_and_chunk_lies_in_its_own_segment() {
        for (s, p, w) in [
            (4096, 1024, DEFAULT_WINDOW_SIZE),
            (8, 4, MIN_WINDOW_SIZE),
            (65536, 65536, MAX_WINDOW_SIZE),
            (1, 1, 1 << 30),
            (300, 3, 64 << 30),
        ] {
            let l = Layout::compute(s, p, w).unwrap();
            let seg = |off: u64| (off - l.sections_offset) / l.segment_size;
            for slot in [0, s / 2, s - 1] {
                assert_eq!(seg(l.section_at(slot)) + 1, l.segments_for_slot(slot) as u64);
                assert!(slot < l.slots_in(l.segments_for_slot(slot)));
                assert!(
                    l.section_at(slot) + size_of::<SectionEntryShared>() as u64
                        <= l.backed_len(l.segments_for_slot(slot))
                );
            }
            for slot in [0, p / 2, p - 1] {
                assert_eq!(seg(l.proc_at(slot)) + 1, l.segments_for_proc(slot) as u64);
                assert!(slot < l.procs_in(l.segments_for_proc(slot)));
                assert!(l.proc_at(slot) + 64 <= l.backed_len(l.segments_for_proc(slot)));
            }
            let chunks = w / CHUNK;
            for c in [0, chunks / 2, chunks - 1] {
                assert_eq!(seg(l.chunk_at(c)) + 1, l.segments_for_chunk(c) as u64);
                assert!(c < l.chunks_in(l.segments_for_chunk(c)));
                assert!(l.chunk_at(c) + 4 <= l.backed_len(l.segments_for_chunk(c)));
            }
            assert_eq!(l.segments_within(l.backed_len(3)), 3.min(l.segments));
            assert_eq!(l.segments_within(l.backed_len(1) - 1), 0);
        }
    }

    #[test]
    fn fingerprint_is_stable_within_a_build() {
        assert_ne!(ABI_FINGERPRINT, 0);
    }

    /// `threads_visible`: thread ids speak for every possible lock holder only while every
    /// live registration recorded our pid namespace and the registry lock is free or held by
    /// a holder recorded there.
    #[test]
    fn thread_ids_speak_for_holders_only_while_every_live_registration_is_in_our_namespace() {
        let mine = crate::sync::robust::my_namespace();
        if mine == 0 {
            eprintln!("skipped: the mounted /proc is not this process's pid namespace's");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("shmgadget-threads-visible-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let params = CreateParams {
            window_base: MIN_WINDOW_BASE,
            window_size: MIN_WINDOW_SIZE,
            max_sections: 8,
            max_procs: 8,
            mode: 0o600,
        };
        let reg = Registry::create(os::Dir::open(&tmp).unwrap(), "tv", &params).unwrap();
        assert!(reg.threads_visible(mine), "nobody registered");
        assert!(!reg.threads_visible(0), "an unknown namespace is never ours");
        let register = |ns| reg.lock().unwrap().register_proc(1, ns).unwrap().1;
        let _ours = register(mine);
        assert!(reg.threads_visible(mine));
        let foreign = register(mine ^ 1);
        assert!(!reg.threads_visible(mine), "a live registration of another namespace");
        drop(foreign);
        assert!(reg.threads_visible(mine), "a dead registration's threads are gone");
        let unknown = register(0);
        assert!(!reg.threads_visible(mine), "a live registration of an unknown namespace");
        drop(unknown);
        {
            let _guard = reg.lock().unwrap();
            assert!(reg.threads_visible(mine), "the registry lock held here, recorded in our namespace");
        }
        // SAFETY: the lock word is an AtomicU32 at offset 0 of the lock (asserted in
        // `sync::robust`), and no thread uses this registry's lock meanwhile.
        let word = unsafe { &*(&reg.header().lock as *const crate::sync::RobustLock as *const AtomicU32) };
        // A holder that took the word and died before writing its record.
        word.store(0x3fff_fff0, Ordering::Relaxed);
        assert!(!reg.threads_visible(mine), "a registry lock holder nobody can place");
        word.store(0, Ordering::Relaxed);
        assert!(reg.threads_visible(mine));
        drop(reg);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
