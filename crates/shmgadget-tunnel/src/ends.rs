//! The local ends of a tunnel: what an exporter reads from (a [`Source`]) and what an importer
//! writes into (a [`Sink`]), for byte queues, slot queues and slot queues of heap blocks.
//!
//! Sequence numbers are the source queue's own: a byte queue's message number
//! ([`Kept::seq`](shmgadget::queue::Kept::seq)), a slot queue's position + 1 (a dead sender's
//! hole keeps its number: the exporter sends it as a hole, the importer skips it).

use std::alloc::Layout;
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::time::Duration;

use shmgadget::heap::{Heap, ShmBox};
use shmgadget::queue::{BlockAddr, ByteReceiver, ByteSender, Kept, SlotReceiver, SlotSender};
use shmgadget::{AnyBitPattern, Error as ShmError, ErrorKind, ShmSafe};

use crate::{Error, Result};

/// What a read found.
pub(crate) enum Read {
    /// A message (pushed), with its sequence number.
    Msg,
    /// The next message does not fit in the room given (left for the next read).
    TooBig,
    /// Nothing now (or within the timeout).
    Nothing,
    /// Nothing, and no producer now (one may come back).
    Gone,
}

/// The exporter's side of a local queue: reads ahead, commits once acknowledged.
pub(crate) trait Source {
    /// Sequence number of the last message consumed (acknowledged by some importer).
    fn consumed(&self) -> u64;
    /// Reads the next message ahead, waiting up to `timeout` (`None`: not at all), and hands
    /// it to `push` (its sequence number, its bytes) if it fits in `room` bytes.
    fn read(&mut self, timeout: Option<Duration>, room: usize, push: &mut dyn FnMut(u64, &[u8])) -> Result<Read>;
    /// Consumes every message up to sequence number `seq` (all read ahead).
    fn commit(&mut self, seq: u64) -> Result<()>;
}

/// The importer's side of a local queue.
pub(crate) trait Sink {
    /// The queue's write position by this (only) sender, for the record (see `record`).
    fn position(&self) -> u64;
    /// A slot queue's position that a dead predecessor had claimed and that became a hole
    /// (no value), until [`forget_hole`](Sink::forget_hole).
    fn adopted_hole(&self) -> Option<u64> {
        None
    }
    /// Forgets [`adopted_hole`](Sink::adopted_hole), once the record is up to date.
    fn forget_hole(&mut self) {}
    /// Writes `m`, waiting up to `timeout`; `Timeout` or `Disconnected` (no consumer, queue
    /// full) to be retried with the same message.
    fn write(&mut self, m: &[u8], timeout: Duration) -> std::result::Result<(), ShmError>;
}

fn map_read(e: ShmError) -> Result<Read> {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::Timeout => Ok(Read::Nothing),
        ErrorKind::Disconnected => Ok(Read::Gone),
        _ => Err(e.into()),
    }
}

/// A byte queue's receiver.
pub(crate) struct ByteSource<'q> {
    pub rx: ByteReceiver<'q>,
    pub marks: VecDeque<Kept>,
}

impl Source for ByteSource<'_> {
    fn consumed(&self) -> u64 {
        self.rx.consumed()
    }

    fn read(&mut self, timeout: Option<Duration>, room: usize, push: &mut dyn FnMut(u64, &[u8])) -> Result<Read> {
        let seq = self.marks.back().map_or(self.rx.consumed(), |k| k.seq()) + 1;
        let r = match timeout {
            Some(t) => self.rx.recv_timeout(t),
            None => self.rx.try_recv(),
        };
        match r {
            Ok(m) => {
                if m.len() > room {
                    // Left for the next read: not kept, not consumed.
                    std::mem::forget(m);
                    return Ok(Read::TooBig);
                }
                push(seq, &m);
                let k = m.keep();
                debug_assert_eq!(k.seq(), seq);
                self.marks.push_back(k);
                Ok(Read::Msg)
            }
            Err(e) => map_read(e),
        }
    }

    fn commit(&mut self, seq: u64) -> Result<()> {
        let mut last = None;
        while self.marks.front().is_some_and(|k| k.seq() <= seq) {
            last = self.marks.pop_front();
        }
        if let Some(k) = last {
            self.rx.commit(k)?;
        }
        Ok(())
    }
}

/// A byte queue's sender.
pub(crate) struct ByteSink<'q>(pub ByteSender<'q>);

impl Sink for ByteSink<'_> {
    fn position(&self) -> u64 {
        self.0.position()
    }

    fn write(&mut self, m: &[u8], timeout: Duration) -> std::result::Result<(), ShmError> {
        self.0.send_timeout(m, timeout)
    }
}

/// Values a slot queue can carry through a tunnel: any bytes of its size are a valid value.
pub trait Plain: ShmSafe + AnyBitPattern + Copy + Send {}
impl<T: ShmSafe + AnyBitPattern + Copy + Send> Plain for T {}

fn bytes_of<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: a `Copy` value of size_of::<T>() bytes, read as bytes (AnyBitPattern types have
    // no padding that matters: every byte is part of some valid value).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A slot queue's exclusive receiver.
pub(crate) struct SlotSource<'q, T: Plain>(pub SlotReceiver<'q, T>);

impl<T: Plain> Source for SlotSource<'_, T> {
    fn consumed(&self) -> u64 {
        self.0.consumed()
    }

    fn read(&mut self, timeout: Option<Duration>, room: usize, push: &mut dyn FnMut(u64, &[u8])) -> Result<Read> {
        if size_of::<T>() > room {
            return Ok(Read::TooBig);
        }
        match self.0.peek_timeout(timeout.unwrap_or(Duration::ZERO)) {
            Ok((seq, v)) => {
                push(seq, bytes_of(&v));
                Ok(Read::Msg)
            }
            Err(e) => map_read(e),
        }
    }

    fn commit(&mut self, seq: u64) -> Result<()> {
        Ok(self.0.commit(seq)?)
    }
}

