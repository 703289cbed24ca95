//! The importer: subscribes to `<key>/data` and is the sender of a local byte queue.

use std::time::{Duration, Instant};

use shmgadget::queue::{ByteQueue, ByteSender};
use shmgadget::{Domain, ErrorKind};
use zenoh::Wait;
use zenoh::qos::CongestionControl;

use crate::record::Record;
use crate::wire::{self, NACK};
use crate::{DEFAULT_WINDOW, Options, Result, zerr};

/// Silence after which the importer says where it is (NACK: resend what I lack).
const IDLE: Duration = Duration::from_millis(100);
/// Frames buffered between zenoh and the importer; when full, zenoh's own flow control (and
/// then TCP's) holds the exporter back.
const FRAMES: usize = 64;

/// Runs the importer of `opts.queue` in `domain` until `opts.stop` is set. Creates the queue
/// with `opts.capacity` bytes if it does not exist, and becomes its sender.
pub fn import(domain: &Domain, opts: &Options) -> Result<()> {
    // An existing queue is used as it is, whatever its capacity.
    let q = match ByteQueue::open(domain, &opts.queue) {
        Ok(q) => q,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            ByteQueue::create_or_open(domain, &opts.queue, opts.capacity.max(4096))?.0
        }
        Err(e) => return Err(e.into()),
    };
    let mut tx = loop {
        match q.sender() {
            Ok(tx) => break tx,
            // A sender killed a moment ago may not be seen dead yet: retry briefly.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && !opts.stopped() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    };
    let record = Record::open(domain, &opts.queue)?;
    let p = record.load(tx.position());
    let (mut stream, mut last) = (p.stream, p.last);
    // Bring the record up to date (a message written just before a kill).
    if stream != 0 {
        record.store(stream, last, tx.position());
    }
    let window = if opts.window == 0 { DEFAULT_WINDOW } else { opts.window };
    let key = opts.key_prefix(domain.name());
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
    while !opts.stopped() {
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
            record.store(stream, last, tx.position());
        }
        let mut gap = false;
        for (seq, m) in (frame.first..).zip(frame.messages()) {
            if seq > last + 1 {
                gap = true;
                break;
            }
            if seq == last + 1 {
                if !write(&mut tx, m, opts, || ack(stream, last, 0))? {
                    return Ok(());
                }
                last = seq;
                record.store(stream, last, tx.position());
            }
        }
        if gap && last_nack.elapsed() >= IDLE / 2 {
            ack(stream, last, NACK)?;
            last_nack = Instant::now();
        }
        // Acknowledge promptly when caught up, at least every quarter window otherwise.
        if last != acked && (data.is_empty() || last - acked >= window / 4) {
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
fn write(tx: &mut ByteSender<'_>, m: &[u8], opts: &Options, heartbeat: impl Fn() -> Result<()>) -> Result<bool> {
    loop {
        match tx.send_timeout(m, IDLE) {
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
