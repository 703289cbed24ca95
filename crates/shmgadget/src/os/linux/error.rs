//! OS errors as `io::Error`, and Linux's answers to the questions callers above `os` ask of
//! them ([`ErrorExt`], defined in `os/error.rs`), so no errno number appears outside `os`.

use std::io;

use crate::os::ErrorExt;

impl ErrorExt for io::Error {
    fn is_not_found(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOENT)
    }
    fn is_exists(&self) -> bool {
        self.raw_os_error() == Some(libc::EEXIST)
    }
    fn is_no_space(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOSPC)
    }
    fn is_symlink(&self) -> bool {
        self.raw_os_error() == Some(libc::ELOOP)
    }
    fn is_directory(&self) -> bool {
        self.raw_os_error() == Some(libc::EISDIR)
    }
    fn is_permission_denied(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
    }
    fn is_out_of_memory(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOMEM)
    }
    fn is_too_many_open(&self) -> bool {
        self.raw_os_error() == Some(libc::EMFILE)
    }
    fn is_system_table_full(&self) -> bool {
        self.raw_os_error() == Some(libc::ENFILE)
    }
    fn code(&self) -> u64 {
        self.raw_os_error().unwrap_or(0) as u64
    }
    fn describe(&self) -> Option<(&'static str, &'static str)> {
        errno_name(self)
    }
}

/// The symbolic name of an OS error (`"EMFILE"`), and a few words on what it means for
/// mapping a section, for messages that cannot allocate (the fault handler). `None` for an
/// error that carries no errno or one not in the table.
fn errno_name(err: &io::Error) -> Option<(&'static str, &'static str)> {
    let named = match err.raw_os_error()? {
        libc::EPERM => ("EPERM", "operation not permitted"),
        libc::ENOENT => ("ENOENT", "its object is gone from the shm directory"),
        libc::EINTR => ("EINTR", "interrupted"),
        libc::EIO => ("EIO", "input/output error"),
        libc::EBADF => ("EBADF", "bad descriptor"),
        libc::EAGAIN => ("EAGAIN", "resource temporarily unavailable"),
        libc::ENOMEM => ("ENOMEM", "out of memory, or too many mappings: see /proc/sys/vm/max_map_count"),
        libc::EACCES => ("EACCES", "no permission to open its object: check its owner and mode"),
        libc::EFAULT => ("EFAULT", "bad address"),
        libc::EBUSY => ("EBUSY", "busy"),
        libc::EEXIST => ("EEXIST", "exists"),
        libc::ENODEV => ("ENODEV", "the shm directory's file system cannot be mapped"),
        libc::ENOTDIR => ("ENOTDIR", "not a directory"),
        libc::EISDIR => ("EISDIR", "is a directory"),
        libc::EINVAL => ("EINVAL", "invalid argument"),
        libc::ENFILE => ("ENFILE", "the system-wide table of open files is full: see /proc/sys/fs/file-max"),
        libc::EMFILE => {
            ("EMFILE", "this process has as many descriptors open as RLIMIT_NOFILE allows: raise `ulimit -n`")
        }
        libc::ETXTBSY => ("ETXTBSY", "busy"),
        libc::EFBIG => ("EFBIG", "too large"),
        libc::ENOSPC => ("ENOSPC", "the backing store is full"),
        libc::EROFS => ("EROFS", "read-only file system"),
        libc::ELOOP => ("ELOOP", "its object's name is a symbolic link, which is refused"),
        libc::EOVERFLOW => ("EOVERFLOW", "value too large"),
        _ => return None,
    };
    Some(named)
}
