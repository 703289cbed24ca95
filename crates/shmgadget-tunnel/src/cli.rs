//! `shmgadget tunnel export|import QUEUE ...`: the command line of a tunnel end, for the
//! `shmgadget` CLI (feature `tunnel`).

use std::path::{Path, PathBuf};

use shmgadget::{Domain, DomainOptions};

use crate::{Options, Result};

/// Continue a queue on another host over zenoh: `export` here, `import` there.
#[derive(clap::Args, Debug)]
pub struct TunnelArgs {
    #[command(subcommand)]
    end: End,
}

#[derive(clap::Subcommand, Debug)]
enum End {
    /// Become the receiver of local queue QUEUE and publish its messages to zenoh; a message
    /// leaves the queue only once the importer has written it. Runs until killed.
    Export(EndArgs),
    /// Subscribe to QUEUE's messages and become the sender of local queue QUEUE (created with
    /// --capacity if missing). Runs until killed.
    Import(EndArgs),
}

#[derive(clap::Args, Debug)]
struct EndArgs {
    /// The local queue (a byte queue, unless --slots or --heap).
    queue: String,
    /// A slot queue of values of this many bytes (both ends must agree).
    #[arg(long, value_name = "BYTES", conflicts_with = "heap")]
    slots: Option<usize>,
    /// With --slots: the values' alignment (default: the largest power of two up to 16
    /// dividing BYTES).
    #[arg(long, requires = "slots")]
    align: Option<usize>,
    /// A slot queue of heap blocks (zero-copy locally): export reads and frees blocks of heap
    /// NAME, import copies each into a new block of heap NAME (created if missing).
    #[arg(long, value_name = "NAME")]
    heap: Option<String>,
    /// Import with --heap: bytes reserved for the heap if it has to be created.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    heap_size: u64,
    /// zenoh key prefix (default shmgadget/<domain>/<queue>); both ends must agree.
    #[arg(long)]
    key: Option<String>,
    /// zenoh configuration file (json5); the options below override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// zenoh mode.
    #[arg(long, value_parser = ["peer", "client"])]
    mode: Option<String>,
    /// Endpoint to listen on, e.g. tcp/10.77.0.1:7447 (repeatable).
    #[arg(long, short = 'l')]
    listen: Vec<String>,
    /// Endpoint to connect to, e.g. tcp/10.77.0.1:7447 (repeatable).
    #[arg(long, short = 'e')]
    connect: Vec<String>,
    /// No multicast scouting: talk only to the endpoints given.
    #[arg(long)]
    no_scouting: bool,
    /// Import: ring bytes (byte queue) or values (slot queue) of the queue if it has to be
    /// created (K, M, G suffixes).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    capacity: u64,
    /// Import: credit, in messages, the exporter may have in flight.
    #[arg(long, default_value_t = crate::DEFAULT_WINDOW)]
    window: u64,
    /// A line per second on stderr: messages per second, messages in flight.
    #[arg(long, short = 'v')]
    verbose: bool,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let (num, mul) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_owned(), 1 << 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_owned(), 1 << 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_owned(), 1 << 30),
        t => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size such as 65536, 64K or 1M"))
}

/// Runs a tunnel end in domain `domain` (shm directory `shm_dir`, else the default).
pub fn run(domain: &str, shm_dir: Option<&Path>, args: &TunnelArgs) -> Result<()> {
    let d =
        Domain::attach_with(domain, &DomainOptions { shm_dir: shm_dir.map(Path::to_path_buf), ..Default::default() })?;
    let (export, a) = match &args.end {
        End::Export(a) => (true, a),
        End::Import(a) => (false, a),
    };
    let opts = Options {
        queue: a.queue.clone(),
        key: a.key.clone(),
        zenoh_config: a.config.clone(),
        mode: a.mode.clone(),
        listen: a.listen.clone(),
        connect: a.connect.clone(),
        no_scouting: a.no_scouting,
        capacity: a.capacity,
        window: a.window,
        stop: None,
        verbose: a.verbose,
    };
    eprintln!(
        "shmgadget tunnel: {} {:?} in domain {:?} as zenoh key {}/data",
        if export { "exporting" } else { "importing" },
        opts.queue,
        d.name(),
        opts.key_prefix(d.name())
    );
    if let Some(heap) = &a.heap {
        return if export {
            crate::export_blocks(&d, heap, &opts)
        } else {
            crate::import_blocks(&d, heap, a.heap_size, &opts)
        };
    }
    match a.slots {
        None if export => crate::export(&d, &opts),
        None => crate::import(&d, &opts),
        Some(size) => {
            let align = a.align.unwrap_or(1 << size.trailing_zeros().min(4));
            slots(export, size, align, &d, &opts)
        }
    }
}

macro_rules! elem {
    ($($name:ident = $align:literal),*) => { $(
        #[repr(C, align($align))]
        #[derive(Clone, Copy)]
        struct $name<const N: usize>([u8; N]);
        // SAFETY: plain bytes, no pointers.
        unsafe impl<const N: usize> shmgadget::ShmSafe for $name<N> {}
        // SAFETY: every bit pattern of a byte array is valid (padding: none, N is a multiple
        // of the alignment wherever it is used below).
        unsafe impl<const N: usize> shmgadget::AnyBitPattern for $name<N> {}
    )* };
}
elem!(A1 = 1, A2 = 2, A4 = 4, A8 = 8, A16 = 16);

/// Slot queues of opaque values of `size` bytes aligned to `align`: the element types the
/// command line knows (the library's `export_slots`/`import_slots` take any `Plain` type).
fn slots(export: bool, size: usize, align: usize, d: &Domain, o: &Options) -> Result<()> {
    macro_rules! go {
        ($($t:ident: $($n:literal)*;)*) => {
            match (align, size) {
                $($((a, $n) if a == align_of::<$t<$n>>() => {
                    if export { crate::export_slots::<$t<$n>>(d, o) } else { crate::import_slots::<$t<$n>>(d, o) }
                })*)*
                _ => Err(crate::Error(format!(
                    "slot queues of {size}-byte values aligned to {align} are not supported by the command line (sizes 1-64 and 128, 256, 512, 1024, 4096 aligned to 1-16, as the size allows); use the library (`shmgadget_tunnel::export_slots`)"
                ))),
            }
        };
    }
    go!(
        A1: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 24 32 40 48 56 64;
        A2: 2 4 6 8 10 12 14 16 20 24 32 40 48 56 64;
        A4: 4 8 12 16 20 24 28 32 40 48 56 64 128 256;
        A8: 8 16 24 32 40 48 56 64 128 256 512 1024 4096;
        A16: 16 32 48 64 128 256 512 1024 4096;
    )
}
