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
//!
//! # The sections of a domain
//! The [`Domain`] methods that create, open, create-or-open and delete sections live here
//! (an `impl Domain` block below): they run the registry's readiness protocol (a section still
//! being initialised by a live creator is waited for, one whose creator died is removed) and
//! hand out [`Section`] handles. Mapping itself, and the handle count that decides when a
//! deleted section is unmapped, belong to the attachment's `Mapping` (`attachment::mapping`);
//! a handle takes one on creation and releases it on drop.

use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result, bail};
use crate::file_section;
use crate::names;
use crate::os::{self, ErrorExt};
use crate::registry::{self, Lifetime, Registry, SectionKind, SectionRecord};
use crate::sharing::Sharing;
use crate::shm_safe::ShmSafe;

/// How to create a section.
#[derive(Debug, Clone)]
pub struct SectionOptions {
    /// What the section holds. Default [`SectionKind::Raw`].
    pub kind: SectionKind,
    /// Persistent (default) or transient.
    pub lifetime: Lifetime,
    /// Who may open and map it. Default `None`: as the domain is shared (its registry object's
    /// access: owner only unless the domain was made with another [`crate::DomainOptions::sharing`]).
    pub sharing: Option<Sharing>,
    /// A regular file to back the section (see [`SectionOptions::file`]). Default `None`: an
    /// object in the domain's shm directory.
    pub file: Option<PathBuf>,
}

impl Default for SectionOptions {
    fn default() -> Self {
        SectionOptions { kind: SectionKind::Raw, lifetime: Lifetime::Persistent, sharing: None, file: None }
    }
}

impl SectionOptions {
    /// Default options: raw, persistent, shared as the domain is.
    pub fn new() -> Self {
        Self::default()
    }
    /// Deleted automatically when no process is attached to the domain any more.
    pub fn transient(mut self) -> Self {
        self.lifetime = Lifetime::Transient;
        self
    }
    /// Sets who may open and map it ([`Sharing::group`] to share with the group).
    pub fn sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = Some(sharing);
        self
    }
    /// Sets the POSIX permission bits (for example `0o660` to share with the group): shorthand
    /// for [`SectionOptions::sharing`] with [`Sharing::from_posix_mode`].
    pub fn mode(self, mode: u32) -> Self {
        self.sharing(Sharing::from_posix_mode(mode))
    }
    /// Sets the kind.
    pub fn kind(mut self, kind: SectionKind) -> Self {
        self.kind = kind;
        self
    }
    /// Backs the section by the regular file `path`, mapped shared at the section's place
    /// (file-backed section; see the module docs of `file_section`). A file that does not
    /// exist is created (mode 0600) with a header page recording the section's address and
    /// size. An existing file (made so before, for example by a process of a domain long
    /// gone) is placed at the address it records, or creating the section fails: its size is
    /// the file's, the `size` argument is ignored, and its contents are kept. Deleting the
    /// section, or the domain, leaves the file. Refused: a symbolic link, a directory, a file
    /// of another user, one with a damaged header, one that a live process of another domain
    /// maps.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
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
    /// The size of the pages backing it (`os::Dir::page_size` of the shm directory: huge on
    /// hugetlbfs).
    page: u64,
}

// SAFETY: the handle only holds an address into a shared mapping that lives as long as the
// attachment it keeps alive, plus plain values; nothing has thread affinity.
unsafe impl Send for Section {}
// SAFETY: as above; all methods take `&self` and make system calls or read immutable fields.
unsafe impl Sync for Section {}

impl Section {
    /// Maps a section this process just created (and closes `object`).
    /// `data_offset`: where the section's bytes start in `object` (a file's header page).
    pub(crate) fn map_new(domain: Domain, rec: SectionRecord, object: os::Object, data_offset: u64) -> Result<Section> {
        let id = domain.inner.map_new_held(&rec, object, data_offset)?;
        Ok(Section::held(domain, rec, id))
    }

    /// Opens and maps an existing section from its registry record.
    pub(crate) fn open_record(domain: Domain, rec: SectionRecord) -> Result<Section> {
        let id = domain.inner.open_held(&rec)?;
        Ok(Section::held(domain, rec, id))
    }

