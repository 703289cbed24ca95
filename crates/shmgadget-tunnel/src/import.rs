//! The importer: subscribes to `<key>/data` and is the sender of a local queue.

use std::time::{Duration, Instant};

use shmgadget::heap::Heap;
use shmgadget::queue::{BlockAddr, ByteQueue, SlotQueue};
use shmgadget::{Domain, ErrorKind};
use zenoh::Wait;
use zenoh::qos::CongestionControl;

use crate::ends::{BlockSink, ByteSink, Plain, Sink, SlotSink};
use crate::export::wait_attach;
use crate::record::Record;
use crate::stats::Stats;
use crate::wire::{self, NACK};
use crate::{DEFAULT_WINDOW, Options, Result, zerr};

/// Silence after which the importer says where it is (NACK: resend what I lack).
const IDLE: Duration = Duration::from_millis(100);
/// Frames buffered between zenoh and the importer; when full, zenoh's own flow control (and
/// then TCP's) holds the exporter back.
pub(crate) const FRAMES: usize = 64;

/// Runs the importer of byte queue `opts.queue` in `domain` until `opts.stop` is set. Creates
/// the queue with `opts.capacity` bytes if it does not exist, and becomes its sender.
pub fn import(domain: &Domain, opts: &Options) -> Result<()> {
    // An existing queue is used as it is, whatever its capacity.
    let q = match ByteQueue::open(domain, &opts.queue) {
        Ok(q) => q,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            ByteQueue::create_or_open(domain, &opts.queue, opts.capacity.max(4096))?.0
        }
        Err(e) => return Err(e.into()),
    };
    let tx = wait_attach(opts, || q.sender())?;
    run(domain, opts, &mut ByteSink(tx))
}

/// Runs the importer of slot queue `opts.queue` of `T` values (see [`import`]): creates it
/// with `opts.capacity` values if missing, and becomes its exclusive sender (no other sender
/// may attach while it runs).
pub fn import_slots<T: Plain>(domain: &Domain, opts: &Options) -> Result<()> {
    let q = SlotQueue::<T>::create_or_open(domain, &opts.queue, opts.capacity.max(2))?.0;
    let tx = wait_attach(opts, || q.exclusive_sender())?;
    run(domain, opts, &mut SlotSink(tx))
}

/// Runs the importer of slot queue `opts.queue` of heap blocks ([`BlockAddr`]): each message
/// is copied into a new block of heap `heap` (created with `heap_bytes` reserved if missing)
/// whose address is sent into the queue (see [`import_slots`]).
pub fn import_blocks(domain: &Domain, heap: &str, heap_bytes: u64, opts: &Options) -> Result<()> {
    let heap = Heap::create_or_open(domain, heap, heap_bytes)?.0;
    let q = SlotQueue::<BlockAddr>::create_or_open(domain, &opts.queue, opts.capacity.max(2))?.0;
    let tx = wait_attach(opts, || q.exclusive_sender())?;
    run(domain, opts, &mut BlockSink { tx, heap, pending: None })
}

fn run(domain: &Domain, opts: &Options, sink: &mut dyn Sink) -> Result<()> {
    let record = Record::open(domain, &opts.queue)?;
    let p = record.load(sink.position(), sink.adopted_hole());
    let (mut stream, mut last) = (p.stream, p.last);
    // Bring the record up to date (a message written just before a kill, or a dead
    // predecessor's unfinished send that became a hole), then forget the hole: the record
    // now says where the queue is.
    if stream != 0 {
        record.store(stream, last, sink.position());
    }
    sink.forget_hole();
    let window = if opts.window == 0 { DEFAULT_WINDOW } else { opts.window };
    let key = opts.key_prefix(domain.name());
    let mut stats = Stats::open(domain, &opts.queue, false, &key)?;
    let session = zenoh::open(opts.zenoh_config()?).wait().map_err(|e| zerr("open session", e))?;
    let acks = session
        .declare_publisher(format!("{key}/ack"))
        .congestion_control(CongestionControl::Block)
        .express(true)
        .wait()
        .map_err(|e| zerr("declare publisher", e))?;
    let data = session
        .declare_subscriber(format!("{key}/data"))
        .with(zenoh::handlers::FifoChannel::new(FRAMES))
        .wait()
        .map_err(|e| zerr("declare subscriber", e))?;
    let ack = |stream: u64, last: u64, flags: u8| -> Result<()> {
        acks.put(wire::ack(stream, last, window, flags)).wait().map_err(|e| zerr("put ack", e))
    };
    // Hello: resend whatever I lack.
    ack(stream, last, NACK)?;
    let mut acked = last;
    let mut last_nack = Instant::now();
    let (mut stat_t, mut stat_n) = (Instant::now(), last);
    let mut written = 0u64;
    while !opts.stopped() {
        stats.update(written, 0);
        let sample = match data.recv_timeout(IDLE).map_err(|e| zerr("receive", e))? {
            Some(s) => s,
            None => {
                ack(stream, last, NACK)?;
                last_nack = Instant::now();
                continue;
            }
        };
        let bytes = sample.payload().to_bytes();
        let Some(frame) = wire::parse_data(&bytes) else { continue };
        if frame.stream != stream {
            if frame.first != frame.floor + 1 {
                // A stream we do not know, not from its start: ask for it.
                if last_nack.elapsed() >= IDLE / 2 {
                    ack(stream, last, NACK)?;
                    last_nack = Instant::now();
                }
                continue;
            }
            stream = frame.stream;
            last = frame.floor;
            record.store(stream, last, sink.position());
        }
        let mut gap = false;
        for (seq, m) in (frame.first..).zip(frame.messages()) {
            if seq > last + 1 {
                gap = true;
                break;
            }
            if seq == last + 1 {
                if let Some(m) = m {
                    if !write(sink, m, opts, || ack(stream, last, 0))? {
                        return Ok(());
                    }
                    written += 1;
                }
                // (A hole is only a number: nothing to write.)
                last = seq;
                record.store(stream, last, sink.position());
            }
        }
        if gap && last_nack.elapsed() >= IDLE / 2 {
            ack(stream, last, NACK)?;
            last_nack = Instant::now();
        }
        // Acknowledge every frame: the exporter keeps what is unacknowledged in its source
        // ring, whose room (not the credit) bounds what is in flight; an ack (32 bytes) per
        // frame (up to 64 KiB) costs little.
        if last != acked {
            ack(stream, last, 0)?;
            acked = last;
        }
        if opts.verbose && stat_t.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "import {key}: {:.0} msg/s written, {} written in all",
                (last - stat_n) as f64 / stat_t.elapsed().as_secs_f64(),
                record.written()
            );
            (stat_t, stat_n) = (Instant::now(), last);
        }
    }
    drop(data);
    drop(acks);
    session.close().wait().map_err(|e| zerr("close", e))?;
    Ok(())
}

/// Writes `m`, waiting while the queue is full (saying where we are every so often, so the
/// exporter knows we are alive) and while it has no receiver. `false` if stopped.
fn write(sink: &mut dyn Sink, m: &[u8], opts: &Options, heartbeat: impl Fn() -> Result<()>) -> Result<bool> {
    loop {
        match sink.write(m, IDLE) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Timeout => heartbeat()?,
            Err(e) if e.kind() == ErrorKind::Disconnected => {
                // The consumer is gone and the queue is full: wait for another.
                std::thread::sleep(Duration::from_millis(5));
                heartbeat()?;
            }
            Err(e) => return Err(e.into()),
        }
        if opts.stopped() {
            return Ok(false);
        }
    }
}
