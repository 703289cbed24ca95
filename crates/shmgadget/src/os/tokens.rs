//! The table of liveness-token cells, the same on every platform: a lock-free static table of
//! slots, one per attachment ([`TokenCell`]), each holding the raw handle (a descriptor on
//! Linux, a `HANDLE` on Windows) whose byte lock is the attachment's token, the token's tag,
//! and the window it stands for, so that [`token_for_address`] finds the token of an address
//! without a lock or a system call.
//!
//! The table is static, not owned by the attachments, because Linux's fork handlers walk it
//! (`os/linux/liveness.rs`): a child must drop the tokens it inherited and adopt the ones made
//! for it (`pending_*`, [`TokenCell::set_pending`]). Windows has no fork and never sets them.
//! What differs per platform is how a handle is taken out of an `Object` and closed
//! (`raw_of` and `close_raw` of each platform's `liveness.rs`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::Object;
use super::platform::{close_raw, raw_of};

/// Token cells a process can hold at once (one per attached domain).
pub const MAX_TOKEN_CELLS: usize = 256;

/// The value of a handle field that holds no handle.
pub(super) const NO_HANDLE: usize = usize::MAX;

pub(super) struct TokenSlot {
    /// Whether a [`TokenCell`] owns this slot.
    pub(super) used: AtomicBool,
    /// Handle holding the current token's lock, [`NO_HANDLE`] when none.
    pub(super) handle: AtomicUsize,
    /// The current token's tag (the caller's name for it), 0 when none.
    pub(super) tag: AtomicU64,
    /// A token made for the child of a fork in progress (Linux): handle, tag, and the address
    /// of the entry's pid word (0 when none).
    pub(super) pending_handle: AtomicUsize,
    pub(super) pending_tag: AtomicU64,
    pub(super) pending_pid: AtomicUsize,
    /// The address range the owner says the token stands for (its domain's window), so a
    /// token can be found from an address without a lock ([`token_for_address`]); 0 when none.
    pub(super) window_base: AtomicUsize,
    pub(super) window_size: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const TOKEN_SLOT: TokenSlot = TokenSlot {
    used: AtomicBool::new(false),
    handle: AtomicUsize::new(NO_HANDLE),
    tag: AtomicU64::new(0),
    pending_handle: AtomicUsize::new(NO_HANDLE),
    pending_tag: AtomicU64::new(0),
    pending_pid: AtomicUsize::new(0),
    window_base: AtomicUsize::new(0),
    window_size: AtomicUsize::new(0),
};

pub(super) static TOKENS: [TokenSlot; MAX_TOKEN_CELLS] = [TOKEN_SLOT; MAX_TOKEN_CELLS];
/// One more than the highest slot ever claimed: how far [`token_for_address`] looks.
static TOKENS_HIGH: AtomicUsize = AtomicUsize::new(0);

/// The current token of the cell whose window holds `addr`, 0 if none does (or it has no
/// token). Lock-free and cheap: a scan of the few cells in use, no system call; mutexes record
/// their holder with it on every lock.
#[inline]
pub fn token_for_address(addr: usize) -> u64 {
    // Relaxed: see `set_window`; the tag is the cell's current token (Acquire in `tag`).
    let high = TOKENS_HIGH.load(Ordering::Relaxed).min(MAX_TOKEN_CELLS);
    for t in &TOKENS[..high] {
        let size = t.window_size.load(Ordering::Relaxed);
        if size != 0 && addr.wrapping_sub(t.window_base.load(Ordering::Relaxed)) < size {
            return t.tag.load(Ordering::Acquire);
        }
    }
    0
}

/// One slot of the token table, owned by one attachment: its current token handle (and a
/// pending one during a fork). Dropping it closes both.
#[derive(Debug)]
pub struct TokenCell {
    index: usize,
}

impl TokenCell {
    /// Claims a free slot of the table.
    pub fn new() -> io::Result<TokenCell> {
        for (index, t) in TOKENS.iter().enumerate() {
            // Acquire: pairs with the Release store in `Drop`, after the slot was emptied.
            if t.used.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                // Relaxed: a bound for a scan that validates what it finds.
                TOKENS_HIGH.fetch_max(index + 1, Ordering::Relaxed);
                return Ok(TokenCell { index });
            }
        }
        Err(io::Error::other(format!("more than {MAX_TOKEN_CELLS} liveness tokens in one process")))
    }

    fn slot(&self) -> &'static TokenSlot {
        &TOKENS[self.index]
    }

    /// The current token's tag, 0 when there is none (never registered, or a forked child
    /// for which no token could be made before the fork).
    #[inline]
    pub fn tag(&self) -> u64 {
        // Acquire: pairs with the Release store in `install`.
        self.slot().tag.load(Ordering::Acquire)
    }

    /// Makes `token` (whose open file holds the token's lock) and `tag` the current token,
    /// closing the previous handle. Callers serialise `install`/`clear` per cell.
    pub fn install(&self, token: Object, tag: u64) {
        let t = self.slot();
        // AcqRel: we become the closer of the previous handle.
        close_raw(t.handle.swap(raw_of(token), Ordering::AcqRel));
        // Release: the handle above is in place before the tag says so.
        t.tag.store(tag, Ordering::Release);
    }

    /// Drops the current token (and a pending one): closes its handle, which releases the
    /// lock unless another handle of the same open file exists.
    pub fn clear(&self) {
        let t = self.slot();
        t.tag.store(0, Ordering::Release);
        // AcqRel: we become the closer.
        close_raw(t.handle.swap(NO_HANDLE, Ordering::AcqRel));
        close_raw(t.pending_handle.swap(NO_HANDLE, Ordering::AcqRel));
        t.pending_pid.store(0, Ordering::Relaxed);
    }

    /// Says which address range (a domain's window) this cell's token stands for.
    pub fn set_window(&self, base: usize, size: usize) {
        let t = self.slot();
        // Relaxed: a hint for `token_for_address`, which checks the range it reads; a torn
        // pair during attach or detach names a window no lock can be in at that moment.
        t.window_size.store(0, Ordering::Relaxed);
        t.window_base.store(base, Ordering::Relaxed);
        t.window_size.store(size, Ordering::Relaxed);
    }

    /// Records a token made for the child of the fork about to happen (from the prepare hook;
    /// Linux only: Windows has no fork, and nothing calls this there).
    ///
    /// # Safety
    /// `pid_word` must stay valid memory until the fork's parent or child handler has run
    /// (the child handler stores the child's pid into it).
    pub unsafe fn set_pending(&self, token: Object, tag: u64, pid_word: &AtomicU32) {
        let t = self.slot();
        t.pending_tag.store(tag, Ordering::Relaxed);
        t.pending_pid.store(pid_word as *const _ as usize, Ordering::Relaxed);
        // Release: pairs with the swaps in the fork handlers; publishes tag and pid word.
        close_raw(t.pending_handle.swap(raw_of(token), Ordering::AcqRel));
    }
}

impl Drop for TokenCell {
    fn drop(&mut self) {
        let t = self.slot();
        self.clear();
        t.window_size.store(0, Ordering::Relaxed);
        t.window_base.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire CAS in `new`.
        t.used.store(false, Ordering::Release);
    }
}
