//! This process and its threads: ids, and whether a thread still exists.

use std::io;

/// This process's id: `getpid(2)` once, then cached (a forked child refreshes the cache in a
/// `pthread_atfork(3)` handler), because hot paths such as locking record it.
#[inline]
pub fn current_pid() -> u32 {
    // Relaxed: the value is the same whichever thread stored it.
    match PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => refresh_pid(),
        pid => pid,
    }
}

pub(super) static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn refresh_pid() -> u32 {
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        extern "C" fn forget_pid() {
            // Relaxed: the child has a single thread right after fork.
            PID.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: registers a handler with no preconditions; it only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    // Relaxed: see `current_pid`.
    PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    pid
}

/// This process's effective user id, `geteuid(2)`.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}
/// Whether thread `tid` exists in this process's pid namespace (`/proc/<tid>` exists: every
/// thread of every process has one there, hidden from listings but reachable). An error other
/// than "not found" counts as existing, so a thread is never declared gone by mistake.
pub fn thread_exists(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::metadata(format!("/proc/{tid}")) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// The process (thread group) thread `tid` belongs to, from `/proc/<tid>/status`; `None` if
/// it does not exist or cannot be read. For display and to match a lock word's thread with a
/// recorded holder pid.
pub fn thread_group(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// This thread's id (`gettid(2)`), as the kernel numbers threads in this pid namespace.
pub fn current_tid() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}

/// Whether a thread id names the same thread for every process on the machine while that
/// thread lives. Not on Linux: thread ids repeat across pid namespaces, and a lock word's
/// thread id is the holder's own namespace's.
pub const THREAD_IDS_MACHINE_WIDE: bool = false;

/// This process's pid namespace (the inode of `/proc/self/ns/pid`, `stat(2)`), or 0 when it
/// cannot be known or when the mounted `/proc` belongs to another namespace (`/proc/self`,
/// `readlink(2)`, does not name this process by its own pid): then thread ids in `/proc` are
/// not ours to interpret.
#[cfg_attr(loom, allow(dead_code))]
pub fn proc_pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok());
    if me != Some(current_pid()) {
        return 0;
    }
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// Whether the children this process forks are born in its own pid namespace
/// (`/proc/self/ns/pid_for_children` is the same namespace as `/proc/self/ns/pid`; not after
/// `unshare(CLONE_NEWPID)`). `false` when either cannot be read.
pub fn children_share_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata("/proc/self/ns/pid"), std::fs::metadata("/proc/self/ns/pid_for_children")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether thread `tid` of this pid namespace is alive: `kill(tid, 0)` finds it (the kernel
/// looks the id up in our namespace, whatever the mounted `/proc` shows: `hidepid` makes other
/// users' tasks read as "not found" there), and `/proc/<tid>/stat`, if readable, does not say
/// zombie or dead (a killed process's main thread stays a zombie until reaped). Anything else
/// counts as alive, so a thread is never declared dead by mistake.
pub fn thread_alive(tid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(tid as i32) else { return false };
    // ESRCH: no task has this id here. EPERM (not ours to signal) means it exists.
    if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any byte.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|c| c != 'Z' && c != 'X'),
        Err(_) => true,
    }
}
