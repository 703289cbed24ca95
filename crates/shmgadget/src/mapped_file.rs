//! Data files mapped at the address they record: the base of file-backed sections.
//!
//! A [`MappedFile`] is a regular file the user names, mapped `MAP_SHARED` at a fixed address
//! that the file itself records, so raw pointers stored in it stay valid when it is opened
//! again later, by another process, after every process that used it is gone (no offset
//! pointers, unlike Boost's `managed_mapped_file` or PMDK). It is placed at that address or not
//! at all: if something occupies the range, opening fails and names what is there.
//!
//! # The file
//! ```text
//! [ header page | data: file length - one page ]
//! ```
//! The **header page** (ours, at the start of the file) records: magic `SHMGFILE`, layout
//! version, the page size, the base address, the capacity (bytes of address space the data
//! may grow to), the creation time and an FNV-1a checksum of those fields. "Page" here is the
//! platform's unit for mapping a file at a fixed address (`os::file_map_unit`): the page on
//! Linux (4 KiB), the allocation granularity on Windows (64 KiB, the only file offsets a view
//! may start at). The header format is the same on both; a file records its unit, and is
//! opened only where that is the unit (a Linux file's data, 4 KiB in, cannot be mapped on
//! Windows). Base, capacity and commits are multiples of it. A header in the file
//! rather than a sidecar: it travels with the file (copied, renamed, backed up, restored
//! together), there is no second name that can go missing or describe another file, and one
//! `msync`/`fsync` covers both. The cost is one page, and the data starting at file offset
//! one page (still page-aligned, so it maps directly). The header is written once, at
//! creation, and validated on every open (magic, version, page size, checksum, alignment,
//! address limits, and the file's length against the capacity): a damaged one is `Corrupt`.
//!
//! # In this process
//! The whole `[base, base + capacity)` is reserved first (`PROT_NONE`, never replacing an
//! existing mapping); the data, `[base, base + data length)`, is mapped shared over it. So an
//! access beyond the data is a `SIGSEGV` on the reservation, never a `SIGBUS` past the end of
//! the file. [`MappedFile::commit`] grows the data: it extends the file with `fallocate` first
//! (a full filesystem is a clean [`ErrorKind::OutOfSpace`], and the file and mapping stay as
//! they were), then maps the new pages.
//!
//! # One user at a time
//! An open `MappedFile` holds an exclusive open-file-description lock on the file's first byte
//! for as long as it lives; the kernel releases it when the handle is dropped or the process
//! dies. A second open, in any process, is refused while it is held (`WouldBlock`). The lock
//! is advisory: a program that writes or truncates the file without it is not stopped.
//!
//! # Durability
//! [`MappedFile::flush`] writes dirty pages back (`msync`): [`FlushMode::Sync`] returns once
//! they reached the file's storage.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result, bail};
pub use crate::os::FlushMode;
use crate::os::{self, ErrorExt};

const MAGIC: [u8; 8] = *b"SHMGFILE";
const VERSION: u32 = 1;
/// Bytes of the header that are meaningful (the rest of the page is zero).
pub(crate) const HEADER_LEN: usize = 48;

/// The fields of the header page (see the module docs), little-endian on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) page_size: u32,
    pub(crate) base: u64,
    pub(crate) capacity: u64,
    pub(crate) created_at: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.base.to_le_bytes());
        b[24..32].copy_from_slice(&self.capacity.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_at.to_le_bytes());
        let sum = fnv(&b[..40]);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `Err(what is wrong)`.
    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> std::result::Result<Header, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b[0..8] != MAGIC {
            return Err(format!("it does not start with the magic {:?} (found {:?})", "SHMGFILE", &b[0..8]));
        }
        if u32_at(8) != VERSION {
            return Err(format!("its layout version is {}, this build reads {VERSION}", u32_at(8)));
        }
        if u64_at(40) != fnv(&b[..40]) {
            return Err("its header checksum does not match its fields".to_owned());
        }
        let h = Header { page_size: u32_at(12), base: u64_at(16), capacity: u64_at(24), created_at: u64_at(32) };
        let page = os::file_map_unit() as u64;
        if h.page_size as u64 != page {
            return Err(format!("it was made with {} byte pages, this system has {page}", h.page_size));
        }
        if h.base == 0 || h.base % page != 0 || h.capacity == 0 || h.capacity % page != 0 {
            return Err(format!(
                "its base {:#x} or capacity {} is not a non-zero multiple of the page",
                h.base, h.capacity
            ));
        }
        if h.base.checked_add(h.capacity).is_none_or(|end| end > os::USER_ADDRESS_LIMIT) {
            return Err(format!("its range {:#x}+{} leaves the user address space", h.base, h.capacity));
        }
        Ok(h)
    }
}

