//! The classic C interface measured from C, next to references measured in the same run.
//!
//! Compiles `benches/c/bench.c` with `cc -O2` against the `libshm_nt.so` built with this
//! benchmark and runs it as processes (see the comment at the top of bench.c for the modes):
//! glibc `malloc`/`free` (and mimalloc's `mi_malloc`/`mi_free` when the system has
//! `libmimalloc.so.2`, Debian package `libmimalloc2.0`) against `shm_alloc`/`shm_free` on the
//! 16 B-4 KiB mix with 64 live blocks (the loop of `crates/shmgadget/benches/heap.rs`), two processes on one heap against
//! one (and glibc in two threads), `shm_q_write`/`shm_q_read` against a pipe, an 8-byte round
//! trip through two queues (and the CPU the echoing side uses while it waits 100 ms in
//! `shm_q_read`), semaphore post+wait, and `memcpy`. Every measurement is repeated
//! (`SHMG_CBENCH_REPS`, default 5), the repetitions interleaved so subject and reference see
//! the same machine; the table shows medians, and each ratio is taken between medians of this
//! run.
//!
//! Run: `cargo bench -p shm-nt --bench c_interface` (`SHMG_CBENCH_QUICK=1` for a short run).
//! With `SHMG_CBENCH_BASELINE=DIR` (a directory holding another build's `libshm_nt.so`, e.g.
//! of the previous commit) the C interface's rows are measured against that library too, in
//! the same repetitions, and a before/after table follows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Directory of the `libshm_nt.so` built for this benchmark (next to this binary).
fn lib_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

fn compile() -> PathBuf {
    let dir = env!("CARGO_MANIFEST_DIR");
    let lib = lib_dir();
    assert!(lib.join("libshm_nt.so").exists(), "libshm_nt.so not built in {}", lib.display());
    let exe = std::env::temp_dir().join(format!("shm_nt_cbench_{}", std::process::id()));
    let o = Command::new("cc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra"])
        .arg(format!("-I{dir}/include"))
        .arg(format!("{dir}/benches/c/bench.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lshm_nt", "-lpthread", "-ldl"])
        .output()
        .unwrap();
    assert!(o.status.success(), "cc bench.c failed:\n{}", String::from_utf8_lossy(&o.stderr));
    exe
}

struct Bench {
    exe: PathBuf,
    /// Directory of the `libshm_nt.so` the program runs against (LD_LIBRARY_PATH wins over
    /// the program's RUNPATH).
    lib: PathBuf,
    serial: u32,
    secs: f64,
    count: u64,
}

impl Bench {
    /// A fresh domain name for one measurement.
    fn domain(&mut self) -> String {
        self.serial += 1;
        format!("cbench-{}-{}", std::process::id(), self.serial)
    }

    /// The program with `args`, against the library next to this benchmark: cargo puts
    /// `target/<profile>` first on `LD_LIBRARY_PATH`, where a stale `libshm_nt.so` would win
    /// over the rpath.
    fn command(&self, domain: &str, args: &[String]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args).env("LD_LIBRARY_PATH", &self.lib).env("SHMGADGET_DOMAIN", domain).stdout(Stdio::piped());
        c
    }

    fn spawn(&self, domain: &str, args: &[String]) -> Child {
        self.command(domain, args).spawn().unwrap()
    }
}

fn args(a: &[&dyn ToString]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The value of `key` in a program's output.
fn value(o: &Output, key: &str) -> f64 {
    assert!(o.status.success(), "bench program failed ({}): {}", o.status, String::from_utf8_lossy(&o.stdout));
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("no {key} in {text:?}"))
}

/// Removes what a measurement left in its domain.
fn clean(domain: &str) {
    let opts = shmgadget::DomainOptions { must_exist: true, ..Default::default() };
    if let Ok(d) = shmgadget::Domain::attach_with(domain, &opts) {
        for s in d.sections() {
            let _ = d.delete_section(&s.name);
        }
        let _ = d.detach();
    }
}