    /// The handle over a section mapped with one handle taken for it (released on drop).
    fn held(domain: Domain, rec: SectionRecord, object: os::ObjectId) -> Section {
        let addr = NonNull::new((domain.inner.window_base + rec.offset) as *mut u8).expect("window base is never null");
        let page = section_page_size(domain.inner.registry.dir());
        Section { domain, rec, object, addr, page }
    }

    /// Reopens the section's object by name for a call that needs it (`what` says which, for
    /// errors), and checks that it is still the object this process mapped. Returns the
    /// object, which the caller closes when done (drop), and what `fstat` said.
    ///
    /// For a file-backed section, the object is its file and `fstat` describes its data; the
    /// third value is where the data starts in the object (0, or the file's header page).
    pub(crate) fn reopen(&self, access: os::Access, what: &str) -> Result<(os::Object, os::ObjectStat, u64)> {
        let name = self.name();
        let object = names::section_object(&self.domain.inner.name, self.rec.generation, name);
        let fd = self.domain.inner.registry.dir().open_object(&object, access).map_err(|e| {
            if e.is_not_found() {
                Error::new(
                    ErrorKind::NotFound,
                    format!("cannot {what} section {name:?}: it was deleted (its object {object:?} is gone)"),
                )
            } else {
                Error::from_io(format!("cannot {what} section {name:?}: cannot reopen its object {object:?}"), e)
            }
        })?;
        let st = fd
            .stat()
            .map_err(|e| Error::from_io(format!("cannot {what} section {name:?}: cannot stat its object"), e))?;
        let (fd, st, data_offset) = if file_section::is_link(&st) {
            let b = file_section::resolve(name, &fd, &st)
                .map_err(|e| Error::new(e.kind(), format!("cannot {what} section {name:?}: {e}")))?;
            (b.object, b.stat, file_section::data_offset())
        } else {
            (fd, st, 0)
        };
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
        Ok((fd, st, data_offset))
    }

