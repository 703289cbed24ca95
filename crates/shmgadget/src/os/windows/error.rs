//! OS errors as `io::Error` (Win32 error codes from `GetLastError`), and Windows's answers to
//! the questions callers above `os` ask of them ([`ErrorExt`], defined in `os/error.rs`), so
//! no error number appears outside `os`.

use std::io;

use crate::os::ErrorExt;

use windows_sys::Win32::Foundation as F;

/// The code this backend uses for "the last component is a symbolic link (reparse point),
/// refused" (`ERROR_CANT_RESOLVE_FILENAME`).
pub(super) const ERROR_SYMLINK: u32 = F::ERROR_CANT_RESOLVE_FILENAME;

fn code_of(e: &io::Error) -> Option<u32> {
    e.raw_os_error().map(|c| c as u32)
}

impl ErrorExt for io::Error {
    fn is_not_found(&self) -> bool {
        matches!(code_of(self), Some(F::ERROR_FILE_NOT_FOUND | F::ERROR_PATH_NOT_FOUND))
    }
    fn is_exists(&self) -> bool {
        matches!(code_of(self), Some(F::ERROR_FILE_EXISTS | F::ERROR_ALREADY_EXISTS))
    }
    fn is_no_space(&self) -> bool {
        matches!(
            code_of(self),
            Some(
                F::ERROR_DISK_FULL
                    | F::ERROR_HANDLE_DISK_FULL
                    | F::ERROR_COMMITMENT_LIMIT
                    | F::ERROR_NOT_ENOUGH_MEMORY
                    | F::ERROR_OUTOFMEMORY
            )
        )
    }
    fn is_symlink(&self) -> bool {
        code_of(self) == Some(ERROR_SYMLINK)
    }
    fn is_directory(&self) -> bool {
        code_of(self) == Some(F::ERROR_DIRECTORY)
    }
    fn is_permission_denied(&self) -> bool {
        matches!(code_of(self), Some(F::ERROR_ACCESS_DENIED | F::ERROR_PRIVILEGE_NOT_HELD))
    }
    fn is_out_of_memory(&self) -> bool {
        matches!(code_of(self), Some(F::ERROR_NOT_ENOUGH_MEMORY | F::ERROR_OUTOFMEMORY))
    }
    fn is_too_many_open(&self) -> bool {
        code_of(self) == Some(F::ERROR_TOO_MANY_OPEN_FILES)
    }
    fn is_system_table_full(&self) -> bool {
        code_of(self) == Some(F::ERROR_NO_SYSTEM_RESOURCES)
    }
    fn code(&self) -> u64 {
        code_of(self).unwrap_or(0) as u64
    }
    fn describe(&self) -> Option<(&'static str, &'static str)> {
        let named = match code_of(self)? {
            F::ERROR_FILE_NOT_FOUND => ("ERROR_FILE_NOT_FOUND", "its object is gone from the shm directory"),
            F::ERROR_PATH_NOT_FOUND => ("ERROR_PATH_NOT_FOUND", "the shm directory is gone"),
            F::ERROR_ACCESS_DENIED => {
                ("ERROR_ACCESS_DENIED", "no permission to open its object, or it is being deleted")
            }
            F::ERROR_SHARING_VIOLATION => ("ERROR_SHARING_VIOLATION", "another process opened it without sharing"),
            F::ERROR_NOT_ENOUGH_MEMORY => ("ERROR_NOT_ENOUGH_MEMORY", "out of memory"),
            F::ERROR_OUTOFMEMORY => ("ERROR_OUTOFMEMORY", "out of memory"),
            F::ERROR_COMMITMENT_LIMIT => ("ERROR_COMMITMENT_LIMIT", "the system's commit limit is reached"),
            F::ERROR_INVALID_ADDRESS => ("ERROR_INVALID_ADDRESS", "its address range is not free in this process"),
            F::ERROR_INVALID_PARAMETER => ("ERROR_INVALID_PARAMETER", "invalid argument"),
            F::ERROR_DISK_FULL => ("ERROR_DISK_FULL", "the backing store is full"),
            F::ERROR_TOO_MANY_OPEN_FILES => ("ERROR_TOO_MANY_OPEN_FILES", "this process has too many handles open"),
            F::ERROR_NO_SYSTEM_RESOURCES => ("ERROR_NO_SYSTEM_RESOURCES", "a system-wide table is full"),
            F::ERROR_DIRECTORY => ("ERROR_DIRECTORY", "is a directory"),
            F::ERROR_MAPPED_ALIGNMENT => ("ERROR_MAPPED_ALIGNMENT", "not aligned to the 64 KiB allocation granularity"),
            ERROR_SYMLINK => ("ERROR_CANT_RESOLVE_FILENAME", "its object's name is a symbolic link, which is refused"),
            _ => return None,
        };
        Some(named)
    }
}
