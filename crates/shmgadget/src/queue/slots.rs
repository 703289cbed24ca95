//! The slot queue: many senders, many receivers, fixed-size `Copy` values in a bounded ring.
//!
//! # Protocol (after Dmitry Vyukov's bounded MPMC queue)
//! Each slot has a sequence word, a state word and the value. Slot `i` is free for position
//! `p` (with `p % capacity == i`) when `seq == p`, and holds the value of position `p` when
//! `seq == p + 1`. A sender claims position `p = send.pos` by CAS, writes the value, then
//! publishes `seq = p + 1` (CAS, Release); a receiver claims `p = recv.pos` when
//! `seq == p + 1`, reads the value, then gives the slot back for the next lap, `seq = p + cap`.
//!
//! # State words
//! | word | value | meaning | written by |
//! |---|---|---|---|
//! | slot `seq` | `p` | free for position `p` | initialiser; receiver of `p - cap` (give-back) |
//! | slot `seq` | `p + 1` | holds position `p` (a value, or a hole if `state == HOLE`) | sender of `p`; repairer |
//! | slot `state` | 0 / `HOLE` | value / skip me | sender (0) or repairer (`HOLE`) before `seq`; receiver resets to 0 |
//! | peer `token` | 0 / token | free / attached process | the peer (attach, detach); repairer (dead peer) |
//! | peer `inflight` | `IDLE` / `p` | nothing / about to claim or working on `p` | the peer; repairer (reset) |
//!
//! # Dead peers
//! A process killed between claiming a position and finishing it would block that slot for
//! ever. So each peer records the position it is about to claim (`inflight`) before its CAS,
//! and clears it when done. A waiter that stays stuck on a slot for two liveness checks in a row
//! looks for dead peers whose `inflight` is that position and repairs the slot: a sender's
//! slot becomes a hole (state 1, published) that receivers skip; a receiver's slot is given
//! back (its message died with it). Messages sent completely are never lost to a dead
//! sender. A dead peer may have recorded the position and died before its CAS, while a live
//! peer then claimed it: so no slot is repaired while a live peer records the same position
//! (it may be the claimer, however long it is descheduled).
//!
//! # Readers that die
//! A receive claims its position for good (the CAS on `recv.pos`), before it reads the value:
//! no other receiver, and no receiver taking over later, is ever handed that position again.
//! So a value returned by a receive is never delivered twice. The value a receiver had claimed
//! but not returned when it died (claimed and not yet read, or read and not yet returned) is
//! lost: its slot is given back as above, empty. At most one per death, since a receiver
//! takes one value at a time. (Redelivering it would mean sending it again at a new position,
//! which the repairer may have no room for; the byte queue, with one receiver, redelivers
//! instead.)
//!
//! # Exclusive peers (tunnel ends)
//! A process that must forward every value exactly once, across its own `kill -9`, cannot
//! use plain receives (a receive consumes at once) or plain sends (a sender killed mid-send
//! leaves a hole, and its successor cannot tell whether the value went in). It attaches as
//! the **exclusive** receiver (or sender) of its side instead: the side's `exclusive` word
//! names its peer entry (1 + index), and no other peer may attach on that side while the
//! exclusive one lives (each attacher, exclusive or not, stores its token or the exclusive
//! word, then a SeqCst fence, then reads the other: of two racing attachers one sees the other
//! and leaves, a Dekker pair).
//! - The exclusive receiver **reads ahead** without claiming ([`SlotReceiver::peek_timeout`]:
//!   a cursor past `recv.pos` that only reads published slots, skipping holes) and **commits**
//!   later ([`SlotReceiver::commit`]): each position up to the one committed is claimed and
//!   given back exactly as a plain receive does (intent, claim CAS, give-back), so a
//!   receiver killed mid-commit is repaired as any dead receiver. Values read ahead and not
//!   committed stay in the queue for a successor. Senders are held back by uncommitted
//!   values as by unreceived ones.
//! - A dead exclusive sender's unfinished send becomes a hole, as any dead sender's, but
//!   **says so**: the hole is made by whoever wins a CAS of the dead entry's intent from `p`
//!   to `p | HOLED` (a stuck receiver's `repair`, or the next exclusive sender when it attaches),
//!   and the entry keeps that marked intent (it is not freed, and `attach_peer` does not reuse
//!   an entry with an intent) until the next exclusive sender adopts it, intent included:
//!   [`SlotSender::adopted_hole`] then names the position, which the sender's first send (or
//!   [`SlotSender::forget_adopted_hole`]) forgets. So receivers and plain senders never wait
//!   for an importer that does not come back (they get past the hole, and `Disconnected` once
//!   the queue is empty), and a successor knows that position `p` holds no value of its
//!   predecessor's: a tunnel importer's record (last value written, `send.pos` after it) then
//!   tells exactly what was written.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use super::{
    DATA_OFFSET, IDLE, KIND_SLOTS, MAX_PEERS, QueueShared, WaitMode, attach_peer, header_of, new_header, queue_section,
    side_gone, wait_until, wake,
};
use crate::error::{Error, ErrorKind, Result};
use crate::sync::shim::{AtomicU64, Ordering, fence, retry_hint};

const HOLE: u64 = 1;
/// Marks a dead exclusive sender's intent (`inflight`) whose position was made a hole: kept in
/// its entry for the next exclusive sender ([`SlotSender::adopted_hole`]).
const HOLED: u64 = 1 << 63;
/// How many slots ahead a receiver prefetches.
const PREFETCH_AHEAD: u64 = 4;

/// A hint that the line at `p` will be read soon (no effect on correctness; never faults).
#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults, whatever the address, and changes no state
    // visible to the program; SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[repr(C)]
struct SlotShared {
    seq: AtomicU64,
    state: AtomicU64,
}

/// A bounded queue of `T` values between any number of sending and receiving processes.
pub struct SlotQueue<T> {
    hdr: NonNull<QueueShared>,
    slots: *mut u8,
    cap: u64,
    slot_size: u64,
    section: Option<crate::Section>,
    #[cfg(any(test, loom))]
    _mem: Option<(Box<QueueShared>, Vec<u128>)>,
    _t: PhantomData<T>,
}

// SAFETY: the header and slot heads are atomics; a value's bytes are written by the one sender
// that claimed its position and read by the one receiver that claimed it, ordered by the
// slot's sequence word (Release/Acquire). `T: Send` values move between threads.
unsafe impl<T: Send> Send for SlotQueue<T> {}
// SAFETY: as above; every method takes `&self` and claims positions atomically.
unsafe impl<T: Send> Sync for SlotQueue<T> {}

fn elem_code<T>() -> u64 {
    (size_of::<T>() as u64) | (align_of::<T>() as u64) << 48
}

impl<T: crate::ShmSafe + Copy + Send> SlotQueue<T> {
    /// Creates slot queue `name` holding up to `capacity` values (rounded up to a power of two).
    pub fn create(domain: &crate::Domain, name: &str, capacity: u64) -> Result<SlotQueue<T>> {
        Ok(SlotQueue::create_inner(domain, name, capacity, true)?.0)
    }

    /// Opens slot queue `name`, creating it if needed; returns whether this call created it.
    pub fn create_or_open(domain: &crate::Domain, name: &str, capacity: u64) -> Result<(SlotQueue<T>, bool)> {
        SlotQueue::create_inner(domain, name, capacity, false)
    }

