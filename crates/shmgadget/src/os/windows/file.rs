//! Regular files the user names (data files mapped at a recorded address): opened without
//! following a symbolic link, written at an offset, mapped shared at a file offset inside our
//! own reservation. Windows: `CreateFileW`, `WriteFile`, `MapViewOfFileEx`.

use std::io;
use std::os::windows::io::AsRawHandle;
use std::path::Path;

use windows_sys::Win32::Foundation::{GENERIC_READ, GENERIC_WRITE};
use windows_sys::Win32::Storage::FileSystem::{CREATE_NEW, OPEN_EXISTING, WriteFile};

use super::object::{Access, Object, at_offset, last_error, open_regular};

/// Whether [`open_file`] creates the file or opens an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFile {
    /// The file must exist.
    Existing,
    /// The file must not exist.
    CreateNew,
}

/// Opens a regular file read-write, `CreateFileW` with `FILE_FLAG_OPEN_REPARSE_POINT`
/// (`CREATE_NEW` for [`OpenFile::CreateNew`]): a symbolic link is refused
/// (`ErrorExt::is_symlink`), a directory too (`ErrorExt::is_directory`).
pub fn open_file(path: &Path, how: OpenFile) -> io::Result<Object> {
    let disposition = if how == OpenFile::CreateNew { CREATE_NEW } else { OPEN_EXISTING };
    Ok(Object(open_regular(&super::wide::path(path), GENERIC_READ | GENERIC_WRITE, disposition)?))
}

impl Object {
    /// Writes all of `buf` at `offset`, `WriteFile` with the offset in an `OVERLAPPED`.
    pub fn write_at(&self, mut offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            let n = rest.len().min(1 << 30) as u32;
            let mut ov = at_offset(offset);
            let mut wrote = 0u32;
            // SAFETY: `rest` is valid for `n` bytes; `ov` lives for the synchronous call.
            let ok = unsafe { WriteFile(self.0.as_raw_handle(), rest.as_ptr(), n, &mut wrote, &mut ov) };
            if ok == 0 {
                return Err(last_error());
            }
            if wrote == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "WriteFile wrote nothing"));
            }
            rest = &rest[wrote as usize..];
            offset += wrote as u64;
        }
        Ok(())
    }
}

/// Maps `len` bytes of `object` from `file_offset` at exactly `addr`, shared, read-write.
/// Windows maps files only from offsets that are multiples of 64 KiB: another offset is
/// `ERROR_MAPPED_ALIGNMENT` (file-backed sections keep their data one 4 KiB page in, so they
/// are not supported on Windows yet).
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference may
/// point into memory it replaces.
pub unsafe fn map_file_fixed(object: &Object, addr: usize, len: usize, file_offset: u64) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { super::map::map_at(object, addr, len, file_offset, Access::ReadWrite) }
}

/// Opens a user's file from the fault handler (Linux maps a file-backed section on first
/// touch). File-backed sections are not supported on Windows yet, so neither is this.
pub fn open_file_cstr(_path: &std::ffi::CStr) -> io::Result<Object> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "file-backed sections are not supported on Windows yet"))
}
