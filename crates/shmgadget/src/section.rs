//! Sections: named shared-memory objects mapped at the same address in every process.
//!
//! A section's object is sized to its full reserved size with `ftruncate` and stays sparse:
//! pages cost memory only once touched or committed. [`Section::commit`] guarantees backing
//! with `fallocate`, so a full tmpfs is a clean [`ErrorKind::OutOfSpace`] instead of a later
//! `SIGBUS`; [`Section::decommit`] punches the pages out for every process.
//!
//! # No descriptor per section
//! A [`Section`] keeps no file descriptor: the object's descriptor is closed as soon as it is
//! mapped (the mapping keeps the object alive), so a process can hold thousands of sections at
//! a small `ulimit -n`. The calls that need the object again (`commit`, `decommit`, `info`)
//! reopen it by name through the registry's directory descriptor (`O_NOFOLLOW`), check that it
//! is still the object this process mapped (same device and inode, same size), make their
//! call and close it: an open and a close more per call, in exchange for no descriptor at rest.
//! A section deleted meanwhile cannot be committed any more (`NotFound`); one whose object was
//! replaced behind the registry's back is refused (`Corrupt`).

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result, bail};
use crate::names;
use crate::os;
use crate::registry::{self, Lifetime, Registry, SectionKind, SectionRecord};
use crate::shm_safe::ShmSafe;

/// How to create a section.
#[derive(Debug, Clone)]
pub struct SectionOptions {
    /// What the section holds. Default [`SectionKind::Raw`].
    pub kind: SectionKind,
    /// Persistent (default) or transient.
    pub lifetime: Lifetime,
    /// Permission bits of the backing object. Default `0o600`.
    pub mode: u32,
}

impl Default for SectionOptions {
    fn default() -> Self {
        SectionOptions { kind: SectionKind::Raw, lifetime: Lifetime::Persistent, mode: 0o600 }
    }
}

impl SectionOptions {
    /// Default options: raw, persistent, mode `0o600`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Deleted automatically when no process is attached to the domain any more.
    pub fn transient(mut self) -> Self {
        self.lifetime = Lifetime::Transient;
        self
    }
    /// Sets the permission bits (for example `0o660` to share with the group).
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the kind.
    pub fn kind(mut self, kind: SectionKind) -> Self {
        self.kind = kind;
        self
    }
}

/// A section mapped into this process. Its memory is at [`Section::as_ptr`] in every process
/// of the domain. Dropping the handle does not unmap the section (other handles and plain
/// pointers may still use it); it stays mapped until the domain is detached.
pub struct Section {
    domain: Domain,
    rec: SectionRecord,
    /// The object this process mapped: a reopen by name must find this one.
    object: os::ObjectId,
    addr: NonNull<u8>,
}

// SAFETY: the handle only holds an address into a shared mapping that lives as long as the
// attachment it keeps alive, plus plain values; nothing has thread affinity.
unsafe impl Send for Section {}
// SAFETY: as above; all methods take `&self` and make system calls or read immutable fields.
unsafe impl Sync for Section {}

impl Section {
    /// Maps a section this process just created (and closes `fd`).
    pub(crate) fn map_new(domain: Domain, rec: SectionRecord, fd: OwnedFd) -> Result<Section> {
        let id = os::stat_object(os::borrow(&fd))
            .map(|st| st.identity)
            .map_err(|e| Error::from_io(format!("cannot stat section {:?}'s new object", rec.name.as_str()), e))?;
        Section::map(domain, rec, fd, id)
    }

