//! Map on first touch: a pointer into a section this process has never opened just works.
//!
//! When a process dereferences an address inside an attached domain's window where no section
//! is mapped yet, the CPU faults on the window's `PROT_NONE` reservation. Our `SIGSEGV` handler
//! (installed on the first attach, see `os::install_fault_hook`) finds the section covering the
//! address in the registry's chunk table, opens its object, maps it at its address and returns,
//! so the instruction runs again and succeeds. Every other fault is passed to the handler that
//! was installed before ours (Rust's stack-overflow handler, a host's, or the default action).
//!
//! # What runs in the signal handler
//! Only async-signal-safe work: atomic loads of this module's domain table, the registry's
//! seqlocked entry read (no locks, no allocation), building the object name in a stack buffer,
//! and `openat`/`fstat`/`mmap`/`close` as raw system calls. errno is saved and restored. A
//! file-backed section's link is followed the same way (`pread` of the link into a stack
//! buffer, `open` of the file, `fstat`, `fcntl` for the shared lock, `pread` of its header,
//! `mmap`); that needs more signal stack than Rust gives a thread (8 KiB), so `install` gives
//! the attaching thread 64 KiB (`os::ensure_signal_stack`), and on a thread with too little
//! room left the fault is reported, not repaired.
//!
//! # When it cannot map
//! A fault inside an attached domain's window that the handler cannot repair (no live section
//! there, the object cannot be opened: `EMFILE`, `EACCES`, gone; it is truncated or foreign;
//! `mmap` fails: `ENOMEM` at `vm.max_map_count`; the domain is eager; a `SIGBUS` in a section)
//! is reported with one line on stderr before the fault goes on to the previous handler (by
//! default: the process dies of the signal as it would have without us), for example
//!
//! ```text
//! shmgadget: first touch of 0x200000200010 in section "data" of domain "app" cannot map it: cannot open its object "shmgadget.app:7:data": EMFILE (this process has as many descriptors open as RLIMIT_NOFILE allows: raise `ulimit -n`); the access crashes
//! ```
//!
//! A fault on a heap block's guard page (guard mode, `heap/guard.rs`) is never mapped over
//! either: it is reported as an overrun naming the block's address and size, then passed on.
//!
//! A fault on a section this process protected with `Section::protect` is never "repaired"
//! by mapping it again (that would undo the protection): it is reported the same way, naming
//! the section and offset. A fault outside every window is never ours; if it lies in a view
//! (`view.rs`) the line names the view, its section and the offset, then the fault goes on.
//!
//! The line is built in a stack buffer and written with one `write(2)` (`os::write_stderr`):
//! no allocation, no lock. [`ensure_mapped`](crate::ensure_mapped) reports the same failures as an [`Error`].
//!
//! # Protocols
//! * **Domain table.** `DOMAINS` holds pointers to attached domains. A handler increments
//!   `ACTIVE` before reading the table and decrements it when done; detaching clears its entry
//!   and then waits for `ACTIVE` to reach zero before the domain can be freed. Both sides use
//!   SeqCst: each stores one variable and then loads the other (a store-load pattern that
//!   weaker orderings do not forbid from reordering), so either the handler sees the cleared
//!   entry or the detacher sees the handler active.
//! * **Per-slot mapping word**: owned by `attachment::mapping` ([`Mapping::fault_in`] is the
//!   first-touch transition: one thread maps, the others spin until it is done, then retry).
//!
//! # What it does not cover
//! * System calls: the kernel never raises `SIGSEGV` for a bad buffer, it returns `EFAULT`.
//!   Call [`ensure_mapped`](crate::ensure_mapped) before passing section memory to the kernel (shmgadget does so
//!   itself).
//! * Threads that block `SIGSEGV`, and hosts that own it: attach with `eager` mode
//!   (`SHMGADGET_EAGER=1`), which installs no handler and maps every section at attach; new
//!   sections are then reached through [`ensure_mapped`](crate::ensure_mapped) or `Domain::map_all`. shmgadget's own
//!   calls that start from a bare address (`heap::free`, `heap::realloc`, a [`ShmAlloc`] read
//!   from shared memory, `BlockAddr::into_box`) map the section they reach themselves.
//! * Debuggers stop at every first touch: in gdb, `handle SIGSEGV nostop noprint pass`.
//! * A deleted section is never remapped: touching it in a process that had not mapped it is
//!   an ordinary crash (after the line saying that no live section is there).

