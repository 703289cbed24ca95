//! Regular files the user names (data files mapped at a recorded address): opened without
//! following a symbolic link, written at an offset, mapped shared at a file offset inside our
//! own reservation. Linux: `open(2)`, `pwrite(2)`, `mmap(2)`.

use std::ffi::c_void;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mm::{MapFlags, ProtFlags};

use super::object::Object;

/// Whether [`open_file`] creates the file or opens an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFile {
    /// The file must exist.
    Existing,
    /// The file must not exist; it is created with mode 0600.
    CreateNew,
}

/// Opens a regular file read-write, `open(2)` with `O_RDWR | O_NOFOLLOW | O_CLOEXEC` (plus
/// `O_CREAT | O_EXCL` for [`OpenFile::CreateNew`]): a symbolic link as the last component is
/// refused (`ErrorExt::is_symlink`), a directory too (`ErrorExt::is_directory`).
pub fn open_file(path: &Path, how: OpenFile) -> io::Result<Object> {
    let mut flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if how == OpenFile::CreateNew {
        flags |= OFlags::CREATE | OFlags::EXCL;
    }
    Ok(Object(rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?))
}

/// The unit of a data file's layout (`MappedFile`, file-backed sections): file offsets and
/// lengths of a file mapped at a fixed address, and the size of its header page. Linux maps a
/// file from any page: the page size.
pub fn file_map_unit() -> usize {
    super::map::page_size()
}

/// Whether the bytes of a path name an absolute path (`/...`). No allocation (the fault
/// handler checks a link's target with it).
pub fn is_absolute_path(path: &[u8]) -> bool {
    path.first() == Some(&b'/')
}

/// Opens an existing regular file read-write by a NUL-terminated path, `open(2)` with
/// `O_RDWR | O_NOFOLLOW | O_CLOEXEC` (as [`open_file`] with [`OpenFile::Existing`]).
/// Async-signal-safe: one raw system call, no allocation (the fault handler uses it).
pub fn open_file_cstr(path: &std::ffi::CStr) -> io::Result<Object> {
    Ok(Object(rustix::fs::open(path, OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?))
}

impl Object {
    /// Writes all of `buf` at `offset`, `pwrite(2)`, retrying on `EINTR` and short writes.
    pub fn write_at(&self, mut offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            match rustix::io::pwrite(self.0.as_fd(), rest, offset) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing")),
                Ok(n) => {
                    rest = &rest[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Maps `len` bytes of `object` from `file_offset` at exactly `addr`, shared, read-write:
/// `mmap(2)` with `MAP_SHARED | MAP_FIXED`.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference may
/// point into memory it replaces.
pub unsafe fn map_file_fixed(object: &Object, addr: usize, len: usize, file_offset: u64) -> io::Result<()> {
    let prot = ProtFlags::READ | ProtFlags::WRITE;
    // SAFETY: forwarded from the caller.
    unsafe {
        rustix::mm::mmap(addr as *mut c_void, len, prot, MapFlags::SHARED | MapFlags::FIXED, &object.0, file_offset)?
    };
    Ok(())
}
