//! Page protection of part of a section, for this process only.
//!
//! [`Section::protect`] changes how this process may access `[offset, offset + len)` of a
//! section: [`Protection::Read`] (a write faults), [`Protection::None`] (any access faults) or
//! [`Protection::ReadWrite`] (back to normal). Other processes are not affected: protection
//! belongs to a mapping, and each process has its own.
//!
//! The first-touch handler must not undo it: a fault on a section that is mapped is normally
//! retried and, if it repeats, healed by mapping the section again, which would restore
//! read-write access. So `protect` first marks the section in this process's `Mapping`
//! (`attachment::mapping`), and the handler passes every fault on a marked, mapped section to
//! the previous handler, after one line on stderr naming the section and offset (by default
//! the process then dies of `SIGSEGV`).
//!
//! The protection lasts as long as this process's mapping of the section: a section unmapped
//! and mapped again (deleted and recreated, `forget_mapping`) starts read-write.

use crate::error::{Error, Result, bail};
pub use crate::os::Protection;
use crate::section::Section;

impl Section {
    /// Changes this process's protection of `[offset, offset + len)` of the section (see
    /// [`Protection`]). `offset` must be a multiple of the section's
    /// [page size](Section::page_size) (a huge page on hugetlbfs); `len` is rounded up to
    /// whole pages of that size; the range must lie inside the section. Other processes are
    /// not affected.
    ///
    /// Memory made inaccessible must not be reached meanwhile through references this process
    /// holds (a heap's or queue's header, a `&T` from [`Section::at`]): protect only ranges
    /// that only raw pointers reach.
    pub fn protect(&self, offset: u64, len: u64, protection: Protection) -> Result<()> {
        let page = self.page_size();
        let reserved = self.len() as u64;
        if offset % page != 0 {
            bail!(
                InvalidArgument,
                "protect offset {offset} of section {:?} is not a multiple of the page size {page}{}; round it down",
                self.name(),
                if self.is_huge() { " (it is backed by huge pages)" } else { "" }
            );
        }
        let end = offset.checked_add(len).filter(|&e| len > 0 && e <= reserved).ok_or_else(|| {
            Error::new(
                crate::ErrorKind::InvalidSize,
                format!(
                    "protect range {offset}+{len} lies outside section {:?} ({reserved} bytes); expected 0 < len and \
                     offset + len <= {reserved}",
                    self.name()
                ),
            )
        })?;
        let len = end.next_multiple_of(page).min(reserved) - offset;
        let addr = self.as_ptr() as usize + offset as usize;
        let inner = &self.domain().inner;
        // SAFETY: the range lies inside this section's mapping (checked above), which stays
        // mapped while `self`, a handle, lives; the caller is told not to hold references
        // into a range it makes inaccessible.
        unsafe { inner.mapping.protect(self.record(), addr, len as usize, protection) }
            .map_err(|e| Error::from_io(format!("cannot change the protection of section {:?}", self.name()), e))
    }
}
