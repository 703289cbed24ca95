//! Directories and shared-memory objects: files in the shm directory, opened by name relative
//! to the directory's path with `CreateFileW` (share modes read, write and delete, so another
//! process may open, lock, map or remove an object while we hold it).

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::{Path, PathBuf};

use windows_sys::Win32::Foundation::{
    ERROR_ACCESS_DENIED, ERROR_DIRECTORY, ERROR_HANDLE_EOF, GENERIC_READ, GENERIC_WRITE, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    BY_HANDLE_FILE_INFORMATION, CREATE_NEW, CreateFileW, DeleteFileW, FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_NORMAL,
    FILE_ATTRIBUTE_REPARSE_POINT, FILE_ATTRIBUTE_TEMPORARY, FILE_END_OF_FILE_INFO, FILE_FLAG_BACKUP_SEMANTICS,
    FILE_FLAG_OPEN_REPARSE_POINT, FILE_READ_ATTRIBUTES, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE,
    FILE_STANDARD_INFO, FileEndOfFileInfo, FileStandardInfo, GetFileAttributesW, GetFileInformationByHandle,
    GetFileInformationByHandleEx, INVALID_FILE_ATTRIBUTES, OPEN_EXISTING, ReadFile, SetFileInformationByHandle,
};
use windows_sys::Win32::System::IO::OVERLAPPED;

use super::wide;
use crate::os::ObjectStat;

/// How an object is opened or mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (`GENERIC_READ`, `PAGE_READONLY`).
    Read,
    /// Read and write (`GENERIC_READ | GENERIC_WRITE`, `PAGE_READWRITE`).
    ReadWrite,
}

impl Access {
    fn desired(self) -> u32 {
        match self {
            Access::Read => GENERIC_READ,
            Access::ReadWrite => GENERIC_READ | GENERIC_WRITE,
        }
    }
}

/// The longest object path the fault handler can build without allocating, in UTF-16 units.
const MAX_PATH_UNITS: usize = 1024;

/// An open shm directory: its absolute path, also kept as UTF-16 with a trailing separator so
/// the fault handler can build an object's path without allocating. (Windows has no `openat`
/// in Win32: objects are opened by full path.)
#[derive(Debug, Clone)]
pub struct Dir {
    path: PathBuf,
    prefix: Box<[u16]>,
}

/// An open shared-memory object (a file in the shm directory). Owns its handle; dropping it
/// closes the handle (`CloseHandle`), which a mapping of the object outlives.
#[derive(Debug)]
pub struct Object(pub(super) OwnedHandle);

pub(super) fn last_error() -> io::Error {
    io::Error::last_os_error()
}

pub(super) fn os_error(code: u32) -> io::Error {
    io::Error::from_raw_os_error(code as i32)
}

