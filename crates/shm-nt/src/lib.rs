//! The classic SHM-NT C interface over shmgadget: `shm_nt.h` / `libshm_nt`.
//!
//! Handles are section addresses, the same number in every process of the domain. Every entry
//! point validates its arguments (NULL included), catches panics (none crosses into C) and
//! returns an error code; the reason of the last failure of the calling thread is in
//! [`shm_last_error`]. The domain is `SHMGADGET_DOMAIN` (or `default`), attached by the first
//! call.
//!
//! # Hot paths
//! `shm_alloc`, `shm_free`, `shm_realloc`, `shm_q_write`, `shm_q_read`, `shm_sem_wait` and
//! `shm_sem_post` take no process-wide lock: they find their object from the address in a
//! per-process table indexed by 2 MiB chunk, protected for the call by the thread's hazard
//! record (see `table.rs`). Only the first use of a handle in a process (which opens it) and
//! the calls that create, delete or detach take the library's state lock. Heap calls go
//! through the calling thread's block cache; a queue end is used by one thread of the process
//! at a time. A handle whose section this process deleted (or left with `shm_exit`) finds no
//! entry and is reported as invalid; a call that was using it when it was deleted keeps it
//! mapped until it returns.
//!
//! Semaphores live as named objects in a heap section `shm_nt.objects` created on demand;
//! queues are shmgadget byte queues (the first `shm_q_write` of a process makes it the sender,
//! the first `shm_q_read` the receiver).
//!
//! # Exit
//! The first call registers an `atexit` handler that does what `shm_exit` does, so a program
//! that returns from `main` (or calls `exit`) without `shm_exit` still releases its process
//! entry, and, as the last process, its transient sections and an empty registry. At exit
//! nothing is unmapped (a thread still running may touch section memory). The handler only
//! acts in the process that attached: a forked child's copy of the state is left alone, as is
//! the state while another thread is inside the library.
//!
//! # The objects heap
//! `shm_nt.objects` holds the semaphores and `shm_nt.users`, a table of the peer tokens of the
//! processes using the heap, under a robust mutex. A process adds its token when it first
//! opens the heap and removes it when it exits. The heap is deleted when it holds no
//! semaphore and no other live process (by token; a dead process's token is dropped) is in
//! the table: by `shm_sem_delete` of the last semaphore, or at exit. The deleter first marks
//! the table `retired` (with its token) under the mutex, so a process that opened the heap just
//! before sees the mark and opens (or creates) the next one instead of registering in a heap
//! about to go; a mark whose deleter died before deleting is cleared by the next user.

// Handles are `uintptr_t` (`usize`) and sizes `size_t`: `unsigned long` is 32 bits on Windows,
// while section addresses lie above 4 GiB. Some casts are no-ops on one platform only.
#![allow(clippy::unnecessary_cast)]

mod table;

use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_long, c_uint, c_void};

use libc::size_t;
use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shmgadget::heap::{Heap, ObjectKind};
use shmgadget::queue::{ByteQueue, ByteReceiver, ByteSender};
use shmgadget::sync::Semaphore;
use shmgadget::{Domain, Error, ErrorKind, Section, SectionKind, SectionOptions};
use table::Obj;

/// Created, or done.
pub const SHM_OK: c_int = 0;
/// Opened an existing one.
pub const SHM_EXISTS: c_int = 1;
/// Bad argument: name, size, handle, pointer.
pub const SHM_ERR_INVALID: c_int = -1;
/// No such section, heap, semaphore or queue.
pub const SHM_ERR_NOT_FOUND: c_int = -2;
/// Window, registry, heap or backing store full.
pub const SHM_ERR_NO_MEMORY: c_int = -3;
/// The operating system refused access.
pub const SHM_ERR_PERMISSION: c_int = -4;
/// A shared header failed validation.
pub const SHM_ERR_CORRUPT: c_int = -5;
/// A wait ran out of time (or a zero timeout found nothing to do).
pub const SHM_ERR_TIMEOUT: c_int = -6;
/// The other side of a queue is gone.
pub const SHM_ERR_DISCONNECTED: c_int = -7;
/// Any other system error.
pub const SHM_ERR_OS: c_int = -8;
/// The platform cannot do this (decommit where memory is freed only with the whole section).
pub const SHM_ERR_UNSUPPORTED: c_int = -9;

const OBJECTS_HEAP: &str = "shm_nt.objects";
const OBJECTS_HEAP_SIZE: u64 = 1 << 20;
/// The users table's name in the objects heap.
const USERS: &str = "shm_nt.users";
/// Processes that can use the objects heap at once (more set `overflow`: never deleted).
const MAX_USERS: usize = 1024;

shmgadget::shm_struct! {
    /// Who uses the objects heap (see "The objects heap" above). Written under its mutex.
    struct UsersShared {
        /// The peer token of a deleter that decided to delete the heap (0: none): register in
        /// the next heap instead. A deleter that died before deleting it is ignored.
        retired: u64,
        /// Non-zero once a user found the table full: the heap is then never deleted.
        overflow: u64,
        /// Peer tokens of users; 0 is a free entry.
        tokens: [u64; MAX_USERS],
    }
}

