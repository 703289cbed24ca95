//! Linux system calls. rustix first; libc where rustix stops (OFD byte locks, fork
//! handlers, signal handlers).

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use rustix::fs::{AtFlags, FallocateFlags, FlockOperation, Mode, OFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The size of a page, from `getauxval(AT_PAGESZ)` (see `getpagesize(2)`).
pub fn page_size() -> usize {
    rustix::param::page_size()
}

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

static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

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

// ---------------------------------------------------------------------------------------------
// Directories and shared-memory objects
// ---------------------------------------------------------------------------------------------

/// Opens a directory for `openat`-relative access and `flock`, `open(2)` with
/// `O_RDONLY | O_DIRECTORY | O_CLOEXEC`.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Takes an exclusive `flock(2)` on a directory descriptor, waiting for it. The lock belongs
/// to the open file description and is released when `fd` is closed or the process dies, so a
/// crashed holder never leaves it taken.
pub fn lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::flock(fd, FlockOperation::LockExclusive)?)
}

/// Creates a new object `name` in `dir`, `openat(2)` with
/// `O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC`, then applies `mode` with `fchmod(2)`
/// so the process umask does not narrow it.
pub fn create_object(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o777),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o777))?;
    Ok(fd)
}

/// Opens an existing object, `openat(2)` with `O_NOFOLLOW | O_CLOEXEC` and `O_RDWR` or
/// `O_RDONLY`.
pub fn open_object(dir: BorrowedFd<'_>, name: &str, writable: bool) -> io::Result<OwnedFd> {
    let access = if writable { OFlags::RDWR } else { OFlags::RDONLY };
    Ok(rustix::fs::openat(dir, name, access | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?)
}

/// Removes an object's name, `unlinkat(2)`. Processes that map it keep their mapping.
pub fn unlink_object(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
}

/// What `fstat(2)` says about an object.
#[derive(Debug, Clone, Copy)]
pub struct ObjectStat {
    /// Apparent size in bytes (`st_size`).
    pub size: u64,
    /// Bytes backed by memory (`st_blocks * 512`).
    pub allocated: u64,
    /// Owner (`st_uid`).
    pub uid: u32,
    /// Whether it is a regular file.
    pub is_regular: bool,
    /// Which object this is: equal identities mean the same object.
    pub identity: ObjectId,
}

/// `fstat(2)`. Async-signal-safe (one system call).
pub fn stat_object(fd: BorrowedFd<'_>) -> io::Result<ObjectStat> {
    let st = rustix::fs::fstat(fd)?;
    let file_type = rustix::fs::FileType::from_raw_mode(st.st_mode);
    Ok(ObjectStat {
        size: st.st_size as u64,
        allocated: (st.st_blocks as u64).saturating_mul(512),
        uid: st.st_uid,
        is_regular: file_type == rustix::fs::FileType::RegularFile,
        identity: ObjectId { dev: st.st_dev, ino: st.st_ino },
    })
}

/// Which object a descriptor refers to (`st_dev`, `st_ino`): the same for every descriptor of
/// one object, different for an object created later under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectId {
    dev: u64,
    ino: u64,
}

/// Sets an object's size, `ftruncate(2)`. Growing it makes a sparse hole that costs nothing.
pub fn set_size(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, len)?)
}

/// Guarantees backing for `[offset, offset + len)`, `fallocate(2)` with mode 0. On a full
/// tmpfs this fails with `ENOSPC` instead of a later `SIGBUS` on first write.
pub fn allocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(fd, FallocateFlags::empty(), offset, len)?)
}

/// Frees the pages of `[offset, offset + len)` for every process,
/// `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)?)
}

