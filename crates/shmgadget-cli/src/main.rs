//! `shmgadget`: inspect and manage shmgadget shared-memory domains.

mod demo;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use shmgadget::inspect::{self, DomainEntry, DomainReport};
use shmgadget::{Domain, DomainOptions, Lifetime, SectionInfo, SectionKind, SectionOptions};

use size::{format_size, parse_size};

/// Shared memory at the same address in every process: list, inspect, create, remove and
/// clean up shmgadget domains and sections.
#[derive(Parser)]
#[command(name = "shmgadget", version, about, long_about = None)]
struct Cli {
    /// Domain to work on.
    #[arg(long, short = 'd', global = true, env = "SHMGADGET_DOMAIN", default_value = "default")]
    domain: String,

    /// Directory of the backing objects (a tmpfs or hugetlbfs mount).
    #[arg(long, global = true, env = "SHMGADGET_SHM_DIR")]
    shm_dir: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every domain on this machine: window, sections, attached and live processes.
    Domains,
    /// List the sections of a domain.
    Ls,
    /// Show one section in detail.
    Info {
        /// Section name.
        name: String,
    },
    /// Create a section (persistent unless --transient).
    Create {
        /// Section name: 1 to 63 characters of A-Z a-z 0-9 . _ -
        name: String,
        /// Reserved size, e.g. 4096, 64K, 1M, 16G (binary units).
        #[arg(long, short = 's', value_parser = parse_size)]
        size: u64,
        /// Delete the section when no process is attached to the domain any more (so, when
        /// nothing else is attached, as soon as this command exits).
        #[arg(long)]
        transient: bool,
        /// Permission bits, in octal.
        #[arg(long, default_value = "600", value_parser = parse_mode)]
        mode: u32,
        /// Bytes to commit up front (guaranteed backing).
        #[arg(long, value_parser = parse_size)]
        commit: Option<u64>,
        /// What the section holds: raw bytes, or a shared heap.
        #[arg(long, default_value = "raw", value_parser = ["raw", "heap", "queue"])]
        kind: String,
    },
    /// Show a heap: statistics, named objects, and optionally its blocks or a full check.
    Heap {
        /// Heap (section) name.
        name: String,
        /// Also list every block (offset, size, free/used).
        #[arg(long)]
        blocks: bool,
        /// Walk every block and check every invariant; exit with status 1 on a violation.
        #[arg(long)]
        check: bool,
    },
    /// Delete a section for every process.
    Rm {
        /// Section name.
        name: String,
    },
    /// Remove what dead processes left behind: sections their creator died while making, their
    /// attachments, transient sections of domains with no live process, empty registries and
    /// orphaned objects.
    Gc {
        /// Clean every domain, not only --domain.
        #[arg(long)]
        all: bool,
        /// Also remove registries that fail validation (only when nothing uses them).
        #[arg(long)]
        force: bool,
    },
    /// Show shmgadget at work: two separate processes share a pointer-linked structure.
    Demo {
        /// Number of nodes in the linked structure.
        #[arg(long, default_value_t = 100_000)]
        nodes: u64,
    },
    /// Internal: one process of the demo.
    #[command(hide = true)]
    DemoWorker {
        role: String,
        #[arg(long)]
        nodes: u64,
        #[arg(long, default_value_t = 0)]
        index: u64,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode between 0 and 777"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmgadget: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(cli: &Cli) -> DomainOptions {
    DomainOptions { shm_dir: cli.shm_dir.clone(), ..Default::default() }
}

fn run(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match &cli.command {
        Command::Domains => cmd_domains(cli)?,
        Command::Ls => return cmd_ls(cli),
        Command::Info { name } => return cmd_info(cli, name),
        Command::Create { name, size, kind, .. } if kind == "heap" => {
            let domain = Domain::attach_with(&cli.domain, &options(cli))?;
            let heap = shmgadget::heap::Heap::create(&domain, name, *size)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&heap.stats()?)?);
            } else {
                println!(
                    "created heap {name:?} in domain {:?} at {:#x}, {} reserved",
                    cli.domain,
                    heap.section().as_ptr() as usize,
                    format_size(heap.section().len() as u64)
                );
            }
        }
        Command::Heap { name, blocks, check } => return cmd_heap(cli, name, *blocks, *check),
        Command::Create { name, size, kind, .. } if kind == "queue" => {
            let domain = Domain::attach_with(&cli.domain, &options(cli))?;
            let q = shmgadget::queue::ByteQueue::create(&domain, name, *size)?;
            println!(
                "created byte queue {name:?} in domain {:?}: {} ring, messages up to {} bytes",
                cli.domain,
                format_size(q.capacity()),
                q.max_message()
            );
        }
        Command::Create { name, size, transient, mode, commit, .. } => {
            let domain = Domain::attach_with(&cli.domain, &options(cli))?;
            let mut opts = SectionOptions::new().mode(*mode).kind(SectionKind::Raw);
            if *transient {
                opts = opts.transient();
            }
            let section = domain.create_section(name, *size, &opts)?;
            if let Some(len) = commit {
                section.commit(*len)?;
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&section.info())?);
            } else {
                println!(
                    "created section {name:?} in domain {:?} at {:#x}, {} reserved",
                    cli.domain,
                    section.as_ptr() as usize,
                    format_size(section.len() as u64)
                );
            }
        }
        Command::Rm { name } => {
            let opts = DomainOptions { must_exist: true, ..options(cli) };
            let domain = Domain::attach_with(&cli.domain, &opts)?;
            domain.delete_section(name)?;
            domain.detach()?;
            if !cli.json {
                println!("removed section {name:?} from domain {:?}", cli.domain);
            }
        }
        Command::Gc { all, force } => {
            let domain = (!all).then_some(cli.domain.as_str());
            let report = inspect::gc(domain, cli.shm_dir.as_deref(), *force)?;
            for (d, what) in &report.damaged {
                eprintln!("shmgadget: damage in domain {d:?}: {what}");
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (d, what) in &report.broken_locks {
                    println!("broke a lock of domain {d:?}: {what}");
                }
                for (d, pid) in &report.dead_processes {
                    println!("cleared dead process {pid} from domain {d:?}");
                }
                for (d, s, pid) in &report.removed_unfinished {
                    println!(
                        "removed unfinished section {s:?} of domain {d:?} (its creator, pid {pid}, died while creating it)"
                    );
                }
                for (d, s) in &report.removed_sections {
                    println!("removed transient section {s:?} of domain {d:?}");
                }
                for d in &report.removed_domains {
                    println!("removed domain {d:?} (no live process, no persistent section)");
                }
                for o in &report.removed_orphans {
                    println!("removed orphaned object {o:?}");
                }
                for (d, why) in &report.skipped {
                    if !report.damaged.iter().any(|(dd, _)| dd == d) {
                        println!("skipped domain {d:?}: {why}");
                    }
                }
                let n = report.dead_processes.len()
                    + report.broken_locks.len()
                    + report.removed_unfinished.len()
                    + report.removed_sections.len()
                    + report.removed_domains.len()
                    + report.removed_orphans.len();
                if n == 0 && report.skipped.is_empty() && report.damaged.is_empty() {
                    println!("nothing to clean up");
                }
            }
            if !report.damaged.is_empty() {
                // Damage is not cleaned up: say so with the exit status too.
                return Ok(ExitCode::from(1));
            }
        }
        Command::Demo { nodes } => return demo::run(cli.shm_dir.as_deref(), *nodes),
        Command::DemoWorker { role, nodes, index } => {
            return demo::worker(&cli.domain, cli.shm_dir.as_deref(), role, *nodes, *index);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_domains(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let domains = inspect::list_domains(cli.shm_dir.as_deref())?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&domains)?);
        return Ok(());
    }
    if domains.is_empty() {
        println!("no domains in {}", shm_dir_shown(cli));
        return Ok(());
    }
    let mut t = table(&["domain", "window", "size", "sections", "reserved", "resident", "attached", "live"]);
    for d in &domains {
        match d {
            DomainEntry::Ok(r) => {
                let reserved: u64 = r.sections.iter().map(|s| s.reserved).sum();
                let resident: u64 = r.sections.iter().filter_map(|s| s.resident).sum();
                t.add_row(vec![
                    r.name.clone(),
                    format!("{:#x}-{:#x}", r.window_base, r.window_base + r.window_size),
                    format_size(r.window_size),
                    r.sections.len().to_string(),
                    format_size(reserved),
                    format_size(resident),
                    r.processes.len().to_string(),
                    r.processes.iter().filter(|p| p.alive).count().to_string(),
                ]);
                if !r.damaged.is_empty() || !r.problems.is_empty() {
                    t.add_row(vec![r.name.clone(), format!("damaged: {}", damage_lines(r).join("; "))]);
                }
            }
            DomainEntry::Unreadable { name, error } => {
                t.add_row(vec![name.clone(), format!("unreadable: {error}")]);
            }
        }
    }
    println!("{t}");
    Ok(())
}

