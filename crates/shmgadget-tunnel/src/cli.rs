//! `shmgadget tunnel export|import QUEUE ...`: the command line of a tunnel end, for the
//! `shmgadget` CLI (feature `tunnel`).

use std::path::{Path, PathBuf};

use shmgadget::{Domain, DomainOptions};

use crate::{Options, Result};

/// Continue a byte queue on another host over zenoh: `export` here, `import` there.
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
    /// The local queue (a byte queue).
    queue: String,
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
    /// Import: ring bytes of the queue if it has to be created (K, M, G suffixes).
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
    if export { crate::export(&d, &opts) } else { crate::import(&d, &opts) }
}
