//! Looking at domains from outside, and cleaning up after dead processes.
//!
//! Nothing here attaches: registries are read with `pread` into private memory (never mapped,
//! so an owner that truncates or rewrites its registry meanwhile cannot crash us) and their
//! entries copied out through the same validated, seqlocked readers the library uses, so
//! inspecting a domain reserves no window, registers no process and cannot disturb its users.
//! Entries that fail validation are listed as damaged, with what failed, never hidden.
//!
//! Only [`gc`] writes, under the shm-directory lock and the registry lock (taken with a bounded
//! wait), exactly as a detaching process would, and it never deletes what it cannot prove
//! dead: a domain whose registry, entries or tables fail validation is reported and left
//! alone (its objects included) unless forced; the orphan sweep removes an object only when
//! its domain's registry is sound and records no entry for that object's generation.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::attachment::resolve_shm_dir;
use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result};
use crate::names::{self, ObjectName};
use crate::os::{self, ErrorExt};
use crate::registry::{self, DamagedEntry, Lifetime, ProcRecord, Registry, SectionKind};
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

impl Domain {
    /// The processes attached to the domain, with their liveness.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        // Registers a forked child that is not yet, so it lists itself.
        self.inner.token();
        self.inner.registry.procs().iter().map(ProcessInfo::from_record).collect()
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
    /// Section slots in use that fail validation (listed, never hidden).
    pub damaged: Vec<DamagedEntry>,
    /// Damage to the registry as a whole.
    pub problems: Vec<String>,
    /// Other domains of the same shm directory whose windows overlap this one's (filled by
    /// [`list_domains`]; a process can attach only one of them). Empty from [`inspect_domain`].
    pub overlaps: Vec<WindowOverlap>,
}

/// Another domain whose window overlaps a domain's (see [`DomainReport::overlaps`]).
#[derive(Debug, Clone, Serialize)]
pub struct WindowOverlap {
    /// Its name.
    pub domain: String,
    /// Its window base address.
    pub window_base: u64,
    /// Its window size in bytes.
    pub window_size: u64,
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

/// How long `gc` waits for a registry lock before reporting the domain instead of hanging.
const GC_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_dir(dir: &Path) -> Result<os::Dir> {
    os::Dir::open(dir).map_err(|e| Error::from_io(format!("cannot open the shm directory {}", dir.display()), e))
}

fn report(reg: &Registry) -> DomainReport {
    let scan = reg.scan(false);
    DomainReport {
        name: reg.domain().to_owned(),
        window_base: reg.window_base,
        window_size: reg.window_size,
        max_sections: reg.max_sections,
        max_procs: reg.max_procs,
        mode: reg.mode,
        created_at: reg.created_at,
        sections: scan
            .entries
            .iter()
            .filter(|r| r.state == registry::LIVE)
            .map(|r| SectionInfo::from_record(reg, r))
            .collect(),
        processes: reg.procs().iter().map(ProcessInfo::from_record).collect(),
        damaged: scan.damaged,
        problems: scan.problems,
        overlaps: Vec::new(),
    }
}

/// Describes one domain without attaching to it. `shm_dir` `None` means the default
/// (`SHMGADGET_SHM_DIR` or `/dev/shm`).
pub fn inspect_domain(domain: &str, shm_dir: Option<&Path>) -> Result<DomainReport> {
    names::validate(domain, "domain")?;
    let dir = resolve_shm_dir(shm_dir);
    Ok(report(&Registry::snapshot(open_dir(&dir)?, domain, true, true)?))
}

/// Every domain with a registry in the shm directory.
pub fn list_domains(shm_dir: Option<&Path>) -> Result<Vec<DomainEntry>> {
    let dir = resolve_shm_dir(shm_dir);
    let mut files = os::list_dir(&dir).map_err(|e| Error::from_io(format!("cannot list {}", dir.display()), e))?;
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        let Some(ObjectName::Registry { domain }) = names::parse_object(f) else { continue };
        out.push(match Registry::snapshot(open_dir(&dir)?, domain, true, true) {
            Ok(reg) => DomainEntry::Ok(report(&reg)),
            Err(e) => DomainEntry::Unreadable { name: domain.to_owned(), error: e.to_string() },
        });
    }
    // Windows that overlap (an explicit window_base, or users who could not read each other's
    // registries): a process attaching both gets `WindowUnavailable`, so say it here.
    let windows: Vec<(String, u64, u64)> = out
        .iter()
        .filter_map(|e| match e {
            DomainEntry::Ok(r) => Some((r.name.clone(), r.window_base, r.window_size)),
            DomainEntry::Unreadable { .. } => None,
        })
        .collect();
    for e in &mut out {
        if let DomainEntry::Ok(r) = e {
            r.overlaps = windows
                .iter()
                .filter(|(n, b, sz)| *n != r.name && *b < r.window_base + r.window_size && b + sz > r.window_base)
                .map(|(n, b, sz)| WindowOverlap { domain: n.clone(), window_base: *b, window_size: *sz })
                .collect();
        }
    }
    Ok(out)
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
    /// `(domain, what)` of locks whose holder was proven gone and that `--force` broke (the
    /// registry then repaired; a heap is recovered by its next locker).
    pub broken_locks: Vec<(String, String)>,
    /// `(domain, what failed)` for every piece of damage found: a registry, entry or table
    /// that fails validation, a lock not released in time, an object with no registry. Plain
    /// `gc` leaves such a domain's objects alone; non-empty means the caller should exit
    /// non-zero.
    pub damaged: Vec<(String, String)>,
}