fn shm_dir_shown(cli: &Cli) -> String {
    DomainOptions { shm_dir: cli.shm_dir.clone(), ..Default::default() }.resolved_shm_dir().display().to_string()
}

fn section_row(s: &SectionInfo) -> Vec<String> {
    vec![
        s.name.clone(),
        s.kind.as_str().to_owned(),
        format!("{:#x}-{:#x}", s.address, s.address + s.reserved),
        format_size(s.reserved),
        format_size(s.committed),
        s.resident.map(format_size).unwrap_or_else(|| "-".into()),
        s.lifetime.as_str().to_owned(),
        s.owner_uid.to_string(),
        format!("{:o}", s.mode),
    ]
}

/// One line per damaged entry or registry problem of a domain.
fn damage_lines(r: &DomainReport) -> Vec<String> {
    let mut v: Vec<String> = r.problems.clone();
    v.extend(
        r.damaged.iter().map(|e| format!("slot {} ({:?}, generation {}): {}", e.slot, e.name, e.generation, e.problem)),
    );
    v
}

/// Prints a domain's damage to stderr; the exit status for a listing that found some.
fn report_damage(r: &DomainReport) -> ExitCode {
    let lines = damage_lines(r);
    for l in &lines {
        eprintln!("shmgadget: damaged entry in domain {:?}: {l}", r.name);
    }
    if lines.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "shmgadget: domain {:?}'s registry is damaged; `shmgadget gc` leaves it alone, `shmgadget gc --domain {} --force` removes only what is proven unused",
            r.name, r.name
        );
        ExitCode::from(1)
    }
}

