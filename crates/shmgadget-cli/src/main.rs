//! `shmgadget`: inspect and manage shmgadget shared-memory domains.

mod demo;
mod domain_cmd;
mod extras;
mod json;
mod mem_cmd;
mod out;
mod ps;
mod size;
mod top;
mod tunnel_rows;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfy_table::Table;
use shmgadget::inspect::{self, DomainEntry, DomainReport};
use shmgadget::{Domain, DomainOptions, Error, ErrorKind, Lifetime, SectionInfo, SectionKind, SectionOptions};

use out::{errln, outln};
use size::{format_size, parse_section_size, parse_size};

/// Shared memory at the same address in every process: list, inspect, create, remove and
/// clean up shmgadget domains and sections.
#[derive(Parser)]
#[command(name = "shmgadget", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Domain to work on.
    #[arg(long, short = 'd', global = true, env = "SHMGADGET_DOMAIN", default_value = "default")]
    pub(crate) domain: String,

    /// Directory of the backing objects (a tmpfs or hugetlbfs mount).
    #[arg(long, global = true, env = "SHMGADGET_SHM_DIR")]
    pub(crate) shm_dir: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// Work on domains and sections owned by another user (root cleaning up after others, or
    /// joining a domain shared with `domain create --mode 666`); refused by default.
    #[arg(long, global = true)]
    pub(crate) allow_foreign_owner: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every domain on this machine: window, sections, attached and live processes.
    Domains,
    /// List the sections of a domain.
    Ls,
    /// Show one section in detail, or without a name the domain: creation time, creator, mode
    /// and limits.
    Info {
        /// Section name (none: the domain itself).
        name: Option<String>,
    },
    /// List the processes attached to a domain: pid, command, liveness, attach time.
    Ps,
    /// A live view of a domain, refreshed every second (q quits): processes, sections, heaps,
    /// queues and named sync objects, with rates. Attaches to the domain to read them.
    Top {
        /// Sample twice, a second apart, print one frame as text (or JSON) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print a shell completion script, e.g. `shmgadget completions bash > /etc/bash_completion.d/shmgadget`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: extras::Shell,
    },
    /// Print the man page (roff), e.g. `shmgadget man | man -l -`.
    Man,
    /// Create or remove a whole domain (one shared by a group or everyone, for instance).
    Domain {
        #[command(subcommand)]
        action: domain_cmd::DomainAction,
    },
    /// Create a section (persistent unless --transient), and the domain if it does not exist
    /// (announced on stderr).
    Create {
        /// Section name: 1 to 63 characters of A-Z a-z 0-9 . _ -, not starting with - or .
        name: String,
        /// Reserved size, e.g. 4096, 64K, 1M, 16G (binary units).
        #[arg(long, short = 's', value_parser = parse_section_size)]
        size: u64,
        /// Delete the section when no process is attached to the domain any more (so, when
        /// nothing else is attached, as soon as this command exits).
        #[arg(long)]
        transient: bool,
        /// Permission bits, in octal (default: the domain's mode, 600 unless made by
        /// `domain create --mode`).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
        /// Bytes to commit up front (guaranteed backing).
        #[arg(long, value_parser = parse_size)]
        commit: Option<u64>,
        /// What the section holds: raw bytes, a shared heap, or a byte queue (one sender, one
        /// receiver; --size is its ring). --transient, --commit and --mode apply to raw only.
        #[arg(long, default_value = "raw", value_parser = ["raw", "heap", "queue"])]
        kind: String,
        /// Back the section (raw or heap) by this regular file: created with a header page if
        /// missing, else placed at the address it records (its size then is the file's).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
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
    /// Delete sections for every process (the domain goes with its last section, unless it was
    /// made by `domain create`).
    Rm {
        /// Section names.
        #[arg(required = true)]
        names: Vec<String>,
        /// A section (or domain) that does not exist is not an error.
        #[arg(long, short = 'f')]
        force: bool,
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
    /// What is at an address: domain, section, offset, committed, resident, or free / not ours.
    Where { address: String },
    /// Draw a domain's window: sections and holes, committed and resident per section.
    Map,
    /// Show shmgadget at work: two separate processes share a pointer-linked structure.
    Demo {
        /// Number of nodes in the linked structure.
        #[arg(long, default_value_t = 100_000)]
        nodes: u64,
    },
    /// Continue a queue on another host over zenoh (export here, import there).
    #[cfg(feature = "tunnel")]
    Tunnel(shmgadget_tunnel::cli::TunnelArgs),
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

pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode between 0 and 777"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            let e = with_cli_advice(e);
            if cli.json {
                let kind = match e.downcast_ref::<shmgadget::Error>() {
                    Some(e) => json::kind_name(e.kind()),
                    None => "failed".to_owned(),
                };
                json::print(&json::ErrorOut { error: json::ErrorBody { kind, message: e.to_string() } });
            }
            errln!("shmgadget: {e}");
            ExitCode::FAILURE
        }
    };
    if out::failed() { ExitCode::FAILURE } else { code }
}

