//! The registry (the classic "pool list"): one shared object per domain describing its address
//! window, its sections and the processes attached to it.
//!
//! # Layout
//! ```text
//! 0        RegistryShared     header: identity, window, table sizes, counters, robust lock
//! S        SectionEntryShared [max_sections]   one entry per section slot
//! P        ProcEntryShared    [max_procs]      one entry per attached process
//! C        AtomicU32          [window / 2 MiB] chunk table: slot + 1 owning each 2 MiB chunk
//! ```
//! `S`, `P`, `C` and the total size follow from `max_sections`, `max_procs` and `window_size`
//! ([`Layout::compute`]); an opener recomputes them and refuses a registry that disagrees.
//!
//! # Synchronisation
//! * **Creation.** The creator holds the shm directory's `flock` (as does every opener), fills
//!   the header and publishes it with a Release store of `ready = READY`. Fields written before
//!   that store are frozen: `magic`, `layout_version`, `abi_fingerprint`, `max_*`, `mode`,
//!   `total_size`, `window_*`, the offsets, `created_at` and the domain name. An opener that finds
//!   `ready != READY` while holding the directory lock knows the creator died mid-way.
//! * **Writers** of section entries, process entries and the chunk table hold `lock`,
//!   shmgadget's own robust process-shared lock (`sync::robust`). `next_generation`, `place_cursor`, `slots_high` and
//!   `procs_high` are written only under it.
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
//! A writer that dies holding `lock` (shmgadget's own robust lock, `sync::robust`) makes the
//! next locker's lock call return `OwnerDied`. That locker repairs ([`Registry::repair`]): an entry left `CREATING` or
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
//! * `state`, `pid`, `uid`, `incarnation` and `attached_at` are written under `lock`; `pid`
//!   is also written once by a forked child's fork handler for the entry made for it just
//!   before the fork (see `Domain`). `pid` and `uid` are for display only.
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
//! registry is committed (`fallocate`) when created, so no reader or repair ever touches a
//! hole, which on a full tmpfs would be a SIGBUS.
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

use std::mem::{offset_of, size_of};
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::error::{Error, ErrorKind, Result, bail};
use crate::names;
use crate::os;
use crate::sync::{LockOutcome, RobustLock};

/// Default base of the first domain's window.
pub const DEFAULT_WINDOW_BASE: u64 = 0x2000_0000_0000;
/// Default window size: 1 TiB.
pub const DEFAULT_WINDOW_SIZE: u64 = 1 << 40;
/// Placement granule: sections start at multiples of 2 MiB inside the window.
pub const CHUNK: u64 = 2 << 20;
/// Alignment of window bases chosen automatically for new domains.
pub const WINDOW_ALIGN: u64 = 1 << 30;
/// Smallest window a domain may have.
pub const MIN_WINDOW_SIZE: u64 = 16 << 20;
/// Largest window a domain may have (its chunk table is then 128 MiB, sparse).
pub const MAX_WINDOW_SIZE: u64 = 64 << 40;
/// Lowest window base accepted.
pub const MIN_WINDOW_BASE: u64 = 1 << 32;
/// Default number of section entries.
pub const DEFAULT_MAX_SECTIONS: u32 = 4096;
/// Default number of process entries.
pub const DEFAULT_MAX_PROCS: u32 = 1024;
/// Upper bound for both table sizes.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 16;

const MAGIC: u64 = u64::from_le_bytes(*b"SHMGREG\x01");
/// 2: process entries carry an `incarnation`, and tokens are `(slot, incarnation)`.
/// 3: section entries carry their creator's token and a ready word (all-or-nothing creation).
/// 5: the lock is shmgadget's own robust lock (`sync::robust`), not a glibc mutex.
const LAYOUT_VERSION: u32 = 5;
const READY: u32 = 0x5244_5921; // "RDY!"
const TOMBSTONE: u32 = u32::MAX;

/// FNV-1a over the name's bytes, for the name index.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Entry states (see the table in the module docs).
pub(crate) const FREE: u32 = 0;
pub(crate) const CREATING: u32 = 1;
pub(crate) const LIVE: u32 = 2;
pub(crate) const DELETING: u32 = 3;

/// Value of a section entry's `ready` word once its contents are initialised.
const READY_SECTION: u32 = 0x5345_4321; // "SEC!"

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    /// Plain bytes.
    Raw,
    /// A shared heap.
    Heap,
    /// A message queue.
    Queue,
}

impl SectionKind {
    fn to_raw(self) -> u32 {
        match self {
            SectionKind::Raw => 1,
            SectionKind::Heap => 2,
            SectionKind::Queue => 3,
        }
    }
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => SectionKind::Raw,
            2 => SectionKind::Heap,
            3 => SectionKind::Queue,
            _ => return None,
        })
    }
    /// Lower-case name, as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            SectionKind::Raw => "raw",
            SectionKind::Heap => "heap",
            SectionKind::Queue => "queue",
        }
    }
}

/// How long a section lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifetime {
    /// Until deleted explicitly.
    Persistent,
    /// Until no process is attached to the domain any more.
    Transient,
}

