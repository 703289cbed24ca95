//! Attachments: this process's registration in one domain.
//!
//! An [`Attachment`] is what attaching made: the domain's registry mapped, its address window
//! reserved in this process, a process slot with its liveness token (the registration), and
//! the per-slot [`Mapping`] of its sections. It imports only the registry and `os` (plus the
//! leaf modules `error` and `names`); the public handle over it is [`crate::Domain`], and the
//! process's table of attachments, the fault handler's table and sections live above it.
//!
//! # Identity, and fork
//! An attachment's identity is its registration in the registry: a process slot and the
//! liveness token held through an object handle of its own, kept in an [`os::TokenCell`]
//! (`Domain::peer_token` names it; `Domain::peer_alive` asks whether a token is still held).
//! Pids are recorded for display only.
//!
//! A forked child must not share its parent's identity (DESIGN, "Pitfalls": it would keep the
//! parent "alive", and its exit would release the parent's token). So before every fork the
//! prepare hook registers one new slot per attached domain ([`Attachment::prepare_fork_child`])
//! and hands it to the token cell as *pending*; the parent handler closes the parent's copy
//! (the child's copy alone now holds that lock), and the child handler closes the inherited
//! handles of the parent's tokens and adopts the pending ones (see `os`). So a child is a
//! participant of its own from its first instruction, a parent that dies is seen dead while its
//! children live, and neither's detach touches the other's entry. If the pending registration
//! could not be made (registry full), the child has no token, and its first call that needs one
//! ([`Attachment::token`]) registers it then.
//!
//! Lock order: the process's attachment table (in `domain`) → `ident_lock` → the shm
//! directory's lock ([`os::DirLock`]) → registry lock. The directory lock serialises creating,
//! joining and deleting registries, so a registry is never unlinked while someone is joining
//! it and two new domains never pick the same window.

mod mapping;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result, bail};
use crate::names;
use crate::os::{self, ErrorExt};
use crate::registry::{self, Lifetime, Registry, SectionRecord};
use crate::sync::robust::my_namespace;

pub(crate) use mapping::{FaultIn, Mapping, UNMAP_EPOCH, note_unmap};

/// Default shm directory (`/dev/shm` on Linux, `C:\\ProgramData\\shmgadget` on Windows).
pub const DEFAULT_SHM_DIR: &str = os::DEFAULT_SHM_DIR;

/// A token that is never alive: what [`Attachment::token`] returns when this process cannot
/// register (the registry is full or gone), so peers see it as gone rather than as someone else.
pub(crate) const NO_TOKEN: u64 = u64::MAX;

pub(crate) fn resolve_shm_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SHMGADGET_SHM_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SHM_DIR))
}

/// This process's registration in one domain (see the module docs).
pub(crate) struct Attachment {
    pub(crate) name: String,
    pub(crate) shm_dir: PathBuf,
    /// This process's registration: its current token (0 until registered, e.g. in a forked
    /// child whose registration failed). Written under `ident_lock` and by the fork handlers.
    /// Declared before `registry` so it is dropped (its pending token cleared) before the
    /// registry is unmapped: the fork handlers write into the registry (see
    /// [`Attachment::prepare_fork_child`]).
    pub(crate) ident: os::TokenCell,
    pub(crate) registry: Registry,
    /// Serialises registering and releasing `ident` in this process.
    ident_lock: Mutex<()>,
    pub(crate) window_base: u64,
    pub(crate) window_size: u64,
    pub(crate) allow_foreign_owner: bool,
    /// Whether the fault handler maps this domain's sections on first touch (else eager).
    pub(crate) first_touch: bool,
    /// Which sections are mapped in this process, and their handles.
    pub(crate) mapping: Mapping,
}

