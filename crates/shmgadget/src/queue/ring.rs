//! The byte queue: one sender, one receiver, variable-size messages in a ring of bytes.
//!
//! # Protocol
//! `send.pos` (bytes written) and `recv.pos` (bytes read) only grow; each is written by one
//! side. A message is a record `[len: u32, 0: u32][payload][padding to 8]`; a record never
//! wraps: if it does not fit before the end of the ring, the sender writes a wrap marker
//! (`len = u32::MAX`) and starts the record at offset 0. So the receiver reads every message
//! in place, as one slice, and a message may be up to half the ring.
//!
//! The sender writes the record, then publishes `send.pos` (Release); the receiver Acquires
//! it, reads the record, then publishes `recv.pos` (Release), which gives the space back. Each
//! side keeps its own position and a cached copy of the other's, which it refreshes only when
//! the ring looks full (or empty). A sender killed mid-message never published it: the
//! receiver sees every message that was sent completely and nothing else.
//!
//! The receiver gives space back in batches of a quarter of the ring (of the hot window, in a
//! large ring: see below), and at once whenever it
//! has read everything it knows of (so a sender never waits while the ring is empty for the
//! receiver). The sender's publication can be batched too (as PostgreSQL's `shm_mq` does): with
//! [`ByteSender::set_batch`], the sender publishes only once that many bytes are pending, when
//! the ring is full, on [`ByteSender::flush`], and when it is dropped. Streams then move one
//! cache line per batch instead of one per message; each message still costs the same
//! whatever the ring's size.
//!
//! # Large rings
//! A ring larger than the caches costs DRAM traffic when the receiver reads far behind the
//! sender: what it reads was written long ago and left the caches. So, in any ring, the
//! receiver follows closely: the sender's batches ([`ByteSender::set_batch`]) are capped at
//! a quarter of a [`HOT_WINDOW`] (256 KiB, a quarter of this machine's L2 per core), and the
//! receiver gives space back every quarter of the window (or of the ring, if smaller). A
//! receiver that keeps up then reads lines still in the sender's cache; the rest of the ring
//! only absorbs bursts, and a stalled receiver lets the sender fill all of it.
//!
//! Not done, on purpose: an early wrap (the sender going back to offset 0 at the window's
//! end whenever the receiver has given the start back) would reuse the same lines lap after
//! lap, but a receiver that stalls before it reads the wrap marker would leave the sender
//! only the window, not the capacity: the skipped bytes count as unread until the receiver
//! passes the marker, and a ring cannot write past its own marker. Resetting the positions of
//! an empty ring would need both sides to agree (a protocol change).
//!
//! # Two lanes
//! Following closely is not enough: the sender still writes lines last used a whole ring ago
//! (every byte goes to DRAM and back), and a sender faster than its receiver keeps a large
//! ring full, so the receiver reads what was written a ring ago. So a ring of [`LANES_FROM`]
//! (4 MiB) or more gets, on top of the ring asked for (the *main lane*: `capacity()` and
//! `max_message()` are unchanged), a *hot lane* of [`HOT_LANE`] (2 MiB, the best-measured
//! ring size here) after it in the section. Smaller rings have one lane and behave as before
//! lanes. Each lane is a ring of the protocol above (records, wrap markers), with its own
//! positions. A *switch record* (`len = u32::MAX - 1`, 8 bytes) in the lane the sender
//! leaves tells the receiver "continue in the other lane where you left it": each lane is
//! FIFO, so the interleaving is the sender's order however often it switches.
//! - The sender writes in the hot lane while the record fits (every lane always keeps 8 bytes
//!   free, so a switch record always fits; a record over half the hot lane goes to the main
//!   lane). When the hot lane is full it *waits* for the receiver as a 2 MiB ring would, and
//!   overflows into the main lane only once the receiver has given nothing back for
//!   `OVERFLOW_AFTER` (50 µs; at once for [`ByteSender::try_send`]): a stalled receiver lets
//!   the sender fill the hot lane and then the whole main lane, at least the capacity asked
//!   for. (The first version overflowed as soon as the hot lane was full, as the issue's
//!   design suggested: a sender faster than its receiver then filled the main lane at every
//!   burst and kept it full, and 1 KiB messages at 64 MiB ran at 0.31 of the best, as before.)
//! - From the main lane it goes back to the hot lane once that is at most a quarter full
//!   (the receiver gives a lane back when it leaves it), looking at the receiver's position
//!   every `LOOK_EVERY` (64 KiB) bytes written in the main lane, not per message.
//! - Both lanes' positions and the sender's lane are *one* shared word (`send.pos`): lane 1's
//!   position modulo 2^41 in bits 23.., lane 0's modulo 2^22 in bits 1..23, the lane in bit 0
//!   (a lane holds at most 2^40 and 2^21 bytes, so differences are exact). One Release store
//!   publishes a switch record and the records after it in the other lane together. So no
//!   switch count is needed (the issue suggested numbered switch records and a switch on every
//!   takeover): a sender killed anywhere leaves a published word that says which lane it was
//!   in and where each lane ends; its successor continues there, overwriting anything
//!   unpublished, switch records included, and the receiver never meets a stale or duplicate
//!   switch. `recv.pos` packs the given-back positions the same way.
//! - [`ByteSender::position`] stays a monotone byte count, the sum of the lanes' positions:
//!   the sender's snapshots (below) hold its full lane positions, and a successor takes the
//!   one whose positions the packed fields show.
//!   The tunnel importer compares it across a takeover: it changes exactly when a message was
//!   published.
//! - The receiver records what it consumed in both lanes and the lane it is in (its
//!   `consumed` snapshots); a successor resumes there. A
//!   [`Kept`] mark holds both lanes' positions; [`ByteReceiver::commit`] gives back both.
//! - Wake-ups are unchanged: one `send.pos` word, one `recv.pos` word.
//!
//! Not done: a ring of fixed segments chained by links (a free stack of segments cycling while
//! the receiver keeps up). Two lanes give the same cycling with positions alone; what segments
//! would still have to solve (records up to half the ring over adjacent segments, a sender
//! killed between popping and linking a segment, the segment of the consumed position for a
//! successor) is not needed.
//!
//! Tried and left out (branch `ring13`, commits 45614e0..fd56176, layout 3): records that
//! signal themselves (a header word of 0 until the sender writes it, the first header of a
//! batch written last, an end word kept free and zeroed), so that a receiver that follows
//! reads the record's line and not `send.pos`'s. It passed the unit, property and loom tests,
//! but through the C interface (one publication per message) 1 KiB messages were slower in
//! each of five A/B runs (by 3% to 58%) and 64 B messages no faster beyond the noise (loaded
//! 2-core machine; medians of 8-10 repetitions; BENCHMARKS.md): a receiver that polls the next
//! header polls the line the sender is writing, where it used to poll a line written once per
//! message, and the receiver still needs to know, at each message, whether it caught up
//! (so that a stalled receiver gives back everything it consumed), which costs a look at that
//! same line. This protocol reads `send.pos` only when its cached copy runs out.
//!
//! Not done (issue 13, stop 23): headers tagged with their position as each record's commit
//! mark, `send.pos` published lazily. It would remove the per-message publication, but that is
//! not what keeps the C interface below the Rust throughput rows. Measured in one run on the C
//! benchmark's stream (1 MiB ring, a receiver that copies each message out with `recv_into`:
//! `cargo bench -p shm-nt --bench c_interface`, rows "the Rust API on the same stream"), the
//! Rust API publishing every message ran about as fast as the Rust API publishing in 64 KiB
//! batches, while `shm_q_write`/`shm_q_read` ran at about half the unbatched Rust API's rate
//! (0.53× at 64 B; 0.70× after the hot paths below);
//! the Rust throughput rows' 40 M msg/s read one byte of each message in place. What the C
//! path paid was instructions (723 per 64 B message through `shm_nt.h` against 395 for
//! `send` + `recv_into`, callgrind), which the hot paths below cut, and, for 1 KiB, the copy
//! of every line from the sender's core. The tagged-header receiver would also poll the line
//! the sender writes next, as the `ring13` receiver did.
//!
//! # Hot paths
//! Through the C interface every message is one call on each side, so instructions per
//! message count as much as cache lines: measured with callgrind (`bench.c` `count_queue`, one
//! process writing then reading each 64 B message), `shm_q_write` + `shm_q_read` took 723
//! instructions per message, of which `ByteSender::send` 179 and `ByteReceiver::recv_into` 216.
//! So the common case of each side is a short inlined path that does exactly what the general
//! one does in that case, and falls back to it for everything else, changing nothing first:
//! - `ByteSender::put_now` (in `send`, `send_timeout`, `try_send`): the record fits in lane 0
//!   (the ring, or the hot lane the sender is in) before the lane's end, by the cached view of
//!   the receiver. No lane choice, no wrap, no switch record.
//! - `ByteReceiver::peek_now` (in `recv_into` and the receives): the next item in the
//!   receiver's lane is a published message record passing `peek`'s checks (wrap markers,
//!   switch records and anything damaged go to `peek`, which decides and reports).
//! - `recv_into` copies straight from the record and releases it, without building a
//!   [`Message`] (the same steps: consumed once copied).
//!
//! With these, and `shm_q_write`/`shm_q_read` each compiled as one function (their queue-end
//! closure inlined), the same count is 516; `send` + `recv_into` called from Rust take 267
//! (BENCHMARKS.md, stop 23).
//!
//! # Positions
//! | word | meaning | written by | read by |
//! |---|---|---|---|
//! | `send.pos` | bytes written and published (two lanes: both lanes' positions and the sender's lane, packed) | sender: Release, per message or per batch | receiver: Acquire, when its lane looks empty, and on attach |
//! | `send.snap` | two snapshots of the sender: full lane positions and messages sent | sender: Release, before each publication, in turn | a sender taking over, on attach (and `inspect`) |
//! | `recv.pos` | bytes given back: the sender may overwrite what lies before (two lanes: packed as `send.pos`) | receiver: Release, per quarter window, when it caught up or changed lanes; a receiver taking over, on attach | sender: Acquire, when a lane looks full, every 64 KiB in the main lane, and on attach |
//! | `consumed.snap` | two snapshots of the receiver: bytes consumed in each lane (the end of the last message returned and given back by its reader), the lane of that message, messages consumed | receiver: Release, at every message, in turn | only a receiver taking over, on attach (and `inspect`) |
//!
//! In a healthy ring, in each lane, `recv.pos <= consumed <= send.pos <= recv.pos +
//! capacity` (of the lane), and all three are multiples of 8 (records are). A receiver checks this on attach: positions that
//! break it are a damaged ring, reported as [`ErrorKind::Corrupt`], never a read out of place.
//!
//! # Readers that die
//! A message is *consumed* when its reader gives it back: when the [`Message`] returned by
//! [`ByteReceiver::recv`] (or `try_recv`, `recv_timeout`) is dropped, or inside
//! [`ByteReceiver::recv_into`] once the bytes are copied. The receiver then stores a
//! `consumed` snapshot on its own line, which the sender never reads, so this
//! costs no cache-line transfer; `recv.pos` still lags behind in batches. A receiver that takes
//! over a dead one's place (or a departed one's: its `Drop` publishes everything first) starts
//! at the consumed position and publishes it as `recv.pos` at once. So:
//! - a message consumed is never delivered again, to anyone;
//! - a message received but not consumed when its reader died (the [`Message`] in hand) is
//!   delivered again, first, to the next receiver: at most one such message per death, since a
//!   receiver holds at most one `Message` at a time (it borrows the receiver mutably);
//! - nothing else is lost or repeated. The one exception is `recv_into`: it consumes the
//!   message just before it returns, so a reader killed in those last instructions loses that
//!   one message without ever having had it. Use `recv` and drop the `Message` once the work
//!   is done for "a message I did not finish is redelivered".
//!
//! # Reading ahead (release later)
//! A receiver that forwards messages elsewhere (the tunnel to another host) must not consume a
//! message before the far side has it. [`Message::keep`] moves the receiver past a message
//! *without* consuming it: the next receive returns the message after it, but the consumed
//! position and `recv.pos` stay where they were, so the sender cannot overwrite the kept bytes and a
//! receiver taking over (after this one dies) receives every kept message again, from the
//! first. [`ByteReceiver::commit`] later consumes every message up to a kept one, in order.
//! The receiver's `committed` position is what it publishes: `recv.pos <= consumed =
//! committed <= pos`, so the positions table above holds unchanged; a ring whose messages are
//! all kept is full for the sender, which is how a slow far side slows the sender down.
//! Dropping a [`Message`] after keeping others consumes it and every kept one before it.
//!
//! # Ends killed between two stores
//! A successor resumes an end from several words: the receiver's consumed position in each
//! lane, its lane and its count of messages; the sender's full lane positions and its count
//! (`ByteSender::sent`, and the numbering of the messages a producer resumes from it). A kill
//! lands between any two stores: written in place, the words would disagree (the CI run of
//! stop 24 found a receiver killed after storing its position and before its count: the queue
//! counted one message less than it delivered from then on, and every later `Kept::seq` was one
//! off). So each end keeps two [`Snapshot`](super::Snapshot)s of those words and writes them in
//! turn, the count last, every store Release (no store moves before an earlier one):
//! - the one being written may be damaged by a kill; the other, the latest whole one, is
//!   never touched while this one is written;
//! - the receiver's latest is the one with the higher count: the count only grows (each
//!   snapshot consumes at least one message), and one damaged by a kill still holds its
//!   older count;
//! - the sender writes its snapshot *before* it publishes `send.pos`, and its latest is the one
//!   whose positions `send.pos` shows: the other is older, or newer and never published (the
//!   messages in it were not sent, and a successor overwrites them). Where both show them (one
//!   damaged in a way that left the same positions) the higher count wins.
//!
//! Why the successor sees the dead end's last stores: an end that left cleared its peer token
//! with a Release store after its last store, and the successor's CAS on that token
//! (`attach_peer`, AcqRel) Acquires it; an end that died stopped before the kernel released its
//! liveness lock, and the successor's liveness check observes that release through a system
//! call before its CAS. Either way the dead end's stores happen before the successor's loads.
//! `inspect` reads snapshots that a live end may be writing: it loads the counts, the
//! snapshot, then the counts again, and takes it only if they did not change (Acquire: a
//! store of the next snapshot seen means the counts changed).

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::{
    DATA_OFFSET, KIND_BYTES, QueueShared, Snapshot, WaitMode, attach_peer, header_of, new_header, queue_section,
    side_gone, wait_until, wake,
};
use crate::error::{Error, ErrorKind, Result};
use crate::sync::shim::Ordering;