    /// Its registry record, as this handle opened it.
    pub(crate) fn record(&self) -> &SectionRecord {
        &self.rec
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

    /// The size of the pages backing the section: the system page size, or the huge page size
    /// when the section lives on a hugetlbfs shm directory. Commit, decommit and protection
    /// work in whole pages of this size.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Whether the section is backed by pages larger than the system page size.
    pub fn is_huge(&self) -> bool {
        self.page_size() > os::page_size() as u64
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
        self.commit_with_progress(len, u64::MAX, |_| {})
    }

    /// [`Section::commit`] in steps of `step` bytes (rounded up to whole pages), calling
    /// `progress(committed_so_far)` after each: for a progress bar while gigabytes are committed.
    /// A failure part-way keeps what was committed before it.
    pub fn commit_with_progress(&self, len: u64, step: u64, mut progress: impl FnMut(u64)) -> Result<()> {
        if len > self.rec.reserved {
            bail!(
                InvalidSize,
                "cannot commit {len} bytes of section {:?}: only {} are reserved",
                self.name(),
                self.rec.reserved
            );
        }
        // Whole pages of the section's size (huge pages on hugetlbfs): never past `reserved`,
        // which is a multiple of it.
        let page = self.page;
        let len = len.next_multiple_of(page).min(self.rec.reserved);
        if len == 0 {
            return Ok(());
        }
        let step = step.clamp(1, len).next_multiple_of(page);
        let (fd, _, at) = self.reopen(os::Access::ReadWrite, "commit")?;
        let mut done = 0;
        while done < len {
            let n = step.min(len - done);
            fd.allocate(at + done, n)
                .map_err(|e| Error::from_io(format!("cannot commit {len} bytes of section {:?}", self.name()), e))?;
            done += n;
            registry::note_committed(&self.domain.inner.registry, self.rec.slot, self.rec.generation, done, true);
            progress(done);
        }
        Ok(())
    }

    /// Gives the pages of `[offset, offset + len)` back, for every process (`fallocate` with
    /// `PUNCH_HOLE`). The range reads as zeros afterwards. `offset` must be a multiple of the
    /// section's [page size](Section::page_size) (a huge page on hugetlbfs); `len` is rounded
    /// up to whole pages of that size.
    pub fn decommit(&self, offset: u64, len: u64) -> Result<()> {
        let page = self.page;
        if offset % page != 0 {
            bail!(
                InvalidArgument,
                "decommit offset {offset} of section {:?} is not a multiple of its page size {page}{}",
                self.name(),
                if self.is_huge() { " (it is backed by huge pages)" } else { "" }
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
        let (fd, _, at) = self.reopen(os::Access::ReadWrite, "decommit")?;
        fd.punch_hole(at + offset, len)
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
        info.resident = self.reopen(os::Access::Read, "inspect").ok().map(|(_, st, _)| st.allocated);
        info
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        self.domain.inner.release_handle(&self.rec);
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

// ---------------------------------------------------------------------------------------------
// The sections of a domain: create, open, create-or-open, delete (the readiness protocol of
// the registry, seen from this process)
// ---------------------------------------------------------------------------------------------

impl Domain {
    /// Creates a section. Fails with `AlreadyExists` if the name is taken.
    pub fn create_section(&self, name: &str, size: u64, opts: &SectionOptions) -> Result<Section> {
        self.create_section_as(name, size, opts, true).map(|(s, _)| s)
    }

    /// [`Domain::create_section`], with readiness chosen by the caller: `ready` false makes the
    /// section `LIVE` but unready until [`Domain::finish_init`] (heaps and queues initialise
    /// their header first). Returns the new entry too.
    pub(crate) fn create_section_as(
        &self,
        name: &str,
        size: u64,
        opts: &SectionOptions,
        ready: bool,
    ) -> Result<(Section, SectionRecord)> {
        names::validate(name, "section")?;
        let file = match &opts.file {
            Some(path) => Some(file_section::Prepared::open_or_create(path, name)?),
            None => None,
        };
        // A file made before keeps its size (its capacity); a new one may not be left behind.
        let (size, new_file) = match &file {
            Some(f) => match f.header {
                Some(h) => (h.capacity, None),
                None => (size, Some(f.path.clone())),
            },
            None => (size, None),
        };
        let made = (|| {
            let reserved = self.check_new_section(name, size, opts)?;
            let guard = self.inner.registry.lock()?;
            let abandoned = match self.settle(&guard, name) {
                Found::Ready(rec) | Found::Pending(rec) => return Err(already_exists(self, &rec)),
                Found::Absent(abandoned) => abandoned,
            };
            let data_offset = if file.is_some() { file_section::data_offset() } else { 0 };
            let made = self.create_locked(&guard, name, reserved, opts, ready, file);
            drop(guard);
            if let Some(old) = abandoned {
                self.forget_removed(&old);
            }
            let (rec, fd) = made?;
            self.map_created(rec, fd, data_offset).map(|s| (s, rec))
        })();
        if made.is_err()
            && let Some(path) = new_file
        {
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Opens an existing section by name. A section still being initialised by its (live)
    /// creator is waited for; one whose creator died before finishing it is removed and
    /// reported as not found.
    pub fn open_section(&self, name: &str) -> Result<Section> {
        names::validate(name, "section")?;
        let mut wait = CreatorWait::new();
        let mut vanished = 0;
        loop {
            let guard = self.inner.registry.lock()?;
            let found = self.settle(&guard, name);
            drop(guard);
            let rec = match found {
                Found::Ready(rec) => rec,
                Found::Pending(rec) => {
                    wait.pause(self, &rec)?;
                    continue;
                }
                Found::Absent(Some(old)) => {
                    self.forget_removed(&old);
                    bail!(
                        NotFound,
                        "no section {name:?} in domain {:?}: its creator (pid {}) died before initialising it, so the \
                         unfinished section was removed; create it again",
                        self.inner.name,
                        old.creator_pid
                    );
                }
                Found::Absent(None) => return Err(not_found(self, name)),
            };
            match Section::open_record(self.clone(), rec) {
                // Deleted between the lookup and the open: look again.
                Err(e) if e.kind() == ErrorKind::NotFound && vanished < 8 => vanished += 1,
                other => return other,
            }
        }
    }

    /// Opens section `name` if it exists (its reserved size must be at least `size` and its
    /// kind `opts.kind`), otherwise creates it. Returns the section and whether this call
    /// created it. When several processes race, exactly one creates it; the others wait until
    /// the creator has initialised it. A section left unfinished by a creator that died is
    /// removed and created anew.
    pub fn create_or_open_section(&self, name: &str, size: u64, opts: &SectionOptions) -> Result<(Section, bool)> {
        self.create_or_open_section_as(name, size, opts, true).map(|(s, created, _)| (s, created))
    }

    /// [`Domain::create_or_open_section`] with readiness chosen by the caller (see
    /// [`Domain::create_section_as`]); also returns the entry.
    pub(crate) fn create_or_open_section_as(
        &self,
        name: &str,
        size: u64,
        opts: &SectionOptions,
        ready: bool,
    ) -> Result<(Section, bool, SectionRecord)> {
        if let Some(path) = &opts.file {
            bail!(
                InvalidArgument,
                "section {name:?}: create-or-open does not take a file ({}); use create_section with \
                 SectionOptions::file, which opens an existing file as well",
                path.display()
            );
        }
        let reserved = self.check_new_section(name, size, opts)?;
        let mut wait = CreatorWait::new();
        let mut vanished = 0;
        loop {
            let guard = self.inner.registry.lock()?;
            let rec = match self.settle(&guard, name) {
                Found::Ready(rec) => rec,
                Found::Pending(rec) => {
                    drop(guard);
                    wait.pause(self, &rec)?;
                    continue;
                }
                Found::Absent(abandoned) => {
                    let made = self.create_locked(&guard, name, reserved, opts, ready, None);
                    drop(guard);
                    if let Some(old) = abandoned {
                        self.forget_removed(&old);
                    }
                    let (rec, fd) = made?;
                    return self.map_created(rec, fd, 0).map(|s| (s, true, rec));
                }
            };
            drop(guard);
            if rec.kind != opts.kind {
                bail!(
                    InvalidArgument,
                    "section {name:?} exists as a {} section, not {}",
                    rec.kind.as_str(),
                    opts.kind.as_str()
                );
            }
            if rec.reserved < size {
                bail!(
                    InvalidSize,
                    "section {name:?} exists with {} bytes reserved, less than the {size} requested",
                    rec.reserved
                );
            }
            match Section::open_record(self.clone(), rec) {
                // Deleted between the lookup and the open: look again.
                Err(e) if e.kind() == ErrorKind::NotFound && vanished < 8 => vanished += 1,
                other => return other.map(|s| (s, false, rec)),
            }
        }
    }

    /// Looks `name` up under the lock. An unready entry whose creator is dead (by its peer
    /// token) can never become ready: it is removed here, under the same lock, and reported
    /// as `Absent(Some(removed))` so the caller can create the name anew atomically.
    fn settle(&self, guard: &registry::RegistryGuard<'_>, name: &str) -> Found {
        let Some(rec) = guard.find_live(name) else { return Found::Absent(None) };
        if rec.ready {
            return Found::Ready(rec);
        }
        if self.peer_alive(rec.creator_token) {
            return Found::Pending(rec);
        }
        // The creator is gone and nobody else may finish its work: remove what it left.
        // A failed unlink leaves an orphan object for `gc`; the entry is freed regardless.
        let _ = guard.remove(&rec);
        Found::Absent(Some(rec))
    }

    /// Marks a section created unready (by `create_section_as`/`create_or_open_section_as`)
    /// ready, once its creator has initialised it. Fails if it was deleted meanwhile.
    pub(crate) fn finish_init(&self, rec: &SectionRecord) -> Result<()> {
        let guard = self.inner.registry.lock()?;
        if guard.mark_ready(rec) {
            return Ok(());
        }
        bail!(
            NotFound,
            "section {:?} of domain {:?} was deleted while this process was initialising it",
            rec.name.as_str(),
            self.inner.name
        )
    }

    /// Removes a section this process created but could not initialise (all-or-nothing
    /// creation): nobody may see it half-made. `section` is this process's handle to it.
    pub(crate) fn abandon_created(&self, section: Section, rec: &SectionRecord) {
        self.abandon_record(rec);
        drop(section);
    }

    /// [`Domain::abandon_created`] once this process's handle to it is gone already.
    pub(crate) fn abandon_record(&self, rec: &SectionRecord) {
        if let Ok(guard) = self.inner.registry.lock() {
            if let Some(live) = guard.same_entry(rec) {
                let _ = guard.remove(&live);
            }
        }
        self.forget_removed(rec);
    }

    /// Maps a section this call just created; if that fails, removes it again.
    fn map_created(&self, rec: SectionRecord, fd: os::Object, data_offset: u64) -> Result<Section> {
        Section::map_new(self.clone(), rec, fd, data_offset).inspect_err(|_| {
            if let Ok(guard) = self.inner.registry.lock() {
                if let Some(live) = guard.same_entry(&rec) {
                    let _ = guard.remove(&live);
                }
            }
            self.forget_removed(&rec);
        })
    }

    /// After `rec` was removed from the registry: unmaps it from this process now, or when
    /// this process's last handle to it drops (as `delete_section` does).
    fn forget_removed(&self, rec: &SectionRecord) {
        self.inner.forget_removed(rec);
    }

    fn check_new_section(&self, name: &str, size: u64, opts: &SectionOptions) -> Result<u64> {
        names::validate(name, "section")?;
        if size == 0 {
            bail!(InvalidSize, "section {name:?}: size 0 is invalid; expected at least 1 byte");
        }
        // Whole pages of the directory's size: huge pages on hugetlbfs (file-backed sections
        // are files elsewhere, in pages of the system's size).
        let dir_page = section_page_size(self.inner.registry.dir());
        if opts.file.is_some() && dir_page > os::page_size() as u64 {
            bail!(
                InvalidArgument,
                "section {name:?}: a file-backed section needs a link object in the shm directory, and {} is a \
                 hugetlbfs (huge pages) where such objects cannot be written; use a tmpfs shm directory for file-backed \
                 sections",
                self.inner.shm_dir.display()
            );
        }
        let page = if opts.file.is_some() { os::page_size() as u64 } else { dir_page };
        let reserved = size.checked_next_multiple_of(page).unwrap_or(u64::MAX);
        if reserved > self.inner.window_size {
            bail!(
                InvalidSize,
                "section {name:?}: {size} bytes cannot fit in domain {:?}'s window of {} bytes",
                self.inner.name,
                self.inner.window_size
            );
        }
        if let Some(sharing) = opts.sharing
            && sharing.posix_mode() & !0o777 != 0
        {
            bail!(InvalidArgument, "section {name:?}: mode {:#o} has bits outside 0o777", sharing.posix_mode());
        }
        Ok(reserved)
    }

    /// Creates the entry and the backing object; the caller holds the registry lock.
    fn create_locked(
        &self,
        guard: &registry::RegistryGuard<'_>,
        name: &str,
        reserved: u64,
        opts: &SectionOptions,
        ready: bool,
        file: Option<file_section::Prepared>,
    ) -> Result<(SectionRecord, os::Object)> {
        let creator = registry::Creator { token: self.peer_token(), ready };
        // No sharing given: as the domain's registry object is shared.
        let mode = opts.sharing.map_or(self.inner.registry.mode & 0o777, Sharing::posix_mode);
        let (base, size) = (self.inner.window_base, self.inner.window_size);
        let at = match &file {
            Some(f) => match &f.header {
                Some(h) => Some(file_section::recorded_offset(h, &f.path, &self.inner.name, base, size)?),
                None => None,
            },
            None => None,
        };
        let rec = guard.begin_create_at(name, opts.kind, opts.lifetime, mode, reserved, creator, at)?;
        let dir = self.inner.registry.dir();
        let object = names::section_object(&self.inner.name, rec.generation, name);
        let made = dir
            .create_object(&object, mode)
            .or_else(|e| {
                // A leftover from a crash with the same generation cannot normally exist (the
                // counter only grows), but if one does it is garbage: replace it.
                if e.is_exists() {
                    let _ = dir.unlink_object(&object);
                    dir.create_object(&object, mode)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::from_io(format!("cannot create section {name:?} (object {object:?})"), e));
        let made = match file {
            None => made.and_then(|fd| {
                fd.set_size(reserved)
                    .map(|()| fd)
                    .map_err(|e| Error::from_io(format!("cannot create section {name:?} (object {object:?})"), e))
            }),
            Some(file) => made.and_then(|link| {
                if file.header.is_none() {
                    file.write_new(base + rec.offset, reserved)?;
                }
                file_section::write_link(&link, &file.path).map_err(|e| {
                    Error::from_io(format!("cannot write section {name:?}'s link object {object:?}"), e)
                })?;
                file.share()
            }),
        };
        match made {
            Ok(fd) => {
                guard.finish_create(rec.slot);
                let rec = guard.same_entry(&rec).expect("entry made LIVE just above, under the lock");
                Ok((rec, fd))
            }
            Err(e) => {
                let _ = guard.remove(&rec);
                Err(e)
            }
        }
    }

    /// Deletes a section for everyone; nobody can open it any more. Other processes that map
    /// it keep their mapping until they detach. This process unmaps it now, or, if it still
    /// holds [`Section`] handles to it, when the last of them is dropped.
    pub fn delete_section(&self, name: &str) -> Result<()> {
        names::validate(name, "section")?;
        let guard = self.inner.registry.lock()?;
        let rec = guard.find_live(name).ok_or_else(|| not_found(self, name))?;
        let removed = guard.remove(&rec);
        drop(guard);
        self.forget_removed(&rec);
        removed
    }

    /// Information about every section of the domain.
    pub fn sections(&self) -> Vec<SectionInfo> {
        self.inner
            .registry
            .entries()
            .iter()
            .filter(|r| r.state == registry::LIVE)
            .map(|r| SectionInfo::from_record(&self.inner.registry, r))
            .collect()
    }

    /// Information about one section.
    pub fn section_info(&self, name: &str) -> Result<SectionInfo> {
        names::validate(name, "section")?;
        let guard = self.inner.registry.lock()?;
        let rec = guard.find_live(name).ok_or_else(|| not_found(self, name))?;
        drop(guard);
        Ok(SectionInfo::from_record(&self.inner.registry, &rec))
    }

    /// Maps every section of the domain that this process has not mapped yet (the classic
    /// `shm_map_all`). Returns how many it mapped. Sections that cannot be mapped (deleted
    /// meanwhile, permission) are skipped; the first such error is returned after the rest are
    /// mapped.
    pub fn map_all(&self) -> Result<usize> {
        let mut mapped = 0;
        let mut first_err = None;
        for rec in self.inner.registry.entries() {
            if rec.state != registry::LIVE || self.inner.mapping.is_mapped(&rec) {
                continue;
            }
            match Section::open_record(self.clone(), rec) {
                Ok(_) => mapped += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(mapped), Err)
    }

    /// See `__testing::forget_mapping`.
    pub(crate) fn forget_mapping(&self, name: &str) -> Result<()> {
        let rec = self.inner.registry.lock()?.find_live(name).ok_or_else(|| not_found(self, name))?;
        match self.inner.mapping.forget(&rec) {
            Ok(true) => Ok(()),
            Ok(false) => bail!(InvalidArgument, "section {name:?} still has handles in this process"),
            Err(e) => Err(Error::from_io("cannot unmap", e)),
        }
    }
}

fn not_found(domain: &Domain, name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "no section {name:?} in domain {:?}; `shmgadget ls --domain {}` lists its sections",
            domain.inner.name, domain.inner.name
        ),
    )
}

fn already_exists(domain: &Domain, rec: &SectionRecord) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!(
            "section {:?} already exists in domain {:?} (created by pid {}); open it instead, or remove it with `shmgadget rm --domain {} {}`",
            rec.name.as_str(),
            domain.inner.name,
            rec.creator_pid,
            domain.inner.name,
            rec.name.as_str()
        ),
    )
}

/// What a name lookup found (see `Domain::settle`).
enum Found {
    /// A usable section.
    Ready(SectionRecord),
    /// A section whose live creator has not finished initialising it.
    Pending(SectionRecord),
    /// No section; `Some` when an unfinished section of a dead creator was just removed.
    Absent(Option<SectionRecord>),
}

/// Longest wait for a live creator to finish initialising a section (a heap's header takes
/// microseconds; this bounds a creator that is stopped or stuck).
pub(crate) const CREATOR_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`CREATOR_WAIT`] in milliseconds, or a shorter bound set by a test
/// (`__testing::set_creator_wait`).
pub(crate) static CREATOR_WAIT_MS: AtomicU64 = AtomicU64::new(CREATOR_WAIT.as_millis() as u64);

/// Waiting for a section's creator, bounded by [`CREATOR_WAIT`].
struct CreatorWait {
    start: std::time::Instant,
    pause: std::time::Duration,
}

impl CreatorWait {
    fn new() -> Self {
        CreatorWait { start: std::time::Instant::now(), pause: std::time::Duration::from_micros(50) }
    }

    /// Sleeps a little (growing to 5 ms), or fails with `Timeout` once the bound is reached.
    fn pause(&mut self, domain: &Domain, rec: &SectionRecord) -> Result<()> {
        // Relaxed: a setting, read on its own.
        let limit = std::time::Duration::from_millis(CREATOR_WAIT_MS.load(Ordering::Relaxed));
        if self.start.elapsed() > limit {
            bail!(
                Timeout,
                "section {:?} of domain {:?} is still being initialised by its creator, pid {} (alive), after {:?}; \
                 that process may be stopped or stuck: resume or kill it, or remove the section with `shmgadget rm --domain {} {}`",
                rec.name.as_str(),
                domain.inner.name,
                rec.creator_pid,
                limit,
                domain.inner.name,
                rec.name.as_str()
            );
        }
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(std::time::Duration::from_millis(5));
        Ok(())
    }
}

/// The section covering `addr` in a domain attached by this process, opened (and mapped).
pub(crate) fn section_at(addr: usize) -> Result<Section> {
    let domains = crate::domain::attached_domains_where(|a| a.contains(addr));
    let Some(domain) = domains.first() else {
        bail!(InvalidArgument, "address {addr:#x} is not inside the window of any domain attached in this process");
    };
    let off = (addr - domain.inner.window_base as usize) as u64;
    let rec = domain.inner.registry.lookup_offset(off).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no live section of domain {:?} covers address {addr:#x}", domain.inner.name),
        )
    })?;
    Section::open_record(domain.clone(), rec)
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
    /// The file backing a file-backed section (its object is then a link naming it).
    pub file: Option<PathBuf>,
    /// The size of the pages backing it: the system page size, or the huge page size on a
    /// hugetlbfs shm directory.
    pub page_size: u64,
}

/// The page size of sections in shm directory `dir` (the system's if it cannot be asked).
pub(crate) fn section_page_size(dir: &os::Dir) -> u64 {
    dir.page_size().unwrap_or_else(|_| os::page_size()) as u64
}

impl SectionInfo {
    pub(crate) fn from_record(reg: &Registry, rec: &SectionRecord) -> SectionInfo {
        let object = names::section_object(reg.domain(), rec.generation, rec.name.as_str());
        let sys = os::page_size() as u64;
        let (resident, file, page_size) = match reg.dir().open_object(&object, os::Access::Read) {
            Err(_) => (None, None, section_page_size(reg.dir())),
            Ok(fd) => match fd.stat() {
                Err(_) => (None, None, section_page_size(reg.dir())),
                Ok(st) if file_section::is_link(&st) => {
                    let name = rec.name.as_str();
                    match file_section::resolve(name, &fd, &st) {
                        Ok(b) => (Some(b.stat.allocated), Some(b.path), b.object.page_size().map_or(sys, |p| p as u64)),
                        Err(_) => (None, file_section::read_link(&fd, &st), sys),
                    }
                }
                Ok(st) => (Some(st.allocated), None, fd.page_size().map_or(sys, |p| p as u64)),
            },
        };
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
            file,
            page_size,
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
