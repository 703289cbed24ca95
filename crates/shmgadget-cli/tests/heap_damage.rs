//! A live heap damaged at random by another process: every library call and the CLI's
//! `heap NAME --check --blocks` then returns an error or a correct result, in separate
//! processes: no signal, no panic, no wait over 10 s.
//!
//! Per seed the parent builds a heap (blocks, named objects, a thread cache holding parked
//! blocks), a long-lived *damager* process writes 1 to 6 random values (1, 2, 4 or 8 bytes,
//! plausible or random) into its header (allocator control block, named-object table, cache
//! slots) or its first 64 KiB of blocks (block headers, cache stores, named objects), and a
//! long-lived *prober* process then runs every operation on it: open, stats, check, dump,
//! named objects, find, alloc (cached sizes and large ones, written to), usable_size, realloc,
//! free (by heap and by address), flush, trim. Every few seeds the CLI checks it too.
//!
//! The lock word is not damaged here: bounded waits on a damaged lock are tested with the
//! lock repair. `SHMGADGET_DAMAGE_SEEDS` sets the number of seeds (default 400).

use std::alloc::Layout;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use shmgadget::heap::{AREA_OFFSET, Heap};
use shmgadget::{Domain, DomainOptions};

const TEST: &str = "a_heap_damaged_by_another_process_gives_errors_or_correct_results";
const ROLE: &str = "SHMG_DAMAGE_ROLE";
const HEAP: &str = "victim";
const LIMIT: Duration = Duration::from_secs(10);
/// Where the heap's lock word lies in its header (`HeapShared::lock`).
const LOCK_AT: usize = 128;

fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn opts() -> DomainOptions {
    DomainOptions { window_size: 1 << 30, ..Default::default() }
}

/// Writes 1 to 6 random values into the heap section at `base` (`len` bytes), chosen by `seed`.
fn damage(base: *mut u8, len: usize, seed: u64) -> String {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let lock = LOCK_AT..LOCK_AT + size_of::<shmgadget::sync::RawMutex>();
    let mut what = Vec::new();
    for _ in 0..1 + rng(&mut s) % 6 {
        let width = 1usize << (rng(&mut s) % 4);
        let at = loop {
            let at = if rng(&mut s) % 2 == 0 {
                (rng(&mut s) % (12 << 10)) as usize // the header
            } else {
                AREA_OFFSET as usize + (rng(&mut s) % (64 << 10)) as usize // the first blocks
            } / width
                * width;
            if at + width <= lock.start || at >= lock.end {
                break at;
            }
        };
        let value = match rng(&mut s) % 6 {
            0 => rng(&mut s),
            1 => rng(&mut s) % 64,
            2 => 1 << 40,
            3 => (rng(&mut s) % (1 << 16)) & !15,
            4 => u64::MAX,
            _ => 0,
        };
        assert!(at + width <= len);
        // SAFETY: inside the mapped section (asserted); volatile stores of plain integers at an
        // aligned address: the damage another process could do. The heap's users read these
        // words through atomics; a torn or racing value is exactly what is being tested.
        unsafe {
            let p = base.add(at);
            match width {
                1 => p.write_volatile(value as u8),
                2 => p.cast::<u16>().write_volatile(value as u16),
                4 => p.cast::<u32>().write_volatile(value as u32),
                _ => p.cast::<u64>().write_volatile(value),
            }
        }
        what.push(format!("{at:#x}/{width}={value:#x}"));
    }
    what.join(",")
}

/// Every operation on the damaged heap; returns how many succeeded and failed.
fn probe(domain: &Domain, seed: u64) -> (u32, u32) {
    let mut results: Vec<bool> = Vec::new();
    let mut count = |r: bool| results.push(r);
    let heap = match Heap::open(domain, HEAP) {
        Ok(h) => h,
        Err(_) => return (0, 1),
    };
    let base = heap.section().as_ptr() as usize;
    let end = base + heap.section().len();
    count(heap.stats().is_ok());
    count(heap.check().is_ok());
    count(heap.dump(100_000).is_ok());
    if let Ok(named) = heap.named_objects() {
        count(true);
        for o in named {
            assert!(o.address as usize >= base && o.address as usize + o.size as usize <= end, "{o:?}");
        }
    }
    match heap.find::<u64>("n1") {
        // A correct result: the value the parent stored (unless the damage hit exactly it).
        Ok(v) => {
            count(true);
            let _ = std::hint::black_box(*v);
        }
        Err(_) => count(false),
    }
    let mut s = seed | 1;
    let mut live = Vec::new();
    for i in 0..40 {
        let size = if i % 5 == 4 { 5000 + rng(&mut s) % 30_000 } else { 1 + rng(&mut s) % 600 } as usize;
        match heap.alloc(Layout::from_size_align(size, 16).unwrap()) {
            Ok(p) => {
                count(true);
                let a = p.as_ptr() as usize;
                assert!(a >= base + AREA_OFFSET as usize && a + size <= end, "block {a:#x}+{size} outside the heap");
                // SAFETY: a block the heap handed out: `size` bytes inside the section (checked).
                unsafe { p.as_ptr().write_bytes(0xa5, size) };
                live.push(p);
            }
            Err(_) => count(false),
        }
        if i % 3 == 2 && !live.is_empty() {
            let p = live.swap_remove(rng(&mut s) as usize % live.len());
            count(heap.usable_size(p).is_ok());
            // SAFETY: our block, unused afterwards; the other half goes by address.
            count(unsafe { if i % 2 == 0 { heap.free(p) } else { shmgadget::heap::free(p) } }.is_ok());
        }
        if i % 7 == 6 && !live.is_empty() {
            let k = rng(&mut s) as usize % live.len();
            // SAFETY: our block; only the returned pointer is used afterwards.
            match unsafe { heap.realloc(live[k], 100 + rng(&mut s) as usize % 9000) } {
                Ok(p) => {
                    count(true);
                    live[k] = p;
                }
                Err(_) => count(false),
            }
        }
    }
    for p in live {
        // SAFETY: our blocks, unused afterwards.
        count(unsafe { heap.free(p) }.is_ok());
    }
    count(heap.flush_thread_cache().is_ok());
    count(heap.trim().is_ok());
    count(heap.check().is_ok());
    let ok = results.iter().filter(|&&r| r).count() as u32;
    (ok, results.len() as u32 - ok)
}

