//! The `--json` output of every command: one schema, documented in `docs/cli-json.md`.
//!
//! Every command prints exactly one JSON object on stdout. Keys are snake_case and come in the
//! order of the fields below (serde keeps declaration order); sizes are numbers of bytes;
//! addresses are strings `"0x…"` in hexadecimal and modes strings of four octal digits
//! (`"0600"`), as the tables show them; times are seconds since the Unix epoch; lists are lists
//! of objects, never tuples. A field that does not apply is `null`, never missing. A failed
//! command prints [`ErrorOut`] (`{"error": {"kind": …, "message": …}}`), on stdout too, with
//! the same exit status as without `--json` (1 operation failed, 2 usage).

use serde::Serialize;
use shmgadget::SectionInfo;
use shmgadget::inspect::{DomainEntry, DomainReport, GcReport, ProcessInfo};
use shmgadget::queue::QueueInfo;

/// `"0x…"`.
pub fn addr(a: u64) -> String {
    format!("{a:#x}")
}

/// `"0600"`.
pub fn mode(m: u32) -> String {
    format!("{m:04o}")
}

/// One section, as `ls`, `info` and `create` show it.
#[derive(Serialize)]
pub struct Section {
    pub name: String,
    pub domain: String,
    pub kind: &'static str,
    pub lifetime: &'static str,
    pub address: String,
    pub end: String,
    pub reserved: u64,
    pub committed: u64,
    pub resident: Option<u64>,
    pub owner_uid: u32,
    pub mode: String,
    pub generation: u64,
    pub created_at: u64,
    pub creator_pid: u32,
    pub object: String,
    /// The file backing a file-backed section (its object is then a link to it); else `null`.
    pub file: Option<String>,
    /// The size of the pages backing it (huge on a hugetlbfs shm directory).
    pub page_size: u64,
    /// The queue's live figures, for a queue section that could be read; else `null`.
    pub queue: Option<Queue>,
    /// Why a queue section's figures could not be read (`DAMAGED: ...` for a damaged
    /// header or positions); `null` otherwise.
    pub queue_error: Option<String>,
}

impl Section {
    pub fn new(domain: &str, s: &SectionInfo, queue: Option<&Result<QueueInfo, shmgadget::Error>>) -> Section {
        Section {
            name: s.name.clone(),
            domain: domain.to_owned(),
            kind: s.kind.as_str(),
            lifetime: s.lifetime.as_str(),
            address: addr(s.address),
            end: addr(s.address + s.reserved),
            reserved: s.reserved,
            committed: s.committed,
            resident: s.resident,
            owner_uid: s.owner_uid,
            mode: mode(s.mode),
            generation: s.generation,
            created_at: s.created_at,
            creator_pid: s.creator_pid,
            object: s.object.clone(),
            file: s.file.as_ref().map(|p| p.display().to_string()),
            page_size: s.page_size,
            queue: queue.and_then(|q| q.as_ref().ok()).map(Queue::new),
            queue_error: queue.and_then(|q| q.as_ref().err()).map(crate::queue_trouble),
        }
    }
}

/// A queue's state.
#[derive(Serialize)]
pub struct Queue {
    /// `"bytes"` or `"slots"`.
    pub kind: &'static str,
    pub capacity: u64,
    pub fill: u64,
    pub sent: u64,
    pub received: u64,
    pub senders: Vec<Peer>,
    pub receivers: Vec<Peer>,
    pub blocked_senders: u32,
    pub blocked_receivers: u32,
}

#[derive(Serialize, Clone)]
pub struct Peer {
    pub pid: u32,
    pub alive: bool,
}

impl Queue {
    pub fn new(q: &QueueInfo) -> Queue {
        let peers = |v: &[(u32, bool)]| v.iter().map(|&(pid, alive)| Peer { pid, alive }).collect();
        Queue {
            kind: q.kind,
            capacity: q.capacity,
            fill: q.fill,
            sent: q.sent,
            received: q.received,
            senders: peers(&q.senders),
            receivers: peers(&q.receivers),
            blocked_senders: q.blocked_senders,
            blocked_receivers: q.blocked_receivers,
        }
    }
}

/// A registry entry that failed validation.
#[derive(Serialize)]
pub struct Damaged {
    pub slot: u32,
    pub name: String,
    pub generation: u64,
    pub problem: String,
}

/// A report's damaged entries.
pub fn damaged(r: &DomainReport) -> Vec<Damaged> {
    r.damaged
        .iter()
        .map(|e| Damaged { slot: e.slot, name: e.name.clone(), generation: e.generation, problem: e.problem.clone() })
        .collect()
}

