//! Looking at domains from outside, and cleaning up after dead processes.
//!
//! Nothing here attaches: registries are mapped read-only and their entries copied out through
//! the same validated, seqlocked readers the library uses, so inspecting a domain reserves no
//! window, registers no process and cannot disturb its users. Only [`gc`] writes, under the
//! shm-directory lock and the registry lock, exactly as a detaching process would.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::domain::resolve_shm_dir;
use crate::error::{Error, ErrorKind, Result};
use crate::names::{self, ObjectName};
use crate::os;
use crate::registry::{self, Lifetime, ProcRecord, Registry};
use crate::section::SectionInfo;

/// A process attached to a domain.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    /// Process id when it attached.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Attach time, seconds since the Unix epoch.
    pub attached_at: u64,
    /// Whether its liveness token is still held (false: it died without detaching).
    pub alive: bool,
}

impl ProcessInfo {
    pub(crate) fn from_record(p: &ProcRecord) -> ProcessInfo {
        ProcessInfo { pid: p.pid, uid: p.uid, attached_at: p.attached_at, alive: p.alive }
    }
}

/// A snapshot of one domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainReport {
    /// Name.
    pub name: String,
    /// Window base address.
    pub window_base: u64,
    /// Window size in bytes.
    pub window_size: u64,
    /// Section-table capacity.
    pub max_sections: u32,
    /// Process-table capacity.
    pub max_procs: u32,
    /// Registry mode bits.
    pub mode: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Live sections.
    pub sections: Vec<SectionInfo>,
    /// Attached processes, live or dead.
    pub processes: Vec<ProcessInfo>,
}

/// One line of [`list_domains`]: a domain, or a registry that could not be read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DomainEntry {
    /// A readable domain.
    Ok(DomainReport),
    /// A registry that failed validation or could not be opened.
    Unreadable {
        /// Domain name from the file name.
        name: String,
        /// Why.
        error: String,
    },
}

fn open_registry(dir: &Path, domain: &str, writable: bool, allow_foreign: bool) -> Result<Registry> {
    let fd =
        os::open_dir(dir).map_err(|e| Error::from_io(format!("cannot open the shm directory {}", dir.display()), e))?;
    Registry::open(fd, domain, writable, allow_foreign)
}

fn report(reg: &Registry) -> DomainReport {
    DomainReport {
        name: reg.domain().to_owned(),
        window_base: reg.window_base,
        window_size: reg.window_size,
        max_sections: reg.max_sections,
        max_procs: reg.max_procs,
        mode: reg.mode,
        created_at: reg.created_at,
        sections: reg
            .entries()
            .iter()
            .filter(|r| r.state == registry::LIVE)
            .map(|r| SectionInfo::from_record(reg, r))
            .collect(),
        processes: reg.procs().iter().map(ProcessInfo::from_record).collect(),
    }
}

/// Describes one domain without attaching to it. `shm_dir` `None` means the default
/// (`SHMGADGET_SHM_DIR` or `/dev/shm`).
pub fn inspect_domain(domain: &str, shm_dir: Option<&Path>) -> Result<DomainReport> {
    names::validate(domain, "domain")?;
    let dir = resolve_shm_dir(shm_dir);
    Ok(report(&open_registry(&dir, domain, false, true)?))
}

/// Every domain with a registry in the shm directory.
pub fn list_domains(shm_dir: Option<&Path>) -> Result<Vec<DomainEntry>> {
    let dir = resolve_shm_dir(shm_dir);
    let mut files = os::list_dir(&dir).map_err(|e| Error::from_io(format!("cannot list {}", dir.display()), e))?;
    files.sort();
    Ok(files
        .iter()
        .filter_map(|f| match names::parse_object(f) {
            Some(ObjectName::Registry { domain }) => Some(domain.to_owned()),
            _ => None,
        })
        .map(|domain| match open_registry(&dir, &domain, false, true) {
            Ok(reg) => DomainEntry::Ok(report(&reg)),
            Err(e) => DomainEntry::Unreadable { name: domain, error: e.to_string() },
        })
        .collect())
}

/// What [`gc`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// `(domain, pid)` of dead processes whose attachment was cleared.
    pub dead_processes: Vec<(String, u32)>,
    /// `(domain, section, creator pid)` of sections that never became ready and whose creator
    /// is dead (it died while creating them), removed.
    pub removed_unfinished: Vec<(String, String, u32)>,
    /// `(domain, section)` of transient sections removed.
    pub removed_sections: Vec<(String, String)>,
    /// Domains whose registry was removed.
    pub removed_domains: Vec<String>,
    /// Backing objects no registry refers to, removed.
    pub removed_orphans: Vec<String>,
    /// `(domain, reason)` of domains left alone.
    pub skipped: Vec<(String, String)>,
}