/// What gc learned about one domain, for the orphan sweep.
enum Verdict {
    /// Registry sound: these generations are recorded (valid or damaged entries).
    Sound(Vec<u64>),
    /// Damaged, foreign, locked or unreadable: none of its objects may be removed.
    Protected,
    /// No registry any more (removed in this run, or there never was one): its objects are
    /// unreachable; removed when `remove` (forced, or the registry was one we removed).
    Gone { remove: bool },
}

/// Removes what dead processes left behind, in one domain or (`domain` `None`) all of them:
/// sections that never became ready because their creator died (even while other processes
/// live); registries left unfinished by a creator that died; attachments of dead processes;
/// transient sections of domains with no live process; registries with no live process and no
/// persistent section; backing objects that their sound registry does not record.
///
/// Never deletes what it cannot prove dead. A domain whose registry, entries or tables fail
/// validation, whose lock is not released within a few seconds, or that belongs to another
/// user is reported (`damaged` / `skipped`) and left alone, objects included. Objects of a
/// domain that has no registry are reported and kept.
///
/// With `force` (use only when no process uses the damaged domains): a registry that cannot
/// be read at all is removed with its objects, provided no process holds a liveness token
/// on it; a readable registry with damaged entries gets the rest of the treatment (dead
/// processes, unfinished and transient sections) but keeps its damaged entries, and the
/// objects they may refer to; objects of domains without a registry are removed.
pub fn gc(domain: Option<&str>, shm_dir: Option<&Path>, force: bool) -> Result<GcReport> {
    gc_with(domain, shm_dir, force, false)
}