fn cmd_ls(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report: DomainReport = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
    if cli.json {
        let mut list = serde_json::to_value(&report.sections)?;
        if let Some(a) = list.as_array_mut() {
            for e in &report.damaged {
                let mut v = serde_json::to_value(e)?;
                v["damaged"] = serde_json::Value::Bool(true);
                a.push(v);
            }
        }
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(report_damage(&report));
    }
    if report.sections.is_empty() && report.damaged.is_empty() {
        println!("domain {:?} has no sections", report.name);
        return Ok(report_damage(&report));
    }
    let mut t =
        table(&["name", "kind", "address range", "reserved", "committed", "resident", "lifetime", "owner", "mode"]);
    for s in &report.sections {
        t.add_row(section_row(s));
    }
    for e in &report.damaged {
        t.add_row(vec![
            e.name.clone(),
            "DAMAGED".to_owned(),
            format!("slot {}, generation {}: {}", e.slot, e.generation, e.problem),
        ]);
    }
    println!("{t}");
    for s in report.sections.iter().filter(|s| s.kind == SectionKind::Queue) {
        if let Some(q) = queue_info(cli, &s.name) {
            println!("queue {}: {}", s.name, describe_queue(&q));
        }
    }
    Ok(report_damage(&report))
}

/// A queue section's live state, if it can be read.
fn queue_info(cli: &Cli, name: &str) -> Option<shmgadget::queue::QueueInfo> {
    let domain = Domain::attach_with(&cli.domain, &DomainOptions { must_exist: true, ..options(cli) }).ok()?;
    let section = domain.open_section(name).ok()?;
    shmgadget::queue::inspect(&section).ok()
}

fn describe_queue(q: &shmgadget::queue::QueueInfo) -> String {
    let peers = |v: &[(u32, bool)]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter()
                .map(|(p, alive)| format!("{p}{}", if *alive { "" } else { " (dead)" }))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let unit = if q.kind == "bytes" { "bytes" } else { "messages" };
    format!(
        "{} queue, {} of {} {unit} waiting, {} sent, {} received; senders: {}; receivers: {}",
        q.kind,
        q.fill,
        q.capacity,
        q.sent,
        q.received,
        peers(&q.senders),
        peers(&q.receivers)
    )
}

