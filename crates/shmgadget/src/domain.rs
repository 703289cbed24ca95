//! Attachments: one process's membership of a domain.
//!
//! Attaching opens (or creates) the domain's registry, reserves the domain's address window
//! in this process and takes a process slot with its liveness token. Every section of the
//! domain is then mapped inside that window at the offset the registry records, so it has the
//! same address in every attached process.
//!
//! Within one process, attaching the same domain twice returns the same attachment; it is
//! detached when the last [`Domain`] handle (sections hold one) is dropped or detached.
//!
//! Lock order: this process's attachment table → an attachment's `ident_lock` → shm-directory
//! lock ([`os::DirLock`]) → registry lock. The directory lock serialises creating, joining and deleting
//! registries, so a registry is never unlinked while someone is joining it and two new domains
//! never pick the same window.
//!
//! # Identity, and fork
//! An attachment's identity is its registration in the registry: a process slot and the
//! liveness token held through a descriptor of its own, kept in an [`os::TokenCell`]
//! ([`Domain::peer_token`] names it; [`Domain::peer_alive`] asks the kernel's lock table
//! whether a token is still held). Pids are recorded for display only.
//!
//! A forked child must not share its parent's identity (DESIGN, "Pitfalls": it would keep the
//! parent "alive", and its exit would release the parent's token). So before every `fork(2)`
//! the fork prepare hook ([`before_fork`], registered with [`os::install_fork_handlers`]) registers one new slot per attached
//! domain with a new descriptor and hands it to the token cell as *pending*; the parent
//! handler closes the parent's copy (the child's copy alone now holds that lock), and the child
//! handler closes the inherited descriptors of the parent's tokens and adopts the pending ones
//! (see `os`). So a child is a participant of its own from its first instruction, a parent that
//! dies is seen dead while its children live, and neither's detach touches the other's entry.
//! If the pending registration could not be made (registry full), the child has no token, and
//! its first call that needs one ([`DomainInner::token`]) registers it then.
//!
//! Forking while another thread of this process is inside shmgadget is as unsafe as forking
//! while it holds any lock: the prepare hook takes the attachment table's lock, which makes a
//! fork wait for attach/detach in other threads, but not for other private locks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result, bail};
use crate::fault;
use crate::names;
use crate::os::{self, ErrorExt};
use crate::registry::{self, CreateParams, Lifetime, Registry, SectionRecord};
use crate::section::{Section, SectionInfo, SectionOptions};

/// Default shm directory.
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";

/// Settings for [`Domain::attach_with`]. The window and table sizes only matter when the call
/// creates the domain; an existing domain keeps the ones it was created with.
#[derive(Debug, Clone)]
pub struct DomainOptions {
    /// Window base; `None` picks the first free 1 GiB-aligned window at or above
    /// `0x2000_0000_0000` that no other domain on this machine uses.
    pub window_base: Option<u64>,
    /// Window size in bytes (a multiple of 2 MiB, 16 MiB to 64 TiB). Default 1 TiB.
    pub window_size: u64,
    /// Number of section entries in the registry. Default 4096.
    pub max_sections: u32,
    /// Number of attached-process entries. Default 1024.
    pub max_procs: u32,
    /// Permission bits of the registry object (who may attach). Default `0o600`.
    pub mode: u32,
    /// Directory holding the backing objects; default `SHMGADGET_SHM_DIR` or `/dev/shm`.
    pub shm_dir: Option<PathBuf>,
    /// Accept registries and sections owned by another user (default: refuse them).
    pub allow_foreign_owner: bool,
    /// Fail with `NotFound` instead of creating the domain when it does not exist.
    pub must_exist: bool,
    /// Eager mapping, for hosts that own or block `SIGSEGV`: install no fault handler, map
    /// every section at attach, and reach later sections with [`crate::ensure_mapped`] or
    /// [`Domain::map_all`]. Default: `SHMGADGET_EAGER=1` in the environment, else off (map on
    /// first touch).
    pub eager: bool,
}

impl Default for DomainOptions {
    fn default() -> Self {
        DomainOptions {
            window_base: None,
            window_size: registry::DEFAULT_WINDOW_SIZE,
            max_sections: registry::DEFAULT_MAX_SECTIONS,
            max_procs: registry::DEFAULT_MAX_PROCS,
            mode: 0o600,
            shm_dir: None,
            allow_foreign_owner: false,
            must_exist: false,
            eager: std::env::var_os("SHMGADGET_EAGER").is_some_and(|v| v == "1"),
        }
    }
}

impl DomainOptions {
    /// The shm directory these options resolve to.
    pub fn resolved_shm_dir(&self) -> PathBuf {
        resolve_shm_dir(self.shm_dir.as_deref())
    }

