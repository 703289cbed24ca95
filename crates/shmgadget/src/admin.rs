//! Administering whole domains: create one made to last (with its mode, window and limits),
//! remove one with everything it holds, and describe one (owner, limits, attached processes).
//!
//! # Kept domains
//! A domain made by [`Domain::attach_with`] lives while it has a section or an attached
//! process: the last process to leave an empty domain removes its registry, and so does `gc`.
//! A domain made by [`create_domain`] is *kept*: it stays, empty and unattached, until
//! [`remove_domain`]. The mark is a flag in the registry header (`FLAG_KEPT`, registry
//! layout 7), set under the registry lock by the creator while it is attached and before any
//! other process is told the domain exists, and never cleared (the registry goes as a whole).
//! Every decision to remove an empty registry (the last detach, `gc`) reads it under the same
//! lock. (Until layout 6 the mark was the registry object's sticky bit, which Windows files do
//! not have.) The mode bits (`0o777`) of the registry are its permissions: who may attach. Sections made
//! later default to the same bits ([`crate::SectionOptions::DOMAIN_MODE`]).
//!
//! # Removal
//! [`remove_domain`] holds the shm directory's lock (so nothing attaches or is created
//! meanwhile) and the registry lock with a bounded wait, refuses while a process holds its
//! liveness token unless forced, removes every entry (unlinking its object), then every other
//! object named for the domain (damaged entries' objects, orphans), then the registry. A
//! process that is still attached (only with `force`) keeps what it has mapped; the domain's
//! names are gone, so nothing new can join it, and a process attaching later makes a new one.

use std::path::Path;

use serde::Serialize;

use crate::attachment::resolve_shm_dir;
use crate::error::{Error, ErrorKind, Result};
use crate::inspect::{self, DomainReport};
use crate::names::{self, ObjectName};
use crate::os::{self, ErrorExt};
use crate::registry::Registry;
use crate::{Domain, DomainOptions};

/// How long [`remove_domain`] waits for the registry lock before giving up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the registry object itself says about a domain (beyond [`DomainReport`]).
#[derive(Debug, Clone, Serialize)]
pub struct DomainDetails {
    /// The domain as `ls` sees it.
    pub report: DomainReport,
    /// Owner of the registry object: the user who created the domain.
    pub owner_uid: u32,
    /// Whether the domain is kept while empty (made by [`create_domain`]).
    pub kept: bool,
    /// Bytes of the registry object (its apparent size).
    pub registry_bytes: u64,
}

fn open_dir(dir: &Path) -> Result<os::Dir> {
    os::Dir::open(dir).map_err(|e| Error::from_io(format!("cannot open the shm directory {}", dir.display()), e))
}

/// Describes domain `name` without attaching: [`inspect::inspect_domain`] plus its owner, its
/// kept mark and its registry's size.
pub fn domain_details(name: &str, shm_dir: Option<&Path>) -> Result<DomainDetails> {
    let report = inspect::inspect_domain(name, shm_dir)?;
    let dir = open_dir(&resolve_shm_dir(shm_dir))?;
    let fd = dir
        .open_object(&names::registry_object(name), os::Access::Read)
        .map_err(|e| Error::from_io(format!("cannot open the registry of domain {name:?}"), e))?;
    let st = fd.stat().map_err(|e| Error::from_io("cannot stat the registry", e))?;
    // The header only (no tables); another user's domain is readable here as `ls` reads it.
    let kept = Registry::snapshot(dir, name, true, false)?.is_kept();
    Ok(DomainDetails { report, owner_uid: st.uid, kept, registry_bytes: st.size })
}

