//! UTF-16 paths for the `W` calls, and the translation of object names: `:` (which the
//! portable object names use, see `names.rs`) is not allowed in a Windows file name, so it is
//! stored as `~` (which no shmgadget name may contain) and read back as `:`.

use std::ffi::OsStr;
use std::os::windows::ffi::OsStrExt;
use std::path::Path;

/// `path` as a NUL-terminated UTF-16 string.
pub(super) fn path(path: &Path) -> Vec<u16> {
    OsStr::new(path).encode_wide().chain(std::iter::once(0)).collect()
}

/// A plain string as a NUL-terminated UTF-16 string.
pub(super) fn str(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// The stored form of one object-name character.
#[inline]
pub(super) fn to_file_char(c: u16) -> u16 {
    if c == b':' as u16 { b'~' as u16 } else { c }
}

/// The object name of a file name.
pub(super) fn object_name(file: &str) -> String {
    file.replace('~', ":")
}