fn cmd_info(cli: &Cli, name: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
    let Some(s) = report.sections.iter().find(|s| s.name == name) else {
        if let Some(e) = report.damaged.iter().find(|e| e.name == name) {
            return Err(format!(
                "section {name:?} of domain {:?} is damaged: slot {}, generation {}: {}",
                cli.domain, e.slot, e.generation, e.problem
            )
            .into());
        }
        if !report.damaged.is_empty() {
            return Err(format!(
                "no valid section {name:?} in domain {:?}, whose registry has {} damaged entries (`shmgadget ls --domain {}` lists them)",
                cli.domain,
                report.damaged.len(),
                cli.domain
            )
            .into());
        }
        return Err(format!(
            "no section {name:?} in domain {:?}; `shmgadget ls --domain {}` lists its sections",
            cli.domain, cli.domain
        )
        .into());
    };
    let queue = if s.kind == SectionKind::Queue { queue_info(cli, name) } else { None };
    if cli.json {
        let mut v = serde_json::to_value(s)?;
        if let Some(q) = &queue {
            v["queue"] = serde_json::to_value(q)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let lifetime = match s.lifetime {
        Lifetime::Persistent => "persistent (until deleted)",
        Lifetime::Transient => "transient (until the last process detaches)",
    };
    let rows = [
        ("name", s.name.clone()),
        ("domain", report.name.clone()),
        ("kind", s.kind.as_str().to_owned()),
        ("address", format!("{:#x}-{:#x}", s.address, s.address + s.reserved)),
        ("reserved", format!("{} ({} bytes)", format_size(s.reserved), s.reserved)),
        ("committed", format!("{} ({} bytes)", format_size(s.committed), s.committed)),
        ("resident", s.resident.map(|r| format!("{} ({r} bytes)", format_size(r))).unwrap_or_else(|| "unknown".into())),
        ("lifetime", lifetime.to_owned()),
        ("owner uid", s.owner_uid.to_string()),
        ("mode", format!("{:o}", s.mode)),
        ("generation", s.generation.to_string()),
        ("created by pid", s.creator_pid.to_string()),
        ("object", format!("{}/{}", shm_dir_shown(cli), s.object)),
    ];
    for (k, v) in rows {
        println!("{k:>15}  {v}");
    }
    if let Some(q) = &queue {
        println!("{:>15}  {}", "queue", describe_queue(q));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_heap(cli: &Cli, name: &str, blocks: bool, check: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let domain = Domain::attach_with(&cli.domain, &DomainOptions { must_exist: true, ..options(cli) })?;
    let heap = shmgadget::heap::Heap::open(&domain, name)?;
    let stats = heap.stats()?;
    let named = heap.named_objects()?;
    let dump = if blocks { heap.dump(100_000)? } else { Vec::new() };
    let verdict = if check { Some(heap.check()) } else { None };
    if cli.json {
        let v = serde_json::json!({
            "name": name,
            "address": heap.section().as_ptr() as u64,
            "stats": stats,
            "named_objects": named,
            "blocks": dump,
            "check": verdict.as_ref().map(|r| match r { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() }),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let b = &stats.blocks;
        let rows = [
            ("heap", format!("{name} in domain {}", cli.domain)),
            ("address", format!("{:#x}", heap.section().as_ptr() as usize)),
            ("reserved", format_size(stats.reserved)),
            ("committed", format_size(stats.committed)),
            ("used", format!("{} in {} blocks", format_size(b.used_bytes), b.used_blocks)),
            ("free", format!("{} in {} blocks", format_size(b.free_bytes), b.free_blocks)),
            ("largest free", format_size(b.largest_free)),
            ("fragmentation", format!("{:.1}%", stats.fragmentation * 100.0)),
            ("thread caches", format!("{} in {} blocks", format_size(stats.cached_bytes), stats.cached_blocks)),
            ("allocs / frees", format!("{} / {}", b.allocs, b.frees)),
            ("recoveries", stats.recoveries.to_string()),
        ];
        for (k, v) in rows {
            println!("{k:>15}  {v}");
        }
        if !named.is_empty() {
            let mut t = table(&["named object", "kind", "address", "size", "state"]);
            for o in &named {
                t.add_row(vec![
                    o.name.clone(),
                    o.kind.as_str().to_owned(),
                    format!("{:#x}", o.address),
                    format_size(o.size),
                    o.state.map(describe_state).unwrap_or_default(),
                ]);
            }
            println!("{t}");
        }
        if blocks {
            let mut t = table(&["offset", "size", "state"]);
            for blk in &dump {
                t.add_row(vec![
                    format!("{:#x}", blk.offset),
                    blk.size.to_string(),
                    if blk.free {
                        "free"
                    } else if blk.cached {
                        "cached"
                    } else {
                        "used"
                    }
                    .into(),
                ]);
            }
            println!("{t}");
        }
        match &verdict {
            Some(Ok(())) => println!("check: every block and free list is consistent"),
            Some(Err(e)) => println!("check FAILED: {e}"),
            None => {}
        }
    }
    Ok(if matches!(verdict, Some(Err(_))) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn describe_state(s: shmgadget::heap::ObjectState) -> String {
    use shmgadget::heap::ObjectState;
    match s {
        ObjectState::Semaphore { count, waiters } => format!("count {count}, {waiters} waiting"),
        ObjectState::Event { set, waiters } => {
            format!("{}, {waiters} waiting", if set { "set" } else { "reset" })
        }
        ObjectState::Condvar { waiters } => format!("{waiters} waiting"),
        ObjectState::Mutex { owner: None, .. } => "free".to_owned(),
        ObjectState::Mutex { owner: Some(pid), owner_alive, inconsistent } => format!(
            "held by pid {pid} ({}){}",
            if owner_alive == Some(false) { "dead: the next locker recovers it" } else { "alive" },
            if inconsistent { ", data not repaired since a holder died" } else { "" }
        ),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.to_vec());
    t
}