const WRAP: u32 = u32::MAX;
/// A switch record's first word: "continue in the other lane" (see "Two lanes").
const SWITCH: u64 = (u32::MAX - 1) as u64;
const REC_HEADER: u64 = 8;
/// How closely the receiver follows the sender in a large ring (see "Large rings"): a quarter
/// of this machine's 1 MiB L2 per core, so what the receiver has yet to read stays in the
/// caches.
const HOT_WINDOW: u64 = 256 << 10;
/// The hot lane of a ring of [`LANES_FROM`] bytes or more (see "Two lanes").
pub(super) const HOT_LANE: u64 = 2 << 20;
/// The smallest ring that gets a hot lane.
pub(super) const LANES_FROM: u64 = 2 * HOT_LANE;
/// How long a sender whose hot lane is full waits for the receiver to give space back there
/// before it overflows into the main lane (see "Two lanes"): a receiver that is running gives
/// space back every quarter window, a few microseconds.
#[cfg(not(loom))]
const OVERFLOW_AFTER: Duration = Duration::from_micros(50);
/// Bytes a sender writes in the main lane between two looks at the receiver's position, to
/// learn that the hot lane has room again.
const LOOK_EVERY: u64 = HOT_WINDOW / 4;
/// The lanes in a ring with two: the hot lane is lane 0 (where a fresh queue starts), the
/// ring the user asked for is lane 1. A ring with one lane has only lane 0, the ring.
const HOT: usize = 0;
const MAIN: usize = 1;
/// Packed positions of a ring with two lanes: lane 1's modulo 2^41 in bits 23..64, lane 0's
/// modulo 2^22 in bits 1..23, and bit 0 the sender's lane (see "Two lanes").
const MASK0: u64 = (1 << 22) - 1;
const MASK1: u64 = (1 << 41) - 1;

/// The hot lane's bytes for a ring of `cap` bytes (0: no hot lane).
pub(super) fn lane_bytes(cap: u64) -> u64 {
    if cap >= LANES_FROM { HOT_LANE } else { 0 }
}

/// How positions are shared: one lane (a plain byte count, as before lanes) or two (packed).
#[derive(Clone, Copy)]
struct Packing {
    two: bool,
}

impl Packing {
    fn lanes(self) -> usize {
        if self.two { 2 } else { 1 }
    }

    /// The modulus mask of lane `l`'s positions in a shared word.
    fn mask(self, l: usize) -> u64 {
        match (self.two, l) {
            (false, _) => u64::MAX,
            (true, 0) => MASK0,
            _ => MASK1,
        }
    }

    /// Bytes from position `from` to `to` in lane `l` (either may be a full position or a
    /// shared word's field).
    fn dist(self, l: usize, from: u64, to: u64) -> u64 {
        to.wrapping_sub(from) & self.mask(l)
    }

    /// A shared position word: each lane's position and the sender's lane.
    fn unpack(self, w: u64) -> ([u64; 2], usize) {
        if self.two { ([(w >> 1) & MASK0, w >> 23], (w & 1) as usize) } else { ([w, 0], 0) }
    }

    fn pack(self, p: [u64; 2], lane: usize) -> u64 {
        if self.two { (p[1] & MASK1) << 23 | (p[0] & MASK0) << 1 | lane as u64 } else { p[0] }
    }
}

/// One lane: a ring of bytes of its own.
#[derive(Clone, Copy)]
struct Lane {
    data: *mut u8,
    cap: u64,
}

/// A byte queue (one sender and one receiver at a time; any processes). Create or open it by
/// name, then take its [`sender`](ByteQueue::sender) in one process and its
/// [`receiver`](ByteQueue::receiver) in another.
pub struct ByteQueue {
    hdr: NonNull<QueueShared>,
    /// Lane 0 and lane 1 (see [`HOT`], [`MAIN`]); lane 1 unused in a ring with one lane.
    lanes: [Lane; 2],
    pk: Packing,
    /// The ring the user asked for (the main lane).
    cap: u64,
    /// The hot window: what the receiver follows the sender within (see "Large rings");
    /// `cap` for a ring smaller than four windows.
    hot: u64,
    section: Option<crate::Section>,
    #[cfg(any(test, loom))]
    _mem: Option<(Box<QueueShared>, Vec<u64>)>,
}

// SAFETY: the header is atomics; the ring bytes are written only by the one sender and read by
// the one receiver, ordered by the Release/Acquire positions; handles are per side.
unsafe impl Send for ByteQueue {}
// SAFETY: as above; `&ByteQueue` only gives out handles that claim their side first.
unsafe impl Sync for ByteQueue {}

impl ByteQueue {
    /// Creates queue `name` with a ring of at least `capacity` bytes (rounded up to a power of
    /// two, at least 4 KiB). Messages may be up to half the ring.
    pub fn create(domain: &crate::Domain, name: &str, capacity: u64) -> Result<ByteQueue> {
        let cap = ring_capacity(name, capacity)?;
        let init = |s: &crate::Section| new_header(s).map(|h| h.init(KIND_BYTES, cap, 0, 0));
        let (section, _) = queue_section(domain, name, cap + lane_bytes(cap), Some(true), init)?;
        ByteQueue::attach(section)
    }

    /// Opens existing queue `name`.
    pub fn open(domain: &crate::Domain, name: &str) -> Result<ByteQueue> {
        let (section, _) = queue_section(domain, name, 0, None, |_| Ok(()))?;
        ByteQueue::attach(section)
    }

    /// Opens queue `name`, creating it if needed; returns whether this call created it.
    pub fn create_or_open(domain: &crate::Domain, name: &str, capacity: u64) -> Result<(ByteQueue, bool)> {
        let cap = ring_capacity(name, capacity)?;
        let init = |s: &crate::Section| new_header(s).map(|h| h.init(KIND_BYTES, cap, 0, 0));
        let (section, created) = queue_section(domain, name, cap + lane_bytes(cap), Some(false), init)?;
        Ok((ByteQueue::attach(section)?, created))
    }

    fn attach(section: crate::Section) -> Result<ByteQueue> {
        let h = header_of(&section)?;
        let cap = Self::checked(h, section.name(), section.len() as u64 - DATA_OFFSET)?;
        // SAFETY: DATA_OFFSET + cap + lane_bytes(cap) bytes are inside the section (checked by
        // `validate`).
        let data = unsafe { section.as_ptr().add(DATA_OFFSET as usize) };
        Ok(ByteQueue::with_lanes(NonNull::from(h), data, cap, lane_bytes(cap), Some(section)))
    }

    /// The queue over a main ring of `cap` bytes at `data`, followed by a hot lane of
    /// `hot_lane` bytes (0: none).
    fn with_lanes(
        hdr: NonNull<QueueShared>,
        data: *mut u8,
        cap: u64,
        hot_lane: u64,
        section: Option<crate::Section>,
    ) -> ByteQueue {
        let main = Lane { data, cap };
        let lanes = if hot_lane == 0 {
            [main, main]
        } else {
            // SAFETY: the caller's contract: `hot_lane` bytes follow the main ring.
            [Lane { data: unsafe { data.add(cap as usize) }, cap: hot_lane }, main]
        };
        ByteQueue {
            hdr,
            lanes,
            pk: Packing { two: hot_lane != 0 },
            cap,
            hot: hot_window(cap),
            section,
            #[cfg(any(test, loom))]
            _mem: None,
        }
    }

