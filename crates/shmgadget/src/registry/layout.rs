//! The registry's shared layout: every structure that lives in the registry object, its
//! constants, the fingerprint that makes builds that disagree refuse each other, where the
//! tables sit ([`Layout`]), and the inline format of a section name.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::names;
use crate::os;
use crate::sync::RobustLock;

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

pub(super) const MAGIC: u64 = u64::from_le_bytes(*b"SHMGREG\x01");
/// 2: process entries carry an `incarnation`, and tokens are `(slot, incarnation)`.
/// 3: section entries carry their creator's token and a ready word (all-or-nothing creation).
/// 5: the tables live in segments backed one by one as the domain grows (`segments_backed`).
/// 6: the lock is shmgadget's own robust lock (`sync::robust`), not a glibc mutex.
/// 8: process entries carry their pid namespace (`pid_ns`).
pub(super) const LAYOUT_VERSION: u32 = 8;
pub(super) const READY: u32 = 0x5244_5921; // "RDY!"

/// Entry states (see the table in the module docs).
pub(crate) const FREE: u32 = 0;
pub(crate) const CREATING: u32 = 1;
pub(crate) const LIVE: u32 = 2;
pub(crate) const DELETING: u32 = 3;

/// Value of a section entry's `ready` word once its contents are initialised.
pub(super) const READY_SECTION: u32 = 0x5345_4321; // "SEC!"

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
    pub(super) fn to_raw(self) -> u32 {
        match self {
            SectionKind::Raw => 1,
            SectionKind::Heap => 2,
            SectionKind::Queue => 3,
        }
    }
    pub(super) fn from_raw(v: u32) -> Option<Self> {
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
    pub(super) fn to_raw(self) -> u32 {
        match self {
            Lifetime::Persistent => 1,
            Lifetime::Transient => 2,
        }
    }
    pub(super) fn from_raw(v: u32) -> Option<Self> {
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
    pub(super) magic: AtomicU64,
    pub(super) layout_version: AtomicU32,
    pub(super) abi_fingerprint: AtomicU32,
    pub(super) ready: AtomicU32,
    pub(super) max_sections: AtomicU32,
    pub(super) max_procs: AtomicU32,
    pub(super) mode: AtomicU32,
    pub(super) total_size: AtomicU64,
    pub(super) window_base: AtomicU64,
    pub(super) window_size: AtomicU64,
    /// Offset of segment 0 (see [`Layout`]).
    pub(super) sections_offset: AtomicU64,
    /// Offset of the process entries inside a segment.
    pub(super) procs_offset: AtomicU32,
    /// Offset of the chunk table's slice inside a segment.
    pub(super) chunks_offset: AtomicU32,
    /// Bytes per segment (a page multiple).
    pub(super) segment_size: AtomicU32,
    /// How many segments, from 0, the object backs: the only header field that grows. Raised
    /// under `lock` after the object was extended and committed (see "Growth").
    pub(super) segments_backed: AtomicU32,
    pub(super) next_generation: AtomicU64,
    pub(super) place_cursor: AtomicU64,
    pub(super) name_tombs: AtomicU32,
    pub(super) domain_len: AtomicU32,
    pub(super) created_at: AtomicU64,
    pub(super) slots_high: AtomicU32,
    pub(super) procs_high: AtomicU32,
    /// The registry lock's holder's token (its registration in this domain), written right
    /// after a successful lock and cleared before unlock; 0 when free or when the holder is
    /// not attached (a tool such as `gc`, or a process registering). See "Bounded waits".
    pub(super) lock_owner: AtomicU64,
    pub(super) domain: [AtomicU64; 8],
    pub(super) lock: RobustLock,
    /// Domain-wide marks ([`FLAG_KEPT`]); changed under `lock`.
    pub(super) flags: AtomicU32,
    _pad_flags: AtomicU32,
}

/// [`RegistryShared::flags`]: the domain was made to last (`shmgadget domain create`,
/// [`crate::admin`]) and is not removed when it becomes empty (by the last detach or by `gc`),
/// only by `domain rm`. A header field, so the mark means the same on every platform.
pub(crate) const FLAG_KEPT: u32 = 1;

/// One section slot.
#[repr(C)]
pub(crate) struct SectionEntryShared {
    pub(super) seq: AtomicU64,
    pub(super) state: AtomicU32,
    pub(super) kind: AtomicU32,
    pub(super) lifetime: AtomicU32,
    pub(super) mode: AtomicU32,
    pub(super) owner_uid: AtomicU32,
    pub(super) name_len: AtomicU32,
    pub(super) generation: AtomicU64,
    pub(super) offset: AtomicU64,
    pub(super) reserved: AtomicU64,
    pub(super) committed: AtomicU64,
    pub(super) created_at: AtomicU64,
    pub(super) creator_pid: AtomicU32,
    _pad0: AtomicU32,
    pub(super) name: [AtomicU64; 8],
    /// The creator's peer token (`Domain::peer_token`): decides whether a section that never
    /// became ready still has a creator that may finish it.
    pub(super) creator_token: AtomicU64,
    /// `READY_SECTION` once the section's contents are initialised (see "Readiness").
    pub(super) ready: AtomicU32,
    _pad1: AtomicU32,
}

/// One attached-process slot. Its byte offset in the registry object is also the byte the
/// process locks as its liveness token.
#[repr(C)]
pub(crate) struct ProcEntryShared {
    pub(super) state: AtomicU32,
    pub(super) pid: AtomicU32,
    pub(super) uid: AtomicU32,
    /// Bumped (never to 0) at each registration of this slot.
    pub(super) incarnation: AtomicU32,
    pub(super) attached_at: AtomicU64,
    /// The process's pid namespace (`sync::robust::my_namespace`; 0: unknown), written before
    /// its liveness token is taken (see `Registry::threads_visible`).
    pub(super) pid_ns: AtomicU64,
    pub(super) _reserved: [AtomicU64; 4],
}

const _: () = {
    assert!(size_of::<RegistryShared>() == 272);
    assert!(offset_of!(RegistryShared, flags) == 256);
    assert!(offset_of!(RegistryShared, domain) == 128);
    assert!(offset_of!(RegistryShared, lock) == 192);
    assert!(offset_of!(RegistryShared, lock_owner) == 120);
    assert!(size_of::<SectionEntryShared>() == 160);
    assert!(offset_of!(SectionEntryShared, name) == 80);
    assert!(offset_of!(SectionEntryShared, creator_token) == 144);
    assert!(offset_of!(SectionEntryShared, ready) == 152);
    assert!(size_of::<ProcEntryShared>() == 64);
    assert!(offset_of!(ProcEntryShared, incarnation) == 12);
    assert!(offset_of!(ProcEntryShared, pid_ns) == 24);
};

crate::header::assert_prefix!(RegistryShared, magic, layout_version, abi_fingerprint, ready);

// SAFETY: repr(C), atomics and the process-shared robust lock (operated in place, valid for
// any bytes until checked), its prefix asserted above; `min_size` is its size.
unsafe impl crate::header::SharedHeader for RegistryShared {
    const EXPECTED: crate::header::Expected = crate::header::Expected {
        what: "registry",
        magic: MAGIC,
        layout_version: LAYOUT_VERSION,
        fingerprint: ABI_FINGERPRINT,
        ready: READY,
        min_size: size_of::<RegistryShared>() as u64,
    };
}

const _: () = {
    assert!(offset_of!(RegistryShared, segments_backed) == 76);
    assert!(offset_of!(RegistryShared, next_generation) == 80);
};

/// A segment holds at most this many chunk-table entries (128 KiB of table, 64 GiB of window)...
pub(super) const SEGMENT_CHUNKS: u64 = 32 * 1024;
/// ... this many section entries ...
pub(super) const SEGMENT_SECTIONS: u32 = 256;
/// ... and this many process entries.
pub(super) const SEGMENT_PROCS: u32 = 64;

/// A hash of everything that decides the shared layout, so two builds that disagree on it
/// refuse each other's registries instead of misreading them.
pub(super) const ABI_FINGERPRINT: u32 = {
    let parts: [u64; 20] = [
        LAYOUT_VERSION as u64,
        offset_of!(RegistryShared, flags) as u64,
        offset_of!(RegistryShared, segments_backed) as u64,
        SEGMENT_CHUNKS,
        SEGMENT_SECTIONS as u64,
        SEGMENT_PROCS as u64,
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
        offset_of!(ProcEntryShared, pid_ns) as u64,
        size_of::<RobustLock>() as u64,
        CHUNK,
        2, // name index: 2 buckets per section slot, linear probing, FNV-1a
    ];
    crate::fnv::layout_fingerprint(&parts)
};

/// Where the tables sit, derived from the three sizing parameters (see "Layout" in the module
/// docs): the header, the name index (sized for `max_sections`), then `segments` segments of
/// `segment_size` bytes, each holding the next `sections_per_segment` section entries, the next
/// `procs_per_segment` process entries and the next `chunks_per_segment` chunk-table entries.
/// Only a prefix of the segments is backed by the object at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Offset of segment 0.
    pub sections_offset: u64,
    /// Offset of the process entries inside a segment.
    pub procs_offset: u64,
    /// Offset of the chunk-table slice inside a segment.
    pub chunks_offset: u64,
    /// Length of the object with every segment backed (the registry's largest size).
    pub total_size: u64,
    /// Derived, not stored: follows the header.
    pub names_offset: u64,
    /// Buckets of the name index (a power of two, at least twice `max_sections`).
    pub name_buckets: u64,
    /// Bytes per segment, a page multiple.
    pub segment_size: u64,
    pub segments: u32,
    pub sections_per_segment: u32,
    pub procs_per_segment: u32,
    pub chunks_per_segment: u64,
    /// Copied from the parameters, for the bounds below.
    pub max_sections: u32,
    pub max_procs: u32,
    pub window_chunks: u64,
}

