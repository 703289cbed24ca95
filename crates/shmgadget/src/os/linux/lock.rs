//! The global lock: one machine-wide exclusive lock per shm directory, serialising creating,
//! joining and deleting domains. Linux: `flock(2)` on the directory.

use std::io;

use rustix::fs::FlockOperation;

use super::object::Dir;

/// An exclusive lock on a shm directory, held until dropped. It belongs to the open file
/// description of the directory handle it was taken through, so the kernel releases it when
/// the holder closes it or dies: a crashed holder never leaves it taken.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] Dir);

impl DirLock {
    /// Takes the lock through `dir` (which it keeps), waiting for it: `flock(2)` with
    /// `LOCK_EX`.
    pub fn acquire(dir: Dir) -> io::Result<DirLock> {
        rustix::fs::flock(&dir.0, FlockOperation::LockExclusive)?;
        Ok(DirLock(dir))
    }
}