/// [`gc`], and with `allow_foreign_owner` also the domains of other users (whose registries
/// this process can write: root's `gc --allow-foreign-owner`) instead of skipping them.
pub fn gc_with(
    domain: Option<&str>,
    shm_dir: Option<&Path>,
    force: bool,
    allow_foreign_owner: bool,
) -> Result<GcReport> {
    if let Some(d) = domain {
        names::validate(d, "domain")?;
    }
    let dir: PathBuf = resolve_shm_dir(shm_dir);
    let _dir_lock =
        os::DirLock::acquire(open_dir(&dir)?).map_err(|e| Error::from_io("cannot lock the shm directory", e))?;
    let dir_fd = open_dir(&dir)?;
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
    let mut verdicts: Vec<(String, Verdict)> = Vec::new();
    for d in &registries {
        let verdict = gc_domain(&dir, &dir_fd, &files, d, force, allow_foreign_owner, &mut out)?;
        verdicts.push((d.clone(), verdict));
    }
    // Objects that no sound registry records. Creation happens under the registry lock after
    // the directory lock we hold, so nothing is half-created now.
    let mut unowned_reported: Vec<String> = Vec::new();
    for f in &files {
        let Some(ObjectName::Section { domain: d, generation, .. }) = names::parse_object(f) else { continue };
        if domain.is_some_and(|want| want != d) {
            continue;
        }
        let remove = match verdicts.iter().find(|(k, _)| k == d).map(|(_, v)| v) {
            Some(Verdict::Sound(gens)) => !gens.contains(&generation),
            Some(Verdict::Protected) => false,
            Some(Verdict::Gone { remove }) => *remove,
            None if force => true,
            None => {
                if !unowned_reported.iter().any(|u| u == d) {
                    unowned_reported.push(d.to_owned());
                    out.damaged.push((
                        d.to_owned(),
                        format!(
                            "object {f:?} (and maybe more) belongs to domain {d:?}, which has no registry; \
                             kept (nothing can reach it); `shmgadget gc --domain {d} --force` removes such objects"
                        ),
                    ));
                }
                false
            }
        };
        if remove {
            match dir_fd.unlink_object(f) {
                Ok(()) => out.removed_orphans.push(f.clone()),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(Error::from_io(format!("cannot remove orphan object {f:?}"), e)),
            }
        }
    }
    Ok(out)
}