/// Whether `b` is a sound header recording exactly `base` and `capacity` (what
/// [`Header::decode`] accepts, for those values). Async-signal-safe: no allocation (the fault
/// handler checks a file-backed section's file with it).
pub(crate) fn header_matches(b: &[u8; HEADER_LEN], base: u64, capacity: u64) -> bool {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    b[0..8] == MAGIC
        && u32_at(8) == VERSION
        && u64_at(40) == fnv(&b[..40])
        && u32_at(12) as usize == os::file_map_unit()
        && u64_at(16) == base
        && u64_at(24) == capacity
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A data file mapped at the address it records (see the module docs). Unmapped, and its
/// lock released, on drop; the file stays.
pub struct MappedFile {
    path: PathBuf,
    /// Kept open: it holds the file's lock.
    object: os::Object,
    base: usize,
    capacity: usize,
    /// Bytes of data mapped (the file's length minus the header page).
    data_len: usize,
}

// SAFETY: the handle owns a mapping and an open file; nothing has thread affinity.
unsafe impl Send for MappedFile {}

impl MappedFile {
    /// Creates `path` (which must not exist), records `address` and `capacity` in its header,
    /// and maps it there with `initial` bytes of data committed (rounded up to pages).
    /// `address` must be page-aligned and `[address, address + capacity)` free in this
    /// process.
    pub fn create(path: &Path, address: usize, capacity: u64, initial: u64) -> Result<MappedFile> {
        let page = os::file_map_unit() as u64;
        let capacity = capacity.checked_next_multiple_of(page).unwrap_or(u64::MAX);
        let h = Header {
            page_size: page as u32,
            base: address as u64,
            capacity,
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let encoded = h.encode();
        Header::decode(&encoded).map_err(|why| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("cannot create {} at {address:#x} with capacity {capacity}: {why}", path.display()),
            )
        })?;
        if initial > capacity {
            bail!(InvalidSize, "cannot commit {initial} bytes of {}: its capacity is {capacity}", path.display());
        }
        let object = os::open_file(path, os::OpenFile::CreateNew).map_err(|e| open_error(path, e, true))?;
        let made = (|| {
            lock(path, &object)?;
            let mut header_page = vec![0u8; page as usize];
            header_page[..HEADER_LEN].copy_from_slice(&encoded);
            object
                .write_at(0, &header_page)
                .map_err(|e| Error::from_io(format!("cannot write the header of {}", path.display()), e))?;
            let mut f = MappedFile::place(path.to_owned(), object, &h, 0)?;
            f.commit(initial)?;
            Ok(f)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Opens a file made by [`MappedFile::create`] and maps it at the address its header
    /// records, or fails: never elsewhere (its pointers would be wrong). Refused: a path that
    /// does not exist, is a directory or a symbolic link, a file of another user, one shorter
    /// than its header page, a damaged header, a file another handle has open (in any
    /// process), and a recorded range that something in this process occupies (named in the
    /// message).
    pub fn open(path: &Path) -> Result<MappedFile> {
        let (object, h, data) = open_checked(path, true)?;
        MappedFile::place(path.to_owned(), object, &h, data as usize)
    }

    /// Reserves the recorded range and maps `data_len` bytes of data over it.
    fn place(path: PathBuf, object: os::Object, h: &Header, data_len: usize) -> Result<MappedFile> {
        let (base, capacity) = (h.base as usize, h.capacity as usize);
        match os::reserve_fixed(base, capacity) {
            Ok(()) => {}
            Err(os::ReserveError::Occupied) => {
                let end = base + capacity;
                let mut shown: Vec<String> = open_files()
                    .iter()
                    .filter(|(b, c, _)| *b < end && b + c > base)
                    .map(|(b, c, p)| format!("mapped file {} ({b:#x}-{:#x})", p.display(), b + c))
                    .collect();
                shown.extend(
                    crate::domain::attached_domains_where(|a| {
                        let (b, len) = (a.window_base as usize, a.window_size as usize);
                        b < end && b + len > base
                    })
                    .iter()
                    .map(|d| {
                        let (b, len) = d.window();
                        format!("the window of domain {:?} ({b:#x}-{:#x})", d.name(), b + len)
                    }),
                );
                if shown.is_empty() {
                    shown = os::mappings_overlapping(base, capacity).into_iter().take(5).collect();
                }
                bail!(
                    WindowUnavailable,
                    "cannot map {} at its recorded address {base:#x}-{:#x}: the range is occupied in this process by {}; \
                     its pointers are only valid there, so it is never mapped elsewhere: free that range (another \
                     mapped file or domain window?) and open it again",
                    path.display(),
                    base + capacity,
                    if shown.is_empty() { "a mapping".to_owned() } else { shown.join(" | ") }
                );
            }
            Err(os::ReserveError::Os(e)) => {
                return Err(Error::from_io(format!("cannot reserve {base:#x}+{capacity} for {}", path.display()), e));
            }
        }
        open_files().push((base, capacity, path.clone()));
        // From here on, a failure's drop gives the reservation back.
        let mut f = MappedFile { path, object, base, capacity, data_len: 0 };
        if data_len > 0 {
            f.map_data(0, data_len)?;
            f.data_len = data_len;
        }
        Ok(f)
    }

    fn map_data(&self, from: usize, to: usize) -> Result<()> {
        let page = os::file_map_unit();
        // SAFETY: `[base + from, base + to)` lies inside our own reservation of
        // `[base, base + capacity)` (to <= capacity) and holds only the reservation there, so
        // no Rust reference points into it.
        unsafe { os::map_file_fixed(&self.object, self.base + from, to - from, (page + from) as u64) }
            .map_err(|e| Error::from_io(format!("cannot map {}", self.path.display()), e))
    }

    /// First byte of the data: the recorded address, in every process that opens the file.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
    /// Bytes of data mapped now (the file's length minus its header page).
    pub fn len(&self) -> usize {
        self.data_len
    }
    /// Whether no data is committed yet.
    pub fn is_empty(&self) -> bool {
        self.data_len == 0
    }
    /// Bytes of address space the data may grow to.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows the data to at least `len` bytes (rounded up to pages): extends the file with
    /// `fallocate`, then maps the new pages. A full filesystem is [`ErrorKind::OutOfSpace`],
    /// with the file and the mapping as they were.
    pub fn commit(&mut self, len: u64) -> Result<()> {
        let page = os::file_map_unit() as u64;
        if len > self.capacity as u64 {
            bail!(
                InvalidSize,
                "cannot commit {len} bytes of {}: its capacity is {}",
                self.path.display(),
                self.capacity
            );
        }
        let want = len.next_multiple_of(page) as usize;
        if want <= self.data_len {
            return Ok(());
        }
        let grow = (want - self.data_len) as u64;
        if let Err(e) = self.object.allocate(page + self.data_len as u64, grow) {
            // Back to the length we had (fallocate may have extended it before failing).
            let _ = self.object.set_size(page + self.data_len as u64);
            let kind = if e.is_no_space() { ErrorKind::OutOfSpace } else { ErrorKind::Os };
            return Err(Error::new(
                kind,
                format!(
                    "cannot grow {} from {} to {want} bytes of data: {e}{}",
                    self.path.display(),
                    self.data_len,
                    if e.is_no_space() { "; its filesystem is full: free space and commit again" } else { "" }
                ),
            ));
        }
        self.map_data(self.data_len, want)?;
        self.data_len = want;
        Ok(())
    }

    /// Writes the dirty pages of `[offset, offset + len)` of the data back to the file
    /// (`msync`): [`FlushMode::Sync`] returns once they reached its storage. The range is
    /// widened to whole pages and must lie inside the data.
    pub fn flush(&self, offset: u64, len: u64, mode: FlushMode) -> Result<()> {
        let page = os::page_size() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.data_len as u64) {
            bail!(
                InvalidSize,
                "flush range {offset}+{len} lies outside the {} bytes of data of {}",
                self.data_len,
                self.path.display()
            );
        }
        let start = offset - offset % page;
        let end = (offset + len).next_multiple_of(page).min(self.data_len as u64);
        if end <= start {
            return Ok(());
        }
        os::flush(self.base + start as usize, (end - start) as usize, mode)
            .map_err(|e| Error::from_io(format!("cannot flush {}", self.path.display()), e))
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the range is our own reservation and mapping; the data is reached through
        // raw pointers only, which the caller stops using with the handle.
        let _ = unsafe { os::unmap(self.base, self.capacity) };
        open_files().retain(|(b, _, _)| *b != self.base);
        // `object` closes after this: the lock goes with it.
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.data_len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The mapped file of this process whose reserved range holds `addr`, as
/// `(base, capacity, path)`, for [`crate::query`].
pub(crate) fn file_at(addr: usize) -> Option<(usize, usize, PathBuf)> {
    open_files().iter().find(|(b, c, _)| addr >= *b && addr - b < *c).cloned()
}

/// The mapped files open in this process, `(base, capacity, path)`: to name an occupant.
fn open_files() -> std::sync::MutexGuard<'static, Vec<(usize, usize, PathBuf)>> {
    static OPEN: std::sync::Mutex<Vec<(usize, usize, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock(path: &Path, object: &os::Object) -> Result<()> {
    match object.try_lock_byte(0) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            WouldBlock,
            "{} is mapped by another live handle or by a section of a live domain (in this or another \
             process, which holds its lock); close it or detach there first",
            path.display()
        ),
        Err(e) => Err(Error::from_io(format!("cannot lock {}", path.display()), e)),
    }
}

/// A shared lock, as every process mapping a file-backed section holds (see `file_section`).
fn share_lock(path: &Path, object: &os::Object) -> Result<()> {
    match object.try_share_lock_byte(0) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            WouldBlock,
            "{} is held exclusively by a MappedFile handle or by a domain placing it right now; close it there first",
            path.display()
        ),
        Err(e) => Err(Error::from_io(format!("cannot lock {}", path.display()), e)),
    }
}

fn open_error(path: &Path, e: std::io::Error, creating: bool) -> Error {
    let p = path.display();
    if e.is_not_found() {
        Error::new(ErrorKind::NotFound, format!("{p} does not exist (or a directory on its path does not)"))
    } else if e.is_exists() && creating {
        Error::new(ErrorKind::AlreadyExists, format!("{p} exists already; open it instead, or choose another path"))
    } else if e.is_symlink() {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{p} is a symbolic link, refused (it could be redirected to another file); name the file itself"),
        )
    } else if e.is_directory() {
        Error::new(ErrorKind::InvalidArgument, format!("{p} is a directory; a mapped file must be a regular file"))
    } else {
        Error::from_io(format!("cannot open {p}"), e)
    }
}

