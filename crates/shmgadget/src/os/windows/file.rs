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

/// The unit of a data file's layout (`MappedFile`, file-backed sections): file offsets and
/// lengths of a file mapped at a fixed address, and the size of its header page. Windows maps
/// views only at file offsets and addresses that are multiples of the allocation granularity,
/// 64 KiB, so a data file made here keeps its data 64 KiB in (and records 65536 as its page
/// size: a file made on Linux, 4 KiB in, cannot be mapped here, and says so on open).
pub fn file_map_unit() -> usize {
    super::map::ALLOCATION_GRANULARITY
}

/// Whether the bytes of a path (WTF-8, as `OsStr::as_encoded_bytes` gives them) name an
/// absolute path: `X:\` or `X:/`, or a UNC path `\\server\share`. No allocation.
pub fn is_absolute_path(path: &[u8]) -> bool {
    match path {
        [d, b':', b'\\' | b'/', ..] => d.is_ascii_alphabetic(),
        [b'\\', b'\\', ..] => true,
        _ => false,
    }
}

/// Maps `len` bytes of `object` from `file_offset` at exactly `addr`, shared, read-write.
/// Windows maps files only from offsets that are multiples of 64 KiB ([`file_map_unit`]):
/// another offset is `ERROR_MAPPED_ALIGNMENT`.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and no live Rust reference may
/// point into memory it replaces.
pub unsafe fn map_file_fixed(object: &Object, addr: usize, len: usize, file_offset: u64) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { super::map::map_at(object, addr, len, file_offset, Access::ReadWrite) }
}

/// The longest path [`open_file_cstr`] converts on the stack, in UTF-16 units.
const MAX_CSTR_PATH: usize = 1100;

/// Opens an existing regular file read-write by a NUL-terminated UTF-8 path, as [`open_file`]
/// with [`OpenFile::Existing`], converting the path to UTF-16 in a stack buffer: no
/// allocation, so the fault handler may call it (a file-backed section mapped on first touch).
pub fn open_file_cstr(path: &std::ffi::CStr) -> io::Result<Object> {
    use windows_sys::Win32::Foundation::{ERROR_FILENAME_EXCED_RANGE, ERROR_INVALID_NAME};
    let text = std::str::from_utf8(path.to_bytes()).map_err(|_| super::object::os_error(ERROR_INVALID_NAME))?;
    let mut buf = [0u16; MAX_CSTR_PATH];
    let mut n = 0;
    for unit in text.encode_utf16() {
        if n + 1 >= buf.len() {
            return Err(super::object::os_error(ERROR_FILENAME_EXCED_RANGE));
        }
        buf[n] = unit;
        n += 1;
    }
    buf[n] = 0;
    Ok(Object(open_regular(&buf[..=n], GENERIC_READ | GENERIC_WRITE, OPEN_EXISTING)?))
}