impl UsersShared {
    fn empty() -> UsersShared {
        UsersShared { retired: 0, overflow: 0, tokens: [0; MAX_USERS] }
    }
}

fn code(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::InvalidName | ErrorKind::InvalidSize | ErrorKind::InvalidArgument | ErrorKind::AlreadyExists => {
            SHM_ERR_INVALID
        }
        ErrorKind::NotFound => SHM_ERR_NOT_FOUND,
        ErrorKind::WindowFull | ErrorKind::RegistryFull | ErrorKind::OutOfSpace => SHM_ERR_NO_MEMORY,
        ErrorKind::PermissionDenied => SHM_ERR_PERMISSION,
        ErrorKind::Corrupt => SHM_ERR_CORRUPT,
        ErrorKind::Timeout | ErrorKind::WouldBlock => SHM_ERR_TIMEOUT,
        ErrorKind::Disconnected => SHM_ERR_DISCONNECTED,
        ErrorKind::Unsupported => SHM_ERR_UNSUPPORTED,
        _ => SHM_ERR_OS,
    }
}

// ------------------------------------------------------------------ errors and panics

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

struct Failure {
    code: c_int,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        set_last_error(&e.to_string());
        Failure { code: code(e.kind()) }
    }
}

fn invalid(msg: impl AsRef<str>) -> Failure {
    set_last_error(msg.as_ref());
    Failure { code: SHM_ERR_INVALID }
}

/// Runs `f`, turning errors into codes (and `shm_last_error`), and panics into `SHM_ERR_OS`.
fn guarded<T>(on_error: impl Fn(c_int) -> T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(fail)) => on_error(fail.code),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("internal error in libshm_nt (please report): {what}"));
            on_error(SHM_ERR_OS)
        }
    }
}

fn status(f: impl FnOnce() -> Result<c_int, Failure>) -> c_int {
    guarded(|c| c, f)
}

fn name_arg<'a>(name: *const c_char) -> Result<&'a str, Failure> {
    if name.is_null() {
        return Err(invalid("name is NULL"));
    }
    // SAFETY: the caller passes a NUL-terminated C string (checked non-NULL above); we only
    // borrow it for the duration of the call.
    let s = unsafe { CStr::from_ptr(name) };
    s.to_str().map_err(|_| invalid("name is not valid UTF-8"))
}

fn out_arg<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: a non-NULL pointer from the caller to a writable T (the interface's contract);
    // NULL is refused.
    unsafe { p.as_mut() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

// ------------------------------------------------------------------ process state

/// A queue and this process's ends of it. Field order matters: the ends borrow `queue` and
/// are dropped first.
pub(crate) struct QueueObj {
    tx: Side<ByteSender<'static>>,
    rx: Side<ByteReceiver<'static>>,
    queue: Box<ByteQueue>,
}

impl QueueObj {
    fn new(queue: ByteQueue) -> QueueObj {
        QueueObj { tx: Side::default(), rx: Side::default(), queue: Box::new(queue) }
    }

    fn queue(&self) -> &'static ByteQueue {
        // SAFETY: `queue` is boxed (its address never changes), never replaced, and dropped
        // only after `tx` and `rx` (field order), which are the only holders of this
        // reference; the object itself is dropped only when no call uses it (the table's
        // protocol, or the last Arc of a slow-path caller).
        unsafe { &*(&*self.queue as *const ByteQueue) }
    }
}

/// One end of a queue in this process: threads of the process take turns (`busy`).
struct Side<T> {
    /// | value | meaning | next |
    /// |---|---|---|
    /// | false | free | true, by the thread that takes the end (CAS, Acquire) |
    /// | true | one thread uses `end` | false, by that thread (Release) |
    busy: AtomicBool,
    end: UnsafeCell<Option<T>>,
}

impl<T> Default for Side<T> {
    fn default() -> Self {
        Side { busy: AtomicBool::new(false), end: UnsafeCell::new(None) }
    }
}

// SAFETY: `end` is only touched by the thread that set `busy` (see `Side::take`), so sharing a
// Side between threads hands the end from one thread to the next: T must be Send.
unsafe impl<T: Send> Sync for Side<T> {}

impl<T> Side<T> {
    /// Waits until no other thread of this process uses this end, then holds it.
    fn take(&self) -> SideGuard<'_, T> {
        let mut spins = 0u32;
        // Acquire: pairs with the Release store in `SideGuard::drop` (the previous user's
        // writes to `end` happen before ours).
        while self.busy.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 128 {
                std::thread::yield_now();
            } else {
                // Another thread is blocked in a call on this end (a wait for room or for a
                // message): sleep rather than burn a core.
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        SideGuard { side: self }
    }
}

struct SideGuard<'a, T> {
    side: &'a Side<T>,
}

impl<T> SideGuard<'_, T> {
    fn end(&mut self) -> &mut Option<T> {
        // SAFETY: we hold `busy`, so no other thread touches `end` until we drop the guard.
        unsafe { &mut *self.side.end.get() }
    }
}

impl<T> Drop for SideGuard<'_, T> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire CAS of the next user.
        self.side.busy.store(false, Ordering::Release);
    }
}