fn start_in(ms: u64) -> u128 {
    (SystemTime::now() + Duration::from_millis(ms)).duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Pairs per second of `mode` in `procs` processes at once (summed), on one heap; and pairs
/// per CPU second (summed: what they would do with a core each, preemption left out).
fn pairs(b: &mut Bench, mode: &str, procs: usize) -> f64 {
    pairs_cpu(b, mode, procs).0
}

fn pairs_cpu(b: &mut Bench, mode: &str, procs: usize) -> (f64, f64) {
    let d = b.domain();
    if mode != "malloc" && mode != "mimalloc" {
        // Create the heap first so the processes start together on a ready heap.
        let o = b.command(&d, &args(&[&mode, &0.01, &0])).output().unwrap();
        value(&o, if mode == "realloc" { "realloc_per_s" } else { "pairs_per_s" });
    }
    let start = start_in(400);
    let children: Vec<Child> = (0..procs).map(|_| b.spawn(&d, &args(&[&mode, &b.secs, &start]))).collect();
    let key = if mode == "realloc" { "realloc_per_s" } else { "pairs_per_s" };
    let (mut total, mut cpu) = (0.0, 0.0);
    for c in children {
        let o = c.wait_with_output().unwrap();
        total += value(&o, key);
        if mode != "realloc" {
            cpu += value(&o, "pairs_per_cpu_s");
        }
    }
    clean(&d);
    (total, cpu)
}

fn malloc_threads(b: &mut Bench, n: usize) -> (f64, f64) {
    let o = b.command("-", &args(&[&"malloc_threads", &b.secs, &n])).output().unwrap();
    (value(&o, "pairs_per_s"), value(&o, "pairs_per_cpu_s"))
}

fn pipe(b: &mut Bench, size: usize) -> f64 {
    let o = b.command("-", &args(&[&"pipe", &size, &b.count])).output().unwrap();
    value(&o, "msgs_per_s")
}

fn queue(b: &mut Bench, size: usize) -> f64 {
    let d = b.domain();
    let rx = b.spawn(&d, &args(&[&"q_recv", &"q", &size, &b.count]));
    let tx = b.spawn(&d, &args(&[&"q_send", &"q", &size, &b.count]));
    let rate = value(&rx.wait_with_output().unwrap(), "msgs_per_s");
    assert!(tx.wait_with_output().unwrap().status.success());
    clean(&d);
    rate
}

/// The Rust API's byte queue on the same stream as `queue` (same domain setup, queue name,
/// 1 MiB ring, counts, and a receiver that copies each message out with `recv_into` and checks
/// its number): this binary re-executed as both processes. `batch` 0 publishes every message
/// at once, as the C interface does; else the sender publishes every `batch` bytes and at the
/// end (`ByteSender::set_batch`, `flush`). Splits the C queue's cost into the C layer (C row
/// against this one unbatched) and the publication of each message (unbatched against
/// batched).
fn rust_queue(b: &mut Bench, size: usize, batch: u64) -> f64 {
    let d = b.domain();
    let role = |r: &str| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env(RUST_ROLE, r).env("SHMGADGET_DOMAIN", &d).env("ARG", format!("{size},{},{batch}", b.count));
        c.stdout(Stdio::piped()).spawn().unwrap()
    };
    let rx = role("recv");
    let tx = role("send");
    let rate = value(&rx.wait_with_output().unwrap(), "msgs_per_s");
    assert!(tx.wait_with_output().unwrap().status.success());
    clean(&d);
    rate
}

const RUST_ROLE: &str = "SHMG_CBENCH_RUST_ROLE";

/// One process of `rust_queue`: what `q_send`/`q_recv` in bench.c do, through the Rust API.
fn rust_queue_role(role: &str) {
    let a: Vec<u64> = std::env::var("ARG").unwrap().split(',').map(|x| x.parse().unwrap()).collect();
    let (size, count, batch) = (a[0] as usize, a[1], a[2]);
    let d = shmgadget::Domain::attach(&std::env::var("SHMGADGET_DOMAIN").unwrap()).unwrap();
    let (q, _) = shmgadget::queue::ByteQueue::create_or_open(&d, "q", 1 << 20).unwrap();
    if role == "count" {
        // One process, both ends: `count` sends each followed by its receive, for instruction
        // counts (callgrind `--toggle-collect=*counted_rust_queue*`, as bench.c's count_queue).
        let (mut tx, mut rx) = (q.sender().unwrap(), q.receiver().unwrap());
        let (msg, mut buf) = (vec![0u8; size], vec![0u8; size]);
        counted_rust_queue(&mut tx, &mut rx, &msg, &mut buf, 1000);
        counted_rust_queue(&mut tx, &mut rx, &msg, &mut buf, count);
        return;
    }
    if role == "send" {
        let mut tx = q.sender().unwrap();
        tx.set_batch(batch);
        let mut msg = vec![0u8; size];
        for i in 0..count + 1 {
            msg[..8].copy_from_slice(&i.to_ne_bytes());
            tx.send(&msg).unwrap();
        }
        // Dropping the sender publishes the rest; the receiver drains it after we are gone.
        return;
    }
    let mut rx = q.receiver().unwrap();
    let mut buf = vec![0u8; size];
    assert_eq!(rx.recv_into(&mut buf, None).unwrap(), size);
    let t0 = std::time::Instant::now();
    for i in 1..=count {
        assert_eq!(rx.recv_into(&mut buf, None).unwrap(), size);
        let v = u64::from_ne_bytes(buf[..8].try_into().unwrap());
        assert_eq!(v, i, "message {i} arrived as {v}");
    }
    println!("msgs_per_s {:.0}", count as f64 / t0.elapsed().as_secs_f64());
}

