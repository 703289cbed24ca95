//! `shmgadget where ADDR` and `shmgadget map`: what is at an address, and a domain's window
//! drawn as sections and holes (the original system's `VirtualQuery` walk). Both read
//! registry snapshots: nothing attaches.

use std::process::ExitCode;

use serde::Serialize;
use shmgadget::query::{self, AddressInfo, Place};

use crate::json::addr;
use crate::out::outln;
use crate::size::format_size;
use crate::{Cli, table};

/// Whether the user named a domain (flag or environment), rather than taking the default.
fn domain_given(cli: &Cli) -> Option<&str> {
    let flag = std::env::args().skip(1).take_while(|a| a != "--").any(|a| {
        a == "-d" || a == "--domain" || a.starts_with("--domain=") || (a.starts_with("-d") && !a.starts_with("--"))
    });
    let env = std::env::var_os("SHMGADGET_DOMAIN").is_some_and(|v| !v.is_empty());
    (flag || env).then_some(cli.domain.as_str())
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => t.replace('_', "").parse::<u64>(),
    };
    r.map_err(|_| format!("{s:?} is not an address; expected hexadecimal 0x… or decimal"))
}

/// `where ADDR`, as JSON: `AddressInfo` with addresses as strings.
#[derive(Serialize)]
struct WhereOut {
    address: String,
    place: Place,
    domain: Option<String>,
    section: Option<String>,
    section_kind: Option<&'static str>,
    section_address: Option<String>,
    offset: Option<u64>,
    reserved: bool,
    committed: Option<bool>,
    resident: Option<bool>,
    mapped: Option<bool>,
    protection: Option<&'static str>,
    page_size: u64,
    free_start: Option<String>,
    free_end: Option<String>,
}