impl Lifetime {
    fn to_raw(self) -> u32 {
        match self {
            Lifetime::Persistent => 1,
            Lifetime::Transient => 2,
        }
    }
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => Lifetime::Persistent,
            2 => Lifetime::Transient,
            _ => return None,
        })
    }
    /// Lower-case name, as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifetime::Persistent => "persistent",
            Lifetime::Transient => "transient",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared structures
// ---------------------------------------------------------------------------------------------

/// Registry header, at offset 0 of the registry object.
#[repr(C)]
pub(crate) struct RegistryShared {
    magic: AtomicU64,
    layout_version: AtomicU32,
    abi_fingerprint: AtomicU32,
    ready: AtomicU32,
    max_sections: AtomicU32,
    max_procs: AtomicU32,
    mode: AtomicU32,
    total_size: AtomicU64,
    window_base: AtomicU64,
    window_size: AtomicU64,
    sections_offset: AtomicU64,
    procs_offset: AtomicU64,
    chunks_offset: AtomicU64,
    next_generation: AtomicU64,
    place_cursor: AtomicU64,
    name_tombs: AtomicU32,
    domain_len: AtomicU32,
    created_at: AtomicU64,
    slots_high: AtomicU32,
    procs_high: AtomicU32,
    /// The registry lock's holder's token (its registration in this domain), written right
    /// after a successful lock and cleared before unlock; 0 when free or when the holder is
    /// not attached (a tool such as `gc`, or a process registering). See "Bounded waits".
    lock_owner: AtomicU64,
    domain: [AtomicU64; 8],
    lock: RobustLock,
}

/// One section slot.
#[repr(C)]
pub(crate) struct SectionEntryShared {
    seq: AtomicU64,
    state: AtomicU32,
    kind: AtomicU32,
    lifetime: AtomicU32,
    mode: AtomicU32,
    owner_uid: AtomicU32,
    name_len: AtomicU32,
    generation: AtomicU64,
    offset: AtomicU64,
    reserved: AtomicU64,
    committed: AtomicU64,
    created_at: AtomicU64,
    creator_pid: AtomicU32,
    _pad0: AtomicU32,
    name: [AtomicU64; 8],
    /// The creator's peer token (`Domain::peer_token`): decides whether a section that never
    /// became ready still has a creator that may finish it.
    creator_token: AtomicU64,
    /// `READY_SECTION` once the section's contents are initialised (see "Readiness").
    ready: AtomicU32,
    _pad1: AtomicU32,
}

/// One attached-process slot. Its byte offset in the registry object is also the byte the
/// process locks as its liveness token.
#[repr(C)]
pub(crate) struct ProcEntryShared {
    state: AtomicU32,
    pid: AtomicU32,
    uid: AtomicU32,
    /// Bumped (never to 0) at each registration of this slot.
    incarnation: AtomicU32,
    attached_at: AtomicU64,
    _reserved: [AtomicU64; 5],
}

const _: () = {
    assert!(size_of::<RegistryShared>() == 256);
    assert!(offset_of!(RegistryShared, domain) == 128);
    assert!(offset_of!(RegistryShared, lock) == 192);
    assert!(offset_of!(RegistryShared, lock_owner) == 120);
    assert!(size_of::<SectionEntryShared>() == 160);
    assert!(offset_of!(SectionEntryShared, name) == 80);
    assert!(offset_of!(SectionEntryShared, creator_token) == 144);
    assert!(offset_of!(SectionEntryShared, ready) == 152);
    assert!(size_of::<ProcEntryShared>() == 64);
    assert!(offset_of!(ProcEntryShared, incarnation) == 12);
};

/// A hash of everything that decides the shared layout, so two builds that disagree on it
/// refuse each other's registries instead of misreading them.
const ABI_FINGERPRINT: u32 = {
    let parts: [u64; 14] = [
        LAYOUT_VERSION as u64,
        offset_of!(RegistryShared, lock_owner) as u64,
        size_of::<RegistryShared>() as u64,
        size_of::<SectionEntryShared>() as u64,
        size_of::<ProcEntryShared>() as u64,
        offset_of!(RegistryShared, lock) as u64,
        offset_of!(RegistryShared, domain) as u64,
        offset_of!(SectionEntryShared, name) as u64,
        offset_of!(SectionEntryShared, committed) as u64,
        offset_of!(SectionEntryShared, creator_token) as u64,
        offset_of!(ProcEntryShared, attached_at) as u64,
        size_of::<RobustLock>() as u64,
        CHUNK,
        2, // name index: 2 buckets per section slot, linear probing, FNV-1a
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < parts.len() {
        let mut b = 0;
        while b < 8 {
            h ^= (parts[i] >> (b * 8)) & 0xff;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            b += 1;
        }
        i += 1;
    }
    (h ^ (h >> 32)) as u32
};

/// Where the tables sit, derived from the three sizing parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    pub sections_offset: u64,
    pub procs_offset: u64,
    pub chunks_offset: u64,
    pub total_size: u64,
    /// Derived, not stored: follows the chunk table (covered by `total_size`).
    pub names_offset: u64,
    /// Buckets of the name index (a power of two, at least twice `max_sections`).
    pub name_buckets: u64,
}

