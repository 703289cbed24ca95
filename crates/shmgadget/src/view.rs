//! Views: part of a section mapped a second time, anywhere in this process, read-only or
//! copy-on-write.
//!
//! A [`View`] maps `[offset, offset + len)` of a section's object at an address the kernel
//! picks, **outside every domain window** (the kernel never places a mapping inside our
//! `PROT_NONE` reservations), so the first-touch handler never takes a fault in a view for a
//! first touch of a section: it cannot "repair" a write to a read-only view by mapping
//! something there.
//!
//! * [`ViewKind::ReadOnly`]: shared, read-only. It sees every process's writes to the section.
//!   A write through it is a `SIGSEGV`: the handler recognises the address as a view, writes
//!   one line saying so on stderr, maps nothing, and passes the fault on to the previous
//!   handler (by default the process dies of `SIGSEGV`).
//! * [`ViewKind::CopyOnWrite`]: private. This process's writes go to private copies of the
//!   pages they touch; other processes and the object never see them. Pages not yet written
//!   keep showing the section's current contents.
//!
//! # The view table (for fault messages only)
//! `VIEWS` holds a pointer to each live view's [`ViewMeta`] so the fault handler can name the
//! view an address belongs to. The protocol is the domain table's (`fault.rs`): a handler
//! increments `ACTIVE` before reading the table and decrements it after; dropping a view clears
//! its entry, then waits for `ACTIVE` to reach zero before freeing the meta. Both sides SeqCst
//! (a store then a load of the other variable). When the table is full (256 live views) a
//! view still works; only its fault message is the generic one, and [`crate::query`] reports
//! its address as not ours.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::error::{Error, Result, bail};
pub use crate::os::ViewKind;
use crate::os::{self, FaultSignal};
use crate::section::Section;

/// Most views named in fault messages at once (more views work, unnamed).
const MAX_NAMED_VIEWS: usize = 256;

static VIEWS: [AtomicPtr<ViewMeta>; MAX_NAMED_VIEWS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_NAMED_VIEWS];
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// What the fault handler and [`crate::query`] know about a view.
pub(crate) struct ViewMeta {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) kind: ViewKind,
    pub(crate) offset: u64,
    pub(crate) section: String,
    pub(crate) domain: String,
}

/// A range of a section mapped read-only or copy-on-write at its own address in this process
/// (see the module docs). Unmapped on drop.
pub struct View {
    /// From `Box::into_raw`, freed in `drop` (after the table entry is cleared): the fault
    /// handler may read it through the table meanwhile.
    meta: NonNull<ViewMeta>,
    /// Index in `VIEWS`, if the view is named there.
    slot: Option<usize>,
    ptr: NonNull<u8>,
}

// SAFETY: the handle owns a mapping and plain values; nothing has thread affinity.
unsafe impl Send for View {}
// SAFETY: as above; every method takes `&self` and only reads immutable fields.
unsafe impl Sync for View {}

impl View {
    fn meta(&self) -> &ViewMeta {
        // SAFETY: `meta` is valid until `drop` frees it; only shared references are made.
        unsafe { self.meta.as_ref() }
    }
    /// First byte of the view in this process (not the section's address).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.meta().len
    }
    /// Never true: a view has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Offset in the section of its first byte.
    pub fn offset(&self) -> u64 {
        self.meta().offset
    }
    /// Read-only or copy-on-write.
    pub fn kind(&self) -> ViewKind {
        self.meta().kind
    }
    /// The view's bytes, for a read-only view or one this process does not write meanwhile.
    ///
    /// # Safety
    /// For a copy-on-write view, no write through [`View::as_ptr`] may happen while the slice
    /// lives. Other processes writing the section change a read-only view's bytes under the
    /// slice: read them as plain bytes only.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping covers `len` readable bytes for as long as `self` lives; the
        // caller takes the aliasing rules above.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.meta().len) }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // SeqCst: see the view-table protocol in the module docs.
            VIEWS[slot].store(std::ptr::null_mut(), Ordering::SeqCst);
            while ACTIVE.load(Ordering::SeqCst) != 0 {
                std::thread::yield_now();
            }
        }
        // SAFETY: the range is this view's own mapping, made by `map_view`; `as_slice`
        // borrows `self`, so no reference into it outlives the handle.
        let _ = unsafe { os::unmap(self.ptr.as_ptr() as usize, self.meta().len) };
        // SAFETY: from `Box::into_raw` in `Section::view`; no handler can read it any more
        // (the entry was cleared and ACTIVE drained above) and this is the only free.
        drop(unsafe { Box::from_raw(self.meta.as_ptr()) });
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("section", &self.meta().section)
            .field("offset", &self.meta().offset)
            .field("len", &self.meta().len)
            .field("kind", &self.meta().kind)
            .field("addr", &self.ptr)
            .finish()
    }
}

