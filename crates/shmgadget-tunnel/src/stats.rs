//! What a running tunnel end publishes for `shmgadget ls`/`top`: section
//! `<queue>.tunnel-export` or `<queue>.tunnel-import` (one page) in the end's domain.
//!
//! # Layout ([`StatsShared`], `#[repr(C)]`, words little-endian as the host is)
//! | field | meaning | written by |
//! |---|---|---|
//! | `magic` | [`STATS_MAGIC`] | the creator, once |
//! | `version`, `end` | layout version 1; 1 exporter, 2 importer | the creator, once |
//! | `token` | the running end's peer token (its registration in the domain), 0 when it stopped | the end: Release, after the key |
//! | `pid` | the running end's pid (for display) | the end, before `token` |
//! | `forwarded` | messages acknowledged by the importer (exporter) / written into the queue (importer), since this end started | the end: Relaxed |
//! | `in_flight` | messages sent and not yet acknowledged (exporter), 0 (importer) | the end: Relaxed |
//! | `rate_bits` | messages per second over the last second (an f64's bits) | the end: Relaxed, each second |
//! | `key_len`, `key` | the zenoh key prefix (at most 256 bytes) | the end, before `token` |
//!
//! A reader (`ls`) validates magic, version and end, reads `token` (Acquire) and the key, and
//! shows an end whose token is 0 or names a dead process as dead, without its numbers.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use shmgadget::{Domain, Section, SectionOptions};

use crate::{Error, Result};

/// Magic word of a stats section ("SGTUNSTA").
pub const STATS_MAGIC: u64 = 0x4154_534e_5554_4753;
const VERSION: u32 = 1;
const KEY_WORDS: usize = 32;

/// The shared layout.
#[repr(C)]
pub struct StatsShared {
    magic: AtomicU64,
    version: AtomicU32,
    end: AtomicU32,
    token: AtomicU64,
    pid: AtomicU64,
    forwarded: AtomicU64,
    in_flight: AtomicU64,
    rate_bits: AtomicU64,
    key_len: AtomicU64,
    key: [AtomicU64; KEY_WORDS],
}

// SAFETY: atomics only (Sync), and every bit pattern of them is a valid value; validated by
// its magic, version and end before its numbers are believed.
unsafe impl shmgadget::InPlace for StatsShared {}

const _: () = assert!(size_of::<StatsShared>() == 64 + KEY_WORDS * 8);
const _: () = assert!(std::mem::offset_of!(StatsShared, token) == 16);
const _: () = assert!(std::mem::offset_of!(StatsShared, forwarded) == 32);
const _: () = assert!(std::mem::offset_of!(StatsShared, key) == 64);
const _: () = assert!(size_of::<StatsShared>() <= 4096);

/// The stats section's name for `queue`'s exporter (`export`) or importer.
pub fn stats_name(queue: &str, export: bool) -> String {
    format!("{queue}.tunnel-{}", if export { "export" } else { "import" })
}

/// A running end's handle on its stats.
pub(crate) struct Stats {
    section: Section,
    t: Instant,
    n: u64,
}

fn shared(section: &Section) -> Result<&StatsShared> {
    section.at::<StatsShared>(0).map_err(Error::from)
}