impl Layout {
    pub fn compute(max_sections: u32, max_procs: u32, window_size: u64) -> Option<Layout> {
        let sections_offset = size_of::<RegistryShared>() as u64;
        let procs_offset = sections_offset + max_sections as u64 * size_of::<SectionEntryShared>() as u64;
        let chunks_offset = procs_offset + max_procs as u64 * size_of::<ProcEntryShared>() as u64;
        let chunks = window_size / CHUNK;
        let names_offset = chunks_offset.checked_add(chunks.checked_mul(4)?)?;
        let name_buckets = (2 * max_sections as u64).next_power_of_two();
        let total = names_offset.checked_add(name_buckets * 4)?;
        let page = os::page_size() as u64;
        Some(Layout {
            sections_offset,
            procs_offset,
            chunks_offset,
            total_size: total.div_ceil(page) * page,
            names_offset,
            name_buckets,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Process-local copies
// ---------------------------------------------------------------------------------------------

/// A section name stored inline, so records can be copied without allocating (the fault
/// handler copies them inside a signal handler).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InlineName {
    len: u8,
    bytes: [u8; 64],
}

impl InlineName {
    /// The name. Records are validated when read, so this is always `[A-Za-z0-9._-]+`.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl std::fmt::Debug for InlineName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

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
    fn new(slot: u32, incarnation: u32) -> ProcToken {
        ProcToken((slot as u64 + 1) << 32 | incarnation as u64)
    }
    /// The slot and incarnation, if the value is a token at all.
    fn parts(self) -> Option<(u32, u32)> {
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

/// Who creates a section entry, and whether it is ready at once (see "Readiness").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Creator {
    /// The creator's peer token (`Domain::peer_token`).
    pub token: u64,
    /// Ready from creation (raw sections), or only once marked (heaps, queues).
    pub ready: bool,
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
    dir: OwnedFd,
    fd: OwnedFd,
    base: NonNull<u8>,
    /// Bytes valid at `base`: the mapping's length, or the private copy's.
    map_len: usize,
    /// `Some` when `base` is a private copy (see "Strangers") allocated with this layout
    /// instead of a shared mapping: read-only in spirit, never locked, freed on drop.
    private: Option<std::alloc::Layout>,
    layout: Layout,
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

fn pack_name(dst: &[AtomicU64; 8], name: &str) {
    let mut buf = [0u8; 64];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    for (i, word) in dst.iter().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        // Relaxed: published by the enclosing seqlock write or the `ready` Release store.
        word.store(u64::from_le_bytes(w), Ordering::Relaxed);
    }
}

fn unpack_name(src: &[AtomicU64; 8], len: u32) -> Option<InlineName> {
    if len == 0 || len as usize > names::MAX_NAME_LEN {
        return None;
    }
    let mut bytes = [0u8; 64];
    for (i, word) in src.iter().enumerate() {
        // Relaxed: the caller validates consistency (seqlock or `ready`).
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let name = InlineName { len: len as u8, bytes };
    let valid = name.bytes[..len as usize].iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    valid.then_some(name)
}

/// A name field as stored, made printable (for reports of damaged entries).
fn raw_name(src: &[AtomicU64; 8], len: u32) -> String {
    let mut bytes = [0u8; 64];
    for (i, word) in src.iter().enumerate() {
        // Relaxed: diagnostic copy.
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let n = (len as usize).min(64);
    bytes[..n].iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
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
    dir: &OwnedFd,
    domain: &str,
    writable: bool,
    allow_foreign: bool,
) -> Result<(OwnedFd, os::ObjectStat)> {
    let object = names::registry_object(domain);
    let fd = os::open_object(os::borrow(dir), &object, writable).map_err(|e| {
            if e.raw_os_error() == Some(2) {
                Error::new(ErrorKind::NotFound, format!("domain {domain:?} does not exist (no registry object {object:?}); `shmgadget domains` lists the existing ones"))
            } else {
                Error::from_io(format!("cannot open the registry of domain {domain:?}"), e)
            }
        })?;
    let st = os::stat_object(os::borrow(&fd)).map_err(|e| Error::from_io("cannot stat the registry", e))?;
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
    pub fn create(dir: OwnedFd, domain: &str, p: &CreateParams) -> Result<Registry> {
        let layout = Layout::compute(p.max_sections, p.max_procs, p.window_size)
            .ok_or_else(|| Error::new(ErrorKind::InvalidSize, "registry size overflows"))?;
        let object = names::registry_object(domain);
        let fd = os::create_object(os::borrow(&dir), &object, p.mode)
            .map_err(|e| Error::from_io(format!("cannot create the registry of domain {domain:?}"), e))?;
        let cleanup = |e: Error| {
            let _ = os::unlink_object(os::borrow(&dir), &object);
            e
        };
        if let Err(e) = os::set_size(os::borrow(&fd), layout.total_size) {
            return Err(cleanup(Error::from_io(format!("cannot size the registry of domain {domain:?}"), e)));
        }
        // Commit every page before anything is written or read: a sparse registry on a full
        // tmpfs makes the first touch of a hole (even a read) SIGBUS in whichever process
        // comes first, and a repair would write into holes too. Committed, it never faults.
        if let Err(e) = os::allocate(os::borrow(&fd), 0, layout.total_size) {
            return Err(cleanup(Error::from_io(
                format!(
                    "cannot commit the {} bytes of domain {domain:?}'s registry (is the shm file system full?)",
                    layout.total_size
                ),
                e,
            )));
        }
        let base = match os::map_shared(os::borrow(&fd), layout.total_size as usize, true) {
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
        h.procs_offset.store(layout.procs_offset, Ordering::Relaxed);
        h.chunks_offset.store(layout.chunks_offset, Ordering::Relaxed);
        h.next_generation.store(1, Ordering::Relaxed);
        h.created_at.store(reg.created_at, Ordering::Relaxed);
        h.domain_len.store(domain.len() as u32, Ordering::Relaxed);
        pack_name(&h.domain, domain);
        // SAFETY: the object was just created with O_EXCL and nobody else can have mapped it
        // (openers wait on the directory lock we hold), and the mapping stays put while
        // `reg` lives.
        if let Err(e) = unsafe { h.lock.init() } {
            let _ = os::unlink_object(os::borrow(&reg.dir), &object);
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
    pub fn is_unfinished(dir: &OwnedFd, domain: &str) -> bool {
        let object = names::registry_object(domain);
        let Ok(fd) = os::open_object(os::borrow(dir), &object, false) else { return false };
        let Ok(st) = os::stat_object(os::borrow(&fd)) else { return false };
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

    /// Opens and validates an existing registry. `writable` is false for inspection.
    pub fn open(dir: OwnedFd, domain: &str, writable: bool, allow_foreign: bool) -> Result<Registry> {
        let (fd, st) = open_object_checked(&dir, domain, writable, allow_foreign)?;
        if st.size < size_of::<RegistryShared>() as u64 {
            return Err(corrupt(
                domain,
                format!(
                    "the object is truncated to {} bytes, expected at least {}",
                    st.size,
                    size_of::<RegistryShared>()
                ),
            ));
        }
        let map_len = st.size as usize;
        let base = os::map_shared(os::borrow(&fd), map_len, writable)
            .map_err(|e| Error::from_io(format!("cannot map the registry of domain {domain:?}"), e))?;
        let mut reg = Registry {
            domain: domain.to_owned(),
            dir,
            fd,
            base,
            map_len,
            private: None,
            layout: Layout::default(),
            window_base: 0,
            window_size: 0,
            max_sections: 0,
            max_procs: 0,
            mode: 0,
            created_at: 0,
        };
        reg.validate(st.size)?;
        Ok(reg)
    }

    /// Reads a registry into private memory with `pread` instead of mapping it: the copy is
    /// immune to its owner truncating, regrowing or rewriting the object meanwhile (see
    /// "Strangers"). With `tables`, the section and process tables are copied too (not the
    /// chunk table or name index, which only attached processes use); without, the header
    /// only. The copy is validated as a mapping would be and read through the same readers;
    /// it is never locked or written. Liveness of its process entries is still asked of the
    /// kernel through the open descriptor.
    pub fn snapshot(dir: OwnedFd, domain: &str, allow_foreign: bool, tables: bool) -> Result<Registry> {
        let (fd, st) = open_object_checked(&dir, domain, false, allow_foreign)?;
        let header_len = size_of::<RegistryShared>();
        let mut reg = Registry::private_copy(dir, fd, domain, header_len)?;
        reg.fill_from_object(header_len)?;
        reg.validate(st.size)?;
        if !tables {
            return Ok(reg);
        }
        let len = reg.layout.chunks_offset as usize;
        let (dir, fd) = reg.take_fds()?;
        let mut reg = Registry::private_copy(dir, fd, domain, len)?;
        reg.fill_from_object(len)?;
        // The header is read again with the tables; validate what this copy holds, which must
        // still be the layout we sized the copy for (its owner may have rewritten it between
        // the two reads).
        reg.validate(st.size)?;
        if reg.layout.chunks_offset as usize != len {
            return Err(corrupt(domain, "its table sizes changed while it was being read".into()));
        }
        Ok(reg)
    }

    /// A registry over `bytes` (as if they were a registry object's contents) in private
    /// memory, for the fuzz target: validated like [`Registry::open`], with `bytes.len()` as
    /// the object's size.
    pub(crate) fn from_bytes(dir: OwnedFd, fd: OwnedFd, domain: &str, bytes: &[u8]) -> Result<Registry> {
        let mut reg = Registry::private_copy(dir, fd, domain, bytes.len().max(size_of::<RegistryShared>()))?;
        // SAFETY: the copy is at least `bytes.len()` bytes, freshly allocated, and no reference
        // into it exists yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), reg.base.as_ptr(), bytes.len()) };
        reg.validate(bytes.len() as u64)?;
        Ok(reg)
    }

    /// A handle over `len` zeroed private bytes, not yet validated.
    fn private_copy(dir: OwnedFd, fd: OwnedFd, domain: &str, len: usize) -> Result<Registry> {
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
    fn fill_from_object(&mut self, len: usize) -> Result<()> {
        debug_assert!(self.private.is_some() && len <= self.map_len);
        // SAFETY: the private copy is `map_len >= len` bytes, owned by this handle, and no
        // reference into it is alive (we hold `&mut self`).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), len) };
        os::read_at(os::borrow(&self.fd), 0, buf)
            .map_err(|e| Error::from_io(format!("cannot read the registry of domain {:?}", self.domain), e))?;
        Ok(())
    }

    /// Moves the descriptors out of a private copy about to be replaced.
    fn take_fds(self) -> Result<(OwnedFd, OwnedFd)> {
        let dir = self.dir.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))?;
        let fd = self.fd.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))?;
        Ok((dir, fd))
    }

    /// Checks the header and fills in the cached frozen fields.
    fn validate(&mut self, object_size: u64) -> Result<()> {
        let d = self.domain.clone();
        let h = self.header();
        let magic = h.magic.load(Ordering::Relaxed);
        if magic != MAGIC {
            return Err(corrupt(&d, format!("bad magic {magic:#018x}, expected {MAGIC:#018x}")));
        }
        let version = h.layout_version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(corrupt(
                &d,
                format!(
                    "layout version {version}, expected {LAYOUT_VERSION} (a different shmgadget version created it)"
                ),
            ));
        }
        let fp = h.abi_fingerprint.load(Ordering::Relaxed);
        if fp != ABI_FINGERPRINT {
            return Err(corrupt(
                &d,
                format!("ABI fingerprint {fp:#010x}, expected {ABI_FINGERPRINT:#010x} (built with a different layout)"),
            ));
        }
        // Acquire: pairs with the Release store in `create`; makes the frozen fields visible.
        if h.ready.load(Ordering::Acquire) != READY {
            // Attaching and `gc` look only under the directory lock, where this means the creator
            // died (and they make or remove it anew); an inspector may also catch a creator at work.
            return Err(corrupt(
                &d,
                "it is not finished (its creator died while creating it, or is creating it right now)".into(),
            ));
        }
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
        let found = Layout {
            sections_offset: h.sections_offset.load(Ordering::Relaxed),
            procs_offset: h.procs_offset.load(Ordering::Relaxed),
            chunks_offset: h.chunks_offset.load(Ordering::Relaxed),
            total_size: h.total_size.load(Ordering::Relaxed),
            names_offset: layout.names_offset,
            name_buckets: layout.name_buckets,
        };
        if found != layout {
            return Err(corrupt(&d, format!("table offsets {found:?} disagree with the sizes, expected {layout:?}")));
        }
        if object_size < layout.total_size {
            return Err(corrupt(
                &d,
                format!("the object is truncated to {object_size} bytes, expected {}", layout.total_size),
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
        Ok(())
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn dir(&self) -> &OwnedFd {
        &self.dir
    }

    fn header(&self) -> &RegistryShared {
        // SAFETY: the mapping is at least `size_of::<RegistryShared>()` bytes (checked in
        // `open`, made so in `create`), page-aligned, lives as long as `self`, and every field
        // is an atomic or the robust mutex, so shared access from other processes is sound.
        unsafe { &*self.base.as_ptr().cast::<RegistryShared>() }
    }

    fn entry(&self, slot: u32) -> &SectionEntryShared {
        assert!(slot < self.max_sections);
        let off = self.layout.sections_offset as usize + slot as usize * size_of::<SectionEntryShared>();
        assert!(off + size_of::<SectionEntryShared>() <= self.map_len, "entry outside the registry copy");
        // SAFETY: `validate`/`create` checked that the whole layout lies inside the mapping and
        // `slot < max_sections`; offsets are multiples of 8; all fields are atomics.
        unsafe { &*self.base.as_ptr().add(off).cast::<SectionEntryShared>() }
    }

    fn proc_entry(&self, slot: u32) -> &ProcEntryShared {
        assert!(slot < self.max_procs);
        assert!(self.proc_offset(slot) as usize + size_of::<ProcEntryShared>() <= self.map_len);
        // SAFETY: as in `entry`.
        unsafe { &*self.base.as_ptr().add(self.proc_offset(slot) as usize).cast::<ProcEntryShared>() }
    }

    fn proc_offset(&self, slot: u32) -> u64 {
        self.layout.procs_offset + slot as u64 * size_of::<ProcEntryShared>() as u64
    }

    fn chunk(&self, index: u64) -> &AtomicU32 {
        assert!(index < self.window_size / CHUNK);
        assert!((self.layout.chunks_offset + index * 4 + 4) as usize <= self.map_len, "chunk table not in this copy");
        // SAFETY: as in `entry`; the chunk table holds `window_size / CHUNK` u32s.
        unsafe { &*self.base.as_ptr().add((self.layout.chunks_offset + index * 4) as usize).cast::<AtomicU32>() }
    }

    /// Reads one section entry without the lock. `None` if the slot is not in use, the entry
    /// is invalid, or it kept changing (a writer died mid-update; the next locker repairs it).
    /// Allocation-free and async-signal-safe.
    pub fn read_entry(&self, slot: u32) -> Option<SectionRecord> {
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

    fn copy_entry(&self, slot: u32, e: &SectionEntryShared) -> Option<SectionRecord> {
        self.check_entry(slot, e).ok().flatten()
    }

    /// Copies and validates one entry: `Ok(None)` for a free slot, `Err(what failed)` for a
    /// slot in use whose fields are not a valid record. Allocation-free on success (the fault
    /// handler goes through here); a failure message allocates, which is why the signal path
    /// uses [`Registry::read_entry`] and only ever sees `None`.
    fn check_entry(&self, slot: u32, e: &SectionEntryShared) -> std::result::Result<Option<SectionRecord>, String> {
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
                names::MAX_NAME_LEN
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
    fn read_entry_checked(&self, slot: u32) -> std::result::Result<Option<SectionRecord>, String> {
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
        if locked && slots_high > self.max_sections {
            out.problems.push(format!("slots_high {slots_high} exceeds max_sections {}", self.max_sections));
        }
        if locked && procs_high > self.max_procs {
            out.problems.push(format!("procs_high {procs_high} exceeds max_procs {}", self.max_procs));
        }
        let mut found: Vec<SectionRecord> = Vec::new();
        for slot in 0..self.max_sections {
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
        for slot in procs_high.min(self.max_procs)..self.max_procs {
            if (self.proc_offset(slot) as usize) + size_of::<ProcEntryShared>() > self.map_len {
                break;
            }
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
        let table_here = (self.layout.chunks_offset + (self.window_size / CHUNK) * 4) as usize <= self.map_len;
        if table_here {
            // Per slot: the range a valid entry covers, or anything for a damaged one (whose
            // range is unknown and already reported).
            let mut by_slot: Vec<Option<(u64, u64)>> = vec![None; self.max_sections as usize];
            for r in &out.entries {
                by_slot[r.slot as usize] = Some((r.offset, r.offset + r.span()));
            }
            for d in &out.damaged {
                by_slot[d.slot as usize] = Some((0, u64::MAX));
            }
            for c in 0..self.window_size / CHUNK {
                // Relaxed: under the lock (the caller's promise with `locked`).
                let v = self.chunk(c).load(Ordering::Relaxed);
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
                // Relaxed: as above.
                if self.chunk(r.offset / CHUNK).load(Ordering::Relaxed) != r.slot + 1 {
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
        // Relaxed: the entry read below is validated by its own seqlock, and the range check
        // rejects a stale table value.
        let v = self.chunk(offset / CHUNK).load(Ordering::Relaxed);
        if v == 0 || v > self.max_sections {
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
            // Relaxed: a chunk handed out after this read is mapped by its new owner's own
            // open, which takes the same per-process `map_lock` the caller holds.
            if self.chunk(c).load(Ordering::Relaxed) != 0 {
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
        // Every slot, not only those below `slots_high`: a damaged high-water mark must not
        // hide sections (a free slot costs one load).
        (0..self.max_sections)
            // Relaxed: a pre-check; the entry is read through its seqlock.
            .filter(|&s| self.entry(s).state.load(Ordering::Relaxed) != FREE)
            .filter_map(|s| self.read_entry(s))
            .collect()
    }

    /// Whether the token byte of process slot `slot` is locked by anyone (this process's own
    /// token descriptors included: `fd` never holds a lock). An error counts as locked, so a
    /// failing query never declares a live process dead.
    fn proc_locked(&self, slot: u32) -> bool {
        os::byte_is_locked(os::borrow(&self.fd), self.proc_offset(slot)).unwrap_or(true)
    }

    /// Every process entry in use, with its liveness (from the kernel's lock table).
    pub fn procs(&self) -> Vec<ProcRecord> {
        // Relaxed: an upper bound only.
        let high = self.header().procs_high.load(Ordering::Relaxed).min(self.max_procs);
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
        if slot >= self.max_procs || !self.proc_locked(slot) {
            return false;
        }
        let p = self.proc_entry(slot);
        // Acquire, and only after the lock query: a new registration of the slot bumps
        // `incarnation` before it takes the lock, so a lock seen held by a newer registration
        // comes with its newer incarnation (the kernel's lock table orders the two).
        p.state.load(Ordering::Acquire) != 0 && p.incarnation.load(Ordering::Acquire) == incarnation
    }

    /// The pid recorded for the registration `token` names (for display), if it is in place.
    pub fn proc_pid(&self, token: u64) -> Option<u32> {
        let (slot, incarnation) = ProcToken(token).parts()?;
        if slot >= self.max_procs {
            return None;
        }
        let p = self.proc_entry(slot);
        // Relaxed: display only.
        (p.incarnation.load(Ordering::Relaxed) == incarnation).then(|| p.pid.load(Ordering::Relaxed))
    }

    /// The pid word of process slot `slot` (a forked child writes its pid there).
    pub(crate) fn proc_pid_word(&self, token: u64) -> Option<&AtomicU32> {
        let (slot, _) = ProcToken(token).parts()?;
        (slot < self.max_procs).then(|| &self.proc_entry(slot).pid)
    }

    /// Takes the registry lock, repairing the registry first if the previous holder died.
    pub fn lock(&self) -> Result<RegistryGuard<'_>> {
        self.lock_inner(None)
    }

    /// [`Registry::lock`], waiting at most `timeout`: a `Timeout` error names the wait (a lock
    /// word damaged into a stranger's, or a holder that hangs, must not hang the repair tools).
    pub fn lock_within(&self, timeout: std::time::Duration) -> Result<RegistryGuard<'_>> {
        self.lock_inner(Some(timeout))
    }

    fn lock_inner(&self, timeout: Option<std::time::Duration>) -> Result<RegistryGuard<'_>> {
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

    fn unusable(&self, e: std::io::Error) -> Error {
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
    fn lock_holder(&self, word: u32) -> (Option<String>, String) {
        // Relaxed: a snapshot, for diagnosis.
        let token = self.header().lock_owner.load(Ordering::Relaxed);
        let pid = self.proc_pid(token).unwrap_or(0);
        let who = crate::sync::describe_holder(word, token, pid);
        let alive = (token != 0).then(|| self.proc_alive(token));
        (crate::sync::holder_gone(word, alive, &who), who)
    }

    #[cold]
    fn lock_slow(&self, token: u64, patience: std::time::Duration) -> Result<LockOutcome> {
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

/// Proof that this thread holds the registry lock; all mutations go through it.
pub(crate) struct RegistryGuard<'a> {
    reg: &'a Registry,
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
    fn write_entry(&self, slot: u32, write: impl FnOnce(&SectionEntryShared)) {
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

    fn bucket(&self, i: u64) -> &AtomicU32 {
        let reg = self.reg;
        assert!(i < reg.layout.name_buckets);
        assert!((reg.layout.names_offset + i * 4 + 4) as usize <= reg.map_len);
        // SAFETY: the name index holds `name_buckets` u32s inside the validated mapping.
        unsafe { &*reg.base.as_ptr().add((reg.layout.names_offset + i * 4) as usize).cast::<AtomicU32>() }
    }

    /// The buckets to probe for `name`. The name index is open addressing (linear probing)
    /// over `name_buckets` u32 buckets, each 0 (empty), `TOMBSTONE` (deleted) or slot + 1. It
    /// is only touched under the lock and derived from the entries, so a torn update is
    /// repaired by `rebuild_index`.
    fn probe(&self, name: &str) -> impl Iterator<Item = u64> + 'static {
        let mask = self.reg.layout.name_buckets - 1;
        let start = name_hash(name) & mask;
        (0..=mask).map(move |i| (start + i) & mask)
    }

    fn index_insert(&self, name: &str, slot: u32) {
        for b in self.probe(name) {
            // Relaxed: the index is only accessed under the lock.
            let v = self.bucket(b).load(Ordering::Relaxed);
            if v == 0 || v == TOMBSTONE {
                if v == TOMBSTONE {
                    self.reg.header().name_tombs.fetch_sub(1, Ordering::Relaxed);
                }
                self.bucket(b).store(slot + 1, Ordering::Relaxed);
                return;
            }
        }
    }

    fn index_remove(&self, name: &str, slot: u32) {
        for b in self.probe(name) {
            // Relaxed: under the lock.
            let v = self.bucket(b).load(Ordering::Relaxed);
            if v == 0 {
                return;
            }
            if v == slot + 1 {
                self.bucket(b).store(TOMBSTONE, Ordering::Relaxed);
                let tombs = self.reg.header().name_tombs.fetch_add(1, Ordering::Relaxed) + 1;
                if tombs as u64 > self.reg.layout.name_buckets / 4 {
                    self.rebuild_index();
                }
                return;
            }
        }
    }

    /// Rebuilds the name index from the entries (after a crash, or when tombstones pile up).
    fn rebuild_index(&self) {
        for b in 0..self.reg.layout.name_buckets {
            // Relaxed: under the lock.
            self.bucket(b).store(0, Ordering::Relaxed);
        }
        self.reg.header().name_tombs.store(0, Ordering::Relaxed);
        for slot in 0..self.reg.max_sections {
            if let Some(rec) = self.locked_entry(slot) {
                if rec.state == CREATING || rec.state == LIVE {
                    self.index_insert(rec.name.as_str(), slot);
                }
            }
        }
    }

    /// The entry of slot `slot` as seen under the lock (no retry needed).
    fn locked_entry(&self, slot: u32) -> Option<SectionRecord> {
        self.reg.copy_entry(slot, self.reg.entry(slot))
    }

    fn slots_high(&self) -> u32 {
        // Relaxed: written only under the lock, which we hold.
        self.reg.header().slots_high.load(Ordering::Relaxed).min(self.reg.max_sections)
    }

    /// The live section called `name`, through the name index.
    pub fn find_live(&self, name: &str) -> Option<SectionRecord> {
        for b in self.probe(name) {
            // Relaxed: under the lock.
            let v = self.bucket(b).load(Ordering::Relaxed);
            if v == 0 {
                return None;
            }
            if v == TOMBSTONE || v > self.reg.max_sections {
                continue;
            }
            if let Some(rec) = self.locked_entry(v - 1) {
                if rec.name.as_str() == name {
                    return (rec.state == LIVE).then_some(rec);
                }
            }
        }
        None
    }

    /// Every valid entry in use, over all slots (a damaged `slots_high` hides nothing).
    pub fn all_entries(&self) -> Vec<SectionRecord> {
        (0..self.reg.max_sections).filter_map(|s| self.locked_entry(s)).collect()
    }

    /// Whether any slot is in use, valid or not: a registry with damaged entries is never
    /// "empty" (removing it would orphan their objects).
    pub fn any_slot_used(&self) -> bool {
        // Relaxed: under the lock.
        (0..self.reg.max_sections).any(|s| self.reg.entry(s).state.load(Ordering::Relaxed) != FREE)
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
        let reg = self.reg;
        // Never-used slots first (O(1) while the table grows), then any freed one.
        let high = self.slots_high();
        let Some(slot) = (high..reg.max_sections).take(1).chain(0..high).find(|&s| {
            // Relaxed: under the lock.
            reg.entry(s).state.load(Ordering::Relaxed) == FREE
        }) else {
            bail!(
                RegistryFull,
                "domain {:?} already has {} sections, its registry's limit; delete unused ones with `shmgadget rm`, or create the domain with a larger max_sections",
                reg.domain,
                reg.max_sections
            );
        };
        let span = reserved.div_ceil(CHUNK) * CHUNK;
        let offset = self.place(span)?;
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
    fn place(&self, span: u64) -> Result<u64> {
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
            && (cursor / CHUNK..(cursor + span) / CHUNK).all(|c| reg.chunk(c).load(Ordering::Relaxed) == 0)
        {
            return Ok(cursor);
        }
        let mut used: Vec<(u64, u64)> = self.all_entries().iter().map(|r| (r.offset, r.offset + r.span())).collect();
        used.sort_unstable();
        let fits_at = |start: u64, limit: u64| -> Option<u64> {
            let mut at = start;
            for &(lo, hi) in &used {
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
        if let Some(at) = fits_at(cursor, reg.window_size).or_else(|| fits_at(0, reg.window_size)) {
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
        let unlinked = match os::unlink_object(os::borrow(&self.reg.dir), &object) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(2) => Ok(()),
            Err(e) => {
                Err(Error::from_io(format!("cannot remove section {:?}'s object {object:?}", rec.name.as_str()), e))
            }
        };
        for c in rec.offset / CHUNK..(rec.offset + rec.span()) / CHUNK {
            // Relaxed: the entry is no longer LIVE, which readers check after the table.
            if self.reg.chunk(c).load(Ordering::Relaxed) == rec.slot + 1 {
                self.reg.chunk(c).store(0, Ordering::Relaxed);
            }
        }
        self.write_entry(rec.slot, |e| e.state.store(FREE, Ordering::Relaxed));
        unlinked
    }

    /// Repairs what a writer that died holding the lock left behind.
    fn repair(&self) {
        let reg = self.reg;
        for slot in 0..reg.max_sections {
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
    /// every descriptor of that description releases it). `pid` is recorded for display.
    pub fn register_proc(&self, pid: u32) -> Result<(ProcToken, OwnedFd)> {
        let reg = self.reg;
        let h = reg.header();
        let object = names::registry_object(&reg.domain);
        let fd = os::open_object(os::borrow(&reg.dir), &object, true).map_err(|e| {
            Error::from_io(format!("cannot open the registry of domain {:?} for a liveness token", reg.domain), e)
        })?;
        // The name could now belong to a re-created registry: lock bytes of ours only.
        let same = match (os::stat_object(os::borrow(&fd)), os::stat_object(os::borrow(&reg.fd))) {
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
            let p = reg.proc_entry(slot);
            // Locked: a live process holds it, or (state 0) its previous owner has not closed
            // its token descriptor yet.
            if reg.proc_locked(slot) {
                continue;
            }
            // The new incarnation before the lock (see `Registry::proc_alive`). Relaxed: the
            // byte lock below publishes it (the kernel orders lock-table operations).
            let incarnation = match p.incarnation.load(Ordering::Relaxed).wrapping_add(1) {
                0 => 1,
                n => n,
            };
            p.incarnation.store(incarnation, Ordering::Release);
            p.state.store(1, Ordering::Release);
            match os::try_lock_byte(os::borrow(&fd), reg.proc_offset(slot)) {
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
        if slot >= self.reg.max_procs {
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
    use super::*;

    #[test]
    fn layout_is_page_rounded_and_ordered() {
        let l = Layout::compute(4096, 1024, DEFAULT_WINDOW_SIZE).unwrap();
        assert_eq!(l.sections_offset, 256);
        assert!(l.procs_offset > l.sections_offset && l.chunks_offset > l.procs_offset);
        assert_eq!(l.total_size % os::page_size() as u64, 0);
        assert!(l.total_size >= l.chunks_offset + (DEFAULT_WINDOW_SIZE / CHUNK) * 4);
    }

    #[test]
    fn fingerprint_is_stable_within_a_build() {
        assert_ne!(ABI_FINGERPRINT, 0);
    }
}