/// A slot queue's exclusive sender.
pub(crate) struct SlotSink<'q, T: Plain>(pub SlotSender<'q, T>);

impl<T: Plain> Sink for SlotSink<'_, T> {
    fn position(&self) -> u64 {
        self.0.sent_position()
    }

    fn adopted_hole(&self) -> Option<u64> {
        self.0.adopted_hole()
    }

    fn forget_hole(&mut self) {
        self.0.forget_adopted_hole()
    }

    fn write(&mut self, m: &[u8], timeout: Duration) -> std::result::Result<(), ShmError> {
        if m.len() != size_of::<T>() {
            return Err(ShmError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a message of {} bytes cannot be a value of this slot queue ({} bytes): the two ends carry different types",
                    m.len(),
                    size_of::<T>()
                ),
            ));
        }
        // SAFETY: `m` has size_of::<T>() bytes and any bytes are a valid T (Plain); read
        // unaligned (the frame has no alignment).
        let v = unsafe { m.as_ptr().cast::<T>().read_unaligned() };
        self.0.send_timeout(v, timeout)
    }
}

/// A slot queue of heap block addresses: a block crosses as its bytes, and is freed here once
/// acknowledged.
pub(crate) struct BlockSource<'q> {
    pub rx: SlotReceiver<'q, BlockAddr>,
    pub heap: Heap,
    /// Blocks read ahead and sent, by sequence number.
    pub blocks: VecDeque<(u64, BlockAddr)>,
    /// A block read ahead that did not fit (sequence number, block, bytes): the next read's.
    pub pending: Option<(u64, BlockAddr, usize)>,
}

impl Source for BlockSource<'_> {
    fn consumed(&self) -> u64 {
        self.rx.consumed()
    }

    fn read(&mut self, timeout: Option<Duration>, room: usize, push: &mut dyn FnMut(u64, &[u8])) -> Result<Read> {
        let (seq, b, len) = match self.pending.take() {
            Some(p) => p,
            None => match self.rx.peek_timeout(timeout.unwrap_or(Duration::ZERO)) {
                Ok((seq, b)) => {
                    let p = NonNull::new(b.addr() as *mut u8)
                        .ok_or_else(|| Error(format!("slot queue entry {seq} holds a null block address")))?;
                    let len = self.heap.usable_size(p).map_err(|e| {
                        Error(format!(
                            "block {:#x} (message {seq}) is not a live block of heap {:?}: {e}",
                            b.addr(),
                            self.heap.name()
                        ))
                    })?;
                    (seq, b, len)
                }
                Err(e) => return map_read(e),
            },
        };
        {
            let p = NonNull::new(b.addr() as *mut u8).expect("checked when read");
            if len > room {
                // Read ahead but not sent: the cursor does not go back, so it waits here for
                // the next read (an empty frame's, which has room for anything).
                self.pending = Some((seq, b, len));
                return Ok(Read::TooBig);
            }
            // SAFETY: a live block of `heap` of `len` usable bytes (checked above), owned by
            // the queue entry we hold unconsumed: its sender gave it up, nobody else reads
            // it until we commit.
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
            push(seq, bytes);
            self.blocks.push_back((seq, b));
            Ok(Read::Msg)
        }
    }

    fn commit(&mut self, seq: u64) -> Result<()> {
        // Consume, then free, one at a time: a kill between the two leaks one block, never
        // frees a block a successor would read again.
        while let Some(&(s, b)) = self.blocks.front() {
            if s > seq {
                break;
            }
            self.rx.commit(s)?;
            self.blocks.pop_front();
            // SAFETY: the block's entry is consumed: no process reads it again; it was a live
            // block of this heap (checked when read).
            unsafe { self.heap.free(NonNull::new(b.addr() as *mut u8).expect("checked when read"))? };
        }
        self.rx.commit(seq)?;
        Ok(())
    }
}

/// A slot queue of heap block addresses on the importing side: each message is copied into a
/// new block of `heap` and its address sent.
pub(crate) struct BlockSink<'q> {
    pub tx: SlotSender<'q, BlockAddr>,
    pub heap: Heap,
    /// A block allocated and filled for the message being written (kept across retries).
    pub pending: Option<BlockAddr>,
}

impl Sink for BlockSink<'_> {
    fn position(&self) -> u64 {
        self.tx.sent_position()
    }

    fn adopted_hole(&self) -> Option<u64> {
        self.tx.adopted_hole()
    }

    fn forget_hole(&mut self) {
        self.tx.forget_adopted_hole()
    }

    fn write(&mut self, m: &[u8], timeout: Duration) -> std::result::Result<(), ShmError> {
        let b = match self.pending {
            Some(b) => b,
            None => {
                let layout = Layout::from_size_align(m.len().max(1), 16)
                    .map_err(|e| ShmError::new(ErrorKind::InvalidArgument, e.to_string()))?;
                let p = self.heap.alloc(layout)?;
                // SAFETY: a fresh block of at least m.len() bytes, ours alone.
                unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), p.as_ptr(), m.len()) };
                // SAFETY: a live block of this heap, allocated above as (at least) one byte:
                // as a box of u8 it is handed straight to `from_box`, which gives it up.
                let b = BlockAddr::from_box(unsafe { ShmBox::from_raw_in(p.as_ptr(), self.heap.allocator()) });
                self.pending = Some(b);
                b
            }
        };
        self.tx.send_timeout(b, timeout)?;
        self.pending = None;
        Ok(())
    }
}
