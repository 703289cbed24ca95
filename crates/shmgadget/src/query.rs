//! "What is at this address?" (the original system's `VirtualQuery`), and the window drawn.
//!
//! [`query`] answers for this process: a section of an attached domain (which one, the
//! offset, whether the page is committed and resident, whether this process has it mapped and
//! with which protection), a view ([`crate::View`]), a [`crate::MappedFile`] (its path and the
//! offset in its data), a free part of a window, or memory that is not ours (with what `/proc/self/maps` says is there). [`query_domains`] answers the same
//! from outside, for the `shmgadget where` command, from registry snapshots (protection and
//! "mapped here" are per process and unknown there). [`window_map`] lists a domain's window
//! as sections and holes with their committed and resident bytes (`shmgadget map`).
//!
//! Definitions, the same everywhere: **reserved**: the address lies in a section's reserved
//! range; **committed**: in the prefix guaranteed by [`crate::Section::commit`]; **resident**:
//! the section's object has the page in memory with contents now (touched by some process and
//! not decommitted since; asked of the object's page cache with `mincore`, so every process
//! sees the same answer). A committed page nobody touched yet is memory set aside, not yet
//! resident: `shmgadget ls` counts it (from the object's block count), `where` does not.

use std::path::Path;

use serde::Serialize;

use crate::attachment::resolve_shm_dir;
use crate::domain::attached_domains_where;
use crate::error::{Error, Result};
use crate::inspect::{DomainEntry, DomainReport, list_domains};
use crate::names;
use crate::os::{self, Protection};
use crate::registry::{Registry, SectionKind};
use crate::view::{ViewKind, with_view};

/// What kind of place an address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// Inside a live section of a domain.
    Section,
    /// Inside a view of a section mapped by this process.
    View,
    /// Inside a domain's window where no section is.
    Free,
    /// Inside the reserved range of a [`crate::MappedFile`] of this process.
    MappedFile,
    /// Outside every domain window, view and mapped file.
    NotOurs,
}

/// The answer of [`query`] / [`query_domains`]. Fields that do not apply are `None`.
#[derive(Debug, Clone, Serialize)]
pub struct AddressInfo {
    /// The address asked about.
    pub address: u64,
    /// What is there.
    pub place: Place,
    /// The domain whose window (or whose section's view) holds it.
    pub domain: Option<String>,
    /// The section.
    pub section: Option<String>,
    /// The section's kind.
    pub section_kind: Option<SectionKind>,
    /// The section's first byte (in the window; for a view, the section's, not the view's).
    pub section_address: Option<u64>,
    /// Offset of the address in the section.
    pub offset: Option<u64>,
    /// Whether the address is in a section's reserved range.
    pub reserved: bool,
    /// Whether its page is in the section's committed prefix.
    pub committed: Option<bool>,
    /// Whether its page has memory now (the object has data there).
    pub resident: Option<bool>,
    /// Whether this process has the page mapped (`None` when asked from outside).
    pub mapped: Option<bool>,
    /// This process's protection of the page: `"read_write"`, `"read"` or `"none"` (`None`
    /// when asked from outside or nothing is mapped there).
    pub protection: Option<&'static str>,
    /// Page size of the section's memory (the system page size for other places).
    pub page_size: u64,
    /// For a view: `"read_only"` or `"copy_on_write"`.
    pub view: Option<&'static str>,
    /// For a view: its first byte in this process.
    pub view_address: Option<u64>,
    /// For a free place: the free range around the address, `[free_start, free_end)`.
    pub free_start: Option<u64>,
    /// See `free_start`.
    pub free_end: Option<u64>,
    /// For a mapped file: its path.
    pub file: Option<String>,
    /// For a place that is not ours, asked in-process: what `/proc/self/maps` says is there
    /// (a path, `[heap]`, `[stack]`, `"anonymous"`), or `None` if nothing is mapped.
    pub mapping: Option<String>,
}

