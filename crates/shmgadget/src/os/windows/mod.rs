//! The Windows platform: windows-sys, built for `x86_64-pc-windows-gnu` and tested under Wine 8
//! (see `/README.md`, "Windows"). One file per subsystem of the contract in `os/mod.rs`, as on
//! Linux; each wrapper names the Win32 call it makes.
//!
//! The shm directory is a real directory (default `%ProgramData%\shmgadget`, or
//! `SHMGADGET_SHM_DIR`), and every object is a file in it, created with
//! `FILE_ATTRIBUTE_TEMPORARY` (the cache manager keeps its pages in memory and writes them to
//! the volume only under memory pressure). Sections are file mappings (`CreateFileMappingW`
//! on the object's file) mapped at the exact address with `MapViewOfFileEx` inside our own
//! reservation (see `reserve.rs`; `placeholder.rs` where Windows has placeholders).
//! Waiting on a shared word is a futex emulation (`wait.rs`), first touch a vectored exception
//! handler (`fault.rs`).
//!
//! # Why files, not pagefile-backed named mappings
//! Issue 15 asked for named `SEC_RESERVE` mappings of the pagefile
//! (`CreateFileMappingW(INVALID_HANDLE_VALUE, SEC_RESERVE, name)`). They work under Wine and
//! Windows, but the layers above `os` rely on five things, and such a section gives one:
//!
//! | need | pagefile named mapping | file in the shm directory |
//! |---|---|---|
//! | lifetime beyond the last handle (a domain outlives its processes, as `/dev/shm` objects do: `shmgadget ls`, `info`, `gc` between runs, a list built by one program and walked by the next) | no: the section is gone when its last handle or view closes | yes, until deleted |
//! | listing the objects of a domain | only through the native `NtQueryDirectoryObject` on `BaseNamedObjects` | `FindFirstFileW` |
//! | stat by name (size, allocation, identity) without opening a view | no size query in Win32 (`NtQuerySection` is native) | `GetFileInformationByHandle`, `FILE_STANDARD_INFO` |
//! | byte locks the kernel drops when their holder dies (liveness tokens, `Object::try_lock_byte`) | none on sections | `LockFileEx` |
//! | commit counted against the system's commit limit, a clean error past it | yes: `VirtualAlloc(MEM_COMMIT)` fails with `ERROR_COMMITMENT_LIMIT` | no: a file's pages are backed by the volume, so the limit is the volume (`ERROR_DISK_FULL` when the file grows, also `OutOfSpace`) |
//!
//! So objects are files, with `FILE_ATTRIBUTE_TEMPORARY` to keep them as close to pagefile
//! memory as a file gets: their dirty pages stay in RAM instead of being written back every
//! few seconds by the lazy writer. What they do not give is the commit limit: a machine can
//! hold more section memory than RAM + pagefile, paged to the shm directory's volume instead,
//! and a full volume, not the commit limit, is what `OutOfSpace` reports. Decommit is
//! `FSCTL_SET_ZERO_DATA` on the sparse file; a pagefile view's pages cannot be decommitted at
//! all (`VirtualFree(MEM_DECOMMIT)` refuses mapped views), only discarded.
mod error;
mod fault;
mod file;
mod liveness;
mod lock;
mod map;
mod memory;
mod object;
mod placeholder;
mod process;
mod reserve;
mod time;
mod wait;
mod wide;

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

/// Default shm directory: `%ProgramData%\shmgadget` (machine-wide, like `/dev/shm`), created
/// on first use by [`Dir::open`].
pub const DEFAULT_SHM_DIR: &str = "C:\\ProgramData\\shmgadget";
