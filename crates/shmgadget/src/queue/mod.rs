//! Message queues between processes: a byte queue (one sender, one receiver, variable-size
//! messages read in place) and a slot queue (many senders, many receivers, fixed-size values).
//!
//! Both are sections of kind `queue`, created and opened by name like any other section, with a
//! 4 KiB header followed by the ring:
//! ```text
//! line 0   constant: magic, layout version, fingerprint, ready, kind, capacity, element size
//! line 1   written by senders only:   write position (monotonic), messages sent
//! line 2   written by receivers only: read position (monotonic), messages received
//! line 3   eventcounts: data_seq/data_waiters (receivers sleep), space_seq/space_waiters
//! peers    who is attached on each side (domain peer tokens), and what each is in the middle of
//! after    written by the byte-queue receiver only, read only by a receiver taking over from
//!          it: consumed position (monotonic), messages consumed (unused by slot queues)
//! 4096     the ring
//! after    byte queues of 4 MiB or more: the hot lane, 2 MiB (`ring.rs`, "Two lanes")
//! ```
//! The creator commits the whole section, writes the header and publishes its `ready` word,
//! and only then marks the section ready in the registry; until then openers wait (or, if the
//! creator died, remove it and create it anew), and a failure removes it (`queue_section`).
//!
//! Each side writes its own cache line and reads the other's only when its cached copy says the
//! ring is empty (or full), so a busy queue moves one line per batch, not per message, and the
//! cost of a message does not depend on the ring's size. The consumed line is written per
//! message but read by nobody while its writer lives, so it never moves between cores.
//!
//! # Readers that die
//! - Byte queue: a message is consumed when the reader gives it back (drops its
//!   [`Message`]); a receiver that takes over after a crash starts right after the last
//!   consumed message, so it never sees a message returned by a read again, and it sees the
//!   one its predecessor held (received, not yet dropped) when it died. See `ring.rs`.
//! - Slot queue: a receive claims its position for good; a message is never delivered twice,
//!   but the one a receiver had claimed and not yet returned when it died is lost. See
//!   `slots.rs`.
//!
//! # Blocking without burning CPU (an eventcount)
//! A waiter first checks its condition in a spin for 20 µs (by the clock: a check costs from
//! a few nanoseconds to hundreds when its line bounces, so a count of checks is no measure of
//! time), then between `sched_yield`s up to 100 µs, so a running peer that answers late (an
//! interrupt, a page fault, a short preemption) costs no futex round trip. Then it counts
//! itself in `*_waiters`, reads `*_seq`, sets the `ARMED` bit of `*_waiters`, issues a SeqCst
//! fence, re-checks its condition, and sleeps on the shared futex `*_seq` only if the
//! condition still fails. A side that makes progress publishes its position, issues a SeqCst
//! fence, and only if a waiter is armed clears the bit, bumps `*_seq` and wakes: no system
//! call when nobody sleeps, and one per sleep however often the waker makes progress before
//! the sleeper runs again (it takes a sleeper tens of microseconds on a VM to run again, and
//! a sender that woke it for every message meanwhile paid a system call per message). The
//! two fences make a Dekker pair: either the waiter sees the new position, or the waker sees
//! it armed (and its bump makes the futex wait return at once). A waiter arms after reading
//! `*_seq`, so a waker that disarms it bumps `*_seq` after that read; a waiter that leaves
//! while others are counted arms again for them. After waking a peer, a waiter spins only
//! 2 µs and sleeps without yielding: the peer needs a core. A spin-only mode never sleeps, for users
//! who dedicate cores.
//!
//! # Peers
//! A sender or receiver handle records the process's peer token (registry slot + pid) in the
//! header. A receiver that finds the ring empty, once a sender has been seen, and no sender
//! token alive, reports [`ErrorKind::Disconnected`] after
//! draining what is left; a sender does the same for receivers. Sleepers wake at least every
//! 50 ms to check liveness, because a killed peer cannot wake them.