    /// Opens and maps an existing section from its registry record.
    pub(crate) fn open_record(domain: Domain, rec: SectionRecord) -> Result<Section> {
        let object = names::section_object(&domain.inner.name, rec.generation, rec.name.as_str());
        let name = rec.name.as_str();
        let fd = os::open_object(os::borrow(domain.inner.registry.dir()), &object, true).map_err(|e| {
            if e.raw_os_error() == Some(2) {
                Error::new(ErrorKind::NotFound, format!("section {name:?} was deleted (its object {object:?} is gone)"))
            } else {
                Error::from_io(format!("cannot open section {name:?}"), e)
            }
        })?;
        let st = os::stat_object(os::borrow(&fd)).map_err(|e| Error::from_io("cannot stat a section", e))?;
        let id = st.identity;
        if st.uid != os::effective_uid() && !domain.inner.allow_foreign_owner {
            bail!(
                PermissionDenied,
                "section {name:?} belongs to uid {} but this process runs as uid {}; refusing to map it \
                 (attach with allow_foreign_owner if that user is trusted)",
                st.uid,
                os::effective_uid()
            );
        }
        if !st.is_regular || st.size != rec.reserved {
            bail!(
                Corrupt,
                "section {name:?}'s object {object:?} is {} bytes but the registry records {}; \
                 mapping it could fault, so it is refused (remove it with `shmgadget rm`)",
                st.size,
                rec.reserved
            );
        }
        Section::map(domain, rec, fd, id)
    }

    /// Maps the object behind `fd` at the section's place (unless this process has it mapped
    /// already) and closes `fd`: the mapping keeps the object alive, the handle keeps `id`.
    fn map(domain: Domain, rec: SectionRecord, fd: OwnedFd, id: os::ObjectId) -> Result<Section> {
        let addr = domain.inner.window_base + rec.offset;
        let _guard = domain.inner.map_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !domain.inner.is_mapped(&rec) {
            // SAFETY: `[addr, addr + reserved)` lies inside this process's reservation of the
            // window (the record was validated against the window size) and belongs to this
            // section alone, so MAP_FIXED replaces only our own reservation or an older mapping
            // of this same slot, which no Rust reference can point into (section memory is
            // reached through raw pointers only).
            unsafe { os::map_shared_fixed(os::borrow(&fd), addr as usize, rec.reserved as usize, true) }
                .map_err(|e| Error::from_io(format!("cannot map section {:?}", rec.name.as_str()), e))?;
            domain.inner.note_mapped(&rec);
        }
        // Release: pairs with the Acquire loads in `delete_section`/`unmap_deleted`.
        domain.inner.handles[rec.slot as usize].fetch_add(1, Ordering::Release);
        drop(_guard);
        drop(fd);
        let addr = NonNull::new(addr as *mut u8).expect("window base is never null");
        Ok(Section { domain, rec, object: id, addr })
    }