    fn validate(&self) -> Result<()> {
        let ws = self.window_size;
        if !(registry::MIN_WINDOW_SIZE..=registry::MAX_WINDOW_SIZE).contains(&ws) || ws % registry::CHUNK != 0 {
            bail!(
                InvalidSize,
                "window size {ws:#x} is invalid: expected a multiple of 2 MiB between {} MiB and {} TiB",
                registry::MIN_WINDOW_SIZE >> 20,
                registry::MAX_WINDOW_SIZE >> 40
            );
        }
        if let Some(base) = self.window_base {
            let end_ok = base.checked_add(ws).is_some_and(|e| e <= os::USER_ADDRESS_LIMIT);
            if base % registry::CHUNK != 0 || base < registry::MIN_WINDOW_BASE || !end_ok {
                bail!(
                    InvalidArgument,
                    "window base {base:#x} is invalid: expected a 2 MiB-aligned address at or above {:#x} with the window ending below {:#x}",
                    registry::MIN_WINDOW_BASE,
                    os::USER_ADDRESS_LIMIT
                );
            }
        }
        for (what, v) in [("max_sections", self.max_sections), ("max_procs", self.max_procs)] {
            if !(1..=registry::MAX_TABLE_ENTRIES).contains(&v) {
                bail!(InvalidArgument, "{what} = {v} is out of range: expected 1 to {}", registry::MAX_TABLE_ENTRIES);
            }
        }
        if self.mode & !0o777 != 0 {
            bail!(InvalidArgument, "mode {:#o} has bits outside 0o777", self.mode);
        }
        Ok(())
    }
}

pub(crate) fn resolve_shm_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SHMGADGET_SHM_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SHM_DIR))
}

/// The domain name used when none is given: `SHMGADGET_DOMAIN`, or `default`.
pub fn default_domain_name() -> String {
    std::env::var("SHMGADGET_DOMAIN").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "default".to_owned())
}

/// This process's attachment to a domain. Cheap to clone; all clones are the same attachment.
#[derive(Clone)]
pub struct Domain {
    pub(crate) inner: Arc<DomainInner>,
}

pub(crate) struct DomainInner {
    pub(crate) name: String,
    pub(crate) shm_dir: PathBuf,
    /// This process's registration: its current token (0 until registered, e.g. in a forked
    /// child whose registration failed). Written under `ident_lock` and by the fork handlers.
    /// Declared before `registry` so it is dropped (its pending token cleared) before the
    /// registry is unmapped: the fork handlers write into the registry (see `before_fork`).
    pub(crate) ident: os::TokenCell,
    pub(crate) registry: Registry,
    /// Serialises registering and releasing `ident` in this process.
    ident_lock: Mutex<()>,
    pub(crate) window_base: u64,
    pub(crate) window_size: u64,
    pub(crate) allow_foreign_owner: bool,
    /// Whether the fault handler maps this domain's sections on first touch (else eager).
    pub(crate) first_touch: bool,
    /// Per registry slot: the generation of the section mapped there in this process (0: none;
    /// see the mapping-word table in `fault`).
    pub(crate) mapped: Box<[AtomicU64]>,
    /// Per registry slot: live `Section` handles in this process.
    pub(crate) handles: Box<[AtomicU32]>,
    /// Per registry slot: generation this process deleted while holding handles; unmapped when
    /// the last handle drops.
    pub(crate) unmap_when_unused: Box<[AtomicU64]>,
    /// Serialises explicit map and unmap calls in this process.
    pub(crate) map_lock: Mutex<()>,
}

type Key = (PathBuf, String);

/// Attachments of this process. Holding this lock while attaching or detaching keeps one
/// attachment per domain and makes a detach finish before a re-attach reserves the window.
fn attached() -> MutexGuard<'static, HashMap<Key, Arc<DomainInner>>> {
    static ATTACHED: LazyLock<Mutex<HashMap<Key, Arc<DomainInner>>>> = LazyLock::new(Default::default);
    ATTACHED.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_dir(dir: &Path) -> Result<os::DirLock> {
    let handle = os::Dir::open(dir).map_err(|e| dir_error(dir, e))?;
    os::DirLock::acquire(handle)
        .map_err(|e| Error::from_io(format!("cannot lock the shm directory {}", dir.display()), e))
}

fn dir_error(dir: &Path, e: std::io::Error) -> Error {
    let mut err = Error::from_io(format!("cannot open the shm directory {}", dir.display()), e);
    if err.kind() == ErrorKind::NotFound {
        err = Error::new(
            ErrorKind::NotFound,
            format!(
                "the shm directory {} does not exist; create it (a tmpfs) or unset SHMGADGET_SHM_DIR",
                dir.display()
            ),
        );
    }
    err
}