fn protection_name(p: Protection) -> &'static str {
    match p {
        Protection::ReadWrite => "read_write",
        Protection::Read => "read",
        Protection::None => "none",
    }
}

fn view_name(k: ViewKind) -> &'static str {
    match k {
        ViewKind::ReadOnly => "read_only",
        ViewKind::CopyOnWrite => "copy_on_write",
    }
}

impl AddressInfo {
    fn empty(address: u64, place: Place) -> AddressInfo {
        AddressInfo {
            address,
            place,
            domain: None,
            section: None,
            section_kind: None,
            section_address: None,
            offset: None,
            reserved: false,
            committed: None,
            resident: None,
            mapped: None,
            protection: None,
            page_size: os::page_size() as u64,
            view: None,
            view_address: None,
            free_start: None,
            free_end: None,
            file: None,
            mapping: None,
        }
    }
}

/// Whether the section's object has a page at `offset` (None if it cannot be examined). For a
/// file-backed section, the file's page (its object in the shm directory is only a link).
fn object_has_data(reg: &Registry, generation: u64, section: &str, offset: u64) -> Option<bool> {
    let object = names::section_object(reg.domain(), generation, section);
    let (fd, at) = section_data(reg.dir(), &object, section)?;
    fd.page_resident(at + offset).ok()
}

/// The object holding a section's bytes and where they start in it: the section object
/// itself, or the file a file-backed section's link names (after its header page).
fn section_data(dir: &os::Dir, object: &str, section: &str) -> Option<(os::Object, u64)> {
    let fd = dir.open_object(object, os::Access::Read).ok()?;
    let st = fd.stat().ok()?;
    if crate::file_section::is_link(&st) {
        let b = crate::file_section::resolve(section, &fd, &st).ok()?;
        return Some((b.object, crate::file_section::data_offset()));
    }
    Some((fd, 0))
}

/// Bytes of a file-backed section's data in the page cache now (`mincore` over a read-only
/// view of the file): what "resident" means for it, as for a section object (whose block
/// count is its memory).
fn file_resident(dir: &os::Dir, object: &str, section: &str, len: u64) -> Option<u64> {
    let (fd, at) = section_data(dir, object, section)?;
    let p = os::map_view(&fd, at, len as usize, os::ViewKind::ReadOnly).ok()?;
    let pages = os::resident_pages(p.as_ptr() as usize, len as usize);
    // SAFETY: the view made just above, referenced by nothing.
    let _ = unsafe { os::unmap(p.as_ptr() as usize, len as usize) };
    pages.ok().map(|n| n as u64 * os::page_size() as u64)
}

/// Fills the section fields from a domain's view of the address: a section or a hole.
fn describe_in_window(
    reg: &Registry,
    sections: &[(String, SectionKind, u64, u64, u64, u64)],
    addr: u64,
) -> AddressInfo {
    // (name, kind, generation, address, reserved, committed)
    if let Some((name, kind, generation, start, _reserved, committed)) =
        sections.iter().find(|s| addr >= s.3 && addr < s.3 + s.4)
    {
        let offset = addr - start;
        // The section's pages: huge on a hugetlbfs shm directory.
        let page = crate::section::section_page_size(reg.dir());
        let mut info = AddressInfo::empty(addr, Place::Section);
        info.page_size = page;
        info.domain = Some(reg.domain().to_owned());
        info.section = Some(name.clone());
        info.section_kind = Some(*kind);
        info.section_address = Some(*start);
        info.offset = Some(offset);
        info.reserved = true;
        info.committed = Some(offset - offset % page < *committed);
        info.resident = object_has_data(reg, *generation, name, offset);
        return info;
    }
    let window_end = reg.window_base + reg.window_size;
    let free_start = sections.iter().map(|s| s.3 + s.4).filter(|&e| e <= addr).max().unwrap_or(reg.window_base);
    let free_end = sections.iter().map(|s| s.3).filter(|&a| a > addr).min().unwrap_or(window_end);
    let mut info = AddressInfo::empty(addr, Place::Free);
    info.domain = Some(reg.domain().to_owned());
    info.free_start = Some(free_start);
    info.free_end = Some(free_end);
    info
}

