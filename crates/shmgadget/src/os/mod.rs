//! The operating-system layer: the only module that makes system calls.
//!
//! Everything above this module speaks in typed wrappers (`OwnedFd`, `io::Result`, small
//! structs); no `libc::` or `rustix::` name appears outside `os`. Porting shmgadget to another
//! platform means writing one more file next to `linux.rs` with the same functions.
//!
//! Each wrapper names the C call it makes and its man page.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!("shmgadget supports Linux only for now; another platform is one new file in src/os/");