use std::ffi::CStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

#[cfg(doc)]
use crate::attachment::Mapping;
use crate::attachment::{Attachment, FaultIn};
use crate::error::{Error, ErrorKind, Result};
#[cfg(doc)]
use crate::heap::ShmAlloc;
use crate::os::{self, ErrorExt, FaultSignal};
use crate::registry::SectionRecord;

/// Most domains one process can have attached at once.
pub const MAX_ATTACHED_DOMAINS: usize = 64;

static DOMAINS: [AtomicPtr<Attachment>; MAX_ATTACHED_DOMAINS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_ATTACHED_DOMAINS];
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static FIRST_TOUCH_MAPS: AtomicU64 = AtomicU64::new(0);
/// How many domains in the table are eager (no mapping on first touch).
static EAGER_DOMAINS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The last address this thread faulted on that was already mapped, and how often in a
    /// row: a fault that repeats although the section is mapped (someone unmapped or
    /// protected it behind our back) is first healed by mapping again, then passed on.
    static REPEAT: std::cell::Cell<(usize, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// How many sections the fault handler has mapped in this process so far.
pub fn first_touch_maps() -> u64 {
    // Relaxed: a statistic.
    FIRST_TOUCH_MAPS.load(Ordering::Relaxed)
}

/// Whether shmgadget's fault handler is installed (and not replaced) in this process.
pub fn handler_installed() -> bool {
    os::fault_hook_installed()
}

/// Signal stack the handler wants on threads that attach (`os::ensure_signal_stack`).
const SIGNAL_STACK: usize = 64 << 10;
/// Signal stack room below which first touch does not follow a file-backed section's link
/// (measured: about 5 KiB in a debug build, far less optimised).
const FILE_MAP_STACK: usize = if cfg!(debug_assertions) { 12 << 10 } else { 6 << 10 };

/// Installs (or re-installs, if replaced) the handler, and gives the calling thread a signal
/// stack large enough for it.
pub(crate) fn install() -> Result<()> {
    os::ensure_signal_stack(SIGNAL_STACK);
    os::install_fault_hook(on_fault)
        .map(|_| ())
        .map_err(|e| Error::from_io("cannot install the first-touch fault handler", e))
}

/// Whether this process has an eager domain attached: then code that reaches section memory
/// through a bare address must map it first (nothing maps it on first touch). One relaxed load,
/// so address-based paths stay as fast as before when no domain is eager.
#[inline]
pub(crate) fn eager_domains_attached() -> bool {
    // Relaxed: an address inside an eager domain's window reaches this thread only through
    // that attachment (a handle, or memory reached through one), which was made after the
    // increment in `register` and handed to this thread with synchronisation of its own.
    EAGER_DOMAINS.load(Ordering::Relaxed) != 0
}

/// Makes an attached domain visible to the handler and to [`ensure_mapped`](crate::ensure_mapped).
pub(crate) fn register(inner: &Arc<Attachment>) -> Result<()> {
    // Transparent huge pages for section mappings, if asked (`os::set_huge_advice`): set here,
    // outside any signal handler, before this domain's first mapping.
    if std::env::var_os("SHMGADGET_THP").is_some_and(|v| v == "1") {
        os::set_huge_advice(true);
    }
    let ptr = Arc::as_ptr(inner).cast_mut();
    for slot in &DOMAINS {
        // SeqCst: see the domain-table protocol in the module docs.
        if slot.compare_exchange(std::ptr::null_mut(), ptr, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            if !inner.first_touch {
                // Relaxed: see `eager_domains_attached`.
                EAGER_DOMAINS.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
    }
    Err(Error::new(
        ErrorKind::RegistryFull,
        format!("this process already has {MAX_ATTACHED_DOMAINS} domains attached; detach one first"),
    ))
}

/// Removes a domain from the table and waits until no handler can still be using it.
pub(crate) fn unregister(inner: &Attachment) {
    let ptr = (inner as *const Attachment).cast_mut();
    for slot in &DOMAINS {
        // SeqCst: see the domain-table protocol in the module docs.
        if slot.compare_exchange(ptr, std::ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst).is_ok()
            && !inner.first_touch
        {
            // Relaxed: see `eager_domains_attached`.
            EAGER_DOMAINS.fetch_sub(1, Ordering::Relaxed);
        }
    }
    // SeqCst: pairs with the handler's increment (store-load pattern, see module docs).
    while ACTIVE.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// Runs `f` on the attached domain whose window contains `addr`. Async-signal-safe.
fn with_domain<R>(addr: usize, f: impl FnOnce(&Attachment) -> R) -> Option<R> {
    // SeqCst: see the domain-table protocol in the module docs.
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let mut out = None;
    for slot in &DOMAINS {
        // SeqCst: see the domain-table protocol in the module docs.
        let p = slot.load(Ordering::SeqCst);
        if p.is_null() {
            continue;
        }
        // SAFETY: a domain stays allocated while its pointer is in the table and for as long
        // as ACTIVE counts us (`unregister` clears the entry, then waits for ACTIVE == 0,
        // before the domain can be dropped).
        let d = unsafe { &*p };
        if d.contains(addr) {
            out = Some(f(d));
            break;
        }
    }
    // Release suffices for the decrement itself, but SeqCst keeps one story for the counter.
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    out
}

/// Whether every section overlapping `[start, start + len)` is mapped in this process (false
/// if part of the range lies outside the attached windows or where no live section is).
/// Lock-free: the handler's domain table, the registry's chunk table, the mapping words.
pub(crate) fn range_mapped(start: usize, len: usize) -> bool {
    let Some(end) = start.checked_add(len.max(1)) else {
        return false;
    };
    let mut at = start;
    while at < end {
        let next = with_domain(at, |d| {
            let rec = d.registry.lookup_offset((at - d.window_base as usize) as u64)?;
            d.mapping.is_mapped(&rec).then_some((d.window_base + rec.offset + rec.reserved) as usize)
        });
        match next.flatten() {
            Some(n) => at = n,
            None => return false,
        }
    }
    true
}

/// The fault hook. Async-signal-safe.
fn on_fault(sig: FaultSignal, addr: usize) -> bool {
    with_domain(addr, |d| Handler(d).on_fault(sig, addr)).unwrap_or_else(|| {
        // Outside every window: never ours to repair. A view says what the access did.
        crate::view::report_fault(sig, addr);
        false
    })
}

/// Why a fault in a domain's window could not be repaired.
enum Failure {
    /// No live section covers the address.
    NoSection,
    /// The domain is eager: the handler does not map its sections.
    Eager,
    /// `SIGBUS` in a section: its object is shorter than the mapping, or had no page.
    Bus,
    /// Another thread of this process started mapping the section and never finished.
    Wedged,
    /// The section is recorded as mapped, mapping it again did not help.
    StillFaulting,
    /// The section is mapped and this process changed its protection (`Section::protect`):
    /// the access broke that protection, and mapping again would undo it.
    Protected,
    /// A guard page after a heap block (guard mode): the access went `past` bytes beyond the
    /// end of the block of `size` bytes at `block`.
    Overrun {
        block: usize,
        size: u64,
        past: u64,
    },
    /// The object name did not fit the stack buffer (cannot happen with valid names).
    NameTooLong,
    Open(std::io::Error),
    Stat(std::io::Error),
    NotRegular,
    /// The object's size differs from the section's reserved size.
    Size(u64),
    /// The object is a link to a file-backed section's file (`crate::file_section`) that the
    /// handler cannot follow: not a well-formed link, or a path longer than the handler's
    /// stack buffer (`file_section::SIGNAL_SAFE_PATH_MAX`).
    FileBacked,
    /// Too little signal stack left (bytes) to follow a file-backed section's link.
    SignalStack(usize),
    /// The file a link names cannot be opened (gone, a symbolic link, a directory, ...).
    FileOpen(std::io::Error),
    /// The file belongs to another user.
    FileOwner(u32),
    /// Someone holds the file's lock exclusively (a `MappedFile`, or a domain placing it).
    FileLocked,
    /// The file's header does not record this section's address and size.
    FileHeader,
    /// The object belongs to this uid, and foreign owners are not accepted.
    Owner(u32),
    Map(std::io::Error),
}

/// The fault handler's view of one attachment.
struct Handler<'a>(&'a Attachment);

impl std::ops::Deref for Handler<'_> {
    type Target = Attachment;
    fn deref(&self) -> &Attachment {
        self.0
    }
}

impl Handler<'_> {
    /// Repairs a fault at `addr` inside this domain's window, or says why not (on stderr) and
    /// returns false. Async-signal-safe.
    fn on_fault(&self, sig: FaultSignal, addr: usize) -> bool {
        let offset = (addr - self.window_base as usize) as u64;
        let rec = self.registry.lookup_offset(offset);
        // A guard page of a heap block (`heap/guard.rs`) is never mapped over: a live one is
        // an overrun, reported and passed on; a stale one (its block freed by another process)
        // is made ordinary memory again and the access retried.
        let guard = match (&rec, sig) {
            (Some(rec), FaultSignal::Segv) if self.mapping.is_mapped(rec) => crate::heap::guard::lookup(addr),
            _ => None,
        };
        let result = match (&rec, sig, guard) {
            (_, _, Some(crate::heap::guard::GuardHit::Lifted)) => Ok(()),
            (_, _, Some(crate::heap::guard::GuardHit::Overrun { block, size, past })) => {
                Err(Failure::Overrun { block, size, past })
            }
            (rec, sig, None) => self.classify(rec, sig, addr),
        };
        match result {
            Ok(()) => true,
            Err(why) => {
                self.report(addr, rec.as_ref(), &why);
                false
            }
        }
    }

    /// The first-touch decision for a fault that is not a guard page's.
    fn classify(&self, rec: &Option<SectionRecord>, sig: FaultSignal, addr: usize) -> Result<(), Failure> {
        match (rec, sig) {
            // SIGBUS inside a mapped section means its object is shorter than the mapping
            // (truncated by someone) or the backing store had no page for it: mapping again
            // cannot help.
            (_, FaultSignal::Bus) => Err(Failure::Bus),
            (None, _) => Err(Failure::NoSection),
            // Before the eager check: a protected section is mapped, in either mode.
            (Some(rec), FaultSignal::Segv) if self.mapping.is_mapped(rec) && self.mapping.is_protected(rec) => {
                Err(Failure::Protected)
            }
            (Some(_), _) if !self.first_touch => Err(Failure::Eager),
            (Some(rec), FaultSignal::Segv) => self.fault_in(addr, rec),
        }
    }

    /// Maps section `rec`, which covers `addr`, through the mapping's first-touch transition
    /// (see `attachment::mapping`). Async-signal-safe.
    fn fault_in(&self, addr: usize, rec: &SectionRecord) -> Result<(), Failure> {
        match self.mapping.fault_in(rec, || self.map_signal_safe(rec)) {
            FaultIn::Mapped => {
                // Relaxed: a statistic.
                FIRST_TOUCH_MAPS.fetch_add(1, Ordering::Relaxed);
                REPEAT.with(|r| r.set((0, 0)));
                Ok(())
            }
            FaultIn::AlreadyMapped => self.already_mapped(addr, rec),
            FaultIn::Wedged => Err(Failure::Wedged),
            FaultIn::Failed(why) => Err(why),
        }
    }

    /// A fault on a section recorded as mapped: normally another thread finished mapping it
    /// just after we faulted, and retrying works. If the same address keeps faulting, the
    /// mapping was removed behind our back: map it again once, then give up.
    fn already_mapped(&self, addr: usize, rec: &SectionRecord) -> Result<(), Failure> {
        let count = REPEAT.with(|r| {
            let (last, n) = r.get();
            let n = if last == addr { n + 1 } else { 1 };
            r.set((addr, n));
            n
        });
        match count {
            1 => Ok(()),
            2 => self.map_signal_safe(rec),
            _ => Err(Failure::StillFaulting),
        }
    }

    /// Opens and maps a section's object at its place, then closes it. Async-signal-safe: a
    /// stack buffer for the name, raw system calls, no allocation.
    fn map_signal_safe(&self, rec: &SectionRecord) -> Result<(), Failure> {
        let mut buf = [0u8; 256];
        let name =
            object_name_cstr(&mut buf, &self.name, rec.generation, rec.name.as_str()).ok_or(Failure::NameTooLong)?;
        let fd = self.registry.dir().open_object_cstr(name).map_err(Failure::Open)?;
        let st = fd.stat().map_err(Failure::Stat)?;
        if !st.is_regular {
            return Err(Failure::NotRegular);
        }
        if crate::file_section::is_link(&st) {
            // Following the link takes more stack than Rust's 8 KiB signal stack has left in a
            // debug build: a thread that attached has ours (`install`); any other reports.
            if let Some(room) = os::signal_stack_room().filter(|&r| r < FILE_MAP_STACK) {
                return Err(Failure::SignalStack(room));
            }
            return self.map_file_signal_safe(rec, &fd, &st);
        }
        if st.size != rec.reserved {
            return Err(Failure::Size(st.size));
        }
        if st.uid != os::effective_uid() && !self.allow_foreign_owner {
            return Err(Failure::Owner(st.uid));
        }
        let addr = (self.window_base + rec.offset) as usize;
        // SAFETY: the range is this section's place inside our window reservation (validated
        // against the window size when the record was read); nothing else is mapped there in
        // this process (the fault proves the page was not mapped, and the slot's BUSY/mapped
        // word, see `Mapping::fault_in`, keeps other threads of this process from mapping it
        // concurrently).
        unsafe { os::map_shared_fixed(&fd, addr, rec.reserved as usize, os::Access::ReadWrite) }.map_err(Failure::Map)
        // `fd` is closed here: the mapping keeps the object alive.
    }

    /// Maps a file-backed section (its object `link` names the file, `crate::file_section`)
    /// with the checks `Domain::open_section` makes: the link read into a stack buffer, the
    /// file opened without following a symbolic link, a regular file of this user, as long as
    /// the header page plus the section, its header recording this very address and size,
    /// share-locked like every mapper's. Async-signal-safe: `pread`, `open`, `fstat`, `fcntl`,
    /// `mmap`, `close`; no allocation.
    fn map_file_signal_safe(&self, rec: &SectionRecord, link: &os::Object, st: &os::ObjectStat) -> Result<(), Failure> {
        use crate::file_section::{LinkBuf, data_offset, read_link_cstr};
        let mut buf: LinkBuf = [0; std::mem::size_of::<LinkBuf>()];
        let path = read_link_cstr(link, st, &mut buf).ok_or(Failure::FileBacked)?;
        let file = os::open_file_cstr(path).map_err(Failure::FileOpen)?;
        let fst = file.stat().map_err(Failure::Stat)?;
        if !fst.is_regular {
            return Err(Failure::NotRegular);
        }
        if fst.uid != os::effective_uid() {
            return Err(Failure::FileOwner(fst.uid));
        }
        if fst.size != data_offset() + rec.reserved {
            return Err(Failure::Size(fst.size.saturating_sub(data_offset())));
        }
        match file.try_share_lock_byte(0) {
            Ok(true) => {}
            Ok(false) => return Err(Failure::FileLocked),
            Err(e) => return Err(Failure::FileOpen(e)),
        }
        let addr = (self.window_base + rec.offset) as usize;
        let mut header = [0u8; crate::mapped_file::HEADER_LEN];
        let n = file.read_at(0, &mut header).map_err(Failure::FileOpen)?;
        if n != header.len() || !crate::mapped_file::header_matches(&header, addr as u64, rec.reserved) {
            return Err(Failure::FileHeader);
        }
        // SAFETY: as in `map_signal_safe`: the section's place inside our window reservation,
        // not mapped in this process, kept from other threads by the slot's mapping word.
        unsafe { os::map_file_fixed(&file, addr, rec.reserved as usize, data_offset()) }.map_err(Failure::Map)
        // `file` is closed here: the mapping keeps its open file description, and the shared
        // lock with it, until the section is unmapped or the process ends.
    }

    /// Writes one line to stderr saying why the fault at `addr` was not repaired.
    /// Async-signal-safe: built in a stack buffer, one `write(2)`.
    #[inline(never)]
    fn report(&self, addr: usize, rec: Option<&SectionRecord>, why: &Failure) {
        let mut line = Line::new();
        line.push(b"shmgadget: ");
        let section = |line: &mut Line| {
            if let Some(rec) = rec {
                line.push(b"in section \"").push(rec.name.as_str().as_bytes()).push(b"\" ");
            }
            line.push(b"of domain \"").push(self.name.as_bytes()).push(b"\"");
        };
        match why {
            Failure::NoSection => {
                line.push(b"fault at ").hex(addr as u64).push(b" in the window of domain \"");
                line.push(self.name.as_bytes()).push(b"\", where no live section is (deleted, or a stray pointer)");
            }
            Failure::Bus => {
                line.push(b"SIGBUS at ").hex(addr as u64).push(b" ");
                section(&mut line);
                line.push(
                    b": its object is shorter than the section (truncated?) or the backing store had no page \
                      for it (full? commit memory before touching it)",
                );
            }
            Failure::Protected => {
                line.push(b"access to ").hex(addr as u64).push(b" (offset ");
                line.dec(rec.map_or(0, |r| (addr as u64 - self.window_base) - r.offset)).push(b") ");
                section(&mut line);
                line.push(b", a range this process protected with Section::protect; nothing is remapped");
            }
            Failure::Overrun { block, size, past } => {
                line.push(b"heap overrun: access to ").hex(addr as u64).push(b", ").dec(*past);
                line.push(b" bytes past the end of the block at ").hex(*block as u64).push(b" (");
                line.dec(*size).push(b" bytes) ");
                section(&mut line);
                line.push(b", into its guard page (SHMGADGET_HEAP_GUARD / guard mode); nothing is remapped");
            }
            Failure::Eager => {
                line.push(b"fault at ").hex(addr as u64).push(b" ");
                section(&mut line);
                line.push(
                    b", which this process has not mapped: the domain is attached in eager mode (no mapping \
                      on first touch); call ensure_mapped or map_all before using its address",
                );
            }
            _ => {
                line.push(b"first touch of ").hex(addr as u64).push(b" ");
                section(&mut line);
                line.push(b" cannot map it: ");
                let mut obj = [0u8; 256];
                let object = rec
                    .and_then(|r| object_name_cstr(&mut obj, &self.name, r.generation, r.name.as_str()))
                    .map_or(&b"?"[..], |c| c.to_bytes());
                let errno = |line: &mut Line, e: &std::io::Error| match e.describe() {
                    Some((name, text)) => {
                        line.push(name.as_bytes()).push(b" (").push(text.as_bytes()).push(b")");
                    }
                    None => {
                        line.push(b"os error ").dec(e.code());
                    }
                };
                match why {
                    Failure::Wedged => {
                        line.push(b"another thread of this process started mapping it and never finished");
                    }
                    Failure::StillFaulting => {
                        line.push(
                            b"it is mapped, yet the access keeps faulting (unmapped or protected by other code?)",
                        );
                    }
                    Failure::NameTooLong => {
                        line.push(b"its object name is too long");
                    }
                    Failure::Open(e) => {
                        line.push(b"cannot open its object \"").push(object).push(b"\": ");
                        errno(&mut line, e);
                    }
                    Failure::Stat(e) => {
                        line.push(b"cannot stat its object \"").push(object).push(b"\": ");
                        errno(&mut line, e);
                    }
                    Failure::NotRegular => {
                        line.push(b"its object \"").push(object).push(b"\" is not a regular file");
                    }
                    Failure::Size(size) => {
                        line.push(b"its object \"")
                            .push(object)
                            .push(b"\" is ")
                            .dec(*size)
                            .push(b" bytes but the section has ");
                        line.dec(rec.map_or(0, |r| r.reserved)).push(b" (truncated? remove it with `shmgadget rm`)");
                    }
                    Failure::FileBacked => {
                        line.push(
                            b"it is a file-backed section whose link first touch cannot follow (damaged, or a path \
                              longer than 1024 bytes): open it (Domain::open_section, Domain::map_all) in this \
                              process before using its memory",
                        );
                    }
                    Failure::SignalStack(room) => {
                        line.push(b"it is a file-backed section, and this thread's signal stack has only ");
                        line.dec(*room as u64).push(
                            b" bytes left, too few to follow its link: open the section in this process first \
                              (Domain::open_section, Domain::map_all), or attach from this thread",
                        );
                    }
                    Failure::FileOpen(e) => {
                        line.push(
                            b"cannot open or read the file of this file-backed section (`shmgadget info` names it): ",
                        );
                        errno(&mut line, e);
                    }
                    Failure::FileOwner(uid) => {
                        line.push(b"the file of this file-backed section belongs to uid ").dec(*uid as u64);
                        line.push(b", not to this process's user");
                    }
                    Failure::FileLocked => {
                        line.push(
                            b"the file of this file-backed section is locked exclusively (a MappedFile holds it?)",
                        );
                    }
                    Failure::FileHeader => {
                        line.push(
                            b"the header of this file-backed section's file does not record this address and size \
                              (damaged or replaced?)",
                        );
                    }
                    Failure::Owner(uid) => {
                        line.push(b"its object \"").push(object).push(b"\" belongs to uid ").dec(*uid as u64);
                        line.push(b", not to this process's user (attach with allow_foreign_owner to accept it)");
                    }
                    Failure::Map(e) => {
                        line.push(b"mmap failed: ");
                        errno(&mut line, e);
                    }
                    Failure::NoSection
                    | Failure::Bus
                    | Failure::Eager
                    | Failure::Protected
                    | Failure::Overrun { .. } => {}
                }
            }
        }
        line.push(b"; the access crashes");
        os::write_stderr(line.finish());
    }
}

/// One line of text built without allocating (for the signal handler); silently truncated at
/// its capacity, always ending in a newline.
pub(crate) struct Line {
    buf: [u8; 768],
    len: usize,
}

impl Line {
    pub(crate) fn new() -> Line {
        Line { buf: [0; 768], len: 0 }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) -> &mut Line {
        // One byte stays free for the newline.
        let n = bytes.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    pub(crate) fn dec(&mut self, v: u64) -> &mut Line {
        let mut digits = [0u8; 20];
        let used = decimal(&mut digits, v);
        self.push(used)
    }

    pub(crate) fn hex(&mut self, v: u64) -> &mut Line {
        let mut digits = [0u8; 18];
        let mut i = digits.len();
        let mut n = v;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 15) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        i -= 2;
        digits[i] = b'0';
        digits[i + 1] = b'x';
        self.push(&digits[i..])
    }

    pub(crate) fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }
}

