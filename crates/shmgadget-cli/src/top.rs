//! `shmgadget top`: a live view of one domain, refreshed every second (ratatui), or one frame
//! as text (`--once`).
//!
//! Each refresh takes a [`Sample`] (the registry read from outside, plus every heap's
//! statistics and named objects and every queue's figures, read through an attachment as
//! `heap` and `ls` do) and turns the last two samples into a [`Frame`]: rates are the
//! difference of the monotonic counters (`allocs`/`frees`, `sent`/`received`) over the time
//! between the samples. The terminal view and `--once` draw the same tables from the frame
//! ([`Frame::tables`]), so a script sees what a person sees.
//!
//! `top` attaches to the domain (so it shows among the processes, as the command name says);
//! it never creates a domain.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use shmgadget::heap::{Heap, HeapStats, NamedObject, ObjectState};
use shmgadget::inspect::{self, DomainReport};
use shmgadget::queue::QueueInfo;
use shmgadget::{Domain, SectionKind};

use crate::json::Peer;
use crate::out::outln;
use crate::ps::Proc;
use crate::size::format_size;

/// Time between refreshes (and between `--once`'s two samples).
const INTERVAL: Duration = Duration::from_secs(1);

struct HeapSample {
    name: String,
    stats: Result<HeapStats, String>,
    objects: Vec<NamedObject>,
}

struct Sample {
    at: Instant,
    report: DomainReport,
    heaps: Vec<HeapSample>,
    queues: Vec<(String, Result<QueueInfo, String>)>,
    tunnels: Vec<crate::tunnel_rows::TunnelEnd>,
}

fn sample(cli: &crate::Cli, domain: &Domain) -> Result<Sample, shmgadget::Error> {
    let report = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
    let at = Instant::now();
    let mut heaps = Vec::new();
    let mut queues = Vec::new();
    for s in &report.sections {
        match s.kind {
            SectionKind::Heap => {
                let heap = Heap::open(domain, &s.name);
                let stats = heap.as_ref().map_err(|e| e.to_string()).and_then(|h| h.stats().map_err(|e| e.to_string()));
                let objects = heap.as_ref().ok().and_then(|h| h.named_objects().ok()).unwrap_or_default();
                heaps.push(HeapSample { name: s.name.clone(), stats, objects });
            }
            SectionKind::Queue => {
                let info = domain.open_section(&s.name).and_then(|sec| shmgadget::queue::inspect(&sec));
                queues.push((s.name.clone(), info.map_err(|e| e.to_string())));
            }
            _ => {}
        }
    }
    let tunnels = crate::tunnel_rows::ends(domain, &report);
    Ok(Sample { at, report, heaps, queues, tunnels })
}

