//! The Windows platform: windows-sys, built for `x86_64-pc-windows-gnu` and tested under Wine 8
//! (see `/README.md`, "Windows"). One file per subsystem of the contract in `os/mod.rs`, as on
//! Linux; each wrapper names the Win32 call it makes.
//!
//! The shm directory is a real directory (default `%ProgramData%\shmgadget`, or
//! `SHMGADGET_SHM_DIR`), and every object is a file in it: the registry, heap and queues above
//! `os` need named objects they can list, stat, read without mapping and lock byte by byte,
//! with locks the kernel drops when their holder dies, and `LockFileEx` on files gives exactly
//! that. Sections are file mappings (`CreateFileMappingW` on the object's file) mapped at the
//! exact address with `MapViewOfFileEx` inside our own reservation (see `reserve.rs`).
//! Waiting on a shared word is a futex emulation (`wait.rs`), first touch a vectored exception
//! handler (`fault.rs`).

mod error;
mod fault;
mod file;
mod liveness;
mod lock;
mod map;
mod memory;
mod object;
mod process;
mod reserve;
mod time;
mod wait;
mod wide;

pub use error::ErrorExt;
pub use fault::{
    FaultHook, FaultSignal, ensure_signal_stack, fault_hook_installed, install_fault_hook, signal_stack_room,
    write_stderr,
};
pub use file::{OpenFile, map_file_fixed, open_file, open_file_cstr};
pub use liveness::{TokenCell, fork_generation, install_fork_handlers, token_for_address};
pub use lock::DirLock;
pub use map::{
    USER_ADDRESS_LIMIT, map_shared, map_shared_fixed, mappings_overlapping, page_size, set_huge_advice, unmap,
};
pub use memory::{FlushMode, Protection, Region, ViewKind, flush, map_view, protect, region_at, resident_pages};
pub use object::{Access, Dir, Object, ObjectId, ObjectStat, list_dir};
pub use process::{
    THREAD_IDS_MACHINE_WIDE, current_pid, current_tid, effective_uid, proc_pid_namespace, thread_alive, thread_exists,
    thread_group,
};
pub use reserve::{ReserveError, reserve_fixed, restore_reservation};
pub use time::monotonic_now;
pub use wait::{FutexWait, futex_wait, futex_wake};

/// Default shm directory: `%ProgramData%\shmgadget` (machine-wide, like `/dev/shm`), created
/// on first use by [`Dir::open`].
pub const DEFAULT_SHM_DIR: &str = "C:\\ProgramData\\shmgadget";
