//! The public front of an attachment: [`Domain`], this process's table of attachments, and
//! the calls that start from a bare address.
//!
//! Attaching opens (or creates) the domain's registry, reserves the domain's address window
//! in this process and registers this process (an [`Attachment`], see `attachment`). Every
//! section of the domain is then mapped inside that window at the offset the registry
//! records, so it has the same address in every attached process. The sections of a domain
//! are created, opened and deleted by `Domain` methods defined in `section`.
//!
//! Within one process, attaching the same domain twice returns the same attachment; it is
//! detached when the last [`Domain`] handle (sections hold one) is dropped or detached.
//!
//! Lock order: this process's attachment table → the attachment's locks (see `attachment`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

pub(crate) use crate::attachment::Attachment;
/// The attachment under its former name, for the modules that still call it so.
pub(crate) use crate::attachment::Attachment as DomainInner;
pub use crate::attachment::DEFAULT_SHM_DIR;
pub(crate) use crate::attachment::{NO_TOKEN, UNMAP_EPOCH};
use crate::attachment::{claim_window, dir_error, lock_dir, release_window, resolve_shm_dir};
use crate::error::{Error, ErrorKind, Result, bail};
use crate::fault;
use crate::names;
use crate::os;
use crate::registry::{self, CreateParams, Registry};
use crate::sharing::Sharing;

/// Settings for [`Domain::attach_with`]. The window and table sizes only matter when the call
/// creates the domain; an existing domain keeps the ones it was created with.
#[derive(Debug, Clone)]
pub struct DomainOptions {
    /// Window base; `None` picks the first free 1 GiB-aligned window that no other domain on
    /// this machine uses, whoever made it: from `0x2000_0000_0000` for root, from a band of
    /// 4 TiB per uid above it for other users (so users who cannot read each other's
    /// registries still get disjoint windows).
    pub window_base: Option<u64>,
    /// Window size in bytes (a multiple of 2 MiB, 16 MiB to 64 TiB). Default 1 TiB.
    pub window_size: u64,
    /// Number of section entries in the registry. Default 4096.
    pub max_sections: u32,
    /// Number of attached-process entries. Default 1024.
    pub max_procs: u32,
    /// Who may attach (the registry object's access). Default [`Sharing::owner_only`].
    pub sharing: Sharing,
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
            sharing: Sharing::owner_only(),
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
        if self.sharing.posix_mode() & !0o777 != 0 {
            bail!(InvalidArgument, "mode {:#o} has bits outside 0o777", self.sharing.posix_mode());
        }
        Ok(())
    }
}

/// The domain name used when none is given: `SHMGADGET_DOMAIN`, or `default`.
pub fn default_domain_name() -> String {
    std::env::var("SHMGADGET_DOMAIN").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "default".to_owned())
}

/// This process's attachment to a domain. Cheap to clone; all clones are the same attachment.
#[derive(Clone)]
pub struct Domain {
    pub(crate) inner: Arc<Attachment>,
}

type Key = (PathBuf, String);