/// A long-lived child reading seeds on stdin and answering a line per seed.
struct Worker {
    child: Child,
    lines: Receiver<String>,
    role: &'static str,
}

impl Worker {
    fn start(role: &'static str, domain: &str) -> Worker {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1", "-q"])
            .env(ROLE, role)
            .env("SHMG_DAMAGE_DOMAIN", domain)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Worker { child, lines, role }
    }

    /// Sends `seed`, waits (at most LIMIT) for its answer.
    fn ask(&mut self, seed: u64, context: &str) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "{seed}").unwrap();
        let start = Instant::now();
        loop {
            match self.lines.recv_timeout(LIMIT.saturating_sub(start.elapsed())) {
                Ok(l) if l.starts_with(&format!("{seed} ")) => return l,
                Ok(_) => continue, // test harness chatter
                Err(_) => {
                    let _ = self.child.kill();
                    let status = self.child.wait().unwrap();
                    panic!(
                        "{} on seed {seed} ({context}): no answer within {LIMIT:?}; it ended with {status}",
                        self.role
                    );
                }
            }
        }
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{} ended with {status}", self.role);
    }
}

fn child(role: &str) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a valid signal has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let domain = Domain::attach_with(&std::env::var("SHMG_DAMAGE_DOMAIN").unwrap(), &opts()).unwrap();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines().map_while(Result::ok) {
        let seed: u64 = line.trim().parse().unwrap();
        let answer = if role == "damager" {
            let s = domain.open_section(HEAP).unwrap();
            damage(s.as_ptr(), s.len(), seed)
        } else {
            let (ok, err) = probe(&domain, seed);
            format!("ok={ok} err={err}")
        };
        println!("{seed} {answer}");
    }
    domain.detach().unwrap();
}

/// A heap as programs leave it: blocks of many sizes, named objects, parked blocks in this
/// thread's cache.
fn build(domain: &Domain) -> Heap {
    let heap = Heap::create(domain, HEAP, 4 << 20).unwrap();
    for k in 0..4u64 {
        let (v, _) = heap.find_or_init::<u64>(&format!("n{k}"), || 1000 + k).unwrap();
        assert_eq!(*v, 1000 + k);
    }
    let mut blocks: Vec<_> =
        (0..120).map(|i| heap.alloc(Layout::from_size_align(16 + (i * 37) % 3000, 16).unwrap()).unwrap()).collect();
    for p in blocks.drain(..).step_by(2) {
        // SAFETY: ours, unused afterwards (into this thread's cache when small).
        unsafe { heap.free(p).unwrap() };
    }
    heap
}

#[test]
fn a_heap_damaged_by_another_process_gives_errors_or_correct_results() {
    if let Ok(role) = std::env::var(ROLE) {
        return child(&role);
    }
    let seeds: u64 = std::env::var("SHMGADGET_DAMAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let name = format!("t-heapdmg-{}", std::process::id());
    let domain = Domain::attach_with(&name, &opts()).unwrap();
    let mut damager = Worker::start("damager", &name);
    let mut prober = Worker::start("prober", &name);
    let (mut ok, mut err, mut cli_fail) = (0u64, 0u64, 0);
    let start = Instant::now();
    for seed in 1..=seeds {
        let heap = build(&domain);
        let what = damager.ask(seed, "damaging");
        let answer = prober.ask(seed, &what);
        for part in answer.split_whitespace() {
            match part.split_once('=') {
                Some(("ok", n)) => ok += n.parse::<u64>().unwrap(),
                Some(("err", n)) => err += n.parse::<u64>().unwrap(),
                _ => {}
            }
        }
        if seed % 6 == 0 {
            let t = Instant::now();
            let out = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
                .args(["--domain", &name, "heap", HEAP, "--check", "--blocks"])
                .env_remove("SHMGADGET_DOMAIN")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.signal().is_none() && matches!(out.status.code(), Some(0 | 1)),
                "seed {seed} ({what}): `heap --check --blocks` ended with {}: {stderr}",
                out.status
            );
            assert!(!stderr.contains("panicked"), "seed {seed} ({what}): {stderr}");
            assert!(t.elapsed() < LIMIT, "seed {seed}: the CLI took {:?}", t.elapsed());
            cli_fail += u32::from(!out.status.success());
        }
        drop(heap);
        domain.delete_section(HEAP).unwrap();
    }
    damager.finish();
    prober.finish();
    eprintln!(
        "{seeds} seeds in {:?}: {ok} operations succeeded, {err} failed with an error; the CLI reported damage {cli_fail} times",
        start.elapsed()
    );
    assert!(err > 0, "the damage was never noticed: the test damages nothing");
    domain.detach().unwrap();
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("shmgadget.{name}:")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
