//! File-backed sections: a section of a domain window whose memory is a regular file the user
//! names, mapped `MAP_SHARED` at the section's place in every attached process.
//!
//! # Objects
//! ```text
//! shm dir:   <section object>  = link: "SHMGLINK" | u32 LE path length | path bytes [| pad]
//! user file: [ header page (mapped_file::Header) | data: capacity bytes, sparse ]
//! ```
//! The section's object in the shm directory is a small **link** naming the file (absolute
//! path). A link's length is never a multiple of the page (padded by one byte if it would be),
//! while a plain section object always is: that is how every opener tells them apart with the
//! `fstat` it makes anyway. Whoever opens a section object and finds a link opens the file
//! instead (never following a symbolic link), checks its owner and header, and maps it from
//! file offset one page ([`data_offset`]); commit, decommit and views are offset the same way.
//! The fault handler's first-touch map follows links too, with the same checks and without
//! allocating ([`read_link_cstr`] into a stack buffer, `open`, `fstat`, the shared lock, the
//! header compared with `mapped_file::header_matches`, `mmap`): a pointer into a file-backed
//! section works in a process that never opened it. Paths longer than
//! [`SIGNAL_SAFE_PATH_MAX`], and threads whose signal stack is too small for it (a thread that
//! attached gets a 64 KiB one; Rust's default is 8 KiB), get a report naming the cause instead:
//! open the section first there.
//!
//! # The file
//! The header is [`crate::MappedFile`]'s: base address (the section's address in the window),
//! capacity (the section's reserved bytes), page size, checksum. The file's length is always
//! header page + capacity (sparse, like a section object): touching any page inside the
//! section never reads past the end of the file. [`crate::Section::commit`] allocates blocks
//! (`fallocate`), so a full filesystem is a clean `OutOfSpace`.
//!
//! # Placement
//! A new file is placed wherever the window has room, and records that address. An existing
//! file is placed at the address it records or not at all (`begin_create_at` in the registry):
//! outside the window, or over another section, is an error naming what is there.
//!
//! # Exclusivity
//! Every process that maps the file holds a **shared** open-file-description lock on its first
//! byte, through the descriptor it mapped (the mapping keeps that description, and so the
//! lock, alive until it is unmapped or the process dies). Placing a file in a domain first
//! takes the lock **exclusively**, then turns it shared: so a file that a live process of
//! another domain maps (or a [`crate::MappedFile`] handle holds) is refused. Within a domain,
//! the registry's chunk table keeps the section's range for it alone.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result, bail};
use crate::mapped_file::{self, HEADER_LEN, Header};
use crate::os;

const LINK_MAGIC: [u8; 8] = *b"SHMGLINK";

/// Bytes before a file-backed section's data in its file: the header page (one
/// `os::file_map_unit`: a page on Linux, 64 KiB on Windows).
pub(crate) fn data_offset() -> u64 {
    os::file_map_unit() as u64
}

/// Whether a section object with this `fstat` is a link (see the module docs).
/// Async-signal-safe (the fault handler calls it): arithmetic on the page size from auxv.
pub(crate) fn is_link(st: &os::ObjectStat) -> bool {
    let page = os::page_size() as u64;
    st.is_regular && st.size % page != 0 && st.size < page
}

/// Writes the link naming `path` into a new, empty section object.
pub(crate) fn write_link(object: &os::Object, path: &Path) -> std::io::Result<()> {
    let raw = path.as_os_str().as_encoded_bytes();
    let mut bytes = Vec::with_capacity(13 + raw.len());
    bytes.extend_from_slice(&LINK_MAGIC);
    bytes.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    bytes.extend_from_slice(raw);
    if bytes.len() % os::page_size() == 0 {
        bytes.push(0);
    }
    object.write_at(0, &bytes)
}

/// Longest file path the fault handler follows (longer ones: open the section first).
pub(crate) const SIGNAL_SAFE_PATH_MAX: usize = 1024;
/// A stack buffer for a link read in the fault handler: magic, length, path, NUL.
pub(crate) type LinkBuf = [u8; 12 + SIGNAL_SAFE_PATH_MAX + 1];

/// Reads link object `object` (whose `fstat` is `st`) into `buf` and returns the absolute path
/// it names, NUL-terminated in place. Async-signal-safe: `pread(2)` into the caller's stack
/// buffer, no allocation. `None`: not a well-formed link, or a path longer than
/// [`SIGNAL_SAFE_PATH_MAX`].
pub(crate) fn read_link_cstr<'a>(
    object: &os::Object,
    st: &os::ObjectStat,
    buf: &'a mut LinkBuf,
) -> Option<&'a std::ffi::CStr> {
    if !is_link(st) || st.size as usize > buf.len() - 1 {
        return None;
    }
    let n = object.read_at(0, &mut buf[..st.size as usize]).ok()?;
    if n < 12 || buf[..8] != LINK_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len == 0 || len > SIGNAL_SAFE_PATH_MAX || 12 + len > n || !os::is_absolute_path(&buf[12..12 + len]) {
        return None;
    }
    buf[12 + len] = 0;
    std::ffi::CStr::from_bytes_with_nul(&buf[12..=12 + len]).ok()
}

/// The path a link object names, if it is a well-formed link.
pub(crate) fn read_link(object: &os::Object, st: &os::ObjectStat) -> Option<PathBuf> {
    if !is_link(st) {
        return None;
    }
    let mut buf = vec![0u8; st.size as usize];
    let n = object.read_at(0, &mut buf).ok()?;
    let buf = &buf[..n];
    if buf.len() < 12 || buf[..8] != LINK_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().ok()?) as usize;
    let raw = buf.get(12..12 + len)?;
    // SAFETY: the bytes were written by `write_link` from `as_encoded_bytes` of a path (on
    // Unix any bytes are a valid OsStr).
    Some(PathBuf::from(unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(raw) }))
}