/// `CreateFileW` with shared read, write and delete; a failure is the last error.
pub(super) fn create_file(path: &[u16], access: u32, disposition: u32, flags: u32) -> io::Result<OwnedHandle> {
    // SAFETY: `path` is NUL-terminated UTF-16; no security attributes or template.
    let h: HANDLE = unsafe {
        CreateFileW(
            path.as_ptr(),
            access,
            FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
            std::ptr::null(),
            disposition,
            flags,
            std::ptr::null_mut(),
        )
    };
    if h == INVALID_HANDLE_VALUE {
        return Err(last_error());
    }
    // SAFETY: `h` is a handle just opened by us and owned by nobody else.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

/// Opens an existing file without following a reparse point (symbolic link), then refuses a
/// link (`ERROR_CANT_RESOLVE_FILENAME`, see `ErrorExt::is_symlink`) or a directory
/// (`ERROR_DIRECTORY`).
pub(super) fn open_regular(path: &[u16], access: u32, disposition: u32) -> io::Result<OwnedHandle> {
    let h = match create_file(path, access, disposition, FILE_ATTRIBUTE_NORMAL | FILE_FLAG_OPEN_REPARSE_POINT) {
        Ok(h) => h,
        Err(e) if e.raw_os_error() == Some(ERROR_ACCESS_DENIED as i32) => {
            // SAFETY: `path` is NUL-terminated UTF-16.
            let attrs = unsafe { GetFileAttributesW(path.as_ptr()) };
            if attrs != INVALID_FILE_ATTRIBUTES && attrs & FILE_ATTRIBUTE_DIRECTORY != 0 {
                return Err(os_error(ERROR_DIRECTORY));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let info = file_info(&h)?;
    if info.dwFileAttributes & FILE_ATTRIBUTE_REPARSE_POINT != 0 {
        return Err(os_error(super::error::ERROR_SYMLINK));
    }
    if info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0 {
        return Err(os_error(ERROR_DIRECTORY));
    }
    Ok(h)
}

fn file_info(h: &OwnedHandle) -> io::Result<BY_HANDLE_FILE_INFORMATION> {
    // SAFETY: all-zero bytes are a valid BY_HANDLE_FILE_INFORMATION; the call writes it.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: `h` is an open handle and `info` a valid, writable struct.
    if unsafe { GetFileInformationByHandle(h.as_raw_handle(), &mut info) } == 0 {
        return Err(last_error());
    }
    Ok(info)
}

impl Dir {
    /// The page size objects in this directory are sized and committed in: the system page
    /// (large pages need a privilege shmgadget does not ask for).
    pub fn page_size(&self) -> io::Result<usize> {
        Ok(super::map::page_size())
    }

    /// Opens a directory: checks that it is one (`GetFileAttributesW`) and remembers its
    /// absolute path. The default shm directory is created if it does not exist yet.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let path = std::path::absolute(path)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(os_error(windows_sys::Win32::Foundation::ERROR_DIRECTORY)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && path == Path::new(super::DEFAULT_SHM_DIR) => {
                std::fs::create_dir_all(&path)?;
            }
            Err(e) => return Err(e),
        }
        let mut prefix: Vec<u16> = wide::path(&path);
        prefix.pop(); // the NUL
        if prefix.last() != Some(&(b'\\' as u16)) {
            prefix.push(b'\\' as u16);
        }
        Ok(Dir { path, prefix: prefix.into_boxed_slice() })
    }

    /// The directory's absolute path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle to the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(self.clone())
    }

    fn object_path(&self, name: &str) -> Vec<u16> {
        let mut p: Vec<u16> = self.prefix.to_vec();
        p.extend(name.encode_utf16().map(wide::to_file_char));
        p.push(0);
        p
    }

    /// Creates a new object `name`, `CreateFileW` with `CREATE_NEW` and
    /// `FILE_ATTRIBUTE_TEMPORARY`: the cache manager keeps a temporary file's pages in memory
    /// and does not write them to the volume unless memory runs short, so a section behaves
    /// like pagefile-backed memory (see `mod.rs`). Windows has no mode bits: `mode` is not
    /// stored (the directory's ACL decides who may open it).
    pub fn create_object(&self, name: &str, mode: u32) -> io::Result<Object> {
        let _ = mode;
        let h = create_file(
            &self.object_path(name),
            GENERIC_READ | GENERIC_WRITE,
            CREATE_NEW,
            FILE_ATTRIBUTE_TEMPORARY | FILE_FLAG_OPEN_REPARSE_POINT,
        )?;
        Ok(Object(h))
    }

    /// Opens an existing object, `CreateFileW` with `OPEN_EXISTING` and
    /// `FILE_FLAG_OPEN_REPARSE_POINT` (a link is refused).
    pub fn open_object(&self, name: &str, access: Access) -> io::Result<Object> {
        Ok(Object(open_regular(&self.object_path(name), access.desired(), OPEN_EXISTING)?))
    }

    /// Opens an existing object read-write by a NUL-terminated name, building its path on the
    /// stack: no allocation, so the fault handler may call it.
    pub fn open_object_cstr(&self, name: &std::ffi::CStr) -> io::Result<Object> {
        let mut buf = [0u16; MAX_PATH_UNITS];
        let bytes = name.to_bytes();
        if self.prefix.len() + bytes.len() + 1 > MAX_PATH_UNITS {
            return Err(os_error(windows_sys::Win32::Foundation::ERROR_FILENAME_EXCED_RANGE));
        }
        buf[..self.prefix.len()].copy_from_slice(&self.prefix);
        for (i, &b) in bytes.iter().enumerate() {
            // Object names are ASCII (see `names.rs`).
            buf[self.prefix.len() + i] = wide::to_file_char(b as u16);
        }
        let len = self.prefix.len() + bytes.len();
        Ok(Object(open_regular(&buf[..=len], GENERIC_READ | GENERIC_WRITE, OPEN_EXISTING)?))
    }

    /// Opens the directory itself as an object, for attributes only (`CreateFileW` with
    /// `FILE_FLAG_BACKUP_SEMANTICS`): a stand-in for an object that is never read.
    pub fn open_self(&self) -> io::Result<Object> {
        let p = wide::path(&self.path);
        Ok(Object(create_file(&p, FILE_READ_ATTRIBUTES, OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS)?))
    }

    /// What `GetFileInformationByHandle` says about object `name`, opened for attributes only
    /// and without following a link.
    pub fn stat_object(&self, name: &str) -> io::Result<ObjectStat> {
        let h = create_file(
            &self.object_path(name),
            FILE_READ_ATTRIBUTES,
            OPEN_EXISTING,
            FILE_FLAG_OPEN_REPARSE_POINT | FILE_FLAG_BACKUP_SEMANTICS,
        )?;
        stat_handle(&h)
    }

    /// Removes an object's name, `DeleteFileW`. Processes that map it keep their mapping; the
    /// file goes when its last handle closes.
    pub fn unlink_object(&self, name: &str) -> io::Result<()> {
        // SAFETY: the path is NUL-terminated UTF-16.
        if unsafe { DeleteFileW(self.object_path(name).as_ptr()) } == 0 {
            return Err(last_error());
        }
        Ok(())
    }
}