//! # Damage (validate, then trust)
//! Another process may be buggy or hostile and write anything into a queue's header or ring.
//! Nothing read from the section is used before it is checked, and a check that fails is
//! [`ErrorKind::Corrupt`], saying what was expected and what was found; never a read or write
//! outside the ring, a panic, or a wait that cannot end:
//! - on open: the one header check shared with heaps and the registry
//!   (`crate::header::validate`: the section's size, then ready, magic, layout version and
//!   fingerprint, before any reference to the header exists, in `header_of`), then the
//!   queue's own constants (kind, capacity a power of two, slot size, ring inside the
//!   section), in `validate`;
//! - byte queue: each side checks the other's position whenever it loads it (on attach, and
//!   when the ring looks empty or full: no extra shared load per message), for alignment and
//!   range (`recv.pos <= consumed.pos <= send.pos <= recv.pos + capacity`), and every record
//!   length and wrap marker against the ring and the published bytes before it reads the
//!   record (`ring.rs`);
//! - slot queue: whenever a sender or receiver finds its slot not ready, on the checks it
//!   makes before it sleeps and after every wake-up, the slot's sequence number against the
//!   values a healthy queue can hold there, and the other side's position against its own; a
//!   slot stuck with no peer working on it is reported rather than waited for (`slots.rs`).
//!   Slot indices are positions masked by the validated capacity, so always in range;
//! - positions and counts use wrapping arithmetic, so a damaged value near `u64::MAX`
//!   cannot overflow;
//! - inspection (`shmgadget ls`/`info`) checks the positions the same way and reports a
//!   damaged queue instead of its state.
//!
//! A queue has no checksums: a position damaged to another value a healthy queue could hold
//! (a real record boundary, say) cannot be told from the truth; the receiver then gets the
//! record found there, which is a record a sender wrote. Payload bytes are the senders'.

mod ring;
mod slots;

pub use ring::{ByteQueue, ByteReceiver, ByteSender, Kept, Message};
pub use slots::{SlotQueue, SlotReceiver, SlotSender};

use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::header;
use crate::sync::shim::{AtomicU32, AtomicU64, Ordering, fence, futex_wait, futex_wake};

/// How long a waiter spins (checking its condition) before it sleeps. Time, not a count of
/// checks: a check costs from a few nanoseconds (the line is in our cache) to hundreds (it
/// bounces between cores), so a count means anything from 10 µs to 500 µs. 20 µs covers a
/// peer that is running and answers late (an interrupt, a page fault, a short preemption)
/// without a futex sleep and wake-up, which cost 20-80 µs on a VM; it is 0.02% of a core
/// when the peer pauses for 100 ms.
#[cfg(not(loom))]
const SPIN_FOR: Duration = Duration::from_micros(20);
/// After the spin, how long a waiter keeps checking between `sched_yield`s before it sleeps:
/// others runnable on this core go first (a woken peer may be one), and the waiter still
/// answers without a futex round trip when the peer comes back within this time.
#[cfg(not(loom))]
const YIELD_UNTIL: Duration = Duration::from_micros(100);
/// Right after this thread woke a sleeping peer (see `wait_until`), the answer needs that
/// peer to be scheduled first: the waiter checks this long only, then sleeps.
#[cfg(not(loom))]
const WOKE_SPIN_FOR: Duration = Duration::from_micros(2);
/// Checks between two looks at the clock while spinning.
#[cfg(not(loom))]
const CLOCK_EVERY: u32 = 16;
/// Under loom (no time): one check, then the eventcount.
#[cfg(loom)]
const SPINS: u32 = 1;
/// In `*_waiters`: set by a waiter about to sleep, cleared by the one waker that wakes it, so
/// a waker makes the system call only once per sleep however many times it makes progress
/// before the sleeper runs again (the rest of the word counts waiters).
const ARMED: u32 = 1 << 31;

/// Where the ring starts in a queue section.
pub const DATA_OFFSET: u64 = 4096;
/// Senders (or receivers) a slot queue tracks at once.
pub const MAX_PEERS: usize = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"SHMQUEU1");
/// 2: the byte-queue receiver's consumed line (a version-1 receiver would not maintain it).
/// 3: byte queues of at least `ring::LANES_FROM` bytes have a hot lane after the ring, and
/// their positions are packed words of both lanes (`ring.rs`, "Two lanes").
/// 4: each byte-queue end keeps its state as two alternating snapshots, so that an end killed
/// while it stores one leaves the other whole (`ring.rs`, "Ends killed between two stores").
const LAYOUT_VERSION: u32 = 4;
const READY: u32 = 0x5155_4555; // "QUEU"
const KIND_BYTES: u32 = 1;
const KIND_SLOTS: u32 = 2;
/// The smallest byte ring a header may record (in-memory test queues go down to it).
const MIN_RING: u64 = 64;
/// Longest a sleeper sleeps before it checks that its peers are alive.
const LIVENESS_PERIOD: Duration = Duration::from_millis(50);
/// A peer that is doing nothing that others must repair.
const IDLE: u64 = u64::MAX;

/// How a blocked sender or receiver waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Spin briefly, then sleep on a shared futex (no CPU while waiting).
    #[default]
    Blocking,
    /// Spin until the condition holds or the timeout expires: lowest latency, one busy core.
    Spin,
}

#[repr(C, align(128))]
struct Constant {
    magic: AtomicU64,
    layout_version: AtomicU32,
    fingerprint: AtomicU32,
    ready: AtomicU32,
    kind: AtomicU32,
    /// Ring bytes (byte queue) or slots (slot queue); a power of two.
    capacity: AtomicU64,
    /// Bytes per slot (slot queue), 0 for a byte queue.
    slot_size: AtomicU64,
    /// Size and alignment of the element type (slot queue), for checking opens.
    elem: AtomicU64,
}