    /// The ring capacity `h` records, once its header is validated as a byte queue's.
    fn checked(h: &QueueShared, name: &str, ring_bytes: u64) -> Result<u64> {
        let (kind, cap, _, _) = h.validate(name, ring_bytes)?;
        if kind != KIND_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("queue {name:?} is a slot queue, not a byte queue"),
            ));
        }
        Ok(cap)
    }

    /// A queue over a header and ring someone else wrote (the fuzz targets): validated as
    /// [`open`](ByteQueue::open) validates a section. In-memory liveness: a token is alive
    /// when it is not 0.
    ///
    /// # Safety
    /// `hdr` must be valid for reads and writes (through atomics) and `data` for `ring_bytes`
    /// bytes of reads and writes, 8-aligned, both for as long as the queue and its handles
    /// live, and touched by nothing else meanwhile but through this queue.
    pub(crate) unsafe fn from_raw(hdr: NonNull<QueueShared>, data: *mut u8, ring_bytes: u64) -> Result<ByteQueue> {
        // SAFETY: valid for reads (the caller's contract); atomics only, any bytes are a value.
        let cap = Self::checked(unsafe { hdr.as_ref() }, "(memory)", ring_bytes)?;
        // `validate` checked `cap + lane_bytes(cap) <= ring_bytes`.
        Ok(ByteQueue::with_lanes(hdr, data, cap, lane_bytes(cap), None))
    }

    /// Writes a fresh header for a ring of `cap` bytes, as [`create`](ByteQueue::create) does
    /// (the fuzz targets' seeds).
    pub(crate) fn init_raw(hdr: &QueueShared, cap: u64) {
        hdr.init(KIND_BYTES, cap, 0, 0);
    }

    /// A queue in process memory (for model checking and property tests), with a hot lane
    /// as a section of that capacity would have.
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn in_memory(capacity: u64) -> ByteQueue {
        let cap = capacity.next_power_of_two().max(64);
        Self::in_memory_lanes(cap, lane_bytes(cap))
    }

    /// A queue in process memory with a main ring of `capacity` bytes and a hot lane of
    /// `hot_lane` bytes (0: none; else a power of two from 64): small lanes for model checks.
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn in_memory_lanes(capacity: u64, hot_lane: u64) -> ByteQueue {
        let cap = capacity.next_power_of_two().max(64);
        assert!(hot_lane == 0 || (hot_lane.is_power_of_two() && (64..=HOT_LANE).contains(&hot_lane)));
        let hdr = Box::new(QueueShared::new());
        hdr.init(KIND_BYTES, cap, 0, 0);
        let mut mem = vec![0u64; ((cap + hot_lane) / 8) as usize];
        let data = mem.as_mut_ptr().cast::<u8>();
        let mut q = ByteQueue::with_lanes(NonNull::from(&*hdr), data, cap, hot_lane, None);
        q._mem = Some((hdr, mem));
        q
    }

    fn h(&self) -> &QueueShared {
        // SAFETY: the header lives in the section (or box) this handle keeps alive.
        unsafe { self.hdr.as_ref() }
    }

    /// The section holding it (None for an in-memory queue).
    pub fn section(&self) -> Option<&crate::Section> {
        self.section.as_ref()
    }

    /// Ring bytes (the ring asked for; a large ring's hot lane comes on top, see "Two lanes").
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Largest message.
    pub fn max_message(&self) -> usize {
        (self.cap / 2 - REC_HEADER) as usize
    }

    /// The queue's name (`"(memory)"` for an in-memory queue).
    pub fn name(&self) -> &str {
        self.section.as_ref().map_or("(memory)", |s| s.name())
    }

    fn token(&self) -> u64 {
        self.section.as_ref().map_or(1, |s| s.domain().peer_token())
    }

    fn alive(&self, token: u64) -> bool {
        match &self.section {
            Some(s) => s.domain().peer_alive(token),
            None => token != 0,
        }
    }

    /// Becomes the queue's sender. Fails with `AlreadyExists` while another live sender is
    /// attached (a dead one's place is taken over).
    pub fn sender(&self) -> Result<ByteSender<'_>> {
        self.sender_with(WaitMode::Blocking)
    }

    /// Like [`sender`](ByteQueue::sender), waiting in `mode` when the ring is full.
    pub fn sender_with(&self, mode: WaitMode) -> Result<ByteSender<'_>> {
        let h = self.h();
        attach_peer(&h.senders, self.token(), 1, &|t| self.alive(t)).ok_or_else(|| {
            Error::new(ErrorKind::AlreadyExists, format!("byte queue {:?} already has a live sender", self.name()))
        })?;
        // Acquire (both): `send.pos` pairs with the Release in a previous sender's
        // `ByteSender::flush` (we continue after its records), `recv.pos` with the Release in
        // `ByteReceiver::publish` (the receiver is done with the bytes before it).
        let (fields, lane) = self.pk.unpack(h.send.pos.load(Ordering::Acquire));
        let (read, _) = self.pk.unpack(h.recv.pos.load(Ordering::Acquire));
        // Written by previous senders only; their stores happen before these loads (see "Ends
        // killed between two stores").
        let found = sent_snapshot(h, self.pk, fields).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "byte queue {:?} is damaged: its write position {fields:#x?} is in neither of its sender's snapshots {:#x?}; delete it and create it again",
                    self.name(),
                    [load_snapshot(&h.send.snap[0]), load_snapshot(&h.send.snap[1])]
                ),
            )
        });
        let checked = found.and_then(|(i, snap)| check_read(self, snap.pos, read).map(|()| (i, snap)));
        let (i, snap) = match checked {
            Ok(found) => found,
            Err(e) => {
                // Release: gives the entry back; pairs with the AcqRel CAS in the next
                // `attach_peer` and the Acquire in `side_gone`, as in `Drop`.
                h.senders.peers[0].token.store(0, Ordering::Release);
                return Err(e);
            }
        };
        let pos = snap.pos;
        let published = pos[0].wrapping_add(pos[1]);
        Ok(ByteSender {
            q: self,
            pos,
            lane,
            published,
            batch: 0,
            cached_read: read,
            sent: snap.count,
            snap: i ^ 1,
            mode,
            since_look: 0,
        })
    }

    /// Becomes the queue's receiver. Fails with `AlreadyExists` while another live receiver is
    /// attached.
    pub fn receiver(&self) -> Result<ByteReceiver<'_>> {
        self.receiver_with(WaitMode::Blocking)
    }

    /// Like [`receiver`](ByteQueue::receiver), waiting in `mode` when the ring is empty.
    pub fn receiver_with(&self, mode: WaitMode) -> Result<ByteReceiver<'_>> {
        let h = self.h();
        attach_peer(&h.receivers, self.token(), 1, &|t| self.alive(t)).ok_or_else(|| {
            Error::new(ErrorKind::AlreadyExists, format!("byte queue {:?} already has a live receiver", self.name()))
        })?;
        self.resume(mode).inspect_err(|_| {
            // Release: gives the entry back; pairs with the AcqRel CAS in the next
            // `attach_peer` and the Acquire in `side_gone`, as in `Drop`.
            h.receivers.peers[0].token.store(0, Ordering::Release);
        })
    }

    /// The receiver of a queue whose receiver entry we now hold: starts where the previous
    /// receiver stopped consuming (see "Readers that die" in the module docs).
    fn resume(&self, mode: WaitMode) -> Result<ByteReceiver<'_>> {
        let h = self.h();
        let pk = self.pk;
        // Acquire: pairs with the Release in the previous receiver's `ByteReceiver::publish` (the
        // bytes before it were read by a receiver that is gone, the sender may reuse them).
        let (published, _) = pk.unpack(h.recv.pos.load(Ordering::Acquire));
        // Written only by previous receivers, all of whose stores happen before these loads
        // (their Release of the token, or the kernel's release of their liveness lock, both
        // observed by `attach_peer`; see "Ends killed between two stores").
        let (i, snap) = consumed_snapshot(h);
        let (pos, lane, received) = (snap.pos, snap.lane, snap.count);
        // Acquire: pairs with the Release in `ByteSender::flush` (the records before it are
        // written).
        let (write, _) = pk.unpack(h.send.pos.load(Ordering::Acquire));
        let mut bad = lane >= pk.lanes() as u64;
        for l in 0..pk.lanes() {
            let cap = self.lanes[l].cap;
            bad |= (pos[l] | published[l] | write[l]) % 8 != 0
                || pk.dist(l, published[l], pos[l]) > cap
                || pk.dist(l, pos[l], write[l]) > cap
                || pk.dist(l, published[l], write[l]) > cap;
        }
        if bad {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "byte queue {:?} is damaged: its positions (given back {published:#x?}, consumed {pos:#x?} in lane {lane}, written {write:#x?}) are not 8-aligned with given back <= consumed <= written <= given back + {} in each of its {} lanes; delete it and create it again",
                    self.name(),
                    self.cap,
                    pk.lanes()
                ),
            ));
        }
        let lane = lane as usize;
        let mut rx = ByteReceiver {
            q: self,
            pos,
            lane,
            committed: pos,
            committed_lane: lane,
            published,
            published_lane: lane,
            cached_write: write,
            received,
            held: 0,
            snap: i ^ 1,
            mode,
        };
        // What the previous receiver consumed but had not given back yet: give it back now,
        // a sender may be waiting for it.
        rx.publish();
        Ok(rx)
    }
}

/// Checks the receiver's positions `read` as the sender at `pos` loads them (on attach, and
/// whenever a lane looks full): 8-aligned, at most a lane behind. The receiver never gives
/// back more than was written, so `pos - read` is at most the lane's capacity in a healthy
/// ring; a damaged one is an error, never a write out of place or a wait for space that
/// never comes.
#[inline]
fn check_read(q: &ByteQueue, pos: [u64; 2], read: [u64; 2]) -> Result<()> {
    for l in 0..q.pk.lanes() {
        if (pos[l] | read[l]) % 8 != 0 || q.pk.dist(l, read[l], pos[l]) > q.lanes[l].cap {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "byte queue {:?} is damaged: in lane {l} the sender is at {:#x} and the receiver has given back up to {:#x}; expected multiples of 8 with given back <= written <= given back + {}; delete it and create it again",
                    q.name(),
                    pos[l],
                    read[l],
                    q.lanes[l].cap
                ),
            ));
        }
    }
    Ok(())
}

/// What one [`Snapshot`] holds.
#[derive(Clone, Copy, Debug)]
struct Snap {
    pos: [u64; 2],
    lane: u64,
    count: u64,
}

/// Stores an end's state in `snaps[*next]`, the snapshot that does not hold its latest, and
/// makes the other one next (see "Ends killed between two stores").
fn store_snapshot(snaps: &[Snapshot; 2], next: &mut usize, two: bool, pos: [u64; 2], lane: usize, count: u64) {
    let s = &snaps[*next];
    // Release (all): no store here becomes visible before an earlier one (the previous
    // snapshot's count before these positions, these positions before this count); pairs with
    // the Acquire loads of `inspect` (a successor is ordered after all of them anyway).
    s.pos[0].store(pos[0], Ordering::Release);
    if two {
        s.pos[1].store(pos[1], Ordering::Release);
        s.lane.store(lane as u64, Ordering::Release);
    }
    s.count.store(count, Ordering::Release);
    *next ^= 1;
}

fn load_snapshot(s: &Snapshot) -> Snap {
    // Acquire (all): pairs with the Release stores of `store_snapshot` (see there).
    Snap {
        pos: [s.pos[0].load(Ordering::Acquire), s.pos[1].load(Ordering::Acquire)],
        lane: s.lane.load(Ordering::Acquire),
        count: s.count.load(Ordering::Acquire),
    }
}