/// Lists the object names in a directory (`FindFirstFileW` through `std::fs::read_dir`), with
/// the stored `~` read back as `:`.
pub fn list_dir(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path)? {
        if let Ok(name) = entry?.file_name().into_string() {
            names.push(wide::object_name(&name));
        }
    }
    Ok(names)
}

/// Which file a handle refers to (volume serial number, file index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectId {
    volume: u32,
    index: u64,
}

fn stat_handle(h: &OwnedHandle) -> io::Result<ObjectStat> {
    let info = file_info(h)?;
    // SAFETY: all-zero bytes are a valid FILE_STANDARD_INFO.
    let mut std_info: FILE_STANDARD_INFO = unsafe { std::mem::zeroed() };
    // SAFETY: `std_info` is a valid, writable buffer of the size passed.
    let ok = unsafe {
        GetFileInformationByHandleEx(
            h.as_raw_handle(),
            FileStandardInfo,
            (&mut std_info as *mut FILE_STANDARD_INFO).cast(),
            size_of::<FILE_STANDARD_INFO>() as u32,
        )
    };
    let size = ((info.nFileSizeHigh as u64) << 32) | info.nFileSizeLow as u64;
    let allocated = if ok != 0 { std_info.AllocationSize.max(0) as u64 } else { size };
    let attrs = info.dwFileAttributes;
    Ok(ObjectStat {
        size,
        allocated,
        uid: 0,
        is_regular: attrs & (FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT) == 0,
        identity: ObjectId {
            volume: info.dwVolumeSerialNumber,
            index: ((info.nFileIndexHigh as u64) << 32) | info.nFileIndexLow as u64,
        },
    })
}

/// An `OVERLAPPED` that only carries a file offset (synchronous handles use it as the
/// position of one read or write, or the start of a lock range).
pub(super) fn at_offset(offset: u64) -> OVERLAPPED {
    // SAFETY: all-zero bytes are a valid OVERLAPPED.
    let mut ov: OVERLAPPED = unsafe { std::mem::zeroed() };
    ov.Anonymous.Anonymous.Offset = offset as u32;
    ov.Anonymous.Anonymous.OffsetHigh = (offset >> 32) as u32;
    ov
}

impl Object {
    /// The page size this object is sized and committed in: the system page.
    pub fn page_size(&self) -> io::Result<usize> {
        Ok(super::map::page_size())
    }

    /// Another handle to the same open file (`DuplicateHandle`): it shares the file's byte
    /// locks, as a duplicated descriptor shares an open file description's.
    pub fn try_clone(&self) -> io::Result<Object> {
        Ok(Object(self.0.try_clone()?))
    }

    /// `GetFileInformationByHandle`. No allocation (the fault handler calls it).
    pub fn stat(&self) -> io::Result<ObjectStat> {
        stat_handle(&self.0)
    }

