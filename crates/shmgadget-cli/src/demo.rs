//! `shmgadget demo`: two separate processes share a pointer-linked structure.
//!
//! The parent re-executes itself twice (no fork). The *builder* links N nodes, in scrambled
//! order, with plain pointers inside a section and exits. The *walker*, started afterwards,
//! follows those pointers from the head and checks the checksum the builder recorded. The
//! pointers work unchanged because the section has the same address in both processes.

use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::Instant;

use crate::out::outln;
use shmgadget::heap::{Heap, ShmHashMap};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const SECTION: &str = "demo.list";
const MAGIC: u64 = u64::from_le_bytes(*b"DEMOLIST");
const NODES_OFFSET: usize = 4096;

/// The list header, at the start of the section.
#[repr(C)]
struct Header {
    magic: u64,
    count: u64,
    head: *mut Node,
    checksum: u64,
}

/// One node. `next` is a plain pointer into the same section.
#[repr(C)]
struct Node {
    next: *mut Node,
    value: u64,
    index: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn mix(h: u64, node_value: u64, node_index: u64) -> u64 {
    h.rotate_left(7) ^ node_value ^ node_index.wrapping_mul(0x100_0000_01b3)
}

fn options(shm_dir: Option<&Path>) -> DomainOptions {
    DomainOptions { window_size: 4 << 30, shm_dir: shm_dir.map(Path::to_path_buf), ..Default::default() }
}

/// What the demo printed: straight to stdout, or (`--json`) collected into one JSON object
/// with each process's lines in their step.
struct Report {
    json: Option<crate::json::Demo>,
}

impl Report {
    /// A line of the parent's own.
    fn say(&mut self, line: String) {
        match &mut self.json {
            Some(d) => d.steps.push(crate::json::DemoStep {
                role: "parent".into(),
                exit_code: None,
                output: vec![line.trim().to_owned()],
            }),
            None => outln!("{line}"),
        }
    }

    /// Starts a worker: with `--json` its stdout is collected, else it writes to ours.
    fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        if self.json.is_some() {
            cmd.stdout(Stdio::piped());
        }
        cmd.spawn()
    }

    /// Waits for a worker, recording what it printed (with `--json`).
    fn wait(&mut self, role: &str, child: Child) -> std::io::Result<ExitStatus> {
        let out = child.wait_with_output()?;
        if let Some(d) = &mut self.json {
            let output = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
            d.steps.push(crate::json::DemoStep { role: role.into(), exit_code: out.status.code(), output });
        }
        Ok(out.status)
    }

    fn run(&mut self, role: &str, cmd: Command) -> std::io::Result<ExitStatus> {
        let child = self.spawn(cmd)?;
        self.wait(role, child)
    }
}