    /// Opens existing slot queue `name`; its element type must have `T`'s size and alignment.
    pub fn open(domain: &crate::Domain, name: &str) -> Result<SlotQueue<T>> {
        let (section, _) = queue_section(domain, name, 0, None, |_| Ok(()))?;
        SlotQueue::attach(section)
    }

    fn slot_size() -> Result<u64> {
        if align_of::<T>() > 16 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "slot queue values must be aligned to at most 16 bytes",
            ));
        }
        Ok((size_of::<SlotShared>() as u64 + size_of::<T>() as u64).next_multiple_of(16))
    }

    fn create_inner(domain: &crate::Domain, name: &str, capacity: u64, exclusive: bool) -> Result<(Self, bool)> {
        if capacity == 0 || capacity > 1 << 32 {
            return Err(Error::new(
                ErrorKind::InvalidSize,
                format!("slot queue {name:?}: capacity {capacity} must be from 1 to 2^32 values"),
            ));
        }
        let cap = capacity.next_power_of_two().max(2);
        let slot = Self::slot_size()?;
        let init = |section: &crate::Section| {
            let h = new_header(section)?;
            // SAFETY: a fresh section of DATA_OFFSET + cap * slot bytes, ours until `init`
            // publishes it; slot heads are atomics.
            let heads = unsafe { section.as_ptr().add(DATA_OFFSET as usize) };
            for i in 0..cap {
                // SAFETY: slot `i`'s head lies inside the ring (i < cap), 16-aligned.
                let head = unsafe { &*heads.add((i * slot) as usize).cast::<SlotShared>() };
                // Relaxed: published by `init`'s Release.
                head.seq.store(i, Ordering::Relaxed);
                head.state.store(0, Ordering::Relaxed);
            }
            h.init(KIND_SLOTS, cap, slot, elem_code::<T>());
            Ok(())
        };
        let (section, created) = queue_section(domain, name, cap * slot, Some(exclusive), init)?;
        Ok((SlotQueue::attach(section)?, created))
    }

    /// The capacity and slot size `h` records, once validated as a slot queue of `T`.
    fn checked(h: &QueueShared, name: &str, ring_bytes: u64) -> Result<(u64, u64)> {
        let (kind, cap, slot, elem) = h.validate(name, ring_bytes)?;
        if kind != KIND_SLOTS {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("queue {name:?} is a byte queue, not a slot queue"),
            ));
        }
        if elem != elem_code::<T>() || slot != Self::slot_size()? {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "slot queue {name:?} holds values of {} bytes (alignment {}) in {slot}-byte slots, not {} ({} bytes)",
                    elem & 0xFFFF_FFFF_FFFF,
                    elem >> 48,
                    std::any::type_name::<T>(),
                    size_of::<T>()
                ),
            ));
        }
        Ok((cap, slot))
    }

    /// A queue over a header and slots someone else wrote (the fuzz targets): validated as
    /// [`open`](SlotQueue::open) validates a section. In-memory liveness: a token is alive
    /// when it is not 0.
    ///
    /// # Safety
    /// `hdr` must be valid for reads and writes (through atomics) and `slots` for `ring_bytes`
    /// bytes of reads and writes, 16-aligned, both for as long as the queue and its handles
    /// live, and touched by nothing else meanwhile but through this queue.
    pub(crate) unsafe fn from_raw(hdr: NonNull<QueueShared>, slots: *mut u8, ring_bytes: u64) -> Result<Self> {
        // SAFETY: valid for reads (the caller's contract); atomics only, any bytes are a value.
        let (cap, slot_size) = Self::checked(unsafe { hdr.as_ref() }, "(memory)", ring_bytes)?;
        Ok(SlotQueue {
            hdr,
            slots,
            cap,
            slot_size,
            section: None,
            #[cfg(any(test, loom))]
            _mem: None,
            _t: PhantomData,
        })
    }

    /// Writes a fresh header and slot heads for `cap` slots (a power of two) of
    /// [`slot_size`](Self::slot_size) bytes, as [`create`](SlotQueue::create) does (the fuzz
    /// targets' seeds).
    ///
    /// # Safety
    /// `slots` must be valid for writes of `cap` slots and 16-aligned, and nobody else may use
    /// the queue yet.
    pub(crate) unsafe fn init_raw(hdr: &QueueShared, slots: *mut u8, cap: u64) -> Result<()> {
        let slot = Self::slot_size()?;
        for i in 0..cap {
            // SAFETY: slot `i`'s head lies inside the ring (i < cap), 16-aligned (the caller's
            // contract); constructed in place.
            unsafe {
                slots
                    .add((i * slot) as usize)
                    .cast::<SlotShared>()
                    .write(SlotShared { seq: AtomicU64::new(i), state: AtomicU64::new(0) })
            };
        }
        hdr.init(KIND_SLOTS, cap, slot, elem_code::<T>());
        Ok(())
    }

    /// Bytes per slot for `T`.
    pub(crate) fn slot_bytes() -> Result<u64> {
        Self::slot_size()
    }

    fn attach(section: crate::Section) -> Result<Self> {
        let h = header_of(&section)?;
        let (cap, slot) = Self::checked(h, section.name(), section.len() as u64 - DATA_OFFSET)?;
        // SAFETY: the ring lies inside the section (checked by `validate`).
        let slots = unsafe { section.as_ptr().add(DATA_OFFSET as usize) };
        Ok(SlotQueue {
            hdr: NonNull::from(h),
            slots,
            cap,
            slot_size: slot,
            section: Some(section),
            #[cfg(any(test, loom))]
            _mem: None,
            _t: PhantomData,
        })
    }

    /// A queue in process memory (for model checking and property tests).
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn in_memory(capacity: u64) -> Self {
        let cap = capacity.next_power_of_two().max(2);
        let slot = Self::slot_size().expect("test element types are small");
        let hdr = Box::new(QueueShared::new());
        let mut mem = vec![0u128; (cap * slot / 16) as usize];
        let slots = mem.as_mut_ptr().cast::<u8>();
        for i in 0..cap {
            // SAFETY: slot `i`'s head lies inside `mem` (i < cap, slot >= its size), 16-aligned;
            // the heads are constructed in place (loom's atomics are not plain memory).
            unsafe {
                slots
                    .add((i * slot) as usize)
                    .cast::<SlotShared>()
                    .write(SlotShared { seq: AtomicU64::new(i), state: AtomicU64::new(0) })
            };
        }
        hdr.init(KIND_SLOTS, cap, slot, elem_code::<T>());
        SlotQueue {
            hdr: NonNull::from(&*hdr),
            slots,
            cap,
            slot_size: slot,
            section: None,
            _mem: Some((hdr, mem)),
            _t: PhantomData,
        }
    }

    /// The section holding it (None for an in-memory queue).
    pub fn section(&self) -> Option<&crate::Section> {
        self.section.as_ref()
    }

    /// Values it holds at most.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Its name (`"(memory)"` for an in-memory queue).
    pub fn name(&self) -> &str {
        self.section.as_ref().map_or("(memory)", |s| s.name())
    }

    /// The queue's words as they are now, for a test's report of a stall: positions, each
    /// side's exclusive word and peers (pid, alive, recorded intent), and the slots from the
    /// receive position to the send position (at most 8). Not a consistent snapshot.
    #[doc(hidden)]
    pub fn __debug_state(&self) -> String {
        use std::fmt::Write;
        let h = self.h();
        let (r, w) = (h.recv.pos.load(Ordering::Relaxed), h.send.pos.load(Ordering::Relaxed));
        let mut out = format!(
            "slot queue {:?}: capacity {}, recv.pos {r}, send.pos {w}, sent {}, received {}\n",
            self.name(),
            self.cap,
            h.send.count.load(Ordering::Relaxed),
            h.recv.count.load(Ordering::Relaxed)
        );
        for (name, table) in [("senders", &h.senders), ("receivers", &h.receivers)] {
            let _ = write!(out, "  {name}: exclusive {}", table.exclusive.load(Ordering::Relaxed));
            for (i, p) in table.peers.iter().enumerate() {
                let tok = p.token.load(Ordering::Relaxed);
                let pos = p.inflight.load(Ordering::Relaxed);
                if tok == 0 && pos == IDLE {
                    continue;
                }
                let pid = self.section.as_ref().map_or(0, |s| s.domain().peer_pid(tok));
                let intent = if pos == IDLE { "idle".to_owned() } else { pos.to_string() };
                let _ = write!(out, "; [{i}] pid {pid} alive {} intent {intent}", tok != 0 && self.alive(tok));
            }
            out.push('\n');
        }
        for pos in r..w.min(r + 8) {
            let head = self.head(pos);
            let _ = writeln!(
                out,
                "  slot of position {pos}: seq {} state {}",
                head.seq.load(Ordering::Relaxed),
                head.state.load(Ordering::Relaxed)
            );
        }
        out
    }

    fn token(&self) -> u64 {
        self.section.as_ref().map_or(1, |s| s.domain().peer_token())
    }

    /// Becomes one of the queue's senders (up to 64 live ones).
    pub fn sender(&self) -> Result<SlotSender<'_, T>> {
        self.sender_with(WaitMode::Blocking)
    }

    /// Like [`sender`](SlotQueue::sender), waiting in `mode` when the queue is full.
    pub fn sender_with(&self, mode: WaitMode) -> Result<SlotSender<'_, T>> {
        self.settle_dead(true);
        let idx = attach_peer(&self.h().senders, self.token(), MAX_PEERS, &|t| self.alive(t)).ok_or_else(|| {
            Error::new(ErrorKind::RegistryFull, format!("slot queue {:?} has {MAX_PEERS} live senders", self.name()))
        })?;
        self.not_excluded(true, idx)?;
        Ok(SlotSender { q: self, idx, mode, stuck: None, exclusive: false })
    }

    /// Becomes the queue's only sender (a tunnel's importer): fails with `AlreadyExists` while
    /// another sender lives, and no other sender can attach while this one lives. A dead
    /// exclusive sender's unfinished send is a hole this one can name
    /// ([`SlotSender::adopted_hole`]; see "Exclusive peers" in the module docs).
    pub fn exclusive_sender(&self) -> Result<SlotSender<'_, T>> {
        let idx = self.attach_exclusive(true)?;
        let h = self.h();
        let me = &h.senders.peers[idx];
        // An adopted intent not marked yet: the predecessor's send, unfinished (claimed, not
        // published) or not. Relaxed: our own entry (adopted with the token CAS, AcqRel).
        let p = me.inflight.load(Ordering::Relaxed);
        if p != IDLE && p & HOLED != 0 {
            // Marked by a holer that may not have finished (killed between the two): finish.
            self.make_hole(p & !HOLED);
        } else if p != IDLE {
            // Acquire: pairs with the claim CAS (Release) and the publishing CAS (AcqRel).
            let claimed = h.send.pos.load(Ordering::Acquire).wrapping_sub(p) as i64 > 0;
            if claimed && self.head(p).seq.load(Ordering::Acquire) == p {
                // Unfinished: a hole, as a stuck receiver would make it (whoever wins the CAS
                // makes it). AcqRel: as in `repair`.
                if me.inflight.compare_exchange(p, p | HOLED, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    self.make_hole(p);
                }
            } else {
                // Never claimed, or published before the kill: nothing to remember.
                me.inflight.store(IDLE, Ordering::Relaxed);
            }
        }
        Ok(SlotSender { q: self, idx, mode: WaitMode::Blocking, stuck: None, exclusive: true })
    }

    /// Becomes the queue's only receiver (a tunnel's exporter), which may read ahead and
    /// commit later ([`SlotReceiver::peek_timeout`], [`SlotReceiver::commit`]): fails with
    /// `AlreadyExists` while another receiver lives, and no other receiver can attach while
    /// this one lives.
    pub fn exclusive_receiver(&self) -> Result<SlotReceiver<'_, T>> {
        let idx = self.attach_exclusive(false)?;
        // Relaxed: we are the only receiver; the position moves only by us from now on.
        let ahead = self.h().recv.pos.load(Ordering::Relaxed);
        Ok(SlotReceiver { q: self, idx, mode: WaitMode::Blocking, stuck: None, exclusive: true, ahead })
    }

    fn side_name(senders: bool) -> &'static str {
        if senders { "sender" } else { "receiver" }
    }

    /// A plain peer just attached at `idx`: leaves again if the side has a live exclusive
    /// peer (see "Exclusive peers").
    fn not_excluded(&self, senders: bool, idx: usize) -> Result<()> {
        let h = self.h();
        let table = if senders { &h.senders } else { &h.receivers };
        // SeqCst: our token store (the attach CAS) before the read of the exclusive word; the
        // exclusive attacher does the converse (Dekker pair).
        fence(Ordering::SeqCst);
        let ex = table.exclusive.load(Ordering::SeqCst) as usize;
        if ex == 0 || ex > MAX_PEERS {
            return Ok(());
        }
        if ex - 1 == idx {
            // We took over the dead exclusive peer's entry: its exclusivity ended with it.
            // Relaxed: a single word; only exclusive attachers act on it.
            let _ = table.exclusive.compare_exchange(ex as u32, 0, Ordering::SeqCst, Ordering::Relaxed);
            return Ok(());
        }
        // Relaxed: liveness comes from the kernel.
        let tok = table.peers[ex - 1].token.load(Ordering::Relaxed);
        if tok != 0 && self.alive(tok) {
            // Release: as a leaving peer's (see the handles' `Drop`).
            table.peers[idx].token.store(0, Ordering::Release);
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "slot queue {:?} has an exclusive {} (pid {}, a tunnel end): no other may attach while it runs",
                    self.name(),
                    Self::side_name(senders),
                    tok as u32
                ),
            ));
        }
        Ok(())
    }

    /// Attaches as the side's exclusive peer; its entry index.
    fn attach_exclusive(&self, senders: bool) -> Result<usize> {
        if self.section.is_none() {
            return Err(Error::new(ErrorKind::InvalidArgument, "an in-memory slot queue has no exclusive peers"));
        }
        // Dead peers' claims first (a dead exclusive sender's unfinished send stays: `repair`
        // leaves it alone, and we adopt it below).
        self.settle_dead(senders);
        let h = self.h();
        let table = if senders { &h.senders } else { &h.receivers };
        let me = self.token();
        let busy = |tok: u64| {
            Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "slot queue {:?} has a live {} (pid {}): an exclusive {} must be the only one",
                    self.name(),
                    Self::side_name(senders),
                    tok as u32,
                    Self::side_name(senders)
                ),
            )
        };
        // SeqCst: ordered with the plain attachers' fence (Dekker pair, see `not_excluded`).
        let ex = table.exclusive.load(Ordering::SeqCst);
        let mut adopted = None;
        if ex != 0 && (ex as usize) <= MAX_PEERS {
            let e = ex as usize - 1;
            // Acquire: pairs with the Release of a leaving peer (its last publications).
            let tok = table.peers[e].token.load(Ordering::Acquire);
            if tok != 0 && self.alive(tok) {
                return Err(busy(tok));
            }
            // A dead exclusive sender: take over its entry, with its intent (an unfinished
            // send, made a hole that says so: `exclusive_sender`). A receiver's intents were
            // settled above. AcqRel: as in `attach_peer`.
            if senders
                && tok != 0
                && table.peers[e].token.compare_exchange(tok, me, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                adopted = Some((e, tok));
            }
        }
        let (idx, prev) = match adopted {
            Some(a) => a,
            None => {
                let idx = attach_peer(table, me, MAX_PEERS, &|t| self.alive(t)).ok_or_else(|| {
                    Error::new(
                        ErrorKind::RegistryFull,
                        format!("slot queue {:?} has {MAX_PEERS} live {}s", self.name(), Self::side_name(senders)),
                    )
                })?;
                // SeqCst: the exclusive attacher's half of the Dekker pair.
                if table.exclusive.compare_exchange(ex, idx as u32 + 1, Ordering::SeqCst, Ordering::Relaxed).is_err() {
                    // Release: as a leaving peer's.
                    table.peers[idx].token.store(0, Ordering::Release);
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "slot queue {:?}: another exclusive {} is attaching",
                            self.name(),
                            Self::side_name(senders)
                        ),
                    ));
                }
                (idx, 0)
            }
        };
        // SeqCst: the exclusive word (above) before the other peers' tokens (Dekker pair).
        fence(Ordering::SeqCst);
        for (i, p) in table.peers.iter().enumerate() {
            // Relaxed: ordered by the fence; liveness comes from the kernel.
            let tok = p.token.load(Ordering::Relaxed);
            if i != idx && tok != 0 && self.alive(tok) {
                if prev == 0 {
                    // Relaxed: our own claim of the word, undone.
                    let _ = table.exclusive.compare_exchange(idx as u32 + 1, 0, Ordering::SeqCst, Ordering::Relaxed);
                }
                // Back as it was: free, or the dead predecessor's (with its intent).
                // Release: as a leaving peer's.
                table.peers[idx].token.store(prev, Ordering::Release);
                return Err(busy(tok));
            }
        }
        Ok(idx)
    }

    /// Becomes one of the queue's receivers (up to 64 live ones).
    pub fn receiver(&self) -> Result<SlotReceiver<'_, T>> {
        self.receiver_with(WaitMode::Blocking)
    }

    /// Like [`receiver`](SlotQueue::receiver), waiting in `mode` when the queue is empty.
    pub fn receiver_with(&self, mode: WaitMode) -> Result<SlotReceiver<'_, T>> {
        self.settle_dead(false);
        let idx = attach_peer(&self.h().receivers, self.token(), MAX_PEERS, &|t| self.alive(t)).ok_or_else(|| {
            Error::new(ErrorKind::RegistryFull, format!("slot queue {:?} has {MAX_PEERS} live receivers", self.name()))
        })?;
        self.not_excluded(false, idx)?;
        Ok(SlotReceiver { q: self, idx, mode, stuck: None, exclusive: false, ahead: 0 })
    }

    /// Settles the claims of dead peers of one side before a new peer may take over their
    /// entries (which resets the recorded intent, the only trace of a dead peer's claim): a
    /// position it had claimed and left stuck is repaired now, as a stuck waiter would; an
    /// intent that never became a claim, or whose claim was finished, is forgotten. An intent
    /// that a live peer shares is left alone (`attach_peer` does not reuse its entry).
    fn settle_dead(&self, senders: bool) {
        if self.section.is_none() {
            return; // a queue in plain memory (tests, models): its peers are threads, none dies
        }
        let h = self.h();
        let (table, side) = if senders { (&h.senders, &h.send) } else { (&h.receivers, &h.recv) };
        for p in &table.peers {
            // Relaxed: tokens are single words; liveness comes from the kernel.
            let tok = p.token.load(Ordering::Relaxed);
            // Acquire: pairs with the Release that clears a finished claimer's intent (the
            // `inflight.store(IDLE, Release)` in `SlotSender::try_put` and
            // `SlotReceiver::try_take`), after which its slot has moved on.
            let pos = p.inflight.load(Ordering::Acquire);
            if tok == 0 || pos == IDLE || pos & HOLED != 0 || self.alive(tok) {
                // (A marked intent is settled: its hole is made, the mark is for the next
                // exclusive sender.)
                continue;
            }
            // Acquire: pairs with the claim CAS (Release) on the side's position in
            // `SlotSender::try_put` / `SlotReceiver::try_take`.
            let claimed = (side.pos.load(Ordering::Acquire).wrapping_sub(pos) as i64) > 0;
            let (stuck, fixed) =
                if senders { (pos, pos.wrapping_add(1)) } else { (pos.wrapping_add(1), pos.wrapping_add(self.cap)) };
            // Acquire: pairs with the AcqRel `seq` CAS that publishes the slot
            // (`SlotSender::try_put`) or gives it back (`SlotReceiver::try_take`), or a
            // repairer's in `repair`.
            if claimed && self.head(pos).seq.load(Ordering::Acquire) == stuck {
                // Repairs it unless a live peer may be the claimer; a damaged slot is reported
                // to whoever waits on it.
                let _ = self.repair(senders, pos, stuck, fixed);
            } else {
                // Never claimed by it, or finished: nothing to repair. Relaxed: the CAS only
                // clears this dead entry's own word.
                let _ = p.inflight.compare_exchange(pos, IDLE, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    fn h(&self) -> &QueueShared {
        // SAFETY: the header is at the start of the section this handle keeps mapped.
        unsafe { self.hdr.as_ref() }
    }

    fn head(&self, pos: u64) -> &SlotShared {
        // SAFETY: slot `pos % cap` lies inside the ring; heads are atomics.
        unsafe { &*self.slots.add(((pos & (self.cap - 1)) * self.slot_size) as usize).cast::<SlotShared>() }
    }

    fn value_ptr(&self, pos: u64) -> *mut T {
        // SAFETY: the value follows the head inside the slot (slot_size covers both), aligned
        // to 16 (slots are 16-aligned multiples of 16 and the head is 16 bytes).
        unsafe { self.slots.add(((pos & (self.cap - 1)) * self.slot_size) as usize + size_of::<SlotShared>()).cast() }
    }

    fn alive(&self, token: u64) -> bool {
        match &self.section {
            Some(s) => s.domain().peer_alive(token),
            None => token != 0,
        }
    }

    /// Repairs the slot at `pos` if a dead peer of `table` had claimed it and left it at
    /// `stuck_seq`, moving it to `fixed_seq` (with `hole` state for a sender's slot); `true`
    /// if it did. A slot stuck at `stuck_seq` with no peer at all working on it (a live one
    /// keeps `inflight == pos` until it has moved the slot on) is damage: `Corrupt`, rather
    /// than a wait for ever.
    fn repair(&self, senders: bool, pos: u64, stuck_seq: u64, fixed_seq: u64) -> Result<bool> {
        let h = self.h();
        let (table, side) = if senders { (&h.senders, &h.send) } else { (&h.receivers, &h.recv) };
        // A dead peer's intent alone does not prove it made the claim: it may have died just
        // before its CAS, and a live peer then claimed the same position (and may be
        // descheduled before finishing). Every claimer records its intent before its CAS, so a
        // live peer with this intent may be the claimer: leave the slot alone while one exists.
        // Acquire: pairs with the claimers' Release CAS on the position (in
        // `SlotSender::try_put` / `SlotReceiver::try_take`), after which their intent stores
        // are visible.
        let _ = side.pos.load(Ordering::Acquire);
        let live_intent = table.peers.iter().any(|p| {
            // Relaxed: ordered by the Acquire load above.
            let tok = p.token.load(Ordering::Relaxed);
            tok != 0 && p.inflight.load(Ordering::Relaxed) == pos && self.alive(tok)
        });
        if live_intent {
            return Ok(false);
        }
        let mut busy = false;
        // Relaxed: written once per exclusive attach; a stale value only delays a repair.
        let exclusive = table.exclusive.load(Ordering::Relaxed) as usize;
        for (i, p) in table.peers.iter().enumerate() {
            // Relaxed: tokens and intents are single words; liveness comes from the kernel.
            let tok = p.token.load(Ordering::Relaxed);
            // Acquire: as in `settle_dead` (pairs with the Release clearing a finished intent).
            let intent = p.inflight.load(Ordering::Acquire);
            if senders && tok != 0 && intent == pos | HOLED {
                // A dead exclusive sender's position, marked by a holer that did not finish
                // (killed between the mark and the hole): finish it.
                return Ok(self.make_hole(pos));
            }
            if tok == 0 || intent != pos {
                continue;
            }
            if self.alive(tok) {
                busy = true;
                continue;
            }
            if senders && exclusive == i + 1 {
                // A dead exclusive sender: a hole that says so (see "Exclusive peers"). The
                // entry keeps its token and the marked intent for the next exclusive sender.
                // AcqRel: the one decision between holers (and the next exclusive sender).
                if p.inflight.compare_exchange(pos, pos | HOLED, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                    busy = true;
                    continue;
                }
                return Ok(self.make_hole(pos));
            }
            let head = self.head(pos);
            if senders {
                head.state.store(HOLE, Ordering::Relaxed);
            }
            // AcqRel: publishes the hole (or the given-back slot) like a normal completion:
            // pairs with the Acquire loads of `seq` in `try_take` (a hole) or `try_put` (a
            // slot given back), and Acquires a racing finisher's CAS if it lost to one.
            let ok = head.seq.compare_exchange(stuck_seq, fixed_seq, Ordering::AcqRel, Ordering::Relaxed).is_ok();
            p.inflight.store(IDLE, Ordering::Relaxed);
            // The dead peer's entry is free again. AcqRel: as the CAS in `attach_peer` it
            // races with (pairs with its Acquire of a free entry).
            let _ = p.token.compare_exchange(tok, 0, Ordering::AcqRel, Ordering::Relaxed);
            return Ok(ok);
        }
        // Acquire: a peer that finished `pos` moved the slot on (the AcqRel `seq` CAS in
        // `try_put` / `try_take`) before it cleared its intent (Release), which the Acquire
        // loads above saw; so a slot still at `stuck_seq` now,
        // with no peer on it, is one nobody will ever move.
        if !busy && self.head(pos).seq.load(Ordering::Acquire) == stuck_seq {
            return Err(self.corrupt(format!(
                "the slot of position {pos:#x} is stuck at sequence {stuck_seq:#x} and no {} is working on it",
                if senders { "sender" } else { "receiver" }
            )));
        }
        Ok(false)
    }

    /// Publishes the claimed, unpublished position `pos` as a hole; `true` if this call did.
    fn make_hole(&self, pos: u64) -> bool {
        let head = self.head(pos);
        // Acquire: the slot's word; a hole made already (or given back since) is left alone.
        if head.seq.load(Ordering::Acquire) != pos {
            return false;
        }
        head.state.store(HOLE, Ordering::Relaxed);
        // AcqRel: publishes the hole, as in `repair`.
        let ok = head.seq.compare_exchange(pos, pos.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if ok {
            let h = self.h();
            wake(&h.events.data_seq, &h.events.data_waiters, u32::MAX);
        }
        ok
    }

    /// A damaged queue, with what was found.
    #[cold]
    fn corrupt(&self, what: String) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("slot queue {:?} is damaged: {what}; delete it and create it again", self.name()),
        )
    }
}

/// A sending handle of a [`SlotQueue`].
pub struct SlotSender<'q, T: crate::ShmSafe + Copy + Send> {
    q: &'q SlotQueue<T>,
    idx: usize,
    mode: WaitMode,
    stuck: Option<u64>,
    exclusive: bool,
}

impl<T: crate::ShmSafe + Copy + Send> SlotSender<'_, T> {
    /// Sends `value`, waiting while the queue is full; `Disconnected` when every receiver is
    /// gone.
    pub fn send(&mut self, value: T) -> Result<()> {
        self.send_inner(value, None)
    }

    /// Like [`send`](SlotSender::send), failing with `Timeout` after `timeout`.
    pub fn send_timeout(&mut self, value: T, timeout: Duration) -> Result<()> {
        self.send_inner(value, Some(timeout))
    }

    /// Sends `value` if there is room now; `WouldBlock` if not.
    pub fn try_send(&mut self, value: T) -> Result<()> {
        match self.try_put(value, true)? {
            true => Ok(()),
            false => Err(Error::new(ErrorKind::WouldBlock, format!("slot queue {:?} is full", self.q.name()))),
        }
    }

    /// Claims the next position and stops there, as a sender killed mid-send would: for crash
    /// tests only.
    #[doc(hidden)]
    pub fn __claim_and_stall(&mut self) -> u64 {
        let h = self.q.h();
        loop {
            // Relaxed/SeqCst: as in `try_put`.
            let pos = h.send.pos.load(Ordering::Relaxed);
            h.senders.peers[self.idx].inflight.store(pos, Ordering::SeqCst);
            if self.q.head(pos).seq.load(Ordering::Acquire) == pos
                && h.send.pos.compare_exchange(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed).is_ok()
            {
                return pos;
            }
        }
    }

    fn send_inner(&mut self, value: T, timeout: Option<Duration>) -> Result<()> {
        if self.try_put(value, false)? {
            return Ok(());
        }
        let q = self.q;
        let h = q.h();
        wait_until(&h.events.space_seq, &h.events.space_waiters, self.mode, timeout, |thorough| {
            Ok(self.try_put(value, thorough)?.then_some(()))
        })
    }

    /// Exclusive sender: positions sent into the queue so far (the send position). Nobody
    /// else sends, so this moves only when this sender sends. A dead predecessor's unfinished
    /// send is a hole here, counted as a position: [`adopted_hole`](SlotSender::adopted_hole)
    /// names it.
    pub fn sent_position(&self) -> u64 {
        // Relaxed: only this sender changes it.
        self.q.h().send.pos.load(Ordering::Relaxed)
    }

    /// Exclusive sender: the position of the dead predecessor's unfinished send, which was
    /// made a hole (by a receiver that could not wait for it, or when this sender attached),
    /// until this sender's first send or [`forget_adopted_hole`](SlotSender::forget_adopted_hole).
    /// A successor that records what it sent (a tunnel importer: the last value and the send
    /// position after it) knows from it that this position holds no value.
    pub fn adopted_hole(&self) -> Option<u64> {
        // Relaxed: our own entry's word (adopted with the token CAS, AcqRel).
        let p = self.q.h().senders.peers[self.idx].inflight.load(Ordering::Relaxed);
        (self.exclusive && p != IDLE && p & HOLED != 0).then_some(p & !HOLED)
    }

    /// Exclusive sender: forgets [`adopted_hole`](SlotSender::adopted_hole) (after recording
    /// it); the first send does too.
    pub fn forget_adopted_hole(&mut self) {
        if self.adopted_hole().is_some() {
            // Relaxed: our own entry's word; the hole itself is published (`make_hole`).
            self.q.h().senders.peers[self.idx].inflight.store(IDLE, Ordering::Relaxed);
        }
    }

    fn try_put(&mut self, value: T, thorough: bool) -> Result<bool> {
        let q = self.q;
        let h = q.h();
        let me = &h.senders.peers[self.idx];
        loop {
            // Relaxed: the slot's sequence word orders the data.
            let pos = h.send.pos.load(Ordering::Relaxed);
            let head = q.head(pos);
            // Acquire: pairs with the AcqRel CAS that gave the slot back in
            // `SlotReceiver::try_take` (or `repair`): that receiver finished reading it.
            let seq = head.seq.load(Ordering::Acquire);
            if seq == pos {
                // Record the intent before claiming (see "Dead peers"). Relaxed: the Release of
                // the claim below orders it, for a repairer that Acquires `send.pos`.
                me.inflight.store(pos, Ordering::Relaxed);
                // (Positions and sequence numbers use wrapping arithmetic: a damaged one near
                // u64::MAX must not overflow; a healthy one never gets there.)
                if h.send.pos.compare_exchange(pos, pos.wrapping_add(1), Ordering::Release, Ordering::Relaxed).is_err()
                {
                    // Not ours: drop the intent, or a repairer would take us for its claimer.
                    me.inflight.store(IDLE, Ordering::Relaxed);
                    retry_hint();
                    continue;
                }
                // SAFETY: we own position `pos` (CAS above) until we publish it; the value area
                // is inside the slot and aligned for T.
                unsafe { q.value_ptr(pos).write(value) };
                head.state.store(0, Ordering::Relaxed);
                // Release: publishes the value; pairs with the Acquire of `seq` in
                // `SlotReceiver::try_take`. A repairer may have made it a hole meanwhile (it
                // thought us dead): then this position is lost to us; use another.
                let published =
                    head.seq.compare_exchange(pos, pos.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed).is_ok();
                // Release: after the slot moved on; pairs with the Acquire loads of `inflight`
                // in `settle_dead` and `repair`.
                me.inflight.store(IDLE, Ordering::Release);
                if !published {
                    continue;
                }
                h.send.count.fetch_add(1, Ordering::Relaxed);
                wake(&h.events.data_seq, &h.events.data_waiters, 1);
                self.stuck = None;
                return Ok(true);
            }
            if (seq.wrapping_sub(pos) as i64) < 0 {
                // The slot still holds the previous lap: full, unless receivers are gone or one
                // died holding this slot.
                if thorough {
                    if side_gone(&h.receivers, true, &|t| q.alive(t)) {
                        return Err(Error::new(
                            ErrorKind::Disconnected,
                            format!("slot queue {:?}: every receiver is gone", q.name()),
                        ));
                    }
                    let lap = pos.wrapping_sub(q.cap);
                    // Acquire: pairs with the receivers' Release claims (the `recv.pos` CAS in
                    // `SlotReceiver::try_take`), so a dead receiver's intent (written before its
                    // claim) is visible to `repair`.
                    let read = h.recv.pos.load(Ordering::Acquire);
                    // Healthy, with `pos` as loaded (perhaps stale): position `lap` was claimed,
                    // so the slot is at `lap` (its sender at work) or `lap + 1` (its value,
                    // perhaps being received); and no sender claims more than a lap ahead of
                    // the receivers. Anything else would make us wait for ever.
                    // (On the first lap, `pos < cap`, there is no earlier lap: the slot is at `pos`.)
                    if (seq != lap && seq != lap.wrapping_add(1))
                        || pos < q.cap
                        || pos.wrapping_sub(read) as i64 > q.cap as i64
                    {
                        return Err(q.corrupt(format!(
                            "the slot of send position {pos:#x} has sequence {seq:#x} (expected {lap:#x} or {:#x}) with the receivers at {read:#x}",
                            lap.wrapping_add(1)
                        )));
                    }
                    if seq == lap.wrapping_add(1) && (read.wrapping_sub(lap) as i64) > 0 {
                        if self.stuck == Some(lap) && q.repair(false, lap, seq, pos)? {
                            continue;
                        }
                        self.stuck = Some(lap);
                    }
                }
                return Ok(false);
            }
            // Another sender moved on: retry with the new position. A slot is ahead of `pos`
            // only once position `pos` was claimed, which happens before our Acquire of its
            // sequence: so `send.pos` has moved on unless the words are damaged (then we would
            // spin here for ever).
            if h.send.pos.load(Ordering::Relaxed) == pos {
                return Err(q.corrupt(format!("the slot of send position {pos:#x} is ahead of it, at {seq:#x}")));
            }
            retry_hint();
        }
    }
}