    /// Reopens the section's object by name for a call that needs a descriptor (`what` says
    /// which, for errors), and checks that it is still the object this process mapped. Returns
    /// the descriptor, which the caller closes when done (drop), and what `fstat` said.
    fn reopen(&self, writable: bool, what: &str) -> Result<(OwnedFd, os::ObjectStat)> {
        let name = self.name();
        let object = names::section_object(&self.domain.inner.name, self.rec.generation, name);
        let fd = os::open_object(os::borrow(self.domain.inner.registry.dir()), &object, writable).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    format!("cannot {what} section {name:?}: it was deleted (its object {object:?} is gone)"),
                )
            } else {
                Error::from_io(format!("cannot {what} section {name:?}: cannot reopen its object {object:?}"), e)
            }
        })?;
        let st = os::stat_object(os::borrow(&fd))
            .map_err(|e| Error::from_io(format!("cannot {what} section {name:?}: cannot stat its object"), e))?;
        if st.identity != self.object || !st.is_regular || st.size != self.rec.reserved {
            bail!(
                Corrupt,
                "cannot {what} section {name:?}: its object {object:?} is no longer the one this process mapped \
                 ({}); refusing to touch it (remove the section with `shmgadget rm` and create it again)",
                if st.identity != self.object {
                    "it was replaced by another file of the same name".to_owned()
                } else {
                    format!("it is now {} bytes, the section has {}", st.size, self.rec.reserved)
                }
            );
        }
        Ok((fd, st))
    }

    /// The section's name.
    pub fn name(&self) -> &str {
        self.rec.name.as_str()
    }

    /// The domain it belongs to.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// What it holds.
    pub fn kind(&self) -> SectionKind {
        self.rec.kind
    }

    /// Persistent or transient.
    pub fn lifetime(&self) -> Lifetime {
        self.rec.lifetime
    }

    /// Start of the section's memory: the same address in every process of the domain.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Reserved size in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.rec.reserved as usize
    }

    /// Never true: sections have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A shared object of type `T` at `offset` in this section, for example a
    /// [`Semaphore`](crate::sync::Semaphore) or a [`Mutex`](crate::sync::Mutex). Fails if the
    /// offset is misaligned for `T` or the object would not fit. The object still has to be
    /// initialised (each type's `init`, safe to race) before use.
    pub fn at<T: InPlace>(&self, offset: usize) -> Result<&T> {
        let size = size_of::<T>();
        let align = align_of::<T>();
        if offset % align != 0 || offset.checked_add(size).is_none_or(|end| end > self.len()) {
            bail!(
                InvalidArgument,
                "cannot place a {} ({size} bytes, alignment {align}) at offset {offset} of section {:?} ({} bytes)",
                std::any::type_name::<T>(),
                self.name(),
                self.len()
            );
        }
        // SAFETY: the range is inside this mapped section, aligned for T, and lives as long as
        // `&self` (the handle keeps the mapping); `T: InPlace` guarantees any bytes there are a
        // valid `T` and that shared access goes through atomics or a lock.
        Ok(unsafe { &*self.as_ptr().add(offset).cast::<T>() })
    }

    /// Guarantees memory for the first `len` bytes (`fallocate`). Fails with
    /// [`ErrorKind::OutOfSpace`] when the backing store is full; the process keeps running and
    /// nothing already committed is lost.
    pub fn commit(&self, len: u64) -> Result<()> {
        if len > self.rec.reserved {
            bail!(
                InvalidSize,
                "cannot commit {len} bytes of section {:?}: only {} are reserved",
                self.name(),
                self.rec.reserved
            );
        }
        let page = os::page_size() as u64;
        let len = len.next_multiple_of(page);
        if len == 0 {
            return Ok(());
        }
        let (fd, _) = self.reopen(true, "commit")?;
        os::allocate(os::borrow(&fd), 0, len)
            .map_err(|e| Error::from_io(format!("cannot commit {len} bytes of section {:?}", self.name()), e))?;
        drop(fd);
        registry::note_committed(&self.domain.inner.registry, self.rec.slot, self.rec.generation, len, true);
        Ok(())
    }

    /// Gives the pages of `[offset, offset + len)` back, for every process (`fallocate` with
    /// `PUNCH_HOLE`). The range reads as zeros afterwards. `offset` must be page-aligned; `len`
    /// is rounded up to whole pages.
    pub fn decommit(&self, offset: u64, len: u64) -> Result<()> {
        let page = os::page_size() as u64;
        if offset % page != 0 {
            bail!(
                InvalidArgument,
                "decommit offset {offset} of section {:?} is not a multiple of the page size {page}",
                self.name()
            );
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.rec.reserved).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidSize,
                format!(
                    "decommit range {offset}+{len} lies outside section {:?} ({} bytes)",
                    self.name(),
                    self.rec.reserved
                ),
            )
        })?;
        let len = (end.next_multiple_of(page)).min(self.rec.reserved) - offset;
        if len == 0 {
            return Ok(());
        }
        let (fd, _) = self.reopen(true, "decommit")?;
        os::punch_hole(os::borrow(&fd), offset, len)
            .map_err(|e| Error::from_io(format!("cannot decommit section {:?}", self.name()), e))?;
        drop(fd);
        registry::note_committed(&self.domain.inner.registry, self.rec.slot, self.rec.generation, offset, false);
        Ok(())
    }

    /// Current information (committed and resident sizes are read now; `resident` is `None` if
    /// the object cannot be reopened or is no longer the one this process mapped).
    pub fn info(&self) -> SectionInfo {
        let mut rec = self
            .domain
            .inner
            .registry
            .read_entry(self.rec.slot)
            .filter(|r| r.generation == self.rec.generation)
            .unwrap_or(self.rec);
        rec.state = registry::LIVE;
        let mut info = SectionInfo::from_record(&self.domain.inner.registry, &rec);
        info.resident = self.reopen(false, "inspect").ok().map(|(_, st)| st.allocated);
        info
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        let inner = &self.domain.inner;
        // AcqRel: the last handle's decrement must see a concurrent `delete_section`'s flag
        // (checked again under `map_lock` in `unmap_deleted`).
        if inner.handles[self.rec.slot as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
            inner.unmap_deleted(&self.rec);
        }
    }
}