struct State {
    /// The process that attached (a forked child has a copy of this state; see "Exit").
    pid: u32,
    domain: Domain,
    sections: HashMap<u64, Section>,
    objects: Option<Arc<Heap>>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock_state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T, Failure>) -> Result<T, Failure> {
    let mut g = lock_state();
    if g.is_none() {
        table::init();
        let domain = Domain::attach(&shmgadget::default_domain_name())?;
        register_at_exit();
        *g = Some(State { pid: std::process::id(), domain, sections: HashMap::new(), objects: None });
    }
    // Entries retired while a call used them are freed by the next call here at the latest.
    table::reclaim();
    f(g.as_mut().expect("initialised above"))
}

impl State {
    /// The heap whose section starts at `hdl` (opened on first use in this process).
    fn heap(&mut self, hdl: usize) -> Result<Arc<Heap>, Failure> {
        let hdl = hdl as u64;
        match table::entry_covering(hdl).map(|e| (e.base, &e.obj)) {
            Some((base, Obj::Heap(h))) if base == hdl => return Ok(h.clone()),
            Some((base, Obj::Heap(h))) => {
                return Err(invalid(format!(
                    "{hdl:#x} is inside heap {:?} at {base:#x} but is not its handle",
                    h.name()
                )));
            }
            _ => {}
        }
        let name = self.section_name(hdl)?;
        let heap = Heap::open(&self.domain, &name)?;
        if heap.section().as_ptr() as u64 != hdl {
            return Err(invalid(format!("{hdl:#x} is inside heap {name:?} but is not its handle")));
        }
        Ok(insert_heap(heap))
    }

    /// The heap holding address `addr` (opened on first use in this process).
    fn heap_covering(&mut self, addr: u64) -> Result<Arc<Heap>, Failure> {
        match table::entry_covering(addr).map(|e| &e.obj) {
            Some(Obj::Heap(h)) => return Ok(h.clone()),
            Some(Obj::Queue(q)) => {
                return Err(invalid(format!("{addr:#x} lies in queue {:?}, not in a heap", q.queue().name())));
            }
            None => {}
        }
        let (base, size) = self.domain.window();
        let found = self.domain.sections().into_iter().find(|s| s.address <= addr && addr - s.address < s.reserved);
        let Some(s) = found else {
            return Err(invalid(format!(
                "{addr:#x} is not inside a section of domain {:?} (its window is {base:#x}+{size:#x})",
                self.domain.name()
            )));
        };
        if s.kind != SectionKind::Heap {
            return Err(invalid(format!("{addr:#x} lies in {} section {:?}, not a heap", s.kind.as_str(), s.name)));
        }
        let heap = Heap::open(&self.domain, &s.name)?;
        Ok(insert_heap(heap))
    }

    /// The queue whose section starts at `q` (opened on first use in this process).
    fn queue(&mut self, q: u64) -> Result<Arc<QueueObj>, Failure> {
        if let Some(e) = table::entry_at(q) {
            if let Obj::Queue(o) = &e.obj {
                return Ok(o.clone());
            }
        }
        let name = self.section_name(q)?;
        let queue = ByteQueue::open(&self.domain, &name)?;
        Ok(insert_queue(queue))
    }

    /// The name of the section starting at `hdl`.
    fn section_name(&self, hdl: u64) -> Result<String, Failure> {
        let (base, _) = self.domain.window();
        let found = self.domain.sections().into_iter().find(|s| s.address == hdl);
        match found {
            Some(s) => Ok(s.name),
            None if hdl == 0 => Err(invalid("handle is 0")),
            None => Err(invalid(format!(
                "{hdl:#x} is not the handle of a section of domain {:?} (its window starts at {base:#x})",
                self.domain.name()
            ))),
        }
    }