/// Writes `v` in decimal at the end of `digits`; returns the digits used.
fn decimal(digits: &mut [u8; 20], v: u64) -> &[u8] {
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// Writes `shmgadget.<domain>:<gen>:<section>\0` into `buf` without allocating.
fn object_name_cstr<'a>(buf: &'a mut [u8; 256], domain: &str, generation: u64, section: &str) -> Option<&'a CStr> {
    let mut digits = [0u8; 20];
    let generation = decimal(&mut digits, generation);
    let parts: [&[u8]; 6] =
        [crate::names::OBJECT_PREFIX.as_bytes(), domain.as_bytes(), b":", generation, b":", section.as_bytes()];
    let mut at = 0;
    for p in parts {
        buf.get_mut(at..at + p.len())?.copy_from_slice(p);
        at += p.len();
    }
    *buf.get_mut(at)? = 0;
    CStr::from_bytes_with_nul(&buf[..=at]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_built_on_the_stack_match_the_allocating_ones() {
        let mut buf = [0u8; 256];
        for generation in [0, 7, 1234567890123, u64::MAX] {
            let c = object_name_cstr(&mut buf, "dom.a", generation, "sec-1").unwrap();
            assert_eq!(c.to_str().unwrap(), crate::names::section_object("dom.a", generation, "sec-1"));
        }
    }
}
