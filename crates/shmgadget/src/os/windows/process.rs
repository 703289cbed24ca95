//! This process and its threads: ids, and whether a thread still exists. Windows thread ids
//! are unique machine-wide while the thread exists (one namespace), so any process can ask.

use windows_sys::Win32::Foundation::{CloseHandle, STILL_ACTIVE};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcessId, GetCurrentThreadId, GetExitCodeThread, GetProcessIdOfThread, OpenThread,
    THREAD_QUERY_LIMITED_INFORMATION,
};

/// This process's id, `GetCurrentProcessId` (a read of the thread environment block).
#[inline]
pub fn current_pid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { GetCurrentProcessId() }
}

/// Windows has no uid: 0, which is also the owner every [`super::ObjectStat`] reports.
pub fn effective_uid() -> u32 {
    0
}

/// This thread's id, `GetCurrentThreadId`.
pub fn current_tid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { GetCurrentThreadId() }
}

/// Runs `f` on a query handle of thread `tid` (`OpenThread`), `None` if it cannot be opened.
fn with_thread<T>(tid: u32, f: impl FnOnce(windows_sys::Win32::Foundation::HANDLE) -> T) -> Option<T> {
    if tid == 0 {
        return None;
    }
    // SAFETY: no preconditions; a null result means no such thread (or no access).
    let h = unsafe { OpenThread(THREAD_QUERY_LIMITED_INFORMATION, 0, tid) };
    if h.is_null() {
        return None;
    }
    let r = f(h);
    // SAFETY: `h` was opened above and is closed once.
    unsafe { CloseHandle(h) };
    Some(r)
}

/// Whether thread `tid` exists (`OpenThread` succeeds; a thread object lingers while a handle
/// to it is open).
pub fn thread_exists(tid: u32) -> bool {
    with_thread(tid, |_| ()).is_some()
}

/// The process thread `tid` belongs to, `GetProcessIdOfThread`.
pub fn thread_group(tid: u32) -> Option<u32> {
    // SAFETY: `h` is a valid thread handle for the call.
    with_thread(tid, |h| unsafe { GetProcessIdOfThread(h) }).filter(|&p| p != 0)
}

/// Whether a thread id names the same thread for every process on the machine while that
/// thread lives: yes on Windows (thread ids are machine-wide).
pub const THREAD_IDS_MACHINE_WIDE: bool = true;

/// One pid namespace per machine on Windows (thread ids are machine-wide): a constant that
/// differs from every Linux namespace inode that could share a domain under Wine (inodes of
/// `/proc/self/ns/pid` are large), so such a Linux waiter never judges our thread ids.
#[cfg_attr(loom, allow(dead_code))]
pub fn proc_pid_namespace() -> u64 {
    1
}

/// Children are born in the one namespace there is.
pub fn children_share_pid_namespace() -> bool {
    true
}

/// Whether thread `tid` still runs: `OpenThread` and `GetExitCodeThread` says `STILL_ACTIVE`.
/// A thread that cannot be opened counts as gone.
pub fn thread_alive(tid: u32) -> bool {
    with_thread(tid, |h| {
        let mut code = 0u32;
        // SAFETY: `h` is a valid thread handle; `code` a valid out-pointer.
        let ok = unsafe { GetExitCodeThread(h, &mut code) };
        ok == 0 || code == STILL_ACTIVE as u32
    })
    .unwrap_or(false)
}

/// Whether this process runs under Wine: ntdll exports `wine_get_version` there.
#[allow(dead_code)]
pub fn running_under_wine() -> bool {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    let ntdll = super::wide::str("ntdll.dll");
    // SAFETY: `ntdll` is NUL-terminated UTF-16; ntdll is loaded in every process.
    let m = unsafe { GetModuleHandleW(ntdll.as_ptr()) };
    // SAFETY: `m` is ntdll's module handle (or null, then the call fails); the name is
    // NUL-terminated ASCII.
    !m.is_null() && unsafe { GetProcAddress(m, c"wine_get_version".as_ptr().cast()) }.is_some()
}