    /// The objects heap, opened (or created) and this process registered as a user.
    fn objects(&mut self) -> Result<Arc<Heap>, Failure> {
        if let Some(h) = &self.objects {
            return Ok(h.clone());
        }
        let token = self.domain.peer_token();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (heap, _) = Heap::create_or_open(&self.domain, OBJECTS_HEAP, OBJECTS_HEAP_SIZE)?;
            let registered = {
                let (users, _) = heap.find_or_init_mutex(USERS, UsersShared::empty)?;
                let mut u = lock_users(users)?;
                if u.retired != 0 && !self.domain.peer_alive(u.retired) {
                    // Its deleter died before deleting it: the heap is intact, keep using it.
                    u.retired = 0;
                }
                if u.retired == 0 {
                    if !u.tokens.contains(&token) {
                        let domain = &self.domain;
                        let free = u.tokens.iter().position(|&t| t == 0 || !domain.peer_alive(t));
                        match free {
                            Some(i) => u.tokens[i] = token,
                            None => u.overflow = 1,
                        }
                    }
                    true
                } else {
                    false
                }
            };
            if registered {
                let heap = insert_heap(heap);
                self.objects = Some(heap.clone());
                return Ok(heap);
            }
            // Its last user is deleting it: wait for the deletion, then make the next one.
            drop(heap);
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("the objects heap {OBJECTS_HEAP:?} stayed retired (being deleted) for 10 s; its deleter may be stuck"),
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Deletes the objects heap if it holds no semaphore and no other live process uses it;
    /// `leaving` also takes this process out of its users (at exit).
    fn release_objects(&mut self, leaving: bool) -> Result<(), Failure> {
        let Some(heap) = self.objects.clone() else { return Ok(()) };
        let token = self.domain.peer_token();
        let retire = {
            let users = heap.find::<shmgadget::sync::Mutex<UsersShared>>(USERS)?;
            let mut u = lock_users(users)?;
            let domain = &self.domain;
            for t in u.tokens.iter_mut() {
                if *t != 0 && ((leaving && *t == token) || (*t != token && !domain.peer_alive(*t))) {
                    *t = 0;
                }
            }
            let others = u.tokens.iter().any(|&t| t != 0 && t != token);
            let only_users_table = heap.named_objects()?.iter().all(|o| o.name == USERS);
            let retire = u.retired == 0 && u.overflow == 0 && !others && only_users_table;
            if retire {
                u.retired = token;
            }
            retire
        };
        if leaving || retire {
            self.objects = None;
        }
        if retire {
            table::retire_at(heap.section().as_ptr() as u64);
            drop(heap);
            self.sections.retain(|_, s| s.name() != OBJECTS_HEAP);
            self.domain.delete_section(OBJECTS_HEAP)?;
        }
        Ok(())
    }
}

/// Puts an opened heap in the table, replacing what this process knew at its address (the
/// state lock is held), and returns it.
fn insert_heap(heap: Heap) -> Arc<Heap> {
    let (base, len) = (heap.section().as_ptr() as u64, heap.section().len() as u64);
    let heap = Arc::new(heap);
    table::insert(table::Entry::new(base, len, Obj::Heap(heap.clone())));
    heap
}

/// As [`insert_heap`], for a queue.
fn insert_queue(queue: ByteQueue) -> Arc<QueueObj> {
    let (base, len) = queue.section().map_or((0, 0), |s| (s.as_ptr() as u64, s.len() as u64));
    let q = Arc::new(QueueObj::new(queue));
    table::insert(table::Entry::new(base, len, Obj::Queue(q.clone())));
    q
}

/// Locks the users table; a holder that died left it consistent (single-word writes).
fn lock_users(
    users: &shmgadget::sync::Mutex<UsersShared>,
) -> Result<shmgadget::sync::MutexGuard<'_, UsersShared>, Failure> {
    match users.lock() {
        Ok(g) => Ok(g),
        Err(shmgadget::sync::LockError::OwnerDied(mut g)) => {
            g.make_consistent();
            Ok(g)
        }
        Err(e) => {
            let e = Error::from(e);
            Err(Error::new(e.kind(), format!("cannot lock the objects heap's users table: {e}")).into())
        }
    }
}

// ------------------------------------------------------------------ exit

/// Registers [`at_exit`] once per process.
fn register_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: atexit(3) with a function that stays valid for the life of the process (the
        // library is linked with `-z nodelete`, so it is never unloaded).
        unsafe { libc::atexit(at_exit) };
    });
}

/// Runs at normal process exit, after the main thread's thread-locals were destroyed (glibc
/// runs their destructors first): nothing here may rely on them, and nothing may panic out.
extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        // Another thread inside the library holds the state: leave everything (gc reclaims).
        let mut g = match STATE.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if g.as_ref().is_none_or(|st| st.pid != std::process::id()) {
            // Never attached, already left, or a forked child's copy of the parent's state:
            // the parent's attachment is not this process's to release.
            return;
        }
        let st = g.take().expect("checked above");
        drop(g);
        let _ = leave(st, true);
    });
}

/// What `shm_exit` and the exit handler do: close this process's ends and handles, leave the
/// objects heap (deleting it if it is unused), detach.
fn leave(mut st: State, at_exit: bool) -> Result<(), Failure> {
    let objects = st.release_objects(true);
    let State { domain, sections, objects: _, pid: _ } = st;
    // Entries a call on another thread still uses are freed when it returns; their handles
    // keep the domain attached until then.
    table::retire_all();
    drop(sections);
    if at_exit {
        domain.detach_at_exit()?;
    } else {
        domain.detach()?;
    }
    objects
}

// ------------------------------------------------------------------ sections and heaps

/// Creates (`SHM_OK`) or opens (`SHM_EXISTS`) the raw section `name` of at least `rsize`
/// bytes; its handle (address) goes to `*phdl`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_section(name: *const c_char, rsize: size_t, phdl: *mut usize) -> c_int {
    status(|| {
        let name = name_arg(name)?;
        let out = out_arg(phdl, "phdl")?;
        with_state(|st| {
            let opts = SectionOptions::new().kind(SectionKind::Raw);
            let (s, created) = st.domain.create_or_open_section(name, rsize as u64, &opts)?;
            if s.kind() != SectionKind::Raw {
                return Err(invalid(format!("section {name:?} is a {}, not a raw section", s.kind().as_str())));
            }
            if (s.len() as u64) < rsize as u64 {
                return Err(invalid(format!("section {name:?} has {} bytes, fewer than the {rsize} asked", s.len())));
            }
            let addr = s.as_ptr() as u64;
            st.sections.insert(addr, s);
            *out = addr as usize;
            Ok(if created { SHM_OK } else { SHM_EXISTS })
        })
    })
}

