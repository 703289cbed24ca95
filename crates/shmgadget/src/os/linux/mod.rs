//! The Linux platform: rustix first, libc where rustix stops (OFD byte locks, signal actions,
//! fork handlers). One file per subsystem of the contract in `os/mod.rs`; each
//! wrapper names the system call it makes.

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

pub use fault::{
    FaultHook, FaultSignal, ensure_signal_stack, fault_hook_installed, install_fault_hook, signal_stack_room,
    write_stderr,
};
pub use file::{OpenFile, file_map_unit, is_absolute_path, map_file_fixed, open_file, open_file_cstr};
pub(super) use liveness::{close_raw, raw_of};
pub use liveness::{fork_generation, install_fork_handlers};
pub use lock::DirLock;
pub use map::{
    USER_ADDRESS_LIMIT, map_shared, map_shared_fixed, mappings_overlapping, page_size, set_huge_advice, unmap,
};
pub use memory::{flush, map_view, protect, region_at, resident_pages};
pub use object::{Access, Dir, Object, ObjectId, list_dir};
pub use process::{
    THREAD_IDS_MACHINE_WIDE, children_share_pid_namespace, current_pid, current_tid, effective_uid, proc_pid_namespace,
    thread_alive, thread_exists, thread_group,
};
pub use reserve::{ReserveError, reserve_fixed, restore_reservation};
pub use time::monotonic_now;
pub use wait::{FutexWait, futex_wait, futex_wake};

/// Default shm directory: the tmpfs at `/dev/shm`.
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";