impl Stats {
    /// Opens (creating if needed) the stats of `queue`'s end and marks this process as it.
    pub(crate) fn open(domain: &Domain, queue: &str, export: bool, key: &str) -> Result<Stats> {
        let name = stats_name(queue, export);
        let (section, _) = domain.create_or_open_section(&name, 4096, &SectionOptions::new())?;
        section.commit(4096)?;
        let s = shared(&section)?;
        let end = if export { 1 } else { 2 };
        // Acquire: pairs with the Release below in an earlier creator.
        match s.magic.load(Ordering::Acquire) {
            0 => {
                // Relaxed: published by the Release of `magic`.
                s.version.store(VERSION, Ordering::Relaxed);
                s.end.store(end, Ordering::Relaxed);
                s.magic.store(STATS_MAGIC, Ordering::Release);
            }
            STATS_MAGIC if s.version.load(Ordering::Relaxed) == VERSION && s.end.load(Ordering::Relaxed) == end => {}
            m => {
                return Err(Error(format!(
                    "section {name:?} is not a tunnel stats section of this version (magic {m:#x}); remove it with `shmgadget rm`"
                )));
            }
        }
        // Relaxed: published by the Release of `token`.
        s.token.store(0, Ordering::Relaxed);
        let bytes = key.as_bytes();
        let len = bytes.len().min(KEY_WORDS * 8);
        for (i, w) in s.key.iter().enumerate() {
            let mut b = [0u8; 8];
            for (j, x) in b.iter_mut().enumerate() {
                *x = *bytes[..len].get(i * 8 + j).unwrap_or(&0);
            }
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        s.key_len.store(len as u64, Ordering::Relaxed);
        s.pid.store(std::process::id() as u64, Ordering::Relaxed);
        s.forwarded.store(0, Ordering::Relaxed);
        s.in_flight.store(0, Ordering::Relaxed);
        s.rate_bits.store(0, Ordering::Relaxed);
        // Release: the key and counters above before the token that says they are live.
        s.token.store(domain.peer_token(), Ordering::Release);
        Ok(Stats { section, t: Instant::now(), n: 0 })
    }

    fn s(&self) -> &StatsShared {
        shared(&self.section).expect("validated at open")
    }

    /// Publishes the counters (and, once a second, the rate).
    pub(crate) fn update(&mut self, forwarded: u64, in_flight: u64) {
        let s = shared(&self.section).expect("validated at open");
        // Relaxed: statistics.
        s.forwarded.store(forwarded, Ordering::Relaxed);
        s.in_flight.store(in_flight, Ordering::Relaxed);
        let dt = self.t.elapsed().as_secs_f64();
        if dt >= 1.0 {
            let rate = forwarded.saturating_sub(self.n) as f64 / dt;
            s.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
            (self.t, self.n) = (Instant::now(), forwarded);
        }
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        // Release: the end stopped (a killed end leaves its token, which names a dead process).
        self.s().token.store(0, Ordering::Release);
    }
}

/// What `ls` shows for a tunnel end.
#[derive(Clone, Debug, PartialEq)]
pub struct EndInfo {
    /// `"export"` or `"import"`.
    pub end: &'static str,
    /// The zenoh key prefix.
    pub key: String,
    /// Pid of the running end; `None` if it stopped or died.
    pub pid: Option<u32>,
    /// Messages acknowledged (exporter) or written (importer), if running.
    pub forwarded: Option<u64>,
    /// Messages per second over the last second, if running.
    pub rate: Option<f64>,
    /// Messages sent and not yet acknowledged (exporter), if running.
    pub in_flight: Option<u64>,
}

/// Reads a tunnel stats section (see [`stats_name`]); `None` if `section` is not one.
pub fn inspect(domain: &Domain, section: &Section) -> Result<Option<EndInfo>> {
    if !(section.name().ends_with(".tunnel-export") || section.name().ends_with(".tunnel-import")) {
        return Ok(None);
    }
    let s = shared(section)?;
    // Acquire: pairs with the creator's Release.
    let (magic, version, end) =
        (s.magic.load(Ordering::Acquire), s.version.load(Ordering::Relaxed), s.end.load(Ordering::Relaxed));
    if magic != STATS_MAGIC || version != VERSION || !(1..=2).contains(&end) {
        return Err(Error(format!(
            "section {:?} is not a valid tunnel stats section (magic {magic:#x}, version {version}, end {end})",
            section.name()
        )));
    }
    // Acquire: pairs with the end's Release (its key is written before).
    let token = s.token.load(Ordering::Acquire);
    // Relaxed: ordered by the Acquire above.
    let len = (s.key_len.load(Ordering::Relaxed) as usize).min(KEY_WORDS * 8);
    let mut key: Vec<u8> = s.key.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
    key.truncate(len);
    let alive = token != 0 && domain.peer_alive(token);
    // Relaxed: statistics.
    let live = |v: u64| alive.then_some(v);
    Ok(Some(EndInfo {
        end: if end == 1 { "export" } else { "import" },
        key: String::from_utf8_lossy(&key).into_owned(),
        pid: alive.then_some(s.pid.load(Ordering::Relaxed) as u32),
        forwarded: live(s.forwarded.load(Ordering::Relaxed)),
        rate: alive.then(|| f64::from_bits(s.rate_bits.load(Ordering::Relaxed))),
        in_flight: live(s.in_flight.load(Ordering::Relaxed)),
    }))
}