/// Creates (`SHM_OK`) or opens (`SHM_EXISTS`) the heap `name` reserving at least `rsize`
/// bytes. `force_init` non-zero re-initialises an existing heap (all its blocks freed).
#[unsafe(no_mangle)]
pub extern "C" fn shm_heap(name: *const c_char, rsize: size_t, phdl: *mut usize, force_init: c_int) -> c_int {
    status(|| {
        let name = name_arg(name)?;
        let out = out_arg(phdl, "phdl")?;
        with_state(|st| {
            let (heap, created) = Heap::create_or_open(&st.domain, name, rsize as u64)?;
            if (heap.section().len() as u64) < rsize as u64 {
                return Err(invalid(format!(
                    "heap {name:?} reserves {} bytes, fewer than the {rsize} asked",
                    heap.section().len()
                )));
            }
            if !created && force_init != 0 {
                // SAFETY: the caller asked for re-initialisation: by the interface's contract
                // no process uses the heap's blocks any more.
                unsafe { heap.reset()? };
            }
            let addr = heap.section().as_ptr() as u64;
            insert_heap(heap);
            *out = addr as usize;
            Ok(if created { SHM_OK } else { SHM_EXISTS })
        })
    })
}

/// Deletes the section (raw, heap or queue) whose handle is `hdl`. Other processes keep their
/// mapping until they exit or call `shm_exit`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_delete_section(hdl: usize) -> c_int {
    status(|| {
        with_state(|st| {
            let hdl = hdl as u64;
            let name = st.section_name(hdl)?;
            st.sections.remove(&hdl);
            // A call on another thread that still uses it keeps it mapped until it returns.
            table::retire_at(hdl);
            if st.objects.as_ref().is_some_and(|h| h.section().as_ptr() as u64 == hdl) {
                st.objects = None;
            }
            st.domain.delete_section(&name)?;
            Ok(SHM_OK)
        })
    })
}

/// Runs `f` on the heap whose handle is `hdl`: lock-free through the table when this process
/// knows it, else opened under the state lock first.
#[inline]
fn on_heap<T>(hdl: usize, f: impl Fn(&Heap) -> Result<T, Failure>) -> Result<T, Failure> {
    let hdl = hdl as u64;
    let fast = table::with(hdl, |e| match &e.obj {
        Obj::Heap(h) if e.base == hdl => Some(f(h)),
        _ => None,
    });
    if let Some(Some(r)) = fast {
        return r;
    }
    let heap = with_state(|st| st.heap(hdl as usize))?;
    f(&heap)
}

/// Runs `f` on the heap holding `addr`, as [`on_heap`].
#[inline]
fn on_heap_covering<T>(addr: u64, f: impl Fn(&Heap) -> Result<T, Failure>) -> Result<T, Failure> {
    let fast = table::with(addr, |e| match &e.obj {
        Obj::Heap(h) => Some(f(h)),
        Obj::Queue(_) => None,
    });
    if let Some(Some(r)) = fast {
        return r;
    }
    let heap = with_state(|st| st.heap_covering(addr))?;
    f(&heap)
}

/// Allocates `size` bytes from the heap `hdl`; NULL on failure (see `shm_last_error`).
#[unsafe(no_mangle)]
pub extern "C" fn shm_alloc(hdl: usize, size: size_t) -> *mut c_void {
    guarded(
        |_| std::ptr::null_mut(),
        || {
            let layout = std::alloc::Layout::from_size_align(size as usize, 16)
                .map_err(|_| invalid(format!("size {size} is too large")))?;
            on_heap(hdl, |heap| Ok(heap.alloc(layout)?.as_ptr().cast()))
        },
    )
}

/// Frees a block of any heap of the domain, found from its address (into the calling thread's
/// block cache when its size is cached).
#[unsafe(no_mangle)]
pub extern "C" fn shm_free(addr: *mut c_void) -> c_int {
    status(|| {
        let p = NonNull::new(addr.cast::<u8>()).ok_or_else(|| invalid("address is NULL"))?;
        on_heap_covering(p.as_ptr() as u64, |heap| {
            // SAFETY: the C caller gives the block up (the interface's contract, as for
            // free(3)); the heap validates that it is a live block of its own.
            unsafe { heap.free(p)? };
            Ok(SHM_OK)
        })
    })
}

/// Resizes a heap block found from its address; NULL on failure (the block is unchanged).
/// Blocks up to 4 KiB move through the calling thread's block cache, without the heap lock.
#[unsafe(no_mangle)]
pub extern "C" fn shm_realloc(addr: *mut c_void, size: size_t) -> *mut c_void {
    guarded(
        |_| std::ptr::null_mut(),
        || {
            let p = NonNull::new(addr.cast::<u8>()).ok_or_else(|| invalid("address is NULL"))?;
            on_heap_covering(p.as_ptr() as u64, |heap| {
                // SAFETY: as for realloc(3): the caller uses only the returned pointer
                // afterwards; the heap validates that `p` is a live block of its own.
                Ok(unsafe { heap.realloc_cached(p, size as usize)? }.as_ptr().cast())
            })
        },
    )
}