/// A section's file, opened, validated and share-locked, ready to map at data offset
/// [`data_offset`]. `stat` describes the data (size and allocated bytes without the header).
pub(crate) struct Backing {
    pub(crate) object: os::Object,
    pub(crate) stat: os::ObjectStat,
    pub(crate) path: PathBuf,
}

/// Follows the link in section object `link` (whose `fstat` is `st`) to its file. Errors name
/// the section.
pub(crate) fn resolve(section: &str, link: &os::Object, st: &os::ObjectStat) -> Result<Backing> {
    let Some(path) = read_link(link, st) else {
        bail!(
            Corrupt,
            "section {section:?}'s object is {} bytes, neither a whole section (a multiple of the page) nor a valid \
             link to its file: it was truncated or damaged; remove it with `shmgadget rm {section}`",
            st.size
        );
    };
    let (object, h, data) = mapped_file::open_checked(&path, false)
        .map_err(|e| Error::new(e.kind(), format!("cannot open section {section:?}'s file: {e}")))?;
    if data != h.capacity {
        bail!(
            Corrupt,
            "section {section:?}'s file {} holds {data} bytes of data, its header records {}: it was truncated or \
             extended by something else",
            path.display(),
            h.capacity
        );
    }
    let mut stat = object
        .stat()
        .map_err(|e| Error::from_io(format!("cannot stat section {section:?}'s file {}", path.display()), e))?;
    stat.size -= data_offset();
    stat.allocated = stat.allocated.saturating_sub(data_offset());
    Ok(Backing { object, stat, path })
}

/// A file about to become a section, opened and exclusively locked.
pub(crate) struct Prepared {
    pub(crate) object: os::Object,
    pub(crate) path: PathBuf,
    /// The header of an existing file (placed at its address); `None`: a new file.
    pub(crate) header: Option<Header>,
}

impl Prepared {
    /// Opens `path` if it exists (validating it) or creates it; the section's reserved size is
    /// the file's capacity, or `size` for a new file.
    pub(crate) fn open_or_create(path: &Path, section: &str) -> Result<Prepared> {
        let path = if path.is_absolute() {
            path.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::from_io("cannot resolve a relative file path: no current directory", e))?
                .join(path)
        };
        match path.symlink_metadata() {
            Ok(_) => {
                let (object, h, data) = mapped_file::open_checked(&path, true)
                    .map_err(|e| Error::new(e.kind(), format!("cannot use it for section {section:?}: {e}")))?;
                if data != h.capacity {
                    bail!(
                        Corrupt,
                        "{} holds {data} bytes of data, its header records a capacity of {}: it is a mapped file \
                         (MappedFile) or was truncated; a file-backed section's file always holds its whole capacity",
                        path.display(),
                        h.capacity
                    );
                }
                Ok(Prepared { object, path, header: Some(h) })
            }
            Err(_) => Ok(Prepared { object: mapped_file::create_locked(&path)?, path, header: None }),
        }
    }

    /// Records `base`/`capacity` in a new file's header and sizes it (sparse).
    pub(crate) fn write_new(&self, base: u64, capacity: u64) -> Result<()> {
        let page = os::file_map_unit();
        let h = Header {
            page_size: page as u32,
            base,
            capacity,
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let mut header_page = vec![0u8; page];
        header_page[..HEADER_LEN].copy_from_slice(&h.encode());
        let p = self.path.display();
        self.object
            .write_at(0, &header_page)
            .map_err(|e| Error::from_io(format!("cannot write the header of {p}"), e))?;
        self.object
            .set_size(page as u64 + capacity)
            .map_err(|e| Error::from_io(format!("cannot size {p} to {capacity} bytes of data"), e))
    }

    /// Turns the exclusive lock shared (see the module docs) and hands out the file.
    pub(crate) fn share(self) -> Result<os::Object> {
        match self.object.try_share_lock_byte(0) {
            Ok(true) => Ok(self.object),
            Ok(false) => bail!(WouldBlock, "{} is locked by someone else", self.path.display()),
            Err(e) => Err(Error::from_io(format!("cannot lock {}", self.path.display()), e)),
        }
    }
}

/// The window offset at which an existing file must be placed: its recorded address, which
/// must lie inside the window `[window_base, window_base + window_size)`, chunk-aligned.
pub(crate) fn recorded_offset(
    h: &Header,
    path: &Path,
    domain: &str,
    window_base: u64,
    window_size: u64,
) -> Result<u64> {
    let (b, c) = (h.base, h.capacity);
    let inside = b >= window_base && b - window_base + c <= window_size;
    if !inside || (b - window_base) % crate::CHUNK != 0 {
        return Err(Error::new(
            ErrorKind::WindowUnavailable,
            format!(
                "{} records address {b:#x}-{:#x}, {}; its pointers are only valid there, so it is never placed \
                 elsewhere: use a domain whose window covers it (create it with window base {:#x})",
                path.display(),
                b + c,
                if inside {
                    "which is not on a chunk boundary of domain's window".to_owned()
                } else {
                    format!("outside domain {domain:?}'s window {window_base:#x}-{:#x}", window_base + window_size)
                },
                b - b % (1 << 30)
            ),
        ));
    }
    Ok(b - window_base)
}