/// Runs the demo: builder, walker, clean-up.
pub fn run(shm_dir: Option<&Path>, nodes: u64, json: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if nodes == 0 || nodes > 50_000_000 {
        return Err(shmgadget::Error::new(
            shmgadget::ErrorKind::InvalidArgument,
            "--nodes must be between 1 and 50,000,000",
        )
        .into());
    }
    let domain = format!("demo-{}", std::process::id());
    let mut report = Report {
        json: json.then(|| crate::json::Demo {
            domain: domain.clone(),
            nodes,
            steps: Vec::new(),
            total_ms: 0.0,
            ok: false,
        }),
    };
    report.say(format!("shmgadget demo: two processes, one pointer-linked list of {nodes} nodes, domain {domain:?}\n"));
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let mut result = Ok(ExitCode::SUCCESS);
    let worker = |role: &str, index: u64| {
        let mut cmd = Command::new(&exe);
        let (nodes, index) = (nodes.to_string(), index.to_string());
        cmd.args(["demo-worker", role, "--nodes", &nodes, "--domain", &domain, "--index", &index]);
        if let Some(dir) = shm_dir {
            cmd.arg("--shm-dir").arg(dir);
        }
        cmd
    };
    for role in ["build", "walk"] {
        let status = report.run(role, worker(role, 0))?;
        if !status.success() {
            result = Err(format!("the {role} process failed ({status})").into());
            break;
        }
    }
    if result.is_ok() {
        report.say(format!(
            "\nnext: {INSERTERS} processes insert into one hash map in a shared heap at the same time, then another reads it\n"
        ));
        let started = Instant::now();
        let inserters: Vec<_> = (0..INSERTERS).map(|i| report.spawn(worker("insert", i))).collect::<Result<_, _>>()?;
        for child in inserters {
            let status = report.wait("insert", child)?;
            if !status.success() {
                result = Err(format!("an inserting process failed ({status})").into());
            }
        }
        if result.is_ok() {
            report.say(format!(
                "[parent  ] {} keys inserted by {INSERTERS} processes at once in {:.1} ms",
                INSERTERS * KEYS_PER,
                ms(started)
            ));
            let status = report.run("lookup", worker("lookup", 0))?;
            if !status.success() {
                result = Err(format!("the reading process failed ({status})").into());
            }
        }
    }
    if result.is_ok() {
        report.say(format!(
            "\nnext: one process streams {QUEUE_MESSAGES} messages of {QUEUE_MSG} bytes to another through a queue\n"
        ));
        let children = [report.spawn(worker("qrecv", 0))?, report.spawn(worker("qsend", 0))?];
        for (role, child) in ["qrecv", "qsend"].into_iter().zip(children) {
            let status = report.wait(role, child)?;
            if !status.success() {
                result = Err(format!("a queue process failed ({status})").into());
            }
        }
    }
    // Clean up whatever happened: delete the section; the registry goes with the last detach.
    let opts = DomainOptions { must_exist: true, ..options(shm_dir) };
    if let Ok(d) = Domain::attach_with(&domain, &opts) {
        let _ = d.delete_section(SECTION);
        let _ = d.delete_section(HEAP);
        let _ = d.delete_section(QUEUE);
        d.detach()?;
    }
    if result.is_ok() {
        report.say(format!("\nevery process saw the same addresses; total {:.1} ms, cleaned up", ms(started)));
    }
    if let Some(mut d) = report.json.take() {
        d.total_ms = ms(started);
        d.ok = result.is_ok();
        if d.ok {
            crate::json::print(&d);
        }
    }
    result
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// One demo process.
pub fn worker(
    domain: &str,
    shm_dir: Option<&Path>,
    role: &str,
    nodes: u64,
    index: u64,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match role {
        "build" => build(domain, shm_dir, nodes),
        "walk" => walk(domain, shm_dir),
        "insert" => insert(domain, shm_dir, index),
        "lookup" => lookup(domain, shm_dir),
        "qsend" => queue_send(domain, shm_dir),
        "qrecv" => queue_recv(domain, shm_dir),
        other => Err(format!("unknown demo role {other:?}").into()),
    }
}

const HEAP: &str = "demo.heap";
const INSERTERS: u64 = 3;
const KEYS_PER: u64 = 20_000;

type SharedMap = shmgadget::sync::Mutex<ShmHashMap<u64, u64>>;

/// Locks the shared map. If a demo process died holding the lock, the map is still a valid
/// table (hashbrown only publishes complete inserts), so we accept it and mark it repaired.
fn lock_map(m: &SharedMap) -> Result<shmgadget::sync::MutexGuard<'_, ShmHashMap<u64, u64>>, shmgadget::Error> {
    match m.lock() {
        Ok(g) => Ok(g),
        Err(shmgadget::sync::LockError::OwnerDied(mut g)) => {
            g.make_consistent();
            Ok(g)
        }
        Err(e) => Err(e.into()),
    }
}