impl Layout {
    pub fn compute(max_sections: u32, max_procs: u32, window_size: u64) -> Option<Layout> {
        let page = os::page_size() as u64;
        let chunks = window_size / CHUNK;
        if max_sections == 0 || max_procs == 0 || chunks == 0 {
            return None;
        }
        let segments = chunks
            .div_ceil(SEGMENT_CHUNKS)
            .max(max_sections.div_ceil(SEGMENT_SECTIONS) as u64)
            .max(max_procs.div_ceil(SEGMENT_PROCS) as u64);
        let segments = u32::try_from(segments).ok()?;
        let sections_per_segment = max_sections.div_ceil(segments);
        let procs_per_segment = max_procs.div_ceil(segments);
        let chunks_per_segment = chunks.div_ceil(segments as u64);
        let procs_offset = sections_per_segment as u64 * size_of::<SectionEntryShared>() as u64;
        let chunks_offset = procs_offset + procs_per_segment as u64 * size_of::<ProcEntryShared>() as u64;
        let segment_size = (chunks_offset + chunks_per_segment * 4).div_ceil(page) * page;
        let names_offset = size_of::<RegistryShared>() as u64;
        let name_buckets = (2 * max_sections as u64).next_power_of_two();
        let sections_offset = (names_offset + name_buckets * 4).div_ceil(page) * page;
        let total_size = sections_offset.checked_add(segment_size.checked_mul(segments as u64)?)?;
        // Stored in u32 header fields.
        if segment_size > u32::MAX as u64 {
            return None;
        }
        Some(Layout {
            sections_offset,
            procs_offset,
            chunks_offset,
            total_size,
            names_offset,
            name_buckets,
            segment_size,
            segments,
            sections_per_segment,
            procs_per_segment,
            chunks_per_segment,
            max_sections,
            max_procs,
            window_chunks: chunks,
        })
    }