/// The library's advice in the CLI's words: an object of another user is accepted with the
/// `--allow-foreign-owner` flag (the library calls the option `allow_foreign_owner`).
fn with_cli_advice(e: Box<dyn std::error::Error>) -> Box<dyn std::error::Error> {
    match e.downcast_ref::<Error>() {
        Some(le)
            if le.kind() == ErrorKind::PermissionDenied
                && le.to_string().contains("allow_foreign_owner")
                && !le.to_string().contains("--allow-foreign-owner") =>
        {
            Error::new(le.kind(), format!("{le}; from the command line: --allow-foreign-owner")).into()
        }
        _ => e,
    }
}

/// A command line clap rejected: exit status 2 (0 for `--help` and `--version`), and with
/// `--json` anywhere on the line, the error as JSON on stdout too.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
        outln!("{}", e.render().to_string().trim_end());
        return ExitCode::SUCCESS;
    }
    if std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json") {
        let message = e.render().to_string().trim_end().to_owned();
        json::print(&json::ErrorOut { error: json::ErrorBody { kind: "usage".to_owned(), message } });
    }
    let _ = e.print();
    ExitCode::from(2)
}

pub(crate) fn options(cli: &Cli) -> DomainOptions {
    DomainOptions { shm_dir: cli.shm_dir.clone(), allow_foreign_owner: cli.allow_foreign_owner, ..Default::default() }
}

pub(crate) fn existing(cli: &Cli) -> DomainOptions {
    DomainOptions { must_exist: true, ..options(cli) }
}