/// Reads up to `buf.len()` bytes at `offset` without changing the file position, `pread(2)`,
/// retrying until the buffer is full or the object ends. Returns how many bytes were read.
/// Unlike a mapping, the copy cannot fault when another process shrinks the object, and a
/// hole reads as zeros without allocating backing.
pub fn read_at(fd: BorrowedFd<'_>, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Lists the names in a directory (`getdents64(2)` through `std::fs::read_dir`).
pub fn list_dir(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path)? {
        if let Ok(name) = entry?.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// Liveness tokens: open-file-description byte locks
// ---------------------------------------------------------------------------------------------

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

/// Takes an exclusive open-file-description lock on one byte, `fcntl(2)` `F_OFD_SETLK`.
/// Returns `false` if someone else holds it. The kernel drops the lock when the last
/// descriptor of this open file description closes, including when the process dies.
pub fn try_lock_byte(fd: BorrowedFd<'_>, offset: u64) -> io::Result<bool> {
    match ofd_lock_call(fd, libc::F_OFD_SETLK, libc::F_WRLCK, offset) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether another open file description holds a lock on the byte, `fcntl(2)` `F_OFD_GETLK`.
/// A lock held through `fd` itself does not count: query through a descriptor that never
/// takes locks to see every token.
pub fn byte_is_locked(fd: BorrowedFd<'_>, offset: u64) -> io::Result<bool> {
    let fl = ofd_lock_call(fd, libc::F_OFD_GETLK, libc::F_WRLCK, offset)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether another open file description holds any lock on any byte of the object,
/// `fcntl(2)` `F_OFD_GETLK` over the whole file (`l_len` 0). Every attached process holds its
/// liveness token as such a lock, so `false` proves that no process is attached.
pub fn any_byte_locked(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however large
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and `fl` is a valid,
    // exclusively borrowed `struct flock` that the kernel may read and write.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
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

    /// Makes `fd` (whose open file description holds the token's lock) and `tag` the current
    /// token, closing the previous descriptor. Callers serialise `install`/`clear` per cell.
    pub fn install(&self, fd: OwnedFd, tag: u64) {
        use std::os::fd::IntoRawFd;
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
    pub unsafe fn set_pending(&self, fd: OwnedFd, tag: u64, pid_word: &std::sync::atomic::AtomicU32) {
        use std::os::fd::IntoRawFd;
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

// ---------------------------------------------------------------------------------------------
// Address space
// ---------------------------------------------------------------------------------------------

/// Why a fixed reservation failed.
#[derive(Debug)]
pub enum ReserveError {
    /// Something is already mapped in the range.
    Occupied,
    /// Any other failure.
    Os(io::Error),
}

/// Reserves `[addr, addr + len)` without committing memory: `mmap(2)` with `PROT_NONE`,
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE`. Never replaces an
/// existing mapping; a kernel that returns another address counts as occupied.
pub fn reserve_fixed(addr: usize, len: usize) -> Result<(), ReserveError> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory that Rust
    // code may reference is affected; the new mapping is PROT_NONE and owned by the caller.
    let res = unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
        )
    };
    match res {
        Ok(p) if p as usize == addr => Ok(()),
        Ok(p) => {
            // An old kernel treated the flag as a hint and put the mapping elsewhere.
            // SAFETY: `p` is the mapping just created by this call, referenced by nothing.
            let _ = unsafe { rustix::mm::munmap(p, len) };
            Err(ReserveError::Occupied)
        }
        Err(e) if e == rustix::io::Errno::EXIST => Err(ReserveError::Occupied),
        Err(e) => Err(ReserveError::Os(e.into())),
    }
}

/// Puts `[addr, addr + len)` back to a bare reservation (`PROT_NONE`, `MAP_FIXED`), dropping
/// whatever section was mapped there in this process.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference
/// may point into it.
pub unsafe fn restore_reservation(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and guarantees nothing references it.
    unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
        )?;
    }
    Ok(())
}

/// Unmaps `[addr, addr + len)`, `munmap(2)`.
///
/// # Safety
/// The range must be a mapping owned by the caller, and no live Rust reference may point
/// into it.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { rustix::mm::munmap(addr as *mut c_void, len)? };
    Ok(())
}

/// Maps `len` bytes of `fd` at exactly `addr`, shared: `mmap(2)` with `MAP_SHARED | MAP_FIXED`.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller (so `MAP_FIXED` replaces only
/// the caller's own pages), and no live Rust reference may point into memory it replaces.
pub unsafe fn map_shared_fixed(fd: BorrowedFd<'_>, addr: usize, len: usize, writable: bool) -> io::Result<()> {
    let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
    // SAFETY: forwarded from the caller.
    let p = unsafe { rustix::mm::mmap(addr as *mut c_void, len, prot, MapFlags::SHARED | MapFlags::FIXED, fd, 0)? };
    debug_assert_eq!(p as usize, addr);
    Ok(())
}

/// Maps `len` bytes of `fd` wherever the kernel likes, shared: `mmap(2)` with `MAP_SHARED`.
pub fn map_shared(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<NonNull<u8>> {
    let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
    // SAFETY: without MAP_FIXED the kernel picks an unused range, so no existing memory is
    // affected.
    let p = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// The lines of `/proc/self/maps` that overlap `[addr, addr + len)`, for error messages.
pub fn mappings_overlapping(addr: usize, len: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let end = addr.saturating_add(len);
    text.lines()
        .filter(|line| {
            let range = line.split_whitespace().next().unwrap_or("");
            let mut parts = range.split('-');
            let lo = parts.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            let hi = parts.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            matches!((lo, hi), (Some(lo), Some(hi)) if lo < end && hi > addr)
        })
        .map(str::to_owned)
        .collect()
}

/// The highest user-space address plus one on this machine (47-bit on x86_64 without 5-level
/// paging hints).
pub const USER_ADDRESS_LIMIT: u64 = 0x7fff_ffff_f000;

// ---------------------------------------------------------------------------------------------
// Threads (for shmgadget's own robust lock, `sync::robust`)
// ---------------------------------------------------------------------------------------------

/// This thread's id (`gettid(2)`), as the kernel numbers threads in this pid namespace.
pub fn current_tid() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}

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

/// Whether thread `tid` of this pid namespace is alive: `/proc/<tid>/stat` exists and its state
/// is not zombie or dead (a killed process's main thread stays a zombie until reaped). An
/// error other than "not found" counts as alive, so a thread is never declared dead by mistake.
pub fn thread_alive(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any byte.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|c| c != 'Z' && c != 'X'),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
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

/// Borrows an owned descriptor (helper so callers above need not import `AsFd`).
pub fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    fd.as_fd()
}

// ---------------------------------------------------------------------------------------------
// Fault handling (SIGSEGV / SIGBUS)
// ---------------------------------------------------------------------------------------------

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

/// Opens an existing object read-write by a NUL-terminated name, `openat(2)` with
/// `O_RDWR | O_NOFOLLOW | O_CLOEXEC`. Async-signal-safe: one raw system call, no allocation.
pub fn open_object_cstr(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?)
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

/// The symbolic name of an OS error (`"EMFILE"`), and a few words on what it means for
/// mapping a section, for messages that cannot allocate (the fault handler). `None` for an
/// error that carries no errno or one not in the table.
pub fn errno_name(err: &io::Error) -> Option<(&'static str, &'static str)> {
    let named = match err.raw_os_error()? {
        libc::EPERM => ("EPERM", "operation not permitted"),
        libc::ENOENT => ("ENOENT", "its object is gone from the shm directory"),
        libc::EINTR => ("EINTR", "interrupted"),
        libc::EIO => ("EIO", "input/output error"),
        libc::EBADF => ("EBADF", "bad descriptor"),
        libc::EAGAIN => ("EAGAIN", "resource temporarily unavailable"),
        libc::ENOMEM => ("ENOMEM", "out of memory, or too many mappings: see /proc/sys/vm/max_map_count"),
        libc::EACCES => ("EACCES", "no permission to open its object: check its owner and mode"),
        libc::EFAULT => ("EFAULT", "bad address"),
        libc::EBUSY => ("EBUSY", "busy"),
        libc::EEXIST => ("EEXIST", "exists"),
        libc::ENODEV => ("ENODEV", "the shm directory's file system cannot be mapped"),
        libc::ENOTDIR => ("ENOTDIR", "not a directory"),
        libc::EISDIR => ("EISDIR", "is a directory"),
        libc::EINVAL => ("EINVAL", "invalid argument"),
        libc::ENFILE => ("ENFILE", "the system-wide table of open files is full: see /proc/sys/fs/file-max"),
        libc::EMFILE => {
            ("EMFILE", "this process has as many descriptors open as RLIMIT_NOFILE allows: raise `ulimit -n`")
        }
        libc::ETXTBSY => ("ETXTBSY", "busy"),
        libc::EFBIG => ("EFBIG", "too large"),
        libc::ENOSPC => ("ENOSPC", "the backing store is full"),
        libc::EROFS => ("EROFS", "read-only file system"),
        libc::ELOOP => ("ELOOP", "its object's name is a symbolic link, which is refused"),
        libc::EOVERFLOW => ("EOVERFLOW", "value too large"),
        _ => return None,
    };
    Some(named)
}

// ---------------------------------------------------------------------------------------------
// Shared futexes
// ---------------------------------------------------------------------------------------------

/// Why a futex wait returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken, or returned spuriously: re-check the condition.
    Woken,
    /// The word no longer held the expected value when the kernel looked.
    Changed,
    /// The timeout expired.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout` (`futex(2)` `FUTEX_WAIT`, shared: no
/// `FUTEX_PRIVATE_FLAG`, so waiters and wakers may be in different processes).
pub fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) -> io::Result<FutexWait> {
    use rustix::thread::futex;
    let ts = timeout
        .map(|d| futex::Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as i64, tv_nsec: d.subsec_nanos() as _ });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) => Ok(FutexWait::Woken),
        Err(rustix::io::Errno::AGAIN) => Ok(FutexWait::Changed),
        Err(rustix::io::Errno::TIMEDOUT) => Ok(FutexWait::TimedOut),
        Err(rustix::io::Errno::INTR) => Ok(FutexWait::Woken),
        Err(e) => Err(e.into()),
    }
}

/// Wakes at most `n` waiters of `word` in any process (`futex(2)` `FUTEX_WAKE`, shared).
/// `u32::MAX` means all of them.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32, n: u32) -> usize {
    // The kernel reads the count as a C `int`: u32::MAX would be -1, which wakes only one.
    let n = n.min(i32::MAX as u32);
    rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), n).unwrap_or(0)
}