impl Section {
    /// Maps `[offset, offset + len)` of this section a second time, at an address of its own
    /// outside the domain's window: read-only (sees everyone's writes; writing through it
    /// crashes with a clear message) or copy-on-write (this process's writes stay private).
    /// `offset` must be a multiple of the page size and the range inside the section.
    pub fn view(&self, offset: u64, len: usize, kind: ViewKind) -> Result<View> {
        let page = os::page_size() as u64;
        let reserved = self.len() as u64;
        if offset % page != 0 {
            bail!(
                InvalidArgument,
                "view offset {offset} of section {:?} is not a multiple of the page size {page}; round it down",
                self.name()
            );
        }
        if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > reserved) {
            bail!(
                InvalidSize,
                "view {offset}+{len} of section {:?} lies outside the section ({reserved} bytes); \
                 expected 0 < len and offset + len <= {reserved}",
                self.name()
            );
        }
        // MAP_PRIVATE with PROT_WRITE needs only a read-only descriptor: writes never reach it.
        let (object, _, at) = self.reopen(os::Access::Read, "view")?;
        let ptr = os::map_view(&object, at + offset, len, kind)
            .map_err(|e| Error::from_io(format!("cannot map a view of section {:?}", self.name()), e))?;
        let meta = Box::new(ViewMeta {
            start: ptr.as_ptr() as usize,
            len,
            kind,
            offset,
            section: self.name().to_owned(),
            domain: self.domain().name().to_owned(),
        });
        let raw = Box::into_raw(meta);
        let slot = VIEWS.iter().position(|s| {
            // SeqCst: see the view-table protocol in the module docs.
            s.compare_exchange(std::ptr::null_mut(), raw, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        });
        // SAFETY: `Box::into_raw` never returns null.
        let meta = unsafe { NonNull::new_unchecked(raw) };
        Ok(View { meta, slot, ptr })
    }
}

/// Runs `f` on the live view containing `addr`, if one is named in the table.
/// Async-signal-safe (atomics only).
pub(crate) fn with_view<R>(addr: usize, f: impl FnOnce(&ViewMeta) -> R) -> Option<R> {
    // SeqCst: see the view-table protocol in the module docs.
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let mut out = None;
    for slot in &VIEWS {
        // SeqCst: as above.
        let p = slot.load(Ordering::SeqCst);
        if p.is_null() {
            continue;
        }
        // SAFETY: a meta stays allocated while its pointer is in the table and while ACTIVE
        // counts us (`View::drop` clears the entry, then waits for ACTIVE == 0).
        let m = unsafe { &*p };
        if addr >= m.start && addr - m.start < m.len {
            out = Some(f(m));
            break;
        }
    }
    // SeqCst: one story for the counter (see `fault.rs`).
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    out
}

/// From the fault hook, for an address outside every window: if it lies in a view, says on
/// stderr what the access did. Never repairs anything. Async-signal-safe.
pub(crate) fn report_fault(sig: FaultSignal, addr: usize) {
    with_view(addr, |m| {
        let mut line = crate::fault::Line::new();
        line.push(b"shmgadget: ");
        match (sig, m.kind) {
            (FaultSignal::Segv, ViewKind::ReadOnly) => line.push(b"write to a read-only view: "),
            (FaultSignal::Segv, ViewKind::CopyOnWrite) => line.push(b"fault in a copy-on-write view: "),
            (FaultSignal::Bus, _) => line.push(b"SIGBUS in a view (the section's object is shorter?): "),
        };
        line.hex(addr as u64).push(b" is offset ").dec(m.offset + (addr - m.start) as u64);
        line.push(b" of section \"").push(m.section.as_bytes()).push(b"\" of domain \"").push(m.domain.as_bytes());
        line.push(b"\" (view at ").hex(m.start as u64).push(b", ").dec(m.len as u64).push(b" bytes)");
        line.push(b"; nothing is mapped for it, the access crashes");
        os::write_stderr(line.finish());
    });
}