/// Creates domain `name` with `opts` (its `mode` decides who may attach and is the default
/// mode of its sections; `window_size`, `max_sections`, `max_procs` its limits) and marks it
/// kept: it stays, empty and unattached, until [`remove_domain`]. `AlreadyExists` if a domain
/// of that name exists (its settings are frozen at creation).
pub fn create_domain(name: &str, opts: &DomainOptions) -> Result<DomainDetails> {
    names::validate(name, "domain")?;
    let shm_dir = opts.resolved_shm_dir();
    let dir = open_dir(&shm_dir)?;
    let exists = || dir.open_object(&names::registry_object(name), os::Access::Read).is_ok();
    let taken = || {
        Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "domain {name:?} exists already (its mode and limits were fixed when it was made); \
                 `shmgadget info --domain {name}` shows them, `shmgadget domain rm {name}` removes it"
            ),
        )
    };
    if exists() {
        return Err(taken());
    }
    let domain = Domain::attach_with(name, &DomainOptions { must_exist: false, ..opts.clone() })?;
    // The kept mark, set while this process is attached (so no detach can remove the empty
    // registry meanwhile) and before anyone is told the domain exists; and the registry's
    // mode exactly as asked (the umask may have narrowed it at creation).
    let object = names::registry_object(name);
    let marked = domain.mark_kept().and_then(|()| {
        dir.open_object(&object, os::Access::ReadWrite)
            .and_then(|fd| fd.set_mode(opts.sharing.posix_mode() & 0o777))
            .map_err(|e| Error::from_io(format!("cannot set the mode of domain {name:?}"), e))
    });
    let fresh = domain.processes().len() == 1 && domain.sections().is_empty();
    let detached = domain.detach();
    marked?;
    detached?;
    if !fresh {
        // Another process made it between our look and our attach: it is theirs, with their
        // settings (we marked it kept, which a `domain rm` undoes).
        return Err(taken());
    }
    domain_details(name, Some(&shm_dir))
}

/// What [`remove_domain`] removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemovedDomain {
    /// The sections, by name.
    pub sections: Vec<String>,
    /// Every object unlinked (sections, leftovers, the registry last).
    pub objects: Vec<String>,
    /// Live processes that were attached (only with `force`).
    pub attached: Vec<u32>,
}

/// Removes domain `name` and everything of it: every section, every object named for it, its
/// registry. Refused (`InvalidArgument`, naming the pids) while a live process is attached,
/// unless `force`; see "Removal". `allow_foreign_owner` lets root remove another user's domain.
pub fn remove_domain(
    name: &str,
    shm_dir: Option<&Path>,
    force: bool,
    allow_foreign_owner: bool,
) -> Result<RemovedDomain> {
    names::validate(name, "domain")?;
    let path = resolve_shm_dir(shm_dir);
    let _dir_lock =
        os::DirLock::acquire(open_dir(&path)?).map_err(|e| Error::from_io("cannot lock the shm directory", e))?;
    let dir = open_dir(&path)?;
    let reg = Registry::open(open_dir(&path)?, name, os::Access::ReadWrite, allow_foreign_owner).map_err(|e| {
        if e.kind() == ErrorKind::Corrupt {
            Error::new(
                ErrorKind::Corrupt,
                format!("{e}; `shmgadget domain rm` removes only readable domains, `shmgadget gc --domain {name} --force` removes a damaged one nobody uses"),
            )
        } else {
            e
        }
    })?;
    let mut out = RemovedDomain::default();
    {
        let guard = reg.lock_within(LOCK_WAIT)?;
        guard.reap_dead_procs();
        let live: Vec<u32> = reg.procs().iter().filter(|p| p.alive).map(|p| p.pid).collect();
        if !live.is_empty() && !force {
            let pids = live.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "domain {name:?} is in use by {} live process{} (pid {pids}), so nothing was removed; \
                     stop them, or `shmgadget domain rm {name} --force` removes it under them \
                     (they keep what they have mapped)",
                    live.len(),
                    if live.len() == 1 { "" } else { "es" }
                ),
            ));
        }
        out.attached = live;
        for rec in guard.all_entries() {
            guard.remove(&rec)?;
            out.sections.push(rec.name.as_str().to_owned());
            out.objects.push(names::section_object(name, rec.generation, rec.name.as_str()));
        }
    }
    drop(reg);
    let files = os::list_dir(&path).map_err(|e| Error::from_io(format!("cannot list {}", path.display()), e))?;
    for f in &files {
        if let Some(ObjectName::Section { domain, .. }) = names::parse_object(f) {
            if domain == name && !out.objects.contains(f) {
                match dir.unlink_object(f) {
                    Ok(()) => out.objects.push(f.clone()),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(Error::from_io(format!("cannot remove object {f:?} of domain {name:?}"), e)),
                }
            }
        }
    }
    let object = names::registry_object(name);
    dir.unlink_object(&object)
        .map_err(|e| Error::from_io(format!("cannot remove the registry of domain {name:?}"), e))?;
    out.objects.push(object);
    Ok(out)
}