/// Attachments of this process. Holding this lock while attaching or detaching keeps one
/// attachment per domain and makes a detach finish before a re-attach reserves the window.
fn attached() -> MutexGuard<'static, HashMap<Key, Arc<Attachment>>> {
    static ATTACHED: LazyLock<Mutex<HashMap<Key, Arc<Attachment>>>> = LazyLock::new(Default::default);
    ATTACHED.lock().unwrap_or_else(|p| p.into_inner())
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
                claim_window(name, reg.window_base, reg.window_size).map_err(|e| {
                    if e.kind() != ErrorKind::WindowUnavailable {
                        return e;
                    }
                    match explain_overlap(&shm_dir, &dir, name, reg.window_base, reg.window_size) {
                        Some(why) => Error::new(ErrorKind::WindowUnavailable, format!("{e}; {why}")),
                        None => e,
                    }
                })?;
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
                    mode: opts.sharing.posix_mode(),
                };
                Registry::create(clone_dir(&dir)?, name, &params).inspect_err(|_| release_window(base, size))?
            }
            Err(e) => return Err(e),
        };
        os::install_fork_handlers(before_fork);
        let inner = Attachment::register(name, shm_dir, registry, opts.allow_foreign_owner, !opts.eager)?;
        drop(dir_lock);
        let inner = Arc::new(inner);
        let ready = fault::register(&inner).and_then(|()| if opts.eager { Ok(()) } else { fault::install() });
        if let Err(e) = ready {
            let _ = teardown(&inner);
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

    /// Detaches this handle. When it is the process's last handle to the domain (sections,
    /// heaps, queues, sync objects and a thread's heap cache hold handles too), the domain is
    /// detached: every section is unmapped from this process; if no other live process is
    /// attached, transient sections are deleted, and the registry too when no persistent
    /// section remains ([`Detached::Done`]). Otherwise nothing happens yet: the domain is
    /// detached when the last of those handles is dropped, and [`Detached::Deferred`] says how
    /// many there are. Dropping the last handle detaches too, silently.
    pub fn detach(self) -> Result<Detached> {
        let mut table = attached();
        self.release(&mut table)
    }

    /// Detaches at process exit (the C library's `atexit` handler): like [`Domain::detach`]
    /// for the registry (this process's entry is released; if no other live process is
    /// attached, transient sections and an empty registry are deleted), but nothing is
    /// unmapped and the attachment's memory is never freed, so a thread still touching section
    /// memory while the process ends cannot fault. Other handles in this process (a thread's
    /// heap cache, a call in progress on another thread) do not keep the entry: the process is
    /// ending, and those threads end with it; when they drop their handles nothing is torn down.
    /// Never call it in a process that goes on running.
    pub fn detach_at_exit(self) -> Result<()> {
        let mut table = attached();
        let key = (self.inner.shm_dir.clone(), self.inner.name.clone());
        // Only the attachment the table holds, and only once.
        if !table.get(&key).is_some_and(|a| Arc::ptr_eq(a, &self.inner)) {
            return Ok(());
        }
        table.remove(&key);
        drop(table);
        let result = self.inner.leave_registry();
        // Keeps the attachment (registry mapping, fault-handler registration) alive until the
        // process ends.
        std::mem::forget(self);
        result
    }

    fn release(&self, table: &mut HashMap<Key, Arc<Attachment>>) -> Result<Detached> {
        // Our handle plus the table's: nobody else can clone it now (cloning needs a handle,
        // attaching needs the table lock we hold). An attachment the table no longer holds was
        // left at exit (`detach_at_exit`): its memory stays, and there is nothing left to do.
        let key = (self.inner.shm_dir.clone(), self.inner.name.clone());
        if !table.get(&key).is_some_and(|a| Arc::ptr_eq(a, &self.inner)) {
            return Ok(Detached::Done);
        }
        match Arc::strong_count(&self.inner) - 2 {
            0 => {
                table.remove(&key);
                teardown(&self.inner).map(|()| Detached::Done)
            }
            handles => Ok(Detached::Deferred { handles }),
        }
    }

    /// Marks the domain as made to last (see [`crate::admin::create_domain`]).
    pub(crate) fn mark_kept(&self) -> Result<()> {
        self.inner.registry.lock()?.mark_kept();
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
        self.inner.contains(addr)
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
}

/// The fork prepare hook (registered with [`os::install_fork_handlers`]): makes a
/// registration for the child in every attached domain (see `attachment`, "Identity, and
/// fork").
fn before_fork() {
    let table = attached();
    for inner in table.values() {
        inner.prepare_fork_child();
    }
}

/// Leaves the domain (see [`Domain::detach`]): out of the fault handler's table, out of the
/// registry, and the window released.
fn teardown(inner: &Attachment) -> Result<()> {
    fault::unregister(inner);
    let result = inner.leave_registry();
    release_window(inner.window_base, inner.window_size);
    result
}

/// What [`Domain::detach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The handle was the process's last one: the domain is detached from this process.
    Done,
    /// Other handles of this process keep the domain attached (a [`crate::Section`], a heap,
    /// a queue end, a thread's heap cache, a clone of the [`Domain`]); it is detached when the
    /// last of them is dropped.
    Deferred {
        /// How many handles were left when this one was given up.
        handles: usize,
    },
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

fn clone_dir(dir: &os::Dir) -> Result<os::Dir> {
    dir.try_clone().map_err(|e| Error::from_io("cannot duplicate a descriptor", e))
}

/// Width of a user's band of the address space: automatically chosen windows start at the
/// band of the creating user (see [`uid_window_base`]), so users who cannot read each other's
/// registries still pick disjoint windows.
const WINDOW_BAND: u64 = 4 << 40;

/// The base from which windows for uid `uid`'s new domains are looked for: root's band starts
/// at the default base, every other uid's at one of the next bands (`uid` modulo their count,
/// so up to that many consecutive uids never share one).
fn uid_window_base(uid: u32) -> u64 {
    let bands = (os::USER_ADDRESS_LIMIT - registry::DEFAULT_WINDOW_BASE) / WINDOW_BAND;
    if uid == 0 || bands < 2 {
        return registry::DEFAULT_WINDOW_BASE;
    }
    registry::DEFAULT_WINDOW_BASE + (1 + uid as u64 % (bands - 1)) * WINDOW_BAND
}

/// What the shm directory says about the windows in use, except domain `except`'s.
#[derive(Debug, Default)]
struct KnownWindows {
    /// `(base, end, domain)` of every registry this process could read.
    windows: Vec<(u64, u64, String)>,
    /// `(owner uid, domain)` of registries of other users it could not read (their window is
    /// unknown; most likely inside their owner's band).
    unknown: Vec<(u32, String)>,
}

impl KnownWindows {
    fn read(shm_dir: &Path, dir: &os::Dir, except: &str) -> Result<KnownWindows> {
        let mut known = KnownWindows::default();
        for file in os::list_dir(shm_dir).map_err(|e| dir_error(shm_dir, e))? {
            let Some(names::ObjectName::Registry { domain }) = names::parse_object(&file) else { continue };
            if domain == except {
                continue;
            }
            // A private copy of the header, not a mapping: another user may shrink their
            // registry while we read it (see the registry's "Strangers"). Also other users'.
            match Registry::snapshot(clone_dir(dir)?, domain, true, false) {
                Ok(reg) => known.windows.push((reg.window_base, reg.window_base + reg.window_size, domain.to_owned())),
                Err(_) => {
                    if let Ok(st) = dir.stat_object(&file) {
                        if st.uid != os::effective_uid() {
                            known.unknown.push((st.uid, domain.to_owned()));
                        }
                    }
                }
            }
        }
        Ok(known)
    }

    /// A known window overlapping `[lo, lo + size)`.
    fn overlapping(&self, lo: u64, size: u64) -> Option<&(u64, u64, String)> {
        self.windows.iter().find(|(b, e, _)| *b < lo + size && *e > lo)
    }

    /// The band of an unreadable registry's owner overlapping `[lo, lo + size)`: `(band end,
    /// domain)`.
    fn band_overlapping(&self, lo: u64, size: u64) -> Option<(u64, &str)> {
        self.unknown.iter().find_map(|(uid, d)| {
            let b = uid_window_base(*uid);
            (b < lo + size && b + WINDOW_BAND > lo).then_some((b + WINDOW_BAND, d.as_str()))
        })
    }
}

/// Picks and reserves a window for a new domain: the requested base, or the first
/// `WINDOW_ALIGN`-aligned range from this user's band on ([`uid_window_base`], wrapping around
/// to the default base) that no other domain's registry records, that is not in the band of
/// another user whose registry we cannot read, and that is free in this process. Every
/// registry is read, other users' too (as a `pread` snapshot), so domains never overlap
/// whoever made them, unless a registry cannot be read and its window lies outside its
/// owner's band (an explicit `window_base`); `domains` flags such overlaps. The caller holds
/// the directory lock, so no other domain can be created meanwhile.
fn choose_window(shm_dir: &Path, dir: &os::Dir, name: &str, opts: &DomainOptions) -> Result<(u64, u64)> {
    let size = opts.window_size;
    let known = KnownWindows::read(shm_dir, dir, name)?;
    if let Some(base) = opts.window_base {
        if let Some((b, e, other)) = known.overlapping(base, size) {
            bail!(
                WindowUnavailable,
                "window {base:#x}-{:#x} overlaps domain {other:?}'s window {b:#x}-{e:#x}; choose another base or let shmgadget pick one",
                base + size
            );
        }
        claim_window(name, base, size)?;
        return Ok((base, size));
    }
    let start = uid_window_base(os::effective_uid());
    // From this user's band to the top, then from the default base up to the band.
    for (from, to) in [(start, os::USER_ADDRESS_LIMIT), (registry::DEFAULT_WINDOW_BASE, start + size)] {
        let mut base = from;
        while base + size <= to.min(os::USER_ADDRESS_LIMIT) {
            if let Some((_, end, _)) = known.overlapping(base, size) {
                base = end.next_multiple_of(registry::WINDOW_ALIGN);
                continue;
            }
            if let Some((end, _)) = known.band_overlapping(base, size) {
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
    }
    bail!(
        WindowUnavailable,
        "no free window of {size} bytes above {:#x} for domain {name:?} ({} other domains exist, {} of them unreadable); \
         remove unused domains with `shmgadget gc`, or use smaller windows",
        registry::DEFAULT_WINDOW_BASE,
        known.windows.len() + known.unknown.len(),
        known.unknown.len()
    )
}

/// Why domain `name`'s window `[base, base + size)` may be occupied in this process: the other
/// domains of the shm directory whose windows overlap it (for the message of a failed attach).
fn explain_overlap(shm_dir: &Path, dir: &os::Dir, name: &str, base: u64, size: u64) -> Option<String> {
    let known = KnownWindows::read(shm_dir, dir, name).ok()?;
    let others: Vec<String> = known
        .windows
        .iter()
        .filter(|(b, e, _)| *b < base + size && *e > base)
        .map(|(b, e, d)| format!("{d:?} ({b:#x}-{e:#x})"))
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "domain {name:?}'s window overlaps the window of domain {}: two domains with overlapping windows \
         cannot be attached by one process (they were given overlapping windows by an explicit window_base, \
         or by users who could not read each other's registries; `shmgadget domains` flags it); recreate one \
         of them with another `--window-base`",
        others.join(", ")
    ))
}

/// Makes sure every section overlapping `[ptr, ptr + len)` is mapped in this process, for code
/// about to hand that memory to the kernel (a system call never faults, it fails with
/// `EFAULT`). Fails with `InvalidArgument` if the range leaves the attached domains' windows,
/// `NotFound` if part of it lies where no live section is (or a section's object is gone),
/// and with the reason a section could not be mapped otherwise: `PermissionDenied` (mode,
/// foreign owner), `Corrupt` (object truncated or resized), `Os` (descriptor limit
/// `EMFILE`, `ENOMEM` at `vm.max_map_count`, ...), each with a message saying what to do.
pub fn ensure_mapped(ptr: *const u8, len: usize) -> Result<()> {
    ensure_mapped_range(ptr as usize, len)
}

fn ensure_mapped_range(start: usize, len: usize) -> Result<()> {
    let end = start.checked_add(len).ok_or_else(|| {
        Error::new(ErrorKind::InvalidArgument, format!("address range {start:#x}+{len:#x} overflows"))
    })?;
    // Real handles (not bare Arcs): if every other handle goes away meanwhile, dropping these
    // still detaches the domain properly.
    let domains = attached_domains_where(|a| {
        let base = a.window_base as usize;
        base < end && start < base + a.window_size as usize
    });
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
        inner.ensure_mapped(&rec)?;
        at = (inner.window_base + rec.offset + rec.reserved) as usize;
        if at >= end {
            return Ok(());
        }
    }
}

