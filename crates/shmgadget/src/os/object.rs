//! The platform-independent type of the objects subsystem; each platform's `object.rs`
//! fills it (`fstat(2)` on Linux, `GetFileInformationByHandle` on Windows).

use super::ObjectId;

/// What the platform says about an object (`fstat(2)`, `GetFileInformationByHandle`).
#[derive(Debug, Clone, Copy)]
pub struct ObjectStat {
    /// Apparent size in bytes (`st_size`, the end of file).
    pub size: u64,
    /// Bytes backed by memory or the volume (`st_blocks * 512`,
    /// `FILE_STANDARD_INFO::AllocationSize`).
    pub allocated: u64,
    /// Owner (`st_uid`; Windows files have no uid: always 0 there, as `effective_uid` is).
    pub uid: u32,
    /// Whether it is a regular file (not a directory, nor a reparse point on Windows).
    pub is_regular: bool,
    /// Which object this is: equal identities mean the same object.
    pub identity: ObjectId,
}