/// Removes what dead processes left behind, in one domain or (`domain` `None`) all of them:
/// sections that never became ready because their creator died (even while other processes
/// live); registries left unfinished by a creator that died; attachments of dead processes;
/// transient sections of domains with no live process; registries with no live process and no
/// persistent section; backing objects that no registry refers to. With `force`, also removes
/// registries that fail validation (use only when no process uses them).
pub fn gc(domain: Option<&str>, shm_dir: Option<&Path>, force: bool) -> Result<GcReport> {
    if let Some(d) = domain {
        names::validate(d, "domain")?;
    }
    let dir: PathBuf = resolve_shm_dir(shm_dir);
    let lock_fd = os::open_dir(&dir)
        .map_err(|e| Error::from_io(format!("cannot open the shm directory {}", dir.display()), e))?;
    os::lock_exclusive(os::borrow(&lock_fd)).map_err(|e| Error::from_io("cannot lock the shm directory", e))?;
    let dir_fd = os::open_dir(&dir).map_err(|e| Error::from_io("cannot open the shm directory", e))?;
    let files = os::list_dir(&dir).map_err(|e| Error::from_io(format!("cannot list {}", dir.display()), e))?;
    let mut out = GcReport::default();
    let mut registries: Vec<String> = files
        .iter()
        .filter_map(|f| match names::parse_object(f) {
            Some(ObjectName::Registry { domain: d }) if domain.is_none_or(|want| want == d) => Some(d.to_owned()),
            _ => None,
        })
        .collect();
    registries.sort();
    // Domains whose registry survives, with the (generation, name) of their sections.
    let mut kept: Vec<(String, Vec<(u64, String)>)> = Vec::new();
    for d in &registries {
        let reg = match open_registry(&dir, d, true, false) {
            Ok(reg) => reg,
            // Unfinished (its creator died while creating it; we hold the directory lock every
            // creator holds), or corrupt and the caller forces it.
            Err(e) if e.kind() == ErrorKind::Corrupt && (force || Registry::is_unfinished(&dir_fd, d)) => {
                os::unlink_object(os::borrow(&dir_fd), &names::registry_object(d))
                    .map_err(|e| Error::from_io("cannot remove a corrupt registry", e))?;
                out.removed_domains.push(d.clone());
                continue;
            }
            Err(e) => {
                out.skipped.push((d.clone(), e.to_string()));
                kept.push((d.clone(), Vec::new()));
                continue;
            }
        };
        let guard = reg.lock()?;
        // Sections whose creator died before making them ready: nobody can finish them. The
        // creator's token is checked under the lock, so a live creator is never robbed.
        for rec in guard.all_entries() {
            if rec.state == registry::LIVE && !rec.ready && !reg.proc_alive(rec.creator_token) {
                guard.remove(&rec)?;
                out.removed_unfinished.push((d.clone(), rec.name.as_str().to_owned(), rec.creator_pid));
            }
        }
        for pid in guard.reap_dead_procs() {
            out.dead_processes.push((d.clone(), pid));
        }
        if !guard.others_alive() {
            for rec in guard.all_entries() {
                if rec.lifetime == Lifetime::Transient || rec.state != registry::LIVE {
                    guard.remove(&rec)?;
                    if rec.state == registry::LIVE {
                        out.removed_sections.push((d.clone(), rec.name.as_str().to_owned()));
                    }
                }
            }
        }
        let sections: Vec<(u64, String)> =
            guard.all_entries().iter().map(|r| (r.generation, r.name.as_str().to_owned())).collect();
        if sections.is_empty() && !guard.others_alive() {
            os::unlink_object(os::borrow(&dir_fd), &names::registry_object(d))
                .map_err(|e| Error::from_io("cannot remove a registry", e))?;
            out.removed_domains.push(d.clone());
        } else {
            kept.push((d.clone(), sections));
        }
    }
    // Objects of domains we looked at (or of domains with no registry at all) that no entry
    // refers to. Creation happens under the registry lock after the directory lock we hold, so
    // nothing is half-created now.
    for f in &files {
        if let Some(ObjectName::Section { domain: d, generation, section }) = names::parse_object(f) {
            if domain.is_some_and(|want| want != d) {
                continue;
            }
            let referenced = match kept.iter().find(|(k, _)| k == d) {
                Some((_, secs)) => {
                    secs.is_empty() && out.skipped.iter().any(|(s, _)| s == d)
                        || secs.iter().any(|(g, n)| *g == generation && n == section)
                }
                None => false,
            };
            if !referenced {
                match os::unlink_object(os::borrow(&dir_fd), f) {
                    Ok(()) => out.removed_orphans.push(f.clone()),
                    Err(e) if e.raw_os_error() == Some(2) => {}
                    Err(e) => {
                        return Err(Error::from_io(format!("cannot remove orphan object {f:?}"), e));
                    }
                }
            }
        }
    }
    Ok(out)
}
