//! Faults: catching `SIGSEGV`/`SIGBUS` so a first touch of an unmapped section can map it,
//! chaining every other fault to the handler installed before ours, and writing a line to
//! stderr from inside the handler. Linux: `sigaction(2)`, `write(2)`.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::io;

/// Which fault a hook is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSignal {
    /// `SIGSEGV`: an access to an unmapped or protected address.
    Segv,
    /// `SIGBUS`: an access past the end of a mapped object, or to a page the backing store
    /// could not provide.
    Bus,
}

/// Decides whether a fault at an address was ours and repaired (`true`: the faulting
/// instruction runs again). It runs inside a signal handler: it must be async-signal-safe (no
/// allocation, no locks that the interrupted code may hold).
pub type FaultHook = fn(FaultSignal, usize) -> bool;

/// The hook, as a function address (0: none).
static HOOK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The action that was installed before ours, per signal. Two slots so that a re-install can
/// write one while a handler may be reading the other; `current` says which is valid
/// (`usize::MAX`: none). Slots are written only under `INSTALL_LOCK`.
struct SavedAction {
    slots: [UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>; 2],
    current: std::sync::atomic::AtomicUsize,
}

// SAFETY: slots are written only under INSTALL_LOCK, into the slot `current` does not name,
// before `current` is switched to it with a Release store; readers load `current` with Acquire
// and read only that slot.
unsafe impl Sync for SavedAction {}

static PREV_SEGV: SavedAction = SavedAction {
    slots: [UnsafeCell::new(std::mem::MaybeUninit::uninit()), UnsafeCell::new(std::mem::MaybeUninit::uninit())],
    current: std::sync::atomic::AtomicUsize::new(usize::MAX),
};
static PREV_BUS: SavedAction = SavedAction {
    slots: [UnsafeCell::new(std::mem::MaybeUninit::uninit()), UnsafeCell::new(std::mem::MaybeUninit::uninit())],
    current: std::sync::atomic::AtomicUsize::new(usize::MAX),
};
static INSTALL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    /// Set while this thread runs a previous handler we chained to: if that handler chains
    /// back to us (it saved ours as its own previous one), we stop instead of looping.
    static CHAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn trampoline_address() -> libc::sighandler_t {
    trampoline as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) as libc::sighandler_t
}

/// Installs `hook` as the handler of `SIGSEGV` and `SIGBUS` (`sigaction(2)` with
/// `SA_SIGINFO | SA_ONSTACK | SA_NODEFER`), remembering the previous actions to chain to.
/// Idempotent; if other code replaced our handler since, ours goes back in front and the
/// newcomer becomes the one we chain to. Returns whether anything was (re)installed.
pub fn install_fault_hook(hook: FaultHook) -> io::Result<bool> {
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Release: pairs with the Acquire load in `trampoline`.
    HOOK.store(hook as usize, std::sync::atomic::Ordering::Release);
    let mut changed = false;
    for (sig, saved) in [(libc::SIGSEGV, &PREV_SEGV), (libc::SIGBUS, &PREV_BUS)] {
        // SAFETY: `sigaction` with a null new action only reads the current one into `cur`,
        // a valid, writable struct.
        let cur = unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut cur) != 0 {
                return Err(io::Error::last_os_error());
            }
            cur
        };
        if cur.sa_sigaction == trampoline_address() {
            continue;
        }
        // Relaxed: `current` is only written under INSTALL_LOCK, which we hold.
        let old = saved.current.load(std::sync::atomic::Ordering::Relaxed);
        let next = if old == 0 { 1 } else { 0 };
        // SAFETY: we hold INSTALL_LOCK and `next` is not the slot handlers may read.
        unsafe { (*saved.slots[next].get()).write(cur) };
        // Release: publishes the slot written above; pairs with the Acquire load in `chain`.
        saved.current.store(next, std::sync::atomic::Ordering::Release);
        // SAFETY: `ours` is a fully initialised sigaction (zeroed, then the handler, flags and
        // an empty mask set); `trampoline` has the SA_SIGINFO signature.
        unsafe {
            let mut ours: libc::sigaction = std::mem::zeroed();
            ours.sa_sigaction = trampoline_address();
            ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut ours.sa_mask);
            if libc::sigaction(sig, &ours, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        changed = true;
    }
    Ok(changed)
}

/// Whether our handler is the current `SIGSEGV` action.
pub fn fault_hook_installed() -> bool {
    // SAFETY: reads the current action into a valid, writable struct.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut cur) == 0 && cur.sa_sigaction == trampoline_address()
    }
}