/// `a` is a later count than `b`.
fn later(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

/// The receiver's latest whole snapshot and its index: the one with the higher count. A live
/// receiver (under `inspect`) may store meanwhile: the snapshot is taken only when the counts
/// read before and after it agree, or after a few tries the last one read.
fn consumed_snapshot(h: &QueueShared) -> (usize, Snap) {
    let c = &h.consumed.snap;
    // Acquire: see `load_snapshot`.
    let counts = || [c[0].count.load(Ordering::Acquire), c[1].count.load(Ordering::Acquire)];
    let mut found = (0, load_snapshot(&c[0]));
    for _ in 0..4 {
        let before = counts();
        let i = usize::from(later(before[1], before[0]));
        found = (i, load_snapshot(&c[i]));
        if counts() == before {
            break;
        }
    }
    found
}

/// The sender's snapshot whose positions the published word's `fields` show, and its index
/// (the higher count if both do); `None` when neither does, which a healthy queue never shows
/// a sender taking over.
fn sent_snapshot(h: &QueueShared, pk: Packing, fields: [u64; 2]) -> Option<(usize, Snap)> {
    let mut best: Option<(usize, Snap)> = None;
    for (i, s) in h.send.snap.iter().enumerate() {
        let snap = load_snapshot(s);
        let shows = (0..pk.lanes()).all(|l| pk.dist(l, snap.pos[l], fields[l]) == 0);
        if shows && best.is_none_or(|(_, b)| later(snap.count, b.count)) {
            best = Some((i, snap));
        }
    }
    best
}

/// Messages sent and consumed, for `inspect`: the counts of the ends' latest snapshots (the
/// sender's newer one while it is between a snapshot and its publication).
pub(super) fn counts_of(h: &QueueShared, cap: u64) -> (u64, u64) {
    let pk = Packing { two: lane_bytes(cap) != 0 };
    // Acquire: pairs with the Release in `ByteSender::flush`.
    let (fields, _) = pk.unpack(h.send.pos.load(Ordering::Acquire));
    let sent = sent_snapshot(h, pk, fields).map_or_else(
        || {
            let [a, b] = [load_snapshot(&h.send.snap[0]).count, load_snapshot(&h.send.snap[1]).count];
            if later(a, b) { a } else { b }
        },
        |(_, s)| s.count,
    );
    (sent, consumed_snapshot(h).1.count)
}

/// A byte queue's fill (bytes written and not consumed) from one snapshot of its positions
/// (for inspection), or what was found if they break the invariants of "Positions" in a lane.
pub(super) fn fill_of(h: &QueueShared, cap: u64) -> std::result::Result<u64, String> {
    let pk = Packing { two: lane_bytes(cap) != 0 };
    let caps = [if pk.two { lane_bytes(cap) } else { cap }, cap];
    // Acquire (all): each pairs with its writer's Release, so a later load here sees positions
    // at least as new as the ones the writer had seen: given back first, then consumed, then
    // written, then given back again (each position only grows).
    let (r1, _) = pk.unpack(h.recv.pos.load(Ordering::Acquire));
    let Snap { pos: c, lane, .. } = consumed_snapshot(h).1;
    let (w, _) = pk.unpack(h.send.pos.load(Ordering::Acquire));
    let (r2, _) = pk.unpack(h.recv.pos.load(Ordering::Acquire));
    let mut fill = 0u64;
    let mut ok = lane < pk.lanes() as u64;
    for l in 0..pk.lanes() {
        let to_w = pk.dist(l, r1[l], w[l]);
        // The newer of consumed and given back (a receiver taking over may have given back
        // more than the consumed position we loaded).
        let base = if pk.dist(l, r1[l], r2[l]) > pk.dist(l, r1[l], c[l]) { r2[l] } else { c[l] };
        ok &= (r1[l] | c[l] | w[l]) % 8 == 0
            && pk.dist(l, r1[l], c[l]) <= to_w
            && (pk.dist(l, r1[l], r2[l]) > to_w || pk.dist(l, r2[l], w[l]) <= caps[l]);
        if pk.dist(l, r1[l], base) <= to_w {
            fill = fill.wrapping_add(pk.dist(l, base, w[l]));
        }
    }
    if ok {
        return Ok(fill);
    }
    Err(format!(
        "given back {r1:#x?}, consumed {c:#x?} (lane {lane}), written {w:#x?}; expected multiples of 8 with given back <= consumed <= written <= given back + {cap} in each of {} lanes",
        pk.lanes()
    ))
}

/// The hot window for a ring of `cap` bytes: [`HOT_WINDOW`] for rings of at least four times
/// that, else the whole ring.
fn hot_window(cap: u64) -> u64 {
    if cap >= 4 * HOT_WINDOW { HOT_WINDOW } else { cap }
}

/// How many bytes a receiver reads before it gives them back (it also gives back whenever it
/// has read everything it knows of): a quarter of the hot window, so that a sender filling a
/// large ring learns of the space the receiver gave back before it reaches the cold part.
fn give_back_every(q: &ByteQueue) -> u64 {
    q.hot / 4
}

fn ring_capacity(name: &str, capacity: u64) -> Result<u64> {
    if capacity == 0 || capacity > 1 << 40 {
        return Err(Error::new(
            ErrorKind::InvalidSize,
            format!("queue {name:?}: capacity {capacity} must be from 1 byte to 1 TiB"),
        ));
    }
    Ok(capacity.next_power_of_two().max(4096))
}

/// The sending side of a [`ByteQueue`].
pub struct ByteSender<'q> {
    q: &'q ByteQueue,
    /// Where the next record goes in each lane (full positions).
    pos: [u64; 2],
    /// The lane being written.
    lane: usize,
    /// `pos[0] + pos[1]` when last published.
    published: u64,
    batch: u64,
    /// The receiver's given-back positions as last loaded (fields of its shared word).
    cached_read: [u64; 2],
    sent: u64,
    /// The snapshot the next publication writes (see "Ends killed between two stores").
    snap: usize,
    mode: WaitMode,
    /// Bytes written in the main lane since the receiver's position was last loaded.
    since_look: u64,
}

impl ByteSender<'_> {
    /// The queue's write position after the last message this sender wrote: it grows by each
    /// message's record (8-byte header, payload rounded up to 8, and any wrap padding or
    /// switch record; in a ring with a hot lane it is the sum of both lanes' positions). With
    /// no batching (the default) every message is published when `send` returns, and a
    /// sender that takes over starts at the last published position. A process that records,
    /// next to the queue, the position after each message it sent can tell after a crash
    /// whether its last message went in (the tunnel importer does).
    pub fn position(&self) -> u64 {
        self.pos[0].wrapping_add(self.pos[1])
    }

    /// Messages sent into this queue so far, by this sender and every one before it: those a
    /// sender that takes over after a crash starts from are the published ones, so a producer
    /// that numbers its messages `sent() + 1` can resume its numbering after a crash.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Whether messages are written but not published yet (tests).
    #[cfg(test)]
    fn pending(&self) -> bool {
        self.published != self.position()
    }

    /// Publishes messages only once `bytes` are pending (0, the default, publishes each
    /// message at once). Pending messages are published when the ring is full, on
    /// [`flush`](ByteSender::flush) and when the sender is dropped; the receiver does not see
    /// them before. For streams, where it saves a cache-line transfer per message.
    /// A batch is at most half the ring, and a quarter of the hot window (see the module
    /// docs): a receiver must be able to follow a sender closely for the ring to stay hot.
    pub fn set_batch(&mut self, bytes: u64) {
        self.batch = bytes.min(self.q.cap / 2).min(self.q.hot / 4);
        if self.batch == 0 {
            self.flush();
        }
    }

    /// Publishes every message sent so far.
    pub fn flush(&mut self) {
        let total = self.position();
        if self.published == total {
            return;
        }
        self.published = total;
        let q = self.q;
        let h = q.h();
        // For a successor, first (see "Ends killed between two stores"); on our own line.
        store_snapshot(&h.send.snap, &mut self.snap, q.pk.two, self.pos, self.lane, self.sent);
        // Release: publishes the records (of both lanes, and the lane we are in, at once);
        // pairs with the Acquire in `ByteReceiver::peek` (and in `resume`, and a successor
        // sender's in `sender_with`).
        h.send.pos.store(q.pk.pack(self.pos, self.lane), Ordering::Release);
        wake(&h.events.data_seq, &h.events.data_waiters, 1);
    }

    /// Sends `msg`, waiting while the ring is full. Fails with `Disconnected` when the
    /// receiver is gone, `InvalidSize` for a message over [`ByteQueue::max_message`].
    #[inline]
    pub fn send(&mut self, msg: &[u8]) -> Result<()> {
        if self.put_now(msg) {
            return Ok(());
        }
        self.send_inner(msg, None)
    }

    /// Like [`send`](ByteSender::send), failing with `Timeout` after `timeout`.
    #[inline]
    pub fn send_timeout(&mut self, msg: &[u8], timeout: Duration) -> Result<()> {
        if self.put_now(msg) {
            return Ok(());
        }
        self.send_inner(msg, Some(timeout))
    }

    /// Sends `msg` if there is room now; `WouldBlock` if not.
    #[inline]
    pub fn try_send(&mut self, msg: &[u8]) -> Result<()> {
        if self.put_now(msg) {
            return Ok(());
        }
        self.try_send_slow(msg)
    }

    /// The common case of a send, inlined into the caller (see "Hot paths" in the module docs):
    /// the record fits in lane 0 (a ring with one lane, or the hot lane the sender is in)
    /// before the lane's end, by the cached view of the receiver. Writes it as
    /// [`try_put`](ByteSender::try_put) would in that case and returns `true`; else changes
    /// nothing and returns `false` (the caller takes the general path, which checks and
    /// reports everything).
    #[inline]
    fn put_now(&mut self, msg: &[u8]) -> bool {
        let q = self.q;
        let len = msg.len() as u64;
        let ln = q.lanes[HOT];
        // `len` first: the record's size cannot overflow below half a lane.
        if self.lane != HOT || len >= ln.cap / 2 || len >= SWITCH {
            return false;
        }
        let rec = REC_HEADER + len.next_multiple_of(8);
        let off = self.pos[HOT] & (ln.cap - 1);
        let reserve = if q.pk.two { REC_HEADER } else { 0 };
        // As `room(HOT, rec)` without a wrap; `len <= max_message` (a lane 0 record of at most
        // half the lane is at most half the ring).
        if rec > ln.cap - off
            || rec > ln.cap / 2
            || q.pk.dist(HOT, self.cached_read[HOT], self.pos[HOT]) + rec + reserve > ln.cap
        {
            return false;
        }
        // SAFETY: as in `try_put`: the record's `rec` bytes from `off` are inside the lane (it
        // fits before the end) and free by the receiver's position (checked when loaded, and
        // just above); the receiver reads them only after the Release store in `flush`.
        unsafe {
            let p = ln.data.add(off as usize);
            p.cast::<u64>().write(len);
            std::ptr::copy_nonoverlapping(msg.as_ptr(), p.add(REC_HEADER as usize), msg.len());
        }
        self.pos[HOT] = self.pos[HOT].wrapping_add(rec);
        self.sent = self.sent.wrapping_add(1);
        if self.position().wrapping_sub(self.published) >= self.batch {
            self.flush();
        }
        true
    }

    fn try_send_slow(&mut self, msg: &[u8]) -> Result<()> {
        self.check_size(msg.len())?;
        if self.try_put(msg, true)? {
            return Ok(());
        }
        if self.receiver_gone(true) {
            return Err(self.disconnected());
        }
        Err(Error::new(ErrorKind::WouldBlock, format!("byte queue {:?} is full", self.q.name())))
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len > self.q.max_message() {
            return Err(Error::new(
                ErrorKind::InvalidSize,
                format!(
                    "a {len}-byte message does not fit byte queue {:?}: at most {} bytes (half its ring)",
                    self.q.name(),
                    self.q.max_message()
                ),
            ));
        }
        Ok(())
    }

    fn send_inner(&mut self, msg: &[u8], timeout: Option<Duration>) -> Result<()> {
        self.check_size(msg.len())?;
        if self.try_put(msg, false)? {
            return Ok(());
        }
        let h = self.q.h();
        let mode = self.mode;
        // Overflow into the main lane only once the receiver has made no progress at all for
        // a while (see "Two lanes"): a receiver that is slower than us but running gives
        // space back every quarter window.
        let (mut seen, mut since) = (self.cached_read, Instant::now());
        wait_until(&h.events.space_seq, &h.events.space_waiters, mode, timeout, |thorough| {
            if self.cached_read != seen {
                (seen, since) = (self.cached_read, Instant::now());
            }
            if self.try_put(msg, overflow_due(since, thorough))? {
                return Ok(Some(()));
            }
            if self.receiver_gone(thorough) {
                return Err(self.disconnected());
            }
            Ok(None)
        })
    }

    fn receiver_gone(&self, thorough: bool) -> bool {
        side_gone(&self.q.h().receivers, thorough, &|t| self.q.alive(t))
    }

    fn disconnected(&self) -> Error {
        Error::new(ErrorKind::Disconnected, format!("byte queue {:?}: the receiver is gone", self.q.name()))
    }

    /// Loads the receiver's position (Acquire: pairs with the Release in
    /// `ByteReceiver::publish`: the receiver is done with the bytes it gave back, which we may
    /// now overwrite) and checks it.
    fn refresh(&mut self) -> Result<()> {
        let q = self.q;
        let (read, _) = q.pk.unpack(q.h().recv.pos.load(Ordering::Acquire));
        check_read(q, self.pos, read)?;
        self.cached_read = read;
        self.since_look = 0;
        Ok(())
    }

    /// Bytes a record of `rec` bytes takes in lane `l` at our position (with the padding
    /// before a wrap), if it fits there by our cached view of the receiver: leaving room for
    /// a switch record in a ring with two lanes; at most half the lane.
    fn room(&self, l: usize, rec: u64) -> Option<u64> {
        let q = self.q;
        let cap = q.lanes[l].cap;
        let off = self.pos[l] & (cap - 1);
        let to_end = cap - off;
        let need = if rec <= to_end { rec } else { to_end + rec };
        let reserve = if q.pk.two { REC_HEADER } else { 0 };
        // `pos - cached_read <= cap` (checked when loaded) and `need <= cap`.
        (rec <= cap / 2 && q.pk.dist(l, self.cached_read[l], self.pos[l]) + need + reserve <= cap).then_some(need)
    }

    /// Whether the hot lane is nearly empty (by our cached view): the receiver has caught up
    /// with it, so the sender goes back to it.
    fn hot_drained(&self) -> bool {
        self.q.pk.dist(HOT, self.cached_read[HOT], self.pos[HOT]) <= self.q.lanes[HOT].cap / 4
    }

    /// The lane a record of `rec` bytes goes to now, if any (see "Two lanes"); `overflow`
    /// lets a record leave a full hot lane for the main lane.
    fn choose(&mut self, rec: u64, overflow: bool) -> Result<Option<usize>> {
        if !self.q.pk.two {
            if self.room(0, rec).is_none() {
                self.refresh()?;
            }
            return Ok(self.room(0, rec).map(|_| 0));
        }
        if self.lane == HOT {
            if self.room(HOT, rec).is_some() {
                return Ok(Some(HOT));
            }
            self.refresh()?;
            if self.room(HOT, rec).is_some() {
                return Ok(Some(HOT));
            }
            let main = overflow || rec > self.q.lanes[HOT].cap / 2;
            return Ok((main && self.room(MAIN, rec).is_some()).then_some(MAIN));
        }
        if self.since_look >= LOOK_EVERY {
            self.refresh()?;
        }
        for look in [false, true] {
            if look {
                self.refresh()?;
            }
            if self.hot_drained() && self.room(HOT, rec).is_some() {
                return Ok(Some(HOT));
            }
            if self.room(MAIN, rec).is_some() {
                return Ok(Some(MAIN));
            }
        }
        Ok(None)
    }

    /// Writes the record if it fits (`true`); publishes it and wakes the receiver. A damaged
    /// receiver position (checked whenever it is loaded) is an error.
    fn try_put(&mut self, msg: &[u8], overflow: bool) -> Result<bool> {
        let q = self.q;
        let rec = REC_HEADER + (msg.len() as u64).next_multiple_of(8);
        let Some(lane) = self.choose(rec, overflow)? else {
            // Full: the receiver must see what is pending before we wait for it.
            self.flush();
            return Ok(false);
        };
        if lane != self.lane {
            // Leave the current lane with a switch record, in the room every lane keeps for
            // it (`room`), unless the receiver's position is damaged.
            let (l, cap) = (self.lane, q.lanes[self.lane].cap);
            if q.pk.dist(l, self.cached_read[l], self.pos[l]) + REC_HEADER > cap {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("byte queue {:?} is damaged: no room left for a switch record in lane {l}", q.name()),
                ));
            }
            let off = self.pos[l] & (cap - 1);
            // SAFETY: `off` is 8-aligned and below the lane's capacity: room for the record, in
            // the lane, which the receiver does not read until we publish.
            unsafe { q.lanes[l].data.add(off as usize).cast::<u64>().write(SWITCH) };
            self.pos[l] = self.pos[l].wrapping_add(REC_HEADER);
            self.lane = lane;
        }
        let ln = q.lanes[lane];
        // `self.pos` is 8-aligned: checked on attach, and records are multiples of 8.
        let off = self.pos[lane] & (ln.cap - 1);
        let to_end = ln.cap - off;
        let mut at = off;
        if rec > to_end {
            // SAFETY: `off` is 8-aligned and below the capacity: room for the marker, in the
            // lane, which the receiver does not read until we publish.
            unsafe { ln.data.add(off as usize).cast::<u64>().write(WRAP as u64) };
            self.pos[lane] = self.pos[lane].wrapping_add(to_end);
            if lane == MAIN {
                self.since_look += to_end;
            }
            at = 0;
        }
        // SAFETY: the record's `rec` bytes from `at` are inside the lane (it fits before the
        // end) and free (checked against the receiver's position in `choose`); the receiver
        // reads them only after the Release store of the position in `flush`.
        unsafe {
            let p = ln.data.add(at as usize);
            p.cast::<u64>().write(msg.len() as u64);
            std::ptr::copy_nonoverlapping(msg.as_ptr(), p.add(REC_HEADER as usize), msg.len());
        }
        self.pos[lane] = self.pos[lane].wrapping_add(rec);
        if q.pk.two && lane == MAIN {
            self.since_look += rec;
        }
        // (Counts wrap too: they start from shared words.)
        self.sent = self.sent.wrapping_add(1);
        if self.position().wrapping_sub(self.published) >= self.batch {
            self.flush();
        }
        Ok(true)
    }
}