impl WhereOut {
    fn new(i: &AddressInfo) -> WhereOut {
        WhereOut {
            address: addr(i.address),
            place: i.place,
            domain: i.domain.clone(),
            section: i.section.clone(),
            section_kind: i.section_kind.map(|k| k.as_str()),
            section_address: i.section_address.map(addr),
            offset: i.offset,
            reserved: i.reserved,
            committed: i.committed,
            resident: i.resident,
            mapped: i.mapped,
            protection: i.protection,
            page_size: i.page_size,
            free_start: i.free_start.map(addr),
            free_end: i.free_end.map(addr),
        }
    }
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

/// `shmgadget where ADDR`.
pub fn cmd_where(cli: &Cli, address: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let a = parse_addr(address)?;
    let info = query::query_domains(a, domain_given(cli), cli.shm_dir.as_deref())?;
    if cli.json {
        crate::json::print(&WhereOut::new(&info));
        return Ok(ExitCode::SUCCESS);
    }
    match info.place {
        Place::Section => {
            outln!(
                "{} is offset {} ({:#x}) of section {:?} ({}) of domain {:?}, which starts at {}",
                addr(a),
                info.offset.unwrap_or(0),
                info.offset.unwrap_or(0),
                info.section.as_deref().unwrap_or("?"),
                info.section_kind.map_or("?", |k| k.as_str()),
                info.domain.as_deref().unwrap_or("?"),
                addr(info.section_address.unwrap_or(0)),
            );
            outln!(
                "  reserved: yes, committed: {}, resident: {}, page size: {}",
                yes_no(info.committed),
                yes_no(info.resident),
                format_size(info.page_size)
            );
        }
        Place::Free => outln!(
            "{} is free: inside domain {:?}'s window, in the hole {}-{} ({}) where no section is",
            addr(a),
            info.domain.as_deref().unwrap_or("?"),
            addr(info.free_start.unwrap_or(0)),
            addr(info.free_end.unwrap_or(0)),
            format_size(info.free_end.unwrap_or(0) - info.free_start.unwrap_or(0)),
        ),
        Place::View | Place::MappedFile | Place::NotOurs => outln!(
            "{} is not ours: no {} window holds it",
            addr(a),
            match domain_given(cli) {
                Some(d) => format!("window of domain {d:?}"),
                None => "domain's".to_owned(),
            }
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct MapOut {
    domain: String,
    window_base: String,
    window_end: String,
    window_size: u64,
    regions: Vec<RegionOut>,
}

#[derive(Serialize)]
struct RegionOut {
    kind: &'static str,
    address: String,
    end: String,
    size: u64,
    name: Option<String>,
    section_kind: Option<&'static str>,
    committed: Option<u64>,
    resident: Option<u64>,
    page_size: u64,
}

/// `shmgadget map`.
pub fn cmd_map(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let m = query::window_map(&cli.domain, cli.shm_dir.as_deref())?;
    if cli.json {
        crate::json::print(&MapOut {
            domain: m.domain.clone(),
            window_base: addr(m.window_base),
            window_end: addr(m.window_base + m.window_size),
            window_size: m.window_size,
            regions: m
                .regions
                .iter()
                .map(|r| RegionOut {
                    kind: r.kind,
                    address: addr(r.address),
                    end: addr(r.end),
                    size: r.size,
                    name: r.name.clone(),
                    section_kind: r.section_kind.map(|k| k.as_str()),
                    committed: r.committed,
                    resident: r.resident,
                    page_size: r.page_size,
                })
                .collect(),
        });
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "domain {:?}: window {}-{} ({})",
        m.domain,
        addr(m.window_base),
        addr(m.window_base + m.window_size),
        format_size(m.window_size)
    );
    let mut t = table(&["address range", "size", "what", "committed", "resident", "bar"]);
    for r in &m.regions {
        let what = match &r.name {
            Some(n) if r.page_size > system_page() => {
                format!("{n} ({}, {} pages)", r.section_kind.map_or("?", |k| k.as_str()), format_size(r.page_size))
            }
            Some(n) => format!("{n} ({})", r.section_kind.map_or("?", |k| k.as_str())),
            None => "(hole)".to_owned(),
        };
        // A bar of 20 cells: '#' resident, '+' committed but not resident, '.' reserved only.
        let bar = match r.name {
            None => String::new(),
            Some(_) => {
                let cells = 20u64;
                let res = r.resident.unwrap_or(0).min(r.size) * cells / r.size.max(1);
                let com = r.committed.unwrap_or(0).min(r.size) * cells / r.size.max(1);
                (0..cells)
                    .map(|i| {
                        if i < res {
                            '#'
                        } else if i < com {
                            '+'
                        } else {
                            '.'
                        }
                    })
                    .collect()
            }
        };
        t.add_row(vec![
            format!("{}-{}", addr(r.address), addr(r.end)),
            format_size(r.size),
            what,
            r.committed.map_or(String::new(), format_size),
            r.resident.map_or(if r.name.is_some() { "?".to_owned() } else { String::new() }, format_size),
            bar,
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// `create --file`: a file backs raw and heap sections only, and is never transient.
pub fn check_file_create(transient: bool, kind: &str) -> Result<(), shmgadget::Error> {
    if transient || kind == "queue" {
        return Err(shmgadget::Error::new(
            shmgadget::ErrorKind::InvalidArgument,
            "--file backs raw and heap sections that outlive their domain: it takes neither --transient nor --kind queue",
        ));
    }
    Ok(())
}

/// The kind column of `ls`: the kind, the file of a file-backed section, and the page size of
/// a section on huge pages.
pub fn kind_label(s: &shmgadget::SectionInfo) -> String {
    let huge =
        if s.page_size > system_page() { format!(", {} pages", format_size(s.page_size)) } else { String::new() };
    match &s.file {
        Some(p) => format!("{} in {}{huge}", s.kind.as_str(), p.display()),
        None => format!("{}{huge}", s.kind.as_str()),
    }
}

fn system_page() -> u64 {
    query::system_page_size()
}

/// `info`'s page size line: "4.0 KiB", or "2.0 MiB (huge pages)".
pub fn page_label(page: u64) -> String {
    if page > system_page() { format!("{} (huge pages)", format_size(page)) } else { format_size(page) }
}
