//! The types of the memory subsystem, the same on every platform; each platform's
//! `memory.rs` implements the calls (`mmap`/`mprotect`/`msync` on Linux, `MapViewOfFileEx`/
//! `VirtualProtect`/`FlushViewOfFile` on Windows).

/// Page protection of a range in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// No access (`PROT_NONE`, `PAGE_NOACCESS`): any access faults.
    None,
    /// Read only (`PROT_READ`, `PAGE_READONLY`): a write faults.
    Read,
    /// Read and write (`PROT_READ | PROT_WRITE`; `PAGE_READWRITE`, or `PAGE_WRITECOPY` in a
    /// copy-on-write view).
    ReadWrite,
}

/// How a view maps its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViewKind {
    /// Sees every process's writes; a write through it faults (`MAP_SHARED` with `PROT_READ`,
    /// `FILE_MAP_READ`).
    ReadOnly,
    /// This process's writes go to private copies of the pages they touch; other processes and
    /// the object never see them (`MAP_PRIVATE` with `PROT_READ | PROT_WRITE`,
    /// `FILE_MAP_COPY`).
    CopyOnWrite,
}

/// How to flush a shared mapping to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushMode {
    /// Returns once the pages are written to the file's storage (`MS_SYNC`; on Windows
    /// `FlushViewOfFile` hands them to the file system, and the write to the device itself
    /// needs `FlushFileBuffers` on the file).
    Sync,
    /// Schedules the write and returns (`MS_ASYNC`, `FlushViewOfFile`).
    Async,
}

/// One region of this process's address space (`/proc/self/maps` on Linux, `VirtualQuery` on
/// Windows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Current protection (execute is not reported).
    pub protection: Protection,
    /// Shared: `MAP_SHARED`, or a view of a file mapping (`MEM_MAPPED`); else private or image.
    pub shared: bool,
    /// What is mapped: a path, `[heap]`, `[stack]`, or empty for anonymous memory (Linux);
    /// always empty on Windows, which names no path here.
    pub path: String,
}
