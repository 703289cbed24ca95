//! The operating-system layer: the only module that makes system calls.
//!
//! Everything above this module speaks in the typed handles and small structs listed below;
//! no file descriptor, errno number, `libc::`/`rustix::` name, `flock` or pthread type appears
//! outside `os` (`.ci/check-seam` greps for them). Each wrapper names the call it makes.
//!
//! # The platform contract
//! A platform is one folder, `os/<platform>/`, with one file per subsystem, that provides
//! every item re-exported below from `platform` with the same signatures; what is the same on
//! every platform lives once, in the files of `os/` itself: the [`ErrorExt`] trait
//! (`error.rs`), the memory and object types (`memory.rs`, `object.rs`) and the table of
//! liveness-token cells (`tokens.rs`, over each platform's handles). The `contract` block at
//! the end of this file pins the most used signatures, so a port that drifts fails to compile
//! here rather than at a call site. Linux is `os/linux/`; Windows is `os/windows/` (windows-sys; built for
//! `x86_64-pc-windows-gnu` and tested under Wine, see `.ci/windows`).
//!
//! | subsystem | items | what the rest of shmgadget relies on |
//! |---|---|---|
//! | objects (`object`) | [`Dir`], [`Object`], [`Access`], [`ObjectStat`], [`ObjectId`], [`list_dir`] | named objects in one directory, created with an exact mode, in pages of the directory's size ([`Dir::page_size`], [`Object::page_size`]: huge pages on hugetlbfs, where sizes round up to them), opened without following links, sized sparsely, committed (`allocate`) and decommitted (`punch_hole`) for every process, read without mapping (`read_at`), stated by name without opening (`stat_object`); an identity that tells a replaced object from the original |
//! | mapping (`map`) | [`map_shared_fixed`], [`map_shared`], [`unmap`], [`page_size`], [`mappings_overlapping`], [`USER_ADDRESS_LIMIT`], [`set_huge_advice`] | an object mapped shared at an exact address inside our own reservation (optionally advised to use transparent huge pages) |
//! | memory (`memory`) | [`map_view`], [`ViewKind`], [`protect`], [`Protection`], [`flush`], [`FlushMode`], [`resident_pages`], [`region_at`], [`Region`], [`Object::page_resident`] | part of an object mapped anywhere outside our reservations, read-only or copy-on-write; this process's protection of a range changed; a shared range written back to its file; which pages are resident, whether an object has a page at an offset, and what this process has mapped at an address |
//! | files (`file`) | [`open_file`], [`open_file_cstr`] (async-signal-safe), [`OpenFile`], [`map_file_fixed`], [`file_map_unit`], [`is_absolute_path`], [`Object::write_at`] | a regular file the user names, opened without following a link, written at an offset, mapped shared from a file offset (a multiple of [`file_map_unit`]: the page on Linux, 64 KiB on Windows) at an exact address inside our reservation |
//! | reservation (`reserve`) | [`reserve_fixed`], [`restore_reservation`], [`ReserveError`] | an address range held without memory, never replacing someone else's mapping, and given back to that state |
//! | locks (`lock`) | [`DirLock`] (the global lock of one shm directory, released by the kernel when its holder dies) | the locks inside shared memory are shmgadget's own (`sync::robust`), built on waiting on a shared word |
//! | liveness (`liveness`) | [`TokenCell`], [`Object::try_lock_byte`], [`Object::byte_is_locked`], [`Object::any_byte_locked`], [`install_fork_handlers`], [`fork_generation`], [`token_for_address`] | a token per registration that the kernel drops when its process dies, that a forked child does not inherit, and that any process can test |
//! | process (`process`) | [`current_pid`], [`current_tid`], [`effective_uid`], [`thread_exists`], [`thread_alive`], [`thread_group`], [`proc_pid_namespace`], [`children_share_pid_namespace`], [`THREAD_IDS_MACHINE_WIDE`] | ids a lock holder records about itself, and whether a thread still runs |
//! | waiting on a shared word (`wait`) | [`futex_wait`], [`futex_wake`], [`FutexWait`] | sleep while a 32-bit word in shared memory holds a value; wake sleepers in any process |
//! | faults (`fault`) | [`install_fault_hook`], [`fault_hook_installed`], [`FaultHook`], [`FaultSignal`], [`write_stderr`], [`ensure_signal_stack`], [`signal_stack_room`] | a hook run on an access to an unmapped page of our window that may map it and retry the access; everything else chained to the previous handler; one async-signal-safe line on stderr |
//! | time (`time`) | [`monotonic_now`] | a clock that never goes back |
//! | errors (`error`) | [`ErrorExt`] on `io::Error` | the predicates callers react to (`is_not_found`, `is_exists`, `is_no_space`, `is_permission_denied`, ...), a display code and a signal-safe description; never an errno number above `os` |

mod error;
mod memory;
mod object;
mod tokens;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(windows)]
mod windows;

#[cfg(target_os = "linux")]
use linux as platform;
#[cfg(windows)]
use windows as platform;

pub use error::ErrorExt;
pub use memory::{FlushMode, Protection, Region, ViewKind};
pub use object::ObjectStat;
pub use tokens::{TokenCell, token_for_address};

/// Default shm directory of the platform (`/dev/shm` on Linux).
pub use platform::DEFAULT_SHM_DIR;