impl Attachment {
    /// Registers this process in `registry` (whose window the caller has reserved) and builds
    /// the attachment. On failure the window is released again.
    pub(crate) fn register(
        name: &str,
        shm_dir: PathBuf,
        registry: Registry,
        allow_foreign_owner: bool,
        first_touch: bool,
    ) -> Result<Attachment> {
        let registered = os::TokenCell::new()
            .map_err(|e| Error::from_io("cannot hold one more liveness token", e))
            .and_then(|cell| registry.lock()?.register_proc(os::current_pid(), my_namespace()).map(|t| (cell, t)));
        let ident = match registered {
            Ok((cell, (token, object))) => {
                cell.install(object, token.0);
                cell.set_window(registry.window_base as usize, registry.window_size as usize);
                cell
            }
            Err(e) => {
                release_window(registry.window_base, registry.window_size);
                return Err(e);
            }
        };
        Ok(Attachment {
            name: name.to_owned(),
            shm_dir,
            window_base: registry.window_base,
            window_size: registry.window_size,
            mapping: Mapping::new(registry.window_base, registry.max_sections),
            ident,
            registry,
            ident_lock: Mutex::new(()),
            allow_foreign_owner,
            first_touch,
        })
    }

    /// Whether `addr` lies inside this domain's window.
    #[inline]
    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr >= self.window_base as usize && addr - (self.window_base as usize) < self.window_size as usize
    }

    /// This process's token (see `Domain::peer_token`); registers first if it has none (a
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
            let (token, object) = self.registry.lock()?.register_proc(os::current_pid(), my_namespace())?;
            self.ident.install(object, token.0);
            Ok(token.0)
        });
        registered.unwrap_or_else(|e| {
            eprintln!("shmgadget: process {} cannot register in domain {:?}: {e}", os::current_pid(), self.name);
            NO_TOKEN
        })
    }

    /// From the fork prepare hook: makes a registration for the child of the fork about to
    /// happen and hands it to the token cell as pending (see the module docs). Best effort.
    pub(crate) fn prepare_fork_child(&self) {
        let _ident = self.ident_lock.lock().unwrap_or_else(|p| p.into_inner());
        // The child's namespace is ours unless this process unshared a new one for children.
        let child_ns = if os::children_share_pid_namespace() { my_namespace() } else { 0 };
        let Ok(guard) = self.registry.lock() else { return };
        let Ok((token, object)) = guard.register_proc(os::current_pid(), child_ns) else { return };
        let Some(pid_word) = self.registry.proc_pid_word(token.0) else { return };
        // SAFETY: the pid word lies in the registry mapping. Before that mapping goes away the
        // pending token is cleared (teardown clears the cell, and `ident` is dropped before
        // `registry`), and `munmap` follows that clearing in program order; `fork` copies the
        // address space atomically with respect to `munmap` (both hold the mm lock). So a
        // child whose copy still has the pending token also has the mapping.
        unsafe { self.ident.set_pending(object, token.0, pid_word) };
    }

    /// Opens section `rec`'s object and checks it is the one to map (a regular file of the
    /// recorded size, owned by this user unless foreign owners are accepted). A link object
    /// (file-backed section) is followed to its file, share-locked (`crate::file_section`);
    /// the third value is where the section's bytes start in the returned object.
    fn open_section_object(&self, rec: &SectionRecord) -> Result<(os::Object, os::ObjectId, u64)> {
        let object = names::section_object(&self.name, rec.generation, rec.name.as_str());
        let name = rec.name.as_str();
        let obj = self.registry.dir().open_object(&object, os::Access::ReadWrite).map_err(|e| {
            if e.is_not_found() {
                Error::new(ErrorKind::NotFound, format!("section {name:?} was deleted (its object {object:?} is gone)"))
            } else {
                Error::from_io(format!("cannot open section {name:?}"), e)
            }
        })?;
        let st = obj.stat().map_err(|e| Error::from_io("cannot stat a section", e))?;
        let (obj, st, data_offset) = if crate::file_section::is_link(&st) {
            let b = crate::file_section::resolve(name, &obj, &st)?;
            (b.object, b.stat, crate::file_section::data_offset())
        } else {
            (obj, st, 0)
        };
        if st.uid != os::effective_uid() && !self.allow_foreign_owner {
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
        Ok((obj, st.identity, data_offset))
    }

    /// Maps `object` at section `rec`'s place unless it is mapped already, takes one handle on
    /// it (released with [`Attachment::release_handle`]) and closes `object`: the mapping keeps
    /// the object alive.
    fn map_object_held(&self, rec: &SectionRecord, object: os::Object, data_offset: u64) -> Result<()> {
        self.mapping
            .map_held(rec, &object, data_offset)
            .map_err(|e| Error::from_io(format!("cannot map section {:?}", rec.name.as_str()), e))
    }

    /// Maps the object of a section this process just created and takes one handle on it;
    /// returns the object's identity.
    pub(crate) fn map_new_held(
        &self,
        rec: &SectionRecord,
        object: os::Object,
        data_offset: u64,
    ) -> Result<os::ObjectId> {
        let id = object
            .stat()
            .map(|st| st.identity)
            .map_err(|e| Error::from_io(format!("cannot stat section {:?}'s new object", rec.name.as_str()), e))?;
        self.map_object_held(rec, object, data_offset)?;
        Ok(id)
    }

    /// Opens, checks and maps an existing section and takes one handle on it; returns its
    /// object's identity.
    pub(crate) fn open_held(&self, rec: &SectionRecord) -> Result<os::ObjectId> {
        let (object, id, data_offset) = self.open_section_object(rec)?;
        self.map_object_held(rec, object, data_offset)?;
        Ok(id)
    }

    /// Makes sure section `rec` is mapped in this process (no handle kept).
    pub(crate) fn ensure_mapped(&self, rec: &SectionRecord) -> Result<()> {
        if self.mapping.is_mapped(rec) {
            return Ok(());
        }
        self.open_held(rec)?;
        self.release_handle(rec);
        Ok(())
    }

    /// Releases a handle taken by [`Attachment::map_new_held`]/[`Attachment::open_held`].
    pub(crate) fn release_handle(&self, rec: &SectionRecord) {
        self.mapping.release(rec, &self.registry);
    }

    /// After `rec` was removed from the registry: unmaps it from this process now, or when
    /// this process's last handle to it is released.
    pub(crate) fn forget_removed(&self, rec: &SectionRecord) {
        self.mapping.forget_removed(rec, &self.registry);
    }

    /// The registry part of leaving: releases this process's entry and, if no other live
    /// process is attached, deletes transient sections and then the registry if it is empty.
    pub(crate) fn leave_registry(&self) -> Result<()> {
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
        // the objects that slot may refer to. So does a domain made to last (`domain create`).
        if !guard.any_slot_used() && !self.registry.is_kept() {
            let object = names::registry_object(&self.name);
            if let Err(e) = self.registry.dir().unlink_object(&object) {
                first_err.get_or_insert(Error::from_io(format!("cannot remove registry {object:?}"), e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Takes the shm directory's lock (see the lock order in the module docs).
pub(crate) fn lock_dir(dir: &Path) -> Result<os::DirLock> {
    let handle = os::Dir::open(dir).map_err(|e| dir_error(dir, e))?;
    os::DirLock::acquire(handle)
        .map_err(|e| Error::from_io(format!("cannot lock the shm directory {}", dir.display()), e))
}

pub(crate) fn dir_error(dir: &Path, e: std::io::Error) -> Error {
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

/// Reserves an existing domain's recorded window in this process.
pub(crate) fn claim_window(domain: &str, base: u64, size: u64) -> Result<()> {
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

/// Releases this process's reservation of a window.
pub(crate) fn release_window(base: u64, size: u64) {
    note_unmap();
    // SAFETY: the window is this process's own reservation (claimed by `claim_window` or
    // `choose_window`); it is released only when the attachment ends, after every Section
    // handle (which borrows the attachment) is gone.
    let _ = unsafe { os::unmap(base as usize, size as usize) };
}
