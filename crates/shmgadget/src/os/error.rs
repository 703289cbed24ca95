//! The questions callers above `os` ask of an OS error ([`ErrorExt`]), the same on every
//! platform: each platform's `error.rs` answers them for `io::Error` from its own numbers
//! (errno on Linux, Win32 error codes on Windows), so no error number appears outside `os`.

/// What callers above `os` may ask of an OS error: which of the few conditions they react to
/// it is. Implemented for `io::Error`, the error type of every `os` call. The codes in
/// parentheses are Linux's, then Windows's.
pub trait ErrorExt {
    /// No such object or directory (`ENOENT`; `ERROR_FILE_NOT_FOUND`, `ERROR_PATH_NOT_FOUND`).
    fn is_not_found(&self) -> bool;
    /// The object exists already (`EEXIST`; `ERROR_FILE_EXISTS`, `ERROR_ALREADY_EXISTS`).
    fn is_exists(&self) -> bool;
    /// The backing store is full (`ENOSPC`; `ERROR_DISK_FULL`, `ERROR_HANDLE_DISK_FULL`, and
    /// on Windows also no memory or address space for a view or reservation,
    /// `ERROR_COMMITMENT_LIMIT`, `ERROR_NOT_ENOUGH_MEMORY`, `ERROR_OUTOFMEMORY`: a section's
    /// backing there is memory and address space, so running out of either is what a full
    /// tmpfs is on Linux, `ErrorKind::OutOfSpace`, `SHM_ERR_NO_MEMORY` in C).
    fn is_no_space(&self) -> bool;
    /// Permission refused (`EACCES`, `EPERM`; `ERROR_ACCESS_DENIED`, `ERROR_PRIVILEGE_NOT_HELD`).
    fn is_permission_denied(&self) -> bool;
    /// Out of memory, or too many mappings (`ENOMEM`; `ERROR_NOT_ENOUGH_MEMORY`,
    /// `ERROR_OUTOFMEMORY`, `ERROR_COMMITMENT_LIMIT`).
    fn is_out_of_memory(&self) -> bool;
    /// This process has as many descriptors (handles) open as it may (`EMFILE`;
    /// `ERROR_TOO_MANY_OPEN_FILES`).
    fn is_too_many_open(&self) -> bool;
    /// A system-wide table is full (`ENFILE`; `ERROR_NO_SYSTEM_RESOURCES`).
    fn is_system_table_full(&self) -> bool;
    /// The last component of a path is a symbolic link, refused (`ELOOP` with `O_NOFOLLOW`;
    /// `ERROR_CANT_RESOLVE_FILENAME`, which the Windows backend reports for a reparse point).
    fn is_symlink(&self) -> bool;
    /// The path names a directory where a file was expected (`EISDIR`; `ERROR_DIRECTORY`).
    fn is_directory(&self) -> bool;
    /// The platform's number for the error, for display only (0 if it has none).
    fn code(&self) -> u64;
    /// The error's symbolic name (`"EMFILE"`, `"ERROR_FILE_NOT_FOUND"`) and a few words on what
    /// it means for mapping a section, for messages that cannot allocate (the fault handler).
    /// `None` for an error that carries no platform number or one not in the table.
    fn describe(&self) -> Option<(&'static str, &'static str)>;
}