    /// Length of the object when its first `segments` segments are backed.
    pub fn backed_len(&self, segments: u32) -> u64 {
        self.sections_offset + segments.min(self.segments) as u64 * self.segment_size
    }

    /// How many whole segments `len` bytes of object hold.
    pub fn segments_within(&self, len: u64) -> u32 {
        (len.saturating_sub(self.sections_offset) / self.segment_size.max(1)).min(self.segments as u64) as u32
    }

    /// Section slots, process slots and chunks that `segments` backed segments hold.
    pub fn slots_in(&self, segments: u32) -> u32 {
        (segments as u64 * self.sections_per_segment as u64).min(self.max_sections as u64) as u32
    }
    pub fn procs_in(&self, segments: u32) -> u32 {
        (segments as u64 * self.procs_per_segment as u64).min(self.max_procs as u64) as u32
    }
    pub fn chunks_in(&self, segments: u32) -> u64 {
        (segments as u64 * self.chunks_per_segment).min(self.window_chunks)
    }

    /// The segments that must be backed for section slot `slot` / process slot `slot` /
    /// chunk `chunk` to exist.
    pub fn segments_for_slot(&self, slot: u32) -> u32 {
        slot / self.sections_per_segment + 1
    }
    pub fn segments_for_proc(&self, slot: u32) -> u32 {
        slot / self.procs_per_segment + 1
    }
    pub fn segments_for_chunk(&self, chunk: u64) -> u32 {
        (chunk / self.chunks_per_segment) as u32 + 1
    }