impl Domain {
    /// Attaches the default domain (`SHMGADGET_DOMAIN`, or `default`), creating it if needed.
    pub fn attach_default() -> Result<Domain> {
        Domain::attach(&default_domain_name())
    }

    /// Attaches domain `name` with default options, creating it if needed.
    pub fn attach(name: &str) -> Result<Domain> {
        Domain::attach_with(name, &DomainOptions::default())
    }

    /// Attaches domain `name`, creating it with `opts` if it does not exist (unless
    /// `opts.must_exist`).
    pub fn attach_with(name: &str, opts: &DomainOptions) -> Result<Domain> {
        names::validate(name, "domain")?;
        opts.validate()?;
        let shm_dir = opts.resolved_shm_dir();
        let mut table = attached();
        let key = (shm_dir.clone(), name.to_owned());
        if let Some(inner) = table.get(&key) {
            if inner.first_touch {
                // Notices a handler that replaced ours since, and goes back in front of it.
                fault::install()?;
            }
            return Ok(Domain { inner: inner.clone() });
        }
        let dir_lock = lock_dir(&shm_dir)?;
        let dir = os::Dir::open(&shm_dir).map_err(|e| dir_error(&shm_dir, e))?;
        let registry = match Registry::open(clone_dir(&dir)?, name, os::Access::ReadWrite, opts.allow_foreign_owner) {
            Ok(reg) => {
                claim_window(name, reg.window_base, reg.window_size)?;
                reg
            }
            Err(e) if !opts.must_exist && (e.kind() == ErrorKind::NotFound || Registry::is_unfinished(&dir, name)) => {
                if e.kind() != ErrorKind::NotFound {
                    // Its creator died while making it (we hold the directory lock it held):
                    // all or nothing, so it is made anew.
                    let _ = dir.unlink_object(&names::registry_object(name));
                }
                let (base, size) = choose_window(&shm_dir, &dir, name, opts)?;
                let params = CreateParams {
                    window_base: base,
                    window_size: size,
                    max_sections: opts.max_sections,
                    max_procs: opts.max_procs,
                    mode: opts.mode,
                };
                Registry::create(clone_dir(&dir)?, name, &params).inspect_err(|_| release_window(base, size))?
            }
            Err(e) => return Err(e),
        };
        os::install_fork_handlers(before_fork);
        let registered = os::TokenCell::new()
            .map_err(|e| Error::from_io("cannot hold one more liveness token", e))
            .and_then(|cell| registry.lock()?.register_proc(os::current_pid()).map(|t| (cell, t)));
        let ident = match registered {
            Ok((cell, (token, fd))) => {
                cell.install(fd, token.0);
                cell.set_window(registry.window_base as usize, registry.window_size as usize);
                cell
            }
            Err(e) => {
                release_window(registry.window_base, registry.window_size);
                return Err(e);
            }
        };
        drop(dir_lock);
        let n = registry.max_sections;
        let mapped = (0..n).map(|_| AtomicU64::new(0)).collect();
        let handles = (0..n).map(|_| AtomicU32::new(0)).collect();
        let unmap_when_unused = (0..n).map(|_| AtomicU64::new(0)).collect();
        let inner = Arc::new(DomainInner {
            name: name.to_owned(),
            shm_dir,
            window_base: registry.window_base,
            window_size: registry.window_size,
            ident,
            registry,
            ident_lock: Mutex::new(()),
            allow_foreign_owner: opts.allow_foreign_owner,
            first_touch: !opts.eager,
            mapped,
            handles,
            unmap_when_unused,
            map_lock: Mutex::new(()),
        });
        let ready = fault::register(&inner).and_then(|()| if opts.eager { Ok(()) } else { fault::install() });
        if let Err(e) = ready {
            let _ = inner.teardown();
            return Err(e);
        }
        table.insert(key, inner.clone());
        // Sections opened below hold handles whose drop takes the table lock.
        drop(table);
        let domain = Domain { inner };
        if opts.eager {
            domain.map_all()?;
        }
        Ok(domain)
    }

    /// Detaches this handle. When it is the process's last handle to the domain (sections hold
    /// handles too), the domain is detached: every section is unmapped from this process; if
    /// no other live process is attached, transient sections are deleted, and the registry too
    /// when no persistent section remains. Dropping the last handle does the same, silently.
    pub fn detach(self) -> Result<()> {
        let mut table = attached();
        self.release(&mut table)
    }

