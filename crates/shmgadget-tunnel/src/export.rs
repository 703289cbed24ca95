//! The exporter: the receiver of a local queue, publishing to `<key>/data`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shmgadget::heap::Heap;
use shmgadget::queue::{BlockAddr, ByteQueue, SlotQueue};
use shmgadget::{Domain, ErrorKind};
use zenoh::Wait;
use zenoh::bytes::ZBytes;
use zenoh::qos::CongestionControl;

use crate::ends::{BlockSource, ByteSource, Plain, Read, SlotSource, Source};
use crate::stats::Stats;
use crate::wire::{self, DATA_HEADER};
use crate::{DEFAULT_WINDOW, Error, Options, Result, fnv, zerr};

/// Largest data frame (messages are never split: a larger message goes alone). It fits in one
/// zenoh batch (at most 65535 bytes, `transport/link/tx/batch_size`) with room for zenoh's own
/// headers: a larger frame is fragmented by zenoh and copied once more into a reassembly
/// buffer on the far side.
const FRAME: usize = 65535 - 512;
/// With no ack at all for this long, everything unacknowledged is sent again.
const SILENCE: Duration = Duration::from_millis(1000);
/// At most one rewind per this long (a burst of NACKs asks once).
const REWIND_GAP: Duration = Duration::from_millis(100);

struct Batch {
    last: u64,
    frame: ZBytes,
    sent: Instant,
}

/// Longest an exporter with nothing in flight sleeps on its local queue (it has no resend or
/// ack duties then; a new importer's hello finds nothing to resend).
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Runs the exporter of byte queue `opts.queue` in `domain` until `opts.stop` is set. Waits
/// for the queue to exist (its producer creates it); the exporter becomes its receiver.
pub fn export(domain: &Domain, opts: &Options) -> Result<()> {
    let q = wait_open(opts, || ByteQueue::open(domain, &opts.queue))?;
    let rx = wait_attach(opts, || q.receiver())?;
    let mut src = ByteSource { rx, marks: VecDeque::new() };
    run(domain, opts, &mut src)
}

/// Runs the exporter of slot queue `opts.queue` of `T` values (see [`export`]); the exporter
/// becomes its exclusive receiver (no other receiver may attach while it runs).
pub fn export_slots<T: Plain>(domain: &Domain, opts: &Options) -> Result<()> {
    let q = wait_open(opts, || SlotQueue::<T>::open(domain, &opts.queue))?;
    let rx = wait_attach(opts, || q.exclusive_receiver())?;
    run(domain, opts, &mut SlotSource(rx))
}

/// Runs the exporter of slot queue `opts.queue` of heap blocks ([`BlockAddr`]) of heap
/// `heap`: each block crosses as its bytes (its usable size) and is freed here once the far
/// side has written it (see [`export`]).
pub fn export_blocks(domain: &Domain, heap: &str, opts: &Options) -> Result<()> {
    let q = wait_open(opts, || SlotQueue::<BlockAddr>::open(domain, &opts.queue))?;
    let heap = Heap::open(domain, heap)?;
    let rx = wait_attach(opts, || q.exclusive_receiver())?;
    run(domain, opts, &mut BlockSource { rx, heap, blocks: VecDeque::new(), pending: None })
}