/// Real handles to the domains this process has attached that `keep` selects (dropping them
/// detaches properly if every other handle went away meanwhile). Only those are cloned: a
/// handle held here, even for a moment, makes a concurrent `Domain::detach` of that domain on
/// another thread leave the detaching to the last handle, so a lookup must never hold handles
/// to domains it does not need.
pub(crate) fn attached_domains_where(keep: impl Fn(&Attachment) -> bool) -> Vec<Domain> {
    attached().values().filter(|inner| keep(inner)).map(|inner| Domain { inner: inner.clone() }).collect()
}

/// The attachment whose window holds `addr`, if this process has one (a bare `Arc`: dropping it
/// never detaches).
pub(crate) fn attachment_covering(addr: usize) -> Option<Arc<Attachment>> {
    let table = attached();
    table.values().find(|d| d.contains(addr)).cloned()
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

/// Whether every thread that may hold a lock in the window of the attached domain holding
/// `addr` is a thread of this process's pid namespace ([`Registry::threads_visible`]): then a
/// lock word naming a thread that does not exist here names a dead holder. `false` outside
/// any attached domain. A slow path: scans the process table.
pub(crate) fn threads_visible_at(addr: usize) -> bool {
    attachment_covering(addr).is_some_and(|inner| inner.registry.threads_visible(crate::sync::robust::my_namespace()))
}

/// The start address, kind and reserved length of the live section covering `addr`, in a domain attached by
/// this process, mapped in this process: if it is not yet, it is mapped now (in an eager domain
/// nothing would map it on first touch, and mapping here turns any failure into an error
/// instead of a crash). When it is mapped already this adds one relaxed load.
pub(crate) fn section_covering(addr: usize) -> Result<(u64, crate::registry::SectionKind, u64)> {
    let (domain, rec) = {
        let table = attached();
        let Some(inner) = table.values().find(|d| d.contains(addr)) else {
            bail!(InvalidArgument, "address {addr:#x} is not inside the window of any domain attached in this process");
        };
        let off = (addr - inner.window_base as usize) as u64;
        let rec = inner.registry.lookup_offset(off).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no live section of domain {:?} covers address {addr:#x}", inner.name),
            )
        })?;
        if inner.mapping.is_mapped(&rec) {
            return Ok((inner.window_base + rec.offset, rec.kind, rec.reserved));
        }
        // A real handle, dropped after the table lock (its drop may detach the domain).
        (Domain { inner: inner.clone() }, rec)
    };
    domain.inner.ensure_mapped(&rec)?;
    Ok((domain.inner.window_base + rec.offset, rec.kind, rec.reserved))
}

