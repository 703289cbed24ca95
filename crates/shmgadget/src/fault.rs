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
//! and `openat`/`fstat`/`mmap`/`close` as raw system calls. errno is saved and restored.
//!
//! # Protocols
//! * **Domain table.** `DOMAINS` holds pointers to attached domains. A handler increments
//!   `ACTIVE` before reading the table and decrements it when done; detaching clears its entry
//!   and then waits for `ACTIVE` to reach zero before the domain can be freed. Both sides use
//!   SeqCst: each stores one variable and then loads the other (a store-load pattern that
//!   weaker orderings do not forbid from reordering), so either the handler sees the cleared
//!   entry or the detacher sees the handler active.
//! * **Per-slot mapping word** (`DomainInner::mapped[slot]`):
//!
//!   | value          | meaning                                   | next                 |
//!   |----------------|-------------------------------------------|----------------------|
//!   | `g` (not `gen`) | another generation, or 0: not mapped here | `gen \| BUSY` (CAS)  |
//!   | `gen \| BUSY`   | one thread is mapping generation `gen`    | `gen`, or back to `g` on failure |
//!   | `gen`          | mapped                                    | (stays)              |
//!
//!   The thread that wins the CAS maps; others that fault on the same section meanwhile spin
//!   until the word leaves `BUSY` and then retry their instruction, so each section is mapped
//!   once however many threads touch it at the same time.
//!
//! # What it does not cover
//! * System calls: the kernel never raises `SIGSEGV` for a bad buffer, it returns `EFAULT`.
//!   Call [`ensure_mapped`] before passing section memory to the kernel (shmgadget does so
//!   itself).
//! * Threads that block `SIGSEGV`, and hosts that own it: attach with `eager` mode
//!   (`SHMGADGET_EAGER=1`), which installs no handler and maps every section at attach; new
//!   sections are then reached through [`ensure_mapped`] or `Domain::map_all`.
//! * Debuggers stop at every first touch: in gdb, `handle SIGSEGV nostop noprint pass`.
//! * A deleted section is never remapped: touching it in a process that had not mapped it is
//!   an ordinary crash.

use std::ffi::CStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::domain::DomainInner;
use crate::error::{Error, ErrorKind, Result};
use crate::os::{self, FaultSignal};
use crate::registry::SectionRecord;

/// Most domains one process can have attached at once.
pub const MAX_ATTACHED_DOMAINS: usize = 64;

const BUSY: u64 = 1 << 63;

static DOMAINS: [AtomicPtr<DomainInner>; MAX_ATTACHED_DOMAINS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_ATTACHED_DOMAINS];
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static FIRST_TOUCH_MAPS: AtomicU64 = AtomicU64::new(0);

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

/// Installs (or re-installs, if replaced) the handler.
pub(crate) fn install() -> Result<()> {
    os::install_fault_hook(on_fault)
        .map(|_| ())
        .map_err(|e| Error::from_io("cannot install the first-touch fault handler", e))
}

/// Makes an attached domain visible to the handler and to [`ensure_mapped`].
pub(crate) fn register(inner: &Arc<DomainInner>) -> Result<()> {
    let ptr = Arc::as_ptr(inner).cast_mut();
    for slot in &DOMAINS {
        // SeqCst: see the domain-table protocol in the module docs.
        if slot.compare_exchange(std::ptr::null_mut(), ptr, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Ok(());
        }
    }
    Err(Error::new(
        ErrorKind::RegistryFull,
        format!("this process already has {MAX_ATTACHED_DOMAINS} domains attached; detach one first"),
    ))
}

/// Removes a domain from the table and waits until no handler can still be using it.
pub(crate) fn unregister(inner: &DomainInner) {
    let ptr = (inner as *const DomainInner).cast_mut();
    for slot in &DOMAINS {
        // SeqCst: see the domain-table protocol in the module docs.
        let _ = slot.compare_exchange(ptr, std::ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst);
    }
    // SeqCst: pairs with the handler's increment (store-load pattern, see module docs).
    while ACTIVE.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// Runs `f` on the attached domain whose window contains `addr`. Async-signal-safe.
fn with_domain<R>(addr: usize, f: impl FnOnce(&DomainInner) -> R) -> Option<R> {
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
        if addr >= d.window_base as usize && addr - (d.window_base as usize) < d.window_size as usize {
            out = Some(f(d));
            break;
        }
    }
    // Release suffices for the decrement itself, but SeqCst keeps one story for the counter.
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    out
}

/// The fault hook. Async-signal-safe.
fn on_fault(sig: FaultSignal, addr: usize) -> bool {
    // SIGBUS inside a mapped section means its object is shorter than the mapping (truncated
    // by someone) or the backing store had no page for it: mapping again cannot help.
    if sig == FaultSignal::Bus {
        return false;
    }
    with_domain(addr, |d| d.first_touch && d.fault_in(addr)).unwrap_or(false)
}