/// The system's page size (sections on a hugetlbfs shm directory have larger pages: see
/// [`crate::Section::page_size`] and [`AddressInfo::page_size`]).
pub fn system_page_size() -> u64 {
    os::page_size() as u64
}

/// What is at `addr` in this process (see the module docs). Never faults, never maps a
/// section: it reads the registry, this process's mappings and the section's object.
pub fn query(addr: usize) -> AddressInfo {
    let a = addr as u64;
    let region = os::region_at(addr);
    if let Some(domain) = attached_domains_where(|a| a.contains(addr)).into_iter().next() {
        let inner = &domain.inner;
        let reg = &inner.registry;
        let sections: Vec<_> = reg
            .entries()
            .iter()
            .filter(|r| r.state == crate::registry::LIVE)
            .map(|r| {
                (r.name.as_str().to_owned(), r.kind, r.generation, reg.window_base + r.offset, r.reserved, r.committed)
            })
            .collect();
        let mut info = describe_in_window(reg, &sections, a);
        if info.place == Place::Section {
            let rec = reg.lookup_offset(a - inner.window_base);
            let mapped = rec.is_some_and(|r| inner.mapping.is_mapped(&r));
            info.mapped = Some(mapped);
            info.protection = region.filter(|_| mapped).map(|r| protection_name(r.protection));
        } else {
            info.mapped = Some(false);
            info.protection = Some(protection_name(Protection::None));
        }
        return info;
    }
    if let Some(mut info) = with_view(addr, |m| {
        let mut info = AddressInfo::empty(a, Place::View);
        info.domain = Some(m.domain.clone());
        info.section = Some(m.section.clone());
        info.offset = Some(m.offset + (addr - m.start) as u64);
        info.view = Some(view_name(m.kind));
        info.view_address = Some(m.start as u64);
        info.mapped = Some(true);
        info.reserved = true;
        info
    }) {
        info.protection = region.map(|r| protection_name(r.protection));
        // The section's own fields, if its domain is attached here.
        if let Some(d) = attached_domains_where(|a| Some(a.name.as_str()) == info.domain.as_deref()).into_iter().next()
        {
            let reg = &d.inner.registry;
            let name = info.section.clone().unwrap_or_default();
            let live = reg.entries().into_iter().find(|r| r.state == crate::registry::LIVE && r.name.as_str() == name);
            if let Some(r) = live {
                let offset = info.offset.unwrap_or(0);
                let page = crate::section::section_page_size(reg.dir());
                info.page_size = page;
                info.section_kind = Some(r.kind);
                info.section_address = Some(reg.window_base + r.offset);
                info.committed = Some(offset - offset % page < r.committed);
                info.resident = object_has_data(reg, r.generation, r.name.as_str(), offset);
            }
        }
        return info;
    }
    if let Some((base, _capacity, path)) = crate::mapped_file::file_at(addr) {
        let mut info = AddressInfo::empty(a, Place::MappedFile);
        info.offset = Some(a - base as u64);
        info.file = Some(path.display().to_string());
        info.mapped = Some(region.as_ref().is_some_and(|r| r.protection != Protection::None));
        info.reserved = true;
        info.protection = region.map(|r| protection_name(r.protection));
        return info;
    }
    let mut info = AddressInfo::empty(a, Place::NotOurs);
    info.mapped = Some(region.is_some());
    info.protection = region.as_ref().map(|r| protection_name(r.protection));
    info.mapping = region.map(|r| if r.path.is_empty() { "anonymous".to_owned() } else { r.path });
    info
}

fn report_sections(r: &DomainReport) -> Vec<(String, SectionKind, u64, u64, u64, u64)> {
    r.sections.iter().map(|s| (s.name.clone(), s.kind, s.generation, s.address, s.reserved, s.committed)).collect()
}