    /// Detaches at process exit (the C library's `atexit` handler): like [`Domain::detach`]
    /// for the registry (this process's entry is released; if no other live process is
    /// attached, transient sections and an empty registry are deleted), but nothing is
    /// unmapped and the attachment's memory is never freed, so a thread still touching section
    /// memory while the process ends cannot fault. Does nothing if other handles to the
    /// attachment exist in this process. Never call it in a process that goes on running.
    pub fn detach_at_exit(self) -> Result<()> {
        let mut table = attached();
        if Arc::strong_count(&self.inner) != 2 {
            return Ok(());
        }
        table.remove(&(self.inner.shm_dir.clone(), self.inner.name.clone()));
        drop(table);
        let result = self.inner.leave_registry();
        // Keeps the attachment (registry mapping, fault-handler registration) alive until the
        // process ends.
        std::mem::forget(self);
        result
    }

    fn release(&self, table: &mut HashMap<Key, Arc<DomainInner>>) -> Result<()> {
        // Our handle plus the table's: nobody else can clone it now (cloning needs a handle,
        // attaching needs the table lock we hold).
        if Arc::strong_count(&self.inner) == 2 {
            table.remove(&(self.inner.shm_dir.clone(), self.inner.name.clone()));
            return self.inner.teardown();
        }
        Ok(())
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The shm directory holding the domain's objects.
    pub fn shm_dir(&self) -> &Path {
        &self.inner.shm_dir
    }

    /// Base address and size of the domain's window.
    pub fn window(&self) -> (usize, usize) {
        (self.inner.window_base as usize, self.inner.window_size as usize)
    }

    /// Whether `addr` lies inside this domain's window.
    pub fn contains(&self, addr: usize) -> bool {
        let (base, size) = self.window();
        addr >= base && addr - base < size
    }

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
        let reserved = self.check_new_section(name, size, opts)?;
        let guard = self.inner.registry.lock()?;
        let abandoned = match self.settle(&guard, name) {
            Found::Ready(rec) | Found::Pending(rec) => return Err(already_exists(self, &rec)),
            Found::Absent(abandoned) => abandoned,
        };
        let made = self.create_locked(&guard, name, reserved, opts, ready);
        drop(guard);
        if let Some(old) = abandoned {
            self.forget_removed(&old);
        }
        let (rec, fd) = made?;
        self.map_created(rec, fd).map(|s| (s, rec))
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
                    let made = self.create_locked(&guard, name, reserved, opts, ready);
                    drop(guard);
                    if let Some(old) = abandoned {
                        self.forget_removed(&old);
                    }
                    let (rec, fd) = made?;
                    return self.map_created(rec, fd).map(|s| (s, true, rec));
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
        if let Ok(guard) = self.inner.registry.lock() {
            if let Some(live) = guard.same_entry(rec) {
                let _ = guard.remove(&live);
            }
        }
        self.forget_removed(rec);
        drop(section);
    }