/// Detaches this process from the domain: unmaps everything (sections stay unless transient
/// and this is the last process; the registry goes when nothing remains). The objects heap of
/// the semaphores is deleted when it holds none and no other process uses it. A program that
/// returns from `main` without calling it is detached at exit in the same way (by an `atexit`
/// handler, which unmaps nothing). Calling it twice is harmless.
#[unsafe(no_mangle)]
pub extern "C" fn shm_exit() -> c_int {
    status(|| {
        let Some(st) = lock_state().take() else { return Ok(SHM_OK) };
        leave(st, false)?;
        Ok(SHM_OK)
    })
}

/// Maps the existing section `name` and writes its address to `*paddr`. `rsize` 0 accepts any
/// size; a larger `rsize` than the section's is `SHM_ERR_INVALID`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_map(name: *const c_char, rsize: size_t, paddr: *mut usize) -> c_int {
    status(|| {
        let name = name_arg(name)?;
        let out = out_arg(paddr, "paddr")?;
        with_state(|st| {
            let s = st.domain.open_section(name)?;
            if rsize as u64 > s.len() as u64 {
                return Err(invalid(format!("section {name:?} has {} bytes, fewer than the {rsize} asked", s.len())));
            }
            let addr = s.as_ptr() as u64;
            st.sections.insert(addr, s);
            *out = addr as usize;
            Ok(SHM_OK)
        })
    })
}

/// Maps every section of the domain.
#[unsafe(no_mangle)]
pub extern "C" fn shm_map_all() {
    status(|| {
        with_state(|st| {
            st.domain.map_all()?;
            Ok(SHM_OK)
        })
    });
}

/// Prints one line per section to stdout: name, kind, address range, reserved and committed.
#[unsafe(no_mangle)]
pub extern "C" fn shm_list_pools() {
    status(|| {
        let text = with_state(|st| {
            let mut out = String::new();
            for s in st.domain.sections() {
                let _ = writeln!(
                    out,
                    "{:<24} {:<6} {:#x}-{:#x} reserved {} committed {}",
                    s.name,
                    s.kind.as_str(),
                    s.address,
                    s.address + s.reserved,
                    s.reserved,
                    s.committed
                );
            }
            Ok(out)
        })?;
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
        Ok(SHM_OK)
    });
}

/// Prints heap `name`'s statistics and block map to `outf` (stdout if NULL).
///
/// # Safety
/// `outf` must be NULL or an open `FILE *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shm_list_heap(outf: *mut libc::FILE, name: *const c_char) {
    let text = guarded(
        |_| None,
        || {
            let name = name_arg(name)?;
            with_state(|st| {
                let heap = Heap::open(&st.domain, name)?;
                let s = heap.stats()?;
                let b = &s.blocks;
                let mut out = format!(
                    "heap {name} at {:#x}: reserved {} committed {} used {} in {} blocks, free {} in {} blocks, \
                     largest free {}, thread caches {} in {} blocks\n",
                    heap.section().as_ptr() as usize,
                    s.reserved,
                    s.committed,
                    b.used_bytes,
                    b.used_blocks,
                    b.free_bytes,
                    b.free_blocks,
                    b.largest_free,
                    s.cached_bytes,
                    s.cached_blocks
                );
                for blk in heap.dump(100_000)? {
                    let state = if blk.free {
                        "free"
                    } else if blk.cached {
                        "cached"
                    } else {
                        "used"
                    };
                    let _ = writeln!(out, "  {:#012x} {:>10} {state}", blk.offset, blk.size);
                }
                Ok(Some(CString::new(out).unwrap_or_default()))
            })
        },
    );
    if let Some(text) = text {
        // SAFETY: `outf` is NULL or an open FILE* (the caller's contract); `text` is a
        // NUL-terminated string that outlives the calls.
        unsafe {
            if outf.is_null() {
                libc::printf(c"%s".as_ptr(), text.as_ptr());
                libc::fflush(std::ptr::null_mut());
            } else {
                libc::fputs(text.as_ptr(), outf);
                libc::fflush(outf);
            }
        }
    }
}

