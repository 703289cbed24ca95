//! The exporter: the receiver of a local byte queue, publishing to `<key>/data`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shmgadget::queue::{ByteQueue, Kept};
use shmgadget::{Domain, ErrorKind};
use zenoh::Wait;
use zenoh::bytes::ZBytes;
use zenoh::qos::CongestionControl;

use crate::wire::{self, DATA_HEADER};
use crate::{DEFAULT_WINDOW, Error, Options, Result, fnv, zerr};

/// Largest data frame (messages are never split: a larger message goes alone).
const FRAME: usize = 256 * 1024;
/// With no ack at all for this long, everything unacknowledged is sent again.
const SILENCE: Duration = Duration::from_millis(1000);
/// At most one rewind per this long (a burst of NACKs asks once).
const REWIND_GAP: Duration = Duration::from_millis(100);

struct Batch {
    last: u64,
    mark: Kept,
    frame: ZBytes,
    sent: Instant,
}

/// Runs the exporter of `opts.queue` in `domain` until `opts.stop` is set. Waits for the
/// queue to exist (its producer creates it); the exporter becomes its receiver.
pub fn export(domain: &Domain, opts: &Options) -> Result<()> {
    // The producer creates the queue; wait for it.
    let q = loop {
        match ByteQueue::open(domain, &opts.queue) {
            Ok(q) => break q,
            Err(e) if e.kind() == ErrorKind::NotFound && !opts.stopped() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut rx = loop {
        match q.receiver() {
            Ok(rx) => break rx,
            // A receiver killed a moment ago may not be seen dead yet: retry briefly.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && !opts.stopped() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    };
    let info = domain.section_info(&opts.queue)?;
    let stream = fnv(&[domain.name().as_bytes(), opts.queue.as_bytes(), &info.generation.to_le_bytes()]);
    let key = opts.key_prefix(domain.name());
    let session = zenoh::open(opts.zenoh_config()?).wait().map_err(|e| zerr("open session", e))?;
    let publisher = session
        .declare_publisher(format!("{key}/data"))
        .congestion_control(CongestionControl::Block)
        .wait()
        .map_err(|e| zerr("declare publisher", e))?;
    let acks = session
        .declare_subscriber(format!("{key}/ack"))
        .with(zenoh::handlers::FifoChannel::new(1024))
        .wait()
        .map_err(|e| zerr("declare subscriber", e))?;

    let mut acked = rx.consumed();
    let mut window = DEFAULT_WINDOW;
    let mut next_seq = acked + 1;
    let mut batches: VecDeque<Batch> = VecDeque::new();
    let mut resend_from = 0usize; // index in `batches` of the next frame to (re)send
    let mut last_ack = Instant::now();
    let mut last_rewind = Instant::now() - REWIND_GAP;
    let mut frame = Vec::with_capacity(FRAME + 64);
    let (mut stat_t, mut stat_n) = (Instant::now(), acked);
    while !opts.stopped() {
        // 1. Acks: commit what the far side has written; rewind when asked.
        let mut rewind_to = None;
        while let Some(s) = acks.try_recv().map_err(|e| zerr("receive ack", e))? {
            let Some(a) = wire::parse_ack(&s.payload().to_bytes()) else { continue };
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
        while batches.front().is_some_and(|b| b.last <= acked) {
            let b = batches.pop_front().unwrap();
            rx.commit(b.mark)?;
            resend_from = resend_from.saturating_sub(1);
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
        // 3. New messages, within the credit.
        if next_seq > acked + window {
            // Out of credit: wait for an ack.
            if let Some(s) = acks.recv_timeout(Duration::from_millis(1)).map_err(|e| zerr("receive ack", e))? {
                if let Some(a) = wire::parse_ack(&s.payload().to_bytes()) {
                    last_ack = Instant::now();
                    if a.stream == stream && a.acked > acked && a.acked < next_seq {
                        acked = a.acked;
                        window = a.window.max(1);
                    }
                }
            }
            continue;
        }
        wire::data_header(&mut frame, stream, acked, next_seq);
        let mut n = 0u32;
        let mut mark = None;
        while frame.len() < FRAME && next_seq <= acked + window {
            let r = if n == 0 { rx.recv_timeout(Duration::from_millis(1)) } else { rx.try_recv() };
            match r {
                Ok(m) => {
                    if n > 0 && frame.len() + 4 + m.len() > FRAME {
                        // Leave it for the next frame (it was not kept).
                        std::mem::forget(m);
                        break;
                    }
                    wire::data_push(&mut frame, &m);
                    let k = m.keep();
                    debug_assert_eq!(k.seq(), next_seq);
                    mark = Some(k);
                    next_seq += 1;
                    n += 1;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Timeout) => break,
                Err(e) if e.kind() == ErrorKind::Disconnected => {
                    // No producer now; one may come back.
                    if n == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(mark) = mark {
            wire::data_finish(&mut frame, n);
            let bytes = ZBytes::from(std::mem::replace(&mut frame, Vec::with_capacity(FRAME + 64)));
            publisher.put(bytes.clone()).wait().map_err(|e| zerr("put", e))?;
            batches.push_back(Batch { last: next_seq - 1, mark, frame: bytes, sent: Instant::now() });
            resend_from = batches.len();
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
