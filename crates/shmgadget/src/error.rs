//! One error type for the whole library.
//!
//! Callers match on [`Error::kind`]; the `Display` text says what happened, what was expected
//! and what to do next, so it can be shown to a person as it is.

use std::fmt;
use std::io;

use crate::os::ErrorExt;

/// What went wrong, for callers that want to react to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A domain or section name is empty, too long or uses characters outside `[A-Za-z0-9._-]`.
    InvalidName,
    /// A size is zero, not representable, or larger than the window allows.
    InvalidSize,
    /// Any other argument is out of range (offset, alignment, option).
    InvalidArgument,
    /// A section with that name already exists.
    AlreadyExists,
    /// No section (or domain) with that name exists.
    NotFound,
    /// The domain's address window has no free range large enough.
    WindowFull,
    /// The registry has no free section entry or process slot.
    RegistryFull,
    /// The address window could not be reserved in this process.
    WindowUnavailable,
    /// The operating system refused access (mode bits, or an object owned by another user).
    PermissionDenied,
    /// A shared header failed validation (magic, version, fingerprint, sizes, offsets).
    Corrupt,
    /// The backing store (tmpfs) is full.
    OutOfSpace,
    /// A wait ran out of time.
    Timeout,
    /// The object waited on was destroyed.
    Destroyed,
    /// A lock's previous holder died while holding it (the data may need repair).
    OwnerDied,
    /// A queue is full (a non-blocking send) or empty (a non-blocking receive).
    WouldBlock,
    /// The other side of a queue is gone: every sender (or every receiver) detached or died.
    Disconnected,
    /// The platform cannot do this (for example decommit of a section's pages under Wine,
    /// where memory is freed only with the whole section).
    Unsupported,
    /// Any other operating-system error.
    Os,
}

/// The error returned by every fallible shmgadget call.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// Shorthand for `Result<T, shmgadget::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an error of `kind` with a complete, human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// Builds an error from an OS error, classified by the `os` layer's predicates (refused
    /// permission, a full backing store, not found, already exists; on Linux `EACCES`/`EPERM`,
    /// `ENOSPC`, `ENOENT`, `EEXIST`). `context` says what was being attempted.
    pub fn from_io(context: impl Into<String>, err: io::Error) -> Self {
        let kind = if err.is_permission_denied() {
            ErrorKind::PermissionDenied
        } else if err.is_no_space() {
            ErrorKind::OutOfSpace
        } else if err.is_not_found() {
            ErrorKind::NotFound
        } else if err.is_exists() {
            ErrorKind::AlreadyExists
        } else if err.kind() == io::ErrorKind::Unsupported {
            ErrorKind::Unsupported
        } else {
            ErrorKind::Os
        };
        let mut message = context.into();
        message.push_str(": ");
        message.push_str(&err.to_string());
        match kind {
            ErrorKind::PermissionDenied => {
                message.push_str(" (check the object's owner and mode with `shmgadget ls`, or run as its owner)")
            }
            // Windows: a view or reservation found no memory or address space.
            ErrorKind::OutOfSpace if err.is_out_of_memory() => message.push_str(
                " (not enough memory or address space for a mapping this large: free sections with \
                 `shmgadget rm`/`gc`, or use smaller sections)",
            ),
            ErrorKind::OutOfSpace => message.push_str(
                " (the backing store is full: free sections with `shmgadget rm`/`gc`, or set \
                 SHMGADGET_SHM_DIR to a larger tmpfs)",
            ),
            _ if err.is_out_of_memory() => message
                .push_str(" (out of memory, or this process has too many mappings: see /proc/sys/vm/max_map_count)"),
            _ if err.is_too_many_open() => message.push_str(
                " (this process has as many descriptors open as its limit RLIMIT_NOFILE allows: raise it with \
                 `ulimit -n` or setrlimit(2), or close descriptors it does not need)",
            ),
            _ if err.is_system_table_full() => {
                message.push_str(" (the system-wide table of open files is full: see /proc/sys/fs/file-max)")
            }
            _ => {}
        }
        Error { kind, message, source: Some(err) }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The underlying OS error, if there was one.
    pub fn os_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error {{ kind: {:?}, message: {:?} }}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*)))
    };
}
pub(crate) use bail;