/// The message of the calling thread's last failure ("" if none). Valid until its next
/// failing call.
#[unsafe(no_mangle)]
pub extern "C" fn shm_last_error() -> *const c_char {
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// Commits the first `len` bytes of section `hdl` (a full backing store is `SHM_ERR_NO_MEMORY`
/// now, never a SIGBUS later).
#[unsafe(no_mangle)]
pub extern "C" fn shm_commit(hdl: usize, len: size_t) -> c_int {
    status(|| {
        with_state(|st| {
            let name = st.section_name(hdl as u64)?;
            st.domain.open_section(&name)?.commit(len as u64)?;
            Ok(SHM_OK)
        })
    })
}

/// Gives `len` bytes at `offset` of section `hdl` back (they read as zero afterwards, in every
/// process).
#[unsafe(no_mangle)]
pub extern "C" fn shm_decommit(hdl: usize, offset: size_t, len: size_t) -> c_int {
    status(|| {
        with_state(|st| {
            let name = st.section_name(hdl as u64)?;
            st.domain.open_section(&name)?.decommit(offset as u64, len as u64)?;
            Ok(SHM_OK)
        })
    })
}

/// Checks every block of heap `hdl`: `SHM_OK`, or `SHM_ERR_CORRUPT` with the first violation
/// in `shm_last_error`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_heap_check(hdl: usize) -> c_int {
    status(|| {
        let heap = with_state(|st| st.heap(hdl))?;
        heap.check()?;
        Ok(SHM_OK)
    })
}

// ------------------------------------------------------------------ semaphores

/// Creates (`SHM_OK`) or opens (`SHM_EXISTS`) the counting semaphore `name`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_sem(name: *const c_char, initial: c_uint, psem: *mut usize) -> c_int {
    status(|| {
        let name = name_arg(name)?;
        let out = out_arg(psem, "psem")?;
        let heap = with_state(|st| st.objects())?;
        let (sem, created) = heap.find_or_zeroed::<Semaphore>(name)?;
        sem.init(initial)?;
        *out = sem as *const Semaphore as usize;
        Ok(if created { SHM_OK } else { SHM_EXISTS })
    })
}

/// Runs `f` on the semaphore `sem`. Lock-free when this process validated `sem` before (it is
/// remembered in the objects heap's table entry); else validated against the named objects of
/// the objects heap first, under the state lock. A remembered semaphore that fails (deleted by
/// another process: its header says destroyed) is validated again, so a deleted handle is
/// reported as invalid.
fn on_semaphore(sem: usize, f: impl Fn(&Semaphore) -> Result<c_int, Failure>) -> Result<c_int, Failure> {
    let addr = sem as u64;
    let run = |f: &dyn Fn(&Semaphore) -> Result<c_int, Failure>| {
        // SAFETY: `addr` is a named Semaphore of the objects heap (validated by the caller),
        // which the caller keeps mapped for this call.
        f(unsafe { &*(addr as usize as *const Semaphore) })
    };
    let fast = table::with(addr, |e| match &e.obj {
        Obj::Heap(_) if e.has_sem(addr) => Some(run(&f)),
        _ => None,
    });
    match fast {
        Some(Some(Err(fail))) if fail.code != SHM_ERR_TIMEOUT => {
            // Deleted meanwhile? Then say so; else it is the semaphore's own error.
            with_state(|st| {
                let heap = st.objects()?;
                if let Err(e) = semaphore_name(&heap, sem) {
                    if let Some(entry) = table::entry_covering(addr) {
                        entry.forget_sem(addr);
                    }
                    return Err(e);
                }
                Ok(())
            })?;
            Err(fail)
        }
        Some(Some(r)) => r,
        _ => {
            let _heap = with_state(|st| {
                let heap = st.objects()?;
                semaphore_name(&heap, sem)?;
                if let Some(entry) = table::entry_covering(addr) {
                    entry.add_sem(addr);
                }
                Ok(heap)
            })?;
            // `_heap` keeps the objects heap mapped for the call.
            run(&f)
        }
    }
}

/// The name of the semaphore at `sem` in the objects heap.
fn semaphore_name(heap: &Heap, sem: usize) -> Result<String, Failure> {
    heap.named_objects()?
        .into_iter()
        .find(|o| o.address == sem as u64 && o.kind == ObjectKind::Semaphore)
        .map(|o| o.name)
        .ok_or_else(|| invalid(format!("{sem:#x} is not a semaphore handle from shm_sem")))
}

/// Deletes the semaphore `sem` for every process (its handle becomes invalid everywhere; no
/// process may be waiting on it or use it afterwards). When it was the last semaphore and no
/// other process uses the objects heap, that heap is deleted too.
#[unsafe(no_mangle)]
pub extern "C" fn shm_sem_delete(sem: usize) -> c_int {
    status(|| {
        with_state(|st| {
            let heap = st.objects()?;
            let name = semaphore_name(&heap, sem)?;
            if let Some(entry) = table::entry_covering(sem as u64) {
                entry.forget_sem(sem as u64);
            }
            // SAFETY: validated just above as a named Semaphore of the mapped objects heap.
            let s = unsafe { &*(sem as usize as *const Semaphore) };
            // Marked destroyed first: a process that remembers the handle as valid is told.
            let _ = s.destroy();
            // SAFETY: the caller deletes the semaphore: by the interface's contract no process
            // waits on it or uses it any more (as for sem_destroy(3)).
            unsafe { heap.remove_named(&name)? };
            drop(heap);
            st.release_objects(false)?;
            Ok(SHM_OK)
        })
    })
}