fn insert(domain: &str, shm_dir: Option<&Path>, index: u64) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let d = Domain::attach_with(domain, &DomainOptions { must_exist: true, ..options(shm_dir) })?;
    let (heap, _) = Heap::create_or_open(&d, HEAP, 256 << 20)?;
    let alloc = heap.allocator();
    let (map, _) =
        heap.find_or_init_mutex("index", || ShmHashMap::try_new_in(alloc, 1024).expect("room for a small map"))?;
    for k in index * KEYS_PER..(index + 1) * KEYS_PER {
        lock_map(map)?.try_insert(k, splitmix(k))?;
    }
    outln!("[inserter pid {}] inserted {KEYS_PER} keys into the shared map; {:.1} ms", std::process::id(), ms(t));
    drop(heap);
    d.detach()?;
    Ok(ExitCode::SUCCESS)
}

fn lookup(domain: &str, shm_dir: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let d = Domain::attach_with(domain, &DomainOptions { must_exist: true, ..options(shm_dir) })?;
    let heap = Heap::open(&d, HEAP)?;
    let map = heap.find::<SharedMap>("index")?;
    let g = lock_map(map)?;
    let total = INSERTERS * KEYS_PER;
    let found = (0..total).filter(|k| g.get(k) == Some(&splitmix(*k))).count() as u64;
    let stats = heap.stats()?;
    outln!(
        "[reader   pid {}] found {found} of {total} keys with the right values; heap: {} KiB used in {} blocks, {} KiB committed; {:.1} ms",
        std::process::id(),
        stats.blocks.used_bytes / 1024,
        stats.blocks.used_blocks,
        stats.committed / 1024,
        ms(t)
    );
    drop(g);
    drop(heap);
    d.detach()?;
    Ok(if found == total { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn build(domain: &str, shm_dir: Option<&Path>, nodes: u64) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let d = Domain::attach_with(domain, &options(shm_dir))?;
    let bytes = NODES_OFFSET as u64 + nodes * size_of::<Node>() as u64;
    let section = d.create_section(SECTION, bytes, &SectionOptions::new())?;
    section.commit(bytes)?;
    let base = section.as_ptr();
    // Link the nodes in a scrambled order so the walk jumps around the section.
    let mut order: Vec<u64> = (0..nodes).collect();
    let mut seed = 0x5eed_u64;
    for i in (1..order.len()).rev() {
        seed = splitmix(seed);
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    // SAFETY: the section is committed for `bytes` bytes, i.e. the header page plus `nodes`
    // nodes; `NODES_OFFSET` keeps the nodes 8-aligned; no other process uses the section
    // until this one exits (the walker starts afterwards).
    let checksum = unsafe {
        let node_at = |i: u64| base.add(NODES_OFFSET).cast::<Node>().add(i as usize);
        let mut h = 0u64;
        for (pos, &i) in order.iter().enumerate() {
            let next = order.get(pos + 1).map_or(std::ptr::null_mut(), |&j| node_at(j));
            let value = splitmix(i);
            node_at(i).write(Node { next, value, index: i });
            h = mix(h, value, i);
        }
        base.cast::<Header>().write(Header { magic: MAGIC, count: nodes, head: node_at(order[0]), checksum: h });
        h
    };
    outln!(
        "[builder pid {}] section {SECTION:?} mapped at {:#x} ({} KiB); linked {nodes} nodes with plain pointers; checksum {checksum:#018x}; {:.1} ms",
        std::process::id(),
        base as usize,
        bytes / 1024,
        ms(t)
    );
    drop(section);
    d.detach()?;
    Ok(ExitCode::SUCCESS)
}

fn walk(domain: &str, shm_dir: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let d = Domain::attach_with(domain, &DomainOptions { must_exist: true, ..options(shm_dir) })?;
    // Learn where the list lives from the registry, but do not open or map the section: the
    // first dereference below faults, and shmgadget's handler maps it transparently.
    let info = d.section_info(SECTION)?;
    let base = info.address as *mut u8;
    let maps_before = shmgadget::first_touch_maps();
    let lo = base as usize + NODES_OFFSET;
    let hi = base as usize + info.reserved as usize;
    // SAFETY: the header lies in the section's first page, which the builder committed and
    // wrote before exiting; nobody writes the section while we read it. The section is not
    // mapped yet: this read faults and the handler maps it.
    let header = unsafe { base.cast::<Header>().read() };
    if header.magic != MAGIC {
        return Err(format!("section {SECTION:?} does not hold a demo list (magic {:#x})", header.magic).into());
    }
    let (mut p, mut h, mut seen) = (header.head, 0u64, 0u64);
    while !p.is_null() {
        let addr = p as usize;
        if addr < lo || addr + size_of::<Node>() > hi || addr % align_of::<Node>() != 0 || seen >= header.count {
            return Err(format!("corrupt list: pointer {addr:#x} after {seen} nodes lies outside the section").into());
        }
        // SAFETY: `p` was checked to lie, aligned, inside the section's node area, which the
        // builder wrote completely before exiting.
        let node = unsafe { p.read() };
        h = mix(h, node.value, node.index);
        seen += 1;
        p = node.next;
    }
    let ok = seen == header.count && h == header.checksum;
    let how = if shmgadget::first_touch_maps() > maps_before {
        "mapped on first touch, no explicit open"
    } else {
        "mapped eagerly at attach"
    };
    let verdict = if ok { "OK (matches the builder's)" } else { "MISMATCH" };
    outln!(
        "[walker  pid {}] section {SECTION:?} mapped at {:#x} ({how}); followed {seen} pointers; checksum {h:#018x} {verdict}; {:.1} ms",
        std::process::id(),
        base as usize,
        ms(t)
    );
    d.detach()?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

const QUEUE: &str = "demo.queue";
const QUEUE_MESSAGES: u64 = 2_000_000;
const QUEUE_MSG: usize = 64;

fn queue_send(domain: &str, shm_dir: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let d = Domain::attach_with(domain, &options(shm_dir))?;
    let (q, _) = shmgadget::queue::ByteQueue::create_or_open(&d, QUEUE, 1 << 20)?;
    let mut tx = q.sender()?;
    // A stream: publish in batches (dropping the sender publishes the rest).
    tx.set_batch(q.capacity() / 8);
    let mut msg = [0u8; QUEUE_MSG];
    for i in 0..QUEUE_MESSAGES {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        tx.send(&msg)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn queue_recv(domain: &str, shm_dir: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let d = Domain::attach_with(domain, &options(shm_dir))?;
    let (q, _) = shmgadget::queue::ByteQueue::create_or_open(&d, QUEUE, 1 << 20)?;
    let mut rx = q.receiver()?;
    let mut next = 0u64;
    let mut started = None;
    loop {
        match rx.recv() {
            Ok(m) => {
                started.get_or_insert_with(Instant::now);
                let i = u64::from_le_bytes(m[..8].try_into()?);
                if i != next || m.len() != QUEUE_MSG {
                    return Err(format!("message {i} ({} bytes) arrived where {next} was due", m.len()).into());
                }
                next += 1;
            }
            Err(e) if e.kind() == shmgadget::ErrorKind::Disconnected => break,
            Err(e) => return Err(e.into()),
        }
    }
    let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-9);
    outln!(
        "[receiver pid {}] {next} messages in order in {:.1} ms: {:.1} M messages/s ({:.0} MB/s), then the sender left",
        std::process::id(),
        secs * 1e3,
        next as f64 / secs / 1e6,
        (next * QUEUE_MSG as u64) as f64 / secs / 1e6
    );
    if next != QUEUE_MESSAGES {
        return Err(format!("received {next} of {QUEUE_MESSAGES} messages").into());
    }
    Ok(ExitCode::SUCCESS)
}
