//! A shmgadget byte queue continued on another host, over [zenoh](https://zenoh.io).
//!
//! The **exporter** is the receiver of a local queue; it publishes what it reads to the zenoh
//! key `<key>/data`. The **importer**, on the other host, subscribes to it and is the sender
//! of a local queue of the same name (created with a given capacity if missing). Local
//! processes see an ordinary receiver (or sender): when a tunnel process dies, its local peer
//! is told `Disconnected`, as with any dead process. The key defaults to
//! `shmgadget/<domain>/<queue>` and can be overridden.
//!
//! # Protocol
//! Sequence numbers are the source queue's own message numbers ([`Kept::seq`]: 1 for the
//! first message ever sent into it), so they survive a restart of either side. A stream is
//! one incarnation of the source queue (its domain, name and section generation, hashed).
//!
//! - `data` frames (exporter to importer): stream, *floor* (messages of the source already
//!   consumed, i.e. acknowledged), the first sequence number, then the messages in order.
//! - `ack` frames (importer to exporter): stream, the last sequence number written into the
//!   destination queue (*acked*), a *window* (credit: the exporter sends nothing past
//!   `acked + window`), and a NACK flag: "resend everything after `acked`". The importer
//!   NACKs when it starts, when it sees a gap (zenoh dropped frames while it was away), and
//!   when it has heard nothing for a while (a heartbeat that also recovers a lost tail).
//!
//! **Nothing leaves the source before it is in the destination.** The exporter reads ahead
//! with [`Message::keep`](shmgadget::queue::Message::keep): kept messages stay in the source
//! ring, so a killed exporter's successor reads them again; only an ack commits them
//! ([`ByteReceiver::commit`](shmgadget::queue::ByteReceiver::commit)). A full source ring, a
//! used-up credit and zenoh's blocking congestion control slow the producer down; nothing is
//! ever dropped for speed.
//!
//! **Nothing is written twice.** The importer records in shared memory, next to the
//! destination queue (section `<queue>.tunnel`, see [`record`]), the stream, the last
//! sequence number it wrote and the queue's write position after it, after each message. A
//! restarted importer compares that position with the queue's: if the queue is one message
//! further, the importer was killed between the write and the record, and that message
//! counts as written. Replayed messages at or below the last one are dropped.
//!
//! The importer must be the destination queue's only sender.

#![deny(missing_docs)]

pub mod cli;
mod ends;
mod export;
mod import;
pub mod record;
pub mod stats;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub use ends::Plain;
pub use export::{export, export_blocks, export_slots};
pub use import::{import, import_blocks, import_slots};
pub use shmgadget::queue::Kept;

/// Where a tunnel end connects and what it carries.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The local queue's name.
    pub queue: String,
    /// The zenoh key prefix; default `shmgadget/<domain>/<queue>`.
    pub key: Option<String>,
    /// A zenoh configuration file (json5), applied before the options below.
    pub zenoh_config: Option<PathBuf>,
    /// zenoh mode: `peer` or `client` (default: zenoh's own, peer).
    pub mode: Option<String>,
    /// Endpoints to listen on, e.g. `tcp/10.77.0.1:7447`.
    pub listen: Vec<String>,
    /// Endpoints to connect to.
    pub connect: Vec<String>,
    /// Disable multicast scouting (use only the given endpoints).
    pub no_scouting: bool,
    /// Importer: the destination ring's capacity in bytes if it has to be created.
    pub capacity: u64,
    /// Importer: credit in messages (0: the default, 65536).
    pub window: u64,
    /// Set to stop the tunnel (it returns `Ok`); `None` runs until killed.
    pub stop: Option<Arc<AtomicBool>>,
    /// Print a line per second (messages per second, in flight) on stderr.
    pub verbose: bool,
}

/// Receive buffers zenoh keeps for reuse per link (without a zenoh config file): the
/// importer's channel of frames, plus the batch being read.
pub(crate) const RX_BATCHES: usize = import::FRAMES + 4;

/// The default credit, in messages.
pub const DEFAULT_WINDOW: u64 = 65536;

/// An error of a tunnel end: what happened and what to do next.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<shmgadget::Error> for Error {
    fn from(e: shmgadget::Error) -> Self {
        Error(e.to_string())
    }
}

/// Result of a tunnel end.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn zerr(what: &str, e: zenoh::Error) -> Error {
    Error(format!("zenoh: {what}: {e}; check the endpoints (--listen/--connect) and the zenoh config"))
}

impl Options {
    /// The key prefix this tunnel uses in `domain`.
    pub fn key_prefix(&self, domain: &str) -> String {
        self.key.clone().unwrap_or_else(|| format!("shmgadget/{domain}/{}", self.queue))
    }

    /// The zenoh configuration: the file, then mode, endpoints and scouting. Without a file,
    /// zenoh's defaults with quick reconnection, 16 transmit batches and receive buffers kept
    /// for reuse (see the README's tunnel section).
    pub fn zenoh_config(&self) -> Result<zenoh::Config> {
        let mut c = match &self.zenoh_config {
            Some(p) => zenoh::Config::from_file(p)
                .map_err(|e| Error(format!("cannot read zenoh config {}: {e}", p.display())))?,
            None => zenoh::Config::default(),
        };
        if self.zenoh_config.is_none() {
            // zenoh waits 1 s and more between attempts to reconnect: a tunnel end restarted
            // after a crash should be found again within a tenth of that.
            c.insert_json5(
                "connect/retry",
                r#"{"period_init_ms": 50, "period_max_ms": 500, "period_increase_factor": 1.5}"#,
            )
            .map_err(|e| Error(format!("zenoh config connect/retry: {e}")))?;
            // zenoh keeps `rx/buffer_size / batch_size` receive buffers for reuse (one by
            // default) and allocates (and zeroes) a fresh one for every batch while a sample
            // still holds the last: the importer holds up to its channel's worth of frames.
            c.insert_json5("transport/link/rx/buffer_size", &(RX_BATCHES * 65535).to_string())
                .map_err(|e| Error(format!("zenoh config transport/link/rx/buffer_size: {e}")))?;
            // The transmit queue of data messages: 16 batches (zenoh's most; 2 by default), so
            // that a sender blocks on the link less often while zenoh writes a batch.
            c.insert_json5("transport/link/tx/queue/size/data", "16")
                .map_err(|e| Error(format!("zenoh config transport/link/tx/queue/size/data: {e}")))?;
        }
        let json = |v: &[String]| format!("[{}]", v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(","));
        let set = |c: &mut zenoh::Config, k: &str, v: String| {
            c.insert_json5(k, &v).map_err(|e| Error(format!("zenoh config {k} = {v}: {e}")))
        };
        if let Some(m) = &self.mode {
            set(&mut c, "mode", format!("{m:?}"))?;
        }
        if !self.listen.is_empty() {
            set(&mut c, "listen/endpoints", json(&self.listen))?;
        }
        if !self.connect.is_empty() {
            set(&mut c, "connect/endpoints", json(&self.connect))?;
        }
        if self.no_scouting {
            set(&mut c, "scouting/multicast/enabled", "false".into())?;
        }
        Ok(c)
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// FNV-1a, for stream identities (stable across builds and hosts).
pub(crate) fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}
