//! The importer's record, in shared memory next to the destination queue: section
//! `<queue>.tunnel` (one page) on the importing host.
//!
//! # Protocol
//! Words (`AtomicU64`, little-endian as the host is):
//! | word | meaning | written by |
//! |---|---|---|
//! | 0 | magic `RECORD_MAGIC` | the creator, once |
//! | 1 | current slot, 0 or 1 | the importer: Release, after filling the other slot |
//! | 2..5 | slot 0: stream, last sequence number written, queue write position after it | the importer |
//! | 5..8 | slot 1: the same | the importer |
//! | 8 | messages written (a statistic for `ls`/`top`) | the importer: Relaxed |
//!
//! The importer, the destination queue's only sender, writes a message into the queue
//! (published when `send` returns), then fills the slot that is *not* current with (stream,
//! seq, position) and flips word 1 with a Release store. A process killed anywhere leaves
//! word 1 naming a complete slot (the other one may be half written, and is never read). The
//! slot is at most one message behind the queue: a successor whose queue position differs
//! from the slot's knows that the message after `seq` went in ([`Record::load`]). One
//! importer at a time (the queue's single sender rule guarantees it: a second importer fails
//! to become the sender). Readers in other processes (`ls`) only read words and check the
//! magic.

use std::sync::atomic::{AtomicU64, Ordering};

use shmgadget::{Domain, Section, SectionOptions};

use crate::Result;

/// Magic word of a record section ("SGTUNREC").
pub const RECORD_MAGIC: u64 = 0x4345_524e_5554_4753;
const WORDS: usize = 9;

/// The record section's name for destination queue `queue`.
pub fn record_name(queue: &str) -> String {
    format!("{queue}.tunnel")
}

/// What a record says: the stream and the last sequence number written (0: nothing yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The stream (0: none yet).
    pub stream: u64,
    /// The last sequence number written into the queue.
    pub last: u64,
}

/// A handle on the record.
pub struct Record {
    section: Section,
}

impl Record {
    /// Opens the record of `queue`, creating it if needed.
    pub fn open(domain: &Domain, queue: &str) -> Result<Record> {
        let (section, _) = domain.create_or_open_section(&record_name(queue), 4096, &SectionOptions::new())?;
        section.commit(4096)?;
        let r = Record { section };
        let magic = r.w(0).load(Ordering::Acquire);
        if magic == 0 {
            // A fresh (zeroed) section: the zero slots mean "no stream yet". Release: pairs with
            // the Acquire above in a later opener.
            r.w(0).store(RECORD_MAGIC, Ordering::Release);
        } else if magic != RECORD_MAGIC {
            return Err(crate::Error(format!(
                "section {:?} is not a tunnel record (magic {magic:#x}, expected {RECORD_MAGIC:#x}); remove it with `shmgadget rm`",
                record_name(queue)
            )));
        }
        Ok(r)
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // `at` checks bounds and alignment; the section is one page.
        self.section.at::<AtomicU64>(i * 8).expect("a word inside the record page")
    }

    fn slot(&self) -> (usize, [u64; 3]) {
        // Acquire: pairs with the Release flip in `store`: the slot it names is complete.
        let cur = (self.w(1).load(Ordering::Acquire) & 1) as usize;
        let base = 2 + cur * 3;
        // Relaxed: ordered after the flip's Acquire above.
        (cur, [0, 1, 2].map(|i| self.w(base + i).load(Ordering::Relaxed)))
    }

    /// The progress recorded, given the destination queue's write position now (the
    /// position the importer's sender starts at) and the position of a dead predecessor's
    /// unfinished send that became a hole, if any (a slot queue's
    /// [`adopted_hole`](shmgadget::queue::SlotSender::adopted_hole)).
    pub fn load(&self, queue_pos: u64, hole: Option<u64>) -> Progress {
        let (_, [stream, last, pos]) = self.slot();
        if stream == 0 {
            return Progress { stream: 0, last: 0 };
        }
        // Killed between the write and the record: that one message went in. Killed while
        // sending the message after it, at the recorded position: that position is a hole.
        let last = if pos == queue_pos || hole == Some(pos) { last } else { last + 1 };
        Progress { stream, last }
    }

    /// Records that message `last` of `stream` was written and the queue's write position is
    /// now `queue_pos`.
    pub fn store(&self, stream: u64, last: u64, queue_pos: u64) {
        let (cur, _) = self.slot();
        let next = 1 - cur;
        let base = 2 + next * 3;
        // Relaxed: published by the Release flip below.
        self.w(base).store(stream, Ordering::Relaxed);
        self.w(base + 1).store(last, Ordering::Relaxed);
        self.w(base + 2).store(queue_pos, Ordering::Relaxed);
        // Release: publishes the slot (pairs with the Acquire in `slot`).
        self.w(1).store(next as u64, Ordering::Release);
        // Relaxed: a statistic.
        self.w(8).fetch_add(1, Ordering::Relaxed);
    }

    /// Messages written through this record (a statistic).
    pub fn written(&self) -> u64 {
        // Relaxed: a statistic.
        self.w(8).load(Ordering::Relaxed)
    }
}
