//! Liveness tokens: a lock on one byte of the registry object that the kernel drops when its
//! holder dies, so a dead process is recognised without trusting pids. Linux:
//! open-file-description byte locks (`fcntl(2)` `F_OFD_SETLK`/`F_OFD_GETLK`), and
//! `pthread_atfork(3)` handlers that take a parent's tokens away from a forked child.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};

use super::object::Object;
use super::process::PID;

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

/// Token cells a process can hold at once (one per attached domain).
pub const MAX_TOKEN_CELLS: usize = 256;

struct TokenSlot {
    /// Whether a [`TokenCell`] owns this slot.
    used: std::sync::atomic::AtomicBool,
    /// Descriptor holding the current token's lock, -1 when none.
    fd: std::sync::atomic::AtomicI32,
    /// The current token's tag (the caller's name for it), 0 when none.
    tag: std::sync::atomic::AtomicU64,
    /// A token made for the child of a fork in progress: descriptor, tag, and the address of
    /// the entry's pid word (0 when none).
    pending_fd: std::sync::atomic::AtomicI32,
    pending_tag: std::sync::atomic::AtomicU64,
    pending_pid: std::sync::atomic::AtomicUsize,
    /// The address range the owner says the token stands for (its domain's window), so a
    /// token can be found from an address without a lock ([`token_for_address`]); 0 when none.
    window_base: std::sync::atomic::AtomicUsize,
    window_size: std::sync::atomic::AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const TOKEN_SLOT: TokenSlot = TokenSlot {
    used: std::sync::atomic::AtomicBool::new(false),
    fd: std::sync::atomic::AtomicI32::new(-1),
    tag: std::sync::atomic::AtomicU64::new(0),
    pending_fd: std::sync::atomic::AtomicI32::new(-1),
    pending_tag: std::sync::atomic::AtomicU64::new(0),
    pending_pid: std::sync::atomic::AtomicUsize::new(0),
    window_base: std::sync::atomic::AtomicUsize::new(0),
    window_size: std::sync::atomic::AtomicUsize::new(0),
};

static TOKENS: [TokenSlot; MAX_TOKEN_CELLS] = [TOKEN_SLOT; MAX_TOKEN_CELLS];
/// One more than the highest slot ever claimed: how far [`token_for_address`] looks.
static TOKENS_HIGH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
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

fn close_raw(fd: i32) {
    if fd >= 0 {
        // SAFETY: `fd` was taken out of a token slot by an atomic swap, so we are its only
        // closer; close(2) is async-signal-safe.
        unsafe { libc::close(fd) };
    }
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
        close_raw(t.pending_fd.swap(-1, Ordering::AcqRel));
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
        close_raw(t.fd.swap(-1, Ordering::Relaxed));
        let pending = t.pending_fd.swap(-1, Ordering::Relaxed);
        let pid_word = t.pending_pid.swap(0, Ordering::Relaxed);
        if pending >= 0 {
            if pid_word != 0 {
                // SAFETY: `set_pending`'s contract: the word stays valid while the pending
                // token is recorded (it lives in the registry mapping, which the fork copied).
                let word = unsafe { &*(pid_word as *const std::sync::atomic::AtomicU32) };
                word.store(pid, Ordering::Relaxed);
            }
            t.fd.store(pending, Ordering::Relaxed);
            t.tag.store(t.pending_tag.swap(0, Ordering::Relaxed), Ordering::Relaxed);
        } else {
            t.tag.store(0, Ordering::Relaxed);
        }
    }
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current token of the cell whose window holds `addr`, 0 if none does (or it has no
/// token). Lock-free and cheap: a scan of the few cells in use, no system call; mutexes record
/// their holder with it on every lock.
#[inline]
pub fn token_for_address(addr: usize) -> u64 {
    use std::sync::atomic::Ordering;
    // Relaxed: see `set_window`; the tag is the cell's current token (Acquire in `tag`).
    let high = TOKENS_HIGH.load(Ordering::Relaxed).min(MAX_TOKEN_CELLS);
    for t in &TOKENS[..high] {
        let size = t.window_size.load(Ordering::Relaxed);
        if size != 0 && addr.wrapping_sub(t.window_base.load(Ordering::Relaxed)) < size {
            return t.tag.load(Ordering::Acquire);
        }
    }
    0
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

/// One slot of the token table, owned by one attachment: its current token descriptor (and a
/// pending one during a fork). Dropping it closes both.
#[derive(Debug)]
pub struct TokenCell {
    index: usize,
}

impl TokenCell {
    /// Claims a free slot of the table.
    pub fn new() -> io::Result<TokenCell> {
        use std::sync::atomic::Ordering;
        for (index, t) in TOKENS.iter().enumerate() {
            // Acquire: pairs with the Release store in `Drop`, after the slot was emptied.
            if t.used.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                // Relaxed: a bound for a scan that validates what it finds.
                TOKENS_HIGH.fetch_max(index + 1, Ordering::Relaxed);
                return Ok(TokenCell { index });
            }
        }
        Err(io::Error::other(format!("more than {MAX_TOKEN_CELLS} liveness tokens in one process")))
    }

    fn slot(&self) -> &'static TokenSlot {
        &TOKENS[self.index]
    }

    /// The current token's tag, 0 when there is none (never registered, or a forked child
    /// for which no token could be made before the fork).
    #[inline]
    pub fn tag(&self) -> u64 {
        // Acquire: pairs with the Release store in `install`.
        self.slot().tag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes `token` (whose open file description holds the token's lock) and `tag` the current
    /// token, closing the previous descriptor. Callers serialise `install`/`clear` per cell.
    pub fn install(&self, token: Object, tag: u64) {
        let fd = token.0;
        use std::sync::atomic::Ordering;
        let t = self.slot();
        // AcqRel: we become the closer of the previous descriptor.
        close_raw(t.fd.swap(fd.into_raw_fd(), Ordering::AcqRel));
        // Release: the descriptor above is in place before the tag says so.
        t.tag.store(tag, Ordering::Release);
    }

    /// Drops the current token (and a pending one): closes its descriptor, which releases the
    /// lock unless another descriptor of the same open file description exists.
    pub fn clear(&self) {
        use std::sync::atomic::Ordering;
        let t = self.slot();
        t.tag.store(0, Ordering::Release);
        // AcqRel: we become the closer.
        close_raw(t.fd.swap(-1, Ordering::AcqRel));
        close_raw(t.pending_fd.swap(-1, Ordering::AcqRel));
        t.pending_pid.store(0, Ordering::Relaxed);
    }

    /// Says which address range (a domain's window) this cell's token stands for.
    pub fn set_window(&self, base: usize, size: usize) {
        use std::sync::atomic::Ordering;
        let t = self.slot();
        // Relaxed: a hint for `token_for_address`, which checks the range it reads; a torn
        // pair during attach or detach names a window no lock can be in at that moment.
        t.window_size.store(0, Ordering::Relaxed);
        t.window_base.store(base, Ordering::Relaxed);
        t.window_size.store(size, Ordering::Relaxed);
    }

    /// Records a token made for the child of the fork about to happen (from the prepare hook).
    ///
    /// # Safety
    /// `pid_word` must stay valid memory until the fork's parent or child handler has run
    /// (the child handler stores the child's pid into it).
    pub unsafe fn set_pending(&self, token: Object, tag: u64, pid_word: &std::sync::atomic::AtomicU32) {
        let fd = token.0;
        use std::sync::atomic::Ordering;
        let t = self.slot();
        t.pending_tag.store(tag, Ordering::Relaxed);
        t.pending_pid.store(pid_word as *const _ as usize, Ordering::Relaxed);
        // Release: pairs with the swaps in the fork handlers; publishes tag and pid word.
        close_raw(t.pending_fd.swap(fd.into_raw_fd(), Ordering::AcqRel));
    }
}

impl Drop for TokenCell {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let t = self.slot();
        self.clear();
        t.window_size.store(0, Ordering::Relaxed);
        t.window_base.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire CAS in `new`.
        t.used.store(false, Ordering::Release);
    }
}