/// Waits for a unit: `timeout_ms` -1 waits for ever, 0 only tries (`SHM_ERR_TIMEOUT` if none).
#[unsafe(no_mangle)]
pub extern "C" fn shm_sem_wait(sem: usize, timeout_ms: c_long) -> c_int {
    status(|| {
        on_semaphore(sem, |s| {
            match timeout_ms {
                t if t < 0 => s.wait()?,
                0 => {
                    if !s.try_wait()? {
                        return Err(Error::new(ErrorKind::Timeout, "no unit available").into());
                    }
                }
                t => s.wait_timeout(Duration::from_millis(t as u64))?,
            }
            Ok(SHM_OK)
        })
    })
}

/// Adds a unit, waking a waiter.
#[unsafe(no_mangle)]
pub extern "C" fn shm_sem_post(sem: usize) -> c_int {
    status(|| {
        on_semaphore(sem, |s| {
            s.post()?;
            Ok(SHM_OK)
        })
    })
}

// ------------------------------------------------------------------ queues

/// Creates (`SHM_OK`) or opens (`SHM_EXISTS`) the byte queue `name` with a ring of at least
/// `capacity_bytes`.
#[unsafe(no_mangle)]
pub extern "C" fn shm_queue(name: *const c_char, capacity_bytes: size_t, pq: *mut usize) -> c_int {
    status(|| {
        let name = name_arg(name)?;
        let out = out_arg(pq, "pq")?;
        with_state(|st| {
            let (q, created) = ByteQueue::create_or_open(&st.domain, name, capacity_bytes as u64)?;
            let addr = q.section().map_or(0, |s| s.as_ptr() as u64);
            // A queue this process knows already keeps its ends.
            if !table::entry_at(addr).is_some_and(|e| matches!(e.obj, Obj::Queue(_))) {
                insert_queue(q);
            }
            *out = addr as usize;
            Ok(if created { SHM_OK } else { SHM_EXISTS })
        })
    })
}

/// Runs `f` on the queue whose handle is `q`: lock-free through the table when this process
/// knows it, else opened under the state lock first.
#[inline]
fn on_queue<T>(q: usize, f: impl FnOnce(&QueueObj) -> Result<T, Failure>) -> Result<T, Failure> {
    let q = q as u64;
    let mut f = Some(f);
    let fast = table::with(q, |e| match &e.obj {
        Obj::Queue(o) if e.base == q => f.take().map(|f| f(o)),
        _ => None,
    });
    if let Some(Some(r)) = fast {
        return r;
    }
    let obj = with_state(|st| st.queue(q))?;
    f.expect("not called on the fast path")(&obj)
}

fn timeout_of(ms: c_long) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

/// Sends one message of `len` bytes; `timeout_ms` -1 waits for room for ever, 0 only tries.
///
/// # Safety
/// `msg` must point to `len` readable bytes (it may be NULL when `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shm_q_write(q: usize, msg: *const c_void, len: size_t, timeout_ms: c_long) -> c_int {
    status(|| {
        if msg.is_null() && len != 0 {
            return Err(invalid("msg is NULL"));
        }
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: `msg` points to `len` readable bytes (the caller's contract; non-NULL).
            unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len as usize) }
        };
        // Inlined: one function boundary less per call (see "Hot paths" in queue/ring.rs).
        on_queue(
            q,
            #[inline(always)]
            |obj| {
                let mut side = obj.tx.take();
                let end = side.end();
                if end.is_none() {
                    *end = Some(obj.queue().sender()?);
                }
                let tx = end.as_mut().expect("set above");
                match timeout_ms {
                    0 => tx.try_send(bytes)?,
                    t => match timeout_of(t) {
                        Some(d) => tx.send_timeout(bytes, d)?,
                        None => tx.send(bytes)?,
                    },
                }
                Ok(SHM_OK)
            },
        )
    })
}

/// Receives one message into `buf`, returning its length; `SHM_ERR_INVALID` (the message stays
/// queued) when `buflen` is too small. `timeout_ms` as for `shm_q_write`.
///
/// # Safety
/// `buf` must point to `buflen` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shm_q_read(q: usize, buf: *mut c_void, buflen: size_t, timeout_ms: c_long) -> isize {
    guarded(
        |c| c as isize,
        || {
            if buf.is_null() && buflen != 0 {
                return Err(invalid("buf is NULL"));
            }
            let out: &mut [u8] = if buflen == 0 {
                &mut []
            } else {
                // SAFETY: `buf` points to `buflen` writable bytes (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), buflen as usize) }
            };
            // Inlined, as in `shm_q_write`.
            on_queue(
                q,
                #[inline(always)]
                |obj| {
                    let mut side = obj.rx.take();
                    let end = side.end();
                    if end.is_none() {
                        *end = Some(obj.queue().receiver()?);
                    }
                    let rx = end.as_mut().expect("set above");
                    let n = if timeout_ms == 0 {
                        let m = rx.try_recv()?;
                        if m.len() > out.len() {
                            let len = m.len();
                            std::mem::forget(m);
                            return Err(invalid(format!(
                                "the next message has {len} bytes, more than buflen {buflen}"
                            )));
                        }
                        out[..m.len()].copy_from_slice(&m);
                        m.len()
                    } else {
                        rx.recv_into(out, timeout_of(timeout_ms))?
                    };
                    Ok(n as isize)
                },
            )
        },
    )
}