impl std::fmt::Debug for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Section")
            .field("name", &self.name())
            .field("domain", &self.domain.name())
            .field("addr", &self.addr)
            .field("len", &self.rec.reserved)
            .finish()
    }
}

/// A description of a section, copied out of the registry.
#[derive(Debug, Clone, Serialize)]
pub struct SectionInfo {
    /// Name.
    pub name: String,
    /// What it holds.
    pub kind: SectionKind,
    /// Persistent or transient.
    pub lifetime: Lifetime,
    /// Address in every attached process.
    pub address: u64,
    /// Reserved bytes.
    pub reserved: u64,
    /// Bytes guaranteed by `commit` (a prefix; informational).
    pub committed: u64,
    /// Bytes actually backed by memory now, from the object's block count (`None` if the
    /// object could not be examined, e.g. no permission).
    pub resident: Option<u64>,
    /// Owner's user id.
    pub owner_uid: u32,
    /// Permission bits.
    pub mode: u32,
    /// Unique number of this incarnation of the name.
    pub generation: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Pid of the creating process.
    pub creator_pid: u32,
    /// File name of the backing object in the shm directory.
    pub object: String,
}

impl SectionInfo {
    pub(crate) fn from_record(reg: &Registry, rec: &SectionRecord) -> SectionInfo {
        let object = names::section_object(reg.domain(), rec.generation, rec.name.as_str());
        let resident = os::open_object(os::borrow(reg.dir()), &object, false)
            .ok()
            .and_then(|fd| os::stat_object(os::borrow(&fd)).ok())
            .map(|s| s.allocated);
        SectionInfo {
            name: rec.name.as_str().to_owned(),
            kind: rec.kind,
            lifetime: rec.lifetime,
            address: reg.window_base + rec.offset,
            reserved: rec.reserved,
            committed: rec.committed,
            resident,
            owner_uid: rec.owner_uid,
            mode: rec.mode,
            generation: rec.generation,
            created_at: rec.created_at,
            creator_pid: rec.creator_pid,
            object,
        }
    }
}

/// Types that can be reached in place in shared memory with [`Section::at`]: every bit pattern
/// is a valid value (all-zero means "not initialised"), and all shared access goes through
/// atomics or a lock, so `&T` may be held while other processes use the same object.
///
/// # Safety
/// Implement only for types meeting exactly that.
pub unsafe trait InPlace: Sync {}

// SAFETY: each is repr(C) atomics (the mutex's lock too: `sync::robust`),
// valid for any bit pattern, validated by its header before use.
unsafe impl InPlace for crate::sync::Semaphore {}
// SAFETY: as above.
unsafe impl InPlace for crate::sync::Event {}
// SAFETY: as above.
unsafe impl InPlace for crate::sync::Condvar {}
// SAFETY: as above.
unsafe impl InPlace for crate::sync::RawMutex {}
// SAFETY: as above; the data is reached only under the lock. `T` must itself be valid for any
// bit pattern: integers, floats, atomics and arrays of them.
unsafe impl<T: ShmSafe + Send + AnyBitPattern> InPlace for crate::sync::Mutex<T> {}
// SAFETY: atomics are valid for any bit pattern and Sync.
unsafe impl InPlace for std::sync::atomic::AtomicU32 {}
// SAFETY: as above.
unsafe impl InPlace for std::sync::atomic::AtomicU64 {}

/// Types for which every bit pattern is a valid value.
///
/// # Safety
/// Implement only for such types (no `bool`, `char`, enums, references).
pub unsafe trait AnyBitPattern: Copy {}
macro_rules! any_bits {
    ($($t:ty),*) => { $(
        // SAFETY: every bit pattern of this integer or float type is a valid value.
        unsafe impl AnyBitPattern for $t {}
    )* };
}
any_bits!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);
// SAFETY: an array of any-bit-pattern elements has no invalid bit patterns either.
unsafe impl<T: AnyBitPattern, const N: usize> AnyBitPattern for [T; N] {}
