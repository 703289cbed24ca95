//! `shmgadget domain create|rm` and the domain view of `info` (no section name): a domain
//! made to be shared (its mode, window and limits chosen up front, kept while empty) and
//! removed as a whole.

use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;
use shmgadget::DomainOptions;
use shmgadget::admin::{self, DomainDetails};

use crate::json;
use crate::out::outln;
use crate::size::{format_size, parse_size};

#[derive(Subcommand)]
pub enum DomainAction {
    /// Create a domain that stays until `domain rm`, even empty: who may use it (--mode, also
    /// the default mode of its sections), its window and its limits.
    Create {
        /// Domain name: 1 to 63 characters of A-Z a-z 0-9 . _ -, not starting with - or .
        name: String,
        /// Permission bits in octal: 600 this user only, 660 the group too, 666 everyone.
        /// Sections created later get the same bits unless `create --mode` says otherwise.
        #[arg(long, default_value = "600", value_parser = crate::parse_mode)]
        mode: u32,
        /// Size of the address window, e.g. 64G, 1T (a multiple of 2 MiB, 16 MiB to 64 TiB).
        #[arg(long, value_parser = parse_size)]
        window_size: Option<u64>,
        /// Base address of the window, in hex (e.g. 0x300000000000; a multiple of 2 MiB).
        /// Default: the first free window, avoiding every other domain's, other users' too.
        #[arg(long, value_parser = parse_address)]
        window_base: Option<u64>,
        /// Number of sections the domain can hold.
        #[arg(long)]
        max_sections: Option<u32>,
        /// Number of processes that can be attached at once.
        #[arg(long)]
        max_procs: Option<u32>,
    },
    /// Remove a domain and everything of it: every section, leftover object and its registry.
    /// Refused while live processes are attached, unless --force.
    Rm {
        /// Domain name.
        name: String,
        /// Remove it even while live processes are attached (they keep what they mapped).
        #[arg(long)]
        force: bool,
    },
}

/// A domain as `domain create` and `info` (without a section name) show it.
#[derive(Serialize)]
pub struct DomainInfo {
    pub name: String,
    pub window_base: String,
    pub window_end: String,
    pub window_size: u64,
    pub mode: String,
    pub owner_uid: u32,
    pub created_at: u64,
    pub kept: bool,
    pub max_sections: u32,
    pub max_procs: u32,
    pub sections: usize,
    pub processes: usize,
    pub live_processes: usize,
    pub registry_bytes: u64,
}

impl DomainInfo {
    pub fn new(d: &DomainDetails) -> DomainInfo {
        let r = &d.report;
        DomainInfo {
            name: r.name.clone(),
            window_base: json::addr(r.window_base),
            window_end: json::addr(r.window_base + r.window_size),
            window_size: r.window_size,
            mode: json::mode(r.mode),
            owner_uid: d.owner_uid,
            created_at: r.created_at,
            kept: d.kept,
            max_sections: r.max_sections,
            max_procs: r.max_procs,
            sections: r.sections.len(),
            processes: r.processes.len(),
            live_processes: r.processes.iter().filter(|p| p.alive).count(),
            registry_bytes: d.registry_bytes,
        }
    }
}

/// `domain rm`.
#[derive(Serialize)]
struct RmOut {
    domain: String,
    sections: Vec<json::Named>,
    objects: Vec<json::GcObject>,
    attached: Vec<Pid>,
}

#[derive(Serialize)]
struct Pid {
    pid: u32,
}

/// An address in hex (`0x` optional) or decimal.
fn parse_address(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not an address (write it in hex, e.g. 0x300000000000)"))
}

pub fn run(cli: &crate::Cli, action: &DomainAction) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match action {
        DomainAction::Create { name, mode, window_size, window_base, max_sections, max_procs } => {
            let d = DomainOptions::default();
            let opts = DomainOptions {
                sharing: shmgadget::Sharing::from_posix_mode(*mode),
                window_size: window_size.unwrap_or(d.window_size),
                window_base: *window_base,
                max_sections: max_sections.unwrap_or(d.max_sections),
                max_procs: max_procs.unwrap_or(d.max_procs),
                ..crate::options(cli)
            };
            let details = admin::create_domain(name, &opts)?;
            if cli.json {
                json::print(&DomainInfo::new(&details));
            } else {
                let r = &details.report;
                outln!(
                    "created domain {name:?}: window {:#x}-{:#x} ({}), mode {:04o}, up to {} sections and {} processes; \
                     it stays until `shmgadget domain rm {name}`",
                    r.window_base,
                    r.window_base + r.window_size,
                    format_size(r.window_size),
                    r.mode,
                    r.max_sections,
                    r.max_procs
                );
            }
        }
        DomainAction::Rm { name, force } => {
            let removed = admin::remove_domain(name, cli.shm_dir.as_deref(), *force, cli.allow_foreign_owner)?;
            if cli.json {
                json::print(&RmOut {
                    domain: name.clone(),
                    sections: removed.sections.iter().map(|n| json::Named { name: n.clone() }).collect(),
                    objects: removed.objects.iter().map(|o| json::GcObject { object: o.clone() }).collect(),
                    attached: removed.attached.iter().map(|p| Pid { pid: *p }).collect(),
                });
            } else {
                let list = |v: &[String]| {
                    if v.is_empty() {
                        "none".to_owned()
                    } else {
                        v.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                    }
                };
                outln!(
                    "removed domain {name:?}: sections {}; {} objects",
                    list(&removed.sections),
                    removed.objects.len()
                );
                if !removed.attached.is_empty() {
                    let pids: Vec<String> = removed.attached.iter().map(u32::to_string).collect();
                    outln!("still attached (they keep what they mapped): pid {}", pids.join(", "));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `info` without a section name: the domain, `ipcs -l`-like.
pub fn info(cli: &crate::Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let details = admin::domain_details(&cli.domain, cli.shm_dir.as_deref())?;
    if cli.json {
        json::print(&DomainInfo::new(&details));
        return Ok(ExitCode::SUCCESS);
    }
    let i = DomainInfo::new(&details);
    let r = &details.report;
    let reserved: u64 = r.sections.iter().map(|s| s.reserved).sum();
    let rows = [
        ("domain", i.name.clone()),
        ("created", format!("{} by uid {}", format_time(i.created_at), i.owner_uid)),
        ("mode", format!("{} (also the default mode of new sections)", i.mode)),
        (
            "lifetime",
            if i.kept {
                "kept until `shmgadget domain rm` (made by `domain create`)".to_owned()
            } else {
                "until its last section is removed and its last process leaves".to_owned()
            },
        ),
        ("window", format!("{}-{} ({})", i.window_base, i.window_end, format_size(i.window_size))),
        ("sections", format!("{} of at most {} ({} reserved)", i.sections, i.max_sections, format_size(reserved))),
        ("processes", format!("{} attached ({} live) of at most {}", i.processes, i.live_processes, i.max_procs)),
        ("registry", format!("{} ({} bytes)", format_size(i.registry_bytes), i.registry_bytes)),
    ];
    for (k, v) in rows {
        outln!("{k:>15}  {v}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `2026-12-02 23:18:55 UTC` for seconds since the Unix epoch.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}