/// One table of a frame: title, column headers, rows of cells.
pub type TextTable = (String, Vec<&'static str>, Vec<Vec<String>>);

#[derive(Serialize)]
pub struct Frame {
    pub domain: String,
    /// Milliseconds between the two samples the rates come from.
    pub interval_ms: u64,
    pub processes: Vec<Proc>,
    pub sections: Vec<FrameSection>,
    pub heaps: Vec<FrameHeap>,
    pub queues: Vec<FrameQueue>,
    pub sync_objects: Vec<FrameSync>,
    /// Tunnel ends; `per_s` here is from the two samples' counters.
    pub tunnels: Vec<crate::tunnel_rows::TunnelEnd>,
}

#[derive(Serialize)]
pub struct FrameSection {
    pub name: String,
    pub kind: &'static str,
    pub reserved: u64,
    pub committed: u64,
    pub resident: Option<u64>,
}

#[derive(Serialize)]
pub struct FrameHeap {
    pub name: String,
    pub used: Option<u64>,
    pub free: Option<u64>,
    pub fragmentation: Option<f64>,
    pub allocs_per_s: Option<f64>,
    pub frees_per_s: Option<f64>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct FrameQueue {
    pub name: String,
    pub kind: Option<&'static str>,
    pub capacity: Option<u64>,
    pub fill: Option<u64>,
    pub sent_per_s: Option<f64>,
    pub received_per_s: Option<f64>,
    pub senders: Vec<Peer>,
    pub receivers: Vec<Peer>,
    pub blocked_senders: Option<u32>,
    pub blocked_receivers: Option<u32>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct FrameSync {
    pub heap: String,
    pub name: String,
    pub kind: &'static str,
    /// Mutex: the holder's pid, `null` when free.
    pub holder_pid: Option<u32>,
    /// Mutex: whether the holder is alive (`null` when free or unknown).
    pub holder_alive: Option<bool>,
    /// Processes that may be asleep on it (`null` for a mutex, which does not count them).
    pub waiters: Option<u32>,
    /// Its state in words, as the table shows it.
    pub state: String,
}

fn rate(now: u64, before: Option<u64>, secs: f64) -> Option<f64> {
    before.filter(|b| *b <= now && secs > 0.0).map(|b| (now - b) as f64 / secs)
}

fn peers(v: &[(u32, bool)]) -> Vec<Peer> {
    v.iter().map(|&(pid, alive)| Peer { pid, alive }).collect()
}

impl Frame {
    fn new(before: &Sample, now: &Sample) -> Frame {
        let secs = now.at.duration_since(before.at).as_secs_f64();
        let r = &now.report;
        let heaps = now
            .heaps
            .iter()
            .map(|h| {
                let prev = before.heaps.iter().find(|p| p.name == h.name).and_then(|p| p.stats.as_ref().ok());
                match &h.stats {
                    Ok(s) => FrameHeap {
                        name: h.name.clone(),
                        used: Some(s.blocks.used_bytes),
                        free: Some(s.blocks.free_bytes),
                        fragmentation: Some(s.fragmentation),
                        allocs_per_s: rate(s.blocks.allocs, prev.map(|p| p.blocks.allocs), secs),
                        frees_per_s: rate(s.blocks.frees, prev.map(|p| p.blocks.frees), secs),
                        error: None,
                    },
                    Err(e) => FrameHeap {
                        name: h.name.clone(),
                        used: None,
                        free: None,
                        fragmentation: None,
                        allocs_per_s: None,
                        frees_per_s: None,
                        error: Some(e.clone()),
                    },
                }
            })
            .collect();
        let queues = now
            .queues
            .iter()
            .map(|(name, q)| {
                let prev = before.queues.iter().find(|(n, _)| n == name).and_then(|(_, p)| p.as_ref().ok());
                match q {
                    Ok(q) => FrameQueue {
                        name: name.clone(),
                        kind: Some(q.kind),
                        capacity: Some(q.capacity),
                        fill: Some(q.fill),
                        sent_per_s: rate(q.sent, prev.map(|p| p.sent), secs),
                        received_per_s: rate(q.received, prev.map(|p| p.received), secs),
                        senders: peers(&q.senders),
                        receivers: peers(&q.receivers),
                        blocked_senders: Some(q.blocked_senders),
                        blocked_receivers: Some(q.blocked_receivers),
                        error: None,
                    },
                    Err(e) => FrameQueue {
                        name: name.clone(),
                        kind: None,
                        capacity: None,
                        fill: None,
                        sent_per_s: None,
                        received_per_s: None,
                        senders: Vec::new(),
                        receivers: Vec::new(),
                        blocked_senders: None,
                        blocked_receivers: None,
                        error: Some(e.clone()),
                    },
                }
            })
            .collect();
        let mut sync_objects = Vec::new();
        for h in &now.heaps {
            for o in h.objects.iter().filter(|o| o.state.is_some()) {
                let state = o.state.expect("filtered");
                let (holder_pid, holder_alive, waiters) = match state {
                    ObjectState::Mutex { owner, owner_alive, .. } => (owner, owner.and(owner_alive), None),
                    ObjectState::Semaphore { waiters, .. }
                    | ObjectState::Event { waiters, .. }
                    | ObjectState::Condvar { waiters } => (None, None, Some(waiters)),
                };
                sync_objects.push(FrameSync {
                    heap: h.name.clone(),
                    name: o.name.clone(),
                    kind: o.kind.as_str(),
                    holder_pid,
                    holder_alive,
                    waiters,
                    state: crate::describe_state(state),
                });
            }
        }
        let tunnels = now
            .tunnels
            .iter()
            .map(|t| {
                let prev = before.tunnels.iter().find(|p| p.section == t.section && p.pid == t.pid);
                let mut t = t.clone();
                if let Some(f) = t.forwarded {
                    t.per_s = rate(f, prev.and_then(|p| p.forwarded), secs).or(t.per_s);
                }
                t
            })
            .collect();
        Frame {
            tunnels,
            domain: r.name.clone(),
            interval_ms: (secs * 1000.0).round() as u64,
            processes: r.processes.iter().map(Proc::new).collect(),
            sections: r
                .sections
                .iter()
                .map(|s| FrameSection {
                    name: s.name.clone(),
                    kind: s.kind.as_str(),
                    reserved: s.reserved,
                    committed: s.committed,
                    resident: s.resident,
                })
                .collect(),
            heaps,
            queues,
            sync_objects,
        }
    }

    /// The six tables, `(title, header, rows)`, as both views draw them.
    pub fn tables(&self) -> Vec<TextTable> {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let per_s = |v: Option<f64>| opt(v.map(|r| format!("{r:.0}")));
        let me = std::process::id();
        let procs = self
            .processes
            .iter()
            .map(|p| {
                let mut cmd = p.command.clone().unwrap_or_else(|| "-".into());
                if p.pid == me {
                    cmd.push_str(" (this top)");
                }
                vec![p.pid.to_string(), cmd, p.uid.to_string(), if p.alive { "alive" } else { "DEAD" }.to_owned()]
            })
            .collect();
        let sections = self
            .sections
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.kind.to_owned(),
                    format_size(s.reserved),
                    format_size(s.committed),
                    opt(s.resident.map(format_size)),
                ]
            })
            .collect();
        let heaps = self
            .heaps
            .iter()
            .map(|h| match &h.error {
                Some(e) => vec![h.name.clone(), format!("unreadable: {e}")],
                None => vec![
                    h.name.clone(),
                    opt(h.used.map(format_size)),
                    opt(h.free.map(format_size)),
                    opt(h.fragmentation.map(|f| format!("{:.1}%", f * 100.0))),
                    per_s(h.allocs_per_s),
                    per_s(h.frees_per_s),
                ],
            })
            .collect();
        let peer_list = |v: &[Peer]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(|p| {
                        // Pid 0: the registration is gone (a dead peer whose slot was reaped).
                        let pid = if p.pid == 0 { "?".to_owned() } else { p.pid.to_string() };
                        format!("{pid} {}", if p.alive { "alive" } else { "DEAD" })
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let queues = self
            .queues
            .iter()
            .map(|q| match &q.error {
                Some(e) => vec![q.name.clone(), format!("unreadable: {e}")],
                None => {
                    let (fill, cap) = (q.fill.unwrap_or(0), q.capacity.unwrap_or(0).max(1));
                    vec![
                        q.name.clone(),
                        q.kind.unwrap_or("-").to_owned(),
                        format!("{fill}/{cap} ({:.0}%)", fill as f64 * 100.0 / cap as f64),
                        per_s(q.sent_per_s),
                        per_s(q.received_per_s),
                        peer_list(&q.senders),
                        peer_list(&q.receivers),
                        format!("{} send, {} recv", q.blocked_senders.unwrap_or(0), q.blocked_receivers.unwrap_or(0)),
                    ]
                }
            })
            .collect();
        let sync = self
            .sync_objects
            .iter()
            .map(|s| {
                vec![
                    s.heap.clone(),
                    s.name.clone(),
                    s.kind.to_owned(),
                    opt(s.holder_pid.map(|p| p.to_string())),
                    opt(s.waiters.map(|w| w.to_string())),
                    s.state.clone(),
                ]
            })
            .collect();
        let tunnels = self
            .tunnels
            .iter()
            .map(|t| match (&t.error, t.pid) {
                (Some(e), _) => vec![t.section.clone(), format!("unreadable: {e}")],
                (None, None) => vec![t.section.clone(), t.end.to_owned(), t.key.clone(), "DEAD".into()],
                (None, Some(pid)) => vec![
                    t.section.clone(),
                    t.end.to_owned(),
                    t.key.clone(),
                    pid.to_string(),
                    opt(t.forwarded.map(|f| f.to_string())),
                    per_s(t.per_s),
                    opt(t.in_flight.map(|f| f.to_string())),
                ],
            })
            .collect();
        vec![
            ("PROCESSES".into(), vec!["PID", "COMMAND", "UID", "STATE"], procs),
            ("SECTIONS".into(), vec!["NAME", "KIND", "RESERVED", "COMMITTED", "RESIDENT"], sections),
            ("HEAPS".into(), vec!["NAME", "USED", "FREE", "FRAG", "ALLOCS/S", "FREES/S"], heaps),
            ("QUEUES".into(), vec!["NAME", "KIND", "FILL", "IN/S", "OUT/S", "SENDERS", "RECEIVERS", "BLOCKED"], queues),
            ("SYNC OBJECTS".into(), vec!["HEAP", "NAME", "KIND", "HOLDER", "WAITERS", "STATE"], sync),
            ("TUNNELS".into(), vec!["SECTION", "END", "KEY", "PID", "FORWARDED", "MSG/S", "IN FLIGHT"], tunnels),
        ]
    }

    fn title(&self) -> String {
        format!(
            "shmgadget top: domain {:?}, {} processes, {} sections; rates over {} ms",
            self.domain,
            self.processes.len(),
            self.sections.len(),
            self.interval_ms
        )
    }

    /// The frame as plain text: a title, then each table with aligned columns.
    fn text(&self) -> String {
        let mut out = self.title();
        out.push('\n');
        for (title, header, rows) in self.tables() {
            out.push_str(&format!("\n{title}\n"));
            let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate().take(widths.len()) {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                let n = cells.len();
                let mut s = String::new();
                for (i, c) in cells.into_iter().enumerate() {
                    if i + 1 == n {
                        s.push_str(&c);
                    } else {
                        s.push_str(&format!("{c:<w$}  ", w = widths[i]));
                    }
                }
                s.trim_end().to_owned() + "\n"
            };
            out.push_str(&line(header.iter().map(|h| h.to_string()).collect()));
            if rows.is_empty() {
                out.push_str("(none)\n");
            }
            for r in rows {
                out.push_str(&line(r));
            }
        }
        out
    }
}

pub fn run(cli: &crate::Cli, once: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let domain = Domain::attach_with(&cli.domain, &crate::existing(cli))?;
    if once {
        let first = sample(cli, &domain)?;
        std::thread::sleep(INTERVAL);
        let second = sample(cli, &domain)?;
        let frame = Frame::new(&first, &second);
        if cli.json {
            crate::json::print(&frame);
        } else {
            outln!("{}", frame.text().trim_end());
        }
        drop((first, second));
        domain.detach()?;
        return Ok(ExitCode::SUCCESS);
    }
    if cli.json {
        return Err(shmgadget::Error::new(
            shmgadget::ErrorKind::InvalidArgument,
            "top --json prints one frame: add --once",
        )
        .into());
    }
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return Err(shmgadget::Error::new(
            shmgadget::ErrorKind::InvalidArgument,
            "top needs a terminal; `shmgadget top --once` prints one frame as text (or JSON with --json)",
        )
        .into());
    }
    let result = interactive(cli, &domain);
    domain.detach()?;
    result
}

fn interactive(cli: &crate::Cli, domain: &Domain) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let mut before = sample(cli, domain)?;
        let mut frame: Option<Frame> = None;
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                let now = sample(cli, domain)?;
                // The first frame comes at once (rates over the short gap), then one a second.
                frame = Some(Frame::new(&before, &now));
                before = now;
                next = Instant::now() + INTERVAL;
            }
            if let Some(f) = &frame {
                terminal.draw(|t| draw(t, f))?;
            }
            let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                    {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn draw(t: &mut ratatui::Frame<'_>, f: &Frame) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::text::Line;
    use ratatui::widgets::{Block, Row, Table};
    let tables = f.tables();
    let mut constraints = vec![Constraint::Length(1)];
    constraints.extend(tables.iter().map(|(_, _, rows)| Constraint::Length(rows.len().max(1) as u16 + 3)));
    constraints.push(Constraint::Min(0));
    let areas = Layout::vertical(constraints).split(t.area());
    t.render_widget(Line::from(format!("{}   (q quits)", f.title())), areas[0]);
    for (i, (title, header, rows)) in tables.into_iter().enumerate() {
        let n = header.len();
        let mut widths: Vec<u16> = header.iter().map(|h| h.len() as u16).collect();
        for r in &rows {
            for (j, c) in r.iter().enumerate().take(n) {
                widths[j] = widths[j].max(c.chars().count() as u16);
            }
        }
        let constraints: Vec<Constraint> = widths
            .iter()
            .enumerate()
            .map(|(j, w)| if j + 1 == n { Constraint::Min(*w) } else { Constraint::Length(*w) })
            .collect();
        let table = Table::new(rows.into_iter().map(Row::new), constraints)
            .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
            .column_spacing(2)
            .block(Block::bordered().title(format!(" {title} ")));
        t.render_widget(table, areas[i + 1]);
    }
}
