//! Liveness tokens: a lock on one byte of the registry object that the kernel drops when its
//! holder dies, so a dead process is recognised without trusting pids. Linux:
//! open-file-description byte locks (`fcntl(2)` `F_OFD_SETLK`/`F_OFD_GETLK`), and
//! `pthread_atfork(3)` handlers that take a parent's tokens away from a forked child.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};

use super::object::Object;
use super::process::PID;
use crate::os::tokens::{NO_HANDLE, TOKENS};

fn ofd_lock_call(fd: BorrowedFd<'_>, cmd: libc::c_int, kind: libc::c_int, offset: u64) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // must be 0 for OFD locks
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and `fl` is a valid,
    // exclusively borrowed `struct flock` that the kernel may read and write.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(fl) }
}

impl Object {
    /// Takes an exclusive open-file-description lock on one byte, `fcntl(2)` `F_OFD_SETLK`.
    /// Returns `false` if someone else holds it. The kernel drops the lock when the last
    /// handle of this open file description closes, including when the process dies.
    pub fn try_lock_byte(&self, offset: u64) -> io::Result<bool> {
        match ofd_lock_call(self.borrow(), libc::F_OFD_SETLK, libc::F_WRLCK, offset) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Turns this open file description's lock on one byte into a shared one (or takes a
    /// shared one), `fcntl(2)` `F_OFD_SETLK` with `F_RDLCK`; the change from exclusive is
    /// atomic. Returns `false` if someone else holds it exclusively.
    pub fn try_share_lock_byte(&self, offset: u64) -> io::Result<bool> {
        match ofd_lock_call(self.borrow(), libc::F_OFD_SETLK, libc::F_RDLCK, offset) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether another open file description holds a lock on the byte, `fcntl(2)` `F_OFD_GETLK`.
    /// A lock held through `fd` itself does not count: query through a descriptor that never
    /// takes locks to see every token.
    pub fn byte_is_locked(&self, offset: u64) -> io::Result<bool> {
        let fl = ofd_lock_call(self.borrow(), libc::F_OFD_GETLK, libc::F_WRLCK, offset)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Whether another open file description holds any lock on any byte of the object,
    /// `fcntl(2)` `F_OFD_GETLK` over the whole file (`l_len` 0). Every attached process holds its
    /// liveness token as such a lock, so `false` proves that no process is attached.
    pub fn any_byte_locked(&self) -> io::Result<bool> {
        // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = 0; // to the end of the file, however large
        // SAFETY: `fd` is a valid open descriptor for the duration of the call and `fl` is a valid,
        // exclusively borrowed `struct flock` that the kernel may read and write.
        let rc = unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    fn borrow(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }
}

// ---------------------------------------------------------------------------------------------
// Liveness tokens that follow fork
// ---------------------------------------------------------------------------------------------
//
// A liveness token is an OFD byte lock held through a descriptor of its own (its own open file
// description). `fork(2)` copies descriptors, so a child would hold its parent's token too:
// the parent would stay "alive" while the child lives, and the child's unlock would release
// the parent's token. So every token descriptor is kept in `TOKENS`, a lock-free static table,
// and `pthread_atfork(3)` handlers fix the child up before it runs any code of its own:
//
// | handler | runs in | does |
// |---|---|---|
// | prepare | the forking thread, before fork | calls the hook given to [`install_fork_handlers`] (the domain layer pre-registers a token for the child: [`TokenCell::set_pending`]) |
// | parent  | the parent, after fork | closes the parent's copies of the pending descriptors (the child's copies keep those locks) |
// | child   | the child, after fork  | closes the inherited token descriptors (the parent's locks stay with the parent), adopts the pending ones, writes its pid into their entries, forgets the cached pid, counts a fork |
//
// The child handler runs where only async-signal-safe calls are allowed: it uses atomics,
// `close(2)` and `getpid(2)` only, and takes no lock.

// The table itself (`TOKENS`, `TokenCell`, `token_for_address`) is `os/tokens.rs`, shared
// with Windows; the handles in it are descriptors here.

static FORK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FORK_PREPARE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times this process's ancestry forked into it: 0 in a process that was never a fork
/// child of an attached process, bumped by the `pthread_atfork` child handler. A value that
/// changed since it was recorded means "this is a forked child now". One Relaxed load.
#[inline]
pub fn fork_generation() -> u64 {
    // Relaxed: changed only in a child right after fork, when it has a single thread.
    FORK_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// Closes a token descriptor taken out of the table ([`NO_HANDLE`]: none).
pub(in crate::os) fn close_raw(fd: usize) {
    if fd != NO_HANDLE {
        // SAFETY: `fd` was taken out of a token slot by an atomic swap, so we are its only
        // closer; close(2) is async-signal-safe.
        unsafe { libc::close(fd as i32) };
    }
}

/// The descriptor of a token object, for the table (the table closes it).
pub(in crate::os) fn raw_of(token: Object) -> usize {
    token.0.into_raw_fd() as usize
}

extern "C" fn fork_prepare() {
    use std::sync::atomic::Ordering;
    // Relaxed: the hook is stored once before the handlers are registered (Once orders it).
    let hook = FORK_PREPARE.load(Ordering::Relaxed);
    if hook != 0 {
        // SAFETY: only `install_fork_handlers` stores here, and it stores a `fn()`.
        let hook: fn() = unsafe { std::mem::transmute::<usize, fn()>(hook) };
        // A panic must not unwind into libc.
        let _ = std::panic::catch_unwind(hook);
    }
}

extern "C" fn fork_parent() {
    use std::sync::atomic::Ordering;
    for t in &TOKENS {
        // AcqRel: takes the descriptor stored (Release) by `set_pending`; we are its closer.
        close_raw(t.pending_handle.swap(NO_HANDLE, Ordering::AcqRel));
        t.pending_tag.store(0, Ordering::Relaxed);
        t.pending_pid.store(0, Ordering::Relaxed);
    }
}

extern "C" fn fork_child() {
    use std::sync::atomic::Ordering;
    // Relaxed everywhere: the child has a single thread until this handler returns.
    PID.store(0, Ordering::Relaxed);
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    for t in &TOKENS {
        if !t.used.load(Ordering::Relaxed) {
            continue;
        }
        close_raw(t.handle.swap(NO_HANDLE, Ordering::Relaxed));
        let pending = t.pending_handle.swap(NO_HANDLE, Ordering::Relaxed);
        let pid_word = t.pending_pid.swap(0, Ordering::Relaxed);
        if pending != NO_HANDLE {
            if pid_word != 0 {
                // SAFETY: `set_pending`'s contract: the word stays valid while the pending
                // token is recorded (it lives in the registry mapping, which the fork copied).
                let word = unsafe { &*(pid_word as *const std::sync::atomic::AtomicU32) };
                word.store(pid, Ordering::Relaxed);
            }
            t.handle.store(pending, Ordering::Relaxed);
            t.tag.store(t.pending_tag.swap(0, Ordering::Relaxed), Ordering::Relaxed);
        } else {
            t.tag.store(0, Ordering::Relaxed);
        }
    }
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the fork handlers described above (once per process; later calls do nothing).
/// `prepare` runs in the forking thread before every `fork(2)`; it may take locks and make
/// system calls, and must not panic out (a panic is caught and ignored).
pub fn install_fork_handlers(prepare: fn()) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Relaxed: published to the handlers by the Once and by pthread_atfork itself.
        FORK_PREPARE.store(prepare as usize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: registers three handlers with no preconditions; see their comments.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    });
}