#[repr(C, align(128))]
struct Side {
    /// Monotonic position: bytes written/read (byte queue) or slots claimed (slot queue).
    pos: AtomicU64,
    /// Messages sent/received (slot queues; for byte queues, `recv.count` is a statistic and
    /// the counts that matter are in the snapshots).
    count: AtomicU64,
    /// Byte queue, send side only: the sender's state at its last two publications (see
    /// [`Snapshot`]), the newest one written before `pos` is published.
    snap: [Snapshot; 2],
}

/// A byte-queue end's state as a successor resumes it: its full position in each lane (lane
/// 1's is 0 in a ring with one lane), the lane it is in (receiver only) and its count of
/// messages. An end writes its two snapshots in turn, `count` last, each store Release, so a
/// kill between two stores damages at most the one being written and leaves the other whole
/// (`ring.rs`, "Ends killed between two stores").
#[repr(C)]
struct Snapshot {
    pos: [AtomicU64; 2],
    lane: AtomicU64,
    count: AtomicU64,
}

impl Snapshot {
    #[cfg(any(test, loom))]
    fn new() -> Self {
        Snapshot { pos: [AtomicU64::new(0), AtomicU64::new(0)], lane: AtomicU64::new(0), count: AtomicU64::new(0) }
    }
}

/// The byte-queue receiver's own line: how far it has consumed (messages it returned to its
/// caller and got back), as two [`Snapshot`]s, the newer with the higher count. Only a
/// receiver taking over reads it; the sender never does, so the receiver stores it at every
/// message without moving a line to the sender's core. Bytes consumed are monotonic,
/// `recv.pos <= consumed <= send.pos` in each lane, multiples of 8.
#[repr(C, align(128))]
struct Consumed {
    snap: [Snapshot; 2],
}

#[repr(C, align(128))]
struct Events {
    data_seq: AtomicU32,
    data_waiters: AtomicU32,
    space_seq: AtomicU32,
    space_waiters: AtomicU32,
}

#[repr(C)]
struct Peer {
    /// The attached process's peer token, 0 when the entry is free.
    token: AtomicU64,
    /// The position this peer has claimed but not finished (slot queue), or `IDLE`.
    inflight: AtomicU64,
}

#[repr(C)]
struct PeerTable {
    /// Set once a peer of this side has ever attached.
    seen: AtomicU32,
    /// Slot queue: 1 + the entry of this side's exclusive peer (a tunnel end, which must be
    /// the side's only peer), 0 for none. Written by that peer (slots.rs, "Exclusive peers").
    exclusive: AtomicU32,
    peers: [Peer; MAX_PEERS],
}

/// The header at the start of every queue section.
#[repr(C)]
pub(crate) struct QueueShared {
    constant: Constant,
    send: Side,
    recv: Side,
    events: Events,
    senders: PeerTable,
    receivers: PeerTable,
    consumed: Consumed,
}

const _: () = assert!(size_of::<QueueShared>() as u64 <= DATA_OFFSET);
// One cache line pair each, whatever they hold (the lanes' words fit in the same 128 bytes).
const _: () = assert!(size_of::<Side>() == 128 && size_of::<Consumed>() == 128);

const FINGERPRINT: u32 = {
    let parts = [
        size_of::<QueueShared>() as u64,
        std::mem::offset_of!(QueueShared, events) as u64,
        std::mem::offset_of!(QueueShared, senders) as u64,
        std::mem::offset_of!(QueueShared, consumed) as u64,
        std::mem::offset_of!(Side, snap) as u64,
        size_of::<Snapshot>() as u64,
        MAX_PEERS as u64,
        DATA_OFFSET,
        ring::HOT_LANE,
        ring::LANES_FROM,
    ];
    crate::fnv::layout_fingerprint(&parts)
};

// Under loom the atomics are loom's (another size): only in-memory queues exist there, whose
// headers `in_memory` builds itself, so the shared-header check is left out.
#[cfg(not(loom))]
header::assert_prefix!(Constant, magic, layout_version, fingerprint, ready);
const _: () = assert!(std::mem::offset_of!(QueueShared, constant) == 0);

// SAFETY: repr(C), atomics only; its first member is `Constant`, whose prefix is asserted
// above; `min_size` (the header's page plus a page of ring) exceeds its size.
#[cfg(not(loom))]
unsafe impl header::SharedHeader for QueueShared {
    const EXPECTED: header::Expected = header::Expected {
        what: "queue",
        magic: MAGIC,
        layout_version: LAYOUT_VERSION,
        fingerprint: FINGERPRINT,
        ready: READY,
        min_size: DATA_OFFSET * 2,
    };
}