/// Whether a sender waiting for room in the hot lane may overflow into the main lane: the
/// receiver has given nothing back since `since`, for [`OVERFLOW_AFTER`].
#[cfg(not(loom))]
fn overflow_due(since: Instant, _thorough: bool) -> bool {
    since.elapsed() >= OVERFLOW_AFTER
}

/// Under loom (no time): when the waiter is about to sleep.
#[cfg(loom)]
fn overflow_due(_since: Instant, thorough: bool) -> bool {
    thorough
}

impl ByteSender<'_> {
    /// Stops being the sender as a killed process would (nothing pending is published), then
    /// marks its entry dead (in-memory queues have no liveness locks). For model checks.
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn __die(self) {
        let h = self.q.h();
        std::mem::forget(self);
        // Relaxed: the callers order the successor after this themselves (same thread, or a
        // join), as the kernel does for a real death.
        h.senders.peers[0].token.store(0, Ordering::Relaxed);
    }
}

impl Drop for ByteSender<'_> {
    fn drop(&mut self) {
        self.flush();
        let h = self.q.h();
        // Release: after our last message; pairs with the Acquire in `side_gone` (a receiver
        // that sees us gone sees our last `flush`) and the AcqRel CAS in `attach_peer`.
        h.senders.peers[0].token.store(0, Ordering::Release);
        // The receiver may be asleep waiting for us: tell it we left.
        wake(&h.events.data_seq, &h.events.data_waiters, u32::MAX);
    }
}

/// A message read in place from a [`ByteQueue`]. Dropping it *consumes* the message: its bytes
/// go back to the ring, and no receiver will see it again, even one that takes over after this
/// receiver dies. A receiver killed while it holds a `Message` has not consumed it: the next
/// receiver gets that message first. (`std::mem::forget` leaves it unconsumed too: the next
/// receive returns it again.)
pub struct Message<'r, 'q> {
    rx: &'r mut ByteReceiver<'q>,
    start: u64,
    len: usize,
    next: u64,
}

impl std::ops::Deref for Message<'_, '_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let data = self.rx.q.lanes[self.rx.lane].data;
        // SAFETY: the record at `start` in the receiver's lane (the message's: `peek` moved the
        // receiver to it) was published by the sender (Acquire in `peek`) and validated to lie
        // inside the lane; the sender does not reuse it until `recv.pos` is published past
        // it: by us only in `drop`, by a successor only once our receiver is gone, which this
        // borrow of it rules out while we live.
        unsafe { std::slice::from_raw_parts(data.add(self.start as usize), self.len) }
    }
}

impl Message<'_, '_> {
    /// Moves the receiver past this message without consuming it (see "Reading ahead" in the
    /// module docs): the next receive returns the following message, while this one's bytes
    /// stay in the ring and a receiver taking over after this one dies receives it again.
    /// Consume it later with [`ByteReceiver::commit`] and the returned mark.
    pub fn keep(self) -> Kept {
        let next = self.next;
        let rx = &mut *self.rx;
        rx.pos[rx.lane] = next;
        rx.held += 1;
        let kept = Kept { pos: rx.pos, lane: rx.lane, count: rx.received.wrapping_add(rx.held) };
        std::mem::forget(self);
        kept
    }
}

impl Drop for Message<'_, '_> {
    fn drop(&mut self) {
        self.rx.release(self.next);
    }
}

/// A message kept unconsumed by [`Message::keep`], to consume later with
/// [`ByteReceiver::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pos: [u64; 2],
    lane: usize,
    count: u64,
}

impl Kept {
    /// The message's number in the queue's history: 1 for the first message ever sent, and
    /// so on. It stays the same when a receiver that takes over receives it again, so it
    /// serves as a sequence number.
    pub fn seq(&self) -> u64 {
        self.count
    }
}

/// The receiving side of a [`ByteQueue`].
pub struct ByteReceiver<'q> {
    q: &'q ByteQueue,
    /// Where the next message is read, in each lane, and the lane it is read from.
    pos: [u64; 2],
    lane: usize,
    /// The end of the last consumed message: `pos`/`lane` unless messages are kept.
    committed: [u64; 2],
    committed_lane: usize,
    /// The positions last published, and the lane we were in then; consumed space is given
    /// back in batches.
    published: [u64; 2],
    published_lane: usize,
    /// The sender's positions as last loaded (fields of its shared word).
    cached_write: [u64; 2],
    /// Messages consumed (the queue's history, predecessors included).
    received: u64,
    /// Messages kept (read but not consumed) after `committed`.
    held: u64,
    /// The `consumed` snapshot the next message writes.
    snap: usize,
    mode: WaitMode,
}

impl<'q> ByteReceiver<'q> {
    /// Messages consumed from this queue so far, by this receiver and every one before it;
    /// the [`Kept::seq`] of the next message received is at least one more.
    pub fn consumed(&self) -> u64 {
        self.received
    }