    /// Byte offsets of section entry `slot`, process entry `slot` and chunk-table entry `chunk`.
    pub fn section_at(&self, slot: u32) -> u64 {
        let (seg, i) = (slot / self.sections_per_segment, slot % self.sections_per_segment);
        self.sections_offset + seg as u64 * self.segment_size + i as u64 * size_of::<SectionEntryShared>() as u64
    }
    pub fn proc_at(&self, slot: u32) -> u64 {
        let (seg, i) = (slot / self.procs_per_segment, slot % self.procs_per_segment);
        self.sections_offset
            + seg as u64 * self.segment_size
            + self.procs_offset
            + i as u64 * size_of::<ProcEntryShared>() as u64
    }
    pub fn chunk_at(&self, chunk: u64) -> u64 {
        let (seg, i) = (chunk / self.chunks_per_segment, chunk % self.chunks_per_segment);
        self.sections_offset + seg * self.segment_size + self.chunks_offset + i * 4
    }
}

// ---------------------------------------------------------------------------------------------
// Process-local copies
// ---------------------------------------------------------------------------------------------

/// A section name stored inline, so records can be copied without allocating (the fault
/// handler copies them inside a signal handler).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InlineName {
    pub(super) len: u8,
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

pub(super) fn pack_name(dst: &names::PackedName, name: &str) {
    // Published by the enclosing seqlock write or the `ready` Release store.
    names::pack(dst, name);
}

pub(super) fn unpack_name(src: &names::PackedName, len: u32) -> Option<InlineName> {
    if len == 0 || len as usize > names::MAX_NAME_LEN {
        return None;
    }
    // The caller validates consistency (seqlock or `ready`).
    let name = InlineName { len: len as u8, bytes: names::unpack(src) };
    let valid = name.bytes[..len as usize].iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    valid.then_some(name)
}

/// A name field as stored, made printable (for reports of damaged entries).
pub(super) fn raw_name(src: &names::PackedName, len: u32) -> String {
    // A diagnostic copy.
    let bytes = names::unpack(src);
    let n = (len as usize).min(64);
    bytes[..n].iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}