fn run(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match &cli.command {
        Command::Domains => cmd_domains(cli)?,
        Command::Ls => return cmd_ls(cli),
        Command::Info { name: Some(name) } => return cmd_info(cli, name),
        Command::Info { name: None } => return domain_cmd::info(cli),
        Command::Domain { action } => return domain_cmd::run(cli, action),
        Command::Ps => return ps::run(cli),
        Command::Top { once } => return top::run(cli, *once),
        Command::Completions { shell } => return extras::completions(cli.json, *shell),
        Command::Man => return extras::man(cli.json),
        Command::Create { name, size, transient, mode, commit, kind, file } => {
            if file.is_some() {
                mem_cmd::check_file_create(*transient, kind)?;
            }
            cmd_create(cli, name, *size, *transient, *mode, *commit, kind, file.as_ref())?
        }
        Command::Heap { name, blocks, check } => return cmd_heap(cli, name, *blocks, *check),
        Command::Rm { names, force } => return cmd_rm(cli, names, *force),
        Command::Gc { all, force } => return cmd_gc(cli, *all, *force),
        Command::Where { address } => return mem_cmd::cmd_where(cli, address),
        Command::Map => return mem_cmd::cmd_map(cli),
        Command::Demo { nodes } => return demo::run(cli.shm_dir.as_deref(), *nodes, cli.json),
        #[cfg(feature = "tunnel")]
        Command::Tunnel(args) => shmgadget_tunnel::cli::run(&cli.domain, cli.shm_dir.as_deref(), args)?,
        Command::DemoWorker { role, nodes, index } => {
            return demo::worker(&cli.domain, cli.shm_dir.as_deref(), role, *nodes, *index);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn cmd_create(
    cli: &Cli,
    name: &str,
    size: u64,
    transient: bool,
    mode: Option<u32>,
    commit: Option<u64>,
    kind: &str,
    file: Option<&std::path::PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    if kind != "raw" && (transient || commit.is_some() || mode.is_some()) {
        return Err(shmgadget::Error::new(
            shmgadget::ErrorKind::InvalidArgument,
            format!("--transient, --commit and --mode apply to raw sections only, not to a {kind}; drop them or use --kind raw"),
        )
        .into());
    }
    // Whether this command makes the domain too: said on stderr, so a mistyped -d is noticed.
    let domain_created = match inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref()) {
        Err(e) => e.kind() == shmgadget::ErrorKind::NotFound,
        Ok(_) => false,
    };
    let domain = Domain::attach_with(&cli.domain, &options(cli))?;
    if domain_created {
        let (base, len) = domain.window();
        errln!(
            "shmgadget: created domain {:?} (window {:#x}-{:#x}, in {}); it goes away with its last section",
            cli.domain,
            base,
            base + len,
            shm_dir_shown(cli)
        );
    }
    let (info, queue, what) = match kind {
        "heap" if file.is_some() => {
            let (heap, _) = shmgadget::heap::Heap::create_in_file(&domain, name, file.expect("matched"), size)?;
            (heap.section().info(), None, String::new())
        }
        "heap" => {
            let heap = shmgadget::heap::Heap::create(&domain, name, size)?;
            (heap.section().info(), None, String::new())
        }
        "queue" => {
            let q = shmgadget::queue::ByteQueue::create(&domain, name, size)?;
            let what = format!("{} ring, messages up to {} bytes", format_size(q.capacity()), q.max_message());
            drop(q);
            let section = domain.open_section(name)?;
            (section.info(), Some(shmgadget::queue::inspect(&section)), what)
        }
        _ => {
            let mut opts = SectionOptions::new().kind(SectionKind::Raw);
            if let Some(mode) = mode {
                opts = opts.mode(mode);
            }
            if transient {
                opts = opts.transient();
            }
            if let Some(path) = file {
                opts = opts.file(path);
            }
            let section = domain.create_section(name, size, &opts)?;
            if let Some(len) = commit {
                commit_with_bar(&section, len, cli.json)?;
            }
            (section.info(), None, String::new())
        }
    };
    domain.detach()?;
    // A transient section lives while a process is attached: with nobody else attached it
    // went away as we detached. Say what happened rather than "created".
    let gone = transient
        && inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())
            .map(|r| !r.sections.iter().any(|s| s.name == name))
            .unwrap_or(true);
    if cli.json {
        json::print(&json::Create {
            domain: cli.domain.clone(),
            domain_created,
            section: json::Section::new(&cli.domain, &info, queue.as_ref()),
            removed_on_exit: gone,
        });
    } else if gone {
        outln!(
            "created transient section {name:?} in domain {:?} at {:#x}, {} reserved, and removed it again on exit: \
             no other process is attached to the domain (a transient section lives while one is)",
            cli.domain,
            info.address,
            format_size(info.reserved)
        );
    } else {
        let noun = match kind {
            "heap" => "heap",
            "queue" => "byte queue",
            _ if transient => "transient section",
            _ => "section",
        };
        let detail = if what.is_empty() { String::new() } else { format!("; {what}") };
        outln!(
            "created {noun} {name:?} in domain {:?} at {:#x}, {} reserved{detail}",
            cli.domain,
            info.address,
            format_size(info.reserved)
        );
    }
    Ok(())
}

fn cmd_rm(cli: &Cli, names: &[String], force: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let domain = match Domain::attach_with(&cli.domain, &existing(cli)) {
        Err(e) if force && e.kind() == ErrorKind::NotFound => None,
        d => Some(d?),
    };
    // Every name is checked first, so a typo among several removes nothing.
    if domain.is_some() && !force {
        let report = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
        let missing: Vec<String> =
            names.iter().filter(|n| !report.sections.iter().any(|s| &s.name == *n)).map(|n| format!("{n:?}")).collect();
        if !missing.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no section {} in domain {:?}, so nothing was removed; `shmgadget ls --domain {}` lists its sections, `rm -f` skips missing ones",
                    missing.join(", "),
                    cli.domain,
                    cli.domain
                ),
            )
            .into());
        }
    }
    let mut removed = Vec::new();
    let mut failure = None;
    if let Some(domain) = &domain {
        for name in names {
            match domain.delete_section(name) {
                Ok(()) => removed.push(name.clone()),
                Err(e) if force && e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if let Some(d) = domain {
        d.detach()?;
    }
    if let Some(e) = failure {
        let done = if removed.is_empty() {
            "nothing was removed".to_owned()
        } else {
            format!("removed before it: {}", removed.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "))
        };
        return Err(Error::new(e.kind(), format!("{e} ({done})")).into());
    }
    if cli.json {
        json::print(&json::Rm {
            domain: cli.domain.clone(),
            removed: removed.iter().map(|n| json::Named { name: n.clone() }).collect(),
        });
    } else {
        for name in &removed {
            outln!("removed section {name:?} from domain {:?}", cli.domain);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_gc(cli: &Cli, all: bool, force: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let domain = (!all).then_some(cli.domain.as_str());
    let report = inspect::gc_with(domain, cli.shm_dir.as_deref(), force, cli.allow_foreign_owner)?;
    for (d, what) in &report.damaged {
        errln!("shmgadget: damage in domain {d:?}: {what}");
    }
    if cli.json {
        json::print(&json::Gc::new(&report));
    } else {
        for (d, what) in &report.broken_locks {
            outln!("broke a lock of domain {d:?}: {what}");
        }
        for (d, pid) in &report.dead_processes {
            outln!("cleared dead process {pid} from domain {d:?}");
        }
        for (d, s, pid) in &report.removed_unfinished {
            outln!("removed unfinished section {s:?} of domain {d:?} (its creator, pid {pid}, died while creating it)");
        }
        for (d, s) in &report.removed_sections {
            outln!("removed transient section {s:?} of domain {d:?}");
        }
        for d in &report.removed_domains {
            outln!("removed domain {d:?} (no live process, no persistent section)");
        }
        for o in &report.removed_orphans {
            outln!("removed orphaned object {o:?}");
        }
        for (d, why) in &report.skipped {
            if !report.damaged.iter().any(|(dd, _)| dd == d) {
                outln!("skipped domain {d:?}: {why}");
            }
        }
        let n = report.dead_processes.len()
            + report.broken_locks.len()
            + report.removed_unfinished.len()
            + report.removed_sections.len()
            + report.removed_domains.len()
            + report.removed_orphans.len();
        if n == 0 && report.skipped.is_empty() && report.damaged.is_empty() {
            outln!("nothing to clean up");
        }
    }
    // Damage is not cleaned up, and a domain asked for by name but skipped was not cleaned:
    // say so with the exit status too.
    let skipped_asked = !all && report.skipped.iter().any(|(d, _)| d == &cli.domain);
    Ok(if report.damaged.is_empty() && !skipped_asked { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn cmd_domains(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let domains = inspect::list_domains(cli.shm_dir.as_deref())?;
    if cli.json {
        json::print(&json::Domains {
            shm_dir: shm_dir_shown(cli),
            domains: domains.iter().map(json::Domain::new).collect(),
        });
        return Ok(());
    }
    if domains.is_empty() {
        outln!("no domains in {}", shm_dir_shown(cli));
        return Ok(());
    }
    let mut t = table(&["domain", "window", "size", "sections", "reserved", "resident", "attached", "live"]);
    let mut notes = Vec::new();
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
                    t.add_row(vec![r.name.clone(), "DAMAGED (see below)".to_owned()]);
                    notes.extend(damage_lines(r).into_iter().map(|l| format!("domain {:?} is damaged: {l}", r.name)));
                }
                if !r.overlaps.is_empty() {
                    t.add_row(vec![r.name.clone(), "OVERLAPS (see below)".to_owned()]);
                    for o in &r.overlaps {
                        notes.push(format!(
                            "domain {:?}'s window {:#x}-{:#x} overlaps domain {:?}'s window {:#x}-{:#x}: no process can \
                             attach both; recreate one with another `--window-base` (`shmgadget domain create`)",
                            r.name,
                            r.window_base,
                            r.window_base + r.window_size,
                            o.domain,
                            o.window_base,
                            o.window_base + o.window_size
                        ));
                    }
                }
            }
            DomainEntry::Unreadable { name, error } => {
                t.add_row(vec![name.clone(), "UNREADABLE (see below)".to_owned()]);
                notes.push(format!("domain {name:?} is unreadable: {error}"));
            }
        }
    }
    outln!("{t}");
    // Long explanations go under the table, one per line, not into a column.
    for n in &notes {
        outln!("{n}");
    }
    Ok(())
}

fn shm_dir_shown(cli: &Cli) -> String {
    DomainOptions { shm_dir: cli.shm_dir.clone(), ..Default::default() }.resolved_shm_dir().display().to_string()
}

fn section_row(s: &SectionInfo) -> Vec<String> {
    vec![
        s.name.clone(),
        mem_cmd::kind_label(s),
        format!("{:#x}-{:#x}", s.address, s.address + s.reserved),
        format_size(s.reserved),
        format_size(s.committed),
        s.resident.map(format_size).unwrap_or_else(|| "-".into()),
        s.lifetime.as_str().to_owned(),
        s.owner_uid.to_string(),
        format!("{:04o}", s.mode),
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
        errln!("shmgadget: damaged entry in domain {:?}: {l}", r.name);
    }
    if lines.is_empty() {
        ExitCode::SUCCESS
    } else {
        errln!(
            "shmgadget: domain {:?}'s registry is damaged; `shmgadget gc` leaves it alone, `shmgadget gc --domain {} --force` removes only what is proven unused",
            r.name,
            r.name
        );
        ExitCode::from(1)
    }
}

fn cmd_ls(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report: DomainReport = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
    if cli.json {
        let sections = report
            .sections
            .iter()
            .map(|s| {
                let q = (s.kind == SectionKind::Queue).then(|| queue_info(cli, &s.name));
                json::Section::new(&report.name, s, q.as_ref())
            })
            .collect();
        json::print(&json::Ls {
            domain: report.name.clone(),
            sections,
            damaged: json::damaged(&report),
            problems: report.problems.clone(),
            tunnels: ls_tunnels(cli, &report),
        });
        return Ok(report_damage(&report));
    }
    if report.sections.is_empty() && report.damaged.is_empty() {
        outln!("domain {:?} has no sections", report.name);
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
    outln!("{t}");
    for s in report.sections.iter().filter(|s| s.kind == SectionKind::Queue) {
        match queue_info(cli, &s.name) {
            Ok(q) => outln!("queue {}: {}", s.name, describe_queue(&q)),
            Err(e) => outln!("queue {}: {}", s.name, queue_trouble(&e)),
        }
    }
    for t in ls_tunnels(cli, &report) {
        outln!("{}", tunnel_rows::describe(&t));
    }
    Ok(report_damage(&report))
}

/// The tunnel ends of the domain (none without the `tunnel` feature, or if it cannot be
/// attached: the rest of `ls` says why).
fn ls_tunnels(cli: &Cli, report: &DomainReport) -> Vec<tunnel_rows::TunnelEnd> {
    if !report.sections.iter().any(|s| s.name.contains(".tunnel-")) {
        return Vec::new();
    }
    match Domain::attach_with(&cli.domain, &DomainOptions { must_exist: true, ..options(cli) }) {
        Ok(d) => tunnel_rows::ends(&d, report),
        Err(_) => Vec::new(),
    }
}

/// A queue section's live state, or why it cannot be read (a damaged header or positions
/// are `Corrupt`, saying what was found).
fn queue_info(cli: &Cli, name: &str) -> Result<shmgadget::queue::QueueInfo, shmgadget::Error> {
    let domain = Domain::attach_with(&cli.domain, &DomainOptions { must_exist: true, ..options(cli) })?;
    let section = domain.open_section(name)?;
    shmgadget::queue::inspect(&section)
}

/// How `ls` and `info` show a queue whose state cannot be read.
fn queue_trouble(e: &shmgadget::Error) -> String {
    if e.kind() == shmgadget::ErrorKind::Corrupt { format!("DAMAGED: {e}") } else { format!("cannot be read: {e}") }
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
    let blocked = if q.blocked_senders + q.blocked_receivers == 0 {
        String::new()
    } else {
        format!("; asleep: {} senders, {} receivers", q.blocked_senders, q.blocked_receivers)
    };
    format!(
        "{} queue, {} of {} {unit} waiting, {} sent, {} received; senders: {}; receivers: {}{blocked}",
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
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "section {name:?} of domain {:?} is damaged: slot {}, generation {}: {}",
                    cli.domain, e.slot, e.generation, e.problem
                ),
            )
            .into());
        }
        if !report.damaged.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no valid section {name:?} in domain {:?}, whose registry has {} damaged entries (`shmgadget ls --domain {}` lists them)",
                    cli.domain,
                    report.damaged.len(),
                    cli.domain
                ),
            )
            .into());
        }
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no section {name:?} in domain {:?}; `shmgadget ls --domain {}` lists its sections",
                cli.domain, cli.domain
            ),
        )
        .into());
    };
    let queue = if s.kind == SectionKind::Queue { Some(queue_info(cli, name)) } else { None };
    // A damaged queue is shown, then makes `info` fail (exit status 1).
    let damage = match &queue {
        Some(Err(e)) if e.kind() == shmgadget::ErrorKind::Corrupt => Some(e.to_string()),
        _ => None,
    };
    if cli.json {
        json::print(&json::Section::new(&report.name, s, queue.as_ref()));
        return Ok(if damage.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS });
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
        ("mode", format!("{:04o}", s.mode)),
        ("generation", s.generation.to_string()),
        ("created by pid", s.creator_pid.to_string()),
        ("object", format!("{}/{}", shm_dir_shown(cli), s.object)),
        ("file", s.file.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string())),
        ("page size", crate::mem_cmd::page_label(s.page_size)),
    ];
    for (k, v) in rows {
        outln!("{k:>15}  {v}");
    }
    match &queue {
        Some(Ok(q)) => outln!("{:>15}  {}", "queue", describe_queue(q)),
        Some(Err(e)) => outln!("{:>15}  {}", "queue", queue_trouble(e)),
        None => {}
    }
    Ok(if damage.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn cmd_heap(cli: &Cli, name: &str, blocks: bool, check: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let domain = Domain::attach_with(&cli.domain, &existing(cli))?;
    let heap = shmgadget::heap::Heap::open(&domain, name)?;
    let stats = heap.stats()?;
    let named = heap.named_objects()?;
    let dump = if blocks { heap.dump(100_000)? } else { Vec::new() };
    let verdict = if check { Some(heap.check()) } else { None };
    if cli.json {
        json::print(&json::Heap {
            name: name.to_owned(),
            domain: cli.domain.clone(),
            address: json::addr(heap.section().as_ptr() as u64),
            stats,
            named_objects: named.iter().map(json::NamedObject::new).collect(),
            blocks: blocks.then(|| {
                dump.iter()
                    .map(|b| json::Block { offset: b.offset, size: b.size, state: block_state(b.free, b.cached) })
                    .collect()
            }),
            check: verdict
                .as_ref()
                .map(|r| json::Check { ok: r.is_ok(), problem: r.as_ref().err().map(|e| e.to_string()) }),
        });
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
            outln!("{k:>15}  {v}");
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
            outln!("{t}");
        }
        if blocks {
            let mut t = table(&["offset", "size", "state"]);
            for blk in &dump {
                t.add_row(vec![
                    format!("{:#x}", blk.offset),
                    blk.size.to_string(),
                    block_state(blk.free, blk.cached).into(),
                ]);
            }
            outln!("{t}");
        }
        match &verdict {
            Some(Ok(())) => outln!("check: every block and free list is consistent"),
            Some(Err(e)) => outln!("check FAILED: {e}"),
            None => {}
        }
    }
    Ok(if matches!(verdict, Some(Err(_))) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn block_state(free: bool, cached: bool) -> &'static str {
    if free {
        "free"
    } else if cached {
        "cached"
    } else {
        "used"
    }
}

pub(crate) fn describe_state(s: shmgadget::heap::ObjectState) -> String {
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

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(extras::table_preset());
    t.set_header(header.to_vec());
    t
}

/// Commits `len` bytes of `section`; from 1 GiB on, with a progress bar on stderr when stderr
/// is a terminal (and the output is not JSON), since committing gigabytes takes seconds.
fn commit_with_bar(section: &shmgadget::Section, len: u64, json: bool) -> shmgadget::Result<()> {
    use std::io::IsTerminal;
    const BAR_FROM: u64 = 1 << 30;
    if len < BAR_FROM || json || !std::io::stderr().is_terminal() {
        return section.commit(len);
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("committing {bar:40} {binary_bytes}/{binary_total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = section.commit_with_progress(len, 64 << 20, |done| bar.set_position(done));
    bar.finish_and_clear();
    result
}