impl QueueShared {
    #[cfg(any(test, loom))]
    fn new() -> Self {
        fn side() -> Side {
            Side { pos: AtomicU64::new(0), count: AtomicU64::new(0), snap: [Snapshot::new(), Snapshot::new()] }
        }
        fn table() -> PeerTable {
            PeerTable {
                seen: AtomicU32::new(0),
                exclusive: AtomicU32::new(0),
                peers: std::array::from_fn(|_| Peer { token: AtomicU64::new(0), inflight: AtomicU64::new(IDLE) }),
            }
        }
        QueueShared {
            constant: Constant {
                magic: AtomicU64::new(0),
                layout_version: AtomicU32::new(0),
                fingerprint: AtomicU32::new(0),
                ready: AtomicU32::new(0),
                kind: AtomicU32::new(0),
                capacity: AtomicU64::new(0),
                slot_size: AtomicU64::new(0),
                elem: AtomicU64::new(0),
            },
            send: side(),
            recv: side(),
            events: Events {
                data_seq: AtomicU32::new(0),
                data_waiters: AtomicU32::new(0),
                space_seq: AtomicU32::new(0),
                space_waiters: AtomicU32::new(0),
            },
            senders: table(),
            receivers: table(),
            consumed: Consumed { snap: [Snapshot::new(), Snapshot::new()] },
        }
    }

    /// Writes the constant part and publishes the header (the creator, before anyone else
    /// can see the queue).
    fn init(&self, kind: u32, capacity: u64, slot_size: u64, elem: u64) {
        let c = &self.constant;
        // Relaxed: published by the Release store of `ready`.
        c.kind.store(kind, Ordering::Relaxed);
        c.capacity.store(capacity, Ordering::Relaxed);
        c.slot_size.store(slot_size, Ordering::Relaxed);
        c.elem.store(elem, Ordering::Relaxed);
        for t in [&self.senders, &self.receivers] {
            for p in &t.peers {
                p.inflight.store(IDLE, Ordering::Relaxed);
            }
        }
        c.magic.store(MAGIC, Ordering::Relaxed);
        c.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        c.fingerprint.store(FINGERPRINT, Ordering::Relaxed);
        // Release: pairs with the Acquire in `header::validate` (or `header::check_ref`).
        c.ready.store(READY, Ordering::Release);
    }

    /// Checks an opened header; returns (kind, capacity, slot size, elem).
    fn validate(&self, name: &str, ring_bytes: u64) -> Result<(u32, u64, u64, u64)> {
        // The prefix (ready, magic, version, fingerprint): `header::validate` ran on it
        // already when the header came from a section (`header_of`); a header in private
        // memory (the fuzz targets) is checked here. A queue section is handed out only once
        // its registry entry is ready, which its creator marks after `init`, so no wait is needed.
        #[cfg(not(loom))]
        header::check_ref(self).map_err(|m| header_error(name, m))?;
        let c = &self.constant;
        // Relaxed: frozen, made visible by the Acquire load of `ready` in the check above.
        let (kind, cap, slot, elem) = (
            c.kind.load(Ordering::Relaxed),
            c.capacity.load(Ordering::Relaxed),
            c.slot_size.load(Ordering::Relaxed),
            c.elem.load(Ordering::Relaxed),
        );
        // What a creator can have written: a byte ring of at least MIN_RING bytes (so a
        // message of half the ring has room for its record header); slots of whole 16-byte
        // units holding at least a slot head; at least 2 slots; and a ring inside the section.
        let shape_ok = match kind {
            KIND_BYTES => cap >= MIN_RING && slot == 0,
            KIND_SLOTS => cap >= 2 && slot >= 16 && slot % 16 == 0,
            _ => false,
        };
        // A byte queue of `ring::LANES_FROM` bytes or more has its hot lane after the ring.
        let bytes = if kind == KIND_SLOTS { cap.checked_mul(slot) } else { cap.checked_add(ring::lane_bytes(cap)) };
        if !cap.is_power_of_two() || !shape_ok || bytes.is_none_or(|b| b > ring_bytes) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "queue {name:?} is damaged: its header records kind {kind}, capacity {cap}, slot size {slot}; expected kind {KIND_BYTES} (bytes: a power of two from {MIN_RING}, slot size 0) or {KIND_SLOTS} (slots: a power of two from 2, slot size a multiple of 16), with a ring of at most the section's {ring_bytes} bytes after the {DATA_OFFSET}-byte header; delete it and create it again"
                ),
            ));
        }
        Ok((kind, cap, slot, elem))
    }
}