extern "C" fn trampoline(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: errno is thread-local and always valid to read and write; we restore it so the
    // interrupted code never sees our system calls' errno.
    let saved_errno = unsafe { *libc::__errno_location() };
    let which = if sig == libc::SIGBUS { FaultSignal::Bus } else { FaultSignal::Segv };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSEGV/SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    // Acquire: pairs with the Release store in `install_fault_hook`.
    let hook = HOOK.load(std::sync::atomic::Ordering::Acquire);
    let handled = hook != 0 && {
        // SAFETY: HOOK only ever holds a `FaultHook` stored by `install_fault_hook`.
        let f: FaultHook = unsafe { std::mem::transmute::<usize, FaultHook>(hook) };
        f(which, addr)
    };
    if !handled {
        // SAFETY: forwarded unchanged from the kernel.
        unsafe { chain(sig, info, ctx) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Passes a fault that is not ours to the action installed before ours.
///
/// # Safety
/// Only from the signal handler, with the kernel's arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let saved = if sig == libc::SIGBUS { &PREV_BUS } else { &PREV_SEGV };
    // Acquire: pairs with the Release store in `install_fault_hook`.
    let idx = saved.current.load(std::sync::atomic::Ordering::Acquire);
    if idx > 1 || CHAINING.with(|c| c.get()) {
        reset_default(sig);
        return;
    }
    // SAFETY: slot `idx` was initialised before `current` was set to it (see SavedAction).
    let prev: libc::sigaction = unsafe { (*saved.slots[idx].get()).assume_init_read() };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Returning re-runs the faulting instruction, which faults again and now takes the
        // default action (a synchronous fault cannot really be ignored): the process dies
        // with the signal, as it would have without us.
        reset_default(sig);
        return;
    }
    CHAINING.with(|c| c.set(true));
    // SAFETY: `h` is the handler the previous owner installed, with the signature its flags
    // declare; we call it as the kernel would have.
    unsafe {
        if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f = std::mem::transmute::<
                libc::sighandler_t,
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void),
            >(h);
            f(sig, info, ctx);
        } else {
            let f = std::mem::transmute::<libc::sighandler_t, extern "C" fn(libc::c_int)>(h);
            f(sig);
        }
    }
    CHAINING.with(|c| c.set(false));
}

fn reset_default(sig: libc::c_int) {
    // SAFETY: sigaction is async-signal-safe; `act` is a valid zeroed struct naming SIG_DFL.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
}

/// A signal stack of ours for one thread (see [`ensure_signal_stack`]); on thread exit the
/// previous one goes back if ours is still installed, then ours is unmapped.
struct OwnStack {
    base: usize,
    len: usize,
    previous: libc::stack_t,
}

impl Drop for OwnStack {
    fn drop(&mut self) {
        // SAFETY: reads the current alternate stack into a valid struct.
        let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) } != 0 {
            return; // unknown: leak rather than unmap a stack that may be in use
        }
        if cur.ss_sp as usize == self.base + page() {
            if cur.ss_flags & libc::SS_ONSTACK != 0 {
                return; // running on it (not at thread exit): leak
            }
            // SAFETY: puts back the stack installed before ours (std's, still mapped: std
            // disables the current stack before unmapping its own, and then ours would not be
            // current here).
            unsafe { libc::sigaltstack(&self.previous, std::ptr::null_mut()) };
        }
        // SAFETY: our own mapping, no longer this thread's alternate stack.
        unsafe { libc::munmap(self.base as *mut c_void, self.len) };
    }
}

fn page() -> usize {
    super::map::page_size()
}

thread_local! {
    static OWN_STACK: std::cell::RefCell<Option<OwnStack>> = const { std::cell::RefCell::new(None) };
}

/// Makes sure the calling thread's alternate signal stack (`sigaltstack(2)`) has at least
/// `min` bytes: if it has less (Rust gives each thread 8 KiB), installs one of `min` bytes
/// (`mmap(2)`, with a guard page below it) for the rest of the thread's life. The fault hook
/// runs on that stack, and some of its work (first touch of a file-backed section) needs more
/// than 8 KiB in a debug build. Never fails: without it the handler reports instead of mapping.
pub fn ensure_signal_stack(min: usize) {
    let _ = OWN_STACK.try_with(|own| {
        let Ok(mut own) = own.try_borrow_mut() else { return };
        if own.is_some() {
            return;
        }
        // SAFETY: reads the current alternate stack into a valid struct.
        let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) } != 0
            || cur.ss_flags & libc::SS_ONSTACK != 0
            || (cur.ss_flags & libc::SS_DISABLE == 0 && cur.ss_size >= min)
        {
            return;
        }
        let len = min.next_multiple_of(page()) + page();
        // SAFETY: a fresh anonymous mapping; nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return;
        }
        // SAFETY: the lowest page of our own mapping becomes its guard.
        unsafe { libc::mprotect(p, page(), libc::PROT_NONE) };
        let new = libc::stack_t { ss_sp: (p as usize + page()) as *mut c_void, ss_flags: 0, ss_size: len - page() };
        // SAFETY: `new` describes our mapping above its guard page.
        if unsafe { libc::sigaltstack(&new, std::ptr::null_mut()) } != 0 {
            // SAFETY: our own mapping, never installed.
            unsafe { libc::munmap(p, len) };
            return;
        }
        *own = Some(OwnStack { base: p as usize, len, previous: cur });
    });
}

/// Bytes left below the stack pointer on the alternate signal stack, when the caller runs on
/// it (`None`: on the thread's ordinary stack). Async-signal-safe: one `sigaltstack(2)`.
pub fn signal_stack_room() -> Option<usize> {
    // SAFETY: reads the current alternate stack into a valid struct.
    let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) } != 0 || cur.ss_flags & libc::SS_ONSTACK == 0 {
        return None;
    }
    let here = &cur as *const libc::stack_t as usize;
    Some(here.saturating_sub(cur.ss_sp as usize))
}

/// Writes `msg` to standard error (descriptor 2) with `write(2)`, retrying on `EINTR` and
/// short writes, ignoring failure. Async-signal-safe: no allocation and no lock (unlike
/// `eprintln!`, which takes the lock of `std::io::stderr()`), so the fault handler may use it.
pub fn write_stderr(msg: &[u8]) {
    let mut rest = msg;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid, readable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        if n > 0 {
            rest = &rest[n as usize..];
        } else if n == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}