    /// Windows keeps access in ACLs, not mode bits: accepted and ignored.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        let _ = mode;
        Ok(())
    }

    /// Sets the object's size, `SetFileInformationByHandle(FileEndOfFileInfo)`.
    pub fn set_size(&self, len: u64) -> io::Result<()> {
        let info = FILE_END_OF_FILE_INFO { EndOfFile: len as i64 };
        // SAFETY: `info` is a valid FILE_END_OF_FILE_INFO of the size passed.
        let ok = unsafe {
            SetFileInformationByHandle(
                self.0.as_raw_handle(),
                FileEndOfFileInfo,
                (&info as *const FILE_END_OF_FILE_INFO).cast(),
                size_of::<FILE_END_OF_FILE_INFO>() as u32,
            )
        };
        if ok == 0 { Err(last_error()) } else { Ok(()) }
    }

    /// Guarantees backing for `[offset, offset + len)`: grows the file to cover it (a file
    /// that is not sparse is allocated on the volume when it grows, so a full volume fails
    /// here, `ERROR_DISK_FULL`, as `ENOSPC` does on Linux, not at the first write).
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end =
            offset.checked_add(len).ok_or_else(|| os_error(windows_sys::Win32::Foundation::ERROR_INVALID_PARAMETER))?;
        if self.stat()?.size < end {
            self.set_size(end)?;
        }
        Ok(())
    }

    /// Frees the pages of `[offset, offset + len)` for every process: marks the file sparse
    /// (`FSCTL_SET_SPARSE`) and deallocates the range (`FSCTL_SET_ZERO_DATA`), which then
    /// reads as zeros. Where the file system refuses either (or ignores them, which is seen by
    /// the allocated size not dropping), it is `ErrorKind::Unsupported`: memory is then freed
    /// only with the whole section.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use windows_sys::Win32::System::IO::DeviceIoControl;
        use windows_sys::Win32::System::Ioctl::{FILE_ZERO_DATA_INFORMATION, FSCTL_SET_SPARSE, FSCTL_SET_ZERO_DATA};
        let unsupported = |why: &str| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "decommit is not supported on Windows here ({why}): a section's memory is freed with the whole section"
                ),
            )
        };
        let before = self.stat()?.allocated;
        let mut got = 0u32;
        // SAFETY: no input or output buffers; a synchronous handle.
        let ok = unsafe {
            DeviceIoControl(
                self.0.as_raw_handle(),
                FSCTL_SET_SPARSE,
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
                0,
                &mut got,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(unsupported(&format!("FSCTL_SET_SPARSE failed: {}", last_error())));
        }
        let end = offset.saturating_add(len);
        let info = FILE_ZERO_DATA_INFORMATION { FileOffset: offset as i64, BeyondFinalZero: end as i64 };
        // SAFETY: `info` is a valid input buffer of the size passed; no output buffer.
        let ok = unsafe {
            DeviceIoControl(
                self.0.as_raw_handle(),
                FSCTL_SET_ZERO_DATA,
                (&info as *const FILE_ZERO_DATA_INFORMATION).cast(),
                size_of::<FILE_ZERO_DATA_INFORMATION>() as u32,
                std::ptr::null_mut(),
                0,
                &mut got,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(unsupported(&format!("FSCTL_SET_ZERO_DATA failed: {}", last_error())));
        }
        if before > 0 && self.stat()?.allocated >= before && len >= 64 << 10 {
            return Err(unsupported("the file system kept the pages"));
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`, `ReadFile` with the offset in an
    /// `OVERLAPPED`, until the buffer is full or the file ends. Returns how many were read.
    pub fn read_at(&self, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(1 << 30) as u32;
            let mut ov = at_offset(offset);
            let mut got = 0u32;
            // SAFETY: the buffer range is valid and writable for `want` bytes; `ov` lives for
            // the (synchronous) call.
            let ok = unsafe { ReadFile(self.0.as_raw_handle(), buf[done..].as_mut_ptr(), want, &mut got, &mut ov) };
            if ok == 0 {
                let e = last_error();
                if e.raw_os_error() == Some(ERROR_HANDLE_EOF as i32) {
                    break;
                }
                return Err(e);
            }
            if got == 0 {
                break;
            }
            done += got as usize;
            offset += got as u64;
        }
        Ok(done)
    }
}