/// Claims a free entry of `table` for `token` (reusing entries of dead peers).
fn attach_peer(table: &PeerTable, token: u64, max: usize, alive: &dyn Fn(u64) -> bool) -> Option<usize> {
    for (i, p) in table.peers.iter().enumerate().take(max) {
        // Relaxed: the CAS decides; the entry carries no data besides itself.
        let cur = p.token.load(Ordering::Relaxed);
        // A dead peer's entry still recording an intent is left to the repairer (slot queue):
        // resetting the intent would erase the only trace of a position it claimed.
        // Relaxed: the slot queue settles dead intents before attaching (`settle_dead`).
        let unsettled = cur != 0 && p.inflight.load(Ordering::Relaxed) != IDLE;
        if (cur == 0 || (!alive(cur) && !unsettled))
            && p.token.compare_exchange(cur, token, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // Relaxed: the entry is ours now (CAS above); repairers read it only for dead peers.
            p.inflight.store(IDLE, Ordering::Relaxed);
            // Release: pairs with the Acquire in `side_gone` (a side seen is a side with a token).
            table.seen.store(1, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// Whether a side has ever had a peer, and none of its peers is alive now. With `thorough`
/// false only the tokens are read (no system call): a killed peer still counts as alive.
fn side_gone(table: &PeerTable, thorough: bool, alive: &dyn Fn(u64) -> bool) -> bool {
    // Acquire: pairs with the Release in `attach_peer`.
    if table.seen.load(Ordering::Acquire) == 0 {
        return false;
    }
    !table.peers.iter().any(|p| {
        // Acquire: pairs with the Release that clears a leaving peer's token, so a caller that
        // sees the peer gone then sees everything the peer published before leaving.
        let t = p.token.load(Ordering::Acquire);
        t != 0 && (!thorough || alive(t))
    })
}

/// The attached peers of a side (tokens), for inspection.
fn peers_of(table: &PeerTable) -> Vec<u64> {
    // Relaxed: a snapshot.
    table.peers.iter().map(|p| p.token.load(Ordering::Relaxed)).filter(|&t| t != 0).collect()
}

/// Waits until `attempt` returns `Some` (or an error), as described in the module docs.
/// `attempt(thorough)` must be cheap when `thorough` is false; it is true just before the
/// waiter sleeps and after each wake-up (then it may check peer liveness).
fn wait_until<T>(
    seq: &AtomicU32,
    waiters: &AtomicU32,
    mode: WaitMode,
    timeout: Option<Duration>,
    mut attempt: impl FnMut(bool) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    let timed_out = || Error::new(ErrorKind::Timeout, format!("queue wait timed out after {timeout:?}"));
    if let Some(v) = spin_then_yield(mode, deadline, &mut attempt)? {
        return Ok(v);
    }
    if mode == WaitMode::Spin {
        let mut i = 0u32;
        loop {
            i = i.wrapping_add(1);
            let thorough = i % 4096 == 0;
            if let Some(v) = attempt(thorough)? {
                return Ok(v);
            }
            if i % 256 == 0 && expired() {
                return Err(timed_out());
            }
            std::hint::spin_loop();
        }
    }
    // Leaving the sleep loop: if other waiters are still counted, re-arm for them (the waker
    // that woke us may have disarmed the word they sleep on). RMW (SeqCst) as the others.
    let leave = || {
        if waiters.fetch_sub(1, Ordering::SeqCst) & !ARMED > 1 {
            waiters.fetch_or(ARMED, Ordering::SeqCst);
        }
    };
    loop {
        // SeqCst: the waiter's half of the Dekker pair (see the module docs). Count ourselves,
        // read the sequence we will sleep on, and only then arm: a waker that disarms after
        // our arming bumps the sequence after our read (the SeqCst order of these RMWs and
        // loads), so our sleep on `s` cannot miss it.
        waiters.fetch_add(1, Ordering::SeqCst);
        let s = seq.load(Ordering::SeqCst);
        waiters.fetch_or(ARMED, Ordering::SeqCst);
        // Pairs with the fence in `wake`: either `attempt` sees the waker's progress, or the
        // waker sees us armed.
        fence(Ordering::SeqCst);
        let r = attempt(true);
        if !matches!(r, Ok(None)) {
            leave();
            return r.map(|v| v.expect("matched Some"));
        }
        // Wake up at least every LIVENESS_PERIOD to check the peers. (Under loom, whose
        // in-memory queues have no peers to die and whose model futex does not keep time,
        // sleep until woken.)
        let mut nap = if cfg!(loom) { None } else { Some(LIVENESS_PERIOD) };
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                leave();
                return Err(timed_out());
            }
            nap = Some(nap.map_or(d - now, |n| n.min(d - now)));
        }
        let slept = futex_wait(seq, s, nap);
        leave();
        slept.map_err(|e| Error::from_io("cannot wait on a queue", e))?;
    }
}

/// The waiter's first phases, before the eventcount: checks `attempt` in a spin for
/// [`SPIN_FOR`] (or [`WOKE_SPIN_FOR`] right after waking a peer), then between
/// `sched_yield`s until [`YIELD_UNTIL`] (a spin-mode waiter keeps spinning instead, in the
/// caller). `None` when the condition still fails.
#[cfg(not(loom))]
fn spin_then_yield<T>(
    mode: WaitMode,
    deadline: Option<Instant>,
    attempt: &mut impl FnMut(bool) -> Result<Option<T>>,
) -> Result<Option<T>> {
    // If this thread has just woken a sleeping peer, spinning (or yielding: the woken peer is
    // queued on another core, `sched_yield` does not bring it here) would keep our core busy
    // and, on an idle machine (a VM above all), make the peer wait for another core to wake
    // up: sleep soon instead, so the peer can run where we were (measured: the round trip
    // after a pause took 1.5-1.8x as long with a yield phase here).
    let woke = woke_a_peer_recently();
    let spin_for = if woke { WOKE_SPIN_FOR } else { SPIN_FOR };
    let start = Instant::now();
    let end = |limit: Duration| {
        let t = start + limit;
        deadline.map_or(t, |d| d.min(t))
    };
    let (spin_end, yield_end) = (end(spin_for), end(YIELD_UNTIL));
    let mut i = 0u32;
    loop {
        if let Some(v) = attempt(false)? {
            return Ok(Some(v));
        }
        i = i.wrapping_add(1);
        if i % CLOCK_EVERY == 0 && Instant::now() >= spin_end {
            break;
        }
        std::hint::spin_loop();
    }
    if mode == WaitMode::Spin || woke {
        return Ok(None);
    }
    while Instant::now() < yield_end {
        std::thread::yield_now();
        if let Some(v) = attempt(false)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Under loom: [`SPINS`] checks (time is not modelled).
#[cfg(loom)]
fn spin_then_yield<T>(
    _mode: WaitMode,
    _deadline: Option<Instant>,
    attempt: &mut impl FnMut(bool) -> Result<Option<T>>,
) -> Result<Option<T>> {
    for _ in 0..SPINS {
        if let Some(v) = attempt(false)? {
            return Ok(Some(v));
        }
        crate::sync::shim::retry_hint();
    }
    Ok(None)
}

/// The waker's half: after publishing progress, wakes a sleeper if one is armed (`n` is 1),
/// or every counted waiter (`n` larger: a side leaving). A waiter armed once is woken once:
/// progress made again before it runs costs no system call.
#[inline]
fn wake(seq: &AtomicU32, waiters: &AtomicU32, n: u32) {
    // Pairs with the fence in `wait_until` (Dekker pair): after it, either the waiter's
    // `attempt` sees our progress or we see its count and arming.
    fence(Ordering::SeqCst);
    // Relaxed: ordered by the fence above; the RMW below decides.
    let w = waiters.load(Ordering::Relaxed);
    let go = if n == 1 {
        // SeqCst: ordered with the waiter's read of `seq` and arming (see `wait_until`).
        w & ARMED != 0 && waiters.fetch_and(!ARMED, Ordering::SeqCst) & ARMED != 0
    } else {
        w != 0
    };
    if go {
        // SeqCst: after the disarming, so a waiter that read `seq` before arming sees it
        // changed (its futex wait returns at once) or is woken below.
        seq.fetch_add(1, Ordering::SeqCst);
        futex_wake(seq, n);
        note_woke_a_peer();
    }
}

#[cfg(not(loom))]
thread_local! {
    /// When this thread last woke a sleeping peer.
    static LAST_WAKE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// How recent a wake-up makes a waiter skip its spinning.
#[cfg(not(loom))]
const RECENT_WAKE: Duration = Duration::from_micros(50);

#[cfg(not(loom))]
fn note_woke_a_peer() {
    let _ = LAST_WAKE.try_with(|w| w.set(Some(Instant::now())));
}

#[cfg(not(loom))]
fn woke_a_peer_recently() -> bool {
    LAST_WAKE.try_with(|w| w.take().is_some_and(|t| t.elapsed() < RECENT_WAKE)).unwrap_or(false)
}

#[cfg(loom)]
fn note_woke_a_peer() {}

/// The address of a heap block in flight through a queue ([`SlotQueue<BlockAddr>`]): the
/// sender gives the block up, the receiver takes it over. Nothing is copied, whatever the
/// block's size: the block is at the same address in every process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct BlockAddr(u64);

// SAFETY: an address inside the domain's window, the same number in every process.
unsafe impl crate::ShmSafe for BlockAddr {}

impl BlockAddr {
    /// Gives up `b` (it is not dropped here) for sending.
    pub fn from_box<T>(b: crate::heap::ShmBox<T>) -> BlockAddr {
        let (p, _alloc) = crate::heap::ShmBox::into_raw_with_allocator(b);
        BlockAddr(p as u64)
    }

    /// The block's address.
    pub fn addr(self) -> u64 {
        self.0
    }

    /// Takes over the block as a box of `T` in `alloc`'s heap. In eager mode the heap is mapped
    /// first if this process has not mapped it yet.
    ///
    /// # Panics
    /// If the heap cannot be mapped (see [`try_into_box`](BlockAddr::try_into_box)).
    ///
    /// # Safety
    /// The address must come from [`from_box`](BlockAddr::from_box) of a `ShmBox<T>` of the same
    /// heap, received exactly once (no other process keeps using the block).
    pub unsafe fn into_box<T>(self, alloc: crate::heap::ShmAlloc) -> crate::heap::ShmBox<T> {
        // SAFETY: forwarded from the caller.
        unsafe { self.try_into_box(alloc) }.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`into_box`](BlockAddr::into_box), returning an error if the heap holding the block
    /// is not mapped in this process and cannot be mapped.
    ///
    /// # Safety
    /// As for [`into_box`](BlockAddr::into_box).
    pub unsafe fn try_into_box<T>(self, alloc: crate::heap::ShmAlloc) -> Result<crate::heap::ShmBox<T>> {
        crate::domain::map_for_address(self.0 as usize, size_of::<T>())?;
        // SAFETY: forwarded from the caller: a live, uniquely owned T allocated by `alloc`'s
        // heap, mapped in this process (just above in eager mode, else on first touch).
        Ok(unsafe { crate::heap::ShmBox::from_raw_in(self.0 as *mut T, alloc) })
    }
}

/// What `shmgadget ls`/`info` show for a queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueInfo {
    /// `"bytes"` (one sender, one receiver) or `"slots"` (many of each).
    pub kind: &'static str,
    /// Ring bytes (byte queue) or slots (slot queue).
    pub capacity: u64,
    /// Bytes (byte queue) or messages (slot queue) waiting now.
    pub fill: u64,
    /// Messages sent so far.
    pub sent: u64,
    /// Messages received so far.
    pub received: u64,
    /// Pids of attached senders, with liveness.
    pub senders: Vec<(u32, bool)>,
    /// Pids of attached receivers, with liveness.
    pub receivers: Vec<(u32, bool)>,
    /// Senders counted as asleep waiting for space (`space_waiters`: a waiter counts itself
    /// just before it sleeps and uncounts itself after it wakes, so this is an upper bound).
    pub blocked_senders: u32,
    /// Receivers counted as asleep waiting for data (`data_waiters`, as above).
    pub blocked_receivers: u32,
}

/// Reads a queue section's state (for inspection). A damaged header or positions that no
/// live queue can have are [`ErrorKind::Corrupt`], saying what was found.
pub fn inspect(section: &crate::Section) -> Result<QueueInfo> {
    if section.kind() != crate::SectionKind::Queue {
        return Err(Error::new(ErrorKind::InvalidArgument, format!("section {:?} is not a queue", section.name())));
    }
    let h = header_of(section)?;
    let d = section.domain();
    inspect_header(h, section.name(), section.len() as u64 - DATA_OFFSET, &|tok| (d.peer_pid(tok), d.peer_alive(tok)))
}

/// [`inspect`] of a header (also for the fuzz targets): `peer` gives a token's pid and liveness.
pub(crate) fn inspect_header(
    h: &QueueShared,
    name: &str,
    ring_bytes: u64,
    peer: &dyn Fn(u64) -> (u32, bool),
) -> Result<QueueInfo> {
    let (kind, cap, _, _) = h.validate(name, ring_bytes)?;
    let peers = |t: &PeerTable| peers_of(t).into_iter().map(peer).collect();
    // The positions are read while the queue may be in use, in an order that makes every
    // healthy snapshot satisfy the checks below (each position only grows): given back
    // first, then consumed, then written, then given back again. A snapshot that fails is
    // taken again a few times, in case a peer was preempted between our loads (it cannot
    // fail twice in a row for a healthy queue unless the peers are extraordinarily busy);
    // only one that keeps failing is reported.
    let mut last = String::new();
    for _ in 0..4 {
        let snap = if kind == KIND_BYTES { ring::fill_of(h, cap) } else { slot_fill(h, cap) };
        match snap {
            Ok(fill) => {
                let (sent, received) = if kind == KIND_BYTES {
                    // What the ends' snapshots say (the receiver gives space back in batches;
                    // what it consumed is exact).
                    ring::counts_of(h, cap)
                } else {
                    // Relaxed: statistics.
                    (h.send.count.load(Ordering::Relaxed), h.recv.count.load(Ordering::Relaxed))
                };
                return Ok(QueueInfo {
                    kind: if kind == KIND_BYTES { "bytes" } else { "slots" },
                    capacity: cap,
                    fill,
                    sent,
                    received,
                    senders: peers(&h.senders),
                    receivers: peers(&h.receivers),
                    // Relaxed: statistics.
                    blocked_senders: h.events.space_waiters.load(Ordering::Relaxed),
                    blocked_receivers: h.events.data_waiters.load(Ordering::Relaxed),
                });
            }
            Err(found) => last = found,
        }
        for _ in 0..1000 {
            std::hint::spin_loop();
        }
    }
    Err(Error::new(
        ErrorKind::Corrupt,
        format!("queue {name:?} is damaged: its positions are {last}; delete it and create it again"),
    ))
}

/// A slot queue's fill from one snapshot of its positions (see `inspect_header`), or what
/// was found if they break `received <= sent <= received + capacity`.
fn slot_fill(h: &QueueShared, cap: u64) -> std::result::Result<u64, String> {
    // Acquire (all three): each pairs with its writer's Release, so a later load here sees
    // positions at least as new as the ones the writer had seen.
    let r1 = h.recv.pos.load(Ordering::Acquire);
    let w = h.send.pos.load(Ordering::Acquire);
    let r2 = h.recv.pos.load(Ordering::Acquire);
    if r1 <= w && w - r2.min(w) <= cap {
        return Ok(w - r2.min(w));
    }
    Err(format!("received {r1:#x}, sent {w:#x}; expected received <= sent <= received + {cap}"))
}

/// Why queue `name`'s header was refused, as an error that says what to do.
#[cfg_attr(loom, allow(dead_code))]
fn header_error(name: &str, m: header::Mismatch) -> Error {
    let msg = match m {
        header::Mismatch::NotReady { .. } => format!(
            "queue {name:?} has no initialised header ({m}): it was created as a plain section of kind queue, \
             or is still being created (inspection), or was damaged; delete it with `shmgadget rm {name}` if unused"
        ),
        _ => format!("queue {name:?} is damaged: {m}; delete it with `shmgadget rm {name}` and create it again"),
    };
    Error::new(ErrorKind::Corrupt, msg)
}

/// The header of an existing queue section, after the one header check (size, ready, magic,
/// version, fingerprint), which runs before any reference to it is formed.
#[cfg(not(loom))]
fn header_of(section: &crate::Section) -> Result<&QueueShared> {
    // SAFETY: the section is page-aligned and its `len()` bytes stay mapped while `section`
    // lives (the mapping was checked against the object's size when it was made);
    // QueueShared is atomics only, written by others only through atomics.
    unsafe { header::validate::<QueueShared>(section.as_ptr(), section.len() as u64) }
        .map_err(|m| header_error(section.name(), m))
}

/// The header of a queue section this process just created, for its `init` (only the size is
/// checked: nothing is published yet).
#[cfg(not(loom))]
fn new_header(section: &crate::Section) -> Result<&QueueShared> {
    // SAFETY: as in `header_of`.
    unsafe { header::unpublished::<QueueShared>(section.as_ptr(), section.len() as u64) }
        .map_err(|m| header_error(section.name(), m))
}

/// Queue sections are not modelled under loom (its atomics are not the layout of a section).
#[cfg(loom)]
fn header_of(section: &crate::Section) -> Result<&QueueShared> {
    Err(Error::new(
        ErrorKind::InvalidArgument,
        format!("queue {:?}: sections are not modelled under loom", section.name()),
    ))
}

#[cfg(loom)]
use header_of as new_header;

/// Creates (`create` `Some(true)`), creates or opens (`Some(false)`) or opens (`None`) the
/// queue section `name` with `ring` bytes after the header. A section this call creates is
/// committed and given to `init` while no one else can see it, then marked ready; if any of
/// that fails, it is removed again (all or nothing).
fn queue_section(
    domain: &crate::Domain,
    name: &str,
    ring: u64,
    create: Option<bool>,
    init: impl FnOnce(&crate::Section) -> Result<()>,
) -> Result<(crate::Section, bool)> {
    let size = DATA_OFFSET
        .checked_add(ring)
        .ok_or_else(|| Error::new(ErrorKind::InvalidSize, format!("queue {name:?}: {ring} bytes is too large")))?;
    let opts = crate::SectionOptions::new().kind(crate::SectionKind::Queue);
    let (section, created, rec) = match create {
        Some(true) => {
            let (s, rec) = domain.create_section_as(name, size, &opts, false)?;
            (s, true, Some(rec))
        }
        Some(false) => {
            let (s, created, rec) = domain.create_or_open_section_as(name, size, &opts, false)?;
            (s, created, created.then_some(rec))
        }
        None => (domain.open_section(name)?, false, None),
    };
    if section.kind() != crate::SectionKind::Queue {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("section {name:?} is a {} section, not a queue", section.kind().as_str()),
        ));
    }
    if let Some(rec) = rec {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            section.commit(section.len() as u64)?;
            init(&section)?;
            domain.finish_init(&rec)
        }));
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                domain.abandon_created(section, &rec);
                return Err(e);
            }
            Err(panic) => {
                domain.abandon_created(section, &rec);
                std::panic::resume_unwind(panic);
            }
        }
    }
    Ok((section, created))
}