/// Keeps one section mapped in this process, and its domain attached, while it lives (see
/// [`pin_section_at`]).
pub(crate) struct SectionPin {
    domain: Domain,
    rec: crate::registry::SectionRecord,
}

impl Drop for SectionPin {
    fn drop(&mut self) {
        // The last handle to a section deleted meanwhile unmaps it here; then `domain` drops
        // (and detaches the domain if it was the last handle).
        self.domain.inner.mapping.release(&self.rec, &self.domain.inner.registry);
    }
}

/// Pins the live section that starts at `addr` if this process has it mapped: until the pin
/// drops, neither a `shm_delete_section`/`Section::delete` on another thread nor the last
/// handle's drop unmaps it, and the domain stays attached. None when no attached domain has
/// a live section starting at `addr` mapped here; nothing is mapped to make one.
pub(crate) fn pin_section_at(addr: usize) -> Option<SectionPin> {
    let domain = domain_covering(addr)?;
    let off = (addr - domain.inner.window_base as usize) as u64;
    let rec = domain.inner.registry.lookup_offset(off).filter(|rec| rec.offset == off)?;
    domain.inner.mapping.hold_if_mapped(&rec).then_some(SectionPin { domain, rec })
}

/// A handle on the attached domain whose window holds `addr`: while it lives the domain stays
/// attached. Taken under the table lock and returned after it (its drop may detach the domain).
fn domain_covering(addr: usize) -> Option<Domain> {
    attached().values().find(|d| d.contains(addr)).map(|inner| Domain { inner: inner.clone() })
}