/// Opens an existing mapped file, takes its exclusive lock and validates it (everything
/// [`MappedFile::open`] refuses, except the placement): returns the open file, its header and
/// its bytes of data (length minus the header page). Shared with file-backed sections.
pub(crate) fn open_checked(path: &Path, exclusive: bool) -> Result<(os::Object, Header, u64)> {
    let object = os::open_file(path, os::OpenFile::Existing).map_err(|e| open_error(path, e, false))?;
    let st = object.stat().map_err(|e| Error::from_io(format!("cannot stat {}", path.display()), e))?;
    if !st.is_regular {
        bail!(InvalidArgument, "{} is not a regular file; a mapped file must be one", path.display());
    }
    if st.uid != os::effective_uid() {
        bail!(
            PermissionDenied,
            "{} belongs to uid {}, not to this process's uid {}; refusing to map another user's file \
         (its owner can open it, or chown it)",
            path.display(),
            st.uid,
            os::effective_uid()
        );
    }
    if exclusive {
        lock(path, &object)?;
    } else {
        share_lock(path, &object)?;
    }
    let page = os::file_map_unit() as u64;
    if st.size < page {
        bail!(
            Corrupt,
            "{} is {} bytes, shorter than its {page}-byte header page: not a shmgadget mapped file (or truncated)",
            path.display(),
            st.size
        );
    }
    let mut raw = [0u8; HEADER_LEN];
    object.read_at(0, &mut raw).map_err(|e| Error::from_io(format!("cannot read {}", path.display()), e))?;
    let h = Header::decode(&raw).map_err(|why| {
        Error::new(ErrorKind::Corrupt, format!("{} has a damaged or foreign header: {why}", path.display()))
    })?;
    let data = st.size - page;
    if data % page != 0 || data > h.capacity {
        bail!(
            Corrupt,
            "{} holds {data} bytes of data, but its header records a capacity of {} in whole pages; \
         it was truncated or extended by something else",
            path.display(),
            h.capacity
        );
    }
    Ok((object, h, data))
}

/// Creates `path` (which must not exist) read-write, mode 0600, and takes its exclusive lock.
pub(crate) fn create_locked(path: &Path) -> Result<os::Object> {
    let object = os::open_file(path, os::OpenFile::CreateNew).map_err(|e| open_error(path, e, true))?;
    lock(path, &object)?;
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_any_flipped_byte_is_refused() {
        let h =
            Header { page_size: os::file_map_unit() as u32, base: 0x3000_0000_0000, capacity: 1 << 20, created_at: 7 };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(Header::decode(&bad).is_err(), "byte {i} flipped");
        }
    }
}