    /// Consumes every kept message up to and including `kept` (see "Reading ahead" in the
    /// module docs). Fails with `InvalidArgument` for a mark that is not one of this
    /// receiver's kept, not yet committed messages.
    pub fn commit(&mut self, kept: Kept) -> Result<()> {
        let n = kept.count.wrapping_sub(self.received);
        let mut ahead = 0;
        let mut within = kept.lane < self.q.pk.lanes();
        for l in 0..self.q.pk.lanes() {
            let a = kept.pos[l].wrapping_sub(self.committed[l]);
            within &= a <= self.pos[l].wrapping_sub(self.committed[l]);
            ahead |= a;
        }
        if n == 0 || n > self.held || ahead == 0 || !within {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "byte queue {:?}: message {} is not kept by this receiver (consumed {}, kept {}); commit only marks returned by Message::keep, once each, in order",
                    self.q.name(),
                    kept.count,
                    self.received,
                    self.held
                ),
            ));
        }
        self.held -= n;
        self.received = kept.count;
        self.committed = kept.pos;
        self.committed_lane = kept.lane;
        self.store_consumed();
        let caught_up = self.committed == self.pos && self.committed_lane == self.lane;
        if self.progress() >= self.q.cap / 4 || caught_up {
            self.publish();
        }
        Ok(())
    }

    /// Receives the next message, in place: no copy. Waits while the queue is empty; fails with
    /// `Disconnected` once it is empty and the sender is gone.
    ///
    /// The message is consumed when the returned [`Message`] is dropped. If this process dies
    /// before that, the receiver that takes over receives it again (and nothing that was
    /// consumed); see "Readers that die" in the module docs.
    pub fn recv(&mut self) -> Result<Message<'_, 'q>> {
        self.recv_inner(None)
    }

    /// Like [`recv`](ByteReceiver::recv), failing with `Timeout` after `timeout`. The message
    /// is consumed when the [`Message`] is dropped, as with `recv`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Message<'_, 'q>> {
        self.recv_inner(Some(timeout))
    }

    /// The next message if there is one now; `WouldBlock` if not. The message is consumed when
    /// the [`Message`] is dropped, as with [`recv`](ByteReceiver::recv).
    pub fn try_recv(&mut self) -> Result<Message<'_, 'q>> {
        match self.peek()? {
            Some((start, len, next)) => Ok(Message { rx: self, start, len, next }),
            None if self.sender_gone(true) => {
                // A message may have been published just before the sender left.
                match self.peek()? {
                    Some((start, len, next)) => Ok(Message { rx: self, start, len, next }),
                    None => Err(self.disconnected()),
                }
            }
            None => Err(Error::new(ErrorKind::WouldBlock, format!("byte queue {:?} is empty", self.q.name()))),
        }
    }

    /// Receives the next message into `buf`, returning its length. Fails with `InvalidSize`
    /// (leaving the message queued) when `buf` is too small.
    ///
    /// The message is consumed once it is copied, just before this returns: a receiver that
    /// takes over after this process dies never receives it again. A process killed inside
    /// this call, after the copy, loses that one message; use [`recv`](ByteReceiver::recv)
    /// and drop the [`Message`] when done with it to have it redelivered instead.
    pub fn recv_into(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> Result<usize> {
        // The record straight from `peek`, without a `Message` (same steps as receiving one,
        // copying it and dropping it).
        let (start, len, next) = match self.peek_now() {
            Some(r) => r,
            None => {
                let m = self.recv_inner(timeout)?;
                let r = (m.start, m.len, m.next);
                std::mem::forget(m);
                r
            }
        };
        if len > buf.len() {
            return Err(Error::new(
                ErrorKind::InvalidSize,
                format!("the next message has {len} bytes, more than the {}-byte buffer; it stays queued", buf.len()),
            ));
        }
        let data = self.q.lanes[self.lane].data;
        // SAFETY: as in `Message::deref`: the record at `start` in the receiver's lane (`peek`
        // moved the receiver to it) was published and validated to lie inside the lane; the
        // sender does not reuse it before `release` below gives it back. `buf` holds `len`
        // bytes (checked) and is not in the ring (we borrow it mutably, the ring only shared).
        unsafe { std::ptr::copy_nonoverlapping(data.add(start as usize), buf.as_mut_ptr(), len) };
        self.release(next);
        Ok(len)
    }

    fn recv_inner(&mut self, timeout: Option<Duration>) -> Result<Message<'_, 'q>> {
        if let Some((start, len, next)) = self.peek_now() {
            return Ok(Message { rx: self, start, len, next });
        }
        if let Some((start, len, next)) = self.peek()? {
            return Ok(Message { rx: self, start, len, next });
        }
        let h = self.q.h();
        let mode = self.mode;
        let (start, len, next) = wait_until(&h.events.data_seq, &h.events.data_waiters, mode, timeout, |thorough| {
            if let Some(m) = self.peek()? {
                return Ok(Some(m));
            }
            if self.sender_gone(thorough) {
                return match self.peek()? {
                    Some(m) => Ok(Some(m)),
                    None => Err(self.disconnected()),
                };
            }
            Ok(None)
        })?;
        Ok(Message { rx: self, start, len, next })
    }

    fn sender_gone(&self, thorough: bool) -> bool {
        side_gone(&self.q.h().senders, thorough, &|t| self.q.alive(t))
    }

    fn disconnected(&self) -> Error {
        Error::new(ErrorKind::Disconnected, format!("byte queue {:?}: the sender is gone", self.q.name()))
    }

    /// The common case of [`peek`](ByteReceiver::peek), inlined into the caller (see "Hot
    /// paths" in the module docs): the next item in the receiver's lane is a published
    /// message record (not a wrap marker or a switch record) that passes `peek`'s checks.
    /// Then the same result as `peek`; else `None`, having changed nothing but the cached
    /// copy of the sender's position (the caller then takes `peek`, which decides and
    /// reports).
    #[inline]
    fn peek_now(&mut self) -> Option<(u64, usize, u64)> {
        let q = self.q;
        let pk = q.pk;
        let l = self.lane;
        let ln = q.lanes[l];
        let mut avail = pk.dist(l, self.pos[l], self.cached_write[l]);
        if avail == 0 {
            // Acquire: as in `peek`.
            self.cached_write = pk.unpack(q.h().send.pos.load(Ordering::Acquire)).0;
            avail = pk.dist(l, self.pos[l], self.cached_write[l]);
        }
        if avail == 0 || avail > ln.cap || avail % 8 != 0 {
            return None;
        }
        let off = self.pos[l] & (ln.cap - 1);
        // SAFETY: as in `peek`: `off` is 8-aligned and `off + 8 <= cap`; the word was published.
        let len = unsafe { ln.data.add(off as usize).cast::<u64>().read() };
        // A wrap marker or a switch record (left to `peek`), or no record at all.
        if len >= SWITCH || len > ln.cap / 2 {
            return None;
        }
        let rec = REC_HEADER + len.next_multiple_of(8);
        if off + rec > ln.cap || rec > avail {
            return None;
        }
        Some((off + REC_HEADER, len as usize, self.pos[l].wrapping_add(rec)))
    }

    /// The next record, if published: (payload offset in the receiver's lane, length,
    /// position after it in that lane). Skips a wrap marker, and follows a switch record to
    /// the other lane (moving the receiver there: nothing is consumed by that). Validates
    /// what it reads: a damaged ring is an error, never a wild read.
    fn peek(&mut self) -> Result<Option<(u64, usize, u64)>> {
        let q = self.q;
        let pk = q.pk;
        loop {
            let l = self.lane;
            let ln = q.lanes[l];
            if pk.dist(l, self.pos[l], self.cached_write[l]) == 0 {
                // Acquire: pairs with the Release in `ByteSender::flush` (the records are
                // written).
                self.cached_write = pk.unpack(q.h().send.pos.load(Ordering::Acquire)).0;
                if pk.dist(l, self.pos[l], self.cached_write[l]) == 0 {
                    return Ok(None);
                }
            }
            let avail = pk.dist(l, self.pos[l], self.cached_write[l]);
            if avail > ln.cap || avail % 8 != 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "byte queue {:?} is damaged: the sender's position {:#x} in lane {l} is not a multiple of 8 at most {} bytes ahead of the receiver's {:#x}; delete it and create it again",
                        q.name(),
                        self.cached_write[l],
                        ln.cap,
                        self.pos[l]
                    ),
                ));
            }
            // `self.pos` is 8-aligned (checked on attach, records are multiples of 8), so `off`
            // is too, and below the capacity: the 8 bytes at `off` are inside the lane.
            let mut skip = 0;
            let mut off = self.pos[l] & (ln.cap - 1);
            // SAFETY: `off` is 8-aligned and `off + 8 <= cap` (above); the word was published
            // (Acquire above).
            let mut head = unsafe { ln.data.add(off as usize).cast::<u64>().read() };
            if head == SWITCH && pk.two {
                // `avail >= 8`: the switch record was published. The other lane's records
                // after it were published with it (one store of both positions).
                self.pos[l] = self.pos[l].wrapping_add(REC_HEADER);
                self.lane = 1 - l;
                continue;
            }
            if head == WRAP as u64 {
                skip = ln.cap - off;
                off = 0;
                // SAFETY: as above, at offset 0.
                head = unsafe { ln.data.cast::<u64>().read() };
            }
            let len = head;
            // `len <= cap / 2` is checked before `rec` is trusted; `wrapping_add` keeps a huge
            // `len` from overflowing first.
            let rec = REC_HEADER.wrapping_add(len.wrapping_add(7) & !7);
            if len > ln.cap / 2 || off + rec > ln.cap || skip + rec > avail {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "byte queue {:?} is damaged: a record of {len} bytes at offset {off:#x} of lane {l} with {avail} bytes published",
                        q.name()
                    ),
                ));
            }
            return Ok(Some((off + REC_HEADER, len as usize, self.pos[l].wrapping_add(skip + rec))));
        }
    }

    /// Bytes consumed and not given back yet (all lanes).
    fn progress(&self) -> u64 {
        let pk = self.q.pk;
        (0..pk.lanes()).fold(0u64, |s, l| s.wrapping_add(pk.dist(l, self.published[l], self.committed[l])))
    }

    /// Done with the message ending at `next` (in the receiver's lane): it is consumed at once
    /// (for a successor, see the module docs). The space goes back to the sender in batches (a
    /// quarter of the hot window), at once whenever we have read everything we know of, so a
    /// sender never waits for space while the ring is, for us, empty, and when we have moved
    /// to the other lane (so the sender learns that the lane we left is empty).
    fn release(&mut self, next: u64) {
        let l = self.lane;
        self.pos[l] = next;
        self.committed = self.pos;
        self.committed_lane = l;
        // This message and every kept one before it.
        self.received = self.received.wrapping_add(1 + self.held);
        self.held = 0;
        self.store_consumed();
        let caught_up = self.q.pk.dist(l, next, self.cached_write[l]) == 0;
        if caught_up || self.lane != self.published_lane || self.progress() >= give_back_every(self.q) {
            self.publish();
        }
    }

    /// Read by nobody while we live but `inspect`; the sender never reads it, so the line
    /// stays in our cache (see "Readers that die" and "Ends killed between two stores").
    fn store_consumed(&mut self) {
        let q = self.q;
        store_snapshot(
            &q.h().consumed.snap,
            &mut self.snap,
            q.pk.two,
            self.committed,
            self.committed_lane,
            self.received,
        );
    }

    /// Gives back the space of every consumed message (up to `committed`, never a kept one).
    fn publish(&mut self) {
        self.published_lane = self.committed_lane;
        if self.published == self.committed {
            return;
        }
        self.published = self.committed;
        let h = self.q.h();
        // Release: we are done reading the bytes we give back; pairs with the Acquire in
        // `ByteSender::refresh` (and `sender_with`, and a successor receiver's `resume`).
        h.recv.pos.store(self.q.pk.pack(self.committed, 0), Ordering::Release);
        wake(&h.events.space_seq, &h.events.space_waiters, 1);
    }
}

impl ByteReceiver<'_> {
    /// Stops being the receiver as a killed process would, without publishing or clearing
    /// anything, then marks its entry dead (a token of 0: in-memory queues have no liveness
    /// locks). For model checks and property tests of the takeover.
    #[cfg(any(test, loom))]
    #[doc(hidden)]
    pub fn __die(self) {
        let h = self.q.h();
        std::mem::forget(self);
        // Relaxed: the callers order the successor after this themselves (same thread, or a
        // join), as the kernel does for a real death.
        h.receivers.peers[0].token.store(0, Ordering::Relaxed);
    }
}