    /// Maps a section this call just created; if that fails, removes it again.
    fn map_created(&self, rec: SectionRecord, fd: os::Object) -> Result<Section> {
        Section::map_new(self.clone(), rec, fd).inspect_err(|_| {
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
        let slot = rec.slot as usize;
        // Relaxed: the flag is re-checked under `map_lock` by the last handle's drop.
        self.inner.unmap_when_unused[slot].store(rec.generation, Ordering::Relaxed);
        if self.inner.handles[slot].load(Ordering::Acquire) == 0 {
            self.inner.unmap_deleted(rec);
        }
    }

    fn check_new_section(&self, name: &str, size: u64, opts: &SectionOptions) -> Result<u64> {
        names::validate(name, "section")?;
        if size == 0 {
            bail!(InvalidSize, "section {name:?}: size 0 is invalid; expected at least 1 byte");
        }
        let page = os::page_size() as u64;
        let reserved = size.checked_next_multiple_of(page).unwrap_or(u64::MAX);
        if reserved > self.inner.window_size {
            bail!(
                InvalidSize,
                "section {name:?}: {size} bytes cannot fit in domain {:?}'s window of {} bytes",
                self.inner.name,
                self.inner.window_size
            );
        }
        if opts.mode & !0o777 != 0 {
            bail!(InvalidArgument, "section {name:?}: mode {:#o} has bits outside 0o777", opts.mode);
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
    ) -> Result<(SectionRecord, os::Object)> {
        let creator = registry::Creator { token: self.peer_token(), ready };
        let rec = guard.begin_create(name, opts.kind, opts.lifetime, opts.mode, reserved, creator)?;
        let dir = self.inner.registry.dir();
        let object = names::section_object(&self.inner.name, rec.generation, name);
        let made = dir
            .create_object(&object, opts.mode)
            .or_else(|e| {
                // A leftover from a crash with the same generation cannot normally exist (the
                // counter only grows), but if one does it is garbage: replace it.
                if e.is_exists() {
                    let _ = dir.unlink_object(&object);
                    dir.create_object(&object, opts.mode)
                } else {
                    Err(e)
                }
            })
            .and_then(|fd| fd.set_size(reserved).map(|()| fd));
        match made {
            Ok(fd) => {
                guard.finish_create(rec.slot);
                let rec = guard.same_entry(&rec).expect("entry made LIVE just above, under the lock");
                Ok((rec, fd))
            }
            Err(e) => {
                let _ = guard.remove(&rec);
                Err(Error::from_io(format!("cannot create section {name:?} (object {object:?})"), e))
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
            if rec.state != registry::LIVE || self.inner.is_mapped(&rec) {
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
        let inner = &self.inner;
        let _guard = inner.map_lock.lock().unwrap_or_else(|p| p.into_inner());
        if inner.handles[rec.slot as usize].load(Ordering::Acquire) != 0 {
            bail!(InvalidArgument, "section {name:?} still has handles in this process");
        }
        // Relaxed: changed under `map_lock`; the handler only maps on a fault, which cannot
        // happen for this range while it is still mapped.
        inner.mapped[rec.slot as usize].store(0, Ordering::Relaxed);
        note_unmap();
        // SAFETY: the range is this section's place in our reservation and no handle to it
        // exists in this process; callers (tests, benchmarks) hold no pointers into it.
        unsafe { os::restore_reservation((inner.window_base + rec.offset) as usize, rec.reserved as usize) }
            .map_err(|e| Error::from_io("cannot unmap", e))
    }

    /// This process's peer token in this domain: the token of its current registration,
    /// never 0. Shared objects record it to say "this process is attached here" (queue peers,
    /// creators). A forked child has a token of its own (see the module docs). Cheap: one
    /// atomic load once registered.
    pub fn peer_token(&self) -> u64 {
        self.inner.token()
    }

    /// Whether the registration that `token` names is still in place and its process alive
    /// (its liveness lock is held; the kernel releases it on death). 0 is nobody.
    pub fn peer_alive(&self, token: u64) -> bool {
        self.inner.registry.proc_alive(token)
    }

    /// The pid recorded for `token`'s registration, for display (0 if the slot has moved on).
    pub(crate) fn peer_pid(&self, token: u64) -> u32 {
        self.inner.registry.proc_pid(token).unwrap_or(0)
    }

    /// The processes attached to the domain, with their liveness.
    pub fn processes(&self) -> Vec<crate::inspect::ProcessInfo> {
        // Registers a forked child that is not yet, so it lists itself.
        self.inner.token();
        self.inner.registry.procs().iter().map(crate::inspect::ProcessInfo::from_record).collect()
    }
}

/// A token that is never alive: what [`DomainInner::token`] returns when this process cannot
/// register (the registry is full or gone), so peers see it as gone rather than as someone else.
pub(crate) const NO_TOKEN: u64 = u64::MAX;

/// The fork prepare hook (see [`os::install_fork_handlers`]): makes a registration for the child in every attached
/// domain (see the module docs).
fn before_fork() {
    let table = attached();
    for inner in table.values() {
        let _ident = inner.ident_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(guard) = inner.registry.lock() else { continue };
        let Ok((token, fd)) = guard.register_proc(os::current_pid()) else { continue };
        let Some(pid_word) = inner.registry.proc_pid_word(token.0) else { continue };
        // SAFETY: the pid word lies in the registry mapping. Before that mapping goes away the
        // pending token is cleared (teardown clears the cell, and `ident` is dropped before
        // `registry`), and `munmap` follows that clearing in program order; `fork` copies the
        // address space atomically with respect to `munmap` (both hold the mm lock). So a
        // child whose copy still has the pending token also has the mapping.
        unsafe { inner.ident.set_pending(fd, token.0, pid_word) };
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let mut table = attached();
        let _ = self.release(&mut table);
    }
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("name", &self.inner.name)
            .field("window", &format_args!("{:#x}+{:#x}", self.inner.window_base, self.inner.window_size))
            .finish()
    }
}

impl DomainInner {
    /// This process's token (see [`Domain::peer_token`]); registers first if it has none (a
    /// forked child whose pending registration failed).
    #[inline]
    pub(crate) fn token(&self) -> u64 {
        match self.ident.tag() {
            0 => self.register_late(),
            t => t,
        }
    }

    #[cold]
    fn register_late(&self) -> u64 {
        let _ident = self.ident_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let t @ 1.. = self.ident.tag() {
            return t;
        }
        let registered = lock_dir(&self.shm_dir).and_then(|_dir_lock| {
            let (token, fd) = self.registry.lock()?.register_proc(os::current_pid())?;
            self.ident.install(fd, token.0);
            Ok(token.0)
        });
        registered.unwrap_or_else(|e| {
            eprintln!("shmgadget: process {} cannot register in domain {:?}: {e}", os::current_pid(), self.name);
            NO_TOKEN
        })
    }

    pub(crate) fn is_mapped(&self, rec: &SectionRecord) -> bool {
        // Relaxed: a hint only; mapping the same object at the same place twice is harmless.
        self.mapped[rec.slot as usize].load(Ordering::Relaxed) == rec.generation
    }

    pub(crate) fn note_mapped(&self, rec: &SectionRecord) {
        // Relaxed: see `is_mapped`.
        self.mapped[rec.slot as usize].store(rec.generation, Ordering::Relaxed);
    }

    /// Gives back the window range of a section this process deleted: every chunk of it that
    /// the registry has not handed to another section since becomes a bare reservation again.
    pub(crate) fn unmap_deleted(&self, rec: &SectionRecord) {
        let _guard = self.map_lock.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rec.slot as usize;
        // Relaxed: both words are only changed under `map_lock` (or are hints).
        if self.unmap_when_unused[slot].load(Ordering::Relaxed) != rec.generation
            || self.mapped[slot].load(Ordering::Relaxed) != rec.generation
            || self.handles[slot].load(Ordering::Acquire) != 0
        {
            return;
        }
        self.unmap_when_unused[slot].store(0, Ordering::Relaxed);
        self.mapped[slot].store(0, Ordering::Relaxed);
        note_unmap();
        for (off, len) in self.registry.free_runs(rec.offset, rec.span()) {
            // SAFETY: the range lies inside this process's window reservation, belongs to a
            // section that is deleted and no longer handed out by the registry, and this
            // process holds no `Section` handle to it (checked above under `map_lock`).
            let _ = unsafe { os::restore_reservation((self.window_base + off) as usize, len as usize) };
        }
    }

    /// Leaves the domain (see [`Domain::detach`]).
    fn teardown(&self) -> Result<()> {
        fault::unregister(self);
        let result = self.leave_registry();
        release_window(self.window_base, self.window_size);
        result
    }

    /// The registry part of leaving: releases this process's entry and, if no other live
    /// process is attached, deletes transient sections and then the registry if it is empty.
    fn leave_registry(&self) -> Result<()> {
        let _ident = self.ident_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _dir_lock = lock_dir(&self.shm_dir)?;
        let guard = self.registry.lock()?;
        // Only our own registration: a forked child's teardown never touches the parent's
        // entry (its inherited token was closed at fork), nor the reverse.
        if let t @ 1.. = self.ident.tag() {
            guard.unregister_proc(registry::ProcToken(t));
        }
        self.ident.clear();
        self.ident.set_window(0, 0);
        guard.reap_dead_procs();
        if guard.others_alive() {
            return Ok(());
        }
        let mut first_err = None;
        for rec in guard.all_entries() {
            // Transient sections end with their last process; so do unfinished ones (no process
            // is left that could finish them: this one holds no handle now).
            let unfinished = rec.state == registry::LIVE && !rec.ready;
            if rec.lifetime == Lifetime::Transient || unfinished {
                if let Err(e) = guard.remove(&rec) {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Any slot in use, even a damaged one, keeps the registry: removing it would orphan
        // the objects that slot may refer to.
        if !guard.any_slot_used() {
            let object = names::registry_object(&self.name);
            if let Err(e) = self.registry.dir().unlink_object(&object) {
                first_err.get_or_insert(Error::from_io(format!("cannot remove registry {object:?}"), e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn clone_dir(dir: &os::Dir) -> Result<os::Dir> {
    dir.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))
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

/// Reserves an existing domain's recorded window in this process.
fn claim_window(domain: &str, base: u64, size: u64) -> Result<()> {
    match os::reserve_fixed(base as usize, size as usize) {
        Ok(()) => Ok(()),
        Err(os::ReserveError::Occupied) => {
            let occupants = os::mappings_overlapping(base as usize, size as usize);
            let shown: Vec<&str> = occupants.iter().take(5).map(String::as_str).collect();
            bail!(
                WindowUnavailable,
                "cannot reserve domain {domain:?}'s window {base:#x}-{:#x} in this process: it is occupied by {}; \
                 the domain's pointers can only work at that address, so start this program with that range free \
                 (or use another domain)",
                base + size,
                if shown.is_empty() { "an unknown mapping".to_owned() } else { format!("[{}]", shown.join("; ")) }
            )
        }
        Err(os::ReserveError::Os(e)) => {
            Err(Error::from_io(format!("cannot reserve domain {domain:?}'s window {base:#x}+{size:#x}"), e))
        }
    }
}

/// Counts unmappings of section memory in this process. Thread caches of heap blocks
/// (`heap/cache.rs`) remember it, and one that finds it changed does not touch its heap again
/// (the heap may be gone from this process).
pub(crate) static UNMAP_EPOCH: AtomicU64 = AtomicU64::new(0);

pub(crate) fn note_unmap() {
    // Relaxed: a counter compared for equality only.
    UNMAP_EPOCH.fetch_add(1, Ordering::Relaxed);
}

fn release_window(base: u64, size: u64) {
    note_unmap();
    // SAFETY: the window is this process's own reservation (claimed by `claim_window` or
    // `choose_window`); it is released only when the attachment ends, after every Section
    // handle (which borrows the attachment) is gone.
    let _ = unsafe { os::unmap(base as usize, size as usize) };
}

/// Picks and reserves a window for a new domain: the requested base, or the first
/// `WINDOW_ALIGN`-aligned range at or above the default base that no other domain's registry
/// records and that is free in this process. The caller holds the directory lock, so no other
/// domain can be created meanwhile.
fn choose_window(shm_dir: &Path, dir: &os::Dir, name: &str, opts: &DomainOptions) -> Result<(u64, u64)> {
    let size = opts.window_size;
    let mut taken: Vec<(u64, u64, String)> = Vec::new();
    for file in os::list_dir(shm_dir).map_err(|e| dir_error(shm_dir, e))? {
        if let Some(names::ObjectName::Registry { domain }) = names::parse_object(&file) {
            if domain == name {
                continue;
            }
            // A private copy of the header, not a mapping: another user may shrink their
            // registry while we read it (see the registry's "Strangers").
            if let Ok(reg) = Registry::snapshot(clone_dir(dir)?, domain, true, false) {
                taken.push((reg.window_base, reg.window_base + reg.window_size, domain.to_owned()));
            }
        }
    }
    let overlapping = |lo: u64| taken.iter().find(|(b, e, _)| *b < lo + size && *e > lo).cloned();
    if let Some(base) = opts.window_base {
        if let Some((b, e, other)) = overlapping(base) {
            bail!(
                WindowUnavailable,
                "window {base:#x}-{:#x} overlaps domain {other:?}'s window {b:#x}-{e:#x}; choose another base or let shmgadget pick one",
                base + size
            );
        }
        claim_window(name, base, size)?;
        return Ok((base, size));
    }
    let mut base = registry::DEFAULT_WINDOW_BASE;
    while base + size <= os::USER_ADDRESS_LIMIT {
        if let Some((_, end, _)) = overlapping(base) {
            base = end.next_multiple_of(registry::WINDOW_ALIGN);
            continue;
        }
        match os::reserve_fixed(base as usize, size as usize) {
            Ok(()) => return Ok((base, size)),
            Err(os::ReserveError::Occupied) => base += registry::WINDOW_ALIGN,
            Err(os::ReserveError::Os(e)) => {
                return Err(Error::from_io("cannot reserve an address window", e));
            }
        }
    }
    bail!(
        WindowUnavailable,
        "no free window of {size} bytes above {:#x} for domain {name:?} ({} other domains exist); remove unused domains with `shmgadget gc`, or use smaller windows",
        registry::DEFAULT_WINDOW_BASE,
        taken.len()
    )
}

/// See [`crate::ensure_mapped`].
pub(crate) fn ensure_mapped(start: usize, len: usize) -> Result<()> {
    let end = start.checked_add(len).ok_or_else(|| {
        Error::new(ErrorKind::InvalidArgument, format!("address range {start:#x}+{len:#x} overflows"))
    })?;
    // Real handles (not bare Arcs): if every other handle goes away meanwhile, dropping these
    // still detaches the domain properly.
    let domains: Vec<Domain> = attached().values().map(|inner| Domain { inner: inner.clone() }).collect();
    let mut at = start;
    loop {
        let Some(domain) = domains.iter().find(|d| d.contains(at)) else {
            bail!(InvalidArgument, "address {at:#x} is not inside the window of any domain attached in this process");
        };
        let inner = &domain.inner;
        let off = (at - inner.window_base as usize) as u64;
        let rec = inner.registry.lookup_offset(off).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no live section of domain {:?} covers address {at:#x}", inner.name),
            )
        })?;
        if !inner.is_mapped(&rec) {
            drop(Section::open_record(domain.clone(), rec)?);
        }
        at = (inner.window_base + rec.offset + rec.reserved) as usize;
        if at >= end {
            return Ok(());
        }
    }
}

/// The section covering `addr` in a domain attached by this process, opened (and mapped).
pub(crate) fn section_at(addr: usize) -> Result<Section> {
    let domains: Vec<Domain> = attached().values().map(|inner| Domain { inner: inner.clone() }).collect();
    let Some(domain) = domains.iter().find(|d| d.contains(addr)) else {
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

/// The attachment whose window holds `addr`, if this process has one (a bare `Arc`: dropping it
/// never detaches).
pub(crate) fn attachment_covering(addr: usize) -> Option<Arc<DomainInner>> {
    let table = attached();
    table
        .values()
        .find(|d| addr >= d.window_base as usize && addr - (d.window_base as usize) < d.window_size as usize)
        .cloned()
}

/// The name of the attached domain whose window holds `addr` (for messages).
pub(crate) fn domain_name_at(addr: usize) -> Option<String> {
    attachment_covering(addr).map(|inner| inner.name.clone())
}

/// This process's token in the domain whose window holds `addr`, 0 if none does (lock-free,
/// no system call: lock owners record it on every lock).
#[inline]
pub(crate) fn token_at(addr: usize) -> u64 {
    os::token_for_address(addr)
}

/// Whether `token` is alive in the domain whose window holds `addr` (None: no such domain).
pub(crate) fn token_alive_at(addr: usize, token: u64) -> Option<bool> {
    attachment_covering(addr).map(|inner| inner.registry.proc_alive(token))
}

/// The start address, kind and reserved length of the live section covering `addr`, in a domain attached by
/// this process, mapped in this process: if it is not yet, it is mapped now (in an eager domain
/// nothing would map it on first touch, and mapping here turns any failure into an error
/// instead of a crash). When it is mapped already this adds one relaxed load.
pub(crate) fn section_covering(addr: usize) -> Result<(u64, crate::registry::SectionKind, u64)> {
    let (domain, rec) = {
        let table = attached();
        let Some(inner) = table
            .values()
            .find(|d| addr >= d.window_base as usize && addr - (d.window_base as usize) < d.window_size as usize)
        else {
            bail!(InvalidArgument, "address {addr:#x} is not inside the window of any domain attached in this process");
        };
        let off = (addr - inner.window_base as usize) as u64;
        let rec = inner.registry.lookup_offset(off).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no live section of domain {:?} covers address {addr:#x}", inner.name),
            )
        })?;
        if inner.is_mapped(&rec) {
            return Ok((inner.window_base + rec.offset, rec.kind, rec.reserved));
        }
        // A real handle, dropped after the table lock (its drop may detach the domain).
        (Domain { inner: inner.clone() }, rec)
    };
    drop(Section::open_record(domain.clone(), rec)?);
    Ok((domain.inner.window_base + rec.offset, rec.kind, rec.reserved))
}

/// For code that reads section memory found from a bare address (a heap header behind a
/// `ShmAlloc` read from shared memory, a block handed over through a queue): makes sure
/// `[addr, addr + len)` is mapped when this process has an eager domain attached, where no
/// handler maps sections on first touch. Without an eager domain this is one relaxed load and
/// the handler maps on first touch as usual.
#[inline]
pub(crate) fn map_for_address(addr: usize, len: usize) -> Result<()> {
    if !fault::eager_domains_attached() || fault::range_mapped(addr, len) {
        return Ok(());
    }
    ensure_mapped(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DomainOptions {
        DomainOptions { window_size: 64 << 20, max_procs: 4, ..Default::default() }
    }

    #[test]
    fn a_token_names_one_registration_never_a_later_user_of_its_slot() {
        let name = format!("u-ident-{}", std::process::id());
        let d = Domain::attach_with(&name, &opts()).unwrap();
        let first = d.peer_token();
        assert_ne!(first, 0);
        assert!(d.peer_alive(first), "our own token is seen held (the query descriptor holds no lock)");
        assert_eq!(d.peer_token(), first, "stable while attached");
        // Keep the domain (a persistent section) and attach again: same slot, new incarnation.
        let s = d.create_section("keep", 4096, &SectionOptions::default()).unwrap();
        drop(s);
        d.detach().unwrap();
        let d = Domain::attach_with(&name, &opts()).unwrap();
        let second = d.peer_token();
        assert_ne!(second, first, "a new registration has a new token");
        assert!(!d.peer_alive(first), "the earlier registration is dead, though its slot is in use again");
        assert!(d.peer_alive(second));
        assert!(!d.peer_alive(0) && !d.peer_alive(NO_TOKEN), "nobody");
        assert_eq!(d.peer_pid(second), os::current_pid());
        d.delete_section("keep").unwrap();
        d.detach().unwrap();
    }
}