// Under loom some items (the pid namespace of token-less lock holders) go unused.
#[cfg_attr(loom, allow(unused_imports))]
pub use platform::{
    // objects
    Access,
    Dir,
    // locks
    DirLock,
    // faults
    FaultHook,
    FaultSignal,
    // waiting on a shared word
    FutexWait,
    Object,
    ObjectId,
    // files
    OpenFile,
    // reservation
    ReserveError,
    // process
    THREAD_IDS_MACHINE_WIDE,
    // mapping
    USER_ADDRESS_LIMIT,
    // process
    children_share_pid_namespace,
    current_pid,
    current_tid,
    effective_uid,
    ensure_signal_stack,
    fault_hook_installed,
    file_map_unit,
    flush,
    fork_generation,
    futex_wait,
    futex_wake,
    install_fault_hook,
    install_fork_handlers,
    is_absolute_path,
    list_dir,
    map_file_fixed,
    map_shared,
    map_shared_fixed,
    map_view,
    mappings_overlapping,
    // time
    monotonic_now,
    open_file,
    open_file_cstr,
    page_size,
    proc_pid_namespace,
    protect,
    region_at,
    reserve_fixed,
    resident_pages,
    restore_reservation,
    set_huge_advice,
    signal_stack_room,
    thread_alive,
    thread_exists,
    thread_group,
    unmap,
    write_stderr,
};

#[cfg(not(any(target_os = "linux", windows)))]
compile_error!("shmgadget supports Linux and Windows; another platform is one new folder in src/os/");

/// The contract's signatures, pinned: a platform whose items drift from them fails here.
#[allow(dead_code)]
mod contract {
    use std::io;
    use std::path::Path;

    use super::*;

    const _: fn(&Path) -> io::Result<Dir> = Dir::open;
    const _: bool = THREAD_IDS_MACHINE_WIDE;
    const _: fn(&Dir) -> io::Result<Dir> = Dir::try_clone;
    const _: fn(&Dir, &str, u32) -> io::Result<Object> = Dir::create_object;
    const _: fn(&Dir, &str, Access) -> io::Result<Object> = Dir::open_object;
    const _: fn(&Dir, &std::ffi::CStr) -> io::Result<Object> = Dir::open_object_cstr;
    const _: fn(&Dir, &str) -> io::Result<()> = Dir::unlink_object;
    const _: fn(&Dir, &str) -> io::Result<ObjectStat> = Dir::stat_object;
    const _: fn(&Path) -> io::Result<Vec<String>> = list_dir;
    const _: fn(&Object) -> io::Result<ObjectStat> = Object::stat;
    const _: fn(&Dir) -> io::Result<usize> = Dir::page_size;
    const _: fn(&Object) -> io::Result<usize> = Object::page_size;
    const _: fn(&Object, u64) -> io::Result<()> = Object::set_size;
    const _: fn(&Object, u64, u64) -> io::Result<()> = Object::allocate;
    const _: fn(&Object, u64, u64) -> io::Result<()> = Object::punch_hole;
    const _: fn(&Object, u64, &mut [u8]) -> io::Result<usize> = Object::read_at;
    const _: fn(&Object, u64) -> io::Result<bool> = Object::try_lock_byte;
    const _: fn(&Object, u64) -> io::Result<bool> = Object::byte_is_locked;
    const _: fn(&Object) -> io::Result<bool> = Object::any_byte_locked;
    const _: fn(Dir) -> io::Result<DirLock> = DirLock::acquire;
    const _: unsafe fn(&Object, usize, usize, Access) -> io::Result<()> = map_shared_fixed;
    const _: fn(&Object, usize, Access) -> io::Result<std::ptr::NonNull<u8>> = map_shared;
    const _: unsafe fn(usize, usize) -> io::Result<()> = unmap;
    const _: fn(usize, usize) -> Result<(), ReserveError> = reserve_fixed;
    const _: fn(bool) = set_huge_advice;
    const _: unsafe fn(usize, usize) -> io::Result<()> = restore_reservation;
    const _: fn() -> usize = page_size;
    const _: fn() -> u32 = current_pid;
    const _: fn() -> u32 = effective_uid;
    const _: fn(fn()) = install_fork_handlers;
    const _: fn() -> u64 = fork_generation;
    const _: fn(usize) -> u64 = token_for_address;
    const _: fn(&std::sync::atomic::AtomicU32, u32, Option<std::time::Duration>) -> io::Result<FutexWait> = futex_wait;
    const _: fn(&std::sync::atomic::AtomicU32, u32) -> usize = futex_wake;
    const _: fn(FaultHook) -> io::Result<bool> = install_fault_hook;
    const _: fn(&[u8]) = write_stderr;
    const _: fn(usize) = ensure_signal_stack;
    const _: fn() -> Option<usize> = signal_stack_room;
    const _: fn() -> std::time::Duration = monotonic_now;
    const _: fn(&Object, u64, usize, ViewKind) -> io::Result<std::ptr::NonNull<u8>> = map_view;
    const _: unsafe fn(usize, usize, Protection) -> io::Result<()> = protect;
    const _: fn(usize, usize, FlushMode) -> io::Result<()> = flush;
    const _: fn(usize, usize) -> io::Result<usize> = resident_pages;
    const _: fn(usize) -> Option<Region> = region_at;
    const _: fn(&Object, u64) -> io::Result<bool> = Object::page_resident;
    const _: fn(&Path, OpenFile) -> io::Result<Object> = open_file;
    const _: fn(&std::ffi::CStr) -> io::Result<Object> = open_file_cstr;
    const _: fn(&Object, u64, &[u8]) -> io::Result<()> = Object::write_at;
    const _: unsafe fn(&Object, usize, usize, u64) -> io::Result<()> = map_file_fixed;
    const _: fn() -> usize = file_map_unit;
    const _: fn(&[u8]) -> bool = is_absolute_path;
}