/// How long [`locked_for_good`] watches a lock before it believes it.
const TRANSIENT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether `obj` has a byte lock that stays: one seen on every look for
/// [`TRANSIENT_LOCK_WAIT`]. A process that detached a moment ago can still appear in it: a
/// child that another of its threads is spawning holds copies of every descriptor, liveness
/// tokens included, until it execs (`posix_spawn` runs no fork handlers), so the lock outlives
/// its owner's `close` by that long. A token of a live process never goes away.
fn locked_for_good(obj: &os::Object) -> std::io::Result<bool> {
    let start = std::time::Instant::now();
    loop {
        if !obj.any_byte_locked()? {
            return Ok(false);
        }
        if start.elapsed() >= TRANSIENT_LOCK_WAIT {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// One domain's part of [`gc`]; the caller holds the directory lock.
fn gc_domain(
    dir: &Path,
    dir_fd: &os::Dir,
    files: &[String],
    d: &str,
    force: bool,
    allow_foreign_owner: bool,
    out: &mut GcReport,
) -> Result<Verdict> {
    let reg = match Registry::open(open_dir(dir)?, d, os::Access::ReadWrite, allow_foreign_owner) {
        Ok(reg) => reg,
        // Unfinished: its creator died while creating it (we hold the directory lock every
        // creator holds), so it never recorded a section.
        Err(e) if e.kind() == ErrorKind::Corrupt && Registry::is_unfinished(dir_fd, d) => {
            remove_registry(dir_fd, d)?;
            out.removed_domains.push(d.to_owned());
            return Ok(Verdict::Gone { remove: force });
        }
        Err(e) if e.kind() == ErrorKind::Corrupt => {
            if force {
                // Proven unused: no process holds a liveness token (a lock) on it.
                let in_use = dir_fd
                    .open_object(&names::registry_object(d), os::Access::Read)
                    .and_then(|fd| locked_for_good(&fd))
                    .unwrap_or(true);
                if !in_use {
                    remove_registry(dir_fd, d)?;
                    out.removed_domains.push(d.to_owned());
                    return Ok(Verdict::Gone { remove: true });
                }
                out.damaged
                    .push((d.to_owned(), format!("{e}; not removed even with --force: a process is attached to it")));
            } else {
                out.damaged.push((d.to_owned(), e.to_string()));
            }
            out.skipped.push((d.to_owned(), e.to_string()));
            return Ok(Verdict::Protected);
        }
        Err(e) => {
            out.skipped.push((d.to_owned(), e.to_string()));
            return Ok(Verdict::Protected);
        }
    };
    let guard = match reg.lock_within(GC_LOCK_WAIT) {
        Ok(g) => g,
        Err(e) => {
            // --force breaks a lock whose holder is proven gone (looked at again here, under
            // the directory lock, so no process can attach meanwhile).
            let gone = if force && e.kind() == ErrorKind::Corrupt { reg.lock_holder_gone() } else { None };
            // SAFETY: we hold the shm directory's lock and the holder is proven gone, which is
            // `break_lock`'s contract.
            match gone.map(|why| (why, unsafe { reg.break_lock() })) {
                Some((why, Ok(g))) => {
                    out.broken_locks.push((
                        d.to_owned(),
                        format!("the registry lock was held by {why}; broken and the registry repaired"),
                    ));
                    g
                }
                Some((_, Err(e2))) => {
                    out.damaged.push((d.to_owned(), format!("{e}; breaking it failed: {e2}")));
                    out.skipped.push((d.to_owned(), e2.to_string()));
                    return Ok(Verdict::Protected);
                }
                None => {
                    out.damaged.push((d.to_owned(), e.to_string()));
                    out.skipped.push((d.to_owned(), e.to_string()));
                    return Ok(Verdict::Protected);
                }
            }
        }
    };
    let mut scan = reg.scan(true);
    // A sound-looking live entry whose object is missing was damaged into another valid
    // record (a name or generation changed by a few bits): its real object would look orphaned.
    let mut missing = Vec::new();
    for rec in scan.entries.iter().filter(|r| r.state == registry::LIVE) {
        let object = names::section_object(d, rec.generation, rec.name.as_str());
        if !files.contains(&object) {
            missing.push(format!(
                "section {:?} (slot {}) records object {object:?}, which does not exist",
                rec.name.as_str(),
                rec.slot
            ));
        }
    }
    scan.problems.extend(missing);
    let sound = scan.is_sound();
    if !sound {
        let what = scan.describe().join("; ");
        if force {
            out.damaged.push((d.to_owned(), format!("the registry is damaged: {what}; --force: damaged entries and every object they may refer to are kept")));
        } else {
            out.damaged.push((
                d.to_owned(),
                format!(
                    "the registry is damaged: {what}; nothing of the domain was removed (`shmgadget gc --domain {d} --force` \
                     removes only what is proven unused and keeps the damaged entries)"
                ),
            ));
            out.skipped.push((d.to_owned(), "damaged registry".into()));
            return Ok(Verdict::Protected);
        }
    }
    // Sections whose creator died before making them ready: nobody can finish them. The
    // creator's token is checked under the lock, so a live creator is never robbed.
    for rec in &scan.entries {
        if rec.state == registry::LIVE && !rec.ready && !reg.proc_alive(rec.creator_token) {
            guard.remove(rec)?;
            out.removed_unfinished.push((d.to_owned(), rec.name.as_str().to_owned(), rec.creator_pid));
        }
    }
    for rec in scan.entries.iter().filter(|r| r.state == registry::LIVE && r.ready && r.kind == SectionKind::Heap) {
        check_heap_lock(dir_fd, &reg, d, rec, force, out);
    }
    for pid in guard.reap_dead_procs() {
        out.dead_processes.push((d.to_owned(), pid));
    }
    if !guard.others_alive() {
        for rec in guard.all_entries() {
            if !scan.entries.iter().any(|s| s.slot == rec.slot && s.generation == rec.generation) {
                continue; // not among the validated entries (a duplicate generation, say)
            }
            if rec.lifetime == Lifetime::Transient || rec.state != registry::LIVE {
                guard.remove(&rec)?;
                if rec.state == registry::LIVE {
                    out.removed_sections.push((d.to_owned(), rec.name.as_str().to_owned()));
                }
            }
        }
    }
    // A domain made to last (`domain create`) stays while empty, until `domain rm`.
    if sound && !guard.any_slot_used() && !guard.others_alive() && !reg.is_kept() {
        remove_registry(dir_fd, d)?;
        out.removed_domains.push(d.to_owned());
        return Ok(Verdict::Gone { remove: true });
    }
    if !sound {
        return Ok(Verdict::Protected);
    }
    let mut gens: Vec<u64> = guard.all_entries().iter().map(|r| r.generation).collect();
    gens.extend(scan.damaged.iter().map(|e| e.generation));
    Ok(Verdict::Sound(gens))
}

/// A heap lock's holders as `gc`, holding the registry lock without attaching, knows them: by
/// the registry it opened (tokens, and whether thread ids speak for every holder).
struct GcLiveness<'a>(&'a Registry);

impl crate::sync::robust::Liveness for GcLiveness<'_> {
    fn token_alive(&self, token: u64) -> Option<bool> {
        Some(self.0.proc_alive(token))
    }

    fn threads_visible(&self) -> bool {
        self.0.threads_visible(crate::sync::robust::my_namespace())
    }
}

/// Looks at the lock of heap `rec` (plain `gc` and `--force`): one that is held by a holder
/// proven gone (see `sync::RawMutex::lock_bounded`) is reported, and with `force` broken: re-
/// initialised in place and marked inconsistent, so its next locker recovers the heap as after
/// a holder's death. The caller holds the directory lock and the registry lock.
fn check_heap_lock(
    dir_fd: &os::Dir,
    reg: &Registry,
    d: &str,
    rec: &registry::SectionRecord,
    force: bool,
    out: &mut GcReport,
) {
    let name = rec.name.as_str();
    let object = names::section_object(d, rec.generation, name);
    let Ok(fd) = dir_fd.open_object(&object, os::Access::ReadWrite) else { return };
    let len = os::page_size();
    // A heap object smaller than its control block is damage that `heap --check` reports.
    if fd.stat().map_or(true, |st| st.size < len as u64) {
        return;
    }
    let Ok(base) = os::map_shared(&fd, len, os::Access::ReadWrite) else { return };
    // SAFETY: the page is mapped (just above) and stays so until the unmap below; a RawMutex
    // is atomics only (its robust lock too), valid for any bit pattern (its own header check
    // rejects memory that is not a mutex), and at LOCK_OFFSET (< a page) in a heap section.
    let lock = unsafe { &*(base.as_ptr().add(crate::heap::LOCK_OFFSET) as *const crate::sync::RawMutex) };
    let verdict = (|| {
        // A holder proven dead by the registry is taken over (`OwnerDied`: its next user
        // recovers the heap), as a robust lock's next locker would.
        match lock.try_lock_with(&GcLiveness(reg)) {
            Ok(Some(_)) => {
                // SAFETY: we took it just above.
                unsafe { lock.unlock() };
                return None;
            }
            Ok(None) => {}
            Err(_) => return None, // not a working mutex: `heap --check` reports it
        }
        let look = || {
            let (word, token, pid) = lock.holder_snapshot();
            let who = crate::sync::describe_holder(word, crate::registry::token_slot(token), pid);
            let alive = (token != 0).then(|| reg.proc_alive(token));
            (word, crate::sync::holder_gone(word, alive, &who))
        };
        let (first, why) = look();
        why?;
        std::thread::sleep(crate::sync::LOOK_EVERY);
        let (second, why) = look();
        (second == first).then_some(why).flatten()
    })();
    if let Some(why) = verdict {
        let what = format!("the lock of heap {name:?} is held by {why}");
        if !force {
            out.damaged.push((d.to_owned(), format!("{what}; `shmgadget gc --domain {d} --force` breaks it")));
        } else {
            // SAFETY: the holder is proven gone and we hold the directory lock (no process can
            // attach); a bounded waiter retries within LOOK_EVERY.
            match unsafe { lock.break_lock() } {
                Ok(()) => {
                    out.broken_locks.push((d.to_owned(), format!("{what}; broken (its next user recovers the heap)")))
                }
                Err(e) => out.damaged.push((d.to_owned(), format!("{what}; breaking it failed: {e}"))),
            }
        }
    }
    // SAFETY: mapped above; `lock` is not used after this.
    let _ = unsafe { os::unmap(base.as_ptr() as usize, len) };
}

fn remove_registry(dir_fd: &os::Dir, d: &str) -> Result<()> {
    dir_fd
        .unlink_object(&names::registry_object(d))
        .map_err(|e| Error::from_io(format!("cannot remove the registry of domain {d:?}"), e))
}