impl<T: crate::ShmSafe + Copy + Send> Drop for SlotSender<'_, T> {
    fn drop(&mut self) {
        let h = self.q.h();
        if self.exclusive {
            // SeqCst: as the word's other stores (see "Exclusive peers").
            let _ = h.senders.exclusive.compare_exchange(self.idx as u32 + 1, 0, Ordering::SeqCst, Ordering::Relaxed);
        }
        // Release: after our last message; pairs with the Acquire in `side_gone` (a receiver
        // that sees every sender gone sees their last publications) and the AcqRel CAS in
        // `attach_peer`.
        h.senders.peers[self.idx].token.store(0, Ordering::Release);
        wake(&h.events.data_seq, &h.events.data_waiters, u32::MAX);
    }
}

/// A receiving handle of a [`SlotQueue`].
pub struct SlotReceiver<'q, T: crate::ShmSafe + Copy + Send> {
    q: &'q SlotQueue<T>,
    idx: usize,
    mode: WaitMode,
    stuck: Option<u64>,
    exclusive: bool,
    /// Exclusive receiver: the next position to read ahead.
    ahead: u64,
}

impl<T: crate::ShmSafe + Copy + Send> SlotReceiver<'_, T> {
    /// Claims the next published position and stops there, as a receiver killed mid-receive
    /// would: for crash tests only.
    #[doc(hidden)]
    pub fn __claim_and_stall(&mut self) -> u64 {
        let h = self.q.h();
        loop {
            // Relaxed/SeqCst: as in `try_take`.
            let pos = h.recv.pos.load(Ordering::Relaxed);
            h.receivers.peers[self.idx].inflight.store(pos, Ordering::SeqCst);
            if self.q.head(pos).seq.load(Ordering::Acquire) == pos.wrapping_add(1)
                && h.recv.pos.compare_exchange(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed).is_ok()
            {
                return pos;
            }
            std::hint::spin_loop();
        }
    }

    /// Receives a value, waiting while the queue is empty; `Disconnected` once it is empty and
    /// every sender is gone.
    ///
    /// A value returned is never delivered again, to any receiver. A receiver that dies inside
    /// this call, after claiming a value, loses that one value (see "Readers that die" in the
    /// module docs).
    pub fn recv(&mut self) -> Result<T> {
        self.recv_inner(None)
    }

    /// Like [`recv`](SlotReceiver::recv), failing with `Timeout` after `timeout`; the same
    /// guarantee when a receiver dies.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<T> {
        self.recv_inner(Some(timeout))
    }

    /// A value if there is one now; `WouldBlock` if not. The same guarantee as
    /// [`recv`](SlotReceiver::recv) when a receiver dies.
    pub fn try_recv(&mut self) -> Result<T> {
        match self.try_take(true)? {
            Some(v) => Ok(v),
            None => Err(Error::new(ErrorKind::WouldBlock, format!("slot queue {:?} is empty", self.q.name()))),
        }
    }

    /// Exclusive receiver: reads the next value ahead without consuming it, waiting up to
    /// `timeout`; returns its sequence number (its position + 1; the numbers of a dead
    /// sender's holes are skipped) and the value. `Timeout` if none came, `Disconnected` when
    /// nothing is left and every sender is gone. The value stays in the queue (and holds its
    /// slot) until [`commit`](SlotReceiver::commit).
    pub fn peek_timeout(&mut self, timeout: Duration) -> Result<(u64, T)> {
        self.need_exclusive()?;
        // Relaxed: only we move it.
        self.ahead = self.ahead.max(self.q.h().recv.pos.load(Ordering::Relaxed));
        if let Some(v) = self.peek_once(false)? {
            return Ok(v);
        }
        let q = self.q;
        let h = q.h();
        wait_until(&h.events.data_seq, &h.events.data_waiters, self.mode, Some(timeout), |thorough| {
            self.peek_once(thorough)
        })
    }

    fn peek_once(&mut self, thorough: bool) -> Result<Option<(u64, T)>> {
        let q = self.q;
        let h = q.h();
        loop {
            let c = self.ahead;
            let head = q.head(c);
            // Acquire: pairs with the publishing CAS in `try_put` (or `repair`'s hole).
            let seq = head.seq.load(Ordering::Acquire);
            if seq == c.wrapping_add(1) {
                // Relaxed: ordered by the Acquire of `seq`.
                let hole = head.state.load(Ordering::Relaxed) == HOLE;
                // SAFETY: position `c` is published and not received (we are the only
                // receiver and have not committed it), so no sender writes the slot until we
                // give it back. T is Copy and ShmSafe.
                let value = (!hole).then(|| unsafe { q.value_ptr(c).read() });
                self.ahead = c.wrapping_add(1);
                self.stuck = None;
                match value {
                    Some(v) => return Ok(Some((c.wrapping_add(1), v))),
                    None => continue,
                }
            }
            if thorough {
                // Acquire: pairs with the senders' claim CAS (see `try_take`).
                let written = h.send.pos.load(Ordering::Acquire);
                if seq == c && written.wrapping_sub(c) as i64 > 0 {
                    // Claimed, not published: a sender at work, or a dead one.
                    if self.stuck == Some(c) && q.repair(true, c, c, c.wrapping_add(1))? {
                        continue;
                    }
                    self.stuck = Some(c);
                } else if written == c && side_gone(&h.senders, true, &|t| q.alive(t)) {
                    // Acquire: a last message may have landed.
                    if head.seq.load(Ordering::Acquire) == c.wrapping_add(1) {
                        continue;
                    }
                    return Err(Error::new(
                        ErrorKind::Disconnected,
                        format!("slot queue {:?}: every sender is gone", q.name()),
                    ));
                }
            }
            return Ok(None);
        }
    }

    /// Exclusive receiver: consumes every value read ahead up to sequence number `seq`
    /// (as returned by [`peek_timeout`](SlotReceiver::peek_timeout)), giving their slots back
    /// to the senders.
    pub fn commit(&mut self, seq: u64) -> Result<()> {
        self.need_exclusive()?;
        let q = self.q;
        let h = q.h();
        let me = &h.receivers.peers[self.idx];
        if seq > self.ahead {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("slot queue {:?}: commit up to {seq}, but only {} were read ahead", q.name(), self.ahead),
            ));
        }
        let mut n = 0;
        loop {
            // Relaxed: only we move it.
            let pos = h.recv.pos.load(Ordering::Relaxed);
            if pos >= seq {
                break;
            }
            // As a plain receive (`try_take`): intent, claim, give-back.
            me.inflight.store(pos, Ordering::Relaxed);
            if h.recv.pos.compare_exchange(pos, pos.wrapping_add(1), Ordering::Release, Ordering::Relaxed).is_err() {
                me.inflight.store(IDLE, Ordering::Relaxed);
                return Err(q.corrupt(format!("the receive position moved under its exclusive receiver at {pos:#x}")));
            }
            let head = q.head(pos);
            // Relaxed: ordered by the Acquire of `seq` when it was read ahead.
            let hole = head.state.load(Ordering::Relaxed) == HOLE;
            head.state.store(0, Ordering::Relaxed);
            // AcqRel: gives the slot back, as in `try_take`.
            let _ = head.seq.compare_exchange(
                pos.wrapping_add(1),
                pos.wrapping_add(q.cap),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            // Release: as in `try_take`.
            me.inflight.store(IDLE, Ordering::Release);
            if !hole {
                h.recv.count.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        if n > 0 {
            wake(&h.events.space_seq, &h.events.space_waiters, u32::MAX);
        }
        Ok(())
    }

    /// Sequence number of the last value consumed (committed, or received), i.e. the
    /// receive position.
    pub fn consumed(&self) -> u64 {
        // Relaxed: a position.
        self.q.h().recv.pos.load(Ordering::Relaxed)
    }

    fn need_exclusive(&self) -> Result<()> {
        if self.exclusive {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "slot queue {:?}: reading ahead needs the exclusive receiver (`exclusive_receiver`)",
                self.q.name()
            ),
        ))
    }

    fn recv_inner(&mut self, timeout: Option<Duration>) -> Result<T> {
        if let Some(v) = self.try_take(false)? {
            return Ok(v);
        }
        let q = self.q;
        let h = q.h();
        wait_until(&h.events.data_seq, &h.events.data_waiters, self.mode, timeout, |thorough| self.try_take(thorough))
    }

    fn try_take(&mut self, thorough: bool) -> Result<Option<T>> {
        let q = self.q;
        let h = q.h();
        let me = &h.receivers.peers[self.idx];
        loop {
            // Relaxed: the slot's sequence word orders the data.
            let pos = h.recv.pos.load(Ordering::Relaxed);
            let head = q.head(pos);
            // Acquire: pairs with the AcqRel CAS that publishes the value in
            // `SlotSender::try_put` (or makes it a hole in `repair`).
            let seq = head.seq.load(Ordering::Acquire);
            let next = pos.wrapping_add(1);
            if seq == next {
                // Relaxed + Release claim: as in `SlotSender::try_put` (wrapping arithmetic too).
                me.inflight.store(pos, Ordering::Relaxed);
                if h.recv.pos.compare_exchange(pos, next, Ordering::Release, Ordering::Relaxed).is_err() {
                    // Not ours: drop the intent (see `SlotSender::try_put`).
                    me.inflight.store(IDLE, Ordering::Relaxed);
                    retry_hint();
                    continue;
                }
                // A long queue's slots are cold by the time we reach them: ask for a few ahead.
                prefetch(q.head(pos.wrapping_add(PREFETCH_AHEAD)) as *const SlotShared as *const u8);
                // Relaxed: ordered by the Acquire of `seq`.
                let hole = head.state.load(Ordering::Relaxed) == HOLE;
                // SAFETY: position `pos` is ours (CAS above) and published: the value was
                // written before the Release we Acquired. T is Copy and ShmSafe.
                let value = (!hole).then(|| unsafe { q.value_ptr(pos).read() });
                head.state.store(0, Ordering::Relaxed);
                // Release: we are done with the slot; the next lap's sender may write it. Pairs
                // with the Acquire of `seq` in `SlotSender::try_put`.
                let _ = head.seq.compare_exchange(next, pos.wrapping_add(q.cap), Ordering::AcqRel, Ordering::Relaxed);
                // Release: after the slot moved on; pairs with the Acquire loads of `inflight`
                // in `settle_dead` and `repair`.
                me.inflight.store(IDLE, Ordering::Release);
                wake(&h.events.space_seq, &h.events.space_waiters, 1);
                self.stuck = None;
                match value {
                    Some(v) => {
                        h.recv.count.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some(v));
                    }
                    None => continue, // a dead sender's hole: skip it
                }
            }
            if (seq.wrapping_sub(next) as i64) < 0 {
                // Nothing published at this position yet.
                if thorough {
                    // Acquire: pairs with the senders' Release claims (the `send.pos` CAS in
                    // `SlotSender::try_put`; see above).
                    let written = h.send.pos.load(Ordering::Acquire);
                    // Healthy, with `pos` as loaded (perhaps stale): the receiver of the last lap
                    // claimed its position, so the slot is at `pos - cap + 1` (not given back
                    // yet) or `pos` (free, or claimed by a sender); and the senders are not
                    // behind the receivers. Anything else would make us wait for ever.
                    let prev = pos.wrapping_sub(q.cap).wrapping_add(1);
                    // (On the first lap, `pos < cap`, there is no earlier lap: the slot is at `pos`.)
                    if (seq != pos && (seq != prev || pos < q.cap)) || (written.wrapping_sub(pos) as i64) < 0 {
                        return Err(q.corrupt(format!(
                            "the slot of receive position {pos:#x} has sequence {seq:#x} (expected {prev:#x} or {pos:#x}) with the senders at {written:#x}"
                        )));
                    }
                    if seq == pos && written != pos {
                        // Claimed but not published: a sender at work, or one that died.
                        if self.stuck == Some(pos) && q.repair(true, pos, pos, next)? {
                            continue;
                        }
                        self.stuck = Some(pos);
                    } else if side_gone(&h.senders, true, &|t| q.alive(t)) {
                        // Gone, and nothing left (re-checked: a last message may have landed).
                        // Acquire: pairs with the publishing CAS in `SlotSender::try_put`.
                        if head.seq.load(Ordering::Acquire) == next {
                            continue;
                        }
                        return Err(Error::new(
                            ErrorKind::Disconnected,
                            format!("slot queue {:?}: every sender is gone", q.name()),
                        ));
                    }
                }
                return Ok(None);
            }
            // Another receiver moved on: retry. As for senders (`try_put`), `recv.pos` has then
            // moved on too, unless the words are damaged.
            if h.recv.pos.load(Ordering::Relaxed) == pos {
                return Err(q.corrupt(format!("the slot of receive position {pos:#x} is ahead of it, at {seq:#x}")));
            }
            retry_hint();
        }
    }
}