impl Drop for ByteReceiver<'_> {
    fn drop(&mut self) {
        self.publish();
        let h = self.q.h();
        // Release: after our last `publish` and `consumed` stores; pairs with the AcqRel CAS in
        // a successor's `attach_peer` (see "Readers that die") and the Acquire in `side_gone`.
        h.receivers.peers[0].token.store(0, Ordering::Release);
        wake(&h.events.space_seq, &h.events.space_waiters, u32::MAX);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Op {
        Send(usize),
        Recv,
        /// The receiver dies (holding a message it received, if `true`) and a new one takes
        /// over.
        Die(bool),
    }

    /// Operations of a batching sender that may be killed (and replaced), against one
    /// receiver.
    #[derive(Debug, Clone)]
    enum SenderOp {
        Send(usize),
        Recv,
        Batch(u64),
        Flush,
        /// The sender is killed (as `kill -9` would: no flush, no token cleared by it) and a
        /// new one takes over.
        Die,
    }

    fn sender_op() -> impl Strategy<Value = SenderOp> {
        prop_oneof![
            8 => (0usize..200).prop_map(SenderOp::Send),
            8 => Just(SenderOp::Recv),
            1 => (0u64..600).prop_map(SenderOp::Batch),
            1 => Just(SenderOp::Flush),
            1 => Just(SenderOp::Die),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..200).prop_map(Op::Send),
            8 => Just(Op::Recv),
            1 => any::<bool>().prop_map(Op::Die),
        ]
    }

    #[test]
    fn kept_messages_hold_their_space_until_committed_and_a_successor_receives_them_again() {
        let q = ByteQueue::in_memory(4096);
        let mut tx = q.sender().unwrap();
        // 8 records of 512 bytes fill the ring.
        for i in 0..8u8 {
            tx.send(&[i; 504]).unwrap();
        }
        let mut rx = q.receiver().unwrap();
        assert_eq!(rx.consumed(), 0);
        let mut kept = Vec::new();
        for i in 0..8u8 {
            let m = rx.try_recv().unwrap();
            assert_eq!(m[0], i, "read ahead in order");
            kept.push(m.keep());
        }
        assert_eq!(kept.iter().map(Kept::seq).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
        assert_eq!(rx.try_recv().err().unwrap().kind(), ErrorKind::WouldBlock);
        assert_eq!(
            tx.try_send(&[9; 504]).err().unwrap().kind(),
            ErrorKind::WouldBlock,
            "kept bytes are not given back"
        );
        rx.commit(kept[7]).unwrap();
        assert!(rx.commit(kept[7]).is_err(), "a mark commits once");
        let mut rx = {
            // Commit the first three only, then die: the successor starts at message 4.
            let q2 = ByteQueue::in_memory(4096);
            let mut tx2 = q2.sender().unwrap();
            for i in 0..6u8 {
                tx2.send(&[i; 100]).unwrap();
            }
            drop(tx2);
            let mut rx2 = q2.receiver().unwrap();
            let marks: Vec<Kept> = (0..5).map(|_| rx2.try_recv().unwrap().keep()).collect();
            rx2.commit(marks[2]).unwrap();
            assert_eq!(rx2.consumed(), 3);
            rx2.__die();
            let mut rx3 = q2.receiver().unwrap();
            assert_eq!(rx3.consumed(), 3);
            let m = rx3.try_recv().unwrap();
            assert_eq!(m[0], 3, "the first kept, uncommitted message comes again");
            drop(m);
            assert_eq!(rx3.consumed(), 4);
            drop(rx3);
            rx
        };
        // Everything was committed: the sender has the whole ring again.
        for i in 0..8u8 {
            tx.try_send(&[i; 504]).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap()[0], 0);
    }

    /// The receiver's latest `consumed` snapshot.
    fn consumed_now(q: &ByteQueue) -> &Snapshot {
        &q.h().consumed.snap[consumed_snapshot(q.h()).0]
    }

    #[test]
    fn a_damaged_consumed_position_is_reported_and_frees_the_receiver_entry() {
        let q = ByteQueue::in_memory(4096);
        let mut tx = q.sender().unwrap();
        for _ in 0..10 {
            tx.send(&[5; 20]).unwrap();
        }
        let rx = q.receiver().unwrap();
        rx.__die();
        let c = consumed_now(&q);
        for bad in [4, 8 * 1000, u64::MAX - 7] {
            c.pos[0].store(bad, Ordering::Relaxed);
            let err = q.receiver().err().expect("a damaged position is refused");
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
            assert!(err.to_string().contains("consumed"), "{err}");
        }
        // The refused attach left the entry free: once repaired, a receiver attaches.
        c.pos[0].store(32, Ordering::Relaxed);
        let mut rx = q.receiver().unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), &[5; 20], "starts after the first (consumed) message");
    }

    #[test]
    fn damaged_send_and_receive_positions_are_reported_by_both_sides() {
        let q = ByteQueue::in_memory(4096);
        {
            let mut tx = q.sender().unwrap();
            tx.send(&[1; 16]).unwrap();
        }
        let h = q.h();
        // An unaligned write position just before the end of the ring: a sender taking it
        // would write its wrap marker past the ring; a receiver would read past it.
        h.send.pos.store(4096 - 4, Ordering::Relaxed);
        let err = q.sender().err().expect("an unaligned send position is refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let err = q.receiver().err().expect("an unaligned send position is refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        // Damage while both sides are attached is found where each side loads the other's
        // position: the receiver when it looks for data, the sender when the ring looks full.
        h.send.pos.store(24, Ordering::Relaxed);
        let mut rx = q.receiver().unwrap();
        let mut tx = q.sender().unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), &[1; 16]);
        h.send.pos.store(24 + 8 * 1000, Ordering::Relaxed);
        let err = rx.try_recv().err().expect("a position a ring ahead is refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        h.recv.pos.store(1 << 40, Ordering::Relaxed);
        while let Ok(()) = tx.try_send(&[2; 100]) {}
        let err = tx.try_send(&[2; 100]).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let err = tx.send_timeout(&[2; 100], Duration::from_secs(60)).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "a damaged position is no reason to wait: {err}");
        let info = crate::queue::inspect_header(h, "(memory)", 4096, &|t| (t as u32, true));
        assert_eq!(info.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_successor_gets_the_message_in_hand_and_none_consumed_and_the_space_back() {
        let q = ByteQueue::in_memory(4096);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        let mut i = 0u8;
        // Fill the ring, consume a few (less than the quarter-ring batch), hold one, die.
        while tx.try_send(&[i; 24]).is_ok() {
            i += 1;
        }
        for want in 0..5u8 {
            assert_eq!(&*rx.try_recv().unwrap(), &[want; 24]);
        }
        assert!(tx.try_send(&[i; 24]).is_err(), "space not given back yet: the batch is not full");
        std::mem::forget(rx.try_recv().unwrap());
        rx.__die();
        let mut rx = q.receiver().unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), &[5; 24], "the message in hand comes again, first");
        tx.try_send(&[i; 24]).expect("the successor gave back what its predecessor consumed");
        for want in 6..=i {
            assert_eq!(&*rx.try_recv().unwrap(), &[want; 24]);
        }
    }

    #[test]
    fn a_large_rings_receiver_follows_within_the_hot_window() {
        let q = ByteQueue::in_memory(4 << 20);
        assert_eq!(q.hot, HOT_WINDOW);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        // A batch of the whole ring asked for: capped, so the receiver sees messages soon.
        tx.set_batch(q.cap);
        let msg = [3u8; 1000];
        let mut sent = 0;
        while rx.try_recv().is_err() {
            tx.send(&msg).unwrap();
            sent += 1;
        }
        assert!(sent * 1008 <= HOT_WINDOW / 4 + 1008, "{sent} messages before the first was published");
        // The receiver gives space back every quarter window although it never catches up.
        for _ in 0..HOT_WINDOW / 1008 {
            tx.send(&msg).unwrap();
        }
        tx.flush();
        let before = q.h().recv.pos.load(Ordering::Relaxed);
        for _ in 0..(HOT_WINDOW / 4) / 1008 + 1 {
            drop(rx.try_recv().unwrap());
        }
        assert!(q.h().recv.pos.load(Ordering::Relaxed) > before, "space given back within a quarter window");
    }

    #[test]
    fn with_a_stalled_receiver_the_sender_fills_the_whole_ring_past_the_window() {
        let q = ByteQueue::in_memory(1 << 20);
        assert_eq!(q.hot, HOT_WINDOW);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        // Keep up for a while, then stall.
        for i in 0..2000u32 {
            tx.send(&i.to_le_bytes()).unwrap();
            assert_eq!(&*rx.try_recv().unwrap(), &i.to_le_bytes());
        }
        let mut n = 0u32;
        while tx.try_send(&[n as u8; 1016]).is_ok() {
            n += 1;
        }
        assert_eq!(tx.try_send(&[0; 1016]).err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
        // 1024-byte records: all of the ring but the one a wrap may have cut short.
        assert!(u64::from(n) * 1024 >= q.cap - 1024, "{n} records filled a {}-byte ring", q.cap);
        for i in 0..n {
            assert_eq!(&*rx.try_recv().unwrap(), &[i as u8; 1016], "message {i} of {n}");
        }
        assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
    }

    #[test]
    fn batched_messages_appear_on_flush_when_full_and_when_the_sender_leaves() {
        let q = ByteQueue::in_memory(4096);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        tx.set_batch(1024);
        for i in 0..3u8 {
            tx.send(&[i; 10]).unwrap();
        }
        assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::WouldBlock), "not published yet");
        tx.flush();
        for i in 0..3u8 {
            assert_eq!(&*rx.try_recv().unwrap(), &[i; 10]);
        }
        // Reaching the batch publishes.
        for _ in 0..20 {
            tx.send(&[7; 56]).unwrap();
        }
        assert!(rx.try_recv().is_ok(), "1024 bytes pending were published");
        // A full ring publishes what is pending before refusing.
        while tx.try_send(&[9; 100]).is_ok() {}
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert!(n > 30, "everything written was visible once the ring filled: {n}");
        tx.send(&[1]).unwrap();
        drop(tx);
        assert_eq!(&*rx.try_recv().unwrap(), &[1], "dropping the sender publishes");
        assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
    }

    #[test]
    fn a_large_ring_cycles_in_its_hot_lane_while_the_receiver_keeps_up_and_returns_there_after_a_burst() {
        let q = ByteQueue::in_memory(4 << 20);
        assert!(q.pk.two);
        assert_eq!((q.lanes[HOT].cap, q.lanes[MAIN].cap, q.capacity()), (HOT_LANE, 4 << 20, 4 << 20));
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        // 12 MiB through, the receiver following closely: all of it in the hot lane.
        let msg = [7u8; 1016];
        for i in 0..12 * 1024u32 {
            tx.send(&msg).unwrap();
            if i % 4 == 3 {
                for _ in 0..4 {
                    assert_eq!(rx.try_recv().unwrap().len(), 1016);
                }
            }
        }
        assert_eq!(tx.pos[MAIN], 0, "the main lane was never written");
        assert_eq!(tx.pos[HOT], 12 << 20, "the hot lane went round six times");
        // A burst the hot lane cannot hold (the receiver stalls): it overflows into the main
        // lane, in order.
        let mut n = 0u32;
        while tx.pos[MAIN] < 1 << 20 {
            tx.try_send(&n.to_le_bytes().repeat(254)).unwrap();
            n += 1;
        }
        for i in 0..n {
            assert_eq!(&rx.try_recv().unwrap()[..4], &i.to_le_bytes(), "message {i} of the burst");
        }
        // Drained: the sender goes back to the hot lane (it looks at the receiver again within
        // LOOK_EVERY bytes), and stays there.
        let main_before = tx.pos[MAIN];
        for _ in 0..4 * 1024 {
            tx.send(&msg).unwrap();
            assert_eq!(rx.try_recv().unwrap().len(), 1016);
        }
        assert!(tx.pos[MAIN] - main_before <= LOOK_EVERY + 1024, "{} bytes more in main", tx.pos[MAIN] - main_before);
        assert_eq!(tx.lane, HOT);
        let info = fill_of(q.h(), q.cap).unwrap();
        assert_eq!(info, 0, "inspection sees both lanes empty");
        tx.send(&msg).unwrap();
        assert_eq!(fill_of(q.h(), q.cap).unwrap(), 1024);
    }

    #[test]
    fn with_a_stalled_receiver_a_blocking_sender_fills_the_hot_lane_and_then_the_whole_main_lane() {
        let q = ByteQueue::in_memory(4 << 20);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        // Keep up for a while (positions mid-lane), then stall.
        for i in 0..3000u32 {
            tx.send(&i.to_le_bytes()).unwrap();
            assert_eq!(&*rx.try_recv().unwrap(), &i.to_le_bytes());
        }
        // A blocking sender waits OVERFLOW_AFTER for the stalled receiver, then uses the main
        // lane; it times out only once both lanes are full.
        let mut n = 0u32;
        while tx.send_timeout(&[n as u8; 1016], Duration::from_millis(20)).is_ok() {
            n += 1;
        }
        assert!(u64::from(n) * 1024 >= q.cap + HOT_LANE - 3 * 1024, "{n} records filled a {}-byte ring", q.cap);
        assert_eq!(tx.try_send(&[0; 1016]).err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
        for i in 0..n {
            assert_eq!(&*rx.try_recv().unwrap(), &[i as u8; 1016], "message {i} of {n}");
        }
        assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
        // A message over half the hot lane goes to the main lane at once, in order.
        tx.send(&[1; 100]).unwrap();
        let big = vec![2u8; q.max_message()];
        tx.send(&big).unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), &[1; 100]);
        assert_eq!(rx.try_recv().unwrap().len(), big.len());
    }

    #[test]
    fn a_damaged_lane_is_reported() {
        let q = ByteQueue::in_memory_lanes(256, 64);
        let mut tx = q.sender().unwrap();
        let mut rx = q.receiver().unwrap();
        tx.send(&[1; 8]).unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), &[1; 8]);
        rx.__die();
        let c = consumed_now(&q);
        c.lane.store(2, Ordering::Relaxed);
        let err = q.receiver().err().expect("a lane that does not exist is refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        c.lane.store(0, Ordering::Relaxed);
        c.pos[1].store(8, Ordering::Relaxed);
        let err = q.receiver().err().expect("consumed past what was written in lane 1");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        c.pos[1].store(0, Ordering::Relaxed);
        let mut rx = q.receiver().unwrap();
        // A switch record in a ring with one lane is a damaged record.
        let q1 = ByteQueue::in_memory(4096);
        let mut tx1 = q1.sender().unwrap();
        let mut rx1 = q1.receiver().unwrap();
        tx1.send(&[3; 8]).unwrap();
        // SAFETY: the record's header word, in the ring; nobody reads it concurrently.
        unsafe { q1.lanes[0].data.cast::<u64>().write(SWITCH) };
        assert_eq!(rx1.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
        // Positions packed for two lanes: an unaligned lane-0 field is refused.
        q.h().send.pos.store(4 << 1, Ordering::Relaxed);
        assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    /// Operations on a ring with two lanes: sends (a blocking sender's first attempt, which may
    /// not overflow, or `try_send`), receives, read-ahead and commits, and deaths of either side.
    #[derive(Debug, Clone)]
    enum LaneOp {
        Send(usize, bool),
        Recv,
        Keep,
        Commit(usize),
        Batch(u64),
        Flush,
        KillRx(bool),
        KillTx,
    }

    fn lane_op() -> impl Strategy<Value = LaneOp> {
        prop_oneof![
            10 => (0usize..120, any::<bool>()).prop_map(|(l, o)| LaneOp::Send(l, o)),
            6 => Just(LaneOp::Recv),
            2 => Just(LaneOp::Keep),
            1 => (0usize..8).prop_map(LaneOp::Commit),
            1 => (0u64..200).prop_map(LaneOp::Batch),
            1 => Just(LaneOp::Flush),
            1 => any::<bool>().prop_map(LaneOp::KillRx),
            1 => Just(LaneOp::KillTx),
        ]
    }

    proptest! {
        #[test]
        fn two_lanes_behave_like_a_vecdeque_through_switches_keeps_and_deaths(
            ops in proptest::collection::vec(lane_op(), 1..500),
            cap in 7u32..10,
            hot in 6u32..8,
        ) {
            let q = ByteQueue::in_memory_lanes(1 << cap, 1 << hot);
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            // Messages sent and not consumed, in order: the first `kept` are read ahead (their
            // marks in `marks`), the last `pending` not published yet.
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let (mut kept, mut pending) = (0usize, 0usize);
            let mut marks: Vec<Kept> = Vec::new();
            let mut n = 0u8;
            for op in ops {
                match op {
                    LaneOp::Send(len, overflow) => {
                        n = n.wrapping_add(1);
                        let msg = vec![n; len];
                        let before = tx.position();
                        if len > q.max_message() {
                            prop_assert_eq!(tx.try_send(&msg).err().map(|e| e.kind()), Some(ErrorKind::InvalidSize));
                        } else if tx.try_put(&msg, overflow).unwrap() {
                            prop_assert!(tx.position() > before, "the position grows");
                            model.push_back(msg);
                            pending += 1;
                        } else if overflow {
                            prop_assert!(!model.is_empty(), "an empty ring refused a message that fits");
                        }
                    }
                    LaneOp::Recv | LaneOp::Keep => match rx.try_recv() {
                        Ok(m) => {
                            prop_assert!(model.len() - pending > kept, "an unpublished message was received");
                            prop_assert_eq!(&m.to_vec(), &model[kept]);
                            if matches!(op, LaneOp::Keep) {
                                marks.push(m.keep());
                                kept += 1;
                            } else {
                                drop(m);
                                model.drain(..=kept);
                                kept = 0;
                                marks.clear();
                            }
                        }
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert_eq!(model.len() - pending, kept, "a published message was not received");
                        }
                    },
                    LaneOp::Commit(i) => {
                        if !marks.is_empty() {
                            let j = i % marks.len();
                            rx.commit(marks[j]).unwrap();
                            prop_assert!(rx.commit(marks[j]).is_err(), "a mark commits once");
                            model.drain(..=j);
                            marks.drain(..=j);
                            kept -= j + 1;
                        }
                    }
                    LaneOp::Batch(b) => tx.set_batch(b),
                    LaneOp::Flush => tx.flush(),
                    LaneOp::KillRx(hold) => {
                        if hold && let Ok(m) = rx.try_recv() {
                            // Received, not consumed: delivered again.
                            prop_assert_eq!(&m.to_vec(), &model[kept]);
                            std::mem::forget(m);
                        }
                        rx.__die();
                        rx = q.receiver().unwrap();
                        kept = 0;
                        marks.clear();
                    }
                    LaneOp::KillTx => {
                        let published = tx.published;
                        std::mem::forget(tx);
                        // Relaxed: same thread (the kernel orders a real death).
                        q.h().senders.peers[0].token.store(0, Ordering::Relaxed);
                        model.truncate(model.len() - pending);
                        pending = 0;
                        tx = q.sender().unwrap();
                        prop_assert_eq!(tx.position(), published, "a successor starts at the published position");
                    }
                }
                if !tx.pending() {
                    pending = 0;
                }
            }
            drop(tx);
            // A successor receiver gets the kept messages again, then the rest.
            rx.__die();
            let mut rx = q.receiver().unwrap();
            while let Some(want) = model.pop_front() {
                prop_assert_eq!(rx.try_recv().unwrap().to_vec(), want);
            }
            prop_assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
        }
    }

    proptest! {
        /// The hot paths (`put_now`, `peek_now`, `recv_into` without a `Message`) against the
        /// general ones, through wraps, switch records, full rings and buffers too small, in
        /// rings of one and of two lanes: every message arrives once, in order, intact.
        #[test]
        fn recv_into_and_the_hot_paths_behave_like_a_vecdeque(
            ops in proptest::collection::vec((0usize..140, 0u8..4, 0usize..160), 1..600),
            cap in 7u32..10,
            hot in prop_oneof![Just(0u64), Just(64u64), Just(128u64)],
        ) {
            let q = ByteQueue::in_memory_lanes(1 << cap, hot);
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut n = 0u8;
            for (len, what, buflen) in ops {
                match what {
                    0 | 1 => {
                        n = n.wrapping_add(1);
                        let msg: Vec<u8> = (0..len).map(|i| n.wrapping_add(i as u8)).collect();
                        match tx.try_send(&msg) {
                            Ok(()) => model.push_back(msg),
                            Err(e) if e.kind() == ErrorKind::InvalidSize => prop_assert!(len > q.max_message()),
                            Err(e) => {
                                prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                                prop_assert!(!model.is_empty(), "an empty ring refused a message that fits");
                            }
                        }
                    }
                    2 => {
                        let mut buf = vec![0xAAu8; buflen];
                        match rx.recv_into(&mut buf, Some(Duration::ZERO)) {
                            Ok(got) => {
                                let want = model.pop_front();
                                prop_assert_eq!(Some(&buf[..got]), want.as_deref());
                                prop_assert!(buf[got..].iter().all(|&b| b == 0xAA), "wrote past the message");
                            }
                            Err(e) if e.kind() == ErrorKind::InvalidSize => {
                                prop_assert!(model.front().is_some_and(|m| m.len() > buflen), "{}", e);
                            }
                            Err(e) => {
                                prop_assert_eq!(e.kind(), ErrorKind::Timeout);
                                prop_assert!(model.is_empty());
                            }
                        }
                    }
                    _ => match rx.try_recv() {
                        Ok(m) => prop_assert_eq!(Some(m.to_vec()), model.pop_front()),
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert!(model.is_empty());
                        }
                    },
                }
            }
            drop(tx);
            let mut buf = vec![0u8; q.max_message()];
            while let Some(want) = model.pop_front() {
                let got = rx.recv_into(&mut buf, Some(Duration::ZERO)).unwrap();
                prop_assert_eq!(&buf[..got], &want[..]);
            }
            prop_assert_eq!(rx.recv_into(&mut buf, None).err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
        }
    }

    proptest! {
        #[test]
        fn a_batching_sender_killed_anywhere_loses_only_what_it_had_not_published(
            ops in proptest::collection::vec(sender_op(), 1..400),
            cap in 6u32..10,
        ) {
            let q = ByteQueue::in_memory(1 << cap);
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            // Messages sent, not lost and not received, in order; the last `pending` of them
            // are not published yet.
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut pending = 0usize;
            let mut n = 0u8;
            for op in ops {
                match op {
                    SenderOp::Send(len) => {
                        n = n.wrapping_add(1);
                        let msg = vec![n; len];
                        match tx.try_send(&msg) {
                            Ok(()) => {
                                model.push_back(msg);
                                pending += 1;
                            }
                            Err(e) if e.kind() == ErrorKind::InvalidSize => prop_assert!(len > q.max_message()),
                            Err(e) => {
                                prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                                prop_assert!(!model.is_empty(), "an empty ring refused a message that fits");
                            }
                        }
                    }
                    SenderOp::Recv => match rx.try_recv() {
                        Ok(m) => {
                            prop_assert!(model.len() > pending, "an unpublished message was received");
                            prop_assert_eq!(Some(m.to_vec()), model.pop_front());
                        }
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert_eq!(model.len(), pending, "a published message was not received");
                        }
                    },
                    SenderOp::Batch(b) => tx.set_batch(b),
                    SenderOp::Flush => tx.flush(),
                    SenderOp::Die => {
                        std::mem::forget(tx);
                        // Relaxed: same thread (the kernel orders a real death).
                        q.h().senders.peers[0].token.store(0, Ordering::Relaxed);
                        model.truncate(model.len() - pending);
                        pending = 0;
                        tx = q.sender().unwrap();
                    }
                }
                // Whatever published the pending messages (a full batch, a full ring, a flush).
                if !tx.pending() {
                    pending = 0;
                }
            }
            drop(tx);
            while let Some(want) = model.pop_front() {
                prop_assert_eq!(rx.try_recv().unwrap().to_vec(), want);
            }
            prop_assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
        }

        #[test]
        fn the_ring_behaves_like_a_vecdeque(ops in proptest::collection::vec(op(), 1..400), cap in 6u32..10) {
            let q = ByteQueue::in_memory(1 << cap);
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            // Messages sent and not consumed, in order.
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut n = 0u8;
            for op in ops {
                match op {
                    Op::Send(len) => {
                        n = n.wrapping_add(1);
                        let msg = vec![n; len];
                        match tx.try_send(&msg) {
                            Ok(()) => model.push_back(msg),
                            Err(e) if e.kind() == ErrorKind::InvalidSize => prop_assert!(len > q.max_message()),
                            Err(e) => {
                                prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                                prop_assert!(!model.is_empty(), "an empty ring refused a message that fits");
                            }
                        }
                    }
                    Op::Recv => match rx.try_recv() {
                        Ok(m) => prop_assert_eq!(Some(m.to_vec()), model.pop_front()),
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                            prop_assert!(model.is_empty());
                        }
                    },
                    Op::Die(hold) => {
                        if hold && let Ok(m) = rx.try_recv() {
                            // Received, not consumed: stays at the front of the model.
                            prop_assert_eq!(Some(&m.to_vec()), model.front());
                            std::mem::forget(m);
                        }
                        rx.__die();
                        rx = q.receiver().unwrap();
                    }
                }
            }
            drop(tx);
            while let Some(want) = model.pop_front() {
                prop_assert_eq!(rx.try_recv().unwrap().to_vec(), want);
            }
            prop_assert_eq!(rx.try_recv().err().map(|e| e.kind()), Some(ErrorKind::Disconnected));
        }
    }
}
