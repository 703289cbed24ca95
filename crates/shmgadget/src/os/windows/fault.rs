//! Faults: a vectored exception handler so a first touch of an unmapped section can map it
//! (the original SHM-NT's `shm_map_by_exception`), passing every other exception on, and
//! writing a line to stderr from inside the handler. Windows: `AddVectoredExceptionHandler`,
//! `WriteFile`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use windows_sys::Win32::Foundation::{EXCEPTION_ACCESS_VIOLATION, EXCEPTION_IN_PAGE_ERROR, GetLastError, SetLastError};
use windows_sys::Win32::Storage::FileSystem::WriteFile;
use windows_sys::Win32::System::Console::{GetStdHandle, STD_ERROR_HANDLE};
use windows_sys::Win32::System::Diagnostics::Debug::{AddVectoredExceptionHandler, EXCEPTION_POINTERS};

/// Which fault a hook is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSignal {
    /// `EXCEPTION_ACCESS_VIOLATION`: an access to an unmapped or protected address.
    Segv,
    /// `EXCEPTION_IN_PAGE_ERROR`: a page the backing file could not provide.
    Bus,
}

/// Decides whether a fault at an address was ours and repaired (`true`: the faulting
/// instruction runs again). It runs in the faulting thread, inside the exception dispatcher:
/// it must not take locks that the interrupted code may hold.
pub type FaultHook = fn(FaultSignal, usize) -> bool;

static HOOK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

const EXCEPTION_CONTINUE_EXECUTION: i32 = -1;
const EXCEPTION_CONTINUE_SEARCH: i32 = 0;

/// Installs `hook` in a vectored exception handler called first
/// (`AddVectoredExceptionHandler(1, ..)`). Idempotent: vectored handlers cannot be displaced
/// by other code, so a second call only replaces the hook. Returns whether the handler was
/// added now.
pub fn install_fault_hook(hook: FaultHook) -> io::Result<bool> {
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Release: pairs with the Acquire load in `handler`.
    HOOK.store(hook as usize, Ordering::Release);
    if INSTALLED.load(Ordering::Relaxed) {
        return Ok(false);
    }
    // SAFETY: `handler` has the PVECTORED_EXCEPTION_HANDLER signature and lives forever.
    let h = unsafe { AddVectoredExceptionHandler(1, Some(handler)) };
    if h.is_null() {
        return Err(io::Error::last_os_error());
    }
    INSTALLED.store(true, Ordering::Relaxed);
    Ok(true)
}

/// Whether our handler is installed.
pub fn fault_hook_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

unsafe extern "system" fn handler(info: *mut EXCEPTION_POINTERS) -> i32 {
    // SAFETY: the dispatcher passes valid exception pointers for the call.
    let rec = unsafe { &*(*info).ExceptionRecord };
    let which = match rec.ExceptionCode {
        EXCEPTION_ACCESS_VIOLATION => FaultSignal::Segv,
        EXCEPTION_IN_PAGE_ERROR => FaultSignal::Bus,
        _ => return EXCEPTION_CONTINUE_SEARCH,
    };
    if rec.NumberParameters < 2 {
        return EXCEPTION_CONTINUE_SEARCH;
    }
    // For both codes, parameter 1 is the address that was accessed.
    let addr = rec.ExceptionInformation[1];
    // Acquire: pairs with the Release store in `install_fault_hook`.
    let hook = HOOK.load(Ordering::Acquire);
    if hook == 0 {
        return EXCEPTION_CONTINUE_SEARCH;
    }
    // SAFETY: HOOK only ever holds a `FaultHook` stored by `install_fault_hook`.
    let f: FaultHook = unsafe { std::mem::transmute::<usize, FaultHook>(hook) };
    // SAFETY: no preconditions; the interrupted code must not see our calls' last error.
    let saved = unsafe { GetLastError() };
    let handled = f(which, addr);
    // SAFETY: as above.
    unsafe { SetLastError(saved) };
    if handled { EXCEPTION_CONTINUE_EXECUTION } else { EXCEPTION_CONTINUE_SEARCH }
}

/// Writes `msg` to standard error (`GetStdHandle(STD_ERROR_HANDLE)`, `WriteFile`), ignoring
/// failure. No allocation and no lock, so the fault handler may use it.
pub fn write_stderr(msg: &[u8]) {
    // SAFETY: no preconditions.
    let h = unsafe { GetStdHandle(STD_ERROR_HANDLE) };
    if h.is_null() || h == windows_sys::Win32::Foundation::INVALID_HANDLE_VALUE {
        return;
    }
    let mut rest = msg;
    while !rest.is_empty() {
        let mut n = 0u32;
        // SAFETY: `rest` is valid for its length; a synchronous write.
        let ok = unsafe { WriteFile(h, rest.as_ptr(), rest.len().min(1 << 30) as u32, &mut n, std::ptr::null_mut()) };
        if ok == 0 || n == 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Windows runs a vectored exception handler on the faulting thread's own stack: there is no
/// alternate signal stack to give a thread.
pub fn ensure_signal_stack(_min: usize) {}

/// How much room the handler's stack has left, where an alternate stack is used: never on
/// Windows (the faulting thread's own stack), so the handler need not refuse.
pub fn signal_stack_room() -> Option<usize> {
    None
}