#[inline(never)]
fn counted_rust_queue(
    tx: &mut shmgadget::queue::ByteSender<'_>,
    rx: &mut shmgadget::queue::ByteReceiver<'_>,
    msg: &[u8],
    buf: &mut [u8],
    n: u64,
) {
    for _ in 0..n {
        tx.send(msg).unwrap();
        assert_eq!(rx.recv_into(buf, None).unwrap(), msg.len());
    }
}

/// 8-byte round trips through two queues, both processes running: (median, 99th percentile)
/// in ns; then five more, each after the echoing process waited 100 ms in `shm_q_read`: the
/// CPU it used meanwhile (% of one core) and the median round trip that woke it (ns).
fn round_trip(b: &mut Bench) -> (f64, f64, f64, f64) {
    let d = b.domain();
    let pong = b.spawn(&d, &args(&[&"pong"]));
    let o = b.command(&d, &args(&[&"ping", &(b.count / 10)])).output().unwrap();
    let (med, p99, woken) = (value(&o, "rtt_median_ns"), value(&o, "rtt_p99_ns"), value(&o, "woken_rtt_median_ns"));
    let cpu = value(&pong.wait_with_output().unwrap(), "paused_cpu_percent");
    clean(&d);
    (med, p99, cpu, woken)
}

fn sem(b: &mut Bench) -> f64 {
    let d = b.domain();
    let o = b.command(&d, &args(&[&"sem_pair", &b.count])).output().unwrap();
    let r = value(&o, "sem_pairs_per_s");
    clean(&d);
    r
}