impl<T: crate::ShmSafe + Copy + Send> Drop for SlotReceiver<'_, T> {
    fn drop(&mut self) {
        let h = self.q.h();
        if self.exclusive {
            // SeqCst: as the word's other stores (see "Exclusive peers").
            let _ = h.receivers.exclusive.compare_exchange(self.idx as u32 + 1, 0, Ordering::SeqCst, Ordering::Relaxed);
        }
        // Release: after our last receive; pairs with the Acquire in `side_gone` and the AcqRel
        // CAS in `attach_peer`.
        h.receivers.peers[self.idx].token.store(0, Ordering::Release);
        wake(&h.events.space_seq, &h.events.space_waiters, u32::MAX);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn damaged_sequence_numbers_are_reported_not_waited_for() {
        let q = SlotQueue::<u64>::in_memory(4);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        tx.send(7).unwrap();
        // The slot of the next send position made to look a lap ahead: a sender would retry
        // for ever ("another sender moved on").
        q.head(1).seq.store(1 + 8, Ordering::Relaxed);
        let err = tx.send_timeout(8, Duration::from_secs(60)).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        q.head(1).seq.store(1, Ordering::Relaxed);
        // A receive position past the send position: a receiver would wait for ever.
        assert_eq!(rx.recv().unwrap(), 7);
        q.h().recv.pos.store(3, Ordering::Relaxed);
        let err = rx.recv_timeout(Duration::from_secs(60)).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        // A sequence number no lap can have, at a full queue's next slot.
        q.h().recv.pos.store(1, Ordering::Relaxed);
        q.head(1).seq.store(u64::MAX - 2, Ordering::Relaxed);
        let err = tx.try_send(9).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let info = crate::queue::inspect_header(q.h(), "(memory)", 4 * 32, &|t| (t as u32, true));
        assert!(info.is_ok(), "positions are consistent again: {info:?}");
    }

    proptest! {
        #[test]
        fn the_slot_queue_behaves_like_a_bounded_vecdeque(
            ops in proptest::collection::vec(any::<Option<u32>>(), 1..400),
            cap in 1u64..20,
        ) {
            let q = SlotQueue::<u32>::in_memory(cap);
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Some(v) => match tx.try_send(v) {
                        Ok(()) => model.push_back(v),
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert_eq!(model.len() as u64, q.capacity(), "refused although not full");
                        }
                    },
                    None => match rx.try_recv() {
                        Ok(v) => prop_assert_eq!(Some(v), model.pop_front()),
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert!(model.is_empty());
                        }
                    },
                }
            }
            drop(tx);
            while let Some(want) = model.pop_front() {
                prop_assert_eq!(rx.try_recv().unwrap(), want);
            }
            prop_assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
        }
    }
}