/// Runs `f`, which touches memory at `addr` that the caller holds no handle to (a lock that an
/// exiting thread still holds because its guard was leaked), only if that memory is still
/// mapped as it was at unmap epoch `since` (read when the caller last knew it mapped): nothing
/// was unmapped in this process since. When `addr` lies in an attached domain's window, `f`
/// runs under that attachment's mapping lock and with a handle on the domain, so no unmapping
/// can start meanwhile. Returns whether `f` ran.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn if_still_mapped(addr: usize, since: u64, f: impl FnOnce()) -> bool {
    let domain = domain_covering(addr);
    let _guard = match &domain {
        Some(d) => match d.inner.mapping.lock_for_exit() {
            Some(g) => Some(g),
            None => return false,
        },
        None => None,
    };
    // Relaxed: every unmapping of section memory bumps it under the mapping lock (held, in a
    // window) or the attached table's lock (a window released; taken above).
    if UNMAP_EPOCH.load(std::sync::atomic::Ordering::Relaxed) != since {
        return false;
    }
    f();
    true
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
    ensure_mapped_range(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::SectionOptions;

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

    #[test]
    fn detach_says_whether_other_handles_keep_the_domain_attached() {
        let name = format!("u-detach-{}", std::process::id());
        let d = Domain::attach_with(&name, &opts()).unwrap();
        let s = d.create_section("s", 4096, &SectionOptions::default()).unwrap();
        let again = d.clone();
        assert_eq!(d.detach().unwrap(), Detached::Deferred { handles: 2 }, "the section and the clone");
        assert_eq!(again.detach().unwrap(), Detached::Deferred { handles: 1 }, "the section");
        // The section's handle still works: the domain is still attached.
        s.commit(4096).unwrap();
        let d = s.domain().clone();
        drop(s);
        d.delete_section("s").unwrap();
        assert_eq!(d.detach().unwrap(), Detached::Done);
        assert!(
            !attached().contains_key(&(PathBuf::from(DEFAULT_SHM_DIR), name.clone())),
            "detached from this process"
        );
    }
}