impl DomainInner {
    /// Maps the section covering `addr`, if any. Async-signal-safe.
    fn fault_in(&self, addr: usize) -> bool {
        let offset = (addr - self.window_base as usize) as u64;
        let Some(rec) = self.registry.lookup_offset(offset) else {
            return false; // no live section there: a genuine crash
        };
        let word = &self.mapped[rec.slot as usize];
        let mut spins = 0u64;
        loop {
            // Acquire: pairs with the Release store that ends a mapping, so a thread that sees
            // `gen` retries its access after the mapping exists.
            let cur = word.load(Ordering::Acquire);
            if cur == rec.generation {
                return self.already_mapped(addr, &rec);
            }
            if cur == rec.generation | BUSY {
                spins += 1;
                if spins > 1 << 26 {
                    return false; // the mapping thread is wedged; crash rather than hang
                }
                std::hint::spin_loop();
                continue;
            }
            // Acquire on success: orders our mapping after the previous owner's (see table).
            if word.compare_exchange(cur, rec.generation | BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                let ok = self.map_signal_safe(&rec);
                // Release: publishes the new mapping to threads that read `gen`.
                word.store(if ok { rec.generation } else { cur }, Ordering::Release);
                if ok {
                    // Relaxed: a statistic.
                    FIRST_TOUCH_MAPS.fetch_add(1, Ordering::Relaxed);
                    REPEAT.with(|r| r.set((0, 0)));
                }
                return ok;
            }
        }
    }

    /// A fault on a section recorded as mapped: normally another thread finished mapping it
    /// just after we faulted, and retrying works. If the same address keeps faulting, the
    /// mapping was removed behind our back: map it again once, then give up.
    fn already_mapped(&self, addr: usize, rec: &SectionRecord) -> bool {
        let count = REPEAT.with(|r| {
            let (last, n) = r.get();
            let n = if last == addr { n + 1 } else { 1 };
            r.set((addr, n));
            n
        });
        match count {
            1 => true,
            2 => self.map_signal_safe(rec),
            _ => false,
        }
    }

    /// Opens and maps a section's object at its place. Async-signal-safe: a stack buffer for
    /// the name, raw system calls, no allocation.
    fn map_signal_safe(&self, rec: &SectionRecord) -> bool {
        let mut buf = [0u8; 256];
        let Some(name) = object_name_cstr(&mut buf, &self.name, rec.generation, rec.name.as_str()) else {
            return false;
        };
        let Ok(fd) = os::open_object_cstr(os::borrow(self.registry.dir()), name) else {
            return false; // deleted meanwhile, or no permission: not ours to fix
        };
        let Ok(st) = os::stat_object(os::borrow(&fd)) else {
            return false;
        };
        if !st.is_regular || st.size != rec.reserved || (st.uid != os::effective_uid() && !self.allow_foreign_owner) {
            return false;
        }
        let addr = (self.window_base + rec.offset) as usize;
        // SAFETY: the range is this section's place inside our window reservation (validated
        // against the window size when the record was read); nothing else is mapped there in
        // this process (the fault proves the page was not mapped, and the slot's BUSY/mapped
        // word keeps other threads of this process from mapping it concurrently).
        unsafe { os::map_shared_fixed(os::borrow(&fd), addr, rec.reserved as usize, true) }.is_ok()
    }
}

/// Writes `shmgadget.<domain>:<gen>:<section>\0` into `buf` without allocating.
fn object_name_cstr<'a>(buf: &'a mut [u8; 256], domain: &str, generation: u64, section: &str) -> Option<&'a CStr> {
    let mut digits = [0u8; 20];
    let mut n = generation;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let parts: [&[u8]; 6] =
        [crate::names::OBJECT_PREFIX.as_bytes(), domain.as_bytes(), b":", &digits[i..], b":", section.as_bytes()];
    let mut at = 0;
    for p in parts {
        buf.get_mut(at..at + p.len())?.copy_from_slice(p);
        at += p.len();
    }
    *buf.get_mut(at)? = 0;
    CStr::from_bytes_with_nul(&buf[..=at]).ok()
}

/// Makes sure every section overlapping `[ptr, ptr + len)` is mapped in this process, for code
/// about to hand that memory to the kernel (a system call never faults, it fails with
/// `EFAULT`). Fails with `InvalidArgument` if the range leaves the attached domains' windows,
/// and `NotFound` if part of it lies where no live section is.
pub fn ensure_mapped(ptr: *const u8, len: usize) -> Result<()> {
    crate::domain::ensure_mapped(ptr as usize, len)
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