/// The producer creates the queue; wait for it.
pub(crate) fn wait_open<Q>(opts: &Options, open: impl Fn() -> shmgadget::Result<Q>) -> Result<Q> {
    loop {
        match open() {
            Ok(q) => return Ok(q),
            Err(e) if e.kind() == ErrorKind::NotFound && !opts.stopped() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A peer killed a moment ago may not be seen dead yet: retry briefly.
pub(crate) fn wait_attach<P>(opts: &Options, attach: impl Fn() -> shmgadget::Result<P>) -> Result<P> {
    let t = Instant::now();
    loop {
        match attach() {
            Ok(p) => return Ok(p),
            Err(e)
                if e.kind() == ErrorKind::AlreadyExists && !opts.stopped() && t.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn run(domain: &Domain, opts: &Options, src: &mut dyn Source) -> Result<()> {
    let info = domain.section_info(&opts.queue)?;
    let stream = fnv(&[domain.name().as_bytes(), opts.queue.as_bytes(), &info.generation.to_le_bytes()]);
    let key = opts.key_prefix(domain.name());
    let mut stats = Stats::open(domain, &opts.queue, true, &key)?;
    let session = zenoh::open(opts.zenoh_config()?).wait().map_err(|e| zerr("open session", e))?;
    let publisher = session
        .declare_publisher(format!("{key}/data"))
        .congestion_control(CongestionControl::Block)
        .wait()
        .map_err(|e| zerr("declare publisher", e))?;
    // Acks are parsed in zenoh's callback and their sample dropped at once: a sample holds
    // its whole receive buffer (64 KiB), which zenoh reuses only once it is dropped.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<wire::Ack>();
    let acks = session
        .declare_subscriber(format!("{key}/ack"))
        .callback(move |s| {
            if let Some(a) = wire::parse_ack(&s.payload().to_bytes()) {
                let _ = ack_tx.send(a);
            }
        })
        .wait()
        .map_err(|e| zerr("declare subscriber", e))?;
    let ack_wait = |t: Duration| match ack_rx.recv_timeout(t) {
        Ok(a) => Ok(Some(a)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error("zenoh: the ack subscriber is gone".into())),
    };

    let mut acked = src.consumed();
    let started_at = acked;
    let mut window = DEFAULT_WINDOW;
    let mut next_seq = acked + 1;
    let mut batches: VecDeque<Batch> = VecDeque::new();
    let mut resend_from = 0usize; // index in `batches` of the next frame to (re)send
    let mut last_ack = Instant::now();
    let mut last_rewind = Instant::now() - REWIND_GAP;
    let mut frame = Vec::with_capacity(FRAME + 64);
    let (mut stat_t, mut stat_n) = (Instant::now(), acked);
    // An ack waited for at the end of the last round (see there).
    let mut waited = None;
    while !opts.stopped() {
        // 1. Acks: commit what the far side has written; rewind when asked.
        let mut rewind_to = None;
        while let Some(s) = match waited.take() {
            Some(s) => Some(s),
            None => ack_rx.try_recv().ok(),
        } {
            let a = s;
            last_ack = Instant::now();
            if a.stream != stream {
                // The importer knows another stream (or none): it needs us from the start.
                rewind_to = Some(acked);
                continue;
            }
            if a.acked > acked && a.acked < next_seq {
                acked = a.acked;
            }
            window = a.window.max(1);
            if a.nack {
                rewind_to = Some(a.acked);
            }
        }
        let mut committed = None;
        while batches.front().is_some_and(|b| b.last <= acked) {
            committed = Some(batches.pop_front().unwrap().last);
            resend_from = resend_from.saturating_sub(1);
        }
        if let Some(last) = committed {
            src.commit(last)?;
        }
        if last_ack.elapsed() > SILENCE && !batches.is_empty() {
            rewind_to = Some(acked);
            last_ack = Instant::now();
        }
        if let Some(from) = rewind_to {
            if last_rewind.elapsed() >= REWIND_GAP {
                last_rewind = Instant::now();
                // The first batch holding `from + 1`; batches older than a rewind gap only
                // (younger ones may still be on their way).
                let i = batches.iter().position(|b| b.last > from).unwrap_or(batches.len());
                if i < resend_from && batches[i].sent.elapsed() >= REWIND_GAP / 2 {
                    resend_from = i;
                }
            }
        }
        // 2. Send again what was asked for.
        while resend_from < batches.len() {
            let b = &mut batches[resend_from];
            // A copy with today's floor: a new importer accepts a stream only from it.
            let mut again = b.frame.to_bytes().into_owned();
            set_floor(&mut again, acked);
            publisher.put(again).wait().map_err(|e| zerr("put", e))?;
            b.sent = Instant::now();
            resend_from += 1;
        }
        stats.update(acked - started_at, next_seq - 1 - acked);
        // 3. New messages, within the credit.
        if next_seq > acked + window {
            // Out of credit: wait for an ack.
            if let Some(a) = ack_wait(Duration::from_millis(1))? {
                last_ack = Instant::now();
                if a.stream == stream && a.acked > acked && a.acked < next_seq {
                    acked = a.acked;
                    window = a.window.max(1);
                }
            }
            continue;
        }
        // Nothing in flight: nothing to resend or commit, so sleep on the local queue. With
        // messages in flight only look (the wait is for their ack, below): they hold ring
        // space the producer may be waiting for, which only their ack gives back.
        let first_wait = if batches.is_empty() { Some(IDLE_WAIT) } else { None };
        wire::data_header(&mut frame, stream, acked, next_seq);
        let first = next_seq;
        let mut n = 0u32;
        while frame.len() < FRAME && next_seq <= acked + window {
            let room = if n == 0 { usize::MAX } else { FRAME.saturating_sub(frame.len() + 4) };
            let timeout = if n == 0 { first_wait } else { None };
            let mut push = |seq: u64, m: &[u8]| {
                // A dead sender's holes (slot queues) keep their numbers.
                while next_seq < seq {
                    wire::data_push_hole(&mut frame);
                    next_seq += 1;
                    n += 1;
                }
                wire::data_push(&mut frame, m);
                next_seq += 1;
                n += 1;
            };
            match src.read(timeout, room, &mut push)? {
                Read::Msg => {}
                Read::TooBig | Read::Nothing => break,
                Read::Gone => {
                    // No producer now; one may come back.
                    if n == 0 && batches.is_empty() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    break;
                }
            }
        }
        if n > 0 {
            debug_assert_eq!(first + n as u64, next_seq);
            wire::data_finish(&mut frame, n);
            let bytes = ZBytes::from(std::mem::replace(&mut frame, Vec::with_capacity(FRAME + 64)));
            publisher.put(bytes.clone()).wait().map_err(|e| zerr("put", e))?;
            batches.push_back(Batch { last: next_seq - 1, frame: bytes, sent: Instant::now() });
            resend_from = batches.len();
        } else if !batches.is_empty() {
            // Nothing new, messages in flight: wait for their ack (it comes a round trip after
            // their frame), up to a millisecond, then look at the local queue again.
            waited = ack_wait(Duration::from_millis(1))?;
        }
        if opts.verbose && stat_t.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "export {key}: {:.0} msg/s acknowledged, {} in flight",
                (acked - stat_n) as f64 / stat_t.elapsed().as_secs_f64(),
                next_seq - 1 - acked
            );
            (stat_t, stat_n) = (Instant::now(), acked);
        }
    }
    drop(acks);
    drop(publisher);
    session.close().wait().map_err(|e| zerr("close", e))?;
    Ok(())
}

fn set_floor(frame: &mut [u8], floor: u64) {
    debug_assert!(frame.len() >= DATA_HEADER);
    frame[16..24].copy_from_slice(&floor.to_le_bytes());
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::other(e.0)
    }
}
