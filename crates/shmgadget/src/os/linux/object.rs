//! Directories and shared-memory objects: files in the shm directory (a tmpfs), reached
//! relative to a directory descriptor with `openat(2)` and friends.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags};

use crate::os::ObjectStat;

/// How an object is opened or mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (`O_RDONLY`, `PROT_READ`).
    Read,
    /// Read and write (`O_RDWR`, `PROT_READ | PROT_WRITE`).
    ReadWrite,
}

impl Access {
    fn open_flags(self) -> OFlags {
        match self {
            Access::Read => OFlags::RDONLY,
            Access::ReadWrite => OFlags::RDWR,
        }
    }
}

/// An open directory (the shm directory): objects are created, opened and removed relative to
/// it, so a rename of its path meanwhile cannot redirect us. Owns its descriptor.
#[derive(Debug)]
pub struct Dir(pub(super) OwnedFd);

/// An open shared-memory object (a file in the shm directory). Owns its descriptor; dropping
/// it closes the descriptor (`close(2)`), which a mapping of the object outlives.
#[derive(Debug)]
pub struct Object(pub(super) OwnedFd);

impl Dir {
    /// Opens a directory, `open(2)` with `O_RDONLY | O_DIRECTORY | O_CLOEXEC`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        Ok(Dir(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?))
    }

    /// Another handle to the same open directory, `fcntl(2)` `F_DUPFD_CLOEXEC`.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir(self.0.try_clone()?))
    }

    /// Creates a new object `name`, `openat(2)` with
    /// `O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC`, then applies `mode` with
    /// `fchmod(2)` so the process umask does not narrow it.
    pub fn create_object(&self, name: &str, mode: u32) -> io::Result<Object> {
        let fd = rustix::fs::openat(
            &self.0,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode & 0o777),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o777))?;
        Ok(Object(fd))
    }

    /// Opens an existing object, `openat(2)` with `O_NOFOLLOW | O_CLOEXEC` and `O_RDWR` or
    /// `O_RDONLY`.
    pub fn open_object(&self, name: &str, access: Access) -> io::Result<Object> {
        let flags = access.open_flags() | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(Object(rustix::fs::openat(&self.0, name, flags, Mode::empty())?))
    }

    /// Opens an existing object read-write by a NUL-terminated name, `openat(2)` with
    /// `O_RDWR | O_NOFOLLOW | O_CLOEXEC`. Async-signal-safe: one raw system call, no
    /// allocation.
    pub fn open_object_cstr(&self, name: &std::ffi::CStr) -> io::Result<Object> {
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(Object(rustix::fs::openat(&self.0, name, flags, Mode::empty())?))
    }

    /// Opens the directory itself as an object, read-only (`openat(2)` of `"."`): a stand-in
    /// for an object that is never read, such as the fuzz target's.
    pub fn open_self(&self) -> io::Result<Object> {
        Ok(Object(rustix::fs::openat(&self.0, ".", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?))
    }

    /// What `fstatat(2)` (with `AT_SYMLINK_NOFOLLOW`) says about object `name`, without
    /// opening it: works for an object this process may not read (its owner is still known).
    pub fn stat_object(&self, name: &str) -> io::Result<ObjectStat> {
        let st = rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(ObjectStat::from_raw(&st))
    }

    /// The size of the pages backing objects made in this directory: the huge page size on a
    /// hugetlbfs mount, else the system page size (`fstatfs(2)`, see [`Object::page_size`]).
    pub fn page_size(&self) -> io::Result<usize> {
        let st = rustix::fs::fstatfs(&self.0)?;
        Ok(fs_page_size(st.f_type as u64, st.f_bsize as u64))
    }

    /// Removes an object's name, `unlinkat(2)`. Processes that map it keep their mapping.
    pub fn unlink_object(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.0, name, AtFlags::empty())?)
    }
}

/// `statfs(2)`'s `f_type` of hugetlbfs (`linux/magic.h`).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

fn fs_page_size(f_type: u64, f_bsize: u64) -> usize {
    let base = super::map::page_size();
    if f_type == HUGETLBFS_MAGIC && f_bsize as usize > base && f_bsize.is_power_of_two() {
        f_bsize as usize
    } else {
        base
    }
}

/// Lists the names in a directory (`getdents64(2)` through `std::fs::read_dir`).
pub fn list_dir(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path)? {
        if let Ok(name) = entry?.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Which object a handle refers to (`st_dev`, `st_ino`): the same for every handle of one
/// object, different for an object created later under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectId {
    dev: u64,
    ino: u64,
}

impl Object {
    /// Another handle to the same open file description, `fcntl(2)` `F_DUPFD_CLOEXEC`.
    pub fn try_clone(&self) -> io::Result<Object> {
        Ok(Object(self.0.try_clone()?))
    }

    /// `fstat(2)`. Async-signal-safe (one system call).
    pub fn stat(&self) -> io::Result<ObjectStat> {
        Ok(ObjectStat::from_raw(&rustix::fs::fstat(&self.0)?))
    }
}

impl ObjectStat {
    fn from_raw(st: &rustix::fs::Stat) -> ObjectStat {
        let file_type = rustix::fs::FileType::from_raw_mode(st.st_mode);
        ObjectStat {
            size: st.st_size as u64,
            allocated: (st.st_blocks as u64).saturating_mul(512),
            uid: st.st_uid,
            is_regular: file_type == rustix::fs::FileType::RegularFile,
            identity: ObjectId { dev: st.st_dev, ino: st.st_ino },
        }
    }
}

impl Object {
    /// Sets the object's permission bits (`mode & 0o777`), `fchmod(2)`.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(&self.0, rustix::fs::Mode::from_raw_mode(mode & 0o777))?)
    }

    /// Sets the object's size, `ftruncate(2)`. Growing it makes a sparse hole that costs
    /// nothing. On hugetlbfs, which takes whole huge pages only, `len` is rounded up to the
    /// object's page size ([`Object::page_size`]).
    pub fn set_size(&self, len: u64) -> io::Result<()> {
        let page = self.page_size()? as u64;
        let len = if page > super::map::page_size() as u64 { len.next_multiple_of(page) } else { len };
        Ok(rustix::fs::ftruncate(&self.0, len)?)
    }

    /// The size of the pages backing the object: the huge page size when it lives on a
    /// hugetlbfs mount (`fstatfs(2)`: `f_type == HUGETLBFS_MAGIC`, then `f_bsize`), the system
    /// page size otherwise. Async-signal-safe (one system call).
    pub fn page_size(&self) -> io::Result<usize> {
        let st = rustix::fs::fstatfs(&self.0)?;
        Ok(fs_page_size(st.f_type as u64, st.f_bsize as u64))
    }

    /// Guarantees backing for `[offset, offset + len)`, `fallocate(2)` with mode 0. On a full
    /// tmpfs this fails with `ENOSPC` instead of a later `SIGBUS` on first write.
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(&self.0, FallocateFlags::empty(), offset, len)?)
    }

    /// Frees the pages of `[offset, offset + len)` for every process,
    /// `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(&self.0, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)?)
    }

    /// Reads up to `buf.len()` bytes at `offset` without changing the file position,
    /// `pread(2)`, retrying until the buffer is full or the object ends. Returns how many bytes
    /// were read. Unlike a mapping, the copy cannot fault when another process shrinks the
    /// object, and a hole reads as zeros without allocating backing.
    pub fn read_at(&self, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(self.0.as_fd(), &mut buf[done..], offset) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }
}