/// What is at `addr` in the domains of a shm directory, asked from outside (no attach): the
/// domain whose window holds it (only `domain`, if given), then its section or hole.
/// `Place::NotOurs` if no window holds it.
pub fn query_domains(addr: u64, domain: Option<&str>, shm_dir: Option<&Path>) -> Result<AddressInfo> {
    if let Some(d) = domain {
        names::validate(d, "domain")?;
    }
    let dir = resolve_shm_dir(shm_dir);
    for entry in list_domains(Some(&dir))? {
        let DomainEntry::Ok(report) = entry else { continue };
        if domain.is_some_and(|d| d != report.name) {
            continue;
        }
        if addr < report.window_base || addr - report.window_base >= report.window_size {
            continue;
        }
        let reg = Registry::snapshot(
            os::Dir::open(&dir).map_err(|e| Error::from_io(format!("cannot open {}", dir.display()), e))?,
            &report.name,
            true,
            false,
        )?;
        return Ok(describe_in_window(&reg, &report_sections(&report), addr));
    }
    Ok(AddressInfo::empty(addr, Place::NotOurs))
}

/// One part of a window: a section or a hole.
#[derive(Debug, Clone, Serialize)]
pub struct WindowRegion {
    /// `"section"` or `"hole"`.
    pub kind: &'static str,
    /// First byte.
    pub address: u64,
    /// One past the last byte.
    pub end: u64,
    /// `end - address`.
    pub size: u64,
    /// The section's name (`None` for a hole).
    pub name: Option<String>,
    /// The section's kind.
    pub section_kind: Option<SectionKind>,
    /// The section's committed prefix.
    pub committed: Option<u64>,
    /// The section's bytes backed by memory now (`None` if its object cannot be examined;
    /// for a file-backed section, its data in the page cache).
    pub resident: Option<u64>,
    /// The size of the section's pages (huge on a hugetlbfs shm directory; 0 for a hole).
    pub page_size: u64,
}

/// A domain's window as sections and holes, in address order.
#[derive(Debug, Clone, Serialize)]
pub struct WindowMap {
    /// The domain.
    pub domain: String,
    /// First byte of the window.
    pub window_base: u64,
    /// Its size.
    pub window_size: u64,
    /// Sections and holes, covering the window exactly.
    pub regions: Vec<WindowRegion>,
}

/// Draws `domain`'s window from outside (no attach).
pub fn window_map(domain: &str, shm_dir: Option<&Path>) -> Result<WindowMap> {
    let report = crate::inspect::inspect_domain(domain, shm_dir)?;
    let dir = os::Dir::open(&resolve_shm_dir(shm_dir)).ok();
    let mut sections = report.sections.clone();
    sections.sort_by_key(|s| s.address);
    let end = report.window_base + report.window_size;
    let mut regions = Vec::new();
    let mut at = report.window_base;
    let hole = |from: u64, to: u64| WindowRegion {
        kind: "hole",
        address: from,
        end: to,
        size: to - from,
        name: None,
        section_kind: None,
        committed: None,
        resident: None,
        page_size: 0,
    };
    for s in &sections {
        if s.address > at {
            regions.push(hole(at, s.address));
        }
        regions.push(WindowRegion {
            kind: "section",
            address: s.address,
            end: s.address + s.reserved,
            size: s.reserved,
            name: Some(s.name.clone()),
            section_kind: Some(s.kind),
            committed: Some(s.committed),
            // A file's blocks are on disk: its residency is the page cache's.
            resident: match (&s.file, &dir) {
                (Some(_), Some(dir)) => file_resident(dir, &s.object, &s.name, s.reserved),
                (Some(_), None) => None,
                (None, _) => s.resident,
            },
            page_size: s.page_size,
        });
        at = at.max(s.address + s.reserved);
    }
    if at < end {
        regions.push(hole(at, end));
    }
    Ok(WindowMap { domain: report.name, window_base: report.window_base, window_size: report.window_size, regions })
}