fn memcpy(b: &mut Bench, size: usize) -> f64 {
    let o = b.command("-", &args(&[&"memcpy", &size])).output().unwrap();
    value(&o, "bytes_per_s")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if let Ok(role) = std::env::var(RUST_ROLE) {
        rust_queue_role(&role);
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let quick = std::env::var_os("SHMG_CBENCH_QUICK").is_some();
    let reps: usize = std::env::var("SHMG_CBENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut b = Bench {
        exe: compile(),
        lib: lib_dir(),
        serial: 0,
        secs: if quick { 0.2 } else { 1.0 },
        count: if quick { 200_000 } else { 2_000_000 },
    };
    let baseline = std::env::var_os("SHMG_CBENCH_BASELINE").map(PathBuf::from);
    if let Some(base) = &baseline {
        assert!(base.join("libshm_nt.so").exists(), "no libshm_nt.so in {}", base.display());
    }
    let mut m: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for rep in 0..reps {
        eprintln!("c_interface: repetition {} of {reps}", rep + 1);
        for (key, cpu_key, (wall, cpu)) in [
            ("malloc", "cpu_malloc", pairs_cpu(&mut b, "malloc", 1)),
            ("malloc_2t", "cpu_malloc_2t", malloc_threads(&mut b, 2)),
            ("mimalloc", "cpu_mimalloc", pairs_cpu(&mut b, "mimalloc", 1)),
            ("alloc", "cpu_alloc", pairs_cpu(&mut b, "alloc", 1)),
            ("alloc_2p", "cpu_alloc_2p", pairs_cpu(&mut b, "alloc", 2)),
        ] {
            m.entry(key).or_default().push(wall);
            m.entry(cpu_key).or_default().push(cpu);
        }
        m.entry("realloc").or_default().push(pairs(&mut b, "realloc", 1));
        m.entry("pipe64").or_default().push(pipe(&mut b, 64));
        m.entry("q64").or_default().push(queue(&mut b, 64));
        m.entry("pipe1k").or_default().push(pipe(&mut b, 1024));
        m.entry("q1k").or_default().push(queue(&mut b, 1024));
        // The Rust API on the same streams (see `rust_queue`): unbatched, and batched at an
        // eighth of the ring as the Rust throughput benchmark streams.
        for (k, size, batch) in
            [("rq64", 64, 0), ("rq1k", 1024, 0), ("rq64_batched", 64, 128 << 10), ("rq1k_batched", 1024, 128 << 10)]
        {
            m.entry(k).or_default().push(rust_queue(&mut b, size, batch));
        }
        let (med, p99, cpu, woken) = round_trip(&mut b);
        m.entry("rtt_med").or_default().push(med);
        m.entry("rtt_p99").or_default().push(p99);
        m.entry("rtt_paused_cpu").or_default().push(cpu);
        m.entry("rtt_woken").or_default().push(woken);
        m.entry("sem").or_default().push(sem(&mut b));
        m.entry("memcpy1m").or_default().push(memcpy(&mut b, 1 << 20));
        if let Some(base) = &baseline {
            b.lib = base.clone();
            let (wall, cpu) = pairs_cpu(&mut b, "alloc", 1);
            m.entry("b_alloc").or_default().push(wall);
            m.entry("b_cpu_alloc").or_default().push(cpu);
            let (wall, cpu) = pairs_cpu(&mut b, "alloc", 2);
            m.entry("b_alloc_2p").or_default().push(wall);
            m.entry("b_cpu_alloc_2p").or_default().push(cpu);
            m.entry("b_realloc").or_default().push(pairs(&mut b, "realloc", 1));
            m.entry("b_q64").or_default().push(queue(&mut b, 64));
            m.entry("b_q1k").or_default().push(queue(&mut b, 1024));
            let (med, p99, _, _) = round_trip(&mut b);
            m.entry("b_rtt_med").or_default().push(med);
            m.entry("b_rtt_p99").or_default().push(p99);
            m.entry("b_sem").or_default().push(sem(&mut b));
            b.lib = lib_dir();
        }
    }
    let _ = std::fs::remove_file(&b.exe);
    let g = |k: &str| median(&m[k]);
    let ns = |per_s: f64| 1e9 / per_s;
    let range = |k: &str| {
        let v = &m[k];
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (lo, hi)
    };
    // The machine may be shared: a ratio within each repetition (subject and reference measured
    // back to back) resists drifting load better than a ratio of medians.
    let per_rep = |num: &str, den: &str| median(&m[num].iter().zip(&m[den]).map(|(a, b)| a / b).collect::<Vec<_>>());
    println!("\n## The C interface from C ({reps} repetitions, medians; ratios within this run)\n");
    println!("| measured through `shm_nt.h` | C interface | same-run reference | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| `shm_alloc`+`shm_free` pair, 16 B-4 KiB mix, 64 live | {:.0} ns | glibc malloc+free {:.0} ns | {:.2}x glibc |",
        ns(g("alloc")),
        ns(g("malloc")),
        ns(g("alloc")) / ns(g("malloc"))
    );
    // mimalloc (the system's libmimalloc.so.2, when installed): the stretch reference.
    let mimalloc = m["mimalloc"].iter().all(|&v| v > 0.0);
    if mimalloc {
        println!(
            "| the same pair | {:.0} ns | mimalloc mi_malloc+mi_free {:.0} ns | {:.2}x mimalloc |",
            ns(g("alloc")),
            ns(g("mimalloc")),
            ns(g("alloc")) / ns(g("mimalloc"))
        );
    } else {
        println!("| the same pair | | mimalloc: not installed (Debian package libmimalloc2.0) | |");
    }
    println!(
        "| two processes on one heap, total pairs/s | {:.1} M/s | one process {:.1} M/s (glibc, two threads: {:.2}x one) | {:.2}x one process |",
        g("alloc_2p") / 1e6,
        g("alloc") / 1e6,
        g("malloc_2t") / g("malloc"),
        g("alloc_2p") / g("alloc")
    );
    println!("| `shm_realloc` to the next size of the mix | {:.0} ns | | |", ns(g("realloc")));
    println!(
        "| `shm_q_write`/`shm_q_read`, 64 B messages | {:.1} M msg/s | pipe {:.2} M msg/s | {:.1}x the pipe |",
        g("q64") / 1e6,
        g("pipe64") / 1e6,
        g("q64") / g("pipe64")
    );
    println!(
        "| `shm_q_write`/`shm_q_read`, 1 KiB messages | {:.1} M msg/s ({:.1} GB/s) | pipe {:.2} M msg/s; memcpy of 1 MiB {:.1} GB/s | {:.1}x the pipe |",
        g("q1k") / 1e6,
        g("q1k") * 1024.0 / 1e9,
        g("pipe1k") / 1e6,
        g("memcpy1m") / 1e9,
        g("q1k") / g("pipe1k")
    );
    for (size, k) in [("64 B", "64"), ("1 KiB", "1k")] {
        println!(
            "| the Rust API on the same stream, {size}: unbatched / batched | {:.1} / {:.1} M msg/s | C interface {:.1} M msg/s | C {:.2}x / {:.2}x the Rust API's rate |",
            g(&format!("rq{k}")) / 1e6,
            g(&format!("rq{k}_batched")) / 1e6,
            g(&format!("q{k}")) / 1e6,
            per_rep(&format!("q{k}"), &format!("rq{k}")),
            per_rep(&format!("q{k}"), &format!("rq{k}_batched")),
        );
    }
    println!(
        "| round trip, 8 B, two queues: median / 99th percentile | {:.2} µs / {:.2} µs | | |",
        g("rtt_med") / 1e3,
        g("rtt_p99") / 1e3
    );
    println!(
        "| the echoing side waiting 100 ms in `shm_q_read` (5 pauses): its CPU / the round trip that wakes it | {:.2}% of a core / {:.1} µs | | |",
        g("rtt_paused_cpu"),
        g("rtt_woken") / 1e3
    );
    println!("| `shm_sem_post`+`shm_sem_wait(0)` pair | {:.0} ns | | |", ns(g("sem")));
    println!("\nMedian of the per-repetition ratios:");
    println!("  shm_alloc+shm_free pair / glibc pair (time): {:.2}x", per_rep("malloc", "alloc"));
    if mimalloc {
        println!("  shm_alloc+shm_free pair / mimalloc pair (time): {:.2}x", per_rep("mimalloc", "alloc"));
    }
    println!("  two processes / one process (pairs/s): {:.2}x", per_rep("alloc_2p", "alloc"));
    println!("  glibc two threads / one thread (pairs/s): {:.2}x", per_rep("malloc_2t", "malloc"));
    println!("  queue 64 B / pipe 64 B: {:.1}x", per_rep("q64", "pipe64"));
    println!("\nIn CPU time (each loop's own thread CPU time: preemption by other load left out):");
    println!(
        "  shm_alloc+shm_free pair {:.0} ns, glibc pair {:.0} ns: {:.2}x glibc (median of per-repetition ratios)",
        ns(g("cpu_alloc")),
        ns(g("cpu_malloc")),
        per_rep("cpu_malloc", "cpu_alloc")
    );
    if mimalloc {
        println!(
            "  shm_alloc+shm_free pair {:.0} ns, mimalloc pair {:.0} ns: {:.2}x mimalloc (median of per-repetition ratios)",
            ns(g("cpu_alloc")),
            ns(g("cpu_mimalloc")),
            per_rep("cpu_mimalloc", "cpu_alloc")
        );
    }
    println!(
        "  two processes / one process (pairs per CPU second, summed): {:.2}x; glibc two threads / one: {:.2}x",
        per_rep("cpu_alloc_2p", "cpu_alloc"),
        per_rep("cpu_malloc_2t", "cpu_malloc")
    );
    println!("  queue 1 KiB / pipe 1 KiB: {:.1}x", per_rep("q1k", "pipe1k"));
    if baseline.is_some() {
        println!("\n## Before / after: the baseline library against this build (same run, medians)\n");
        println!("| path | baseline | this build | this build / baseline (median of per-repetition ratios) |");
        println!("|---|---|---|---|");
        for (what, k, rate) in [
            ("`shm_alloc`+`shm_free` pair", "alloc", true),
            ("`shm_alloc`+`shm_free` pair, CPU time", "cpu_alloc", true),
            ("two processes on one heap (per pair, both together)", "alloc_2p", true),
            ("two processes on one heap, CPU time (per pair, summed rates)", "cpu_alloc_2p", true),
            ("`shm_realloc`", "realloc", true),
            ("queue 64 B", "q64", true),
            ("queue 1 KiB", "q1k", true),
            ("round trip median", "rtt_med", false),
            ("round trip p99", "rtt_p99", false),
            ("`shm_sem_post`+`shm_sem_wait(0)`", "sem", true),
        ] {
            let bk = &format!("b_{k}");
            let fmt = |v: f64| if rate { format!("{:.0} ns", 1e9 / v) } else { format!("{:.2} µs", v / 1e3) };
            // Time per operation: this build over baseline (below 1 is faster).
            let ratio = if rate { per_rep(bk, k) } else { per_rep(k, bk) };
            println!("| {what} | {} | {} | {ratio:.2}x the time |", fmt(g(bk)), fmt(g(k)));
        }
    }
    println!("\nSpread (min-max over the repetitions):");
    for k in m.keys() {
        let (lo, hi) = range(k);
        println!("  {k:<10} {lo:>14.0} - {hi:>14.0}");
    }
}