/// `NotFound` → `"not_found"`.
pub fn kind_name(k: shmgadget::ErrorKind) -> String {
    let mut out = String::new();
    for (i, c) in format!("{k:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `ls`.
#[derive(Serialize)]
pub struct Ls {
    pub domain: String,
    pub sections: Vec<Section>,
    pub damaged: Vec<Damaged>,
    pub problems: Vec<String>,
    /// Tunnel ends (`shmgadget tunnel`) with their stats.
    pub tunnels: Vec<crate::tunnel_rows::TunnelEnd>,
}

#[derive(Serialize)]
pub struct Process {
    pub pid: u32,
    pub uid: u32,
    pub attached_at: u64,
    pub alive: bool,
}

impl Process {
    fn new(p: &ProcessInfo) -> Process {
        Process { pid: p.pid, uid: p.uid, attached_at: p.attached_at, alive: p.alive }
    }
}

/// One line of `domains`.
#[derive(Serialize)]
pub struct Domain {
    pub name: String,
    /// `"ok"`, `"damaged"` (readable, with damaged entries or problems) or `"unreadable"`.
    pub status: &'static str,
    /// Why the registry could not be read (`status` `"unreadable"`), else `null`.
    pub error: Option<String>,
    pub window_base: Option<String>,
    pub window_end: Option<String>,
    pub window_size: Option<u64>,
    pub mode: Option<String>,
    pub created_at: Option<u64>,
    pub max_sections: Option<u32>,
    pub max_procs: Option<u32>,
    pub sections: Option<usize>,
    pub reserved: Option<u64>,
    pub resident: Option<u64>,
    pub processes: Vec<Process>,
    pub damaged: Vec<Damaged>,
    pub problems: Vec<String>,
    /// Other domains whose windows overlap this one's (no process can attach both).
    pub overlaps: Vec<Overlap>,
}

/// One entry of a domain's `overlaps`.
#[derive(Serialize)]
pub struct Overlap {
    pub domain: String,
    pub window_base: String,
    pub window_end: String,
}

impl Domain {
    pub fn new(e: &DomainEntry) -> Domain {
        match e {
            DomainEntry::Ok(r) => Domain::of_report(r),
            DomainEntry::Unreadable { name, error } => Domain {
                name: name.clone(),
                status: "unreadable",
                error: Some(error.clone()),
                window_base: None,
                window_end: None,
                window_size: None,
                mode: None,
                created_at: None,
                max_sections: None,
                max_procs: None,
                sections: None,
                reserved: None,
                resident: None,
                processes: Vec::new(),
                damaged: Vec::new(),
                problems: Vec::new(),
                overlaps: Vec::new(),
            },
        }
    }

    fn of_report(r: &DomainReport) -> Domain {
        let is_damaged = !r.damaged.is_empty() || !r.problems.is_empty();
        Domain {
            name: r.name.clone(),
            status: if is_damaged { "damaged" } else { "ok" },
            error: None,
            window_base: Some(addr(r.window_base)),
            window_end: Some(addr(r.window_base + r.window_size)),
            window_size: Some(r.window_size),
            mode: Some(mode(r.mode)),
            created_at: Some(r.created_at),
            max_sections: Some(r.max_sections),
            max_procs: Some(r.max_procs),
            sections: Some(r.sections.len()),
            reserved: Some(r.sections.iter().map(|s| s.reserved).sum()),
            resident: Some(r.sections.iter().filter_map(|s| s.resident).sum()),
            processes: r.processes.iter().map(Process::new).collect(),
            damaged: damaged(r),
            problems: r.problems.clone(),
            overlaps: r
                .overlaps
                .iter()
                .map(|o| Overlap {
                    domain: o.domain.clone(),
                    window_base: addr(o.window_base),
                    window_end: addr(o.window_base + o.window_size),
                })
                .collect(),
        }
    }
}

/// `domains`.
#[derive(Serialize)]
pub struct Domains {
    pub shm_dir: String,
    pub domains: Vec<Domain>,
}

/// `create`.
#[derive(Serialize)]
pub struct Create {
    pub domain: String,
    /// Whether this command created the domain too (it did not exist).
    pub domain_created: bool,
    /// The section as created. A transient section is already gone when the command exits
    /// (`removed_on_exit`), unless another process is attached to the domain.
    pub section: Section,
    pub removed_on_exit: bool,
}

/// `rm`.
#[derive(Serialize)]
pub struct Rm {
    pub domain: String,
    pub removed: Vec<Named>,
}

#[derive(Serialize)]
pub struct Named {
    pub name: String,
}

/// `gc`.
#[derive(Serialize)]
pub struct Gc {
    pub dead_processes: Vec<GcProcess>,
    pub removed_unfinished: Vec<GcSection>,
    pub removed_sections: Vec<GcSection>,
    pub removed_domains: Vec<GcDomain>,
    pub removed_orphans: Vec<GcObject>,
    pub skipped: Vec<GcDomainWhy>,
    pub damaged: Vec<GcDomainWhy>,
    /// Locks whose holder was proven gone, broken by `gc --force`.
    pub broken_locks: Vec<GcDomainWhy>,
}

#[derive(Serialize)]
pub struct GcProcess {
    pub domain: String,
    pub pid: u32,
}

#[derive(Serialize)]
pub struct GcSection {
    pub domain: String,
    pub section: String,
    /// The creator that died while creating it (`removed_unfinished`), else `null`.
    pub creator_pid: Option<u32>,
}

#[derive(Serialize)]
pub struct GcDomain {
    pub domain: String,
}

#[derive(Serialize)]
pub struct GcObject {
    pub object: String,
}

#[derive(Serialize)]
pub struct GcDomainWhy {
    pub domain: String,
    pub reason: String,
}

impl Gc {
    pub fn new(r: &GcReport) -> Gc {
        let why = |v: &[(String, String)]| {
            v.iter().map(|(d, w)| GcDomainWhy { domain: d.clone(), reason: w.clone() }).collect()
        };
        Gc {
            dead_processes: r.dead_processes.iter().map(|(d, p)| GcProcess { domain: d.clone(), pid: *p }).collect(),
            removed_unfinished: r
                .removed_unfinished
                .iter()
                .map(|(d, s, p)| GcSection { domain: d.clone(), section: s.clone(), creator_pid: Some(*p) })
                .collect(),
            removed_sections: r
                .removed_sections
                .iter()
                .map(|(d, s)| GcSection { domain: d.clone(), section: s.clone(), creator_pid: None })
                .collect(),
            removed_domains: r.removed_domains.iter().map(|d| GcDomain { domain: d.clone() }).collect(),
            removed_orphans: r.removed_orphans.iter().map(|o| GcObject { object: o.clone() }).collect(),
            skipped: why(&r.skipped),
            damaged: why(&r.damaged),
            broken_locks: why(&r.broken_locks),
        }
    }
}

/// `heap`.
#[derive(Serialize)]
pub struct Heap {
    pub name: String,
    pub domain: String,
    pub address: String,
    pub stats: shmgadget::heap::HeapStats,
    pub named_objects: Vec<NamedObject>,
    /// Every block with `--blocks`, else `null`.
    pub blocks: Option<Vec<Block>>,
    /// The verdict of `--check`, else `null`.
    pub check: Option<Check>,
}

#[derive(Serialize)]
pub struct NamedObject {
    pub name: String,
    pub kind: &'static str,
    pub address: String,
    pub size: u64,
    /// A sync object's state (`{"kind": "mutex", …}`), else `null`.
    pub state: Option<shmgadget::heap::ObjectState>,
}

impl NamedObject {
    pub fn new(o: &shmgadget::heap::NamedObject) -> NamedObject {
        NamedObject {
            name: o.name.clone(),
            kind: o.kind.as_str(),
            address: addr(o.address),
            size: o.size,
            state: o.state,
        }
    }
}

#[derive(Serialize)]
pub struct Block {
    pub offset: u64,
    pub size: u64,
    /// `"free"`, `"cached"` or `"used"`.
    pub state: &'static str,
}

#[derive(Serialize)]
pub struct Check {
    pub ok: bool,
    /// The first violation, else `null`.
    pub problem: Option<String>,
}

/// `demo`: what each step's processes printed, in order.
#[derive(Serialize)]
pub struct Demo {
    pub domain: String,
    pub nodes: u64,
    pub steps: Vec<DemoStep>,
    pub total_ms: f64,
    pub ok: bool,
}

#[derive(Serialize)]
pub struct DemoStep {
    pub role: String,
    pub exit_code: Option<i32>,
    pub output: Vec<String>,
}

/// Any failure.
#[derive(Serialize)]
pub struct ErrorOut {
    pub error: ErrorBody,
}

#[derive(Serialize)]
pub struct ErrorBody {
    /// `"usage"` (exit status 2), a library error kind in snake_case (`"not_found"`,
    /// `"permission_denied"`, …), `"damaged"` for damage a listing found, or `"failed"`.
    pub kind: String,
    pub message: String,
}

/// Prints `v` as pretty JSON on stdout.
pub fn print<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => crate::out::outln!("{s}"),
        Err(e) => crate::out::errln!("shmgadget: cannot encode the JSON output: {e}"),
    }
}
